"""Block selection with an output-aware budget, and the head statistics that classify heads (Fluxion).

Everything here is tensor math over one request at one layer; the `split` host strategy
feeds it the host store's per-chunk summaries and sums.

Per summary chunk c of a kv-head (`host_store.summary_tokens` tokens, n_c of them) the
store keeps the per-channel min and max of its keys and the sums of its keys and values.
From them, for each query head g:
- the **upper bound** of any token's logit in the chunk, s * sum_d max(q_d mn_d, q_d mx_d)
  (Quest's bound): a block's priority is the largest bound of its chunks over the kv-head's
  query heads, so a block holding one strong token ranks high;
- the **estimated mass** of the chunk, n_c * exp(mu + sigma^2 / 2) with mu = s * q . kbar_c
  (kbar_c its mean key) and sigma^2 = s^2 * sum_d q_d^2 (mx_d - mn_d)^2 / 12: the second-order
  (log-normal) term of the mean of exp over the chunk's logits, each channel's spread taken as
  uniform over its min/max range, capped at n_c * exp(upper bound). exp of the mean logit alone
  (the residual's pseudo-token) underestimates the mass by Jensen: on a SmolLM2-135M needle
  prompt (tests/test_fluxion_real.py) the true output change was a median 2.8x the estimate
  without the spread term, 0.86x with it. And its mean value vbar_c.

Output-aware budget: with the device window's (lse_w, o_w) and the host's estimated total
(M, S = sum of mass * vbar), attending only a prefix P of the ranked blocks changes the
output from o* = (W o_w + S) / (W + M) to o'(P) = (W o_w + S_P) / (W + M_P). The
estimated relative change |o* - o'(P)| / |o*| is computed for every prefix at once, and a
kv-head keeps the shortest prefix whose change stays at or under epsilon for all its query
heads (at least one block, at most its cap).

LSE and logits are natural log; masses are scaled by exp(-m0) with m0 the largest log-mass
of the (kv-head, query head), so nothing overflows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ChunkStats(NamedTuple):
    """One request's host chunks at one layer, per kv-head and query head."""

    bound: torch.Tensor  # [Hkv, G, C] f32: upper bound of a token's logit in the chunk
    log_mass: torch.Tensor  # [Hkv, G, C] f32: log of the chunk's estimated softmax mass (unnormalized)
    vsum: torch.Tensor  # [Hkv, C, D] f32: the chunk's value sum (a view of the store's sums)
    n: torch.Tensor  # [C] f32: tokens per chunk
    mean_logit: torch.Tensor  # [Hkv, G, C] f32: the logit of the chunk's mean key (scaled, soft-capped)
    # the estimated host part over every chunk, per (kv-head, query head): m1 the largest log-mass,
    # mass1 = sum_c exp(log_mass_c - m1), out1 = sum_c exp(log_mass_c - m1) * vmean_c
    m1: torch.Tensor  # [Hkv, G] f32
    mass1: torch.Tensor  # [Hkv, G] f32
    out1: torch.Tensor  # [Hkv, G, D] f32


class HeadStats(NamedTuple):
    """The predictor's statistics of each kv-head (means over its query heads)."""

    window_mass: torch.Tensor  # [Hkv]: share of the softmax mass on the device window
    far_entropy: torch.Tensor  # [Hkv]: entropy of the softmax over the host tokens / log(host tokens)


class BlockChoice(NamedTuple):
    """One request's selection for the kv-heads of one block size."""

    blocks: torch.Tensor  # [Hh, K] long: block ids in priority order (the first `keep[h]` are attended)
    keep: torch.Tensor  # [Hh] long: blocks kept per kv-head
    share: torch.Tensor  # [Hh, K] f32: each block's estimated share of the layer's softmax mass (max over G)
    change: torch.Tensor  # [Hh] f32: the estimated relative output change at the kept prefix (max over G)


def _cap(x: torch.Tensor, soft_cap: float) -> torch.Tensor:
    return soft_cap * torch.tanh(x / soft_cap) if soft_cap > 0 else x


def chunk_stats(q: torch.Tensor, summary: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *,
                sm_scale: float, soft_cap: float = 0.0) -> ChunkStats:
    """q [Hkv, G, D]; summary [Hkv, C, 2, D] (key min, max); sums [Hkv, C, 2, D] (key sum, value sum);
    counts [C] tokens per chunk (> 0). All on one device; f32 results there.

    Each pass over the chunks' [C, D] rows is one matrix product or one elementwise op: the
    bound is q's negative part against the minima plus its positive part against the maxima
    (one product over the [min | max] row), the mean-key logit and the host estimate are
    products over the sums divided per chunk afterwards, and no [C, D] mean is formed."""
    q = q.float()
    hkv, c, _, d = summary.shape
    s = summary.float()  # [Hkv, C, 2, D]
    qq = torch.cat([q.clamp(max=0), q.clamp(min=0)], dim=-1)  # [Hkv, G, 2D] against [min | max]
    bound = torch.bmm(qq, s.reshape(hkv, c, 2 * d).transpose(1, 2)) * sm_scale
    r = s[:, :, 1] - s[:, :, 0]
    r.square_()
    spread = torch.bmm(q * q, r.transpose(1, 2)) * (sm_scale ** 2 / 12)
    del r, s
    n = counts.to(q.device, torch.float32)
    sums = sums.float()
    logit = torch.bmm(q, sums[:, :, 0].transpose(1, 2)) * (sm_scale / n)
    bound = _cap(bound, soft_cap)
    log_mass = torch.minimum(_cap(logit + spread / 2, soft_cap), bound) + torch.log(n)
    m1 = log_mass.amax(-1)  # [Hkv, G]
    w = torch.exp(log_mass - m1[..., None])
    vsum = sums[:, :, 1]
    out1 = torch.bmm(w / n, vsum)  # [Hkv, G, D]: sum of w * vmean
    return ChunkStats(bound, log_mass, vsum, n, _cap(logit, soft_cap), m1, w.sum(-1), out1)


def _blocks(x: torch.Tensor, per: int, fill: float) -> torch.Tensor:
    """[..., C] -> [..., ceil(C / per), per], padded with fill."""
    c = x.shape[-1]
    nb = -(-c // per)
    return torch.nn.functional.pad(x, (0, nb * per - c), value=fill).view(*x.shape[:-1], nb, per)


class PrefixCurve(NamedTuple):
    """The ranked blocks of some kv-heads and the estimated output change of every prefix."""

    blocks: torch.Tensor  # [Hh, K] long: block ids, best first
    change: torch.Tensor  # [Hh, K] f64: estimated relative output change attending the first k+1 (max over G)
    share: torch.Tensor  # [Hh, K] f32: each block's estimated share of the softmax mass (max over G)


RANKS = ("mean_key", "bound")


def prefix_curve(stats: ChunkStats, heads: torch.Tensor, chunks_per_block: int, k: int, window_lse: torch.Tensor,
                 window_out: torch.Tensor, rank: str = "mean_key") -> PrefixCurve:
    """The best k blocks of kv-heads `heads` [Hh] (blocks of chunks_per_block chunks, ranked by the
    largest over their chunks and the query heads of `rank`: mean_key, the logit of a chunk's mean
    key; bound, its upper bound of any token's logit) and, for each prefix of them, the estimated
    relative change of the layer's output against attending every host token. window_lse [Hkv, G]
    (-inf: no window) and window_out [Hkv, G, D] are the device window's exact part."""
    if rank not in RANKS:
        raise ValueError(f"rank: expected one of {RANKS}, got {rank!r}")
    bound = (stats.mean_logit if rank == "mean_key" else stats.bound)[heads]  # [Hh, G, C]
    lm = stats.log_mass[heads].double()
    hh, g, c = lm.shape
    nb = -(-c // chunks_per_block)
    k = min(k, nb)
    prio = _blocks(bound, chunks_per_block, float("-inf")).amax(-1).amax(1)  # [Hh, nb]
    order = torch.topk(prio, k, dim=-1).indices  # [Hh, K], best first
    wl, wo = window_lse[heads].double(), window_out[heads].double()
    m0 = torch.maximum(lm.amax(-1), wl)  # [Hh, G]
    big_w = torch.exp(wl - m0)  # window mass (0 without a window)
    # the whole host part, from chunk_stats' totals rescaled from its max m1 to m0
    rescale = torch.exp(stats.m1[heads].double() - m0)
    total_m = stats.mass1[heads].double() * rescale
    total_s = stats.out1[heads].double() * rescale[..., None]
    # per block of the ranked prefix: its chunks (past the last chunk: weight 0), their masses and values
    chunk = order[:, :, None] * chunks_per_block + torch.arange(chunks_per_block, device=order.device)
    real = chunk < c
    chunk = chunk.clamp(max=c - 1).reshape(hh, -1)  # [Hh, K * per]
    sel_w = torch.exp(lm.gather(2, chunk[:, None].expand(hh, g, -1)) - m0[..., None])  # [Hh, G, K * per]
    sel_w = (sel_w * real.reshape(hh, 1, -1)).view(hh, g, k, chunks_per_block)
    n = stats.n.double()[chunk].view(hh, 1, k, chunks_per_block)
    sel_v = stats.vsum[heads[:, None], chunk].double().view(hh, k, chunks_per_block, -1)  # [Hh, K, per, D]
    block_m = sel_w.sum(-1)  # [Hh, G, K]
    block_s = torch.einsum("hgkp,hkpd->hgkd", sel_w / n, sel_v)
    cum_m, cum_s = block_m.cumsum(-1), block_s.cumsum(2)
    base = big_w[..., None] * wo  # [Hh, G, D]
    full = (base + total_s) / (big_w + total_m)[..., None]
    part = (base[:, :, None] + cum_s) / (big_w[..., None] + cum_m)[..., None]  # [Hh, G, K, D]
    change = (full[:, :, None] - part).norm(dim=-1) / full.norm(dim=-1)[..., None].clamp(min=1e-30)
    change = torch.nan_to_num(change, nan=float("inf")).amax(1)  # [Hh, K], worst query head
    share = (block_m / (big_w + total_m)[..., None]).amax(1)
    return PrefixCurve(order, change, share.float())


def choose_blocks(stats: ChunkStats, heads: torch.Tensor, chunks_per_block: int, caps: torch.Tensor,
                  window_lse: torch.Tensor, window_out: torch.Tensor, *, epsilon: float,
                  rank: str = "mean_key") -> BlockChoice:
    """The ranked blocks of kv-heads `heads` [Hh] and how many each keeps: the shortest prefix whose
    estimated relative output change is <= epsilon, within [1, caps[h]] blocks (caps [Hh]; a
    negative epsilon keeps the cap). See `prefix_curve` for the other arguments."""
    curve = prefix_curve(stats, heads, chunks_per_block, int(caps.max()), window_lse, window_out, rank)
    k = curve.blocks.shape[1]
    change = curve.change
    cap = caps.to(change.device).clamp(min=1, max=k)
    ks = torch.arange(1, k + 1, device=change.device)
    ok = (change <= epsilon) & (ks[None, :] <= cap[:, None])
    keep = torch.where(ok.any(-1), ok.float().argmax(-1) + 1, cap)
    at = change.gather(1, (keep - 1)[:, None])[:, 0]
    return BlockChoice(curve.blocks, keep.long(), curve.share, at.float())


def head_stats(host_logits: torch.Tensor, window_lse: torch.Tensor, group: int) -> HeadStats:
    """host_logits [Hq, n] of every host token (scaled, soft-capped), window_lse [Hq]: the window mass
    and the normalized entropy over the host tokens, per kv-head (means over its `group` query heads)."""
    x = host_logits.double()
    n = x.shape[-1]
    lse_h = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse_h[:, None])
    ent = -(p * torch.where(p > 0, torch.log(p), torch.zeros_like(p))).sum(-1)
    far = ent / torch.log(torch.tensor(float(max(n, 2)), dtype=torch.float64))
    wl = window_lse.double().to(x.device)
    wm = torch.exp(wl - torch.logaddexp(wl, lse_h))
    wm = torch.nan_to_num(wm, nan=0.0)
    return HeadStats(wm.view(-1, group).mean(-1).float(), far.clamp(0, 1).view(-1, group).mean(-1).float())
