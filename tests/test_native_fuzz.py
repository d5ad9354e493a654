"""A short run of the engine's fuzzer (tests/native_fuzz.py): a few hundred random cases
against the float64 reference and the API's edges, on every ISA variant this CPU runs
(only the forced one under KVTIER_ISA). The long run is the same driver from the command
line; native/README.md has the commands."""

from __future__ import annotations

import os

import pytest
import torch

import kvtier._native as N
import native_fuzz as F
from native_cases import _restore_isa  # noqa: F401  (autouse)
from native_fuzz_check import Mismatch, judge

ISAS = [N.active_isa()] if os.environ.get("KVTIER_ISA") else [n for n in N.ISA_NAMES if N.isa_supported(n)]


def _report(cases, seed, **kw):
    rep = F.run(cases, seed, isas=ISAS, log=lambda *a: None, **kw)
    assert not rep["failures"], "\n".join(f"{f['case']} [{f['isa']}] {f['error']}" for f in rep["failures"][:5]) + \
        "\n(replay one: python tests/native_fuzz.py --replay SEED:I --isa ISA)"
    return rep


def test_fuzz_fixed_seed():
    rep = _report(240, 7)
    assert rep["cases"] == 240 and set(rep["by_kind"]) >= {"attend", "ops", "store", "tables", "edges", "handbuilt"}


def test_fuzz_fresh_seed(gen):
    seed = int(torch.randint(1, 2**30, (1,), generator=gen))
    _report(60, seed)


def test_fuzz_threads():
    _report(4, 11, only=["threads"])


def test_the_judge_rejects_a_wrong_selection_and_a_wrong_output():
    """The fuzzer's check is not vacuous: swapping a selected token for a worse one, or moving out
    by more than rounding, is a Mismatch."""
    from native_cases import make_case

    store, table, offs, ntok, q = make_case(lengths=(90, 40), kf="int8", seed=3)
    budget = torch.full((2, store.kv_heads), 10, dtype=torch.int64)
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, q.shape[1], budget_tokens=budget, sm_scale=0.125)
        res = eng.run(1, q, return_selection=True)
    case = dict(store=store, layer=1, table=table, offs=offs, ntok=ntok, q=q, sm=0.125, mode="topk", reduce="max",
                budget=budget, blocks=None, tau=1.0, cap=0.0, prefilter=0.0, residual=False)
    assert judge(case, res) == []
    bad = res.sel_index.clone()
    heads = slice(0, q.shape[1] // store.kv_heads)  # the first kv-head's set shares one selection
    unselected = sorted(set(range(90)) - set(bad[0, 0, :10].tolist()))
    bad[0, heads, 0] = unselected[len(unselected) // 2]
    bad[0, heads, :10] = bad[0, heads, :10].sort(-1).values
    with pytest.raises(Mismatch, match="differ at"):
        judge(case, res._replace(sel_index=bad))
    out = res.out.clone()
    out[1, 0, 3] += 1e-3
    with pytest.raises(Mismatch, match="out/lse differ"):
        judge(case, res._replace(out=out))


@pytest.mark.parametrize("seed", range(6))
def test_the_judges_reference_selects_as_native_cases_does(seed):
    """The fuzzer's vectorized reference selection (SetRef.select) equals native_cases.ref_attention's."""
    import random

    from native_cases import ref_attention
    from native_fuzz_check import SetRef, request_kv

    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(4):
        store, table, offs, ntok, q = F.draw_batch(rng, g)
        o = F.draw_options(rng, store, ntok)
        B, Hq, D = q.shape
        G = Hq // store.kv_heads
        _, _, sels = ref_attention(store, 0, table, offs, ntok, q, mode=o["mode"], reduce=o["reduce"],
                                   budget=o["budget"], blocks=o["blocks"], tau=o["tau"], sm=0.1, cap=o["cap"],
                                   prefilter=o["prefilter"])
        case = dict(store=store, layer=0, table=table, offs=offs, ntok=ntok, q=q, sm=0.1, **o)
        for b in range(B):
            n = int(ntok[b])
            if n == 0:
                continue
            KV = request_kv(case, b)
            for h in range(store.kv_heads):
                k = n if o["mode"] == "all" else min(int(o["budget"][b, h]), n)
                got = SetRef(case, b, h, 0, G, KV).select(case, k, h)  # one selection per kv-head
                assert got == sels[b][h * G], (b, h, o["mode"], o["reduce"], o["prefilter"])
        store.close()


@pytest.mark.parametrize("case,isa,why", [
    # per_qhead ranks by a float32 logit less a float32 log-sum-exp: two tokens 1.4e-7 apart at |r| 4.4
    ("101:19877", "avx2", "tie: tie at the k-th logit"),
    # a repeated page: two prefilter chunks with equal bounds at the cut, and tokens with duplicate keys
    # inside a chunk kept surely, taken in either order
    ("101:31661", "generic", "tie: tie at the prefilter's chunk cut"),
])
def test_ties_found_by_the_long_fuzz_run_are_admitted(case, isa, why):
    if not N.isa_supported(isa) or os.environ.get("KVTIER_ISA", isa) != isa:
        pytest.skip(f"this CPU (or KVTIER_ISA) does not run {isa}")
    seed, i = map(int, case.split(":"))
    N.set_isa(isa)
    assert F.run_case(seed, i, None) == ("attend", why)
