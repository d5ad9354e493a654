"""Attention fidelity of one decode step, per layer, against full attention on the same inputs.

For one request in one tier, at one layer: the tier's hybrid output (device
window merged with the attended host tokens) is compared with dense
attention over every token of the context with the same q:

- relative output error ``||o - o_full|| / ||o_full||`` over all query heads;
- LSE error: mean ``|lse - lse_full|`` (natural log) over query heads; the
  tier's LSE is always <= the full one (it sums over a subset);
- top-k recall: the share of each query head's true top-k tokens (exact
  logits over the whole context) that the tier attends (device tokens plus
  the engine's selection), averaged over query heads;
- host fraction: host tokens attended per query head over the context length.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..runtime import dense_attention
from ..runtime.hybrid import HybridDetail
from ..runtime.tier import TierManager

TOP_K = 32


class LayerFidelity(NamedTuple):
    rel_err: float
    lse_err: float
    topk_recall: float
    host_frac: float


def attended_mask(tier: TierManager, rid, detail: HybridDetail, n: int, num_q_heads: int) -> torch.Tensor:
    """[Hq, n] bool: which of the request's n tokens the tier attended for each query head."""
    st = tier.requests[rid]
    if st.length != n:
        raise ValueError(f"attended_mask: expected the request's length {st.length}, found n={n}")
    mask = torch.zeros(num_q_heads, n, dtype=torch.bool)
    if not tier.offload:
        mask[:] = True
        return mask
    mask[:, : len(st.sink_slots)] = True
    mask[:, st.host_end:] = True  # recent tokens (pages in flight are still attended on the device)
    if detail.selection is not None:
        table, T = tier.store.table(rid), tier.config.window.page_tokens
        starts = torch.tensor(table.starts or [table.first_pos], dtype=torch.long)
        sel = detail.selection[0].long().cpu()  # [Hq, cap]
        picked = sel >= 0
        safe = torch.where(picked, sel, torch.zeros_like(sel))
        pos = torch.where(picked, starts[safe // T] + safe % T, torch.zeros_like(sel))
        mask.scatter_(1, pos, picked | mask.gather(1, pos))
    return mask


def layer_fidelity(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, detail: HybridDetail,
                   attended: torch.Tensor, *, sm_scale: float, top_k: int = TOP_K) -> LayerFidelity:
    """q [1, Hq, D]; k_full, v_full [n, Hkv, D], every token of the request; attended [Hq, n] bool.

    Measured in float64 on the CPU, wherever the inputs live.
    """
    q, k_full, v_full, attended = q.cpu(), k_full.cpu(), v_full.cpu(), attended.cpu()
    n, hkv, d = k_full.shape
    hq = q.shape[1]
    if attended.shape != (hq, n):
        raise ValueError(f"attended must be [num_q_heads, n] = {(hq, n)}, found {tuple(attended.shape)}")
    indptr = torch.tensor([0, n])
    full = dense_attention(q.double(), k_full.double(), v_full.double(), indptr, sm_scale=sm_scale)
    out = detail.out.double().cpu()
    rel = float((out - full.out).norm() / full.out.norm().clamp(min=1e-30))
    lse = float((detail.lse.double().cpu() - full.lse).abs().mean())
    group = hq // hkv
    logits = torch.einsum("hd,nhd->hn", q[0].double(), k_full.double().repeat_interleave(group, dim=1))
    kk = min(top_k, n)
    top = logits.topk(kk, dim=-1).indices  # [Hq, kk]
    recall = float(attended.gather(1, top).float().mean())
    host_sel = 0.0
    if detail.selection is not None:
        host_sel = float((detail.selection[0] >= 0).sum(-1).float().mean()) / n
    return LayerFidelity(rel, lse, recall, host_sel)


__all__ = ["LayerFidelity", "TOP_K", "attended_mask", "layer_fidelity"]
