"""The analyze stage: every statistic of the predicted shifts by collective reduction.

Per system, the frames of ``/infer/<system>`` are sharded over the ranks in contiguous blocks
(``ctx.block``) and read in chunks; each rank accumulates per-key partial sums
(:class:`engine.stats.BinnedMoments`) and ONE Allreduce adds them. Results (layout:
docs/analyze.md) go to ``/analyze/<system>``:

- the dynamic averaged shift with a block-averaging standard error (blocks in time, per
  replica) and its running average vs simulated time, total, per site class and per nucleus;
- shift histograms, total and per site class, on fixed bin edges;
- xy maps per interlayer slab: mean shift, its standard deviation and the Na density;
- sites found from the framework of frame 0 (:mod:`jobs.sites`): occupation fractions and
  site-centred mean shifts;
- the in-plane tracer diffusion coefficient from the MSD of unwrapped positions (md sources).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.context import RankContext
from engine.failure import InputError
from engine.progress import Progress
from engine.stages import StageInputs, StageResult
from engine.stats import (
    BinnedMoments,
    bin_index,
    block_average,
    blocking,
    fit_diffusion,
    gather_items,
    gather_rows,
    grid_index,
    integrated_correlation_time,
    loglog_slope,
    moments_mean_std,
    reduce_moments,
    running_average,
)
from engine.store import RunStore
from jobs.hops import HopCounter, HopStatistics, finish_hops
from jobs.layouts.analyze import GROUP as ANALYZE_GROUP, arrhenius_path
from jobs.layouts.infer import system_group as infer_group
from jobs.layouts.md import md_trajectories, thermostat_text
from jobs.sites import SiteSet, assign_sites, find_sites, nearest_site_spacing_a
from schemas.analyze import AnalyzeSpec
from schemas.system import SystemSpec

DRIFT_DATASET = "framework_drift_a"
"""Optional (n_frames, 3) dataset of the source group: mean displacement of the framework
cations from frame 0 (A), subtracted from the target positions before site assignment."""


@dataclass(frozen=True)
class Timeline:
    """The frames' places in time: replica segments, blocks and running-average bins."""

    is_md: bool
    """True for md trajectories (replica >= 0 and finite times): time axis in fs, MSD."""
    time: np.ndarray
    """(n_frames,) time of each frame: fs for md, the frame index for a file."""
    segment: np.ndarray
    """(n_frames,) replica segment of each frame (contiguous frames of one replica)."""
    segment_bounds: list[tuple[int, int]]
    """(start, stop) frame range of each segment."""
    block: np.ndarray
    """(n_frames,) global block index (segment * blocks_per_replica + block in segment)."""
    n_blocks: int
    """Blocks in all (segments x blocks_per_replica)."""
    time_bin: np.ndarray
    """(n_frames,) running-average time bin."""
    time_points: np.ndarray
    """(running_points,) right edge of each time bin (fs, or frame index)."""


def frame_timeline(time_fs, replica, spec: AnalyzeSpec) -> Timeline:
    """Segments, blocks and time bins of the frames from their time (fs) and replica ids.

    A segment is a run of consecutive frames with one replica id and increasing time; a file
    source (replica -1) is one segment, timed by frame index.
    """
    time_fs = np.asarray(time_fs, dtype=float)
    replica = np.asarray(replica, dtype=np.int64)
    n = len(time_fs)
    is_md = bool(n and np.all(replica >= 0) and np.all(np.isfinite(time_fs)))
    time = time_fs if is_md else np.arange(n, dtype=float)
    new_segment = np.zeros(n, dtype=bool)
    if n:
        new_segment[0] = True
        new_segment[1:] = (replica[1:] != replica[:-1]) | (np.diff(time) <= 0)
    starts = np.flatnonzero(new_segment)
    stops = np.append(starts[1:], n)
    segment = np.cumsum(new_segment) - 1
    per = spec.blocks_per_replica
    block = np.empty(n, dtype=np.int64)
    for s, (a, b) in enumerate(zip(starts, stops)):
        block[a:b] = s * per + (np.arange(b - a) * per) // (b - a)
    t_min, t_max = (float(time.min()), float(time.max())) if n else (0.0, 1.0)
    if t_max <= t_min:
        t_max = t_min + 1.0
    edges = np.linspace(t_min, t_max, spec.running_points + 1)
    time_bin = np.clip(np.searchsorted(edges, time, side="right") - 1, 0,
                       spec.running_points - 1)
    return Timeline(is_md, time, segment, list(zip(starts.tolist(), stops.tolist())), block,
                    len(starts) * per, time_bin, edges[1:])


@dataclass(frozen=True)
class SystemAnalysis:
    """Headline numbers of one system (the full results are in the store)."""

    mean_shift_ppm: float
    mean_shift_stderr_ppm: float
    class_names: tuple[str, ...]
    occupation: np.ndarray
    site_shift_ppm: np.ndarray
    d_cm2_s: float
    converged: bool = False
    verdict: str = ""


def _read_sites(spec: AnalyzeSpec, system: SystemSpec, ctx: RankContext, store: RunStore,
                source: str) -> SiteSet:
    """Sites of frame 0, found on every rank from the same reads (deterministic; the same
    reads on every rank keep the parallel-HDF5 metadata caches alike)."""
    try:
        return find_sites(store.read(f"{source}/frame0_numbers"),
                          store.read(f"{source}/frame0_positions_a"),
                          store.read(f"{source}/cell_a", 0), system.target_species,
                          spec.framework_species, spec.site_radius_a, spec.layer_gap_a)
    except InputError as exc:
        raise InputError(f"system {system.name} ({source}): {exc}") from None


def _check_source(system: SystemSpec, store: RunStore, source: str) -> tuple[int, int]:
    needed = ("shift_ppm", "centre_positions_a", "cell_a", "time_fs", "replica",
              "frame0_numbers", "frame0_positions_a")
    missing = [name for name in needed if not store.exists(f"{source}/{name}")]
    if missing:
        raise InputError(f"system {system.name}: the store has no {source}/"
                         f"{{{', '.join(missing)}}}; run the infer stage first")
    n_frames, n_centres = store.shape(f"{source}/shift_ppm")
    if n_frames == 0:
        raise InputError(f"system {system.name}: {source}/shift_ppm holds no frames")
    for name, shape in (("centre_positions_a", (n_frames, n_centres, 3)),
                        ("cell_a", (n_frames, 3, 3)), ("time_fs", (n_frames,)),
                        ("replica", (n_frames,))):
        if store.shape(f"{source}/{name}") != shape:
            raise InputError(f"system {system.name}: {source}/{name} has shape "
                             f"{store.shape(f'{source}/{name}')}, expected {shape}")
    return n_frames, n_centres


def analyze_system(spec: AnalyzeSpec, system: SystemSpec, ctx: RankContext, store: RunStore,
                   source: str | None = None, target: str | None = None) -> SystemAnalysis:
    """Analyse the shifts of one system: read `source`, reduce, write `target` (collective).

    Parameters
    ----------
    spec
        The analyze settings.
    system
        The system (its name and target species).
    ctx, store
        Rank context and run store (every rank of ``ctx`` calls this).
    source, target
        Groups to read and write; default ``/infer/<name>`` and ``/analyze/<name>``.

    Returns
    -------
    SystemAnalysis
        Headline numbers (identical on every rank).
    """
    source = source or infer_group(system.name)
    target = target or f"{ANALYZE_GROUP}/{system.name}"
    n_frames, n_centres = _check_source(system, store, source)
    sites = _read_sites(spec, system, ctx, store, source)
    timeline = frame_timeline(store.read(f"{source}/time_fs"), store.read(f"{source}/replica"),
                              spec)
    has_drift = store.exists(f"{source}/{DRIFT_DATASET}")
    has_std = store.exists(f"{source}/shift_std_ppm")
    if not has_drift:
        ctx.log(f"analyze {system.name}: no {source}/{DRIFT_DATASET}; sites assume a framework "
                "that does not drift")
    n_classes = sites.n_classes
    low, high = spec.histogram_range_ppm
    n_hist = int(np.ceil((high - low) / spec.histogram_bin_ppm - 1e-9))
    edges_ppm = low + spec.histogram_bin_ppm * np.arange(n_hist + 1)
    sums = _shift_pass(spec, system, ctx, store, source, target, sites, timeline, has_drift,
                       has_std, n_frames, n_centres, edges_ppm)
    blocks, ensemble_std, dynamics = sums.blocks, sums.ensemble_std, sums.dynamics
    frame_count, frame_sum = sums.frame_count, sums.frame_sum

    # ---- finish (pure numpy on identical reduced sums, every rank) ------------------------
    overall = block_average(blocks.count, blocks.sum)
    n_samples = max(overall.n_samples, 1)
    block_count, block_sum, block_sum_sq = sums.class_blocks.reshaped()
    class_count, class_sum, class_sum_sq = (block_count.sum(0), block_sum.sum(0),
                                            block_sum_sq.sum(0))
    class_mean, class_std = moments_mean_std(class_count, class_sum, class_sum_sq)
    mean_blocking = blocking(frame_count.sum(1), frame_sum.sum(1), timeline.segment,
                             spec.blocking_min_blocks)
    class_blocking = [blocking(frame_count[:, k], frame_sum[:, k], timeline.segment,
                               spec.blocking_min_blocks) for k in range(n_classes)]
    occupation = class_count / n_samples
    model_std = (moments_mean_std(*ensemble_std.reshaped())[0] if has_std
                 else np.full(n_classes, np.nan))
    # the model's own uncertainty of a mean: the mean predicted sigma of its samples (NN-NMR:
    # the ensemble spread; GPR: the calibrated sigma). Model errors are correlated over
    # similar environments, so averaging does not reduce it: a bound, beside the blocking error
    model_sigma = (float(ensemble_std.sum.sum() / ensemble_std.count.sum())
                   if has_std and ensemble_std.count.sum() > 0 else float("nan"))

    diffusion = correlation = None
    if timeline.is_md:
        diffusion, correlation = _lag_pass(
            spec, ctx, store, source, target, timeline, has_drift, overall.mean,
            (float(blocks.count.sum()), float(blocks.sum_sq.sum())),
            nearest_site_spacing_a(sites, store.read(f"{source}/cell_a", 0)))
    converged, reasons = convergence_verdict(spec, timeline, dynamics, correlation,
                                             mean_blocking)
    verdict = "converged" if converged else "not converged: " + "; ".join(reasons)
    class_stderr = np.array([b.stderr if converged and b.plateau else np.nan
                             for b in class_blocking])
    mean_stderr = mean_blocking.stderr if converged and mean_blocking.plateau else float("nan")
    store.put(f"{target}/blocks/mean_shift_ppm", overall.block_means, unit="ppm",
              doc="mean shift of each time block (segment-major)")
    _put_sites(store, target, sites, sums.site_counts.count / n_frames, occupation, class_count,
               class_mean, class_std, class_stderr, model_std)
    _put_histogram(store, target, sites, sums.histogram, edges_ppm)
    _put_running(store, target, timeline, sums)
    _put_maps(store, target, source, sites, sums.maps, n_frames, spec.map_bins)

    d_cm2_s = diffusion.d_cm2_s if diffusion is not None and diffusion.diffusive else float("nan")
    if dynamics is not None:
        _put_dynamics(store, target, sites, dynamics, correlation)
    _put_blocking(store, target, mean_blocking)
    store.set_attrs(target, source=source, kind="md" if timeline.is_md else "file",
                    n_frames=n_frames, n_centres=n_centres,
                    n_segments=len(timeline.segment_bounds),
                    mean_shift_ppm=overall.mean, mean_shift_stderr_ppm=mean_stderr,
                    mean_shift_stderr_lower_bound_ppm=mean_blocking.stderr,
                    mean_shift_model_sigma_ppm=model_sigma,
                    n_blocks=overall.n_blocks, class_names=list(sites.class_names),
                    framework_drift_corrected=has_drift, d_cm2_s=d_cm2_s,
                    diffusive=bool(diffusion is not None and diffusion.diffusive),
                    converged=converged, verdict=verdict,
                    hops_per_nucleus=dynamics.mean_hops if dynamics is not None else float("nan"),
                    **escape_rate(dynamics),
                    time_span_fs=float(np.ptp(timeline.time)) if timeline.is_md else float("nan"),
                    ranks=ctx.size)
    store.flush()
    ctx.log(_summary_line(system, overall.mean, mean_stderr, verdict, sites, occupation,
                          class_mean, d_cm2_s, diffusion))
    return SystemAnalysis(overall.mean, mean_stderr, sites.class_names, occupation,
                          class_mean, d_cm2_s, converged, verdict)


def escape_rate(dynamics: HopStatistics | None) -> dict:
    """The rate at which a nucleus leaves its site class (1/ps): every hop between classes over
    the time committed to classes, with its counting error sqrt(hops) / time (hops are not
    independent: the Arrhenius fit scales this up when the temperatures scatter more)."""
    nan = float("nan")
    if dynamics is None:
        return {"escape_rate_per_ps": nan, "escape_rate_err_per_ps": nan}
    counts = np.asarray(dynamics.hop_counts, dtype=float)
    hops = float(counts.sum() - np.trace(counts))
    time_ps = float(np.sum(dynamics.class_time_fs)) / 1000.0
    if time_ps <= 0:
        return {"escape_rate_per_ps": nan, "escape_rate_err_per_ps": nan}
    return {"escape_rate_per_ps": hops / time_ps,
            "escape_rate_err_per_ps": max(np.sqrt(hops), 1.0) / time_ps}


@dataclass
class _ShiftSums:
    """What the pass over a system's shifts accumulates, reduced over the ranks (identical on
    every rank): the moments by key (:class:`engine.stats.BinnedMoments`), the per-frame class
    series and the hop statistics."""

    blocks: BinnedMoments
    """By time block."""
    class_blocks: BinnedMoments
    """By (time block, site class)."""
    running: BinnedMoments
    """By running-average time bin."""
    class_running: BinnedMoments
    """By (time bin, site class)."""
    centre_running: BinnedMoments
    """By (time bin, target nucleus)."""
    histogram: BinnedMoments
    """Counts by (site class, histogram bin); column 0: below the range, last: above."""
    maps: BinnedMoments
    """By (slab, bin along a, bin along b)."""
    site_counts: BinnedMoments
    """Counts by site."""
    ensemble_std: BinnedMoments
    """The model's spread by site class (empty without ``shift_std_ppm``)."""
    frame_count: np.ndarray
    """(n_frames, n_classes) samples per frame and class, every frame in frame order."""
    frame_sum: np.ndarray
    """(n_frames, n_classes) their shift sums."""
    dynamics: HopStatistics | None
    """Hop counts and rates (md sources), else None."""


def _shift_pass(spec: AnalyzeSpec, system: SystemSpec, ctx: RankContext, store: RunStore,
                source: str, target: str, sites: SiteSet, timeline: Timeline, has_drift: bool,
                has_std: bool, n_frames: int, n_centres: int,
                edges_ppm: np.ndarray) -> _ShiftSums:
    """The pass over the shifts (collective): every rank reads its block of frames in chunks,
    assigns sites, writes ``<target>/dynamics/site`` and accumulates; the sums are reduced."""
    n_classes, n_sites = sites.n_classes, len(sites.centres_frac)
    n_slabs, n_map, n_points = len(sites.layer_z_frac), spec.map_bins, spec.running_points
    n_hist = len(edges_ppm) - 1

    blocks = BinnedMoments(timeline.n_blocks)
    class_blocks = BinnedMoments((timeline.n_blocks, n_classes))
    running = BinnedMoments(n_points)
    class_running = BinnedMoments((n_points, n_classes))
    centre_running = BinnedMoments((n_points, n_centres))
    histogram = BinnedMoments((n_classes, n_hist + 2))  # column 0: below, last: above
    maps = BinnedMoments((n_slabs, n_map, n_map))
    site_counts = BinnedMoments(n_sites)
    ensemble_std = BinnedMoments(n_classes)
    accumulators = (blocks, class_blocks, running, class_running, centre_running, histogram,
                    maps, site_counts, ensemble_std)

    mine = ctx.block(n_frames)
    progress = Progress(ctx, f"analyze {system.name}", len(mine))
    centre_ids = np.arange(n_centres)
    store.require_group(target)
    for stale in ("dynamics", "msd"):  # a new analysis (other frames, or no md) starts clean
        store.delete(f"{target}/{stale}")
    site_name = f"{target}/dynamics/site"
    store.create_dataset(site_name, (n_frames, n_centres), dtype="i4",
                         chunks=(max(1, min(n_frames, 1 << 20 // max(n_centres, 1))), n_centres),
                         unit="site index", doc="site of every target nucleus in every frame "
                         "(sites/centres_frac; -1: in no site)")
    hops = HopCounter(sites.site_class, n_classes - 1, n_centres) if timeline.is_md else None
    frame_count = np.zeros((len(mine), n_classes))  # per frame and class: samples, shift sum
    frame_sum = np.zeros((len(mine), n_classes))
    for start in range(mine.start, mine.stop, spec.chunk_frames):
        stop = min(start + spec.chunk_frames, mine.stop)
        frames = slice(start, stop)
        shift = store.read(f"{source}/shift_ppm", frames).astype(np.float64)
        positions = store.read(f"{source}/centre_positions_a", frames).astype(np.float64)
        cells = store.read(f"{source}/cell_a", frames).astype(np.float64)
        if has_drift:
            positions = positions - store.read(f"{source}/{DRIFT_DATASET}", frames)[:, None, :]
        where = assign_sites(positions, cells, sites)
        valid = np.isfinite(shift)
        values = np.where(valid, shift, 0.0)
        frame_block = timeline.block[frames][:, None]
        frame_bin = timeline.time_bin[frames][:, None]

        def keys(flat):  # flat keys of valid samples only (-1 is ignored by add)
            return np.where(valid, flat, -1)

        blocks.add(keys(np.broadcast_to(frame_block, shift.shape)), values)
        class_blocks.add(keys(frame_block * n_classes + where.site_class), values)
        running.add(keys(np.broadcast_to(frame_bin, shift.shape)), values)
        class_running.add(keys(frame_bin * n_classes + where.site_class), values)
        centre_running.add(keys(frame_bin * n_centres + centre_ids[None, :]), values)
        hist_bin = bin_index(values, edges_ppm) + 1  # 0: below the range
        histogram.add(keys(where.site_class * (n_hist + 2) + hist_bin))
        cell_key = grid_index(where.frac[..., 0], where.frac[..., 1], n_map, n_map)
        maps.add(keys(where.slab * n_map * n_map + cell_key), values)
        site_counts.add(keys(where.site))
        store.write_rows(site_name, start, where.site.astype(np.int32))
        if hops is not None:
            hops.add(where.site, timeline.time[frames], timeline.segment[frames], start)
        local = np.arange(stop - start)[:, None] * n_classes + where.site_class
        flat = np.where(valid, local, -1).ravel()
        inside = flat >= 0
        size = (stop - start) * n_classes
        rows = slice(start - mine.start, stop - mine.start)
        frame_count[rows] = np.bincount(flat[inside], minlength=size).reshape(-1, n_classes)
        frame_sum[rows] = np.bincount(flat[inside], weights=values.ravel()[inside],
                                      minlength=size).reshape(-1, n_classes)
        if has_std:
            spread = store.read(f"{source}/shift_std_ppm", frames).astype(np.float64)
            ensemble_std.add(keys(where.site_class), np.where(valid, spread, 0.0))
        progress.update(stop - start)
    progress.finish()
    reduce_moments(ctx, *accumulators)
    store.flush()
    frame_count = gather_rows(ctx, frame_count)  # the per-frame class series, in frame order
    frame_sum = gather_rows(ctx, frame_sum)
    dynamics = finish_hops(ctx, hops) if hops is not None else None
    return _ShiftSums(blocks, class_blocks, running, class_running, centre_running, histogram,
                      maps, site_counts, ensemble_std, frame_count, frame_sum, dynamics)


def _put_histogram(store: RunStore, target: str, sites: SiteSet, histogram: BinnedMoments,
                   edges_ppm: np.ndarray) -> None:
    """``<target>/histogram``: counts per site class and in all, and those out of range."""
    n_classes, n_hist = sites.n_classes, len(edges_ppm) - 1
    hist_count = histogram.count.reshape(n_classes, n_hist + 2)
    store.put(f"{target}/histogram/edges_ppm", edges_ppm, unit="ppm")
    store.put(f"{target}/histogram/counts", hist_count[:, 1:-1], unit="samples",
              doc="rows: site classes (sites/class_names)")
    store.put(f"{target}/histogram/total_counts", hist_count[:, 1:-1].sum(0), unit="samples")
    store.set_attrs(f"{target}/histogram", below=int(hist_count[:, 0].sum()),
                    above=int(hist_count[:, -1].sum()), class_names=list(sites.class_names))


def _put_running(store: RunStore, target: str, timeline: Timeline, sums: _ShiftSums) -> None:
    """``<target>/running``: the running averages, in all, per site class and per nucleus."""
    axis = "time_fs" if timeline.is_md else "frame_index"
    store.put(f"{target}/running/{axis}", timeline.time_points,
              unit="fs" if timeline.is_md else "frame")
    store.put(f"{target}/running/mean_shift_ppm",
              running_average(sums.running.count, sums.running.sum), unit="ppm")
    count, total, _ = sums.class_running.reshaped()
    store.put(f"{target}/running/class_shift_ppm", running_average(count, total), unit="ppm",
              doc="columns: site classes (sites/class_names)")
    count, total, _ = sums.centre_running.reshaped()
    store.put(f"{target}/running/centre_shift_ppm", running_average(count, total), unit="ppm",
              doc="columns: target nuclei (their running time average)")


def _put_maps(store: RunStore, target: str, source: str, sites: SiteSet, maps: BinnedMoments,
              n_frames: int, n_map: int) -> None:
    """``<target>/maps``: the xy maps per slab (mean shift, its spread, density, counts)."""
    map_count, map_sum, map_sum_sq = maps.reshaped()
    map_mean, map_std = moments_mean_std(map_count, map_sum, map_sum_sq)
    cell0 = store.read(f"{source}/cell_a", 0).astype(float)
    bin_area_a2 = abs(np.linalg.det(cell0[:2, :2])) / n_map ** 2
    store.put(f"{target}/maps/mean_shift_ppm", map_mean, unit="ppm")
    store.put(f"{target}/maps/std_shift_ppm", map_std, unit="ppm")
    store.put(f"{target}/maps/density_per_a2", map_count / (n_frames * bin_area_a2),
              unit="1/A^2")
    store.put(f"{target}/maps/count", map_count, unit="samples")
    store.set_attrs(f"{target}/maps", cell_a=cell0.tolist(),
                    slab_z_frac=_slab_mid(sites.layer_z_frac).tolist(),
                    doc="(slab, bin along a, bin along b); fractional bins of the frame-0 cell")


def _put_blocking(store: RunStore, target: str, mean_blocking) -> None:
    """The blocking analysis of the mean shift, under ``<target>/dynamics``."""
    store.set_attrs(f"{target}/dynamics", blocking_block_frames=mean_blocking.block_frames,
                    blocking_plateau=mean_blocking.plateau,
                    blocking_stderr_ppm=mean_blocking.stderr,
                    mean_correlation_frames=mean_blocking.correlation_frames)
    store.put(f"{target}/dynamics/blocking_sizes_frames", mean_blocking.block_sizes,
              unit="frames")
    store.put(f"{target}/dynamics/blocking_stderr_ppm", mean_blocking.stderrs, unit="ppm",
              doc="standard error of the mean shift at each block size")


def _summary_line(system: SystemSpec, mean_shift: float, mean_stderr: float, verdict: str,
                  sites: SiteSet, occupation, class_mean, d_cm2_s: float, diffusion) -> str:
    """The log line of a system's analysis: mean shift, verdict, occupations, D."""
    error = (f" +- {mean_stderr:.1f} ppm" if np.isfinite(mean_stderr) else " ppm")
    return (f"analyze {system.name}: mean shift {mean_shift:.1f}{error} ({verdict}); "
            + ", ".join(f"{name} {occ:.3f}" + (f" ({mean:.0f} ppm)" if np.isfinite(mean) else
                                               " (no samples)")
                        for name, occ, mean in zip(sites.class_names, occupation, class_mean))
            + (f"; D {d_cm2_s:.3g} cm2/s" if np.isfinite(d_cm2_s) else
               "; no D (not diffusive over this run)" if diffusion is not None else ""))


def convergence_verdict(spec: AnalyzeSpec, timeline: Timeline, dynamics: HopStatistics | None,
                        correlation, mean_blocking) -> tuple[bool, list[str]]:
    """Whether the means are dynamic averages, and in plain sentences why not.

    Converged (md sources): every nucleus hopped at least
    ``converged_min_hops_per_nucleus`` times, the single-nucleus shift correlation time was
    determined and every replica is ``converged_min_correlation_times`` of it long, and the
    blocking analysis of the mean reached its plateau. Frames from a file have no time: their
    error is the blocking one over the frame order, valid when it reached its plateau.
    """
    reasons = []
    if not mean_blocking.plateau:
        if not len(mean_blocking.block_sizes):
            reasons.append(f"too few frames for a blocking error (fewer than "
                           f"{spec.blocking_min_blocks})")
        else:
            reasons.append(f"the blocking error of the mean reaches no plateau within the block "
                           f"sizes the frames allow (up to {mean_blocking.block_sizes[-1]} "
                           f"frames, {spec.blocking_min_blocks} blocks or more)")
    if not timeline.is_md:
        return not reasons, reasons or []
    shortest_fs = min(float(timeline.time[b - 1] - timeline.time[a])
                      for a, b in timeline.segment_bounds)
    hops = dynamics.centre_hops
    if len(hops) and np.min(hops) < spec.converged_min_hops_per_nucleus:
        still = int(np.sum(hops < spec.converged_min_hops_per_nucleus))
        need = spec.converged_min_hops_per_nucleus
        did = "never hopped" if need <= 1 else f"hopped fewer than {need:g} times"
        reasons.append(f"{still} of {len(hops)} nuclei {did} (mean {dynamics.mean_hops:.2f} "
                       "hops per nucleus)")
    if correlation is None or not correlation.determined:
        longest = _time_text(correlation.window_fs) if correlation is not None else "-"
        reasons.append(f"the shift autocorrelation has not decayed within the longest lag "
                       f"({longest}): its correlation time exceeds what this run can measure")
    elif shortest_fs < spec.converged_min_correlation_times * correlation.tau_fs:
        reasons.append(f"the shortest replica ({_time_text(shortest_fs)}) is "
                       f"{shortest_fs / max(correlation.tau_fs, 1e-30):.1f} shift correlation "
                       f"times ({_time_text(correlation.tau_fs)}) long, fewer than "
                       f"{spec.converged_min_correlation_times:g}")
    return not reasons, reasons


def _time_text(t_fs: float) -> str:
    if not np.isfinite(t_fs):
        return "-"
    if t_fs >= 1e6:
        return f"{t_fs * 1e-6:.3g} ns"
    return f"{t_fs * 1e-3:.3g} ps"


def _put_dynamics(store: RunStore, target: str, sites: SiteSet, dynamics: HopStatistics,
                  correlation) -> None:
    group = f"{target}/dynamics"
    names = list(sites.class_names[:-1])
    store.put(f"{group}/hops_per_centre", dynamics.centre_hops, unit="hops")
    store.put(f"{group}/hop_counts", dynamics.hop_counts, unit="hops",
              doc="hops from class (row) to class (column); classes: class_names")
    store.put(f"{group}/class_time_fs", dynamics.class_time_fs, unit="fs",
              doc="time nuclei spent committed to each class")
    store.put(f"{group}/rate_per_ps", dynamics.rate_per_ps, unit="1/ps",
              doc="hop rate from class (row) to class (column): hops / time in the row class")
    store.put(f"{group}/rate_err_per_ps", dynamics.rate_err_per_ps, unit="1/ps",
              doc="counting error sqrt(hops) / time; 1 / time (an upper bound) without hops")
    store.put(f"{group}/residence_mean_fs", dynamics.residence_mean_fs, unit="fs")
    store.put(f"{group}/residence_stderr_fs", dynamics.residence_stderr_fs, unit="fs")
    store.put(f"{group}/residence_count", dynamics.residence_count, unit="residences",
              doc="complete residences (between two hops) per class")
    store.set_attrs(group, class_names=names, hops_total=int(dynamics.centre_hops.sum()),
                    hops_per_nucleus=dynamics.mean_hops,
                    shift_correlation_fs=correlation.tau_fs if correlation else float("nan"),
                    shift_correlation_determined=bool(correlation and correlation.determined),
                    shift_correlation_window_fs=(correlation.window_fs if correlation
                                                 else float("nan")))


def _slab_mid(layer_z_frac: np.ndarray) -> np.ndarray:
    upper = np.append(layer_z_frac[1:], layer_z_frac[0] + 1.0)
    return np.mod(0.5 * (layer_z_frac + upper), 1.0)


def _put_sites(store: RunStore, target: str, sites: SiteSet, site_occupation, occupation,
               samples, mean, std, stderr, model_std) -> None:
    group = f"{target}/sites"
    store.put(f"{group}/centres_frac", sites.centres_frac, unit="fractional")
    store.put(f"{group}/site_class", sites.site_class.astype(np.int32))
    store.put(f"{group}/site_slab", sites.site_layer.astype(np.int32))
    store.put(f"{group}/layer_z_frac", sites.layer_z_frac, unit="fractional")
    store.put(f"{group}/site_occupation", site_occupation, unit="nuclei per frame",
              doc="mean number of target nuclei inside each site's circle")
    store.put(f"{group}/occupation", occupation, unit="fraction",
              doc="fraction of all samples (frames x nuclei) in each class")
    store.put(f"{group}/samples", samples, unit="samples")
    store.put(f"{group}/shift_ppm", mean, unit="ppm", doc="site-centred mean shift")
    store.put(f"{group}/shift_std_ppm", std, unit="ppm", doc="spread of the shifts in a class")
    store.put(f"{group}/shift_stderr_ppm", stderr, unit="ppm",
              doc="block-averaging standard error of the site-centred mean")
    store.put(f"{group}/ensemble_std_ppm", model_std, unit="ppm",
              doc="mean predicted sigma of the shifts in a class (NN-NMR: ensemble spread; "
                  "GPR: calibrated sigma): the model's uncertainty of the class mean (a bound: "
                  "model errors are correlated, averaging does not reduce them)")
    store.set_attrs(group, class_names=list(sites.class_names), radius_a=sites.radius_a,
                    target_species=sites.target_species)


@dataclass(frozen=True)
class Diffusion:
    """The MSD fit and whether the MSD is diffusive over its window."""

    fit: object
    """engine.stats.DiffusionFit."""
    slope: float
    """log-log slope of the MSD over the fit window."""
    msd_end_a2: float
    """MSD at the end of the fit window (A^2)."""
    spacing_a: float
    """Shortest site spacing (A)."""
    diffusive: bool
    reason: str
    """Why not diffusive ("" when it is)."""

    @property
    def d_cm2_s(self) -> float:
        return self.fit.d_cm2_s


def msd_lags(shortest: int, spec: AnalyzeSpec) -> np.ndarray:
    """Lags (frames): ``msd_lags`` evenly spaced up to the longest, and the powers of two
    below it (the shift autocorrelation decays fastest at short lags)."""
    max_lag = int(min(shortest - 1, max(1, np.floor(spec.msd_max_lag_fraction * shortest))))
    even = np.round(np.linspace(1, max_lag, spec.msd_lags)).astype(int)
    powers = 2 ** np.arange(int(np.log2(max_lag)) + 1)
    return np.unique(np.r_[even, powers[powers <= max_lag]])


def _lag_pass(spec: AnalyzeSpec, ctx: RankContext, store: RunStore, source: str, target: str,
              timeline: Timeline, has_drift: bool, mean_shift: float,
              shift_moments: tuple[float, float], spacing_a: float):
    """The in-plane MSD and the shift autocorrelation by lag (origins sharded over ranks, one
    Allreduce): D where the MSD is diffusive, and the single-nucleus shift correlation time."""
    lengths = [b - a for a, b in timeline.segment_bounds]
    shortest = min(lengths)
    if shortest < 3:
        ctx.log("analyze: replicas shorter than 3 frames, no diffusion coefficient")
        return None, None
    steps = np.concatenate([np.diff(timeline.time[a:b]) for a, b in timeline.segment_bounds])
    dt_fs = float(np.median(steps))
    if np.max(np.abs(steps - dt_fs)) > 1e-3 * dt_fs:
        ctx.log("analyze: frames are not evenly spaced in time, no diffusion coefficient")
        return None, None
    lags = msd_lags(shortest, spec)
    msd = BinnedMoments(len(lags))
    acf = BinnedMoments(len(lags))
    positions_name = f"{source}/centre_positions_a"

    def in_plane(rows: slice) -> np.ndarray:
        xy = store.read(positions_name, rows)[..., :2].astype(np.float64)
        if has_drift:
            xy = xy - store.read(f"{source}/{DRIFT_DATASET}", rows)[:, None, :2]
        return xy

    def deviation(rows: slice) -> np.ndarray:  # NaN where a shift is missing
        return store.read(f"{source}/shift_ppm", rows).astype(np.float64) - mean_shift

    n_frames = len(timeline.time)
    mine = ctx.block(n_frames)
    for start in range(mine.start, mine.stop, spec.chunk_frames):
        stop = min(start + spec.chunk_frames, mine.stop)
        origin, origin_shift = in_plane(slice(start, stop)), deviation(slice(start, stop))
        counts, sums = np.zeros(len(lags)), np.zeros(len(lags))
        acf_counts, acf_sums = np.zeros(len(lags)), np.zeros(len(lags))
        for k, lag in enumerate(lags):
            end = min(stop + lag, n_frames)
            m = end - (start + lag)
            if m <= 0:
                continue
            later = in_plane(slice(start + lag, end))
            same = timeline.segment[start:start + m] == timeline.segment[start + lag:end]
            squared = ((later - origin[:m]) ** 2).sum(axis=2)[same]
            counts[k] = squared.size
            sums[k] = squared.sum()
            product = (deviation(slice(start + lag, end)) * origin_shift[:m])[same]
            product = product[np.isfinite(product)]
            acf_counts[k] = product.size
            acf_sums[k] = product.sum()
        msd.add_sums(counts, sums)
        acf.add_sums(acf_counts, acf_sums)
    reduce_moments(ctx, msd, acf)
    with np.errstate(invalid="ignore", divide="ignore"):
        msd_a2 = np.where(msd.count > 0, msd.sum / np.where(msd.count > 0, msd.count, 1), np.nan)
        covariance = np.where(acf.count > 0, acf.sum / np.where(acf.count > 0, acf.count, 1),
                              np.nan)
    n_valid, sum_sq_shift = shift_moments
    variance = max(sum_sq_shift / max(n_valid, 1.0) - mean_shift ** 2, 0.0)
    rho = covariance / variance if variance > 0 else np.full(len(lags), np.nan)
    lag_fs = lags * dt_fs
    correlation = integrated_correlation_time(lag_fs, rho, spec.correlation_window_c)
    window = spec.msd_fit_window_fs or (0.2 * lag_fs[-1], 0.8 * lag_fs[-1])
    fit = fit_diffusion(lag_fs, msd_a2, window, dimensions=2)
    slope = loglog_slope(lag_fs, msd_a2, window)
    inside = (lag_fs >= window[0]) & (lag_fs <= window[1]) & np.isfinite(msd_a2)
    msd_end = float(msd_a2[inside][-1]) if np.any(inside) else float("nan")
    floor_a2 = spec.diffusive_min_site_spacings * spacing_a ** 2
    reason = ""
    if not np.isfinite(fit.d_cm2_s):
        reason = "too few lags in the fit window"
    elif not abs(slope - 1.0) <= spec.diffusive_slope_tolerance:
        reason = (f"log-log slope of the MSD over the fit window {slope:.2f}, not within "
                  f"{spec.diffusive_slope_tolerance:g} of 1")
    elif not msd_end >= floor_a2:
        reason = (f"MSD at the window end {msd_end:.2f} A^2 is below "
                  f"{spec.diffusive_min_site_spacings:g} site spacing^2 ({floor_a2:.2f} A^2)")
    diffusion = Diffusion(fit, slope, msd_end, spacing_a, not reason, reason)
    store.put(f"{target}/msd/lag_fs", lag_fs, unit="fs")
    store.put(f"{target}/msd/msd_a2", msd_a2, unit="A^2", doc="in-plane (xy) MSD per nucleus")
    store.put(f"{target}/msd/samples", msd.count, unit="samples")
    store.set_attrs(f"{target}/msd", d_cm2_s=fit.d_cm2_s if not reason else float("nan"),
                    fitted_d_cm2_s=fit.d_cm2_s, slope_a2_fs=fit.slope_a2_fs,
                    intercept_a2=fit.intercept_a2, fit_window_fs=list(fit.window_fs),
                    fit_points=fit.n_points, dimensions=2, loglog_slope=slope,
                    site_spacing_a=spacing_a, diffusive=not reason,
                    not_diffusive_reason=reason)
    store.put(f"{target}/dynamics/shift_acf_lag_fs", lag_fs, unit="fs")
    store.put(f"{target}/dynamics/shift_acf", rho, unit="1",
              doc="normalised autocorrelation of the single-nucleus shift (deviation from the "
                  "system mean), averaged over nuclei and time origins")
    return diffusion, correlation


@dataclass(frozen=True)
class AnalyzeResult(StageResult):
    """Per system: the mean shift, its standard error and D where the data support one."""

    systems: tuple = ()
    """(name, mean_shift_ppm, stderr_ppm or None, d_cm2_s or None, converged) per system."""
    arrhenius: tuple = ()
    """(name, value) headline numbers of the Arrhenius fits (md.temperatures_k)."""

    def summary(self) -> dict:
        """``<system>_mean_shift_ppm``, ``<system>_stderr_ppm`` (converged systems only),
        ``<system>_converged`` and ``<system>_d_cm2_s`` (diffusive systems only)."""
        out = {}
        for name, mean, stderr, d_cm2_s, converged in self.systems:
            out[f"{name}_mean_shift_ppm"] = round(mean, 2)
            if stderr is not None:
                out[f"{name}_stderr_ppm"] = round(stderr, 2)
            out[f"{name}_converged"] = bool(converged)
            if d_cm2_s is not None:
                out[f"{name}_d_cm2_s"] = float(f"{d_cm2_s:.4g}")
        return {**out, **dict(self.arrhenius)}


def analyze_systems(spec: AnalyzeSpec, systems: list[SystemSpec], ctx: RankContext,
                    store: RunStore) -> AnalyzeResult:
    """Analyse every system of the manifest (collective); headline numbers per system."""
    rows = []
    for system in systems:
        with store.transaction():  # its results are many new datasets
            result = analyze_system(spec, system, ctx, store)
            thermostat = thermostat_text(store, system.name)
            if thermostat:
                store.set_attrs(f"{ANALYZE_GROUP}/{system.name}", thermostat=thermostat)
            deviation = model_deviation_summary(ctx, store, system.name)
            store.set_attrs(f"{ANALYZE_GROUP}/{system.name}", **deviation)
        if deviation["deviation_frames"]:
            ctx.log(f"analyze {system.name}: model deviation of {deviation['deviation_frames']} "
                    f"md frames: {100 * deviation['fraction_above_trust_hi']:.1f} % above "
                    f"trust_hi = {deviation['trust_hi_ev_a']:g} eV/A, largest "
                    f"{deviation['max_devi_f_ev_a_max']:.3g} eV/A")
        d_cm2_s = float(result.d_cm2_s) if np.isfinite(result.d_cm2_s) else None
        stderr = (float(result.mean_shift_stderr_ppm)
                  if np.isfinite(result.mean_shift_stderr_ppm) else None)
        rows.append((system.name, float(result.mean_shift_ppm), stderr, d_cm2_s,
                     result.converged))
    arrhenius = {}
    for base, members in _temperature_series(systems).items():
        with store.transaction():
            arrhenius.update(_put_arrhenius(ctx, store, base, members))
    return AnalyzeResult(tuple(rows), tuple(arrhenius.items()))


def _temperature_series(systems) -> dict[str, list]:
    """Per base system, its systems at two or more md temperatures (md.temperatures_k)."""
    series: dict[str, list] = {}
    for system in systems:
        if system.temperature_k is not None:
            series.setdefault(system.base_name, []).append(system)
    return {base: members for base, members in series.items()
            if len({m.temperature_k for m in members}) >= 2}


def _put_arrhenius(ctx: RankContext, store: RunStore, base: str, members) -> dict:
    """Arrhenius fits over the temperatures of `base`: the escape rate (every temperature with
    hops) and D (the diffusive ones only), into /analyze/arrhenius/<base>; headline numbers."""
    from engine.stats import arrhenius_fit

    temperatures = np.array([m.temperature_k for m in members], dtype=float)
    attrs = [store.attrs(f"{ANALYZE_GROUP}/{m.name}") for m in members]
    rate = np.array([a.get("escape_rate_per_ps", np.nan) for a in attrs], dtype=float)
    rate_err = np.array([a.get("escape_rate_err_per_ps", np.nan) for a in attrs], dtype=float)
    d = np.array([a.get("d_cm2_s", np.nan) for a in attrs], dtype=float)
    group = arrhenius_path(base)
    store.put(f"{group}/temperature_k", temperatures, unit="K")
    store.put(f"{group}/escape_rate_per_ps", rate, unit="1/ps")
    store.put(f"{group}/escape_rate_err_per_ps", rate_err, unit="1/ps")
    store.put(f"{group}/d_cm2_s", d, unit="cm2/s", doc="NaN where not diffusive")
    out, words = {}, []
    for key, values, errors, unit in (("hop", rate, rate_err, "1/ps"), ("d", d, None, "cm2/s")):
        try:
            fit = arrhenius_fit(temperatures, values, errors)
        except ValueError as exc:
            store.set_attrs(group, **{f"{key}_fit": f"none: {exc}"})
            words.append(f"{key}: no fit ({exc})")
            continue
        at_300, err_300 = fit.at(300.0)
        extrapolated = 300.0 < min(fit.temperatures_k) or 300.0 > max(fit.temperatures_k)
        store.set_attrs(group, **{
            f"{key}_fit": "ok", f"{key}_activation_ev": fit.activation_ev,
            f"{key}_activation_err_ev": fit.activation_err_ev,
            f"{key}_ln_prefactor": fit.ln_prefactor, f"{key}_ln_prefactor_err":
                fit.ln_prefactor_err, f"{key}_points": fit.n_points,
            f"{key}_chi2_reduced": fit.chi2_reduced, f"{key}_at_300k": at_300,
            f"{key}_at_300k_err": err_300, f"{key}_300k_extrapolated": extrapolated,
            f"{key}_unit": unit})
        out[f"{base}_{key}_activation_ev"] = float(f"{fit.activation_ev:.4g}")
        out[f"{base}_{key}_at_300k"] = float(f"{at_300:.4g}")
        words.append(f"{key}: E_a {fit.activation_ev:.3f} +- {fit.activation_err_ev:.3f} eV "
                     f"over {fit.n_points} temperatures, {at_300:.3g} +- {err_300:.2g} {unit} at "
                     f"300 K{' (extrapolated)' if extrapolated else ''}")
    ctx.log(f"analyze {base}: Arrhenius over {len(members)} md temperatures: "
            + "; ".join(words))
    return out


def model_deviation_summary(ctx: RankContext, store: RunStore, system: str) -> dict:
    """How many of the md frames of `system` the DP model ensemble trusts (collective).

    The force deviations md recorded (``MdTrajectories.model_devi_f_ev_a``) of every saved
    frame of every replica, sharded over the ranks in contiguous blocks of the frames
    (replicas concatenated) and reduced once.

    Returns
    -------
    dict
        ``deviation_frames`` (frames with a deviation), ``fraction_above_trust_hi``,
        ``fraction_below_trust_lo``, ``max_devi_f_ev_a_max`` (eV/A), ``trust_hi_ev_a`` and
        ``trust_lo_ev_a`` (eV/A); 0 and NaN when md recorded no deviation (no ensemble, or no
        md of `system`).
    """
    nan = float("nan")
    empty = {"deviation_frames": 0, "fraction_above_trust_hi": nan,
             "fraction_below_trust_lo": nan, "max_devi_f_ev_a_max": nan,
             "trust_hi_ev_a": nan, "trust_lo_ev_a": nan}
    try:
        trajectories = md_trajectories(store, system)
    except InputError:
        return empty
    replicas = [r for r in trajectories.replicas if trajectories.has_model_deviation(r)]
    trust = [trajectories.trust_ev_a(r) for r in replicas]
    if not replicas or None in trust:
        return empty
    trust_lo, trust_hi = trust[0]
    offsets = np.cumsum([0] + [r.n_saved for r in replicas])
    mine = ctx.block(int(offsets[-1]))
    count = above = below = 0
    largest = -np.inf
    for replica, first in zip(replicas, offsets[:-1]):
        lo, hi = max(mine.start, first), min(mine.stop, first + replica.n_saved)
        if lo >= hi:
            continue
        values = trajectories.model_devi_f_ev_a(replica, np.s_[lo - first:hi - first])
        values = values[np.isfinite(values)]
        count += values.size
        above += int(np.sum(values > trust_hi))
        below += int(np.sum(values < trust_lo))
        largest = max(largest, float(values.max())) if values.size else largest
    parts = gather_items(ctx, [(count, above, below, largest)])
    count, above, below = (sum(p[k] for p in parts) for k in range(3))
    largest = max(p[3] for p in parts)
    if count == 0:
        return {**empty, "trust_hi_ev_a": trust_hi, "trust_lo_ev_a": trust_lo}
    return {"deviation_frames": int(count), "fraction_above_trust_hi": above / count,
            "fraction_below_trust_lo": below / count, "max_devi_f_ev_a_max": largest,
            "trust_hi_ev_a": trust_hi, "trust_lo_ev_a": trust_lo}


def run(spec: AnalyzeSpec, inputs: StageInputs) -> AnalyzeResult:
    """Stage entry: statistics of every system's shifts into ``/analyze``."""
    return analyze_systems(spec, list(inputs.systems), inputs.ctx, inputs.store)


# ---- reader (the spectrum and report stages read /analyze through these) -------------------




