"""Quiet, honest output: what deepmd-kit is handed, and what a DP process prints."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jobs.deepmd import DEEPMD_FACE_MARGIN, deepmd_cell_fraction, deepmd_positions
from jobs.structures import build_structure
from schemas.system import SystemSpec

ROOT = Path(__file__).resolve().parents[2]
STACKINGS = ["p63mcm", "p6322"]


def _ideal(stacking: str):
    return build_structure(SystemSpec(name="x", structure=f"builtin:p2-nmmo-{stacking}"))


def _plain_wrap(positions, cell):  # what dp_calculator handed deepmd-kit before
    scaled = np.linalg.solve(cell.T, positions.T).T % 1.0
    scaled[scaled >= 1.0] = 0.0
    return scaled @ cell


def _inside(fraction) -> bool:
    return bool(np.all((fraction >= 0.0) & (fraction <= 1.0 - DEEPMD_FACE_MARGIN)))


@pytest.mark.parametrize("stacking", STACKINGS)
def test_deepmd_bins_every_atom_of_an_ideal_cell_inside_it(stacking):
    atoms = _ideal(stacking)
    cell = atoms.cell.array
    plain = _plain_wrap(atoms.positions, cell)
    # the cause of "loc idx out of upper bound": atoms at a fractional 0 come back as 1.0
    # (how many depends on the BLAS kernel that wrapped them: 5-6 here, 2-3 without
    # OPENBLAS_CORETYPE; deepmd_positions checks its own result, so it holds for any)
    on_face = (deepmd_cell_fraction(plain, cell) >= 1.0).any(axis=1)
    assert on_face.sum() >= 1
    coords = deepmd_positions(atoms.positions, cell)
    assert _inside(deepmd_cell_fraction(coords, cell))
    moved = np.abs(coords - plain).max(axis=1) > 0
    fraction = deepmd_cell_fraction(plain, cell)
    near_face = ((fraction < 0.0) | (fraction > 1.0 - DEEPMD_FACE_MARGIN)).any(axis=1)
    assert np.array_equal(moved, near_face) and not (on_face & ~moved).any()  # only those
    assert np.abs(coords - plain).max() < 1e-10  # ~2e-11 A
    np.testing.assert_array_equal(coords[~moved], plain[~moved])  # the rest untouched


def test_deepmd_positions_of_unwrapped_and_boundary_coordinates():
    cell = np.array([[10.019, 0.0, 0.0], [-5.0095, 8.6767, 0.0], [0.3, -0.2, 11.218]])
    scaled = np.array([[0.0, 0.0, 0.0], [-1e-17, 0.5, 0.25], [1.0 - 1e-17, 0.3, 1.0],
                       [0.999999999999, 1e-13, -3.0], [2.5, -1.25, 7.0 + 1e-16],
                       [0.1, 0.2, 0.3]])
    positions = scaled @ cell
    coords = deepmd_positions(positions, cell)
    assert _inside(deepmd_cell_fraction(coords, cell))
    # the same atoms: the wrapped positions differ from the given ones by lattice vectors
    shift = np.linalg.solve(cell.T, (positions - coords).T).T
    np.testing.assert_allclose(shift, np.round(shift), atol=1e-11)


def test_the_replica_of_deepmds_arithmetic_is_exact_where_it_matters():
    # away from faces deepmd-kit's wrap is the identity to rounding: the replica must agree
    # with numpy's own fractional coordinates to a few ulp (a transposed cell would not)
    rng = np.random.default_rng(5)
    cell = np.array([[10.019, 0.0, 0.0], [-5.0095, 8.6767, 0.0], [0.3, -0.2, 11.218]])
    scaled = rng.uniform(0.01, 0.99, (200, 3))
    np.testing.assert_allclose(deepmd_cell_fraction(scaled @ cell, cell), scaled, atol=1e-14)


CHILD = textwrap.dedent('''
    import sys
    import numpy as np
    from engine.context import limit_threads
    limit_threads(1)  # as every rank does
    from jobs.stages.md import dp_calculator
    from jobs.structures import build_structure
    from schemas.system import SystemSpec
    atoms = build_structure(SystemSpec(name="x", structure="builtin:p2-nmmo-p63mcm"))
    atoms.calc = dp_calculator(sys.argv[1])
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    sys.stderr.flush()
    print("=== plain", file=sys.stderr, flush=True)
    cell = atoms.cell.array
    scaled = np.linalg.solve(cell.T, atoms.positions.T).T % 1.0
    scaled[scaled >= 1.0] = 0.0
    types = [atoms.calc.type_dict[s] for s in atoms.get_chemical_symbols()]
    e, f, _ = atoms.calc.dp.eval((scaled @ cell).reshape(1, -1), cell.reshape(1, -1), types)[:3]
    print(f"{abs(float(e.ravel()[0]) - energy):.3e} {np.abs(f[0] - forces).max():.3e}")
''')


def test_a_dp_process_prints_nothing_but_real_warnings():
    """A fresh process (deepmd-kit warns 10 times per process at most) with none of the
    quieting variables set: loading TensorFlow and deepmd-kit and evaluating an idealised cell
    prints nothing; the old wrapping (positive control) makes deepmd-kit warn, and gives the
    same energy and forces."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "DP_INFER_BATCH_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "jobs/data/dp-p2-nmmo.pb")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, marker, after = done.stderr.partition("=== plain\n")
    assert marker, done.stderr[-3000:]
    assert before == "", before  # no libcudart / absl / oneDNN / batch-size / loc idx lines
    assert "loc idx out of upper bound" in after  # the capture sees deepmd-kit's warnings
    assert "libcudart" not in after and "implib-gen" not in after  # none at exit either
    energy_diff, force_diff = map(float, done.stdout.split())
    # the same physics: the model computes in float32 (measured: 4.8e-7 eV of -899 eV)
    assert energy_diff < 1e-5 and force_diff < 1e-4, (energy_diff, force_diff)  # eV, eV/A
