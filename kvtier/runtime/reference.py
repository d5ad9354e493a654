"""Reference hybrid decode attention in torch, on any device.

Conventions shared with every fast path:
- LSE is in natural log: ``lse = log(sum_j exp(logit_j))`` over the attended
  tokens, with ``logit = soft_cap * tanh(s / soft_cap)`` when a soft-cap is
  set, else ``s``, where ``s = sm_scale * q.k``.
- An empty token set gives ``out = 0`` and ``lse = -inf``; the merge treats
  it as contributing nothing.
- GQA: query head ``h`` reads kv-head ``h // (num_q_heads // kv_heads)``.

Layouts (one decode step, batch of B requests of different lengths):
- ``q``: [B, Hq, D], float; one query token per request.
- ``k``, ``v``: [total_tokens, Hkv, D], the requests' tokens packed in order,
  request b owning rows ``kv_indptr[b]:kv_indptr[b+1]``.
- selections: [B, Hkv, K] int64 token positions within the request
  (0-based, into its host tokens' positions), -1 padded.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .merge import AttnPart, merge
from .split import TierSplit, split_window  # noqa: F401  (re-exported)


class HybridResult(NamedTuple):
    """The two parts of a hybrid decode and their merge."""

    out: torch.Tensor  # [B, Hq, D]
    lse: torch.Tensor  # [B, Hq], natural log
    device: AttnPart
    host: AttnPart


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indptr: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], found shape {tuple(q.shape)}")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"k and v must both be [total_tokens, kv_heads, head_dim], found {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"q, k, v must be floating point, found {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, d = q.shape
    if k.shape[2] != d:
        raise ValueError(f"k head_dim must equal q head_dim {d}, found {k.shape[2]}")
    if hq % k.shape[1]:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of kv_heads, found kv_heads={k.shape[1]}")
    if kv_indptr.dim() != 1 or kv_indptr.numel() != b + 1 or kv_indptr.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"kv_indptr must be an int32/int64 vector of batch+1={b + 1} offsets, found {kv_indptr.dtype} "
            f"shape {tuple(kv_indptr.shape)}"
        )
    if int(kv_indptr[0]) != 0 or int(kv_indptr[-1]) != k.shape[0] or bool((kv_indptr.diff() < 0).any()):
        raise ValueError(
            f"kv_indptr must rise from 0 to total_tokens={k.shape[0]}, found {kv_indptr.tolist()}"
        )


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indptr: torch.Tensor,
    mask: torch.Tensor,
    *,
    sm_scale: float,
    soft_cap: float = 0.0,
) -> AttnPart:
    """Attention of each request's query over the tokens `mask` admits.

    mask: [B, Hkv, N] bool, N = the longest request; position j of request b
    is its j-th token. Computed in the promoted dtype of q and k.
    """
    _check_inputs(q, k, v, kv_indptr)
    b, hq, d = q.shape
    hkv = k.shape[1]
    lengths = kv_indptr.diff().to(torch.long)
    n = int(lengths.max()) if b else 0
    if mask.shape != (b, hkv, n):
        raise ValueError(f"mask must be [batch, kv_heads, max_len] = {(b, hkv, n)}, found {tuple(mask.shape)}")
    dtype = torch.promote_types(q.dtype, k.dtype)
    pos = torch.arange(n, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # [B, N]
    rows = (kv_indptr[:-1, None].to(torch.long) + pos[None, :]).clamp(max=max(k.shape[0] - 1, 0))
    kp = k[rows].to(dtype)  # [B, N, Hkv, D]
    vp = v[rows].to(dtype)
    group = hq // hkv
    qg = q.to(dtype).view(b, hkv, group, d)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, kp) * sm_scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    keep = (mask & valid[:, None, :])[:, :, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G]
    p = torch.exp(s - lse[..., None].clamp(min=torch.finfo(dtype).min))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.einsum("bhgn,bnhd->bhgd", p, vp)
    return AttnPart(out.reshape(b, hq, d), lse.reshape(b, hq))


def dense_attention(q, k, v, kv_indptr, *, sm_scale: float, soft_cap: float = 0.0) -> AttnPart:
    """Full attention over every token of each request."""
    lengths = kv_indptr.diff()
    n = int(lengths.max()) if lengths.numel() else 0
    mask = torch.ones(q.shape[0], k.shape[1], n, dtype=torch.bool, device=q.device)
    return masked_attention(q, k, v, kv_indptr, mask, sm_scale=sm_scale, soft_cap=soft_cap)


def selection_mask(split: TierSplit, selection: torch.Tensor, kv_heads: int, max_len: int) -> torch.Tensor:
    """[B, Hkv, N] mask of the selected host tokens (positions outside the host part are refused)."""
    b = split.lengths.numel()
    if selection.dim() != 3 or selection.shape[:2] != (b, kv_heads) or selection.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"selection must be int [batch, kv_heads, K] = [{b}, {kv_heads}, K], found {selection.dtype} "
            f"{tuple(selection.shape)}"
        )
    sel = selection.to(torch.long)
    picked = sel >= 0
    lo = split.host_start[:, None, None]
    hi = split.host_end[:, None, None]
    outside = picked & ((sel < lo) | (sel >= hi))
    if bool(outside.any()):
        raise ValueError("selection must name host-resident token positions only, found positions outside [host_start, host_end)")
    mask = torch.zeros(b, kv_heads, max_len + 1, dtype=torch.bool, device=selection.device)
    mask.scatter_(2, torch.where(picked, sel, max_len), True)
    return mask[..., :max_len]


def hybrid_attention(
    q, k, v, kv_indptr, split: TierSplit, selection: Optional[torch.Tensor] = None, *,
    sm_scale: float, soft_cap: float = 0.0,
) -> HybridResult:
    """Window attention + host attention over `selection` (None = every host token), merged."""
    lengths = kv_indptr.diff()
    n = int(lengths.max()) if lengths.numel() else 0
    hkv = k.shape[1]
    device_mask = split.device_mask(n)[:, None, :].expand(-1, hkv, -1)
    host_mask = split.host_mask(n)[:, None, :].expand(-1, hkv, -1)
    if selection is not None:
        host_mask = host_mask & selection_mask(split, selection.to(q.device), hkv, n)
    dev = masked_attention(q, k, v, kv_indptr, device_mask, sm_scale=sm_scale, soft_cap=soft_cap)
    host = masked_attention(q, k, v, kv_indptr, host_mask, sm_scale=sm_scale, soft_cap=soft_cap)
    merged = merge(dev, host)
    return HybridResult(merged.out, merged.lse, dev, host)


__all__ = [
    "HybridResult", "dense_attention", "hybrid_attention", "masked_attention", "selection_mask", "split_window",
]
