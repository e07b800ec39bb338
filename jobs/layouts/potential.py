"""The ``/potential`` group: the frozen DP model the potential stage publishes.

``/potential/model.pb`` holds the bytes of the frozen model (attributes: the hold-out errors);
``/potential`` the ``type_map``. Written by :func:`put_model`, read by :func:`has_model` and
:func:`stored_model_file`; which DP md uses is chosen in :mod:`jobs.artefacts`.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from engine.failure import InputError
from engine.store import RunStore
from schemas.potential import SHIPPED_MODEL

GROUP = "/potential"
"""The store group of the potential stage."""
MODEL_PATH = f"{GROUP}/model.pb"
"""Store path of the frozen DP model (bytes of the .pb file)."""


def has_model(store) -> bool:
    """True when the store holds the potential stage's DP model."""
    return store.exists(MODEL_PATH)


def put_model(store: RunStore, blob: bytes, type_map: list[str], **report) -> None:
    """Write the frozen model's bytes with its hold-out `report` as attributes (collective)."""
    store.put_bytes(MODEL_PATH, blob, **report)
    store.set_attrs(GROUP, type_map=list(type_map))


@contextmanager
def stored_model_file(store: RunStore, fallback: Path | None = None):
    """Context manager: a local file holding the store's DP model, or `fallback` / the shipped one.

    The md stage loads the model written by the potential stage (``/potential/model.pb``) from
    a temporary file that is removed on exit (deepmd-kit reads a model from a file once).
    """
    if store.exists(MODEL_PATH):
        handle, name = tempfile.mkstemp(suffix=".pb", prefix="dynshift-model-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(store.get_bytes(MODEL_PATH))
            yield Path(name)
        finally:
            os.unlink(name)
        return
    path = Path(fallback) if fallback is not None else SHIPPED_MODEL
    if not path.is_file():
        raise InputError(f"potential.model: {path} not found (and no model in the store)")
    yield path
