"""The `model` labeller (an oracle, not DFT): the shipped DP and NN-NMR models through the label
stage, checked against direct model evaluation and against the real DFT labels."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from fake_vasp.labelling import shared_frames, write_md
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.labellers.model import ORACLE, ModelLabeller
from jobs.shift import ppm_per_mhz
from jobs.shiftmodels.registry import load_shift_model
from jobs.stages.label import label_frames
from schemas import parse_manifest
from schemas.label import ModelLabellerSpec
from schemas.shift import ShiftSpec


@pytest.fixture(scope="module")
def oracle():
    return ModelLabeller.from_spec(ModelLabellerSpec(), ShiftSpec())


def test_labels_are_the_models_and_close_to_dft(oracle, shared_data, tmp_path):
    from jobs.deepmd import dp_calculator
    from jobs.shiftmodels.registry import featurizer_for

    frames = shared_frames(shared_data, 4)
    calculator = dp_calculator(oracle.dp_model)
    ensemble = load_shift_model(oracle.shift_model)
    featurizer = featurizer_for(ensemble)
    force_err, shift_err = [], []
    for k, frame in enumerate(frames):
        labelled = oracle.label(frame, tmp_path / f"f{k}", "test")
        na = frame.numbers == 11
        probe = frame.copy()
        probe.calc = calculator
        assert labelled.get_potential_energy() == pytest.approx(probe.get_potential_energy(),
                                                                abs=1e-9)
        np.testing.assert_allclose(labelled.get_forces(), probe.get_forces(), atol=1e-9)
        mean, _ = ensemble.predict(featurizer.features([frame]))
        a_iso = labelled.arrays["fermi_contact_mhz"]
        np.testing.assert_allclose(a_iso[na] * ppm_per_mhz(ShiftSpec()), mean, rtol=1e-6)
        assert np.isnan(a_iso[~na]).all() and labelled.info["labeller"] == ORACLE
        force_err.append(labelled.get_forces() - frame.get_forces())
        shift_err.append((a_iso[na] - frame.arrays["fermi_contact_mhz"][na])
                         * ppm_per_mhz(ShiftSpec()))
    # the shipped models against the real SCAN labels (docs: 0.062 eV/A, 86 ppm)
    assert np.sqrt(np.mean(np.square(force_err))) < 0.1
    assert np.sqrt(np.mean(np.square(shift_err))) < 150.0
    again = oracle.recover(frames[0], tmp_path / "f0")
    assert again is not None and again.get_potential_energy() == pytest.approx(
        oracle.label(frames[0], tmp_path / "g0", "t").get_potential_energy(), abs=1e-9)
    assert oracle.recover(frames[1], tmp_path / "f0") is None  # another frame's result


def test_unknown_species_are_refused_before_work(oracle):
    with pytest.raises(InputError, match=r"species \['Li'\] not in the DP model's type map"):
        oracle.check(["Li", "Na", "O"])


def test_the_label_stage_with_the_oracle_labels_once_and_recovers(tmp_path, shared_data):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    frames = shared_frames(shared_data, 6)
    document = {"stages": ["label"], "store": "run.h5",
                "systems": [{"name": "nmmo", "structure": "builtin:p2-nmmo-p63mcm"}],
                "label": {"labeller": "model", "n_frames": 6, "work_dir": str(tmp_path / "w")}}
    manifest = parse_manifest(yaml.safe_dump(document))
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames[:3], frames[3:]])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (result.n_done, result.n_failed, result.n_labelled_now) == (6, 0, 6)
        shifts = store.read("/label/nmmo/shift_ppm")
        assert np.isfinite(shifts[:, :16]).all() and np.isnan(shifts[:, 16:]).all()
        assert 500 < np.mean(shifts[:, :16]) < 2500
        # a frame whose result was written but not recorded (its rank killed) is recovered
        store.write_rows("/label/nmmo/status", 2, [0])
        store.write_rows("/label/nmmo/attempts", 2, [0])
        again = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (again.n_done, again.n_recovered) == (6, 1)
        np.testing.assert_array_equal(store.read("/label/nmmo/shift_ppm"), shifts)


def test_md_then_oracle_labels_under_mpirun(tmp_path, dynshift_bin):
    """`mpirun -n 2 dynshift run`: real DPMD, then the oracle labels 6 of its frames, each once."""
    import subprocess

    from launch import launch_env

    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "stages": ["md", "label"], "store": "run.h5",
        "systems": [{"name": "nmmo", "structure": "builtin:p2-nmmo-p63mcm"}],
        "md": {"replicas": 2, "frames": 6, "save_every_steps": 5, "equilibration_steps": 20,
               "chunk_frames": 3},
        "label": {"labeller": "model", "n_frames": 6, "work_dir": "work"}}))
    run = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**launch_env(), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    with RunStore(tmp_path / "run.h5", None, mode="r") as store:
        assert store.read("/label/nmmo/status").tolist() == [1] * 6
        assert store.read("/label/nmmo/attempts").tolist() == [1] * 6
        assert np.isfinite(store.read("/label/nmmo/shift_ppm")[:, :16]).all()
    results = sorted(tmp_path.glob("work/**/labelled.npz"))
    assert len(results) == 6  # one result per frame, none computed twice
