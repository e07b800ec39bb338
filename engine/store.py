"""The run store: one HDF5 file opened by all ranks with the mpio driver.

Every collective HDF5 operation (creating groups and datasets, attributes, resizing) lives in
this module, because every rank must make them in the same order with the same arguments.
Data writes (`write_rows`) are independent: a rank writes only its own rows.
Reads are independent too, but make the same metadata reads (opening groups, datasets,
attributes) on every rank: HDF5's metadata cache evicts collectively, so a rank that alone walks
many objects can leave the others waiting in the next collective call. Read everywhere, then
let rank 0 draw or print.
Layout: docs/store.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

# Parallel file systems (NFS, Lustre) often do not support the POSIX locks HDF5 takes.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402

STATUS_RUNNING, STATUS_COMPLETE = "running", "complete"


class RunStore:
    """The run store of one run; open it on every rank of `ctx` (collective)."""

    def __init__(self, path: str | Path, ctx=None, mode: str = "a"):
        self.path = Path(path)
        self.ctx = ctx
        kwargs = {"locking": False}
        if ctx is not None and ctx.size > 1:
            kwargs.update(driver="mpio", comm=ctx.comm)
        elif ctx is not None and h5py.get_config().mpi:
            kwargs.update(driver="mpio", comm=ctx.comm)
        try:
            self.file = h5py.File(self.path, mode, **kwargs)
        except TypeError:  # an HDF5 without the locking property: the environment variable rules
            kwargs.pop("locking")
            self.file = h5py.File(self.path, mode, **kwargs)

    # ---- life cycle --------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (collective)."""
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Push data and metadata to disk (collective); stages call it after each chunk."""
        self.file.flush()

    # ---- reading (any rank, no communication) -----------------------------------------
    def exists(self, name: str) -> bool:
        """True when group or dataset `name` exists."""
        return name in self.file

    def read(self, name: str, selection=()) -> np.ndarray:
        """Read a dataset (or a slice of it) into memory."""
        return self.file[name][selection]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of dataset `name`."""
        return self.file[name].shape

    def attrs(self, name: str = "/") -> dict:
        """Attributes of `name` as a plain dict (JSON-encoded ones decoded)."""
        if name not in self.file:
            return {}
        return {key: _decode(value) for key, value in self.file[name].attrs.items()}

    def keys(self, name: str = "/") -> list[str]:
        """Members of group `name` (empty when it does not exist)."""
        return list(self.file[name].keys()) if name in self.file else []

    def get_bytes(self, name: str) -> bytes:
        """A blob written by `put_bytes`."""
        return self.file[name][()].tobytes()

    def get_json(self, name: str):
        """A JSON document written by `put_json`."""
        return json.loads(self.get_bytes(name).decode())

    # ---- collective metadata ------------------------------------------------------------
    def require_group(self, name: str):
        """Create group `name` (and parents) if missing (collective)."""
        return self.file.require_group(name)

    def set_attrs(self, name: str, **attrs) -> None:
        """Set attributes on group or dataset `name`, creating the group if needed (collective).

        Non-scalar values (dicts, lists) are stored as JSON text.
        """
        attrs = self._agreed(attrs)
        target = self.file[name] if name in self.file else self.file.require_group(name)
        for key, value in attrs.items():
            target.attrs[key] = _encode(value)

    def create_dataset(self, name: str, shape, dtype="f8", maxshape=None, chunks=None,
                       fill_value=None, **attrs) -> h5py.Dataset:
        """Create dataset `name` unless it exists; same arguments on every rank (collective).

        An existing dataset is returned as it is (so a resumed stage reopens its own data).
        """
        if name in self.file:
            return self.file[name]
        attrs = self._agreed(attrs)
        dataset = self.file.create_dataset(name, shape=shape, dtype=dtype, maxshape=maxshape,
                                           chunks=chunks, fillvalue=fill_value)
        for key, value in attrs.items():
            dataset.attrs[key] = _encode(value)
        return dataset

    def resize(self, name: str, length: int, axis: int = 0) -> None:
        """Resize dataset `name` along `axis` (collective)."""
        self.file[name].resize(length, axis=axis)

    def delete(self, name: str) -> None:
        """Remove `name` if present (collective)."""
        if name in self.file:
            del self.file[name]

    def put(self, name: str, array, **attrs) -> None:
        """Write a whole array that every rank holds identically (collective; rank 0 writes).

        Replaces an existing dataset of that name.
        """
        array = np.asarray(array)
        attrs = self._agreed(attrs)
        self.delete(name)
        dataset = self.file.create_dataset(name, shape=array.shape, dtype=array.dtype)
        for key, value in attrs.items():
            dataset.attrs[key] = _encode(value)
        if self._writer and array.size:
            dataset[...] = array

    def put_bytes(self, name: str, blob: bytes, **attrs) -> None:
        """Store a blob (a model file, an archive) as a uint8 dataset (collective)."""
        self.put(name, np.frombuffer(blob, dtype=np.uint8), **attrs)

    def put_json(self, name: str, document, **attrs) -> None:
        """Store a JSON document as a blob (collective)."""
        self.put_bytes(name, json.dumps(document, sort_keys=True).encode(), **attrs)

    # ---- independent data writes -----------------------------------------------------------
    def write_rows(self, name: str, start: int, rows) -> None:
        """Write `rows` into dataset `name` at `start` along axis 0 (this rank only)."""
        rows = np.asarray(rows)
        if len(rows):
            self.file[name][start:start + len(rows)] = rows

    # ---- stage bookkeeping (collective) ---------------------------------------------------
    def stage_status(self, stage: str) -> str | None:
        """'running', 'complete' or None for a stage never started."""
        return self.attrs(f"/stages/{stage}").get("status")

    def mark_stage(self, stage: str, status: str, **attrs) -> None:
        """Record a stage's status and results (collective)."""
        self.set_attrs(f"/stages/{stage}", status=status, updated_utc=_utc_now(), **attrs)
        self.flush()

    def _agreed(self, attrs: dict) -> dict:
        """Rank 0's attribute values on every rank: a collective attribute write with values
        that differ between ranks (a wall time, a per-rank rate) corrupts the file."""
        if self.ctx is not None and self.ctx.size > 1 and attrs:
            return self.ctx.comm.bcast(attrs, root=0)
        return attrs

    @property
    def _writer(self) -> bool:
        return self.ctx is None or self.ctx.rank == 0


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _encode(value):
    if isinstance(value, (dict, list, tuple)) and not (
            isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float, np.number)) for v in value)):
        return "json:" + json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return "json:null"
    return value


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    if isinstance(value, np.generic):
        return value.item()
    return value
