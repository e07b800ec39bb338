"""The train stage end to end: `mpirun -n 2 dynshift run` on a few real frames, tiny model."""
from __future__ import annotations

import os
import subprocess

import h5py
import numpy as np
import pytest

from jobs.frames import read_labelled_frames
from jobs.shiftmodels.registry import load_shift_model
from jobs.shiftmodels.rows import frame_folds, validation_frames
from jobs.shiftmodels.soap import SoapFeaturizer

MANIFEST = """\
stages: [train]
seed: 11
train:
  frames: [few.extxyz]
  soap_n_max: 3
  soap_l_max: 2
  hidden_units: [24]
  epochs: 6
  patience_epochs: 6
  batch_size: 32
  folds: 3
  ensemble_folds: 2
  members_per_fold: 2
  weights_dtype: float16
"""


def test_folds_are_by_frame_and_seeded():
    folds = frame_folds(23, 5, seed=4)
    assert np.bincount(folds).tolist() == [5, 5, 5, 4, 4]
    np.testing.assert_array_equal(folds, frame_folds(23, 5, seed=4))
    assert not np.array_equal(folds, frame_folds(23, 5, seed=5))
    train = np.flatnonzero(folds != 0)
    val = validation_frames(train, 0.1, 4, 0)
    assert len(val) == 2 and set(val) <= set(train)


@pytest.fixture(scope="module")
def trained_store(shared_data, dynshift_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    import ase.io

    frames = read_labelled_frames(shared_data / "p63mcm-dev.extxyz")[:6] + \
        read_labelled_frames(shared_data / "p6322-dev.extxyz")[:6]
    ase.io.write(folder / "few.extxyz", frames, format="extxyz")
    (folder / "m.yaml").write_text(MANIFEST)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store",
                          "t.h5"], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return folder / "t.h5", frames


def test_store_layout_and_cv(trained_store):
    path, frames = trained_store
    with h5py.File(path, "r") as f:
        train = f["/train"]
        assert sorted(train["folds"]) == ["0", "0.1", "1", "1.1"]
        assert train["folds/1.1"].attrs["fold"] == 1 and train["folds/1.1"].attrs["member"] == 1
        # members of a fold: same split, other seeds
        assert not np.array_equal(train["folds/0/kernel_0"][()], train["folds/0.1/kernel_0"][()])
        fold_of_frame = train["split/fold_of_frame"][()]
        assert fold_of_frame.shape == (12,)
        cv_fold = train["cv/fold"][()]
        cv_frame = train["cv/frame"][()]
        # out-of-fold rows: exactly the Na of the frames of folds 0 and 1, by frame
        assert len(cv_fold) == 16 * np.isin(fold_of_frame, [0, 1]).sum()
        np.testing.assert_array_equal(fold_of_frame[cv_frame], cv_fold)
        dft = train["cv/shift_dft_ppm"][()]
        atom = train["cv/atom"][()]
        expected = [frames[i].arrays["fermi_contact_mhz"][a] * 800.16
                    for i, a in zip(cv_frame, atom)]
        np.testing.assert_allclose(dft, expected, rtol=1e-4)
        assert train["folds/0/kernel_0"].dtype == np.float16
        assert train["folds/0/kernel_0"].shape == (train["folds/0/feature_mean"].shape[0], 24)
        assert len(train["curves/0/val_rmse_ppm"]) == train["folds/0"].attrs["epochs_run"]
        for key in ("rmse_ppm", "mae_ppm", "r2"):
            assert np.isfinite(train["folds/1"].attrs[key])
        assert f["/stages/train"].attrs["status"] == "complete"
    assert path.with_name("t-train-parity.png").stat().st_size > 1000


def test_fresh_process_ensemble_reproduces_out_of_fold(trained_store):
    path, frames = trained_store
    ensemble = load_shift_model(path)
    assert ensemble.n_models == 4 and ensemble.settings["centre"] == "Na"
    featurizer = SoapFeaturizer.from_settings(ensemble.settings["soap"])
    with h5py.File(path, "r") as f:
        cv_fold, cv_frame = f["/train/cv/fold"][()], f["/train/cv/frame"][()]
        pred = f["/train/cv/shift_pred_ppm"][()]
    first = np.flatnonzero(cv_fold == 0)
    frame_ids = np.unique(cv_frame[first])
    every = ensemble.predict_all(featurizer.features([frames[i] for i in frame_ids]))
    # models in (fold, member) order; a fold's out-of-fold prediction is its members' mean
    np.testing.assert_allclose(every[:2].mean(axis=0), pred[first], rtol=1e-4, atol=0.05)
    assert np.abs(every[0] - every[1]).max() > 0.01
    mean, std = ensemble.predict(featurizer.features(frames[:1]))
    assert mean.shape == std.shape == (16,) and np.all(std > 0)
