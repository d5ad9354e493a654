"""Engine attention vs a float64 torch reference, and every ISA variant vs generic."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest
import torch

import kvtier._native as N

# avx512bw: the AVX-512 table with the BW (non-VNNI) selection kernels, forced;
# amx: the VNNI table with the AMX selection kernel for int8 keys
ISAS = [name for name in ("generic", "avx2", "avx512", "avx512bw", "amx") if N.isa_supported(name)]


@pytest.fixture(autouse=True)
def _restore_isa():
    before = N.active_isa()
    yield
    N.set_isa(before)


# ---------------------------------------------------------------- reference
def ref_keys(store, layer, pages):
    """Dequantize keys [np, H, T, D] in float64, independently of the C code."""
    pages = pages.long()
    if store.key_format is N.KeyFormat.BF16:
        return store.keys[layer, pages].double()
    if store.key_format is N.KeyFormat.INT8:
        return store.keys[layer, pages].double() * store.key_scales[layer, pages].double()[..., None]
    b = store.keys[layer, pages].to(torch.int16)
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    q = torch.stack([lo, hi], dim=-1).flatten(-2).double()
    sc = store.key_scales[layer, pages].double().repeat_interleave(store.key_group, dim=-1)
    return q * sc


def ref_values(store, layer, pages):
    pages = pages.long()
    if store.value_format is N.ValueFormat.BF16:
        return store.buffers.values[layer, pages].double()
    return store.buffers.values[layer, pages].double() * store.value_scales[layer, pages].double()[..., None]


def flat(x, n):  # [np, H, T, D] -> [H, n, D]
    return x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[3])[:, :n]


def ref_candidates(store, layer, pages, h, qs, n, k, prefilter, reduce):
    """Tokens the prefilter keeps: those of the summary chunks with the best key upper bound."""
    S, D = store.summary_tokens, qs.shape[-1]
    nc, want = -(-n // S), math.ceil(prefilter * k / S)
    if prefilter == 0 or want >= nc:
        return torch.arange(n)
    summ = store.summary[layer, h, pages.long()].double().reshape(-1, 2, D)[:nc]  # [nc, 2, D]
    ub = torch.maximum(qs[:, None] * summ[None, :, 0], qs[:, None] * summ[None, :, 1]).sum(-1)  # [m, nc]
    ub = ub.mean(0) if reduce == "mean" else ub.amax(0)
    chosen = torch.sort(torch.topk(ub, want).indices).values
    return torch.cat([torch.arange(c * S, min((c + 1) * S, n)) for c in chosen.tolist()])


def ref_residual(K, V, qg, sel, n, S, sm, cap):
    """The unselected tokens as one pseudo-token per summary chunk of S: (logits [G, c], values [c, D])."""
    out = torch.ones(n, dtype=torch.bool)
    out[sel] = False
    xs, vs = [], []
    for c0 in range(0, n, S):
        idx = torch.arange(c0, min(c0 + S, n))[out[c0:c0 + S]]
        if len(idx) == 0:
            continue
        x = (qg @ K[idx].mean(0)) * sm
        if cap > 0:
            x = cap * torch.tanh(x / cap)
        xs.append(x + math.log(len(idx)))
        vs.append(V[idx].mean(0))
    if not xs:
        return torch.zeros(qg.shape[0], 0, dtype=torch.float64), torch.zeros(0, V.shape[-1], dtype=torch.float64)
    return torch.stack(xs, -1), torch.stack(vs)


def ref_attention(store, layer, table, offs, ntok, q, *, mode, reduce, budget, blocks, tau, sm, cap,
                  prefilter=0.0, residual=False):
    B, Hq, D = q.shape
    Hkv = store.kv_heads
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64)
    sels = [[None] * Hq for _ in range(B)]
    for b in range(B):
        n = int(ntok[b])
        pages = table[int(offs[b]):int(offs[b + 1])]
        if n == 0:
            for qh in range(Hq):
                sels[b][qh] = []
            continue
        K, V = flat(ref_keys(store, layer, pages), n), flat(ref_values(store, layer, pages), n)
        for h in range(Hkv):
            qg = q[b, h * G:(h + 1) * G].double()
            logit = (qg @ K[h].T) * sm
            if cap > 0:
                logit = cap * torch.tanh(logit / cap)
            sets = [(g, g + 1) for g in range(G)] if reduce == "per_qhead" else [(0, G)]
            k = n if mode == "all" else int(budget[b, h])
            for g0, g1 in sets:
                r = logit[g0:g1].amax(0) if reduce != "mean" else logit[g0:g1].mean(0)
                if mode == "all":
                    sel = torch.arange(n)
                elif mode == "blocks":
                    bt = int(blocks[h])
                    S = store.summary_tokens
                    summ = store.summary[layer, h, pages.long()].double()  # [np, T/S, 2, D]
                    summ = summ.reshape(-1, 2, D)[: (n + S - 1) // S]
                    nb = (n + bt - 1) // bt
                    ub = []
                    for bi in range(nb):
                        c = summ[bi * bt // S: min((bi + 1) * bt, n + S - 1) // S]
                        mn, mx = c[:, 0].amin(0), c[:, 1].amax(0)
                        u = torch.maximum(qg[g0:g1] * mn, qg[g0:g1] * mx).sum(-1) * sm
                        ub.append(u.mean() if reduce == "mean" else u.max())
                    ub = torch.stack(ub)
                    chosen = torch.topk(ub, min(nb, -(-k // bt))).indices
                    sel = torch.cat([torch.arange(c * bt, min((c + 1) * bt, n)) for c in chosen.tolist()])
                else:
                    cand = ref_candidates(store, layer, pages, h, qg[g0:g1], n, k, prefilter, reduce)
                    # without the prefilter, mass is normalized over every host token
                    probs = torch.softmax(r[cand], 0)
                    pick = torch.topk(r[cand], min(k, len(cand))).indices
                    sel = cand[pick]
                    if mode == "mass":
                        p = probs[pick]
                        order = torch.argsort(p, descending=True)
                        cum = torch.cumsum(p[order], 0)
                        keep = int((cum < tau).sum()) + 1
                        sel = sel[order[: min(keep, len(sel))]]
                sel = torch.sort(sel).values
                rx, rv = ref_residual(K[h], V[h], qg[g0:g1], sel, n, store.summary_tokens, sm, cap) \
                    if residual else (torch.zeros(g1 - g0, 0, dtype=torch.float64), V[h, :0])
                for g in range(g0, g1):
                    x = torch.cat([logit[g, sel], rx[g - g0]])
                    lse[b, h * G + g] = torch.logsumexp(x, 0)
                    out[b, h * G + g] = torch.softmax(x, 0) @ torch.cat([V[h, sel], rv])
                    sels[b][h * G + g] = sel.tolist()
    return out, lse, sels


# ---------------------------------------------------------------- harness
def make_case(*, D=64, T=16, G=4, Hkv=2, lengths=(100,), kf="int8", vf="bf16", layers=2, seed=0,
              S=None, grp=32, sums=False):
    g = torch.Generator().manual_seed(seed)
    npages = [max(1, -(-n // T)) for n in lengths]
    P = sum(npages) + 3
    S = S or min(16, T)
    store = N.HostStoreView.allocate(n_layers=layers, n_pages=P, kv_heads=Hkv, page_tokens=T, head_dim=D,
                                     key_format=kf, value_format=vf, summary_tokens=S,
                                     key_group=grp if kf == "int4" else 32, chunk_sums=sums)
    perm = torch.randperm(P, generator=g).to(torch.int32)
    for layer in range(layers):
        k = torch.randn(P, Hkv, T, D, generator=g) * 2
        v = torch.randn(P, Hkv, T, D, generator=g)
        store.append(layer, torch.arange(P, dtype=torch.int32), k, v)
    table = perm[: sum(npages)]
    offs = torch.tensor([0] + list(torch.tensor(npages).cumsum(0)), dtype=torch.int32)
    ntok = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), G * Hkv, D, generator=g)
    return store, table, offs, ntok, q


def run_both(store, table, offs, ntok, q, *, mode="topk", reduce="max", budget=None, blocks=None,
             tau=1.0, cap=0.0, layer=1, threads=2, prefilter=0.0, residual=False):
    B, Hq, D = q.shape
    sm = 1.0 / math.sqrt(D)
    if budget is None:
        budget = torch.full((B, store.kv_heads), 20, dtype=torch.int32)
    with N.Engine(threads) as eng:
        eng.plan(store, table, offs, ntok, Hq, mode=mode, group_reduce=reduce, budget_tokens=budget,
                 block_tokens=blocks, mass_threshold=tau, sm_scale=sm, soft_cap=cap, prefilter=prefilter,
                 residual=residual)
        res = eng.run(layer, q, return_selection=True)
    ref = ref_attention(store, layer, table, offs, ntok, q, mode=mode, reduce=reduce, budget=budget,
                        blocks=blocks, tau=tau, sm=sm, cap=cap, prefilter=prefilter, residual=residual)
    return res, ref


def assert_matches(res, ref, atol=2e-4):
    out, lse, sels = ref
    B, Hq, _ = out.shape
    for b in range(B):
        for qh in range(Hq):
            n = int(res.n_selected[b, qh])
            got = res.sel_index[b, qh, :n].tolist()
            assert got == sels[b][qh], f"selection differs at request {b} head {qh}"
            assert (res.sel_index[b, qh, n:] == -1).all()
    torch.testing.assert_close(res.out.double(), out, atol=atol, rtol=1e-4)
    torch.testing.assert_close(res.lse.double(), lse, atol=atol, rtol=1e-4)


def generic_then(isa, case, **kw):
    """The case on `generic`, then on `isa`: (base, base's reference, got, got's reference)."""
    N.set_isa("generic")
    base, base_ref = run_both(*case, **kw)
    N.set_isa(isa)
    got, ref = run_both(*case, **kw)
    return base, base_ref, got, ref


def assert_same_as_generic(got, base, *, counts=True):
    """A SIMD variant selects exactly the generic path's tokens and matches its output."""
    assert torch.equal(got.sel_index, base.sel_index)
    if counts:
        assert torch.equal(got.n_selected, base.n_selected)
    torch.testing.assert_close(got.out, base.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse, base.lse, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- tests
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


# ---------------------------------------------------------------- residual
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


def test_score_matches_reference_topk():
    store, table, offs, ntok, q = make_case(D=128, T=16, G=4, lengths=(200, 90), seed=3)
    sm = 1 / math.sqrt(128)
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, 8, budget_tokens=torch.full((2, 2), 32, dtype=torch.int32),
                 sm_scale=sm)
        sc = eng.score(0, q)
    assert sc.shape == (2, 8, 200) and torch.isneginf(sc[1, :, 90:]).all()
    K = flat(ref_keys(store, 0, table[offs[0]:offs[1]]), 200).repeat_interleave(4, 0)
    ref = torch.einsum("gd,gnd->gn", q[0].double(), K) * sm
    assert_within_selection_bound(sc[0].double(), ref, q[0].double(), K, sm)
    assert_topk_faithful(sc[0, 0].double(), ref[0], 32, 2 * selection_bound(q[0].double(), K, sm)[0])


# Selection-stage scores (kvt_score; what TOPK/MASS select on) may come from the
# int16-query kernel (int8 or int4 keys on AVX-512): q is rounded to q16 with
# |q - scale*q16| <= max|q| / (2 * 32767) per channel, so a logit is off by at most
# sm * sum_d |k_d| * max|q| / 65534, plus float rounding. The float kernels are far
# inside this bound.
def selection_bound(q, K, sm):
    """q [G, D], K [G, n, D] dequantized keys -> [G, n] bound on |score - exact|."""
    qmax = q.abs().amax(-1, keepdim=True)  # [G, 1]
    return sm * K.abs().sum(-1) * qmax / 65534 + 1e-6 * (1 + (q[:, None, :] * K).sum(-1).abs() * sm)


def assert_within_selection_bound(got, ref, q, K, sm):
    err = (got - ref).abs()
    bound = selection_bound(q, K, sm)
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst error/bound {(err / bound).max():.3g}"


def assert_topk_faithful(got, ref, k, gap):
    """Top-k by the selection scores vs by the exact logits: recall >= 0.99, and every
    token in one set but not the other is within `gap` of the exact k-th logit."""
    a = set(torch.topk(got, k).indices.tolist())
    b = set(torch.topk(ref, k).indices.tolist())
    assert len(a & b) >= 0.99 * k
    kth = torch.topk(ref, k).values[-1]
    for t in a ^ b:
        assert abs(ref[t] - kth) <= gap[t], f"token {t} differs by {abs(ref[t] - kth):.3g} from the k-th logit"


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("kf", ["int8", "int4"])
def test_selection_scores_vs_generic(isa, G, kf):
    """Selection-stage scores of every ISA vs generic within the stated bound, and
    their top-k sets faithful to the exact top-k (near-ties only). The bound holds
    for int4 keys too: it is taken over the dequantized keys."""
    D, n, k = 128, 4000, 256
    store, table, offs, ntok, q = make_case(D=D, T=64, G=G, Hkv=2, lengths=(n,), seed=21 + G, kf=kf)
    sm = 1 / math.sqrt(D)
    scores = {}
    for name in ("generic", isa):
        N.set_isa(name)
        with N.Engine(2) as eng:
            eng.plan(store, table, offs, ntok, G * 2, budget_tokens=torch.full((1, 2), k, dtype=torch.int32),
                     sm_scale=sm)
            scores[name] = eng.score(1, q)[0].double()
    K = flat(ref_keys(store, 1, table[offs[0]:offs[1]]), n).repeat_interleave(G, 0)
    ref = torch.einsum("gd,gnd->gn", q[0].double(), K) * sm
    torch.testing.assert_close(scores["generic"], ref, atol=1e-4, rtol=1e-5)
    assert_within_selection_bound(scores[isa], ref, q[0].double(), K, sm)
    gap = 2 * selection_bound(q[0].double(), K, sm)
    for g in range(2 * G):
        assert_topk_faithful(scores[isa][g], ref[g], k, gap[g])


@pytest.mark.skipif(not N.isa_supported("amx"), reason="needs a CPU with AMX-INT8 and the OS's permission to use it")
@pytest.mark.parametrize("D", [16, 48, 64, 80, 128, 192, 256])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16, 20])
def test_amx_selection_scores_equal_vnni(D, G, gen):
    """The AMX kernel's integer sums are the VNNI kernel's, and its float steps the
    same in the same order: selection scores equal bit for bit, over head dims with a
    partial 64-channel step, groups wider than one tile (20 heads) and requests that
    end inside a 16-token tile; the cap path scores through the scratch rows."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    store, table, offs, ntok, q = make_case(D=D, T=32, G=G, Hkv=2, lengths=(517, 40, 1), seed=seed)
    scores = {}
    for name in ("avx512", "amx"):
        for cap in (0.0, 30.0):
            N.set_isa(name)
            with N.Engine(2) as eng:
                eng.plan(store, table, offs, ntok, G * 2, budget_tokens=torch.full((3, 2), 8, dtype=torch.int32),
                         sm_scale=1 / math.sqrt(D), soft_cap=cap)
                scores[name, cap] = eng.score(1, q)
    for cap in (0.0, 30.0):
        assert torch.isfinite(scores["amx", cap][0, :, :517]).all()
        assert torch.equal(scores["amx", cap], scores["avx512", cap])


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("mode,reduce,cap", [("topk", "max", 0.0), ("topk", "mean", 5.0),
                                             ("topk", "per_qhead", 0.0), ("mass", "max", 0.0)])
@pytest.mark.parametrize("kf", ["int8", "int4"])
def test_long_context_selection_matches_generic(isa, mode, reduce, cap, kf):
    """Long requests take the sampled k-th-value search and, on the int16-query path,
    the candidate band around the k-th selection score: the selection must still be
    exactly the one the exact logits make."""
    case = make_case(D=128, T=64, G=4, Hkv=2, lengths=(9000, 5000), seed=31, kf=kf)
    kw = dict(mode=mode, reduce=reduce, cap=cap, tau=0.5,
              budget=torch.tensor([[300, 700], [64, 1000]], dtype=torch.int32))
    base, ref, got, _ = generic_then(isa, case, **kw)
    assert_matches(base, ref)
    assert_same_as_generic(got, base)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("mode,reduce,cap,vf,kf", [("topk", "max", 0.0, "bf16", "int8"),
                                                   ("mass", "max", 0.0, "int8", "int8"),
                                                   ("topk", "mean", 5.0, "bf16", "int8"),
                                                   ("mass", "per_qhead", 0.0, "bf16", "int8"),
                                                   ("topk", "max", 0.05, "bf16", "int8"),
                                                   ("topk", "max", 0.0, "bf16", "int4"),
                                                   ("mass", "per_qhead", 0.0, "int8", "int4")])
def test_batch1_long_many_threads_matches_generic(isa, mode, reduce, cap, vf, kf):
    """Batch 1 x 8 kv-heads over 20K tokens with more threads than selection sets:
    the candidates' exact logits and the attend of each selection are split into
    chunks across threads and merged by log-sum-exp (cap 0.05 saturates the logits,
    so the candidate band overflows and the set takes the one-item path)."""
    case = make_case(D=128, T=64, G=4, Hkv=8, lengths=(20_000,), layers=1, seed=41, vf=vf, kf=kf)
    budget = torch.tensor([[2048, 300, 1000, 64, 4000, 2048, 20_000, 1]], dtype=torch.int32)
    kw = dict(mode=mode, reduce=reduce, cap=cap, tau=0.5, budget=budget, layer=0, threads=12)
    base, ref, got, _ = generic_then(isa, case, **kw)
    if cap != 0.05:  # saturated logits tie in float; torch.topk breaks ties differently
        assert_matches(base, ref)
    assert_same_as_generic(got, base)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("mode,reduce", [("topk", "max"), ("mass", "per_qhead")])
def test_split_batch_with_empty_short_and_long_requests_matches_generic(isa, mode, reduce):
    """The split path's select runs inside the score and collect phases (the last score item
    of a kv item takes its sets' floors, the last collected range of a set its band): a
    request past the floor's 4096 tokens, one below it (selected at once) and an empty one
    (no score items at all), on more threads than sets."""
    case = make_case(D=64, T=32, G=4, Hkv=2, lengths=(9000, 0, 3000, 5000), layers=1, seed=53)
    budget = torch.tensor([[700, 64], [5, 5], [200, 3000], [4096, 1]], dtype=torch.int32)
    kw = dict(mode=mode, reduce=reduce, tau=0.6, budget=budget, layer=0, threads=12)
    base, base_ref, got, ref = generic_then(isa, case, **kw)
    assert_matches(base, base_ref)
    assert_matches(got, ref)
    assert torch.equal(got.n_selected[1], torch.zeros_like(got.n_selected[1]))
    if mode == "topk":
        assert_same_as_generic(got, base)
    else:
        assert_same_or_near_tie(got, base, case, mode=mode, tau=0.6, reduce=reduce, cap=0.0, layer=0)


def test_weighted_values_matches_reference():
    store, table, offs, ntok, q = make_case(lengths=(50, 20), vf="int8", seed=9)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, 20, (2, 8, 12), generator=g, dtype=torch.int32)
    p = torch.rand(2, 8, 12, generator=g)
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, 8, mode="all", sm_scale=0.1)
        out = eng.weighted_values(store, 1, idx, p)
    for b in range(2):
        V = flat(ref_values(store, 1, table[offs[b]:offs[b + 1]]), int(ntok[b]))
        for qh in range(8):
            keep = idx[b, qh] >= 0
            want = p[b, qh, keep].double() @ V[qh // 4, idx[b, qh, keep].long()]
            torch.testing.assert_close(out[b, qh].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("kf,vf", [("int8", "bf16"), ("int4", "int8"), ("bf16", "bf16")])
@pytest.mark.parametrize("mode", ["topk", "mass", "blocks", "all"])
def test_isa_variants_match_generic(isa, kf, vf, mode):
    case = make_case(D=128, T=16, G=4, Hkv=2, lengths=(333, 45), kf=kf, vf=vf, seed=11)
    kw = dict(mode=mode, budget=torch.tensor([[64, 32], [16, 100]], dtype=torch.int32), tau=0.8,
              blocks=torch.tensor([16, 32], dtype=torch.int32) if mode == "blocks" else None)
    N.set_isa("generic")
    base, _ = run_both(*case, **kw)
    N.set_isa(isa)
    got, ref = run_both(*case, **kw)
    assert_matches(got, ref)
    assert_same_as_generic(got, base, counts=False)


def even_divisors(D):
    return [g for g in range(2, D + 1, 2) if D % g == 0]


def run_engine(store, table, offs, ntok, q, *, mode, reduce, budget, tau=0.7, cap=0.0, threads=2, prefilter=0.0,
               residual=False):
    B, Hq, D = q.shape
    with N.Engine(threads) as eng:
        eng.plan(store, table, offs, ntok, Hq, mode=mode, group_reduce=reduce, budget_tokens=budget,
                 mass_threshold=tau, sm_scale=1.0 / math.sqrt(D), soft_cap=cap, prefilter=prefilter,
                 residual=residual)
        return eng.run(1, q, return_selection=True)


def ref_selection_logits(case, b, qh, *, reduce, cap, layer=1):
    """Float64 selection logits of request b's tokens for query head qh's set, and per token
    a tolerance for the float32 paths: 4·sqrt(D)·2^-24·sm·max_g Σ_d |q_gd k_td|, the size of
    the rounding of a D-term float sum in any order (the typical sqrt(D) growth, 4x over)."""
    store, table, offs, ntok, q = case
    D, G, n = q.shape[-1], q.shape[1] // store.kv_heads, int(ntok[b])
    h, sm = qh // G, 1.0 / math.sqrt(D)
    K = flat(ref_keys(store, layer, table[int(offs[b]):int(offs[b + 1])]), n)[h]
    qg = q[b, h * G:(h + 1) * G].double()
    if reduce == "per_qhead":
        qg = qg[qh - h * G:qh - h * G + 1]
    x = (qg @ K.T) * sm
    if cap > 0:
        x = cap * torch.tanh(x / cap)
    r = x.mean(0) if reduce == "mean" else x.amax(0)
    tol = 4 * math.sqrt(D) * 2.0**-24 * sm * (qg.abs() @ K.abs().T).amax(0)
    return r, tol


def assert_same_or_near_tie(got, base, case, *, mode, reduce, cap, tau=1.0, layer=1):
    """A SIMD variant selects the generic path's tokens, except at a near tie at the cut.
    Only the summation order of the exact logits differs between the paths (a few ulp), so
    two tokens whose logits lie within that of each other at the k-th place can trade places:
    then the selections have one size and every token in one but not the other lies within
    the float rounding tolerance of every such token of the other (float64 logits). MASS
    also has the cut in mass: the SIMD paths weigh the tokens outside the candidate band by
    their int16-query logits (within the stated error bound), so the mass at the cut can
    land on the other side of tau by a rounding; then one selection is the other plus the
    tokens at the cut and the exact mass of the shorter one is within 1e-3 of tau. A band
    that wrongly dropped a token fails both unless that token too sits within the rounding
    tolerance of the cut. Rows with equal selections match in output too."""
    same = (got.sel_index == base.sel_index).all(-1)
    for b, qh in (~same).nonzero().tolist():
        r, tol = ref_selection_logits(case, b, qh, reduce=reduce, cap=cap, layer=layer)
        a = set(got.sel_index[b, qh, : int(got.n_selected[b, qh])].tolist())
        c = set(base.sel_index[b, qh, : int(base.n_selected[b, qh])].tolist())
        if len(a) == len(c):
            far = [(i, j) for i in a - c for j in c - a if abs(float(r[i] - r[j])) > float(tol[i] + tol[j])]
            assert not far, f"request {b} head {qh}: selections trade tokens that are no near tie: {far[:3]} " \
                            f"(logit gaps {[float(r[i] - r[j]) for i, j in far[:3]]})"
            continue
        assert mode == "mass", f"request {b} head {qh}: selections of {len(a)} and {len(c)} tokens"
        small, big = (a, c) if len(a) < len(c) else (c, a)
        assert small < big, f"request {b} head {qh}: selections differ beyond the cut"
        mass = float(torch.softmax(r, 0)[list(small)].sum())
        assert abs(mass - tau) < 1e-3, f"request {b} head {qh}: not a near tie at the cut (mass {mass}, tau {tau})"
    torch.testing.assert_close(got.out[same], base.out[same], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse[same], base.lse[same], atol=1e-5, rtol=1e-5)


def test_near_tie_check_rejects_a_swap_far_from_the_cut():
    """The tolerance of assert_same_or_near_tie admits rounding at the cut, not a wrong token:
    swapping the best selected token for the worst unselected one fails it."""
    case = make_case(D=128, T=16, G=4, lengths=(53,), kf="int4", vf="int8", seed=5, grp=8)
    kw = dict(mode="topk", reduce="mean", budget=torch.full((1, 2), 17, dtype=torch.int32))
    base = run_engine(*case, **kw)
    bad = base._replace(sel_index=base.sel_index.clone())
    r, _ = ref_selection_logits(case, 0, 0, reduce="mean", cap=0.0)
    sel = bad.sel_index[0, 0, :17]
    rest = torch.tensor([t for t in range(53) if t not in set(sel.tolist())])
    sel[r[sel.long()].argmax()] = rest[r[rest].argmin()]
    assert_same_or_near_tie(base, base, case, mode="topk", reduce="mean", cap=0.0)
    with pytest.raises(AssertionError, match="no near tie"):
        assert_same_or_near_tie(bad, base, case, mode="topk", reduce="mean", cap=0.0)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
def test_int4_near_tie_found_by_fresh_inputs_is_admitted(isa):
    """A case that fresh random inputs found: int4 keys in groups of 32, per query head;
    tokens 97 and 125 of request 0 have float64 logits 7.2e-7 apart (three ulp) at head 5's
    cut, and the SIMD exact kernels' summation order trades them against generic's."""
    case = make_case(D=128, T=64, G=8, Hkv=2, lengths=(197, 127, 1, 0), kf="int4", vf="int8",
                     seed=371761249, grp=32)
    budget = torch.tensor([[17, 10_000], [64, 3], [1, 5], [4, 4]], dtype=torch.int32)
    kw = dict(mode="topk", reduce="per_qhead", budget=budget)
    N.set_isa("generic")
    base = run_engine(*case, **kw)
    N.set_isa(isa)
    got = run_engine(*case, **kw)
    r, tol = ref_selection_logits(case, 0, 5, reduce="per_qhead", cap=0.0)
    assert 0 < float(r[125] - r[97]) < float(tol[125] + tol[97]) / 10  # the tie, not the engine
    assert_same_or_near_tie(got, base, case, mode="topk", reduce="per_qhead", cap=0.0)


def check_int4_vs_generic(isa, gen, *, D, T, G, grps, reduce, cap=0.0):
    """int4 keys of every group size: the ISA variant selects the generic path's tokens
    (TOPK and MASS; up to near ties at the cut, see assert_same_or_near_tie) over ragged
    requests, a single token and an empty one, budgets below and at or above the request
    length. A failure names the case's seed."""
    lengths = (3 * T + 5, 2 * T - 1, 1, 0)
    budget = torch.tensor([[17, 10_000], [T, 3], [1, 5], [4, 4]], dtype=torch.int32)
    for grp in grps:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        case = make_case(D=D, T=T, G=G, Hkv=2, lengths=lengths, kf="int4", vf="int8", seed=seed, grp=grp)
        for mode in ("topk", "mass"):
            kw = dict(mode=mode, reduce=reduce, budget=budget, cap=cap, tau=0.7)
            N.set_isa("generic")
            base = run_engine(*case, **kw)
            N.set_isa(isa)
            got = run_engine(*case, **kw)
            try:
                assert_same_or_near_tie(got, base, case, mode=mode, tau=kw["tau"], reduce=reduce, cap=cap)
            except AssertionError as e:
                raise AssertionError(f"make_case(seed={seed}, grp={grp}), {mode}: {e}") from None
            assert (got.n_selected[3] == 0).all() and torch.isneginf(got.lse[3]).all()


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("T", [16, 32, 64])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_int4_every_group_matches_generic(isa, D, T, G, gen):
    reduce = ["max", "mean", "per_qhead"][(D // 64 + T // 16 + G) % 3]
    check_int4_vs_generic(isa, gen, D=D, T=T, G=G, grps=even_divisors(D), reduce=reduce)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("G", [2, 3, 6])
def test_int4_odd_group_counts_match_generic(isa, G, gen):
    """Query groups that leave 2- and 1-head remainders for the int4 tiles (the
    4x2 and 8x1 token x head shapes and the per-token tail)."""
    for reduce in ("max", "mean"):  # shared selections: one exact-logit call per group
        check_int4_vs_generic(isa, gen, D=128, T=16, G=G, grps=(8, 16, 32, 128), reduce=reduce)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("D", [16, 48, 80, 96, 160])
def test_int4_partial_steps_match_generic(isa, D, gen):
    """Head dims that end in a partial 64-channel step of the int4 selection kernel,
    with groups that are not powers of two; soft cap on."""
    check_int4_vs_generic(isa, gen, D=D, T=16, G=4, grps=even_divisors(D), reduce="max", cap=5.0)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("D", [16, 48, 64, 96, 128, 160, 256])
def test_int4_selection_scores_within_bound(isa, D, gen):
    """Selection-stage scores of int4 keys, every group size and head dims with a
    partial last step, within the stated bound of the exact logits."""
    sm = 1 / math.sqrt(D)
    for grp in even_divisors(D):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        store, table, offs, ntok, q = make_case(D=D, T=16, G=4, Hkv=2, lengths=(203,), kf="int4", seed=seed,
                                                grp=grp)
        N.set_isa(isa)
        with N.Engine(2) as eng:
            eng.plan(store, table, offs, ntok, 8, budget_tokens=torch.full((1, 2), 32, dtype=torch.int32),
                     sm_scale=sm)
            sc = eng.score(1, q)[0].double()
        K = flat(ref_keys(store, 1, table[offs[0]:offs[1]]), 203).repeat_interleave(4, 0)
        ref = torch.einsum("gd,gnd->gn", q[0].double(), K) * sm
        assert_within_selection_bound(sc, ref, q[0].double(), K, sm)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("kf", ["int8", "int4"])
def test_empty_requests_only(isa, kf):
    case = make_case(D=64, T=16, G=4, lengths=(0, 0), kf=kf)
    for name in ("generic", isa):
        N.set_isa(name)
        res = run_engine(*case, mode="topk", reduce="max", budget=torch.full((2, 2), 8, dtype=torch.int32))
        assert (res.n_selected == 0).all() and (res.out == 0).all() and torch.isneginf(res.lse).all()


@pytest.mark.parametrize("isa", ISAS)
def test_stream_read_checksum(isa):
    N.set_isa(isa)
    buf = torch.randint(0, 255, (1_000_003,), dtype=torch.uint8)
    with N.Engine(2) as eng:
        assert eng.stream_read(buf) == int(buf.long().sum())


def test_oversubscribed_pool_repeats_exactly():
    """More threads than cores, many back-to-back runs, then runs after pauses: a run waits only
    for the workers that joined it, so a late worker must never touch a finished run or the
    next one's items, and sleeping workers must be woken."""
    store, table, offs, ntok, q = make_case(D=64, T=16, G=4, Hkv=4, lengths=(700, 333, 1))
    budget = torch.full((3, 4), 50, dtype=torch.int32)
    results = {}
    for threads in (1, 8):
        with N.Engine(threads) as eng:
            eng.plan(store, table, offs, ntok, 16, mode="topk", group_reduce="max", budget_tokens=budget,
                     sm_scale=0.125)
            first = eng.run(1, q, return_selection=True)
            for i in range(340):
                if i >= 300:  # pauses past the workers' spin: they sleep, and each run must wake them
                    time.sleep(0.002)
                again = eng.run(1, q, return_selection=True)
                assert torch.equal(again.out, first.out) and torch.equal(again.lse, first.lse)
                assert torch.equal(again.sel_index, first.sel_index)
            results[threads] = first
    assert torch.equal(results[8].sel_index, results[1].sel_index)
    torch.testing.assert_close(results[8].out, results[1].out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [700, 2000, 4500])
def test_long_sets_select_exactly_the_reference_top_k(budget):
    """n >= 4096 takes the sampled k-th value bound; budgets from n/8 to most of the set."""
    store, table, offs, ntok, q = make_case(D=64, T=16, G=2, Hkv=2, lengths=(5000,), kf="bf16")
    res, ref = run_both(store, table, offs, ntok, q, budget=torch.full((1, 2), budget, dtype=torch.int32))
    assert_matches(res, ref)


def test_replanning_reuses_buffers_without_changing_results():
    """A plan reuses the previous plan's large buffers: small after large, then larger, as fresh engines."""
    cases = [make_case(D=64, T=16, G=4, lengths=lengths, seed=i) for i, lengths in
             enumerate([(3000, 900), (40,), (5000, 10, 0)])]
    fresh = []
    for case in cases:
        budget = torch.full((len(case[3]), 2), 64, dtype=torch.int32)
        fresh.append(run_engine(*case, mode="mass", reduce="max", budget=budget, tau=0.9))
    with N.Engine(2) as eng:
        for case, ref in zip(cases, fresh):
            store, table, offs, ntok, q = case
            budget = torch.full((len(ntok), 2), 64, dtype=torch.int32)
            eng.plan(store, table, offs, ntok, 8, mode="mass", budget_tokens=budget, mass_threshold=0.9,
                     sm_scale=1 / 8)
            assert_same_as_generic(eng.run(1, q, return_selection=True), ref)


def test_run_releases_the_gil():
    """Engine.run lets other Python threads run while it works (cffi drops the GIL around
    the call), so the GPU side is driven meanwhile. A thread that wakes every 0.5 ms must
    run well inside a long call (generic, one thread, ALL over 50K tokens); with the GIL
    held it could run only within a switch interval of the call's ends (a C sort that
    holds the GIL for 0.5 s let it in once)."""
    N.set_isa("generic")
    store, table, offs, ntok, q = make_case(D=128, T=64, G=4, Hkv=2, lengths=(50_000,), layers=1, seed=4)
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0005)

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    ticker = threading.Thread(target=tick)
    try:
        with N.Engine(1) as eng:
            eng.plan(store, table, offs, ntok, 8, mode="all", sm_scale=1 / math.sqrt(128))
            ticker.start()
            time.sleep(0.01)
            t0 = time.perf_counter()
            eng.run(0, q)
            t1 = time.perf_counter()
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join()
        sys.setswitchinterval(before)
    assert t1 - t0 > 0.02, f"the call took {1e3 * (t1 - t0):.1f} ms, too short to tell"
    inside = [t for t in stamps if t0 + 0.002 < t < t1 - 0.002]
    assert len(inside) >= 10, f"{len(inside)} wake-ups in a {1e3 * (t1 - t0):.1f} ms call"


def test_phase_times_count_the_traced_runs_and_their_phases():
    """Tracing adds each phase's wall time to the engine's counters: the phases a mode runs are timed,
    the others stay zero, the phases fit in the whole call, turning tracing on clears the counters
    and off stops them; results are those of an untraced run."""
    from kvtier._native._loader import lib

    assert lib.KVT_N_PHASES == len(N.Engine.PHASES) and N.Engine.PHASES[lib.KVT_PHASE_CALL] == "call"
    assert N.Engine.PHASES[lib.KVT_PHASE_RESIDUAL_MERGE] == "residual_merge"
    store, table, offs, ntok, q = make_case(D=64, T=16, G=4, lengths=(900, 400), S=16, sums=True, seed=23)
    budget = torch.tensor([[30, 30], [30, 30]], dtype=torch.int32)
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, 8, budget_tokens=budget, sm_scale=1 / 8, residual=True)
        base = eng.run(1, q)
        eng.trace(True)
        for _ in range(3):
            got = eng.run(1, q)
        t = eng.phase_times()
        assert t["runs"] == 3
        torch.testing.assert_close(got.out, base.out, rtol=0, atol=0)
        assert t["score"] > 0 and t["attend"] > 0 and t["residual"] > 0 and t["residual_merge"] > 0
        assert t["bound"] == 0  # no prefilter in this plan
        assert sum(v for k, v in t.items() if k not in ("call", "runs")) <= t["call"]
        eng.trace(False)
        eng.run(1, q)
        assert eng.phase_times()["runs"] == 3
        eng.trace(True)
        assert eng.phase_times() == {**{name: 0.0 for name in N.Engine.PHASES}, "runs": 0.0}
