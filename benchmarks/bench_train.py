"""Benchmark of the train stage: SOAP featurisation frames/s and Horovod training samples/s.

    .venv/bin/python benchmarks/bench_train.py --ranks 1 2 [--frames 200] [--epochs 4]

launches ``mpirun -n R`` of itself for every R (ONE thread per rank, so the ranks, not the
threads, scale) and prints one JSON line per rank count plus the speed-up of training samples/s
over the first rank count. Target (issue 3): >= 1.6x at 2 ranks. Figures: docs/nnmr.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "p2-nmmo" / "p63mcm-dev.extxyz"
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "OMP_NUM_THREADS": "1"}


def worker(n_frames: int, epochs: int, batch_size: int, result: str) -> None:
    """One rank count: featurise `n_frames` frames (sharded), train on their rows."""
    sys.path.insert(0, str(ROOT))
    from engine.context import RankContext, limit_threads, mpi_environment_defaults

    mpi_environment_defaults()  # as `dynshift run` does, before MPI_Init
    from mpi4py import MPI

    limit_threads(1)  # one thread per rank at every rank count: the ranks scale, not threads
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    ctx.cores = 1
    import numpy as np

    from jobs.frames import read_labelled_frames
    from jobs.shiftmodels.nnmr_training import train_model
    from jobs.shiftmodels.rows import centre_rows, gather_features
    from jobs.shiftmodels.soap import SoapFeaturizer
    from schemas.shift import ShiftSpec
    from schemas.train import TrainSpec

    frames = read_labelled_frames(DATA)[:n_frames]
    featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"], "Na")
    ctx.comm.Barrier()
    start = time.perf_counter()
    features = gather_features(featurizer, frames, ctx)
    soap_s = time.perf_counter() - start
    y = centre_rows(frames, "Na", ShiftSpec()).shift_ppm
    n_val = len(y) // 10
    # the first epoch includes tf.function tracing: the median of the later epochs counts
    spec = TrainSpec(epochs=1 + epochs, patience_epochs=1 + epochs, batch_size=batch_size)
    model = train_model(features[n_val:], y[n_val:], features[:n_val], y[:n_val], spec, ctx, 1)
    epoch_s = float(np.median(model.curves["epoch_s"][1:]))
    samples_per_s = (len(y) - n_val) / epoch_s
    if ctx.is_root:
        Path(result).write_text(json.dumps({"ranks": ctx.size, "frames": n_frames, "soap_frames_per_s":
                          round(n_frames / soap_s, 1), "train_rows": len(y) - n_val,
                          "batch_size": batch_size, "train_samples_per_s":
                          round(samples_per_s, 1)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.frames, args.epochs, args.batch_size, args.worker)
        return 0
    import tempfile

    results = []
    for ranks in args.ranks:
        result = Path(tempfile.mkdtemp()) / "result.json"
        command = ["mpirun", "-n", str(ranks), sys.executable, __file__, "--worker", str(result),
                   "--frames", str(args.frames), "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size)]
        subprocess.run(command, env={**os.environ, **MPI_ENV}, capture_output=True, check=True)
        line = result.read_text()
        results.append(json.loads(line))
        print(line, flush=True)
    base = results[0]["train_samples_per_s"]
    for result in results[1:]:
        print(f"training speed-up {result['ranks']} vs {results[0]['ranks']} ranks: "
              f"{result['train_samples_per_s'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
