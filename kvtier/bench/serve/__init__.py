"""`kvtier bench serve`: real sglang servers under load from sglang's own client, dense against the tier.

    kvtier bench serve [--model qwen2.5-7b] [--servers dense,hgca,hgca-prefilter,hcattention,sparda,fluxion]
        [--input-lens 32768,130816] [--output-len 256] [--concurrency 1,2,4,8,16,32,64] [--dry-run] [-- ARGS]

The matrix (`matrix.py`) starts `python -m sglang.launch_server` once per server
(`dense`: stock sglang with CUDA graphs; any other name: `--kv-tier` with that
policy file, skipped with the reason when it does not build), with
`--load-format dummy`, the chosen model's published config (`models.py`) and a
static memory fraction that gives the KV pool of an 80 GB H100 (`memory.py`).
It drives each server with `python -m sglang.bench_serving` (`client.py`) at
fixed input and output lengths, concurrency swept until throughput stops
growing, and records output tokens/s, TPOT and TTFT p50/p99, the requests the
server admitted at once and its device and host memory (`server.py` reads its
log). One JSON, one table and one plot go to the results directory
(`report.py`). It needs a machine where sglang serves (a GPU); `--dry-run`
prints what it would run anywhere. Arguments after `--` go to every
`launch_server`.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex

from ..arguments import positive_ints
from ..results import add_results_dir_argument
from .client import ClientError, Level, missing_flags, progress
from .matrix import (Matrix, check_inputs, client_help, default_host_gib, device_fraction, levels, plan_servers,
                     work_dir)
from .memory import H100_80GB_GIB, REFERENCE_FRACTION, MemoryArgError
from .models import MODELS, ModelDirError, spec_for
from .server import python

SERVERS = "dense,hgca,hgca-prefilter,hcattention,sparda,fluxion"
POLICIES_DIR = pathlib.Path(__file__).resolve().parents[3] / "policies"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-7b", choices=list(MODELS), help="the published config served with "
                   "dummy weights (default qwen2.5-7b; qwen2.5-coder-0.5b is the small worst case for overhead)")
    p.add_argument("--tokenizer", type=pathlib.Path, default=None, metavar="DIR",
                   help="a directory of Qwen2.5 tokenizer files (default: the tokenizer inside the eval's offline "
                        "qwen2.5-coder-0.5b GGUF)")
    p.add_argument("--servers", default=SERVERS, help=f"comma list: dense (stock sglang) and policy names of "
                   f"--policies-dir or YAML paths (default {SERVERS})")
    p.add_argument("--policies-dir", type=pathlib.Path, default=POLICIES_DIR, help="where policy names are found "
                   "(default: the checkout's policies/)")
    p.add_argument("--input-lens", type=positive_ints, default=[32768, 130816],
                   help="prompt tokens per request (default 32768,130816: 128K less the output, which fills "
                        "Qwen2.5-7B's 131072-token context)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request (default 256)")
    p.add_argument("--concurrency", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64],
                   help="max concurrency levels, run in order until throughput stops growing")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second at every level (default inf: all at once, bounded by the concurrency)")
    p.add_argument("--min-gain", type=float, default=0.05,
                   help="a level must beat the best before it by this fraction, else the sweep stops (default 0.05)")
    p.add_argument("--prompts-per-level", type=int, default=2, help="requests per level: this times the concurrency")
    p.add_argument("--min-prompts", type=int, default=4, help="at least this many requests per level")
    p.add_argument("--as-gpu-gib", type=float, default=H100_80GB_GIB,
                   help=f"size the KV pool as on a card of this much memory (default {H100_80GB_GIB}: an 80 GB H100)")
    p.add_argument("--reference-mem-fraction", type=float, default=REFERENCE_FRACTION,
                   help=f"the --mem-fraction-static of that card (default {REFERENCE_FRACTION})")
    p.add_argument("--device-gib", type=float, default=0,
                   help="this card's memory in GiB (default: what nvidia-smi reports)")
    p.add_argument("--mem-fraction", type=float, default=0, help="use this --mem-fraction-static as it is")
    p.add_argument("--host-gib", type=float, default=0,
                   help="host_store.capacity_gib of every kvtier server (default: 3/4 of the memory available)")
    p.add_argument("--gpu-index", type=int, default=0, help="the card nvidia-smi reports on (default 0)")
    p.add_argument("--attention-backend", default="flashinfer", help="every server's --attention-backend "
                   "(default flashinfer, as in every recorded server run)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--seed", type=int, default=1, help="the client's seed (its random prompts)")
    p.add_argument("--ready-timeout", type=float, default=1800, help="seconds a server may take to serve")
    p.add_argument("--level-timeout", type=float, default=3600, help="seconds one level's client may take")
    p.add_argument("--work-dir", default=None, help="model directory, policy copies, server logs and client "
                   "outputs (default: a new temporary directory, kept)")
    p.add_argument("--name", default="serve-matrix", help="result set name (default serve-matrix)")
    p.add_argument("--dry-run", action="store_true", help="print the servers and commands, run nothing")
    add_results_dir_argument(p)
    p.add_argument("extra", nargs="*", help="more launch_server arguments, after --")


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_for(args.model)
        problem = check_inputs(spec, args.input_lens, args.output_len)
        if problem:
            raise ValueError(problem)
        if args.output_len < 1 or args.prompts_per_level < 1 or args.min_prompts < 1 or not args.request_rate > 0:
            raise ValueError("--output-len, --prompts-per-level, --min-prompts and --request-rate must be > 0")
        if args.dry_run and not (args.device_gib or args.mem_fraction):
            args.device_gib = args.as_gpu_gib  # nothing to ask nvidia-smi for a plan
        fraction = device_fraction(args)
    except (ValueError, MemoryArgError, ModelDirError) as exc:
        progress(str(exc))
        return 2
    host_gib = args.host_gib or default_host_gib()
    plans = plan_servers([s for s in args.servers.split(",") if s], args.policies_dir)
    work = pathlib.Path(args.work_dir or "WORK") if args.dry_run else work_dir(args.work_dir)
    matrix = Matrix(args, spec, work, fraction, host_gib, plans)
    progress(f"{spec.note}; --mem-fraction-static {fraction:g} (the KV pool of a {args.as_gpu_gib:g} GiB card at "
             f"{args.reference_mem_fraction:g}: about {matrix.expected_pool} tokens, "
             f"{matrix.expected_pool // (max(args.input_lens) + args.output_len)} requests of the longest input); "
             f"host store {host_gib:g} GiB per kvtier server")
    if args.dry_run:
        return dry_run(matrix)
    try:
        missing = missing_flags(client_help(python()))
    except (ClientError, OSError) as exc:
        progress(f"sglang's client does not run here: {exc}")
        return 2
    if missing:
        progress(f"this sglang's bench_serving lacks {', '.join(missing)}, which the matrix passes")
        return 2
    try:
        return matrix.run()
    except ModelDirError as exc:
        progress(str(exc))
        return 2


def dry_run(matrix: Matrix) -> int:
    args = matrix.args
    for plan in matrix.plans:
        if plan.skipped:
            print(f"# {plan.name}: skipped ({plan.skipped})")
            continue
        held = matrix.host_requests(plan)
        print(f"# {plan.name}" + ("" if held is None else f": the host store holds {held} requests of the longest "
                                  "input"))
        print(shlex.join(matrix.launch(plan)))
        for input_len in args.input_lens:
            for level in levels(args.concurrency, rate=args.request_rate, per_level=args.prompts_per_level,
                                min_prompts=args.min_prompts):
                print(shlex.join(matrix.client(plan, input_len, level)))
    return 0


__all__ = ["Level", "add_arguments", "run"]
