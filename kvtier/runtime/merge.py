"""The log-sum-exp merge of partial attention results.

Softmax attention over disjoint token sets A and B is exact when each side
returns its normalised output and natural-log LSE:

    l = logaddexp(l_a, l_b);  o = exp(l_a - l) * o_a + exp(l_b - l) * o_b

A side with no tokens carries lse = -inf and contributes nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG2E = 1.0 / math.log(2.0)


class AttnPart(NamedTuple):
    """Partial attention over one token set."""

    out: torch.Tensor  # [B, Hq, D], normalised over the set
    lse: torch.Tensor  # [B, Hq], natural log; -inf for an empty set


def merge(a: AttnPart, b: AttnPart) -> AttnPart:
    """Fuse two partial results over disjoint token sets (float32 or wider)."""
    if a.out.shape != b.out.shape or a.lse.shape != b.lse.shape or a.lse.shape != a.out.shape[:2]:
        raise ValueError(
            f"parts must be out [B, Hq, D] and lse [B, Hq] of equal shapes, found out {tuple(a.out.shape)} / "
            f"{tuple(b.out.shape)} and lse {tuple(a.lse.shape)} / {tuple(b.lse.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(a.out.dtype, b.out.dtype), torch.float32)
    la, lb = a.lse.to(dtype), b.lse.to(b.out.device).to(dtype)
    lse = torch.logaddexp(la, lb)
    # Both empty: lse stays -inf and both weights would be nan; make them 0.
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(la - safe), torch.zeros_like(lse))
    wb = torch.where(finite, torch.exp(lb - safe), torch.zeros_like(lse))
    out = wa[..., None] * a.out.to(dtype) + wb[..., None] * b.out.to(b.out.device).to(dtype)
    return AttnPart(out, lse)


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """FlashInfer reports LSE in base 2; kvtier's convention is natural log."""
    return lse2 / LOG2E
