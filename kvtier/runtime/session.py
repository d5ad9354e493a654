"""A serving process's tier over the server's own KV pool, without any server import.

An attention backend (`integrations/sglang/backend.py`) owns a `TierSession` and
hands it what the server tells it: each batch's rows and lengths, each layer's query.
The session does the tier's work:
- tracks each request row against the server's row table (`RowTable`): the slots
  the server allocated, a cached prefix a new request starts on (`adopt`), a row
  reused by a new request;
- evicts what left the window before each batch; under a full host store the pages
  stay on the device (a refused eviction is counted, not raised);
- plans each decode batch once (`plan_decode`) and each prefill chunk batch
  (`plan_extend`), and answers each layer (`run_decode`, `run_extend`);
- gives evicted device slots back through `free_slots` (stage 2, when the server lets
  it), and with a prefix cache writes the host address of each freed slot into its
  row (`kvtier.runtime.addresses`);
- answers the server's admission and cache questions (host capacity, a row's host
  tokens, freed ranges) and keeps the statistics (`stats()`, `DecodeClock`).

The tier is built at the first layer it sees (`build`), when the layer shapes are known.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Hashable, List, Optional, Protocol, Sequence, Tuple

import torch

from ..config import ModelShape, TierConfig
from ..store import CapacityError
from ..store.host_store import capacity_pages
from .addresses import decode, encode, host_run, usable_prefix
from .assembly import TierParts, assemble, close_parts

log = logging.getLogger("kvtier")


class RowTable(Protocol):
    """The server's request-to-slot table: row values are device slots (>= 0), or host
    addresses (< 0, `addresses.encode`) where a prefix cache keeps them."""

    def read(self, row: int, lo: int, hi: int) -> torch.Tensor:
        """Positions [lo, hi) of row as a CPU int64 tensor."""

    def write(self, row: int, lo: int, hi: int, values: torch.Tensor) -> None:
        """Set positions [lo, hi) of row."""


class DecodeClock:
    """Where a decode step's time goes, as the serving thread sees it.

    A step is the time from one decode batch's plan to the next's, with that plan and
    the attention of the forward that followed it; an extend (prefill) batch in between
    ends the chain, so idle time and prefills never count as decode.
    The attention parts come from `HybridAttention.take_times()`: its wall time in
    `run()` over the layers, the host strategy's time and the window kernels' GPU time.
    """

    def __init__(self):
        self._last: Optional[float] = None  # when the previous decode plan started
        self._plan_s = 0.0  # how long it took
        self.steps = 0
        self.step_s = self.plan_s = self.attn_s = self.engine_s = self.window_s = 0.0

    def decode_planned(self, start: float, end: float, times) -> None:
        """A decode batch's plan ran from start to end (time.perf_counter seconds); times: the
        previous step's attention, a StepTimes (cpu_s, gpu_s, wall_s) summed over its layers."""
        if self._last is not None:
            self.steps += 1
            self.step_s += start - self._last
            self.plan_s += self._plan_s
            self.attn_s += times.wall_s
            self.engine_s += times.cpu_s
            self.window_s += times.gpu_s
        self._last, self._plan_s = start, end - start

    def extend_planned(self) -> None:
        self._last = None

    def take(self) -> Optional[Dict[str, float]]:
        """Milliseconds per step since the last take (None when no full step ran), then start over."""
        n = self.steps
        out = None
        if n:
            out = {"steps": n, "step_ms": 1e3 * self.step_s / n, "plan_ms": 1e3 * self.plan_s / n,
                   "attention_ms": 1e3 * self.attn_s / n, "engine_ms": 1e3 * self.engine_s / n,
                   "window_gpu_ms": 1e3 * self.window_s / n}
        self.steps = 0
        self.step_s = self.plan_s = self.attn_s = self.engine_s = self.window_s = 0.0
        return out


class TierSession:
    """One server process's tier (see the module docstring)."""

    def __init__(self, config: TierConfig, *, rows: RowTable, free_slots: Optional[Callable[[torch.Tensor], None]],
                 prefix_cache: bool = False, stats_every_s: float = 30.0,
                 on_stats: Optional[Callable[[Dict[str, float]], None]] = None, stats_callback_every_s: float = 1.0):
        """free_slots: gives evicted device slots back to the server (stage 2); None keeps them
        in the server's pool (stage 1: both sides hold the evicted KV). prefix_cache: the
        server caches finished rows with host addresses in them. on_stats: called with
        `stats()` at most every stats_callback_every_s seconds, at a decode plan (metrics)."""
        self.config = config
        self.rows = rows
        self._free = free_slots
        self.releases_slots = free_slots is not None
        self.prefix_cache = prefix_cache
        self.stats_every_s = stats_every_s
        self._on_stats, self._stats_cb_every_s = on_stats, stats_callback_every_s
        self.parts: Optional[TierParts] = None  # at build
        self.slots_released = 0
        self.evictions_refused = 0  # decode steps whose eviction the full host store refused
        self.prefix_hit_host_tokens = 0  # host tokens new requests took over from cached prefixes
        self.tail_tokens_demoted = 0  # cached device-tail tokens replaced by host copies
        self._addressed: Dict[int, int] = {}  # row -> positions below hold host addresses (prefix cache)
        self._tails: Dict[int, Tuple[int, int]] = {}  # row -> cached device tail [lo, hi) it started on
        self.clock = DecodeClock()
        self.last_timing: Optional[Dict[str, float]] = None  # the clock's last reading
        self._last_log = self._last_full_log = self._last_cb = float("-inf")
        self.reclaim: Optional[Callable[[int], int]] = None  # the prefix cache's, set before build

    # --- build --------------------------------------------------------------

    @property
    def built(self) -> bool:
        return self.parts is not None

    @property
    def tier(self):
        return None if self.parts is None else self.parts.tier

    @property
    def store(self):
        return None if self.parts is None else self.parts.store

    @property
    def attn(self):
        return None if self.parts is None else self.parts.attn

    @property
    def offloads(self) -> bool:
        return self.parts is not None and self.parts.tier.offload

    def build(self, shape: ModelShape, k_pool: Sequence[torch.Tensor], v_pool: Sequence[torch.Tensor], *,
              sm_scale: float, soft_cap: float, rank=None, use_flashinfer: Optional[bool] = None) -> None:
        """Assemble the tier over the server's pool (k_pool/v_pool: per layer [slots, Hkv, D]).

        Evicted pages settle at fixed points of the step, not when a copy happens to land
        (lockstep): under TP every rank's scheduler reads its own allocator and must decide
        alike, and which tokens are attended from the host (and so the greedy output) must
        not depend on copy timing.
        """
        self.sm_scale, self.soft_cap = sm_scale, soft_cap
        self.parts = assemble(self.config, shape, k_pool=k_pool, v_pool=v_pool, alloc_slots=None,
                              free_slots=self._free_evicted if self.releases_slots else _keep,
                              sm_scale=sm_scale, soft_cap=soft_cap, lockstep=True, use_flashinfer=use_flashinfer,
                              rank=rank)
        if self.parts.store is not None and self.prefix_cache and self.reclaim is not None:
            self.parts.store.reclaim = self.reclaim  # cached prefixes give way to running requests

    def close(self) -> None:
        if self.parts is not None:
            parts, self.parts = self.parts, None
            close_parts(parts)

    def _free_evicted(self, slots: torch.Tensor) -> None:
        self._free(slots)
        self.slots_released += slots.numel()

    # --- rows ---------------------------------------------------------------

    def track(self, row: int, n: int, *, cached: bool = False) -> None:
        """Bring the tier's record of request row up to its first n tokens (all in the row table).

        cached: a new request's first n tokens are a prefix the server's cache matched.
        """
        tier = self.tier
        st = tier.requests.get(row)
        if st is not None and st.length > n:  # the row was reused by a new request
            self.release(row)
            st = None
        if st is None:
            if cached and n > 0 and self.prefix_cache:
                self.adopt(row, n)
                return
            tier.add(row)
        have = tier.requests[row].length
        if n > have:
            tier.extend(row, n - have, slots=self.rows.read(row, have, n))

    def adopt(self, row: int, n: int) -> None:
        """Start request row on the cached prefix its row names (`addresses`' layout)."""
        win = self.config.window
        S, T = win.sink_tokens, win.page_tokens
        values = self.rows.read(row, 0, n)
        usable = usable_prefix(values, S, T)
        if usable != n:  # the cache matches usable prefixes only
            raise RuntimeError(f"kvtier: request row {row} starts on a cached prefix of {n} tokens, of which "
                               f"the tier can take {usable}")
        run = host_run(values, S)
        pages = (decode(values[S:S + run]).view(-1, T)[:, 0] // T).tolist() if run else []
        self.tier.adopt(row, sink_slots=values[:min(n, S)], host_pages=pages,
                        recent_slots=values[S + run:] if n > S else values[:0], owned_until=n)
        self._addressed[row] = S + run
        self.prefix_hit_host_tokens += run
        if n > S + run:
            self._tails[row] = (S + run, n)

    def release(self, row: int) -> None:
        self._addressed.pop(row, None)
        self._tails.pop(row, None)
        if self.tier is not None and row in self.tier.requests:
            self.tier.release(row)

    def evict(self) -> None:
        """Move what left the window to the host; a full store keeps the pages on the device."""
        try:
            self.tier.evict()
        except CapacityError as exc:
            # Nothing stored is touched (allocation is all or nothing per request): the pages
            # that did not fit stay on the device and are attended there until room frees up.
            self.evictions_refused += 1
            now = time.monotonic()
            if now - self._last_full_log >= self.stats_every_s:
                self._last_full_log = now
                log.warning("kvtier: host store full, pages stay on the GPU for now: %s", exc)
        if self.prefix_cache:
            self._write_addresses()

    def _write_addresses(self) -> None:
        """Prefix cache: the host address of each slot the tier freed, into the rows."""
        tier = self.tier
        for row in tier.requests:
            lo, hi = tier.freed_positions(row)
            if row not in tier.store:
                continue
            lo = max(lo, self._addressed.get(row, lo), tier.store.table(row).first_pos)
            if hi > lo:
                self.rows.write(row, lo, hi, encode(tier.host_addresses(row, lo, hi)))
                self._addressed[row] = hi

    # --- plan ---------------------------------------------------------------

    def plan_decode(self, rows: List[int], lens: List[int], new_slots: Optional[Sequence[int]] = None) -> None:
        """A decode batch: rows and their lengths (the new token's K, V included).

        new_slots: the device slot of each row's new token (the server's output locations),
        when it has them on the host: a row one token longer than the tier's record takes its
        slot from here instead of a read of the row table (on CUDA a copy and a wait per row).
        """
        t0 = time.perf_counter()
        tier = self.tier
        for i, (row, n) in enumerate(zip(rows, lens)):
            st = tier.requests.get(row)
            if new_slots is not None and st is not None and st.length == n - 1:
                tier.append(row, new_slots[i])
            else:
                self.track(row, n)
        self.evict()
        attn = self.attn
        attn.plan(rows)  # it waits for the previous step's window kernels
        self.clock.decode_planned(t0, time.perf_counter(), attn.take_times())
        now = time.monotonic()
        if self._on_stats is not None and now - self._last_cb >= self._stats_cb_every_s:
            self._last_cb = now
            self._on_stats(self.stats())
        if now - self._last_log >= self.stats_every_s:
            self._last_log = now
            self._log_stats()

    def plan_extend(self, rows: List[int], prefix: List[int], new: List[int]) -> bool:
        """A prefill chunk batch (stage 3): before it, evict what left the window, then add
        the chunk. Returns whether any request has host tokens (else the server's own kernel
        attends the chunk).

        The prefix (earlier chunks) is fully written, so its pages may leave; the chunk's
        tokens are written layer by layer during this forward, so they join the tier only
        after the eviction and leave at the next batch at the earliest.
        """
        tier = self.tier
        for row, p in zip(rows, prefix):
            st = tier.requests.get(row)
            if st is not None and st.length != p:  # a new request on a reused row, or a re-prefill
                self.release(row)
            self.track(row, int(p), cached=True)
        self.evict()  # settles the copies that have landed, then starts the new ones
        hybrid = any(tier.host_tokens(r) > 0 for r in rows)
        for row, p, n in zip(rows, prefix, new):
            self.track(row, int(p) + int(n))
        if hybrid:
            self.attn.plan_extend(rows, [int(n) for n in new])
        return hybrid

    def run_decode(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        return self.attn.run(q, layer)

    def run_extend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        return self.attn.run_extend(q, layer)

    def check_layer(self, layer_id: int, sm_scale: float, soft_cap: float) -> None:
        """The tier answers every layer with one softmax scale and soft-cap (its engine's plan)."""
        if sm_scale != self.sm_scale or soft_cap != self.soft_cap:
            raise ValueError(f"kvtier needs one softmax scale and soft-cap for all layers, found layer {layer_id} "
                             f"with scale {sm_scale} / cap {soft_cap} against {self.sm_scale} / {self.soft_cap}")

    # --- the server's questions ---------------------------------------------

    def host_capacity_tokens(self, shape: ModelShape) -> int:
        """Tokens the host store holds in all; before the build, what it will hold for shape."""
        if self.store is not None:
            pages = self.store.stats().total_pages
        else:
            pages = capacity_pages(self.config, shape)
        return pages * self.config.window.page_tokens

    def host_tokens_of(self, row: int) -> int:
        """Host tokens allocated to request row (0 if the tier does not track it).

        Counted from the pages allocated when their copies start, not from the copies that
        have landed: admission must decide the same on every TP rank, whatever each rank's
        copy timing.
        """
        store = self.store
        if store is None or row not in store:
            return 0
        return len(store.table(row).pages) * self.config.window.page_tokens

    def host_tokens_dropped(self, row: int) -> bool:
        """Whether request row lost host pages under memory pressure (`on_full: evict`)."""
        store = self.store
        return store is not None and row in store and store.table(row).dropped_tokens > 0

    def host_free_tokens(self, shape: ModelShape) -> int:
        """Tokens the host store can still take (with the prefix cache: also the pages only the
        cache holds, which it gives back when the store runs short)."""
        store = self.store
        if store is None:
            return self.host_capacity_tokens(shape)
        pages = store.stats().free_pages + (store.cache_only_pages() if store.reclaim is not None else 0)
        return pages * self.config.window.page_tokens

    def freed_range(self, row: int) -> Optional[Tuple[int, int]]:
        """Row positions [lo, hi) whose slots the tier gave back to the server, if any."""
        if not self.releases_slots or self.tier is None or row not in self.tier.requests:
            return None
        lo, hi = self.tier.freed_positions(row)
        return (lo, hi) if hi > lo else None

    def host_addresses(self, row: int, lo: int, hi: int) -> torch.Tensor:
        return self.tier.host_addresses(row, lo, hi)

    def tail_on_host(self, row: int) -> Tuple[int, int]:
        """[lo, hi): positions of the cached device tail request row started on that it has
        since copied to its own host pages (empty when none)."""
        lo, hi = self._tails.get(row, (0, 0))
        st = None if self.tier is None else self.tier.requests.get(row)
        if st is None or self.host_tokens_dropped(row):
            return 0, 0
        return lo, max(lo, min(hi, st.host_end))

    def tail_demoted(self, row: int, tokens: int) -> None:
        self.tail_tokens_demoted += tokens
        self.slots_released += tokens

    def stats(self) -> Dict[str, float]:
        tier = self.tier
        if tier is None:
            return {}
        store = tier.store
        return {**tier.stats()._asdict(), "requests": len(tier.requests),
                "slots_released": self.slots_released,
                "evictions_refused": self.evictions_refused,
                "cached_host_tokens": 0 if store is None else store.cache_holds,
                "prefix_hit_host_tokens": self.prefix_hit_host_tokens,
                "tail_tokens_demoted": self.tail_tokens_demoted,
                "engine_threads": self.attn.core_split.engine, "window_threads": self.attn.core_split.window}

    def _log_stats(self) -> None:
        tier = self.tier
        st = tier.stats()
        log.info("kvtier: %d requests, %d tokens on the device, %d on the host, %d device slots released, "
                 "%.1f MB device-to-host, %d pages evicted", len(tier.requests), st.device_tokens,
                 st.host_tokens, self.slots_released, st.bytes_d2h / 1e6, st.pages_evicted)
        if self.prefix_cache:
            log.info("kvtier: prefix cache: %d host tokens kept, %d host tokens of prefix hits attended "
                     "in place", tier.store.cache_holds if tier.store is not None else 0,
                     self.prefix_hit_host_tokens)
        t = self.last_timing = self.clock.take()
        if t is not None:
            log.info("kvtier: decode %d steps, %.2f ms/step: attention %.2f (engine %.2f, window GPU %.2f), "
                     "plan %.2f", t["steps"], t["step_ms"], t["attention_ms"], t["engine_ms"],
                     t["window_gpu_ms"], t["plan_ms"])


def _keep(slots: torch.Tensor) -> None:
    """Stage 1: evicted pages keep their device slots."""


__all__ = ["DecodeClock", "RowTable", "TierSession"]
