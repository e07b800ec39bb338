"""The spectrum stage: exchange line shapes of every system, and the fit of a measured one."""
from __future__ import annotations

from pydantic import Field, model_validator

from schemas.base import InputPath, Spec, SpecError

LARMOR_MHZ_PER_T: dict[str, tuple[str, float]] = {
    "Na": ("23Na", 11.262), "Li": ("7Li", 16.546), "K": ("39K", 1.989), "Mg": ("25Mg", 2.606),
    "H": ("1H", 42.577), "F": ("19F", 40.078), "P": ("31P", 17.235), "O": ("17O", 5.772),
    "Al": ("27Al", 11.103), "Zn": ("67Zn", 2.669),
}
"""Target species -> (NMR isotope, gyromagnetic ratio gamma / 2 pi in MHz/T)."""


class ExperimentSpec(Spec):
    """A measured 1D spectrum, fitted as a mixture of the systems' predicted lines."""

    file: InputPath
    """Bruker processed data (a ``<expno>/pdata/<procno>`` folder, or ``<expno>``: then
    ``pdata/1``) or a two-column text file (ppm, intensity); relative to the manifest."""
    systems: list[str] = Field(default_factory=list)
    """Systems whose lines are mixed (empty: every system of the manifest)."""
    temperature_k: float | None = Field(default=None, gt=0)
    """Temperature of the measurement (K): the predicted shifts are scaled to it by the
    Curie-Weiss law from shift.temperature_k; null: shift.temperature_k (no scaling)."""
    offset_range_ppm: tuple[float, float] = (-400.0, 400.0)
    """Range of the common shift offset (measured = predicted + offset; the paper's SCAN shifts
    are ~90-230 ppm above experiment)."""
    window_ppm: tuple[float, float] | None = None
    """Part of the measured axis that is fitted (low, high); null: all of it."""
    baseline: bool = True
    """Fit a constant baseline too."""
    peak_prominence: float = Field(default=0.02, gt=0, lt=1)
    """Measured peaks (for the assignment table) need this prominence, as a fraction of the
    tallest peak."""

    @model_validator(mode="after")
    def _check(self) -> "ExperimentSpec":
        problems = []
        low, high = self.offset_range_ppm
        if not high > low:
            problems.append(("offset_range_ppm", f"must be (low, high) with high > low (got "
                                                 f"{list(self.offset_range_ppm)})"))
        if self.window_ppm is not None and not self.window_ppm[1] > self.window_ppm[0]:
            problems.append(("window_ppm", f"must be (low, high) with high > low (got "
                                           f"{list(self.window_ppm)})"))
        if len(set(self.systems)) != len(self.systems):
            problems.append(("systems", f"names a system twice (got {self.systems})"))
        if problems:
            raise SpecError(*problems)
        return self


class SpectrumSpec(Spec):
    """Isotropic spectra from the analysed site shifts, populations and hop rates
    (Bloch-McConnell exchange; no spinning sidebands), optionally over temperature, and the
    fit of a measured spectrum."""

    field_t: float = Field(default=11.7, gt=0)
    """Magnetic field (T); with the target nucleus's gyromagnetic ratio it gives the Larmor
    frequency that sets how fast a hop rate must be to average two lines."""
    linewidth_hz: float = Field(default=2000.0, gt=0)
    """Intrinsic Lorentzian line width (FWHM, Hz) of every site's line (T2 and
    inhomogeneous broadening the md does not model)."""
    ppm_range: tuple[float, float] = (-500.0, 3500.0)
    """Shift axis of the predicted spectra (low, high; ppm)."""
    points: int = Field(default=8192, ge=16, le=1 << 20)
    """Points of the predicted spectra's axis."""
    temperatures_k: list[float] = Field(default_factory=list)
    """Extra temperatures (K) of predicted spectra: shifts scaled by the Curie-Weiss law
    (1 / (T - Theta), eq. 1; shift.theta_k) from shift.temperature_k, hop rates held at the md
    temperature (md runs at one temperature per manifest: no Arrhenius extrapolation)."""
    experiment: ExperimentSpec | None = None
    """A measured spectrum to fit (null: none)."""

    @model_validator(mode="after")
    def _check(self) -> "SpectrumSpec":
        problems = []
        low, high = self.ppm_range
        if not high > low:
            problems.append(("ppm_range", f"must be (low, high) with high > low (got "
                                          f"{list(self.ppm_range)})"))
        bad = [t for t in self.temperatures_k if not t > 0]
        if bad:
            problems.append(("temperatures_k", f"must be > 0 K (got {bad})"))
        if problems:
            raise SpecError(*problems)
        return self
