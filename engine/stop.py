"""A cooperative stop: the run ends cleanly at a wall-time limit and says "resume me".

Slurm sends SIGTERM at the limit (then SIGKILL after the site's KillWait) and, with
``--signal=B:USR1@<seconds>``, SIGUSR1 that long before. :func:`install` makes SIGTERM, SIGUSR1
and SIGINT only set a flag. The stages look at it at safe points, where no collective is half
done, and the ranks agree on it there by one small collective (:func:`stop_point`):

- md: after each round of chunks (every replica's rows flushed);
- infer: after each round of chunks;
- label: before each DFT job a rank takes (a running job finishes); the ranks agree where
  they gather their outcomes, which are written first;
- learn: between its phases.

A stop raises :class:`StopRequested` on every rank together: the driver records the stage as
``stopped`` (with where), the store is flushed, the lock released, and the run exits with
:data:`EXIT_RESUME` (75, EX_TEMPFAIL: "stopped early, resume me"). Rerunning the same manifest
on the same store resumes and finishes with the numbers of an uninterrupted run.

A second signal, or ``stop_grace_s`` seconds after the first without reaching a safe point,
forces the exit (status 75 too): the store is as safe as after a kill (engine/store.py), the
work since the last flushed chunk is lost.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_RESUME = 75
"""Exit status of a run that stopped early on a signal and can be resumed (EX_TEMPFAIL)."""
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
"""The signals that ask for a stop."""
DEFAULT_GRACE_S = 120.0
"""Seconds from the first signal to a forced exit when no safe point is reached (Slurm's
``--signal=B:USR1@300`` leaves 300 s before the limit)."""

_state = {"signal": None, "at": None, "grace_s": DEFAULT_GRACE_S, "installed": False}
_children: set = set()
"""Running external programs (subprocess.Popen, each in its own session) of this rank."""


def track(process) -> None:
    """Register a running external program: a forced exit kills its process group."""
    _children.add(process)


def untrack(process) -> None:
    """Forget a program that has ended."""
    _children.discard(process)


class StopRequested(Exception):
    """Every rank stops here together: a signal asked for it (:func:`stop_point`)."""

    def __init__(self, where: str, signal_name: str | None):
        self.where, self.signal_name = where, signal_name
        super().__init__(f"stopped on {signal_name or 'request'} {where}")

    def __reduce__(self):
        """Picklable with its two arguments (ranks gather their outcomes, stops included)."""
        return type(self), (self.where, self.signal_name)


def _force_exit(reason: str) -> None:
    for process in list(_children):  # DFT jobs, dp train: do not leave them running
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    print(f"dynshift: {reason}; exiting now (status {EXIT_RESUME}): the store is as after a "
          "kill, work since the last flushed chunk is lost; rerun to resume", file=sys.stderr,
          flush=True)
    os._exit(EXIT_RESUME)


def _handler(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if _state["signal"] is not None:
        _force_exit(f"second signal ({name})")
    _state["signal"], _state["at"] = name, time.monotonic()
    print(f"dynshift: {name} received: stopping at the next safe point (a second signal or "
          f"{_state['grace_s']:g} s force the exit)", file=sys.stderr, flush=True)
    grace = _state["grace_s"]
    if grace is not None and grace > 0:
        timer = threading.Timer(grace, _force_exit, args=(f"no safe point within {grace:g} s "
                                                          f"of {name}",))
        timer.daemon = True
        timer.start()


def install(grace_s: float | None = DEFAULT_GRACE_S) -> None:
    """Make SIGTERM, SIGUSR1 and SIGINT request a stop (main thread only; idempotent)."""
    _state["grace_s"] = grace_s
    if threading.current_thread() is not threading.main_thread():
        return
    for name in SIGNALS:
        signal.signal(getattr(signal, name), _handler)
    _state["installed"] = True


def requested() -> str | None:
    """The name of the signal that asked this rank to stop, or None (local, no communication)."""
    return _state["signal"]


def reset() -> None:
    """Forget a request (tests)."""
    _state["signal"] = _state["at"] = None


def agreed(ctx) -> str | None:
    """Whether any rank was asked to stop (collective: one small allreduce); the signal's name
    or None, the same on every rank."""
    mine = requested()
    if ctx is None or ctx.size == 1:
        return mine
    names = ctx.comm.allgather(mine)
    return next((n for n in names if n is not None), None)


def stop_point(ctx, where: str) -> None:
    """A safe point (collective: every rank calls it at the same place): raise
    :class:`StopRequested` on every rank when any was asked to stop."""
    name = agreed(ctx)
    if name is not None:
        raise StopRequested(where, name)
