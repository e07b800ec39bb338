"""The stage interface: one entry per stage, typed frozen results (who may spell a store group's
path is kept by tests/test_house.py)."""
from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from engine.stages import STAGES, StageResult, stage_module
from schemas import STAGE_ORDER


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
