"""The Arrhenius fit (engine.stats.arrhenius_fit): parameters, errors that cover the truth as
often as they claim, and what it says with too few points."""
from __future__ import annotations

import numpy as np
import pytest

from engine.stats import BOLTZMANN_EV_K, arrhenius_fit


def _rates(temperatures, activation_ev=0.3, prefactor=5.0):
    return prefactor * np.exp(-activation_ev / (BOLTZMANN_EV_K * np.asarray(temperatures)))


def test_exact_rates_give_the_parameters_back():
    t = np.array([450.0, 600.0, 750.0, 900.0])
    fit = arrhenius_fit(t, _rates(t), 0.05 * _rates(t))
    assert fit.activation_ev == pytest.approx(0.3, rel=1e-9)
    assert np.exp(fit.ln_prefactor) == pytest.approx(5.0, rel=1e-9)
    value, err = fit.at(300.0)
    assert value == pytest.approx(_rates([300.0])[0], rel=1e-9) and err > 0


@pytest.mark.parametrize("with_errors", [True, False])
def test_the_95_percent_intervals_cover_the_truth_about_95_percent_of_the_time(with_errors):
    rng = np.random.default_rng(4)
    t = np.array([450.0, 550.0, 650.0, 800.0])
    truth = _rates(t)
    hits_ea = hits_300 = 0
    n = 400
    for _ in range(n):
        observed = truth * np.exp(rng.normal(0.0, 0.1, size=len(t)))     # 10 % scatter
        fit = arrhenius_fit(t, observed, 0.1 * observed if with_errors else None)
        hits_ea += abs(fit.activation_ev - 0.3) < 1.96 * fit.activation_err_ev
        value, err = fit.at(300.0)
        hits_300 += abs(np.log(value) - np.log(_rates([300.0])[0])) < 1.96 * err / value
    # without point errors the residual variance has 2 degrees of freedom: the normal quantile
    # under-covers (t_2 would be 4.3); with them the scale is known
    low = 0.90 if with_errors else 0.70
    assert low <= hits_ea / n <= 0.99 and low <= hits_300 / n <= 0.99


def test_scatter_beyond_the_point_errors_widens_the_error():
    t = np.array([450.0, 550.0, 650.0, 800.0])
    observed = _rates(t) * np.array([1.3, 0.75, 1.3, 0.8])
    tight = arrhenius_fit(t, observed, 0.01 * observed)
    assert tight.chi2_reduced > 10
    naive = np.sqrt(np.linalg.inv(
        np.column_stack([np.ones(4), -1 / (BOLTZMANN_EV_K * t)]).T
        @ (np.column_stack([np.ones(4), -1 / (BOLTZMANN_EV_K * t)]) / 0.01 ** 2))[1, 1])
    assert tight.activation_err_ev == pytest.approx(naive * np.sqrt(tight.chi2_reduced))


def test_two_points_without_errors_have_no_error_and_one_point_no_fit():
    fit = arrhenius_fit([500.0, 700.0], _rates([500.0, 700.0]))
    assert fit.activation_ev == pytest.approx(0.3) and np.isnan(fit.activation_err_ev)
    with pytest.raises(ValueError, match="two or more temperatures"):
        arrhenius_fit([500.0, 700.0], [1.0, 0.0])                       # a zero rate drops
