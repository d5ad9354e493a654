"""Real keys, values and queries through the host store and the engine, per layer, against float64.

The fixtures in tests/data are small captures of real models (`kvtier bench capture-kv`; the
commands are in tests/data/README.md): a prompt of 1,536 tokens, its last 4 queries, and a few
layers, layer 0 among them, with the model's own attention output for those queries. Each is
replayed as a server would split it (64 sinks and a 256-token window exact, the whole pages
between in a host store of the policy's formats) through the policy's selection
(`kvtier.eval.replay`), and every bound below is per layer:

- budget `all`: the output error of the default key format (the issue measured 0.2 at
  Qwen2.5-Coder-0.5B's layer 0 with per-token int8 keys);
- a `mass` budget (tau 0.95, a cap above the host part): every query head's host softmax
  mass held (the issue measured 5% at layer 0 with the group's max logit);
- a budget of 10% of the host tokens: the distinct tokens a kv-head reads, and the recall of
  each query head's true top-32 host tokens.
"""

import functools
import itertools
import json
import pathlib

import pytest
import torch

from kvtier.config import HostStoreConfig, from_mapping
from kvtier.eval.capture import load_capture
from kvtier.eval.replay import replay

DATA = pathlib.Path(__file__).resolve().parent / "data"
FIXTURES = ("smollm2-135m", "qwen2.5-coder-0.5b")
WINDOW = {"sink_tokens": 64, "window_tokens": 256, "page_tokens": 16}
REDUCES = ("max", "mean", "per_qhead")

# What issue 35 found, held to the bounds below until the fixes land (strict: an xfail that
# passes fails, so each mark goes with the change that fixes it).
KNOWN = {}


def cases(kind, *axes):
    """pytest params over the product of axes, each marked strict xfail where KNOWN says so."""
    out = []
    for combo in itertools.product(*axes):
        why = KNOWN.get((kind,) + combo)
        marks = [pytest.mark.xfail(strict=True, reason=f"issue 35: {why}")] if why else []
        out.append(pytest.param(*combo, marks=marks, id="-".join(combo)))
    return out


@functools.lru_cache(maxsize=None)
def capture(name: str):
    return load_capture(DATA / f"kv-{name}.pt")


@functools.lru_cache(maxsize=None)
def run(name: str, spec: str):
    """The replay of fixture `name` under the hgca config `spec` (JSON, over the test window)."""
    data = {"policy": "hgca", "window": WINDOW, **json.loads(spec)}
    return replay(capture(name), from_mapping(data))


def spec(**kw) -> str:
    return json.dumps(kw, sort_keys=True)


def host_tokens(name: str) -> int:
    return run(name, spec(budget={"kind": "all"}, host_store={"key_format": "bf16"}))[0].host_tokens


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_the_models_own_attention(name):
    """float64 attention over the captured (bf16) q, k, v agrees with the model's own output
    (float32 SDPA over unrounded q, k, v) up to the capture's rounding: within 0.02 at the
    median layer and 0.1 at every one (Qwen's layer 0 sits at 0.08: its outlier key channels
    make logits large, so bf16 rounding of q and k shows; a capture error, RoPE missed or a
    wrong scale or layer, is off by far more)."""
    cap = capture(name)
    assert cap.o is not None and 0 in cap.meta["layers"]
    g = cap.q.shape[2] // cap.k.shape[2]
    worst = []
    for li in range(cap.n_layers):
        errs = []
        for j in range(cap.q.shape[1]):
            n = cap.context + j + 1
            q, k, v = cap.q[li, j].double(), cap.k[li, :n].double(), cap.v[li, :n].double()
            p = torch.softmax(torch.einsum("hd,nhd->hn", q, k.repeat_interleave(g, 1)) * cap.sm_scale, -1)
            o = torch.einsum("hn,nhd->hd", p, v.repeat_interleave(g, 1))
            ref = cap.o[li, j].double()
            errs.append(float((o - ref).norm() / ref.norm()))
        assert max(errs) < 0.1, (cap.meta["layers"][li], errs)
        worst.append(max(errs))
    assert sorted(worst)[len(worst) // 2] < 0.02, worst


@pytest.mark.parametrize("name", cases("budget_all", FIXTURES))
def test_budget_all_default_key_format_holds_every_layer(name):
    fmt = HostStoreConfig().key_format.value
    for r in run(name, spec(budget={"kind": "all"})):
        assert r.tokens == r.host_tokens
        assert r.rel_err <= 0.02, f"{fmt} keys, layer {r.layer}: output error {r.rel_err:.4f}"


@pytest.mark.parametrize("name", FIXTURES)
def test_budget_all_bf16_keys_hold_every_layer(name):
    for r in run(name, spec(budget={"kind": "all"}, host_store={"key_format": "bf16"})):
        assert r.rel_err <= 0.02, f"layer {r.layer}: output error {r.rel_err:.4f}"


def test_the_qwen_fixture_holds_an_outlier_layer():
    """Per-token int8 keys: layer 0's outlier channels take the int8 range of the rest (the
    fixture catches what the issue measured), while the other layers stay close."""
    rows = {r.layer: r for r in run("qwen2.5-coder-0.5b", spec(budget={"kind": "all"},
                                                                 host_store={"key_format": "int8"}))}
    assert rows[0].rel_err > 0.1
    assert min(r.rel_err for r in rows.values()) < 0.02


@pytest.mark.parametrize("reduce,name", cases("mass", REDUCES, FIXTURES))
def test_mass_budget_holds_each_query_heads_mass(reduce, name):
    """tau 0.95 under a cap above the host part: each query head keeps >= 0.9 of its host mass."""
    for r in run(name, spec(budget={"kind": "mass", "threshold": 0.95, "max_tokens": 4096},
                            hgca={"group_reduce": reduce})):
        assert r.mass >= 0.9, f"{reduce}, layer {r.layer}: a query head holds {r.mass:.3f} of its host mass"
        assert r.tokens < r.host_tokens  # a selection, not everything


@pytest.mark.parametrize("reduce,name", cases("tokens", REDUCES, FIXTURES))
def test_token_budget_counts_distinct_tokens_per_kv_head(reduce, name):
    budget = host_tokens(name) // 10
    for r in run(name, spec(budget={"kind": "tokens", "tokens": budget}, hgca={"group_reduce": reduce})):
        assert r.tokens <= budget, f"{reduce}, layer {r.layer}: a kv-head read {r.tokens} of a budget of {budget}"


@pytest.mark.parametrize("name", FIXTURES)
def test_per_query_head_selection_recalls_more_at_the_same_budget(name):
    """At 10% of the host tokens per kv-head, the union of the query heads' own rankings
    (per_qhead) finds more of each head's true top-32 than the group's max logit, at every
    layer; neither reads more tokens than the budget."""
    budget = host_tokens(name) // 10
    per_q = run(name, spec(budget={"kind": "tokens", "tokens": budget}, hgca={"group_reduce": "per_qhead"}))
    by_max = run(name, spec(budget={"kind": "tokens", "tokens": budget}, hgca={"group_reduce": "max"}))
    for a, b in zip(per_q, by_max):
        assert a.recall >= b.recall, f"layer {a.layer}: per_qhead recall {a.recall:.3f} < max's {b.recall:.3f}"
    assert sum(a.recall for a in per_q) / len(per_q) >= 0.85


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fluxion_output_change_estimate_tracks_the_truth_on_real_kv(fixture):
    """Fluxion keeps the shortest prefix of ranked blocks whose estimated output change is <= epsilon;
    on the fixtures' real keys (every layer, kv-head, 16- and 64-token blocks, prefixes of the ranking)
    the estimate follows the true change (log-log correlation), is not biased by 2x at the median,
    and where it says 0.02 the true change is within 0.04 for at least 90% of prefixes.
    (Qwen2.5-Coder-0.5B: correlation 0.95, median true/estimate 0.77, 97% of 66; SmolLM2-135M: 0.94,
    0.78, 100% of 70; on the Qwen model's 4K capture,
    every layer, 0.96, 0.76 and 98.9% of 565, layer 0 alone 83%.)"""
    from test_fluxion_real import _layer_curves

    cap = load_capture(DATA / f"kv-{fixture}.pt")
    rows = [r for layer in range(cap.n_layers) for qi in range(cap.q.shape[1]) for r in _layer_curves(cap, layer, qi)]
    est, true = torch.tensor([r[0] for r in rows]).double(), torch.tensor([r[1] for r in rows]).double()
    ok = (est > 1e-6) & (true > 1e-6)
    corr = float(torch.corrcoef(torch.stack([est[ok].log(), true[ok].log()]))[0, 1])
    ratio = float((true[ok] / est[ok]).median())
    within = est <= 0.02
    assert int(within.sum()) >= 20, int(within.sum())
    frac = float((true[within] <= 0.04).double().mean())
    assert corr > 0.8 and 0.5 < ratio < 2.0 and frac >= 0.9, (corr, ratio, frac)
