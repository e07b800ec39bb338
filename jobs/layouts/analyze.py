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
ARRHENIUS = "arrhenius"
"""``/analyze/arrhenius/<base>``: the Arrhenius fits over a system's md temperatures (a name
no system may take)."""


def arrhenius_path(base: str) -> str:
    """Store group of the Arrhenius fits of base system `base`."""
    return f"{GROUP}/{ARRHENIUS}/{base}"


def arrhenius_bases(store: RunStore) -> list[str]:
    """The base systems the store holds Arrhenius fits of."""
    group = f"{GROUP}/{ARRHENIUS}"
    return store.keys(group) if store.exists(group) else []


@dataclass(frozen=True)
class SiteExchange:
    """What a line shape needs from one analysed system: its site classes, their mean shifts,
    populations and hop rates, consistent with the analysis's dynamic mean.

    Every sample counts: the ``unassigned`` samples (nuclei between sites: transits and short
    excursions, each a few ps at most and so in fast exchange with their home site at any NMR
    frequency) are folded into the site classes in proportion to the time committed to each
    (md) or to their samples (frames from a file), with their own mean shift. The
    populations are then the samples' fractions and ``sum(populations * shift_ppm)`` is the
    mean of ALL samples, analyze's ``mean_shift_ppm``; the rates are estimated under detailed
    balance with these populations (:func:`jobs.exchange.reversible_rates`), so the
    fast-exchange line sits at that mean.
    """

    system: str
    class_names: tuple[str, ...]
    shift_ppm: np.ndarray
    """(n,) mean shift per class, its share of the unassigned samples included (ppm)."""
    populations: np.ndarray
    """(n,) fraction of all samples in each class (the unassigned folded in), summing to 1."""
    rate_per_s: np.ndarray
    """(n, n) hop rate from class a to class b (1/s), reversible with `populations`; zero for
    frames from a file."""
    kind: str
    """``md`` or ``file``."""
    converged: bool
    verdict: str
    thermostat: str | None
    hop_counts: np.ndarray | None = None
    """(n, n) hops counted from class a to class b (None: no dynamics)."""
    exposure_s: np.ndarray | None = None
    """(n,) time committed to each class (s; None: no dynamics)."""
    unassigned_fraction: float = 0.0
    """Fraction of the samples that were between sites (folded into the classes)."""
    mean_stderr_ppm: float = float("nan")
    """Statistical error of the dynamic mean (blocking; NaN where not converged)."""
    model_sigma_ppm: float = float("nan")
    """The shift model's mean predicted sigma over the samples (NaN: the model gives none)."""


def analysed_systems(store: RunStore) -> list[str]:
    """Names of the systems the store holds an analysis of."""
    return [name for name in store.keys(GROUP)
            if store.exists(f"{GROUP}/{name}/sites/shift_ppm")]


def site_exchange(store: RunStore, system: str) -> SiteExchange:
    """The site classes of `system` with their shifts, populations and rates (InputError when
    the store holds no analysis of it); see :class:`SiteExchange` for how every sample counts."""
    from jobs.exchange import reversible_rates

    group = f"{GROUP}/{system}"
    if not store.exists(f"{group}/sites/shift_ppm"):
        raise InputError(f"the store has no analysis of system {system!r} ({group}); run the "
                         "analyze stage first")
    attrs = store.attrs(group)
    names = list(store.attrs(f"{group}/sites")["class_names"])
    shift = np.asarray(store.read(f"{group}/sites/shift_ppm"), dtype=float)
    samples = np.asarray(store.read(f"{group}/sites/samples"), dtype=float)
    n = len(names) - 1  # the last class is "unassigned"
    dynamics = store.exists(f"{group}/dynamics/class_time_fs")
    if dynamics:
        committed = np.asarray(store.read(f"{group}/dynamics/class_time_fs"), dtype=float)
        counts = np.asarray(store.read(f"{group}/dynamics/hop_counts"), dtype=float)
    else:
        committed, counts = samples[:n].copy(), np.zeros((n, n))
    total = samples.sum()
    site_fraction = samples[:n] / total
    unassigned = samples[n] / total if np.isfinite(shift[n]) and samples[n] > 0 else 0.0
    share = committed / committed.sum() if committed.sum() > 0 else site_fraction
    populations = site_fraction + unassigned * share
    with np.errstate(invalid="ignore", divide="ignore"):
        folded = (np.nan_to_num(site_fraction * shift[:n])
                  + (unassigned * share * shift[n] if unassigned else 0.0)) / populations
    keep = np.flatnonzero((populations > 0) & np.isfinite(folded))
    populations = populations[keep] / populations[keep].sum()
    counts = np.nan_to_num(counts[np.ix_(keep, keep)], nan=0.0)
    exposure = committed[keep] * 1e-15
    rates = reversible_rates(counts, exposure, populations) if dynamics else np.zeros(
        (len(keep), len(keep)))
    return SiteExchange(system, tuple(names[k] for k in keep), folded[keep], populations, rates,
                        str(attrs.get("kind", "md")), bool(attrs.get("converged", False)),
                        str(attrs.get("verdict", "")), attrs.get("thermostat"),
                        counts if dynamics else None, exposure if dynamics else None,
                        float(unassigned),
                        float(attrs.get("mean_shift_stderr_ppm", float("nan"))),
                        float(attrs.get("mean_shift_model_sigma_ppm", float("nan"))))


def path(*parts: str) -> str:
    """Store path of a member of this group: ``path(system, "sites/occupation")``; ``path()``
    is the group itself."""
    return "/".join((GROUP, *parts))
