"""The run store on one rank: datasets, attributes, blobs, stage bookkeeping."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore


def test_store_round_trips_arrays_attrs_and_blobs(tmp_path):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        store.put("/a/b", np.arange(6.0).reshape(2, 3), unit="ppm")
        store.set_attrs("/a", settings={"r_cut_a": 5.5}, species=["Na", "O"], n=3)
        store.put_bytes("/blob", b"\x00model\xff")
        store.put_json("/doc", {"x": [1, 2]})
        store.create_dataset("/rows", (4, 2), dtype="f4", fill_value=np.nan)
        store.write_rows("/rows", 1, [[1, 2], [3, 4]])
        store.mark_stage("md", "complete", elapsed_s=1.5)
    with RunStore(tmp_path / "s.h5", ctx, "r") as store:
        assert store.read("/a/b")[1, 2] == 5.0
        assert store.attrs("/a/b")["unit"] == "ppm"
        assert store.attrs("/a") == {"settings": {"r_cut_a": 5.5}, "species": ["Na", "O"], "n": 3}
        assert store.get_bytes("/blob") == b"\x00model\xff"
        assert store.get_json("/doc") == {"x": [1, 2]}
        rows = store.read("/rows")
        assert np.isnan(rows[0]).all() and rows[2].tolist() == [3.0, 4.0]
        assert store.stage_status("md") == "complete" and store.stage_status("train") is None
        assert store.keys("/a") == ["b"] and store.keys("/nothing") == []


def test_block_shares_cover_every_item_once():
    ctx = RankContext(comm=None, rank=0, size=3, local_rank=0, local_size=3, cores=1)
    shares = []
    for rank in range(3):
        ctx.rank = rank
        shares.append(list(ctx.block(10)))
    assert sorted(sum(shares, [])) == list(range(10))
    assert [len(s) for s in shares] == [3, 4, 3]
    ctx.rank = 1
    assert list(ctx.round_robin(7)) == [1, 4]
