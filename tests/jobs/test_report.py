"""The report: figures and summary.md from a store, by `dynshift report` and as a stage."""
from __future__ import annotations

import os
import subprocess

import ase.io
import numpy as np
import pytest
from mpi4py import MPI

from engine.context import RankContext
from engine.store import RunStore
from jobs.stages.analyze import analyze_system
from jobs.stages.infer import put_labelled_frames
from jobs.stages.report import report_from_store
from schemas.analyze import AnalyzeSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fill(path, shared_data, n_frames=40, analyse=True):
    ctx = RankContext.from_comm(MPI.COMM_SELF, set_threads=False)
    with RunStore(path, ctx, mode="w") as store:
        for name in ("p63mcm", "p6322"):
            frames = ase.io.read(shared_data / f"{name}-dev.extxyz", f":{n_frames}")
            system = SystemSpec(name=name, structure=f"builtin:p2-nmmo-{name}")
            put_labelled_frames(frames, system, ShiftSpec(), ctx, store)
            if analyse:
                analyze_system(AnalyzeSpec(map_bins=20), system, ctx, store)
        rng = np.random.default_rng(3)
        dft = rng.normal(1600.0, 500.0, 300)
        store.put("/train/cv/shift_dft_ppm", dft)
        store.put("/train/cv/shift_pred_ppm", dft + 100.0 * rng.choice([-1.0, 1.0], 300))
        store.set_attrs("/", manifest_yaml="stages: [report]\nreport: {dpi: 50}\n")


def _is_png(path, dpi=None):
    """A PNG file of real content; with `dpi`, drawn at that resolution (pHYs chunk)."""
    blob = path.read_bytes()
    if blob[:8] != PNG_SIGNATURE or len(blob) < 3000:
        return False
    if dpi is not None:
        at = blob.index(b"pHYs") + 4
        pixels_per_metre = int.from_bytes(blob[at:at + 4], "big")
        return round(pixels_per_metre * 0.0254) == dpi
    return True


def test_report_from_store_writes_figures_and_table(tmp_path, shared_data):
    store_path = tmp_path / "run.h5"
    _fill(store_path, shared_data)
    summary = report_from_store(store_path)
    assert summary == tmp_path / "run-report" / "summary.md"
    folder = summary.parent
    for name in ("histograms.png", "maps_p63mcm.png", "maps_p6322.png", "running_average.png",
                 "parity.png"):
        assert _is_png(folder / name, dpi=50), name  # the stored manifest's report.dpi
    assert not (folder / "msd.png").exists()  # file sources have no time: no diffusion
    text = summary.read_text()
    with RunStore(store_path, None, mode="r") as store:
        for system in ("p63mcm", "p6322"):
            group = f"/analyze/{system}/sites"
            for cls, occ, shift in zip(store.attrs(group)["class_names"],
                                       store.read(f"{group}/occupation"),
                                       store.read(f"{group}/shift_ppm")):
                if np.isfinite(shift):
                    assert f"| {system} | {cls} | {occ:.3f} | {shift:.0f} |" in text
                else:  # a class without samples says so
                    assert f"| {system} | {cls} | 0 | no samples |" in text
            mean = store.attrs(f"/analyze/{system}")["mean_shift_ppm"]
            assert f"| {system} | file | 40 | 16 | {mean:.1f} |" in text
    assert "Out-of-fold RMSE 100.0 ppm" in text  # every prediction is off by exactly 100 ppm
    assert "nan" not in text.lower()
    # 40 frames allow blocks of 1 and 2 frames only (16 blocks or more): no plateau shown
    assert ("- **p6322**: not converged: the blocking error of the mean reaches no plateau "
            "within the block sizes the frames allow (up to 2 frames") in text
    assert "![Shift histograms by site (cf. Fig. 3a)](histograms.png)" in text
    other = report_from_store(store_path, tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere" / "summary.md" and other.exists()


def test_report_of_a_store_without_analysis_says_so(tmp_path, shared_data):
    store_path = tmp_path / "bare.h5"
    _fill(store_path, shared_data, n_frames=3, analyse=False)
    text = report_from_store(store_path).read_text()
    assert "No analysed systems" in text and "parity.png" in text


MANIFEST = """\
stages: [analyze, spectrum, report]
systems:
  - {name: p63mcm, structure: "builtin:p2-nmmo-p63mcm"}
  - {name: p6322, structure: "builtin:p2-nmmo-p6322"}
analyze:
  map_bins: 24
report:
  dpi: 60
"""


def test_analyze_and_report_stages_under_mpirun(tmp_path, shared_data, dynshift_bin):
    """`mpirun -n 2 dynshift run` of analyze + report on a store holding infer-layout data."""
    store_path = tmp_path / "staged.h5"
    _fill(store_path, shared_data, n_frames=30, analyse=False)
    (tmp_path / "m.yaml").write_text(MANIFEST)
    run = subprocess.run(["mpirun", "-n", "2", *dynshift_bin, "run", "m.yaml", "--store",
                          str(store_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "analyze p63mcm: mean shift" in run.stdout
    folder = tmp_path / "staged-report"
    assert _is_png(folder / "histograms.png") and (folder / "summary.md").exists()
    assert _is_png(folder / "spectra.png")
    text = (folder / "summary.md").read_text()
    assert "## Spectra" in text and "static lines at the site shifts" in text
    assert "nan" not in text.lower()
    with RunStore(store_path, None, mode="r") as store:
        assert store.stage_status("spectrum") == "complete"
        assert store.stage_status("analyze") == "complete"
        assert store.stage_status("report") == "complete"
        assert store.attrs("/analyze/p6322")["ranks"] == 2
        assert store.shape("/analyze/p6322/maps/count") == (2, 24, 24)
        summary = store.attrs("/stages/analyze")["summary"]
        assert summary["p63mcm_mean_shift_ppm"] == pytest.approx(
            store.attrs("/analyze/p63mcm")["mean_shift_ppm"], abs=0.01)
