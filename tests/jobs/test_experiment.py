"""Reading measured spectra (Bruker pdata, text) and fitting them as mixtures of predicted lines.

The measured spectra are built here in closed form, independently of the fit's FFT code:
pseudo-Voigt lines (not the fit's "predicted Lorentzian convolved with a pseudo-Voigt"
model, so the fit never sees its own model), correlated noise (a Gaussian-smoothed white
noise, as after apodization), a quadratic baseline, and predicted positions deliberately off
from the truth: the predictions' spacing is 125 ppm, the measured one 113 ppm, on top of a
common offset of -150 ppm. One spectrum per row of the table in issue 25 that the former fit
got wrong (0.65 -> 0.691 +- 0.004; 0.80 -> 0.831 +- 0.007; single phase -> the wrong phase;
an overlapped 0.5 / 0.5 pair -> 0.000 / 1.000 +- 132), plus bad files, MASR and sidebands.
"""
import os

import nmrglue
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from engine.failure import InputError
from jobs.experiment import (MeasuredSpectrum, PredictedLine, SpectrumFileError, deconvolve,
                             fit_options, fit_spectrum, read_spectrum)

SF_MHZ = 105.8                      # 23Na at 9.4 T
SI = 8192
SW_HZ = 433000.0                    # ~0.5 ppm per point
OFFSET_PPM = 3300.0
AXIS_PPM = OFFSET_PPM - np.arange(SI) * SW_HZ / SF_MHZ / SI      # TopSpin's axis, descending
PRED_GRID_PPM = np.linspace(-500.0, 3500.0, 8192)                # the stage's default axis
WINDOW = (1150.0, 2050.0)
OFFSET_TRUE = -150.0
PREDICTED = {  # (centre ppm, FWHM ppm, share) of each predicted peak (Lorentzian)
    "P6_322": ((1755.0, 60.0, 1.0),),
    "P6_3/mcm": ((1630.0, 90.0, 0.8), (1560.0, 50.0, 0.2)),   # slow exchange: a shoulder
}
DEVIATION_TRUE = {"P6_322": 5.0, "P6_3/mcm": 17.0}     # measured spacing 125 - 12 = 113 ppm
EXTRA_FWHM = {"P6_322": 30.0, "P6_3/mcm": 45.0}


def lorentzian(x, centre, fwhm):
    half = fwhm / 2
    return half / np.pi / (half ** 2 + (x - centre) ** 2)


def pseudo_voigt(x, centre, fwhm, eta):
    gauss = np.sqrt(4 * np.log(2) / np.pi) / fwhm * np.exp(
        -4 * np.log(2) * ((x - centre) / fwhm) ** 2)
    return eta * lorentzian(x, centre, fwhm) + (1 - eta) * gauss


def predicted(peaks=PREDICTED, **line):
    return {name: PredictedLine(PRED_GRID_PPM, sum(share * lorentzian(PRED_GRID_PPM, c, w)
                                                   for c, w, share in p), **line)
            for name, p in peaks.items()}


def measured_intensity(fractions, seed=0, snr=150.0, eta=0.6, peaks=PREDICTED,
                       deviations=DEVIATION_TRUE, extra=EXTRA_FWHM):
    """Pseudo-Voigt lines at prediction + offset + deviation, FWHM prediction + extra."""
    rng = np.random.default_rng(seed)
    y = np.zeros_like(AXIS_PPM)
    for name, fraction in fractions.items():
        for centre, fwhm, share in peaks[name]:
            y += fraction * share * pseudo_voigt(
                AXIS_PPM, centre + OFFSET_TRUE + deviations[name], fwhm + extra[name], eta)
    top = y.max()
    u = (AXIS_PPM - 1600.0) / 450.0
    y += top * (0.02 + 0.01 * u - 0.015 * u ** 2)                       # a quadratic baseline
    noise = gaussian_filter1d(rng.standard_normal(y.size), 1.5)          # apodized: correlated
    return 1e6 * (y + noise / noise.std() * top / snr)


def measured(fractions, **kwargs):
    return MeasuredSpectrum(AXIS_PPM, measured_intensity(fractions, **kwargs), "synthetic",
                            SF_MHZ)


def write_bruker(expno_dir, intensity, acqus=None):
    """Write 1D processed data as TopSpin lays it out: <expno>/pdata/1/{procs,1r}."""
    pdata = os.path.join(expno_dir, "pdata", "1")
    os.makedirs(pdata)
    procs = {"_coreheader": ["##TITLE= dynshift test", "##JCAMPDX= 5.0"], "_comments": [],
             "SI": SI, "XDIM": SI, "OFFSET": OFFSET_PPM, "SW_p": SW_HZ, "SF": SF_MHZ,
             "NC_proc": 0, "BYTORDP": 0, "DTYPP": 0, "AXNUC": "23Na", "STSR": 0, "STSI": 0}
    nmrglue.bruker.write_pdata(pdata, {"procs": procs}, np.array(intensity, dtype=float),
                               write_procs=True)
    if acqus is not None:
        nmrglue.bruker.write_jcamp({"_coreheader": ["##TITLE= dynshift test"],
                                    "_comments": [], **acqus},
                                   os.path.join(expno_dir, "acqus"))
    return pdata


def assert_inside(fit, truth: dict):
    for name, value in truth.items():
        low, high = fit.fraction_intervals[name]
        assert low <= value <= high, (name, value, fit.summary())


# ---------------------------------------------------------------------------------------
# the rows of the table


@pytest.fixture(scope="module")
def two_phase_065(tmp_path_factory):
    """Truth 0.65 / 0.35, written as Bruker pdata with an acqus (MAS 20 kHz), read back."""
    expno = tmp_path_factory.mktemp("bruker") / "10"
    intensity = measured_intensity({"P6_322": 0.65, "P6_3/mcm": 0.35})
    write_bruker(expno, intensity, {"MASR": 20000.0, "SFO1": SF_MHZ, "NUC1": "<23Na>"})
    spectrum = read_spectrum(expno)
    return spectrum, fit_spectrum(spectrum, predicted(), window_ppm=WINDOW, seed=1)


def test_two_phase_065_truth_inside_an_honest_interval(two_phase_065):
    spectrum, fit = two_phase_065
    assert spectrum.mas_rate_hz == 20000.0 and spectrum.larmor_mhz == SF_MHZ
    assert_inside(fit, {"P6_322": 0.65, "P6_3/mcm": 0.35})
    assert sum(fit.fractions.values()) == pytest.approx(1.0)
    low, high = fit.fraction_intervals["P6_322"]
    assert 0.005 < high - low < 0.15                     # neither overconfident nor empty
    assert fit.separable and fit.success
    # positions: the predictions were off by +5 / +17 ppm beyond the offset
    for name, (centre, _, _) in ((n, p[0]) for n, p in PREDICTED.items()):
        true_ppm = centre + OFFSET_TRUE + DEVIATION_TRUE[name]
        assert abs(fit.positions_ppm[name] - true_ppm) < 4 * fit.position_errors_ppm[name] + 3
    assert fit.offset_interval_ppm[0] < OFFSET_TRUE < fit.offset_interval_ppm[1]
    assert fit.n_effective < 0.8 * fit.n_points          # correlated noise was noticed
    # MAS 20 kHz = 189 ppm at 105.8 MHz: the first sidebands fall inside the window
    assert any("spinning sidebands" in w and "P6_322" in w for w in fit.warnings)
    by_system = {p.system: p for p in fit.peaks}
    assert by_system["P6_322"].probabilities["P6_322"] > 0.95
    assert "P6_322: 0.6" in fit.summary() and "offset" in fit.summary()


def test_two_phase_065_deconvolution_the_papers_route(two_phase_065):
    _, fit = two_phase_065
    dec = fit.deconvolution
    assert dec is not None and dec.success
    # P6_3/mcm's shoulder is no maximum of its own: 2 predicted peaks, 2 fitted, assigned
    # by order and spacing (the predictions' order holds under their priors: ~0.99)
    assert dec.assignment == ("P6_3/mcm", "P6_322") and len(dec.peaks) == 2
    assert dec.order_assignment == dec.assignment and dec.order_probability > 0.9
    assert 0.9 < dec.order_probability_prior <= 1.0
    # the shoulder's area goes to the broad peak: a free fit is close, not exact
    assert abs(dec.fractions["P6_322"] - 0.65) < 0.08


def test_two_phase_080_with_a_slow_exchange_shoulder():
    fit = fit_spectrum(measured({"P6_322": 0.8, "P6_3/mcm": 0.2}, seed=2, snr=80, eta=0.3),
                       predicted(), window_ppm=WINDOW, seed=2, deconvolution=False)
    assert_inside(fit, {"P6_322": 0.8, "P6_3/mcm": 0.2})
    low, high = fit.fraction_intervals["P6_322"]
    assert high - low < 0.2 and fit.separable


def test_single_phase_gets_the_right_assignment():
    """Only P6_322 is there; the offset could map P6_3/mcm's line onto its peak instead
    (offset -20 ppm: 2.5 sd from the prior's -160), which the old fit did."""
    fit = fit_spectrum(measured({"P6_322": 1.0}, seed=3), predicted(), window_ppm=WINDOW,
                       seed=3, deconvolution=False)
    assert_inside(fit, {"P6_322": 1.0, "P6_3/mcm": 0.0})
    assert fit.fraction_intervals["P6_3/mcm"][1] < 0.15
    assert len(fit.peaks) == 1
    peak = fit.peaks[0]
    assert peak.system == "P6_322" and peak.probabilities["P6_322"] > 0.9
    assert any("one measured peak" in s and "P6_322" in s for s in fit.statements)


SIMPLE = {"P6_322": ((1755.0, 60.0, 1.0),), "P6_3/mcm": ((1630.0, 60.0, 1.0),)}


def test_single_phase_with_unconverged_predictions_says_either_with_probabilities():
    """Not-converged predictions get a 150 ppm position prior, and both predicted lines are
    Lorentzians of one width, so either one may be the measured peak: only the priors
    tell (P6_322 needs offset + deviation -145 ppm, P6_3/mcm -20 ppm)."""
    lines = predicted(SIMPLE, converged=False, verdict="not converged: 3 Na never hopped")
    fit = fit_spectrum(measured({"P6_322": 1.0}, seed=3, peaks=SIMPLE), lines,
                       window_ppm=WINDOW, seed=3, deconvolution=False)
    assert fit.position_sd_ppm == {"P6_322": 150.0, "P6_3/mcm": 150.0}
    assert fit.converged == {"P6_322": False, "P6_3/mcm": False}
    assert any("not converged (not converged: 3 Na never hopped)" in s
               for s in fit.statements)
    peak = fit.peaks[0]
    assert min(peak.probabilities.values()) > 0.02               # both assignments possible
    assert sum(peak.probabilities.values()) == pytest.approx(1.0)
    assert any("either phase could explain it" in s for s in fit.statements)
    assert not fit.separable
    assert_inside(fit, {"P6_322": 1.0, "P6_3/mcm": 0.0})


def test_strongly_overlapped_pair_gets_a_wide_interval_and_a_sentence():
    peaks = {"P6_322": ((1700.0, 100.0, 1.0),), "P6_3/mcm": ((1690.0, 110.0, 1.0),)}
    deviations = {"P6_322": 5.0, "P6_3/mcm": 3.0}
    data = measured({"P6_322": 0.5, "P6_3/mcm": 0.5}, seed=4, peaks=peaks,
                    deviations=deviations, extra={"P6_322": 40.0, "P6_3/mcm": 40.0})
    fit = fit_spectrum(data, predicted(peaks), window_ppm=(1100.0, 2000.0), seed=4,
                       deconvolution=False)
    assert_inside(fit, {"P6_322": 0.5, "P6_3/mcm": 0.5})
    low, high = fit.fraction_intervals["P6_322"]
    assert high - low > 0.5 and not fit.separable
    assert 0.1 < fit.fraction_errors["P6_322"] < 0.5             # wide, and finite
    assert any("not separable" in s and "overlap" in s for s in fit.statements)


def test_three_systems_search_by_coordinate_sweeps():
    """Lorentzian truths (eta = 1: a Lorentzian convolved with a Lorentzian is one), which
    the model represents exactly; with a Gaussian share the lines' tails beyond the window,
    which the fit extrapolates with the predicted shape, bias the fractions by ~0.01-0.02
    (docs/spectrum.md)."""
    peaks = {"P6_322": ((1755.0, 60.0, 1.0),), "P6_3/mcm": ((1630.0, 90.0, 1.0),),
             "P2": ((1450.0, 70.0, 1.0),)}
    truth = {"P6_322": 0.5, "P6_3/mcm": 0.3, "P2": 0.2}
    data = measured(truth, seed=9, peaks=peaks, eta=1.0,
                    deviations={"P6_322": 5.0, "P6_3/mcm": 17.0, "P2": -10.0},
                    extra={"P6_322": 30.0, "P6_3/mcm": 45.0, "P2": 20.0})
    fit = fit_spectrum(data, predicted(peaks), window_ppm=(1000.0, 2000.0), seed=9,
                       deconvolution=False)
    # within 3 sd (a 95 % interval misses one case in 20 by design: the coverage benchmark
    # measures that rate; here three fractions are checked at once)
    for name, value in truth.items():
        assert abs(fit.fractions[name] - value) < 3 * fit.fraction_errors[name], fit.summary()
    assert fit.separable and all(hi - lo < 0.1 for lo, hi in fit.fraction_intervals.values())


# ---------------------------------------------------------------------------------------
# sidebands, seeds, the former entry point


def one_line_spectrum(seed=0):
    x = np.linspace(2100.0, 1100.0, 1000)
    y = pseudo_voigt(x, 1600.0, 80.0, 0.5)
    y = y + np.random.default_rng(seed).normal(0, 0.01 * y.max(), x.size)
    line = {"P2": PredictedLine(PRED_GRID_PPM, lorentzian(PRED_GRID_PPM, 1760.0, 50.0))}
    return MeasuredSpectrum(x, y, "one line"), line


def test_the_same_seed_gives_the_same_numbers_and_a_single_system_is_fraction_one():
    data, line = one_line_spectrum()
    first = fit_spectrum(data, line, seed=7, mcmc_steps=200, deconvolution=False)
    again = fit_spectrum(data, line, seed=7, mcmc_steps=200, deconvolution=False)
    assert first.fractions == again.fractions == {"P2": 1.0}
    assert first.positions_ppm == again.positions_ppm
    assert first.positions_ppm["P2"] == pytest.approx(1600.0, abs=2.0)
    assert first.widths_ppm == again.widths_ppm and first.offset_ppm == again.offset_ppm
    assert first.warnings == () or all("sideband" not in w for w in first.warnings)


def test_sideband_warning_names_the_line_and_the_window():
    data, line = one_line_spectrum()
    fit = fit_spectrum(data, line, mas_rate_hz=25000.0, larmor_mhz=SF_MHZ, seed=1,
                       mcmc_steps=200, deconvolution=False)
    text = " ".join(fit.warnings)
    # 25 kHz / 105.8 MHz = 236 ppm: sidebands of the line at 1600 at 1364 and 1836
    assert "P2's line at 1600 ppm has first spinning sidebands at 1364 and 1836 ppm" in text
    assert "25.0 kHz" in text and "inside the window 1100-2100 ppm" in text
    far = fit_spectrum(data, line, mas_rate_hz=60000.0, larmor_mhz=SF_MHZ, seed=1,
                       mcmc_steps=200, deconvolution=False)
    assert not any("sidebands at" in w for w in far.warnings)


def test_a_bare_pair_is_a_converged_line_and_no_baseline_is_none():
    data, line = one_line_spectrum()
    fit = fit_spectrum(data, {"P2": (line["P2"].ppm, line["P2"].intensity)}, baseline_order=-1,
                       mcmc_steps=200, deconvolution=False)
    assert fit.baseline_order == -1 and fit.fractions == {"P2": 1.0}
    np.testing.assert_allclose(fit.model, sum(fit.components.values()) + fit.baseline_curve)
    np.testing.assert_array_equal(fit.ppm, data.ppm)                    # measured order kept


def test_fit_options_cover_the_manifest_knobs():
    import inspect

    from schemas.spectrum import ExperimentSpec

    spec = ExperimentSpec(file=__file__, baseline=False, mas_rate_hz=12000.0)
    options = fit_options(spec)
    assert options["baseline_order"] == -1 and options["mas_rate_hz"] == 12000.0
    assert options["offset_prior_ppm"] == (-160.0, 55.0)
    assert set(options) <= set(inspect.signature(fit_spectrum).parameters)
    knobs = set(ExperimentSpec.model_fields) - {"file", "systems", "temperature_k", "baseline"}
    assert knobs <= set(options) | {"baseline_order"}


def test_deconvolve_alone_reports_assignment_probabilities():
    data = measured({"P6_322": 0.6, "P6_3/mcm": 0.4}, seed=5)
    dec = deconvolve(data, predicted(), n_peaks=2, window_ppm=WINDOW, seed=5)
    assert dec.assignment == ("P6_3/mcm", "P6_322")
    assert dec.assignment_probability > 0.9
    assert [p.ppm for p in dec.peaks] == sorted(p.ppm for p in dec.peaks)
    assert abs(dec.fractions["P6_322"] - 0.6) < 0.08
    assert all(0 <= p.mixing <= 1 and p.fwhm_ppm > 0 for p in dec.peaks)


# ---------------------------------------------------------------------------------------
# reading


def test_bruker_pdata_roundtrip_and_masr(tmp_path):
    intensity = measured_intensity({"P6_322": 0.5, "P6_3/mcm": 0.5})
    write_bruker(tmp_path / "10", intensity, {"MASR": 30000.0, "SFO1": SF_MHZ})
    write_bruker(tmp_path / "11", intensity, {"SFO1": SF_MHZ})
    for path in (tmp_path / "10", tmp_path / "10" / "pdata" / "1",
                 f"{tmp_path / '10' / 'pdata' / '1'}/"):
        read = read_spectrum(path)
        assert read.larmor_mhz == SF_MHZ and read.mas_rate_hz == 30000.0
        np.testing.assert_allclose(read.ppm, AXIS_PPM, rtol=0, atol=1e-9)
        scale = read.intensity.max() / intensity.max()          # int32 storage: a power of 2
        np.testing.assert_allclose(read.intensity, intensity * scale, rtol=0,
                                   atol=2 * scale)
    assert read_spectrum(tmp_path / "11").mas_rate_hz is None      # no MASR in acqus


def test_axis_follows_procs_offset_where_nmrglue_unit_conversion_centres_on_the_carrier(
        tmp_path):
    """With an acqus, nmrglue's guess_udic centres the axis on SFO1 - SF, ignoring OFFSET.

    The processed window here is not centred on the transmitter (as after a strip), so
    nmrglue's axis is off by the carrier-to-window-centre distance; read_spectrum's is not.
    """
    carrier_ppm = 3000.0
    acqus = {"SFO1": SF_MHZ * (1 + carrier_ppm * 1e-6), "SW_h": SW_HZ, "O1": 0.0,
             "NUC1": "23Na", "TD": 2 * SI, "AQ_mod": 3}
    y = pseudo_voigt(AXIS_PPM, 1530.0, 60.0, 1.0)
    pdata = write_bruker(tmp_path / "10", y, acqus)
    dic, data = nmrglue.bruker.read_pdata(pdata)
    assert "acqus" in dic
    udic = nmrglue.bruker.guess_udic(dic, data)
    nmrglue_ppm = nmrglue.fileiobase.uc_from_udic(udic).ppm_scale()
    ours = read_spectrum(pdata).ppm
    np.testing.assert_allclose(ours, AXIS_PPM, atol=1e-9)
    window_centre = OFFSET_PPM - SW_HZ / SF_MHZ / 2
    np.testing.assert_allclose(nmrglue_ppm - ours, carrier_ppm - window_centre, atol=1e-6)
    peak = np.argmax(data)
    assert ours[peak] == pytest.approx(1530.0, abs=1.0)
    assert abs(nmrglue_ppm[peak] - ours[peak]) > 500.0


@pytest.mark.parametrize("sep", [" ", ",", "\t"])
def test_two_column_text_is_read(tmp_path, sep):
    path = tmp_path / "spectrum.txt"
    y = pseudo_voigt(AXIS_PPM[:200], AXIS_PPM[100], 20.0, 1.0)
    rows = "\n".join(f"{float(p)!r}{sep}{float(v)!r}" for p, v in zip(AXIS_PPM[:200], y))
    path.write_text(f"# ppm{sep}intensity\n{rows}\n# end\n")
    read = read_spectrum(path)
    np.testing.assert_array_equal(read.ppm, AXIS_PPM[:200])
    np.testing.assert_array_equal(read.intensity, y)
    assert read.larmor_mhz is None and read.mas_rate_hz is None and str(path) in read.source


def _line_rows(axis, intensity):
    return "\n".join(f"{float(a)!r} {float(b)!r}" for a, b in zip(axis, intensity)) + "\n"


PEAK = pseudo_voigt(np.linspace(2000, 1000, 500), 1500.0, 50.0, 0.5)
BAD_FILES = [
    ("", "the file is empty"),
    ("# only a comment\n\n", "the file is empty"),
    ("1 2 3\n4 5 6\n7 8 9\n", "two numeric columns"),
    ("ppm intensity\n1 2\n3 4\n5 6\n", "two numeric columns"),
    ("1 2\n2 nan\n3 4\n", "non-finite"),
    ("1 2\n3 4\n2 5\n", "monotonic"),
    ("1 2\n2 3\n", ">= 3"),
    (_line_rows(np.linspace(2000, 1000, 500) * SF_MHZ, PEAK), "not a ppm axis \\(Hz\\?\\)"),
    (_line_rows(np.arange(500.0), PEAK), "point indices"),
    (_line_rows(np.linspace(0, 0.05, 500), PEAK), "seconds"),
    (_line_rows(np.linspace(2000, 1000, 500), -PEAK), "mostly negative"),
    (_line_rows(np.linspace(2000, 1000, 500),
                np.gradient(PEAK)), "mostly negative"),                  # dispersive
]


@pytest.mark.parametrize("content, what", BAD_FILES)
def test_bad_files_raise_an_input_error_naming_the_file(tmp_path, content, what):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=what) as err:
        read_spectrum(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)           # manifest validation catches these


def test_missing_paths_and_bad_bruker_data_raise(tmp_path):
    with pytest.raises(SpectrumFileError, match="no such file"):
        read_spectrum(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectrumFileError, match="procs and 1r"):
        read_spectrum(tmp_path / "empty")
    pdata = write_bruker(tmp_path / "10", measured_intensity({"P6_322": 1.0}))
    os.remove(os.path.join(pdata, "1r"))
    with pytest.raises(InputError, match="'1r'") as err:
        read_spectrum(tmp_path / "10")
    assert str(tmp_path / "10") in str(err.value)
    open(os.path.join(pdata, "1r"), "wb").close()
    with pytest.raises(InputError, match="1r is empty"):
        read_spectrum(tmp_path / "10")
    pdata = write_bruker(tmp_path / "11", -measured_intensity({"P6_322": 1.0}))
    with pytest.raises(InputError, match="mostly negative") as err:
        read_spectrum(tmp_path / "11")
    assert str(tmp_path / "11") in str(err.value)


def test_bad_predictions_and_ranges_raise():
    data, line = one_line_spectrum()
    grid = PRED_GRID_PPM
    with pytest.raises(ValueError, match="predicted"):
        fit_spectrum(data, {})
    with pytest.raises(ValueError, match="P2"):
        fit_spectrum(data, {"P2": (grid, np.zeros_like(grid))})
    with pytest.raises(ValueError, match="P2"):
        fit_spectrum(data, {"P2": (grid, grid[:-1])})
    with pytest.raises(ValueError, match="sigma_ppm"):
        fit_spectrum(data, {"P2": PredictedLine(grid, line["P2"].intensity, sigma_ppm=0.0)})
    with pytest.raises(ValueError, match="offset_range_ppm"):
        fit_spectrum(data, line, offset_range_ppm=(100.0, -100.0))
    with pytest.raises(ValueError, match="excludes the offset prior"):
        fit_spectrum(data, line, offset_range_ppm=(300.0, 400.0))
    with pytest.raises(ValueError, match="window_ppm"):
        fit_spectrum(data, line, window_ppm=(0.0, 0.1))
    with pytest.raises(ValueError, match="line_shape"):
        fit_spectrum(data, line, line_shape="voigt")
