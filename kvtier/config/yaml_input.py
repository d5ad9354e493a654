"""YAML text in, plain data out, with limits checked before anything is built.

A policy file is small and shallow. Anything else is refused with a
`ConfigError` rather than left to exhaust memory or the interpreter's stack:
- at most `MAX_BYTES` of text (1 MiB);
- nesting at most `MAX_DEPTH` deep (64), counted while the file is composed,
  and again with aliases expanded;
- at most `MAX_NODES` nodes (100,000) with every alias expanded, so that a
  few lines of nested aliases (a "billion laughs") are refused, not built.
Duplicate keys are refused too, and `1e30` is a float (as in YAML 1.2), not
the string PyYAML's YAML 1.1 rules make of it.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import yaml

from .errors import ConfigError, Problem, clip, quote

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


class _TooBig(Exception):
    def __init__(self, what: str, mark: Any):
        self.what, self.mark = what, mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds nesting while composing and rejects a key given twice in one mapping."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"expected nesting at most {MAX_DEPTH} levels deep, found deeper",
                              self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be given again here
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {quote(key)} twice (first at line {first + 1})", key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats without a dot (1e30, 5E-3), which YAML 1.1 leaves as strings.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _measure(node: yaml.Node, depth: int, memo: Dict[int, Tuple[int, int]]) -> Tuple[int, int]:
    """(nodes, height) of `node` with aliases expanded; raises _TooBig past the limits.

    An alias is the very node it names, so a node reached twice is counted twice but
    measured once; a node that contains itself is too deep.
    """
    known = memo.get(id(node))
    if depth > MAX_DEPTH or (known is not None and depth + known[1] - 1 > MAX_DEPTH):
        raise _TooBig(f"expected nesting at most {MAX_DEPTH} levels deep once aliases are expanded, found deeper "
                      f"(or an alias inside the node it names)", node.start_mark)
    if known is not None:
        return known
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    nodes, height = 1, 1
    for child in children:
        n, h = _measure(child, depth + 1, memo)
        nodes += n
        height = max(height, h + 1)
        if nodes > MAX_NODES:
            raise _TooBig(f"expected at most {MAX_NODES} values once aliases are expanded, found more", child.start_mark)
    memo[id(node)] = (nodes, height)
    return nodes, height


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse one YAML document within the limits; any problem is a ConfigError naming its line."""
    # A character is 1 to 4 bytes of UTF-8: only a text near the limit needs encoding to be measured.
    size = len(text) if len(text) > MAX_BYTES or len(text) <= MAX_BYTES // 4 else len(text.encode("utf-8", "replace"))
    if size > MAX_BYTES:
        raise ConfigError(source, [Problem("", too_big_message(size))])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {})
        return loader.construct_document(node)
    except _TooBig as exc:
        raise ConfigError(source, [Problem("", f"{exc.what} (at {_at(exc.mark).rstrip(': ')})")]) from None
    except yaml.YAMLError as exc:
        what = clip(str(getattr(exc, "problem", None) or exc))
        where = _at(getattr(exc, "problem_mark", None))
        raise ConfigError(source, [Problem("", f"expected valid YAML, found a syntax error at {where}{what}")]) from None
    except (ValueError, OverflowError) as exc:  # a scalar Python cannot hold: a 5,000-digit int, 2024-13-45
        raise ConfigError(source, [Problem("", f"expected valid YAML, found a value that cannot be read: "
                                               f"{clip(str(exc))}")]) from None
    finally:
        loader.dispose()


def too_big_message(size: int) -> str:
    """`size`: bytes found, or at most MAX_BYTES when only the first MAX_BYTES + 1 were read (a pipe, a device)."""
    found = f"{size / (1 << 20):.1f} MiB" if size > MAX_BYTES + 1 else "more"
    return f"expected a policy file of at most {MAX_BYTES >> 20} MiB, found {found}"
