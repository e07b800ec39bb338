"""md's resume reaches into ASE's integrators: these tests fail when ASE changes what it uses.

jobs/stages/md.py saves and restores a Nose-Hoover chain through private attributes of ASE's
NoseHooverChainNVT (`_thermostat._eta`, `_thermostat._p_eta`, `_q`, `_p`) and the Langevin
integrator through the Generator it was given. A stop-and-restore must continue the
trajectory bit for bit, with the ASE that is installed.
"""
from __future__ import annotations

import ase
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

from engine.seeds import SeedStreams
from jobs.dynamics import Trajectory
from schemas.md import MdSpec


class Einstein(Calculator):
    """A stateless anharmonic Einstein crystal: forces depend on the positions alone (as
    deepmd-kit's), so a restored run must repeat the straight one to the last bit."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, reference):
        super().__init__()
        self.reference = reference.copy()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        u = self.atoms.positions - self.reference
        self.results = {"energy": float(np.sum(u ** 2 + 0.3 * u ** 4)),
                        "forces": -(2 * u + 1.2 * u ** 3)}


def _trajectory(spec: MdSpec) -> Trajectory:
    atoms = bulk("Cu", cubic=True).repeat((2, 2, 2))
    reference = atoms.positions.copy()
    atoms.rattle(0.05, seed=1)
    seeds = SeedStreams(11)
    return Trajectory(atoms, Einstein(reference), spec, seeds.rng("md.velocities", 0, 0),
                      seeds.rng("md.thermostat", 0, 0))


@pytest.mark.parametrize("thermostat", ["nose-hoover-chain", "langevin"])
def test_stop_and_restore_continues_bit_for_bit(thermostat):
    spec = MdSpec(thermostat=thermostat, temperature_k=500.0, timestep_fs=2.0,
                  thermostat_time_fs=20.0, friction_per_fs=0.05)
    straight = _trajectory(spec)
    straight.run(15)
    saved = (straight.atoms.get_positions(), straight.atoms.get_momenta(),
             straight.thermostat_state())
    straight.run(15)

    resumed = _trajectory(spec)
    resumed.restore(*saved)
    resumed.run(15)
    assert np.array_equal(resumed.atoms.get_positions(), straight.atoms.get_positions()), \
        f"ASE {ase.__version__}: the restored {thermostat} run left the trajectory"
    assert np.array_equal(resumed.atoms.get_momenta(), straight.atoms.get_momenta())


def test_the_private_chain_attributes_md_uses_exist():
    spec = MdSpec(thermostat="nose-hoover-chain")
    dynamics = _trajectory(spec).dynamics
    chain = getattr(dynamics, "_thermostat", None)
    assert chain is not None, f"ASE {ase.__version__}: NoseHooverChainNVT has no _thermostat"
    for name in ("_eta", "_p_eta"):
        value = getattr(chain, name, None)
        assert isinstance(value, np.ndarray) and value.ndim == 1, \
            f"ASE {ase.__version__}: the chain's {name} changed"
    for name in ("_q", "_p"):
        assert getattr(dynamics, name).shape == (32, 3), f"ASE {ase.__version__}: {name}"
