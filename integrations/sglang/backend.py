"""The `kvtier` attention backend: sglang's `AttentionBackend` over a `TierSession`.

This class keeps only what sglang asks of an attention backend; the tier's work
(tracking rows, adopting cached prefixes, eviction, planning, statistics) is the
framework-free `kvtier.runtime.session.TierSession`. It wraps sglang's stock backend
(FlashInfer on CUDA, torch_native on the CPU), which keeps doing prefill while no
request has host tokens. The serving stage (1, 2 or 3), the prefix cache and the
decode graph mode are decided once (`serving.py`): see there and docs/design.md.

- Decode: each batch's rows and lengths go to `session.plan_decode` (track, evict,
  plan once per step); each layer's query to `session.run_decode`.
- Prefill (stage 3): before each chunk the pages that left the window go to the host
  store and their slots back to the allocator; a chunk of a request with host pages
  attends them exactly and the device tokens causally (`session.run_extend`).
- CUDA graphs: decode runs eagerly unless the launch asks for breakable decode graphs
  (`--cuda-graph-backend-decode breakable`); then sglang replays the forward in
  segments and each layer's attention runs here between them (`_decode_in_graph`),
  planned for the real rows of the padded batch. Nothing of the tier is captured.

This module imports sglang; `attention.py` imports it only when a runner asks.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from kvtier.config import ModelShape, TierConfig, env
from kvtier.runtime.session import TierSession

from . import lifecycle, metrics, serving
from .names import GRAPH_MODE, KvTierLaunchError

log = logging.getLogger("kvtier")
STATS_EVERY_S = 30.0  # default of how often a decoding scheduler logs the tier's statistics
METRICS_EVERY_S = 1.0  # how often the Prometheus metrics follow the tier (with --enable-metrics)
_INNER = {"cuda": "flashinfer", "cpu": "torch_native"}


def stats_interval_s() -> float:
    """Seconds between the scheduler's `kvtier:` statistics lines ($KVTIER_STATS_INTERVAL_S, default 30)."""
    raw = env.get(env.STATS_INTERVAL)
    if raw is None:
        return STATS_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise KvTierLaunchError(f"{env.STATS_INTERVAL.name}: expected a number of seconds > 0, found {raw!r}")
    return value


class _Rows:
    """The session's view of sglang's request-to-token table (`RowTable`)."""

    def __init__(self, req_to_token_pool):
        self.pool = req_to_token_pool

    def read(self, row: int, lo: int, hi: int) -> torch.Tensor:
        return self.pool.req_to_token[row, lo:hi].to("cpu", torch.long)

    def write(self, row: int, lo: int, hi: int, values: torch.Tensor) -> None:
        table = self.pool.req_to_token
        table[row, lo:hi] = values.to(table.device, table.dtype)


class KvTierAttnBackend(AttentionBackend):
    """Hybrid decode over sglang's pool; prefill delegated to the stock backend until host pages exist."""

    def __init__(self, runner, config: TierConfig):
        super().__init__()
        device = torch.device(runner.device)
        self.inner = ATTENTION_BACKENDS[_INNER.get(device.type, "torch_native")](runner)
        self.config, self.device = config, device
        self.tp_size = int(getattr(runner, "tp_size", 1) or 1)
        self.tp_rank = int(getattr(runner, "tp_rank", 0) or 0)
        self.req_to_token_pool = runner.req_to_token_pool
        self.kv_pool = runner.token_to_kv_pool
        self.allocator = getattr(runner, "token_to_kv_pool_allocator", None)
        self.page_size = int(getattr(runner, "page_size", 1) or 1)
        self.server_args = getattr(runner, "server_args", None)
        self.mode = serving.mode_for(self.server_args, config, page_size=self.page_size,
                                     can_free=callable(getattr(self.allocator, "free", None)))
        # sglang's prefill chunk (--chunked-prefill-size; <= 0 when chunking is off)
        self.prefill_chunk_tokens = int(getattr(self.server_args, "chunked_prefill_size", 0) or 0)
        self.metrics = metrics.for_server(self.server_args)  # Prometheus, with --enable-metrics
        on_stats = None if self.metrics is None else (lambda stats: self.metrics.update(self.tp_rank, stats))
        self.session = TierSession(config, rows=_Rows(self.req_to_token_pool),
                                   free_slots=self.allocator.free if self.mode.releases_slots else None,
                                   prefix_cache=self.mode.prefix_cache, stats_every_s=stats_interval_s(),
                                   on_stats=on_stats, stats_callback_every_s=METRICS_EVERY_S)
        self.forward_metadata = None
        self._decode = False
        self._capturing = False  # a decode graph is being captured (or warmed up) on a dummy batch
        self._graph_rows, self._graph_loc, self._graph_fb = 0, None, None  # the replayed batch's real rows
        self._graph_out: Dict[Tuple[int, int], torch.Tensor] = {}  # per captured size: the layers' output
        self._decode_break = _eager_break(self._decode_in_graph)
        self._extend_hybrid = False  # this extend batch runs through the tier (stage 3)
        self._extend_fb = None  # the extend batch whose tier bookkeeping waits for the first layer
        self._checked = set()  # layers whose scale and soft-cap matched the tier's (_check_layer)
        lifecycle.track(self)

    # --- what the rest of the plugin asks (admission, lifecycle, the prefix cache) ---------

    @property
    def stage3(self) -> bool:
        return self.mode.stage3

    @property
    def releases_slots(self) -> bool:
        return self.mode.releases_slots

    @property
    def prefix_cache(self) -> bool:
        return self.mode.prefix_cache

    def host_capacity_tokens(self) -> int:
        return self.session.host_capacity_tokens(self._pool_shape())

    def host_free_tokens(self) -> int:
        return self.session.host_free_tokens(self._pool_shape())

    def host_tokens_of(self, row: int) -> int:
        return self.session.host_tokens_of(row)

    def host_tokens_dropped(self, row: int) -> bool:
        return self.session.host_tokens_dropped(row)

    def freed_range(self, row: int) -> Optional[Tuple[int, int]]:
        return self.session.freed_range(row)

    def tail_on_host(self, row: int) -> Tuple[int, int]:
        return self.session.tail_on_host(row)

    def tail_demoted(self, row: int, tokens: int) -> None:
        self.session.tail_demoted(row, tokens)

    def release(self, row: int) -> None:
        self.session.release(row)

    def tier_stats(self) -> Dict[str, float]:
        return self.session.stats()

    # --- metadata ---------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        self._capturing = False
        self._decode = mode.is_decode()
        self._extend_hybrid, self._extend_fb = False, None
        self.inner.init_forward_metadata(forward_batch)
        if self._decode and self.session.built:
            self._plan(forward_batch)
        elif mode.is_extend() and self.session.offloads:
            self._plan_extend(forward_batch)
        elif mode.is_extend():
            self._extend_fb = forward_batch  # the tier is built at this batch's first layer
        if not self._decode:
            self.session.clock.extend_planned()
        self.forward_metadata = getattr(self.inner, "forward_metadata", None)

    # --- breakable decode CUDA graphs ----------------------------------------------------
    # sglang captures the decode forward in segments that break at every attention call: the
    # projections, norms and MLPs replay as graphs, and each layer's hybrid attention runs
    # eagerly in between (it waits on the host part, which no graph can record).

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        mode = serving.decode_graph_mode(self.server_args)
        if mode != GRAPH_MODE:
            raise KvTierLaunchError(
                f"the kvtier decode backend runs under {GRAPH_MODE} decode CUDA graphs only, and this "
                f"launch captures them with {mode!r}; use --cuda-graph-backend-decode {GRAPH_MODE} or disabled")
        self._graph_out = {}

    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        """Before a decode graph's capture (a dummy batch) and before each replay (the batch,
        padded to the captured size): the plan of the real rows, outside the graph."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Some releases can record this call into a graph of its own (0.5.23's opt-in
            # metadata glue graph); they fall back to calling it eagerly when it raises.
            raise RuntimeError("kvtier plans a decode batch on the host (eviction, page tables, the "
                               "engine's plan); that cannot be captured into a CUDA graph")
        self._capturing = bool(in_capture)
        if in_capture:
            return
        self._decode = True
        rows = forward_batch.batch_size - int(getattr(forward_batch, "num_padding", 0) or 0)
        self._graph_rows, self._graph_loc, self._graph_fb = rows, forward_batch.out_cache_loc, forward_batch
        if self.session.built:
            self._plan(forward_batch, rows=rows)
        self.forward_metadata = None

    def _decode_in_graph(self, q, k, v, layer, save_kv_cache):
        """One layer's decode between captured segments. q, k, v are the graph's static
        buffers (the captured batch size, padding rows last); the returned buffer is the
        next segment's input."""
        width = layer.tp_q_head_num * layer.v_head_dim
        key = (q.shape[0], width)
        buf = self._graph_out.get(key)
        if buf is None:  # one per captured size, shared by the layers (the stream orders them)
            buf = self._graph_out[key] = q.new_zeros(key)
        if self._capturing:
            return buf
        n = self._graph_rows
        out = self._decode_rows(q, k, v, layer, n, self._graph_loc, self._graph_fb, save_kv_cache)
        if n == q.shape[0]:
            return out
        buf[:n].copy_(out)
        return buf

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    # --- forward ----------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._extend_fb is not None:
            # The first extend this backend sees: build the tier (it needs the layer) and
            # start tracking the batch's requests. Nothing is on the host yet.
            fb, self._extend_fb = self._extend_fb, None
            if not self.session.built:
                self._build(layer)
                if self.session.offloads and self.session.attn.extend_flash:
                    # FlashInfer compiles the chunk kernel on first use (over a minute on a
                    # fresh cache): here, at the first prefill, not inside the first long prompt.
                    log.info("kvtier: preparing the attention kernel of prefill chunks with host pages")
                    log.info("kvtier: prefill-chunk kernel ready in %.1f s", self.session.attn.warm_extend(q.dtype))
            if self.session.offloads:
                self._plan_extend(fb)
        if not self._extend_hybrid:
            return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            _save_kv(self.kv_pool, layer, forward_batch.out_cache_loc, k, v)
        self._check_layer(layer)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = self.session.run_extend(q3, layer.layer_id)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._capturing:
            # A decode graph's warm-up (a placeholder; the tier is not touched) or its capture,
            # where sglang's wrapper ends the segment here and replays the call between segments.
            return self._decode_break(q, k, v, layer, save_kv_cache)
        return self._decode_rows(q, k, v, layer, forward_batch.batch_size, forward_batch.out_cache_loc,
                                 forward_batch, save_kv_cache)

    def _decode_rows(self, q, k, v, layer, n, loc, forward_batch, save_kv_cache):
        """Decode of the batch's first n rows: their K, V written at loc (the tier is built at
        the first decode), then the hybrid attention; [n, heads * head_dim]."""
        if save_kv_cache and k is not None and v is not None:
            _save_kv(self.kv_pool, layer, loc, k[:n], v[:n])
        if not self.session.built:
            self._build(layer)
            self._plan(forward_batch, rows=n)
        self._check_layer(layer)
        out = self.session.run_decode(q[:n].reshape(n, layer.tp_q_head_num, layer.qk_head_dim), layer.layer_id)
        return out.reshape(n, layer.tp_q_head_num * layer.v_head_dim)

    # --- the tier -----------------------------------------------------------------------

    def _build(self, layer) -> None:
        """Build the tier at the first layer it sees. The runtime (and the native engine) load
        here, in the scheduler, so that a missing build fails with its rebuild message at the
        first batch instead of silently disabling the plugin."""
        from kvtier.runtime.ranks import rank_share

        n_layers = getattr(self.kv_pool, "layer_num", None) or len(self.kv_pool.k_buffer)
        if getattr(layer, "is_cross_attention", False) or (getattr(layer, "sliding_window_size", -1) or -1) > -1:
            raise KvTierLaunchError("kvtier serves full causal self-attention only; this model's layer "
                                    f"{layer.layer_id} uses a sliding window or cross-attention")
        if layer.qk_head_dim != layer.v_head_dim:
            raise KvTierLaunchError(f"kvtier needs equal q/k and v head dims, found {layer.qk_head_dim} "
                                    f"and {layer.v_head_dim}")
        shape = ModelShape(n_layers, layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim)
        mode = self.mode
        if mode.stage:
            log.info("kvtier: %s", "evicted device slots return to sglang's allocator" if mode.releases_slots
                     else f"device KV is kept on both sides (stage 1): {mode.why_not_higher}")
            log.info("kvtier: %s", "prefill chunks evict as they go (stage 3): a request holds at most "
                     f"{device_bound_tokens(self)} tokens of the GPU pool; the host store holds "
                     f"{self.host_capacity_tokens()} tokens" if mode.stage3 else
                     f"a prompt must fit the GPU pool once (no stage 3): {mode.why_not_higher}")
        cache = lifecycle.cache_of(self.req_to_token_pool)
        if mode.prefix_cache and cache is not None:
            self.session.reclaim = cache.reclaim_host  # cached prefixes give way to running requests
            log.info("kvtier: prefix caching keeps finished requests' host pages; a hit attends them in place")
        # Each TP rank tiers its own kv-heads (layer.tp_k_head_num) on its own slice of the cores.
        share = rank_share(self.config, tp_size=self.tp_size, tp_rank=self.tp_rank,
                           total_kv_heads=layer.tp_k_head_num * self.tp_size)
        # On CUDA the stream hands each layer's query to the engine (pipelined) unless
        # KVTIER_PIPELINE=off: under a real server it decoded the same tokens twice as fast.
        self.session.build(shape, [self.kv_pool.get_key_buffer(i) for i in range(n_layers)],
                           [self.kv_pool.get_value_buffer(i) for i in range(n_layers)], sm_scale=layer.scaling,
                           soft_cap=float(getattr(layer, "logit_cap", 0.0) or 0.0), rank=share,
                           use_flashinfer=self.device.type == "cuda")

    def _check_layer(self, layer) -> None:
        """Each layer's scale and soft-cap against the tier's, once per layer object (they are fixed)."""
        if layer in self._checked:
            return
        try:
            self.session.check_layer(layer.layer_id, layer.scaling, float(getattr(layer, "logit_cap", 0.0) or 0.0))
        except ValueError as exc:
            raise KvTierLaunchError(str(exc)) from None
        self._checked.add(layer)

    def _pool_shape(self) -> ModelShape:
        """The pool's shape (query heads do not count for host capacity), before the first layer."""
        pool = self.kv_pool
        n_layers = getattr(pool, "layer_num", None) or len(pool.k_buffer)
        hkv = int(pool.head_num)
        return ModelShape(n_layers, hkv, hkv, int(pool.head_dim))

    def _plan_extend(self, forward_batch) -> None:
        rows = forward_batch.req_pool_indices.tolist()
        prefix = forward_batch.extend_prefix_lens_cpu
        new = forward_batch.extend_seq_lens_cpu
        if prefix is None or new is None:
            seq = forward_batch.seq_lens.cpu().tolist()
            new = forward_batch.extend_seq_lens.cpu().tolist()
            prefix = [s - n for s, n in zip(seq, new)]
        self._extend_hybrid = self.session.plan_extend(rows, list(prefix), list(new))

    def _plan(self, forward_batch, rows: Optional[int] = None) -> None:
        """rows: how many of the batch's rows are requests (a replayed graph pads the rest).

        Each row's new token sits in out_cache_loc (sglang wrote it into the row too): one copy
        of the batch's locations instead of a read of each row."""
        count = forward_batch.batch_size if rows is None else rows
        rows = forward_batch.req_pool_indices[:count].tolist()
        lens = (forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None
                else forward_batch.seq_lens.cpu())[:count].tolist()
        self.session.plan_decode(rows, lens, new_slots=forward_batch.out_cache_loc[:count].tolist())


def device_bound_tokens(backend) -> int:
    """GPU pool tokens one request holds at most under stage 3 (admission.device_bound)."""
    from .admission import device_bound

    return device_bound(backend, max(backend.prefill_chunk_tokens, 0))


def _eager_break(fn):
    """fn as a break between the segments of a breakable CUDA graph (sglang's eager_on_graph)."""
    try:
        from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import eager_on_graph
    except ImportError:  # a release without breakable graphs never captures this backend
        return fn
    return eager_on_graph(True)(fn)


try:
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
except ImportError:  # releases before KVWriteLoc take the location itself
    KVWriteLoc = None


def _save_kv(pool, layer, loc, k, v) -> None:
    pool.set_kv_buffer(layer, loc if KVWriteLoc is None else KVWriteLoc(loc, None), k, v)


__all__: List[str] = ["KvTierAttnBackend", "stats_interval_s"]
