"""The labelling machinery: which md frames to label, the labeller a label section configures,
and the loop that labels prepared tables over the ranks (claim files, retries, recovery of a
finished result, the failure budget). The label stage and the learn campaign both call it; the
tables themselves are :mod:`jobs.layouts.label`."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from engine.context import RankContext
from engine.failure import AgreedFailure
from engine.stages import StageResult
from engine import stop
from engine.store import RunStore
from jobs.labellers import LabelError, Labeller, make_labeller
from jobs.layouts.label import (
    GROUP as LABEL_ROOT,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_PENDING,
    SystemFrames,
    _FrameWriter,
    _load_table,
)
from schemas.base import duplicates

PROGRESS_EVERY_S = 60.0
"""Rank 0 reports its progress at most this often (frames are long DFT jobs)."""


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
        if stop.requested():  # a running DFT job has finished; take no new one
            break
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
    stopped = stop.agreed(ctx)  # collective: every rank has left its loop
    gathered = ctx.comm.allgather(outcomes)
    everything = [o for rank_outcomes in gathered for o in rank_outcomes]
    with store.transaction():  # counts and failures as attributes
        result = _finish(spec, ctx, store, all_frames, everything,
                         tuple(len(rank_outcomes) for rank_outcomes in gathered))
    if stopped is not None:  # the jobs done are recorded; the frames not taken stay pending
        raise stop.StopRequested(f"in label after {len(everything)} of {len(tasks)} frames",
                                 stopped)
    return result


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
