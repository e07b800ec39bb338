"""Statistics by collective reduction: per-rank partial sums, one Allreduce, the same answer
at any rank count.

Every statistic of the analyze stage is a sum over samples (a Na in a frame) binned by an
integer key: a block of frames, a time bin, a histogram bin, an xy-map cell, a site class, a
lag of the mean squared displacement. Each rank accumulates the frames of its own shard into a
:class:`BinnedMoments` (count, sum, sum of squares per key, float64), then
:func:`reduce_moments` adds every accumulator of every rank with ONE ``Allreduce``. The
finishing functions (:func:`block_average`, :func:`running_average`, :func:`moments_mean_std`,
:func:`fit_diffusion`) are pure numpy on the reduced sums, so results agree to floating-point
rounding (the order of additions) at 1 and N ranks.

This module is the one place where the statistics' MPI calls live.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

A2_PER_FS_IN_CM2_PER_S = 0.1
"""1 A^2/fs = 1e-16 cm^2 / 1e-15 s = 0.1 cm^2/s."""


class BinnedMoments:
    """Count, sum and sum of squares of values binned by an integer key in [0, n_bins).

    Parameters
    ----------
    shape
        Number of keys, or the shape of the key space (``n_bins`` is its product; a flat key
        is ``numpy.ravel_multi_index`` of it); :meth:`reshaped` returns arrays of this shape.
    """

    def __init__(self, shape: int | tuple[int, ...]):
        self.shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        self.n_bins = int(np.prod(self.shape))
        self.count = np.zeros(self.n_bins)
        self.sum = np.zeros(self.n_bins)
        self.sum_sq = np.zeros(self.n_bins)

    def add(self, keys, values=None) -> None:
        """Add samples with flat integer `keys`; `values` None counts only (a histogram).

        Keys outside [0, n_bins) (e.g. -1 for "no bin") are ignored.
        """
        keys = np.asarray(keys, dtype=np.int64).ravel()
        inside = (keys >= 0) & (keys < self.n_bins)
        keys = keys[inside]
        self.count += np.bincount(keys, minlength=self.n_bins)
        if values is not None:
            values = np.asarray(values, dtype=np.float64).ravel()[inside]
            self.sum += np.bincount(keys, weights=values, minlength=self.n_bins)
            self.sum_sq += np.bincount(keys, weights=values * values, minlength=self.n_bins)

    def add_sums(self, count, total, total_sq=None) -> None:
        """Add already-summed per-key counts, sums (and sums of squares) of shape `shape`."""
        self.count += np.asarray(count, dtype=np.float64).ravel()
        self.sum += np.asarray(total, dtype=np.float64).ravel()
        if total_sq is not None:
            self.sum_sq += np.asarray(total_sq, dtype=np.float64).ravel()

    def reshaped(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(count, sum, sum_sq), each of shape `shape`."""
        return (self.count.reshape(self.shape), self.sum.reshape(self.shape),
                self.sum_sq.reshape(self.shape))


def reduce_moments(ctx, *accumulators: BinnedMoments) -> None:
    """Sum every accumulator over the ranks of ``ctx.comm`` in place (collective, ONE Allreduce).

    Every rank must pass accumulators of the same shapes in the same order.
    """
    if not accumulators:
        return
    flat = np.concatenate([np.concatenate([a.count, a.sum, a.sum_sq]) for a in accumulators])
    if ctx.size > 1:
        from mpi4py import MPI

        total = np.empty_like(flat)
        ctx.comm.Allreduce(flat, total, op=MPI.SUM)
    else:
        total = flat
    offset = 0
    for acc in accumulators:
        n = acc.n_bins
        acc.count = total[offset:offset + n].copy()
        acc.sum = total[offset + n:offset + 2 * n].copy()
        acc.sum_sq = total[offset + 2 * n:offset + 3 * n].copy()
        offset += 3 * n


def sum_over_ranks(comm, *arrays: np.ndarray) -> None:
    """Sum each array over the ranks of `comm` in place (collective; one ``Allreduce`` per
    array; every rank passes arrays of the same shapes in the same order). `comm` None or of
    one rank: nothing to do."""
    if comm is None or comm.Get_size() == 1:
        return
    from mpi4py import MPI

    for array in arrays:
        comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)


def gather_items(ctx, items: list) -> list:
    """Every rank's `items` (small Python objects), concatenated in rank order (collective)."""
    if ctx.size == 1:
        return list(items)
    return [item for rank_items in ctx.comm.allgather(list(items)) for item in rank_items]


def gather_rows(ctx, rows: np.ndarray) -> np.ndarray:
    """Every rank's `rows` concatenated along axis 0 in rank order (collective): with
    contiguous frame blocks per rank (``ctx.block``), a per-frame series in frame order."""
    if ctx.size == 1:
        return np.asarray(rows)
    return np.concatenate(ctx.comm.allgather(np.asarray(rows)))


def moments_mean_std(count, total, total_sq) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation per key; NaN where the count is zero."""
    count = np.asarray(count, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
        variance = np.where(count > 0, total_sq / np.where(count > 0, count, 1) - mean ** 2,
                            np.nan)
    return mean, np.sqrt(np.clip(variance, 0.0, None))


@dataclass(frozen=True)
class BlockAverage:
    """A mean with its block-averaging standard error."""

    mean: float
    """Mean over every sample (NaN without samples)."""
    stderr: float
    """Standard error of the mean: std of the block means (ddof=1) / sqrt(blocks); NaN with
    fewer than two non-empty blocks."""
    block_means: np.ndarray
    """Mean of each block (NaN for an empty block)."""
    n_blocks: int
    """Blocks with at least one sample."""
    n_samples: int
    """Samples in all blocks."""


def block_average(count, total) -> BlockAverage:
    """Mean and block standard error from per-block sample counts and sums.

    Parameters
    ----------
    count, total
        Reduced per-block sample counts and sums (blocks: contiguous runs of frames in time,
        per replica).
    """
    count = np.asarray(count, dtype=float)
    total = np.asarray(total, dtype=float)
    n = float(count.sum())
    mean = float(total.sum() / n) if n > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        block_means = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
    filled = block_means[count > 0]
    stderr = (float(np.std(filled, ddof=1) / np.sqrt(len(filled))) if len(filled) > 1
              else float("nan"))
    return BlockAverage(mean, stderr, block_means, int(len(filled)), int(n))


def running_average(count, total, axis: int = 0) -> np.ndarray:
    """Cumulative mean along `axis` (time bins): sum up to bin i / count up to bin i.

    NaN until the first sample.
    """
    cum_count = np.cumsum(np.asarray(count, dtype=float), axis=axis)
    cum_total = np.cumsum(np.asarray(total, dtype=float), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cum_count > 0, cum_total / np.where(cum_count > 0, cum_count, 1),
                        np.nan)


def bin_index(values, edges) -> np.ndarray:
    """Histogram bin of each value for fixed `edges` (n_bins + 1, increasing): 0..n_bins-1,
    -1 below the first edge, n_bins at or above the last edge (the last bin is half-open,
    as in numpy.histogram except that its right edge is excluded)."""
    edges = np.asarray(edges, dtype=float)
    index = np.searchsorted(edges, np.asarray(values, dtype=float), side="right") - 1
    index[np.asarray(values) >= edges[-1]] = len(edges) - 1
    return index


def grid_index(frac_a, frac_b, n_a: int, n_b: int) -> np.ndarray:
    """Flat cell index of fractional coordinates (wrapped into [0, 1)) on an n_a x n_b grid."""
    ia = np.floor(np.mod(frac_a, 1.0) * n_a).astype(np.int64) % n_a
    ib = np.floor(np.mod(frac_b, 1.0) * n_b).astype(np.int64) % n_b
    return ia * n_b + ib


@dataclass(frozen=True)
class DiffusionFit:
    """A tracer diffusion coefficient from a straight-line fit of the MSD."""

    d_cm2_s: float
    """D (cm^2/s): slope / (2 * dimensions)."""
    slope_a2_fs: float
    """Fitted MSD slope (A^2/fs)."""
    intercept_a2: float
    """Fitted MSD intercept (A^2)."""
    window_fs: tuple[float, float]
    """Lag-time window of the fit (fs)."""
    n_points: int
    """Lags inside the window."""


def fit_diffusion(lag_fs, msd_a2, window_fs: tuple[float, float],
                  dimensions: int = 2) -> DiffusionFit:
    """Tracer D from MSD(t) = 2 d D t + b fitted by least squares inside `window_fs`.

    Parameters
    ----------
    lag_fs, msd_a2
        Lag times (fs) and mean squared displacements (A^2).
    window_fs
        (start, end) of the fit in lag time (fs), inclusive.
    dimensions
        2 for the in-plane MSD of a layered material.

    Returns
    -------
    DiffusionFit
        NaN coefficients when fewer than two finite lags fall inside the window.
    """
    lag_fs = np.asarray(lag_fs, dtype=float)
    msd_a2 = np.asarray(msd_a2, dtype=float)
    inside = (lag_fs >= window_fs[0]) & (lag_fs <= window_fs[1]) & np.isfinite(msd_a2)
    if inside.sum() < 2:
        return DiffusionFit(float("nan"), float("nan"), float("nan"),
                            (float(window_fs[0]), float(window_fs[1])), int(inside.sum()))
    slope, intercept = np.polyfit(lag_fs[inside], msd_a2[inside], 1)
    d_a2_fs = slope / (2.0 * dimensions)
    return DiffusionFit(float(d_a2_fs * A2_PER_FS_IN_CM2_PER_S), float(slope), float(intercept),
                        (float(window_fs[0]), float(window_fs[1])), int(inside.sum()))


@dataclass(frozen=True)
class Blocking:
    """The standard error of a mean of a correlated time series by blocking, with the check
    that it reached its plateau (Flyvbjerg & Petersen 1989; block size chosen by the criterion
    of Lee, Kent, Rubenstein & Needs 2011, as pyblock does: the smallest B with
    B^3 > 2 N (sigma_B / sigma_1)^4)."""

    mean: float
    """Mean over every sample."""
    stderr: float
    """The largest standard error at block sizes up to the chosen one (never below what a
    smaller block size gave); when no block size meets the criterion, the largest estimate
    seen (a lower bound: see `plateau`)."""
    plateau: bool
    """True when a block size with at least `min_blocks` blocks meets the criterion."""
    block_frames: int
    """The chosen (or largest tried) block size in frames."""
    block_sizes: np.ndarray
    """Block sizes tried (frames: 1, 2, 4, ...)."""
    stderrs: np.ndarray
    """Standard error at each block size."""
    correlation_frames: float
    """Integrated autocorrelation time of the series in frames, 0.5 (sigma_B / sigma_1)^2 at
    the chosen size (a lower bound without a plateau)."""


def blocking(count, total, segment, min_blocks: int = 16) -> Blocking:
    """Blocking analysis of a ratio mean sum(total) / sum(count) over frames.

    Parameters
    ----------
    count, total
        (n_frames,) samples and their sum in each frame (e.g. nuclei of a class and the sum of
        their shifts); frames without samples are skipped inside their blocks.
    segment
        (n_frames,) independent segment (replica) of each frame; blocks never span two. The
        frames left over at a segment's end join its last block.
    min_blocks
        Fewest non-empty blocks a block size needs to be trusted.
    """
    count = np.asarray(count, dtype=float)
    total = np.asarray(total, dtype=float)
    segment = np.asarray(segment, dtype=np.int64)
    n_total = float(count.sum())
    mean = float(total.sum() / n_total) if n_total > 0 else float("nan")
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    lengths = np.diff(np.r_[starts, len(segment)])
    position = np.arange(len(segment)) - np.repeat(starts, lengths)
    seg_index = np.repeat(np.arange(len(starts)), lengths)
    n_frames = int(np.sum(count > 0))
    sizes, errors = [], []
    size = 1
    while True:
        per_segment = lengths // size
        if per_segment.sum() < min_blocks or not np.any(per_segment):
            break
        in_block = np.minimum(position // size, np.maximum(per_segment[seg_index] - 1, 0))
        offset = np.r_[0, np.cumsum(per_segment)[:-1]]
        key = np.where(per_segment[seg_index] > 0, offset[seg_index] + in_block, -1)
        keep = key >= 0
        n_keys = int(per_segment.sum())
        block_count = np.bincount(key[keep], weights=count[keep], minlength=n_keys)
        block_total = np.bincount(key[keep], weights=total[keep], minlength=n_keys)
        filled = block_count > 0
        if filled.sum() < min_blocks:
            break
        means = block_total[filled] / block_count[filled]
        sizes.append(size)
        errors.append(float(np.std(means, ddof=1) / np.sqrt(filled.sum())))
        size *= 2
    sizes_a, errors_a = np.array(sizes, dtype=int), np.array(errors)
    if not len(sizes_a):
        return Blocking(mean, float("nan"), False, 0, sizes_a, errors_a, float("nan"))
    sigma_1 = errors_a[0]
    if sigma_1 == 0:
        return Blocking(mean, 0.0, True, 1, sizes_a, errors_a, 0.5)
    ratio = errors_a / sigma_1
    meets = sizes_a.astype(float) ** 3 > 2.0 * n_frames * ratio ** 4
    if np.any(meets):
        k = int(np.argmax(meets))  # never below a smaller block size's estimate
        best = float(np.max(errors_a[:k + 1]))
        return Blocking(mean, best, True, int(sizes_a[k]), sizes_a, errors_a,
                        float(0.5 * (best / sigma_1) ** 2))
    k = int(np.argmax(errors_a))
    return Blocking(mean, float(errors_a[k]), False, int(sizes_a[-1]), sizes_a, errors_a,
                    float(0.5 * ratio[k] ** 2))


@dataclass(frozen=True)
class CorrelationTime:
    """An integrated autocorrelation time with Sokal's automatic window."""

    tau_fs: float
    """Integral of the normalised autocorrelation from 0 to the window (fs); without a window,
    the integral up to the longest lag (a lower bound)."""
    determined: bool
    """True when a window W <= the longest lag satisfies W >= c tau(W)."""
    window_fs: float
    """The window (fs), or the longest lag."""


def integrated_correlation_time(lag_fs, rho, c: float = 5.0) -> CorrelationTime:
    """tau(W) = integral_0^W rho(t) dt (trapezoid, rho(0) = 1) at the smallest lag W with
    W >= c tau(W) (Sokal 1997); lags need not be evenly spaced."""
    lag = np.r_[0.0, np.asarray(lag_fs, dtype=float)]
    values = np.r_[1.0, np.asarray(rho, dtype=float)]
    finite = np.isfinite(values)
    lag, values = lag[finite], values[finite]
    if len(lag) < 2:
        return CorrelationTime(float("nan"), False, float("nan"))
    tau = np.r_[0.0, np.cumsum(0.5 * (values[1:] + values[:-1]) * np.diff(lag))]
    ok = lag[1:] >= c * tau[1:]
    if np.any(ok):
        k = int(np.argmax(ok)) + 1
        return CorrelationTime(float(max(tau[k], 0.0)), True, float(lag[k]))
    return CorrelationTime(float(tau[-1]), False, float(lag[-1]))


def loglog_slope(lag_fs, msd_a2, window_fs: tuple[float, float]) -> float:
    """Slope of log MSD vs log lag inside `window_fs` (1 in the diffusive regime, 0 on a
    plateau); NaN with fewer than two positive finite points."""
    lag = np.asarray(lag_fs, dtype=float)
    msd = np.asarray(msd_a2, dtype=float)
    inside = (lag >= window_fs[0]) & (lag <= window_fs[1]) & np.isfinite(msd) & (msd > 0) & (
        lag > 0)
    if inside.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(lag[inside]), np.log(msd[inside]), 1)[0])


BOLTZMANN_EV_K = 8.617333262e-5
"""Boltzmann's constant (eV/K)."""


@dataclass(frozen=True)
class ArrheniusFit:
    """k(T) = prefactor * exp(-activation_ev / (k_B T)), fitted to ln k over 1/T.

    Errors are the fit's standard errors; with given point errors they are scaled up by
    sqrt(reduced chi^2) when the points scatter more than their errors say (never down); with
    none, from the residuals. With two temperatures and no point errors there is none (NaN).
    """

    activation_ev: float
    activation_err_ev: float
    ln_prefactor: float
    ln_prefactor_err: float
    covariance: tuple[tuple[float, float], tuple[float, float]]
    """Covariance of (ln prefactor, activation_ev)."""
    n_points: int
    chi2_reduced: float
    """Reduced chi^2 of the weighted fit (NaN without point errors or degrees of freedom)."""
    temperatures_k: tuple[float, ...]

    def at(self, temperature_k: float) -> tuple[float, float]:
        """(k, its standard error) at `temperature_k` from the fit, with the parameters'
        covariance (an extrapolation outside the fitted temperatures: say so where used)."""
        x = -1.0 / (BOLTZMANN_EV_K * temperature_k)
        ln_k = self.ln_prefactor + self.activation_ev * x
        cov = np.asarray(self.covariance)
        var = cov[0, 0] + 2 * x * cov[0, 1] + x * x * cov[1, 1]
        value = float(np.exp(ln_k))
        return value, value * float(np.sqrt(var)) if np.isfinite(var) else float("nan")


def arrhenius_fit(temperature_k, values, errors=None) -> ArrheniusFit:
    """Fit ln k = ln A - E_a / (k_B T) to positive `values` at `temperature_k` (>= 2 points;
    `errors`: standard errors of the values, weights 1 / (err / k)^2)."""
    t = np.asarray(temperature_k, dtype=float)
    k = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(k) & (k > 0) & (t > 0)
    if errors is not None:
        e = np.asarray(errors, dtype=float)
        keep &= np.isfinite(e) & (e > 0)
    t, k = t[keep], k[keep]
    if len(t) < 2 or len(np.unique(t)) < 2:
        raise ValueError(f"an Arrhenius fit needs positive values at two or more temperatures "
                         f"(got {len(t)} usable of {len(keep)})")
    x = -1.0 / (BOLTZMANN_EV_K * t)
    design = np.column_stack([np.ones_like(x), x])
    y = np.log(k)
    dof = len(t) - 2
    if errors is not None:
        sigma = e[keep] / k
        w = 1.0 / sigma ** 2
        normal = design.T @ (design * w[:, None])
        cov = np.linalg.inv(normal)
        params = cov @ (design.T @ (w * y))
        chi2 = float(np.sum(w * (y - design @ params) ** 2) / dof) if dof > 0 else float("nan")
        if np.isfinite(chi2) and chi2 > 1.0:
            cov = cov * chi2
    else:
        params, *_ = np.linalg.lstsq(design, y, rcond=None)
        chi2 = float("nan")
        if dof > 0:
            s2 = float(np.sum((y - design @ params) ** 2) / dof)
            cov = s2 * np.linalg.inv(design.T @ design)
        else:
            cov = np.full((2, 2), np.nan)
    return ArrheniusFit(float(params[1]), float(np.sqrt(cov[1, 1])), float(params[0]),
                        float(np.sqrt(cov[0, 0])),
                        ((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]),
                                                                float(cov[1, 1]))),
                        len(t), chi2, tuple(float(v) for v in t))
