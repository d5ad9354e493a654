"""Names and the launch error every module of the plugin shares (a leaf: imports nothing of it)."""

from __future__ import annotations

BACKEND = "kvtier"  # the decode attention backend
# Prefill reaches the same backend instance under a second name: sglang builds one backend when
# the prefill and decode names are equal, from --attention-backend on some releases.
PREFILL_BACKEND = "kvtier_prefill"
RADIX_CACHE = "kvtier"  # the --radix-cache-backend name (prefix.py)
GRAPH_MODE = "breakable"  # sglang's decode CUDA graphs that break at each attention call
CONFIG_ATTR = "_kvtier_config_yaml"  # the resolved policy YAML on the ServerArgs record
SERVING_ATTR = "_kvtier_serving"  # the ServingMode decided at launch, on the ServerArgs record


class KvTierLaunchError(ValueError):
    """The launch asks for something the tier cannot serve."""
