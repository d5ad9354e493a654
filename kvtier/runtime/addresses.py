"""Host addresses in a server's row table: how a cached prefix names host-resident tokens.

A server that keys cached prefixes by its row values (sglang's radix cache) can keep a
request whose middle left the device: in place of each freed device slot the row holds
that token's host address as a negative number (`encode`: -1 - (page * page_tokens +
offset)). The tier's layout of a usable prefix is: device slots for the sinks, host
addresses of whole pages in order (each page's offsets 0..T-1), then device slots.
"""

from __future__ import annotations

import torch


def encode(addresses: torch.Tensor) -> torch.Tensor:
    """Host addresses (page * page_tokens + offset, >= 0) as row values (< 0)."""
    return -1 - addresses


def decode(values: torch.Tensor) -> torch.Tensor:
    """Row values < 0 back to host addresses."""
    return -1 - values


def host_run(values: torch.Tensor, sink_tokens: int) -> int:
    """Length of the run of host addresses right after the sinks (row values, CPU int)."""
    rest = values[sink_tokens:] < 0
    return rest.numel() if bool(rest.all()) else int(rest.to(torch.int8).argmin())


def usable_prefix(values: torch.Tensor, sink_tokens: int, page_tokens: int) -> int:
    """How much of a cached prefix (its row values, CPU int) the tier can take over.

    Anything but the layout above ends the usable part: a host address among the
    sinks, a partial page, a page whose offsets are out of order, a second run of host
    addresses.
    """
    n = values.numel()
    host = values < 0
    head = min(n, sink_tokens)
    if bool(host[:head].any()):
        return int(host[:head].to(torch.int8).argmax())
    if n <= sink_tokens:
        return n
    run = host_run(values, sink_tokens)
    pages = run // page_tokens
    if pages:
        addr = decode(values[sink_tokens: sink_tokens + pages * page_tokens]).view(pages, page_tokens)
        ok = (addr % page_tokens == torch.arange(page_tokens)) & (addr // page_tokens == addr[:, :1] // page_tokens)
        good = ok.all(dim=1)
        if not bool(good.all()):
            pages = int((~good).to(torch.int8).argmax())
    if pages * page_tokens < run:  # a partial or out-of-order page ends the prefix there
        return sink_tokens + pages * page_tokens
    tail = host[sink_tokens + run:]
    if bool(tail.any()):  # device slots, then host addresses again
        return sink_tokens + run + int(tail.to(torch.int8).argmax())
    return n


__all__ = ["decode", "encode", "host_run", "usable_prefix"]
