"""Exchange-averaged isotropic NMR line shapes of N sites, and their temperature dependence.

A nucleus hopping between sites i (shift ``delta_i``, ppm) with first-order rates ``k_ij``
(1/s, from site i to site j) gives, by the Bloch-McConnell (Anderson-Kubo) equations, the
transverse magnetisation ``dM/dt = (i Omega - R2 I + K) M`` with

- ``K[j, i] = k_ij`` (i != j) and ``K[i, i] = -sum_j k_ij`` (columns sum to zero),
- ``Omega = diag(omega_i)``, ``omega_i = 2 pi (delta_i - f) 1e-6 * larmor_hz`` (rad/s) in the
  frame rotating at the observed frequency ``f`` (ppm),
- ``R2 = pi * linewidth_hz`` (one Lorentzian FWHM ``linewidth_hz`` for every site).

Its Fourier transform at ``f`` is the absorption spectrum
``I(f) = Re[1^T (R2 I - i Omega(f) - K)^-1 p]`` with ``p`` the initial (equilibrium)
populations; slow exchange gives Lorentzians at the ``delta_i`` with areas ``p_i``, fast
exchange one Lorentzian at the mean shift weighted by the *stationary distribution* of ``K``
(:func:`stationary_populations`), whatever ``p`` is. Measured rates satisfy detailed balance
(``p_i k_ij = p_j k_ji``) only approximately; that is not enforced here: the fast-exchange line
sits at the stationary mean, the total area is ``sum(p)`` in every regime.

Temperature: paramagnetic (Fermi-contact) shifts scale as ``1 / (T - Theta)`` (Curie-Weiss;
eq. 1 of Lin et al., Chem. Sci. 2022), :func:`curie_weiss_scale`; hop rates follow Arrhenius'
law, :func:`arrhenius_rates`; :func:`spectra_over_temperature` combines the three.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import constants, linalg

BOLTZMANN_EV_PER_K = constants.k / constants.e
"""Boltzmann's constant (eV/K)."""
MAX_EIGVEC_CONDITION = 1e4
"""Above this condition number of the eigenvectors (a nearly defective exchange matrix, e.g.
two equally populated sites at exact coalescence) the spectrum is solved point by point."""
SOLVE_CHUNK = 2048
"""Frequencies per batched linear solve on the point-by-point path (bounds its memory)."""


def _vector(name: str, value, n: int | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} must have {n} entries (one per site), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr


def _positive(name: str, value) -> float:
    val = float(value)
    if not np.isfinite(val) or val <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return val


def _rate_matrix(name: str, value, n: int | None = None) -> np.ndarray:
    """Off-diagonal rates (1/s) as a float (n, n) array with a zero diagonal."""
    arr = np.array(value, dtype=float)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a square (n_sites, n_sites) array, got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must be ({n}, {n}) (one row per site), got {arr.shape}")
    np.fill_diagonal(arr, 0.0)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite off the diagonal")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0 off the diagonal (rates in 1/s)")
    return arr


def reversible_rates(hop_counts, exposure_s, populations) -> np.ndarray:
    """Maximum-likelihood hop rates (1/s) under detailed balance with given populations.

    A continuous-time Markov chain observed for a time ``T_a`` in each state ``a`` with
    ``N_ab`` jumps from a to b has the log-likelihood
    ``sum_ab N_ab log k_ab - sum_a T_a sum_b k_ab``. Detailed balance with the stationary
    distribution ``pi`` (``pi_a k_ab = pi_b k_ba = f_ab``, a symmetric flux) leaves one
    parameter per pair, and its maximum is in closed form:
    ``f_ab = (N_ab + N_ba) / (T_a / pi_a + T_b / pi_b)``, ``k_ab = f_ab / pi_a``. (This is the
    continuous-time form of the reversible estimator with a fixed stationary distribution that
    Markov-state-model libraries such as deeptime use for transition counts; here the counts
    come with their exposure times.) With ``pi`` proportional to ``T`` it is
    ``k_ab = (N_ab + N_ba) / (2 T_a)``: the hops counted both ways, over the time in a.

    Parameters
    ----------
    hop_counts
        (n, n) hops from class a (row) to class b (column); the diagonal is ignored.
    exposure_s
        (n,) time spent in each class (s).
    populations
        (n,) the stationary distribution to hold (the observed populations), > 0 where a
        class has time.

    Returns
    -------
    numpy.ndarray
        (n, n) rates ``k_ab`` (1/s), zero diagonal; ``populations`` is their stationary
        distribution wherever the classes are connected by hops.
    """
    counts = np.array(hop_counts, dtype=float)
    n = counts.shape[0]
    if counts.shape != (n, n) or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"hop_counts must be a finite (n, n) array of counts >= 0, got "
                         f"{counts.shape}")
    exposure = _vector("exposure_s", exposure_s, n)
    pi = _vector("populations", populations, n)
    if np.any(exposure < 0) or np.any(pi < 0):
        raise ValueError("exposure_s and populations must be >= 0")
    np.fill_diagonal(counts, 0.0)
    both = counts + counts.T
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(pi > 0, exposure / pi, np.inf)
        flux = both / (inverse[:, None] + inverse[None, :])
        rates = np.where(pi[:, None] > 0, flux / pi[:, None], 0.0)
    rates = np.nan_to_num(rates, nan=0.0, posinf=0.0)
    np.fill_diagonal(rates, 0.0)
    return rates


def exchange_matrix(rate_matrix_per_s) -> np.ndarray:
    """The Bloch-McConnell exchange matrix K of hop rates (1/s).

    Parameters
    ----------
    rate_matrix_per_s : (n, n) array_like
        ``[i, j]``: rate of hops from site i to site j (1/s); the diagonal is ignored.

    Returns
    -------
    (n, n) ndarray
        ``K[j, i] = k_ij`` for i != j, ``K[i, i] = -sum_j k_ij``; ``dp/dt = K p``.
    """
    rates = _rate_matrix("rate_matrix_per_s", rate_matrix_per_s)
    return rates.T - np.diag(rates.sum(axis=1))


def stationary_populations(rate_matrix_per_s) -> np.ndarray:
    """The stationary distribution of the hops: ``K pi = 0``, ``sum(pi) = 1``.

    This is what the fast-exchange line's position is weighted by (for rates that obey
    detailed balance with the populations ``p``, ``pi = p / sum(p)``).

    Parameters
    ----------
    rate_matrix_per_s : (n, n) array_like
        ``[i, j]``: rate of hops from site i to site j (1/s); the diagonal is ignored.

    Returns
    -------
    (n,) ndarray
        Stationary populations, non-negative, summing to 1.

    Raises
    ------
    ValueError
        When the distribution is not unique (sites that never exchange with the rest).
    """
    kmat = exchange_matrix(rate_matrix_per_s)
    scale = max(float(np.abs(kmat).max()), 1.0)
    null = linalg.null_space(kmat / scale, rcond=1e-10)
    if null.shape[1] != 1:
        raise ValueError(
            f"rate_matrix_per_s has {null.shape[1]} independent stationary distributions "
            "(groups of sites that never exchange with each other); it must have one")
    vec = np.clip(null[:, 0] / null[:, 0].sum(), 0.0, None)   # clip: round-off only
    return vec / vec.sum()


def exchange_spectrum(freq_ppm, site_shift_ppm, populations, rate_matrix_per_s,
                      larmor_mhz: float, linewidth_hz: float) -> np.ndarray:
    """Bloch-McConnell absorption spectrum of N exchanging sites.

    Parameters
    ----------
    freq_ppm : (n_freq,) array_like
        Frequencies (ppm) to evaluate the spectrum at, any order and spacing.
    site_shift_ppm : (n_sites,) array_like
        Isotropic shift of each site (ppm).
    populations : (n_sites,) array_like
        Initial magnetisation of each site (>= 0; normally the equilibrium populations,
        summing to 1).
    rate_matrix_per_s : (n_sites, n_sites) array_like
        ``[i, j]``: rate of hops from site i to site j (1/s, >= 0); the diagonal is ignored.
    larmor_mhz : float
        Larmor frequency of the observed nucleus (MHz), converts ppm to Hz.
    linewidth_hz : float
        Lorentzian FWHM (Hz) of every site without exchange, ``R2 = pi * linewidth_hz``.

    Returns
    -------
    (n_freq,) ndarray
        Intensity (1/ppm), normalised analytically so that its integral over the whole ppm
        axis equals ``sum(populations)``; on a finite grid the tails outside it are missing.
    """
    freq = _vector("freq_ppm", freq_ppm)
    shifts = _vector("site_shift_ppm", site_shift_ppm)
    n_sites = shifts.size
    pops = _vector("populations", populations, n_sites)
    if np.any(pops < 0):
        raise ValueError(f"populations must be >= 0, got {pops}")
    rates = _rate_matrix("rate_matrix_per_s", rate_matrix_per_s, n_sites)
    larmor = _positive("larmor_mhz", larmor_mhz)
    r2_per_s = np.pi * _positive("linewidth_hz", linewidth_hz)

    rad_per_ppm = 2 * np.pi * larmor           # (rad/s) per ppm: 1e-6 * larmor_mhz * 1e6
    kmat = rates.T - np.diag(rates.sum(axis=1))
    # R2 I - i Omega(f) - K = M + i c f I with M frequency-independent, c = rad_per_ppm
    mmat = r2_per_s * np.eye(n_sites) - 1j * np.diag(rad_per_ppm * shifts) - kmat
    shift_term = 1j * rad_per_ppm * freq
    eigvals, eigvecs = np.linalg.eig(mmat)
    if np.linalg.cond(eigvecs) < MAX_EIGVEC_CONDITION:
        left = np.ones(n_sites) @ eigvecs                      # 1^T V
        right = np.linalg.solve(eigvecs, pops.astype(complex))  # V^-1 p
        resolvent = (left * right)[None, :] / (eigvals[None, :] + shift_term[:, None])
        values = resolvent.sum(axis=1)
    else:
        values = np.empty(freq.size, dtype=complex)
        for start in range(0, freq.size, SOLVE_CHUNK):
            part = shift_term[start:start + SOLVE_CHUNK]
            mats = mmat[None, :, :] + part[:, None, None] * np.eye(n_sites)[None]
            rhs = np.broadcast_to(pops.astype(complex), (part.size, n_sites))[..., None]
            values[start:start + part.size] = np.linalg.solve(mats, rhs)[..., 0].sum(axis=1)
    # integral over omega of Re[...] is pi * sum(p); d omega = rad_per_ppm d ppm
    return values.real * rad_per_ppm / np.pi


def two_site_spectrum(freq_ppm, shift_a_ppm: float, shift_b_ppm: float, p_a: float,
                      k_ab_per_s: float, larmor_mhz: float, linewidth_hz: float) -> np.ndarray:
    """Closed-form two-site exchange line shape (Gutowsky-Holm with T2; Sandstroem 1982).

    Written independently of :func:`exchange_spectrum` (real arithmetic, the classic
    ``P``, ``Q``, ``R`` form) as its reference. ``k_ba = k_ab * p_a / p_b`` (detailed balance).

    Parameters
    ----------
    freq_ppm : (n_freq,) array_like
        Frequencies (ppm).
    shift_a_ppm, shift_b_ppm : float
        Shifts of sites A and B (ppm).
    p_a : float
        Population of A, 0 < p_a < 1; ``p_b = 1 - p_a``.
    k_ab_per_s : float
        Rate of hops A -> B (1/s), > 0.
    larmor_mhz : float
        Larmor frequency (MHz).
    linewidth_hz : float
        Lorentzian FWHM (Hz) of both sites without exchange.

    Returns
    -------
    (n_freq,) ndarray
        Intensity (1/ppm) with unit integral over the whole ppm axis.
    """
    freq = _vector("freq_ppm", freq_ppm)
    if not 0 < float(p_a) < 1:
        raise ValueError(f"p_a must be in (0, 1), got {p_a!r}")
    k_ab = _positive("k_ab_per_s", k_ab_per_s)
    larmor = _positive("larmor_mhz", larmor_mhz)
    inv_t2 = np.pi * _positive("linewidth_hz", linewidth_hz)
    p_a = float(p_a)
    p_b = 1.0 - p_a
    tau = p_b / k_ab                               # tau_a tau_b / (tau_a + tau_b)
    nu_a, nu_b, nu = (larmor * np.asarray(x, dtype=float)
                      for x in (shift_a_ppm, shift_b_ppm, freq))   # Hz
    mean_off = (nu_a + nu_b) / 2 - nu              # Delta nu
    split = nu_a - nu_b                            # delta nu
    big_p = (tau * (inv_t2 ** 2 - 4 * np.pi ** 2 * mean_off ** 2 + np.pi ** 2 * split ** 2)
             + inv_t2)
    big_q = tau * (2 * np.pi * mean_off - np.pi * split * (p_a - p_b))
    big_r = (2 * np.pi * mean_off * (1 + 2 * tau * inv_t2) + np.pi * split * (p_a - p_b))
    shape = (big_p * (1 + tau * inv_t2) + big_q * big_r) / (big_p ** 2 + big_r ** 2)
    # shape has integral pi over omega (rad/s); omega = 2 pi larmor_mhz ppm
    return shape * 2 * larmor


def curie_weiss_scale(shift_ppm, t_from_k: float, t_to_k: float, theta_k: float):
    """Scale paramagnetic shifts from one temperature to another, ``delta ~ 1 / (T - Theta)``.

    Parameters
    ----------
    shift_ppm : float or array_like
        Paramagnetic shifts at ``t_from_k`` (ppm).
    t_from_k, t_to_k : float
        Temperatures (K) the shifts are given at and wanted at; both above ``theta_k``.
    theta_k : float
        Weiss temperature (K; negative for antiferromagnetic coupling).

    Returns
    -------
    float or ndarray
        ``shift_ppm * (t_from_k - theta_k) / (t_to_k - theta_k)``.
    """
    theta = float(theta_k)
    if not np.isfinite(theta):
        raise ValueError(f"theta_k must be finite, got {theta_k!r}")
    for name, temp in (("t_from_k", t_from_k), ("t_to_k", t_to_k)):
        if not np.isfinite(float(temp)) or float(temp) <= theta:
            raise ValueError(f"{name} must be finite and > theta_k = {theta} K (Curie-Weiss "
                             f"holds only above the Weiss temperature), got {temp!r}")
    factor = (float(t_from_k) - theta) / (float(t_to_k) - theta)
    return np.asarray(shift_ppm, dtype=float) * factor


def arrhenius_rates(rates_by_temperature: Mapping[float, np.ndarray],
                    t_to_k: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``ln k = ln A - Ea / (kB T)`` per matrix element and evaluate at ``t_to_k``.

    Parameters
    ----------
    rates_by_temperature : mapping of float to (n, n) array_like
        Rate matrices (1/s, ``[i, j]``: hops from i to j) at two or more distinct temperatures
        (K). The diagonal is ignored.
    t_to_k : float
        Temperature (K) to evaluate the fitted rates at (extrapolation is allowed).

    Returns
    -------
    rates_per_s : (n, n) ndarray
        Fitted rates at ``t_to_k``; zero on the diagonal and for every element that is zero
        at any of the temperatures.
    activation_ev : (n, n) ndarray
        Activation energies (eV) of the fit; NaN where the rate is kept zero.
    """
    if len(rates_by_temperature) < 2:
        raise ValueError("rates_by_temperature needs rates at >= 2 temperatures for an "
                         f"Arrhenius fit, got {len(rates_by_temperature)}")
    t_to = _positive("t_to_k", t_to_k)
    temps = np.array([_positive("rates_by_temperature temperature (K)", t)
                      for t in rates_by_temperature])
    if np.unique(temps).size != temps.size:
        raise ValueError(f"rates_by_temperature has repeated temperatures {temps}")
    first = None
    stack = []
    for temp, rates in rates_by_temperature.items():
        arr = _rate_matrix(f"rates_by_temperature[{temp}]", rates, first)
        first = arr.shape[0]
        stack.append(arr)
    rates_t = np.stack(stack)                                  # (n_t, n, n)
    alive = np.all(rates_t > 0, axis=0)
    log_k = np.log(np.where(alive, rates_t, 1.0)).reshape(temps.size, -1)
    design = np.column_stack([np.ones_like(temps), -1.0 / (BOLTZMANN_EV_PER_K * temps)])
    (log_a, ea), *_ = np.linalg.lstsq(design, log_k, rcond=None)
    shape = rates_t.shape[1:]
    log_a, ea = log_a.reshape(shape), ea.reshape(shape)
    fitted = np.where(alive, np.exp(log_a - ea / (BOLTZMANN_EV_PER_K * t_to)), 0.0)
    return fitted, np.where(alive, ea, np.nan)


def spectra_over_temperature(freq_ppm, site_shift_ppm, populations,
                             rates_by_temperature: Mapping[float, np.ndarray],
                             temperatures_k: Sequence[float], *, shift_temperature_k: float,
                             theta_k: float, larmor_mhz: float,
                             linewidth_hz: float) -> np.ndarray:
    """Exchange spectra at several temperatures: Curie-Weiss shifts, Arrhenius rates.

    Parameters
    ----------
    freq_ppm, site_shift_ppm, populations, larmor_mhz, linewidth_hz
        As in :func:`exchange_spectrum`; the shifts are those at ``shift_temperature_k``, the
        populations are used at every temperature.
    rates_by_temperature : mapping of float to (n_sites, n_sites) array_like
        As in :func:`arrhenius_rates`.
    temperatures_k : sequence of float
        Temperatures (K) to compute spectra at.
    shift_temperature_k, theta_k : float
        Temperature of ``site_shift_ppm`` and Weiss temperature (K).

    Returns
    -------
    (n_temperatures, n_freq) ndarray
        One spectrum per temperature, normalised as in :func:`exchange_spectrum`.
    """
    out = []
    for temp in temperatures_k:
        shifts = curie_weiss_scale(site_shift_ppm, shift_temperature_k, temp, theta_k)
        rates, _ = arrhenius_rates(rates_by_temperature, temp)
        out.append(exchange_spectrum(freq_ppm, shifts, populations, rates, larmor_mhz,
                                     linewidth_hz))
    return np.array(out)
