"""The next_query forecast in the evaluation's model (kvtier/eval/forecast.py) on a tiny random-weight
Qwen2: the hooks compute each layer's query from another layer's input, and run_prompt hands the
forecasts to the tiers whose policy uses them."""

import functools

import pytest
import torch

pytest.importorskip("transformers", reason="needs the eval extra (pip install -e '.[eval]')")

from kvtier.config import from_mapping  # noqa: E402
from kvtier.eval.attention import CaptureStep, DecodeStep, PrefillStep, model_shape, register  # noqa: E402
from kvtier.eval.forecast import ForecastModelError, QueryForecast  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, Qwen2Config

    register()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="kvtier").eval()


def _decode_forward(model, lag, rows=2):
    """One decode forward of `rows` rows at different positions with the hooks open: (events in order,
    forecasts by layer, real queries by layer). The attention output is zero: the queries only
    depend on the layers' inputs."""
    events, forecasts, queries = [], {}, {}
    shape = model_shape(model)

    def attend(layer, q, k, v):
        events.append(("attend", layer))
        queries[layer] = q.clone()
        return torch.zeros_like(q)

    def forecast(layer, q):
        events.append(("forecast", layer))
        forecasts[layer] = q.clone()

    ids = torch.randint(0, 300, (rows, 1))
    pos = torch.tensor([[37 + 400 * i] for i in range(rows)])
    with QueryForecast(model, shape, lag=lag).decode_hooks(), torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False, kvtier_step=DecodeStep(attend, forecast))
    return events, forecasts, queries


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_with_lag_0_the_forecast_is_each_layers_own_query(tiny):
    """The same input norm, q_proj and RoPE over a layer's own input give back the query its attention
    receives, in every layer and row, each handed before that layer's attention."""
    events, forecasts, queries = _decode_forward(tiny, lag=0)
    L = model_shape(tiny).n_layers
    assert events == [e for layer in range(L) for e in (("forecast", layer), ("attend", layer))]
    for layer in range(L):
        assert forecasts[layer].shape == queries[layer].shape == (2, 4, 32)
        assert _rel(forecasts[layer], queries[layer]) < 1e-5, layer


def test_with_lag_1_layer_l_is_forecast_from_layer_l_minus_1s_input_before_it_runs(tiny):
    """Layer l's forecast arrives before layer l-1's attention; layer 0 gets none. With layer 0 made an
    identity (its attention output and MLP projected to zero), layer 1's input is layer 0's, so its
    forecast is its real query; layer 2's (after a real layer) is not."""
    L = model_shape(tiny).n_layers
    first = tiny.model.layers[0]
    saved = first.self_attn.o_proj.weight.clone(), first.mlp.down_proj.weight.clone()
    try:
        with torch.no_grad():
            first.self_attn.o_proj.weight.zero_()
            first.mlp.down_proj.weight.zero_()
        events, forecasts, queries = _decode_forward(tiny, lag=1)
    finally:
        with torch.no_grad():
            first.self_attn.o_proj.weight.copy_(saved[0])
            first.mlp.down_proj.weight.copy_(saved[1])
    assert sorted(forecasts) == list(range(1, L))
    for layer in range(1, L):
        assert events.index(("forecast", layer)) < events.index(("attend", layer - 1))
    assert _rel(forecasts[1], queries[1]) < 1e-5
    assert _rel(forecasts[2], queries[2]) > 1e-2


def test_no_forecast_is_computed_where_none_is_asked(tiny, monkeypatch):
    """Prefill, plain attention and a DecodeStep without a forecast compute no query."""
    calls = []
    monkeypatch.setattr(QueryForecast, "query", lambda self, *a: calls.append(a))
    ids = torch.randint(0, 300, (1, 6))
    with QueryForecast(tiny, model_shape(tiny)).decode_hooks(), torch.no_grad():
        tiny(input_ids=ids, use_cache=False)
        tiny(input_ids=ids, use_cache=False, kvtier_step=PrefillStep(lambda *a: None))
        tiny(input_ids=ids[:, :1], use_cache=False, kvtier_step=DecodeStep(lambda l, q, k, v: torch.zeros_like(q)))
    assert calls == []
    assert all(not lay._forward_pre_hooks for lay in tiny.model.layers)  # removed on leaving


def test_the_capture_path_with_lag_0_gives_back_the_recorded_queries(tiny):
    """keep_inputs (capture.py's forecast) with lag 0: every layer's queries at the kept positions."""
    shape = model_shape(tiny)
    own = {}

    def record(layer, q, k, v, out):
        own[layer] = q[:, 5:].transpose(0, 1).to(torch.bfloat16)

    with QueryForecast(tiny, shape, lag=0).keep_inputs(5) as forecasts, torch.no_grad():
        tiny(input_ids=torch.randint(0, 300, (1, 9)), use_cache=False, kvtier_step=CaptureStep(record))
        got = forecasts(own)
    for layer in range(shape.n_layers):
        assert got[layer].shape == (4, 4, 32) and _rel(got[layer], own[layer]) < 1e-2, layer


def test_bad_lags_and_models_are_refused(tiny):
    shape = model_shape(tiny)
    for lag in (-1, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"lag: expected a layer count in \[0, 3\)"):
            QueryForecast(tiny, shape, lag=lag)
    with pytest.raises(ForecastModelError, match="input_layernorm and self_attn.q_proj"):
        QueryForecast(torch.nn.Linear(2, 2), shape)


def _specs(budget_tokens=64):
    from kvtier.eval.runner import PolicySpec

    base = {"policy": "sparda", "window": {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16},
            "max_context_tokens": 8192, "engine": {"threads": 0}, "host_store": {"key_format": "bf16"},
            "budget": {"kind": "tokens", "tokens": budget_tokens}}
    return [PolicySpec(src, "sparda", None, from_mapping({**base, "sparda": {"block_tokens": 32,
                                                                              "forecast": {"source": src}}}))
            for src in ("reuse", "next_query")]


@pytest.mark.parametrize("lag", [1, 0])
def test_run_prompt_hands_the_next_query_tier_its_forecasts(tiny, monkeypatch, lag):
    """Through the evaluation's decode: the next_query tier gets layers 1.. forecast every step and layer
    0 falls back to reuse; the reuse tier beside it gets none. With the forecast made exact (lag 0,
    every layer forecast from its own input) the tier misses no block its real query selects, where
    reuse, a step behind, misses some."""
    from kvtier.eval import runner

    monkeypatch.setattr(runner, "QueryForecast", functools.partial(QueryForecast, lag=lag))
    ids = torch.randint(0, 300, (700,), generator=torch.Generator().manual_seed(7)).tolist()
    r = runner.run_prompt(tiny, _specs(), ids[:-4], ids[-4:], max_new_tokens=4, stop_ids=[])
    reuse, nq = r.host_reports
    L, steps = model_shape(tiny).n_layers, r.decode_steps
    assert "forecast_layer_steps" not in reuse
    assert nq["forecast_layer_steps"] == {"forecast": (L - lag) * steps, "reuse": lag * steps}
    assert reuse["blocks"]["misses"] > 0 and nq["blocks"]["hits"] > 0
    if lag == 0:
        assert nq["blocks"]["misses"] == 0, nq
