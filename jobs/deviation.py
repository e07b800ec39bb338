"""Model deviation of an ensemble of DP models: how far md has left what the potential knows.

DP-GEN's trust criterion (Zhang et al., Comput. Phys. Commun. 2020, 253, 107206; deepmd-kit's
``dp model-devi``): for a frame, the force deviation of atom i is the standard deviation over
the models of its force vector, ``sqrt(mean_k |f_ik - <f_i>|^2)``; the frame's deviation is the
maximum over its atoms (``max_devi_f``, compared with DP-GEN's ``model_devi_f_trust_lo`` /
``_hi``) and, as a companion, the mean over its atoms (``avg_devi_f``). The numbers come from
deepmd-kit's own :func:`deepmd.infer.model_devi.calc_model_devi_f`; the models are evaluated by
``deepmd.infer.DeepPot`` on positions wrapped as the md stage feeds deepmd-kit
(:func:`jobs.deepmd.deepmd_positions`). Store layout and cost: docs/md.md, "Model deviation".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.failure import InputError
from jobs.deepmd import deepmd_positions, import_deepmd_tf

BATCH_ATOMS = 16384
"""Atoms per deepmd-kit evaluation (frames per batch = BATCH_ATOMS // atoms, at least 1):
batches of frames evaluate ~20 % faster per frame than one frame at a time (88-atom cell)."""


@dataclass(frozen=True)
class DeviationEnsemble:
    """Frozen DP models evaluated together on the same frames.

    Attributes
    ----------
    models
        ``deepmd.infer.DeepPot`` objects (at least 2 for a deviation).
    names
        What messages call each model (its file, by default).
    """

    models: tuple
    names: tuple[str, ...]

    @classmethod
    def from_files(cls, paths: Sequence[str | Path],
                   names: Sequence[str] | None = None) -> "DeviationEnsemble":
        """Load every frozen model of `paths` (deepmd-kit's TensorFlow backend).

        Raises
        ------
        InputError
            When fewer than 2 models are given, or a file is missing.
        """
        paths = [Path(p) for p in paths]
        names = tuple(str(p) for p in paths) if names is None else tuple(names)
        if len(paths) < 2:
            raise InputError(f"a model deviation needs at least 2 DP models (got {list(names)})")
        for path, name in zip(paths, names):
            if not path.is_file():
                raise InputError(f"DP model {name}: file {path} not found")
        import_deepmd_tf()
        from deepmd.infer import DeepPot

        return cls(tuple(DeepPot(str(p)) for p in paths), names)

    def __len__(self) -> int:
        return len(self.models)

    def check(self, species: Sequence[str], where: str = "md.deviation_models") -> None:
        """Refuse species that a model's type map lacks (InputError naming the model)."""
        for model, name in zip(self.models, self.names):
            known = list(model.get_type_map())
            missing = [s for s in dict.fromkeys(species) if s not in known]
            if missing:
                raise InputError(f"{where}: species {missing} unknown to the DP model {name} "
                                 f"(its type map is {known})")

    def forces_ev_a(self, numbers: np.ndarray, positions_a: np.ndarray,
                    cells_a: np.ndarray) -> np.ndarray:
        """Every model's forces on the frames (eV/A), shape (n_models, n_frames, n_atoms, 3).

        Parameters
        ----------
        numbers
            (n_atoms,) atomic numbers.
        positions_a
            (n_frames, n_atoms, 3) positions (A), wrapped or not.
        cells_a
            (n_frames, 3, 3) cells (rows are the vectors, A).
        """
        from ase.data import chemical_symbols

        positions_a = np.asarray(positions_a, dtype=np.float64)
        cells_a = np.asarray(cells_a, dtype=np.float64)
        n_frames, n_atoms = positions_a.shape[:2]
        symbols = [chemical_symbols[int(z)] for z in numbers]
        self.check(symbols)
        coords = np.stack([deepmd_positions(p, c) for p, c in zip(positions_a, cells_a)]) \
            if n_frames else positions_a
        batch = max(1, BATCH_ATOMS // max(n_atoms, 1))
        forces = np.empty((len(self.models), n_frames, n_atoms, 3))
        for k, model in enumerate(self.models):
            type_map = list(model.get_type_map())
            types = [type_map.index(s) for s in symbols]
            for start in range(0, n_frames, batch):
                rows = slice(start, min(start + batch, n_frames))
                m = rows.stop - rows.start
                forces[k, rows] = model.eval(coords[rows].reshape(m, -1),
                                             cells_a[rows].reshape(m, -1), types)[1]
        return forces

    def force_deviation(self, numbers: np.ndarray, positions_a: np.ndarray,
                        cells_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DP-GEN's force deviation of every frame (eV/A): (max over atoms, mean over atoms).

        Per atom the standard deviation over the models of the force vector,
        ``sqrt(mean_k |f_k - <f>|^2)`` (deepmd-kit's ``calc_model_devi_f``). Frames are
        evaluated in batches (:data:`BATCH_ATOMS`), so a frame's value to the last bit depends
        on the batch it was evaluated in (float32 models: ~1e-7 eV/A).

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ``max_devi_f_ev_a`` and ``avg_devi_f_ev_a``, each (n_frames,).
        """
        from deepmd.infer.model_devi import calc_model_devi_f

        forces = self.forces_ev_a(numbers, positions_a, cells_a)
        if forces.shape[1] == 0:
            return np.empty(0), np.empty(0)
        max_devi, _, avg_devi = calc_model_devi_f(forces)
        return np.asarray(max_devi, dtype=np.float64), np.asarray(avg_devi, dtype=np.float64)
