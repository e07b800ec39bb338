"""The spectrum stage: exchange line shapes of every system, and the fit of a measured one."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import InputPath, Spec, SpecError

LARMOR_MHZ_PER_T: dict[str, tuple[str, float]] = {
    "Na": ("23Na", 11.262), "Li": ("7Li", 16.546), "K": ("39K", 1.989), "Mg": ("25Mg", 2.606),
    "H": ("1H", 42.577), "F": ("19F", 40.078), "P": ("31P", 17.235), "O": ("17O", 5.772),
    "Al": ("27Al", 11.103), "Zn": ("67Zn", 2.669),
}
"""Target species -> (NMR isotope, gyromagnetic ratio gamma / 2 pi in MHz/T)."""


class ExperimentSpec(Spec):
    """A measured 1D spectrum, fitted as a mixture of the systems' predicted lines: each line
    placed at prediction + common offset + its own deviation (both with priors), broadened,
    over a polynomial baseline; the posterior by emcee (docs/spectrum.md)."""

    file: InputPath
    """Bruker processed data (a ``<expno>/pdata/<procno>`` folder, or ``<expno>``: then
    ``pdata/1``; the MAS rate is read from ``<expno>/acqus`` MASR) or a two-column text file
    (ppm, intensity); relative to the manifest."""
    systems: list[str] = Field(default_factory=list)
    """Systems whose lines are mixed (empty: every system of the manifest)."""
    temperature_k: float | None = Field(default=None, gt=0)
    """Temperature of the measurement (K): the predicted shifts are scaled to it by the
    Curie-Weiss law from shift.temperature_k; null: shift.temperature_k (no scaling)."""
    offset_range_ppm: tuple[float, float] = (-400.0, 400.0)
    """Hard bounds of the common shift offset (measured = predicted + offset)."""
    offset_prior_ppm: tuple[float, float] = (-160.0, 55.0)
    """Mean and sd (ppm) of the normal prior of the common offset: the paper's SCAN shifts
    are ~90-230 ppm above experiment, so measured = predicted - 160 +- 55 ppm."""
    position_sd_ppm: float = Field(default=40.0, gt=0)
    """Prior sd (ppm) of each converged system's own position deviation beyond the common
    offset (the part of the functional's error that differs between phases)."""
    unconverged_position_sd_ppm: float = Field(default=150.0, gt=0)
    """Prior sd (ppm) of the own deviation of a system whose analysis verdict is not
    converged: its predicted position is barely a guide."""
    window_ppm: tuple[float, float] | None = None
    """Part of the measured axis that is fitted (low, high); null: all of it. Keep the
    spinning sidebands out: a fitted line with first sidebands inside gives a warning."""
    line_shape: Literal["pseudo-voigt", "lorentzian", "gaussian"] = "pseudo-voigt"
    """Shape of the extra broadening convolved onto every predicted line (the predicted
    exchange broadening stays): pseudo-Voigt (each system's mixing fitted), Lorentzian or
    Gaussian."""
    shape_models: list[Literal["convolved", "peaks"]] = Field(
        default_factory=lambda: ["convolved", "peaks"], min_length=1)
    """How a predicted line becomes the measured one: ``convolved`` (the predicted line, its
    exchange shape and tails, convolved with the broadening) and ``peaks`` (one broadened
    line per predicted peak, FWHM predicted + extra, as dmfit draws them). With both, each
    is sampled and weighed by its evidence, and the fractions' intervals hold the line-shape
    uncertainty the data leave."""
    max_extra_fwhm_ppm: float = Field(default=400.0, gt=0)
    """Upper bound (ppm) of each system's extra broadening (FWHM)."""
    baseline: bool = True
    """Fit a polynomial baseline (of order ``baseline_order``)."""
    baseline_order: int = Field(default=2, ge=0, le=6)
    """Order of the polynomial baseline (Legendre over the window)."""
    mas_rate_hz: float | None = Field(default=None, gt=0)
    """MAS rate (Hz) when the file does not give it (a text file; Bruker: acqus MASR);
    with the Larmor frequency it places the spinning sidebands (rate / Larmor ppm)."""
    sideband_orders: int = Field(default=1, ge=0, le=3)
    """Pairs of spinning sidebands (+- k x rate) of every line modelled with free amplitudes
    when the MAS rate is known, so that their tails leaking into the window are fitted
    (0: none)."""
    deconvolution: bool = True
    """Also run the paper's route: a free fit of pseudo-Voigt peaks, assigned to the systems
    by predicted order and spacing, with the probability that the assignment is right."""
    deconvolution_peaks: int | None = Field(default=None, ge=1, le=6)
    """Peaks of the free deconvolution; null: the predicted lines' maxima (at most 6)."""
    mcmc_steps: int = Field(default=450, ge=100, le=20000)
    """emcee steps per posterior mode (a third burn-in; extended up to 3x while shorter than
    10 autocorrelation times)."""
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
        mean, sd = self.offset_prior_ppm
        if not sd > 0:
            problems.append(("offset_prior_ppm", f"must be (mean, sd) with sd > 0 (got "
                                                 f"{list(self.offset_prior_ppm)})"))
        elif high > low and not (low - 6 * sd < mean < high + 6 * sd):
            problems.append(("offset_prior_ppm", f"mean {mean} lies more than 6 sd outside "
                                                 f"offset_range_ppm "
                                                 f"{list(self.offset_range_ppm)}"))
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
