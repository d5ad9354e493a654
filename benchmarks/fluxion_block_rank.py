"""How well each block ranking of fluxion finds a real model's strongest tokens.

    python benchmarks/fluxion_block_rank.py CAPTURE.pt [--results-dir DIR] [--name NAME]

On a capture's real post-RoPE keys, values and queries (`kvtier bench capture-kv`),
per layer, captured query and kv-head, the host tokens (between 64 sinks and a
1,024-token window) are cut in blocks of 16, 32 and 64 tokens and summarized in
16-token chunks as the host store keeps them (per-channel min and max, key and
value sums; `block_budget.chunk_stats`). Each ranking keeps its top blocks within a
budget (5% and 10% of the context), and the score is the share of each query
head's top-32 tokens (by exact logit) inside the kept blocks:

- bound: the largest upper bound of any token's logit over the block's chunks (Quest's);
- mass: the largest estimated log-mass of its chunks (mean key's logit plus the
  spread term, capped by the bound);
- mean_key: the largest logit of a chunk's mean key (fluxion's `block_rank: mean_key`);
- oracle: the block's true softmax mass (max over the kv-head's query heads), the
  best any block ranking can do at that budget.

Writes NAME.json and NAME.md (default fluxion-block-rank) to the results directory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kvtier.bench.results import add_results_dir_argument, machine, markdown_table, started_commit, write
from kvtier.eval.capture import load_capture
from kvtier.runtime.block_budget import chunk_stats

SINKS, WINDOW, CHUNK, TOP = 64, 1024, 16, 32
RANKINGS = ("bound", "mass", "mean_key", "oracle")


def recall(cap, block: int, fraction: float) -> dict:
    """Mean share of each query head's top-32 tokens inside each ranking's kept blocks."""
    L, hq, hkv, d = cap.n_layers, cap.q.shape[2], cap.k.shape[2], cap.k.shape[3]
    g = hq // hkv
    hits = {r: [] for r in RANKINGS}
    for layer in range(L):
        k = cap.k[layer, SINKS:cap.context - WINDOW].float().transpose(0, 1)  # [Hkv, N, D]
        v = cap.v[layer, SINKS:cap.context - WINDOW].float().transpose(0, 1)
        n = k.shape[1] // block * block
        k, v = k[:, :n].contiguous(), v[:, :n].contiguous()
        kc = k.view(hkv, n // CHUNK, CHUNK, d)
        summary = torch.stack([kc.amin(2), kc.amax(2)], 2)
        sums = torch.stack([kc.sum(2), v.view(hkv, n // CHUNK, CHUNK, d).sum(2)], 2)
        per, nb = block // CHUNK, n // block
        keep = min(nb, max(1, int(fraction * cap.context / block)))
        for step in range(cap.q.shape[1]):
            q = cap.q[layer, step].float().view(hkv, g, d)
            st = chunk_stats(q, summary, sums, torch.full((n // CHUNK,), CHUNK), sm_scale=cap.sm_scale)
            x = torch.einsum("hgd,hnd->hgn", q, k) * cap.sm_scale
            top = x.topk(TOP, dim=-1).indices // block  # [Hkv, G, TOP] blocks of the top tokens
            scores = {
                "bound": st.bound.view(hkv, g, nb, per).amax(-1).amax(1),
                "mass": st.log_mass.view(hkv, g, nb, per).logsumexp(-1).amax(1),
                "mean_key": st.mean_logit.view(hkv, g, nb, per).amax(-1).amax(1),
                "oracle": torch.softmax(x, -1).view(hkv, g, nb, block).sum(-1).amax(1),
            }
            for name, sc in scores.items():
                kept = torch.zeros(hkv, nb, dtype=torch.bool)
                kept.scatter_(1, sc.topk(keep, dim=-1).indices, True)
                hits[name].append(float(kept.gather(1, top.view(hkv, -1)).float().mean()))
    return {name: sum(h) / len(h) for name, h in hits.items()}


def main(argv=None) -> int:
    started_commit()  # the commit this run starts from, recorded before a long run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture")
    ap.add_argument("--name", default="fluxion-block-rank")
    add_results_dir_argument(ap)
    args = ap.parse_args(argv)
    cap = load_capture(args.capture)
    rows = []
    t0 = time.perf_counter()
    for block in (16, 32, 64):
        for fraction in (0.05, 0.1):
            r = recall(cap, block, fraction)
            rows.append({"block_tokens": block, "budget": fraction, **{k: round(v, 3) for k, v in r.items()}})
            print(f"block {block:2d} budget {fraction:.2f}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()),
                  file=sys.stderr, flush=True)
    better = sum(r["mean_key"] > r["bound"] for r in rows)
    headline = (f"top-{TOP} recall of the kept blocks, mean_key against bound: "
                + ", ".join(f"{r['block_tokens']}@{r['budget']:g} {r['mean_key']:.2f}/{r['bound']:.2f}" for r in rows)
                + f" (oracle {min(r['oracle'] for r in rows):.2f}-{max(r['oracle'] for r in rows):.2f})")
    payload = {"bench": "fluxion_block_rank", "machine": machine(), "data": {"kind": "capture", **cap.meta},
               "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "headline": headline,
               "mean_key_beats_bound": f"{better} of {len(rows)}"}
    table = markdown_table(rows, ["block_tokens", "budget", *RANKINGS]) + f"\n{headline}\n"
    path = write(args.name, payload, table, out_dir=args.results_dir)
    print(headline)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
