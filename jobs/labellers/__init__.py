"""Labellers: a small interface for computing the DFT labels of one frame, one module a backend.

A labeller takes a frame (an :class:`ase.Atoms`) and a work directory, and returns the frame
labelled in the same form as :func:`jobs.frames.read_outcar`: energy (eV) and forces (eV/A) in a
SinglePointCalculator, ``arrays["fermi_contact_mhz"]`` (A_iso per atom, MHz) and
``info["magnetic_moment_s"]``, with atoms in the order they were given. A failed attempt is a
:class:`LabelError` with a short reason code; the label stage retries it, and records it.

Backends: ``vasp`` (:mod:`jobs.labellers.vasp`), ``gpaw`` (:mod:`jobs.labellers.gpaw`), and
``model`` (:mod:`jobs.labellers.model`: models, not DFT; an oracle for tests and distillation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from ase import Atoms

REASONS = ("exit", "timeout", "launch", "no_outcar", "truncated", "unconverged", "bad_outcar",
           "atom_count", "wrong_frame", "no_result", "bad_result")
"""Reason codes of failed attempts (`exit` carries the exit status: ``exit_1``)."""


class LabelError(Exception):
    """A failed labelling attempt: `reason` is a short code of REASONS, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@runtime_checkable
class Labeller(Protocol):
    """What the label stage needs of a backend."""

    name: str
    """Short name (the manifest's `label.labeller`)."""

    def check(self, species: list[str]) -> None:
        """Raise engine.failure.InputError if frames of `species` cannot be labelled (a missing
        POTCAR, ...); called on every rank before any job is launched."""

    def label(self, atoms: Atoms, work_dir: Path, title: str) -> Atoms:
        """Label `atoms` in `work_dir` (created if missing); raise LabelError on failure."""

    def recover(self, atoms: Atoms, work_dir: Path) -> Atoms | None:
        """The labelled frame if `work_dir` already holds a complete, valid result for `atoms`
        (a job that finished after its rank was killed); None otherwise."""


def make_labeller(spec, gyromagnetic_factor: float, cores: int = 1, rank: int = 0,
                  shift_spec=None) -> Labeller:
    """The labeller that a LabelSpec configures.

    Parameters
    ----------
    spec
        The manifest's `label` section (schemas.label.LabelSpec).
    gyromagnetic_factor
        The shift conversion's gyromagnetic convention (the NGYROMAG default).
    cores, rank
        This rank's cores and rank (replace `{cores}` and `{rank}` in a launch command).
    shift_spec
        The A_iso -> shift conversion (schemas.shift.ShiftSpec): the `model` labeller turns a
        shift model's prediction back into A_iso with it.

    Returns
    -------
    Labeller
    """
    if spec.labeller == "vasp":
        from jobs.labellers.vasp import VaspLabeller

        return VaspLabeller.from_spec(spec.vasp, gyromagnetic_factor, cores, rank)
    if spec.labeller == "gpaw":
        from jobs.labellers.gpaw import GpawLabeller

        return GpawLabeller.from_spec(spec.gpaw, gyromagnetic_factor, cores, rank)
    if spec.labeller == "model":
        from jobs.labellers.model import ModelLabeller
        from schemas.shift import ShiftSpec

        return ModelLabeller.from_spec(spec.model, shift_spec or ShiftSpec())
    raise ValueError(f"unknown labeller {spec.labeller!r}")
