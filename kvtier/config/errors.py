"""The config layer's typed error: every problem as `path: expected, found`."""

from __future__ import annotations

from typing import Any, List, NamedTuple

# A message quotes at most this much of a bad value: a 50 MB string stays out of logs.
QUOTE_CHARS = 100


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text`, cut to `limit` characters with its full length said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to `limit` characters (a long string is not copied whole first)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{repr(value[:limit])[:limit]}... ({len(value)} characters)"
    return clip(repr(value), limit)


class Problem(NamedTuple):
    """One thing wrong with a config file: where, and what."""

    path: str  # dotted field path, or "" for the whole file
    message: str  # "what was expected, what was found"

    def render(self, source: str) -> str:
        return f"{source}: {self.path}: {self.message}" if self.path else f"{source}: {self.message}"


class ConfigError(ValueError):
    """A config file or mapping that does not describe a valid policy (or not for this host or model)."""

    def __init__(self, source: str, problems: List[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))
