"""`kvtier demo`: decode a synthetic long context through the tier on the CPU.

Uses the embedded default policy (the repository's kvtier.yaml) unless a
file is given, prints the tier split, the throughput and the relative error
against dense attention over the same inputs.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (default: the embedded kvtier.yaml)")
    parser.add_argument("--context", type=int, default=32768, help="tokens per request (default 32768)")
    parser.add_argument("--batch", type=int, default=2, help="requests (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps timed (default 4)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.synthetic import peaked_decode_inputs
    from ..config import ConfigError, budget_tokens, load
    from ..config.defaults import default_config
    from ..runtime import dense_attention, hybrid_attention, split_window

    try:
        config = load(args.policy) if args.policy else default_config()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.context <= 0 or args.batch <= 0 or args.steps <= 0:
        print("demo: --context, --batch and --steps must be positive", file=sys.stderr)
        return 2
    hq, hkv, d = 32, 8, 128
    lengths = [args.context - 97 * i for i in range(args.batch)]
    inp = peaked_decode_inputs(lengths, hq, hkv, d, seed=args.seed)
    win = config.window
    split = split_window(torch.tensor(lengths), sink_tokens=win.sink_tokens,
                         window_tokens=win.window_tokens, page_tokens=win.page_tokens)
    host = split.host_tokens
    k_cap = [budget_tokens(config.budget, host_tokens=int(h), context_tokens=n) for h, n in zip(host, lengths)]
    scale = d ** -0.5
    print(f"kvtier demo: policy={config.policy}, batch={args.batch}, context={args.context}, "
          f"{hq} q / {hkv} kv heads, head_dim {d}")
    print(f"tier split: device {int(split.device_tokens.sum())} tokens, host {int(host.sum())} tokens "
          f"({100.0 * float(host.sum()) / sum(lengths):.1f}% of the KV on the host)")
    dense = dense_attention(inp.q, inp.k, inp.v, inp.kv_indptr, sm_scale=scale)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        selection = _topk_selection(inp, split, k_cap, scale)
        hybrid = hybrid_attention(inp.q, inp.k, inp.v, inp.kv_indptr, split, selection, sm_scale=scale)
    dt = (time.perf_counter() - t0) / args.steps
    rel = float((hybrid.out - dense.out).norm() / dense.out.norm())
    print(f"per-head budget: {k_cap} host tokens; one layer decode: {dt * 1e3:.1f} ms "
          f"({args.batch / dt:.1f} tokens/s for the batch)")
    print(f"relative error against dense attention: {rel:.3e}")
    return 0


def _topk_selection(inp, split, k_cap, scale):
    """Per-(request, kv-head) top-k of group-max logits over host tokens (reference selector)."""
    import torch

    b, hq, d = inp.q.shape
    hkv = inp.k.shape[1]
    width = max(min(k, int(h)) for k, h in zip(k_cap, split.host_tokens)) if b else 0
    sel = torch.full((b, hkv, max(width, 1)), -1, dtype=torch.long)
    for i in range(b):
        lo, hi = int(split.host_start[i]), int(split.host_end[i])
        if hi == lo:
            continue
        base = int(inp.kv_indptr[i])
        keys = inp.k[base + lo: base + hi]  # [n, Hkv, D]
        qg = inp.q[i].view(hkv, hq // hkv, d)
        s = torch.einsum("hgd,nhd->hgn", qg, keys).amax(dim=1) * scale
        kk = min(k_cap[i], hi - lo)
        sel[i, :, :kk] = s.topk(kk, dim=-1).indices + lo
    return sel
