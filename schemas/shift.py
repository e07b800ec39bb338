"""Conversion of a Fermi-contact coupling A_iso (MHz) to a paramagnetic shift (ppm)."""
from __future__ import annotations

from schemas.base import Spec


class ShiftSpec(Spec):
    """Constants of eq. 1 of Lin et al. (Chem. Sci. 2022); the defaults are the published
    dataset's convention (about 800.16 ppm per MHz)."""

    preset: str = "lin2022-nmmo"
    """Named constant set; fields given explicitly override it."""
