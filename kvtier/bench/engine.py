"""``kvtier bench engine``: the native sparse-attention engine against (a) a
streaming read of the same bytes through the same thread pool (the bandwidth
ceiling) and (b) the same computation in torch on the CPU.

Bytes the op must touch = keys + key scales of every host token (in the
`--key-format` given: int8_channel with a bf16 scale per channel of each page,
int8 with one scale per token, int4 with one per `--key-group` channels, or
bf16) + the values of the selected tokens. The native engine is imported lazily so the CLI
parser works without a build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import time

import torch

from kvtier.bench.results import add_results_dir_argument, results_dir
from kvtier.runtime.ranks import host_memory_available



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repeats (well under a minute on 2 cores)")
    parser.add_argument("--tokens", type=int, default=32768, help="host tokens per request")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per kv head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--page-tokens", type=int, default=64)
    parser.add_argument("--key-format", choices=("int8_channel", "int8", "int4", "bf16"), default="int8_channel",
                        help="host key format (values are bf16)")
    parser.add_argument("--key-group", type=int, default=32, help="channels per int4 key scale")
    parser.add_argument("--threads", type=int, default=0, help="0 = all online CPUs")
    parser.add_argument("--long-tokens", type=int, default=131072,
                        help="also time the engine at this many host tokens (bytes beyond the LLC); 0 = skip")
    parser.add_argument("--dram-bytes", type=int, default=0,
                        help="buffer of the DRAM stream-read ceiling; 0 = max(4 x LLC, 1 GiB), capped by free memory")
    add_results_dir_argument(parser, "--out-dir")


def key_bytes_per_token(key_format, head_dim, key_group=32, page_tokens=16):
    """Bytes of one token's key in the host store, scales included."""
    if key_format == "int8_channel":
        return head_dim + 4 * head_dim / page_tokens
    if key_format == "int8":
        return head_dim + 4
    if key_format == "int4":
        return head_dim // 2 + 4 * (head_dim // key_group)
    return 2 * head_dim


def build_case(tokens, kv_heads, group, head_dim, page_tokens, topk, seed=0, *, key_format="int8", key_group=32):
    """One request over a store of `key_format` keys and bf16 values, pages in shuffled order."""
    from kvtier._native import HostStoreView

    g = torch.Generator().manual_seed(seed)
    n_pages = -(-tokens // page_tokens)
    store = HostStoreView.allocate(n_layers=1, n_pages=n_pages, kv_heads=kv_heads, page_tokens=page_tokens,
                                   head_dim=head_dim, key_format=key_format, value_format="bf16",
                                   key_group=key_group, chunk_sums=True)
    step = max(1, 4096 // page_tokens)
    for p0 in range(0, n_pages, step):
        ids = torch.arange(p0, min(p0 + step, n_pages), dtype=torch.int32)
        shape = (len(ids), kv_heads, page_tokens, head_dim)
        store.append(0, ids, torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    table = torch.randperm(n_pages, generator=g).to(torch.int32)
    q = torch.randn(1, kv_heads * group, head_dim, generator=g)
    budget = torch.full((1, kv_heads), topk, dtype=torch.int32)
    return store, table, q, budget


def torch_reference(store, table, n, q, topk, sm_scale):
    """Same computation with torch ops: dequantize, matmul, group max, topk, gather, softmax."""
    H, D = store.kv_heads, store.head_dim
    pages = table.long()
    k = dequant_keys(store, pages)  # [np, H, T, D]
    k = k.permute(1, 0, 2, 3).reshape(H, -1, D)[:, :n]
    qg = q[0].view(H, -1, D)
    logits = torch.bmm(qg, k.transpose(1, 2)) * sm_scale  # [H, G, n]
    idx = torch.topk(logits.amax(1), min(topk, n), dim=-1).indices  # [H, k]
    vals = store.buffers.values[0].permute(1, 0, 2, 3)  # [H, P, T, D]
    tok_page, tok_off = pages[idx // store.page_tokens], idx % store.page_tokens
    v = vals[torch.arange(H)[:, None], tok_page, tok_off].float()  # [H, k, D]
    sel = torch.gather(logits, 2, idx[:, None, :].expand(-1, logits.shape[1], -1))
    p = torch.softmax(sel, -1)
    return torch.bmm(p, v).reshape(1, -1, D)


def dequant_keys(store, pages):
    """Layer 0 keys of `pages` as float32 [np, H, T, D], in torch ops."""
    from kvtier._native import KeyFormat

    if store.key_format is KeyFormat.INT8:
        return store.keys[0, pages].float() * store.key_scales[0, pages][..., None]
    if store.key_format is KeyFormat.INT8_CHANNEL:
        sc = store.key_scales[0, pages].float()  # [np, H, 2, D]: scales, zero points
        return store.keys[0, pages].float() * sc[:, :, None, 0] + sc[:, :, None, 1]
    if store.key_format is KeyFormat.INT4:
        b = store.keys[0, pages].to(torch.int16)
        q = torch.stack([((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8], dim=-1).flatten(-2).float()
        return q * store.key_scales[0, pages].repeat_interleave(store.key_group, dim=-1)
    return store.keys[0, pages].float()


def timeit(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def llc_bytes():
    """Largest cache size in sysfs (the LLC), or None."""
    best = None
    for f in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            t = f.read_text().strip()
            v = int(t[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]] if t[-1] in "KMG" else int(t)
        except (OSError, ValueError, KeyError):
            continue
        best = v if best is None else max(best, v)
    return best


def dram_ceiling(eng, nbytes, repeats):
    """Median GB/s of a pooled streaming read of a buffer larger than the LLC."""
    buf = torch.ones(nbytes, dtype=torch.uint8)  # touched, so no page faults while timing
    ts = timeit(lambda: eng.stream_read(buf), repeats)
    del buf
    return nbytes / statistics.median(ts) / 1e9, ts


def cpu_flags():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                    "avx512_fp16", "amx_tile", "amx_int8") if f in have]
    except OSError:
        pass
    return []


def machine_info(n_threads):
    from kvtier._native import active_isa, build_info

    model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "online_cpus": os.cpu_count(), "threads": n_threads, "isa": active_isa(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "engine_build": build_info()["build_hash"][:12], "platform": platform.platform(),
            "llc_bytes": llc_bytes(), "cpu_flags": cpu_flags()}


def run(args: argparse.Namespace) -> int:
    from kvtier._native import Engine

    repeats = 5 if args.quick else 20
    torch_repeats = 3 if args.quick else 10
    n, H, G, D, k = args.tokens, args.kv_heads, args.group, args.head_dim, args.topk
    kf, kg = args.key_format, args.key_group
    kbytes = key_bytes_per_token(kf, D, kg, args.page_tokens)
    store, table, q, budget = build_case(n, H, G, D, args.page_tokens, k, key_format=kf, key_group=kg)
    sm = 1.0 / math.sqrt(D)
    eng = Engine(args.threads)
    torch.set_num_threads(eng.n_threads)

    def plan_one(store, table, tokens, budget, residual=False):
        """Plan the engine for one request of `tokens` host tokens over `table`."""
        eng.plan(store, table, torch.tensor([0, len(table)], dtype=torch.int32),
                 torch.tensor([tokens], dtype=torch.int32), H * G, budget_tokens=budget, sm_scale=sm,
                 residual=residual)

    plan_one(store, table, n, budget)
    sel = min(k, n)
    bytes_touched = int(H * n * kbytes + H * sel * D * 2)
    buf = torch.randint(0, 255, (bytes_touched,), dtype=torch.uint8)

    def phase_means(q, runs):
        """Mean seconds per run of each phase of `runs` traced runs (the engine's own counters)."""
        eng.trace(True)
        for _ in range(runs):
            eng.run(0, q)
        t = eng.phase_times()
        eng.trace(False)
        return t

    t_stream = timeit(lambda: eng.stream_read(buf), repeats)
    t_score = timeit(lambda: eng.score(0, q), repeats)
    t_engine = timeit(lambda: eng.run(0, q), repeats)
    phases = {str(n): phase_means(q, repeats)}
    t_torch = timeit(lambda: torch_reference(store, table, n, q, k, sm), torch_repeats)
    err = (eng.run(0, q).out - torch_reference(store, table, n, q, k, sm)).abs().max().item()
    # the same selection, the unselected tokens added back as chunk means (hgca.residual)
    plan_one(store, table, n, budget, residual=True)
    t_resid = timeit(lambda: eng.run(0, q), repeats)
    del store, buf

    # DRAM ceiling: the same pooled read over a buffer larger than the LLC
    llc = llc_bytes() or (64 << 20)
    dram_bytes = args.dram_bytes or max(4 * llc, 1 << 30)
    avail = host_memory_available() or None
    if avail:
        dram_bytes = min(dram_bytes, avail // 3)
    dram_gbps, t_dram = dram_ceiling(eng, dram_bytes, 3 if args.quick else 5)

    # the engine at a long context, whose key bytes exceed the LLC
    long = None
    if args.long_tokens and args.long_tokens != n:
        nl = args.long_tokens
        store_l, table_l, q_l, budget_l = build_case(nl, H, G, D, args.page_tokens, k, seed=1,
                                                     key_format=kf, key_group=kg)
        plan_one(store_l, table_l, nl, budget_l)
        rl = max(3, repeats // 2)
        t_ls = timeit(lambda: eng.score(0, q_l), rl)
        t_le = timeit(lambda: eng.run(0, q_l), rl)
        phases[str(nl)] = phase_means(q_l, rl)
        plan_one(store_l, table_l, nl, budget_l, residual=True)
        t_lr = timeit(lambda: eng.run(0, q_l), rl)
        bl = int(H * nl * kbytes + H * min(k, nl) * D * 2)
        ml = {"score": statistics.median(t_ls), "engine": statistics.median(t_le),
              "engine_residual": statistics.median(t_lr)}
        gl = {name: bl / t / 1e9 for name, t in ml.items()}
        long = {"tokens": nl, "bytes_touched": bl, "median_s": ml, "gbps": gl,
                "engine_vs_dram": gl["engine"] / dram_gbps, "fits_llc": bool(bl <= llc),
                "samples_s": {"score": t_ls, "engine": t_le, "engine_residual": t_lr}}
        del store_l
    eng.close()

    med = {name: statistics.median(ts) for name, ts in
           (("stream", t_stream), ("score", t_score), ("engine", t_engine), ("torch", t_torch),
            ("engine_residual", t_resid))}
    gbps = {name: bytes_touched / t / 1e9 for name, t in med.items()}
    ratio_stream = gbps["engine"] / gbps["stream"]
    ratio_torch = med["torch"] / med["engine"]
    rows = [
        ("stream read (ceiling)", med["stream"], gbps["stream"]),
        ("engine score only", med["score"], gbps["score"]),
        ("engine run (score+topk+attend)", med["engine"], gbps["engine"]),
        ("engine run + residual (hgca.residual)", med["engine_residual"], gbps["engine_residual"]),
        ("torch cpu (same computation)", med["torch"], gbps["torch"]),
    ]
    rows.append((f"stream read, DRAM ({dram_bytes / 1e9:.2f} GB buffer > LLC)", statistics.median(t_dram), dram_gbps))
    if long:
        mb = long["bytes_touched"] / 1e6
        if long["fits_llc"]:  # then the engine reads from cache, not DRAM, and may beat the DRAM ceiling
            mb = f"{mb:.0f} MB, within the {llc / 2**20:.0f} MiB LLC"
        else:
            mb = f"{mb:.0f} MB"
        rows.append((f"engine score only @ {long['tokens']} tokens ({mb})", long["median_s"]["score"],
                     long["gbps"]["score"]))
        rows.append((f"engine run @ {long['tokens']} tokens ({mb})", long["median_s"]["engine"],
                     long["gbps"]["engine"]))
        rows.append((f"engine run + residual @ {long['tokens']} tokens", long["median_s"]["engine_residual"],
                     long["gbps"]["engine_residual"]))
    shape = dict(tokens=n, kv_heads=H, q_per_kv=G, head_dim=D, topk=k, page_tokens=args.page_tokens,
                 key_format=kf, value_format="bf16", bytes_touched=bytes_touched)
    if kf == "int4":
        shape["key_group"] = kg
    header = f"| op | median ms | GB/s (of {bytes_touched / 1e6:.1f} MB unless stated) |\n|---|---:|---:|\n"
    table_md = header + "".join(f"| {name} | {t * 1e3:.2f} | {g:.2f} |\n" for name, t, g in rows)
    # where a run's time goes: each phase's mean over traced runs; `other` is the call outside them
    # (argument checks, the lock, cffi)
    cols = list(phases)
    phase_md = ("\n| phase of a run (mean ms) | " + " | ".join(f"{c} tokens" for c in cols) + " |\n|---|"
                + "---:|" * len(cols) + "\n")
    for name in Engine.PHASES:
        if any(phases[c][name] for c in cols):
            phase_md += f"| {name} | " + " | ".join(f"{phases[c][name] * 1e3:.3f}" for c in cols) + " |\n"
    other = [phases[c]["call"] - sum(phases[c][x] for x in Engine.PHASES if x != "call") for c in cols]
    phase_md += "| other (call minus phases) | " + " | ".join(f"{o * 1e3:.3f}" for o in other) + " |\n"
    table_md += phase_md
    last = f"engine_vs_stream={ratio_stream:.2f} engine_vs_torch={ratio_torch:.2f}"
    last += f" engine_vs_dram={gbps['engine'] / dram_gbps:.2f}"
    if long:
        last += f" engine_vs_dram@{long['tokens']}={long['engine_vs_dram']:.2f}"
    machine = machine_info(eng.n_threads)
    print(f"shape: {shape}")
    llc_mb = f"{machine['llc_bytes'] / 2**20:.0f} MiB" if machine["llc_bytes"] else "unknown"
    print(f"machine: {machine['cpu']}, {machine['online_cpus']} CPUs, {machine['threads']} threads, "
          f"isa {machine['isa']}, LLC {llc_mb}, flags {' '.join(machine['cpu_flags'])}")
    print(table_md, end="")
    print(f"max |engine - torch| = {err:.2e}")
    out_dir = results_dir(args.results_dir)
    result = {"shape": shape, "machine": machine, "quick": bool(args.quick), "repeats": repeats,
              "median_s": med, "gbps": gbps, "engine_vs_stream": ratio_stream, "engine_vs_torch": ratio_torch,
              "max_abs_diff_vs_torch": err,
              "dram": {"buffer_bytes": dram_bytes, "gbps": dram_gbps, "samples_s": t_dram},
              "engine_vs_dram": gbps["engine"] / dram_gbps, "long": long,
              "residual_vs_engine": med["engine_residual"] / med["engine"], "phases_s": phases,
              "samples_s": {"stream": t_stream, "score": t_score, "engine": t_engine, "torch": t_torch,
                            "engine_residual": t_resid}}
    (out_dir / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "engine.md").write_text(
        f"# engine benchmark\n\n{machine['cpu']}, {machine['online_cpus']} CPUs, {machine['threads']} threads, "
        f"isa `{machine['isa']}`, LLC {llc_mb}; {H} kv-heads x {G} q/group x {n} tokens x d{D}, {kf} keys"
        f"{f' (group {kg})' if kf == 'int4' else ''}, "
        f"bf16 values, top-{k}\n\n{table_md}\n`{last}`\n\n"
        "`engine_vs_stream` compares with a read of the same bytes (cache resident when they fit in the LLC); "
        "`engine_vs_dram` with a read of a buffer larger than the LLC"
        f"{' (the long case fits the LLC here, so its ratio compares a cache-resident run with DRAM)' if long and long['fits_llc'] else ''}.\n")
    print(f"wrote {out_dir / 'engine.json'}")
    print(last)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
