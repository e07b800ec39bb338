"""`dynshift run --dry-run`: the plan, without work and without touching the store."""
from __future__ import annotations

from pathlib import Path

import h5py

from engine.cli import main
from engine.plan import _block_sizes, _md_bytes, _round_robin_sizes, count_file_frames, \
    soap_features

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "run" / "default.yaml"


def test_the_plan_of_the_demo_on_three_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "plan.h5"
    assert main(["run", str(DEMO), "--dry-run", "--ranks", "3", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert not store.exists()  # a dry run creates no store
    assert not (tmp_path / "dynshift-demo.h5").exists()
    assert f"store: {store} (new: the run creates it)" in out
    assert "ranks: 3" in out
    for stage in ("probe", "md", "infer", "analyze", "report"):
        assert f"  {stage:<10} run" in out
    assert "p63mcm: builtin:p2-nmmo-p63mcm, supercell 1x1x1, 88 atoms, species Na, Mg, Mn, O; " \
           "target Na x 16" in out
    # 2 systems x 2 replicas dealt round robin over 3 ranks
    assert "4 trajectories, round robin: 2 on rank 0, 1 on ranks 1-2" in out
    # 400 frames x 2 replicas = 800 frames per system, 7 chunks of 128 in contiguous blocks
    assert "p63mcm: 800 frames = 7 chunks of 128 (chunks per rank: 2 on rank 0, 3 on rank 1, " \
           "2 on rank 2)" in out
    # md: 4 replicas x (400 frames x (88 x 3 + 9 + 3) x 8 B + resume state)
    assert "[store: ~3.54 MB]" in out


def test_a_complete_stage_is_skipped_and_the_store_left_as_it_was(tmp_path, capsys):
    store = tmp_path / "run.h5"
    with h5py.File(store, "w") as handle:
        handle.create_group("stages/probe").attrs["status"] = "complete"
        handle.create_group("stages/md").attrs["status"] = "running"
    before = store.read_bytes(), store.stat().st_mtime_ns
    assert main(["run", str(DEMO), "--dry-run", "--ranks", "2", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "  probe      skip (complete in the store)" in out
    assert "  md         run (resumes: the store records it running)" in out
    assert "complete stages: probe" in out
    assert (store.read_bytes(), store.stat().st_mtime_ns) == before
    assert main(["run", str(DEMO), "--dry-run", "--ranks", "2", "--store", str(store),
                 "--redo", "probe"]) == 0
    assert "  probe      run (--redo; complete in the store)" in capsys.readouterr().out


def test_a_damaged_store_is_named_and_not_touched(tmp_path, capsys):
    store = tmp_path / "broken.h5"
    store.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    before = store.read_bytes()
    assert main(["run", str(DEMO), "--dry-run", "--ranks", "1", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"store: {store} cannot be opened" in out and "not touched" in out
    assert store.read_bytes() == before


def test_a_bad_manifest_is_refused_before_any_plan(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [md]\n")
    assert main(["run", str(bad), "--dry-run", "--ranks", "2"]) == 2
    captured = capsys.readouterr()
    assert "systems: stages md need" in captured.err and "plan" not in captured.out
    assert main(["run", str(DEMO), "--dry-run", "--ranks", "2", "--redo", "train"]) == 2
    assert "--redo: train is not a stage" in capsys.readouterr().err
    assert main(["run", str(DEMO), "--ranks", "0", "--dry-run"]) == 2


def test_without_ranks_the_plan_takes_the_launch_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(DEMO), "--dry-run"]) == 0  # a singleton launch: one rank
    out = capsys.readouterr().out
    assert "ranks: 1" in out and "round robin: 4 on rank 0" in out


def test_train_label_and_file_sources_are_planned(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frames = tmp_path / "frames.extxyz"
    import ase.io
    from jobs.structures import p2_cell

    ase.io.write(frames, [p2_cell() for _ in range(5)], format="extxyz")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "stages: [infer]\nsystems: [{name: a, structure: frames.extxyz}]\n"
        "infer: {trajectories: {a: frames.extxyz}, chunk_frames: 2}\n")
    assert main(["run", str(manifest), "--dry-run", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "a: 5 frames = 3 chunks of 2 (chunks per rank: 2 on rank 0, 1 on rank 1)" in out
    # 5 frames x (16 Na x (f4 shift + f4 sigma + 3 f8 positions) + cell, time, replica, drift)
    assert f"~{(5 * (16 * 32 + 72 + 8 + 4 + 24) + 3) / 1e3:.3g} kB" in out


def test_the_split_rules_match_the_rank_context():
    from engine.context import RankContext

    class Fake(RankContext):
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

    for n, size in ((7, 3), (4, 3), (2, 5), (0, 2)):
        assert _block_sizes(n, size) == [len(Fake(r, size).block(n)) for r in range(size)]
        assert _round_robin_sizes(n, size) == [len(Fake(r, size).round_robin(n))
                                               for r in range(size)]
    assert soap_features(4, 9, 9) == 6660  # the NN-NMR input of the P2-NMMO model
    assert _md_bytes(88, 400) == 400 * 276 * 8 + 88 * 24 + 520


def test_xyz_frames_are_counted(tmp_path):
    path = tmp_path / "x.xyz"
    path.write_text("2\n\nH 0 0 0\nH 0 0 1\n2\nnext\nH 0 0 0\nH 0 0 1\n")
    assert count_file_frames(path) == 2
    assert count_file_frames(tmp_path / "x.traj") is None
