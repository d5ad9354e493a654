"""Prometheus metrics of the tier, beside sglang's own, when the server runs with `--enable-metrics`.

sglang points prometheus_client at a multiprocess directory before it starts
the schedulers, and its HTTP `/metrics` endpoint merges what every process
wrote there; the gauges and counters below, created in the scheduler, are
served by that same endpoint. Labelled by TP rank: each rank tiers its own
kv-heads.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional

log = logging.getLogger("kvtier")

# name -> (kind, help); counters take the increase of a running total
METRICS = {
    "requests": ("gauge", "Requests the tier holds."),
    "device_tokens": ("gauge", "Tokens of those requests resident on the GPU (sinks and windows)."),
    "host_tokens": ("gauge", "Tokens attendable from the host store."),
    "slots_released": ("counter", "Device KV slots of evicted pages returned to sglang's allocator."),
    "bytes_d2h": ("counter", "Bytes of KV copied from the GPU to the host store."),
    "pages_evicted": ("counter", "Pages evicted to the host store."),
    "evictions_refused": ("counter", "Decode steps whose eviction the full host store refused."),
    "cached_host_tokens": ("gauge", "Tokens the kvtier radix cache keeps on the host store for later prefix hits."),
    "prefix_hit_host_tokens": ("counter", "Host tokens of cached prefixes that new requests attended in place."),
}

_LOCK = threading.Lock()
_BY_REGISTRY: Dict[int, "TierMetrics"] = {}


def enabled(server_args) -> bool:
    """Whether sglang was launched with --enable-metrics (a server argument up to 0.5.17, later a config bag)."""
    value = getattr(server_args, "enable_metrics", None)
    if value is not None:
        return bool(value)
    try:
        from sglang.srt.runtime_context import get_observability

        return bool(get_observability().enable_metrics)
    except Exception:
        return False


class TierMetrics:
    """One set of metrics per registry (metric names may be registered once per process)."""

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = registry if registry is not None else REGISTRY
        self._metrics = {}
        for name, (kind, help_text) in METRICS.items():
            if kind == "gauge":
                self._metrics[name] = Gauge(f"kvtier:{name}", help_text, ["tp_rank"], registry=registry,
                                            multiprocess_mode="mostrecent")
            else:
                self._metrics[name] = Counter(f"kvtier:{name}", help_text, ["tp_rank"], registry=registry)
        self._last: Dict[tuple, float] = {}

    @classmethod
    def for_registry(cls, registry=None) -> "TierMetrics":
        with _LOCK:
            key = id(registry)
            if key not in _BY_REGISTRY:
                _BY_REGISTRY[key] = cls(registry)
            return _BY_REGISTRY[key]

    def update(self, tp_rank: int, stats: Dict[str, float]) -> None:
        """stats: the backend's tier_stats() (running totals for the counters)."""
        label = str(tp_rank)
        for name, (kind, _) in METRICS.items():
            if name not in stats:
                continue
            value = float(stats[name])
            metric = self._metrics[name].labels(tp_rank=label)
            if kind == "gauge":
                metric.set(value)
                continue
            last = self._last.get((name, label), 0.0)
            if value > last:
                metric.inc(value - last)
            self._last[(name, label)] = max(value, last)


def for_server(server_args, registry=None) -> Optional[TierMetrics]:
    """The tier's metrics when the server exports metrics, else None (logged once if prometheus_client is missing)."""
    if not enabled(server_args):
        return None
    try:
        return TierMetrics.for_registry(registry)
    except ImportError:
        log.warning("kvtier: --enable-metrics is on but prometheus_client is not installed; no kvtier metrics")
        return None


__all__ = ["METRICS", "TierMetrics", "enabled", "for_server"]
