"""Checks of a manifest against the file system, made before any work (rank 0, read-only).

Every input path that is given is checked, whether or not the stage that reads it runs in this
manifest (a typo is caught either way; a path the stages never read costs one `stat`). The
checks that need the species of the systems (POTCARs, the species a model knows) are made for
the stages that run. Checks that depend on what an existing store holds are made only for a
store that does not exist yet: an existing store is never opened here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.layouts.train import shift_model_facts
from schemas.infer import SHIPPED_SHIFT_MODEL
from schemas.system import BUILTIN_ATOMS, BUILTIN_NAMES, BUILTIN_PREFIX, builtin_species

SHIPPED_DP_TYPE_MAP = ("Na", "Mg", "Mn", "O")
"""Elements of the shipped DP model jobs/data/dp-p2-nmmo.pb."""


@dataclass(frozen=True)
class SystemFacts:
    """What validation learnt of a system's structure (without building a supercell)."""

    name: str
    structure: str
    atoms: int
    """Atoms of the simulated cell (structure x supercell)."""
    species: tuple[str, ...]
    """Elements present, in order of first appearance."""
    target_count: int
    """Atoms of the target species in the cell."""


def system_facts(system, problems: list[str] | None = None, index: int = 0) -> SystemFacts | None:
    """Atoms and species of a system's structure; None (and a problem) when it cannot be read."""
    problems = [] if problems is None else problems
    cells = system.supercell[0] * system.supercell[1] * system.supercell[2]
    where = f"systems.{index}.structure"
    if system.structure.startswith(BUILTIN_PREFIX):
        if system.structure[len(BUILTIN_PREFIX):] not in BUILTIN_NAMES:
            return None  # named by the schema check
        species = builtin_species(system.structure)
        counts = {"Na": 16, "O": 48, "Mn": 16}
        target = counts.get(system.target_species, 8 if system.target_species in species else 0)
        return SystemFacts(system.name, system.structure, BUILTIN_ATOMS * cells, species,
                           target * cells)
    path = Path(system.structure)
    if not path.exists():
        problems.append(f"{where}: file {path} not found")
        return None
    if not path.is_file():
        problems.append(f"{where}: {path} is a folder, not a structure file")
        return None
    try:
        import ase.io

        atoms = ase.io.read(path, index=0, parallel=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        problems.append(f"{where}: ASE cannot read {path} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]})")
        return None
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        problems.append(f"{where}: {path} needs a 3D periodic cell (got pbc "
                        f"{atoms.pbc.tolist()}, cell rank {atoms.cell.rank})")
        return None
    symbols = atoms.get_chemical_symbols()
    species = tuple(dict.fromkeys(symbols))
    return SystemFacts(system.name, str(path), len(atoms) * cells, species,
                       symbols.count(system.target_species) * cells)


def _exists(path: Path, where: str, kind: str = "file") -> str | None:
    """A problem line when `path` is not an existing `kind` ("file", "folder" or "either")."""
    if not path.exists():
        noun = {"file": "file ", "folder": "folder ", "either": ""}[kind]
        return f"{where}: {noun}{path} not found"
    if kind == "file" and not path.is_file():
        return f"{where}: {path} is a folder, not a file"
    if kind == "folder" and not path.is_dir():
        return f"{where}: {path} is a file, not a folder"
    return None


def _labelled_path(path: Path, where: str) -> str | None:
    """Labelled frames: a file, or a folder of OUTCAR* files (jobs/frames.py)."""
    problem = _exists(path, where, "either")
    if problem is None and path.is_dir() and not any(
            p.is_file() and p.name.startswith("OUTCAR") for p in path.iterdir()):
        problem = f"{where}: folder {path} holds no files named OUTCAR*"
    return problem




def input_problems(manifest, store: Path | None = None) -> list[str]:
    """Every problem of the manifest's input files, one line each (``path: what``).

    Parameters
    ----------
    manifest
        A validated :class:`schemas.manifest.Manifest`.
    store
        The store the run uses (``--store``); default ``manifest.store``.
    """
    problems: list[str] = []
    stages = set(manifest.stages)
    facts = [system_facts(s, problems, i) for i, s in enumerate(manifest.systems)]
    for index, (system, fact) in enumerate(zip(manifest.systems, facts)):
        if fact is not None and fact.target_count == 0 and stages & {"label", "infer", "analyze"}:
            problems.append(f"systems.{index}.target_species: no {system.target_species} atoms "
                            f"in {system.structure} (species {', '.join(fact.species)})")

    potential, train, infer, vasp = (manifest.potential, manifest.train, manifest.infer,
                                     manifest.label.vasp)
    if potential.model is not None:
        problems.append(_exists(Path(potential.model), "potential.model"))
    for i, path in enumerate(potential.frames):
        problems.append(_labelled_path(Path(path), f"potential.frames.{i}"))
    for i, path in enumerate(train.frames):
        problems.append(_labelled_path(Path(path), f"train.frames.{i}"))
    for i, path in enumerate(manifest.md.deviation_models):
        problems.append(_exists(Path(path), f"md.deviation_models.{i}"))
    model_facts = None
    if infer.model is not None:
        problem = _exists(Path(infer.model), "infer.model")
        if problem is None:
            centre, species, why = shift_model_facts(Path(infer.model))
            problem = f"infer.model: {why}" if why else None
            model_facts = (centre, species, "infer.model")
        problems.append(problem)
    for name, path in infer.trajectories.items():
        problem = _exists(Path(path), f"infer.trajectories.{name}")
        if problem is None and "infer" in stages and infer.shifts_from == "labels":
            problem = _labels_problem(Path(path), f"infer.trajectories.{name}")
        problems.append(problem)
    experiment = manifest.spectrum.experiment
    if experiment is not None and "spectrum" in stages:
        problem = _exists(Path(experiment.file), "spectrum.experiment.file", "either")
        if problem is None:
            from jobs.experiment import read_spectrum

            try:
                read_spectrum(experiment.file)
            except ValueError as exc:
                problem = f"spectrum.experiment.file: {exc}"
        problems.append(problem)
    if "label" in stages:
        problems += [_exists(Path(path), f"label.frames.{index}")
                     for index, path in enumerate(manifest.label.frames)]
    if vasp.potcar_dir is not None:
        problems.append(_exists(Path(vasp.potcar_dir), "label.vasp.potcar_dir", "folder"))
    oracle = manifest.label.model
    if oracle.dp_model is not None:
        problems.append(_exists(Path(oracle.dp_model), "label.model.dp_model"))
    if oracle.shift_model is not None:
        problem = _exists(Path(oracle.shift_model), "label.model.shift_model")
        if problem is None:
            why = shift_model_facts(Path(oracle.shift_model))[2]
            problem = f"label.model.shift_model: {why}" if why else None
        problems.append(problem)
    problems = [p for p in problems if p]

    if "label" in stages and manifest.label.labeller == "vasp":
        problems += _potcar_problems(vasp, facts)
    gpaw_here = manifest.label.labeller == "gpaw" and manifest.label.gpaw.python is None
    if "label" in stages and gpaw_here:
        import importlib.util

        if any(importlib.util.find_spec(m) is None for m in ("gpaw", "gpaw_data")):
            problems.append("label.labeller: gpaw, but this Python cannot import gpaw and "
                            "gpaw_data (DYNSHIFT_GPAW=1 bash run/install.sh, or set "
                            "label.gpaw.python)")
    store_path = Path(store if store is not None else manifest.store)
    if store_path.is_dir():
        problems.append(f"store: {store_path} is a folder, not a store file")
    new_store = not store_path.exists()
    problems += _model_problems(manifest, facts, model_facts, new_store)
    if new_store:
        problems += _new_store_problems(manifest, store_path)
    return problems


def _labels_problem(path: Path, where: str) -> str | None:
    """infer.shifts_from labels: frame 0 of the file must carry per-atom couplings."""
    try:
        import ase.io

        frame = ase.io.read(path, index=0, parallel=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        return f"{where}: ASE cannot read {path} ({type(exc).__name__})"
    if "fermi_contact_mhz" not in frame.arrays:
        return (f"{where}: frame 0 of {path} has no per-atom fermi_contact_mhz (needed by "
                "infer.shifts_from: labels)")
    return None


def _potcar_problems(vasp, facts) -> list[str]:
    """The vasp labeller will run: potcar_dir is set and holds a POTCAR of every species."""
    if vasp.potcar_dir is None:
        return ["label.vasp.potcar_dir: required by the vasp labeller (the folder of your "
                "POTCARs) (got null)"]
    folder = Path(vasp.potcar_dir)
    if not folder.is_dir():
        return []  # named above
    problems = []
    species = dict.fromkeys(s for f in facts if f is not None for s in f.species)
    for element in species:
        name = vasp.potcar.get(element, element)
        if not ((folder / name / "POTCAR").is_file() or (folder / name).is_file()):
            where = f"label.vasp.potcar.{element}" if element in vasp.potcar else \
                "label.vasp.potcar_dir"
            problems.append(f"{where}: no POTCAR for {element} (looked for "
                            f"{folder / name / 'POTCAR'} and {folder / name})")
    return problems


def _model_problems(manifest, facts, model_facts, new_store: bool) -> list[str]:
    """Species of the systems that the DP model or the shift model would not know."""
    stages = set(manifest.stages)
    problems = []
    potential = manifest.potential
    type_map, source = None, None
    if "learn" in stages:  # the campaign trains its own DP models (and md uses them)
        type_map, source = manifest.learn.dp.type_map, "learn.dp.type_map"
    elif "md" in stages:
        if "potential" in stages and potential.frames:
            type_map, source = potential.type_map, "potential.type_map"
        elif potential.model is None and not potential.frames and (
                "potential" in stages or new_store):
            type_map, source = SHIPPED_DP_TYPE_MAP, "the shipped DP model (jobs/data/dp-p2-nmmo.pb)"
    for index, fact in enumerate(facts):
        if fact is None or type_map is None:
            continue
        unknown = [s for s in fact.species if s not in type_map]
        if unknown:
            what = "learn cannot train on it" if "learn" in stages else "md cannot run it"
            problems.append(f"systems.{index}.structure: species {unknown} unknown to {source} "
                            f"(knows {list(type_map)}); {what}")
    train, infer = manifest.train, manifest.infer
    soap_species, soap_source = None, None
    if "train" in stages and stages & {"label", "infer"}:
        soap_species, soap_source = train.species, "train.species"
    elif "infer" in stages and infer.shifts_from == "model":
        if model_facts is not None and model_facts[1] is not None:
            soap_species, soap_source = model_facts[1], "the model of infer.model"
            centre = model_facts[0]
            for index, system in enumerate(manifest.systems):
                if centre is not None and system.target_species != centre:
                    problems.append(f"systems.{index}.target_species: infer.model predicts "
                                    f"{centre} shifts (got {system.target_species!r})")
        elif infer.model is None and new_store and "learn" not in stages and \
                SHIPPED_SHIFT_MODEL.is_file():  # a campaign brings its own shift model
            centre, species, why = shift_model_facts(SHIPPED_SHIFT_MODEL)
            if why is None and species:
                soap_species, soap_source = species, "the shipped GPR shift model"
    if soap_species is not None:
        for index, fact in enumerate(facts):
            if fact is None:
                continue
            unknown = [s for s in fact.species if s not in soap_species]
            if unknown:
                problems.append(f"systems.{index}.structure: species {unknown} are not among "
                                f"the SOAP species of {soap_source} ({list(soap_species)})")
    return problems


def _new_store_problems(manifest, store_path: Path) -> list[str]:
    """Inputs that a new (empty) store cannot provide: a stage whose input no stage makes."""
    stages = set(manifest.stages)
    problems = []
    where = f"store {store_path} does not exist yet"
    if "label" in stages and "md" not in stages and not manifest.label.frames:
        problems.append(f"stages: label chooses frames from md trajectories, but md does not "
                        f"run, label.frames names no files, and {where} (got "
                        f"{', '.join(manifest.stages)})")
    if "train" in stages and not manifest.train.frames and "label" not in stages:
        problems.append(f"train.frames: no labelled frames: the list is empty, the label stage "
                        f"does not run and {where}")
    if "infer" in stages and "md" not in stages:
        for index, system in enumerate(manifest.systems):
            if system.name not in manifest.infer.trajectories:
                problems.append(f"infer.trajectories: no file for system {system.name!r}, and "
                                f"md does not run ({where})")
    if "spectrum" in stages and "analyze" not in stages:
        problems.append(f"stages: spectrum reads the site shifts and hop rates of the analyze "
                        f"stage, but analyze does not run and {where} (got "
                        f"{', '.join(manifest.stages)})")
    if "analyze" in stages and "infer" not in stages:
        problems.append(f"stages: analyze reads the shifts of the infer stage, but infer does "
                        f"not run and {where} (got {', '.join(manifest.stages)})")
    return problems


def load_checked_manifest(path: str | Path, store: Path | None = None):
    """Read and validate a manifest file, and check its input files and folders.

    Parameters
    ----------
    path
        The manifest file.
    store
        The store the run will use when it is not the manifest's own (``dynshift run
        --store``).

    Returns
    -------
    (Manifest, str)
        The model and the text it came from.

    Raises
    ------
    schemas.ManifestError
        With one line per bad field or input file.
    """
    from schemas import ManifestError, load_manifest

    manifest, text = load_manifest(path)
    try:
        problems = input_problems(manifest, store)
    except Exception as exc:  # noqa: BLE001 - never a traceback for an input
        problems = [f"(manifest): the input files cannot be checked "
                    f"({type(exc).__name__}: {exc})"]
    if problems:
        raise ManifestError(str(path), problems)
    return manifest, text
