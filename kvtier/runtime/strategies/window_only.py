"""The attend-nothing strategy (window_only, the StreamingLLM-style baseline): evicted tokens
exist on the host but are never attended, so a batch's host part is always empty."""

from __future__ import annotations

import torch

from ..merge import AttnPart
from ..window_attention import empty_part
from .base import HostStrategy, register_strategy


@register_strategy
class WindowOnly(HostStrategy):
    name = "window_only"
    attends_host = False

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        return empty_part(q.shape[0], q.shape[1], q.shape[2], q.device)
