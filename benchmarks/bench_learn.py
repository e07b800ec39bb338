"""Score a learn campaign (jobs/stages/learn.py) against its oracle on frames it never saw.

For a campaign run with the `model` labeller (run/learn-oracle-p6322.yaml), the oracle is the
pair of shipped models (jobs/data/dp-p2-nmmo.pb, jobs/data/gpr-p2-nmmo.h5): every frame of a
test file is relabelled by it, and the campaign's final DP ensemble (each model and the
ensemble mean) and final shift model are scored on those labels. Prints one JSON line::

    .venv/bin/python benchmarks/bench_learn.py learn-oracle-p6322.h5 \\
        [--frames ../shared/data/p2-nmmo/p6322-dev.extxyz] [--random-baseline] \\
        [--oracle-dp jobs/data/dp-p2-nmmo-v1.pb]   # the oracle the campaign was labelled by

``--random-baseline`` also trains one DP model with the campaign's settings on its bootstrap
frames plus as many frames drawn at random from its explorations as the final models were
trained on beyond the bootstrap, labelled by the oracle, and scores it the same way:
deviation-selected against randomly selected frames at equal label counts. It trains from
scratch for as many steps as the campaign's final model 0 received in all (its iteration's
``dp.steps``; iteration 0's plus ``reuse_steps`` per later iteration when ``reuse_models``):
equal labels, equal training; ``--baseline-steps`` overrides that.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.shiftmodels.registry import load_shift_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "p2-nmmo"


def dp_labels(model_path: Path, frames) -> tuple[np.ndarray, np.ndarray]:
    """Energies (eV) and forces (eV/A) of `frames` by one frozen DP model."""
    from deepmd.infer import DeepPot

    from jobs.deepmd import deepmd_positions, import_deepmd_tf

    import_deepmd_tf()
    model = DeepPot(str(model_path))
    types = [model.get_type_map().index(s) for s in frames[0].get_chemical_symbols()]
    energies, forces = [], []
    for atoms in frames:
        cell = atoms.cell.array
        e, f, _ = model.eval(deepmd_positions(atoms.positions, cell).reshape(1, -1),
                             cell.reshape(1, -1), types)
        energies.append(float(e.ravel()[0]))
        forces.append(f.reshape(-1, 3))
    return np.asarray(energies), np.asarray(forces)


def scores(energy, forces, ref_energy, ref_forces, n_atoms: int) -> dict:
    """Force RMSE (eV/A) and energy RMSE per atom (meV/atom), raw and with the mean offset
    removed (two DP models may differ by a constant)."""
    de = (energy - ref_energy) / n_atoms
    return {"force_rmse_ev_per_a": float(np.sqrt(np.mean((forces - ref_forces) ** 2))),
            "energy_rmse_mev_per_atom": 1e3 * float(np.sqrt(np.mean(de ** 2))),
            "energy_rmse_offset_removed_mev_per_atom": 1e3 * float(np.std(de))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--frames", default=str(DATA / "p6322-dev.extxyz"))
    parser.add_argument("--random-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--oracle-dp", default=None,
                        help="the DP model the campaign's labeller used (default: shipped)")
    parser.add_argument("--oracle-shift", default=None,
                        help="the shift model the campaign's labeller used (default: shipped)")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="training steps of the random baseline (default: as many as "
                             "the campaign's model 0 received in all)")
    args = parser.parse_args(argv)

    from engine.store import RunStore
    from jobs.frames import read_labelled_frames
    from jobs.layouts.learn import (
        GROUP,
        campaign_history,
        learned_model_files,
        learned_shift_model,
    )
    from jobs.shiftmodels.metrics import regression_metrics
    from jobs.shiftmodels.registry import featurizer_for
    from jobs.stages.infer import SHIPPED_MODEL
    from schemas.potential import SHIPPED_MODEL as SHIPPED_DP

    args.oracle_dp = Path(args.oracle_dp or SHIPPED_DP)
    args.oracle_shift = Path(args.oracle_shift or SHIPPED_MODEL)
    frames = read_labelled_frames(args.frames)
    n_atoms = len(frames[0])
    ref_energy, ref_forces = dp_labels(args.oracle_dp, frames)
    oracle_shift = load_shift_model(args.oracle_shift)
    ref_shift, _ = oracle_shift.predict(featurizer_for(oracle_shift).features(frames))
    store = RunStore(Path(args.store), None, mode="r")
    out = {"store": args.store, "test_frames": len(frames), "test_file": args.frames,
           "oracle": [str(args.oracle_dp), str(args.oracle_shift)]}
    attrs = store.attrs(GROUP)
    out.update(iterations=int(attrs["iterations"]), converged=bool(attrs["converged"]),
               stop_reason=str(attrs["stop_reason"]),
               labelled_frames=int(attrs["labelled_frames"]),
               learn_s=float(store.attrs("/stages/learn").get("elapsed_s", float("nan"))))
    out["history"] = campaign_history(store)
    with learned_model_files(store) as paths:
        labels = [dp_labels(path, frames) for path in paths]
    out["models"] = [scores(e, f, ref_energy, ref_forces, n_atoms) for e, f in labels]
    mean_e = np.mean([e for e, _ in labels], axis=0)
    mean_f = np.mean([f for _, f in labels], axis=0)
    out["ensemble_mean"] = scores(mean_e, mean_f, ref_energy, ref_forces, n_atoms)
    shift_model = learned_shift_model(store)
    pred, std = shift_model.predict(featurizer_for(shift_model).features(frames))
    out["shift_vs_oracle"] = regression_metrics(np.asarray(ref_shift, np.float64),
                                                np.asarray(pred, np.float64))
    z = (np.asarray(pred, np.float64) - ref_shift) / std
    out["shift_within_1_sigma"] = float(np.mean(np.abs(z) <= 1))
    if args.random_baseline:
        out["random_baseline"] = random_baseline(store, args, frames, ref_energy, ref_forces)
    store.close()
    print(json.dumps(out, default=float), flush=True)


def random_baseline(store, args, frames, ref_energy, ref_forces) -> dict:
    """One DP model on the bootstrap + as many random explored frames as the loop chose."""
    import yaml
    from ase import Atoms

    from jobs.dptrain import train_dp
    from jobs.labellers.model import ModelLabeller
    from jobs.layouts.label import labelled_frames_in
    from jobs.layouts.learn import BOOTSTRAP, iteration_group
    from schemas.label import ModelLabellerSpec
    from schemas.learn import LearnSpec
    from schemas.shift import ShiftSpec

    manifest = yaml.safe_load(store.attrs("/")["manifest_yaml"])
    spec = LearnSpec(**manifest.get("learn", {}))
    systems = store.keys(f"{BOOTSTRAP}/label")
    boot = labelled_frames_in(store, [f"{BOOTSTRAP}/label/{s}" for s in systems])
    pool, chosen = [], 0
    final = int(store.attrs("/learn")["final_iteration"])
    for iteration in range(final + 1):
        it = iteration_group(iteration)
        for s in systems:
            if iteration < final and store.exists(f"{it}/counts/{s}"):  # the final models' data
                counts = store.attrs(f"{it}/counts/{s}")
                chosen += int(counts.get("selected_by_deviation", 0)) + int(
                    counts.get("selected_by_shift", 0))
            g = f"{it}/explore/{s}"
            devi = store.read(f"{g}/max_devi_f_ev_a")
            numbers = store.read(f"{BOOTSTRAP}/label/{s}/numbers")
            for t, f in np.argwhere(np.isfinite(devi)):
                pool.append((numbers, store.read(f"{g}/positions_a")[t, f],
                             store.read(f"{g}/cell_a")[t, f]))
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(pool), size=min(chosen, len(pool)), replace=False)
    oracle = ModelLabeller.from_spec(ModelLabellerSpec(dp_model=args.oracle_dp,
                                                       shift_model=args.oracle_shift),
                                     ShiftSpec())
    labelled = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, index in enumerate(picks):
            numbers, xyz, cell = pool[index]
            atoms = Atoms(numbers=numbers, positions=xyz, cell=cell, pbc=True)
            atoms.wrap()
            labelled.append(oracle.label(atoms, Path(tmp) / f"f{k}", "random"))
        steps = args.baseline_steps or (
            spec.dp.steps_at(0) + final * spec.reuse_steps if spec.reuse_models
            else spec.dp.steps_at(final))
        started = time.monotonic()
        path, _ = train_dp(spec.dp.model_copy(update={"steps": steps}), [boot + labelled], [],
                           Path(tmp) / "dp", args.seed, 2, log=lambda m: None)
        train_s = time.monotonic() - started
        energy, forces = dp_labels(path, frames)
    return {"frames": len(boot) + len(labelled), "random_explored_frames": len(labelled),
            "steps": steps, "train_s": train_s, **scores(energy, forces, ref_energy, ref_forces,
                                         len(frames[0]))}


if __name__ == "__main__":
    main()
