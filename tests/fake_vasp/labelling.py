"""Test helpers for the label stage: md trajectories in a store, POTCARs, the fake vasp's setup.

Import as ``from fake_vasp.labelling import ...`` (tests/ is on pytest's python path).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

FAKE_VASP = Path(__file__).resolve().parent / "vasp"
"""The fake vasp executable (a Python script, standard library only)."""
TEMPLATE_OUTCAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "p2-nmmo" \
    / "OUTCAR.p63mcm-2"
"""The real OUTCAR the fake rewrites for each frame."""
POTCAR_NAMES = {"Na": "Na_pv", "Mg": "Mg_pv", "Mn": "Mn_pv", "O": "O"}


def fake_module():
    """The fake vasp script as a module (for its `labels` function)."""
    loader = importlib.machinery.SourceFileLoader("fake_vasp_script", str(FAKE_VASP))
    spec = importlib.util.spec_from_loader("fake_vasp_script", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def expected_labels(positions_a: np.ndarray) -> dict:
    """What the fake writes for a frame with these (wrapped, POSCAR-order) positions:
    energy_ev, forces_ev_a, a_iso_mhz (the template's values plus the fake's offsets)."""
    from jobs.frames import read_outcar

    template = read_outcar(TEMPLATE_OUTCAR)
    d_energy, d_forces, d_a_tot = fake_module().labels(np.asarray(positions_a).tolist())
    return {"energy_ev": template.get_potential_energy() + d_energy,
            "forces_ev_a": template.get_forces() + np.asarray(d_forces),
            "a_iso_mhz": template.arrays["fermi_contact_mhz"] + np.asarray(d_a_tot)}


def shared_frames(shared_data: Path, n_frames: int, start: int = 0) -> list:
    """`n_frames` real P2-NMMO frames (P6_3/mcm) from the shared extended XYZ file."""
    import ase.io

    return ase.io.read(shared_data / "p63mcm-dev.extxyz", f"{start}:{start + n_frames}")


def write_md(store, system: str, replicas: list[list], seed: int = 7) -> None:
    """Fill /md/<system> as the md stage does (collective): numbers, and per replica rNNN
    positions_a (unwrapped: shifted by whole lattice vectors), cell_a, time_fs, n_saved."""
    rng = np.random.default_rng(seed)
    numbers = replicas[0][0].numbers
    store.put(f"/md/{system}/numbers", numbers.astype(np.int32))
    for number, frames in enumerate(replicas):
        group = f"/md/{system}/r{number:03d}"
        cells = np.array([np.asarray(a.cell) for a in frames])
        shifts = rng.integers(-2, 3, size=(len(frames), len(numbers), 3))
        positions = np.array([a.positions for a in frames]) + np.einsum(
            "fai,fij->faj", shifts, cells)
        store.put(f"{group}/positions_a", positions, unit="A")
        store.put(f"{group}/cell_a", cells, unit="A")
        store.put(f"{group}/time_fs", 100.0 * np.arange(len(frames)), unit="fs")
        store.set_attrs(group, n_saved=len(frames))
    store.flush()


def make_potcars(folder: Path) -> Path:
    """A POTCAR folder <folder>/<name>/POTCAR with a one-line stand-in per species."""
    for species, name in POTCAR_NAMES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "POTCAR").write_text(f"  PAW_PBE {name} (stand-in for {species})\n")
    return folder


def vasp_section(folder: Path, plan: dict | None = None, sleep_s: float = 0.02,
                 walltime_s: float = 20.0) -> dict:
    """The manifest's `label.vasp` section for the fake vasp, its plan and log in `folder`.

    `plan` maps a frame key (``<system>/r000-f000003``) to its behaviour per attempt.
    """
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(plan or {}))
    return {"command": [sys.executable, str(FAKE_VASP)], "walltime_s": walltime_s,
            "kill_grace_s": 1.0, "potcar_dir": str(make_potcars(folder / "potcars")),
            "potcar": POTCAR_NAMES, "nupdown": 48,
            "env": {"FAKE_VASP_PLAN": str(plan_file), "FAKE_VASP_LOG": str(folder / "vasp.log"),
                    "FAKE_VASP_SLEEP_S": str(sleep_s),
                    "FAKE_VASP_TEMPLATE": str(TEMPLATE_OUTCAR)}}


def read_log(folder: Path) -> list[list[str]]:
    """The fake's invocation log as split lines (empty when it never ran)."""
    path = folder / "vasp.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def completed_runs(folder: Path) -> dict[str, int]:
    """Per frame key: how many invocations ended with a result ("ok")."""
    counts: dict[str, int] = {}
    for fields in read_log(folder):
        if fields[0] == "end" and fields[3] == "ok":
            counts[fields[1]] = counts.get(fields[1], 0) + 1
    return counts
