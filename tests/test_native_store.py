"""Store formats: quantization error bounds, summaries, append/dequant round trips."""

from __future__ import annotations

import pytest
import torch

import kvtier._native as N


def fill(kf, vf, *, D=128, T=32, H=2, P=5, src=torch.float32, seed=0, G=32):
    g = torch.Generator().manual_seed(seed)
    store = N.HostStoreView.allocate(n_layers=2, n_pages=P, kv_heads=H, page_tokens=T, head_dim=D,
                                     key_format=kf, value_format=vf, key_group=G)
    k = (torch.randn(3, H, T, D, generator=g) * 3).to(src)
    v = torch.randn(3, H, T, D, generator=g).to(src)
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    store.append(1, ids, k, v)
    return store, ids, k.float(), v.float()


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_int8_keys_per_token_bound(src):
    store, ids, k, _ = fill("int8", "bf16", src=src)
    scale = store.key_scales[1, ids.long()]
    assert torch.allclose(scale, k.abs().amax(-1) / 127)
    err = (store.dequant_keys(1, ids) - k).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_int8_channel_keys_per_channel_bound(src):
    """Per channel of each (page, kv-head) a bf16 zero point, the middle of the channel's range
    over the page's tokens, and a bf16 scale, half that range / 127 rounded up: no key integer
    passes 127 and each element is within half its channel's scale of the key."""
    store, ids, k, _ = fill("int8_channel", "bf16", src=src)
    sc = store.key_scales[1, ids.long()]  # [n, H, 2, D] bf16: scales, zero points
    assert sc.dtype == torch.bfloat16 and sc.shape == (3, 2, 2, 128)
    mn, mx = k.amin(2), k.amax(2)  # over the page's tokens
    zero = sc[:, :, 1].float()
    assert torch.equal(sc[:, :, 1], ((mn + mx) / 2).bfloat16())
    want = torch.maximum(mx - zero, zero - mn) / 127
    scale = sc[:, :, 0].float()
    assert (scale >= want * (1 - 1e-6)).all() and (scale <= want * (1 + 2 ** -7) + 1e-30).all()
    err = (store.dequant_keys(1, ids) - k).abs()
    assert (err <= scale[:, :, None, :] / 2 * (1 + 1e-5) + 1e-6).all()
    assert int(store.keys[1, ids.long()].abs().max()) <= 127
    assert int(store.keys[1, ids.long()].abs().max()) >= 120  # the range is used


def test_int8_channel_keeps_an_outlier_channel_from_flattening_the_rest():
    """A channel 30x the others' range: per-token int8 spends its scale on it, per-channel
    scales keep every channel's own resolution."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(4, 2, 16, 64, generator=g)
    k[..., 7] = 30.0 + torch.randn(4, 2, 16, generator=g)
    v = torch.randn(4, 2, 16, 64, generator=g)
    errs = {}
    for kf in ("int8", "int8_channel"):
        store = N.HostStoreView.allocate(n_layers=1, n_pages=4, kv_heads=2, page_tokens=16, head_dim=64,
                                         key_format=kf)
        ids = torch.arange(4, dtype=torch.int32)
        store.append(0, ids, k, v)
        rest = [d for d in range(64) if d != 7]
        errs[kf] = float((store.dequant_keys(0, ids) - k)[..., rest].abs().mean())
    assert errs["int8_channel"] < errs["int8"] / 10


@pytest.mark.parametrize("G", [16, 32, 64])
def test_int4_keys_per_group_bound(G):
    store, ids, k, _ = fill("int4", "bf16", G=G)
    scale = store.key_scales[1, ids.long()]  # [n, H, T, D/G]
    assert scale.shape[-1] == 128 // G
    assert torch.allclose(scale, k.unflatten(-1, (-1, G)).abs().amax(-1) / 7)
    err = (store.dequant_keys(1, ids) - k).abs()
    assert (err <= scale.repeat_interleave(G, -1) / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_nibble_layout_low_is_even_channel():
    store, ids, k, _ = fill("int4", "bf16")
    b = store.keys[1, 4, 0, 0, 0].item()
    sc = store.key_scales[1, 4, 0, 0, 0].item()
    lo, hi = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8
    assert lo == round(k[0, 0, 0, 0].item() / sc) and hi == round(k[0, 0, 0, 1].item() / sc)


def test_bf16_relative_bound_and_values():
    store, ids, k, v = fill("bf16", "bf16")
    kd = store.dequant_keys(1, ids)
    assert ((kd - k).abs() <= k.abs() * 2.0**-8).all()
    assert torch.equal(kd, k.to(torch.bfloat16).float())  # round to nearest even, as torch
    assert torch.equal(store.values(1, ids), v.to(torch.bfloat16).float())


def test_int8_values_bound():
    store, ids, _, v = fill("bf16", "int8")
    scale = store.value_scales[1, ids.long()]
    err = (store.values(1, ids) - v).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all()


def test_summary_is_min_max_of_original_keys():
    store, ids, k, _ = fill("int8", "bf16", T=32)
    s = store.summary[1, :, ids.long()].transpose(0, 1).float()  # [L, H, P, ...] -> [n, H, T/S, 2, D]
    chunks = k.unflatten(2, (2, 16))
    lo, hi = chunks.amin(3), chunks.amax(3)
    # bf16 rounded outward: still bounds, and within one bf16 step (2^-7 relative) of the true ones
    assert (s[..., 0, :] <= lo).all() and (s[..., 1, :] >= hi).all()
    assert ((lo - s[..., 0, :]) <= lo.abs() * 2 ** -7).all() and ((s[..., 1, :] - hi) <= hi.abs() * 2 ** -7).all()


def test_layers_are_independent_and_untouched_pages_stay_zero():
    store, ids, k, _ = fill("int8", "int8")
    assert (store.dequant_keys(0, ids) == 0).all()
    assert (store.dequant_keys(1, torch.tensor([1, 3])) == 0).all()


def test_zero_keys_quantize_to_zero():
    store = N.HostStoreView.allocate(n_layers=1, n_pages=1, kv_heads=1, page_tokens=16, head_dim=32,
                                     key_format="int4", value_format="int8", key_group=16)
    z = torch.zeros(1, 1, 16, 32)
    store.append(0, torch.tensor([0]), z, z)
    assert (store.dequant_keys(0, torch.tensor([0])) == 0).all()
    assert (store.values(0, torch.tensor([0])) == 0).all()


def test_nbytes_and_buffers():
    store = N.HostStoreView.allocate(n_layers=2, n_pages=3, kv_heads=2, page_tokens=16, head_dim=64)
    keys = 2 * 3 * 2 * 16 * 64
    assert store.nbytes == keys + keys // 64 * 4 + keys * 2 + 2 * 3 * 2 * 1 * 2 * 64 * 2  # bf16 summary
    assert store.buffers.keys is store.keys and store.buffers.value_scales is None
    store.close()
    store.close()  # idempotent


@pytest.mark.parametrize("kf,vf,G", [("int8", "bf16", 32), ("int4", "int8", 32), ("int4", "bf16", 16),
                                     ("bf16", "int8", 32), ("int8", "int8", 32), ("int8_channel", "bf16", 32)])
def test_raw_pages_dequantized_in_torch_equal_the_c_store(kf, vf, G):
    """The fast path of chunked prefill moves stored bytes and dequantizes them in torch;
    the C store's dequant is its reference, on fresh random pages of every format."""
    store, ids, _, _ = fill(kf, vf, G=G, seed=11)
    pick = torch.tensor([2, 4, 0, 2], dtype=torch.int64)  # any order, repeats allowed
    raw = store.raw_pages(1, pick)
    assert raw.summary is None and raw.keys.dtype == store.keys.dtype
    assert torch.equal(N.dequant_raw_keys(raw, kf, G), store.dequant_keys(1, pick))
    assert torch.equal(N.dequant_raw_values(raw, vf), store.values(1, pick))
    assert torch.count_nonzero(store.dequant_keys(1, pick)) > 0  # not a comparison of zeros
    heads = torch.tensor([1, 0, 1, 0])  # one kv-head per page: that head's bytes, its head dimension kept
    one = store.raw_pages(1, pick, heads)
    rows = torch.arange(4)
    assert torch.equal(N.dequant_raw_keys(one, kf, G), store.dequant_keys(1, pick)[rows, heads].unsqueeze(1))
    assert torch.equal(N.dequant_raw_values(one, vf), store.values(1, pick)[rows, heads].unsqueeze(1))


def test_raw_pages_reject_bad_pages_and_layers():
    store, _, _, _ = fill("int8", "bf16")
    with pytest.raises(N.NativeValueError, match=r"page_ids: expected ids in \[0, 5\)"):
        store.raw_pages(1, torch.tensor([5]))
    with pytest.raises(N.NativeValueError, match="layer: expected 0 <= layer < 2"):
        store.raw_pages(2, torch.tensor([0]))
    with pytest.raises(N.NativeValueError, match="expected an integer dtype"):
        store.raw_pages(0, torch.tensor([0.0]))
    with pytest.raises(N.NativeValueError, match="key_format"):
        N.dequant_raw_keys(store.raw_pages(0, torch.tensor([0])), "fp8", 32)
    with pytest.raises(N.NativeValueError, match=r"heads: expected one kv-head in \[0, 2\) per page id"):
        store.raw_pages(0, torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(N.NativeValueError, match="heads: expected one kv-head"):
        store.raw_pages(0, torch.tensor([0, 1]), torch.tensor([0]))


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1: text.index("]")]


def test_large_store_buffers_are_zero_and_keep_what_is_appended():
    """Buffers of 4 MiB and more are allocated untouched, advised, then zeroed: they start
    at zero like the small ones, and appends land as before."""
    store = N.HostStoreView.allocate(n_layers=1, n_pages=2048, kv_heads=2, page_tokens=16, head_dim=128)
    assert store.keys.numel() >= 4 << 20
    for t in store.buffers:
        if t is not None:
            assert not t.any()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 16, 128, generator=g), torch.randn(2, 2, 16, 128, generator=g)
    store.append(0, torch.tensor([2047, 5], dtype=torch.int32), k, v)
    assert store.keys[0, 2047].any() and store.keys[0, 5].any() and not store.keys[0, 6].any()


@pytest.mark.skipif(_thp_mode() in ("never", "absent"), reason="needs Linux transparent huge pages (madvise or always)")
def test_huge_page_advice_is_taken_where_the_os_offers_it():
    t = torch.empty(8 << 20, dtype=torch.uint8)
    assert N.advise_hugepages(t) is True
    small = torch.empty(1 << 20, dtype=torch.uint8)  # no whole aligned 2 MiB page in 1 MiB
    assert N.advise_hugepages(small) is False


def test_huge_page_advice_rejects_what_it_cannot_advise():
    with pytest.raises(N.NativeValueError, match="contiguous CPU tensor"):
        N.advise_hugepages(torch.empty(64, 64)[:, ::2])
