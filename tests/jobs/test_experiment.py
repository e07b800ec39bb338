"""Reading measured spectra (Bruker pdata, text) and fitting them as mixtures of predicted lines.

The synthetic measured spectra are built analytically: a Lorentzian convolved with a Lorentzian
is a Lorentzian whose FWHM is the sum, so the data do not come from the fit's own FFT code.
"""
import os

import nmrglue
import numpy as np
import pytest

from jobs.experiment import MeasuredSpectrum, fit_mixture, read_spectrum

SF_MHZ = 105.8                      # 23Na at 9.4 T
SI = 16384
SW_HZ = 250000.0
OFFSET_PPM = 2800.0
AXIS_PPM = OFFSET_PPM - np.arange(SI) * SW_HZ / SF_MHZ / SI      # TopSpin's axis, descending
PRED_GRID_PPM = np.arange(0.0, 4000.0, 0.5)
WIDTH_PPM = 40.0
SYSTEMS = {  # (centre ppm, relative height) of each line of a system's predicted spectrum
    "P2-a": ((1680.0, 1.0), (1600.0, 0.3)),
    "P2-b": ((1810.0, 1.0), (1900.0, 0.4)),
}
EXTRA_PPM = {"P2-a": 20.0, "P2-b": 30.0}
OFFSET_TRUE_PPM = -150.0


def lorentzian(x, centre, fwhm):
    half = fwhm / 2
    return half / np.pi / (half ** 2 + (x - centre) ** 2)


def system_line(x, name, shift=0.0, extra=0.0):
    """A system's unit-area line (on the infinite axis), shifted and broadened."""
    lines = SYSTEMS[name]
    total = sum(height for _, height in lines)
    return sum(h * lorentzian(x, c + shift, WIDTH_PPM + extra) for c, h in lines) / total


def predicted():
    return {name: (PRED_GRID_PPM, system_line(PRED_GRID_PPM, name)) for name in SYSTEMS}


def synthetic(fraction_a, seed=0, noise=0.01):
    y = sum(frac * system_line(AXIS_PPM, name, OFFSET_TRUE_PPM, EXTRA_PPM[name])
            for frac, name in zip((fraction_a, 1 - fraction_a), SYSTEMS))
    y = y + 2e-5                                                        # a small baseline
    y = y + np.random.default_rng(seed).normal(0.0, noise * y.max(), y.size)
    return MeasuredSpectrum(AXIS_PPM, y, "synthetic", SF_MHZ)


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


@pytest.mark.parametrize("fraction_a", [0.82, 0.5])
def test_fit_recovers_fractions_and_offset(fraction_a):
    fit = fit_mixture(synthetic(fraction_a), predicted())
    assert fit.success
    assert fit.fractions["P2-a"] == pytest.approx(fraction_a, abs=0.02)
    assert fit.fractions["P2-b"] == pytest.approx(1 - fraction_a, abs=0.02)
    assert sum(fit.fractions.values()) == pytest.approx(1.0)
    assert fit.offset_ppm == pytest.approx(OFFSET_TRUE_PPM, abs=5.0)
    for name in SYSTEMS:
        assert fit.widths_ppm[name] == pytest.approx(EXTRA_PPM[name], abs=3.0)
        assert 0 < fit.fraction_errors[name] < 0.02
    assert 0 < fit.offset_error_ppm < 5.0
    assert fit.residual_rms_rel == pytest.approx(0.01, rel=0.1)      # the noise: a good fit
    np.testing.assert_array_equal(fit.ppm, AXIS_PPM)                   # measured order kept
    np.testing.assert_allclose(fit.model, sum(fit.components.values()) + fit.baseline)
    by_ppm = {round(p.ppm / 10) * 10: p for p in fit.peaks}
    assert by_ppm[1530].system == "P2-a"                                # 1680 - 150
    assert by_ppm[1660].system == "P2-b"                                # 1810 - 150
    assert by_ppm[1530].fraction > 0.9


def test_start_is_not_fooled_by_a_line_that_matches_another_system():
    # offset -280 ppm puts P2-b's main line on the measured main line: a local minimum that a
    # least-squares fit started there stays in (it gives P2-b 0.83); the grid search avoids it
    fit = fit_mixture(synthetic(0.82, seed=3), predicted(), offset_range_ppm=(-400.0, 100.0))
    assert fit.offset_ppm == pytest.approx(OFFSET_TRUE_PPM, abs=5.0)


def test_fit_handles_ascending_axes_and_descending_predictions():
    measured = synthetic(0.82)
    flipped = MeasuredSpectrum(measured.ppm[::-1], measured.intensity[::-1], "flipped")
    lines = {name: (ppm[::-1], y[::-1]) for name, (ppm, y) in predicted().items()}
    fit_a, fit_b = fit_mixture(measured, predicted()), fit_mixture(flipped, lines)
    assert fit_b.fractions["P2-a"] == pytest.approx(fit_a.fractions["P2-a"], abs=1e-6)
    np.testing.assert_allclose(fit_b.model[::-1], fit_a.model, rtol=1e-6,
                               atol=1e-6 * fit_a.model.max())


def test_bruker_pdata_roundtrip_gives_the_same_axis_and_fit(tmp_path):
    measured = synthetic(0.82)
    write_bruker(tmp_path / "10", measured.intensity)
    for path in (tmp_path / "10", tmp_path / "10" / "pdata" / "1"):
        read = read_spectrum(path)
        assert read.larmor_mhz == SF_MHZ
        np.testing.assert_allclose(read.ppm, AXIS_PPM, rtol=0, atol=1e-9)
    # int32 storage scales the intensities by a power of two; the fit is scale-free
    fit_mem, fit_disk = fit_mixture(measured, predicted()), fit_mixture(read, predicted())
    for name in SYSTEMS:
        assert fit_disk.fractions[name] == pytest.approx(fit_mem.fractions[name], abs=1e-6)
    assert fit_disk.offset_ppm == pytest.approx(fit_mem.offset_ppm, abs=1e-4)


def test_axis_follows_procs_offset_where_nmrglue_unit_conversion_centres_on_the_carrier(
        tmp_path):
    """With an acqus, nmrglue's guess_udic centres the axis on SFO1 - SF, ignoring OFFSET.

    The processed window here is not centred on the transmitter (as after a strip), so
    nmrglue's axis is off by the carrier-to-window-centre distance; read_spectrum's is not.
    """
    carrier_ppm = 1000.0
    acqus = {"SFO1": SF_MHZ * (1 + carrier_ppm * 1e-6), "SW_h": SW_HZ, "O1": 0.0,
             "NUC1": "23Na", "TD": 2 * SI, "AQ_mod": 3}
    measured = synthetic(0.82, noise=0.0)
    pdata = write_bruker(tmp_path / "10", measured.intensity, acqus)
    dic, data = nmrglue.bruker.read_pdata(pdata)
    assert "acqus" in dic
    udic = nmrglue.bruker.guess_udic(dic, data)
    nmrglue_ppm = nmrglue.fileiobase.uc_from_udic(udic).ppm_scale()
    ours = read_spectrum(pdata).ppm
    np.testing.assert_allclose(ours, AXIS_PPM, atol=1e-9)
    window_centre = OFFSET_PPM - SW_HZ / SF_MHZ / 2
    np.testing.assert_allclose(nmrglue_ppm - ours, carrier_ppm - window_centre, atol=1e-6)
    peak = np.argmax(data)
    assert ours[peak] == pytest.approx(1680.0 + OFFSET_TRUE_PPM, abs=1.0)
    assert abs(nmrglue_ppm[peak] - ours[peak]) > 500.0
    # without the acqus, nmrglue 0.12 does use OFFSET, and agrees
    os.remove(tmp_path / "10" / "acqus")
    dic, data = nmrglue.bruker.read_pdata(pdata)
    uc = nmrglue.fileiobase.uc_from_udic(nmrglue.bruker.guess_udic(dic, data))
    np.testing.assert_allclose(uc.ppm_scale(), ours, atol=1e-6)


@pytest.mark.parametrize("sep", [" ", ",", "\t"])
def test_two_column_text_is_read(tmp_path, sep):
    path = tmp_path / "spectrum.txt"
    rows = "\n".join(f"{float(p)!r}{sep}{float(y)!r}"
                     for p, y in zip(AXIS_PPM[:50], np.arange(50.0)))
    path.write_text(f"# ppm{sep}intensity\n{rows}\n# end\n")
    read = read_spectrum(path)
    np.testing.assert_array_equal(read.ppm, AXIS_PPM[:50])
    np.testing.assert_array_equal(read.intensity, np.arange(50.0))
    assert read.larmor_mhz is None and str(path) in read.source


@pytest.mark.parametrize("content, what", [
    ("1 2 3\n4 5 6\n7 8 9\n", "two numeric columns"),
    ("1\n2\n3\n", "two numeric columns"),
    ("ppm intensity\n1 2\n3 4\n5 6\n", "two numeric columns"),
    ("1 2\n2 nan\n3 4\n", "non-finite"),
    ("1 2\n3 4\n2 5\n", "monotonic"),
    ("1 2\n2 3\n", ">= 3"),
])
def test_bad_text_files_raise_naming_the_path(tmp_path, content, what):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=what) as err:
        read_spectrum(path)
    assert str(path) in str(err.value)


def test_missing_paths_and_directories_without_pdata_raise(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_spectrum(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="procs and 1r"):
        read_spectrum(tmp_path / "empty")
    pdata = write_bruker(tmp_path / "10", synthetic(0.5).intensity)
    os.remove(os.path.join(pdata, "1r"))
    with pytest.raises(ValueError, match="'1r'") as err:
        read_spectrum(tmp_path / "10")
    assert str(tmp_path / "10") in str(err.value)


def test_bad_predictions_and_ranges_raise():
    measured = synthetic(0.5)
    with pytest.raises(ValueError, match="predicted"):
        fit_mixture(measured, {})
    with pytest.raises(ValueError, match="P2-a"):
        fit_mixture(measured, {"P2-a": (PRED_GRID_PPM, np.zeros_like(PRED_GRID_PPM))})
    with pytest.raises(ValueError, match="P2-a"):
        fit_mixture(measured, {"P2-a": (PRED_GRID_PPM, PRED_GRID_PPM[:-1])})
    with pytest.raises(ValueError, match="offset_range_ppm"):
        fit_mixture(measured, predicted(), offset_range_ppm=(100.0, -100.0))
    with pytest.raises(ValueError, match="window_ppm"):
        fit_mixture(measured, predicted(), window_ppm=(0.0, 0.1))
