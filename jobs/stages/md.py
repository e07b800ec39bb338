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

import dataclasses

from jobs.artefacts import dp_choice, dp_model_files, published_in

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.context import RankContext
from engine.progress import Progress
from engine.seeds import SeedStreams
from engine.stages import StageInputs, StageResult
from engine.stop import stop_point
from engine.store import RunStore
from jobs.deepmd import dp_calculator
from jobs.dynamics import Trajectory
from jobs.frame_checks import (
    MD_MAX_TEMPERATURE_FACTOR,
    MIN_DISTANCE_A,
    UnstableDynamics,
    check_frames,
    check_species,
    frame_problem,
)
from jobs.layouts.md import (
    DEVIATION_DATASETS,
    MdTask,
    _check_compatible,
    create_datasets,
    create_deviation_datasets,
    md_tasks,
    system_group,
)
from jobs.layouts.potential import stored_model_file
from jobs.structures import build_structure
from schemas.md import MdSpec


class StoppedOnPurpose(RuntimeError):
    """Raised by the diagnostics knob md.stop_after_frames."""


@dataclass(frozen=True)
class MdResult(StageResult):
    """Trajectories run, frames each, their mean temperature and the save interval."""

    trajectories: int
    frames_per_trajectory: int
    mean_temperature_k: float
    save_interval_fs: float
    dp_model: str = ""
    """Which DP model propagated, and why (jobs.artefacts)."""


# ---- the integrator -----------------------------------------------------------------------------


# ---- the store ---------------------------------------------------------------------------------


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
    specs = [system_md_spec(spec, s) for s in systems]  # each system at its temperature
    interval_fs = spec.save_every_steps * spec.timestep_fs
    extra_models = [Path(p) for p in (spec.deviation_models if deviation_models is None
                                      else deviation_models)]
    with store.transaction():  # every group, dataset and attribute of the stage, at once
        _declare_replicas(store, specs, systems, structures, tasks, seeds, interval_fs,
                          extra_models)
    saved = {t.group: int(store.read_shared(f"{t.group}/resume_saved")[0]) for t in tasks}
    mine = [tasks[i] for i in ctx.round_robin(len(tasks))]

    with (nullcontext(Path(model)) if model is not None
          else stored_model_file(store, model_fallback)) as model_path:
        calculator = dp_calculator(model_path)  # one model load per rank
        ensemble = _deviation_ensemble(model_path, extra_models, structures)
    trajectories = _open_trajectories(specs, store, mine, structures, calculator, seeds, saved,
                                      ensemble)
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
            _run_chunk(trajectory, task, start, end, specs[task.system_index], store, progress,
                       checks, ensemble)
            saved[task.group] = end
        # rows and resume state only (no metadata: a kill here cannot damage the store)
        store.flush()
        stop_point(ctx, f"in md after round {round_index + 1} of {n_rounds} ({end} of "
                        f"{spec.frames} frames per replica saved)")
        if spec.stop_after_frames is not None and end >= spec.stop_after_frames \
                and end < spec.frames:
            raise StoppedOnPurpose(f"md.stop_after_frames={spec.stop_after_frames}: stopped "
                                   f"after {end} frames per replica")
    progress.finish()
    _record_saved(ctx, store, tasks, mine, saved)
    return MdResult(trajectories=len(tasks), frames_per_trajectory=spec.frames,
                    mean_temperature_k=_mean_temperature(ctx, store, mine),
                    save_interval_fs=interval_fs)


def system_md_spec(spec: MdSpec, system) -> MdSpec:
    """The md settings of one system: `spec` at the system's own temperature when it has one
    (``systems[].temperature_k``, or ``md.temperatures_k`` expanded), else `spec`."""
    temperature = getattr(system, "temperature_k", None)
    if temperature is None or temperature == spec.temperature_k:
        return spec
    return spec.model_copy(update={"temperature_k": float(temperature)})


def _declare_replicas(store: RunStore, specs: list[MdSpec], systems, structures,
                      tasks: list[MdTask], seeds: SeedStreams, interval_fs: float,
                      extra_models: list[Path]) -> None:
    """Every system's group and every replica's datasets and attributes (collective: the same
    calls in the same order on every rank; the caller holds the store transaction)."""
    for i, system in enumerate(systems):
        store.put(f"{system_group(system.name)}/numbers", structures[i].numbers.astype(np.int64))
        store.set_attrs(system_group(system.name), structure=system.structure,
                        supercell=list(system.supercell), n_atoms=len(structures[i]))
    for task in tasks:  # collective: same order everywhere
        spec = specs[task.system_index]
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


def _open_trajectories(specs: list[MdSpec], store: RunStore, mine: list[MdTask], structures,
                       calculator, seeds: SeedStreams, saved: dict,
                       ensemble) -> dict[str, Trajectory]:
    """This rank's replicas as trajectories, by group: new, or restored from their last saved
    frame; saved frames without force deviations get theirs (independent writes)."""
    trajectories: dict[str, Trajectory] = {}
    for task in mine:
        spec = specs[task.system_index]
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
    return trajectories


def _record_saved(ctx: RankContext, store: RunStore, tasks: list[MdTask], mine: list[MdTask],
                  saved: dict) -> None:
    """Every replica's ``n_saved``, gathered from the rank that ran it (collective, one
    store transaction)."""
    counts = ctx.comm.allgather({t.group: saved[t.group] for t in mine})
    merged = {k: v for part in counts for k, v in part.items()}
    with store.transaction():
        for task in tasks:  # collective, same order
            store.set_attrs(task.group, n_saved=merged[task.group])


def _mean_temperature(ctx: RankContext, store: RunStore, mine: list[MdTask]) -> float:
    """Mean temperature (K) over every replica's saved frames (collective)."""
    temperatures = []
    for task in mine:
        temperatures.append(float(np.mean(store.read(f"{task.group}/temperature_k"))))
    all_temperatures = [t for part in ctx.comm.allgather(temperatures) for t in part]
    return float(np.mean(all_temperatures))


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

    The DP model is chosen by :func:`jobs.artefacts.dp_choice`: after a learn campaign md
    propagates with its final model 0 and records the deviation of its whole ensemble (unless
    ``md.deviation_models`` names others); else the potential stage's model, ``potential.model``
    or the shipped one."""
    choice = dp_choice(published_in(inputs.store), inputs.dp_model)
    with dp_model_files(choice, inputs.store) as paths:
        if choice.source == "learn":
            inputs.ctx.log(f"md: the learn campaign's DP ensemble ({len(paths)} models; model 0 "
                           f"propagates; {choice.why})")
        else:
            inputs.ctx.log(f"md: DP model: {choice.describe()}")
        deviation_models = None
        if choice.source == "learn":
            deviation_models = list(spec.deviation_models) or paths[1:]
        result = run_replicas(spec, list(inputs.systems), inputs.ctx, inputs.store,
                              inputs.seeds.seed, checks=inputs.checks,
                              deviation_models=deviation_models, model=paths[0])
    return dataclasses.replace(result, dp_model=choice.describe())


# ---- the reader other stages use ------------------------------------------------------------


