"""Hybrid decode attention, plan/run: the device window, the host strategy's part, the LSE merge.

`plan(rids)` runs once per batch on the host: the window's slot lists (and FlashInfer's
plan), the batch's host page tables, and the host strategy's own plan. `run(q, layer)`
runs once per layer: it hands q to the strategy (`submit`), queues the window's
attention, takes the strategy's part (`collect`) and merges on the device, in one
kernel where FlashInfer's window and Triton are there. A request with nothing on the
host has lse = -inf on that side, which the merge ignores.

Which strategy answers the host part is the policy's choice (`Policy.strategy`,
`kvtier.runtime.strategies`); nothing here depends on which one it is.

A caller that sees the model's hidden states (built with `forecasts=True`: the evaluation's
transformers model) may hand a layer's forecast query before that layer runs,
`forecast(q, layer)`, where the strategy `takes_forecasts` (sparda's `next_query`).

On the CPU, a strategy that runs its host part beside the window
(`HostStrategy.runs_beside_window`) shares the cores with torch: while it runs, the
window's torch ops use `core_split.window` threads (the cores the engine leaves), and
torch's own count everywhere else (the merge, the model around the attention).
"""

from __future__ import annotations

import time
from array import array
from typing import Hashable, List, NamedTuple, Optional, Type

import torch

from ..._native import Engine
from ...config import ModelShape
from ...policies import Policy
from .. import fused_merge
from ..merge import AttnPart, merge
from ..pipeline import pipeline_setting
from ..ranks import CoreSplit, torch_threads
from ..strategies import HostBatch, HostStrategy, StrategyContext, strategy_class
from ..tier import TierManager
from ..window_attention import (
    FlashInferWindow, WindowPlan, empty_part, flashinfer_available, plan_window, torch_window_attention,
)
from .extend import ExtendAttention
from .timing import StepTimes, WindowTimer, span


class HybridDetail(NamedTuple):
    """One layer's decode attention with its parts kept (diagnostics, evaluation)."""

    out: torch.Tensor  # [B, Hq, D] f32, equals run()'s output before the cast
    lse: torch.Tensor  # [B, Hq] f32, natural log, over device and attended host tokens
    device: AttnPart
    host: Optional[AttnPart]  # None when nothing is attended on the host
    selection: Optional[torch.Tensor]  # [B, Hq, cap] int32 host-token indices, -1 padded (when the strategy selects)


def pipeline_possible(policy: Policy, device: torch.device, default: bool = True) -> bool:
    """Whether HybridAttention(pipeline_default=default) would pipeline this policy on this device."""
    return strategy_class(policy.strategy).pipelines(policy, device, default)


class HybridAttention:
    """Decode attention through the tier for one batch at a time (and prefill chunks, `plan_extend`)."""

    def __init__(self, policy: Policy, shape: ModelShape, tier: TierManager, *, engine: Optional[Engine],
                 sm_scale: float, soft_cap: float = 0.0, use_flashinfer: Optional[bool] = None,
                 pipeline_default: bool = True, strategy: Optional[Type[HostStrategy]] = None,
                 core_split: Optional[CoreSplit] = None, forecasts: bool = False):
        """pipeline_default: whether a strategy that can pipeline does so when $KVTIER_PIPELINE is
        unset (the variable wins). strategy: the host strategy class (default: the policy's).
        core_split: the cores of the engine and of the window's torch ops (`ranks.core_split`;
        None: torch's own count, as when nothing runs beside the window). forecasts: the caller
        hands forecast queries (`forecast`); a strategy that needs them refuses to be built without."""
        want_pipe = pipeline_setting(pipeline_default)  # a bad setting fails before anything starts
        self.policy, self.shape, self.tier, self.engine = policy, shape, tier, engine
        self.sm_scale, self.soft_cap = sm_scale, soft_cap
        self.device = tier.device
        want_fi = flashinfer_available(self.device) if use_flashinfer is None else use_flashinfer
        self.flashinfer = FlashInferWindow(self.device) if want_fi else None
        # FlashInfer's window and the host part merge in one kernel when Triton is there.
        self.fused = self.flashinfer is not None and fused_merge.available(self.device)
        cls = strategy_class(policy.strategy) if strategy is None else strategy
        self.host: HostStrategy = cls(StrategyContext(policy, shape, tier, engine, sm_scale, soft_cap, self.device,
                                                      pipeline=self.fused and want_pipe, forecasts=forecasts))
        if self.host.reads_in_background:
            tier.host_readers.append(self.host.stop)
        self.extend = ExtendAttention(shape, tier, attends_host=cls.attends_host, sm_scale=sm_scale,
                                      soft_cap=soft_cap, flash=self.flashinfer is not None)
        self.core_split = core_split or CoreSplit(0, 0 if engine is None else engine.n_threads, 0)
        # torch threads for the window while the host part runs beside it (0: leave torch's count)
        self._beside_threads = self.core_split.window if cls.runs_beside_window(policy, self.device) else 0
        self._timer = WindowTimer()
        self._rids: List[Hashable] = []
        self._window: Optional[WindowPlan] = None
        self._host_planned = False
        self._window_empty = True
        self._wall_s = 0.0

    @property
    def pipelined(self) -> bool:
        """Whether the host strategy hands its part to a loop fed by the GPU stream."""
        return self.host.pipelined

    @property
    def overlap(self) -> bool:
        return self.policy.overlap

    @property
    def takes_forecasts(self) -> bool:
        """Whether the host strategy uses forecast queries (`forecast`); compute them only then."""
        return self.host.takes_forecasts

    # --- plan ---------------------------------------------------------------

    def plan(self, rids: List[Hashable]) -> None:
        with span("plan"):
            self._plan(rids)

    def _plan(self, rids: List[Hashable]) -> None:
        tier, shape = self.tier, self.shape
        self.host.stop()
        tier.settle()
        self._rids = list(rids)
        self._timer.fold()
        if tier.offload:
            self.host.prepare(self._rids)
        slot_lists = [tier.device_slots(r) for r in rids]
        self._window_empty = not any(slot_lists)  # decided here: no per-layer device sync
        # FlashInfer reads the slots as indptr + indices; only the torch path reads a padded matrix
        self._window = plan_window(slot_lists, self.device, padded=self.flashinfer is None)
        if self.flashinfer is not None:
            self.flashinfer.plan(self._window, shape.num_q_heads, shape.kv_heads, shape.head_dim,
                                 tier.k_pool[0].dtype, sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        host = [tier.host_tokens(r) for r in rids]
        self._host_planned = tier.offload and self.host.attends_host and any(host)
        if self._host_planned:
            self.host.plan(self._host_batch(rids, host))

    def _host_batch(self, rids: List[Hashable], host: List[int]) -> HostBatch:
        """The batch's host page tables, concatenated from the store's int32 tables (a copy of their
        bytes, no Python int per page)."""
        tier, T = self.tier, self.tier.config.window.page_tokens
        flat, counts = array("i"), []
        for r, h in zip(rids, host):
            n = -(-h // T) if h else 0
            if n:
                flat += tier.store.table(r).ids[:n]
            counts.append(n)
        offsets = torch.zeros(len(rids) + 1, dtype=torch.int32)
        offsets[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
        page_table = torch.frombuffer(flat, dtype=torch.int32) if flat else torch.zeros(1, dtype=torch.int32)
        return HostBatch(list(rids), host, [tier.requests[r].length for r in rids], page_table, offsets,
                         torch.tensor(host, dtype=torch.int32), self._window_empty)

    # --- run ----------------------------------------------------------------

    def run(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """q [B, Hq, D] on the device -> attention output [B, Hq, D] in q's dtype."""
        self._check_q(q, "run")
        t0 = time.perf_counter()
        host = self.host if self._host_planned else None
        if host is not None:
            with span("host_submit"):
                host.submit(q, layer)
        fused = self.fused and not self._window_empty
        with span("window"):
            self._timer.start(q.device.type == "cuda")
            if fused:
                win_out, win_lse2 = self.flashinfer.run_raw(q, self.tier.k_pool[layer], self.tier.v_pool[layer])
            else:
                with torch_threads(self._beside_threads if host is not None else 0):
                    dev = self._window_part(q, layer)
            self._timer.end()
        if host is not None:
            with span("host_collect"):
                far = host.collect(q, layer)
        else:
            far = None
        with span("merge"):
            if fused:
                out = win_out
                if far is not None:
                    # shapes and devices are this plan's (checked above); no second check per layer
                    out = fused_merge.merge_into(torch.empty(q.shape, dtype=q.dtype, device=q.device), win_out,
                                                 win_lse2, far.out, far.lse, a_lse_base2=True, check=False)
            else:
                out = (dev if far is None else merge(dev, far)).out.to(q.dtype)
        self._wall_s += time.perf_counter() - t0
        return out

    def forecast(self, q: torch.Tensor, layer: int) -> None:
        """q [B, Hq, D] on the device, after RoPE: a forecast of layer's query for this plan, handed
        before `run(q, layer)` (while an earlier layer runs). The strategy may start fetching for it."""
        if not self.host.takes_forecasts:
            raise ValueError(f"forecast: host strategy '{self.host.name}' (policy '{self.policy.name}') takes no "
                             "forecast queries; expected a caller that checks takes_forecasts")
        self._check_q(q, "forecast")
        if not 0 <= layer < self.shape.n_layers:
            raise ValueError(f"forecast: expected a layer in [0, {self.shape.n_layers}), found {layer}")
        if self._host_planned:
            with span("host_forecast"):
                self.host.forecast(q, layer)

    def run_detail(self, q: torch.Tensor, layer: int) -> HybridDetail:
        """run() without overlap, keeping both parts, the merged LSE and the strategy's selection."""
        self._check_q(q, "run_detail")
        dev = self._window_part(q, layer)
        if not self._host_planned:
            return HybridDetail(dev.out, dev.lse, dev, None, None)
        far, selection = self.host.detail(q, layer)
        part = merge(dev, far)
        return HybridDetail(part.out, part.lse, dev, far, selection)

    def _check_q(self, q: torch.Tensor, fn: str) -> None:
        if self._window is None:
            raise RuntimeError(f"HybridAttention.{fn} before plan()")
        b, hq, d = len(self._rids), self.shape.num_q_heads, self.shape.head_dim
        if tuple(q.shape) != (b, hq, d):
            raise ValueError(f"q must be [batch, num_q_heads, head_dim] = {(b, hq, d)}, found {tuple(q.shape)}")

    def _window_part(self, q: torch.Tensor, layer: int) -> AttnPart:
        k, v = self.tier.k_pool[layer], self.tier.v_pool[layer]
        if self._window_empty:
            return empty_part(q.shape[0], q.shape[1], q.shape[2], q.device)
        if self.flashinfer is not None:
            return self.flashinfer.run(q, k, v)
        return torch_window_attention(q, k, v, self._window, sm_scale=self.sm_scale, soft_cap=self.soft_cap)

    # --- prefill chunks -----------------------------------------------------

    def plan_extend(self, rids: List[Hashable], new_tokens: List[int]) -> None:
        """Plan a prefill chunk (`ExtendAttention.plan`)."""
        self.host.stop()
        self.tier.settle()
        self.extend.plan(rids, new_tokens)

    def run_extend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        return self.extend.run(q, layer)

    def warm_extend(self, dtype: torch.dtype) -> float:
        return self.extend.warm(dtype)

    @property
    def extend_flash(self) -> bool:
        return self.extend.flash

    @extend_flash.setter
    def extend_flash(self, value: bool) -> None:
        self.extend.flash = value

    @property
    def extend_raw(self) -> bool:
        return self.extend.raw

    @extend_raw.setter
    def extend_raw(self, value: bool) -> None:
        self.extend.raw = value

    # --- stats and lifecycle ------------------------------------------------

    def stop_serving(self) -> None:
        """End anything of the host strategy still reading the host store (raising its error)."""
        self.host.stop()

    def take_times(self) -> StepTimes:
        cpu = self.host.take_cpu_s()
        t = StepTimes(cpu, self._timer.take(), self._wall_s)
        self._wall_s = 0.0
        return t

    def close(self) -> None:
        self.host.close()
