"""Registration with sglang: hooks through HookRegistry, the `kvtier` backend.

sglang's hook application only logs failures, so `register()` applies the
hooks at once and checks every target really changed; a missing hook aborts
the launch with a message naming it.
"""

from __future__ import annotations

import sys
from typing import Tuple

from . import admission, graphs, launch, lifecycle, prefix
from .hooks import missing_hooks, remember, slot_release_hooked, verify_hooks


def _targets():
    from sglang.srt.plugins.hook_registry import HookType

    return {
        "sglang.srt.server_args.ServerArgs.add_cli_args": (launch.add_cli_args, HookType.AFTER),
        "sglang.srt.server_args.ServerArgs.from_cli_args": (launch.from_cli_args, HookType.AROUND),
        "sglang.srt.entrypoints.engine.Engine.__init__": (launch.engine_init, HookType.BEFORE),
        "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free": (lifecycle.on_request_freed, HookType.BEFORE),
    }


def _optional_targets():
    """Hooked where this sglang has them (required then, like the others)."""
    from sglang.srt.plugins.hook_registry import HookType

    hooks = {lifecycle.FREE_KV_ROW: (lifecycle.on_free_kv_row, HookType.BEFORE),
             lifecycle.CHUNK_FINISH: (lifecycle.around_chunk_finish, HookType.AROUND)}
    # A funnel this release lacks is skipped; slot_release_hooked() says whether one of them is hooked.
    out = {target: hooks[target] for target in lifecycle.funnels_present()}
    # Stage 3's admission (the same three targets on 0.5.17 and the 0.5.23 line).
    out.update({target: (hook, HookType[kind]) for target, (hook, kind) in admission.targets().items()})
    # Breakable decode graphs: the causal LM's output type (graphs.py), where sglang has them.
    out.update({target: (hook, HookType.AROUND) for target, hook in graphs.targets().items()})
    return out


def register() -> None:
    """Entry point of the `sglang.srt.plugins` group."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from .attention import register_backend

    targets = {**_targets(), **_optional_targets()}
    for target, (hook, kind) in targets.items():
        if remember(target):
            HookRegistry.register(target, hook, kind)
    register_backend()
    prefix.register()  # the kvtier radix cache, where sglang has a radix-cache registry
    HookRegistry.apply_hooks()
    missing = missing_hooks()
    if missing:
        print("kvtier: sglang did not apply these hooks, so --kv-tier cannot work: " + ", ".join(missing)
              + ". Check that the sglang version is supported (kvtier supports 0.5.17 to 0.5.x).",
              file=sys.stderr)
        raise SystemExit(2)


__all__: Tuple[str, ...] = ("register", "missing_hooks", "slot_release_hooked", "verify_hooks")
