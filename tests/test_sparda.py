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


@pytest.mark.parametrize("knobs, forecasts, message", [
    ({"forecast": {"source": "next_query"}}, False,
     "sparda.forecast.source: next_query needs the model's hidden states: expected a caller that hands"),
    ({"forecast": {"source": "trained", "weights_path": "w.safetensors"}}, True,
     "sparda.forecast.source: trained .* is not built yet; expected next_query or reuse"),
    ({"prefetch_depth": 2}, True, "sparda.prefetch_depth: expected 1"),
])
def test_forecasts_a_caller_cannot_run_are_refused_when_the_tier_is_built(knobs, forecasts, message):
    """next_query without a caller that hands forecasts (the benches, a server), and what is not built."""
    from kvtier.runtime.strategies import StrategyUnavailable

    with pytest.raises(StrategyUnavailable, match=message):
        StandaloneTier(_config(**knobs), SHAPE, device="cpu", dtype=torch.float32, device_tokens=64, host_tokens=64,
                       forecasts=forecasts)


def test_the_demo_refuses_next_query_with_exit_2(tmp_path, capsys):
    from kvtier.cli import main

    path = tmp_path / "next_query.yaml"
    path.write_text("policy: sparda\nsparda: {forecast: {source: next_query}}\n")
    assert main(["demo", "--policy", str(path), "--context", "2048"]) == 2
    assert "sparda.forecast.source: next_query needs the model's hidden states" in capsys.readouterr().err


def test_a_servers_session_refuses_next_query():
    """The sglang backend's TierSession sees each layer's q, k, v only: next_query is refused when it is
    built, and by the launch's check before any model loads (the same reason, no sglang needed)."""
    from kvtier.policies import policy_for
    from kvtier.runtime.session import TierSession
    from kvtier.runtime.strategies import StrategyUnavailable, strategy_class

    cfg = _config(forecast={"source": "next_query"})
    k = [torch.zeros(256, SHAPE.kv_heads, SHAPE.head_dim) for _ in range(SHAPE.n_layers)]
    session = TierSession(cfg, rows=None, free_slots=None)
    with pytest.raises(StrategyUnavailable, match="next_query needs the model's hidden states"):
        session.build(SHAPE, k, k, sm_scale=0.125, soft_cap=0.0, use_flashinfer=False)
    assert not session.built
    policy = policy_for(cfg)
    assert "next_query needs" in strategy_class(policy.strategy).refusal(policy, forecasts=False)
    assert strategy_class(policy.strategy).refusal(policy, forecasts=True) is None
    reuse = policy_for(_config())
    assert strategy_class(reuse.strategy).refusal(reuse, forecasts=False) is None


def _exact_blocks(full, layer, q, n, blocks, first=4, page=16, bt=32):
    """Per kv-head, the top `blocks` 32-token blocks by the best page-mean score of the group's query
    heads, from the float keys (the selection the strategy must make), as sets."""
    k = full[0][layer][0].double()
    pages = k[first: first + n].view(n // page, page, SHAPE.kv_heads, SHAPE.head_dim).mean(1)
    g, ppb = SHAPE.num_q_heads // SHAPE.kv_heads, bt // page
    out = []
    for h in range(SHAPE.kv_heads):
        score = (pages[:, h] @ q[0, h * g: (h + 1) * g].double().T).amax(1)
        score = torch.cat([score, score.new_full((-score.numel() % ppb,), float("-inf"))]).view(-1, ppb).amax(1)
        out.append(set(torch.topk(score, blocks).indices.tolist()))
    return out


def _attend_blocks(tier, full, q, layer, blocks, bt=32):
    """float64 attention of q over sinks, window and the given blocks per kv-head (host keys bf16)."""
    tokens = [{t for b in bs for t in range(b * bt, (b + 1) * bt)} for bs in blocks]
    return _attend_tokens(tier, full, q, layer, tokens)


def _attend_tokens(tier, full, q, layer, tokens):
    """float64 attention of q over sinks, window and the given host tokens per kv-head (host keys bf16;
    tokens past the host part are left out)."""
    first, host_end = tier.store.table(0).first_pos, tier.tier.requests[0].host_end
    k, v = (x.double() for x in full[0][layer])
    k[first:host_end], v[first:host_end] = (x[first:host_end].bfloat16().double() for x in (k, v))
    g = SHAPE.num_q_heads // SHAPE.kv_heads
    out = torch.zeros(SHAPE.num_q_heads, SHAPE.head_dim, dtype=torch.float64)
    for h in range(SHAPE.kv_heads):
        host = [first + t for t in sorted(tokens[h]) if t < host_end - first]
        pos = torch.cat([torch.arange(first), torch.tensor(host, dtype=torch.long), torch.arange(host_end, k.shape[0])])
        for j in range(g):
            x = (k[pos, h] @ q[0, h * g + j].double()) * SHAPE.head_dim ** -0.5
            out[h * g + j] = torch.softmax(x, 0) @ v[pos, h]
    return out


@pytest.mark.parametrize("correction", ["none", "cpu"])
def test_next_query_attends_the_blocks_its_forecast_selected(gen, correction):
    """next_query: a layer's forecast query selects its blocks (the exact top blocks by page-mean score)
    and fetches them before the layer runs; the layer then attends exactly those (no correction,
    SparDA's own) or those and the real query's others on the CPU. A forecast equal to the real query
    attends the real query's own top blocks (no miss); another query's forecast attends the
    forecast's blocks, and the real query's others are counted as misses."""
    tier = StandaloneTier(_config(correction, {"kind": "tokens", "tokens": 128}, forecast={"source": "next_query"}),
                          SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096,
                          forecasts=True)
    try:
        assert tier.attn.takes_forecasts
        rids, full = _decode(tier, gen, [1200], steps=1)
        host = tier.attn.host
        for step in range(4):
            tier.attn.plan(rids)
            n = tier.tier.host_tokens(0)
            for layer in range(SHAPE.n_layers):
                q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                qf = q if step % 2 == 0 else torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                want = _exact_blocks(full, layer, qf, n, 4)
                tier.attn.forecast(qf, layer)
                held = [set(b) for b in host.caches[0].block[layer].tolist()]
                assert held == want, (step, layer)  # fetched before the layer runs
                host.take_stats()
                got = tier.attn.run(q, layer)
                st = host.take_stats()
                real = _exact_blocks(full, layer, q, n, 4)
                assert st.misses == sum(len(r - w) for r, w in zip(real, want)), (step, layer)
                if step % 2 == 0:
                    assert st.misses == 0 and st.hits == 4 * SHAPE.kv_heads
                else:
                    assert st.misses > 0
                assert [set(b) for b in host.caches[0].block[layer].tolist()] == want  # nothing fetched after
                attended = want if correction == "none" else [w | r for w, r in zip(want, real)]
                torch.testing.assert_close(got[0].double(), _attend_blocks(tier, full, q, layer, attended),
                                           atol=1e-3, rtol=1e-3)
            _steps(tier, gen, rids, full, 1)
        assert host.report()["forecast_layer_steps"] == {"forecast": 4 * SHAPE.n_layers, "reuse": 0}
    finally:
        tier.close()


@pytest.mark.parametrize("correction", ["cpu", "none"])
def test_a_layer_without_a_forecast_falls_back_to_reuse(gen, correction):
    """next_query where the caller hands layer 1 its forecast and layer 0 none (as for the first layer,
    which has no layer before it): layer 0 attends exactly what the reuse forecast attends on the same
    data and queries, step after step, and its real selection is fetched for the next step; layer 1
    attends its forecast's blocks."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    budget = {"kind": "tokens", "tokens": 96}
    tiers = {src: StandaloneTier(_config(correction, budget, forecast={"source": src}), SHAPE, device="cpu",
                                 dtype=torch.float32, device_tokens=2048, host_tokens=4096, forecasts=True)
             for src in ("reuse", "next_query")}
    try:
        data = {src: _decode(t, torch.Generator().manual_seed(seed), [1000], steps=1) for src, t in tiers.items()}
        qgen = torch.Generator().manual_seed(seed + 1)
        nq = tiers["next_query"].attn
        for step in range(3):
            for src, t in tiers.items():
                t.attn.plan([0])
            qs = [torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=qgen) for _ in range(SHAPE.n_layers)]
            nq.forecast(qs[1], 1)  # layer 1's, handed while layer 0 runs; layer 0 gets none
            out = {src: [t.attn.run(qs[layer], layer) for layer in range(SHAPE.n_layers)] for src, t in tiers.items()}
            torch.testing.assert_close(out["next_query"][0], out["reuse"][0], atol=0, rtol=0)
            for src in tiers:
                blocks = tiers[src].attn.host.caches[0].block[0].sort(-1).values
                assert torch.equal(blocks, nq.host.select(qs[0], 0)[0].sort(-1).values), (src, step)
            n = tiers["next_query"].tier.host_tokens(0)
            held = [set(b) for b in nq.host.caches[0].block[1].tolist()]
            assert held == _exact_blocks(data["next_query"][1], 1, qs[1], n, 3), step
            for src, t in tiers.items():
                _steps(t, torch.Generator().manual_seed(seed + 2 + step), [0], data[src][1], 1)
        assert nq.host.report()["forecast_layer_steps"] == {"forecast": 3, "reuse": 3}
        assert "forecast_layer_steps" not in tiers["reuse"].attn.host.report()
    finally:
        for t in tiers.values():
            t.close()


def test_forecast_misuse_is_refused(gen):
    """A forecast after the layer ran in this plan, twice for one layer, of the wrong shape, or to a
    tier whose strategy takes none."""
    tier = StandaloneTier(_config(forecast={"source": "next_query"}), SHAPE, device="cpu", dtype=torch.float32,
                          device_tokens=2048, host_tokens=4096, forecasts=True)
    reuse = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048,
                           host_tokens=4096, forecasts=True)
    try:
        rids, _ = _decode(tier, gen, [600], steps=1)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        tier.attn.forecast(q, 1)
        with pytest.raises(ValueError, match="layer 1 was forecast already in this plan"):
            tier.attn.forecast(q, 1)
        tier.attn.run(q, 0)
        with pytest.raises(ValueError, match="layer 0 already ran in this plan"):
            tier.attn.forecast(q, 0)
        with pytest.raises(ValueError, match="q must be"):
            tier.attn.forecast(q[:, :4], 1)
        with pytest.raises(ValueError, match=r"expected a layer in \[0, 2\), found 2"):
            tier.attn.forecast(q, 2)
        assert not reuse.attn.takes_forecasts
        _decode(reuse, gen, [600], steps=1)
        reuse.attn.plan([0])
        with pytest.raises(ValueError, match="host strategy 'forecast_prefetch' .* takes no forecast queries"):
            reuse.attn.forecast(q, 1)
    finally:
        tier.close()
        reuse.close()


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


@pytest.mark.parametrize("source", ["next_query", "reuse"])
def test_a_growing_request_attends_its_cache_and_its_real_selection_exactly(gen, source):
    """Twelve steps of five tokens each (pages leave the window, the last block fills across steps):
    with the CPU correction a layer attends exactly the tokens its slots hold (next_query: its
    forecast's blocks, from a query off by noise; reuse: the previous step's, a block that has grown
    since held in part) and the real query's blocks whole."""
    tier = StandaloneTier(_config("cpu", {"kind": "tokens", "tokens": 128}, forecast={"source": source}), SHAPE,
                          device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096,
                          forecasts=source == "next_query")
    try:
        rids, full = _decode(tier, gen, [1200], steps=1)
        host = tier.attn.host
        sizes = set()
        for step in range(12):
            tier.attn.plan(rids)
            n = tier.tier.host_tokens(0)
            sizes.add(n)
            for layer in range(SHAPE.n_layers):
                q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                if source == "next_query":
                    tier.attn.forecast(q + 0.7 * torch.randn(q.shape, generator=gen), layer)
                cache = host.caches[0]
                held = [{b * 32 + j for b, f in zip(bs, fs) if b >= 0 for j in range(f)}
                        for bs, fs in zip(cache.block[layer].tolist(), cache.filled[layer].tolist())]
                got = tier.attn.run(q, layer)
                real = [{b * 32 + j for b in bs for j in range(32)} for bs in _exact_blocks(full, layer, q, n, 4)]
                attended = [c | r for c, r in zip(held, real)]
                torch.testing.assert_close(got[0].double(), _attend_tokens(tier, full, q, layer, attended),
                                           atol=1e-4, rtol=1e-4)
            _steps(tier, gen, rids, full, 5)
        assert len(sizes) > 2  # the host part grew
    finally:
        tier.close()
