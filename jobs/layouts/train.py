"""The ``/train`` group: a trained shift model (NN-NMR fold models or a GPR), its cross-validation
rows ``/train/cv`` and learning curves (docs/nnmr.md, docs/gpr.md).

:func:`has_ensemble` says whether a store holds one, :func:`shift_model_facts` reads what a
model file needs (centre, species) for the manifest checks, and :func:`export_ensemble` makes
a small model store (the shipped one) from a trained store. Models are loaded by kind through
:func:`jobs.shiftmodels.registry.load_shift_model`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.store import RunStore
from jobs.shiftmodels.metrics import regression_metrics
from jobs.shiftmodels.nnmr import model_key, read_fold_model, write_fold_model

GROUP = "/train"
"""The store group this stage owns (layout: docs/nnmr.md); read it with
jobs.shiftmodels.nnmr.ShiftEnsemble.from_store."""


CV_GROUP = f"{GROUP}/cv"
"""Out-of-fold predictions: ``shift_dft_ppm``, ``shift_pred_ppm`` ... (what the report plots)."""


def has_ensemble(store: RunStore, group: str = GROUP) -> bool:
    """True when the store holds a trained shift model of this stage (NN-NMR or GPR)."""
    return store.exists(f"{group}/folds") or store.exists(f"{group}/gpr/weights_ppm")


def shift_model_facts(path: Path) -> tuple[str | None, list[str] | None, str | None]:
    """(centre, species, problem) of a store file holding a trained /train ensemble (read
    through engine.store's reader, serial and read-only)."""
    from engine.store import RunStore

    try:
        with RunStore(path, None, mode="r") as store:
            gpr = store.exists("/train/gpr/weights_ppm")  # a GPR model (jobs/shiftmodels/gpr.py)
            if not gpr and not store.keys("/train/folds"):
                return None, None, f"{path} holds no trained /train ensemble"
            attrs = store.attrs("/train")
    except OSError as exc:
        return None, None, f"{path} is no readable HDF5 store ({' '.join(str(exc).split())})"
    centre, species = attrs.get("centre"), attrs.get("species")
    species = [str(s) for s in species] if species is not None else None
    return (str(centre) if centre is not None else None), species, None


def export_ensemble(source, target, folds: list[int] | None = None,
                    weights_dtype: str = "float16") -> dict:
    """Copy a trained store's ``/train`` (selected folds, recast weights) into a small store.

    The shipped model is made this way from a 5-fold run: the first folds' models (identical to
    those a run with ``ensemble_folds`` set would train: same split and seeds), their
    out-of-fold rows, and the ``/train`` attributes with the CV metrics of those rows (as
    predicted by the source's weights: the features are not stored, so the effect of recasting
    to float16 is measured separately, docs/nnmr.md). Serial (no MPI).

    Parameters
    ----------
    source, target
        Paths of the trained store and of the new store (overwritten).
    folds
        Fold numbers to keep (default: all).
    weights_dtype
        ``float16`` or ``float32`` for the kernels.

    Returns
    -------
    dict
        The metrics (rmse_ppm, mae_ppm, r2) of the kept folds' out-of-fold rows.
    """
    from engine.store import RunStore

    with RunStore(source, None, mode="r") as src, RunStore(target, None, mode="w") as dst:
        names = sorted(src.keys("/train/folds"), key=model_key)
        kept = folds if folds is not None else sorted({model_key(k)[0] for k in names})
        cv_fold = src.read("/train/cv/fold")
        rows = np.isin(cv_fold, kept)
        for k in (name for name in names if model_key(name)[0] in kept):
            model = read_fold_model(src, f"/train/folds/{k}")
            extra = {key: value for key, value in src.attrs(f"/train/folds/{k}").items()
                     if key in ("rmse_ppm", "mae_ppm", "r2", "n_test_rows", "complete",
                                "fold", "member")}
            write_fold_model(dst, f"/train/folds/{k}", model, dtype=weights_dtype, **extra)
            for name in src.keys(f"/train/curves/{k}"):
                dst.put(f"/train/curves/{k}/{name}", src.read(f"/train/curves/{k}/{name}"))
        for name in src.keys("/train/split"):
            dst.put(f"/train/split/{name}", src.read(f"/train/split/{name}"))
        for name in src.keys("/train/cv"):
            dst.put(f"/train/cv/{name}", src.read(f"/train/cv/{name}")[rows])
        attrs = src.attrs("/train")
        metrics = regression_metrics(src.read("/train/cv/shift_dft_ppm")[rows],
                                     src.read("/train/cv/shift_pred_ppm")[rows])
        spec = dict(attrs.get("spec", {}), ensemble_folds=len(kept), weights_dtype=weights_dtype)
        attrs.update(folds_trained=len(kept), spec=spec, cv_rmse_ppm=metrics["rmse_ppm"],
                     cv_mae_ppm=metrics["mae_ppm"], cv_r2=metrics["r2"], cv_rows=int(rows.sum()),
                     exported_from=str(source))
        dst.set_attrs("/train", **attrs)
        dst.mark_stage("train", "complete")
    return metrics


def cv_path(name: str) -> str:
    """Store path of a dataset of the cross-validation rows (``/train/cv/<name>``)."""
    return f"{CV_GROUP}/{name}"
