"""Key formats and budgets on a real model's keys, every layer: what issue 35 measured, at length.

    kvtier bench capture-kv CAP.pt --model qwen2.5-coder-0.5b --task niah_single --context 8192 --queries 4
    python benchmarks/real_kv_fidelity.py CAP.pt [--results-dir DIR] [--name NAME]

A capture's real post-RoPE keys, values and queries are replayed through hgca's host store
and engine as a server splits them (64 sinks and a 1,024-token window exact, the whole
pages between on the host; `kvtier.eval.replay`), against float64 attention, per layer:

- budget `all` for each key format (int8_channel, the default; int8 with a scale per
  token, the former default; int4; bf16): the full-attention output error, selection
  left out, so what remains is the store's rounding;
- a `mass` budget (tau 0.95, capped above the host part, so the cap never binds) for each
  group reduction, default keys: the smallest share of its own host softmax mass that any
  query head holds, and the distinct tokens a kv-head read;
- 10% of the host tokens per kv-head for each group reduction: recall of each query head's
  true top-32 host tokens, and the output error.

The test fixtures (tests/data, 1,536 tokens, a few layers) hold the same bounds in CI; this
is the check at a real prompt's length over every layer of the model.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvtier.bench.results import add_results_dir_argument, machine, markdown_table, started_commit, write
from kvtier.config import from_mapping
from kvtier.eval.capture import load_capture
from kvtier.eval.replay import replay

WINDOW = {"sink_tokens": 64, "window_tokens": 1024, "page_tokens": 16}
FORMATS = ("int8_channel", "int8", "int4", "bf16")
REDUCES = ("per_qhead", "max", "mean")
TAU = 0.95


def run(cap, threads: int, **sections):
    return replay(cap, from_mapping({"policy": "hgca", "window": WINDOW, **sections}), threads=threads)


def measure(cap, threads: int = 0):
    """Per layer: every cell's numbers (keys of the row dicts name the cell)."""
    rows = None
    host = None

    def add(prefix, reps, fields):
        nonlocal rows
        if rows is None:
            rows = [{"layer": r.layer} for r in reps]
        for row, r in zip(rows, reps):
            for name, attr in fields:
                row[f"{prefix}_{name}"] = round(float(getattr(r, attr)), 4)

    for fmt in FORMATS:
        reps = run(cap, threads, budget={"kind": "all"}, host_store={"key_format": fmt})
        host = reps[0].host_tokens
        add(f"all_{fmt}", reps, [("err", "rel_err")])
        print(f"  budget all, {fmt} keys: worst layer error {max(r.rel_err for r in reps):.4f}", flush=True)
    for reduce in REDUCES:
        reps = run(cap, threads, budget={"kind": "mass", "threshold": TAU, "max_tokens": host + 16},
                   hgca={"group_reduce": reduce})
        add(f"mass_{reduce}", reps, [("held", "mass"), ("tokens", "tokens")])
        print(f"  mass {TAU}, {reduce}: least mass held {min(r.mass for r in reps):.3f}", flush=True)
        reps = run(cap, threads, budget={"kind": "tokens", "tokens": max(1, host // 10)},
                   hgca={"group_reduce": reduce})
        add(f"top10_{reduce}", reps, [("recall", "recall"), ("err", "rel_err"), ("tokens", "tokens")])
        print(f"  10% tokens, {reduce}: mean top-32 recall {sum(r.recall for r in reps) / len(reps):.3f}",
              flush=True)
    return rows, host


def summarize(rows, host):
    s = {"host_tokens": host, "layers": len(rows)}
    for fmt in FORMATS:
        errs = [r[f"all_{fmt}_err"] for r in rows]
        s[f"all_{fmt}_worst_err"] = max(errs)
        s[f"all_{fmt}_worst_layer"] = rows[errs.index(max(errs))]["layer"]
        s[f"all_{fmt}_layers_over_0.02"] = sum(e > 0.02 for e in errs)
    for reduce in REDUCES:
        s[f"mass_{reduce}_least_held"] = min(r[f"mass_{reduce}_held"] for r in rows)
        s[f"mass_{reduce}_mean_tokens"] = round(sum(r[f"mass_{reduce}_tokens"] for r in rows) / len(rows), 1)
        s[f"top10_{reduce}_mean_recall"] = round(sum(r[f"top10_{reduce}_recall"] for r in rows) / len(rows), 4)
        s[f"top10_{reduce}_min_recall"] = min(r[f"top10_{reduce}_recall"] for r in rows)
        s[f"top10_{reduce}_worst_err"] = max(r[f"top10_{reduce}_err"] for r in rows)
    return s


def main(argv=None) -> int:
    started_commit()  # the commit this run starts from, recorded before a long run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0: every online CPU)")
    ap.add_argument("--name", default="real-kv-fidelity")
    add_results_dir_argument(ap)
    args = ap.parse_args(argv)
    cap = load_capture(args.capture)
    print(f"real_kv_fidelity: {cap.meta.get('model')}, {cap.context} tokens, {cap.n_layers} layers, "
          f"{cap.q.shape[1]} queries", flush=True)
    rows, host = measure(cap, args.threads)
    s = summarize(rows, host)
    headline = (f"{cap.meta.get('model')} at {cap.context} tokens ({host} on the host), every layer: budget all, "
                f"worst layer error int8_channel {s['all_int8_channel_worst_err']:.4f} (layer "
                f"{s['all_int8_channel_worst_layer']}), int8 {s['all_int8_worst_err']:.4f} (layer "
                f"{s['all_int8_worst_layer']}), bf16 {s['all_bf16_worst_err']:.4f}; mass {TAU}: least held "
                + ", ".join(f"{r} {s[f'mass_{r}_least_held']:.3f}" for r in REDUCES)
                + "; 10% tokens, mean top-32 recall "
                + ", ".join(f"{r} {s[f'top10_{r}_mean_recall']:.3f}" for r in REDUCES))
    cols = ["layer"] + [f"all_{f}_err" for f in FORMATS] + [f"mass_{r}_held" for r in REDUCES] \
        + [f"mass_{r}_tokens" for r in REDUCES] + [f"top10_{r}_recall" for r in REDUCES]
    payload = {"bench": "real_kv_fidelity", "machine": machine(), "data": {"kind": "capture", **cap.meta},
               "window": WINDOW, "mass_threshold": TAU, "summary": s, "headline": headline, "rows": rows}
    md = markdown_table(rows, cols) + "\n```\n" + json.dumps(s, indent=1) + "\n```\n\n" + headline + "\n"
    path = write(args.name, payload, md, out_dir=args.results_dir)
    print(headline)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
