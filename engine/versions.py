"""Versions: dynshift's own, and those of the packages a run's numbers depend on (recorded in
the store, compared by `dynshift show`)."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path


PACKAGES = ("dynshift", "numpy", "h5py", "mpi4py", "pydantic", "ase", "dscribe", "deepmd-kit",
            "tensorflow-cpu", "tensorflow", "keras", "horovod")


def package_versions() -> dict:
    """Versions of the packages a run's numbers depend on (recorded in the store)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def dynshift_version() -> str:
    """dynshift's version: the installed distribution's, else the one in setup.py."""
    try:
        return metadata.version("dynshift")
    except metadata.PackageNotFoundError:
        import re

        setup = Path(__file__).resolve().parents[1] / "setup.py"
        try:
            match = re.search(r"version\s*=\s*[\"']([^\"']+)", setup.read_text())
        except OSError:
            match = None
        return match.group(1) if match else "unknown"
