"""`kvtier bench decode`: Llama-3-8B-shaped decode, dense vs offload_all vs hgca.

Each (context, batch, policy) cell fills the tiers with the same synthetic
context, decodes a few steps through the stack, and reports ms per step,
tokens/s, device and host KV bytes, and the attention error against dense
attention over the same q and the full context (sampled layers). Cells that
do not fit in memory are reported as such, not run (with --no-fit-check those
whose device KV does not fit run anyway, to fail for real or not).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from ..config import ModelShape, from_mapping
from ..config.shape import device_bytes_per_token
from .arguments import positive_ints
from .results import add_results_dir_argument, machine, markdown_table, provenance, results_dir, write
from .dense_graph import run_dense_graph
from .stack import (HIDDEN, LLAMA3_8B, LLAMA3_8B_MLP, LLAMA3_8B_VOCAB, Replay, StackWeights, fill_context,
                    make_weights, next_input, output, project_qkv, request_kv)

POLICIES = ("dense", "offload_all", "hgca")
# hgca with the summary prefilter (64-token pages, 32-token summary chunks, 4x the budget in candidates);
# hgca with the residual (the unselected host tokens as one mean key and value per 16-token chunk);
# hgca with overlap off (the engine after the window, one after the other: what overlap saves);
# dense with the whole step in one CUDA graph (the strongest dense: dense_graph.py);
# hcattention: the GPU selects per query head from compressed keys (codebook head_dim/4 x 256, or 4-bit
# keys), mass 0.9 capped at the budget, the host sums the selected values at the approximate logits
# (the paper); hcattention_exact recomputes their logits from the host keys (the policy's default);
# hcattention_kv does so over one set per kv-head, its query heads' union (exact_sets: kv_head)
EXTRA = ("hgca_prefilter", "hgca_residual", "hgca_serial", "dense_graph", "hcattention", "hcattention_int4",
         "hcattention_exact", "hcattention_kv", "sparda", "sparda_fetch", "sparda_none", "fluxion", "fluxion_cpu",
         "hgca_token_scales")
# sparda: a device cache of 64-token blocks chosen a step ahead (reuse), the misses on the CPU; sparda_fetch
# fetches the misses before attending; sparda_none (SparDA's own) leaves them out
# hgca_token_scales: hgca with a scale per token of int8 keys (the former default; int16 band scoring)
# fluxion: head classes with their own blocks and budgets (the default classes, their mean capped at the
# hgca budget; 64-token pages), output-aware trimming, the blocks split between the CPU engine and the
# GPU at measured rates; fluxion_cpu: the same with gpu_share off (every block on the CPU: no scheduler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes for CPU machines and CI")
    parser.add_argument("--contexts", type=positive_ints, help="e.g. 32768,131072")
    parser.add_argument("--batches", type=positive_ints, help="e.g. 1,4,16")
    parser.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES + EXTRA),
                        help=f"comma list of {', '.join(POLICIES + EXTRA)} (default: all)")
    parser.add_argument("--prefilter", type=float, default=4.0,
                        help="hgca_prefilter's candidates as a multiple of the budget (default 4)")
    parser.add_argument("--steps", type=int, default=0, help="timed decode steps per cell")
    parser.add_argument("--budget-tokens", type=int, default=0, help="hgca per-head budget (default 2048, quick 256)")
    parser.add_argument("--key-format", default="int8_channel", choices=("int8_channel", "int8", "int4", "bf16"),
                        help="the host key format of every policy but offload_all and hgca_token_scales (default "
                             "int8_channel, the policies' own default)")
    parser.add_argument("--value-format", default="bf16", choices=("bf16", "int8"),
                        help="hgca's host value format (default bf16; int8 holds more requests per GiB)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU engine worker threads (default: the policy's, 0 = all usable cores)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--host-gib", type=float, default=0, help="host memory the stores may use (default: 90%% of what is available)")
    parser.add_argument("--full-model", action="store_true",
                        help="add Llama-3-8B's SwiGLU MLPs and untied embedding and LM head (random weights): the "
                             "device then holds a whole 8B model's weights and each step does its GPU work")
    parser.add_argument("--device-gib", type=float, default=0,
                        help="treat the GPU as having this much memory: PyTorch may allocate it less what the CUDA "
                             "context already holds (e.g. 79.6 for an 80 GB H100; default: the whole GPU)")
    parser.add_argument("--kv", metavar="FILE",
                        help="replay a capture's real K, V and queries (kvtier bench capture-kv) instead of synthetic "
                             "ones: the model's shape and context, one captured query per step")
    parser.add_argument("--synthetic", default="runs", choices=("runs", "scattered"),
                        help="the synthetic contexts (without --kv): runs, calibrated against a real model's capture "
                             "(default), or scattered, the former generator (single salient tokens, i.i.d. values)")
    parser.add_argument("--no-fit-check", action="store_true",
                        help="also run the cells whose device KV the accounting rejects, to see whether they really "
                             "fail (host limits still apply)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after each cell's timed steps, N more under torch's profiler: the row gets where a "
                             "step's time goes (the tier's phases, the top operators and kernels) and the tables "
                             "go to <results>/<run>-profile-<policy>-<context>-b<batch>.txt (default 0: off)")
    add_results_dir_argument(parser)


def _configs(window: int, sinks: int, budget: int, key_format: str = "int8_channel",
             prefilter: float = 4.0, value_format: str = "bf16") -> Dict[str, object]:
    win = {"sink_tokens": sinks, "window_tokens": window, "page_tokens": 16}
    hc_budget = {"kind": "mass", "threshold": 0.9, "max_tokens": budget}
    return {
        "hgca_prefilter": from_mapping({
            "policy": "hgca", "window": {**win, "page_tokens": 64}, "budget": {"kind": "tokens", "tokens": budget},
            "host_store": {"key_format": key_format, "value_format": value_format, "summary_tokens": 32},
            "hgca": {"prefilter": prefilter}}),
        "dense": from_mapping({"policy": "dense", "window": win}),
        "offload_all": from_mapping({"policy": "offload_all", "window": win, "budget": {"kind": "all"},
                                     "host_store": {"key_format": "bf16"}}),
        "hgca": from_mapping({"policy": "hgca", "window": win, "budget": {"kind": "tokens", "tokens": budget},
                              "host_store": {"key_format": key_format, "value_format": value_format}}),
        "hgca_residual": from_mapping({
            "policy": "hgca", "window": win, "budget": {"kind": "tokens", "tokens": budget},
            "host_store": {"key_format": key_format, "value_format": value_format}, "hgca": {"residual": True}}),
        "dense_graph": from_mapping({"policy": "dense", "window": win}),
        "hcattention": from_mapping({"policy": "hcattention", "window": win, "budget": hc_budget,
                                     "hcattention": {"logits": "approximate"},
                                     "host_store": {"key_format": key_format, "value_format": value_format}}),
        "hcattention_int4": from_mapping({
            "policy": "hcattention", "window": win, "budget": hc_budget,
            "hcattention": {"key_bits": 4, "logits": "approximate"},
            "host_store": {"key_format": key_format, "value_format": value_format}}),
        "hcattention_exact": from_mapping({
            "policy": "hcattention", "window": win, "budget": hc_budget, "hcattention": {"logits": "exact"},
            "host_store": {"key_format": key_format, "value_format": value_format}}),
        "hcattention_kv": from_mapping({
            "policy": "hcattention", "window": win, "budget": hc_budget,
            "hcattention": {"logits": "exact", "exact_sets": "kv_head"},
            "host_store": {"key_format": key_format, "value_format": value_format}}),
        **{name: from_mapping({"policy": "sparda", "window": win, "budget": {"kind": "tokens", "tokens": budget},
                               "host_store": {"key_format": key_format, "value_format": value_format},
                               "sparda": {"correction": correction}})
           for name, correction in (("sparda", "cpu"), ("sparda_fetch", "fetch"), ("sparda_none", "none"))},
        **{name: from_mapping({"policy": "fluxion", "window": {**win, "page_tokens": 64},
                               "budget": {"kind": "tokens", "tokens": budget},
                               "host_store": {"key_format": key_format, "value_format": value_format},
                               "fluxion": {"gpu_share": share}})
           for name, share in (("fluxion", "auto"), ("fluxion_cpu", "off"))},
        "hgca_token_scales": from_mapping({
            "policy": "hgca", "window": win, "budget": {"kind": "tokens", "tokens": budget},
            "host_store": {"key_format": "int8", "value_format": value_format}}),
        "hgca_serial": from_mapping({
            "policy": "hgca", "window": win, "budget": {"kind": "tokens", "tokens": budget},
            "host_store": {"key_format": key_format, "value_format": value_format}, "hgca": {"overlap": False}}),
    }


def run(args: argparse.Namespace) -> int:
    setup = _setup(args, "decode")
    if isinstance(setup, int):
        return setup
    cells = [(c, b, p) for c in setup.contexts for b in setup.batches for p in args.policies]
    partial = PartialResults(f"decode-{'quick-' if setup.quick else ''}{setup.device.type}", args.results_dir,
                             {"bench": "decode", "device": str(setup.device), "machine": machine(),
                              "data": setup.data, "shape": setup.shape._asdict()}, len(cells))
    rows = list(_measure(setup, cells, on_row=partial))
    partial.done()
    return _report(rows, setup.quick, setup.device, setup.shape, setup.budget, args.key_format, args.prefilter,
                   setup.capacity(args.policies), setup.memory, setup.data, out_dir=args.results_dir)


class Setup(argparse.Namespace):
    """What every cell of a decode run shares: shape, weights, configs, memory limits, data."""

    def need(self, name: str, batch: int, context: int):
        """Device tokens, device bytes and host bytes a cell needs (the KV only)."""
        cfg = self.configs[name]
        dense = name in ("dense", "dense_graph")
        dev_tokens = batch * (context + self.steps + 8) if dense else \
            batch * (self.sinks + self.window + cfg.window.page_tokens + self.steps + 8)
        need_dev = dev_tokens * device_bytes_per_token(self.shape, 2 if self.dtype == torch.bfloat16 else 4)
        need_host = 0 if dense else batch * context * cfg.host_bytes_per_token(self.shape)
        return dev_tokens, need_dev, need_host

    def fits(self, name: str, context: int, limit: int = 4096) -> int:
        """The largest batch whose KV fits the device and host memory left (accounting, not a run)."""
        b = 0
        while b < limit and all(x <= cap for x, cap in zip(self.need(name, b + 1, context)[1:],
                                                           (self.dev_cap, self.host_cap))):
            b += 1
        return b

    def capacity(self, policies) -> Dict[str, Dict[str, int]]:
        return {str(c): {name: self.fits(name, c) for name in policies} for c in self.contexts}


def _setup(args: argparse.Namespace, command: str, probe_steps: int = 0):
    """The run's shared state, or an exit code after printing why it cannot run. probe_steps: the
    untimed steps after the timed ones that a capture must hold queries for too."""
    from ..runtime.ranks import host_memory_available
    from ..runtime.standalone import resolve_device

    device = resolve_device(args.device)
    quick = args.quick
    shape = ModelShape(2, 32, 8, 128) if quick else LLAMA3_8B
    hidden = 1024 if quick else HIDDEN
    contexts = args.contexts or ([2048, 8192] if quick else [32768, 131072])
    batches = args.batches or ([1, 2] if quick else [1, 4, 16])
    steps = args.steps or (2 if quick else 8)
    replay = None
    if args.kv:
        from ..eval.capture import CaptureFileError, load_capture

        try:
            cap = load_capture(args.kv)
        except CaptureFileError as exc:
            print(f"kvtier bench {command}: --kv {exc}", file=sys.stderr)
            return 2
        L, hq, hkv, d = cap.n_layers, cap.q.shape[2], cap.k.shape[2], cap.k.shape[3]
        shape, hidden, replay = ModelShape(L, hq, hkv, d), hq * d, Replay(cap.k, cap.v, cap.q)
        why = None
        if args.contexts and args.contexts != [cap.context]:
            why = f"--contexts: a capture replays its own context, {cap.context} tokens; got {args.contexts}"
        elif steps + 1 + probe_steps + getattr(args, "profile", 0) > cap.q.shape[1]:
            why = (f"--steps: the capture holds {cap.q.shape[1]} queries, for at most "
                   f"{cap.q.shape[1] - 1 - probe_steps - getattr(args, 'profile', 0)} timed steps")
        elif abs(cap.sm_scale - d ** -0.5) > 1e-6:
            why = f"the capture's softmax scale {cap.sm_scale} is not 1/sqrt({d}), which the bench's tiers use"
        if why:
            print(f"kvtier bench {command}: {why}", file=sys.stderr)
            return 2
        contexts = [cap.context]
    profile = getattr(args, "profile", 0) or 0
    if profile < 0:
        print(f"kvtier bench {command}: --profile expects an int >= 0, got {profile}", file=sys.stderr)
        return 2
    budget = args.budget_tokens or (256 if quick else 2048)
    window, sinks = (256, 16) if quick else (1024, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unknown = sorted(set(args.policies) - set(POLICIES + EXTRA))
    if unknown:
        print(f"kvtier bench {command}: unknown policies {unknown}; expected some of {list(POLICIES + EXTRA)}",
              file=sys.stderr)
        return 2
    configs = _configs(window, sinks, budget, args.key_format, args.prefilter, args.value_format)
    if args.threads is not None:
        if args.threads < 0:
            print(f"kvtier bench {command}: --threads expects an int >= 0, got {args.threads}", file=sys.stderr)
            return 2
        configs = {k: c.model_copy(update={"engine": c.engine.model_copy(update={"threads": args.threads})})
                   for k, c in configs.items()}
    device_limit = 0
    if args.device_gib:
        device_limit = _cap_device(device, args.device_gib)
        if isinstance(device_limit, str):
            print(f"kvtier bench {command}: --device-gib: {device_limit}", file=sys.stderr)
            return 2
    mlp, vocab = ((4 * hidden, 8192) if quick else (LLAMA3_8B_MLP, LLAMA3_8B_VOCAB)) if args.full_model else (0, 0)
    weights = make_weights(shape, hidden, device=device, dtype=dtype, mlp=mlp, vocab=vocab, synthetic=args.synthetic)
    host_cap = int(args.host_gib * (1 << 30)) if args.host_gib else int(0.9 * (host_memory_available() or 16 << 30))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if device_limit:
            free = min(free, device_limit - torch.cuda.memory_reserved(device))
        dev_cap = int(free * 0.85)
    else:
        dev_cap = host_cap
    print(f"kvtier bench {command}: {shape.n_layers} layers, {shape.num_q_heads}q/{shape.kv_heads}kv heads, "
          f"head_dim {shape.head_dim}, hidden {hidden}, device {device}, steps {steps}, hgca budget {budget}; "
          f"weights {weights.nbytes() / 2**30:.2f} GiB{' (whole model)' if args.full_model else ''}; "
          f"KV may take {dev_cap / 2**30:.1f} GiB on the device"
          f"{f' (of a {args.device_gib:g} GiB GPU)' if args.device_gib else ''}, {host_cap / 2**30:.1f} GiB on the host")

    data = {"kind": "capture", "file": str(args.kv), **cap.meta} if replay is not None else \
        {"kind": "synthetic", "generator": args.synthetic}
    memory = {"full_model": args.full_model, "weights_gib": weights.nbytes() / 2**30,
              "device_gib": args.device_gib or None, "device_kv_cap_gib": dev_cap / 2**30,
              "host_kv_cap_gib": host_cap / 2**30, "value_format": args.value_format}
    return Setup(device=device, quick=quick, shape=shape, hidden=hidden, contexts=contexts, batches=batches,
                 steps=steps, replay=replay, budget=budget, window=window, sinks=sinks, dtype=dtype, configs=configs,
                 weights=weights, host_cap=host_cap, dev_cap=dev_cap, no_fit_check=args.no_fit_check, data=data,
                 memory=memory, profile=profile, profile_dir=results_dir(args.results_dir) if profile else None,
                 run_name=f"{command}-{'quick-' if quick else ''}{device.type}")


class _Rows(list):
    """The rows so far, handed to `on_row` after each append (a long run's partial results)."""

    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row

    def append(self, row) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(list(self))


class PartialResults:
    """`<name>.partial.json` beside a run's results, rewritten after every cell and removed once the
    run writes its own: a run stopped midway (a time limit, a crash, Ctrl-C) keeps the cells it ran."""

    def __init__(self, name: str, out_dir, header: Dict[str, object], total: int):
        self.path = results_dir(out_dir) / f"{name}.partial.json"
        self.header, self.total = header, total
        print(f"partial results after each cell: {self.path}", file=sys.stderr, flush=True)

    def __call__(self, rows) -> None:
        payload = {**provenance(), **self.header, "partial": True, "cells_done": len(rows),
                   "cells_total": self.total, "rows": rows}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def _measure(su: Setup, cells, *, probe: bool = False, on_row=None) -> List[Dict[str, object]]:
    """Run the (context, batch, policy) cells; probe: measure each cell's selection on one more,
    untimed, step (top-k recall, mass captured, host bytes read: `_probe`); on_row: called with
    the rows so far after each cell."""
    from ..runtime.standalone import StandaloneTier

    device, dtype, shape, configs, steps = su.device, su.dtype, su.shape, su.configs, su.steps
    dev_cap, host_cap = su.dev_cap, su.host_cap
    weights, hidden, replay = su.weights, su.hidden, su.replay
    rows: List[Dict[str, object]] = _Rows(on_row)
    for context, batch, name in cells:
        cfg = configs[name]
        row = {"policy": name, "context": context, "batch": batch}
        dev_tokens, need_dev, need_host = su.need(name, batch, context)
        # past the host limit a run would be killed by the OS, not fail: never tried
        if need_dev > dev_cap and not su.no_fit_check or need_host > host_cap:
            row["status"] = f"does not fit (device {need_dev / 2**30:.1f} GiB, host {need_host / 2**30:.1f} GiB)"
            print(f"  {name:12s} ctx {context:>7d} batch {batch:>3d}: {row['status']}")
            rows.append(row)
            continue
        if name == "dense_graph" and device.type != "cuda":
            row["status"] = "needs CUDA (a CUDA graph)"
            rows.append(row)
            continue
        try:
            if need_dev > dev_cap:
                row["past_accounting"] = True
            if name == "dense_graph":
                row.update(run_dense_graph(weights, shape, hidden, context, batch, steps, device, dtype,
                                           sm_scale=shape.head_dim ** -0.5, replay=replay))
                row["status"] = "ok"
                print(f"  {name:12s} ctx {context:>7d} batch {batch:>3d}: {row['ms_per_step']:9.2f} ms/step "
                      f"{row['tokens_per_s']:9.1f} tok/s  device KV {row['device_kv_gib']:.3f} GiB  "
                      f"{row['vs_byte_floor']:.2f}x its byte floor ({row['byte_floor_ms']:.2f} ms at "
                      f"{row['hbm_gbps']:.0f} GB/s)", flush=True)
                rows.append(row)
                continue
            tier = StandaloneTier(cfg, shape, device=device, dtype=dtype, device_tokens=dev_tokens,
                                  host_tokens=batch * context)
            try:
                prof_path = None if not su.profile else \
                    su.profile_dir / f"{su.run_name}-profile-{name}-{context}-b{batch}.txt"
                row.update(_run_cell(tier, weights, shape, hidden, context, batch, steps, device, dtype, replay,
                                      probe=probe, profile=su.profile, profile_path=prof_path))
            finally:
                del tier
                _release_host_cache(device)
            row["status"] = "ok"
        except Exception as exc:  # allocation failures (pinned or device), or a bug: the cell ends, the run goes on
            row["status"] = f"failed: {str(exc).splitlines()[0][:120]}"
            print(f"  {name:12s} ctx {context:>7d} batch {batch:>3d}: {row['status']}", flush=True)
            traceback.print_exc(file=sys.stderr)  # where, for a failure that is not an allocation
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(f"  {name:12s} ctx {context:>7d} batch {batch:>3d}: {row['ms_per_step']:9.2f} ms/step "
              f"{row['tokens_per_s']:9.1f} tok/s  device KV {row['device_kv_gib']:.3f} GiB  host KV "
              f"{row['host_kv_gib']:.3f} GiB  rel err {row['rel_err']:.2e}", flush=True)
        if "profile" in row:
            _print_profile(row["profile"])
        rows.append(row)
    return rows


def _print_profile(prof: Dict[str, object]) -> None:
    spans = "  ".join(f"{k} {v:.2f}" for k, v in prof["spans_ms_per_step"].items())
    print(f"      profile, ms per step: {spans}"
          + (f"  device busy {prof['device_busy_ms_per_step']:.2f}" if "device_busy_ms_per_step" in prof else ""))
    for key, label in (("top_host_self_ms_per_step", "host"), ("top_device_self_ms_per_step", "device")):
        if key in prof:
            print(f"      top {label}: " + "; ".join(f"{n} {ms:.2f} ({c:g}x)" for n, ms, c in prof[key][:8]))


def _cap_device(device, gib: float):
    """Limit PyTorch's allocations on `device` to a GPU of `gib` GiB: the bytes allowed, or why not."""
    if device.type != "cuda":
        return f"expects a CUDA device, got {device}"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    held = total - free - torch.cuda.memory_reserved(device)  # the CUDA context (and any other process)
    allowed = int(gib * 2**30) - held
    if not 0 < allowed <= free:
        return (f"expects a size above the {held / 2**30:.1f} GiB already held and at most the "
                f"{(free + held) / 2**30:.1f} GiB this GPU has free, got {gib:g}")
    torch.cuda.set_per_process_memory_fraction(allowed / total, device)
    return allowed


def _run_cell(st, w: StackWeights, shape: ModelShape, hidden: int, context: int, batch: int, steps: int,
              device, dtype, replay: Optional[Replay] = None, *, probe: bool = False, profile: int = 0,
              profile_path=None) -> Dict[str, object]:
    rids = list(range(batch))
    n_step = 0  # decode steps run (a replay's step j takes the capture's j-th query and token)
    try:
        t_fill = time.perf_counter()
        for r in rids:
            fill_context(st.tier, shape, w, r, context, device=device, dtype=dtype, replay=replay)
            if batch * context >= 1 << 20:  # long fills show progress
                print(f"    filled {r + 1}/{batch} contexts of {context} tokens "
                      f"({time.perf_counter() - t_fill:.0f} s)", file=sys.stderr, flush=True)
        gen = torch.Generator(device="cpu").manual_seed(7)
        x = torch.randn(batch, hidden, generator=gen).to(device, dtype)
        new_k = [[] for _ in range(shape.n_layers)]
        new_v = [[] for _ in range(shape.n_layers)]
        sampled = sorted({0, shape.n_layers // 2, shape.n_layers - 1})
        last_q = {}

        host_side = []  # per step: seconds in extend + plan and in evict (the tier's own work)

        details = {}  # the probe step's per-layer HybridDetail at the sampled layers

        def step(record: bool, probing: bool = False):
            nonlocal x, n_step
            h0 = time.perf_counter()
            slots = torch.cat([st.tier.extend(r, 1) for r in rids]).to(device)
            st.attn.plan(rids)
            h1 = time.perf_counter()
            for layer in range(shape.n_layers):
                q, k, v = project_qkv(x, w, layer, shape)  # the GPU work of a layer, whatever the data
                if replay is not None:
                    q, k, v = replay.step(layer, n_step, batch, device, dtype)
                st.pool.k[layer, slots] = k
                st.pool.v[layer, slots] = v
                new_k[layer].append(k.float())
                new_v[layer].append(v.float())
                if probing and layer in sampled:  # run() without overlap, its parts and selection kept
                    details[layer] = (q.float(), st.attn.run_detail(q, layer))
                    attn = details[layer][1].out.to(q.dtype)
                else:
                    attn = st.attn.run(q, layer)
                if record and layer in sampled:
                    last_q[layer] = (q.float(), attn.float())
                x = output(x, attn, w, layer)
            x = next_input(x, w)
            n_step += 1
            h2 = time.perf_counter()
            st.tier.evict()
            host_side.append((h1 - h0, time.perf_counter() - h2))

        step(False)  # warm-up: plans, FlashInfer JIT, engine threads, a block cache's first fill
        _sync(device)
        st.attn.take_times()
        if hasattr(st.attn.host, "take_stats"):
            st.attn.host.take_stats()  # block stats count the timed steps only
        each = []  # per-step wall times (a sync per step: stalls show as outliers, not as a mean)
        h2d0 = st.tier.stats().bytes_h2d
        t0 = time.perf_counter()
        for i in range(steps):
            s0 = time.perf_counter()
            step(i == steps - 1)
            _sync(device)
            each.append(time.perf_counter() - s0)
        dt = (time.perf_counter() - t0) / steps
        times = st.attn.take_times()
        try:
            err = _attention_error(shape, w, last_q, new_k, new_v, context, batch, device, replay)
        except torch.cuda.OutOfMemoryError:  # the decode ran; only its float32 reference did not fit beside it
            err = float("nan")
            print("    attention error not measured: its float32 reference did not fit in the device memory "
                  "left", file=sys.stderr, flush=True)
        h2d_timed = st.tier.stats().bytes_h2d
        blocks = _block_stats(st, steps)  # the timed steps' (before a probe step adds to them)
        split = _split_stats(st, steps, shape.n_layers)
        profiled = {}
        if profile:  # after the timed steps and their error: neither is the profiler's
            from .profile import profile_steps

            profiled = {"profile": profile_steps(lambda: step(False), profile, device, profile_path)}
        probed = {}
        if probe:
            step(False, probing=True)
            _sync(device)
            probed = _probe(st, shape, w, details, new_k, new_v, context, device, replay)
        stats = st.tier.stats()
        return {
            "ms_per_step": dt * 1e3, "tokens_per_s": batch / dt, "rel_err": err,
            "ms_per_step_median": sorted(each)[len(each) // 2] * 1e3, "ms_per_step_max": max(each) * 1e3,
            "ms_each": [round(t * 1e3, 2) for t in each],
            "ms_plan_each": [round(a * 1e3, 2) for a, _ in host_side[1:]],
            "ms_evict_each": [round(b * 1e3, 2) for _, b in host_side[1:]],
            "device_kv_gib": st.device_kv_bytes() / 2**30, "host_kv_gib": st.host_kv_bytes() / 2**30,
            "device_tokens": stats.device_tokens, "host_tokens": stats.host_tokens,
            "h2d_gib_per_step": stats.bytes_h2d / (steps + 1) / 2**30,
            "pcie_mib_per_step": (h2d_timed - h2d0) / steps / 2**20,
            "cpu_attn_ms_per_step": times.cpu_s / steps * 1e3, "gpu_attn_ms_per_step": times.gpu_s / steps * 1e3,
            "overlap_ms_per_step": times.overlap_s / steps * 1e3, "pipelined": st.attn.pipelined,
            "engine_threads": st.engine.n_threads if st.engine is not None else 0,
            "device_index_gib": st.attn.host.device_bytes / 2**30,
            **_host_reads(st, last_q, shape, batch),
            **blocks,
            **split,
            **probed,
            **profiled,
        }
    finally:
        st.close()


def _probe(st, shape: ModelShape, w: StackWeights, details, new_k, new_v, context: int, device,
           replay: Optional[Replay]) -> Dict[str, object]:
    """The probe step's selection at the sampled layers, against full attention over request 0's whole
    context (float64): top-32 recall and attention mass captured (what the tier attended: device tokens
    and the strategy's selection), and the host-store bytes the strategy reads per step (its own count
    for the selection it made, times the layers; None where the strategy does not count)."""
    from ..eval.fidelity import TOP_K, attended_mask

    host = st.attn.host
    recall, mass, read = [], [], []
    for layer, (q, det) in details.items():
        # regenerated where the fill made it (a device's generator draws other numbers than the CPU's)
        k, _ = request_kv(shape, w, layer, context, seed=0, device=device, dtype=torch.float32, replay=replay)
        k = torch.cat([k.cpu()] + [s[:1].cpu() for s in new_k[layer]]).double()
        n = k.shape[0]
        if det.host is not None and det.selection is None and not getattr(host, "attends_every_host_token", False):
            seen = None  # the strategy attends host tokens it does not name (no recall or mass to measure)
        elif det.host is not None and det.selection is None:
            seen = torch.ones(shape.num_q_heads, n, dtype=torch.bool)
        else:
            seen = attended_mask(st.tier, 0, det, n, shape.num_q_heads)
        if seen is not None:
            g = shape.num_q_heads // shape.kv_heads
            logits = torch.einsum("hd,nhd->hn", q[0].cpu().double(), k.repeat_interleave(g, dim=1))
            p = torch.softmax(logits * shape.head_dim ** -0.5, dim=-1)
            top = logits.topk(min(TOP_K, n), dim=-1).indices
            recall.append(float(seen.gather(1, top).float().mean()))
            mass.append(float((p * seen).sum(-1).mean()))
        nbytes = host.read_bytes(layer, det.selection) if det.host is not None else 0
        read.append(nbytes)
    out: Dict[str, object] = {}
    if recall:
        out.update(top32_recall=sum(recall) / len(recall), mass_captured=sum(mass) / len(mass))
    if read and all(r is not None for r in read):
        out["host_read_mib_per_step"] = sum(read) / len(read) * shape.n_layers / 2**20
    return out


def _host_reads(st, last_q, shape: ModelShape, batch: int) -> Dict[str, float]:
    """For a strategy that selects on the device: host tokens each query head kept at the sampled
    layers of the last step (untimed, recomputed), and the value bytes that implies per step."""
    select = getattr(st.attn.host, "select", None)
    if select is None or not last_q or getattr(st.attn.host, "all", True):
        return {}
    kept = [float((select(q.to(st.attn.device), layer, record=False)[0] >= 0).float().sum(-1).mean())
            for layer, (q, _) in last_q.items()]
    mean = sum(kept) / len(kept)
    value_bytes = st.store.view.buffers.values.element_size()
    return {"host_tokens_per_qhead": mean,
            "host_value_gib_per_step": mean * shape.num_q_heads * shape.head_dim * value_bytes * shape.n_layers
            * batch / 2**30}


def _block_stats(st, steps: int) -> Dict[str, float]:
    """A block cache's hits, misses, fetched and wasted blocks and bytes host -> device per step."""
    take = getattr(st.attn.host, "take_stats", None)
    if take is None:
        return {}
    recall = st.attn.host.forecast_recall()
    s = take()
    per = steps
    return {"block_hits_per_step": s.hits / per, "block_misses_per_step": s.misses / per,
            "blocks_fetched_per_step": s.fetched / per, "blocks_wasted_per_step": s.wasted / per,
            "fetched_mib_per_step": s.fetched_bytes / per / 2**20,
            "forecast_recall_per_layer": {str(k): round(v, 4) for k, v in recall.items()},
            "forecast_recall": s.hits / (s.hits + s.misses) if s.hits + s.misses else None}


def _split_stats(st, steps: int, n_layers: int) -> Dict[str, object]:
    """The split strategy's per step: blocks and bytes on each side, the host tokens a head kept
    against its cap, the modelled time each side takes and waits per layer (from the rates measured
    at start), and the head classes found."""
    take = getattr(st.attn.host, "take_split_stats", None)
    if take is None:
        return {}
    s, per = take(), steps + 1  # the warm-up step too
    rep = st.attn.host.report()
    return {"cpu_blocks_per_step": s.cpu_blocks / per, "gpu_blocks_per_step": s.gpu_blocks / per,
            "cpu_mib_per_step": s.cpu_bytes / per / 2**20, "gpu_mib_per_step": s.gpu_bytes / per / 2**20,
            "kept_tokens_per_head": s.kept_tokens / max(s.heads, 1), "cap_tokens_per_head": s.cap_tokens / max(s.heads, 1),
            "model_cpu_ms_per_layer": 1e3 * s.model_cpu_s / (per * n_layers),
            "model_gpu_ms_per_layer": 1e3 * s.model_gpu_s / (per * n_layers),
            "model_idle_ms_per_layer": 1e3 * s.model_idle_s / (per * n_layers),
            "rates_gbps": {k: v / 1e9 for k, v in rep["rates"].items()},
            "head_classes": {name: [sum(layer) for layer in per_layer] for name, per_layer in rep["head_classes"].items()}}


def _attention_error(shape, w, last_q, new_k, new_v, context, batch, device, replay=None) -> float:
    """Relative error of the tier's attention output against dense over the full context."""
    from ..runtime import dense_attention

    num = den = 0.0
    for layer, (q, got) in last_q.items():
        for r in range(min(batch, 2)):
            k, v = request_kv(shape, w, layer, context, seed=r, device=device, dtype=torch.float32, replay=replay)
            k = torch.cat([k] + [s[r: r + 1] for s in new_k[layer]])
            v = torch.cat([v] + [s[r: r + 1] for s in new_v[layer]])
            indptr = torch.tensor([0, k.shape[0]], device=device)
            ref = dense_attention(q[r: r + 1], k, v, indptr, sm_scale=shape.head_dim ** -0.5).out
            num += float((got[r: r + 1] - ref).norm() ** 2)
            den += float(ref.norm() ** 2)
    return (num / den) ** 0.5 if den else 0.0


def _release_host_cache(device) -> None:
    """Give a closed cell's page-locked store back to the OS: torch's CUDA host allocator keeps freed
    pinned blocks cached, so the next cell's larger store would find that memory taken (on an H100 host
    a 105 GiB store found 70 GiB free after a 52 GiB one had closed)."""
    if device.type != "cuda":
        return
    gc.collect()
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
    torch.cuda.empty_cache()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capacity(rows, fit) -> Dict[str, Dict[str, Dict[str, int]]]:
    """Per context and policy: the largest batch that ran, and the largest the memory accounting admits."""
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for ctx, by_policy in fit.items():
        for name, admitted in by_policy.items():
            ran = [r["batch"] for r in rows if r["policy"] == name and str(r["context"]) == ctx
                   and r.get("status") == "ok"]
            out.setdefault(ctx, {})[name] = {"largest_batch_ran": max(ran, default=0), "batch_that_fits": admitted}
    return out


def _report(rows, quick, device, shape, budget, key_format="int8_channel", prefilter=4.0, fit=None, memory=None,
            data=None, *, out_dir=None) -> int:
    name = f"decode-{'quick-' if quick else ''}{device.type}"
    cols = ["policy", "context", "batch", "ms_per_step", "ms_per_step_median", "ms_per_step_max", "tokens_per_s",
            "device_kv_gib", "device_index_gib", "host_kv_gib", "rel_err", "cpu_attn_ms_per_step",
            "host_tokens_per_qhead", "vs_byte_floor", "pipelined", "status"]
    if any(r.get("past_accounting") for r in rows):
        cols.append("past_accounting")
    ok = {(r["policy"], r["context"], r["batch"]): r for r in rows if r.get("status") == "ok"}
    shapes = sorted({(c, b) for (p, c, b) in ok if all((q, c, b) in ok for q in POLICIES)})
    summary = {}
    if shapes:
        c, b = shapes[-1]
        h, o, d = ok[("hgca", c, b)], ok[("offload_all", c, b)], ok[("dense", c, b)]
        summary = {"context": c, "batch": b, "hgca_vs_offload_all": o["ms_per_step"] / h["ms_per_step"],
                   "hgca_vs_dense": d["ms_per_step"] / h["ms_per_step"], "hgca_rel_err": h["rel_err"]}
        pf = ok.get(("hgca_prefilter", c, b))
        if pf:
            summary.update(hgca_prefilter_vs_dense=d["ms_per_step"] / pf["ms_per_step"],
                           hgca_prefilter_vs_offload_all=o["ms_per_step"] / pf["ms_per_step"],
                           hgca_prefilter_rel_err=pf["rel_err"])
        rs = ok.get(("hgca_residual", c, b))
        if rs:
            summary.update(hgca_residual_vs_dense=d["ms_per_step"] / rs["ms_per_step"],
                           hgca_residual_vs_hgca=h["ms_per_step"] / rs["ms_per_step"],
                           hgca_residual_rel_err=rs["rel_err"])
    # what overlap saves: hgca over hgca_serial at the largest shape that ran both (offload_all not needed)
    both = sorted((c, b) for (p, c, b) in ok if p == "hgca" and ("hgca_serial", c, b) in ok)
    if both:
        c, b = both[-1]
        summary.update(serial_context=c, serial_batch=b,
                       hgca_vs_serial=ok[("hgca_serial", c, b)]["ms_per_step"] / ok[("hgca", c, b)]["ms_per_step"])
    # fluxion over hgca at the same mean budget, and over itself without the scheduler, at each shape both ran
    for other in ("hgca", "fluxion_cpu"):
        pairs = {f"{c}x{b}": round(ok[(other, c, b)]["ms_per_step"] / r["ms_per_step"], 4)
                 for (p, c, b), r in ok.items() if p == "fluxion" and (other, c, b) in ok}
        if pairs:
            summary[f"fluxion_vs_{other}"] = pairs
    # every policy against dense with CUDA graphs, at each shape both ran (> 1: faster than dense_graph)
    vs_graph = {f"{p}@{c}x{b}": round(ok[("dense_graph", c, b)]["ms_per_step"] / r["ms_per_step"], 4)
                for (p, c, b), r in ok.items() if p != "dense_graph" and ("dense_graph", c, b) in ok}
    if vs_graph:
        summary["vs_dense_graph"] = vs_graph
    payload = {"bench": "decode", "quick": quick, "device": str(device), "machine": machine(), "data": data or {},
               "shape": shape._asdict(), "hgca_budget_tokens": budget,
               "hgca_key_format": key_format, "prefilter": prefilter, "rows": rows, "summary": summary,
               "capacity": _capacity(rows, fit or {}), "memory": memory or {}}
    path = write(name, payload, markdown_table(rows, cols), out_dir=out_dir)
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    for ctx, by_policy in payload["capacity"].items():
        print(f"capacity at {ctx} tokens (largest batch that ran / that the KV accounting admits): " +
              ", ".join(f"{name} {v['largest_batch_ran']}/{v['batch_that_fits']}" for name, v in by_policy.items()))
    for key, ratio in summary.get("vs_dense_graph", {}).items():
        print(f"vs_dense_graph {key}={ratio:.3f}")
    for other in ("hgca", "fluxion_cpu"):
        for key, ratio in summary.get(f"fluxion_vs_{other}", {}).items():
            print(f"fluxion_vs_{other} {key}={ratio:.3f}")
    if "hgca_vs_serial" in summary:
        print(f"hgca_vs_serial={summary['hgca_vs_serial']:.3f} (overlap on over off, context "
              f"{summary['serial_context']} batch {summary['serial_batch']})")
    if "hgca_vs_offload_all" not in summary:
        print("no shape ran all of dense, offload_all and hgca; no summary line", file=sys.stderr)
        return 1
    if "hgca_prefilter_vs_dense" in summary:
        print(f"hgca_prefilter_vs_offload_all={summary['hgca_prefilter_vs_offload_all']:.3f} "
              f"hgca_prefilter_vs_dense={summary['hgca_prefilter_vs_dense']:.3f} "
              f"hgca_prefilter_rel_err={summary['hgca_prefilter_rel_err']:.3e}")
    if "hgca_residual_vs_dense" in summary:
        print(f"hgca_residual_vs_hgca={summary['hgca_residual_vs_hgca']:.3f} "
              f"hgca_residual_vs_dense={summary['hgca_residual_vs_dense']:.3f} "
              f"hgca_residual_rel_err={summary['hgca_residual_rel_err']:.3e}")
    print(f"hgca_vs_offload_all={summary['hgca_vs_offload_all']:.3f} hgca_vs_dense={summary['hgca_vs_dense']:.3f} "
          f"hgca_rel_err={summary['hgca_rel_err']:.3e}")
    return 0


def _plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in POLICIES + EXTRA:
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r["context"], r["tokens_per_s"]) for r in rows
                         if r["policy"] == policy and r["batch"] == batch and r.get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{policy} b={batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
