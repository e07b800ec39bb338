"""`dynshift doc [SECTION]` and `dynshift --version`."""
from __future__ import annotations

from engine.cli import main
from engine.versions import dynshift_version
from engine.doc import doc_text, entries, type_text
from schemas.manifest import Manifest


def test_every_knob_is_listed_with_type_default_and_docstring(capsys):
    assert main(["doc"]) == 0
    out = capsys.readouterr().out
    assert "md.replicas: int (>= 1) = 1\n    Independent replicas (different seeds) per system." \
        in out
    assert "label.vasp.potcar_dir: path | null = null" in out
    assert "systems.N.target_species: str (a chemical element) = 'Na'" in out
    assert "stages: list[" in out and "= required" in out
    assert "checks.min_distance_a: float (> 0) = 0.5" in out
    paths = [row[0] for row in entries()]
    for name, field in Manifest.model_fields.items():
        assert name in paths
    for name in Manifest.model_fields["label"].annotation.model_fields["vasp"].annotation \
            .model_fields:
        assert f"label.vasp.{name}" in paths  # nested sections are expanded
    assert all(row[3] for row in entries()), "a knob without a docstring"


def test_a_section_lists_only_its_knobs(capsys):
    assert main(["doc", "label.vasp"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert heads[0] == "label.vasp: section"
    assert all(h.startswith("label.vasp") for h in heads) and len(heads) == 15
    assert main(["doc", "md.frames"]) == 0
    assert capsys.readouterr().out.startswith("md.frames: int (>= 1) = 1000\n")


def test_an_unknown_section_exits_2_naming_the_known_ones(capsys):
    assert main(["doc", "mdd"]) == 2
    err = capsys.readouterr().err
    assert "no section or knob 'mdd'" in err and "md, label" in err and "label.vasp" in err


def test_type_names_are_readable():
    from typing import Literal

    assert type_text(Literal["a", "b"]) == "'a' | 'b'"
    assert type_text(tuple[float, float] | None) == "tuple[float, float] | null"
    assert doc_text("train.hidden_units").startswith(
        "train.hidden_units: list[int (>= 1)] (length >= 1) = [512, 512, 512]")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dynshift {dynshift_version()}\n"
    assert dynshift_version() == "0.1.0"  # setup.py's


def test_the_setup_py_fallback(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert dynshift_version() == "0.1.0"
