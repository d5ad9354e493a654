"""The training-free `next_query` forecast of a layer's query (InfiniGen's, SparDA's): layer l's
input norm, query projection and RoPE applied to the input hidden state of the layer `lag`
before it (1: one layer early; 0: the layer's own input, which gives back its real query).

Two users, one arithmetic (`QueryForecast.query`):
- `capture.py` keeps every layer's input at the captured positions and forecasts the
  captured queries after the forward (`QueryForecast.keep_inputs`);
- the evaluation's decode hands each layer's forecast to the tiers while the layer `lag`
  before it runs (`QueryForecast.decode_hooks`): forward pre-hooks on the decoder layers
  read the layer's input and the `DecodeStep` the forward carries, and call its `forecast`.

Both take the decoder layers' `position_embeddings` (cos, sin), as Llama and Qwen2 pass them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .attention import DecodeStep, ModelShapeInfo


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ForecastModelError(ValueError):
    """A model whose layers the next_query forecast cannot read."""


class QueryForecast:
    """Each decoder layer's input_layernorm and self_attn.q_proj, applied to another layer's input."""

    def __init__(self, model, shape: ModelShapeInfo, *, lag: int = 1):
        if isinstance(lag, bool) or not isinstance(lag, int) or not 0 <= lag < shape.n_layers:
            raise ValueError(f"forecast: lag: expected a layer count in [0, {shape.n_layers}), found {lag!r}")
        try:
            self.decoder = list(model.model.layers)
            self.parts = [(lay.input_layernorm, lay.self_attn.q_proj) for lay in self.decoder]
        except AttributeError:
            raise ForecastModelError("forecast: expected a decoder whose layers have input_layernorm and "
                                     "self_attn.q_proj (Llama, Qwen2 and their kind)") from None
        self.shape, self.lag = shape, lag

    def query(self, layer: int, hidden: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """layer's query [B, Hq, S, D] after RoPE, in the model's dtype, from hidden [B, S, hidden] (the
        input of layer - lag) at the positions of rope's cos, sin [B, S, D]."""
        norm, proj = self.parts[layer]
        x = proj(norm(hidden))  # [B, S, Hq * D]
        q = x.view(x.shape[0], x.shape[1], self.shape.num_q_heads, self.shape.head_dim).transpose(1, 2)
        cos, sin = rope[0][:, None], rope[1][:, None]
        return q * cos + _rotate_half(q) * sin

    def _hooks(self, pre: Callable[[int, torch.Tensor, dict], None]) -> List:
        def hook(i):
            def run(module, args, kwargs):
                pre(i, args[0] if args else kwargs["hidden_states"], kwargs)
            return run

        return [lay.register_forward_pre_hook(hook(i), with_kwargs=True) for i, lay in enumerate(self.decoder)]

    @staticmethod
    def _rope(kwargs: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        rope = kwargs.get("position_embeddings")
        if rope is None:
            raise ForecastModelError("forecast: the decoder layers were not given position_embeddings (cos, sin)")
        return rope

    @contextlib.contextmanager
    def decode_hooks(self) -> Iterator[None]:
        """While open: at every forward whose `kvtier_step` is a DecodeStep with a `forecast`, layer
        i's pre-hook hands it layer i + lag's forecast query [B, Hq, D] (post-RoPE), before layer i
        runs; other forwards (prefill, plain attention) compute nothing."""
        last = self.shape.n_layers - self.lag

        def pre(i, hidden, kwargs):
            step = kwargs.get("kvtier_step")
            if not isinstance(step, DecodeStep) or step.forecast is None or i >= last:
                return
            if hidden.shape[1] != 1:
                raise ValueError(f"forecast: decode takes one token per row, found {hidden.shape[1]}")
            step.forecast(i + self.lag, self.query(i + self.lag, hidden, self._rope(kwargs))[:, :, 0])

        handles = self._hooks(pre)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def keep_inputs(self, start: int) -> Iterator[Callable[[Dict[int, torch.Tensor]], Dict[int, torch.Tensor]]]:
        """While open, every layer's input of batch row 0 from position `start` on is kept; yields
        the function that, after the forward, turns them into every layer's forecast [S, Hq, D] (bf16,
        on the CPU) of the queries at those positions. A layer with no layer `lag` before it holds
        its own query, taken from `own` (layer -> [S, Hq, D])."""
        inputs: Dict[int, torch.Tensor] = {}
        rope: Dict[str, torch.Tensor] = {}

        def pre(i, hidden, kwargs):
            inputs[i] = hidden[:1, start:].detach()
            if i == 0 and "position_embeddings" in kwargs:
                cos, sin = kwargs["position_embeddings"]
                rope["cos"], rope["sin"] = cos[:1, start:], sin[:1, start:]

        def forecasts(own: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
            if "cos" not in rope:
                self._rope({})
            out: Dict[int, Optional[torch.Tensor]] = {i: own.get(i) for i in range(self.lag)}
            for i in range(self.lag, len(self.decoder)):
                q = self.query(i, inputs[i - self.lag], (rope["cos"], rope["sin"]))  # [1, Hq, S, D]
                out[i] = q[0].transpose(0, 1).to("cpu", torch.bfloat16)
            return out

        handles = self._hooks(pre)
        try:
            yield forecasts
        finally:
            for h in handles:
                h.remove()


__all__ = ["ForecastModelError", "QueryForecast"]
