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
from jobs.frame_checks import MIN_DISTANCE_A
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






def read_given_frames(path: Path, min_distance_a: float) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """(numbers, positions (n, m, 3), cells (n, 3, 3)) of every frame of a structure file
    (``label.frames``), checked: readable by ASE, one composition and atom order, periodic
    cells of non-zero volume, finite positions, no two atoms too close (InputError naming the
    file and the frame)."""
    import ase.io

    from jobs.frame_checks import check_frames

    where = f"label.frames: {path}"
    try:
        frames = ase.io.read(path, ":")
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input, named
        raise InputError(f"{where}: ASE cannot read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise InputError(f"{where}: no frames")
    numbers = frames[0].numbers
    for index, atoms in enumerate(frames):
        if not np.array_equal(atoms.numbers, numbers):
            raise InputError(f"{where}: frame {index} has another composition or atom order "
                             f"({atoms.get_chemical_formula()}) than frame 0 "
                             f"({frames[0].get_chemical_formula()}); one table per file holds "
                             "one: split the file")
        volume = abs(float(np.linalg.det(atoms.cell.array)))
        if not all(atoms.pbc) or not np.isfinite(volume) or volume < 1e-6:
            raise InputError(f"{where}: frame {index} has no periodic 3-d cell (pbc "
                             f"{atoms.pbc.tolist()}, volume {volume:.3g} A^3): DFT labels "
                             "need one")
    positions = np.array([atoms.positions for atoms in frames])
    cells = np.array([atoms.cell.array for atoms in frames])
    check_frames(positions, cells, numbers, where, list(range(len(frames))), min_distance_a)
    return np.asarray(numbers, dtype=np.int32), positions, cells


def _prepare_file(ctx: RankContext, store: RunStore, name: str, path: Path,
                  target_species: str, min_distance_a: float) -> None:
    """Lay out /label/<name> with every frame of the structure file `path` (collective)."""
    group = f"{LABEL_ROOT}/{name}"
    if store.attrs(group).get("prepared"):
        return
    numbers, positions, cells = read_given_frames(path, min_distance_a)  # every rank reads
    n_frames = len(positions)
    prepare_table(ctx, store, group, name=name, target_species=target_species,
                  numbers=numbers, positions_a=positions, cells_a=cells,
                  replica=np.zeros(n_frames, dtype=int), frame=np.arange(n_frames),
                  time_fs=np.full(n_frames, np.nan),
                  attrs={"selection": "file", "source_file": str(path)})


def given_tables(spec, systems) -> list[tuple[str, Path]]:
    """(table name, file) of ``label.frames``: the file stems, which must be unique and not
    a system's name (InputError before any work)."""
    names = [Path(path).name.split(".")[0] or Path(path).name for path in spec.frames]
    taken = {s.name for s in systems}
    for name, path in zip(names, spec.frames):
        if names.count(name) > 1 or name in taken:
            raise InputError(f"label.frames: {path}: its table name {name!r} (the file's stem) "
                             "is used twice (another file or a system): rename the file")
    return list(zip(names, [Path(p) for p in spec.frames]))


# ---- labelling one frame ------------------------------------------------------------------












# ---- labelling tables ---------------------------------------------------------------------






# ---- the stage ----------------------------------------------------------------------------
def label_frames(spec, ctx: RankContext, store: RunStore, systems, shift_spec,
                 min_distance_a: float = MIN_DISTANCE_A) -> LabelResult:
    """Label this rank's shard of the selected frames with the configured labeller.

    Chooses and lays out the frames of every system from /md (:func:`prepare_table`, once),
    or every frame of each file of ``spec.frames`` (one table per file, checked before any
    job), then labels them with :func:`label_tables` in ``spec.work_dir``.

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
    if spec.frames:                             # given structures instead of md frames
        target = systems[0].target_species if systems else "Na"
        files = given_tables(spec, systems)
        with store.transaction():
            store.set_attrs(LABEL_ROOT, systems=[name for name, _ in files],
                            labeller=spec.labeller)
            for name, path in files:
                _prepare_file(ctx, store, name, path, target, min_distance_a)
        ctx.comm.Barrier()
        tables = [(f"{LABEL_ROOT}/{name}", name, target) for name, _ in files]
        return label_tables(spec, ctx, store, tables, shift_spec, Path(spec.work_dir),
                            labeller=labeller)
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
    min_distance_a = inputs.checks.min_distance_a if inputs.checks else MIN_DISTANCE_A
    return label_frames(spec, inputs.ctx, inputs.store, list(inputs.systems), inputs.shift,
                        min_distance_a)


# ---- reading labels back ------------------------------------------------------------------




