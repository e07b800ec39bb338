"""The analyze stage: statistics by collective reductions."""
from __future__ import annotations

from schemas.base import Spec


class AnalyzeSpec(Spec):
    """Averages, histograms, xy maps, sites and diffusion of the predicted shifts."""
