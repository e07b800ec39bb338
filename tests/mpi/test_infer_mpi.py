"""The infer stage under mpirun -n 2 (and -n 1): every rank's chunks land in frame order and
equal a serial prediction; a lost chunk is recomputed alone."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.stages.infer import infer_shifts
from jobs.shiftmodels.nnmr import FoldModel, ShiftEnsemble
from jobs.shiftmodels.soap import SoapFeaturizer
from schemas.infer import InferSpec
from schemas.system import SystemSpec

N_FRAMES = 7


@pytest.fixture
def shared_tmp(tmp_path_factory):
    comm = MPI.COMM_WORLD
    path = str(tmp_path_factory.mktemp("infer")) if comm.rank == 0 else None
    return comm.bcast(path, root=0)


def _ensemble(featurizer: SoapFeaturizer) -> ShiftEnsemble:
    rng = np.random.default_rng(11)
    n = featurizer.n_features
    models = []
    for _ in range(3):
        fold = FoldModel([rng.normal(0, n ** -0.5, (n, 6)).astype(np.float32),
                          rng.normal(0, 0.4, (6, 1)).astype(np.float32)],
                         [np.zeros(6, np.float32), np.zeros(1, np.float32)],
                         np.zeros(n, np.float32), np.full(n, 0.02, np.float32), 1700.0, 300.0)
        models.append(fold.folded())
    return ShiftEnsemble(models, {"soap": featurizer.settings()})


def test_sharded_infer_equals_serial_and_resumes(shared_tmp, shared_data):
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    frames = ase.io.read(shared_data / "p6322-dev.extxyz", f":{N_FRAMES}", parallel=False)
    path = f"{shared_tmp}/frames.extxyz"
    if ctx.rank == 0:
        ase.io.write(path, frames, format="extxyz", parallel=False)
    ctx.comm.Barrier()
    featurizer = SoapFeaturizer(["Na", "Mg", "Mn", "O"])
    ensemble = _ensemble(featurizer)
    spec = InferSpec(trajectories={"p6322": path}, chunk_frames=2)
    systems = [SystemSpec(name="p6322", structure="x")]
    with RunStore(f"{shared_tmp}/s.h5", ctx) as store:
        result = infer_shifts(spec, systems, ctx, store, ensemble=ensemble)
        assert result.frames_computed == N_FRAMES
        shifts = store.read("/infer/p6322/shift_ppm")
        positions = store.read("/infer/p6322/centre_positions_a")
        ctx.comm.Barrier()  # every rank has read before rank 0 spoils a chunk
        if ctx.rank == 0:  # lose chunk 1 (frames 2, 3)
            store.write_rows("/infer/p6322/chunk_done", 1, np.zeros(1, np.uint8))
            store.write_rows("/infer/p6322/shift_ppm", 2, np.zeros((2, 16), np.float32))
        store.flush()
        ctx.comm.Barrier()
        again = infer_shifts(spec, systems, ctx, store, ensemble=ensemble)
        resumed = store.read("/infer/p6322/shift_ppm")
        assert store.attrs("/infer/p6322")["n_done"] == N_FRAMES
    assert again.frames_computed == 2
    mean, _ = ensemble.predict(featurizer.features(frames))
    np.testing.assert_allclose(shifts, mean.reshape(N_FRAMES, 16), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(resumed, shifts)
    np.testing.assert_array_equal(positions, np.stack([f.positions[:16] for f in frames]))
