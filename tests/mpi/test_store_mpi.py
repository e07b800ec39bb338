"""The store's guards under mpirun -n N: one verdict on rank 0, every rank returns with it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import h5py
import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.lock import EXIT_STORE_HELD, lock_path_of


def _ctx() -> RankContext:
    return RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)


def _probe_manifest(folder):
    from schemas import load_manifest

    path = folder / "m.yaml"
    if MPI.COMM_WORLD.rank == 0:
        path.write_text("stages: [probe]\nstore: run.h5\n")
    MPI.COMM_WORLD.Barrier()
    return load_manifest(path)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _lock(store, host: str, pid: int) -> None:
    lock_path_of(store).write_text(json.dumps(
        {"host": host, "pid": pid, "pid_start": None, "job_id": "slurm job 77",
         "started_utc": "2025-01-02T03:04:05Z", "token": "f" * 32}))


def test_a_damaged_store_ends_every_rank_with_2_and_is_left_as_it_was(shared_tmp, capsys):
    from engine.cli import run_manifest
    from engine.store import RunStore

    ctx = _ctx()
    manifest, text = _probe_manifest(shared_tmp)
    store = shared_tmp / "bad.h5"
    if ctx.is_root:
        with RunStore(shared_tmp / "good.h5") as good:
            for i in range(10):
                good.mark_stage(f"stage{i}", "complete", summary={"i": i})
        shutil.copy(shared_tmp / "good.h5", store)
        os.truncate(store, os.path.getsize(store) // 2)
    ctx.comm.Barrier()
    before = _digest(store)
    code = run_manifest(manifest, text, ctx, store)
    assert ctx.comm.allgather(code) == [2] * ctx.size
    assert _digest(store) == before
    assert not lock_path_of(store).exists()
    err = capsys.readouterr().err
    if ctx.is_root:
        assert f"dynshift: store {store} is damaged: opening it: " in err
        assert err.rstrip().endswith("; nothing was changed")
    else:
        assert err == ""  # one message, from rank 0


def test_a_store_held_by_a_live_run_ends_every_rank_with_3(shared_tmp, capsys):
    from engine.cli import run_manifest

    ctx = _ctx()
    manifest, text = _probe_manifest(shared_tmp)
    store = shared_tmp / "held.h5"
    if ctx.is_root:  # held by our launcher: alive on this host
        _lock(store, socket.gethostname(), os.getppid())
    ctx.comm.Barrier()
    code = run_manifest(manifest, text, ctx, store)
    assert ctx.comm.allgather(code) == [EXIT_STORE_HELD] * ctx.size
    assert not store.exists()
    err = capsys.readouterr().err
    if ctx.is_root:
        assert (f"store {store} is held by another dynshift run (host {socket.gethostname()}, "
                f"pid {os.getppid()}, slurm job 77, since 2025-01-02T03:04:05Z") in err
        lock_path_of(store).unlink()
    ctx.comm.Barrier()


def test_a_dead_runs_lock_is_taken_over_and_released_at_the_end(shared_tmp, capsys):
    from engine.cli import run_manifest

    ctx = _ctx()
    manifest, text = _probe_manifest(shared_tmp)
    store = shared_tmp / "taken.h5"
    if ctx.is_root:
        _lock(store, "node-that-died", 1234)
        old = 1_000_000_000  # a heartbeat from 2001
        os.utime(lock_path_of(store), (old, old))
    ctx.comm.Barrier()
    code = run_manifest(manifest, text, ctx, store)
    assert ctx.comm.allgather(code) == [0] * ctx.size
    assert not lock_path_of(store).exists()
    out = capsys.readouterr().out
    if ctx.is_root:
        assert (f"took over the stale lock of {store} (host node-that-died, pid 1234, "
                "slurm job 77") in out
        with h5py.File(store, "r") as f:
            assert f["stages/probe"].attrs["status"] == "complete"
            assert np.all(f["probe/cores"][:] >= 1) and f["probe/cores"].shape == (ctx.size,)
    ctx.comm.Barrier()


def test_an_existing_store_is_reopened_not_created_on_every_rank(shared_tmp):
    from engine.store import RunStore

    ctx = _ctx()
    path = shared_tmp / "kept.h5"
    with RunStore(path, ctx) as store:
        store.put("/x/values", np.arange(5.0))
    with RunStore(path, ctx) as store:  # mode "a" again: rank 0 saw it exists, all open r+
        assert store.read("/x/values").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_read_shared_gives_every_rank_rank_0s_view(shared_tmp, monkeypatch):
    """A rank whose own read is stale (CI, 3 ranks: the resume took another number of rounds
    and hung) still steers by rank 0's copy."""
    from engine.store import RunStore

    ctx = _ctx()
    with RunStore(shared_tmp / "shared.h5", ctx) as store:
        store.create_dataset("/x/done", (4,), dtype="u1", fill_value=0)
        if ctx.rank == 0:
            store.write_rows("/x/done", 0, np.array([1, 0, 1, 1], np.uint8))
        store.flush()
        ctx.comm.Barrier()
        if ctx.rank > 0:  # this rank's own view is stale
            monkeypatch.setattr(store, "read", lambda name, selection=(): np.ones(4, np.uint8))
        assert store.read_shared("/x/done").tolist() == [1, 0, 1, 1]
        assert store.read_shared("/x/done", slice(1, 3)).tolist() == [0, 1]
