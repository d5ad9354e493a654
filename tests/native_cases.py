"""Shared by the native engine tests: cases over a host store, a float64 torch reference
of the engine's attention, and the checks that compare the engine with it or with the
`generic` ISA. Test modules import what they use; `_restore_isa` is an autouse fixture,
so importing it makes every test of the module leave the active ISA as it found it."""

from __future__ import annotations

import math

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
    if store.key_format is N.KeyFormat.INT8_CHANNEL:  # a scale and a zero point per channel of each (page, head)
        sc = store.key_scales[layer, pages].double()  # [np, H, 2, D]
        return store.keys[layer, pages].double() * sc[:, :, None, 0] + sc[:, :, None, 1]
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


def ref_reduce(x, lse, reduce):
    """The group's ranking of tokens from its heads' logits x [G, n]: their max or mean, or
    per_qhead the max of each head's logit less its log-sum-exp lse [G] (with one head, its
    own logits: the engine plans per_qhead of one head as max)."""
    if reduce == "mean":
        return x.mean(0)
    if reduce == "per_qhead" and x.shape[0] > 1:
        return (x - lse[:, None]).amax(0)
    return x.amax(0)


def ref_bound_reduce(ub, reduce):
    """The same over upper bounds ub [G, m] (blocks, prefilter chunks): per_qhead shifts each head
    by its own largest bound."""
    if reduce == "per_qhead" and ub.shape[0] > 1:
        return (ub - ub.amax(1, keepdim=True)).amax(0)
    return ub.mean(0) if reduce == "mean" else ub.amax(0)


def ref_topk(v, k):
    """Indices of the k largest of v, ties taken in index order as the engine takes them (per_qhead's
    shifted bounds tie at 0 for each head's best block or chunk)."""
    return torch.sort(-v, stable=True).indices[:k]


def ref_mass_keep(sel, r, P, tau):
    """MASS: of the top tokens sel (their ranking values r[sel]), the smallest prefix by descending r
    holding tau of every head's mass; P [G, len(sel)] each head's probability of each of sel. All of
    sel when a head never reaches tau."""
    order = torch.argsort(r[sel], descending=True, stable=True)
    ok = (torch.cumsum(P[:, order], 1) >= tau).all(0)
    keep = int(ok.nonzero()[0]) + 1 if bool(ok.any()) else len(sel)
    return sel[order[:keep]]


def ref_candidates(store, layer, pages, h, qs, n, k, prefilter, reduce):
    """Tokens the prefilter keeps: those of the summary chunks with the best key upper bound."""
    S, D = store.summary_tokens, qs.shape[-1]
    nc = -(-n // S)
    want = math.ceil(prefilter * min(k, n) / S)  # a budget past n covers every chunk either way
    if prefilter == 0 or want >= nc:
        return torch.arange(n)
    summ = store.summary[layer, h, pages.long()].double().reshape(-1, 2, D)[:nc]  # [nc, 2, D]
    ub = torch.maximum(qs[:, None] * summ[None, :, 0], qs[:, None] * summ[None, :, 1]).sum(-1)  # [m, nc]
    ub = ref_bound_reduce(ub, reduce)
    chosen = torch.sort(ref_topk(ub, want)).values
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
                  prefilter=0.0, residual=False, sel_logits=None):
    """Float64 attention of the engine's selection rule: one selection per (request, kv-head),
    shared by its query heads. A head's log-sum-exp (per_qhead's shift, MASS's normalizer) is
    over every host token of sel_logits [B, Hq, n_max] when given (the engine's selection-stage
    logits, `Engine.score`), else of the exact logits; with the prefilter, of the candidates'
    exact logits."""
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
            k = n if mode == "all" else int(budget[b, h])
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
                    ub.append(torch.maximum(qg * mn, qg * mx).sum(-1) * sm)
                ub = ref_bound_reduce(torch.stack(ub, 1), reduce)
                chosen = ref_topk(ub, min(nb, -(-k // bt)))
                sel = torch.cat([torch.arange(c * bt, min((c + 1) * bt, n)) for c in chosen.tolist()])
            else:
                cand = ref_candidates(store, layer, pages, h, qg, n, k, prefilter, reduce)
                if prefilter > 0:
                    ls = torch.logsumexp(logit[:, cand], 1)
                elif sel_logits is not None:
                    ls = torch.logsumexp(sel_logits[b, h * G:(h + 1) * G, :n].double(), 1)
                else:
                    ls = torch.logsumexp(logit, 1)
                r = ref_reduce(logit, ls, reduce)
                pick = ref_topk(r[cand], min(k, len(cand)))
                sel = cand[pick]
                if mode == "mass":
                    sel = ref_mass_keep(sel, r, torch.exp(logit[:, sel] - ls[:, None]), tau)
            sel = torch.sort(sel).values
            rx, rv = ref_residual(K[h], V[h], qg, sel, n, store.summary_tokens, sm, cap) \
                if residual else (torch.zeros(G, 0, dtype=torch.float64), V[h, :0])
            for g in range(G):
                x = torch.cat([logit[g, sel], rx[g]])
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
        scores = eng.score(layer, q)  # the selection-stage logits the run ranked by
    ref = ref_attention(store, layer, table, offs, ntok, q, mode=mode, reduce=reduce, budget=budget,
                        blocks=blocks, tau=tau, sm=sm, cap=cap, prefilter=prefilter, residual=residual,
                        sel_logits=scores)
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
