"""The GPAW labeller: an open PAW code in place of VASP, with the same template/profile split.

One frame is one GPAW single point in its own work directory:

- ``gpaw-input.json``: the frame (numbers, positions, cell, initial magnetic moments) and the
  GPAW keywords (mode, basis, xc, k-points, spin, occupations with a fixed total moment when
  given, mixer, convergence, maxiter) that :class:`GpawTemplate` makes of the manifest;
- ``run_gpaw.py``: a self-contained run script (:data:`RUN_SCRIPT`, needs only GPAW and ASE)
  that runs the SCF in parallel over the processes it is started with, writes the density to
  ``frame.gpw``, computes the hyperfine tensors on one process with
  ``gpaw.hyperfine.hyperfine_parameters(calc, exclude_core=True)`` and writes ``result.json``
  (atomically, last);
- the launch command (an argument list, e.g. ``["mpirun", "-np", "{cores}", "{python}",
  "{script}"]``) runs there with its output in ``gpaw.out``, in a new session so that a time-out
  kills its whole process group.

GPAW reports the isotropic coupling in eV per unit nuclear g-factor, integrated over the spin
density n_up - n_down and with the frozen-core polarisation unless excluded. The project (and
the shared VASP data, eq. 1 and every model trained on them) uses VASP's A_tot: A_pw - A_1PS +
A_1AE without the core term A_1c, in MHz, per unit of the total moment ("Total magnetic moment
S=", in mu_B) and with NGYROMAG as the nuclear factor. :func:`vasp_fermi_contact_mhz` is the one
place that converts the first into the second.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from engine.failure import InputError
from jobs.labellers.base import LabelError, LaunchProfile, TemplateLabeller
from jobs.labellers.vasp import POSITION_TOLERANCE_A

OUTPUT_LOG = "gpaw.out"
"""The launch command's stdout and stderr, in the work directory."""
INPUT_FILE = "gpaw-input.json"
SCRIPT_FILE = "run_gpaw.py"
"""The run script's name in the work directory (not gpaw.py: it would hide the gpaw package)."""
RESULT_FILE = "result.json"
TEXT_LOG = "gpaw.txt"
"""GPAW's own log (its `txt`)."""

DEFAULT_ENV = {"GPAW_MPI_BACKEND": "cgpaw", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
"""Environment of every GPAW launch (`label.gpaw.env` wins): GPAW's own MPI (its C extension,
so that `mpirun -np N python run_gpaw.py` runs in parallel without `gpaw python`), and one BLAS
/ OpenMP thread per MPI process."""

PLANCK_J_S = 6.62607015e-34
ELEMENTARY_CHARGE_C = 1.602176634e-19
NUCLEAR_MAGNETON_J_PER_T = 5.0507837393e-27
MHZ_PER_EV = ELEMENTARY_CHARGE_C / PLANCK_J_S * 1e-6
"""1 eV as a frequency E/h (MHz)."""


def nuclear_g_factor(gyromagnetic_mhz_per_t: float) -> float:
    """The nuclear g-factor of a gyromagnetic ratio gamma/2pi (MHz/T): g = h (gamma/2pi) / mu_N.

    VASP's NGYROMAG is gamma/2pi in MHz/T; GPAW's tensors are per unit g-factor.
    """
    return gyromagnetic_mhz_per_t * 1e6 * PLANCK_J_S / NUCLEAR_MAGNETON_J_PER_T


def vasp_fermi_contact_mhz(a_iso_ev_per_g, total_magmom_mu_b: float,
                           ngyromag_mhz_per_t) -> np.ndarray:
    """GPAW's isotropic hyperfine couplings in VASP's A_tot convention (MHz).

    Parameters
    ----------
    a_iso_ev_per_g
        Per atom, the trace / 3 of ``gpaw.hyperfine.hyperfine_parameters(calc,
        exclude_core=True)``: eV per unit nuclear g-factor, proportional to the spin density
        n_up - n_down at the nucleus (not divided by the spin), without the frozen-core term
        (VASP's A_tot has no A_1c either).
    total_magmom_mu_b
        The cell's total magnetic moment N_up - N_down (mu_B), VASP's "Total magnetic moment
        S=" (48 for the 88-atom P2-NMMO cell, 1 for an H atom).
    ngyromag_mhz_per_t
        Per atom (or one value for all), the nuclear gamma/2pi (MHz/T) that VASP's NGYROMAG
        sets; the project uses the shift section's `gyromagnetic_factor` (100).

    Returns
    -------
    numpy.ndarray
        A_tot (MHz) per atom: E/h of the coupling times g_N, divided by the total moment. For a
        free H atom (moment 1, 42.577 MHz/T) that is the 1420 MHz line; for a cell with moment
        M it is the coupling per unit of the cell's spin, which eq. 1 multiplies by S_cell.

    Raises
    ------
    ValueError
        When the total moment is zero or not finite (the coupling per spin is undefined).
    """
    if not np.isfinite(total_magmom_mu_b) or abs(total_magmom_mu_b) < 1e-8:
        raise ValueError(f"total magnetic moment {total_magmom_mu_b!r}: A per unit spin needs "
                         "a spin-polarised cell with a non-zero moment")
    g_n = nuclear_g_factor(np.asarray(ngyromag_mhz_per_t, dtype=float))
    return np.asarray(a_iso_ev_per_g, dtype=float) * g_n * MHZ_PER_EV / total_magmom_mu_b


def gpaw_importable() -> bool:
    """True when GPAW and its PAW setups (gpaw-data) can be imported by this interpreter."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("gpaw", "gpaw_data"))


def expand_command(command, cores: int, rank: int, python: str | None = None,
                   script: str = SCRIPT_FILE) -> tuple[str, ...]:
    """The launch command with `{cores}`, `{rank}`, `{python}` (this interpreter, unless given)
    and `{script}` (the run script's file name) replaced in each argument (no shell)."""
    values = {"{cores}": str(cores), "{rank}": str(rank), "{python}": python or sys.executable,
              "{script}": script}
    expanded = []
    for arg in command:
        arg = str(arg)
        for key, value in values.items():
            arg = arg.replace(key, value)
        expanded.append(arg)
    return tuple(expanded)


@dataclass(frozen=True)
class GpawProfile(LaunchProfile):
    """How GPAW is launched (jobs.labellers.LaunchProfile): its command, time limit and
    environment; output to ``gpaw.out``."""

    section: str = "label.gpaw"
    log_name: str = OUTPUT_LOG


@dataclass(frozen=True)
class GpawTemplate:
    """The input GPAW is given and how its result is read; no state, no launching."""

    mode: str = "pw"
    ecut_ev: float = 400.0
    basis: str = "dzp"
    h_a: float | None = None
    kpts: tuple[int, int, int] = (1, 1, 1)
    kpts_gamma: bool = True
    xc: str = "PBE"
    setups: Mapping[str, str] = field(default_factory=dict)
    fixed_magmom: float | None = None
    magmoms: Mapping[str, float] = field(default_factory=dict)
    smearing_ev: float = 0.05
    mixer_beta: float = 0.05
    mixer_nmaxold: int = 5
    mixer_weight: float = 50.0
    energy_tol_ev: float = 5e-4
    density_tol: float = 1e-4
    maxiter: int = 300
    ngyromag: Mapping[str, float] = field(default_factory=dict)
    ngyromag_default: float = 100.0
    gpaw: Mapping[str, object] = field(default_factory=dict)
    moment_tolerance: float = 0.5
    calibration: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    # ---- input ----------------------------------------------------------------------------
    def initial_magmoms(self, atoms: Atoms) -> list[float]:
        """Initial moment per atom (mu_B): `magmoms[species]`, else 0. With a fixed total
        moment (GPAW fixes N_up - N_down to the sum of the initial moments) they are scaled to
        add up to it, or, if they add up to zero, the total is spread evenly over the atoms."""
        moments = np.array([float(self.magmoms.get(s, 0.0))
                            for s in atoms.get_chemical_symbols()])
        if self.fixed_magmom is not None:
            total = moments.sum()
            if abs(total) > 1e-12:
                moments *= self.fixed_magmom / total
            else:
                moments = np.full(len(atoms), self.fixed_magmom / len(atoms))
        return moments.tolist()

    def requested_moment(self, atoms: Atoms) -> float | None:
        """The total moment (mu_B) the run must end with: the fixed one, else the sum of the
        initial moments when any is given; None when nothing is requested."""
        if self.fixed_magmom is not None:
            return float(self.fixed_magmom)
        moments = self.initial_magmoms(atoms)
        return float(sum(moments)) if any(moments) else None

    def start_moments(self, atoms: Atoms, restarts: int) -> list[float]:
        """The initial moments of a run after `restarts` runs that ended in another spin state:
        the requested ones first; then the moments of the magnetic atoms drawn anew (seeded by
        the restart number, +-50 %) and scaled back to the same total, so the SCF starts from
        another point of the spin landscape."""
        moments = np.asarray(self.initial_magmoms(atoms), dtype=float)
        if restarts <= 0 or not np.any(moments):
            return moments.tolist()
        total = moments.sum()
        rng = np.random.default_rng(1000 + restarts)
        varied = moments * rng.uniform(0.5, 1.5, size=len(moments))
        if abs(varied.sum()) > 1e-12:
            varied *= total / varied.sum()
        return varied.tolist()

    def calculator_parameters(self) -> dict:
        """The GPAW keywords of a frame: defaults of this template, then `gpaw` overrides."""
        mode = {"name": "pw", "ecut": self.ecut_ev} if self.mode == "pw" else {"name": "lcao"}
        occupations = {"name": "fermi-dirac", "width": self.smearing_ev}
        if self.fixed_magmom is not None:
            occupations["fixmagmom"] = True
        parameters = {
            "mode": mode, "xc": self.xc, "spinpol": True, "occupations": occupations,
            "kpts": {"size": list(self.kpts), "gamma": self.kpts_gamma},
            "mixer": {"backend": "pulay", "beta": self.mixer_beta,
                      "nmaxold": self.mixer_nmaxold, "weight": self.mixer_weight},
            "convergence": {"energy": self.energy_tol_ev, "density": self.density_tol},
            "maxiter": self.maxiter,
        }
        if self.mode == "lcao":
            parameters["basis"] = self.basis
        if self.h_a is not None:
            parameters["h"] = self.h_a
        if self.setups:
            parameters["setups"] = dict(self.setups)
        parameters.update(dict(self.gpaw))
        return parameters

    def write_input(self, work_dir: Path, atoms: Atoms, title: str) -> None:
        """Write gpaw-input.json and the run script for `atoms` into `work_dir`."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        document = {
            "title": title, "numbers": atoms.numbers.tolist(),
            "positions_a": atoms.positions.tolist(), "cell_a": np.asarray(atoms.cell).tolist(),
            "pbc": [bool(p) for p in atoms.pbc],
            "magmoms": self.start_moments(atoms, len(list(
                work_dir.glob("attempt-*-wrong_spin_state")))),
            "calculator": self.calculator_parameters(), "txt": TEXT_LOG,
        }
        (work_dir / INPUT_FILE).write_text(json.dumps(document, indent=1))
        (work_dir / SCRIPT_FILE).write_text(RUN_SCRIPT)

    # ---- output ---------------------------------------------------------------------------
    def calibrated(self, atoms: Atoms, a_tot_mhz: np.ndarray) -> np.ndarray:
        """A_tot mapped to the reference functional for the species of `calibration`:
        (A - intercept) / slope; other species unchanged."""
        out = np.array(a_tot_mhz, dtype=float)
        symbols = np.array(atoms.get_chemical_symbols())
        for species, (slope, intercept) in self.calibration.items():
            rows = symbols == species
            out[rows] = (out[rows] - intercept) / slope
        return out

    def _check_spin_state(self, path: Path, atoms: Atoms, magmom: float) -> None:
        requested = self.requested_moment(atoms)
        if requested is not None and abs(magmom - requested) > self.moment_tolerance:
            raise LabelError("wrong_spin_state", f"{path}: total moment {magmom:.3f} mu_B, "
                                                 f"requested {requested:g} (tolerance "
                                                 f"{self.moment_tolerance:g}): another spin "
                                                 "state; the retry starts from other moments")

    def ngyromag_of(self, atoms: Atoms) -> np.ndarray:
        """NGYROMAG (MHz/T) per atom: `ngyromag[species]`, else `ngyromag_default`."""
        return np.array([float(self.ngyromag.get(s, self.ngyromag_default))
                         for s in atoms.get_chemical_symbols()])

    def read_results(self, work_dir: Path, atoms: Atoms) -> Atoms:
        """The labelled frame from `work_dir`/result.json, couplings in VASP's convention.

        Raises
        ------
        LabelError
            ``no_result`` (no result.json: the run did not end), ``bad_result`` (unreadable or
            missing fields), ``unconverged`` (SCF), ``atom_count``, ``wrong_frame`` (other
            species or positions than `atoms`).
        """
        from jobs.frames import FERMI_CONTACT_KEY

        path = Path(work_dir) / RESULT_FILE
        if not path.is_file():
            raise LabelError("no_result", f"{path} missing (the run did not end)")
        try:
            result = json.loads(path.read_text())
            numbers = np.asarray(result["numbers"], dtype=int)
            positions = np.asarray(result["positions_a"], dtype=float)
            converged = bool(result["converged"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabelError("bad_result", f"{path}: {exc}") from None
        if not converged:
            raise LabelError("unconverged", f"{path}: SCF did not converge within maxiter = "
                                            f"{self.maxiter}")
        if len(numbers) != len(atoms):
            raise LabelError("atom_count", f"{path}: {len(numbers)} atoms, the frame has "
                                           f"{len(atoms)}")
        if not np.array_equal(numbers, atoms.numbers):
            raise LabelError("wrong_frame", f"{path}: species differ from the frame's")
        delta = np.linalg.solve(np.asarray(atoms.cell).T, (positions - atoms.positions).T).T
        distance = np.linalg.norm((delta - np.round(delta)) @ np.asarray(atoms.cell), axis=1)
        if distance.max() > POSITION_TOLERANCE_A:
            raise LabelError("wrong_frame", f"{path}: atom {int(distance.argmax())} is "
                                            f"{distance.max():.3g} A from the frame's")
        try:
            energy = float(result["energy_ev"])
            forces = np.asarray(result["forces_ev_a"], dtype=float).reshape(len(atoms), 3)
            magmom = float(result["magnetic_moment"])
            self._check_spin_state(path, atoms, magmom)
            a_iso = np.asarray(result["a_iso_ev_per_g"], dtype=float).reshape(len(atoms))
            a_tot = vasp_fermi_contact_mhz(a_iso, magmom, self.ngyromag_of(atoms))
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelError("bad_result", f"{path}: {exc}") from None
        if not (math.isfinite(energy) and np.isfinite(forces).all()
                and np.isfinite(a_tot).all()):
            raise LabelError("bad_result", f"{path}: non-finite energy, forces or couplings")
        a_tot = self.calibrated(atoms, a_tot)
        labelled = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
        labelled.arrays[FERMI_CONTACT_KEY] = a_tot
        labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces)
        labelled.info["source"] = str(path)
        labelled.info["magnetic_moment_s"] = magmom
        return labelled


class GpawLabeller(TemplateLabeller):
    """Labels frames with GPAW: a :class:`GpawTemplate` run under a :class:`GpawProfile`."""

    name = "gpaw"
    result_file = RESULT_FILE

    @classmethod
    def from_spec(cls, spec, gyromagnetic_factor: float = 100.0, cores: int = 1,
                  rank: int = 0) -> "GpawLabeller":
        """The labeller of a manifest's `label.gpaw` section (schemas.label.GpawSpec); `{cores}`,
        `{rank}`, `{python}` and `{script}` in its command are filled in for this rank."""
        template = GpawTemplate(
            mode=spec.mode, ecut_ev=spec.ecut_ev, basis=spec.basis, h_a=spec.h_a,
            kpts=tuple(spec.kpts), kpts_gamma=spec.kpts_gamma, xc=spec.xc,
            setups=dict(spec.setups), fixed_magmom=spec.fixed_magmom,
            magmoms=dict(spec.magmoms), smearing_ev=spec.smearing_ev,
            mixer_beta=spec.mixer_beta, mixer_nmaxold=spec.mixer_nmaxold,
            mixer_weight=spec.mixer_weight, energy_tol_ev=spec.energy_tol_ev,
            density_tol=spec.density_tol, maxiter=spec.maxiter, ngyromag=dict(spec.ngyromag),
            ngyromag_default=gyromagnetic_factor, gpaw=dict(spec.gpaw),
            moment_tolerance=spec.moment_tolerance,
            calibration={k: (float(v[0]), float(v[1])) for k, v in spec.calibration.items()})
        env = {**DEFAULT_ENV, **dict(spec.env)}
        profile = GpawProfile(expand_command(spec.command, cores, rank, spec.python),
                              spec.walltime_s, spec.kill_grace_s, env)
        return cls(template, profile)

    def check(self, species: list[str]) -> None:
        """Raise InputError for a missing launch program, or when the command runs this
        interpreter and it cannot import gpaw."""
        self.profile.check()
        if sys.executable in self.profile.command and not gpaw_importable():
            raise InputError("label.labeller: gpaw, but this Python cannot import gpaw "
                             "(install it: DYNSHIFT_GPAW=1 bash run/install.sh, or set "
                             "label.gpaw.python to one that has it)")


RUN_SCRIPT = r'''"""dynshift's GPAW run script: one spin-polarised single point, its couplings.

Reads gpaw-input.json, runs the SCF on every process it was started with (mpirun -np N python
run_gpaw.py), writes frame.gpw, then on process 0 alone: hyperfine tensors with the frozen-core
term excluded, and result.json (written to a temporary name and renamed, so it exists only
complete). An SCF that does not converge within maxiter gives result.json with converged false.
"""
import json
import os
import time

import numpy as np
from ase import Atoms

from gpaw import KohnShamConvergenceError
from gpaw.mpi import serial_comm, world
from gpaw.old.calculator import GPAW


def main():
    started = time.time()
    with open("gpaw-input.json") as handle:
        config = json.load(handle)
    atoms = Atoms(numbers=config["numbers"], positions=config["positions_a"],
                  cell=config["cell_a"], pbc=config["pbc"])
    atoms.set_initial_magnetic_moments(config["magmoms"])
    parameters = dict(config["calculator"])
    magmom_fixed = parameters["occupations"].get("fixmagmom", False)
    atoms.calc = GPAW(txt=config["txt"], **parameters)
    result = {"numbers": config["numbers"], "positions_a": config["positions_a"],
              "converged": True}
    try:
        result["energy_ev"] = float(atoms.get_potential_energy())
        result["forces_ev_a"] = atoms.get_forces().tolist()
    except KohnShamConvergenceError:
        result["converged"] = False
    if result["converged"]:
        calc = atoms.calc
        result["magnetic_moment"] = float(calc.get_magnetic_moment())
        result["magnetic_moments"] = calc.get_magnetic_moments().tolist()
        result["fixed_magmom"] = bool(magmom_fixed)
        calc.write("frame.gpw")
    world.barrier()
    if world.rank == 0:
        if result["converged"]:
            from gpaw.hyperfine import hyperfine_parameters

            serial = GPAW("frame.gpw", txt=None, communicator=serial_comm)
            tensors = hyperfine_parameters(serial, exclude_core=True)
            result["a_iso_ev_per_g"] = (np.trace(tensors, axis1=1, axis2=2) / 3).tolist()
            result["core_excluded"] = True
            import gpaw
            result["gpaw_version"] = gpaw.__version__
        result["processes"] = world.size
        result["wall_s"] = time.time() - started
        with open("result.json.tmp", "w") as handle:
            json.dump(result, handle)
        os.replace("result.json.tmp", "result.json")
    world.barrier()


if __name__ == "__main__":
    main()
'''
"""The run script written into every frame's work directory (needs only GPAW and ASE)."""
