"""The engine's exact attention over scattered host tokens, by key format, alternated.

    python benchmarks/attend_scattered.py [--tokens N] [--per-head M] [--rounds R] [--threads T]
    python benchmarks/attend_scattered.py --sets [--shared F]

What hcattention's exact logits and fluxion's CPU part ask of the engine
(`Engine.attend_indices`): each of the 32 query heads of a Llama-3-8B-shaped
layer (8 kv-heads x 4, head_dim 128, 16-token pages, bf16 values) attends M
tokens scattered at random over N host tokens. Each round times every key
format once (median of 9 runs), so the formats alternate on one machine.
Prints one line per format with each round's milliseconds.

--sets compares, for int8_channel keys, each query head attending its own M
tokens (`attend_indices`) with every query head of a kv-head attending the
union of the group's tokens (`attend_kv_indices`, hcattention's
`exact_sets: kv_head`), alternated. A share F of each head's tokens comes from
a pool its kv-head's heads draw from (on Qwen2.5-Coder-0.5B's real keys at 4K
the union of a group's mass-0.9 selections was 2.2x smaller than the sum of
them); it prints the union's size against the per-head total.
"""

from __future__ import annotations

import argparse
import math

import torch

from kvtier._native import Engine
from kvtier.bench.engine import build_case, timeit
from kvtier.runtime.key_index import union_per_kv

FORMATS = ("int8", "int8_channel", "bf16")


def _median_ms(fn, runs: int = 9) -> float:
    return sorted(timeit(fn, runs))[runs // 2] * 1e3


def _selections(n: int, H: int, G: int, m: int, shared: float, g: torch.Generator) -> torch.Tensor:
    """[1, H * G, m] int32: per query head, m distinct tokens, a share `shared` of them from its kv-head's pool."""
    rows = []
    for _ in range(H):
        pool = torch.randperm(n, generator=g)[: 2 * m]
        for _ in range(G):
            k = int(round(shared * m))
            own = pool[torch.randperm(pool.numel(), generator=g)[:k]]
            rest = torch.randperm(n, generator=g)
            rest = rest[~torch.isin(rest, own)][: m - k]
            rows.append(torch.cat([own, rest]).sort().values)
    return torch.stack(rows).to(torch.int32)[None].contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--per-head", type=int, default=1536, help="tokens each query head attends")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    ap.add_argument("--sets", action="store_true", help="per query head against one set per kv-head (int8_channel)")
    ap.add_argument("--shared", type=float, default=0.75, help="with --sets: each head's share drawn from its "
                                                                 "kv-head's pool")
    args = ap.parse_args()
    n, H, G, D = args.tokens, 8, 4, 128
    eng = Engine(args.threads)
    g = torch.Generator().manual_seed(0)
    if args.sets:
        idx = _selections(n, H, G, args.per_head, args.shared, g)
        kv = union_per_kv(idx, G)
        store, table, q, budget = build_case(n, H, G, D, 16, 2048, key_format="int8_channel")
        eng.plan(store, table, torch.tensor([0, len(table)], dtype=torch.int32),
                 torch.tensor([n], dtype=torch.int32), H * G, budget_tokens=budget, sm_scale=1 / math.sqrt(D))
        per_head_rows, union_rows = int((idx >= 0).sum()), int((kv >= 0).sum())
        times = {"query_head": [], "kv_head": []}
        for _ in range(args.rounds):
            times["query_head"].append(_median_ms(lambda: eng.attend_indices(store, 0, q, idx)))
            times["kv_head"].append(_median_ms(lambda: eng.attend_kv_indices(store, 0, q, kv)))
        print(f"{n} host tokens, {args.per_head} tokens per query head ({args.shared:g} from its kv-head's pool), "
              f"{eng.n_threads} threads: rows read {per_head_rows} per query head, {union_rows} as kv-head unions "
              f"({per_head_rows / union_rows:.2f}x fewer)")
        for name, ts in times.items():
            print(f"{name:11s} " + " ".join(f"{t:7.3f}" for t in ts) + " ms per layer")
        return
    idx = torch.stack([torch.randperm(n, generator=g)[: args.per_head] for _ in range(H * G)])
    idx = idx.sort(-1).values.to(torch.int32)[None].contiguous()
    cases = {kf: build_case(n, H, G, D, 16, 2048, key_format=kf) for kf in FORMATS}
    times = {kf: [] for kf in FORMATS}
    for _ in range(args.rounds):
        for kf in FORMATS:
            store, table, q, budget = cases[kf]
            eng.plan(store, table, torch.tensor([0, len(table)], dtype=torch.int32),
                     torch.tensor([n], dtype=torch.int32), H * G, budget_tokens=budget, sm_scale=1 / math.sqrt(D))
            times[kf].append(_median_ms(lambda: eng.attend_indices(store, 0, q, idx)))
    print(f"{n} host tokens, {args.per_head} scattered tokens per query head, {eng.n_threads} threads")
    for kf in FORMATS:
        print(f"{kf:13s} " + " ".join(f"{t:7.3f}" for t in times[kf]) + " ms per layer")


if __name__ == "__main__":
    main()
