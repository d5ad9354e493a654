"""Stage 3: prefill in chunks that evict as they go, and the admission that lends a prompt the host
store beyond its device bound.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier_sglang import admission, launch  # noqa: E402
from sglang_kit import registered  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _free_row, _free_slot_census, _poison_free_slots, _Requests, _stage2_backend  # noqa: E402


def _used(alloc):
    return alloc.size - alloc.available_size()


def test_stage3_chunked_prefill_evicts_between_chunks_and_matches_dense(caplog):
    caplog.set_level("INFO", logger="kvtier")
    torch.manual_seed(5)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    assert backend.stage3
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [0, 0])
    prompt, chunk = {0: 700, 1: 300}, 96
    bound = admission.device_bound(backend, chunk)
    assert bound == 16 + 64 + 2 * 16 + 2 * chunk + 1  # sinks, window, 2 pages, 2 chunks, an sglang page
    peak, hybrid_chunks = 0, 0
    while any(reqs.k[r].shape[0] < n for r, n in prompt.items()):
        step = {r: min(chunk, n - reqs.k[r].shape[0]) for r, n in prompt.items() if reqs.k[r].shape[0] < n}
        out, ref = reqs.extend_step(backend, layer, step)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        hybrid_chunks += backend._extend_hybrid
        peak = max(peak, _used(alloc))
        _poison_free_slots(runner)
    # Later chunks attended host pages; the pool never held more than each request's bound,
    # though the prompts (1000 tokens) are far longer than that.
    assert hybrid_chunks >= 5 and backend.session.slots_released > 0
    assert peak <= 2 * bound < sum(prompt.values())
    assert "prefill chunks evict as they go (stage 3)" in caplog.text  # the operator is told
    for _ in range(3):  # decode continues from the tiers the prefill left
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"


def test_stage3_chunks_with_int8_keys_and_a_token_budget_stay_close():
    # Prefill attends the host part exactly (dequantized keys), whatever the decode budget.
    torch.manual_seed(6)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, keys="int8",
                                             budget="{kind: tokens, tokens: 32}")
    reqs = _Requests(runner, [0])
    errs = []
    for _ in range(6):
        out, ref = reqs.extend_step(backend, layer, {0: 80})
        errs.append(((out - ref).norm() / ref.norm()).item())
        _poison_free_slots(runner)
    assert backend._extend_hybrid and max(errs) < 2e-2, errs
    _free_row(runner, 0, reqs.k[0].shape[0])
    assert runner.token_to_kv_pool_allocator.available_size() == runner.token_to_kv_pool_allocator.size


def test_stage3_stays_off_unless_prefill_comes_to_the_tier():
    backend, _, _ = _stage2_backend()
    assert not backend.stage3 and "prefill" in backend.mode.why_not_higher
    backend, _, _ = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, disable_radix_cache=False)
    assert not backend.stage3


def test_stage3_lifts_the_input_cap_to_the_context_or_host_capacity():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    runner.model_config = SimpleNamespace(context_len=100_000)
    worker = SimpleNamespace(model_runner=runner)
    pool = runner.token_to_kv_pool_allocator.size
    info = (pool, 16384, 4, 100, pool - 1, pool - 6, 0, "cpu", None, 1, 2, 3)
    lifted = admission.lift_input_cap(info, worker)
    longest = min(100_000 - 1, pool + backend.host_capacity_tokens())
    assert lifted[4] == longest and lifted[5] == longest - 5 and lifted[:4] == info[:4] and lifted[6:] == info[6:]
    off, _, runner2 = _stage2_backend()
    runner2.model_config = runner.model_config
    assert admission.lift_input_cap(info, SimpleNamespace(model_runner=runner2)) is None


def _budget_adder(alloc, **fields):
    """A PrefillAdder's budget state over the real allocator, as this sglang keeps it: the 0.5.23
    line's PrefillBudget (its own remaining_total), or 0.5.17's offsets on the adder with
    remaining = available - rem_total_token_offset, as its rem_total_tokens property computes."""
    from types import SimpleNamespace

    try:
        from sglang.srt.mem_cache.prefill_budget import PrefillBudget
    except ImportError:
        adder = SimpleNamespace(token_to_kv_pool_allocator=alloc, rem_total_token_offset=0, cur_rem_token_offset=0,
                                **fields)
        return adder, lambda: alloc.available_size() - adder.rem_total_token_offset, \
            lambda: (adder.rem_total_token_offset, adder.cur_rem_token_offset)
    tree = SimpleNamespace(supports_mamba=lambda: False, evictable_size=lambda: 0)
    budget = PrefillBudget(alloc, tree)
    adder = SimpleNamespace(token_to_kv_pool_allocator=alloc, memory_budget=budget, **fields)
    return adder, lambda: budget.remaining_total, lambda: (budget.total_offset, budget.current_offset)


def test_stage3_admission_lends_the_prompt_beyond_the_device_bound():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    backend.prefill_chunk_tokens = 128
    alloc = runner.token_to_kv_pool_allocator
    adder, remaining, offsets = _budget_adder(alloc, rem_chunk_tokens=128)  # sglang's accounting of the pool
    seen = []

    def original(adder_, req):  # sglang's rule: the prompt plus its decode budget must fit what is free
        seen.append(remaining())
        return len(req.full_untruncated_fill_ids) + 32 < remaining()

    def request(n, max_new=32):
        return SimpleNamespace(prefix_len=0, full_untruncated_fill_ids=[0] * n, output_ids=[],
                               sampling_params=SimpleNamespace(max_new_tokens=max_new))

    bound = admission.device_bound(backend, 128)
    long = request(5000)
    assert 5000 > alloc.size and admission.add_one_req(original, adder, long)
    assert seen[-1] == alloc.size + 5032 - bound  # what stage 3 lends for the call...
    assert remaining() == alloc.size and offsets() == (0, 0)  # ...is paid back after it
    assert admission.credit(adder, request(100)) == 0
    huge = request(backend.host_capacity_tokens() + 2000)
    assert admission.credit(adder, huge) == 0 and not admission.add_one_req(original, adder, huge)
    assert admission.credit(SimpleNamespace(**{**vars(adder), "rem_chunk_tokens": None}), long) == 0
    # the 0.5.17 spelling of the same offsets
    old = SimpleNamespace(token_to_kv_pool_allocator=alloc, rem_chunk_tokens=128, rem_total_token_offset=7,
                          cur_rem_token_offset=3)
    admission.add_one_req(lambda a, r: seen.append((a.rem_total_token_offset, a.cur_rem_token_offset)), old, long)
    assert seen[-1] == (7 - (5032 - bound), 3 - (5032 - bound))
    assert (old.rem_total_token_offset, old.cur_rem_token_offset) == (7, 3)
    off, _, runner2 = _stage2_backend()  # stage 3 off: nothing lent
    assert admission.credit(SimpleNamespace(**{**vars(adder), "token_to_kv_pool_allocator":
                                              runner2.token_to_kv_pool_allocator}), long) == 0


def test_stage3_decode_budget_counts_the_host_store_too():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    alloc = runner.token_to_kv_pool_allocator

    def original(sched, req):  # sglang 0.5.17's clamp: prompt + decode budget must fit the pool
        n = len(req.origin_input_ids)
        req.sampling_params.max_new_tokens = max(0, min(req.sampling_params.max_new_tokens,
                                                        sched.max_total_num_tokens - n - 1 - 1))

    sched = SimpleNamespace(token_to_kv_pool_allocator=alloc, max_total_num_tokens=alloc.size)
    req = SimpleNamespace(origin_input_ids=[0] * 5000, sampling_params=SimpleNamespace(max_new_tokens=32))
    admission.init_max_new_tokens(original, sched, req)
    assert req.sampling_params.max_new_tokens == 32 and sched.max_total_num_tokens == alloc.size
    _, _, runner2 = _stage2_backend()  # stage 3 off: sglang's clamp leaves a prompt longer than the pool nothing
    sched2 = SimpleNamespace(token_to_kv_pool_allocator=runner2.token_to_kv_pool_allocator,
                             max_total_num_tokens=runner2.token_to_kv_pool_allocator.size)
    req2 = SimpleNamespace(origin_input_ids=[0] * 5000, sampling_params=SimpleNamespace(max_new_tokens=32))
    admission.init_max_new_tokens(original, sched2, req2)
    assert req2.sampling_params.max_new_tokens == 0


def test_stage3_two_prompts_cannot_both_count_on_the_same_host_pages():
    from types import SimpleNamespace

    # A host store of about 8000 tokens: one 5000-token prompt fits it, two do not.
    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, capacity_gib=8000 * 544 / 2 ** 30)
    backend.prefill_chunk_tokens = 128
    assert 5000 < backend.host_capacity_tokens() < 2 * 4900
    alloc = runner.token_to_kv_pool_allocator
    adder, remaining, _ = _budget_adder(alloc, rem_chunk_tokens=128, can_run_list=[])

    def original(adder_, req):
        fits = len(req.full_untruncated_fill_ids) + 32 < remaining()
        if fits:
            adder_.can_run_list.append(req)
        return fits

    class Req:  # sglang's Req is a plain class: hashable by identity, weakly referenceable
        def __init__(self, **fields):
            self.__dict__.update(fields)

    def request():
        return Req(prefix_len=0, full_untruncated_fill_ids=[0] * 5000, output_ids=[], req_pool_idx=None,
                   sampling_params=SimpleNamespace(max_new_tokens=32), finished=lambda: False)

    first, second = request(), request()
    assert admission.add_one_req(original, adder, first)
    assert admission.owed(backend) == 5032 - 16 - 64
    assert admission.credit(adder, second) == 0 and not admission.add_one_req(original, adder, second)
    first.finished = lambda: True  # once the first is done, the second is lent its share
    assert admission.owed(backend) == 0 and admission.add_one_req(original, adder, second)


def test_stage3_a_prompt_aborted_between_chunks_frees_everything_once():
    """sglang aborts a chunked prefill through the same row release as a finished request: the
    slots the tier already gave back are not freed again, and the host pages go with the row."""
    torch.manual_seed(8)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [0])
    before = backend.host_capacity_tokens()  # what admission counts before the store exists
    for _ in range(4):
        reqs.extend_step(backend, layer, {0: 96})
    assert backend.host_capacity_tokens() == before > 0  # the store the first batch built holds that
    # the next chunk is written to the row but never runs: the request is aborted before it
    pending = alloc.alloc(96)
    runner.req_to_token_pool.req_to_token[0, 384:480] = pending.to(torch.int32)
    assert backend.tier_stats()["host_tokens"] > 0 and backend.session.slots_released > 0
    # what admission counts as this request's host tokens: its allocated pages (landed here on the CPU)
    assert backend.host_tokens_of(0) == backend.session.tier.host_tokens(0) > 0 and backend.host_tokens_of(7) == 0
    _free_row(runner, 0, 480)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    stats = backend.tier_stats()
    assert stats["requests"] == 0 and stats["host_tokens"] == 0
    assert backend.session.tier.store.stats().used_pages == 0
