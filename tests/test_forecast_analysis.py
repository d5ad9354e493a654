"""The analysis scripts over real captures (benchmarks/sparda_forecast.py, fluxion_block_rank.py) measure
what they say: a perfect forecast recalls every block, a forecast of another query does not, and a
block ranking that is the truth recalls at least as much as any other."""

import importlib.util
import pathlib

import torch

from kvtier.eval.capture import KvCapture

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _capture(gen, n=4096, steps=3, layers=3, hkv=2, g=2, d=32, q_next=None):
    k = torch.randn(layers, n, hkv, d, generator=gen)
    k[:, 2000:2064] += 3 * torch.randn(d, generator=gen)  # a block that some queries find
    v = torch.randn(layers, n, hkv, d, generator=gen)
    q = torch.randn(layers, steps, hkv * g, d, generator=gen) * 2
    meta = {"model": "synthetic", "context": n - steps, "layers": list(range(layers))}
    cap = KvCapture(k.bfloat16(), v.bfloat16(), q.bfloat16(), d ** -0.5, meta, None, None)
    return cap._replace(q_next=q_next(cap) if q_next else None)


def test_a_perfect_forecast_recalls_every_block_and_another_querys_does_not(gen):
    sf = _script("sparda_forecast")
    perfect = sf.compare(_capture(gen, q_next=lambda c: c.q.clone()), 0.1)
    assert all(r["next_query_block_recall"] == 1.0 and r["next_query_mass_recall"] == 1.0 for r in perfect[1:])
    assert perfect[0]["next_query_block_recall"] is None  # layer 0 has no layer before it
    shuffled = sf.compare(_capture(gen, q_next=lambda c: torch.randn(c.q.shape, generator=gen).bfloat16()), 0.1)
    assert all(r["next_query_block_recall"] < 0.9 for r in shuffled[1:])
    # reuse: independent random queries from step to step share few blocks
    assert all(r["reuse_block_recall"] < 0.9 for r in shuffled)


def test_the_oracle_block_ranking_recalls_at_least_as_much_as_the_others(gen):
    fb = _script("fluxion_block_rank")
    cap = _capture(gen, n=3000, steps=2, layers=2)
    for block, frac in ((16, 0.1), (64, 0.05)):
        r = fb.recall(cap, block, frac)
        assert all(0.0 <= r[k] <= 1.0 for k in fb.RANKINGS)
        assert r["oracle"] >= max(r["bound"], r["mass"], r["mean_key"]) - 0.05, r
