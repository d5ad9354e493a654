"""SparDA-style forecast prefetch (the forecast_prefetch strategy) against float64 references."""

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime import dense_attention
from kvtier.runtime.standalone import StandaloneTier

from test_runtime import _decode, _steps

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
WINDOW = {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16}


def _config(correction="cpu", budget=None, **knobs):
    return from_mapping({"policy": "sparda", "window": WINDOW, "max_context_tokens": 8192,
                         "budget": budget or {"kind": "all"}, "host_store": {"key_format": "bf16"},
                         "sparda": {"correction": correction, "block_tokens": 32, **knobs}})


def _dense(q, full, rids, layer):
    ks = torch.cat([full[r][layer][0] for r in rids]).double()
    vs = torch.cat([full[r][layer][1] for r in rids]).double()
    lens = torch.tensor([full[r][layer][0].shape[0] for r in rids])
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return dense_attention(q.double(), ks, vs, indptr, sm_scale=SHAPE.head_dim ** -0.5).out


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("correction", ["cpu", "fetch", "none"])
def test_every_block_selected_equals_dense_once_the_cache_holds_them(gen, correction):
    """Budget all: with a correction every step equals dense; without one (SparDA's own) the first
    step attends an empty cache, the next ones hold every block."""
    tier = StandaloneTier(_config(correction), SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048,
                          host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [500, 900], steps=2)
        for step in range(3):
            tier.attn.plan(rids)
            for layer in range(SHAPE.n_layers):
                q = torch.randn(2, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                err = _rel(tier.attn.run(q, layer), _dense(q, full, rids, layer))
                if correction == "none" and step == 0:
                    assert err > 1e-2  # nothing resident yet: the host part is left out
                else:
                    assert err < 5e-3, (step, layer, err)
            recall = tier.attn.host.forecast_recall()
            assert sorted(recall) == list(range(SHAPE.n_layers))
            st = tier.attn.host.take_stats()
            assert tier.attn.host.forecast_recall() == {}  # taken with the stats
            if step == 0:
                assert st.hits == 0 and st.fetched > 0 and set(recall.values()) == {0.0}
            else:  # the blocks stay resident; new tokens only complete their block
                assert st.hits > 0 and st.misses <= 2 * SHAPE.n_layers * SHAPE.kv_heads
                assert all(r > 0.5 for r in recall.values()), recall
            _steps(tier, gen, rids, full, 1)
    finally:
        tier.close()


def test_a_budget_attends_the_cached_blocks_and_the_cpu_the_misses(gen):
    """Budget of 4 blocks: a step attends the blocks its layer selected the step before (resident) and
    the ones it selects now that are not resident (CPU), exactly: equal to float64 attention over
    sinks, window and exactly those blocks."""
    tier = StandaloneTier(_config("cpu", {"kind": "tokens", "tokens": 128}), SHAPE, device="cpu",
                          dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [1200], steps=1)
        host = tier.attn.host
        for step in range(3):
            tier.attn.plan(rids)
            for layer in range(SHAPE.n_layers):
                before = host.caches[0].block[layer].clone()
                q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                chosen = host.select(q, layer)[0]  # [Hkv, 4]
                got = tier.attn.run(q, layer)
                st, T = tier.tier.requests[0], 32
                first, host_end = tier.store.table(0).first_pos, st.host_end
                # host tokens as the store holds them (bf16), device tokens as the pool does (float32)
                k, v = (x.double() for x in full[0][layer])
                k[first:host_end], v[first:host_end] = (x[first:host_end].bfloat16().double() for x in (k, v))
                out = torch.zeros(SHAPE.num_q_heads, SHAPE.head_dim, dtype=torch.float64)
                for h in range(SHAPE.kv_heads):
                    blocks = set(chosen[h].tolist()) | set(b for b in before[h].tolist() if b >= 0)
                    host_tok = torch.tensor([first + t for b in sorted(blocks)
                                             for t in range(b * T, min((b + 1) * T, host_end - first))])
                    pos = torch.cat([torch.arange(first), host_tok, torch.arange(host_end, k.shape[0])])
                    for g in range(4):
                        qh = h * 4 + g
                        x = (k[pos, h] @ q[0, qh].double()) * SHAPE.head_dim ** -0.5
                        out[qh] = torch.softmax(x, 0) @ v[pos, h]
                torch.testing.assert_close(got[0].double(), out, atol=1e-3, rtol=1e-3)
                assert torch.equal(host.caches[0].block[layer].sort(-1).values, chosen.sort(-1).values)
            _steps(tier, gen, rids, full, 1)
    finally:
        tier.close()


def test_block_selection_is_the_best_page_mean_score_per_block(gen):
    tier = StandaloneTier(_config("cpu", {"kind": "tokens", "tokens": 96}), SHAPE, device="cpu",
                          dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [900], steps=1)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        chosen = tier.attn.host.select(q, 1)[0]
        k = full[0][1][0].double()
        first, n = 4, tier.tier.host_tokens(0)
        pages = k[first: first + n].view(n // 16, 16, SHAPE.kv_heads, SHAPE.head_dim).mean(1)  # [P, Hkv, D]
        for h in range(SHAPE.kv_heads):
            qg = q[0, h * 4: h * 4 + 4].double()
            page_score = (pages[:, h] @ qg.T).amax(1)
            page_score = torch.cat([page_score, page_score.new_full((page_score.numel() % 2,), float("-inf"))])
            score = page_score.view(-1, 2).amax(1)  # pages -> 32-token blocks (the last one may hold one)
            assert set(chosen[h].tolist()) == set(torch.topk(score, 3).indices.tolist())
    finally:
        tier.close()


@pytest.mark.parametrize("knobs, message", [
    ({"forecast": {"source": "next_query"}}, "sparda.forecast.source: next_query needs the model's hidden states"),
    ({"prefetch_depth": 2}, "sparda.prefetch_depth: expected 1"),
])
def test_forecasts_not_built_are_refused_when_the_tier_is_built(knobs, message):
    with pytest.raises(ValueError, match=message):
        StandaloneTier(_config(**knobs), SHAPE, device="cpu", dtype=torch.float32, device_tokens=64, host_tokens=64)


def test_a_batch_past_the_device_block_cache_is_refused_with_the_numbers(gen):
    from kvtier.store import CapacityError

    cfg = _config("cpu", {"kind": "tokens", "tokens": 128}, device_cache_blocks=20)  # 2 layers x 2 heads x 4
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, _ = _decode(tier, gen, [600], steps=1)
        tier.attn.plan(rids)  # one request: 16 blocks, within 20
        tier.tier.add(9)
        tier.tier.prefill(9, 600)
        with pytest.raises(CapacityError, match="device block cache"):
            tier.attn.plan([0, 9])  # two: 32 blocks
    finally:
        tier.close()


@pytest.mark.parametrize("correction", ["cpu", "none"])
def test_detail_names_the_host_tokens_attended(gen, correction):
    """detail() returns the run's output and, as its selection, the tokens it attended: the resident
    blocks' and (CPU correction) the chosen blocks' others. Attention restricted to those tokens in
    float64 equals the host part; SparDA's own (none) names only what the cache held."""
    budget = {"kind": "tokens", "tokens": 64}  # 2 of the blocks per kv-head
    tier = StandaloneTier(_config(correction, budget), SHAPE, device="cpu", dtype=torch.float32,
                          device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [700], steps=1)
        for step in range(2):
            tier.attn.plan(rids)
            host = tier.attn.host
            n = int(host.batch.n_tokens[0])
            for layer in range(SHAPE.n_layers):
                q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                part, sel = host.detail(q, layer)
                assert sel.shape[:2] == (1, SHAPE.num_q_heads)
                g = SHAPE.num_q_heads // SHAPE.kv_heads
                table, T = tier.store.table(0), WINDOW["page_tokens"]
                starts = torch.tensor(table.starts, dtype=torch.long)
                pos = starts[torch.arange(n) // T] + torch.arange(n) % T  # host token i's position
                k_host, v_host = full[0][layer][0][pos], full[0][layer][1][pos]
                for h in range(SHAPE.num_q_heads):
                    idx = sel[0, h][sel[0, h] >= 0].long()
                    if step == 0 and correction == "none":
                        assert idx.numel() == 0  # nothing resident before the first fetch
                        continue
                    assert 0 < idx.numel() <= (64 if step == 0 else 128) and int(idx.max()) < n
                    k, v = (x[idx, h // g].bfloat16().double() for x in (k_host, v_host))  # the store keeps bf16
                    w = torch.softmax(k @ q[0, h].double() * SHAPE.head_dim ** -0.5, dim=0)
                    assert torch.allclose(part.out[0, h].double(), w @ v, atol=1e-4), (step, layer, h)
                assert host.read_bytes(layer, sel) > 0
            _steps(tier, gen, rids, full, 1)
    finally:
        tier.close()


# --- the block cache's diff, against the per-head loop it replaced -------------------------------


def _ref_fetch(have, filled, want, n, bt):
    """The per-head loop: (jobs [(head, slot, block, tokens)], hits, misses, wasted)."""
    hits = misses = wasted = 0
    jobs = []
    for h, blocks in enumerate(want.tolist()):
        full = {b: min(bt, n - b * bt) for b in blocks if b >= 0}
        slot = {b: j for j, b in enumerate(have[h].tolist()) if b >= 0}
        missing = [b for b in full if b not in slot or filled[h][slot[b]] < full[b]]
        hits += len(full) - len(missing)
        misses += len(missing)
        wasted += sum(1 for b in slot if b not in full)
        spare = [j for j, b in enumerate(have[h].tolist()) if b not in full]
        for b in missing:
            jobs.append((h, slot[b] if b in slot else spare.pop(0), b, full[b]))
    return jobs, hits, misses, wasted


def _ref_missed(have, filled, chosen, n, bt):
    rows = []
    for h, blocks in enumerate(chosen.tolist()):
        held = {b: int(filled[h][j]) for j, b in enumerate(have[h].tolist()) if b >= 0}
        rows.append([t for b in blocks if b >= 0 for t in range(b * bt + held.get(b, 0), min((b + 1) * bt, n))])
    m = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (m - len(r)) for r in rows], dtype=torch.int32).view(len(rows), m)


def _slots_case(gen, heads, slots, n, bt):
    """A cache's slots (distinct blocks per head, some empty, some part-filled) and a wanted set (distinct
    blocks best first, -1 padded past the request's blocks)."""
    nblocks = -(-n // bt)
    have = torch.full((heads, slots), -1, dtype=torch.long)
    filled = torch.zeros(heads, slots, dtype=torch.long)
    want = torch.full((heads, slots), -1, dtype=torch.long)
    for h in range(heads):
        held = torch.randperm(nblocks, generator=gen)[: int(torch.randint(0, slots + 1, (1,), generator=gen))]
        at = torch.randperm(slots, generator=gen)[: held.numel()]
        have[h, at] = held
        full = (n - held * bt).clamp(max=bt)
        part = torch.rand(held.numel(), generator=gen) < 0.2
        filled[h, at] = torch.where(part, (full * torch.rand(held.numel(), generator=gen)).long(), full)
        k = min(slots, nblocks)
        # wanted: mostly blocks held (a forecast that often hits), the rest drawn at random
        pool = torch.cat([held[torch.randperm(held.numel(), generator=gen)], torch.randperm(nblocks, generator=gen)])
        seen = []
        for b in pool.tolist():
            if b not in seen:
                seen.append(b)
        want[h, :k] = torch.tensor(seen[:k])
        if torch.rand(1, generator=gen) < 0.3:  # a short request's padding
            want[h, int(torch.randint(1, k + 1, (1,), generator=gen)):] = -1
    return have, filled, want


@pytest.mark.parametrize("seed", range(4))
def test_the_block_cache_diff_is_the_per_head_loops(seed):
    """plan_fetch and missed_tokens (tensor ops, one read back) equal the per-head loops they replaced
    on fresh random slots: resident, part-filled and empty slots, a last block shorter than the rest."""
    from kvtier.runtime.strategies.forecast_prefetch import missed_tokens, plan_fetch

    base = int(torch.randint(0, 2**31, (1,))) + seed
    gen = torch.Generator().manual_seed(base)
    for case in range(25):
        heads, slots = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
        bt = (16, 64)[int(torch.randint(0, 2, (1,), generator=gen))]
        n = int(torch.randint(1, 40 * bt, (1,), generator=gen))
        have, filled, want = _slots_case(gen, heads, slots, n, bt)
        plan = plan_fetch(have, filled, want, n, bt)
        jobs, hits, misses, wasted = _ref_fetch(have, filled, want, n, bt)
        where = f"generator seed {base}, case {case}"
        assert [tuple(j) for j in plan.jobs.tolist()] == jobs, where
        assert (plan.hits, plan.misses, plan.wasted) == (hits, misses, wasted), where
        assert torch.equal(missed_tokens(have, filled, want, n, bt), _ref_missed(have, filled, want, n, bt)), where
