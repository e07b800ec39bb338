"""The analyze stage at N ranks gives the numbers of 1 rank (fp tolerance)."""
from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.stages.analyze import analyze_system
from jobs.stages.infer import put_labelled_frames
from schemas.analyze import AnalyzeSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "p2-nmmo"


def _fill(store, ctx, frames, system):
    """DFT frames as a file source, plus the same frames as two 'md replicas' with time."""
    put_labelled_frames(frames, system, ShiftSpec(), ctx, store)
    md = f"/infer/{system.name}-md"
    for name in store.keys(f"/infer/{system.name}"):
        store.put(f"{md}/{name}", store.read(f"/infer/{system.name}/{name}"))
    half = len(frames) // 2
    store.put(f"{md}/time_fs", np.tile(np.arange(half) * 20.0, 2))
    store.put(f"{md}/replica", np.repeat([0, 1], half).astype(np.int32))
    store.flush()


def _analysed(store, name):
    out = {}

    def visit(path, obj):
        if hasattr(obj, "shape"):
            out[path] = obj[()]
    store.file[f"/analyze/{name}"].visititems(visit)
    out["attrs"] = store.attrs(f"/analyze/{name}")
    return out


def test_two_ranks_equal_one_rank(shared_tmp):
    world = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    frames = ase.io.read(DATA / "p6322-dev.extxyz", ":60")
    system = SystemSpec(name="p6322", structure="builtin:p2-nmmo-p6322")
    spec = AnalyzeSpec(chunk_frames=7, blocks_per_replica=4, running_points=9, msd_lags=6,
                       map_bins=12)
    results = {}
    with RunStore(shared_tmp / "world.h5", world, mode="w") as store:
        _fill(store, world, frames, system)
        for name in ("p6322", "p6322-md"):
            analyze_system(spec, system.model_copy(update={"name": name}), world, store)
        world.comm.Barrier()
        store.flush()
        for name in ("p6322", "p6322-md"):
            results[name] = _analysed(store, name)
    single = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(shared_tmp / f"single{world.rank}.h5", single, mode="w") as store:
        _fill(store, single, frames, system)
        for name in ("p6322", "p6322-md"):
            analyze_system(spec, system.model_copy(update={"name": name}), single, store)
            reference = _analysed(store, name)
            assert set(reference) == set(results[name])
            for key, value in reference.items():
                if key == "attrs":
                    for attr, ref in value.items():
                        got = results[name]["attrs"][attr]
                        if attr == "ranks":
                            continue
                        if isinstance(ref, float):
                            assert got == pytest.approx(ref, rel=1e-10, nan_ok=True), attr
                        else:
                            assert got == ref, attr
                else:
                    assert np.allclose(results[name][key], value, rtol=1e-10, atol=1e-9,
                                       equal_nan=True), key
    md = results["p6322-md"]
    assert md["attrs"]["kind"] == "md" and np.isfinite(md["attrs"]["hops_per_nucleus"])
    # hops, residences and rates (compared above at every rank count) are not empty: the
    # decorrelated DFT frames posing as md jump between sites
    assert md["dynamics/hop_counts"].sum() > 50 and np.any(md["dynamics/rate_per_ps"] > 0)
    assert md["dynamics/site"].shape == (60, 16) and md["dynamics/residence_count"].sum() > 0
    assert "msd/msd_a2" in md and md["attrs"]["n_segments"] == 2
    assert results["p6322"]["attrs"]["ranks"] == world.size
