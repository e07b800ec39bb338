"""The label stage on every rank of the world (mpirun -n 2; passes at -n 1 too)."""
from __future__ import annotations

import numpy as np
import yaml
from fake_vasp.labelling import (
    completed_runs,
    read_log,
    shared_frames,
    vasp_section,
    write_md,
)
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.layouts.label import labelled_frames
from jobs.stages.label import label_frames
from schemas import parse_manifest


def test_frames_are_sharded_labelled_once_and_agreed_on(shared_tmp, shared_data):
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    plan = {"a/r000-f000001": ["exit"], "b/r000-f000002": ["unconverged"] * 2}
    section = vasp_section(shared_tmp, plan) if ctx.is_root else None
    section = ctx.comm.bcast(section, root=0)
    manifest = parse_manifest(yaml.safe_dump({
        "stages": ["label"],
        "systems": [{"name": "a", "structure": "builtin:p2-nmmo-p63mcm"},
                    {"name": "b", "structure": "builtin:p2-nmmo-p63mcm"}],
        "label": {"n_frames": 4, "max_attempts": 2, "failure_budget": 0.125,
                  "work_dir": str(shared_tmp / "work"), "vasp": section}}))
    frames = shared_frames(shared_data, 8)
    with RunStore(shared_tmp / "run.h5", ctx) as store:
        write_md(store, "a", [frames[:4]])
        write_md(store, "b", [frames[4:]])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        results = ctx.comm.allgather(result)
        assert all(r == results[0] for r in results)
        assert (result.n_selected, result.n_done, result.n_failed) == (8, 7, 1)
        assert result.n_labelled_now == 7 and result.n_failed_attempts == 3
        store.flush()
        ctx.comm.Barrier()
        assert store.read("/label/b/status").tolist() == [1, 1, -1, 1]
        assert store.attrs("/label/b")["failures"][0]["frame"] == 2
        work_dirs = [w.decode() for w in store.read("/label/a/work_dir")]
        assert work_dirs == [str(shared_tmp / "work" / "a" / f"r000-f{i:06d}") for i in range(4)]
        frames_a = labelled_frames(store, ["a"])
        assert [a.info["frame"] for a in frames_a] == [0, 1, 2, 3]
        assert np.isfinite(frames_a[3].arrays["shift_ppm"][:16]).all()
        ctx.comm.Barrier()
        starts = sum(f[0] == "start" for f in read_log(shared_tmp))
        assert starts == 8 + 1 + 1
        assert set(completed_runs(shared_tmp).values()) == {1}  # no frame labelled twice
        ctx.comm.Barrier()
        again = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (again.n_done, again.n_labelled_now) == (7, 0)
        ctx.comm.Barrier()
        assert sum(f[0] == "start" for f in read_log(shared_tmp)) == starts


def test_a_split_communicator_labels_on_its_own(shared_tmp, shared_data):
    """The communicator is passed in: each half of the world labels its own store."""
    world = MPI.COMM_WORLD
    half = world.Split(world.rank % 2, world.rank)
    ctx = RankContext.from_comm(half, set_threads=False)
    folder = shared_tmp / f"half{world.rank % 2}"
    if ctx.is_root:
        folder.mkdir()
        section = vasp_section(folder)
    section = ctx.comm.bcast(section if ctx.is_root else None, root=0)
    manifest = parse_manifest(yaml.safe_dump({
        "stages": ["label"], "systems": [{"name": "a", "structure": "builtin:p2-nmmo-p63mcm"}],
        "label": {"n_frames": 2, "work_dir": str(folder / "work"), "vasp": section}}))
    with RunStore(folder / "run.h5", ctx) as store:
        write_md(store, "a", [shared_frames(shared_data, 2)])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
    assert result.n_done == 2
    half.Free()


def test_a_rank_launches_its_own_mpi_job(shared_tmp):
    """The DFT command may itself be `mpirun ...`: it must not inherit the rank's MPI identity
    (Open MPI refuses a recursive mpirun), and `{rank}` / `{cores}` are filled in."""
    import sys

    from jobs.labellers.vasp import VaspProfile, expand_command

    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    work = shared_tmp / f"nested{ctx.rank}"
    work.mkdir()
    script = ("import sys; from mpi4py import MPI; w = MPI.COMM_WORLD; "
              "open(f'inner{w.rank}', 'w').write(f'{sys.argv[1]} {w.rank} {w.size}')")
    command = expand_command(["mpirun", "-np", "2", sys.executable, "-c", script, "{rank}"],
                             ctx.cores, ctx.rank)
    assert VaspProfile(command, walltime_s=120).run(work) == 0
    assert [(work / f"inner{i}").read_text() for i in (0, 1)] == [
        f"{ctx.rank} 0 2", f"{ctx.rank} 1 2"]


def test_a_rank_stuck_on_a_slow_frame_leaves_the_others_to_the_rest(shared_tmp, shared_data):
    """Frames are taken on demand: while rank 0 computes a slow frame (its first), rank 1 takes
    the quick ones (a static deal would give each rank 3 of the 6)."""
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    folder = shared_tmp / "balance"
    if ctx.is_root:
        folder.mkdir()
        section = vasp_section(folder, {"a/r000-f000000": ["slow"]})
        section["env"]["FAKE_VASP_SLOW_S"] = "6"
    section = ctx.comm.bcast(section if ctx.is_root else None, root=0)
    manifest = parse_manifest(yaml.safe_dump({
        "stages": ["label"], "systems": [{"name": "a", "structure": "builtin:p2-nmmo-p63mcm"}],
        "label": {"n_frames": 6, "work_dir": str(folder / "work"), "vasp": section}}))
    with RunStore(folder / "run.h5", ctx) as store:
        write_md(store, "a", [shared_frames(shared_data, 6)])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
    assert result.n_done == 6 and sum(result.frames_per_rank) == 6
    if ctx.size == 2:
        assert result.frames_per_rank[0] < result.frames_per_rank[1]
