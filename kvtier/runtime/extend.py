"""Prefill in chunks through the tier: the attention of one chunk of a prompt.

A request's earlier tokens are already split: pages that left the window are
in the host store, sinks and the recent window are on the device. A new chunk
of n tokens, appended to the device window by the caller, attends

- every host token, all of which precede the chunk, with keys and values
  dequantized from the store: exact, not sparse (prefill keeps full accuracy);
- the device tokens causally: query i sees the device tokens up to its own
  position (the chunk's tokens are the last n of the window);

and the two parts merge by log-sum-exp. Between chunks the caller evicts, so
the device never holds more than sinks + window + one chunk, however long the
prompt. `block_attention` is the reference routine, and the one that runs
everywhere: torch, float32, over blocks of keys merged by LSE, so memory stays
queries x heads x block. On CUDA with FlashInfer, `flash_attention` runs each
part with FlashInfer's single-request prefill kernel in the model's dtype; on
the CPU, `cpu_attention` runs it with torch's fused CPU attention kernel (the
one behind scaled_dot_product_attention, which also returns the LSE), in
float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from .merge import AttnPart, lse_from_base2, merge


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_offset: Optional[int],
                    sm_scale: float, soft_cap: float = 0.0, block: int = 2048) -> AttnPart:
    """q [L, Hq, D] against k, v [n, Hkv, D] (GQA: query head h reads kv-head h // (Hq / Hkv)).

    causal_offset None: every query sees every key. An int c: query i sees keys j <= c + i.
    Returns out [L, Hq, D] and natural-log lse [L, Hq] in float32 (out 0, lse -inf where a
    query sees no key).
    """
    L, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    if hq % hkv or tuple(k.shape[2:]) != (d,) or k.shape != v.shape:
        raise ValueError(f"block_attention: expected q [L, Hq, D] and k, v [n, Hkv, D] with Hkv dividing Hq, "
                         f"found q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    part = AttnPart(torch.zeros(L, hq, d, device=q.device), torch.full((L, hq), float("-inf"), device=q.device))
    qg = q.float().view(L, hkv, hq // hkv, d)
    rows = torch.arange(L, device=q.device)
    last = n if causal_offset is None else min(n, causal_offset + L)  # keys past this are seen by no query
    for j0 in range(0, last, block):
        j1 = min(last, j0 + block)
        kb, vb = k[j0:j1].float(), v[j0:j1].float()
        s = torch.einsum("lhgd,nhd->lhgn", qg, kb) * sm_scale
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        if causal_offset is not None:
            seen = torch.arange(j0, j1, device=q.device)[None, :] <= (causal_offset + rows)[:, None]
            s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
        out = torch.einsum("lhgn,nhd->lhgd", p, vb)
        part = merge(part, AttnPart(out.reshape(L, hq, d), lse.reshape(L, hq)))
    return part


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_offset: Optional[int],
                  sm_scale: float, soft_cap: float = 0.0) -> AttnPart:
    """`block_attention` through torch's fused CPU attention kernel, float32.

    Falls back to `block_attention` where that kernel cannot serve: a logit soft-cap, a tensor
    off the CPU, a torch without the kernel, no keys, query heads that are not a whole
    multiple of the kv-heads, or a query that sees no key.
    """
    L, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    if _CPU_FLASH is None or soft_cap or q.device.type != "cpu" or n == 0 or hq % hkv:
        return block_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale, soft_cap=soft_cap)
    if tuple(k.shape[2:]) != (d,) or k.shape != v.shape:
        raise ValueError(f"cpu_attention: expected q [L, Hq, D] and k, v [n, Hkv, D], found q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    g = hq // hkv
    qh = q.float().transpose(0, 1).contiguous()[None]  # [1, Hq, L, D]
    kh = k.float().transpose(0, 1).repeat_interleave(g, dim=0)[None]  # [1, Hq, n, D]: query head h reads h // g
    vh = v.float().transpose(0, 1).repeat_interleave(g, dim=0)[None]
    mask = None
    if causal_offset is not None:
        seen = torch.arange(n)[None, :] <= (causal_offset + torch.arange(L))[:, None]
        if not bool(seen.all()):
            mask = torch.zeros(L, n).masked_fill_(~seen, float("-inf"))[None, None]
        if not bool(seen.any(dim=1).all()):  # a query that sees no key: the reference's zeros and -inf
            return block_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale)
    out, lse = _CPU_FLASH(qh, kh, vh, 0.0, False, attn_mask=mask, scale=sm_scale)
    return AttnPart(out[0].transpose(0, 1), lse[0].transpose(0, 1))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_offset: Optional[int],
                    sm_scale: float, soft_cap: float = 0.0) -> AttnPart:
    """`block_attention` with FlashInfer's single-request prefill kernel (CUDA), in q's dtype.

    FlashInfer aligns a causal mask to the last query and the last key, so causal_offset
    must be None or len(k) - len(q) (the chunk is the newest of the keys).
    """
    import flashinfer

    L, n = q.shape[0], k.shape[0]
    if causal_offset is not None and causal_offset != n - L:
        raise ValueError(f"flash_attention: a causal part needs the chunk last (offset {n - L}), got {causal_offset}")
    if n == 0:
        return AttnPart(torch.zeros(q.shape, device=q.device), torch.full(q.shape[:2], float("-inf"), device=q.device))
    out, lse2 = flashinfer.single_prefill_with_kv_cache(
        q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(), causal=causal_offset is not None,
        kv_layout="NHD", sm_scale=sm_scale, logits_soft_cap=soft_cap or None, return_lse=True)
    return AttnPart(out.float(), lse_from_base2(lse2.float()))


__all__ = ["block_attention", "cpu_attention", "flash_attention"]
