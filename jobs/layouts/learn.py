"""The ``/learn`` group: a learn campaign's iterations (``/learn/iter-NNN``: models, exploration,
label tables, shift model), its bootstrap labels and its final shift model (docs/learn.md).

Readers: :func:`has_campaign`, :func:`learned_model_files` (the final DP ensemble),
:func:`learned_shift_model`, :func:`campaign_history` and :func:`campaign_lines` (its history
in words, for the report and ``dynshift show``)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from engine.store import RunStore

GROUP = "/learn"
"""The store group this stage owns (layout: docs/learn.md)."""


BOOTSTRAP = f"{GROUP}/bootstrap"


FINAL_SHIFT = f"{GROUP}/shift"
"""The campaign's final shift model (a /train-like group: ``<it>/gpr`` + settings attrs)."""


def iteration_group(iteration: int) -> str:
    """``/learn/iter_NNN``."""
    return f"{GROUP}/iter_{iteration:03d}"


def _table_groups(store: RunStore, systems, before: int) -> list[tuple[int, str]]:
    """(table index, group) of every label table of the campaign made before iteration
    `before`: the bootstrap's of each system, then each iteration's."""
    tables = [(0, f"{BOOTSTRAP}/label/{s.name}") for s in systems]
    for iteration in range(before):
        tables += [(iteration + 1, f"{iteration_group(iteration)}/label/{s.name}")
                   for s in systems]
    return [(index, group) for index, group in tables if store.exists(f"{group}/status")]


@contextmanager
def model_files(blobs: list[bytes]):
    """Local files of DP models given as bytes (removed on exit)."""
    paths = []
    try:
        for blob in blobs:
            handle, name = tempfile.mkstemp(suffix=".pb", prefix="dynshift-learn-")
            with os.fdopen(handle, "wb") as out:
                out.write(blob)
            paths.append(Path(name))
        yield paths
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def has_campaign(store: RunStore) -> bool:
    """True when the store holds a complete learn campaign."""
    return bool(store.attrs(GROUP).get("complete")) if store.exists(GROUP) else False


@contextmanager
def learned_model_files(store: RunStore):
    """Local files of the final DP ensemble (model 0 first: the one md propagates with)."""
    final = int(store.attrs(GROUP)["final_iteration"])
    group = f"{iteration_group(final)}/models"
    blobs = [bytes(store.read(f"{group}/model_{k}"))
             for k in range(int(store.attrs(GROUP)["models"]))]
    with model_files(blobs) as paths:
        yield paths


def learned_shift_model(store: RunStore):
    """The campaign's final shift model (a :class:`jobs.shiftmodels.gpr.GprShiftModel`)."""
    from jobs.shiftmodels.gpr import GprShiftModel

    return GprShiftModel.from_store(store, FINAL_SHIFT)


def campaign_history(store: RunStore) -> list[dict]:
    """One dict per complete iteration: accurate fraction, counts per system, model RMSEs."""
    history = []
    iteration = 0
    while store.exists(iteration_group(iteration)):
        it = iteration_group(iteration)
        attrs = store.attrs(it)
        if not attrs.get("complete"):
            break
        entry = {"iteration": iteration, "accurate_fraction": float(attrs["accurate_fraction"]),
                 "stop_reason": attrs.get("stop_reason", "")}
        if store.exists(f"{it}/counts"):
            entry["counts"] = {name: store.attrs(f"{it}/counts/{name}")
                               for name in store.keys(f"{it}/counts")}
        if store.exists(f"{it}/models/model_0"):
            entry["model_0"] = {k: v for k, v in store.attrs(f"{it}/models/model_0").items()
                                if "rmse" in k}
        if store.exists(f"{it}/shift"):
            entry["shift_cv_rmse_ppm"] = store.attrs(f"{it}/shift").get("cv_rmse_ppm")
        history.append(entry)
        iteration += 1
    return history


def campaign_lines(store: RunStore) -> list[str]:
    """The campaign's history in words, an iteration a line (``dynshift show``)."""
    attrs = store.attrs(GROUP)
    lines = []
    for entry in campaign_history(store):
        counts = entry.get("counts", {})
        parts = [f"{name}: {c.get('explored', 0)} explored, {c.get('accurate', 0)} accurate, "
                 f"{c.get('candidate', 0)} candidates, {c.get('failed', 0)} failed, "
                 f"{c.get('selected_by_deviation', 0)} + {c.get('selected_by_shift', 0)} "
                 f"labelled" for name, c in counts.items()]
        rmse = entry.get("model_0", {})
        force = rmse.get("force_rmse_ev_per_a")
        shift = entry.get("shift_cv_rmse_ppm")
        lines.append(f"iteration {entry['iteration']}: accurate fraction "
                     f"{entry['accurate_fraction']:.3f}; " + "; ".join(parts)
                     + (f"; model 0 validation force RMSE {force:.3f} eV/A" if force else "")
                     + (f"; shift model CV RMSE {shift:.1f} ppm" if shift else ""))
    if attrs.get("complete"):
        lines.append(f"{'converged' if attrs.get('converged') else 'not converged'}: "
                     f"{attrs.get('stop_reason', '')}; {attrs.get('labelled_frames')} labelled "
                     f"frames")
    else:
        lines.append("running or stopped before its end (a rerun continues)")
    return lines


def has_history(store) -> bool:
    """True when the store holds a learn campaign, complete or not."""
    return store.exists(GROUP)
