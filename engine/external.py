"""External programs (VASP, deepmd-kit's `dp`, mpirun from tests): launched here, and only here.

A program is started from an argument list (never a shell string), in its own session so a
time-out ends its whole process group, with this process's environment less the variables an
MPI launcher gives its ranks: a DFT code or `dp train` started from a dynshift rank is its own
(MPI) job, not a member of dynshift's, and would otherwise try to join dynshift's PMIx job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

LAUNCHER_VARIABLES = (
    "PMIX_", "PMI_", "OPAL_", "ORTE_", "HYDRA_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_", "OMPI_FILE_LOCATION", "OMPI_APP_CTX", "OMPI_FIRST_RANKS",
    "OMPI_NUM_APP_CTX", "OMPI_UNIVERSE_SIZE", "OMPI_COMMAND", "OMPI_ARGV", "OMPI_NUMPROC",
    "OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_MCA_initial_wdir",
    "OMPI_MCA_shmem_RUNTIME", "OMPI_MCA_ras", "OMPI_MCA_rmaps_ppr", "OMPI_MCA_prte",
    "OMPI_LOCAL_", "OMPI_MCA_mpi_oversubscribe")
"""Prefixes of the variables an MPI launcher gives its ranks (Open MPI, PMIx, MPICH/Hydra).
Configuration a user sets (``OMPI_MCA_btl``, ``OMPI_ALLOW_RUN_AS_ROOT`` ...) is passed on."""


class ProgramTimeout(RuntimeError):
    """The program ran past its time limit; its process group was killed."""


def launch_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the MPI launcher's rank variables, plus `extra`."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(LAUNCHER_VARIABLES)}
    environment.update({str(k): str(v) for k, v in (extra or {}).items()})
    return environment


def run_program(command: Sequence[str], cwd: str | Path, log_path: str | Path,
                extra_env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                kill_grace_s: float = 10.0, stoppable: bool = False) -> int:
    """Run `command` in `cwd`, stdout and stderr appended to `log_path`; returns its exit status.

    Parameters
    ----------
    command
        Program and arguments (no shell).
    cwd
        Working directory.
    log_path
        File that receives the program's output (appended).
    extra_env
        Variables added to :func:`launch_environment`.
    timeout_s
        Wall-time limit; past it the process group gets SIGTERM, then SIGKILL after
        `kill_grace_s`, and :class:`ProgramTimeout` is raised.
    stoppable
        When this rank is asked to stop (:mod:`engine.stop`), end the program (SIGTERM, then
        SIGKILL after `kill_grace_s`) and raise :class:`engine.stop.StopRequested` (for long
        programs that keep a checkpoint, e.g. ``dp train``); otherwise the program runs to its
        end. Either way a forced exit of dynshift kills the program's process group first.

    Raises
    ------
    OSError
        When the program cannot be started (not found, not executable).
    ProgramTimeout
        Past `timeout_s`.
    engine.stop.StopRequested
        A stoppable program ended on a stop request.
    """
    from engine import stop

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(a) for a in command], cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=launch_environment(extra_env), start_new_session=True)
        stop.track(process)
        try:
            while True:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                step = left if not stoppable else min(STOP_POLL_S, left if left is not None
                                                      else STOP_POLL_S)
                try:
                    return process.wait(timeout=step)
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.monotonic() >= deadline:
                        end_process_group(process, kill_grace_s)
                        raise ProgramTimeout(f"{command[0]}: killed after {timeout_s:g} s") \
                            from None
                    if stoppable and stop.requested() is not None:
                        end_process_group(process, kill_grace_s)
                        raise stop.StopRequested(
                            f"while {Path(str(command[0])).name} ran in {cwd} (ended; its "
                            "checkpoint is kept)", stop.requested()) from None
        except BaseException:  # this rank is being stopped: take the program down with it
            end_process_group(process, 0.0)
            raise
        finally:
            stop.untrack(process)


STOP_POLL_S = 1.0
"""How often a stoppable program's wait looks at the stop flag (s)."""


def end_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group of `process`, SIGKILL it after `grace_s`, and reap it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers that left the leader
    except ProcessLookupError:
        pass
