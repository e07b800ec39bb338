"""The VASP labeller: a stateless template (write_input / read_results) and a profile (how to
launch: the command as an argument list, a wall-time limit), after ASE's template/profile split.

One frame is one VASP single point in its own work directory:

- POSCAR (atoms grouped by species in order of first appearance, the frame's title on line 1),
  KPOINTS (automatic mesh), INCAR (SCAN, spin-polarised, LASPH, LHYPERFINE with NGYROMAG per
  species in POTCAR order, NUPDOWN when given, the user's overrides), POTCAR (concatenated
  from the user's POTCAR folder in POSCAR species order);
- the launch command runs there with stdout/stderr in ``vasp.out``, in a new session so that a
  time-out kills its whole process group;
- the OUTCAR is accepted only when complete (timing footer), SCF-converged, readable by
  :func:`jobs.frames.read_outcar` (hyperfine table with one row per atom) and of this frame
  (same atoms at the same positions). The results come back in the frame's own atom order.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from engine.failure import InputError
from jobs.labellers.base import LabelError, LaunchProfile, TemplateLabeller

OUTPUT_LOG = "vasp.out"
"""The launch command's stdout and stderr, in the work directory."""
INPUT_FILES = ("POSCAR", "KPOINTS", "INCAR", "POTCAR")
POSITION_TOLERANCE_A = 2e-3
"""Largest distance (A) between a frame's atom and the OUTCAR's (printed to 1e-5 A)."""
_CONVERGED = "aborting loop because EDIFF is reached"
_UNCONVERGED_V6 = "EDIFF was not reached (unconverged)"
_COMPLETE = "General timing and accounting informations for this job"


def species_order(symbols: list[str]) -> list[str]:
    """Chemical species in order of first appearance (the POSCAR and POTCAR order)."""
    return list(dict.fromkeys(symbols))


def grouping_permutation(symbols: list[str]) -> np.ndarray:
    """Indices that group atoms by species (stable; species in order of first appearance)."""
    order = {s: i for i, s in enumerate(species_order(symbols))}
    return np.argsort([order[s] for s in symbols], kind="stable")


def format_incar_value(value) -> str:
    """An INCAR value: .TRUE./.FALSE. for booleans, lists space-separated."""
    if isinstance(value, bool):
        return ".TRUE." if value else ".FALSE."
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(format_incar_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def expand_command(command, cores: int, rank: int) -> tuple[str, ...]:
    """The launch command with `{cores}` and `{rank}` replaced in each argument (no shell)."""
    return tuple(str(arg).replace("{cores}", str(cores)).replace("{rank}", str(rank))
                 for arg in command)


@dataclass(frozen=True)
class VaspProfile(LaunchProfile):
    """How VASP is launched (jobs.labellers.LaunchProfile): its command, time limit and
    environment; output to ``vasp.out``."""

    section: str = "label.vasp"
    log_name: str = OUTPUT_LOG


@dataclass(frozen=True)
class VaspTemplate:
    """The input VASP is given and how its output is read; no state, no launching."""

    potcar_dir: Path | None
    potcar: Mapping[str, str]
    kpoints: tuple[int, int, int] = (2, 2, 2)
    kpoints_gamma: bool = True
    encut_ev: float = 400.0
    ediff_ev: float = 1e-5
    nelm: int = 200
    nupdown: float | None = None
    ngyromag: Mapping[str, float] = field(default_factory=dict)
    ngyromag_default: float = 100.0
    incar: Mapping[str, object] = field(default_factory=dict)

    # ---- input ----------------------------------------------------------------------------
    def potcar_path(self, species: str) -> Path:
        """The POTCAR file of `species` (`<potcar_dir>/<name>/POTCAR` or `<potcar_dir>/<name>`)."""
        if self.potcar_dir is None:
            raise InputError("label.vasp.potcar_dir: not set (the folder of your POTCARs)")
        name = self.potcar.get(species, species)
        for candidate in (Path(self.potcar_dir) / name / "POTCAR", Path(self.potcar_dir) / name):
            if candidate.is_file():
                return candidate
        raise InputError(f"label.vasp.potcar: no POTCAR for {species} (looked for "
                         f"{Path(self.potcar_dir) / name / 'POTCAR'})")

    def incar_tags(self, species: list[str], title: str = "dynshift") -> dict:
        """Every INCAR tag for a frame of `species` (POSCAR order): defaults, then overrides."""
        tags = {
            "SYSTEM": title, "PREC": "Normal", "ENCUT": self.encut_ev, "EDIFF": self.ediff_ev,
            "NELM": self.nelm, "ISMEAR": 0, "SIGMA": 0.05, "ISPIN": 2, "METAGGA": "SCAN",
            "LASPH": True, "LMAXMIX": 4, "LHYPERFINE": True,
            "NGYROMAG": [float(self.ngyromag.get(s, self.ngyromag_default)) for s in species],
            "IBRION": -1, "NSW": 0, "LREAL": "Auto", "LWAVE": False, "LCHARG": False,
        }
        if self.nupdown is not None:
            tags["NUPDOWN"] = self.nupdown
        tags.update({key.upper(): value for key, value in self.incar.items()})
        return tags

    def write_input(self, work_dir: Path, atoms: Atoms, title: str) -> None:
        """Write POSCAR, KPOINTS, INCAR and POTCAR for `atoms` into `work_dir`."""
        import ase.io

        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        symbols = atoms.get_chemical_symbols()
        species = species_order(symbols)
        grouped = atoms[grouping_permutation(symbols)]
        text = io.StringIO()
        ase.io.write(text, grouped, format="vasp", direct=True, parallel=False)
        lines = text.getvalue().splitlines(keepends=True)
        lines[0] = title.replace("\n", " ") + "\n"
        (work_dir / "POSCAR").write_text("".join(lines))
        mesh = " ".join(str(int(k)) for k in self.kpoints)
        (work_dir / "KPOINTS").write_text(
            f"Automatic mesh\n0\n{'Gamma' if self.kpoints_gamma else 'Monkhorst-Pack'}\n"
            f"{mesh}\n0 0 0\n")
        incar = "".join(f"{key} = {format_incar_value(value)}\n"
                        for key, value in self.incar_tags(species, title).items())
        (work_dir / "INCAR").write_text(incar)
        with open(work_dir / "POTCAR", "w") as potcar:
            for name in species:
                potcar.write(self.potcar_path(name).read_text())

    # ---- output ---------------------------------------------------------------------------
    def read_results(self, work_dir: Path, atoms: Atoms) -> Atoms:
        """The labelled frame from `work_dir`/OUTCAR, in the atom order of `atoms`.

        Raises
        ------
        LabelError
            ``no_outcar``, ``truncated`` (no timing footer), ``unconverged`` (SCF),
            ``bad_outcar`` (no or garbled hyperfine table, unreadable), ``atom_count``,
            ``wrong_frame`` (other species or positions than `atoms`).
        """
        from jobs.frames import FERMI_CONTACT_KEY, read_outcar

        outcar = Path(work_dir) / "OUTCAR"
        if not outcar.is_file():
            raise LabelError("no_outcar", f"{outcar} missing")
        text = outcar.read_text(errors="replace")
        if _COMPLETE not in text:
            raise LabelError("truncated", f"{outcar}: no timing footer (the run did not end)")
        if _CONVERGED not in text or _UNCONVERGED_V6 in text:
            raise LabelError("unconverged", f"{outcar}: SCF did not reach EDIFF "
                                            f"within NELM = {self.nelm}")
        try:
            result = read_outcar(outcar)  # ASE is rank-local (engine.context)
        except InputError as exc:
            raise LabelError("bad_outcar", str(exc)) from None
        if len(result) != len(atoms):
            raise LabelError("atom_count", f"{outcar}: {len(result)} atoms, the frame has "
                                           f"{len(atoms)}")
        order = grouping_permutation(atoms.get_chemical_symbols())
        grouped = atoms[order]
        if result.get_chemical_symbols() != grouped.get_chemical_symbols():
            raise LabelError("wrong_frame", f"{outcar}: species differ from the frame's")
        delta = result.positions - grouped.positions
        fractional = np.linalg.solve(atoms.cell.T, delta.T).T
        fractional -= np.round(fractional)
        distance = np.linalg.norm(fractional @ np.asarray(atoms.cell), axis=1)
        if distance.max() > POSITION_TOLERANCE_A:
            raise LabelError("wrong_frame", f"{outcar}: atom {int(order[distance.argmax()])} "
                                            f"is {distance.max():.3g} A from the frame's")
        inverse = np.argsort(order)
        labelled = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions,
                         cell=atoms.cell, pbc=True)
        labelled.arrays[FERMI_CONTACT_KEY] = result.arrays[FERMI_CONTACT_KEY][inverse]
        labelled.calc = SinglePointCalculator(
            labelled, energy=result.get_potential_energy(), forces=result.get_forces()[inverse])
        labelled.info["source"] = str(outcar)
        if "magnetic_moment_s" in result.info:
            labelled.info["magnetic_moment_s"] = result.info["magnetic_moment_s"]
        return labelled


class VaspLabeller(TemplateLabeller):
    """Labels frames with VASP: a :class:`VaspTemplate` run under a :class:`VaspProfile`."""

    name = "vasp"
    result_file = "OUTCAR"

    @classmethod
    def from_spec(cls, spec, gyromagnetic_factor: float = 100.0, cores: int = 1,
                  rank: int = 0) -> "VaspLabeller":
        """The labeller of a manifest's `label.vasp` section (schemas.label.VaspSpec); `{cores}`
        and `{rank}` in its command become this rank's cores and rank."""
        template = VaspTemplate(
            potcar_dir=spec.potcar_dir, potcar=dict(spec.potcar), kpoints=tuple(spec.kpoints),
            kpoints_gamma=spec.kpoints_gamma, encut_ev=spec.encut_ev, ediff_ev=spec.ediff_ev,
            nelm=spec.nelm, nupdown=spec.nupdown, ngyromag=dict(spec.ngyromag),
            ngyromag_default=gyromagnetic_factor, incar=dict(spec.incar))
        profile = VaspProfile(expand_command(spec.command, cores, rank), spec.walltime_s,
                              spec.kill_grace_s, dict(spec.env))
        return cls(template, profile)

    def check(self, species: list[str]) -> None:
        """Raise InputError for a missing POTCAR or launch program."""
        for name in species:
            self.template.potcar_path(name)
        self.profile.check()
