"""MPI suites: a test that fails on one rank must not leave the other ranks in a collective.

On more than one rank, a failure prints its report and aborts every rank (exit != 0) instead
of letting the others wait forever in the next collective call.
"""
from __future__ import annotations

import sys

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if comm.size > 1:
            print(f"\n[rank {comm.rank}] FAILED {item.nodeid}\n{report.longreprtext}",
                  file=sys.stderr, flush=True)
            comm.Abort(1)


@pytest.fixture
def shared_tmp(tmp_path_factory):
    """One temporary folder, the same on every rank (made on rank 0, broadcast)."""
    from pathlib import Path

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = str(tmp_path_factory.mktemp("mpi")) if comm.rank == 0 else None
    return Path(comm.bcast(path, root=0))
