"""Synthetic decode inputs whose attention is peaked, like a trained model's.

Random Gaussian q and k give nearly uniform attention over long contexts,
where no sparse method can work and none is needed. Real heads concentrate
their mass on a few salient tokens. Here each (request, kv-head) gets a
shared query direction; a small fraction of its tokens carry a component
along it, so they dominate the softmax while the rest stay noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DecodeInputs(NamedTuple):
    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [total, Hkv, D]
    v: torch.Tensor  # [total, Hkv, D]
    kv_indptr: torch.Tensor  # [B+1] int64


def peaked_decode_inputs(
    lengths: "list[int]", num_q_heads: int, kv_heads: int, head_dim: int, *,
    salient_fraction: float = 0.01, salient_logit: float = 8.0, seed: int = 0, dtype=torch.float32,
) -> DecodeInputs:
    """One decode step's q and the packed KV of requests of `lengths` tokens."""
    gen = torch.Generator().manual_seed(seed)
    b, group = len(lengths), num_q_heads // kv_heads
    indptr = torch.zeros(b + 1, dtype=torch.long)
    indptr[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    total = int(indptr[-1])
    direction = torch.nn.functional.normalize(torch.randn(b, kv_heads, head_dim, generator=gen), dim=-1)
    q = direction[:, :, None, :] * head_dim ** 0.5 + 0.5 * torch.randn(b, kv_heads, group, head_dim, generator=gen)
    k = torch.randn(total, kv_heads, head_dim, generator=gen)
    v = torch.randn(total, kv_heads, head_dim, generator=gen)
    owner = torch.repeat_interleave(torch.arange(b), torch.tensor(lengths))
    salient = torch.rand(total, kv_heads, generator=gen) < salient_fraction
    # q.k / sqrt(d) gains about `salient_logit` on a salient token.
    boost = salient[..., None] * direction[owner] * salient_logit
    k = k + boost
    return DecodeInputs(q.reshape(b, num_q_heads, head_dim).to(dtype), k.to(dtype), v.to(dtype), indptr)
