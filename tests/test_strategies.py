"""Host strategies and the one tier assembly: a new strategy is one class, found by name."""

import pytest
import torch

from kvtier.config import from_mapping
from kvtier.policies import REGISTRY, policy_for
from kvtier.policies.builtin import Hgca
from kvtier.runtime.assembly import pin_host_store
from kvtier.runtime.hybrid.extend import host_block
from kvtier.runtime.merge import AttnPart
from kvtier.runtime.standalone import StandaloneTier
from kvtier.runtime.strategies import STRATEGIES, HostStrategy, UnknownStrategyError, register_strategy, strategy_class
from kvtier.runtime.window_attention import WindowPlan, torch_window_attention

from test_runtime import SHAPE, _check_against_dense, _config, _decode


class DequantOnDevice(HostStrategy):
    """A strategy defined outside the runtime, for these tests only: every host token of the
    layer is dequantized from the store's stored bytes and attended on the device."""

    name = "test_dequant_on_device"
    copies_pages_to_device = True
    calls = 0

    def collect(self, q, layer):
        type(self).calls += 1
        ctx, batch = self.ctx, self.batch
        T = ctx.tier.config.window.page_tokens
        outs, lses = [], []
        for i in range(len(batch.rids)):
            lo, hi = int(batch.page_offsets[i]), int(batch.page_offsets[i + 1])
            n = int(batch.n_tokens[i])
            k, v, _ = host_block(ctx.tier.store.view, layer, batch.page_table[lo:hi], n, q.device)
            plan = WindowPlan(torch.arange(n)[None, :], torch.tensor([n]), None, None)
            part = torch_window_attention(q[i: i + 1], k, v, plan, sm_scale=ctx.sm_scale, soft_cap=ctx.soft_cap)
            outs.append(part.out)
            lses.append(part.lse)
        assert hi - lo == -(-n // T)  # the batch names exactly the request's host pages
        return AttnPart(torch.cat(outs), torch.cat(lses))


register_strategy(DequantOnDevice)


class HgcaDequantOnDevice(Hgca):
    """hgca's config, answered by the test strategy: a policy class and a strategy class, nothing else."""

    strategy = DequantOnDevice.name


def test_a_new_strategy_is_one_class_and_equals_dense(gen):
    cfg = _config(host_store={"key_format": "bf16"}, budget={"kind": "tokens", "tokens": 8})
    DequantOnDevice.calls = 0
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096,
                          policy=HgcaDequantOnDevice(cfg))
    try:
        assert isinstance(tier.attn.host, DequantOnDevice) and tier.engine is None  # it asked for no engine
        rids, full = _decode(tier, gen, [40, 700], steps=5)
        assert tier.tier.stats().host_tokens > 0
        _check_against_dense(tier, gen, rids, full, 5e-3)  # every host token, exactly (bf16 keys)
        assert DequantOnDevice.calls == SHAPE.n_layers
    finally:
        tier.close()


def test_strategies_are_found_by_name_and_unknown_names_are_typed_errors():
    assert strategy_class("test_dequant_on_device") is DequantOnDevice
    for name in ("cpu_engine", "fetch_all", "window_only"):
        assert strategy_class(name).name == name and name in STRATEGIES
    with pytest.raises(UnknownStrategyError, match="no host strategy named 'no_such_strategy'; registered: "):
        strategy_class("no_such_strategy")
    with pytest.raises(ValueError, match="needs a unique name"):
        register_strategy(DequantOnDevice)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_policy_names_a_strategy(name):
    cls = strategy_class(REGISTRY[name].strategy)
    assert issubclass(cls, HostStrategy)
    # policies that never attend the host (dense keeps everything on the device) say so
    assert cls.attends_host == (name not in ("dense", "window_only"))


def test_pinned_store_follows_the_config_and_the_strategy():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fetch, engine = strategy_class("fetch_all"), strategy_class("cpu_engine")
    auto = _config()
    assert auto.host_store.pinned == "auto"
    assert pin_host_store(auto, fetch, cuda) and not pin_host_store(auto, engine, cuda)
    on, off = _config(host_store={"pinned": True}), _config(host_store={"pinned": False})
    assert pin_host_store(on, engine, cuda) and not pin_host_store(off, fetch, cuda)
    assert not any(pin_host_store(c, s, cpu) for c in (auto, on, off) for s in (fetch, engine))


@pytest.mark.parametrize("bad", ["yes", 1, "true", None])
def test_pinned_takes_true_false_or_auto_only(bad):
    from kvtier.config import ConfigError

    with pytest.raises(ConfigError, match="host_store.pinned"):
        from_mapping({"policy": "hgca", "host_store": {"pinned": bad}})


def test_only_strategies_that_need_the_engine_build_one(gen):
    """hgca (cpu_engine) builds an engine; offload_all (fetch_all) and window_only build none."""
    for name, engine in (("hgca", True), ("offload_all", False), ("window_only", False)):
        cfg = _config(name, host_store={"key_format": "bf16"}) if name != "hgca" else _config()
        tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=64, host_tokens=64)
        try:
            assert (tier.engine is not None) == engine
            assert tier.attn.host.name == policy_for(cfg).strategy
        finally:
            tier.close()
