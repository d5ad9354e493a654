"""The runtime's CUDA paths against their references: the fused LSE merge, and hybrid attention with
FlashInfer's window and the engine equal to dense when the budget is everything. Skipped without a GPU."""

import importlib.util

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime import dense_attention
from kvtier.runtime.merge import AttnPart, merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_GPU = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(_GPU and importlib.util.find_spec("triton") is None, reason="needs Triton")
needs_flashinfer = pytest.mark.skipif(_GPU and importlib.util.find_spec("flashinfer") is None,
                                      reason="needs FlashInfer")


@needs_triton
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_merge_equals_the_reference(d, dtype):
    from kvtier.runtime import fused_merge

    g = torch.Generator().manual_seed(d)
    b, hq = 5, 14
    a_out = torch.randn(b, hq, d, generator=g).to(dtype)
    a_lse2 = torch.randn(b, hq, generator=g) * 4
    b_out = torch.randn(b, hq, d, generator=g)
    b_lse = torch.randn(b, hq, generator=g) * 4
    a_lse2[0, :3] = float("-inf")  # empty window rows
    b_lse[1, :] = float("-inf")  # a request with nothing on the host
    a_lse2[2, 0] = b_lse[2, 0] = float("-inf")  # both empty: output 0
    ref = merge(AttnPart(a_out.double(), a_lse2.double() * fused_merge.LN2), AttnPart(b_out.double(), b_lse.double()))
    dev = torch.device("cuda")
    got = fused_merge.merge_into(torch.empty(b, hq, d, dtype=dtype, device=dev), a_out.to(dev), a_lse2.to(dev),
                                 b_out.to(dev), b_lse.to(dev), a_lse_base2=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), ref.out, atol=2e-2, rtol=2e-2)
    assert torch.all(got[2, 0] == 0)
    with pytest.raises(ValueError, match="a_lse"):
        fused_merge.merge_into(got, a_out.to(dev), a_lse2.to(dev)[:, :3], b_out.to(dev), b_lse.to(dev),
                               a_lse_base2=True)


@needs_flashinfer
@pytest.mark.parametrize("policy", [
    {"policy": "hgca", "budget": {"kind": "all"}},
    {"policy": "hcattention", "budget": {"kind": "all"}},
    # every host token kept by the GPU selection: with exact logits the engine recomputes them all
    {"policy": "hcattention", "budget": {"kind": "tokens", "tokens": 100000}, "hcattention": {"logits": "exact"}},
    # ... and with the approximate logits of 8-bit device keys, still within bf16-level agreement
    {"policy": "hcattention", "budget": {"kind": "tokens", "tokens": 100000},
     "hcattention": {"key_bits": 8, "logits": "approximate"}},
], ids=["hgca", "hcattention-all", "hcattention-exact", "hcattention-int8-approximate"])
@pytest.mark.parametrize("group", [4, 7])
def test_hybrid_on_cuda_with_everything_equals_dense(group, policy):
    from kvtier.runtime.standalone import StandaloneTier

    shape = ModelShape(n_layers=2, num_q_heads=2 * group, kv_heads=2, head_dim=64)
    cfg = from_mapping({**policy, "window": {"sink_tokens": 16, "window_tokens": 128, "page_tokens": 16},
                        "max_context_tokens": 8192})
    dev = torch.device("cuda")
    st = StandaloneTier(cfg, shape, device=dev, dtype=torch.bfloat16, device_tokens=2048, host_tokens=4096)
    g = torch.Generator().manual_seed(group)
    lens = [1500, 90, 700]
    full = {}
    try:
        for r, n in enumerate(lens):
            st.tier.add(r)
            plan = st.tier.prefill(r, n)
            full[r] = []
            for layer in range(shape.n_layers):
                k = torch.randn(n, 2, 64, generator=g).to(torch.bfloat16)
                v = torch.randn(n, 2, 64, generator=g).to(torch.bfloat16)
                st.tier.write_prefill_layer(plan, layer, k.to(dev), v.to(dev))
                full[r].append((k, v))
        st.tier.drain()
        rids = list(range(len(lens)))
        st.attn.plan(rids)
        assert st.attn.flashinfer is not None
        for layer in range(shape.n_layers):
            q = torch.randn(len(lens), shape.num_q_heads, 64, generator=g).to(torch.bfloat16)
            got = st.attn.run(q.to(dev), layer).cpu()
            ks = torch.cat([full[r][layer][0] for r in rids]).double()
            vs = torch.cat([full[r][layer][1] for r in rids]).double()
            indptr = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
            ref = dense_attention(q.double(), ks, vs, indptr, sm_scale=64 ** -0.5).out
            # int8 host keys, bf16 values and output: bf16-level agreement with float64 dense
            torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)
    finally:
        st.close()


@needs_flashinfer
def test_a_fork_on_cuda_attends_the_shared_host_pages_and_equals_dense():
    """TierManager.fork with copies in flight on the side stream: the fork settles them, shares
    the host pages and copies the device part; both continuations equal dense."""
    from kvtier.runtime.standalone import StandaloneTier

    shape = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
    cfg = from_mapping({"policy": "hgca", "window": {"sink_tokens": 16, "window_tokens": 128, "page_tokens": 16},
                        "budget": {"kind": "all"}, "max_context_tokens": 8192})
    dev = torch.device("cuda")
    st = StandaloneTier(cfg, shape, device=dev, dtype=torch.bfloat16, device_tokens=2048, host_tokens=4096)
    g = torch.Generator().manual_seed(11)

    def rand(n):
        return torch.randn(n, 2, 64, generator=g).to(torch.bfloat16)

    try:
        st.tier.add(0)
        plan = st.tier.prefill(0, 1200)
        full = {0: []}
        for layer in range(shape.n_layers):
            k, v = rand(1200), rand(1200)
            st.tier.write_prefill_layer(plan, layer, k.to(dev), v.to(dev))
            full[0].append([k, v])
        st.tier.evict()
        used = st.store.stats().used_pages
        st.tier.fork(0, 1)
        full[1] = [[k.clone(), v.clone()] for k, v in full[0]]
        assert st.store.stats().used_pages == used
        for _ in range(150):  # both continue apart; their own pages leave on the side stream
            for r in (0, 1):
                slot = st.tier.extend(r, 1).to(dev)
                for layer in range(shape.n_layers):
                    k, v = rand(1), rand(1)
                    st.pool.k[layer, slot], st.pool.v[layer, slot] = k.to(dev), v.to(dev)
                    full[r][layer] = [torch.cat([full[r][layer][0], k]), torch.cat([full[r][layer][1], v])]
            st.tier.evict()
        st.tier.drain()
        st.attn.plan([0, 1])
        lens = [full[r][0][0].shape[0] for r in (0, 1)]
        for layer in range(shape.n_layers):
            q = torch.randn(2, shape.num_q_heads, 64, generator=g).to(torch.bfloat16)
            got = st.attn.run(q.to(dev), layer).cpu()
            ks = torch.cat([full[r][layer][0] for r in (0, 1)]).double()
            vs = torch.cat([full[r][layer][1] for r in (0, 1)]).double()
            indptr = torch.tensor([0, lens[0], lens[0] + lens[1]])
            ref = dense_attention(q.double(), ks, vs, indptr, sm_scale=64 ** -0.5).out
            torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)
    finally:
        st.close()


@needs_flashinfer
@pytest.mark.parametrize("prefilter", [None, 4])
def test_pipelined_decode_equals_the_waiting_path(monkeypatch, prefilter):
    """Decode steps whose layers are queued without any wait (the engine fed through the stream)
    give the same bits as the path that waits for the engine at every layer, eviction included,
    and as hgca.overlap: false (the engine after the window, never pipelined)."""
    from kvtier.runtime import stream_ops
    from kvtier.runtime.standalone import StandaloneTier

    dev = torch.device("cuda")
    if not stream_ops.available(dev):
        pytest.skip("the CUDA driver lacks stream memory operations")
    shape = ModelShape(n_layers=4, num_q_heads=8, kv_heads=2, head_dim=64)
    lens = [3000, 900]
    outs = {}
    for mode, overlap in (("on", True), ("off", True), ("serial", False)):
        cfg = from_mapping({"policy": "hgca", "window": {"sink_tokens": 16, "window_tokens": 128, "page_tokens": 16},
                            "host_store": {"summary_tokens": 16},
                            "budget": {"kind": "mass", "threshold": 0.9, "max_tokens": 96},
                            "hgca": {"prefilter": prefilter, "overlap": overlap}, "max_context_tokens": 8192})
        monkeypatch.setenv("KVTIER_PIPELINE", "off" if mode == "off" else "on")
        st = StandaloneTier(cfg, shape, device=dev, dtype=torch.bfloat16, device_tokens=2048, host_tokens=8192)
        assert st.attn.pipelined == (mode == "on")
        g = torch.Generator().manual_seed(17)
        outs[mode] = []
        try:
            for r, n in enumerate(lens):
                st.tier.add(r)
                plan = st.tier.prefill(r, n)
                for layer in range(shape.n_layers):
                    k = torch.randn(n, 2, 64, generator=g).to(torch.bfloat16)
                    v = torch.randn(n, 2, 64, generator=g).to(torch.bfloat16)
                    st.tier.write_prefill_layer(plan, layer, k.to(dev), v.to(dev))
            rids = list(range(len(lens)))
            for step in range(20):  # 20 new tokens: pages leave the window and are evicted on the way
                slots = torch.cat([st.tier.extend(r, 1) for r in rids]).to(dev)
                for layer in range(shape.n_layers):
                    st.pool.k[layer, slots] = torch.randn(len(rids), 2, 64, generator=g).to(dev, torch.bfloat16)
                    st.pool.v[layer, slots] = torch.randn(len(rids), 2, 64, generator=g).to(dev, torch.bfloat16)
                qs = torch.randn(shape.n_layers, len(rids), 8, 64, generator=g).to(dev, torch.bfloat16)
                st.attn.plan(rids)
                # no host copy in the loop: a pageable copy would wait for the stream, and so for the engine
                layers = [st.attn.run(qs[layer], layer) for layer in range(shape.n_layers)]
                outs[mode].append(torch.stack(layers).cpu())
                st.tier.evict()
            assert st.tier.stats().pages_evicted > 0
            assert st.attn.take_times().cpu_s > 0
        finally:
            st.close()
    for step, (a, b, c) in enumerate(zip(outs["on"], outs["off"], outs["serial"])):
        assert torch.equal(a, b), f"step {step}: pipelined output differs from the waiting path"
        assert torch.equal(c, b), f"step {step}: overlap: false differs from the waiting path"


@needs_flashinfer
@pytest.mark.parametrize("group,d", [(4, 128), (7, 64), (1, 64)])
@pytest.mark.parametrize("soft_cap", [0.0, 30.0])
def test_flash_prefill_parts_equal_the_float32_blocks(group, d, soft_cap):
    """Chunked prefill's FlashInfer parts against block_attention (float32, the reference): the
    causal window part (the chunk last among the keys) and a non-causal host part, on fresh
    random bf16 inputs."""
    from kvtier.runtime.extend import block_attention, flash_attention

    g = torch.Generator().manual_seed(group * 1000 + d)
    hkv, L, n = 2, 300, 1100
    dev = torch.device("cuda")
    q = (torch.randn(L, hkv * group, d, generator=g) * 2).to(torch.bfloat16).to(dev)
    k = (torch.randn(n, hkv, d, generator=g) * 2).to(torch.bfloat16).to(dev)
    v = torch.randn(n, hkv, d, generator=g).to(torch.bfloat16).to(dev)
    kw = dict(sm_scale=d ** -0.5, soft_cap=soft_cap)
    for offset in (n - L, None):
        got = flash_attention(q, k, v, causal_offset=offset, **kw)
        ref = block_attention(q, k, v, causal_offset=offset, **kw)
        rel = float((got.out - ref.out).norm() / ref.out.norm())
        assert rel < 2e-2, (offset, rel)
        torch.testing.assert_close(got.lse, ref.lse, rtol=1e-3, atol=2e-2)
    with pytest.raises(ValueError, match="the chunk last"):
        flash_attention(q, k, v, causal_offset=5, **kw)


@pytest.mark.parametrize("lockstep", [True, False])
def test_lockstep_settles_by_evict_round_not_by_copy_timing(lockstep):
    """Under TP every rank must free the same device slots at the same step: in lockstep an eviction's
    slots come back exactly at the next evict(), however fast its copy landed."""
    from kvtier.runtime.device_pool import DevicePool
    from kvtier.runtime.tier import TierManager
    from kvtier.store import HostStore

    dev = torch.device("cuda")
    shape = ModelShape(n_layers=2, num_q_heads=4, kv_heads=2, head_dim=64)
    cfg = from_mapping({"policy": "hgca", "window": {"sink_tokens": 16, "window_tokens": 128, "page_tokens": 16},
                        "max_context_tokens": 8192})
    pool = DevicePool(2, 1024, 2, 64, dtype=torch.bfloat16, device=dev)
    store = HostStore(cfg, shape, n_pages=64)
    tier = TierManager(cfg, shape, pool.k, pool.v, store, alloc_slots=pool.alloc, free_slots=pool.free,
                       lockstep=lockstep)
    g = torch.Generator().manual_seed(5)
    try:
        tier.add(0)
        slots = tier.extend(0, 400).to(dev)
        pool.k[:, slots] = torch.randn(2, 400, 2, 64, generator=g).to(dev, torch.bfloat16)
        pool.v[:, slots] = torch.randn(2, 400, 2, 64, generator=g).to(dev, torch.bfloat16)
        free0 = pool.free_slots
        first = tier.evict()  # 400 - 16 sinks - 128 window = 256 tokens: 16 pages
        assert first == 16
        torch.cuda.synchronize()  # the copies have certainly landed
        tier.settle()
        if lockstep:
            assert pool.free_slots == free0 and tier.host_tokens(0) == 0  # not before the next evict()
            more = tier.extend(0, 16).to(dev)
            pool.k[:, more] = torch.randn(2, 16, 2, 64, generator=g).to(dev, torch.bfloat16)
            pool.v[:, more] = torch.randn(2, 16, 2, 64, generator=g).to(dev, torch.bfloat16)
            assert tier.evict() == 1
            assert pool.free_slots == free0 - 16 + 256  # exactly the first round's slots came back
            assert tier.host_tokens(0) == 256
            tier.drain()
            assert tier.host_tokens(0) == 272 and pool.free_slots == free0 - 16 + 272
        else:
            assert pool.free_slots == free0 + 256 and tier.host_tokens(0) == 256
        assert len(store.table(0).pages) == (17 if lockstep else 16)
        assert tier.stats().pages_evicted == (17 if lockstep else 16)
    finally:
        store.close()


@needs_triton
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_index_kernels_match_the_torch_path_on_the_gpu(seed):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from key_index_kernel_check import check

    assert check("cuda", seed) < 1e-4
