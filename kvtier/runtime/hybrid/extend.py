"""A prefill chunk's attention through the tier (sglang's stage 3, `kvtier bench prefill`).

`plan(rids, new_tokens)`: request rids[i]'s last new_tokens[i] tokens, already extended
(`TierManager.extend`) and written to the pool, attend everything before them. The host
part is attended exactly (every token, dequantized from the store) whatever the policy's
decode selection, except under a strategy that never attends the host (window only); the
device part causally.
"""

from __future__ import annotations

import logging
import time
from typing import Hashable, List, NamedTuple, Optional

import torch

from ..._native import dequant_raw_keys, dequant_raw_values
from ...config import ModelShape
from ..extend import cpu_attention, flash_attention
from ..merge import merge
from ..tier import TierManager, slot_tensor

log = logging.getLogger("kvtier")
HOST_TOKENS_AT_ONCE = 4096  # host tokens dequantized at a time by run()


class _ExtendRow(NamedTuple):
    slots: torch.Tensor  # [W] long on the device: sinks, then the recent window ending with the chunk
    n_new: int  # the chunk's tokens (the last n_new slots)
    pages: torch.Tensor  # int32 host pages holding the request's host tokens, in order
    n_host: int


class ExtendAttention:
    """Prefill chunks over the tier: plan once per chunk batch, run once per layer."""

    def __init__(self, shape: ModelShape, tier: TierManager, *, attends_host: bool, sm_scale: float,
                 soft_cap: float, flash: bool):
        self.shape, self.tier, self.attends_host = shape, tier, attends_host
        self.sm_scale, self.soft_cap = sm_scale, soft_cap
        self._rows: Optional[List[_ExtendRow]] = None
        # host pages are read as stored bytes dequantized where they land (False: the C store
        # dequantizes to float32 on the CPU first, the reference path)
        self.raw = True
        # the chunk's attention: FlashInfer's prefill kernel where the window uses FlashInfer,
        # else torch's fused CPU kernel on the CPU (cpu_attention), torch float32 blocks elsewhere
        # (block_attention, the reference)
        self.flash = flash

    def plan(self, rids: List[Hashable], new_tokens: List[int]) -> None:
        """The caller has stopped anything reading the host store and settled the tier."""
        if len(rids) != len(new_tokens):
            raise ValueError(f"plan_extend: expected one chunk length per request, found {len(rids)} requests "
                             f"and {len(new_tokens)} lengths")
        tier, T = self.tier, self.tier.config.window.page_tokens
        rows = []
        for r, n in zip(rids, new_tokens):
            slots, st = tier.device_slots(r), tier.requests[r]
            # The chunk is the request's last n positions, all still on the device: after the
            # host part, or anywhere when nothing left for the host yet (sinks and window adjoin).
            most = st.length if st.host_end == len(st.sink_slots) else st.length - st.host_end
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
                raise ValueError(f"plan_extend: request {r!r}: expected a chunk of 1 to {most} tokens (its newest "
                                 f"tokens still on the device), got {n!r}")
            h = tier.host_tokens(r) if tier.offload and self.attends_host else 0
            ids = tier.store.table(r).ids[: -(-h // T)] if h else None
            pages = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)
            rows.append(_ExtendRow(slot_tensor(slots).to(tier.device), n, pages, h))
        self._rows = rows

    def run(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """q [sum of the chunk lengths, Hq, D] (requests in plan order) -> attention output, q's dtype."""
        rows = self._rows
        if rows is None:
            raise RuntimeError("HybridAttention.run_extend before plan_extend()")
        hq, d = self.shape.num_q_heads, self.shape.head_dim
        total = sum(r.n_new for r in rows)
        if tuple(q.shape) != (total, hq, d):
            raise ValueError(f"q must be [chunk tokens, num_q_heads, head_dim] = {(total, hq, d)}, found {tuple(q.shape)}")
        kp, vp = self.tier.k_pool[layer], self.tier.v_pool[layer]
        kw = dict(sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        T = self.tier.config.window.page_tokens
        per = max(1, HOST_TOKENS_AT_ONCE // T)  # host pages read at a time
        outs, o = [], 0
        for row in rows:
            qr = q[o: o + row.n_new]
            o += row.n_new
            part = self._attend(qr, kp[row.slots], vp[row.slots], causal_offset=row.slots.numel() - row.n_new, **kw)
            # The host part a few thousand tokens at a time: dequantized float32 for a long
            # prompt's whole host part would be gigabytes per layer.
            for i in range(0, row.pages.numel(), per):
                pages, n = row.pages[i: i + per], min(row.n_host - i * T, per * T)
                k, v, moved = host_block(self.tier.store.view, layer, pages, n, q.device, raw=self.raw)
                self.tier.count_h2d(moved if q.device.type == "cuda" else 0)
                part = merge(part, self._attend(qr, k, v, causal_offset=None, **kw))
            outs.append(part.out)
        return torch.cat(outs).to(q.dtype)

    def warm(self, dtype: torch.dtype) -> float:
        """Run the chunk kernel once on a few random tokens, so that a kernel compiled on first
        use (FlashInfer's) is built now rather than inside the first long prompt; returns the
        seconds it took (0 when there is nothing to prepare)."""
        if not self.flash:
            return 0.0
        t0 = time.perf_counter()
        hq, hkv, d = self.shape.num_q_heads, self.shape.kv_heads, self.shape.head_dim
        device = self.tier.device
        q = torch.randn(2, hq, d, device=device).to(dtype)
        k, v = (torch.randn(5, hkv, d, device=device).to(dtype) for _ in range(2))
        for offset in (3, None):  # a chunk over its device tokens, then over host tokens
            self._attend(q, k, v, causal_offset=offset, sm_scale=self.sm_scale, soft_cap=self.soft_cap)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def _attend(self, q, k, v, *, causal_offset, sm_scale, soft_cap):
        if self.flash:
            try:
                return flash_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale, soft_cap=soft_cap)
            except (RuntimeError, ImportError, TypeError) as exc:  # a kernel FlashInfer cannot build or run here
                log.warning("kvtier: FlashInfer's prefill kernel failed (%s); chunked prefill continues with "
                            "float32 torch attention", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.flash = False
        # torch's fused kernel on the CPU; it falls back to block_attention where it cannot serve
        return cpu_attention(q, k, v, causal_offset=causal_offset, sm_scale=sm_scale, soft_cap=soft_cap)


def host_block(view, layer: int, pages: torch.Tensor, n: int, device, *, raw: bool = True):
    """The first n host tokens of `pages` in layer as float32 k, v [n, Hkv, D] on `device`,
    and the bytes moved there.

    raw: the stored bytes (int8/int4/bf16 keys with their scales, bf16/int8 values) are
    gathered on the CPU, copied and dequantized on `device`, a quarter to a half of the
    float32 bytes; otherwise (the reference) the C store dequantizes on the CPU.
    """
    if raw:
        stored = view.raw_pages(layer, pages)
        moved = sum(t.numel() * t.element_size() for t in stored if t is not None)
        stored = type(stored)(*(None if t is None else t.to(device, non_blocking=True) for t in stored))
        k = dequant_raw_keys(stored, view.key_format, view.key_group)
        v = dequant_raw_values(stored, view.value_format)
    else:
        k, v = view.dequant_keys(layer, pages).to(device), view.values(layer, pages).to(device)
        moved = 2 * k.numel() * k.element_size()
    return _token_major(k, n), _token_major(v, n), moved


def _token_major(pages: torch.Tensor, n: int) -> torch.Tensor:
    """[pages, Hkv, T, D] -> the first n tokens as [n, Hkv, D]."""
    p, h, t, d = pages.shape
    return pages.transpose(1, 2).reshape(p * t, h, d)[:n]
