"""One prompt through every policy at once: prefill, then batched decode through the tiers.

Each policy gets its own `StandaloneTier` (device pool, host store, engine).
The prompt's context is prefilled one of two ways:
- shared (the default): once with full attention, its K, V then written into
  every tier (sinks and window to the device, the rest to host pages);
- in chunks through every tier (`prefill_chunk`), as SGLang's stage 3 does:
  before each chunk the pages that left the window are evicted, and the chunk
  attends the host part exactly (keys as stored: quantized) and the device
  tokens causally, batch row i in tier i. It costs a forward per policy.
The prompt's tail
(the question, the chat template's turn switch and the answer prefix) and the
answer are then decoded token by token, batch row i through tier i, so the
question's tokens already read the context through the tier: the first
answer token is not a product of dense prefill. The model sees its hidden
states, so the tiers are built with forecasts: where a policy uses them
(sparda's `next_query`), each decode step hands its tier every layer's
forecast query one layer early (`forecast.QueryForecast`).
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import List, NamedTuple, Optional, Sequence

import torch

from ..config import ModelShape, TierConfig, from_mapping, load
from ..runtime.standalone import StandaloneTier
from .attention import DecodeStep, ExtendStep, ModelShapeInfo, PrefillStep, model_shape
from .fidelity import LayerFidelity, attended_mask, layer_fidelity
from .forecast import QueryForecast


class PolicySpec(NamedTuple):
    label: str  # e.g. "hgca@10%"
    policy: str
    budget: Optional[float]  # fraction of the context attended from the host; None for dense/window_only
    config: TierConfig


class AttentionTime(NamedTuple):
    """One policy's decode attention over a prompt's decode steps, summed over layers (seconds)."""

    wall_s: float  # in HybridAttention.run, as the decoding thread saw it
    cpu_s: float  # the CPU engine's share (host tokens)
    gpu_s: float  # the device window's share


class PromptResult(NamedTuple):
    generations: List[List[int]]  # per spec, the greedy answer tokens (stop token excluded)
    fidelity: Optional[List[List[LayerFidelity]]]  # per spec, per layer, at the first tail token
    device_tokens: List[int]  # per spec, device-resident tokens at the first tail token
    prefill_s: float
    decode_s: float  # every policy's decode steps together (one batched forward per step)
    decode_steps: int
    margins: List[List[float]]  # per spec, per answer token: top-1 minus top-2 logit (how near a tie)
    attention: List[AttentionTime]  # per spec, its own share of decode_s
    host_reports: List[dict]  # per spec, its host strategy's diagnostics (`HostStrategy.report`)


def is_policy_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def entry_label(entry: str) -> str:
    """A grid entry's label: a policy file's stem, or the policy name itself."""
    return pathlib.Path(entry).stem if is_policy_file(entry) else entry


def policy_specs(policies: Sequence[str], budgets: Sequence[float], *, window_tokens: int, sink_tokens: int = 64,
                 page_tokens: int = 16, max_context_tokens: int = 131072,
                 keep_budget: bool = False) -> List[PolicySpec]:
    """Configs of the grid: budgeted policies once per budget, the baselines once.

    An entry is a policy name (its defaults) or a policy YAML file, labelled
    by the file's stem: the file's own knobs (hgca.group_reduce, host_store
    formats and summary chunks, the window's page size, ...) are kept, while
    the grid sets the window's sinks and length, the context cap and the
    budget so that every entry is compared at the same budgets. With
    keep_budget a file keeps its own budget too (one cell, no budget fraction).
    """
    window = {"sink_tokens": sink_tokens, "window_tokens": window_tokens, "page_tokens": page_tokens}
    common = {"window": window, "max_context_tokens": max_context_tokens, "engine": {"threads": 0}}
    specs: List[PolicySpec] = []
    for entry in policies:
        if is_policy_file(entry):
            base = load(entry).model_dump(mode="json")
        else:
            base = {"policy": entry}
            if entry == "quest":
                base["host_store"] = {"key_format": "bf16"}
            if entry == "fluxion":  # its head classes' blocks (up to 64 tokens) must divide the page
                base["window"] = {"page_tokens": max(page_tokens, from_mapping(base).window.page_tokens)}
        label = entry_label(entry)
        name = base["policy"]
        if name in ("dense", "window_only"):
            specs.append(PolicySpec(label, name, None, from_mapping({**base, **common})))
            continue
        own = {**common, "window": {**window, "page_tokens": base.get("window", {}).get("page_tokens", page_tokens)}}
        if keep_budget and is_policy_file(entry):
            data = {**base, **own, "engine": {**base.get("engine", {}), "threads": 0}}
            specs.append(PolicySpec(label, name, None, from_mapping(data)))
            continue
        for f in budgets:
            data = {**base, **own, "engine": {**base.get("engine", {}), "threads": 0},
                    "budget": {"kind": "fraction", "fraction": f, "min_tokens": 1, "max_tokens": 10 ** 6}}
            specs.append(PolicySpec(f"{label}@{100 * f:g}%", name, f, from_mapping(data)))
    return specs


def _tier(spec: PolicySpec, shape: ModelShapeInfo, total: int, chunk: int = 0, *,
          device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> StandaloneTier:
    ms = ModelShape(shape.n_layers, shape.num_q_heads, shape.kv_heads, shape.head_dim)
    win = spec.config.window
    slots = total + 1 if spec.policy == "dense" else win.device_tokens_max + win.page_tokens + chunk + 1
    # FlashInfer's kernels take fp16/bf16 KV; a float32 model's window runs in torch
    flash = None if dtype in (torch.float16, torch.bfloat16) else False
    return StandaloneTier(spec.config, ms, device=device, dtype=dtype, device_tokens=slots,
                          host_tokens=total, sm_scale=shape.sm_scale, use_flashinfer=flash, forecasts=True)


def _shared_prefill(model, tiers, context_ids, n_layers: int, fidelity: bool, device: torch.device):
    """Full attention once; every tier gets the K, V. Returns the per-layer full-precision K, V (or Nones)."""
    plans = [t.tier.prefill(0, len(context_ids)) for t in tiers]
    mirror: List[Optional[tuple]] = [None] * n_layers

    def write(layer, k, v):
        for t, p in zip(tiers, plans):
            t.tier.write_prefill_layer(p, layer, k, v)
        if fidelity:
            mirror[layer] = (k.contiguous().clone(), v.contiguous().clone())

    model(input_ids=torch.tensor([list(context_ids)], device=device), use_cache=False, kvtier_step=PrefillStep(write),
          logits_to_keep=1)
    return mirror


def _chunked_prefill(model, tiers, context_ids, n_layers: int, chunk: int, fidelity: bool, device: torch.device):
    """The context in chunks through every tier (row i in tier i), evicting before each chunk.

    Returns per tier the per-layer K, V its own forward produced (for fidelity; Nones without).
    """
    B, n = len(tiers), len(context_ids)
    parts: List[List[list]] = [[[] for _ in range(n_layers)] for _ in range(B)]
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        for t in tiers:
            t.tier.evict()
            t.tier.drain()  # on a GPU the copies land asynchronously; the chunk needs their slots
        slots = [t.tier.extend(0, c) for t in tiers]
        for t in tiers:
            t.attn.plan_extend([0], [c])

        def attend(layer, q, k, v, slots=slots):
            outs = []
            for i, t in enumerate(tiers):
                ki, vi = k[i].transpose(0, 1), v[i].transpose(0, 1)  # [c, Hkv, D]
                t.pool.k[layer, slots[i]] = ki.to(t.pool.k)
                t.pool.v[layer, slots[i]] = vi.to(t.pool.v)
                if fidelity:
                    parts[i][layer].append((ki.float().clone(), vi.float().clone()))
                outs.append(t.attn.run_extend(q[i].transpose(0, 1), layer))  # [c, Hq, D]
            return torch.stack(outs)

        ids = torch.tensor([list(context_ids[start: start + c])] * B, device=device)
        pos = torch.arange(start, start + c, device=device).expand(B, c)
        model(input_ids=ids, position_ids=pos, use_cache=False, kvtier_step=ExtendStep(attend), logits_to_keep=1)
    for t in tiers:
        t.tier.evict()  # as a server's first decode step does
    if not fidelity:
        return [[None] * n_layers for _ in range(B)]
    return [[(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer])) for layer in per]
            for per in parts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_prompt(model, specs: Sequence[PolicySpec], context_ids: Sequence[int], tail_ids: Sequence[int], *,
               max_new_tokens: int, stop_ids: Sequence[int], fidelity: bool = False,
               prefill_chunk: Optional[int] = None) -> PromptResult:
    """Greedy answers of every policy to one prompt (context_ids + tail_ids).

    prefill_chunk: None prefills the context once with full attention (shared); a token count
    prefills it in chunks of that size through each policy's tier.
    """
    if not tail_ids or not context_ids:
        raise ValueError(f"run_prompt: expected a non-empty context and tail, found {len(context_ids)} and "
                         f"{len(tail_ids)} tokens")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"run_prompt: expected prefill_chunk None or a token count >= 1, found {prefill_chunk!r}")
    shape = model_shape(model)
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype  # the tiers' device pools live beside the model
    n, m, B = len(context_ids), len(tail_ids), len(specs)
    tiers = [_tier(s, shape, n + m + max_new_tokens, prefill_chunk or 0, device=device, dtype=dtype) for s in specs]
    hooks = contextlib.ExitStack()
    try:
        wants = [t.attn.takes_forecasts for t in tiers]
        forecast = None
        if any(wants):  # each layer's next_query forecast, computed only for policies that use it
            hooks.enter_context(QueryForecast(model, shape).decode_hooks())

            def forecast(layer, q):
                for i, t in enumerate(tiers):
                    if wants[i]:
                        t.attn.forecast(q[i: i + 1], layer)
        for t in tiers:
            t.tier.add(0)
        t0 = time.perf_counter()
        if prefill_chunk is None:
            shared = _shared_prefill(model, tiers, context_ids, shape.n_layers, fidelity, device)
            mirrors = [shared] * B
        else:
            mirrors = _chunked_prefill(model, tiers, context_ids, shape.n_layers, prefill_chunk, fidelity, device)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        for t in tiers:
            t.attn.take_times()  # from here on, each tier's decode attention only
        stops = set(int(s) for s in stop_ids)
        feed = [int(tail_ids[0])] * B
        out: List[List[int]] = [[] for _ in range(B)]
        margins: List[List[float]] = [[] for _ in range(B)]
        done = [False] * B
        fid: Optional[List[List[LayerFidelity]]] = [[] for _ in range(B)] if fidelity else None
        device_tokens: List[int] = []
        steps = 0
        t1 = time.perf_counter()
        for step in range(m + max_new_tokens - 1):
            slots = [t.tier.extend(0, 1) for t in tiers]
            for t in tiers:
                t.attn.plan([0])
            if step == 0:
                device_tokens = [len(t.tier.device_slots(0)) for t in tiers]
            measure = fid is not None and step == 0

            def attend(layer, q, k, v, slots=slots, measure=measure):
                outs = []
                for i, t in enumerate(tiers):
                    t.pool.k[layer, slots[i]] = k[i: i + 1].to(t.pool.k)
                    t.pool.v[layer, slots[i]] = v[i: i + 1].to(t.pool.v)
                    if not measure:
                        outs.append(t.attn.run(q[i: i + 1], layer))
                        continue
                    detail = t.attn.run_detail(q[i: i + 1], layer)
                    kf = torch.cat([mirrors[i][layer][0], k[i: i + 1].float()])
                    vf = torch.cat([mirrors[i][layer][1], v[i: i + 1].float()])
                    seen = attended_mask(t.tier, 0, detail, n + 1, shape.num_q_heads)
                    fid[i].append(layer_fidelity(q[i: i + 1].float(), kf, vf, detail, seen, sm_scale=shape.sm_scale))
                    outs.append(detail.out)
                return torch.cat(outs)

            pos = torch.full((B, 1), n + step, dtype=torch.long, device=device)
            logits = model(input_ids=torch.tensor(feed, device=device)[:, None], position_ids=pos, use_cache=False,
                           kvtier_step=DecodeStep(attend, forecast), logits_to_keep=1).logits[:, -1]
            steps += 1
            for t in tiers:
                t.tier.evict()
            if step + 1 < m:
                feed = [int(tail_ids[step + 1])] * B
                continue
            feed = logits.argmax(-1).tolist()
            top2 = logits.float().topk(2, dim=-1).values
            gaps = (top2[:, 0] - top2[:, 1]).tolist()
            for i, tok in enumerate(feed):
                if not done[i]:
                    margins[i].append(gaps[i])
                    if tok in stops:
                        done[i] = True
                    else:
                        out[i].append(tok)
            if all(done):
                break
        _sync(device)
        decode_s = time.perf_counter() - t1
        attention = [AttentionTime(x.wall_s, x.cpu_s, x.gpu_s) for x in (t.attn.take_times() for t in tiers)]
        reports = [t.attn.host.report() for t in tiers]
        return PromptResult(out, fid, device_tokens, prefill_s, decode_s, steps, margins, attention, reports)
    finally:
        hooks.close()
        for t in tiers:
            t.close()


__all__ = ["AttentionTime", "PolicySpec", "PromptResult", "entry_label", "is_policy_file", "policy_specs", "run_prompt"]
