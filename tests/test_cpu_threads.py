"""The CPU path's split of the cores: the engine's pool beside the window's torch ops (no timing)."""

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime.assembly import engine_threads
from kvtier.runtime.hybrid import decode
from kvtier.runtime.ranks import CoreSplit, core_split, rank_share, torch_threads
from kvtier.runtime.standalone import StandaloneTier

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)


def _config(policy="hgca", engine=None, **extra):
    page = 64 if policy == "fluxion" else 16  # fluxion's blocks (up to 64 tokens) must divide the page
    data = {"policy": policy, "window": {"sink_tokens": 4, "window_tokens": 64, "page_tokens": page},
            "max_context_tokens": 4096, "budget": {"kind": "tokens", "tokens": 64}, **extra}
    if engine is not None:
        data["engine"] = engine
    return from_mapping(data)


@pytest.mark.parametrize("cores, asked, window, expect", [
    (2, 0, 0, CoreSplit(2, 2, 1)),  # two cores: the engine keeps both, the window gets one
    (16, 0, 0, CoreSplit(16, 15, 1)),  # more: the engine leaves one core to the decoding thread
    (16, 8, 0, CoreSplit(16, 8, 8)),  # an explicit engine count: the window gets the rest
    (16, 0, 3, CoreSplit(16, 15, 3)),  # engine.window_threads overrides
    (1, 0, 0, CoreSplit(1, 1, 1)),
])
def test_the_window_gets_the_cores_the_engine_leaves(cores, asked, window, expect):
    config = _config(engine={"threads": asked, "window_threads": window})
    share = rank_share(config, tp_size=1, tp_rank=0, total_kv_heads=2, cpus=range(cores))
    threads = engine_threads(config, share, leaves_core=True)
    assert core_split(config, share, threads, beside=True) == expect
    assert core_split(config, share, threads, beside=False).window == 0  # nothing beside: torch's own count


def test_ranks_split_their_own_share():
    config = _config()
    shares = [rank_share(config, tp_size=2, tp_rank=r, total_kv_heads=2, cpus=range(16)) for r in range(2)]
    assert [core_split(config, s, engine_threads(config, s, True), True) for s in shares] == [CoreSplit(8, 7, 1)] * 2


def test_torch_threads_scope_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 2):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def _window_threads_seen(monkeypatch, config, *, outside: int):
    """torch's thread count inside each decode window call (and whether the host part had been handed
    to the helper thread then), with torch at `outside` threads around the calls."""
    seen = []
    real = decode.torch_window_attention

    def probe(*args, **kwargs):
        future = getattr(tier.attn.host, "_future", None)
        seen.append((torch.get_num_threads(), future is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "torch_window_attention", probe)
    gen = torch.Generator().manual_seed(0)
    tier = StandaloneTier(config, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    before = torch.get_num_threads()
    torch.set_num_threads(outside)
    try:
        tier.tier.add(0)
        plan = tier.tier.prefill(0, 1500)
        for layer in range(SHAPE.n_layers):
            tier.tier.write_prefill_layer(plan, layer, *(torch.randn(1500, 2, 64, generator=gen) for _ in range(2)))
        tier.attn.plan([0])
        for layer in range(SHAPE.n_layers):
            tier.attn.run(torch.randn(1, 8, 64, generator=gen), layer)
            assert torch.get_num_threads() == outside  # restored after each window
        return seen, tier.attn.core_split
    finally:
        torch.set_num_threads(before)
        tier.close()


@pytest.mark.parametrize("policy", ["hgca", "fluxion"])
def test_the_window_beside_the_engine_runs_at_the_planned_count(monkeypatch, policy):
    seen, planned = _window_threads_seen(monkeypatch, _config(policy), outside=4)
    share = rank_share(_config(policy), tp_size=1, tp_rank=0, total_kv_heads=2)
    assert planned == CoreSplit(share.budget, planned.engine, max(1, share.budget - planned.engine))
    assert planned.engine >= 1 and planned.window == 1  # the default: the engine leaves the window one core
    assert seen == [(1, True)] * SHAPE.n_layers  # at the planned count, with the host part handed off


def test_an_explicit_window_count_is_used(monkeypatch):
    seen, planned = _window_threads_seen(monkeypatch, _config(engine={"window_threads": 3}), outside=1)
    assert planned.window == 3
    assert [n for n, _ in seen] == [3] * SHAPE.n_layers


def test_nothing_beside_the_window_leaves_torch_alone(monkeypatch):
    """overlap: false runs the engine after the window on the calling thread: torch keeps its count."""
    seen, planned = _window_threads_seen(monkeypatch, _config(hgca={"overlap": False}), outside=3)
    assert planned.window == 0
    assert seen == [(3, False)] * SHAPE.n_layers
