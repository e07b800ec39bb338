"""The ``/spectrum`` group: per system the predicted line shapes over temperature, and
``/spectrum/fit`` the fit of a measured spectrum (docs/spectrum.md)."""
from __future__ import annotations

import numpy as np

from engine.store import RunStore
from jobs.experiment import MixtureFit

GROUP = "/spectrum"
"""The store group this stage owns."""


FIT_GROUP = f"{GROUP}/fit"


def _put_fit(store: RunStore, fit: MixtureFit, measured, temperature_k: float) -> None:
    store.require_group(FIT_GROUP)
    store.put(f"{FIT_GROUP}/ppm", fit.ppm, unit="ppm", doc="measured points fitted")
    inside = np.isin(measured.ppm, fit.ppm)
    store.put(f"{FIT_GROUP}/measured", measured.intensity[inside], unit="intensity")
    store.put(f"{FIT_GROUP}/model", fit.model, unit="intensity", doc="fitted mixture")
    store.put(f"{FIT_GROUP}/components", np.stack([fit.components[s] for s in fit.systems]),
              unit="intensity", doc="rows: systems (attr systems), baseline not included")
    store.set_attrs(FIT_GROUP, systems=list(fit.systems), source=measured.source,
                    fractions=[fit.fractions[s] for s in fit.systems],
                    fraction_errors=[fit.fraction_errors[s] for s in fit.systems],
                    widths_ppm=[fit.widths_ppm[s] for s in fit.systems],
                    offset_ppm=fit.offset_ppm, offset_error_ppm=fit.offset_error_ppm,
                    baseline=fit.baseline, residual_rms_rel=fit.residual_rms_rel,
                    temperature_k=temperature_k, success=bool(fit.success), message=fit.message,
                    peaks=[{"ppm": p.ppm, "intensity": p.intensity, "system": p.system,
                            "fraction": p.fraction} for p in fit.peaks])


def path(*parts: str) -> str:
    """Store path of a member of this group: ``path(system, "sites/occupation")``; ``path()``
    is the group itself."""
    return "/".join((GROUP, *parts))


def fit_path(*parts: str) -> str:
    """Store path of a member of the fit's subgroup (``fit_path()``: the subgroup)."""
    return "/".join((FIT_GROUP, *parts))
