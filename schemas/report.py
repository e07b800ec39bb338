"""The report stage: PNG figures and a Markdown summary from the store."""
from __future__ import annotations

from schemas.base import Spec


class ReportSpec(Spec):
    """Figures and a summary table in the shape of the paper's Table 1."""
