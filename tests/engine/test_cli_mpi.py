"""`mpirun -n 2 dynshift run`: the whole run, error agreement and show, as a user runs them."""
from __future__ import annotations

import time
from pathlib import Path

import h5py
from launch import run_command as _run


def test_probe_run_on_two_ranks_records_both(tmp_path: Path, dynshift_bin):
    (tmp_path / "m.yaml").write_text("stages: [probe]\nstore: out/run.h5\n")
    proc = _run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "out" / "run.h5", "r") as f:
        assert f["probe/cores"][:].min() >= 1 and f["probe/cores"].shape == (2,)
        assert f.attrs["ranks"] == 2
        assert f["stages/probe"].attrs["status"] == "complete"
    shown = _run([*dynshift_bin, "show", str(tmp_path / "out" / "run.h5")])
    assert shown.returncode == 0 and "probe      complete" in shown.stdout
    assert "/probe/cores" in shown.stdout


def test_failure_on_rank_1_ends_every_rank_quickly(tmp_path: Path, dynshift_bin):
    # rank 0 waits in a barrier that rank 1 never reaches: without error agreement, a hang
    (tmp_path / "m.yaml").write_text(
        "stages: [probe]\nstore: run.h5\nprobe: {fail_on_rank: 1, others_wait_s: 0.5}\n")
    start = time.monotonic()
    proc = _run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert proc.stderr.count("dynshift: stage 'probe' on rank 1 of 2 failed") == 1


def test_bad_manifest_exits_2_before_any_work(tmp_path: Path, dynshift_bin):
    (tmp_path / "m.yaml").write_text("stages: [probe]\nstore: run.h5\nseed: -1\nprobe: {x: 1}\n")
    proc = _run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "seed: must be >= 0" in proc.stderr and "probe.x: unknown key" in proc.stderr
    assert proc.stderr.count("invalid manifest") == 1  # one message, not one per rank
    assert not (tmp_path / "run.h5").exists()


def test_show_and_report_of_a_missing_store_exit_2(tmp_path: Path, dynshift_bin):
    for command in ("show", "report"):
        proc = _run([*dynshift_bin, command, str(tmp_path / "none.h5")])
        assert proc.returncode == 2 and "no store at" in proc.stderr
        assert "Traceback" not in proc.stderr
