"""A_iso (MHz) -> paramagnetic shift (ppm): eq. 1 of Lin et al., Chem. Sci. 2022, 13, 7863.

The Fermi-contact shift of a nucleus next to paramagnetic ions whose moments follow a
Curie-Weiss law: the DFT coupling A_iso of a ferromagnetically aligned cell (total spin S_cell)
is scaled to the thermally averaged moment at the experiment's temperature,

    delta_ppm = 1e6 * A_iso * mu_eff^2 * S_cell * mu_B
                / (gyromagnetic_factor * 2 S * g_e * 3 k_B * (T - Theta)),

with every constant a field of :class:`schemas.shift.ShiftSpec` (preset `lin2022-nmmo`:
800.16 ppm per MHz).
"""
from __future__ import annotations

import numpy as np

from schemas.shift import ShiftSpec


def ppm_per_mhz(spec: ShiftSpec) -> float:
    """The factor of eq. 1 that turns A_iso (MHz) into a shift (ppm).

    Parameters
    ----------
    spec
        The shift constants (a preset with optional overrides).

    Returns
    -------
    float
        ppm per MHz (800.16 for the `lin2022-nmmo` preset).
    """
    c = spec.constants()
    numerator = 1e6 * c["mu_eff_bohr"] ** 2 * c["spin_cell"] * c["mu_b_j_per_t"]
    denominator = (c["gyromagnetic_factor"] * 2.0 * c["spin_s"] * c["g_e"] * 3.0
                   * c["k_b_j_per_k"] * (c["temperature_k"] - c["theta_k"]))
    return numerator / denominator


def shift_ppm(a_iso_mhz, spec: ShiftSpec) -> np.ndarray:
    """Paramagnetic shift (ppm) of nuclei with isotropic Fermi-contact coupling `a_iso_mhz`.

    Parameters
    ----------
    a_iso_mhz
        A_iso (MHz), any shape (VASP's A_tot column).
    spec
        The shift constants of eq. 1.

    Returns
    -------
    numpy.ndarray
        The shifts (ppm), float64, same shape as `a_iso_mhz`.
    """
    return np.asarray(a_iso_mhz, dtype=float) * ppm_per_mhz(spec)
