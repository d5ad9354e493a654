"""GPU-side selection, host values (HCAttention): compressed keys on the device choose each
query head's host tokens; the CPU engine returns softmax·V over the host store's values.

Per layer (`submit`, before the window's kernels are queued):
1. approximate logits of every host token of the batch from the compressed keys
   (`key_index`: scalar low-bit keys, or grouped VQ codes with a lookup table per group);
2. per query head, the smallest set reaching the policy's mass threshold of the
   approximate softmax (capped), or the top tokens up to the budget;
3. only the selected indices and their weights go to the host, where (`collect`, while
   the GPU runs the window) the engine sums the weighted values of those tokens.

With `logits: approximate` (the paper) the host part's LSE is that of the selected tokens'
approximate logits and its weights their softmax within the set; with `logits: exact` the
engine recomputes the selected tokens' logits from the host store's keys
(`kvt_attend_indices`), so only the choice of tokens is approximate. With budget `all`
every host token is attended by the engine with exact logits (the reference: equals dense).

The device holds the compressed keys of every page of the host store (`KeyIndex.nbytes`);
the CPU reads only the selected tokens' values, so its bytes per step follow the budget,
not the context.
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch

from ..key_index import KeyIndex, ScalarKeys, VqKeys, load_codebooks, select_mass, union_per_kv
from ..merge import AttnPart
from .base import HostBatch, HostStrategy, StrategyContext, register_strategy


class GpuSelectUnavailable(ValueError):
    """A setting of the policy that this strategy does not run."""


def make_index(ctx: StrategyContext) -> KeyIndex:
    knobs = ctx.policy.config.hcattention
    store = ctx.tier.store
    if knobs.key_bits is not None:
        return ScalarKeys(ctx.shape, store.n_pages, store.page_tokens, ctx.device, bits=knobs.key_bits)
    book = knobs.codebook
    groups = book.groups or max(1, ctx.shape.head_dim // 4)
    index = VqKeys(ctx.shape, store.n_pages, store.page_tokens, ctx.device, groups=groups, entries=book.entries,
                   train_tokens=book.train_tokens)
    if book.path:
        books = load_codebooks(book.path, ctx.shape, groups, book.entries)
        for layer in range(ctx.shape.n_layers):
            index.set_codebooks(layer, books[layer])
    return index


class LowAttention:
    """Dynamic eviction (`hcattention.eviction.rule: low_attention`): pages whose approximate
    attention stays low leave the host store, so capacity, not context length, bounds memory.

    Each step, every selected token's share of its query head's approximate softmax over the
    host part is added to its page (averaged over layers and query heads); at the next plan
    the page's score becomes decay * score + (1 - decay) * that step's share. A request past
    `capacity_tokens` host tokens drops its lowest-scored pages down to the cap. A page may
    go only once a step has scored it (a prompt's pages are all kept through its first
    decode step), and the newest window's worth of host pages never goes. Under
    `host_store.on_full: evict` the store drops pages in the same order.
    """

    def __init__(self, ctx: StrategyContext, knobs):
        tier, store = ctx.tier, ctx.tier.store
        self.tier, self.store, self.T = tier, store, store.page_tokens
        self.decay, self.capacity = knobs.decay, knobs.capacity_tokens
        self.recent_pages = -(-tier.config.window.window_tokens // self.T)
        self.norm = 1.0 / (ctx.shape.n_layers * ctx.shape.num_q_heads)
        self.score = torch.zeros(store.n_pages, device=ctx.device)  # by page id
        self.step = torch.zeros_like(self.score)
        self.born = [0] * store.n_pages  # by page id: the scored steps there were when it was stored
        self.scored_steps = 0
        self._scored = False  # add() ran since the last fold
        self.dropped = 0  # pages this rule dropped
        store.victim_order = self.order
        tier.key_listeners.append(self._new_pages)

    def _new_pages(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        if layer == 0:  # a page id given to new tokens starts without history
            ids = page_ids.to(self.score.device)
            self.score[ids] = 0.0
            self.step[ids] = 0.0
            for p in page_ids.tolist():
                self.born[p] = self.scored_steps

    def add(self, table: torch.Tensor, idx: torch.Tensor, mass: torch.Tensor) -> None:
        """table [B, P] page ids; idx [B, Hq, m] host-token indices (-1: none); mass [B, Hq, m]."""
        b = idx.shape[0]
        keep = idx >= 0
        pos = (idx.clamp(min=0) // self.T).long().reshape(b, -1)
        pages = table.long().gather(1, pos).view(idx.shape)
        self.step.index_add_(0, pages[keep], mass[keep].float() * self.norm)
        self._scored = True

    def order(self, rid) -> List[int]:
        """Indices of the request's settled pages it may drop, lowest score first (the newest kept)."""
        table = self.store.table(rid)
        settled = -(-self.tier.host_tokens(rid) // self.T) if rid in self.tier.requests else len(table.pages)
        n = max(0, settled - self.recent_pages)
        ids = [i for i in range(n) if self.born[table.pages[i]] < self.scored_steps]  # scored at least once
        if not ids:
            return []
        pages = torch.as_tensor([table.pages[i] for i in ids], device=self.score.device)
        return [ids[j] for j in torch.argsort(self.score[pages].cpu(), stable=True).tolist()]

    def enforce(self, rids) -> None:
        """Fold the last step's shares into the scores; bring every request to its capacity."""
        if self._scored:
            self.score.mul_(self.decay).add_(self.step, alpha=1.0 - self.decay)
            self.step.zero_()
            self.scored_steps += 1
            self._scored = False
        for rid in rids:
            over = self.tier.host_tokens(rid) - self.capacity
            if over > 0:
                victims = self.order(rid)[: -(-over // self.T)]
                self.store.drop_pages(rid, victims)
                self.dropped += len(victims)


@register_strategy
class GpuSelect(HostStrategy):
    name = "gpu_select"
    needs_engine = True

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        knobs = ctx.policy.config.hcattention
        self.index: Optional[KeyIndex] = None
        self.eviction: Optional[LowAttention] = None
        if ctx.policy.offloads and ctx.tier.store is not None:
            self.index = make_index(ctx)
            ctx.tier.key_listeners.append(self.index.store)
            if knobs.eviction.rule == "low_attention":
                self.eviction = LowAttention(ctx, knobs.eviction)
        self.exact = knobs.logits == "exact"
        # exact logits over one set per kv-head: the union of its query heads' selections
        self.kv_sets = self.exact and knobs.exact_sets == "kv_head"
        self.group = ctx.shape.num_q_heads // ctx.shape.kv_heads
        self._event: Optional[torch.cuda.Event] = None  # this layer's: the host's inputs have landed
        self._ready: Optional[torch.cuda.Event] = None  # reused every layer
        self.last_idx: Optional[torch.Tensor] = None  # the last layer's selection (for detail)
        self._buffers = {}  # host buffers by name, kept across plans of one shape

    @property
    def device_bytes(self) -> int:
        return 0 if self.index is None else self.index.nbytes

    # --- plan ---------------------------------------------------------------

    def prepare(self, rids) -> None:
        if self.eviction is not None:
            self.eviction.enforce(rids)

    def plan(self, batch: HostBatch) -> None:
        super().plan(batch)
        ctx, policy = self.ctx, self.ctx.policy
        b, hq, d = len(batch.rids), ctx.shape.num_q_heads, ctx.shape.head_dim
        self.all = policy.attends_everything
        caps = policy.selection_caps(batch.host_tokens, batch.context_tokens)
        self.m = min(max(caps), max(batch.host_tokens))
        self.caps = torch.tensor(caps, dtype=torch.int64, device=ctx.device)
        # [B, 1, m]: selection slots past each request's cap, once per step rather than at every layer
        self._beyond = torch.arange(self.m, device=ctx.device) >= self.caps[:, None, None]
        off = batch.page_offsets.tolist()
        table = torch.zeros(b, max(max(off[i + 1] - off[i] for i in range(b)), 1), dtype=torch.int32)
        for i in range(b):
            table[i, : off[i + 1] - off[i]] = batch.page_table[off[i]: off[i + 1]]
        self.table = table.to(ctx.device)  # [B, pages] padded: the scoring kernels' page tables
        self.n_tokens = batch.n_tokens.to(ctx.device)
        self.q_host = self._host_buffer("q", (b, hq, d))
        self.out_host = self._host_buffer("out", (b, hq, d))
        self.lse_host = self._host_buffer("lse", (b, hq))
        self.idx_host = self._host_buffer("idx", (b, ctx.shape.kv_heads, self.group * self.m) if self.kv_sets
                                          else (b, hq, self.m), torch.int32)
        self.p_host = self._host_buffer("p", (b, hq, self.m))
        # The engine serves the batch's page tables: weighted values (or, for budget all, the
        # exact attention over every host token).
        ctx.engine.plan(ctx.tier.store.view, batch.page_table, batch.page_offsets, batch.n_tokens, hq,
                        mode="all" if self.all else "topk", group_reduce="max",
                        budget_tokens=torch.ones(b, ctx.shape.kv_heads, dtype=torch.int32),
                        sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)

    def _host_buffer(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        """A host buffer of this shape (page-locked on CUDA), reused from the last plan when it has the shape."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=self.ctx.device.type == "cuda")
        return buf

    # --- run ----------------------------------------------------------------

    def select(self, q: torch.Tensor, layer: int, *, record: bool = True):
        """(idx [B, Hq, m] int32 -1 padded, approximate logits [B, Hq, m], -inf where not kept) on the device.

        record: count the kept tokens' attention toward eviction (off for a look that is not a step)."""
        ctx = self.ctx
        scores = self.index.scores(layer, q, self.table, self.n_tokens, sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap,
                                   counts=self.batch.host_tokens)  # the plan's: no device read per layer
        idx, logits, lse_all = select_mass(scores, ctx.policy.mass_threshold, self.m, with_lse=True)
        beyond = self._beyond
        if beyond.shape[-1] != idx.shape[-1]:  # fewer candidates than the plan's m (not when the tables are whole)
            beyond = torch.arange(idx.shape[-1], device=idx.device) >= self.caps[:, None, None]
        idx = idx.masked_fill(beyond, -1)
        logits = logits.masked_fill(beyond, float("-inf"))
        if record and self.eviction is not None:  # each kept token's share of the whole host softmax
            self.eviction.add(self.table, idx, torch.exp(logits - lse_all[..., None]).nan_to_num(0.0))
        return idx, logits

    def submit(self, q: torch.Tensor, layer: int) -> None:
        if self.all or self.exact:
            self.q_host.copy_(q, non_blocking=True)
        if self.exact and not self.all:
            self.last_idx = self.select(q, layer)[0]
            if self.kv_sets:
                self.last_idx = union_per_kv(self.last_idx, self.group)  # [B, Hkv, G * m]
            self.idx_host.copy_(self.last_idx, non_blocking=True)
        elif not self.all:
            idx, logits = self.select(q, layer)
            self.last_idx = idx
            lse = torch.logsumexp(logits, dim=-1)  # -inf for a row that kept nothing
            p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
            self._lse_dev = lse
            self.idx_host.copy_(idx, non_blocking=True)
            self.p_host.copy_(p, non_blocking=True)
        if q.device.type == "cuda":
            if self._ready is None:
                self._ready = torch.cuda.Event()
            self._ready.record()
            self._event = self._ready

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        if self._event is not None:
            self._event.synchronize()  # the indices (or q) have landed; the window runs on
            self._event = None
        c0 = time.perf_counter()
        engine, view = self.ctx.engine, self.ctx.tier.store.view
        if self.all or self.exact:
            if self.all:
                engine.run(layer, self.q_host, out=self.out_host, lse=self.lse_host)
            elif self.kv_sets:  # the union of each kv-head's selections, its rows read once for the group
                engine.attend_kv_indices(view, layer, self.q_host, self.idx_host, out=self.out_host, lse=self.lse_host)
            else:  # the selected tokens' logits recomputed from the host store's keys
                engine.attend_indices(view, layer, self.q_host, self.idx_host, out=self.out_host, lse=self.lse_host)
            self._cpu_s += time.perf_counter() - c0
            return AttnPart(self.out_host.to(q.device, non_blocking=True), self.lse_host.to(q.device, non_blocking=True))
        engine.weighted_values(view, layer, self.idx_host, self.p_host, out=self.out_host)
        self._cpu_s += time.perf_counter() - c0
        return AttnPart(self.out_host.to(q.device, non_blocking=True), self._lse_dev)

    def read_bytes(self, layer: int, selection: Optional[torch.Tensor]) -> Optional[float]:
        """The selected tokens' values, and their keys with exact logits (a row per query head that
        selected it, or once per kv-head with `exact_sets: kv_head`); every host token with budget all."""
        tb = self.token_bytes()
        if self.all or selection is None:
            return float(sum(self.batch.host_tokens)) * self.ctx.shape.kv_heads * (tb.key + tb.value)
        sel = selection.cpu()
        # one set per kv-head reads each row once for the group; per query head, each head reads its own
        rows = self.distinct_selected(sel) if self.kv_sets else int((sel >= 0).sum())
        return rows * (tb.value + (tb.key if self.exact else 0.0))

    def detail(self, q: torch.Tensor, layer: int):
        if self.all:
            res = self.ctx.engine.run(layer, q.float().cpu(), return_selection=True)
            return AttnPart(res.out.to(q.device), res.lse.to(q.device)), res.sel_index
        self.submit(q, layer)
        part = self.collect(q, layer)
        if self.kv_sets:  # every query head attended its kv-head's set
            return part, self.last_idx.repeat_interleave(self.group, dim=1)
        return part, self.last_idx
