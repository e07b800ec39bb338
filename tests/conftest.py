"""Shared test fixtures: paths to the shared real data and an MPI-ready environment."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "p2-nmmo"
for key, value in {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                   "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
                   "OMPI_MCA_rmaps_base_oversubscribe": "1",
                   "HDF5_USE_FILE_LOCKING": "FALSE", "TF_CPP_MIN_LOG_LEVEL": "2"}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data/p2-nmmo (real DFT frames and OUTCARs of the paper's dataset)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dynshift_bin() -> list[str]:
    """The dynshift console script of this environment, as an argument list."""
    exe = Path(sys.executable).parent / "dynshift"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]
