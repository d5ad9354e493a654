"""Dense attention over each request's device window, with natural-log LSE.

Two implementations of one contract, chosen at plan time: FlashInfer's paged
decode wrapper on CUDA when it is installed, and a torch path everywhere else
(the same code runs on CPU machines). Both read the pool as
[n_slots, Hkv, D] per layer, i.e. pages of one token.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple, Optional, Sequence

import torch

from .merge import AttnPart, lse_from_base2


class WindowPlan(NamedTuple):
    slots: Optional[torch.Tensor]  # [B, W] long on the device, padded with 0 (None: not built, FlashInfer plans)
    lens: torch.Tensor  # [B] long on the device
    indptr: Optional[torch.Tensor]  # [B+1] int32, for FlashInfer
    indices: Optional[torch.Tensor]  # [sum lens] int32 slot ids, for FlashInfer
    pad: Optional[torch.Tensor] = None  # [B, W] bool on the device, True past each request's slots (None: from lens)


def plan_window(slot_lists: Sequence[Sequence[int]], device, *, padded: bool = True) -> WindowPlan:
    """Per request, its device slots (int64 arrays from the tier, or any int sequences).

    Once per batch: the slots are concatenated as bytes (no Python int per slot) and moved
    to the device once. padded: also build the [B, W] slot matrix and its padding mask,
    which the torch path reads at every layer (FlashInfer reads indptr and indices only).
    """
    flat_ids = array("q")
    lens_list = []
    for s in slot_lists:
        flat_ids += s if isinstance(s, array) and s.typecode == "q" else array("q", s)
        lens_list.append(len(s))
    flat = torch.frombuffer(flat_ids, dtype=torch.int64) if flat_ids else torch.zeros(0, dtype=torch.long)
    lens = torch.tensor(lens_list, dtype=torch.long)
    indptr = torch.zeros(len(lens_list) + 1, dtype=torch.int32)
    indptr[1:] = lens.cumsum(0)
    slots = pad = None
    if padded:
        width = max(max(lens_list, default=0), 1)
        pad = torch.arange(width)[None, :] >= lens[:, None]
        slots = torch.zeros(len(lens_list), width, dtype=torch.long)
        slots[~pad] = flat
        slots, pad = slots.to(device), pad.to(device)
    return WindowPlan(slots, lens.to(device), indptr.to(device), flat.to(torch.int32).to(device), pad)


def torch_window_attention(q, k_layer, v_layer, plan: WindowPlan, *, sm_scale: float, soft_cap: float = 0.0) -> AttnPart:
    """q [B, Hq, D]; k_layer, v_layer [n_slots, Hkv, D]; fp32 math, fp32 result."""
    b, hq, d = q.shape
    hkv = k_layer.shape[1]
    kp = k_layer[plan.slots].float()  # [B, W, Hkv, D]
    vp = v_layer[plan.slots].float()
    qg = q.float().view(b, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,bwhd->bhgw", qg, kp) * sm_scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    pad = plan.pad
    if pad is None:
        pad = torch.arange(plan.slots.shape[1], device=q.device)[None, :] >= plan.lens[:, None]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    out = torch.einsum("bhgw,bwhd->bhgd", p, vp)
    return AttnPart(out.reshape(b, hq, d), lse.reshape(b, hq))


class FlashInferWindow:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper over one-token pages.

    FlashInfer's decode kernels take GQA groups of 1, 2, 3, 4 or 8 query heads
    per kv-head; other groups (Qwen2.5-0.5B has 7) run its tensor-core path,
    which takes any group, as sglang's own FlashInfer backend does.
    """

    DECODE_GROUPS = (1, 2, 3, 4, 8)

    def __init__(self, device, workspace_bytes: int = 128 << 20):
        import flashinfer  # noqa: F401  (ImportError tells the caller to use the torch path)

        self._flashinfer = flashinfer
        self._ws = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrappers = {}
        self.wrapper = None

    def plan(self, plan: WindowPlan, num_q_heads: int, kv_heads: int, head_dim: int, dtype, *,
             sm_scale: float, soft_cap: float = 0.0) -> None:
        tensor_cores = num_q_heads // kv_heads not in self.DECODE_GROUPS
        if tensor_cores not in self._wrappers:
            self._wrappers[tensor_cores] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._ws, "NHD", use_tensor_cores=tensor_cores)
        self.wrapper = self._wrappers[tensor_cores]
        last = torch.ones(plan.lens.numel(), dtype=torch.int32, device=plan.indptr.device)
        self.wrapper.plan(
            plan.indptr, plan.indices, last, num_q_heads, kv_heads, head_dim, 1,
            q_data_type=dtype, kv_data_type=dtype, sm_scale=sm_scale,
            logits_soft_cap=soft_cap or None,
        )

    def run(self, q, k_layer, v_layer) -> AttnPart:
        out, lse2 = self.run_raw(q, k_layer, v_layer)
        return AttnPart(out.float(), lse_from_base2(lse2.float()))

    def run_raw(self, q, k_layer, v_layer):
        """(out in q's dtype, LSE in base 2): FlashInfer's own outputs, for the fused merge."""
        hkv, d = k_layer.shape[1], k_layer.shape[2]
        cache = (k_layer.view(-1, 1, hkv, d), v_layer.view(-1, 1, hkv, d))
        return self.wrapper.run(q, cache, return_lse=True)


def flashinfer_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


def empty_part(b: int, hq: int, d: int, device) -> AttnPart:
    return AttnPart(torch.zeros(b, hq, d, device=device), torch.full((b, hq), float("-inf"), device=device))


__all__ = ["FlashInferWindow", "WindowPlan", "empty_part", "flashinfer_available", "plan_window",
           "torch_window_attention"]
