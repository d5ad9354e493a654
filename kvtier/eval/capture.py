"""Real keys, values and queries of a model, for the benches: attention on real data.

`capture` runs one prompt of an evaluation task through the model with plain attention
and keeps, per layer and after RoPE, every token's K and V and the queries of the
prompt's last `queries` tokens (the question, as a decode would ask it). The decode
bench replays them (`kvtier bench decode --kv FILE`): the tier holds the first
N - S tokens (the context), and decode step j appends token N - S + j's K, V and
attends with its query, exactly the model's causal attention, so a policy's speed and
its error against full attention are measured on the same real data.

The file is a torch archive of bf16 tensors (k, v [L, N, Hkv, D]; q [L, S, Hq, D]) and
the model's shape, softmax scale and provenance.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple, Union

import torch


class KvCapture(NamedTuple):
    k: torch.Tensor  # [L, N, Hkv, D] bf16: every token's key after RoPE
    v: torch.Tensor  # [L, N, Hkv, D] bf16
    q: torch.Tensor  # [L, S, Hq, D] bf16: the queries of the prompt's last S tokens

    @property
    def context(self) -> int:
        """Tokens before the captured queries."""
        return self.k.shape[1] - self.q.shape[1]
    sm_scale: float
    meta: dict  # model, task, context tokens, seed

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    def save(self, path: Union[str, pathlib.Path]) -> None:
        torch.save({"k": self.k, "v": self.v, "q": self.q, "sm_scale": self.sm_scale, "meta": self.meta}, path)


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
    return KvCapture(k, v, q, float(data["sm_scale"]), dict(data["meta"]))


def capture(model_name: str, *, task: str, context: int, queries: int = 8, seed: int = 0,
            device: str = "cpu") -> KvCapture:
    """K, V of a `context`-token prompt of `task` and the queries of its last `queries` tokens."""
    from . import models
    from .attention import CaptureStep, model_shape
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
    ks, vs, qs = [None] * L, [None] * L, [None] * L

    def record(layer, q, k, v):  # q [Hq, S, D], k/v [Hkv, S, D]
        ks[layer] = k.transpose(0, 1).to("cpu", torch.bfloat16)
        vs[layer] = v.transpose(0, 1).to("cpu", torch.bfloat16)
        qs[layer] = q[:, n:].transpose(0, 1).to("cpu", torch.bfloat16)

    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, kvtier_step=CaptureStep(record),
              logits_to_keep=1)
    meta = {"model": model_name, "task": task, "context": n, "queries": queries, "seed": seed,
            "shape": [L, shape.num_q_heads, shape.kv_heads, shape.head_dim]}
    return KvCapture(torch.stack(ks), torch.stack(vs), torch.stack(qs), shape.sm_scale, meta)


__all__ = ["CaptureFileError", "KvCapture", "capture", "load_capture"]
