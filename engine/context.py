"""The rank context: a communicator that is passed in, this rank's place in it, its cores."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "TF_NUM_INTRAOP_THREADS", "DP_INTRA_OP_PARALLELISM_THREADS")
"""Environment variables that size a rank's thread pools (set before TF / numpy start them)."""


MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}
"""MPI settings dynshift runs with unless the environment sets them (read at MPI_Init).

Open MPI's ranks busy-poll while they wait; a dynshift rank runs more threads than it owns
cores (TensorFlow's compute thread and Horovod's background thread, which negotiates every
HOROVOD_CYCLE_TIME ms), so a polling thread takes the core from the compute thread. Yielding
when idle made 2-rank Horovod training 1.33x faster on the 2-core test machine (docs/nnmr.md)."""


def mpi_environment_defaults() -> None:
    """Put :data:`MPI_DEFAULTS` into the environment (a value already set wins); call it
    before mpi4py is imported (MPI_Init reads them)."""
    for name, value in MPI_DEFAULTS.items():
        os.environ.setdefault(name, value)


def cores_of_this_rank(local_size: int) -> int:
    """Cores this rank owns: its CPU binding if mpirun bound it, else the node's share."""
    affinity = len(os.sched_getaffinity(0))
    if affinity >= (os.cpu_count() or affinity):  # unbound: every rank sees the whole node
        return max(1, affinity // max(1, local_size))
    return max(1, affinity)


def limit_threads(cores: int) -> None:
    """Size every thread pool of this process to `cores` (no nested pools inside a rank)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(cores)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["DP_INTER_OP_PARALLELISM_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def keep_ase_rank_local() -> None:
    """Make ASE's file I/O local to each rank, for the whole process.

    With mpi4py imported, ASE's `ase.io.read` / `write` become collectives over COMM_WORLD
    (rank 0 reads, then broadcasts): ranks that each read their own file would hang or get
    another rank's data. dynshift shards work itself, so ASE must see a one-rank world.
    """
    import ase.parallel

    ase.parallel.world.comm = ase.parallel.DummyMPI()


@dataclass
class RankContext:
    """Where this rank stands: its communicator, rank, size, node-local rank and cores.

    Built from a communicator passed in (never a module-level COMM_WORLD), so any stage can run
    on a split communicator.
    """

    comm: object
    rank: int
    size: int
    local_rank: int
    local_size: int
    cores: int
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_comm(cls, comm, set_threads: bool = True) -> "RankContext":
        """Build the context; with `set_threads`, size this rank's thread pools to its cores."""
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()
        cores = cores_of_this_rank(local_size)
        keep_ase_rank_local()
        if set_threads:
            limit_threads(cores)
        return cls(comm, comm.Get_rank(), comm.Get_size(), local_rank, local_size, cores)

    @property
    def is_root(self) -> bool:
        """True on rank 0 of this context's communicator."""
        return self.rank == 0

    def block(self, n_items: int) -> range:
        """This rank's contiguous share of `n_items` (sizes differ by at most one)."""
        bounds = np.linspace(0, n_items, self.size + 1).round().astype(int)
        return range(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def round_robin(self, n_items: int) -> range:
        """Items rank, rank + size, ... (for few, long tasks such as MD replicas)."""
        return range(self.rank, n_items, self.size)

    def log(self, message: str) -> None:
        """Print a progress line from rank 0 only, stamped with the elapsed wall time."""
        if self.is_root:
            elapsed = time.monotonic() - self.started
            print(f"[dynshift {elapsed:8.1f}s] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Print a warning from this rank (any rank) to stderr."""
        print(f"dynshift: warning (rank {self.rank}): {message}", file=sys.stderr, flush=True)
