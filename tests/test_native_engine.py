"""The engine around the attention: kvt_weighted_values, kvt_attend_indices, the stream-read probe, the thread
pool under oversubscription, plan buffer reuse, the GIL, and phase tracing."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest
import torch

import kvtier._native as N
from native_cases import _restore_isa  # noqa: F401  (autouse)
from native_cases import ISAS, ref_keys, ref_values, flat, make_case, assert_same_as_generic, run_engine


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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kf, cap", [("int8", 0.0), ("bf16", 0.0), ("int4", 30.0), ("int8_channel", 0.0),
                                     ("int8_channel", 30.0)])
def test_attend_indices_matches_exact_attention_over_each_rows_tokens(isa, kf, cap):
    """Fresh random inputs: each (request, query head) attends exactly the tokens its row names."""
    N.set_isa(isa)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    store, table, offs, ntok, q = make_case(lengths=(90, 37, 1), kf=kf, seed=seed)
    g = torch.Generator().manual_seed(seed)
    m = 20
    idx = torch.full((3, 8, m), -1, dtype=torch.int32)
    for b in range(3):
        for qh in range(8):
            k = int(torch.randint(0, min(m, int(ntok[b])) + 1, (1,), generator=g))
            idx[b, qh, :k] = torch.randperm(int(ntok[b]), generator=g)[:k].to(torch.int32)
            if qh == 0:  # a run of consecutive tokens (pages' rows together) besides the scattered ones
                idx[b, qh, :k] = torch.arange(k, dtype=torch.int32)
            idx[b, qh] = idx[b, qh, torch.randperm(m, generator=g)]  # -1s anywhere in the row
    sm = 0.125
    with N.Engine(2) as eng:
        eng.plan(store, table, offs, ntok, 8, mode="topk", budget_tokens=torch.ones(3, 2, dtype=torch.int32),
                 sm_scale=sm, soft_cap=cap)
        out, lse = eng.attend_indices(store, 1, q, idx)
    for b in range(3):
        pages = table[offs[b]:offs[b + 1]]
        K = flat(ref_keys(store, 1, pages), int(ntok[b]))
        V = flat(ref_values(store, 1, pages), int(ntok[b]))
        for qh in range(8):
            keep = idx[b, qh][idx[b, qh] >= 0].long()
            if keep.numel() == 0:
                assert lse[b, qh] == float("-inf") and not out[b, qh].any(), (seed, b, qh)
                continue
            x = (K[qh // 4, keep] @ q[b, qh].double()) * sm
            if cap:
                x = cap * torch.tanh(x / cap)
            torch.testing.assert_close(lse[b, qh].double(), torch.logsumexp(x, 0), atol=2e-4, rtol=1e-5,
                                       msg=f"seed {seed}")
            torch.testing.assert_close(out[b, qh].double(), torch.softmax(x, 0) @ V[qh // 4, keep], atol=2e-4,
                                       rtol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kf, vf, cap", [("int8", "bf16", 0.0), ("int8_channel", "bf16", 0.0), ("int4", "int8", 30.0),
                                         ("bf16", "bf16", 0.0)])
def test_attend_kv_indices_every_head_of_a_kv_head_attends_its_set(isa, kf, vf, cap):
    """Fresh random inputs: one set per (request, kv-head), attended by each of its query heads; sets long
    enough to be split in chunks across the pool (merged by LSE), short ones, empty ones."""
    N.set_isa(isa)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    store, table, offs, ntok, q = make_case(lengths=(1500, 37, 1, 700), kf=kf, vf=vf, seed=seed)
    g = torch.Generator().manual_seed(seed)
    B, Hq = q.shape[0], q.shape[1]
    Hkv, G = store.kv_heads, Hq // store.kv_heads
    m = 1200
    idx = torch.full((B, Hkv, m), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            n = int(ntok[b])
            k = 0 if (b, h) == (3, 1) else int(torch.randint(0, min(m, n) + 1, (1,), generator=g))
            idx[b, h, :k] = torch.randperm(n, generator=g)[:k].to(torch.int32)
            idx[b, h] = idx[b, h, torch.randperm(m, generator=g)]
    sm = 0.125
    # 12 workers for 8 sets: each set of >= 512 tokens is split in 2 or 3 chunks (KVT_KV_CHUNK_MIN 256)
    with N.Engine(12) as eng:
        eng.plan(store, table, offs, ntok, Hq, mode="topk", budget_tokens=torch.ones(B, Hkv, dtype=torch.int32),
                 sm_scale=sm, soft_cap=cap)
        out, lse = eng.attend_kv_indices(store, 1, q, idx)
        # the same sets handed to every query head one by one: the same attention
        per_head, per_lse = eng.attend_indices(store, 1, q, idx.repeat_interleave(G, dim=1))
    torch.testing.assert_close(out, per_head, atol=1e-5, rtol=1e-4, msg=f"seed {seed}")
    torch.testing.assert_close(lse, per_lse, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    for b in range(B):
        pages = table[offs[b]:offs[b + 1]]
        K = flat(ref_keys(store, 1, pages), int(ntok[b]))
        V = flat(ref_values(store, 1, pages), int(ntok[b]))
        for qh in range(Hq):
            keep = idx[b, qh // G][idx[b, qh // G] >= 0].long()
            if keep.numel() == 0:
                assert lse[b, qh] == float("-inf") and not out[b, qh].any(), (seed, b, qh)
                continue
            x = (K[qh // G, keep] @ q[b, qh].double()) * sm
            if cap:
                x = cap * torch.tanh(x / cap)
            torch.testing.assert_close(lse[b, qh].double(), torch.logsumexp(x, 0), atol=2e-4, rtol=1e-5,
                                       msg=f"seed {seed}")
            torch.testing.assert_close(out[b, qh].double(), torch.softmax(x, 0) @ V[qh // G, keep], atol=2e-4,
                                       rtol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("call, rows", [("attend_indices", 8), ("attend_kv_indices", 2)])
def test_given_token_rows_are_refused_out_of_range_repeated_and_misshapen(call, rows):
    """A row per query head (attend_indices) or per kv-head (attend_kv_indices): an index past the
    request, more tokens than it has (repeats), the wrong dtype or row count, a NaN query."""
    store, table, offs, ntok, q = make_case(lengths=(10,), seed=3)
    with N.Engine(1) as eng:
        eng.plan(store, table, offs, ntok, 8, mode="topk", budget_tokens=torch.ones(1, 2, dtype=torch.int32),
                 sm_scale=0.1)
        attend = getattr(eng, call)
        bad = torch.full((1, rows, 12), -1, dtype=torch.int32)
        bad[0, 1, 0] = 10
        with pytest.raises(N.NativeIndexError, match=r"expected token index in \[-1, 10\), got 10"):
            attend(store, 0, q, bad)
        bad[0, 1] = torch.tensor([1] * 11 + [-1], dtype=torch.int32)
        with pytest.raises(N.NativeValueError, match="expected unique token indices, got 11 of its 10 tokens"):
            attend(store, 0, q, bad)
        with pytest.raises(N.NativeValueError, match="idx"):
            attend(store, 0, q, bad.long())
        with pytest.raises(N.NativeValueError, match="idx"):  # the other call's row count
            attend(store, 0, q, torch.full((1, 10 - rows, 12), -1, dtype=torch.int32))
        nan = q.clone()
        nan[0, 5, 2] = float("nan")
        with pytest.raises(N.NativeValueError, match="query"):
            attend(store, 0, nan, torch.full((1, rows, 12), -1, dtype=torch.int32))


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
