"""The md stage on one rank (exact resume) and under `mpirun -n 2 dynshift run` (kill -9)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from launch import launch_env, run_command
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.stages.md import StoppedOnPurpose, run_replicas
from schemas.md import MdSpec
from schemas.system import SystemSpec

SYSTEMS = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm")]
KEYS = ("positions_a", "cell_a", "time_fs", "temperature_k", "potential_energy_ev")


def _run(path: Path, spec: MdSpec):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(path, ctx) as store:
        return run_replicas(spec, SYSTEMS, ctx, store, seed=7)


def _read(path: Path, group: str = "/md/mcm/r000") -> dict:
    """The replica's datasets and its saved-frame count as later stages read it."""
    from jobs.layouts.md import md_trajectories

    with h5py.File(path, "r") as f:
        out = {k: f[f"{group}/{k}"][()] for k in KEYS}
    with RunStore(path, None, mode="r") as store:
        out["n_saved"] = md_trajectories(store, "mcm").replica(int(group[-3:])).n_saved
    return out


@pytest.mark.parametrize("thermostat", ["langevin", "nose-hoover-chain"])
def test_a_stopped_replica_continues_exactly(tmp_path, thermostat):
    spec = dict(replicas=1, equilibration_steps=5, frames=6, save_every_steps=2,
                chunk_frames=2, thermostat=thermostat)
    _run(tmp_path / "whole.h5", MdSpec(**spec))
    with pytest.raises(StoppedOnPurpose):
        _run(tmp_path / "split.h5", MdSpec(**spec, stop_after_frames=3))
    stopped = _read(tmp_path / "split.h5")
    assert stopped["n_saved"] == 4 and np.isnan(stopped["time_fs"][4:]).all()
    _run(tmp_path / "split.h5", MdSpec(**spec))
    whole, split = _read(tmp_path / "whole.h5"), _read(tmp_path / "split.h5")
    assert split["n_saved"] == whole["n_saved"] == 6
    assert np.allclose(whole["time_fs"], 2.0 * np.arange(1, 7))
    for key in KEYS:  # bit for bit: the resumed replica never noticed the stop
        assert np.array_equal(whole[key], split[key]), key
    # the trajectory moved, and positions are not wrapped back into the cell
    assert np.abs(np.diff(whole["positions_a"], axis=0)).max() > 1e-3


def test_replicas_differ_and_seeds_reproduce(tmp_path):
    spec = MdSpec(replicas=2, equilibration_steps=0, frames=2, save_every_steps=2)
    _run(tmp_path / "a.h5", spec)
    _run(tmp_path / "b.h5", spec)
    a0, a1 = _read(tmp_path / "a.h5", "/md/mcm/r000"), _read(tmp_path / "a.h5", "/md/mcm/r001")
    b0 = _read(tmp_path / "b.h5", "/md/mcm/r000")
    assert np.array_equal(a0["positions_a"], b0["positions_a"])
    assert not np.allclose(a0["positions_a"], a1["positions_a"])
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["/md/mcm/numbers"][:16].tolist() == [11] * 16
        assert f["/md/mcm/r001"].attrs["save_interval_fs"] == 2.0


MANIFEST = """\
stages: [potential, md]
store: run.h5
seed: 11
systems:
  - {name: mcm, structure: "builtin:p2-nmmo-p63mcm"}
  - {name: p6322, structure: "builtin:p2-nmmo-p6322"}
md: {replicas: 2, equilibration_steps: 10, frames: 40, save_every_steps: 5, chunk_frames: 5}
"""


def test_kill_9_mid_md_then_resume(tmp_path, dynshift_bin):
    (tmp_path / "m.yaml").write_text(MANIFEST)
    command = ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             env=launch_env(), start_new_session=True)
    deadline = time.monotonic() + 120
    while "trajectories over 2 ranks" not in (tmp_path / "first.log").read_text():
        assert first.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "first.log").read_text()
        time.sleep(0.2)
    time.sleep(1.5)  # a chunk or two in (the whole md stage takes several seconds)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/md"].attrs["status"] == "running"  # killed mid-md
    second = run_command(command, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "frames already in the store" in second.stdout
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/md"].attrs["status"] == "complete"
        for system in ("mcm", "p6322"):
            for replica in ("r000", "r001"):
                group = f[f"md/{system}/{replica}"]
                times = group["time_fs"][:]
                assert group.attrs["n_saved"] == 40 and times.shape == (40,)
                assert np.allclose(np.diff(times), 5.0) and times[0] == 5.0
                assert np.isfinite(group["positions_a"][:]).all()
                assert group["positions_a"].shape == (40, 88, 3)


def test_wrapping_calculator_equals_deepmd_on_unwrapped_positions():
    from deepmd.calculator import DP

    from jobs.deepmd import dp_calculator
    from jobs.structures import p2_cell
    from schemas.potential import SHIPPED_MODEL

    atoms = p2_cell("nmmo", "p6322")
    atoms.rattle(0.05, seed=1)
    atoms.positions[:5] += 2 * atoms.cell.array[0] - atoms.cell.array[2]  # outside the cell
    other = atoms.copy()
    atoms.calc, other.calc = DP(model=str(SHIPPED_MODEL)), dp_calculator(SHIPPED_MODEL)
    assert abs(atoms.get_potential_energy() - other.get_potential_energy()) < 1e-8
    assert np.allclose(atoms.get_forces(), other.get_forces(), atol=1e-8)
    assert np.allclose(atoms.get_stress(), other.get_stress(), atol=1e-8)
    assert np.abs(atoms.get_forces()).max() > 0.1


def test_deepmd_leaves_tensorflow_eager_for_later_stages():
    """md then train/infer in one process: deepmd's import must not switch off TF2 behaviour."""
    import tensorflow as tf

    from jobs.deepmd import dp_calculator
    from jobs.structures import p2_cell
    from schemas.potential import SHIPPED_MODEL

    atoms = p2_cell("nmmo", "p63mcm")
    atoms.calc = dp_calculator(SHIPPED_MODEL)
    assert np.isfinite(atoms.get_potential_energy())
    assert tf.executing_eagerly()
    assert float(tf.reduce_sum(tf.constant([1.0, 2.0])).numpy()) == 3.0


# ---- bad structures and exploding replicas ---------------------------------------------------
CHUNKED = dict(replicas=1, equilibration_steps=0, frames=6, save_every_steps=2, chunk_frames=2)


def _spoil_at(monkeypatch, frame: int, spoil) -> None:
    """Make `spoil(atoms)` happen to every replica right after the steps of saved `frame`."""
    from jobs.dynamics import Trajectory

    original = Trajectory.run

    def run(self, steps):
        original(self, steps)
        if steps and self.dynamics.nsteps == (frame + 1) * CHUNKED["save_every_steps"]:
            spoil(self.atoms)

    monkeypatch.setattr(Trajectory, "run", run)


def _pull_together(atoms, distance_a: float = 0.1) -> None:
    positions = atoms.get_positions()
    direction = positions[40] - positions[3]
    positions[40] = positions[3] + distance_a * direction / np.linalg.norm(direction)
    atoms.set_positions(positions, apply_constraint=False)


def test_an_exploding_replica_stops_keeping_its_saved_chunks(tmp_path, monkeypatch):
    from jobs.frame_checks import UnstableDynamics

    _spoil_at(monkeypatch, 3, _pull_together)  # frame 3: the second frame of the second chunk
    with pytest.raises(UnstableDynamics, match=(
            r"^md: system 'mcm', replica /md/mcm/r000 exploded at frame 3 \(t = 8 fs after "
            r"equilibration\): atoms 3 \(Na\) and 40 \(O\) are 0\.10 A apart \(< "
            r"checks\.min_distance_a = 0\.5 A\)\. Its 2 frames saved before \(0\.\.1\) are kept "
            r"in the store")):
        _run(tmp_path / "split.h5", MdSpec(**CHUNKED))
    kept = _read(tmp_path / "split.h5")
    assert kept["n_saved"] == 2 and np.isnan(kept["time_fs"][2:]).all()
    assert np.isfinite(kept["positions_a"][:2]).all()
    # the kept frames resume: without the fault the run ends as one never stopped
    monkeypatch.undo()
    _run(tmp_path / "split.h5", MdSpec(**CHUNKED))
    _run(tmp_path / "whole.h5", MdSpec(**CHUNKED))
    whole, split = _read(tmp_path / "whole.h5"), _read(tmp_path / "split.h5")
    assert split["n_saved"] == 6
    for key in KEYS:
        assert np.array_equal(whole[key], split[key]), key


def test_a_replica_far_above_its_temperature_stops(tmp_path, monkeypatch):
    from jobs.frame_checks import UnstableDynamics
    from schemas.checks import ChecksSpec

    _spoil_at(monkeypatch, 1, lambda atoms: atoms.set_momenta(10.0 * atoms.get_momenta(),
                                                              apply_constraint=False))
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "hot.h5", ctx) as store, pytest.raises(UnstableDynamics, match=(
            r"exploded at frame 1 \(t = 4 fs after equilibration\): temperature [1-9]\.\d+e\+04 K "
            r"> checks\.md_max_temperature_factor x md\.temperature_k = 50 x 300 K\. It had saved no "
            r"frame yet")):
        run_replicas(MdSpec(**CHUNKED), SYSTEMS, ctx, store, seed=7,
                     checks=ChecksSpec(md_max_temperature_factor=50.0))


def test_a_real_explosion_is_caught_by_the_checks(tmp_path):
    # a 20 fs step with the shipped DP model blows the 88-atom cell up within the first frames
    from jobs.frame_checks import UnstableDynamics

    with pytest.raises(UnstableDynamics, match=r"replica /md/mcm/r000 exploded at frame \d+ "):
        _run(tmp_path / "boom.h5", MdSpec(replicas=1, equilibration_steps=0, frames=10,
                                          save_every_steps=5, chunk_frames=5, timestep_fs=20.0))


@pytest.mark.parametrize("fault", ["li", "close"])
def test_a_bad_structure_is_refused_before_the_first_step(tmp_path, fault):
    import ase.io

    from engine.failure import InputError
    from jobs.structures import p2_cell

    atoms = p2_cell()
    if fault == "li":
        atoms.numbers[0] = 3
        expected = (r"^md: system 'bad', replica /md/bad/r000: species \['Li'\] unknown to the DP "
                    r"model \(it knows \[.*'Na'.*\]\)$")
    else:
        _pull_together(atoms, 0.3)
        expected = (r"^md: system 'bad', replica /md/bad/r000 \(starting structure\): frame 0: "
                    r"atoms 3 \(Na\) and 40 \(O\) are 0\.30 A apart")
    ase.io.write(tmp_path / "bad.extxyz", atoms, format="extxyz")
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        with pytest.raises(InputError, match=expected):
            run_replicas(MdSpec(**CHUNKED), [SystemSpec(name="bad", structure=str(
                tmp_path / "bad.extxyz"))], ctx, store, seed=7)
        assert int(store.read("/md/bad/r000/resume_saved")[0]) == 0


def test_dynshift_run_stops_an_exploding_md_with_exit_2(tmp_path, dynshift_bin):
    (tmp_path / "m.yaml").write_text(
        "stages: [md]\nstore: run.h5\n"
        "systems:\n  - {name: mcm, structure: \"builtin:p2-nmmo-p63mcm\"}\n"
        "md: {replicas: 2, equilibration_steps: 0, frames: 10, save_every_steps: 5, "
        "chunk_frames: 5, timestep_fs: 20.0}\n")
    done = run_command(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.search(r"dynshift: stage 'md' (on rank \d of 2 )?failed: input error: md: system "
                     r"'mcm', replica /md/mcm/r00\d exploded at frame \d+ \(t = \d+ fs after "
                     r"equilibration\): ", done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    with h5py.File(tmp_path / "run.h5", "r") as f:  # the store is intact and says where md is
        assert f["stages/md"].attrs["status"] == "running"
