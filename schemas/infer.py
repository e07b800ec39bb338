"""The infer stage: shifts of every target nucleus in every dense frame."""
from __future__ import annotations

from schemas.base import Spec


class InferSpec(Spec):
    """Predict shifts with the trained NN-NMR ensemble, sharded over ranks, streamed in chunks."""
