"""Triton kernels of `key_index`: approximate logits of every host token, on the GPU.

One program scores BLOCK host tokens of one (request, kv-head) for the kv-head's G
query heads, reading each token's compressed key once:
- `vq_scores`: the token's code per group indexes the query head's lookup table
  (q·C per group, [B, Hq, groups, entries], built by one small einsum per layer);
  the score is the sum over the groups;
- `scalar_scores`: the token's low-bit key is unpacked, scaled and dotted with q.
A token's place comes from the request's page table (host page = table[t // T],
offset t % T), the same layout as the host store's. Scores are scaled and soft-capped
as the exact logits are; positions past a request's host tokens are left as they were
(the caller fills -inf).

The torch code in `key_index` is the reference; `tests/test_cuda.py` compares them on
the GPU and `tests/test_hcattention.py` under Triton's CPU interpreter where Triton is
installed.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without Triton use the torch path
    triton = None

BLOCK = 64


def available(device: torch.device) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:
    @triton.jit
    def _tanh(x):
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _vq_kernel(lut_ptr, codes_ptr, table_ptr, ntok_ptr, out_ptr, table_stride, page_stride, head_stride,
                   out_stride_b, out_stride_h, n_out, scale, cap,
                   HQ: tl.constexpr, T: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, C: tl.constexpr,
                   BLOCK_T: tl.constexpr, HAS_CAP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.load(ntok_ptr + b)
        mask = t < n
        page = tl.load(table_ptr + b * table_stride + t // T, mask=mask, other=0).to(tl.int64)
        gi = tl.arange(0, NG)
        rows = codes_ptr + page * page_stride + h * head_stride + (t % T) * NG
        codes = tl.load(rows[:, None] + gi[None, :], mask=mask[:, None], other=0).to(tl.int32)  # never negative
        for g in tl.static_range(G):
            qh = h * G + g
            lut = lut_ptr + (b * HQ + qh).to(tl.int64) * (NG * C)
            s = tl.sum(tl.load(lut + gi[None, :] * C + codes, mask=mask[:, None], other=0.0), axis=1) * scale
            if HAS_CAP:
                s = cap * _tanh(s / cap)
            tl.store(out_ptr + b * out_stride_b + qh * out_stride_h + t, s, mask=mask & (t < n_out))

    @triton.jit
    def _scalar_kernel(q_ptr, codes_ptr, scales_ptr, table_ptr, ntok_ptr, out_ptr, table_stride, page_stride,
                       head_stride, spage_stride, shead_stride, out_stride_b, out_stride_h, n_out, scale, cap,
                       HQ: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                       QMAX: tl.constexpr, BLOCK_T: tl.constexpr, HAS_CAP: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        n = tl.load(ntok_ptr + b)
        mask = t < n
        page = tl.load(table_ptr + b * table_stride + t // T, mask=mask, other=0).to(tl.int64)
        per: tl.constexpr = 8 // BITS
        d = tl.arange(0, D)
        row = codes_ptr + page * page_stride + h * head_stride + (t % T) * (D // per)
        byte = tl.load(row[:, None] + (d // per)[None, :], mask=mask[:, None], other=0).to(tl.int32)
        val = (byte >> ((d % per) * BITS)[None, :]) & ((1 << BITS) - 1)
        ks = tl.load(scales_ptr + page * spage_stride + h * shead_stride + t % T, mask=mask, other=0.0).to(tl.float32)
        k = (val - QMAX).to(tl.float32) * ks[:, None]
        for g in tl.static_range(G):
            qh = h * G + g
            q = tl.load(q_ptr + (b * HQ + qh) * D + d)
            s = tl.sum(k * q[None, :], axis=1) * scale
            if HAS_CAP:
                s = cap * _tanh(s / cap)
            tl.store(out_ptr + b * out_stride_b + qh * out_stride_h + t, s, mask=mask & (t < n_out))


def vq_scores(lut: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, n_tokens: torch.Tensor,
              out: torch.Tensor, *, page_tokens: int, group: int, scale: float, soft_cap: float) -> None:
    """lut [B, Hq, groups, entries] f32; codes [pages, Hkv, T, groups] (one layer's, uint8/int16);
    table [B, P] int32 pages; n_tokens [B] int32; out [B, Hq, N] f32, written where t < n."""
    b, hq, ng, c = lut.shape
    hkv = codes.shape[1]
    grid = (b, hkv, triton.cdiv(out.shape[2], BLOCK))
    _vq_kernel[grid](lut.contiguous(), codes, table, n_tokens, out, table.stride(0), codes.stride(0),
                     codes.stride(1), out.stride(0), out.stride(1), out.shape[2], scale, soft_cap or 1.0,
                     HQ=hq, T=page_tokens, G=group, NG=ng, C=c, BLOCK_T=BLOCK, HAS_CAP=soft_cap > 0)


def scalar_scores(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                  n_tokens: torch.Tensor, out: torch.Tensor, *, page_tokens: int, group: int, bits: int,
                  scale: float, soft_cap: float) -> None:
    """q [B, Hq, D] f32; codes [pages, Hkv, T, D * bits / 8] uint8 and scales [pages, Hkv, T] (one
    layer's); table [B, P] int32; n_tokens [B] int32; out [B, Hq, N] f32, written where t < n."""
    b, hq, d = q.shape
    hkv = codes.shape[1]
    grid = (b, hkv, triton.cdiv(out.shape[2], BLOCK))
    _scalar_kernel[grid](q.contiguous(), codes, scales, table, n_tokens, out, table.stride(0), codes.stride(0),
                         codes.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
                         out.shape[2], scale, soft_cap or 1.0, HQ=hq, T=page_tokens, G=group, D=d, BITS=bits,
                         QMAX=2 ** (bits - 1) - 1, BLOCK_T=BLOCK, HAS_CAP=soft_cap > 0)
