"""The analyze stage: paper validation on the shared DFT frames, md statistics, diffusion."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.stages.analyze import analyze_system, frame_timeline
from jobs.stages.infer import put_labelled_frames
from jobs.shift import shift_ppm
from schemas.analyze import AnalyzeSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec

PAPER = {  # Lin et al., Chem. Sci. 2022: site -> (site-centred shift ppm, occupation)
    "p63mcm": {"Na_edge": (2085, 0.586), "Na_Mn-Mn": (960, 0.411), "Na_Mg-Mg": (1602, 0.003)},
    "p6322": {"Na_edge": (2113, 0.656), "Na_Mn-Mn": (965, 0.242), "Na_Mn-Mg": (1373, 0.102)},
}
DFT_MEAN_PPM = {"p63mcm": 1636.0, "p6322": 1770.0}
"""Mean DFT shift over all Na of all shared frames (data README)."""


@pytest.fixture(scope="module")
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


@pytest.fixture(scope="module")
def dft_store(tmp_path_factory, shared_data, ctx):
    """A store with the shared frames' DFT shifts in the infer layout, analysed."""
    path = tmp_path_factory.mktemp("analyze") / "dft.h5"
    with RunStore(path, ctx, mode="w") as store:
        for name in PAPER:
            frames = ase.io.read(shared_data / f"{name}-dev.extxyz", ":")
            system = SystemSpec(name=name, structure=f"builtin:p2-nmmo-{name}")
            put_labelled_frames(frames, system, ShiftSpec(), ctx, store)
            analyze_system(AnalyzeSpec(chunk_frames=128), system, ctx, store)
    return path


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dft_frames_reproduce_the_papers_site_analysis(dft_store, ctx, name):
    with RunStore(dft_store, ctx, mode="r") as store:
        group = f"/analyze/{name}/sites"
        classes = store.attrs(group)["class_names"]
        occupation = dict(zip(classes, store.read(f"{group}/occupation")))
        shift = dict(zip(classes, store.read(f"{group}/shift_ppm")))
        samples = dict(zip(classes, store.read(f"{group}/samples")))
    assert set(PAPER[name]) | {"unassigned"} == set(classes)
    for site, (paper_ppm, paper_occupation) in PAPER[name].items():
        assert abs(occupation[site] - paper_occupation) <= 0.05, (site, occupation[site])
        if samples[site] >= 100:
            assert abs(shift[site] - paper_ppm) <= 100, (site, shift[site])
        else:
            # Na_Mg-Mg (occupation 0.003): 22 samples of 6400 in 400 frames, a centred shift
            # with a standard error of ~100 ppm; only its rarity can be checked
            assert site == "Na_Mg-Mg" and samples[site] < 0.01 * sum(samples.values())
    assert occupation["unassigned"] < 0.03
    assert abs(sum(occupation.values()) - 1.0) < 1e-12


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dft_mean_histograms_maps_and_running_average_agree(dft_store, ctx, shared_data, name):
    frames = ase.io.read(shared_data / f"{name}-dev.extxyz", ":")
    na = frames[0].numbers == 11
    shifts = shift_ppm(np.array([a.arrays["fermi_contact_mhz"][na] for a in frames]),
                       ShiftSpec())
    with RunStore(dft_store, ctx, mode="r") as store:
        group = f"/analyze/{name}"
        attrs = store.attrs(group)
        assert attrs["kind"] == "file" and attrs["n_frames"] == 400 and attrs["n_centres"] == 16
        mean = attrs["mean_shift_ppm"]
        assert abs(mean - DFT_MEAN_PPM[name]) < 1.0
        assert mean == pytest.approx(shifts.astype(np.float32).mean(dtype=np.float64),
                                     abs=1e-3)
        blocks = store.read(f"{group}/blocks/mean_shift_ppm")
        assert len(blocks) == 10 and np.mean(blocks) == pytest.approx(mean, abs=1e-6)
        # the error: blocking over the frame order reached its plateau; it is at least the
        # error of independent frames, and equals the block size the criterion chose
        frame_means = shifts.astype(np.float32).astype(float).mean(axis=1)
        naive = np.std(frame_means, ddof=1) / np.sqrt(400)
        dynamics = store.attrs(f"{group}/dynamics")
        assert attrs["converged"] and dynamics["blocking_plateau"]
        errors = []
        for size in 2 ** np.arange(int(np.log2(dynamics["blocking_block_frames"])) + 1):
            chosen = frame_means[: 400 // size * size].reshape(-1, size).mean(axis=1)
            if 400 % size:  # the left-over frames join the last block
                chosen[-1] = frame_means[(400 // size - 1) * size:].mean()
            errors.append(np.std(chosen, ddof=1) / np.sqrt(len(chosen)))
        assert attrs["mean_shift_stderr_ppm"] == pytest.approx(max(errors), rel=1e-6)
        assert attrs["mean_shift_stderr_ppm"] >= naive
        assert attrs["verdict"] == "converged"
        running = store.read(f"{group}/running/mean_shift_ppm")
        assert store.read(f"{group}/running/frame_index")[-1] == 399
        assert running[-1] == pytest.approx(mean, abs=1e-6)
        counts = store.read(f"{group}/histogram/counts")
        total = store.read(f"{group}/histogram/total_counts")
        edges = store.read(f"{group}/histogram/edges_ppm")
        samples = store.read(f"{group}/sites/samples")
        reference, _ = np.histogram(shifts.astype(np.float32), bins=edges)
        assert np.array_equal(total, reference)
        assert np.array_equal(counts.sum(1), samples)
        density = store.read(f"{group}/maps/density_per_a2")
        cell = np.array(store.attrs(f"{group}/maps")["cell_a"])
        area = abs(np.linalg.det(cell[:2, :2])) / density.shape[1] ** 2
        assert density.sum() * area == pytest.approx(16.0)  # Na per frame, both slabs
        assert np.nansum(store.read(f"{group}/maps/count")) == 6400
        mean_map = store.read(f"{group}/maps/mean_shift_ppm")
        weights = store.read(f"{group}/maps/count")
        assert np.nansum(mean_map * weights) / weights.sum() == pytest.approx(mean, abs=1e-3)


def _md_source(store, group, frame0, n_replicas, n_frames, dt_fs, step_a, seed,
               drift_per_frame=(0.0, 0.0, 0.0)):
    """A synthetic md source: Na random walks on a fixed framework, a drifting frame."""
    rng = np.random.default_rng(seed)
    na = np.flatnonzero(frame0.numbers == 11)
    steps = rng.normal(0.0, step_a, size=(n_replicas, n_frames, len(na), 3))
    steps[..., 2] = 0.0
    steps[:, 0] = 0.0
    walk = frame0.positions[na][None, None] + np.cumsum(steps, axis=1)
    drift = np.arange(n_frames)[None, :, None] * np.asarray(drift_per_frame)
    drift = np.broadcast_to(drift, (n_replicas, n_frames, 3))
    positions = (walk + drift[:, :, None, :]).reshape(-1, len(na), 3).astype(np.float32)
    shift = 1000.0 + 50.0 * rng.standard_normal((n_replicas * n_frames, len(na)))
    shift[: n_frames] += 100.0  # replica 0 sits higher: the block error must see it
    time_fs = np.tile(np.arange(n_frames) * dt_fs, n_replicas)
    store.put(f"{group}/shift_ppm", shift.astype(np.float32))
    store.put(f"{group}/shift_std_ppm", np.full(shift.shape, 7.0, np.float32))
    store.put(f"{group}/centre_positions_a", positions)
    store.put(f"{group}/cell_a", np.broadcast_to(frame0.cell[:], (len(time_fs), 3, 3)))
    store.put(f"{group}/time_fs", time_fs)
    store.put(f"{group}/replica", np.repeat(np.arange(n_replicas), n_frames).astype(np.int32))
    store.put(f"{group}/centre_index", na.astype(np.int32))
    store.put(f"{group}/frame0_numbers", frame0.numbers)
    store.put(f"{group}/frame0_positions_a", frame0.positions)
    store.put(f"{group}/framework_drift_a", drift.reshape(-1, 3))
    return positions - drift.reshape(-1, 1, 3), shift, time_fs  # as analyze sees them


def test_md_source_diffusion_blocks_and_running_average(tmp_path, ctx, shared_data):
    frame0 = ase.io.read(shared_data / "p63mcm-dev.extxyz", 0)
    n_replicas, n_frames, dt_fs, step_a = 3, 300, 50.0, 0.15
    spec = AnalyzeSpec(chunk_frames=97, msd_lags=20, running_points=30)
    system = SystemSpec(name="walk", structure="builtin:p2-nmmo-p63mcm")
    with RunStore(tmp_path / "md.h5", ctx, mode="w") as store:
        positions, shift, time_fs = _md_source(store, "/infer/walk", frame0, n_replicas,
                                               n_frames, dt_fs, step_a, seed=5,
                                               drift_per_frame=(0.01, -0.005, 0.0))
        result = analyze_system(spec, system, ctx, store)
        group = "/analyze/walk"
        attrs = store.attrs(group)
        lag_fs = store.read(f"{group}/msd/lag_fs")
        msd_a2 = store.read(f"{group}/msd/msd_a2")
        blocks = store.read(f"{group}/blocks/mean_shift_ppm")
        running = store.read(f"{group}/running/mean_shift_ppm")
        running_t = store.read(f"{group}/running/time_fs")
        centre_running = store.read(f"{group}/running/centre_shift_ppm")
        ensemble = store.read(f"{group}/sites/ensemble_std_ppm")
        attrs_msd = store.attrs(f"{group}/msd")
    assert attrs["kind"] == "md" and attrs["n_segments"] == 3 and attrs["time_span_fs"] == 14950
    # MSD against a direct numpy reference (drift removed, in-plane, per replica)
    xy = positions[..., :2].reshape(n_replicas, n_frames, -1, 2)
    for lag, value in zip((lag_fs / dt_fs).round().astype(int), msd_a2):
        reference = ((xy[:, lag:] - xy[:, :-lag]) ** 2).sum(-1).mean()
        assert value == pytest.approx(reference, rel=1e-6)
    assert lag_fs[0] == dt_fs and lag_fs[-1] == 150 * dt_fs
    # the random walk's D = step^2 / (2 dt) (A^2/fs) -> cm^2/s; statistics of 48 walkers
    expected_cm2_s = step_a ** 2 / (2 * dt_fs) * 0.1
    msd = attrs_msd
    assert msd["diffusive"] and abs(msd["loglog_slope"] - 1) < 0.2
    assert result.d_cm2_s == pytest.approx(expected_cm2_s, rel=0.2)
    # replica 0 sits 100 ppm higher: the shift of a nucleus stays correlated over its whole
    # replica, so the mean is not converged and carries no error bar, only a lower bound
    assert not result.converged and np.isnan(result.mean_shift_stderr_ppm)
    assert "autocorrelation has not decayed" in result.verdict
    assert attrs["mean_shift_stderr_lower_bound_ppm"] > 5  # noise alone: ~0.4
    # blocks: 10 per replica, means of the frames they hold
    reference_blocks = shift.astype(np.float32).astype(float).reshape(
        n_replicas, 10, 30, -1).mean(axis=(2, 3)).ravel()
    assert np.allclose(blocks, reference_blocks, atol=1e-9)
    # running average vs simulated time: frames with t <= bin edge, all replicas
    shift32 = shift.astype(np.float32).astype(float)
    for k in (0, 7, 29):
        upto = time_fs <= running_t[k] + 1e-9
        assert running[k] == pytest.approx(shift32[upto].mean(), rel=1e-12)
        assert np.allclose(centre_running[k], shift32[upto].mean(axis=0), rtol=1e-12)
    assert np.allclose(ensemble[np.isfinite(ensemble)], 7.0)
    assert attrs["mean_shift_model_sigma_ppm"] == pytest.approx(7.0)  # every sigma is 7 ppm


def test_timeline_segments_blocks_and_bins():
    spec = AnalyzeSpec(blocks_per_replica=3, running_points=4)
    timeline = frame_timeline([0, 10, 20, 30, 0, 10, 20], [0, 0, 0, 0, 1, 1, 1], spec)
    assert timeline.is_md and timeline.segment_bounds == [(0, 4), (4, 7)]
    assert timeline.block.tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert timeline.n_blocks == 6
    assert np.allclose(timeline.time_points, [7.5, 15, 22.5, 30])
    assert timeline.time_bin.tolist() == [0, 1, 2, 3, 0, 1, 2]
    files = frame_timeline([np.nan] * 5, [-1] * 5, spec)
    assert not files.is_md and files.segment_bounds == [(0, 5)]
    assert files.time.tolist() == [0, 1, 2, 3, 4]


def test_missing_infer_data_names_the_system(tmp_path, ctx):
    system = SystemSpec(name="nothing", structure="builtin:p2-nmmo-p63mcm")
    with RunStore(tmp_path / "empty.h5", ctx, mode="w") as store:
        with pytest.raises(InputError, match=r"system nothing: .*/infer/nothing.*infer stage"):
            analyze_system(AnalyzeSpec(), system, ctx, store)


def test_spec_rejects_bad_ranges():
    with pytest.raises(ValueError, match="histogram_range_ppm"):
        AnalyzeSpec(histogram_range_ppm=(100.0, 0.0))
    with pytest.raises(ValueError, match="msd_fit_window_fs"):
        AnalyzeSpec(msd_fit_window_fs=(10.0, 5.0))
    with pytest.raises(ValueError):
        AnalyzeSpec(site_radius_a=0.0)


def test_a_new_analysis_replaces_the_dynamics_of_the_last(tmp_path, ctx, shared_data):
    """An md analysis, then one of frames from a file into the same group: no stale hops,
    rates or MSD are left for the spectrum stage to read."""
    frame0 = ase.io.read(shared_data / "p63mcm-dev.extxyz", 0)
    system = SystemSpec(name="walk", structure="builtin:p2-nmmo-p63mcm")
    with RunStore(tmp_path / "again.h5", ctx, mode="w") as store:
        _md_source(store, "/infer/walk", frame0, 2, 120, 50.0, 0.15, seed=2)
        analyze_system(AnalyzeSpec(), system, ctx, store)
        assert store.shape("/analyze/walk/dynamics/site") == (240, 16)
        assert store.exists("/analyze/walk/dynamics/rate_per_ps")
        frames = ase.io.read(shared_data / "p63mcm-dev.extxyz", ":30")
        put_labelled_frames(frames, system.model_copy(update={"name": "dft"}), ShiftSpec(), ctx,
                            store)
        analyze_system(AnalyzeSpec(), system, ctx, store, source="/infer/dft",
                       target="/analyze/walk")
        assert store.shape("/analyze/walk/dynamics/site") == (30, 16)
        assert not store.exists("/analyze/walk/dynamics/rate_per_ps")
        assert not store.exists("/analyze/walk/msd")
        assert store.attrs("/analyze/walk")["kind"] == "file"
