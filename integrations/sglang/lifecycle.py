"""Per-process registry of live tiers, request release and row bookkeeping.

sglang frees a finished or aborted request's row of the request-to-token
pool through `ReqToTokenPool.free(req)`; the tier releases that request's
host pages at the same moment.

When the tier has given a request's evicted device slots back to sglang's
allocator (stage 2), the row still names those slots, and sglang frees the
row when the request ends; the hooks below take out the positions the tier
already freed, so no slot is ever freed twice:
- the 0.5.23 line frees rows through `BasePrefixCache.free_kv_row(kv, ranges)`;
- earlier releases (0.5.17) free a finished request's row, with the radix
  cache off, in `ChunkCache.cache_finished_req(req, kv_len_to_handle=...)`.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Tuple

_TIERS: "weakref.WeakSet" = weakref.WeakSet()
_CACHES: "weakref.WeakSet" = weakref.WeakSet()  # kvtier radix caches (prefix.py)

FREE_KV_ROW = "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row"
CHUNK_FINISH = "sglang.srt.mem_cache.chunk_cache.ChunkCache.cache_finished_req"


def funnels_present() -> List[str]:
    """The row-freeing funnels (FREE_KV_ROW, CHUNK_FINISH) this sglang has; stage 2 needs one."""
    import pkgutil

    found = []
    for target in (FREE_KV_ROW, CHUNK_FINISH):
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError):
            continue
        found.append(target)
    return found


def track(backend: Any) -> None:
    _TIERS.add(backend)


def track_cache(cache: Any) -> None:
    _CACHES.add(cache)


def cache_of(pool: Any) -> Optional[Any]:
    """The kvtier radix cache over this request-to-token pool, if there is one."""
    for cache in list(_CACHES):
        if cache.req_to_token_pool is pool:
            return cache
    return None


def backends_of(pool: Any) -> List[Any]:
    """The live tiers over this request-to-token pool (one per model runner)."""
    return [b for b in list(_TIERS) if b.req_to_token_pool is pool]


def row_of(req: Any) -> Optional[int]:
    """The request's row of the request-to-token pool (on req, or on req.kv on the 0.5.23 line)."""
    index = getattr(req, "req_pool_idx", None)
    if index is None:  # 0.5.23 keeps it on req.kv
        index = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    return None if index is None else int(index)


def _freed_range(pool: Any, row: Any) -> Optional[Tuple[int, int]]:
    """Row positions whose device slots a tier over `pool` already gave back, if any."""
    if row is None:
        return None
    for backend in backends_of(pool):
        freed = backend.freed_range(int(row))
        if freed is not None:
            return freed
    return None


def on_request_freed(pool: Any, req: Any, *args, **kwargs):
    """BEFORE ReqToTokenPool.free(req): release the tier's state for that row."""
    index = row_of(req)
    if index is not None:
        for backend in backends_of(pool):
            backend.release(index)
    return None


def on_free_kv_row(cache: Any, kv: Any, ranges: List[Tuple[int, int]], *args, **kwargs):
    """BEFORE BasePrefixCache.free_kv_row: drop row positions whose slots the tier already freed."""
    freed = _freed_range(cache.req_to_token_pool, getattr(kv, "req_pool_idx", None))
    if freed is None:
        return None
    return (cache, kv, subtract(ranges, freed)) + args, kwargs


def around_chunk_finish(original, cache: Any, req: Any, *args, kv_len_to_handle: int, **kwargs):
    """AROUND ChunkCache.cache_finished_req (0.5.17): free the row but the tier's released positions."""
    row = getattr(req, "req_pool_idx", None)
    freed = _freed_range(cache.req_to_token_pool, row)
    if freed is None:
        return original(cache, req, *args, kv_len_to_handle=kv_len_to_handle, **kwargs)
    # What the original does (free [cache_protected_len, kv_len_to_handle) of the row), less the hole.
    table = cache.req_to_token_pool.req_to_token[int(row)]
    for lo, hi in subtract([(int(getattr(req, "cache_protected_len", 0) or 0), int(kv_len_to_handle))], freed):
        cache.token_to_kv_pool_allocator.free(table[lo:hi])
    return None


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
