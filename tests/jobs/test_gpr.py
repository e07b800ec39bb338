"""The GPR shift model: exactness against full KRR / GP, calibration, a real tiny fit, the store
round trip and `dynshift run` train (model gpr) -> infer on new frames."""
from __future__ import annotations

import os
import subprocess

import ase.io
import h5py
import numpy as np
import pytest

from engine.seeds import SeedStreams
from engine.store import RunStore
from jobs.frames import read_labelled_frames
from jobs.shiftmodels import gpr
from jobs.shiftmodels.metrics import regression_metrics
from jobs.shiftmodels.registry import load_shift_model
from jobs.shiftmodels.rows import centre_rows, frame_folds
from jobs.shiftmodels.soap import SoapFeaturizer
from schemas.shift import ShiftSpec
from schemas.train import GprSpec


def unit_rows(n_rows: int, n_features: int, seed: int = 0) -> np.ndarray:
    """Positive random rows of unit norm (dot products in (0, 1], like SOAP's)."""
    x = np.random.default_rng(seed).random((n_rows, n_features)) + 0.1
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sparse_with_every_row_sparse_is_full_krr_and_full_gp():
    """M = N (every training row a sparse point): the projected-process mean is kernel ridge
    regression and its variance the full GP's, to float64 rounding."""
    x = unit_rows(70, 12, seed=1)
    y = 1600.0 + 900.0 * np.sin(7 * x[:, 0]) - 400.0 * x[:, 3] * x[:, 5]
    train, test = np.arange(50), np.arange(50, 70)
    zeta, lam = 3, 1e-2
    spec = GprSpec(zeta=[zeta], regularisation=[lam], n_sparse=[50], sparse_selection="random",
                   jitter=1e-13)
    model = gpr.fit(x, y, zeta, lam, 50, 1.0, spec, SeedStreams(3), rows=train)
    mean, std = model.predict(x[test])
    k = (x[train] @ x[train].T) ** zeta
    k_star = (x[test] @ x[train].T) ** zeta
    mu = y[train].mean()
    alpha = np.linalg.solve(k + lam * np.eye(50), y[train] - mu)
    krr = mu + k_star @ alpha
    np.testing.assert_allclose(mean, krr, rtol=0, atol=2e-3)  # float32 output of ~1600 ppm
    gp_var = lam + 1.0 - np.einsum("ij,ji->i", k_star, np.linalg.solve(k + lam * np.eye(50),
                                                                       k_star.T))
    np.testing.assert_allclose(std ** 2, gp_var, rtol=1e-4)
    # and the CV path (triangular solves, not the stored B) gives the same variance
    gram, rhs, chol = gpr.normal_equations(x, y - mu, train, x[train], [zeta], jitter=1e-13)
    solution = gpr.solve_sparse(gram[0], rhs[0], chol[0], lam)
    phi = gpr.whitened(k_star, chol[0])
    np.testing.assert_allclose(solution.raw_variance(phi, np.ones(20)), gp_var, rtol=1e-7)
    np.testing.assert_allclose(mu + solution.mean(phi), krr, rtol=1e-10)
    # a sparser model is not the same model: the test can tell them apart
    sparse = gpr.fit(x, y, zeta, lam, 10, 1.0, spec, SeedStreams(3), rows=train)
    assert np.abs(sparse.predict(x[test])[0] - krr).max() > 1.0


@pytest.mark.parametrize("n_train", [50, 8])
def test_weight_space_is_the_exact_linear_kernel_gp(n_train):
    """zeta 1 in weight space is the GP of k = x . y over every training row: its mean is the
    dual (kernel ridge) solution and its exact variance the full GP's, by Woodbury, whether
    there are more rows than features (50 > 12) or fewer (8)."""
    x = unit_rows(70, 12, seed=4)
    y = 1600.0 + 900.0 * x[:, 0] - 700.0 * x[:, 3] + 30.0 * np.sin(9 * x[:, 5])
    train, test = np.arange(n_train), np.arange(50, 70)
    lam = 1e-3
    spec = GprSpec(zeta=[1], regularisation=[lam], variance_sketch_rows=4096)
    model = gpr.fit(x, y, 1, lam, 0, 1.0, spec, SeedStreams(3), rows=train)
    assert model.form == "weight-space" and model.n_sparse == 0 and model.n_features == 12
    k = x[train] @ x[train].T
    k_star = x[test] @ x[train].T
    mu = y[train].mean()
    krr = mu + k_star @ np.linalg.solve(k + lam * np.eye(n_train), y[train] - mu)
    gp_var = lam + 1.0 - np.einsum("ij,ji->i", k_star, np.linalg.solve(
        k + lam * np.eye(n_train), k_star.T))
    mean, std = model.predict(x[test])
    np.testing.assert_allclose(mean, krr, rtol=0, atol=2e-3)  # float32 output
    gram, rhs, _ = gpr.linear_statistics(x, y - mu, train)
    solution = gpr.solve_linear(gram, rhs, lam)
    np.testing.assert_allclose(solution.raw_variance(x[test]), gp_var, rtol=1e-8)
    # the sketch (k = 4096 rows) is unbiased with a relative error ~ sqrt(2 / k) = 2 % on h
    h = solution.leverage(x[test])
    sketched = std.astype(np.float64) ** 2 / lam - 1.0
    assert np.max(np.abs(sketched / h - 1.0)) < 0.1
    assert abs(np.mean(sketched / h) - 1.0) < 0.03
    # with a small sketch the error grows as the theory says (k = 16: ~35 %)
    coarse = solution.sketch(np.random.default_rng(0), 16)
    ratio = np.einsum("ij,ij->i", x[test] @ coarse.T, x[test] @ coarse.T) / h
    assert 0.1 < np.std(ratio) < 0.8


def test_variance_reduction_picks_are_the_greedy_v_optimal_design():
    """Every pick is the frame whose labels most lower the pool's summed GP variance given the
    labelled rows and the earlier picks, checked against the dual (kernel) posterior computed
    from scratch for every candidate; a duplicate of a picked frame is not picked next."""
    x = unit_rows(60, 10, seed=7)
    frame = np.repeat(np.arange(15), 4)          # 15 frames of 4 rows
    x[frame == 9] = x[frame == 3]                # frame 9 duplicates frame 3
    lam = 1e-2
    labelled = np.flatnonzero(frame < 2)         # frames 0, 1 labelled
    gram, _, _ = gpr.linear_statistics(x, np.zeros(len(x)), labelled)
    chol = gpr.solve_linear(gram, np.zeros(10), lam).chol

    def summed_variance(given):
        """Sum over every row of the latent posterior variance given the rows `given`."""
        k = x[given] @ x[given].T + lam * np.eye(len(given))
        cross = x @ x[given].T
        return float(np.sum(np.einsum("ij,ij->i", x, x)
                            - np.einsum("ij,ji->i", cross, np.linalg.solve(k, cross.T))))

    picks = gpr.variance_reduction_picks(x, frame, chol, lam, 5, exclude=[0, 1])
    given = list(labelled)
    for pick in picks:
        options = [f for f in range(15) if f > 1 and f not in picks[:picks.index(pick)]]
        after = {f: summed_variance(given + list(np.flatnonzero(frame == f))) for f in options}
        assert pick == min(after, key=after.get)
        assert after[pick] < min(v for f, v in after.items() if f != pick)  # no near-tie
        given += list(np.flatnonzero(frame == pick))
    assert len(set(picks)) == 5 and not {0, 1} & set(picks)
    if 3 in picks:                               # its duplicate is worth nothing right after
        assert picks[picks.index(3) + 1:picks.index(3) + 2] != [9]
    # no labels yet: the prior (L = sqrt(lambda) I) gives the same first pick as the dual
    first = gpr.variance_reduction_picks(x, frame, None, lam, 1)[0]
    prior = {f: summed_variance(list(np.flatnonzero(frame == f))) for f in range(15)}
    assert first == min(prior, key=prior.get)


def test_kernel_reduction_picks_match_the_linear_design_and_the_dual_posterior():
    """At zeta 1 the kernel form is the linear design (the same picks from the same labels);
    at zeta 3 every pick is the frame that most lowers the summed posterior variance of the
    exact polynomial-kernel GP, recomputed from scratch for every candidate."""
    x = unit_rows(48, 6, seed=3)
    frame = np.repeat(np.arange(12), 4)
    lam = 1e-2
    labelled = np.flatnonzero(frame < 2)
    gram, _, _ = gpr.linear_statistics(x, np.zeros(len(x)), labelled)
    chol = gpr.solve_linear(gram, np.zeros(6), lam).chol
    linear = gpr.variance_reduction_picks(x, frame, chol, lam, 4, exclude=[0, 1])
    assert gpr.kernel_reduction_picks(x, frame, x[labelled], 1, lam, 4, exclude=[0, 1]) == linear

    zeta = 3
    kernel = lambda a, b: (a @ b.T) ** zeta

    def summed_variance(given):
        k = kernel(x[given], x[given]) + lam * np.eye(len(given))
        cross = kernel(x, x[given])
        return float(np.trace(kernel(x, x)) - np.sum(cross * np.linalg.solve(k, cross.T).T))

    picks = gpr.kernel_reduction_picks(x, frame, x[labelled], zeta, lam, 4, exclude=[0, 1])
    given = list(labelled)
    for n, pick in enumerate(picks):
        options = [f for f in range(2, 12) if f not in picks[:n]]
        after = {f: summed_variance(given + list(np.flatnonzero(frame == f))) for f in options}
        assert pick == min(after, key=after.get)
        assert after[pick] < min(v for f, v in after.items() if f != pick)
        given += list(np.flatnonzero(frame == pick))
    assert picks != linear  # the kernel, not the linear weight space, chose them


def test_farthest_points_spread_out_and_are_seeded():
    x = unit_rows(300, 16, seed=2)
    first = gpr.farthest_points(x, 20, SeedStreams(5).rng("train.gpr_sparse", 0))
    again = gpr.farthest_points(x, 20, SeedStreams(5).rng("train.gpr_sparse", 0))
    np.testing.assert_array_equal(first, again)
    assert len(set(first.tolist())) == 20
    random = np.random.default_rng(0).permutation(300)[:20]

    def min_distance(idx):
        d = np.linalg.norm(x[idx][:, None] - x[idx][None], axis=-1)
        return d[np.triu_indices(len(idx), 1)].min()

    # farthest-point sampling keeps the chosen points farther apart than a random subset
    assert min_distance(first) > 1.5 * min_distance(random)


def test_calibration_gives_unit_z_variance_on_synthetic_errors():
    rng = np.random.default_rng(4)
    raw = rng.uniform(0.2, 5.0, 200_000)  # the model's raw variances, varying 25x
    true_scale = 37.0
    errors = rng.normal(0.0, true_scale * np.sqrt(raw))
    scale = gpr.calibration_scale(errors, raw)
    assert abs(scale / true_scale - 1) < 0.01
    cover = gpr.coverage(errors, scale * np.sqrt(raw))
    assert abs(cover["z_variance"] - 1) < 1e-9  # unit variance by construction of the scale
    assert abs(cover["within_1_sigma"] - 0.6827) < 0.005
    assert abs(cover["within_2_sigma"] - 0.9545) < 0.003
    # an uncalibrated scale shows up in the coverage
    assert gpr.coverage(errors, 0.5 * scale * np.sqrt(raw))["within_1_sigma"] < 0.45


@pytest.fixture(scope="module")
def forty_frames(shared_data):
    frames = read_labelled_frames(shared_data / "p63mcm-dev.extxyz")[:20] + \
        read_labelled_frames(shared_data / "p6322-dev.extxyz")[:20]
    featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"])
    rows = centre_rows(frames, "Na", ShiftSpec())
    return frames, featurizer, featurizer.features(frames), rows


def test_tiny_real_fit_predicts_held_out_frames(forty_frames):
    """40 real frames (20 per stacking), 5 held out (by frame): measured 145.4 ppm, R2 0.940
    (zeta 24, lambda 1e-4, M 300, r_cut 5.5 A); the training mean misses by 597 ppm."""
    frames, featurizer, features, rows = forty_frames
    fold_of_row = frame_folds(len(frames), 8, seed=3)[rows.frame]
    train, test = np.flatnonzero(fold_of_row != 0), np.flatnonzero(fold_of_row == 0)
    spec = GprSpec(zeta=[24], regularisation=[1e-4], n_sparse=[300])
    model = gpr.fit(features, rows.shift_ppm, 24, 1e-4, 300, 1.0, spec, SeedStreams(7),
                    rows=train)
    mean, std = model.predict(features[test])
    metrics = regression_metrics(rows.shift_ppm[test], mean)
    assert metrics["rmse_ppm"] < 160.0, metrics
    assert metrics["r2"] > 0.92, metrics
    # far better than the training mean (what a fit that learned nothing predicts)
    baseline = np.sqrt(np.mean((rows.shift_ppm[test] - rows.shift_ppm[train].mean()) ** 2))
    assert metrics["rmse_ppm"] < 0.4 * baseline, baseline
    assert np.all(std > 0)


def test_cross_validation_grid_and_chosen_point(forty_frames):
    frames, featurizer, features, rows = forty_frames
    fold_of_row = frame_folds(len(frames), 4, seed=3)[rows.frame]
    spec = GprSpec(zeta=[6, 24], regularisation=[1e-4], n_sparse=[100, 300])
    cv = gpr.cross_validate(features, rows.shift_ppm, fold_of_row, spec, SeedStreams(1))
    assert cv.grid == [(6, 1e-4, 100), (6, 1e-4, 300), (24, 1e-4, 100), (24, 1e-4, 300)]
    rmse = np.asarray(cv.curve.rmse_ppm)
    # more sparse points help; on 30 training frames zeta 6 beats 24 (measured: 182.6, 128.6,
    # 206.8, 141.7 ppm)
    assert rmse[1] < 0.8 * rmse[0] and rmse[3] < 0.8 * rmse[2] and rmse[1] < rmse[3]
    assert cv.best("rmse") == 1
    assert np.all(np.isfinite(cv.predictions_ppm)) and np.all(cv.raw_variance > 0)
    # out-of-fold: a fold refit from scratch on its training rows gives the CV predictions
    z, lam, m = cv.grid[1]
    refit = gpr.fit(features, rows.shift_ppm, z, lam, m, 1.0, spec, SeedStreams(1),
                    rows=np.flatnonzero(fold_of_row != 2), seed_index=2)
    held = fold_of_row == 2
    np.testing.assert_allclose(refit.predict(features[held])[0], cv.predictions_ppm[1][held],
                               atol=0.01)
    np.testing.assert_allclose(refit.predict(features[held])[1] ** 2,
                               cv.raw_variance[1][held], rtol=1e-3)


def test_cross_validation_of_the_weight_space_model_equals_a_refit(forty_frames):
    """zeta 1 in the CV grid (one point per lambda, M 0): the fold's X^T X as the whole data's
    minus the held-out rows' gives the same predictions as a fit on the fold's rows, and the
    held-out variances come from the same sketch as that fit's."""
    frames, featurizer, features, rows = forty_frames
    fold_of_row = frame_folds(len(frames), 4, seed=3)[rows.frame]
    spec = GprSpec(zeta=[1, 6], regularisation=[1e-6, 1e-4], n_sparse=[100])
    cv = gpr.cross_validate(features, rows.shift_ppm, fold_of_row, spec, SeedStreams(1))
    assert cv.grid == [(1, 1e-6, 0), (1, 1e-4, 0), (6, 1e-6, 100), (6, 1e-4, 100)]
    assert np.all(np.isfinite(cv.predictions_ppm)) and np.all(cv.raw_variance > 0)
    refit = gpr.fit(features, rows.shift_ppm, 1, 1e-4, 0, 1.0, spec, SeedStreams(1),
                    rows=np.flatnonzero(fold_of_row != 2), seed_index=2)
    held = fold_of_row == 2
    mean, std = refit.predict(features[held])
    np.testing.assert_allclose(mean, cv.predictions_ppm[1][held], atol=0.01)
    np.testing.assert_allclose(std.astype(np.float64) ** 2, cv.raw_variance[1][held],
                               rtol=1e-4)
    # on 30 training frames the linear kernel learns: well under the spread of the shifts
    assert cv.curve.rmse_ppm[1] < 0.5 * np.std(rows.shift_ppm)


def test_weight_space_store_round_trip_in_float16(tmp_path):
    x = unit_rows(40, 10, seed=8)
    y = 1500.0 + 500.0 * x[:, 1]
    spec = GprSpec(zeta=[1], regularisation=[1e-3], variance_sketch_rows=64)
    model = gpr.fit(x.astype(np.float32), y, 1, 1e-3, 0, 21.0, spec, SeedStreams(2),
                    settings={"soap": {"n_features": 10}, "centre": "Na"})
    with RunStore(tmp_path / "m.h5") as store:
        store.set_attrs("/train", model="gpr", centre="Na", soap={"n_features": 10})
        model.write(store, "/train/gpr", factor_dtype="float16")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert "sparse_features" not in f["/train/gpr"]
        assert f["/train/gpr/variance_factor"].dtype == np.float16
        assert f["/train/gpr/weights_ppm"].dtype == np.float64
        assert f["/train/gpr"].attrs["form"] == "weight-space"
    loaded = load_shift_model(tmp_path / "m.h5")
    assert isinstance(loaded, gpr.GprShiftModel) and loaded.form == "weight-space"
    mean, std = loaded.predict(x)
    np.testing.assert_array_equal(mean, model.predict(x)[0])  # the weights are float64
    np.testing.assert_allclose(std, model.predict(x)[1], rtol=2e-3)  # float16 sketch
    assert not np.allclose(std, model.predict(x)[1], rtol=1e-7, atol=0)


def test_store_round_trip_through_shift_ensemble_reader(tmp_path):
    x = unit_rows(40, 10, seed=8)
    y = 1500.0 + 500.0 * x[:, 1]
    spec = GprSpec(zeta=[4], regularisation=[1e-3], n_sparse=[15])
    model = gpr.fit(x.astype(np.float32), y, 4, 1e-3, 15, 21.0, spec, SeedStreams(2),
                    settings={"soap": {"n_features": 10}, "centre": "Na"})
    with RunStore(tmp_path / "m.h5") as store:
        store.set_attrs("/train", model="gpr", centre="Na", soap={"n_features": 10})
        model.write(store, "/train/gpr")
    loaded = load_shift_model(tmp_path / "m.h5")
    assert isinstance(loaded, gpr.GprShiftModel) and loaded.n_features == 10
    assert loaded.settings["centre"] == "Na"
    for a, b in zip(loaded.predict(x), model.predict(x)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"\(n, 10\)"):
        loaded.predict(x[:, :5])


MANIFEST = """\
stages: [train]
seed: 11
train:
  model: gpr
  frames: [few.extxyz]
  soap_n_max: 4
  soap_l_max: 3
  folds: 4
  gpr: {zeta: [6, 12], regularisation: [1e-4, 1e-3], n_sparse: [50, 120],
        soap_r_cut_a: [4.0, 5.5]}
"""

PREDICT = """\
stages: [infer, analyze]
store: p.h5
systems:
  - {name: p63mcm, structure: new.extxyz}
infer:
  shifts_from: model
  model: t.h5
  trajectories: {p63mcm: new.extxyz}
"""


@pytest.fixture(scope="module")
def gpr_store(shared_data, dynshift_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpr")
    frames = read_labelled_frames(shared_data / "p63mcm-dev.extxyz")[:8] + \
        read_labelled_frames(shared_data / "p6322-dev.extxyz")[:8]
    ase.io.write(folder / "few.extxyz", frames, format="extxyz")
    (folder / "m.yaml").write_text(MANIFEST)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store",
                          "t.h5"], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return folder, frames


def test_gpr_store_keeps_the_train_contract(gpr_store):
    folder, frames = gpr_store
    with h5py.File(folder / "t.h5", "r") as f:
        train = f["/train"]
        assert train.attrs["model"] == "gpr"
        n_grid = 2 * 2 * 2 * 2  # r_cut x zeta x lambda x M
        curve = train["gpr/cv_curve"]
        assert len(curve["rmse_ppm"]) == n_grid and sorted(set(curve["soap_r_cut_a"][()])) == [
            4.0, 5.5]
        chosen = train["gpr"].attrs
        assert chosen["n_sparse"] in (50, 120) and chosen["zeta"] in (6, 12)
        m = chosen["n_sparse"]
        assert train["gpr/sparse_features"].shape[0] == train["gpr/weights_ppm"].shape[0] == m
        assert train["gpr/variance_factor"].shape == (m, m)
        dft = train["cv/shift_dft_ppm"][()]
        expected = [frames[i].arrays["fermi_contact_mhz"][a] * 800.16
                    for i, a in zip(train["cv/frame"][()], train["cv/atom"][()])]
        np.testing.assert_allclose(dft, expected, rtol=1e-4)
        pred, std = train["cv/shift_pred_ppm"][()], train["cv/shift_std_ppm"][()]
        assert len(pred) == len(std) == 16 * 16 and np.all(std > 0)
        # the recorded CV metrics are those of the stored out-of-fold rows
        metrics = regression_metrics(dft, pred)
        assert train.attrs["cv_rmse_ppm"] == pytest.approx(metrics["rmse_ppm"])
        z = (pred - dft) / std
        assert np.mean(z ** 2) == pytest.approx(1.0, rel=1e-6)  # calibrated on these rows
        assert train.attrs["cv_within_1_sigma"] == pytest.approx(np.mean(np.abs(z) <= 1))
        # the chosen grid point is the best NLPD of the curve
        best = int(np.argmin(curve["nlpd"][()]))
        assert curve["zeta"][best] == chosen["zeta"]
        assert curve["soap_r_cut_a"][best] == chosen["soap_r_cut_a"]
        assert train.attrs["soap"].startswith("json:") and f"{chosen['soap_r_cut_a']}" in \
            train.attrs["soap"]
    assert (folder / "t-train-parity.png").stat().st_size > 1000


def test_gpr_store_predicts_new_frames_through_infer(gpr_store, shared_data, dynshift_bin):
    folder, _ = gpr_store
    new = read_labelled_frames(shared_data / "p63mcm-dev.extxyz")[100:104]
    ase.io.write(folder / "new.extxyz", new, format="extxyz")
    (folder / "p.yaml").write_text(PREDICT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "p.yaml"], cwd=folder,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    model = load_shift_model(folder / "t.h5")
    assert isinstance(model, gpr.GprShiftModel)
    featurizer = SoapFeaturizer.from_settings(model.settings["soap"])
    mean, std = model.predict(featurizer.features(new))
    with h5py.File(folder / "p.h5", "r") as f:
        shifts = f["/infer/p63mcm/shift_ppm"][()]
        sigma = f["/infer/p63mcm/shift_std_ppm"][()]
    assert shifts.shape == (4, 16)
    # infer's compiled SOAP kernel vs dscribe: the same shifts to a small fraction of a ppm
    np.testing.assert_allclose(shifts.ravel(), mean, atol=0.5)
    np.testing.assert_allclose(sigma.ravel(), std, rtol=1e-3)
    dft = np.concatenate([a.arrays["fermi_contact_mhz"][:16] for a in new]) * 800.16
    assert np.sqrt(np.mean((shifts.ravel() - dft) ** 2)) < 400.0  # 16 frames of training
