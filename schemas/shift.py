"""Conversion of a Fermi-contact coupling A_iso (MHz) to a paramagnetic shift (ppm)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import Spec

SHIFT_PRESETS: dict[str, dict[str, float]] = {
    "lin2022-nmmo": {
        "mu_eff_bohr": 3.87, "spin_cell": 48.0, "spin_s": 1.5, "gyromagnetic_factor": 100.0,
        "g_e": 2.0023, "mu_b_j_per_t": 9.274e-24, "k_b_j_per_k": 1.381e-23,
        "temperature_k": 320.0, "theta_k": -14.8,
    },
}
"""Named constant sets. `lin2022-nmmo`: the published P2-Na2/3(Mg1/3Mn2/3)O2 dataset's code
(Mn4+ mu_eff, 48 unpaired spins per 88-atom cell, T = 320 K, Theta = -14.8 K): 800.16 ppm/MHz."""


class ShiftSpec(Spec):
    """Constants of eq. 1 of Lin et al. (Chem. Sci. 2022); the defaults are the published
    dataset's convention (about 800.16 ppm per MHz).

    delta_ppm = 1e6 * A_iso * mu_eff^2 * S_cell * mu_B
                / (gyromagnetic_factor * 2 S * g_e * 3 k_B * (T - Theta))
    """

    preset: Literal["lin2022-nmmo"] | None = "lin2022-nmmo"
    """Named constant set; fields given explicitly override it (null: give every constant)."""
    mu_eff_bohr: float | None = Field(default=None, gt=0)
    """Effective magnetic moment of the paramagnetic ion from the susceptibility (Bohr
    magnetons); preset 3.87 (Mn4+, spin-only)."""
    spin_cell: float | None = Field(default=None, gt=0)
    """Total spin moment of the DFT cell (the `NUPDOWN` / "Total magnetic moment S=" of the
    OUTCAR, in unpaired electrons); preset 48."""
    spin_s: float | None = Field(default=None, gt=0)
    """Formal spin S of the paramagnetic ion; preset 3/2 (Mn4+)."""
    gyromagnetic_factor: float | None = Field(default=None, gt=0)
    """The gyromagnetic convention of the published code: the factor that takes A_iso in
    MHz to the dimensionless hyperfine term (100 in Lin et al.'s code)."""
    g_e: float | None = Field(default=None, gt=0)
    """Free-electron g factor; preset 2.0023."""
    mu_b_j_per_t: float | None = Field(default=None, gt=0)
    """Bohr magneton (J/T); preset 9.274e-24."""
    k_b_j_per_k: float | None = Field(default=None, gt=0)
    """Boltzmann constant (J/K); preset 1.381e-23."""
    temperature_k: float | None = Field(default=None, gt=0)
    """Temperature of the NMR experiment (K); preset 320."""
    theta_k: float | None = None
    """Weiss constant Theta from the Curie-Weiss fit of the susceptibility (K); preset -14.8."""

    def constants(self) -> dict[str, float]:
        """Every constant of eq. 1: the preset, overridden by the fields given explicitly.

        Raises
        ------
        ValueError
            When a constant is neither given nor in the preset.
        """
        values = dict(SHIFT_PRESETS[self.preset]) if self.preset else {}
        for name in SHIFT_PRESETS["lin2022-nmmo"]:
            given = getattr(self, name)
            if given is not None:
                values[name] = float(given)
        missing = [n for n in SHIFT_PRESETS["lin2022-nmmo"] if n not in values]
        if missing:
            raise ValueError(f"shift: without a preset, give {', '.join(missing)}")
        if values["temperature_k"] <= values["theta_k"]:
            raise ValueError("shift: temperature_k must exceed theta_k")
        return values
