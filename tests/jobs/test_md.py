"""The md stage on one rank (exact resume) and under `mpirun -n 2 dynshift run` (kill -9)."""
from __future__ import annotations

import os
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
from jobs.md import StoppedOnPurpose, run_replicas
from schemas.md import MdSpec
from schemas.system import SystemSpec

SYSTEMS = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm")]
KEYS = ("positions_a", "cell_a", "time_fs", "temperature_k", "potential_energy_ev")


def _run(path: Path, spec: MdSpec):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(path, ctx) as store:
        return run_replicas(spec, SYSTEMS, ctx, store, seed=7)


def _read(path: Path, group: str = "/md/mcm/r000") -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[f"{group}/{k}"][()] for k in KEYS}
        out["n_saved"] = f[group].attrs["n_saved"]
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

    from jobs.md import dp_calculator
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

    from jobs.md import dp_calculator
    from jobs.structures import p2_cell
    from schemas.potential import SHIPPED_MODEL

    atoms = p2_cell("nmmo", "p63mcm")
    atoms.calc = dp_calculator(SHIPPED_MODEL)
    assert np.isfinite(atoms.get_potential_energy())
    assert tf.executing_eagerly()
    assert float(tf.reduce_sum(tf.constant([1.0, 2.0])).numpy()) == 3.0
