"""The label stage: frame choice, retries, failure budget, resume, no double labelling."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from fake_vasp.labelling import (
    completed_runs,
    expected_labels,
    read_log,
    shared_frames,
    vasp_section,
    write_md,
)
from launch import launch_env, session_pids
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.labelling import select_frames
from jobs.layouts.label import labelled_frames
from jobs.shift import ppm_per_mhz
from jobs.stages.label import label_frames
from schemas import parse_manifest
from schemas.label import LabelSpec


def _manifest(tmp_path: Path, plan: dict | None = None, sleep_s: float = 0.0,
              walltime_s: float = 20.0, **label):
    section = {"work_dir": str(tmp_path / "work"),
               "vasp": vasp_section(tmp_path, plan, sleep_s=sleep_s, walltime_s=walltime_s),
               **label}
    document = {"stages": ["label"], "store": "run.h5",
                "systems": [{"name": "nmmo", "structure": "builtin:p2-nmmo-p63mcm"}],
                "label": section}
    return parse_manifest(yaml.safe_dump(document)), document


def _starts(tmp_path: Path) -> int:
    return sum(1 for fields in read_log(tmp_path) if fields[0] == "start")


@pytest.fixture
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


def test_frames_are_chosen_evenly_or_every_kth_after_the_skip():
    replicas = [(0, "r000", 10), (2, "r002", 5)]
    replica, frame = select_frames(LabelSpec(selection="every", every_k=3, skip_saved=1),
                                   replicas)
    assert list(zip(replica.tolist(), frame.tolist())) == [(0, 1), (0, 4), (0, 7), (2, 1),
                                                          (2, 4)]
    replica, frame = select_frames(LabelSpec(n_frames=4), replicas)  # 15 candidates
    assert list(zip(replica.tolist(), frame.tolist())) == [(0, 0), (0, 5), (0, 9), (2, 4)]
    replica, frame = select_frames(LabelSpec(n_frames=50, skip_saved=8), replicas)
    assert list(zip(replica.tolist(), frame.tolist())) == [(0, 8), (0, 9)]


def test_transient_failures_are_retried_persistent_ones_recorded(tmp_path, ctx, shared_data):
    frames = shared_frames(shared_data, 8)
    plan = {"nmmo/r000-f000001": ["exit"], "nmmo/r000-f000002": ["truncated", "garbled"],
            "nmmo/r001-f000003": ["unconverged"] * 3}
    manifest, _ = _manifest(tmp_path, plan, n_frames=8, failure_budget=0.125)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames[:4], frames[4:]])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (result.n_selected, result.n_done, result.n_failed) == (8, 7, 1)
        assert (result.n_labelled_now, result.n_failed_attempts) == (7, 6)
        group = "/label/nmmo"
        assert store.read(f"{group}/status").tolist() == [1, 1, 1, 1, 1, 1, 1, -1]
        assert store.read(f"{group}/attempts").tolist() == [1, 2, 3, 1, 1, 1, 1, 3]
        failures = store.attrs(group)["failures"]
        assert len(failures) == 1 and failures[0]["replica"] == 1 and failures[0]["frame"] == 3
        assert failures[0]["reason"].startswith("unconverged")
        work = Path(failures[0]["work_dir"])
        assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".claim")) == [
            "attempt-1-unconverged", "attempt-2-unconverged", "attempt-3-unconverged"]
        # positions: the md frame wrapped into the cell (md wrote them shifted by lattice vectors)
        positions = store.read(f"{group}/positions_a")
        cell = np.asarray(frames[5].cell)
        fractional = np.linalg.solve(cell.T, positions[5].T).T
        assert fractional.min() >= 0 and fractional.max() < 1
        delta = np.linalg.solve(cell.T, (positions[5] - frames[5].positions).T).T
        np.testing.assert_allclose(delta, np.round(delta), atol=1e-9)
        # the labels are the fake's for each frame's own positions; shift = eq. 1 on Na only
        a_iso = store.read(f"{group}/a_iso_mhz")
        for row in (0, 2, 6):
            expected = expected_labels(positions[row])
            np.testing.assert_allclose(a_iso[row], expected["a_iso_mhz"], atol=6e-4)
            assert store.read(f"{group}/energy_ev")[row] == pytest.approx(
                expected["energy_ev"], abs=1e-7)
        shifts = store.read(f"{group}/shift_ppm")
        np.testing.assert_allclose(shifts[:7, :16], a_iso[:7, :16] * ppm_per_mhz(manifest.shift))
        assert np.isnan(shifts[:, 16:]).all() and np.isnan(shifts[7]).all()
        assert store.read(f"{group}/magnetic_moment_s")[0] == pytest.approx(48.0000035)
        labelled = labelled_frames(store)
        assert len(labelled) == 7 and [a.info["frame"] for a in labelled[4:]] == [0, 1, 2]
        assert labelled[2].get_potential_energy() == pytest.approx(
            store.read(f"{group}/energy_ev")[2])
        np.testing.assert_allclose(labelled[2].arrays["fermi_contact_mhz"], a_iso[2])
        assert labelled[6].info["replica"] == 1 and labelled[6].info["time_fs"] == 200.0
    assert _starts(tmp_path) == 8 + 1 + 2 + 2

    # a rerun launches nothing; with more attempts allowed, only the failed frame is retried
    with RunStore(tmp_path / "run.h5", ctx) as store:
        again = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (again.n_done, again.n_failed, again.n_labelled_now) == (7, 1, 0)
        assert _starts(tmp_path) == 13
        more = manifest.label.model_copy(update={"max_attempts": 4})
        retried = label_frames(more, ctx, store, manifest.systems, manifest.shift)
        assert (retried.n_done, retried.n_failed, retried.n_labelled_now) == (8, 0, 1)
        assert store.read("/label/nmmo/attempts")[7] == 4
    assert _starts(tmp_path) == 14
    assert max(completed_runs(tmp_path).values()) == 1


def test_failures_beyond_the_budget_fail_the_stage_after_recording(tmp_path, ctx, shared_data):
    frames = shared_frames(shared_data, 4)
    plan = {"nmmo/r000-f000000": ["exit"] * 2, "nmmo/r000-f000002": ["garbled"] * 2}
    manifest, _ = _manifest(tmp_path, plan, n_frames=4, max_attempts=2, failure_budget=0.25)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames])
        with pytest.raises(RuntimeError, match=r"2 of 4 frames failed every attempt") as error:
            label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert "exit_3" in str(error.value) and "bad_outcar" in str(error.value)
        assert store.read("/label/nmmo/status").tolist() == [-1, 1, -1, 1]
        assert store.attrs("/label/nmmo")["n_failed"] == 2


def test_a_finished_job_found_in_its_work_dir_is_read_not_rerun(tmp_path, ctx, shared_data):
    frames = shared_frames(shared_data, 3)
    manifest, _ = _manifest(tmp_path, n_frames=3)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames])
        label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        energy = store.read("/label/nmmo/energy_ev")[1]
        # as if the rank had been killed after VASP ended but before it stored the result
        store.write_rows("/label/nmmo/status", 1, [0])
        store.write_rows("/label/nmmo/energy_ev", 1, [np.nan])
        store.write_rows("/label/nmmo/attempts", 1, [0])
        # and as if another frame's job had been killed half-way
        outcar = tmp_path / "work" / "nmmo" / "r000-f000002" / "OUTCAR"
        outcar.write_text(outcar.read_text()[:50000])
        store.write_rows("/label/nmmo/status", 2, [0])
        result = label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        assert (result.n_recovered, result.n_labelled_now, result.n_done) == (1, 1, 3)
        assert store.read("/label/nmmo/energy_ev")[1] == energy
        assert store.read("/label/nmmo/attempts")[1] == 1
    assert _starts(tmp_path) == 4  # 3 + the half-written one, relaunched
    assert (tmp_path / "work" / "nmmo" / "r000-f000002" / "interrupted" / "OUTCAR").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_two_ranks_20_frames_20_percent_failures_kill_9_and_rerun(tmp_path, shared_data,
                                                                  dynshift_bin):
    """The issue's check: 4 of 20 frames fail (2 transient, 2 persistent); the run is killed
    with SIGKILL mid-stage and rerun: 18 labels + 2 recorded failures, none computed twice."""
    frames = shared_frames(shared_data, 20)
    plan = {"nmmo/r000-f000002": ["exit"], "nmmo/r001-f000005": ["timeout"],
            "nmmo/r000-f000007": ["unconverged"] * 5, "nmmo/r001-f000001": ["garbled"] * 5}
    _, document = _manifest(tmp_path, plan, sleep_s=0.1, walltime_s=5.0, selection="every",
                            every_k=1, max_attempts=2, failure_budget=0.1)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(document))
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames[:10], frames[10:]])
    command = ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"]

    run = subprocess.Popen(command, cwd=tmp_path, env=launch_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while sum(f[0] == "end" for f in read_log(tmp_path)) < 8 and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.05)
    for pid in session_pids(run.pid):  # kill -9 mpirun and both ranks at once
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/label"].attrs["status"] == "running"
        assert 0 < (f["label/nmmo/status"][:] != 0).sum() < 20
    # DFT jobs outlive their killed rank (as under a batch system's job step): let the short
    # ones finish, end a hanging one (the batch system would)
    started = {int(f[3]) for f in read_log(tmp_path) if f[0] == "start"}
    time.sleep(2.0)
    for pid in started:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    rerun = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["stages/label"].attrs["status"] == "complete"
        status = f["label/nmmo/status"][:]
        assert (status == 1).sum() == 18 and (status == 0).sum() == 0
        failed = sorted((int(r), int(fr)) for r, fr in
                        zip(f["label/nmmo/replica"][status == -1],
                            f["label/nmmo/frame"][status == -1]))
        assert failed == [(0, 7), (1, 1)]
        reasons = sorted(e.decode().split(":")[0] for e in f["label/nmmo/last_error"][status == -1])
        assert reasons == ["bad_outcar", "unconverged"]
        assert np.isfinite(f["label/nmmo/a_iso_mhz"][status == 1]).all()
        assert np.isnan(f["label/nmmo/a_iso_mhz"][status == -1]).all()
    done_keys = completed_runs(tmp_path)
    assert len(done_keys) == 18 and set(done_keys.values()) == {1}  # none computed twice
    log = read_log(tmp_path)  # the transient ones: failed first, retried, then labelled
    ends = {key: [f[3] for f in log if f[0] == "end" and f[1] == key]
            for key in ("nmmo/r000-f000002", "nmmo/r001-f000005")}
    assert ends["nmmo/r000-f000002"][0] == "exit" and ends["nmmo/r000-f000002"][-1] == "ok"
    assert ends["nmmo/r001-f000005"] == ["ok"]  # its first attempt hung and was killed
    assert sum(f[0] == "start" and f[1] == "nmmo/r001-f000005" for f in log) >= 2


def test_a_frame_is_claimed_once_per_run_and_stale_claims_go(tmp_path):
    from jobs.labelling import claim_frame

    work = tmp_path / "w" / "r000-f000001"
    assert claim_frame(work, "run1") and not claim_frame(work, "run1")
    assert claim_frame(work, "run2")  # a later run: the claim of the dead one is no obstacle
    assert [p.name for p in work.iterdir()] == [".claim-run2"]


def test_label_section_errors_name_the_field():
    from schemas import ManifestError

    base = "stages: [label]\nsystems: [{name: a, structure: 'builtin:p2-nmmo-p63mcm'}]\n"
    with pytest.raises(ManifestError) as error:
        parse_manifest(base + "label: {vasp: {walltime: 10, incar: {encut: 500}}, "
                              "failure_budget: 1.5, selection: random}")
    text = " ".join(error.value.errors)
    assert "label.vasp.walltime: unknown key (did you mean walltime_s?)" in text
    assert "label.vasp.incar" in text and "upper-case" in text
    assert "label.failure_budget" in text and "label.selection" in text
    manifest = parse_manifest(base + "label: {vasp: {potcar_dir: pots}}", base_dir=Path("/x"))
    assert manifest.label.vasp.potcar_dir == Path("/x/pots")  # relative to the manifest


def test_a_changed_selection_keeps_the_stored_one_with_a_warning(tmp_path, ctx, shared_data,
                                                                capsys):
    frames = shared_frames(shared_data, 4)
    manifest, _ = _manifest(tmp_path, n_frames=2)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        write_md(store, "nmmo", [frames])
        label_frames(manifest.label, ctx, store, manifest.systems, manifest.shift)
        more = manifest.label.model_copy(update={"n_frames": 4})
        result = label_frames(more, ctx, store, manifest.systems, manifest.shift)
    assert result.n_selected == 2 and result.n_labelled_now == 0
    assert "keeps its selection of 2 frames" in capsys.readouterr().err


# ---- the library: label tables of frames that do not come from /md ------------------------
NNMR_MODEL = Path(__file__).resolve().parents[2] / "jobs" / "data" / "nnmr-p2-nmmo.h5"


def test_a_table_outside_label_is_labelled_once_and_kept_on_a_rerun(tmp_path, ctx, shared_data):
    """prepare_table + label_tables on another stage's group with the model labeller: every
    frame labelled once with the DP model's numbers; a second call labels nothing."""
    import ase.io
    from deepmd.infer import DeepPot

    from jobs.deepmd import import_deepmd_tf
    from jobs.labelling import label_tables
    from jobs.layouts.label import labelled_frames_in, prepare_table
    from schemas.potential import SHIPPED_MODEL
    from schemas.shift import ShiftSpec

    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":4")
    cells = np.array([a.cell.array for a in frames])
    unwrapped = np.array([a.positions + 2 * a.cell[0] - a.cell[2] for a in frames])
    group = "/learn/iter_000/label/p6322"
    spec = LabelSpec(labeller="model", model={"shift_model": NNMR_MODEL})
    tables = [(group, "p6322", "Na")]
    table = dict(name="p6322", target_species="Na", numbers=frames[0].numbers,
                 cells_a=cells, replica=[0, 0, 3, 3], frame=[5, 9, 5, 9], time_fs=None)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        prepare_table(ctx, store, group, positions_a=unwrapped, attrs={"iteration": 0}, **table)
        prepare_table(ctx, store, group, positions_a=0 * unwrapped, **table)  # kept as it is
        result = label_tables(spec, ctx, store, tables, ShiftSpec(), tmp_path / "work")
        assert (result.n_selected, result.n_done, result.n_failed) == (4, 4, 0)
        assert (result.n_labelled_now, result.n_recovered, result.n_failed_attempts) == (4, 0, 0)
        assert not store.exists("/label")
        assert store.read(f"{group}/status").tolist() == [1] * 4
        assert store.read(f"{group}/attempts").tolist() == [1] * 4
        attrs = store.attrs(group)
        assert (attrs["system"], attrs["target_species"], attrs["iteration"]) == ("p6322", "Na", 0)
        assert (attrs["n_selected"], attrs["n_done"], attrs["n_failed"]) == (4, 4, 0)
        work_dirs = [w.decode() for w in store.read(f"{group}/work_dir")]
        assert work_dirs == [str(tmp_path / "work" / "p6322" / name) for name in (
            "r000-f000005", "r000-f000009", "r003-f000005", "r003-f000009")]
        assert len(list((tmp_path / "work").glob("p6322/*/labelled.npz"))) == 4
        # positions: the given frames wrapped into their cells (shifted by lattice vectors)
        positions = store.read(f"{group}/positions_a")
        fractional = np.linalg.solve(cells[0].T, positions[0].T).T
        assert fractional.min() >= 0 and fractional.max() < 1
        delta = np.linalg.solve(cells[0].T, (positions[0] - frames[0].positions).T).T
        np.testing.assert_allclose(delta, np.round(delta), atol=1e-9)
        assert np.isnan(store.read(f"{group}/time_fs")).all()
        # energies and forces: a direct evaluation of the DP model on the stored frames
        import_deepmd_tf()
        model = DeepPot(str(SHIPPED_MODEL))
        types = [model.get_type_map().index(s) for s in frames[0].get_chemical_symbols()]
        energies = store.read(f"{group}/energy_ev")
        forces = store.read(f"{group}/forces_ev_a")
        for row in range(4):
            energy, force, _ = model.eval(positions[row].reshape(1, -1),
                                          cells[row].reshape(1, -1), types)
            assert energies[row] == pytest.approx(float(energy.ravel()[0]), abs=1e-9)
            np.testing.assert_allclose(forces[row], force.reshape(-1, 3), atol=1e-9)
        shifts = store.read(f"{group}/shift_ppm")
        assert np.isfinite(shifts[:, :16]).all() and np.isnan(shifts[:, 16:]).all()
        keys = ("energy_ev", "forces_ev_a", "a_iso_mhz", "shift_ppm", "magnetic_moment_s")
        before = {key: store.read(f"{group}/{key}") for key in keys}

        again = label_tables(spec, ctx, store, tables, ShiftSpec(), tmp_path / "work")
        assert (again.n_done, again.n_labelled_now, again.n_recovered) == (4, 0, 0)
        for key in keys:  # bit for bit (NaN where NaN)
            np.testing.assert_array_equal(store.read(f"{group}/{key}"), before[key])
        assert store.read(f"{group}/attempts").tolist() == [1] * 4

        labelled = labelled_frames_in(store, [group, "/learn/iter_001/label/p6322"])
        assert [(a.info["system"], a.info["replica"], a.info["frame"]) for a in labelled] == [
            ("p6322", 0, 5), ("p6322", 0, 9), ("p6322", 3, 5), ("p6322", 3, 9)]
        assert labelled[2].get_potential_energy() == energies[2]
        np.testing.assert_array_equal(labelled[3].get_forces(), forces[3])
        assert labelled[1].info["source"].endswith(f"{group}#1")


def test_prepare_table_and_label_tables_refuse_inconsistent_input(tmp_path, ctx):
    from jobs.labelling import label_tables
    from jobs.layouts.label import prepare_table
    from schemas.shift import ShiftSpec

    table = dict(name="x", target_species="Na", numbers=[11, 8], time_fs=None,
                 positions_a=np.zeros((2, 2, 3)), cells_a=np.tile(np.eye(3), (2, 1, 1)))
    with RunStore(tmp_path / "run.h5", ctx) as store:
        with pytest.raises(ValueError, match=r"every \(replica, frame\) once"):
            prepare_table(ctx, store, "/t/x", replica=[0, 0], frame=[1, 1], **table)
        with pytest.raises(ValueError, match=r"positions_a has shape \(2, 2, 3\), expected "
                                             r"\(3, 2, 3\)"):
            prepare_table(ctx, store, "/t/x", replica=[0, 0, 0], frame=[1, 2, 3], **table)
        with pytest.raises(ValueError, match="are the table's own"):
            prepare_table(ctx, store, "/t/x", replica=[0, 0], frame=[1, 2],
                          attrs={"n_done": 3}, **table)
        assert not store.exists("/t/x")
        spec = LabelSpec(labeller="model")
        with pytest.raises(ValueError, match="/t/x is not a prepared label table"):
            label_tables(spec, ctx, store, [("/t/x", "x", "Na")], ShiftSpec(), tmp_path)
        with pytest.raises(ValueError, match=r"every table's name once"):
            label_tables(spec, ctx, store, [("/t/x", "x", "Na"), ("/t/y", "x", "Na")],
                         ShiftSpec(), tmp_path)


def test_a_stop_request_leaves_untaken_frames_pending_and_a_rerun_labels_them(
        tmp_path, ctx, shared_data, monkeypatch):
    """A signal before a DFT job is taken: the rank takes no new job, the outcomes so far are
    recorded, StopRequested is raised (the run exits 75); the rerun labels the rest."""
    import ase.io

    from engine import stop
    from jobs.labelling import label_tables
    from jobs.layouts.label import prepare_table
    from schemas.shift import ShiftSpec

    frames = ase.io.read(shared_data / "p6322-dev.extxyz", ":3")
    group = "/t/label/p6322"
    spec = LabelSpec(labeller="model", model={"shift_model": NNMR_MODEL})
    table = dict(name="p6322", target_species="Na", numbers=frames[0].numbers,
                 cells_a=np.array([a.cell.array for a in frames]), replica=[0, 0, 0],
                 frame=[1, 2, 3], time_fs=None)
    with RunStore(tmp_path / "run.h5", ctx) as store:
        prepare_table(ctx, store, group, positions_a=np.array([a.positions for a in frames]),
                      **table)
        monkeypatch.setitem(stop._state, "signal", "SIGUSR1")
        with pytest.raises(stop.StopRequested, match="in label after 0 of 3 frames"):
            label_tables(spec, ctx, store, [(group, "p6322", "Na")], ShiftSpec(),
                         tmp_path / "work")
        assert store.read(f"{group}/status").tolist() == [0, 0, 0]      # still pending
        assert store.read(f"{group}/attempts").tolist() == [0, 0, 0]
        stop.reset()
        again = label_tables(spec, ctx, store, [(group, "p6322", "Na")], ShiftSpec(),
                             tmp_path / "work")
        assert (again.n_done, again.n_labelled_now, again.n_failed) == (3, 3, 0)


def _given_files(tmp_path: Path, shared_data: Path) -> list[Path]:
    """Two structure files of real frames: an extended XYZ of 6 frames and one VASP POSCAR."""
    import ase.io

    frames = shared_frames(shared_data, 7)
    xyz, poscar = tmp_path / "snapshots.extxyz", tmp_path / "relaxed.vasp"
    ase.io.write(xyz, [a.copy() for a in frames[:6]])
    ase.io.write(poscar, frames[6], format="vasp", direct=True, sort=False)
    return [xyz, poscar]


def test_given_structures_are_labelled_one_table_per_file_with_retries_and_kill_9(
        tmp_path, shared_data, dynshift_bin):
    """label.frames: every frame of each file is labelled (a retried frame included) in
    /label/<stem>, train reads them as labelled frames; a run killed mid-stage is rerun to the
    same labels, no frame computed twice."""
    files = _given_files(tmp_path, shared_data)
    plan = {"snapshots/r000-f000002": ["exit", "ok"]}
    _, document = _manifest(tmp_path, plan, sleep_s=0.4, frames=[str(p) for p in files])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(document))
    command = ["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"]
    run = subprocess.Popen(command, cwd=tmp_path, env=launch_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while sum(f[0] == "end" for f in read_log(tmp_path)) < 2 and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.05)
    for pid in session_pids(run.pid):                     # kill -9 mpirun and both ranks
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    time.sleep(1.0)                                        # running fake jobs end on their own
    rerun = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "every frame of 2 given file(s)" in subprocess.run(
        [*dynshift_bin, "run", "m.yaml", "--dry-run", "--ranks", "2", "--store", "new.h5"],
        cwd=tmp_path, capture_output=True, text=True).stdout
    import ase.io

    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert sorted(f["label"].keys()) == ["relaxed", "snapshots"]
        table = f["label/snapshots"]
        assert table["status"][()].tolist() == [1] * 6
        assert table["attempts"][()][2] == 2                           # failed once, retried
        assert f["label/relaxed/status"][()].tolist() == [1]
        assert f["label/snapshots"].attrs["source_file"] == str(files[0])
        given = ase.io.read(files[0], ":")
        for row, atoms in enumerate(given):
            want = expected_labels(atoms.get_positions(wrap=True))
            assert table["energy_ev"][row] == pytest.approx(want["energy_ev"], abs=1e-5)
            np.testing.assert_allclose(table["a_iso_mhz"][row], want["a_iso_mhz"], atol=6e-4)
    assert set(completed_runs(tmp_path).values()) == {1} and len(completed_runs(tmp_path)) == 7
    with RunStore(tmp_path / "run.h5", RankContext.from_comm(
            MPI.COMM_SELF, set_threads=False), mode="r") as store:
        read = labelled_frames(store)                        # what train reads
    assert len(read) == 7 and {a.info["system"] for a in read} == {"snapshots", "relaxed"}


@pytest.mark.parametrize("bad, message", [
    ("mixed", "frame 1 has another composition or atom order"),
    ("molecule", "frame 0 has no periodic 3-d cell"),
    ("clash", "A apart (< checks.min_distance_a"),
    ("twice", "is used twice"),
    ("missing", "given.extxyz not found"),
])
def test_bad_given_structures_exit_2_naming_the_file_before_any_job(
        bad, message, tmp_path, shared_data, dynshift_bin):
    import ase.io
    from ase import Atoms

    frames = shared_frames(shared_data, 2)
    path = tmp_path / "given.extxyz"
    if bad == "mixed":
        ase.io.write(path, [frames[0], frames[1][1:]])
    elif bad == "molecule":
        ase.io.write(path, Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]]))
    elif bad == "clash":
        clash = frames[0].copy()
        clash.positions[1] = clash.positions[0] + 0.1
        ase.io.write(path, clash)
    elif bad == "twice":
        ase.io.write(path, frames[0])
        (tmp_path / "other").mkdir()
        ase.io.write(tmp_path / "other" / "given.xyz", frames[1])
    listed = [str(path)] + ([str(tmp_path / "other" / "given.xyz")] if bad == "twice" else [])
    _, document = _manifest(tmp_path, frames=listed)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(document))
    done = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "label.frames" in done.stderr and "given." in done.stderr and message in done.stderr
    assert not read_log(tmp_path)                                       # no job launched
