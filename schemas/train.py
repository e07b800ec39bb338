"""The train stage: SOAP descriptors + the NN-NMR shift model, k-fold, Horovod data-parallel."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Element, InputPath, Spec, SpecError, Width, duplicates


class TrainSpec(Spec):
    """Learn the shift of each target nucleus from its SOAP environment."""

    frames: list[InputPath] = []
    """Labelled frames (extended XYZ with `fermi_contact_mhz`, or VASP OUTCARs, or folders of
    OUTCAR* files); the label stage's frames in the store are added when that stage ran."""

    # ---- SOAP (dscribe) of the target nuclei -----------------------------------------------
    species: list[Element] = Field(default=["Na", "Mg", "Mn", "O"], min_length=1)
    """Chemical species of the SOAP basis (every species of the frames; order is irrelevant)."""
    centre: Element = "Na"
    """The target nucleus: SOAP centres and the shifts learned."""
    soap_r_cut_a: float = Field(default=5.5, gt=1)
    """SOAP cutoff radius (A), > 1 (dscribe's GTO basis); paper: 5.5."""
    soap_sigma_a: float = Field(default=0.5, gt=0)
    """Width of the SOAP atomic Gaussians (A); paper: 0.5."""
    soap_n_max: int = Field(default=9, ge=1)
    """Radial basis functions of SOAP; paper: 9."""
    soap_l_max: int = Field(default=9, ge=0, le=20)
    """Maximum degree of the SOAP spherical harmonics (0..20); paper: 9."""

    # ---- the network -------------------------------------------------------------------------
    hidden_units: list[Width] = Field(default=[512, 512, 512], min_length=1)
    """Width of each hidden (relu) layer; paper: 3 x 512."""
    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout rate after every hidden layer."""
    l2_lambda: float = Field(default=1e-6, ge=0)
    """L2 penalty on every layer's kernel, relative to the mean squared error of the
    STANDARDISED targets (the paper's 1e-2 acted on raw ppm targets; divided by the target
    variance, that is ~1.5e-8 here, so any value here is in standardised units)."""
    standardise_features: bool = False
    """Scale every SOAP feature to zero mean and unit variance over the training rows (folded
    into the first layer at inference, which takes the raw vectors). Off by default: on the
    L2-normalised SOAP rows it amplified near-constant features (first-epoch training MSE 6.5
    vs 0.42 standardised-target units on the P2-NMMO data)."""

    # ---- optimisation ------------------------------------------------------------------------
    learning_rate: float = Field(default=1e-3, gt=0)
    """Initial learning rate of Adam."""
    lr_decay_rate: float = Field(default=1.0, ge=0)
    """Inverse-time decay: lr = learning_rate / (1 + lr_decay_rate * epoch / lr_decay_epochs)."""
    lr_decay_epochs: float = Field(default=50.0, gt=0)
    """Epochs over which the inverse-time decay divides the learning rate by 1 + rate."""
    xla_optimizer_update: bool = True
    """Compile the update of the weights (L2 gradient + Adam) with XLA: one fused pass over the
    3.9 M weights instead of one per elementwise op. Every rank repeats this update, so its
    cost also bounds the data-parallel speed-up at small batches (docs/nnmr.md)."""
    batch_size: int = Field(default=256, ge=1)
    """GLOBAL batch size (rows); every rank takes its 1/size share of each batch."""
    ema_epochs: float = Field(default=5.0, ge=0)
    """Time constant (epochs) of an exponential moving average of the epoch-end weights; the
    AVERAGED weights are validated, early-stopped and kept. 0: the raw weights."""
    epochs: int = Field(default=300, ge=1)
    """Maximum number of epochs per fold model."""
    patience_epochs: int = Field(default=50, ge=1)
    """Early stopping: stop after this many epochs without a better validation loss; the best
    weights are kept."""
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    """Fraction of each fold's training FRAMES held out for early stopping."""

    # ---- cross validation and the ensemble ---------------------------------------------------
    folds: int = Field(default=5, ge=2)
    """k of k-fold cross validation, split BY FRAME; the k fold models form the ensemble."""
    members_per_fold: int = Field(default=1, ge=1)
    """Networks trained per fold (other seeds, same split); a fold predicts their mean. The
    cross-validation then measures an ensemble of this many networks; every network joins
    the inference ensemble."""
    ensemble_folds: int | None = Field(default=None, ge=1)
    """Train only the first n folds (a smaller shipped model); null: all `folds`."""
    weights_dtype: Literal["float32", "float16"] = "float32"
    """Precision of the weights written to the store (float16 halves the file; inference
    computes in float32 either way)."""
    parity_png: bool = True
    """Write a parity plot PNG of the out-of-fold predictions next to the store."""

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        problems = []
        if self.centre not in self.species:
            problems.append(("centre", f"must be one of species {self.species} (got "
                                       f"{self.centre!r})"))
        repeated = duplicates(self.species)
        if repeated:
            problems.append(("species", f"every element once (got {repeated} twice)"))
        if self.ensemble_folds is not None and self.ensemble_folds > self.folds:
            problems.append(("ensemble_folds", f"must be <= folds (got {self.ensemble_folds} > "
                                               f"{self.folds})"))
        if problems:
            raise SpecError(*problems)
        return self
