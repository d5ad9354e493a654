"""The numerical contract of the reference hybrid attention.

fp32 hybrid with selection = every host token must equal a float64 dense
reference within 1e-5 relative; sparse selections must equal dense attention
over exactly selected-union-window tokens.
"""

import itertools

import pytest
import torch

from kvtier.runtime import (
    AttnPart, dense_attention, hybrid_attention, lse_from_base2, masked_attention, merge, split_window,
)


def _inputs(gen, lengths, hq, hkv, d, dtype=torch.float32):
    indptr = torch.zeros(len(lengths) + 1, dtype=torch.long)
    indptr[1:] = torch.tensor(lengths).cumsum(0)
    total = int(indptr[-1])
    q = torch.randn(len(lengths), hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(total, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(total, hkv, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), indptr


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("d, group, page", [
    (d, g, p) for d, g, p in itertools.product((64, 128), (1, 4, 7), (16, 32))
])
def test_hybrid_with_everything_equals_dense(gen, d, group, page):
    hkv = 2
    lengths = [1, page * 3 + 5, 700 + page // 2, 1029]  # none a page multiple past the sinks
    q, k, v, indptr = _inputs(gen, lengths, hkv * group, hkv, d)
    split = split_window(torch.tensor(lengths), sink_tokens=4, window_tokens=page * 4, page_tokens=page)
    assert int(split.host_tokens.sum()) > 0 and int(split.host_tokens[0]) == 0
    scale = d ** -0.5
    ref = dense_attention(q.double(), k.double(), v.double(), indptr, sm_scale=scale)
    hyb = hybrid_attention(q, k, v, indptr, split, sm_scale=scale)
    assert hyb.out.dtype == torch.float32
    assert _rel(hyb.out, ref.out) < 1e-5
    assert _rel(hyb.lse, ref.lse) < 1e-5


def test_soft_cap_applies_to_both_sides(gen):
    lengths = [300, 517]
    q, k, v, indptr = _inputs(gen, lengths, 8, 2, 64)
    q = q * 4  # large logits so the cap matters
    split = split_window(torch.tensor(lengths), sink_tokens=2, window_tokens=64, page_tokens=16)
    ref = dense_attention(q.double(), k.double(), v.double(), indptr, sm_scale=0.125, soft_cap=5.0)
    hyb = hybrid_attention(q, k, v, indptr, split, sm_scale=0.125, soft_cap=5.0)
    uncapped = dense_attention(q.double(), k.double(), v.double(), indptr, sm_scale=0.125)
    assert _rel(hyb.out, ref.out) < 1e-5
    assert _rel(uncapped.out, ref.out) > 1e-2


def test_sparse_selection_equals_dense_over_selected_and_window(gen):
    lengths = [900, 1333, 40]
    hq, hkv, d = 12, 3, 64
    q, k, v, indptr = _inputs(gen, lengths, hq, hkv, d)
    split = split_window(torch.tensor(lengths), sink_tokens=8, window_tokens=128, page_tokens=32)
    kmax = 50
    sel = torch.full((3, hkv, kmax), -1, dtype=torch.long)
    for b in range(3):
        lo, hi = int(split.host_start[b]), int(split.host_end[b])
        for h in range(hkv):
            n = min(kmax, hi - lo)
            if n:
                count = int(torch.randint(1, n + 1, (1,), generator=gen))
                sel[b, h, :count] = lo + torch.randperm(hi - lo, generator=gen)[:count]
    hyb = hybrid_attention(q, k, v, indptr, split, sel, sm_scale=d ** -0.5)
    # Independent reference: per request and kv-head, gather the kept tokens and run plain softmax.
    for b in range(3):
        base = int(indptr[b])
        for h in range(hkv):
            keep = set(range(int(split.host_start[b]))) | set(range(int(split.host_end[b]), lengths[b]))
            keep |= {int(x) for x in sel[b, h] if x >= 0}
            idx = torch.tensor(sorted(keep)) + base
            for g in range(hq // hkv):
                qh = q[b, h * (hq // hkv) + g].double()
                s = k[idx, h].double() @ qh * d ** -0.5
                p = torch.softmax(s, 0)
                out = p @ v[idx, h].double()
                assert torch.allclose(hyb.out[b, h * (hq // hkv) + g].double(), out, rtol=1e-5, atol=1e-6)
                assert abs(float(hyb.lse[b, h * (hq // hkv) + g]) - float(torch.logsumexp(s, 0))) < 1e-4


def test_requests_with_nothing_on_host(gen):
    lengths = [10, 20]
    q, k, v, indptr = _inputs(gen, lengths, 4, 1, 64)
    split = split_window(torch.tensor(lengths), sink_tokens=4, window_tokens=64, page_tokens=16)
    hyb = hybrid_attention(q, k, v, indptr, split, sm_scale=0.125)
    assert torch.isinf(hyb.host.lse).all() and (hyb.host.lse < 0).all()
    assert (hyb.host.out == 0).all()
    ref = dense_attention(q, k, v, indptr, sm_scale=0.125)
    assert _rel(hyb.out, ref.out) < 1e-6


def test_merge_of_two_empty_parts_is_empty():
    empty = AttnPart(torch.zeros(1, 2, 4), torch.full((1, 2), float("-inf")))
    m = merge(empty, empty)
    assert (m.out == 0).all() and torch.isneginf(m.lse).all()


def test_merge_is_order_free(gen):
    a = AttnPart(torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, generator=gen))
    b = AttnPart(torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, generator=gen))
    ab, ba = merge(a, b), merge(b, a)
    assert torch.allclose(ab.out, ba.out) and torch.allclose(ab.lse, ba.lse)


def test_base2_lse_conversion():
    x = torch.tensor([0.0, 1.0, -3.5])
    assert torch.allclose(lse_from_base2(x / torch.log(torch.tensor(2.0))), x)


def test_split_window_rules():
    split = split_window(torch.tensor([0, 3, 68, 69, 1000]), sink_tokens=4, window_tokens=64, page_tokens=16)
    assert split.host_tokens.tolist() == [0, 0, 0, 16, 944]
    # the window never exceeds window_tokens once something left
    recent = split.lengths - split.host_end
    assert bool((recent[3:] <= 64).all()) and bool((recent[3:] > 64 - 16).all())


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 4)), "q must be"),
    (dict(k=torch.zeros(10, 2, 32)), "head_dim must equal"),
    (dict(q=torch.zeros(2, 3, 64)), "multiple of kv_heads"),
    (dict(kv_indptr=torch.tensor([0, 5])), "batch\\+1"),
    (dict(kv_indptr=torch.tensor([0, 7, 5])), "rise from 0"),
    (dict(q=torch.zeros(2, 4, 64, dtype=torch.int32)), "floating point"),
])
def test_bad_shapes_raise_value_error(bad, match):
    args = dict(q=torch.zeros(2, 4, 64), k=torch.zeros(10, 2, 64), v=torch.zeros(10, 2, 64),
                kv_indptr=torch.tensor([0, 5, 10]))
    args.update(bad)
    if "k" in bad:
        args["v"] = bad["k"]
    with pytest.raises(ValueError, match=match):
        dense_attention(args["q"], args["k"], args["v"], args["kv_indptr"], sm_scale=1.0)


def test_bad_selection_raises(gen):
    q, k, v, indptr = _inputs(gen, [200], 4, 2, 64)
    split = split_window(torch.tensor([200]), sink_tokens=4, window_tokens=64, page_tokens=16)
    with pytest.raises(ValueError, match="host-resident"):
        hybrid_attention(q, k, v, indptr, split, torch.tensor([[[0], [5]]]), sm_scale=0.1)
    with pytest.raises(ValueError, match="selection must be int"):
        hybrid_attention(q, k, v, indptr, split, torch.zeros(1, 3, 2, dtype=torch.long), sm_scale=0.1)
    with pytest.raises(ValueError, match="mask must be"):
        masked_attention(q, k, v, indptr, torch.ones(1, 2, 3, dtype=torch.bool), sm_scale=0.1)
