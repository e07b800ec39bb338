"""The GPAW labeller: the VASP convention of the couplings, real GPAW runs on tiny cells
(seconds each), failures, recovery, and a 2-rank `dynshift run` killed with SIGKILL and rerun.

Tests that run GPAW skip when it is not installed (`DYNSHIFT_GPAW=1 bash run/install.sh`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from ase import Atoms
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from fake_vasp.labelling import write_md
from jobs.labellers import LabelError, make_labeller
from jobs.labellers.gpaw import (MHZ_PER_EV, RESULT_FILE, GpawLabeller, GpawProfile,
                                 GpawTemplate, expand_command, nuclear_g_factor,
                                 vasp_fermi_contact_mhz)
from launch import launch_env, session_pids
from schemas import ManifestError, parse_manifest
from schemas.label import LabelSpec

needs_gpaw = pytest.mark.skipif(
    importlib.util.find_spec("gpaw") is None,
    reason="GPAW is not installed (DYNSHIFT_GPAW=1 bash run/install.sh, or "
           ".venv/bin/pip install gpaw gpaw-data with libxc-dev installed)")

H_HYPERFINE_MHZ = 1420.405751768
"""The free H atom's 21 cm line (MHz)."""
PROTON_GAMMA_MHZ_PER_T = 42.577478518
HYDROGEN_ALPHA = 7.2973525693e-3
ELECTRON_G = 2.00231930436256
ELECTRON_PROTON_MASS_RATIO = 1 / 1836.15267343
HARTREE_EV = 27.211386245988

INJECT = r'''"""Stand-in launcher around the real run script: fails on demand, logs every run."""
import json, os, runpy, sys, time
plan_path, log_path, script = sys.argv[1:4]
key = "/".join(os.getcwd().split(os.sep)[-2:])
plan = json.load(open(plan_path)).get(key, [])
lines = open(log_path).read().split("\n") if os.path.exists(log_path) else []
attempt = sum(1 for line in lines if line.split()[:2] == ["start", key])
action = plan[attempt] if attempt < len(plan) else "ok"
def log(*fields):
    with open(log_path, "a") as handle:
        handle.write(" ".join(str(f) for f in fields) + "\n")
log("start", key, attempt, os.getpid())
if action == "exit":
    log("end", key, attempt, "exit")
    sys.exit(3)
if action == "hang":
    time.sleep(600)
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
log("end", key, attempt, "ok")
'''


# ---- helpers (also used by tests/mpi/test_gpaw_mpi.py) --------------------------------------
def pair_frames(n_frames: int) -> list[Atoms]:
    """Two H atoms 2.6-3.1 A apart in a 5 x 4 x 4 A box: tiny spin-polarised frames."""
    frames = []
    for i in range(n_frames):
        d = 2.6 + 0.1 * i
        frames.append(Atoms("H2", positions=[[2.5 - d / 2, 2.0, 2.0], [2.5 + d / 2, 2.0, 2.1]],
                            cell=[5.0, 4.0, 4.0], pbc=True))
    return frames


def gpaw_section(folder: Path, plan: dict | None = None, walltime_s: float = 120.0) -> dict:
    """A `label.gpaw` section for tiny H2 frames (PW 250 eV, moment fixed at 2), launched through
    the INJECT wrapper (plan and log in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inject.py").write_text(INJECT)
    (folder / "plan.json").write_text(json.dumps(plan or {}))
    return {"command": ["{python}", str(folder / "inject.py"), str(folder / "plan.json"),
                        str(folder / "runs.log"), "{script}"],
            "walltime_s": walltime_s, "kill_grace_s": 1.0, "mode": "pw", "ecut_ev": 250.0,
            "fixed_magmom": 2.0, "magmoms": {"H": 1.0}, "energy_tol_ev": 1e-3,
            "density_tol": 1e-3, "ngyromag": {"H": PROTON_GAMMA_MHZ_PER_T}}


def read_runs(folder: Path) -> list[list[str]]:
    """The INJECT wrapper's log as split lines."""
    path = folder / "runs.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def completed_runs(folder: Path) -> dict[str, int]:
    """Per frame key: how many GPAW runs ended with a result."""
    counts: dict[str, int] = {}
    for fields in read_runs(folder):
        if fields[0] == "end" and fields[3] == "ok":
            counts[fields[1]] = counts.get(fields[1], 0) + 1
    return counts


def _labeller(tmp_path: Path, plan: dict | None = None, **changes) -> GpawLabeller:
    section = {**gpaw_section(tmp_path, plan), **changes}
    return make_labeller(LabelSpec(labeller="gpaw", gpaw=section), 100.0, cores=1, rank=0)


def _h_atom() -> Atoms:
    return Atoms("H", positions=[[3.0, 3.0, 3.0]], cell=[6.0, 6.0, 6.0], pbc=True)


# ---- the convention ---------------------------------------------------------------------------
def test_conversion_of_an_analytic_h_atom_gives_the_21_cm_line():
    """GPAW's isotropic a = (2/3) pi alpha^2 g_e (m_e/m_p) rho_s(0) Ha per unit g; for the exact
    1s density rho_s(0) = 1/pi bohr^-3 and the proton's g that is the 1420.4 MHz line."""
    a_ev_per_g = (2 / 3) * np.pi * HYDROGEN_ALPHA**2 * ELECTRON_G * ELECTRON_PROTON_MASS_RATIO \
        * (1 / np.pi) * HARTREE_EV
    assert nuclear_g_factor(PROTON_GAMMA_MHZ_PER_T) == pytest.approx(5.5856947, rel=1e-6)
    a_mhz = vasp_fermi_contact_mhz([a_ev_per_g], 1.0, PROTON_GAMMA_MHZ_PER_T)
    assert a_mhz[0] == pytest.approx(H_HYPERFINE_MHZ, rel=2e-3)  # no QED/reduced-mass terms


def test_conversion_is_per_unit_of_total_moment_and_scales_with_ngyromag():
    raw = np.array([1e-6, -2e-6, 0.0])
    base = vasp_fermi_contact_mhz(raw, 1.0, 100.0)
    np.testing.assert_allclose(vasp_fermi_contact_mhz(raw, 48.0, 100.0), base / 48)
    np.testing.assert_allclose(vasp_fermi_contact_mhz(raw, 2.0, [100.0, 50.0, 10.0]),
                               base * [0.5, 0.25, 0.0])
    expected = 1e-6 * nuclear_g_factor(100.0) * MHZ_PER_EV
    assert base[0] == pytest.approx(expected) and MHZ_PER_EV == pytest.approx(2.417989e8)
    with pytest.raises(ValueError, match="non-zero moment"):
        vasp_fermi_contact_mhz(raw, 0.0, 100.0)


# ---- input --------------------------------------------------------------------------------
def test_calculator_keywords_moments_and_command(tmp_path):
    spec = LabelSpec(labeller="gpaw", gpaw={
        "mode": "lcao", "basis": "szp", "h_a": 0.25, "setups": {"Mn": "7"},
        "fixed_magmom": 4.0, "magmoms": {"Mn": 3.0}, "kpts": [2, 2, 1], "xc": "PBE",
        "gpaw": {"nbands": "120%"}, "env": {"OMP_NUM_THREADS": "2"}})
    labeller = make_labeller(spec, 100.0, cores=4, rank=3)
    assert labeller.profile.command == ("mpirun", "-np", "4", sys.executable, "run_gpaw.py")
    assert labeller.profile.env["OMP_NUM_THREADS"] == "2"
    assert labeller.profile.env["GPAW_MPI_BACKEND"] == "cgpaw"
    parameters = labeller.template.calculator_parameters()
    assert parameters["mode"] == {"name": "lcao"} and parameters["basis"] == "szp"
    assert parameters["occupations"] == {"name": "fermi-dirac", "width": 0.05,
                                         "fixmagmom": True}
    assert parameters["kpts"] == {"size": [2, 2, 1], "gamma": True}
    assert parameters["h"] == 0.25 and parameters["nbands"] == "120%"
    assert parameters["setups"] == {"Mn": "7"} and parameters["spinpol"] is True
    atoms = Atoms("MnOMn", positions=[[0, 0, 0], [1, 0, 0], [2, 0, 0]], cell=[4, 4, 4])
    # GPAW fixes N_up - N_down to the sum of the initial moments: scaled to the fixed total
    assert labeller.template.initial_magmoms(atoms) == pytest.approx([2.0, 0.0, 2.0])
    labeller.template.write_input(tmp_path, atoms, "t")
    document = json.loads((tmp_path / "gpaw-input.json").read_text())
    assert document["magmoms"] == pytest.approx([2.0, 0.0, 2.0])
    assert (tmp_path / "run_gpaw.py").read_text().startswith('"""dynshift')
    assert expand_command(["{python}", "{script}", "-r{rank}"], 1, 5, python="/p") == (
        "/p", "run_gpaw.py", "-r5")
    pw = make_labeller(LabelSpec(labeller="gpaw"), 100.0).template.calculator_parameters()
    assert pw["mode"] == {"name": "pw", "ecut": 400.0} and "basis" not in pw
    assert "fixmagmom" not in pw["occupations"]


def test_gpaw_section_errors_name_the_field():
    base = "stages: [label]\nsystems: [{name: a, structure: 'builtin:p2-nmmo-p63mcm'}]\n"
    with pytest.raises(ManifestError) as error:
        parse_manifest(base + "label: {labeller: gpaw, gpaw: {mode: fd, cutoff: 300}}")
    text = " ".join(error.value.errors)
    assert "label.gpaw.mode" in text and "label.gpaw.cutoff: unknown key" in text
    with pytest.raises(ManifestError) as error:  # checks across fields, once the fields parse
        parse_manifest(base + "label: {labeller: gpaw, gpaw: {command: [python, x.py], "
                              "kpts: [0, 1, 1]}}")
    text = " ".join(error.value.errors)
    assert "label.gpaw.command" in text and "{script}" in text
    assert "label.gpaw.kpts" in text
    manifest = parse_manifest(base + "label: {labeller: gpaw, gpaw: {mode: lcao}}")
    assert manifest.label.gpaw.mode == "lcao"


def test_example_manifest_is_valid():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "engine.cli", "validate",
                             str(root / "run" / "label-gpaw-p2-nmmo.yaml")],
                            capture_output=True, text=True, cwd=root, env=launch_env())
    assert result.returncode == 0, result.stdout + result.stderr


# ---- real GPAW ------------------------------------------------------------------------------
@needs_gpaw
def test_free_h_atom_on_two_processes_gives_1420_mhz_within_10_percent(tmp_path):
    """The issue's sanity check, with GPAW itself parallel (mpirun -np 2 python run_gpaw.py)."""
    template = GpawTemplate(mode="pw", ecut_ev=300.0, fixed_magmom=1.0, magmoms={"H": 1.0},
                            energy_tol_ev=1e-4, ngyromag={"H": PROTON_GAMMA_MHZ_PER_T})
    command = expand_command(["mpirun", "-np", "2", "{python}", "{script}"], 2, 0)
    labeller = GpawLabeller(template, GpawProfile(command, 120.0, env={
        "GPAW_MPI_BACKEND": "cgpaw", "OMP_NUM_THREADS": "1"}))
    labelled = labeller.label(_h_atom(), tmp_path / "w", "h atom")
    a_mhz = labelled.arrays["fermi_contact_mhz"][0]
    assert a_mhz == pytest.approx(H_HYPERFINE_MHZ, rel=0.10)
    assert labelled.info["magnetic_moment_s"] == pytest.approx(1.0, abs=1e-6)
    result = json.loads((tmp_path / "w" / RESULT_FILE).read_text())
    assert result["processes"] == 2 and result["core_excluded"] is True


@needs_gpaw
def test_triplet_pair_gives_half_the_atom_per_unit_total_spin(tmp_path):
    """Two far-apart H atoms with a fixed moment of 2: each carries one atom's spin density,
    and per unit of the cell's spin the coupling is half the free atom's (a spin normalisation
    off by 2 would show here)."""
    labeller = _labeller(tmp_path, ngyromag={"H": PROTON_GAMMA_MHZ_PER_T}, ecut_ev=300.0,
                         energy_tol_ev=1e-4, density_tol=1e-4)
    labeller_free = _labeller(tmp_path, ngyromag={"H": PROTON_GAMMA_MHZ_PER_T}, ecut_ev=300.0,
                              energy_tol_ev=1e-4, density_tol=1e-4, fixed_magmom=1.0)
    atom = labeller_free.label(Atoms("H", positions=[[4.5, 3, 3]], cell=[9, 6, 6], pbc=True),
                               tmp_path / "atom", "atom")
    pair = labeller.label(Atoms("H2", positions=[[2.5, 3, 3], [6.5, 3, 3]], cell=[9, 6, 6],
                                pbc=True), tmp_path / "pair", "pair")
    assert pair.info["magnetic_moment_s"] == pytest.approx(2.0, abs=1e-6)
    np.testing.assert_allclose(pair.arrays["fermi_contact_mhz"],
                               atom.arrays["fermi_contact_mhz"][0] / 2, rtol=0.03)
    forces = pair.get_forces()
    assert forces.shape == (2, 3) and np.isfinite(pair.get_potential_energy())
    np.testing.assert_allclose(forces[0], -forces[1], atol=1e-3)  # Newton's third law


@needs_gpaw
def test_unconverged_timeout_exit_and_wrong_frame_are_label_errors(tmp_path):
    frame = pair_frames(1)[0]
    with pytest.raises(LabelError) as error:
        _labeller(tmp_path, maxiter=2).label(frame, tmp_path / "a", "a")
    assert error.value.reason == "unconverged"
    with pytest.raises(LabelError) as error:
        _labeller(tmp_path / "t", {"s/t": ["hang"]}, walltime_s=3.0).label(
            frame, tmp_path / "s" / "t", "t")
    assert error.value.reason == "timeout"
    with pytest.raises(LabelError) as error:
        _labeller(tmp_path / "e", {"s/e": ["exit"]}).label(frame, tmp_path / "s" / "e", "e")
    assert error.value.reason == "exit_3"
    labeller = _labeller(tmp_path)
    labelled = labeller.label(frame, tmp_path / "ok", "ok")
    assert labeller.recover(frame, tmp_path / "ok").get_potential_energy() == pytest.approx(
        labelled.get_potential_energy())
    moved = frame.copy()
    moved.positions[1, 0] += 0.05
    assert labeller.recover(moved, tmp_path / "ok") is None
    with pytest.raises(LabelError) as error:
        labeller.template.read_results(tmp_path / "ok", moved)
    assert error.value.reason == "wrong_frame"
    with pytest.raises(LabelError) as error:
        labeller.template.read_results(tmp_path / "none", frame)
    assert error.value.reason == "no_result"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@needs_gpaw
def test_two_ranks_6_frames_one_failure_kill_9_and_rerun(tmp_path, dynshift_bin):
    """The issue's check with real GPAW: `mpirun -n 2 dynshift run` labels 6 tiny frames, one
    of which fails its first attempt and is retried; the run is killed with SIGKILL after two
    labels and rerun: 6 labels, none computed twice, the failed one retried."""
    plan = {"h2/r000-f000001": ["exit"]}
    document = {"stages": ["label"], "store": "run.h5",
                "systems": [{"name": "h2", "structure": "builtin:p2-nmmo-p63mcm"}],
                "label": {"selection": "every", "every_k": 1, "max_attempts": 2,
                          "failure_budget": 0.0, "work_dir": str(tmp_path / "work"),
                          "labeller": "gpaw", "gpaw": gpaw_section(tmp_path, plan)}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(document))
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "h2", [pair_frames(6)])
    command = ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"]

    run = subprocess.Popen(command, cwd=tmp_path, env=launch_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def in_flight() -> set[str]:  # frames whose GPAW run has started and not ended
        runs = read_runs(tmp_path)
        started = [f[1] for f in runs if f[0] == "start"]
        ended = [f[1] for f in runs if f[0] == "end"]
        return {key for key in started if started.count(key) > ended.count(key)}

    deadline = time.monotonic() + 240
    while not (sum(f[0] == "end" and f[3] == "ok" for f in read_runs(tmp_path)) >= 2
               and in_flight()) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.02)
    running = in_flight()
    for pid in session_pids(run.pid):  # kill -9 mpirun and both ranks at once
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert (f["label/h2/status"][:] == 0).sum() > 0
    # GPAW jobs outlive their killed rank (as under a batch system): let them end
    started = {int(f[3]) for f in read_runs(tmp_path) if f[0] == "start"}
    deadline = time.monotonic() + 120
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)

    rerun = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    recovered = re.search(r"(\d+) recovered from work dirs", rerun.stdout + rerun.stderr)
    if running - {"h2/r000-f000001"}:  # a run the kill left going ended with a result: read
        assert recovered and int(recovered.group(1)) >= 1, rerun.stdout + rerun.stderr
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/label"].attrs["status"] == "complete"
        assert f["label/h2/status"][:].tolist() == [1] * 6
        a_iso = f["label/h2/a_iso_mhz"][:]
        energy = f["label/h2/energy_ev"][:]
        np.testing.assert_allclose(f["label/h2/magnetic_moment_s"][:], 2.0, atol=1e-6)
        shifts = f["label/h2/shift_ppm"][:]
    assert np.isfinite(a_iso).all() and (a_iso > 0).all()
    assert np.isnan(shifts).all()  # no Na (the target species) in these frames
    assert len(set(np.round(energy, 6))) == 6  # each frame its own calculation
    done = completed_runs(tmp_path)
    assert sorted(done) == [f"h2/r000-f{i:06d}" for i in range(6)]
    assert set(done.values()) == {1}  # none computed twice
    failed = [f for f in read_runs(tmp_path) if f[1] == "h2/r000-f000001" and f[0] == "end"]
    assert [f[3] for f in failed] == ["exit", "ok"]  # failed, retried, labelled


def test_another_spin_state_fails_the_attempt_and_the_retry_starts_elsewhere(tmp_path):
    """A run ending 2 mu_B off the requested moment is `wrong_spin_state`; the next input of
    that frame starts from other moments with the same total."""
    frame = pair_frames(1)[0]
    labeller = _labeller(tmp_path)                    # fixed total 2, H starting at 1 each
    template = labeller.template
    work = tmp_path / "w"
    result = {"numbers": frame.numbers.tolist(), "positions_a": frame.positions.tolist(),
              "converged": True, "energy_ev": -1.0, "forces_ev_a": [[0.0] * 3] * 2,
              "a_iso_ev_per_g": [1e-3, 1e-3]}
    work.mkdir()
    for moment, broken in ((2.0001, False), (0.0, True), (2.6, True)):
        (work / RESULT_FILE).write_text(json.dumps({**result, "magnetic_moment": moment}))
        if broken:
            with pytest.raises(LabelError, match="requested 2 .* another spin state") as error:
                template.read_results(work, frame)
            assert error.value.reason == "wrong_spin_state"
        else:
            assert template.read_results(work, frame).info["magnetic_moment_s"] == moment
    template.write_input(work, frame, "t")
    first = json.loads((work / "gpaw-input.json").read_text())["magmoms"]
    assert first == [1.0, 1.0]
    (work / "attempt-1-wrong_spin_state").mkdir()      # what the label loop keeps of a failure
    template.write_input(work, frame, "t")
    second = json.loads((work / "gpaw-input.json").read_text())["magmoms"]
    assert second != first and sum(second) == pytest.approx(2.0)
    free = _labeller(tmp_path / "free", fixed_magmom=None).template
    assert free.requested_moment(frame) == 2.0            # the sum of the initial moments
    assert _labeller(tmp_path / "none", fixed_magmom=None, magmoms={}).template \
        .requested_moment(frame) is None


def test_a_calibration_maps_the_couplings_of_its_species_only(tmp_path):
    """label.gpaw.calibration: (A - intercept) / slope for the listed species (here H), the
    raw result untouched; a slope <= 0 is refused naming the field."""
    from schemas.label import GpawSpec

    frame = pair_frames(1)[0]
    work = tmp_path / "w"
    work.mkdir()
    (work / RESULT_FILE).write_text(json.dumps({
        "numbers": frame.numbers.tolist(), "positions_a": frame.positions.tolist(),
        "converged": True, "energy_ev": -1.0, "forces_ev_a": [[0.0] * 3] * 2,
        "a_iso_ev_per_g": [1e-3, 2e-3], "magnetic_moment": 2.0}))
    raw = _labeller(tmp_path).template.read_results(work, frame).arrays["fermi_contact_mhz"]
    mapped = _labeller(tmp_path / "c", calibration={"H": [2.0, 1.0]}).template.read_results(
        work, frame).arrays["fermi_contact_mhz"]
    np.testing.assert_allclose(mapped, (raw - 1.0) / 2.0)
    assert _labeller(tmp_path / "o", calibration={"Na": [2.0, 1.0]}).template.read_results(
        work, frame).arrays["fermi_contact_mhz"].tolist() == raw.tolist()
    with pytest.raises(ValueError, match=r"calibration.Na: \[slope, intercept_mhz\]"):
        GpawSpec(calibration={"Na": [0.0, 1.0]})
