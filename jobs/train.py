"""The train stage: labelled frames -> SOAP of the target nuclei -> k-fold NN-NMR ensemble.

Frames come from ``train.frames`` (extended XYZ / OUTCARs) and, when the label stage ran, from
the store (``jobs.label.labelled_frames``). SOAP is computed for a contiguous block of frames
per rank and gathered on every rank; the frames are split into k folds (seeded, BY FRAME: no
frame has atoms on both sides); each fold model is trained data-parallel over all ranks with
Horovod and written as plain arrays, so a killed run resumes at the first unfinished fold.
Store layout: docs/nnmr.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.context import RankContext
from engine.seeds import SeedStreams
from engine.stages import StageInputs, StageResult
from engine.failure import InputError
from engine.progress import Progress
from engine.store import RunStore
from jobs.frame_checks import MIN_DISTANCE_A
from jobs.frames import FERMI_CONTACT_KEY, read_labelled_frames
from jobs.nnmr import (FoldModel, ShiftEnsemble, model_name, read_fold_model,
                       regression_metrics, train_model, write_fold_model)
from jobs.shift import ppm_per_mhz, shift_ppm

GROUP = "/train"
"""The store group this stage owns (layout: docs/nnmr.md); read it with
jobs.nnmr.ShiftEnsemble.from_store."""
CV_GROUP = f"{GROUP}/cv"
"""Out-of-fold predictions: ``shift_dft_ppm``, ``shift_pred_ppm`` ... (what the report plots)."""


def has_ensemble(store: RunStore, group: str = GROUP) -> bool:
    """True when the store holds a trained ensemble of this stage."""
    return store.exists(f"{group}/folds")


@dataclass(frozen=True)
class TrainResult(StageResult):
    """Headline numbers of a training run (the out-of-fold cross-validation metrics)."""

    n_frames: int
    n_rows: int
    folds_trained: int
    cv_rmse_ppm: float
    cv_mae_ppm: float
    cv_r2: float

    def summary(self) -> dict:
        """Frames, centres, folds and the cross-validation metrics."""
        return {"frames": self.n_frames, "centres": self.n_rows, "folds": self.folds_trained,
                "cv_rmse_ppm": self.cv_rmse_ppm, "cv_mae_ppm": self.cv_mae_ppm,
                "cv_r2": self.cv_r2}


@dataclass
class LabelledRows:
    """Target rows of a set of frames: shift (ppm), frame and atom index of every centre."""

    shift_ppm: np.ndarray
    frame: np.ndarray
    atom: np.ndarray


def centre_rows(frames, centre: str, shift_spec) -> LabelledRows:
    """Shifts (ppm, eq. 1) of every `centre` atom of `frames`, frame-major, in atom order."""
    from ase.data import atomic_numbers

    z = atomic_numbers[centre]
    shifts, frame_ids, atom_ids = [], [], []
    for index, atoms in enumerate(frames):
        if FERMI_CONTACT_KEY not in atoms.arrays:
            raise InputError(f"frame {index} ({atoms.info.get('source', '?')}) has no "
                             f"'{FERMI_CONTACT_KEY}'")
        atoms_of_centre = np.flatnonzero(atoms.numbers == z)
        shifts.append(shift_ppm(atoms.arrays[FERMI_CONTACT_KEY][atoms_of_centre], shift_spec))
        frame_ids.append(np.full(len(atoms_of_centre), index, dtype=np.int64))
        atom_ids.append(atoms_of_centre.astype(np.int64))
    return LabelledRows(np.concatenate(shifts), np.concatenate(frame_ids),
                        np.concatenate(atom_ids))


def gather_features(featurizer, frames, ctx: RankContext) -> np.ndarray:
    """SOAP rows of all frames on every rank; each rank computes a contiguous block of frames."""
    from mpi4py import MPI

    mine = ctx.block(len(frames))
    progress = Progress(ctx, "train SOAP", len(mine), "frames")
    blocks = []
    for start in range(mine.start, mine.stop, 32):
        stop = min(start + 32, mine.stop)
        blocks.append(featurizer.features(frames[start:stop]))
        progress.update(stop - start)
    progress.finish()
    n_features = featurizer.n_features
    local = np.concatenate(blocks) if blocks else np.zeros((0, n_features), np.float32)
    local = np.ascontiguousarray(local, dtype=np.float32)
    counts = np.array(ctx.comm.allgather(local.size), dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=np.float32)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ctx.comm.Allgatherv(local.reshape(-1), [out, counts, displs, MPI.FLOAT])
    return out.reshape(-1, n_features)


def frame_folds(n_frames: int, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of every frame: a seeded permutation dealt round-robin."""
    if n_frames < folds:
        raise InputError(f"train: {n_frames} frames cannot make {folds} folds")
    rng = SeedStreams(seed).rng("train.folds")
    fold_of_frame = np.empty(n_frames, dtype=np.int64)
    fold_of_frame[rng.permutation(n_frames)] = np.arange(n_frames) % folds
    return fold_of_frame


def validation_frames(train_frames: np.ndarray, fraction: float, seed: int,
                      fold: int) -> np.ndarray:
    """Frames of a fold's training set held out for early stopping (at least one)."""
    rng = SeedStreams(seed).rng("train.validation", fold)
    n_val = max(1, int(round(fraction * len(train_frames))))
    return np.sort(rng.choice(train_frames, n_val, replace=False))


def load_frames(spec, store: RunStore, min_distance_a: float = MIN_DISTANCE_A) -> list:
    """The labelled frames of train.frames (checked: jobs.frame_checks), then the label
    stage's (when it ran)."""
    frames = []
    for path in spec.frames:
        frames.extend(read_labelled_frames(path, min_distance_a))
    from jobs.label import has_labels, labelled_frames

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
    from jobs.soap import SoapFeaturizer

    frames = load_frames(spec, store) if frames is None else frames
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
    store.flush()

    fold_of_row = fold_of_frame[rows.frame]
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
                write_fold_model(store, group, model, dtype=spec.weights_dtype, **metrics,
                                 n_test_rows=int(test.sum()), fold=fold, member=member,
                                 complete=False)
                for curve_name, curve in model.curves.items():
                    store.put(f"{GROUP}/curves/{name}/{curve_name}", curve)
                store.set_attrs(group, complete=True)
                store.flush()
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

    done = ~np.isnan(predictions)
    cv = regression_metrics(rows.shift_ppm[done], predictions[done])
    store.put(f"{GROUP}/cv/shift_dft_ppm", rows.shift_ppm[done], unit="ppm")
    store.put(f"{GROUP}/cv/shift_pred_ppm", predictions[done], unit="ppm")
    store.put(f"{GROUP}/cv/fold", fold_of_row[done])
    store.put(f"{GROUP}/cv/frame", rows.frame[done])
    store.put(f"{GROUP}/cv/atom", rows.atom[done])
    store.set_attrs(GROUP, cv_rmse_ppm=cv["rmse_ppm"], cv_mae_ppm=cv["mae_ppm"],
                    cv_r2=cv["r2"], cv_rows=int(done.sum()))
    store.flush()
    if spec.parity_png and ctx.is_root:
        write_parity_png(parity_png_path(store.path), rows.shift_ppm[done], predictions[done],
                         cv)
    ctx.log(f"train: cross-validation over {int(done.sum())} centres: rmse {cv['rmse_ppm']:.1f}"
            f" ppm, mae {cv['mae_ppm']:.1f} ppm, r2 {cv['r2']:.4f}")
    return TrainResult(len(frames), len(rows.shift_ppm), n_trained, cv["rmse_ppm"],
                       cv["mae_ppm"], cv["r2"])


def model_seed(seed: int, fold: int, member: int = 0) -> int:
    """Seed of the weights, dropout and batch order of one network of a fold."""
    return SeedStreams(seed).integer("train.network", fold, member)


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
                     metrics: dict) -> None:
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
    ax.set_ylabel("NN-NMR shift, out of fold (ppm)")
    ax.set_title(f"RMSE {metrics['rmse_ppm']:.0f} ppm, R$^2$ {metrics['r2']:.3f}, "
                 f"n = {len(dft_ppm)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(spec, inputs: StageInputs) -> TrainResult:
    """Stage entry: the k-fold NN-NMR ensemble into ``/train`` (spec: TrainSpec)."""
    min_distance_a = inputs.checks.min_distance_a if inputs.checks else MIN_DISTANCE_A
    return train_ensemble(spec, inputs.shift, inputs.seeds.seed, inputs.ctx, inputs.store,
                          frames=load_frames(spec, inputs.store, min_distance_a))


__all__ = ["ShiftEnsemble", "train_ensemble", "run", "TrainResult"]
