"""The potential stage: a deepmd-kit (TF backend) DP model for the md stage.

Either an existing frozen model (`potential.model`, default: the shipped P2-NMMO model) is put
into the store, or a model is trained on labelled frames: held-out frames are chosen per file,
the rest is written as deepmd/npy systems, then ``dp train``, ``dp freeze`` and (when it is
faster) ``dp compress`` run as subprocesses on rank 0, and the energy / force RMSE on the
held-out frames is recorded. The frozen model's bytes go to ``/potential/model.pb``: the md
stage and a resumed run load it from there. Layout: docs/md.md.

:func:`train_dp` is the training itself on frames given as lists of ase.Atoms (one list per
deepmd system), for any stage that trains DP models on frames of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.context import RankContext
from engine.failure import InputError
from engine.stages import StageInputs, StageResult
from engine.store import RunStore
from jobs.dptrain import train_model
from jobs.frame_checks import MIN_DISTANCE_A
from jobs.label_screen import screen_for_training
from jobs.layouts.potential import put_model
from schemas.potential import SHIPPED_MODEL, PotentialSpec

# ---- data ------------------------------------------------------------------------------------






# ---- running deepmd-kit ------------------------------------------------------------------------












# ---- training -----------------------------------------------------------------------------




# ---- the verb ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PotentialResult(StageResult):
    """The model the run uses: trained here or not, its size, and its hold-out errors."""

    trained: bool
    model_mb: float
    metrics: tuple = ()
    """(name, value) pairs: hold-out RMSEs, timings, sizes of the training report."""

    def summary(self) -> dict:
        """trained, model_mb and every metric by name."""
        return {"trained": self.trained, "model_mb": self.model_mb, **dict(self.metrics)}


def fit_potential(spec: PotentialSpec, ctx: RankContext, store: RunStore,
                  seed: int = 2022, min_distance_a: float = MIN_DISTANCE_A, checks=None,
                  label_spec=None) -> "PotentialResult":
    """Put a DP model into the store: the given / shipped one, or one trained on `spec.frames`.

    Training runs on rank 0 (deepmd-kit as a subprocess); the other ranks wait. The model bytes
    land in ``/potential/model.pb`` with the hold-out RMSE in its attributes. A labelled frame
    with a non-finite position or cell, or two atoms closer than `min_distance_a` (A), is
    refused (InputError naming the file and frame). The frames pass the label screen
    (jobs/label_screen.py: `checks`, the target moment of `label_spec`'s labeller) first.
    """
    report: dict = {}
    screened: dict = {}
    if not spec.frames:
        path = Path(spec.model) if spec.model is not None else SHIPPED_MODEL
        if not path.is_file():
            raise InputError(f"potential.model: {path} not found")
        blob = path.read_bytes()
        report = {"source": str(path), "trained": False}
    else:
        from jobs.frames import read_labelled_frames

        # every rank reads: ASE's reader is collective over its own MPI world (rank 0 reads
        # and broadcasts), so a read on rank 0 alone would wait for the others forever
        frames_per_file = [read_labelled_frames(path, min_distance_a) for path in spec.frames]
        frames_per_file, screen = screen_for_training(frames_per_file, checks, label_spec,
                                                      "potential", ctx)
        screened = screen.summary()
        def train() -> tuple[bytes, dict]:
            chosen, report = train_model(spec, frames_per_file,
                                         Path(str(store.path) + ".potential"), seed,
                                         spec.train_threads or ctx.cores, ctx.log)
            return chosen.read_bytes(), report

        blob, report = ctx.on_root(train)  # one dp train, on rank 0
        report = {"trained": True, **report}
    with store.transaction():
        put_model(store, blob, spec.type_map, **report)
    store.flush()
    numbers = {k: v for k, v in report.items() if isinstance(v, (int, float, bool))}
    numbers.pop("trained", None)
    return PotentialResult(trained=bool(report.get("trained")), model_mb=len(blob) / 2**20,
                           metrics=tuple(sorted({**numbers, **screened}.items())))




def run(spec: PotentialSpec, inputs: StageInputs) -> PotentialResult:
    """Stage entry: the DP model of the run into ``/potential`` (spec: PotentialSpec)."""
    min_distance_a = inputs.checks.min_distance_a if inputs.checks else MIN_DISTANCE_A
    return fit_potential(spec, inputs.ctx, inputs.store, inputs.seeds.seed, min_distance_a,
                         inputs.checks, inputs.label)
