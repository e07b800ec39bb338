"""The spectrum stage: static lines of DFT frames, fast exchange of hopping Na, and the fit of
a measured spectrum made from the predicted lines at known fractions."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.layouts.analyze import site_exchange
from jobs.layouts.spectrum import FIT_GROUP, GROUP as SPECTRUM_GROUP
from jobs.stages.analyze import analyze_system
from jobs.stages.infer import put_labelled_frames
from jobs.stages.spectrum import larmor_mhz, run_spectra
from schemas.analyze import AnalyzeSpec
from schemas.shift import ShiftSpec
from schemas.spectrum import ExperimentSpec, SpectrumSpec
from schemas.system import SystemSpec

SYSTEMS = [SystemSpec(name=n, structure=f"builtin:p2-nmmo-{n}") for n in ("p63mcm", "p6322")]


@pytest.fixture(scope="module")
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


@pytest.fixture(scope="module")
def dft_store(tmp_path_factory, shared_data, ctx):
    """The shared DFT frames as file sources, analysed (static: no dynamics)."""
    path = tmp_path_factory.mktemp("spectrum") / "dft.h5"
    with RunStore(path, ctx, mode="w") as store:
        for system in SYSTEMS:
            frames = ase.io.read(shared_data / f"{system.name}-dev.extxyz", ":")
            put_labelled_frames(frames, system, ShiftSpec(), ctx, store)
            analyze_system(AnalyzeSpec(), system, ctx, store)
    return path


def _peak_area(ppm, line, centre, half_width):
    inside = np.abs(ppm - centre) < half_width
    return np.trapezoid(line[inside], ppm[inside])


def test_static_lines_sit_at_the_site_shifts_with_the_populations_as_areas(dft_store, ctx):
    spec = SpectrumSpec(linewidth_hz=500.0, points=40001, temperatures_k=[280.0])
    with RunStore(dft_store, ctx) as store:
        result = run_spectra(spec, SYSTEMS, ShiftSpec(), ctx, store)
        site = site_exchange(store, "p63mcm")
        ppm = store.read(f"{SPECTRUM_GROUP}/p63mcm/ppm")
        lines = store.read(f"{SPECTRUM_GROUP}/p63mcm/intensity")
        attrs = store.attrs(f"{SPECTRUM_GROUP}/p63mcm")
    assert result.systems == ("p63mcm", "p6322") and lines.shape == (2, 40001)
    assert site.kind == "file" and not site.rate_per_s.any()
    assert "static lines" in attrs["regime"]
    # 500 Hz at 131.8 MHz is 3.8 ppm FWHM: each class's line holds its population
    assert attrs["larmor_mhz"] == pytest.approx(11.262 * 11.7)
    assert site.populations.sum() == pytest.approx(1.0)
    for shift, population in zip(site.shift_ppm, site.populations):
        assert _peak_area(ppm, lines[0], shift, 150.0) == pytest.approx(population, rel=0.03,
                                                                        abs=2e-3)
        peak = ppm[np.argmax(np.where(np.abs(ppm - shift) < 20, lines[0], 0))]
        assert abs(peak - shift) < 0.2
    # at 280 K the Curie-Weiss law moves every line by (320 + 14.8) / (280 + 14.8)
    scale = (320 + 14.8) / (280 + 14.8)
    main = int(np.argmax(site.populations))
    peak = ppm[np.argmax(np.where(np.abs(ppm - site.shift_ppm[main] * scale) < 20, lines[1], 0))]
    assert abs(peak - site.shift_ppm[main] * scale) < 0.2


def test_fast_hops_give_one_line_at_the_population_weighted_mean(tmp_path, ctx, shared_data):
    """Synthetic md: Na random walks (hops every few ps between the site classes)."""
    frame0 = ase.io.read(shared_data / "p63mcm-dev.extxyz", 0)
    na = np.flatnonzero(frame0.numbers == 11)
    rng = np.random.default_rng(3)
    n_frames = 600
    steps = rng.normal(0.0, 0.3, size=(n_frames, len(na), 3))
    steps[..., 2] = 0.0
    positions = (frame0.positions[na][None] + np.cumsum(steps, axis=0)).astype(np.float32)
    system = SystemSpec(name="walk", structure="builtin:p2-nmmo-p63mcm")
    with RunStore(tmp_path / "md.h5", ctx, mode="w") as store:
        group = "/infer/walk"
        store.put(f"{group}/shift_ppm", rng.normal(1500, 100, (n_frames, len(na))).astype(
            np.float32))
        store.put(f"{group}/centre_positions_a", positions)
        store.put(f"{group}/cell_a", np.broadcast_to(frame0.cell[:], (n_frames, 3, 3)))
        store.put(f"{group}/time_fs", np.arange(n_frames) * 50.0)
        store.put(f"{group}/replica", np.zeros(n_frames, np.int32))
        store.put(f"{group}/frame0_numbers", frame0.numbers)
        store.put(f"{group}/frame0_positions_a", frame0.positions)
        analyze_system(AnalyzeSpec(), system, ctx, store)
        run_spectra(SpectrumSpec(points=20001), [system], ShiftSpec(), ctx, store)
        site = site_exchange(store, "walk")
        ppm = store.read(f"{SPECTRUM_GROUP}/walk/ppm")
        line = store.read(f"{SPECTRUM_GROUP}/walk/intensity")[0]
        regime = store.attrs(f"{SPECTRUM_GROUP}/walk")["regime"]
        dynamic_mean = float(store.attrs("/analyze/walk")["mean_shift_ppm"])
    assert site.kind == "md" and site.rate_per_s.max() > 1e11  # hops every few ps
    assert regime.startswith("fast exchange")
    weighted = float(np.dot(site.populations, site.shift_ppm))
    assert abs(ppm[np.argmax(line)] - weighted) < 0.5
    # every sample counts (the unassigned folded in): the line sits at analyze's dynamic mean
    assert site.unassigned_fraction > 0
    assert abs(ppm[np.argmax(line)] - dynamic_mean) < 1.0
    assert site.populations.sum() == pytest.approx(1.0)
    # the rates are reversible with the populations: detailed balance holds to rounding
    flux = site.populations[:, None] * site.rate_per_s
    assert np.allclose(flux, flux.T, rtol=1e-9, atol=0)
    assert np.trapezoid(line, ppm) == pytest.approx(1.0, abs=0.02)


def _measured(ppm, lines, fractions, offset_ppm, rng):
    """A 'measured' spectrum: the predicted lines mixed, moved by the offset, with noise."""
    total = sum(f * np.interp(ppm - offset_ppm, grid, line) for f, (grid, line) in
                zip(fractions, lines))
    return total + rng.normal(0, 0.01 * total.max(), len(ppm))


@pytest.mark.parametrize("fractions", [(0.82, 0.18), (0.5, 0.5)])
def test_the_fit_recovers_known_fractions_and_offset(dft_store, ctx, tmp_path, fractions,
                                                     capsys):
    spec = SpectrumSpec(linewidth_hz=30000.0, points=4001)
    with RunStore(dft_store, ctx) as store:
        run_spectra(spec, SYSTEMS, ShiftSpec(), ctx, store)
        lines = [(store.read(f"{SPECTRUM_GROUP}/{n}/ppm"),
                  store.read(f"{SPECTRUM_GROUP}/{n}/intensity")[0]) for n in ("p6322", "p63mcm")]
    ppm = np.linspace(3000, -300, 3000)  # descending, as spectrometers write it
    intensity = _measured(ppm, lines, fractions, -150.0, np.random.default_rng(7))
    measured = tmp_path / "measured.txt"
    np.savetxt(measured, np.column_stack([ppm, intensity]), header="ppm intensity")
    experiment = ExperimentSpec(file=measured, systems=["p6322", "p63mcm"])
    with RunStore(dft_store, ctx) as store:
        result = run_spectra(spec.model_copy(update={"experiment": experiment}), SYSTEMS,
                             ShiftSpec(), ctx, store)
        fit = store.attrs(FIT_GROUP)
        model = store.read(f"{FIT_GROUP}/model")
    got = {name: f for name, f, _, _ in result.fractions}
    assert got["p6322"] == pytest.approx(fractions[0], abs=0.02)
    assert got["p63mcm"] == pytest.approx(fractions[1], abs=0.02)
    # the truth lies inside each 95 % interval, and the interval is not a point
    for (name, _, sd, (low, high)), truth in zip(result.fractions, fractions):
        assert low <= truth <= high and 0 < sd < 0.1 and high - low > 0.005
    assert result.offset_ppm == pytest.approx(-150.0, abs=15.0)
    assert fit["systems"] == ["p6322", "p63mcm"] and len(model) == len(ppm)
    assert fit["residual_rms_rel"] < 0.03 and fit["peaks"] and fit["separable"]
    # the analyses are converged: each line's prior sd is its stat error and the systematic
    # error in quadrature (>= the manifest's 40 ppm), and no verdict is carried as a note
    assert all(sd >= 40.0 for sd in fit["position_sd_ppm"]) and all(fit["converged"])
    assert set(fit["peaks"][0]["probabilities"]) == {"p6322", "p63mcm"}
    # the report shows the fitted fractions, the overlay and the peak assignments
    from jobs.stages.report import ReportData, render_report
    from schemas.report import ReportSpec

    with RunStore(dft_store, ctx, mode="r") as store:
        summary = render_report(ReportData(store), tmp_path / "report", ReportSpec(dpi=50))
    text = summary.read_text()
    low, high = dict((n, i) for n, _, _, i in result.fractions)["p6322"]
    assert f"| p6322 | {got['p6322']:.3f} |" in text and "### Fit of" in text
    assert f"| {low:.3f}-{high:.3f} |" in text
    assert "| measured peak (ppm) | assigned to | p(p6322) | p(p63mcm) |" in text
    assert "nan" not in text.lower()
    assert (tmp_path / "report" / "spectrum_fit.png").stat().st_size > 3000
    # dynshift show prints the fractions with their intervals and the peaks' probabilities
    from engine.show import show_store

    assert show_store(dft_store) == 0
    shown = capsys.readouterr().out
    assert f"p6322: fraction {got['p6322']:.3f} +- " in shown
    assert f"(95% {low:.3f}-{high:.3f})" in shown
    assert "probability of each assignment: " in shown


def test_an_unanalysed_system_and_an_unknown_isotope_are_refused(dft_store, ctx):
    with RunStore(dft_store, ctx) as store:
        with pytest.raises(InputError, match="no analysis of nowhere"):
            run_spectra(SpectrumSpec(), [SystemSpec(name="nowhere", structure="x")],
                        ShiftSpec(), ctx, store)
    with pytest.raises(InputError, match="no NMR isotope known for Mn"):
        larmor_mhz("Mn", 9.4)


def _site(shifts, rates):
    from jobs.layouts.analyze import SiteExchange

    n = len(shifts)
    return SiteExchange("s", tuple(f"c{k}" for k in range(n)), np.asarray(shifts, float),
                        np.full(n, 1.0 / n), np.asarray(rates, float), "md", True, "", None)


def test_the_regime_looks_at_classes_that_exchange_directly():
    from jobs.stages.spectrum import exchange_regime

    # 1000 ppm at 100 MHz: 6.3e5 rad/s; c0 <-> c1 and c0 <-> c2 fast, c1 and c2 only via c0
    fast = [[0, 1e9, 1e9], [1e9, 0, 0], [1e9, 0, 0]]
    assert exchange_regime(_site([0, 1000, 2000], fast), 100.0).startswith(
        "fast exchange (rates / line separations 1.59e+03 to 3.18e+03): one line")
    slow = [[0, 1e3, 0], [1e3, 0, 0], [0, 0, 0]]
    text = exchange_regime(_site([0, 1000, 2000], slow), 100.0)
    assert text.startswith("slow exchange") and "never exchange" in text and "c2" in text
    assert exchange_regime(_site([0, 1000], [[0, 3e5], [3e5, 0]]), 100.0).startswith(
        "intermediate exchange")
    assert "static lines" in exchange_regime(_site([0, 1000], [[0, 0], [0, 0]]), 100.0)


def test_reversible_rates_maximise_the_likelihood_under_detailed_balance():
    """The closed form against a numerical maximum of the CTMC likelihood with pi fixed."""
    from scipy.optimize import minimize

    from jobs.exchange import reversible_rates, stationary_populations

    counts = np.array([[0, 12, 3], [9, 0, 5], [1, 7, 0]], float)
    exposure = np.array([4.0, 3.0, 2.0])
    pi = np.array([0.5, 0.3, 0.2])
    rates = reversible_rates(counts, exposure, pi)
    assert np.allclose(stationary_populations(rates), pi)
    pairs = [(0, 1), (0, 2), (1, 2)]

    def minus_log_likelihood(log_flux):
        k = np.zeros((3, 3))
        for (a, b), f in zip(pairs, np.exp(log_flux)):
            k[a, b], k[b, a] = f / pi[a], f / pi[b]
        off = ~np.eye(3, dtype=bool)
        return -(np.sum(counts[off] * np.log(k[off])) - np.sum(exposure * k.sum(axis=1)))

    best = minimize(minus_log_likelihood, np.zeros(3), method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    flux = [pi[a] * rates[a, b] for a, b in pairs]
    assert np.allclose(flux, np.exp(best), rtol=1e-4)


def test_few_hops_leave_the_regime_undetermined():
    from jobs.layouts.analyze import SiteExchange
    from jobs.stages.spectrum import exchange_regime

    from jobs.exchange import reversible_rates

    shifts, pops = np.array([1600.0, 1700.0]), np.array([0.6, 0.4])
    ps, us = 1e-12, 1e-6
    # 100 ppm at 132 MHz: 8.3e4 rad/s. Two hops in 10 ps of md: fast beyond any doubt; none in
    # 10 ps: nothing says the exchange is slow; 4 hops in 10 us: bounds straddle the regimes
    for hops, span_s, words in ((2, 10 * ps, "fast exchange"),
                                (0, 10 * ps, "undetermined: no hop between site classes"),
                                (4, 10 * us, "undetermined: too few hops")):
        counts = np.array([[0, hops / 2], [hops / 2, 0]])
        exposure = pops * span_s
        site = SiteExchange("s", ("a", "b"), shifts, pops,
                            reversible_rates(counts, exposure, pops), "md", False, "", None,
                            counts, exposure)
        text = exchange_regime(site, 132.0)
        assert text.startswith(words), (hops, text)
