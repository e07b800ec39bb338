"""The simulated systems: a structure and a supercell, shared by md, label, infer, analyze."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from schemas.base import Element, Spec

BUILTIN_PREFIX = "builtin:"

BUILTIN_NAMES = ("p2-nmmo-p63mcm", "p2-nmmo-p6322", "p2-nnmo-p63mcm", "p2-nnmo-p6322")
"""Names accepted after ``builtin:`` (the cells of jobs/structures.py)."""

BUILTIN_SPECIES = {"nmmo": ("Na", "Mg", "Mn", "O"), "nnmo": ("Na", "Ni", "Mn", "O")}
"""Species of the built-in cells by composition (``p2-<composition>-<stacking>``)."""

BUILTIN_ATOMS = 88
"""Atoms of every built-in cell (Na16 M8 Mn16 O48)."""


def builtin_species(structure: str) -> tuple[str, ...]:
    """Species of a ``builtin:`` structure (no structure is built)."""
    return BUILTIN_SPECIES[structure[len(BUILTIN_PREFIX):].split("-")[1]]


class SystemSpec(Spec):
    """One system: a named structure that the md stage samples and later stages analyse."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the system; used as its group name in the store (letters, digits, `_.-`)."""
    structure: str = Field(min_length=1)
    """`builtin:<name>` (e.g. `builtin:p2-nmmo-p63mcm`, `builtin:p2-nmmo-p6322`,
    `builtin:p2-nnmo-p63mcm`) or a path to any ASE-readable structure file (relative to the
    manifest's folder)."""
    supercell: tuple[int, int, int] = (1, 1, 1)
    """Repetitions of the structure along a, b, c (for large-cell studies)."""
    target_species: Element = "Na"
    """Chemical symbol of the observed nucleus (the SOAP centres and shifts)."""
    temperature_k: float | None = Field(default=None, gt=0)
    """md temperature of this system (K); default `md.temperature_k`. Set for every system by
    `md.temperatures_k`, which runs each system at each of its temperatures."""
    base: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """The system this one is a temperature of (set by `md.temperatures_k`: `p6322-450K` has
    base `p6322`); Arrhenius fits group the systems of one base. Default: its own name."""

    @property
    def base_name(self) -> str:
        """The base system's name (its own when it is not a temperature of another)."""
        return self.base or self.name

    @field_validator("structure")
    @classmethod
    def _resolve_file(cls, value: str, info: ValidationInfo) -> str:
        """A structure file is taken relative to the manifest's folder."""
        base = (info.context or {}).get("base_dir")
        if value.startswith(BUILTIN_PREFIX) or base is None or Path(value).is_absolute():
            return value
        return str(Path(base) / value)

    @field_validator("supercell")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 1:
            raise ValueError(f"every supercell multiple must be >= 1 (got {list(value)})")
        return value
