"""`kvtier bench capture-kv`: real K, V and queries of a model, for `kvtier bench decode --kv`.

One prompt of an evaluation task runs through the model with plain attention
(`kvtier.eval.capture`); the file holds every layer's K, V after RoPE and the queries of
the prompt's last tokens, so the decode bench times each policy on the attention it
would see in a real run and measures its error against full attention on that data.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="FILE", help="where to write the capture (a torch archive)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="qwen2.5-coder-0.5b, smollm2-135m or a local model (as kvtier eval takes it)")
    parser.add_argument("--task", default="niah_single", help="the evaluation task whose prompt is captured")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--queries", type=int, default=9, help="queries of the prompt's last tokens kept (steps + 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda")
    parser.add_argument("--forecast", action="store_true",
                        help="also keep each layer's next_query forecast of the queries (its query projection of "
                             "the previous layer's input hidden state), for benchmarks/sparda_forecast.py")
    parser.add_argument("--layers", default=None,
                        help="comma-separated model layers to keep (default: every layer); the real-KV fidelity "
                             "fixtures in tests/data keep a few, layer 0 among them")


def run(args: argparse.Namespace) -> int:
    from ..eval.capture import capture
    from ..runtime.standalone import resolve_device

    if not 1 <= args.queries < args.context:
        print(f"kvtier bench capture-kv: --queries: expected 1 to --context - 1 ({args.context - 1}), found "
              f"{args.queries}", file=sys.stderr)
        return 2
    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in str(args.layers).split(",")]
        except ValueError:
            print(f"kvtier bench capture-kv: --layers: expected comma-separated layer numbers, found "
                  f"{str(args.layers)[:100]!r}", file=sys.stderr)
            return 2
    try:
        cap = capture(args.model, task=args.task, context=args.context, queries=args.queries, seed=args.seed,
                      device=str(resolve_device(args.device)), layers=layers, forecast=args.forecast)
    except ValueError as exc:
        print(f"kvtier bench capture-kv: {exc}", file=sys.stderr)
        return 2
    cap.save(args.out)
    L, n, hkv, d = cap.k.shape
    print(f"captured {args.model} {args.task}: {L} layers ({cap.meta['layers']}), {n} tokens ({cap.context} context + {cap.q.shape[1]} "
          f"queries), {cap.q.shape[2]} q / {hkv} kv heads, head_dim {d} -> {args.out}")
    return 0
