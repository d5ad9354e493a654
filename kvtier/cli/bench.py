"""`kvtier bench NAME [ARGS]`: dispatch to a benchmark module in kvtier.bench.

Only the named benchmark's module is imported, and only when it runs: its
arguments are declared there, next to the code that reads them.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": ("kvtier.bench.engine", "native engine vs a streaming read and vs torch on the CPU"),
    "decode": ("kvtier.bench.decode", "Llama-3-8B-shaped decode: dense vs offload_all vs hgca"),
    "compare": ("kvtier.bench.compare", "every policy side by side on the same data: speed, bytes, recall, mass "
                                        "captured and eval accuracy in one table"),
    "prefill": ("kvtier.bench.prefill", "a long prompt in chunks through the tier vs all on the device"),
    "capture-kv": ("kvtier.bench.capture_kv", "a model's real K, V and queries, replayed by decode --kv"),
    "codebooks": ("kvtier.bench.codebooks", "hcattention's codebooks trained offline from a capture's keys"),
    "random-checkpoint": ("kvtier.bench.random_checkpoint",
                          "a random-weight checkpoint from a model config, the same for every TP layout"),
    "serve": ("kvtier.bench.serve", "sglang servers, dense and per policy, under sglang's bench_serving: "
                                    "throughput, TPOT, TTFT, admitted requests, memory"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The description names every registered bench, so `kvtier bench --help` cannot fall behind BENCHES.
    parser.description = f"run a benchmark: {', '.join(BENCHES)}"
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:<18} {text}" for name, (_, text) in BENCHES.items()) + \
        "\n\n`kvtier bench NAME --help` lists a benchmark's own options."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("bench", choices=list(BENCHES), metavar="NAME", help="the benchmark to run")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help="its options")


def run(args: argparse.Namespace) -> int:
    module, help_text = BENCHES[args.bench]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        print(f"benchmark '{args.bench}' is not available: {exc}")
        return 1
    parser = argparse.ArgumentParser(prog=f"kvtier bench {args.bench}", description=help_text)
    mod.add_arguments(parser)
    bench_args = parser.parse_args(args.bench_args)
    bench_args.bench = args.bench
    return int(mod.run(bench_args) or 0)
