"""The cooperative stop (engine/stop.py): a signal ends `mpirun -n 2 dynshift run` at a safe
point with status 75, an unlocked, undamaged store, and a rerun finishes with the numbers of an
uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import launch_env, run_command, session_pids

from engine import stop
from engine.lock import lock_path_of
from engine.store import store_damage

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
    with pytest.raises(stop.StopRequested, match="stopped on SIGUSR1 in md after"):
        stop.stop_point(None, "in md after round 3")


def _start(tmp_path: Path, dynshift_bin, tag: str):
    log = open(tmp_path / f"{tag}.log", "w")
    proc = subprocess.Popen(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                            env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    return proc, tmp_path / f"{tag}.log"


def _wait_for(path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text()}")


def _md_rows(store: Path) -> dict:
    with h5py.File(store, "r") as f:
        out = {}
        f["md"].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(
            o, h5py.Dataset) else None)
        return out


def _stopped_run(tmp_path, dynshift_bin, tag, send) -> float:
    proc, log = _start(tmp_path, dynshift_bin, tag)
    _wait_for(log, "md: 2 trajectories")
    time.sleep(3.0)                                  # some rounds in
    sent = time.monotonic()
    send(proc)
    code = proc.wait(timeout=90)
    took = time.monotonic() - sent
    text = log.read_text()
    assert code == stop.EXIT_RESUME, text
    assert "stage md: stopped on SIG" in text and "resume with the same command" in text
    assert not lock_path_of(tmp_path / "run.h5").exists()             # unlocked
    assert store_damage(tmp_path / "run.h5") is None                   # undamaged
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/md"].attrs["status"] == "stopped"
    shown = run_command([*dynshift_bin, "show", "run.h5"], cwd=tmp_path)
    assert "md         stopped" in shown.stdout and "frames per replica saved" in shown.stdout
    return took


def test_sigusr1_then_sigterm_stop_md_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, dynshift_bin):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    for folder in (ref, stopped):
        folder.mkdir()
        (folder / "m.yaml").write_text(MANIFEST)
    done = run_command(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=ref,
                       timeout=600)
    assert done.returncode == 0, done.stderr

    # 1. SIGUSR1 to mpirun (Slurm's warning; Open MPI passes it to every rank)
    took = _stopped_run(stopped, dynshift_bin, "first", lambda p: p.send_signal(signal.SIGUSR1))
    assert took < 60
    # 2. resumed, then SIGTERM to every rank (what srun delivers at the limit)
    def terminate_ranks(proc):
        for pid in session_pids(os.getpgid(proc.pid)):
            if pid != proc.pid:
                os.kill(pid, signal.SIGTERM)
    took = _stopped_run(stopped, dynshift_bin, "second", terminate_ranks)
    assert took < 60
    with h5py.File(stopped / "run.h5", "r") as f:
        saved_after_stops = f["stages/md"].attrs["stopped_at"]
    assert "frames per replica saved" in saved_after_stops
    # 3. the rerun completes with the uninterrupted run's numbers, bit for bit
    again = run_command(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=stopped,
                        timeout=600)
    assert again.returncode == 0, again.stderr
    a, b = _md_rows(ref / "run.h5"), _md_rows(stopped / "run.h5")
    assert a.keys() == b.keys() and a
    for name in a:
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
