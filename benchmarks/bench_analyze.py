"""Throughput of the analyze stage (frames/s) on a synthetic md source.

    mpirun -n 2 .venv/bin/python benchmarks/bench_analyze.py --frames 20000 --store /tmp/b.h5

Builds /infer/bench (random-walk Na on the framework of the first shared P6_3/mcm frame,
2 replicas) serially on rank 0, then times `analyze_system` on all ranks. Prints frames/s
and the peak resident memory of each rank.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.analyze import analyze_system
from schemas.analyze import AnalyzeSpec
from schemas.system import SystemSpec

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "p2-nmmo"


def build_source(path: Path, n_frames: int, seed: int = 0) -> None:
    """Write a synthetic md source of `n_frames` frames (two replicas) to /infer/bench."""
    import ase.io

    frame0 = ase.io.read(DATA / "p63mcm-dev.extxyz", 0)
    na = np.flatnonzero(frame0.numbers == 11)
    rng = np.random.default_rng(seed)
    half = n_frames // 2
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(path, ctx, mode="w") as store:
        steps = rng.normal(0, 0.05, (2, half, len(na), 3))
        steps[..., 2] = 0
        positions = frame0.positions[na] + np.cumsum(steps, axis=1)
        store.put("/infer/bench/centre_positions_a", positions.reshape(-1, len(na), 3))
        store.put("/infer/bench/shift_ppm",
                  rng.normal(1600, 500, (2 * half, len(na))).astype(np.float32))
        store.put("/infer/bench/cell_a", np.broadcast_to(frame0.cell[:], (2 * half, 3, 3)))
        store.put("/infer/bench/time_fs", np.tile(np.arange(half) * 1000.0, 2))
        store.put("/infer/bench/replica", np.repeat([0, 1], half).astype(np.int32))
        store.put("/infer/bench/frame0_numbers", frame0.numbers)
        store.put("/infer/bench/frame0_positions_a", frame0.positions)
        store.put("/infer/bench/framework_drift_a", np.zeros((2 * half, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/bench_analyze.h5"))
    args = parser.parse_args()
    ctx = RankContext.from_comm(MPI.COMM_WORLD)
    if ctx.is_root:
        build_source(args.store, args.frames)
    ctx.comm.Barrier()
    with RunStore(args.store, ctx) as store:
        ctx.comm.Barrier()
        start = time.perf_counter()
        analyze_system(AnalyzeSpec(), SystemSpec(name="bench", structure="x"), ctx, store)
        ctx.comm.Barrier()
        elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = ctx.comm.gather(peak_mb, root=0)
    if ctx.is_root:
        n = 2 * (args.frames // 2)
        print(f"analyze: {n} frames x 16 Na on {ctx.size} rank(s): {elapsed:.2f} s, "
              f"{n / elapsed:.0f} frames/s (incl. MSD); peak RSS per rank "
              + ", ".join(f"{p:.0f} MB" for p in peaks))


if __name__ == "__main__":
    main()
