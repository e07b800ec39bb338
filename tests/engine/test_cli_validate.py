"""`dynshift validate` and the checks made before `dynshift run` starts any stage."""
from __future__ import annotations

import subprocess
from pathlib import Path

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_a_valid_manifest_prints_its_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(ROOT / "run" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid; stages probe, md, infer, analyze, spectrum, report; systems p63mcm, p6322; " \
           "store dynshift-demo.h5" in out


def test_the_store_option_is_the_store_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "a.yaml"
    manifest.write_text("stages: [analyze]\n"
                        "systems: [{name: a, structure: 'builtin:p2-nmmo-p6322'}]\n")
    assert main(["validate", str(manifest)]) == 2  # a new store: nothing to analyse
    assert "stages: analyze reads the shifts" in capsys.readouterr().err
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"")  # an existing store is never opened by validation
    assert main(["validate", str(manifest), "--store", str(existing)]) == 0
    assert f"store {existing}" in capsys.readouterr().out


def test_unreadable_files_exit_2(tmp_path, capsys):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00stages")
    assert main(["validate", str(binary)]) == 2
    assert "not a text file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read: No such file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_structure_file_is_read_and_its_target_species_found(tmp_path, capsys, monkeypatch):
    import ase.io
    from ase import Atoms

    from jobs.structures import p2_cell

    monkeypatch.chdir(tmp_path)
    ase.io.write(tmp_path / "cell.extxyz", p2_cell())
    ase.io.write(tmp_path / "molecule.xyz", Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]))
    (tmp_path / "junk.cif").write_text("this is no cif\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "stages: [md, analyze]\nsystems:\n"
        "  - {name: ok, structure: cell.extxyz}\n"
        "  - {name: li, structure: cell.extxyz, target_species: Li}\n"
        "  - {name: gas, structure: molecule.xyz}\n"
        "  - {name: junk, structure: junk.cif}\n")
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "systems.1.target_species: no Li atoms in" in err
    assert "systems.2.structure:" in err and "3D periodic cell" in err
    assert "systems.3.structure: ASE cannot read" in err
    assert "systems.0" not in err
    assert "Traceback" not in err


def test_run_refuses_a_bad_manifest_before_any_stage(tmp_path, dynshift_bin):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("stages: [probe, md]\nsystems: [{name: a, structure: 'builtin:p2-x'}]\n")
    proc = subprocess.run([*dynshift_bin, "run", str(manifest), "--store",
                           str(tmp_path / "s.h5")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "systems.0.structure: unknown built-in structure" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.h5").exists()
