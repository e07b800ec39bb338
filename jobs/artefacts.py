"""Which model a stage uses, and why: the one place where artefacts are resolved by kind.

Two kinds of artefact pass between stages:

- ``dp``: the DP model(s) md propagates with. Published by the learn stage (a complete campaign:
  its final ensemble, model 0 propagating, the others giving the force deviation) and by the
  potential stage (one model). Precedence: the learn campaign's ensemble, else the potential
  stage's model, else ``potential.model`` of the manifest, else the shipped DP.
- ``shift``: the shift model infer predicts with. Published by the train stage and by the learn
  stage (the campaign's final GPR). Precedence: ``infer.model`` of the manifest, else the train
  stage's model, else the learn campaign's, else the shipped one.

The same functions answer the plan (``dynshift run --dry-run``: what the store holds plus what
the stages of this run will publish), the stages at run time (what the store holds) and
``dynshift show`` (the stages record their :class:`Choice` in their result).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from engine.failure import InputError
from schemas.infer import SHIPPED_SHIFT_MODEL
from schemas.potential import SHIPPED_MODEL as SHIPPED_DP_MODEL

PUBLISHERS: dict[str, tuple[str, ...]] = {"dp": ("learn", "potential"),
                                          "shift": ("train", "learn")}
"""Artefact kind -> the stages that publish one."""


@dataclass(frozen=True)
class Choice:
    """The artefact a stage uses: its kind, where it comes from, and why that one.

    Attributes
    ----------
    kind
        ``dp`` or ``shift``.
    source
        ``learn``, ``potential`` or ``train`` (a stage's published artefact in the store),
        ``manifest`` (a file the manifest names) or ``shipped`` (the one in jobs/data/).
    path
        The file for ``manifest`` and ``shipped``; None for an artefact inside the store.
    why
        The precedence rule that chose it, in words.
    """

    kind: str
    source: str
    path: Path | None
    why: str

    def describe(self) -> str:
        """One line: what it is and why (``dynshift run --dry-run`` and ``dynshift show``)."""
        what = {("dp", "learn"): "the learn campaign's final DP ensemble (model 0 propagates)",
                ("dp", "potential"): "the DP model of the potential stage (/potential)",
                ("shift", "train"): "the shift model of the train stage (/train)",
                ("shift", "learn"): "the learn campaign's final shift model (GPR)"}.get(
                    (self.kind, self.source), str(self.path))
        return f"{what} ({self.why})"


def published_in(store) -> set[str]:
    """The stages whose artefacts an open store (RunStore or reader) holds."""
    from jobs.layouts.learn import has_campaign
    from jobs.layouts.potential import has_model
    from jobs.layouts.train import has_ensemble

    held = set()
    if has_campaign(store):
        held.add("learn")
    if has_model(store):
        held.add("potential")
    if has_ensemble(store):
        held.add("train")
    return held


def dp_choice(published: set[str], manifest_model: Path | None) -> Choice:
    """md's DP model(s), by precedence (module docstring).

    Parameters
    ----------
    published
        Stages whose artefacts are (or, in a plan, will be) in the store.
    manifest_model
        ``potential.model`` of the manifest, or None.
    """
    if "learn" in published:
        return Choice("dp", "learn", None, "a learn campaign is complete in the store: it comes "
                                           "first")
    if "potential" in published:
        return Choice("dp", "potential", None, "no learn campaign; the potential stage's model "
                                               "comes next")
    if manifest_model is not None:
        return Choice("dp", "manifest", Path(manifest_model),
                      "potential.model of the manifest: the store holds no DP model")
    return Choice("dp", "shipped", SHIPPED_DP_MODEL,
                  "the shipped DP: no learn campaign, no potential stage, no potential.model")


def shift_choice(published: set[str], manifest_model: Path | None) -> Choice:
    """infer's shift model, by precedence (module docstring).

    Parameters
    ----------
    published
        Stages whose artefacts are (or, in a plan, will be) in the store.
    manifest_model
        ``infer.model`` of the manifest, or None.
    """
    if manifest_model is not None:
        return Choice("shift", "manifest", Path(manifest_model),
                      "infer.model of the manifest comes first")
    if "train" in published:
        return Choice("shift", "train", None, "infer.model is not set; the train stage's "
                                              "model comes next")
    if "learn" in published:
        return Choice("shift", "learn", None, "no infer.model and no train stage model; the "
                                              "learn campaign's comes next")
    return Choice("shift", "shipped", SHIPPED_SHIFT_MODEL,
                  "the shipped model: no infer.model, no train stage, no learn campaign")


@contextmanager
def dp_model_files(choice: Choice, store):
    """Context manager: local files of the chosen DP model(s), model 0 first."""
    if choice.source == "learn":
        from jobs.layouts.learn import learned_model_files

        with learned_model_files(store) as paths:
            yield list(paths)
        return
    if choice.source == "potential":
        from jobs.layouts.potential import stored_model_file

        with stored_model_file(store) as path:
            yield [path]
        return
    if not choice.path.is_file():
        where = "potential.model" if choice.source == "manifest" else "the shipped DP"
        raise InputError(f"{where}: {choice.path} not found (and no model in the store)")
    with nullcontext(choice.path):
        yield [choice.path]


def load_chosen_shift_model(choice: Choice, store):
    """The chosen shift model and the name it is recorded under (``predictor_model``)."""
    from jobs.shiftmodels.registry import load_shift_model as load

    if choice.source == "train":
        return load(store), f"{store.path}:/train"
    if choice.source == "learn":
        from jobs.layouts.learn import learned_shift_model

        return learned_shift_model(store), f"{store.path}: the learn campaign's shift model"
    if not Path(choice.path).exists():
        if choice.source == "manifest":
            raise InputError(f"infer.model: {choice.path}: no such store file")
        raise InputError(f"infer: no model: this store has no /train, infer.model is not set, "
                         f"and the shipped model {choice.path} is missing")
    return load(Path(choice.path)), str(choice.path)
