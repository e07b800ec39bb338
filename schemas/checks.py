"""Sanity checks of the frames a run reads or makes (trajectory files, labels, md frames)."""
from __future__ import annotations

from pydantic import Field

from schemas.base import Spec


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
