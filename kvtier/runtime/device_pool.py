"""A device KV pool of token slots, for running the tier without a server.

In SGLang the server owns this (its token-to-KV pool and allocator); the tier
only needs `k[layer]`, `v[layer]` as [n_slots, Hkv, D] and a way to free
slots. This class provides exactly that for benchmarks, the demo and the
evaluation harness.
"""

from __future__ import annotations

from typing import List

import torch


class PoolFullError(RuntimeError):
    """The device pool has fewer free slots than asked for."""


class DevicePool:
    """K and V of every layer in token slots: k[layer] is [n_slots, Hkv, D]."""

    def __init__(self, n_layers: int, n_slots: int, kv_heads: int, head_dim: int, *, dtype, device):
        # zeroed: a slot evicted before anything wrote it (a caller that only moves positions, as
        # tests do) must reach the host store as finite values, which the store insists on
        self.k = torch.zeros(n_layers, n_slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.n_slots = n_slots
        self._free: List[int] = list(range(n_slots - 1, -1, -1))

    def alloc(self, n: int) -> torch.Tensor:
        if n > len(self._free):
            raise PoolFullError(f"device pool needs {n} free slots, found {len(self._free)} of {self.n_slots}")
        ids = [self._free.pop() for _ in range(n)]
        return torch.tensor(ids, dtype=torch.long)

    def free(self, slots: torch.Tensor) -> None:
        self._free.extend(int(s) for s in slots.tolist()[::-1])

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
