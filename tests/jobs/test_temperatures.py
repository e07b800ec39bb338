"""md over several temperatures in one manifest (md.temperatures_k): systems x temperatures x
replicas over the ranks, analyze per (system, temperature), Arrhenius fits per base system."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml
from launch import run_command

from schemas import parse_manifest
from schemas.manifest import ManifestError

MANIFEST = """\
stages: [md, infer, analyze, report]
store: run.h5
seed: 7
systems: [{name: p6322, structure: 'builtin:p2-nmmo-p6322'}]
md: {temperatures_k: [500, 1000], replicas: 1, equilibration_steps: 100, frames: 150,
     save_every_steps: 10, chunk_frames: 50}
infer: {chunk_frames: 50}

"""


def test_the_manifest_expands_each_system_per_temperature_once():
    manifest = parse_manifest(MANIFEST.replace(
        "systems: [", "systems: [{name: cold, structure: 'builtin:p2-nmmo-p63mcm', "
                      "temperature_k: 250}, "))
    assert [(s.name, s.temperature_k, s.base_name) for s in manifest.systems] == [
        ("cold", 250.0, "cold"), ("p6322-500K", 500.0, "p6322"), ("p6322-1000K", 1000.0, "p6322")]
    again = parse_manifest(yaml.safe_dump(manifest.model_dump(mode="json")))
    assert [s.name for s in again.systems] == [s.name for s in manifest.systems]
    with pytest.raises(ManifestError, match="unique"):
        parse_manifest(MANIFEST.replace(
            "systems: [", "systems: [{name: p6322-500K, structure: 'builtin:p2-nmmo-p6322', "
                          "temperature_k: 500}, "))


def test_two_temperatures_run_over_two_ranks_and_analyze_fits_arrhenius(tmp_path, dynshift_bin):
    (tmp_path / "m.yaml").write_text(MANIFEST)
    done = run_command(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml"], cwd=tmp_path,
                       timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "analyze p6322: Arrhenius over 2 md temperatures" in done.stdout
    with h5py.File(tmp_path / "run.h5", "r") as f:
        measured = {}
        for t in (500, 1000):
            replica = f[f"md/p6322-{t}K/r000"]
            assert replica.attrs["temperature_k"] == t
            measured[t] = float(np.mean(replica["temperature_k"][50:]))
            assert f[f"analyze/p6322-{t}K"].attrs["n_frames"] == 150
        assert 0.8 * 500 < measured[500] < 1.2 * 500 and 0.8 * 1000 < measured[1000] < 1.2 * 1000
        fits = f["analyze/arrhenius/p6322"]
        np.testing.assert_array_equal(fits["temperature_k"][()], [500.0, 1000.0])
        rates = fits["escape_rate_per_ps"][()]
        assert rates[1] > rates[0] >= 0                  # hotter: more hops
        if rates[0] > 0:                                 # two rates: a fit, no error from two
            assert fits.attrs["hop_fit"] == "ok" and fits.attrs["hop_activation_ev"] > 0
        else:
            assert str(fits.attrs["hop_fit"]).startswith("none: an Arrhenius fit needs")
        assert "d_fit" in fits.attrs
    summary = next(tmp_path.rglob("summary.md")).read_text()
    assert "## Over temperature (Arrhenius fits" in summary
    assert "- p6322 escape rate (500, 1000 K):" in summary and "- p6322 D (500, 1000 K):" in summary
    assert "arrhenius.png" in summary and next(tmp_path.rglob("arrhenius.png")).stat().st_size
    shown = run_command([*dynshift_bin, "show", "run.h5"], cwd=tmp_path).stdout
    assert "p6322-500K_mean_shift_ppm" in shown and "p6322-1000K_mean_shift_ppm" in shown


def test_the_spectrum_fit_takes_per_base_the_md_temperature_nearest_the_measurement():
    from jobs.stages.spectrum import components_at

    manifest = parse_manifest(MANIFEST.replace("temperatures_k: [500, 1000]",
                                               "temperatures_k: [300, 450, 600]").replace(
        "systems: [", "systems: [{name: other, structure: 'builtin:p2-nmmo-p63mcm'}, "))
    assert components_at(manifest.systems, 320.0) == ["other-300K", "p6322-300K"]
    assert components_at(manifest.systems, 560.0) == ["other-600K", "p6322-600K"]
    plain = parse_manifest(MANIFEST.replace("md: {temperatures_k: [500, 1000], ", "md: {"))
    assert components_at(plain.systems, 320.0) == ["p6322"]
