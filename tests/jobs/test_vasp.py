"""The VASP labeller: input files, launching with a time limit, OUTCAR checks (fake vasp)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.failure import InputError
from fake_vasp.labelling import (FAKE_VASP, POTCAR_NAMES, expected_labels, make_potcars,
                                 read_log, shared_frames)
from jobs.labellers import LabelError, make_labeller
from jobs.labellers.vasp import VaspLabeller, VaspProfile, VaspTemplate, grouping_permutation
from schemas.label import LabelSpec


@pytest.fixture
def frame(shared_data):
    """A real 88-atom P2-NMMO frame, wrapped into its cell."""
    atoms = shared_frames(shared_data, 1, start=5)[0]
    atoms.wrap()
    return atoms


def _labeller(tmp_path: Path, plan: dict | None = None, walltime_s: float = 20.0,
              **template) -> VaspLabeller:
    (tmp_path / "plan.json").write_text(json.dumps(plan or {}))
    env = {"FAKE_VASP_PLAN": str(tmp_path / "plan.json"),
           "FAKE_VASP_LOG": str(tmp_path / "vasp.log"), "FAKE_VASP_SLEEP_S": "0"}
    template = VaspTemplate(potcar_dir=make_potcars(tmp_path / "potcars"),
                            potcar=POTCAR_NAMES, **template)
    return VaspLabeller(template, VaspProfile((sys.executable, str(FAKE_VASP)), walltime_s,
                                              kill_grace_s=0.5, env=env))


def test_input_files_carry_hyperfine_scan_settings_and_overrides(tmp_path, frame):
    labeller = _labeller(tmp_path, nupdown=48, ngyromag={"Na": 11.262}, ngyromag_default=100.0,
                         incar={"ALGO": "All", "LREAL": False, "MAGMOM": [3, 3]})
    # species first seen in the order O, Na, Mg, Mn: POSCAR, POTCAR and NGYROMAG follow it
    order = np.r_[40:88, 0:40]
    atoms = frame[order]
    labeller.template.write_input(tmp_path / "w", atoms, "dynshift s/r000-f000001")
    incar = dict(line.split(" = ", 1) for line in (tmp_path / "w" / "INCAR").read_text()
                 .splitlines())
    assert incar["LHYPERFINE"] == ".TRUE." and incar["ISPIN"] == "2"
    assert incar["METAGGA"] == "SCAN" and incar["LASPH"] == ".TRUE."
    assert incar["NGYROMAG"] == "100 11.262 100 100"
    assert incar["NUPDOWN"] == "48" and incar["ALGO"] == "All" and incar["LREAL"] == ".FALSE."
    assert incar["MAGMOM"] == "3 3" and incar["ENCUT"] == "400"
    potcar = (tmp_path / "w" / "POTCAR").read_text().split("\n")
    assert [line.split()[1] for line in potcar if line] == ["O", "Na_pv", "Mg_pv", "Mn_pv"]
    poscar = (tmp_path / "w" / "POSCAR").read_text().splitlines()
    assert poscar[0] == "dynshift s/r000-f000001"
    assert poscar[5].split() == ["O", "Na", "Mg", "Mn"] and poscar[6].split() == [
        "48", "16", "8", "16"]
    kpoints = (tmp_path / "w" / "KPOINTS").read_text().splitlines()
    assert kpoints[2] == "Gamma" and kpoints[3] == "2 2 2"


def test_fake_run_gives_the_frames_labels_in_its_own_atom_order(tmp_path, frame):
    labeller = _labeller(tmp_path)
    # shuffle within the species' first-appearance order Na, Mg, Mn, O (the fake's template)
    rest = np.random.default_rng(1).permutation(np.setdiff1d(np.arange(88), [0, 16, 24, 40]))
    order = np.r_[[0, 16, 24, 40], rest]
    atoms = frame[order]
    labelled = labeller.label(atoms, tmp_path / "w", "dynshift s/r000-f000002")
    grouped = grouping_permutation(atoms.get_chemical_symbols())  # the fake's (POSCAR) order
    expected = expected_labels(atoms.positions[grouped])
    assert labelled.get_chemical_symbols() == atoms.get_chemical_symbols()
    np.testing.assert_allclose(labelled.positions, atoms.positions)
    np.testing.assert_allclose(labelled.arrays["fermi_contact_mhz"][grouped],
                               expected["a_iso_mhz"], atol=6e-4)
    np.testing.assert_allclose(labelled.get_forces()[grouped], expected["forces_ev_a"],
                               atol=6e-6)
    assert labelled.get_potential_energy() == pytest.approx(expected["energy_ev"], abs=1e-7)
    assert labelled.info["magnetic_moment_s"] == pytest.approx(48.0000035)
    # the labels depend on the frame: another frame, other values
    other = expected_labels(atoms.positions[grouped] + 0.1)
    assert np.abs(other["a_iso_mhz"] - expected["a_iso_mhz"]).max() > 0.01
    # a finished result is recovered for the same frame, not for a displaced one
    assert labeller.recover(atoms, tmp_path / "w") is not None
    moved = atoms.copy()
    moved.positions[7] += 0.05
    assert labeller.recover(moved, tmp_path / "w") is None
    with pytest.raises(LabelError) as error:
        labeller.template.read_results(tmp_path / "w", moved)
    assert error.value.reason == "wrong_frame"


@pytest.mark.parametrize("behaviour, reason", [
    ("exit", "exit_3"), ("truncated", "truncated"), ("unconverged", "unconverged"),
    ("garbled", "bad_outcar")])
def test_failed_runs_raise_with_their_reason(tmp_path, frame, behaviour, reason):
    labeller = _labeller(tmp_path, plan={"s/r000-f000004": [behaviour]})
    with pytest.raises(LabelError) as error:
        labeller.label(frame, tmp_path / "w", "dynshift s/r000-f000004")
    assert error.value.reason == reason
    assert labeller.recover(frame, tmp_path / "w") is None
    # the second attempt (plan exhausted) succeeds in the same folder
    assert labeller.label(frame, tmp_path / "w", "dynshift s/r000-f000004") is not None


def test_a_run_past_its_walltime_is_killed(tmp_path, frame):
    labeller = _labeller(tmp_path, plan={"s/r000-f000005": ["timeout"]}, walltime_s=1.0)
    start = time.monotonic()
    with pytest.raises(LabelError) as error:
        labeller.label(frame, tmp_path / "w", "dynshift s/r000-f000005")
    assert error.value.reason == "timeout"
    assert time.monotonic() - start < 10
    pid = int(read_log(tmp_path)[0][3])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the fake (sleeping an hour) is gone


def test_missing_potcar_or_program_is_an_input_error(tmp_path):
    spec = LabelSpec.model_validate({"vasp": {"potcar_dir": str(make_potcars(tmp_path / "p")),
                                              "command": [sys.executable]}})
    labeller = make_labeller(spec, 100.0)
    labeller.check(["O"])
    with pytest.raises(InputError, match="no POTCAR for Na"):
        labeller.check(["Na"])  # Na_pv exists, but the map sends Na to the folder "Na"
    unset = make_labeller(LabelSpec.model_validate({"vasp": {"command": [sys.executable]}}), 1.0)
    with pytest.raises(InputError, match="potcar_dir"):
        unset.check(["O"])
    spec = LabelSpec.model_validate({"vasp": {"potcar_dir": str(tmp_path / "p"),
                                              "command": ["no-such-vasp-here"]}})
    with pytest.raises(InputError, match="no-such-vasp-here"):
        make_labeller(spec, 100.0).check(["O"])


def test_grouping_permutation_is_stable_by_first_appearance():
    order = grouping_permutation(["O", "Na", "O", "Mn", "Na"])
    assert order.tolist() == [0, 2, 1, 4, 3]


def test_launch_environment_drops_the_ranks_mpi_identity(monkeypatch):
    from engine.external import launch_environment
    from jobs.labellers.vasp import expand_command

    monkeypatch.setenv("PMIX_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "x")
    monkeypatch.setenv("OMPI_MCA_btl", "self,vader")
    environment = launch_environment({"OMP_NUM_THREADS": "1"})
    assert "PMIX_RANK" not in environment and "OMPI_COMM_WORLD_RANK" not in environment
    assert "OMPI_MCA_orte_hnp_uri" not in environment
    assert environment["OMPI_MCA_btl"] == "self,vader" and environment["OMP_NUM_THREADS"] == "1"
    assert expand_command(["srun", "-n", "{cores}", "vasp-{rank}"], 8, 3) == (
        "srun", "-n", "8", "vasp-3")
