"""The infer stage: the shift (ppm) of every target nucleus in every dense frame.

Frames come from the md stage's trajectories in the store (``/md/<system>/<rNNN>``) or from an
ASE-readable trajectory file per system (``infer.trajectories``, which takes precedence). The
global frame list of a system is cut into chunks of ``infer.chunk_frames`` frames; the chunks
not yet done are shared over the ranks in contiguous blocks (``ctx.block``); each rank reads a
chunk, wraps it into the cell, computes the SOAP vectors of the target nuclei and predicts
their shifts with the NN-NMR fold ensemble (or takes the DFT shifts of a labelled file), and
writes its rows. Memory per rank depends on the chunk size only.

Resume: ``/infer/<system>/chunk_done`` marks every chunk written (flushed after each chunk);
a resumed run recomputes only the chunks not marked. Layout: docs/infer.md.
"""
from __future__ import annotations

from jobs.artefacts import load_chosen_shift_model, published_in, shift_choice
from jobs.shiftmodels.registry import featurizer_for

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from engine.context import RankContext
from engine.failure import InputError
from engine.progress import Progress
from engine.stages import StageInputs, StageResult
from engine.stop import stop_point
from engine.store import RunStore
from jobs.frame_checks import MIN_DISTANCE_A, check_frames
from jobs.layouts.infer import GROUP, system_group
from jobs.layouts.md import md_trajectories
from jobs.shiftmodels.predictors import choose_predictor
from jobs.shiftmodels.soap import SoapFeaturizer
from jobs.sites import framework_drift_a, framework_mask
from schemas.infer import SHIPPED_SHIFT_MODEL, InferSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec

SHIPPED_MODEL = SHIPPED_SHIFT_MODEL
"""The shift model infer uses when neither the manifest nor the store gives one: the shipped
GPR model of P2-NMMO (schemas.infer.SHIPPED_SHIFT_MODEL)."""






# ---- frame sources -----------------------------------------------------------------------------
@dataclass
class FrameBatch:
    """Consecutive frames of a source, as arrays."""

    positions_a: np.ndarray
    """(k, n_atoms, 3) float64, as stored (unwrapped for md trajectories)."""
    cell_a: np.ndarray
    """(k, 3, 3) float64, rows are the cell vectors."""
    time_fs: np.ndarray
    """(k,) float64, simulated time (NaN when the source has none)."""
    replica: np.ndarray
    """(k,) int32, md replica number (-1 for a file)."""
    a_iso_mhz: np.ndarray | None = None
    """(k, n_atoms) Fermi-contact couplings of a labelled file, else None."""


class StoreTrajectories:
    """The md stage's trajectories of one system in the store, replicas concatenated in order.

    Replica groups ``/md/<system>/r000, r001 ...`` hold ``positions_a (n, n_atoms, 3)``,
    ``cell_a (n, 3, 3)`` and ``time_fs (n,)``; the attribute ``n_saved`` of the replica group
    (else of the system group, else the dataset length) says how many frames are valid.
    """

    def __init__(self, store: RunStore, system: str, skip_frames: int = 0, stride: int = 1,
                 min_distance_a: float = MIN_DISTANCE_A):
        self.store = store
        self.min_distance_a = min_distance_a
        try:
            trajectories = md_trajectories(store, system)
        except InputError as exc:
            raise InputError(f"infer: {exc}, or name a file in infer.trajectories") from None
        self.group = trajectories.group
        self.trajectories = trajectories
        self.segments = []  # (md Replica, local frame indices)
        for replica in trajectories.replicas:
            self.segments.append((replica, np.arange(skip_frames, replica.n_saved, stride)))
        self.offsets = np.cumsum([0] + [len(s[1]) for s in self.segments])
        self.n_frames = int(self.offsets[-1])
        self.numbers = trajectories.numbers
        self.description = f"store:{self.group}"

    def read(self, start: int, stop: int) -> FrameBatch:
        """Frames [start, stop) of the global list."""
        parts = []
        for (replica, local), first in zip(self.segments, self.offsets[:-1]):
            lo, hi = max(start, first), min(stop, first + len(local))
            if lo >= hi:
                continue
            wanted = local[lo - first:hi - first]
            step = int(wanted[1] - wanted[0]) if len(wanted) > 1 else 1
            selection = np.s_[int(wanted[0]):int(wanted[-1]) + 1:step]
            positions = self.trajectories.positions_a(replica, selection)
            cell = self.trajectories.cell_a(replica, selection)
            times = self.trajectories.time_fs(replica, selection)
            path = replica.group
            check_frames(positions, cell, self.numbers, f"infer: store group {path}", wanted,
                         self.min_distance_a)
            parts.append(FrameBatch(positions, cell, times,
                                    np.full(len(wanted), replica.number, dtype=np.int32)))
        return _concatenate(parts)


class FileTrajectory:
    """The frames of an ASE-readable trajectory file.

    Extended XYZ files are indexed once (byte offset of every frame) so that a rank parses only
    its own chunks; ASE ``.traj`` files are read by random access; other formats are read by
    ASE with an index slice per chunk. Every ASE read passes ``parallel=False``: by default
    ASE reads on rank 0 of COMM_WORLD and broadcasts, which would hand every rank rank 0's
    frames (or hang when only one rank reads).
    """

    def __init__(self, path: Path, comm, skip_frames: int = 0, stride: int = 1,
                 labels: bool = False, min_distance_a: float = MIN_DISTANCE_A):
        self.path, self.labels = Path(path), labels
        self.min_distance_a = min_distance_a
        if not self.path.exists():
            raise InputError(f"infer.trajectories: {self.path}: no such file")
        self.kind = ("xyz" if self.path.suffix.lower() in (".xyz", ".extxyz") else
                     "traj" if self.path.suffix.lower() == ".traj" else "ase")
        counted = None
        if comm.Get_rank() == 0:
            try:
                counted = self._index()
            except InputError as exc:
                counted = exc
        counted = comm.bcast(counted, root=0)
        if isinstance(counted, Exception):
            raise counted
        self._offsets, n_total = counted
        self.frame_indices = np.arange(skip_frames, n_total, stride)
        self.n_frames = len(self.frame_indices)
        if self.n_frames == 0:
            raise InputError(f"infer.trajectories: {self.path}: no frames (after skipping "
                             f"{skip_frames})")
        first = self._frames(int(self.frame_indices[0]), int(self.frame_indices[0]) + 1)[0]
        self.numbers = first.numbers.copy()
        self.description = f"file:{self.path}"

    def _index(self):
        if self.kind == "xyz":
            offsets = []
            with open(self.path, "rb") as handle:
                position = 0
                while True:
                    header = handle.readline()
                    if not header:
                        break
                    if not header.strip():
                        position += len(header)
                        continue
                    try:
                        n_atoms = int(header.split()[0])
                    except ValueError:
                        raise InputError(f"{self.path}: frame {len(offsets)} (byte {position}): "
                                         f"expected an atom count, got {header[:40]!r}") from None
                    offsets.append(position)
                    position += len(header)
                    for _ in range(n_atoms + 1):
                        position += len(handle.readline())
                offsets.append(position)
            return np.asarray(offsets, dtype=np.int64), len(offsets) - 1
        if self.kind == "traj":
            from ase.io import Trajectory

            with Trajectory(self.path) as trajectory:
                return None, len(trajectory)
        import ase.io

        try:
            return None, sum(1 for _ in ase.io.iread(self.path, parallel=False))
        except Exception as exc:  # noqa: BLE001 - any parser failure is bad input, named
            raise InputError(f"infer.trajectories: {self.path}: ASE cannot read it "
                             f"({type(exc).__name__}: {exc})") from None

    def _frames(self, first: int, last: int) -> list[Atoms]:
        """Frames with file indices [first, last)."""
        import ase.io

        try:
            if self.kind == "xyz":
                with open(self.path, "rb") as handle:
                    handle.seek(int(self._offsets[first]))
                    text = handle.read(int(self._offsets[last] - self._offsets[first]))
                return ase.io.read(io.StringIO(text.decode()), ":", format="extxyz",
                                    parallel=False)
            if self.kind == "traj":
                from ase.io import Trajectory

                with Trajectory(self.path) as trajectory:
                    return [trajectory[i] for i in range(first, last)]
            return ase.io.read(self.path, index=slice(first, last), parallel=False)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"infer.trajectories: {self.path}: frames {first}..{last - 1}: "
                             f"{type(exc).__name__}: {exc}") from None

    def read(self, start: int, stop: int) -> FrameBatch:
        """Frames [start, stop) of the (strided) frame list."""
        from jobs.frames import FERMI_CONTACT_KEY

        wanted = self.frame_indices[start:stop]
        frames = self._frames(int(wanted[0]), int(wanted[-1]) + 1)
        frames = [frames[i - wanted[0]] for i in wanted]
        for index, frame in zip(wanted, frames):
            if not np.array_equal(frame.numbers, self.numbers):
                raise InputError(f"infer.trajectories: {self.path}: frame {index} has other "
                                 "atoms (species or order) than the first frame")
            if self.labels and FERMI_CONTACT_KEY not in frame.arrays:
                raise InputError(f"infer.trajectories: {self.path}: frame {index} has no "
                                 f"per-atom '{FERMI_CONTACT_KEY}' (needed by "
                                 "infer.shifts_from: labels)")
        times = np.array([float(f.info.get("time_fs", f.info.get("time", np.nan)))
                          for f in frames])
        a_iso = (np.stack([np.asarray(f.arrays[FERMI_CONTACT_KEY], float) for f in frames])
                 if self.labels else None)
        positions = np.stack([f.positions for f in frames])
        cells = np.stack([f.cell.array for f in frames])
        check_frames(positions, cells, self.numbers, f"infer.trajectories: {self.path}",
                     wanted, self.min_distance_a)
        return FrameBatch(positions, cells, times, np.full(len(frames), -1, dtype=np.int32),
                          a_iso)


def _concatenate(parts: list[FrameBatch]) -> FrameBatch:
    if len(parts) == 1:
        return parts[0]
    return FrameBatch(np.concatenate([p.positions_a for p in parts]),
                      np.concatenate([p.cell_a for p in parts]),
                      np.concatenate([p.time_fs for p in parts]),
                      np.concatenate([p.replica for p in parts]))


def frame_source(spec: InferSpec, system: SystemSpec, ctx: RankContext, store: RunStore,
                 min_distance_a: float = MIN_DISTANCE_A):
    """The frames of `system`: its file in ``spec.trajectories``, else the md stage's; every
    frame read is checked (finite, no two atoms closer than `min_distance_a`)."""
    labels = spec.shifts_from == "labels"
    if system.name in spec.trajectories:
        return FileTrajectory(spec.trajectories[system.name], ctx.comm, spec.skip_frames,
                              spec.stride, labels=labels, min_distance_a=min_distance_a)
    if labels:
        raise InputError(f"infer.shifts_from is 'labels' but infer.trajectories names no "
                         f"labelled file for system {system.name!r}")
    return StoreTrajectories(store, system.name, spec.skip_frames, spec.stride,
                             min_distance_a=min_distance_a)


# ---- the model -----------------------------------------------------------------------------------
def load_ensemble(spec: InferSpec, store: RunStore):
    """The shift model :func:`jobs.artefacts.shift_choice` picks: ``spec.model``, else this
    store's /train, else this store's learn campaign's final shift model, else the shipped one.

    Returns
    -------
    (ShiftEnsemble or GprShiftModel, str, str)
        The model, where it came from (recorded as ``predictor_model``), and which model it is
        and why, in words.
    """
    choice = shift_choice(published_in(store), spec.model)
    model, name = load_chosen_shift_model(choice, store)
    return model, name, choice.describe()


PREDICTOR_TIMED_FRAMES = 32
"""Frames (at most one chunk) of feature rows that infer times its two predictors on."""


def predictor_for(ensemble, spec: InferSpec, ctx: RankContext, store: RunStore,
                  model_name: str, centres_per_frame: int):
    """The predictor infer uses: the faster on this machine of numpy and TensorFlow
    (:func:`jobs.shiftmodels.predictors.choose_predictor`, timed on every rank, collective),
    or the one an earlier start of this run recorded for the same model (a resumed run gives
    the same digits).

    Logs the choice and both timings in one line and records them as attributes of ``/infer``:
    ``predictor`` (``numpy`` | ``tensorflow``), ``predictor_numpy_ms_per_frame``,
    ``predictor_tensorflow_ms_per_frame``, ``predictor_timed_rows``, ``predictor_model``.
    """
    recorded = store.attrs(GROUP)
    if recorded.get("predictor_model") != model_name:
        recorded = None
    predictor, choice = choose_predictor(
        ensemble, ctx, centres_per_frame, frames=min(PREDICTOR_TIMED_FRAMES, spec.chunk_frames),
        recorded=recorded)
    if choice.source != "fixed":
        if choice.source == "timed":
            with store.transaction():
                store.set_attrs(GROUP, **choice.attrs(), predictor_model=model_name)
        ctx.log(f"infer: {choice.log_line()}")
    return predictor, choice




# ---- the stage --------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferResult(StageResult):
    """Frames per system, frames computed in this invocation, wall time and throughput."""

    frames: dict
    frames_computed: int
    elapsed_s: float
    shift_model: str = ""
    """Which shift model predicted, and why (jobs.artefacts)."""

    def summary(self) -> dict:
        """Headline numbers for /stages/infer."""
        rate = self.frames_computed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {"frames": int(sum(self.frames.values())), "frames_computed": self.frames_computed,
                "frames_per_s": round(rate, 2), **{f"frames_{k}": v for k, v in self.frames.items()},
                "shift_model": self.shift_model}


def _chunk_bounds(n_frames: int, chunk_frames: int) -> np.ndarray:
    return np.minimum(np.arange(0, n_frames + chunk_frames, chunk_frames), n_frames)[
        : -(-n_frames // chunk_frames) + 1]


def _prepare_group(store: RunStore, group: str, n_frames: int, n_atoms: int, centres,
                   chunk_frames: int, identity: dict) -> None:
    """Create the system's datasets (collective); a group made for other input is replaced."""
    n_chunks = -(-n_frames // chunk_frames)
    old = store.attrs(group)
    if old and any(old.get(k) != v for k, v in identity.items()):
        store.delete(group)
    n_c = len(centres)
    store.create_dataset(f"{group}/shift_ppm", (n_frames, n_c), dtype="f4", fill_value=np.nan,
                         unit="ppm")
    store.create_dataset(f"{group}/shift_std_ppm", (n_frames, n_c), dtype="f4",
                         fill_value=np.nan, unit="ppm")
    store.create_dataset(f"{group}/centre_positions_a", (n_frames, n_c, 3), dtype="f8",
                         fill_value=np.nan, unit="angstrom")
    store.create_dataset(f"{group}/cell_a", (n_frames, 3, 3), dtype="f8", fill_value=np.nan,
                         unit="angstrom")
    store.create_dataset(f"{group}/time_fs", (n_frames,), dtype="f8", fill_value=np.nan,
                         unit="fs")
    store.create_dataset(f"{group}/replica", (n_frames,), dtype="i4", fill_value=-2)
    store.create_dataset(f"{group}/framework_drift_a", (n_frames, 3), dtype="f8",
                         fill_value=np.nan, unit="angstrom")
    store.create_dataset(f"{group}/chunk_done", (n_chunks,), dtype="u1", fill_value=0)
    if not old or not store.exists(f"{group}/centre_index"):
        store.set_attrs(group, n_done=0, n_centres=n_c, n_atoms=n_atoms,
                        **identity)


def _predict_chunk(featurizer: SoapFeaturizer, ensemble, numbers: np.ndarray,
                   batch: FrameBatch, n_centres: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (ppm, float32, (k, n_centres)) of one chunk; its features (the big
    array) die on return, so a rank never holds two chunks' features at once."""
    features = featurizer.features_arrays(numbers, batch.positions_a, batch.cell_a)
    mean, std = ensemble.predict(features)
    del features
    shape = (len(batch.positions_a), n_centres)
    return (np.asarray(mean, np.float32).reshape(shape),
            np.asarray(std, np.float32).reshape(shape))


def _target_centres(spec: InferSpec, system: SystemSpec, source, featurizer,
                    model_name: str) -> np.ndarray:
    """Atom indices of the system's target nuclei; InputError when it has none, or when the
    model (`featurizer`, None for DFT labels) predicts another species or misses one of the
    frames' species."""
    target = system.target_species
    from ase.data import atomic_numbers

    centres = np.flatnonzero(source.numbers == atomic_numbers[target])
    if len(centres) == 0:
        raise InputError(f"infer: system {system.name!r} ({source.description}) has no "
                         f"{target} atoms")
    if featurizer is not None:
        if featurizer.centre != target:
            raise InputError(f"infer: the model predicts {featurizer.centre} shifts; system "
                             f"{system.name!r} observes {target}")
        featurizer.check_frame(Atoms(numbers=source.numbers),  # every frame's species
                               f"infer: system {system.name!r}, {source.description} frame "
                               f"{spec.skip_frames} (NN-NMR model {model_name})")
    return centres


def _infer_chunk(store: RunStore, group: str, source, chunk: int, bounds: np.ndarray,
                 centres: np.ndarray, frame0, framework: np.ndarray, labels: bool,
                 shift: ShiftSpec, featurizer, ensemble) -> int:
    """Shifts of one chunk of frames, from the DFT labels (`labels`; `shift`: their A_iso ->
    ppm constants) or predicted, written with the chunk's positions, cells, times and drift and
    marked done (independent writes); returns its frame count."""
    from jobs.shift import shift_ppm

    start, stop = int(bounds[chunk]), int(bounds[chunk + 1])
    batch = source.read(start, stop)
    if labels:
        mean = shift_ppm(batch.a_iso_mhz[:, centres], shift).astype(np.float32)
        std = np.zeros_like(mean)
    else:
        mean, std = _predict_chunk(featurizer, ensemble, source.numbers, batch,
                                   len(centres))
    store.write_rows(f"{group}/shift_ppm", start, mean)
    store.write_rows(f"{group}/shift_std_ppm", start, std)
    store.write_rows(f"{group}/centre_positions_a", start,
                     batch.positions_a[:, centres])
    store.write_rows(f"{group}/cell_a", start, batch.cell_a)
    store.write_rows(f"{group}/time_fs", start, batch.time_fs)
    store.write_rows(f"{group}/replica", start, batch.replica)
    store.write_rows(f"{group}/framework_drift_a", start, framework_drift_a(
        batch.positions_a, frame0.positions_a[0], batch.cell_a, framework))
    store.write_rows(f"{group}/chunk_done", chunk, np.ones(1, np.uint8))
    return stop - start


def _record_done(ctx: RankContext, store: RunStore, system: SystemSpec, group: str, source,
                 bounds: np.ndarray, done_here: int) -> int:
    """After a system's rounds (collective): record ``n_done``; RuntimeError unless every frame
    is written. Returns the frames computed by all ranks in this invocation."""
    from mpi4py import MPI

    ctx.comm.Barrier()
    computed = ctx.comm.allreduce(done_here, op=MPI.SUM)
    n_done = int(np.sum(np.diff(bounds)[store.read_shared(f"{group}/chunk_done") == 1]))
    with store.transaction():
        store.set_attrs(group, n_done=n_done)
    if n_done != source.n_frames:
        raise RuntimeError(f"infer {system.name}: {n_done} of {source.n_frames} frames "
                           "written")
    return computed


def infer_shifts(spec: InferSpec, systems: list[SystemSpec], ctx: RankContext,
                 store: RunStore, shift: ShiftSpec = ShiftSpec(), ensemble=None,
                 min_distance_a: float = MIN_DISTANCE_A) -> InferResult:
    """Shifts of every target nucleus of every frame of every system, into /infer/<system>.

    Parameters
    ----------
    spec
        The infer settings.
    systems
        The systems (manifest order); each needs md trajectories in the store or a file in
        ``spec.trajectories``.
    ctx, store
        Rank context and run store (collective over ``ctx.comm``).
    shift
        A_iso -> ppm constants (``shifts_from: labels``).
    ensemble
        A ShiftEnsemble-like object (``settings``, ``predict(features) -> (mean, std)``);
        default: :func:`load_ensemble`.

    Returns
    -------
    InferResult
    """
    labels = spec.shifts_from == "labels"
    model_name = "labels:fermi_contact_mhz"
    model_choice = "the DFT labels (infer.shifts_from: labels)"
    featurizer, soap_kernel = None, "none"
    if not labels:
        if ensemble is None:
            ensemble, model_name, model_choice = load_ensemble(spec, store)
        else:
            model_name = getattr(ensemble, "name", type(ensemble).__name__)
            model_choice = f"{model_name} (given by the caller)"
        featurizer = featurizer_for(ensemble, spec.soap_kernel)
        soap_kernel = featurizer.array_kernel()
    predictor_choice = None  # timed at the first system: a chunk of its nuclei's rows
    started = time.monotonic()
    frames, computed_total = {}, 0
    for system in systems:
        source = frame_source(spec, system, ctx, store, min_distance_a)
        group = system_group(system.name)
        frame0 = source.read(0, 1)
        target = system.target_species
        centres = _target_centres(spec, system, source, featurizer, model_name)
        if featurizer is not None and predictor_choice is None:
            ensemble, predictor_choice = predictor_for(ensemble, spec, ctx, store, model_name,
                                                       len(centres))
        framework = framework_mask(source.numbers, target)
        identity = {"source": source.description, "model": model_name,
                    "chunk_frames": spec.chunk_frames, "n_frames": source.n_frames,
                    "shifts_from": spec.shifts_from}
        with store.transaction():  # the system's datasets and attributes, at once
            _prepare_group(store, group, source.n_frames, len(source.numbers), centres,
                           spec.chunk_frames, identity)
            if not store.exists(f"{group}/centre_index"):
                store.put(f"{group}/centre_index", centres.astype(np.int64))
                store.put(f"{group}/frame0_numbers", source.numbers.astype(np.int32))
                store.put(f"{group}/frame0_positions_a", frame0.positions_a[0],
                          unit="angstrom")
            store.set_attrs(group, soap_kernel=soap_kernel)
        bounds = _chunk_bounds(source.n_frames, spec.chunk_frames)
        missing = np.flatnonzero(store.read_shared(f"{group}/chunk_done") == 0)
        mine = missing[ctx.block(len(missing))]
        rounds = -(-len(missing) // ctx.size)
        n_local = int(sum(bounds[k + 1] - bounds[k] for k in mine))
        ctx.log(f"infer {system.name}: {source.n_frames} frames from {source.description}, "
                f"{len(missing)} of {len(bounds) - 1} chunks to do, {len(centres)} {target} "
                f"per frame, {'DFT labels' if labels else model_name}"
                f"{'' if labels else f', SOAP by {soap_kernel}'}")
        progress = Progress(ctx, f"infer {system.name}", n_local)
        done_here = 0
        for round_index in range(rounds):
            count = 0
            if round_index < len(mine):
                count = _infer_chunk(store, group, source, int(mine[round_index]), bounds,
                                     centres, frame0, framework, labels, shift, featurizer,
                                     ensemble)
            done_here += count
            store.flush()
            progress.update(count)
            stop_point(ctx, f"in infer {system.name} after round {round_index + 1} of {rounds}")
        progress.finish()
        computed = _record_done(ctx, store, system, group, source, bounds, done_here)
        frames[system.name] = source.n_frames
        computed_total += computed
    return InferResult(frames, computed_total, time.monotonic() - started, model_choice)


def run(spec: InferSpec, inputs: StageInputs) -> InferResult:
    """Stage entry: shifts of every target nucleus of every frame into ``/infer``."""
    if not inputs.systems:
        raise InputError("infer: the manifest has no systems")
    checks = inputs.checks
    return infer_shifts(spec, list(inputs.systems), inputs.ctx, inputs.store, shift=inputs.shift,
                        min_distance_a=checks.min_distance_a if checks else MIN_DISTANCE_A)


def put_labelled_frames(frames, system: SystemSpec, shift_spec: ShiftSpec, ctx: RankContext,
                        store: RunStore, group: str | None = None) -> str:
    """Write labelled frames (their DFT shifts) into this stage's layout, as analyze input.

    The same datasets, dtypes and bookkeeping as :func:`infer_shifts` with
    ``shifts_from: labels`` writes, from frames in memory (tests, distillation). Every rank
    passes the same frames (collective; rank 0 writes).

    Parameters
    ----------
    frames
        ase.Atoms with ``arrays["fermi_contact_mhz"]``, same atoms in the same order.
    system
        Its name names the group; its target species selects the centres.
    shift_spec
        The A_iso -> shift conversion.
    group
        Where to write; default :func:`system_group` of the system.

    Returns
    -------
    str
        The group written.
    """
    from ase.data import atomic_numbers

    from jobs.frames import FERMI_CONTACT_KEY
    from jobs.shift import shift_ppm

    group = group or system_group(system.name)
    first = frames[0]
    centres = np.flatnonzero(first.numbers == atomic_numbers[system.target_species])
    if len(centres) == 0:
        raise InputError(f"system {system.name}: frame 0 has no {system.target_species}")
    n = len(frames)
    positions = np.array([atoms.positions for atoms in frames])
    cells = np.array([atoms.cell[:] for atoms in frames])
    a_iso = np.array([atoms.arrays[FERMI_CONTACT_KEY][centres] for atoms in frames])
    identity = {"source": "labelled frames (DFT shifts)", "model": "labels:fermi_contact_mhz",
                "chunk_frames": n, "n_frames": n, "shifts_from": "labels"}
    _prepare_group(store, group, n, len(first), centres, n, identity)
    store.put(f"{group}/centre_index", centres.astype(np.int64))
    store.put(f"{group}/frame0_numbers", first.numbers.astype(np.int32))
    store.put(f"{group}/frame0_positions_a", first.positions, unit="angstrom")
    if ctx.is_root:
        mean = shift_ppm(a_iso, shift_spec).astype(np.float32)
        store.write_rows(f"{group}/shift_ppm", 0, mean)
        store.write_rows(f"{group}/shift_std_ppm", 0, np.zeros_like(mean))
        store.write_rows(f"{group}/centre_positions_a", 0, positions[:, centres])
        store.write_rows(f"{group}/cell_a", 0, cells)
        store.write_rows(f"{group}/time_fs", 0, np.full(n, np.nan))
        store.write_rows(f"{group}/replica", 0, np.full(n, -1, dtype=np.int32))
        store.write_rows(f"{group}/framework_drift_a", 0, framework_drift_a(
            positions, first.positions, cells, framework_mask(first.numbers,
                                                              system.target_species)))
        store.write_rows(f"{group}/chunk_done", 0, np.ones(1, np.uint8))
    store.set_attrs(group, n_done=n)
    store.flush()
    return group
