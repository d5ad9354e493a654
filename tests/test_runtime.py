"""The tier runtime on CPU: store, tier manager, hybrid plan/run, policies."""

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.policies import REGISTRY, PolicyUnavailableError, policy_for
from kvtier.runtime import dense_attention
from kvtier.runtime.standalone import StandaloneTier
from kvtier.runtime.tier import slot_tensor
from kvtier.store import CapacityError, HostStore

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
WINDOW = {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16}


def _config(policy="hgca", budget=None, **extra):
    data = {"policy": policy, "window": WINDOW, "max_context_tokens": 4096, **extra}
    if budget is not None:
        data["budget"] = budget
    if policy == "quest":
        data.setdefault("host_store", {"key_format": "bf16"})
    if policy == "fluxion":  # its head classes' blocks (up to 64 tokens) must divide the page
        data["window"] = {**WINDOW, "page_tokens": 64}
    return from_mapping(data)


def _decode(tier, gen, prompt_lens, steps):
    """Prefill, then decode `steps` tokens per request; returns the full K, V per request per layer."""
    full = {}
    rids = list(range(len(prompt_lens)))
    for r, n in zip(rids, prompt_lens):
        tier.tier.add(r)
        plan = tier.tier.prefill(r, n)
        full[r] = []
        for layer in range(SHAPE.n_layers):
            k = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
            v = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
            tier.tier.write_prefill_layer(plan, layer, k, v)
            full[r].append([k, v])
    _steps(tier, gen, rids, full, steps)
    return rids, full


def _steps(tier, gen, rids, full, steps):
    """Decode `steps` random tokens per request, evicting after each; extends `full`."""
    for _ in range(steps):
        for r in rids:
            slot = tier.tier.extend(r, 1)
            for layer in range(SHAPE.n_layers):
                k = torch.randn(1, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
                v = torch.randn(1, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
                tier.pool.k[layer, slot] = k
                tier.pool.v[layer, slot] = v
                full[r][layer] = [torch.cat([full[r][layer][0], k]), torch.cat([full[r][layer][1], v])]
        tier.tier.evict()


def _check_against_dense(tier, gen, rids, full, tol):
    tier.attn.plan(rids)
    for layer in range(SHAPE.n_layers):
        q = torch.randn(len(rids), SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        got = tier.attn.run(q, layer)
        ks = torch.cat([full[r][layer][0] for r in rids])
        vs = torch.cat([full[r][layer][1] for r in rids])
        lens = torch.tensor([full[r][layer][0].shape[0] for r in rids])
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        ref = dense_attention(q.double(), ks.double(), vs.double(), indptr, sm_scale=SHAPE.head_dim ** -0.5)
        rel = float((got.double() - ref.out).norm() / ref.out.norm())
        assert rel < tol, (layer, rel)


@pytest.mark.parametrize("key_format, tol, lockstep", [("bf16", 5e-3, False), ("int8", 2e-2, False),
                                                       ("int8", 2e-2, True)])
def test_hgca_with_everything_equals_dense_across_evictions(gen, key_format, tol, lockstep):
    cfg = _config(budget={"kind": "all"}, host_store={"key_format": key_format})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    tier.tier.lockstep = lockstep  # as under TP; on the CPU copies are synchronous either way
    try:
        # one request short of the window, one that evicts during decode, one long
        rids, full = _decode(tier, gen, [30, 70, 900], steps=20)
        stats = tier.tier.stats()
        assert stats.pages_evicted > 0 and stats.host_tokens > 0
        # every token lives in exactly one tier
        total = sum(full[r][0][0].shape[0] for r in rids)
        assert stats.device_tokens + stats.host_tokens == total
        # the window never exceeds its bound after eviction
        for r in rids:
            assert len(tier.tier.requests[r].recent_slots) <= WINDOW["window_tokens"] + WINDOW["page_tokens"]
        _check_against_dense(tier, gen, rids, full, tol)
    finally:
        tier.close()


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if cls.exact_with_all_budget))
def test_every_registered_policy_with_everything_equals_dense(gen, name):
    """Conformance: a policy that breaks the hybrid contract fails here first."""
    extra = {"host_store": {"key_format": "bf16"}}
    cfg = _config(name, budget={"kind": "all"}, **extra)
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=4096, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [200, 513], steps=3)
        assert (tier.tier.stats().host_tokens > 0) == policy_for(cfg).offloads
        _check_against_dense(tier, gen, rids, full, 5e-3)
    finally:
        tier.close()


def test_sparse_budget_is_close_but_not_exact(gen):
    cfg = _config(budget={"kind": "tokens", "tokens": 32})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [1500], steps=1)
        with pytest.raises(AssertionError):  # random keys: a 32-token budget must show an error
            _check_against_dense(tier, gen, rids, full, 1e-3)
    finally:
        tier.close()


def _hgca_outputs(seed, before_run=None, **hgca):
    """Hybrid output of every layer for one long request, the same inputs for every call."""
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(budget={"kind": "tokens", "tokens": 64}, hgca=hgca)
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    if before_run is not None:
        before_run(tier)
    try:
        rids, _ = _decode(tier, gen, [1500], steps=1)
        tier.attn.plan(rids)
        return [tier.attn.run(torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen), layer)
                for layer in range(SHAPE.n_layers)]
    finally:
        tier.close()


def test_hgca_prefilter_reaches_the_engine():
    """The policy's prefilter changes the selection when it cuts, and nothing when it covers every chunk."""
    full = _hgca_outputs(5)
    cut = _hgca_outputs(5, prefilter=1)
    wide = _hgca_outputs(5, prefilter=1000)
    for f, c, w in zip(full, cut, wide):
        torch.testing.assert_close(w, f, atol=1e-6, rtol=1e-5)  # the split path sums in another order
        assert not torch.allclose(c, f, atol=1e-4)


def test_hgca_overlap_off_runs_the_engine_after_the_window_with_the_same_result():
    """overlap: false never hands the engine to the helper thread, and changes no output."""
    def refuse_thread(tier):
        assert tier.attn.overlap is False

        def submit(*args, **kwargs):
            raise AssertionError("overlap: false handed the engine to a thread")
        tier.attn.host._pool.submit = submit

    def count_thread(tier):
        assert tier.attn.overlap is True
        real = tier.attn.host._pool.submit

        def submit(*args, **kwargs):
            handed.append(1)
            return real(*args, **kwargs)
        tier.attn.host._pool.submit = submit

    handed = []
    serial = _hgca_outputs(7, before_run=refuse_thread, overlap=False)
    overlapped = _hgca_outputs(7, before_run=count_thread)
    assert len(handed) == SHAPE.n_layers  # the default overlaps: one hand-off per layer
    for s, o in zip(serial, overlapped):
        torch.testing.assert_close(s, o, atol=0, rtol=0)
        assert s.abs().sum() > 0


def _rel_errors(gen, cfg, prompt=1500):
    """Per layer, the hybrid output's relative error against float64 dense attention."""
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [prompt], steps=1)
        tier.attn.plan(rids)
        errs = []
        for layer in range(SHAPE.n_layers):
            q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
            got = tier.attn.run(q, layer)
            k, v = full[0][layer]
            indptr = torch.tensor([0, k.shape[0]])
            ref = dense_attention(q.double(), k.double(), v.double(), indptr, sm_scale=SHAPE.head_dim ** -0.5)
            errs.append(float((got.double() - ref.out).norm() / ref.out.norm()))
        return errs
    finally:
        tier.close()


def test_hgca_residual_reaches_the_engine_and_moves_toward_dense():
    """The residual stands in for the host tokens left out: on the same inputs the hybrid output is
    closer to dense attention on every layer, and with the whole host selected it changes nothing."""
    sparse = {"kind": "tokens", "tokens": 64}
    plain = _rel_errors(torch.Generator().manual_seed(9), _config(budget=sparse))
    resid = _rel_errors(torch.Generator().manual_seed(9), _config(budget=sparse, hgca={"residual": True}))
    assert all(r < 0.8 * p for r, p in zip(resid, plain)), (resid, plain)
    every = {"kind": "tokens", "tokens": 4096}
    whole = _rel_errors(torch.Generator().manual_seed(9), _config(budget=every, hgca={"residual": True}))
    assert max(whole) < 2e-2, whole


def test_release_frees_device_slots_and_host_pages(gen):
    cfg = _config()
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    try:
        free_slots, free_pages = tier.pool.free_slots, tier.store.stats().free_pages
        rids, _ = _decode(tier, gen, [700], steps=2)
        assert tier.pool.free_slots < free_slots and tier.store.stats().free_pages < free_pages
        tier.tier.release(rids[0])
        assert tier.pool.free_slots == free_slots and tier.store.stats().free_pages == free_pages
    finally:
        tier.close()


def test_capacity_reject_names_need_and_free_and_changes_nothing():
    store = HostStore(_config(), SHAPE, n_pages=4)
    try:
        store.admit("a", first_pos=4)
        store.allocate("a", 3)
        store.admit("b", first_pos=4)
        before = (list(store.table("a").pages), store.stats())
        with pytest.raises(CapacityError, match=r"needs 2 pages .* 1 pages .* are free"):
            store.allocate("b", 2)
        assert (list(store.table("a").pages), store.stats()) == before
        assert store.table("b").pages == []
    finally:
        store.close()


def test_capacity_evict_drops_oldest_pages_of_the_largest_request():
    store = HostStore(_config(host_store={"on_full": "evict"}), SHAPE, n_pages=4)
    try:
        store.admit("a", first_pos=4)
        a_pages = store.allocate("a", 3)
        store.admit("b", first_pos=4)
        store.allocate("b", 2)
        table = store.table("a")
        assert table.pages == a_pages[1:] and table.first_pos == 4 + 16 and table.dropped_tokens == 16
        assert store.stats().free_pages == 0
    finally:
        store.close()


@pytest.mark.parametrize("key_format, tol", [("bf16", 5e-3), ("int8", 2e-2)])
def test_fork_attends_the_shared_host_part_in_place_and_each_continuation_equals_dense(gen, key_format, tol):
    cfg = _config(budget={"kind": "all"}, host_store={"key_format": key_format})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [600], steps=5)
        src, dst = rids[0], "fork"
        used, shared = tier.store.stats().used_pages, list(tier.store.table(src).pages)
        assert tier.tier.host_tokens(src) > 500
        slots = tier.tier.fork(src, dst)
        full[dst] = [[k.clone(), v.clone()] for k, v in full[src]]
        assert tier.store.stats().used_pages == used  # the host part is stored once
        assert tier.store.table(dst).pages == shared and tier.tier.host_tokens(dst) == tier.tier.host_tokens(src)
        assert not set(slots.tolist()) & set(tier.tier.device_slots(src).tolist())  # its own device slots
        _steps(tier, gen, [src, dst], full, 40)  # the two continue apart, each evicting its own pages
        assert set(tier.store.table(dst).pages[len(shared):]).isdisjoint(tier.store.table(src).pages)
        _check_against_dense(tier, gen, [src, dst], full, tol)
        tier.tier.release(src)  # the first to finish leaves the shared pages to the other
        assert set(shared) <= set(tier.store.table(dst).pages) and not set(shared) & set(tier.store._free)
        _check_against_dense(tier, gen, [dst], full, tol)
        tier.tier.release(dst)
        stats = tier.store.stats()
        assert stats.free_pages == stats.total_pages and sorted(tier.store._free) == list(range(stats.total_pages))
    finally:
        tier.close()


def test_fork_checks_its_request_and_length(gen):
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    try:
        rids, _ = _decode(tier, gen, [300], steps=1)
        st = tier.tier.requests[rids[0]]
        with pytest.raises(ValueError, match=f"takes {st.host_end} to {st.length} of them, got 10"):
            tier.tier.fork(rids[0], "x", 10)
        with pytest.raises(ValueError, match="not tracked"):
            tier.tier.fork("nobody", "x")
        with pytest.raises(ValueError, match="already tracked"):
            tier.tier.fork(rids[0], rids[0])
        assert "x" not in tier.tier.requests and "x" not in tier.store
        tier.tier.fork(rids[0], "x", st.host_end)  # just the host part and the sinks
        assert tier.tier.requests["x"].length == st.host_end and not tier.tier.requests["x"].recent_slots
    finally:
        tier.close()


def test_capacity_evict_frees_a_shared_page_only_when_no_table_holds_it():
    store = HostStore(_config(host_store={"on_full": "evict"}), SHAPE, n_pages=4)
    try:
        store.admit("a", first_pos=4)
        a_pages = store.allocate("a", 2)
        assert store.share("a", "b", 2) == a_pages
        b_own = store.allocate("b", 2)
        assert store.stats().free_pages == 0
        store.admit("c", first_pos=4)
        assert store.allocate("c", 1) == b_own[:1]  # b, the largest, dropped its two shared pages and one of its own
        assert store.table("a").pages == a_pages
        assert store.table("b").pages == b_own[1:] and store.table("b").first_pos == 4 + 3 * 16
        with pytest.raises(CapacityError):
            store.allocate("c", 5)  # only 4 distinct pages exist
        assert store.table("a").pages == a_pages and store.table("c").pages == b_own[:1]
        assert store.release("b") == 1 and store.release("a") == 2
        with pytest.raises(ValueError, match="has 1 host pages, asked for 2"):
            store.share("c", "d", 2)
    finally:
        store.close()


def test_pins_keep_pages_past_their_tables_and_reclaim_comes_before_on_full():
    store = HostStore(_config(host_store={"on_full": "evict"}), SHAPE, n_pages=3)
    try:
        store.admit("a", first_pos=4)
        pages = store.allocate("a", 3)
        store.cache_hold(pages[:2] + pages[:1])  # a cache holding tokens of two pages (one page twice)
        assert store.release("a") == 1 and store.cache_holds == 3  # the held pages outlive their table
        brute = lambda: sum(1 for p in range(store.n_pages) if 0 < store._holds[p] == store._refs[p])  # noqa: E731
        assert store.cache_only_pages() == brute() == 2
        store.adopt("b", first_pos=4, pages=pages[:2])  # a prefix hit starts on them
        assert store.cache_only_pages() == brute() == 0  # b holds them too now
        with pytest.raises(ValueError, match="not a stored page"):
            store.adopt("c", first_pos=4, pages=[pages[2]])  # freed with a: not stored any more
        assert "c" not in store
        with pytest.raises(ValueError, match="not a stored page"):
            store.cache_hold([99])
        store.admit("c", first_pos=4)
        store.allocate("c", 1)
        asked = []
        store.reclaim = lambda n: asked.append(n) or 0  # a cache with nothing to give
        # On_full evict may drop c's page, but b's are held by the cache as well: a request of 2 cannot be met.
        with pytest.raises(CapacityError):
            store.allocate("c", 2)
        assert asked == [2] and store.table("b").pages == pages[:2] and len(store.table("c").pages) == 1
        store.reclaim = lambda n: asked.append(n) or store.cache_release(pages[:2] + pages[:1])
        assert len(store.allocate("c", 2)) == 2  # the cache let go; on_full then dropped b's oldest pages
        assert asked == [2, 2] and store.cache_holds == 0 and store.cache_only_pages() == brute() == 0
        with pytest.raises(ValueError, match="holds of page .* given back, 0 held"):
            store.cache_release(pages[:2])
    finally:
        store.close()


def test_adopt_attends_cached_host_pages_in_place_and_keeps_the_servers_slots(gen):
    """A request started on another's host pages by address (a prefix cache hit) equals dense, and
    the device tail it took over is copied to the host, never freed, when it leaves the window."""
    cfg = _config(budget={"kind": "all"}, host_store={"key_format": "bf16"})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [600], steps=3)
        src, st = rids[0], tier.tier.requests[rids[0]]
        n_host = tier.tier.host_tokens(src)
        addresses = tier.tier.host_addresses(src, 4, 4 + n_host)
        T = WINDOW["page_tokens"]
        assert torch.equal(addresses % T, torch.arange(n_host) % T)
        pages = (addresses[::T] // T).tolist()
        assert pages == tier.store.table(src).pages[:len(pages)]
        # The new request's device slots, which a server's cache would own: copies of the source's
        # sinks and first 40 recent tokens.
        src_dev = torch.cat([slot_tensor(st.sink_slots), slot_tensor(st.recent_slots)[:40]])
        dev = tier.tier.alloc_slots(44)
        for layer in range(SHAPE.n_layers):
            tier.pool.k[layer, dev] = tier.pool.k[layer, src_dev]
            tier.pool.v[layer, dev] = tier.pool.v[layer, src_dev]
        sinks, tail = dev[:4], dev[4:]
        tier.tier.adopt("b", sink_slots=sinks, host_pages=pages, recent_slots=tail, owned_until=4 + n_host + 40)
        b = tier.tier.requests["b"]
        assert b.length == 4 + n_host + 40 and tier.tier.host_tokens("b") == n_host
        full["b"] = [[k[:b.length].clone(), v[:b.length].clone()] for k, v in full[src]]
        tier.tier.release(src)  # the source finishes; b holds the pages
        _check_against_dense(tier, gen, ["b"], full, 5e-3)
        freed = []
        tier.tier.free_slots, keep = freed.append, tier.tier.free_slots
        _steps(tier, gen, ["b"], full, 80)  # b's window moves past the tail it took over
        assert b.host_end > 4 + n_host + 40
        gone = torch.cat(freed).tolist() if freed else []
        assert not set(gone) & set(tail.tolist()), "the tier freed a slot the server's cache owns"
        assert len(gone) == b.host_end - (4 + n_host + 40)
        assert tier.tier.freed_positions("b") == (4 + n_host + 40, b.host_end)
        tier.tier.free_slots = keep
        _check_against_dense(tier, gen, ["b"], full, 5e-3)
        with pytest.raises(ValueError, match="sink tokens"):
            tier.tier.adopt("c", sink_slots=sinks[:2], host_pages=pages[:1], recent_slots=tail[:0], owned_until=0)
        assert "c" not in tier.tier.requests and "c" not in tier.store
    finally:
        tier.close()


def test_policy_without_runtime_is_refused_clearly(monkeypatch):
    monkeypatch.delitem(REGISTRY, "fluxion")  # as a version without its runtime
    with pytest.raises(PolicyUnavailableError, match="fluxion.*available: .*hgca"):
        policy_for(from_mapping({"policy": "fluxion"}))


def test_run_checks_q_shape(gen):
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=512, host_tokens=512)
    try:
        rids, _ = _decode(tier, gen, [100], steps=0)
        tier.attn.plan(rids)
        with pytest.raises(ValueError, match="q must be"):
            tier.attn.run(torch.randn(1, 4, 64), 0)
    finally:
        tier.close()


def test_window_only_offloads_but_never_attends_the_host(gen):
    cfg = _config("window_only")
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=512, host_tokens=2048)
    try:
        rids, full = _decode(tier, gen, [700], steps=2)
        assert tier.tier.stats().host_tokens > 0
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        detail = tier.attn.run_detail(q, 0)
        assert detail.host is None and detail.selection is None
        assert torch.allclose(tier.attn.run(q, 0), detail.out)
        dev = tier.tier.device_slots(0)
        assert len(dev) < 702  # evicted tokens are not attended
    finally:
        tier.close()


def test_host_readers_finish_before_the_host_store_changes(gen):
    """Every change to the host store (prefill, eviction, settling, release) first calls the
    registered readers; the pipelined engine registers its stop there."""
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=4096)
    calls = []

    def reader():
        # when called, the store still holds exactly what it held before the change
        calls.append(tier.store.stats().used_pages)

    try:
        tier.tier.host_readers.append(reader)
        rids, _ = _decode(tier, gen, [700], steps=20)
        assert calls, "no host reader was called"
        before = tier.store.stats().used_pages
        n = len(calls)
        tier.tier.release(rids[0])
        assert len(calls) > n and calls[-1] == before
    finally:
        tier.close()


def test_pipeline_setting_reads_its_variable(monkeypatch):
    from kvtier.runtime.pipeline import pipeline_setting

    monkeypatch.delenv("KVTIER_PIPELINE", raising=False)
    assert pipeline_setting() and not pipeline_setting(False)
    monkeypatch.setenv("KVTIER_PIPELINE", "on")
    assert pipeline_setting(False)
    monkeypatch.setenv("KVTIER_PIPELINE", "Off")
    assert not pipeline_setting()
    monkeypatch.setenv("KVTIER_PIPELINE", "sometimes")
    with pytest.raises(ValueError, match="KVTIER_PIPELINE: expected on or off, got 'sometimes'"):
        pipeline_setting()
    with pytest.raises(ValueError, match="KVTIER_PIPELINE"):
        StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=64, host_tokens=64)


def test_the_pipeline_stays_off_without_cuda(gen):
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    try:
        assert not tier.attn.pipelined and not tier.tier.host_readers
        rids, full = _decode(tier, gen, [300], steps=2)
        _check_against_dense(tier, gen, rids, full, 2e-2)  # the budget covers these 300 tokens
    finally:
        tier.close()


def _causal_reference(q, k, v, pos0):
    """float64 causal attention: query i (position pos0 + i) over keys 0..pos0 + i."""
    L, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.double().view(L, hkv, hq // hkv, d)
    s = torch.einsum("lhgd,nhd->lhgn", qg, k.double()) * d ** -0.5
    seen = torch.arange(k.shape[0])[None, :] <= (pos0 + torch.arange(L))[:, None]
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    return torch.einsum("lhgn,nhd->lhgd", torch.softmax(s, -1), v.double()).reshape(L, hq, d)


@pytest.mark.parametrize("key_format, tol, host_block", [("bf16", 5e-3, None), ("int8", 2e-2, None),
                                                        ("int8", 2e-2, 40)])
def test_chunked_prefill_equals_dense_and_keeps_only_the_window_on_the_device(gen, monkeypatch, key_format, tol,
                                                                            host_block):
    """A 1000-token prompt in chunks of 96: each chunk attends the host part exactly and the
    device window causally, equal to dense causal attention; between chunks pages leave for
    the host, so the device holds at most sinks + window + a page + one chunk. host_block: the
    host part read a few pages at a time (40 tokens: 2 pages of 16, the last block partial)."""
    if host_block:
        monkeypatch.setattr("kvtier.runtime.hybrid.extend.HOST_TOKENS_AT_ONCE", host_block)
    cfg = _config(host_store={"key_format": key_format})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    n, chunk = 1000, 96
    hkv, hq, d = SHAPE.kv_heads, SHAPE.num_q_heads, SHAPE.head_dim
    K = [torch.randn(n, hkv, d, generator=gen) for _ in range(SHAPE.n_layers)]
    V = [torch.randn(n, hkv, d, generator=gen) for _ in range(SHAPE.n_layers)]
    Q = [torch.randn(n, hq, d, generator=gen) for _ in range(SHAPE.n_layers)]
    bound = WINDOW["sink_tokens"] + WINDOW["window_tokens"] + WINDOW["page_tokens"] + chunk
    try:
        tier.tier.add(0)
        host_seen = 0
        for p0 in range(0, n, chunk):
            m = min(chunk, n - p0)
            slots = tier.tier.extend(0, m)
            tier.attn.plan_extend([0], [m])
            assert tier.tier.stats().device_tokens <= bound
            for layer in range(SHAPE.n_layers):
                tier.pool.k[layer, slots] = K[layer][p0: p0 + m]
                tier.pool.v[layer, slots] = V[layer][p0: p0 + m]
                got = tier.attn.run_extend(Q[layer][p0: p0 + m], layer)
                ref = _causal_reference(Q[layer][p0: p0 + m], K[layer][: p0 + m], V[layer][: p0 + m], p0)
                rel = float((got.double() - ref).norm() / ref.norm())
                assert rel < tol, (p0, layer, rel)
            tier.tier.evict()
            host_seen = max(host_seen, tier.tier.stats().host_tokens)
        assert host_seen >= n - bound  # most of the prompt went to the host on the way
    finally:
        tier.close()


def test_chunked_prefill_checks_its_inputs(gen):
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    try:
        with pytest.raises(RuntimeError, match="run_extend before plan_extend"):
            tier.attn.run_extend(torch.zeros(1, SHAPE.num_q_heads, SHAPE.head_dim), 0)
        tier.tier.add(0)
        tier.tier.extend(0, 10)
        with pytest.raises(ValueError, match=r"expected a chunk of 1 to 10 tokens"):
            tier.attn.plan_extend([0], [11])
        with pytest.raises(ValueError, match="one chunk length per request"):
            tier.attn.plan_extend([0], [5, 5])
        tier.attn.plan_extend([0], [10])
        with pytest.raises(ValueError, match=r"q must be \[chunk tokens, num_q_heads, head_dim\]"):
            tier.attn.run_extend(torch.zeros(9, SHAPE.num_q_heads, SHAPE.head_dim), 0)
    finally:
        tier.close()


@pytest.mark.parametrize("key_format,value_format", [("int8", "bf16"), ("int4", "int8"), ("bf16", "bf16")])
def test_extend_host_blocks_move_stored_bytes_and_equal_the_c_dequant(gen, key_format, value_format):
    """run_extend's host part: the stored bytes moved and dequantized in torch (the fast path)
    against the C store's float32 dequant (the reference), a partial last page included."""
    import kvtier._native as N
    from kvtier.runtime.hybrid import host_block

    view = N.HostStoreView.allocate(n_layers=2, n_pages=6, kv_heads=2, page_tokens=16, head_dim=64,
                                    key_format=key_format, value_format=value_format, key_group=32)
    pages = torch.tensor([5, 1, 3], dtype=torch.int32)
    view.append(1, pages, torch.randn(3, 2, 16, 64, generator=gen), torch.randn(3, 2, 16, 64, generator=gen))
    k, v, moved = host_block(view, 1, pages, 40, torch.device("cpu"))
    k_ref, v_ref, moved_ref = host_block(view, 1, pages, 40, torch.device("cpu"), raw=False)
    assert k.shape == (40, 2, 64) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.count_nonzero(k_ref) > 0
    assert moved < moved_ref  # quantized bytes, not float32


def test_chunked_prefill_falls_back_to_torch_when_flashinfer_fails(gen, monkeypatch, caplog):
    """A FlashInfer prefill kernel that cannot build or run ends in a warning and the float32
    torch path, with the same result, never in a failed prefill."""
    import kvtier.runtime.hybrid.extend as hybrid

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this head_dim\nsecond line")

    monkeypatch.setattr(hybrid, "flash_attention", broken)
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=1024, host_tokens=2048)
    try:
        tier.tier.add(0)
        n = 200
        K = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
        V = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
        Q = torch.randn(n, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        slots = tier.tier.extend(0, n)
        tier.attn.plan_extend([0], [n])
        tier.attn.extend_flash = True  # as on CUDA with FlashInfer installed
        for layer in range(SHAPE.n_layers):
            tier.pool.k[layer, slots], tier.pool.v[layer, slots] = K, V
        with caplog.at_level("WARNING", logger="kvtier"):
            got = tier.attn.run_extend(Q, 0)
        ref = _causal_reference(Q, K, V, 0)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-5
        assert not tier.attn.extend_flash and "no kernel for this head_dim" in caplog.text
        assert "second line" not in caplog.text
    finally:
        tier.close()


def test_warm_extend_runs_the_chunk_kernel_once_each_way(monkeypatch, caplog):
    """The server prepares the chunk kernel at its first prefill: one causal and one
    non-causal call on random tokens in the model's dtype; a kernel that fails there
    turns into the torch path with a warning, as it would inside a prompt."""
    import kvtier.runtime.hybrid.extend as hybrid
    from kvtier.runtime.extend import block_attention

    calls = []

    def recording(q, k, v, *, causal_offset, sm_scale, soft_cap):
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, causal_offset, bool(q.abs().sum() > 0)))
        return block_attention(q.float(), k.float(), v.float(), causal_offset=causal_offset,
                               sm_scale=sm_scale, soft_cap=soft_cap)

    monkeypatch.setattr(hybrid, "flash_attention", recording)
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256, host_tokens=256)
    try:
        assert tier.attn.warm_extend(torch.bfloat16) == 0.0 and not calls  # nothing compiled on first use here
        tier.attn.extend_flash = True  # as on CUDA with FlashInfer installed
        assert tier.attn.warm_extend(torch.bfloat16) >= 0.0
        hq, hkv, d = SHAPE.num_q_heads, SHAPE.kv_heads, SHAPE.head_dim
        assert calls == [((2, hq, d), (5, hkv, d), torch.bfloat16, 3, True),
                         ((2, hq, d), (5, hkv, d), torch.bfloat16, None, True)]

        def broken(*args, **kwargs):
            raise RuntimeError("nvcc failed")

        monkeypatch.setattr(hybrid, "flash_attention", broken)
        with caplog.at_level("WARNING", logger="kvtier"):
            tier.attn.warm_extend(torch.bfloat16)
        assert not tier.attn.extend_flash and "nvcc failed" in caplog.text
    finally:
        tier.close()


@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("L, n, offset", [(96, 96, 0), (96, 700, 604), (40, 300, 100), (50, 333, None),
                                          (1, 17, 16)])
def test_cpu_attention_equals_the_block_reference(gen, monkeypatch, hq, hkv, d, L, n, offset):
    """Chunked prefill's CPU kernel (torch's fused attention) against block_attention, the float32
    reference, out and LSE, on fresh random inputs; the fused kernel really runs (no fallback)."""
    from kvtier.runtime import extend

    q = torch.randn(L, hq, d, generator=gen) * 2
    k = torch.randn(n, hkv, d, generator=gen) * 2
    v = torch.randn(n, hkv, d, generator=gen)
    ref = extend.block_attention(q, k, v, causal_offset=offset, sm_scale=d ** -0.5, block=128)

    def no_fallback(*a, **kw):
        raise AssertionError("cpu_attention fell back to block_attention")

    monkeypatch.setattr(extend, "block_attention", no_fallback)
    got = extend.cpu_attention(q, k, v, causal_offset=offset, sm_scale=d ** -0.5)
    torch.testing.assert_close(got.out, ref.out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.lse, ref.lse, atol=2e-5, rtol=2e-5)


def test_cpu_attention_falls_back_where_the_fused_kernel_cannot_serve(gen):
    from kvtier.runtime import extend

    q, k, v = torch.randn(8, 4, 64, generator=gen), torch.randn(20, 2, 64, generator=gen), torch.randn(20, 2, 64, generator=gen)
    for kw in (dict(causal_offset=12, soft_cap=5.0), dict(causal_offset=-3)):  # soft-cap; queries that see no key
        ref = extend.block_attention(q, k, v, sm_scale=0.125, **kw)
        got = extend.cpu_attention(q, k, v, sm_scale=0.125, **kw)
        torch.testing.assert_close(got.out, ref.out)
        torch.testing.assert_close(got.lse, ref.lse)
    empty = extend.cpu_attention(q, k[:0], v[:0], causal_offset=None, sm_scale=0.125)
    assert torch.all(empty.out == 0) and torch.all(empty.lse == float("-inf"))
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        extend.cpu_attention(q, torch.randn(20, 3, 64), torch.randn(20, 3, 64), causal_offset=None, sm_scale=0.1)
