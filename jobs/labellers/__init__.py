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

from jobs.labellers.base import (REASONS, LabelError, Labeller, LaunchProfile, TemplateLabeller,
                                 tail)

__all__ = ["REASONS", "LabelError", "Labeller", "LaunchProfile", "TemplateLabeller", "tail",
           "make_labeller"]


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
