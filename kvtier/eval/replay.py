"""A capture's real K, V and queries replayed through a policy's host store and engine, per layer.

The tier splits each captured prompt as a server would: the first `sink_tokens` and the
recent window stay exact (float64 here, as the device attends them), the whole pages
between go to a host store of the policy's formats, and the engine answers each query's
host part with the policy's selection (`Policy.engine_args`). Every number is against
float64 attention over the captured (bf16) keys and values:

- ``rel_err``: ``||o - o_full|| / ||o_full||`` of the merged output over all query heads;
- ``recall``: the share of each query head's true top-32 host tokens (exact logits) the
  engine attended (mean over heads, and the smallest);
- ``mass``: the share of each query head's softmax mass over the host tokens (exact
  logits) that its attended host tokens hold;
- ``tokens``: distinct host tokens read per (request, kv-head): the budget as the store
  sees it, whatever the group reduction.

Each captured query j attends tokens ``[0, context + j]`` (causal), so the window grows
by j while the host pages stay the same. Layers are the capture's own (`meta["layers"]`
names the model's).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch

from .._native import Engine, HostStoreView
from ..config import TierConfig
from ..policies import policy_for
from .capture import KvCapture

HOST_TOP_K = 32


class LayerReplay(NamedTuple):
    layer: int  # the model's layer
    rel_err: float  # worst over the captured queries
    recall: float  # mean over query heads and queries
    recall_min: float  # smallest over query heads and queries
    mass: float  # smallest over query heads and queries
    mass_mean: float  # mean over query heads and queries
    tokens: int  # most distinct host tokens one kv-head read
    host_tokens: int  # host tokens of the request (the last query's)


class Split(NamedTuple):
    sinks: int
    host_end: int  # host tokens are [sinks, host_end): whole pages


def split_of(config: TierConfig, n: int) -> Split:
    """Where a request of n tokens lies under config's window: sinks, host pages, window."""
    w = config.window
    if n <= w.sink_tokens + w.window_tokens:
        return Split(min(n, w.sink_tokens), min(n, w.sink_tokens))
    pages = (n - w.sink_tokens - w.window_tokens) // w.page_tokens
    return Split(w.sink_tokens, w.sink_tokens + pages * w.page_tokens)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm: float):
    """float64 attention of q [Hq, D] over k, v [n, Hkv, D]: (out [Hq, D], lse [Hq])."""
    g = q.shape[0] // k.shape[1]
    logits = torch.einsum("hd,nhd->hn", q, k.repeat_interleave(g, dim=1)) * sm
    if logits.shape[1] == 0:
        return torch.zeros_like(q), torch.full((q.shape[0],), -math.inf, dtype=q.dtype)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.einsum("hn,nhd->hd", torch.exp(logits - lse[:, None]), v.repeat_interleave(g, dim=1)), lse


def _merge(a, b):
    (oa, la), (ob, lb) = a, b
    lse = torch.logaddexp(la, lb)
    wa = torch.where(torch.isinf(la), torch.zeros_like(la), torch.exp(la - lse))
    wb = torch.where(torch.isinf(lb), torch.zeros_like(lb), torch.exp(lb - lse))
    return wa[:, None] * oa + wb[:, None] * ob, lse


def _store(config: TierConfig, k: torch.Tensor, v: torch.Tensor, split: Split) -> HostStoreView:
    """A one-request store of config's formats holding tokens [sinks, host_end) of every layer."""
    hs = config.host_store
    L, _, hkv, d = k.shape
    T = config.window.page_tokens
    pages = (split.host_end - split.sinks) // T
    view = HostStoreView.allocate(n_layers=L, n_pages=max(pages, 1), kv_heads=hkv, page_tokens=T, head_dim=d,
                                  key_format=hs.key_format.value, value_format=hs.value_format.value,
                                  key_group=hs.key_group_channels, summary_tokens=hs.summary_tokens,
                                  chunk_sums=config.chunk_sums)
    if pages:
        ids = torch.arange(pages, dtype=torch.int32)
        for layer in range(L):
            def paged(x):  # [n, Hkv, D] -> [pages, Hkv, T, D]
                return x[split.sinks: split.host_end].reshape(pages, T, hkv, d).transpose(1, 2).contiguous()
            view.append(layer, ids, paged(k[layer]), paged(v[layer]))
    return view


def replay(cap: KvCapture, config: TierConfig, *, threads: int = 0, layers: Optional[Sequence[int]] = None,
           top_k: int = HOST_TOP_K) -> List[LayerReplay]:
    """Per layer of the capture (or the given indices into it): the policy's fidelity on its queries."""
    L, N, hkv, d = cap.k.shape
    S, hq = cap.q.shape[1], cap.q.shape[2]
    g = hq // hkv
    model_layers = cap.meta.get("layers", list(range(L)))
    split = split_of(config, cap.context + 1)
    nh = split.host_end - split.sinks
    policy = policy_for(config)
    args = policy.engine_args([nh], [cap.context + 1], hkv)
    budgets = [[int(min(c, max(nh, 1))) for c in row] for row in args.budgets]
    view = _store(config, cap.k, cap.v, split)
    engine = Engine(threads)
    out: List[LayerReplay] = []
    try:
        pages = nh // config.window.page_tokens
        engine.plan(view, torch.arange(max(pages, 1), dtype=torch.int32), torch.tensor([0, pages], dtype=torch.int32),
                    torch.tensor([nh], dtype=torch.int32), hq, mode=args.mode, group_reduce=args.group_reduce,
                    budget_tokens=torch.tensor(budgets, dtype=torch.int32),
                    block_tokens=torch.tensor(args.block_tokens, dtype=torch.int32) if args.block_tokens else None,
                    mass_threshold=args.mass_threshold, sm_scale=cap.sm_scale, prefilter=args.prefilter,
                    residual=args.residual, sel_cap=max(nh, 1))
        for li in (range(L) if layers is None else layers):
            k, v = cap.k[li].double(), cap.v[li].double()
            kh, vh = k[split.sinks: split.host_end], v[split.sinks: split.host_end]
            worst, recall, recall_sum, mass, mass_sum, tokens = 0.0, 1.0, 0.0, 1.0, 0.0, 0
            for j in range(S):
                n = cap.context + j + 1
                q = cap.q[li, j].double()
                full, _ = _attend(q, k[:n], v[:n], cap.sm_scale)
                win = _attend(q, torch.cat([k[: split.sinks], k[split.host_end: n]]),
                              torch.cat([v[: split.sinks], v[split.host_end: n]]), cap.sm_scale)
                res = engine.run(li, cap.q[li, j][None].float().contiguous(), return_selection=True)
                host = (res.out[0].double(), res.lse[0].double())
                o, _ = _merge(win, host)
                worst = max(worst, float((o - full).norm() / full.norm()))
                sel = res.sel_index[0].long()  # [Hq, cap], -1 padded: the padding lands in a column past the end
                picked = torch.zeros(hq, nh + 1, dtype=torch.bool)
                picked.scatter_(1, torch.where(sel >= 0, sel, nh), True)
                picked = picked[:, :nh]
                if nh:
                    logits = torch.einsum("hd,nhd->hn", q, kh.repeat_interleave(g, dim=1)) * cap.sm_scale
                    p = torch.softmax(logits, dim=-1)
                    held = (p * picked).sum(-1)
                    mass = min(mass, float(held.min()))
                    mass_sum += float(held.mean())
                    top = logits.topk(min(top_k, nh), dim=-1).indices
                    per_head = picked.gather(1, top).double().mean(-1)
                    recall = min(recall, float(per_head.min()))
                    recall_sum += float(per_head.mean())
                    tokens = max(tokens, int(picked.view(hkv, g, nh).any(1).sum(-1).max()))
            out.append(LayerReplay(int(model_layers[li]), worst, recall_sum / S if nh else 1.0, recall, mass,
                                   mass_sum / S if nh else 1.0, tokens, nh))
    finally:
        engine.close()
        view.close()
    return out


__all__ = ["HOST_TOP_K", "LayerReplay", "Split", "replay", "split_of"]
