"""Fixtures and helpers shared by the sglang plugin's tests (tests/test_sglang_*.py).

Each of those files imports this module after its pytest.importorskip("sglang"):
importing it imports kvtier_sglang, which needs sglang. The fixtures reach a test
file by being imported into it, not through conftest.py, whose fixtures the
whole suite sees (and the suite runs without sglang).
"""

import subprocess
import sys

import pytest
import torch

import kvtier_sglang


TIER = """policy: POLICY
window: {sink_tokens: 2, window_tokens: 8, page_tokens: 4}
host_store: {capacity_gib: 0.01, key_format: KEYS, summary_tokens: 4}
budget: BUDGET
max_context_tokens: 256
engine: {threads: 1}
"""


@pytest.fixture(scope="module", autouse=True)
def registered():
    kvtier_sglang.register()


@pytest.fixture
def tiny_model(tmp_path):
    """A config-only llama directory: enough for argument resolution, no weights."""
    import json

    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    }))
    return d


def _tier_yaml(tmp_path, keys="bf16", budget="{kind: all}", policy="hgca", knobs=""):
    path = tmp_path / "tier.yaml"
    path.write_text(TIER.replace("POLICY", policy).replace("KEYS", keys).replace("BUDGET", budget) + knobs)
    return path


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          timeout=240)


def _stage2_backend(*, disable_radix_cache=True, page_size=1, size=2048, hq=4, hkv=2, d=64, capacity_gib=0.05,
                    prefill_backend=None, keys="bf16", budget="{kind: all}", tp_size=1, tp_rank=0,
                    radix_cache_backend=None, policy="hgca", knobs=""):
    """The kvtier backend over sglang's real pools and allocator (CPU, fp32, one layer)."""
    from types import SimpleNamespace

    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from kvtier.config import loads
    from kvtier_sglang.backend import KvTierAttnBackend

    req_pool = ReqToTokenPool(size=4, max_context_len=1024, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=size, page_size=page_size, dtype=torch.float32, head_num=hkv, head_dim=d,
                               layer_num=1, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(size=size, dtype=torch.float32, device="cpu", kvcache=kv_pool,
                                       need_sort=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
                             token_to_kv_pool_allocator=allocator, page_size=page_size, tp_size=tp_size,
                             tp_rank=tp_rank,
                             server_args=SimpleNamespace(disable_radix_cache=disable_radix_cache,
                                                         prefill_attention_backend=prefill_backend,
                                                         radix_cache_backend=radix_cache_backend))
    config = loads(f"policy: {policy}\nwindow: {{sink_tokens: 16, window_tokens: 64, page_tokens: 16}}\n"
                   f"host_store: {{capacity_gib: {capacity_gib}, key_format: {keys}, summary_tokens: 16}}\n"
                   f"budget: {budget}\nmax_context_tokens: 1024\nengine: {{threads: 1}}\n{knobs}", "<test>")
    backend = KvTierAttnBackend(runner, config)
    layer = RadixAttention(hq, d, d ** -0.5, hkv, layer_id=0)
    return backend, layer, runner


class _Requests:
    """Rows of the real pools filled like sglang's prefill, a full K/V history kept aside for the reference."""

    def __init__(self, runner, lens, hkv=2, d=64):
        self.runner, self.rows, self.lens = runner, list(range(len(lens))), list(lens)
        self.k, self.v = {}, {}
        self.hkv, self.d = hkv, d
        for row, n in zip(self.rows, lens):
            self.k[row], self.v[row] = torch.empty(0, hkv, d), torch.empty(0, hkv, d)
            self._append(row, n)

    def _append(self, row, n):
        slots = self.runner.token_to_kv_pool_allocator.alloc(n)
        assert slots is not None
        k, v = torch.randn(n, self.hkv, self.d), torch.randn(n, self.hkv, self.d)
        pos = self.k[row].shape[0]
        self.runner.req_to_token_pool.req_to_token[row, pos:pos + n] = slots.to(torch.int32)
        self.runner.token_to_kv_pool.k_buffer[0][slots] = k
        self.runner.token_to_kv_pool.v_buffer[0][slots] = v
        self.k[row], self.v[row] = torch.cat([self.k[row], k]), torch.cat([self.v[row], v])
        return slots

    def extend_step(self, backend, layer, chunks, hq=4):
        """One prefill chunk per request ({row: new tokens}) through the backend, which writes
        the chunk's K, V itself as sglang's prefill does; returns (out, causal dense reference)."""
        from types import SimpleNamespace

        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        rows, new = list(chunks), list(chunks.values())
        prefix = [self.k[r].shape[0] for r in rows]
        loc = self.runner.token_to_kv_pool_allocator.alloc(sum(new))
        assert loc is not None, "the pool ran out of slots"
        q = torch.randn(sum(new), hq * self.d)
        k, v = torch.randn(sum(new), self.hkv, self.d), torch.randn(sum(new), self.hkv, self.d)
        o = 0
        for row, p, n in zip(rows, prefix, new):
            self.runner.req_to_token_pool.req_to_token[row, p:p + n] = loc[o:o + n].to(torch.int32)
            self.k[row], self.v[row] = torch.cat([self.k[row], k[o:o + n]]), torch.cat([self.v[row], v[o:o + n]])
            o += n
        seq = torch.tensor([p + n for p, n in zip(prefix, new)])
        fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=len(rows), req_pool_indices=torch.tensor(rows),
                             seq_lens=seq, seq_lens_cpu=seq, extend_prefix_lens=torch.tensor(prefix),
                             extend_seq_lens=torch.tensor(new), extend_prefix_lens_cpu=prefix,
                             extend_seq_lens_cpu=new, encoder_lens=None, out_cache_loc=loc,
                             encoder_out_cache_loc=None)
        backend.init_forward_metadata(fb)
        out = backend.forward_extend(q, k, v, layer, fb)
        ref, o = [], 0
        for row, p, n in zip(rows, prefix, new):
            qi = q[o:o + n].view(n, self.hkv, hq // self.hkv, self.d).double()
            s = torch.einsum("lhgd,nhd->lhgn", qi, self.k[row].double()) * layer.scaling
            seen = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]
            s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
            ref.append(torch.einsum("lhgn,nhd->lhgd", s.softmax(-1), self.v[row].double()).reshape(n, -1))
            o += n
        return out, torch.cat(ref).float()

    def decode_step(self, backend, layer, hq=4):
        """One decode token per request through the backend; returns (out, dense reference)."""
        from types import SimpleNamespace

        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        loc = self.runner.token_to_kv_pool_allocator.alloc(len(self.rows))
        pos = [self.k[r].shape[0] for r in self.rows]
        for row, p, slot in zip(self.rows, pos, loc.tolist()):
            self.runner.req_to_token_pool.req_to_token[row, p] = slot
        lens = torch.tensor([p + 1 for p in pos])
        fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=len(self.rows),
                             req_pool_indices=torch.tensor(self.rows), seq_lens=lens, seq_lens_cpu=lens,
                             out_cache_loc=loc)
        q = torch.randn(len(self.rows), hq * self.d)
        k, v = torch.randn(len(self.rows), self.hkv, self.d), torch.randn(len(self.rows), self.hkv, self.d)
        for i, row in enumerate(self.rows):
            self.k[row], self.v[row] = torch.cat([self.k[row], k[i:i + 1]]), torch.cat([self.v[row], v[i:i + 1]])
        backend.init_forward_metadata(fb)
        out = backend.forward_decode(q, k, v, layer, fb)
        ref = []
        for i, row in enumerate(self.rows):
            qi = q[i].view(self.hkv, hq // self.hkv, self.d).double()
            s = torch.einsum("hgd,nhd->hgn", qi, self.k[row].double()) * layer.scaling
            ref.append(torch.einsum("hgn,nhd->hgd", s.softmax(-1), self.v[row].double()).reshape(-1))
        return out, torch.stack(ref).float()


def _free_row(runner, row, length):
    """sglang's own release of a finished request with the radix cache off, then the row.

    The 0.5.23 line frees through BasePrefixCache.free_kv_row; earlier releases
    through ChunkCache.cache_finished_req. Either is called as sglang calls it,
    hooks included."""
    from types import SimpleNamespace

    cache = SimpleNamespace(token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                            req_to_token_pool=runner.req_to_token_pool)
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache

    if hasattr(BasePrefixCache, "free_kv_row"):
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        kv = ReqKvInfo(req_pool_idx=row)
        BasePrefixCache.free_kv_row(cache, kv, [(0, length)])
        req = SimpleNamespace(req_pool_idx=row, kv=kv)
    else:
        from sglang.srt.mem_cache.chunk_cache import ChunkCache

        req = SimpleNamespace(req_pool_idx=row, cache_protected_len=0, kv=SimpleNamespace(req_pool_idx=row))
        ChunkCache.cache_finished_req(cache, req, kv_len_to_handle=length)
    runner.req_to_token_pool.free(req)


def _free_slot_census(allocator):
    parts = [allocator.free_pages]
    if getattr(allocator, "release_pages", None) is not None:
        parts.append(allocator.release_pages)
    free = torch.cat(parts)
    return free.numel(), torch.unique(free).numel()


def _poison_free_slots(runner):
    """Overwrite every free slot's K, V, as other requests would: a read of a freed slot shows."""
    alloc = runner.token_to_kv_pool_allocator
    parts = [alloc.free_pages] + ([alloc.release_pages] if getattr(alloc, "release_pages", None) is not None else [])
    free = torch.cat(parts)
    runner.token_to_kv_pool.k_buffer[0][free] = 1e4
    runner.token_to_kv_pool.v_buffer[0][free] = -1e4


def _prefill(reqs, backend, layer, prompt, chunk=96):
    while any(reqs.k[r].shape[0] < n for r, n in prompt.items()):
        step = {r: min(chunk, n - reqs.k[r].shape[0]) for r, n in prompt.items() if reqs.k[r].shape[0] < n}
        out, ref = reqs.extend_step(backend, layer, step)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        _poison_free_slots(reqs.runner)


def _finish(tree, runner, row, tokens, prefix_len=0, lock=None):
    """sglang's release of a finished request, with the tree keeping it: release_kv_cache on the
    0.5.23 line, RadixCache.cache_finished_req on 0.5.17."""
    from array import array
    from types import SimpleNamespace

    from sglang.srt.mem_cache.radix_cache import RadixCache

    if not hasattr(RadixCache, "checkpoint"):  # 0.5.17: the lock is the matched node
        req = SimpleNamespace(req_pool_idx=row, cache_protected_len=prefix_len, origin_input_ids=list(tokens),
                              output_ids=[], extra_key=None, priority=None, last_node=lock)
        tree.cache_finished_req(req, kv_len_to_handle=len(tokens))
        runner.req_to_token_pool.free(req)
        return
    from sglang.srt.managers.schedule_batch import ReqKvInfo

    kv = ReqKvInfo(req_pool_idx=row, cache_protected_len=prefix_len)
    req = SimpleNamespace(kv=kv, req_pool_idx=row, full_untruncated_fill_ids=array("q", tokens),
                          origin_input_ids=list(tokens), extra_key=None, cache_salt=None, priority=None, lock=lock,
                          last_node=None, finished=lambda: True)
    tree.checkpoint(req, up_to=len(tokens))
    tree.free_kv_row(kv, [(kv.cache_protected_len, len(tokens))])
    tree.unlock(req.lock)
    runner.req_to_token_pool.free(req)
