"""The label stage: sparse frames of the md trajectories, sharded over ranks, labelled by DFT
(VASP or GPAW: :mod:`jobs.labellers`).

Per system, the stage chooses frames from ``/md/<system>/<rNNN>`` (every k-th saved frame of each
replica, or N evenly spaced over all replicas), wraps them into the cell and pre-sizes every
dataset of ``/label/<system>`` (collective, once). The ranks take the frames still to do on
demand (an exclusive claim file per frame and run, so a rank with quick jobs takes more) and
label each with the configured labeller in its own work directory
``<work_dir>/<system>/r<replica>-f<frame>``, writing each result as soon as
it has it (independent writes of its own rows; status last), so a killed run loses at most the
jobs that were running. A failed attempt (non-zero exit, time-out, truncated or garbled OUTCAR,
unconverged SCF, ...) is kept in ``attempt-<n>-<reason>/`` and retried up to
``label.max_attempts``; a frame that fails them all is recorded with its reason and work dir.
The stage completes when the failed fraction is within ``label.failure_budget``.

A rerun labels only frames not yet done, and never launches a frame whose work directory
already holds a complete, valid result (a job that finished after its rank was killed): that
result is read instead. Layout of ``/label/<system>`` (n selected frames, m atoms):

=====================  =========  ======  ==============================================
dataset                shape      unit    what
=====================  =========  ======  ==============================================
replica, frame         (n,)               source replica number and saved-frame index
time_fs                (n,)       fs      simulation time of the source frame (NaN if none)
numbers                (m,)               atomic numbers
positions_a            (n, m, 3)  A       positions, wrapped into the cell
cell_a                 (n, 3, 3)  A       cell vectors (rows)
energy_ev              (n,)       eV      DFT free energy (NaN until done)
forces_ev_a            (n, m, 3)  eV/A    DFT forces
a_iso_mhz              (n, m)     MHz     Fermi-contact coupling A_tot of every atom
shift_ppm              (n, m)     ppm     A_iso -> shift (eq. 1) for the target species, NaN
                                          for the other atoms
magnetic_moment_s      (n,)               VASP's "Total magnetic moment S=" (A is per S)
status                 (n,)               0 pending, 1 done, -1 failed
attempts               (n,)               attempts made (a recovered result counts one)
last_error             (n,)               reason: detail of the last failed attempt
work_dir               (n,)               the frame's work directory
=====================  =========  ======  ==============================================

Attributes of ``/label/<system>``: selection, n_selected, n_done, n_failed, system,
target_species, replica_names, and ``failures`` (JSON list of {replica, frame, reason,
attempts, work_dir}).

The machinery is a library for frames that do not come from /md: :func:`prepare_table` lays
out a table of given frames at any group, :func:`label_tables` labels the tables (claims,
retries, recovery, the failure budget), :func:`labelled_frames_in` reads their done frames.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from engine.context import RankContext
from engine.stages import StageInputs, StageResult
from engine.failure import AgreedFailure, InputError
from engine.store import RunStore
from jobs.labellers import Labeller, LabelError, make_labeller
from jobs.md import md_trajectories
from schemas.base import duplicates

LABEL_ROOT = "/label"
"""The store group this stage owns (``/label/<system>``); read it with
:func:`labelled_frames`."""
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, -1
ERROR_BYTES, PATH_BYTES = 256, 512
PROGRESS_EVERY_S = 60.0
"""Rank 0 reports its progress at most this often (frames are long DFT jobs)."""
_REPLICA_NAME = re.compile(r"^r(\d+)$")
TABLE_ATTRS = ("prepared", "n_selected", "system", "target_species", "n_done", "n_failed",
               "failures")
"""Attributes of a label table that :func:`prepare_table` and :func:`label_tables` own."""


@dataclass(frozen=True)
class LabelResult(StageResult):
    """Counts of one label stage run (over all systems and ranks)."""

    n_selected: int
    """Frames chosen for labelling."""
    n_done: int
    """Frames labelled (in this run or before)."""
    n_failed: int
    """Frames that failed every attempt."""
    n_labelled_now: int
    """Frames labelled by a DFT run launched in this run."""
    n_recovered: int
    """Frames whose finished result was found in their work directory and read, not rerun."""
    n_failed_attempts: int
    """Failed attempts in this run (retried or not)."""
    frames_per_rank: tuple[int, ...] = ()
    """Frames each rank took in this run (ranks take frames on demand)."""

    def summary(self) -> dict:
        """The counts as a plain dict (the stage summary)."""
        summary = dict(self.__dict__)
        summary["frames_per_rank"] = list(self.frames_per_rank)
        return summary


@dataclass
class SystemFrames:
    """The frames of one label table (a system's selection), as every rank sees them at the
    start of :func:`label_tables`."""

    name: str
    group: str
    target_species: str
    replica: np.ndarray
    frame: np.ndarray
    numbers: np.ndarray
    status: np.ndarray
    attempts: np.ndarray
    last_error: list[str]
    work_dir: list[str]


# ---- frame selection ----------------------------------------------------------------------
def md_replicas(store: RunStore, system: str) -> list[tuple[int, str, int]]:
    """(replica number, replica name, saved frames) of every md replica of `system`.

    Raises
    ------
    InputError
        When the store has no md trajectories of `system`.
    """
    try:
        trajectories = md_trajectories(store, system)
    except InputError as exc:
        raise InputError(f"label: {exc}") from None
    return [(r.number, r.group.rsplit("/", 1)[1], r.n_saved) for r in trajectories.replicas]


def select_frames(spec, replicas: list[tuple[int, str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Choose frames: (replica numbers, saved-frame indices), replica by replica in order.

    Parameters
    ----------
    spec
        The label section (selection, n_frames, every_k, skip_saved).
    replicas
        (replica number, group name, saved frames) as from :func:`md_replicas`.

    Returns
    -------
    tuple of numpy.ndarray
        Replica numbers and frame indices of the chosen frames (int64).
    """
    candidates = [(replica, frame) for replica, _, n_saved in replicas
                  for frame in range(spec.skip_saved, n_saved)]
    if spec.selection == "every":
        chosen = [(r, f) for r, f in candidates if (f - spec.skip_saved) % spec.every_k == 0]
    else:
        n_chosen = min(spec.n_frames, len(candidates))
        picks = np.unique(np.linspace(0, len(candidates) - 1, n_chosen).round().astype(int)) \
            if n_chosen else []
        chosen = [candidates[i] for i in picks]
    replica = np.array([r for r, _ in chosen], dtype=np.int64)
    frame = np.array([f for _, f in chosen], dtype=np.int64)
    return replica, frame


# ---- store layout -------------------------------------------------------------------------
def _table_layout(n_frames: int, n_atoms: int) -> list[tuple]:
    """(name, shape, dtype, fill value, unit) of every dataset of a label table."""
    nan = float("nan")
    return [
        ("replica", (n_frames,), "i4", None, ""), ("frame", (n_frames,), "i8", None, ""),
        ("time_fs", (n_frames,), "f8", nan, "fs"), ("numbers", (n_atoms,), "i4", None, ""),
        ("positions_a", (n_frames, n_atoms, 3), "f8", nan, "A"),
        ("cell_a", (n_frames, 3, 3), "f8", nan, "A"),
        ("energy_ev", (n_frames,), "f8", nan, "eV"),
        ("forces_ev_a", (n_frames, n_atoms, 3), "f8", nan, "eV/A"),
        ("a_iso_mhz", (n_frames, n_atoms), "f8", nan, "MHz"),
        ("shift_ppm", (n_frames, n_atoms), "f8", nan, "ppm"),
        ("magnetic_moment_s", (n_frames,), "f8", nan, "mu_B"),
        ("status", (n_frames,), "i1", STATUS_PENDING, ""),
        ("attempts", (n_frames,), "i4", 0, ""),
        ("last_error", (n_frames,), f"S{ERROR_BYTES}", b"", ""),
        ("work_dir", (n_frames,), f"S{PATH_BYTES}", b"", ""),
    ]


def _table_problem(target_species: str, numbers: np.ndarray, replica: np.ndarray,
                   frame: np.ndarray, attrs: dict) -> str | None:
    """What is wrong with the arguments every rank gives :func:`prepare_table`, or None."""
    if numbers.ndim != 1 or not len(numbers):
        return f"numbers must be one atomic number per atom (got shape {numbers.shape})"
    if replica.ndim != 1 or replica.shape != frame.shape:
        return (f"replica and frame must be 1-D and of one length (got shapes {replica.shape} "
                f"and {frame.shape})")
    if not len(frame):
        return "no frames"
    if min(replica.min(), frame.min()) < 0:
        return "replica and frame numbers must be >= 0"
    repeated = duplicates(zip(replica.tolist(), frame.tolist()))
    if repeated:
        return f"every (replica, frame) once: they name the work dirs (got {repeated[:3]} twice)"
    if target_species not in atomic_numbers:
        return f"target_species {target_species!r} is not a chemical element"
    reserved = sorted(set(attrs) & set(TABLE_ATTRS))
    if reserved:
        return f"attrs {reserved} are the table's own"
    return None


def _root_problem(n_frames: int, n_atoms: int, positions_a, cells_a, time_fs) -> str | None:
    """What is wrong with the frame arrays rank 0 gives :func:`prepare_table`, or None."""
    shapes = {"positions_a": (np.shape(positions_a), (n_frames, n_atoms, 3)),
              "cells_a": (np.shape(cells_a), (n_frames, 3, 3))}
    if time_fs is not None:
        shapes["time_fs"] = (np.shape(time_fs), (n_frames,))
    for name, (shape, expected) in shapes.items():
        if tuple(shape) != expected:
            return f"{name} has shape {tuple(shape)}, expected {expected}"
    return None


def prepare_table(ctx: RankContext, store: RunStore, group: str, *, name: str,
                  target_species: str, numbers, positions_a, cells_a, replica, frame, time_fs,
                  attrs: dict | None = None) -> None:
    """Lay out a label table of given frames at `group` (collective, idempotent).

    Creates the datasets of a label table (see the module's layout: every label row NaN,
    status pending) and writes the frames, wrapped into their cells, from rank 0. A group that
    is already prepared is kept as it is (a resumed run labels the frames it chose first).

    Parameters
    ----------
    ctx
        The rank context (every rank calls this with the same `group`, `name`,
        `target_species`, `numbers`, `replica`, `frame` and `attrs`).
    store
        The run store.
    group
        Store group of the table, e.g. ``/label/<system>`` or a stage's own group.
    name
        The table's name (stored as the attribute ``system``): the folder of its frames' work
        directories under the work root, the ``system`` of its labelled frames and messages.
    target_species
        Element whose A_iso is turned into a shift (``shift_ppm``; NaN for other atoms).
    numbers
        Atomic numbers (m,), one composition and atom order for every frame.
    positions_a, cells_a
        Positions (n, m, 3) and cell vectors as rows (n, 3, 3) in A; read on rank 0 only
        (other ranks may pass None).
    replica, frame
        Source replica and frame number of each frame (n,), integers >= 0, each pair once:
        a frame's work directory is ``<work root>/<name>/r<replica:03d>-f<frame:06d>``.
    time_fs
        Simulation time of each frame (n,) in fs, or None (NaN); read on rank 0 only.
    attrs
        Further attributes of `group` (e.g. how the frames were chosen); not the table's own
        (:data:`TABLE_ATTRS`).

    Raises
    ------
    ValueError
        On every rank, for inconsistent arguments (shapes, repeated (replica, frame) pairs,
        an unknown element, no frames).
    """
    if store.attrs(group).get("prepared"):
        return
    attrs = dict(attrs or {})
    numbers = np.asarray(numbers, dtype=np.int32)
    replica, frame = np.asarray(replica, dtype=np.int64), np.asarray(frame, dtype=np.int64)
    problem = _table_problem(target_species, numbers, replica, frame, attrs)
    if problem is None:
        problem = ctx.comm.bcast(_root_problem(len(frame), len(numbers), positions_a, cells_a,
                                               time_fs) if ctx.is_root else None, root=0)
    if problem is not None:
        raise ValueError(f"label table {group}: {problem}")
    n_frames, n_atoms = len(frame), len(numbers)
    for key, shape, dtype, fill, unit in _table_layout(n_frames, n_atoms):
        store.create_dataset(f"{group}/{key}", shape, dtype=dtype, fill_value=fill, unit=unit)
    if ctx.is_root:
        positions = np.empty((n_frames, n_atoms, 3))
        cells = np.empty((n_frames, 3, 3))
        for row, (xyz, cell) in enumerate(zip(positions_a, cells_a)):
            atoms = Atoms(numbers=numbers, positions=xyz, cell=cell, pbc=True)
            atoms.wrap()
            positions[row], cells[row] = atoms.positions, np.asarray(atoms.cell)
        times = np.full(n_frames, np.nan) if time_fs is None else np.asarray(time_fs, float)
        for key, values in (("replica", replica), ("frame", frame), ("time_fs", times),
                            ("numbers", numbers), ("positions_a", positions),
                            ("cell_a", cells)):
            store.write_rows(f"{group}/{key}", 0, values)
    store.flush()
    store.set_attrs(group, prepared=True, n_selected=n_frames, system=name,
                    target_species=target_species, **attrs)
    store.flush()


def _prepare_system(spec, ctx: RankContext, store: RunStore, system) -> None:
    """Choose the frames of `system` and pre-size /label/<system> (collective, idempotent).

    A store that already holds a prepared selection keeps it (a resumed run labels the same
    frames; a warning when the manifest now asks another one); a new one is chosen from /md,
    read by rank 0 and laid out by :func:`prepare_table`.
    """
    group = f"{LABEL_ROOT}/{system.name}"
    stored = store.attrs(group)
    if stored.get("prepared"):
        asked = {"selection": spec.selection, "n_frames": spec.n_frames,
                 "every_k": spec.every_k, "skip_saved": spec.skip_saved}
        changed = {k: v for k, v in asked.items() if stored.get(k) != v}
        if changed and ctx.is_root:
            ctx.warn(f"label {system.name}: the store keeps its selection of "
                     f"{stored.get('n_selected')} frames; the manifest now asks {changed} "
                     f"(delete {group} from the store to choose again)")
        return
    replicas = md_replicas(store, system.name)
    names = {number: name for number, name, _ in replicas}
    replica, frame = select_frames(spec, replicas)
    n_frames = len(frame)
    if n_frames == 0:
        raise InputError(f"label: system '{system.name}' has no saved md frames after "
                         f"label.skip_saved = {spec.skip_saved}")
    trajectories = md_trajectories(store, system.name)
    numbers = np.asarray(trajectories.numbers, dtype=np.int32)
    positions = cells = times = None
    if ctx.is_root:
        positions = np.empty((n_frames, len(numbers), 3))
        cells = np.empty((n_frames, 3, 3))
        times = np.full(n_frames, np.nan)
        for number in np.unique(replica):
            rows = np.flatnonzero(replica == number)
            source = trajectories.replica(int(number))
            picks = frame[rows]
            positions[rows] = trajectories.positions_a(source, picks)
            cells[rows] = trajectories.cell_a(source, picks)
            times[rows] = trajectories.time_fs(source, picks)
    prepare_table(ctx, store, group, name=system.name, target_species=system.target_species,
                  numbers=numbers, positions_a=positions, cells_a=cells, replica=replica,
                  frame=frame, time_fs=times,
                  attrs={"selection": spec.selection, "every_k": spec.every_k,
                         "n_frames": spec.n_frames, "skip_saved": spec.skip_saved,
                         "replica_names": {str(k): v for k, v in names.items()}})


def _load_table(store: RunStore, group: str, name: str, target_species: str) -> SystemFrames:
    """The table at `group`, identical on every rank (collective: rank 0 reads it)."""
    if not store.attrs(group).get("prepared"):
        raise ValueError(f"label: {group} is not a prepared label table (prepare_table first)")
    table = {key: store.read_shared(f"{group}/{key}") for key in (
        "replica", "frame", "numbers", "status", "attempts", "last_error", "work_dir")}
    return SystemFrames(
        name=name, group=group, target_species=target_species,
        replica=table["replica"], frame=table["frame"], numbers=table["numbers"],
        status=table["status"], attempts=table["attempts"],
        last_error=[v.decode(errors="replace") for v in table["last_error"]],
        work_dir=[v.decode(errors="replace") for v in table["work_dir"]])


def _text_row(text: str, n_bytes: int) -> np.ndarray:
    return np.array([text.encode()[: n_bytes - 1]], dtype=f"S{n_bytes}")


# ---- labelling one frame ------------------------------------------------------------------
CLAIM_PREFIX = ".claim-"
"""A rank that takes a frame creates `<work dir>/.claim-<run id>` (atomic, exclusive)."""


def claim_frame(work_dir: Path, run_id: str) -> bool:
    """Take the frame of `work_dir` for this rank in run `run_id`; False if another rank has.

    The claim is an exclusive create of ``.claim-<run id>`` (atomic on POSIX and NFS v3+ file
    systems), so ranks take frames on demand, each exactly once per run; claims of earlier
    (dead) runs are removed.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(work_dir / f"{CLAIM_PREFIX}{run_id}",
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    for stale in work_dir.glob(f"{CLAIM_PREFIX}*"):
        if stale.name != f"{CLAIM_PREFIX}{run_id}":
            stale.unlink(missing_ok=True)
    return True


def _archive(work_dir: Path, name: str) -> None:
    """Move the files of `work_dir` (not its sub-folders or claims) into `work_dir/name`."""
    files = [p for p in work_dir.iterdir() if p.is_file()
             and not p.name.startswith(CLAIM_PREFIX)] if work_dir.is_dir() else []
    if not files:
        return
    target = work_dir / name
    suffix = 1
    while target.exists():
        suffix += 1
        target = work_dir / f"{name}.{suffix}"
    target.mkdir()
    for path in files:
        shutil.move(str(path), str(target / path.name))


class _FrameWriter:
    """Writes one rank's results into /label/<system>, row by row (independent writes)."""

    def __init__(self, store: RunStore, shift_spec):
        self.store, self.shift_spec = store, shift_spec

    def attempt(self, frames: SystemFrames, row: int, attempts: int, error: str) -> None:
        self.store.write_rows(f"{frames.group}/last_error", row, _text_row(error, ERROR_BYTES))
        self.store.write_rows(f"{frames.group}/attempts", row, [attempts])

    def work_dir(self, frames: SystemFrames, row: int, path: Path) -> None:
        self.store.write_rows(f"{frames.group}/work_dir", row, _text_row(str(path), PATH_BYTES))

    def done(self, frames: SystemFrames, row: int, labelled: Atoms, attempts: int) -> None:
        from jobs.frames import FERMI_CONTACT_KEY
        from jobs.shift import shift_ppm

        group, write = frames.group, self.store.write_rows
        a_iso = np.asarray(labelled.arrays[FERMI_CONTACT_KEY], dtype=float)
        target = frames.numbers == atomic_numbers[frames.target_species]
        shifts = np.where(target, shift_ppm(a_iso, self.shift_spec), np.nan)
        write(f"{group}/energy_ev", row, [labelled.get_potential_energy()])
        write(f"{group}/forces_ev_a", row, [labelled.get_forces()])
        write(f"{group}/a_iso_mhz", row, [a_iso])
        write(f"{group}/shift_ppm", row, [shifts])
        write(f"{group}/magnetic_moment_s", row,
              [labelled.info.get("magnetic_moment_s", np.nan)])
        write(f"{group}/attempts", row, [attempts])
        write(f"{group}/status", row, [STATUS_DONE])  # last: a row is done only when complete

    def failed(self, frames: SystemFrames, row: int) -> None:
        self.store.write_rows(f"{frames.group}/status", row, [STATUS_FAILED])


def _work_dir(work_root: Path, frames: SystemFrames, row: int) -> Path:
    """The work directory of one frame: <work_dir>/<system>/r<replica>-f<frame>."""
    replica, frame = int(frames.replica[row]), int(frames.frame[row])
    return work_root / frames.name / f"r{replica:03d}-f{frame:06d}"


def _label_one(labeller: Labeller, spec, frames: SystemFrames, row: int, atoms: Atoms,
               work_root: Path, writer: _FrameWriter, ctx: RankContext) -> dict:
    """Label one frame with retries; returns its outcome (status, attempts, counts)."""
    replica, frame = int(frames.replica[row]), int(frames.frame[row])
    key = f"{frames.name}/r{replica:03d}-f{frame:06d}"
    work_dir = _work_dir(work_root, frames, row)
    writer.work_dir(frames, row, work_dir)
    attempts = int(frames.attempts[row])
    error = frames.last_error[row]
    outcome = {"system": frames.name, "group": frames.group, "row": row,
               "work_dir": str(work_dir),
               "recovered": 0, "labelled": 0, "failed_attempts": 0}
    labelled = labeller.recover(atoms, work_dir)
    if labelled is not None:  # finished after its rank was killed: count that attempt
        attempts += 1
        outcome["recovered"] = 1
    else:
        _archive(work_dir, "interrupted")  # leftovers of a job killed with its rank
        while attempts < spec.max_attempts:
            attempts += 1
            try:
                labelled = labeller.label(atoms, work_dir, f"dynshift {key}")
                outcome["labelled"] = 1
                break
            except LabelError as exc:
                error = str(exc)
                outcome["failed_attempts"] += 1
                _archive(work_dir, f"attempt-{attempts}-{exc.reason}")
                writer.attempt(frames, row, attempts, error)
                ctx.warn(f"label {key}: attempt {attempts}/{spec.max_attempts} failed: "
                         f"{error[:200]}")
    if labelled is not None:
        writer.done(frames, row, labelled, attempts)
        status = STATUS_DONE
    else:
        writer.failed(frames, row)
        status = STATUS_FAILED
    outcome.update(status=status, attempts=attempts, error=error)
    return outcome


# ---- labelling tables ---------------------------------------------------------------------
def build_labeller(spec, ctx: RankContext, shift_spec, target_species) -> Labeller:
    """The labeller of `spec` for this rank, after warning (rank 0) when NGYROMAG and the shift
    conversion's gyromagnetic factor disagree for a target species.

    Parameters
    ----------
    spec
        The label section (schemas.label.LabelSpec).
    ctx
        The rank context (its cores and rank go into launch commands).
    shift_spec
        The A_iso -> shift conversion (schemas.shift.ShiftSpec).
    target_species
        The target species of the frames to label (iterable of element symbols).
    """
    gyromagnetic_factor = shift_spec.constants()["gyromagnetic_factor"]
    for target in sorted(set(target_species)):
        section = getattr(spec, spec.labeller, None)  # label.vasp / label.gpaw
        given = getattr(section, "ngyromag", {}).get(target)  # the model labeller has none
        if given is not None and given != gyromagnetic_factor and ctx.is_root:
            ctx.warn(f"label.{spec.labeller}.ngyromag[{target}] = {given:g} but "
                     f"shift.gyromagnetic_factor"
                     f" = {gyromagnetic_factor:g}: A_tot scales with NGYROMAG, so the shifts "
                     f"will be off by {given / gyromagnetic_factor:.4g}x")
    return make_labeller(spec, gyromagnetic_factor, ctx.cores, ctx.rank, shift_spec)


def label_tables(spec, ctx: RankContext, store: RunStore, tables, shift_spec, work_root: Path,
                 *, labeller: Labeller | None = None) -> LabelResult:
    """Label the frames still to do of prepared label tables, on every rank (collective).

    Ranks take frames on demand (an exclusive claim file per frame and run), recover a
    finished result found in a frame's work directory instead of relaunching it, retry failed
    attempts up to ``spec.max_attempts``, write each result as soon as they have it (status
    last) and agree on the counts; done frames are never labelled again.

    Parameters
    ----------
    spec
        The label section (schemas.label.LabelSpec): labeller, max_attempts, failure_budget.
    ctx
        The rank context (all ranks call this together).
    store
        The run store, holding the tables (:func:`prepare_table`; flushed by every rank).
    tables
        (group, name, target_species) of each table, labelled in this order; groups and names
        each once (a name is the folder of its frames' work directories).
    shift_spec
        The A_iso -> shift conversion (schemas.shift.ShiftSpec).
    work_root
        Root of the work directories: ``<work_root>/<name>/r<replica:03d>-f<frame:06d>``.
    labeller
        A labeller made by :func:`build_labeller` (default: one is built from `spec`).

    Returns
    -------
    LabelResult
        Counts over all tables and ranks (identical on every rank).

    Raises
    ------
    AgreedFailure
        When more than ``spec.failure_budget`` of the frames failed every attempt (after
        recording them in the tables' attributes).
    InputError
        When the labeller cannot label the tables' species (POTCARs, type map, program).
    ValueError
        For a table that is not prepared, or a repeated group or name.
    """
    tables = [(str(group), str(name), str(target)) for group, name, target in tables]
    for what, values in (("group", [t[0] for t in tables]), ("name", [t[1] for t in tables])):
        repeated = duplicates(values)
        if repeated:
            raise ValueError(f"label: every table's {what} once (got {repeated} twice)")
    ctx.comm.Barrier()  # rank 0's rows of tables prepared just before are on disk
    all_frames = [_load_table(store, *table) for table in tables]
    if labeller is None:
        labeller = build_labeller(spec, ctx, shift_spec, [t[2] for t in tables])
    species = sorted({str(s) for frames in all_frames
                      for s in Atoms(numbers=frames.numbers).get_chemical_symbols()})
    labeller.check(species)
    work_root = Path(work_root).resolve()
    tasks = [(index, row) for index, frames in enumerate(all_frames)
             for row in range(len(frames.status))
             if frames.status[row] == STATUS_PENDING
             or (frames.status[row] == STATUS_FAILED and frames.attempts[row] < spec.max_attempts)]
    for frames in all_frames:
        ctx.log(f"label {frames.name}: {len(frames.status)} frames selected, "
                f"{int(np.sum(frames.status == STATUS_DONE))} done before, "
                f"{int(np.sum(frames.status == STATUS_FAILED))} failed before")
    ctx.log(f"label: {len(tasks)} frames to label on {ctx.size} rank(s) with {labeller.name}")
    # Frames are taken on demand (a claim file per frame and run), so a rank whose DFT jobs
    # are quick takes more of them; each rank starts at its own place in the list.
    run_id = ctx.comm.bcast(uuid.uuid4().hex if ctx.is_root else None, root=0)
    start = ctx.block(len(tasks)).start
    order = tasks[start:] + tasks[:start]
    writer = _FrameWriter(store, shift_spec)
    last_log = time.monotonic()
    outcomes = []
    for index, row in order:
        frames = all_frames[index]
        group = frames.group
        if not claim_frame(_work_dir(work_root, frames, row), run_id):
            continue
        atoms = Atoms(numbers=frames.numbers, positions=store.read(f"{group}/positions_a", row),
                      cell=store.read(f"{group}/cell_a", row), pbc=True)
        outcomes.append(_label_one(labeller, spec, frames, row, atoms, work_root, writer, ctx))
        if time.monotonic() - last_log > PROGRESS_EVERY_S:  # rank 0 speaks for itself only
            last_log = time.monotonic()
            ctx.log(f"label: rank 0 has taken {len(outcomes)} of the {len(tasks)} frames, "
                    f"{sum(o['status'] == STATUS_DONE for o in outcomes)} done")
    gathered = ctx.comm.allgather(outcomes)
    everything = [o for rank_outcomes in gathered for o in rank_outcomes]
    with store.transaction():  # counts and failures as attributes
        return _finish(spec, ctx, store, all_frames, everything,
                       tuple(len(rank_outcomes) for rank_outcomes in gathered))


def _finish(spec, ctx: RankContext, store: RunStore, all_frames: list[SystemFrames],
            outcomes: list[dict], frames_per_rank: tuple[int, ...]) -> LabelResult:
    """Merge every rank's outcomes, record counts and failures (collective), check the budget."""
    by_group = {frames.group: frames for frames in all_frames}
    for outcome in outcomes:
        frames, row = by_group[outcome["group"]], outcome["row"]
        frames.status[row] = outcome["status"]
        frames.attempts[row] = outcome["attempts"]
        frames.last_error[row] = outcome["error"]
        frames.work_dir[row] = outcome["work_dir"]
    failures_all = []
    for frames in all_frames:
        failures = [{"replica": int(frames.replica[row]), "frame": int(frames.frame[row]),
                     "reason": frames.last_error[row], "attempts": int(frames.attempts[row]),
                     "work_dir": frames.work_dir[row]}
                    for row in np.flatnonzero(frames.status == STATUS_FAILED)]
        failures_all += [{"system": frames.name, **f} for f in failures]
        store.set_attrs(frames.group, n_done=int(np.sum(frames.status == STATUS_DONE)),
                        n_failed=len(failures), failures=failures)
    store.flush()
    result = LabelResult(
        n_selected=sum(len(f.status) for f in all_frames),
        n_done=sum(int(np.sum(f.status == STATUS_DONE)) for f in all_frames),
        n_failed=len(failures_all),
        n_labelled_now=sum(o["labelled"] for o in outcomes),
        n_recovered=sum(o["recovered"] for o in outcomes),
        n_failed_attempts=sum(o["failed_attempts"] for o in outcomes),
        frames_per_rank=frames_per_rank)
    ctx.log(f"label: {result.n_done}/{result.n_selected} frames done ({result.n_labelled_now} "
            f"labelled now, {result.n_recovered} recovered from work dirs), "
            f"{result.n_failed} failed, {result.n_failed_attempts} failed attempts")
    if result.n_failed > spec.failure_budget * result.n_selected:
        lines = [f"  {f['system']} r{f['replica']:03d} f{f['frame']:06d}: {f['reason'][:120]} "
                 f"({f['attempts']} attempts; {f['work_dir']})" for f in failures_all[:10]]
        more = len(failures_all) - len(lines)
        stage_tables = all(f.group == f"{LABEL_ROOT}/{f.name}" for f in all_frames)
        where = f"{LABEL_ROOT}/<system>" if stage_tables else ", ".join(by_group)
        raise AgreedFailure(
            f"label: {result.n_failed} of {result.n_selected} frames failed every attempt, "
            f"more than label.failure_budget = {spec.failure_budget:g} "
            f"({spec.failure_budget * result.n_selected:.4g} frames):\n" + "\n".join(lines)
            + (f"\n  ... and {more} more (see {where} attrs 'failures')" if more else "")
            + "\nFix the cause and rerun (labelled frames are kept); raise label.max_attempts "
              "to retry the failed frames.")
    return result


# ---- the stage ----------------------------------------------------------------------------
def label_frames(spec, ctx: RankContext, store: RunStore, systems, shift_spec) -> LabelResult:
    """Label this rank's shard of the selected frames with the configured labeller.

    Chooses and lays out the frames of every system from /md (:func:`prepare_table`, once),
    then labels them with :func:`label_tables` in ``spec.work_dir``.

    Parameters
    ----------
    spec
        The manifest's `label` section (schemas.label.LabelSpec).
    ctx
        The rank context (all ranks call this together).
    store
        The run store, holding /md/<system> trajectories.
    systems
        The manifest's systems (schemas.system.SystemSpec), labelled in this order.
    shift_spec
        The A_iso -> shift conversion (schemas.shift.ShiftSpec).

    Returns
    -------
    LabelResult
        Counts over all systems and ranks (identical on every rank).

    Raises
    ------
    RuntimeError
        When more than `failure_budget` of the selected frames failed every attempt (after
        recording them in the store).
    InputError
        For missing md trajectories, POTCARs or launch program.
    """
    labeller = build_labeller(spec, ctx, shift_spec, [s.target_species for s in systems])
    with store.transaction():  # the selection and the datasets of every system, at once
        store.set_attrs(LABEL_ROOT, systems=[s.name for s in systems], labeller=spec.labeller)
        for system in systems:
            _prepare_system(spec, ctx, store, system)
    ctx.comm.Barrier()
    tables = [(f"{LABEL_ROOT}/{s.name}", s.name, s.target_species) for s in systems]
    return label_tables(spec, ctx, store, tables, shift_spec, Path(spec.work_dir),
                        labeller=labeller)


def run(spec, inputs: StageInputs) -> LabelResult:
    """Stage entry: label the selected md frames of every system (spec: LabelSpec)."""
    return label_frames(spec, inputs.ctx, inputs.store, list(inputs.systems), inputs.shift)


# ---- reading labels back ------------------------------------------------------------------
def has_labels(store: RunStore) -> bool:
    """True when the store holds a label stage's results."""
    return store.exists(LABEL_ROOT)


def labelled_frames(store: RunStore, systems: list[str] | None = None) -> list[Atoms]:
    """The done frames of the label stage, in the form of :func:`jobs.frames.read_outcar`.

    Parameters
    ----------
    store
        A run store holding /label (any rank may call this; no communication).
    systems
        Names of the systems to read (default: every labelled system, in manifest order).

    Returns
    -------
    list of ase.Atoms
        As :func:`labelled_frames_in` gives them, ``info["system"]`` the system's name.
    """
    names = systems if systems is not None else store.attrs(LABEL_ROOT).get(
        "systems", store.keys(LABEL_ROOT))
    return labelled_frames_in(store, [f"{LABEL_ROOT}/{name}" for name in names])


def labelled_frames_in(store: RunStore, groups: list[str]) -> list[Atoms]:
    """The done frames of label tables at any groups, table by table, row by row.

    Parameters
    ----------
    store
        A run store (any rank may call this; no communication).
    groups
        Store groups of label tables (:func:`prepare_table`); a group without one is skipped.

    Returns
    -------
    list of ase.Atoms
        Per done frame: positions (A, wrapped), cell, pbc; energy (eV) and forces (eV/A) in a
        SinglePointCalculator; ``arrays["fermi_contact_mhz"]`` and ``arrays["shift_ppm"]``;
        ``info`` with source (``<store>:<group>#<row>``), system (the table's ``system``
        attribute, else the group's last path component), replica, frame, time_fs and
        magnetic_moment_s.
    """
    from jobs.frames import FERMI_CONTACT_KEY

    frames: list[Atoms] = []
    for group in groups:
        if not store.exists(f"{group}/status"):
            continue
        rows = np.flatnonzero(store.read(f"{group}/status") == STATUS_DONE)
        if not len(rows):
            continue
        name = store.attrs(group).get("system") or group.rstrip("/").rsplit("/", 1)[-1]
        numbers = store.read(f"{group}/numbers")
        data = {key: store.read(f"{group}/{key}")[rows] for key in (
            "replica", "frame", "time_fs", "positions_a", "cell_a", "energy_ev", "forces_ev_a",
            "a_iso_mhz", "shift_ppm", "magnetic_moment_s")}
        for i, row in enumerate(rows):
            atoms = Atoms(numbers=numbers, positions=data["positions_a"][i],
                          cell=data["cell_a"][i], pbc=True)
            atoms.arrays[FERMI_CONTACT_KEY] = data["a_iso_mhz"][i]
            atoms.arrays["shift_ppm"] = data["shift_ppm"][i]
            atoms.calc = SinglePointCalculator(atoms, energy=float(data["energy_ev"][i]),
                                               forces=data["forces_ev_a"][i])
            atoms.info.update(
                source=f"{store.path}:{group}#{row}", system=name,
                replica=int(data["replica"][i]), frame=int(data["frame"][i]),
                time_fs=float(data["time_fs"][i]),
                magnetic_moment_s=float(data["magnetic_moment_s"][i]))
            frames.append(atoms)
    return frames
