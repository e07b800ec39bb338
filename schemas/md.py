"""The md stage: NVT DPMD replicas of every system, distributed over ranks."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from schemas.base import InputPath, Spec, SpecError


class MdSpec(Spec):
    """Systems x replicas of NVT molecular dynamics with a deepmd-kit potential."""

    replicas: int = Field(default=1, ge=1)
    """Independent replicas (different seeds) per system."""
    temperature_k: float = Field(default=300.0, gt=0)
    """Thermostat temperature (K) of every system without its own `temperature_k`."""
    temperatures_k: list[Annotated[float, Field(gt=0)]] = []
    """Run every system (without its own `temperature_k`) at each of these temperatures (K):
    system `p6322` becomes `p6322-300K`, `p6322-600K`, ... (base `p6322`), each with
    `md.replicas` replicas, run as systems x temperatures x replicas over the ranks; label,
    infer and analyze treat each as a system (name them so in `infer.trajectories` and
    `spectrum.experiment.systems`), and analyze fits the Arrhenius law of D and the hop rate
    over the temperatures of each base. Empty: `temperature_k` only."""
    timestep_fs: float = Field(default=1.0, gt=0)
    """Integration time step (fs)."""
    thermostat: Literal["langevin", "nose-hoover-chain"] = "nose-hoover-chain"
    """NVT thermostat: a Nose-Hoover chain (ASE `NoseHooverChainNVT`, deterministic; the
    default: it leaves hop rates, residence times and D intact) or Langevin (ASE `Langevin`,
    stochastic; at the default friction, a 100 fs damping time, it slows the dynamics that
    analyze reports)."""
    friction_per_fs: float = Field(default=0.01, gt=0)
    """Langevin friction coefficient (1/fs); 0.001 or less for runs meant for dynamics."""
    thermostat_time_fs: float = Field(default=100.0, gt=0)
    """Nose-Hoover chain damping time (fs)."""
    equilibration_steps: int = Field(default=1000, ge=0)
    """Steps run (not saved) before the first saved frame."""
    frames: int = Field(default=1000, ge=1)
    """Frames saved per replica (the first is saved one save interval after equilibration)."""
    save_every_steps: int = Field(default=10, ge=1)
    """Steps between saved frames (save interval = save_every_steps * timestep_fs)."""
    chunk_frames: int = Field(default=100, ge=1)
    """Frames written to the store at a time (a killed run loses at most one chunk)."""
    stop_after_frames: int | None = Field(default=None, ge=1)
    """Diagnostics: stop the stage with an error once every replica saved at least this many
    frames (tests resume; a following run continues the trajectories); < frames."""
    deviation_models: list[InputPath] = []
    """Frozen DP models (.pb) that, with the model that propagates md, form an ensemble: with
    at least 1 here, md records the model deviation of every saved frame (DP-GEN's
    ``max_devi_f``: the largest over atoms of the spread of the models' forces, eV/A) and
    analyze reports the fraction of frames above `trust_hi_ev_a`. Empty: no deviation."""
    trust_lo_ev_a: float = Field(default=0.05, gt=0)
    """Lower trust level of the force deviation (eV/A), DP-GEN's ``model_devi_f_trust_lo``:
    frames below it are ones the potential describes well (DP-GEN's common 0.05)."""
    trust_hi_ev_a: float = Field(default=0.15, gt=0)
    """Upper trust level of the force deviation (eV/A), DP-GEN's ``model_devi_f_trust_hi``:
    frames above it are ones where the potential extrapolates (DP-GEN's common 0.15); the
    report warns when more than 1 % of a system's frames are above it."""

    @model_validator(mode="after")
    def _check(self) -> "MdSpec":
        problems = []
        if self.stop_after_frames is not None and self.stop_after_frames >= self.frames:
            problems.append(("stop_after_frames", f"must be < frames, or it never stops (got "
                                                  f"{self.stop_after_frames} >= {self.frames})"))
        if self.trust_lo_ev_a >= self.trust_hi_ev_a:
            problems.append(("trust_lo_ev_a", f"must be smaller than trust_hi_ev_a (got "
                                              f"{self.trust_lo_ev_a} >= {self.trust_hi_ev_a})"))
        if problems:
            raise SpecError(*problems)
        return self
