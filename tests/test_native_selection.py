"""The selection modes (TOPK, MASS, BLOCKS, ALL) and group reduces against the float64
reference: shapes, key and value formats, soft cap, ties, empty and long requests."""

from __future__ import annotations

import math

import pytest
import torch

import kvtier._native as N
from native_cases import _restore_isa  # noqa: F401  (autouse)
from native_cases import ref_keys, ref_values, flat, make_case, run_both, assert_matches


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("T", [16, 32, 64])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_shapes_topk_vs_reference(D, T, G):
    kf = ["int8", "int4", "bf16"][(D // 64 + T // 16 + G) % 3]
    case = make_case(D=D, T=T, G=G, lengths=(T * 3 + 5, 7), kf=kf, seed=D + T + G)
    assert_matches(*run_both(*case, budget=torch.tensor([[17, 30], [3, 50]], dtype=torch.int32)))


@pytest.mark.parametrize("mode", ["topk", "mass", "blocks", "all"])
@pytest.mark.parametrize("reduce", ["max", "mean", "per_qhead"])
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("kf,vf", [("int8", "bf16"), ("int4", "int8"), ("bf16", "int8")])
def test_modes_vs_reference(mode, reduce, cap, kf, vf):
    case = make_case(D=64, T=32, G=4, lengths=(150, 70, 0), kf=kf, vf=vf, seed=len(mode) + len(reduce))
    budget = torch.tensor([[40, 64], [33, 12], [5, 5]], dtype=torch.int32)
    blocks = torch.tensor([16, 64], dtype=torch.int32) if mode == "blocks" else None
    assert_matches(*run_both(*case, mode=mode, reduce=reduce, budget=budget, blocks=blocks, tau=0.9, cap=cap))


def test_budget_covers_everything_equals_exact_attention():
    case = make_case(lengths=(77, 130))
    budget = torch.full((2, 2), 10_000, dtype=torch.int32)
    res, ref = run_both(*case, budget=budget)
    assert_matches(res, ref)
    res_all, ref_all = run_both(*case, mode="all")
    torch.testing.assert_close(res.out, res_all.out)
    assert (res.n_selected == torch.tensor([[77] * 8, [130] * 8], dtype=torch.int32)).all()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("prefilter", [0.0, 2.0])
def test_exact_ties_select_exactly_k(threads, prefilter):
    """Every page a copy of one page: each score occurs once per page, so the k-th
    largest sits inside a run of exactly equal values. The selection still holds
    exactly k tokens (ties taken in token order), and since tied tokens share
    their key and value, the output equals the reference whichever ties it took."""
    g = torch.Generator().manual_seed(11)
    T, D, Hkv, G, n_pages = 16, 64, 2, 4, 300
    store = N.HostStoreView.allocate(n_layers=1, n_pages=n_pages, kv_heads=Hkv, page_tokens=T, head_dim=D,
                                     key_format="int8", value_format="bf16", summary_tokens=16)
    k = (torch.randn(1, Hkv, T, D, generator=g) * 2).expand(n_pages, -1, -1, -1).contiguous()
    v = torch.randn(1, Hkv, T, D, generator=g).expand(n_pages, -1, -1, -1).contiguous()
    store.append(0, torch.arange(n_pages, dtype=torch.int32), k, v)
    n = n_pages * T
    table = torch.randperm(n_pages, generator=g).to(torch.int32)
    offs, ntok = torch.tensor([0, n_pages], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, G * Hkv, D, generator=g)
    budget = torch.full((1, Hkv), 1000, dtype=torch.int32)
    # candidates: every page, or the prefilter's chunks (a chunk is a page here, all tied)
    copies = n_pages if prefilter == 0 else math.ceil(prefilter * 1000 / 16)
    counts = [float(copies)] * (1000 // copies) + ([float(1000 % copies)] if 1000 % copies else [])
    with N.Engine(threads) as eng:
        eng.plan(store, table, offs, ntok, G * Hkv, budget_tokens=budget, sm_scale=D ** -0.5, prefilter=prefilter)
        res = eng.run(0, q, return_selection=True)
    assert (res.n_selected == 1000).all()
    for qh in range(G * Hkv):
        sel = res.sel_index[0, qh, :1000]
        assert (sel[1:] > sel[:-1]).all(), "selection not ascending"
    K = ref_keys(store, 0, table)[0].double()  # every page the same: [H, T, D]
    V = ref_values(store, 0, table)[0].double()
    for h in range(Hkv):
        logit = (q[0, h * G:(h + 1) * G].double() @ K[h].T) * D ** -0.5  # [G, T]: one page's scores
        best = torch.sort(logit.amax(0), descending=True).indices[:len(counts)]
        x = logit[:, best] + torch.tensor(counts, dtype=torch.float64).log()  # logsumexp over the copies
        w = torch.softmax(x, dim=-1)
        ref = w @ V[h, best]
        torch.testing.assert_close(res.out[0, h * G:(h + 1) * G].double(), ref, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(res.lse[0, h * G:(h + 1) * G].double(), torch.logsumexp(x, -1),
                                   atol=2e-4, rtol=1e-4)


def test_single_token_and_empty_request():
    case = make_case(lengths=(1, 0, 2))
    res, ref = run_both(*case)
    assert_matches(res, ref)
    assert torch.isneginf(res.lse[1]).all() and (res.out[1] == 0).all()
    assert (res.n_selected[1] == 0).all() and (res.sel_index[1] == -1).all()


def test_mass_threshold_small_selects_few():
    case = make_case(lengths=(300,), G=1, seed=5)
    res, ref = run_both(*case, mode="mass", tau=0.3, budget=torch.tensor([[200, 200]], dtype=torch.int32))
    assert_matches(res, ref)
    assert (res.n_selected < 200).all()


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.999])
def test_mass_cut_with_many_tied_logits(tau):
    """Hundreds of tokens share a few keys, so their logits tie exactly: the mass cut keeps as
    many of each tied value as the float64 reference does (which of them is free)."""
    g = torch.Generator().manual_seed(int(tau * 1000))
    T, D, n = 16, 64, 600
    P = -(-n // T)
    store = N.HostStoreView.allocate(n_layers=1, n_pages=P, kv_heads=1, page_tokens=T, head_dim=D,
                                     key_format="int8", value_format="bf16", summary_tokens=T)
    base = torch.randn(6, D, generator=g) * 2
    k = torch.randn(P * T, D, generator=g) * 2
    tied = torch.rand(P * T, generator=g) < 0.8
    k[tied] = base[torch.randint(0, 6, (int(tied.sum()),), generator=g)]
    store.append(0, torch.arange(P, dtype=torch.int32), k.view(P, T, 1, D).transpose(1, 2).contiguous(),
                 torch.randn(P, 1, T, D, generator=g))
    table, offs = torch.arange(P, dtype=torch.int32), torch.tensor([0, P], dtype=torch.int32)
    q = torch.randn(1, 1, D, generator=g)
    res, (_, _, sels) = run_both(store, table, offs, torch.tensor([n], dtype=torch.int32), q, mode="mass", tau=tau,
                                 budget=torch.tensor([[450]], dtype=torch.int32), layer=0)
    logit = (flat(ref_keys(store, 0, table), n)[0] @ q[0, 0].double()) / math.sqrt(D)
    got = res.sel_index[0, 0, : int(res.n_selected[0, 0])]
    assert got.tolist() == sorted(set(got.tolist()))  # ascending, no repeats
    assert sorted(logit[got].tolist()) == sorted(logit[torch.tensor(sels[0][0])].tolist())
    assert int(res.n_selected[0, 0]) < 450 or tau > 0.99


@pytest.mark.parametrize("budget", [700, 2000, 4500])
def test_long_sets_select_exactly_the_reference_top_k(budget):
    """n >= 4096 takes the sampled k-th value bound; budgets from n/8 to most of the set."""
    store, table, offs, ntok, q = make_case(D=64, T=16, G=2, Hkv=2, lengths=(5000,), kf="bf16")
    res, ref = run_both(store, table, offs, ntok, q, budget=torch.full((1, 2), budget, dtype=torch.int32))
    assert_matches(res, ref)
