"""Per-process registry of live tiers, request release and row bookkeeping.

sglang frees a finished or aborted request's row of the request-to-token
pool through `ReqToTokenPool.free(req)`; the tier releases that request's
host pages at the same moment.

When the tier has given a request's evicted device slots back to sglang's
allocator (stage 2), the row still names those slots. sglang frees a row
through `BasePrefixCache.free_kv_row(kv, ranges)` (the 0.5.23 line); the
hook on it takes out the positions the tier already freed, so no slot is
ever freed twice. Releases without `free_kv_row` keep stage 1 (device KV
kept on both sides) because nothing there could be hooked safely.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Tuple

_TIERS: "weakref.WeakSet" = weakref.WeakSet()

FREE_KV_ROW = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row"


def track(backend: Any) -> None:
    _TIERS.add(backend)


def _row_of(req: Any) -> Optional[int]:
    index = getattr(req, "req_pool_idx", None)
    if index is None:  # 0.5.23 keeps it on req.kv
        index = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    return None if index is None else int(index)


def on_request_freed(pool: Any, req: Any, *args, **kwargs):
    """BEFORE ReqToTokenPool.free(req): release the tier's state for that row."""
    index = _row_of(req)
    if index is not None:
        for backend in list(_TIERS):
            if backend.req_to_token_pool is pool:
                backend.release(index)
    return None


def on_free_kv_row(cache: Any, kv: Any, ranges: List[Tuple[int, int]], *args, **kwargs):
    """BEFORE BasePrefixCache.free_kv_row: drop row positions whose slots the tier already freed."""
    row = getattr(kv, "req_pool_idx", None)
    if row is None:
        return None
    for backend in list(_TIERS):
        if backend.req_to_token_pool is not cache.req_to_token_pool:
            continue
        freed = backend.freed_range(int(row))
        if freed is not None:
            ranges = subtract(ranges, freed)
    return (cache, kv, ranges) + args, kwargs


def subtract(ranges: List[Tuple[int, int]], hole: Tuple[int, int]) -> List[Tuple[int, int]]:
    """Half-open ranges minus one half-open hole, ascending, empty pieces dropped."""
    lo, hi = hole
    if lo >= hi:
        return list(ranges)
    out: List[Tuple[int, int]] = []
    for start, end in ranges:
        for a, b in ((start, min(end, lo)), (max(start, hi), end)):
            if a < b:
                out.append((a, b))
    return out
