"""`dynshift doc [SECTION]`: every manifest knob with its type, default and docstring.

The listing is generated from the schema (schemas/), so it cannot drift from what `validate`
accepts: one entry per field, by dotted path (``label.vasp.potcar_dir``), nested sections
expanded in place; list entries appear as ``systems.N.name``.
"""
from __future__ import annotations

import textwrap
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from schemas.manifest import Manifest

_NAMES = {str: "str", int: "int", float: "float", bool: "bool", Path: "path", type(None): "null"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
           ("max_length", "length <="), ("pattern", "matching"))


def _constraints(metadata) -> list[str]:
    """`>= 1`-style words for pydantic/annotated-types constraint objects."""
    words = []
    for item in metadata:
        if hasattr(item, "metadata") and isinstance(item.metadata, list):  # a FieldInfo
            words += _constraints(item.metadata)
            continue
        for attribute, word in _BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                words.append(f"{word} {value}")
        validator = getattr(getattr(item, "func", None), "__name__", "")
        if validator == "_chemical_symbol":
            words.append("a chemical element")
    return words


def type_text(annotation) -> str:
    """A short, readable name of a field type (``list[int >= 1]``, ``'a' | 'b'``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, words = type_text(args[0]), _constraints(annotation.__metadata__)
        return f"{base} ({', '.join(words)})" if words else base
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _nested_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The Spec a field holds (directly, or as list entries), and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, True
    return None, False


def _default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def entries(model: type[BaseModel] = Manifest, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted path, type, default, docstring) of every field of `model`, nested ones expanded."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.rebuild_annotation() if field.metadata else field.annotation
        nested, is_list = _nested_model(field.annotation)
        if nested is not None:
            kind = f"list of {nested.__name__}" if is_list else "section"
            rows.append((path, kind, _default_text(field) if is_list else "",
                         field.description or ""))
            rows += entries(nested, f"{path}.N." if is_list else f"{path}.")
            continue
        rows.append((path, type_text(annotation), _default_text(field), field.description or ""))
    return rows


def sections() -> list[str]:
    """Every path `dynshift doc` accepts as SECTION (sections and list entries)."""
    return [path for path, kind, _, _ in entries() if kind == "section" or
            kind.startswith("list of")]


def doc_text(section: str | None = None) -> str:
    """The listing of every knob, or of those under `section` (``md``, ``label.vasp``).

    Raises
    ------
    KeyError
        For a `section` that is no section or field of the manifest.
    """
    rows = entries()
    if section:
        section = section.strip(".")
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            raise KeyError(section)
    blocks = []
    for path, kind, default, docstring in rows:
        head = f"{path}: {kind}" + (f" = {default}" if default else "")
        body = textwrap.fill(" ".join(docstring.split()), width=96, initial_indent="    ",
                             subsequent_indent="    ") if docstring else ""
        blocks.append(head + ("\n" + body if body else ""))
    return "\n".join(blocks)


def known_sections_text() -> str:
    """The top-level keys and the nested sections, for an error message."""
    top = list(Manifest.model_fields)
    nested = [s for s in sections() if "." in s]
    return ", ".join(top + nested)
