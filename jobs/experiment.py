"""A measured 1D NMR spectrum, and its fit as a mixture of predicted line shapes.

:func:`read_spectrum` reads Bruker processed data (TopSpin ``<expno>/pdata/<procno>``, via
nmrglue) or a two-column text file (ppm, intensity). :func:`fit_mixture` fits the measured
spectrum as ``sum_s w_s * L_gamma_s * line_s(ppm - offset) + baseline``: every system's
predicted line (normalised to unit area), moved by one common offset (DFT shifts sit ~100-200
ppm above experiment) and broadened by its own extra Lorentzian of FWHM ``gamma_s`` (ppm);
the fractions ``w_s / sum(w)`` are fractions of the signal area (of 23Na nuclei).

Bruker ppm axis: TopSpin draws point i of ``1r`` at ``OFFSET - i * SW_p / SF / SI`` (procs:
``OFFSET`` the ppm of the first point, ``SW_p`` the width in Hz, ``SF`` the reference
frequency in MHz, ``SI`` the size). nmrglue's ``guess_udic`` (and the ``unit_conversion``
made from it) uses ``OFFSET`` only when there is no ``acqus``; with one, it centres the
window on the transmitter ``(SFO1 - SF)``, which is wrong whenever the processed window is not
centred on it (a strip, STSR/STSI), so the axis here is always built from procs.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, optimize, signal

MAX_WORK_POINTS = 1 << 20
"""Most points of the uniform grid the lines are shifted and broadened on (FFT)."""
N_OFFSET_CANDIDATES = 5
"""Cross-correlation maxima whose NNLS fits are compared to start the offset."""
START_WIDTH_FRACTIONS = (0.02, 0.2, 0.5, 1.0)
"""Starting extra widths tried, as fractions of the FWHM of the tallest measured peak."""
PEAK_SMOOTHING = 0.1
"""Peaks are found after a Gaussian smoothing of sigma this fraction of the tallest peak's
FWHM, so that noise spikes are not taken for peaks."""


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


def _bruker_dir(path: str) -> str | None:
    """The pdata directory ``path`` names (itself, or ``path/pdata/1``), None if neither."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("procs", "1r")):
        return path
    if os.path.isdir(os.path.join(path, "pdata", "1")):
        return os.path.join(path, "pdata", "1")
    return None


def _read_bruker(path: str, pdata: str) -> MeasuredSpectrum:
    import nmrglue

    for name in ("procs", "1r"):
        if not os.path.isfile(os.path.join(pdata, name)):
            raise ValueError(f"{path}: Bruker processed data in {pdata} has no '{name}' file")
    try:
        dic, data = nmrglue.bruker.read_pdata(pdata, scale_data=True)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"{path}: cannot read Bruker processed data in {pdata}: {exc}") from exc
    procs = dic.get("procs", {})
    missing = [k for k in ("OFFSET", "SW_p", "SF", "SI") if k not in procs]
    if missing:
        raise ValueError(f"{path}: {pdata}/procs lacks {', '.join(missing)} (needed for ppm)")
    data = np.asarray(data)
    if data.ndim != 1:
        raise ValueError(f"{path}: Bruker data in {pdata} is {data.ndim}D; only 1D is read")
    n_points = int(procs["SI"])
    if data.size != n_points:
        raise ValueError(f"{path}: {pdata}/1r has {data.size} points, procs SI = {n_points}")
    sf_mhz = float(procs["SF"])
    if not sf_mhz > 0:
        raise ValueError(f"{path}: {pdata}/procs SF = {sf_mhz} MHz must be > 0")
    step_ppm = float(procs["SW_p"]) / sf_mhz / n_points
    ppm = float(procs["OFFSET"]) - np.arange(n_points) * step_ppm
    return MeasuredSpectrum(ppm, np.asarray(data.real, dtype=float),
                            f"Bruker pdata {pdata}", sf_mhz)


def _read_text(path: str) -> MeasuredSpectrum:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        table = np.loadtxt(io.StringIO(text.replace(",", " ")), comments="#", ndmin=2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a text file of two numeric columns (ppm, intensity):"
                         f" {exc}") from exc
    if table.shape[1] != 2 or table.shape[0] == 0:
        raise ValueError(f"{path}: needs two numeric columns (ppm, intensity), found "
                         f"{table.shape[1] if table.size else 0} column(s) in "
                         f"{table.shape[0]} row(s)")
    return MeasuredSpectrum(table[:, 0].copy(), table[:, 1].copy(), f"text {path}", None)


def read_spectrum(path: str | os.PathLike) -> MeasuredSpectrum:
    """Read a measured 1D spectrum.

    Parameters
    ----------
    path : str or path-like
        A Bruker processed-data directory (``<expno>/pdata/<procno>``, with ``procs`` and
        ``1r``), an experiment directory (``<expno>``: its ``pdata/1`` is read), or a text
        file of two columns (ppm, intensity), whitespace or comma separated, ``#`` comments.

    Returns
    -------
    MeasuredSpectrum
        In the source's point order (Bruker: descending ppm, point 0 at procs ``OFFSET``).

    Raises
    ------
    ValueError
        Naming the path: missing, a directory without procs/1r, not two numeric columns,
        fewer than 3 points, non-finite values or a ppm axis that is not strictly monotonic.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        pdata = _bruker_dir(path)
        if pdata is None:
            raise ValueError(f"{path}: a directory without Bruker processed data (procs and 1r"
                             ", here or in pdata/1)")
        spectrum = _read_bruker(path, pdata)
    else:
        spectrum = _read_text(path)
    if spectrum.ppm.size < 3:
        raise ValueError(f"{path}: {spectrum.ppm.size} point(s); a spectrum needs >= 3")
    if not (np.all(np.isfinite(spectrum.ppm)) and np.all(np.isfinite(spectrum.intensity))):
        raise ValueError(f"{path}: has non-finite (NaN or inf) ppm or intensity values")
    steps = np.diff(spectrum.ppm)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise ValueError(f"{path}: the ppm axis is not strictly monotonic")
    return spectrum


@dataclass(frozen=True)
class PeakAssignment:
    """A measured peak and the system whose fitted component dominates the model there."""

    ppm: float
    """Peak position (ppm, a measured point)."""
    intensity: float
    """Measured intensity at the peak."""
    system: str
    """The system with the largest fitted component at the peak."""
    fraction: float
    """That system's share of the model (less its baseline) at the peak."""


@dataclass(frozen=True)
class MixtureFit:
    """A measured spectrum fitted as a mixture of predicted lines."""

    systems: tuple[str, ...]
    fractions: dict[str, float]
    """Area fraction ``w_s / sum(w)`` of each system."""
    fraction_errors: dict[str, float]
    """1-sigma errors of the fractions (Jacobian covariance scaled by the residual variance;
    a parameter at its bound is treated as free, so errors there are indicative)."""
    weights: dict[str, float]
    """Fitted area ``w_s`` of each system (measured intensity x ppm)."""
    widths_ppm: dict[str, float]
    """Extra Lorentzian FWHM ``gamma_s`` (ppm) of each system."""
    width_errors_ppm: dict[str, float]
    offset_ppm: float
    """Common shift added to every predicted line (measured = predicted + offset)."""
    offset_error_ppm: float
    baseline: float
    """Constant baseline (measured intensity units; 0 when not fitted)."""
    residual_rms_rel: float
    """RMS of the residual over the largest measured intensity."""
    ppm: np.ndarray = field(repr=False)
    """(n,) measured points fitted (the measured order; inside ``window_ppm``)."""
    model: np.ndarray = field(repr=False)
    """(n,) fitted model at ``ppm``, baseline included."""
    components: dict[str, np.ndarray] = field(repr=False)
    """(n,) each system's fitted contribution at ``ppm`` (without baseline)."""
    peaks: tuple[PeakAssignment, ...]
    """Measured peaks (scipy.signal.find_peaks on the smoothed spectrum), ascending ppm, each
    with the system that dominates the model there."""
    success: bool
    message: str

    def summary(self) -> str:
        """One line per system and the offset, for logs."""
        rows = [f"{name}: {self.fractions[name]:.3f} +- {self.fraction_errors[name]:.3f} "
                f"(extra FWHM {self.widths_ppm[name]:.1f} ppm)" for name in self.systems]
        rows.append(f"offset {self.offset_ppm:.1f} +- {self.offset_error_ppm:.1f} ppm, "
                    f"residual rms {self.residual_rms_rel:.3g} of the peak")
        return "\n".join(rows)


def _line(name: str, line) -> tuple[np.ndarray, np.ndarray]:
    """A predicted line as ascending (ppm, intensity) with unit area."""
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
    return ppm, intensity / area


class _Lines:
    """Predicted lines on a uniform periodic grid: shift and broaden by FFT, sample at x."""

    def __init__(self, lines, x_ppm: np.ndarray, offset_range_ppm: tuple[float, float]):
        steps = [np.median(np.diff(x_ppm))] + [np.median(np.diff(p)) for p, _ in lines]
        lo = min(x_ppm[0], min(p[0] for p, _ in lines) + offset_range_ppm[0])
        hi = max(x_ppm[-1], max(p[-1] for p, _ in lines) + offset_range_ppm[1])
        span = hi - lo
        n_points = 1 << int(np.ceil(np.log2(2 * span / min(steps) + 1)))  # span padded x2
        n_points = min(max(n_points, 256), MAX_WORK_POINTS)
        self.step = 2 * span / n_points
        self.grid = lo - span / 2 + self.step * np.arange(n_points)
        self.x = x_ppm
        self.k = np.fft.rfftfreq(n_points, d=self.step)        # cycles/ppm
        self.spectra = np.array([np.fft.rfft(np.interp(self.grid, p, i, left=0, right=0))
                                 for p, i in lines])

    def on_x(self, values: np.ndarray) -> np.ndarray:
        """Grid values (..., n_grid) sampled at x (..., n_x)."""
        flat = values.reshape(-1, values.shape[-1])
        return np.array([np.interp(self.x, self.grid, v) for v in flat]).reshape(
            values.shape[:-1] + (self.x.size,))

    def shifted(self, offset_ppm: float, widths_ppm: np.ndarray, derivatives: bool = False):
        """Lines moved by offset, broadened by Lorentzians of FWHM widths_ppm, at x.

        Returns (n_sys, n_x), and with derivatives also d/d width and d/d offset.
        """
        phase = (np.exp(-2j * np.pi * self.k * offset_ppm)[None, :]
                 * np.exp(-np.pi * np.outer(widths_ppm, self.k)))
        fts = [self.spectra * phase]
        if derivatives:
            fts += [fts[0] * (-np.pi * self.k), fts[0] * (-2j * np.pi * self.k)]
        n_grid = self.grid.size
        return tuple(self.on_x(np.fft.irfft(ft, n=n_grid)) for ft in fts)


def _tallest_peak_fwhm_ppm(x_ppm: np.ndarray, y: np.ndarray) -> float:
    top = int(np.argmax(y))
    width_points = signal.peak_widths(y, [top], rel_height=0.5)[0][0]
    return max(width_points * float(np.median(np.diff(x_ppm))), float(np.diff(x_ppm).min()))


def _nnls_start(lines: _Lines, y: np.ndarray, offset: float, width: float, baseline: bool):
    comps = lines.shifted(offset, np.full(lines.spectra.shape[0], width))[0]
    columns = [comps] + ([np.ones_like(y), -np.ones_like(y)] if baseline else [])
    coef, norm = optimize.nnls(np.vstack(columns).T, y)
    n_sys = comps.shape[0]
    base = coef[n_sys] - coef[n_sys + 1] if baseline else 0.0
    return norm, coef[:n_sys], base


def _start(lines: _Lines, y: np.ndarray, offset_range_ppm, baseline: bool):
    """Offset, widths, weights, baseline to start from: cross-correlation, then NNLS."""
    y_grid = np.interp(lines.grid, lines.x, y, left=0, right=0)
    y_ft = np.fft.rfft(y_grid)
    n_grid = lines.grid.size
    lags = np.fft.fftfreq(n_grid, d=1.0 / n_grid) * lines.step       # ppm of each shift
    allowed = (lags >= offset_range_ppm[0]) & (lags <= offset_range_ppm[1])
    fwhm = _tallest_peak_fwhm_ppm(lines.x, y)
    best = None
    for width in [fraction * fwhm for fraction in START_WIDTH_FRACTIONS]:
        template = (lines.spectra * np.exp(-np.pi * width * lines.k)[None, :]).sum(axis=0)
        corr = np.where(allowed, np.fft.irfft(y_ft * np.conj(template), n=n_grid), -np.inf)
        maxima = signal.argrelmax(np.concatenate([[-np.inf], corr, [-np.inf]]), mode="wrap")[0]
        maxima = maxima[(maxima >= 1) & (maxima <= n_grid)] - 1
        if maxima.size == 0:
            maxima = np.array([int(np.argmax(corr))])
        for idx in maxima[np.argsort(corr[maxima])[::-1][:N_OFFSET_CANDIDATES]]:
            norm, weights, base = _nnls_start(lines, y, lags[idx], width, baseline)
            if best is None or norm < best[0]:
                best = (norm, lags[idx], width, weights, base)
    return best[1:]


def fit_mixture(measured: MeasuredSpectrum, predicted: Mapping[str, tuple], *,
                offset_range_ppm: tuple[float, float] = (-400.0, 400.0),
                window_ppm: tuple[float, float] | None = None, baseline: bool = True,
                peak_prominence: float = 0.02) -> MixtureFit:
    """Fit a measured spectrum as a mixture of predicted lines.

    Parameters
    ----------
    measured : MeasuredSpectrum
        The spectrum (either ppm order).
    predicted : mapping of str to (ppm, intensity)
        Each system's predicted line on any grid (either order); it is normalised to unit area
        on its grid and taken as zero outside it.
    offset_range_ppm : (float, float)
        Bounds of the common offset (measured = predicted + offset).
    window_ppm : (float, float), optional
        Fit only the measured points in this ppm range (e.g. to leave out sidebands).
    baseline : bool
        Fit a constant baseline.
    peak_prominence : float
        Least prominence of the measured peaks assigned, as a fraction of the largest
        intensity; peaks are found after a Gaussian smoothing (:data:`PEAK_SMOOTHING`).

    Returns
    -------
    MixtureFit
        Fractions +- errors, offset +- error, extra widths, model and assignments.
    """
    if not predicted:
        raise ValueError("predicted must name at least one system")
    names = tuple(predicted)
    lines = [_line(name, predicted[name]) for name in names]
    lo_off, hi_off = (float(v) for v in offset_range_ppm)
    if not (np.isfinite(lo_off) and np.isfinite(hi_off) and lo_off < hi_off):
        raise ValueError(f"offset_range_ppm must be finite (low, high), got {offset_range_ppm}")
    ppm = np.asarray(measured.ppm, dtype=float)
    keep = np.ones(ppm.size, dtype=bool)
    if window_ppm is not None:
        keep = (ppm >= min(window_ppm)) & (ppm <= max(window_ppm))
    n_sys = len(names)
    n_params = 2 * n_sys + 1 + int(baseline)
    if keep.sum() <= n_params + 1:
        raise ValueError(f"window_ppm {window_ppm} leaves {keep.sum()} measured points; the "
                         f"fit of {n_params} parameters needs more")
    order = np.flatnonzero(keep)[np.argsort(ppm[keep])]
    x, y_raw = ppm[order], np.asarray(measured.intensity, dtype=float)[order]
    scale = float(np.max(np.abs(y_raw)))
    if not scale > 0:
        raise ValueError(f"measured spectrum {measured.source} is zero in the fitted range")
    y = y_raw / scale
    grid = _Lines(lines, x, (lo_off, hi_off))

    offset0, width0, weights0, base0 = _start(grid, y, (lo_off, hi_off), baseline)
    margin = 1e-6 * (hi_off - lo_off)
    x0 = np.concatenate([weights0, np.full(n_sys, width0),
                         [np.clip(offset0, lo_off + margin, hi_off - margin)],
                         [base0] if baseline else []])
    lower = np.concatenate([np.zeros(2 * n_sys), [lo_off], [-np.inf] if baseline else []])
    upper = np.concatenate([np.full(2 * n_sys, np.inf), [hi_off], [np.inf] if baseline else []])

    def unpack(p):
        return p[:n_sys], p[n_sys:2 * n_sys], p[2 * n_sys], (p[2 * n_sys + 1] if baseline
                                                              else 0.0)

    def residual(p):
        weights, widths, offset, base = unpack(p)
        return weights @ grid.shifted(offset, widths)[0] + base - y

    def jacobian(p):
        weights, widths, offset, _ = unpack(p)
        comps, d_width, d_offset = grid.shifted(offset, widths, derivatives=True)
        cols = [comps.T, (weights[:, None] * d_width).T, (weights @ d_offset)[:, None]]
        if baseline:
            cols.append(np.ones((x.size, 1)))
        return np.hstack(cols)

    sol = optimize.least_squares(residual, x0, jac=jacobian, bounds=(lower, upper),
                                 x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12)
    weights, widths, offset, base = unpack(sol.x)
    cov = _covariance(jacobian(sol.x), sol.fun)
    total = weights.sum()
    if total > 0:
        fractions = weights / total
        grad = np.eye(n_sys) / total - weights[:, None] / total ** 2   # d f_i / d w_j
        frac_cov = grad @ cov[:n_sys, :n_sys] @ grad.T
        frac_err = np.sqrt(np.clip(np.diag(frac_cov), 0.0, None))
    else:
        fractions = frac_err = np.full(n_sys, np.nan)
    errors = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    comps = weights[:, None] * grid.shifted(offset, widths)[0] * scale
    model = comps.sum(axis=0) + base * scale
    back = np.argsort(np.argsort(order))          # ascending -> measured order (of kept points)
    rms = float(np.sqrt(np.mean(sol.fun ** 2))) * scale
    peaks = _assign_peaks(x, y_raw, comps, names, peak_prominence)
    return MixtureFit(
        systems=names,
        fractions=dict(zip(names, fractions.tolist())),
        fraction_errors=dict(zip(names, frac_err.tolist())),
        weights=dict(zip(names, (weights * scale).tolist())),
        widths_ppm=dict(zip(names, widths.tolist())),
        width_errors_ppm=dict(zip(names, errors[n_sys:2 * n_sys].tolist())),
        offset_ppm=float(offset), offset_error_ppm=float(errors[2 * n_sys]),
        baseline=float(base * scale),
        residual_rms_rel=rms / float(np.max(y_raw)),
        ppm=x[back], model=model[back],
        components={name: comp[back] for name, comp in zip(names, comps)},
        peaks=peaks, success=bool(sol.success and total > 0), message=str(sol.message))


def _covariance(jac: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Parameter covariance, (J^T J)^-1 scaled by the residual variance (pseudo-inverse)."""
    dof = max(residual.size - jac.shape[1], 1)
    _, sing, vt = np.linalg.svd(jac, full_matrices=False)
    keep = sing > sing[0] * np.finfo(float).eps * max(jac.shape)
    inv_sq = np.where(keep, 1.0 / np.where(keep, sing, 1.0) ** 2, 0.0)
    return (vt.T * inv_sq) @ vt * (residual @ residual / dof)


def _assign_peaks(x, y, comps, names, prominence) -> tuple[PeakAssignment, ...]:
    """Peaks of the measured spectrum smoothed by a Gaussian (so noise spikes are no peaks)."""
    sigma_points = PEAK_SMOOTHING * _tallest_peak_fwhm_ppm(x, y) / float(np.median(np.diff(x)))
    smooth = ndimage.gaussian_filter1d(y, sigma_points, mode="nearest")
    idx, _ = signal.find_peaks(smooth, prominence=prominence * float(np.max(smooth)))
    out = []
    for i in idx:
        share = np.clip(comps[:, i], 0.0, None)
        top = int(np.argmax(share))
        out.append(PeakAssignment(float(x[i]), float(y[i]), names[top],
                                  float(share[top] / share.sum()) if share.sum() > 0
                                  else float("nan")))
    return tuple(out)
