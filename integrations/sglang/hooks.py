"""Which of kvtier's hooks on sglang are in place (a leaf: imports only lifecycle's names).

sglang's hook application only logs failures, so `plugin.register()` records each
target's original function here (`remember`) and checks that every target changed.
"""

from __future__ import annotations

import pkgutil
import sys
from typing import Dict, List

from .lifecycle import CHUNK_FINISH, FREE_KV_ROW

_ORIGINALS: Dict[str, object] = {}


def raw(obj: object) -> object:
    return getattr(obj, "__func__", obj)


def remember(target: str) -> bool:
    """Record target's original function (once); whether it was new."""
    if target in _ORIGINALS:
        return False
    _ORIGINALS[target] = raw(pkgutil.resolve_name(target))
    return True


def missing_hooks() -> List[str]:
    """Targets whose function is still sglang's original."""
    out = []
    for target, original in _ORIGINALS.items():
        try:
            current = raw(pkgutil.resolve_name(target))
        except (ImportError, AttributeError):
            out.append(target)
            continue
        if current is original:
            out.append(target)
    return out


def slot_release_hooked() -> bool:
    """Whether this process's sglang frees rows through a hooked funnel (stage 2 possible)."""
    missing = missing_hooks()
    return any(t in _ORIGINALS and t not in missing for t in (FREE_KV_ROW, CHUNK_FINISH))


def verify_hooks() -> None:
    missing = missing_hooks()
    if missing:
        print("kvtier: hooks missing: " + ", ".join(missing), file=sys.stderr)
        raise SystemExit(2)
