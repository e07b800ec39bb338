"""A corpus of bad manifests: `dynshift validate` exits 2, names the culprit, no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
MD = ("stages: [probe, md, infer, analyze, report]\n"
      "systems:\n  - {name: p63mcm, structure: 'builtin:p2-nmmo-p63mcm'}\n"
      "  - {name: p6322, structure: 'builtin:p2-nmmo-p6322'}\n")
"""run/default.yaml, shortened: md -> infer -> analyze of the built-in cells."""
ONE = "systems: [{name: a, structure: 'builtin:p2-nmmo-p63mcm'}]\n"

# (id, YAML text, text that the message must hold: the culprit's dotted path)
CORPUS = [
    # ---- the file itself --------------------------------------------------------------------
    ("empty", "", "empty"),
    ("comment-only", "# nothing here\n", "empty"),
    ("list", "- probe\n- md\n", "mapping"),
    ("scalar", "just text\n", "mapping"),
    ("bad-yaml", "stages: [probe\n", "not valid YAML"),
    ("bad-indent", "stages: [probe]\nmd:\n  replicas: 2\n   frames: 3\n", "not valid YAML"),
    ("tab", "stages: [probe]\nmd:\n\treplicas: 2\n", "not valid YAML"),
    ("duplicate-section", "stages: [probe]\nmd: {replicas: 2}\nmd: {frames: 3}\n", "twice"),
    ("duplicate-key", "stages: [probe]\nmd:\n  frames: 2\n  frames: 3\n", "twice"),
    ("python-tag", "stages: !!python/object:os.system [probe]\n", "not valid YAML"),
    # ---- stages -----------------------------------------------------------------------------
    ("no-stages", "seed: 1\n", "stages: required"),
    ("empty-stages", "stages: []\n", "stages"),
    ("unknown-stage", "stages: [probe, simulate]\n", "stages.1"),
    ("misordered", "stages: [md, probe]\n" + ONE, "stages: must be in the order"),
    ("duplicated-stage", "stages: [probe, probe]\n", "stages: every stage at most once"),
    ("stages-string", "stages: probe md\n", "stages"),
    # ---- unknown keys and sections ----------------------------------------------------------
    ("unknown-top", "stages: [probe]\nseeds: 3\n", "seeds: unknown key"),
    ("unknown-md", "stages: [probe]\nmd: {timestepp_fs: 1}\n", "md.timestepp_fs: unknown key"),
    ("unknown-vasp", "stages: [probe]\nlabel: {vasp: {walltime: 10}}\n", "label.vasp.walltime"),
    ("unknown-system-key", "stages: [probe]\nsystems: [{name: a, structure: x.cif, cell: 1}]\n",
     "systems.0.cell"),
    ("section-scalar", "stages: [probe]\nmd: 5\n", "md: must be a mapping"),
    ("section-list", "stages: [probe]\ntrain: [1, 2]\n", "train: must be a mapping"),
    ("systems-mapping", "stages: [probe]\nsystems: {name: a}\n", "systems"),
    # ---- numbers ----------------------------------------------------------------------------
    ("replicas-zero", "stages: [probe]\nmd: {replicas: 0}\n", "md.replicas: must be >= 1"),
    ("negative-temperature", "stages: [probe]\nmd: {temperature_k: -3}\n", "md.temperature_k"),
    ("inf-timestep", "stages: [probe]\nmd: {timestep_fs: .inf}\n", "md.timestep_fs"),
    ("nan-site-radius", "stages: [probe]\nanalyze: {site_radius_a: .nan}\n",
     "analyze.site_radius_a: must be a finite number"),
    ("nan-in-tuple", "stages: [probe]\nanalyze: {histogram_range_ppm: [0, .inf]}\n",
     "analyze.histogram_range_ppm.1"),
    ("nan-in-list", "stages: [probe]\npotential: {energy_prefactors: [.nan, 1]}\n",
     "potential.energy_prefactors.0"),
    ("nan-in-dict", "stages: [probe]\nlabel: {vasp: {ngyromag: {Na: .nan}}}\n",
     "label.vasp.ngyromag.Na"),
    ("nan-incar", "stages: [probe]\nlabel: {vasp: {incar: {SIGMA: .nan}}}\n",
     "label.vasp.incar.SIGMA: must be a finite number"),
    ("inf-shift", "stages: [probe]\nshift: {theta_k: -.inf}\n", "shift.theta_k"),
    ("string-number", "stages: [probe]\nmd: {frames: many}\n", "md.frames"),
    ("seed-negative", "stages: [probe]\nseed: -1\n", "seed"),
    ("dpi", "stages: [probe]\nreport: {dpi: 10}\n", "report.dpi"),
    ("failure-budget", "stages: [probe]\nlabel: {failure_budget: 1.5}\n", "label.failure_budget"),
    ("checks-distance", "stages: [probe]\nchecks: {min_distance_a: 0}\n", "checks.min_distance_a"),
    ("checks-factor", "stages: [probe]\nchecks: {md_max_temperature_factor: 1}\n",
     "checks.md_max_temperature_factor"),
    # ---- systems ----------------------------------------------------------------------------
    ("no-systems-md", "stages: [md]\n", "systems: stages md need"),
    ("no-systems-infer", "stages: [infer]\n", "systems: stages infer need"),
    ("unknown-builtin", "stages: [probe]\nsystems: [{name: a, structure: 'builtin:p2-lco'}]\n",
     "systems.0.structure: unknown built-in"),
    ("missing-structure", "stages: [probe]\nsystems: [{name: a, structure: nowhere/x.cif}]\n",
     "systems.0.structure: file"),
    ("structure-folder", "stages: [probe]\nsystems: [{name: a, structure: .}]\n",
     "systems.0.structure"),
    ("system-name", "stages: [probe]\nsystems: [{name: 'a b', structure: "
                    "'builtin:p2-nmmo-p6322'}]\n", "systems.0.name"),
    ("system-twice", "stages: [probe]\nsystems: [{name: a, structure: 'builtin:p2-nmmo-p6322'},"
                     " {name: a, structure: 'builtin:p2-nmmo-p63mcm'}]\n", "systems.1.name"),
    ("supercell-zero", "stages: [probe]\nsystems: [{name: a, structure: 'builtin:p2-nmmo-p6322',"
                       " supercell: [1, 0, 1]}]\n", "systems.0.supercell"),
    ("supercell-two", "stages: [probe]\nsystems: [{name: a, structure: 'builtin:p2-nmmo-p6322',"
                      " supercell: [1, 2]}]\n", "systems.0.supercell"),
    ("target-no-element", "stages: [probe]\nsystems: [{name: a, structure: "
                          "'builtin:p2-nmmo-p6322', target_species: Xx}]\n",
     "systems.0.target_species: not a chemical element"),
    ("target-lowercase", "stages: [probe]\nsystems: [{name: a, structure: "
                         "'builtin:p2-nmmo-p6322', target_species: na}]\n",
     "systems.0.target_species"),
    ("target-not-centre", MD.replace("p6322'}", "p6322', target_species: Mg}"),
     "systems.1.target_species: differs from train.centre"),
    # ---- shift ------------------------------------------------------------------------------
    ("shift-t-below-theta", "stages: [probe]\nshift: {temperature_k: 10, theta_k: 20}\n",
     "shift.temperature_k: must exceed shift.theta_k"),
    ("shift-incomplete", "stages: [probe]\nshift: {preset: null, mu_eff_bohr: 3.87}\n",
     "shift.spin_cell: required"),
    ("shift-preset", "stages: [probe]\nshift: {preset: lin2023}\n", "shift.preset"),
    ("shift-negative", "stages: [probe]\nshift: {g_e: -2}\n", "shift.g_e"),
    # ---- md ---------------------------------------------------------------------------------
    ("thermostat", "stages: [probe]\nmd: {thermostat: berendsen}\n", "md.thermostat"),
    ("stop-after", "stages: [probe]\nmd: {frames: 10, stop_after_frames: 10}\n",
     "md.stop_after_frames"),
    ("chunk-zero", "stages: [probe]\nmd: {chunk_frames: 0}\n", "md.chunk_frames"),
    ("save-every-zero", "stages: [probe]\nmd: {save_every_steps: 0}\n", "md.save_every_steps"),
    # ---- potential --------------------------------------------------------------------------
    ("potential-model-missing", "stages: [potential]\npotential: {model: none.pb}\n",
     "potential.model: file"),
    ("potential-frames-missing", "stages: [potential]\npotential: {frames: [none.extxyz]}\n",
     "potential.frames.0"),
    ("potential-both", "stages: [potential]\npotential: {model: a.pb, frames: [b.extxyz]}\n",
     "potential.model: give either"),
    ("rcut-smooth", "stages: [probe]\npotential: {rcut_a: 4, rcut_smooth_a: 5}\n",
     "potential.rcut_smooth_a"),
    ("embedding-zero", "stages: [probe]\npotential: {embedding_neurons: [16, 0, 64]}\n",
     "potential.embedding_neurons.1"),
    ("fitting-empty", "stages: [probe]\npotential: {fitting_neurons: []}\n",
     "potential.fitting_neurons"),
    ("type-map-element", "stages: [probe]\npotential: {type_map: [Na, Mg, Mn, Q]}\n",
     "potential.type_map.3"),
    ("type-map-twice", "stages: [probe]\npotential: {type_map: [Na, Na, Mn, O]}\n",
     "potential.type_map: every element once"),
    ("sel-length", "stages: [probe]\npotential: {sel: [20, 10, 20]}\n", "potential.sel: one entry"),
    ("sel-word", "stages: [probe]\npotential: {sel: many}\n", "potential.sel"),
    ("stop-lr", "stages: [probe]\npotential: {start_lr: 1.0e-5, stop_lr: 1.0e-3}\n",
     "potential.stop_lr"),
    ("compress", "stages: [probe]\npotential: {compress: sometimes}\n", "potential.compress"),
    ("md-species-shipped", "stages: [potential, md]\nsystems: [{name: n, structure: "
                           "'builtin:p2-nnmo-p63mcm'}]\n", "systems.0.structure: species ['Ni']"),
    # ---- label ------------------------------------------------------------------------------
    ("vasp-command-empty", "stages: [probe]\nlabel: {vasp: {command: []}}\n", "label.vasp.command"),
    ("vasp-command-blank", "stages: [probe]\nlabel: {vasp: {command: ['', vasp_std]}}\n",
     "label.vasp.command.0"),
    ("vasp-command-string", "stages: [probe]\nlabel: {vasp: {command: 'mpirun vasp_std'}}\n",
     "label.vasp.command"),
    ("incar-lowercase", "stages: [probe]\nlabel: {vasp: {incar: {encut: 500}}}\n",
     "label.vasp.incar"),
    ("potcar-dir-missing", "stages: [probe]\nlabel: {vasp: {potcar_dir: no/pots}}\n",
     "label.vasp.potcar_dir: folder"),
    ("potcar-dir-unset", "stages: [md, label]\n" + ONE, "label.vasp.potcar_dir: required"),
    ("potcar-species", "stages: [probe]\nlabel: {vasp: {potcar: {Qq: Na_pv}}}\n",
     "label.vasp.potcar.Qq"),
    ("kpoints", "stages: [probe]\nlabel: {vasp: {kpoints: [2, 0, 2]}}\n", "label.vasp.kpoints"),
    ("selection", "stages: [probe]\nlabel: {selection: random}\n", "label.selection"),
    ("skip-saved-all", "stages: [md, label]\n" + ONE + "md: {frames: 5}\nlabel: {skip_saved: 5}\n",
     "label.skip_saved"),
    ("label-without-md", "stages: [label]\n" + ONE, "stages: label chooses frames"),
    # ---- train ------------------------------------------------------------------------------
    ("hidden-zero", "stages: [probe]\ntrain: {hidden_units: [512, 0]}\n", "train.hidden_units.1"),
    ("hidden-empty", "stages: [probe]\ntrain: {hidden_units: []}\n", "train.hidden_units"),
    ("centre-not-species", "stages: [probe]\ntrain: {species: [Mg, Mn, O]}\n", "train.centre"),
    ("species-element", "stages: [probe]\ntrain: {species: [Na, Mg, Mn, Oxygen]}\n",
     "train.species.3"),
    ("species-empty", "stages: [probe]\ntrain: {species: []}\n", "train.species"),
    ("folds-one", "stages: [probe]\ntrain: {folds: 1}\n", "train.folds"),
    ("ensemble-folds", "stages: [probe]\ntrain: {folds: 3, ensemble_folds: 4}\n",
     "train.ensemble_folds"),
    ("dropout", "stages: [probe]\ntrain: {dropout: 1}\n", "train.dropout"),
    ("soap-cut", "stages: [probe]\ntrain: {soap_r_cut_a: 0.5}\n", "train.soap_r_cut_a"),
    ("soap-l-max", "stages: [probe]\ntrain: {soap_l_max: 30}\n", "train.soap_l_max"),
    ("train-frames-missing", "stages: [train]\ntrain: {frames: [gone.extxyz]}\n",
     "train.frames.0"),
    ("train-nothing", "stages: [train]\n", "train.frames: no labelled frames"),
    ("weights-dtype", "stages: [probe]\ntrain: {weights_dtype: int8}\n", "train.weights_dtype"),
    # ---- infer ------------------------------------------------------------------------------
    ("labels-without-files", MD.replace("[probe, md,", "[probe, md,") +
     "infer: {shifts_from: labels}\n", "infer.trajectories: infer.shifts_from: labels"),
    ("labels-one-missing", "stages: [infer]\nsystems: [{name: a, structure: "
     "'builtin:p2-nmmo-p63mcm'}, {name: b, structure: 'builtin:p2-nmmo-p6322'}]\n"
     "infer: {shifts_from: labels, trajectories: {a: SHARED}}\n",
     "no labelled file for system 'b'"),
    ("trajectory-unknown-system", MD + "infer: {trajectories: {p6323: x.extxyz}}\n",
     "infer.trajectories.p6323"),
    ("trajectory-missing", MD + "infer: {trajectories: {p6322: gone.extxyz}}\n",
     "infer.trajectories.p6322: file"),
    ("infer-model-missing", MD + "infer: {model: gone.h5}\n", "infer.model: file"),
    ("infer-model-not-h5", MD + "infer: {model: MANIFEST}\n", "infer.model"),
    ("infer-kernel", "stages: [probe]\ninfer: {soap_kernel: fast}\n", "infer.soap_kernel"),
    ("infer-skip-all", MD + "md: {frames: 10}\ninfer: {skip_frames: 10}\n", "infer.skip_frames"),
    ("infer-without-md", "stages: [infer]\n" + ONE, "infer.trajectories: no file for system"),
    ("shifts-from", "stages: [probe]\ninfer: {shifts_from: dft}\n", "infer.shifts_from"),
    # ---- analyze / report -------------------------------------------------------------------
    ("histogram-range", "stages: [probe]\nanalyze: {histogram_range_ppm: [100, 0]}\n",
     "analyze.histogram_range_ppm"),
    ("histogram-bins", "stages: [probe]\nanalyze: {histogram_bin_ppm: 1.0e-5}\n",
     "analyze.histogram_bin_ppm"),
    ("msd-window", "stages: [probe]\nanalyze: {msd_fit_window_fs: [50, 10]}\n",
     "analyze.msd_fit_window_fs"),
    ("msd-window-past-end", MD + "md: {frames: 20}\nanalyze: {msd_fit_window_fs: [1.0e6, 2.0e6],"
                                 " blocks_per_replica: 2}\n", "analyze.msd_fit_window_fs"),
    ("blocks-per-replica", MD + "md: {frames: 5}\nanalyze: {blocks_per_replica: 10}\n",
     "analyze.blocks_per_replica"),
    ("framework-target", MD + "analyze: {framework_species: [Mn, Na]}\n",
     "analyze.framework_species: holds the target"),
    ("framework-empty", "stages: [probe]\nanalyze: {framework_species: []}\n",
     "analyze.framework_species"),
    ("analyze-without-infer", "stages: [analyze]\n" + ONE, "stages: analyze reads"),
    ("xlim", "stages: [probe]\nreport: {histogram_xlim_ppm: [10, 10]}\n",
     "report.histogram_xlim_ppm"),
    ("probe-rank", "stages: [probe]\nprobe: {fail_on_rank: -1}\n", "probe.fail_on_rank"),
    ("store-folder", "stages: [probe]\nstore: .\n", "store:"),
    # ---- spectrum ---------------------------------------------------------------------------
    ("spectrum-without-analyze", "stages: [spectrum]\n" + ONE, "stages: spectrum reads"),
    ("spectrum-no-systems", "stages: [spectrum]\n", "systems: stages spectrum need"),
    ("spectrum-experiment-missing", MD.replace("analyze,", "analyze, spectrum,")
     + "spectrum: {experiment: {file: nowhere.txt}}\n", "spectrum.experiment.file"),
    ("spectrum-experiment-not-a-spectrum", MD.replace("analyze,", "analyze, spectrum,")
     + "spectrum: {experiment: {file: MANIFEST}}\n", "spectrum.experiment.file"),
    ("spectrum-experiment-system", MD.replace("analyze,", "analyze, spectrum,")
     + "spectrum: {experiment: {file: x.txt, systems: [p6322, p2]}}\n",
     "spectrum.experiment.systems"),
    ("spectrum-cold", MD.replace("analyze,", "analyze, spectrum,")
     + "spectrum: {temperatures_k: [300, -20]}\n", "spectrum.temperatures_k"),
    ("spectrum-below-theta", MD.replace("analyze,", "analyze, spectrum,")
     + "shift: {theta_k: 50}\nspectrum: {temperatures_k: [40]}\n", "spectrum.temperatures_k"),
    ("spectrum-range", "stages: [probe]\nspectrum: {ppm_range: [100, 0]}\n",
     "spectrum.ppm_range"),
    ("model-labeller-dp", "stages: [probe]\nlabel: {labeller: model, model: {dp_model: no.pb}}\n",
     "label.model.dp_model"),
    ("model-labeller-shift", "stages: [probe]\nlabel: {labeller: model, model: {shift_model: "
     "MANIFEST}}\n", "label.model.shift_model"),
    ("spectrum-system-fit", "stages: [probe, md, infer, analyze, spectrum]\nsystems: [{name: fit, "
     "structure: 'builtin:p2-nmmo-p63mcm'}]\n", "systems.0.name"),
    ("spectrum-field", "stages: [probe]\nspectrum: {field_t: 0}\n", "spectrum.field_t"),
    ("spectrum-offset", "stages: [probe]\nspectrum: {experiment: {file: x, "
     "offset_range_ppm: [5, -5]}}\n", "spectrum.experiment.offset_range_ppm"),
    ("spectrum-isotope", "stages: [probe, md, infer, analyze, spectrum]\nsystems: [{name: a, "
     "structure: 'builtin:p2-nmmo-p63mcm', target_species: Mn}]\n", "systems.0.target_species"),
]


def _validate(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    shared = ROOT.parent / "shared" / "data" / "p2-nmmo" / "p63mcm-dev.extxyz"
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(text.replace("SHARED", str(shared)).replace("MANIFEST", str(manifest)))
    code = main(["validate", str(manifest)])
    return code, capsys.readouterr().err


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [case[0] for case in CORPUS]
    assert len(ids) >= 50 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name,text,culprit", CORPUS, ids=[c[0] for c in CORPUS])
def test_a_bad_manifest_exits_2_naming_its_culprit(name, text, culprit, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store path is relative to the working directory
    code, err = _validate(tmp_path, text, capsys)
    assert code == 2, err
    assert culprit in err, err
    assert "Traceback" not in err
    assert str(tmp_path / "bad.yaml") in err  # the file is named


@pytest.mark.parametrize("path", sorted((ROOT / "run").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_manifest_validates(path: Path, capsys, monkeypatch, tmp_path):
    if "../../shared" in path.read_text() and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs the shared data")
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    if "potcar_dir: /path/to/" in path.read_text():
        # a site template (a real VASP campaign): valid but for the POTCAR folder to fill in
        assert code == 2 and "(1 error)" in err and "label.vasp.potcar_dir: folder /path/to/" \
            in err, err
        return
    assert code == 0, err


def test_one_line_per_culprit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _validate(tmp_path, "stages: [probe]\nmd: {replicas: 0, frames: .nan}\n"
                                    "train: {hidden_units: [0, 0]}\n", capsys)
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert code == 2 and "(4 errors)" in err
    assert lines == ["md.replicas: must be >= 1 (got 0)",
                     "md.frames: must be a finite number (got nan)",
                     "train.hidden_units.0: must be >= 1 (got 0)",
                     "train.hidden_units.1: must be >= 1 (got 0)"]


def test_a_validator_that_raises_another_exception_is_reported(tmp_path, capsys, monkeypatch):
    from schemas import manifest as schema

    def broken(_):
        raise KeyError("boom")

    monkeypatch.setattr(schema, "_cross_section_problems", broken)
    monkeypatch.chdir(tmp_path)
    code, err = _validate(tmp_path, "stages: [probe]\n", capsys)
    assert code == 2 and "KeyError" in err and "Traceback" not in err


def test_paths_of_stages_that_do_not_run_are_checked_too(tmp_path, capsys, monkeypatch):
    """The choice: a typo in any given path is caught, whether or not its stage runs."""
    monkeypatch.chdir(tmp_path)
    code, err = _validate(tmp_path, "stages: [probe]\ntrain: {frames: [typo.extxyz]}\n"
                                    "potential: {model: typo.pb}\n", capsys)
    assert code == 2
    assert f"train.frames.0: {tmp_path / 'typo.extxyz'} not found" in err
    assert f"potential.model: file {tmp_path / 'typo.pb'} not found" in err


def test_potcars_of_every_species_are_checked_when_label_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pots = tmp_path / "pots"
    for name in ("Na_pv", "Mn_pv"):
        (pots / name).mkdir(parents=True)
        (pots / name / "POTCAR").write_text("fake")
    (pots / "O").write_text("fake")  # the flat layout: <potcar_dir>/<name>
    text = ("stages: [md, label]\n" + ONE +
            "label: {vasp: {potcar_dir: pots, potcar: {Na: Na_pv, Mn: Mn_pv, Mg: Mg_pv}}}\n")
    code, err = _validate(tmp_path, text, capsys)
    assert code == 2 and "(1 error)" in err
    assert "label.vasp.potcar.Mg: no POTCAR for Mg" in err
    (pots / "Mg_pv").mkdir()
    (pots / "Mg_pv" / "POTCAR").write_text("fake")
    code, err = _validate(tmp_path, text, capsys)
    assert code == 0, err


DEVIATION_CORPUS = [  # md's model ensemble (jobs/deviation.py), in the pattern of CORPUS
    ("deviation-model-missing", MD + "md: {deviation_models: [gone.pb]}\n",
     "md.deviation_models.0: file"),
    ("deviation-model-folder", MD + "md: {deviation_models: [.]}\n",
     "md.deviation_models.0:"),
    ("trust-order", "stages: [probe]\nmd: {trust_lo_ev_a: 0.2, trust_hi_ev_a: 0.1}\n",
     "md.trust_lo_ev_a: must be smaller than trust_hi_ev_a"),
    ("trust-hi-zero", "stages: [probe]\nmd: {trust_hi_ev_a: 0}\n", "md.trust_hi_ev_a"),
    ("learn-trust-order", "stages: [probe]\nlearn: {trust_lo_ev_a: 0.2, trust_hi_ev_a: 0.1}\n",
     "learn.trust_hi_ev_a: must be > trust_lo_ev_a"),
    ("learn-reuse-lr-below-stop", "stages: [probe]\nlearn: {reuse_models: true, "
     "reuse_start_lr: 1.0e-5}\n", "learn.reuse_start_lr: must be >= dp.stop_lr"),
    ("learn-steps-per-iteration-zero", "stages: [probe]\nlearn: {dp: {steps_per_iteration: "
     "[16000, 0]}}\n", "learn.dp.steps_per_iteration: one or more entries, every entry >= 1"),
    ("learn-steps-per-iteration-empty", "stages: [probe]\nlearn: {dp: {steps_per_iteration: "
     "[]}}\n", "learn.dp.steps_per_iteration: one or more entries"),
]


@pytest.mark.parametrize("name,text,culprit", DEVIATION_CORPUS,
                         ids=[c[0] for c in DEVIATION_CORPUS])
def test_a_bad_deviation_manifest_exits_2_naming_its_culprit(name, text, culprit, tmp_path,
                                                             capsys, monkeypatch):
    test_a_bad_manifest_exits_2_naming_its_culprit(name, text, culprit, tmp_path, capsys,
                                                   monkeypatch)
    assert name not in [case[0] for case in CORPUS]


def _axis_rows(ppm, intensity):
    return "\n".join(f"{p} {i}" for p, i in zip(ppm, intensity)) + "\n"


_PPM = [2000.0 - 2.0 * k for k in range(200)]
_LINE = [1.0 + 100.0 / (1.0 + ((p - 1700.0) / 20.0) ** 2) for p in _PPM]
BAD_SPECTRA = [  # (id, file text, words the message must hold)
    ("empty", "", "empty"),
    ("nan", _axis_rows(_PPM, [float("nan") if k == 50 else v for k, v in enumerate(_LINE)]),
     "NaN"),
    ("hz-axis", _axis_rows([p * 105.8 * 100 for p in _PPM], _LINE), "ppm"),
    ("unphased", _axis_rows(_PPM, [-v for v in _LINE]), "phase"),
]


@pytest.mark.parametrize("name,content,words", BAD_SPECTRA, ids=[c[0] for c in BAD_SPECTRA])
def test_a_bad_measured_spectrum_exits_2_naming_the_file(name, content, words, tmp_path,
                                                         capsys, monkeypatch):
    """`dynshift validate` (and so `run`, before any work) refuses a spectrum file that is
    empty, holds NaN, whose axis is not ppm-like, or which is unphased (mostly negative)."""
    monkeypatch.chdir(tmp_path)
    spectrum = tmp_path / f"{name}.txt"
    spectrum.write_text(content)
    code, err = _validate(tmp_path, MD.replace("analyze,", "analyze, spectrum,")
                          + f"spectrum: {{experiment: {{file: '{spectrum}'}}}}\n", capsys)
    assert code == 2, err
    assert "spectrum.experiment.file" in err and str(spectrum) in err, err
    assert words.lower() in err.lower(), err
    assert "Traceback" not in err
