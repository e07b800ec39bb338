"""Built-in P2 cells against the shared DFT frames, structure files and supercells."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.geometry import find_mic
from scipy.optimize import linear_sum_assignment

from engine.failure import InputError
from jobs.structures import p2_cell, build_structure
from schemas.system import SystemSpec


def tm_stacking(atoms, metal: str) -> str:
    """'p63mcm' when the M of the z ~ 1/2 layer sit over the M of the z ~ 0 layer, else 'p6322'."""
    scaled = atoms.get_scaled_positions()
    is_m = np.array(atoms.get_chemical_symbols()) == metal
    lower = atoms.positions[is_m & (np.abs(scaled[:, 2] - 0.5) > 0.25)]
    upper = atoms.positions[is_m & (np.abs(scaled[:, 2] - 0.5) <= 0.25)]
    flat = atoms.cell.array.copy()
    gaps = []
    for position in upper:
        vectors = lower - position
        vectors[:, 2] = 0.0  # xy only
        gaps.append(find_mic(vectors, flat, pbc=[True, True, False])[1].min())
    return "p63mcm" if max(gaps) < 1.0 else "p6322"


def matched_distances(built, frame, symbol: str) -> np.ndarray:
    """Distances (A) of an optimal one-to-one matching of the `symbol` atoms (minimum image)."""
    mine = [i for i, s in enumerate(built.get_chemical_symbols()) if s == symbol]
    theirs = [i for i, s in enumerate(frame.get_chemical_symbols()) if s == symbol]
    cost = np.array([find_mic(frame.positions[theirs] - built.positions[i], built.cell)[1]
                     for i in mine])
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols]


@pytest.mark.parametrize("stacking", ["p63mcm", "p6322"])
def test_builtin_nmmo_matches_the_shared_frames(shared_data, stacking):
    frame = ase.io.read(shared_data / f"{stacking}-dev.extxyz", index=0)
    built = build_structure(SystemSpec(name="x", structure=f"builtin:p2-nmmo-{stacking}"))
    assert len(built) == 88
    # composition and order of species as in the frames: 16 Na, 8 Mg, 16 Mn, 48 O
    assert built.get_chemical_symbols() == frame.get_chemical_symbols()
    assert np.allclose(built.cell.array, frame.cell.array, atol=1e-3)
    assert tm_stacking(built, "Mg") == tm_stacking(frame, "Mg") == stacking
    for symbol, mean_a, worst_a in (("Mg", 0.4, 0.5), ("Mn", 0.4, 0.5), ("O", 0.4, 0.6),
                                    ("Na", 0.45, 0.9)):
        gaps = matched_distances(built, frame, symbol)
        assert gaps.mean() < mean_a and gaps.max() < worst_a, (symbol, gaps)


@pytest.mark.parametrize("stacking", ["p63mcm", "p6322"])
def test_builtin_cells_are_physical(stacking):
    for composition, metal in (("nmmo", "Mg"), ("nnmo", "Ni")):
        atoms = p2_cell(composition, stacking)
        assert atoms.symbols.formula.count() == {"Na": 16, metal: 8, "Mn": 16, "O": 48}
        distances = atoms.get_all_distances(mic=True) + 99 * np.eye(len(atoms))
        assert distances.min() > 1.9  # TM-O bonds ~1.95 A, nothing closer
        assert distances[:16, :16].min() > 2.8  # no two Na on neighbouring prisms
        assert tm_stacking(atoms, metal) == stacking
        # Na half in each layer (z = 1/4 and 3/4)
        z = atoms.get_scaled_positions()[:16, 2]
        assert sorted(np.round(z, 2).tolist()) == [0.25] * 8 + [0.75] * 8


def test_file_structure_and_supercell(tmp_path, shared_data):
    frame = ase.io.read(shared_data / "p6322-dev.extxyz", index=3)
    ase.io.write(tmp_path / "cell.extxyz", frame)
    spec = SystemSpec(name="f", structure="cell.extxyz", supercell=(1, 2, 3))
    atoms = build_structure(spec, tmp_path)
    assert len(atoms) == 88 * 6 and atoms.calc is None
    assert np.allclose(atoms.cell.lengths(), frame.cell.lengths() * [1, 2, 3])
    assert np.allclose(atoms.positions[:88], frame.positions)


def test_bad_structures_name_the_system(tmp_path):
    with pytest.raises(InputError, match="system 'x'.*builtin:p2-nmmo-p63mcm"):
        build_structure(SystemSpec(name="x", structure="builtin:p2-lco"))
    with pytest.raises(InputError, match="system 'y'.*not found"):
        build_structure(SystemSpec(name="y", structure="missing.cif"), tmp_path)
