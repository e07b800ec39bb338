"""Common base for every manifest section: frozen, no unknown keys, a docstring per field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


class Spec(BaseModel):
    """A frozen manifest section; a misspelt key is an error that names it, and a non-finite
    number (`.inf`, `.nan`) is refused wherever a number is expected."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True,
                              allow_inf_nan=False)


class SpecError(ValueError):
    """A section validator's error naming the culprit fields (one line each).

    Raised inside a ``model_validator``; the manifest reader prefixes every field path with the
    section's own path, so ``SpecError(("centre", "must be ..."))`` raised by the train section
    reads ``train.centre: must be ...``.

    Parameters
    ----------
    *problems
        ``(dotted field path relative to the section, message)`` pairs.
    """

    def __init__(self, *problems: tuple[str, str]):
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{path}: {message}" if path else message
                                   for path, message in self.problems))


def _resolve_input_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative input path against the manifest's own folder."""
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


InputPath = Annotated[Path, AfterValidator(_resolve_input_path)]
"""A path to an input file; relative paths are taken relative to the manifest's folder."""


def _chemical_symbol(value: str) -> str:
    from ase.data import chemical_symbols

    if value not in chemical_symbols[1:]:
        raise ValueError(f"not a chemical element (got {value!r})")
    return value


Element = Annotated[str, AfterValidator(_chemical_symbol)]
"""The symbol of a chemical element (``Na``, ``Mn``; case matters), as ase.data knows them."""

Width = Annotated[int, Field(ge=1)]
"""The width of a network layer (>= 1 neurons)."""

NonEmptyText = Annotated[str, Field(min_length=1)]
"""A string that is not empty."""


def duplicates(values) -> list:
    """Entries that occur more than once in `values`, in first-seen order."""
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated
