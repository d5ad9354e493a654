"""One way to build a tier: store, engine, host strategy, tier manager and hybrid attention.

`assemble` is used by `StandaloneTier` (the demo, the benches, the evaluation) and by
the SGLang backend's session alike, so the choices below are made once:
- the host strategy is the policy's (`Policy.strategy`), unless the caller names another;
- the host store is page-locked when `host_store.pinned` says so: `true` pins on CUDA,
  `false` never pins, `auto` pins when the strategy copies host pages to the device
  (pinning tens of GiB that only the CPU engine reads costs start-up time and gains
  nothing, and the driver may refuse it);
- the engine exists when the strategy needs one; its threads are `engine.threads`, or this
  rank's share of the cores (`ranks.rank_share`), less one (of more than two) when the
  strategy pipelines or runs beside the window on the CPU (the decoding thread keeps
  queueing, or computes the window, while the engine runs); under tensor parallelism
  its pool is pinned to the rank's cores;
- on the CPU, where the engine runs beside the window, the window's torch ops run on the
  cores the engine leaves, at least one (`ranks.core_split`; `engine.window_threads`
  overrides): the split is logged and kept as `HybridAttention.core_split`;
- the policy's `engine.isa` is applied before the engine starts;
- the policy's group sizes are checked against the model's head_dim before the store or
  the engine is built (`config.check_shape`: a ConfigError naming the field).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional, Sequence, Type, Union

import torch

from .._native import Engine, use_isa
from ..config import ModelShape, TierConfig, check_shape
from ..policies import Policy, policy_for
from ..store import HostStore
from .hybrid import HybridAttention
from .ranks import CoreSplit, RankShare, core_split, pinned_to, rank_share
from .strategies import HostStrategy, strategy_class
from .tier import TierManager

log = logging.getLogger("kvtier")


class TierParts(NamedTuple):
    """What `assemble` built; `close_parts` releases it."""

    policy: Policy
    store: Optional[HostStore]
    engine: Optional[Engine]
    tier: TierManager
    attn: HybridAttention


def pin_host_store(config: TierConfig, strategy: Type[HostStrategy], device: torch.device) -> bool:
    """Whether the host store is page-locked (see the module docstring)."""
    pinned = config.host_store.pinned
    if device.type != "cuda" or pinned is False:
        return False
    return pinned is True or strategy.copies_pages_to_device


def engine_threads(config: TierConfig, share: RankShare, leaves_core: bool) -> int:
    """Engine threads for this rank: the configured count, or its cores less one (of more than two)
    when the decoding thread keeps working while the engine runs (pipelined, or the window beside it
    on the CPU). On two cores the engine keeps both: with one it was slower than sharing a core with
    the window's one torch thread (docs/design.md, "Threads on the CPU path")."""
    threads = share.threads
    if not config.engine.threads and leaves_core and threads > 2:
        threads -= 1
    return threads


def assemble(config: TierConfig, shape: ModelShape, *, k_pool: Union[torch.Tensor, Sequence[torch.Tensor]],
             v_pool: Union[torch.Tensor, Sequence[torch.Tensor]],
             alloc_slots: Optional[Callable[[int], torch.Tensor]], free_slots: Callable[[torch.Tensor], None],
             sm_scale: float, soft_cap: float = 0.0, host_pages: Optional[int] = None, lockstep: bool = False,
             use_flashinfer: Optional[bool] = None, pipeline_default: bool = True, rank: Optional[RankShare] = None,
             policy: Optional[Policy] = None, strategy: Optional[Type[HostStrategy]] = None,
             forecasts: bool = False) -> TierParts:
    """Build the tier over a device pool (k_pool/v_pool: per layer [n_slots, Hkv, D]).

    host_pages: pages of the host store (None: as many as `host_store.capacity_gib` holds).
    alloc_slots/free_slots/lockstep: see `TierManager`. rank: this process's share of the
    host under tensor parallelism (None: the whole host, one rank). policy/strategy: override
    the config's (tests, experiments). forecasts: the caller hands layers' forecast queries
    (`HybridAttention.forecast`; only a caller that sees the model's hidden states can); a
    strategy that needs them and is not promised them is refused before anything is built.
    """
    device = k_pool[0].device
    check_shape(config, shape)
    policy = policy_for(config) if policy is None else policy
    strategy = strategy_class(policy.strategy) if strategy is None else strategy
    strategy.check(policy, forecasts=forecasts)
    offload = policy.offloads
    store = engine = tier = None
    split = CoreSplit(0, 0, 0)
    try:
        if offload:
            store = HostStore(config, shape, pin_memory=pin_host_store(config, strategy, device),
                              n_pages=host_pages or 0)
        if offload and strategy.needs_engine:
            if rank is None:
                rank = rank_share(config, tp_size=1, tp_rank=0, total_kv_heads=shape.kv_heads)
            pipelined = use_flashinfer is not False and strategy.pipelines(policy, device, pipeline_default)
            beside = strategy.runs_beside_window(policy, device)
            threads = engine_threads(config, rank, pipelined or beside)
            use_isa(config.engine.isa.value)
            with pinned_to(rank.cores[:threads] if rank.tp_size > 1 else ()):
                engine = Engine(threads)
            split = core_split(config, rank, engine.n_threads, beside)
            log.info("kvtier: %s", split.describe())
        tier = TierManager(config, shape, k_pool, v_pool, store, alloc_slots=alloc_slots, free_slots=free_slots,
                           offload=offload, lockstep=lockstep)
        attn = HybridAttention(policy, shape, tier, engine=engine, sm_scale=sm_scale, soft_cap=soft_cap,
                               use_flashinfer=use_flashinfer, pipeline_default=pipeline_default, strategy=strategy,
                               core_split=split, forecasts=forecasts)
    except BaseException:
        if engine is not None:
            engine.close()
        if store is not None:
            store.close()
        raise
    return TierParts(policy, store, engine, tier, attn)


def close_parts(parts: TierParts) -> None:
    """Release everything; an error the host strategy still held is raised after that."""
    try:
        parts.attn.close()
    finally:
        if parts.engine is not None:
            parts.engine.close()
        if parts.store is not None:
            parts.store.close()
