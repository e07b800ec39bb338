"""The spectrum stage: isotropic exchange line shapes of every analysed system, and the fit of a
measured spectrum as their mixture.

Per system (read through :func:`jobs.layouts.analyze.site_exchange`): the site classes' mean shifts,
populations (time committed to each class) and hop-rate matrix give the Bloch-McConnell
(Anderson-Kubo) line (:func:`jobs.exchange.exchange_spectrum`) at the manifest's field and
intrinsic line width; in fast exchange it is one line at the population-weighted mean, in slow
exchange one line per class. Frames from a file have no dynamics: their lines are static.
``spectrum.temperatures_k`` adds spectra at other temperatures, the shifts scaled by the
Curie-Weiss law from ``shift.temperature_k`` (hop rates held at the md temperature). Isotropic
lines only: no spinning sidebands, no quadrupolar shift.

``spectrum.experiment`` fits a measured spectrum (:func:`jobs.experiment.fit_spectrum`) as a
sum of the systems' predicted lines, each at its prediction + a common offset + its own
deviation, broadened, over a polynomial baseline; the posterior (emcee) gives each phase
fraction with its sd and 95 % interval, which system each measured peak belongs to with what
probability, the paper's free-deconvolution route, and sentences where the spectrum cannot
tell. The prior width of a system's own deviation (:func:`position_sigma_ppm`) comes from its
analysis: the mean's statistical error and the models' systematic error when converged, a wide
prior when not (its verdict is carried into the fit). The fit runs on rank 0 (its sampler is
serial) and every rank receives it.

Every rank computes the same numbers (small, deterministic) and the store writes them once:
``/spectrum/<system>/`` and ``/spectrum/fit/`` (layout: docs/spectrum.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.failure import InputError
from engine.seeds import SeedStreams
from engine.stages import StageInputs, StageResult
from engine.store import RunStore
from jobs.exchange import curie_weiss_scale, exchange_spectrum
from jobs.experiment import PredictedLine, SpectrumFit, fit_options, fit_spectrum, read_spectrum
from jobs.layouts.analyze import SiteExchange, analysed_systems, site_exchange
from jobs.layouts.spectrum import GROUP as SPECTRUM_GROUP, fit_lines, fit_record, put_fit
from schemas.spectrum import LARMOR_MHZ_PER_T, SpectrumSpec


def larmor_mhz(species: str, field_t: float) -> float:
    """Larmor frequency (MHz) of the NMR isotope of `species` at `field_t`."""
    if species not in LARMOR_MHZ_PER_T:
        raise InputError(f"spectrum: no NMR isotope known for {species} (known: "
                         f"{', '.join(sorted(LARMOR_MHZ_PER_T))})")
    return LARMOR_MHZ_PER_T[species][1] * field_t


COUNT_LEVEL = 0.95
"""Confidence of the hop-count bounds (Garwood's exact Poisson interval) that decide whether
the rates are known well enough to name the exchange regime."""


def _count_bounds(n: float) -> tuple[float, float]:
    """Garwood's exact two-sided COUNT_LEVEL interval of a Poisson count `n`."""
    from scipy.stats import chi2

    tail = (1 - COUNT_LEVEL) / 2
    low = 0.0 if n == 0 else float(chi2.ppf(tail, 2 * n)) / 2
    return low, float(chi2.ppf(1 - tail, 2 * n + 2)) / 2


def exchange_regime(site: SiteExchange, larmor: float) -> str:
    """Fast, slow or intermediate exchange: the hop rates between the classes that exchange
    directly, against their line separations (2 pi x shift difference x Larmor frequency).

    Where the hop counts are known (md), every ratio carries its 95 % counting bounds
    (:func:`_count_bounds`), and a regime is named only when the bounds lie inside it:
    "fast" needs every connected pair's lower bound above 10, "slow" every pair's upper bound
    (no hop seen included) below 0.1; otherwise the text says that the rates are too few to
    say which regime applies."""
    from scipy.sparse.csgraph import connected_components

    n = len(site.class_names)
    if n < 2:
        return "one site class: one line"
    exchange = site.rate_per_s + site.rate_per_s.T
    if site.hop_counts is None and not exchange.any():
        return "no hops between site classes: static lines at the site shifts"
    ratios, bounds, hops = [], [], 0
    for a in range(n):
        for b in range(a + 1, n):
            separation = 2 * np.pi * abs(site.shift_ppm[a] - site.shift_ppm[b]) * larmor
            if separation <= 0:
                continue
            if exchange[a, b] > 0:
                ratios.append(exchange[a, b] / separation)
            if site.hop_counts is not None:
                count = float(site.hop_counts[a, b] + site.hop_counts[b, a])
                hops += count
                pa, pb = site.populations[a], site.populations[b]
                ta, tb = site.exposure_s[a], site.exposure_s[b]
                per_count = (1 / pa + 1 / pb) / (ta / pa + tb / pb)  # k_ab + k_ba per hop
                low, high = _count_bounds(count)
                bounds.append((count, low * per_count / separation,
                               high * per_count / separation))
    n_groups, group = connected_components(exchange > 0, directed=False)
    apart = ""
    if n_groups > 1 and exchange.any():
        apart = "; classes that never exchange keep their own lines: " + " | ".join(
            ", ".join(site.class_names[k] for k in np.flatnonzero(group == g))
            for g in range(n_groups))
    if bounds:
        seen = [(lo, hi) for count, lo, hi in bounds if count > 0]
        fast = bool(seen) and n_groups == 1 and min(lo for lo, _ in seen) > 10
        slow = max(hi for _, _, hi in bounds) < 0.1
        shown = seen or [(lo, hi) for _, lo, hi in bounds]
        low, high = min(lo for lo, _ in shown), max(hi for _, hi in shown)
        unseen = sum(count == 0 for count, _, _ in bounds)
        span = (f"rates / line separations {low:.3g} to {high:.3g} at {COUNT_LEVEL:.0%}, from "
                f"{hops:.0f} hops" + (f"; {unseen} pair(s) of classes never exchanged directly"
                                      if unseen and seen else ""))
        if fast:
            return f"fast exchange ({span}): one line at the population-weighted mean"
        if slow:
            return f"slow exchange ({span}): one line per site class" + apart
        if not exchange.any():
            return (f"undetermined: no hop between site classes was seen, and the run is too "
                    f"short to say the exchange is slow ({span}); static lines at the site "
                    "shifts are shown")
        return (f"undetermined: too few hops to say which regime applies ({span}); the line "
                "shown uses the estimated rates" + apart)
    low, high = (min(ratios), max(ratios)) if ratios else (np.inf, np.inf)
    span = f"rates / line separations {low:.3g} to {high:.3g}"
    if low > 10:
        regime = f"fast exchange ({span})" + (
            ": one line at the population-weighted mean" if n_groups == 1 else "")
    elif high < 0.1:
        regime = f"slow exchange ({span}): one line per site class"
    else:
        regime = f"intermediate exchange ({span})"
    return regime + apart


def predicted_line(site: SiteExchange, freq_ppm: np.ndarray, larmor: float, linewidth_hz: float,
                   scale: float = 1.0) -> np.ndarray:
    """The system's line on `freq_ppm` (unit area), its shifts multiplied by `scale`."""
    return exchange_spectrum(freq_ppm, site.shift_ppm * scale, site.populations,
                             site.rate_per_s, larmor, linewidth_hz)


@dataclass(frozen=True)
class SpectrumResult(StageResult):
    """Systems with predicted spectra, and the fitted phase fractions where an experiment was
    given."""

    systems: tuple[str, ...] = ()
    fractions: tuple = ()
    """(system, fraction, sd, (low, high) 95 % interval) of the fit (empty without an
    experiment)."""
    offset_ppm: float | None = None
    separable: bool | None = None
    """Whether every fraction's 95 % interval is narrower than the fit's "wide" limit (None:
    no fit)."""

    def summary(self) -> dict:
        """``spectra`` (count), and per fitted system ``<system>_fraction``, its sd and 95 %
        interval, the offset and whether the fractions are separable."""
        out: dict = {"spectra": len(self.systems)}
        for name, fraction, error, (low, high) in self.fractions:
            out[f"{name}_fraction"] = round(fraction, 4)
            out[f"{name}_fraction_err"] = round(error, 4)
            out[f"{name}_fraction_95"] = [round(low, 4), round(high, 4)]
        if self.offset_ppm is not None:
            out["offset_ppm"] = round(self.offset_ppm, 1)
        if self.separable is not None:
            out["separable"] = self.separable
        return out


def _curie_weiss(shift_constants: dict, t_to_k: float) -> float:
    """Factor that takes a shift at the shift spec's temperature to `t_to_k`."""
    return float(curie_weiss_scale(1.0, shift_constants["temperature_k"], t_to_k,
                                   shift_constants["theta_k"]))




def position_sigma_ppm(site: SiteExchange, systematic_ppm: float) -> float | None:
    """Prior sd (ppm) of a system's own line-position deviation beyond the common offset.

    Converged: the mean shift's statistical error (blocking) and the models' systematic error
    in quadrature; the systematic error is the larger of ``systematic_ppm`` (the manifest's
    ``position_sd_ppm``: the functional's phase-dependent error and the spread between DP and
    shift models, 35 ppm between two model pairs on the same system) and the shift model's own
    mean predicted sigma (NN-NMR ensemble spread or GPR sigma, ~47 ppm per shift; correlated
    over similar environments, so it does not average down). None where the analysis is not
    converged: the fit then uses its wide ``unconverged_position_sd_ppm`` and carries the
    verdict."""
    if not site.converged:
        return None
    systematic = max(systematic_ppm, site.model_sigma_ppm) if np.isfinite(
        site.model_sigma_ppm) else systematic_ppm
    stat = site.mean_stderr_ppm if np.isfinite(site.mean_stderr_ppm) else 0.0
    return float(np.hypot(stat, systematic))


def components_at(systems, temperature_k: float) -> list[str]:
    """The fit's components: one system per base (``md.temperatures_k`` makes several), the
    one whose md temperature is nearest the measurement's; other systems as they are."""
    chosen: dict[str, object] = {}
    for system in systems:
        base = system.base_name
        best = chosen.get(base)
        if best is None or (system.temperature_k is not None and best.temperature_k is not None
                            and abs(system.temperature_k - temperature_k)
                            < abs(best.temperature_k - temperature_k)):
            chosen[base] = system
    return [system.name for system in chosen.values()]


def _fit_experiment(spec: SpectrumSpec, constants: dict, sites: dict, larmors: dict,
                    freq: np.ndarray, seeds: SeedStreams, ctx, store: RunStore,
                    systems=()) -> SpectrumFit:
    """Fit the manifest's measured spectrum with the systems' lines at its temperature (rank 0
    fits, every rank gets the fit) and write it to the store."""
    experiment = spec.experiment
    measured = read_spectrum(experiment.file)
    t_exp = experiment.temperature_k or constants["temperature_k"]
    mixed = experiment.systems or components_at(systems, t_exp) or list(sites)
    if not experiment.systems and len(mixed) < len(sites):
        ctx.log(f"spectrum fit: components {', '.join(mixed)} (of each system's md "
                f"temperatures, the nearest to the measurement's {t_exp:g} K)")
    predicted = {}
    for name in mixed:
        site, scale = sites[name], _curie_weiss(constants, t_exp)
        sigma = position_sigma_ppm(site, experiment.position_sd_ppm)
        predicted[name] = PredictedLine(
            freq, predicted_line(site, freq, larmors[name], spec.linewidth_hz, scale),
            None if sigma is None else sigma * abs(scale), site.converged, site.verdict)
    options = fit_options(experiment)
    if measured.larmor_mhz is None:  # a text file: the manifest's field gives the frequency
        options["larmor_mhz"] = larmors[mixed[0]]
    options["seed"] = seeds.integer("spectrum.fit")

    def fit_measured() -> SpectrumFit:
        try:
            return fit_spectrum(measured, predicted, **options)
        except ValueError as exc:  # a window or range the measured axis does not allow
            raise InputError(f"spectrum.experiment: {exc} (file {measured.source})") from exc

    fit = ctx.on_root(fit_measured)  # the sampler is serial: rank 0 fits, every rank gets it
    put_fit(store, fit, measured, t_exp)
    return fit


def run_spectra(spec: SpectrumSpec, systems, shift, ctx, store: RunStore,
                seeds: SeedStreams | None = None) -> SpectrumResult:
    """Spectra of every analysed system of the manifest, and the fit (collective; `seeds`:
    the run's streams, default those of seed 0)."""
    seeds = seeds if seeds is not None else SeedStreams(0)
    constants = shift.constants()
    names = [s.name for s in systems if s.name in analysed_systems(store)]
    missing = [s.name for s in systems if s.name not in names]
    if missing:
        raise InputError(f"spectrum: the store has no analysis of {', '.join(missing)}; run "
                         "the analyze stage first")
    freq = np.linspace(spec.ppm_range[0], spec.ppm_range[1], spec.points)
    temperatures = [constants["temperature_k"], *spec.temperatures_k]
    sites, larmors = {}, {}
    for system in systems:
        site = site_exchange(store, system.name)
        larmor = larmor_mhz(system.target_species, spec.field_t)
        sites[system.name], larmors[system.name] = site, larmor
        lines = np.stack([predicted_line(site, freq, larmor, spec.linewidth_hz,
                                         _curie_weiss(constants, t)) for t in temperatures])
        group = f"{SPECTRUM_GROUP}/{system.name}"
        store.require_group(group)
        store.put(f"{group}/ppm", freq, unit="ppm")
        store.put(f"{group}/intensity", lines, unit="1/ppm",
                  doc="rows: temperatures_k; each line has unit area")
        store.put(f"{group}/temperatures_k", np.asarray(temperatures), unit="K")
        regime = exchange_regime(site, larmor)
        store.set_attrs(group, larmor_mhz=larmor, field_t=spec.field_t,
                        linewidth_hz=spec.linewidth_hz, class_names=list(site.class_names),
                        populations=site.populations.tolist(), shift_ppm=site.shift_ppm.tolist(),
                        regime=regime, kind=site.kind, converged=site.converged,
                        rates="held at the md temperature" if site.kind == "md" else "none")
        ctx.log(f"spectrum {system.name}: {regime}; at {larmor:.2f} MHz, "
                f"{len(temperatures)} temperature(s)")
    result = SpectrumResult(tuple(sites))
    if spec.experiment is not None:
        fit = _fit_experiment(spec, constants, sites, larmors, freq, seeds, ctx, store,
                              systems)
        for line in fit_lines(fit_record(store)):
            ctx.log(f"spectrum fit: {line}")
        result = SpectrumResult(tuple(sites), tuple(
            (name, float(fit.fractions[name]), float(fit.fraction_errors[name]),
             tuple(float(v) for v in fit.fraction_intervals[name])) for name in fit.systems),
            float(fit.offset_ppm), bool(fit.separable))
    store.flush()
    return result


def run(spec: SpectrumSpec, inputs: StageInputs) -> SpectrumResult:
    """Stage entry: predicted spectra into ``/spectrum`` and the fit of a measured one."""
    with inputs.store.transaction():
        return run_spectra(spec, list(inputs.systems), inputs.shift, inputs.ctx, inputs.store,
                           inputs.seeds)
