"""The integrator: one replica's ASE NVT dynamics (Langevin or Nose-Hoover chain) with a DP
calculator, and the state it needs to resume bit for bit."""
from __future__ import annotations

import json

import numpy as np

from jobs.layouts.md import RNG_STATE_BYTES
from schemas.md import MdSpec


class Trajectory:
    """One replica's ASE NVT integrator with a DP calculator, and its resumable state."""

    def __init__(self, atoms, calculator, spec: MdSpec, velocity_rng: np.random.Generator,
                 thermostat_rng: np.random.Generator):
        from ase import units
        from ase.constraints import FixCom
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
        from ase.parallel import DummyMPI

        # ASE broadcasts random numbers over its own `world` (all MPI ranks) unless told
        # otherwise: each replica here is serial, so every ASE object gets a one-rank comm.
        serial = DummyMPI()

        self.spec = spec
        self.atoms = atoms.copy()
        self.atoms.calc = calculator
        self.rng = thermostat_rng
        MaxwellBoltzmannDistribution(self.atoms, temperature_K=spec.temperature_k,
                                     rng=velocity_rng, comm=serial)
        Stationary(self.atoms)
        timestep = spec.timestep_fs * units.fs
        if spec.thermostat == "langevin":
            from ase.md.langevin import Langevin

            self.atoms.set_constraint(FixCom())
            self.dynamics = Langevin(self.atoms, timestep, temperature_K=spec.temperature_k,
                                     friction=spec.friction_per_fs / units.fs, fixcm=False,
                                     rng=self.rng, comm=serial)
        else:
            from ase.md.nose_hoover_chain import NoseHooverChainNVT

            self.dynamics = NoseHooverChainNVT(self.atoms, timestep,
                                               temperature_K=spec.temperature_k,
                                               tdamp=spec.thermostat_time_fs * units.fs,
                                               comm=serial)

    def run(self, steps: int) -> None:
        """Advance `steps` MD steps (an exploding run's overflows stay silent: the frame checks
        name it, with its frame and time, instead of numpy's warnings from the thermostat)."""
        if steps > 0:
            with np.errstate(over="ignore", invalid="ignore"):
                self.dynamics.run(steps)

    # resumable state: positions, momenta (ASE units), thermostat variables / RNG state
    def thermostat_state(self) -> bytes:
        """The thermostat's state as fixed-length JSON bytes (RNG state or chain variables)."""
        if self.spec.thermostat == "langevin":
            state = self.rng.bit_generator.state
        else:
            chain = self.dynamics._thermostat
            state = {"eta": chain._eta.tolist(), "p_eta": chain._p_eta.tolist()}
        text = json.dumps(state).encode()
        if len(text) > RNG_STATE_BYTES:
            raise RuntimeError(f"thermostat state of {len(text)} bytes does not fit")
        return text.ljust(RNG_STATE_BYTES)

    def restore(self, positions_a: np.ndarray, momenta: np.ndarray, state: bytes) -> None:
        """Set positions, momenta and thermostat state saved by a previous run."""
        self.atoms.set_positions(positions_a, apply_constraint=False)
        self.atoms.set_momenta(momenta, apply_constraint=False)
        document = json.loads(bytes(state).decode().strip())
        if self.spec.thermostat == "langevin":
            self.rng.bit_generator.state = document
        else:
            chain = self.dynamics._thermostat
            chain._eta[:] = document["eta"]
            chain._p_eta[:] = document["p_eta"]
            self.dynamics._q = self.atoms.get_positions()
            self.dynamics._p = self.atoms.get_momenta()
