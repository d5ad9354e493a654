"""Model shape and the host bytes it costs per token under a store config."""

from __future__ import annotations

from typing import NamedTuple, Tuple

from .sections import HostStoreConfig, KeyFormat, ValueFormat

GIB = 1 << 30
GIB_BYTES = GIB


class ModelShape(NamedTuple):
    """The attention shape that sizes the tier (one rank's heads under TP)."""

    n_layers: int
    num_q_heads: int
    kv_heads: int
    head_dim: int


class TokenBytes(NamedTuple):
    """Host bytes of one token at one layer and kv-head, by part."""

    key: float  # the quantized key with its scales (int8_channel's per page, amortised over its tokens)
    value: float  # the value with its scales
    summary: float  # the key min/max summary (bf16), amortised over a summary chunk
    sums: float  # the chunk's float32 key and value sums (the residual estimate's), amortised; 0 without


def kv_bytes(key_format: KeyFormat, value_format: ValueFormat, head_dim: int, *, key_group: int,
             page_tokens: int) -> Tuple[float, float]:
    """(key, value) bytes of one stored token at one layer and kv-head, each with its scales."""
    d = head_dim
    if key_format is KeyFormat.INT8:
        key = d + 4
    elif key_format is KeyFormat.INT8_CHANNEL:
        key = d + 4 * d / page_tokens  # bf16 scales and zero points per channel, one set per page
    elif key_format is KeyFormat.INT4:
        key = d / 2 + 4 * d / key_group
    else:
        key = 2 * d
    return key, 2 * d if value_format is ValueFormat.BF16 else d + 4


def token_bytes(store: HostStoreConfig, head_dim: int, *, chunk_sums: bool = False,
                page_tokens: int = 16) -> TokenBytes:
    """Host bytes one token takes at one layer and kv-head, by part (what a reader of each part reads)."""
    d = head_dim
    key, value = kv_bytes(store.key_format, store.value_format, d, key_group=store.key_group_channels,
                          page_tokens=page_tokens)
    summary = 2 * 2 * d / store.summary_tokens
    sums = 2 * 4 * d / store.summary_tokens if chunk_sums else 0.0
    return TokenBytes(key, value, summary, sums)


def host_bytes_per_token(store: HostStoreConfig, shape: ModelShape, *, chunk_sums: bool = False,
                         page_tokens: int = 16) -> float:
    """Host bytes one token occupies across all layers and kv-heads.

    Counts keys with their scales (int8_channel's per page, amortised over its
    page_tokens), values with theirs, the key min/max summary
    (bf16, amortised over a summary chunk) and, with chunk_sums, the chunk's
    float32 key and value sums (the residual estimate's).
    """
    tb = token_bytes(store, shape.head_dim, chunk_sums=chunk_sums, page_tokens=page_tokens)
    return sum(tb) * shape.kv_heads * shape.n_layers


def device_bytes_per_token(shape: ModelShape, dtype_bytes: int = 2) -> int:
    """Device bytes of one token's K and V across all layers (bf16 by default)."""
    return 2 * dtype_bytes * shape.head_dim * shape.kv_heads * shape.n_layers
