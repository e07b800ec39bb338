"""The GPR shift model: sparse Gaussian-process regression on SOAP, calibrated uncertainty.

The second shift model beside NN-NMR (``train.model: gpr``; docs/gpr.md). It reads the same
L2-normalised SOAP rows of the target nuclei (:class:`jobs.shiftmodels.soap.SoapFeaturizer`) and learns

- kernel: polynomial, ``k(x, y) = (x . y)^zeta`` (rows of unit norm: k(x, x) = 1);
- sparse (projected process / DTC, Quinonero-Candela & Rasmussen 2005): M representative
  environments X_M, chosen by farthest-point sampling (in a seeded random projection of the
  rows) or at random from the training rows; the mean is
  ``mu + k(x, X_M) w`` with ``(lambda K_MM + K_MN K_NM) w = K_MN (y - mu)``,
  ``lambda = sigma_n^2 / sigma_f^2``; O(M) per nucleus once k(x, X_M) is known;
- variance: ``sigma_f^2 [lambda + k(x, x) - k K_MM^-1 k + lambda k A^-1 k]`` (the DTC
  predictive variance of a new label, A the normal matrix above), i.e.
  ``std^2 = scale^2 (lambda + k(x, x) - k B k)`` with ``B = K_MM^-1 - lambda A^-1`` stored;
  ``scale`` (ppm, sigma_f) is fitted on the held-out folds so that z-scores have unit
  variance (the calibration);
- fit, MPI-parallel and memory-bounded: each rank computes the kernel rows K_NM of its
  contiguous block of rows, ``block_rows`` at a time, accumulates the M x M normal matrix
  K_MN K_NM and the M-vector K_MN y, and the ranks sum them (``engine.stats.sum_over_ranks``):
  memory O(M^2 + block_rows M) per rank beyond the features; the M x M Cholesky solve is repeated on
  every rank (M <= a few thousand: ~0.1 s; every rank then holds the model, no broadcast);
- everything from the dot products on is float64.

Hyperparameters (zeta, lambda, M, and the SOAP cutoff / width in jobs.stages.train) are chosen by
frame-level k-fold cross validation: :func:`cross_validate` fits every (zeta, lambda, M) of the
grid on each fold's training rows (sparse points chosen from those rows only) and scores the
held-out rows (RMSE, R2, calibrated NLPD, coverage of 1 and 2 sigma).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.stats import sum_over_ranks

MODEL_NAME = "gpr"
"""Value of the ``model`` attribute of ``/train`` for this model (NN-NMR's is ``nnmr``)."""


# ---- kernel and sparse points -----------------------------------------------------------------
def kernel_dots(rows: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Dot products (float64) of feature rows with the sparse environments, (n, M)."""
    return np.asarray(rows, dtype=np.float64) @ np.asarray(sparse, dtype=np.float64).T


def polynomial_kernel(dots: np.ndarray, zeta: int) -> np.ndarray:
    """(x . y)^zeta of dot products (float64)."""
    return np.power(dots, int(zeta))


def farthest_points(features: np.ndarray, n_points: int, rng: np.random.Generator,
                    projection_dims: int = 256) -> np.ndarray:
    """Indices of `n_points` rows chosen by farthest-point sampling.

    Distances are Euclidean between the rows' random projections ``x R`` (R Gaussian,
    ``projection_dims`` columns, drawn from `rng`; it preserves distances to a few per cent
    at a fraction of the cost); the first row is drawn from `rng`, then each next row is the
    one farthest from all rows chosen so far (ties: the lowest index). For rows of unit norm
    the kernel distance 2 - 2 (x . y)^zeta is monotone in the Euclidean one whenever x . y >= 0
    (every pair of the P2-NMMO rows: >= 0.96), so one ordering serves every zeta. Every rank
    computes the same indices from the same rows and generator (no communication).
    """
    n_rows = len(features)
    n_points = min(int(n_points), n_rows)
    projection = rng.standard_normal((features.shape[1], projection_dims)) / np.sqrt(
        projection_dims)
    projected = np.asarray(features, dtype=np.float64) @ projection
    squared = np.einsum("ij,ij->i", projected, projected)
    chosen = np.empty(n_points, dtype=np.int64)
    chosen[0] = int(rng.integers(n_rows))
    distance = np.full(n_rows, np.inf)
    for k in range(1, n_points):
        point = projected[chosen[k - 1]]
        np.minimum(distance, squared + point @ point - 2.0 * (projected @ point), out=distance)
        distance[chosen[k - 1]] = -np.inf
        chosen[k] = int(np.argmax(distance))
    return chosen


def sparse_points(features: np.ndarray, n_points: int, selection: str, rng: np.random.Generator,
                  projection_dims: int = 256) -> np.ndarray:
    """Indices of the M representative rows: ``fps`` (:func:`farthest_points`) or ``random``."""
    if selection == "fps":
        return farthest_points(features, n_points, rng, projection_dims)
    if selection == "random":
        return np.sort(rng.permutation(len(features))[:min(int(n_points), len(features))])
    raise ValueError(f"sparse selection {selection!r}: use fps or random")


# ---- the normal equations, over ranks -------------------------------------------------------
def sparse_cholesky(kernel_mm: np.ndarray, jitter: float) -> np.ndarray:
    """Lower Cholesky factor L of K_MM + jitter * mean(diag) * I (float64).

    Nested: the factor of the leading m x m block is the leading block of this one, so one
    factor serves every M of a grid (the sparse points are nested too)."""
    from scipy.linalg import cholesky

    matrix = np.array(kernel_mm, dtype=np.float64, copy=True)
    matrix[np.diag_indices_from(matrix)] += jitter * float(np.mean(np.diag(kernel_mm)))
    return cholesky(matrix, lower=True)


def whitened(kernel_rows: np.ndarray, chol_mm: np.ndarray) -> np.ndarray:
    """Nystroem features phi = L^-1 k of kernel rows (n, M) -> (n, M); |phi|^2 <= k(x, x)."""
    from scipy.linalg import solve_triangular

    return solve_triangular(chol_mm, np.ascontiguousarray(kernel_rows.T), lower=True).T


def normal_equations(features: np.ndarray, targets: np.ndarray, rows: np.ndarray,
                     sparse: np.ndarray, zetas, comm=None, block_rows: int = 2048,
                     jitter: float = 1e-8):
    """Whitened normal equations of the training `rows`, for each zeta, over the ranks.

    The sparse GP's weights solve ``(lambda K_MM + K_MN K_NM) w = K_MN y``; formed as it
    stands, that matrix squares the condition number of K_NM (on SOAP rows whose dot products
    are all >= 0.96 its smallest eigenvalues are lost in float64). With K_MM = L L^T and the
    Nystroem features phi = L^-1 k (rows of norm <= 1) the same model is
    ``(Phi^T Phi + lambda I) v = Phi^T y``, ``w = L^-T v``: eigenvalues in [lambda, N].

    Parameters
    ----------
    features
        All feature rows (every rank holds them; only this rank's share is read).
    targets
        Targets of every row (float64, the mean already subtracted).
    rows
        Indices of the rows to sum over (the training rows), the same on every rank; each
        rank takes a contiguous block of them, ``block_rows`` at a time.
    sparse
        (M, n_features) sparse environments.
    zetas
        Kernel exponents.
    comm
        The communicator (None: this process alone).
    jitter
        Relative diagonal added to K_MM before its Cholesky factorisation.

    Returns
    -------
    (gram, rhs, chol)
        ``gram[z]``: (M, M) Phi^T Phi; ``rhs[z]``: (M,) Phi^T y, summed over all `rows` and
        ranks (``Allreduce``), and ``chol[z]`` the lower factor L of K_MM; float64, identical
        on every rank.
    """
    zetas = [int(z) for z in zetas]
    n_sparse = len(sparse)
    size, rank = (comm.Get_size(), comm.Get_rank()) if comm is not None else (1, 0)
    bounds = np.linspace(0, len(rows), size + 1).round().astype(int)
    mine = rows[bounds[rank]:bounds[rank + 1]]
    sparse64 = np.asarray(sparse, dtype=np.float64)
    dots_mm = sparse64 @ sparse64.T
    chol = [sparse_cholesky(polynomial_kernel(dots_mm, zeta), jitter) for zeta in zetas]
    gram = np.zeros((len(zetas), n_sparse, n_sparse))
    rhs = np.zeros((len(zetas), n_sparse))
    for start in range(0, len(mine), block_rows):
        block = mine[start:start + block_rows]
        dots = np.asarray(features[block], dtype=np.float64) @ sparse64.T
        for z, zeta in enumerate(zetas):
            phi = whitened(polynomial_kernel(dots, zeta), chol[z])
            gram[z] += phi.T @ phi
            rhs[z] += phi.T @ targets[block]
    sum_over_ranks(comm, gram, rhs)
    return gram, rhs, chol


@dataclass
class SparseSolution:
    """One fitted sparse GP in whitened form: v, the factors of K_MM and of the normal matrix."""

    coefficients: np.ndarray
    """v of ``(Phi^T Phi + lambda I) v = Phi^T y``."""
    chol_mm: np.ndarray
    """Lower Cholesky factor L of K_MM (jittered)."""
    chol_normal: np.ndarray
    """Lower Cholesky factor of Phi^T Phi + lambda I."""
    regularisation: float

    @property
    def weights(self) -> np.ndarray:
        """w = L^-T v: the mean is k(x, X_M) . w."""
        from scipy.linalg import solve_triangular

        return solve_triangular(self.chol_mm, self.coefficients, lower=True, trans="T")

    def mean(self, phi: np.ndarray) -> np.ndarray:
        """Mean (target units, prior mean 0) of whitened rows."""
        return phi @ self.coefficients

    def raw_variance(self, phi: np.ndarray, self_kernel: np.ndarray) -> np.ndarray:
        """``lambda + k(x, x) - |phi|^2 + lambda phi^T C^-1 phi`` per row (sigma_f^2 units)."""
        from scipy.linalg import solve_triangular

        half = solve_triangular(self.chol_normal, np.ascontiguousarray(phi.T), lower=True)
        s = np.einsum("ij,ij->j", half, half)
        q = np.einsum("ij,ij->i", phi, phi)
        return self.regularisation * (1.0 + s) + np.maximum(self_kernel - q, 0.0)

    def variance_factor(self) -> np.ndarray:
        """G (M x M) with ``k B k = |G k|^2``, B = K_MM^-1 - lambda A^-1: the variance of a row
        is ``lambda + k(x, x) - |G k|^2``. G = E^1/2 V^T L^-1 where ``I - lambda C^-1 = V E
        V^T`` (eigenvalues in [0, 1))."""
        from scipy.linalg import cho_solve, solve_triangular

        n = len(self.coefficients)
        eye = np.eye(n)
        c_inv = cho_solve((self.chol_normal, True), eye)
        e_matrix = eye - self.regularisation * 0.5 * (c_inv + c_inv.T)
        values, vectors = np.linalg.eigh(e_matrix)
        l_inv = solve_triangular(self.chol_mm, eye, lower=True)
        return (np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T) @ l_inv


def solve_sparse(gram: np.ndarray, rhs: np.ndarray, chol_mm: np.ndarray,
                 regularisation: float) -> SparseSolution:
    """Solve ``(Phi^T Phi + lambda I) v = Phi^T y`` by Cholesky (scipy, float64)."""
    from scipy.linalg import cho_solve, cholesky

    normal = np.array(gram, dtype=np.float64, copy=True)
    normal[np.diag_indices_from(normal)] += regularisation
    chol_normal = cholesky(normal, lower=True)
    return SparseSolution(cho_solve((chol_normal, True), rhs), chol_mm, chol_normal,
                          float(regularisation))


# ---- the weight-space form (zeta 1) ------------------------------------------------------------
WEIGHT_SPACE_ZETA = 1
"""The kernel exponent computed in weight space: k(x, y) = x . y has the SOAP space itself as
its feature space, so the exact GP over ALL training rows is a Bayesian linear regression with
n_features weights; no sparse points are needed (``n_sparse`` is recorded as 0)."""


def linear_statistics(features: np.ndarray, targets: np.ndarray, rows: np.ndarray, comm=None,
                      block_rows: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X^T X``, ``X^T y`` and ``X^T 1`` of the training `rows`, summed over the ranks.

    Each rank takes a contiguous block of `rows`, ``block_rows`` at a time; one ``Allreduce``
    of each sum. Memory per rank: n_features^2 float64 (538 MB at 8200 features), whatever the
    number of rows; cost O(N n_features^2) split over the ranks.
    """
    size, rank = (comm.Get_size(), comm.Get_rank()) if comm is not None else (1, 0)
    bounds = np.linspace(0, len(rows), size + 1).round().astype(int)
    mine = rows[bounds[rank]:bounds[rank + 1]]
    n = features.shape[1]
    gram, rhs, total = np.zeros((n, n)), np.zeros(n), np.zeros(n)
    for start in range(0, len(mine), block_rows):
        block = mine[start:start + block_rows]
        x = np.asarray(features[block], dtype=np.float64)
        gram += x.T @ x
        rhs += x.T @ np.asarray(targets[block], dtype=np.float64)
        total += x.sum(axis=0)
    sum_over_ranks(comm, gram, rhs, total)
    return gram, rhs, total


@dataclass
class LinearSolution:
    """The exact GP of the linear kernel in weight space: ``(X^T X + lambda I) beta = X^T y``."""

    coefficients: np.ndarray
    """beta (n_features): the mean is ``x . beta`` (prior mean subtracted)."""
    chol: np.ndarray
    """Lower Cholesky factor L of X^T X + lambda I."""
    regularisation: float

    def mean(self, rows: np.ndarray) -> np.ndarray:
        """Mean (target units, prior mean 0) of feature rows."""
        return np.asarray(rows, dtype=np.float64) @ self.coefficients

    def leverage(self, rows: np.ndarray) -> np.ndarray:
        """``h = x^T (X^T X + lambda I)^-1 x`` per row, exactly (n_features^2 per row)."""
        from scipy.linalg import solve_triangular

        half = solve_triangular(self.chol, np.asarray(rows, dtype=np.float64).T, lower=True)
        return np.einsum("ij,ij->j", half, half)

    def sketch(self, rng: np.random.Generator, n_rows: int) -> np.ndarray:
        """W (n_rows x n_features) with ``E |W x|^2 = h``: a Gaussian (Johnson-Lindenstrauss)
        sketch ``W = S L^-1 / sqrt(k)`` of the posterior covariance; its relative error on h
        is ~sqrt(2 / k) (k = 256: ~9 %, ~4 % on the standard deviation)."""
        from scipy.linalg import solve_triangular

        gaussian = rng.standard_normal((n_rows, len(self.coefficients)))
        return solve_triangular(self.chol, gaussian.T, lower=True, trans="T").T / np.sqrt(
            n_rows)

    def raw_variance(self, rows: np.ndarray, sketch: np.ndarray | None = None) -> np.ndarray:
        """``lambda (1 + h)`` per row (units of sigma_f^2): the predictive variance of a new
        label, sigma_n^2 (1 + h); h from the `sketch` when one is given, else exact."""
        if sketch is None:
            h = self.leverage(rows)
        else:
            half = np.asarray(rows, dtype=np.float64) @ sketch.T
            h = np.einsum("ij,ij->i", half, half)
        return self.regularisation * (1.0 + h)


def solve_linear(gram: np.ndarray, rhs: np.ndarray, regularisation: float) -> LinearSolution:
    """Solve ``(X^T X + lambda I) beta = X^T y`` by Cholesky (scipy, float64)."""
    from scipy.linalg import cho_solve, cholesky

    normal = np.array(gram, dtype=np.float64, copy=True)
    normal[np.diag_indices_from(normal)] += regularisation
    chol = cholesky(normal, lower=True)
    return LinearSolution(cho_solve((chol, True), rhs), chol, float(regularisation))


def variance_reduction_picks(pool_rows: np.ndarray, frame_of_row: np.ndarray,
                             chol: np.ndarray | None, regularisation: float, n_picks: int,
                             exclude=()) -> list[int]:
    """Frames to label next, chosen one at a time by the reduction of the pool's summed
    posterior variance (greedy V-optimal design of the linear-kernel GP).

    The pool's latent posterior covariance, given the labelled rows (``chol``: the Cholesky
    factor L of ``X^T X + lambda I`` over them, :class:`LinearSolution`; None: no labels yet,
    ``L = sqrt(lambda) I``), is ``C = lambda Z^T Z`` with ``Z = L^-1 X_pool^T``. Labelling
    frame f (its rows F, noise lambda) lowers the summed variance over every pool row by
    ``trace((C_FF + lambda I)^-1 C_F: C_:F)``; the frame of largest reduction is taken, C is
    conditioned on it (a rank-|F| update), and so on. So each pick accounts for the frames
    already picked: a batch is diverse by construction, unlike the top-k of the variance.

    Parameters
    ----------
    pool_rows
        (P, n_features) feature rows of every candidate frame's target nuclei: the pool over
        which the variance is summed (and the candidates).
    frame_of_row
        (P,) frame id of each row; the ids returned are these.
    exclude
        Frame ids never picked (already labelled); their rows still count in the sum.

    Memory: two P x P float64 matrices (8200 rows: 1.1 GB); time O(P n_features^2 + P^2
    n_features) once, then O(P^2 m) per pick (m rows per frame).
    """
    from scipy.linalg import solve_triangular

    rows = np.asarray(pool_rows, dtype=np.float64)
    if chol is None:
        z = rows.T / np.sqrt(regularisation)
    else:
        z = solve_triangular(chol, rows.T, lower=True)
    cov = z.T @ z            # C / lambda: the noise variance is 1 in these units
    del z
    return greedy_reduction(cov, frame_of_row, n_picks, exclude)


def kernel_reduction_picks(pool_rows: np.ndarray, frame_of_row: np.ndarray,
                           labelled_rows: np.ndarray | None, zeta: int, noise: float,
                           n_picks: int, exclude=()) -> list[int]:
    """Greedy V-optimal picks as :func:`variance_reduction_picks`, under the polynomial kernel
    ``(x . y)^zeta`` of the (L2-normalised) rows: the exact GP over the pool, not the linear
    kernel's weight space. It is the design matched to a sparse model of that zeta.

    The pool's latent covariance given the `labelled_rows` (noise variance `noise`, in units
    of the kernel's prior variance 1) is ``K_pp - K_pl (K_ll + noise I)^-1 K_lp``; labelled
    rows that are also pool rows count once in each role, as in the linear form.

    Memory: two P x P float64 matrices and one P x L; time O(P^2 (n_features + L)) once, then
    O(P^2 m) per pick.
    """
    from scipy.linalg import cho_factor, cho_solve

    rows = np.asarray(pool_rows, dtype=np.float64)
    cov = polynomial_kernel(rows @ rows.T, zeta)
    if labelled_rows is not None and len(labelled_rows):
        labelled = np.asarray(labelled_rows, dtype=np.float64)
        cross = polynomial_kernel(rows @ labelled.T, zeta)
        inner = polynomial_kernel(labelled @ labelled.T, zeta)
        inner[np.diag_indices_from(inner)] += noise
        cov -= cross @ cho_solve(cho_factor(inner, lower=True), cross.T)
        del cross, inner
    cov /= noise             # noise variance 1 in these units
    return greedy_reduction(cov, frame_of_row, n_picks, exclude)


def greedy_reduction(cov: np.ndarray, frame_of_row: np.ndarray, n_picks: int,
                     exclude=()) -> list[int]:
    """The greedy V-optimal loop over `cov`, the pool rows' latent posterior covariance in
    units of the label noise (overwritten): pick the frame whose rows' labels lower
    ``trace(cov)`` most, ``trace((C_FF + I)^-1 C_F: C_:F)``, condition on them, repeat."""
    frame_of_row = np.asarray(frame_of_row)
    frames, inverse = np.unique(frame_of_row, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(frames))]
    excluded = set(int(f) for f in exclude)
    open_ = [i for i, f in enumerate(frames) if int(f) not in excluded]
    def rows_and_inner(i):
        """C_F: (the frame's rows of C) and C_FF + I (noise 1 in these units)."""
        rows_f = cov[members[i]]
        return rows_f, rows_f[:, members[i]] + np.eye(len(members[i]))

    picks = []
    for _ in range(min(n_picks, len(open_))):
        scores = np.empty(len(open_))
        for j, i in enumerate(open_):
            rows_f, inner = rows_and_inner(i)
            scores[j] = np.trace(np.linalg.solve(inner, rows_f @ rows_f.T))
        i = open_.pop(int(np.argmax(scores)))
        picks.append(int(frames[i]))
        rows_f, inner = rows_and_inner(i)
        cov -= rows_f.T @ np.linalg.solve(inner, rows_f)
    return picks


# ---- the predictor ------------------------------------------------------------------------
class GprShiftModel:
    """A fitted GP, predicting shifts (ppm) and calibrated standard deviations.

    The same contract as :class:`jobs.shiftmodels.nnmr.ShiftEnsemble`: ``settings`` (the /train
    attributes: ``soap``, ``species``, ``centre`` ...), ``n_features`` and
    ``predict(features) -> (mean_ppm, std_ppm)``. Two forms:

    - sparse (zeta >= 2): ``mean = mu + k(x, X_M) . w``,
      ``std^2 = scale^2 (lambda + k(x, x) - |G k|^2)``; O(M n_features + M^2) per nucleus;
    - weight space (zeta 1, ``sparse`` None): ``mean = mu + x . beta``,
      ``std^2 = scale^2 lambda (1 + |W x|^2)`` with W the sketch of the posterior covariance
      (:meth:`LinearSolution.sketch`); O((1 + k) n_features) per nucleus.

    Parameters
    ----------
    sparse
        (M, n_features) representative SOAP rows, or None for the weight-space form.
    weights
        (M,) float64 weights (ppm), or beta (n_features,) in the weight-space form.
    variance_factor
        (M, M) float64 G with ``std^2 = scale^2 (lambda + k(x, x) - |G k|^2)``
        (:meth:`SparseSolution.variance_factor`), or the (k, n_features) sketch W.
    zeta, regularisation
        Kernel exponent and lambda.
    target_mean_ppm
        The constant prior mean (the training mean shift).
    std_scale_ppm
        sigma_f (ppm), fitted on held-out folds (calibration).
    settings
        The /train attributes.
    """

    n_models = 1

    def __init__(self, sparse: np.ndarray | None, weights: np.ndarray,
                 variance_factor: np.ndarray, zeta: int, regularisation: float,
                 target_mean_ppm: float, std_scale_ppm: float, settings: dict | None = None,
                 chunk_rows: int = 4096):
        self.sparse = None if sparse is None else np.ascontiguousarray(sparse, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        # the sketch's squares sum without cancellation: float32 is exact enough (1e-7 of h)
        self.variance_factor = np.ascontiguousarray(
            variance_factor, dtype=np.float64 if sparse is not None else np.float32)
        self.zeta = int(zeta)
        if self.sparse is None and self.zeta != WEIGHT_SPACE_ZETA:
            raise ValueError(f"a GPR model without sparse points is the weight-space (zeta "
                             f"{WEIGHT_SPACE_ZETA}) form; got zeta {self.zeta}")
        self.regularisation = float(regularisation)
        self.target_mean_ppm = float(target_mean_ppm)
        self.std_scale_ppm = float(std_scale_ppm)
        self.settings = dict(settings or {})
        self.chunk_rows = int(chunk_rows)
        self.name = "gpr"

    @property
    def form(self) -> str:
        """``sparse`` or ``weight-space``."""
        return "weight-space" if self.sparse is None else "sparse"

    @property
    def n_features(self) -> int:
        """Length of the SOAP rows the model takes."""
        return int(len(self.weights) if self.sparse is None else self.sparse.shape[1])

    @property
    def n_sparse(self) -> int:
        """M, the number of representative environments (0 in the weight-space form)."""
        return 0 if self.sparse is None else int(self.sparse.shape[0])

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean shift (ppm) and calibrated predictive standard deviation (ppm) per row, float32."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features of shape {features.shape}; the model takes "
                             f"(n, {self.n_features})")
        mean = np.empty(len(features), dtype=np.float32)
        std = np.empty(len(features), dtype=np.float32)
        for start in range(0, len(features), self.chunk_rows):
            rows = np.asarray(features[start:start + self.chunk_rows], dtype=np.float64)
            if self.sparse is None:
                mean[start:start + len(rows)] = self.target_mean_ppm + rows @ self.weights
                half = (rows.astype(np.float32) @ self.variance_factor.T).astype(np.float64)
                raw = self.regularisation * (1.0 + np.einsum("ij,ij->i", half, half))
            else:
                k = polynomial_kernel(rows @ self.sparse.T, self.zeta)
                self_k = np.power(np.einsum("ij,ij->i", rows, rows), self.zeta)
                mean[start:start + len(rows)] = self.target_mean_ppm + k @ self.weights
                half = k @ self.variance_factor.T
                quad = np.einsum("ij,ij->i", half, half)
                raw = np.maximum(self.regularisation + self_k - quad, self.regularisation)
            std[start:start + len(rows)] = self.std_scale_ppm * np.sqrt(raw)
        return mean, std

    # ---- store -----------------------------------------------------------------------
    def write(self, store, group: str, factor_dtype: str = "float32", **attrs) -> None:
        """Write the model under ``<group>`` (collective; every rank holds the same).

        The sparse rows and the sketch W are written in `factor_dtype` (float32 or float16;
        the model then computes with them as stored); the weights and the sparse form's
        variance factor stay float64 (the sparse weights are large and alternate)."""
        if self.sparse is not None:
            store.put(f"{group}/sparse_features", self.sparse.astype(factor_dtype))
            store.put(f"{group}/variance_factor", self.variance_factor)
        else:
            store.put(f"{group}/variance_factor", self.variance_factor.astype(factor_dtype))
        store.put(f"{group}/weights_ppm", self.weights)
        store.set_attrs(group, zeta=self.zeta, regularisation=self.regularisation,
                        target_mean_ppm=self.target_mean_ppm,
                        std_scale_ppm=self.std_scale_ppm, n_sparse=self.n_sparse,
                        kernel="polynomial", form=self.form, factor_dtype=factor_dtype, **attrs)

    @classmethod
    def from_store(cls, reader, group: str) -> "GprShiftModel":
        """The model of ``<group>/gpr`` of an open store (use
        :func:`jobs.shiftmodels.registry.load_shift_model` to load a model of any kind)."""
        from engine.failure import InputError

        where = f"{group}/gpr"
        if not reader.exists(f"{where}/weights_ppm"):
            raise InputError(f"{getattr(reader, 'path', reader)}: no GPR model (no "
                             f"{where}/weights_ppm); run the train stage with model gpr")
        attrs = reader.attrs(where)
        # the stored sparse rows are float32: the model computes with them as stored
        sparse = reader.read(f"{where}/sparse_features") if reader.exists(
            f"{where}/sparse_features") else None
        return cls(sparse, reader.read(f"{where}/weights_ppm"),
                   reader.read(f"{where}/variance_factor"), int(attrs["zeta"]),
                   float(attrs["regularisation"]), float(attrs["target_mean_ppm"]),
                   float(attrs["std_scale_ppm"]), reader.attrs(group))


def is_gpr_store(reader, group: str) -> bool:
    """True when ``<group>`` of a store holds a GPR model (``model`` attribute ``gpr``)."""
    return reader.attrs(group).get("model") == MODEL_NAME


# ---- calibration and scores -----------------------------------------------------------------
def calibration_scale(errors_ppm: np.ndarray, raw_variance: np.ndarray) -> float:
    """sigma_f (ppm) that gives the z-scores ``error / (sigma_f sqrt(raw))`` unit variance."""
    errors_ppm = np.asarray(errors_ppm, dtype=np.float64)
    raw_variance = np.asarray(raw_variance, dtype=np.float64)
    return float(np.sqrt(np.mean(errors_ppm ** 2 / raw_variance)))


def coverage(errors_ppm: np.ndarray, std_ppm: np.ndarray) -> dict[str, float]:
    """Fractions of errors within 1 and 2 predicted standard deviations, and the z variance."""
    z = np.asarray(errors_ppm, dtype=np.float64) / np.asarray(std_ppm, dtype=np.float64)
    return {"within_1_sigma": float(np.mean(np.abs(z) <= 1.0)),
            "within_2_sigma": float(np.mean(np.abs(z) <= 2.0)),
            "z_variance": float(np.mean(z ** 2))}


def gaussian_nlpd(errors_ppm: np.ndarray, std_ppm: np.ndarray) -> float:
    """Mean negative log predictive density (nats) of the errors under N(0, std^2)."""
    std = np.asarray(std_ppm, dtype=np.float64)
    z2 = (np.asarray(errors_ppm, dtype=np.float64) / std) ** 2
    return float(np.mean(0.5 * np.log(2 * np.pi) + np.log(std) + 0.5 * z2))


# ---- cross validation -----------------------------------------------------------------------
@dataclass
class CvCurve:
    """Held-out scores of every grid point: parallel lists, one entry per (zeta, lambda, M)."""

    zeta: list = field(default_factory=list)
    regularisation: list = field(default_factory=list)
    n_sparse: list = field(default_factory=list)
    rmse_ppm: list = field(default_factory=list)
    mae_ppm: list = field(default_factory=list)
    r2: list = field(default_factory=list)
    nlpd: list = field(default_factory=list)
    std_scale_ppm: list = field(default_factory=list)
    within_1_sigma: list = field(default_factory=list)
    within_2_sigma: list = field(default_factory=list)

    def append(self, **values) -> None:
        for key, value in values.items():
            getattr(self, key).append(value)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as a numpy array."""
        return {key: np.asarray(value) for key, value in self.__dict__.items()}


@dataclass
class CvResult:
    """Out-of-fold predictions at every grid point and the scores of each."""

    curve: CvCurve
    predictions_ppm: np.ndarray
    """(n_grid, n_rows) out-of-fold mean shifts."""
    raw_variance: np.ndarray
    """(n_grid, n_rows) out-of-fold raw variances (units of sigma_f^2)."""
    grid: list
    """(zeta, lambda, M) per grid point."""
    seconds: float

    def best(self, select_by: str = "nlpd") -> int:
        """Index of the best grid point (lowest NLPD or RMSE; ties: the first)."""
        scores = np.asarray(self.curve.nlpd if select_by == "nlpd" else self.curve.rmse_ppm)
        return int(np.argmin(scores))


def cross_validate(features: np.ndarray, shift_ppm: np.ndarray, fold_of_row: np.ndarray,
                   spec, seeds, comm=None, log=None) -> CvResult:
    """Frame-level k-fold CV of every (zeta, lambda, M) of ``spec`` (a GprSpec).

    For each fold: the sparse points are chosen from the fold's training rows (seed stream
    ``train.gpr_sparse`` at the fold's index, nested: the first M of the largest M), the normal
    equations of its training rows are summed over the ranks, every grid point is solved, and
    the held-out rows are predicted. zeta 1 is solved in weight space instead (one grid point
    per lambda, M recorded as 0): the fold's ``X^T X`` is the whole data's minus the held-out
    rows', the (fold, lambda) solves are dealt over the ranks, and the held-out variances come
    from the same sketch the fitted model uses (stream ``train.gpr_sketch``), so the
    calibration measures the deployed predictor. The rows' folds come from ``fold_of_row``
    (by frame).
    """
    from jobs.shiftmodels.metrics import regression_metrics

    started = time.monotonic()
    zetas = [int(z) for z in spec.zeta]
    sparse_zetas = [z for z in zetas if z != WEIGHT_SPACE_ZETA]
    lambdas = [float(r) for r in spec.regularisation]
    n_rows = len(shift_ppm)
    folds = np.unique(fold_of_row)
    grid = [(z, lam, 0 if z == WEIGHT_SPACE_ZETA else int(m))
            for z in zetas for lam in lambdas
            for m in ([0] if z == WEIGHT_SPACE_ZETA else spec.n_sparse)]
    predictions = np.full((len(grid), n_rows), np.nan)
    raw = np.full((len(grid), n_rows), np.nan)
    size, rank = (comm.Get_size(), comm.Get_rank()) if comm is not None else (1, 0)
    shift64 = np.asarray(shift_ppm, dtype=np.float64)
    if WEIGHT_SPACE_ZETA in zetas:
        whole = linear_statistics(features, shift64, np.arange(n_rows), comm, spec.block_rows)
    task = 0
    for fold in folds:
        train = np.flatnonzero(fold_of_row != fold)
        test = np.flatnonzero(fold_of_row == fold)
        mean_ppm = float(np.mean(shift_ppm[train]))
        if WEIGHT_SPACE_ZETA in zetas:
            gram, xty, xsum = linear_statistics(features, shift64, test, comm, spec.block_rows)
            np.subtract(whole[0], gram, out=gram)
            rhs = (whole[1] - xty) - mean_ppm * (whole[2] - xsum)
            for g, (gz, lam, _) in enumerate(grid):
                if gz != WEIGHT_SPACE_ZETA:
                    continue
                task += 1
                if (task - 1) % size != rank:
                    continue
                solution = solve_linear(gram, rhs, lam)
                sketch = solution.sketch(seeds.rng("train.gpr_sketch", int(fold)),
                                         spec.variance_sketch_rows)
                predictions[g, test] = mean_ppm + solution.mean(features[test])
                raw[g, test] = solution.raw_variance(features[test], sketch)
                del solution
            del gram
        if sparse_zetas:
            targets = shift64 - mean_ppm
            m_max = min(max(int(m) for m in spec.n_sparse), len(train))
            chosen = train[sparse_points(features[train], m_max, spec.sparse_selection,
                                         seeds.rng("train.gpr_sparse", int(fold)),
                                         spec.projection_dims)]
            sparse = np.asarray(features[chosen], dtype=np.float64)
            gram, rhs, chol = normal_equations(features, targets, train, sparse, sparse_zetas,
                                               comm, spec.block_rows, spec.jitter)
            # held-out rows: each rank predicts a contiguous block, gathered below
            bounds = np.linspace(0, len(test), size + 1).round().astype(int)
            mine = test[bounds[rank]:bounds[rank + 1]]
            dots_test = kernel_dots(features[mine], sparse)
            self_dots = np.einsum("ij,ij->i", np.asarray(features[mine], np.float64),
                                  np.asarray(features[mine], np.float64))
            for z, zeta in enumerate(sparse_zetas):
                # nested: the first m columns of phi are the whitened rows of the first m points
                phi = whitened(polynomial_kernel(dots_test, zeta), chol[z])
                self_k = np.power(self_dots, zeta)
                for g, (gz, lam, m) in enumerate(grid):
                    if gz != zeta:
                        continue
                    m = min(m, m_max)
                    solution = solve_sparse(gram[z][:m, :m], rhs[z][:m], chol[z][:m, :m], lam)
                    predictions[g, mine] = mean_ppm + solution.mean(phi[:, :m])
                    raw[g, mine] = solution.raw_variance(phi[:, :m], self_k)
        if log is not None:
            log(f"gpr CV fold {fold}: {len(train)} training rows, "
                f"{time.monotonic() - started:.0f} s")
    if size > 1:  # every row was predicted on exactly one rank (NaN elsewhere): gather by a sum
        predictions, raw = np.nan_to_num(predictions, nan=0.0), np.nan_to_num(raw, nan=0.0)
        sum_over_ranks(comm, predictions, raw)
    curve = CvCurve()
    for g, (zeta, lam, m) in enumerate(grid):
        errors = predictions[g] - shift_ppm
        scale = calibration_scale(errors, raw[g])
        std = scale * np.sqrt(raw[g])
        metrics = regression_metrics(shift_ppm, predictions[g])
        cover = coverage(errors, std)
        curve.append(zeta=zeta, regularisation=lam, n_sparse=m, rmse_ppm=metrics["rmse_ppm"],
                     mae_ppm=metrics["mae_ppm"], r2=metrics["r2"],
                     nlpd=gaussian_nlpd(errors, std), std_scale_ppm=scale,
                     within_1_sigma=cover["within_1_sigma"],
                     within_2_sigma=cover["within_2_sigma"])
    return CvResult(curve, predictions, raw, grid, time.monotonic() - started)


def fit(features: np.ndarray, shift_ppm: np.ndarray, zeta: int, regularisation: float,
        n_sparse: int, std_scale_ppm: float, spec, seeds, comm=None, settings=None,
        rows: np.ndarray | None = None, seed_index: int = 0) -> GprShiftModel:
    """Fit one model on `rows` (default: all) at the given hyperparameters.

    The sparse points come from stream ``train.gpr_sparse`` at `seed_index` (the stage uses
    ``folds``: the index after the CV folds'); zeta 1 is fitted in weight space (`n_sparse`
    unused), its variance sketch drawn from stream ``train.gpr_sketch`` at `seed_index`.
    """
    rows = np.arange(len(shift_ppm)) if rows is None else np.asarray(rows)
    mean_ppm = float(np.mean(shift_ppm[rows]))
    targets = np.asarray(shift_ppm, dtype=np.float64) - mean_ppm
    if int(zeta) == WEIGHT_SPACE_ZETA:
        gram, rhs, _ = linear_statistics(features, targets, rows, comm, spec.block_rows)
        solution = solve_linear(gram, rhs, regularisation)
        del gram
        sketch = solution.sketch(seeds.rng("train.gpr_sketch", int(seed_index)),
                                 spec.variance_sketch_rows)
        return GprShiftModel(None, solution.coefficients, sketch, zeta, regularisation,
                             mean_ppm, std_scale_ppm, settings)
    chosen = rows[sparse_points(features[rows], n_sparse, spec.sparse_selection,
                                seeds.rng("train.gpr_sparse", int(seed_index)),
                                spec.projection_dims)]
    sparse = np.asarray(features[chosen], dtype=np.float64)
    gram, rhs, chol = normal_equations(features, targets, rows, sparse, [zeta], comm,
                                       spec.block_rows, spec.jitter)
    solution = solve_sparse(gram[0], rhs[0], chol[0], regularisation)
    return GprShiftModel(sparse, solution.weights, solution.variance_factor(), zeta,
                         regularisation, mean_ppm, std_scale_ppm, settings)
