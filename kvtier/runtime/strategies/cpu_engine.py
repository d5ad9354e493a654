"""The CPU engine strategy: the native engine selects and attends host tokens (hgca, quest, the
prefilter and residual variants).

Per layer the query crosses to the host, the engine scores the host keys of each
(request, kv-head), selects per the policy's `engine_args` and returns softmax·V over
the selection with its LSE. Only q goes out and only (out, lse) comes back.

How the engine overlaps the device window:
- CUDA, waiting: the query is copied to a page-locked buffer (the thread spins until it
  lands: the engine's threads are idle until then), the window's kernels are queued, and
  the engine runs on this thread (cffi releases the GIL) while the GPU runs them.
- CUDA, pipelined (FlashInfer, Triton and the driver's stream memory operations; on unless
  $KVTIER_PIPELINE=off): the stream copies the query into a slot and raises a flag, the
  engine serving on its own thread (`Engine.server`) answers and raises another, and the
  stream waits for that flag before the merge. The decoding thread never waits and runs
  ahead into the next layers, so its launch time overlaps the engine (`pipeline.EngineFeed`).
  The loop serves one plan: `stop()` ends it before a plan, before the store changes, and
  when the times are taken.
- CPU: the engine runs on a helper thread beside the window (`hgca.overlap: false` runs it
  after the window on the calling thread instead).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, Optional, Tuple

import torch

from .. import fused_merge, stream_ops
from ..merge import AttnPart
from ..pipeline import EngineFeed, cuda_stream_ops, pipeline_setting
from ..window_attention import flashinfer_available
from .base import HostBatch, HostStrategy, StrategyContext, register_strategy


class _Buffers(NamedTuple):
    q_host: torch.Tensor  # [B, Hq, D] f32 (pinned on CUDA)
    out_host: torch.Tensor  # [B, Hq, D] f32, a view of far_host
    lse_host: torch.Tensor  # [B, Hq] f32, a view of far_host
    far_host: torch.Tensor  # out then lse, flat: one copy to the device per layer


@register_strategy
class CpuEngine(HostStrategy):
    name = "cpu_engine"
    needs_engine = True

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        self.overlap = ctx.policy.overlap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-engine")
        self._bufs: Optional[_Buffers] = None
        self._future: Optional[Future] = None
        self._pipelined = (ctx.pipeline and ctx.engine is not None
                           and self.pipelines(ctx.policy, ctx.device, default=True))
        self._piped = False  # this plan runs pipelined
        self._handed: Optional[Tuple[int, int]] = None  # the layer's (slot, seq) in the feed
        # a slot per layer: each layer's flag is stored once, not at every step
        self._feed = EngineFeed(ctx.engine, self._pool, cuda_stream_ops(ctx.device),
                                n_slots=max(2, ctx.shape.n_layers)) if self._pipelined else None

    @classmethod
    def pipelines(cls, policy, device: torch.device, default: bool = True) -> bool:
        return (pipeline_setting(default) and policy.overlap and policy.offloads and device.type == "cuda"
                and flashinfer_available(device) and fused_merge.available(device) and stream_ops.available(device))

    @classmethod
    def runs_beside_window(cls, policy, device: torch.device) -> bool:
        return device.type != "cuda" and policy.overlap and policy.offloads

    @property
    def pipelined(self) -> bool:
        return self._pipelined

    # --- plan ---------------------------------------------------------------

    def plan(self, batch: HostBatch) -> None:
        self.stop()
        super().plan(batch)
        ctx = self.ctx
        pin = ctx.device.type == "cuda"
        b, hq, d = len(batch.rids), ctx.shape.num_q_heads, ctx.shape.head_dim
        if self._bufs is None or self._bufs.q_host.shape[0] != b:  # a batch of another size: new buffers
            far = torch.empty(b * hq * (d + 1), pin_memory=pin)
            self._bufs = _Buffers(torch.empty(b, hq, d, pin_memory=pin), far[: b * hq * d].view(b, hq, d),
                                  far[b * hq * d:].view(b, hq), far)
        args = self._args = ctx.policy.engine_args(batch.host_tokens, batch.context_tokens, ctx.shape.kv_heads)
        # A cap past a request's host tokens selects all of them: clamped before it becomes int32.
        budgets = [[int(min(c, max(h, 1))) for c in row] for row, h in zip(args.budgets, batch.host_tokens)]
        ctx.engine.plan(
            ctx.tier.store.view, batch.page_table, batch.page_offsets, batch.n_tokens, hq, mode=args.mode,
            group_reduce=args.group_reduce, budget_tokens=torch.tensor(budgets, dtype=torch.int32),
            block_tokens=torch.tensor(args.block_tokens, dtype=torch.int32) if args.block_tokens else None,
            mass_threshold=args.mass_threshold, sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap,
            prefilter=args.prefilter, residual=args.residual,
        )
        self._piped = self._pipelined and not batch.window_empty

    # --- run ----------------------------------------------------------------

    def submit(self, q: torch.Tensor, layer: int) -> None:
        if self._piped:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.ctx.shape.n_layers:
                raise ValueError(f"layer: expected an int in [0, {self.ctx.shape.n_layers}), got {layer!r}")
            self._handed = self._feed.hand_off(torch.cuda.current_stream(q.device), q, layer)
            return
        bufs = self._bufs
        bufs.q_host.copy_(q, non_blocking=True)
        if q.device.type == "cuda":
            # Wait for q by spinning: the engine's threads are idle until it lands, and a
            # sleeping wait adds the wake-up latency to every layer.
            ready = torch.cuda.Event()
            ready.record()
            ready.synchronize()
        elif self.overlap:
            # On the CPU the window is computed by the caller too: the engine runs beside it.
            self._future = self._pool.submit(self._run, layer)

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        if self._piped:
            slot, seq = self._handed
            out, lse = self._feed.result(torch.cuda.current_stream(q.device), slot, seq, q.device)
            return AttnPart(out, lse)
        if self._future is not None:
            future, self._future = self._future, None
            future.result()
        else:
            if q.device.type == "cuda" and not self.overlap:
                torch.cuda.current_stream(q.device).synchronize()  # the window first, then the engine
            # The window's kernels are queued; the GPU runs them while this thread runs the
            # engine (cffi releases the GIL), with no thread hand-off per layer.
            self._run(layer)
        return self._part_on(q.device)

    def detail(self, q: torch.Tensor, layer: int):
        res = self.ctx.engine.run(layer, q.float().cpu(), return_selection=True)
        return AttnPart(res.out.to(q.device), res.lse.to(q.device)), res.sel_index

    def read_bytes(self, layer: int, selection: Optional[torch.Tensor]) -> Optional[float]:
        """Keys scanned (every host token's; with the prefilter the summaries and the candidates'; in
        blocks mode the summaries), the chunk sums with the residual, and the selected tokens' values
        (and keys, in blocks mode)."""
        tb, args, hkv = self.token_bytes(), self._args, self.ctx.shape.kv_heads
        total = 0.0
        for i, n in enumerate(self.batch.host_tokens):
            cap = min(n, max(args.budgets[i]))
            if args.mode == "all":
                scanned, summary = n, 0.0
            elif args.mode == "blocks":
                scanned, summary = 0, n * tb.summary
            elif args.prefilter:
                scanned, summary = min(n, int(args.prefilter * cap)), n * tb.summary
            else:
                scanned, summary = n, 0.0
            total += hkv * (scanned * tb.key + summary + (n * tb.sums if args.residual else 0.0))
            if selection is None:
                total += hkv * (n if args.mode == "all" else cap) * (tb.value + (tb.key if args.mode == "blocks" else 0))
        if selection is not None:
            total += self.distinct_selected(selection) * (tb.value + (tb.key if args.mode == "blocks" else 0))
        return total

    def _run(self, layer: int) -> None:
        c0 = time.perf_counter()
        bufs = self._bufs
        self.ctx.engine.run(layer, bufs.q_host, out=bufs.out_host, lse=bufs.lse_host)
        self._cpu_s += time.perf_counter() - c0

    def _part_on(self, device) -> AttnPart:
        """The engine's (out, lse) on `device`, views of one copy of the flat host buffer."""
        bufs = self._bufs
        far = bufs.far_host.to(device, non_blocking=True)
        n = bufs.out_host.numel()
        return AttnPart(far[:n].view(bufs.out_host.shape), far[n:].view(bufs.lse_host.shape))

    # --- lifecycle ----------------------------------------------------------

    def stop(self) -> None:
        """End the pipelined engine's loop once the layers handed off so far are done.

        Raises the engine's error if any.
        """
        if self._feed is not None:
            self._cpu_s += self._feed.stop()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._pool.shutdown(wait=True)
