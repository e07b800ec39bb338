"""Store transactions: a kill inside a structural update is undone from the copy taken before."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore, recover_interrupted, snapshot_path_of, store_damage


def _ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


def _garble(path, offset_fraction=0.5, n_bytes=4096):
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction) // 8 * 8
    data[start:start + n_bytes] = b"\xff" * min(n_bytes, len(data) - start)
    path.write_bytes(bytes(data))


def _make(path):
    with RunStore(path, _ctx()) as store:
        for k in range(20):
            store.put(f"/md/s/r{k:03d}/positions_a", np.full((4, 3), float(k)))
            store.set_attrs(f"/md/s/r{k:03d}", n_saved=k, note="x" * 40)
        store.flush()


def test_a_finished_transaction_leaves_no_copy(tmp_path):
    path = tmp_path / "s.h5"
    _make(path)
    with RunStore(path, _ctx()) as store:
        with store.transaction():
            assert snapshot_path_of(path).is_file()
            with store.transaction():  # nested: joins the outer one
                store.put("/infer/s/shift_ppm", np.arange(3.0))
        assert not snapshot_path_of(path).exists()
        assert store.read("/infer/s/shift_ppm").tolist() == [0.0, 1.0, 2.0]


def test_a_kill_inside_is_undone_from_the_copy(tmp_path):
    path = tmp_path / "s.h5"
    _make(path)
    before = path.read_bytes()
    with RunStore(path, _ctx()) as store:
        with store.transaction():
            snapshot = snapshot_path_of(path).read_bytes()
    assert snapshot == before
    # what a kill inside the block can leave: the copy, and a store whose metadata disagree
    snapshot_path_of(path).write_bytes(snapshot)
    _garble(path)
    damage = store_damage(path)
    assert damage is not None
    note = recover_interrupted(path)
    assert note is not None and "restored the copy" in note and damage in note
    assert store_damage(path) is None and path.read_bytes() == before
    assert not snapshot_path_of(path).exists()
    kept = list(tmp_path.glob("s.h5.damaged-*"))
    assert len(kept) == 1 and store_damage(kept[0]) is not None
    with RunStore(path, _ctx(), mode="r") as store:
        assert store.attrs("/md/s/r007")["n_saved"] == 7


def test_a_readable_store_keeps_its_writes_and_drops_the_copy(tmp_path):
    path = tmp_path / "s.h5"
    _make(path)
    snapshot_path_of(path).write_bytes(path.read_bytes())
    with RunStore(path, _ctx()) as store:
        store.put("/late", np.ones(2))
    assert recover_interrupted(path) is None
    assert not snapshot_path_of(path).exists()
    with RunStore(path, _ctx(), mode="r") as store:
        assert store.exists("/late")


def test_nothing_changes_when_the_copy_is_damaged_too(tmp_path):
    path = tmp_path / "s.h5"
    _make(path)
    _garble(path)
    snapshot_path_of(path).write_bytes(path.read_bytes())
    damaged = path.read_bytes()
    assert recover_interrupted(path) is None
    assert path.read_bytes() == damaged and snapshot_path_of(path).exists()
