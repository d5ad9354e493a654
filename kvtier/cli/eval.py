"""`kvtier eval`: RULER-style accuracy of every policy against full attention, on a real model, offline.

Grid: tasks x context lengths x policies (dense, window_only, and each
budgeted policy at each budget), or the prompts of a JSONL file (--prompts)
x policies. Every policy sees the same prompts.
Per cell: accuracy, the KV budget actually used and per-layer attention
fidelity at the first question token. Writes JSON, a markdown table and a
PNG under --results-dir (default: $KVTIER_RESULTS_DIR, else
~/.cache/kvtier/results) and prints, last:

    worst_gap_points=<G> window_only_gap_points=<W>

G: the largest drop, in points of 100, of any budgeted policy at a 10%
budget against dense, each drop being accuracy averaged over the tasks of one
context length; W: the same for window_only (largest over context lengths).
"""

from __future__ import annotations

import argparse
import sys
import time

from ..bench.results import add_results_dir_argument

QUICK = dict(model="smollm2-135m", contexts="1536", policies="dense,window_only,hgca", budgets="0.1",
             tasks="niah_single,passkey", samples=2, window=256)
FULL = dict(model="qwen2.5-coder-0.5b", contexts="4096,8192", policies="dense,window_only,hgca,quest",
            budgets="0.02,0.05,0.1,0.25", tasks="niah_single,niah_multikey,niah_multivalue,passkey,"
                                                  "variable_tracking,common_words", samples=4, window=1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="qwen2.5-coder-0.5b, smollm2-135m, or a local model directory / .gguf file "
                                        f"(default {FULL['model']}; --quick: {QUICK['model']})")
    parser.add_argument("--quick", action="store_true", help="a small grid for CI (a few minutes on 2 CPU cores)")
    parser.add_argument("--contexts", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--policies", help="comma-separated: dense, window_only, budgeted policies (hgca, quest, fluxion) or "
                                           "policy YAML files (labelled by their stem; the grid sets window and budget)")
    parser.add_argument("--budgets", help="comma-separated fractions of the context attended from the host")
    parser.add_argument("--tasks", help="comma-separated task names")
    parser.add_argument("--prompts", metavar="FILE",
                        help="a JSONL file of your own prompts with their expected answers and scoring rule "
                             "(exact, contains, or first_line: whole tokens in the answer's first line), run "
                             "through every policy instead of the built-in tasks (see kvtier.eval.user_prompts); "
                             "--contexts, --tasks and --samples do not apply")
    parser.add_argument("--samples", type=int, help="prompts per task and context")
    parser.add_argument("--window", type=int, help="device window tokens (sinks: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file name in the results directory (default eval-<model>[-quick])")
    add_results_dir_argument(parser)
    parser.add_argument("--device", default="auto",
                        help="where the model and the tiers' device windows run: auto (CUDA when there is a GPU), "
                             "cpu, cuda or cuda:N; host stores and the engine are always on the CPU")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the per-layer attention fidelity")
    parser.add_argument("--keep-budget", action="store_true",
                        help="a policy YAML file keeps its own budget (one cell, labelled by the file's stem) "
                             "instead of running at each --budgets fraction")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                        help="prefill the context in chunks of this size through each policy's tier (as an "
                             "SGLang server does: evicting before each chunk, the host part attended exactly "
                             "with its stored keys); default: once with full attention, shared by the policies")


def _numbers(flag: str, text: object, kind: type) -> list:
    try:
        return [kind(x) for x in str(text).split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"--{flag}: expected comma-separated {what}, found {str(text)[:100]!r}") from None


def _settings(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    out = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    out["contexts"] = _numbers("contexts", out["contexts"], int)
    out["policies"] = [x for x in str(out["policies"]).split(",") if x]
    out["budgets"] = _numbers("budgets", out["budgets"], float)
    out["tasks"] = [x for x in str(out["tasks"]).split(",") if x]
    out["name"] = getattr(args, "name", None)
    out["prefill_chunk"] = getattr(args, "prefill_chunk", None)
    out["keep_budget"] = bool(getattr(args, "keep_budget", False))
    out["prompts"] = getattr(args, "prompts", None)
    out["device"] = getattr(args, "device", None) or "auto"
    return out


def run(args: argparse.Namespace) -> int:
    try:
        from ..eval import grid
    except ImportError as exc:
        print(f"eval: needs the eval extra (pip install -e '.[eval]'): {exc}", file=sys.stderr)
        return 2
    try:
        s = _settings(args)
        grid.check_settings(s)
    except ValueError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        report = grid.run_grid(s, seed=args.seed, quick=args.quick, fidelity=not args.no_fidelity,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True),
                               results_dir=getattr(args, "results_dir", None))
    except ValueError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    print(report.table)
    print(f"wrote {report.json_path} ({time.perf_counter() - t0:.0f} s)")
    print(f"worst_gap_points={report.worst_gap:.1f} window_only_gap_points={report.window_only_gap:.1f}")
    return 0
