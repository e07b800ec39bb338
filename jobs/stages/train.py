"""The train stage: labelled frames -> SOAP of the target nuclei -> k-fold NN-NMR ensemble.

Frames come from ``train.frames`` (extended XYZ / OUTCARs) and, when the label stage ran, from
the store (``jobs.layouts.label.labelled_frames``). SOAP is computed for a contiguous block of frames
per rank and gathered on every rank; the frames are split into k folds (seeded, BY FRAME: no
frame has atoms on both sides); each fold model is trained data-parallel over all ranks with
Horovod and written as plain arrays, so a killed run resumes at the first unfinished fold.
Store layout: docs/nnmr.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.context import RankContext
from engine.failure import InputError
from engine.seeds import SeedStreams
from engine.stages import StageInputs, StageResult
from engine.store import RunStore
from jobs.frame_checks import MIN_DISTANCE_A
from jobs.frames import read_labelled_frames
from jobs.label_screen import screen_for_training
from jobs.layouts.train import CV_GROUP, GROUP
from jobs.shift import ppm_per_mhz
from jobs.shiftmodels.metrics import regression_metrics
from jobs.shiftmodels.nnmr import (
    FoldModel,
    ShiftEnsemble,
    model_name,
    read_fold_model,
    write_fold_model,
)
from jobs.shiftmodels.nnmr_training import train_model
from jobs.shiftmodels.rows import (
    LabelledRows,
    centre_rows,
    frame_folds,
    gather_features,
    model_seed,
    validation_frames,
)


@dataclass(frozen=True)
class TrainResult(StageResult):
    """Headline numbers of a training run (the out-of-fold cross-validation metrics)."""

    n_frames: int
    n_rows: int
    folds_trained: int
    cv_rmse_ppm: float
    cv_mae_ppm: float
    cv_r2: float
    screen: tuple = ()
    """(name, value) pairs of the label screen (jobs/label_screen.py)."""

    def summary(self) -> dict:
        """Frames, centres, folds, the cross-validation metrics and the label screen."""
        return {"frames": self.n_frames, "centres": self.n_rows, "folds": self.folds_trained,
                "cv_rmse_ppm": self.cv_rmse_ppm, "cv_mae_ppm": self.cv_mae_ppm,
                "cv_r2": self.cv_r2, **dict(self.screen)}












def load_frames(spec, store: RunStore, min_distance_a: float = MIN_DISTANCE_A) -> list:
    """The labelled frames of train.frames (checked: jobs.frame_checks), then the label
    stage's (when it ran)."""
    frames = []
    for path in spec.frames:
        frames.extend(read_labelled_frames(path, min_distance_a))
    from jobs.layouts.label import has_labels, labelled_frames

    if has_labels(store):
        frames.extend(labelled_frames(store))
    if not frames:
        raise InputError("train: no labelled frames (train.frames is empty and the store "
                         "holds no label stage frames)")
    return frames


def train_ensemble(spec, shift_spec, seed: int, ctx: RankContext, store: RunStore,
                   frames=None) -> TrainResult:
    """Train the k-fold NN-NMR ensemble on labelled frames and write it to ``/train``.

    Parameters
    ----------
    spec
        The :class:`schemas.train.TrainSpec`.
    shift_spec
        The :class:`schemas.shift.ShiftSpec` (A_iso -> ppm of the labels).
    seed
        The manifest's master seed.
    ctx, store
        Rank context and run store (collective over ``ctx.comm``).
    frames
        Labelled frames; default: :func:`load_frames`.

    Returns
    -------
    TrainResult
        The out-of-fold cross-validation metrics.
    """
    from jobs.shiftmodels.soap import SoapFeaturizer

    frames = load_frames(spec, store) if frames is None else frames
    if getattr(spec, "model", "nnmr") == "gpr":
        return train_gpr(spec, shift_spec, seed, ctx, store, frames)
    featurizer = SoapFeaturizer(spec.species, spec.centre, spec.soap_r_cut_a, spec.soap_sigma_a,
                                spec.soap_n_max, spec.soap_l_max, periodic=True)
    for index, atoms in enumerate(frames):
        where = (f"train: {atoms.info['file']}: frame {atoms.info['file_index']}"
                 if "file" in atoms.info else
                 f"train: frame {index} ({atoms.info.get('source', '?')})")
        featurizer.check_frame(atoms, where)
    rows = centre_rows(frames, spec.centre, shift_spec)
    ctx.log(f"train: {len(frames)} frames, {len(rows.shift_ppm)} {spec.centre} centres, "
            f"{featurizer.n_features} SOAP features")
    features = gather_features(featurizer, frames, ctx)
    if len(features) != len(rows.shift_ppm):
        raise RuntimeError(f"SOAP gave {len(features)} rows for {len(rows.shift_ppm)} centres")

    fold_of_frame = frame_folds(len(frames), spec.folds, seed)
    n_trained = spec.ensemble_folds or spec.folds
    sources = [str(a.info.get("source", f"frame {i}")) for i, a in enumerate(frames)]
    with store.transaction():
        store.require_group(f"{GROUP}/folds")
        store.set_attrs(GROUP, soap=featurizer.settings(), species=list(spec.species),
                        centre=spec.centre, shift=shift_spec.constants(),
                        ppm_per_mhz=ppm_per_mhz(shift_spec),
                        target_mean_ppm=float(rows.shift_ppm.mean()),
                        target_std_ppm=float(rows.shift_ppm.std()), n_frames=len(frames),
                        n_rows=len(rows.shift_ppm), folds=spec.folds, folds_trained=n_trained,
                        spec=spec.model_dump(mode="json"), seed=seed, ranks=ctx.size)
        store.put(f"{GROUP}/split/fold_of_frame", fold_of_frame)
        store.put(f"{GROUP}/split/frame_source", np.array(sources, dtype="S"))

    fold_of_row = fold_of_frame[rows.frame]
    predictions = _train_folds(spec, seed, ctx, store, n_trained, fold_of_frame, fold_of_row,
                               rows, features)

    done = ~np.isnan(predictions)
    cv = regression_metrics(rows.shift_ppm[done], predictions[done])
    with store.transaction():
        store.put(f"{GROUP}/cv/shift_dft_ppm", rows.shift_ppm[done], unit="ppm")
        store.put(f"{GROUP}/cv/shift_pred_ppm", predictions[done], unit="ppm")
        store.put(f"{GROUP}/cv/fold", fold_of_row[done])
        store.put(f"{GROUP}/cv/frame", rows.frame[done])
        store.put(f"{GROUP}/cv/atom", rows.atom[done])
        store.set_attrs(GROUP, cv_rmse_ppm=cv["rmse_ppm"], cv_mae_ppm=cv["mae_ppm"],
                        cv_r2=cv["r2"], cv_rows=int(done.sum()))
    if spec.parity_png and ctx.is_root:
        write_parity_png(parity_png_path(store.path), rows.shift_ppm[done], predictions[done],
                         cv)
    ctx.log(f"train: cross-validation over {int(done.sum())} centres: rmse {cv['rmse_ppm']:.1f}"
            f" ppm, mae {cv['mae_ppm']:.1f} ppm, r2 {cv['r2']:.4f}")
    return TrainResult(len(frames), len(rows.shift_ppm), n_trained, cv["rmse_ppm"],
                       cv["mae_ppm"], cv["r2"])


def train_gpr(spec, shift_spec, seed: int, ctx: RankContext, store: RunStore,
              frames) -> TrainResult:
    """The sparse GPR shift model (``train.model: gpr``, jobs.shiftmodels.gpr): CV grid, fit, ``/train``.

    For every SOAP setting of the grid (``train.gpr.soap_r_cut_a`` x ``soap_sigma_a``, the
    train section's own values when empty), the features are computed (a block of frames per
    rank, gathered) and every (zeta, lambda, M) is cross-validated by frame (the NN-NMR split,
    stream ``train.folds``). The best by ``train.gpr.select_by`` is fitted on all rows, its
    uncertainty scale calibrated on the out-of-fold rows. Writes the store contract of NN-NMR
    (``/train`` attributes, ``/train/split``, ``/train/cv``; ``/train/cv/shift_std_ppm`` too)
    and the model and the CV curve under ``/train/gpr`` (docs/gpr.md). A complete model in the
    store is reused.
    """
    import time

    from jobs.shiftmodels import gpr

    gspec = spec.gpr
    done = store.attrs(f"{GROUP}/gpr")
    if done.get("complete") and store.attrs(GROUP).get("model") == gpr.MODEL_NAME:
        attrs = store.attrs(GROUP)
        ctx.log("train: GPR model complete in the store, reused")
        return TrainResult(int(attrs["n_frames"]), int(attrs["n_rows"]), int(attrs["folds"]),
                           float(attrs["cv_rmse_ppm"]), float(attrs["cv_mae_ppm"]),
                           float(attrs["cv_r2"]))
    seeds = SeedStreams(seed)
    rows = centre_rows(frames, spec.centre, shift_spec)
    fold_of_frame = frame_folds(len(frames), spec.folds, seed)
    fold_of_row = fold_of_frame[rows.frame]
    curve, best, soap_seconds = _gpr_soap_grid(spec, frames, rows, fold_of_row, seeds, ctx)
    _, featurizer, features, cv, index = best
    zeta, lam, n_sparse = cv.grid[index]
    scale = float(cv.curve.std_scale_ppm[index])
    pred = cv.predictions_ppm[index]
    std = scale * np.sqrt(cv.raw_variance[index])
    ctx.log(f"train gpr: chosen r_cut {featurizer.r_cut_a:g} A, sigma {featurizer.sigma_a:g} A, "
            f"zeta {zeta}, lambda {lam:g}, M {n_sparse} (by {gspec.select_by}); fitting on all "
            f"{len(rows.shift_ppm)} rows")
    started = time.monotonic()
    settings = {"soap": featurizer.settings(), "species": list(spec.species),
                "centre": spec.centre, "model": gpr.MODEL_NAME}
    model = gpr.fit(features, rows.shift_ppm, zeta, lam, n_sparse, scale, gspec, seeds,
                    ctx.comm, settings, seed_index=spec.folds)
    fit_seconds = time.monotonic() - started
    cv_metrics = regression_metrics(rows.shift_ppm, pred)
    cover = gpr.coverage(pred - rows.shift_ppm, std)
    sources = [str(a.info.get("source", f"frame {i}")) for i, a in enumerate(frames)]
    spec_json = spec.model_dump(mode="json")
    spec_json["soap_r_cut_a"], spec_json["soap_sigma_a"] = featurizer.r_cut_a, featurizer.sigma_a
    with store.transaction():
        store.require_group(f"{GROUP}/gpr")
        store.set_attrs(GROUP, model=gpr.MODEL_NAME, soap=featurizer.settings(),
                        species=list(spec.species), centre=spec.centre,
                        shift=shift_spec.constants(), ppm_per_mhz=ppm_per_mhz(shift_spec),
                        target_mean_ppm=float(rows.shift_ppm.mean()),
                        target_std_ppm=float(rows.shift_ppm.std()), n_frames=len(frames),
                        n_rows=len(rows.shift_ppm), folds=spec.folds, folds_trained=spec.folds,
                        spec=spec_json, seed=seed, ranks=ctx.size)
        store.put(f"{GROUP}/split/fold_of_frame", fold_of_frame)
        store.put(f"{GROUP}/split/frame_source", np.array(sources, dtype="S"))
        store.put(f"{CV_GROUP}/shift_dft_ppm", rows.shift_ppm, unit="ppm")
        store.put(f"{CV_GROUP}/shift_pred_ppm", pred, unit="ppm")
        store.put(f"{CV_GROUP}/shift_std_ppm", std, unit="ppm")
        store.put(f"{CV_GROUP}/fold", fold_of_row)
        store.put(f"{CV_GROUP}/frame", rows.frame)
        store.put(f"{CV_GROUP}/atom", rows.atom)
        for key, value in curve.items():
            store.put(f"{GROUP}/gpr/cv_curve/{key}", np.concatenate(value))
        model.write(store, f"{GROUP}/gpr", factor_dtype=spec.weights_dtype,
                    soap_r_cut_a=featurizer.r_cut_a,
                    soap_sigma_a=featurizer.sigma_a, select_by=gspec.select_by,
                    sparse_selection=gspec.sparse_selection, cv_seconds=float(cv.seconds),
                    fit_seconds=fit_seconds, soap_seconds=soap_seconds, complete=False)
        store.set_attrs(GROUP, cv_rmse_ppm=cv_metrics["rmse_ppm"], cv_mae_ppm=cv_metrics["mae_ppm"],
                        cv_r2=cv_metrics["r2"], cv_rows=len(pred),
                        cv_within_1_sigma=cover["within_1_sigma"],
                        cv_within_2_sigma=cover["within_2_sigma"],
                        cv_z_variance=cover["z_variance"])
        store.set_attrs(f"{GROUP}/gpr", complete=True)
    if spec.parity_png and ctx.is_root:
        write_parity_png(parity_png_path(store.path), rows.shift_ppm, pred, cv_metrics,
                         model_label="GPR")
    ctx.log(f"train gpr: cross-validation over {len(pred)} centres: rmse "
            f"{cv_metrics['rmse_ppm']:.1f} ppm, mae {cv_metrics['mae_ppm']:.1f} ppm, r2 "
            f"{cv_metrics['r2']:.4f}; within 1 sigma {cover['within_1_sigma']:.3f}, 2 sigma "
            f"{cover['within_2_sigma']:.3f}; fit on all rows {fit_seconds:.1f} s")
    return TrainResult(len(frames), len(rows.shift_ppm), spec.folds, cv_metrics["rmse_ppm"],
                       cv_metrics["mae_ppm"], cv_metrics["r2"])


def _train_folds(spec, seed: int, ctx: RankContext, store: RunStore, n_trained: int,
                 fold_of_frame: np.ndarray, fold_of_row: np.ndarray, rows: LabelledRows,
                 features: np.ndarray) -> np.ndarray:
    """Train (or reuse, when complete in the store) every member of the first `n_trained`
    folds, writing each to ``/train/folds`` and its curves (collective); returns the
    out-of-fold predictions (ppm; a fold's members' mean, NaN in untrained folds)."""
    predictions = np.full(len(rows.shift_ppm), np.nan)
    for fold in range(n_trained):
        test = fold_of_row == fold
        members = []
        for member in range(spec.members_per_fold):
            name = model_name(fold, member)
            group = f"{GROUP}/folds/{name}"
            if store.attrs(group).get("complete"):
                ctx.log(f"train: model {name} complete in the store, reused")
            else:
                model = _train_fold(spec, seed, fold, member, fold_of_frame, rows, features,
                                    ctx)
                metrics = regression_metrics(rows.shift_ppm[test],
                                             model.predict_ppm(features[test]))
                with store.transaction():
                    write_fold_model(store, group, model, dtype=spec.weights_dtype, **metrics,
                                     n_test_rows=int(test.sum()), fold=fold, member=member,
                                     complete=False)
                    for curve_name, curve in model.curves.items():
                        store.put(f"{GROUP}/curves/{name}/{curve_name}", curve)
                    store.set_attrs(group, complete=True)
                ctx.log(f"train: model {name} (fold {fold}): rmse {metrics['rmse_ppm']:.1f} "
                        f"ppm, mae {metrics['mae_ppm']:.1f} ppm, r2 {metrics['r2']:.4f} "
                        f"(best epoch {model.best_epoch} of {model.epochs_run})")
            # predict with the weights as stored (float16 storage included)
            members.append(read_fold_model(store, group).predict_ppm(features[test]))
        predictions[test] = np.mean(members, axis=0)
        if len(members) > 1:
            metrics = regression_metrics(rows.shift_ppm[test], predictions[test])
            ctx.log(f"train: fold {fold}, mean of {len(members)} members: rmse "
                    f"{metrics['rmse_ppm']:.1f} ppm, r2 {metrics['r2']:.4f}")
    return predictions


def _gpr_soap_grid(spec, frames, rows: LabelledRows, fold_of_row: np.ndarray,
                   seeds: SeedStreams, ctx: RankContext):
    """Cross-validate (zeta, lambda, M) at every SOAP setting of the grid (collective).

    Returns
    -------
    (curve, best, soap_seconds)
        The CV curve's columns (a list of arrays per column, one per SOAP setting), the best
        setting as ``(score, featurizer, features, cv, grid index)`` by
        ``train.gpr.select_by``, and the SOAP wall time (s) per ``"r_cut/sigma"``.
    """
    import time

    from jobs.shiftmodels import gpr
    from jobs.shiftmodels.soap import SoapFeaturizer

    gspec = spec.gpr
    r_cuts = list(gspec.soap_r_cut_a) or [spec.soap_r_cut_a]
    sigmas = list(gspec.soap_sigma_a) or [spec.soap_sigma_a]
    curve, best = {}, None
    soap_seconds = {}
    for r_cut, sigma in [(r, s) for r in r_cuts for s in sigmas]:
        featurizer = SoapFeaturizer(spec.species, spec.centre, r_cut, sigma, spec.soap_n_max,
                                    spec.soap_l_max, periodic=True)
        for index, atoms in enumerate(frames):
            featurizer.check_frame(atoms, f"train frame {index} "
                                          f"({atoms.info.get('source', '?')})")
        started = time.monotonic()
        features = gather_features(featurizer, frames, ctx)
        soap_seconds[f"{r_cut:g}/{sigma:g}"] = time.monotonic() - started
        if len(features) != len(rows.shift_ppm):
            raise RuntimeError(f"SOAP gave {len(features)} rows for {len(rows.shift_ppm)} "
                               f"centres")
        ctx.log(f"train gpr: SOAP r_cut {r_cut:g} A, sigma {sigma:g} A: {len(features)} rows "
                f"x {featurizer.n_features} features in {soap_seconds[f'{r_cut:g}/{sigma:g}']:.1f}"
                f" s; cross-validating (zeta, lambda, M) {gspec.zeta} x {gspec.regularisation} x "
                f"{gspec.n_sparse}")
        cv = gpr.cross_validate(features, rows.shift_ppm, fold_of_row, gspec, seeds, ctx.comm,
                                ctx.log)
        columns = cv.curve.arrays()
        columns["soap_r_cut_a"] = np.full(len(cv.grid), r_cut)
        columns["soap_sigma_a"] = np.full(len(cv.grid), sigma)
        for key, value in columns.items():
            curve.setdefault(key, []).append(value)
        index = cv.best(gspec.select_by)
        score = (cv.curve.nlpd if gspec.select_by == "nlpd" else cv.curve.rmse_ppm)[index]
        for g in range(len(cv.grid)):
            ctx.log(f"train gpr: r_cut {r_cut:g} sigma {sigma:g} zeta {cv.curve.zeta[g]} "
                    f"lambda {cv.curve.regularisation[g]:g} M {cv.curve.n_sparse[g]}: rmse "
                    f"{cv.curve.rmse_ppm[g]:.1f} ppm, r2 {cv.curve.r2[g]:.4f}, nlpd "
                    f"{cv.curve.nlpd[g]:.3f}, within 1/2 sigma {cv.curve.within_1_sigma[g]:.3f}"
                    f"/{cv.curve.within_2_sigma[g]:.3f}")
        if best is None or score < best[0]:
            best = (score, featurizer, features, cv, index)
        else:
            del features
    return curve, best, soap_seconds


def _train_fold(spec, seed: int, fold: int, member: int, fold_of_frame: np.ndarray,
                rows: LabelledRows, features: np.ndarray, ctx: RankContext) -> FoldModel:
    train_frames = np.flatnonzero(fold_of_frame != fold)
    val_frames = validation_frames(train_frames, spec.validation_fraction, seed, fold)
    is_val = np.isin(rows.frame, val_frames)
    is_train = (fold_of_frame[rows.frame] != fold) & ~is_val
    name = model_name(fold, member)
    ctx.log(f"train: model {name} (fold {fold}): {is_train.sum()} training rows, "
            f"{is_val.sum()} validation rows ({len(val_frames)} frames)")
    return train_model(features[is_train], rows.shift_ppm[is_train], features[is_val],
                       rows.shift_ppm[is_val], spec, ctx, model_seed(seed, fold, member),
                       log_prefix=f"model {name}")


def parity_png_path(store_path: str | Path) -> Path:
    """The parity plot next to the store: ``<store stem>-train-parity.png``."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}-train-parity.png")


def write_parity_png(path: Path, dft_ppm: np.ndarray, pred_ppm: np.ndarray,
                     metrics: dict, model_label: str = "NN-NMR") -> None:
    """Parity plot of out-of-fold predictions against the DFT shifts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(dft_ppm, pred_ppm, s=2, alpha=0.3, lw=0)
    low, high = float(min(dft_ppm.min(), pred_ppm.min())), float(max(dft_ppm.max(),
                                                                     pred_ppm.max()))
    ax.plot([low, high], [low, high], "k--", lw=0.8)
    ax.set_xlabel("DFT shift (ppm)")
    ax.set_ylabel(f"{model_label} shift, out of fold (ppm)")
    ax.set_title(f"RMSE {metrics['rmse_ppm']:.0f} ppm, R$^2$ {metrics['r2']:.3f}, "
                 f"n = {len(dft_ppm)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(spec, inputs: StageInputs) -> TrainResult:
    """Stage entry: the k-fold NN-NMR ensemble into ``/train`` (spec: TrainSpec)."""
    min_distance_a = inputs.checks.min_distance_a if inputs.checks else MIN_DISTANCE_A
    ctx = inputs.ctx
    (frames,), screen = screen_for_training([load_frames(spec, inputs.store, min_distance_a)],
                                            inputs.checks, inputs.label, "train", ctx)
    result = train_ensemble(spec, inputs.shift, inputs.seeds.seed, ctx, inputs.store,
                            frames=frames)
    return replace(result, screen=tuple(screen.summary().items()))


__all__ = ["ShiftEnsemble", "train_ensemble", "run", "TrainResult"]
