"""Sanity checks of the frames a run reads or makes (trajectory files, labels, md frames)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import InputPath, Spec


class ChecksSpec(Spec):
    """Checks of the frames a run reads or makes (trajectory files, labelled frames, md frames)."""

    min_distance_a: float = Field(default=0.5, gt=0)
    """Two atoms closer than this (A, minimum image) in any frame are refused (exit 2, the file
    or store group and the frame index named); md stops a replica whose atoms come this close
    (an exploded structure)."""
    md_max_temperature_factor: float = Field(default=5.0, gt=1)
    """An md replica whose instantaneous temperature exceeds this multiple of md.temperature_k
    has exploded: the stage stops with a message naming the replica, keeping the frames it
    saved."""
    broken_labels: Literal["warn", "drop", "fail"] = "drop"
    """What the screen of labelled frames (jobs/label_screen.py; potential, train and learn,
    before training) does with a flagged frame: `warn` keeps it, `drop` trains without it
    (named in the log, the stage's record and `dynshift show`), `fail` stops with exit 2
    naming every flagged frame."""
    label_energy_z: float = Field(default=6.0, gt=0)
    """A label whose energy per atom (or its residual from `label_reference_model`) has a
    robust z-score (median / 1.4826 MAD over its composition's frames) beyond this is
    flagged (with `label_energy_floor_mev_per_atom`). Good P2-NMMO frames reach |z| 3.5."""
    label_energy_floor_mev_per_atom: float = Field(default=2.0, ge=0)
    """An energy deviation below this (meV/atom) is never flagged, however tight the rest."""
    label_reference_model: InputPath | None = None
    """A frozen DP model for the energy screen: the labels' residuals from its prediction are
    tested (sharper than the raw distribution, and valid for frames of several temperatures).
    Default: none (learn uses none either; its frames are then screened without energies)."""
    label_max_force_ev_a: float = Field(default=50.0, gt=0)
    """A label with a force on any atom above this (eV/A) is flagged (beyond physics for a
    sampled structure)."""
    label_total_moment: float | None = None
    """The total magnetic moment every label must have (mu_B); default: the labeller's fixed
    one (label.vasp.nupdown, label.gpaw.fixed_magmom), else no moment test."""
    label_moment_tolerance: float = Field(default=0.5, gt=0)
    """A label whose total moment is further than this (mu_B) from the target is flagged
    (another spin state)."""
