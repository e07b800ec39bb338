"""The `model` labeller: labels from models, NOT from DFT.

Energies and forces come from a frozen deepmd-kit model (:func:`jobs.stages.md.dp_calculator`), the
Fermi-contact coupling of the target nuclei from a shift model (NN-NMR ensemble or GPR, through
the same featurizer and ``predict`` as the infer stage), its shift turned back into A_iso by
eq. 1 (:func:`jobs.shift.ppm_per_mhz`); the other atoms get NaN (not computed). Every labelled
frame says so in ``info["labeller"]``. It is the oracle of the tests and of campaigns with a
known answer, and what distils a big model into a small one; never a result.

A frame's labels are written to ``labelled.npz`` in its work directory (binary, so a recovered
frame has the very same numbers; under a private name, renamed when complete), so a frame
labelled just before its rank was killed is recovered, not recomputed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from engine.failure import InputError
from jobs.labellers.base import LabelError
from jobs.shiftmodels.registry import load_shift_model

RESULT_FILE = "labelled.npz"
ORACLE = "model (not DFT)"
"""``info["labeller"]`` of every frame this labeller labels."""


class ModelLabeller:
    """Labels a frame with a DP model (energy, forces) and a shift model (A_iso of the target
    nuclei). Models load once per rank, on first use."""

    name = "model"

    def __init__(self, dp_model: Path, shift_model: Path, ppm_per_mhz: float):
        self.dp_model = Path(dp_model)
        self.shift_model = Path(shift_model)
        self.ppm_per_mhz = float(ppm_per_mhz)
        self._calculator = None
        self._shift = None

    @classmethod
    def from_spec(cls, spec, shift_spec) -> "ModelLabeller":
        """The labeller of a manifest's `label.model` section (shipped models by default)."""
        from jobs.shift import ppm_per_mhz
        from schemas.infer import SHIPPED_SHIFT_MODEL
        from schemas.potential import SHIPPED_MODEL as SHIPPED_DP_MODEL

        return cls(spec.dp_model or SHIPPED_DP_MODEL, spec.shift_model or SHIPPED_SHIFT_MODEL,
                   ppm_per_mhz(shift_spec))

    def _models(self):
        if self._calculator is None:
            from jobs.deepmd import dp_calculator
            from jobs.shiftmodels.registry import featurizer_for

            self._calculator = dp_calculator(self.dp_model)
            ensemble = load_shift_model(self.shift_model)
            self._shift = (ensemble, featurizer_for(ensemble, "dscribe"))
        return self._calculator, self._shift

    def check(self, species: list[str]) -> None:
        """Raise InputError when a species is unknown to the DP model or the shift model."""
        for path, what in ((self.dp_model, "DP model"), (self.shift_model, "shift model")):
            if not path.is_file():
                raise InputError(f"label.model: {what} {path} not found")
        calculator, (_, featurizer) = self._models()
        unknown = sorted(set(species) - set(calculator.type_dict))
        if unknown:
            raise InputError(f"label.model: species {unknown} not in the DP model's type map "
                             f"{sorted(calculator.type_dict)} ({self.dp_model})")
        unknown = sorted(set(species) - set(featurizer.species))
        if unknown:
            raise InputError(f"label.model: species {unknown} not among the shift model's SOAP "
                             f"species {list(featurizer.species)} ({self.shift_model})")

    def label(self, atoms: Atoms, work_dir: Path, title: str) -> Atoms:
        """Energy, forces and A_iso of `atoms` from the models; written to the work dir."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        calculator, (ensemble, featurizer) = self._models()
        frame = atoms.copy()
        frame.calc = calculator
        try:
            energy = float(frame.get_potential_energy())
            forces = np.array(frame.get_forces(), dtype=float)
            centres = featurizer.centre_indices(frame)
            mean, _ = ensemble.predict(featurizer.features([frame]))
        except Exception as exc:  # a model that cannot evaluate this frame: a failed attempt
            raise LabelError("bad_result", f"{type(exc).__name__}: {exc}") from exc
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))
                and np.all(np.isfinite(mean))):
            raise LabelError("bad_result", "the models gave non-finite labels")
        labelled = atoms.copy()
        a_iso = np.full(len(atoms), np.nan)
        a_iso[centres] = np.asarray(mean, dtype=float) / self.ppm_per_mhz
        labelled.arrays["fermi_contact_mhz"] = a_iso
        labelled.info["labeller"] = ORACLE
        labelled.info["title"] = title
        labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces)
        partial = work_dir / f".{os.getpid()}-{RESULT_FILE}"
        with open(partial, "wb") as handle:
            np.savez(handle, numbers=atoms.numbers, positions_a=atoms.positions,
                     energy_ev=energy, forces_ev_a=forces, a_iso_mhz=a_iso)
        partial.replace(work_dir / RESULT_FILE)
        return labelled

    def recover(self, atoms: Atoms, work_dir: Path) -> Atoms | None:
        """The frame already labelled in `work_dir` if it is of `atoms`, else None."""
        path = Path(work_dir) / RESULT_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path) as saved:
                data = {key: saved[key] for key in saved.files}
        except Exception:  # a damaged file: label again
            return None
        if (len(data["numbers"]) != len(atoms) or np.any(data["numbers"] != atoms.numbers)
                or not np.allclose(data["positions_a"], atoms.positions, atol=1e-6)):
            return None
        labelled = atoms.copy()
        labelled.arrays["fermi_contact_mhz"] = np.asarray(data["a_iso_mhz"], dtype=float)
        labelled.info["labeller"] = ORACLE
        labelled.calc = SinglePointCalculator(labelled, energy=float(data["energy_ev"]),
                                              forces=np.asarray(data["forces_ev_a"]))
        return labelled
