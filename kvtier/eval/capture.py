"""Real keys, values and queries of a model, for the benches: attention on real data.

`capture` runs one prompt of an evaluation task through the model with plain attention
and keeps, per layer and after RoPE, every token's K and V and the queries of the
prompt's last `queries` tokens (the question, as a decode would ask it). The decode
bench replays them (`kvtier bench decode --kv FILE`): the tier holds the first
N - S tokens (the context), and decode step j appends token N - S + j's K, V and
attends with its query, exactly the model's causal attention, so a policy's speed and
its error against full attention are measured on the same real data.

The file is a torch archive of bf16 tensors (k, v [L, N, Hkv, D]; q [L, S, Hq, D]), the
model's own attention output for those queries (o [L, S, Hq, D] float32, from its SDPA
over the same keys and values: what a replay's float64 reference must agree with), and
the model's shape, softmax scale and provenance. `layers` keeps a subset of the model's
layers (`meta["layers"]` names them), for small fixtures.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import NamedTuple, Optional, Sequence, Union

import torch


class KvCapture(NamedTuple):
    k: torch.Tensor  # [L, N, Hkv, D] bf16: every token's key after RoPE
    v: torch.Tensor  # [L, N, Hkv, D] bf16
    q: torch.Tensor  # [L, S, Hq, D] bf16: the queries of the prompt's last S tokens
    sm_scale: float
    meta: dict  # model, task, context tokens, seed, layers (the model's, one per captured layer)
    o: Optional[torch.Tensor] = None  # [L, S, Hq, D] f32: the model's attention output for those queries
    # [L, S, Hq, D] bf16 (with forecast): layer l's query as forecast one layer early, layer l's query
    # projection (and RoPE) of layer l-1's input hidden state (InfiniGen's, SparDA's training-free
    # `next_query`); layer 0, which has no layer before it, holds its own query
    q_next: Optional[torch.Tensor] = None

    @property
    def context(self) -> int:
        """Tokens before the captured queries."""
        return self.k.shape[1] - self.q.shape[1]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    def save(self, path: Union[str, pathlib.Path]) -> None:
        data = {"k": self.k, "v": self.v, "q": self.q, "sm_scale": self.sm_scale, "meta": self.meta}
        if self.o is not None:
            data["o"] = self.o
        if self.q_next is not None:
            data["q_next"] = self.q_next
        torch.save(data, path)


class CaptureFileError(ValueError):
    """A capture file that is missing or not what `capture` writes."""


def load_capture(path: Union[str, pathlib.Path]) -> KvCapture:
    path = pathlib.Path(path)
    if not path.is_file():
        raise CaptureFileError(f"{path}: expected a capture file (kvtier bench capture-kv), found none")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file torch cannot read as an archive of tensors
        raise CaptureFileError(f"{path}: expected a torch archive of k, v, q tensors: {exc}") from None
    if not isinstance(data, dict) or not {"k", "v", "q", "sm_scale", "meta"} <= set(data):
        raise CaptureFileError(f"{path}: expected the keys k, v, q, sm_scale, meta")
    k, v, q = data["k"], data["v"], data["q"]
    if k.dim() != 4 or v.shape != k.shape or q.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2] or not 0 < q.shape[1] < k.shape[1]:
        raise CaptureFileError(f"{path}: expected k, v [L, N, Hkv, D] and q [L, S, Hq, D] with Hq a multiple of "
                               f"Hkv and 0 < S < N, found k {tuple(k.shape)}, v {tuple(v.shape)}, q {tuple(q.shape)}")
    o = data.get("o")
    if o is not None and (not isinstance(o, torch.Tensor) or o.shape != q.shape):
        raise CaptureFileError(f"{path}: expected o of q's shape {tuple(q.shape)}, found "
                               f"{tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__}")
    q_next = data.get("q_next")
    if q_next is not None and (not isinstance(q_next, torch.Tensor) or q_next.shape != q.shape):
        raise CaptureFileError(f"{path}: expected q_next of q's shape {tuple(q.shape)}, found "
                               f"{tuple(q_next.shape) if isinstance(q_next, torch.Tensor) else type(q_next).__name__}")
    meta = dict(data["meta"])
    layers = meta.get("layers", list(range(k.shape[0])))
    if not isinstance(layers, list) or len(layers) != k.shape[0]:
        raise CaptureFileError(f"{path}: expected meta['layers'] to name the {k.shape[0]} captured layers, found "
                               f"{layers!r}")
    return KvCapture(k, v, q, float(data["sm_scale"]), meta, o, q_next)


def capture(model_name: str, *, task: str, context: int, queries: int = 8, seed: int = 0,
            device: str = "cpu", layers: Optional[Sequence[int]] = None, forecast: bool = False,
            forecast_lag: int = 1) -> KvCapture:
    """K, V of a `context`-token prompt of `task`, the queries of its last `queries` tokens and the
    model's attention output for them; every layer, or the model's `layers` in that order. forecast:
    also each layer's next_query forecast of those queries (`KvCapture.q_next`), from the input of
    the layer `forecast_lag` before (0 recomputes each layer's own query: a check of the projection)."""
    from . import models
    from .attention import CaptureStep, model_shape
    from .forecast import QueryForecast
    from .tasks import build

    tok, model = models.load(models.resolve(model_name))
    model.to(device)
    shape = model_shape(model)
    p = build(task, tok, context, seed=seed, sample=0)
    ids = list(p.context_ids) + list(p.tail_ids)
    n = len(p.context_ids) + len(p.tail_ids) - queries
    if n <= 0:
        raise ValueError(f"capture: expected a prompt longer than {queries} tokens, found {len(ids)}")
    L = shape.n_layers
    keep = list(range(L)) if layers is None else [int(x) for x in layers]
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= x < L for x in keep):
        raise ValueError(f"capture: layers: expected distinct layers of the model's {L}, found {list(layers)}")
    ks, vs, qs, os_ = {}, {}, {}, {}

    def record(layer, q, k, v, out):  # q [Hq, S, D], k/v [Hkv, S, D], out [S, Hq, D]
        if layer not in keep:
            return
        ks[layer] = k.transpose(0, 1).to("cpu", torch.bfloat16)
        vs[layer] = v.transpose(0, 1).to("cpu", torch.bfloat16)
        qs[layer] = q[:, n:].transpose(0, 1).to("cpu", torch.bfloat16)
        os_[layer] = out[n:].to("cpu", torch.float32)

    keep_inputs = QueryForecast(model, shape, lag=forecast_lag).keep_inputs(n) if forecast else \
        contextlib.nullcontext()
    with keep_inputs as forecasts, torch.no_grad():
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, kvtier_step=CaptureStep(record),
              logits_to_keep=1)
        q_next = forecasts(qs) if forecast else None
    meta = {"model": model_name, "task": task, "context": n, "queries": queries, "seed": seed,
            "shape": [L, shape.num_q_heads, shape.kv_heads, shape.head_dim], "layers": keep}
    if forecast:
        meta["q_next"] = "layer l's q_proj and RoPE of layer l-1's input hidden state; layer 0 its own query"
    return KvCapture(torch.stack([ks[x] for x in keep]), torch.stack([vs[x] for x in keep]),
                     torch.stack([qs[x] for x in keep]), shape.sm_scale, meta, torch.stack([os_[x] for x in keep]),
                     torch.stack([q_next[x] for x in keep]) if forecast else None)


__all__ = ["CaptureFileError", "KvCapture", "capture", "load_capture"]
