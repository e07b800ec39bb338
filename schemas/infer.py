"""The infer stage: shifts of every target nucleus in every dense frame."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from schemas.base import InputPath, Spec

SHIPPED_SHIFT_MODEL = Path(__file__).resolve().parents[1] / "jobs" / "data" / "gpr-p2-nmmo.h5"
"""The default shift model shipped with dynshift: the GPR model of P2-NMMO (weight-space form,
SOAP 8.5 A; 5-fold CV on the 800 shared frames 49.3 ppm, R2 0.994; docs/gpr.md)."""
SHIPPED_NNMR = Path(__file__).resolve().parents[1] / "jobs" / "data" / "nnmr-p2-nmmo.h5"
"""The shipped NN-NMR ensemble (2 networks, SOAP 5.5 A; out-of-fold 86.0 ppm; docs/nnmr.md):
``infer.model: <repo>/jobs/data/nnmr-p2-nmmo.h5`` uses it."""


class InferSpec(Spec):
    """Predict shifts with a trained shift model (GPR or NN-NMR), sharded over ranks, streamed in
    chunks."""

    trajectories: dict[str, InputPath] = {}
    """Per system name, an ASE-readable trajectory file (extended XYZ, ASE .traj, ...) to take
    the frames from instead of the md stage's trajectories in the store (relative to the
    manifest's folder). Example: `{p63mcm: frames.extxyz}`."""
    shifts_from: Literal["model", "labels"] = "model"
    """`model`: predict with the shift model. `labels`: take the DFT shifts of a labelled
    trajectory file (per-atom `fermi_contact_mhz`, converted with the `shift` constants)
    instead: how the analysis is validated on real DFT data (every system then needs an entry
    in `trajectories`)."""
    model: InputPath | None = None
    """A store file holding a trained `/train` shift model (GPR or NN-NMR). Default: this run's
    own store when it has `/train`, else the shipped GPR model jobs/data/gpr-p2-nmmo.h5 (the
    shipped NN-NMR ensemble is jobs/data/nnmr-p2-nmmo.h5)."""
    chunk_frames: int = Field(default=256, ge=1)
    """Frames per chunk: the unit of streaming, of the store's resume bookkeeping and of one
    SOAP + predict batch (memory per rank grows with it, not with the trajectory length)."""
    stride: int = Field(default=1, ge=1)
    """Take every `stride`-th frame of each trajectory (replica)."""
    soap_kernel: Literal["auto", "numba", "dscribe"] = "auto"
    """Who computes the SOAP rows: `dscribe` (the reference), `numba` (jobs/shiftmodels/soap_numba.py: the
    same features from a compiled kernel, checked against dscribe when it is built, ~3x faster),
    or `auto` (numba when that check passes, else dscribe with a warning)."""
    skip_frames: int = Field(default=0, ge=0)
    """Frames to drop at the start of each trajectory (replica), e.g. equilibration."""
