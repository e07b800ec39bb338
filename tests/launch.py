"""Launching mpirun / dynshift from tests as a user would, in a clean MPI environment."""
from __future__ import annotations

import os
import subprocess

MPI_CONFIG = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "OMPI_MCA_")


def launch_env() -> dict:
    """The environment for launching `mpirun` from a test process.

    A test process that initialised MPI itself (a singleton) carries OMPI_* / PMIX_* variables
    that would make a child mpirun think it runs inside a job; keep only configuration ones.
    """
    return {k: v for k, v in os.environ.items()
            if not (k.startswith(("OMPI_", "PMIX_", "OPAL_", "ORTE_", "HYDRA_", "PMI_"))
                    and not k.startswith(MPI_CONFIG))}


def run_command(args, timeout=300, cwd=None, **kwargs):
    """Run a command (e.g. `mpirun -n 2 dynshift run m.yaml`) with a clean MPI environment."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=launch_env(), **kwargs)


