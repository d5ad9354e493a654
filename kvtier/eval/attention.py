"""A transformers causal LM decoding through kvtier's runtime.

The model is loaded with ``attn_implementation="kvtier"``; the attention
function registered here receives each layer's q, k, v after RoPE (HF
Llama/Qwen2 rotate k before caching, so the tier stores rotated keys, as
SGLang's pool does). What it does depends on the `TierStep` passed as the
``kvtier_step`` keyword of the model's forward:

- none: plain transformers SDPA attention (the reference path);
- `PrefillStep`: dense causal attention over the prompt (prefill stays
  full), and each layer's K, V go straight into every tier (sinks and window
  to the device pool, the rest to host pages: prefill that evicts as it goes);
- `ExtendStep`: a chunk of the prompt through the tiers, batch row i in
  tier i (prefill as SGLang's stage 3 does it): the chunk's K, V go to its
  device slots and q to `HybridAttention.run_extend`, which attends the host
  part exactly and the device tokens causally;
- `CaptureStep`: plain SDPA attention; each layer's q, k, v (after RoPE) and the
  attention output are handed to a recorder (`capture.py`: real K/V for the benches);
- `DecodeStep`: batch row i is one request in tier i. The new token's K, V
  are written to its device slot and q goes to `HybridAttention.run`; the
  tier, not any transformers cache, is the source of truth. With its
  `forecast` set and `forecast.QueryForecast.decode_hooks` open, each layer's
  forecast query arrives there one layer early (sparda's `next_query`).

Transformers' own cache is never used (``use_cache=False``); positions are
passed explicitly.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

ATTN_NAME = "kvtier"


class PrefillStep(NamedTuple):
    write: Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, k [n, Hkv, D], v [n, Hkv, D])


class ExtendStep(NamedTuple):
    # (layer, q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, D]) -> attention output [B, S, Hq, D]
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CaptureStep(NamedTuple):
    # (layer, q [Hq, S, D], k [Hkv, S, D], v [Hkv, S, D], out [S, Hq, D]) of batch row 0, after RoPE;
    # attention stays SDPA and out is its output
    record: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class DecodeStep(NamedTuple):
    # (layer, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D]) -> attention output [B, Hq, D]
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (layer, q [B, Hq, D] after RoPE): a forecast of layer's query, handed before layer runs by the
    # decoder layers' pre-hooks (`forecast.QueryForecast.decode_hooks`); None: no forecasts asked
    forecast: Optional[Callable[[int, torch.Tensor], None]] = None


def _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def kvtier_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0, *,
                     kvtier_step=None, **kwargs):
    """query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None), transformers' contract."""
    if kvtier_step is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layer = module.layer_idx
    if isinstance(kvtier_step, PrefillStep):
        if query.shape[0] != 1:
            raise ValueError(f"prefill through the tier takes one prompt, found batch {query.shape[0]}")
        kvtier_step.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if isinstance(kvtier_step, CaptureStep):
        out = _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        kvtier_step.record(layer, query[0], key[0], value[0], out[0][0])
        return out
    if isinstance(kvtier_step, ExtendStep):
        return kvtier_step.attend(layer, query, key, value).to(query.dtype), None
    if not isinstance(kvtier_step, DecodeStep):
        raise ValueError(f"kvtier_step must be a PrefillStep, ExtendStep or DecodeStep, found "
                         f"{type(kvtier_step).__name__}")
    if query.shape[2] != 1:
        raise ValueError(f"decode through the tier takes one token per row, found {query.shape[2]}")
    out = kvtier_step.attend(layer, query[:, :, 0], key[:, :, 0], value[:, :, 0])
    return out[:, None].to(query.dtype), None


def register() -> None:
    """Make ``attn_implementation="kvtier"`` known to transformers (masks as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, kvtier_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


class ModelShapeInfo(NamedTuple):
    n_layers: int
    num_q_heads: int
    kv_heads: int
    head_dim: int
    sm_scale: float


def model_shape(model) -> ModelShapeInfo:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    scale = model.model.layers[0].self_attn.scaling
    return ModelShapeInfo(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim, float(scale))


__all__ = ["ATTN_NAME", "CaptureStep", "DecodeStep", "ExtendStep", "ModelShapeInfo", "PrefillStep", "kvtier_attention", "model_shape",
           "register"]
