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
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# Parallel file systems (NFS, Lustre) often do not support the POSIX locks HDF5 takes.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402

from engine.failure import InputError  # noqa: E402

STATUS_RUNNING, STATUS_COMPLETE, STATUS_STOPPED = "running", "complete", "stopped"

CHECK_TIMEOUT_S = 600.0
"""Longest a damage check of a store may take (s); a check that takes longer counts as damage."""


class StoreDamaged(InputError):
    """A store that exists but cannot be read: truncated, overwritten, not HDF5.

    ``str(exc)`` is the one line a command prints after ``dynshift: ``; nothing was changed.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"store {path} is damaged: {reason}; nothing was changed")


def store_damage(path: str | Path, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Why the existing store at `path` cannot be used, or None when it reads (or is absent).

    Serial and read-only (no locking), in a child process: a corrupt file can crash HDF5 itself
    (a segmentation fault seen here), which must not take the command down with it. The child
    opens the file and walks its metadata (:func:`walk_store`). Call it on one rank and broadcast
    the verdict; it never creates or changes the file.
    """
    path = Path(path).absolute()
    if not path.exists():
        return None
    if not path.is_file():
        return "it is not a file"
    from engine.external import launch_environment

    env = launch_environment({"HDF5_USE_FILE_LOCKING": "FALSE"})  # not a member of our MPI job
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "engine.store", "--check", str(path)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=root)
    except subprocess.TimeoutExpired:
        return f"reading its metadata took over {timeout_s:.0f} s"
    if proc.returncode < 0:
        return f"reading its metadata crashed HDF5 (signal {-proc.returncode})"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"its check failed ({tail})"
    verdict = json.loads(lines[-1])
    return verdict.get("damage")


def snapshot_path_of(path: str | Path) -> Path:
    """The copy of a store taken before a metadata transaction: ``<store>.txn``."""
    path = Path(path)
    return path.with_name(path.name + ".txn")


def recover_interrupted(path: str | Path) -> str | None:
    """Finish what a run killed inside a :meth:`RunStore.transaction` left (rank 0, before the
    store is opened); a sentence for the log, or None when there was nothing to do.

    HDF5 has no crash-safe metadata update: a kill between the writes of one flush that creates
    groups, datasets or attributes can leave a file whose object headers and links disagree.
    Such updates run inside transactions, which first copy the flushed store to ``<store>.txn``.
    Found next to the store:

    - store readable: the transaction's writes reached the file or none did; the copy goes;
    - store damaged and the copy readable: the kill hit the transaction; the damaged file is
      kept as ``<store>.damaged-<UTC>`` and the copy takes its place (the stage that was
      running redoes what it did since, with the same numbers);
    - both damaged: nothing is changed (the caller names the store damaged).
    """
    path = Path(path)
    snapshot = snapshot_path_of(path)
    if not snapshot.exists():
        return None
    damage = store_damage(path) if path.exists() else "it is missing"
    if damage is None:
        snapshot.unlink()
        return None
    if store_damage(snapshot) is not None:
        return None
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if path.exists():
        os.replace(path, kept)
    os.replace(snapshot, path)
    return (f"store {path} was damaged by a run killed while it updated the store's structure "
            f"({damage}); restored the copy taken just before that update"
            + (f" (the damaged file is kept as {kept})" if kept.exists() else ""))


def check_store(path: str | Path) -> None:
    """Raise :class:`StoreDamaged` when the existing store at `path` cannot be read."""
    reason = store_damage(path)
    if reason is not None:
        raise StoreDamaged(path, reason)


def walk_store(path: str | Path) -> str | None:
    """Open `path` read-only and read all its metadata; the first failure in words, or None.

    Reads the root attributes, then visits every group and dataset (HDF5 reads their object
    headers), decodes every attribute (JSON ones parsed), and reads the first and last element
    of every dataset (which walks a chunked dataset's index). Raw data is not checksummed by
    HDF5, so bytes overwritten inside a dataset's values go unseen.
    """
    where = "opening it"
    try:
        with h5py.File(path, "r", locking=False) as f:
            where = "reading the root attributes"
            for value in f.attrs.values():
                _decode(value)
            where = "reading /stages"
            for name in (f["stages"].keys() if "stages" in f else ()):
                where = f"reading /stages/{name}"
                for value in f["stages"][name].attrs.values():
                    _decode(value)
            where = "walking its groups and datasets"

            def visit(name, obj):
                nonlocal where
                where = f"reading /{name}"
                for value in obj.attrs.values():
                    _decode(value)
                if isinstance(obj, h5py.Dataset) and obj.shape and obj.size:
                    obj[(0,) * len(obj.shape)]
                    obj[tuple(n - 1 for n in obj.shape)]

            f.visititems(visit)
    except Exception as exc:  # noqa: BLE001 - any failure to read is damage, in words
        text = " ".join(str(exc).split()) or type(exc).__name__
        if where == "opening it" and "file signature not found" in text:
            return "it is not an HDF5 file"
        return f"{where}: {text}"
    return None


class RunStore:
    """The run store of one run; open it on every rank of `ctx` (collective)."""

    def __init__(self, path: str | Path, ctx=None, mode: str = "a"):
        self.path = Path(path)
        self.ctx = ctx
        self._transactions = 0
        creating = None
        if mode == "a":  # never create anew over an existing file (h5py's "a" may)
            exists = self.path.exists() if ctx is None or ctx.is_root else None
            if ctx is not None and ctx.size > 1:
                exists = ctx.comm.bcast(exists, root=0)
            mode = "r+" if exists else "w-"
            if not exists:  # made under a private name, renamed once it is a valid file
                creating = self.path.with_name(f"{self.path.name}.new-{os.getpid()}")
                if ctx is not None and ctx.size > 1:
                    creating = ctx.comm.bcast(creating, root=0)
        kwargs = {"locking": False}
        if ctx is not None and ctx.size > 1:
            kwargs.update(driver="mpio", comm=ctx.comm)
        elif ctx is not None and h5py.get_config().mpi:
            kwargs.update(driver="mpio", comm=ctx.comm)
        target = creating if creating is not None else self.path
        try:
            self.file = h5py.File(target, mode, **kwargs)
        except TypeError:  # an HDF5 without the locking property: the environment variable rules
            kwargs.pop("locking")
            self.file = h5py.File(target, mode, **kwargs)
        if creating is not None:
            self._publish(creating)

    def _publish(self, creating: Path) -> None:
        """Give a new store its name once its superblock is on disk (collective): a run killed
        while creating it leaves ``<store>.new-<pid>``, never a half-made store of that name."""
        self.file.flush()
        if self.ctx is not None and self.ctx.size > 1:
            self.ctx.comm.Barrier()
        error = None
        if self._writer:
            try:
                os.link(creating, self.path)  # fails if another process made the store meanwhile
                os.unlink(creating)
            except FileExistsError:
                error = f"{self.path} was created by another process meanwhile"
            except OSError:  # a file system without hard links
                os.replace(creating, self.path)
        if self.ctx is not None and self.ctx.size > 1:
            error = self.ctx.comm.bcast(error, root=0)
        if error is not None:
            self.file.close()
            if self._writer:
                os.unlink(creating)
            raise FileExistsError(error)

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

    @contextmanager
    def transaction(self):
        """A block that changes the store's structure (creates groups, datasets, attributes),
        made crash-safe: the flushed store is first copied to ``<store>.txn`` (rank 0, written
        under a private name and renamed, so the copy is whole or absent), the block runs, the
        store is flushed and the copy removed (collective; nested blocks join the outer one).
        A run killed inside leaves the copy; :func:`recover_interrupted` restores it when the
        store is damaged. Raw row writes between flushes need none (HDF5 allocates a parallel
        file's chunks when a dataset is created, so they change no metadata).
        """
        if self._transactions:
            self._transactions += 1
            try:
                yield
            finally:
                self._transactions -= 1
            return
        snapshot = snapshot_path_of(self.path)
        self.file.flush()
        self._barrier()
        if self._writer:
            private = snapshot.with_name(f"{snapshot.name}.{os.getpid()}.tmp")
            shutil.copyfile(self.path, private)
            with open(private, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(private, snapshot)
        self._barrier()
        self._transactions = 1
        try:
            yield
            self.file.flush()
            self._barrier()
        finally:
            self._transactions = 0
        if self._writer and snapshot.exists():
            snapshot.unlink()

    def _barrier(self) -> None:
        if self.ctx is not None and self.ctx.size > 1:
            self.ctx.comm.Barrier()

    # ---- reading (any rank, no communication) -----------------------------------------
    def exists(self, name: str) -> bool:
        """True when group or dataset `name` exists."""
        return name in self.file

    def read(self, name: str, selection=()) -> np.ndarray:
        """Read a dataset (or a slice of it) into memory."""
        return self.file[name][selection]

    def read_shared(self, name: str, selection=()) -> np.ndarray:
        """Read a dataset (or a slice) that every rank must see identically (collective): rank 0
        reads, every rank gets its copy. For rows other ranks wrote (done flags, statuses, resume
        counters) that steer control flow or are written back as attributes: independent reads
        of them by each rank may disagree after a resume (a rank that reads a stale copy takes
        another number of rounds, and the next collective hangs; seen at 3 ranks in CI)."""
        if self.ctx is None or self.ctx.size == 1:
            return self.read(name, selection)
        value = self.read(name, selection) if self.ctx.rank == 0 else None
        return self.ctx.comm.bcast(value, root=0)

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

    def stage_statuses(self) -> dict:
        """Stage name -> its recorded status, for every stage the store records."""
        if not self.exists("/stages"):
            return {}
        return {name: self.attrs(f"/stages/{name}").get("status")
                for name in self.keys("/stages")}

    def stage_summary(self, stage: str) -> dict:
        """The summary a completed stage recorded (its StageResult.summary()), or {}."""
        summary = self.attrs(f"/stages/{stage}").get("summary", {}) if self.exists(
            f"/stages/{stage}") else {}
        if isinstance(summary, (bytes, str)):
            import json

            summary = json.loads(summary)
        return dict(summary) if isinstance(summary, dict) else {}

    def mark_stage(self, stage: str, status: str, **attrs) -> None:
        """Record a stage's status and results (collective, a transaction)."""
        with self.transaction():
            self.set_attrs(f"/stages/{stage}", status=status, updated_utc=_utc_now(), **attrs)

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


if __name__ == "__main__":  # the child process of `store_damage`
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        print(json.dumps({"damage": walk_store(sys.argv[2])}))
        sys.exit(0)
    print("usage: python -m engine.store --check STORE", file=sys.stderr)
    sys.exit(2)
