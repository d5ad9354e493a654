"""The CPU path's split of the cores between the engine and torch's window, alternated.

    python benchmarks/cpu_thread_split.py [--context N] [--batch B] [--rounds R] [--calls C]

On the CPU the engine answers the host part on a helper thread while the decoding
thread computes the device window with torch (`HostStrategy.runs_beside_window`).
This times `HybridAttention.run` on `kvtier demo`'s shapes (one layer of 32 q / 8 kv
heads, head_dim 128, the default policy, a sinks + window of 1,088 tokens per request)
under three splits of the cores, built once and alternated round by round:

- split: the default (`engine.window_threads: 0`): the window's torch ops run on the
  cores the engine leaves, at least one;
- torch: the window at torch's own count (every core), as before the split;
- engine-1: the engine at one thread, the window at the cores left.

Prints per arm and round the median window call (the decoding thread's torch part,
while the engine runs) and the median run() (the whole decode step of the layer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvtier.bench.synthetic import peaked_decode_inputs
from kvtier.config import ModelShape
from kvtier.config.defaults import default_text
from kvtier.config.loader import loads
from kvtier.runtime.standalone import StandaloneTier

SHAPE = ModelShape(n_layers=1, num_q_heads=32, kv_heads=8, head_dim=128)


def build(engine_threads: int, window_threads: int, lengths, inp) -> StandaloneTier:
    text = default_text().replace("  threads: 0 ", f"  threads: {engine_threads} ", 1)
    text = text.replace("  window_threads: 0 ", f"  window_threads: {window_threads} ", 1)
    tier = StandaloneTier(loads(text, "<bench>"), SHAPE, device="cpu", dtype=torch.float32,
                          device_tokens=sum(lengths) + 64, host_tokens=sum(lengths))
    for r, n in enumerate(lengths):
        tier.tier.add(r)
        plan = tier.tier.prefill(r, n)
        lo, hi = int(inp.kv_indptr[r]), int(inp.kv_indptr[r + 1])
        tier.tier.write_prefill_layer(plan, 0, inp.k[lo:hi], inp.v[lo:hi])
    tier.attn.plan(list(range(len(lengths))))
    tier.attn.run(inp.q, 0)  # warm-up
    tier.attn.take_times()
    return tier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=2, help="requests (the demo's default: 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="run() calls per arm and round")
    args = ap.parse_args()
    lengths = [args.context - 97 * i for i in range(args.batch)]  # as the demo makes them
    inp = peaked_decode_inputs(lengths, SHAPE.num_q_heads, SHAPE.kv_heads, SHAPE.head_dim, seed=0)
    cores = torch.get_num_threads()
    arms = {"split": build(0, 0, lengths, inp), "torch": build(0, cores, lengths, inp),
            "engine-1": build(1, 0, lengths, inp)}
    for name, tier in arms.items():
        print(f"{name:8s} {tier.attn.core_split.describe()}")
    window = {name: [] for name in arms}
    step = {name: [] for name in arms}
    try:
        for _ in range(args.rounds):
            for name, tier in arms.items():
                w, s = [], []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    tier.attn.run(inp.q, 0)
                    s.append(time.perf_counter() - t0)
                    w.append(tier.attn.take_times().gpu_s)
                window[name].append(1e3 * statistics.median(w))
                step[name].append(1e3 * statistics.median(s))
    finally:
        for tier in arms.values():
            tier.close()
    for name in arms:
        print(f"{name:8s} window ms: {' '.join(f'{x:7.2f}' for x in window[name])}  | "
              f"median {statistics.median(window[name]):.2f}")
        print(f"{name:8s} run()  ms: {' '.join(f'{x:7.2f}' for x in step[name])}  | "
              f"median {statistics.median(step[name]):.2f}")


if __name__ == "__main__":
    main()
