"""Calibration of GPAW settings against the VASP SCAN Fermi-contact couplings (issue 30).

Each (setting, frame) is labelled by the project's own GPAW labeller
(:class:`jobs.labellers.gpaw.GpawLabeller` built from a :class:`schemas.label.GpawSpec`: its
gpaw-input.json, its run_gpaw.py, its result reading and its A_iso -> A_tot conversion), run
serially (one process, one BLAS/OpenMP thread) in ``<out>/<setting>/<frame>/``. A run whose
``result.json`` exists is not run again, so the study can be stopped and resumed.

Settings start from the shipped ``run/label-gpaw-p2-nmmo.yaml`` (spin-polarised PBE, LCAO dzp,
h 0.25 A, Gamma point, setups Mn.7 / Mg.2 / Na.1, total moment fixed at 48, Mn 3 mu_B) and are
named ``<xc>[U<eV>][-<option>...]``:

- ``pbe``: the shipped setting; ``pbeU4``: PBE+U, U = 4 eV on Mn d (setups ``{Mn: "7:d,4"}``);
- ``r2scan`` / ``scan``: libxc's r2SCAN / SCAN meta-GGA (needs ``-pw``);
- options: ``-pw<ecut eV>`` (plane waves instead of LCAO, GPAW's grid from the cutoff),
  ``-h<A>`` (grid spacing), ``-b<basis>`` (LCAO basis, e.g. ``-bszp``), ``-iter<N>`` (maxiter,
  for a cost probe: the run then ends unconverged and only its timings count).

Frames are ``file:index`` (a file name in ``--data`` or a path; OUTCARs have index 0), read with
:func:`jobs.frames.read_labelled_frames`; the reference is each frame's VASP A_tot
(``fermi_contact_mhz``). Per run: SCF iterations, seconds per SCF iteration, wall time, peak
memory, final total moment, the U GPAW reports, and for Na, Mg and Mn the slope, intercept and
R2 of GPAW A_tot against VASP A_tot, and the Na shift RMSE (eq. 1, :func:`jobs.shift.shift_ppm`
with the ``lin2022-nmmo`` constants on both sides).

Commands (run under ``nice``; the machine has 2 shared cores)::

    nice -n 10 .venv/bin/python benchmarks/bench_gpaw_calibration.py run \\
        --settings pbe,pbeU3,pbeU4,pbeU5,pbeU6 --frames OUTCAR.p63mcm-2:0
    nice -n 10 .venv/bin/python benchmarks/bench_gpaw_calibration.py run \\
        --settings pbeU4 --frames OUTCAR.p6322-8:0,p63mcm-dev.extxyz:17
    nice -n 10 .venv/bin/python benchmarks/bench_gpaw_calibration.py run \\
        --settings r2scan-pw400-iter3 --frames OUTCAR.p63mcm-2:0
    .venv/bin/python benchmarks/bench_gpaw_calibration.py summary --table /work/gpaw-cal/table.md \\
        --calibrate-on OUTCAR.p63mcm-2:0

``summary`` prints a markdown table (per setting: each frame, then all its frames pooled) and
notes; ``--table`` also writes it to a file; ``--calibrate-on FRAME`` adds the Na shift errors
that an affine map of the Na couplings, fitted on FRAME alone, leaves on the other frames.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.frames import FERMI_CONTACT_KEY, read_labelled_frames  # noqa: E402
from jobs.labellers.base import LabelError  # noqa: E402
from jobs.labellers.gpaw import RESULT_FILE, TEXT_LOG, GpawLabeller  # noqa: E402
from jobs.shift import ppm_per_mhz, shift_ppm  # noqa: E402
from schemas.label import GpawSpec  # noqa: E402
from schemas.shift import ShiftSpec  # noqa: E402

SHIPPED_MANIFEST = REPO / "run" / "label-gpaw-p2-nmmo.yaml"
DEFAULT_DATA = Path("/work/shared/data/p2-nmmo")
DEFAULT_OUT = Path("/work/gpaw-cal")
RECORD_FILE = "bench.json"
"""Per work dir: what this benchmark measured (written after the run ends)."""
SPECIES = ("Na", "Mg", "Mn")
TARGET_MOMENT = 48.0
MOMENT_TOLERANCE = 0.01
SERIAL_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
META_GGAS = {"r2scan": "MGGA_X_R2SCAN+MGGA_C_R2SCAN", "scan": "SCAN"}
SETTING_RE = re.compile(r"^(?P<xc>pbe|r2scan|scan)(?:U(?P<u>\d+(?:\.\d+)?))?"
                        r"(?P<options>(?:-[a-z]+[a-z0-9.]*)*)$")
OPTION_RE = re.compile(r"^(?P<key>pw|h|b|iter)(?P<value>[a-z0-9.]+)$")
ITER_RE = re.compile(r"^iter:\s+(\d+)\s+(\d\d):(\d\d):(\d\d)")
HUBBARD_RE = re.compile(r"Hubbard: \{U: ([-\d.]+),\s+# eV\s+l: (\d)")
MAXRSS_RE = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


# ---- settings ------------------------------------------------------------------------------
def shipped_gpaw_section() -> dict:
    """The `label.gpaw` section of the shipped GPAW manifest (the study's baseline)."""
    import yaml

    return dict(yaml.safe_load(SHIPPED_MANIFEST.read_text())["label"]["gpaw"])


def setting_section(name: str, walltime_s: float) -> dict:
    """The `label.gpaw` section of a named setting: the shipped one with its changes, launched
    as one process (``{python} {script}``, under /usr/bin/time for the peak memory). Its
    ``calibration`` (a map of the Na couplings, if any) is left out: the study compares GPAW's
    own couplings (summary --calibrate-on evaluates such a map)."""
    match = SETTING_RE.match(name)
    if match is None:
        raise SystemExit(f"setting {name!r}: expected <pbe|r2scan|scan>[U<eV>][-pw<ecut>]"
                         "[-h<A>][-b<basis>][-iter<N>]")
    section = {key: value for key, value in shipped_gpaw_section().items()
               if key in GpawSpec.model_fields and key != "calibration"}
    timer = ["/usr/bin/time", "-v", "-o", "time.txt"] if shutil.which("time") else []
    section["command"] = [*timer, "{python}", "{script}"]
    section["walltime_s"] = walltime_s
    section["env"] = {**dict(section.get("env", {})), **SERIAL_ENV}
    section["setups"] = dict(section["setups"])
    if match["xc"] in META_GGAS:
        section["xc"] = META_GGAS[match["xc"]]
    if match["u"] is not None:
        section["setups"]["Mn"] = f"{section['setups'].get('Mn', 'paw')}:d,{match['u']}"
    for option in filter(None, match["options"].split("-")):
        parsed = OPTION_RE.match(option)
        if parsed is None:
            raise SystemExit(f"setting {name!r}: unknown option -{option}")
        key, value = parsed["key"], parsed["value"]
        if key == "pw":
            section.update(mode="pw", ecut_ev=float(value), h_a=None)
        elif key == "h":
            section["h_a"] = float(value)
        elif key == "b":
            section["basis"] = value
        elif key == "iter":
            section["maxiter"] = int(value)
    return section


def build_labeller(name: str, walltime_s: float) -> GpawLabeller:
    """The project's GPAW labeller of a named setting (one process, rank 0)."""
    spec = GpawSpec(**setting_section(name, walltime_s))
    gyromagnetic = ShiftSpec().constants()["gyromagnetic_factor"]
    return GpawLabeller.from_spec(spec, gyromagnetic_factor=gyromagnetic, cores=1, rank=0)


# ---- frames --------------------------------------------------------------------------------
def resolve_frame_path(name: str, data_dir: Path) -> Path:
    """A frame file named on the command line: a path, else a file name in `data_dir`."""
    path = Path(name)
    return path if path.exists() else data_dir / name


def frame_tag(frame: str) -> str:
    """The work-dir name of a `file:index` frame (``OUTCAR.p63mcm-2_0``, ``p6322-dev_123``)."""
    name, index = split_frame(frame)
    stem = Path(name).name
    for suffix in (".extxyz", ".xyz"):
        stem = stem.removesuffix(suffix)
    return f"{stem}_{index}"


def split_frame(frame: str) -> tuple[str, int]:
    """`file:index` -> (file, index); a bare file is index 0."""
    name, _, index = frame.partition(":")
    return name, int(index or 0)


def load_reference_frame(frame: str, data_dir: Path, cache: dict):
    """The VASP-labelled frame `file:index` (ase.Atoms with `fermi_contact_mhz`)."""
    name, index = split_frame(frame)
    path = resolve_frame_path(name, data_dir)
    if path not in cache:
        cache[path] = read_labelled_frames(path)
    return cache[path][index]


# ---- one run -------------------------------------------------------------------------------
def run_or_reuse(labeller: GpawLabeller, atoms, work_dir: Path, title: str) -> tuple:
    """Label `atoms` in `work_dir` unless its result.json exists; returns (labelled frame or
    None, failure reason or None, whether GPAW was launched now)."""
    launched = not (work_dir / RESULT_FILE).is_file()
    try:
        if launched:
            labelled = labeller.label(atoms, work_dir, title)
        else:
            labelled = labeller.template.read_results(work_dir, atoms)
        return labelled, None, launched
    except LabelError as exc:
        return None, f"{exc.reason}: {exc.detail}"[:300], launched


def scf_log_figures(work_dir: Path) -> dict:
    """From GPAW's log: SCF iterations, seconds per iteration (median of the steps between
    iterations), the Hubbard U lines, and GPAW's memory estimate."""
    path = work_dir / TEXT_LOG
    if not path.is_file():
        return {"scf_iterations": None, "s_per_scf_iteration": None, "hubbard": []}
    text = path.read_text(errors="replace")
    stamps = []
    for line in text.splitlines():
        found = ITER_RE.match(line.strip())
        if found:
            h, m, s = (int(found[k]) for k in (2, 3, 4))
            stamps.append(h * 3600 + m * 60 + s)
    steps = np.diff(stamps) % 86400 if len(stamps) > 1 else np.array([])
    estimate = re.search(r"Total:\s+([\d.]+)\s*(MiB|GiB)", text)
    return {
        "scf_iterations": len(stamps) or None,
        "s_per_scf_iteration": float(np.median(steps)) if len(steps) else None,
        "hubbard": sorted({f"U = {m[1]} eV on l = {m[2]}" for m in HUBBARD_RE.finditer(text)}),
        "memory_estimate": " ".join(estimate.groups()) if estimate else None,
    }


def peak_memory_mib(work_dir: Path) -> float | None:
    """Peak resident memory of the run (MiB) from /usr/bin/time -v, when it was used."""
    path = work_dir / "time.txt"
    found = MAXRSS_RE.search(path.read_text()) if path.is_file() else None
    return int(found[1]) / 1024 if found else None


def linear_fit(reference: np.ndarray, values: np.ndarray) -> dict:
    """Slope, intercept and R2 of `values` = slope * `reference` + intercept."""
    slope, intercept = np.polyfit(reference, values, 1)
    residual = values - (slope * reference + intercept)
    total = ((values - values.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2),
            "n": int(len(reference))}


def coupling_comparison(reference, labelled) -> dict:
    """Per species the fit of GPAW A_tot against VASP A_tot, the Na shift errors (ppm) and the
    per-atom couplings (kept for pooling)."""
    symbols = np.array(reference.get_chemical_symbols())
    vasp = np.asarray(reference.arrays[FERMI_CONTACT_KEY], dtype=float)
    gpaw = np.asarray(labelled.arrays[FERMI_CONTACT_KEY], dtype=float)
    out = {s: linear_fit(vasp[symbols == s], gpaw[symbols == s]) for s in SPECIES}
    out.update(na_shift_errors(vasp[symbols == "Na"], gpaw[symbols == "Na"]))
    out["couplings_mhz"] = {s: {"vasp": vasp[symbols == s].tolist(),
                                "gpaw": gpaw[symbols == s].tolist()} for s in SPECIES}
    return out


def na_shift_errors(vasp_na: np.ndarray, gpaw_na: np.ndarray) -> dict:
    """RMSE, mean error (bias, GPAW - VASP) and the RMSE left once the bias is removed (the
    scatter: standard deviation of the errors) of the Na shifts, eq. 1 on both sides (ppm)."""
    spec = ShiftSpec()
    difference = shift_ppm(gpaw_na, spec) - shift_ppm(vasp_na, spec)
    return {"na_shift_rmse_ppm": float(np.sqrt(np.mean(difference ** 2))),
            "na_shift_bias_ppm": float(difference.mean()),
            "na_shift_sd_ppm": float(difference.std())}


def measure_run(setting: str, frame: str, args, cache: dict) -> dict:
    """Run (or reuse) one (setting, frame) and write its record (bench.json)."""
    work_dir = args.out / setting / frame_tag(frame)
    reference = load_reference_frame(frame, args.data, cache)
    labeller = build_labeller(setting, args.walltime)
    started = time.time()
    labelled, failure, launched = run_or_reuse(labeller, reference, work_dir,
                                               f"{setting} {frame}")
    record = {"setting": setting, "frame": frame, "work_dir": str(work_dir),
              "calculator": labeller.template.calculator_parameters(),
              "command": list(labeller.profile.command), "failure": failure}
    if launched:
        record["launch_wall_s"] = time.time() - started
    result_path = work_dir / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    record["wall_s"] = result.get("wall_s", record.get("launch_wall_s"))
    record["magnetic_moment"] = result.get("magnetic_moment")
    record.update(scf_log_figures(work_dir))
    record["peak_memory_mib"] = peak_memory_mib(work_dir)
    if labelled is not None:
        record.update(coupling_comparison(reference, labelled))
        moment = labelled.info["magnetic_moment_s"]
        if abs(moment - TARGET_MOMENT) > MOMENT_TOLERANCE:
            record["failure"] = f"moment {moment:.4f}, not {TARGET_MOMENT:g}"
    (work_dir / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


def run_study(args) -> None:
    """Every (setting, frame) of the command line, one after the other."""
    cache: dict = {}
    for setting in args.settings.split(","):
        for frame in args.frames.split(","):
            record = measure_run(setting, frame, args, cache)
            print(json.dumps(brief(record)), flush=True)


def brief(record: dict) -> dict:
    """The headline figures of a record (one JSON line while the study runs)."""
    keys = ("setting", "frame", "failure", "scf_iterations", "s_per_scf_iteration", "wall_s",
            "magnetic_moment", "na_shift_rmse_ppm", "na_shift_bias_ppm", "hubbard",
            "peak_memory_mib")
    out = {k: record.get(k) for k in keys}
    for s in SPECIES:
        if s in record:
            out[s] = {k: round(v, 4) for k, v in record[s].items() if k != "n"}
    return out


# ---- summary -------------------------------------------------------------------------------
def load_records(out: Path) -> list[dict]:
    """Every record under `out`, in the order the runs finished, its log figures read again
    (so that a record stays in step with this script's log parsing)."""
    paths = sorted(out.glob(f"*/*/{RECORD_FILE}"), key=lambda p: p.stat().st_mtime)
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        record.update(scf_log_figures(path.parent))
        record["peak_memory_mib"] = peak_memory_mib(path.parent)
        if "couplings_mhz" in record:
            na = record["couplings_mhz"]["Na"]
            record.update(na_shift_errors(np.asarray(na["vasp"]), np.asarray(na["gpaw"])))
        records.append(record)
    return records


def pooled_comparison(records: list[dict]) -> dict:
    """The fits and Na shift errors over the atoms of several frames together."""
    out = {}
    for s in SPECIES:
        vasp = np.concatenate([r["couplings_mhz"][s]["vasp"] for r in records])
        gpaw = np.concatenate([r["couplings_mhz"][s]["gpaw"] for r in records])
        out[s] = linear_fit(vasp, gpaw)
        if s == "Na":
            out.update(na_shift_errors(vasp, gpaw))
    return out


def number(value, digits: int) -> str:
    """A table cell: the value rounded, or a dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if digits else f"{value:.0f}"


def table_row(setting: str, frame: str, figures: dict) -> str:
    """One markdown row of a record (or of a pooled set of records)."""
    cells = [setting, frame, number(figures.get("scf_iterations"), 0),
             number(figures.get("s_per_scf_iteration"), 0), number(figures.get("wall_s"), 0),
             number(figures.get("magnetic_moment"), 3)]
    na = figures.get("Na", {})
    cells += [number(na.get("slope"), 3), number(na.get("intercept"), 2),
              number(na.get("r2"), 3), number(figures.get("na_shift_rmse_ppm"), 0),
              number(figures.get("na_shift_bias_ppm"), 0),
              number(figures.get("na_shift_sd_ppm"), 0)]
    for s in ("Mg", "Mn"):
        fit = figures.get(s, {})
        cells += [number(fit.get("slope"), 2), number(fit.get("r2"), 3)]
    status = figures.get("failure") or "ok"
    if "did not converge within" in status:
        status = "unconverged: " + status.split("within ")[1]
    cells.append(status)
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| setting | frame | SCF iter | s/iter | wall (s) | M (mu_B) | Na slope | Na intercept "
    "(MHz) | Na R2 | Na shift RMSE (ppm) | Na shift bias (ppm) | Na shift SD (ppm) | Mg slope "
    "| Mg R2 | Mn slope | Mn R2 | status |\n" + "| --- " * 17 + "|")


def setting_order(name: str) -> tuple:
    """Sort key of setting names: LCAO before options (pw, ...), then xc, then U."""
    match = SETTING_RE.match(name)
    return (match["options"], match["xc"] != "pbe", match["xc"], float(match["u"] or 0))


def summary_table(records: list[dict]) -> str:
    """The markdown table: per setting its frames, then (two or more frames) all pooled."""
    lines = [TABLE_HEADER]
    for setting in sorted({r["setting"] for r in records}, key=setting_order):
        mine = sorted((r for r in records if r["setting"] == setting), key=lambda r: r["frame"])
        for record in mine:
            lines.append(table_row(setting, record["frame"], record))
        usable = [r for r in mine if "couplings_mhz" in r and not r.get("failure")]
        if len(usable) > 1:
            pooled = pooled_comparison(usable)
            pooled["wall_s"] = float(np.mean([r["wall_s"] for r in usable]))
            pooled["scf_iterations"] = float(np.mean([r["scf_iterations"] for r in usable]))
            lines.append(table_row(f"**{setting}**", f"pooled ({len(usable)} frames; "
                                   "mean iter/wall)", pooled))
    return "\n".join(lines)


def summary_notes(records: list[dict]) -> str:
    """What the table's columns are, the U GPAW reported, and the eq. 1 constant."""
    hubbard = sorted({h for r in records for h in r.get("hubbard", [])})
    notes = [
        f"GPAW A_tot (project labeller, serial) vs VASP SCAN A_tot; slope/intercept/R2 of a "
        f"linear fit per species; Na shifts by eq. 1 on both sides "
        f"({ppm_per_mhz(ShiftSpec()):.2f} ppm/MHz); bias = mean(GPAW - VASP), SD = the "
        "RMSE left once the bias is removed; s/iter = median "
        "seconds between SCF iterations in GPAW's log; wall = the run script's wall time.",
        "Hubbard U lines in GPAW's logs: " + ("; ".join(hubbard) if hubbard else "none"),
    ]
    memory = [f"{r['setting']} {r['frame']}: {r['peak_memory_mib']:.0f} MiB"
              for r in records if r.get("peak_memory_mib")]
    if memory:
        notes.append("Peak memory: " + ", ".join(memory))
    return "\n\n".join(notes)


def mapped_na_errors(records: list[dict], fit_frame: str) -> str:
    """A second table: per setting, the affine map VASP = (GPAW - b) / a of the Na couplings
    fitted on `fit_frame` alone, and the Na shift errors it leaves on each other frame and on
    them pooled (the held-out check of a calibration such as the manifest's)."""
    lines = [f"Na couplings mapped to VASP's scale by an affine map fitted on {fit_frame} "
             "alone:", "",
             "| setting | map (a, b MHz) | frame | Na shift RMSE (ppm) | bias (ppm) | SD (ppm) |",
             "| --- " * 6 + "|"]
    usable = [r for r in records if "couplings_mhz" in r and not r.get("failure")]
    for setting in sorted({r["setting"] for r in usable}, key=setting_order):
        mine = sorted((r for r in usable if r["setting"] == setting), key=lambda r: r["frame"])
        fitted = [r for r in mine if r["frame"] == fit_frame]
        others = [r for r in mine if r["frame"] != fit_frame]
        if not fitted or not others:
            continue
        fit = fitted[0]["Na"]
        a, b = fit["slope"], fit["intercept"]
        vasp_all, mapped_all = [], []
        for record in others:
            na = record["couplings_mhz"]["Na"]
            vasp, mapped = np.asarray(na["vasp"]), (np.asarray(na["gpaw"]) - b) / a
            vasp_all.append(vasp)
            mapped_all.append(mapped)
            errors = na_shift_errors(vasp, mapped)
            lines.append(mapped_row(setting, a, b, record["frame"], errors))
        if len(others) > 1:
            errors = na_shift_errors(np.concatenate(vasp_all), np.concatenate(mapped_all))
            lines.append(mapped_row(setting, a, b, f"pooled ({len(others)} frames)", errors))
    return "\n".join(lines)


def mapped_row(setting: str, a: float, b: float, frame: str, errors: dict) -> str:
    """One markdown row of the mapped-couplings table."""
    return (f"| {setting} | {a:.4f}, {b:+.4f} | {frame} | "
            f"{number(errors['na_shift_rmse_ppm'], 0)} | {number(errors['na_shift_bias_ppm'], 0)}"
            f" | {number(errors['na_shift_sd_ppm'], 0)} |")


def run_commands(records: list[dict], out: Path) -> str:
    """The commands that make (or, resumed, read back) every record: one per setting."""
    script = "benchmarks/bench_gpaw_calibration.py"
    lines = ["Commands (from the repository root; each run serial, one thread):", "", "```"]
    for setting in sorted({r["setting"] for r in records}, key=setting_order):
        frames = sorted(r["frame"] for r in records if r["setting"] == setting)
        lines.append(f"nice -n 10 .venv/bin/python {script} run --out {out} \\\n"
                     f"    --settings {setting} --frames {','.join(frames)}")
    lines += [f".venv/bin/python {script} summary --out {out} --calibrate-on "
              "OUTCAR.p63mcm-2:0 --table table.md", "```"]
    return "\n".join(lines)


def summarise(args) -> None:
    """Print (and with --table write) the markdown table and notes of every record."""
    records = load_records(args.out)
    if not records:
        raise SystemExit(f"{args.out}: no records ({RECORD_FILE}) yet")
    text = summary_table(records) + "\n\n" + summary_notes(records) + "\n"
    if args.calibrate_on:
        text += "\n" + mapped_na_errors(records, args.calibrate_on) + "\n"
    text += "\n" + run_commands(records, args.out) + "\n"
    print(text)
    if args.table:
        Path(args.table).write_text(text)


def parse_arguments(argv=None):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="label (setting, frame) pairs, skipping finished ones")
    run.add_argument("--settings", required=True, help="comma-separated, e.g. pbe,pbeU4")
    run.add_argument("--frames", required=True, help="comma-separated file:index")
    run.add_argument("--walltime", type=float, default=3600.0, help="per run (s)")
    summary = sub.add_parser("summary", help="markdown table of the records under --out")
    summary.add_argument("--table", help="also write the table to this file")
    summary.add_argument("--calibrate-on", metavar="FRAME",
                         help="also: Na errors left by an affine map fitted on this frame")
    for p in (run, summary):
        p.add_argument("--out", type=Path, default=DEFAULT_OUT)
        p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_arguments(argv)
    if args.command == "run":
        run_study(args)
    else:
        summarise(args)


if __name__ == "__main__":
    main()
