"""Fluxion: heads classified by their attention statistics; each class attends blocks of its own size
under its own budget, trimmed to the smallest that keeps the estimated output change under epsilon;
a layer's blocks are shared by the CPU engine and the GPU (the `split` host strategy).

This class holds the decisions that need no tensors: which class a head's statistics fall in,
which class a head uses while it is still being observed, and the per-head caps of a layer.
"""

from __future__ import annotations

from typing import List, Sequence

from ..config import AllBudget, budget_tokens
from .base import Policy, register


@register
class Fluxion(Policy):
    name = "fluxion"
    strategy = "split"

    @property
    def knobs(self):
        return self.config.fluxion

    @property
    def attends_everything(self) -> bool:
        """Budget all: every block of every head, no output-aware trimming (the reference)."""
        return isinstance(self.config.budget, AllBudget)

    @property
    def epsilon(self) -> float:
        return self.knobs.output_epsilon

    @property
    def class_names(self) -> List[str]:
        return [c.name for c in self.knobs.head_classes]

    def block_tokens(self, cls: int) -> int:
        return self.knobs.head_classes[cls].block_tokens

    def classify(self, window_mass: float, far_entropy: float) -> int:
        """The class (index into fluxion.head_classes) of a head with these statistics."""
        return self.knobs.classify(window_mass, far_entropy)

    @property
    def calibrating_class(self) -> int:
        """The class a head attends with before it is classified: the one of the largest budget."""
        budgets = [c.budget_tokens for c in self.knobs.head_classes]
        return budgets.index(max(budgets))

    def head_caps(self, classes: Sequence[int], host_tokens: int, context_tokens: int) -> List[int]:
        """Token caps of one request's kv-heads at one layer, given their classes.

        The classes' budget_tokens are scaled by one factor (they keep their ratio) so that the
        caps' mean over the layer's kv-heads is the budget section's cap for this request:
        up or down with `class_budgets: share`, only down with `cap` (each head's cap is then
        its class's budget_tokens where their mean is within the budget). A head is never
        below one block of its class (the others then share what is left), and no cap goes
        past the request's host tokens. Budget all: every host token.
        """
        if self.attends_everything:
            return [max(host_tokens, 1)] * len(classes)
        total = budget_tokens(self.config.budget, host_tokens=host_tokens, context_tokens=context_tokens) * len(classes)
        own = [self.knobs.head_classes[c].budget_tokens for c in classes]
        floor = [self.block_tokens(c) for c in classes]
        ceiling = max(host_tokens, 1)
        if sum(own) <= total:
            if self.knobs.class_budgets == "cap":
                return [min(b, ceiling) for b in own]
            scale = total / max(sum(own), 1)
            return [min(max(f, int(b * scale)), ceiling) for b, f in zip(own, floor)]
        # scale the heads above their one-block floor so that the sum meets the total
        fixed = [False] * len(own)
        while True:
            free = total - sum(f for f, x in zip(floor, fixed) if x)
            scale = max(free, 0) / max(sum(b for b, x in zip(own, fixed) if not x), 1)
            caps = [f if x else max(f, int(b * scale)) for b, f, x in zip(own, floor, fixed)]
            newly = [not x and int(b * scale) < f for b, f, x in zip(own, floor, fixed)]
            if not any(newly):
                return [min(c, ceiling) for c in caps]
            fixed = [x or y for x, y in zip(fixed, newly)]
