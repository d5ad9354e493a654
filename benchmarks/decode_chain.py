"""Where a decode step goes: a Qwen2.5-0.5B-shaped stack through the tier, one request.

    python benchmarks/decode_chain.py [--contexts 30000,120000] [--threads 15] [--steps 30]

24 layers (14 query / 2 kv heads, head_dim 64, hidden 896) with random weights
and real QKV/output projections, `hgca` (mass 0.95, at most 2048 host tokens per
kv-head, int8 keys) against `dense`, on CUDA (the pipelined path when it is
available) or, slowly, on the CPU. Per case, medians over the steps of:
  issue_ms   the decoding thread's time to queue the step's 24 layers;
  step_ms    the step's wall time (queued and finished);
  engine_ms  the CPU engine's time summed over the layers;
  run_ms     the decoding thread's time inside HybridAttention.run.
When issue_ms is close to step_ms the step is bound by the decoding thread;
when engine_ms is, by the engine. Writes decode-chain.{json,md} to the results directory
(--results-dir; default $KVTIER_RESULTS_DIR, else ~/.cache/kvtier/results).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvtier.bench import results
from kvtier.bench.stack import fill_context, make_weights, output, project_qkv
from kvtier.config import ModelShape, from_mapping
from kvtier.runtime.standalone import StandaloneTier, resolve_device

SHAPE, HIDDEN = ModelShape(24, 14, 2, 64), 896


def _config(policy: str, threads: int):
    budget = {"kind": "mass", "threshold": 0.95, "max_tokens": 2048} if policy == "hgca" else {"kind": "all"}
    return from_mapping({"policy": policy, "window": {"sink_tokens": 64, "window_tokens": 1024, "page_tokens": 16},
                         "host_store": {"key_format": "int8", "value_format": "bf16"}, "budget": budget,
                         "engine": {"threads": threads}})


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case(policy: str, context: int, threads: int, steps: int, device, dtype, weights) -> dict:
    dev_tokens = context + steps + 2048 if policy == "dense" else 4096
    st = StandaloneTier(_config(policy, threads), SHAPE, device=device, dtype=dtype, device_tokens=dev_tokens,
                        host_tokens=context)
    inside = [0.0]
    run = st.attn.run

    def timed_run(q, layer):
        t0 = time.perf_counter()
        out = run(q, layer)
        inside[0] += time.perf_counter() - t0
        return out

    st.attn.run = timed_run
    try:
        fill_context(st.tier, SHAPE, weights, 0, context, device=device, dtype=dtype)
        x0 = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        rows = []
        for i in range(steps + 3):  # three warm-up steps
            _sync(device)
            inside[0] = 0.0
            s0 = time.perf_counter()
            slots = st.tier.extend(0, 1).to(device)
            st.attn.plan([0])
            p0 = time.perf_counter()
            x = x0
            for layer in range(SHAPE.n_layers):
                q, k, v = project_qkv(x, weights, layer, SHAPE)
                st.pool.k[layer, slots] = k
                st.pool.v[layer, slots] = v
                x = output(x, st.attn.run(q, layer), weights, layer)
            p1 = time.perf_counter()
            _sync(device)
            s1 = time.perf_counter()
            st.tier.evict()
            engine_s = st.attn.take_times().cpu_s
            if i >= 3:
                rows.append(((p1 - p0) * 1e3, (s1 - s0) * 1e3, engine_s * 1e3, inside[0] * 1e3))
        med = [statistics.median(c) for c in zip(*rows)]
        return {"policy": policy, "context": context, "threads": threads if policy != "dense" else 0,
                "pipelined": st.attn.pipelined, "issue_ms": med[0], "step_ms": med[1], "engine_ms": med[2],
                "run_ms": med[3], "steps": steps}
    finally:
        st.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="30000,120000")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0: the policy default)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="decode-chain")
    results.add_results_dir_argument(ap)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = make_weights(SHAPE, HIDDEN, device=device, dtype=dtype)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for policy in ("dense", "hgca"):
            r = case(policy, context, args.threads, args.steps, device, dtype, weights)
            print(f"{policy:6s} {context:7d}: issue {r['issue_ms']:7.2f}  step {r['step_ms']:7.2f}  engine "
                  f"{r['engine_ms']:7.2f}  run {r['run_ms']:7.2f} ms/step  pipelined {r['pipelined']}", flush=True)
            rows.append(r)
    cols = ["policy", "context", "pipelined", "issue_ms", "step_ms", "engine_ms", "run_ms"]
    path = results.write(args.name, {"bench": "decode_chain", "device": str(device), "machine": results.machine(),
                                     "shape": SHAPE._asdict() if hasattr(SHAPE, "_asdict") else str(SHAPE),
                                     "rows": rows},
                         "# Where a decode step goes (Qwen2.5-0.5B shape, one request)\n\n"
                         + results.markdown_table(rows, cols), out_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
