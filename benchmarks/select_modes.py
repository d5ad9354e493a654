"""Engine time per layer by selection mode and host length, one request.

    python benchmarks/select_modes.py [--threads N] [--reps R]

The Qwen2.5-0.5B shape the sglang runs serve (2 kv-heads x 7 query heads,
head_dim 64, pages of 16, int8 keys, bf16 values, budget 2048, group max) at
1K to 120K host tokens, mass 0.95 against top-k in the same run, and a
Llama-3-8B-shaped layer (8 x 4, head_dim 128). Prints one line per case and
writes engine-select-modes.{json,md} to the results directory (--results-dir; default
$KVTIER_RESULTS_DIR, else ~/.cache/kvtier/results).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kvtier._native import Engine, HostStoreView, active_isa
from kvtier.bench import results


def _store(tokens, H, D, P):
    g = torch.Generator().manual_seed(0)
    n_pages = -(-tokens // P)
    store = HostStoreView.allocate(n_layers=1, n_pages=n_pages, kv_heads=H, page_tokens=P, head_dim=D,
                                   key_format="int8", value_format="bf16", summary_tokens=P)
    for p0 in range(0, n_pages, 256):
        ids = torch.arange(p0, min(p0 + 256, n_pages), dtype=torch.int32)
        k = torch.randn((len(ids), H, P, D), generator=g)
        k[..., :4] *= 4  # a few heavy channels, as real keys have
        store.append(0, ids, k, torch.randn((len(ids), H, P, D), generator=g))
    return store, torch.randperm(n_pages, generator=g).to(torch.int32), n_pages, g


def case(tag, tokens, H, G, D, P, threads, *, mode="mass", prefilter=0.0, reps=60, gap=0.0, reduce="max"):
    store, table, n_pages, g = _store(tokens, H, D, P)
    q = torch.randn(1, H * G, D, generator=g)
    q[..., :4] *= 3
    with Engine(threads) as eng:
        eng.plan(store, table, torch.tensor([0, n_pages], dtype=torch.int32), torch.tensor([tokens], dtype=torch.int32),
                 H * G, mode=mode, group_reduce=reduce, budget_tokens=torch.full((1, H), 2048, dtype=torch.int32),
                 mass_threshold=0.95 if mode == "mass" else 1.0, sm_scale=D ** -0.5, prefilter=prefilter)
        for _ in range(5):
            eng.run(0, q)
        t = []
        for _ in range(reps):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            eng.run(0, q)
            t.append(time.perf_counter() - t0)
    t.sort()
    row = {"case": tag, "host_tokens": tokens, "kv_heads": H, "group": G, "head_dim": D, "threads": threads,
           "mode": mode, "group_reduce": reduce, "prefilter": prefilter, "gap_ms": gap * 1e3,
           "median_ms": t[len(t) // 2] * 1e3, "p10_ms": t[len(t) // 10] * 1e3}
    print(f"{tag:16s} {tokens:6d} tokens  {mode:4s} {reduce:4s} prefilter {prefilter:g}: "
          f"median {row['median_ms']:.3f} ms", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--reps", type=int, default=60)
    results.add_results_dir_argument(ap)
    args = ap.parse_args()
    thr, reps, Q = args.threads, args.reps, (2, 7, 64, 16)
    rows = [case("qwen", 29000, *Q, thr, reps=reps),
            case("qwen, 1 ms gaps", 29000, *Q, thr, reps=reps, gap=0.001),
            case("qwen", 29000, *Q, thr, mode="topk", reps=reps),
            case("qwen, prefilter", 29000, *Q, thr, prefilter=4.0, reps=reps),
            case("qwen", 1000, *Q, thr, reps=reps),
            case("qwen", 8000, *Q, thr, reps=reps),
            case("qwen", 120000, *Q, thr, reps=reps),
            case("qwen", 29000, *Q, thr, reduce="mean", reps=reps),
            case("llama", 32000, 8, 4, 128, 16, thr, reps=reps),
            case("llama", 1000, 8, 4, 128, 16, thr, reps=reps)]
    mass, topk = rows[0]["median_ms"], rows[2]["median_ms"]
    print(f"mass_vs_topk={mass / topk:.2f}")
    cols = ["case", "host_tokens", "mode", "group_reduce", "prefilter", "gap_ms", "median_ms"]
    path = results.write("engine-select-modes", {"bench": "select_modes", "isa": active_isa(), "threads": thr,
                                                 "machine": results.machine(), "rows": rows,
                                                 "mass_vs_topk": mass / topk},
                         "# Engine time per layer by selection mode\n\n" + results.markdown_table(rows, cols),
                         out_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
