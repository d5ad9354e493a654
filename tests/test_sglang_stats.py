"""The tier's statistics: the interval from the environment, the log line's decode-step timing,
and the Prometheus metrics.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier_sglang import launch  # noqa: E402
from sglang_kit import registered  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _free_row, _Requests, _stage2_backend  # noqa: E402


def test_stats_interval_comes_from_the_environment(monkeypatch):
    from kvtier_sglang import backend as kb

    monkeypatch.delenv("KVTIER_STATS_INTERVAL_S", raising=False)
    assert kb.stats_interval_s() == kb.STATS_EVERY_S
    monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", "0.5")
    assert kb.stats_interval_s() == 0.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", bad)
        with pytest.raises(launch.KvTierLaunchError, match="KVTIER_STATS_INTERVAL_S: expected a number of seconds > 0"):
            kb.stats_interval_s()


def test_the_statistics_line_says_where_decode_steps_spend_their_time(monkeypatch, caplog):
    """Every decode step after the first is timed from plan to plan, with its attention and
    the engine's share; a prefill in between starts the count over."""
    import logging

    from kvtier_sglang import backend as kb

    monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", "1e-9")  # a statistics line at every decode step
    torch.manual_seed(6)
    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [300, 40])
    with caplog.at_level(logging.INFO, logger="kvtier"):
        for _ in range(3):
            reqs.decode_step(backend, layer)
    lines = [r.getMessage() for r in caplog.records if "ms/step" in r.getMessage()]
    # the first step has no earlier plan to be timed from: two lines, one step each
    assert len(lines) == 2 and all(line.startswith("kvtier: decode 1 steps, ") for line in lines), lines
    from kvtier_sglang import serve_check  # it reads these lines back from a server's log

    assert serve_check.decode_steps(lines)["steps"] == 2
    t = backend.session.last_timing
    assert t["steps"] == 1 and t["step_ms"] > 0 and t["plan_ms"] > 0
    # one layer, pages on the host: the engine ran inside the attention, both inside the step
    assert 0 < t["engine_ms"] <= t["attention_ms"] < t["step_ms"]
    reqs.extend_step(backend, layer, {0: 8, 1: 8})  # a prefill chunk ends the chain of decode steps
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvtier"):
        reqs.decode_step(backend, layer)
    assert backend.session.clock.take() is None and not [r for r in caplog.records if "ms/step" in r.getMessage()]
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])


def test_prometheus_metrics_follow_the_tier(monkeypatch):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from kvtier_sglang import backend as kb
    from kvtier_sglang import metrics

    assert metrics.for_server(SimpleNamespace(enable_metrics=False)) is None
    assert metrics.enabled(SimpleNamespace(enable_metrics=True))
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "for_server", lambda server_args, registry_=None: metrics.TierMetrics(registry))
    monkeypatch.setattr(kb, "METRICS_EVERY_S", 0.0)
    torch.manual_seed(4)
    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [300, 40])
    for _ in range(3):
        reqs.decode_step(backend, layer)
    stats = backend.tier_stats()
    assert stats["slots_released"] > 0 and stats["pages_evicted"] > 0 and stats["requests"] == 2

    def value(name, suffix=""):
        return registry.get_sample_value(f"kvtier:{name}{suffix}", {"tp_rank": "0"})

    # the metrics lag the tier by at most the step that has just run its plan
    for name in ("requests", "device_tokens", "host_tokens"):
        assert value(name) == stats[name], name
    for name in ("slots_released", "bytes_d2h", "pages_evicted", "evictions_refused"):
        assert value(name, "_total") == stats[name], name
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
