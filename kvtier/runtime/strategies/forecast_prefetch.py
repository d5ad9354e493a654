"""Forecast prefetch (SparDA-style): each layer attends on the device over a cache of host blocks
chosen a step ahead; what the cache misses is corrected on the CPU or fetched late.

Selection is block-level: the device keeps every host page's mean key per (layer,
kv-head) (`PageMeans`); a block of `block_tokens` tokens scores the best of its pages'
q·mean (max over the kv-head's query heads), and each (request, kv-head) selects its
top `budget / block_tokens` blocks.

The device keeps, per (request, layer, kv-head), exactly that many block slots, reused
from step to step. With the `reuse` forecast the blocks a layer attends at step t are
the ones its real query selected at step t-1: after a layer's selection, the blocks it
selected that are not resident are fetched into the slots of resident ones it did not
select (a diff: resident blocks stay), for the next step. So the fetch of step t-1 has a
whole step to land (on CUDA it runs on a side stream; the layer's next use waits for it).

With the `next_query` forecast (InfiniGen's, SparDA's training-free one) the caller, which
sees the model's hidden states, hands layer l+1's forecast query while layer l runs
(`forecast`: layer l+1's input norm, query projection and RoPE over layer l's input
hidden state); its blocks are selected as the real query's would be and fetched by the
same diff at once, so the fetch has one layer to land. A layer that gets no forecast at
a step (layer 0 always, having no layer before it; any layer the caller gave none) falls
back to `reuse`: it attends what its slots hold, and its real selection is fetched for
the next step. Only a tier whose caller promised forecasts (`StrategyContext.forecasts`)
runs `next_query`; any other is refused when built.

At step t a layer attends the resident blocks (dequantized from the host store's bytes
when fetched) and, by `sparda.correction`, the blocks its real query selected but the
cache misses: `cpu` attends them exactly on the CPU engine over the host store and
merges by LSE (the sets are disjoint), `fetch` fetches them now and attends them with
the rest, `none` (SparDA's own) leaves them out.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Hashable, List, NamedTuple, Optional, Tuple

import torch

from ...store import CapacityError
from ..._native import StoreBuffers, dequant_raw_keys, dequant_raw_values
from ..merge import AttnPart, merge
from .base import HostBatch, HostStrategy, StrategyContext, register_strategy


class PageMeans:
    """Every host page's mean key per (layer, kv-head), on the device, by page id."""

    def __init__(self, ctx: StrategyContext):
        s = ctx.shape
        self.mean = torch.zeros(s.n_layers, ctx.tier.store.n_pages, s.kv_heads, s.head_dim, device=ctx.device)

    def store(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        """k [pages, Hkv, T, D]."""
        self.mean[layer, page_ids.to(self.mean.device, torch.long)] = k.to(self.mean.device, torch.float32).mean(2)

    @property
    def nbytes(self) -> int:
        return self.mean.numel() * self.mean.element_size()


class _Cache(NamedTuple):
    """One request's block slots: k, v [L, Hkv, nb, block_tokens, D]; block [L, Hkv, nb] (the table
    block each slot holds, -1 none); filled [L, Hkv, nb] (its tokens when fetched)."""

    k: torch.Tensor
    v: torch.Tensor
    block: torch.Tensor
    filled: torch.Tensor
    first_page: List[int]  # the table's first page when the slots were filled (a dropped page resets them)


class StepStats(NamedTuple):
    hits: int  # blocks the real query selected that were resident when the layer attended
    misses: int  # selected blocks that were not
    fetched: int  # blocks copied host -> device
    wasted: int  # resident blocks the real query did not select
    fetched_bytes: int


class FetchPlan(NamedTuple):
    """What one (request, layer)'s block slots need for a wanted set (`plan_fetch`), on the host."""

    jobs: torch.Tensor  # [J, 4] long: (kv-head, slot, block, tokens) of each block to copy in
    hits: int
    misses: int
    wasted: int


def _match(have: torch.Tensor, want: torch.Tensor):
    """have [H, S] slot blocks (-1 none), want [H, W] blocks (-1 padding): (match [H, W, S], each wanted
    block's slot where resident [H, W], resident [H, W])."""
    match = (have[:, None, :] == want[:, :, None]) & (want >= 0)[:, :, None]
    return match, match.int().argmax(-1), match.any(-1)


def plan_fetch(have: torch.Tensor, filled: torch.Tensor, want: torch.Tensor, n: int, bt: int) -> FetchPlan:
    """The diff that makes slots holding `have` [H, S] (tokens `filled`) hold `want` [H, W] whole
    (blocks of bt tokens of a request with n host tokens; -1: no block). A resident block stays; one
    held in part is completed in its slot; a missing one takes the first free slot (one whose block is
    not wanted), in the order `want` lists them. Computed where the tensors are, read back at once
    (one device sync), in the order of the per-head reference loop (`tests/test_sparda.py`)."""
    match, slot_of, resident = _match(have, want)
    valid = want >= 0
    size = (n - want.clamp(min=0) * bt).clamp(max=bt)
    hit = resident & (filled.gather(1, slot_of) >= size)
    miss = valid & ~hit
    spare = ~match.any(1)  # [H, S]: slots whose block is not wanted (empty ones too)
    rank = ((valid & ~resident).long().cumsum(1) - 1).clamp(min=0)
    free = torch.argsort((~spare).int(), dim=1, stable=True)  # spare slots first, in slot order
    slot = torch.where(resident, slot_of, free.gather(1, rank))
    heads = torch.arange(want.shape[0], device=want.device)[:, None].expand_as(want)
    jobs = torch.stack([heads, slot, want, size], dim=-1)[miss]
    counts = torch.stack([hit.sum(), miss.sum(), ((have >= 0) & spare).sum()])
    out = torch.cat([counts, jobs.flatten()]).cpu()
    return FetchPlan(out[3:].view(-1, 4), int(out[0]), int(out[1]), int(out[2]))


def missed_tokens(have: torch.Tensor, filled: torch.Tensor, chosen: torch.Tensor, n: int, bt: int) -> torch.Tensor:
    """Token indices [H, m] int32 on the host (-1 padded) of the chosen blocks' tokens that slots holding
    `have` (tokens `filled`) lack: a block held in part misses only its tokens past what its slot holds.
    Blocks in `chosen` order, tokens ascending within a block; one device sync."""
    _, slot_of, resident = _match(have, chosen)
    held = torch.where(resident, filled.gather(1, slot_of), torch.zeros_like(slot_of))
    j = torch.arange(bt, device=chosen.device)
    t = chosen.clamp(min=0)[..., None] * bt + j  # [H, W, bt]
    ok = ((chosen >= 0)[..., None] & (j >= held[..., None]) & (t < n)).flatten(1)
    first = torch.argsort((~ok).int(), dim=1, stable=True)  # a head's missed tokens first, in order
    packed = torch.where(ok, t.flatten(1), -1).gather(1, first).cpu()
    m = int((packed >= 0).sum(1).max()) if packed.numel() else 0
    return packed[:, :m].to(torch.int32).contiguous()


@register_strategy
class ForecastPrefetch(HostStrategy):
    name = "forecast_prefetch"
    needs_engine = True  # the CPU correction
    copies_pages_to_device = True

    @classmethod
    def refusal(cls, policy, *, forecasts: bool) -> Optional[str]:
        knobs = policy.config.sparda
        source = knobs.forecast.source
        if source == "trained":
            return ("sparda.forecast.source: trained (forecast projections from weights_path) is not built yet; "
                    "expected next_query or reuse")
        if source == "next_query" and not forecasts:
            return ("sparda.forecast.source: next_query needs the model's hidden states: expected a caller that "
                    "hands each layer's forecast query before the layer runs (kvtier eval); this one does not (the "
                    "sglang backend, the demo and the benches see attention inputs only); expected reuse here")
        if knobs.prefetch_depth != 1:
            return f"sparda.prefetch_depth: expected 1 (one step ahead), found {knobs.prefetch_depth} (not built yet)"
        return None

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        knobs = ctx.policy.config.sparda
        self.knobs = knobs
        self.bt = knobs.block_tokens
        self.means: Optional[PageMeans] = None
        if ctx.policy.offloads and ctx.tier.store is not None:
            self.means = PageMeans(ctx)
            ctx.tier.key_listeners.append(self.means.store)
        self.caches: Dict[Hashable, _Cache] = {}
        self.stats = StepStats(0, 0, 0, 0, 0)
        self.totals = StepStats(0, 0, 0, 0, 0)  # since built (`report`)
        self.layer_hits: Dict[int, Tuple[int, int]] = {}  # layer -> (hits, misses) since take_stats
        self._forecast_now: set = set()  # layers forecast in this plan, before their submit
        self._submitted: set = set()  # layers submitted in this plan
        self.forecast_layers = [0, 0]  # layer-steps attended after a forecast, and fallen back to reuse
        self._part: Optional[AttnPart] = None
        self._fetch_stream = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None
        self._fetched: Dict[int, torch.cuda.Event] = {}  # layer -> its last fetch's event (CUDA)
        self._record: Optional[dict] = None  # detail() records what submit attends

    @property
    def device_bytes(self) -> int:
        caches = sum(c.k.numel() * c.k.element_size() * 2 for c in self.caches.values())
        return caches + (0 if self.means is None else self.means.nbytes)

    # --- plan ---------------------------------------------------------------

    @property
    def takes_forecasts(self) -> bool:
        return self.knobs.forecast.source == "next_query"

    def prepare(self, rids) -> None:
        live = self.ctx.tier.requests
        for rid in [r for r in self.caches if r not in live]:  # finished requests give their slots back
            del self.caches[rid]

    def plan(self, batch: HostBatch) -> None:
        super().plan(batch)
        self._forecast_now.clear()
        self._submitted.clear()
        ctx, s = self.ctx, self.ctx.shape
        self.nb = ctx.policy.block_budget(batch.host_tokens, batch.context_tokens)
        need = len(batch.rids) * s.n_layers * s.kv_heads * self.nb
        cap = self.knobs.device_cache_blocks
        if cap is not None and need > cap:
            raise CapacityError("the device block cache (sparda.device_cache_blocks)", need, cap,
                                self.bt * s.kv_heads * s.head_dim * 4)
        off = batch.page_offsets.tolist()
        self.tables = [batch.page_table[off[i]: off[i + 1]].to(torch.long) for i in range(len(batch.rids))]
        # the pages' ids on the device once per plan, not per layer
        self.dev_tables = [t.to(ctx.device) for t in self.tables]
        dtype = ctx.tier.k_pool[0].dtype
        for i, rid in enumerate(batch.rids):
            c = self.caches.get(rid)
            first = self.tables[i][:1].tolist()
            if c is None or c.k.shape[2] != self.nb or (c.first_page and first != c.first_page):
                shape = (s.n_layers, s.kv_heads, self.nb, self.bt, s.head_dim)
                self.caches[rid] = _Cache(torch.zeros(shape, dtype=dtype, device=ctx.device),
                                          torch.zeros(shape, dtype=dtype, device=ctx.device),
                                          torch.full(shape[:3], -1, dtype=torch.long, device=ctx.device),
                                          torch.zeros(shape[:3], dtype=torch.long, device=ctx.device), first)
        self.q_host = torch.empty(len(batch.rids), s.num_q_heads, s.head_dim, pin_memory=ctx.device.type == "cuda")
        if self.knobs.correction == "cpu":
            ctx.engine.plan(ctx.tier.store.view, batch.page_table, batch.page_offsets, batch.n_tokens, s.num_q_heads,
                            mode="topk", budget_tokens=torch.ones(len(batch.rids), s.kv_heads, dtype=torch.int32),
                            sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)

    # --- selection -----------------------------------------------------------

    def select(self, q: torch.Tensor, layer: int) -> List[torch.Tensor]:
        """Per request: the top blocks [Hkv, nb] of each kv-head (-1 past the request's blocks)."""
        s, ppb = self.ctx.shape, self.bt // self.ctx.tier.config.window.page_tokens
        g = s.num_q_heads // s.kv_heads
        out = []
        for i, pages in enumerate(self.tables):
            n_pages = -(-self.batch.host_tokens[i] // self.ctx.tier.config.window.page_tokens)
            means = self.means.mean[layer, self.dev_tables[i][:n_pages]]  # [P, Hkv, D]
            qg = q[i].float().view(s.kv_heads, g, s.head_dim)
            page_score = torch.einsum("hgd,phd->hgp", qg, means).amax(1)  # [Hkv, P]
            n_blocks = -(-n_pages // ppb)
            pad = n_blocks * ppb - n_pages
            page_score = torch.nn.functional.pad(page_score, (0, pad), value=float("-inf"))
            block_score = page_score.view(s.kv_heads, n_blocks, ppb).amax(-1)
            k = min(self.nb, n_blocks)
            top = torch.topk(block_score, k, dim=-1).indices
            out.append(torch.nn.functional.pad(top, (0, self.nb - k), value=-1))
        return out

    # --- fetch ---------------------------------------------------------------

    def _fetch(self, rid, i: int, layer: int, want: torch.Tensor, *, copy: bool = True) -> StepStats:
        """Make the cache of request i hold `want` [Hkv, nb] blocks of layer whole: resident blocks stay,
        a block held in part is completed in its slot, the others go to slots of blocks not wanted.
        copy=False only counts: want's hits and misses against the slots as they are.

        The missing blocks of every kv-head move together: one gather on the host of each block's pages
        for its head (the store's own format), one copy to the device, one dequantization there, one
        scatter into the slots."""
        c, T, n = self.caches[rid], self.ctx.tier.config.window.page_tokens, self.batch.host_tokens[i]
        ppb = self.bt // T
        plan = plan_fetch(c.block[layer], c.filled[layer], want.to(c.block.device), n, self.bt)
        hits, misses, wasted, jobs = plan.hits, plan.misses, plan.wasted, plan.jobs
        if not copy or not len(jobs):
            self.ctx.tier.count_h2d(0)
            return StepStats(hits, misses, 0, wasted, 0)
        heads, slots, blocks, sizes = jobs.unbind(1)
        table = self.tables[i]
        # each block's pages (a block past the table's end repeats its last page: masked by `filled`)
        pos = (blocks[:, None] * ppb + torch.arange(ppb)[None, :]).clamp(max=table.numel() - 1)
        view = self.ctx.tier.store.view
        raw = view.raw_pages(layer, table[pos].reshape(-1), heads.repeat_interleave(ppb))  # [J * ppb, 1, T, ...]
        nbytes = sum(t.numel() * t.element_size() for t in raw if t is not None)
        dev = self.ctx.device
        if dev.type == "cuda":
            raw = StoreBuffers(*(None if t is None else t.pin_memory().to(dev, non_blocking=True) for t in raw))
        d = c.k.shape[-1]
        k = dequant_raw_keys(raw, view.key_format, view.key_group).reshape(len(jobs), self.bt, d)
        v = dequant_raw_values(raw, view.value_format).reshape(len(jobs), self.bt, d)
        heads, slots = heads.to(dev), slots.to(dev)
        c.k[layer][heads, slots] = k.to(c.k.dtype)
        c.v[layer][heads, slots] = v.to(c.v.dtype)
        c.block[layer][heads, slots] = blocks.to(dev)
        c.filled[layer][heads, slots] = sizes.to(dev)
        self.ctx.tier.count_h2d(nbytes if dev.type == "cuda" else 0)
        return StepStats(hits, misses, len(jobs), wasted, nbytes)

    # --- run ----------------------------------------------------------------

    def forecast(self, q: torch.Tensor, layer: int) -> None:
        """next_query: layer's blocks chosen from its forecast query q [B, Hq, D] and fetched now (on
        CUDA on the side stream, which layer's submit waits for). The fetch counts blocks and bytes;
        hits and misses are counted when the real query comes."""
        if layer in self._submitted:
            raise ValueError(f"forecast: layer {layer} already ran in this plan; expected its forecast before "
                             "its submit")
        if layer in self._forecast_now:
            raise ValueError(f"forecast: layer {layer} was forecast already in this plan")
        self._forecast_now.add(layer)
        self._prefetch(self.select(q, layer), layer, q.device, count_hits=False)

    def _prefetch(self, chosen: List[torch.Tensor], layer: int, device: torch.device, *, count_hits: bool) -> None:
        """Fetch each request's `chosen` blocks of layer into its slots (the diff), on CUDA on the side
        stream after what the current stream has queued; layer's next submit waits for it."""
        stream = self._fetch_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, rid in enumerate(self.batch.rids):
                st = self._fetch(rid, i, layer, chosen[i])
                self._add(st if count_hits else st._replace(hits=0, misses=0, wasted=0), layer)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                self._fetched[layer] = event

    def submit(self, q: torch.Tensor, layer: int) -> None:
        if layer in self._fetched:  # the slots this layer's last fetch filled have landed
            torch.cuda.current_stream(q.device).wait_event(self._fetched.pop(layer))
        self._submitted.add(layer)
        forecast = layer in self._forecast_now  # else reuse: the slots hold the real selection of before
        if self.takes_forecasts:
            self.forecast_layers[0 if forecast else 1] += 1
        chosen = self.select(q, layer)
        correction = self.knobs.correction
        missed = []
        for i, rid in enumerate(self.batch.rids):
            if correction == "fetch":
                self._add(self._fetch(rid, i, layer, chosen[i]), layer)
            elif forecast:  # the forecast's fetch counted no hits: count them against the real query
                self._add(self._fetch(rid, i, layer, chosen[i], copy=False), layer)
            missed.append(self._missed(rid, layer, chosen[i], self.batch.host_tokens[i]))
        if self._record is not None:  # detail(): what is attended, as the cache holds it now
            self._record.update(chosen=chosen, missed=missed, resident=[
                (self.caches[rid].block[layer].cpu().clone(), self.caches[rid].filled[layer].cpu().clone())
                for rid in self.batch.rids])
        self._part = self._attend_cached(q, layer)
        self._cpu_part = None
        if correction == "cpu" and any(m.numel() for m in missed):
            self._cpu_part = self._attend_missed(q, layer, missed)
        if correction != "fetch" and not forecast:  # reuse: the real selection is the next step's resident set
            self._prefetch(chosen, layer, q.device, count_hits=True)

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        part = self._part
        if self._cpu_part is not None:
            part = merge(part, self._cpu_part)
        return AttnPart(part.out.float(), part.lse.float())

    def _missed(self, rid, layer: int, chosen: torch.Tensor, n: int) -> torch.Tensor:
        """Token indices [Hkv, m] (-1 padded) of the chosen blocks' tokens the cache does not hold (a
        block held in part misses only its tokens past what its slot holds)."""
        c = self.caches[rid]
        return missed_tokens(c.block[layer], c.filled[layer], chosen.to(c.block.device), n, self.bt)

    def _attend_cached(self, q: torch.Tensor, layer: int) -> AttnPart:
        """Attention of each request's query heads over its resident blocks of layer."""
        s = self.ctx.shape
        g = s.num_q_heads // s.kv_heads
        outs, lses = [], []
        for i, rid in enumerate(self.batch.rids):
            c = self.caches[rid]
            k = c.k[layer].reshape(s.kv_heads, -1, s.head_dim).float()  # [Hkv, nb * bt, D]
            v = c.v[layer].reshape(s.kv_heads, -1, s.head_dim).float()
            valid = (torch.arange(self.bt, device=k.device) < c.filled[layer][..., None]) & (c.block[layer] >= 0)[..., None]
            x = torch.einsum("hgd,hnd->hgn", q[i].float().view(s.kv_heads, g, s.head_dim), k) * self.ctx.sm_scale
            if self.ctx.soft_cap > 0:
                x = self.ctx.soft_cap * torch.tanh(x / self.ctx.soft_cap)
            x = x.masked_fill(~valid.reshape(s.kv_heads, 1, -1), float("-inf"))
            lse = torch.logsumexp(x, dim=-1)
            p = torch.exp(x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
            outs.append(torch.einsum("hgn,hnd->hgd", p, v).reshape(s.num_q_heads, s.head_dim))
            lses.append(lse.reshape(s.num_q_heads))
        return AttnPart(torch.stack(outs), torch.stack(lses))

    def _attend_missed(self, q: torch.Tensor, layer: int, missed: List[torch.Tensor]) -> AttnPart:
        """The missed blocks' tokens attended exactly by the CPU engine (each query head its kv-head's)."""
        s, c0 = self.ctx.shape, time.perf_counter()
        g = s.num_q_heads // s.kv_heads
        m = max(t.shape[1] for t in missed)
        idx = torch.full((len(missed), s.num_q_heads, max(m, 1)), -1, dtype=torch.int32)
        for i, t in enumerate(missed):
            idx[i, :, : t.shape[1]] = t.repeat_interleave(g, dim=0)
        self.q_host.copy_(q)
        out, lse = self.ctx.engine.attend_indices(self.ctx.tier.store.view, layer, self.q_host, idx)
        self._cpu_s += time.perf_counter() - c0
        return AttnPart(out.to(q.device), lse.to(q.device))

    def detail(self, q: torch.Tensor, layer: int):
        """The host part, and as its selection the host tokens attended: the resident blocks' tokens as
        the cache held them when it attended, and with the CPU correction the chosen blocks' others."""
        self._record, before = {}, self.stats
        try:
            self.submit(q, layer)
            part = self.collect(q, layer)
            rec = self._record
        finally:
            self._record = None
        s = self.ctx.shape
        g = s.num_q_heads // s.kv_heads
        rows = []
        for i in range(len(self.batch.rids)):
            block, filled = rec["resident"][i]
            for h in range(s.kv_heads):
                toks = {b * self.bt + t for b, f in zip(block[h].tolist(), filled[h].tolist()) if b >= 0
                        for t in range(f)}
                if self.knobs.correction == "cpu":
                    toks.update(t for t in rec["missed"][i][h].tolist() if t >= 0)
                rows.append(sorted(toks))
        cap = max(1, max(len(r) for r in rows))
        sel = torch.full((len(rows), cap), -1, dtype=torch.int32)
        for j, r in enumerate(rows):
            sel[j, : len(r)] = torch.tensor(r, dtype=torch.int32)
        sel = sel.view(len(self.batch.rids), s.kv_heads, 1, cap).expand(-1, -1, g, -1).reshape(
            len(self.batch.rids), s.num_q_heads, cap)
        step = StepStats(*(a - b for a, b in zip(self.stats, before)))
        missed = sum(int((m >= 0).sum()) for m in rec["missed"]) if self.knobs.correction == "cpu" else 0
        tb = self.token_bytes()
        self._detail_read = step.fetched_bytes + missed * (tb.key + tb.value)
        return part, sel

    def read_bytes(self, layer: int, selection) -> Optional[float]:
        """The last detail()'s copies into the block cache and the CPU correction's keys and values."""
        return getattr(self, "_detail_read", None)

    def _add(self, st: StepStats, layer: int) -> None:
        self.stats = StepStats(*(a + b for a, b in zip(self.stats, st)))
        self.totals = StepStats(*(a + b for a, b in zip(self.totals, st)))
        hits, misses = self.layer_hits.get(layer, (0, 0))
        self.layer_hits[layer] = (hits + st.hits, misses + st.misses)

    def forecast_recall(self) -> Dict[int, float]:
        """Per layer since the last `take_stats`: the share of the blocks the real query selected
        that the forecast had made resident (hits over hits and misses)."""
        return {layer: h / (h + m) for layer, (h, m) in sorted(self.layer_hits.items()) if h + m}

    def report(self) -> Dict[str, object]:
        """Since built: the block counts (`StepStats`) and, with next_query, the layer-steps attended
        after a forecast and those that fell back to reuse."""
        out: Dict[str, object] = {"blocks": self.totals._asdict()}
        if self.takes_forecasts:
            out["forecast_layer_steps"] = {"forecast": self.forecast_layers[0], "reuse": self.forecast_layers[1]}
        return out

    def take_stats(self) -> StepStats:
        st, self.stats = self.stats, StepStats(0, 0, 0, 0, 0)
        self.layer_hits = {}
        return st
