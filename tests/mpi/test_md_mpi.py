"""The md stage under mpirun -n 2 (and -n 1): 2 systems x 2 replicas, round robin over ranks."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.md import md_tasks, run_replicas
from schemas.md import MdSpec
from schemas.system import SystemSpec


def test_two_systems_two_replicas_over_the_ranks(shared_tmp):
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    systems = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm"),
               SystemSpec(name="p6322", structure="builtin:p2-nmmo-p6322")]
    spec = MdSpec(replicas=2, temperature_k=300.0, equilibration_steps=100, frames=12,
                  save_every_steps=5, chunk_frames=5, friction_per_fs=0.05)
    with RunStore(f"{shared_tmp}/md.h5", ctx) as store:
        result = run_replicas(spec, systems, ctx, store, seed=3)
        ctx.comm.Barrier()
        assert result.summary()["trajectories"] == 4
        mine = [t.group for i, t in enumerate(md_tasks(systems, 2)) if i % ctx.size == ctx.rank]
        # round robin: rank r takes tasks r, r + size, ... (uneven at 3 ranks: 2, 1, 1)
        assert len(mine) == len(range(ctx.rank, 4, ctx.size))
        assert ctx.comm.allreduce(len(mine)) == 4
        temperatures, first_positions = [], []
        for system in ("mcm", "p6322"):
            assert store.read(f"/md/{system}/numbers").tolist()[:17] == [11] * 16 + [12]
            for replica in ("r000", "r001"):
                group = f"/md/{system}/{replica}"
                attrs = store.attrs(group)
                assert attrs["n_saved"] == 12 and attrs["save_interval_fs"] == 5.0
                assert attrs["timestep_fs"] == 1.0
                assert np.allclose(store.read(f"{group}/time_fs"), 5.0 * np.arange(1, 13))
                assert store.shape(f"{group}/positions_a") == (12, 88, 3)
                assert np.isfinite(store.read(f"{group}/potential_energy_ev")).all()
                temperatures.append(store.read(f"{group}/temperature_k").mean())
                first_positions.append(store.read(f"{group}/positions_a", 0))
    # NVT near the target after a short, strongly damped equilibration
    assert 0.75 * 300 < np.mean(temperatures) < 1.25 * 300, temperatures
    # the replicas are independent trajectories
    assert not np.allclose(first_positions[0], first_positions[1])
