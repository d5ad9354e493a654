"""`kvtier bench compare`: every policy side by side, in one run on one machine, in one table.

Each policy runs the decode bench's cells (`kvtier bench decode`: the same stack,
the same context, synthetic or replayed from a real model's capture with
`--kv`) at batch 1 and at the largest batch its memory admits, and one more,
untimed, probe step measures on the same data what the timed steps attended:
top-32 recall and attention mass captured against full attention (float64,
request 0, sampled layers) and the host-store bytes the strategy reads per step.
The task accuracy of each policy comes from `kvtier eval` result files
(`--eval`), matched by label: the bench's name with `_` as `-` (a policy file's
stem), or as `--accuracy-label NAME=LABEL` says.

The last line is
``best_tokens_per_s_vs_dense=<x> at_accuracy_gap_points=<y> policies=<n>``:
the fastest policy (best tokens/s over its batches, at the longest context)
whose accuracy is within `--gap-points` of dense's, over dense's best (dense
with CUDA graphs where it ran, else eager dense); `nan` when no policy has an
accuracy within the gap. n counts the policies that ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import decode
from .results import machine, markdown_table, write

DENSE = ("dense_graph", "dense")  # the baseline, strongest first
COLUMNS = ["policy", "context", "batch", "ms_per_step", "ms_per_step_median", "ms_per_step_max", "tokens_per_s",
           "vs_dense", "device_kv_gib", "host_kv_gib", "host_read_mib_per_step", "pcie_mib_per_step", "rel_err",
           "top32_recall", "mass_captured", "accuracy", "accuracy_gap", "eval_label", "status"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    decode.add_arguments(parser)
    parser.add_argument("--eval", action="append", default=[], metavar="FILE",
                        help="a `kvtier eval` result (.json) whose accuracies join the table (repeatable; a later "
                             "file's label wins)")
    parser.add_argument("--accuracy-label", action="append", default=[], metavar="NAME=LABEL",
                        help="take policy NAME's accuracy from the eval row labelled LABEL (repeatable)")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="the largest batch tried per policy (default 64, quick 2): batch 1 and the largest "
                             "that fits, up to this")
    parser.add_argument("--gap-points", type=float, default=1.0,
                        help="the accuracy gap to dense, in points, within which a policy may be the best "
                             "(default 1)")
    parser.add_argument("--rejoin", action="append", default=[], metavar="COMPARE.json",
                        help="run nothing: take the rows of earlier compare results (repeatable: runs of one "
                             "machine, e.g. batch 1 and the largest batches, merged; a stopped run's "
                             "<name>.partial.json too) and join them with --eval again, for accuracy measured "
                             "elsewhere or later; writes compare-rejoined (--name)")
    parser.add_argument("--name", default=None, help="the result files' name (default compare-<device>)")


def run(args: argparse.Namespace) -> int:
    labels = _labels(args.accuracy_label)
    if isinstance(labels, str):
        print(f"kvtier bench compare: --accuracy-label: {labels}", file=sys.stderr)
        return 2
    accuracy = _eval_accuracy(args.eval)
    if isinstance(accuracy, str):
        print(f"kvtier bench compare: --eval: {accuracy}", file=sys.stderr)
        return 2
    if args.rejoin:
        return _rejoin(args, accuracy, labels)
    if args.max_batch < 0:
        print(f"kvtier bench compare: --max-batch expects an int >= 0, got {args.max_batch}", file=sys.stderr)
        return 2
    su = decode._setup(args, "compare", probe_steps=1)
    if isinstance(su, int):
        return su
    max_batch = args.max_batch or (2 if su.quick else 64)
    cells = []
    for context in su.contexts:
        for name in args.policies:
            batches = args.batches or sorted({1, max(1, min(su.fits(name, context, max_batch), max_batch))})
            cells += [(context, b, name) for b in batches]
    name = args.name or f"compare-{'quick-' if su.quick else ''}{su.device.type}"
    partial = decode.PartialResults(name, args.results_dir,
                                    {"bench": "compare", "quick": su.quick, "device": str(su.device),
                                     "machine": machine(), "data": su.data, "shape": su.shape._asdict(),
                                     "budget_tokens": su.budget, "key_format": args.key_format,
                                     "memory": su.memory}, len(cells))
    rows = list(decode._measure(su, cells, probe=True, on_row=partial))
    rows = _join(rows, accuracy, labels)
    summary = _summary(rows, args.gap_points)
    payload = {"bench": "compare", "quick": su.quick, "device": str(su.device), "machine": machine(),
               "data": su.data, "shape": su.shape._asdict(), "budget_tokens": su.budget, "key_format": args.key_format,
               "eval_files": [str(p) for p in args.eval], "gap_points": args.gap_points, "rows": rows,
               "summary": summary, "memory": su.memory,
               "configs": {name: json.loads(su.configs[name].model_dump_json()) for name in args.policies}}
    path = write(name, payload, markdown_table(rows, COLUMNS), out_dir=args.results_dir)
    partial.done()
    _plot(rows, summary, path.with_suffix(".png"))
    print(f"wrote {path}")
    print(last_line(summary))
    return 0


JOINED = ("vs_dense", "vs_dense_of", "accuracy", "accuracy_gap", "eval_label", "eval_file", "eval_contexts")


def _rejoin(args: argparse.Namespace, accuracy, labels) -> int:
    """Rows of earlier compare runs of one machine, joined with the eval files given: no cell runs."""
    runs = []
    for f in args.rejoin:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError) as exc:
            print(f"kvtier bench compare: --rejoin: cannot read {f}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(data, dict) or data.get("bench") != "compare" or not isinstance(data.get("rows"), list):
            print(f"kvtier bench compare: --rejoin: {f} is not a `kvtier bench compare` result (expected "
                  "bench 'compare' and a list of rows)", file=sys.stderr)
            return 2
        runs.append((f, data))
    first = runs[0][1]
    for f, data in runs[1:]:
        for key in ("machine", "shape", "data", "budget_tokens", "key_format"):
            if data.get(key) != first.get(key):
                print(f"kvtier bench compare: --rejoin: {f} differs from {runs[0][0]} in {key!r} "
                      f"({data.get(key)!r} against {first.get(key)!r}); only runs of one machine and setup "
                      "merge", file=sys.stderr)
                return 2
    rows = [{k: v for k, v in r.items() if k not in JOINED} for _, d in runs for r in d["rows"]]
    rows = _join(rows, accuracy, labels)
    summary = _summary(rows, args.gap_points)
    configs = {}
    for _, d in runs:
        configs.update(d.get("configs") or {})
    payload = {"bench": "compare", "quick": first.get("quick"), "device": first.get("device"),
               "machine": first.get("machine"), "data": first.get("data"), "shape": first.get("shape"),
               "budget_tokens": first.get("budget_tokens"), "key_format": first.get("key_format"),
               "merged_from": [{"file": f, "date": d.get("date"), "command": d.get("command"),
                                "commit": d.get("commit")} for f, d in runs],
               "eval_files": [str(p) for p in args.eval], "gap_points": args.gap_points, "rows": rows,
               "summary": summary, "memory": first.get("memory"), "configs": configs}
    path = write(args.name or "compare-rejoined", payload, markdown_table(rows, COLUMNS), out_dir=args.results_dir)
    _plot(rows, summary, path.with_suffix(".png"))
    print(f"wrote {path}")
    print(last_line(summary))
    return 0


def last_line(summary: Dict[str, object]) -> str:
    x, y = summary.get("best_tokens_per_s_vs_dense"), summary.get("at_accuracy_gap_points")
    fmt = (lambda v: "nan" if v is None else f"{v:.3f}")
    return f"best_tokens_per_s_vs_dense={fmt(x)} at_accuracy_gap_points={fmt(y)} policies={summary['policies']}"


def _labels(pairs: List[str]):
    out: Dict[str, str] = {}
    for pair in pairs:
        name, sep, label = pair.partition("=")
        if not sep or not name or not label:
            return f"expected NAME=LABEL, got {pair!r}"
        if name not in decode.POLICIES + decode.EXTRA:
            return f"{name!r} is not a policy of the bench; expected one of {list(decode.POLICIES + decode.EXTRA)}"
        out[name] = label
    return out


def _eval_accuracy(files: List[str]):
    """label -> (accuracy in points, the file it came from, the contexts it covers), from eval result files."""
    out: Dict[str, Tuple[float, str, List[int]]] = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError) as exc:
            return f"cannot read {f}: {exc}"
        # `kvtier eval` writes its rows as 'cells' (accuracy in points); older result sets as 'summary'
        summary = None
        if isinstance(data, dict):
            summary = data.get("cells") if isinstance(data.get("cells"), list) else data.get("summary")
        if not isinstance(summary, list) or not summary or not all(
                isinstance(r, dict) and "policy" in r and "accuracy" in r for r in summary):
            return (f"{f} is not a `kvtier eval` result (expected a 'cells' or 'summary' list of rows with "
                    "policy and accuracy)")
        by: Dict[str, List[Tuple[Optional[int], float]]] = {}
        for r in summary:
            by.setdefault(r["policy"], []).append((r.get("context"), float(r["accuracy"])))
        points = _points_scale(summary)
        for label, accs in by.items():
            contexts = sorted(c for c, _ in accs if c is not None) or list(data.get("settings", {}).get("contexts", []))
            out[label] = (points * sum(a for _, a in accs) / len(accs), f, contexts)
    return out


def _points_scale(summary) -> float:
    """Eval results give accuracy as a fraction (older sets) or in points: 100 or 1 to read points."""
    return 100.0 if all(0.0 <= float(r["accuracy"]) <= 1.0 for r in summary) else 1.0


def _join(rows, accuracy, labels) -> List[Dict[str, object]]:
    base = _dense_best(rows)
    dense_acc = accuracy.get(labels.get("dense", "dense"))
    for r in rows:
        if r.get("status") != "ok":
            continue
        b = base.get(r["context"])
        if b:
            r["vs_dense"] = r["tokens_per_s"] / b[1]
            r["vs_dense_of"] = b[0]
        label = labels.get(r["policy"], r["policy"].replace("_", "-"))
        if r["policy"] == "dense_graph" and r["policy"] not in labels:
            label = labels.get("dense", "dense")  # the same attention as dense: the same answers
        if label in accuracy:
            acc, f, ctxs = accuracy[label]
            r.update(accuracy=acc, eval_label=label, eval_file=f, eval_contexts=ctxs)
            if dense_acc is not None:
                r["accuracy_gap"] = dense_acc[0] - acc
    return rows


def _dense_best(rows) -> Dict[int, Tuple[str, float]]:
    """Per context: the baseline dense (with CUDA graphs where it ran) and its best tokens/s over batches."""
    best: Dict[Tuple[str, int], float] = {}
    for r in rows:
        if r["policy"] in DENSE and r.get("status") == "ok":
            key = (r["policy"], r["context"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    out: Dict[int, Tuple[str, float]] = {}
    for (name, c), tps in best.items():
        if c not in out or DENSE.index(name) < DENSE.index(out[c][0]):
            out[c] = (name, tps)
    return out


def _summary(rows, gap_points: float) -> Dict[str, object]:
    ok = [r for r in rows if r.get("status") == "ok"]
    ran = sorted({r["policy"] for r in ok})
    summary: Dict[str, object] = {"policies": len(ran), "gap_points": gap_points,
                                  "best_tokens_per_s_vs_dense": None, "at_accuracy_gap_points": None}
    if not ok:
        return summary
    ctx = max(r["context"] for r in ok)
    base = _dense_best(ok).get(ctx)
    summary.update(context=ctx, dense_baseline=base[0] if base else None,
                   dense_tokens_per_s=base[1] if base else None)
    best: Dict[str, Dict[str, object]] = {}
    for r in ok:
        if r["context"] == ctx and r["policy"] not in DENSE and r.get("accuracy_gap") is not None \
                and r["accuracy_gap"] <= gap_points:
            if r["policy"] not in best or r["tokens_per_s"] > best[r["policy"]]["tokens_per_s"]:
                best[r["policy"]] = r
    if best and base:
        top = max(best.values(), key=lambda r: r["tokens_per_s"])
        summary.update(best_policy=top["policy"], best_batch=top["batch"], best_tokens_per_s=top["tokens_per_s"],
                       best_tokens_per_s_vs_dense=top["tokens_per_s"] / base[1],
                       at_accuracy_gap_points=top["accuracy_gap"])
    return summary


def _plot(rows, summary, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')")
        return
    ctx = summary.get("context")
    pts = [r for r in rows if r.get("status") == "ok" and r["context"] == ctx and r["batch"] == 1
           and r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
        ax.scatter(r["ms_per_step"], r["accuracy"])
        ax.annotate(r["policy"], (r["ms_per_step"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per decode step (context {ctx}, batch 1)")
    ax.set_ylabel("task accuracy (points, kvtier eval)")
    if not pts:
        ax.text(0.5, 0.5, "no policy has an eval accuracy (--eval)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["COLUMNS", "add_arguments", "last_line", "run"]
