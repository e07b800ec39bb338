"""The label stage: sparse frames labelled by DFT (VASP or GPAW) with retries and a failure
budget."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from schemas.base import Element, InputPath, NonEmptyText, Spec, SpecError

IncarValue = Union[bool, int, float, str, list[Union[bool, int, float, str]]]
"""A value of one INCAR tag: a scalar or a list (written space-separated)."""

GpawValue = Union[bool, int, float, str, list, dict]
"""A GPAW keyword's value as YAML gives it (written to the run's gpaw-input.json)."""

_INCAR_TAG = re.compile(r"^[A-Z][A-Z0-9_]*$")


class VaspSpec(Spec):
    """How to run VASP: the launch command (profile) and the input it is given (template)."""

    command: list[NonEmptyText] = Field(default=["vasp_std"], min_length=1)
    """The launch command as an argument list, run in each frame's work directory, e.g.
    `["srun", "--exact", "-N", "1", "-n", "32", "vasp_std"]` (see docs/label.md for mapping
    ranks x cores on Slurm). `{cores}` and `{rank}` in an argument become the rank's cores and
    rank, e.g. `["mpirun", "-np", "{cores}", "vasp_std"]`. Never a shell string; the MPI
    launcher's rank variables (PMIX_*, OMPI_COMM_WORLD_*, ...) are not passed on."""
    walltime_s: float = Field(default=86400.0, gt=0)
    """Wall-time limit of one VASP run (s); a run past it is killed (its whole process group)
    and counts as a failed attempt ("timeout")."""
    kill_grace_s: float = Field(default=10.0, ge=0)
    """After SIGTERM on a time-out, seconds to wait before SIGKILL."""
    env: dict[NonEmptyText, str] = {}
    """Extra environment variables for the launch (e.g. `OMP_NUM_THREADS: "1"`)."""
    potcar_dir: InputPath | None = None
    """Folder of the user's POTCARs: `<potcar_dir>/<name>/POTCAR` (or `<potcar_dir>/<name>`
    as a file) for each species' POTCAR name (relative to the manifest's folder). Required
    for the vasp labeller."""
    potcar: dict[Element, NonEmptyText] = {}
    """Species -> POTCAR name in `potcar_dir` (e.g. `{Na: Na_pv, Mg: Mg_pv, Mn: Mn_pv, O: O}`);
    a species not listed uses its own symbol."""
    kpoints: tuple[int, int, int] = (2, 2, 2)
    """k-point mesh (KPOINTS, automatic)."""
    kpoints_gamma: bool = True
    """Gamma-centred mesh (else Monkhorst-Pack)."""
    encut_ev: float = Field(default=400.0, gt=0)
    """Plane-wave cutoff ENCUT (eV)."""
    ediff_ev: float = Field(default=1e-5, gt=0)
    """SCF convergence criterion EDIFF (eV)."""
    nelm: int = Field(default=200, ge=1)
    """Maximum SCF steps NELM; a run that does not converge within them is a failed attempt
    ("unconverged")."""
    nupdown: float | None = None
    """NUPDOWN: fixed difference of up and down electrons (48 for the 88-atom P2-NMMO cell, all
    Mn4+ spins aligned); not written when null."""
    ngyromag: dict[Element, float] = {}
    """NGYROMAG per species (MHz/T); VASP's A_tot scales with it. Species not listed get the
    shift section's `gyromagnetic_factor` (100 in the lin2022-nmmo preset), so A_tot and the
    A -> shift conversion use one convention."""
    incar: dict[str, IncarValue] = {}
    """Further INCAR tags, or overrides of the defaults (upper-case tag -> value; booleans are
    written .TRUE./.FALSE., lists space-separated), e.g. `{ALGO: All, NCORE: 4}`."""

    @field_validator("incar")
    @classmethod
    def _tags(cls, value: dict[str, IncarValue]) -> dict[str, IncarValue]:
        bad = [tag for tag in value if not _INCAR_TAG.match(tag)]
        if bad:
            raise ValueError(f"INCAR tags must be upper-case letters/digits/_ (got {bad})")
        return value

    @model_validator(mode="after")
    def _check(self) -> "VaspSpec":
        problems = []
        if not self.command[0].strip():
            problems.append(("command.0", f"the program is blank (got {self.command[0]!r})"))
        if min(self.kpoints) < 1:
            problems.append(("kpoints", f"every k-point count must be >= 1 (got "
                                        f"{list(self.kpoints)})"))
        bad_env = [k for k in self.env if "=" in k or not k.strip()]
        if bad_env:
            problems.append(("env", f"variable names without '=' or blanks (got {bad_env})"))
        if problems:
            raise SpecError(*problems)
        return self


class GpawSpec(Spec):
    """How to run GPAW: the launch command (profile) and the calculation it is given (template).

    Defaults are a spin-polarised PBE plane-wave single point; see docs/label.md for what the
    couplings are converted to (VASP's A_tot) and a setting that labels an 88-atom P2-NMMO frame
    in minutes."""

    command: list[NonEmptyText] = Field(
        default=["mpirun", "-np", "{cores}", "{python}", "{script}"], min_length=1)
    """The launch command as an argument list, run in each frame's work directory. `{script}`
    becomes the run script written there (run_gpaw.py), `{python}` the `python` below, `{cores}`
    and `{rank}` the rank's cores and rank; e.g. `["srun", "--exact", "-n", "32", "{python}",
    "{script}"]` on Slurm, or `["{python}", "{script}"]` for one process. Never a shell string;
    the MPI launcher's rank variables are not passed on."""
    python: NonEmptyText | None = None
    """The Python interpreter that has GPAW (`{python}` in the command); default: the one
    running dynshift."""
    walltime_s: float = Field(default=86400.0, gt=0)
    """Wall-time limit of one GPAW run (s); a run past it is killed (its whole process group)
    and counts as a failed attempt ("timeout")."""
    kill_grace_s: float = Field(default=10.0, ge=0)
    """After SIGTERM on a time-out, seconds to wait before SIGKILL."""
    env: dict[NonEmptyText, str] = {}
    """Extra environment variables for the launch; GPAW_MPI_BACKEND=cgpaw, OMP_NUM_THREADS=1
    and OPENBLAS_NUM_THREADS=1 are set unless given here."""
    mode: Literal["pw", "lcao"] = "pw"
    """Basis: plane waves (`ecut_ev`) or atomic orbitals (LCAO, `basis`; much cheaper)."""
    ecut_ev: float = Field(default=400.0, gt=0)
    """Plane-wave cutoff (eV), mode pw."""
    basis: NonEmptyText = "dzp"
    """LCAO basis set (`dzp`, `szp`, `sz`, ...) from gpaw-data, mode lcao."""
    h_a: float | None = Field(default=None, gt=0)
    """Real-space grid spacing (A) of the densities; default GPAW's (0.2 A in LCAO; from
    `ecut_ev` in pw)."""
    kpts: tuple[int, int, int] = (1, 1, 1)
    """k-point mesh."""
    kpts_gamma: bool = True
    """Gamma-centred mesh (else Monkhorst-Pack)."""
    xc: NonEmptyText = "PBE"
    """Exchange-correlation functional (GPAW's name: `PBE`, `LDA`, `SCAN` with libxc, ...)."""
    setups: dict[Element, NonEmptyText] = {}
    """PAW setup per species (gpaw-data's names: `{Mn: "7", Mg: "2", Na: "1"}` takes the
    setups with 7, 2 and 1 valence electrons); not listed: GPAW's default setup."""
    fixed_magmom: float | None = None
    """Fixed total magnetic moment N_up - N_down (mu_B), VASP's NUPDOWN (48 for the 88-atom
    P2-NMMO cell); the initial moments (`magmoms`) must add up to it. Null: the moment is
    free (it starts from `magmoms`)."""
    magmoms: dict[Element, float] = {}
    """Initial magnetic moment per atom of each species (mu_B), e.g. `{Mn: 3}` for Mn4+; with
    a fixed moment and none given, the moment is spread evenly over the atoms."""
    moment_tolerance: float = Field(default=0.5, gt=0)
    """A run whose total moment is further than this (mu_B) from the requested one
    (`fixed_magmom`, else the sum of `magmoms`) ended in another spin state: the attempt fails
    as `wrong_spin_state` and the retry starts from other initial moments (same total)."""
    smearing_ev: float = Field(default=0.05, gt=0)
    """Fermi-Dirac width (eV)."""
    mixer_beta: float = Field(default=0.05, gt=0, le=1)
    """Pulay density mixing: fraction of the new density."""
    mixer_nmaxold: int = Field(default=5, ge=1)
    """Pulay density mixing: densities kept."""
    mixer_weight: float = Field(default=50.0, gt=0)
    """Pulay density mixing: weight of long wavelengths."""
    energy_tol_ev: float = Field(default=5e-4, gt=0)
    """SCF convergence: energy change (eV per valence electron, GPAW's `energy`)."""
    density_tol: float = Field(default=1e-4, gt=0)
    """SCF convergence: density change (electrons per valence electron, GPAW's `density`)."""
    maxiter: int = Field(default=300, ge=1)
    """Maximum SCF iterations; a run that does not converge within them is a failed attempt
    ("unconverged")."""
    ngyromag: dict[Element, float] = {}
    """Nuclear gamma/2pi (MHz/T) per species, VASP's NGYROMAG: the couplings are converted to
    VASP's A_tot with it. Species not listed get the shift section's `gyromagnetic_factor`
    (100 in the lin2022-nmmo preset), so A and the A -> shift conversion use one convention."""
    calibration: dict[Element, tuple[float, float]] = {}
    """Per species, `[slope, intercept_mhz]` of a linear map from this setting's A_tot to a
    reference functional's, fitted on frames labelled by both
    (benchmarks/bench_gpaw_calibration.py): the stored coupling is
    `(A_tot - intercept_mhz) / slope` (the raw one stays in the frame's result.json). The
    shipped P2-NMMO setting maps PBE to VASP SCAN for Na (fitted on OUTCAR.p63mcm-2:
    docs/label.md); species not listed are stored as computed. Valid only for the chemistry and
    setting it was fitted on."""
    gpaw: dict[NonEmptyText, GpawValue] = {}
    """Further GPAW keywords, or overrides of the ones above (e.g. `{nbands: "120%",
    eigensolver: {name: etdm-lcao}}`); written to gpaw-input.json as given."""

    @model_validator(mode="after")
    def _check(self) -> "GpawSpec":
        problems = []
        if not self.command[0].strip():
            problems.append(("command.0", f"the program is blank (got {self.command[0]!r})"))
        if min(self.kpts) < 1:
            problems.append(("kpts", f"every k-point count must be >= 1 (got "
                                     f"{list(self.kpts)})"))
        bad_env = [k for k in self.env if "=" in k or not k.strip()]
        if bad_env:
            problems.append(("env", f"variable names without '=' or blanks (got {bad_env})"))
        if not any("{script}" in arg for arg in self.command):
            problems.append(("command", "no argument holds {script} (the run script), e.g. "
                                        "[mpirun, -np, '{cores}', '{python}', '{script}']"))
        for species, (slope, intercept) in self.calibration.items():
            if not (math.isfinite(slope) and slope > 0 and math.isfinite(intercept)):
                problems.append((f"calibration.{species}", f"[slope, intercept_mhz] with a "
                                                           f"finite slope > 0 (got "
                                                           f"[{slope}, {intercept}])"))
        if problems:
            raise SpecError(*problems)
        return self


class ModelLabellerSpec(Spec):
    """The `model` labeller: labels computed by models, not by DFT. Energies and forces from a
    frozen deepmd-kit model, the A_iso of the target nuclei from a shift model (its shift turned
    back into A_iso by the shift section's eq. 1); other atoms get no A_iso (NaN). For tests, a
    campaign with a known answer, and distillation; never a result."""

    dp_model: InputPath | None = None
    """Frozen DP model (.pb) for energies and forces; null: the shipped P2-NMMO model
    (jobs/data/dp-p2-nmmo.pb)."""
    shift_model: InputPath | None = None
    """Store holding a trained /train shift model (NN-NMR ensemble or GPR); null: the shipped
    P2-NMMO GPR model (jobs/data/gpr-p2-nmmo.h5)."""


class LabelSpec(Spec):
    """Choose sparse frames from md trajectories and label them with a DFT code."""

    selection: Literal["evenly", "every"] = "evenly"
    """How frames are chosen per system: `evenly` takes `n_frames` evenly spaced over all saved
    frames of all replicas; `every` takes every `every_k`-th saved frame of each replica."""
    n_frames: int = Field(default=20, ge=1)
    """Frames per system for `selection: evenly` (fewer if the trajectories hold fewer)."""
    every_k: int = Field(default=10, ge=1)
    """Stride in saved frames for `selection: every`."""
    skip_saved: int = Field(default=0, ge=0)
    """Saved frames to skip at the start of every replica (equilibration)."""
    frames: list[InputPath] = []
    """Given structures to label INSTEAD of md frames: files that ASE reads (extended XYZ,
    POSCAR, OUTCAR, ASE .traj, ...), every frame of each. One table per file,
    `/label/<file stem>`, labelled as md frames are (claims, retries, failure budget, resume;
    work dirs `<work_dir>/<stem>/r000-f<frame>`), read by train as the label stage's frames.
    The first system's `target_species` is the nucleus of their shifts. Checked before any
    job: the files exist and are readable, each holds one composition and atom order, every
    frame has a periodic cell of non-zero volume, finite positions and no two atoms closer than
    `checks.min_distance_a`, the stems are unique, and the labeller knows every species."""
    labeller: Literal["vasp", "gpaw", "model"] = "vasp"
    """The labeller that computes A_iso, energy and forces of a frame: `vasp` (licensed),
    `gpaw` (open; `pip install gpaw gpaw-data`, see docs/label.md) or `model` (NOT DFT: a DP
    model's energies and forces and a shift model's A_iso; an oracle for tests and for
    distilling a model into another)."""
    vasp: VaspSpec = VaspSpec()
    """Settings of the VASP labeller."""
    gpaw: GpawSpec = GpawSpec()
    """Settings of the GPAW labeller."""
    model: ModelLabellerSpec = ModelLabellerSpec()
    """Settings of the model labeller (an oracle, not DFT)."""
    work_dir: Path = Path("label-work")
    """Root of the per-frame work directories `<work_dir>/<system>/r<replica>-f<frame>`
    (relative to the working directory of `dynshift run`); keep it on a shared file system."""
    max_attempts: int = Field(default=3, ge=1)
    """Attempts per frame (first run + retries) before it is recorded as failed; raising it
    and rerunning retries the failed frames."""
    failure_budget: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of the selected frames that may fail for good; above it the stage fails (with
    a summary) instead of completing."""
