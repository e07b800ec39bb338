"""Broken DFT labels caught before training: the screen of labelled frames.

A label can be wrong without any error from the code that made it: an SCF that stopped early,
another spin state, a frame whose energy is a few eV off the rest. Such a frame passes every
structure check and silently bends a potential or a shift model. Before the potential, train
and learn stages train, their labelled frames pass :func:`screen_labels`; each frame it flags
is named by file and frame (or store table and row) with the reason, and the manifest's
``checks.broken_labels`` decides: ``warn`` (keep it), ``drop`` (the default: train without it)
or ``fail`` (exit 2 before any training).

The checks (knobs in ``checks``, schemas/checks.py):

- **energy**: the energy per atom of each frame against the other frames of its composition,
  as a robust z-score ``(x - median) / (1.4826 MAD)``; ``x`` is the residual from a reference
  DP model's prediction when ``checks.label_reference_model`` is given (the strongest test:
  a model's residuals on good frames spread by ~0.2 meV/atom on P2-NMMO), else the energy per
  atom itself (spread ~4 meV/atom over 400 frames of a 300 K trajectory). A frame is flagged
  when ``|z| > checks.label_energy_z`` (6) AND the deviation exceeds
  ``checks.label_energy_floor_mev_per_atom`` (2 meV/atom), so that a tight distribution does
  not flag physically irrelevant differences. Groups of fewer than 8 frames are not tested.
  Without a reference model the test assumes one thermodynamic state: frames of several
  temperatures (learn's explorations) are only tested against a reference model.
- **forces**: any force component norm above ``checks.label_max_force_ev_a`` (50 eV/A).
- **SCF**: a frame whose ``info["scf_converged"]`` is False (labellers that can tell).
- **moment**: a total magnetic moment (``info["magnetic_moment_s"]``) further than
  ``checks.label_moment_tolerance`` (0.5 mu_B) from the target (``checks.label_total_moment``,
  else the labeller's fixed moment: VASP's NUPDOWN, GPAW's fixed_magmom), i.e. another spin
  state.

Measured on the shared P2-NMMO frames with the shipped DP model as the reference: two frames of
``p6322-dev.extxyz`` are flagged, frame 31 (8.4 meV/atom from the model, z = 44) and frame 52
(3.8 meV/atom, z = 20); nothing else has ``|z| > 3.5`` (docs/label.md, "Broken labels").
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.failure import InputError

MIN_GROUP = 8
"""Fewest frames of one composition for the energy test."""
MAD_TO_SD = 1.4826
"""MAD of a normal distribution times this is its standard deviation."""


@dataclass(frozen=True)
class BrokenLabel:
    """One flagged frame: where it is, and why."""

    where: str
    reason: str

    def line(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class LabelScreen:
    """What the screen found among `n_screened` frames, and what was done (`action`)."""

    n_screened: int
    broken: list[BrokenLabel] = field(default_factory=list)
    action: str = "drop"
    energy_test: str = ""

    @property
    def n_dropped(self) -> int:
        return len(self.broken) if self.action == "drop" else 0

    def sentence(self) -> str:
        """One sentence for the log, show and the report."""
        if not self.broken:
            return f"label screen: {self.n_screened} frames, none flagged ({self.energy_test})"
        verb = {"drop": "dropped", "warn": "kept (checks.broken_labels = warn)",
                "fail": "refused"}[self.action]
        named = "; ".join(b.line() for b in self.broken[:5])
        more = f"; and {len(self.broken) - 5} more" if len(self.broken) > 5 else ""
        return (f"label screen: {len(self.broken)} of {self.n_screened} frames flagged and "
                f"{verb} ({self.energy_test}): {named}{more}")

    def summary(self) -> dict:
        """Numbers and the sentence for a stage's summary (store attributes, show)."""
        return {"labels_screened": self.n_screened, "labels_flagged": len(self.broken),
                "labels_dropped": self.n_dropped, "label_screen": self.sentence()}


def frame_name(atoms) -> str:
    """Where a labelled frame came from: ``<file> frame <i>`` or its store table and row."""
    info = atoms.info
    if "file" in info:
        return f"{info['file']} frame {info.get('file_index', 0)}"
    return str(info.get("source", "a frame without a source"))


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); zeros where the MAD is zero and x equals the median."""
    values = np.asarray(values, dtype=float)
    centre = np.median(values)
    scale = MAD_TO_SD * np.median(np.abs(values - centre))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (values - centre) / scale
    return np.where(np.isnan(z), 0.0, z)


def reference_energies(frames, model_path: Path) -> np.ndarray:
    """Energies (eV) of `frames` predicted by a frozen DP model."""
    from jobs.deepmd import dp_calculator

    calc = dp_calculator(Path(model_path))
    out = np.empty(len(frames))
    for i, atoms in enumerate(frames):
        probe = atoms.copy()
        probe.calc = calc
        out[i] = probe.get_potential_energy()
    return out


def _result(atoms, key: str):
    """A frame's labelled energy or forces, or None (frames labelled with couplings only)."""
    results = atoms.calc.results if atoms.calc is not None else {}
    return results.get(key)


def _energy_flags(frames, checks, reference: np.ndarray | None) -> list[tuple[int, str]]:
    per_atom = np.array([_result(a, "energy") / len(a) if _result(a, "energy") is not None
                         else np.nan for a in frames])
    values = per_atom if reference is None else per_atom - reference / np.array(
        [len(a) for a in frames])
    what = "energy per atom" if reference is None else "energy per atom from the model"
    groups: dict[str, list[int]] = defaultdict(list)
    for i, atoms in enumerate(frames):
        if np.isfinite(values[i]):
            groups[atoms.get_chemical_formula()].append(i)
    flags = []
    for members in groups.values():
        if len(members) < MIN_GROUP:
            continue
        rows = np.array(members)
        z = robust_z(values[rows])
        off_mev = 1e3 * (values[rows] - np.median(values[rows]))
        for row, zi, off in zip(rows, z, off_mev):
            if abs(zi) > checks.label_energy_z and abs(off) > \
                    checks.label_energy_floor_mev_per_atom:
                flags.append((int(row), f"{what} {off:+.1f} meV/atom from its composition's "
                                        f"median (robust z {zi:+.1f}, limit "
                                        f"{checks.label_energy_z:g})"))
    return flags


def screen_labels(frames, checks, *, expected_moment: float | None = None,
                  reference_model: Path | None = None, energy_test: bool = True) -> LabelScreen:
    """Flag the broken labels among `frames` (ase.Atoms with energy and forces).

    Parameters
    ----------
    frames
        Labelled frames (``info["file"]``/``["file_index"]`` or ``info["source"]`` name them).
    checks
        The manifest's ChecksSpec (thresholds, ``broken_labels``).
    expected_moment
        The target total moment (mu_B) when ``checks.label_total_moment`` is not set (the
        labeller's fixed moment); None: no moment test.
    reference_model
        A frozen DP model for the energy test (``checks.label_reference_model`` wins).
    energy_test
        False skips the energy test (frames of several thermodynamic states and no model).

    Returns
    -------
    LabelScreen
        The flagged frames in input order (a frame once, its reasons joined), and the action.
    """
    reasons: dict[int, list[str]] = defaultdict(list)
    model = checks.label_reference_model or reference_model
    with_energy = [i for i, a in enumerate(frames) if _result(a, "energy") is not None]
    if model is not None and len(with_energy) < len(frames):
        model = None                     # the reference needs every frame's energy
    if energy_test or model is not None:
        reference = reference_energies(frames, model) if model is not None else None
        for row, reason in _energy_flags(frames, checks, reference):
            reasons[row].append(reason)
        test = (f"energies against {Path(model).name}" if model is not None
                else "energies against their composition's distribution")
    else:
        test = "no energy test: frames of several states and no reference model"
    target = checks.label_total_moment if checks.label_total_moment is not None \
        else expected_moment
    for row, atoms in enumerate(frames):
        forces = _result(atoms, "forces")
        forces = np.zeros((0, 3)) if forces is None else np.asarray(forces)
        largest = float(np.max(np.linalg.norm(forces, axis=1))) if len(forces) else 0.0
        if largest > checks.label_max_force_ev_a:
            atom = int(np.argmax(np.linalg.norm(forces, axis=1)))
            reasons[row].append(f"force {largest:.1f} eV/A on atom {atom} (limit "
                                f"{checks.label_max_force_ev_a:g})")
        if atoms.info.get("scf_converged") is False:
            reasons[row].append("SCF not converged")
        moment = atoms.info.get("magnetic_moment_s")
        if target is not None and moment is not None and np.isfinite(moment) and \
                abs(moment - target) > checks.label_moment_tolerance:
            reasons[row].append(f"total moment {moment:.3f} mu_B, target {target:g} (another "
                                "spin state)")
    broken = [BrokenLabel(frame_name(frames[row]), "; ".join(reasons[row]))
              for row in sorted(reasons)]
    return LabelScreen(len(frames), broken, checks.broken_labels, test)


def apply_screen(frames, screen: LabelScreen, stage: str, warn) -> list:
    """The frames to train on after `screen`: all (warn), the unflagged (drop), or none
    (fail: InputError naming every flagged frame, before any training). `warn` gets the
    screen's sentence when something was flagged."""
    if not screen.broken:
        return list(frames)
    if screen.action == "fail":
        raise InputError(f"{stage}: {screen.sentence()}; fix or remove these labels, or set "
                         "checks.broken_labels to drop or warn")
    warn(f"{stage}: {screen.sentence()}")
    if screen.action == "warn":
        return list(frames)
    flagged = {b.where for b in screen.broken}
    return [atoms for atoms in frames if frame_name(atoms) not in flagged]


def labeller_moment(label_spec) -> float | None:
    """The total moment the manifest's labeller fixes (VASP's NUPDOWN, GPAW's fixed_magmom),
    or None."""
    if label_spec is None:
        return None
    if label_spec.labeller == "vasp":
        return label_spec.vasp.nupdown
    if label_spec.labeller == "gpaw":
        return label_spec.gpaw.fixed_magmom
    return None


def screen_for_training(groups: list[list], checks, label_spec, stage: str, ctx, *,
                        energy_test: bool = True, reference_model: Path | None = None
                        ) -> tuple[list[list], LabelScreen]:
    """:func:`screen_labels` over every frame of `groups` (lists of frames: per file, per
    training / validation set), then :func:`apply_screen` with the manifest's sections
    (`checks` None: the defaults; warnings from rank 0 of `ctx`): the groups with only the
    frames to train on, in order, and the screen for the stage's record."""
    from schemas.checks import ChecksSpec

    checks = checks if checks is not None else ChecksSpec()
    frames = [atoms for group in groups for atoms in group]
    screen = screen_labels(frames, checks, expected_moment=labeller_moment(label_spec),
                           reference_model=reference_model, energy_test=energy_test)
    kept = {id(atoms) for atoms in apply_screen(
        frames, screen, stage, lambda message: ctx.warn(message) if ctx.is_root else None)}
    return [[atoms for atoms in group if id(atoms) in kept] for group in groups], screen
