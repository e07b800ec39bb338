"""The report stage and `dynshift report STORE`: PNG figures and a Markdown summary.

Reads ``/analyze/<system>`` (docs/analyze.md) and, when present, the training cross-validation
``/train/cv/shift_dft_ppm`` and ``shift_pred_ppm``; writes into one folder:

- ``summary.md``: the paper's Table 1 in shape (sites, occupations, site-centred shifts) and
  the averages (mean shift +- block error, D), with the figures linked;
- ``histograms.png`` (cf. Lin et al. Fig. 3a), ``maps_<system>.png`` (Fig. 3b/c),
  ``running_average.png`` (Fig. S11), ``msd.png`` (md sources), ``parity.png`` (training).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.stages import StageInputs, StageResult
from engine.store import RunStore
from jobs.layouts.analyze import arrhenius_bases, arrhenius_path, path as analyze_path
from jobs.layouts.spectrum import fit_lines, fit_record, path as spectrum_path
from jobs.layouts.train import cv_path
from schemas.report import ReportSpec

CLASS_COLOURS = {"Na_edge": "tab:red", "unassigned": "0.6"}
"""Fixed colours of some site classes; face-sharing classes take tab10 colours in order."""


def default_out_dir(store_path: str | Path) -> Path:
    """``<store stem>-report/`` beside the store."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}-report")


def _colours(class_names) -> dict:
    palette = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown",
                    "tab:pink", "tab:olive", "tab:cyan"])
    return {name: CLASS_COLOURS.get(name) or next(palette, "k") for name in class_names}


def _save_figure(fig, path: Path, spec, tight: bool = True) -> str:
    """Write a figure as PNG at the report's dpi, close it, and return its file name."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=spec.dpi)
    plt.close(fig)
    return path.name


def _spec_from_store(store: RunStore) -> ReportSpec:
    """The report settings of the manifest recorded in the store (defaults when absent)."""
    import yaml

    text = store.attrs("/").get("manifest_yaml")
    try:
        section = (yaml.safe_load(text) or {}).get("report") if text else None
        return ReportSpec.model_validate(section or {})
    except Exception:  # noqa: BLE001 - a report of an odd store still gets written
        return ReportSpec()


def report_from_store(store_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the figures and summary.md of a run store; returns the summary's path.

    Parameters
    ----------
    store_path
        The run store (opened read-only, serially).
    out_dir
        Output folder; default ``<store stem>-report/`` beside the store.

    Raises
    ------
    engine.store.StoreDamaged
        When the store cannot be read (checked before anything is opened or written).
    """
    store_path = Path(store_path)
    from engine.store import check_store

    check_store(store_path)  # StoreDamaged (exit 2 in the CLI) before h5py meets a bad file
    with RunStore(store_path, None, mode="r") as store:
        spec = _spec_from_store(store)
        return write_report(store, Path(out_dir) if out_dir else default_out_dir(store_path),
                            spec)


ANALYZE_SUBGROUPS = ("blocks", "sites", "histogram", "running", "maps", "msd", "dynamics")
"""Subgroups of /analyze/<system> (docs/analyze.md) that the report reads."""
UNREAD = {"site"}
"""Datasets the report does not read (the per-frame site of every nucleus: large)."""


class ReportData:
    """The part of a store that the report shows, read in one pass, with the store's reading
    interface (``exists``, ``read``, ``attrs``, ``keys``).

    In the report stage EVERY rank reads it (the same reads in the same order keep the
    ranks' parallel-HDF5 metadata caches alike; reads on rank 0 alone can leave the next
    collective metadata call hanging); only rank 0 then draws.
    """

    def __init__(self, store: RunStore):
        self._arrays: dict[str, np.ndarray] = {}
        self._attrs: dict[str, dict] = {}
        self._keys: dict[str, list[str]] = {}
        self.stage_status = store.stage_statuses()
        """Stage name -> its recorded status (engine.store)."""
        self.label_screens = {name: store.stage_summary(name)["label_screen"]
                              for name in ("potential", "train")
                              if "label_screen" in store.stage_summary(name)}
        """Stage -> the sentence of its label screen (jobs/label_screen.py), where it ran."""
        self._remember_group(store, analyze_path())
        self.arrhenius = {}
        """Base system -> (arrays, attrs) of its Arrhenius fits (md.temperatures_k)."""
        for base in arrhenius_bases(store):
            group = arrhenius_path(base)
            self.arrhenius[base] = ({key: store.read(f"{group}/{key}")
                                     for key in store.keys(group)}, store.attrs(group))
        for name in store.keys(analyze_path()):
            self._remember_group(store, analyze_path(name))
            for sub in ANALYZE_SUBGROUPS:
                group = analyze_path(name, sub)
                self._remember_group(store, group)
                for key in store.keys(group):
                    if key not in UNREAD:
                        self._arrays[f"{group}/{key}"] = store.read(f"{group}/{key}")
        self._remember_group(store, spectrum_path())
        for name in store.keys(spectrum_path()):
            group = spectrum_path(name)
            self._remember_group(store, group)
            for key in store.keys(group):
                self._arrays[f"{group}/{key}"] = store.read(f"{group}/{key}")
        for key in ("shift_dft_ppm", "shift_pred_ppm"):
            if store.exists(cv_path(key)):
                self._arrays[cv_path(key)] = store.read(cv_path(key))
        from jobs.layouts.learn import campaign_lines, has_history

        self.campaign = campaign_lines(store) if has_history(store) else []
        """The learn campaign's history in words (jobs.layouts.learn.campaign_lines), if any."""

    def _remember_group(self, store: RunStore, group: str) -> None:
        if store.exists(group):
            self._attrs[group] = store.attrs(group)
            self._keys[group] = store.keys(group)

    def exists(self, name: str) -> bool:
        """True for a remembered dataset or group."""
        return name in self._arrays or name in self._keys

    def read(self, name: str) -> np.ndarray:
        """A remembered dataset."""
        return self._arrays[name]

    def attrs(self, name: str = "/") -> dict:
        """Attributes of a remembered group ({} otherwise)."""
        return self._attrs.get(name, {})

    def keys(self, name: str = "/") -> list[str]:
        """Members of a remembered group ([] otherwise)."""
        return self._keys.get(name, [])


def write_report(store: RunStore, out_dir: Path, spec: ReportSpec) -> Path:
    """Write every figure the store supports and summary.md into `out_dir`.

    Returns
    -------
    Path
        The summary.md written.
    """
    return render_report(ReportData(store), out_dir, spec)


def _systems(store) -> list[str]:
    return [name for name in store.keys(analyze_path())
            if store.exists(analyze_path(name, "sites/occupation"))]


def render_report(store: ReportData, out_dir: Path, spec: ReportSpec) -> Path:
    """Draw the figures and write summary.md from data already read (no store access)."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    systems = _systems(store)
    figures: list[tuple[str, str]] = []
    if systems:
        figures.append(("Shift histograms by site (cf. Fig. 3a)",
                        _histograms(store, systems, out_dir, spec)))
        for name in systems:
            figures.append((f"xy maps of {name} (cf. Fig. 3b/c)",
                            _maps(store, name, out_dir, spec)))
        figures.append(("Running averages vs simulated time (cf. Fig. S11)",
                        _running(store, systems, out_dir, spec)))
        md = [n for n in systems if store.exists(analyze_path(n, "msd/msd_a2"))]
        if md:
            figures.append(("Na in-plane mean squared displacement", _msd(store, md, out_dir,
                                                                          spec)))
    arrhenius = getattr(store, "arrhenius", {})
    if arrhenius:
        figures.append(("Arrhenius plot: escape rate and D over the md temperatures",
                        _arrhenius(arrhenius, out_dir, spec)))
    spectra = [n for n in store.keys(spectrum_path()) if n != "fit"
               and store.exists(spectrum_path(n, "intensity"))]
    if spectra:
        figures.append(("Predicted isotropic spectra (exchange line shapes)",
                        _spectra(store, spectra, out_dir, spec)))
    fit = fit_record(store)
    if fit is not None:
        figures.append(("Measured spectrum, the fitted mixture and its residual",
                        _fit(fit, out_dir, spec)))
    parity = None
    if store.exists(cv_path("shift_dft_ppm")) and store.exists(cv_path("shift_pred_ppm")):
        parity = _parity(store, out_dir, spec)
        figures.append(("NN-NMR cross-validation parity (cf. Fig. 2)", parity[0]))
    summary = out_dir / "summary.md"
    summary.write_text(_summary(store, systems, figures, parity))
    return summary


# ---- figures -------------------------------------------------------------------------------
def _histograms(store, systems, out_dir, spec) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(systems), 1, figsize=(6.4, 2.6 * len(systems) + 0.6),
                             squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], systems):
        group = analyze_path(name, "histogram")
        edges = store.read(f"{group}/edges_ppm")
        counts = store.read(f"{group}/counts").astype(float)
        total = store.read(f"{group}/total_counts").astype(float)
        classes = store.attrs(analyze_path(name, "sites"))["class_names"]
        occupation = store.read(analyze_path(name, "sites/occupation"))
        colours = _colours(classes)
        norm = max(total.sum(), 1.0) * np.diff(edges)  # probability density per ppm
        centres = 0.5 * (edges[1:] + edges[:-1])
        ax.plot(centres, total / norm, color="k", lw=1.4, label="all Na")
        for k, cls in enumerate(classes):
            if counts[k].sum() == 0:
                continue
            ax.fill_between(centres, counts[k] / norm, step="mid", alpha=0.45,
                            color=colours[cls], label=f"{cls} ({occupation[k]:.3f})")
        mean = store.attrs(analyze_path(name))["mean_shift_ppm"]
        ax.axvline(mean, color="k", ls="--", lw=0.8)
        ax.set_ylabel("density (1/ppm)")
        ax.set_title(f"{name}: mean {mean:.0f} ppm", fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        if spec.histogram_xlim_ppm:
            ax.set_xlim(*spec.histogram_xlim_ppm)
        else:
            filled = np.flatnonzero(total > 0)
            if len(filled):
                ax.set_xlim(edges[filled[0]] - 100, edges[filled[-1] + 1] + 100)
    axes[-1, 0].set_xlabel("23Na shift (ppm)")
    return _save_figure(fig, out_dir / "histograms.png", spec)


def _maps(store, name, out_dir, spec) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    group = analyze_path(name)
    mean = store.read(f"{group}/maps/mean_shift_ppm")
    std = store.read(f"{group}/maps/std_shift_ppm")
    density = store.read(f"{group}/maps/density_per_a2")
    count = store.read(f"{group}/maps/count")
    map_attrs = store.attrs(f"{group}/maps")
    cell = np.array(map_attrs["cell_a"])
    slab_z = map_attrs["slab_z_frac"]
    sites = store.attrs(f"{group}/sites")
    classes, radius = sites["class_names"], sites["radius_a"]
    centres = store.read(f"{group}/sites/centres_frac")
    site_class = store.read(f"{group}/sites/site_class")
    site_slab = store.read(f"{group}/sites/site_slab")
    colours = _colours(classes)
    n_slabs, n_bins = mean.shape[0], mean.shape[1]
    grid = np.linspace(0.0, 1.0, n_bins + 1)
    fa, fb = np.meshgrid(grid, grid, indexing="ij")
    x = fa * cell[0, 0] + fb * cell[1, 0]
    y = fa * cell[0, 1] + fb * cell[1, 1]
    minimum = max(2.0, 1e-3 * count.sum() / count.size)  # too few samples: left grey
    fig, axes = plt.subplots(n_slabs, 3, figsize=(13, 3.6 * n_slabs + 0.4), squeeze=False)
    panels = (("mean shift (ppm)", "coolwarm"), ("shift std (ppm)", "viridis"),
              ("Na density (1/A^2)", "magma"))
    for s in range(n_slabs):
        values = (np.ma.masked_where(count[s] < minimum, mean[s]),
                  np.ma.masked_where(count[s] < minimum, std[s]), density[s])
        for col, ((label, cmap), data) in enumerate(zip(panels, values)):
            ax = axes[s, col]
            ax.set_facecolor("0.85")
            mesh = ax.pcolormesh(x, y, data, cmap=cmap, shading="flat")
            fig.colorbar(mesh, ax=ax, shrink=0.8, label=label)
            for centre, k in zip(centres[site_slab == s], site_class[site_slab == s]):
                xy = centre[:2] @ cell[:2, :2]
                ax.add_patch(Circle(xy, radius, fill=False, lw=0.8, color=colours[classes[k]]))
            ax.set_aspect("equal")
            ax.set_xlabel("x (A)")
            ax.set_ylabel("y (A)")
            ax.set_title(f"{name}, slab z = {slab_z[s]:.2f} c", fontsize=9)
    handles = [plt.Line2D([], [], color=colours[c], marker="o", ls="", mfc="none", label=c)
               for c in classes if c != "unassigned"]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save_figure(fig, out_dir / f"maps_{name}.png", spec, tight=False)


def _time_unit(longest_fs: float) -> tuple[float, str]:
    """(factor from fs, unit): ns for runs of a ns or more, ps below."""
    return (1e-6, "ns") if longest_fs >= 1e6 else (1e-3, "ps")


def _time_axis(store, group) -> tuple[np.ndarray, str]:
    if store.exists(f"{group}/running/time_fs"):
        t = store.read(f"{group}/running/time_fs")
        factor, unit = _time_unit(float(np.max(t)) if len(t) else 0.0)
        return t * factor, f"simulated time ({unit})"
    return store.read(f"{group}/running/frame_index"), "frame"


def _running(store, systems, out_dir, spec) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(systems), figsize=(5.2 * len(systems), 3.8), squeeze=False)
    for ax, name in zip(axes[0], systems):
        group = analyze_path(name)
        t, label = _time_axis(store, group)
        classes = store.attrs(f"{group}/sites")["class_names"]
        colours = _colours(classes)
        per_centre = store.read(f"{group}/running/centre_shift_ppm")
        ax.plot(t, per_centre, color="0.8", lw=0.5)
        per_class = store.read(f"{group}/running/class_shift_ppm")
        for k, cls in enumerate(classes):
            if cls != "unassigned" and np.isfinite(per_class[:, k]).any():
                ax.plot(t, per_class[:, k], color=colours[cls], lw=1.2, label=cls)
        ax.plot(t, store.read(f"{group}/running/mean_shift_ppm"), color="k", lw=1.8,
                label="all Na")
        ax.set_xlabel(label)
        ax.set_ylabel("running average shift (ppm)")
        ax.set_title(f"{name} (grey: each Na)", fontsize=10)
        ax.legend(fontsize=7, frameon=False)
    return _save_figure(fig, out_dir / "running_average.png", spec)


def _arrhenius(fits: dict, out_dir, spec) -> str:
    """ln(escape rate) and ln(D) against 1000/T per base system, with their fits."""
    import matplotlib.pyplot as plt

    from engine.stats import BOLTZMANN_EV_K

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    for base, (arrays, attrs) in fits.items():
        t = np.asarray(arrays["temperature_k"], dtype=float)
        for ax, key, values, errors in (
                (axes[0], "hop", arrays["escape_rate_per_ps"],
                 arrays["escape_rate_err_per_ps"]),
                (axes[1], "d", arrays["d_cm2_s"], None)):
            values = np.asarray(values, dtype=float)
            ok = np.isfinite(values) & (values > 0)
            if not np.any(ok):
                continue
            yerr = None if errors is None else np.asarray(errors, dtype=float)[ok]
            line = ax.errorbar(1000.0 / t[ok], values[ok], yerr=yerr, fmt="o", ms=4,
                               label=base)
            if attrs.get(f"{key}_fit") == "ok":
                grid = np.linspace(min(t.min(), 300.0), t.max(), 50)
                fitted = np.exp(attrs[f"{key}_ln_prefactor"]
                                - attrs[f"{key}_activation_ev"] / (BOLTZMANN_EV_K * grid))
                ax.plot(1000.0 / grid, fitted, "--", color=line[0].get_color(),
                        label=f"{base}: E_a {attrs[f'{key}_activation_ev']:.2f} +- "
                              f"{attrs[f'{key}_activation_err_ev']:.2f} eV")
    for ax, label in zip(axes, ("escape rate (1/ps)", "D (cm2/s)")):
        if not ax.lines and not ax.collections:
            ax.text(0.5, 0.5, "no temperature with a value\n(D: none diffusive)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_ylabel(label)
            continue
        ax.set_yscale("log")
        ax.set_xlabel("1000 / T (1/K); dashed: Arrhenius fit (to 300 K)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, frameon=False)
    return _save_figure(fig, out_dir / "arrhenius.png", spec)


def _msd(store, systems, out_dir, spec) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    longest = max(float(np.max(store.read(analyze_path(n, "msd/lag_fs")))) for n in systems)
    factor, unit = _time_unit(longest)
    for name in systems:
        group = analyze_path(name, "msd")
        lag = store.read(f"{group}/lag_fs") * factor
        attrs = store.attrs(group)
        diffusive = attrs.get("diffusive", True)
        label = (f"{name}: D = {attrs['d_cm2_s']:.2g} cm2/s" if diffusive
                 else f"{name}: not diffusive over this run, no D")
        line, = ax.plot(lag, store.read(f"{group}/msd_a2"), "o-", ms=3, label=label)
        start, end = attrs["fit_window_fs"]
        if diffusive:
            fit_t = np.linspace(start, end, 20)
            ax.plot(fit_t * factor, attrs["slope_a2_fs"] * fit_t + attrs["intercept_a2"], "--",
                    color="k", lw=1.2)
        ax.axvspan(start * factor, end * factor, color=line.get_color(), alpha=0.08)
        spacing = attrs.get("site_spacing_a")
        if spacing:
            ax.axhline(spacing ** 2, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel(f"lag ({unit}); shaded: fit window, dashed: fit (diffusive only), "
                  "dotted: site spacing^2", fontsize=8)
    ax.set_ylabel("in-plane MSD (A^2)")
    ax.legend(fontsize=8, frameon=False)
    return _save_figure(fig, out_dir / "msd.png", spec)


def _spectra(store, systems, out_dir, spec) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(systems), 1, figsize=(6.4, 2.4 * len(systems) + 0.6),
                             squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], systems):
        group = spectrum_path(name)
        ppm, lines = store.read(f"{group}/ppm"), store.read(f"{group}/intensity")
        temperatures = store.read(f"{group}/temperatures_k")
        for k, (t, line) in enumerate(zip(temperatures, lines)):
            ax.plot(ppm, line, lw=1.4 if k == 0 else 0.9, label=f"{t:g} K")
        attrs = store.attrs(group)
        ax.set_title(f"{name}: {str(attrs.get('regime', '')).split(' (')[0]}", fontsize=9)
        ax.set_ylabel("intensity (1/ppm)")
        ax.legend(fontsize=7, frameon=False)
    axes[-1, 0].set_xlabel("shift (ppm); isotropic lines only, no spinning sidebands")
    axes[-1, 0].invert_xaxis()
    return _save_figure(fig, out_dir / "spectra.png", spec)


def _fit(fit: dict, out_dir, spec) -> str:
    """Overlay of the fit: measured, model, each component (over the baseline) and the
    baseline; below it the residual; the legend gives each fraction with its 95 % interval."""
    import matplotlib.pyplot as plt

    curves = fit["curves"]
    ppm = curves["ppm"]
    baseline = curves.get("baseline", np.full_like(ppm, fit.get("baseline", 0.0)))
    fig, (ax, low) = plt.subplots(2, 1, figsize=(6.4, 4.8), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(ppm, curves["measured"], color="k", lw=1.0, label="measured")
    ax.plot(ppm, curves["model"], color="C3", lw=1.2, label="fitted mixture")
    for k, (name, component) in enumerate(zip(fit["systems"], curves["components"])):
        lo, hi = fit["fraction_intervals"][k] if "fraction_intervals" in fit else (np.nan,) * 2
        ax.plot(ppm, component + baseline, "--", lw=0.9,
                label=f"{name}: {fit['fractions'][k]:.2f} (95% {lo:.2f}-{hi:.2f})")
    ax.plot(ppm, baseline, ":", color="0.5", lw=0.8, label="baseline")
    ax.set_ylabel("intensity")
    ax.legend(fontsize=7, frameon=False)
    residual = curves.get("residual", curves["measured"] - curves["model"])
    low.plot(ppm, residual, color="0.3", lw=0.7)
    low.axhline(0.0, color="C3", lw=0.6)
    low.set_ylabel("residual")
    low.set_xlabel(f"shift (ppm); predicted lines moved by {fit['offset_ppm']:.0f} ppm")
    low.invert_xaxis()
    if not fit.get("separable", True):
        ax.set_title("not separable: see the notes in summary.md", fontsize=8)
    return _save_figure(fig, out_dir / "spectrum_fit.png", spec)


def _spectrum_lines(store) -> list[str]:
    """The spectra's regimes, and the fit's fractions and peak assignments."""
    names = [n for n in store.keys(spectrum_path()) if n != "fit"
             and store.exists(spectrum_path(n, "intensity"))]
    if not names:
        return []
    lines = ["", "## Spectra", "",
             "Isotropic lines only (no spinning sidebands, no quadrupolar shift): Bloch-McConnell "
             "exchange of the site classes' mean shifts with the hop-rate matrix of the md, at "
             "the manifest's field and intrinsic line width; rates are held at the md "
             "temperature (one md temperature per manifest: no Arrhenius extrapolation).", ""]
    for name in names:
        attrs = store.attrs(spectrum_path(name))
        shifts = ", ".join(f"{c} {p:.3f} at {_fmt(x)} ppm" for c, p, x in zip(
            attrs.get("class_names", []), attrs.get("populations", []),
            attrs.get("shift_ppm", [])))
        lines.append(f"- **{name}** ({attrs.get('larmor_mhz', float('nan')):.2f} MHz): "
                     f"{attrs.get('regime')}; populations {shifts}"
                     + ("" if attrs.get("converged") else
                        " (from averages that are not converged: see Convergence)") + ".")
    fit = fit_record(store)
    if fit is not None:
        failed = "" if fit.get("success") else f" (the fit did not converge: {fit.get('message')})"
        lines += ["", f"### Fit of {fit['source']}", "",
                  f"Measured = sum of the predicted lines (at {fit['temperature_k']:g} K), each "
                  f"at its prediction + one common offset ({fit['offset_ppm']:.1f} +- "
                  f"{fit['offset_error_ppm']:.1f} ppm) + its own deviation, broadened per "
                  f"system, over a polynomial baseline; posterior by emcee (docs/spectrum.md). "
                  f"Residual RMS {fit['residual_rms_rel']:.3g} of the tallest point{failed}.",
                  "", "| system | fraction | sd | 95 % interval | line (ppm) | own deviation "
                  "(ppm) | prior sd (ppm) | extra FWHM (ppm) | prediction |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for k, name in enumerate(fit["systems"]):
            lo, hi = fit["fraction_intervals"][k]
            lines.append(
                f"| {name} | {fit['fractions'][k]:.3f} | {_fmt(fit['fraction_errors'][k], 3)} "
                f"| {lo:.3f}-{hi:.3f} | {_fmt(fit['positions_ppm'][k], 1)} +- "
                f"{_fmt(fit['position_errors_ppm'][k], 1)} | "
                f"{fit['deviations_ppm'][k]:+.1f} +- {_fmt(fit['deviation_errors_ppm'][k], 1)} "
                f"| {_fmt(fit['position_sd_ppm'][k])} | {_fmt(fit['widths_ppm'][k], 1)} | "
                + ("converged" if fit["converged"][k] else "not converged") + " |")
        if fit.get("peaks"):
            names = list(fit["systems"])
            lines += ["", "| measured peak (ppm) | assigned to | "
                      + " | ".join(f"p({n})" for n in names) + " |",
                      "| ---: | --- | " + " | ".join("---:" for _ in names) + " |"]
            for peak in fit["peaks"]:
                probs = peak.get("probabilities", {})
                lines.append(f"| {peak['ppm']:.1f} | {peak['system']} | " + " | ".join(
                    f"{probs.get(n, float('nan')):.2f}" for n in names) + " |")
        said = [line for line in fit_lines(fit) if line.startswith(("paper's route", "note:",
                                                                    "warning:"))]
        if said:
            lines += [""] + [f"- {line}" for line in said]
    return lines


def _parity(store, out_dir, spec) -> tuple[str, float, float, int]:
    import matplotlib.pyplot as plt

    dft = np.asarray(store.read(cv_path("shift_dft_ppm")), dtype=float).ravel()
    pred = np.asarray(store.read(cv_path("shift_pred_ppm")), dtype=float).ravel()
    keep = np.isfinite(dft) & np.isfinite(pred)
    dft, pred = dft[keep], pred[keep]
    rmse = float(np.sqrt(np.mean((pred - dft) ** 2))) if len(dft) else float("nan")
    r2 = (float(1 - np.sum((pred - dft) ** 2) / np.sum((dft - dft.mean()) ** 2))
          if len(dft) > 1 else float("nan"))
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if len(dft) > 2000:
        ax.hexbin(dft, pred, gridsize=80, mincnt=1, bins="log", cmap="viridis")
    else:
        ax.scatter(dft, pred, s=4, alpha=0.5)
    if len(dft):
        low, high = min(dft.min(), pred.min()), max(dft.max(), pred.max())
        ax.plot([low, high], [low, high], "k--", lw=0.8)
    ax.set_xlabel("DFT shift (ppm)")
    ax.set_ylabel("NN-NMR shift (ppm)")
    ax.set_title(f"CV test: RMSE {rmse:.0f} ppm, R2 {r2:.3f}, n = {len(dft)}", fontsize=9)
    ax.set_aspect("equal")
    return _save_figure(fig, out_dir / "parity.png", spec), rmse, r2, int(len(dft))


# ---- summary -------------------------------------------------------------------------------
def _fmt(value: float, digits: int = 0) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _summary(store, systems, figures, parity) -> str:
    lines = ["# dynshift report", ""]
    from schemas.manifest import STAGE_ORDER

    recorded = store.stage_status
    stages = {name: recorded[name] for name in STAGE_ORDER
              if name in recorded and name != "report"}
    if stages:
        lines += ["Stages: " + ", ".join(f"{k} ({v})" for k, v in stages.items()), ""]
    if not systems:
        lines += ["No analysed systems in this store (run the analyze stage).", ""]
    else:
        lines += ["## Sites (cf. Lin et al., Chem. Sci. 2022, Table 1)", "",
                  "Site-centred shifts: Na within the site radius of a prism centre in the "
                  "xy plane; occupation: fraction of all Na samples (frames x Na); +- is the "
                  "blocking standard error, given only where the system's averages are "
                  "converged (see Convergence).", "",
                  "The model sigma is the mean predicted uncertainty of the shifts (NN-NMR: "
                  "ensemble spread; GPR: calibrated sigma); model errors are correlated, so it "
                  "is not reduced by averaging and stands beside the statistical error.", "",
                  "| system | site | occupation | centred shift (ppm) | +- (ppm) | model sigma "
                  "(ppm) | samples |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name in systems:
            group = analyze_path(name, "sites")
            classes = store.attrs(group)["class_names"]
            sigma = (store.read(f"{group}/ensemble_std_ppm")
                     if store.exists(f"{group}/ensemble_std_ppm") else [np.nan] * len(classes))
            rows = zip(classes, store.read(f"{group}/occupation"),
                       store.read(f"{group}/shift_ppm"), store.read(f"{group}/shift_stderr_ppm"),
                       sigma, store.read(f"{group}/samples"))
            for cls, occ, shift, err, model, n in rows:
                if n == 0:
                    lines.append(f"| {name} | {cls} | 0 | no samples | - | - | 0 |")
                    continue
                lines.append(f"| {name} | {cls} | {occ:.3f} | {_fmt(shift)} | {_fmt(err)} | "
                             f"{_fmt(model)} | {int(n)} |")
        lines += ["", "## Averages", "",
                  "| system | source | frames | Na | mean shift (ppm) | +- (ppm) | model sigma "
                  "(ppm) | D (cm2/s) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in systems:
            attrs = store.attrs(analyze_path(name))
            d = attrs.get("d_cm2_s", float("nan"))
            err = attrs["mean_shift_stderr_ppm"]
            d_text = (f"{d:.3g}" if np.isfinite(d) else "not diffusive"
                      if store.exists(analyze_path(name, "msd/msd_a2")) else "-")
            lines.append(f"| {name} | {attrs.get('kind')} | {attrs.get('n_frames')} | "
                         f"{attrs.get('n_centres')} | {_fmt(attrs['mean_shift_ppm'], 1)} | "
                         f"{_fmt(err, 1) if np.isfinite(err) else 'not converged'} | "
                         f"{_fmt(attrs.get('mean_shift_model_sigma_ppm', float('nan')), 1)} | "
                         f"{d_text} |")
        lines += _convergence(store, systems)
        lines += _deviation_lines(store, systems)
        drifting = [n for n in systems
                    if not store.attrs(analyze_path(n)).get("framework_drift_corrected")]
        if drifting:
            lines += ["", f"Note: no framework drift correction for {', '.join(drifting)} "
                      "(the infer stage wrote no framework_drift_a)."]
    lines += _spectrum_lines(store)
    lines += _arrhenius_lines(getattr(store, "arrhenius", {}))
    screens = getattr(store, "label_screens", {})
    if screens:
        lines += ["", "## Labels screened before training (jobs/label_screen.py)", ""]
        lines += [f"- {stage}: {sentence}" for stage, sentence in screens.items()]
    if getattr(store, "campaign", None):
        lines += ["", "## Learn campaign (concurrent learning, docs/learn.md)", ""]
        lines += [f"- {line}" for line in store.campaign]
    if parity is not None:
        _, rmse, r2, n = parity
        lines += ["", "## Shift-model cross-validation", "",
                  f"Out-of-fold RMSE {rmse:.1f} ppm, R2 {r2:.4f} over {n} Na, split by frame "
                  f"(paper's NN-NMR: 125 ppm, 0.96, split by atom)."]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- {title}: ![{title}]({path})" for title, path in figures]
    return "\n".join(lines) + "\n"


def _arrhenius_lines(fits: dict) -> list[str]:
    """The Arrhenius fits in words: per base, E_a and the 300 K value with errors, or why none."""
    if not fits:
        return []
    lines = ["", "## Over temperature (Arrhenius fits, docs/analyze.md)", ""]
    for base, (arrays, attrs) in fits.items():
        temps = ", ".join(f"{t:g}" for t in arrays["temperature_k"])
        for key, what, unit in (("hop", "escape rate", "1/ps"), ("d", "D", "cm2/s")):
            if attrs.get(f"{key}_fit") != "ok":
                lines.append(f"- {base} {what} ({temps} K): {attrs.get(f'{key}_fit', 'none')}")
                continue
            where = " (extrapolated)" if attrs.get(f"{key}_300k_extrapolated") else ""
            lines.append(f"- {base} {what} ({temps} K): E_a {attrs[f'{key}_activation_ev']:.3f} "
                         f"+- {attrs[f'{key}_activation_err_ev']:.3f} eV, at 300 K "
                         f"{attrs[f'{key}_at_300k']:.3g} +- {attrs[f'{key}_at_300k_err']:.2g} "
                         f"{unit}{where}")
    return lines


def _convergence(store, systems) -> list[str]:
    """The verdict of every system and its site dynamics, in words and tables."""
    lines = ["", "## Convergence", ""]
    for name in systems:
        attrs = store.attrs(analyze_path(name))
        verdict = attrs.get("verdict") or "no verdict (analysed by an older dynshift)"
        line = f"- **{name}**: {verdict}."
        if not attrs.get("converged") and np.isfinite(attrs.get(
                "mean_shift_stderr_lower_bound_ppm", float("nan"))):
            bound = _fmt(attrs["mean_shift_stderr_lower_bound_ppm"], 1)
            line += (f" The mean {_fmt(attrs['mean_shift_ppm'], 1)} ppm is "
                     + ("not yet a dynamic average; " if attrs.get("kind") == "md" else "")
                     + f"its blocking error ({bound} ppm) is only a lower bound.")
        msd = store.attrs(analyze_path(name, "msd"))
        if msd and not msd.get("diffusive", True):
            line += f" No D: not diffusive over this run ({msd.get('not_diffusive_reason')})."
        if attrs.get("thermostat"):
            line += f" Dynamics from md with {attrs['thermostat']}."
        lines.append(line)
    for name in systems:
        group = analyze_path(name, "dynamics")
        if not store.exists(f"{group}/rate_per_ps"):
            continue
        dyn = store.attrs(group)
        classes = dyn["class_names"]
        rate, err = store.read(f"{group}/rate_per_ps"), store.read(f"{group}/rate_err_per_ps")
        counts = store.read(f"{group}/hop_counts")
        residence = store.read(f"{group}/residence_mean_fs")
        res_err = store.read(f"{group}/residence_stderr_fs")
        res_n = store.read(f"{group}/residence_count")
        lines += ["", f"### Site dynamics of {name}", "",
                  f"{dyn['hops_total']} hops ({dyn['hops_per_nucleus']:.2f} per Na); shift "
                  f"correlation time {_time_words(dyn)}.", "",
                  "| from \\ to | " + " | ".join(classes) + " | mean residence |",
                  "| --- | " + " | ".join("---:" for _ in classes) + " | ---: |"]
        for a, cls in enumerate(classes):
            cells = [f"{rate[a, b]:.3g} +- {err[a, b]:.2g} /ps ({int(counts[a, b])})"
                     if counts[a, b] > 0 else
                     (f"< {err[a, b]:.2g} /ps (0)" if np.isfinite(err[a, b]) else "no time here")
                     for b in range(len(classes))]
            stay = (f"{residence[a] * 1e-3:.3g} +- {res_err[a] * 1e-3:.2g} ps ({int(res_n[a])})"
                    if res_n[a] > 1 else f"{residence[a] * 1e-3:.3g} ps (1)" if res_n[a] == 1
                    else "none complete")
            lines.append(f"| {cls} | " + " | ".join(cells) + f" | {stay} |")
        lines += ["", "Rates: hops / time spent in the row's class (hops counted in "
                  "parentheses; +- the counting error; '<' an upper bound where none was "
                  "seen). Residence: between two hops of one Na (runs' first and last stays "
                  "are censored, not counted)."]
    return lines


WARN_ABOVE_TRUST_HI = 0.01
"""Fraction of a system's md frames above trust_hi beyond which the report warns."""


def _deviation_lines(store, systems) -> list[str]:
    """The share of md frames that the DP model ensemble trusts (analyze's attrs), per system,
    and a warning for a system with more than 1 % of its frames above trust_hi."""
    rows, warnings = [], []
    for name in systems:
        attrs = store.attrs(analyze_path(name))
        n = int(attrs.get("deviation_frames", 0) or 0)
        if n <= 0:
            continue
        above, below = attrs["fraction_above_trust_hi"], attrs["fraction_below_trust_lo"]
        hi, lo = attrs["trust_hi_ev_a"], attrs["trust_lo_ev_a"]
        rows.append(f"| {name} | {n} | {100 * below:.1f} % (< {lo:g} eV/A) | "
                    f"{100 * above:.1f} % (> {hi:g} eV/A) | {attrs['max_devi_f_ev_a_max']:.3g} |")
        if above > WARN_ABOVE_TRUST_HI:
            warnings.append(f"WARNING: {100 * above:.1f} % of the frames of {name} have a model "
                            f"deviation above trust_hi = {hi:g} eV/A; the potential is "
                            "extrapolating there")
    if not rows:
        return []
    return (["", "## Model deviation (trust in md)", "",
             "Force deviation of the DP model ensemble on every saved md frame (DP-GEN's "
             "max_devi_f: the largest over atoms of the spread of the models' forces, eV/A).",
             "", "| system | md frames | below trust_lo | above trust_hi | largest (eV/A) |",
             "| --- | ---: | ---: | ---: | ---: |"] + rows
            + [line for warning in warnings for line in ("", warning)])


def _time_words(dyn: dict) -> str:
    tau = dyn.get("shift_correlation_fs", float("nan"))
    if not np.isfinite(tau):
        return "not measured"
    text = f"{tau * 1e-3:.3g} ps"
    return text if dyn.get("shift_correlation_determined") else (
        f"> {text} (not decayed within the longest lag, "
        f"{dyn.get('shift_correlation_window_fs', float('nan')) * 1e-3:.3g} ps)")


@dataclass(frozen=True)
class ReportResult(StageResult):
    """Where the report's summary was written."""

    report: str


def run(spec: ReportSpec, inputs: StageInputs) -> ReportResult:
    """Stage entry: rank 0 writes the report after every rank finished writing."""
    ctx, store = inputs.ctx, inputs.store
    out_dir = Path(spec.out_dir) if spec.out_dir else default_out_dir(store.path)
    ctx.comm.Barrier()
    store.flush()
    data = ReportData(store)  # every rank: the same reads
    if ctx.is_root:
        summary = render_report(data, out_dir, spec)
        ctx.log(f"report: {summary}")
    ctx.comm.Barrier()
    return ReportResult(str(out_dir / "summary.md"))
