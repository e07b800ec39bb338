"""Common base for every manifest section: frozen, no unknown keys, a docstring per field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class Spec(BaseModel):
    """A frozen manifest section; a misspelt key is an error that names it."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _resolve_input_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative input path against the manifest's own folder."""
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


InputPath = Annotated[Path, AfterValidator(_resolve_input_path)]
"""A path to an input file; relative paths are taken relative to the manifest's folder."""
