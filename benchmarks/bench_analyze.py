"""Cost per sample of the analyze stage at the 88-atom cell and at a supercell, in one run.

    mpirun -n 2 .venv/bin/python benchmarks/bench_analyze.py --samples 1048576 --store /tmp/b.h5

For each cell (the first shared P6_3/mcm frame, and that frame repeated ``--supercell`` times,
4 x 4 x 4 by default: 5,632 atoms, 1,024 Na), builds a synthetic md source of about
``--samples`` samples (Na x frames; random-walk Na on the frame's framework, 2 replicas)
serially on rank 0 in its own store, then times `analyze_system` on all ranks (MSD included).
On rank 0 it then times `jobs.sites.assign_sites` alone on one analyze chunk of that source
and the all-pairs reference `_assign_sites_brute` on fewer samples, with the peak traced memory
(tracemalloc: numpy buffers) of each per sample. Prints one row per cell (``find s``:
`find_sites` on frame 0, a one-off cost per system that analyze pays on every rank; ``net us``:
analyze per sample without it; the peak resident memory of each rank, cumulative over the
cells) and the supercell / 88-atom ratios. ``--reference`` runs analyze with the all-pairs
assignment (the cost before the binned search).
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.stages.analyze import analyze_system
from jobs.sites import _assign_sites_brute, assign_sites, find_sites
from schemas.analyze import AnalyzeSpec
from schemas.system import SystemSpec

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "p2-nmmo"


def frame0_atoms(repeat=(1, 1, 1)):
    """The first shared P6_3/mcm frame (88 atoms), repeated `repeat` times."""
    import ase.io

    return ase.io.read(DATA / "p63mcm-dev.extxyz", 0).repeat(tuple(repeat))


def build_source(path: Path, n_frames: int, repeat=(1, 1, 1), name: str = "bench",
                 seed: int = 0) -> None:
    """Write a synthetic md source of `n_frames` frames (two replicas) to /infer/<name>."""
    frame0 = frame0_atoms(repeat)
    na = np.flatnonzero(frame0.numbers == 11)
    rng = np.random.default_rng(seed)
    half = n_frames // 2
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    group = f"/infer/{name}"
    with RunStore(path, ctx, mode="w") as store:
        steps = rng.normal(0, 0.05, (2, half, len(na), 3))
        steps[..., 2] = 0
        positions = frame0.positions[na] + np.cumsum(steps, axis=1)
        del steps
        store.put(f"{group}/centre_positions_a", positions.reshape(-1, len(na), 3))
        del positions
        store.put(f"{group}/shift_ppm",
                  rng.normal(1600, 500, (2 * half, len(na))).astype(np.float32))
        store.put(f"{group}/cell_a", np.broadcast_to(frame0.cell[:], (2 * half, 3, 3)))
        store.put(f"{group}/time_fs", np.tile(np.arange(half) * 1000.0, 2))
        store.put(f"{group}/replica", np.repeat([0, 1], half).astype(np.int32))
        store.put(f"{group}/frame0_numbers", frame0.numbers)
        store.put(f"{group}/frame0_positions_a", frame0.positions)
        store.put(f"{group}/framework_drift_a", np.zeros((2 * half, 3)))


def _best_time_s(function, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_mb(function) -> float:
    """Peak traced memory (MB, numpy buffers included) of one call of `function`."""
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return peak


def time_assign(store_path: Path, name: str, repeat, spec: AnalyzeSpec,
                brute_samples: int) -> dict:
    """Serial costs of site assignment on frames of /infer/<name> (rank 0 only)."""
    atoms = frame0_atoms(repeat)
    start = time.perf_counter()
    sites = find_sites(atoms.numbers, atoms.positions, atoms.cell[:], radius_a=spec.site_radius_a,
                       layer_gap_a=spec.layer_gap_a)
    find_s = time.perf_counter() - start
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(store_path, ctx) as store:
        n_frames, n_na = store.shape(f"/infer/{name}/shift_ppm")
        chunk = slice(0, min(spec.chunk_frames, n_frames))
        positions = store.read(f"/infer/{name}/centre_positions_a", chunk).astype(np.float64)
        cells = store.read(f"/infer/{name}/cell_a", chunk).astype(np.float64)
    n_brute = max(1, min(len(positions), brute_samples // n_na))
    few = positions[:n_brute], cells[:n_brute], sites
    new_s = _best_time_s(lambda: assign_sites(positions, cells, sites))
    brute_s = _best_time_s(lambda: _assign_sites_brute(*few), repeats=1)
    same = np.array_equal(assign_sites(*few).site, _assign_sites_brute(*few).site)
    return dict(atoms=len(atoms), sites=len(sites.centres_frac), find_s=find_s,
                assign_us=1e6 * new_s / (len(positions) * n_na),
                brute_us=1e6 * brute_s / (n_brute * n_na), brute_same=same,
                assign_bytes=2 ** 20 * _peak_mb(lambda: assign_sites(positions, cells, sites))
                / (len(positions) * n_na),
                brute_bytes=2 ** 20 * _peak_mb(lambda: _assign_sites_brute(*few))
                / (n_brute * n_na))


def run_cell(args, ctx: RankContext, label: str, repeat, spec: AnalyzeSpec) -> dict:
    """Build the source of one cell, time analyze (all ranks), then assignment (rank 0)."""
    n_na = int(np.sum(frame0_atoms(repeat).numbers == 11))
    n_frames = 2 * max(2, args.samples // n_na // 2)
    path = args.store.with_name(f"{args.store.stem}-{label}{args.store.suffix}")
    if ctx.is_root:
        build_source(path, n_frames, repeat, name=label)
    ctx.comm.Barrier()
    with RunStore(path, ctx) as store:
        ctx.comm.Barrier()
        start = time.perf_counter()
        analyze_system(spec, SystemSpec(name=label, structure="x"), ctx, store)
        ctx.comm.Barrier()
        elapsed = time.perf_counter() - start
    peaks = ctx.comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, root=0)
    row = dict(label=label, na=n_na, frames=n_frames, samples=n_frames * n_na,
               analyze_s=elapsed, analyze_us=1e6 * elapsed / (n_frames * n_na),
               rss_mb=peaks)
    if ctx.is_root:
        row.update(time_assign(path, label, repeat, spec, args.brute_samples))
        row["net_us"] = 1e6 * (elapsed - row["find_s"]) / row["samples"]
    ctx.comm.Barrier()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20,
                        help="samples (Na x frames) of each synthetic source")
    parser.add_argument("--supercell", type=int, nargs=3, default=(4, 4, 4))
    parser.add_argument("--brute-samples", type=int, default=16384,
                        help="samples timed with the all-pairs reference")
    parser.add_argument("--reference", action="store_true",
                        help="analyze with the all-pairs reference assignment (the cost before "
                        "the binned search; keep --samples small)")
    parser.add_argument("--store", type=Path, default=Path("/tmp/bench_analyze.h5"))
    args = parser.parse_args()
    if args.reference:
        import jobs.stages.analyze

        jobs.stages.analyze.assign_sites = _assign_sites_brute
    ctx = RankContext.from_comm(MPI.COMM_WORLD)
    spec = AnalyzeSpec()
    big = "x".join(map(str, args.supercell))
    rows = [run_cell(args, ctx, "cell88", (1, 1, 1), spec),
            run_cell(args, ctx, "super" + big.replace("x", ""), args.supercell, spec)]
    if not ctx.is_root:
        return
    print(f"analyze{' (all-pairs reference assignment)' if args.reference else ''} on "
          f"{ctx.size} rank(s), chunk_frames {spec.chunk_frames}; assign_sites on rank 0 on one "
          "analyze chunk, brute: the all-pairs reference; B: peak traced bytes per sample")
    print(f"{'cell':>9} {'atoms':>5} {'Na':>4} {'sites':>5} {'frames':>6} {'samples':>7} "
          f"{'analyze s':>9} {'find s':>6} {'us/smp':>6} {'net us':>6} {'assign us':>9} "
          f"{'brute us':>8} {'assign B':>8} {'brute B':>7}  peak RSS/rank MB (cumulative)")
    for row in rows:
        print(f"{row['label']:>9} {row['atoms']:>5} {row['na']:>4} {row['sites']:>5} "
              f"{row['frames']:>6} {row['samples']:>7} {row['analyze_s']:>9.2f} "
              f"{row['find_s']:>6.2f} {row['analyze_us']:>6.3f} {row['net_us']:>6.3f} "
              f"{row['assign_us']:>9.3f} {row['brute_us']:>8.2f} {row['assign_bytes']:>8.0f} "
              f"{row['brute_bytes']:>7.0f}  " + ", ".join(f"{p:.0f}" for p in row["rss_mb"])
              + ("" if row["brute_same"] else "  (assign_sites != brute!)"))
    small, large = rows

    def ratio(key):
        return large[key] / small[key]

    print(f"ratio {big} / 88-atom per sample: analyze {ratio('analyze_us'):.2f} "
          f"({ratio('net_us'):.2f} without find_sites), assign_sites {ratio('assign_us'):.2f}, "
          f"brute {ratio('brute_us'):.1f}; bytes per sample: assign_sites "
          f"{ratio('assign_bytes'):.2f}, brute {ratio('brute_bytes'):.1f}; assign_sites is "
          f"{large['brute_us'] / large['assign_us']:.0f}x faster than brute at {big}")


if __name__ == "__main__":
    main()
