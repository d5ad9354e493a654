"""Prefix caching over host-resident pages: the `kvtier` radix-cache backend.

Under an offloading policy the tier gives the device slots of evicted tokens
back to sglang's allocator, so a request's row no longer names device KV for
them. sglang's radix cache keys a prefix by the row's values, so the tier
writes, in place of each freed slot, the token's host address as a negative
number (`encode`: -1 - (page * page_tokens + offset)). A finished request's row
then goes into the tree as it is: the sinks and the tail in device slots, the
middle as host addresses. The tree pins the host pages its values name, and
lets go of them when it evicts those values.

A new request that matches a cached prefix gets those values in its row; the
backend's `adopt` turns them back into a tier state (sinks, host pages attended
in place, the device tail) instead of recomputing or reloading anything. Only
usable prefixes are matched (`usable_prefix`): one run of whole host pages
right after the sinks, in page order, then device slots.

What changes against sglang's classic `RadixCache` (subclassed, registered as
`--radix-cache-backend kvtier` on releases with a radix-cache registry: 0.5.17
and the 0.5.23 line, whose tree interfaces differ; both are handled):
- the allocator the tree frees through skips host addresses (they are not
  slots); under `evict` it unpins their pages instead;
- `evictable_size` and `protected_size` count device tokens only, so sglang's
  admission and its pool invariant (available + evictable + protected = total)
  stay true;
- running requests are not inserted into the tree (`checkpoint` on the 0.5.23
  line, `cache_unfinished_req` on 0.5.17), only finished ones:
  the tier frees slots of a running request as its window moves on, and the
  tree must never hold one of those;
- a finished request whose host pages were dropped under host-memory pressure
  (`on_full: evict`) is cached no further than its protected prefix;
- when the host store runs short of pages it asks the tree to evict cached
  prefixes first (`reclaim_host`);
- a finished request that had started on a cached device tail (the tree's
  slots, copied to its host pages as its window moved on) hands the tree
  those host copies in place of the slots, which go back to the allocator,
  when no other request holds the tail (`_demote_tail`). Otherwise the tail
  would stay a device run between host runs, where later matches stop, and a
  conversation's third turn would reuse no more than its first.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from kvtier.runtime.addresses import decode, encode, usable_prefix

from . import lifecycle
from .names import RADIX_CACHE, KvTierLaunchError

log = logging.getLogger("kvtier")

NAME = RADIX_CACHE  # the --radix-cache-backend name
REGISTRY = "sglang.srt.mem_cache.registry"


def registry_present() -> bool:
    import importlib

    try:
        module = importlib.import_module(REGISTRY)
    except ImportError:
        return False
    return hasattr(module, "register_radix_cache_backend")


def register() -> bool:
    """Register the `kvtier` radix-cache backend where sglang has a registry; whether it is."""
    if not registry_present():
        return False
    from sglang.srt.mem_cache import registry

    if NAME not in registry.registered_radix_cache_backends():
        registry.register_radix_cache_backend(NAME, _factory)
    return True


def _factory(ctx: Any):
    if getattr(ctx, "is_hybrid_swa", False) or getattr(ctx, "is_hybrid_ssm", False):
        raise KvTierLaunchError("the kvtier radix cache serves full-attention models only; this model has "
                                "sliding-window or state-space layers")
    return cache_class()(ctx.params)


_CLASS = None


def cache_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


class _DeviceSlots:
    """The tree's view of sglang's allocator: host addresses in what it frees are not
    slots; while the tree evicts, their pages are unpinned instead."""

    def __init__(self, allocator: Any, cache: Any):
        self._inner = allocator
        self._cache = cache
        self.evicting = False

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _split(self, index: torch.Tensor) -> torch.Tensor:
        host = index < 0
        if not bool(host.any()):
            return index
        if self.evicting:
            self._cache.unpin_host(index[host])
        return index[~host]

    def free(self, free_index: torch.Tensor, *args, **kwargs):
        return self._inner.free(self._split(free_index), *args, **kwargs)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int):
        # Host addresses sit on whole tier pages, which sglang's page size divides, so what
        # is left keeps its page alignment.
        return self._inner.free_segment(self._split(free_index), start_pos=start_pos)

    def free_segments(self, segments):
        return self._inner.free_segments([(self._split(index), start) for index, start in segments])


def _host_count(node: Any) -> int:
    """Host addresses among a tree node's values, remembered per value tensor (a split replaces it)."""
    cached = getattr(node, "_kvtier_host", None)
    if cached is not None and cached[0] is node.value:
        return cached[1]
    count = int((node.value < 0).sum())
    node._kvtier_host = (node.value, count)
    return count


def _build_class():
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

    class TierRadixCache(RadixCache):
        """sglang's radix cache over rows that hold host addresses where the tier freed slots."""

        def __init__(self, params):
            params = dataclasses.replace(params)
            self._slots = _DeviceSlots(params.token_to_kv_pool_allocator, self)
            params.token_to_kv_pool_allocator = self._slots
            self._inserting = False  # inside checkpoint
            self._version = 0  # bumped whenever the sizes below may change
            self._sizes = (-1, 0, 0)  # (version, host tokens unlocked, host tokens locked)
            super().__init__(params)
            lifecycle.track_cache(self)

        # --- the tier behind this tree --------------------------------------------------

        def _backend(self) -> Optional[Any]:
            for backend in lifecycle.backends_of(self.req_to_token_pool):
                return backend
            return None

        def _store(self):
            backend = self._backend()
            return None if backend is None else backend.session.store

        def _window(self):
            backend = self._backend()
            return None if backend is None else backend.config.window

        # --- host pins ---------------------------------------------------------------------

        def _pages(self, values: torch.Tensor):
            window = self._window()
            addr = decode(values[values < 0].to("cpu", torch.long))
            return (addr // window.page_tokens).tolist()

        def pin_host(self, values: torch.Tensor) -> None:
            if values.numel() and bool((values < 0).any()):
                self._store().cache_hold(self._pages(values))

        def unpin_host(self, values: torch.Tensor) -> None:
            if values.numel():
                self._store().cache_release(self._pages(values))

        def reclaim_host(self, pages: int) -> int:
            """Evict cached prefixes, least recently used first, until `pages` host pages are
            free or nothing evictable holds any; returns the pages freed."""
            store = self._store()
            start = store.stats().free_pages
            step = max(1, self._window().page_tokens)
            while store.stats().free_pages - start < pages and self._host_sizes()[0] > 0:
                if self.evict(EvictParams(num_tokens=step)).num_tokens_evicted == 0:
                    break
            freed = store.stats().free_pages - start
            log.info("kvtier: the host store was short of %d pages; evicting cached prefixes freed %d",
                     pages, freed)
            return freed

        # --- sglang's tree interface --------------------------------------------------------

        def reset(self):
            store = None if not hasattr(self, "root_node") else self._store()
            if store is not None:
                self.unpin_host(self.all_values_flatten() if self.root_node.children else torch.zeros(0))
            super().reset()
            self._version = getattr(self, "_version", 0) + 1

        def match_prefix(self, params):
            result = super().match_prefix(params)
            values = getattr(result, "device_indices", None)  # 0.5.17 returns the values
            n = len(values) if values is not None else result.device_prefix_len
            window = self._window()
            if n == 0 or window is None or self._inserting:
                return result  # checkpoint re-matches what it inserted, whole
            if values is None:
                values = self.path_device_indices(result.last_device_node)[:n]
            values = values.to("cpu", torch.long)
            usable = usable_prefix(values, window.sink_tokens, window.page_tokens)
            self._version += 1  # a match may split a node
            if usable == n:
                return result
            return super().match_prefix(dataclasses.replace(params, key=params.key[:usable]))

        def insert(self, params):
            result = super().insert(params)
            self._version += 1
            value = params.value
            if value is not None and self._window() is not None:
                end = min(len(params.key.page_aligned(self.page_size)), value.numel())
                self.pin_host(value[result.prefix_len:end])  # what the tree stored anew
            return result

        def cache_unfinished_req(self, req, chunked=False, **kwargs):
            """0.5.17: a running request is not cached (see checkpoint); its next chunk continues
            from its row, as under sglang's ChunkCache."""
            end = getattr(getattr(req, "extend_range", None), "end", None)
            if end is None:
                end = len(req.get_fill_ids())
            row = self.req_to_token_pool.req_to_token[req.req_pool_idx, :end]
            req.prefix_indices = row.to(dtype=torch.int64, copy=True)

        def _dropped(self, req) -> bool:
            """Whether the request lost host pages under memory pressure: its row may then name
            pages that hold other tokens by now, so it is cached no further than the tree protects."""
            backend, row = self._backend(), lifecycle.row_of(req)
            return backend is not None and row is not None and backend.host_tokens_dropped(row)

        def cache_finished_req(self, req, is_insert: bool = True, **kwargs):
            """0.5.17: a finished request is cached as checkpoint does on later releases."""
            if is_insert and self._dropped(req):
                is_insert = False
            if is_insert:
                self._demote_tail(req)
            return super().cache_finished_req(req, is_insert, **kwargs)

        def _demote_tail(self, req) -> int:
            """Before a finished request is cached: the device tail it started on (the tree's
            slots) becomes its host copies in the tree, and the slots go back to the allocator,
            if only this request holds the tail. Returns the tokens converted."""
            backend, row = self._backend(), lifecycle.row_of(req)
            lock = getattr(req, "lock", None)
            node = getattr(lock, "node", None) if lock is not None else getattr(req, "last_node", None)
            if backend is None or row is None or node is None or node is self.root_node:
                return 0
            lo, hi = backend.tail_on_host(row)
            if hi <= lo:
                return 0
            path = []
            while node is not self.root_node:
                path.append(node)
                node = node.parent
            path.reverse()
            start, spans = 0, []
            for nd in path:
                end = start + len(nd.value)
                a, b = max(lo, start), min(hi, end)
                if a < b:
                    # another request holds the tail too, or it is host addresses already: leave it
                    if nd.lock_ref != 1 or bool((nd.value[a - start:b - start] < 0).any()):
                        return 0
                    spans.append((nd, a - start, b - start, a, b))
                start = end
            session = backend.session
            table = self.req_to_token_pool.req_to_token
            converted = 0
            for nd, i, j, a, b in spans:
                values = nd.value.clone()
                slots = values[i:j].clone()
                addresses = encode(session.host_addresses(row, a, b)).to(values.device, values.dtype)
                values[i:j] = addresses
                self.pin_host(addresses)
                nd.value = values
                table[row, a:b] = addresses.to(table.dtype)
                self._slots._inner.free(slots)
                converted += b - a
            self._version += 1
            backend.tail_demoted(row, converted)
            return converted

        def checkpoint(self, req, *, up_to: int, **kwargs):
            finished = getattr(req, "finished", None)
            if not (callable(finished) and finished()):
                # The tier frees a running request's slots as its window moves on; the tree
                # must not hold them. The request is cached when it finishes.
                return
            self._demote_tail(req)
            if self._dropped(req):
                up_to = min(up_to, int(req.kv.cache_protected_len))
                if up_to <= 0:
                    return
            self._inserting = True
            try:
                super().checkpoint(req, up_to=up_to, **kwargs)
            finally:
                self._inserting = False

        def evict(self, params):
            self._slots.evicting = True
            try:
                result = super().evict(params)
            finally:
                self._slots.evicting = False
                self._version += 1
            return result

        def inc_lock_ref(self, node):
            self._version += 1
            return super().inc_lock_ref(node)

        def dec_lock_ref(self, node, params=None):
            self._version += 1
            return super().dec_lock_ref(node, params)

        def _host_sizes(self):
            """(unlocked, locked) tokens the tree holds as host addresses."""
            version, unlocked, locked = self._sizes
            if version != self._version:
                unlocked = locked = 0
                stack = list(self.root_node.children.values())
                while stack:
                    node = stack.pop()
                    host = _host_count(node)
                    if node.lock_ref > 0:
                        locked += host
                    else:
                        unlocked += host
                    stack.extend(node.children.values())
                self._sizes = (self._version, unlocked, locked)
            return unlocked, locked

        def evictable_size(self):
            return self.evictable_size_ - self._host_sizes()[0]

        def protected_size(self):
            return self.protected_size_ - self._host_sizes()[1]

    return TierRadixCache


__all__ = ("NAME", "encode", "decode", "usable_prefix", "register", "registry_present", "cache_class")
