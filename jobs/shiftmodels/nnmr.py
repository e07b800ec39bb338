"""The NN-NMR model as plain arrays: a fold's network (:class:`FoldModel`), its HDF5 format in
a run store, and the ensemble that predicts with it.

Inference needs no TensorFlow: :class:`ShiftEnsemble` reads the fold models' plain arrays from
a run store, folds the feature and target standardisation into the first and last layers, and
predicts with float32 numpy GEMMs (the first layers of all models in one GEMM). Training is in
:mod:`jobs.shiftmodels.nnmr_training`; the faster predictors and infer's choice between them in
:mod:`jobs.shiftmodels.predictors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FoldModel:
    """One trained network as plain arrays, with the standardisation it was trained with.

    Attributes
    ----------
    kernels, biases
        Layer weights, input to output; the last layer has one output (standardised shift).
    feature_mean, feature_scale
        Per-feature mean and standard deviation subtracted / divided before the first layer.
    target_mean_ppm, target_std_ppm
        The network predicts (shift_ppm - target_mean_ppm) / target_std_ppm.
    """

    kernels: list[np.ndarray]
    biases: list[np.ndarray]
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    target_mean_ppm: float
    target_std_ppm: float
    curves: dict = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0

    def folded(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """float32 kernels and biases that take RAW features to shifts in ppm."""
        kernels = [np.asarray(k, dtype=np.float64) for k in self.kernels]
        biases = [np.asarray(b, dtype=np.float64) for b in self.biases]
        scale = np.asarray(self.feature_scale, dtype=np.float64)
        mean = np.asarray(self.feature_mean, dtype=np.float64)
        biases[0] = biases[0] - (mean / scale) @ kernels[0]
        kernels[0] = kernels[0] / scale[:, None]
        kernels[-1] = kernels[-1] * self.target_std_ppm
        biases[-1] = biases[-1] * self.target_std_ppm + self.target_mean_ppm
        return ([k.astype(np.float32) for k in kernels], [b.astype(np.float32) for b in biases])

    def predict_ppm(self, features: np.ndarray) -> np.ndarray:
        """Shifts (ppm) of raw feature rows (numpy, float32)."""
        return ShiftEnsemble([self.folded()], {}).predict(features)[0]

def model_name(fold: int, member: int = 0) -> str:
    """Group name of a fold's network under ``/train/folds``: ``"3"`` for member 0 of fold 3,
    ``"3.1"`` for its member 1."""
    return f"{fold}" if member == 0 else f"{fold}.{member}"


def model_key(name: str) -> tuple[int, int]:
    """(fold, member) of a :func:`model_name`."""
    fold, _, member = str(name).partition(".")
    return int(fold), int(member or 0)


# ---- store I/O ------------------------------------------------------------------------------
def write_fold_model(store, group: str, model: FoldModel, dtype: str = "float32",
                     **attrs) -> None:
    """Write a fold model's arrays under `group` (collective; every rank holds the same)."""
    for i, (kernel, bias) in enumerate(zip(model.kernels, model.biases)):
        store.put(f"{group}/kernel_{i}", np.asarray(kernel, dtype=dtype))
        store.put(f"{group}/bias_{i}", np.asarray(bias, dtype=np.float32))
    store.put(f"{group}/feature_mean", np.asarray(model.feature_mean, dtype=np.float32))
    store.put(f"{group}/feature_scale", np.asarray(model.feature_scale, dtype=np.float32))
    store.set_attrs(group, n_layers=len(model.kernels), target_mean_ppm=model.target_mean_ppm,
                    target_std_ppm=model.target_std_ppm, best_epoch=model.best_epoch,
                    epochs_run=model.epochs_run, weights_dtype=dtype, **attrs)


def read_fold_model(store, group: str) -> FoldModel:
    """Read a fold model written by :func:`write_fold_model` (any rank, no communication)."""
    attrs = store.attrs(group)
    n_layers = int(attrs["n_layers"])
    return FoldModel(
        kernels=[store.read(f"{group}/kernel_{i}") for i in range(n_layers)],
        biases=[store.read(f"{group}/bias_{i}") for i in range(n_layers)],
        feature_mean=store.read(f"{group}/feature_mean"),
        feature_scale=store.read(f"{group}/feature_scale"),
        target_mean_ppm=float(attrs["target_mean_ppm"]),
        target_std_ppm=float(attrs["target_std_ppm"]),
        best_epoch=int(attrs.get("best_epoch", 0)), epochs_run=int(attrs.get("epochs_run", 0)))


class ShiftEnsemble:
    """The fold models of a trained store, predicting shifts (ppm) in plain numpy.

    Parameters
    ----------
    models
        Per model, (kernels, biases) already folded to take raw features to ppm.
    settings
        ``{"soap": {...}, "species": [...], "centre": "Na", ...}`` (the /train attributes).
    """

    def __init__(self, models: list[tuple[list[np.ndarray], list[np.ndarray]]], settings: dict,
                 chunk_rows: int = 8192):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.settings = settings
        self.chunk_rows = chunk_rows
        self.n_models = len(models)
        self._first_kernel = np.ascontiguousarray(
            np.concatenate([m[0][0] for m in models], axis=1), dtype=np.float32)
        self._first_bias = np.concatenate([m[1][0] for m in models]).astype(np.float32)
        self._widths = [m[0][0].shape[1] for m in models]
        self._rest = [([np.ascontiguousarray(k, np.float32) for k in m[0][1:]],
                       [np.asarray(b, np.float32) for b in m[1][1:]]) for m in models]

    @property
    def n_features(self) -> int:
        """Length of the SOAP vectors the models take."""
        return self._first_kernel.shape[0]

    @classmethod
    def from_store(cls, reader, group: str) -> "ShiftEnsemble":
        """Load every fold model under ``<group>/folds`` of an open store (use
        :func:`jobs.shiftmodels.registry.load_shift_model` to load a model of any kind)."""
        if not reader.exists(f"{group}/folds"):
            from engine.failure import InputError

            raise InputError(f"{getattr(reader, 'path', reader)}: no trained model "
                             f"(no {group}/folds); run the train stage first")
        folds = sorted(reader.keys(f"{group}/folds"), key=model_key)
        models = [read_fold_model(reader, f"{group}/folds/{k}").folded() for k in folds
                  if reader.attrs(f"{group}/folds/{k}").get("complete", True)]
        return cls(models, reader.attrs(group))

    def predict_all(self, features: np.ndarray) -> np.ndarray:
        """Every model's shifts (ppm), shape (n_models, n_rows), float32."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"features of shape {features.shape}; the model takes "
                             f"(n, {self.n_features})")
        out = np.empty((self.n_models, len(features)), dtype=np.float32)
        for start in range(0, len(features), self.chunk_rows):
            rows = features[start:start + self.chunk_rows]
            out[:, start:start + len(rows)] = self._predict_rows(rows)
        return out

    def _predict_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every model's shifts (ppm) of one block of rows, (n_models, n_rows): numpy GEMMs."""
        out = np.empty((self.n_models, len(rows)), dtype=np.float32)
        edges = np.cumsum([0] + self._widths)
        hidden_all = rows @ self._first_kernel
        hidden_all += self._first_bias
        np.maximum(hidden_all, 0.0, out=hidden_all)
        for m, (kernels, biases) in enumerate(self._rest):
            hidden = hidden_all[:, edges[m]:edges[m + 1]]
            for i, (kernel, bias) in enumerate(zip(kernels, biases)):
                hidden = hidden @ kernel
                hidden += bias
                if i < len(kernels) - 1:
                    np.maximum(hidden, 0.0, out=hidden)
            out[m] = hidden[:, 0]
        return out

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean shift (ppm) and spread (population std over models, ppm) per row."""
        every = self.predict_all(features)
        return every.mean(axis=0), every.std(axis=0)
