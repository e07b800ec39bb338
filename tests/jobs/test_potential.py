"""The potential stage: data conversion, hold-out split, training, the shipped model's accuracy."""
from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.dptrain import holdout_errors, split_holdout, write_deepmd_system
from jobs.layouts.potential import MODEL_PATH, stored_model_file
from jobs.stages.potential import fit_potential
from schemas import load_manifest
from schemas.potential import SHIPPED_MODEL, PotentialSpec

ROOT = Path(__file__).resolve().parents[2]


def _ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


def test_split_holdout_is_a_partition():
    train, held = split_holdout(400, 0.1, np.random.default_rng(1))
    assert len(held) == 40 and sorted(train + held) == list(range(400))
    assert split_holdout(5, 0.0, np.random.default_rng(1)) == ([0, 1, 2, 3, 4], [])
    assert len(split_holdout(3, 0.01, np.random.default_rng(1))[1]) == 1


def test_deepmd_system_round_trip(tmp_path, shared_data):
    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":3")
    write_deepmd_system(frames, tmp_path / "sys", ["Na", "Mg", "Mn", "O"])
    import dpdata

    system = dpdata.LabeledSystem(str(tmp_path / "sys"), fmt="deepmd/npy")
    assert len(system) == 3 and system.get_atom_names() == ["Na", "Mg", "Mn", "O"]
    assert system["atom_numbs"] == [16, 8, 16, 48]
    assert np.allclose(system["energies"], [a.get_potential_energy() for a in frames])
    assert np.allclose(system["forces"][2], frames[2].get_forces())
    frames[1] = frames[1][::-1]  # another atom order inside one file: refused
    with pytest.raises(InputError, match="frame 1"):
        write_deepmd_system(frames, tmp_path / "bad", ["Na", "Mg", "Mn", "O"])
    with pytest.raises(InputError, match="not in potential.type_map"):
        write_deepmd_system(frames[:1], tmp_path / "bad2", ["Na", "Mn", "O"])


def test_without_frames_the_shipped_model_goes_into_the_store(tmp_path):
    ctx = _ctx()
    with RunStore(tmp_path / "s.h5", ctx) as store:
        result = fit_potential(PotentialSpec(), ctx, store)
        assert store.get_bytes(MODEL_PATH) == SHIPPED_MODEL.read_bytes()
        assert result.summary()["trained"] is False
        with stored_model_file(store) as local:
            assert local.read_bytes() == SHIPPED_MODEL.read_bytes()
        assert not local.exists()


def test_shipped_model_meets_its_targets_on_held_out_frames():
    """The frames the regenerating manifest held out: force RMSE <= 0.052 eV/A, issue 11's
    target (v3: 0.0480; v2, 0.0526, and v1, 0.062, would fail), energy <= 1 meV/atom (v3:
    0.50; v1: 1.23)."""
    manifest, _ = load_manifest(ROOT / "run" / "potential-p2-nmmo.yaml")
    spec = manifest.potential
    rng = np.random.default_rng([manifest.seed, 4, 1])  # as jobs.stages.potential.train_model
    held_out = []
    for path in spec.frames:
        frames = ase.io.read(path, ":")
        held_out += [frames[i] for i in split_holdout(len(frames), spec.holdout_fraction, rng)[1]]
    assert len(held_out) == 80
    errors = holdout_errors(SHIPPED_MODEL, held_out)
    assert errors.force_rmse_ev_per_a <= 0.052
    assert errors.energy_rmse_mev_per_atom <= 1.0
    assert SHIPPED_MODEL.stat().st_size < 20 * 2**20


def test_tiny_training_run_end_to_end(tmp_path, shared_data):
    frames = ase.io.read(shared_data / "p63mcm-dev.extxyz", ":8")
    ase.io.write(tmp_path / "few.extxyz", frames)
    spec = PotentialSpec(frames=[tmp_path / "few.extxyz"], holdout_fraction=0.25, steps=20,
                         embedding_neurons=[4, 8], axis_neurons=4, fitting_neurons=[8, 8],
                         sel=[20, 10, 20, 48], compress="never", train_threads=1)
    ctx = _ctx()
    with RunStore(tmp_path / "s.h5", ctx) as store:
        result = fit_potential(spec, ctx, store, seed=5)
        attrs = store.attrs(MODEL_PATH)
        blob = store.get_bytes(MODEL_PATH)
    assert result.summary()["trained"] is True and attrs["holdout_frames"] == 2
    assert np.isfinite(attrs["force_rmse_ev_per_a"]) and attrs["force_rmse_ev_per_a"] > 0
    assert blob == (tmp_path / "s.h5.potential" / "frozen.pb").read_bytes()
    assert (tmp_path / "s.h5.potential" / "lcurve.out").read_text().count("\n") >= 3


def _seeds(document: dict) -> list[int]:
    model = document["model"]
    return [model["descriptor"]["seed"], model["fitting_net"]["seed"],
            document["training"]["seed"]]


def test_train_dp_on_given_frames(tmp_path, shared_data):
    """The library call: 6 training and 2 validation frames, 20 steps, a loadable model."""
    import json

    from deepmd.infer import DeepPot

    from jobs.deepmd import import_deepmd_tf
    from jobs.dptrain import deepmd_input, train_dp
    from schemas.potential import DpTrainingSpec

    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":8")
    spec = DpTrainingSpec(steps=20, embedding_neurons=[4, 8], axis_neurons=4,
                          fitting_neurons=[8, 8], sel=[20, 10, 20, 48], compress="never")
    messages = []
    model_file, report = train_dp(spec, [frames[:6]], [frames[6:]], tmp_path / "dp", seed=5,
                                  threads=1, log=messages.append)
    assert model_file == tmp_path / "dp" / "frozen.pb" and report["model_file"] == "frozen.pb"
    import_deepmd_tf()
    assert DeepPot(str(model_file)).get_type_map() == ["Na", "Mg", "Mn", "O"]
    assert report["holdout_frames"] == 2
    assert np.isfinite(report["energy_rmse_mev_per_atom"]) and report["force_rmse_ev_per_a"] > 0
    assert np.isfinite(report["force_rmse_ev_per_a"]) and report["model_mb"] > 0
    # the input is deepmd_input with this seed; another seed gives three other network seeds
    written = json.loads((tmp_path / "dp" / "input.json").read_text())
    assert written == deepmd_input(spec, ["data/train-00"], ["data/test-00"], 5)
    assert written["training"]["numb_steps"] == 20
    other = deepmd_input(spec, ["data/train-00"], ["data/test-00"], 6)
    assert all(a != b for a, b in zip(_seeds(written), _seeds(other)))
    assert len(np.load(tmp_path / "dp" / "data" / "train-00" / "set.000" / "energy.npy")) == 6
    assert any("dp train, 20 steps" in m for m in messages)


def test_train_dp_refuses_an_empty_training_set(tmp_path):
    from jobs.dptrain import train_dp
    from schemas.potential import DpTrainingSpec

    with pytest.raises(InputError, match="training set 00 holds no frames"):
        train_dp(DpTrainingSpec(steps=1), [[]], [], tmp_path / "dp", seed=1, threads=1)
    with pytest.raises(ValueError, match="train_names must name each of the 1 sets once"):
        train_dp(DpTrainingSpec(steps=1), [[]], [], tmp_path / "dp", seed=1, threads=1,
                 train_names=["a", "b"])
