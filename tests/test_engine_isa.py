"""A policy's engine.isa: applied process-wide when the runtime builds its engine."""

import gc
import logging

import pytest
import torch
import kvtier._native as N
from kvtier.config import ModelShape, from_mapping
from kvtier.config.loader import ConfigError
from kvtier.runtime.standalone import StandaloneTier

SHAPE = ModelShape(n_layers=1, num_q_heads=4, kv_heads=2, head_dim=64)


def _config(isa):
    return from_mapping({"policy": "hgca", "max_context_tokens": 1024, "engine": {"isa": isa},
                         "window": {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16}})


def _another_isa():
    """A variant this CPU runs other than the active one (generic always runs)."""
    active = N.active_isa()
    return next(n for n in ("generic", "avx2", "avx512") if n != active and N.isa_supported(n))


@pytest.fixture
def restore_isa(monkeypatch):
    monkeypatch.delenv("KVTIER_ISA", raising=False)
    gc.collect()  # engines of earlier tests that were dropped without close()
    before = N.active_isa()
    yield before
    gc.collect()
    N.set_isa(before)


def test_policy_isa_is_applied_to_the_engine(restore_isa):
    want = _another_isa()
    tier = StandaloneTier(_config(want), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256,
                          host_tokens=1024)
    try:
        assert tier.engine is not None and N.active_isa() == want
    finally:
        tier.close()


def test_auto_keeps_the_engines_choice(restore_isa):
    tier = StandaloneTier(_config("auto"), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256,
                          host_tokens=1024)
    try:
        assert N.active_isa() == restore_isa
    finally:
        tier.close()


def test_unsupported_isa_is_a_typed_error_naming_what_runs(restore_isa):
    missing = [n for n in N.ISA_NAMES if not N.isa_supported(n)]
    if not missing:
        pytest.skip("this CPU and OS run every variant")
    with pytest.raises(N.NativeUnsupportedError, match="expected a variant this CPU and OS support .*generic"):
        StandaloneTier(_config(missing[-1]), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256,
                       host_tokens=1024)
    assert N.active_isa() == restore_isa


def test_switch_is_refused_while_an_engine_is_open(restore_isa):
    want = _another_isa()
    eng = N.Engine(1)
    try:
        with pytest.raises(N.NativeStateError, match="1 engine\\(s\\) are open"):
            N.use_isa(want)
        assert N.active_isa() == restore_isa
        assert N.use_isa(restore_isa) == restore_isa  # the variant already active: nothing to switch
    finally:
        eng.close()
    assert N.use_isa(want) == want


def test_environment_wins_with_a_warning(restore_isa, monkeypatch, caplog):
    want = _another_isa()
    monkeypatch.setenv("KVTIER_ISA", restore_isa)
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert N.use_isa(want) == restore_isa
    assert N.active_isa() == restore_isa
    assert f"engine.isa {want} is not applied: KVTIER_ISA={restore_isa}" in caplog.text


def test_isa_names_are_validated():
    assert _config("amx").engine.isa.value == "amx"
    with pytest.raises(ConfigError, match="engine.isa: expected 'auto', 'generic', .* found 'sse4'"):
        _config("sse4")
    with pytest.raises(N.NativeValueError, match="expected auto or one of generic"):
        N.use_isa("sse4")
