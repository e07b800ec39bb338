"""The stage interface: one entry per stage, `run(spec, inputs) -> <Stage>Result`, and the registry.

Every stage module of jobs/ exposes

- ``run(spec, inputs: StageInputs) -> <Stage>Result``: `spec` is the stage's own manifest
  section (``manifest.md`` for md), `inputs` what the run gives every stage;
- a frozen result dataclass (a subclass of :class:`StageResult`) whose ``summary()`` is what
  the driver records in ``/stages/<name>`` and what ``dynshift show`` prints;
- the names of the store groups it owns and a reader that later stages import (no module
  builds another stage's path strings).

:data:`STAGES` maps stage names to modules; a module is imported only when its stage runs.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.context import RankContext
from engine.seeds import SeedStreams
from engine.store import RunStore

STAGES: dict[str, str] = {
    "probe": "jobs.stages.probe",
    "potential": "jobs.stages.potential",
    "learn": "jobs.stages.learn",
    "md": "jobs.stages.md",
    "label": "jobs.stages.label",
    "train": "jobs.stages.train",
    "infer": "jobs.stages.infer",
    "analyze": "jobs.stages.analyze",
    "spectrum": "jobs.stages.spectrum",
    "report": "jobs.stages.report",
}
"""Stage name -> module of jobs/ (the manifest's stage order is schemas.STAGE_ORDER)."""


@dataclass(frozen=True)
class StageResult:
    """Base of every stage's typed, frozen result.

    ``summary()`` gives the headline numbers recorded in ``/stages/<name>``: by default every
    field whose value is a number, a string, a bool, or a list / dict of those.
    """

    def summary(self) -> dict:
        """Headline numbers of the stage (JSON-able)."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, Path):
                value = str(value)
            if isinstance(value, (int, float, str, bool, list, dict)) or value is None:
                out[item.name] = value
        return out


@dataclass(frozen=True)
class StageInputs:
    """What a run hands every stage: where it runs, the store, the seeds and the shared sections.

    Attributes
    ----------
    ctx
        Rank context (its communicator is the one the stage runs on; any split works).
    store
        The run store, open on every rank of ``ctx``.
    seeds
        The run's named random streams (engine.seeds).
    systems
        The manifest's systems (SystemSpec), in manifest order.
    shift
        The A_iso -> shift constants (ShiftSpec).
    checks
        The frame sanity checks (ChecksSpec), or None for the defaults.
    dp_model
        A frozen DP model given in the manifest (``potential.model``), the md stage's model
        when the store holds none; None: the shipped one.
    label
        The label section (LabelSpec): how every DFT (or model) label is made, by the label
        stage and by the learn loop.
    """

    ctx: RankContext
    store: RunStore
    seeds: SeedStreams
    systems: tuple = ()
    shift: Any = None
    checks: Any = None
    dp_model: Path | None = None
    label: Any = None

    @classmethod
    def from_manifest(cls, manifest, ctx: RankContext, store: RunStore) -> "StageInputs":
        """The inputs of every stage of `manifest`."""
        return cls(ctx=ctx, store=store, seeds=SeedStreams(manifest.seed),
                   systems=tuple(manifest.systems), shift=manifest.shift,
                   checks=getattr(manifest, "checks", None), dp_model=manifest.potential.model,
                   label=getattr(manifest, "label", None))


class Stage(Protocol):
    """What a stage module provides."""

    def run(self, spec, inputs: StageInputs) -> StageResult:  # pragma: no cover - protocol
        ...


def stage_module(name: str):
    """The module of stage `name` (imported on first use).

    Raises
    ------
    KeyError
        For a name that is not in :data:`STAGES`.
    """
    return importlib.import_module(STAGES[name])


def stage_spec(manifest, name: str):
    """The manifest section of stage `name`."""
    return getattr(manifest, name)
