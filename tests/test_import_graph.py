"""The import graph: no circles, and layers import only downward (kvtier/README.md's map).

Every import counts, also one inside a function: a lazy import that closes a circle
still ties the two modules together.
"""

import ast
import pathlib
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"kvtier": ROOT / "kvtier", "kvtier_sglang": ROOT / "integrations" / "sglang"}


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for name, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name] + parts)] = path
    return out


def _imports(module: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # a name from a module, or a submodule; a module that is not Python source (the
            # compiled engine) is no edge
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != module)
    return found


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circles(package):
    graph = {m: {d for d in deps if d.split(".")[0] == package}
             for m, deps in _graph().items() if m.split(".")[0] == package}
    assert _cycles(graph) == []


# Lower layers never import these (kvtier/README.md): a layer imports only from layers below it.
LOWER = {
    "kvtier.config": ("kvtier._native", "kvtier.store", "kvtier.policies", "kvtier.runtime", "kvtier.eval",
                      "kvtier.bench", "kvtier.cli", "kvtier_sglang"),
    "kvtier._native": ("kvtier.store", "kvtier.policies", "kvtier.runtime", "kvtier.eval", "kvtier.bench",
                       "kvtier.cli", "kvtier_sglang"),
    "kvtier.store": ("kvtier.policies", "kvtier.runtime", "kvtier.eval", "kvtier.bench", "kvtier.cli",
                     "kvtier_sglang"),
    "kvtier.policies": ("kvtier.runtime", "kvtier.eval", "kvtier.bench", "kvtier.cli", "kvtier_sglang"),
    "kvtier.runtime": ("kvtier.eval", "kvtier.bench", "kvtier.cli", "kvtier_sglang"),
}


@pytest.mark.parametrize("layer", sorted(LOWER))
def test_layers_import_only_downward(layer):
    wrong = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m == layer or m.startswith(layer + ".")
                   for d in deps if any(d == u or d.startswith(u + ".") for u in LOWER[layer]))
    assert wrong == []


def test_nothing_in_kvtier_imports_sglang():
    offenders = []
    for path in PACKAGES["kvtier"].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] == "sglang"]
    assert offenders == []
