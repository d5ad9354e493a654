"""Per-process registry of live tiers, and request release.

sglang frees a finished or aborted request's row of the request-to-token
pool through `ReqToTokenPool.free(req)`; the tier releases that request's
host pages at the same moment.
"""

from __future__ import annotations

import weakref
from typing import Any

_TIERS: "weakref.WeakSet" = weakref.WeakSet()


def track(backend: Any) -> None:
    _TIERS.add(backend)


def on_request_freed(pool: Any, req: Any, *args, **kwargs):
    """BEFORE ReqToTokenPool.free(req): release the tier's state for that row."""
    index = getattr(req, "req_pool_idx", None)
    if index is None:  # 0.5.23 keeps it on req.kv
        index = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    if index is not None:
        for backend in list(_TIERS):
            if backend.req_to_token_pool is pool:
                backend.release(int(index))
    return None
