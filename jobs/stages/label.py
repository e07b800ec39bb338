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

from pathlib import Path

import numpy as np

from engine.context import RankContext
from engine.failure import InputError
from engine.stages import StageInputs
from engine.store import RunStore
from jobs.labelling import LabelResult, build_labeller, label_tables, select_frames
from jobs.layouts.label import GROUP as LABEL_ROOT, prepare_table
from jobs.layouts.md import md_replicas, md_trajectories

# ---- frame selection ----------------------------------------------------------------------




# ---- store layout -------------------------------------------------------------------------








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






# ---- labelling one frame ------------------------------------------------------------------












# ---- labelling tables ---------------------------------------------------------------------






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




