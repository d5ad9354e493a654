"""pytest-benchmark microbenchmarks of the engine's ops.

Run: ``pytest benchmarks/bench_engine_ops.py --benchmark-enable`` (or
``pytest benchmarks/ --benchmark-enable``; benchmarks/conftest.py collects bench_*.py).
Shape: 8 kv-heads x 4 query heads per group x 8K host tokens x d128, int8 keys.
"""

from __future__ import annotations

import math

import pytest
import torch

N = pytest.importorskip("kvtier._native")
from kvtier.bench.engine import build_case, torch_reference  # noqa: E402

TOKENS, HKV, G, D, K = 8192, 8, 4, 128, 1024


@pytest.fixture(scope="module")
def case():
    store, table, q, budget = build_case(TOKENS, HKV, G, D, 64, K)
    eng = N.Engine(0)
    yield store, table, q, budget, eng
    eng.close()
    store.close()


def _plan(case, mode="topk", prefilter=0.0, residual=False):
    store, table, q, budget, eng = case
    eng.plan(store, table, torch.tensor([0, len(table)]), torch.tensor([TOKENS]), HKV * G, mode=mode,
             budget_tokens=budget, block_tokens=torch.full((HKV,), 64, dtype=torch.int32),
             sm_scale=1 / math.sqrt(D), prefilter=prefilter, residual=residual)
    return eng, q


def test_stream_read(benchmark, case):
    eng = case[4]
    buf = torch.randint(0, 255, (HKV * TOKENS * (D + 4),), dtype=torch.uint8)
    benchmark(eng.stream_read, buf)


def test_score(benchmark, case):
    eng, q = _plan(case)
    benchmark(eng.score, 0, q)


@pytest.mark.parametrize("mode", ["topk", "mass", "blocks", "all"])
def test_run(benchmark, case, mode):
    eng, q = _plan(case, mode)
    benchmark(eng.run, 0, q)


def test_run_prefilter(benchmark, case):
    """Candidates from the summary-chunk bounds (2 x the budget), then exact top-k."""
    eng, q = _plan(case, "topk", prefilter=2.0)
    benchmark(eng.run, 0, q)


def test_run_residual(benchmark, case):
    """The same top-k, the unselected tokens added back as one mean per summary chunk."""
    eng, q = _plan(case, "topk", residual=True)
    benchmark(eng.run, 0, q)


def test_weighted_values(benchmark, case):
    eng, q = _plan(case)
    sel = eng.run(0, q, return_selection=True)
    p = torch.rand(sel.sel_index.shape)
    benchmark(eng.weighted_values, case[0], 0, sel.sel_index, p)


def test_torch_reference(benchmark, case):
    store, table, q, _, _ = case
    benchmark(torch_reference, store, table, TOKENS, q, K, 1 / math.sqrt(D))
