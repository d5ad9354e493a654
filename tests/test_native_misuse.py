"""The engine's public API under misuse: each case once crashed or passed silently.

Sizes past int32, plans changed under a run, loops and stores closed under each
other, hand-built stores, ISA switches mid-run, NaN and infinities: each now
gives the documented result or a typed error naming what was wrong.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kvtier._native as N
from kvtier._native._loader import check, ffi, lib
from native_cases import assert_matches, make_case, ref_attention, run_both, _restore_isa  # noqa: F401


def plan(eng, case, *, mode="topk", budget=None, **kw):
    store, table, offs, ntok, q = case
    if budget is None:
        budget = torch.full((len(ntok), store.kv_heads), 24, dtype=torch.int32)
    eng.plan(store, table, offs, ntok, q.shape[1], mode=mode, budget_tokens=budget,
             sm_scale=1 / math.sqrt(q.shape[2]), **kw)


def run_in_thread(fn, *args):
    """fn(*args) on a thread; returns (thread, outcome list) where outcome gets the result or the error."""
    outcome = []

    def body():
        try:
            outcome.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    t = threading.Thread(target=body)
    t.start()
    return t, outcome


# ------------------------------------------------ budgets and factors past int32
@pytest.mark.parametrize("budget", [2**31 - 1, 2**31, 2**63 - 1])
@pytest.mark.parametrize("mode", ["topk", "mass", "blocks"])
def test_budgets_past_the_host_tokens_select_every_token(budget, mode):
    """quest with budget tokens 2^31 - 1 and 16-token blocks crashed in the attend task
    ((k + bt - 1) / bt overflowed); budgets above int32 were untyped errors."""
    case = make_case(lengths=(100, 37, 0), kf="bf16", seed=1)
    store, table, offs, ntok, q = case
    B, Hkv = len(ntok), store.kv_heads
    big = torch.full((B, Hkv), budget, dtype=torch.int64)
    blocks = torch.full((Hkv,), 16, dtype=torch.int32) if mode == "blocks" else None
    res, _ = run_both(*case, mode=mode, budget=big, blocks=blocks, tau=1.0)
    res_all, ref_all = run_both(*case, mode="all")
    assert_matches(res, ref_all)
    assert torch.equal(res.n_selected, res_all.n_selected)


def _tier(policy, **extra):
    from kvtier.config import from_mapping
    from kvtier.runtime.standalone import StandaloneTier
    from test_runtime import SHAPE, WINDOW

    cfg = from_mapping({"policy": policy, "window": WINDOW, "host_store": {"key_format": "bf16"},
                        "max_context_tokens": 4096, **extra})
    return StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=2048)


def test_quest_with_a_budget_of_int32_max_equals_dense(gen):
    """The runtime path of `kvtier demo` with policy quest, budget tokens 2^31 - 1, block_tokens 16."""
    from test_runtime import _check_against_dense, _decode

    tier = _tier("quest", budget={"kind": "tokens", "tokens": 2**31 - 1}, quest={"block_tokens": 16})
    try:
        rids, full = _decode(tier, gen, [300, 90], steps=2)
        assert tier.tier.stats().host_tokens > 0
        _check_against_dense(tier, gen, rids, full, 5e-3)
    finally:
        tier.close()


def test_budget_caps_beyond_int64_reach_the_engine_clamped(gen):
    """A policy's cap of 1e29 tokens (a Python int no tensor holds) runs as every host token."""
    from test_runtime import _check_against_dense, _decode

    tier = _tier("hgca")
    tier.policy.token_budgets = lambda host, ctx, kv_heads: [[10**29] * kv_heads for _ in host]
    try:
        rids, full = _decode(tier, gen, [300, 90], steps=2)
        _check_against_dense(tier, gen, rids, full, 5e-3)
    finally:
        tier.close()


def test_prefilter_factor_is_taken_in_double():
    """prefilter 1.6, budget 10, summary chunks of 8: ceil(1.6 * 10 / 8) = 2 chunks, not 3 (1.6 in
    float32 is 1.6000000238); the engine's selection equals the reference's on every seed."""
    assert math.ceil(1.6 * 10 / 8) == 2
    for seed in range(12):
        case = make_case(D=32, T=16, S=8, lengths=(200,), kf="bf16", seed=seed)
        budget = torch.full((1, case[0].kv_heads), 10, dtype=torch.int32)
        for threads in (1, 2):
            res, ref = run_both(*case, budget=budget, prefilter=1.6, threads=threads)
            assert_matches(res, ref)


def test_prefilter_of_1e300_covers_every_token():
    case = make_case(lengths=(300,), kf="int8", seed=2)
    res, ref = run_both(*case, prefilter=1e300)
    base, _ = run_both(*case)
    assert_matches(res, ref)
    assert torch.equal(res.sel_index, base.sel_index)


# ------------------------------------------------ the engine owns its plan
def test_run_with_buffers_sized_for_an_older_plan_is_refused():
    """One thread re-plans (batch 1 <-> 64) while another calls run: run sized q and out from the
    plan Python last saw while C held the new one (heap overflow in q16_row)."""
    small = make_case(lengths=(100,), seed=3)
    big = make_case(lengths=(60,) * 64, seed=4)
    with N.Engine(2) as eng:
        plan(eng, small)
        seen = eng._plan  # what a run on another thread read before the re-plan below
        plan(eng, big)
        eng._plan = seen
        with pytest.raises(N.NativeStateError, match=r"buffers are for batch 1 x 8 .* plan is for 64 x 8"):
            eng.run(1, small[4])
        for call in (lambda: eng.score(1, small[4]),
                     lambda: eng.attend_indices(small[0], 1, small[4], torch.zeros(1, 8, 2, dtype=torch.int32)),
                     lambda: eng.weighted_values(small[0], 1, torch.zeros(1, 8, 2, dtype=torch.int32),
                                                 torch.ones(1, 8, 2))):
            with pytest.raises(N.NativeStateError, match="planned again"):
                call()


def test_replanning_against_runs_on_other_threads_never_corrupts():
    """Threads running over one engine while another plans batch 1 and 64 in turn: every run
    returns its plan's result or a typed refusal."""
    small = make_case(lengths=(3000,), seed=5)
    big = make_case(lengths=(50,) * 64, seed=6)
    store = small[0]
    with N.Engine(2) as eng:
        plan(eng, small)
        want = eng.run(1, small[4]).out
        stop = time.monotonic() + 2.0
        counts = {"ok": 0, "state": 0, "plans": 0, "refused": 0}

        def runner():
            while time.monotonic() < stop:
                p = eng._plan
                q = small[4] if p["B"] == 1 else big[4]
                try:
                    out = eng.run(1, q).out
                    counts["ok"] += 1
                    if out.shape[0] == 1:
                        assert torch.equal(out, want)
                except N.NativeStateError:
                    counts["state"] += 1

        threads = [threading.Thread(target=runner) for _ in range(2)]
        for t in threads:
            t.start()
        i = 0
        while time.monotonic() < stop:
            try:
                plan(eng, small if i % 2 else big)
                counts["plans"] += 1
            except N.NativeStateError as exc:
                assert "in flight" in str(exc)
                counts["refused"] += 1
            i += 1
        for t in threads:
            t.join()
        assert counts["ok"] > 0 and counts["plans"] > 0
        assert store.handle is not None


def test_plan_close_and_set_isa_are_refused_while_a_loop_serves():
    """A serve loop holds the engine: plan, close, a second loop and an ISA switch are refused
    with NativeStateError until it returns; afterwards each works."""
    case = make_case(lengths=(300,), seed=7)
    B, Hq, D = case[4].shape
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        plan(eng, case)
        buf = N.ServeBuffers.allocate(2, B, Hq, D)
        fut = pool.submit(eng.server(buf, first_seq=1))
        # the loop is in C once it answers a job
        buf.q[0].copy_(case[4])
        buf.q_ready[0] = 1
        t0 = time.monotonic()
        while int(buf.far_ready[0]) != 1:
            assert time.monotonic() - t0 < 30
            time.sleep(1e-3)
        with pytest.raises(N.NativeStateError, match="serving"):
            eng.plan(case[0], case[1], case[2], case[3], Hq, budget_tokens=torch.full((1, 2), 8), sm_scale=0.1)
        with pytest.raises(N.NativeStateError, match="serving"):
            eng.server(buf, first_seq=9)
        with pytest.raises(N.NativeStateError, match="serving"):
            check(lib.kvt_plan(eng.handle, case[0].handle, ffi.new("kvt_plan_desc *")))
        with pytest.raises(N.NativeStateError, match="is serving"):
            eng.close()
        assert eng.handle is not None
        # a second loop through C directly (the desc of the first) is refused too
        d = ffi.new("kvt_serve_desc *")
        d.n_slots, d.first_seq, d.timeout_ms = 1, 5, 100
        for f, t in (("layer", buf.layer), ("q_ready", buf.q_ready), ("far_ready", buf.far_ready),
                     ("stop", buf.stop)):
            setattr(d, f, ffi.cast("int32_t *", t.data_ptr()))
        d.q, d.far = ffi.cast("float *", buf.q.data_ptr()), ffi.cast("float *", buf.far.data_ptr())
        d.q_stride, d.far_stride = B * Hq * D, B * Hq * (D + 1)
        d.done, d.engine_seconds = ffi.cast("int64_t *", buf.done.data_ptr()), ffi.cast("double *",
                                                                                     buf.engine_seconds.data_ptr())
        with pytest.raises(N.NativeStateError, match="already serving"):
            check(lib.kvt_serve(eng.handle, d))
        other = [n for n in N.ISA_NAMES if n != N.active_isa() and N.isa_supported(n)]
        if other:
            with pytest.raises(N.NativeStateError, match="in flight"):
                N.set_isa(other[0])
        buf.stop[0] = 2
        fut.result(timeout=30)
        if other:
            N.set_isa(other[0])
        plan(eng, case)
    assert eng.handle is None


def test_a_loop_whose_engine_was_closed_does_not_serve_the_next_engine_in_its_slot():
    """close() before the loop starts, then a new engine (often in the same handle slot): the
    old loop finds its handle closed instead of serving the new engine's plan."""
    small = make_case(lengths=(40,), seed=8)
    big = make_case(lengths=(40,) * 32, seed=9)
    eng = N.Engine(1)
    plan(eng, small)
    B, Hq, D = small[4].shape
    loop = eng.server(N.ServeBuffers.allocate(1, B, Hq, D), first_seq=1)
    old = eng.handle
    eng.close()
    with N.Engine(1) as other:
        plan(other, big)
        assert other.handle != old
        with pytest.raises(N.NativeHandleError, match="not open"):
            loop()
        assert torch.isfinite(other.run(1, big[4]).out).all()


def test_closing_a_store_waits_for_the_run_over_it():
    """HostStoreView.close() while a run over it is in flight: close waits for the run, whose result
    is whole; the next run is refused (use-after-free in score_range before)."""
    case = make_case(lengths=(60000,), kf="int8", layers=1, seed=10, G=8)
    store, q = case[0], case[4]
    with N.Engine(2) as eng:
        plan(eng, case)
        want = eng.run(0, q)
        started = threading.Event()

        def runs():
            started.set()
            return [eng.run(0, q) for _ in range(3)]

        t, outcome = run_in_thread(runs)
        started.wait()
        time.sleep(0.002)
        store.close()
        t.join()
        got = outcome[0]
        if isinstance(got, Exception):  # the close came between two runs
            assert isinstance(got, N.NativeStateError) and "closed" in str(got)
        else:
            assert all(torch.equal(r.out, want.out) for r in got)
        with pytest.raises(N.NativeStateError, match="closed"):
            eng.run(0, q)


def test_close_while_a_run_is_in_flight_is_refused():
    """Engine.close() on one thread while another runs: refused while the run is in C; a close that
    lands between two runs wins, and the next run finds the handle closed."""
    case = make_case(lengths=(60000,), layers=1, seed=11, G=8)
    refused, deadline = 0, time.monotonic() + 30
    while not refused and time.monotonic() < deadline:
        eng = N.Engine(2)
        plan(eng, case)
        started = threading.Event()

        def runs():
            started.set()
            for _ in range(5):
                eng.run(0, case[4])

        t, outcome = run_in_thread(runs)
        started.wait()
        while t.is_alive():
            try:
                check(lib.kvt_engine_destroy(eng.handle))
                eng.handle = None
                break
            except N.NativeStateError as exc:
                assert "in flight" in str(exc)
                refused += 1
        t.join()
        if eng.handle is None:
            assert outcome == [None] or isinstance(outcome[0], (N.NativeHandleError, N.NativeValueError)), outcome
        else:
            assert outcome == [None]
            eng.close()
    assert refused > 0


def test_set_isa_is_refused_while_a_run_is_in_flight():
    """set_isa mid-run called through a NULL kernel pointer (the q16 path chose its kernel, then
    generic had none)."""
    other = [n for n in N.ISA_NAMES if n != N.active_isa() and N.isa_supported(n)]
    if not other:
        pytest.skip("this CPU runs one ISA variant")
    case = make_case(lengths=(60000,), kf="int8", layers=1, seed=12, G=8)
    with N.Engine(2) as eng:
        plan(eng, case)
        want = eng.run(0, case[4])
        stop = time.monotonic() + 1.5
        refused = switched = 0

        def runs():
            while time.monotonic() < stop:
                out = eng.run(0, case[4]).out
                torch.testing.assert_close(out, want.out, atol=1e-5, rtol=1e-5)

        t, outcome = run_in_thread(runs)
        isas = [N.active_isa()] + other
        while time.monotonic() < stop:
            try:
                N.set_isa(isas[(switched + refused) % len(isas)])
                switched += 1
            except N.NativeStateError as exc:
                assert "in flight" in str(exc)
                refused += 1
        t.join()
        assert refused > 0 and outcome == [None]


# ------------------------------------------------ stores built by hand
def _bufs(**kw):
    args = dict(n_layers=1, n_pages=4, kv_heads=2, page_tokens=16, head_dim=32)
    args.update(kw)
    s = N.HostStoreView.allocate(**args)
    b = s.buffers
    s.close()
    return args, b


@pytest.mark.parametrize("what, change, msg", [
    ("keys", lambda b: b.keys[:, :2].clone(), r"keys: expected shape \(1, 4, 2, 16, 32\), got \(1, 2"),
    ("keys", lambda b: b.keys.view(torch.uint8), "keys: expected dtype int8, got uint8"),
    ("keys", lambda b: b.keys.transpose(3, 4).contiguous().transpose(3, 4), "keys: expected a contiguous"),
    ("values", lambda b: b.values.float(), "values: expected dtype bfloat16, got float32"),
    ("summary", lambda b: b.summary[..., :16].clone(), "summary: expected shape"),
    ("key_scales", lambda b: None, "key_scales: expected a torch.Tensor, got NoneType"),
    ("value_scales", lambda b: torch.zeros(1, 4, 2, 16), "value_scales: expected None"),
    ("chunk_sums", lambda b: torch.zeros(1, 2, 4, 1, 2, 16), "chunk_sums: expected shape"),
    ("keys", lambda b: [0] * 4096, "keys: expected a torch.Tensor, got list"),
])
def test_hand_built_stores_are_checked(what, change, msg):
    """HostStoreView(...) took any buffer; append then wrote out of bounds."""
    args, b = _bufs()
    given = dict(keys=b.keys, key_scales=b.key_scales, values=b.values, value_scales=b.value_scales,
                 summary=b.summary, chunk_sums=b.chunk_sums)
    given[what] = change(b)
    with pytest.raises(N.NativeValueError, match=msg):
        N.HostStoreView(**args, key_format="int8", value_format="bf16", key_group=32, summary_tokens=16, **given)


def test_a_hand_built_store_whose_buffer_moved_is_refused():
    args, b = _bufs()
    s = N.HostStoreView(**args, key_format="int8", value_format="bf16", key_group=32, summary_tokens=16,
                        keys=b.keys, key_scales=b.key_scales, values=b.values, value_scales=None, summary=b.summary)
    k = torch.randn(1, 2, 16, 32)
    s.append(0, torch.tensor([1]), k, k)
    b.keys.resize_(8)  # the C store still points at the old storage
    with pytest.raises(N.NativeValueError, match="keys moved or resized"):
        s.append(0, torch.tensor([1]), k, k)
    s.close()


# ------------------------------------------------ NaN and infinities
@pytest.mark.parametrize("reduce", ["max", "mean", "per_qhead"])
def test_a_non_finite_query_is_refused_naming_its_head(reduce):
    """A NaN in one query head made its whole group's host part vanish (n_selected 0, lse -inf)."""
    case = make_case(lengths=(200, 50), seed=13)
    q = case[4].clone()
    q[1, 5, 7] = math.nan
    with N.Engine(2) as eng:
        plan(eng, case, group_reduce=reduce)
        with pytest.raises(N.NativeValueError, match=r"finite query values, got nan at \[1, 5, 7\]"):
            eng.run(1, q)
        q[1, 5, 7] = math.inf
        with pytest.raises(N.NativeValueError, match=r"got inf at \[1, 5, 7\] \(request 1, query head 5\)"):
            eng.score(1, q)
        with pytest.raises(N.NativeValueError, match="finite query"):
            eng.attend_indices(case[0], 1, q, torch.zeros(2, 8, 1, dtype=torch.int32))
        with pytest.raises(N.NativeValueError, match="finite weight"):
            eng.weighted_values(case[0], 1, torch.zeros(2, 8, 1, dtype=torch.int32),
                                torch.full((2, 8, 1), math.nan))
        good = eng.run(1, case[4])  # the refusal changed nothing
        assert (good.n_selected > 0).all() and torch.isfinite(good.lse).all()


def test_a_served_job_with_a_non_finite_query_fails_alone():
    case = make_case(lengths=(200,), seed=14)
    B, Hq, D = case[4].shape
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        plan(eng, case)
        want = eng.run(0, case[4])
        buf = N.ServeBuffers.allocate(2, B, Hq, D)
        fut = pool.submit(eng.server(buf, first_seq=1))
        bad = case[4].clone()
        bad[0, 2, 0] = math.nan
        for j, q in enumerate((bad, case[4])):
            buf.q[j].copy_(q)
            buf.q_ready[j] = j + 1
            t0 = time.monotonic()
            while int(buf.far_ready[j]) != j + 1:
                assert time.monotonic() - t0 < 30
                time.sleep(1e-4)
        far = buf.far[1]
        assert torch.equal(far[: B * Hq * D].view(B, Hq, D), want.out)
        assert (buf.far[0][: B * Hq * D] == 0).all()
        buf.stop[0] = 3
        with pytest.raises(N.NativeValueError, match="finite query"):
            fut.result(timeout=30)


@pytest.mark.parametrize("kf", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad, where", [(math.nan, "k"), (math.inf, "v"), (-math.inf, "k")])
def test_non_finite_keys_and_values_are_refused_and_nothing_is_written(kf, src, bad, where):
    """int8/int4 stored NaN as 0; one infinity made a row's scale inf and the row NaN."""
    store = N.HostStoreView.allocate(n_layers=1, n_pages=4, kv_heads=2, page_tokens=16, head_dim=64,
                                     key_format=kf, value_format="int8", chunk_sums=True)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 16, 64, generator=g).to(src), torch.randn(3, 2, 16, 64, generator=g).to(src)
    store.append(0, torch.tensor([0, 1, 2]), k, v)
    before = [t.clone() for t in store.buffers if t is not None]
    (k if where == "k" else v)[2, 1, 9, 33] = bad
    with pytest.raises(N.NativeValueError, match=rf"{where} at \[2, 1, 9, 33\] \(page 3, kv head 1, token 9, "
                                                 rf"channel 33\); nothing was written"):
        store.append(0, torch.tensor([1, 0, 3]), k, v)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in store.buffers if t is not None]))
    store.close()


def test_an_append_naming_a_page_twice_is_refused():
    store = N.HostStoreView.allocate(n_layers=1, n_pages=4, kv_heads=1, page_tokens=16, head_dim=32)
    k = torch.randn(2, 1, 16, 32)
    with pytest.raises(N.NativeValueError, match="page 2 twice"):
        store.append(0, torch.tensor([2, 2]), k, k)
    store.close()


# ------------------------------------------------ the host store
def _host_store(**host_store):
    from kvtier.config import ModelShape, from_mapping
    from kvtier.store import HostStore

    shape = ModelShape(n_layers=1, num_q_heads=4, kv_heads=2, head_dim=32)
    cfg = from_mapping({"policy": "hgca", "window": {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16},
                        "host_store": host_store})
    return HostStore(cfg, shape, n_pages=4), shape


def test_a_write_to_a_page_that_left_the_writer_is_refused():
    """HostStore.write to a page released (or evicted) and since given to another request
    overwrote that request's tokens."""
    from kvtier.store import PageOwnerError, UnknownRequestError

    store, shape = _host_store(on_full="evict")
    kv = lambda n, x: torch.full((n, 2, 16, 32), float(x))  # noqa: E731
    store.admit("a", first_pos=0)
    pa = store.allocate("a", 3)
    store.write("a", 0, pa, kv(3, 1), kv(3, 1))
    store.admit("b", first_pos=0)
    pb = store.allocate("b", 3)  # evicts a's two oldest pages: b holds them now
    store.write("b", 0, pb, kv(3, 2), kv(3, 2))
    taken = [p for p in pa if p in pb]
    assert taken
    with pytest.raises(PageOwnerError, match=r"are not in the table of request 'a'"):
        store.write("a", 0, pa, kv(3, 9), kv(3, 9))
    assert (store.view.values(0, torch.tensor(pb)) == 2).all()  # b's tokens are untouched
    store.release("a")
    with pytest.raises(UnknownRequestError):
        store.write("a", 0, taken, kv(len(taken), 9), kv(len(taken), 9))
    store.write("b", 0, pb[1:], kv(2, 3), kv(2, 3))  # any of its own pages, in any order
    store.close()


def test_a_host_store_larger_than_memory_is_a_capacity_error(monkeypatch):
    """An arena past free RAM was an untyped RuntimeError from torch's allocator."""
    from kvtier.config import ModelShape, from_mapping
    from kvtier.store import CapacityError, HostMemoryError, HostStore
    from kvtier.store import host_store as hs

    shape = ModelShape(n_layers=32, num_q_heads=32, kv_heads=8, head_dim=128)
    cfg = from_mapping({"policy": "hgca", "host_store": {"capacity_gib": 65536}})  # the schema's ceiling: far past this host
    with pytest.raises(CapacityError, match=r"host store: \d+ pages of \d+ bytes \(.* GiB in all buffers\) cannot "
                                            r"be allocated: .* GiB of host memory is available"):
        HostStore(cfg, shape)
    # where the available memory is unknown, the allocator's failure becomes the same error
    monkeypatch.setattr(hs, "available_bytes", lambda: None)
    with pytest.raises(HostMemoryError, match=r"allocation failed; lower host_store.capacity_gib .*cannot allocate"):
        HostStore(cfg, shape)


def test_engine_handles_of_closed_engines_do_not_name_new_ones():
    a = N.Engine(1)
    old = a.handle
    a.close()
    with N.Engine(1) as b:
        assert b.handle != old
        with pytest.raises(N.NativeHandleError, match="not open"):
            check(lib.kvt_engine_trace(old, 1))
