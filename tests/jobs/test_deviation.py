"""Model deviation of a DP ensemble: the definition, md's record of it, analyze and the report."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.failure import InputError
from engine.store import RunStore
from jobs.deepmd import deepmd_positions
from jobs.deviation import DeviationEnsemble
from jobs.layouts.md import md_trajectories
from jobs.stages.md import StoppedOnPurpose, run_replicas
from schemas.md import MdSpec
from schemas.potential import SHIPPED_MODEL, PotentialSpec
from schemas.system import SystemSpec

SYSTEMS = [SystemSpec(name="mcm", structure="builtin:p2-nmmo-p63mcm")]
SHORT = dict(replicas=1, equilibration_steps=5, frames=6, save_every_steps=2, chunk_frames=3)


@pytest.fixture(scope="session")
def second_model(tmp_path_factory, shared_data):
    """A second real DP model of the same elements: a tiny network, 50 steps of `dp train` on 5
    DFT frames (its forces differ from the shipped model's by ~1 eV/A)."""
    from jobs.dptrain import train_model

    folder = tmp_path_factory.mktemp("second-dp")
    frames = ase.io.read(shared_data / "p63mcm-dev.extxyz", ":5")
    ase.io.write(folder / "five.extxyz", frames)
    spec = PotentialSpec(frames=[folder / "five.extxyz"], holdout_fraction=0.0, steps=50,
                         embedding_neurons=[4, 8], axis_neurons=4, fitting_neurons=[8, 8],
                         sel=[20, 10, 20, 48], compress="never", train_threads=1)
    path, _ = train_model(spec, [frames], folder / "train", seed=3, threads=1,
                          log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def ctx():
    return RankContext.from_comm(MPI.COMM_SELF, set_threads=False)


def _frames(shared_data, n=3):
    return ase.io.read(shared_data / "p63mcm-dev.extxyz", f":{n}")


def test_deviation_equals_a_direct_numpy_computation(shared_data, second_model):
    from deepmd.infer import DeepPot

    frames = _frames(shared_data)
    numbers = frames[0].numbers
    positions = np.array([a.positions for a in frames])
    cells = np.array([a.cell.array for a in frames])
    forces = []
    for path in (SHIPPED_MODEL, second_model):
        model = DeepPot(str(path))
        types = [model.get_type_map().index(s) for s in frames[0].get_chemical_symbols()]
        forces.append([model.eval(deepmd_positions(p, c).reshape(1, -1), c.reshape(1, -1),
                                  types)[1][0] for p, c in zip(positions, cells)])
    forces = np.array(forces)  # (models, frames, atoms, 3)
    spread = forces - forces.mean(axis=0)
    per_atom = np.sqrt(np.mean(np.sum(spread ** 2, axis=-1), axis=0))  # (frames, atoms)
    ensemble = DeviationEnsemble.from_files([SHIPPED_MODEL, second_model])
    max_devi, avg_devi = ensemble.force_deviation(numbers, positions, cells)
    assert max_devi.shape == avg_devi.shape == (3,)
    # float32 networks: one frame at a time and a batch of frames differ by ~1e-7 eV/A
    assert np.allclose(max_devi, per_atom.max(axis=1), rtol=1e-5, atol=1e-6)
    assert np.allclose(avg_devi, per_atom.mean(axis=1), rtol=1e-5, atol=1e-6)
    # two models: the std over models of each component is half their difference
    half = 0.5 * np.linalg.norm(forces[0] - forces[1], axis=-1).max(axis=1)
    assert np.allclose(max_devi, half, rtol=1e-5)
    assert (max_devi > 0.1).all() and (avg_devi < max_devi).all()
    # unwrapped positions (whole cell vectors added) give the same deviation
    shifted = positions + cells[:, 0][:, None, :] - 2 * cells[:, 2][:, None, :]
    assert np.allclose(ensemble.force_deviation(numbers, shifted, cells)[0], max_devi,
                       rtol=1e-5, atol=1e-6)


def test_a_model_deviates_from_itself_by_exactly_zero(shared_data):
    frames = _frames(shared_data)
    args = (frames[0].numbers, [a.positions for a in frames], [a.cell.array for a in frames])
    twice = DeviationEnsemble.from_files([SHIPPED_MODEL, SHIPPED_MODEL])
    max_devi, avg_devi = twice.force_deviation(*args)
    assert max_devi.tolist() == [0.0] * 3 and avg_devi.tolist() == [0.0] * 3
    # three copies: numpy's mean of three equal numbers may round (a + a + a) / 3 != a
    thrice = DeviationEnsemble.from_files([SHIPPED_MODEL] * 3)
    assert np.all(thrice.force_deviation(*args)[0] < 1e-14)


def test_check_names_the_model_without_a_species(tmp_path):
    ensemble = DeviationEnsemble.from_files([SHIPPED_MODEL, SHIPPED_MODEL], ["md", "extra.pb"])
    ensemble.check(["Na", "Mn", "O"])
    with pytest.raises(InputError, match=r"species \['Li'\] unknown to the DP model md "
                                         r"\(its type map is \['Na', 'Mg', 'Mn', 'O'\]\)"):
        ensemble.check(["Na", "Li"])
    with pytest.raises(InputError, match="at least 2 DP models"):
        DeviationEnsemble.from_files([SHIPPED_MODEL])
    with pytest.raises(InputError, match=f"{tmp_path / 'gone.pb'} not found"):
        DeviationEnsemble.from_files([SHIPPED_MODEL, tmp_path / "gone.pb"])


def test_trust_levels_are_checked():
    spec = MdSpec()
    assert (spec.trust_lo_ev_a, spec.trust_hi_ev_a, spec.deviation_models) == (0.05, 0.15, [])
    with pytest.raises(ValueError, match="trust_lo_ev_a: must be smaller than trust_hi_ev_a"):
        MdSpec(trust_lo_ev_a=0.2, trust_hi_ev_a=0.1)
    with pytest.raises(ValueError, match="trust_hi_ev_a"):
        MdSpec(trust_hi_ev_a=0.0)


# ---- md, analyze, report ------------------------------------------------------------------
def _md(path, ctx, spec: MdSpec, **kwargs):
    with RunStore(path, ctx) as store:
        return run_replicas(spec, SYSTEMS, ctx, store, seed=7, **kwargs)


def _stored(path) -> dict:
    with RunStore(path, None, mode="r") as store:
        md = md_trajectories(store, "mcm")
        replica = md.replicas[0]
        return {"positions": md.positions_a(replica), "cells": md.cell_a(replica),
                "numbers": md.numbers, "devi": md.model_devi_f_ev_a(replica),
                "mean": md.model_devi_f_mean_ev_a(replica), "trust": md.trust_ev_a(replica),
                "attrs": store.attrs(replica.group)}


def test_md_records_the_deviation_of_every_saved_frame_and_analyze_reports_it(
        tmp_path, ctx, shared_data, second_model):
    from jobs.stages.analyze import analyze_systems
    from jobs.stages.infer import put_labelled_frames
    from jobs.stages.report import write_report
    from schemas.analyze import AnalyzeSpec
    from schemas.report import ReportSpec
    from schemas.shift import ShiftSpec

    path = tmp_path / "run.h5"
    _md(path, ctx, MdSpec(**SHORT, deviation_models=[second_model]))
    run = _stored(path)
    assert run["devi"].shape == run["mean"].shape == (6,) and np.isfinite(run["devi"]).all()
    assert run["attrs"]["deviation_models"] == 1 and run["trust"] == (0.05, 0.15)
    assert run["attrs"]["deviation_model_files"] == [str(second_model)]
    # the deviations are DeviationEnsemble's on the stored frames, chunk by chunk to the bit
    ensemble = DeviationEnsemble.from_files([SHIPPED_MODEL, second_model])
    for rows in (slice(0, 3), slice(3, 6)):
        devi, mean = ensemble.force_deviation(run["numbers"], run["positions"][rows],
                                              run["cells"][rows])
        assert np.array_equal(devi, run["devi"][rows]) and np.array_equal(mean, run["mean"][rows])
    whole = ensemble.force_deviation(run["numbers"], run["positions"], run["cells"])[0]
    assert np.allclose(whole, run["devi"], rtol=1e-5)

    # a trust_hi between the smallest and the largest deviation; md records it again (its
    # frames are done) and analyze counts the frames above it
    values = np.sort(run["devi"])
    trust_hi = 0.5 * (values[1] + values[2])  # 4 of 6 above
    _md(path, ctx, MdSpec(**SHORT, deviation_models=[second_model], trust_lo_ev_a=values[0],
                          trust_hi_ev_a=trust_hi))
    assert np.array_equal(_stored(path)["devi"], run["devi"])
    with RunStore(path, ctx) as store:
        put_labelled_frames(_frames(shared_data, 40), SYSTEMS[0], ShiftSpec(), ctx, store)
        analyze_systems(AnalyzeSpec(blocks_per_replica=4, blocking_min_blocks=4), SYSTEMS, ctx,
                        store)
        attrs = store.attrs("/analyze/mcm")
        write_report(store, tmp_path / "report", ReportSpec())
    expected = np.mean(run["devi"] > trust_hi)
    assert 0 < expected < 1 and attrs["fraction_above_trust_hi"] == expected == 4 / 6
    assert attrs["fraction_below_trust_lo"] == 0.0  # trust_lo is the smallest: none below
    assert attrs["deviation_frames"] == 6 and attrs["trust_hi_ev_a"] == trust_hi
    assert attrs["max_devi_f_ev_a_max"] == run["devi"].max()
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Model deviation (trust in md)" in summary
    assert (f"WARNING: 66.7 % of the frames of mcm have a model deviation above trust_hi = "
            f"{trust_hi:g} eV/A; the potential is extrapolating there") in summary


def test_without_an_ensemble_nothing_is_recorded_and_analyze_says_nan(tmp_path, ctx):
    from jobs.stages.analyze import model_deviation_summary

    path = tmp_path / "plain.h5"
    _md(path, ctx, MdSpec(**SHORT))
    run = _stored(path)
    assert run["devi"] is None and run["mean"] is None and run["trust"] is None
    with RunStore(path, ctx) as store:
        summaries = [model_deviation_summary(ctx, store, name) for name in ("mcm", "no-md")]
    for summary in summaries:  # md without an ensemble, and no md of the system at all
        assert summary["deviation_frames"] == 0
        assert all(np.isnan(v) for k, v in summary.items() if k != "deviation_frames")


def test_deviations_resume_bit_for_bit_and_fill_frames_saved_without(tmp_path, ctx,
                                                                      second_model):
    spec = dict(SHORT, chunk_frames=2)
    whole = tmp_path / "whole.h5"
    _md(whole, ctx, MdSpec(**spec), deviation_models=[second_model])  # the argument rules
    with pytest.raises(StoppedOnPurpose):
        _md(tmp_path / "split.h5", ctx, MdSpec(**spec, deviation_models=[second_model],
                                               stop_after_frames=3))
    assert np.isnan(_stored(tmp_path / "split.h5")["devi"][4:]).all()
    _md(tmp_path / "split.h5", ctx, MdSpec(**spec, deviation_models=[second_model]))
    # md first without an ensemble, then again with one: the saved frames get theirs
    _md(tmp_path / "late.h5", ctx, MdSpec(**spec))
    _md(tmp_path / "late.h5", ctx, MdSpec(**spec), deviation_models=[second_model])
    reference = _stored(whole)
    assert np.isfinite(reference["devi"]).all()
    for name in ("split.h5", "late.h5"):
        other = _stored(tmp_path / name)
        assert np.array_equal(other["positions"], reference["positions"]), name
        assert np.array_equal(other["devi"], reference["devi"]), name
        assert np.array_equal(other["mean"], reference["mean"]), name
