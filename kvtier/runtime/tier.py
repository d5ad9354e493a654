"""The tier manager: which tokens of each request live where, and moving them.

Ownership: the serving engine owns device memory. The manager asks for device
slots through `alloc_slots` and returns them through `free_slots` (both
callbacks; `DevicePool` provides them when there is no server). It owns the
host store's page tables through `HostStore`.

Per request the device holds the sinks and the recent window. When the recent
part exceeds `window_tokens`, whole pages leave, oldest first. On CUDA the
device-to-host copy runs on a side stream and the page stays attendable on the
device until the copy has landed and been quantized at the next `settle()`;
on the CPU eviction is synchronous. Either way a token is attended exactly
once per step: from the device until its page is settled, then from the host.

Requests may start on pages the store already holds (`adopt`: a prefix cache
hit): the prefix's sinks and its device tail stay in the server's slots, which
the server's cache owns (`owned_until`): when those tokens leave the window
they are copied to the host like any others, but their slots are not freed.
`host_addresses` names where each host token lives, so that a cache can keep
and later hand back host pages by address.

With `lockstep=True` (the sglang backend) settling does not depend on copy
timing: each `evict()` first waits for the copies the previous `evict()`
started and settles exactly those, and `settle()` alone settles nothing new.
Which tokens are attended from the host, and so the output, is then the same
from run to run; under tensor parallelism every rank frees the same device
slots at the same step, so the ranks' schedulers, which each read their own
allocator, keep deciding alike.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..config import ModelShape, TierConfig
from ..store import HostStore, UnknownRequestError
from .split import host_pages


def slot_array(slots: Optional[torch.Tensor] = None) -> array:
    """Slot ids as an int64 array: appends, front deletes and whole-list tensors
    (`slot_tensor`) cost a memcpy, not a Python int per slot, at 128K tokens."""
    out = array("q")
    if slots is not None and slots.numel():
        out.frombytes(bytes(8 * slots.numel()))
        torch.frombuffer(out, dtype=torch.int64).copy_(slots.reshape(-1))
    return out


def slot_tensor(slots: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor (a copy) of slot ids held as `slot_array` or any int sequence."""
    if isinstance(slots, array) and slots.typecode == "q":
        return torch.frombuffer(slots, dtype=torch.int64).clone() if len(slots) else torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(list(slots), dtype=torch.long)


@dataclass
class RequestState:
    length: int = 0
    sink_slots: array = field(default_factory=slot_array)
    recent_slots: array = field(default_factory=slot_array)  # positions host_end .. length-1
    host_end: int = 0  # one past the last settled host position
    in_flight: int = 0  # tokens of recent_slots[:in_flight] being copied to the host
    owned_until: int = 0  # positions below this hold slots the server's cache owns: never freed here


class TierStats(NamedTuple):
    device_tokens: int
    host_tokens: int
    bytes_d2h: int
    bytes_h2d: int
    pages_evicted: int


class _Pending(NamedTuple):
    rid: Hashable
    page_ids: List[int]
    slots: torch.Tensor
    k: torch.Tensor  # [L, n_pages, Hkv, T, D] on the host (pinned on CUDA)
    v: torch.Tensor
    event: Optional[torch.cuda.Event]


class TierManager:
    def __init__(self, config: TierConfig, shape: ModelShape, k_pool: "LayerBuffers", v_pool: "LayerBuffers",
                 store: Optional[HostStore], *, alloc_slots: Optional[Callable[[int], torch.Tensor]],
                 free_slots: Callable[[torch.Tensor], None], offload: bool = True, lockstep: bool = False):
        """k_pool, v_pool: per layer, [n_slots, Hkv, D] device KV (one 4-D tensor or the server's list).

        alloc_slots may be None when the server allocates slots itself and
        passes them to `extend(..., slots=)`. lockstep: settle at each evict() what the
        previous one started, not by copy timing (see the module docstring).
        """
        self.config, self.shape = config, shape
        self.k_pool, self.v_pool = k_pool, v_pool
        self.store = store
        self.alloc_slots, self.free_slots = alloc_slots, free_slots
        self.offload = offload and store is not None
        self.requests: Dict[Hashable, RequestState] = {}
        self._pending: List[_Pending] = []
        self.lockstep = lockstep
        self.device = k_pool[0].device
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._d2h = self._h2d = self._evicted = 0
        # Called before the host store changes: whoever reads it concurrently
        # (the pipelined engine) finishes first.
        self.host_readers: List[Callable[[], None]] = []
        # Called with (layer, page ids, keys [pages, Hkv, T, D]) whenever pages' keys are
        # written to the host store: a host strategy that keeps its own copy of the keys
        # (compressed, on the device) takes it here. On CUDA eviction calls it on the copy
        # stream with the device's keys, before the copy's event, so settling waits for it.
        self.key_listeners: List[Callable[[int, torch.Tensor, torch.Tensor], None]] = []

    # --- request lifecycle --------------------------------------------------

    def add(self, rid: Hashable) -> None:
        if rid in self.requests:
            raise ValueError(f"request {rid!r} is already tracked by the tier")
        self.requests[rid] = RequestState()
        if self.offload:
            self.store.admit(rid, first_pos=self.config.window.sink_tokens)

    def release(self, rid: Hashable) -> None:
        """Free a finished or aborted request everywhere (in-flight copies included).

        Its in-flight copies are dropped, not settled: their slots are still
        the request's, freed with it. The device slots it still holds go back
        through `free_slots` only when this manager allocated them; a server
        that allocates its own (`alloc_slots=None`) frees them itself, and
        only evicted slots ever reach `free_slots` then.

        A request the tier does not track (never added, or released already) raises
        `UnknownRequestError` and changes nothing: a second release would free its slots
        and pages twice.
        """
        if rid not in self.requests:
            raise UnknownRequestError(f"release: request {rid!r} is not tracked by the tier (never added, or "
                                      "released already)")
        self._quiesce()
        st = self.requests.pop(rid)
        self._pending = [p for p in self._pending if p.rid != rid]
        if self.alloc_slots is not None:
            self.free_slots(slot_tensor(st.sink_slots + st.recent_slots))
        if self.offload:
            self.store.release(rid)

    def fork(self, src: Hashable, dst: Hashable, n: Optional[int] = None) -> torch.Tensor:
        """Start request dst as a continuation of src's first n tokens (default: all of them).

        The host part is shared, not copied: dst attends src's host pages in place, and the
        store holds them once, until both requests let go (either may finish first). The
        device part (sinks and src's recent tokens up to n, at most a window and a page) is
        copied into dst's own slots from `alloc_slots`. n may not cut into the host part:
        it runs from src's settled host tokens to its length. Returns dst's device slots.
        """
        if self.alloc_slots is None:
            raise ValueError("fork: this tier has no slot allocator (the server owns the device slots)")
        if dst in self.requests:
            raise ValueError(f"request {dst!r} is already tracked by the tier")
        if src not in self.requests:
            raise ValueError(f"fork: request {src!r} is not tracked by the tier")
        self._settle_all()  # src's pages in flight land first, so its host part is final
        st = self.requests[src]
        n = st.length if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not st.host_end <= n <= st.length:
            raise ValueError(f"fork: request {src!r} has {st.length} tokens, the first {st.host_end} of them up to "
                             f"its host part's end; a fork takes {st.host_end} to {st.length} of them, got {n!r}")
        sinks = len(st.sink_slots)
        src_slots = slot_tensor(st.sink_slots + st.recent_slots[: n - st.host_end]).to(self.device)
        slots = self.alloc_slots(src_slots.numel())
        dev = slots.to(self.device)
        for layer in range(self.shape.n_layers):
            self.k_pool[layer][dev] = self.k_pool[layer][src_slots]
            self.v_pool[layer][dev] = self.v_pool[layer][src_slots]
        if self.offload:
            self._quiesce()
            table = self.store.table(src)
            T = self.config.window.page_tokens
            self.store.share(src, dst, -(-(st.host_end - table.first_pos - table.hole_tokens(T)) // T))
        cpu = slots.cpu()
        self.requests[dst] = RequestState(length=n, sink_slots=slot_array(cpu[:sinks]),
                                          recent_slots=slot_array(cpu[sinks:]), host_end=st.host_end)
        return slots

    def adopt(self, rid: Hashable, *, sink_slots: torch.Tensor, host_pages: Sequence[int],
              recent_slots: torch.Tensor, owned_until: int) -> None:
        """Start request rid on a cached prefix: its sinks and recent tokens in the server's
        slots, the tokens between on stored host pages (full pages, in order), attended in place.

        Positions below owned_until keep their slots when they leave the window (the server's
        cache owns them); the request holds the pages like its own until it is released.
        """
        if rid in self.requests:
            raise ValueError(f"request {rid!r} is already tracked by the tier")
        win = self.config.window
        sinks, recent = sink_slots.numel(), recent_slots.numel()
        if host_pages and sinks != win.sink_tokens:
            raise ValueError(f"adopt: host pages follow {win.sink_tokens} sink tokens, got {sinks}")
        if host_pages and not self.offload:
            raise ValueError("adopt: this tier keeps every token on the device")
        if sinks > win.sink_tokens or (recent and sinks < win.sink_tokens):
            raise ValueError(f"adopt: {sinks} sink slots and {recent} recent slots; the first "
                             f"{win.sink_tokens} tokens are sinks")
        host_end = sinks + len(host_pages) * win.page_tokens
        if host_pages:
            self._quiesce()
            self.store.adopt(rid, first_pos=sinks, pages=list(host_pages))
        elif self.offload:
            self.store.admit(rid, first_pos=win.sink_tokens)
        self.requests[rid] = RequestState(length=host_end + recent, sink_slots=slot_array(sink_slots.cpu()),
                                          recent_slots=slot_array(recent_slots.cpu()), host_end=host_end,
                                          owned_until=owned_until)

    def host_addresses(self, rid: Hashable, lo: int, hi: int) -> torch.Tensor:
        """Where positions [lo, hi) of the request live on the host: page * page_tokens + offset
        (int64), positions its table holds (`host_tokens` counts them)."""
        table = self.store.table(rid)
        T = self.config.window.page_tokens
        if table.hole_tokens(T):
            raise ValueError(f"host_addresses: request {rid!r} had host pages dropped from the middle; its "
                             "host tokens no longer follow its positions")
        end = table.first_pos + len(table.pages) * T
        if not table.first_pos <= lo <= hi <= min(end, self.requests[rid].host_end):
            raise ValueError(f"host_addresses: positions [{lo}, {hi}) of request {rid!r}; its host tokens are "
                             f"[{table.first_pos}, {self.requests[rid].host_end})")
        rel = torch.arange(lo - table.first_pos, hi - table.first_pos)
        pages = torch.as_tensor(table.pages, dtype=torch.long)
        return pages[rel // T] * T + rel % T if rel.numel() else rel

    def freed_positions(self, rid: Hashable) -> Tuple[int, int]:
        """[lo, hi): the request's positions whose device slots went back through `free_slots`."""
        st = self.requests[rid]
        lo = max(len(st.sink_slots), st.owned_until)
        return lo, max(lo, st.host_end)

    def extend(self, rid: Hashable, n: int, *, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Device slots for the request's next n tokens; the caller writes their K, V.

        Without `slots` the manager allocates them; a server that allocates
        its own passes them here.
        """
        st = self.requests[rid]
        if slots is None:
            if self.alloc_slots is None:
                raise ValueError("this tier has no slot allocator: pass the server's slots to extend(slots=)")
            slots = self.alloc_slots(n)
        elif slots.numel() != n:
            raise ValueError(f"extend: expected {n} slots, found {slots.numel()}")
        sinks = max(0, min(n, self.config.window.sink_tokens - st.length))
        st.sink_slots += slot_array(slots[:sinks].cpu())
        st.recent_slots += slot_array(slots[sinks:].cpu())
        st.host_end = max(st.host_end, len(st.sink_slots))  # recent_slots[0]'s position
        st.length += n
        return slots

    def append(self, rid: Hashable, slot: int) -> None:
        """extend(rid, 1, slots=...) for one decode token in the server's slot `slot`, without tensors."""
        st = self.requests[rid]
        if st.length < self.config.window.sink_tokens:
            st.sink_slots.append(slot)
            st.host_end = max(st.host_end, len(st.sink_slots))
        else:
            st.recent_slots.append(slot)
        st.length += 1

    # --- prefill straight into the tiers -------------------------------------

    def prefill(self, rid: Hashable, n: int) -> "PrefillPlan":
        """Place an n-token prompt: device slots for sinks + window, host pages for the rest.

        Returns where each layer's K, V go; `write_prefill_layer` then writes them.
        """
        st = self.requests[rid]
        if st.length:
            raise ValueError(f"request {rid!r} already has {st.length} tokens; prefill starts a request")
        win = self.config.window
        pages = host_pages(n, sink_tokens=win.sink_tokens, window_tokens=win.window_tokens,
                           page_tokens=win.page_tokens) if self.offload else 0
        sinks = min(n, win.sink_tokens)
        host = pages * win.page_tokens
        if pages:
            self._quiesce()
        page_ids = self.store.allocate(rid, pages) if pages else []
        slots = self.alloc_slots(n - host)
        st.sink_slots = slot_array(slots[:sinks].cpu())
        st.recent_slots = slot_array(slots[sinks:].cpu())
        st.host_end = sinks + host
        st.length = n
        return PrefillPlan(rid, sinks, host, page_ids, slots)

    def write_prefill_layer(self, plan: "PrefillPlan", layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, Hkv, D] of one layer for the whole prompt, on any device."""
        dev = torch.cat([torch.arange(plan.sinks), torch.arange(plan.sinks + plan.host_tokens, k.shape[0])])
        dev, slots = dev.to(k.device), plan.slots.to(self.device)
        self.k_pool[layer][slots] = k[dev].to(self.k_pool[layer])
        self.v_pool[layer][slots] = v[dev].to(self.v_pool[layer])
        if plan.host_tokens:
            self._quiesce()
            hk = k[plan.sinks: plan.sinks + plan.host_tokens]
            hv = v[plan.sinks: plan.sinks + plan.host_tokens]
            pages_k = _to_pages(hk, self.config.window.page_tokens)
            self.store.write(plan.rid, layer, plan.page_ids, pages_k, _to_pages(hv, self.config.window.page_tokens))
            for listener in self.key_listeners:
                listener(layer, torch.as_tensor(plan.page_ids, dtype=torch.long), pages_k)
            self._d2h += 2 * hk.numel() * hk.element_size() if k.device.type == "cuda" else 0

    # --- eviction -----------------------------------------------------------

    def evict(self) -> int:
        """Start moving pages that left the window; returns pages started."""
        if not self.offload:
            return 0
        self._quiesce()
        if self.lockstep:
            self._settle_all()  # the copies the previous evict() started, waited for
        else:
            self.settle()
        win = self.config.window
        started = 0
        for rid, st in self.requests.items():
            over = len(st.recent_slots) - st.in_flight - win.window_tokens
            n_pages = -(-over // win.page_tokens) if over > 0 else 0
            if n_pages == 0:
                continue
            page_ids = self.store.allocate(rid, n_pages)
            count = n_pages * win.page_tokens
            slots = slot_tensor(st.recent_slots[st.in_flight: st.in_flight + count])
            st.in_flight += count
            self._start_copy(rid, page_ids, slots)
            started += n_pages
        if not self._cuda:
            self._settle(lambda p: True)  # synchronous copies: nothing depends on timing
        return started

    def _start_copy(self, rid, page_ids, slots) -> None:
        T = self.config.window.page_tokens
        idx = slots.to(self.device)

        def gather(pool):
            x = torch.stack([pool[layer][idx] for layer in range(self.shape.n_layers)])  # [L, n, Hkv, D]
            L, n, h, d = x.shape
            return x.view(L, n // T, T, h, d).transpose(2, 3)  # [L, pages, Hkv, T, D]

        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                k_dev, v_dev = gather(self.k_pool), gather(self.v_pool)
                self._tell_keys(page_ids, k_dev)
                k = torch.empty(k_dev.shape, dtype=k_dev.dtype, pin_memory=True)
                v = torch.empty_like(k, pin_memory=True)
                k.copy_(k_dev, non_blocking=True)
                v.copy_(v_dev, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            k, v, event = gather(self.k_pool).contiguous(), gather(self.v_pool).contiguous(), None
            self._tell_keys(page_ids, k)
        self._d2h += 2 * k.numel() * k.element_size()
        self._pending.append(_Pending(rid, page_ids, slots, k, v, event))

    def _tell_keys(self, page_ids: List[int], k: torch.Tensor) -> None:
        """k [L, pages, Hkv, T, D]: each layer's keys of the pages to the key listeners."""
        if self.key_listeners:
            ids = torch.as_tensor(page_ids, dtype=torch.long)
            for layer in range(self.shape.n_layers):
                for listener in self.key_listeners:
                    listener(layer, ids, k[layer])

    def settle(self) -> None:
        """Finish copies that have landed: quantize into the store, free device slots.

        In lockstep only `evict()` and `drain()` settle, each at a fixed point of the step.
        """
        if not self.lockstep:
            self._settle(lambda p: p.event is None or p.event.query())

    def _settle_all(self) -> None:
        """Wait for every in-flight copy and settle it."""
        for p in self._pending:
            if p.event is not None:
                p.event.synchronize()
        self._settle(lambda p: True)

    def _settle(self, ready: Callable[[_Pending], bool]) -> None:
        if self._pending:
            self._quiesce()
        keep: List[_Pending] = []
        for p in self._pending:
            # One stream, so copies land in order; settle strictly in order too.
            if keep or not ready(p):
                keep.append(p)
                continue
            st = self.requests.get(p.rid)
            if st is None:
                continue  # released meanwhile; its pages were freed with it
            self.store.write_layers(p.rid, p.page_ids, p.k, p.v)
            n = p.slots.numel()
            del st.recent_slots[:n]
            st.in_flight -= n
            kept = min(n, max(0, st.owned_until - st.host_end))  # the server's cache owns these slots
            st.host_end += n
            if kept < n:
                self.free_slots(p.slots[kept:])
            self._evicted += len(p.page_ids)
        self._pending = keep

    def _quiesce(self) -> None:
        for finish in self.host_readers:
            finish()

    def drain(self) -> None:
        """Block until every in-flight copy has settled."""
        self._settle_all()

    # --- queries ------------------------------------------------------------

    def device_slots(self, rid: Hashable) -> array:
        """The request's device slots (sinks, then the recent window) as an int64 array."""
        st = self.requests[rid]
        return st.sink_slots + st.recent_slots

    def host_tokens(self, rid: Hashable) -> int:
        """Tokens attendable from the host store for this request."""
        if not self.offload or rid not in self.store:
            return 0
        table = self.store.table(rid)
        return max(0, self.requests[rid].host_end - table.first_pos - table.hole_tokens(self.config.window.page_tokens))

    def stats(self) -> TierStats:
        dev = sum(len(s.sink_slots) + len(s.recent_slots) for s in self.requests.values())
        host = sum(self.host_tokens(r) for r in self.requests)
        return TierStats(dev, host, self._d2h, self._h2d, self._evicted)

    def count_h2d(self, nbytes: int) -> None:
        self._h2d += nbytes


LayerBuffers = Union[torch.Tensor, Sequence[torch.Tensor]]


class PrefillPlan(NamedTuple):
    rid: Hashable
    sinks: int
    host_tokens: int
    page_ids: List[int]
    slots: torch.Tensor


def _to_pages(x: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """[n, Hkv, D] with n a page multiple -> [n/T, Hkv, T, D] contiguous on the CPU."""
    n, h, d = x.shape
    return x.view(n // page_tokens, page_tokens, h, d).transpose(1, 2).contiguous().cpu()
