"""Sanity checks of frames at run time: finite coordinates and cells, no two atoms too close,
only species a model knows.

Every stage that takes frames from outside (a trajectory file, labelled DFT frames, the md
stage's store) or makes them (md) passes them through :func:`check_frames` before using them,
so that a NaN coordinate, an overlapping pair of atoms or an exploded md structure is refused
with exit status 2 and a message that names the file (or store group), the frame and the atoms,
instead of passing silently into the averages.

Minimum-image distances are exact for any triclinic cell at least twice as wide (perpendicular
width) as the threshold: the frame is wrapped into its cell, the atoms within the threshold of a
face are copied to the opposite side (with edges and corners), and scipy's ``cKDTree`` finds
every pair closer than the threshold among the atoms and their copies. Measured by
``benchmarks/bench_frame_checks.py`` (2-core VM, load ~1), the whole check per frame: 88-atom
P2-NMMO cell 0.08 ms (all-pairs numpy broadcast 0.13 ms, ``ase.neighborlist`` 3.1 ms);
1,056 atoms 0.55 ms (all pairs 27 ms, ASE 17 ms); 8,448 atoms 4-5 ms (ASE 150-400 ms). In the
infer stage (400 real frames, shipped model, 1 rank) it added 0.05 ms to 7.0 ms per frame.
Frames without a cell (all cell vectors zero) are checked without images.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.failure import InputError

MIN_DISTANCE_A = 0.5
"""Default of ``checks.min_distance_a`` (A): closer pairs are refused."""
MD_MAX_TEMPERATURE_FACTOR = 5.0
"""Default of ``checks.md_max_temperature_factor``."""


class UnstableDynamics(InputError):
    """An md replica whose structure exploded (non-finite state, atoms closer than the
    threshold, or a temperature far above the thermostat's). It exits with status 2 like bad
    input: running the same manifest again repeats the same steps, so the user must change
    something (the model, md.timestep_fs, md.temperature_k, the structure)."""


def _symbol(numbers: np.ndarray | None, atom: int) -> str:
    if numbers is None:
        return ""
    from ase.data import chemical_symbols

    z = int(numbers[atom])
    return f" ({chemical_symbols[z] if 0 <= z < len(chemical_symbols) else z})"


def close_pairs(positions_a: np.ndarray, cell_a: np.ndarray,
                min_distance_a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of atoms closer than `min_distance_a` (minimum image) in one frame.

    Parameters
    ----------
    positions_a
        (n_atoms, 3) Cartesian positions (A), wrapped or not.
    cell_a
        (3, 3) cell, rows are the cell vectors (A); all zero: no periodic images.
    min_distance_a
        The threshold (A); it must be below half the cell's smallest perpendicular width.

    Returns
    -------
    (i, j, distance_a)
        Atom indices (i < j) and their minimum-image distance (A) of every pair closer than
        the threshold, sorted by distance (empty arrays when there is none).

    Raises
    ------
    ValueError
        When the cell is singular, or narrower than twice the threshold (the minimum image of
        a pair is then not unique within it; no real structure has a 1 A wide cell).
    """
    from scipy.spatial import cKDTree

    positions = np.asarray(positions_a, dtype=float)
    cell = np.asarray(cell_a, dtype=float)
    n_atoms = len(positions)
    if not np.any(cell):
        points, owner = positions, np.arange(n_atoms)
    else:
        inverse = np.linalg.inv(cell)  # LinAlgError (a ValueError) for a singular cell
        widths_a = 1.0 / np.linalg.norm(inverse, axis=0)
        if widths_a.min() <= 2.0 * min_distance_a:
            raise ValueError(f"the cell is only {widths_a.min():.3g} A wide, not more than "
                             f"twice the minimum distance {min_distance_a:g} A")
        scaled = positions @ inverse
        scaled -= np.floor(scaled)
        owner = np.arange(n_atoms)
        for axis in range(3):  # copies near each face; copies of copies fill edges, corners
            margin = min_distance_a / widths_a[axis]
            low, high = scaled[:, axis] < margin, scaled[:, axis] >= 1.0 - margin
            above, below = scaled[low].copy(), scaled[high].copy()
            above[:, axis] += 1.0
            below[:, axis] -= 1.0
            scaled = np.concatenate([scaled, above, below])
            owner = np.concatenate([owner, owner[low], owner[high]])
        points = scaled @ cell
    found = cKDTree(points).query_pairs(min_distance_a, output_type="ndarray")
    empty = np.empty(0, dtype=int)
    if len(found) == 0:
        return empty, empty, np.empty(0)
    distance = np.linalg.norm(points[found[:, 0]] - points[found[:, 1]], axis=1)
    i, j = owner[found[:, 0]], owner[found[:, 1]]
    keep = (distance < min_distance_a) & (i != j)
    i, j, distance = np.minimum(i, j)[keep], np.maximum(i, j)[keep], distance[keep]
    order = np.lexsort((j, i, distance))
    i, j, distance = i[order], j[order], distance[order]
    _, first = np.unique(i * n_atoms + j, return_index=True)  # one image per pair: the closest
    first = np.sort(first)
    return i[first], j[first], distance[first]


def frame_problem(positions_a: np.ndarray, cell_a: np.ndarray, numbers: np.ndarray | None = None,
                  min_distance_a: float = MIN_DISTANCE_A) -> str | None:
    """What is wrong with one frame, in words (None when nothing is).

    Checks, in order: finite cell, finite coordinates, a non-singular cell (or none), and no
    pair of atoms closer than `min_distance_a` (minimum image; the closest pair is named).
    """
    positions = np.asarray(positions_a, dtype=float)
    cell = np.asarray(cell_a, dtype=float)
    if not np.all(np.isfinite(cell)):
        row = int(np.flatnonzero(~np.isfinite(cell).all(axis=1))[0])
        return f"non-finite cell (vector {row}: {cell[row].tolist()})"
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        atom = int(np.flatnonzero(bad)[0])
        more = f", {int(bad.sum()) - 1} more atoms" if bad.sum() > 1 else ""
        return (f"non-finite coordinate (atom {atom}{_symbol(numbers, atom)}: "
                f"{positions[atom].tolist()}{more})")
    if np.any(cell) and abs(np.linalg.det(cell)) < 1e-6:
        return f"singular cell (volume {np.linalg.det(cell):.3g} A^3)"
    try:
        i, j, distance = close_pairs(positions, cell, min_distance_a)
    except ValueError as exc:
        return str(exc)
    if len(i) == 0:
        return None
    more = f"; {len(i) - 1} more pairs closer" if len(i) > 1 else ""
    return (f"atoms {int(i[0])}{_symbol(numbers, i[0])} and {int(j[0])}{_symbol(numbers, j[0])} "
            f"are {distance[0]:.2f} A apart (< checks.min_distance_a = {min_distance_a:g} A"
            f"{more})")


def check_frames(positions_a: np.ndarray, cells_a: np.ndarray, numbers: np.ndarray | None,
                 where: str, frame_indices: Sequence[int] | int = 0,
                 min_distance_a: float = MIN_DISTANCE_A) -> None:
    """Refuse frames with a non-finite coordinate or cell, or two atoms too close.

    Parameters
    ----------
    positions_a
        (k, n_atoms, 3) or (n_atoms, 3) positions (A), unwrapped or not.
    cells_a
        (k, 3, 3) or (3, 3) cells (A), rows are the cell vectors.
    numbers
        (n_atoms,) atomic numbers (only to name the species in messages), or None.
    where
        What the frames are, for the message: ``"infer.trajectories: /path/traj.extxyz"``,
        ``"infer: store group /md/mcm/r001"``.
    frame_indices
        The index of each frame in its source (file or store group), or the index of the first
        frame when the frames are consecutive.
    min_distance_a
        Two atoms closer than this (A, minimum image) are refused (``checks.min_distance_a``).

    Raises
    ------
    InputError
        ``"<where>: frame 7: non-finite coordinate (atom 12 (Na): [nan, 1.0, 2.0])"``, ``"<where>:
        frame 5: atoms 3 (Na) and 40 (O) are 0.10 A apart (< checks.min_distance_a = 0.5 A)"``,
        for the first bad frame.
    """
    positions = np.asarray(positions_a, dtype=float)
    cells = np.asarray(cells_a, dtype=float)
    if positions.ndim == 2:
        positions, cells = positions[None], cells[None]
    if cells.ndim == 2:
        cells = np.broadcast_to(cells, (len(positions), 3, 3))
    if np.isscalar(frame_indices) or np.ndim(frame_indices) == 0:
        indices = int(frame_indices) + np.arange(len(positions))
    else:
        indices = np.asarray(frame_indices, dtype=int)
    for k in range(len(positions)):
        problem = frame_problem(positions[k], cells[k], numbers, min_distance_a)
        if problem is not None:
            raise InputError(f"{where}: frame {int(indices[k])}: {problem}")


def unknown_species(numbers: np.ndarray, known: Sequence[str]) -> list[str]:
    """Chemical symbols among `numbers` that are not in `known` (sorted; empty when none)."""
    from ase.data import chemical_symbols

    present = {chemical_symbols[int(z)] for z in np.unique(numbers)}
    return sorted(present - set(known))


def check_species(numbers: np.ndarray, known: Sequence[str], where: str, model: str) -> None:
    """Refuse a frame with a species that `model` does not know.

    Raises
    ------
    InputError
        ``"<where>: species ['Li'] unknown to <model> (it knows ['Mg', 'Mn', 'Na', 'O'])"``.
    """
    extra = unknown_species(numbers, known)
    if extra:
        raise InputError(f"{where}: species {extra} unknown to {model} (it knows "
                         f"{sorted(known)})")
