"""Site dynamics: hops between sites, residence times and the hop-rate matrix between classes.

A target nucleus is *committed* to the last site it was seen in (:func:`jobs.sites.assign_sites`;
frames in no site, ``-1``, are transit and keep the last site). A **hop** is a change of the
committed site, timed by the first frame seen in the new site; a **residence** is the time
between two hops of one nucleus (complete) or between a replica's start or end and its nearest
hop (censored: counted in the time spent in a class, not in the mean residence time). A
recrossing (i -> j -> i) counts two hops: the definition is the stable-states one, with the site
circles (``analyze.site_radius_a``) as the states.

Parallel scheme: the analyze stage shards the frames over the ranks in contiguous blocks and
reads them in chunks; each rank runs a :class:`HopCounter` over its frames (every hop and
residence inside its block is complete there), keeps per nucleus the first and last committed
site of each *piece* (its block within one replica segment), and :func:`finish_hops` joins the
pieces of every segment in time order (one allgather of small per-nucleus arrays) and adds the
hops and residences across the block boundaries, then ONE Allreduce adds every rank's counts.
Counts are integers and identical at any rank count; times are sums of frame times.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.stats import BinnedMoments, gather_items, reduce_moments


@dataclass
class _Piece:
    """One rank's frames of one segment: per nucleus its first and last committed sites."""

    segment: int
    start_frame: int
    end_time: float
    first_site: np.ndarray
    """(n_centres,) first site seen in the piece (-1: none)."""
    first_time: np.ndarray
    """(n_centres,) time of that frame."""
    first_change: np.ndarray
    """(n_centres,) time of the first hop inside the piece (NaN: none)."""
    last_site: np.ndarray
    """(n_centres,) committed site at the piece's end (-1: none)."""
    last_change: np.ndarray
    """(n_centres,) time of the last hop inside the piece (NaN: none)."""


class HopCounter:
    """Hops and residences of the frames one rank reads, in time order (see the module doc).

    Parameters
    ----------
    site_class
        (n_sites,) class index of each site (:attr:`jobs.sites.SiteSet.site_class`).
    n_classes
        Classes of sites (the ``unassigned`` class excluded).
    n_centres
        Target nuclei per frame.
    """

    def __init__(self, site_class: np.ndarray, n_classes: int, n_centres: int):
        self.site_class = np.asarray(site_class, dtype=np.int64)
        self.n_classes = n_classes
        self.n_centres = n_centres
        self.hops = BinnedMoments((n_classes, n_classes))
        """Hops from class a (row) to class b (column)."""
        self.residence = BinnedMoments(n_classes)
        """Complete residences per class: count, sum (fs) and sum of squares (fs^2)."""
        self.class_time = BinnedMoments(n_classes)
        """Time (fs) nuclei spent committed to each class (complete + censored residences)."""
        self.centre_hops = BinnedMoments(n_centres)
        self.pieces: list[_Piece] = []

    def _class(self, site: np.ndarray) -> np.ndarray:
        return self.site_class[site]

    def add(self, site: np.ndarray, time_fs: np.ndarray, segment: np.ndarray,
            start_frame: int) -> None:
        """Add consecutive frames (``start_frame`` on) in time order: (n_frames, n_centres)
        site indices, their times (fs) and replica segments."""
        site = np.asarray(site, dtype=np.int64)
        time_fs = np.asarray(time_fs, dtype=float)
        segment = np.asarray(segment, dtype=np.int64)
        cuts = np.flatnonzero(np.diff(segment)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(segment)]):
            self._add_run(site[a:b], time_fs[a:b], int(segment[a]), start_frame + int(a))

    def _add_run(self, site, time_fs, segment, start_frame) -> None:
        piece = self.pieces[-1] if self.pieces and self.pieces[-1].segment == segment else None
        if piece is None:
            n = self.n_centres
            piece = _Piece(segment, start_frame, float(time_fs[-1]), np.full(n, -1),
                           np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1),
                           np.full(n, np.nan))
            self.pieces.append(piece)
        piece.end_time = float(time_fs[-1])
        # committed site per frame: forward fill of the frames in a site, from the last state
        rows = np.vstack([piece.last_site[None, :], site])
        index = np.where(rows >= 0, np.arange(len(rows))[:, None], 0)
        index = np.maximum.accumulate(index, axis=0)
        committed = np.take_along_axis(rows, index, axis=0)
        new_first = (piece.first_site < 0) & (committed[-1] >= 0)
        if np.any(new_first):  # the first frame in a site of each nucleus that had none
            first_row = np.argmax(committed[1:] >= 0, axis=0)
            piece.first_site[new_first] = committed[1:][first_row, np.arange(self.n_centres)][
                new_first]
            piece.first_time[new_first] = time_fs[first_row[new_first]]
        before, after = committed[:-1], committed[1:]
        frame, centre = np.nonzero((before >= 0) & (after != before))
        order = np.lexsort((frame, centre))  # hops of each nucleus in time order
        frame, centre = frame[order], centre[order]
        t_hop = time_fs[frame]
        self.hops.add(self._class(before[frame, centre]) * self.n_classes
                      + self._class(after[frame, centre]))
        self.centre_hops.add(centre)
        # residences: between consecutive hops of one nucleus (within and across chunks)
        same = np.r_[False, centre[1:] == centre[:-1]] if len(centre) else np.zeros(0, bool)
        start = piece.last_change[centre].copy()
        start[same] = t_hop[np.flatnonzero(same) - 1]
        complete = np.isfinite(start)
        klass = self._class(before[frame, centre])
        duration = t_hop - start
        self.residence.add(klass[complete], duration[complete])
        self.class_time.add(klass[complete], duration[complete])
        if len(centre):
            no_first = ~np.isfinite(piece.first_change[centre]) & ~same
            piece.first_change[centre[no_first]] = t_hop[no_first]
            last = np.r_[centre[1:] != centre[:-1], True]
            piece.last_change[centre[last]] = t_hop[last]
        piece.last_site = committed[-1].copy()


@dataclass(frozen=True)
class HopStatistics:
    """Site dynamics of one system (identical on every rank)."""

    hop_counts: np.ndarray
    """(n_classes, n_classes) hops from class a (row) to class b (column)."""
    class_time_fs: np.ndarray
    """(n_classes,) time nuclei spent committed to each class (fs)."""
    rate_per_ps: np.ndarray
    """(n_classes, n_classes) hop rate from a to b: hops / time in a (1/ps)."""
    rate_err_per_ps: np.ndarray
    """(n_classes, n_classes) counting error sqrt(hops) / time in a (1/ps); 1 / time in a,
    an upper bound of the rate, where no hop was seen."""
    residence_mean_fs: np.ndarray
    """(n_classes,) mean complete residence time per class (fs; NaN: none complete)."""
    residence_stderr_fs: np.ndarray
    """(n_classes,) its standard error (fs; NaN with fewer than two)."""
    residence_count: np.ndarray
    """(n_classes,) complete residences per class."""
    centre_hops: np.ndarray
    """(n_centres,) hops of every nucleus."""

    @property
    def mean_hops(self) -> float:
        """Hops per nucleus."""
        return float(np.mean(self.centre_hops)) if len(self.centre_hops) else 0.0


def _join(pieces: list[_Piece], counter: HopCounter, segment_end: dict) -> None:
    """Add the hops and residences across piece boundaries (every rank, same pieces)."""
    by_segment: dict[int, list[_Piece]] = {}
    for piece in sorted(pieces, key=lambda p: (p.segment, p.start_frame)):
        by_segment.setdefault(piece.segment, []).append(piece)
    n = counter.n_centres
    for seg, chain in by_segment.items():
        site = np.full(n, -1)
        since = np.full(n, np.nan)  # start of the current residence; NaN: segment start
        for piece in chain:
            seen = piece.first_site >= 0
            fresh = seen & (site < 0)
            site[fresh] = piece.first_site[fresh]
            hop = seen & (site >= 0) & (piece.first_site != site)
            if np.any(hop):  # a hop at the piece boundary
                c = np.flatnonzero(hop)
                counter.hops.add(counter._class(site[c]) * counter.n_classes
                                 + counter._class(piece.first_site[c]))
                counter.centre_hops.add(c)
                _end_residence(counter, chain, site, since, c, piece.first_time[c])
                site[c] = piece.first_site[c]
                since[c] = piece.first_time[c]
            inner = np.isfinite(piece.first_change)
            if np.any(inner):  # the residence that the piece's first inner hop ends
                c = np.flatnonzero(inner)
                _end_residence(counter, chain, site, since, c, piece.first_change[c])
                site[c] = piece.last_site[c]
                since[c] = piece.last_change[c]
        # censored at the segment's end
        c = np.flatnonzero(site >= 0)
        start = np.where(np.isfinite(since[c]), since[c], _seg_start(chain, c))
        counter.class_time.add(counter._class(site[c]), segment_end[seg] - start)


def _end_residence(counter: HopCounter, chain: list[_Piece], site, since, c, t_end) -> None:
    """The stays of nuclei `c` in their current sites end at `t_end`: complete ones (begun by
    a hop) count as residences, those begun at the segment's start only as time in the class."""
    klass = counter._class(site[c])
    done = np.isfinite(since[c])
    start = np.where(done, since[c], _seg_start(chain, c))
    counter.residence.add(klass[done], (t_end - start)[done])
    counter.class_time.add(klass, t_end - start)


def _seg_start(chain: list[_Piece], centres: np.ndarray) -> np.ndarray:
    """Time each nucleus was first seen in a site in this segment."""
    first = np.full(len(centres), np.nan)
    for piece in chain:
        t = piece.first_time[centres]
        first = np.where(np.isnan(first), t, first)
    return first


def finish_hops(ctx, counter: HopCounter) -> HopStatistics:
    """Join every rank's pieces, reduce the counts (collective) and derive rates.

    Every rank must call it with a counter over its own frames (in time order).
    """
    pieces = gather_items(ctx, counter.pieces)
    own = (counter.hops, counter.residence, counter.class_time, counter.centre_hops)
    reduce_moments(ctx, *own)  # inner hops of every rank; the joins are the same everywhere
    segment_end: dict[int, float] = {}
    for piece in pieces:
        segment_end[piece.segment] = max(segment_end.get(piece.segment, -np.inf), piece.end_time)
    _join(pieces, counter, segment_end)
    hop_counts = counter.hops.count.reshape(counter.n_classes, counter.n_classes)
    class_time = counter.class_time.sum
    with np.errstate(invalid="ignore", divide="ignore"):
        per_ps = np.where(class_time > 0, 1e3 / np.where(class_time > 0, class_time, 1), np.nan)
        rate = hop_counts * per_ps[:, None]
        rate_err = np.where(hop_counts > 0, np.sqrt(hop_counts), 1.0) * per_ps[:, None]
        count, total, total_sq = counter.residence.count, counter.residence.sum, \
            counter.residence.sum_sq
        mean = np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)
        var = np.where(count > 1, (total_sq - count * mean ** 2) / np.where(count > 1, count - 1,
                                                                            1), np.nan)
        stderr = np.where(count > 1, np.sqrt(np.clip(var, 0, None) / np.where(count > 1, count,
                                                                              1)), np.nan)
    return HopStatistics(hop_counts.astype(np.int64), class_time, rate, rate_err, mean, stderr,
                         count.astype(np.int64), counter.centre_hops.count.astype(np.int64))
