"""The tier assembled without a server: device pool, host store, engine, hybrid attention.

Benchmarks, the demo and the evaluation harness use this; the SGLang integration
assembles the same parts (`assembly.assemble`) around the server's own pool.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelShape, TierConfig
from ..policies import Policy
from .assembly import assemble, close_parts
from .device_pool import DevicePool
from .pipeline import pipeline_setting


def resolve_device(name: str) -> torch.device:
    """A --device argument: "auto" is CUDA when there is a GPU, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StandaloneTier:
    """Everything one decode loop needs; `close()` releases the engine and the store.

    The host store is sized to `host_tokens` (the workload's host part), not to the
    policy's capacity, so that a small run takes small memory; `host_pages`, when given,
    sizes it instead (the demo passes what the policy's capacity holds). forecasts: the caller
    hands layers' forecast queries (`HybridAttention.forecast`), as the evaluation's model does.
    """

    def __init__(self, config: TierConfig, shape: ModelShape, *, device, dtype=torch.bfloat16,
                 device_tokens: int, host_tokens: int = 0, host_pages: Optional[int] = None,
                 sm_scale: Optional[float] = None,
                 soft_cap: float = 0.0, use_flashinfer: Optional[bool] = None, policy: Optional[Policy] = None,
                 strategy=None, forecasts: bool = False):
        device = torch.device(device)
        pipeline_setting()  # a bad $KVTIER_PIPELINE fails before any memory is taken
        self.config, self.shape = config, shape
        self.pool = DevicePool(shape.n_layers, device_tokens, shape.kv_heads, shape.head_dim, dtype=dtype, device=device)
        scale = shape.head_dim ** -0.5 if sm_scale is None else sm_scale
        self.parts = assemble(config, shape, k_pool=self.pool.k, v_pool=self.pool.v, alloc_slots=self.pool.alloc,
                              free_slots=self.pool.free, sm_scale=scale, soft_cap=soft_cap,
                              host_pages=host_pages or -(-max(host_tokens, 1) // config.window.page_tokens) + 1,
                              use_flashinfer=use_flashinfer, policy=policy, strategy=strategy, forecasts=forecasts)
        self.policy, self.store, self.engine = self.parts.policy, self.parts.store, self.parts.engine
        self.tier, self.attn = self.parts.tier, self.parts.attn

    def device_kv_bytes(self) -> int:
        per_token = 2 * self.shape.n_layers * self.shape.kv_heads * self.shape.head_dim * self.pool.k.element_size()
        return self.tier.stats().device_tokens * per_token

    def host_kv_bytes(self) -> int:
        return 0 if self.store is None else self.store.stats().used_pages * self.store.page_bytes

    def close(self) -> None:
        """Release everything; an engine error the pipelined path still held is raised after that."""
        close_parts(self.parts)
