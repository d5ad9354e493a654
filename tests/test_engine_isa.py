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


AMX_AFTER_TORCH = r"""
import math, sys, torch
import kvtier._native as N
from kvtier.bench.engine import build_case
N.set_isa("amx")
store, table, q, budget = build_case(4096, 4, 4, 128, 64, 256)
with N.Engine(2) as eng:
    eng.plan(store, table, torch.tensor([0, len(table)], dtype=torch.int32), torch.tensor([4096], dtype=torch.int32),
             16, budget_tokens=budget, sm_scale=1 / math.sqrt(128))
    before = eng.score(0, q).clone()
    # torch's CPU kernels on this thread: oneDNN runs bf16 on AMX where there is AMX and releases
    # the tiles afterwards; the engine must configure them again, not trust what it set last time
    a = torch.randn(256, 256).bfloat16()
    for _ in range(3):
        (a @ a).sum()
        torch.nn.functional.conv2d(torch.randn(1, 32, 16, 16).bfloat16(), torch.randn(32, 32, 3, 3).bfloat16())
    after = eng.score(0, q)
    run = eng.run(0, q)
sys.exit(0 if torch.equal(before, after) and torch.isfinite(run.out).all() else 3)
"""


@pytest.mark.skipif(not N.isa_supported("amx"), reason="needs a CPU and OS that grant AMX tile data")
def test_amx_after_torch_released_the_tiles_on_the_same_thread():
    """Tile state is per thread and other libraries configure or release it; a tile
    instruction after a release is an illegal instruction (SIGILL), so this runs in a
    child process, where a crash is a failed exit status rather than the end of the suite."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", AMX_AFTER_TORCH], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (-4: SIGILL): {r.stderr[-2000:]}"
