"""`kvtier bench NAME`: dispatch to a benchmark module in kvtier.bench."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": ("kvtier.bench.engine", "native engine vs a streaming read and vs torch on the CPU"),
    "decode": ("kvtier.bench.decode", "Llama-3-8B-shaped decode: dense vs offload_all vs hgca"),
    "prefill": ("kvtier.bench.prefill", "a long prompt in chunks through the tier vs all on the device"),
    "capture-kv": ("kvtier.bench.capture_kv", "a model's real K, V and queries, replayed by decode --kv"),
    "random-checkpoint": ("kvtier.bench.random_checkpoint",
                          "a random-weight checkpoint from a model config, the same for every TP layout"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The description names every registered bench, so `kvtier bench --help` cannot fall behind BENCHES.
    parser.description = f"run a benchmark: {', '.join(BENCHES)}"
    subs = parser.add_subparsers(dest="bench", metavar="NAME")
    subs.required = True
    for name, (module, help_text) in BENCHES.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_bench_module=module)
        try:
            importlib.import_module(module).add_arguments(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            sub.set_defaults(_bench_missing=str(exc))


def run(args: argparse.Namespace) -> int:
    missing = getattr(args, "_bench_missing", None)
    if missing:
        print(f"benchmark '{args.bench}' is not available: {missing}")
        return 1
    return int(importlib.import_module(args._bench_module).run(args) or 0)
