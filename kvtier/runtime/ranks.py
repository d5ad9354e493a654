"""Tensor parallelism: what one rank's tier owns on a host shared by ranks.

Each rank tiers only its own kv-heads, with its own host store, engine and
eviction. Ranks on one host share its CPU cores and memory, so:
- cores are partitioned: with ``engine.threads: 0`` rank r gets its own
  contiguous slice of the cores this process may use; an explicit thread
  count that would oversubscribe the cores across ranks is refused;
- ``host_store.capacity_gib`` is per rank, and all ranks' stores together
  must fit in the memory the host has available.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

from ..config import ConfigError, Problem, TierConfig
from ..config.host import host_memory_available, memory_problems

__all__ = ["RankShare", "check_host_memory", "host_memory_available", "pinned_to", "rank_kv_heads", "rank_share"]


class RankShare(NamedTuple):
    tp_size: int
    tp_rank: int
    kv_heads: int  # this rank's kv-heads
    threads: int  # engine threads of this rank
    cores: Tuple[int, ...]  # CPUs this rank's engine threads run on


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
    return RankShare(tp_size, tp_rank, rank_kv_heads(total_kv_heads, tp_size), threads, cores)


def check_host_memory(config: TierConfig, *, ranks_on_host: int, available_bytes: Optional[int] = None,
                      source: str = "<config>") -> None:
    """ConfigError when every rank's host store together exceeds the host's available memory."""
    have = host_memory_available() if available_bytes is None else available_bytes
    problems = memory_problems(config, ranks_on_host=ranks_on_host, available_bytes=have)
    if problems:
        raise ConfigError(source, problems)


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
