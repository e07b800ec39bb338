"""The run manifest: one YAML file, validated here, that drives one `mpirun`."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from schemas.analyze import AnalyzeSpec
from schemas.base import Spec, SpecError, duplicates
from schemas.checks import ChecksSpec
from schemas.infer import InferSpec
from schemas.label import LabelSpec
from schemas.learn import LearnSpec
from schemas.md import MdSpec
from schemas.potential import PotentialSpec
from schemas.probe import ProbeSpec
from schemas.report import ReportSpec
from schemas.shift import SHIFT_PRESETS, ShiftSpec
from schemas.system import BUILTIN_NAMES, BUILTIN_PREFIX, SystemSpec
from schemas.spectrum import LARMOR_MHZ_PER_T, SpectrumSpec
from schemas.train import TrainSpec

STAGE_ORDER = ("probe", "potential", "learn", "md", "label", "train", "infer", "analyze",
               "spectrum", "report")
"""Every stage, in the order a run executes them."""
StageName = Literal["probe", "potential", "learn", "md", "label", "train", "infer", "analyze",
                    "spectrum", "report"]


class Manifest(Spec):
    """A dynshift run: which stages to run, on which systems, with every knob of every stage."""

    stages: list[StageName] = Field(min_length=1)
    """Stages to run, in the order of STAGE_ORDER (probe, potential, learn, md, label, train,
    infer, analyze, spectrum, report)."""
    store: Path = Path("dynshift.h5")
    """The run store (one HDF5 file); relative to the working directory of `dynshift run`."""
    seed: int = Field(default=2022, ge=0)
    """Master seed; every stage derives its own streams from it (same manifest + rank count,
    same numbers)."""
    systems: list[SystemSpec] = []
    """The simulated systems (md, label, infer and analyze run over these)."""
    shift: ShiftSpec = ShiftSpec()
    """A_iso (MHz) -> shift (ppm) conversion constants."""
    probe: ProbeSpec = ProbeSpec()
    """Settings of the probe stage."""
    potential: PotentialSpec = PotentialSpec()
    """Settings of the potential stage."""
    learn: LearnSpec = LearnSpec()
    """Settings of the learn stage (concurrent learning; its labels use the label section)."""
    md: MdSpec = MdSpec()
    """Settings of the md stage."""
    label: LabelSpec = LabelSpec()
    """Settings of the label stage."""
    train: TrainSpec = TrainSpec()
    """Settings of the train stage."""
    infer: InferSpec = InferSpec()
    """Settings of the infer stage."""
    analyze: AnalyzeSpec = AnalyzeSpec()
    """Settings of the analyze stage."""
    spectrum: SpectrumSpec = SpectrumSpec()
    """Settings of the spectrum stage."""
    report: ReportSpec = ReportSpec()
    """Settings of the report stage."""
    checks: ChecksSpec = ChecksSpec()
    """Frame sanity checks (all stages)."""

    def _expand_temperatures(self) -> None:
        """`md.temperatures_k`: each system without its own temperature becomes one system per
        temperature, `<name>-<T>K` with base `<name>` (idempotent: an expanded manifest
        expands to itself)."""
        if not self.md.temperatures_k:
            return
        expanded = []
        for system in self.systems:
            if system.temperature_k is not None:
                expanded.append(system)
                continue
            for temperature in self.md.temperatures_k:
                expanded.append(system.model_copy(update={
                    "name": f"{system.name}-{temperature:g}K", "temperature_k": temperature,
                    "base": system.name}))
        self.__dict__["systems"] = expanded

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        self._expand_temperatures()           # first: every check sees the systems that run
        problems = _cross_section_problems(self)
        if problems:
            raise SpecError(*problems)
        return self

    def system(self, name: str) -> SystemSpec:
        """The system called `name`."""
        for system in self.systems:
            if system.name == name:
                return system
        raise KeyError(name)


def _cross_section_problems(manifest: Manifest) -> list[tuple[str, str]]:
    """Contradictions between sections (and with the stages that run), one per culprit."""
    problems: list[tuple[str, str]] = []
    stages = set(manifest.stages)
    repeated = duplicates(manifest.stages)
    order = [STAGE_ORDER.index(s) for s in manifest.stages]
    if repeated:
        problems.append(("stages", f"every stage at most once (got {', '.join(repeated)} twice)"))
    elif order != sorted(order):
        problems.append(("stages", f"must be in the order {', '.join(STAGE_ORDER)} (got "
                                   f"{', '.join(manifest.stages)})"))
    names = [s.name for s in manifest.systems]
    for index, system in enumerate(manifest.systems):
        if system.name == "arrhenius":
            problems.append((f"systems.{index}.name", "'arrhenius' is the analyze stage's "
                                                      "group of Arrhenius fits: rename the "
                                                      "system"))
        if names.index(system.name) != index:
            problems.append((f"systems.{index}.name", f"system names must be unique (got "
                                                      f"{system.name!r} twice)"))
        if system.structure.startswith(BUILTIN_PREFIX) and \
                system.structure[len(BUILTIN_PREFIX):] not in BUILTIN_NAMES:
            problems.append((f"systems.{index}.structure", f"unknown built-in structure (got "
                             f"{system.structure!r}; known: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)})"))
    needing = [s for s in ("learn", "md", "label", "infer", "analyze", "spectrum") if s in stages]
    if needing and not manifest.systems:
        problems.append(("systems", f"stages {', '.join(needing)} need at least one system "
                                    "(got none)"))
    problems += _shift_problems(manifest.shift)
    if "learn" in stages:
        targets = sorted({s.target_species for s in manifest.systems})
        if len(targets) > 1:
            problems.append(("systems", f"learn trains one shift model: every system needs the "
                                        f"same target_species (got {', '.join(targets)})"))

    infer = manifest.infer
    for key in infer.trajectories:
        if key not in names:
            problems.append((f"infer.trajectories.{key}", f"no system named {key!r} in systems "
                                                          f"(known: {', '.join(names) or '-'})"))
    if "infer" in stages and infer.shifts_from == "labels":
        if not infer.trajectories:
            problems.append(("infer.trajectories", "infer.shifts_from: labels takes the DFT shifts"
                                                   " of a labelled file per system (got none)"))
        else:
            for name in names:
                if name not in infer.trajectories:
                    problems.append(("infer.trajectories", f"no labelled file for system "
                                     f"{name!r} (infer.shifts_from: labels needs one per system)"))
    model_runs = "train" in stages or ("infer" in stages and infer.shifts_from == "model"
                                       and infer.model is None)
    if model_runs:
        for index, system in enumerate(manifest.systems):
            if system.target_species != manifest.train.centre:
                problems.append((f"systems.{index}.target_species",
                                 f"differs from train.centre, the nucleus of the shift model "
                                 f"(got {system.target_species!r}, train.centre "
                                 f"{manifest.train.centre!r})"))
    if "spectrum" in stages:
        problems += _spectrum_problems(manifest, names)
    framework = manifest.analyze.framework_species
    if framework is not None and "analyze" in stages:
        for system in manifest.systems:
            if system.target_species in framework:
                problems.append(("analyze.framework_species",
                                 f"holds the target species {system.target_species!r} of "
                                 f"system {system.name!r} (got {framework})"))
                break

    md = manifest.md
    if "md" in stages:
        from_md = [s for s in manifest.systems if s.name not in infer.trajectories]
        if "label" in stages and manifest.label.skip_saved >= md.frames:
            problems.append(("label.skip_saved", f"skips every saved md frame (got "
                                                 f"{manifest.label.skip_saved} >= md.frames "
                                                 f"{md.frames})"))
        if "infer" in stages and from_md and infer.skip_frames >= md.frames:
            problems.append(("infer.skip_frames", f"skips every md frame of system "
                                                  f"{from_md[0].name!r} (got {infer.skip_frames}"
                                                  f" >= md.frames {md.frames})"))
        elif "analyze" in stages and from_md and "infer" in stages:
            problems += _analyze_window_problems(manifest)
    return problems


def _spectrum_problems(manifest: Manifest, names: list[str]) -> list[tuple[str, str]]:
    """spectrum settings the systems and the shift constants cannot meet."""
    problems = []
    spectrum = manifest.spectrum
    for index, system in enumerate(manifest.systems):
        if system.name == "fit":
            problems.append((f"systems.{index}.name", "'fit' is the spectrum stage's own group "
                                                      "(/spectrum/fit); rename the system"))
        if system.target_species not in LARMOR_MHZ_PER_T:
            problems.append((f"systems.{index}.target_species",
                             f"the spectrum stage knows no NMR isotope of "
                             f"{system.target_species!r} (known: "
                             f"{', '.join(sorted(LARMOR_MHZ_PER_T))})"))
    try:
        constants = manifest.shift.constants()
    except ValueError:
        constants = None  # reported by _shift_problems
    if constants is not None:
        theta = constants["theta_k"]
        temperatures = [("spectrum.temperatures_k", t) for t in spectrum.temperatures_k]
        if spectrum.experiment is not None and spectrum.experiment.temperature_k is not None:
            temperatures.append(("spectrum.experiment.temperature_k",
                                 spectrum.experiment.temperature_k))
        for where, t in temperatures:
            if t <= theta:
                problems.append((where, f"must exceed shift.theta_k ({theta:g} K) for the "
                                        f"Curie-Weiss scaling (got {t:g})"))
    if spectrum.experiment is not None:
        for key in spectrum.experiment.systems:
            if key not in names:
                problems.append(("spectrum.experiment.systems",
                                 f"no system named {key!r} in systems (known: "
                                 f"{', '.join(names) or '-'})"))
    return problems


def _analyze_window_problems(manifest: Manifest) -> list[tuple[str, str]]:
    """analyze settings that the md trajectories (md -> infer -> analyze) cannot fill."""
    md, infer, analyze = manifest.md, manifest.infer, manifest.analyze
    problems = []
    per_replica = -(-(md.frames - infer.skip_frames) // infer.stride)
    if analyze.blocks_per_replica > per_replica:
        problems.append(("analyze.blocks_per_replica", f"more blocks than frames per replica "
                                                       f"(got {analyze.blocks_per_replica} > "
                                                       f"{per_replica} frames)"))
    if analyze.msd_fit_window_fs is not None and per_replica >= 3:
        max_lag = int(min(per_replica - 1, max(1, analyze.msd_max_lag_fraction * per_replica)))
        longest_fs = max_lag * md.save_every_steps * md.timestep_fs * infer.stride
        if analyze.msd_fit_window_fs[0] >= longest_fs:
            problems.append(("analyze.msd_fit_window_fs",
                             f"starts past the longest MSD lag of the md trajectories (got "
                             f"{list(analyze.msd_fit_window_fs)} fs; longest lag "
                             f"{longest_fs:g} fs)"))
    return problems


def _shift_problems(shift: ShiftSpec) -> list[tuple[str, str]]:
    """The shift constants: complete without a preset, and T > Theta."""
    try:
        shift.constants()
    except ValueError:
        pass
    else:
        return []
    values = dict(SHIFT_PRESETS[shift.preset]) if shift.preset else {}
    values.update({k: getattr(shift, k) for k in SHIFT_PRESETS["lin2022-nmmo"]
                   if getattr(shift, k) is not None})
    missing = [n for n in SHIFT_PRESETS["lin2022-nmmo"] if n not in values]
    if missing:
        return [(f"shift.{name}", "required when shift.preset is null (got null)")
                for name in missing]
    return [("shift.temperature_k", f"must exceed shift.theta_k (got temperature_k "
                                    f"{values['temperature_k']:g} <= theta_k "
                                    f"{values['theta_k']:g})")]


class ManifestError(Exception):
    """A manifest that cannot be read or validated; `errors` holds one line per bad field."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def report(self) -> str:
        """A human-readable listing: one line per bad field, by its path."""
        lines = [f"dynshift: invalid manifest {self.source} ({len(self.errors)} error"
                 f"{'s' if len(self.errors) != 1 else ''}):"]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def _section_fields(loc: tuple) -> list[str]:
    """Field names of the model section at `loc` (for suggestions on a misspelt key)."""
    model = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _shown(value) -> str:
    """A short repr of a bad input for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_union_tag(part) -> bool:
    """Whether a part of an error location names a branch of a union, not a field."""
    return isinstance(part, str) and part != "[key]" and ("[" in part or part in (
        "bool", "int", "float", "str", "list", "dict", "tuple", "none", "is-instance"))


def _message(err: dict) -> str:
    """The message of one pydantic error, in the manifest's words."""
    kind, message = err["type"], err["msg"]
    got = f" (got {_shown(err['input'])})" if "input" in err else ""
    if kind == "extra_forbidden":
        known = _section_fields(tuple(p for p in err["loc"][:-1] if not _is_union_tag(p)))
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        return "unknown key" + (f" (did you mean {close[0]}?)" if close else
                                f" (known: {', '.join(known)})" if known else "")
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {next(iter(err['ctx'].values()))}{got}"
    if kind == "missing":
        if err["loc"] and isinstance(err["loc"][-1], int):
            return f"too few values (entry {err['loc'][-1]} is missing)"
        return "required, but missing"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys (a section){got}"
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
        return message if "(got" in message else message + got
    return message + got


def _format_errors(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    unions: dict[str, list[dict]] = {}
    for err in exc.errors(include_url=False):
        parts = [p for p in err["loc"] if not _is_union_tag(p)]
        tags = len(err["loc"]) - len(parts)
        parts = [p for p in parts if p != "[key]"]
        path = ".".join(str(p) for p in parts)
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, SpecError):
            for field, message in error.problems:
                where = ".".join(p for p in (path, field) if p)
                lines.append(f"{where or '(manifest)'}: {message}")
            continue
        if tags:  # a branch of a union: one line for all branches
            if path not in unions:
                unions[path] = []
                lines.append(path)  # placeholder, filled below
            unions[path].append(err)
            continue
        lines.append(f"{path or '(manifest)'}: {_message(err)}")
    for path, errors in unions.items():
        finite = [e for e in errors if e["type"] == "finite_number"]
        if finite:
            text = _message(finite[0])
        else:
            messages = list(dict.fromkeys(e["msg"].removeprefix("Value error, ")
                                          for e in errors))
            got = f" (got {_shown(errors[0]['input'])})" if "input" in errors[0] else ""
            text = "not a valid value: " + "; or ".join(messages) + got
        lines[lines.index(path)] = f"{path}: {text}"
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML safe loader that refuses a key given twice in one mapping (YAML keeps the last
    silently, so a second `md:` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            try:
                key = self.construct_object(key_node, deep=True)
                hash(key)
            except Exception:  # noqa: BLE001 - the base class reports unhashable keys
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_manifest(text: str, source: str = "<manifest>", base_dir: Path | None = None) -> Manifest:
    """Validate manifest YAML text; relative input paths resolve against `base_dir`.

    Parameters
    ----------
    text, source
        The YAML text and where it came from (for messages).
    base_dir
        Folder that relative input paths are taken from (the manifest's folder).

    Raises
    ------
    ManifestError
        With one line per bad field, named by its dotted path (``md.replicas: ...``).
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ManifestError(source, [f"(manifest): not valid YAML: {detail}"]) from None
    if data is None:
        raise ManifestError(source, ["(manifest): the file is empty (it needs at least "
                                     "`stages: [...]`)"])
    if not isinstance(data, dict):
        raise ManifestError(source, [f"(manifest): must be a YAML mapping of sections (got "
                                     f"{type(data).__name__} {_shown(data)})"])
    try:
        manifest = Manifest.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ManifestError(source, _format_errors(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a validator that failed in an unforeseen way
        raise ManifestError(source, [f"(manifest): cannot be validated "
                                     f"({type(exc).__name__}: {exc})"]) from None
    return manifest


def load_manifest(path: str | Path) -> tuple[Manifest, str]:
    """Read and validate a manifest file; returns the model and the text it came from.

    The input files and folders it names are checked against the file system by
    :func:`engine.inputs.load_checked_manifest` (what `dynshift validate` and `run` call).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ManifestError(str(path), [f"{path}: not a text file (not UTF-8)"]) from None
    return parse_manifest(text, str(path), path.resolve().parent), text
