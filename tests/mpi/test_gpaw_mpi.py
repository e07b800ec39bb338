"""The label stage with real GPAW on every rank of the world (mpirun -n 2; passes at -n 1, 3).

Skips when GPAW is not installed (DYNSHIFT_GPAW=1 bash run/install.sh).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_vasp.labelling import write_md
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.layouts.label import labelled_frames
from jobs.stages.label import label_frames
from schemas import parse_manifest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gpaw") is None,
    reason="GPAW is not installed (DYNSHIFT_GPAW=1 bash run/install.sh)")


def _helpers():
    """tests/jobs/test_gpaw.py as a module: its tiny frames, section and run log."""
    path = Path(__file__).resolve().parents[1] / "jobs" / "test_gpaw.py"
    spec = importlib.util.spec_from_file_location("gpaw_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_six_tiny_frames_one_failure_retried_labelled_once(shared_tmp):
    helpers = _helpers()
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    plan = {"h2/r000-f000004": ["exit"]}
    section = helpers.gpaw_section(shared_tmp, plan) if ctx.is_root else None
    section = ctx.comm.bcast(section, root=0)
    manifest = parse_manifest(yaml.safe_dump({
        "stages": ["label"], "systems": [{"name": "h2", "structure": "builtin:p2-nmmo-p63mcm"}],
        "label": {"n_frames": 6, "max_attempts": 2, "failure_budget": 0.0,
                  "work_dir": str(shared_tmp / "work"), "labeller": "gpaw", "gpaw": section}}))
    with RunStore(shared_tmp / "run.h5", ctx) as store:
        write_md(store, "h2", [helpers.pair_frames(6)])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        results = ctx.comm.allgather(result)
        assert all(r == results[0] for r in results)
        assert (result.n_selected, result.n_done, result.n_failed) == (6, 6, 0)
        assert (result.n_labelled_now, result.n_failed_attempts) == (6, 1)
        store.flush()
        ctx.comm.Barrier()
        assert store.read("/label/h2/attempts").tolist() == [1, 1, 1, 1, 2, 1]
        frames = labelled_frames(store, ["h2"])
        a_iso = np.array([a.arrays["fermi_contact_mhz"] for a in frames])
        assert np.isfinite(a_iso).all() and (a_iso > 0).all()
        # H-H further apart: less overlap, each atom's coupling nearer the free atom's half
        assert a_iso[-1].mean() > a_iso[0].mean()
        ctx.comm.Barrier()
        done = helpers.completed_runs(shared_tmp)
        assert len(done) == 6 and set(done.values()) == {1}  # no frame labelled twice
        again = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (again.n_done, again.n_labelled_now, again.n_recovered) == (6, 0, 0)
        ctx.comm.Barrier()
        assert helpers.completed_runs(shared_tmp) == done
