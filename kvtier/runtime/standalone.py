"""The tier assembled without a server: device pool, host store, engine, hybrid attention.

Benchmarks, the demo and the evaluation harness use this; the SGLang
integration assembles the same parts around the server's own pool.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._native import Engine, use_isa
from ..config import ModelShape, TierConfig
from ..policies import Policy, policy_for
from ..store import HostStore
from .device_pool import DevicePool
from .hybrid import HybridAttention, pipeline_possible
from .pipeline import default_engine_threads, pipeline_setting
from .tier import TierManager


def resolve_device(name: str) -> torch.device:
    """A --device argument: "auto" is CUDA when there is a GPU, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StandaloneTier:
    """Everything one decode loop needs; `close()` releases the engine and the store."""

    def __init__(self, config: TierConfig, shape: ModelShape, *, device, dtype=torch.bfloat16,
                 device_tokens: int, host_tokens: int = 0, sm_scale: Optional[float] = None,
                 soft_cap: float = 0.0, use_flashinfer: Optional[bool] = None):
        device = torch.device(device)
        pipeline_setting()  # a bad $KVTIER_PIPELINE fails before any memory is taken
        self.config, self.shape = config, shape
        self.policy: Policy = policy_for(config)
        self.pool = DevicePool(shape.n_layers, device_tokens, shape.kv_heads, shape.head_dim, dtype=dtype, device=device)
        offload = self.policy.offloads
        self.store: Optional[HostStore] = None
        if offload:
            pages = -(-max(host_tokens, 1) // config.window.page_tokens) + 1
            # Only policies that copy host pages to the device need page-locked
            # memory; pinning tens of GiB that the CPU engine alone reads only
            # costs (and the driver may refuse it).
            pin = device.type == "cuda" and config.host_store.pinned and self.policy.host_path == "fetch"
            self.store = HostStore(config, shape, pin_memory=pin, n_pages=pages)
        self.engine = None
        if offload and self.policy.host_path == "engine":
            use_isa(config.engine.isa.value)
            self.engine = Engine(config.engine.threads or default_engine_threads(
                use_flashinfer is not False and pipeline_possible(self.policy, device)))
        self.tier = TierManager(config, shape, self.pool.k, self.pool.v, self.store,
                                alloc_slots=self.pool.alloc, free_slots=self.pool.free, offload=offload)
        scale = shape.head_dim ** -0.5 if sm_scale is None else sm_scale
        self.attn = HybridAttention(self.policy, shape, self.tier, engine=self.engine, sm_scale=scale,
                                    soft_cap=soft_cap, use_flashinfer=use_flashinfer)

    def device_kv_bytes(self) -> int:
        per_token = 2 * self.shape.n_layers * self.shape.kv_heads * self.shape.head_dim * self.pool.k.element_size()
        return self.tier.stats().device_tokens * per_token

    def host_kv_bytes(self) -> int:
        return 0 if self.store is None else self.store.stats().used_pages * self.store.page_bytes

    def close(self) -> None:
        """Release everything; an engine error the pipelined path still held is raised after that."""
        try:
            self.attn.close()
        finally:
            if self.engine is not None:
                self.engine.close()
            if self.store is not None:
                self.store.close()
