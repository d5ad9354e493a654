"""YAML in, typed policy out; every problem reported as `path: expected, found`.

Parsing happens once, here, at the edge. Nothing deeper sees a dict.
"""

from __future__ import annotations

import os
from typing import Any, List, Union

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ConfigError, Problem, clip, quote
from .policies import POLICY_CLASSES, PolicyConfig, TierConfig
from .sections import FieldError, KeyFormat
from .shape import GIB, ModelShape
from .yaml_input import MAX_BYTES, parse_yaml, too_big_message

_ADAPTER: TypeAdapter = TypeAdapter(PolicyConfig)


def _union_members(annotation: Any) -> dict:
    """Tag -> model for a discriminated union annotation (empty if not one)."""
    members = {}
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            for tag_field in ("policy", "kind"):
                field = arg.model_fields.get(tag_field)
                if field is not None and isinstance(field.default, str):
                    members[field.default] = arg
        else:
            members.update(_union_members(arg))
    return members


def _walk(loc: List[Any]) -> "tuple[List[Any], Any]":
    """Drop union tags from a pydantic location; return (path, owning model)."""
    if not loc or loc[0] not in POLICY_CLASSES:
        return loc, None
    model: Any = POLICY_CLASSES[loc[0]]
    path: List[Any] = []
    rest = loc[1:]
    i = 0
    while i < len(rest):
        part = rest[i]
        path.append(part)
        field = model.model_fields.get(part) if isinstance(part, str) and model is not None else None
        if field is None:
            if isinstance(part, int):
                i += 1
                continue
            model = None
            i += 1
            continue
        members = _union_members(field.annotation)
        if members and i + 1 < len(rest) and rest[i + 1] in members:
            model = members[rest[i + 1]]
            i += 2
            continue
        model = _first_model(field.annotation)
        i += 1
    return path, model


def _first_model(annotation: Any) -> Union[type, None]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _expected(msg: str) -> str:
    if msg.startswith("Input should be "):
        return "expected " + msg[len("Input should be "):]
    return msg[0].lower() + msg[1:]


def _problems(exc: ValidationError) -> List[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        kind, found = err["type"], err.get("input")
        if kind == "extra_forbidden":
            path, owner = _walk(loc[:-1])
            path = path + [loc[-1]]
            allowed = ", ".join(owner.model_fields) if owner is not None else "a documented key"
            message = f"unknown key, expected one of: {allowed}; found {quote(str(loc[-1]))}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            path, _ = _walk(loc)
            tag = err.get("ctx", {}).get("discriminator", "'policy'").strip("'")
            path = path + [tag]
            tags = err.get("ctx", {}).get("expected_tags") or "'all', 'tokens', 'fraction', 'mass'"
            if kind == "union_tag_invalid":
                message = f"expected one of {tags}, found {quote(err['ctx'].get('tag'))}"
            else:
                message = f"required, expected one of {tags}, found nothing"
        elif kind == "missing":
            path, _ = _walk(loc)
            message = "required, found nothing"
        elif kind == "value_error":
            path, _ = _walk(loc)
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, FieldError):  # a cross-field rule that names the field at fault
                path = path + cause.field.split(".")
                message = cause.message
            else:
                message = err["msg"].removeprefix("Value error, ")
        else:
            path, _ = _walk(loc)
            message = f"{_expected(err['msg'])}, found {quote(found)}"
        problems.append(Problem(".".join(clip(p, 40) if isinstance(p, str) else str(p) for p in path),
                                message))
    return problems


def from_mapping(data: Any, source: str = "<mapping>") -> TierConfig:
    """Validate an already parsed mapping into the typed policy config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem("", f"expected a mapping of settings, found {type(data).__name__}")])
    data = {"policy": "hgca", **data}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def loads(text: str, source: str = "<string>") -> TierConfig:
    """Parse and validate YAML text."""
    return from_mapping(parse_yaml(text, source), source)


def load(path: Union[str, os.PathLike]) -> TierConfig:
    """Read a policy YAML file and return its typed, frozen config."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # a file past the limit (or /dev/zero) is not read whole
            if len(data) > MAX_BYTES:
                size = os.fstat(f.fileno()).st_size
                raise ConfigError(source, [Problem("", too_big_message(max(size, len(data))))])
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(source, [Problem("", f"expected a readable UTF-8 YAML file, found: {reason}")]) from None
    return loads(text, source)


def dump(config: TierConfig) -> str:
    """The resolved config as YAML, defaults filled in, in field order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def check_capacity(config: TierConfig, shape: ModelShape, *, batch: int = 1, source: str = "<config>") -> None:
    """Raise ConfigError when the host store cannot hold `batch` full-length requests."""
    if not config.offloads:
        return
    need = config.host_bytes_per_token(shape) * config.max_context_tokens * batch
    have = config.host_store.capacity_gib * GIB
    if need > have:
        raise ConfigError(source, [Problem(
            "host_store.capacity_gib",
            f"expected at least {need / GIB:.2f} GiB to hold {batch} request(s) of max_context_tokens="
            f"{config.max_context_tokens} for {shape.n_layers} layers x {shape.kv_heads} kv-heads x "
            f"head_dim {shape.head_dim}, found {config.host_store.capacity_gib} GiB",
        )])


def shape_problems(config: TierConfig, shape: ModelShape) -> List[Problem]:
    """What the config asks that this model's attention shape cannot give (group sizes against head_dim)."""
    if not config.offloads:
        return []
    d, problems = shape.head_dim, []
    if d % 16 or d > 1024:  # the host store's layout (native/kvt_store.c)
        problems.append(Problem("", f"expected a model head_dim that is a multiple of 16 and at most 1024 for the "
                                    f"host store, found {d}"))
    store = config.host_store
    if store.key_format is KeyFormat.INT4 and d % store.key_group_channels:
        fits = ", ".join(str(g) for g in range(2, min(d, 1024) + 1, 2) if d % g == 0)
        problems.append(Problem("host_store.key_group_channels", f"expected an even divisor of the model's "
                                f"head_dim {d} ({fits}), found {store.key_group_channels}"))
    book = getattr(getattr(config, "hcattention", None), "codebook", None)
    if book is not None and book.groups is not None and d % book.groups:
        fits = ", ".join(str(g) for g in range(1, d + 1) if d % g == 0)
        problems.append(Problem("hcattention.codebook.groups", f"expected a divisor of the model's head_dim {d} "
                                f"({fits}), found {book.groups}"))
    return problems


def check_shape(config: TierConfig, shape: ModelShape, *, source: str = "<config>") -> None:
    """Raise ConfigError when the policy's group sizes do not fit this model (see `shape_problems`)."""
    problems = shape_problems(config, shape)
    if problems:
        raise ConfigError(source, problems)
