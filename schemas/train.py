"""The train stage: SOAP descriptors + the NN-NMR shift model, k-fold, Horovod data-parallel."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Element, InputPath, Spec, SpecError, Width, duplicates


class GprSpec(Spec):
    """The sparse Gaussian-process shift model (``train.model: gpr``; docs/gpr.md).

    Every list is a grid searched by frame-level k-fold cross validation inside the stage
    (``train.folds``); the combination with the best held-out score (``select_by``) is fitted on
    all frames and recorded with the whole CV curve under ``/train/gpr``.
    """

    zeta: list[int] = Field(default=[1, 3], min_length=1)
    """Exponents tried of the polynomial kernel k(x, y) = (x . y)^zeta of L2-normalised SOAP
    rows (each >= 1). zeta 1 (the linear kernel) is computed exactly in weight space over all
    training rows (a Bayesian linear regression on the SOAP features: no sparse points, the
    mean costs n_features per nucleus); zeta >= 2 by the sparse form with `n_sparse` points.
    P2-NMMO, 5-fold CV at r_cut 8.5 A: zeta 1 49.3 ppm, 3 52.7 (M 3000), 6 59.3 (M 2000)
    (docs/gpr.md)."""
    regularisation: list[float] = Field(default=[1e-8, 1e-7, 1e-6], min_length=1)
    """Noise-to-signal variance ratios tried (sigma_n^2 / sigma_f^2, > 0, in kernel units):
    the ridge lambda of the normal equations. P2-NMMO, all 800 frames: 1e-8 best for zeta 1
    (1e-7 +0.6 ppm), 1e-7 for zeta 3; 50 frames: 1e-6."""
    n_sparse: list[int] = Field(default=[3000], min_length=1)
    """Numbers M of representative (sparse) environments tried by zeta >= 2 (capped at the
    training rows). Accuracy grows with M (P2-NMMO, 8.5 A, zeta 3: M 2000 56.9 ppm, 3000 52.7,
    4000 51.1) and so does the cost: the fit O(N M^2), prediction O(M n_features + M^2) per
    nucleus (16 Na: 5.1 ms per frame at M 1000, 17.8 at 3000; docs/gpr.md)."""
    variance_sketch_rows: int = Field(default=256, ge=8)
    """Rows k of the Gaussian sketch of the weight-space (zeta 1) model's posterior covariance:
    the variance of a shift costs k n_features per nucleus instead of n_features^2, with a
    relative error of ~sqrt(2 / k) on the variance (256: ~9 %; ~4 % on the standard deviation).
    The cross validation uses the same sketch, so the calibration includes its error."""
    sparse_selection: Literal["fps", "random"] = "fps"
    """How the M environments are chosen from the training rows: farthest-point sampling (in a
    seeded random projection of the SOAP rows, ``projection_dims``) or a seeded random subset."""
    projection_dims: int = Field(default=256, ge=8)
    """Dimensions of the random projection the farthest-point distances are measured in."""
    soap_r_cut_a: list[float] = Field(default=[], max_length=8)
    """SOAP cutoffs (A, > 1) tried by cross validation; empty: ``train.soap_r_cut_a`` alone."""
    soap_sigma_a: list[float] = Field(default=[], max_length=8)
    """SOAP Gaussian widths (A, > 0) tried; empty: ``train.soap_sigma_a`` alone."""
    select_by: Literal["nlpd", "rmse"] = "nlpd"
    """Held-out score the hyperparameters are chosen by: the negative log predictive density
    of the calibrated Gaussian (accuracy and uncertainty together) or the RMSE alone."""
    jitter: float = Field(default=1e-8, gt=0, lt=1e-2)
    """Relative diagonal added to K_MM before its Cholesky factorisation (times its mean
    diagonal); the whitened normal matrix needs none (its eigenvalues are >= lambda)."""
    block_rows: int = Field(default=2048, ge=1)
    """Rows per kernel block (bounds the memory of a block: block_rows x M float64)."""

    @model_validator(mode="after")
    def _check(self) -> "GprSpec":
        problems = []
        if any(z < 1 for z in self.zeta):
            problems.append(("zeta", f"every exponent >= 1 (got {self.zeta})"))
        if any(not r > 0 for r in self.regularisation):
            problems.append(("regularisation", f"every value > 0 (got {self.regularisation})"))
        if any(m < 1 for m in self.n_sparse):
            problems.append(("n_sparse", f"every M >= 1 (got {self.n_sparse})"))
        if any(not r > 1 for r in self.soap_r_cut_a):
            problems.append(("soap_r_cut_a", f"every cutoff > 1 A (got {self.soap_r_cut_a})"))
        if any(not s > 0 for s in self.soap_sigma_a):
            problems.append(("soap_sigma_a", f"every width > 0 A (got {self.soap_sigma_a})"))
        for name in ("zeta", "regularisation", "n_sparse", "soap_r_cut_a", "soap_sigma_a"):
            repeated = duplicates(getattr(self, name))
            if repeated:
                problems.append((name, f"every value once (got {repeated} twice)"))
        if problems:
            raise SpecError(*problems)
        return self


class TrainSpec(Spec):
    """Learn the shift of each target nucleus from its SOAP environment."""

    model: Literal["nnmr", "gpr"] = "nnmr"
    """The shift model: ``nnmr`` (the Keras network of Lin et al., Horovod) or ``gpr`` (sparse
    Gaussian-process regression on the same SOAP rows, calibrated uncertainty; ``train.gpr``)."""
    gpr: GprSpec = GprSpec()
    """Settings of the GPR model (used when ``model`` is ``gpr``)."""

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
    computes in float32 either way). GPR: the precision of the stored sparse rows and of the
    weight-space model's variance sketch; its weights stay float64."""
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
