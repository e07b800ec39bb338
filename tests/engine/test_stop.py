"""The cooperative stop (engine/stop.py): a signal ends `mpirun -n 2 dynshift run` at a safe
point with status 75, an unlocked, undamaged store, and a rerun finishes with the numbers of an
uninterrupted run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import (after, assert_same_rows, complete_run, ref_and_stopped, stopped_run,
                    store_rows, term_to_ranks, usr1_to_mpirun)

from engine import stop

NNMR = Path(__file__).resolve().parents[2] / "jobs" / "data" / "nnmr-p2-nmmo.h5"

MANIFEST = """\
stages: [md]
store: run.h5
systems: [{name: p63mcm, structure: 'builtin:p2-nmmo-p63mcm'}]
md: {replicas: 2, equilibration_steps: 0, frames: 240, save_every_steps: 5, chunk_frames: 4}
"""


@pytest.fixture
def handlers():
    saved = {name: signal.getsignal(getattr(signal, name)) for name in stop.SIGNALS}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)
    stop.reset()


def test_a_signal_sets_the_flag_and_the_next_safe_point_stops(handlers):
    stop.install(grace_s=0)
    assert stop.requested() is None
    stop.stop_point(None, "nowhere")                       # no request: nothing happens
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested() == "SIGUSR1"
    with pytest.raises(stop.StopRequested, match="stopped on SIGUSR1 in md after") as caught:
        stop.stop_point(None, "in md after round 3")
    import pickle                           # ranks gather outcomes that may hold a stop
    again = pickle.loads(pickle.dumps(caught.value))
    assert (again.where, again.signal_name, str(again)) == (
        caught.value.where, "SIGUSR1", str(caught.value))


def test_sigusr1_then_sigterm_stop_md_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, dynshift_bin):
    ref, stopped = ref_and_stopped(tmp_path, MANIFEST)
    complete_run(ref, dynshift_bin)
    # 1. SIGUSR1 to mpirun; 2. resumed, then SIGTERM to every rank
    for tag, send in (("first", usr1_to_mpirun), ("second", term_to_ranks)):
        shown = stopped_run(stopped, dynshift_bin, tag, "md", after("md: 2 trajectories", 3.0),
                         send)
        assert "frames per replica saved" in shown
    # 3. the rerun completes with the uninterrupted run's numbers, bit for bit
    complete_run(stopped, dynshift_bin)
    assert_same_rows(store_rows(ref / "run.h5", "md"), store_rows(stopped / "run.h5", "md"))


def test_a_stop_during_infer_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, dynshift_bin, shared_data):
    import ase.io

    frames = ase.io.read(shared_data / "p63mcm-dev.extxyz", ":")
    ase.io.write(tmp_path / "traj.extxyz", frames * 4)             # 1600 frames, ~15 s
    manifest = (f"stages: [infer, analyze]\nstore: run.h5\n"
                "systems: [{name: p63mcm, structure: 'builtin:p2-nmmo-p63mcm'}]\n"
                f"infer: {{chunk_frames: 2, soap_kernel: dscribe, model: {NNMR},\n"
                f"        trajectories: {{p63mcm: {tmp_path / 'traj.extxyz'}}}}}\n")
    ref, stopped = ref_and_stopped(tmp_path, manifest)
    complete_run(ref, dynshift_bin)
    shown = stopped_run(stopped, dynshift_bin, "infer", "infer",
                     after("infer p63mcm: 1600 frames", 2.0), usr1_to_mpirun)
    assert "in infer p63mcm after round" in shown, shown
    complete_run(stopped, dynshift_bin)
    for group in ("infer", "analyze"):
        assert_same_rows(store_rows(ref / "run.h5", group), store_rows(stopped / "run.h5", group))


def test_a_stop_during_label_lets_the_running_dft_job_finish_and_the_rerun_labels_the_rest(
        tmp_path, dynshift_bin):
    import yaml
    from fake_vasp.labelling import completed_runs, read_log, vasp_section

    manifest = yaml.safe_load(MANIFEST)
    manifest["stages"] = ["md", "label"]
    manifest["md"].update(replicas=1, frames=16, chunk_frames=16)
    manifest["label"] = {"labeller": "vasp", "work_dir": "work", "n_frames": 8,
                         "selection": "evenly",
                         "vasp": vasp_section(tmp_path, sleep_s=1.5, walltime_s=60.0)}
    ref, stopped = ref_and_stopped(tmp_path, yaml.safe_dump(manifest))
    complete_run(ref, dynshift_bin)
    (tmp_path / "vasp.log").unlink()

    def first_job_started(log: Path) -> None:
        deadline = time.monotonic() + 180
        while not read_log(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_log(tmp_path), log.read_text()
    stopped_run(stopped, dynshift_bin, "label", "label", first_job_started, term_to_ranks)
    ended = [fields for fields in read_log(tmp_path) if fields[0] == "end"]
    assert ended and all(fields[3] == "ok" for fields in ended)    # left to finish, not killed
    assert len(completed_runs(tmp_path)) < 8                           # stopped early
    with h5py.File(stopped / "run.h5", "r") as f:
        status = f["/label/p63mcm/status"][()]
    assert 0 < (status == 1).sum() < 8 and (status == 0).sum() > 0     # the rest still pending
    complete_run(stopped, dynshift_bin)
    assert max(completed_runs(tmp_path).values()) == 1 and len(completed_runs(tmp_path)) == 8
    a, b = store_rows(ref / "run.h5", "label"), store_rows(stopped / "run.h5", "label")
    for name in ("p63mcm/energy_ev", "p63mcm/forces_ev_a", "p63mcm/a_iso_mhz",
                 "p63mcm/shift_ppm", "p63mcm/status", "p63mcm/attempts"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_stoppable_program_is_ended_on_a_stop_request_and_others_run_on(tmp_path, handlers):
    """dp train is run stoppable: a request ends it (its checkpoint stays) within ~1 s; a DFT
    job is not stoppable and runs to its end."""
    import threading

    from engine.external import run_program

    def request_soon():
        time.sleep(0.5)
        stop._state["signal"] = "SIGTERM"

    threading.Thread(target=request_soon, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(stop.StopRequested, match="while sleep ran in"):
        run_program(["sleep", "30"], tmp_path, tmp_path / "log", stoppable=True)
    assert time.monotonic() - start < 5
    assert not stop._children                                  # untracked once ended
    # not stoppable: the request does not end it
    assert run_program(["sh", "-c", "sleep 1.5; exit 3"], tmp_path, tmp_path / "log") == 3

