"""SparDA-style lookahead prefetch: a device cache of host blocks chosen a step ahead, attended on
the GPU (the `forecast_prefetch` host strategy)."""

from __future__ import annotations

from typing import List

from ..config import AllBudget, budget_tokens
from .base import Policy, register


@register
class Sparda(Policy):
    name = "sparda"
    strategy = "forecast_prefetch"
    # With budget all every block is selected; the default correction (cpu) attends the ones the
    # cache misses, so every step is exact. Without a correction (SparDA's own) a block is missed
    # at the step it first appears.

    def block_budget(self, host_tokens: List[int], context_tokens: List[int]) -> int:
        """Blocks each (request, kv-head) attends: the budget in tokens over the block size."""
        bt = self.config.sparda.block_tokens
        if isinstance(self.config.budget, AllBudget):
            return max(1, -(-max(host_tokens) // bt))
        tokens = max(budget_tokens(self.config.budget, host_tokens=h, context_tokens=c)
                     for h, c in zip(host_tokens, context_tokens))
        return max(1, tokens // bt)
