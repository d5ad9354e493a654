"""How well each SparDA forecast source knows a layer's blocks before its real query does.

    kvtier bench capture-kv CAP.pt --model qwen2.5-coder-0.5b --context 8192 --queries 9 --forecast
    python benchmarks/sparda_forecast.py CAP.pt [--budget 0.1] [--results-dir DIR] [--name NAME]

On a capture's real keys and queries, per layer, query step and kv-head, the blocks the
real query selects as the `forecast_prefetch` strategy selects them (64-token blocks of
the host tokens between 64 sinks and a 1,024-token window, each scored by the best of its
16-token pages' mean keys against the kv-head's query heads; the top `budget` of the
context) are compared with the blocks each forecast source selects the same way:

- reuse: the same layer's real query one step earlier (what the strategy runs);
- next_query: the layer's query projection and RoPE of the previous layer's input hidden
  state (InfiniGen's, SparDA's training-free source; `capture-kv --forecast`), known one
  layer early.

Reported per source and layer: block recall (the real selection's blocks the forecast
holds) and mass recall (the share of the real selection's softmax mass, over the host
tokens, that the forecast's blocks hold), means over steps, kv-heads and query heads.
Layer 0 has no layer before it: next_query starts at layer 1, reuse at step 1.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvtier.bench.results import add_results_dir_argument, machine, markdown_table, started_commit, write
from kvtier.eval.capture import load_capture

SINKS, WINDOW, PAGE, BLOCK = 64, 1024, 16, 64


def select(q: torch.Tensor, means: torch.Tensor, keep: int) -> torch.Tensor:
    """q [Hkv, G, D], page means [Hkv, P, D] -> the top `keep` blocks [Hkv, keep] (as the strategy scores them)."""
    hkv, p, _ = means.shape
    page = torch.einsum("hgd,hpd->hgp", q, means).amax(1)  # [Hkv, P]
    per = BLOCK // PAGE
    block = page[:, : p // per * per].view(hkv, -1, per).amax(-1)
    return block.topk(min(keep, block.shape[1]), dim=-1).indices


def compare(cap, budget: float):
    L, S = cap.n_layers, cap.q.shape[1]
    hq, hkv, d = cap.q.shape[2], cap.k.shape[2], cap.k.shape[3]
    g = hq // hkv
    rows = []
    for layer in range(L):
        k = cap.k[layer, SINKS:cap.context - WINDOW].float().transpose(0, 1)  # [Hkv, N, D]
        n = k.shape[1] // BLOCK * BLOCK
        k = k[:, :n]
        means = k.view(hkv, n // PAGE, PAGE, d).mean(2)
        keep = max(1, int(budget * cap.context) // BLOCK)
        acc = {"reuse": [[], []], "next_query": [[], []]}
        for step in range(S):
            q = cap.q[layer, step].float().view(hkv, g, d)
            real = select(q, means, keep)
            mass = torch.softmax(torch.einsum("hgd,hnd->hgn", q, k) * cap.sm_scale, -1)  # [Hkv, G, n]
            block_mass = mass.view(hkv, g, -1, BLOCK).sum(-1)  # [Hkv, G, blocks]
            real_mass = block_mass.gather(2, real[:, None].expand(-1, g, -1)).sum(-1)  # [Hkv, G]
            sources = {}
            if step > 0:
                sources["reuse"] = cap.q[layer, step - 1].float().view(hkv, g, d)
            if layer > 0 and cap.q_next is not None:
                sources["next_query"] = cap.q_next[layer, step].float().view(hkv, g, d)
            for name, qf in sources.items():
                fc = select(qf, means, keep)
                held = (fc[:, :, None] == real[:, None, :]).any(1).float().mean(-1)  # [Hkv]
                fm = block_mass.gather(2, fc[:, None].expand(-1, g, -1)).sum(-1)
                acc[name][0].append(float(held.mean()))
                acc[name][1].append(float((fm / real_mass.clamp(min=1e-30)).clamp(max=1).mean()))
        row = {"layer": layer}
        for name, (br, mr) in acc.items():
            row[f"{name}_block_recall"] = round(sum(br) / len(br), 3) if br else None
            row[f"{name}_mass_recall"] = round(sum(mr) / len(mr), 3) if mr else None
        rows.append(row)
    return rows


def _mean(rows, key, first=1):
    vals = [r[key] for r in rows[first:] if r[key] is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def main(argv=None) -> int:
    started_commit()  # the commit this run starts from, recorded before a long run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture")
    ap.add_argument("--budget", type=float, default=0.1, help="the selection's share of the context")
    ap.add_argument("--name", default="sparda-forecast")
    add_results_dir_argument(ap)
    args = ap.parse_args(argv)
    cap = load_capture(args.capture)
    if cap.q_next is None:
        print("sparda_forecast: the capture has no next_query forecast; capture it with --forecast (only reuse "
              "is compared)", file=sys.stderr)
    rows = compare(cap, args.budget)
    summary = {f"{s}_{m}": round(_mean(rows, f"{s}_{m}"), 3)
               for s in ("reuse", "next_query") for m in ("block_recall", "mass_recall")}
    headline = (f"{cap.meta.get('model')} at {cap.context} tokens, budget {args.budget:g}, layers 1-{cap.n_layers - 1}: "
                f"block recall reuse {summary['reuse_block_recall']:.2f}, next_query "
                f"{summary['next_query_block_recall']:.2f}; mass recall reuse {summary['reuse_mass_recall']:.2f}, "
                f"next_query {summary['next_query_mass_recall']:.2f}")
    cols = ["layer", "reuse_block_recall", "next_query_block_recall", "reuse_mass_recall", "next_query_mass_recall"]
    payload = {"bench": "sparda_forecast", "machine": machine(), "data": {"kind": "capture", **cap.meta},
               "budget": args.budget, "block_tokens": BLOCK, "summary": summary, "headline": headline, "rows": rows}
    path = write(args.name, payload, markdown_table(rows, cols) + f"\n{headline}\n", out_dir=args.results_dir)
    print(headline)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
