"""The stage driver: completion recorded in the store, resume skips complete stages."""
from __future__ import annotations

import os
import sys
import types

import pytest
from mpi4py import MPI

from dataclasses import dataclass

from engine import driver
from engine.stages import STAGES, StageResult
from engine.context import RankContext
from engine.store import RunStore
from schemas import parse_manifest


@pytest.fixture
def counting_stages(monkeypatch):
    """Two stand-in stages; the second fails while `fail` is set."""
    calls = {"probe": 0, "potential": 0, "fail": True}

    @dataclass(frozen=True)
    class ValueResult(StageResult):
        value: float

    def first(spec, inputs):
        calls["probe"] += 1
        inputs.store.put("/probe/value", [1.0, 2.0])
        return ValueResult(3.0)

    def second(spec, inputs):
        calls["potential"] += 1
        if calls["fail"]:
            raise RuntimeError("stopped on purpose")
        return StageResult()

    for name, function in (("probe", first), ("potential", second)):
        module = types.ModuleType(f"fake_{name}")
        module.run = function
        monkeypatch.setitem(sys.modules, f"fake_{name}", module)
        monkeypatch.setitem(STAGES, name, f"fake_{name}")
    return calls


def test_stopped_run_resumes_without_redoing_the_first_stage(tmp_path, counting_stages, capsys):
    manifest = parse_manifest("stages: [probe, potential]")
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    path = tmp_path / "run.h5"
    with RunStore(path, ctx) as store, pytest.raises(SystemExit) as stop:
        driver.run_stages(manifest, ctx, store)
    assert stop.value.code == 1
    assert "stage 'potential' failed: RuntimeError: stopped on purpose" in capsys.readouterr().err
    with RunStore(path, ctx, "r") as store:
        assert store.stage_status("probe") == "complete"
        assert store.stage_status("potential") == "running"
        assert store.attrs("/stages/probe")["summary"] == {"value": 3.0}
    counting_stages["fail"] = False
    with RunStore(path, ctx) as store:
        driver.run_stages(manifest, ctx, store)
        assert store.stage_status("potential") == "complete"
        assert list(store.read("/probe/value")) == [1.0, 2.0]
    assert counting_stages["probe"] == 1 and counting_stages["potential"] == 2
    with RunStore(path, ctx) as store:  # --redo runs a complete stage again
        driver.run_stages(manifest, ctx, store, force=("probe",))
    assert counting_stages["probe"] == 2 and counting_stages["potential"] == 2


def test_input_errors_exit_with_status_2(tmp_path, monkeypatch, capsys):
    from engine.failure import InputError

    def bad(spec, inputs):
        raise InputError("frames.extxyz, frame 3: no fermi_contact_mhz")

    module = types.ModuleType("fake_bad")
    module.run = bad
    monkeypatch.setitem(sys.modules, "fake_bad", module)
    monkeypatch.setitem(STAGES, "probe", "fake_bad")
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "run.h5", ctx) as store, pytest.raises(SystemExit) as stop:
        driver.run_stages(parse_manifest("stages: [probe]"), ctx, store)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "input error: frames.extxyz, frame 3" in err and "Traceback" not in err


def test_mpi_defaults_never_override_the_environment(monkeypatch):
    from engine.context import MPI_DEFAULTS, mpi_environment_defaults

    name = "OMPI_MCA_mpi_yield_when_idle"
    assert MPI_DEFAULTS[name] == "1"
    monkeypatch.setenv(name, "0")  # a site's choice wins
    mpi_environment_defaults()
    assert os.environ[name] == "0"
    monkeypatch.delenv(name)
    mpi_environment_defaults()
    assert os.environ[name] == "1"


def test_versions_of_the_first_run_are_kept_and_changes_logged(tmp_path, capsys):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "v.h5", ctx) as store:
        driver.record_run(store, ctx, "stages: [probe]\n", {"numpy": "2.0.0", "ase": "3.29.0"})
        driver.record_run(store, ctx, "stages: [probe]\n", {"numpy": "2.1.0", "ase": "3.29.0"})
        root = store.attrs("/")
    assert root["versions"] == {"numpy": "2.0.0", "ase": "3.29.0"}
    assert "versions_changed" not in root["invocations"][0]
    assert root["invocations"][1]["versions_changed"] == {"numpy": ["2.0.0", "2.1.0"]}
    assert "numpy 2.0.0 -> 2.1.0" in capsys.readouterr().out
