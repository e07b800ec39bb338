"""Eq. 1: A_iso -> shift with the published dataset's constants."""
from __future__ import annotations

import numpy as np
import pytest

from jobs.frames import FERMI_CONTACT_KEY, read_labelled_frames
from jobs.shift import ppm_per_mhz, shift_ppm
from schemas.shift import ShiftSpec


def test_preset_factor():
    assert ppm_per_mhz(ShiftSpec()) == pytest.approx(800.16, abs=0.01)


@pytest.mark.parametrize("name,mean_ppm", [("p63mcm-dev.extxyz", 1636.0),
                                           ("p6322-dev.extxyz", 1770.0)])
def test_mean_na_shift_of_the_shared_frames(shared_data, name, mean_ppm):
    frames = read_labelled_frames(shared_data / name)
    a_na = np.concatenate([a.arrays[FERMI_CONTACT_KEY][a.numbers == 11] for a in frames])
    assert a_na.size == 400 * 16
    assert shift_ppm(a_na, ShiftSpec()).mean() == pytest.approx(mean_ppm, abs=0.5)


def test_overrides_follow_the_formula():
    base = ppm_per_mhz(ShiftSpec())
    # shift ~ 1/(T - Theta): T 320 -> 654.8 halves T - Theta (334.8 -> 669.6)
    assert ppm_per_mhz(ShiftSpec(temperature_k=654.8)) == pytest.approx(base / 2)
    assert ppm_per_mhz(ShiftSpec(mu_eff_bohr=3.87 * 2)) == pytest.approx(base * 4)
    np.testing.assert_allclose(shift_ppm([[1.0, -2.0]], ShiftSpec()), [[base, -2 * base]])


def test_without_preset_every_constant_is_required():
    with pytest.raises(ValueError, match="mu_eff_bohr"):
        ppm_per_mhz(ShiftSpec(preset=None))
