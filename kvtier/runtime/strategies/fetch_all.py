"""The fetch-everything strategy (offload_all, FlexGen-like): every host token of the layer is
copied to the device each step and attended densely there.

Slices of the arena go straight over PCIe, one copy per run of consecutive pages; with a
page-locked store (`host_store.pinned`) they are DMA transfers.
"""

from __future__ import annotations

import torch

from ..merge import AttnPart
from ..window_attention import WindowPlan, empty_part, torch_window_attention
from .base import HostStrategy, register_strategy


@register_strategy
class FetchAll(HostStrategy):
    name = "fetch_all"
    copies_pages_to_device = True
    attends_every_host_token = True

    def read_bytes(self, layer: int, selection):
        """Every host token's key and value, read by the copies to the device."""
        tb = self.token_bytes()
        return float(sum(self.batch.host_tokens)) * self.ctx.shape.kv_heads * (tb.key + tb.value)

    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        ctx, batch = self.ctx, self.batch
        view = ctx.tier.store.view
        outs, lses = [], []
        for i in range(len(batch.rids)):
            n = int(batch.n_tokens[i])
            lo, hi = int(batch.page_offsets[i]), int(batch.page_offsets[i + 1])
            if n == 0:
                part = empty_part(1, q.shape[1], q.shape[2], q.device)
            else:
                pages = batch.page_table[lo:hi].long()
                k = fetch_pages(view.keys[layer], pages, q.device)  # [pages, Hkv, T, D]
                v = fetch_pages(view.buffers.values[layer], pages, q.device)
                ctx.tier.count_h2d(2 * k.numel() * k.element_size())
                k = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])[:n]
                v = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])[:n]
                slots = torch.arange(n, device=q.device)[None, :]
                plan = WindowPlan(slots, torch.tensor([n], device=q.device), None, None)
                part = torch_window_attention(q[i: i + 1], k, v, plan, sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)
            outs.append(part.out)
            lses.append(part.lse)
        return AttnPart(torch.cat(outs), torch.cat(lses))


def fetch_pages(buf: torch.Tensor, pages: torch.Tensor, device) -> torch.Tensor:
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
