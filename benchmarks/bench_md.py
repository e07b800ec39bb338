"""MD speed: the md stage (engine) against a bare deepmd-kit + ASE loop, same model and cell.

Run on R ranks (one replica per rank, threads per rank = the rank's cores unless --threads):

    mpirun -n 1 .venv/bin/python benchmarks/bench_md.py --steps 2000
    mpirun -n 1 .venv/bin/python benchmarks/bench_md.py --steps 2000 --threads 1
    mpirun -n 2 .venv/bin/python benchmarks/bench_md.py --steps 2000

Both sides do the same work from the same start: build the 88-atom P2-NMMO cell, load the DP
model, draw velocities, run `steps` NVT Langevin steps of 1 fs; the engine also writes frames
(every --save-every steps) into an HDF5 store. Bare and engine runs alternate `--repeats` times;
the best of each is reported. Prints steps/s per replica and aggregate, and the engine overhead.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads per rank")
    parser.add_argument("--model", type=Path, default=None, help="frozen DP model")
    args = parser.parse_args()

    from mpi4py import MPI

    from engine.context import RankContext, limit_threads

    ctx = RankContext.from_comm(MPI.COMM_WORLD)
    threads = args.threads or ctx.cores
    limit_threads(threads)

    from schemas.potential import SHIPPED_MODEL

    model = args.model or SHIPPED_MODEL
    import deepmd.calculator  # noqa: F401 - import TensorFlow before any timing
    bare_s, engine_s = [], []
    for _ in range(args.repeats):
        ctx.comm.Barrier()
        bare_s.append(ctx.comm.allreduce(bare_loop(model, args.steps, ctx.rank), op=MPI.MAX))
        ctx.comm.Barrier()
        engine_s.append(engine_run(ctx, model, args.steps, args.save_every))
    bare, engine = min(bare_s), min(engine_s)
    if ctx.is_root:
        overhead = 100.0 * (engine / bare - 1.0)
        print(f"ranks={ctx.size} threads/rank={threads} steps={args.steps} model={model.name}")
        print(f"bare ASE+deepmd : {args.steps / bare:7.1f} steps/s per replica, "
              f"{ctx.size * args.steps / bare:7.1f} aggregate ({bare:.2f} s)")
        print(f"dynshift md     : {args.steps / engine:7.1f} steps/s per replica, "
              f"{ctx.size * args.steps / engine:7.1f} aggregate ({engine:.2f} s)")
        print(f"engine overhead : {overhead:+.1f} %  (all runs: bare {fmt(bare_s)}, "
              f"engine {fmt(engine_s)})")


def fmt(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def bare_loop(model: Path, steps: int, seed: int) -> float:
    """Seconds for: cell, model load, velocities, `steps` Langevin steps (plain ASE + deepmd)."""
    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.parallel import DummyMPI
    from deepmd.calculator import DP

    from jobs.structures import p2_cell

    start = time.perf_counter()
    atoms = p2_cell("nmmo", "p63mcm")
    atoms.calc = DP(model=str(model))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed),
                                 comm=DummyMPI())
    dynamics = Langevin(atoms, units.fs, temperature_K=300, friction=0.01 / units.fs,
                        fixcm=False, rng=np.random.default_rng(seed + 1), comm=DummyMPI())
    dynamics.run(steps)
    return time.perf_counter() - start


def engine_run(ctx, model: Path, steps: int, save_every: int) -> float:
    """Seconds for the md stage verb: one replica per rank of the same cell, frames stored."""
    from engine.store import RunStore
    from jobs.stages.md import run_replicas
    from schemas.md import MdSpec
    from schemas.system import SystemSpec

    folder = ctx.comm.bcast(tempfile.mkdtemp(prefix="bench-md-") if ctx.is_root else None)
    spec = MdSpec(replicas=ctx.size, equilibration_steps=0, frames=steps // save_every,
                  save_every_steps=save_every, chunk_frames=max(1, steps // save_every // 4))
    systems = [SystemSpec(name="nmmo", structure="builtin:p2-nmmo-p63mcm")]
    ctx.comm.Barrier()
    start = time.perf_counter()
    with RunStore(os.path.join(folder, "bench.h5"), ctx) as store:
        run_replicas(spec, systems, ctx, store, seed=1, model_fallback=model)
    elapsed = time.perf_counter() - start
    return elapsed


if __name__ == "__main__":
    main()
