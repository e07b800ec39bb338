"""The run store on one rank: datasets, attributes, blobs, stage bookkeeping."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore


def test_store_round_trips_arrays_attrs_and_blobs(tmp_path):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        store.put("/a/b", np.arange(6.0).reshape(2, 3), unit="ppm")
        store.set_attrs("/a", settings={"r_cut_a": 5.5}, species=["Na", "O"], n=3)
        store.put_bytes("/blob", b"\x00model\xff")
        store.put_json("/doc", {"x": [1, 2]})
        store.create_dataset("/rows", (4, 2), dtype="f4", fill_value=np.nan)
        store.write_rows("/rows", 1, [[1, 2], [3, 4]])
        store.mark_stage("md", "complete", elapsed_s=1.5)
    with RunStore(tmp_path / "s.h5", ctx, "r") as store:
        assert store.read("/a/b")[1, 2] == 5.0
        assert store.attrs("/a/b")["unit"] == "ppm"
        assert store.attrs("/a") == {"settings": {"r_cut_a": 5.5}, "species": ["Na", "O"], "n": 3}
        assert store.get_bytes("/blob") == b"\x00model\xff"
        assert store.get_json("/doc") == {"x": [1, 2]}
        rows = store.read("/rows")
        assert np.isnan(rows[0]).all() and rows[2].tolist() == [3.0, 4.0]
        assert store.stage_status("md") == "complete" and store.stage_status("train") is None
        assert store.keys("/a") == ["b"] and store.keys("/nothing") == []


def test_block_shares_cover_every_item_once():
    ctx = RankContext(comm=None, rank=0, size=3, local_rank=0, local_size=3, cores=1)
    shares = []
    for rank in range(3):
        ctx.rank = rank
        shares.append(list(ctx.block(10)))
    assert sorted(sum(shares, [])) == list(range(10))
    assert [len(s) for s in shares] == [3, 4, 3]
    ctx.rank = 1
    assert list(ctx.round_robin(7)) == [1, 4]


# ---- a damaged store is named, never touched ---------------------------------------------------
import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from engine.store import StoreDamaged, check_store, store_damage  # noqa: E402


def _metadata_heavy_store(path):
    """A store whose middle is metadata (stage groups and their attributes), as after a run."""
    with RunStore(path) as store:
        for i in range(30):
            store.mark_stage(f"stage{i:02d}", "complete", elapsed_s=1.0,
                             summary={"mean_shift_ppm": 1682.0 + i})
        store.put("/infer/p63mcm/shift_ppm", np.linspace(0, 1, 64), unit="ppm")
        store.set_attrs("/", versions={"numpy": "0.0.1"}, layout="dynshift-store/1")
    return path


def _damaged(tmp_path, how: str):
    path = _metadata_heavy_store(tmp_path / "intact.h5")
    size = os.path.getsize(path)
    bad = tmp_path / f"{how}.h5"
    shutil.copy(path, bad)
    if how == "truncated":
        os.truncate(bad, size // 2)
    else:  # garbage over 256 bytes in the middle
        with open(bad, "r+b") as handle:
            handle.seek(size // 2 - 128)
            handle.write(np.random.default_rng(1).bytes(256))
    return bad


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_an_intact_or_missing_store_has_no_damage(tmp_path):
    assert store_damage(_metadata_heavy_store(tmp_path / "s.h5")) is None
    assert store_damage(tmp_path / "absent.h5") is None
    check_store(tmp_path / "s.h5")


@pytest.mark.parametrize("how,words", [
    ("truncated", "opening it: Unable to open file (truncated file: eof = "),
    ("garbage", "reading /stages/stage")])
def test_a_truncated_or_overwritten_store_is_named_damaged(tmp_path, how, words):
    bad = _damaged(tmp_path, how)
    before = _digest(bad)
    reason = store_damage(bad)
    assert reason is not None and reason.startswith(words), reason
    with pytest.raises(StoreDamaged) as damaged:
        check_store(bad)
    assert str(damaged.value) == f"store {bad} is damaged: {reason}; nothing was changed"
    assert _digest(bad) == before


def test_a_file_that_is_no_hdf5_is_damaged(tmp_path):
    (tmp_path / "m.h5").write_text("stages: [probe]\n")
    assert store_damage(tmp_path / "m.h5") == "it is not an HDF5 file"


def test_opening_for_append_never_creates_over_an_existing_file(tmp_path):
    bad = _damaged(tmp_path, "truncated")
    before = _digest(bad)
    with pytest.raises(OSError):
        RunStore(bad)  # "a": opened read-write (it fails), never created anew
    assert _digest(bad) == before


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_every_command_meets_a_damaged_store_with_exit_2_and_one_line(tmp_path, how,
                                                                    dynshift_bin):
    from launch import run_command

    bad = _damaged(tmp_path, how)
    before = _digest(bad)
    (tmp_path / "m.yaml").write_text("stages: [probe]\nstore: run.h5\n")
    commands = {"show": [*dynshift_bin, "show", str(bad)],
                "report": [*dynshift_bin, "report", str(bad), "--out", str(tmp_path / "rep")],
                "run": ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store", str(bad)]}
    for name, command in commands.items():
        proc = run_command(command, cwd=tmp_path, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("dynshift:")]
        assert proc.returncode == 2, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert len(lines) == 1, (name, proc.stderr)
        assert lines[0].startswith(f"dynshift: store {bad} is damaged: "), (name, lines)
        assert lines[0].endswith("; nothing was changed"), (name, lines)
        assert _digest(bad) == before, name
    assert not (tmp_path / "rep").exists()
    assert not (tmp_path / f"{how}.h5.lock").exists()  # the run released its lock


# ---- `dynshift show`: recorded versions vs installed --------------------------------------------
def test_show_marks_every_version_that_differs_from_the_installed_one(tmp_path, capsys):
    from engine.show import show_store, version_lines

    assert version_lines({"numpy": "2.1.0", "h5py": "3.16.0", "horovod": "0.28.1"},
                         {"numpy": "2.2.1", "h5py": "3.16.0"}) == [
        "h5py 3.16.0",
        "horovod 0.28.1 (not installed here: MISMATCH, numbers may differ)",
        "numpy 2.1.0 (installed 2.2.1: MISMATCH, numbers may differ)"]
    path = _metadata_heavy_store(tmp_path / "s.h5")
    with RunStore(path) as store:
        store.set_attrs("/", versions={"numpy": "0.0.1", "h5py": "3.16.0"})
    assert show_store(path, installed={"numpy": "2.4.6", "h5py": "3.16.0"}) == 0
    out = capsys.readouterr().out
    assert "(vs installed here: 1 mismatch)" in out
    assert "  numpy 0.0.1 (installed 2.4.6: MISMATCH, numbers may differ)\n" in out
    assert "  h5py 3.16.0\n" in out
    assert show_store(path, installed={"numpy": "0.0.1", "h5py": "3.16.0"}) == 0
    assert "MISMATCH" not in capsys.readouterr().out


def test_dynshift_show_compares_with_what_is_installed(tmp_path, dynshift_bin):
    from launch import run_command

    from engine.versions import package_versions

    numpy_here = package_versions()["numpy"]
    path = _metadata_heavy_store(tmp_path / "s.h5")
    proc = run_command([*dynshift_bin, "show", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert f"numpy 0.0.1 (installed {numpy_here}: MISMATCH, numbers may differ)" in proc.stdout
    assert "stage07    complete" in proc.stdout
