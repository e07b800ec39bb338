"""The GPR fit over ranks: the same model as one process, to float precision (-n 1, 2, 3)."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.seeds import SeedStreams
from jobs.shiftmodels import gpr
from schemas.train import GprSpec


def _data(n_rows: int = 331, n_features: int = 24):
    rng = np.random.default_rng(42)  # the same rows on every rank
    x = rng.random((n_rows, n_features)) + 0.05
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = 1600.0 + 4000.0 * x[:, 0] - 9000.0 * x[:, 2] * x[:, 3]
    fold_of_row = np.arange(n_rows) % 4
    return x, y, fold_of_row


def test_normal_equations_are_summed_over_ranks():
    comm = MPI.COMM_WORLD
    x, y, _ = _data()
    rows = np.arange(5, 300)
    sparse = x[:40].astype(np.float64)
    gram, rhs, chol = gpr.normal_equations(x, y - y.mean(), rows, sparse, [3, 7], comm,
                                           block_rows=17)
    alone, alone_rhs, _ = gpr.normal_equations(x, y - y.mean(), rows, sparse, [3, 7], None)
    np.testing.assert_allclose(gram, alone, rtol=1e-9, atol=1e-9 * np.abs(alone).max())
    np.testing.assert_allclose(rhs, alone_rhs, rtol=1e-9, atol=1e-9 * np.abs(alone_rhs).max())
    phi = gpr.whitened((x[rows].astype(np.float64) @ sparse.T) ** 7, chol[1])
    np.testing.assert_allclose(gram[1], phi.T @ phi, rtol=1e-9, atol=1e-9 * np.abs(alone).max())
    # Nystroem rows: |phi|^2 <= k(x, x) = 1
    assert np.einsum("ij,ij->i", phi, phi).max() <= 1.0 + 1e-6  # float32 rows: |x| = 1 +- 1e-7
    # every rank holds the same sums (a reduction, not a local partial)
    every = comm.allgather(gram[1, :3, :3])
    for other in every:
        np.testing.assert_array_equal(other, every[0])


def test_cross_validation_and_fit_equal_one_process():
    comm = MPI.COMM_WORLD
    x, y, fold_of_row = _data()
    spec = GprSpec(zeta=[1, 4, 9], regularisation=[1e-4, 1e-2], n_sparse=[30, 60], block_rows=50,
                   variance_sketch_rows=32)
    seeds = SeedStreams(5)
    cv = gpr.cross_validate(x, y, fold_of_row, spec, seeds, comm)
    alone = gpr.cross_validate(x, y, fold_of_row, spec, seeds, None)
    np.testing.assert_allclose(cv.predictions_ppm, alone.predictions_ppm, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cv.raw_variance, alone.raw_variance, rtol=1e-6)
    np.testing.assert_allclose(cv.curve.rmse_ppm, alone.curve.rmse_ppm, rtol=1e-10)
    assert cv.best() == alone.best()
    model = gpr.fit(x, y, 4, 1e-4, 60, 12.0, spec, seeds, comm, seed_index=4)
    single = gpr.fit(x, y, 4, 1e-4, 60, 12.0, spec, seeds, None, seed_index=4)
    np.testing.assert_array_equal(model.sparse, single.sparse)  # same points on every rank
    np.testing.assert_allclose(model.weights, single.weights, rtol=1e-7,
                               atol=1e-9 * np.abs(single.weights).max())
    mean, std = model.predict(x)
    mean1, std1 = single.predict(x)
    np.testing.assert_allclose(mean, mean1, rtol=0, atol=1e-3)  # float32 output, ~1600 ppm
    np.testing.assert_allclose(std, std1, rtol=1e-5)
    # the model learned the function (not a constant): the test can fail
    assert np.sqrt(np.mean((mean - y) ** 2)) < 0.3 * np.std(y)  # measured 0.18
    every = comm.allgather(model.weights)
    for other in every:
        np.testing.assert_array_equal(other, every[0])


def test_weight_space_fit_equals_one_process():
    """zeta 1: X^T X summed over the ranks; the same weights and sketch on every rank."""
    comm = MPI.COMM_WORLD
    x, y, _ = _data()
    spec = GprSpec(zeta=[1], regularisation=[1e-4], block_rows=37, variance_sketch_rows=32)
    seeds = SeedStreams(5)
    model = gpr.fit(x, y, 1, 1e-4, 0, 12.0, spec, seeds, comm, seed_index=4)
    single = gpr.fit(x, y, 1, 1e-4, 0, 12.0, spec, seeds, None, seed_index=4)
    assert model.form == "weight-space"
    np.testing.assert_allclose(model.weights, single.weights, rtol=1e-7,
                               atol=1e-9 * np.abs(single.weights).max())
    np.testing.assert_allclose(model.variance_factor, single.variance_factor, rtol=1e-6,
                               atol=1e-9 * np.abs(single.variance_factor).max())
    mean, std = model.predict(x)
    assert np.sqrt(np.mean((mean - y) ** 2)) < 0.3 * np.std(y)
    every = comm.allgather(model.weights)
    for other in every:
        np.testing.assert_array_equal(other, every[0])
