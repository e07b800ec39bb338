"""The rank context's process settings: thread pools, quiet native libraries."""
from __future__ import annotations

import os

import numpy as np
import pytest

from engine.context import (NATIVE_IMPORT_NOISE, QUIET_DEFAULTS, limit_threads,
                            quiet_environment, quiet_native_stderr)

NOISE = [  # as TensorFlow 2.21 / deepmd-kit 3.2 print them while they load
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796117913.705872    7583 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results",
    "DeePMD-kit: Successfully load libcudart.so.12",
]
KEPT = [  # warnings and errors pass, native or Python
    "W0000 00:00:1796117913.705872    7583 cpu_allocator_impl.cc:83] Allocation exceeds 10%",
    "E0000 00:00:1796117913.705872    7583 cuda_driver.cc:1] failed call to cuInit",
    "DeePMD-kit: Cannot find libcudart.so.12",
    "implib-gen: libcudart.so.12: failed to load library 'libcudart.so.12'",
    "a real warning I0000 in the middle of a line",
]


def test_quiet_native_stderr_drops_the_loaders_notices_only(capfd):
    with quiet_native_stderr():
        for line in [NOISE[0], KEPT[0], NOISE[1], *KEPT[1:4], NOISE[2], KEPT[4]]:
            os.write(2, (line + "\n").encode())  # C-level writes to file descriptor 2
    err = capfd.readouterr().err
    assert err.splitlines() == KEPT  # every kept line, in order, nothing else
    assert all(any(p.search(line) for p in NATIVE_IMPORT_NOISE) for line in NOISE)


def test_quiet_native_stderr_passes_lines_when_the_block_raises(capfd):
    with pytest.raises(ImportError, match="no such module"):
        with quiet_native_stderr():
            os.write(2, b"loader: missing symbol\n" + NOISE[2].encode() + b"\n")
            raise ImportError("no such module")
    assert capfd.readouterr().err == "loader: missing symbol\n"


def test_quiet_environment_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("DP_INFER_BATCH_SIZE", raising=False)
    quiet_environment()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert os.environ["DP_INFER_BATCH_SIZE"] == QUIET_DEFAULTS["DP_INFER_BATCH_SIZE"] == "1024"


def test_limit_threads_resizes_the_blas_pool_numpy_already_started(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded (it was, before any rank starts)
    before = threadpoolctl.threadpool_info()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "TF_NUM_INTRAOP_THREADS", "DP_INTRA_OP_PARALLELISM_THREADS",
                 "TF_NUM_INTEROP_THREADS", "DP_INTER_OP_PARALLELISM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    try:
        limit_threads(1)
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    finally:
        for pool in before:
            if pool["user_api"] == "blas":
                threadpoolctl.threadpool_limits(pool["num_threads"], user_api="blas")
