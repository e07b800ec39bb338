"""The probe stage: every rank reports its host and cores, writes its row of the store, and
an Allreduce checks the communicator; a cheap first stage for a new cluster or allocation."""
from __future__ import annotations

from jobs.layouts.probe import create_cores, put_cores, put_hosts, read_cores

import socket
import time
from dataclasses import dataclass

import numpy as np

from engine.context import RankContext
from engine.stages import StageInputs, StageResult
from engine.store import RunStore

"""The store group this stage owns: ``cores`` (one row per rank), attribute ``hosts``."""


@dataclass(frozen=True)
class ProbeResult(StageResult):
    """What the probe found: ranks, distinct hosts and cores over all ranks."""

    ranks: int
    hosts: int
    cores_total: int


def probe_ranks(spec, ctx: RankContext, store: RunStore) -> ProbeResult:
    """Record host and cores of every rank in /probe; check an Allreduce and parallel writes."""
    from mpi4py import MPI

    if spec.fail_on_rank is not None and spec.fail_on_rank == ctx.rank:
        raise RuntimeError(f"probe.fail_on_rank={ctx.rank}: failing on purpose")
    if spec.others_wait_s:
        time.sleep(spec.others_wait_s)
    hosts = ctx.comm.allgather(socket.gethostname())
    with store.transaction():
        create_cores(store, ctx.size)
        put_cores(store, ctx.rank, ctx.cores)
        rank_sum = ctx.comm.allreduce(ctx.rank, op=MPI.SUM)
        if rank_sum != ctx.size * (ctx.size - 1) // 2:
            raise RuntimeError(f"Allreduce gave {rank_sum}; the MPI installation is broken")
        put_hosts(store, hosts)
        ctx.comm.Barrier()
    cores = read_cores(store)
    return ProbeResult(ranks=ctx.size, hosts=len(set(hosts)), cores_total=int(np.sum(cores)))


def run(spec, inputs: StageInputs) -> ProbeResult:
    """Stage entry: probe the ranks of ``inputs.ctx`` (spec: ProbeSpec)."""
    return probe_ranks(spec, inputs.ctx, inputs.store)
