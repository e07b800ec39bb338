"""The potential stage: a deepmd-kit model trained on labelled frames."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.base import Element, InputPath, Spec, SpecError, Width, duplicates

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "jobs" / "data" / "dp-p2-nmmo.pb"
"""The DP model shipped for P2-Na2/3(Mg1/3Mn2/3)O2 (used when nothing is trained or given)."""


class DpTrainingSpec(Spec):
    """How a deepmd-kit (TF backend) se_e2_a model is trained: the network, the loss, the
    optimiser, the steps, compression and threads (no data: see :class:`PotentialSpec`).

    The fields are the potential section's; a stage that trains DP models on frames of its own
    (:func:`jobs.dptrain.train_dp`) takes this part alone.
    """

    type_map: list[Element] = Field(default=["Na", "Mg", "Mn", "O"], min_length=1)
    """Element of each DP atom type (order fixes the model's types)."""
    rcut_a: float = Field(default=5.5, gt=0)
    """Cut-off radius of the se_e2_a descriptor (A)."""
    rcut_smooth_a: float = Field(default=0.5, ge=0)
    """Start of the smooth switch-off of the descriptor (A)."""
    sel: list[Annotated[int, Field(ge=1)]] | Literal["auto"] = "auto"
    """Maximum neighbours of each type within rcut_a, one entry per type_map entry ("auto":
    deepmd-kit counts them)."""
    embedding_neurons: list[Width] = Field(default=[16, 32, 64], min_length=1)
    """Hidden layer widths of the embedding net."""
    axis_neurons: int = Field(default=8, ge=1)
    """Size of the embedding sub-matrix (axis_neuron) of se_e2_a."""
    fitting_neurons: list[Width] = Field(default=[128, 128, 128], min_length=1)
    """Hidden layer widths of the fitting net."""
    precision: Literal["float32", "float64"] = "float32"
    """Floating-point precision of the networks (float32 evaluates faster)."""
    steps: int = Field(default=40000, ge=1)
    """Training steps (batches of one frame)."""
    start_lr: float = Field(default=1e-3, gt=0)
    """Learning rate at step 0 (exponential decay)."""
    stop_lr: float = Field(default=1e-5, gt=0)
    """Learning rate at the last step."""
    decay_steps: int = Field(default=500, ge=1)
    """Steps between learning-rate decays."""
    checkpoint_every_steps: int = Field(default=1000, ge=1)
    """Steps between deepmd-kit checkpoints (its `save_freq`): the most training a stop at the
    wall-time limit loses (training resumes from the last checkpoint; docs/learn.md)."""
    energy_prefactors: tuple[float, float] = (0.02, 2.0)
    """Energy loss prefactor at the start and at the end of training."""
    force_prefactors: tuple[float, float] = (1000.0, 1.0)
    """Force loss prefactor at the start and at the end of training."""
    compress: Literal["auto", "always", "never"] = "auto"
    """`dp compress` the frozen model: always, never, or auto (keep it only when it evaluates
    faster on the training cell)."""
    train_threads: int | None = Field(default=None, ge=1)
    """Threads for training (null: the cores of rank 0)."""

    def _problems(self) -> list[tuple[str, str]]:
        """(field, message) of every inconsistency between fields (a subclass adds its own)."""
        problems = []
        if self.rcut_smooth_a >= self.rcut_a:
            problems.append(("rcut_smooth_a", f"must be smaller than rcut_a (got "
                                              f"{self.rcut_smooth_a} >= {self.rcut_a})"))
        repeated = duplicates(self.type_map)
        if repeated:
            problems.append(("type_map", f"every element once (got {repeated} twice)"))
        if self.sel != "auto" and len(self.sel) != len(self.type_map):
            problems.append(("sel", f"one entry per type_map entry ({len(self.type_map)}) "
                                    f"(got {len(self.sel)}: {self.sel})"))
        if self.stop_lr > self.start_lr:
            problems.append(("stop_lr", f"must be <= start_lr (got {self.stop_lr} > "
                                        f"{self.start_lr})"))
        for name in ("energy_prefactors", "force_prefactors"):
            if min(getattr(self, name)) < 0:
                problems.append((name, f"loss prefactors must be >= 0 (got "
                                       f"{list(getattr(self, name))})"))
        if self.energy_prefactors == (0, 0) and self.force_prefactors == (0, 0):
            problems.append(("force_prefactors", "energy and force prefactors are all 0: "
                                                 "nothing to fit"))
        return problems

    @model_validator(mode="after")
    def _check(self) -> "DpTrainingSpec":
        problems = self._problems()
        if problems:
            raise SpecError(*problems)
        return self


class PotentialSpec(DpTrainingSpec):
    """Train, freeze and (optionally) compress a DP model, or use an existing one.

    With `frames` empty, no training happens: the stage stores `model` (default: the shipped
    P2-NMMO model) for the md stage.
    """

    model: InputPath | None = None
    """An existing frozen DP model (.pb); when set, no training happens. Null and no `frames`:
    the shipped P2-NMMO model (jobs/data/dp-p2-nmmo.pb)."""
    frames: list[InputPath] = []
    """Labelled frames to train on (extended XYZ with energy and forces, or VASP OUTCARs); one
    deepmd system per file (one composition per file)."""
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Fraction of the frames of each file held out from training for the RMSE report."""

    def _problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.model is not None and self.frames:
            problems.append(("model", "give either `model` (no training) or `frames` (train), "
                                      f"not both (got model {self.model} and "
                                      f"{len(self.frames)} frames files)"))
        return problems + super()._problems()
