"""The md stage under mpirun -n 2 (and -n 1): 2 systems x 2 replicas, round robin over ranks."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.layouts.md import md_tasks
from jobs.stages.md import run_replicas
from schemas.md import MdSpec
from schemas.system import SystemSpec


def test_two_systems_two_replicas_over_the_ranks(shared_tmp):
    ctx = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    systems = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm"),
               SystemSpec(name="p6322", structure="builtin:p2-nmmo-p6322")]
    spec = MdSpec(replicas=2, temperature_k=300.0, equilibration_steps=300, frames=12,
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
    # NVT near the target after a short, strongly damped equilibration (300 steps: the ideal
    # pattern relaxes by ~3.5 eV into the basin, heat the thermostat must remove first)
    assert 0.75 * 300 < np.mean(temperatures) < 1.25 * 300, temperatures
    # the replicas are independent trajectories
    assert not np.allclose(first_positions[0], first_positions[1])


def _perturbed_model(source, target, scale: float, seed: int) -> None:
    """A copy of a frozen DP model whose first fitting layers are scaled by 1 + scale * N(0, 1)
    per weight (a second model of the same cost; forces differ by ~0.003 eV/A at 0.02)."""
    from jobs.deepmd import import_deepmd_tf

    import_deepmd_tf()
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(source.read_bytes())
    rng = np.random.default_rng(seed)
    for node in graph.node:
        if node.op == "Const" and node.name.startswith("layer_0_type_") \
                and node.name.endswith("/matrix"):
            weights = tf.make_ndarray(node.attr["value"].tensor)
            changed = weights * (1 + scale * rng.standard_normal(weights.shape))
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(changed.astype(weights.dtype)))
    target.write_bytes(graph.SerializeToString())


def test_deviations_are_the_same_at_any_rank_count(shared_tmp):
    """md's force deviations at n ranks equal those of one rank; analyze's reduction over
    the ranks equals the fraction of the stored array."""
    from jobs.layouts.md import md_trajectories
    from jobs.stages.analyze import model_deviation_summary
    from schemas.potential import SHIPPED_MODEL

    world = RankContext.from_comm(MPI.COMM_WORLD, set_threads=False)
    extra = shared_tmp / "perturbed.pb"
    if world.is_root:
        _perturbed_model(SHIPPED_MODEL, extra, 0.05, seed=1)
    world.comm.Barrier()
    systems = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm")]
    spec = MdSpec(replicas=3, equilibration_steps=4, frames=4, save_every_steps=2,
                  chunk_frames=2, deviation_models=[extra])
    with RunStore(f"{shared_tmp}/many.h5", world) as store:
        run_replicas(spec, systems, world, store, seed=5)
        world.comm.Barrier()
        md = md_trajectories(store, "mcm")
        devi = np.concatenate([md.model_devi_f_ev_a(r) for r in md.replicas])
        trust_hi = float(np.median(devi))
        for replica in md.replicas:
            store.set_attrs(replica.group, trust_hi_ev_a=trust_hi)
        summary = model_deviation_summary(world, store, "mcm")
    assert np.isfinite(devi).all() and devi.shape == (12,) and (devi > 0).all()
    assert summary["deviation_frames"] == 12
    assert summary["fraction_above_trust_hi"] == np.mean(devi > trust_hi)
    assert summary["max_devi_f_ev_a_max"] == devi.max()
    if world.is_root:  # the same md on one rank
        alone = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
        with RunStore(f"{shared_tmp}/one.h5", alone) as store:
            run_replicas(spec, systems, alone, store, seed=5)
            md = md_trajectories(store, "mcm")
            one = np.concatenate([md.model_devi_f_ev_a(r) for r in md.replicas])
        assert np.array_equal(one, devi), (one, devi)
    world.comm.Barrier()
