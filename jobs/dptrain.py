"""Training DP models with deepmd-kit (``dp train`` / ``dp freeze`` as subprocesses): the
training input, the data sets, the hold-out errors. The potential stage trains one model; the
learn campaign trains its ensemble with the same function (:func:`train_dp`)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.external import run_program
from engine.failure import InputError
from engine.seeds import SeedStreams
from jobs.deepmd import import_deepmd_tf
from schemas.potential import DpTrainingSpec, PotentialSpec


@dataclass(frozen=True)
class HoldoutErrors:
    """RMSE of a model on held-out frames."""

    frames: int
    """Number of held-out frames."""
    energy_rmse_mev_per_atom: float
    """Energy RMSE per atom (meV/atom)."""
    force_rmse_ev_per_a: float
    """Force-component RMSE (eV/A)."""


def write_deepmd_system(frames, folder: Path, type_map: list[str]) -> None:
    """Write labelled frames (one composition, same atom order) as a deepmd/npy system.

    Parameters
    ----------
    frames
        ase.Atoms with energy (eV) and forces (eV/A) in their calculator.
    folder
        Output folder (type.raw, type_map.raw, set.000/{coord,box,energy,force}.npy).
    type_map
        Element of each DP type.
    """
    symbols = frames[0].get_chemical_symbols()
    unknown = sorted(set(symbols) - set(type_map))
    if unknown:
        raise InputError(f"potential: elements {unknown} of {frames[0].info.get('source', '?')} "
                         f"are not in potential.type_map {type_map}")
    for index, atoms in enumerate(frames):
        if atoms.get_chemical_symbols() != symbols:
            raise InputError(f"potential: frame {index} ({atoms.info.get('source', '?')}) has a "
                             "different composition or atom order than the first frame of its file")
    (folder / "set.000").mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "type.raw", [type_map.index(s) for s in symbols], fmt="%d")
    (folder / "type_map.raw").write_text("\n".join(type_map) + "\n")
    arrays = {
        "coord": [a.get_positions().ravel() for a in frames],
        "box": [a.cell.array.ravel() for a in frames],
        "energy": [a.get_potential_energy() for a in frames],
        "force": [a.get_forces().ravel() for a in frames],
    }
    for name, rows in arrays.items():
        np.save(folder / "set.000" / f"{name}.npy", np.asarray(rows, dtype=np.float64))


def split_holdout(n_frames: int, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """(training, held-out) frame indices: a random `fraction` held out (at least one if > 0)."""
    order = rng.permutation(n_frames)
    n_out = int(round(fraction * n_frames))
    if fraction > 0 and n_frames > 1:
        n_out = min(max(n_out, 1), n_frames - 1)
    return sorted(order[n_out:].tolist()), sorted(order[:n_out].tolist())


def deepmd_input(spec: DpTrainingSpec, train_systems: list[str], valid_systems: list[str],
                 seed: int) -> dict:
    """The deepmd-kit training input (se_e2_a + energy fitting) for `spec`."""
    seeds = SeedStreams(seed).rng("potential.deepmd").integers(1, 2**31 - 1, size=3).tolist()
    training = {
        "training_data": {"systems": train_systems, "batch_size": 1},
        "numb_steps": spec.steps, "seed": seeds[2], "disp_file": "lcurve.out",
        "disp_freq": max(1, min(1000, spec.steps // 20)),
        "save_freq": min(spec.checkpoint_every_steps, spec.steps),
        "save_ckpt": "model.ckpt",
    }
    if valid_systems:
        training["validation_data"] = {"systems": valid_systems, "batch_size": 1, "numb_btch": 4}
    return {
        "model": {
            "type_map": list(spec.type_map),
            "descriptor": {
                "type": "se_e2_a", "rcut": spec.rcut_a, "rcut_smth": spec.rcut_smooth_a,
                "sel": spec.sel, "neuron": list(spec.embedding_neurons),
                "axis_neuron": spec.axis_neurons, "type_one_side": True, "resnet_dt": False,
                "precision": spec.precision, "seed": seeds[0],
            },
            "fitting_net": {"neuron": list(spec.fitting_neurons), "resnet_dt": True,
                            "precision": spec.precision, "seed": seeds[1]},
        },
        "learning_rate": {"type": "exp", "start_lr": spec.start_lr, "stop_lr": spec.stop_lr,
                          "decay_steps": spec.decay_steps},
        "loss": {"type": "ener",
                 "start_pref_e": spec.energy_prefactors[0], "limit_pref_e": spec.energy_prefactors[1],
                 "start_pref_f": spec.force_prefactors[0], "limit_pref_f": spec.force_prefactors[1],
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": training,
    }


def _thread_env(threads: int) -> dict:
    """Thread settings of a deepmd-kit subprocess (the rest: engine.external)."""
    env = {name: str(threads) for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                           "DP_INTRA_OP_PARALLELISM_THREADS")}
    env["TF_NUM_INTEROP_THREADS"] = env["DP_INTER_OP_PARALLELISM_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_dp(args: list[str], workdir: Path, threads: int, log_name: str) -> None:
    """Run ``dp --tf <args>`` (deepmd-kit's CLI, this interpreter) in `workdir`, logging.
    ``dp train`` ends on a stop request (engine.stop.StopRequested; its checkpoints, every
    ``save_freq`` steps, stay in `workdir` for ``--restart``)."""
    command = [sys.executable, "-m", "deepmd", "--tf", *args]
    status = run_program(command, workdir, workdir / log_name, _thread_env(threads),
                         stoppable=args[:1] == ["train"])
    if status != 0:
        tail = (workdir / log_name).read_text()[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed ({status}) in {workdir}:\n{tail}")


def evaluation_time_ms(model_path: Path, atoms, repeats: int = 20) -> float:
    """Median wall time (ms) of one energy + force evaluation of `atoms` by a DP model."""
    from deepmd.infer import DeepPot

    import_deepmd_tf()
    model = DeepPot(str(model_path))
    types = _atom_types(atoms, model.get_type_map())
    coords, cells = atoms.positions.reshape(1, -1), atoms.cell.array.reshape(1, -1)
    model.eval(coords, cells, types)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.eval(coords, cells, types)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _atom_types(atoms, type_map: list[str]) -> list[int]:
    return [type_map.index(s) for s in atoms.get_chemical_symbols()]


def holdout_errors(model_path: Path, frames) -> HoldoutErrors:
    """Energy (per atom) and force RMSE of a DP model on labelled frames."""
    from deepmd.infer import DeepPot

    import_deepmd_tf()
    model = DeepPot(str(model_path))
    type_map = model.get_type_map()
    energy_sq, force_sq, n_force = [], 0.0, 0
    for atoms in frames:
        energy, forces, _ = model.eval(atoms.positions.reshape(1, -1),
                                       atoms.cell.array.reshape(1, -1),
                                       _atom_types(atoms, type_map))
        energy_sq.append(((float(energy.ravel()[0]) - atoms.get_potential_energy()) / len(atoms)) ** 2)
        force_sq += float(np.sum((forces.reshape(-1, 3) - atoms.get_forces()) ** 2))
        n_force += 3 * len(atoms)
    if not frames:
        return HoldoutErrors(0, float("nan"), float("nan"))
    return HoldoutErrors(len(frames), 1e3 * float(np.sqrt(np.mean(energy_sq))),
                         float(np.sqrt(force_sq / n_force)))


def train_dp(spec: DpTrainingSpec, train_sets: list[list], valid_sets: list[list], workdir: Path,
             seed: int, threads: int, log=print, *, train_names: list[str] | None = None,
             valid_names: list[str] | None = None,
             init_model: Path | None = None) -> tuple[Path, dict]:
    """Train, freeze and (maybe) compress a DP model on given frames in `workdir` (serial).

    Each set is written as one deepmd/npy system (``data/train-<name>``, ``data/test-<name>``),
    the deepmd-kit input (:func:`deepmd_input` with `seed`) as ``input.json``; then ``dp train``
    (restarting from the checkpoint a killed run left in `workdir`, if any), ``dp freeze`` and,
    unless ``spec.compress`` is ``never``, ``dp compress`` run in `workdir`.

    Parameters
    ----------
    spec
        The network, loss, optimiser and steps (a PotentialSpec is one).
    train_sets
        Labelled ase.Atoms (energy and forces in their calculator), one list per deepmd system:
        one composition and atom order per set.
    valid_sets
        Held-out frames, one list per system (empty lists are skipped): deepmd-kit's validation
        data, and the frames of the reported RMSEs.
    workdir
        Folder of the data, the input, the logs and the models (created if missing).
    seed
        Run seed; the three network seeds come from its ``potential.deepmd`` stream.
    threads
        Threads of the deepmd-kit subprocesses.
    log
        Progress messages go here.
    train_names, valid_names
        System names (default ``00``, ``01``, ... by position).
    init_model
        A frozen (uncompressed) model to start from (``dp train --init-frz-model``; DP-GEN's
        ``training_init_model``), else the networks start from the seeds.

    Returns
    -------
    (Path, dict)
        The model file to use (``frozen.pb`` or ``compressed.pb``), and a report:
        holdout_frames, energy_rmse_mev_per_atom and force_rmse_ev_per_a on the frames of
        `valid_sets` (NaN without any), train_s, model_file, model_mb, frozen_ms and
        compressed_ms (one evaluation of the first validation frame, else the first training
        frame).

    Raises
    ------
    InputError
        For an empty training set, or frames with elements not in ``spec.type_map``.
    """
    train_names = _set_names(train_names, train_sets, "train_names")
    valid_names = _set_names(valid_names, valid_sets, "valid_names")
    if not train_sets:
        raise InputError("potential: no training frames")
    workdir.mkdir(parents=True, exist_ok=True)
    train_systems, valid_systems, held_out = [], [], []
    for name, frames in zip(train_names, train_sets):
        if not frames:
            raise InputError(f"potential: training set {name} holds no frames")
        write_deepmd_system(frames, workdir / "data" / f"train-{name}", list(spec.type_map))
        train_systems.append(f"data/train-{name}")
    for name, frames in zip(valid_names, valid_sets):
        if frames:
            write_deepmd_system(frames, workdir / "data" / f"test-{name}", list(spec.type_map))
            valid_systems.append(f"data/test-{name}")
            held_out += list(frames)
    document = deepmd_input(spec, train_systems, valid_systems, seed)
    (workdir / "input.json").write_text(json.dumps(document, indent=2))
    start = time.monotonic()
    resumed = (workdir / "checkpoint").exists()
    if resumed:
        log("potential: resuming training from the checkpoint in " + str(workdir))
        run_dp(["train", "input.json", "--restart", "model.ckpt"], workdir, threads, "train.log")
    else:
        init = ["--init-frz-model", str(Path(init_model).resolve())] if init_model else []
        log(f"potential: dp train, {spec.steps} steps, {threads} threads"
            f"{' from ' + Path(init_model).name if init else ''} (log {workdir}/train.log)")
        run_dp(["train", "input.json", *init], workdir, threads, "train.log")
    train_s = time.monotonic() - start
    run_dp(["freeze", "-o", "frozen.pb"], workdir, threads, "freeze.log")
    chosen = workdir / "frozen.pb"
    probe_atoms = held_out[0] if held_out else train_sets[0][0]
    timing = {"frozen_ms": evaluation_time_ms(chosen, probe_atoms)}
    if spec.compress != "never":
        run_dp(["compress", "-i", "frozen.pb", "-o", "compressed.pb"], workdir, threads,
               "compress.log")
        timing["compressed_ms"] = evaluation_time_ms(workdir / "compressed.pb", probe_atoms)
        if spec.compress == "always" or timing["compressed_ms"] < timing["frozen_ms"]:
            chosen = workdir / "compressed.pb"
    errors = holdout_errors(chosen, held_out)
    report = {"holdout_frames": errors.frames,
              "energy_rmse_mev_per_atom": errors.energy_rmse_mev_per_atom,
              "force_rmse_ev_per_a": errors.force_rmse_ev_per_a,
              "train_s": train_s, "model_file": chosen.name,
              "model_mb": chosen.stat().st_size / 2**20,
              "resumed_from_checkpoint": resumed, **timing}
    return chosen, report


def _set_names(names: list[str] | None, sets: list, argument: str) -> list[str]:
    """`names`, or ``00``, ``01``, ... by position; one per set, each once."""
    if names is None:
        return [f"{number:02d}" for number in range(len(sets))]
    names = [str(name) for name in names]
    if len(names) != len(sets) or len(set(names)) != len(names):
        raise ValueError(f"train_dp: {argument} must name each of the {len(sets)} sets once "
                         f"(got {names})")
    return names


def train_model(spec: PotentialSpec, frames_per_file: list, workdir: Path, seed: int,
                threads: int, log=print) -> tuple[Path, dict]:
    """Train, freeze and (maybe) compress a DP model in `workdir` (one process; serial).

    Per file of ``spec.frames``, ``spec.holdout_fraction`` of its frames is held out (seed
    stream ``potential.holdout``); then :func:`train_dp` trains on the rest. A `workdir` left
    by a killed run is reused: training restarts from its last checkpoint.

    Parameters
    ----------
    spec
        The potential settings.
    frames_per_file
        The labelled frames of each file of ``spec.frames`` (lists of ase.Atoms).

    Returns
    -------
    (Path, dict)
        The frozen model to use, and a report: hold-out RMSE, timings, sizes, the input.
    """
    rng = SeedStreams(seed).rng("potential.holdout")
    train_sets, train_names, valid_sets, valid_names = [], [], [], []
    for number, (path, frames) in enumerate(zip(spec.frames, frames_per_file)):
        if not frames:
            raise InputError(f"potential.frames: {path} holds no frames")
        train_idx, held_idx = split_holdout(len(frames), spec.holdout_fraction, rng)
        name = f"{number:02d}-{Path(path).stem}"
        train_sets.append([frames[i] for i in train_idx])
        train_names.append(name)
        if held_idx:
            valid_sets.append([frames[i] for i in held_idx])
            valid_names.append(name)
        log(f"potential: {path}: {len(train_idx)} training, {len(held_idx)} held-out frames")
    return train_dp(spec, train_sets, valid_sets, workdir, seed, threads, log,
                    train_names=train_names, valid_names=valid_names)
