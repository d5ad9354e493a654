"""Hybrid decode attention, plan/run: GPU dense window + CPU sparse host, merged.

`plan(rids)` runs once per batch on the host: window slot lists, host page
tables and per-(request, kv-head) budgets; it owns every scratch buffer.
`run(q, layer)` runs once per layer and allocates nothing on the engine side:
it copies q to the host, starts the native engine (which releases the GIL),
runs the window attention on the device meanwhile, waits, brings (out, lse)
back and merges on the device. A request with nothing on the host has
lse = -inf on that side, which the merge ignores.

On CUDA with FlashInfer, Triton and the driver's stream memory operations,
`run` does not wait at all (the pipelined path): the stream copies q into a
page-locked slot and raises a flag, the engine, serving on its own thread
(`Engine.server`), answers and raises another, and the stream waits for that
flag before it copies the answer back and merges. The thread that queues the
kernels runs ahead into the next layers meanwhile, so its launch time overlaps
the engine instead of adding to it. The engine serves one plan; `plan()`, the
tier's changes to the host store, `take_times()` and `close()` end the loop
first (raising any engine error there). $KVTIER_PIPELINE=off turns it off.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Hashable, List, NamedTuple, Optional, Tuple

import torch

from .._native import Engine, dequant_raw_keys, dequant_raw_values
from ..config import ModelShape
from ..policies import Policy
from . import fused_merge, stream_ops
from .extend import cpu_attention, flash_attention
from .pipeline import EngineFeed, cuda_stream_ops, pipeline_setting
from .merge import AttnPart, merge
from .tier import TierManager, slot_tensor
from .window_attention import (
    FlashInferWindow, WindowPlan, empty_part, flashinfer_available, plan_window, torch_window_attention,
)


class StepTimes(NamedTuple):
    cpu_s: float  # engine time summed over layers
    gpu_s: float  # window attention summed over layers (GPU kernel time on CUDA, wall time elsewhere)
    wall_s: float  # run() wall time summed over layers

    @property
    def overlap_s(self) -> float:
        """Time the CPU engine and the GPU window ran concurrently (0 when serial)."""
        return max(0.0, min(self.cpu_s, self.gpu_s, self.cpu_s + self.gpu_s - self.wall_s))


class HybridDetail(NamedTuple):
    """One layer's decode attention with its parts kept (diagnostics, evaluation)."""

    out: torch.Tensor  # [B, Hq, D] f32, equals run()'s output before the cast
    lse: torch.Tensor  # [B, Hq] f32, natural log, over device and attended host tokens
    device: AttnPart
    host: Optional[AttnPart]  # None when nothing is attended on the host
    selection: Optional[torch.Tensor]  # [B, Hq, cap] int32 host-token indices, -1 padded (engine path only)


class _HostPlan(NamedTuple):
    q_host: torch.Tensor  # [B, Hq, D] f32 (pinned on CUDA)
    out_host: torch.Tensor  # [B, Hq, D] f32, a view of far_host
    lse_host: torch.Tensor  # [B, Hq] f32, a view of far_host
    far_host: torch.Tensor  # out then lse, flat: one copy to the device per layer
    page_table: torch.Tensor
    page_offsets: torch.Tensor
    n_tokens: torch.Tensor


def pipeline_possible(policy: Policy, device: torch.device, default: bool = True) -> bool:
    """Whether HybridAttention(pipeline_default=default) would pipeline this policy on this device."""
    return (pipeline_setting(default) and policy.overlap and policy.host_path == "engine" and policy.offloads
            and device.type == "cuda"
            and flashinfer_available(device) and fused_merge.available(device) and stream_ops.available(device))


log = logging.getLogger("kvtier")
_EXTEND_HOST_TOKENS = 4096  # host tokens dequantized at a time by run_extend


class _ExtendRow(NamedTuple):
    slots: torch.Tensor  # [W] long on the device: sinks, then the recent window ending with the chunk
    n_new: int  # the chunk's tokens (the last n_new slots)
    pages: torch.Tensor  # int32 host pages holding the request's host tokens, in order
    n_host: int


class HybridAttention:
    """Decode attention through the tier for one batch at a time (and prefill chunks, `plan_extend`)."""

    def __init__(self, policy: Policy, shape: ModelShape, tier: TierManager, *, engine: Optional[Engine],
                 sm_scale: float, soft_cap: float = 0.0, use_flashinfer: Optional[bool] = None,
                 pipeline_default: bool = True):
        """pipeline_default: whether to pipeline when $KVTIER_PIPELINE is unset (the variable
        wins); the pipelined path needs CUDA, FlashInfer, Triton, the engine host path and the
        driver's stream memory operations."""
        want_pipe = pipeline_setting(pipeline_default)  # a bad setting fails before anything starts
        self.policy, self.shape, self.tier, self.engine = policy, shape, tier, engine
        self.sm_scale, self.soft_cap = sm_scale, soft_cap
        self.device = tier.device
        if policy.host_path == "engine" and policy.offloads and engine is None:
            raise ValueError(f"policy '{policy.name}' attends the host with the native engine; pass engine=")
        want_fi = flashinfer_available(self.device) if use_flashinfer is None else use_flashinfer
        self.flashinfer = FlashInferWindow(self.device) if want_fi else None
        # FlashInfer's window and the engine's part merge in one kernel when Triton is there.
        self.fused = self.flashinfer is not None and fused_merge.available(self.device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-engine")
        self._rids: List[Hashable] = []
        self._window: Optional[WindowPlan] = None
        self._host: Optional[_HostPlan] = None
        self._extend: Optional[List[_ExtendRow]] = None
        # run_extend reads host pages as stored bytes dequantized where they land (False: the C
        # store dequantizes to float32 on the CPU first, the reference path)
        self.extend_raw = True
        # run_extend's attention: FlashInfer's prefill kernel where the window uses FlashInfer,
        # else torch's fused CPU kernel on the CPU (cpu_attention), torch float32 blocks elsewhere
        # (block_attention, the reference)
        self.extend_flash = self.flashinfer is not None
        self._cpu_s = self._gpu_s = self._wall_s = 0.0
        self._window_empty = True
        self._gpu_events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._event_pool: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []  # reused after each fold
        # overlap off (hgca.overlap: false): the window, then the engine, one after the other
        self.overlap = policy.overlap
        self.pipelined = self.fused and engine is not None and pipeline_possible(policy, self.device, want_pipe)
        self._piped = False  # this plan runs pipelined
        # a slot per layer: each layer's flag is stored once, not at every step
        self._feed = EngineFeed(engine, self._pool, cuda_stream_ops(self.device),
                                n_slots=max(2, shape.n_layers)) if self.pipelined else None
        if self._feed is not None:
            tier.host_readers.append(self.stop_serving)

    # --- plan ---------------------------------------------------------------

    def plan(self, rids: List[Hashable]) -> None:
        tier, shape = self.tier, self.shape
        self.stop_serving()
        tier.settle()
        self._rids = list(rids)
        self._fold_gpu_events()
        slot_lists = [tier.device_slots(r) for r in rids]
        self._window_empty = not any(slot_lists)  # decided here: no per-layer device sync
        self._window = plan_window(slot_lists, self.device)
        if self.flashinfer is not None:
            self.flashinfer.plan(self._window, shape.num_q_heads, shape.kv_heads, shape.head_dim,
                                 tier.k_pool[0].dtype, sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        host = [tier.host_tokens(r) for r in rids]
        # host_path "none" (window only): evicted tokens exist but are never attended.
        attend_host = tier.offload and self.policy.host_path != "none" and any(host)
        self._host = self._plan_host(rids, host) if attend_host else None
        self._piped = self.pipelined and self._host is not None and not self._window_empty

    def _plan_host(self, rids, host: List[int]) -> _HostPlan:
        tier, shape, T = self.tier, self.shape, self.tier.config.window.page_tokens
        tables = [tier.store.table(r).pages[: -(-h // T)] if h else [] for r, h in zip(rids, host)]
        offsets = torch.zeros(len(rids) + 1, dtype=torch.int32)
        offsets[1:] = torch.tensor([len(t) for t in tables]).cumsum(0)
        page_table = torch.tensor([p for t in tables for p in t] or [0], dtype=torch.int32)
        n_tokens = torch.tensor(host, dtype=torch.int32)
        pin = self.device.type == "cuda"
        b, hq, d = len(rids), shape.num_q_heads, shape.head_dim
        far = torch.empty(b * hq * (d + 1), pin_memory=pin)
        hp = _HostPlan(torch.empty(b, hq, d, pin_memory=pin), far[: b * hq * d].view(b, hq, d),
                       far[b * hq * d:].view(b, hq), far, page_table, offsets, n_tokens)
        if self.policy.host_path == "engine":
            context = [tier.requests[r].length for r in rids]
            args = self.policy.engine_args(host, context, shape.kv_heads)
            self.engine.plan(
                tier.store.view, page_table, offsets, n_tokens, hq, mode=args.mode, group_reduce=args.group_reduce,
                budget_tokens=torch.tensor(args.budgets, dtype=torch.int32),
                block_tokens=torch.tensor(args.block_tokens, dtype=torch.int32) if args.block_tokens else None,
                mass_threshold=args.mass_threshold, sm_scale=self.sm_scale, soft_cap=self.soft_cap,
                prefilter=args.prefilter, residual=args.residual,
            )
        return hp

    def plan_extend(self, rids: List[Hashable], new_tokens: List[int]) -> None:
        """Plan a prefill chunk: request rids[i]'s last new_tokens[i] tokens, already extended
        (`TierManager.extend`) and written to the pool, attend everything before them.

        The host part is attended exactly (every token, dequantized from the store), except
        for a policy that never attends the host (window only).
        """
        if len(rids) != len(new_tokens):
            raise ValueError(f"plan_extend: expected one chunk length per request, found {len(rids)} requests "
                             f"and {len(new_tokens)} lengths")
        tier, T = self.tier, self.tier.config.window.page_tokens
        self.stop_serving()
        tier.settle()
        rows = []
        for r, n in zip(rids, new_tokens):
            slots, st = tier.device_slots(r), tier.requests[r]
            # The chunk is the request's last n positions, all still on the device: after the
            # host part, or anywhere when nothing left for the host yet (sinks and window adjoin).
            most = st.length if st.host_end == len(st.sink_slots) else st.length - st.host_end
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
                raise ValueError(f"plan_extend: request {r!r}: expected a chunk of 1 to {most} tokens (its newest "
                                 f"tokens still on the device), got {n!r}")
            h = tier.host_tokens(r) if tier.offload and self.policy.host_path != "none" else 0
            pages = torch.tensor(tier.store.table(r).pages[: -(-h // T)] if h else [], dtype=torch.int32)
            rows.append(_ExtendRow(slot_tensor(slots).to(self.device), n, pages, h))
        self._extend = rows

    def run_extend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """q [sum of the chunk lengths, Hq, D] (requests in plan order) -> attention output, q's dtype."""
        rows = self._extend
        if rows is None:
            raise RuntimeError("HybridAttention.run_extend before plan_extend()")
        hq, d = self.shape.num_q_heads, self.shape.head_dim
        total = sum(r.n_new for r in rows)
        if tuple(q.shape) != (total, hq, d):
            raise ValueError(f"q must be [chunk tokens, num_q_heads, head_dim] = {(total, hq, d)}, found {tuple(q.shape)}")
        kp, vp = self.tier.k_pool[layer], self.tier.v_pool[layer]
        kw = dict(sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        T = self.tier.config.window.page_tokens
        per = max(1, _EXTEND_HOST_TOKENS // T)  # host pages read at a time
        attend = self._extend_part
        outs, o = [], 0
        for row in rows:
            qr = q[o: o + row.n_new]
            o += row.n_new
            part = attend(qr, kp[row.slots], vp[row.slots], causal_offset=row.slots.numel() - row.n_new, **kw)
            # The host part a few thousand tokens at a time: dequantized float32 for a long
            # prompt's whole host part would be gigabytes per layer.
            for i in range(0, row.pages.numel(), per):
                pages, n = row.pages[i: i + per], min(row.n_host - i * T, per * T)
                k, v, moved = host_block(self.tier.store.view, layer, pages, n, q.device, raw=self.extend_raw)
                self.tier.count_h2d(moved if q.device.type == "cuda" else 0)
                part = merge(part, attend(qr, k, v, causal_offset=None, **kw))
            outs.append(part.out)
        return torch.cat(outs).to(q.dtype)

    def warm_extend(self, dtype: torch.dtype) -> float:
        """Run run_extend's attention kernel once on a few random tokens, so that a kernel
        compiled on first use (FlashInfer's) is built now rather than inside the first long
        prompt; returns the seconds it took (0 when there is nothing to prepare)."""
        if not self.extend_flash:
            return 0.0
        t0 = time.perf_counter()
        hq, hkv, d = self.shape.num_q_heads, self.shape.kv_heads, self.shape.head_dim
        q = torch.randn(2, hq, d, device=self.device).to(dtype)
        k, v = (torch.randn(5, hkv, d, device=self.device).to(dtype) for _ in range(2))
        for offset in (3, None):  # a chunk over its device tokens, then over host tokens
            self._extend_part(q, k, v, causal_offset=offset, sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _extend_part(self, q, k, v, *, causal_offset, sm_scale, soft_cap):
        if self.extend_flash:
            try:
                return flash_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale, soft_cap=soft_cap)
            except (RuntimeError, ImportError, TypeError) as exc:  # a kernel FlashInfer cannot build or run here
                log.warning("kvtier: FlashInfer's prefill kernel failed (%s); chunked prefill continues with "
                            "float32 torch attention", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.extend_flash = False
        # torch's fused kernel on the CPU; it falls back to block_attention where it cannot serve
        return cpu_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale, soft_cap=soft_cap)

    # --- run ----------------------------------------------------------------

    def run(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """q [B, Hq, D] on the device -> attention output [B, Hq, D] in q's dtype."""
        if self._window is None:
            raise RuntimeError("HybridAttention.run before plan()")
        b, hq, d = len(self._rids), self.shape.num_q_heads, self.shape.head_dim
        if tuple(q.shape) != (b, hq, d):
            raise ValueError(f"q must be [batch, num_q_heads, head_dim] = {(b, hq, d)}, found {tuple(q.shape)}")
        if self._piped:
            return self._run_piped(q, layer)
        t0 = time.perf_counter()
        cuda = q.device.type == "cuda"
        host, future = self._host, None
        engine = host is not None and self.policy.host_path == "engine"
        if engine:
            host.q_host.copy_(q, non_blocking=True)
            if cuda:
                # Wait for q by spinning: the engine's threads are idle until it lands, and a
                # sleeping wait adds the wake-up latency to every layer.
                ready = torch.cuda.Event()
                ready.record()
                ready.synchronize()
            elif self.overlap:
                # On the CPU the window is computed here too: the engine runs beside it on a thread.
                future = self._pool.submit(self._engine_run, layer, host)
        if cuda:
            start, end = self._events()
            start.record()
        g0 = time.perf_counter()
        fused = self.fused and not self._window_empty and (host is None or engine)
        if fused:
            win_out, win_lse2 = self.flashinfer.run_raw(q, self.tier.k_pool[layer], self.tier.v_pool[layer])
        else:
            dev = self._window_part(q, layer)
        if cuda:
            end.record()
            self._gpu_events.append((start, end))
            if engine:
                if not self.overlap:
                    end.synchronize()
                # The window's kernels are queued; the GPU runs them while this thread runs the
                # engine (cffi releases the GIL), with no thread hand-off per layer.
                self._engine_run(layer, host)
        else:
            self._gpu_s += time.perf_counter() - g0
            if engine and not self.overlap:
                self._engine_run(layer, host)
        if fused:
            out = win_out
            if engine:
                far = _engine_part_on(host, q.device)
                out = fused_merge.merge_into(torch.empty(q.shape, dtype=q.dtype, device=q.device), win_out, win_lse2,
                                             far.out, far.lse, a_lse_base2=True, check=False)
            self._wall_s += time.perf_counter() - t0
            return out
        if host is None:
            part = dev
        elif engine:
            if future is not None:
                future.result()
            part = merge(dev, _engine_part_on(host, q.device))
        else:
            part = merge(dev, self._fetch_part(q, layer, host))
        self._wall_s += time.perf_counter() - t0
        return part.out.to(q.dtype)

    def _run_piped(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.shape.n_layers:
            raise ValueError(f"layer: expected an int in [0, {self.shape.n_layers}), got {layer!r}")
        t0 = time.perf_counter()
        stream = torch.cuda.current_stream(q.device)
        slot, seq = self._feed.hand_off(stream, q, layer)
        start, end = self._events()
        start.record()
        win_out, win_lse2 = self.flashinfer.run_raw(q, self.tier.k_pool[layer], self.tier.v_pool[layer])
        end.record()
        self._gpu_events.append((start, end))
        far_out, far_lse = self._feed.result(stream, slot, seq, q.device)
        # shapes and devices are this plan's (checked above); no second check per layer
        out = fused_merge.merge_into(torch.empty(q.shape, dtype=q.dtype, device=q.device), win_out, win_lse2,
                                     far_out, far_lse, a_lse_base2=True, check=False)
        self._wall_s += time.perf_counter() - t0
        return out

    def stop_serving(self) -> None:
        """End the pipelined engine's loop once the layers handed off so far are done.

        Raises the engine's error if any. Called before every plan and before the
        tier changes the host store.
        """
        if self._feed is not None:
            self._cpu_s += self._feed.stop()

    def run_detail(self, q: torch.Tensor, layer: int) -> HybridDetail:
        """run() without overlap, keeping both parts, the merged LSE and the engine's selection."""
        if self._window is None:
            raise RuntimeError("HybridAttention.run_detail before plan()")
        b, hq, d = len(self._rids), self.shape.num_q_heads, self.shape.head_dim
        if tuple(q.shape) != (b, hq, d):
            raise ValueError(f"q must be [batch, num_q_heads, head_dim] = {(b, hq, d)}, found {tuple(q.shape)}")
        dev = self._window_part(q, layer)
        host, selection = self._host, None
        if host is None:
            return HybridDetail(dev.out, dev.lse, dev, None, None)
        if self.policy.host_path == "engine":
            res = self.engine.run(layer, q.float().cpu(), return_selection=True)
            far, selection = AttnPart(res.out.to(q.device), res.lse.to(q.device)), res.sel_index
        else:
            far = self._fetch_part(q, layer, host)
        part = merge(dev, far)
        return HybridDetail(part.out, part.lse, dev, far, selection)

    def _engine_run(self, layer: int, host: _HostPlan) -> None:
        c0 = time.perf_counter()
        self.engine.run(layer, host.q_host, out=host.out_host, lse=host.lse_host)
        self._cpu_s += time.perf_counter() - c0

    def _window_part(self, q: torch.Tensor, layer: int) -> AttnPart:
        k, v = self.tier.k_pool[layer], self.tier.v_pool[layer]
        if self._window_empty:
            return empty_part(q.shape[0], q.shape[1], q.shape[2], q.device)
        if self.flashinfer is not None:
            return self.flashinfer.run(q, k, v)
        return torch_window_attention(q, k, v, self._window, sm_scale=self.sm_scale, soft_cap=self.soft_cap)

    def _fetch_part(self, q: torch.Tensor, layer: int, host: _HostPlan) -> AttnPart:
        """offload_all: bring every host token of this layer to the device and attend it densely."""
        view, T = self.tier.store.view, self.tier.config.window.page_tokens
        outs, lses = [], []
        for i in range(len(self._rids)):
            n = int(host.n_tokens[i])
            lo, hi = int(host.page_offsets[i]), int(host.page_offsets[i + 1])
            if n == 0:
                part = empty_part(1, q.shape[1], q.shape[2], q.device)
            else:
                pages = host.page_table[lo:hi].long()
                k = _fetch(view.keys[layer], pages, q.device)  # [pages, Hkv, T, D]
                v = _fetch(view.buffers.values[layer], pages, q.device)
                self.tier.count_h2d(2 * k.numel() * k.element_size())
                k = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])[:n]
                v = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])[:n]
                slots = torch.arange(n, device=q.device)[None, :]
                plan = WindowPlan(slots, torch.tensor([n], device=q.device), None, None)
                part = torch_window_attention(q[i: i + 1], k, v, plan, sm_scale=self.sm_scale, soft_cap=self.soft_cap)
            outs.append(part.out)
            lses.append(part.lse)
        return AttnPart(torch.cat(outs), torch.cat(lses))

    # --- stats --------------------------------------------------------------

    def _events(self) -> Tuple[torch.cuda.Event, torch.cuda.Event]:
        """A (start, end) timing pair for this layer's window kernels; the caller appends it to
        _gpu_events once both are recorded (a layer that fails between them is not counted).
        Pairs are made once and reused after each fold (creating two events per layer costs
        the decoding thread more than recording them)."""
        i = len(self._gpu_events)
        if i == len(self._event_pool):
            self._event_pool.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        return self._event_pool[i]

    def _fold_gpu_events(self) -> None:
        """Add the window kernels' GPU time recorded since the last fold (waits for them)."""
        for start, end in self._gpu_events:
            end.synchronize()
            self._gpu_s += start.elapsed_time(end) / 1e3
        self._gpu_events.clear()

    def take_times(self) -> StepTimes:
        self.stop_serving()
        self._fold_gpu_events()
        t = StepTimes(self._cpu_s, self._gpu_s, self._wall_s)
        self._cpu_s = self._gpu_s = self._wall_s = 0.0
        return t

    def close(self) -> None:
        try:
            self.stop_serving()
        finally:
            self._pool.shutdown(wait=True)


def host_block(view, layer: int, pages: torch.Tensor, n: int, device, *, raw: bool = True):
    """The first n host tokens of `pages` in layer as float32 k, v [n, Hkv, D] on `device`,
    and the bytes moved there.

    raw: the stored bytes (int8/int4/bf16 keys with their scales, bf16/int8 values) are
    gathered on the CPU, copied and dequantized on `device`, a quarter to a half of the
    float32 bytes; otherwise (the reference) the C store dequantizes on the CPU.
    """
    if raw:
        stored = view.raw_pages(layer, pages)
        moved = sum(t.numel() * t.element_size() for t in stored if t is not None)
        stored = type(stored)(*(None if t is None else t.to(device, non_blocking=True) for t in stored))
        k = dequant_raw_keys(stored, view.key_format, view.key_group)
        v = dequant_raw_values(stored, view.value_format)
    else:
        k, v = view.dequant_keys(layer, pages).to(device), view.values(layer, pages).to(device)
        moved = 2 * k.numel() * k.element_size()
    return _token_major(k, n), _token_major(v, n), moved


def _token_major(pages: torch.Tensor, n: int) -> torch.Tensor:
    """[pages, Hkv, T, D] -> the first n tokens as [n, Hkv, D]."""
    p, h, t, d = pages.shape
    return pages.transpose(1, 2).reshape(p * t, h, d)[:n]


def _engine_part_on(host: _HostPlan, device) -> AttnPart:
    """The engine's (out, lse) on `device`, views of one copy of the flat host buffer."""
    far = host.far_host.to(device, non_blocking=True)
    n = host.out_host.numel()
    return AttnPart(far[:n].view(host.out_host.shape), far[n:].view(host.lse_host.shape))


def _fetch(buf: torch.Tensor, pages: torch.Tensor, device) -> torch.Tensor:
    """Pages of a host buffer on the device, one copy per run of consecutive page ids.

    Slices of the (pinned) arena go straight over PCIe; a fancy-index gather
    would first copy into pageable memory on the CPU.
    """
    ids = pages.tolist()
    out = torch.empty((len(ids),) + tuple(buf.shape[1:]), dtype=buf.dtype, device=device)
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            out[start:i].copy_(buf[ids[start]: ids[i - 1] + 1], non_blocking=True)
            start = i
    return out
