"""Launching mpirun / dynshift from tests as a user would, in a clean MPI environment."""
from __future__ import annotations

import subprocess
from pathlib import Path

from engine.external import launch_environment


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
