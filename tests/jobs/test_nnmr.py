"""The NN-NMR network: Keras training, the numpy ensemble, store round trips."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.layouts.train import export_ensemble
from jobs.shiftmodels.metrics import regression_metrics
from jobs.shiftmodels.nnmr import FoldModel, ShiftEnsemble, read_fold_model, write_fold_model
from jobs.shiftmodels.nnmr_training import build_model, train_model
from jobs.shiftmodels.registry import load_shift_model
from schemas.train import TrainSpec

TINY = dict(hidden_units=[32, 16], epochs=60, batch_size=64, patience_epochs=60,
            learning_rate=3e-3, lr_decay_epochs=20)


@pytest.fixture(scope="module")
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF)


def synthetic(n_rows: int, seed: int, n_features: int = 20):
    rng = np.random.default_rng(seed)
    x = rng.random((n_rows, n_features)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = np.linspace(-1.0, 1.0, n_features)
    y = 1600.0 + 3000.0 * (x @ w) + 400.0 * np.sin(6 * x[:, 0])
    return x, y


def test_regression_metrics():
    m = regression_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 5.0]))
    assert m["rmse_ppm"] == pytest.approx(1.0)
    assert m["mae_ppm"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1.0 - 4.0 / 5.0)


def test_numpy_ensemble_matches_keras(ctx):
    import keras

    spec = TrainSpec(**TINY)
    x, _ = synthetic(50, 1)
    model = build_model(x.shape[1], spec, seed=3)
    rng = np.random.default_rng(0)
    weights = [w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()]
    model.set_weights(weights)
    mean, scale = x.mean(0), x.std(0) + 0.01
    fold = FoldModel(weights[0::2], weights[1::2], mean, scale, target_mean_ppm=1500.0,
                     target_std_ppm=700.0)
    keras_ppm = np.asarray(model((x - mean) / scale, training=False))[:, 0] * 700.0 + 1500.0
    np.testing.assert_allclose(fold.predict_ppm(x), keras_ppm, rtol=1e-4, atol=1e-2)
    ens = ShiftEnsemble([fold.folded(), fold.folded()], {}, chunk_rows=7)
    mean_ppm, std_ppm = ens.predict(x)
    np.testing.assert_allclose(mean_ppm, keras_ppm, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(std_ppm, 0.0, atol=1e-3)
    with pytest.raises(ValueError, match="features of shape"):
        ens.predict(x[:, :5])
    assert keras.__version__  # the Keras 3 model was the reference


def test_training_learns_a_smooth_function(ctx):
    spec = TrainSpec(**TINY)
    x, y = synthetic(1200, 2)
    xv, yv = synthetic(300, 3)
    model = train_model(x, y, xv, yv, spec, ctx, seed=5)
    xt, yt = synthetic(300, 4)
    metrics = regression_metrics(yt, model.predict_ppm(xt))
    baseline = float(np.std(yt))
    assert metrics["rmse_ppm"] < 0.25 * baseline, (metrics, baseline)
    assert metrics["r2"] > 0.9
    assert model.curves["val_rmse_ppm"].shape == (model.epochs_run,)
    assert model.curves["val_rmse_ppm"][model.best_epoch - 1] == \
        pytest.approx(model.curves["val_rmse_ppm"].min())
    # inverse-time decay: lr(epoch 20) = lr0 / 2
    assert model.curves["learning_rate"][19] == pytest.approx(spec.learning_rate / 2, rel=0.02)


@pytest.mark.parametrize("ema_epochs", [0.0, 3.0])
def test_kept_weights_are_the_validated_ones(ctx, ema_epochs):
    """The returned weights give the best recorded validation RMSE (with a weight average:
    the AVERAGED weights were validated and are the ones kept, not the last trained ones)."""
    spec = TrainSpec(**{**TINY, "epochs": 25, "patience_epochs": 25, "ema_epochs": ema_epochs})
    x, y = synthetic(800, 2)
    xv, yv = synthetic(200, 3)
    model = train_model(x, y, xv, yv, spec, ctx, seed=5)
    rmse = regression_metrics(yv, model.predict_ppm(xv))["rmse_ppm"]
    assert rmse == pytest.approx(model.curves["val_rmse_ppm"][model.best_epoch - 1], rel=1e-4)
    assert rmse == pytest.approx(model.curves["val_rmse_ppm"].min(), rel=1e-4)


def test_weight_average_smooths_the_validation_curve(ctx):
    """A 5-epoch weight average follows the noisy trained weights more smoothly: its epoch-to-
    epoch changes of validation RMSE are smaller (same seed, data and batches)."""
    spec = dict(TINY, epochs=40, patience_epochs=40, learning_rate=1e-2, lr_decay_epochs=1000)
    x, y = synthetic(800, 2)
    xv, yv = synthetic(200, 3)
    raw = train_model(x, y, xv, yv, TrainSpec(**spec, ema_epochs=0.0), ctx, seed=5)
    averaged = train_model(x, y, xv, yv, TrainSpec(**spec, ema_epochs=5.0), ctx, seed=5)
    np.testing.assert_allclose(averaged.curves["train_mse_std"], raw.curves["train_mse_std"],
                               rtol=1e-4)  # the same training run underneath
    jitter = [np.abs(np.diff(m.curves["val_rmse_ppm"][10:])).mean() for m in (raw, averaged)]
    assert jitter[1] < 0.7 * jitter[0], jitter


def test_store_round_trip_and_float16(ctx, tmp_path):
    rng = np.random.default_rng(7)
    shapes = [(20, 8), (8, 1)]
    fold = FoldModel([rng.normal(size=s).astype(np.float32) for s in shapes],
                     [rng.normal(size=s[1]).astype(np.float32) for s in shapes],
                     rng.random(20).astype(np.float32), 1 + rng.random(20).astype(np.float32),
                     1234.0, 567.0)
    path = tmp_path / "s.h5"
    with RunStore(path, ctx) as store:
        write_fold_model(store, "/train/folds/0", fold, rmse_ppm=1.0, complete=True)
        write_fold_model(store, "/train/folds/1", fold, dtype="float16", complete=True)
        store.set_attrs("/train", soap={"n_max": 9}, centre="Na")
        again = read_fold_model(store, "/train/folds/0")
        assert store.read("/train/folds/1/kernel_0").dtype == np.float16
    x = rng.random((30, 20)).astype(np.float32)
    np.testing.assert_allclose(again.predict_ppm(x), fold.predict_ppm(x), rtol=1e-6)
    ens = load_shift_model(path)
    assert ens.n_models == 2 and ens.settings["centre"] == "Na"
    every = ens.predict_all(x)
    np.testing.assert_allclose(every[0], fold.predict_ppm(x), rtol=1e-5)
    np.testing.assert_allclose(every[1], every[0], rtol=1e-2, atol=2.0)  # float16 kernels
    assert np.abs(every[1] - every[0]).max() > 0


def test_export_keeps_selected_folds(ctx, tmp_path):
    rng = np.random.default_rng(8)
    fold = FoldModel([rng.normal(size=(10, 4)).astype(np.float32),
                      rng.normal(size=(4, 1)).astype(np.float32)],
                     [np.zeros(4, np.float32), np.zeros(1, np.float32)],
                     np.zeros(10, np.float32), np.ones(10, np.float32), 100.0, 10.0)
    source = tmp_path / "full.h5"
    with RunStore(source, ctx) as store:
        for k in range(3):
            write_fold_model(store, f"/train/folds/{k}", fold, rmse_ppm=float(k), complete=True)
        store.put("/train/cv/fold", np.array([0, 0, 1, 2, 2, 2]))
        store.put("/train/cv/shift_dft_ppm", np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        store.put("/train/cv/shift_pred_ppm", np.array([1.0, 2.0, 3.0, 4.0, 5.0, 9.0]))
        store.put("/train/split/fold_of_frame", np.array([0, 1, 2]))
        store.set_attrs("/train", centre="Na", cv_rmse_ppm=99.0, spec={"folds": 3})
    metrics = export_ensemble(source, tmp_path / "small.h5", folds=[0, 2])
    assert metrics["rmse_ppm"] == pytest.approx(np.sqrt(9.0 / 5.0))
    with RunStore(tmp_path / "small.h5", ctx, mode="r") as small:
        assert small.keys("/train/folds") == ["0", "2"]
        assert small.read("/train/cv/fold").tolist() == [0, 0, 2, 2, 2]
        assert small.read("/train/folds/2/kernel_0").dtype == np.float16
        attrs = small.attrs("/train")
        assert attrs["folds_trained"] == 2 and attrs["spec"]["weights_dtype"] == "float16"
        assert attrs["cv_rmse_ppm"] == pytest.approx(metrics["rmse_ppm"])
        assert small.attrs("/train/folds/2")["rmse_ppm"] == 2.0
    assert load_shift_model(tmp_path / "small.h5").n_models == 2


# ---- infer's predictor: TensorFlow or numpy, chosen by timing --------------------------------
def _wide_ensemble(n_features: int = 40, n_models: int = 3, seed: int = 3) -> ShiftEnsemble:
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(n_models):
        widths = [n_features, 64, 32, 1]
        kernels = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
                   for a, b in zip(widths[:-1], widths[1:])]
        biases = [rng.normal(0, 0.1, b).astype(np.float32) for b in widths[1:]]
        folds.append(FoldModel(kernels, biases, np.zeros(n_features, np.float32),
                               np.ones(n_features, np.float32), 1600.0, 400.0))
    return ShiftEnsemble([f.folded() for f in folds], {"centre": "Na"})


def test_tf_predictor_is_traced_once_whatever_the_chunk_sizes():
    from jobs.shiftmodels.predictors import TfGemmEnsemble

    ensemble = _wide_ensemble()
    fast = TfGemmEnsemble(ensemble, threads=1, chunk_rows=1024)
    rng = np.random.default_rng(4)
    for rows in (4, 100, 2500, 7):  # 2500 rows: GEMM chunks of 1024, 1024 and 452
        x = rng.random((rows, ensemble.n_features), dtype=np.float32)
        np.testing.assert_allclose(fast.predict_all(x), ensemble.predict_all(x), rtol=0,
                                   atol=2e-3)  # ppm: float32 summation order only
    assert fast._every_model.experimental_get_tracing_count() == 1  # no retracing per shape


def test_choose_predictor_times_both_and_takes_the_faster(ctx):
    from jobs.shiftmodels.predictors import PREDICTORS, TfGemmEnsemble, choose_predictor

    ensemble = _wide_ensemble()
    predictor, choice = choose_predictor(ensemble, ctx, rows_per_frame=16, frames=8, repeats=2)
    assert choice.source == "timed" and choice.rows == 128 and choice.name in PREDICTORS
    timings = [choice.numpy_ms_per_frame, choice.tensorflow_ms_per_frame]
    assert all(np.isfinite(t) and t > 0 for t in timings)
    assert choice.name == PREDICTORS[int(np.argmin(timings))]
    assert isinstance(predictor, TfGemmEnsemble) == (choice.name == "tensorflow")
    assert set(choice.attrs()) == {"predictor", "predictor_numpy_ms_per_frame",
                                   "predictor_tensorflow_ms_per_frame", "predictor_timed_rows"}
    line = choice.log_line()
    assert line.startswith(f"predictor {choice.name}: numpy ") and "TensorFlow" in line
    x = np.random.default_rng(5).random((50, ensemble.n_features), dtype=np.float32)
    np.testing.assert_allclose(predictor.predict(x)[0], ensemble.predict(x)[0], atol=2e-3)
    stand_in = object()  # no ShiftEnsemble (e.g. a GPR model): predicts itself, not timed
    kept, fixed = choose_predictor(stand_in, ctx, 16)
    assert kept is stand_in and fixed.source == "fixed" and fixed.name == "object"


def test_a_resumed_infer_reuses_the_recorded_predictor(ctx, tmp_path, monkeypatch):
    import jobs.shiftmodels.predictors
    from jobs.layouts.infer import GROUP
    from jobs.shiftmodels.predictors import TfGemmEnsemble
    from jobs.stages.infer import predictor_for
    from schemas.infer import InferSpec

    ensemble, spec = _wide_ensemble(), InferSpec()
    with RunStore(tmp_path / "run.h5", ctx) as store:
        first, choice = predictor_for(ensemble, spec, ctx, store, "model-a", 16)
        recorded = store.attrs(GROUP)
        assert recorded["predictor"] == choice.name and recorded["predictor_model"] == "model-a"
        assert recorded["predictor_timed_rows"] == 16 * min(32, spec.chunk_frames)

        def no_timing(*args, **kwargs):
            raise AssertionError("a resumed run must not time again")

        monkeypatch.setattr(jobs.shiftmodels.predictors, "predictor_ms_per_call", no_timing)
        again, reused = predictor_for(ensemble, spec, ctx, store, "model-a", 16)
        assert reused.source == "recorded" and reused.name == choice.name
        assert type(again) is type(first)
        # the other predictor, had the first start chosen it
        other = "numpy" if choice.name == "tensorflow" else "tensorflow"
        store.set_attrs(GROUP, predictor=other)
        flipped, _ = predictor_for(ensemble, spec, ctx, store, "model-a", 16)
        assert isinstance(flipped, TfGemmEnsemble) == (other == "tensorflow")
        with pytest.raises(AssertionError, match="must not time again"):  # another model
            predictor_for(ensemble, spec, ctx, store, "model-b", 16)
