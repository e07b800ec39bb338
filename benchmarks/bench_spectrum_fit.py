"""Coverage of the spectrum fit's fraction intervals on synthetic spectra (docs/spectrum.md).

    .venv/bin/python benchmarks/bench_spectrum_fit.py --n 240 --seed 1 \\
        --out docs/figures/bench_spectrum_fit

Each case is two systems drawn like the project's P6_322 / P6_3/mcm demo, generated here in
closed form (not with the fit's FFT code):

* predicted lines (what the fit is given): Lorentzians (the Bloch-McConnell line of fast
  exchange; in 30 % of systems a second slow-exchange peak 60-150 ppm away with 15-40 % of
  the area) on the stage's default axis (-500..3500 ppm, 8192 points); system A at
  1810 +- 30 ppm, system B 0-250 ppm below it (from resolved to merged), predicted FWHM
  log-uniform 20-300 ppm;
* the truth: offset ~ N(-160, 55) (the fit's default prior), each system's own deviation
  uniform in +-60 ppm beyond it, fraction of A uniform 0-1; each predicted Lorentzian
  broadened by a pseudo-Voigt of FWHM 0-80 ppm and mixing 0-1 (one per spectrum), in closed
  form: eta L(w + extra) + (1 - eta) Voigt(w, extra) (scipy's Faddeeva-based
  ``voigt_profile``: the fit's "convolved" shape model); or, in ``--misfit-share`` of the
  cases (default 0.25), plain pseudo-Voigt lines of FWHM predicted + extra (the fit's
  "peaks" shape model), or with ``--misfit-kind skew`` such lines made asymmetric (FWHM
  x (1 +- a) below / above the centre, a uniform in +-0.3: a shape neither model has);
* first and second spinning sidebands (MAS 50-65 kHz at 105.8 MHz, faster where the lines
  spread wider, so that every line's first sidebands fall outside the window; 5-30 % of the
  centreband and a third of that), a polynomial baseline (order <= 2, up to 3 % of the
  peak), noise at SNR 20-500 (log-uniform; half the cases correlated over 0.5-3 points, as
  after apodization);
* the fit (:func:`jobs.experiment.fit_spectrum`, defaults, seed = case index) in a window
  reaching 3 FWHM beyond the outer lines (150-350 ppm) with ~2000 points, given the MAS
  rate and the Larmor frequency (so the sidebands' tails are modelled).

Reported: coverage of the 95 % intervals of fraction A (goal 0.90-0.99), the ratio of the
rms reported sd to the rms error (goal 0.5-2), the spread of the z-scores (sd, and 1.4826 x
median |z|), the median |error| in resolved cases (true separation > mean FWHM), each also
per subset (model family / pseudo-Voigt truth); the paper's route (free deconvolution,
interval mean +- 1.96 sd) for comparison; the time per fit. Writes ``<out>.json`` (summary
and every case) and ``<out>.png`` (four panels).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

LARMOR_MHZ = 105.8
PRED_AXIS = np.linspace(-500.0, 3500.0, 8192)
SIDEBANDS = True
"""Add spinning sidebands outside the window (diagnostics: False, none)."""
NOISE_SCALE = 1.0
"""Scales the noise (diagnostics: 0 gives noise-free spectra)."""
FIT_OPTIONS: dict = {}
"""Keywords passed to fit_spectrum (diagnostics)."""


def lorentzian(x, centre, fwhm):
    half = fwhm / 2
    return half / np.pi / (half ** 2 + (x - centre) ** 2)


def pv(x, centre, fwhm, eta):
    """Unit-area pseudo-Voigt eta L + (1 - eta) G of one FWHM (the benchmark's own)."""
    gauss = np.sqrt(4 * np.log(2) / np.pi) / fwhm * np.exp(
        -4 * np.log(2) * ((x - centre) / fwhm) ** 2)
    return eta * lorentzian(x, centre, fwhm) + (1 - eta) * gauss


def broadened(x, centre, fwhm_lor, extra, eta):
    """A Lorentzian of FWHM `fwhm_lor` convolved with the unit-area pseudo-Voigt of FWHM
    `extra` and mixing `eta`, in closed form: eta L(fwhm_lor + extra) + (1 - eta) Voigt
    (scipy.special.voigt_profile, the Faddeeva function)."""
    from scipy.special import voigt_profile

    sigma = max(extra, 1e-9) / (2 * np.sqrt(2 * np.log(2)))
    return eta * lorentzian(x, centre, fwhm_lor + extra) + (1 - eta) * voigt_profile(
        x - centre, sigma, fwhm_lor / 2)


def skewed(x, centre, fwhm, eta, asymmetry):
    """Unit-area asymmetric pseudo-Voigt: FWHM fwhm (1 + a) below the centre and fwhm (1 - a)
    above it, one peak height (a line neither shape model of the fit has)."""
    low, high = fwhm * (1 + asymmetry), fwhm * (1 - asymmetry)
    side = np.where(x < centre, low, high)
    return 2 * side / (low + high) * pv(x, centre, side, eta)


def draw_case(rng: np.random.Generator, misfit_share: float = 0.0,
              misfit_kind: str = "pv") -> dict:
    """One synthetic two-system measured spectrum and its truth."""
    centre_a = 1810 + rng.uniform(-30, 30)
    spacing = rng.uniform(0, 250)
    systems = []
    for centre in (centre_a, centre_a - spacing):
        fwhm = float(np.exp(rng.uniform(np.log(20), np.log(300))))
        peaks = [(centre, 1.0)]
        if rng.random() < 0.3:
            share = rng.uniform(0.15, 0.4)
            peaks = [(centre, 1 - share),
                     (centre + rng.choice([-1, 1]) * rng.uniform(60, 150), share)]
        systems.append({"peaks": peaks, "fwhm": fwhm})
    offset = float(np.clip(rng.normal(-160, 55), -400, 400))
    deltas = rng.uniform(-60, 60, 2)
    extra = rng.uniform(0, 80, 2)
    eta = rng.uniform(0, 1)
    frac_a = rng.uniform(0, 1)
    misfit = bool(rng.random() < misfit_share)
    asymmetry = rng.uniform(-0.3, 0.3) if misfit and misfit_kind == "skew" else 0.0
    side1 = rng.uniform(0.05, 0.3)
    true_pos = [[c + offset + d for c, _ in s["peaks"]] for s, d in zip(systems, deltas)]
    widths = [s["fwhm"] + e for s, e in zip(systems, extra)]
    all_pos = [p for ps in true_pos for p in ps]
    spread = max(all_pos) - min(all_pos)
    margin = float(np.clip(3 * max(widths), 150, 350))
    # 50-65 kHz, faster where needed to keep every line's first sidebands out of the window
    mas_ppm = max(rng.uniform(50e3, 65e3) / LARMOR_MHZ,
                  spread + margin + rng.uniform(50, 150))
    window = (min(all_pos) - margin, max(all_pos) + margin)
    step = (window[1] - window[0]) / 2000
    x = np.arange(window[1] + 1500, window[0] - 1500, -step)       # descending, as Bruker
    y = np.zeros_like(x)
    for s, (system, fraction) in enumerate(zip(systems, (frac_a, 1 - frac_a))):
        for (_, share), pos in zip(system["peaks"], true_pos[s]):
            for order, ratio in ((0, 1.0), (1, side1 * SIDEBANDS), (2, side1 / 3 * SIDEBANDS)):
                for sign in ((1,) if order == 0 else (-1, 1)):
                    at = pos + sign * order * mas_ppm
                    y += fraction * share * ratio * (
                        skewed(x, at, widths[s], eta, asymmetry) if misfit else
                        broadened(x, at, system["fwhm"], extra[s], eta))
    top = y.max()
    u = 2 * (x - window[0]) / (window[1] - window[0]) - 1
    order = rng.integers(0, 3)
    coef = rng.uniform(-0.03, 0.03, order + 1) * top
    y += np.polynomial.polynomial.polyval(u, coef)
    snr = float(np.exp(rng.uniform(np.log(20), np.log(500))))
    noise = rng.standard_normal(x.size)
    corr = 0.0
    if rng.random() < 0.5:
        from scipy.ndimage import gaussian_filter1d

        corr = rng.uniform(0.5, 3)
        noise = gaussian_filter1d(noise, corr)
        noise /= noise.std()
    y += NOISE_SCALE * noise * top / snr
    predicted = {name: (PRED_AXIS, sum(share * lorentzian(PRED_AXIS, c, s["fwhm"])
                                       for c, share in s["peaks"]))
                 for name, s in zip(("A", "B"), systems)}
    separation = abs(true_pos[0][0] - true_pos[1][0])
    return {"x": x, "y": y * 1e5, "predicted": predicted, "window": window,
            "mas_hz": mas_ppm * LARMOR_MHZ,
            "truth": {"fraction_a": frac_a, "offset": offset, "deltas": deltas.tolist(),
                      "extra": extra.tolist(), "eta": eta, "snr": snr, "noise_corr": corr,
                      "baseline_order": int(order), "spacing": spacing,
                      "separation": separation, "fwhm": widths,
                      "resolved": bool(separation > np.mean(widths)),
                      "slow_exchange": [len(s["peaks"]) > 1 for s in systems],
                      "misfit": misfit, "asymmetry": asymmetry}}


def run_case(case: dict, seed: int) -> dict:
    from jobs.experiment import MeasuredSpectrum, fit_spectrum

    measured = MeasuredSpectrum(case["x"], case["y"], "synthetic", LARMOR_MHZ, case["mas_hz"])
    start = time.perf_counter()
    fit = fit_spectrum(measured, case["predicted"], window_ppm=case["window"], seed=seed,
                       **FIT_OPTIONS)
    elapsed = time.perf_counter() - start
    truth = case["truth"]["fraction_a"]
    low, high = fit.fraction_intervals["A"]
    dec = fit.deconvolution
    out = {"truth": case["truth"], "fraction_a": fit.fractions["A"],
           "sd": fit.fraction_errors["A"], "interval": [low, high],
           "covered": bool(low <= truth <= high), "error": fit.fractions["A"] - truth,
           "offset": fit.offset_ppm, "offset_sd": fit.offset_error_ppm,
           "offset_covered": bool(fit.offset_interval_ppm[0] <= case["truth"]["offset"]
                                  <= fit.offset_interval_ppm[1]),
           "separable": fit.separable, "n_modes": len(fit.modes),
           "shape_warning": any("free deconvolution" in w for w in fit.warnings),
           "n_effective": fit.n_effective, "residual_rms_rel": fit.residual_rms_rel,
           "statements": list(fit.statements), "warnings": list(fit.warnings),
           "seconds": elapsed}
    if dec is not None:
        d_mean, d_sd = dec.fractions["A"], dec.fraction_errors["A"]
        out["deconvolution"] = {"fraction_a": d_mean, "sd": d_sd,
                                "covered": bool(abs(d_mean - truth) <= 1.96 * d_sd),
                                "assignment_probability": dec.assignment_probability}
    return out


def summarise(rows: list[dict]) -> dict:
    """The coverage figures over `rows`, and over the cases whose truth is (not) in the
    fit's model family."""
    summary = _figures(rows)
    for key, misfit in (("model_family", False), ("pseudo_voigt_truth", True)):
        subset = [r for r in rows if r["truth"]["misfit"] == misfit]
        summary[key] = _figures(subset, short=True) if len(subset) >= 5 else None
    return summary


def _figures(rows: list[dict], short: bool = False) -> dict:
    err = np.array([r["error"] for r in rows])
    sd = np.array([r["sd"] for r in rows])
    covered = np.array([r["covered"] for r in rows])
    resolved = np.array([r["truth"]["resolved"] for r in rows])
    z = err / np.maximum(sd, 1e-9)

    def ratio(sel):
        return float(np.sqrt(np.mean(sd[sel] ** 2)) / np.sqrt(np.mean(err[sel] ** 2))) \
            if sel.any() else None

    out = {
        "n": len(rows), "coverage_95": float(covered.mean()),
        "coverage_resolved": float(covered[resolved].mean()) if resolved.any() else None,
        "coverage_unresolved": float(covered[~resolved].mean()) if (~resolved).any() else None,
        "sd_over_error_rms": ratio(np.ones(len(rows), dtype=bool)),
        "sd_over_error_rms_resolved": ratio(resolved),
        "z_sd": float(np.std(z)), "z_mad_sd": float(1.4826 * np.median(np.abs(z))),
        "median_abs_error_resolved": float(np.median(np.abs(err[resolved])))
        if resolved.any() else None,
        "n_resolved": int(resolved.sum()),
        "misses_flagged_by_shape_check": int(sum(r["shape_warning"] for r in rows
                                                 if not r["covered"])),
        "covered_flagged_by_shape_check": int(sum(r["shape_warning"] for r in rows
                                                  if r["covered"])),
    }
    if short:
        return out
    out.update({
        "median_abs_error_all": float(np.median(np.abs(err))),
        "median_sd_resolved": float(np.median(sd[resolved])) if resolved.any() else None,
        "offset_coverage_95": float(np.mean([r["offset_covered"] for r in rows])),
        "not_separable": int(sum(not r["separable"] for r in rows)),
        "seconds_median": float(np.median([r["seconds"] for r in rows])),
        "seconds_max": float(np.max([r["seconds"] for r in rows])),
    })
    dec = [r["deconvolution"] for r in rows if "deconvolution" in r]
    if dec:
        d_err = np.array([d["fraction_a"] - r["truth"]["fraction_a"]
                          for d, r in zip(dec, rows)])
        d_sd = np.array([d["sd"] for d in dec])
        out["deconvolution"] = {
            "coverage_95": float(np.mean([d["covered"] for d in dec])),
            "median_abs_error_resolved": float(np.median(np.abs(d_err[resolved])))
            if resolved.any() else None,
            "z_mad_sd": float(1.4826 * np.median(np.abs(d_err / np.maximum(d_sd, 1e-9))))}
    return out


def figure(rows: list[dict], example: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.experiment import MeasuredSpectrum, fit_spectrum

    truth = np.array([r["truth"]["fraction_a"] for r in rows])
    est = np.array([r["fraction_a"] for r in rows])
    sd = np.array([r["sd"] for r in rows])
    interval = np.array([r["interval"] for r in rows])
    resolved = np.array([r["truth"]["resolved"] for r in rows])
    z = (est - truth) / np.maximum(sd, 1e-9)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    ax = axes[0, 0]
    for sel, colour, label in ((resolved, "C0", "resolved"), (~resolved, "C3", "overlapping")):
        bars = np.abs(np.stack([est[sel] - interval[sel, 0], interval[sel, 1] - est[sel]]))
        ax.errorbar(truth[sel], est[sel], yerr=bars, fmt="o", ms=3, color=colour, alpha=0.6,
                    label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("true fraction A")
    ax.set_ylabel("fitted fraction A (posterior mean, 95 % interval)")
    ax.set_title(f"coverage {np.mean([r['covered'] for r in rows]):.3f} of {len(rows)}")
    ax.legend()
    ax = axes[0, 1]
    ax.hist(np.clip(z, -6, 6), bins=40, density=True, alpha=0.7)
    grid = np.linspace(-6, 6, 200)
    ax.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k-")
    ax.set_xlabel("(fit - truth) / sd")
    ax.set_title("z-scores against N(0, 1)")
    ax = axes[1, 0]
    snr = np.array([r["truth"]["snr"] for r in rows])
    sep = np.array([r["truth"]["separation"] / np.mean(r["truth"]["fwhm"]) for r in rows])
    covered = np.array([r["covered"] for r in rows])
    ax.scatter(sep[covered], snr[covered], s=10, c="C2", label="truth inside 95 %")
    ax.scatter(sep[~covered], snr[~covered], s=30, c="C3", marker="x", label="outside")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true separation / mean FWHM")
    ax.set_ylabel("SNR")
    ax.legend()
    ax = axes[1, 1]
    measured = MeasuredSpectrum(example["x"], example["y"], "example", LARMOR_MHZ,
                                example["mas_hz"])
    fit = fit_spectrum(measured, example["predicted"], window_ppm=example["window"], seed=0)
    ax.plot(example["x"], example["y"], "k-", lw=0.6, label="measured")
    ax.plot(fit.ppm, fit.model, "C1-", lw=1.2, label="fit")
    for name, comp in fit.components.items():
        ax.plot(fit.ppm, comp + fit.baseline_curve, "--", lw=1,
                label=f"{name} {fit.fractions[name]:.3f} +- {fit.fraction_errors[name]:.3f}")
    ax.set_xlim(example["window"][1] + 300, example["window"][0] - 300)
    ax.axvspan(*example["window"], color="0.9", zorder=0)
    ax.set_xlabel("shift (ppm)")
    ax.set_title(f"example (truth A {example['truth']['fraction_a']:.3f}); grey: window")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_indexed(item):
    k, case = item
    return run_case(case, seed=k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=240, help="synthetic spectra (>= 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generator")
    parser.add_argument("--out", default="docs/figures/bench_spectrum_fit",
                        help="output stem: <out>.json and <out>.png")
    parser.add_argument("--misfit-kind", choices=("pv", "skew"), default="pv",
                        help="the misfit cases' lines: pseudo-Voigts of FWHM predicted + extra "
                             "(pv), or such lines made asymmetric, FWHM x (1 +- a) on the two "
                             "sides, a uniform in +-0.3 (skew)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes fitting cases at once (one BLAS thread each)")
    parser.add_argument("--misfit-share", type=float, default=0.25,
                        help="share of cases whose true lines are plain pseudo-Voigts of FWHM "
                             "predicted + extra (outside the fit's model family)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows, example = [], None
    started = time.perf_counter()
    cases = [draw_case(rng, args.misfit_share, args.misfit_kind) for _ in range(args.n)]
    example = next((c for c in cases if c["truth"]["resolved"]), cases[-1])
    if args.workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(args.workers)
        fitted = pool.imap(_run_indexed, list(enumerate(cases)))
    else:
        fitted = map(_run_indexed, enumerate(cases))
    for k, (case, row) in enumerate(zip(cases, fitted)):
        rows.append(row)
        print(json.dumps({"case": k, "truth": round(case["truth"]["fraction_a"], 3),
                          "fit": round(row["fraction_a"], 3), "sd": round(row["sd"], 3),
                          "covered": row["covered"], "resolved": case["truth"]["resolved"],
                          "misfit": case["truth"]["misfit"],
                          "snr": round(case["truth"]["snr"]), "modes": row["n_modes"],
                          "s": round(row["seconds"], 2)}), flush=True)
    summary = summarise(rows)
    summary["wall_s"] = time.perf_counter() - started
    summary["command"] = (f"benchmarks/bench_spectrum_fit.py --n {args.n} --seed {args.seed} "
                          f"--misfit-share {args.misfit_share}"
                          + (f" --misfit-kind {args.misfit_kind}" if args.misfit_kind != "pv"
                             else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "cases": rows},
                                                   indent=1, default=float))
    figure(rows, example, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
