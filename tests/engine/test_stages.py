"""The stage interface: one entry per stage, typed frozen results, store groups owned by one module."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest

from engine.stages import STAGES, StageResult, stage_module
from schemas import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[2]

OWNERS = {"md": {"md"}, "label": {"label"}, "infer": {"infer"}, "analyze": {"analyze"},
          "train": {"train", "nnmr", "gpr"}, "potential": {"potential"}, "probe": {"probe"},
          "spectrum": {"spectrum"}}
"""Store group -> the modules allowed to spell its path (nnmr, gpr: the shift models' formats)."""


def test_registry_covers_every_stage_in_order():
    assert tuple(STAGES) == STAGE_ORDER


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_the_same_entry(name):
    module = stage_module(name)
    run = module.run
    parameters = list(inspect.signature(run).parameters)
    assert parameters == ["spec", "inputs"], f"{name}.run{parameters}"
    hints = typing.get_type_hints(run, vars(module))
    result = hints["return"]
    assert issubclass(result, StageResult), f"{name}.run returns {result}"
    assert dataclasses.is_dataclass(result) and result.__dataclass_params__.frozen


@pytest.mark.parametrize("group", list(OWNERS))
def test_no_module_spells_another_stages_group(group):
    """Only the owner builds `/<group>/...` paths; others import its names or reader."""
    pattern = re.compile(rf"""["']/{group}(/|["'])""")
    offenders = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        if path.stem in OWNERS[group]:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_default_summary_takes_the_scalar_fields():
    @dataclasses.dataclass(frozen=True)
    class Result(StageResult):
        n_frames: int
        rate_per_s: float
        names: tuple = ("a", "b")
        blob: bytes = b"x"

    assert Result(3, 2.5).summary() == {"n_frames": 3, "rate_per_s": 2.5, "names": ["a", "b"]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        Result(3, 2.5).n_frames = 4
