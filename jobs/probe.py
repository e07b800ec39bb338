"""The probe stage: every rank reports its host and cores, writes its row of the store, and
an Allreduce checks the communicator; a cheap first stage for a new cluster or allocation."""
from __future__ import annotations

import socket
import time

import numpy as np

from engine.context import RankContext
from engine.driver import StageResult
from engine.store import RunStore


def probe_ranks(spec, ctx: RankContext, store: RunStore) -> StageResult:
    """Record host and cores of every rank in /probe; check an Allreduce and parallel writes."""
    from mpi4py import MPI

    if spec.fail_on_rank is not None and spec.fail_on_rank == ctx.rank:
        raise RuntimeError(f"probe.fail_on_rank={ctx.rank}: failing on purpose")
    if spec.others_wait_s:
        time.sleep(spec.others_wait_s)
    hosts = ctx.comm.allgather(socket.gethostname())
    store.create_dataset("/probe/cores", (ctx.size,), dtype="i4", unit="cores")
    store.write_rows("/probe/cores", ctx.rank, [ctx.cores])
    rank_sum = ctx.comm.allreduce(ctx.rank, op=MPI.SUM)
    if rank_sum != ctx.size * (ctx.size - 1) // 2:
        raise RuntimeError(f"Allreduce gave {rank_sum}; the MPI installation is broken")
    store.set_attrs("/probe", hosts=hosts)
    ctx.comm.Barrier()
    store.flush()
    cores = store.read("/probe/cores")
    return StageResult({"ranks": ctx.size, "hosts": len(set(hosts)),
                        "cores_total": int(np.sum(cores))})


def run_stage(manifest, ctx: RankContext, store: RunStore) -> StageResult:
    """Stage entry point used by the driver."""
    return probe_ranks(manifest.probe, ctx, store)
