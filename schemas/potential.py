"""The potential stage: a deepmd-kit model trained on labelled frames."""
from __future__ import annotations

from schemas.base import InputPath, Spec


class PotentialSpec(Spec):
    """Train, freeze and (optionally) compress a DP model, or use an existing one."""

    model: InputPath | None = None
    """An existing frozen DP model (.pb); when set, no training happens."""
