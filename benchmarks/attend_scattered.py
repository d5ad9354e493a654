"""The engine's exact attention over scattered host tokens, by key format, alternated.

    python benchmarks/attend_scattered.py [--tokens N] [--per-head M] [--rounds R] [--threads T]

What hcattention's exact logits and fluxion's CPU part ask of the engine
(`Engine.attend_indices`): each of the 32 query heads of a Llama-3-8B-shaped
layer (8 kv-heads x 4, head_dim 128, 16-token pages, bf16 values) attends M
tokens scattered at random over N host tokens. Each round times every key
format once (median of 9 runs), so the formats alternate on one machine.
Prints one line per format with each round's milliseconds.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvtier._native import Engine
from kvtier.bench.engine import build_case

FORMATS = ("int8", "int8_channel", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--per-head", type=int, default=1536, help="tokens each query head attends")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    args = ap.parse_args()
    n, H, G, D = args.tokens, 8, 4, 128
    eng = Engine(args.threads)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=g)[: args.per_head] for _ in range(H * G)])
    idx = idx.sort(-1).values.to(torch.int32)[None].contiguous()
    cases = {kf: build_case(n, H, G, D, 16, 2048, key_format=kf) for kf in FORMATS}
    times = {kf: [] for kf in FORMATS}
    for _ in range(args.rounds):
        for kf in FORMATS:
            store, table, q, budget = cases[kf]
            eng.plan(store, table, torch.tensor([0, len(table)], dtype=torch.int32),
                     torch.tensor([n], dtype=torch.int32), H * G, budget_tokens=budget, sm_scale=1 / math.sqrt(D))
            eng.attend_indices(store, 0, q, idx)
            runs = []
            for _ in range(9):
                t0 = time.perf_counter()
                eng.attend_indices(store, 0, q, idx)
                runs.append(time.perf_counter() - t0)
            times[kf].append(sorted(runs)[4] * 1e3)
    print(f"{n} host tokens, {args.per_head} scattered tokens per query head, {eng.n_threads} threads")
    for kf in FORMATS:
        print(f"{kf:13s} " + " ".join(f"{t:7.3f}" for t in times[kf]) + " ms per layer")


if __name__ == "__main__":
    main()
