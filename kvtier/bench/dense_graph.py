"""The strongest dense baseline: the whole decode step captured in one CUDA graph.

All KV in HBM, FlashInfer's paged decode over each request's whole context (one-token
pages, as sglang's FlashInfer backend pages it), the layer stack's projections, KV
writes and attention (and with a full model its MLPs, embedding and head) replayed as
one graph: what a server with CUDA graphs runs per step, without its scheduler. The
plan (page tables) is made once before the capture; every replay decodes one token
per request at the same position, so the timed step is the step at `context` tokens.

`byte_floor_ms`: the step's bytes (weights + every request's KV, read once) at the
device-to-device copy bandwidth measured in the same process.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from ..config import ModelShape
from .stack import Replay, StackWeights, next_input, output, project_qkv, request_kv


def hbm_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        b.copy_(a)
    end.record()
    end.synchronize()
    del a, b
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)


def run_dense_graph(w: StackWeights, shape: ModelShape, hidden: int, context: int, batch: int, steps: int,
                    device, dtype, *, sm_scale: float, replay: Optional[Replay] = None) -> Dict[str, object]:
    import flashinfer

    hq, hkv, d, L = shape.num_q_heads, shape.kv_heads, shape.head_dim, shape.n_layers
    n = context + 1  # each request's context and the token it decodes
    k_pool = torch.empty(L, batch * n, hkv, d, dtype=dtype, device=device)
    v_pool = torch.empty_like(k_pool)
    for r in range(batch):
        for layer in range(L):
            k, v = request_kv(shape, w, layer, context, seed=r, device=device, dtype=dtype, replay=replay)
            k_pool[layer, r * n: r * n + context] = k
            v_pool[layer, r * n: r * n + context] = v
    indptr = (torch.arange(batch + 1, dtype=torch.int32, device=device) * n)
    indices = torch.arange(batch * n, dtype=torch.int32, device=device)
    last = torch.ones(batch, dtype=torch.int32, device=device)
    slots = torch.arange(batch, device=device) * n + context
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=(hq // hkv) not in (1, 2, 3, 4, 8),
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(indptr, indices, last, hq, hkv, d, 1, q_data_type=dtype, kv_data_type=dtype, sm_scale=sm_scale)
    x_in = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    x_out = torch.empty_like(x_in)

    def step():
        x = x_in
        for layer in range(L):
            q, k, v = project_qkv(x, w, layer, shape)
            k_pool[layer, slots] = k
            v_pool[layer, slots] = v
            cache = (k_pool[layer].view(-1, 1, hkv, d), v_pool[layer].view(-1, 1, hkv, d))
            x = output(x, wrapper.run(q, cache), w, layer)
        x_out.copy_(next_input(x, w))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph (kernel choice, workspace)
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize(device)
    each = []
    for _ in range(steps):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize(device)
        each.append(time.perf_counter() - t0)
    dt = sum(each) / len(each)
    kv_bytes = 2 * L * batch * n * hkv * d * k_pool.element_size()
    bw = hbm_bandwidth(device)
    floor = (w.nbytes() + kv_bytes) / bw
    del graph, k_pool, v_pool
    torch.cuda.empty_cache()
    return {"ms_per_step": dt * 1e3, "tokens_per_s": batch / dt, "rel_err": 0.0,
            "ms_per_step_median": sorted(each)[len(each) // 2] * 1e3, "ms_per_step_max": max(each) * 1e3,
            "ms_each": [round(t * 1e3, 2) for t in each], "device_kv_gib": kv_bytes / 2**30, "host_kv_gib": 0.0,
            "hbm_gbps": bw / 1e9, "byte_floor_ms": floor * 1e3, "vs_byte_floor": dt / floor,
            "cpu_attn_ms_per_step": 0.0, "pipelined": False, "engine_threads": 0}
