"""Horovod data-parallel training: every rank ends with the same weights (-n 1 and -n 2)."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from jobs.shiftmodels.metrics import regression_metrics
from jobs.shiftmodels.nnmr_training import build_model, train_model
from schemas.train import TrainSpec


def test_ranks_end_with_identical_weights():
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    rng = np.random.default_rng(42)  # same data on every rank
    x = rng.random((400, 12)).astype(np.float32)
    y = 1500.0 + 2000.0 * x[:, 0] - 800.0 * x[:, 1] * x[:, 2]
    spec = TrainSpec(hidden_units=[16, 16], epochs=8, batch_size=50, patience_epochs=8,
                     learning_rate=3e-3, ema_epochs=2.0)
    model = train_model(x[:320], y[:320], x[320:], y[320:], spec, ctx, seed=9)
    flat = np.concatenate([w.ravel() for pair in zip(model.kernels, model.biases) for w in pair])
    every = ctx.comm.allgather(flat)
    for other in every[1:]:
        np.testing.assert_array_equal(other, every[0])
    # the weights were trained (not just broadcast): they moved from the seeded initial ones
    initial = build_model(12, spec, seed=9).get_weights()
    assert np.abs(model.kernels[0] - initial[0]).max() > 1e-3
    assert model.curves["val_rmse_ppm"][model.best_epoch - 1] < model.curves["val_rmse_ppm"][0]
    metrics = regression_metrics(y[320:], model.predict_ppm(x[320:]))
    assert metrics["rmse_ppm"] < np.std(y[320:])
