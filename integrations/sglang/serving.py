"""How this server runs the tier, decided once: the stage, the prefix cache, the decode graphs.

Stages (docs/design.md's sequencing):
- 1: the merge runs while evicted pages keep their device slots too;
- 2: evicted slots go back to sglang's allocator (a row-freeing funnel is hooked, the
     radix cache is off or is kvtier's own, sglang's page size divides the tier's pages);
- 3: on top of 2, prefill chunks come to the tier and evict as they go.

`decide` reads the resolved server arguments, the policy and this process's hooks.
The launch decides on the ServerArgs it built and attaches the record (it is pickled
to the scheduler processes with them); a backend whose server arguments carry none
(the Python API, tests) decides with the same function, from the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from kvtier.config import TierConfig

from .hooks import slot_release_hooked
from .names import GRAPH_MODE, PREFILL_BACKEND, RADIX_CACHE, SERVING_ATTR, KvTierLaunchError


@dataclasses.dataclass(frozen=True)
class ServingMode:
    stage: int  # 1, 2 or 3; 0 when the policy keeps every token on the device (the tier is off)
    why_not_higher: Optional[str]  # why the stage is not the next one up (None at 3, or 0)
    prefix_cache: bool  # the kvtier radix cache keeps finished requests, host pages included
    graph_mode: str  # the decode CUDA graph backend this server resolved

    @property
    def releases_slots(self) -> bool:
        return self.stage >= 2

    @property
    def stage3(self) -> bool:
        return self.stage == 3


def can_release_slots(config: TierConfig) -> bool:
    """Whether evicted slots can go back to sglang at all: an offloading policy and a hooked funnel."""
    return config.offloads and slot_release_hooked()


def prefix_cache_selected(server_args: Any) -> bool:
    """Whether this server runs the kvtier radix cache (prefix.py) with the radix cache on."""
    return (not getattr(server_args, "disable_radix_cache", True)
            and getattr(server_args, "radix_cache_backend", None) == RADIX_CACHE)


def decode_graph_mode(server_args: Any) -> str:
    """The decode CUDA graph backend this server resolved ("full" when it says nothing)."""
    phase = getattr(getattr(server_args, "cuda_graph_config", None), "decode", None)
    mode = getattr(phase, "backend", None) or getattr(server_args, "cuda_graph_backend_decode", None)
    if mode is None and getattr(server_args, "disable_cuda_graph", False):
        mode = "disabled"
    return str(mode or "full")


def why_slots_stay(server_args: Any, config: TierConfig, page_size: int, *, can_free: bool = True) -> Optional[str]:
    """None when evicted device slots can go back to sglang (stage 2), else why not."""
    win = config.window
    if not config.offloads:
        return "the policy keeps every token on the device"
    if not slot_release_hooked():
        return ("this sglang release frees rows through neither BasePrefixCache.free_kv_row nor "
                "ChunkCache.cache_finished_req, which kvtier hooks")
    if not can_free:
        return "the model runner has no token allocator with free()"
    if not getattr(server_args, "disable_radix_cache", False) and not prefix_cache_selected(server_args):
        return "the radix cache is on, and a prefix hit must never reach a freed slot"
    if win.sink_tokens % page_size or win.page_tokens % page_size:
        return (f"sglang's page size {page_size} does not divide window.sink_tokens "
                f"{win.sink_tokens} and window.page_tokens {win.page_tokens}")
    return None


def decide(server_args: Any, config: TierConfig, *, page_size: Optional[int] = None,
           can_free: bool = True) -> ServingMode:
    """The serving mode for these resolved server arguments (page_size: sglang's; default theirs)."""
    graphs = decode_graph_mode(server_args)
    if not config.offloads:
        return ServingMode(0, None, False, graphs)
    size = int(page_size or getattr(server_args, "page_size", None) or 1)
    why = why_slots_stay(server_args, config, size, can_free=can_free)
    if why is not None:
        return ServingMode(1, why, False, graphs)
    prefill = getattr(server_args, "prefill_attention_backend", None)
    if prefill != PREFILL_BACKEND:
        return ServingMode(2, f"prefill runs on --prefill-attention-backend {prefill}, not through the tier",
                           False, graphs)
    return ServingMode(3, None, prefix_cache_selected(server_args), graphs)


def attach(server_args: Any, mode: ServingMode) -> None:
    try:
        setattr(server_args, SERVING_ATTR, mode)
    except (AttributeError, TypeError):
        object.__setattr__(server_args, SERVING_ATTR, mode)


def attached(server_args: Any) -> Optional[ServingMode]:
    return getattr(server_args, SERVING_ATTR, None) if server_args is not None else None


def mode_for(server_args: Any, config: TierConfig, *, page_size: int, can_free: bool) -> ServingMode:
    """The mode the launch attached, checked against this process; else decided here.

    A record that says slots go back while this process cannot free them (its hooks or its
    allocator differ from the launch's) is refused rather than silently downgraded: the
    scheduler's admission was set up for the recorded stage.
    """
    mode = attached(server_args)
    if mode is None:
        return decide(server_args, config, page_size=page_size, can_free=can_free)
    if mode.releases_slots:
        why = why_slots_stay(server_args, config, page_size, can_free=can_free)
        if why is not None:
            raise KvTierLaunchError(f"the launch chose serving stage {mode.stage}, but this process cannot give "
                                    f"evicted slots back: {why}")
    return mode


__all__ = ["GRAPH_MODE", "ServingMode", "attach", "attached", "can_release_slots", "decide", "decode_graph_mode",
           "mode_for", "prefix_cache_selected", "why_slots_stay"]
