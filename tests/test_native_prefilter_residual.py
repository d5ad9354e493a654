"""The plan options on top of a mode: the prefilter (candidates from summary-chunk
bounds) and the residual (the unselected tokens as chunk means), against the
reference and across ISAs."""

from __future__ import annotations

import pytest
import torch

import kvtier._native as N
from native_cases import _restore_isa  # noqa: F401  (autouse)
from native_cases import (ISAS, ref_keys, ref_values, ref_candidates, ref_attention, make_case, run_both,
                          assert_matches, assert_same_as_generic, run_engine)


@pytest.mark.parametrize("mode", ["topk", "mass"])
@pytest.mark.parametrize("reduce", ["max", "mean", "per_qhead"])
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("kf,vf", [("int8", "bf16"), ("int4", "int8"), ("bf16", "bf16")])
def test_prefilter_vs_reference(mode, reduce, cap, kf, vf):
    """Candidates from summary-chunk bounds, then exact top-k (and mass) among them."""
    case = make_case(D=64, T=32, G=4, lengths=(300, 70, 0), kf=kf, vf=vf, S=8, seed=7 + len(mode) + len(reduce))
    budget = torch.tensor([[20, 40], [8, 12], [5, 5]], dtype=torch.int32)
    res, ref = run_both(*case, mode=mode, reduce=reduce, budget=budget, tau=0.9, cap=cap, prefilter=2.0)
    assert_matches(res, ref)
    # the prefilter did cut, and it changed what is selected
    store, table, offs, ntok, q = case
    pages = table[int(offs[0]):int(offs[1])]
    assert len(ref_candidates(store, 1, pages, 0, q[0, :4].double(), 300, 20, 2.0, reduce)) <= 40
    full = ref_attention(store, 1, table, offs, ntok, q, mode=mode, reduce=reduce, budget=budget, blocks=None,
                         tau=0.9, sm=1 / 8, cap=cap)
    assert full[2] != ref[2]


@pytest.mark.parametrize("mode", ["topk", "mass"])
@pytest.mark.parametrize("threads", [1, 8])
def test_prefilter_long_request_vs_reference(mode, threads):
    """Batch 1 on many threads splits the bound pass over page ranges and the exact/attend phases."""
    case = make_case(D=64, T=64, G=4, Hkv=2, lengths=(5000,), S=32, seed=11)
    budget = torch.tensor([[60, 150]], dtype=torch.int32)
    assert_matches(*run_both(*case, mode=mode, budget=budget, tau=0.8, threads=threads, prefilter=3.0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D", [64, 128])
def test_prefilter_isa_variants_match_generic(isa, D):
    case = make_case(D=D, T=64, G=4, Hkv=2, lengths=(2000, 333), S=16, seed=D)
    budget = torch.tensor([[64, 100], [30, 7]], dtype=torch.int32)
    runs = {}
    for name in ("generic", isa):
        N.set_isa(name)
        runs[name] = run_engine(*case, mode="topk", reduce="max", budget=budget, prefilter=4.0)
    assert_same_as_generic(runs[isa], runs["generic"])


def test_prefilter_covering_every_chunk_equals_full_scoring():
    """A factor that covers the whole request selects exactly what scoring every token does."""
    case = make_case(D=64, T=16, G=4, lengths=(500, 64), seed=3)
    budget = torch.tensor([[50, 10], [20, 64]], dtype=torch.int32)
    full = run_engine(*case, mode="topk", reduce="max", budget=budget)
    wide = run_engine(*case, mode="topk", reduce="max", budget=budget, prefilter=50.0)
    assert_same_as_generic(wide, full)


@pytest.mark.parametrize("prefilter,mode,match", [
    (0.5, "topk", "prefilter 0 .off. or a finite factor >= 1"),
    (float("nan"), "topk", "prefilter: expected a finite number"),
    (2.0, "all", "prefilter applies to modes topk and mass"),
])
def test_prefilter_bad_values_are_typed_errors(prefilter, mode, match):
    store, table, offs, ntok, q = make_case(lengths=(100,))
    with N.Engine(1) as eng, pytest.raises(N.NativeValueError, match=match):
        eng.plan(store, table, offs, ntok, 8, mode=mode, budget_tokens=torch.full((1, 2), 8, dtype=torch.int32),
                 sm_scale=0.125, prefilter=prefilter)


@pytest.mark.parametrize("mode", ["topk", "mass", "blocks", "all"])
@pytest.mark.parametrize("reduce", ["max", "per_qhead"])
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("kf,vf", [("int8", "bf16"), ("int4", "int8"), ("bf16", "int8")])
def test_residual_vs_reference(mode, reduce, cap, kf, vf):
    """The unselected tokens' chunk means join the softmax: lengths ending inside a chunk and a
    page, an empty request, a budget past the request."""
    case = make_case(D=64, T=32, G=4, lengths=(150, 70, 0, 9), kf=kf, vf=vf, S=8, sums=True,
                     seed=3 + len(mode) + len(reduce))
    budget = torch.tensor([[40, 64], [33, 12], [5, 5], [20, 3]], dtype=torch.int32)
    blocks = torch.tensor([16, 64], dtype=torch.int32) if mode == "blocks" else None
    res, ref = run_both(*case, mode=mode, reduce=reduce, budget=budget, blocks=blocks, tau=0.9, cap=cap,
                        residual=True)
    assert_matches(res, ref)
    if mode != "all":  # the residual changed the answer
        store, table, offs, ntok, q = case
        plain = ref_attention(store, 1, table, offs, ntok, q, mode=mode, reduce=reduce, budget=budget,
                              blocks=blocks, tau=0.9, sm=1 / 8, cap=cap)
        assert (ref[1][0] - plain[1][0]).abs().min() > 1e-3


@pytest.mark.parametrize("mode", ["topk", "mass"])
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("prefilter", [0.0, 3.0])
def test_residual_long_request_vs_reference(mode, threads, prefilter):
    """Batch 1 on many threads: the split select + attend paths add the residual too."""
    case = make_case(D=64, T=64, G=4, Hkv=2, lengths=(5000,), S=32, sums=True, seed=12)
    budget = torch.tensor([[60, 150]], dtype=torch.int32)
    assert_matches(*run_both(*case, mode=mode, budget=budget, tau=0.8, threads=threads, prefilter=prefilter,
                             residual=True))


@pytest.mark.parametrize("reduce", ["max", "per_qhead"])
def test_residual_in_parts_vs_reference(reduce):
    """The residual's work items split a long request's chunks (9000 tokens: 563 chunks of 16, in
    parts of at least 64 on 8 threads) and merge per set; a short request stays one part."""
    case = make_case(D=64, T=64, G=4, Hkv=2, lengths=(9000, 1500), S=16, sums=True, seed=31)
    budget = torch.tensor([[100, 40], [64, 300]], dtype=torch.int32)
    for threads in (1, 8):
        assert_matches(*run_both(*case, mode="topk", reduce=reduce, budget=budget, threads=threads, residual=True))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("prefilter", [0.0, 4.0])
def test_residual_isa_variants_match_generic(isa, prefilter):
    case = make_case(D=128, T=64, G=4, Hkv=2, lengths=(2000, 333), S=16, sums=True, seed=5)
    budget = torch.tensor([[64, 100], [30, 7]], dtype=torch.int32)
    runs = {}
    for name in ("generic", isa):
        N.set_isa(name)
        runs[name] = run_engine(*case, mode="topk", reduce="max", budget=budget, prefilter=prefilter, residual=True)
    assert_same_as_generic(runs[isa], runs["generic"])


def test_residual_lse_lies_between_the_selections_and_the_full():
    """Without a soft-cap the mean key's logit bounds its tokens' log-sum-exp from below (Jensen):
    the residual raises lse toward the full attention's and never past it, and the output error
    against full attention falls."""
    store, table, offs, ntok, q = make_case(D=64, T=16, G=4, lengths=(900, 400), S=16, sums=True, seed=21)
    budget = torch.tensor([[30, 30], [30, 30]], dtype=torch.int32)
    kw = dict(mode="topk", reduce="max", budget=budget, blocks=None, tau=1.0, sm=1 / 8, cap=0.0)
    sel = ref_attention(store, 1, table, offs, ntok, q, **kw)
    full = ref_attention(store, 1, table, offs, ntok, q, **{**kw, "mode": "all"})
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, 8, budget_tokens=budget, sm_scale=1 / 8, residual=True)
        res = eng.run(1, q)
    lse = res.lse.double()
    assert (lse > sel[1] + 1e-3).all() and (lse <= full[1] + 1e-4).all()
    err = (res.out.double() - full[0]).norm(dim=-1).mean()
    assert err < 0.7 * (sel[0] - full[0]).norm(dim=-1).mean()


def test_residual_needs_chunk_sums():
    store, table, offs, ntok, q = make_case(lengths=(100,))
    budget = torch.full((1, 2), 8, dtype=torch.int32)
    with N.Engine(1) as eng:
        with pytest.raises(N.NativeValueError, match="chunk_sums=True"):
            eng.plan(store, table, offs, ntok, 8, budget_tokens=budget, sm_scale=0.125, residual=True)
        with pytest.raises(N.NativeValueError, match="residual: expected a bool"):
            eng.plan(store, table, offs, ntok, 8, budget_tokens=budget, sm_scale=0.125, residual=1)
    with pytest.raises(N.NativeValueError, match="chunk_sums: expected a bool"):
        N.HostStoreView.allocate(n_layers=1, n_pages=2, kv_heads=1, page_tokens=16, head_dim=64, chunk_sums="yes")


def test_chunk_sums_hold_the_stored_tokens():
    store, table, offs, ntok, q = make_case(D=64, T=32, S=8, kf="int4", vf="int8", sums=True, lengths=(64,))
    pages = torch.arange(store.n_pages, dtype=torch.int32)
    K, V = ref_keys(store, 1, pages), ref_values(store, 1, pages)  # [P, H, T, D]
    want = torch.stack([K, V], 3).reshape(store.n_pages, 2, 4, 8, 2, 64).sum(3)  # [P, H, T/S, 2, D]
    torch.testing.assert_close(store.chunk_sums[1].double(), want.transpose(0, 1), atol=1e-4, rtol=1e-5)
