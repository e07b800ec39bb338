"""The infer stage: labels mode, model mode against a direct prediction, md-store frames,
resume of a missing chunk, and -n 1 / -n 2 runs of `dynshift run` giving identical numbers."""
from __future__ import annotations

import os
import subprocess

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.stages.infer import infer_shifts
from jobs.shiftmodels.nnmr import FoldModel, ShiftEnsemble, write_fold_model
from jobs.shift import shift_ppm
from jobs.shiftmodels.soap import SoapFeaturizer
from schemas.infer import InferSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec

N_FRAMES = 10


def tiny_folds(n_features: int, seed: int = 7, n_models: int = 2) -> list[FoldModel]:
    """Small random fold models (n_features -> 8 -> 4 -> 1) standing in for a trained ensemble."""
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(n_models):
        widths = [n_features, 8, 4, 1]
        kernels = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
                   for a, b in zip(widths[:-1], widths[1:])]
        biases = [rng.normal(0, 0.1, b).astype(np.float32) for b in widths[1:]]
        folds.append(FoldModel(kernels, biases, rng.normal(0, 0.01, n_features).astype(np.float32),
                               np.full(n_features, 0.02, np.float32), 1600.0, 400.0))
    return folds


@pytest.fixture(scope="module")
def featurizer():
    return SoapFeaturizer(["Na", "Mg", "Mn", "O"])


@pytest.fixture(scope="module")
def ensemble(featurizer):
    return ShiftEnsemble([f.folded() for f in tiny_folds(featurizer.n_features)],
                         {"soap": featurizer.settings()})


@pytest.fixture(scope="module")
def frames(shared_data):
    return ase.io.read(shared_data / "p63mcm-dev.extxyz", f":{N_FRAMES}")


@pytest.fixture
def frames_file(tmp_path, frames):
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


def test_labels_mode_gives_the_dft_shifts_of_the_file(frames_file, frames, ctx, tmp_path):
    spec = InferSpec(trajectories={"p63mcm": frames_file}, shifts_from="labels", chunk_frames=3)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        result = infer_shifts(spec, [SystemSpec(name="p63mcm", structure="x.extxyz")], ctx,
                              store)
        shifts = store.read("/infer/p63mcm/shift_ppm")
        centres = store.read("/infer/p63mcm/centre_index")
        attrs = store.attrs("/infer/p63mcm")
        replica = store.read("/infer/p63mcm/replica")
        positions = store.read("/infer/p63mcm/centre_positions_a")
    assert result.frames_computed == N_FRAMES
    assert centres.tolist() == list(range(16))
    expected = np.stack([shift_ppm(f.arrays["fermi_contact_mhz"][:16], ShiftSpec())
                         for f in frames])
    np.testing.assert_allclose(shifts, expected, rtol=1e-6)
    assert 1000 < shifts.mean() < 2300  # about 1636 ppm over the whole file
    assert attrs["n_done"] == N_FRAMES and attrs["source"].startswith("file:")
    assert np.all(replica == -1)
    np.testing.assert_allclose(positions[4], frames[4].positions[:16])


def test_model_mode_equals_a_direct_prediction(frames_file, frames, ctx, ensemble, featurizer,
                                               tmp_path):
    spec = InferSpec(trajectories={"p63mcm": frames_file}, chunk_frames=4)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        infer_shifts(spec, [SystemSpec(name="p63mcm", structure="x")], ctx, store,
                     ensemble=ensemble)
        shifts = store.read("/infer/p63mcm/shift_ppm")
        spread = store.read("/infer/p63mcm/shift_std_ppm")
        numbers = store.read("/infer/p63mcm/frame0_numbers")
    mean, std = ensemble.predict(featurizer.features(frames))
    np.testing.assert_allclose(shifts, mean.reshape(N_FRAMES, 16), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(spread, std.reshape(N_FRAMES, 16), rtol=1e-4, atol=1e-3)
    assert np.all(spread > 0) and shifts.std() > 1.0
    assert numbers.tolist() == frames[0].numbers.tolist()


def _write_md(store, frames, replicas=2):
    """Two md replicas of the same frames, positions unwrapped by whole cell vectors."""
    rng = np.random.default_rng(3)
    cell = frames[0].cell.array
    for r in range(replicas):
        images = rng.integers(-2, 3, (len(frames), len(frames[0]), 3))
        positions = np.stack([f.positions for f in frames]) + images @ cell
        store.put(f"/md/p63mcm/r{r:03d}/positions_a", positions)
        store.put(f"/md/p63mcm/r{r:03d}/cell_a", np.stack([f.cell.array for f in frames]))
        store.put(f"/md/p63mcm/r{r:03d}/time_fs", 100.0 * np.arange(len(frames)))
        store.set_attrs(f"/md/p63mcm/r{r:03d}", n_saved=len(frames) - r)  # r001: one fewer
    store.put("/md/p63mcm/numbers", frames[0].numbers)


def test_md_store_frames_unwrapped_and_resume_of_a_missing_chunk(frames, ctx, ensemble,
                                                                 featurizer, tmp_path):
    spec = InferSpec(chunk_frames=4, skip_frames=1)
    system = [SystemSpec(name="p63mcm", structure="x")]
    with RunStore(tmp_path / "s.h5", ctx) as store:
        _write_md(store, frames)
        first = infer_shifts(spec, system, ctx, store, ensemble=ensemble)
        n_frames = (N_FRAMES - 1) + (N_FRAMES - 2)
        assert first.frames_computed == n_frames
        shifts = store.read("/infer/p63mcm/shift_ppm")
        positions = store.read("/infer/p63mcm/centre_positions_a")
        replica = store.read("/infer/p63mcm/replica")
        times = store.read("/infer/p63mcm/time_fs")
        # a run stopped before chunk 2 was written
        store.write_rows("/infer/p63mcm/chunk_done", 2, np.zeros(1, np.uint8))
        store.write_rows("/infer/p63mcm/shift_ppm", 8, np.full((4, 16), np.nan, np.float32))
        second = infer_shifts(spec, system, ctx, store, ensemble=ensemble)
        assert second.frames_computed == 4
        np.testing.assert_array_equal(store.read("/infer/p63mcm/shift_ppm"), shifts)
        third = infer_shifts(spec, system, ctx, store, ensemble=ensemble)
        assert third.frames_computed == 0
        raw = store.read("/md/p63mcm/r000/positions_a")
    assert replica.tolist() == [0] * 9 + [1] * 8
    np.testing.assert_allclose(times[:9], 100.0 * np.arange(1, 10))
    np.testing.assert_array_equal(positions[:9], raw[1:, :16])  # unwrapped, as stored
    # the same frames as replica 0 and as replica 1 (other images): the same shifts
    mean, _ = ensemble.predict(featurizer.features(frames[1:]))
    np.testing.assert_allclose(shifts[:9], mean.reshape(9, 16), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(shifts[9:], shifts[:8], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("ranks", [1, 2])
def test_dynshift_run_at_1_and_2_ranks(ranks, frames_file, featurizer, dynshift_bin,
                                       tmp_path_factory, request):
    folder = tmp_path_factory.getbasetemp() / "infer-ranks"
    folder.mkdir(exist_ok=True)
    model = folder / "model.h5"
    if not model.exists():
        with RunStore(model) as store:
            for k, fold in enumerate(tiny_folds(featurizer.n_features)):
                write_fold_model(store, f"/train/folds/{k}", fold)
            store.set_attrs("/train", soap=featurizer.settings())
    manifest = folder / f"m{ranks}.yaml"
    manifest.write_text(f"stages: [infer]\nsystems: [{{name: p63mcm, structure: {frames_file}}}]\n"
                        f"infer: {{model: {model}, chunk_frames: 3,\n"
                        f"        trajectories: {{p63mcm: {frames_file}}}}}\n")
    out = folder / f"run{ranks}.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["mpirun", "-n", str(ranks), *dynshift_bin, "run", str(manifest),
                           "--store", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import h5py

    with h5py.File(out, "r") as f:
        shifts = f["/infer/p63mcm/shift_ppm"][()]
        assert f["/infer/p63mcm"].attrs["n_done"] == N_FRAMES
    assert np.all(np.isfinite(shifts)) and shifts.shape == (N_FRAMES, 16)
    other = folder / f"run{3 - ranks}.h5"
    if other.exists():
        with h5py.File(other, "r") as f:
            np.testing.assert_array_equal(f["/infer/p63mcm/shift_ppm"][()], shifts)


def test_tf_gemm_predictor_equals_the_numpy_ensemble(featurizer, frames):
    # the infer stage's fast path (TensorFlow's AVX-512 GEMMs) must give the ensemble's numbers
    from jobs.shiftmodels.predictors import TfGemmEnsemble, fast_predictor

    rng = np.random.default_rng(3)
    folds = []
    for _ in range(3):  # wider than the tiny stand-in, so the GEMMs are blocked like the real one
        widths = [featurizer.n_features, 64, 32, 1]
        kernels = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
                   for a, b in zip(widths[:-1], widths[1:])]
        biases = [rng.normal(0, 0.1, b).astype(np.float32) for b in widths[1:]]
        folds.append(FoldModel(kernels, biases, np.zeros(widths[0], np.float32),
                               np.ones(widths[0], np.float32), 1600.0, 400.0))
    ensemble = ShiftEnsemble([f.folded() for f in folds], {"soap": featurizer.settings()})
    fast = fast_predictor(ensemble, threads=1)
    assert isinstance(fast, TfGemmEnsemble) and fast.settings is ensemble.settings
    features = featurizer.features(frames[:3])
    features = np.concatenate([features] * 40)  # 1920 rows, 2 GEMM chunks of 1024
    fast.chunk_rows = 1024
    mean, std = fast.predict(features)
    expected_mean, expected_std = ensemble.predict(features)
    assert mean.shape == expected_mean.shape == (1920,)
    # float32 GEMMs summed in another order: equal to rounding (~1e-7 relative of ~2000 ppm)
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=2e-3)
    np.testing.assert_allclose(std, expected_std, rtol=0, atol=2e-3)
    assert expected_std.max() > 10.0 and np.ptp(expected_mean) > 0.1
    stand_in = object()
    assert fast_predictor(stand_in) is stand_in


# ---- bad frames at run time ------------------------------------------------------------------
def _spoil(frames, kind: str):
    """Copies of `frames` with a NaN coordinate in frame 7 (atom 12) or atoms 3 and 40 of
    frame 5 moved 0.1 A apart."""
    frames = [f.copy() for f in frames]
    if kind == "nan":
        frames[7].positions[12, 0] = np.nan
    else:
        direction = frames[5].positions[40] - frames[5].positions[3]
        frames[5].positions[40] = frames[5].positions[3] + 0.1 * direction / np.linalg.norm(
            direction)
    return frames


@pytest.mark.parametrize("kind,ranks,expected", [
    ("nan", 1, "frame 7: non-finite coordinate (atom 12 (Na): [nan, "),
    ("close", 2, "frame 5: atoms 3 (Na) and 40 (O) are 0.10 A apart "
                 "(< checks.min_distance_a = 0.5 A)")])
def test_dynshift_run_refuses_a_bad_frame_of_a_trajectory_file(kind, ranks, expected, frames,
                                                                dynshift_bin, tmp_path):
    path = tmp_path / f"{kind}.extxyz"
    ase.io.write(path, _spoil(frames, kind), format="extxyz")
    manifest = tmp_path / "m.yaml"
    manifest.write_text("stages: [infer, analyze]\n"
                        f"systems: [{{name: p63mcm, structure: {path}}}]\n"
                        f"infer: {{chunk_frames: 3, trajectories: {{p63mcm: {path}}}}}\n")
    from launch import launch_env

    done = subprocess.run(["mpirun", "-n", str(ranks), *dynshift_bin, "run", str(manifest),
                           "--store", str(tmp_path / "s.h5")], capture_output=True, text=True,
                          timeout=300, env=dict(launch_env(), OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"infer.trajectories: {path}: {expected}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_bad_frame_in_the_md_store_names_its_replica_group(frames, ctx, ensemble, tmp_path):
    spec = InferSpec(chunk_frames=4, skip_frames=1)
    system = [SystemSpec(name="p63mcm", structure="x")]
    with RunStore(tmp_path / "s.h5", ctx) as store:
        _write_md(store, frames)
        positions = store.read("/md/p63mcm/r001/positions_a")
        positions[4, 30] = positions[4, 31] + 0.2  # 0.35 A apart
        store.put("/md/p63mcm/r001/positions_a", positions)
        with pytest.raises(InputError, match=r"^infer: store group /md/p63mcm/r001: frame 4: "
                                             r"atoms 30 \(Mn\) and 31 \(Mn\) are 0\.35 A apart"):
            infer_shifts(spec, system, ctx, store, ensemble=ensemble)
        # the manifest's threshold reaches the check; the 3 chunks before the bad one were kept
        result = infer_shifts(spec, system, ctx, store, ensemble=ensemble, min_distance_a=0.3)
    assert result.frames == {"p63mcm": 17} and result.frames_computed == 17 - 3 * 4


def test_a_species_unknown_to_the_model_names_the_file(frames, ctx, ensemble, tmp_path):
    frames = [f.copy() for f in frames]
    for frame in frames:
        frame.numbers[0] = 3  # a Li in place of the first Na
    path = tmp_path / "li.extxyz"
    ase.io.write(path, frames, format="extxyz")
    spec = InferSpec(trajectories={"p63mcm": path}, skip_frames=2)
    with RunStore(tmp_path / "s.h5", ctx) as store:
        with pytest.raises(InputError, match=rf"^infer: system 'p63mcm', file:{path} frame 2 "
                                             r"\(NN-NMR model .*\): species \['Li'\] not among "
                                             r"the SOAP species"):
            infer_shifts(spec, [SystemSpec(name="p63mcm", structure="x")], ctx, store,
                         ensemble=ensemble)
