"""Tensor parallelism on one host: head split, core partitioning, memory checks (CPU)."""

import os
import threading

import pytest

from kvtier._native import Engine
from kvtier.config import ConfigError, from_mapping
from kvtier.runtime.ranks import check_host_memory, pinned_to, rank_kv_heads, rank_share


def test_kv_heads_split_or_replicate():
    assert rank_kv_heads(8, 2) == 4
    assert rank_kv_heads(2, 4) == 1  # more ranks than kv-heads: each holds one replica
    with pytest.raises(ValueError, match="must divide or be a multiple"):
        rank_kv_heads(6, 4)


def test_auto_threads_partition_the_cores_without_overlap():
    config = from_mapping({"policy": "hgca"})
    cpus = list(range(16))
    shares = [rank_share(config, tp_size=2, tp_rank=r, total_kv_heads=8, cpus=cpus) for r in range(2)]
    assert [s.threads for s in shares] == [8, 8]
    assert set(shares[0].cores).isdisjoint(shares[1].cores)
    assert set(shares[0].cores) | set(shares[1].cores) == set(cpus)
    assert all(s.kv_heads == 4 for s in shares)


def test_oversubscribing_threads_are_refused_with_the_field_path():
    config = from_mapping({"policy": "hgca", "engine": {"threads": 12}})
    with pytest.raises(ConfigError, match=r"engine.threads: expected at most 8 threads per rank .* found 12"):
        rank_share(config, tp_size=2, tp_rank=0, total_kv_heads=8, cpus=range(16))
    assert rank_share(config, tp_size=1, tp_rank=0, total_kv_heads=8, cpus=range(16)).threads == 12


def test_bad_rank_is_a_value_error():
    with pytest.raises(ValueError, match="tp_rank < tp_size"):
        rank_share(from_mapping({}), tp_size=2, tp_rank=2, total_kv_heads=8, cpus=range(4))


def test_host_memory_checked_across_ranks():
    config = from_mapping({"policy": "hgca", "host_store": {"capacity_gib": 40}})
    check_host_memory(config, ranks_on_host=2, available_bytes=100 << 30)
    with pytest.raises(ConfigError, match=r"host_store.capacity_gib: expected at most 33.33 GiB per rank: 3 rank"):
        check_host_memory(config, ranks_on_host=3, available_bytes=100 << 30)
    check_host_memory(from_mapping({"policy": "dense"}), ranks_on_host=8, available_bytes=1)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to show a partition")
def test_engine_threads_inherit_the_rank_cores():
    core = min(os.sched_getaffinity(0))
    seen = {}

    def probe():
        seen["mask"] = os.sched_getaffinity(0)

    before = os.sched_getaffinity(0)
    with pinned_to([core]):
        t = threading.Thread(target=probe)
        t.start()
        t.join()
        engine = Engine(1)  # its pool starts under the same mask
        engine.close()
    assert seen["mask"] == {core}
    assert os.sched_getaffinity(0) == before
