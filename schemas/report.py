"""The report stage: PNG figures and a Markdown summary from the store."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from schemas.base import Spec, SpecError


class ReportSpec(Spec):
    """Figures and a summary table in the shape of the paper's Table 1."""

    out_dir: Path | None = None
    """Folder for the figures and summary.md; null: `<store stem>-report/` beside the store
    (relative to the working directory of `dynshift run`)."""
    dpi: int = Field(default=150, ge=50, le=600)
    """Resolution of the PNG figures (dots per inch)."""
    histogram_xlim_ppm: tuple[float, float] | None = None
    """Shift axis range of the histogram figures (ppm), (low, high); null: where the counts
    are."""

    @model_validator(mode="after")
    def _check(self) -> "ReportSpec":
        if self.histogram_xlim_ppm is not None:
            low, high = self.histogram_xlim_ppm
            if not high > low:
                raise SpecError(("histogram_xlim_ppm", f"must be (low, high) with high > low "
                                                       f"(got {list(self.histogram_xlim_ppm)})"))
        return self
