"""The md stage: NVT DPMD replicas of every system, distributed over ranks."""
from __future__ import annotations

from pydantic import Field

from schemas.base import Spec


class MdSpec(Spec):
    """Systems x replicas of NVT molecular dynamics with a deepmd-kit potential."""

    replicas: int = Field(default=1, ge=1)
    """Independent replicas (different seeds) per system."""
    temperature_k: float = Field(default=300.0, gt=0)
    """Thermostat temperature (K)."""
    timestep_fs: float = Field(default=1.0, gt=0)
    """Integration time step (fs)."""
