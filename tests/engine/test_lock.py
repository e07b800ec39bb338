"""One run per store: the lock file (engine/lock.py), and two `dynshift run` on one store."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from launch import launch_env, session_pids
from launch import run_command as _run

from engine.lock import (EXIT_STORE_HELD, LockHolder, StoreHeld, StoreLock, judge,
                         lock_path_of)

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(store: Path, host: str, pid: int, age_s: float = 0.0, token: str = "t" * 32):
    path = lock_path_of(store)
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_start": None, "job_id": None,
                                "started_utc": "2025-01-02T03:04:05Z", "token": token}))
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
    return path


def test_a_live_holder_is_refused_with_store_host_pid_job_and_since(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    store = tmp_path / "run.h5"
    with StoreLock.acquire(store) as lock:
        assert lock.lock_path == tmp_path / "run.h5.lock"
        held = json.loads(lock.lock_path.read_text())
        assert held["pid"] == os.getpid() and held["job_id"] == "slurm job 4242"
        start = time.monotonic()
        with pytest.raises(StoreHeld) as refused:
            StoreLock.acquire(store)
        assert time.monotonic() - start < 1.0
        message = str(refused.value)
        assert f"store {store} is held by another dynshift run" in message
        assert (f"host {socket.gethostname()}, pid {os.getpid()}, slurm job 4242, "
                f"since {held['started_utc']}") in message
        assert str(lock.lock_path) in message
    assert not lock.lock_path.exists()  # released


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    store = tmp_path / "run.h5"
    pid = _dead_pid()
    _write_lock(store, socket.gethostname(), pid)  # fresh heartbeat, but its pid is gone
    lines = []
    start = time.monotonic()
    with StoreLock.acquire(store, log=lines.append) as lock:
        assert time.monotonic() - start < 1.0
        assert json.loads(lock.lock_path.read_text())["token"] == lock.holder.token
    assert len(lines) == 1
    assert f"took over the stale lock of {store}" in lines[0]
    assert f"host {socket.gethostname()}, pid {pid}" in lines[0] and "process is gone" in lines[0]


def test_a_reused_pid_is_no_holder(tmp_path):
    """The lock names our own pid but another start time: that process is not the holder."""
    store = tmp_path / "run.h5"
    path = lock_path_of(store)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "pid_start": "1", "job_id": None, "token": "x" * 32,
                                "started_utc": "2025-01-02T03:04:05Z"}))
    assert judge(path).verdict == "stale"
    assert judge(path).why == "its pid belongs to another process now"


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    store = tmp_path / "run.h5"
    _write_lock(store, "node-elsewhere", 1, age_s=2.0)
    with pytest.raises(StoreHeld) as refused:
        StoreLock.acquire(store, stale_after_s=60)
    assert "host node-elsewhere, pid 1, since 2025-01-02T03:04:05Z" in str(refused.value)
    assert "heartbeat 2 s ago" in str(refused.value)
    _write_lock(store, "node-elsewhere", 1, age_s=120.0)
    lines = []
    with StoreLock.acquire(store, log=lines.append, stale_after_s=60):
        pass
    assert "no heartbeat for 120 s" in lines[0] and "node-elsewhere" in lines[0]


def test_a_late_heartbeat_is_waited_for_until_stale(tmp_path):
    """Heartbeat 20 s old (suspect after 15 s), stale after 23 s: taken over after ~3 s."""
    store = tmp_path / "run.h5"
    _write_lock(store, "node-elsewhere", 7, age_s=20.0)
    lines = []
    start = time.monotonic()
    with StoreLock.acquire(store, log=lines.append, stale_after_s=23, suspect_after_s=15):
        elapsed = time.monotonic() - start
    assert 2.0 < elapsed < 6.0, elapsed
    assert "waiting up to 3 s" in lines[0] and "took over" in lines[1]


def test_the_heartbeat_refreshes_the_lock_and_stops_when_taken_over(tmp_path):
    store = tmp_path / "run.h5"
    lock = StoreLock.acquire(store, heartbeat_s=0.2)
    old = time.time() - 100
    os.utime(lock.lock_path, (old, old))
    time.sleep(0.7)
    assert time.time() - lock.lock_path.stat().st_mtime < 1.0
    _write_lock(store, "node-elsewhere", 1, age_s=100.0, token="o" * 32)  # someone took over
    time.sleep(0.7)
    assert time.time() - lock.lock_path.stat().st_mtime > 90  # not refreshed by us
    lock.release()
    assert lock.lock_path.exists()  # not ours: left alone


def test_an_unreadable_lock_is_waited_for_then_taken_over(tmp_path):
    store = tmp_path / "run.h5"
    path = lock_path_of(store)
    path.write_text('{"host": "no')  # half written by a taker that died
    assert judge(path).verdict == "suspect"  # may be being written: looked at again
    old = time.time() - 30
    os.utime(path, (old, old))
    lines = []
    with StoreLock.acquire(store, log=lines.append) as lock:
        assert json.loads(path.read_text())["token"] == lock.holder.token
    assert "unknown holder; unreadable lock file" in lines[0]


def test_a_dead_takers_takeover_file_does_not_block(tmp_path):
    store = tmp_path / "run.h5"
    path = lock_path_of(store)
    # a stale lock and a takeover file of its token, left by a taker that died on this host
    _write_lock(store, socket.gethostname(), _dead_pid(), token="d" * 32)
    takeover = path.with_name(f"{path.name}.takeover-{'d' * 32}")
    takeover.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                    "pid_start": None, "job_id": None, "token": "e" * 32,
                                    "started_utc": "2025-01-02T03:04:05Z"}))
    with StoreLock.acquire(store) as lock:
        assert json.loads(path.read_text())["token"] == lock.holder.token
    assert sorted(p.name for p in tmp_path.iterdir()) == []


RACER = """
import json, sys, time
from pathlib import Path
from engine.lock import StoreHeld, StoreLock
store, go, done = sys.argv[1:4]
while not Path(go).exists():
    time.sleep(0.001)
try:
    lock = StoreLock.acquire(store, stale_after_s=60)
except StoreHeld as exc:
    print(json.dumps({"won": False, "holder": exc.holder.pid}), flush=True)
    sys.exit(0)
print(json.dumps({"won": True, "holder": lock.holder.pid}), flush=True)
while not Path(done).exists():
    time.sleep(0.01)
lock.release()
"""


@pytest.mark.parametrize("stale", ["dead-pid", "old-heartbeat"])
def test_two_and_more_takers_of_a_stale_lock_exactly_one_wins(tmp_path, stale):
    store = tmp_path / "run.h5"
    for trial in range(3):
        if stale == "dead-pid":
            _write_lock(store, socket.gethostname(), _dead_pid(), token=f"{trial:032d}")
        else:
            _write_lock(store, "node-elsewhere", 1, age_s=300, token=f"{trial:032d}")
        go, done = tmp_path / f"go{trial}", tmp_path / f"done{trial}"
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(store), str(go), str(done)],
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
                  for _ in range(6)]
        time.sleep(1.0)  # every racer waits for the start
        go.touch()
        results = []
        for racer in racers:
            line = racer.stdout.readline()
            results.append(json.loads(line))
            if not results[-1]["won"]:
                racer.wait(timeout=30)
        winners = [r for r in results if r["won"]]
        assert len(winners) == 1, results
        assert {r["holder"] for r in results} == {winners[0]["holder"]}
        done.touch()
        for racer in racers:
            racer.wait(timeout=30)
        assert not lock_path_of(store).exists()


# ---- end to end: `dynshift run` under mpirun, as a user runs it -------------------------------
def _session_kill(process: subprocess.Popen) -> None:
    """SIGKILL every process of the session `process` leads (mpirun and its ranks: Open MPI
    puts each rank in a process group of its own, so the session is what they share)."""
    for pid in session_pids(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _wait_for(predicate, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_a_second_run_on_a_held_store_is_refused_and_the_first_finishes(tmp_path, dynshift_bin):
    (tmp_path / "m.yaml").write_text(
        "stages: [probe]\nstore: run.h5\nprobe: {others_wait_s: 20}\n")
    first = subprocess.Popen(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"],
                             cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: lock_path_of(tmp_path / "run.h5").exists(), 60)
    second = _run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                  timeout=60)
    # refused at once, not after waiting for the store: the first run still holds it (its
    # ranks sleep 20 s; a timed bound would measure the machine's load, not the refusal)
    first_still_running = first.poll() is None
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == EXIT_STORE_HELD, second.stderr
    assert first_still_running
    lines = [line for line in second.stderr.splitlines() if line.startswith("dynshift:")]
    assert len(lines) == 1 and "Traceback" not in second.stderr
    assert f"dynshift: store {tmp_path / 'run.h5'} is held by another dynshift run" in lines[0]
    assert f"host {socket.gethostname()}, pid " in lines[0] and ", since 20" in lines[0]
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/probe"].attrs["status"] == "complete"
        assert len(json.loads(f.attrs["invocations"][5:])) == 1  # the second never opened it
    assert not (tmp_path / "run.h5.lock").exists()


def test_after_kill_9_the_next_run_takes_over_the_stale_lock(tmp_path, dynshift_bin):
    (tmp_path / "m.yaml").write_text(
        "stages: [probe]\nstore: run.h5\nprobe: {others_wait_s: 60}\n")
    log = open(tmp_path / "first.out", "w")
    first = subprocess.Popen(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"],
                             cwd=tmp_path, env=launch_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(lambda: "stage probe: start" in (tmp_path / "first.out").read_text(), 60)
    holder = LockHolder.from_json((tmp_path / "run.h5.lock").read_text())
    _session_kill(first)
    log.close()
    (tmp_path / "m2.yaml").write_text("stages: [probe]\nstore: run.h5\n")
    start = time.monotonic()
    second = _run(["mpirun", "-n", "2", *dynshift_bin, "run", "m2.yaml"], cwd=tmp_path,
                  timeout=120)
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - start < 30
    assert (f"took over the stale lock of {tmp_path / 'run.h5'} (host {holder.host}, "
            f"pid {holder.pid}") in second.stdout
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/probe"].attrs["status"] == "complete"
        assert f["probe/cores"].shape == (2,)
    assert not (tmp_path / "run.h5.lock").exists()


def _orphan_lock(path, pid):
    import json
    import socket

    from engine.lock import lock_path_of

    lock = lock_path_of(path)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "pid_start": None,
                                "job_id": None, "started_utc": "2026-12-01T00:00:00Z",
                                "token": "t0", "launcher_pid": _dead_pid(),
                                "launcher_start": None}))
    return lock


def test_a_holder_whose_launcher_died_is_waited_for_then_taken_over(tmp_path):
    """kill -9 of mpirun: its rank 0 lives on a moment; the newcomer waits for it to end."""
    import subprocess

    from engine.lock import StoreLock, judge

    holder = subprocess.Popen(["sleep", "2"])
    lock = _orphan_lock(tmp_path / "s.h5", holder.pid)
    assert judge(lock).verdict == "orphaned"
    lines = []
    started = time.monotonic()
    taken = StoreLock.acquire(tmp_path / "s.h5", log=lines.append)
    waited = time.monotonic() - started
    try:
        assert 1.0 < waited < 10.0, waited
        assert "lost its launcher" in lines[0] and "took over the stale lock" in lines[-1]
    finally:
        taken.release()
        holder.wait()


def test_an_orphan_that_does_not_end_is_refused_after_the_grace(tmp_path, monkeypatch):
    import engine.lock as lock_module

    monkeypatch.setattr(lock_module, "ORPHAN_GRACE_S", 1.0)
    _orphan_lock(tmp_path / "s.h5", os.getpid())
    with pytest.raises(lock_module.StoreHeld, match="launcher .* is gone but it still runs"):
        lock_module.StoreLock.acquire(tmp_path / "s.h5")
