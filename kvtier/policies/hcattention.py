"""HCAttention: compressed keys on the device select each query head's host tokens; the host
store's values answer (the `gpu_select` host strategy)."""

from __future__ import annotations

from typing import List

from ..config import AllBudget, MassBudget, budget_tokens
from .base import Policy, register


@register
class Hcattention(Policy):
    name = "hcattention"
    strategy = "gpu_select"

    def selection_caps(self, host_tokens: List[int], context_tokens: List[int]) -> List[int]:
        """Per request: how many host tokens each query head may keep (all of them for budget all)."""
        return [budget_tokens(self.config.budget, host_tokens=h, context_tokens=c)
                for h, c in zip(host_tokens, context_tokens)]

    @property
    def attends_everything(self) -> bool:
        return isinstance(self.config.budget, AllBudget)

    @property
    def mass_threshold(self) -> float:
        """The mass the selection stops at (inf: no mass cut, the top tokens up to the cap)."""
        budget = self.config.budget
        return budget.threshold if isinstance(budget, MassBudget) else float("inf")
