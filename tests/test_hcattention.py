"""HCAttention (the gpu_select strategy): compressed keys select, the engine sums host values.

Every piece is checked against a float64 reference computed here from the same inputs:
the compressed keys' scores, the mass selection, and the whole hybrid output.
"""

import math

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime import dense_attention
from kvtier.runtime.key_index import ScalarKeys, VqKeys, assign, kmeans, select_mass
from kvtier.runtime.standalone import StandaloneTier

from test_runtime import _decode

SHAPE = ModelShape(n_layers=2, num_q_heads=8, kv_heads=2, head_dim=64)
WINDOW = {"sink_tokens": 4, "window_tokens": 64, "page_tokens": 16}


def _config(**hc):
    budget = hc.pop("budget", {"kind": "mass", "threshold": 0.9, "max_tokens": 256})
    hc.setdefault("logits", "approximate")  # the tests name exact where they mean it
    return from_mapping({"policy": "hcattention", "window": WINDOW, "max_context_tokens": 8192, "budget": budget,
                         "host_store": {"key_format": "bf16"}, "hcattention": hc})


# --- compressed keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_scalar_keys_score_like_their_dequantized_keys_within_the_rounding_bound(gen, bits):
    shape = ModelShape(1, 8, 2, 64)
    idx = ScalarKeys(shape, 8, 16, "cpu", bits=bits)
    k = torch.randn(5, 2, 16, 64, generator=gen)
    pages = torch.tensor([6, 1, 3, 0, 7])
    idx.store(0, pages, k)
    q = torch.randn(8, 64, generator=gen)
    got = idx._chunk_scores(0, q, pages)  # [Hq, 80]
    kt = k.double().transpose(1, 2).reshape(80, 2, 64).repeat_interleave(4, dim=1)
    exact = torch.einsum("hd,nhd->hn", q.double(), kt)
    # each channel is off by at most half a step: scale / 2 = amax / (2 qmax)
    amax = k.double().abs().amax(-1).transpose(1, 2).reshape(80, 2).repeat_interleave(4, dim=1).T  # [Hq, N]
    bound = amax / (2 ** bits - 2) * q.double().abs().sum(-1, keepdim=True) * (1 + 1e-3) + 1e-4
    assert ((got.double() - exact).abs() <= bound).all()
    if bits == 8:
        assert float((got.double() - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_vq_scores_equal_the_reconstructed_keys_and_kmeans_beats_its_start(gen):
    shape = ModelShape(1, 8, 2, 64)
    vq = VqKeys(shape, 64, 16, "cpu", groups=16, entries=32, train_tokens=512)
    k = torch.randn(64, 2, 16, 64, generator=gen) * torch.linspace(0.2, 3, 64)  # uneven channels
    pages = torch.randperm(64, generator=gen)
    vq.store(0, pages[:8], k[:8])  # 128 tokens: below train_tokens, kept as they came
    assert not vq.trained[0]
    q = torch.randn(8, 64, generator=gen)
    kt = k[:8].double().transpose(1, 2).reshape(128, 2, 64).repeat_interleave(4, dim=1)
    torch.testing.assert_close(vq._chunk_scores(0, q, pages[:8]).double(),
                               torch.einsum("hd,nhd->hn", q.double(), kt), atol=0.1, rtol=0.02)  # bf16 keys
    vq.store(0, pages[8:], k[8:])  # 1024 tokens in all: trained, every page encoded
    assert vq.trained[0] and not vq._staged[0]
    codes, books = vq.codes[0, pages].long(), vq.codebooks[0].double()  # [P, H, T, g], [H, g, c, s]
    rec = torch.stack([books[h, torch.arange(16)[None, None, :], codes[:, h]] for h in range(2)], dim=1)
    rec = rec.reshape(64, 2, 16, 64)  # [P, H, T, D]
    got = vq._chunk_scores(0, q, pages).double()
    kt = rec.transpose(1, 2).reshape(1024, 2, 64).repeat_interleave(4, dim=1)
    torch.testing.assert_close(got, torch.einsum("hd,nhd->hn", q.double(), kt), atol=1e-3, rtol=1e-4)
    # k-means lowers the distortion of its own random start
    x = k.permute(1, 0, 2, 3).reshape(2, 1024, 16, 4)
    start = kmeans(x, 32, 0, 4096, seed=1)
    trained = kmeans(x, 32, 10, 4096, seed=1)

    def distortion(books):
        c = assign(x, books)  # [H, N, g]
        r = torch.stack([books[h, torch.arange(16)[None, :], c[h]] for h in range(2)])
        return float((r - x).pow(2).sum())
    assert distortion(trained) < 0.8 * distortion(start)


def test_soft_capped_scores_stay_minus_infinity_past_each_requests_tokens(gen):
    idx = ScalarKeys(ModelShape(1, 8, 2, 64), 4, 16, "cpu", bits=8)
    idx.store(0, torch.arange(4), torch.randn(4, 2, 16, 64, generator=gen))
    table = torch.tensor([[0, 1, 2], [3, 0, 0]], dtype=torch.int32)
    s = idx.scores(0, torch.randn(2, 8, 64, generator=gen), table, torch.tensor([40, 5], dtype=torch.int32),
                   sm_scale=0.125, soft_cap=3.0)
    assert s.shape == (2, 8, 40) and bool(torch.isfinite(s[0]).all()) and bool(torch.isfinite(s[1, :, :5]).all())
    assert bool((s[1, :, 5:] == float("-inf")).all()) and float(s[0].abs().max()) < 3.0


def test_the_triton_kernels_match_the_torch_path_under_the_interpreter():
    """Triton's CPU interpreter runs the GPU scoring kernels here (tests/test_cuda.py runs them on a GPU)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is not installed (the CPU wheel of torch does not bring it)")
    script = __import__("pathlib").Path(__file__).with_name("key_index_kernel_check.py")
    seed = str(int(torch.randint(0, 2**31 - 1, (1,))))
    proc = subprocess.run([sys.executable, str(script), "cpu", seed], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-2000:]}"
    assert "kernels match the torch path" in proc.stdout


def test_vq_refuses_groups_that_do_not_divide_the_head_dim():
    with pytest.raises(ValueError, match="codebook.groups must divide head_dim 64, got 24"):
        VqKeys(SHAPE, 4, 16, "cpu", groups=24, entries=16)


# --- selection ---------------------------------------------------------------------------------


def test_mass_selection_is_the_smallest_prefix_reaching_tau_within_the_cap(gen):
    scores = torch.randn(3, 4, 50, generator=gen) * 3
    scores[1, :, 40:] = float("-inf")  # a shorter request
    for tau, cap in ((0.9, 50), (0.5, 50), (0.99, 7), (float("inf"), 12)):
        idx, logits = select_mass(scores, tau, cap)
        for b in range(3):
            for h in range(4):
                s = scores[b, h].double()
                p = torch.softmax(s, 0)
                order = torch.argsort(s, descending=True)
                want, mass = [], 0.0
                for t in order.tolist():
                    if mass >= tau or len(want) == cap or not math.isfinite(float(s[t])):
                        break
                    want.append(t)
                    mass += float(p[t])
                got = [t for t in idx[b, h].tolist() if t >= 0]
                assert sorted(got) == sorted(want), (tau, cap, b, h)
                assert torch.equal(logits[b, h][idx[b, h] >= 0], scores[b, h][idx[b, h][idx[b, h] >= 0].long()])


# --- the hybrid output ---------------------------------------------------------------------------


def _reference(tier, rid, layer, q, full, policy_tau, cap):
    """float64: the window exactly, the host part from the index's own approximate logits."""
    st, T = tier.tier.requests[rid], WINDOW["page_tokens"]
    k, v = full[rid][layer]
    n = k.shape[0]
    first, host_end = tier.store.table(rid).first_pos, st.host_end
    scale = SHAPE.head_dim ** -0.5
    pages = torch.tensor(tier.store.table(rid).pages, dtype=torch.long)
    nh = host_end - first
    approx = torch.cat([tier.attn.host.index._chunk_scores(layer, q[0].float(), pages[i: i + 64])
                        for i in range(0, len(pages), 64)], dim=1)[:, :nh].double() * scale  # [Hq, nh]
    assert pages.numel() * T >= nh
    dev = torch.cat([torch.arange(first), torch.arange(host_end, n)])
    g = SHAPE.num_q_heads // SHAPE.kv_heads
    kd, vd = k[dev].double().repeat_interleave(g, 1), v[dev].double().repeat_interleave(g, 1)
    logit_d = torch.einsum("hd,nhd->hn", q[0].double(), kd) * scale
    idx, sel = select_mass(approx[None], policy_tau, cap)
    out = torch.zeros(SHAPE.num_q_heads, SHAPE.head_dim, dtype=torch.float64)
    vh = v[first:host_end].bfloat16().double().repeat_interleave(g, 1)  # as the store holds them
    for h in range(SHAPE.num_q_heads):
        keep = idx[0, h][idx[0, h] >= 0].long()
        logits = torch.cat([logit_d[h], approx[h, keep]])
        vals = torch.cat([vd[:, h], vh[keep, h]])
        out[h] = torch.softmax(logits, 0) @ vals
    return out


@pytest.mark.parametrize("form", [{"key_bits": 4}, {"codebook": {"groups": 16, "entries": 32, "train_tokens": 256}}])
def test_the_hybrid_output_is_the_window_plus_the_selected_values_at_their_approximate_weights(gen, form):
    cfg = _config(**form)
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [600, 1500], steps=3)
        tier.attn.plan(rids)
        for layer in range(SHAPE.n_layers):
            q = torch.randn(2, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
            got = tier.attn.run(q, layer)
            for i, r in enumerate(rids):
                ref = _reference(tier, r, layer, q[i: i + 1], full, 0.9, 256)
                torch.testing.assert_close(got[i].double(), ref, atol=2e-3, rtol=2e-3)
    finally:
        tier.close()


def test_budget_all_attends_every_host_token_exactly(gen):
    cfg = _config(key_bits=2, budget={"kind": "all"})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [900], steps=2)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        got = tier.attn.run(q, 0)
        k, v = full[0][0]
        ref = dense_attention(q.double(), k.double(), v.double(), torch.tensor([0, k.shape[0]]),
                              sm_scale=SHAPE.head_dim ** -0.5)
        assert float((got.double() - ref.out).norm() / ref.out.norm()) < 5e-3
    finally:
        tier.close()


def test_detail_reports_each_query_heads_selection_within_its_cap(gen):
    cfg = _config(key_bits=8, budget={"kind": "tokens", "tokens": 40})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [1200], steps=1)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        detail = tier.attn.run_detail(q, 1)
        sel = detail.selection
        assert sel.shape == (1, SHAPE.num_q_heads, 40) and bool((sel >= 0).all())  # top-40, no mass cut
        assert all(len(set(row.tolist())) == 40 for row in sel[0])
        torch.testing.assert_close(detail.out.float(), tier.attn.run(q, 1).float(), atol=1e-5, rtol=1e-5)
    finally:
        tier.close()


def _exact_detail(gen, **knobs):
    """run_detail at layer 1 of an exact-logits tier over one 1,400-token request (bf16 host keys):
    (detail, each query head's own selection [1, Hq, m], q, the request's full k, v)."""
    cfg = _config(key_bits=2, logits="exact", budget={"kind": "tokens", "tokens": 64}, **knobs)
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        rids, full = _decode(tier, gen, [1400], steps=1)
        tier.attn.plan(rids)
        q = torch.randn(1, SHAPE.num_q_heads, SHAPE.head_dim, generator=gen)
        detail = tier.attn.run_detail(q, 1)
        own, _ = tier.attn.host.select(q, 1)
        torch.testing.assert_close(detail.out.float(), tier.attn.run(q, 1).float(), atol=1e-5, rtol=1e-5)
    finally:
        tier.close()
    return detail, own, q, full[0][1]


def _assert_exact_over(detail, q, kv, head_tokens):
    """The host part of each query head is float64 attention over head_tokens(h) with the host store's
    (bf16) keys and values."""
    k, v = (t.bfloat16().double() for t in kv)
    g = SHAPE.num_q_heads // SHAPE.kv_heads
    for h in range(SHAPE.num_q_heads):
        keep = head_tokens(h) + WINDOW["sink_tokens"]
        x = (k[keep, h // g] @ q[0, h].double()) * SHAPE.head_dim ** -0.5
        torch.testing.assert_close(detail.host.lse[0, h].double(), torch.logsumexp(x, 0), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(detail.host.out[0, h].double(), torch.softmax(x, 0) @ v[keep, h // g],
                                   atol=1e-4, rtol=1e-4)


def test_exact_logits_weigh_the_selection_with_the_host_stores_keys(gen):
    """logits: exact keeps the compressed keys' choice of tokens and recomputes their weights
    (and the LSE) from the host store's keys (bf16 here: the reference rounds k and v alike)."""
    detail, idx, q, kv = _exact_detail(gen)
    assert torch.equal(detail.selection, idx) and bool((idx >= 0).all())
    _assert_exact_over(detail, q, kv, lambda h: idx[0, h].long())


def test_union_per_kv_is_each_groups_distinct_tokens(gen):
    from kvtier.runtime.key_index import union_per_kv

    idx = torch.randint(-1, 30, (3, 8, 12), generator=gen, dtype=torch.int32)
    got = union_per_kv(idx, 4)
    assert got.shape == (3, 2, 48) and got.dtype == torch.int32
    for b in range(3):
        for h in range(2):
            want = sorted({t for t in idx[b, h * 4:(h + 1) * 4].flatten().tolist() if t >= 0})
            assert got[b, h].tolist() == want + [-1] * (48 - len(want))


def test_kv_head_sets_attend_each_groups_union_with_exact_logits(gen):
    """exact_sets: kv_head: every query head attends the union of its kv-head's selections, logits and
    values from the host store's keys (float64 reference), a superset of its own selection."""
    detail, own, q, kv = _exact_detail(gen, exact_sets="kv_head")
    sel, g = detail.selection, SHAPE.num_q_heads // SHAPE.kv_heads
    assert sel.shape[:2] == (1, SHAPE.num_q_heads)
    for h in range(SHAPE.num_q_heads):
        union = {t for t in own[0, (h // g) * g:(h // g + 1) * g].flatten().tolist() if t >= 0}
        assert set(sel[0, h][sel[0, h] >= 0].tolist()) == union and set(own[0, h].tolist()) <= union
    _assert_exact_over(detail, q, kv, lambda h: sel[0, h][sel[0, h] >= 0].long())


def test_low_attention_eviction_keeps_the_attended_pages_and_the_cap(gen):
    """A request past capacity_tokens drops its least-attended pages (never the newest window's);
    what remains is attended exactly (every kept host token, exact logits): equal to dense attention
    over exactly those tokens."""
    cfg = _config(key_bits=8, logits="exact", budget={"kind": "tokens", "tokens": 100000},
                  eviction={"rule": "low_attention", "decay": 0.5, "capacity_tokens": 512})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    T, n = WINDOW["page_tokens"], 2000
    try:
        tier.tier.add(0)
        plan = tier.tier.prefill(0, n)
        direction = torch.nn.functional.normalize(torch.randn(SHAPE.head_dim, generator=gen), dim=0)
        hot = torch.arange(4 + 16 * 10, 4 + 16 * 14)  # host pages 10..13 hold keys along the query's direction
        full = []
        for layer in range(SHAPE.n_layers):
            k = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
            k[hot] += 6 * direction
            v = torch.randn(n, SHAPE.kv_heads, SHAPE.head_dim, generator=gen)
            tier.tier.write_prefill_layer(plan, layer, k, v)
            full.append((k, v))
        q = (direction * 3).expand(1, SHAPE.num_q_heads, SHAPE.head_dim).contiguous()
        before = tier.tier.host_tokens(0)
        assert before > 512
        tier.attn.plan([0])
        assert tier.tier.host_tokens(0) == before  # no page has been scored yet: none may go
        for _ in range(3):  # steps that attend the hot pages raise their scores
            tier.attn.plan([0])
            for layer in range(SHAPE.n_layers):
                tier.attn.run(q, layer)
        host = tier.tier.host_tokens(0)
        assert host <= 512 and tier.attn.host.eviction.dropped > 0
        table = tier.store.table(0)
        kept = torch.cat([torch.arange(s, s + T) for s in table.starts])
        assert set(hot.tolist()) <= set(kept.tolist()), "a page the query attends was dropped"
        newest = table.starts[-1]
        assert newest + T == tier.tier.requests[0].host_end  # the newest host page stays
        positions = torch.cat([torch.arange(4), kept, torch.arange(tier.tier.requests[0].host_end, n)])
        got = tier.attn.run(q, 1)
        k, v = full[1]
        ref = dense_attention(q.double(), k[positions].double(), v[positions].double(),
                              torch.tensor([0, positions.numel()]), sm_scale=SHAPE.head_dim ** -0.5)
        torch.testing.assert_close(got.double(), ref.out, atol=2e-3, rtol=2e-3)
    finally:
        tier.close()


def test_dropped_pages_leave_holes_that_keep_the_other_pages_positions():
    from kvtier.config import from_mapping as fm
    from kvtier.store import HostStore

    cfg = fm({"policy": "hgca", "window": WINDOW, "host_store": {"on_full": "evict"}})
    store = HostStore(cfg, SHAPE, n_pages=8)
    try:
        store.admit("a", first_pos=4)
        pages = store.allocate("a", 5)
        assert store.table("a").starts == [4, 20, 36, 52, 68] and store.table("a").hole_tokens(16) == 0
        assert store.drop_pages("a", [1, 3]) == 2
        t = store.table("a")
        assert t.pages == [pages[0], pages[2], pages[4]] and t.starts == [4, 36, 68] and t.hole_tokens(16) == 32
        assert store.allocate("a", 1) and t.starts[-1] == 84  # new pages follow the last one
        store.drop_pages("a", [0])
        assert t.first_pos == 36 and t.hole_tokens(16) == 16 and t.dropped_tokens == 48  # 52..67 is missing
        with pytest.raises(ValueError, match="has 3 host pages, got indices"):
            store.drop_pages("a", [3])
        # on_full: evict drops pages in the victim order a policy gives
        store.admit("b", first_pos=4)
        store.allocate("b", 4)
        store.victim_order = lambda rid: [1, 0] if rid == "a" else []
        store.allocate("b", 2)  # one page short: request a (the largest other) gives its page index 1
        assert store.table("a").starts == [36, 84]
    finally:
        store.close()


def test_exactly_one_key_form():
    from kvtier.config import ConfigError

    with pytest.raises(ConfigError, match="set exactly one of key_bits and codebook"):
        _config(key_bits=4, codebook={"groups": 16})
    assert _config(key_bits=4).hcattention.codebook is None
    assert _config().hcattention.codebook.groups is None  # head_dim / 4 when the tier is built


def test_codebooks_from_a_file_are_used_from_the_first_key(gen, tmp_path):
    """A codebook file (kvtier bench codebooks) trains nothing at run time: every layer scores by its
    codes from the first page on; a file for another shape is refused with the field path."""
    from kvtier.cli import main
    from kvtier.eval.capture import KvCapture
    from kvtier.runtime.key_index import CodebookFileError

    cap = KvCapture(torch.randn(2, 300, 2, 64, generator=gen).bfloat16(), torch.randn(2, 300, 2, 64).bfloat16(),
                    torch.randn(2, 4, 8, 64).bfloat16(), 0.125, {"model": "test"})
    cap.save(tmp_path / "cap.pt")
    assert main(["bench", "codebooks", str(tmp_path / "cap.pt"), str(tmp_path / "books.pt"), "--entries", "16",
                 "--device", "cpu"]) == 0
    cfg = _config(codebook={"entries": 16, "path": str(tmp_path / "books.pt")})
    tier = StandaloneTier(cfg, SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        index = tier.attn.host.index
        assert all(index.trained) and index.groups == 16 and not any(index._staged)
        books = torch.load(tmp_path / "books.pt", weights_only=True)["codebooks"]
        torch.testing.assert_close(index.codebooks.cpu(), books)
        rids, full = _decode(tier, gen, [300], steps=1)
        assert tier.tier.host_tokens(0) > 0 and not any(index._staged)  # encoded on arrival
    finally:
        tier.close()
    for bad, message in (({"entries": 32}, r"expected codebooks of shape \(2, 2, 16, 32, 4\)"),
                         ({"entries": 16, "groups": 8}, r"expected codebooks of shape \(2, 2, 8, 16, 8\)")):
        with pytest.raises(CodebookFileError, match="hcattention.codebook.path: " + message):
            StandaloneTier(_config(codebook={**bad, "path": str(tmp_path / "books.pt")}), SHAPE, device="cpu",
                           dtype=torch.float32, device_tokens=64, host_tokens=64)
    with pytest.raises(CodebookFileError, match="found no file"):
        StandaloneTier(_config(codebook={"path": str(tmp_path / "none.pt")}), SHAPE, device="cpu",
                       dtype=torch.float32, device_tokens=64, host_tokens=64)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CodebookFileError, match="expected a codebook file"):
        StandaloneTier(_config(codebook={"path": str(tmp_path / "junk.pt")}), SHAPE, device="cpu",
                       dtype=torch.float32, device_tokens=64, host_tokens=64)
