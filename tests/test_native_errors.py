"""Bad input raises typed exceptions carrying the C message; it never crashes."""

from __future__ import annotations

import math

import pytest
import torch

import kvtier._native as N
from kvtier._native._loader import check, ffi, lib


@pytest.fixture
def store():
    s = N.HostStoreView.allocate(n_layers=2, n_pages=4, kv_heads=2, page_tokens=16, head_dim=32)
    s.append(0, torch.arange(4), torch.randn(4, 2, 16, 32), torch.randn(4, 2, 16, 32))
    yield s
    s.close()


@pytest.fixture
def eng():
    e = N.Engine(2)
    yield e
    e.close()


def plan(eng, store, **kw):
    args = dict(page_table=torch.tensor([0, 1, 2]), page_offsets=torch.tensor([0, 3]),
                n_tokens=torch.tensor([40]), num_q_heads=4,
                budget_tokens=torch.tensor([[8, 8]]), sm_scale=0.2)
    args.update(kw)
    eng.plan(store, **args)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(head_dim=24), N.NativeValueError, "head_dim"),
    (dict(page_tokens=20), N.NativeValueError, "summary_tokens"),
    (dict(key_format="fp8"), N.NativeValueError, "key_format"),
    (dict(kv_heads=0), N.NativeValueError, "kv_heads"),
    (dict(key_format="int4", key_group=24), N.NativeValueError, "key_group"),
])
def test_allocate_rejects(kw, exc, msg):
    args = dict(n_layers=1, n_pages=2, kv_heads=2, page_tokens=16, head_dim=32)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        N.HostStoreView.allocate(**args)


def test_c_validates_store_desc_itself():
    d = ffi.new("kvt_store_desc *")
    d.n_layers = d.n_pages = d.kv_heads = 1
    d.page_tokens, d.head_dim, d.summary_tokens = 16, 32, 16
    h = ffi.new("int32_t *")
    with pytest.raises(N.NativeValueError, match="non-NULL"):
        check(lib.kvt_store_open(d, h))
    d.summary_tokens = 5
    with pytest.raises(N.NativeValueError, match="summary_tokens dividing page_tokens 16, got 5"):
        check(lib.kvt_store_open(d, h))


def test_append_rejects(store):
    k = torch.randn(1, 2, 16, 32)
    with pytest.raises(N.NativeIndexError, match=r"page ids in \[0, 4\), got 9"):
        store.append(0, torch.tensor([9]), k, k)
    with pytest.raises(N.NativeIndexError, match="layer"):
        store.append(5, torch.tensor([0]), k, k)
    with pytest.raises(N.NativeValueError, match="shape"):
        store.append(0, torch.tensor([0]), torch.randn(1, 2, 16, 16), k)
    with pytest.raises(N.NativeValueError, match="dtype"):
        store.append(0, torch.tensor([0]), k.half(), k.half())
    with pytest.raises(N.NativeValueError, match="contiguous"):
        nc = torch.randn(1, 2, 32, 16).transpose(2, 3)
        store.append(0, torch.tensor([0]), nc, nc)
    with pytest.raises(N.NativeValueError, match="integer"):
        store.append(0, torch.tensor([0.0]), k, k)
    with pytest.raises(N.NativeValueError, match="dtype"):
        store.append(0, torch.tensor([0]), k, k.bfloat16())


def test_plan_rejects(eng, store):
    with pytest.raises(N.NativeValueError, match="budget_tokens > 0, got 0"):
        plan(eng, store, budget_tokens=torch.tensor([[0, 8]]))
    with pytest.raises(N.NativeValueError, match="budget_tokens > 0, got -3"):
        plan(eng, store, budget_tokens=torch.tensor([[4, -3]]))
    with pytest.raises(N.NativeIndexError, match="page ids"):
        plan(eng, store, page_table=torch.tensor([0, 1, 7]))
    with pytest.raises(N.NativeValueError, match="n_tokens in"):
        plan(eng, store, n_tokens=torch.tensor([49]))
    with pytest.raises(N.NativeValueError, match="non-decreasing"):
        plan(eng, store, page_offsets=torch.tensor([2, 1]))
    with pytest.raises(N.NativeValueError, match="multiple of kv_heads"):
        plan(eng, store, num_q_heads=3)
    with pytest.raises(N.NativeValueError, match="mass_threshold"):
        plan(eng, store, mode="mass", mass_threshold=1.5)
    with pytest.raises(N.NativeValueError, match="block_tokens"):
        plan(eng, store, mode="blocks", block_tokens=torch.tensor([8, 16]))
    with pytest.raises(N.NativeValueError, match="block_tokens"):
        plan(eng, store, mode="blocks")
    with pytest.raises(N.NativeValueError, match="sm_scale"):
        plan(eng, store, sm_scale=math.nan)
    with pytest.raises(N.NativeValueError, match="mode"):
        plan(eng, store, mode="random")
    with pytest.raises(N.NativeValueError, match="shape"):
        plan(eng, store, budget_tokens=torch.tensor([8, 8]))


def test_run_rejects(eng, store):
    with pytest.raises(N.NativeStateError, match="plan"):
        eng.run(0, torch.randn(1, 4, 32))
    plan(eng, store)
    with pytest.raises(N.NativeValueError, match="shape"):
        eng.run(0, torch.randn(1, 4, 64))
    with pytest.raises(N.NativeValueError, match="dtype"):
        eng.run(0, torch.randn(1, 4, 32, dtype=torch.float64))
    with pytest.raises(N.NativeValueError, match="contiguous"):
        eng.run(0, torch.randn(1, 32, 4).transpose(1, 2))
    with pytest.raises(N.NativeIndexError, match=r"layer in \[0, 2\), got 2"):
        eng.run(2, torch.randn(1, 4, 32))
    with pytest.raises(N.NativeValueError, match="shape"):
        eng.run(0, torch.randn(1, 4, 32), out=torch.empty(1, 4, 16))
    with pytest.raises(N.NativeIndexError, match="token index"):
        eng.weighted_values(store, 0, torch.full((1, 4, 2), 40, dtype=torch.int32), torch.ones(1, 4, 2))
    res = eng.run(0, torch.randn(1, 4, 32))
    assert torch.isfinite(res.out).all()


def test_closed_and_bogus_handles(eng, store):
    plan(eng, store)
    store.close()
    with pytest.raises(N.NativeStateError, match="closed"):
        eng.run(0, torch.randn(1, 4, 32))
    with pytest.raises(N.NativeValueError, match="closed"):
        store.append(0, torch.tensor([0]), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32))
    q = ffi.new("float[]", 128)
    for bad in (0, -1, 99999):
        with pytest.raises(N.NativeHandleError, match="not open"):
            check(lib.kvt_store_close(bad))
        with pytest.raises(N.NativeHandleError, match="not open"):
            check(lib.kvt_run(bad, 0, 1, 4, 32, q, q, q, ffi.NULL, ffi.NULL, 0))
    eng.close()
    with pytest.raises(N.NativeValueError, match="closed"):
        eng.run(0, torch.randn(1, 4, 32))


def test_c_checks_null_buffers(eng, store):
    plan(eng, store)
    with pytest.raises(N.NativeValueError, match="NULL"):
        check(lib.kvt_run(eng.handle, 0, 1, 4, 32, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 0))
    with pytest.raises(N.NativeValueError, match="n_max"):
        q = torch.randn(1, 4, 32)
        s = torch.empty(1, 4, 8)
        check(lib.kvt_score(eng.handle, 0, 1, 4, 32, ffi.cast("float *", q.data_ptr()),
                            ffi.cast("float *", s.data_ptr()), 8))


def test_errors_are_the_documented_bases():
    assert issubclass(N.NativeValueError, ValueError) and issubclass(N.NativeValueError, N.NativeError)
    assert issubclass(N.NativeError, RuntimeError) and issubclass(N.NativeIndexError, IndexError)
    with pytest.raises(N.NativeValueError):
        N.Engine(-1)
    with pytest.raises(N.NativeValueError, match="generic, avx2, avx512, avx512bw or amx"):
        N.set_isa("sse9")
