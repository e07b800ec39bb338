"""The engine under mpirun -n 2 (and -n 1): parallel store writes, a split communicator."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore


def test_every_rank_writes_its_block_of_one_dataset(shared_tmp):
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    n = 11
    with RunStore(f"{shared_tmp}/s.h5", ctx) as store:
        store.create_dataset("/x/values", (n, 2), dtype="f8", fill_value=-1.0, unit="ppm")
        mine = ctx.block(n)
        store.write_rows("/x/values", mine.start, np.array([[i, ctx.rank] for i in mine], float))
        store.set_attrs("/x", ranks=ctx.size)
        store.flush()
        ctx.comm.Barrier()
        values = store.read("/x/values")
    assert values[:, 0].tolist() == list(range(n))
    owners = values[:, 1].astype(int)
    assert sorted(set(owners.tolist())) == list(range(ctx.size))
    assert np.all(np.diff(owners) >= 0)


def test_a_stage_runs_on_a_split_communicator(shared_tmp):
    """The communicator is passed in: a sub-communicator runs the probe stage on its own."""
    from jobs.stages.probe import probe_ranks
    from schemas.probe import ProbeSpec

    world = MPI.COMM_WORLD
    sub = world.Split(color=world.rank % 2, key=world.rank)
    ctx = RankContext.from_comm(sub, set_threads=False)
    with RunStore(f"{shared_tmp}/split{world.rank % 2}.h5", ctx) as store:
        result = probe_ranks(ProbeSpec(), ctx, store)
        assert result.summary()["ranks"] == sub.size
        assert store.shape("/probe/cores") == (sub.size,)
    sub.Free()


def test_ase_reads_stay_on_their_rank(shared_tmp):
    """Each rank reads its own file with ASE: no hidden collective, no other rank's data."""
    import ase.io
    from ase import Atoms

    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    path = f"{shared_tmp}/rank{ctx.rank}.xyz"
    ase.io.write(path, Atoms("Na" * (ctx.rank + 1), positions=[[0, 0, i] for i in
                                                                  range(ctx.rank + 1)]))
    if ctx.rank == 0:  # rank 0 reads while the others do not: a collective read would hang
        assert len(ase.io.read(path)) == 1
    ctx.comm.Barrier()
    assert len(ase.io.read(path)) == ctx.rank + 1


def test_attributes_that_differ_between_ranks_are_stored_as_rank_0s(shared_tmp):
    """A per-rank value (a wall time, a rate) in a collective attribute write must not corrupt
    the file: every rank's call stores rank 0's value."""
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    with RunStore(f"{shared_tmp}/attrs.h5", ctx) as store:
        per_rank = {"frames_per_s": 325.59 + 1000.123456 * ctx.rank, "rank": ctx.rank}
        store.mark_stage("infer", "complete", elapsed_s=1.0 + ctx.rank, summary=per_rank)
        store.create_dataset("/x", (2,), dtype="f8", note="r" * (ctx.rank + 1))
        store.flush()
    ctx.comm.Barrier()
    with RunStore(f"{shared_tmp}/attrs.h5", ctx, "r") as store:
        attrs = store.attrs("/stages/infer")
        assert attrs["summary"] == {"frames_per_s": 325.59, "rank": 0}
        assert attrs["elapsed_s"] == 1.0
        assert store.attrs("/x")["note"] == "r"
