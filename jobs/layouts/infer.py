"""The ``/infer`` group: per system, the predicted shift (and its sigma) of every target nucleus
of every frame, with the frames' times and centre positions (docs/infer.md)."""
from __future__ import annotations

GROUP = "/infer"
"""The store group this stage owns: ``/infer/<system>`` (layout: docs/infer.md)."""


def system_group(system: str, root: str = GROUP) -> str:
    """Store group of one system's shifts: what analyze reads."""
    return f"{root}/{system}"
