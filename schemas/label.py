"""The label stage: sparse frames labelled by DFT (VASP) with retries and a failure budget."""
from __future__ import annotations

from schemas.base import Spec


class LabelSpec(Spec):
    """Choose sparse frames from md trajectories and label them with a DFT code."""
