"""Markdown reference of every policy field, generated from the models.

docs/policies.md ends with this output; a test keeps the two in step.
"""

from __future__ import annotations

import enum
from typing import Any, Iterator, List, Tuple, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .policies import POLICY_CLASSES, TierConfig
from .sections import AllBudget, FractionBudget, MassBudget, TokensBudget


def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[...] (StrictBool): the type it annotates
        return _type_name(annotation.__origin__)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(m.value for m in annotation)
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and getattr(origin, "__name__", "") == "Literal" or str(annotation).startswith("typing.Literal"):
        return " \\| ".join(str(a) for a in args)
    if args and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) + " or null"
    if origin in (tuple, Tuple):
        return "list"
    if origin is Union and args:
        return " \\| ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        return "(see file)" if value else "[]"
    return f"`{value}`"


def _rows(model: type, prefix: str, skip: Tuple[str, ...] = ()) -> Iterator[str]:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        path = f"{prefix}{name}"
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if nested is not None:
            yield from _rows(nested, path + ".")
            continue
        desc = (field.description or "").replace("|", "\\|")
        yield f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"


def policy_reference() -> str:
    head = "| field | type | default | meaning |\n|---|---|---|---|"
    out: List[str] = ["### Common sections (every policy)", "", head]
    out += list(_rows(TierConfig, "", skip=("budget",)))
    out += ["", "### `budget` (one of these, chosen by `kind`)", "", head]
    for model in (AllBudget, TokensBudget, FractionBudget, MassBudget):
        kind = model.model_fields["kind"].default
        out.append(f"| `budget.kind: {kind}` | | | {(model.__doc__ or '').strip()} |")
        out += list(_rows(model, "budget.", skip=("kind",)))
    for tag, model in POLICY_CLASSES.items():
        out += ["", f"### `policy: {tag}`", "", (model.__doc__ or "").strip(), ""]
        own = [n for n in model.model_fields if n not in TierConfig.model_fields and n != "policy"]
        rows = [r for n in own for r in _rows(model, "", skip=tuple(x for x in model.model_fields if x != n))]
        overrides = [n for n in ("window", "host_store", "budget") if model.model_fields[n].default_factory is not TierConfig.model_fields[n].default_factory]
        if overrides:
            rows.append(f"| (defaults) | | | overrides the default of: {', '.join(overrides)} |")
        out += [head] + rows if rows else ["No knobs beyond the common sections."]
    return "\n".join(out) + "\n"
