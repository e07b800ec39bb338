"""The manifest schema: defaults, field-named errors, path resolution."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from schemas import ManifestError, parse_manifest

BAD = """
stages: [probe, md]
systems: [{name: a, structure: "builtin:p2-nmmo-p63mcm"}]
md:
  replicas: 0
  temperature_k: -3
  timestepp_fs: 1
"""


def test_three_bad_fields_give_three_named_errors():
    with pytest.raises(ManifestError) as info:
        parse_manifest(BAD, "bad.yaml")
    errors = info.value.errors
    assert len(errors) == 3
    assert errors[0].startswith("md.replicas:") and ">= 1" in errors[0]
    assert errors[1].startswith("md.temperature_k:")
    assert errors[2].startswith("md.timestepp_fs: unknown key") and "timestep_fs" in errors[2]


def test_cli_validate_exits_2_listing_every_field(tmp_path: Path, dynshift_bin):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(BAD)
    proc = subprocess.run([*dynshift_bin, "validate", str(manifest)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "3 errors" in proc.stderr
    for field in ("md.replicas", "md.temperature_k", "md.timestepp_fs"):
        assert field in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_order_and_unique_systems_are_checked():
    with pytest.raises(ManifestError, match="order"):
        parse_manifest("stages: [md, probe]\nsystems: [{name: a, structure: x.xyz}]")
    with pytest.raises(ManifestError, match="unique"):
        parse_manifest("stages: [md]\nsystems: [{name: a, structure: x}, {name: a, structure: y}]")
    with pytest.raises(ManifestError, match="systems"):
        parse_manifest("stages: [md]")


def test_yaml_errors_and_non_mappings_are_manifest_errors():
    with pytest.raises(ManifestError, match="YAML"):
        parse_manifest("stages: [probe\n")
    with pytest.raises(ManifestError, match="mapping"):
        parse_manifest("- probe")


def test_input_paths_resolve_against_the_manifest_folder(tmp_path: Path):
    text = "stages: [train]\ntrain: {frames: [data/a.extxyz, /abs/b.extxyz]}\n"
    manifest = parse_manifest(text, base_dir=tmp_path)
    assert manifest.train.frames[0] == tmp_path / "data" / "a.extxyz"
    assert str(manifest.train.frames[1]) == "/abs/b.extxyz"


def test_manifest_is_frozen_and_every_field_documented():
    from schemas.manifest import Manifest

    manifest = parse_manifest("stages: [probe]")
    with pytest.raises(Exception):
        manifest.seed = 3

    def walk(model, path):
        for name, field in model.model_fields.items():
            assert field.description, f"{path}{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{path}{name}.")
    walk(Manifest, "")


def test_structure_files_resolve_against_the_manifest_folder(tmp_path: Path):
    text = ("stages: [md]\nsystems: [{name: a, structure: cells/a.cif}, "
            "{name: b, structure: 'builtin:p2-nmmo-p6322'}]\n")
    manifest = parse_manifest(text, base_dir=tmp_path)
    assert manifest.system("a").structure == str(tmp_path / "cells" / "a.cif")
    assert manifest.system("b").structure == "builtin:p2-nmmo-p6322"


def test_learn_training_steps_per_iteration_repeat_the_last_entry():
    dp = parse_manifest("stages: [probe]\nlearn: {dp: {steps: 900, steps_per_iteration: "
                        "[100, 200]}}").learn.dp
    assert [dp.steps_at(i) for i in range(4)] == [100, 200, 200, 200]
    dp = parse_manifest("stages: [probe]\nlearn: {dp: {steps: 900}}").learn.dp
    assert [dp.steps_at(i) for i in range(3)] == [900, 900, 900]
