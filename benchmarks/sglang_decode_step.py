"""What a decode step of the sglang backend costs besides attention, over sglang's real pools on the CPU.

    python benchmarks/sglang_decode_step.py [--rows 8] [--context 8192] [--steps 30] [--layers 24]

Needs sglang (the CPU venv of the serving guide). The `kvtier` backend is built over
sglang's own request-to-token pool, KV pool and allocator with the Qwen2.5-0.5B
attention shape (14 query / 2 kv heads, head_dim 64; the worst case for
overhead: the least attention work per layer), `rows` requests of `context`
tokens each, and decodes as sglang's scheduler calls it: `init_forward_metadata`
once per step, `forward_decode` once per layer. hgca runs with `overlap: false`,
so the engine runs on the calling thread and every part of the step is counted
on that one thread:
  step_ms      init_forward_metadata plus every layer's forward_decode;
  plan_ms      init_forward_metadata alone (rows tracked, eviction, the plan);
  engine_ms    the native engine's time (the host part of attention);
  window_ms    the window's attention (torch on the CPU, FlashInfer on a GPU);
  overhead_ms  step - engine - window: what the scheduler thread spends that is not attention.
Medians over the steps after three warm-up steps. Writes sglang-decode-step.{json,md}
to the results directory (--results-dir; default $KVTIER_RESULTS_DIR, else
~/.cache/kvtier/results).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from kvtier.bench import results

HQ, HKV, D = 14, 2, 64


def build(rows: int, context: int, layers: int, threads: int, budget: int, seed: int = 0, *, sinks: int = 64,
          window: int = 1024):
    """The backend over sglang's pools, rows prefilled with random K, V; returns (backend, step)."""
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    import kvtier_sglang
    from kvtier.config import loads
    from kvtier_sglang.backend import KvTierAttnBackend

    kvtier_sglang.register()
    dtype = torch.bfloat16
    size = rows * (context + 1024) + 64
    req_pool = ReqToTokenPool(size=rows + 1, max_context_len=context + 2048, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=size, page_size=1, dtype=dtype, head_num=HKV, head_dim=D, layer_num=layers,
                               device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(size=size, dtype=dtype, device="cpu", kvcache=kv_pool, need_sort=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
                             token_to_kv_pool_allocator=alloc, page_size=1, tp_size=1, tp_rank=0,
                             server_args=SimpleNamespace(disable_radix_cache=True, prefill_attention_backend=None,
                                                         radix_cache_backend=None))
    config = loads(f"policy: hgca\nwindow: {{sink_tokens: {sinks}, window_tokens: {window}, page_tokens: 16}}\n"
                   "host_store: {capacity_gib: 4, key_format: int8, value_format: bf16}\n"
                   f"budget: {{kind: mass, threshold: 0.95, max_tokens: {budget}}}\n"
                   f"hgca: {{overlap: false}}\nengine: {{threads: {threads}}}\n", "<bench>")
    backend = KvTierAttnBackend(runner, config)
    attn_layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(layers)]
    g = torch.Generator().manual_seed(seed)
    for r in range(rows):
        slots = alloc.alloc(context)
        req_pool.req_to_token[r, :context] = slots.to(torch.int32)
        for i in range(layers):
            kv_pool.k_buffer[i][slots] = torch.randn(context, HKV, D, generator=g).to(dtype)
            kv_pool.v_buffer[i][slots] = torch.randn(context, HKV, D, generator=g).to(dtype)
    lens = [context] * rows

    def step():
        """One decode step; (step s, plan s) on the calling thread."""
        loc = alloc.alloc(rows)
        for r in range(rows):
            req_pool.req_to_token[r, lens[r]] = int(loc[r])
            lens[r] += 1
        seq = torch.tensor(lens)
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=rows, req_pool_indices=torch.arange(rows),
                             seq_lens=seq, seq_lens_cpu=seq, out_cache_loc=loc)
        q = torch.randn(rows, HQ * D, generator=g).to(dtype)
        k, v = (torch.randn(rows, HKV, D, generator=g).to(dtype) for _ in range(2))
        t0 = time.perf_counter()
        backend.init_forward_metadata(fb)
        t1 = time.perf_counter()
        for layer in attn_layers:
            backend.forward_decode(q, k, v, layer, fb)
        return time.perf_counter() - t0, t1 - t0

    return backend, step


def measure(args) -> dict:
    torch.set_num_threads(1)
    backend, step = build(args.rows, args.context, args.layers, args.threads, args.budget, sinks=args.sinks,
                          window=args.window)
    parts = {k: [] for k in ("step_ms", "plan_ms", "engine_ms", "window_ms", "overhead_ms")}
    with torch.no_grad():
        for i in range(args.steps + 3):
            step_s, plan_s = step()
            times = backend.session.attn.take_times()  # this step's attention (engine, window, run wall)
            if i < 3:
                continue
            engine, window = 1e3 * times.cpu_s, 1e3 * times.gpu_s
            for k, v in (("step_ms", 1e3 * step_s), ("plan_ms", 1e3 * plan_s), ("engine_ms", engine),
                         ("window_ms", window), ("overhead_ms", 1e3 * step_s - engine - window)):
                parts[k].append(v)
    backend.session.close()
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["overhead_per_layer_ms"] = out["overhead_ms"] / args.layers
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8, help="requests decoding together")
    p.add_argument("--context", type=int, default=8192, help="tokens per request before the first step")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="engine threads")
    p.add_argument("--budget", type=int, default=256, help="hgca's host tokens per kv-head at most")
    p.add_argument("--sinks", type=int, default=64, help="sink tokens (window.sink_tokens)")
    p.add_argument("--window", type=int, default=1024, help="recent tokens on the device (window.window_tokens); "
                   "small, with a short context, leaves mostly the step's overhead")
    p.add_argument("--label", default="", help="a name for this run's row (e.g. the commit)")
    p.add_argument("--name", default="sglang-decode-step")
    results.add_results_dir_argument(p)
    args = p.parse_args(argv)
    row = {"label": args.label, "rows": args.rows, "context": args.context, "layers": args.layers,
           "window": args.sinks + args.window, **measure(args)}
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    cols = list(row)
    path = results.write(args.name, {"bench": "sglang-decode-step", "machine": results.machine(), "rows": [row]},
                         results.markdown_table([row], cols), out_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
