"""The `kvtier` decode attention backend for sglang.

It wraps sglang's stock backend (FlashInfer on CUDA, torch_native on CPU),
which keeps doing prefill. For decode batches it tracks each request's
tokens in a `TierManager` over sglang's own KV pool, mirrors pages that
leave the window into the host store, and answers each layer with the hybrid
attention: dense over sinks + window on the device, sparse over the host
store on the CPU, merged by LSE.

Sequencing (DESIGN.md):
- stage 1, everywhere: the merge is validated while device KV is kept on both
  sides (evicted pages stay in sglang's pool while the host store answers).
- stage 2, where a row-freeing funnel is hooked (`free_kv_row` on the 0.5.23
  line, `ChunkCache.cache_finished_req` on 0.5.17) and the radix cache is
  off: once an evicted page has landed in the host store, its device slots
  go back to sglang's allocator, so the pool holds sinks and windows and
  admits more requests. The hooks (lifecycle.py) keep sglang from freeing
  those slots again when the request ends.
  The radix cache stays on where sglang has a radix-cache registry (0.5.17 and
  the 0.5.23 line) and prefill comes here (stage 3): `--kv-tier` selects the `kvtier`
  radix cache (prefix.py). The tier writes each freed slot's host address into
  the row, finished requests are cached with those addresses, and a request
  that matches a cached prefix starts on its host pages in place (`_adopt`).
  Elsewhere `--kv-tier` turns the radix cache off for offloading policies.
- stage 3, on top of stage 2 when prefill comes here too (`--kv-tier` routes
  prefill to this backend under an offloading policy): a prompt is prefilled
  in sglang's chunks, and before each chunk the pages that left the window go
  to the host store and their slots back to the allocator. A chunk of a
  request with pages on the host attends them exactly (dequantized) and the
  device tokens causally (`HybridAttention.run_extend`); a batch whose
  requests have nothing on the host stays on the stock backend. So a prompt
  needs sinks + window + two chunks of device slots, not its whole length;
  the scheduler's admission and input-length cap are lifted to match
  (`admission.py`).

CUDA graphs: decode runs eagerly unless the launch asks for breakable decode
graphs (`--cuda-graph-backend-decode breakable`); then sglang replays the
forward in segments and each layer's attention runs here between them
(`_decode_in_graph`), planned for the real rows of the padded batch.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

import torch

from kvtier.config import ModelShape, TierConfig, env
from kvtier.store import CapacityError

from . import launch, lifecycle, metrics

log = logging.getLogger("kvtier")
STATS_EVERY_S = 30.0  # default of how often a decoding scheduler logs the tier's statistics
STATS_ENV = env.STATS_INTERVAL.name
METRICS_EVERY_S = 1.0  # how often the Prometheus metrics follow the tier (with --enable-metrics)


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
        raise launch.KvTierLaunchError(f"{STATS_ENV}: expected a number of seconds > 0, found {raw!r}")
    return value

_INNER = {"cuda": "flashinfer", "cpu": "torch_native"}


class DecodeClock:
    """Where a decode step's time goes, as the scheduler sees it.

    A step is the time from one decode batch's plan to the next's, with that plan and
    the attention of the forward that followed it; an extend (prefill) batch in between
    ends the chain, so idle time and prefills never count as decode.
    The attention parts come from `HybridAttention.take_times()`: its wall time in
    `run()` over the layers, the engine's time and the window kernels' GPU time.
    """

    def __init__(self):
        self._last: Optional[float] = None  # when the previous decode plan started
        self._plan_s = 0.0  # how long it took
        self.steps = 0
        self.step_s = self.plan_s = self.attn_s = self.engine_s = self.window_s = 0.0

    def decode_planned(self, start: float, end: float, times) -> None:
        """A decode batch's plan ran from start to end (time.perf_counter seconds); times: the
        previous step's attention, a StepTimes (cpu_s, gpu_s, wall_s) summed over its layers."""
        if self._last is not None:
            self.steps += 1
            self.step_s += start - self._last
            self.plan_s += self._plan_s
            self.attn_s += times.wall_s
            self.engine_s += times.cpu_s
            self.window_s += times.gpu_s
        self._last, self._plan_s = start, end - start

    def extend_planned(self) -> None:
        self._last = None

    def take(self) -> Optional[Dict[str, float]]:
        """Milliseconds per step since the last take (None when no full step ran), then start over."""
        n = self.steps
        out = None
        if n:
            out = {"steps": n, "step_ms": 1e3 * self.step_s / n, "plan_ms": 1e3 * self.plan_s / n,
                   "attention_ms": 1e3 * self.attn_s / n, "engine_ms": 1e3 * self.engine_s / n,
                   "window_gpu_ms": 1e3 * self.window_s / n}
        self.steps = 0
        self.step_s = self.plan_s = self.attn_s = self.engine_s = self.window_s = 0.0
        return out


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    if launch.BACKEND in ATTENTION_BACKENDS:
        return
    add_attention_backend_choices([launch.BACKEND, launch.PREFILL_BACKEND])
    register_attention_backend(launch.BACKEND)(create_backend)
    register_attention_backend(launch.PREFILL_BACKEND)(create_backend)


def create_backend(runner):
    """The model runner's one kvtier backend, for decode and (stage 3) prefill alike.

    sglang builds its prefill and decode backends separately when their names differ; both
    names return the same instance, so one tier sees every batch.
    """
    backend = getattr(runner, "_kvtier_backend", None)
    if backend is None:
        backend = _backend_class()(runner, launch.config_for(getattr(runner, "server_args", None)))
        try:
            runner._kvtier_backend = backend
        except AttributeError as exc:  # a runner that takes no attributes would get two tiers
            raise launch.KvTierLaunchError(f"kvtier keeps its backend on sglang's model runner, and "
                                           f"{type(runner).__name__} refused it: {exc}") from None
    return backend


_CLASS = None


def _backend_class():
    """Built on first use so that importing this module never imports sglang's attention stack."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    class KvTierAttnBackend(AttentionBackend):
        """Hybrid decode over sglang's pool; prefill delegated to the stock backend."""

        def __init__(self, runner, config: TierConfig):
            super().__init__()
            device = torch.device(runner.device)
            self.inner = ATTENTION_BACKENDS[_INNER.get(device.type, "torch_native")](runner)
            self.config = config
            self.device = device
            self.tp_size = int(getattr(runner, "tp_size", 1) or 1)
            self.tp_rank = int(getattr(runner, "tp_rank", 0) or 0)
            self.req_to_token_pool = runner.req_to_token_pool
            self.kv_pool = runner.token_to_kv_pool
            self.allocator = getattr(runner, "token_to_kv_pool_allocator", None)
            self.page_size = int(getattr(runner, "page_size", 1) or 1)
            self.server_args = getattr(runner, "server_args", None)
            self.releases_slots = False  # stage 2, decided at the first decode
            self.slots_released = 0
            self._last_log = float("-inf")
            self._last_full_log = float("-inf")
            self.stats_every_s = stats_interval_s()
            self.metrics = metrics.for_server(self.server_args)  # Prometheus, with --enable-metrics
            self._last_metrics = float("-inf")
            self.evictions_refused = 0  # decode steps whose eviction the full host store refused
            self.clock = DecodeClock()  # where decode steps spend their time, for the statistics line
            self.last_timing: Optional[Dict[str, float]] = None  # the clock's last reading
            self.forward_metadata = None
            self._capturing = False  # a decode graph is being captured (or warmed up) on a dummy batch
            self._graph_rows, self._graph_loc, self._graph_fb = 0, None, None  # the replayed batch's real rows
            self._graph_out: Dict[Tuple[int, int], torch.Tensor] = {}  # per captured size: the layers' output
            self._decode_break = _eager_break(self._decode_in_graph)
            self._tier = None  # TierManager, built at the first decode (it needs the layer shapes)
            self._attn = None  # HybridAttention
            self._decode = False
            self._extend_hybrid = False  # this extend batch runs through the tier (stage 3)
            self._extend_fb = None  # the extend batch whose tier bookkeeping waits for the first layer
            # sglang's prefill chunk (--chunked-prefill-size; <= 0 when chunking is off)
            self.prefill_chunk_tokens = int(getattr(self.server_args, "chunked_prefill_size", 0) or 0)
            self.stage3 = self._stage3_why_not() is None
            # The kvtier radix cache keeps finished requests, host pages included (prefix.py).
            self.prefix_cache = self.stage3 and _prefix_cache_selected(self.server_args)
            self._addressed: Dict[int, int] = {}  # row -> positions below hold host addresses (prefix cache)
            self.prefix_hit_host_tokens = 0  # host tokens new requests took over from cached prefixes
            self._tails: Dict[int, Tuple[int, int]] = {}  # row -> cached device tail [lo, hi) it started on
            self.tail_tokens_demoted = 0  # cached device-tail tokens replaced by host copies (prefix.py)
            lifecycle.track(self)

        # --- metadata -------------------------------------------------------

        def init_forward_metadata(self, forward_batch):
            mode = forward_batch.forward_mode
            self._capturing = False
            self._decode = mode.is_decode()
            self._extend_hybrid, self._extend_fb = False, None
            self.inner.init_forward_metadata(forward_batch)
            if self._decode and self._attn is not None:
                self._plan(forward_batch)
            elif mode.is_extend() and self._tier is not None and self._tier.offload:
                self._plan_extend(forward_batch)
            elif mode.is_extend():
                self._extend_fb = forward_batch  # the tier is built at this batch's first layer
            if not self._decode:
                self.clock.extend_planned()
            self.forward_metadata = getattr(self.inner, "forward_metadata", None)

        # --- breakable decode CUDA graphs -------------------------------------
        # sglang captures the decode forward in segments that break at every attention call
        # (`--cuda-graph-backend-decode breakable`, the launch default): the projections,
        # norms and MLPs replay as graphs, and each layer's hybrid attention runs eagerly in
        # between (it waits on the CPU engine, which no graph can record). Nothing of the
        # tier is captured: the break reads the current batch's plan when it runs.

        def init_cuda_graph_state(self, max_bs, max_num_tokens):
            mode = launch.decode_graph_mode(self.server_args)
            if mode != launch.GRAPH_MODE:
                raise launch.KvTierLaunchError(
                    f"the kvtier decode backend runs under {launch.GRAPH_MODE} decode CUDA graphs only, and this "
                    f"launch captures them with {mode!r}; use --cuda-graph-backend-decode {launch.GRAPH_MODE} "
                    "or disabled")
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
            if self._attn is not None:
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

        def _decode_rows(self, q, k, v, layer, n, loc, forward_batch, save_kv_cache):
            """Decode of the batch's first n rows: their K, V written at loc (the tier is built at
            the first decode), then the hybrid attention; [n, heads * head_dim]."""
            if save_kv_cache and k is not None and v is not None:
                _save_kv(self.kv_pool, layer, loc, k[:n], v[:n])
            if self._attn is None:
                self._build(layer)
                self._plan(forward_batch, rows=n)
            self._check_layer(layer)
            out = self._attn.run(q[:n].reshape(n, layer.tp_q_head_num, layer.qk_head_dim), layer.layer_id)
            return out.reshape(n, layer.tp_q_head_num * layer.v_head_dim)

        def get_cuda_graph_seq_len_fill_value(self):
            return self.inner.get_cuda_graph_seq_len_fill_value()

        # --- forward --------------------------------------------------------

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if self._extend_fb is not None:
                # The first extend this backend sees: build the tier (it needs the layer) and
                # start tracking the batch's requests. Nothing is on the host yet.
                fb, self._extend_fb = self._extend_fb, None
                if self._attn is None:
                    self._build(layer)
                    if self._tier.offload and self._attn.extend_flash:
                        # FlashInfer compiles the chunk kernel on first use (over a minute on a
                        # fresh cache): here, at the first prefill, not inside the first long prompt.
                        log.info("kvtier: preparing the attention kernel of prefill chunks with host pages")
                        log.info("kvtier: prefill-chunk kernel ready in %.1f s", self._attn.warm_extend(q.dtype))
                if self._tier.offload:
                    self._plan_extend(fb)
            if not self._extend_hybrid:
                return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
            if save_kv_cache and k is not None and v is not None:
                _save_kv(self.kv_pool, layer, forward_batch.out_cache_loc, k, v)
            self._check_layer(layer)
            q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
            out = self._attn.run_extend(q3, layer.layer_id)
            return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if self._capturing:
                # A decode graph's warm-up (a placeholder; the tier is not touched) or its capture,
                # where sglang's wrapper ends the segment here and replays the call between segments.
                return self._decode_break(q, k, v, layer, save_kv_cache)
            return self._decode_rows(q, k, v, layer, forward_batch.batch_size, forward_batch.out_cache_loc,
                                     forward_batch, save_kv_cache)

        # --- tier -----------------------------------------------------------

        def _build(self, layer) -> None:
            # The runtime (and the native engine) load here, in the scheduler,
            # so that a missing build fails with its rebuild message at the
            # first decode instead of silently disabling the plugin.
            from kvtier._native import Engine, use_isa
            from kvtier.policies import policy_for
            from kvtier.runtime.hybrid import HybridAttention, pipeline_possible
            from kvtier.runtime.ranks import pinned_to, rank_share
            from kvtier.runtime.tier import TierManager
            from kvtier.store import HostStore

            n_layers = getattr(self.kv_pool, "layer_num", None) or len(self.kv_pool.k_buffer)
            if getattr(layer, "is_cross_attention", False) or (getattr(layer, "sliding_window_size", -1) or -1) > -1:
                raise launch.KvTierLaunchError("kvtier serves full causal self-attention only; this model's layer "
                                               f"{layer.layer_id} uses a sliding window or cross-attention")
            if layer.qk_head_dim != layer.v_head_dim:
                raise launch.KvTierLaunchError(f"kvtier needs equal q/k and v head dims, found {layer.qk_head_dim} "
                                               f"and {layer.v_head_dim}")
            shape = ModelShape(n_layers, layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim)
            policy = policy_for(self.config)
            k_pool = [self.kv_pool.get_key_buffer(i) for i in range(n_layers)]
            v_pool = [self.kv_pool.get_value_buffer(i) for i in range(n_layers)]
            store = HostStore(self.config, shape, pin_memory=False) if policy.offloads else None
            why = self._why_slots_stay(policy)
            self.releases_slots = why is None
            if policy.offloads:
                log.info("kvtier: %s", "evicted device slots return to sglang's allocator" if why is None
                         else f"device KV is kept on both sides (stage 1): {why}")
                stage3 = self._stage3_why_not()
                log.info("kvtier: %s", "prefill chunks evict as they go (stage 3): a request holds at most "
                         f"{device_bound_tokens(self)} tokens of the GPU pool; the host store holds "
                         f"{self.host_capacity_tokens()} tokens" if stage3 is None else
                         f"a prompt must fit the GPU pool once (no stage 3): {stage3}")
            # Evicted pages settle at fixed points of the step, not when a copy happens to land:
            # under TP every rank's scheduler reads its own allocator and must decide alike, and
            # on any server which tokens are attended from the host (and so the greedy output)
            # must not depend on copy timing.
            self._tier = TierManager(self.config, shape, k_pool, v_pool, store, alloc_slots=None,
                                     free_slots=self._free_evicted if self.releases_slots else _keep,
                                     offload=policy.offloads, lockstep=True)
            cache = lifecycle.cache_of(self.req_to_token_pool)
            if store is not None and self.prefix_cache and cache is not None:
                store.reclaim = cache.reclaim_host  # cached prefixes give way to running requests
                log.info("kvtier: prefix caching keeps finished requests' host pages; a hit attends them in place")
            # Each TP rank tiers its own kv-heads (layer.tp_k_head_num) on its own slice of the cores.
            share = rank_share(self.config, tp_size=self.tp_size, tp_rank=self.tp_rank,
                               total_kv_heads=layer.tp_k_head_num * self.tp_size)
            engine = None
            if policy.offloads and policy.host_path == "engine":
                threads = share.threads
                if (not self.config.engine.threads and threads > 2
                        and pipeline_possible(policy, self.device)):
                    threads -= 1  # pipelined, the scheduler thread keeps queueing while the engine runs
                use_isa(self.config.engine.isa.value)
                with pinned_to(share.cores[:threads] if self.tp_size > 1 else ()):
                    engine = Engine(threads)
            self._engine = engine
            self._scale, self._cap = layer.scaling, float(getattr(layer, "logit_cap", 0.0) or 0.0)
            # On CUDA the stream hands each layer's query to the engine (pipelined) unless
            # KVTIER_PIPELINE=off: under a real server it decoded the same tokens twice as fast.
            self._attn = HybridAttention(policy, shape, self._tier, engine=engine, sm_scale=self._scale,
                                         soft_cap=self._cap, use_flashinfer=self.device.type == "cuda",
                                         pipeline_default=True)

        def _why_slots_stay(self, policy) -> Optional[str]:
            """None when evicted device slots can go back to sglang (stage 2), else why not."""
            from .plugin import slot_release_hooked

            win = self.config.window
            if not policy.offloads:
                return "the policy keeps every token on the device"
            if not slot_release_hooked():
                return ("this sglang release frees rows through neither BasePrefixCache.free_kv_row nor "
                        "ChunkCache.cache_finished_req, which kvtier hooks")
            if not callable(getattr(self.allocator, "free", None)):
                return "the model runner has no token allocator with free()"
            if not getattr(self.server_args, "disable_radix_cache", False) and not _prefix_cache_selected(
                    self.server_args):
                return "the radix cache is on, and a prefix hit must never reach a freed slot"
            if win.sink_tokens % self.page_size or win.page_tokens % self.page_size:
                return (f"sglang's page size {self.page_size} does not divide window.sink_tokens "
                        f"{win.sink_tokens} and window.page_tokens {win.page_tokens}")
            return None

        def _stage3_why_not(self) -> Optional[str]:
            """None when prefill chunks come here and evict as they go (stage 3), else why not."""
            from kvtier.policies import policy_for

            policy = policy_for(self.config)
            why = self._why_slots_stay(policy)
            if why is not None:
                return why
            prefill = getattr(self.server_args, "prefill_attention_backend", None)
            if prefill != launch.PREFILL_BACKEND:
                return f"prefill runs on --prefill-attention-backend {prefill}, not through the tier"
            return None

        def host_capacity_tokens(self) -> int:
            """Tokens the host store holds in all (stage 3 admission caps one request's input by it)."""
            from kvtier.store.host_store import capacity_pages

            if self._tier is not None and self._tier.store is not None:
                pages = self._tier.store.stats().total_pages
            else:  # before the first batch builds the store: what it will hold (query heads do not count)
                pool = self.kv_pool
                n_layers = getattr(pool, "layer_num", None) or len(pool.k_buffer)
                hkv = int(pool.head_num)
                pages = capacity_pages(self.config, ModelShape(n_layers, hkv, hkv, int(pool.head_dim)))
            return pages * self.config.window.page_tokens

        def host_tokens_of(self, row: int) -> int:
            """Host tokens allocated to request row (0 if the tier does not track it).

            Counted from the pages allocated when their copies start, not from the copies that
            have landed: admission must decide the same on every TP rank, whatever each rank's
            copy timing.
            """
            store = None if self._tier is None else self._tier.store
            if store is None or row not in store:
                return 0
            return len(store.table(row).pages) * self.config.window.page_tokens

        def host_tokens_dropped(self, row: int) -> bool:
            """Whether request row lost host pages under memory pressure (`on_full: evict`)."""
            store = None if self._tier is None else self._tier.store
            return store is not None and row in store and store.table(row).dropped_tokens > 0

        def host_free_tokens(self) -> int:
            """Tokens the host store can still take (with the prefix cache: also the pages only the
            cache holds, which it gives back when the store runs short)."""
            if self._tier is not None and self._tier.store is not None:
                store = self._tier.store
                pages = store.stats().free_pages + (store.cache_only_pages() if store.reclaim is not None else 0)
                return pages * self.config.window.page_tokens
            return self.host_capacity_tokens()

        def _free_evicted(self, slots: torch.Tensor) -> None:
            self.allocator.free(slots.to(self.device))
            self.slots_released += slots.numel()

        def freed_range(self, row: int) -> Optional[Tuple[int, int]]:
            """Row positions [lo, hi) whose slots the tier gave back to the allocator, if any."""
            if not self.releases_slots or self._tier is None or row not in self._tier.requests:
                return None
            lo, hi = self._tier.freed_positions(row)
            return (lo, hi) if hi > lo else None

        def _check_layer(self, layer) -> None:
            cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
            if layer.scaling != self._scale or cap != self._cap:
                raise launch.KvTierLaunchError(
                    f"kvtier needs one softmax scale and soft-cap for all layers, found layer {layer.layer_id} "
                    f"with scale {layer.scaling} / cap {cap} against {self._scale} / {self._cap}")

        def _track(self, row: int, n: int, *, cached: bool = False) -> None:
            """Bring the tier's record of request row up to its first n tokens (all in sglang's row).

            cached: a new request's first n tokens are a prefix the radix cache matched.
            """
            tier = self._tier
            st = tier.requests.get(row)
            if st is not None and st.length > n:  # the row was reused by a new request
                self.release(row)
                st = None
            if st is None:
                if cached and n > 0 and self.prefix_cache:
                    self._adopt(row, n)
                    return
                tier.add(row)
            have = tier.requests[row].length
            if n > have:
                tier.extend(row, n - have, slots=self.req_to_token_pool.req_to_token[row, have:n].to(torch.long).cpu())

        def _adopt(self, row: int, n: int) -> None:
            """Start request row on the cached prefix its row names (prefix.py's layout)."""
            from .prefix import decode, host_run, usable_prefix

            win = self.config.window
            S, T = win.sink_tokens, win.page_tokens
            values = self.req_to_token_pool.req_to_token[row, :n].to("cpu", torch.long)
            usable = usable_prefix(values, S, T)
            if usable != n:  # the cache matches usable prefixes only
                raise RuntimeError(f"kvtier: request row {row} starts on a cached prefix of {n} tokens, of which "
                                   f"the tier can take {usable}")
            run = host_run(values, S)
            pages = (decode(values[S:S + run]).view(-1, T)[:, 0] // T).tolist() if run else []
            self._tier.adopt(row, sink_slots=values[:min(n, S)], host_pages=pages,
                             recent_slots=values[S + run:] if n > S else values[:0], owned_until=n)
            self._addressed[row] = S + run
            self.prefix_hit_host_tokens += run
            if n > S + run:
                self._tails[row] = (S + run, n)

        def tail_on_host(self, row: int) -> Tuple[int, int]:
            """[lo, hi): positions of the cached device tail request row started on that it has
            since copied to its own host pages (empty when none)."""
            lo, hi = self._tails.get(row, (0, 0))
            st = None if self._tier is None else self._tier.requests.get(row)
            if st is None or self.host_tokens_dropped(row):
                return 0, 0
            return lo, max(lo, min(hi, st.host_end))

        def tail_demoted(self, row: int, tokens: int) -> None:
            self.tail_tokens_demoted += tokens
            self.slots_released += tokens

        def _write_addresses(self) -> None:
            """Prefix cache: the host address of each slot the tier freed, into the rows."""
            from .prefix import encode

            tier = self._tier
            table = self.req_to_token_pool.req_to_token
            for row in tier.requests:
                lo, hi = tier.freed_positions(row)
                if row not in tier.store:
                    continue
                lo = max(lo, self._addressed.get(row, lo), tier.store.table(row).first_pos)
                if hi > lo:
                    table[row, lo:hi] = encode(tier.host_addresses(row, lo, hi)).to(table.device, table.dtype)
                    self._addressed[row] = hi

        def _evict(self) -> None:
            try:
                self._tier.evict()
            except CapacityError as exc:
                # Nothing stored is touched (allocation is all or nothing per request): the pages
                # that did not fit stay on the GPU and are attended there until room frees up.
                self.evictions_refused += 1
                now = time.monotonic()
                if now - self._last_full_log >= self.stats_every_s:
                    self._last_full_log = now
                    log.warning("kvtier: host store full, pages stay on the GPU for now: %s", exc)
            if self.prefix_cache:
                self._write_addresses()

        def _plan_extend(self, forward_batch) -> None:
            """Stage 3: before a prefill chunk, evict what left the window, then add the chunk.

            The prefix (earlier chunks) is fully written, so its pages may leave; the chunk's
            tokens are written layer by layer during this forward, so they join the tier only
            after the eviction and leave at the next batch at the earliest.
            """
            tier = self._tier
            rows = forward_batch.req_pool_indices.tolist()
            prefix = forward_batch.extend_prefix_lens_cpu
            new = forward_batch.extend_seq_lens_cpu
            if prefix is None or new is None:
                seq = forward_batch.seq_lens.cpu().tolist()
                new = forward_batch.extend_seq_lens.cpu().tolist()
                prefix = [s - n for s, n in zip(seq, new)]
            for row, p in zip(rows, prefix):
                st = tier.requests.get(row)
                if st is not None and st.length != p:  # a new request on a reused row, or a re-prefill
                    self.release(row)
                self._track(row, int(p), cached=True)
            self._evict()  # settles the copies that have landed, then starts the new ones
            self._extend_hybrid = any(tier.host_tokens(r) > 0 for r in rows)
            for row, p, n in zip(rows, prefix, new):
                self._track(row, int(p) + int(n))
            if self._extend_hybrid:
                self._attn.plan_extend(rows, [int(n) for n in new])

        def _plan(self, forward_batch, rows: Optional[int] = None) -> None:
            """rows: how many of the batch's rows are requests (a replayed graph pads the rest)."""
            t0 = time.perf_counter()
            tier = self._tier
            count = forward_batch.batch_size if rows is None else rows
            rows = forward_batch.req_pool_indices[:count].tolist()
            lens = (forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None
                    else forward_batch.seq_lens.cpu())[:count].tolist()
            for row, n in zip(rows, lens):
                self._track(row, n)
            self._evict()
            self._attn.plan(rows)  # it waits for the previous step's window kernels
            self.clock.decode_planned(t0, time.perf_counter(), self._attn.take_times())
            now = time.monotonic()
            if self.metrics is not None and now - self._last_metrics >= METRICS_EVERY_S:
                self._last_metrics = now
                self.metrics.update(self.tp_rank, self.tier_stats())
            if now - self._last_log >= self.stats_every_s:
                self._last_log = now
                st = tier.stats()
                log.info("kvtier: %d requests, %d tokens on the device, %d on the host, %d device slots released, "
                         "%.1f MB device-to-host, %d pages evicted", len(tier.requests), st.device_tokens,
                         st.host_tokens, self.slots_released, st.bytes_d2h / 1e6, st.pages_evicted)
                if self.prefix_cache:
                    log.info("kvtier: prefix cache: %d host tokens kept, %d host tokens of prefix hits attended "
                             "in place", tier.store.cache_holds if tier.store is not None else 0,
                             self.prefix_hit_host_tokens)
                t = self.last_timing = self.clock.take()
                if t is not None:
                    log.info("kvtier: decode %d steps, %.2f ms/step: attention %.2f (engine %.2f, window GPU %.2f), "
                             "plan %.2f", t["steps"], t["step_ms"], t["attention_ms"], t["engine_ms"],
                             t["window_gpu_ms"], t["plan_ms"])

        def release(self, row: int) -> None:
            self._addressed.pop(row, None)
            self._tails.pop(row, None)
            if self._tier is not None and row in self._tier.requests:
                self._tier.release(row)

        def tier_stats(self) -> Dict[str, float]:
            if self._tier is None:
                return {}
            store = self._tier.store
            return {**self._tier.stats()._asdict(), "requests": len(self._tier.requests),
                    "slots_released": self.slots_released,
                    "evictions_refused": self.evictions_refused,
                    "cached_host_tokens": 0 if store is None else store.cache_holds,
                    "prefix_hit_host_tokens": self.prefix_hit_host_tokens,
                    "tail_tokens_demoted": self.tail_tokens_demoted}

    _CLASS = KvTierAttnBackend
    return _CLASS


def _prefix_cache_selected(server_args) -> bool:
    """Whether this server runs the kvtier radix cache (prefix.py) with the radix cache on."""
    from .prefix import NAME

    return (not getattr(server_args, "disable_radix_cache", True)
            and getattr(server_args, "radix_cache_backend", None) == NAME)


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


def _keep(slots: torch.Tensor) -> None:
    """Stage 1: evicted pages keep their device slots."""


def _save_kv(pool, layer, loc, k, v) -> None:
    try:
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    except ImportError:  # releases before KVWriteLoc take the location itself
        pool.set_kv_buffer(layer, loc, k, v)
        return
    pool.set_kv_buffer(layer, KVWriteLoc(loc, None), k, v)


__all__: List[str] = ["create_backend", "register_backend"]
