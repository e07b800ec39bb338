"""The rank context: a communicator that is passed in, this rank's place in it, its cores."""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
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
    """Size every thread pool of this process to `cores` (no nested pools inside a rank).

    The variables size the pools that start later (TensorFlow, deepmd-kit, numba, OpenMP);
    numpy's BLAS started its pool when numpy was imported (before this), so it is resized in
    place (threadpoolctl), else every rank would run as many BLAS threads as the node has cores.
    """
    for name in THREAD_VARIABLES:
        os.environ[name] = str(cores)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["DP_INTER_OP_PARALLELISM_THREADS"] = "1"
    quiet_environment()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # no resizing: the BLAS keeps its pool
        return
    threadpool_limits(limits=cores, user_api="blas")


# ---- quiet native libraries -------------------------------------------------------------------
QUIET_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "DP_INFER_BATCH_SIZE": "1024",
                  "NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING": "1"}
"""Environment that keeps TensorFlow and deepmd-kit from printing what is not a warning (a
value already set wins). Set in ``os.environ`` before the first TensorFlow import of the
process, so every subprocess inherits it too.

``TF_CPP_MIN_LOG_LEVEL=2``: TensorFlow's C++ INFO and WARNING lines off (its CPU-feature
notice). ``DP_INFER_BATCH_SIZE=1024``: deepmd-kit's inference batch (atoms), set to the value
it uses on a CPU anyway; unset, every DeepPot logs a hint to set it.
``NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING=1``: numba colours the messages of the typing errors
it catches while it compiles with colorama, whose exit handler then writes an ANSI reset
(``ESC[0m``) into the run's output."""

NATIVE_IMPORT_NOISE = (
    # absl (TensorFlow >= 2.16) logs before absl::InitializeLog regardless of
    # TF_CPP_MIN_LOG_LEVEL: its notice, and INFO lines such as oneDNN's "custom operations
    # are on" (tensorflow/core/util/port.cc); W/E/F lines pass
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^I\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.]+:\d+\] "),
    # deepmd-kit's CUDA runtime stub (source/lib/src/gpu/cudart/cudart_stub.cc) announces a
    # successful load of libcudart on std::cerr, unconditionally; a FAILED load passes
    re.compile(r"^DeePMD-kit: Successfully load libcudart"),
)
"""Lines that native libraries print while they load and that are no warnings; dropped from
the C-level stderr of :func:`quiet_native_stderr` blocks, every other line is kept."""


def quiet_environment() -> None:
    """Put :data:`QUIET_DEFAULTS` into the environment (a value already set wins)."""
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextmanager
def quiet_native_stderr(noise=NATIVE_IMPORT_NOISE):
    """Capture file descriptor 2 (C/C++ stderr too) for the block; on exit write every captured
    line to stderr again, except those matching a pattern of `noise`.

    For the imports that load native libraries (TensorFlow, deepmd-kit's op library), whose
    loaders print notices that no environment variable turns off. Python output of the block
    is captured and passed on the same way, in order.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not any(pattern.search(line) for pattern in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow():
    """Import TensorFlow quietly (:data:`QUIET_DEFAULTS` set first, the loaders' notices
    dropped by :func:`quiet_native_stderr`) and return the module. Call it before any import
    of tensorflow, keras or horovod.tensorflow."""
    if "tensorflow" not in sys.modules:
        quiet_environment()
        with quiet_native_stderr():
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]


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

    def on_root(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` computed on rank 0 and its result given to every rank
        (collective); an exception there is raised on every rank (the result is pickled)."""
        outcome = None
        if self.is_root:
            try:
                outcome = (function(*args, **kwargs), None)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                outcome = (None, exc)
        result, error = self.comm.bcast(outcome, root=0) if self.size > 1 else outcome
        if error is not None:
            raise error
        return result

    def log(self, message: str) -> None:
        """Print a progress line from rank 0 only, stamped with the elapsed wall time."""
        if self.is_root:
            elapsed = time.monotonic() - self.started
            print(f"[dynshift {elapsed:8.1f}s] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Print a warning from this rank (any rank) to stderr."""
        print(f"dynshift: warning (rank {self.rank}): {message}", file=sys.stderr, flush=True)
