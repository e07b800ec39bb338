"""Benchmarks of the GPR shift model (jobs/shiftmodels/gpr.py) on the shared P2-NMMO frames (docs/gpr.md).

Three measurements, each printed as one JSON line per result (serial: one process; the
threads are OMP_NUM_THREADS):

``cv``      frame-level k-fold CV (the train stage's split, stream ``train.folds``) of a grid
            of (zeta, lambda, M) at one SOAP setting; RMSE, R2, NLPD, calibration::

    .venv/bin/python benchmarks/bench_gpr.py cv --r-cut 8.5 --n-max 10 --zeta 6 12 \\
        --regularisation 1e-5 1e-4 --n-sparse 1000 2000

``curve``   learning curve: a frame split (test frames never seen), RMSE on the test frames
            vs the number of labelled training frames, random selection vs uncertainty-driven
            selection (greedy batches: the frames of the pool whose nuclei have the largest
            mean predicted variance under the model of the frames chosen so far)::

    .venv/bin/python benchmarks/bench_gpr.py curve --r-cut 8.5 --n-max 10 --zeta 12 \\
        --regularisation 1e-5 --n-sparse 2000 --sizes 25 50 100 200 400

            ``--curves random reduction``: greedy V-optimal selection instead
            (:func:`jobs.shiftmodels.gpr.variance_reduction_picks`, one frame at a time, at
            ``--selection-regularisation``; ``--selection-zeta Z``: under the exact GP of the
            kernel ``(x . y)^Z``, :func:`jobs.shiftmodels.gpr.kernel_reduction_picks`); ``--no-tune --seed
            S`` for other splits.

``nnmr-curve``  the same split for NN-NMR: random selection, one network per size; or
            (``--nnmr-uncertainty``) uncertainty-driven, by the spread of 2 networks::

    .venv/bin/python benchmarks/bench_gpr.py nnmr-curve --r-cut 5.5 --sizes 25 50 100 200 400 600

``speed``   per frame (16 Na): SOAP (the compiled kernel when it checks) and predict of the
            shipped NN-NMR ensemble (jobs/data/nnmr-p2-nmmo.h5, its own 5.5 A SOAP) beside
            the GPR model's weight-space form (zeta 1, ``--sketch-rows``) and sparse forms
            (``--n-sparse``) at the given SOAP setting, same process, and their ratios::

    .venv/bin/python benchmarks/bench_gpr.py speed --r-cut 8.5 --n-max 10 --n-sparse 1000 2000

SOAP rows are cached as ``.npy`` under ``--cache`` (default /tmp/dynshift-gpr-cache), keyed by
the SOAP settings, so the grids do not recompute them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jobs.shiftmodels.registry import load_shift_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "p2-nmmo"


def load_data(args):
    """Frames, rows (shift, frame, atom) and SOAP rows of the 800 shared frames (cached)."""
    from jobs.frames import read_labelled_frames
    from jobs.shiftmodels.rows import centre_rows
    from jobs.shiftmodels.soap import SoapFeaturizer
    from schemas.shift import ShiftSpec

    paths = args.frames or [DATA / "p63mcm-dev.extxyz", DATA / "p6322-dev.extxyz"]
    frames = [frame for path in paths for frame in read_labelled_frames(path)]
    rows = centre_rows(frames, "Na", ShiftSpec())
    featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"], "Na", args.r_cut, args.sigma,
                                args.n_max, args.l_max)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = f"soap_{args.r_cut:g}_{args.sigma:g}_{args.n_max}_{args.l_max}"
    if args.frames:  # other frames than the shared ones: keyed by their files too
        import hashlib
        key += "_" + hashlib.sha1(repr([(str(Path(p).resolve()), Path(p).stat().st_mtime_ns)
                                        for p in args.frames]).encode()).hexdigest()[:12]
    path = cache / f"{key}.npy"
    soap_ms = None
    if path.exists():
        features = np.load(path)
    else:
        started = time.perf_counter()
        features = featurizer.features(frames)
        soap_ms = 1e3 * (time.perf_counter() - started) / len(frames)
        np.save(path, features)
    return frames, rows, featurizer, features, soap_ms


def spec_of(args):
    from schemas.train import GprSpec

    return GprSpec(zeta=args.zeta, regularisation=args.regularisation, n_sparse=args.n_sparse,
                   sparse_selection=args.selection, variance_sketch_rows=args.sketch_rows)


def run_cv(args) -> None:
    from engine.seeds import SeedStreams
    from jobs.shiftmodels import gpr
    from jobs.shiftmodels.rows import frame_folds

    frames, rows, _, features, _ = load_data(args)
    fold_of_row = frame_folds(len(frames), args.folds, args.seed)[rows.frame]
    cv = gpr.cross_validate(features, rows.shift_ppm, fold_of_row, spec_of(args),
                            SeedStreams(args.seed), None, log=lambda m: print(m, flush=True))
    columns = cv.curve.arrays()
    for g in range(len(cv.grid)):
        row = {key: float(value[g]) for key, value in columns.items()}
        row.update(r_cut_a=args.r_cut, sigma_a=args.sigma, n_max=args.n_max, l_max=args.l_max,
                   folds=args.folds)
        # out-of-fold mean shift per stacking vs DFT (the shared files: 400 frames each)
        for name, first in () if args.frames else (("p63mcm", 0), ("p6322", 400)):
            mask = (rows.frame >= first) & (rows.frame < first + 400)
            row[f"mean_shift_error_{name}_ppm"] = float(
                cv.predictions_ppm[g][mask].mean() - rows.shift_ppm[mask].mean())
        print(json.dumps({"cv": row}), flush=True)
    best = cv.best("nlpd")
    print(json.dumps({"best_by_nlpd": cv.grid[best], "rmse_ppm": cv.curve.rmse_ppm[best],
                      "seconds": cv.seconds}), flush=True)


def run_curve(args) -> None:
    from engine.seeds import SeedStreams
    from jobs.shiftmodels import gpr
    from jobs.shiftmodels.metrics import regression_metrics
    from jobs.shiftmodels.rows import frame_folds

    frames, rows, _, features, _ = load_data(args)
    spec = spec_of(args)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(frames))
    test_frames = order[:args.test_frames]
    pool = order[args.test_frames:]
    test_rows = np.flatnonzero(np.isin(rows.frame, test_frames))
    seeds = SeedStreams(args.seed)
    fixed = (args.zeta[0], args.regularisation[0], args.n_sparse[0])

    def tuned(chosen_frames):
        """(zeta, lambda, M) by 5-fold CV over the chosen frames alone (the stage's protocol;
        the test frames are never looked at), or the first of each list with --no-tune."""
        if not args.tune:
            return fixed
        chosen_frames = np.asarray(chosen_frames)
        train_rows = np.flatnonzero(np.isin(rows.frame, chosen_frames))
        local = {int(f): i for i, f in enumerate(chosen_frames)}
        fold_of_frame = frame_folds(len(chosen_frames), args.folds, args.seed)
        fold_of_row = fold_of_frame[[local[int(f)] for f in rows.frame[train_rows]]]
        cv = gpr.cross_validate(features[train_rows], rows.shift_ppm[train_rows], fold_of_row,
                                spec, seeds)
        return cv.grid[cv.best(args.select_by)]

    def score(chosen_frames, point):
        zeta, lam, m = point
        train_rows = np.flatnonzero(np.isin(rows.frame, chosen_frames))
        started = time.perf_counter()
        model = gpr.fit(features, rows.shift_ppm, zeta, lam, min(m, len(train_rows)), 1.0,
                        spec, seeds, rows=train_rows)
        seconds = time.perf_counter() - started
        mean, _ = model.predict(features[test_rows])
        return model, regression_metrics(rows.shift_ppm[test_rows], mean), seconds

    def report(curve, size, point, metrics, seconds):
        print(json.dumps({"curve": curve, "frames": size, "zeta": point[0],
                          "regularisation": point[1], "n_sparse": point[2], **metrics,
                          "fit_s": seconds}), flush=True)

    if "random" in args.curves:
        for size in args.sizes:
            point = tuned(pool[:size])
            _, metrics, seconds = score(pool[:size], point)
            report("random", size, point, metrics, seconds)
    if "reduction" in args.curves:
        # greedy V-optimal: one frame at a time, the one whose labels most reduce the summed
        # posterior variance of the pool given the frames chosen so far (the linear-kernel
        # GP at the lambda tuned at the previous size; jobs.shiftmodels.gpr.variance_reduction_picks)
        chosen = list(pool[:args.sizes[0]])
        point = tuned(chosen)
        pool_rows = np.flatnonzero(np.isin(rows.frame, pool))
        for size in args.sizes:
            if len(chosen) < size:
                started = time.perf_counter()
                chosen_rows = np.flatnonzero(np.isin(rows.frame, chosen))
                lam = args.selection_regularisation or point[1]
                if args.selection_zeta > 1:  # the exact GP of that polynomial kernel
                    chosen.extend(gpr.kernel_reduction_picks(
                        features[pool_rows], rows.frame[pool_rows], features[chosen_rows],
                        args.selection_zeta, lam, size - len(chosen), exclude=chosen))
                else:
                    gram, _, _ = gpr.linear_statistics(features, rows.shift_ppm, chosen_rows)
                    chol = gpr.solve_linear(gram, np.zeros(len(gram)), lam).chol
                    del gram
                    chosen.extend(gpr.variance_reduction_picks(
                        features[pool_rows], rows.frame[pool_rows], chol, lam,
                        size - len(chosen), exclude=chosen))
                print(json.dumps({"picked": size, "select_s": time.perf_counter() - started}),
                      flush=True)
            point = tuned(chosen)
            _, metrics, seconds = score(np.asarray(chosen), point)
            report("reduction", size, point, metrics, seconds)
    if "uncertainty" not in args.curves:
        return
    # uncertainty-driven: start from the first sizes[0] random frames, then add the pool
    # frames of largest mean predicted variance, a batch at a time, up to each size (the
    # hyperparameters: those tuned at the previous size)
    chosen = list(pool[:args.sizes[0]])
    point = tuned(chosen)
    for size in args.sizes:
        while len(chosen) < size:
            model, _, _ = score(np.asarray(chosen), point)
            rest = np.setdiff1d(pool, chosen)
            rest_rows = np.isin(rows.frame, rest)
            _, std = model.predict(features[rest_rows])
            per_frame = np.bincount(rows.frame[rest_rows], weights=std.astype(np.float64) ** 2,
                                    minlength=len(frames))[rest]
            batch = max(1, min(size - len(chosen), int(np.ceil(args.batch_fraction *
                                                                len(chosen)))))
            chosen.extend(rest[np.argsort(-per_frame, kind="stable")[:batch]].tolist())
        point = tuned(chosen)
        _, metrics, seconds = score(np.asarray(chosen), point)
        report("uncertainty", size, point, metrics, seconds)


def run_nnmr_curve(args) -> None:
    """The learning curve of NN-NMR on the same frame split (random selection): one network
    per size (the train section's defaults: 3 x 512, 300 epochs, patience 50, 10 % of the
    chosen frames for early stopping), scored on the 200 test frames; SOAP of ``--r-cut``."""
    from mpi4py import MPI

    from engine.context import RankContext
    from jobs.shiftmodels.metrics import regression_metrics
    from jobs.shiftmodels.nnmr_training import train_model
    from schemas.train import TrainSpec

    frames, rows, _, features, _ = load_data(args)
    spec = TrainSpec(soap_r_cut_a=args.r_cut, soap_n_max=args.n_max, soap_l_max=args.l_max)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(frames))
    test_rows = np.flatnonzero(np.isin(rows.frame, order[:args.test_frames]))
    pool = order[args.test_frames:]
    ctx = RankContext.from_comm(MPI.COMM_WORLD)

    def networks(chosen, members):
        """`members` networks (seeds differ) on the chosen frames, 10 % for early stopping."""
        n_val = max(1, int(round(spec.validation_fraction * len(chosen))))
        val_rows = np.flatnonzero(np.isin(rows.frame, chosen[:n_val]))
        train_rows = np.flatnonzero(np.isin(rows.frame, chosen[n_val:]))
        return [train_model(features[train_rows], rows.shift_ppm[train_rows],
                            features[val_rows], rows.shift_ppm[val_rows], spec, ctx,
                            args.seed + len(chosen) + 1000 * m,
                            log_prefix=f"nnmr curve {len(chosen)}.{m}") for m in range(members)]

    def report(curve, chosen, models, seconds):
        mean = np.mean([np.asarray(m.predict_ppm(features[test_rows]), np.float64).ravel()
                        for m in models], axis=0)
        print(json.dumps({"curve": curve, "frames": len(chosen), "r_cut_a": args.r_cut,
                          "networks": len(models),
                          **regression_metrics(rows.shift_ppm[test_rows], mean),
                          "train_s": seconds}), flush=True)

    if not args.nnmr_uncertainty:
        for size in args.sizes:
            started = time.perf_counter()
            models = networks(pool[:size], 1)
            report("nnmr random", pool[:size], models, time.perf_counter() - started)
        return
    # uncertainty-driven: 2 networks per step; the pool frames whose nuclei the two disagree
    # on most (mean squared spread) join, doubling at most per step, up to each size
    chosen = list(pool[:args.sizes[0]])
    models, trained_on, started = None, -1, time.perf_counter()
    for size in args.sizes:
        while True:
            if trained_on != len(chosen):
                started = time.perf_counter()
                models, trained_on = networks(np.asarray(chosen), 2), len(chosen)
            if len(chosen) >= size:
                break
            rest = np.setdiff1d(pool, chosen)
            rest_rows = np.isin(rows.frame, rest)
            spread = np.var([m.predict_ppm(features[rest_rows]) for m in models], axis=0)
            per_frame = np.bincount(rows.frame[rest_rows], weights=np.ravel(spread),
                                    minlength=len(frames))[rest]
            batch = min(size - len(chosen), len(chosen))
            chosen.extend(rest[np.argsort(-per_frame, kind="stable")[:batch]].tolist())
        report("nnmr uncertainty", chosen, models, time.perf_counter() - started)


def _best_ms(call, repeats: int = 5) -> float:
    call()
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def run_speed(args) -> None:
    from jobs.shiftmodels.gpr import GprShiftModel
    from jobs.shiftmodels.predictors import fast_predictor
    from jobs.shiftmodels.soap import SoapFeaturizer
    from jobs.shiftmodels.registry import featurizer_for

    shipped = load_shift_model(ROOT / "jobs" / "data" / "nnmr-p2-nmmo.h5")
    frames = __import__("ase.io", fromlist=["read"]).read(DATA / "p63mcm-dev.extxyz", ":32")
    numbers = frames[0].numbers
    positions = np.stack([a.positions for a in frames])
    cells = np.stack([np.asarray(a.cell) for a in frames])
    rng = np.random.default_rng(0)
    out = {}
    # NN-NMR: its own SOAP (5.5 A) and predict, per frame of 16 Na
    nn_featurizer = featurizer_for(shipped, "auto")
    out["nnmr_soap_kernel"] = nn_featurizer.array_kernel()
    out["nnmr_soap_ms_per_frame"] = _best_ms(
        lambda: nn_featurizer.features_arrays(numbers, positions, cells), 3) / len(frames)
    nn_rows = nn_featurizer.features_arrays(numbers, positions, cells)
    out["nnmr_numpy_ms_per_frame"] = _best_ms(lambda: shipped.predict(nn_rows)) / len(frames)
    fast = fast_predictor(shipped)
    if fast is not shipped:
        out["nnmr_tensorflow_ms_per_frame"] = _best_ms(lambda: fast.predict(nn_rows)) / \
            len(frames)
    nn_predict = out.get("nnmr_tensorflow_ms_per_frame", out["nnmr_numpy_ms_per_frame"])
    out["nnmr_infer_ms_per_frame"] = out["nnmr_soap_ms_per_frame"] + nn_predict
    # GPR: SOAP at the given settings, then each form
    featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"], "Na", args.r_cut, args.sigma,
                                args.n_max, args.l_max, kernel="auto")
    out["soap_kernel"] = featurizer.array_kernel()
    out["soap_ms_per_frame"] = _best_ms(
        lambda: featurizer.features_arrays(numbers, positions, cells), 3) / len(frames)
    rows = featurizer.features_arrays(numbers, positions, cells)
    n = featurizer.n_features
    weight_space = GprShiftModel(None, rng.standard_normal(n),
                                 rng.standard_normal((args.sketch_rows, n)).astype(np.float16),
                                 1, 1e-8, 1600.0, 40.0, {})
    out["gpr_weight_space_ms_per_frame"] = _best_ms(lambda: weight_space.predict(rows)) / \
        len(frames)
    out["gpr_weight_space_infer_ms_per_frame"] = out["soap_ms_per_frame"] + \
        out["gpr_weight_space_ms_per_frame"]
    out["gpr_weight_space_vs_nnmr_infer"] = out["gpr_weight_space_infer_ms_per_frame"] / \
        out["nnmr_infer_ms_per_frame"]
    out["gpr_weight_space_vs_nnmr_predict"] = out["gpr_weight_space_ms_per_frame"] / nn_predict
    for m in args.n_sparse:
        sparse = rows[rng.integers(len(rows), size=m)] + 0.0
        model = GprShiftModel(sparse, rng.standard_normal(m), rng.standard_normal((m, m)),
                              max(2, args.zeta[-1]), 1e-4, 1600.0, 10.0, {})
        out[f"gpr_M{m}_ms_per_frame"] = _best_ms(lambda: model.predict(rows)) / len(frames)
    out.update(r_cut_a=args.r_cut, n_features=n, sketch_rows=args.sketch_rows,
               frames_per_call=len(frames))
    print(json.dumps({"speed": out}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["cv", "curve", "nnmr-curve", "speed"])
    parser.add_argument("--r-cut", type=float, default=5.5)
    parser.add_argument("--frames", nargs="+", default=None,
                        help="labelled frame files (extxyz / OUTCARs) instead of the 800 "
                             "shared P2-NMMO frames (e.g. an oracle-labelled explored pool)")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--n-max", type=int, default=9)
    parser.add_argument("--l-max", type=int, default=9)
    parser.add_argument("--zeta", type=int, nargs="+", default=[12])
    parser.add_argument("--regularisation", type=float, nargs="+", default=[1e-5])
    parser.add_argument("--n-sparse", type=int, nargs="+", default=[2000])
    parser.add_argument("--selection", choices=["fps", "random"], default="fps")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--test-frames", type=int, default=200)
    parser.add_argument("--batch-fraction", type=float, default=0.25,
                        help="uncertainty selection: frames added per step / frames chosen")
    parser.add_argument("--curves", nargs="+", default=["random", "uncertainty"],
                        choices=["random", "uncertainty", "reduction"],
                        help="curve: selection rules to run (reduction: greedy V-optimal)")
    parser.add_argument("--selection-regularisation", type=float, default=None,
                        help="reduction: lambda of the selection's GP (default: the tuned one)")
    parser.add_argument("--selection-zeta", type=int, default=1,
                        help="kernel exponent of the reduction curve's GP (1: the linear "
                             "weight-space design; >= 2: jobs.shiftmodels.gpr.kernel_reduction_picks)")
    parser.add_argument("--cache", default="/tmp/dynshift-gpr-cache")
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                        help="curve: choose (zeta, lambda, M) by CV over the chosen frames at "
                             "each size (default); --no-tune: the first of each list")
    parser.add_argument("--select-by", choices=["nlpd", "rmse"], default="nlpd")
    parser.add_argument("--sketch-rows", type=int, default=256)
    parser.add_argument("--nnmr-uncertainty", action="store_true",
                        help="nnmr-curve: uncertainty-driven selection (2-network spread)")
    args = parser.parse_args(argv)
    from engine.failure import InputError

    try:
        {"cv": run_cv, "curve": run_curve, "nnmr-curve": run_nnmr_curve,
         "speed": run_speed}[args.mode](args)
    except InputError as exc:  # a bad --frames file: one line, exit 2
        print(f"bench_gpr: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
