"""A measured 1D NMR spectrum, and its fit as a mixture of predicted line shapes.

Reading
-------
:func:`read_spectrum` reads Bruker processed data (TopSpin ``<expno>/pdata/<procno>``, via
nmrglue; the MAS rate ``MASR`` from the experiment's ``acqus`` when present) or a two-column
text file (ppm, intensity). A file that is empty, has non-finite values, an axis that is not
ppm-like (Hz, seconds, point indices) or a spectrum that is mostly negative (unphased or
inverted) raises :class:`SpectrumFileError` (an :class:`engine.failure.InputError`: exit 2)
naming the file.

Bruker ppm axis: TopSpin draws point i of ``1r`` at ``OFFSET - i * SW_p / SF / SI`` (procs:
``OFFSET`` the ppm of the first point, ``SW_p`` the width in Hz, ``SF`` the reference
frequency in MHz, ``SI`` the size). nmrglue's ``guess_udic`` (and the ``unit_conversion``
made from it) uses ``OFFSET`` only when there is no ``acqus``; with one, it centres the
window on the transmitter ``(SFO1 - SF)``, which is wrong whenever the processed window is not
centred on it (a strip, STSR/STSI), so the axis here is always built from procs.

The mixture model (:func:`fit_spectrum`)
----------------------------------------
In the window ``window_ppm`` the measured intensity y(x) is

    y(x) = sum_s [A_s m_s(x - t_s) + sum_k B_sk (m_s(x - t_s - k r) + m_s(x - t_s + k r))]
           + b(x) + e(x),
    m_s  = V_{gamma_s, eta_s} * p_s,     t_s = o + delta_s,

* ``p_s``: system s's predicted line (unit area, the tails beyond its axis extrapolated as
  1/x^2; already exchange-broadened, several peaks in slow exchange), kept as it is and
  moved rigidly by ``t_s``;
* ``o``: the common offset, measured = predicted + o (the DFT functional's systematic error).
  Prior N(``offset_prior_ppm``) = N(-160, 55^2) ppm by default (the paper's SCAN shifts are
  ~90-230 ppm above experiment), truncated to ``offset_range_ppm`` (and, numerically, to
  6 sd);
* ``delta_s``: system s's own deviation beyond the offset, prior N(0, sigma_s^2), sigma_s
  the prediction's ``sigma_ppm`` (default ``position_sd_ppm`` = 40 ppm; a prediction that is
  not converged gets ``unconverged_position_sd_ppm`` = 150 ppm), truncated at 5 sd. The
  offset is integrated out analytically: t ~ N(mu_o 1, sigma_o^2 1 1^T + diag(sigma_s^2))
  times the probability that o | t lies inside its range (its posterior is drawn from
  o | t afterwards);
* ``V``: the extra broadening convolved onto the predicted line, unit area, FWHM ``gamma_s``
  (prior ~ 1 / (gamma_s + 10 ppm) on [0, ``max_extra_fwhm_ppm``]: log-uniform above ~10
  ppm; a uniform prior would favour a broad, baseline-like line wherever the data cannot
  tell) and mixing ``eta_s`` (uniform on [0, 1]) per system: ``line_shape`` "pseudo-voigt"
  (eta L + (1 - eta) G of one FWHM), "lorentzian" (eta = 1) or "gaussian" (eta = 0). It is
  applied in Fourier space, so the predicted exchange broadening stays; the shape is free
  per system, so that overlapping lines are not told apart by shape details the prediction
  cannot promise;
* ``A_s >= 0``: areas; the fractions are A_s / sum A (of the centreband areas, i.e. of
  the 23Na nuclei when the phases' sideband manifolds are alike); independent half-normal
  priors of scale 10 x the measured area (flat on the relevant range: a uniform prior on
  the fractions);
* ``B_sk >= 0``: when the MAS rate r (ppm: rate / Larmor frequency) is known, the first
  ``sideband_orders`` pairs of spinning sidebands of every line, free amplitudes: their
  tails leak into any window;
* ``b``: a polynomial baseline of order ``baseline_order`` (Legendre on the window), broad
  normal priors (sd 10 x the largest intensity);
* ``e``: noise, Gaussian with sigma estimated from the data: the best fit's residual rms
  where the lines are (so a misfit of their shapes counts as noise, not diluted by the
  baseline around them), the likelihood tempered by n_eff / n, n / n_eff the integrated
  autocorrelation time of those residuals (emcee's estimator): apodized noise and smooth
  misfit make neighbouring points share information, so the error bars are not
  overconfident.

The areas, sideband amplitudes and baseline enter linearly: they are integrated out exactly
(a Gaussian integral, times the normal approximation of the probability that the areas and
amplitudes are >= 0) and drawn again afterwards from their Gaussian conditional (truncated),
so the sampler only explores theta = (t_s, gamma_s, eta_s): 3 S dimensions. The lines are
moved and broadened on one periodic grid (FFT, 8 points per FWHM of the narrowest predicted
peak) and read at the measured points by cubic interpolation.

Posterior: starting points come from a grid over the positions (S <= 2: every pair; more
systems: coordinate sweeps) at four trial widths, the data treated as no better than SNR 50
so that the ranking follows basins, plus one start per (measured peak, system) with that
system alone on the peak; each is refined by L-BFGS-B. Distinct optima (by fractions and
the positions of the systems present) within 25 log units of Laplace evidence of the best
get their own emcee ensemble (seeded, extended while shorter than 10 autocorrelation
times). The regions are weighted by importance sampling from a mixture of kernel density
estimates of the runs' samples (a region two runs share is split, not counted twice), so a
single measured peak that either phase could explain gets the posterior probability of each
assignment. Reported per fraction: posterior mean, sd and the 95 % interval (equal-tailed,
one-sided where the posterior piles up against 0 or 1); the offset, positions, deviations,
widths and mixings likewise. A fraction whose interval is wider than 0.5 makes the fit "not
separable", and the result says in words why (overlapping lines, or a peak either phase
could explain).

The paper's route (:func:`deconvolve`): a free fit of N pseudo-Voigt peaks (positions,
widths, areas and mixings free) and a baseline; each fitted peak is assigned to a system's
predicted peak by order and spacing, with the posterior probability of every assignment
under the same priors (a closed-form Gaussian integral over the offset and deviations) and
the prior probability (Monte Carlo over the deviations) that the predicted order holds.

Spinning sidebands: when the MAS rate (acqus MASR, or given) and the Larmor frequency are
known, a fitted line whose first sidebands (+- rate / Larmor ppm) fall inside the window
gives a warning (they are fitted as nuisance, with free amplitudes, and not counted in the
fractions).
"""
from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, optimize, signal, special

from engine.failure import InputError

OFFSET_PRIOR_PPM = (-160.0, 55.0)
"""Default prior (mean, sd) of the common offset, measured = predicted + offset (ppm)."""
POSITION_SD_PPM = 40.0
"""Default prior sd (ppm) of a converged system's own deviation beyond the offset."""
UNCONVERGED_POSITION_SD_PPM = 150.0
"""Default prior sd (ppm) of the deviation of a system whose prediction is not converged."""
MAX_EXTRA_FWHM_PPM = 400.0
"""Default upper bound of the extra broadening's FWHM (ppm)."""
EXTRA_FWHM_SCALE_PPM = 10.0
"""The prior of each extra FWHM gamma is p(gamma) ~ 1 / (gamma + this) on [0, max]: each
factor of the width equally likely above ~10 ppm (a uniform prior would favour a broad,
baseline-like line wherever the data cannot tell)."""
LINE_SHAPES = ("pseudo-voigt", "lorentzian", "gaussian")
"""Shapes of the extra broadening."""
SHAPE_MODELS = ("convolved", "peaks")
"""How a predicted line becomes a measured one. ``convolved``: the predicted line (its
exchange shape and tails) convolved with the broadening kernel; ``peaks``: each peak of the
predicted line (position, FWHM, area share) drawn as one line of the broadening's shape with
FWHM predicted + extra (the phenomenological lines of dmfit and the paper's deconvolution).
The two differ in the tails and the peak shape; which one the data favour is weighed by
their evidence, and the fractions are averaged over both (docs/spectrum.md)."""
OFFSET_TRUNCATION_SD = 6.0
"""The offset prior is cut at this many sd (numerically; mass outside ~2e-9)."""
DEVIATION_TRUNCATION_SD = 5.0
"""Each deviation delta_s is cut at this many sd (a hard bound of the sampler)."""
GRID_PER_FWHM = 8
"""Model grid points per FWHM of the narrowest predicted peak (cubic interpolation to x)."""
MAX_MODEL_POINTS = 1 << 15
"""Most points of the periodic grid the lines are moved and broadened on (FFT)."""
AREA_PRIOR_SCALE = 10.0
"""Half-normal prior scale of each area, in units of the measured absolute area."""
BASELINE_PRIOR_SD = 10.0
"""Prior sd of each baseline coefficient, in units of the largest measured intensity."""
MODE_LOGP_GAP = 25.0
"""Optima whose Laplace evidence is this far (log) below the best one's are not sampled."""
MAX_MODES = 6
"""Most local maxima taken from one grid."""
GRID_STEPS_PER_FWHM = 6
"""Steps of the position grid per FWHM of the narrowest predicted peak."""
MAX_GRID = 300
"""Most grid positions per system."""
STARTS_PER_WIDTH = 5
"""Local maxima taken from the grid of each trial width."""
MAX_STARTS = 8
"""Most local optimisations started from the grids."""
MAX_ASSIGNMENT_PEAKS = 3
"""Measured peaks (the tallest) on which each system's line is also started alone."""
SEARCH_SNR = 50.0
"""The grid search treats the data as if no better than this signal-to-noise ratio, so that
its ranking follows the basins, not the grid's misalignment at high SNR."""
MAX_RUNS = 4
"""Most optima sampled by their own emcee ensemble."""
MAX_EXTENSIONS = 2
"""A chain shorter than 10 autocorrelation times is extended (by mcmc_steps) this often."""
N_DRAWS = 1500
"""Posterior draws behind the summaries."""
LINE_REGION = 0.05
"""The noise and the residual autocorrelation are measured where the fitted lines exceed
this fraction of their maximum (where a misfit of their shapes shows)."""
WIDE_INTERVAL = 0.5
"""A fraction whose 95 % interval is wider than this is called not separable."""
MERGED_SEPARATION = 0.6
"""Two lines closer than this many FWHM show as one peak (the Sparrow limit: ~0.58 for
Lorentzians, ~0.85 for Gaussians): the free deconvolution cannot split them."""
PEAK_SMOOTHING = 0.1
"""Measured peaks are found after a Gaussian smoothing of sigma this fraction of the tallest
peak's FWHM, so that noise spikes are not taken for peaks."""


class SpectrumFileError(InputError, ValueError):
    """A measured spectrum that cannot be used; the message names the file.

    An :class:`engine.failure.InputError` (the run exits with status 2) and a ValueError
    (for callers that validate manifests by catching ValueError).
    """


# ---------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class MeasuredSpectrum:
    """A measured 1D spectrum.

    The points keep the order of the source: Bruker data run from high to low ppm (point 0 at
    ``OFFSET``, as stored in ``1r``), a text file's in its rows' order (strictly monotonic).
    """

    ppm: np.ndarray
    """(n,) shift axis (ppm), strictly monotonic, ascending or descending."""
    intensity: np.ndarray
    """(n,) intensity (Bruker: scaled by 2**NC_proc as TopSpin shows it)."""
    source: str
    """Where it came from (path and format)."""
    larmor_mhz: float | None = None
    """Reference frequency SF (MHz) when the source gives it (Bruker), else None."""
    mas_rate_hz: float | None = None
    """Magic-angle spinning rate (Hz): acqus ``MASR`` when present and > 0, else None."""


def _bruker_dir(path: str) -> str | None:
    """The pdata directory ``path`` names (itself, or ``path/pdata/1``), None if neither."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("procs", "1r")):
        return path
    if os.path.isdir(os.path.join(path, "pdata", "1")):
        return os.path.join(path, "pdata", "1")
    return None


def _read_bruker(path: str, pdata: str) -> MeasuredSpectrum:
    import nmrglue

    pdata = os.path.normpath(pdata)  # nmrglue finds acqus two levels up: no trailing slash
    for name in ("procs", "1r"):
        if not os.path.isfile(os.path.join(pdata, name)):
            raise SpectrumFileError(f"{path}: Bruker processed data in {pdata} has no '{name}' "
                                    "file")
    if os.path.getsize(os.path.join(pdata, "1r")) == 0:
        raise SpectrumFileError(f"{path}: {pdata}/1r is empty")
    try:
        dic, data = nmrglue.bruker.read_pdata(pdata, scale_data=True)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise SpectrumFileError(f"{path}: cannot read Bruker processed data in {pdata}: "
                                f"{exc}") from exc
    procs = dic.get("procs", {})
    missing = [k for k in ("OFFSET", "SW_p", "SF", "SI") if k not in procs]
    if missing:
        raise SpectrumFileError(f"{path}: {pdata}/procs lacks {', '.join(missing)} (needed "
                                "for ppm)")
    data = np.asarray(data)
    if data.ndim != 1:
        raise SpectrumFileError(f"{path}: Bruker data in {pdata} is {data.ndim}D; only 1D is "
                                "read")
    n_points = int(procs["SI"])
    if data.size != n_points:
        raise SpectrumFileError(f"{path}: {pdata}/1r has {data.size} points, procs SI = "
                                f"{n_points}")
    sf_mhz = float(procs["SF"])
    if not sf_mhz > 0:
        raise SpectrumFileError(f"{path}: {pdata}/procs SF = {sf_mhz} MHz must be > 0")
    step_ppm = float(procs["SW_p"]) / sf_mhz / n_points
    ppm = float(procs["OFFSET"]) - np.arange(n_points) * step_ppm
    mas = None
    try:
        masr = float(dic.get("acqus", {}).get("MASR", 0.0))
        mas = masr if np.isfinite(masr) and masr > 0 else None
    except (TypeError, ValueError):
        mas = None
    return MeasuredSpectrum(ppm, np.asarray(data.real, dtype=float),
                            f"Bruker pdata {pdata}", sf_mhz, mas)


def _read_text(path: str) -> MeasuredSpectrum:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise SpectrumFileError(f"{path}: not a text file of two numeric columns (ppm, "
                                f"intensity): {exc}") from exc
    body = [line for line in text.splitlines() if line.split("#")[0].strip()]
    if not body:
        raise SpectrumFileError(f"{path}: the file is empty (no data rows; needs two numeric "
                                "columns: ppm, intensity)")
    try:
        table = np.loadtxt(io.StringIO(text.replace(",", " ")), comments="#", ndmin=2)
    except ValueError as exc:
        raise SpectrumFileError(f"{path}: not a text file of two numeric columns (ppm, "
                                f"intensity): {exc}") from exc
    if table.shape[1] != 2 or table.shape[0] == 0:
        raise SpectrumFileError(f"{path}: needs two numeric columns (ppm, intensity), found "
                                f"{table.shape[1] if table.size else 0} column(s) in "
                                f"{table.shape[0]} row(s)")
    return MeasuredSpectrum(table[:, 0].copy(), table[:, 1].copy(), f"text {path}", None)


def _check_axis(path: str, ppm: np.ndarray) -> None:
    """Refuse axes that are not ppm: Hz, seconds, point indices."""
    span = float(abs(ppm[-1] - ppm[0]))
    top = float(np.max(np.abs(ppm)))
    steps = np.diff(ppm)
    if np.allclose(steps, steps[0], rtol=0, atol=1e-9) and abs(abs(steps[0]) - 1.0) < 1e-9 \
            and min(abs(ppm[0]), abs(ppm[-1])) in (0.0, 1.0):
        raise SpectrumFileError(f"{path}: the first column runs {ppm[0]:g} .. {ppm[-1]:g} in "
                                "steps of 1: point indices, not a ppm axis")
    if top > 2e4:
        raise SpectrumFileError(f"{path}: the axis reaches {top:.4g}, beyond +-20000 ppm: not "
                                "a ppm axis (Hz?); convert to ppm (Hz / spectrometer MHz)")
    if span < 1.0:
        raise SpectrumFileError(f"{path}: the axis spans {span:.3g} (< 1 ppm): not a ppm axis "
                                "(seconds? an FID?)")


def _check_phase(path: str, intensity: np.ndarray) -> None:
    """Refuse spectra that are mostly negative (unphased, dispersive or inverted).

    A smooth baseline is taken out first (a running median over a fifth of the axis, on
    block means), so that a rolling baseline is not taken for a phase error."""
    n_blocks = min(intensity.size, 1000)
    edges = np.linspace(0, intensity.size, n_blocks + 1).astype(int)
    blocks = np.add.reduceat(intensity, edges[:-1]) / np.diff(edges)
    trend = ndimage.median_filter(blocks, size=max(3, n_blocks // 5), mode="nearest")
    centres = (edges[:-1] + edges[1:] - 1) / 2
    detrended = intensity - np.interp(np.arange(intensity.size), centres, trend)
    smooth = ndimage.gaussian_filter1d(detrended, max(1.0, intensity.size / 1000),
                                       mode="nearest")
    top, bottom = float(smooth.max()), float(-smooth.min())
    if not top > 0 and not bottom > 0:
        raise SpectrumFileError(f"{path}: the intensity is constant (no signal)")
    if bottom > 0.5 * top or float(np.sum(detrended)) < 0:
        raise SpectrumFileError(
            f"{path}: the spectrum is mostly negative (deepest {bottom:.3g} vs highest "
            f"{top:.3g} about the baseline): not phased, dispersive or inverted; phase it "
            "(absorption mode, positive peaks) before fitting")


def read_spectrum(path: str | os.PathLike) -> MeasuredSpectrum:
    """Read a measured 1D spectrum and check that it can be fitted.

    Parameters
    ----------
    path : str or path-like
        A Bruker processed-data directory (``<expno>/pdata/<procno>``, with ``procs`` and
        ``1r``; ``MASR`` is read from ``<expno>/acqus`` when present), an experiment directory
        (``<expno>``: its ``pdata/1`` is read), or a text file of two columns (ppm,
        intensity), whitespace or comma separated, ``#`` comments.

    Returns
    -------
    MeasuredSpectrum
        In the source's point order (Bruker: descending ppm, point 0 at procs ``OFFSET``).

    Raises
    ------
    SpectrumFileError
        (an InputError and a ValueError) naming the path: missing, a directory without
        procs/1r, empty, not two numeric columns, fewer than 3 points, non-finite values, a
        ppm axis that is not strictly monotonic or not ppm-like (Hz, seconds, indices), or a
        spectrum that is mostly negative (unphased).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpectrumFileError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        pdata = _bruker_dir(path)
        if pdata is None:
            raise SpectrumFileError(f"{path}: a directory without Bruker processed data (procs "
                                    "and 1r, here or in pdata/1)")
        spectrum = _read_bruker(path, pdata)
    else:
        if os.path.getsize(path) == 0:
            raise SpectrumFileError(f"{path}: the file is empty")
        spectrum = _read_text(path)
    if spectrum.ppm.size < 3:
        raise SpectrumFileError(f"{path}: {spectrum.ppm.size} point(s); a spectrum needs >= 3")
    if not (np.all(np.isfinite(spectrum.ppm)) and np.all(np.isfinite(spectrum.intensity))):
        raise SpectrumFileError(f"{path}: has non-finite (NaN or inf) ppm or intensity values")
    steps = np.diff(spectrum.ppm)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise SpectrumFileError(f"{path}: the ppm axis is not strictly monotonic")
    _check_axis(path, spectrum.ppm)
    _check_phase(path, spectrum.intensity)
    return spectrum


# ---------------------------------------------------------------------------------------
# inputs and results


@dataclass(frozen=True)
class PredictedLine:
    """One system's predicted line and how far its position can be trusted."""

    ppm: np.ndarray
    """(m,) axis of the prediction (ppm, either order)."""
    intensity: np.ndarray
    """(m,) the line (any scale: normalised to unit area here; zero outside the axis)."""
    sigma_ppm: float | None = None
    """Prior sd (ppm) of this system's own position deviation beyond the common offset;
    None: ``position_sd_ppm`` when converged, ``unconverged_position_sd_ppm`` when not."""
    converged: bool = True
    """Whether the prediction (its dynamic average) is converged."""
    verdict: str = ""
    """The convergence verdict in words (carried into the result)."""


@dataclass(frozen=True)
class PeakAssignment:
    """A measured peak and the posterior probability that each system dominates there."""

    ppm: float
    """Peak position (ppm, a measured point)."""
    intensity: float
    """Measured intensity at the peak."""
    system: str
    """The most probable dominant system at the peak."""
    fraction: float
    """That system's posterior-mean share of the model (less the baseline) at the peak."""
    probabilities: dict[str, float] = field(default_factory=dict)
    """Posterior probability of each system being the largest component at the peak."""


@dataclass(frozen=True)
class Mode:
    """One mode of the posterior (an assignment of lines to the measured peaks)."""

    weight: float
    """Posterior probability of this mode (its evidence over the sum)."""
    positions_ppm: dict[str, float]
    """Each system's fitted main-line position in this mode (posterior mean)."""
    fractions: dict[str, float]
    """Each system's fraction in this mode (posterior mean)."""


@dataclass(frozen=True)
class DeconvolutionPeak:
    """One freely fitted pseudo-Voigt peak."""

    ppm: float
    ppm_error: float
    fwhm_ppm: float
    fwhm_error_ppm: float
    area: float
    """Area (measured intensity x ppm)."""
    area_error: float
    mixing: float
    """Pseudo-Voigt mixing (1 Lorentzian, 0 Gaussian)."""


@dataclass(frozen=True)
class Deconvolution:
    """The paper's route: N free peaks, assigned to the systems by predicted order and
    spacing."""

    peaks: tuple[DeconvolutionPeak, ...]
    """Fitted peaks, ascending ppm."""
    residual_rms_rel: float
    """RMS of the residual over the largest measured intensity."""
    assignment: tuple[str, ...]
    """System of each peak (ascending ppm) in the most probable assignment."""
    assignment_probability: float
    """Posterior probability of that assignment given the fitted positions and the priors."""
    order_assignment: tuple[str, ...]
    """System of each peak when peaks are matched to predicted peaks in order."""
    order_probability: float
    """Posterior probability that the order assignment is right."""
    order_probability_prior: float
    """Prior probability (Monte Carlo over the deviations) that the measured order of the
    predicted peaks is the predicted order."""
    fractions: dict[str, float]
    """Fractions averaged over the assignments with their probabilities."""
    fraction_errors: dict[str, float]
    """Their sd (fit errors and assignment uncertainty)."""
    success: bool
    message: str
    merged: tuple[str, ...] = ()
    """Pairs of predicted peaks of different systems closer than MERGED_SEPARATION x the
    measured lines' width (the fitted peaks' median FWHM), in words: one free peak holds
    both, so the route can neither order nor split them and its fractions and probabilities
    do not hold there."""


@dataclass(frozen=True)
class ShapeModelResult:
    """One shape model's share of the posterior (:data:`SHAPE_MODELS`)."""

    weight: float
    """Posterior probability of the model (its evidence over the sum; 1 when alone)."""
    log_evidence: float
    """Its log evidence (importance sampling; 0 when it was the only model with one run)."""
    fractions: dict[str, float]
    """Posterior mean of each fraction under this model alone (NaN: no draws)."""
    fraction_errors: dict[str, float]


@dataclass(frozen=True)
class SpectrumFit:
    """A measured spectrum fitted as a mixture of predicted lines, with posterior errors."""

    systems: tuple[str, ...]
    fractions: dict[str, float]
    """Posterior mean of each area fraction A_s / sum A."""
    fraction_errors: dict[str, float]
    """Posterior sd of each fraction."""
    fraction_intervals: dict[str, tuple[float, float]]
    """95 % posterior interval of each fraction: equal-tailed, or one-sided ([0, q95],
    [q5, 1]) when the posterior piles up against 0 or 1."""
    positions_ppm: dict[str, float]
    """Posterior mean of each system's main-line position (predicted maximum + t_s)."""
    position_errors_ppm: dict[str, float]
    deviations_ppm: dict[str, float]
    """Posterior mean of each system's own deviation delta_s beyond the offset."""
    deviation_errors_ppm: dict[str, float]
    position_sd_ppm: dict[str, float]
    """The prior sd of each deviation that was used."""
    converged: dict[str, bool]
    """Whether each prediction was converged (as given)."""
    verdicts: dict[str, str]
    """Each prediction's convergence verdict (as given)."""
    widths_ppm: dict[str, float]
    """Posterior mean of each extra FWHM gamma_s (ppm)."""
    width_errors_ppm: dict[str, float]
    mixing: dict[str, float]
    """Posterior mean of each system's pseudo-Voigt mixing eta_s (1 Lorentzian, 0 Gaussian;
    fixed by ``line_shape`` "lorentzian" or "gaussian")."""
    mixing_errors: dict[str, float]
    line_shape: str
    offset_ppm: float
    """Posterior mean of the common offset (measured = predicted + offset)."""
    offset_error_ppm: float
    offset_interval_ppm: tuple[float, float]
    """95 % posterior interval of the offset."""
    baseline: float
    """Mean of the fitted baseline over the window (measured intensity units)."""
    baseline_order: int
    """Order of the polynomial baseline (-1: none)."""
    noise_rms: float
    """White-noise level estimated from the data (point-to-point differences, MAD)."""
    residual_rms_rel: float
    """RMS of the best-fit residual over the largest measured intensity."""
    n_points: int
    """Measured points fitted."""
    n_effective: float
    """Effective number of independent points (n / residual autocorrelation time)."""
    modes: tuple[Mode, ...]
    """Posterior modes, most probable first."""
    peaks: tuple[PeakAssignment, ...]
    """Measured peaks (scipy.signal.find_peaks on the smoothed spectrum), ascending ppm."""
    separable: bool
    """False when a fraction's 95 % interval is wider than :data:`WIDE_INTERVAL`."""
    statements: tuple[str, ...]
    """What the fit can and cannot tell, in words (separability, assignments, verdicts)."""
    warnings: tuple[str, ...]
    """Problems of the data or the fit (sidebands in the window, misfit, short chains)."""
    deconvolution: Deconvolution | None
    """The paper's route (free peaks, assigned by order and spacing), or None."""
    shape_models: dict[str, ShapeModelResult]
    """Each shape model's weight and fractions (the summaries above average over them)."""
    n_samples: int
    """Posterior draws behind the summaries."""
    seed: int
    elapsed_s: float
    success: bool
    message: str
    ppm: np.ndarray = field(repr=False)
    """(n,) measured points fitted (the measured order; inside ``window_ppm``)."""
    model: np.ndarray = field(repr=False)
    """(n,) best-fit model at ``ppm``, baseline included."""
    components: dict[str, np.ndarray] = field(repr=False)
    """(n,) each system's best-fit contribution at ``ppm`` (without baseline)."""
    baseline_curve: np.ndarray = field(repr=False)
    """(n,) best-fit baseline at ``ppm``."""
    samples: dict[str, np.ndarray] = field(repr=False)
    """Posterior draws: ``fraction:<system>``, ``position:<system>``, ``width:<system>``,
    ``mixing:<system>``, ``offset`` (equal weights)."""

    def summary(self) -> str:
        """One line per system, then the offset line, the peaks, notes and warnings."""
        rows = []
        for name in self.systems:
            low, high = self.fraction_intervals[name]
            tag = "" if self.converged[name] else " [not converged]"
            rows.append(
                f"{name}: {self.fractions[name]:.3f} +- {self.fraction_errors[name]:.3f} "
                f"(95% {low:.3f}-{high:.3f}); line at {self.positions_ppm[name]:.1f} +- "
                f"{self.position_errors_ppm[name]:.1f} ppm (own deviation "
                f"{self.deviations_ppm[name]:+.1f} +- {self.deviation_errors_ppm[name]:.1f}, "
                f"prior sd {self.position_sd_ppm[name]:.0f}); extra FWHM "
                f"{self.widths_ppm[name]:.1f} +- {self.width_errors_ppm[name]:.1f} ppm, mixing "
                f"{self.mixing[name]:.2f} +- {self.mixing_errors[name]:.2f}{tag}")
        if len(self.shape_models) > 1:
            rows.append("shape models: " + "; ".join(
                f"{f} p {r.weight:.2f} (" + ", ".join(f"{n} {v:.3f}" for n, v in
                                                     r.fractions.items()) + ")"
                for f, r in self.shape_models.items()))
        rows.append(
            f"offset {self.offset_ppm:.1f} +- {self.offset_error_ppm:.1f} ppm (95% "
            f"{self.offset_interval_ppm[0]:.1f} to {self.offset_interval_ppm[1]:.1f}); "
            f"{self.line_shape} broadening; residual "
            f"rms {self.residual_rms_rel:.3g} of the peak; n_eff {self.n_effective:.0f} of "
            f"{self.n_points} points; {len(self.modes)} mode(s)")
        for peak in self.peaks:
            probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
                peak.probabilities.items(), key=lambda kv: -kv[1]) if v >= 0.005)
            rows.append(f"peak {peak.ppm:.1f} ppm: {peak.system} (p {probs})")
        if self.deconvolution is not None:
            dec = self.deconvolution
            frac = ", ".join(f"{k} {v:.3f} +- {dec.fraction_errors[k]:.3f}"
                             for k, v in dec.fractions.items())
            rows.append(f"deconvolution: {len(dec.peaks)} peaks at "
                        f"{', '.join(f'{p.ppm:.1f}' for p in dec.peaks)} ppm assigned "
                        f"{'/'.join(dec.assignment)} (p {dec.assignment_probability:.2f}; "
                        f"order p {dec.order_probability:.2f}, prior "
                        f"{dec.order_probability_prior:.2f}); fractions {frac}"
                        + ("; NOT RESOLVED by free peaks: " + "; ".join(dec.merged)
                           if dec.merged else ""))
        rows += [f"note: {s}" for s in self.statements]
        rows += [f"warning: {w}" for w in self.warnings]
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# the model


def _line(name: str, line) -> tuple[np.ndarray, np.ndarray]:
    """A predicted line as ascending (ppm, intensity) with unit area.

    The area counts the tails beyond the axis, extrapolated as 1/x^2 from the end values
    (exchange lines are Lorentzian far from their centre): f(end) x |end - centre|."""
    try:
        ppm, intensity = (np.asarray(a, dtype=float) for a in line)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"predicted[{name!r}] must be a (ppm, intensity) pair") from exc
    if ppm.ndim != 1 or ppm.shape != intensity.shape or ppm.size < 2:
        raise ValueError(f"predicted[{name!r}]: ppm and intensity must be 1D of one length "
                         f">= 2, got {ppm.shape} and {intensity.shape}")
    if not (np.all(np.isfinite(ppm)) and np.all(np.isfinite(intensity))):
        raise ValueError(f"predicted[{name!r}] has non-finite values")
    order = np.argsort(ppm)
    ppm, intensity = ppm[order], intensity[order]
    if np.any(np.diff(ppm) <= 0):
        raise ValueError(f"predicted[{name!r}]: ppm values must be distinct")
    area = np.trapezoid(intensity, ppm)
    if not area > 0:
        raise ValueError(f"predicted[{name!r}] has area {area} <= 0")
    centre = float(np.trapezoid(intensity * ppm, ppm) / area)
    tails = max(intensity[0], 0.0) * max(centre - ppm[0], 0.0) \
        + max(intensity[-1], 0.0) * max(ppm[-1] - centre, 0.0)
    return ppm, intensity / (area + tails)


def _line_peaks(ppm: np.ndarray, intensity: np.ndarray, prominence: float = 0.05):
    """Peaks of a line: positions, FWHMs (ppm) and area shares (split at the troughs)."""
    idx, _ = signal.find_peaks(intensity, prominence=prominence * intensity.max())
    if idx.size == 0:
        idx = np.array([int(np.argmax(intensity))])
    step = np.diff(ppm)
    widths = signal.peak_widths(intensity, idx, rel_height=0.5)[0]
    fwhm = widths * np.interp(idx, np.arange(step.size), step)
    bounds = [0] + [int(a + np.argmin(intensity[a:b + 1])) for a, b in zip(idx[:-1], idx[1:])]
    bounds.append(ppm.size - 1)
    shares = np.array([np.trapezoid(intensity[a:b + 1], ppm[a:b + 1])
                       for a, b in zip(bounds[:-1], bounds[1:])])
    return ppm[idx], np.maximum(fwhm, step.min()), shares / shares.sum()


LORENTZIAN_TOLERANCE = 0.01
"""A predicted line is described by Lorentzians until the largest misfit is below this
fraction of its maximum (shoulders that are no local maximum get their own peak)."""
MAX_LORENTZIANS = 5
"""Most Lorentzians per predicted line."""


def _lorentzian_peaks(ppm: np.ndarray, intensity: np.ndarray):
    """A predicted line as a sum of Lorentzians (exchange lines are, in the fast and slow
    limits): positions, FWHMs (ppm) and area shares by least squares, started from
    :func:`_line_peaks` (whose trough-split widths are biased where peaks overlap); a peak
    is added at the largest misfit while it exceeds LORENTZIAN_TOLERANCE of the maximum
    (a shoulder). Falls back to :func:`_line_peaks` where the first fit fails."""
    first = _line_peaks(ppm, intensity)
    keep = intensity > 1e-3 * intensity.max()
    lo, hi = np.flatnonzero(keep)[[0, -1]]
    x, y = ppm[lo:hi + 1], intensity[lo:hi + 1]
    step = float(np.min(np.diff(ppm)))
    span = float(x[-1] - x[0])

    def curve(p, k):
        c, w, a = p[:k], p[k:2 * k], p[2 * k:]
        return np.sum(a[:, None] * pseudo_voigt(x[None], c[:, None], w[:, None], 1.0), axis=0)

    pos, fwhm, share = first
    best = None
    while True:
        k = len(pos)
        start = np.concatenate([pos, fwhm, share])
        lower = np.concatenate([np.full(k, x[0]), np.full(k, step), np.zeros(k)])
        upper = np.concatenate([np.full(k, x[-1]), np.full(k, span), np.full(k, 2.0)])
        try:
            sol = optimize.least_squares(lambda p: curve(p, k) - y,
                                         np.clip(start, lower, upper), bounds=(lower, upper),
                                         x_scale="jac", max_nfev=300 * k)
        except (ValueError, np.linalg.LinAlgError):
            break
        if not np.all(np.isfinite(sol.x)) or sol.x[2 * k:].sum() <= 0:
            break
        best = sol.x[:k], sol.x[k:2 * k], sol.x[2 * k:]
        resid = y - curve(sol.x, k)
        worst = int(np.argmax(np.abs(resid)))
        if np.abs(resid[worst]) < LORENTZIAN_TOLERANCE * y.max() or k >= MAX_LORENTZIANS:
            break
        pos = np.append(best[0], x[worst])
        fwhm = np.append(best[1], float(np.median(best[1])))
        share = np.append(best[2], max(resid[worst], 0.0) * np.pi * np.median(best[1]) / 2
                          + 1e-3)
    if best is None:
        return first
    c, w, a = best
    return c, w, a / a.sum()


def _legendre_basis(x: np.ndarray, order: int) -> np.ndarray:
    if order < 0:
        return np.zeros((0, x.size))
    u = 2 * (x - x[0]) / (x[-1] - x[0]) - 1
    return np.polynomial.legendre.legvander(u, order).T.copy()


def _cubic_taps(position: np.ndarray):
    """Keys cubic (a = -0.5) interpolation: integer taps (n, 4) and weights (n, 4)."""
    base = np.floor(position).astype(np.int64)
    f = position - base
    w = np.stack([((-0.5 * f + 1.0) * f - 0.5) * f,
                  (1.5 * f - 2.5) * f * f + 1.0,
                  ((-1.5 * f + 2.0) * f + 0.5) * f,
                  (0.5 * f - 0.5) * f * f], axis=-1)
    return base[:, None] + np.arange(-1, 3)[None, :], w


class _Model:
    """The collapsed posterior over theta = (t_1..t_S, gamma_1..gamma_S, [eta]).

    Linear parameters, system-major: per system its centreband area then one amplitude per
    modelled sideband order (the pair at +- k x MAS), all >= 0, then the baseline
    coefficients."""

    def __init__(self, x, y, lines, sigmas, offset_prior, offset_bounds, baseline_order,
                 line_shape, max_extra, noise_sd, sideband_ppm=None, sideband_orders=0,
                 shape_model="convolved"):
        from scipy import sparse

        if shape_model not in SHAPE_MODELS:
            raise ValueError(f"shape model must be one of {SHAPE_MODELS}, got {shape_model!r}")
        self.shape_model = shape_model
        self.x, self.y = x, y
        self.n = x.size
        self.n_sys = len(lines)
        self.line_shape = line_shape
        self.free_eta = line_shape == "pseudo-voigt"
        self.fixed_eta = {"lorentzian": 1.0, "gaussian": 0.0}.get(line_shape, 0.5)
        self.n_eta = self.n_sys if self.free_eta else 0
        self.dim = 2 * self.n_sys + self.n_eta
        self.sigmas = np.asarray(sigmas, dtype=float)
        self.mu_o, self.sd_o = offset_prior
        self.off_lo, self.off_hi = offset_bounds
        self.t_lo = self.off_lo - DEVIATION_TRUNCATION_SD * self.sigmas
        self.t_hi = self.off_hi + DEVIATION_TRUNCATION_SD * self.sigmas
        self.max_extra = max_extra
        self.lower = np.concatenate([self.t_lo, np.zeros(self.n_sys), np.zeros(self.n_eta)])
        self.upper = np.concatenate([self.t_hi, np.full(self.n_sys, max_extra),
                                     np.ones(self.n_eta)])
        # prior of t with the offset integrated out
        cov = self.sd_o ** 2 * np.ones((self.n_sys, self.n_sys)) + np.diag(self.sigmas ** 2)
        self.t_prec = np.linalg.inv(cov)
        self.s2_o = 1.0 / (1.0 / self.sd_o ** 2 + np.sum(1.0 / self.sigmas ** 2))
        # lines on one periodic grid
        peaks = [_line_peaks(p, i) for p, i in lines]
        self.main_ppm = np.array([p[0][np.argmax(p[2])] for p in peaks])
        self.line_peaks = peaks
        fwhm_min = min(float(f.min()) for _, f, _ in peaks)
        self.fwhm_min = fwhm_min
        orders = int(sideband_orders) if sideband_ppm else 0
        self.sideband_ppm = float(sideband_ppm) if orders else 0.0
        self.n_q = 1 + orders                                    # columns per system
        reach = orders * self.sideband_ppm
        self.pad = max(300.0, 1.5 * max_extra)
        width = x[-1] - x[0]
        span = width + float(np.max(self.t_hi - self.t_lo)) + 2 * (self.pad + reach)
        h = fwhm_min / GRID_PER_FWHM
        n_grid = sfft.next_fast_len(int(np.ceil(span / h)) + 8, real=True)
        n_grid = min(n_grid, MAX_MODEL_POINTS)
        h = span / (n_grid - 8)
        self.h, self.n_grid = h, n_grid
        self.v_lo = x[0] - reach - 2 * h                        # output grid origin
        self.kappa = sfft.rfftfreq(n_grid, d=h)
        spectra = []
        for s, (p, i) in enumerate(lines):
            u_lo = self.v_lo - self.t_hi[s] - self.pad
            grid = u_lo + h * np.arange(n_grid)
            g = np.interp(grid, p, i, left=0.0, right=0.0)
            spectra.append(sfft.rfft(g) * np.exp(2j * np.pi * self.kappa * (self.v_lo - u_lo)))
        self.spectra = np.array(spectra)                               # (S, nk)
        # the "peaks" model: unit deltas at the predicted peaks (same phase convention as
        # `spectra`: a unit-area line sampled at the grid's spacing h), their FWHM and share
        lorentzians = [_lorentzian_peaks(p, i) for p, i in lines] if \
            shape_model == "peaks" else peaks
        n_peaks = max(len(pos) for pos, _, _ in lorentzians)
        self.peak_ft = np.zeros((self.n_sys, n_peaks, self.kappa.size), dtype=complex)
        self.peak_fwhm = np.zeros((self.n_sys, n_peaks))
        for s, (pos, fwhm, shares) in enumerate(lorentzians):
            k = len(pos)
            self.peak_ft[s, :k] = (shares[:, None] / h) * np.exp(
                -2j * np.pi * self.kappa[None] * (pos[:, None] - self.v_lo))
            self.peak_fwhm[s, :k] = fwhm
        # interpolation from the output grid to x (and x -+ k MAS for the sidebands)
        taps, weights = [], []
        for k in range(self.n_q):
            sides = [0.0] if k == 0 else [-k * self.sideband_ppm, k * self.sideband_ppm]
            taps.append(np.concatenate([_cubic_taps((x + d - self.v_lo) / h)[0]
                                        for d in sides], axis=1))
            weights.append(np.concatenate([_cubic_taps((x + d - self.v_lo) / h)[1]
                                           for d in sides], axis=1))
        self.taps, self.tap_w = taps, weights                      # per order: (n, 4 or 8)
        self.interp_t = sparse.vstack([sparse.csr_matrix(
            (w.ravel(), (np.repeat(np.arange(x.size), w.shape[1]), (t % n_grid).ravel())),
            shape=(x.size, n_grid)) for t, w in zip(taps, weights)]).tocsr()
        self.basis = _legendre_basis(x, baseline_order)               # (K, n)
        self.n_base = self.basis.shape[0]
        self.gbb = self.basis @ self.basis.T
        self.by = self.basis @ y
        self.yy = float(y @ y)
        self.area_index = np.arange(self.n_sys) * self.n_q          # centreband areas
        self.positive = np.arange(self.n_sys * self.n_q)        # areas and sideband amplitudes
        step = np.abs(np.diff(x))
        area = float(np.sum(np.abs(y[1:] + y[:-1]) / 2 * step))
        self.prior_prec = np.concatenate(
            [np.full(self.n_sys * self.n_q, (AREA_PRIOR_SCALE * area) ** -2),
             np.full(self.n_base, BASELINE_PRIOR_SD ** -2)])
        self.set_noise(noise_sd)

    def set_noise(self, sigma_eff: float) -> None:
        self.sigma2 = float(sigma_eff) ** 2

    def kernel(self, gamma, eta):
        """FT of the unit-area pseudo-Voigt of FWHM gamma (..., S) and mixing eta (..., S)."""
        pk = np.pi * gamma[..., None] * self.kappa
        lor = np.exp(-pk)
        gau = np.exp(-pk * pk / (4 * np.log(2)))
        eta = np.asarray(eta)[..., None]
        return eta * lor + (1 - eta) * gau

    def line_ft(self, gamma, eta):
        """(..., S, nk) FT of every system's broadened unit-area line on the grid, for
        gamma and eta (..., S): the predicted line times the kernel ("convolved"), or the
        sum of its peaks, each a line of the kernel's shape with FWHM predicted + gamma
        ("peaks")."""
        if self.shape_model == "convolved":
            return self.spectra * self.kernel(gamma, eta)
        gamma, eta = np.asarray(gamma)[..., None], np.asarray(eta)[..., None]
        total = 0.0
        for p in range(self.peak_fwhm.shape[1]):                   # one peak at a time
            pk = np.pi * (self.peak_fwhm[:, p, None] + gamma) * self.kappa    # (..., S, nk)
            total = total + self.peak_ft[:, p] * (
                eta * np.exp(-pk) + (1 - eta) * np.exp(-pk * pk / (4 * np.log(2))))
        return total

    def unpack(self, theta):
        theta = np.atleast_2d(theta)
        t = theta[:, :self.n_sys]
        gamma = theta[:, self.n_sys:2 * self.n_sys]
        eta = theta[:, 2 * self.n_sys:] if self.free_eta else np.full(
            (theta.shape[0], self.n_sys), self.fixed_eta)
        return t, gamma, eta

    def columns(self, theta) -> np.ndarray:
        """(B, S, q, n): per system its unit-area line at x, then its sideband pairs."""
        t, gamma, eta = self.unpack(theta)
        angle = (-2 * np.pi * t[..., None]) * self.kappa
        ft = self.line_ft(gamma, eta)
        ft = ft * np.cos(angle) + 1j * (ft * np.sin(angle))
        grid = sfft.irfft(ft, n=self.n_grid, axis=-1)
        B, S = grid.shape[:2]
        out = (self.interp_t @ grid.reshape(B * S, -1).T).T          # (B S, q n)
        return out.reshape(B, S, self.n_q, self.n)

    def grid_columns(self, gamma, eta, shifts_steps: np.ndarray) -> np.ndarray:
        """(S, T, q, n): the columns at t = shifts x h, broadened by (gamma (S,), eta)."""
        grid = sfft.irfft(self.line_ft(np.asarray(gamma, dtype=float),
                                       np.full(self.n_sys, eta)),
                          n=self.n_grid, axis=-1)                         # (S, N)
        rolled = (np.arange(self.n_grid)[:, None] - shifts_steps[None, :]) % self.n_grid
        out = [self.interp_t @ grid[s][rolled] for s in range(self.n_sys)]   # (q n, T)
        return np.stack([o.reshape(self.n_q, self.n, -1).transpose(2, 0, 1) for o in out])

    def log_prior_t(self, t) -> np.ndarray:
        d = t - self.mu_o
        quad = np.einsum("bi,ij,bj->b", d, self.t_prec, d)
        m = self.s2_o * (self.mu_o / self.sd_o ** 2 + t @ (1.0 / self.sigmas ** 2))
        s = np.sqrt(self.s2_o)
        mass = special.ndtr((self.off_hi - m) / s) - special.ndtr((self.off_lo - m) / s)
        return -0.5 * quad + np.log(np.maximum(mass, 1e-300))

    def offset_given_t(self, t):
        """Mean and sd of the offset given positions t (before truncation)."""
        m = self.s2_o * (self.mu_o / self.sd_o ** 2 + t @ (1.0 / self.sigmas ** 2))
        return m, np.sqrt(self.s2_o)

    def linear(self, cols):
        """:meth:`linear_from_gram` for columns (B, S, q, n)."""
        B = cols.shape[0]
        flat = cols.reshape(B, -1, self.n)
        m, K = flat.shape[1], self.n_base
        gram = np.empty((B, m + K, m + K))
        gram[:, :m, :m] = flat @ np.transpose(flat, (0, 2, 1))
        rhs = np.empty((B, m + K))
        rhs[:, :m] = flat @ self.y
        if K:
            cb = flat @ self.basis.T
            gram[:, :m, m:] = cb
            gram[:, m:, :m] = np.transpose(cb, (0, 2, 1))
            gram[:, m:, m:] = self.gbb
            rhs[:, m:] = self.by
        return self.linear_from_gram(gram, rhs)

    def linear_from_gram(self, gram, rhs):
        """Log marginal likelihood (B,), conditional mean (B, p) and Cholesky factor of the
        conditional precision (B, p, p) of the linear parameters, from X^T X and X^T y."""
        prec = gram / self.sigma2 + np.diag(self.prior_prec)[None]
        chol = np.linalg.cholesky(prec)
        z = _solve_lower(chol, rhs / self.sigma2)
        mean = _solve_upper(chol, z)
        logdet = 2 * np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
        loglik = -0.5 * (self.yy / self.sigma2 - np.sum(z * z, axis=1)) - 0.5 * logdet
        # P(all areas and sideband amplitudes >= 0) under the conditional normal (product
        # of the marginals)
        inv_chol = np.linalg.inv(chol)                                   # L^-1
        cols = inv_chol[:, :, self.positive]
        var = np.einsum("bji,bji->bi", cols, cols)
        loglik = loglik + np.sum(special.log_ndtr(mean[:, self.positive] / np.sqrt(var)),
                                 axis=1)
        return loglik, mean, chol

    def log_post(self, theta) -> np.ndarray:
        theta = np.atleast_2d(theta)
        out = np.full(theta.shape[0], -np.inf)
        ok = np.all((theta >= self.lower) & (theta <= self.upper), axis=1)
        if not ok.any():
            return out
        th = theta[ok]
        loglik, _, _ = self.linear(self.columns(th))
        gamma = th[:, self.n_sys:2 * self.n_sys]
        out[ok] = loglik + self.log_prior_t(th[:, :self.n_sys]) \
            - np.sum(np.log(gamma + EXTRA_FWHM_SCALE_PPM), axis=1)
        return out

    def best_linear(self, theta):
        """Columns (S, q, n), areas (S,) >= 0, sideband amplitudes (S, q - 1) >= 0 and
        baseline coefficients at theta (NNLS, no priors)."""
        cols = self.columns(theta[None])[0]
        S, q = self.n_sys, self.n_q
        design = np.vstack([cols[:, 0], cols[:, 1:].reshape(-1, self.n), self.basis,
                            -self.basis]).T
        coef, _ = optimize.nnls(design, self.y, maxiter=50 * design.shape[1])
        m = S * q
        side = coef[S:m].reshape(S, q - 1)
        return cols, coef[:S], side, coef[m:m + self.n_base] - coef[m + self.n_base:]

    def curves(self, theta):
        """Best-fit components (S, n; centreband and sidebands) and baseline (n,) at theta."""
        cols, areas, side, base = self.best_linear(theta)
        comps = areas[:, None] * cols[:, 0] + np.einsum("sk,skn->sn", side, cols[:, 1:])
        return comps, base @ self.basis, cols, areas


def _solve_lower(chol, b):
    """Forward substitution for a batch of lower-triangular systems (small p)."""
    p = b.shape[1]
    z = np.empty_like(b)
    for i in range(p):
        z[:, i] = (b[:, i] - np.einsum("bj,bj->b", chol[:, i, :i], z[:, :i])) / chol[:, i, i]
    return z


def _solve_upper(chol, z):
    """Back substitution with L^T for a batch (small p)."""
    p = z.shape[1]
    x = np.empty_like(z)
    for i in range(p - 1, -1, -1):
        x[:, i] = (z[:, i] - np.einsum("bj,bj->b", chol[:, i + 1:, i], x[:, i + 1:])) \
            / chol[:, i, i]
    return x


# ---------------------------------------------------------------------------------------
# search, sampling


def _noise_from_differences(y: np.ndarray) -> float:
    """White-noise sd from the point-to-point differences (robust: MAD)."""
    d = np.diff(y)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _fwhm_of_tallest(x, y) -> float:
    top = int(np.argmax(y))
    width_points = signal.peak_widths(y, [top], rel_height=0.5)[0][0]
    return max(width_points * float(np.median(np.abs(np.diff(x)))),
               float(np.abs(np.diff(x)).min()))


def _grid_search(model: _Model, gammas, eta: float) -> list[np.ndarray]:
    """Starting points: the highest local maxima of the log posterior over a grid of
    positions (S <= 2: every combination; more systems: coordinate sweeps), for each of a few
    extra widths `gammas` at a fixed mixing."""
    S = model.n_sys
    grids = []
    for s in range(S):
        step = max(1, int(round(model.fwhm_min / GRID_STEPS_PER_FWHM / model.h)),
                   int(np.ceil((model.t_hi[s] - model.t_lo[s]) / model.h / MAX_GRID)))
        grids.append(np.arange(np.ceil(model.t_lo[s] / model.h),
                               np.floor(model.t_hi[s] / model.h) + 1, step).astype(np.int64))
    starts = []
    for gamma in gammas:
        gam = np.asarray(gamma, dtype=float)
        tail = np.concatenate([gam, np.full(model.n_eta, eta)])
        cols = [model.grid_columns(gam, eta, g)[s] for s, g in enumerate(grids)]  # (T, q, n)
        if S == 1:
            logp = model.linear(cols[0][:, None])[0] + model.log_prior_t(
                grids[0][:, None] * model.h)
        elif S == 2:
            logp = _pair_log_post(model, cols, grids)
        else:
            starts += _sweeps(model, cols, grids, gam, eta, tail)
            continue
        for index in _local_maxima(logp)[:STARTS_PER_WIDTH]:
            index = np.atleast_1d(index)
            t = np.array([grids[s][index[s]] * model.h for s in range(S)])
            starts.append((float(logp[tuple(index)]), np.concatenate([t, tail])))
    if S > 2:
        return starts
    picked: list[np.ndarray] = []                  # best first, one per grid neighbourhood
    for _, start in sorted(starts, key=lambda c: -c[0]):
        near = [np.all(np.abs(start[:S] - p[:S]) <= 2.5 * model.fwhm_min / GRID_STEPS_PER_FWHM)
                for p in picked]
        if not any(near):
            picked.append(start)
    return picked[:MAX_STARTS]


def _assignment_starts(model: _Model, peak_ppm: np.ndarray, gamma: np.ndarray,
                       eta: float) -> list[np.ndarray]:
    """One start per (measured peak, system): that system's main line on the peak, every
    other system's line off the measured peaks (at the offset's prior mean, or 2 sd of its
    own deviation away), so that "this phase alone" is sampled even where an optimiser
    would park an absent line on the peak."""
    starts = []
    tail = np.concatenate([gamma, np.full(model.n_eta, eta)])
    width = np.array([f[np.argmax(w)] for _, f, w in model.line_peaks])
    for ppm in peak_ppm:
        for s in range(model.n_sys):
            t = np.empty(model.n_sys)
            t[s] = ppm - model.main_ppm[s]
            for r in range(model.n_sys):
                if r == s:
                    continue
                choices = [model.mu_o, model.mu_o - 2 * model.sigmas[r],
                           model.mu_o + 2 * model.sigmas[r]]
                clear = [c for c in choices
                         if np.min(np.abs(model.main_ppm[r] + c - peak_ppm)) > width[r]]
                t[r] = (clear or choices)[0]
            if np.all((t >= model.t_lo) & (t <= model.t_hi)):
                starts.append(np.concatenate([t, tail]))
    return starts


def _pair_log_post(model: _Model, cols, grids) -> np.ndarray:
    """Log posterior on every pair of grid positions of two systems (blocks of X^T X)."""
    c1, c2 = cols                                        # (T1, q, n), (T2, q, n)
    t1, t2, q = c1.shape[0], c2.shape[0], model.n_q
    K = model.n_base
    p = 2 * q + K
    gram = np.empty((t1, t2, p, p))
    gram[:, :, :q, :q] = np.einsum("iqn,irn->iqr", c1, c1)[:, None]
    gram[:, :, q:2 * q, q:2 * q] = np.einsum("jqn,jrn->jqr", c2, c2)[None]
    cross = (c1.reshape(t1 * q, -1) @ c2.reshape(t2 * q, -1).T).reshape(t1, q, t2, q)
    gram[:, :, :q, q:2 * q] = np.transpose(cross, (0, 2, 1, 3))
    gram[:, :, q:2 * q, :q] = np.transpose(cross, (0, 2, 3, 1))
    rhs = np.empty((t1, t2, p))
    rhs[:, :, :q] = (c1 @ model.y)[:, None]
    rhs[:, :, q:2 * q] = (c2 @ model.y)[None]
    if K:
        b1, b2 = c1 @ model.basis.T, c2 @ model.basis.T          # (T, q, K)
        gram[:, :, :q, 2 * q:] = b1[:, None]
        gram[:, :, 2 * q:, :q] = np.transpose(b1, (0, 2, 1))[:, None]
        gram[:, :, q:2 * q, 2 * q:] = b2[None]
        gram[:, :, 2 * q:, q:2 * q] = np.transpose(b2, (0, 2, 1))[None]
        gram[:, :, 2 * q:, 2 * q:] = model.gbb
        rhs[:, :, 2 * q:] = model.by
    out = np.empty(t1 * t2)
    flat_g, flat_r = gram.reshape(-1, p, p), rhs.reshape(-1, p)
    chunk = 20000
    for a in range(0, out.size, chunk):
        out[a:a + chunk] = model.linear_from_gram(flat_g[a:a + chunk], flat_r[a:a + chunk])[0]
    tt = np.stack(np.meshgrid(grids[0] * model.h, grids[1] * model.h, indexing="ij"), -1)
    return out.reshape(t1, t2) + model.log_prior_t(tt.reshape(-1, 2)).reshape(t1, t2)


def _sweeps(model: _Model, cols, grids, gamma, eta, tail) -> list[np.ndarray]:
    """Coordinate sweeps over the position grids from common-shift starts (S > 2)."""
    S = model.n_sys
    step = max(1, int(round(model.fwhm_min / 3 / model.h)))
    common = np.arange(max(g[0] for g in grids), min(g[-1] for g in grids) + 1, step)
    stack = np.swapaxes(model.grid_columns(gamma, eta, common), 0, 1)   # (T, S, q, n)
    logp = model.linear(stack)[0] + model.log_prior_t(
        np.repeat(common[:, None] * model.h, S, axis=1))
    picks = []
    for k in _local_maxima(logp)[:3]:
        current = [int(np.argmin(np.abs(g - common[k]))) for g in grids]
        for _ in range(2):
            for s in range(S):
                batch = np.stack([np.broadcast_to(cols[r][current[r]], cols[s].shape)
                                  if r != s else cols[s] for r in range(S)], axis=1)
                tvec = np.array([[grids[r][current[r]] if r != s else g for r in range(S)]
                                 for g in grids[s]], dtype=float) * model.h
                current[s] = int(np.argmax(model.linear(batch)[0] + model.log_prior_t(tvec)))
        picks.append(np.concatenate([[grids[s][current[s]] * model.h for s in range(S)],
                                     tail]))
    return picks


def _local_maxima(values: np.ndarray) -> list:
    """Indices of the MAX_MODES highest local maxima, best first."""
    finite = np.where(np.isfinite(values), values, -np.inf)
    size = 5 if values.ndim == 2 else 7
    peak = (ndimage.maximum_filter(finite, size=size, mode="nearest") == finite) & \
        np.isfinite(finite)
    found = np.argwhere(peak) if values.ndim > 1 else np.flatnonzero(peak)
    order = np.argsort(finite[tuple(found.T)] if values.ndim > 1 else finite[found])[::-1]
    found = found[order][:MAX_MODES]
    return [tuple(f) for f in found] if values.ndim > 1 else [int(f) for f in found]


def _fd_steps(model: _Model) -> np.ndarray:
    return np.concatenate([np.full(model.n_sys, 1e-2), np.full(model.n_sys, 1e-2),
                           np.full(model.n_eta, 1e-3)])


def _optimise(model: _Model, start: np.ndarray) -> tuple[np.ndarray, float]:
    """Local maximum of the log posterior (L-BFGS-B, batched central differences)."""
    eps = _fd_steps(model)
    eye = np.eye(model.dim)

    def fun(theta):
        hi = np.minimum(theta[None] + eye * eps, model.upper)
        lo = np.maximum(theta[None] - eye * eps, model.lower)
        values = model.log_post(np.vstack([theta[None], hi, lo]))
        f0, fh, fl = values[0], values[1:1 + model.dim], values[1 + model.dim:]
        if not np.isfinite(f0):
            return 1e30, np.zeros(model.dim)
        grad = np.where(np.isfinite(fh) & np.isfinite(fl),
                        (fh - fl) / np.maximum(np.diag(hi - lo), 1e-300), 0.0)
        return -f0, -grad

    start = np.clip(start, model.lower, model.upper)
    sol = optimize.minimize(fun, start, jac=True, method="L-BFGS-B",
                            bounds=list(zip(model.lower, model.upper)),
                            options={"maxiter": 300, "ftol": 1e-10, "gtol": 1e-6})
    return sol.x, -float(sol.fun)


def _hessian_cov(model: _Model, theta: np.ndarray) -> np.ndarray:
    """Covariance from a finite-difference Hessian of the log posterior (fallback:
    diagonal guesses) to start the walkers."""
    d = model.dim
    eps = _fd_steps(model) * 10
    span = model.upper - model.lower
    fallback = np.diag((np.concatenate([np.full(model.n_sys, model.fwhm_min / 4),
                                        np.full(model.n_sys, model.fwhm_min / 4),
                                        np.full(model.n_eta, 0.1)])) ** 2)
    theta = np.clip(theta, model.lower + 2 * eps, model.upper - 2 * eps)
    points = [theta]
    for i in range(d):
        points += [theta + eps[i] * np.eye(d)[i], theta - eps[i] * np.eye(d)[i]]
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    for i, j in pairs:
        for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            points.append(theta + si * eps[i] * np.eye(d)[i] + sj * eps[j] * np.eye(d)[j])
    f = model.log_post(np.array(points))
    if not np.all(np.isfinite(f)):
        return fallback
    hess = np.empty((d, d))
    for i in range(d):
        hess[i, i] = (f[1 + 2 * i] - 2 * f[0] + f[2 + 2 * i]) / eps[i] ** 2
    base = 1 + 2 * d
    for k, (i, j) in enumerate(pairs):
        pp, pm, mp, mm = f[base + 4 * k: base + 4 * k + 4]
        hess[i, j] = hess[j, i] = (pp - pm - mp + mm) / (4 * eps[i] * eps[j])
    try:
        cov = np.linalg.inv(-hess)
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return fallback
    # cap at the prior ranges
    sd = np.sqrt(np.diag(cov))
    cap = np.minimum(sd, span / 4) / sd
    return cov * np.outer(cap, cap)


def _same_mode(a: np.ndarray, b: np.ndarray, model: _Model) -> bool:
    """Two optima are one mode when their fractions agree (within 0.15) and every system
    present in either (fraction > 0.05) sits at the same position in both: where an absent
    system's line is parked does not make another mode."""
    fa, fb = model.best_linear(a)[1], model.best_linear(b)[1]
    fa, fb = fa / max(fa.sum(), 1e-300), fb / max(fb.sum(), 1e-300)
    if not np.all(np.abs(fa - fb) < 0.15):
        return False
    present = (fa > 0.05) | (fb > 0.05)
    close = np.abs(a[:model.n_sys] - b[:model.n_sys]) < model.fwhm_min / 2
    return bool(np.all(close | ~present))


def _run_emcee(model: _Model, theta: np.ndarray, cov: np.ndarray, n_walkers: int,
               n_steps: int, seed: int):
    """emcee from a normal ball (the Laplace covariance) around `theta`; extended while
    shorter than 10 autocorrelation times. Returns the samples after burn-in (a third),
    the autocorrelation time (steps) and the acceptance fraction."""
    import emcee

    rng = np.random.default_rng(seed)
    start = []
    for _ in range(20):
        draw = np.clip(rng.multivariate_normal(theta, cov, size=4 * n_walkers),
                       model.lower, model.upper)
        start += list(draw[np.isfinite(model.log_post(draw))])
        if len(start) >= n_walkers:
            break
    while len(start) < n_walkers:
        start.append(np.clip(theta + 1e-6 * rng.standard_normal(model.dim), model.lower,
                             model.upper))
    sampler = emcee.EnsembleSampler(n_walkers, model.dim, model.log_post, vectorize=True,
                                    moves=[(emcee.moves.StretchMove(), 0.5),
                                           (emcee.moves.DEMove(), 0.4),
                                           (emcee.moves.DESnookerMove(), 0.1)])
    sampler.random_state = np.random.RandomState(seed % (2 ** 32)).get_state()
    sampler.run_mcmc(np.array(start[:n_walkers]), n_steps, progress=False)
    for _ in range(MAX_EXTENSIONS + 1):
        total = sampler.iteration
        chain = sampler.get_chain(discard=total // 3)           # (steps, walkers, dim)
        tau = float(np.max(emcee.autocorr.integrated_time(chain, c=5, tol=0, quiet=True)))
        if chain.shape[0] >= 10 * tau or total >= (MAX_EXTENSIONS + 1) * n_steps:
            break
        sampler.run_mcmc(None, n_steps, progress=False)
    return chain.reshape(-1, model.dim), tau, float(np.mean(sampler.acceptance_fraction))


def _laplace_log_evidence(logp: float, cov: np.ndarray) -> float:
    sign, logdet = np.linalg.slogdet(2 * np.pi * cov)
    return float(logp + 0.5 * logdet) if sign > 0 else float(logp)


def _region_weights(model: _Model, runs: list[dict], rng, n_per_run: int = 600,
                    n_centres: int = 300):
    """Posterior mass of each run's region, by importance sampling from a mixture of kernel
    density estimates of the runs' samples (it follows curved ridges; a region two runs
    share is split between them, so it is not counted twice). Returns the weights and the
    effective sample size of the importance draws and the log evidence estimate
    (log mean p / q, p the unnormalised posterior)."""
    d = model.dim
    bandwidth = n_centres ** (-1.0 / (d + 4))                         # Scott's factor
    kdes = []
    for run in runs:
        centres = run["samples"][rng.choice(len(run["samples"]), n_centres)]
        cov = np.cov(run["samples"].T) * bandwidth ** 2 + np.diag(
            (1e-6 * (model.upper - model.lower)) ** 2)
        chol = np.linalg.cholesky(cov)
        kdes.append((centres, chol, np.linalg.inv(chol), 2 * np.sum(np.log(np.diag(chol)))))
    draws = np.vstack([c[rng.integers(0, n_centres, n_per_run)]
                       + rng.standard_normal((n_per_run, d)) @ chol.T
                       for c, chol, _, _ in kdes])
    logp = np.concatenate([model.log_post(draws[a:a + 300]) for a in range(0, len(draws), 300)])
    logq_i = []
    for centres, _, inv_chol, logdet in kdes:
        z = np.einsum("ij,bkj->bki", inv_chol, draws[:, None, :] - centres[None])
        logk = -0.5 * np.sum(z * z, axis=2) - 0.5 * logdet - 0.5 * d * np.log(2 * np.pi)
        logq_i.append(special.logsumexp(logk, axis=1) - np.log(n_centres))
    logq_i = np.stack(logq_i, axis=1) - np.log(len(kdes))
    logq = special.logsumexp(logq_i, axis=1)
    ok = np.isfinite(logp) & np.isfinite(logq)
    if not ok.any():
        return np.full(len(runs), 1.0 / len(runs)), 0.0, -np.inf
    logw = np.where(ok, logp - np.where(ok, logq, 0.0), -np.inf)
    log_z = float(special.logsumexp(logw) - np.log(len(logw)))
    w = np.exp(logw - np.max(logw))
    resp = np.where(ok[:, None], np.exp(logq_i - np.where(ok, logq, 0.0)[:, None]), 0.0)
    weights = (w[:, None] * resp).sum(axis=0) / w.sum()
    return weights, float(w.sum() ** 2 / (w * w).sum()), log_z


# ---------------------------------------------------------------------------------------
# the fit


def _white_noise_optima(model: _Model, x, y, noise: float, max_extra_fwhm_ppm: float,
                        peaks_idx: np.ndarray):
    """Distinct local optima of `model` at the white-noise level (grid search over the
    positions at a few widths, plus "this phase alone" starts on the tallest measured
    peaks), best first; and the noise sd and residual autocorrelation time (points) of the
    best one's residual (:func:`_misfit_noise`)."""
    n_sys = model.n_sys
    w_meas = _fwhm_of_tallest(x, y)
    eta0 = 0.5 if model.free_eta else model.fixed_eta
    gammas = [np.full(n_sys, min(g * w_meas, 0.9 * max_extra_fwhm_ppm))
              for g in (0.05, 0.2, 0.5, 1.0)]
    model.set_noise(max(noise, 1.0 / SEARCH_SNR))
    starts = _grid_search(model, gammas, eta0)
    model.set_noise(max(noise, 1e-6))
    tallest = peaks_idx[np.argsort(y[peaks_idx])[::-1][:MAX_ASSIGNMENT_PEAKS]]
    if n_sys > 1:
        starts += _assignment_starts(model, x[tallest], gammas[1], eta0)
    optima: list[tuple[np.ndarray, float]] = []
    for theta, logp in sorted((_optimise(model, start) for start in starts),
                              key=lambda r: -r[1]):
        if not any(_same_mode(theta, m[0], model) for m in optima):
            optima.append((theta, logp))
    comps, base_curve, _, _ = model.curves(optima[0][0])
    resid = y - comps.sum(axis=0) - base_curve
    n_lin = n_sys * model.n_q + model.n_base
    sigma_hat, tau = _misfit_noise(resid, comps.sum(axis=0), n_lin + model.dim)
    return optima, sigma_hat, tau


def _sample_model(model: _Model, optima, noise: float, sigma_eff: float,
                  mcmc_walkers: int | None, mcmc_steps: int, seed: int, rng, several: bool):
    """The posterior of one shape model at the effective noise `sigma_eff`: its optima
    re-optimised (those that may still count), the distinct ones ranked by their Laplace
    evidence, one emcee ensemble from each (at most MAX_RUNS), the runs' regions weighted by
    importance sampling. Returns the runs, their weights, the model's log evidence (the
    importance-sampling estimate; 0 for a lone run of a lone model, where it is not needed)
    and the effective sample size of the weights."""
    first = optima[0]
    scale_gap = (max(noise, 1e-6) / sigma_eff) ** 2
    optima = [o for o in optima if (first[1] - o[1]) * scale_gap < 3 * MODE_LOGP_GAP]
    model.set_noise(sigma_eff)
    optima = sorted((_optimise(model, theta) for theta, _ in optima), key=lambda r: -r[1])
    distinct: list[tuple[np.ndarray, float]] = []
    for theta, logp in optima:
        if not any(_same_mode(theta, m[0], model) for m in distinct):
            distinct.append((theta, logp))
    candidates = []
    for theta, logp in distinct:
        cov = _hessian_cov(model, theta)
        candidates.append((theta, logp, cov, _laplace_log_evidence(logp, cov)))
    candidates.sort(key=lambda c: -c[3])
    candidates = [c for c in candidates if c[3] >= candidates[0][3] - MODE_LOGP_GAP][:MAX_RUNS]
    walkers = mcmc_walkers or max(16, 4 * model.dim)
    runs = []
    for k, (theta, logp, cov, _) in enumerate(candidates):
        samples, tau_chain, accept = _run_emcee(model, theta, cov, walkers, mcmc_steps,
                                                seed + 7919 * (k + 1))
        runs.append({"samples": samples, "tau": tau_chain, "accept": accept, "theta": theta,
                     "logp": logp, "walkers": walkers})
    if len(runs) == 1 and not several:
        return runs, np.ones(1), 0.0, np.inf
    weights, ess, log_z = _region_weights(model, runs, rng)
    return runs, weights, log_z, ess




def _as_predicted(name: str, value) -> PredictedLine:
    if isinstance(value, PredictedLine):
        return value
    ppm, intensity = value
    return PredictedLine(np.asarray(ppm), np.asarray(intensity))


def _window_data(measured: MeasuredSpectrum, window_ppm, n_min: int):
    ppm = np.asarray(measured.ppm, dtype=float)
    keep = np.ones(ppm.size, dtype=bool)
    if window_ppm is not None:
        keep = (ppm >= min(window_ppm)) & (ppm <= max(window_ppm))
    if keep.sum() <= n_min:
        raise ValueError(f"window_ppm {window_ppm} leaves {keep.sum()} measured points of "
                         f"{measured.source}; the fit needs more than {n_min}")
    order = np.flatnonzero(keep)[np.argsort(ppm[keep])]
    x, y_raw = ppm[order], np.asarray(measured.intensity, dtype=float)[order]
    scale = float(np.max(np.abs(y_raw)))
    if not scale > 0:
        raise ValueError(f"measured spectrum {measured.source} is zero in the fitted range")
    return x, y_raw, scale, order


def _quantiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def _fraction_interval(values: np.ndarray) -> tuple[float, float]:
    """95 % interval of a fraction: equal-tailed, or one-sided ([0, q95] or [q5, 1]) when
    the posterior piles up against 0 or 1 (a phase absent, or alone), or [0, 1] when it piles
    up against both (either phase alone)."""
    mean, sd = float(np.mean(values)), float(np.std(values))
    low, high = _quantiles(values)
    at_zero = mean < 2 * sd and low < sd
    at_one = 1 - mean < 2 * sd and 1 - high < sd
    if at_zero and at_one:                      # mass at both ends: either phase alone
        return 0.0, 1.0
    if at_zero:
        return 0.0, float(np.quantile(values, 0.95))
    if at_one:
        return float(np.quantile(values, 0.05)), 1.0
    return low, high


def _one_blas_thread(function):
    """Run `function` with one BLAS thread: its matrices are small, and threads only cost."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)
    return wrapper


@_one_blas_thread
def fit_spectrum(measured: MeasuredSpectrum, predicted: Mapping[str, PredictedLine | tuple], *,
                 window_ppm: tuple[float, float] | None = None,
                 offset_prior_ppm: tuple[float, float] = OFFSET_PRIOR_PPM,
                 offset_range_ppm: tuple[float, float] = (-400.0, 400.0),
                 position_sd_ppm: float = POSITION_SD_PPM,
                 unconverged_position_sd_ppm: float = UNCONVERGED_POSITION_SD_PPM,
                 line_shape: str = "pseudo-voigt", baseline_order: int = 2,
                 max_extra_fwhm_ppm: float = MAX_EXTRA_FWHM_PPM,
                 larmor_mhz: float | None = None, mas_rate_hz: float | None = None,
                 sideband_orders: int = 1, peak_prominence: float = 0.02,
                 deconvolution: bool = True,
                 deconvolution_peaks: int | None = None, mcmc_steps: int = 450,
                 mcmc_walkers: int | None = None,
                 shape_models: tuple[str, ...] = SHAPE_MODELS,
                 seed: int = 0) -> SpectrumFit:
    """Fit a measured spectrum as a mixture of predicted lines; posterior by emcee.

    Parameters
    ----------
    measured : MeasuredSpectrum
        The spectrum (either ppm order).
    predicted : mapping of str to PredictedLine or (ppm, intensity)
        Each system's predicted line (normalised to unit area on its grid, zero outside it),
        with the prior sd of its own position deviation and its convergence; a bare pair is
        a converged prediction with ``position_sd_ppm``.
    window_ppm : (float, float), optional
        Fit only the measured points in this ppm range (leave sidebands out).
    offset_prior_ppm : (float, float)
        Mean and sd of the normal prior of the common offset (measured = predicted + offset).
    offset_range_ppm : (float, float)
        Hard bounds of the offset.
    position_sd_ppm, unconverged_position_sd_ppm : float
        Prior sd of a system's own deviation when its line gives none (converged / not).
    line_shape : {"pseudo-voigt", "lorentzian", "gaussian"}
        Shape of the extra broadening (pseudo-Voigt: its mixing is fitted).
    baseline_order : int
        Order of the polynomial baseline; -1 for none.
    max_extra_fwhm_ppm : float
        Upper bound of each extra FWHM.
    larmor_mhz, mas_rate_hz : float, optional
        Default: the measured spectrum's (Bruker SF, acqus MASR). When both are known, the
        first ``sideband_orders`` spinning-sideband pairs (+- k x rate / Larmor ppm) of every
        line are modelled (free amplitudes: their tails leak into the window) and a line
        whose first sidebands fall inside the window gives a warning.
    sideband_orders : int
        Sideband pairs modelled when the MAS rate is known (0: none).
    peak_prominence : float
        Least prominence of the measured peaks assigned, as a fraction of the largest.
    deconvolution : bool
        Also run the paper's route (:func:`deconvolve`).
    deconvolution_peaks : int, optional
        Peaks of the free deconvolution (default: the predicted peaks, at most 6).
    mcmc_steps, mcmc_walkers : int
        emcee steps per mode (a third is burn-in; extended up to 3x while shorter than 10
        autocorrelation times) and walkers (default max(16, 4 x dim)).
    shape_models : tuple of {"convolved", "peaks"}
        How predicted lines become measured ones (:data:`SHAPE_MODELS`); with several, each
        is sampled and the posterior is their mixture weighted by their evidence, so that
        the fractions' intervals hold the line-shape uncertainty the data leave.
    seed : int
        Seeds the sampler, the walkers' start and the draws: the same seed, the same numbers.

    Returns
    -------
    SpectrumFit

    Raises
    ------
    ValueError
        Bad predictions, ranges or windows.
    """
    started = time.perf_counter()
    if not predicted:
        raise ValueError("predicted must name at least one system")
    if line_shape not in LINE_SHAPES:
        raise ValueError(f"line_shape must be one of {LINE_SHAPES}, got {line_shape!r}")
    shape_models = tuple(dict.fromkeys(shape_models))
    if not shape_models or any(f not in SHAPE_MODELS for f in shape_models):
        raise ValueError(f"shape_models must be a non-empty selection of {SHAPE_MODELS}, got "
                         f"{shape_models!r}")
    names = tuple(predicted)
    given = {name: _as_predicted(name, predicted[name]) for name in names}
    lines = [_line(name, (given[name].ppm, given[name].intensity)) for name in names]
    sigmas = []
    for name in names:
        line = given[name]
        sigma = line.sigma_ppm if line.sigma_ppm is not None else (
            position_sd_ppm if line.converged else unconverged_position_sd_ppm)
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"predicted[{name!r}]: sigma_ppm must be > 0, got {sigma}")
        sigmas.append(float(sigma))
    lo_off, hi_off = (float(v) for v in offset_range_ppm)
    if not (np.isfinite(lo_off) and np.isfinite(hi_off) and lo_off < hi_off):
        raise ValueError(f"offset_range_ppm must be finite (low, high), got {offset_range_ppm}")
    mu_o, sd_o = (float(v) for v in offset_prior_ppm)
    if not (np.isfinite(mu_o) and sd_o > 0):
        raise ValueError(f"offset_prior_ppm must be (mean, sd > 0), got {offset_prior_ppm}")
    off_lo = max(lo_off, mu_o - OFFSET_TRUNCATION_SD * sd_o)
    off_hi = min(hi_off, mu_o + OFFSET_TRUNCATION_SD * sd_o)
    if not off_lo < off_hi:
        raise ValueError(f"offset_range_ppm {offset_range_ppm} excludes the offset prior "
                         f"{offset_prior_ppm} (more than {OFFSET_TRUNCATION_SD} sd away)")
    n_sys = len(names)
    x, y_raw, scale, order = _window_data(measured, window_ppm,
                                          3 * n_sys + 2 + max(baseline_order, -1) + 1)
    y = y_raw / scale
    noise = _noise_from_differences(y)
    larmor = larmor_mhz if larmor_mhz is not None else measured.larmor_mhz
    rate = mas_rate_hz if mas_rate_hz is not None else measured.mas_rate_hz
    sideband_ppm = rate / larmor if rate and larmor else None
    models = [_Model(x, y, lines, sigmas, (mu_o, sd_o), (off_lo, off_hi), baseline_order,
                     line_shape, float(max_extra_fwhm_ppm), max(noise, 1e-6), sideband_ppm,
                     sideband_orders, shape_model=f) for f in shape_models]
    model = models[0]                  # the default model: shared geometry, statements
    rng = np.random.default_rng(seed)
    peaks_idx = _measured_peaks(x, y, peak_prominence)

    # 1. optima of each shape model at the white-noise level; the effective noise (misfit
    # and residual autocorrelation) from the best-fitting model's best optimum
    found = [_white_noise_optima(m, x, y, noise, max_extra_fwhm_ppm, peaks_idx)
             for m in models]
    sigma_hat, tau = min(((sh, ta) for _, sh, ta in found), key=lambda r: r[0] ** 2 * r[1])
    sigma_eff = np.sqrt(tau) * sigma_hat

    # 2.-3. per model: the optima at the effective noise, emcee from each, the regions
    # weighted by mixture importance sampling, and the model's evidence
    families = []
    for k, (m, (optima, _, _)) in enumerate(zip(models, found)):
        runs, weights_f, log_z, ess_f = _sample_model(
            m, optima, noise, sigma_eff, mcmc_walkers, mcmc_steps, seed + 104729 * k, rng,
            several=len(models) > 1)
        families.append({"model": m, "runs": runs, "weights": weights_f, "log_z": log_z,
                         "ess": ess_f})
    log_z = np.array([f["log_z"] for f in families])
    family_weight = np.exp(log_z - special.logsumexp(log_z)) if len(families) > 1 else \
        np.ones(1)
    ess = min(f["ess"] for f in families if f["log_z"] > -np.inf) if families else np.inf
    runs = [run for f in families for run in f["runs"]]
    run_model = [f["model"] for f in families for _ in f["runs"]]
    run_family = np.concatenate([np.full(len(f["runs"]), k) for k, f in enumerate(families)])
    weights = np.concatenate([w * f["weights"] for w, f in zip(family_weight, families)])

    # 4. posterior draws: regions by weight, then the linear parameters given theta
    weights = np.clip(np.nan_to_num(weights), 0.0, None)
    weights = weights / weights.sum()
    counts = np.bincount(rng.choice(len(runs), size=N_DRAWS, p=weights), minlength=len(runs))
    thetas, mode_of, parts = [], [], []
    for i, (run, c) in enumerate(zip(runs, counts)):
        if c > 0:
            th = run["samples"][rng.integers(0, len(run["samples"]), c)]
            thetas.append(th)
            mode_of.append(np.full(c, i))
            parts.append(_draw_linear(run_model[i], th, rng, peaks_idx))
    thetas, mode_of = np.vstack(thetas), np.concatenate(mode_of)
    draws = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    fractions = draws["areas"] / draws["areas"].sum(axis=1, keepdims=True)
    t = thetas[:, :n_sys]
    m_o, s_o = model.offset_given_t(t)
    a = special.ndtr((off_lo - m_o) / s_o)
    b = special.ndtr((off_hi - m_o) / s_o)
    offset = m_o + s_o * special.ndtri(np.clip(a + rng.random(len(t)) * (b - a), 1e-15,
                                               1 - 1e-15))
    positions = model.main_ppm[None] + t
    deviations = t - offset[:, None]
    gamma = thetas[:, n_sys:2 * n_sys]
    eta = thetas[:, 2 * n_sys:] if model.free_eta else np.full((len(t), n_sys),
                                                                 model.fixed_eta)
    family_of = run_family[mode_of]
    shape_models_out = {}
    for k, f in enumerate(shape_models):
        sel = family_of == k
        shape_models_out[f] = ShapeModelResult(
            float(family_weight[k]), float(log_z[k]),
            {n: float(np.mean(fractions[sel, s])) if sel.any() else float("nan")
             for s, n in enumerate(names)},
            {n: float(np.std(fractions[sel, s])) if sel.any() else float("nan")
             for s, n in enumerate(names)})

    # 5. the best point for the curves
    best = int(np.argmax(weights))
    best_run = runs[best]
    comps, base_curve, _, _ = run_model[best].curves(best_run["theta"])
    comps, base_curve = comps * scale, base_curve * scale
    model_curve = comps.sum(axis=0) + base_curve
    resid = y_raw - model_curve
    back = np.argsort(np.argsort(order))
    peaks = []
    for j, i in enumerate(peaks_idx):
        share = draws["peak_share"][:, j, :]                       # (draws, S)
        dominant = np.argmax(share, axis=1)
        probs = np.bincount(dominant, minlength=n_sys) / len(dominant)
        top = int(np.argmax(probs))
        peaks.append(PeakAssignment(float(x[i]), float(y_raw[i]), names[top],
                                    float(np.mean(share[:, top] / np.maximum(
                                        share.sum(axis=1), 1e-300))),
                                    dict(zip(names, probs.tolist()))))
    mode_list: list[Mode] = []
    for i in np.argsort(-weights):
        sel = mode_of == i
        if not sel.any():
            continue
        pos, frac = positions[sel].mean(axis=0), fractions[sel].mean(axis=0)
        for k, mode in enumerate(mode_list):
            same = all(abs(mode.positions_ppm[n] - pos[s]) < model.fwhm_min / 2 and
                       abs(mode.fractions[n] - frac[s]) < 0.15 for s, n in enumerate(names))
            if same:
                mode_list[k] = Mode(mode.weight + float(weights[i]), mode.positions_ppm,
                                    mode.fractions)
                break
        else:
            mode_list.append(Mode(float(weights[i]), dict(zip(names, pos.tolist())),
                                  dict(zip(names, frac.tolist()))))
    mode_list.sort(key=lambda m: -m.weight)

    intervals = {n: _fraction_interval(fractions[:, s]) for s, n in enumerate(names)}
    separable = all(hi - lo <= WIDE_INTERVAL for lo, hi in intervals.values())
    tau_chain = max(r["tau"] for r in runs)
    n_indep = min(len(r["samples"]) / max(r["tau"], 1.0) for r in runs)
    statements, warnings = _statements(
        names, given, sigmas, fractions, intervals, positions, gamma, model, mode_list, peaks)
    statements += _shape_model_statements(names, shape_models_out)
    if sigma_hat > 3 * noise:
        warnings.append(f"the best-fit residual rms is {sigma_hat / noise:.1f} x the noise: "
                        "the model misfits (line shapes, baseline, a missing phase or "
                        "sidebands); the errors are widened by the residual autocorrelation "
                        f"(n_eff {x.size / tau:.0f} of {x.size} points)")
    if ess < 50:
        warnings.append(f"the weights of the posterior's regions are uncertain (importance "
                        f"sampling: {ess:.0f} effective draws)")
    if n_indep < 100:
        warnings.append(f"short chains: about {n_indep:.0f} independent draws per mode "
                        f"(autocorrelation {tau_chain:.0f} steps); raise mcmc_steps")
    warnings += _sideband_warnings(names, model, fractions, t, x, larmor, rate)

    deconv = None
    if deconvolution:
        try:
            deconv = deconvolve(measured, given, n_peaks=deconvolution_peaks,
                                window_ppm=window_ppm,
                                baseline_order=baseline_order, line_shape=line_shape,
                                offset_prior_ppm=(mu_o, sd_o), position_sd_ppm=position_sd_ppm,
                                unconverged_position_sd_ppm=unconverged_position_sd_ppm,
                                seed=seed)
        except (ValueError, np.linalg.LinAlgError) as exc:
            warnings.append(f"deconvolution failed: {exc}")
    if deconv is not None:
        warnings += _shape_check(names, fractions, deconv, separable)

    def stat(values):
        return dict(zip(names, values.mean(axis=0).tolist())), \
            dict(zip(names, values.std(axis=0).tolist()))

    frac_mean, frac_sd = stat(fractions)
    pos_mean, pos_sd = stat(positions)
    dev_mean, dev_sd = stat(deviations)
    wid_mean, wid_sd = stat(gamma)
    mix_mean, mix_sd = stat(eta)
    samples = {"offset": offset}
    for s, n in enumerate(names):
        samples[f"fraction:{n}"] = fractions[:, s]
        samples[f"position:{n}"] = positions[:, s]
        samples[f"width:{n}"] = gamma[:, s]
        samples[f"mixing:{n}"] = eta[:, s]
    return SpectrumFit(
        systems=names, fractions=frac_mean, fraction_errors=frac_sd,
        fraction_intervals=intervals, positions_ppm=pos_mean, position_errors_ppm=pos_sd,
        deviations_ppm=dev_mean, deviation_errors_ppm=dev_sd,
        position_sd_ppm=dict(zip(names, sigmas)),
        converged={n: bool(given[n].converged) for n in names},
        verdicts={n: given[n].verdict for n in names},
        widths_ppm=wid_mean, width_errors_ppm=wid_sd,
        mixing=mix_mean, mixing_errors=mix_sd, line_shape=line_shape,
        offset_ppm=float(offset.mean()), offset_error_ppm=float(offset.std()),
        offset_interval_ppm=_quantiles(offset),
        baseline=float(base_curve.mean()), baseline_order=int(baseline_order),
        noise_rms=noise * scale,
        residual_rms_rel=float(np.sqrt(np.mean(resid ** 2)) / np.max(y_raw)),
        n_points=int(x.size), n_effective=float(x.size / tau), modes=tuple(mode_list),
        peaks=tuple(peaks), separable=separable, statements=tuple(statements),
        warnings=tuple(warnings), deconvolution=deconv, shape_models=shape_models_out,
        n_samples=int(len(thetas)),
        seed=int(seed), elapsed_s=time.perf_counter() - started,
        success=bool(np.all(np.isfinite(fractions))), message=(
            f"{len(runs)} run(s) of {runs[0]['walkers']} walkers x >= {mcmc_steps} steps over "
            f"{len(shape_models)} shape model(s), acceptance "
            f"{min(r['accept'] for r in runs):.2f}-{max(r['accept'] for r in runs):.2f}, "
            f"autocorrelation <= {tau_chain:.0f} steps"),
        ppm=x[back], model=model_curve[back],
        components={n: c[back] for n, c in zip(names, comps)},
        baseline_curve=base_curve[back], samples=samples)


def _misfit_noise(resid: np.ndarray, lines: np.ndarray, n_params: int) -> tuple[float, float]:
    """Noise sd and residual autocorrelation time (points) that the likelihood uses.

    Both are taken where the lines are (the fitted lines above LINE_REGION of their
    maximum; the whole window when that is under 50 points, and never less than the
    window's own): a misfit of the line shapes sits there, and averaged over a wide window
    of baseline it would vanish into the white noise."""
    n = resid.size
    sigma_all = float(np.sqrt(resid @ resid / max(n - n_params, 1)))
    tau_all = _autocorr_time(resid)
    region = lines > LINE_REGION * lines.max() if lines.max() > 0 else np.zeros(n, bool)
    if region.sum() < 50:
        return sigma_all, tau_all
    lo, hi = np.flatnonzero(region)[[0, -1]]
    part = resid[lo:hi + 1]
    sigma_line = float(np.sqrt(np.mean(part ** 2) * n / max(n - n_params, 1)))
    return max(sigma_all, sigma_line), max(tau_all, _autocorr_time(part))


def _autocorr_time(resid: np.ndarray) -> float:
    """Integrated autocorrelation time of a residual (points; emcee's estimator, >= 1)."""
    import emcee

    tau = emcee.autocorr.integrated_time(resid[:, None], c=5, tol=0, quiet=True,
                                         has_walkers=False)
    return float(np.clip(tau[0], 1.0, resid.size / 4))


def _measured_peaks(x, y, prominence) -> np.ndarray:
    """Peaks of the measured spectrum smoothed by a Gaussian (so noise spikes are no peaks)."""
    sigma_points = PEAK_SMOOTHING * _fwhm_of_tallest(x, y) / float(np.median(np.diff(x)))
    smooth = ndimage.gaussian_filter1d(y, max(sigma_points, 0.5), mode="nearest")
    idx, _ = signal.find_peaks(smooth, prominence=prominence * float(np.max(smooth)))
    if idx.size == 0:
        idx = np.array([int(np.argmax(smooth))])
    return idx


def _draw_linear(model: _Model, thetas, rng, peaks_idx, chunk: int = 250) -> dict:
    """Areas and sideband amplitudes (truncated at >= 0) and baseline drawn from their
    conditional normal; returns the areas and each system's line at the measured peaks."""
    S, area, positive = model.n_sys, model.area_index, model.positive
    areas, shares = [], []
    for a in range(0, len(thetas), chunk):
        th = thetas[a:a + chunk]
        cols = model.columns(th)
        _, mean, chol = model.linear(cols)
        inv_t = np.transpose(np.linalg.inv(chol), (0, 2, 1))             # L^-T
        draw = np.full(mean.shape, np.nan)
        todo = np.ones(len(th), dtype=bool)
        for _ in range(40):
            z = rng.standard_normal(mean.shape)
            cand = mean + np.einsum("bij,bj->bi", inv_t, z)
            ok = todo & np.all(cand[:, positive] >= 0, axis=1)
            draw[ok] = cand[ok]
            todo &= ~ok
            if not todo.any():
                break
        if todo.any():
            cand = mean[todo] + np.einsum("bij,bj->bi", inv_t[todo],
                                          rng.standard_normal(mean[todo].shape))
            cand[:, positive] = np.maximum(cand[:, positive], 0.0)
            draw[todo] = cand
        a_s = draw[:, area]
        a_s[a_s.sum(axis=1) <= 0] = 1.0 / S
        areas.append(a_s)
        shares.append(a_s[:, None, :] * np.transpose(cols[:, :, 0, peaks_idx], (0, 2, 1)))
    return {"areas": np.vstack(areas), "peak_share": np.concatenate(shares)}


def _statements(names, given, sigmas, fractions, intervals, positions, gamma, model, modes,
                peaks) -> tuple[list[str], list[str]]:
    """What the fit can and cannot tell, in words; and an (empty) list for warnings."""
    statements, warnings = [], []
    for s, name in enumerate(names):
        if not given[name].converged:
            verdict = f" ({given[name].verdict})" if given[name].verdict else ""
            statements.append(f"{name}: the prediction is not converged{verdict}; its own "
                              f"position prior is widened to sd {sigmas[s]:.0f} ppm")
    main_fwhm = np.array([f[np.argmax(w)] for _, f, w in model.line_peaks])
    wide = [n for n in names if intervals[n][1] - intervals[n][0] > WIDE_INTERVAL]
    said = set()
    for a, b in itertools.combinations(range(len(names)), 2):
        if names[a] not in wide and names[b] not in wide:
            continue
        sep = float(np.median(np.abs(positions[:, a] - positions[:, b])))
        width = float(np.median((main_fwhm[a] + gamma[:, a] + main_fwhm[b] + gamma[:, b]) / 2))
        if sep < 0.75 * width:
            lo, hi = intervals[names[a]]
            statements.append(
                f"{names[a]} and {names[b]} are not separable: their lines overlap ({sep:.0f} "
                f"ppm apart, FWHM ~{width:.0f} ppm), so the spectrum cannot split the area "
                f"between them; {names[a]} {np.mean(fractions[:, a]):.2f} with 95% interval "
                f"{lo:.2f}-{hi:.2f}")
            said.update((names[a], names[b]))
    strong = [m for m in modes if m.weight >= 0.02]
    if len(strong) > 1:
        text = "; ".join(
            f"p {m.weight:.2f}: " + ", ".join(f"{n} {m.fractions[n]:.2f} at "
                                               f"{m.positions_ppm[n]:.0f} ppm" for n in names)
            for m in strong)
        statements.append(f"the assignment is ambiguous: {len(strong)} ways of placing the "
                          f"lines explain the spectrum ({text})")
    if len(peaks) == 1 and len(names) > 1:
        peak = peaks[0]
        probs = ", ".join(f"{n} {peak.probabilities[n]:.2f}" for n in
                          sorted(names, key=lambda n: -peak.probabilities[n]))
        word = ("either phase could explain it" if max(peak.probabilities.values()) < 0.95
                else f"it is {peak.system}")
        statements.append(f"one measured peak (at {peak.ppm:.0f} ppm): {word}; posterior "
                          f"probability of each assignment: {probs}")
    for name in wide:
        if name not in said:
            lo, hi = intervals[name]
            why = ("the measured peak could belong to either phase" if len(strong) > 1
                   or len(peaks) < len(names) else "the data constrain it weakly")
            statements.append(f"{name}'s fraction is not determined: 95% interval "
                              f"{lo:.2f}-{hi:.2f} ({why})")
    return statements, warnings


SHAPE_MODEL_WORDS = {"convolved": "the predicted lines convolved with the broadening",
                     "peaks": "one broadened line per predicted peak (FWHM predicted + extra)"}


def _shape_model_statements(names, results: dict) -> list[str]:
    """A sentence where two shape models both keep weight (>= 0.05) and disagree on a
    fraction by more than their combined sd: the interval then spans both."""
    kept = {f: r for f, r in results.items() if r.weight >= 0.05}
    if len(kept) < 2:
        return []
    differ = [n for n in names if np.ptp([r.fractions[n] for r in kept.values()]) > 2 * max(
        np.hypot(*[r.fraction_errors[n] for r in list(kept.values())[:2]]), 1e-3)]
    if not differ:
        return []
    return ["the line shape is uncertain and it matters: " + "; ".join(
        f"{SHAPE_MODEL_WORDS[f]} (p {r.weight:.2f}) give " + ", ".join(
            f"{n} {r.fractions[n]:.3f}" for n in names) for f, r in kept.items())
        + "; the intervals hold both"]


def _shape_check(names, fractions, deconv: Deconvolution, separable: bool) -> list[str]:
    """A warning where the free deconvolution, sure of its assignment, disagrees with the
    mixture by more than 3 combined sd: the measured line shapes are not the predicted ones
    broadened, and the fractions lean on the tails the predicted shapes extrapolate."""
    if not (separable and deconv.success and deconv.assignment_probability > 0.9) or \
            deconv.merged:
        return []
    out = []
    for s, name in enumerate(names):
        mix, mix_sd = float(np.mean(fractions[:, s])), float(np.std(fractions[:, s]))
        dec, dec_sd = deconv.fractions[name], deconv.fraction_errors[name]
        if dec_sd < 0.1 and abs(dec - mix) > 3 * np.hypot(mix_sd, dec_sd):
            out.append(f"{name}: the free deconvolution (the paper's route) gives "
                       f"{dec:.3f} +- {dec_sd:.3f} against the mixture's {mix:.3f} +- "
                       f"{mix_sd:.3f}: the measured line shapes are not the predicted ones "
                       "broadened, and the fractions depend on the tails the predicted "
                       "shapes extrapolate beyond the window; the interval does not hold "
                       "this line-shape error")
    return out


def _sideband_warnings(names, model, fractions, t, x, larmor, rate) -> list[str]:
    if rate is None:
        return []
    if larmor is None or not larmor > 0:
        return [f"MAS rate {rate / 1e3:.1f} kHz known but no Larmor frequency: spinning "
                "sidebands not checked"]
    step = rate / larmor                                   # Hz / MHz = ppm
    handled = ("they are fitted as free nuisance lines and not counted in the fractions"
               if model.n_q > 1 else "sidebands are not modelled")
    out = []
    for s, name in enumerate(names):
        if np.mean(fractions[:, s]) < 0.02:
            continue
        positions, _, shares = model.line_peaks[s]
        for pos, share in zip(positions + float(np.mean(t[:, s])), shares):
            if share < 0.1:
                continue
            inside = [p for p in (pos - step, pos + step) if x[0] <= p <= x[-1]]
            if inside:
                out.append(
                    f"{name}'s line at {pos:.0f} ppm has first spinning sidebands at "
                    f"{pos - step:.0f} and {pos + step:.0f} ppm (MAS {rate / 1e3:.1f} kHz = "
                    f"{step:.0f} ppm at {larmor:.2f} MHz); "
                    f"{', '.join(f'{p:.0f}' for p in inside)} ppm inside the window "
                    f"{x[0]:.0f}-{x[-1]:.0f} ppm: {handled}; narrow the window to the "
                    "centrebands")
    return out


def fit_options(experiment) -> dict:
    """The keywords of :func:`fit_spectrum` that a manifest's ``spectrum.experiment``
    (:class:`schemas.spectrum.ExperimentSpec`) sets; the caller adds ``larmor_mhz`` (from
    the field) and ``seed`` (a named seed stream), and builds the :class:`PredictedLine` s
    (sigma and convergence verdict per system)."""
    return {"window_ppm": experiment.window_ppm,
            "offset_prior_ppm": tuple(experiment.offset_prior_ppm),
            "offset_range_ppm": tuple(experiment.offset_range_ppm),
            "position_sd_ppm": experiment.position_sd_ppm,
            "unconverged_position_sd_ppm": experiment.unconverged_position_sd_ppm,
            "line_shape": experiment.line_shape,
            "baseline_order": experiment.baseline_order if experiment.baseline else -1,
            "max_extra_fwhm_ppm": experiment.max_extra_fwhm_ppm,
            "mas_rate_hz": experiment.mas_rate_hz,
            "sideband_orders": experiment.sideband_orders,
            "peak_prominence": experiment.peak_prominence,
            "deconvolution": experiment.deconvolution,
            "deconvolution_peaks": experiment.deconvolution_peaks,
            "mcmc_steps": experiment.mcmc_steps,
            "shape_models": tuple(experiment.shape_models)}


# ---------------------------------------------------------------------------------------
# the paper's route: free peaks, assigned by order and spacing


def pseudo_voigt(x, centre, fwhm, eta):
    """Unit-area pseudo-Voigt eta L + (1 - eta) G, both of FWHM `fwhm` (broadcasts)."""
    half = fwhm / 2
    lor = half / np.pi / (half ** 2 + (x - centre) ** 2)
    gau = np.sqrt(4 * np.log(2) / np.pi) / fwhm * np.exp(-4 * np.log(2) * (x - centre) ** 2
                                                          / fwhm ** 2)
    return eta * lor + (1 - eta) * gau


def _free_peaks(x, y, n_peaks, baseline_order, line_shape):
    """Least-squares fit of n pseudo-Voigt peaks (each its own mixing) and a baseline; the
    best of a few starts."""
    basis = _legendre_basis(x, baseline_order)
    K = basis.shape[0]
    n_eta = n_peaks if line_shape == "pseudo-voigt" else 0
    eta_fixed = {"lorentzian": 1.0, "gaussian": 0.0}.get(line_shape, 0.5)
    step = float(np.median(np.diff(x)))
    w_meas = _fwhm_of_tallest(x, y)
    lo_w, hi_w = 2 * step, 2 * (x[-1] - x[0])

    def unpack(p):
        c, w, a = p[:n_peaks], p[n_peaks:2 * n_peaks], p[2 * n_peaks:3 * n_peaks]
        eta = p[3 * n_peaks:3 * n_peaks + n_eta] if n_eta else np.full(n_peaks, eta_fixed)
        return c, w, a, eta, p[3 * n_peaks + n_eta:]

    def residual(p):
        c, w, a, eta, base = unpack(p)
        return a @ pseudo_voigt(x[None], c[:, None], w[:, None], eta[:, None]) \
            + base @ basis - y

    smooth = ndimage.gaussian_filter1d(y, max(PEAK_SMOOTHING * w_meas / step, 0.5))
    idx, props = signal.find_peaks(smooth, prominence=0.02 * smooth.max())
    if idx.size == 0:
        idx, props = np.array([int(np.argmax(smooth))]), {"prominences": np.ones(1)}
    idx = idx[np.argsort(props["prominences"])[::-1]]
    widths = signal.peak_widths(smooth, idx, rel_height=0.5)[0] * step
    starts = []
    base_c, base_w, base_h = list(x[idx]), list(np.maximum(widths, 3 * step)), list(y[idx])
    while len(base_c) < n_peaks:                 # split the largest peak
        k = int(np.argmax(base_h))
        c, w, h = base_c[k], base_w[k], base_h[k]
        base_c[k:k + 1] = [c - w / 4, c + w / 4]
        base_w[k:k + 1] = [w * 0.7, w * 0.7]
        base_h[k:k + 1] = [h / 1.6, h / 1.6]
    starts.append((base_c[:n_peaks], base_w[:n_peaks], base_h[:n_peaks]))
    span = np.linspace(x[idx].min() - w_meas / 2, x[idx].max() + w_meas / 2, n_peaks) \
        if n_peaks > 1 else x[idx[:1]]
    starts.append((list(span), [w_meas] * n_peaks, list(np.interp(span, x, y))))
    lower = np.concatenate([np.full(n_peaks, x[0]), np.full(n_peaks, lo_w), np.zeros(n_peaks),
                            np.zeros(n_eta), np.full(K, -np.inf)])
    upper = np.concatenate([np.full(n_peaks, x[-1]), np.full(n_peaks, hi_w),
                            np.full(n_peaks, np.inf), np.ones(n_eta), np.full(K, np.inf)])
    room = np.where(np.isfinite(upper - lower), 1e-9 * (upper - lower), 0.0)
    best = None
    for c0, w0, h0 in starts:
        for eta0 in (0.5, 0.9):
            w0 = np.clip(np.array(w0, float), lo_w * 1.01, hi_w * 0.99)
            a0 = np.maximum(np.array(h0, float), 1e-3) * w0 * 1.2
            p0 = np.concatenate([np.array(c0, float), w0, a0, np.full(n_eta, eta0),
                                 np.zeros(K)])
            sol = optimize.least_squares(residual, np.clip(p0, lower + room, upper - room),
                                         bounds=(lower, upper), x_scale="jac",
                                         max_nfev=200 * len(p0))
            if best is None or sol.cost < best.cost:
                best = sol
    resid = best.fun
    tau = _autocorr_time(resid)
    dof = max(x.size - best.x.size, 1)
    _, sing, vt = np.linalg.svd(best.jac, full_matrices=False)
    keep = sing > sing[0] * 1e-12
    inv_sq = np.where(keep, 1.0 / np.where(keep, sing, 1.0) ** 2, 0.0)
    cov = (vt.T * inv_sq) @ vt * (resid @ resid / dof) * tau
    err = np.sqrt(np.clip(np.diag(cov), 0, None))
    c, w, a, eta, _ = unpack(best.x)
    order = np.argsort(c)
    area_cov = cov[2 * n_peaks:3 * n_peaks, 2 * n_peaks:3 * n_peaks][np.ix_(order, order)]
    peaks = tuple(DeconvolutionPeak(float(c[i]), float(err[i]), float(w[i]),
                                    float(err[n_peaks + i]), float(a[i]),
                                    float(err[2 * n_peaks + i]), float(eta[i]))
                  for i in order)
    rms = float(np.sqrt(np.mean(resid ** 2)) / np.max(y))
    return peaks, area_cov, rms, bool(best.success), str(best.message)


@_one_blas_thread
def deconvolve(measured: MeasuredSpectrum, predicted: Mapping[str, PredictedLine | tuple], *,
               n_peaks: int | None = None, window_ppm: tuple[float, float] | None = None,
               baseline_order: int = 2, line_shape: str = "pseudo-voigt",
               offset_prior_ppm: tuple[float, float] = OFFSET_PRIOR_PPM,
               position_sd_ppm: float = POSITION_SD_PPM,
               unconverged_position_sd_ppm: float = UNCONVERGED_POSITION_SD_PPM,
               seed: int = 0) -> Deconvolution:
    """The paper's route: N free pseudo-Voigt peaks, assigned to the predicted peaks.

    The measured window is fitted by ``n_peaks`` pseudo-Voigt peaks (positions, FWHMs,
    areas and mixings free; scipy least squares from the measured maxima) and a polynomial
    baseline; errors from the Jacobian, scaled by the residual variance and its
    autocorrelation time. Each system's predicted line gives its peaks (maxima of >= 5 %
    prominence; the line's area split at the troughs). Every injective map of the fitted
    peaks onto the predicted peaks gets the posterior probability
    p(map) ~ N(c - P_map; mu_o 1, sigma_o^2 1 1^T + sigma_sys^2 [same system] +
    diag(position errors^2)): the offset and each system's deviation integrated out (a
    Gaussian integral). The order map (fitted peaks in ascending order onto the predicted
    peaks in ascending order, the paper's assignment) and the most probable map are
    reported with their probabilities, and the Monte Carlo prior probability (20000 draws of
    the deviations, seeded) that the true order of the predicted peaks is the predicted
    order. Fractions: the assigned peaks' areas summed per system, averaged over the maps.
    """
    names = tuple(predicted)
    given = {n: _as_predicted(n, predicted[n]) for n in names}
    pred = []                                         # (system index, ppm, share)
    for s, n in enumerate(names):
        ppm, intensity = _line(n, (given[n].ppm, given[n].intensity))
        pos, _, shares = _line_peaks(ppm, intensity)
        pred += [(s, float(p), float(w)) for p, w in zip(pos, shares) if w >= 0.05]
    sigmas = np.array([given[n].sigma_ppm if given[n].sigma_ppm is not None else (
        position_sd_ppm if given[n].converged else unconverged_position_sd_ppm)
        for n in names], dtype=float)
    n_pred = len(pred)
    n_fit = min(n_peaks or n_pred, n_pred, 6)
    x, y_raw, scale, _ = _window_data(measured, window_ppm, 3 * n_fit + 2 + baseline_order + 1)
    y = y_raw / scale
    peaks, area_cov, rms, ok, message = _free_peaks(x, y, n_fit, baseline_order, line_shape)
    c = np.array([p.ppm for p in peaks])
    c_err = np.array([p.ppm_error for p in peaks])
    areas = np.array([p.area for p in peaks])
    mu_o, sd_o = offset_prior_ppm
    maps, logps = [], []
    for perm in itertools.permutations(range(n_pred), n_fit):
        sys_of = np.array([pred[k][0] for k in perm])
        r = c - np.array([pred[k][1] for k in perm])
        cov = sd_o ** 2 + np.where(sys_of[:, None] == sys_of[None, :],
                                   sigmas[sys_of][:, None] ** 2, 0.0) + np.diag(c_err ** 2)
        sign, logdet = np.linalg.slogdet(cov)
        d = r - mu_o
        logps.append(-0.5 * (d @ np.linalg.solve(cov, d) + logdet))
        maps.append(perm)
    logps = np.array(logps)
    probs = np.exp(logps - special.logsumexp(logps))
    order_pred = sorted(range(n_pred), key=lambda k: pred[k][1])
    # the order map: fitted peaks ascending onto the predicted peaks ascending (when fewer
    # fitted than predicted peaks: the order-preserving map of highest probability)
    order_maps = [k for k, m in enumerate(maps)
                  if all(order_pred.index(m[i]) < order_pred.index(m[i + 1])
                         for i in range(n_fit - 1))]
    k_order = max(order_maps, key=lambda k: logps[k])
    labels = [tuple(names[pred[j][0]] for j in m) for m in maps]
    by_label: dict[tuple, float] = {}
    for label, p in zip(labels, probs):
        by_label[label] = by_label.get(label, 0.0) + float(p)
    best_label = max(by_label, key=by_label.get)
    fr = np.zeros((len(maps), len(names)))
    fr_var = np.zeros((len(maps), len(names)))
    total = areas.sum()
    for k, m in enumerate(maps):
        for s in range(len(names)):
            sel = np.array([pred[j][0] == s for j in m], dtype=float)
            fr[k, s] = sel @ areas / total
            grad = (sel - fr[k, s]) / total                  # d f_s / d a
            fr_var[k, s] = grad @ area_cov @ grad
    mean = probs @ fr
    sd = np.sqrt(np.clip(probs @ (fr_var + fr ** 2) - mean ** 2, 0, None))
    rng = np.random.default_rng(seed)
    deltas = rng.standard_normal((20000, len(names))) * sigmas
    true_pos = np.array([p[1] for p in pred])[None] + deltas[:, [p[0] for p in pred]]
    same = np.all(np.argsort(true_pos, axis=1) == np.argsort([p[1] for p in pred]), axis=1)
    width = float(np.median([p.fwhm_ppm for p in peaks]))
    merged = tuple(
        f"{names[pred[i][0]]} at {pred[i][1]:.0f} ppm and {names[pred[j][0]]} at "
        f"{pred[j][1]:.0f} ppm (predicted) are {abs(pred[i][1] - pred[j][1]):.0f} ppm apart, "
        f"under {MERGED_SEPARATION:g} x the measured lines' FWHM ~{width:.0f} ppm"
        for i, j in itertools.combinations(range(n_pred), 2)
        if pred[i][0] != pred[j][0] and abs(pred[i][1] - pred[j][1]) < MERGED_SEPARATION * width)
    return Deconvolution(
        merged=merged, peaks=peaks, residual_rms_rel=rms,
        assignment=best_label, assignment_probability=by_label[best_label],
        order_assignment=labels[k_order], order_probability=by_label[labels[k_order]],
        order_probability_prior=float(same.mean()),
        fractions=dict(zip(names, mean.tolist())), fraction_errors=dict(zip(names, sd.tolist())),
        success=ok, message=message)
