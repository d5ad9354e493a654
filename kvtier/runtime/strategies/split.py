"""The split host strategy (Fluxion): per-head-class blocks, output-aware budgets, and a layer's
selected blocks shared by the CPU engine and the GPU.

Per request and layer (`submit`, before the window's kernels are queued):
1. **Head classes.** A kv-head not classified yet is measured once from this step's query over
   the request's whole context (`block_budget.head_stats`: the window's share of the softmax
   mass, the normalized entropy over the host tokens). With `predictor.source: prefill` the first
   decode step classifies it at once (its query is the row after the prompt's last); with
   `early_decode` the statistics are averaged over `calibration_steps` steps, during which the
   head attends with the class of the largest budget. Classes are kept per request, and counted
   per (layer, kv-head) for reports (`class_counts`).
2. **Blocks and budgets.** Each head's blocks (its class's block_tokens) are ranked by the
   upper bound of their keys' logits from the host store's min/max summaries; the policy gives
   each head a cap (`Fluxion.head_caps`), and within it the head keeps the shortest ranked
   prefix whose estimated output change is at most `output_epsilon` (`block_budget`), from the
   store's per-chunk key and value sums and the device window's exact part.
3. **Split.** The layer's kept blocks go, highest estimated mass share first, to the GPU
   (copied host -> device, dequantized and attended there) up to the point where both parts
   finish together at the rates measured at start (`split_schedule`); the rest to the CPU
   engine (`collect`, exact logits from the stored keys). The parts merge by LSE.

Without CUDA, or with `gpu_share: off`, every block goes to the CPU engine, which on the CPU
runs on a helper thread beside the window. Budget all attends every block (exact; the
conformance test holds it to dense).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Hashable, List, NamedTuple, Optional

import torch

from ..._native import HostStoreView
from ..block_budget import chunk_stats, choose_blocks, head_stats
from ..merge import AttnPart, merge
from ..split_schedule import Rates, cpu_indices, gpu_part, measure_rates, split_point, token_bytes
from ..window_attention import empty_part, plan_window, torch_window_attention
from .base import HostBatch, HostStrategy, StrategyContext, register_strategy


class SplitStats(NamedTuple):
    """Totals since the last `take_split_stats`, over layers and requests."""

    cpu_blocks: int
    gpu_blocks: int
    cpu_bytes: int  # stored bytes the CPU part read
    gpu_bytes: int  # stored bytes copied to the device
    kept_tokens: int  # host tokens attended, summed over (request, layer, kv-head)
    cap_tokens: int  # what the caps allowed
    heads: int  # (request, layer, kv-head) selections
    model_cpu_s: float  # the schedule's modelled times (bytes / measured rate), summed over layers
    model_gpu_s: float
    model_idle_s: float  # per layer |cpu - gpu| modelled: the side that waits


_ZERO = SplitStats(0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)


class ChunkMeta:
    """The host store's per-chunk key min/max and key/value sums where the selection runs: the
    store's own tensors on the CPU; on CUDA a device copy, refreshed at each plan for the pages of
    the batch written since (their ids come from the tier's key listeners)."""

    def __init__(self, view: HostStoreView, device: torch.device):
        self.view = view
        if device.type == "cuda":
            self.summary = torch.empty(view.summary.shape, dtype=view.summary.dtype, device=device)
            self.sums = torch.empty(view.chunk_sums.shape, dtype=view.chunk_sums.dtype, device=device)
            self.dirty: Optional[set] = set()
        else:
            self.summary, self.sums, self.dirty = view.summary, view.chunk_sums, None

    @property
    def nbytes(self) -> int:
        if self.dirty is None:
            return 0
        return self.summary.numel() * self.summary.element_size() + self.sums.numel() * self.sums.element_size()

    def touched(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        if self.dirty is not None and layer == 0:
            self.dirty.update(page_ids.tolist())

    def refresh(self, pages: List[int]) -> None:
        """Copy the settled pages among `pages` that changed since their last copy."""
        if self.dirty is None:
            return
        stale = sorted(self.dirty.intersection(pages))
        if stale:
            idx = torch.tensor(stale, dtype=torch.long)
            dev = idx.to(self.summary.device)
            self.summary[:, :, dev] = self.view.summary[:, :, idx].to(self.summary.device, non_blocking=True)
            self.sums[:, :, dev] = self.view.chunk_sums[:, :, idx].to(self.sums.device, non_blocking=True)
            self.dirty.difference_update(stale)

    def chunks(self, layer: int, pages: torch.Tensor):
        """(summary, sums) of the pages' chunks, each [Hkv, pages * chunks_per_page, 2, D]."""
        idx = pages.to(self.summary.device, torch.long)  # index_select: about 2x advanced indexing's speed on the CPU
        s, c = self.summary[layer].index_select(1, idx), self.sums[layer].index_select(1, idx)
        return s.flatten(1, 2), c.flatten(1, 2)


class _Heads:
    """One request's head classes ([L, Hkv], -1 until classified) and the statistics gathered so far."""

    def __init__(self, n_layers: int, kv_heads: int):
        self.classes = torch.full((n_layers, kv_heads), -1, dtype=torch.long)
        self.window_mass = torch.zeros(n_layers, kv_heads)
        self.far_entropy = torch.zeros(n_layers, kv_heads)
        self.seen = [0] * n_layers


@register_strategy
class Split(HostStrategy):
    name = "split"
    needs_engine = True
    copies_pages_to_device = True  # the GPU part copies stored blocks: a page-locked store pays

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        policy, s = ctx.policy, ctx.shape
        self.knobs = policy.config.fluxion
        self.group = s.num_q_heads // s.kv_heads
        self.meta: Optional[ChunkMeta] = None
        self.rates, self.kv_bytes = Rates(1.0, 0.0), 0.0
        if policy.offloads and ctx.tier.store is not None:
            view = ctx.tier.store.view
            self.meta = ChunkMeta(view, ctx.device)
            ctx.tier.key_listeners.append(self.meta.touched)
            self.kv_bytes = token_bytes(view)  # key and value bytes of a stored token
            self.rates = measure_rates(ctx.engine, view, s.num_q_heads, ctx.device,
                                       gpu=self.knobs.gpu_share == "auto")
        self.heads: Dict[Hashable, _Heads] = {}
        # per (layer, kv-head), how many requests' heads fell in each class
        self.class_counts = torch.zeros(s.n_layers, s.kv_heads, len(self.knobs.head_classes), dtype=torch.long)
        # per class: (request, layer, kv-head) selections, host tokens kept, host tokens the caps allowed
        self.class_tokens = torch.zeros(len(self.knobs.head_classes), 3, dtype=torch.long)
        self.stats = self.totals = _ZERO
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-split")
        self._future: Optional[Future] = None
        self._gpu: Optional[AttnPart] = None
        self.last_selection: Optional[torch.Tensor] = None

    @classmethod
    def runs_beside_window(cls, policy, device: torch.device) -> bool:
        return device.type != "cuda" and policy.offloads

    @property
    def device_bytes(self) -> int:
        return 0 if self.meta is None else self.meta.nbytes

    # --- plan ---------------------------------------------------------------

    def prepare(self, rids) -> None:
        live = self.ctx.tier.requests
        for rid in [r for r in self.heads if r not in live]:
            del self.heads[rid]

    def plan(self, batch: HostBatch) -> None:
        self.stop()
        super().plan(batch)
        ctx, s = self.ctx, self.ctx.shape
        off = batch.page_offsets.tolist()
        self.tables = [batch.page_table[off[i]: off[i + 1]] for i in range(len(batch.rids))]
        self.meta.refresh([p for t in self.tables for p in t.tolist()])
        for rid in batch.rids:
            if rid not in self.heads:
                self.heads[rid] = _Heads(s.n_layers, s.kv_heads)
        self.window = plan_window([ctx.tier.device_slots(r) for r in batch.rids], ctx.device)
        pin = ctx.device.type == "cuda"
        self.q_host = torch.empty(len(batch.rids), s.num_q_heads, s.head_dim, pin_memory=pin)
        ctx.engine.plan(ctx.tier.store.view, batch.page_table, batch.page_offsets, batch.n_tokens, s.num_q_heads,
                        mode="topk", budget_tokens=torch.ones(len(batch.rids), s.kv_heads, dtype=torch.int32),
                        sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)

    # --- head classes -------------------------------------------------------

    def _classes(self, i: int, layer: int, q: torch.Tensor, window_lse: torch.Tensor) -> List[int]:
        """Request i's kv-head classes at this layer, measuring this step when it is still unclassified."""
        rec, policy = self.heads[self.batch.rids[i]], self.ctx.policy
        row = rec.classes[layer]
        if bool((row >= 0).all()):
            return row.tolist()
        n = int(self.batch.n_tokens[i])
        view, s = self.ctx.tier.store.view, self.ctx.shape
        keys = view.dequant_keys(layer, self.tables[i]).permute(1, 0, 2, 3).reshape(s.kv_heads, -1, s.head_dim)[:, :n]
        qg = q[i].float().cpu().view(s.kv_heads, self.group, s.head_dim)
        logits = torch.einsum("hgd,hnd->hgn", qg, keys).reshape(s.num_q_heads, n) * self.ctx.sm_scale
        if self.ctx.soft_cap > 0:
            logits = self.ctx.soft_cap * torch.tanh(logits / self.ctx.soft_cap)
        st = head_stats(logits, window_lse.cpu(), self.group)
        rec.window_mass[layer] += st.window_mass
        rec.far_entropy[layer] += st.far_entropy
        rec.seen[layer] += 1
        steps = 1 if self.knobs.predictor.source == "prefill" else self.knobs.predictor.calibration_steps
        if rec.seen[layer] < steps:
            return [policy.calibrating_class] * s.kv_heads
        wm, fe = (rec.window_mass[layer] / rec.seen[layer]).tolist(), (rec.far_entropy[layer] / rec.seen[layer]).tolist()
        for h in range(s.kv_heads):
            c = policy.classify(wm[h], fe[h])
            rec.classes[layer, h] = c
            self.class_counts[layer, h, c] += 1
        return rec.classes[layer].tolist()

    # --- selection and split ------------------------------------------------

    def _select(self, q: torch.Tensor, layer: int, window: AttnPart):
        """Per request, per kv-head: the kept blocks' host tokens, split into the CPU's and the GPU's.
        Every request's and block size's choice is made where the chunk statistics live and read
        back in one transfer per layer."""
        ctx, s, policy, batch = self.ctx, self.ctx.shape, self.ctx.policy, self.batch
        S = ctx.tier.store.view.summary_tokens
        eps = -1.0 if policy.attends_everything else policy.epsilon
        groups = []  # (i, n, bt, heads, caps of those heads, classes of those heads, BlockChoice)
        for i in range(len(batch.rids)):
            n = int(batch.n_tokens[i])
            if n == 0:
                continue
            wl, wo = window.lse[i].view(s.kv_heads, self.group), window.out[i].view(s.kv_heads, self.group, -1)
            classes = self._classes(i, layer, q, window.lse[i])
            caps = policy.head_caps(classes, n, batch.context_tokens[i])
            summary, sums = self.meta.chunks(layer, self.tables[i])
            c = -(-n // S)
            counts = (n - torch.arange(c) * S).clamp(max=S)
            stats = chunk_stats(q[i].view(s.kv_heads, self.group, -1).to(summary.device), summary[:, :c], sums[:, :c],
                                counts, sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)
            sizes = [policy.block_tokens(cl) for cl in classes]
            for bt in sorted(set(sizes)):
                heads = [h for h in range(s.kv_heads) if sizes[h] == bt]
                # a cap in whole blocks: rounded down (at least one), or up for budget all
                cap_blocks = torch.tensor([-(-caps[h] // bt) if eps < 0 else max(1, caps[h] // bt) for h in heads])
                choice = choose_blocks(stats, torch.tensor(heads, device=summary.device), bt // S, cap_blocks,
                                       wl.to(summary.device), wo.to(summary.device), epsilon=eps,
                                       rank=policy.knobs.block_rank)
                groups.append((i, n, bt, heads, [caps[h] for h in heads], [classes[h] for h in heads], choice))
        if not groups:
            return [], 0, 0
        # one read-back: every group's [blocks | keep | share] rows, flattened
        flat = torch.cat([torch.cat([c.blocks.double(), c.keep.double()[:, None], c.share.double()], 1).flatten()
                          for *_, c in groups]).cpu()
        picks = []  # (i, h, block ids [k], block tokens, share [k])
        kept = caps_sum = 0
        at = 0
        for i, n, bt, heads, caps, classes, choice in groups:
            hh, k = choice.blocks.shape
            rows = flat[at: at + hh * (2 * k + 1)].view(hh, 2 * k + 1)
            at += hh * (2 * k + 1)
            blocks, keep, share = rows[:, :k].long(), rows[:, k].long().tolist(), rows[:, k + 1:].float()
            for j, h in enumerate(heads):
                picks.append((i, h, blocks[j, : keep[j]], bt, share[j, : keep[j]]))
                got, cap = min(keep[j] * bt, n), min(caps[j], n)
                kept += got
                caps_sum += cap
                self.class_tokens[classes[j]] += torch.tensor([1, got, cap])  # calibrating: its class
        return picks, kept, caps_sum

    def _tokens(self, picks, on_gpu: torch.Tensor):
        """The picks' host tokens per request and kv-head, for the CPU part and the GPU part."""
        b, hkv = len(self.batch.rids), self.ctx.shape.kv_heads
        empty = torch.zeros(0, dtype=torch.long)
        cpu = [[empty] * hkv for _ in range(b)]
        gpu = [[empty] * hkv for _ in range(b)]
        at = 0
        for i, h, blocks, bt, _ in picks:
            n = int(self.batch.n_tokens[i])
            side = on_gpu[at: at + blocks.numel()]
            at += blocks.numel()
            for dest, mask in ((cpu, ~side), (gpu, side)):
                chosen = blocks[mask]
                if chosen.numel():
                    t = (chosen[:, None] * bt + torch.arange(bt)).reshape(-1)
                    dest[i][h] = torch.sort(t[t < n]).values
        return cpu, gpu

    def submit(self, q: torch.Tensor, layer: int) -> None:
        ctx = self.ctx
        window = (torch_window_attention(q, ctx.tier.k_pool[layer], ctx.tier.v_pool[layer], self.window,
                                         sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)
                  if not self.batch.window_empty else empty_part(*q.shape, q.device))
        picks, kept, caps = self._select(q, layer, window)
        share = torch.cat([p[4] for p in picks]) if picks else torch.zeros(0)
        nbytes = torch.cat([torch.full((p[2].numel(),), float(p[3] * self.kv_bytes)) for p in picks]) \
            if picks else torch.zeros(0)
        on_gpu = split_point(share, nbytes, self.rates)
        cpu_tokens, gpu_tokens = self._tokens(picks, on_gpu)
        self.last_selection = self._selection(cpu_tokens, gpu_tokens)
        gpu_b, cpu_b = float(nbytes[on_gpu].sum()), float(nbytes[~on_gpu].sum())
        t_cpu = cpu_b / self.rates.cpu_bytes_per_s
        t_gpu = gpu_b / self.rates.gpu_bytes_per_s if self.rates.gpu_bytes_per_s > 0 else 0.0
        self._add(SplitStats(int((~on_gpu).sum()), int(on_gpu.sum()), int(cpu_b), int(gpu_b), kept, caps,
                             len(picks), t_cpu, t_gpu, abs(t_cpu - t_gpu)))
        self._gpu = None
        if bool(on_gpu.any()):
            self._gpu = gpu_part(ctx.tier.store.view, layer, q, self.tables, gpu_tokens, sm_scale=ctx.sm_scale,
                                 soft_cap=ctx.soft_cap)
            ctx.tier.count_h2d(int(gpu_b) if q.device.type == "cuda" else 0)
        self._cpu_idx = cpu_indices(cpu_tokens, self.group)
        self.q_host.copy_(q, non_blocking=True)
        if q.device.type == "cuda":
            torch.cuda.current_stream(q.device).synchronize()  # q has landed in q_host
        else:
            self._future = self._pool.submit(self._run_cpu, layer)

    def _run_cpu(self, layer: int) -> AttnPart:
        c0 = time.perf_counter()
        out, lse = self.ctx.engine.attend_indices(self.ctx.tier.store.view, layer, self.q_host, self._cpu_idx)
        self._cpu_s += time.perf_counter() - c0
        return AttnPart(out, lse)

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        if self._future is not None:
            future, self._future = self._future, None
            part = future.result()
        else:
            part = self._run_cpu(layer)  # the window's and the GPU part's kernels run meanwhile
        part = AttnPart(part.out.to(q.device, non_blocking=True), part.lse.to(q.device, non_blocking=True))
        if self._gpu is not None:
            part = merge(part, self._gpu)
        return AttnPart(part.out.float(), part.lse.float())

    def detail(self, q: torch.Tensor, layer: int):
        self.submit(q, layer)
        return self.collect(q, layer), self.last_selection

    def _selection(self, cpu_tokens, gpu_tokens) -> torch.Tensor:
        both = [[torch.sort(torch.cat([c, g])).values for c, g in zip(cs, gs)] for cs, gs in zip(cpu_tokens, gpu_tokens)]
        return cpu_indices(both, self.group)

    # --- stats and lifecycle --------------------------------------------------

    def _add(self, st: SplitStats) -> None:
        self.stats = SplitStats(*(a + b for a, b in zip(self.stats, st)))
        self.totals = SplitStats(*(a + b for a, b in zip(self.totals, st)))

    def take_split_stats(self) -> SplitStats:
        st, self.stats = self.stats, _ZERO
        return st

    def head_classes(self) -> Dict[str, List[List[int]]]:
        """Per class name, per layer, per kv-head: how many requests' heads were classified so."""
        names = [c.name for c in self.knobs.head_classes]
        return {name: self.class_counts[:, :, j].tolist() for j, name in enumerate(names)}

    def report(self) -> Dict[str, object]:
        """Head classes per layer and kv-head, tokens kept per class, and the split's totals."""
        names = [c.name for c in self.knobs.head_classes]
        tokens = {name: dict(zip(("selections", "kept_tokens", "cap_tokens"), self.class_tokens[j].tolist()))
                  for j, name in enumerate(names)}
        return {"head_classes": self.head_classes(), "class_tokens": tokens, "split": self.totals._asdict(),
                "rates": self.rates._asdict()}

    def stop(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._pool.shutdown(wait=True)
