"""The learn stage: concurrent learning (DP-GEN) of the DP potential and of the shift model.

From each system's structure alone, one run goes to a validated DP ensemble and a calibrated
shift model (docs/learn.md):

0. bootstrap: perturbed copies of every structure (dpdata ``perturb``), labelled by the label
   section's labeller through the label stage's machinery (claims, retries, failure budget,
   recovery of finished jobs; never twice);
1. iteration i, on every frame labelled so far (the bootstrap's and iterations < i'):
   - train: ``learn.models`` DP models (deepmd-kit, different seeds, same data) in parallel,
     one per rank; the first ``validation_fraction`` of each table's frames (a seeded draw,
     fixed for the table) are held out and the energy / force RMSE on them recorded;
   - shift: the GPR shift model (jobs/shiftmodels/gpr.py) on the labelled target nuclei, its sigma
     calibrated by frame-level CV;
   - explore: md of every system at every temperature with model 0 (Nose-Hoover chain), the
     ensemble's force deviation (DP-GEN ``max_devi_f``, jobs/deviation.py) at every saved frame;
   - select: per system, candidates ``trust_lo <= deviation < trust_hi``, at most
     ``max_candidates_per_system`` spread evenly over temperature and time; frames at or above
     trust_hi are counted, not labelled; plus ``shift.budget_per_iteration`` frames (deviation
     below trust_hi) for the shift model: greedy V-optimal picks (each the frame whose labels
     most reduce the summed posterior variance of the explored pool given every label, the
     deviation picks and the picks before it) for the linear kernel, else the frames of
     largest predicted variance;
   - label: the selected frames (one single point gives energy, forces and A_iso at once);
   - stop when the accurate fraction (deviation < trust_lo) reaches ``accurate_fraction`` in
     two successive iterations (that iteration labels nothing), or after ``max_iterations``.
2. the final shift model on every label.

Every phase's results are in the store, under ``/learn/iter_NNN`` (models, deviations,
candidates, labels, counts), so a run stopped anywhere resumes where it was: a trained model,
an explored trajectory or a labelled frame is never made twice, and a model or an exploration
killed half-way is redone from its start with the same seeds, so the campaign's numbers are
those of an uninterrupted run.
Readers: :func:`learned_model_files` (md), :func:`learned_shift_model` (infer),
:func:`campaign_history` (show, report).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from engine.failure import InputError
from engine.stages import StageInputs, StageResult
from engine.stop import StopRequested, stop_point
from engine.store import RunStore
from jobs.layouts.learn import (
    BOOTSTRAP,
    FINAL_SHIFT,
    GROUP,
    _table_groups,
    iteration_group,
    model_files,
)
from schemas.learn import LearnSpec


@dataclass(frozen=True)
class LearnResult(StageResult):
    """How the campaign ended."""

    iterations: int
    """Iterations run (complete)."""
    converged: bool
    """True when the accurate fraction reached the threshold in two successive iterations."""
    stop_reason: str
    labelled_frames: int
    """Frames labelled over the whole campaign (bootstrap included)."""
    accurate_fractions: tuple[float, ...] = ()
    """Accurate fraction of the exploration of each iteration."""

    def summary(self) -> dict:
        """The outcome as a plain dict."""
        summary = dict(self.__dict__)
        summary["accurate_fractions"] = list(self.accurate_fractions)
        return summary


# ---- bootstrap -----------------------------------------------------------------------------
def perturbed_frames(atoms: Atoms, spec, seed: int) -> list[Atoms]:
    """`spec.frames_per_system` perturbed copies of `atoms` (dpdata ``System.perturb``).

    dpdata draws from numpy's global generator: it is seeded with `seed` for the call and
    restored after, so the copies are a function of `seed` alone. Atom order and species are
    kept (checked).
    """
    import dpdata

    state = np.random.get_state()
    try:
        np.random.seed(int(seed) % 2**32)
        system = dpdata.System(atoms, fmt="ase/structure")
        perturbed = system.perturb(pert_num=spec.frames_per_system,
                                   cell_pert_fraction=spec.cell_strain,
                                   atom_pert_distance=spec.displacement_a,
                                   atom_pert_style="normal")
    finally:
        np.random.set_state(state)
    frames = perturbed.to("ase/structure")
    for frame in frames:
        if not np.array_equal(frame.numbers, atoms.numbers):
            raise RuntimeError("dpdata changed the atom order of a perturbed frame")
        frame.pbc = True
        frame.wrap()
    return frames


# ---- data -----------------------------------------------------------------------------------


def labelled_data(store: RunStore, systems, before: int, validation_fraction: float, seeds):
    """Per system: (training frames, validation frames) of every table before iteration
    `before`. A table's validation frames are a seeded draw over its rows (stream
    ``learn.holdout`` at (system, table)), the same in every iteration."""
    from jobs.layouts.label import labelled_frames_in

    per_system = []
    for s, system in enumerate(systems):
        train, valid = [], []
        for table, group in _table_groups(store, [system], before):
            n_rows = int(store.attrs(group)["n_selected"])
            order = seeds.rng("learn.holdout", s, table).permutation(n_rows)
            held = set(order[:int(round(validation_fraction * n_rows))].tolist())
            for atoms in labelled_frames_in(store, [group]):
                row = int(atoms.info["source"].rsplit("#", 1)[1])
                (valid if row in held else train).append(atoms)
        per_system.append((train, valid))
    return per_system


def screened_data(data, inputs, group: str):
    """`data` without the labels the screen flags (jobs/label_screen.py; `checks` of the
    manifest). Explorations span temperatures, so energies are screened only against
    ``checks.label_reference_model``; forces, SCF and moment always. The screen's counts and
    sentence go to the iteration's attributes (`group`)."""
    from jobs.label_screen import screen_for_training

    sets = [frames for pair in data for frames in pair]       # train, valid of each system
    kept, screen = screen_for_training(sets, inputs.checks, inputs.label, "learn", inputs.ctx,
                                       energy_test=False)
    inputs.store.set_attrs(group, **screen.summary())
    return list(zip(kept[0::2], kept[1::2]))


# ---- the DP ensemble ---------------------------------------------------------------------------
STOPPED_MARK = "STOPPED_ON_REQUEST"
"""File left in a model's training folder when a requested stop ended ``dp train``: the next
run resumes that training from deepmd-kit's checkpoint instead of starting again."""


def train_ensemble(spec: LearnSpec, ctx, store: RunStore, iteration: int, data, seeds,
                   work: Path) -> list[bytes]:
    """The iteration's DP models (bytes), trained one per rank in turn, stored once each."""
    from jobs.dptrain import train_dp

    group = f"{iteration_group(iteration)}/models"
    blobs: list[bytes | None] = [None] * spec.models
    for k in range(spec.models):
        if store.exists(f"{group}/model_{k}"):
            blobs[k] = bytes(store.read(f"{group}/model_{k}"))
    todo = [k for k in range(spec.models) if blobs[k] is None]
    previous = f"{iteration_group(iteration - 1)}/models"
    reuse = spec.reuse_models and iteration > 0 and all(
        store.exists(f"{previous}/model_{k}") for k in range(spec.models))
    steps = spec.dp.steps_at(iteration)
    dp_spec = spec.dp.model_copy(update={"steps": steps})
    if reuse:
        dp_spec = spec.dp.model_copy(update={
            "steps": spec.reuse_steps, "start_lr": spec.reuse_start_lr,
            "decay_steps": max(1, round(spec.dp.decay_steps * spec.reuse_steps / steps))})
    for round_start in range(0, len(todo), ctx.size):
        batch = todo[round_start:round_start + ctx.size]
        mine = batch[ctx.rank] if ctx.rank < len(batch) else None
        outcome = None
        if mine is not None:
            try:
                train_sets = [train for train, _ in data if train]
                valid_sets = [valid for _, valid in data if valid]
                # from scratch after a kill: the same seed gives the same model (tested); a
                # restart from deepmd-kit's checkpoint would not, so it is taken only after a
                # requested stop (the folder's STOPPED_MARK), and the model records it
                folder = work / f"iter_{iteration:03d}" / f"model_{mine}"
                if not (folder / STOPPED_MARK).exists():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    ctx.log(f"learn iteration {iteration}: model {mine} resumes from the "
                            "checkpoint of a requested stop (its numbers will differ from an "
                            "uninterrupted training's in the last digits)")
                (folder / STOPPED_MARK).unlink(missing_ok=True)
                init = None
                if reuse:
                    folder.mkdir(parents=True, exist_ok=True)
                    init = folder / "init.pb"
                    init.write_bytes(bytes(store.read(f"{previous}/model_{mine}")))
                chosen, report = train_dp(
                    dp_spec, train_sets, valid_sets, folder,
                    seeds.integer("learn.deepmd", iteration, mine), ctx.cores, ctx.log,
                    init_model=init)
                report.update(reused=bool(reuse), steps=dp_spec.steps)
                outcome = (mine, chosen.read_bytes(), report, None)
            except StopRequested as stop:  # dp train ended; its checkpoint stays
                folder.mkdir(parents=True, exist_ok=True)
                (folder / STOPPED_MARK).write_text(stop.signal_name or "stop")
                outcome = (mine, None, None, stop)
            except Exception as exc:  # noqa: BLE001 - agreed below
                outcome = (mine, None, None, f"{type(exc).__name__}: {exc}")
        gathered = ctx.comm.allgather(outcome)
        stops = [o[3] for o in gathered if o is not None and isinstance(o[3], StopRequested)]
        errors = [o[3] for o in gathered if o is not None and isinstance(o[3], str)]
        if errors:
            raise RuntimeError(f"learn iteration {iteration}: DP training failed: {errors[0]}")
        with store.transaction():  # the models of this round that finished (all, unless stopped)
            for item in gathered:
                if item is None or item[1] is None:
                    continue
                k, blob, report, _ = item
                numbers = {key: value for key, value in report.items()
                           if isinstance(value, (int, float, bool, str))}
                store.put_bytes(f"{group}/model_{k}", blob, **numbers)
                blobs[k] = blob
        if stops:
            raise StopRequested(f"in learn iteration {iteration} while training DP models "
                                f"({sum(b is not None for b in blobs)} of {spec.models} done; "
                                "the others resume from their checkpoints)",
                                stops[0].signal_name)
    return blobs




# ---- the shift model ---------------------------------------------------------------------------
def fit_shift_model(spec: LearnSpec, ctx, store: RunStore, group: str, frames, species,
                    centre: str, shift_spec, seeds) -> dict:
    """The GPR shift model of `frames` under ``<group>`` (``<group>/gpr`` + settings), its sigma
    calibrated by frame-level CV; returns the CV metrics."""
    from jobs.shift import ppm_per_mhz
    from jobs.shiftmodels import gpr
    from jobs.shiftmodels.metrics import regression_metrics
    from jobs.shiftmodels.rows import centre_rows, frame_folds, gather_features
    from jobs.shiftmodels.soap import SoapFeaturizer
    from schemas.train import GprSpec

    if store.attrs(f"{group}/gpr").get("complete"):
        if int(store.attrs(group).get("n_frames", -1)) == len(frames):
            return {k: v for k, v in store.attrs(group).items() if k.startswith("cv_")}
        with store.transaction():  # a longer campaign: more frames than the stored model's
            store.delete(group)
    shift = spec.shift
    rows = centre_rows(frames, centre, shift_spec)
    featurizer = SoapFeaturizer(species, centre, shift.soap_r_cut_a, shift.soap_sigma_a,
                                shift.soap_n_max, shift.soap_l_max, periodic=True)
    features = gather_features(featurizer, frames, ctx)
    gspec = GprSpec(zeta=[shift.zeta], regularisation=[shift.regularisation],
                    n_sparse=[shift.n_sparse])
    folds = min(shift.folds, len(frames))
    fold_of_row = frame_folds(len(frames), folds, seeds.seed)[rows.frame]
    cv = gpr.cross_validate(features, rows.shift_ppm, fold_of_row, gspec, seeds, ctx.comm)
    zeta, lam, n_sparse = cv.grid[0]
    scale = float(cv.curve.std_scale_ppm[0])
    settings = {"soap": featurizer.settings(), "species": list(species), "centre": centre,
                "model": gpr.MODEL_NAME}
    model = gpr.fit(features, rows.shift_ppm, zeta, lam, n_sparse, scale, gspec, seeds,
                    ctx.comm, settings, seed_index=folds)
    metrics = regression_metrics(rows.shift_ppm, cv.predictions_ppm[0])
    cover = gpr.coverage(cv.predictions_ppm[0] - rows.shift_ppm,
                         scale * np.sqrt(cv.raw_variance[0]))
    with store.transaction():
        store.set_attrs(group, model=gpr.MODEL_NAME, soap=featurizer.settings(),
                        species=list(species), centre=centre, shift=shift_spec.constants(),
                        ppm_per_mhz=ppm_per_mhz(shift_spec), n_frames=len(frames),
                        n_rows=len(rows.shift_ppm), folds=folds,
                        cv_rmse_ppm=metrics["rmse_ppm"], cv_r2=metrics["r2"],
                        cv_within_1_sigma=cover["within_1_sigma"],
                        cv_within_2_sigma=cover["within_2_sigma"])
        model.write(store, f"{group}/gpr", complete=False)
        store.set_attrs(f"{group}/gpr", complete=True)
    return {"cv_rmse_ppm": metrics["rmse_ppm"], "cv_r2": metrics["r2"]}


# ---- exploration -------------------------------------------------------------------------------
def _explore_layout(spec: LearnSpec, store: RunStore, iteration: int, systems, structures):
    """Pre-size ``<it>/explore/<system>`` (collective): per temperature, the saved frames."""
    steps = spec.explore.steps[min(iteration, len(spec.explore.steps) - 1)]
    n_saved = max(1, steps // spec.explore.save_every_steps)
    n_temps = len(spec.explore.temperatures_k)
    for system, atoms in zip(systems, structures):
        g = f"{iteration_group(iteration)}/explore/{system.name}"
        m = len(atoms)
        store.create_dataset(f"{g}/positions_a", (n_temps, n_saved, m, 3), "f8",
                             fill_value=np.nan, unit="angstrom")
        store.create_dataset(f"{g}/cell_a", (n_temps, n_saved, 3, 3), "f8", fill_value=np.nan,
                             unit="angstrom")
        store.create_dataset(f"{g}/max_devi_f_ev_a", (n_temps, n_saved), "f8",
                             fill_value=np.nan, unit="eV/angstrom",
                             note="DP-GEN max_devi_f of the ensemble; inf after an explosion")
        store.create_dataset(f"{g}/done", (n_temps,), "i1", fill_value=0)
        store.set_attrs(g, temperatures_k=list(spec.explore.temperatures_k), steps=steps,
                        save_every_steps=spec.explore.save_every_steps, n_atoms=m)
    return steps, n_saved


def explore_one(atoms: Atoms, model_paths: list[Path], temperature_k: float, steps: int,
                spec: LearnSpec, velocity_rng, min_distance_a: float):
    """One exploration trajectory: saved positions, cells and the ensemble's deviation.

    md with model 0 under a Nose-Hoover chain; a frame that is not physical (non-finite, two
    atoms closer than `min_distance_a`, or hotter than 5x the target) ends the trajectory: its
    deviation is inf (counted as failed) and later frames stay NaN (not explored).
    """
    from jobs.deepmd import dp_calculator
    from jobs.deviation import DeviationEnsemble
    from jobs.dynamics import Trajectory
    from jobs.frame_checks import frame_problem
    from schemas.md import MdSpec

    explore = spec.explore
    md_spec = MdSpec(temperature_k=temperature_k, timestep_fs=explore.timestep_fs,
                     thermostat="nose-hoover-chain",
                     thermostat_time_fs=explore.thermostat_time_fs, equilibration_steps=0,
                     frames=max(1, steps // explore.save_every_steps),
                     save_every_steps=explore.save_every_steps)
    trajectory = Trajectory(atoms, dp_calculator(model_paths[0]), md_spec, velocity_rng,
                            np.random.default_rng(0))
    n_saved = md_spec.frames
    positions = np.full((n_saved, len(atoms), 3), np.nan)
    cells = np.full((n_saved, 3, 3), np.nan)
    broken = None
    for frame in range(n_saved):
        trajectory.run(explore.save_every_steps)
        xyz = trajectory.atoms.get_positions()
        cell = np.asarray(trajectory.atoms.cell)
        problem = frame_problem(xyz, cell, trajectory.atoms.numbers, min_distance_a)
        if problem is None and trajectory.atoms.get_temperature() > 5.0 * temperature_k:
            problem = f"temperature {trajectory.atoms.get_temperature():.0f} K"
        if problem is not None:
            broken = frame
            break
        positions[frame], cells[frame] = xyz, cell
    deviation = np.full(n_saved, np.nan)
    good = np.isfinite(cells[:, 0, 0])
    if good.any():
        ensemble = DeviationEnsemble.from_files(model_paths)
        deviation[good] = ensemble.force_deviation(atoms.numbers, positions[good],
                                                   cells[good])[0]
    if broken is not None:
        deviation[broken] = np.inf
    return positions, cells, deviation


def explore(spec: LearnSpec, ctx, store: RunStore, iteration: int, systems, structures,
            model_paths: list[Path], seeds, min_distance_a: float) -> None:
    """Every (system, temperature) trajectory of the iteration, dealt over the ranks; each is
    written whole by its rank, then flagged done (a resumed run redoes only undone ones)."""
    with store.transaction():
        steps, _ = _explore_layout(spec, store, iteration, systems, structures)
    tasks = [(s, t) for s in range(len(systems))
             for t in range(len(spec.explore.temperatures_k))]
    done = {s: store.read_shared(f"{iteration_group(iteration)}/explore/{systems[s].name}/done")
            for s in range(len(systems))}
    todo = [(s, t) for s, t in tasks if not done[s][t]]
    for index, (s, t) in enumerate(todo):
        if index % ctx.size != ctx.rank:
            continue
        g = f"{iteration_group(iteration)}/explore/{systems[s].name}"
        temperature = spec.explore.temperatures_k[t]
        started = time.monotonic()
        positions, cells, deviation = explore_one(
            structures[s], model_paths, temperature, steps, spec,
            seeds.rng("learn.explore", iteration, s, t), min_distance_a)
        store.write_rows(f"{g}/positions_a", t, positions[None])
        store.write_rows(f"{g}/cell_a", t, cells[None])
        store.write_rows(f"{g}/max_devi_f_ev_a", t, deviation[None])
        store.write_rows(f"{g}/done", t, [1])
        ctx.log(f"learn iteration {iteration}: explored {systems[s].name} at {temperature:g} K"
                f" ({steps} steps, {time.monotonic() - started:.0f} s): max deviation "
                f"{np.nanmax(deviation):.3f} eV/A")
    store.flush()
    ctx.comm.Barrier()


# ---- selection -------------------------------------------------------------------------------
def even_subset(pairs: np.ndarray, n: int) -> np.ndarray:
    """At most `n` of the (temperature, frame) `pairs`, evenly spaced in their order."""
    if len(pairs) <= n:
        return pairs
    return pairs[np.unique(np.linspace(0, len(pairs) - 1, n).round().astype(int))]


def select_frames(deviation: np.ndarray, spec: LearnSpec) -> tuple[np.ndarray, dict]:
    """Candidates of one system's exploration: (temperature, frame) pairs and the counts.

    `deviation` is (temperatures, frames) (NaN: not explored). Accurate: < trust_lo;
    candidate: trust_lo <= d < trust_hi; failed: >= trust_hi (inf: the md broke down). At most
    ``max_candidates_per_system`` candidates, evenly spaced over the candidates ordered by
    temperature, then time.
    """
    explored = np.isfinite(deviation) | np.isinf(deviation)
    accurate = explored & (deviation < spec.trust_lo_ev_a)
    failed = explored & (deviation >= spec.trust_hi_ev_a)
    candidate = explored & ~accurate & ~failed
    pairs = np.argwhere(candidate)  # row-major: temperature, then frame
    counts = {"explored": int(explored.sum()), "accurate": int(accurate.sum()),
              "candidate": int(candidate.sum()), "failed": int(failed.sum())}
    return even_subset(pairs, spec.max_candidates_per_system), counts


def shift_picks(std_per_frame: np.ndarray, deviation: np.ndarray, taken: np.ndarray,
                spec: LearnSpec) -> np.ndarray:
    """(temperature, frame) pairs of the frames the shift model is least sure of.

    `std_per_frame` is the mean predicted variance of each explored frame's target nuclei
    (temperatures, frames), NaN where not explored; only frames below trust_hi (a geometry the
    DP ensemble agrees on) and not already `taken` compete; ties by order.
    """
    budget = spec.shift.budget_per_iteration
    score = np.where(np.isfinite(deviation) & (deviation < spec.trust_hi_ev_a),
                     std_per_frame, np.nan)
    for t, f in taken:
        score[t, f] = np.nan
    flat = np.flatnonzero(np.isfinite(score.ravel()))
    if budget == 0 or not len(flat):
        return np.zeros((0, 2), dtype=int)
    order = flat[np.argsort(-score.ravel()[flat], kind="stable")][:budget]
    return np.stack(np.unravel_index(np.sort(order), score.shape), axis=1)


def reduction_picks(featurizer, labelled_gram: np.ndarray, numbers, positions_a,
                    cells_a, deviation: np.ndarray, taken: np.ndarray,
                    spec: LearnSpec) -> np.ndarray:
    """(temperature, frame) pairs for the shift budget by greedy V-optimal design.

    The pool: up to ``shift.pool_frames`` explored frames below trust_hi, not `taken`, evenly
    spread. The GP (linear kernel; lambda ``shift.selection_regularisation``, about the labels'
    noise-to-signal ratio) is conditioned on the labelled rows (`labelled_gram` = X^T X, in
    the shift model's SOAP) and on the rows of the `taken` frames (labelled this iteration
    anyway); then :func:`jobs.shiftmodels.gpr.variance_reduction_picks` picks one frame at a time.
    """
    from jobs.shiftmodels import gpr

    budget = spec.shift.budget_per_iteration
    ok = np.isfinite(deviation) & (deviation < spec.trust_hi_ev_a)
    for t, f in taken:
        ok[t, f] = False
    pool = even_subset(np.argwhere(ok), spec.shift.pool_frames)
    if budget == 0 or not len(pool):
        return np.zeros((0, 2), dtype=int)
    gram = np.array(labelled_gram, dtype=np.float64, copy=True)
    if len(taken):
        rows = featurizer.features_arrays(numbers, positions_a[taken[:, 0], taken[:, 1]],
                                          cells_a[taken[:, 0], taken[:, 1]])
        rows = np.asarray(rows, dtype=np.float64)
        gram += rows.T @ rows
    lam = spec.shift.selection_regularisation
    chol = gpr.solve_linear(gram, np.zeros(len(gram)), lam).chol
    del gram
    rows = featurizer.features_arrays(numbers, positions_a[pool[:, 0], pool[:, 1]],
                                      cells_a[pool[:, 0], pool[:, 1]])
    frame_of_row = np.repeat(np.arange(len(pool)), len(rows) // len(pool))
    picks = gpr.variance_reduction_picks(rows, frame_of_row, chol, lam, budget)
    chosen = pool[np.sort(picks)]
    return chosen[np.lexsort((chosen[:, 1], chosen[:, 0]))]


def _shift_variance(model, featurizer, numbers, positions, cells) -> np.ndarray:
    """Mean predicted variance (ppm^2) of the target nuclei of each frame."""
    rows = featurizer.features_arrays(numbers, positions, cells)
    _, std = model.predict(rows)
    n_frames = len(positions)
    return np.mean(np.asarray(std, np.float64).reshape(n_frames, -1) ** 2, axis=1)


def choose_and_prepare(spec: LearnSpec, ctx, store: RunStore, iteration: int, systems,
                       structures, shift_group: str, labelled=()) -> dict:
    """Select every system's frames and prepare its label table (collective, idempotent).

    `labelled`: every frame the shift model was fitted on (the V-optimal shift picks are
    conditioned on them)."""
    from jobs.layouts.label import prepare_table
    from jobs.shiftmodels.gpr import GprShiftModel
    from jobs.shiftmodels.soap import SoapFeaturizer

    it = iteration_group(iteration)
    counts = {}
    model = GprShiftModel.from_store(store, shift_group) \
        if spec.shift.budget_per_iteration else None
    featurizer = SoapFeaturizer.from_settings(model.settings["soap"], "auto") \
        if model is not None else None
    labelled_gram = None
    if model is not None and model.form == "weight-space" and ctx.rank == 0:
        rows = np.asarray(featurizer.features(list(labelled)), dtype=np.float64)
        labelled_gram = rows.T @ rows
        del rows
    for s, (system, atoms) in enumerate(zip(systems, structures)):
        g = f"{it}/explore/{system.name}"
        deviation = store.read_shared(f"{g}/max_devi_f_ev_a")
        positions_a, cells_a = store.read(f"{g}/positions_a"), store.read(f"{g}/cell_a")
        chosen, count = select_frames(deviation, spec)
        extra = np.zeros((0, 2), dtype=int)
        if model is not None and model.form == "weight-space":
            extra = reduction_picks(featurizer, labelled_gram, atoms.numbers,
                                    positions_a, cells_a, deviation, chosen, spec) \
                if ctx.rank == 0 else None
            extra = ctx.comm.bcast(extra, root=0)  # every rank: rank 0's picks
        elif model is not None:
            variance = np.full(deviation.shape, np.nan)
            for t in range(deviation.shape[0]):
                ok = np.flatnonzero(np.isfinite(deviation[t]) & (deviation[t] < spec.trust_hi_ev_a))
                if len(ok):
                    variance[t, ok] = _shift_variance(model, featurizer, atoms.numbers,
                                                      positions_a[t, ok], cells_a[t, ok])
            variance = ctx.comm.bcast(variance, root=0)  # every rank: rank 0's numbers
            extra = shift_picks(variance, deviation, chosen, spec)
        picks = np.concatenate([chosen, extra]) if len(extra) else chosen
        count.update(selected_by_deviation=len(chosen), selected_by_shift=len(extra))
        counts[system.name] = count
        store.put(f"{it}/select/{system.name}/temperature_index", picks[:, 0].astype(np.int64))
        store.put(f"{it}/select/{system.name}/frame", picks[:, 1].astype(np.int64))
        store.set_attrs(f"{it}/select/{system.name}", **count)
        if len(picks):
            positions = positions_a[picks[:, 0], picks[:, 1]]
            cells = cells_a[picks[:, 0], picks[:, 1]]
            times = (picks[:, 1] + 1) * spec.explore.save_every_steps * spec.explore.timestep_fs
            prepare_table(ctx, store, f"{it}/label/{system.name}",
                          name=f"{system.name}.iter_{iteration:03d}",
                          target_species=system.target_species, numbers=atoms.numbers,
                          positions_a=positions, cells_a=cells, replica=picks[:, 0],
                          frame=picks[:, 1], time_fs=times,
                          attrs={"iteration": iteration, "source": "learn.explore"})
    return counts


# ---- the stage ---------------------------------------------------------------------------------
def run(spec: LearnSpec, inputs: StageInputs) -> LearnResult:
    """Stage entry: the concurrent-learning loop (spec: LearnSpec)."""
    from jobs.frame_checks import MIN_DISTANCE_A
    from jobs.labelling import build_labeller, label_tables
    from jobs.layouts.label import prepare_table
    from jobs.structures import build_structure

    ctx, store, seeds, systems = inputs.ctx, inputs.store, inputs.seeds, list(inputs.systems)
    label_spec = inputs.label
    if label_spec is None:
        raise InputError("learn: the manifest's label section is needed (the labeller)")
    if not systems:
        raise InputError("learn: no systems")
    min_distance_a = inputs.checks.min_distance_a if inputs.checks else MIN_DISTANCE_A
    structures = [build_structure(s) for s in systems]
    species = sorted({str(x) for atoms in structures for x in atoms.get_chemical_symbols()})
    unknown = sorted(set(species) - set(spec.dp.type_map))
    if unknown:
        raise InputError(f"learn.dp.type_map: species {unknown} of the systems are missing "
                         f"(got {list(spec.dp.type_map)})")
    centre = systems[0].target_species
    work = Path(str(store.path) + ".learn")
    label_root = Path(label_spec.work_dir).resolve() / "learn"
    labeller = build_labeller(label_spec, ctx, inputs.shift, [centre])
    labeller.check(species)  # before any work: a species the labeller cannot label

    # 0. bootstrap
    with store.transaction():
        for s, (system, atoms) in enumerate(zip(systems, structures)):
            frames = perturbed_frames(atoms, spec.bootstrap, seeds.integer("learn.bootstrap", s))
            prepare_table(ctx, store, f"{BOOTSTRAP}/label/{system.name}",
                          name=f"{system.name}.bootstrap",
                          target_species=system.target_species, numbers=atoms.numbers,
                          positions_a=np.stack([f.positions for f in frames]),
                          cells_a=np.stack([np.asarray(f.cell) for f in frames]),
                          replica=np.zeros(len(frames), dtype=np.int64),
                          frame=np.arange(len(frames)), time_fs=np.full(len(frames), np.nan),
                          attrs={"source": "learn.bootstrap"})
    ctx.comm.Barrier()
    label_tables(label_spec, ctx, store, [(f"{BOOTSTRAP}/label/{s.name}", f"{s.name}.bootstrap",
                                           s.target_species) for s in systems],
                 inputs.shift, label_root, labeller=labeller)

    fractions, stop_reason, converged = [], None, False
    iteration = 0
    for iteration in range(spec.max_iterations):
        it = iteration_group(iteration)
        attrs = store.attrs(it)
        if attrs.get("complete"):
            fractions.append(float(attrs["accurate_fraction"]))
            if attrs.get("converged") or str(attrs.get("stop_reason", "")).startswith("stuck"):
                stop_reason, converged = str(attrs["stop_reason"]), bool(attrs["converged"])
                break
            if iteration == spec.max_iterations - 1:
                stop_reason = str(attrs["stop_reason"])
            continue  # an earlier run's last iteration (max_iterations): go on from it
        data = labelled_data(store, systems, iteration, spec.validation_fraction, seeds)
        data = screened_data(data, inputs, it)
        every = [a for train, valid in data for a in train + valid]
        ctx.log(f"learn iteration {iteration}: {sum(len(t) for t, _ in data)} training, "
                f"{sum(len(v) for _, v in data)} validation frames")
        blobs = train_ensemble(spec, ctx, store, iteration, data, seeds, work)
        stop_point(ctx, f"in learn iteration {iteration} after training its DP models")
        fit_shift_model(spec, ctx, store, f"{it}/shift", every, species, centre, inputs.shift,
                        seeds)
        stop_point(ctx, f"in learn iteration {iteration} after its shift model")
        with model_files(blobs) as paths:
            explore(spec, ctx, store, iteration, systems, structures, paths, seeds,
                    min_distance_a)
        stop_point(ctx, f"in learn iteration {iteration} after exploring")
        counts = {}
        for system in systems:
            deviation = store.read_shared(f"{it}/explore/{system.name}/max_devi_f_ev_a")
            counts[system.name] = select_frames(deviation, spec)[1]
        explored = sum(c["explored"] for c in counts.values())
        fraction = sum(c["accurate"] for c in counts.values()) / max(explored, 1)
        fractions.append(fraction)
        stop = len(fractions) >= 2 and min(fractions[-2:]) >= spec.accurate_fraction
        if stop:
            stop_reason, converged = (f"accurate fraction {fractions[-2]:.3f}, {fraction:.3f} "
                                      f">= {spec.accurate_fraction:g} in iterations "
                                      f"{iteration - 1} and {iteration}"), True
        else:
            with store.transaction():
                counts = choose_and_prepare(spec, ctx, store, iteration, systems, structures,
                                            f"{it}/shift", every)
            tables = [(f"{it}/label/{s.name}", f"{s.name}.iter_{iteration:03d}",
                       s.target_species) for s in systems
                      if store.exists(f"{it}/label/{s.name}/status")]
            if tables:
                label_tables(label_spec, ctx, store, tables, inputs.shift, label_root,
                             labeller=labeller)
            else:  # the next iteration would train on the same data and find the same
                failed = sum(c["failed"] for c in counts.values())
                stop_reason = (f"stuck: no explored frame below trust_hi = "
                               f"{spec.trust_hi_ev_a:g} eV/A to label ({failed} of {explored} "
                               f"failed); bootstrap more widely (learn.bootstrap), explore "
                               f"more gently (learn.explore) or raise learn.trust_hi_ev_a")
            if stop_reason is None and iteration == spec.max_iterations - 1:
                stop_reason = (f"max_iterations = {spec.max_iterations} reached (accurate "
                               f"fraction {fraction:.3f} < {spec.accurate_fraction:g})")
        with store.transaction():
            for name, count in counts.items():
                store.set_attrs(f"{it}/counts/{name}", **count)
            store.set_attrs(it, complete=True, accurate_fraction=fraction,
                            stopped=stop_reason is not None, stop_reason=stop_reason or "",
                            converged=converged)
        ctx.log(f"learn iteration {iteration}: accurate fraction {fraction:.3f} "
                f"({explored} explored frames){'; ' + stop_reason if stop_reason else ''}")
        if stop_reason is not None:
            break
    # the campaign's shift model on every label
    data = labelled_data(store, systems, len(fractions), 0.0, seeds)
    every = [a for train, _ in data for a in train]
    metrics = fit_shift_model(spec, ctx, store, FINAL_SHIFT, every, species, centre,
                              inputs.shift, seeds)
    final = len(fractions) - 1
    with store.transaction():
        store.set_attrs(GROUP, iterations=len(fractions), final_iteration=final,
                        converged=converged, stop_reason=stop_reason or "", models=spec.models,
                        labelled_frames=len(every), trust_lo_ev_a=spec.trust_lo_ev_a,
                        trust_hi_ev_a=spec.trust_hi_ev_a, complete=True)
    ctx.log(f"learn: {len(fractions)} iterations, {stop_reason}; {len(every)} labelled frames;"
            f" final shift model CV rmse {metrics.get('cv_rmse_ppm', float('nan')):.1f} ppm")
    return LearnResult(iterations=len(fractions), converged=converged,
                       stop_reason=stop_reason or "", labelled_frames=len(every),
                       accurate_fractions=tuple(fractions))


# ---- readers -----------------------------------------------------------------------------------








