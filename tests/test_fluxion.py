"""Fluxion (the split host strategy): equal to dense with every block, the head classifier on
constructed heads, the output-aware budget's estimate, the class caps and the CPU/GPU split."""

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.policies import policy_for
from kvtier.runtime import dense_attention
from kvtier.runtime.block_budget import chunk_stats, choose_blocks, head_stats, prefix_curve
from kvtier.runtime.split_schedule import Rates, split_point
from kvtier.runtime.standalone import StandaloneTier

from test_runtime import _decode, _steps

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
WINDOW = {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 64}
SCALE = SHAPE.head_dim ** -0.5


def _config(budget=None, key_format="bf16", **knobs):
    return from_mapping({"policy": "fluxion", "window": WINDOW, "max_context_tokens": 8192,
                         "budget": budget or {"kind": "all"}, "host_store": {"key_format": key_format},
                         "fluxion": knobs})


def _tier(cfg, **kw):
    return StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=4096, host_tokens=8192, **kw)


def _dense(q, full, rids, layer):
    ks = torch.cat([full[r][layer][0] for r in rids]).double()
    vs = torch.cat([full[r][layer][1] for r in rids]).double()
    lens = torch.tensor([full[r][layer][0].shape[0] for r in rids])
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return dense_attention(q.double(), ks, vs, indptr, sm_scale=SCALE)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


# --- budget all: equal to dense -------------------------------------------------------------------


@pytest.mark.parametrize("key_format, tol", [("bf16", 5e-3), ("int8", 2e-2), ("int8_channel", 2e-2), ("int4", 0.25)])
@pytest.mark.parametrize("rates", [None, Rates(1e9, 1e9), Rates(1e9, 3e9)])
def test_every_block_equals_dense_on_the_cpu_and_split_with_a_gpu_part(gen, key_format, tol, rates):
    """Budget all, across evictions: the CPU engine alone (no CUDA: the measured GPU rate is 0) and
    the CPU and GPU parts merged by LSE (the GPU part on the CPU device, at given rates)."""
    tier = _tier(_config(key_format=key_format))
    host = tier.attn.host
    assert host.name == "split" and host.rates.gpu_bytes_per_s == 0 and host.rates.cpu_bytes_per_s > 0
    if rates is not None:
        host.rates = rates
    try:
        rids, full = _decode(tier, gen, [130, 700, 1500], steps=2)
        for _ in range(2):
            tier.attn.plan(rids)
            for layer in range(SHAPE.n_layers):
                q = torch.randn(len(rids), SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
                assert _rel(tier.attn.run(q, layer), _dense(q, full, rids, layer).out) < tol, layer
            st = host.take_split_stats()
            assert st.kept_tokens == st.cap_tokens == SHAPE.n_layers * SHAPE.kv_heads * sum(
                tier.tier.host_tokens(r) for r in rids)
            if rates is None:
                assert st.gpu_blocks == 0 and st.cpu_blocks > 0
            else:  # finishing together at these rates: the GPU's byte share is gpu / (gpu + cpu)
                share = rates.gpu_bytes_per_s / (rates.gpu_bytes_per_s + rates.cpu_bytes_per_s)
                assert abs(st.gpu_bytes / (st.gpu_bytes + st.cpu_bytes) - share) < 0.05
            _steps(tier, gen, rids, full, 70)  # a page leaves the window
    finally:
        tier.close()


def test_detail_returns_every_host_token_as_the_selection(gen):
    tier = _tier(_config())
    try:
        rids, full = _decode(tier, gen, [900], steps=1)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        d = tier.attn.run_detail(q, 0)
        n = tier.tier.host_tokens(rids[0])
        assert d.selection.shape == (1, SHAPE.num_q_heads, n)
        assert torch.equal(d.selection[0, 3].sort().values, torch.arange(n, dtype=torch.int32))
        assert _rel(d.out, _dense(q, full, rids, 0).out) < 5e-3
    finally:
        tier.close()


# --- the head classifier on constructed heads ----------------------------------------------------


def _constructed(tier, gen, n=1600):
    """Layer 0: kv-head 0 retrieval (one host token's key on q's line: low entropy over the host),
    kv-head 1 streaming (the window's keys on q's line). Layer 1: small random keys (mixed)."""
    tier.tier.add(0)
    plan = tier.tier.prefill(0, n)
    e = torch.zeros(SHAPE.head_dim)
    e[0] = 1.0
    host = range(plan.sinks, plan.sinks + plan.host_tokens)
    ks = []
    for layer in range(SHAPE.n_layers):
        k = 0.1 * torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
        v = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
        if layer == 0:
            k[host[len(host) // 3], 0] = 12.0 * e  # the needle
            k[plan.sinks + plan.host_tokens:, 1] = 12.0 * e  # the window
        tier.tier.write_prefill_layer(plan, layer, k, v)
        ks.append(k)
    q = torch.zeros(1, SHAPE.num_q_heads, SHAPE.head_dim)
    q[..., 0] = 8.0
    return q


@pytest.mark.parametrize("source, steps", [("prefill", 1), ("early_decode", 3)])
def test_heads_are_classified_from_their_statistics_and_counted_per_layer(gen, source, steps):
    cfg = _config(budget={"kind": "tokens", "tokens": 256},
                  predictor={"source": source, "calibration_steps": steps})
    tier = _tier(cfg)
    host = tier.attn.host
    try:
        q = _constructed(tier, gen)
        for step in range(steps):
            tier.attn.plan([0])
            for layer in range(SHAPE.n_layers):
                tier.attn.run(q if layer == 0 else 0.1 * torch.randn(q.shape, generator=gen), layer)
            classified = bool((host.heads[0].classes >= 0).all())
            assert classified == (step == steps - 1), step  # calibrating until the last step
        classes = host.head_classes()
        assert classes["retrieval"] == [[1, 0], [0, 0]]
        assert classes["streaming"] == [[0, 1], [0, 0]]
        assert classes["mixed"] == [[0, 0], [1, 1]]
    finally:
        tier.close()


def test_head_stats_on_constructed_logits():
    n = 1000
    flat = torch.zeros(2, n)  # uniform over the host: entropy 1
    peaked = torch.full((2, n), -30.0)
    peaked[:, 7] = 0.0  # one token: entropy 0
    logits = torch.cat([flat, peaked])  # kv-head 0: flat, kv-head 1: peaked (group 2)
    window = torch.tensor([float("-inf")] * 2 + [0.0, 0.0])  # kv-head 1's window as heavy as its host
    st = head_stats(logits, window, group=2)
    torch.testing.assert_close(st.far_entropy, torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(st.window_mass, torch.tensor([0.0, 0.5]), atol=1e-4, rtol=0)


def test_class_caps_keep_their_ratio_under_the_budget_section():
    fraction = {"kind": "fraction", "fraction": 0.05, "min_tokens": 16, "max_tokens": 100000}
    policy = policy_for(_config(budget=fraction))
    r, m, s = (policy.class_names.index(x) for x in ("retrieval", "mixed", "streaming"))
    # 64K context: the mean cap is 3277 tokens, above the classes' mean (1109): scaled up to it, ratio kept
    caps = policy.head_caps([r, m, s], 60000, 65536)
    assert 3 * 3277 - 3 <= sum(caps) <= 3 * 3277 and abs(caps[0] - 2 * caps[1]) <= 1 and abs(caps[1] - 4 * caps[2]) <= 3
    # class_budgets cap: their own budgets there
    capped = policy_for(_config(budget=fraction, class_budgets="cap"))
    assert capped.head_caps([r, m, s], 60000, 65536) == [2048, 1024, 256]
    assert capped.head_caps([r, m, s], 1500, 65536) == [1500, 1024, 256]  # never past the host tokens
    assert max(policy.head_caps([r, r, r], 2000, 65536)) == 2000
    # 4K context: 205 tokens a head on average, the classes' 2048 : 1024 : 256 kept
    caps = policy.head_caps([r, m, s], 3000, 4096)
    assert sum(caps) <= 3 * 205 and abs(caps[0] - 2 * caps[1]) <= 1 and abs(caps[1] - 4 * caps[2]) <= 3
    # a class of 64-token blocks gets one block at least, below its share
    coarse = policy_for(_config(budget=fraction,
                                head_classes=[{"name": "retrieval", "block_tokens": 16, "budget_tokens": 2048},
                                              {"name": "mixed", "block_tokens": 32, "budget_tokens": 1024},
                                              {"name": "streaming", "block_tokens": 64, "budget_tokens": 256}]))
    caps = coarse.head_caps([r, m, s], 3000, 4096)
    assert sum(caps) <= 3 * 205 + 64 and abs(caps[0] - 2 * caps[1]) <= 1 and caps[2] == 64
    assert policy_for(_config()).head_caps([r, s], 777, 1000) == [777, 777]  # budget all
    assert policy.calibrating_class == r


# --- the output-aware budget --------------------------------------------------------------------


def _store_chunks(k, v, S=16):
    """Per-chunk summary and sums of k, v [Hkv, n, D] as the host store keeps them (exact floats)."""
    h, n, d = k.shape
    kc, vc = k.view(h, n // S, S, d), v.view(h, n // S, S, d)
    summary = torch.stack([kc.amin(2), kc.amax(2)], dim=2)
    sums = torch.stack([kc.sum(2), vc.sum(2)], dim=2)
    return summary, sums


def _true_change(q, k, v, wk, wv, tokens):
    """Exact relative change (max over query heads) of attending window + tokens instead of window + all."""
    g = q.shape[0]
    x_all = torch.cat([q @ wk.T, q @ k.T], dim=-1).double() * SCALE
    vv = torch.cat([wv, v]).double()
    full = torch.softmax(x_all, -1) @ vv
    keep = torch.cat([torch.arange(wk.shape[0]), wk.shape[0] + tokens])
    part = torch.softmax(x_all[:, keep], -1) @ vv[keep]
    return float(((full - part).norm(dim=-1) / full.norm(dim=-1)).max()) if g else 0.0


def test_the_estimate_is_exact_where_each_chunk_holds_one_key():
    """Chunks of identical keys: the mean key's logit is every token's and the spread is 0, so the
    estimated change of every prefix equals the true one."""
    g = torch.Generator().manual_seed(5)
    h, gq, d, n, S = 2, 4, 64, 512, 16
    keys = torch.randn(h, n // S, 1, d, generator=g).expand(h, n // S, S, d).reshape(h, n, d).contiguous()
    vals = torch.randn(h, n, d, generator=g)
    wk, wv = torch.randn(h, 48, d, generator=g), torch.randn(h, 48, d, generator=g)
    q = 2 * torch.randn(h, gq, d, generator=g)
    summary, sums = _store_chunks(keys, vals)
    st = chunk_stats(q, summary, sums, torch.full((n // S,), S), sm_scale=SCALE)
    wx = torch.einsum("hgd,hwd->hgw", q, wk) * SCALE
    wl, wo = torch.logsumexp(wx, -1), torch.einsum("hgw,hwd->hgd", torch.softmax(wx, -1), wv)
    curve = prefix_curve(st, torch.arange(h), 2, n // 32, wl, wo)
    for hh in range(h):
        for k in (1, 3, 8, 15):
            blocks = curve.blocks[hh, :k]
            tokens = (blocks[:, None] * 32 + torch.arange(32)).reshape(-1)
            # within a chunk values differ: the estimate uses their mean, exact for the chunk's sum
            true = _true_change(q[hh], keys[hh], vals[hh], wk[hh], wv[hh], tokens)
            assert float(curve.change[hh, k - 1]) == pytest.approx(true, rel=1e-4, abs=1e-7), (hh, k)


def _reference_curve(q, summary, sums, counts, heads, per, k, wl, wo, sm, cap, rank):
    """The estimate's definition in float64, every chunk's mean formed: (blocks, change, share)."""
    q, mn, mx = q.double(), summary[:, :, 0].double(), summary[:, :, 1].double()
    n = counts.double()
    kmean, vmean = sums[:, :, 0].double() / n[:, None], sums[:, :, 1].double() / n[:, None]
    capf = (lambda x: cap * torch.tanh(x / cap)) if cap > 0 else (lambda x: x)
    bound = capf((torch.einsum("hgd,hcd->hgc", q.clamp(min=0), mx) + torch.einsum("hgd,hcd->hgc", q.clamp(max=0), mn))
                 * sm)
    logit = torch.einsum("hgd,hcd->hgc", q, kmean) * sm
    spread = torch.einsum("hgd,hcd->hgc", q * q, (mx - mn) ** 2 / 12) * sm ** 2
    lm = torch.minimum(capf(logit + spread / 2), bound) + torch.log(n)
    rankv = (capf(logit) if rank == "mean_key" else bound)[heads]
    lm, vmean, wl, wo = lm[heads], vmean[heads], wl[heads].double(), wo[heads].double()
    c = lm.shape[-1]
    nb = -(-c // per)
    pad = nb * per - c
    prio = torch.nn.functional.pad(rankv, (0, pad), value=float("-inf")).view(*rankv.shape[:2], nb, per)
    order = torch.topk(prio.amax(-1).amax(1), min(k, nb), dim=-1).indices
    m0 = torch.maximum(lm.amax(-1), wl)
    w, big_w = torch.exp(lm - m0[..., None]), torch.exp(wl - m0)
    full = (big_w[..., None] * wo + torch.einsum("hgc,hcd->hgd", w, vmean)) / (big_w + w.sum(-1))[..., None]
    changes, shares = [], []
    for h in range(len(heads)):
        cm, cs = big_w[h].clone(), big_w[h][:, None] * wo[h]
        ch, sh = [], []
        for b in order[h].tolist():
            ids = [x for x in range(b * per, (b + 1) * per) if x < c]
            bm = w[h][:, ids].sum(-1)
            cm, cs = cm + bm, cs + torch.einsum("gc,cd->gd", w[h][:, ids], vmean[h][ids])
            part = cs / cm[:, None]
            ch.append(float(((full[h] - part).norm(dim=-1) / full[h].norm(dim=-1)).max()))
            sh.append(float((bm / (big_w[h] + w[h].sum(-1))).max()))
        changes.append(ch)
        shares.append(sh)
    return order, torch.tensor(changes, dtype=torch.float64), torch.tensor(shares, dtype=torch.float64)


@pytest.mark.parametrize("per, cap, rank", [(1, 0.0, "mean_key"), (2, 0.0, "bound"), (4, 30.0, "mean_key"),
                                            (3, 0.0, "mean_key")])
def test_the_estimate_matches_its_float64_definition(per, cap, rank):
    """chunk_stats and prefix_curve (one product per pass over the chunks, no mean formed) against
    the estimate written out in float64 with every chunk's mean key and value, on fresh random
    chunks with a partial last block, a window, and some heads only."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    h, gq, d, c = 3, 4, 32, 37
    x = torch.randn(h, c, 16, d, generator=g) + torch.randn(h, c, 1, d, generator=g)
    summary = torch.stack([x.amin(2), x.amax(2)], 2).bfloat16()
    counts = torch.randint(1, 17, (c,), generator=g)
    mask = (torch.arange(16)[None, :, None] < counts[:, None, None]).float()
    sums = torch.stack([(x * mask).sum(2), (torch.randn(h, c, 16, d, generator=g) * mask).sum(2)], 2)
    q = 1.5 * torch.randn(h, gq, d, generator=g)
    wl, wo = torch.randn(h, gq, generator=g), torch.randn(h, gq, d, generator=g)
    heads = torch.tensor([2, 0])
    sm = d ** -0.5
    st = chunk_stats(q, summary, sums, counts, sm_scale=sm, soft_cap=cap)
    curve = prefix_curve(st, heads, per, 7, wl, wo, rank)
    order, change, share = _reference_curve(q, summary.float(), sums, counts, heads, per, 7, wl, wo, sm, cap, rank)
    assert torch.equal(curve.blocks, order)
    assert torch.allclose(curve.change, change, rtol=1e-4, atol=1e-6), (curve.change, change)
    assert torch.allclose(curve.share.double(), share, rtol=1e-4, atol=1e-7)
    assert torch.allclose(st.vsum / st.n[None, :, None], sums[:, :, 1] / counts[:, None], rtol=1e-6, atol=1e-7)


def test_the_budget_is_the_shortest_prefix_under_epsilon_within_the_cap():
    g = torch.Generator().manual_seed(6)
    h, gq, d, n, S = 2, 4, 64, 1024, 16
    keys, vals = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    keys[0, 100:116] += 3 * torch.randn(d, generator=g)  # head 0 has a few strong chunks
    q = torch.randn(h, gq, d, generator=g)
    q[0] += keys[0, 100:116].mean(0)
    summary, sums = _store_chunks(keys, vals)
    st = chunk_stats(q, summary, sums, torch.full((n // S,), S), sm_scale=SCALE)
    wl, wo = torch.full((h, gq), float("-inf")), torch.zeros(h, gq, d)
    heads = torch.arange(h)
    curve = prefix_curve(st, heads, 1, n // S, wl, wo)
    for eps in (0.3, 0.1, 0.03):
        pick = choose_blocks(st, heads, 1, torch.tensor([n // S] * h), wl, wo, epsilon=eps)
        for hh in range(h):
            k = int(pick.keep[hh])
            assert curve.change[hh, k - 1] <= eps and (k == 1 or curve.change[hh, k - 2] > eps)
    loose = choose_blocks(st, heads, 1, torch.tensor([n // S] * h), wl, wo, epsilon=0.3).keep
    assert loose[0] < loose[1]  # the peaked head needs fewer blocks for the same output change
    # head 0's strong chunk holds nearly all its mass: one block is within even 1e-9; head 1 hits its cap
    capped = choose_blocks(st, heads, 1, torch.tensor([3, 5]), wl, wo, epsilon=1e-9)
    assert capped.keep.tolist() == [1, 5]
    every = choose_blocks(st, heads, 1, torch.tensor([n // S] * h), wl, wo, epsilon=-1.0)
    assert every.keep.tolist() == [n // S] * h


def test_a_sparse_budget_trims_by_epsilon_and_stays_near_dense(gen):
    """Each kv-head of layer 0 has one strong chunk of host tokens on q's line: a loose epsilon keeps
    its one block, a tight one more; both outputs stay near dense (the strong chunk dominates)."""
    kept, err = {}, {}
    for eps in (0.2, 1e-6):
        tier = _tier(_config(budget={"kind": "tokens", "tokens": 512}, key_format="int8", output_epsilon=eps))
        try:
            tier.tier.add(0)
            plan = tier.tier.prefill(0, 1600)
            g = torch.Generator().manual_seed(11)
            full = []
            for layer in range(SHAPE.n_layers):
                k = torch.randn(1600, SHAPE.kv_heads, SHAPE.head_dim, generator=g)
                v = torch.randn(1600, SHAPE.kv_heads, SHAPE.head_dim, generator=g)
                k[4 + 16 * 43: 4 + 16 * 44, :, 0] = 28.0  # one summary chunk of the host (after 4 sinks)
                tier.tier.write_prefill_layer(plan, layer, k, v)
                full.append([k, v])
            q = torch.zeros(1, SHAPE.num_q_heads, SHAPE.head_dim)
            q[..., 0] = 2.0
            tier.attn.plan([0])
            out = tier.attn.run(q, 0)
            st = tier.attn.host.take_split_stats()
            kept[eps] = st.kept_tokens
            assert st.kept_tokens <= st.cap_tokens
            err[eps] = _rel(out, _dense(q, {0: full}, [0], 0).out)
        finally:
            tier.close()
    assert kept[0.2] == 16 * SHAPE.kv_heads < kept[1e-6]  # one 16-token block of a retrieval head each
    assert err[0.2] < 0.2 and err[1e-6] < err[0.2]


# --- the split -----------------------------------------------------------------------------------


def test_split_gives_the_gpu_the_best_blocks_until_both_finish_together():
    prio = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2])
    size = torch.full((6,), 100.0)
    # equal rates: half the bytes each, the three best blocks on the GPU
    assert split_point(prio, size, Rates(1.0, 1.0)).tolist() == [False, True, True, True, False, False]
    # a GPU path twice as fast: 4 of 6 blocks
    on = split_point(prio, size, Rates(1.0, 2.0))
    assert on.tolist() == [False, True, True, True, True, False]
    # no GPU, or a GPU rate of 0: everything on the CPU; no CPU rate: everything on the GPU
    assert not split_point(prio, size, Rates(1.0, 0.0)).any()
    assert split_point(prio, size, Rates(0.0, 1.0)).all()
    assert split_point(torch.zeros(0), torch.zeros(0), Rates(1.0, 1.0)).numel() == 0


@pytest.mark.parametrize("seed", range(5))
def test_split_finishing_times_are_within_one_block_of_each_other(seed):
    g = torch.Generator().manual_seed(seed)
    prio, size = torch.rand(200, generator=g), torch.randint(1, 50, (200,), generator=g).double() * 1024
    rates = Rates(float(torch.rand(1, generator=g)) * 1e9 + 1e8, float(torch.rand(1, generator=g)) * 1e9 + 1e8)
    on = split_point(prio, size, rates)
    t_gpu, t_cpu = size[on].sum() / rates.gpu_bytes_per_s, size[~on].sum() / rates.cpu_bytes_per_s
    worst = size.max() / min(rates)
    assert abs(float(t_gpu - t_cpu)) <= float(worst)
    if on.any() and (~on).any():
        assert prio[on].min() >= prio[~on].max()  # a priority prefix


def test_gpu_share_off_unquoted_is_off_and_other_booleans_are_refused():
    from kvtier.config import ConfigError, loads

    assert loads("policy: fluxion\nfluxion: {gpu_share: off}\n", "<t>").fluxion.gpu_share == "off"
    with pytest.raises(ConfigError, match="fluxion.gpu_share: expected 'auto' or 'off', found True"):
        loads("policy: fluxion\nfluxion: {gpu_share: on}\n", "<t>")
