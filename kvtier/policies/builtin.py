"""The policies with a runtime: HGCA, the Quest baseline, dense, offload_all, window-only."""

from __future__ import annotations

from typing import List

from .base import EngineArgs, Policy, register


@register
class Hgca(Policy):
    """Per-head fine-grained top-k (or mass threshold with a cap) on the CPU."""

    name = "hgca"

    @property
    def overlap(self) -> bool:
        return self.config.hgca.overlap

    def engine_args(self, host_tokens: List[int], context_tokens: List[int], kv_heads: int) -> EngineArgs:
        base = super().engine_args(host_tokens, context_tokens, kv_heads)
        knobs = self.config.hgca
        prefilter = knobs.prefilter if knobs.prefilter is not None and base.mode != "all" else 0.0
        return base._replace(group_reduce=knobs.group_reduce.value, prefilter=prefilter,
                             residual=knobs.residual and base.mode != "all")


@register
class Quest(Policy):
    """Top blocks by key min/max upper bound (scored on the CPU from page summaries)."""

    name = "quest"

    def engine_args(self, host_tokens: List[int], context_tokens: List[int], kv_heads: int) -> EngineArgs:
        budgets = self.token_budgets(host_tokens, context_tokens, kv_heads)
        blocks = [self.config.quest.block_tokens] * kv_heads
        return EngineArgs("blocks", "max", budgets, blocks, 1.0)


@register
class Dense(Policy):
    """Everything on the device; the tier is off."""

    name = "dense"
    offloads = False
    strategy = "window_only"


@register
class OffloadAll(Policy):
    """Everything past the window on the host, fetched to the device each step."""

    name = "offload_all"
    strategy = "fetch_all"


@register
class WindowOnly(Policy):
    """StreamingLLM-style baseline: sinks + recent window; evicted tokens are never attended."""

    name = "window_only"
    strategy = "window_only"
    exact_with_all_budget = False
