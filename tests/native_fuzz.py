"""A seeded random driver of the native engine: plan/run over random stores, shapes, lengths,
budgets, page tables and options against the float64 reference, and the API's edges.

Every case draws its inputs from its own seed, so one replays alone. From the repository root:

    python tests/native_fuzz.py --cases 2000 --seed 1              # the active ISA
    python tests/native_fuzz.py --cases 100000 --isa all --report fuzz.json
    python tests/native_fuzz.py --replay 1:1734 --isa avx2         # case 1734 of seed 1

Kinds (weights in KINDS): attend (plan + run against the reference: every mode, group
reduce, prefilter, residual, soft cap, key and value format; batches with empty, short
and long requests, shared and repeated pages, duplicate keys, huge budgets), ops (score,
attend_indices, attend_kv_indices and weighted_values against float64), store, tables, edges and threads
(`native_fuzz_api`). A case passes, is refused with the typed error its input calls for,
or fails: a Mismatch the reference's rounding does not explain, or any other exception.
A crash or a sanitizer report ends the process: `--progress FILE` names the case it was in.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter

import torch

import kvtier._native as N
from native_cases import ref_keys, ref_values, flat
from native_fuzz_check import Mismatch, judge

MODES = ("topk", "topk", "mass", "blocks", "all")
REDUCES = ("max", "mean", "per_qhead")
HUGE = (2**31 - 1, 2**31, 2**63 - 1)


def draw_store(rng: random.Random, g: torch.Generator, *, tokens: int, layers: int | None = None):
    """A store of random format holding `tokens` host tokens (plus spare pages), every page written."""
    kf = rng.choice(("bf16", "int8", "int8", "int8_channel", "int8_channel", "int4", "int4"))
    vf = rng.choice(("bf16", "int8"))
    D = rng.choice((16, 32, 48, 64, 64, 128, 256) if tokens < 3000 else (16, 32, 64))
    T = rng.choice((4, 8, 16, 16, 32, 64))
    S = rng.choice([s for s in (1, 2, 4, 8, 16) if T % s == 0])
    Hkv = rng.choice((1, 1, 2, 4) if tokens < 3000 else (1, 2))
    grp = rng.choice([x for x in range(2, D + 1, 2) if D % x == 0]) if kf == "int4" else 32
    L = layers or rng.choice((1, 2))
    P = -(-tokens // T) + rng.randint(1, 4)
    store = N.HostStoreView.allocate(n_layers=L, n_pages=P, kv_heads=Hkv, page_tokens=T, head_dim=D, key_format=kf,
                                     value_format=vf, key_group=grp, summary_tokens=S,
                                     chunk_sums=rng.random() < 0.35)
    src = torch.bfloat16 if rng.random() < 0.2 else torch.float32
    for layer in range(L):
        scale = rng.choice((0.05, 1.0, 3.0))
        k = torch.randn(P, Hkv, T, D, generator=g) * scale
        if rng.random() < 0.2:  # duplicate rows: exact ties in every logit
            k[:, :, 1::2] = k[:, :, ::2][:, :, : k[:, :, 1::2].shape[2]]
        if rng.random() < 0.1:  # a few outliers
            k.view(-1)[torch.randint(0, k.numel(), (8,), generator=g)] *= 40
        v = torch.randn(P, Hkv, T, D, generator=g)
        store.append(layer, torch.arange(P, dtype=torch.int32), k.to(src), v.to(src))
    return store


def draw_batch(rng: random.Random, g: torch.Generator):
    B = rng.choice((1, 1, 2, 3, 4, 6))
    lengths = []
    for _ in range(B):
        u = rng.random()
        lengths.append(0 if u < 0.1 else rng.randint(1, 200) if u < 0.6 else rng.randint(200, 1500) if u < 0.93
                       else rng.randint(4096, 6500))
    if sum(lengths) > 9000:
        lengths = [min(n, 1500) for n in lengths]
        lengths[0] = rng.randint(4096, 6500)
    store = draw_store(rng, g, tokens=sum(lengths))
    T, P = store.page_tokens, store.n_pages
    table, offs = [], [0]
    for n in lengths:
        np_ = -(-n // T) + (rng.random() < 0.1)
        if rng.random() < 0.15:  # pages repeated within and across requests: reads only
            table += [rng.randrange(P) for _ in range(np_)]
        else:
            table += rng.sample(range(P), min(np_, P)) + [rng.randrange(P) for _ in range(np_ - min(np_, P))]
        offs.append(len(table))
    G = rng.choice((1, 1, 2, 3, 4, 8))
    q = torch.randn(B, G * store.kv_heads, store.head_dim, generator=g) * rng.choice((0.3, 1.0, 4.0))
    return store, torch.tensor(table, dtype=torch.int32), torch.tensor(offs, dtype=torch.int32), \
        torch.tensor(lengths, dtype=torch.int32), q


def draw_options(rng: random.Random, store, ntok):
    B, Hkv = len(ntok), store.kv_heads
    mode = rng.choice(MODES)
    budget = torch.zeros(B, Hkv, dtype=torch.int64)
    for b in range(B):
        for h in range(Hkv):
            n = int(ntok[b])
            budget[b, h] = rng.choice(HUGE) if rng.random() < 0.08 else rng.randint(1, max(1, n + 3))
    blocks = None
    if mode == "blocks":
        S, T = store.summary_tokens, store.page_tokens
        ok = [x for x in range(S, 4 * T + 1, S) if T % x == 0 or x % T == 0]
        blocks = torch.tensor([rng.choice(ok) for _ in range(Hkv)], dtype=torch.int32)
    return dict(mode=mode, reduce=rng.choice(REDUCES), budget=budget, blocks=blocks,
                tau=1.0 if rng.random() < 0.2 else rng.uniform(0.05, 1.0),
                cap=0.0 if rng.random() < 0.6 else rng.uniform(2.0, 30.0),
                prefilter=rng.choice((0.0, 0.0, 0.0, 1.0, 1.6, 2.5, 4.0, 1e300)) if mode in ("topk", "mass") else 0.0,
                residual=store.chunk_sums is not None and rng.random() < 0.6,
                threads=rng.choice((1, 2, 3)))


def case_attend(rng: random.Random, g: torch.Generator) -> str:
    store, table, offs, ntok, q = draw_batch(rng, g)
    o = draw_options(rng, store, ntok)
    B, Hq, D = q.shape
    sm = 1.0 / math.sqrt(D) * rng.choice((1.0, 1.0, 0.25, 3.0))
    layer = rng.randrange(store.n_layers)
    with store, N.Engine(o["threads"]) as eng:
        eng.plan(store, table, offs, ntok, Hq, mode=o["mode"], group_reduce=o["reduce"], budget_tokens=o["budget"],
                 block_tokens=o["blocks"], mass_threshold=o["tau"], sm_scale=sm, soft_cap=o["cap"],
                 prefilter=o["prefilter"], residual=o["residual"])
        res = eng.run(layer, q, return_selection=True)
        if rng.random() < 0.3:  # the same plan again: nothing carried over from the first run
            again = eng.run(layer, q, return_selection=True)
            if not (torch.equal(again.out, res.out) and torch.equal(again.sel_index, res.sel_index)):
                raise Mismatch("a second run over the same plan and query differs from the first")
        case = dict(store=store, layer=layer, table=table, offs=offs, ntok=ntok, q=q, sm=sm,
                    sel_logits=eng.score(layer, q), **o)
        used = judge(case, res)
    return "tie: " + used[0] if used else "ok"


def _attends(out: torch.Tensor, lse: torch.Tensor, x: torch.Tensor, V: torch.Tensor, sel: torch.Tensor) -> bool:
    """Whether (out, lse) is float64 attention of logits x over V's rows sel (empty: out 0, lse -inf)."""
    if len(sel):
        want_lse, want_out = torch.logsumexp(x[sel], 0), torch.softmax(x[sel], 0) @ V[sel]
    else:
        want_lse, want_out = torch.tensor(-math.inf, dtype=torch.float64), torch.zeros(V.shape[-1], dtype=torch.float64)
    return torch.allclose(out.double(), want_out, atol=2e-4, rtol=1e-4) and \
        math.isclose(float(lse), float(want_lse), rel_tol=1e-4, abs_tol=2e-4)


def case_ops(rng: random.Random, g: torch.Generator) -> str:
    """score, attend_indices and weighted_values of a random plan against float64."""
    store, table, offs, ntok, q = draw_batch(rng, g)
    B, Hq, D = q.shape
    Hkv, G = store.kv_heads, Hq // store.kv_heads
    sm, cap = 1.0 / math.sqrt(D), (0.0 if rng.random() < 0.6 else rng.uniform(2.0, 30.0))
    layer = rng.randrange(store.n_layers)
    m = rng.randint(1, 40)
    idx = torch.full((B, Hq, m), -1, dtype=torch.int32)
    for b in range(B):
        n = int(ntok[b])
        for h in range(Hq):
            pick = rng.sample(range(n), min(n, rng.randint(0, m)))
            idx[b, h, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
            perm = torch.randperm(m, generator=g)
            idx[b, h] = idx[b, h][perm]
    p = torch.rand(B, Hq, m, generator=g)
    kv_idx = idx[:, ::G].contiguous()  # one set per kv-head: its first query head's row
    with store, N.Engine(rng.choice((1, 2, 3, 8))) as eng:
        eng.plan(store, table, offs, ntok, Hq, mode="topk", budget_tokens=torch.ones(B, Hkv, dtype=torch.int32),
                 sm_scale=sm, soft_cap=cap)
        scores = eng.score(layer, q)
        out, lse = eng.attend_indices(store, layer, q, idx)
        wv = eng.weighted_values(store, layer, idx, p)
        kv_out, kv_lse = eng.attend_kv_indices(store, layer, q, kv_idx)
    for b in range(B):
        n = int(ntok[b])
        pages = table[int(offs[b]):int(offs[b + 1])]
        K, V = flat(ref_keys(store, layer, pages), n), flat(ref_values(store, layer, pages), n)
        for qh in range(Hq):
            h = qh // G
            x = (q[b, qh].double() @ K[h].T) * sm
            if cap > 0:
                x = cap * torch.tanh(x / cap)
            s = scores[b, qh]
            if not torch.isinf(s[n:]).all() or (s[n:] > 0).any():
                raise Mismatch(f"score: request {b} head {qh}: positions past n_tokens {n} are not -inf")
            # the int16-query selection logits are within the README's bound; 1e-2 of the largest covers it
            if n and not torch.allclose(s[:n].double(), x, atol=1e-2 * (1 + float(x.abs().max())), rtol=0):
                raise Mismatch(f"score: request {b} head {qh}: off by {float((s[:n].double() - x).abs().max()):.3g}")
            for name, row, o, l in (("attend_indices", idx[b, qh], out, lse),
                                    ("attend_kv_indices", kv_idx[b, h], kv_out, kv_lse)):
                if not _attends(o[b, qh], l[b, qh], x, V[h], row[row >= 0].long()):
                    raise Mismatch(f"{name}: request {b} head {qh} differs from float64")
            keep = idx[b, qh] >= 0
            want_wv = (p[b, qh][keep].double()[:, None] * V[h, idx[b, qh][keep].long()]).sum(0)
            if not torch.allclose(wv[b, qh].double(), want_wv, atol=2e-4, rtol=1e-4):
                raise Mismatch(f"weighted_values: request {b} head {qh} differs from float64")
    return "ok"


def kinds():
    import native_fuzz_api as api

    return {"attend": (case_attend, 10), "ops": (case_ops, 2), "store": (api.case_store, 4),
            "tables": (api.case_tables, 3), "edges": (api.case_edges, 5), "handbuilt": (api.case_handbuilt, 2),
            "threads": (api.case_threads, 0.15)}


def run_case(base_seed: int, i: int, only: list[str] | None = None):
    """(kind, outcome) of case i of base_seed; raises what the case raised."""
    seed = base_seed * 1_000_003 + i
    rng = random.Random(seed)
    table = kinds()
    names = [k for k in table if not only or k in only]
    kind = rng.choices(names, weights=[table[k][1] for k in names])[0]
    g = torch.Generator().manual_seed(seed)
    return kind, table[kind][0](rng, g)


def run(cases: int, base_seed: int, *, isas: list[str], only=None, progress=None, time_limit=None, log=print):
    """Run cases (each ISA in turn per case); returns a report dict."""
    # The reference's torch ops are small: with torch's OpenMP workers spinning beside the
    # engine's pool on a few cores, each case took 10x longer than on one torch thread.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cases, base_seed, isas, only, progress, time_limit, log)
    finally:
        torch.set_num_threads(torch_threads)


def _run(cases, base_seed, isas, only, progress, time_limit, log):
    counts, outcomes, failures = Counter(), Counter(), []
    t0 = time.monotonic()
    done = 0
    for i in range(cases):
        isa = isas[i % len(isas)]
        N.set_isa(isa)
        if progress:
            progress.write(f"{base_seed}:{i} {isa}\n")
            progress.flush()
        try:
            kind, outcome = run_case(base_seed, i, only)
            counts[(kind, isa)] += 1
            outcomes[outcome.split(":")[0] if outcome.startswith("refused") else outcome] += 1
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its replay key
            failures.append({"case": f"{base_seed}:{i}", "isa": isa, "error": f"{type(exc).__name__}: {exc}"})
            log(f"FAIL {base_seed}:{i} [{isa}] {type(exc).__name__}: {str(exc)[:300]}")
        done += 1
        if time_limit and time.monotonic() - t0 > time_limit:
            break
    by_kind = Counter()
    for (kind, isa), c in counts.items():
        by_kind[kind] += c
    return {"cases": done, "seed": base_seed, "isas": isas, "seconds": round(time.monotonic() - t0, 1),
            "by_kind": dict(by_kind),
            "by_isa": {isa: sum(c for (k, i), c in counts.items() if i == isa) for isa in isas},
            "outcomes": dict(outcomes), "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--isa", default="current", help="current, all (every variant this CPU runs, in turn) or a name")
    ap.add_argument("--kinds", help="comma-separated subset of the kinds")
    ap.add_argument("--replay", help="SEED:I, one case")
    ap.add_argument("--report", help="write the report as JSON here")
    ap.add_argument("--progress", help="append 'seed:i isa' here before each case (a crash names its case)")
    ap.add_argument("--time-limit", type=float, help="stop after this many seconds")
    a = ap.parse_args(argv)
    isas = ([n for n in N.ISA_NAMES if N.isa_supported(n)] if a.isa == "all" else
            [N.active_isa()] if a.isa == "current" else a.isa.split(","))
    only = a.kinds.split(",") if a.kinds else None
    if a.replay:
        s, i = (int(x) for x in a.replay.split(":"))
        N.set_isa(isas[0])
        print(run_case(s, i, only))
        return 0
    progress = open(a.progress, "a") if a.progress else None
    rep = run(a.cases, a.seed, isas=isas, only=only, progress=progress, time_limit=a.time_limit)
    text = json.dumps(rep, indent=1)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in rep.items() if k != "failures"}), f"failures: {len(rep['failures'])}")
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
