"""Many requests through one tier: admitted at random times, decoded in interleaved batches, released
in random order; each equals the same request run alone, and every slot and page is freed once."""

import collections
import random
import secrets

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime.standalone import StandaloneTier
from kvtier.store import UnknownRequestError

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
WINDOW = {"sink_tokens": 4, "window_tokens": 32, "page_tokens": 8}  # a request of <= 36 tokens stays whole
SEED = None  # set to a failing run's seed to replay it


def _config(budget):
    return from_mapping({"policy": "hgca", "window": WINDOW, "max_context_tokens": 4096, "budget": budget,
                         "host_store": {"summary_tokens": 8}})


class _Counting(list):
    """A free list that counts, per id, how often it was handed out (pop) and given back."""

    def __init__(self, items):
        super().__init__(items)
        self.taken, self.given = collections.Counter(), collections.Counter()

    def pop(self, *args):
        item = super().pop(*args)
        self.taken[item] += 1
        return item

    def append(self, item):
        self.given[item] += 1
        super().append(item)

    def extend(self, items):
        for item in items:
            self.append(item)


class _Request:
    """One request's inputs, drawn from its own generator: the same whether it runs alone or not."""

    def __init__(self, seed: int, rid: int, length: int, steps: int):
        g = torch.Generator().manual_seed(seed * 1000 + rid)
        L, hkv, hq, d = SHAPE.n_layers, SHAPE.kv_heads, SHAPE.num_q_heads, SHAPE.head_dim
        self.rid, self.length, self.steps = rid, length, steps
        self.prompt = [(torch.randn(length, hkv, d, generator=g), torch.randn(length, hkv, d, generator=g))
                       for _ in range(L)]
        self.kv = torch.randn(steps, L, 2, hkv, d, generator=g)  # each step's new token, per layer
        self.q = torch.randn(steps, L, hq, d, generator=g)
        self.trace = []  # ("evict",) and ("step", i) after the prefill, as the shared run did them


def _tier(cfg, requests):
    return StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=4096,
                          host_tokens=sum(r.length + r.steps for r in requests))


def _prefill(tier, req):
    tier.tier.add(req.rid)
    plan = tier.tier.prefill(req.rid, req.length)
    for layer, (k, v) in enumerate(req.prompt):
        tier.tier.write_prefill_layer(plan, layer, k, v)


def _decode(tier, batch, outs):
    """One decode token for each request of batch (in that order): write its K, V, then attend."""
    for req, i in batch:
        slot = tier.tier.extend(req.rid, 1)
        for layer in range(SHAPE.n_layers):
            tier.pool.k[layer, slot] = req.kv[i, layer, 0]
            tier.pool.v[layer, slot] = req.kv[i, layer, 1]
    tier.attn.plan([req.rid for req, _ in batch])
    for layer in range(SHAPE.n_layers):
        out = tier.attn.run(torch.stack([req.q[i, layer] for req, i in batch]), layer)
        for row, (req, i) in enumerate(batch):
            outs[(req.rid, i, layer)] = out[row].clone()


def _alone(cfg, req):
    """The request by itself through a fresh tier, its evictions where the shared run made them."""
    tier, outs = _tier(cfg, [req]), {}
    try:
        _prefill(tier, req)
        for event in req.trace:
            if event[0] == "evict":
                tier.tier.evict()
            else:
                _decode(tier, [(req, event[1])], outs)
        tier.tier.release(req.rid)
    finally:
        tier.close()
    return outs


def _lengths(rng):
    """Mixed: shorter than sinks + window, about the window, and many pages past it (not page-aligned)."""
    return [rng.randint(1, 20), rng.randint(1, 35), rng.randint(30, 45), rng.randint(37, 60),
            rng.randint(61, 400), rng.randint(300, 800), rng.randint(700, 1500), rng.randint(1000, 2000)]


@pytest.mark.parametrize("budget", [{"kind": "tokens", "tokens": 48}, {"kind": "all"}])
def test_requests_in_random_order_equal_each_alone_and_free_everything_once(budget):
    seed = SEED if SEED is not None else secrets.randbits(31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    cfg = _config(budget)
    lengths = _lengths(rng)
    rng.shuffle(lengths)
    # up to 40 steps: past a window's worth of new tokens, so pages leave the window while decoding
    requests = [_Request(seed, rid, n, rng.randint(1, 40)) for rid, n in enumerate(lengths)]
    start = {req.rid: rng.randint(0, 12) for req in requests}

    tier = _tier(cfg, requests)
    pool_free, store_free = _Counting(tier.pool._free), _Counting(tier.store._free)
    tier.pool._free, tier.store._free = pool_free, store_free
    outs, live, done_steps, released = {}, [], collections.Counter(), []
    evicted_while_decoding = 0
    try:
        t = 0
        while len(released) < len(requests):
            for req in rng.sample(requests, len(requests)):  # admitted in random order
                if start[req.rid] == t:
                    _prefill(tier, req)
                    live.append(req)
            decoding = [r for r in live if done_steps[r.rid] < r.steps and rng.random() < 0.7]
            rng.shuffle(decoding)  # the batch in a random order, a random subset of the live requests
            if decoding:
                _decode(tier, [(r, done_steps[r.rid]) for r in decoding], outs)
                for r in decoding:
                    r.trace.append(("step", done_steps[r.rid]))
                    done_steps[r.rid] += 1
            evicted_while_decoding += tier.tier.evict() if decoding else 0
            for r in live:
                r.trace.append(("evict",))
            finished = [r for r in live if done_steps[r.rid] == r.steps and rng.random() < 0.5]
            for r in rng.sample(finished, len(finished)):  # released in random order, some later than others
                tier.tier.release(r.rid)
                live.remove(r)
                released.append(r.rid)
            t += 1

        msg = f"seed {seed}, lengths {lengths}, released in order {released}"
        stats = tier.store.stats()
        assert stats.free_pages == stats.total_pages and stats.requests == 0, msg
        assert sorted(store_free) == list(range(stats.total_pages)), msg
        assert store_free.taken and store_free.taken == store_free.given, f"host pages not freed once each; {msg}"
        assert sorted(pool_free) == list(range(tier.pool.n_slots)), msg
        assert pool_free.taken == pool_free.given, f"device slots not freed once each; {msg}"
        assert tier.tier.stats().device_tokens == tier.tier.stats().host_tokens == 0, msg
        assert evicted_while_decoding, f"no page left the window while decoding; {msg}"
        with pytest.raises(UnknownRequestError, match=f"request {released[0]} is not tracked"):
            tier.tier.release(released[0])  # a second release is refused and frees nothing
        assert pool_free.given == pool_free.taken and store_free.given == store_free.taken, msg
    finally:
        tier.close()

    assert len(outs) == sum(r.steps for r in requests) * SHAPE.n_layers
    for req in requests:
        alone = _alone(cfg, req)
        for i in range(req.steps):
            for layer in range(SHAPE.n_layers):
                torch.testing.assert_close(outs[(req.rid, i, layer)], alone[(req.rid, i, layer)], rtol=1e-5,
                                           atol=1e-6, msg=lambda m: f"{m}\nrequest {req.rid} ({req.length} "
                                                                    f"tokens), step {i}, layer {layer}; {msg}")
