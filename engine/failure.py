"""Error agreement: a failure on any rank ends every rank quickly, with one clear message.

A rank that raises cannot know whether its peers are waiting in a collective (where a gentle
"agree, then raise together" would hang), so the failing rank prints one message naming the
stage, the rank and the error, and calls MPI_Abort: mpirun then ends every rank within seconds.
Everything written before was flushed chunk by chunk and survives for a resume.
"""
from __future__ import annotations

import sys
import time
import traceback

EXIT_INPUT = 2
"""Exit status for bad input (manifest, frames, structures): the user must fix something."""
EXIT_FAILURE = 1
"""Exit status for any other failure."""


class InputError(Exception):
    """Bad input found while running (a missing or malformed file, an unknown species ...).

    The message must name what is wrong and where; the run exits with status 2.
    """


class AgreedFailure(RuntimeError):
    """A failure that every rank reaches together with the same message (after a collective,
    e.g. a failure budget exceeded): rank 0 alone reports it."""


def fail_all_ranks(comm, stage: str, exc: BaseException) -> None:
    """Print one message for `exc` raised in `stage` on this rank, then abort every rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if isinstance(exc, AgreedFailure) and rank != 0:
        time.sleep(10)  # rank 0 reports and aborts every rank; this is only a fallback
        comm.Abort(EXIT_FAILURE)
    code = EXIT_INPUT if isinstance(exc, InputError) else EXIT_FAILURE
    where = f"stage '{stage}'" + (f" on rank {rank} of {size}" if size > 1 else "")
    if code == EXIT_FAILURE and not isinstance(exc, AgreedFailure):
        traceback.print_exception(exc, file=sys.stderr)
    kind = "input error" if code == EXIT_INPUT else type(exc).__name__
    print(f"dynshift: {where} failed: {kind}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if size > 1:
        comm.Abort(code)
    sys.exit(code)
