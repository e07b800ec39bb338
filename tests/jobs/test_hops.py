"""Site dynamics (jobs/hops.py) on a constructed trajectory with known hops."""
from __future__ import annotations

import numpy as np
import pytest

from jobs.hops import HopCounter, finish_hops

SITE_CLASS = np.array([0, 0, 1])  # sites 0, 1: class 0; site 2: class 1
SITES = np.array([  # frames x 3 nuclei; -1: in transit
    # replica 0, t = 0 .. 90 fs
    [0, -1, 2], [0, -1, 1], [-1, 1, 2], [2, 1, 1], [2, 1, 2],
    [2, 1, 2], [-1, 1, 2], [-1, 1, 2], [0, 1, 2], [0, 1, 2],
    # replica 1, t = 0 .. 40 fs
    [2, 0, -1], [2, 1, -1], [2, 1, -1], [2, 1, -1], [2, 1, -1]])
TIME_FS = np.r_[np.arange(10) * 10.0, np.arange(5) * 10.0]
SEGMENT = np.r_[np.zeros(10, int), np.ones(5, int)]


class _Serial:
    size, rank = 1, 0


def _count(bounds) -> HopCounter:
    """One counter fed in chunks [bounds[k], bounds[k+1])."""
    counter = HopCounter(SITE_CLASS, 2, 3)
    for a, b in zip(bounds[:-1], bounds[1:]):
        counter.add(SITES[a:b], TIME_FS[a:b], SEGMENT[a:b], a)
    return counter


def _check(stats):
    # hops: nucleus 0: 0->2, 2->0; nucleus 1: 0->1 (replica 1); nucleus 2: 2->1, 1->2 twice
    assert stats.centre_hops.tolist() == [2, 1, 4]
    assert stats.hop_counts.tolist() == [[1, 3], [3, 0]]
    # complete residences: class 0: 10, 10 (nucleus 2); class 1: 50 (n0), 10 (n2)
    assert stats.residence_count.tolist() == [2, 2]
    assert stats.residence_mean_fs.tolist() == [10.0, 30.0]
    assert stats.residence_stderr_fs[0] == 0.0
    assert stats.residence_stderr_fs[1] == pytest.approx(np.std([50, 10], ddof=1) / np.sqrt(2))
    # time committed to each class, censored ends included (see the module doc)
    assert stats.class_time_fs.tolist() == [170.0, 160.0]
    assert np.allclose(stats.rate_per_ps, [[1e3 / 170, 3e3 / 170], [3e3 / 160, 0.0]])
    assert np.allclose(stats.rate_err_per_ps, [[1e3 / 170, np.sqrt(3) * 1e3 / 170],
                                               [np.sqrt(3) * 1e3 / 160, 1e3 / 160]])
    assert stats.mean_hops == pytest.approx(7 / 3)


@pytest.mark.parametrize("bounds", [[0, 15], [0, 1, 2, 3, 15], [0, 4, 7, 11, 15],
                                    list(range(16))])
def test_known_hops_in_any_chunking(bounds):
    _check(finish_hops(_Serial(), _count(bounds)))


@pytest.mark.parametrize("split", [[0, 3, 15], [0, 6, 11, 15], [0, 2, 4, 8, 10, 12, 15],
                                   list(range(16))])
def test_known_hops_when_the_frames_are_split_over_ranks(split):
    """Each 'rank' counts its block; the join across the blocks adds what crosses them."""
    ranks = [_count([a, b]) for a, b in zip(split[:-1], split[1:])]
    merged = HopCounter(SITE_CLASS, 2, 3)
    for counter in ranks:  # what the Allreduce does
        for name in ("hops", "residence", "class_time", "centre_hops"):
            total, part = getattr(merged, name), getattr(counter, name)
            total.add_sums(part.count, part.sum, part.sum_sq)
        merged.pieces += counter.pieces
    _check(finish_hops(_Serial(), merged))


def test_a_nucleus_that_never_hops_has_no_residence_and_all_its_time():
    counter = HopCounter(SITE_CLASS, 2, 1)
    counter.add(np.array([[2], [2], [-1], [2]]), np.arange(4) * 5.0, np.zeros(4, int), 0)
    stats = finish_hops(_Serial(), counter)
    assert stats.centre_hops.tolist() == [0] and stats.residence_count.tolist() == [0, 0]
    assert stats.class_time_fs.tolist() == [0.0, 15.0]
    assert np.isnan(stats.residence_mean_fs).all()
    assert np.isnan(stats.rate_per_ps[0]).all()  # no time in class 0: no rate, not 0
    assert stats.rate_per_ps[1].tolist() == [0.0, 0.0]
    assert stats.rate_err_per_ps[1].tolist() == [1e3 / 15, 1e3 / 15]  # the upper bound
