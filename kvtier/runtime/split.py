"""Which tokens of each request live on the device and which on the host.

A request of n tokens keeps its first ``sink_tokens`` and its recent window on
the device. Whenever the recent part exceeds ``window_tokens``, whole pages of
``page_tokens`` (counted from the end of the sinks) leave for the host, oldest
first. So the host holds positions ``[sink, sink + pages * page_tokens)`` and
the device window holds between ``window_tokens - page_tokens + 1`` and
``window_tokens`` recent tokens once anything was evicted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TierSplit(NamedTuple):
    lengths: torch.Tensor  # [B] tokens per request
    host_start: torch.Tensor  # [B] first host position (= sinks kept)
    host_end: torch.Tensor  # [B] one past the last host position

    @property
    def host_tokens(self) -> torch.Tensor:
        return self.host_end - self.host_start

    @property
    def device_tokens(self) -> torch.Tensor:
        return self.lengths - self.host_tokens

    def host_mask(self, max_len: int) -> torch.Tensor:
        pos = torch.arange(max_len, device=self.lengths.device)
        return (pos >= self.host_start[:, None]) & (pos < self.host_end[:, None])

    def device_mask(self, max_len: int) -> torch.Tensor:
        pos = torch.arange(max_len, device=self.lengths.device)
        return (pos < self.lengths[:, None]) & ~self.host_mask(max_len)


def host_pages(length: int, *, sink_tokens: int, window_tokens: int, page_tokens: int) -> int:
    """Whole pages of a request of `length` tokens that have left the window."""
    recent = length - sink_tokens
    if recent <= window_tokens:
        return 0
    return -(-(recent - window_tokens) // page_tokens)


def split_window(lengths: torch.Tensor, *, sink_tokens: int, window_tokens: int, page_tokens: int) -> TierSplit:
    """The tier split of each request under a window config."""
    if lengths.dim() != 1 or lengths.dtype not in (torch.int32, torch.int64) or bool((lengths < 0).any()):
        raise ValueError(f"lengths must be a non-negative int vector, found {lengths.dtype} {tuple(lengths.shape)}")
    if page_tokens <= 0 or window_tokens < page_tokens or sink_tokens < 0:
        raise ValueError(
            f"expected page_tokens > 0, window_tokens >= page_tokens, sink_tokens >= 0, found page_tokens="
            f"{page_tokens}, window_tokens={window_tokens}, sink_tokens={sink_tokens}"
        )
    lengths = lengths.to(torch.long)
    recent = (lengths - sink_tokens).clamp(min=0)
    over = (recent - window_tokens).clamp(min=0)
    pages = -torch.div(-over, page_tokens, rounding_mode="floor")
    start = torch.minimum(lengths, torch.full_like(lengths, sink_tokens))
    return TierSplit(lengths, start, start + pages * page_tokens)
