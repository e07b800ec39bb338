"""Cost of the frame checks (ms per frame) against two other exact minimum-image searches.

    .venv/bin/python benchmarks/bench_frame_checks.py --frames 2000

Frames: the 88-atom P2-NMMO cell (hexagonal, so triclinic in Cartesian terms) rattled by
0.05 A, and its 2x2x3 (1,056 atoms) and 4x4x6 (8,448 atoms) supercells. Times
:func:`jobs.frame_checks.check_frames` (finite checks + cKDTree with face copies), an all-pairs
numpy broadcast of wrapped fractional differences (exact here: the cell is wider than twice the
threshold) and ``ase.neighborlist.neighbor_list``; each must find no pair below 0.5 A.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def all_pairs_min_a(positions_a: np.ndarray, cell_a: np.ndarray) -> float:
    """Smallest minimum-image distance of one frame by an all-pairs broadcast."""
    scaled = positions_a @ np.linalg.inv(cell_a)
    difference = scaled[None, :, :] - scaled[:, None, :]
    difference -= np.round(difference)
    vectors = difference @ cell_a
    squared = np.einsum("ijk,ijk->ij", vectors, vectors)
    np.fill_diagonal(squared, np.inf)
    return float(np.sqrt(squared.min()))


def main() -> None:
    from ase.neighborlist import neighbor_list

    from jobs.frame_checks import check_frames
    from jobs.structures import p2_cell

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames of the 88-atom cell")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for repeat in ((1, 1, 1), (2, 2, 3), (4, 4, 6)):
        atoms = p2_cell().repeat(repeat)
        n_frames = max(5, args.frames * 88 // (len(atoms) * 4) if len(atoms) > 88
                       else args.frames)
        positions = atoms.positions + rng.normal(0, 0.05, (n_frames, len(atoms), 3))
        cells = np.broadcast_to(atoms.cell.array, (n_frames, 3, 3))
        started = time.perf_counter()
        check_frames(positions, cells, atoms.numbers, "bench")
        ours = (time.perf_counter() - started) / n_frames * 1e3
        line = f"{len(atoms):6d} atoms, {n_frames:5d} frames: check_frames {ours:8.3f} ms/frame"
        if len(atoms) <= 1056:
            started = time.perf_counter()
            closest = min(all_pairs_min_a(p, atoms.cell.array) for p in positions)
            brute = (time.perf_counter() - started) / n_frames * 1e3
            line += f", all pairs {brute:8.3f} ms/frame (closest {closest:.3f} A)"
        started = time.perf_counter()
        for p in positions[:max(3, n_frames // 10)]:
            atoms.positions = p
            assert len(neighbor_list("i", atoms, 0.5)) == 0
        ase_ms = (time.perf_counter() - started) / max(3, n_frames // 10) * 1e3
        print(f"{line}, ase.neighborlist {ase_ms:8.3f} ms/frame", flush=True)


if __name__ == "__main__":
    main()
