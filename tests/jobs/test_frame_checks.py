"""Frame checks: exact minimum-image close pairs in triclinic cells, the messages that name the
frame and the atoms, non-finite and singular cells, species, and no false alarm on real frames."""
from __future__ import annotations

import itertools

import ase.io
import numpy as np
import pytest

from engine.failure import InputError
from jobs.frame_checks import check_frames, check_species, close_pairs, frame_problem
from jobs.structures import p2_cell


def _brute_force_pairs(positions_a, cell_a, cutoff_a):
    """Every pair closer than the cutoff over the 7^3 nearest images of wrapped positions."""
    scaled = positions_a @ np.linalg.inv(cell_a)
    wrapped = (scaled - np.floor(scaled)) @ cell_a
    shifts = np.array(list(itertools.product(range(-3, 4), repeat=3))) @ cell_a
    pairs = {}
    for i, j in itertools.combinations(range(len(wrapped)), 2):
        distance = np.linalg.norm(wrapped[j] - wrapped[i] + shifts, axis=1).min()
        if distance < cutoff_a:
            pairs[(i, j)] = distance
    return pairs


def test_close_pairs_equal_brute_force_in_skewed_triclinic_cells():
    rng = np.random.default_rng(11)
    compared = found = 0
    while compared < 60:
        cell = rng.normal(0, 1.2, (3, 3)) + np.eye(3) * rng.uniform(2.0, 4.0)
        if abs(np.linalg.det(cell)) < 1.0:
            continue
        widths = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)
        cutoff = min(1.0, 0.49 * widths.min())
        positions = rng.uniform(-2, 3, (20, 3)) @ cell  # unwrapped, several cells away
        i, j, distance = close_pairs(positions, cell, cutoff)
        expected = _brute_force_pairs(positions, cell, cutoff)
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(expected)
        for a, b, d in zip(i, j, distance):
            assert d == pytest.approx(expected[(a, b)], abs=1e-9)
        assert np.all(np.diff(distance) >= 0)  # closest first
        compared += 1
        found += len(expected)
    assert found > 50  # the comparison saw many close pairs, not only empty sets


def test_a_pair_close_only_across_the_boundary_of_a_triclinic_cell():
    cell = np.array([[6.0, 0.0, 0.0], [3.0, 5.2, 0.0], [1.5, 1.0, 6.0]])
    inside = np.array([0.02, 0.01, 0.5]) @ cell  # near the corner of a and b
    step = np.array([-0.2, -0.15, 0.1])  # 0.269 A, across the a and b faces
    across = inside + step
    scaled = across @ np.linalg.inv(cell)
    across = (scaled - np.floor(scaled)) @ cell  # wrapped: the far side of the cell
    far = np.array([0.5, 0.5, 0.5]) @ cell
    positions = np.stack([inside, far, across])
    assert np.linalg.norm(positions[2] - positions[0]) > 5.0  # far apart in plain Cartesian
    i, j, distance = close_pairs(positions, cell, 0.5)
    assert i.tolist() == [0] and j.tolist() == [2]
    assert distance[0] == pytest.approx(np.linalg.norm(step), abs=1e-12)
    with pytest.raises(InputError, match=r"^x\.extxyz: frame 3: atoms 0 \(Na\) and 2 \(O\) are "
                                         r"0\.27 A apart \(< checks\.min_distance_a = 0\.5 A\)$"):
        check_frames(positions, cell, np.array([11, 12, 8]), "x.extxyz", 3)
    # the threshold is the manifest's: below 0.269 A the frame passes
    check_frames(positions, cell, np.array([11, 12, 8]), "x.extxyz", 3, min_distance_a=0.25)


@pytest.fixture(scope="module")
def real_frames(shared_data):
    return ase.io.read(shared_data / "p63mcm-dev.extxyz", ":10")


def test_nan_coordinate_names_frame_and_atom(real_frames):
    positions = np.stack([f.positions for f in real_frames])
    cells = np.stack([f.cell.array for f in real_frames])
    numbers = real_frames[0].numbers
    check_frames(positions, cells, numbers, "t.extxyz")  # real frames pass
    positions[7, 12, 1] = np.nan
    positions[7, 30, 0] = np.inf
    with pytest.raises(InputError, match=r"^infer: t\.extxyz: frame 7: non-finite coordinate "
                                         r"\(atom 12 \(Na\): \[.*, nan, .*\], 1 more atoms\)$"):
        check_frames(positions, cells, numbers, "infer: t.extxyz")
    # frame indices of a strided or offset read are those of the source
    with pytest.raises(InputError, match=r": frame 24: non-finite"):
        check_frames(positions, cells, numbers, "g", np.arange(10, 30, 2))
    with pytest.raises(InputError, match=r": frame 107: non-finite"):
        check_frames(positions, cells, numbers, "g", 100)


def test_close_atoms_name_frame_atoms_and_distance(real_frames):
    positions = np.stack([f.positions for f in real_frames])
    cells = np.stack([f.cell.array for f in real_frames])
    numbers = real_frames[0].numbers
    direction = positions[5, 40] - positions[5, 3]
    positions[5, 40] = positions[5, 3] + 0.1 * direction / np.linalg.norm(direction)
    with pytest.raises(InputError, match=r"^f: frame 5: atoms 3 \(Na\) and 40 \(O\) are 0\.10 A "
                                         r"apart \(< checks\.min_distance_a = 0\.5 A\)$"):
        check_frames(positions, cells, numbers, "f")


def test_bad_cells_and_frames_without_a_cell():
    positions = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert frame_problem(positions, np.zeros((3, 3))) is None  # no cell: no images
    assert "0.30 A apart" in frame_problem(positions * 0.3, np.zeros((3, 3)))
    cell = np.eye(3) * 5.0
    assert frame_problem(positions, cell) is None
    cell[1, 2] = np.nan
    assert frame_problem(positions, cell) == "non-finite cell (vector 1: [0.0, 5.0, nan])"
    flat = np.diag([5.0, 5.0, 0.0])
    assert frame_problem(positions, flat).startswith("singular cell (volume 0")
    assert "only 0.8 A wide" in frame_problem(positions * 0.1, np.eye(3) * 0.8)
    # 0.6 A apart across the boundary of a 4 A cube, but 3.4 A directly
    assert frame_problem(np.array([[0.3, 1, 1], [3.7, 1, 1]]), np.eye(3) * 4.0,
                         min_distance_a=0.7) == ("atoms 0 and 1 are 0.60 A apart "
                                                 "(< checks.min_distance_a = 0.7 A)")


def test_no_false_alarm_on_the_shared_dft_frames(shared_data):
    # 800 real 300 K frames: the closest pair (an Mn-O bond) is far above the threshold
    closest = np.inf
    for name in ("p63mcm-dev.extxyz", "p6322-dev.extxyz"):
        frames = ase.io.read(shared_data / name, ":")
        positions = np.stack([f.positions for f in frames])
        cells = np.stack([f.cell.array for f in frames])
        check_frames(positions, cells, frames[0].numbers, name)
        for k in range(0, len(frames), 50):
            _, _, distance = close_pairs(positions[k], cells[k], 2.2)
            closest = min(closest, distance.min())
    assert 1.6 < closest < 2.0


def test_large_supercell_matches_its_unit_cell():
    # a 2x2x3 supercell (1,056 atoms) of a frame with one close pair: one pair per image
    atoms = p2_cell()
    direction = atoms.positions[40] - atoms.positions[3]
    atoms.positions[40] = atoms.positions[3] + 0.2 * direction / np.linalg.norm(direction)
    big = atoms.repeat((2, 2, 3))
    i, j, distance = close_pairs(big.positions, big.cell.array, 0.5)
    assert len(i) == 12 and np.allclose(distance, 0.2)
    assert set((i % 88).tolist()) == {3} and set((j % 88).tolist()) == {40}


def test_species_unknown_to_a_model():
    check_species(np.array([11, 8, 8]), ["Na", "Mg", "Mn", "O"], "w", "the DP model")
    with pytest.raises(InputError, match=r"^md: system 'x': species \['Li'\] unknown to the DP "
                                         r"model \(it knows \['Mg', 'Mn', 'Na', 'O'\]\)$"):
        check_species(np.array([3, 11, 8]), ["Na", "Mg", "Mn", "O"], "md: system 'x'",
                      "the DP model")


def test_train_refuses_a_species_outside_train_species(shared_data, tmp_path):
    from mpi4py import MPI

    from jobs.frames import read_labelled_frames

    from engine.context import RankContext
    from engine.store import RunStore
    from jobs.stages.train import train_ensemble
    from schemas.shift import ShiftSpec
    from schemas.train import TrainSpec

    frames = [f.copy() for f in read_labelled_frames(shared_data / "p63mcm-dev.extxyz")[:4]]
    frames[2].numbers[20] = 3  # a Li in place of a Mg
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "s.h5", ctx) as store, pytest.raises(
            InputError, match=r"^train: \S+p63mcm-dev\.extxyz: frame 2: species \['Li'\] not "
                              r"among the SOAP species"):
        train_ensemble(TrainSpec(), ShiftSpec(), 1, ctx, store, frames=frames)
