"""The ``/analyze`` group: per system, the statistics of the analyze stage (docs/analyze.md).

The analyze stage writes it; :func:`site_exchange` is the reader the spectrum stage uses (site
classes, their mean shifts, populations and hop rates) and :func:`analysed_systems` lists what
it holds."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.failure import InputError
from engine.store import RunStore

GROUP = "/analyze"
"""The store group this stage owns: ``/analyze/<system>`` (layout: docs/analyze.md)."""


@dataclass(frozen=True)
class SiteExchange:
    """What a line shape needs from one analysed system: its site classes (``unassigned``
    and classes without samples left out), their mean shifts, populations and hop rates."""

    system: str
    class_names: tuple[str, ...]
    shift_ppm: np.ndarray
    """(n,) site-centred mean shift per class (ppm)."""
    populations: np.ndarray
    """(n,) fraction of the time nuclei were committed to each class (md), or the fraction of
    samples in each class (frames from a file), normalised over these classes."""
    rate_per_s: np.ndarray
    """(n, n) hop rate from class a to class b (1/s); zero for frames from a file."""
    kind: str
    """``md`` or ``file``."""
    converged: bool
    verdict: str
    thermostat: str | None


def analysed_systems(store: RunStore) -> list[str]:
    """Names of the systems the store holds an analysis of."""
    return [name for name in store.keys(GROUP)
            if store.exists(f"{GROUP}/{name}/sites/shift_ppm")]


def site_exchange(store: RunStore, system: str) -> SiteExchange:
    """The site classes of `system` with their shifts, populations and rates (InputError when
    the store holds no analysis of it)."""
    group = f"{GROUP}/{system}"
    if not store.exists(f"{group}/sites/shift_ppm"):
        raise InputError(f"the store has no analysis of system {system!r} ({group}); run the "
                         "analyze stage first")
    attrs = store.attrs(group)
    names = list(store.attrs(f"{group}/sites")["class_names"])
    shift = np.asarray(store.read(f"{group}/sites/shift_ppm"), dtype=float)
    n = len(names) - 1  # the last class is "unassigned"
    if store.exists(f"{group}/dynamics/class_time_fs"):
        weight = np.asarray(store.read(f"{group}/dynamics/class_time_fs"), dtype=float)
        rates = np.asarray(store.read(f"{group}/dynamics/rate_per_ps"), dtype=float) * 1e12
    else:
        weight = np.asarray(store.read(f"{group}/sites/samples"), dtype=float)[:n]
        rates = np.zeros((n, n))
    keep = np.flatnonzero(np.isfinite(shift[:n]) & (weight > 0))
    rates = np.nan_to_num(rates[np.ix_(keep, keep)], nan=0.0)
    np.fill_diagonal(rates, 0.0)
    populations = weight[keep] / weight[keep].sum() if len(keep) else weight[keep]
    return SiteExchange(system, tuple(names[k] for k in keep), shift[keep], populations, rates,
                        str(attrs.get("kind", "md")), bool(attrs.get("converged", False)),
                        str(attrs.get("verdict", "")), attrs.get("thermostat"))


def path(*parts: str) -> str:
    """Store path of a member of this group: ``path(system, "sites/occupation")``; ``path()``
    is the group itself."""
    return "/".join((GROUP, *parts))
