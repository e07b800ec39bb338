"""The probe stage: checks MPI, threads and parallel HDF5 before real work starts."""
from __future__ import annotations

from pydantic import Field

from schemas.base import Spec


class ProbeSpec(Spec):
    """Checks the machine: every rank reports host, cores and a write to the store."""

    fail_on_rank: int | None = Field(default=None, ge=0)
    """Diagnostics: raise an error on this rank (tests error agreement across ranks)."""
    others_wait_s: float = Field(default=0.0, ge=0.0)
    """Diagnostics: the other ranks sleep this long and then block in a barrier (a rank that
    fails meanwhile must still end the run)."""
