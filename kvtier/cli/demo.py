"""`kvtier demo`: decode a synthetic long context through the tier.

Uses the embedded default policy (the repository's kvtier.yaml) unless a
file is given. Runs the real runtime (host store, native engine, hybrid
plan/run, LSE merge) on the CPU, or on CUDA when available, and prints the
tier split, the throughput and the relative error against dense attention
over the same inputs.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (default: the embedded kvtier.yaml)")
    parser.add_argument("--context", type=int, default=32768, help="tokens per request (default 32768)")
    parser.add_argument("--batch", type=int, default=2, help="requests (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.synthetic import peaked_decode_inputs
    from ..config import ConfigError, ModelShape, load
    from ..config.defaults import default_config
    from ..policies import PolicyUnavailableError
    from ..runtime import dense_attention
    from ..runtime.standalone import StandaloneTier, resolve_device

    try:
        config = load(args.policy) if args.policy else default_config()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.context <= 0 or args.batch <= 0 or args.steps <= 0:
        print("demo: --context, --batch and --steps must be positive", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    shape = ModelShape(n_layers=1, num_q_heads=32, kv_heads=8, head_dim=128)
    lengths = [args.context - 97 * i for i in range(args.batch)]
    if min(lengths) <= 0:
        print("demo: --context is too short for --batch requests", file=sys.stderr)
        return 2
    inp = peaked_decode_inputs(lengths, shape.num_q_heads, shape.kv_heads, shape.head_dim, seed=args.seed)
    try:
        tier = StandaloneTier(config, shape, device=device, dtype=torch.float32, device_tokens=sum(lengths) + 64,
                              host_tokens=sum(lengths))
    except PolicyUnavailableError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        rids = list(range(args.batch))
        for r in rids:
            tier.tier.add(r)
            plan = tier.tier.prefill(r, lengths[r])
            lo, hi = int(inp.kv_indptr[r]), int(inp.kv_indptr[r + 1])
            tier.tier.write_prefill_layer(plan, 0, inp.k[lo:hi].to(device), inp.v[lo:hi].to(device))
        stats = tier.tier.stats()
        print(f"kvtier demo: policy={config.policy}, device={device}, batch={args.batch}, context={args.context}, "
              f"{shape.num_q_heads} q / {shape.kv_heads} kv heads, head_dim {shape.head_dim}")
        print(f"tier split: device {stats.device_tokens} tokens ({tier.device_kv_bytes() / 2**20:.1f} MiB), "
              f"host {stats.host_tokens} tokens ({tier.host_kv_bytes() / 2**20:.1f} MiB, keys "
              f"{config.host_store.key_format.value}); {100.0 * stats.host_tokens / sum(lengths):.1f}% of the "
              f"context on the host")
        q = inp.q.to(device)
        tier.attn.plan(rids)
        tier.attn.run(q, 0)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = tier.attn.run(q, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        dense_t0 = time.perf_counter()
        ref = dense_attention(inp.q.double(), inp.k.double(), inp.v.double(), inp.kv_indptr,
                              sm_scale=shape.head_dim ** -0.5)
        dense_dt = time.perf_counter() - dense_t0
        rel = float((out.cpu().double() - ref.out).norm() / ref.out.norm())
        print(f"one layer of decode attention for the batch: {dt * 1e3:.2f} ms through the tier "
              f"({args.batch / dt:.0f} layer-tokens/s); float64 dense reference: {dense_dt * 1e3:.0f} ms")
        print(f"relative error against dense attention: {rel:.3e}")
    finally:
        tier.close()
    return 0
