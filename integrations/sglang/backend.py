"""The `kvtier` decode attention backend for sglang.

It wraps sglang's stock backend (FlashInfer on CUDA, torch_native on CPU),
which keeps doing prefill. For decode batches it tracks each request's
tokens in a `TierManager` over sglang's own KV pool, mirrors pages that
leave the window into the host store, and answers each layer with the hybrid
attention: dense over sinks + window on the device, sparse over the host
store on the CPU, merged by LSE.

Sequencing (DESIGN.md): this is stage 1. Device KV is kept on both sides:
evicted pages stay in sglang's pool while the host store answers for them,
so the merge is validated against a complete device copy and the tree cache
never sees a freed slot. Releasing device slots (stage 2) and evicting
during chunked prefill (stage 3) come next.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from kvtier.config import ModelShape, TierConfig

from . import launch, lifecycle

_INNER = {"cuda": "flashinfer", "cpu": "torch_native"}


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    if launch.BACKEND in ATTENTION_BACKENDS:
        return
    add_attention_backend_choices([launch.BACKEND])
    register_attention_backend(launch.BACKEND)(create_backend)


def create_backend(runner):
    return _backend_class()(runner, launch.config_for(getattr(runner, "server_args", None)))


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
            self.forward_metadata = None
            self._tier = None  # TierManager, built at the first decode (it needs the layer shapes)
            self._attn = None  # HybridAttention
            self._decode = False
            lifecycle.track(self)

        # --- metadata -------------------------------------------------------

        def init_forward_metadata(self, forward_batch):
            self._decode = forward_batch.forward_mode.is_decode()
            self.inner.init_forward_metadata(forward_batch)
            if self._decode and self._attn is not None:
                self._plan(forward_batch)
            self.forward_metadata = getattr(self.inner, "forward_metadata", None)

        def init_cuda_graph_state(self, *args, **kwargs):
            raise RuntimeError("the kvtier decode backend does not run under CUDA-graph capture; "
                               "--kv-tier launches with decode graphs disabled")

        def get_cuda_graph_seq_len_fill_value(self):
            return self.inner.get_cuda_graph_seq_len_fill_value()

        # --- forward --------------------------------------------------------

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if save_kv_cache and k is not None and v is not None:
                _save_kv(self.kv_pool, layer, forward_batch.out_cache_loc, k, v)
            if self._attn is None:
                self._build(layer)
                self._plan(forward_batch)
            self._check_layer(layer)
            b = forward_batch.batch_size
            q3 = q.reshape(b, layer.tp_q_head_num, layer.qk_head_dim)
            out = self._attn.run(q3, layer.layer_id)
            return out.reshape(b, layer.tp_q_head_num * layer.v_head_dim)

        # --- tier -----------------------------------------------------------

        def _build(self, layer) -> None:
            # The runtime (and the native engine) load here, in the scheduler,
            # so that a missing build fails with its rebuild message at the
            # first decode instead of silently disabling the plugin.
            from kvtier._native import Engine
            from kvtier.policies import policy_for
            from kvtier.runtime.hybrid import HybridAttention
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
            self._tier = TierManager(self.config, shape, k_pool, v_pool, store, alloc_slots=None,
                                     free_slots=lambda slots: None, offload=policy.offloads)
            # Each TP rank tiers its own kv-heads (layer.tp_k_head_num) on its own slice of the cores.
            share = rank_share(self.config, tp_size=self.tp_size, tp_rank=self.tp_rank,
                               total_kv_heads=layer.tp_k_head_num * self.tp_size)
            engine = None
            if policy.offloads and policy.host_path == "engine":
                with pinned_to(share.cores if self.tp_size > 1 else ()):
                    engine = Engine(share.threads)
            self._engine = engine
            self._scale, self._cap = layer.scaling, float(getattr(layer, "logit_cap", 0.0) or 0.0)
            self._attn = HybridAttention(policy, shape, self._tier, engine=engine, sm_scale=self._scale,
                                         soft_cap=self._cap, use_flashinfer=self.device.type == "cuda")

        def _check_layer(self, layer) -> None:
            cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
            if layer.scaling != self._scale or cap != self._cap:
                raise launch.KvTierLaunchError(
                    f"kvtier needs one softmax scale and soft-cap for all layers, found layer {layer.layer_id} "
                    f"with scale {layer.scaling} / cap {cap} against {self._scale} / {self._cap}")

        def _plan(self, forward_batch) -> None:
            tier = self._tier
            rows = forward_batch.req_pool_indices.tolist()
            lens = (forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None
                    else forward_batch.seq_lens.cpu()).tolist()
            table = self.req_to_token_pool.req_to_token
            for row, n in zip(rows, lens):
                st = tier.requests.get(row)
                if st is not None and st.length > n:  # the row was reused by a new request
                    tier.release(row)
                    st = None
                if st is None:
                    tier.add(row)
                have = tier.requests[row].length
                if n > have:
                    tier.extend(row, n - have, slots=table[row, have:n].to(torch.long).cpu())
            tier.evict()
            self._attn.plan(rows)

        def release(self, row: int) -> None:
            if self._tier is not None and row in self._tier.requests:
                self._tier.release(row)

        def tier_stats(self) -> Dict[str, float]:
            if self._tier is None:
                return {}
            return self._tier.stats()._asdict()

    _CLASS = KvTierAttnBackend
    return _CLASS


def _save_kv(pool, layer, loc, k, v) -> None:
    try:
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc
    except ImportError:  # releases before KVWriteLoc take the location itself
        pool.set_kv_buffer(layer, loc, k, v)
        return
    pool.set_kv_buffer(layer, KVWriteLoc(loc, None), k, v)


__all__: List[str] = ["create_backend", "register_backend"]
