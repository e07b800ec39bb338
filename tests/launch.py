"""Launching mpirun / dynshift from tests as a user would, in a clean MPI environment."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np

from engine import stop
from engine.external import launch_environment
from engine.lock import lock_path_of
from engine.store import store_damage


def launch_env() -> dict:
    """The environment for launching `mpirun` from a test process.

    A test process that initialised MPI itself (a singleton) carries OMPI_* / PMIX_* variables
    that would make a child mpirun think it runs inside a job: engine.external drops them
    (the one place that knows them), keeping configuration ones.
    """
    return launch_environment()


def run_command(args, timeout=300, cwd=None, **kwargs):
    """Run a command (e.g. `mpirun -n 2 dynshift run m.yaml`) with a clean MPI environment."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=launch_env(), **kwargs)




def session_pids(session: int) -> list[int]:
    """Processes of one session: mpirun and its ranks (Open MPI puts each rank in a process
    group of its own, so the session is what they share; DFT jobs start sessions of their own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:
                pids.append(int(entry.name))
    return pids


# ---- runs stopped by a signal (engine/stop.py) ----
def start_run(tmp_path: Path, dynshift_bin, tag: str):
    log = open(tmp_path / f"{tag}.log", "w")
    proc = subprocess.Popen(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                            env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    return proc, tmp_path / f"{tag}.log"


def wait_for(path: Path, text: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text()}")


def store_rows(store: Path, group: str) -> dict:
    """Every dataset under `group` of a store file, by path."""
    with h5py.File(store, "r") as f:
        out = {}
        f[group].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(
            o, h5py.Dataset) else None)
        return out


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def ref_and_stopped(tmp_path: Path, manifest: str) -> tuple[Path, Path]:
    """ref/ and stopped/, each with the manifest as m.yaml."""
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    for folder in (ref, stopped):
        folder.mkdir()
        (folder / "m.yaml").write_text(manifest)
    return ref, stopped


def complete_run(folder: Path, dynshift_bin) -> str:
    """`mpirun -n 2 dynshift run m.yaml` in `folder`, which must complete; its output."""
    done = run_command(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=folder,
                       timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def usr1_to_mpirun(proc) -> None:
    proc.send_signal(signal.SIGUSR1)              # Slurm's warning; Open MPI passes it on


def term_to_ranks(proc) -> None:
    for pid in session_pids(os.getpgid(proc.pid)):  # what srun delivers at the limit
        if pid != proc.pid:
            os.kill(pid, signal.SIGTERM)


def stopped_run(folder: Path, dynshift_bin, tag: str, stage: str, ready, send) -> str:
    """Start `mpirun -n 2 dynshift run m.yaml` in `folder`; once `ready(log)` returns, `send`
    the signal. The run must exit 75 within 60 s with its store unlocked, undamaged and the
    stage marked stopped (also in `dynshift show`). Returns the run's log and show's output."""
    proc, log = start_run(folder, dynshift_bin, tag)
    try:
        ready(log)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    sent = time.monotonic()
    send(proc)
    code = proc.wait(timeout=120)
    took = time.monotonic() - sent
    text = log.read_text()
    assert code == stop.EXIT_RESUME, text
    assert took < 60, f"{took:.1f} s to stop\n{text}"
    assert f"stage {stage}: stopped on SIG" in text and "resume with the same command" in text
    assert not lock_path_of(folder / "run.h5").exists()             # unlocked
    assert store_damage(folder / "run.h5") is None                   # undamaged
    with h5py.File(folder / "run.h5", "r") as f:
        assert f[f"stages/{stage}"].attrs["status"] == "stopped"
    shown = run_command([*dynshift_bin, "show", "run.h5"], cwd=folder)
    assert f"{stage:<10} stopped" in shown.stdout, shown.stdout
    return text + shown.stdout


def after(text: str, seconds: float):
    """A `ready` that waits for `text` in the log, then `seconds` more."""
    def ready(log: Path) -> None:
        wait_for(log, text)
        time.sleep(seconds)
    return ready
