"""Structures of the simulated systems: built-in P2 layered oxides, or any ASE-readable file.

Built-in cells (``builtin:<name>``) are the 88-atom Na16 M8 Mn16 O48 supercells of
P2-Na2/3(M1/3Mn2/3)O2 (M = Mg: NMMO, M = Ni: NNMO) used by Lin et al. (Chem. Sci. 2022, 13,
7863): a 2 x 2 x 1 supercell of the sqrt3 x sqrt3 honeycomb cell (M on one of the three
transition-metal sites of each layer), in the two transition-metal stackings

- ``p63mcm`` (P6_3/mcm): the M columns of the two TM layers lie on top of each other;
- ``p6322`` (P6_322): the M of the second layer sits over a Mn of the first.

Geometry in fractional coordinates of the sqrt3 x sqrt3 cell (the frame of the shared DFT data):
TM layers at z = 0 and 1/2 with sites (0,0), (1/3,2/3), (2/3,1/3); O at z = +-z_O around each
layer (P2 ABBA stacking); Na in trigonal prisms at z = 1/4 and 3/4, either face-sharing
(``f``, over a TM column) or edge-sharing (``e``). The Na pattern (9 edge + 7 face sites in
P6_3/mcm, 11 + 5 in P6_322, no two Na on neighbouring prisms: Na-Na >= 2.89 A) is the Na arrangement of the first
frame of the published 300 K DPMD trajectory of each stacking, snapped to ideal prism sites: a
zigzag-ordered pattern close to the large-zigzag (LZZ) ground state that the MD relaxes from.
Atom order: Na, M, Mn, O (as the shared frames).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms

from engine.failure import InputError
from schemas.system import BUILTIN_NAMES, BUILTIN_PREFIX, SystemSpec

_THIRD = 1.0 / 3.0
TM_SITES = ((0.0, 0.0), (_THIRD, 2 * _THIRD), (2 * _THIRD, _THIRD))
"""The three transition-metal sites of a sqrt3 x sqrt3 layer (fractional a, b)."""
_O_SHIFT_LOWER = (_THIRD, _THIRD)
"""xy offset (fractional) of the O above the z = 0 layer and below the z = 1/2 layer."""
_O_SHIFT_UPPER = (2 * _THIRD, 2 * _THIRD)
"""xy offset of the O below the z = 0 layer and above the z = 1/2 layer."""

LATTICE_A = {"nmmo": (10.019, 11.218, 0.0926), "nnmo": (9.9995, 11.158, 0.0926)}
"""(a of the 88-atom cell (A), c (A), fractional O height z_O) of each composition.
NMMO: the shared DFT cell (Lin et al.). NNMO: 2 sqrt3 x 2.8866 A, c = 11.158 A (Lee et al.,
Chem. Mater. 2013, P2-Na2/3Ni1/3Mn2/3O2); z_O as NMMO."""

# Na sites: (6 x, 6 y, layer) with x, y fractional in the 88-atom cell; layer 0|1: z = 1/4|3/4
_NA_SIXTHS = {
    "p63mcm": ((0, 0, 0), (0, 4, 0), (1, 3, 0), (2, 1, 0), (3, 0, 0), (3, 4, 0), (4, 3, 0),
               (5, 1, 0), (0, 2, 1), (0, 5, 1), (1, 1, 1), (2, 4, 1), (3, 0, 1), (3, 3, 1),
               (5, 0, 1), (5, 3, 1)),
    "p6322": ((0, 0, 0), (0, 4, 0), (1, 3, 0), (2, 2, 0), (3, 0, 0), (3, 4, 0), (4, 3, 0),
              (5, 2, 0), (0, 3, 1), (0, 5, 1), (1, 2, 1), (2, 0, 1), (3, 3, 1), (3, 5, 1),
              (4, 1, 1), (5, 0, 1)),
}
"""Occupied Na prisms of each stacking (see the module docstring), in sixths of a and b."""


def p2_cell(composition: str = "nmmo", stacking: str = "p63mcm") -> Atoms:
    """The 88-atom P2-Na2/3(M1/3Mn2/3)O2 cell (Na16 M8 Mn16 O48).

    Parameters
    ----------
    composition
        ``"nmmo"`` (M = Mg) or ``"nnmo"`` (M = Ni).
    stacking
        ``"p63mcm"`` (P6_3/mcm) or ``"p6322"`` (P6_322).

    Returns
    -------
    ase.Atoms
        Periodic cell, a = b (A), gamma = 120 deg, atoms ordered Na, M, Mn, O.
    """
    if composition not in LATTICE_A or stacking not in _NA_SIXTHS:
        raise ValueError(f"unknown P2 cell {composition}-{stacking}")
    a, c, z_o = LATTICE_A[composition]
    metal = {"nmmo": "Mg", "nnmo": "Ni"}[composition]
    # (layer z, index of the M site): M over M (P6_3/mcm) or M over Mn (P6_322)
    m_site = {0.0: 1, 0.5: 1 if stacking == "p63mcm" else 2}
    half = 0.5  # fractional size of one sqrt3 cell in the 2 x 2 supercell
    na, m, mn, o = [], [], [], []
    for i in range(2):
        for j in range(2):
            def put(target, x, y, z):
                target.append(((x + i) * half, (y + j) * half, z % 1.0))

            for z_layer, m_index in m_site.items():
                for k, (x, y) in enumerate(TM_SITES):
                    put(m if k == m_index else mn, x, y, z_layer)
                above, below = ((_O_SHIFT_LOWER, _O_SHIFT_UPPER) if z_layer == 0.0
                                else (_O_SHIFT_UPPER, _O_SHIFT_LOWER))
                for x, y in TM_SITES:
                    put(o, x + above[0], y + above[1], z_layer + z_o)
                    put(o, x + below[0], y + below[1], z_layer - z_o)
    for x6, y6, layer in _NA_SIXTHS[stacking]:
        na.append((x6 / 6.0, y6 / 6.0, 0.25 + 0.5 * layer))
    scaled = np.array(na + m + mn + o) % 1.0
    symbols = ["Na"] * len(na) + [metal] * len(m) + ["Mn"] * len(mn) + ["O"] * len(o)
    cell = [[a, 0.0, 0.0], [-0.5 * a, 0.5 * np.sqrt(3.0) * a, 0.0], [0.0, 0.0, c]]
    atoms = Atoms(symbols, scaled_positions=scaled, cell=cell, pbc=True)
    atoms.info["structure"] = f"p2-{composition}-{stacking}"
    return atoms


def build_structure(spec: SystemSpec, base_dir: str | Path | None = None) -> Atoms:
    """The structure of a system: a built-in cell or the first frame of a file, times supercell.

    Parameters
    ----------
    spec
        The system (its ``structure`` and ``supercell``).
    base_dir
        Folder that a relative structure path is taken from (the manifest's folder).

    Returns
    -------
    ase.Atoms
        The periodic structure, repeated ``spec.supercell`` times.

    Raises
    ------
    InputError
        For an unknown built-in name, or a file that is missing or unreadable by ASE.
    """
    source = spec.structure
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            raise InputError(f"system '{spec.name}': unknown structure '{source}' "
                             f"(built-in: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)})")
        _, composition, stacking = name.split("-")
        atoms = p2_cell(composition, stacking)
    else:
        import ase.io

        path = Path(source)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise InputError(f"system '{spec.name}': structure file {path} not found")
        try:
            atoms = ase.io.read(path, index=0)
        except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
            raise InputError(f"system '{spec.name}': cannot read structure {path}: {exc}") from exc
        if not atoms.pbc.all() or atoms.cell.rank < 3:
            raise InputError(f"system '{spec.name}': structure {path} needs a 3D periodic cell")
        atoms.calc = None
    if tuple(spec.supercell) != (1, 1, 1):
        atoms = atoms.repeat(tuple(spec.supercell))
    return atoms
