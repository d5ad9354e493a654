"""Tensor parallelism: what one rank's tier owns on a host shared by ranks, and how a rank's
cores are split between the engine and torch.

Each rank tiers only its own kv-heads, with its own host store, engine and
eviction. Ranks on one host share its CPU cores and memory, so:
- cores are partitioned: with ``engine.threads: 0`` rank r gets its own
  contiguous slice of the cores this process may use; an explicit thread
  count that would oversubscribe the cores across ranks is refused;
- ``host_store.capacity_gib`` is per rank, and all ranks' stores together
  must fit in the memory the host has available.

Within a rank, when the device is the CPU and the engine runs beside the
window's attention (on a helper thread, `HostStrategy.runs_beside_window`),
torch's intra-op pool and the engine's pool share the rank's cores: the window
runs under `torch_threads(CoreSplit.window)`, the cores the engine does not use
(at least one). Left to torch's own count, both pools took every core, and
torch's workers waiting on each other behind the engine's made a 1,088-token
window call 3-16x slower on two cores (docs/design.md, "Threads on the CPU path").
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

from ..config import ConfigError, Problem, TierConfig
from ..config.host import host_memory_available, memory_problems

__all__ = ["CoreSplit", "RankShare", "check_host_memory", "core_split", "host_memory_available", "pinned_to",
           "rank_kv_heads", "rank_share", "torch_threads"]


class RankShare(NamedTuple):
    tp_size: int
    tp_rank: int
    kv_heads: int  # this rank's kv-heads
    threads: int  # engine threads of this rank
    cores: Tuple[int, ...]  # CPUs this rank's engine threads run on
    budget: int  # CPUs this rank may use in all: its engine's, its decoding thread's and torch's


def rank_kv_heads(total_kv_heads: int, tp_size: int) -> int:
    """kv-heads one rank holds: a split when they divide, one replica when tp exceeds them."""
    if total_kv_heads % tp_size == 0:
        return total_kv_heads // tp_size
    if tp_size % total_kv_heads == 0:
        return 1
    raise ValueError(f"tensor parallel size {tp_size} must divide or be a multiple of the kv-heads "
                     f"({total_kv_heads})")


def rank_share(config: TierConfig, *, tp_size: int, tp_rank: int, total_kv_heads: int,
               cpus: Optional[Sequence[int]] = None, source: str = "<config>") -> RankShare:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"expected 0 <= tp_rank < tp_size, found tp_rank={tp_rank}, tp_size={tp_size}")
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    per_rank = max(1, len(cpus) // tp_size)
    asked = config.engine.threads
    if asked and asked * tp_size > len(cpus):
        raise ConfigError(source, [Problem(
            "engine.threads",
            f"expected at most {per_rank} threads per rank so that {tp_size} ranks share {len(cpus)} cores "
            f"without oversubscription (or 0 to split them evenly), found {asked}")])
    threads = asked or per_rank
    start = (tp_rank * per_rank) % max(len(cpus), 1)
    cores = tuple(cpus[start: start + threads]) or tuple(cpus[:threads])
    return RankShare(tp_size, tp_rank, rank_kv_heads(total_kv_heads, tp_size), threads, cores, per_rank)


class CoreSplit(NamedTuple):
    """How a rank's cores are shared between the engine's pool and torch's intra-op pool."""

    cores: int  # the rank's budget (`RankShare.budget`)
    engine: int  # engine threads (0: no engine)
    window: int  # torch threads for the window's attention while the engine runs beside it (0: torch's own count)

    def describe(self) -> str:
        if not self.engine:
            return f"{self.cores} cores: no engine"
        if not self.window:
            return f"{self.cores} cores: engine {self.engine} threads (nothing of torch's runs beside it)"
        return (f"{self.cores} cores: engine {self.engine} threads, the window's torch ops {self.window} "
                f"while the engine runs beside them")


def core_split(config: TierConfig, share: RankShare, engine_threads: int, beside: bool) -> CoreSplit:
    """The window's torch threads: `engine.window_threads`, or the cores of the rank's budget the
    engine does not use, at least one; 0 (torch's own count) when nothing runs beside the window."""
    if not engine_threads or not beside:
        return CoreSplit(share.budget, engine_threads, 0)
    window = config.engine.window_threads or max(1, share.budget - engine_threads)
    return CoreSplit(share.budget, engine_threads, window)


def check_host_memory(config: TierConfig, *, ranks_on_host: int, available_bytes: Optional[int] = None,
                      source: str = "<config>") -> None:
    """ConfigError when every rank's host store together exceeds the host's available memory."""
    have = host_memory_available() if available_bytes is None else available_bytes
    problems = memory_problems(config, ranks_on_host=ranks_on_host, available_bytes=have)
    if problems:
        raise ConfigError(source, problems)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with torch's intra-op pool at n threads (n <= 0 or the current count: untouched)."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def pinned_to(cores: Sequence[int]) -> Iterator[None]:
    """Run the body with this thread's CPU mask set to `cores`.

    Threads started inside inherit the mask: creating the engine here pins its
    pool to the rank's cores without touching the rest of the process.
    """
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
