"""The analyze stage: statistics by collective reductions."""
from __future__ import annotations

from pydantic import Field, model_validator

from schemas.base import Element, Spec, SpecError


class AnalyzeSpec(Spec):
    """Averages, histograms, xy maps, sites and diffusion of the predicted shifts."""

    site_radius_a: float = Field(default=0.8, gt=0)
    """A target nucleus belongs to a site when it lies within this distance (A) of the site's
    centre in the xy plane (and in the site's interlayer slab); 0.8 A in Lin et al."""
    framework_species: list[Element] | None = Field(default=None, min_length=1)
    """Chemical symbols of the cations of the transition-metal layers (e.g. [Mn, Mg]); null:
    every species except the target species and the anions (O, F, S, Se, Te, Cl, Br, I, N,
    P)."""
    layer_gap_a: float = Field(default=1.0, gt=0)
    """Framework cations of frame 0 whose z differ by less than this (A) form one layer."""
    blocks_per_replica: int = Field(default=10, ge=2)
    """Contiguous blocks in time per replica (or per file) for the block-averaging standard
    error of the mean shifts."""
    histogram_range_ppm: tuple[float, float] = (-1000.0, 4000.0)
    """Fixed shift histogram range (ppm); samples outside are counted as under/overflow."""
    histogram_bin_ppm: float = Field(default=25.0, gt=0)
    """Shift histogram bin width (ppm)."""
    map_bins: int = Field(default=60, ge=2)
    """Bins of the xy maps along each of the cell vectors a and b (the map tiles the cell)."""
    running_points: int = Field(default=100, ge=2)
    """Time points (equal bins of simulated time) of the running averages."""
    chunk_frames: int = Field(default=1024, ge=1)
    """Frames read per chunk on each rank (memory per rank is flat in the frame count)."""
    msd_lags: int = Field(default=40, ge=2)
    """Lags (equally spaced, in frames) at which the in-plane mean squared displacement of
    the target species is computed."""
    msd_max_lag_fraction: float = Field(default=0.5, gt=0, le=1)
    """Longest MSD lag as a fraction of the shortest replica's length."""
    msd_fit_window_fs: tuple[float, float] | None = None
    """Lag-time window (fs) of the straight-line fit MSD = 4 D t + b; null: from 20 % to 80 %
    of the longest lag."""

    blocking_min_blocks: int = Field(default=16, ge=4)
    """Fewest blocks a block size needs in the blocking analysis of every mean's standard
    error (engine.stats.blocking); fewer frames than this give no error bar."""
    converged_min_hops_per_nucleus: float = Field(default=1.0, ge=0)
    """A dynamic average counts as converged only if every target nucleus hopped at least this
    many times (and the run is long; see converged_min_correlation_times)."""
    converged_min_correlation_times: float = Field(default=20.0, gt=0)
    """... and if every replica is at least this many shift correlation times long (the
    integrated autocorrelation time of the single-nucleus shift)."""
    correlation_window_c: float = Field(default=5.0, gt=0)
    """Sokal's window constant: the integrated autocorrelation time is read at the smallest lag
    W with W >= c tau(W); none within the longest lag: the time is not determined."""
    diffusive_slope_tolerance: float = Field(default=0.2, gt=0, lt=1)
    """D is reported only when the log-log slope of the MSD over the fit window is within this
    of 1 ..."""
    diffusive_min_site_spacings: float = Field(default=1.0, ge=0)
    """... and when the MSD at the end of the fit window exceeds this many squared
    nearest-site spacings (a nucleus that rattles in its site has a plateau below it)."""

    @model_validator(mode="after")
    def _check(self) -> "AnalyzeSpec":
        problems = []
        low, high = self.histogram_range_ppm
        if not high > low:
            problems.append(("histogram_range_ppm", f"must be (low, high) with high > low (got "
                                                    f"{list(self.histogram_range_ppm)})"))
        elif (high - low) / self.histogram_bin_ppm > 100000:
            problems.append(("histogram_bin_ppm", f"histogram_range_ppm / histogram_bin_ppm gives "
                                                  f"> 100000 bins (got {self.histogram_bin_ppm})"))
        elif self.histogram_bin_ppm > high - low:
            problems.append(("histogram_bin_ppm", f"wider than histogram_range_ppm (got "
                                                  f"{self.histogram_bin_ppm} > {high - low})"))
        if self.msd_fit_window_fs is not None:
            start, end = self.msd_fit_window_fs
            if not (end > start >= 0):
                problems.append(("msd_fit_window_fs", "must be (start, end) with end > start >= 0"
                                                      f" (got {list(self.msd_fit_window_fs)})"))
        if problems:
            raise SpecError(*problems)
        return self
