"""Exchange line shapes against analytic limits, the closed two-site form, and constructed data."""
import numpy as np
import pytest

from jobs.exchange import (BOLTZMANN_EV_PER_K, arrhenius_rates, curie_weiss_scale,
                           exchange_spectrum, spectra_over_temperature, stationary_populations,
                           two_site_spectrum)

LARMOR_MHZ = 105.8          # 23Na at 9.4 T
SHIFTS_PPM = (1000.0, 1300.0)
SEPARATION_HZ = (SHIFTS_PPM[1] - SHIFTS_PPM[0]) * LARMOR_MHZ


def lorentzian_ppm(freq_ppm, centre_ppm, fwhm_hz):
    """Unit-area Lorentzian over ppm with FWHM fwhm_hz."""
    half_ppm = fwhm_hz / LARMOR_MHZ / 2
    return half_ppm / np.pi / (half_ppm ** 2 + (freq_ppm - centre_ppm) ** 2)


def two_site_rates(k_ab, p_a):
    return np.array([[0.0, k_ab], [k_ab * p_a / (1 - p_a), 0.0]])


def test_slow_exchange_gives_lorentzians_at_the_sites_with_population_areas():
    freq = np.arange(700.0, 1600.0, 0.02)
    p_a, k_ab = 0.3, 1e-3 * SEPARATION_HZ
    rates = two_site_rates(k_ab, p_a)
    spec = exchange_spectrum(freq, SHIFTS_PPM, [p_a, 1 - p_a], rates, LARMOR_MHZ, 100.0)
    for shift, pop in zip(SHIFTS_PPM, (p_a, 1 - p_a)):
        window = np.abs(freq - shift) < 100.0
        assert np.trapezoid(spec[window], freq[window]) == pytest.approx(pop, rel=0.01)
        assert freq[window][np.argmax(spec[window])] == pytest.approx(shift, abs=0.02)
    # each line is a Lorentzian broadened by its lifetime: R2 + k_out = pi (FWHM + k_out / pi)
    expected = sum(pop * lorentzian_ppm(freq, shift, 100.0 + k_out / np.pi)
                   for shift, pop, k_out in zip(SHIFTS_PPM, (p_a, 1 - p_a), rates.sum(axis=1)))
    assert np.max(np.abs(spec - expected)) < 1e-3 * spec.max()


def test_fast_exchange_gives_one_line_at_the_population_weighted_mean():
    freq = np.arange(900.0, 1400.0, 0.01)
    p_a = 0.3
    rates = two_site_rates(1e4 * SEPARATION_HZ, p_a)
    spec = exchange_spectrum(freq, SHIFTS_PPM, [p_a, 1 - p_a], rates, LARMOR_MHZ, 100.0)
    mean = p_a * SHIFTS_PPM[0] + (1 - p_a) * SHIFTS_PPM[1]
    assert freq[np.argmax(spec)] == pytest.approx(mean, abs=0.1)
    # residual exchange broadening p_a p_b dw^2 / (k_ab + k_ba) (1/s) on top of R2
    extra_r2 = p_a * (1 - p_a) * (2 * np.pi * SEPARATION_HZ) ** 2 / rates.sum()
    expected = lorentzian_ppm(freq, mean, 100.0 + extra_r2 / np.pi)
    assert np.max(np.abs(spec - expected)) < 1e-3 * spec.max()


def test_fast_exchange_follows_the_stationary_distribution_not_the_initial_populations():
    freq = np.arange(900.0, 1400.0, 0.01)
    rates = np.array([[0.0, 3e8], [1e8, 0.0]])     # stationary (0.25, 0.75)
    stationary = stationary_populations(rates)
    np.testing.assert_allclose(stationary, [0.25, 0.75], rtol=1e-12)
    spec = exchange_spectrum(freq, SHIFTS_PPM, [0.5, 0.5], rates, LARMOR_MHZ, 100.0)
    assert freq[np.argmax(spec)] == pytest.approx(stationary @ SHIFTS_PPM, abs=0.1)


@pytest.mark.parametrize("p_a, k_ab", [(0.3, 0.7 * SEPARATION_HZ), (0.5, 2.0 * SEPARATION_HZ),
                                       (0.5, np.pi * SEPARATION_HZ)])   # last: coalescence
def test_intermediate_exchange_matches_the_closed_two_site_form(p_a, k_ab):
    freq = np.linspace(-2000.0, 4000.0, 20001)
    matrix = exchange_spectrum(freq, SHIFTS_PPM, [p_a, 1 - p_a], two_site_rates(k_ab, p_a),
                               LARMOR_MHZ, 300.0)
    closed = two_site_spectrum(freq, *SHIFTS_PPM, p_a, k_ab, LARMOR_MHZ, 300.0)
    np.testing.assert_allclose(matrix, closed, rtol=1e-6)


def test_a_detached_third_site_adds_its_own_lorentzian():
    freq = np.linspace(500.0, 2000.0, 15001)
    pops = np.array([0.2, 0.5, 0.3])
    k_ab = 0.8 * SEPARATION_HZ
    rates = np.zeros((3, 3))
    rates[:2, :2] = two_site_rates(k_ab, pops[0] / pops[:2].sum())
    rates[2, 2] = 123.0                                   # the diagonal is ignored
    spec = exchange_spectrum(freq, SHIFTS_PPM + (1700.0,), pops, rates, LARMOR_MHZ, 300.0)
    expected = (pops[:2].sum() * two_site_spectrum(freq, *SHIFTS_PPM, pops[0] / pops[:2].sum(),
                                                   k_ab, LARMOR_MHZ, 300.0)
                + pops[2] * lorentzian_ppm(freq, 1700.0, 300.0))
    np.testing.assert_allclose(spec, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="rate_matrix_per_s"):
        stationary_populations(rates)


def test_integral_over_ppm_equals_the_sum_of_populations():
    rng = np.random.default_rng(7)
    freq = np.arange(-20000.0, 22000.0, 0.5)
    pops = rng.uniform(0.1, 0.5, 5)                        # sum ~ 1.5, not normalised
    rates = rng.uniform(0.0, 5e4, (5, 5))
    spec = exchange_spectrum(freq, rng.uniform(0, 2000, 5), pops, rates, LARMOR_MHZ, 2000.0)
    tails = 2 / np.pi * (2000.0 / LARMOR_MHZ / 2) / 20000.0    # Lorentzian area off the grid
    assert np.trapezoid(spec, freq) == pytest.approx(pops.sum() * (1 - tails), rel=3e-4)
    assert np.all(spec > 0)


def test_detailed_balance_rates_have_the_populations_as_stationary_distribution():
    pops = np.array([0.1, 0.6, 0.3])
    sym = np.array([[0.0, 2.0, 5.0], [2.0, 0.0, 1.0], [5.0, 1.0, 0.0]])
    rates = sym / pops[:, None]                          # p_i k_ij = sym_ij = p_j k_ji
    np.testing.assert_allclose(stationary_populations(rates), pops, rtol=1e-10)


def test_curie_weiss_scales_by_t_minus_theta():
    shifts = np.array([1000.0, -50.0])
    np.testing.assert_allclose(curie_weiss_scale(shifts, 300.0, 350.0, -100.0),
                               shifts * 400.0 / 450.0, rtol=1e-15)
    assert curie_weiss_scale(800.0, 320.0, 320.0, 10.0) == pytest.approx(800.0)
    with pytest.raises(ValueError, match="t_to_k"):
        curie_weiss_scale(shifts, 300.0, 20.0, 20.0)
    with pytest.raises(ValueError, match="t_from_k"):
        curie_weiss_scale(shifts, 10.0, 300.0, 20.0)


def test_arrhenius_recovers_activation_energies_and_keeps_zeros():
    ea = np.array([[0.0, 0.35], [0.5, 0.0]])
    prefactor = np.array([[0.0, 1e13], [3e12, 0.0]])
    temps = (300.0, 350.0, 400.0)
    by_t = {t: prefactor * np.exp(-ea / (BOLTZMANN_EV_PER_K * t)) for t in temps}
    by_t[350.0][1, 0] = 0.0                             # never hopped at 350 K: stays zero
    rates, fitted_ea = arrhenius_rates(by_t, 330.0)
    assert fitted_ea[0, 1] == pytest.approx(0.35, rel=1e-10)
    assert rates[0, 1] == pytest.approx(1e13 * np.exp(-0.35 / (BOLTZMANN_EV_PER_K * 330.0)),
                                        rel=1e-10)
    assert rates[1, 0] == 0.0 and np.isnan(fitted_ea[1, 0])
    assert rates[0, 0] == 0.0 and np.isnan(fitted_ea[0, 0])
    with pytest.raises(ValueError, match="rates_by_temperature"):
        arrhenius_rates({300.0: by_t[300.0]}, 330.0)
    with pytest.raises(ValueError, match="rates_by_temperature"):
        arrhenius_rates({300.0: by_t[300.0], 400.0: np.ones((3, 3))}, 330.0)


def test_spectra_over_temperature_combine_curie_weiss_and_arrhenius():
    freq = np.linspace(500.0, 2000.0, 3001)
    by_t = {300.0: two_site_rates(1e4, 0.4), 400.0: two_site_rates(1e6, 0.4)}
    spectra = spectra_over_temperature(freq, SHIFTS_PPM, [0.4, 0.6], by_t, [300.0, 400.0],
                                       shift_temperature_k=300.0, theta_k=-50.0,
                                       larmor_mhz=LARMOR_MHZ, linewidth_hz=300.0)
    hot = exchange_spectrum(freq, np.array(SHIFTS_PPM) * 350.0 / 450.0, [0.4, 0.6],
                            by_t[400.0], LARMOR_MHZ, 300.0)
    assert spectra.shape == (2, freq.size)
    np.testing.assert_allclose(spectra[1], hot, rtol=1e-9)


GOOD = dict(freq_ppm=np.linspace(0, 10, 11), site_shift_ppm=[1.0, 2.0], populations=[0.5, 0.5],
            rate_matrix_per_s=[[0.0, 1.0], [1.0, 0.0]], larmor_mhz=100.0, linewidth_hz=10.0)


@pytest.mark.parametrize("name, bad", [
    ("freq_ppm", np.ones((2, 3))), ("freq_ppm", [np.inf]), ("site_shift_ppm", [1.0, np.nan]),
    ("populations", [1.0]), ("populations", [-0.1, 1.1]),
    ("rate_matrix_per_s", [[0.0, -1.0], [1.0, 0.0]]), ("rate_matrix_per_s", np.zeros((3, 3))),
    ("rate_matrix_per_s", [[0.0, np.nan], [1.0, 0.0]]), ("larmor_mhz", 0.0),
    ("linewidth_hz", -1.0), ("linewidth_hz", np.nan)])
def test_bad_inputs_raise_naming_the_argument(name, bad):
    with pytest.raises(ValueError, match=name):
        exchange_spectrum(**{**GOOD, name: bad})
