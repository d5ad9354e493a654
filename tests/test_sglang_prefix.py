"""Prefix caching over host-resident pages: the kvtier radix cache (prefix.py) over sglang's real
pools and allocator.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier_sglang import launch, prefix  # noqa: E402
from sglang_kit import registered  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _finish, _free_slot_census, _prefill, _Requests, _stage2_backend  # noqa: E402


def test_usable_prefix_is_sinks_whole_host_pages_in_order_then_device_slots():
    S, T = 2, 4
    enc = lambda pages: prefix.encode(torch.tensor([p * T + o for p in pages for o in range(T)]))  # noqa: E731
    dev = lambda *xs: torch.tensor(xs)  # noqa: E731
    row = torch.cat([dev(5, 6), enc([7, 3]), dev(9, 10, 11)])
    assert prefix.usable_prefix(row, S, T) == row.numel()
    assert prefix.usable_prefix(row[:7], S, T) == 6  # a partial page ends the prefix before it
    assert prefix.usable_prefix(row[:1], S, T) == 1
    assert prefix.usable_prefix(torch.cat([row, enc([1])]), S, T) == row.numel()  # a second host run
    swapped = row.clone()
    swapped[[2, 3]] = swapped[[3, 2]]  # offsets out of order in the first page
    assert prefix.usable_prefix(swapped, S, T) == S
    assert prefix.usable_prefix(torch.cat([enc([1])[:1], row[1:]]), S, T) == 0  # an address among the sinks
    assert torch.equal(prefix.decode(prefix.encode(torch.arange(9))), torch.arange(9))


@pytest.fixture
def prefix_server():
    """The kvtier backend and the kvtier radix cache over sglang's real pools and allocator."""
    if not prefix.registry_present():
        pytest.skip("this sglang has no radix-cache registry; the kvtier radix cache needs the 0.5.23 line")
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    backend, layer, runner = _stage2_backend(disable_radix_cache=False, radix_cache_backend=prefix.NAME,
                                             prefill_backend=launch.PREFILL_BACKEND, size=4096)
    assert backend.stage3 and backend.prefix_cache
    tree = prefix.cache_class()(CacheInitParams(disable=False, req_to_token_pool=runner.req_to_token_pool,
                                                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                                                page_size=1))
    return backend, layer, runner, tree


def _key(tokens):
    from array import array

    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    # The token container sglang keys its tree with: an array on the 0.5.23 line, a list on 0.5.17.
    return RadixKey(array("q", tokens) if hasattr(RadixCache, "checkpoint") else list(tokens))


def _unlock(tree, lock):
    if hasattr(tree, "unlock"):
        tree.unlock(lock)
    else:
        tree.dec_lock_ref(lock)


def _pool_invariant(runner, tree):
    alloc = runner.token_to_kv_pool_allocator
    return alloc.available_size() + tree.evictable_size() + tree.protected_size() == alloc.size


def _start_on_match(reqs, tree, row, src, tokens):
    """A new request in row whose prompt is `tokens`: the tree's match written into its row as
    sglang's allocation does, its K/V history the source request's (the same tokens)."""
    match = tree.match_prefix(__import__("sglang.srt.mem_cache.base_prefix_cache",
                                         fromlist=["x"]).MatchPrefixParams(key=_key(tokens)))
    if hasattr(match, "device_indices"):  # 0.5.17
        values = match.device_indices
        tree.inc_lock_ref(match.last_device_node)
        lock = match.last_device_node
    else:
        values = tree.path_device_indices(match.last_device_node)[:match.device_prefix_len]
        lock = tree.lock(match.last_device_node)
    m = values.numel()
    reqs.runner.req_to_token_pool.req_to_token[row, :m] = values.to(torch.int32)
    reqs.k[row], reqs.v[row] = src[0][:m].clone(), src[1][:m].clone()
    return m, lock


def _first_request(prefix_server, seed, n):
    """Request A (row 0) prefilled through the tier: n random tokens."""
    torch.manual_seed(seed)
    backend, layer, runner, tree = prefix_server
    reqs = _Requests(runner, [0, 0])
    tokens = torch.randint(0, 30000, (n,)).tolist()
    _prefill(reqs, backend, layer, {0: n})
    return backend, layer, runner, tree, runner.token_to_kv_pool_allocator, reqs, tokens


def test_a_prefix_hit_on_host_pages_is_attended_in_place(prefix_server):
    backend, layer, runner, tree, alloc, reqs, tokens_a = _first_request(prefix_server, 11, 700)
    reqs.rows = [0]
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    reqs.rows = [1]  # request 0 finishes; its decode tokens extend its key
    tokens_a += torch.randint(0, 30000, (2,)).tolist()
    store = backend.session.tier.store
    src = (reqs.k[0].clone(), reqs.v[0].clone())
    _finish(tree, runner, 0, tokens_a)
    assert 0 not in backend.session.tier.requests
    # The tree keeps the whole request: the sinks and the tail in device slots, the middle as host
    # pages (pinned once per token), kept rather than freed with the request.
    assert tree.total_size() == 702 and store.cache_holds > 0
    assert store.stats().used_pages == store.cache_holds // 16
    assert tree.evictable_size() == 702 - store.cache_holds  # device tokens only
    assert _pool_invariant(runner, tree)

    # A second request shares 600 prompt tokens: the match stops at the last whole host page.
    S, T = 16, 16
    tokens_b = tokens_a[:600] + torch.randint(0, 30000, (108,)).tolist()
    m, lock = _start_on_match(reqs, tree, 1, src, tokens_b)
    assert m == S + (600 - S) // T * T == 592
    used_before = alloc.size - alloc.available_size()
    _prefill(reqs, backend, layer, {1: len(tokens_b)})  # the chunks after the match, against the dense reference
    assert backend.session.tier.host_tokens(1) >= m - S  # attended in place from the adopted pages
    stats = backend.tier_stats()
    assert stats["prefix_hit_host_tokens"] == m - S and stats["cached_host_tokens"] == store.cache_holds
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    # Its 108 new tokens needed a window of device slots, not the prefix's 592 again.
    assert alloc.size - alloc.available_size() - used_before < 108 + 64 + 2 * 16 + 2
    tokens_b += [7, 8]
    _finish(tree, runner, 1, tokens_b, prefix_len=m, lock=lock)
    assert _pool_invariant(runner, tree)

    # Evicting the whole tree gives every slot and every host page back, each once.
    tree.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["x"]).EvictParams(num_tokens=10**6))
    assert tree.total_size() == 0 and store.cache_holds == 0 and store.stats().used_pages == 0
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"


@pytest.mark.parametrize("tail_shared", [False, True])
def test_a_hit_on_a_device_tail_keeps_the_trees_slots_when_they_leave_the_window(prefix_server, tail_shared):
    """B starts on all of A (its device tail included) and moves on; when B finishes, the tree takes
    B's host copies of the tail in place of its slots (unless another request holds the tail), so a
    third request matches all of B."""
    backend, layer, runner, tree, alloc, reqs, tokens_a = _first_request(prefix_server, 12, 400)
    # A running request is not cached (the tier frees its slots as its window moves); its next
    # chunk continues from its row as under sglang's ChunkCache.
    from types import SimpleNamespace

    from sglang.srt.mem_cache.radix_cache import RadixCache

    if hasattr(RadixCache, "checkpoint"):
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        tree.checkpoint(SimpleNamespace(kv=ReqKvInfo(req_pool_idx=0), finished=lambda: False), up_to=400)
    else:
        running = SimpleNamespace(req_pool_idx=0, extend_range=SimpleNamespace(end=400))
        tree.cache_unfinished_req(running, chunked=True)
        assert torch.equal(running.prefix_indices, runner.req_to_token_pool.req_to_token[0, :400].long())
    assert tree.total_size() == 0
    reqs.rows = [1]
    src = (reqs.k[0].clone(), reqs.v[0].clone())
    _finish(tree, runner, 0, tokens_a)
    tail = 400 - 16 - backend.session.tier.store.cache_holds  # A's device tail, now the tree's
    assert tail > 0
    # The whole of A matches: sinks, host pages, then the tree's device tail.
    tokens_b = tokens_a + torch.randint(0, 30000, (200,)).tolist()
    m, lock = _start_on_match(reqs, tree, 1, src, tokens_b)
    assert m == 400
    _prefill(reqs, backend, layer, {1: 600})
    for _ in range(3):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    # The tail left B's window for the host, but its slots stayed the tree's: never freed by the tier.
    assert backend.session.tier.requests[1].host_end > 400
    lo, hi = backend.session.tier.freed_positions(1)
    assert lo == 400
    src_b = (reqs.k[1].clone(), reqs.v[1].clone())
    held = None
    if tail_shared:  # another request holds A's whole prefix, tail included
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        held = tree.match_prefix(MatchPrefixParams(key=_key(tokens_a))).last_device_node
        tree.inc_lock_ref(held)
    free_before = alloc.available_size()
    _finish(tree, runner, 1, tokens_b + [1, 2, 3], prefix_len=m, lock=lock)
    assert _pool_invariant(runner, tree)
    m2, lock2 = _start_on_match(reqs, tree, 2, src_b, tokens_b)
    if tail_shared:
        # The tail stays a device run between host runs: a later match stops at its end.
        assert m2 == 400 and backend.session.tail_tokens_demoted == 0
        tree.dec_lock_ref(held)
        _unlock(tree, lock2)
        try:  # the row itself back, its prefix being the tree's
            from sglang.srt.managers.schedule_batch import ReqKvInfo

            kv = ReqKvInfo(req_pool_idx=2)
        except TypeError:  # 0.5.17
            kv = None
        runner.req_to_token_pool.free(SimpleNamespace(req_pool_idx=2, kv=kv))
    else:
        # The tail's slots went back to the allocator and B's host copies took their place.
        assert backend.session.tail_tokens_demoted == tail
        assert alloc.available_size() - free_before >= tail
        assert m2 == 600  # all of B's prompt: sinks, one run of host pages, B's device tail
        reqs.rows = [2]
        _prefill(reqs, backend, layer, {2: 650})
        for _ in range(2):
            out, ref = reqs.decode_step(backend, layer)
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        _finish(tree, runner, 2, tokens_b + torch.randint(0, 30000, (52,)).tolist(), prefix_len=m2, lock=lock2)
    assert _pool_invariant(runner, tree)
    tree.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["x"]).EvictParams(num_tokens=10**6))
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    assert backend.session.tier.store.cache_holds == 0 and backend.session.tier.store.stats().used_pages == 0


def test_a_short_host_store_evicts_cached_prefixes_before_refusing(prefix_server):
    torch.manual_seed(13)
    backend, layer, runner, tree = prefix_server
    reqs = _Requests(runner, [0, 0])
    _prefill(reqs, backend, layer, {0: 500})
    tokens_a = list(range(500))
    reqs.rows = [1]
    _finish(tree, runner, 0, tokens_a)
    store = backend.session.tier.store
    held = store.stats().used_pages
    assert held > 0 and store.reclaim is not None
    # Fill the store up to the pages the tree holds: the next request's evictions need them back.
    filler = "filler"
    store.admit(filler, first_pos=0)
    store.allocate(filler, store.stats().free_pages)
    # Admission counts what the cache would give back as room: a new prompt does not wait on it.
    assert store.stats().free_pages == 0 and backend.host_free_tokens() == held * 16
    holds = store.cache_holds
    _prefill(reqs, backend, layer, {1: 300})
    # The tree gave pages back, least recently used first, so the running request's evictions went through.
    assert backend.session.tier.host_tokens(1) > 0 and backend.session.evictions_refused == 0
    assert store.cache_holds < holds
    store.release(filler)
