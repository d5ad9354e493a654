"""The decode backend: sglang's own attention-backend kit, the release of a finished request's
host pages, stage 2, where evicted device slots go back to sglang's allocator, and many requests
started, decoded and finished in random order, each equal to itself alone.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import unittest

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier_sglang import lifecycle  # noqa: E402
from sglang_kit import registered  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _free_row, _free_slot_census, _Requests, _stage2_backend, _tier_yaml  # noqa: E402


def _run_kit(monkeypatch, config_path):
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

    from kvtier.runtime import hybrid

    monkeypatch.setenv("KVTIER_CONFIG", str(config_path))
    host_seen = []
    original = hybrid.HybridAttention.plan

    def plan(self, rids):
        original(self, rids)
        host_seen.append(sum(self.tier.host_tokens(r) for r in rids))

    monkeypatch.setattr(hybrid.HybridAttention, "plan", plan)
    tc = unittest.TestCase()
    cases = list(kit.make_dense_cases("kvtier"))
    for case in cases:
        with torch.no_grad():
            kit.run_dense_attention_case(tc, case, dtype=torch.float32, device="cpu")
    return cases, host_seen


def test_sglang_attention_kit_passes_with_budget_all(monkeypatch, tmp_path):
    cases, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path))
    assert any(c.forward_mode.is_decode() for c in cases)
    assert max(host_seen) > 0, "no kit case put tokens on the host: the tier was not exercised"


def test_sglang_attention_kit_passes_with_hcattention_at_budget_all(monkeypatch, tmp_path):
    cases, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path, policy="hcattention",
                                                        knobs="hcattention: {key_bits: 4}\n"))
    assert max(host_seen) > 0


def test_hcattention_selects_from_device_keys_through_the_backend_and_matches_dense():
    """Every host token kept by the selection over 4-bit device keys, weighed with exact logits: equal to
    dense, across evictions whose slots went back to sglang and were overwritten by another request."""
    torch.manual_seed(3)
    backend, layer, runner = _stage2_backend(policy="hcattention", budget="{kind: tokens, tokens: 100000}",
                                             knobs="hcattention: {key_bits: 4, logits: exact}\n")
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [300, 150])
    out, ref = reqs.decode_step(backend, layer)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    host = backend.session.attn.host
    assert host.name == "gpu_select" and host.device_bytes > 0 and backend.session.slots_released > 0
    filler = alloc.alloc(alloc.available_size() - 8)
    runner.token_to_kv_pool.k_buffer[0][filler] = 1e4
    runner.token_to_kv_pool.v_buffer[0][filler] = -1e4
    for _ in range(3):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc.free(filler)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct and alloc.available_size() == alloc.size


def _decode_equals_dense_over_reused_slots(backend, layer, runner, *, steps):
    """Two requests decode `steps` steps, each equal to dense; after the first, every free slot but 8
    goes to a filler request with huge K/V, so slots the tier gave back and sglang reused would show."""
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [300, 150])
    filler = None
    for _ in range(steps):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        if filler is None:
            filler = alloc.alloc(alloc.available_size() - 8)
            runner.token_to_kv_pool.k_buffer[0][filler] = 1e4
            runner.token_to_kv_pool.v_buffer[0][filler] = -1e4
    return reqs, filler


def _release_all(runner, reqs, filler):
    """Free the requests' rows and the filler: every slot back in sglang's allocator, each once."""
    alloc = runner.token_to_kv_pool_allocator
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc.free(filler)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct and alloc.available_size() == alloc.size


def test_sparda_attends_its_block_cache_and_the_cpus_misses_through_the_backend():
    """Every block selected: the first step's misses on the CPU, the next steps from the device block
    cache; equal to dense across evictions whose slots were reused by another request."""
    torch.manual_seed(4)
    backend, layer, runner = _stage2_backend(policy="sparda", budget="{kind: tokens, tokens: 100000}",
                                             knobs="sparda: {block_tokens: 32, correction: cpu}\n")
    reqs, filler = _decode_equals_dense_over_reused_slots(backend, layer, runner, steps=4)
    host = backend.session.attn.host
    assert host.name == "forecast_prefetch" and host.take_stats().hits > 0
    _release_all(runner, reqs, filler)


@pytest.mark.parametrize("share", ["auto", "off"])
def test_fluxion_splits_its_blocks_through_the_backend_and_matches_dense(share):
    """Budget all, every head in one 16-token class: the split strategy attends every host block (on
    the CPU engine, or part of them on the device side after a copy) and equals dense across steps and
    evictions whose slots went back to sglang and were overwritten by another request."""
    torch.manual_seed(5)
    knobs = ("fluxion: {head_classes: [{name: all, block_tokens: 16, budget_tokens: 4096, window_mass: [0, 1]}], "
             f"gpu_share: {share}}}\n")
    backend, layer, runner = _stage2_backend(policy="fluxion", budget="{kind: all}", knobs=knobs)
    reqs, filler = _decode_equals_dense_over_reused_slots(backend, layer, runner, steps=3)
    host = backend.session.attn.host
    st = host.take_split_stats()
    assert host.name == "split" and st.cpu_blocks + st.gpu_blocks > 0 and backend.session.slots_released > 0
    if share == "off":
        assert st.gpu_blocks == 0
    _release_all(runner, reqs, filler)


def test_sglang_attention_kit_at_the_default_budget_with_int8_keys(monkeypatch, tmp_path):
    _, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path, keys="int8", budget="{kind: tokens, tokens: 2048}"))
    assert max(host_seen) > 0


def test_finished_request_releases_host_pages_through_the_real_pool():
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)

    class Probe:
        req_to_token_pool = pool
        released = []

        def release(self, row):
            self.released.append(row)

    probe = Probe()
    lifecycle.track(probe)

    class Kv:  # where 0.5.23 keeps the row
        holds_kv = True
        req_pool_idx = 3

    class Req:  # the attributes ReqToTokenPool.free and the hook read, in either layout
        req_pool_idx = 3
        kv = Kv()

    pool.free(Req())
    assert probe.released == [3]


@pytest.mark.parametrize("tp_size, tp_rank", [(1, 0), (2, 1)])
def test_stage2_evicted_slots_return_to_the_allocator_and_are_freed_once(tp_size, tp_rank):
    """Also as rank 1 of two (this rank's own kv-heads); the tier settles in lockstep either way."""
    torch.manual_seed(0)
    backend, layer, runner = _stage2_backend(tp_size=tp_size, tp_rank=tp_rank)
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [300, 150])
    used = 450
    assert alloc.available_size() == alloc.size - used

    out, ref = reqs.decode_step(backend, layer)
    used += 2
    assert backend.releases_slots and backend.session.tier.lockstep
    released = backend.session.slots_released
    # Sinks (16) and at most a window plus a page (64 + 16) stay per request; the rest went back.
    assert released >= (301 - 16 - 80) + (151 - 16 - 80)
    assert alloc.available_size() == alloc.size - used + released
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

    # The freed slots really are reusable: another request takes all of them and overwrites their KV.
    filler = alloc.alloc(alloc.available_size() - 8)
    runner.token_to_kv_pool.k_buffer[0][filler] = 1e4
    runner.token_to_kv_pool.v_buffer[0][filler] = -1e4
    for _ in range(3):  # later steps still attend the evicted tokens, from the host store
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

    # Finishing both through sglang's own release path frees every remaining slot exactly once.
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc.free(filler)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    assert backend.tier_stats()["host_tokens"] == 0


def test_stage2_stays_off_while_the_radix_cache_is_on():
    torch.manual_seed(1)
    backend, layer, runner = _stage2_backend(disable_radix_cache=False)
    reqs = _Requests(runner, [200])
    out, ref = reqs.decode_step(backend, layer)
    assert not backend.releases_slots and backend.session.slots_released == 0
    assert backend.tier_stats()["host_tokens"] > 0  # stage 1: still tiered, device KV kept on both sides
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    _free_row(runner, 0, reqs.k[0].shape[0])
    assert runner.token_to_kv_pool_allocator.available_size() == runner.token_to_kv_pool_allocator.size


def test_free_kv_row_ranges_lose_exactly_the_released_positions():
    assert lifecycle.subtract([(0, 100)], (16, 64)) == [(0, 16), (64, 100)]
    assert lifecycle.subtract([(0, 10), (20, 30)], (5, 25)) == [(0, 5), (25, 30)]
    assert lifecycle.subtract([(0, 100)], (16, 16)) == [(0, 100)]
    assert lifecycle.subtract([(32, 48)], (16, 64)) == []


def test_a_full_host_store_keeps_pages_on_the_gpu_instead_of_failing_the_step():
    torch.manual_seed(2)
    # Room for 4 host pages (8 KiB each here): the first request's 3 fit, the second's 14 do not.
    backend, layer, runner = _stage2_backend(capacity_gib=4 * 8192 / 2 ** 30)
    reqs = _Requests(runner, [120, 300])
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    stats = backend.tier_stats()
    assert stats["evictions_refused"] > 0 and stats["host_tokens"] == 3 * 16  # 3 pages of the first request
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc = runner.token_to_kv_pool_allocator
    n, distinct = _free_slot_census(alloc)
    assert n == distinct and alloc.available_size() == alloc.size


class _OneRequest:
    """One request's prompt and decode inputs from its own generator: the same alone or beside others."""

    def __init__(self, seed, rid, length, steps, hq=4, hkv=2, d=64):
        g = torch.Generator().manual_seed(seed * 1000 + rid)
        self.rid, self.length, self.steps = rid, length, steps
        self.k0, self.v0 = torch.randn(length, hkv, d, generator=g), torch.randn(length, hkv, d, generator=g)
        self.q = torch.randn(steps, hq * d, generator=g)
        self.k, self.v = torch.randn(steps, hkv, d, generator=g), torch.randn(steps, hkv, d, generator=g)
        self.row, self.done = None, 0
        self.waited = 0  # batches the tier evicted at since this request's last step (it was not in them)
        self.evicts_before = []  # per step: those batches, for the replay alone

    def admit(self, runner):
        """A row and slots from sglang's own pools, the prompt's K, V written as its prefill would."""
        pool = runner.req_to_token_pool
        self.row = (pool.alloc_rows(1) if hasattr(pool, "alloc_rows") else pool.alloc(1))[0]
        slots = runner.token_to_kv_pool_allocator.alloc(self.length)
        assert slots is not None, "the pool ran out of slots"
        pool.req_to_token[self.row, :self.length] = slots.to(torch.int32)
        runner.token_to_kv_pool.k_buffer[0][slots] = self.k0
        runner.token_to_kv_pool.v_buffer[0][slots] = self.v0


def _decode_batch(backend, layer, runner, batch):
    """One decode token for each request of batch, in that order, through the backend: [B, Hq * D]."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    loc = runner.token_to_kv_pool_allocator.alloc(len(batch))
    assert loc is not None, "the pool ran out of slots"
    for req, slot in zip(batch, loc.tolist()):
        runner.req_to_token_pool.req_to_token[req.row, req.length + req.done] = slot
    lens = torch.tensor([req.length + req.done + 1 for req in batch])
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=len(batch),
                         req_pool_indices=torch.tensor([req.row for req in batch]), seq_lens=lens,
                         seq_lens_cpu=lens, out_cache_loc=loc)
    q = torch.stack([req.q[req.done] for req in batch])
    k, v = torch.stack([req.k[req.done] for req in batch]), torch.stack([req.v[req.done] for req in batch])
    backend.init_forward_metadata(fb)
    return backend.forward_decode(q, k, v, layer, fb)


def _all_free(backend, runner, msg):
    """Every slot back in sglang's allocator once, every row in the row pool, nothing in the tier."""
    alloc = runner.token_to_kv_pool_allocator
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, f"a slot was freed twice; {msg}"
    assert alloc.available_size() == alloc.size, f"a slot leaked; {msg}"
    rows = runner.req_to_token_pool.free_slots
    assert len(rows) == len(set(rows)) == runner.req_to_token_pool.size, f"rows; {msg}"
    stats = backend.tier_stats()
    assert stats["requests"] == 0 and stats["host_tokens"] == stats["device_tokens"] == 0, msg
    store = backend.session.tier.store.stats()
    assert store.free_pages == store.total_pages, msg


@pytest.mark.parametrize("keys, budget", [("bf16", "{kind: all}"), ("int8_channel", "{kind: tokens, tokens: 48}")])
def test_requests_in_random_order_through_the_backend_equal_each_alone(keys, budget):
    """Eight requests of mixed lengths (inside the window, across pages, many pages past it) on rows and
    slots of sglang's own pools, started at random times, decoded in random subsets and orders, finished
    in random order through sglang's release path; each equals the same request alone through a fresh
    backend (its evictions replayed where the shared run made them), and every slot, row and page is
    free once at the end."""
    import random
    import secrets

    seed = secrets.randbits(31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    lengths = [rng.randint(1, 15), rng.randint(16, 80), rng.randint(81, 100), rng.randint(101, 200),
               rng.randint(150, 300), rng.randint(300, 500), rng.randint(400, 700), rng.randint(600, 900)]
    rng.shuffle(lengths)
    requests = [_OneRequest(seed, rid, n, rng.randint(1, 40)) for rid, n in enumerate(lengths)]
    start = {req.rid: rng.randint(0, 15) for req in requests}
    backend, layer, runner = _stage2_backend(size=4096, keys=keys, budget=budget)
    outs, live, released, t = {}, [], [], 0
    msg = f"seed {seed}, lengths {lengths}"
    with torch.no_grad():
        while len(released) < len(requests):
            for req in rng.sample(requests, len(requests)):
                if start[req.rid] <= t and req.row is None and req.rid not in released \
                        and runner.req_to_token_pool.available_size() > 0:  # four rows: later ones wait
                    req.admit(runner)
                    live.append(req)
            batch = [r for r in live if r.done < r.steps and rng.random() < 0.7]
            rng.shuffle(batch)
            if batch:
                out = _decode_batch(backend, layer, runner, batch)
                for i, req in enumerate(batch):
                    outs[(req.rid, req.done)] = out[i].clone()
                    req.evicts_before.append(req.waited)
                    req.waited = 0
                    req.done += 1
                for req in live:  # the batch's plan evicted for every request the tier tracks
                    if req not in batch and req.done > 0:
                        req.waited += 1
            finished = [r for r in live if r.done == r.steps and rng.random() < 0.5]
            for req in rng.sample(finished, len(finished)):
                _free_row(runner, req.row, req.length + req.done)
                live.remove(req)
                released.append(req.rid)
            t += 1
        msg += f", released in order {released}"
        _all_free(backend, runner, msg)

        for req in requests:
            alone, lone_layer, lone_runner = _stage2_backend(size=4096, keys=keys, budget=budget)
            req.row, req.done = None, 0
            req.admit(lone_runner)
            for i in range(req.steps):
                for _ in range(req.evicts_before[i]):
                    alone.session.evict()
                out = _decode_batch(alone, lone_layer, lone_runner, [req])
                req.done += 1
                torch.testing.assert_close(outs[(req.rid, i)], out[0], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{m}\nrequest {req.rid} ({req.length} tokens), "
                                                         f"step {i}; {msg}")
            _free_row(lone_runner, req.row, req.length + req.done)
            _all_free(alone, lone_runner, msg)
