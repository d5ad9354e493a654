"""`kvtier demo`: decode a synthetic long context through the tier.

Uses the embedded default policy (the repository's kvtier.yaml) unless a
file is given. Runs the real runtime (host store, native engine, hybrid
plan/run, LSE merge) on the CPU, or on CUDA when available, and prints the
tier split, the throughput and the relative error against dense attention
over the same inputs.

The host store is the policy's: at most `host_store.capacity_gib`, and when
the requests' host parts do not fit, `on_full` decides as it would in a
server (reject: the demo refuses, with the numbers; evict: the oldest host
pages go, and the comparison with dense shows what that cost). The memory the
run needs is checked before anything is allocated.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, NamedTuple, Optional

from ..config.sections import MAX_TOKENS

MAX_BATCH = 4096
GIB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (default: the embedded kvtier.yaml)")
    parser.add_argument("--context", type=int, default=32768, help="tokens per request (default 32768)")
    parser.add_argument("--batch", type=int, default=2, help="requests (default 2)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)


class StorePlan(NamedTuple):
    pages: int  # pages of the demo's host store (0: the policy keeps nothing on the host)
    page_bytes: int
    needed_pages: int  # what the requests' host parts take in all
    refusal: Optional[str]


def plan_store(config, shape, lengths: List[int]) -> StorePlan:
    """The demo's host store under the policy's capacity and on_full, or why it cannot run."""
    from ..config import OnFull
    from ..runtime.split import host_pages
    from ..store.host_store import capacity_pages, page_bytes

    if not config.offloads:
        return StorePlan(0, 0, 0, None)
    w = config.window
    per_request = [host_pages(n, sink_tokens=w.sink_tokens, window_tokens=w.window_tokens,
                              page_tokens=w.page_tokens) for n in lengths]
    need, cap, pb = sum(per_request), capacity_pages(config, shape), page_bytes(config, shape)
    holds = (f"host_store.capacity_gib {config.host_store.capacity_gib} GiB holds {cap} pages of "
             f"{w.page_tokens} tokens ({cap * w.page_tokens} tokens) for this demo's shape ({shape.n_layers} layer, "
             f"{shape.kv_heads} kv-heads, head_dim {shape.head_dim}, {config.host_store.key_format.value} keys)")
    at_least = f"at least {need * pb / GIB:.3f} GiB"
    pages = max(min(cap, need + 1), 0)
    if cap < 1:
        return StorePlan(pages, pb, need, f"{holds}; raise it to {at_least}")
    if need > cap and config.host_store.on_full is OnFull.REJECT:
        return StorePlan(pages, pb, need, f"{holds}; {len(lengths)} request(s) of up to {max(lengths)} tokens put "
                                      f"{need * w.page_tokens} tokens ({need} pages) on the host, and on_full: reject "
                                      f"refuses what does not fit. Raise capacity_gib to {at_least}, lower --context "
                                      f"or --batch, or set host_store.on_full: evict")
    if max(per_request) > cap:
        return StorePlan(pages, pb, need, f"{holds}; one request puts {max(per_request)} pages on the host, more than "
                                      f"the store holds even after evicting the others. Raise capacity_gib or lower "
                                      f"--context")
    return StorePlan(pages, pb, need, None)


def peak_bytes(lengths: List[int], shape, *, device_is_cpu: bool, store_bytes: int) -> int:
    """Host memory the demo takes at its peak, from the sizes of what it allocates (float32 inputs).

    Per context token: the inputs as generated (k, v and two temporaries), the device pool when it
    is on the CPU, the float64 dense reference (k and v, and both gathered per request, padded to
    the longest) and its scores; measured within 10% on the CPU at 8K and 32K tokens.
    """
    total, padded = sum(lengths), len(lengths) * max(lengths)
    kv32 = shape.kv_heads * shape.head_dim * 4
    inputs = 4 * kv32 * total
    pool = 2 * kv32 * (total + 64) if device_is_cpu else 0
    reference = 2 * (2 * kv32) * total + 2 * (2 * kv32) * padded + 2 * 8 * shape.num_q_heads * padded
    return inputs + pool + reference + store_bytes


def _refuse(message: str) -> int:
    print(f"demo: {message}", file=sys.stderr)
    return 2


def _check_sizes(args: argparse.Namespace) -> Optional[str]:
    if args.context <= 0 or args.batch <= 0 or args.steps <= 0:
        return "--context, --batch and --steps must be positive"
    if args.context > MAX_TOKENS:
        return f"--context: expected at most {MAX_TOKENS} tokens, found {args.context}"
    if args.batch > MAX_BATCH:
        return f"--batch: expected at most {MAX_BATCH} requests, found {args.batch}"
    if args.context - 97 * (args.batch - 1) <= 0:
        return "--context is too short for --batch requests"
    return None


def run(args: argparse.Namespace) -> int:
    why = _check_sizes(args)
    if why:
        return _refuse(why)
    import torch

    from .._native import isa_supported
    from ..bench.synthetic import peaked_decode_inputs
    from ..config import ModelShape, check_host, check_shape, load
    from ..config.defaults import default_config
    from ..config.host import host_memory_available
    from ..runtime import dense_attention
    from ..runtime.standalone import StandaloneTier, resolve_device

    source = args.policy or "<embedded kvtier.yaml>"
    config = load(args.policy) if args.policy else default_config()
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        return _refuse(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _refuse(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    shape = ModelShape(n_layers=1, num_q_heads=32, kv_heads=8, head_dim=128)
    # What a launch checks, with the file's name; the store's size is the demo's own (below), not
    # the whole capacity, so the host's memory is judged against what the run really takes.
    check_shape(config, shape, source=source)
    check_host(config, source=source, isa_supported=isa_supported, memory_refuses=False)
    lengths = [args.context - 97 * i for i in range(args.batch)]
    store = plan_store(config, shape, lengths)
    need = peak_bytes(lengths, shape, device_is_cpu=device.type == "cpu", store_bytes=store.pages * store.page_bytes)
    have = host_memory_available()
    if have and need > have:
        return _refuse(f"--context {args.context} x --batch {args.batch} needs about {need / GIB:.1f} GiB of host "
                       f"memory (inputs, device pool, host store and the float64 dense reference), found "
                       f"{have / GIB:.1f} GiB available; lower --context or --batch")
    if store.refusal:
        return _refuse(store.refusal)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        pool = 2 * shape.kv_heads * shape.head_dim * 4 * (sum(lengths) + 64)
        if pool > free:
            return _refuse(f"--context {args.context} x --batch {args.batch} needs a {pool / GIB:.1f} GiB device "
                           f"pool, found {free / GIB:.1f} GiB free on {device}; lower --context or --batch")
    inp = peaked_decode_inputs(lengths, shape.num_q_heads, shape.kv_heads, shape.head_dim, seed=args.seed)
    tier = StandaloneTier(config, shape, device=device, dtype=torch.float32, device_tokens=sum(lengths) + 64,
                          host_tokens=sum(lengths), host_pages=store.pages or None)
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
        if tier.engine is not None:
            print(f"threads: {tier.attn.core_split.describe()}")
        dropped = tier.store.stats().dropped_tokens if tier.store is not None else 0
        if dropped:
            print(f"host store full: on_full: evict dropped {dropped} host tokens (the store holds {store.pages} "
                  f"pages, {config.host_store.capacity_gib} GiB; the requests' host parts need {store.needed_pages}); "
                  f"dense attention below still sees them")
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
