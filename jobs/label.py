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

Attributes of ``/label/<system>``: selection, n_selected, n_done, n_failed, target_species,
replica_names, and ``failures`` (JSON list of {replica, frame, reason, attempts, work_dir}).
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

LABEL_ROOT = "/label"
"""The store group this stage owns (``/label/<system>``); read it with
:func:`labelled_frames`."""
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, -1
ERROR_BYTES, PATH_BYTES = 256, 512
PROGRESS_EVERY_S = 60.0
"""Rank 0 reports its progress at most this often (frames are long DFT jobs)."""
_REPLICA_NAME = re.compile(r"^r(\d+)$")


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
    """The selected frames of one system, as every rank sees them at stage start."""

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
def _prepare_system(spec, ctx: RankContext, store: RunStore, system) -> None:
    """Choose the frames of `system` and pre-size /label/<system> (collective, idempotent).

    A store that already holds a prepared selection keeps it (a resumed run labels the same
    frames); a new one is chosen from /md and written by rank 0.
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
    n_atoms = len(numbers)
    nan = float("nan")
    layout = [  # name, shape, dtype, fill value, unit
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
    for name, shape, dtype, fill, unit in layout:
        store.create_dataset(f"{group}/{name}", shape, dtype=dtype, fill_value=fill, unit=unit)
    if ctx.is_root:
        positions = np.empty((n_frames, n_atoms, 3))
        cells = np.empty((n_frames, 3, 3))
        times = np.full(n_frames, nan)
        for number in np.unique(replica):
            rows = np.flatnonzero(replica == number)
            source = trajectories.replica(int(number))
            picks = frame[rows]
            raw_positions = trajectories.positions_a(source, picks)
            raw_cells = trajectories.cell_a(source, picks)
            times[rows] = trajectories.time_fs(source, picks)
            for row, xyz, cell in zip(rows, raw_positions, raw_cells):
                atoms = Atoms(numbers=numbers, positions=xyz, cell=cell, pbc=True)
                atoms.wrap()
                positions[row], cells[row] = atoms.positions, np.asarray(atoms.cell)
        for name, values in (("replica", replica), ("frame", frame), ("time_fs", times),
                             ("numbers", numbers), ("positions_a", positions),
                             ("cell_a", cells)):
            store.write_rows(f"{group}/{name}", 0, values)
    store.flush()
    store.set_attrs(group, prepared=True, n_selected=n_frames, selection=spec.selection,
                    every_k=spec.every_k, n_frames=spec.n_frames, skip_saved=spec.skip_saved,
                    target_species=system.target_species,
                    replica_names={str(k): v for k, v in names.items()})
    store.flush()


def _load_system(store: RunStore, system) -> SystemFrames:
    """The selection table, identical on every rank (collective: rank 0 reads it)."""
    group = f"{LABEL_ROOT}/{system.name}"
    table = {key: store.read_shared(f"{group}/{key}") for key in (
        "replica", "frame", "numbers", "status", "attempts", "last_error", "work_dir")}
    return SystemFrames(
        name=system.name, group=group, target_species=system.target_species,
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
    outcome = {"system": frames.name, "row": row, "work_dir": str(work_dir),
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


# ---- the stage ----------------------------------------------------------------------------
def label_frames(spec, ctx: RankContext, store: RunStore, systems, shift_spec) -> LabelResult:
    """Label this rank's shard of the selected frames with the configured labeller.

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
    gyromagnetic_factor = shift_spec.constants()["gyromagnetic_factor"]
    for target in sorted({s.target_species for s in systems}):
        section = getattr(spec, spec.labeller, None)  # label.vasp / label.gpaw
        given = getattr(section, "ngyromag", {}).get(target)  # the model labeller has none
        if given is not None and given != gyromagnetic_factor and ctx.is_root:
            ctx.warn(f"label.{spec.labeller}.ngyromag[{target}] = {given:g} but "
                     f"shift.gyromagnetic_factor"
                     f" = {gyromagnetic_factor:g}: A_tot scales with NGYROMAG, so the shifts "
                     f"will be off by {given / gyromagnetic_factor:.4g}x")
    labeller = make_labeller(spec, gyromagnetic_factor, ctx.cores, ctx.rank, shift_spec)
    with store.transaction():  # the selection and the datasets of every system, at once
        store.set_attrs(LABEL_ROOT, systems=[s.name for s in systems], labeller=spec.labeller)
        for system in systems:
            _prepare_system(spec, ctx, store, system)
    ctx.comm.Barrier()
    all_frames = [_load_system(store, system) for system in systems]
    species = sorted({str(s) for frames in all_frames
                      for s in Atoms(numbers=frames.numbers).get_chemical_symbols()})
    labeller.check(species)
    work_root = Path(spec.work_dir).resolve()
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
    by_name = {frames.name: frames for frames in all_frames}
    for outcome in outcomes:
        frames, row = by_name[outcome["system"]], outcome["row"]
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
        raise AgreedFailure(
            f"label: {result.n_failed} of {result.n_selected} frames failed every attempt, "
            f"more than label.failure_budget = {spec.failure_budget:g} "
            f"({spec.failure_budget * result.n_selected:.4g} frames):\n" + "\n".join(lines)
            + (f"\n  ... and {more} more (see /label/<system> attrs 'failures')" if more else "")
            + "\nFix the cause and rerun (labelled frames are kept); raise label.max_attempts "
              "to retry the failed frames.")
    return result


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
        Per done frame: positions (A, wrapped), cell, pbc; energy (eV) and forces (eV/A) in a
        SinglePointCalculator; ``arrays["fermi_contact_mhz"]`` and ``arrays["shift_ppm"]``;
        ``info`` with source, system, replica, frame, time_fs and magnetic_moment_s.
    """
    from jobs.frames import FERMI_CONTACT_KEY

    names = systems if systems is not None else store.attrs(LABEL_ROOT).get(
        "systems", store.keys(LABEL_ROOT))
    frames: list[Atoms] = []
    for name in names:
        group = f"{LABEL_ROOT}/{name}"
        if not store.exists(f"{group}/status"):
            continue
        rows = np.flatnonzero(store.read(f"{group}/status") == STATUS_DONE)
        if not len(rows):
            continue
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
