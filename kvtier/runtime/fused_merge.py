"""The decode hot path's LSE merge as one CUDA kernel (Triton).

`merge.merge` is the reference: about fifteen small torch ops, each a kernel
launch plus dispatcher time on the host, paid per layer of every decode step.
Here the window's FlashInfer output (in the model's dtype, LSE in base 2) and
the engine's output (float32, natural-log LSE, just copied from the host) are
merged by one kernel that writes the model's dtype. Same arithmetic as the
reference, with the same convention for empty sides (LSE -inf, weight 0).

`available()` is False without CUDA or Triton; callers then use the reference.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

LN2 = math.log(2.0)


@lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_rows(oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, D, la_scale, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        la = tl.load(la_ptr + row).to(tl.float32) * la_scale
        lb = tl.load(lb_ptr + row).to(tl.float32)
        m = tl.maximum(la, lb)
        m = tl.where(m == float("-inf"), 0.0, m)  # both sides empty: weights 0, output 0
        wa = tl.exp(la - m)
        wb = tl.exp(lb - m)
        total = wa + wb
        total = tl.where(total == 0.0, 1.0, total)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        oa = tl.load(oa_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        ob = tl.load(ob_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        o = (wa * oa + wb * ob) / total
        tl.store(out_ptr + row * D + offs, o.to(out_ptr.dtype.element_ty), mask=mask)

    return merge_rows


def available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        _kernel()
    except Exception:  # no Triton, or one that cannot build for this device
        return False
    return True


def merge_into(out: torch.Tensor, a_out: torch.Tensor, a_lse: torch.Tensor, b_out: torch.Tensor,
               b_lse: torch.Tensor, *, a_lse_base2: bool, check: bool = True) -> torch.Tensor:
    """out[B, Hq, D] = merge of parts a and b (contiguous, same device); a_lse in base 2 if a_lse_base2.

    check=False skips the shape, layout and device checks: for a caller that made
    every tensor itself for this shape (the decode hot path, once per layer).
    """
    rows = out.shape[0] * out.shape[1]
    d = out.shape[2]
    for name, t, shape in (("a_out", a_out, out.shape), ("b_out", b_out, out.shape),
                           ("a_lse", a_lse, out.shape[:2]), ("b_lse", b_lse, out.shape[:2])) if check else ():
        if tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.device != out.device:
            raise ValueError(f"{name}: expected a contiguous tensor of shape {tuple(shape)} on {out.device}, found "
                             f"{tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")
    if rows:
        _kernel()[(rows,)](a_out, a_lse, b_out, b_lse, out, d, LN2 if a_lse_base2 else 1.0,
                           BLOCK_D=max(16, 1 << (d - 1).bit_length()))
    return out


__all__ = ["available", "merge_into"]
