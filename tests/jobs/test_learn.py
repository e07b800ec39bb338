"""The learn stage (concurrent learning): selection rules, the bootstrap, and a tiny campaign
under `mpirun -n 2 dynshift run` with the model labeller (the oracle), extended by a rerun."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from jobs.stages.learn import (
    even_subset,
    perturbed_frames,
    reduction_picks,
    select_frames,
    shift_picks,
)
from jobs.structures import build_structure
from schemas.learn import BootstrapSpec, LearnSpec
from schemas.system import SystemSpec


def test_selection_counts_and_spreads_candidates():
    spec = LearnSpec(trust_lo_ev_a=0.05, trust_hi_ev_a=0.15, max_candidates_per_system=3)
    deviation = np.array([[0.01, 0.06, 0.07, 0.2, np.nan],
                          [0.08, 0.09, 0.04, np.inf, np.nan]])
    chosen, counts = select_frames(deviation, spec)
    assert counts == {"explored": 8, "accurate": 2, "candidate": 4, "failed": 2}
    # 4 candidates (0,1) (0,2) (1,0) (1,1): 3 evenly spaced, by temperature then time
    assert chosen.tolist() == [[0, 1], [1, 0], [1, 1]]
    few = LearnSpec(max_candidates_per_system=10)
    assert len(select_frames(deviation, few)[0]) == 4
    # the shift picks: largest variance among frames below trust_hi not already taken
    variance = np.array([[5.0, 9.0, 1.0, 99.0, np.nan], [7.0, 2.0, 8.0, 50.0, np.nan]])
    picks = shift_picks(variance, deviation, chosen, LearnSpec(
        shift={"budget_per_iteration": 2}))
    assert picks.tolist() == [[0, 0], [1, 2]]  # 9.0 (0,1) is taken; 99 and 50 are >= trust_hi


class _RowsOfPositions:
    """A stand-in featurizer: two unit rows per frame, from its positions (6 features)."""

    def features_arrays(self, numbers, positions_a, cells_a):
        rows = np.asarray(positions_a, dtype=np.float64)[:, :4].reshape(-1, 6)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_shift_reduction_picks_condition_on_labels_and_deviation_picks():
    """The shift budget's picks are jobs.shiftmodels.gpr.variance_reduction_picks on the pool of frames
    below trust_hi and not taken (evenly thinned to pool_frames), conditioned on the labelled
    rows and on the taken frames' rows, mapped back to (temperature, frame)."""
    from jobs.shiftmodels import gpr

    rng = np.random.default_rng(3)
    positions = rng.normal(size=(2, 7, 4, 3))          # 2 temperatures x 7 frames x 4 atoms
    cells = np.broadcast_to(np.eye(3) * 9.0, (2, 7, 3, 3))
    deviation = rng.uniform(0.01, 0.1, size=(2, 7))
    deviation[0, 2] = 0.3                               # >= trust_hi: never in the pool
    deviation[1, 6] = np.nan                            # not explored
    taken = np.array([[0, 4], [1, 1]])                  # the deviation picks
    spec = LearnSpec(trust_hi_ev_a=0.2, shift={"budget_per_iteration": 3, "pool_frames": 8,
                                                "selection_regularisation": 1e-2})
    featurizer = _RowsOfPositions()
    labelled = featurizer.features_arrays(None, rng.normal(size=(2, 4, 3)), None)
    picks = reduction_picks(featurizer, labelled.T @ labelled, None, positions, cells,
                            deviation, taken, spec)
    # the pool: 14 - 1 (>= trust_hi) - 1 (NaN) - 2 (taken) = 10 frames, thinned evenly to 8
    ok = np.isfinite(deviation) & (deviation < 0.2)
    ok[0, 4] = ok[1, 1] = False
    pool = np.argwhere(ok)
    assert len(pool) == 10
    pool = even_subset(pool, 8)   # positions 0 1 3 4 5 6 8 9 of the 10, first and last kept
    assert pool.tolist() == [[0, 0], [0, 1], [0, 5], [0, 6], [1, 0], [1, 2], [1, 4], [1, 5]]
    given = np.concatenate([labelled, featurizer.features_arrays(
        None, positions[taken[:, 0], taken[:, 1]], None)])
    chol = gpr.solve_linear(given.T @ given, np.zeros(6), 1e-2).chol
    rows = featurizer.features_arrays(None, positions[pool[:, 0], pool[:, 1]], None)
    expected = gpr.variance_reduction_picks(rows, np.repeat(np.arange(8), 2), chol, 1e-2, 3)
    assert picks.tolist() == sorted(pool[expected].tolist())
    assert len(picks) == 3 and not {tuple(p) for p in picks} & {(0, 2), (1, 6), (0, 4), (1, 1)}
    # conditioning on the deviation picks matters: without them the picks may differ, and a
    # frame identical to a taken one is never worth a label
    positions[0, 5] = positions[0, 4]
    again = reduction_picks(featurizer, labelled.T @ labelled, None, positions, cells,
                            deviation, taken, spec)
    assert [0, 5] not in again.tolist()


def test_bootstrap_frames_are_seeded_perturbations():
    atoms = build_structure(SystemSpec(name="p", structure="builtin:p2-nmmo-p6322"))
    spec = BootstrapSpec(frames_per_system=3, displacement_a=0.1, cell_strain=0.02)
    frames = perturbed_frames(atoms, spec, seed=7)
    again = perturbed_frames(atoms, spec, seed=7)
    other = perturbed_frames(atoms, spec, seed=8)
    assert len(frames) == 3
    for a, b in zip(frames, again):
        np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.allclose(frames[0].positions, other[0].positions)
    for frame in frames:
        assert np.array_equal(frame.numbers, atoms.numbers)
        # dpdata may rotate the cell to lower-triangular form: compare lengths and volume
        lengths = frame.cell.lengths() / atoms.cell.lengths()
        assert np.all(np.abs(lengths - 1) < 0.03) and np.any(np.abs(lengths - 1) > 1e-4)
        assert abs(frame.get_volume() / atoms.get_volume() - 1) < 0.07
    # rms displacement ~ displacement_a (dpdata 'normal': d / sqrt(3) per component)
    shifts = frames[0].get_scaled_positions() - atoms.get_scaled_positions()
    shifts -= np.round(shifts)
    rms = np.sqrt(np.mean(np.sum((shifts @ frames[0].cell.array) ** 2, axis=1)))
    assert 0.05 < rms < 0.3


MANIFEST = """\
stages: [learn]
seed: 5
systems:
  - {{name: p6322, structure: "builtin:p2-nmmo-p6322"}}
label:
  labeller: model
  work_dir: work
learn:
  models: 2
  max_iterations: {iterations}
  trust_lo_ev_a: 1.0e-4
  trust_hi_ev_a: 50.0
  max_candidates_per_system: 2
  validation_fraction: 0.25
  reuse_models: true       # the --init-frz-model path through kill -9 and resume
  dp:
    steps: 20
    steps_per_iteration: [16, 20]  # iteration 0 shorter; reuse_steps from iteration 1 on
    decay_steps: 10
    sel: [20, 10, 20, 48]
    embedding_neurons: [4, 8]
    fitting_neurons: [8]
    compress: never
  bootstrap: {{frames_per_system: 4, displacement_a: 0.05, cell_strain: 0.01}}
  explore: {{temperatures_k: [300, 600], steps: [20, 40], save_every_steps: 10}}
  shift: {{budget_per_iteration: 1, soap_r_cut_a: 4.0, soap_n_max: 3, soap_l_max: 2,
          regularisation: 1.0e-4, folds: 2}}
"""


@pytest.fixture(scope="module")
def campaign(dynshift_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("learn")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(iterations, *extra):
        (folder / "m.yaml").write_text(MANIFEST.format(iterations=iterations))
        done = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store",
                               "c.h5", *extra], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done

    first = run(2)
    return folder, run, first


def _label_results(folder):
    return sorted((folder / "work").rglob("labelled.npz"))


def test_campaign_records_every_phase(campaign):
    from jobs.deviation import DeviationEnsemble
    from jobs.labellers.model import ModelLabeller
    from schemas.label import ModelLabellerSpec
    from schemas.shift import ShiftSpec

    folder, _, _ = campaign
    with h5py.File(folder / "c.h5", "r") as f:
        learn = f["/learn"]
        assert learn.attrs["iterations"] == 2 and not learn.attrs["converged"]
        assert "max_iterations" in learn.attrs["stop_reason"]
        boot = learn["bootstrap/label/p6322"]
        assert (boot["status"][()] == 1).all() and len(boot["status"]) == 4
        it0 = learn["iter_000"]
        assert set(it0["models"]) == {"model_0", "model_1"}
        assert [it0[f"models/model_{k}"].attrs["steps"] for k in range(2)] == [16, 16]
        assert not it0["models/model_0"].attrs["reused"]
        assert learn["iter_001/models/model_0"].attrs["reused"]
        dev = it0["explore/p6322/max_devi_f_ev_a"][()]
        assert dev.shape == (2, 2)  # 2 temperatures x (20 // 10) frames
        assert np.all(np.isfinite(dev)) and np.all(dev > 0)
        counts = dict(it0["counts/p6322"].attrs)
        assert counts["candidate"] == 4 and counts["selected_by_deviation"] == 2
        assert counts["selected_by_shift"] == 1
        table = it0["label/p6322"]
        assert (table["status"][()] == 1).all() and len(table["status"]) == 3
        # iteration 1 explores longer (40 steps) with models trained on more frames
        assert learn["iter_001/explore/p6322/max_devi_f_ev_a"].shape == (2, 4)
        positions = it0["explore/p6322/positions_a"][()]
        cells = it0["explore/p6322/cell_a"][()]
        numbers = f["/learn/bootstrap/label/p6322/numbers"][()]
        blobs = [bytes(it0[f"models/model_{k}"][()]) for k in range(2)]
        energy = table["energy_ev"][()]
        label_positions = table["positions_a"][()]
        label_cells = table["cell_a"][()]
        assert "cv_rmse_ppm" in f["/learn/shift"].attrs
    # the stored deviations are the ensemble's on the stored frames
    paths = []
    for k, blob in enumerate(blobs):
        path = folder / f"check_{k}.pb"
        path.write_bytes(blob)
        paths.append(path)
    again = DeviationEnsemble.from_files(paths).force_deviation(
        numbers, positions.reshape(-1, *positions.shape[2:]), cells.reshape(-1, 3, 3))[0]
    np.testing.assert_allclose(again, dev.ravel(), rtol=1e-6)
    # the labels are the oracle's
    from ase import Atoms

    oracle = ModelLabeller.from_spec(ModelLabellerSpec(), ShiftSpec())
    atoms = Atoms(numbers=numbers, positions=label_positions[0], cell=label_cells[0], pbc=True)
    assert oracle.label(atoms, folder / "probe", "t").get_potential_energy() == pytest.approx(
        energy[0], abs=1e-6)


def test_a_longer_campaign_reuses_what_is_done(campaign):
    folder, run, _ = campaign
    before = {p: p.stat().st_mtime_ns for p in _label_results(folder)}
    with h5py.File(folder / "c.h5", "r") as f:
        dev0 = f["/learn/iter_000/explore/p6322/max_devi_f_ev_a"][()]
    done = run(3, "--redo", "learn")
    after = {p: p.stat().st_mtime_ns for p in _label_results(folder)}
    # no frame labelled twice: every earlier result untouched, new ones for iteration 2 only
    assert all(after[p] == t for p, t in before.items())
    new = set(after) - set(before)
    assert new and all("p6322.iter_002" in str(p) for p in new)
    with h5py.File(folder / "c.h5", "r") as f:
        assert f["/learn"].attrs["iterations"] == 3
        np.testing.assert_array_equal(f["/learn/iter_000/explore/p6322/max_devi_f_ev_a"][()],
                                      dev0)
    assert "learn" in done.stdout
    # the history in words: dynshift show and the report
    from engine.show import show_store
    from jobs.stages.report import report_from_store

    summary = report_from_store(folder / "c.h5").read_text()
    assert "## Learn campaign" in summary and "- iteration 2: accurate fraction" in summary
    assert "not converged: max_iterations = 3 reached" in summary
    assert show_store(folder / "c.h5", installed={}) == 0


def _records(path, iterations=(0, 1)):
    """What a campaign made, iteration by iteration: deviations, selections, labels, counts."""
    out = {}
    with h5py.File(path, "r") as f:
        for i in iterations:
            it = f[f"/learn/iter_{i:03d}"]
            out[i] = {"devi": it["explore/p6322/max_devi_f_ev_a"][()],
                      "frame": it["select/p6322/frame"][()],
                      "energy": it["label/p6322/energy_ev"][()],
                      "status": it["label/p6322/status"][()],
                      "counts": dict(it["counts/p6322"].attrs),
                      "fraction": it.attrs["accurate_fraction"]}
        out["bootstrap"] = f["/learn/bootstrap/label/p6322/energy_ev"][()]
    return out


@pytest.mark.parametrize("trigger,occurrence", [("dp train", 1), ("explored", 1),
                                                ("frames to label", 2)])
def test_kill_9_in_each_phase_then_rerun_gives_the_uninterrupted_campaign(
        campaign, dynshift_bin, tmp_path, trigger, occurrence):
    """kill -9 (the whole job) while training, exploring or labelling; the rerun finishes with
    the records of the uninterrupted campaign, every frame labelled once."""
    import signal

    folder, _, _ = campaign
    reference = _records(folder / "c.h5")
    (tmp_path / "m.yaml").write_text(MANIFEST.format(iterations=2))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store", "c.h5"]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, lines = 0, []
    for line in job.stdout:
        lines.append(line)
        if trigger in line:
            seen += 1
            if seen == occurrence:
                os.killpg(job.pid, signal.SIGKILL)
                break
    job.wait(timeout=60)
    assert seen == occurrence, "".join(lines[-30:])
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    again = _records(tmp_path / "c.h5")
    np.testing.assert_array_equal(again["bootstrap"], reference["bootstrap"])
    for i in (0, 1):
        for key in ("devi", "frame", "energy", "status"):
            np.testing.assert_array_equal(again[i][key], reference[i][key], err_msg=f"{i} {key}")
        assert again[i]["counts"] == reference[i]["counts"]
        assert again[i]["fraction"] == reference[i]["fraction"]
    # one result per labelled frame: 4 bootstrap + 3 per iteration
    assert len(_label_results(tmp_path)) == 4 + 3 + 3


def test_one_iteration_with_the_fake_vasp(dynshift_bin, tmp_path):
    """The production path: VASP (the fake: real OUTCAR text) labels the bootstrap and the
    first iteration's frames; injected failures are retried, a frame failing every attempt is
    recorded and budgeted, and every frame is computed to the end at most once."""
    import yaml
    from fake_vasp.labelling import completed_runs, expected_labels, read_log, vasp_section

    plan = {"p6322.bootstrap/r000-f000001": ["exit", "ok"],
            "p6322.bootstrap/r000-f000002": ["garbled", "garbled"],
            "p6322.iter_000/r000-f000000": ["truncated", "ok"]}
    manifest = yaml.safe_load(MANIFEST.format(iterations=1))
    manifest["label"] = {"labeller": "vasp", "work_dir": "work", "max_attempts": 2,
                         "failure_budget": 0.5, "vasp": vasp_section(tmp_path, plan)}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store",
                           "v.h5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with h5py.File(tmp_path / "v.h5", "r") as f:
        boot = f["/learn/bootstrap/label/p6322"]
        assert boot["status"][()].tolist() == [1, 1, -1, 1]
        assert boot["attempts"][()].tolist() == [1, 2, 2, 1]
        assert b"cannot read a row of the Fermi-contact table" in boot["last_error"][2]
        table = f["/learn/iter_000/label/p6322"]
        assert (table["status"][()] == 1).all() and len(table["status"]) == 3
        assert table["attempts"][()].tolist()[0] == 2  # the truncated OUTCAR, then ok
        for group in (boot, table):
            for row in np.flatnonzero(group["status"][()] == 1):
                want = expected_labels(group["positions_a"][row])
                assert group["energy_ev"][row] == pytest.approx(want["energy_ev"], abs=1e-5)
                np.testing.assert_allclose(group["forces_ev_a"][row], want["forces_ev_a"],
                                           atol=1e-5)
    # every key ran to a result at most once; the retried ones started twice
    assert max(completed_runs(tmp_path).values()) == 1
    starts = [fields[1] for fields in read_log(tmp_path) if fields[0] == "start"]
    assert starts.count("p6322.bootstrap/r000-f000001") == 2
    assert starts.count("p6322.iter_000/r000-f000000") == 2
    assert len(starts) == len(set(starts)) + 3  # 3 frames retried once, the rest started once


def test_md_and_infer_after_the_campaign_use_its_models(campaign, dynshift_bin):
    """md propagates with the final model 0 and records the ensemble's deviation; infer takes
    the campaign's shift model."""
    from jobs.deviation import DeviationEnsemble

    folder, _, _ = campaign
    text = MANIFEST.format(iterations=3).replace("stages: [learn]", "stages: [learn, md, infer]")
    text += "md: {replicas: 1, frames: 3, save_every_steps: 5, equilibration_steps: 0}\n"
    (folder / "md.yaml").write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "md.yaml", "--store",
                           "c.h5"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "learn campaign's DP ensemble (2 models" in done.stdout
    with h5py.File(folder / "c.h5", "r") as f:
        replica = f["/md/p6322/r000"]
        assert replica.attrs["deviation_models"] == 1
        devi = replica["model_devi_f_ev_a"][()]
        positions, cells = replica["positions_a"][()], replica["cell_a"][()]
        numbers = f["/md/p6322/numbers"][()]
        final = int(f["/learn"].attrs["final_iteration"])
        blobs = [bytes(f[f"/learn/iter_{final:03d}/models/model_{k}"][()]) for k in range(2)]
        shifts = f["/infer/p6322/shift_ppm"][()]
        sigma = f["/infer/p6322/shift_std_ppm"][()]
        identity = json_attrs(f["/infer/p6322"])
    paths = []
    for k, blob in enumerate(blobs):
        (folder / f"final_{k}.pb").write_bytes(blob)
        paths.append(folder / f"final_{k}.pb")
    expected = DeviationEnsemble.from_files(paths).force_deviation(numbers, positions, cells)[0]
    np.testing.assert_allclose(devi, expected, rtol=1e-6)
    assert shifts.shape == (3, 16) and np.all(np.isfinite(shifts)) and np.all(sigma > 0)
    assert "learn campaign" in identity


def json_attrs(group) -> str:
    return " ".join(str(v) for v in group.attrs.values())


def test_a_stop_during_learn_training_resumes_the_models_from_their_checkpoints(
        tmp_path, dynshift_bin):
    """dp train is ended with its checkpoints kept; the rerun resumes both models from them
    (recorded on each model), the labels before the stop are those of an uninterrupted run, and
    the resumed models are as accurate as uninterrupted ones (not bit-equal: docs/learn.md)."""
    import yaml
    from launch import (assert_same_rows, complete_run, ref_and_stopped, store_rows,
                        stopped_run, usr1_to_mpirun)

    manifest = yaml.safe_load(MANIFEST.format(iterations=1))
    manifest["store"] = "run.h5"
    manifest["learn"]["dp"].update(steps=1500, decay_steps=150, checkpoint_every_steps=100)
    del manifest["learn"]["dp"]["steps_per_iteration"]
    ref, stopped = ref_and_stopped(tmp_path, yaml.safe_dump(manifest))
    complete_run(ref, dynshift_bin)

    def a_checkpoint_saved(log: Path) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(list(stopped.glob("run.h5.learn/iter_000/model_*/checkpoint"))) == 2:
                return
            time.sleep(0.2)
        raise AssertionError(log.read_text())
    stopped_run(stopped, dynshift_bin, "learn", "learn", a_checkpoint_saved, usr1_to_mpirun)
    marks = sorted(stopped.glob("run.h5.learn/iter_000/model_*/STOPPED_ON_REQUEST"))
    assert len(marks) == 2
    text = complete_run(stopped, dynshift_bin)
    assert "model 0 resumes from the checkpoint of a requested stop" in text, text  # rank 0 logs
    a, b = ({name: rows for name, rows in store_rows(folder / "run.h5", "learn/bootstrap").items()
             if rows.dtype.kind in "fiu"} for folder in (ref, stopped))   # not the work paths
    assert_same_rows(a, b)
    with h5py.File(ref / "run.h5", "r") as f, h5py.File(stopped / "run.h5", "r") as g:
        for k in range(2):
            one, two = (h["learn/iter_000/models"][f"model_{k}"].attrs for h in (f, g))
            assert not one["resumed_from_checkpoint"] and two["resumed_from_checkpoint"]
            assert one["steps"] == two["steps"] == 1500
            # measured: 0.456891 / 0.456879 and 0.356002 / 0.356118 eV/A (docs/learn.md)
            assert two["force_rmse_ev_per_a"] == pytest.approx(one["force_rmse_ev_per_a"],
                                                               rel=0.05)
