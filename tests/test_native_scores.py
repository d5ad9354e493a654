"""Selection-stage scores (Engine.score): within the stated bound of the exact logits on
every ISA, int4 keys of every group size, and AMX equal to VNNI bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import kvtier._native as N
from native_cases import _restore_isa  # noqa: F401  (autouse)
from native_cases import ISAS, ref_keys, flat, make_case, even_divisors


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
