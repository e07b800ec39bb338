"""Launching mpirun / dynshift from tests as a user would, in a clean MPI environment."""
from __future__ import annotations

import os
import subprocess

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


