"""Benchmark of the infer stage: frames/s of read + SOAP + predict + reduce, and peak memory.

Run at 1 and 2 ranks (OMPI_* variables as in the Makefile)::

    mpirun -n 1 .venv/bin/python benchmarks/bench_infer.py --frames 5000
    mpirun -n 2 .venv/bin/python benchmarks/bench_infer.py --frames 5000

Frames: the shared P2-NMMO frames (both stackings), jittered (Gaussian, --jitter-a) and
written as one md trajectory into a scratch store (`/md/bench/r000`, unwrapped by random
whole cell vectors, as an md trajectory is). Model: --model (a trained store, GPR or NN-NMR),
else the shipped default shift model (the GPR model, jobs/data/gpr-p2-nmmo.h5) when it exists,
else (or with --paper-size / --folds N) a random ensemble of N folds x 3 x 512 on 6660 SOAP
features (the paper's size is 5 folds) - the cost of a prediction does not depend on the
weights. Compare models as ratios in one session: `--model jobs/data/nnmr-p2-nmmo.h5` for the
shipped NN-NMR ensemble.

The machine's OpenBLAS kernel choice matters for predict: OPENBLAS_CORETYPE=Haswell (AVX2)
reaches ~120 GFLOP/s single-core float32 here, the auto-detected SkylakeX (AVX-512) kernel ~235;
the JSON records which one ran.

Measured in one run, every rank at once (so under the same load):
1. the infer stage on a small trajectory (--frames / 10) and on the full one: frames/s (all
   ranks), then the reduce: an Allreduce of every rank's partial sums of its rows (mean shift);
2. peak RSS per rank after the small and after the full trajectory (flat memory: equal);
3. a per-frame loop in the style of the paper's published code (featurise one frame with
   SOAP, predict it with each fold model in turn) on --loop-frames frames per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.shiftmodels.registry import load_shift_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _openblas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ",".join(f"{i.get('internal_api')}:{i.get('architecture')}"
                        for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        return "unknown"


def make_frames(n_frames: int, jitter_a: float, seed: int):
    """Jittered copies of the shared frames: numbers, positions (n, 88, 3), cells (n, 3, 3)."""
    import ase.io

    data = ROOT.parent / "shared" / "data" / "p2-nmmo"
    frames = (ase.io.read(data / "p63mcm-dev.extxyz", ":", parallel=False)
              + ase.io.read(data / "p6322-dev.extxyz", ":", parallel=False))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(frames), n_frames)
    cells = np.stack([frames[i].cell.array for i in pick])
    positions = np.stack([frames[i].positions for i in pick])
    positions += rng.normal(0.0, jitter_a, positions.shape)
    images = rng.integers(-1, 2, positions.shape)
    positions += np.einsum("fai,fij->faj", images, cells)
    return frames[0].numbers, positions, cells


def paper_size_folds(n_features: int, seed: int, n_folds: int = 5, width: int = 512,
                     depth: int = 3):
    """Random fold models of the paper's size (weights do not change the cost)."""
    from jobs.shiftmodels.nnmr import FoldModel

    rng = np.random.default_rng(seed)
    widths = [n_features] + [width] * depth + [1]
    folds = []
    for _ in range(n_folds):
        kernels = [rng.normal(0, a ** -0.5, (a, b)).astype(np.float32)
                   for a, b in zip(widths[:-1], widths[1:])]
        biases = [np.zeros(b, np.float32) for b in widths[1:]]
        folds.append(FoldModel(kernels, biases, np.zeros(n_features, np.float32),
                               np.ones(n_features, np.float32), 1700.0, 400.0))
    return folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--chunk-frames", type=int, default=256)
    parser.add_argument("--loop-frames", type=int, default=100)
    parser.add_argument("--jitter-a", type=float, default=0.05)
    parser.add_argument("--paper-size", action="store_true",
                        help="a random 5 x 3x512 ensemble even when a shipped model exists")
    parser.add_argument("--folds", type=int, default=None,
                        help="a random N x 3x512 ensemble (1: the shipped model's size)")
    parser.add_argument("--soap-kernel", default="auto", choices=["auto", "numba", "dscribe"],
                        help="infer.soap_kernel of the stage run (the paper-style loop always "
                             "uses dscribe)")
    parser.add_argument("--model", default=None,
                        help="a trained store (GPR or NN-NMR); default the shipped default "
                             "shift model (jobs/data/gpr-p2-nmmo.h5)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the figures here (rank 0)")
    args = parser.parse_args()

    from engine.context import RankContext, mpi_environment_defaults

    mpi_environment_defaults()  # as `dynshift run` does, before MPI_Init
    from mpi4py import MPI

    from engine.store import RunStore
    from jobs.shiftmodels.nnmr import ShiftEnsemble, write_fold_model
    from jobs.shiftmodels.predictors import fast_predictor
    from jobs.shiftmodels.soap import SoapFeaturizer
    from jobs.shiftmodels.registry import featurizer_for
    from jobs.stages.infer import SHIPPED_MODEL, infer_shifts
    from schemas.infer import InferSpec
    from schemas.system import SystemSpec

    ctx = RankContext.from_comm(MPI.COMM_WORLD)
    workdir = args.workdir or (tempfile.mkdtemp(prefix="bench-infer-") if ctx.is_root else None)
    workdir = Path(ctx.comm.bcast(workdir, root=0))
    store_path = workdir / f"bench-{ctx.size}.h5"
    if ctx.is_root and store_path.exists():
        store_path.unlink()
    ctx.comm.Barrier()

    n_small = max(args.frames // 10, args.chunk_frames)
    with RunStore(store_path, ctx) as store:
        # ---- input: md-shaped trajectories and a model (collective puts, rank 0 writes) ----
        numbers, positions, cells = make_frames(args.frames, args.jitter_a, seed=2022)
        for name, count in (("small", n_small), ("full", args.frames)):
            store.put(f"/md/{name}/numbers", numbers)
            store.put(f"/md/{name}/r000/positions_a", positions[:count], unit="angstrom")
            store.put(f"/md/{name}/r000/cell_a", cells[:count], unit="angstrom")
            store.put(f"/md/{name}/r000/time_fs", 10.0 * np.arange(count), unit="fs")
            store.set_attrs(f"/md/{name}/r000", n_saved=count)
        loop_frames = positions[:args.loop_frames].copy()
        loop_cells = cells[:args.loop_frames].copy()
        del positions, cells
        n_folds = args.folds or 5
        if args.model is not None:
            ensemble = load_shift_model(Path(args.model))
            model = str(args.model)
        elif SHIPPED_MODEL.exists() and not args.paper_size and args.folds is None:
            ensemble = load_shift_model(SHIPPED_MODEL)
            model = f"shipped {SHIPPED_MODEL.name}"
        else:
            featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"])
            for k, fold in enumerate(paper_size_folds(featurizer.n_features, seed=1,
                                                      n_folds=n_folds)):
                write_fold_model(store, f"/train/folds/{k}", fold)
            store.set_attrs("/train", soap=featurizer.settings())
            store.flush()
            ensemble = load_shift_model(store)
            model = f"random, {n_folds} fold(s) x 3 x 512"
        featurizer = featurizer_for(ensemble, args.soap_kernel)
        soap_kernel = featurizer.array_kernel()
        network = isinstance(ensemble, ShiftEnsemble)
        if network:
            widths = [k.shape[1] for k in ensemble._rest[0][0]] if ensemble._rest else []
            what = f"{ensemble.n_models} models, hidden {ensemble._widths[0]}+{widths}"
        else:
            what = f"GPR, {ensemble.form}, {ensemble.n_features} features"
        ctx.log(f"bench: {ctx.size} rank(s), {ctx.cores} core(s) each, model {model} "
                f"({what}), {args.frames} frames, SOAP by {soap_kernel}")
        store.flush()
        rss_start = _peak_rss_mib()

        # ---- 1. the infer stage + reduce --------------------------------------------------
        spec = InferSpec(chunk_frames=args.chunk_frames, soap_kernel=args.soap_kernel)
        figures = {}
        for name in ("small", "full"):
            ctx.comm.Barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            infer_shifts(spec, [SystemSpec(name=name, structure="x")], ctx, store,
                         ensemble=ensemble)
            rows = ctx.block(store.shape(f"/infer/{name}/shift_ppm")[0])
            mine = store.read(f"/infer/{name}/shift_ppm", np.s_[rows.start:rows.stop])
            partial = np.array([mine.sum(dtype=np.float64), mine.size], dtype=np.float64)
            total = np.zeros(2)
            ctx.comm.Allreduce(partial, total, op=MPI.SUM)
            elapsed = time.perf_counter() - start
            cpu_s = ctx.comm.gather(time.process_time() - cpu_start, root=0)
            n = store.shape(f"/infer/{name}/shift_ppm")[0]
            figures[name] = {"frames": n, "seconds": elapsed, "frames_per_s": n / elapsed,
                             "mean_shift_ppm": total[0] / total[1],
                             "cpu_s_per_rank": cpu_s,
                             # what idle dedicated cores would give: the ranks run side by
                             # side, so all frames take the slowest rank's CPU seconds
                             "frames_per_cpu_s_all_ranks": (
                                 float(n / max(cpu_s)) if ctx.is_root else None),
                             "peak_rss_mib": ctx.comm.gather(_peak_rss_mib(), root=0)}

        # ---- 3. the paper's style: one frame at a time, one model at a time ----------------
        from ase import Atoms

        folded = [((ensemble._first_kernel[:, a:b], *ensemble._rest[m][0]),
                   (ensemble._first_bias[a:b], *ensemble._rest[m][1]))
                  for m, (a, b) in enumerate(zip(np.cumsum([0] + ensemble._widths[:-1]),
                                                 np.cumsum(ensemble._widths)))] \
            if network else []
        kernels0 = [np.ascontiguousarray(k[0]) for k, _ in folded]
        ctx.comm.Barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        for positions_a, cell_a in zip(loop_frames, loop_cells):
            frame = Atoms(numbers=numbers, positions=positions_a, cell=cell_a, pbc=True)
            features = featurizer.features([frame])
            if not network:  # a GPR model: one call per frame
                ensemble.predict(features)
                continue
            predictions = []
            for (kernels, biases), first in zip(folded, kernels0):
                hidden = features
                for i, (kernel, bias) in enumerate(zip((first, *kernels[1:]), biases)):
                    hidden = hidden @ kernel + bias
                    if i < len(biases) - 1:
                        hidden = np.maximum(hidden, 0.0)
                predictions.append(hidden[:, 0])
            np.mean(predictions, axis=0)
        loop_rate = len(loop_frames) / (time.perf_counter() - start)
        loop_rates = ctx.comm.gather(loop_rate, root=0)
        loop_cpu_rates = ctx.comm.gather(len(loop_frames) / (time.process_time() - cpu_start),
                                         root=0)

        # stage split: SOAP alone and predict alone on one chunk (rank 0's view)
        start = time.process_time()
        features = featurizer.features_arrays(numbers, loop_frames, loop_cells)
        soap_ms = 1e3 * (time.process_time() - start) / len(loop_frames)
        start = time.process_time()
        featurizer_for(ensemble, "dscribe").features_arrays(numbers, loop_frames, loop_cells)
        dscribe_ms = 1e3 * (time.process_time() - start) / len(loop_frames)
        start = time.process_time()
        ensemble.predict(features)
        numpy_ms = 1e3 * (time.process_time() - start) / len(loop_frames)
        predictor = fast_predictor(ensemble, ctx.cores)  # what the stage predicts with
        predictor.predict(features)  # TensorFlow traces its function for this row count
        start = time.process_time()
        predictor.predict(features)
        predict_ms = 1e3 * (time.process_time() - start) / len(loop_frames)
        split = ctx.comm.gather((soap_ms, predict_ms, numpy_ms, dscribe_ms), root=0)

    if ctx.is_root:
        result = {"ranks": ctx.size, "cores_per_rank": ctx.cores, "model": model,
                  "chunk_frames": args.chunk_frames, "infer": figures,
                  "peak_rss_before_mib": rss_start,
                  "paper_style_loop_frames_per_s_per_rank": loop_rates,
                  "paper_style_loop_frames_per_s_all_ranks": float(np.sum(loop_rates)),
                  "paper_style_loop_frames_per_cpu_s_per_rank": loop_cpu_rates,
                  "soap_kernel": soap_kernel,
                  "soap_cpu_ms_per_frame_per_rank": [s[0] for s in split],
                  "soap_dscribe_cpu_ms_per_frame_per_rank": [s[3] for s in split],
                  "predict_cpu_ms_per_frame_per_rank": [s[1] for s in split],
                  "predictor": type(predictor).__name__,
                  "predict_numpy_openblas_cpu_ms_per_frame_per_rank": [s[2] for s in split],
                  "load_average": os.getloadavg(),
                  "openblas": _openblas_kernel()}
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        store_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
