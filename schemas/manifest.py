"""The run manifest: one YAML file, validated here, that drives one `mpirun`."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from schemas.analyze import AnalyzeSpec
from schemas.base import Spec
from schemas.infer import InferSpec
from schemas.label import LabelSpec
from schemas.md import MdSpec
from schemas.potential import PotentialSpec
from schemas.probe import ProbeSpec
from schemas.report import ReportSpec
from schemas.shift import ShiftSpec
from schemas.system import SystemSpec
from schemas.train import TrainSpec

STAGE_ORDER = ("probe", "potential", "md", "label", "train", "infer", "analyze", "report")
"""Every stage, in the order a run executes them."""
StageName = Literal["probe", "potential", "md", "label", "train", "infer", "analyze", "report"]


class Manifest(Spec):
    """A dynshift run: which stages to run, on which systems, with every knob of every stage."""

    stages: list[StageName] = Field(min_length=1)
    """Stages to run, in the order of STAGE_ORDER (probe, potential, md, label, train, infer,
    analyze, report)."""
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
    report: ReportSpec = ReportSpec()
    """Settings of the report stage."""

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be unique and in the order {', '.join(STAGE_ORDER)}")
        names = [s.name for s in self.systems]
        if len(names) != len(set(names)):
            raise ValueError(f"system names must be unique, got {names}")
        if {"md", "label", "analyze"} & set(self.stages) and not self.systems:
            raise ValueError("stages md/label/analyze need at least one entry in `systems`")
        return self

    def system(self, name: str) -> SystemSpec:
        """The system called `name`."""
        for system in self.systems:
            if system.name == name:
                return system
        raise KeyError(name)


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


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            known = _section_fields(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]}?)" if close else
                                       f" (known: {', '.join(known)})" if known else "")
        elif err["type"] in _BOUNDS:
            message = f"must be {_BOUNDS[err['type']]} {next(iter(err['ctx'].values()))}" \
                      f" (got {err['input']!r})"
        elif err["type"] == "missing":
            message = "required, but missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{path}: {message}")
    return lines


def parse_manifest(text: str, source: str = "<manifest>", base_dir: Path | None = None) -> Manifest:
    """Validate manifest YAML text; relative input paths resolve against `base_dir`.

    Raises
    ------
    ManifestError
        With one line per bad field, named by its dotted path (``md.replicas: ...``).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ManifestError(source, ["the manifest must be a YAML mapping of sections"])
    try:
        return Manifest.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ManifestError(source, _format_errors(exc)) from None


def load_manifest(path: str | Path) -> tuple[Manifest, str]:
    """Read and validate a manifest file; returns the model and the text it came from."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(str(path), [f"cannot read: {exc.strerror}"]) from None
    return parse_manifest(text, str(path), path.resolve().parent), text
