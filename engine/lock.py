"""One run per store: a lock file beside the store, taken by rank 0 before the store is opened.

HDF5's file locking is off (parallel file systems often lack POSIX locks) and fcntl/flock are
unreliable on NFS and Lustre, so the lock is a plain file, ``<store>.lock``, holding JSON
``{host, pid, pid_start, job_id, started_utc, token}``:

- it is made atomically: the JSON is written to a private file first, then hard-linked to the
  lock's name (``link`` fails when the name exists, on NFS too; the link count tells the truth
  when an NFS reply is lost); a file system without hard links gets ``O_CREAT | O_EXCL``;
- rank 0 refreshes the file's mtime every :data:`HEARTBEAT_S` seconds from a daemon thread;
- a lock whose holder ran on this host and whose pid is gone (or is another process now: its
  start time differs) is stale at once; a holder on another host is stale when its heartbeat
  is older than :data:`STALE_AFTER_S` (clocks of the nodes and the file server agree to a few
  seconds on any cluster that runs NTP);
- a stale lock is taken over race-free: a newcomer first creates, exclusively, a takeover file
  named after the stale lock's token (only one newcomer can), checks that the lock still holds
  that token, removes it and takes the lock the ordinary way; a taker that died mid-way leaves a
  takeover file that is itself judged stale by the same rules.

Released on a normal end and on every failure that unwinds the Python stack (an input error, a
single-rank failure); after MPI_Abort or kill -9 the lock is left behind, and the next run takes
it over without a manual step (one log line names the dead holder). Layout: docs/store.md.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HEARTBEAT_S = 5.0
"""Seconds between two refreshes of the lock file's mtime by the holder."""
STALE_AFTER_S = float(os.environ.get("DYNSHIFT_LOCK_STALE_S", "60"))
"""A lock held from another host whose heartbeat is older than this (s) is stale; environment
variable ``DYNSHIFT_LOCK_STALE_S`` (sites with a large clock skew between nodes may raise it)."""
SUSPECT_AFTER_S = 3 * HEARTBEAT_S
"""A holder on another host whose heartbeat is older than this (s) but not yet stale is
probably dead: a newcomer waits (at most until STALE_AFTER_S) instead of being refused."""
ORPHAN_GRACE_S = 60.0
"""A holder on this host whose launcher is gone (mpirun killed; its ranks end at their next
MPI call) is waited for this long (s) before a newcomer gives up; once its pid is gone the
lock is stale and taken over."""
UNREADABLE_GRACE_S = 10.0
"""A lock file that cannot be parsed (left half written by a taker killed on a file system
without hard links) is stale once its mtime is this old (s)."""
EXIT_STORE_HELD = 3
"""Exit status of a `dynshift run` refused because another live run holds the store (try
again later, or use another store); distinct from 2 (bad input) so a job script can tell."""

JOB_ID_VARIABLES = (("SLURM_JOB_ID", "slurm"), ("PBS_JOBID", "pbs"), ("LSB_JOBID", "lsf"),
                    ("JOB_ID", "sge"), ("COBALT_JOBID", "cobalt"), ("FLUX_JOB_ID", "flux"))
"""Environment variables that name the scheduler job a run belongs to (first found wins)."""

TAKEOVER_DEPTH = 3
"""Takeover files of takeover files followed at most (each level needs a dead taker)."""


class StoreHeld(Exception):
    """Another live run holds the store; the message names the store and the holder."""

    def __init__(self, store_path: Path, holder: "LockHolder | None", lock_path: Path,
                 detail: str = ""):
        self.store_path, self.holder, self.lock_path = store_path, holder, lock_path
        who = holder.describe() if holder is not None else "an unreadable lock file"
        super().__init__(
            f"store {store_path} is held by another dynshift run ({who}{detail}; lock file "
            f"{lock_path}); wait until it ends or give this run another store (--store PATH)")


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    pid_start: str | None
    job_id: str | None
    started_utc: str
    token: str
    launcher_pid: int | None = None
    """The holder's parent when it took the lock (mpirun, srun's step daemon, a shell)."""
    launcher_start: str | None = None

    @classmethod
    def of_this_process(cls) -> "LockHolder":
        """This process as a lock holder, with a fresh token."""
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   pid_start=_process_start(os.getpid()), job_id=scheduler_job_id(),
                   started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   token=uuid.uuid4().hex, launcher_pid=os.getppid(),
                   launcher_start=_process_start(os.getppid()))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LockHolder":
        doc = json.loads(text)
        return cls(host=str(doc["host"]), pid=int(doc["pid"]), pid_start=doc.get("pid_start"),
                   job_id=doc.get("job_id"), started_utc=str(doc["started_utc"]),
                   token=str(doc["token"]), launcher_pid=doc.get("launcher_pid"),
                   launcher_start=doc.get("launcher_start"))

    def describe(self) -> str:
        """'host h, pid p, slurm job 12, since 2025-01-01T10:00:00Z'."""
        job = f", {self.job_id}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.started_utc}"


def lock_path_of(store_path: str | Path) -> Path:
    """The lock file of a store: ``<store>.lock`` beside it."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".lock")


def scheduler_job_id() -> str | None:
    """'slurm job 1234' (or pbs, lsf, ...) when this process runs inside a scheduler job."""
    for variable, scheduler in JOB_ID_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return f"{scheduler} job {value}"
    return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _pid_alive(pid: int) -> bool:
    """True while process `pid` of this host runs (a zombie, killed but not reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@dataclass(frozen=True)
class Judgement:
    """A lock file judged: ``live``, ``suspect`` (another host, heartbeat late), ``orphaned``
    (this host, its launcher gone, its process still ending) or ``stale``."""

    verdict: str
    holder: LockHolder | None
    heartbeat_age_s: float
    why: str


def judge(lock_path: Path, stale_after_s: float = STALE_AFTER_S,
          suspect_after_s: float = SUSPECT_AFTER_S) -> Judgement | None:
    """Judge the lock file at `lock_path`; None when there is none."""
    try:
        stat = os.stat(lock_path)
        text = Path(lock_path).read_text()
    except FileNotFoundError:
        return None
    age_s = time.time() - stat.st_mtime
    try:
        holder = LockHolder.from_json(text)
    except (ValueError, KeyError, TypeError):
        if age_s > UNREADABLE_GRACE_S:
            return Judgement("stale", None, age_s, "unreadable lock file")
        return Judgement("suspect", None, age_s, "")  # being written: look again shortly
    if holder.host == socket.gethostname():
        if not _pid_alive(holder.pid):
            return Judgement("stale", holder, age_s, "its process is gone")
        if holder.pid_start is not None and _process_start(holder.pid) not in (
                None, holder.pid_start):
            return Judgement("stale", holder, age_s, "its pid belongs to another process now")
        if holder.launcher_pid is not None and (
                not _pid_alive(int(holder.launcher_pid)) or
                (holder.launcher_start is not None and
                 _process_start(int(holder.launcher_pid)) not in (None, holder.launcher_start))):
            # mpirun was killed (kill -9 of the launcher): its ranks live on for a moment,
            # each in a process group of its own, until their next MPI call fails
            return Judgement("orphaned", holder, age_s,
                             f"its launcher (pid {holder.launcher_pid}) is gone")
        return Judgement("live", holder, age_s, "")
    if age_s > stale_after_s:
        return Judgement("stale", holder, age_s, f"no heartbeat for {age_s:.0f} s")
    if age_s > suspect_after_s:
        return Judgement("suspect", holder, age_s, "")
    return Judgement("live", holder, age_s, "")


def _create_exclusive(path: Path, text: str) -> bool:
    """Create `path` holding `text` atomically unless it exists; True when this call made it."""
    private = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    with open(private, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        try:
            os.link(private, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report an error for a link that was made (lost reply): the count decides
            try:
                if os.stat(private).st_nlink == 2:
                    return True
            except OSError:
                pass
            if path.exists():
                return False
            return _create_exclusive_without_link(path, text)
    finally:
        try:
            os.unlink(private)
        except OSError:
            pass


def _create_exclusive_without_link(path: Path, text: str) -> bool:
    """O_CREAT | O_EXCL for file systems without hard links (a reader may see it half written:
    see UNREADABLE_GRACE_S)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _break_stale(lock_path: Path, judgement: Judgement, me: LockHolder,
                 stale_after_s: float = STALE_AFTER_S, depth: int = 0) -> bool:
    """Remove the stale lock `judgement` judged at `lock_path`, race-free between newcomers.

    Returns True when this call removed it, False when another newcomer is (or was) faster;
    either way the caller tries to take the lock again.
    """
    token = judgement.holder.token if judgement.holder is not None else "unreadable"
    takeover = lock_path.with_name(f"{lock_path.name}.takeover-{token}")
    if not _create_exclusive(takeover, me.to_json()):
        other = judge(takeover, stale_after_s)
        if other is None or other.verdict != "stale" or depth >= TAKEOVER_DEPTH:
            time.sleep(0.2)  # a live newcomer is taking it over right now
            return False
        _break_stale(takeover, other, me, stale_after_s, depth + 1)
        return False
    try:
        current = judge(lock_path, stale_after_s)
        same = current is not None and current.verdict == "stale" and (
            (current.holder is None and judgement.holder is None) or
            (current.holder is not None and judgement.holder is not None and
             current.holder.token == judgement.holder.token))
        if not same:
            return False  # it was taken over (or released) meanwhile
        os.unlink(lock_path)
        return True
    finally:
        try:
            os.unlink(takeover)
        except OSError:
            pass


class StoreLock:
    """The lock of one store, held by this process (rank 0 of a run) until `release`."""

    def __init__(self, store_path: Path, lock_path: Path, holder: LockHolder,
                 heartbeat_s: float):
        self.store_path, self.lock_path, self.holder = store_path, lock_path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,),
                                        name="dynshift-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, store_path: str | Path, log: Callable[[str], None] | None = None,
                heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                suspect_after_s: float = SUSPECT_AFTER_S) -> "StoreLock":
        """Take the lock of `store_path` or raise :class:`StoreHeld` naming its live holder.

        A stale lock is taken over (one line to `log` names the dead holder); a holder on
        another host whose heartbeat is late is waited for until it is stale or beats again.
        """
        store_path = Path(store_path).absolute()
        lock_path = lock_path_of(store_path)
        me = LockHolder.of_this_process()
        waited_note = False
        orphan_since = None
        while True:
            if _create_exclusive(lock_path, me.to_json()):
                return cls(store_path, lock_path, me, heartbeat_s)
            judgement = judge(lock_path, stale_after_s, suspect_after_s)
            if judgement is None:
                continue  # released meanwhile
            if judgement.verdict == "live":
                detail = (f", heartbeat {judgement.heartbeat_age_s:.0f} s ago"
                          if judgement.holder is not None and
                          judgement.holder.host != me.host else "")
                raise StoreHeld(store_path, judgement.holder, lock_path, detail)
            if judgement.verdict == "orphaned":
                waited = time.monotonic() - orphan_since if orphan_since else 0.0
                if orphan_since is None:
                    orphan_since = time.monotonic()
                    if log is not None:
                        log(f"the run holding {store_path} ({judgement.holder.describe()}) lost "
                            f"its launcher; waiting up to {ORPHAN_GRACE_S:.0f} s for it to end")
                elif waited > ORPHAN_GRACE_S:
                    raise StoreHeld(store_path, judgement.holder, lock_path,
                                    f"; {judgement.why} but it still runs after "
                                    f"{ORPHAN_GRACE_S:.0f} s")
                time.sleep(0.5)
                continue
            if judgement.verdict == "suspect":
                if log is not None and not waited_note and judgement.holder is not None:
                    log(f"the lock of {store_path} ({judgement.holder.describe()}) has had no "
                        f"heartbeat for {judgement.heartbeat_age_s:.0f} s; waiting up to "
                        f"{stale_after_s - judgement.heartbeat_age_s:.0f} s for it to go stale")
                    waited_note = True
                time.sleep(min(1.0, heartbeat_s))
                continue
            if _break_stale(lock_path, judgement, me, stale_after_s):
                if log is not None:
                    who = (judgement.holder.describe() if judgement.holder is not None
                           else "unknown holder")
                    log(f"took over the stale lock of {store_path} ({who}; {judgement.why})")

    def _beat(self, heartbeat_s: float) -> None:
        while not self._stop.wait(heartbeat_s):
            try:
                if LockHolder.from_json(self.lock_path.read_text()).token != self.holder.token:
                    return  # taken over (this run was judged dead): beat no other run's lock
                os.utime(self.lock_path)
            except (OSError, ValueError, KeyError):
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * HEARTBEAT_S)
        try:
            if LockHolder.from_json(self.lock_path.read_text()).token == self.holder.token:
                os.unlink(self.lock_path)
        except (OSError, ValueError, KeyError):
            pass

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
