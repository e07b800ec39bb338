"""Collective statistics under mpirun -n 2 (and -n 1): equal to a serial numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.stats import (BinnedMoments, bin_index, block_average, fit_diffusion, grid_index,
                          moments_mean_std, reduce_moments, running_average)


@pytest.fixture
def ctx():
    return RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)


@pytest.fixture
def samples():
    """The same data on every rank: 101 frames x 7 nuclei of shifts, xy, a time block."""
    rng = np.random.default_rng(17)
    shift = rng.normal(1500.0, 400.0, size=(101, 7))
    frac = rng.random((101, 7, 2)) * 3 - 1  # outside [0, 1) too: wrapped by grid_index
    return shift, frac


def test_reductions_equal_the_serial_reference(ctx, samples):
    shift, frac = samples
    n_frames = len(shift)
    block_of_frame = (np.arange(n_frames) * 5) // n_frames  # 5 blocks in time
    bin_of_frame = np.arange(n_frames) // 10  # 11 time bins
    edges = np.linspace(0.0, 3000.0, 31)
    blocks, running, histogram, xy_map = (BinnedMoments(5), BinnedMoments(11),
                                          BinnedMoments(32), BinnedMoments((4, 6)))
    mine = ctx.block(n_frames)
    for start in range(mine.start, mine.stop, 13):  # chunks that do not divide the shard
        rows = slice(start, min(start + 13, mine.stop))
        values = shift[rows]
        blocks.add(np.broadcast_to(block_of_frame[rows, None], values.shape), values)
        running.add(np.broadcast_to(bin_of_frame[rows, None], values.shape), values)
        histogram.add(bin_index(values, edges) + 1)
        xy_map.add(grid_index(frac[rows, :, 0], frac[rows, :, 1], 4, 6), values)
    reduce_moments(ctx, blocks, running, histogram, xy_map)

    # serial numpy references over all frames
    reference_blocks = np.array([shift[block_of_frame == b].mean() for b in range(5)])
    result = block_average(blocks.count, blocks.sum)
    assert result.mean == pytest.approx(shift.mean(), rel=1e-13)
    assert np.allclose(result.block_means, reference_blocks, rtol=1e-13)
    assert result.stderr == pytest.approx(np.std(reference_blocks, ddof=1) / np.sqrt(5),
                                          rel=1e-10)
    cumulative = running_average(running.count, running.sum)
    for k in range(11):
        assert cumulative[k] == pytest.approx(shift[bin_of_frame <= k].mean(), rel=1e-13)
    counts, _ = np.histogram(shift, bins=edges)
    assert np.array_equal(histogram.count[1:-1], counts)
    assert histogram.count[0] == (shift < 0).sum() and histogram.count[-1] == (shift >= 3000).sum()
    count, total, total_sq = xy_map.reshaped()
    mean, std = moments_mean_std(count, total, total_sq)
    ia = np.floor(np.mod(frac[..., 0], 1) * 4).astype(int)
    ib = np.floor(np.mod(frac[..., 1], 1) * 6).astype(int)
    for a, b in ((0, 0), (3, 5), (2, 1)):
        inside = (ia == a) & (ib == b)
        assert count[a, b] == inside.sum()
        assert mean[a, b] == pytest.approx(shift[inside].mean(), rel=1e-12)
        assert std[a, b] == pytest.approx(shift[inside].std(), rel=1e-8)
    # every rank holds the same reduced numbers
    gathered = ctx.comm.allgather(np.concatenate([blocks.sum, xy_map.sum_sq]))
    assert all(np.array_equal(gathered[0], g) for g in gathered)


def test_empty_shards_and_empty_bins(ctx):
    """More ranks than frames: a rank with no frames still joins the one Allreduce."""
    acc = BinnedMoments(3)
    if ctx.rank == 0:
        acc.add([0, 0, 2, -1, 3], [1.0, 3.0, 5.0, 100.0, 100.0])  # -1 and 3: out of range
    reduce_moments(ctx, acc)
    assert acc.count.tolist() == [2, 0, 1]
    mean, _ = moments_mean_std(acc.count, acc.sum, acc.sum_sq)
    assert mean[0] == 2.0 and np.isnan(mean[1]) and mean[2] == 5.0
    single = block_average([4, 0], [8.0, 0.0])
    assert single.mean == 2.0 and np.isnan(single.stderr) and single.n_blocks == 1


def test_bin_edges_and_diffusion_fit():
    edges = np.array([0.0, 1.0, 2.0])
    assert bin_index(np.array([-0.1, 0.0, 0.99, 1.0, 2.0, 5.0]), edges).tolist() == [
        -1, 0, 0, 1, 2, 2]
    lag_fs = np.arange(1, 21) * 100.0
    msd_a2 = 4 * 2.5e-5 * lag_fs + 0.3  # D = 2.5e-5 A^2/fs = 2.5e-6 cm^2/s
    fit = fit_diffusion(lag_fs, msd_a2, (500.0, 1500.0), dimensions=2)
    assert fit.d_cm2_s == pytest.approx(2.5e-6, rel=1e-9)
    assert fit.intercept_a2 == pytest.approx(0.3) and fit.n_points == 11
    assert np.isnan(fit_diffusion(lag_fs, msd_a2, (0.0, 50.0)).d_cm2_s)
