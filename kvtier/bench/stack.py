"""A Llama-3-8B-shaped attention stack with random weights, decoding through the tier.

Real QKV and output projections give the GPU real work per layer; with
`mlp` and `vocab` the stack also carries SwiGLU MLPs and an untied embedding
and LM head, so the device holds a whole model's weights and each step does a
whole model's GPU work (the next input is the embedding of the argmax token).
A q bias along a per-(layer, kv-head) direction, matched by runs of relevant
context keys, makes attention peaked the way trained models' is (`context_kv`,
calibrated against a real capture), so the sparse policies face a meaningful
selection problem.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from ..config import ModelShape

LLAMA3_8B = ModelShape(n_layers=32, num_q_heads=32, kv_heads=8, head_dim=128)
HIDDEN = 4096
LLAMA3_8B_MLP = 14336  # SwiGLU intermediate size
LLAMA3_8B_VOCAB = 128256


class StackWeights(NamedTuple):
    w_qkv: Sequence[torch.Tensor]  # [hidden, (Hq + 2 Hkv) * D]
    w_o: Sequence[torch.Tensor]  # [Hq * D, hidden]
    q_dir: torch.Tensor  # [L, Hkv, D] unit directions
    w_gate_up: Sequence[torch.Tensor] = ()  # [hidden, 2 * mlp] per layer; empty: attention only
    w_down: Sequence[torch.Tensor] = ()  # [mlp, hidden]
    embed: Optional[torch.Tensor] = None  # [vocab, hidden]
    head: Optional[torch.Tensor] = None  # [vocab, hidden], untied as in Llama-3-8B
    synthetic: str = "runs"  # the synthetic contexts' generator (`context_kv`)

    def nbytes(self) -> int:
        tensors = [*self.w_qkv, *self.w_o, self.q_dir, *self.w_gate_up, *self.w_down, self.embed, self.head]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_weights(shape: ModelShape, hidden: int, *, device, dtype, seed: int = 0, mlp: int = 0,
                 vocab: int = 0, synthetic: str = "runs") -> StackWeights:
    """Random weights; `mlp` > 0 adds SwiGLU MLPs, `vocab` > 0 an embedding and LM head (drawn on `device`)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d, hq, hkv = shape.head_dim, shape.num_q_heads, shape.kv_heads
    width = (hq + 2 * hkv) * d
    w_qkv = [(torch.randn(hidden, width, generator=gen) * (0.5 / hidden ** 0.5)).to(device, dtype)
             for _ in range(shape.n_layers)]
    w_o = [(torch.randn(hq * d, hidden, generator=gen) / (hq * d) ** 0.5).to(device, dtype)
           for _ in range(shape.n_layers)]
    q_dir = torch.nn.functional.normalize(torch.randn(shape.n_layers, hkv, d, generator=gen), dim=-1).to(device)
    # The large matrices are drawn where they live: a whole model's weights in float32 on the host
    # would take twice their device size in host memory the host store needs.
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1)

    def draw(rows: int, cols: int, scale: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=dev_gen, device=device, dtype=dtype).mul_(scale)

    w_gate_up = [draw(hidden, 2 * mlp, hidden ** -0.5) for _ in range(shape.n_layers)] if mlp else []
    w_down = [draw(mlp, hidden, 0.5 * mlp ** -0.5) for _ in range(shape.n_layers)] if mlp else []
    embed = draw(vocab, hidden, 1.0) if vocab else None
    head = draw(vocab, hidden, hidden ** -0.5) if vocab else None
    if synthetic not in SYNTHETIC:
        raise ValueError(f"synthetic: expected one of {list(SYNTHETIC)}, got {synthetic!r}")
    return StackWeights(w_qkv, w_o, q_dir, w_gate_up, w_down, embed, head, synthetic)


# The synthetic contexts: "runs" (the default) is calibrated against a real model's capture;
# "scattered" is the former generator (single salient tokens at random, i.i.d. values).
SYNTHETIC = ("runs", "scattered")
# runs: a smooth relevance field per (request, kv-head) (a moving average of unit noise over
# RUN_TOKENS tokens, rescaled to unit variance); where it exceeds RUN_THRESHOLD the keys gain
# RUN_GAIN * (field - threshold) along the layer's q direction (each kv-head's gain jittered by
# exp(GAIN_JITTER * N(0, 1))), so relevant tokens come in runs a few blocks long; a few single
# needles (NEEDLE_FRACTION of tokens, NEEDLE_LOGIT); and a shared direction per kv-head in the
# values (VALUE_MEAN x sqrt(D)) and the keys (KEY_MEAN x sqrt(D)), as real heads have.
# Fitted on Qwen2.5-Coder-0.5B-Instruct's K/V at 4K (niah_single; docs/benchmarks.md): host
# softmax statistics (top-256 mass 0.90 real / 0.90 here, top four 64-token blocks 0.69 / 0.80,
# host share holding 0.9 of the mass 0.075 / 0.085), then each policy's attention error within
# 2x of the capture's at the quick settings.
RUN_TOKENS, RUN_THRESHOLD, RUN_GAIN, GAIN_JITTER = 64, 1.5, 6.0, 0.5
NEEDLE_FRACTION, NEEDLE_LOGIT = 0.0005, 8.0
VALUE_MEAN, KEY_MEAN = 0.9, 1.5


def context_kv(shape: ModelShape, w: StackWeights, layer: int, n: int, *, seed: int, device, dtype,
               salient_fraction: float = 0.01, salient_logit: float = 8.0):
    """Deterministic synthetic K, V [n, Hkv, D] of one request's context at one layer (`w.synthetic`:
    "runs", calibrated against a real capture, or "scattered", salient_fraction single tokens
    gaining salient_logit)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + layer)
    hkv, d = shape.kv_heads, shape.head_dim
    k = torch.randn(n, hkv, d, generator=gen, device=device, dtype=torch.float32)
    v = torch.randn(n, hkv, d, generator=gen, device=device, dtype=torch.float32)
    direction = w.q_dir[layer][None].to(device)
    if w.synthetic == "scattered":
        salient = torch.rand(n, hkv, generator=gen, device=device) < salient_fraction
        k += salient[..., None] * direction * salient_logit
        return k.to(dtype), v.to(dtype)
    L = RUN_TOKENS
    z = torch.randn(hkv, 1, n + L - 1, generator=gen, device=device)
    field = torch.nn.functional.avg_pool1d(z, L, stride=1)[:, 0].T * L ** 0.5  # [n, hkv], unit variance
    gain = RUN_GAIN * torch.exp(GAIN_JITTER * torch.randn(hkv, generator=gen, device=device))
    boost = gain * (field - RUN_THRESHOLD).clamp(min=0)
    needle = torch.rand(n, hkv, generator=gen, device=device) < NEEDLE_FRACTION
    boost = torch.where(needle, torch.full_like(boost, NEEDLE_LOGIT), boost)
    k += boost[..., None] * direction
    shared = torch.nn.functional.normalize(torch.randn(2, hkv, d, generator=gen, device=device), dim=-1) * d ** 0.5
    v += VALUE_MEAN * shared[0]
    k += KEY_MEAN * shared[1]
    return k.to(dtype), v.to(dtype)


class Replay(NamedTuple):
    """A capture's real K, V and queries in place of the stack's (`kvtier.eval.capture`)."""

    k: torch.Tensor  # [L, N, Hkv, D]
    v: torch.Tensor
    q: torch.Tensor  # [L, S, Hq, D]: step j's query is q[:, j], its new K, V are k[:, N - S + j]

    @property
    def context(self) -> int:
        return self.k.shape[1] - self.q.shape[1]

    def step(self, layer: int, j: int, batch: int, device, dtype):
        """(q [B, Hq, D], k, v [B, Hkv, D]) of decode step j, the same for every request."""
        t = self.context + j
        return tuple(x.to(device, dtype).unsqueeze(0).expand(batch, *x.shape).contiguous()
                     for x in (self.q[layer, j], self.k[layer, t], self.v[layer, t]))


def request_kv(shape: ModelShape, w: StackWeights, layer: int, n: int, *, seed: int, device, dtype,
               replay: Optional[Replay] = None):
    """A request's first n tokens' K, V [n, Hkv, D] at one layer: the capture's, else synthetic."""
    if replay is not None:
        return replay.k[layer, :n].to(device, dtype), replay.v[layer, :n].to(device, dtype)
    return context_kv(shape, w, layer, n, seed=seed, device=device, dtype=dtype)


def fill_context(tier, shape: ModelShape, w: StackWeights, rid: int, n: int, *, device, dtype,
                 replay: Optional[Replay] = None) -> None:
    """Add request rid to a TierManager with n context tokens, every layer's K, V from `request_kv`."""
    tier.add(rid)
    plan = tier.prefill(rid, n)
    for layer in range(shape.n_layers):
        k, v = request_kv(shape, w, layer, n, seed=rid, device=device, dtype=dtype, replay=replay)
        tier.write_prefill_layer(plan, layer, k, v)


def project_qkv(x: torch.Tensor, w: StackWeights, layer: int, shape: ModelShape):
    """x [B, hidden] -> q [B, Hq, D], k, v [B, Hkv, D]; q carries the layer's bias direction."""
    b = x.shape[0]
    d, hq, hkv = shape.head_dim, shape.num_q_heads, shape.kv_heads
    qkv = x @ w.w_qkv[layer]
    q = qkv[:, : hq * d].view(b, hkv, hq // hkv, d) + (w.q_dir[layer][None, :, None, :] * d ** 0.5).to(x.dtype)
    k = qkv[:, hq * d: (hq + hkv) * d].view(b, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(b, hkv, d)
    return q.reshape(b, hq, d), k, v


def _rms(y: torch.Tensor) -> torch.Tensor:
    return y * (y.shape[1] ** 0.5 / y.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)).to(y.dtype)


def output(x: torch.Tensor, attn: torch.Tensor, w: StackWeights, layer: int) -> torch.Tensor:
    """The layer's output projection, residual and norm; then its MLP when the stack has one."""
    y = _rms(x + attn.reshape(x.shape[0], -1) @ w.w_o[layer])
    if w.w_gate_up:
        gate, up = (y @ w.w_gate_up[layer]).chunk(2, dim=-1)
        y = _rms(y + (torch.nn.functional.silu(gate) * up) @ w.w_down[layer])
    return y


def next_input(x: torch.Tensor, w: StackWeights) -> torch.Tensor:
    """The next step's input: the embedding of the greedy token when the stack has a head, else x itself."""
    if w.head is None:
        return x
    return _rms(w.embed[(x @ w.head.T).argmax(dim=-1)])
