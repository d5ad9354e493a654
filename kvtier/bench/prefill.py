"""`kvtier bench prefill`: a long prompt prefilled in chunks through the tier, against the same
chunks with every token on the device, attention only, in one run.

The tier path is what sglang's stage 3 runs (`HybridAttention.run_extend`): before each chunk,
pages that left the window go to the host store; the chunk attends the host part exactly
(stored bytes moved and dequantized where the chunk runs) and the device window causally. The
baseline runs the same routine over the whole prompt kept on the device (the `dense` policy),
so the ratio is what the host part costs. The tier is timed twice: with the stored bytes moved
and FlashInfer's prefill kernel where there is one (the default), and through the reference
path: the C store's float32 dequant on the CPU and torch float32 attention in blocks.

Prints a table, writes JSON and markdown to the results directory (--results-dir), and ends with
`prefill_tier_vs_dense=<time ratio> speedup_vs_reference=<speedup> tier_rel_err=<last chunk's
relative output error against dense>` for the largest context.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional

import torch

from ..config import ModelShape, from_mapping
from . import results
from .arguments import positive_ints

NAME = "prefill"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes for CPU machines and CI")
    parser.add_argument("--contexts", type=positive_ints, help="e.g. 8192,32768")
    parser.add_argument("--chunk", type=int, default=0, help="prefill chunk tokens (default 2048, quick 256)")
    parser.add_argument("--layers", type=int, default=0, help="attention layers timed (default 4, quick 2)")
    parser.add_argument("--key-format", default="int8", choices=("int8", "int4", "bf16"))
    parser.add_argument("--value-format", default="bf16", choices=("bf16", "int8"))
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--name", default=None, help="results file name (default prefill or prefill-quick)")
    results.add_results_dir_argument(parser)


def _configs(window: int, sinks: int, key_format: str, value_format: str):
    win = {"sink_tokens": sinks, "window_tokens": window, "page_tokens": 16}
    store = {"key_format": key_format, "value_format": value_format}
    return {"dense": from_mapping({"policy": "dense", "window": win}),
            "tier": from_mapping({"policy": "hgca", "window": win, "host_store": store})}


def _prefill(tier, shape: ModelShape, n: int, chunk: int, device, dtype, seed: int) -> Dict[str, object]:
    """Prefill n random tokens in chunks; returns seconds, peak device tokens and the last output."""
    hq, hkv, d = shape.num_q_heads, shape.kv_heads, shape.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    tier.tier.add(0)
    peak, last = 0, None
    elapsed = 0.0
    for p0 in range(0, n, chunk):
        m = min(chunk, n - p0)
        # The chunk's projections, drawn outside the timed part
        qkv = [(torch.randn(m, hq, d, generator=g, device=device, dtype=dtype),
                torch.randn(m, hkv, d, generator=g, device=device, dtype=dtype),
                torch.randn(m, hkv, d, generator=g, device=device, dtype=dtype)) for _ in range(shape.n_layers)]
        _sync(device)
        t0 = time.perf_counter()
        slots = tier.tier.extend(0, m)
        tier.attn.plan_extend([0], [m])
        peak = max(peak, tier.tier.stats().device_tokens)
        for layer, (q, k, v) in enumerate(qkv):
            tier.pool.k[layer, slots] = k
            tier.pool.v[layer, slots] = v
            last = tier.attn.run_extend(q, layer)
        tier.tier.evict()
        _sync(device)
        elapsed += time.perf_counter() - t0
    return {"seconds": elapsed, "peak_device_tokens": peak, "host_tokens": tier.tier.stats().host_tokens,
            "last": last.float()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    from ..runtime.standalone import StandaloneTier, resolve_device

    device = resolve_device(args.device)
    quick = args.quick
    layers = args.layers or (2 if quick else 4)
    if layers <= 0 or args.chunk < 0:
        print("kvtier bench prefill: --layers and --chunk expect positive ints", file=sys.stderr)
        return 2
    shape = ModelShape(layers, 8, 2, 64) if quick else ModelShape(layers, 32, 8, 128)
    contexts = args.contexts or ([1024, 4096] if quick else [8192, 32768])
    chunk = args.chunk or (256 if quick else 2048)
    window, sinks = (256, 16) if quick else (1024, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = _configs(window, sinks, args.key_format, args.value_format)
    print(f"kvtier bench prefill: {layers} layers, {shape.num_q_heads}q/{shape.kv_heads}kv heads, head_dim "
          f"{shape.head_dim}, chunks of {chunk}, window {sinks}+{window}, keys {args.key_format}, device {device}")
    rows: List[Dict[str, object]] = []
    last: Optional[Dict[str, float]] = None
    for n in contexts:
        out = {}
        for name, cfg, fast in (("dense", configs["dense"], True), ("tier", configs["tier"], True),
                                ("tier_reference", configs["tier"], False)):
            # On CUDA a chunk's eviction lands while the next chunk runs: room for two chunks
            dev_tokens = n + 8 if name == "dense" else sinks + window + 2 * 16 + 2 * chunk + 8
            tier = StandaloneTier(cfg, shape, device=device, dtype=dtype, device_tokens=dev_tokens,
                                  host_tokens=n if name != "dense" else 0)
            try:
                tier.attn.extend_raw = fast
                tier.attn.extend_flash = fast and tier.attn.extend_flash
                out[name] = _prefill(tier, shape, n, chunk, device, dtype, seed=n)
            finally:
                tier.close()
            r = out[name]
            row = {"context": n, "path": name, "seconds": r["seconds"],
                   "tokens_per_s": n / r["seconds"], "peak_device_tokens": r["peak_device_tokens"],
                   "host_tokens": r["host_tokens"]}
            if name != "dense":
                ref = out["dense"]["last"]
                row["rel_err"] = float((r["last"] - ref).norm() / ref.norm())
                row["vs_dense"] = r["seconds"] / out["dense"]["seconds"]
            rows.append(row)
            print(f"  ctx {n:>7d} {name:15s} {r['seconds']:8.3f} s  {n / r['seconds']:10.0f} tok/s  peak device "
                  f"tokens {r['peak_device_tokens']:>7d}" + (f"  x{row['vs_dense']:.2f} of dense, rel err "
                                                              f"{row['rel_err']:.2e}" if name != "dense" else ""),
                  flush=True)
        tier_row = next(r for r in rows if r["context"] == n and r["path"] == "tier")
        last = {"vs_dense": tier_row["vs_dense"], "rel_err": tier_row["rel_err"],
                "speedup": out["tier_reference"]["seconds"] / out["tier"]["seconds"]}
    name = args.name or ("prefill-quick" if quick else "prefill")
    payload = {"benchmark": "prefill", "machine": results.machine(), "device": str(device),
               "shape": shape._asdict(), "chunk": chunk, "window": window, "sinks": sinks,
               "key_format": args.key_format, "value_format": args.value_format, "rows": rows}
    table = ("# kvtier bench prefill\n\nAttention only, one prompt in chunks; `dense` keeps every token on the "
             "device, `tier` moves the host part's stored bytes (and uses FlashInfer on CUDA), `tier_reference` "
             "dequantizes on the CPU and attends in float32 torch blocks.\n\n"
             + results.markdown_table(rows, ["context", "path", "seconds", "tokens_per_s", "vs_dense",
                                             "peak_device_tokens", "host_tokens", "rel_err"]))
    path = results.write(name, payload, table, out_dir=args.results_dir)
    print(f"wrote {path}")
    print(f"prefill_tier_vs_dense={last['vs_dense']:.2f} speedup_vs_reference={last['speedup']:.2f} "
          f"tier_rel_err={last['rel_err']:.2e}")
    return 0
