"""The host store: an arena of KV pages, page tables and capacity accounting.

Ownership: the store owns the arena (through the native `HostStoreView`) and
the page tables. Page ids are shared by all layers: page p of a request names
the same tokens in every layer's arena, because eviction moves a page of every
layer at once. The serving engine owns device memory; the store never sees it.

A request's host tokens are positions ``[first_pos, first_pos + pages * T)``
of its sequence. Under ``on_full: evict`` the oldest pages of the request
holding the most pages are dropped (``first_pos`` advances); under
``on_full: reject`` the allocation fails with `CapacityError`. Either way a
failed call changes nothing that was stored.

Requests may share pages (`share`: a request that continues another's
prefix attends that prefix's pages in place; `adopt`: a request starts on
pages named by id, as a prefix cache hands them over). A page counts its
tables and its cache holds (`cache_hold`: a prefix cache keeping finished requests' pages)
and returns to the free list when the last of them lets go of it. When pages
run short, `reclaim` (if set) is asked to let go of some before the store rejects
or evicts.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, List, NamedTuple, Optional

import torch

from .._native import HostStoreView, NativeMemoryError
from ..config import GIB_BYTES, ModelShape, OnFull, TierConfig
from .errors import CapacityError, HostMemoryError, PageOwnerError, UnknownRequestError


@dataclass
class PageTable:
    """One request's host pages, in token order.

    starts[i] is the sequence position of pages[i]'s first token. Pages are contiguous
    until a policy drops some from the middle (`HostStore.drop_pages`); the host tokens
    are then the pages' tokens, in order, with the dropped ones missing.

    `ids` holds the same page ids as int32, for a decode plan to pass a batch's tables to
    the engine as one tensor without a Python int per page per step (at 128K tokens a
    request has thousands of pages). Only the store changes a table, through `_append`
    and `_pop`, which keep the three lists in step.
    """

    first_pos: int  # sequence position of the first host token (where the first page starts)
    pages: List[int] = field(default_factory=list)
    dropped_tokens: int = 0  # tokens dropped from the host under pressure or by a policy
    starts: List[int] = field(default_factory=list)
    ids: array = field(default_factory=lambda: array("i"), repr=False, compare=False)  # pages, int32

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.pages):
            self.ids = array("i", self.pages)

    def hole_tokens(self, page_tokens: int) -> int:
        """Tokens between the first and the last page that no page holds (dropped from the middle)."""
        if not self.pages:
            return 0
        return self.starts[-1] + page_tokens - self.starts[0] - page_tokens * len(self.pages)

    def _append(self, pages: List[int], page_tokens: int) -> None:
        start = self.starts[-1] + page_tokens if self.starts else self.first_pos
        self.pages.extend(pages)
        self.ids.extend(pages)
        self.starts.extend(start + i * page_tokens for i in range(len(pages)))

    def _pop(self, i: int) -> int:
        """Remove page i of the table (its start with it); its id."""
        del self.ids[i]
        self.starts.pop(i)
        return self.pages.pop(i)


class StoreStats(NamedTuple):
    total_pages: int
    used_pages: int
    free_pages: int
    page_bytes: int
    requests: int
    dropped_tokens: int


def page_bytes(config: TierConfig, shape: ModelShape) -> int:
    """Host bytes of one page across all layers and kv-heads under config's store formats."""
    return int(round(config.host_bytes_per_token(shape) * config.window.page_tokens))


def capacity_pages(config: TierConfig, shape: ModelShape) -> int:
    """Pages a store sized by `host_store.capacity_gib` holds."""
    return int(config.host_store.capacity_gib * GIB_BYTES // page_bytes(config, shape))


def available_bytes() -> int | None:
    """Host memory a new allocation can get (Linux: MemAvailable + SwapFree), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        return None


class HostStore:
    """Pages of quantized KV for every layer, shared by all requests."""

    def __init__(self, config: TierConfig, shape: ModelShape, *, pin_memory: bool = False, n_pages: int = 0):
        store = config.host_store
        self.config = config
        self.shape = shape
        self.page_tokens = config.window.page_tokens
        self.page_bytes = page_bytes(config, shape)
        if n_pages <= 0:
            n_pages = capacity_pages(config, shape)
        if n_pages <= 0:
            raise CapacityError("one page", 1, 0, self.page_bytes)
        dims = dict(n_layers=shape.n_layers, n_pages=n_pages, kv_heads=shape.kv_heads, page_tokens=self.page_tokens,
                    head_dim=shape.head_dim, key_format=store.key_format.value,
                    value_format=store.value_format.value, key_group=store.key_group_channels,
                    summary_tokens=store.summary_tokens)
        # Checked up front: an arena past the memory there is fails in the allocator, or (Linux
        # overcommits) later, at the first touch, as the OOM killer.
        nbytes, avail = HostStoreView.bytes_for(**dims, chunk_sums=config.chunk_sums), available_bytes()
        if avail is not None and nbytes > avail:
            raise HostMemoryError(n_pages, self.page_bytes, nbytes, avail)
        try:
            self.view = HostStoreView.allocate(**dims, chunk_sums=config.chunk_sums, pin_memory=pin_memory)
        except NativeMemoryError as exc:
            raise HostMemoryError(n_pages, self.page_bytes, nbytes, avail, str(exc)) from exc
        self.n_pages = n_pages
        self._free: List[int] = list(range(n_pages - 1, -1, -1))  # stack: low ids first
        self._refs: List[int] = [0] * n_pages  # tables and cache holds keeping each page
        self._tables: Dict[Hashable, PageTable] = {}
        self.cache_holds = 0  # holds a cache keeps in all (a page may be held more than once)
        self._holds: List[int] = [0] * n_pages
        self._cache_only = 0  # pages only a cache's holds keep
        # Asked for n pages when the free list is short, before on_full applies: a prefix
        # cache lets go of what it holds; returns how many pages it freed.
        self.reclaim: Optional[Callable[[int], int]] = None
        # on_full: evict drops, per request, its pages in this order (indices into its table;
        # None: oldest first); a policy that scores pages sets it.
        self.victim_order: Optional[Callable[[Hashable], List[int]]] = None

    # --- requests -----------------------------------------------------------

    def admit(self, rid: Hashable, *, first_pos: int) -> None:
        if rid in self._tables:
            raise ValueError(f"request {rid!r} is already admitted to the host store")
        self._tables[rid] = PageTable(first_pos)

    def release(self, rid: Hashable) -> int:
        """Let go of a finished or aborted request's pages; returns how many became free
        (pages another request shares stay stored)."""
        table = self._tables.pop(rid, None)
        if table is None:
            return 0
        return self._unref(reversed(table.pages))

    def share(self, src: Hashable, dst: Hashable, n_pages: int) -> List[int]:
        """Admit dst with the first n_pages of src's table, attended in place (nothing is copied).

        dst's host tokens start where src's do; pages dst allocates later follow them.
        """
        table = self.table(src)
        if dst in self._tables:
            raise ValueError(f"request {dst!r} is already admitted to the host store")
        if not 0 <= n_pages <= len(table.pages):
            raise ValueError(f"share: request {src!r} has {len(table.pages)} host pages, asked for {n_pages}")
        pages = table.pages[:n_pages]
        for p in pages:
            self._ref(p)
        self._tables[dst] = PageTable(table.first_pos, list(pages), starts=table.starts[:n_pages])
        return list(pages)

    def adopt(self, rid: Hashable, *, first_pos: int, pages: List[int]) -> None:
        """Admit rid with these stored pages as its first host pages, attended in place.

        They must be held already (by another table or a cache hold); rid holds them too from now on.
        """
        if rid in self._tables:
            raise ValueError(f"request {rid!r} is already admitted to the host store")
        for p in pages:
            if not 0 <= p < self.n_pages or self._refs[p] == 0:
                raise ValueError(f"adopt: page {p} is not a stored page (the store has {self.n_pages} pages)")
        for p in pages:
            self._ref(p)
        table = self._tables[rid] = PageTable(first_pos)
        table._append(list(pages), self.page_tokens)

    def cache_hold(self, pages: Iterable[int]) -> None:
        """A cache (of finished requests' prefixes) holds stored pages beyond their tables,
        once per id given; ids may repeat. Not to be confused with page-locked memory
        (`host_store.pinned`)."""
        pages = list(pages)
        for p in pages:
            if not 0 <= p < self.n_pages or self._refs[p] == 0:
                raise ValueError(f"cache_hold: page {p} is not a stored page (the store has {self.n_pages} pages)")
        for p in pages:
            self._ref(p, hold=1)
        self.cache_holds += len(pages)

    def cache_release(self, pages: Iterable[int]) -> int:
        """Let go of holds taken by `cache_hold`; returns how many pages became free."""
        pages = list(pages)
        counts: Dict[int, int] = {}
        for p in pages:
            counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            if not 0 <= p < self.n_pages or self._holds[p] < n:
                held = self._holds[p] if 0 <= p < self.n_pages else 0
                raise ValueError(f"cache_release: {n} holds of page {p} given back, {held} held")
        self.cache_holds -= len(pages)
        return self._unref(pages, hold=1)

    def cache_only_pages(self) -> int:
        """Stored pages that only a cache holds (no table): what the cache could give back."""
        return self._cache_only

    def _only_held(self, p: int) -> bool:
        return 0 < self._holds[p] == self._refs[p]

    def _ref(self, p: int, hold: int = 0) -> None:
        before = self._only_held(p)
        self._refs[p] += 1
        self._holds[p] += hold
        self._cache_only += self._only_held(p) - before

    def _unref(self, pages, hold: int = 0) -> int:
        freed = 0
        for p in pages:
            before = self._only_held(p)
            self._refs[p] -= 1
            self._holds[p] -= hold
            self._cache_only += self._only_held(p) - before
            if self._refs[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def table(self, rid: Hashable) -> PageTable:
        try:
            return self._tables[rid]
        except KeyError:
            raise UnknownRequestError(f"request {rid!r} has no pages in the host store") from None

    def __contains__(self, rid: Hashable) -> bool:
        return rid in self._tables

    # --- pages --------------------------------------------------------------

    def allocate(self, rid: Hashable, n: int) -> List[int]:
        """Reserve n pages at the end of a request's table (not yet written)."""
        table = self.table(rid)
        if n > len(self._free) and self.reclaim is not None:
            self.reclaim(n - len(self._free))
        if n > len(self._free):
            if self.config.host_store.on_full is OnFull.REJECT:
                raise CapacityError(f"request {rid!r}", n, len(self._free), self.page_bytes)
            self._evict_for(n, protect=rid)
        ids = [self._free.pop() for _ in range(n)]
        for p in ids:
            self._refs[p] = 1
        table._append(ids, self.page_tokens)
        return ids

    def drop_pages(self, rid: Hashable, indices: Iterable[int]) -> int:
        """Drop pages of a request's table by their index in it (a policy's eviction: any pages,
        not only the oldest); returns how many pages became free. Positions of the other pages
        do not change; the dropped tokens are no longer attended."""
        table = self.table(rid)
        idx = sorted(set(indices), reverse=True)
        if idx and not 0 <= idx[-1] <= idx[0] < len(table.pages):
            raise ValueError(f"drop_pages: request {rid!r} has {len(table.pages)} host pages, got indices "
                             f"{sorted(idx)[:8]}")
        freed = 0
        for i in idx:
            freed += self._unref([table._pop(i)])
        table.dropped_tokens += len(idx) * self.page_tokens
        if table.starts:
            table.first_pos = table.starts[0]
        return freed

    def write(self, rid: Hashable, layer: int, page_ids: List[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize K, V [n, Hkv, T, D] (f32/bf16, CPU) into pages of one layer of request rid.

        Every page must be in rid's table: a page released or evicted since it was allocated
        may belong to another request now, and writing it would overwrite that request's
        tokens (PageOwnerError). NaN or infinite keys and values are refused (NativeValueError).
        """
        self._check_owner(rid, page_ids)
        self.view.append(layer, torch.tensor(page_ids, dtype=torch.int32), k, v)

    def write_layers(self, rid: Hashable, page_ids: List[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """write() of every layer of the pages at once, K, V [L, n, Hkv, T, D] (what eviction settles):
        the owner is checked and the ids tensor built once, not at every layer."""
        self._check_owner(rid, page_ids)
        ids = torch.tensor(page_ids, dtype=torch.int32)
        for layer in range(k.shape[0]):
            self.view.append(layer, ids, k[layer], v[layer])

    def _check_owner(self, rid: Hashable, page_ids: List[int]) -> None:
        pages = self.table(rid).pages
        n = len(page_ids)
        if n == 0 or pages[-n:] == list(page_ids):  # the usual case: its newest pages, as allocated
            return
        held = set(pages)
        stray = [p for p in page_ids if p not in held]
        if stray:
            raise PageOwnerError(f"HostStore.write: pages {stray[:8]} are not in the table of request {rid!r} "
                                 f"(released, evicted or never allocated to it); nothing was written")

    def _evict_for(self, n: int, *, protect: Hashable) -> None:
        """Drop oldest pages, largest request first, until n pages are free.

        A shared page frees only when every table holding it has dropped it, so the
        pages that could be freed are counted first: a refused eviction changes nothing.
        """
        need = n - len(self._free)
        candidates = sorted(
            (rid for rid in self._tables if rid != protect), key=lambda r: len(self._tables[r].pages), reverse=True
        )
        held: Dict[int, int] = {}
        for t in self._tables.values():
            for p in t.pages:
                held[p] = held.get(p, 0) + 1
        # A page a cache holds stays stored when its tables drop it: only the others can be freed here.
        available = sum(1 for p, count in held.items() if count == self._refs[p])
        if need > available:
            raise CapacityError("eviction", n, len(self._free) + available, self.page_bytes)
        for rid in candidates + [protect]:
            table = self._tables[rid]
            if self.victim_order is not None:
                order, taken = self.victim_order(rid), []
                for i in order:
                    if need <= 0:
                        break
                    taken.append(i)
                    need -= self._refs[table.pages[i]] == 1
                self.drop_pages(rid, taken)
            while need > 0 and table.pages:
                start = table.starts[0]
                need -= self._unref([table._pop(0)])
                table.first_pos = table.starts[0] if table.starts else start + self.page_tokens
                table.dropped_tokens += self.page_tokens
            if need <= 0:
                return

    # --- accounting ---------------------------------------------------------

    def stats(self) -> StoreStats:
        used = self.n_pages - len(self._free)
        dropped = sum(t.dropped_tokens for t in self._tables.values())
        return StoreStats(self.n_pages, used, len(self._free), self.page_bytes, len(self._tables), dropped)

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    def close(self) -> None:
        self.view.close()
