"""Calling deepmd-kit: importing its TensorFlow backend quietly, the ASE calculator of a frozen
model, and positions wrapped the way deepmd-kit bins them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEEPMD_FACE_MARGIN = 2.0 ** -40
"""Fractional distance (~1e-11 A in these cells) from a cell face within which a position is
moved inwards before deepmd-kit sees it (see :func:`deepmd_positions`)."""


def deepmd_cell_fraction(positions_a: np.ndarray, cell_a: np.ndarray) -> np.ndarray:
    """The fractional coordinates deepmd-kit's CPU neighbour search bins atoms by.

    deepmd-kit's ProdEnvMatA op (``source/op/tf/prod_env_mat_multi_device.cc``
    ``_norm_copy_coord_cpu``) wraps the positions it is given itself
    (``normalize_coord_cpu``, ``source/lib/src/coord.cc``: fractional coordinate from its own
    reciprocal cell, ``fmod`` 1, +1 when negative, back to Cartesian) and then bins them into
    cells (``build_clist``, ``source/lib/src/neighbor_list.cc``), re-deriving the fractional
    coordinate once more. A coordinate of -1e-17 becomes 1.0 there, which is past the last cell:
    it prints "loc idx out of upper bound". This function repeats that arithmetic operation by
    operation in float64 (the wheel's libraries use no fused multiply-add), so its result is
    the value deepmd-kit bins, to the bit.

    Returns
    -------
    numpy.ndarray
        (n_atoms, 3) fractional coordinates; deepmd-kit expects each in [0, 1).
    """
    b = np.asarray(cell_a, dtype=np.float64).ravel()
    volume = abs(b[0] * (b[4] * b[8] - b[7] * b[5]) - b[1] * (b[3] * b[8] - b[6] * b[5])
                 + b[2] * (b[3] * b[7] - b[6] * b[4]))
    inv = 1.0 / volume
    rec = np.empty((3, 3))  # region.cc compute_rec_boxt / SimulationRegion::computeRecBox
    rec[0, 0] = (b[4] * b[8] - b[7] * b[5]) * inv
    rec[1, 1] = (b[0] * b[8] - b[6] * b[2]) * inv
    rec[2, 2] = (b[0] * b[4] - b[3] * b[1]) * inv
    rec[0, 1] = (-b[3] * b[8] + b[6] * b[5]) * inv
    rec[0, 2] = (b[3] * b[7] - b[6] * b[4]) * inv
    rec[1, 0] = (-b[1] * b[8] + b[7] * b[2]) * inv
    rec[1, 2] = (-b[0] * b[7] + b[6] * b[1]) * inv
    rec[2, 0] = (b[1] * b[5] - b[4] * b[2]) * inv
    rec[2, 1] = (-b[0] * b[5] + b[3] * b[2]) * inv
    box = b.reshape(3, 3)

    def to_fraction(r):  # tensor_dot_vec: o_i = r0 rec_i0 + r1 rec_i1 + r2 rec_i2
        return np.stack([r[:, 0] * rec[i, 0] + r[:, 1] * rec[i, 1] + r[:, 2] * rec[i, 2]
                         for i in range(3)], axis=1)

    def to_cartesian(f):  # tensor_t_dot_vec: o_j = f0 box_0j + f1 box_1j + f2 box_2j
        return np.stack([f[:, 0] * box[0, j] + f[:, 1] * box[1, j] + f[:, 2] * box[2, j]
                         for j in range(3)], axis=1)

    fraction = np.fmod(to_fraction(np.asarray(positions_a, dtype=np.float64)), 1.0)
    fraction = np.where(fraction < 0.0, fraction + 1.0, fraction)
    return to_fraction(to_cartesian(fraction))


def deepmd_positions(positions_a: np.ndarray, cell_a: np.ndarray) -> np.ndarray:
    """Positions wrapped into the cell such that deepmd-kit bins every atom inside it.

    The fractional coordinates are wrapped into [0, 1); an atom that deepmd-kit's own
    re-derivation (:func:`deepmd_cell_fraction`) would still put on or past a face (an atom
    of an idealised cell at a fractional 0, which rounding turns into -1e-17 there) is moved
    2**-39 of a cell vector inwards (~2e-11 A); every other atom keeps its wrapped position.

    Raises
    ------
    RuntimeError
        If an atom still fails the check after the move (never seen; it would mean deepmd-kit
        changed its arithmetic).
    """
    cell = np.asarray(cell_a, dtype=np.float64)
    scaled = np.linalg.solve(cell.T, np.asarray(positions_a, dtype=np.float64).T).T % 1.0
    scaled[scaled >= 1.0] = 0.0  # -1e-17 % 1.0 == 1.0
    coords = scaled @ cell
    for attempt in range(2):
        fraction = deepmd_cell_fraction(coords, cell)
        bad = (fraction < 0.0) | (fraction > 1.0 - DEEPMD_FACE_MARGIN)
        if not bad.any():
            return coords
        if attempt == 1:
            break
        inner = 2.0 * DEEPMD_FACE_MARGIN  # the face it is nearest to, in our wrapping
        scaled[bad] = np.where(scaled[bad] < 0.5, inner, 1.0 - inner)
        rows = bad.any(axis=1)
        coords[rows] = scaled[rows] @ cell
    raise RuntimeError(f"deepmd_positions: atoms {np.flatnonzero(bad.any(axis=1)).tolist()} "
                       "still lie on a cell face as deepmd-kit computes it")


def dp_calculator(model_path: Path):
    """deepmd-kit's ASE calculator for a frozen model, fed wrapped positions.

    The integrator keeps positions unwrapped (continuous, for diffusion); deepmd-kit gives the
    same energy and forces for positions outside the cell, but an atom that its own wrapping
    puts on the upper cell face (e.g. one at a fractional coordinate of exactly 0 in an
    idealised cell) is binned past the last cell with a "loc idx out of upper bound" warning,
    so the calculator evaluates :func:`deepmd_positions` (one copy of the atoms per call, as
    deepmd-kit's own).
    """
    from ase.calculators.calculator import Calculator, all_changes

    import_deepmd_tf()
    from deepmd.calculator import DP

    class WrappingDP(DP):
        def calculate(self, atoms=None, properties=("energy", "forces", "virial"),
                      system_changes=all_changes):
            Calculator.calculate(self, atoms, properties, system_changes)  # self.atoms = copy
            cell = self.atoms.cell.array
            coords = deepmd_positions(self.atoms.positions, cell)
            types = [self.type_dict[s] for s in self.atoms.get_chemical_symbols()]
            energy, forces, virial = self.dp.eval(coords=coords.reshape(1, -1),
                                                  cells=cell.reshape(1, -1),
                                                  atom_types=types)[:3]
            virial = virial[0].reshape(3, 3)
            stress = -0.5 * (virial + virial.T) / abs(np.linalg.det(cell))
            self.results = {"energy": energy[0][0], "free_energy": energy[0][0],
                            "forces": forces[0], "virial": virial,
                            "stress": stress.flat[[0, 4, 8, 5, 2, 1]]}

    return WrappingDP(model=str(model_path))


def import_deepmd_tf() -> None:
    """Import deepmd-kit's TensorFlow backend without switching TensorFlow 2 behaviour off.

    `deepmd.tf.env` calls `tf.compat.v1.disable_v2_behavior()` when first imported, which would
    break Keras in eager mode (the train and infer stages) later in the same run, and cannot be
    undone once TensorFlow has built a graph. deepmd-kit builds its own graphs and sessions and
    gives the same numbers with v2 behaviour on (tested), so that one call is skipped.
    Call this before the first DeepPot / DP of a process.

    Quiet: TensorFlow is imported by :func:`engine.context.import_tensorflow`, and loading
    deepmd-kit's op library (whose CUDA half announces libcudart on stderr) runs inside
    :func:`engine.context.quiet_native_stderr`; a failure to find libcudart still prints.
    """
    import sys

    from engine.context import import_tensorflow, quiet_native_stderr

    if "deepmd.tf.env" in sys.modules:
        return
    import_tensorflow()
    import tensorflow.compat.v1 as tf_v1

    disable = tf_v1.disable_v2_behavior
    tf_v1.disable_v2_behavior = lambda: None
    try:
        with quiet_native_stderr():
            import deepmd.tf.env  # noqa: F401
    finally:
        tf_v1.disable_v2_behavior = disable
