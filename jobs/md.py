"""The md stage: NVT DPMD replicas of every system, distributed over ranks, streamed to the store.

Tasks are (system, replica) pairs dealt round robin over the ranks (more replicas than ranks is
fine). Every rank creates every replica's datasets, pre-sized to the requested frame count, in
the same order (collective); each rank then writes only its own replicas' rows (independent).
The run advances in rounds: in each round a rank runs one chunk of `chunk_frames` frames of each
of its replicas, writes them together with the state needed to resume (momenta and thermostat
state after the chunk's last frame), and then all ranks flush; the stage's groups, datasets and
attributes are made in one store transaction at its start (``n_saved`` at its end), so a kill
between them never damages the store (engine/store.py RunStore.transaction). A killed run resumes each replica from its last saved frame and continues
exactly as if never stopped. With ``md.deviation_models`` (or ``run_replicas(...,
deviation_models=...)``), the force deviation of the ensemble of the propagating model and
those models is computed on every saved frame of a chunk and written with it
(jobs/deviation.py). Store layout: docs/md.md.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.context import RankContext
from engine.seeds import SeedStreams
from engine.stages import StageInputs, StageResult
from engine.progress import Progress
from engine.store import RunStore
from jobs.frame_checks import (MD_MAX_TEMPERATURE_FACTOR, MIN_DISTANCE_A, UnstableDynamics,
                               check_frames, check_species, frame_problem)
from jobs.potential import import_deepmd_tf, stored_model_file
from jobs.structures import build_structure
from schemas.md import MdSpec

RNG_STATE_BYTES = 512
"""Size of the fixed-length field that holds a replica's thermostat RNG state (JSON)."""


GROUP = "/md"
"""The store group this stage owns: ``/md/<system>`` (attrs, ``numbers``) and one group per
replica, ``/md/<system>/r000`` ... (see :func:`replica_group`). Read it with
:func:`md_trajectories`."""


def system_group(system: str, root: str = GROUP) -> str:
    """Store group of one system's trajectories."""
    return f"{root}/{system}"


def replica_group(system: str, replica: int, root: str = GROUP) -> str:
    """Store group of one replica's trajectory."""
    return f"{root}/{system}/r{replica:03d}"


class StoppedOnPurpose(RuntimeError):
    """Raised by the diagnostics knob md.stop_after_frames."""


@dataclass(frozen=True)
class MdResult(StageResult):
    """Trajectories run, frames each, their mean temperature and the save interval."""

    trajectories: int
    frames_per_trajectory: int
    mean_temperature_k: float
    save_interval_fs: float


@dataclass(frozen=True)
class MdTask:
    """One trajectory: a system and a replica number."""

    system_index: int
    system: str
    replica: int

    @property
    def group(self) -> str:
        """Store group of this trajectory."""
        return replica_group(self.system, self.replica)


def md_tasks(systems, replicas: int) -> list[MdTask]:
    """Every (system, replica) pair in a fixed order (system-major)."""
    return [MdTask(i, s.name, r) for i, s in enumerate(systems) for r in range(replicas)]


DEEPMD_FACE_MARGIN = 2.0 ** -40
"""Fractional distance (~1e-11 A in these cells) from a cell face within which a position is
moved inwards before deepmd-kit sees it (see :func:`deepmd_positions`)."""


def deepmd_cell_fraction(positions_a: np.ndarray, cell_a: np.ndarray) -> np.ndarray:
    """The fractional coordinates deepmd-kit's CPU neighbour search bins atoms by.

    deepmd-kit's ProdEnvMatA op (``source/op/tf/prod_env_mat_multi_device.cc``
    ``_norm_copy_coord_cpu``) wraps the positions it is given itself
    (``normalize_coord_cpu``, ``source/lib/src/coord.cc``: fractional coordinate from its own
    reciprocal cell, ``fmod`` 1, +1 when negative, back to Cartesian) and then bins them into
    cells (``build_clist``, ``source/lib/src/neighbor_list.cc``), re-deriving the fractional
    coordinate once more. A coordinate of -1e-17 becomes 1.0 there, which is past the last cell:
    it prints "loc idx out of upper bound". This function repeats that arithmetic operation by
    operation in float64 (the wheel's libraries use no fused multiply-add), so its result is
    the value deepmd-kit bins, to the bit.

    Returns
    -------
    numpy.ndarray
        (n_atoms, 3) fractional coordinates; deepmd-kit expects each in [0, 1).
    """
    b = np.asarray(cell_a, dtype=np.float64).ravel()
    volume = abs(b[0] * (b[4] * b[8] - b[7] * b[5]) - b[1] * (b[3] * b[8] - b[6] * b[5])
                 + b[2] * (b[3] * b[7] - b[6] * b[4]))
    inv = 1.0 / volume
    rec = np.empty((3, 3))  # region.cc compute_rec_boxt / SimulationRegion::computeRecBox
    rec[0, 0] = (b[4] * b[8] - b[7] * b[5]) * inv
    rec[1, 1] = (b[0] * b[8] - b[6] * b[2]) * inv
    rec[2, 2] = (b[0] * b[4] - b[3] * b[1]) * inv
    rec[0, 1] = (-b[3] * b[8] + b[6] * b[5]) * inv
    rec[0, 2] = (b[3] * b[7] - b[6] * b[4]) * inv
    rec[1, 0] = (-b[1] * b[8] + b[7] * b[2]) * inv
    rec[1, 2] = (-b[0] * b[7] + b[6] * b[1]) * inv
    rec[2, 0] = (b[1] * b[5] - b[4] * b[2]) * inv
    rec[2, 1] = (-b[0] * b[5] + b[3] * b[2]) * inv
    box = b.reshape(3, 3)

    def to_fraction(r):  # tensor_dot_vec: o_i = r0 rec_i0 + r1 rec_i1 + r2 rec_i2
        return np.stack([r[:, 0] * rec[i, 0] + r[:, 1] * rec[i, 1] + r[:, 2] * rec[i, 2]
                         for i in range(3)], axis=1)

    def to_cartesian(f):  # tensor_t_dot_vec: o_j = f0 box_0j + f1 box_1j + f2 box_2j
        return np.stack([f[:, 0] * box[0, j] + f[:, 1] * box[1, j] + f[:, 2] * box[2, j]
                         for j in range(3)], axis=1)

    fraction = np.fmod(to_fraction(np.asarray(positions_a, dtype=np.float64)), 1.0)
    fraction = np.where(fraction < 0.0, fraction + 1.0, fraction)
    return to_fraction(to_cartesian(fraction))


def deepmd_positions(positions_a: np.ndarray, cell_a: np.ndarray) -> np.ndarray:
    """Positions wrapped into the cell such that deepmd-kit bins every atom inside it.

    The fractional coordinates are wrapped into [0, 1); an atom that deepmd-kit's own
    re-derivation (:func:`deepmd_cell_fraction`) would still put on or past a face (an atom
    of an idealised cell at a fractional 0, which rounding turns into -1e-17 there) is moved
    2**-39 of a cell vector inwards (~2e-11 A); every other atom keeps its wrapped position.

    Raises
    ------
    RuntimeError
        If an atom still fails the check after the move (never seen; it would mean deepmd-kit
        changed its arithmetic).
    """
    cell = np.asarray(cell_a, dtype=np.float64)
    scaled = np.linalg.solve(cell.T, np.asarray(positions_a, dtype=np.float64).T).T % 1.0
    scaled[scaled >= 1.0] = 0.0  # -1e-17 % 1.0 == 1.0
    coords = scaled @ cell
    for attempt in range(2):
        fraction = deepmd_cell_fraction(coords, cell)
        bad = (fraction < 0.0) | (fraction > 1.0 - DEEPMD_FACE_MARGIN)
        if not bad.any():
            return coords
        if attempt == 1:
            break
        inner = 2.0 * DEEPMD_FACE_MARGIN  # the face it is nearest to, in our wrapping
        scaled[bad] = np.where(scaled[bad] < 0.5, inner, 1.0 - inner)
        rows = bad.any(axis=1)
        coords[rows] = scaled[rows] @ cell
    raise RuntimeError(f"deepmd_positions: atoms {np.flatnonzero(bad.any(axis=1)).tolist()} "
                       "still lie on a cell face as deepmd-kit computes it")


def dp_calculator(model_path: Path):
    """deepmd-kit's ASE calculator for a frozen model, fed wrapped positions.

    The integrator keeps positions unwrapped (continuous, for diffusion); deepmd-kit gives the
    same energy and forces for positions outside the cell, but an atom that its own wrapping
    puts on the upper cell face (e.g. one at a fractional coordinate of exactly 0 in an
    idealised cell) is binned past the last cell with a "loc idx out of upper bound" warning,
    so the calculator evaluates :func:`deepmd_positions` (one copy of the atoms per call, as
    deepmd-kit's own).
    """
    from ase.calculators.calculator import Calculator, all_changes

    import_deepmd_tf()
    from deepmd.calculator import DP

    class WrappingDP(DP):
        def calculate(self, atoms=None, properties=("energy", "forces", "virial"),
                      system_changes=all_changes):
            Calculator.calculate(self, atoms, properties, system_changes)  # self.atoms = copy
            cell = self.atoms.cell.array
            coords = deepmd_positions(self.atoms.positions, cell)
            types = [self.type_dict[s] for s in self.atoms.get_chemical_symbols()]
            energy, forces, virial = self.dp.eval(coords=coords.reshape(1, -1),
                                                  cells=cell.reshape(1, -1),
                                                  atom_types=types)[:3]
            virial = virial[0].reshape(3, 3)
            stress = -0.5 * (virial + virial.T) / abs(np.linalg.det(cell))
            self.results = {"energy": energy[0][0], "free_energy": energy[0][0],
                            "forces": forces[0], "virial": virial,
                            "stress": stress.flat[[0, 4, 8, 5, 2, 1]]}

    return WrappingDP(model=str(model_path))


# ---- the integrator -----------------------------------------------------------------------------
class Trajectory:
    """One replica's ASE NVT integrator with a DP calculator, and its resumable state."""

    def __init__(self, atoms, calculator, spec: MdSpec, velocity_rng: np.random.Generator,
                 thermostat_rng: np.random.Generator):
        from ase import units
        from ase.constraints import FixCom
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
        from ase.parallel import DummyMPI

        # ASE broadcasts random numbers over its own `world` (all MPI ranks) unless told
        # otherwise: each replica here is serial, so every ASE object gets a one-rank comm.
        serial = DummyMPI()

        self.spec = spec
        self.atoms = atoms.copy()
        self.atoms.calc = calculator
        self.rng = thermostat_rng
        MaxwellBoltzmannDistribution(self.atoms, temperature_K=spec.temperature_k,
                                     rng=velocity_rng, comm=serial)
        Stationary(self.atoms)
        timestep = spec.timestep_fs * units.fs
        if spec.thermostat == "langevin":
            from ase.md.langevin import Langevin

            self.atoms.set_constraint(FixCom())
            self.dynamics = Langevin(self.atoms, timestep, temperature_K=spec.temperature_k,
                                     friction=spec.friction_per_fs / units.fs, fixcm=False,
                                     rng=self.rng, comm=serial)
        else:
            from ase.md.nose_hoover_chain import NoseHooverChainNVT

            self.dynamics = NoseHooverChainNVT(self.atoms, timestep,
                                               temperature_K=spec.temperature_k,
                                               tdamp=spec.thermostat_time_fs * units.fs,
                                               comm=serial)

    def run(self, steps: int) -> None:
        """Advance `steps` MD steps (an exploding run's overflows stay silent: the frame checks
        name it, with its frame and time, instead of numpy's warnings from the thermostat)."""
        if steps > 0:
            with np.errstate(over="ignore", invalid="ignore"):
                self.dynamics.run(steps)

    # resumable state: positions, momenta (ASE units), thermostat variables / RNG state
    def thermostat_state(self) -> bytes:
        """The thermostat's state as fixed-length JSON bytes (RNG state or chain variables)."""
        if self.spec.thermostat == "langevin":
            state = self.rng.bit_generator.state
        else:
            chain = self.dynamics._thermostat
            state = {"eta": chain._eta.tolist(), "p_eta": chain._p_eta.tolist()}
        text = json.dumps(state).encode()
        if len(text) > RNG_STATE_BYTES:
            raise RuntimeError(f"thermostat state of {len(text)} bytes does not fit")
        return text.ljust(RNG_STATE_BYTES)

    def restore(self, positions_a: np.ndarray, momenta: np.ndarray, state: bytes) -> None:
        """Set positions, momenta and thermostat state saved by a previous run."""
        self.atoms.set_positions(positions_a, apply_constraint=False)
        self.atoms.set_momenta(momenta, apply_constraint=False)
        document = json.loads(bytes(state).decode().strip())
        if self.spec.thermostat == "langevin":
            self.rng.bit_generator.state = document
        else:
            chain = self.dynamics._thermostat
            chain._eta[:] = document["eta"]
            chain._p_eta[:] = document["p_eta"]
            self.dynamics._q = self.atoms.get_positions()
            self.dynamics._p = self.atoms.get_momenta()


# ---- the store ---------------------------------------------------------------------------------
def create_datasets(store: RunStore, task: MdTask, n_atoms: int, spec: MdSpec) -> None:
    """Create one replica's pre-sized datasets (collective: every rank, same order)."""
    n, chunk = spec.frames, min(spec.chunk_frames, spec.frames)
    g = task.group
    store.create_dataset(f"{g}/positions_a", (n, n_atoms, 3), "f8", chunks=(chunk, n_atoms, 3),
                         unit="angstrom", note="unwrapped (continuous across the cell boundary)")
    store.create_dataset(f"{g}/cell_a", (n, 3, 3), "f8", chunks=(chunk, 3, 3), unit="angstrom")
    store.create_dataset(f"{g}/time_fs", (n,), "f8", chunks=(chunk,), unit="fs",
                         fill_value=np.nan, note="0 = end of equilibration")
    store.create_dataset(f"{g}/temperature_k", (n,), "f8", chunks=(chunk,), unit="K",
                         fill_value=np.nan)
    store.create_dataset(f"{g}/potential_energy_ev", (n,), "f8", chunks=(chunk,), unit="eV",
                         fill_value=np.nan)
    store.create_dataset(f"{g}/resume_momenta", (n_atoms, 3), "f8",
                         unit="ASE (amu * A / (A * sqrt(amu / eV)))",
                         note="momenta after the last saved frame")
    store.create_dataset(f"{g}/resume_thermostat", (RNG_STATE_BYTES,), "u1",
                         note="JSON: Langevin RNG bit-generator state or Nose-Hoover chain "
                              "variables after the last saved frame")
    store.create_dataset(f"{g}/resume_saved", (1,), "i8", fill_value=0,
                         note="frames saved when resume_momenta/resume_thermostat were written")


DEVIATION_DATASETS = ("model_devi_f_ev_a", "model_devi_f_mean_ev_a")
"""A replica's per-frame force deviations of the model ensemble (jobs/deviation.py): DP-GEN's
``max_devi_f`` (max over atoms) and ``avg_devi_f`` (mean over atoms), eV/A."""


def create_deviation_datasets(store: RunStore, task: MdTask, spec: MdSpec) -> None:
    """Create one replica's pre-sized, NaN-filled deviation datasets (collective)."""
    n, chunk = spec.frames, min(spec.chunk_frames, spec.frames)
    notes = ("DP-GEN max_devi_f: max over atoms of the std over models of the force vector",
             "DP-GEN avg_devi_f: mean over atoms of the std over models of the force vector")
    for name, note in zip(DEVIATION_DATASETS, notes):
        store.create_dataset(f"{task.group}/{name}", (n,), "f8", chunks=(chunk,),
                             unit="eV/angstrom", fill_value=np.nan, note=note)


def _check_compatible(store: RunStore, task: MdTask, spec: MdSpec, n_atoms: int) -> None:
    """A resumed store must have been made with the same frame count, interval and cell."""
    shape = store.shape(f"{task.group}/positions_a")
    attrs = store.attrs(task.group)
    expected = {"save_interval_fs": spec.save_every_steps * spec.timestep_fs,
                "timestep_fs": spec.timestep_fs}
    if shape != (spec.frames, n_atoms, 3) or any(
            attrs.get(k) is not None and abs(attrs[k] - v) > 1e-12 for k, v in expected.items()):
        from engine.failure import InputError

        raise InputError(f"md: the store's {task.group} was made with other settings "
                         f"(frames, atoms {shape[:2]}; {attrs}); use a new store or --redo md")


# ---- the verb ----------------------------------------------------------------------------------
def run_replicas(spec: MdSpec, systems, ctx: RankContext, store: RunStore, seed: int,
                 base_dir: Path | None = None, model_fallback: Path | None = None,
                 checks=None, deviation_models: list[Path] | None = None,
                 model: Path | None = None) -> "MdResult":
    """Run every system's replicas (round robin over ranks) and stream frames into the store.

    Parameters
    ----------
    spec
        The md settings.
    systems
        The manifest's systems (SystemSpec).
    ctx, store
        Rank context and run store.
    seed
        The manifest seed; replica r of system i draws from the streams md.velocities and
        md.thermostat at (i, r) (engine.seeds).
    base_dir
        Folder for relative structure paths.
    model_fallback
        Model file when the store holds none (``potential.model``; default the shipped one).
    checks
        The frame checks (schemas.checks.ChecksSpec; None: the defaults): the structure is
        checked before the first step and every saved frame after it (:func:`_check_frame`).
    deviation_models
        DP model files that, with the propagating model, form the ensemble whose force
        deviation of every saved frame is recorded (jobs/deviation.py); None: those of
        ``spec.deviation_models`` (a stage such as learn passes its own); empty: none.
    model
        The DP model file to propagate with (a learn campaign's model 0); None: the store's
        potential model, else `model_fallback` or the shipped one.
    """
    seeds = SeedStreams(seed)
    tasks = md_tasks(systems, spec.replicas)
    structures = [build_structure(s, base_dir) for s in systems]
    interval_fs = spec.save_every_steps * spec.timestep_fs
    extra_models = [Path(p) for p in (spec.deviation_models if deviation_models is None
                                      else deviation_models)]
    with store.transaction():  # every group, dataset and attribute of the stage, at once
        for i, system in enumerate(systems):
            store.put(f"{system_group(system.name)}/numbers", structures[i].numbers.astype(np.int64))
            store.set_attrs(system_group(system.name), structure=system.structure,
                            supercell=list(system.supercell), n_atoms=len(structures[i]))
        for task in tasks:  # collective: same order everywhere
            n_atoms = len(structures[task.system_index])
            create_datasets(store, task, n_atoms, spec)
            _check_compatible(store, task, spec, n_atoms)
            store.set_attrs(task.group, save_interval_fs=interval_fs, timestep_fs=spec.timestep_fs,
                            temperature_k=spec.temperature_k, thermostat=spec.thermostat,
                            friction_per_fs=spec.friction_per_fs,
                            thermostat_time_fs=spec.thermostat_time_fs,
                            equilibration_steps=spec.equilibration_steps,
                            n_requested=spec.frames,
                            seed_key=seeds.key("md.velocities", task.system_index, task.replica))
            if extra_models:
                create_deviation_datasets(store, task, spec)
                store.set_attrs(task.group, deviation_models=len(extra_models),
                                deviation_model_files=[str(p) for p in extra_models],
                                trust_lo_ev_a=spec.trust_lo_ev_a,
                                trust_hi_ev_a=spec.trust_hi_ev_a)
    saved = {t.group: int(store.read_shared(f"{t.group}/resume_saved")[0]) for t in tasks}
    mine = [tasks[i] for i in ctx.round_robin(len(tasks))]

    with (nullcontext(Path(model)) if model is not None
          else stored_model_file(store, model_fallback)) as model_path:
        calculator = dp_calculator(model_path)  # one model load per rank
        ensemble = _deviation_ensemble(model_path, extra_models, structures)
    trajectories: dict[str, Trajectory] = {}
    for task in mine:
        trajectory = Trajectory(structures[task.system_index], calculator, spec,
                                seeds.rng("md.velocities", task.system_index, task.replica),
                                seeds.rng("md.thermostat", task.system_index, task.replica))
        done = saved[task.group]
        if done > 0:
            g = task.group
            trajectory.restore(store.read(f"{g}/positions_a", done - 1),
                               store.read(f"{g}/resume_momenta"),
                               store.read(f"{g}/resume_thermostat"))
        trajectories[task.group] = trajectory
        if ensemble is not None and done > 0:  # frames saved before deviations were asked for
            _fill_deviations(ensemble, store, task, done, spec)
    # equilibration counts as its length in frames, so that the ETA holds from the start
    equilibration_frames = spec.equilibration_steps // spec.save_every_steps
    frames_left = sum(spec.frames - saved[t.group] + (equilibration_frames if saved[t.group] == 0
                                                      else 0) for t in mine)
    ns_per_frame = interval_fs * 1e-6
    progress = Progress(ctx, "md", frames_left, "frames",
                        extra=lambda rate: f"{rate * ns_per_frame * 86400 / max(len(mine), 1):.3g}"
                                           " ns/day per replica")
    ctx.log(f"md: {len(tasks)} trajectories over {ctx.size} ranks, {spec.frames} frames each, "
            f"every {interval_fs:g} fs; {sum(saved.values())} frames already in the store "
            f"(progress counts equilibration as {equilibration_frames} frames)")
    if ensemble is not None:
        ctx.log(f"md: recording the force deviation of every saved frame over {len(ensemble)} "
                f"DP models (trust levels {spec.trust_lo_ev_a:g} / {spec.trust_hi_ev_a:g} eV/A)")
    n_rounds = -(-spec.frames // spec.chunk_frames)
    saved_at_entry = dict(saved)
    for round_index in range(n_rounds):
        end = min(spec.frames, (round_index + 1) * spec.chunk_frames)
        for task in mine:
            start = saved[task.group]
            if start >= end:
                continue
            trajectory = trajectories[task.group]
            if start == saved_at_entry[task.group]:  # before this run's first step
                _check_start(trajectory, task, start, checks)
            if start == 0:
                trajectory.run(spec.equilibration_steps)
                progress.update(equilibration_frames)
            _run_chunk(trajectory, task, start, end, spec, store, progress, checks, ensemble)
            saved[task.group] = end
        # rows and resume state only (no metadata: a kill here cannot damage the store)
        store.flush()
        if spec.stop_after_frames is not None and end >= spec.stop_after_frames \
                and end < spec.frames:
            raise StoppedOnPurpose(f"md.stop_after_frames={spec.stop_after_frames}: stopped "
                                   f"after {end} frames per replica")
    progress.finish()
    counts = ctx.comm.allgather({t.group: saved[t.group] for t in mine})
    merged = {k: v for part in counts for k, v in part.items()}
    with store.transaction():
        for task in tasks:  # collective, same order
            store.set_attrs(task.group, n_saved=merged[task.group])
    temperatures = []
    for task in mine:
        temperatures.append(float(np.mean(store.read(f"{task.group}/temperature_k"))))
    all_temperatures = [t for part in ctx.comm.allgather(temperatures) for t in part]
    return MdResult(trajectories=len(tasks), frames_per_trajectory=spec.frames,
                    mean_temperature_k=float(np.mean(all_temperatures)),
                    save_interval_fs=interval_fs)


def _deviation_ensemble(model_path: Path, extra_models: list[Path], structures):
    """The propagating model and `extra_models` as a DeviationEnsemble (None without extra
    models); every system's species checked against every model's type map (InputError)."""
    if not extra_models:
        return None
    from jobs.deviation import DeviationEnsemble

    names = ["the md model (potential)"] + [f"md.deviation_models: {p}" for p in extra_models]
    ensemble = DeviationEnsemble.from_files([model_path, *extra_models], names)
    for atoms in structures:
        ensemble.check(atoms.get_chemical_symbols())
    return ensemble


def _fill_deviations(ensemble, store: RunStore, task: MdTask, done: int, spec: MdSpec) -> None:
    """Compute the deviations of saved frames that have none (a store whose md ran without an
    ensemble), chunk by chunk as :func:`_run_chunk` would have (independent writes)."""
    g = task.group
    missing = ~np.isfinite(store.read(f"{g}/{DEVIATION_DATASETS[0]}", np.s_[:done]))
    numbers = store.read(f"{system_group(task.system)}/numbers")
    for start in range(0, done, spec.chunk_frames):
        stop = min(start + spec.chunk_frames, done)
        if not missing[start:stop].any():
            continue
        rows = np.s_[start:stop]
        values = ensemble.force_deviation(numbers, store.read(f"{g}/positions_a", rows),
                                          store.read(f"{g}/cell_a", rows))
        for name, column in zip(DEVIATION_DATASETS, values):
            store.write_rows(f"{g}/{name}", start, column)


def _check_start(trajectory: Trajectory, task: MdTask, start: int, checks=None) -> None:
    """Refuse, before a replica's first step, a structure with species the DP model does not
    know (its type_map), non-finite positions or two atoms too close (InputError, exit 2)."""
    atoms = trajectory.atoms
    where = f"md: system {task.system!r}, replica {task.group}"
    type_map = getattr(atoms.calc, "type_dict", None)  # deepmd-kit's DP calculator
    if type_map is not None:
        check_species(atoms.numbers, list(type_map), where, "the DP model")
    min_distance_a = MIN_DISTANCE_A if checks is None else checks.min_distance_a
    what = "starting structure" if start == 0 else "resumed"
    check_frames(atoms.positions, atoms.cell.array, atoms.numbers, f"{where} ({what})",
                 max(start - 1, 0), min_distance_a)


def _check_frame(task: MdTask, frame: int, saved: int, time_fs: float, positions_a: np.ndarray,
                 cell_a: np.ndarray, numbers: np.ndarray, temperature_k: float,
                 energy_ev: float, spec: MdSpec, checks=None) -> None:
    """Stop a replica whose structure exploded (UnstableDynamics, exit 2): a non-finite
    position, cell or energy, two atoms closer than ``checks.min_distance_a``, or a temperature
    above ``checks.md_max_temperature_factor`` times ``md.temperature_k``."""
    min_distance_a = MIN_DISTANCE_A if checks is None else checks.min_distance_a
    factor = MD_MAX_TEMPERATURE_FACTOR if checks is None else checks.md_max_temperature_factor
    problem = frame_problem(positions_a, cell_a, numbers, min_distance_a)
    if problem is None and not np.isfinite(energy_ev):
        problem = f"potential energy {energy_ev} eV"
    if problem is None and not temperature_k <= factor * spec.temperature_k:
        problem = (f"temperature {temperature_k:.4g} K > checks.md_max_temperature_factor x "
                   f"md.temperature_k = {factor:g} x {spec.temperature_k:g} K")
    if problem is None:
        return
    raise UnstableDynamics(
        f"md: system {task.system!r}, replica {task.group} exploded at frame {frame} "
        f"(t = {time_fs:g} fs after equilibration): {problem}. "
        + (f"Its {saved} frames saved before (0..{saved - 1}) are kept in the store"
           if saved else "It had saved no frame yet")
        + " (a rerun repeats the same steps: change md.timestep_fs, md.temperature_k, the "
          "structure or the DP model)")


def _run_chunk(trajectory: Trajectory, task: MdTask, start: int, end: int, spec: MdSpec,
               store: RunStore, progress: Progress, checks=None, ensemble=None) -> None:
    """Run frames start..end-1 of one replica and write them with the resume state; every
    frame is checked (:func:`_check_frame`) before it is kept. With an `ensemble`
    (jobs.deviation.DeviationEnsemble) the chunk's force deviations are written with them."""
    atoms = trajectory.atoms
    n = end - start
    positions = np.empty((n, len(atoms), 3))
    cells = np.empty((n, 3, 3))
    temperature, energy = np.empty(n), np.empty(n)
    interval_fs = spec.save_every_steps * spec.timestep_fs
    for k in range(n):
        trajectory.run(spec.save_every_steps)
        positions[k] = atoms.get_positions()
        cells[k] = atoms.cell.array
        temperature[k] = atoms.get_temperature()
        energy[k] = atoms.get_potential_energy()
        _check_frame(task, start + k, start, interval_fs * (start + k + 1), positions[k],
                     cells[k], atoms.numbers, temperature[k], energy[k], spec, checks)
        progress.update(1)
    g = task.group
    store.write_rows(f"{g}/positions_a", start, positions)
    store.write_rows(f"{g}/cell_a", start, cells)
    store.write_rows(f"{g}/time_fs", start, interval_fs * np.arange(start + 1, end + 1))
    store.write_rows(f"{g}/temperature_k", start, temperature)
    store.write_rows(f"{g}/potential_energy_ev", start, energy)
    if ensemble is not None:  # a pure function of the saved frames (resumes bit for bit)
        for name, values in zip(DEVIATION_DATASETS,
                                ensemble.force_deviation(atoms.numbers, positions, cells)):
            store.write_rows(f"{g}/{name}", start, values)
    store.write_rows(f"{g}/resume_momenta", 0, atoms.get_momenta())
    store.write_rows(f"{g}/resume_thermostat", 0,
                     np.frombuffer(trajectory.thermostat_state(), dtype=np.uint8))
    store.write_rows(f"{g}/resume_saved", 0, np.array([end]))


def run(spec: MdSpec, inputs: StageInputs) -> MdResult:
    """Stage entry: every system's replicas (spec: MdSpec) into ``/md``.

    After a learn campaign (jobs/learn.py) md propagates with its final model 0 and records
    the deviation of its whole ensemble (unless ``md.deviation_models`` names others)."""
    from jobs.learn import has_campaign, learned_model_files

    if has_campaign(inputs.store):
        with learned_model_files(inputs.store) as paths:
            inputs.ctx.log(f"md: the learn campaign's DP ensemble ({len(paths)} models; model 0 "
                           f"propagates)")
            return run_replicas(spec, list(inputs.systems), inputs.ctx, inputs.store,
                                inputs.seeds.seed, checks=inputs.checks,
                                deviation_models=list(spec.deviation_models) or paths[1:],
                                model=paths[0])
    return run_replicas(spec, list(inputs.systems), inputs.ctx, inputs.store, inputs.seeds.seed,
                        model_fallback=inputs.dp_model, checks=inputs.checks)


# ---- the reader other stages use ------------------------------------------------------------
@dataclass(frozen=True)
class Replica:
    """One replica's trajectory in the store."""

    number: int
    group: str
    n_saved: int
    """Valid frames (``resume_saved``, written with every chunk; else the attribute
    ``n_saved``; else the dataset length)."""


@dataclass(frozen=True)
class MdTrajectories:
    """The md stage's trajectories of one system, as later stages read them (no communication).

    Attributes
    ----------
    system
        The system's name.
    numbers
        Atomic numbers of its atoms.
    replicas
        The replicas in replica order.
    """

    store: RunStore
    system: str
    numbers: np.ndarray
    replicas: tuple[Replica, ...]

    @property
    def group(self) -> str:
        """The system's store group (for messages)."""
        return self.replicas[0].group.rsplit("/", 1)[0]

    def replica(self, number: int) -> Replica:
        """The replica with this number."""
        for replica in self.replicas:
            if replica.number == number:
                return replica
        raise KeyError(f"{self.system}: no md replica {number}")

    def positions_a(self, replica: Replica, selection=()) -> np.ndarray:
        """Positions (A, unwrapped) of `selection` of the replica's frames."""
        return self.store.read(f"{replica.group}/positions_a", selection)

    def cell_a(self, replica: Replica, selection=()) -> np.ndarray:
        """Cells (A, rows are the vectors) of `selection` of the replica's frames."""
        return self.store.read(f"{replica.group}/cell_a", selection)

    def time_fs(self, replica: Replica, selection=()) -> np.ndarray:
        """Simulated time (fs, 0 = end of equilibration) of `selection` of the frames."""
        return self.store.read(f"{replica.group}/time_fs", selection)

    def has_model_deviation(self, replica: Replica) -> bool:
        """True when md recorded the replica's force deviation (a model ensemble)."""
        return self.store.exists(f"{replica.group}/{DEVIATION_DATASETS[0]}")

    def model_devi_f_ev_a(self, replica: Replica, selection=()) -> np.ndarray | None:
        """DP-GEN's force deviation ``max_devi_f`` (eV/A, max over atoms) of `selection` of the
        replica's frames (NaN where not written); None when md ran without a model ensemble."""
        name = f"{replica.group}/{DEVIATION_DATASETS[0]}"
        return self.store.read(name, selection) if self.store.exists(name) else None

    def model_devi_f_mean_ev_a(self, replica: Replica, selection=()) -> np.ndarray | None:
        """DP-GEN's ``avg_devi_f`` (eV/A, mean over atoms) of `selection` of the frames; None
        when md ran without a model ensemble."""
        name = f"{replica.group}/{DEVIATION_DATASETS[1]}"
        return self.store.read(name, selection) if self.store.exists(name) else None

    def trust_ev_a(self, replica: Replica) -> tuple[float, float] | None:
        """(trust_lo, trust_hi) of the force deviation (eV/A) md recorded; None without."""
        attrs = self.store.attrs(replica.group)
        if "trust_hi_ev_a" not in attrs:
            return None
        return float(attrs["trust_lo_ev_a"]), float(attrs["trust_hi_ev_a"])


def md_trajectories(store: RunStore, system: str, root: str = GROUP) -> MdTrajectories:
    """The trajectories of `system` in the store.

    Raises
    ------
    InputError
        When the store holds no md trajectory of `system`.
    """
    from engine.failure import InputError

    group = system_group(system, root)
    found = []
    for name in store.keys(group):
        if not (name.startswith("r") and name[1:].isdigit()):
            continue
        path = f"{group}/{name}"
        if not store.exists(f"{path}/positions_a"):
            continue
        length = store.shape(f"{path}/positions_a")[0]
        if store.exists(f"{path}/resume_saved"):  # written with every chunk
            n_saved = int(store.read(f"{path}/resume_saved")[0])
        else:
            n_saved = store.attrs(path).get("n_saved")
        n_saved = length if n_saved is None else min(int(n_saved), length)
        found.append(Replica(int(name[1:]), path, int(n_saved)))
    if not found or not store.exists(f"{group}/numbers"):
        raise InputError(f"the store has no md trajectories of system {system!r} "
                         f"(no {group}/r000/positions_a ...); run the md stage first")
    return MdTrajectories(store, system, np.asarray(store.read(f"{group}/numbers"), dtype=int),
                          tuple(sorted(found, key=lambda r: r.number)))


def thermostat_text(store: RunStore, system: str, root: str = GROUP) -> str | None:
    """How the md of `system` was thermostatted, in words (None without md of it)."""
    path = f"{system_group(system, root)}/r000"
    attrs = store.attrs(path)
    if "thermostat" not in attrs:
        return None
    temperature = f"at {attrs.get('temperature_k', float('nan')):g} K"
    if attrs["thermostat"] == "langevin":
        friction = attrs.get("friction_per_fs")
        damping = f", friction {friction:g} /fs" if friction else ""
        return f"a Langevin thermostat {temperature}{damping} (stochastic: slows hopping)"
    tdamp = attrs.get("thermostat_time_fs")
    return (f"a Nose-Hoover chain {temperature}"
            + (f", damping time {tdamp:g} fs" if tdamp else ""))
