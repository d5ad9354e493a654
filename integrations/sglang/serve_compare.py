"""Answers of several serve_check runs side by side, e.g. the same policies under --tp 1 and --tp 2.

    python -m kvtier_sglang.serve_compare --name serve-tp tp1=serve-tp1.json tp2=serve-tp2.json

Each run's policies are compared with the run's first policy (as serve_check
does) and with the same policy in every other run (a launch two runs share,
as `--reference` makes them, is compared once). Per pair and request it
reports how many generated tokens agree before the first difference, and per
policy the decode tokens/s of each context. It writes `<name>.json` and
`.md` to the results directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from kvtier.bench.results import add_results_dir_argument, results_dir

from .serve_check import agree_tokens

Cell = Tuple[str, Dict[str, Any]]  # ("run:policy", one serve_check result)


def _stem(result: Dict[str, Any]) -> str:
    return Path(result["policy"]).stem


def _answers(result: Dict[str, Any]) -> List[Tuple[str, List[int]]]:
    reqs = [(f"{r['context']}", r["output_ids"]) for r in result.get("requests", [])]
    batch = [(f"batch {r['context']}", r["output_ids"]) for r in result.get("batch", [])]
    return reqs + batch


def _own(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, List[Dict[str, Any]]]:
    """Each run's launches less those an earlier run holds too (serve_check --reference copies one):
    across runs no launch is compared with itself or counted twice."""
    seen: List[Dict[str, Any]] = []
    own: Dict[str, List[Dict[str, Any]]] = {}
    for run, results in runs.items():
        own[run] = [r for r in results if r not in seen]
        seen += own[run]
    return own


def pairs(runs: Dict[str, List[Dict[str, Any]]]) -> List[Tuple[Cell, Cell]]:
    out: List[Tuple[Cell, Cell]] = []
    for run, results in runs.items():
        first = results[0]
        out += [((f"{run}:{_stem(first)}", first), (f"{run}:{_stem(r)}", r)) for r in results[1:]]
    for (ra, res_a), (rb, res_b) in itertools.combinations(_own(runs).items(), 2):
        for a in res_a:
            for b in res_b:
                if _stem(a) == _stem(b):
                    out.append(((f"{ra}:{_stem(a)}", a), (f"{rb}:{_stem(b)}", b)))
    return out


def compare_runs(runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    rows = []
    for (la, a), (lb, b) in pairs(runs):
        ans_a, ans_b = dict(_answers(a)), dict(_answers(b))
        keys = [k for k, _ in _answers(a) if k in ans_b]
        rows.append({"a": la, "b": lb, "agree": {k: agree_tokens(ans_a[k], ans_b[k]) for k in keys},
                     "of": {k: max(len(ans_a[k]), len(ans_b[k])) for k in keys}})
    speed = {f"{run}:{_stem(r)}": {str(q["context"]): q.get("decode_tokens_per_s") for q in r.get("requests", [])}
             for run, results in _own(runs).items() for r in results}
    return {"pairs": rows, "decode_tokens_per_s": speed}


def markdown(cmp: Dict[str, Any], title: str) -> str:
    keys = list(dict.fromkeys(k for row in cmp["pairs"] for k in row["agree"]))
    lines = [f"# {title}", "", "Generated tokens equal before the first difference (greedy), per request:", "",
             "| a | b | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in cmp["pairs"]:
        cells = [f"{row['agree'][k]}/{row['of'][k]}" if k in row["agree"] else "" for k in keys]
        lines.append(f"| {row['a']} | {row['b']} | " + " | ".join(cells) + " |")
    ctx = list(dict.fromkeys(c for v in cmp["decode_tokens_per_s"].values() for c in v))
    lines += ["", "Decode tokens/s as each run recorded it:", "",
              "| run:policy | " + " | ".join(ctx) + " |", "|---|" + "---|" * len(ctx)]
    for cell, v in cmp["decode_tokens_per_s"].items():
        lines.append(f"| {cell} | " + " | ".join("n/a" if v.get(c) is None else f"{v[c]:.1f}" for c in ctx) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvtier_sglang.serve_compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN.json", help="serve_check JSON files, each with a label")
    p.add_argument("--name", default="serve-compare")
    p.add_argument("--title", default="serve_check runs compared")
    add_results_dir_argument(p, "--out-dir")
    args = p.parse_args(argv)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            print(f"serve_compare: expected LABEL=RUN.json, found {spec!r}", file=sys.stderr)
            return 2
        try:
            results = json.loads(Path(path).read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"serve_compare: {path}: expected a serve_check JSON with 'results': {exc}", file=sys.stderr)
            return 2
        runs[label] = results
    cmp = compare_runs(runs)
    out_dir = results_dir(args.results_dir)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"runs": list(runs), **cmp}, indent=1))
    md = markdown(cmp, args.title)
    (out_dir / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
