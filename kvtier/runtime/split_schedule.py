"""The priority scheduler of the `split` host strategy (Fluxion): a layer's selected blocks go
partly to the CPU engine and partly to the GPU (host -> device copy, then attention there),
so that both parts finish together.

Time model, per layer: the CPU part takes cpu_bytes / cpu rate, the GPU part gpu_bytes / gpu
rate, where the bytes are the stored keys and values (with their scales) of the blocks'
tokens, and the GPU rate is that of the whole GPU path (copy, dequantize, attend) per byte
copied. Both rates are measured on this host when the strategy starts (`measure_rates`),
never assumed; without a CUDA device, or with `fluxion.gpu_share: off`, the GPU rate is 0
and every block stays on the CPU. The GPU takes the blocks of highest priority first, up to
the split point that minimizes the later of the two finishing times.

The device window's own time is not in the model: the window runs on the GPU beside both parts.
"""

from __future__ import annotations

import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .._native import Engine, HostStoreView, StoreBuffers, dequant_raw_keys, dequant_raw_values
from ..config.sections import KeyFormat, ValueFormat
from ..config.shape import kv_bytes
from .merge import AttnPart
from .window_attention import empty_part


class Rates(NamedTuple):
    cpu_bytes_per_s: float  # the engine attending selected host tokens, per stored byte read
    gpu_bytes_per_s: float  # copy to the device, dequantize and attend there, per stored byte; 0: no GPU part


def token_bytes(view: HostStoreView) -> float:
    """Stored bytes of one token of one kv-head at one layer: key, value and their scales (the store
    formats' sizes as the config counts them, `config.shape.kv_bytes`)."""
    return sum(kv_bytes(KeyFormat(view.key_format.value), ValueFormat(view.value_format.value),
                        view.head_dim, key_group=view.key_group, page_tokens=view.page_tokens))


def split_point(priority: torch.Tensor, nbytes: torch.Tensor, rates: Rates) -> torch.Tensor:
    """priority [N], nbytes [N] of a layer's selected blocks -> [N] bool, True for the GPU part.

    The GPU takes a prefix of the blocks in priority order (highest first); the prefix is the
    one whose later finishing time, max(gpu bytes / gpu rate, cpu bytes / cpu rate), is least
    (the shorter prefix on a tie, so a zero GPU rate keeps everything on the CPU)."""
    n = priority.numel()
    if n == 0 or rates.gpu_bytes_per_s <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if rates.cpu_bytes_per_s <= 0:
        return torch.ones(n, dtype=torch.bool)
    order = torch.argsort(priority.double().cpu(), descending=True, stable=True)
    sizes = nbytes.double().cpu()[order]
    gpu = torch.cat([torch.zeros(1, dtype=torch.float64), sizes.cumsum(0)])  # bytes of the first j blocks
    finish = torch.maximum(gpu / rates.gpu_bytes_per_s, (gpu[-1] - gpu) / rates.cpu_bytes_per_s)
    j = int(torch.argmin(finish))  # the first minimum: the shortest prefix
    out = torch.zeros(n, dtype=torch.bool)
    out[order[:j]] = True
    return out


def cpu_indices(tokens: List[List[torch.Tensor]], group: int) -> torch.Tensor:
    """Per request, per kv-head host-token indices -> idx [B, Hq, m] int32, -1 padded (each query
    head its kv-head's tokens), as `Engine.attend_indices` takes them."""
    m = max([t.numel() for per in tokens for t in per] + [1])
    hkv = len(tokens[0]) if tokens else 0
    idx = torch.full((len(tokens), hkv * group, m), -1, dtype=torch.int32)
    for i, per in enumerate(tokens):
        for h, t in enumerate(per):
            if t.numel():
                idx[i, h * group:(h + 1) * group, : t.numel()] = t.to(torch.int32)
    return idx


def gpu_part(view: HostStoreView, layer: int, q: torch.Tensor, tables: List[torch.Tensor],
             tokens: List[List[torch.Tensor]], *, sm_scale: float, soft_cap: float) -> AttnPart:
    """Attention of q [B, Hq, D] (on its device) over host tokens tokens[i][h] (long, host-token
    indices of request i, kv-head h; pages tables[i]) whose stored bytes are gathered on the CPU
    (into page-locked memory on CUDA), copied to q's device and dequantized there."""
    b, hq, d = q.shape
    hkv, T = view.kv_heads, view.page_tokens
    group, dev = hq // hkv, q.device
    width = max([t.numel() for per in tokens for t in per] + [1])
    rows, page_rows, slots = [], [], []
    for i, per in enumerate(tokens):
        table = tables[i].long()
        for h, t in enumerate(per):
            if t.numel():
                ph = table[t // T] * hkv + h  # the token's (page, kv-head) row
                page_rows.append(ph)
                rows.append(ph * T + t % T)
                slots.append((i * hkv + h) * width + torch.arange(t.numel()))
    if not rows:
        return empty_part(b, hq, d, dev)
    rows_t, slots_t = torch.cat(rows), torch.cat(slots).to(dev)
    pin = dev.type == "cuda"
    # int8_channel keys share a scale and zero point per channel of each (page, kv-head): gathered per page row
    channel = KeyFormat(view.key_format.value) is KeyFormat.INT8_CHANNEL

    def take(t: Optional[torch.Tensor], per_page: bool = False) -> Optional[torch.Tensor]:
        """The rows of `t` (a store buffer [L, P, H, T, ...] or, per_page, [L, P, H, ...]) that the
        tokens name, gathered into (page-locked) host memory and copied to the device."""
        if t is None:
            return None
        idx = torch.cat(page_rows) if per_page else rows_t
        lead = 3 if per_page else 4
        src = t[layer].reshape(-1, *t.shape[lead:]) if t.dim() > lead else t[layer].reshape(-1)
        out = torch.empty((idx.numel(),) + tuple(src.shape[1:]), dtype=src.dtype, pin_memory=pin)
        torch.index_select(src, 0, idx, out=out)
        return out.to(dev, non_blocking=True)

    keys = take(view.keys)
    if channel:  # each token a one-row "page" [n, 1, D] beside its page's [n, 2, D] scales
        keys = keys.unsqueeze(1)
    raw = StoreBuffers(keys, take(view.key_scales, per_page=channel), take(view.buffers.values),
                       take(view.value_scales), None)
    k = torch.zeros(b * hkv * width, d, device=dev)
    v = torch.zeros_like(k)
    k[slots_t] = dequant_raw_keys(raw, view.key_format, view.key_group).reshape(-1, d)
    v[slots_t] = dequant_raw_values(raw, view.value_format)
    valid = torch.zeros(b * hkv * width, dtype=torch.bool, device=dev)
    valid[slots_t] = True
    k, v, valid = k.view(b, hkv, width, d), v.view(b, hkv, width, d), valid.view(b, hkv, 1, width)
    x = torch.einsum("bhgd,bhwd->bhgw", q.float().view(b, hkv, group, d), k) * sm_scale
    if soft_cap > 0:
        x = soft_cap * torch.tanh(x / soft_cap)
    x = x.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    p = torch.nan_to_num(torch.exp(x - lse[..., None]), nan=0.0)
    out = torch.einsum("bhgw,bhwd->bhgd", p, v)
    return AttnPart(out.reshape(b, hq, d), lse.reshape(b, hq))


_MEASURED: Dict[Tuple, Rates] = {}


def _probe_store(view: HostStoreView, pages: int) -> HostStoreView:
    g = torch.Generator().manual_seed(0)
    probe = HostStoreView.allocate(n_layers=1, n_pages=pages, kv_heads=view.kv_heads, page_tokens=view.page_tokens,
                                   head_dim=view.head_dim, key_format=view.key_format, value_format=view.value_format,
                                   key_group=view.key_group, summary_tokens=view.summary_tokens)
    shape = (pages, view.kv_heads, view.page_tokens, view.head_dim)
    probe.append(0, torch.arange(pages, dtype=torch.int32), torch.randn(shape, generator=g),
                 torch.randn(shape, generator=g))
    return probe


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def measure_cpu_rate(engine: Engine, view: HostStoreView, num_q_heads: int, *, tokens: int = 2048) -> float:
    """Bytes/s of the engine attending `tokens` scattered host tokens per kv-head (16-token runs spread
    over a probe store of this store's formats), as the split strategy's CPU part does."""
    T = view.page_tokens
    pages = max(4, 4 * tokens // T)
    probe = _probe_store(view, pages)
    try:
        n = pages * T
        engine.plan(probe, torch.arange(pages, dtype=torch.int32), torch.tensor([0, pages], dtype=torch.int32),
                    torch.tensor([n], dtype=torch.int32), num_q_heads, mode="topk",
                    budget_tokens=torch.ones(1, view.kv_heads, dtype=torch.int32), sm_scale=view.head_dim ** -0.5)
        runs = torch.arange(0, n, 64)[: max(1, tokens // 16)]
        idx = (runs[:, None] + torch.arange(16)).reshape(-1)[:tokens].to(torch.int32)
        idx = idx[None, None, :].expand(1, num_q_heads, -1).contiguous()
        q = torch.randn(1, num_q_heads, view.head_dim)
        seconds = _best(lambda: engine.attend_indices(probe, 0, q, idx))
    finally:
        probe.close()
    return idx.shape[-1] * view.kv_heads * token_bytes(view) / seconds


def measure_gpu_rate(view: HostStoreView, num_q_heads: int, device: torch.device, *, tokens: int = 2048) -> float:
    """Bytes/s of the GPU part on `device`: stored blocks gathered into page-locked memory, copied,
    dequantized and attended there (0 without CUDA)."""
    if device.type != "cuda":
        return 0.0
    T = view.page_tokens
    pages = max(4, 4 * tokens // T)
    probe = _probe_store(view, pages)
    try:
        rows = (torch.arange(0, pages * T, 64)[: max(1, tokens // 16)][:, None] + torch.arange(16)).reshape(-1)
        per_head = [rows[:tokens]] * view.kv_heads
        q = torch.randn(1, num_q_heads, view.head_dim, device=device)
        table = torch.arange(pages, dtype=torch.int32)

        def run():
            gpu_part(probe, 0, q, [table], [per_head], sm_scale=view.head_dim ** -0.5, soft_cap=0.0)
            torch.cuda.synchronize(device)

        seconds = _best(run)
    finally:
        probe.close()
    return tokens * view.kv_heads * token_bytes(view) / seconds


def measure_rates(engine: Engine, view: HostStoreView, num_q_heads: int, device: torch.device, *,
                  gpu: bool = True) -> Rates:
    """Both rates for this store's formats and shape, measured once per process and key."""
    key = (view.key_format, view.value_format, view.key_group, view.kv_heads, view.head_dim, view.page_tokens,
           num_q_heads, engine.n_threads, str(device) if gpu else "cpu")
    if key not in _MEASURED:
        cpu = measure_cpu_rate(engine, view, num_q_heads)
        _MEASURED[key] = Rates(cpu, measure_gpu_rate(view, num_q_heads, device) if gpu else 0.0)
    return _MEASURED[key]
