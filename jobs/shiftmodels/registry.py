"""The shift models by kind: load whichever model a store holds, as the store says it is.

A trained store's group (the train stage's ``/train``, a learn campaign's shift group, the
shipped ``jobs/data/*.h5``) records what it holds: a GPR model has the ``model`` attribute
``gpr`` (:mod:`jobs.shiftmodels.gpr`); otherwise the group holds NN-NMR fold models
(:mod:`jobs.shiftmodels.nnmr`). Both give the same contract: ``predict`` / ``predict_all``,
``settings`` (the SOAP settings they were trained with) and ``n_features``.
"""
from __future__ import annotations
from engine.failure import InputError
from jobs.shiftmodels.soap import SoapFeaturizer

from pathlib import Path

KINDS = ("gpr", "nnmr")
"""The kinds of shift model a store can hold."""


def _open_read_only(path: Path):
    """A store file opened read-only on this process alone (no MPI), e.g. the shipped model."""
    from engine.failure import InputError
    from engine.store import RunStore

    if not Path(path).exists():
        raise InputError(f"{path}: no such shift model store")
    return RunStore(Path(path), None, mode="r")


def shift_model_kind(reader, group: str) -> str:
    """``gpr`` or ``nnmr``: the kind of shift model in ``<group>`` of an open store."""
    from jobs.shiftmodels.gpr import is_gpr_store

    return "gpr" if is_gpr_store(reader, group) else "nnmr"


def load_shift_model(store_or_path, group: str | None = None):
    """The shift model of ``<group>`` of a RunStore or a store file, of the kind it records.

    Parameters
    ----------
    store_or_path
        An open :class:`engine.store.RunStore` (or anything with its reading interface) or the
        path of a store file (opened read-only, serial, and closed again).
    group
        The group holding the model; default the train stage's group.

    Returns
    -------
    jobs.shiftmodels.gpr.GprShiftModel or jobs.shiftmodels.nnmr.ShiftEnsemble
    """
    from jobs.layouts.train import GROUP
    from jobs.shiftmodels.gpr import GprShiftModel
    from jobs.shiftmodels.nnmr import ShiftEnsemble

    group = GROUP if group is None else group
    opened = isinstance(store_or_path, (str, Path))
    reader = _open_read_only(Path(store_or_path)) if opened else store_or_path
    try:
        if shift_model_kind(reader, group) == "gpr":
            return GprShiftModel.from_store(reader, group)
        return ShiftEnsemble.from_store(reader, group)
    finally:
        if opened:
            reader.close()


def featurizer_for(ensemble, kernel: str = "dscribe") -> SoapFeaturizer:
    """The SOAP featurizer the ensemble was trained with (from its settings)."""
    settings = dict(getattr(ensemble, "settings", {}) or {})
    soap = settings.get("soap", settings)
    featurizer = SoapFeaturizer.from_settings(soap, kernel)
    n_model = getattr(ensemble, "n_features", featurizer.n_features)
    if n_model != featurizer.n_features:
        raise InputError(f"infer: the model takes {n_model} features, its SOAP settings give "
                         f"{featurizer.n_features}")
    return featurizer
