"""The ``/spectrum`` group: per system the predicted line shapes over temperature, and
``/spectrum/fit`` the fit of a measured spectrum (docs/spectrum.md).

The spectrum stage writes it (:func:`put_fit` for the fit); :func:`fit_record` and
:func:`fit_lines` are how the report and ``dynshift show`` read the fit."""
from __future__ import annotations

import numpy as np

from engine.store import RunStore
from jobs.experiment import MeasuredSpectrum, SpectrumFit

GROUP = "/spectrum"
"""The store group this stage owns."""


FIT_GROUP = f"{GROUP}/fit"
"""The fit of a measured spectrum (one per store)."""


def put_fit(store: RunStore, fit: SpectrumFit, measured: MeasuredSpectrum,
            temperature_k: float) -> None:
    """Write `fit` of `measured` (predictions at `temperature_k`) into ``/spectrum/fit``:
    curves as datasets (measured points inside the window, model, components, baseline,
    residual, posterior draws of the fractions), every number and sentence as attributes."""
    names = list(fit.systems)
    store.require_group(FIT_GROUP)
    inside = np.isin(measured.ppm, fit.ppm)
    data = measured.intensity[inside]
    store.put(f"{FIT_GROUP}/ppm", fit.ppm, unit="ppm", doc="measured points fitted")
    store.put(f"{FIT_GROUP}/measured", data, unit="intensity")
    store.put(f"{FIT_GROUP}/model", fit.model, unit="intensity",
              doc="best-fit mixture, baseline included")
    store.put(f"{FIT_GROUP}/components", np.stack([fit.components[s] for s in names]),
              unit="intensity", doc="rows: systems (attr systems), baseline not included")
    store.put(f"{FIT_GROUP}/baseline", fit.baseline_curve, unit="intensity")
    store.put(f"{FIT_GROUP}/residual", data - fit.model, unit="intensity",
              doc="measured - model")
    store.put(f"{FIT_GROUP}/fraction_samples",
              np.stack([fit.samples[f"fraction:{s}"] for s in names], axis=1), unit="1",
              doc="posterior draws (rows) of each system's fraction (columns: attr systems)")
    dec = fit.deconvolution
    store.set_attrs(
        FIT_GROUP, systems=names, source=measured.source, temperature_k=temperature_k,
        fractions=[fit.fractions[s] for s in names],
        fraction_errors=[fit.fraction_errors[s] for s in names],
        fraction_intervals=[list(fit.fraction_intervals[s]) for s in names],
        positions_ppm=[fit.positions_ppm[s] for s in names],
        position_errors_ppm=[fit.position_errors_ppm[s] for s in names],
        deviations_ppm=[fit.deviations_ppm[s] for s in names],
        deviation_errors_ppm=[fit.deviation_errors_ppm[s] for s in names],
        position_sd_ppm=[fit.position_sd_ppm[s] for s in names],
        converged=[bool(fit.converged[s]) for s in names],
        verdicts=[fit.verdicts[s] for s in names],
        widths_ppm=[fit.widths_ppm[s] for s in names],
        width_errors_ppm=[fit.width_errors_ppm[s] for s in names],
        mixing=[fit.mixing[s] for s in names], mixing_errors=[fit.mixing_errors[s] for s in names],
        line_shape=fit.line_shape, offset_ppm=fit.offset_ppm,
        offset_error_ppm=fit.offset_error_ppm, offset_interval_ppm=list(fit.offset_interval_ppm),
        baseline=fit.baseline, baseline_order=fit.baseline_order, noise_rms=fit.noise_rms,
        residual_rms_rel=fit.residual_rms_rel, n_points=fit.n_points,
        n_effective=fit.n_effective, n_samples=fit.n_samples, seed=fit.seed,
        separable=bool(fit.separable), statements=list(fit.statements),
        warnings=list(fit.warnings), success=bool(fit.success), message=fit.message,
        modes=[{"weight": m.weight, "positions_ppm": m.positions_ppm, "fractions": m.fractions}
               for m in fit.modes],
        shape_models={f: {"weight": r.weight, "log_evidence": r.log_evidence,
                          "fractions": r.fractions, "fraction_errors": r.fraction_errors}
                      for f, r in fit.shape_models.items()},
        peaks=[{"ppm": p.ppm, "intensity": p.intensity, "system": p.system,
                "fraction": p.fraction, "probabilities": p.probabilities} for p in fit.peaks],
        deconvolution=None if dec is None else {
            "peaks_ppm": [p.ppm for p in dec.peaks], "assignment": list(dec.assignment),
            "assignment_probability": dec.assignment_probability,
            "order_probability": dec.order_probability,
            "order_probability_prior": dec.order_probability_prior,
            "fractions": dec.fractions, "fraction_errors": dec.fraction_errors,
            "success": dec.success, "message": dec.message, "merged": list(dec.merged)})


def fit_record(store: RunStore) -> dict | None:
    """The fit's attributes (see :func:`put_fit`) with its curves under ``curves`` (ppm,
    measured, model, components, baseline, residual); None when the store holds no fit."""
    if not store.exists(f"{FIT_GROUP}/model"):
        return None
    record = dict(store.attrs(FIT_GROUP))
    record["curves"] = {name: store.read(f"{FIT_GROUP}/{name}") for name in (
        "ppm", "measured", "model", "components", "baseline", "residual")
        if store.exists(f"{FIT_GROUP}/{name}")}
    return record


def _interval(fit: dict, k: int) -> tuple[float, float]:
    intervals = fit.get("fraction_intervals")
    if intervals is not None and len(intervals):
        return float(intervals[k][0]), float(intervals[k][1])
    f, e = fit["fractions"][k], fit["fraction_errors"][k]  # a fit written before intervals
    return max(0.0, f - 1.96 * e), min(1.0, f + 1.96 * e)


def fit_lines(fit: dict) -> list[str]:
    """The fit in words: one line per system (fraction +- sd, 95 % interval, line position,
    convergence), the offset, each measured peak's assignment probabilities, the paper's
    deconvolution route, then the statements and warnings."""
    lines = []
    for k, name in enumerate(fit["systems"]):
        low, high = _interval(fit, k)
        converged = fit.get("converged", [True] * len(fit["systems"]))[k]
        where = (f"; line at {fit['positions_ppm'][k]:.1f} +- "
                 f"{fit['position_errors_ppm'][k]:.1f} ppm" if "positions_ppm" in fit else "")
        lines.append(f"{name}: fraction {fit['fractions'][k]:.3f} +- "
                     f"{fit['fraction_errors'][k]:.3f} (95% {low:.3f}-{high:.3f}){where}"
                     + ("" if converged else " [prediction not converged]"))
    interval = fit.get("offset_interval_ppm")
    lines.append(f"offset {fit['offset_ppm']:.1f} +- {fit['offset_error_ppm']:.1f} ppm"
                 + (f" (95% {interval[0]:.1f} to {interval[1]:.1f})"
                    if interval is not None else "")
                 + f"; residual rms {fit['residual_rms_rel']:.3g} of the tallest point"
                 + ("" if fit.get("separable", True) else "; NOT SEPARABLE (see notes)"))
    shapes = fit.get("shape_models") or {}
    if len(shapes) > 1:
        lines.append("shape models (posterior weight; fractions under each): " + "; ".join(
            f"{f} {r['weight']:.2f} (" + ", ".join(
                f"{n} {v:.3f}" for n, v in r["fractions"].items() if v == v) + ")"
            for f, r in shapes.items()))
    for peak in fit.get("peaks", []):
        probs = peak.get("probabilities") or {peak["system"]: 1.0}
        said = ", ".join(f"{n} {p:.2f}" for n, p in sorted(probs.items(), key=lambda kv: -kv[1])
                         if p >= 0.005)
        lines.append(f"measured peak at {peak['ppm']:.1f} ppm: {peak['system']} "
                     f"(probability of each assignment: {said})")
    dec = fit.get("deconvolution")
    if dec:
        at = ", ".join(f"{p:.1f}" for p in dec["peaks_ppm"])
        lines.append(f"paper's route (free peaks at {at} ppm): assigned "
                     f"{'/'.join(dec['assignment'])} with probability "
                     f"{dec['assignment_probability']:.2f}; fractions " + ", ".join(
                         f"{n} {v:.3f} +- {dec['fraction_errors'][n]:.3f}"
                         for n, v in dec["fractions"].items())
                     + ("; not resolved by free peaks, so neither its order nor its split "
                        "holds: " + "; ".join(dec["merged"]) if dec.get("merged") else ""))
    lines += [f"note: {s}" for s in fit.get("statements", [])]
    lines += [f"warning: {w}" for w in fit.get("warnings", [])]
    if not fit.get("success", True):
        lines.append(f"warning: the fit did not converge: {fit.get('message')}")
    return lines


def path(*parts: str) -> str:
    """Store path of a member of this group: ``path(system, "sites/occupation")``; ``path()``
    is the group itself."""
    return "/".join((GROUP, *parts))


def fit_path(*parts: str) -> str:
    """Store path of a member of the fit's subgroup (``fit_path()``: the subgroup)."""
    return "/".join((FIT_GROUP, *parts))
