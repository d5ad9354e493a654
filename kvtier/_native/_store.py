"""HostStoreView: torch-allocated store buffers plus the C store handle over them."""

from __future__ import annotations

import enum
from typing import NamedTuple, Optional

import torch

from . import _checks as C
from ._loader import NativeIndexError, NativeMemoryError, NativeValueError, check, ffi, lib


class KeyFormat(str, enum.Enum):
    BF16 = "bf16"
    INT8 = "int8"  # a scale per token
    INT4 = "int4"  # a scale per token and group of key_group channels
    INT8_CHANNEL = "int8_channel"  # a scale and a zero point per channel of each (page, kv-head), bf16


class ValueFormat(str, enum.Enum):
    BF16 = "bf16"
    INT8 = "int8"


_KEY_CODE = {KeyFormat.BF16: lib.KVT_KEY_BF16, KeyFormat.INT8: lib.KVT_KEY_INT8, KeyFormat.INT4: lib.KVT_KEY_INT4,
             KeyFormat.INT8_CHANNEL: lib.KVT_KEY_INT8_CHANNEL}
_VAL_CODE = {ValueFormat.BF16: lib.KVT_VAL_BF16, ValueFormat.INT8: lib.KVT_VAL_INT8}


# Buffers at least this large get huge-page advice (two 2 MiB pages: one whole
# aligned huge page at the least, whatever the allocation's alignment).
HUGE_ADVICE_BYTES = 4 << 20


def advise_hugepages(t: torch.Tensor) -> bool:
    """Ask the OS for huge pages behind a CPU tensor's whole 2 MiB-aligned pages (Linux,
    transparent huge pages on or madvise); call it before the memory is first touched.
    True when the advice was taken."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise NativeValueError(f"advise_hugepages: expected a contiguous CPU tensor, got {t.device} "
                               f"{'contiguous' if t.is_contiguous() else 'non-contiguous'}")
    advised = ffi.new("int32_t *")
    check(lib.kvt_advise_hugepages(ffi.cast("void *", t.data_ptr()), t.numel() * t.element_size(), advised))
    return bool(advised[0])


def _enum(cls, v, name):
    try:
        return cls(v)
    except ValueError:
        raise NativeValueError(f"{name}: expected one of {[m.value for m in cls]}, got {v!r}") from None


def _dims(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format, value_format, key_group, summary_tokens):
    """The store's sizes and formats checked (as the C store checks them, before any shape is derived
    from them): (key format, value format)."""
    for name, v in (("n_layers", n_layers), ("n_pages", n_pages), ("kv_heads", kv_heads),
                    ("page_tokens", page_tokens), ("head_dim", head_dim),
                    ("key_group", key_group), ("summary_tokens", summary_tokens)):
        C.positive_int(name, v)
    kf = _enum(KeyFormat, key_format, "key_format")
    vf = _enum(ValueFormat, value_format, "value_format")
    if head_dim % 16:
        raise NativeValueError(f"head_dim: expected a multiple of 16, got {head_dim}")
    if kf is KeyFormat.INT4 and (head_dim % key_group or key_group % 2):
        raise NativeValueError(f"key_group: expected an even divisor of head_dim {head_dim}, got {key_group}")
    if page_tokens % summary_tokens:
        raise NativeValueError(
            f"summary_tokens: expected a divisor of page_tokens {page_tokens}, got {summary_tokens}")
    return kf, vf


def buffer_specs(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format, value_format, key_group,
                 summary_tokens, chunk_sums: bool) -> "StoreBuffers":
    """The (shape, dtype) of each buffer of a store, None where it has none."""
    kf, vf = _dims(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format, value_format, key_group,
                   summary_tokens)
    base = (n_layers, n_pages, kv_heads, page_tokens)
    if kf is KeyFormat.BF16:
        keys, kscales = (base + (head_dim,), torch.bfloat16), None
    elif kf is KeyFormat.INT8:
        keys, kscales = (base + (head_dim,), torch.int8), (base, torch.float32)
    elif kf is KeyFormat.INT8_CHANNEL:
        keys, kscales = (base + (head_dim,), torch.int8), (base[:3] + (2, head_dim), torch.bfloat16)
    else:
        keys, kscales = (base + (head_dim // 2,), torch.uint8), (base + (head_dim // key_group,), torch.float32)
    if vf is ValueFormat.BF16:
        values, vscales = (base + (head_dim,), torch.bfloat16), None
    else:
        values, vscales = (base + (head_dim,), torch.int8), (base, torch.float32)
    chunks = (n_layers, kv_heads, n_pages, page_tokens // summary_tokens, 2, head_dim)
    summary = (chunks, torch.bfloat16)
    sums = (chunks, torch.float32) if chunk_sums else None
    return StoreBuffers(keys, kscales, values, vscales, summary, sums)


def store_nbytes(specs: "StoreBuffers") -> int:
    """Bytes of every buffer of `buffer_specs`."""
    total = 0
    for spec in specs:
        if spec is not None:
            n = 1
            for d in spec[0]:
                n *= d
            total += n * torch.empty((), dtype=spec[1]).element_size()
    return total


class StoreBuffers(NamedTuple):
    keys: torch.Tensor
    key_scales: torch.Tensor | None
    values: torch.Tensor
    value_scales: torch.Tensor | None
    summary: torch.Tensor
    chunk_sums: torch.Tensor | None = None


class HostStoreView:
    """A per-layer paged KV store. Buffers (layer-major, contiguous):

    keys        bf16 [L,P,H,T,D] | int8 [L,P,H,T,D] | uint8 [L,P,H,T,D/2] (int4 pairs) | int8 [L,P,H,T,D]
    key_scales  None | f32 [L,P,H,T] | f32 [L,P,H,T,D/key_group] | bf16 [L,P,H,2,D] (int8_channel: per
                channel of each page and kv-head a scale, then a zero point; key = scale * k + zero)
    values      bf16 [L,P,H,T,D] | int8 [L,P,H,T,D];  value_scales None | f32 [L,P,H,T]
    summary     bf16 [L,H,P,T/summary_tokens,2,D] (per-channel min rounded down and max rounded
                up of the keys; head-major)
    chunk_sums  None | f32 [L,H,P,T/summary_tokens,2,D] (per summary chunk the sum of its keys,
                then of its values, as stored; for plans with residual=True)

    All six are in ``.buffers``; ``keys``, ``key_scales``, ``value_scales`` and
    ``summary`` are also attributes, while ``values(layer, page_ids)`` dequantizes.

    Built directly, every buffer must be a contiguous CPU tensor of exactly that
    shape and dtype (None where the format has none), or NativeValueError says
    which is not: the C store writes through their pointers. They must stay as
    they are (not resized) while the store is open; `close` waits for the engine
    calls in flight over the store to return.
    """

    def __init__(self, *, n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format,
                 value_format, key_group, summary_tokens, keys, key_scales, values, value_scales,
                 summary, chunk_sums=None):
        self.handle = None
        specs = buffer_specs(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format, value_format,
                             key_group, summary_tokens, chunk_sums is not None)
        key_format, value_format = _enum(KeyFormat, key_format, "key_format"), _enum(ValueFormat, value_format,
                                                                                      "value_format")
        given = StoreBuffers(keys, key_scales, values, value_scales, summary, chunk_sums)
        for name, t, spec in zip(StoreBuffers._fields, given, specs):
            if spec is None:
                if t is not None:
                    raise NativeValueError(f"{name}: expected None with {key_format.value} keys and "
                                           f"{value_format.value} values, got a {type(t).__name__}")
            else:
                C.tensor(name, t, (spec[1],), spec[0])
        self.n_layers, self.n_pages, self.kv_heads = n_layers, n_pages, kv_heads
        self.page_tokens, self.head_dim = page_tokens, head_dim
        self.key_format, self.value_format = key_format, value_format
        self.key_group, self.summary_tokens = key_group, summary_tokens
        self.buffers = StoreBuffers(keys, key_scales, values, value_scales, summary, chunk_sums)
        self.keys, self.key_scales = keys, key_scales
        self.value_scales, self.summary, self.chunk_sums = value_scales, summary, chunk_sums
        desc = ffi.new("kvt_store_desc *")
        desc.n_layers, desc.n_pages, desc.kv_heads = n_layers, n_pages, kv_heads
        desc.page_tokens, desc.head_dim = page_tokens, head_dim
        desc.key_format, desc.value_format = _KEY_CODE[key_format], _VAL_CODE[value_format]
        desc.key_group, desc.summary_tokens = key_group, summary_tokens
        desc.keys = C.ptr("void *", keys)
        desc.key_scales = C.ptr("void *", key_scales)
        desc.values = C.ptr("void *", values)
        desc.value_scales = C.ptr("float *", value_scales)
        desc.summary = C.ptr("uint16_t *", summary)
        desc.chunk_sums = C.ptr("float *", chunk_sums)
        h = ffi.new("int32_t *")
        check(lib.kvt_store_open(desc, h))
        self.handle = int(h[0])
        self._opened = tuple((t.data_ptr(), t.numel()) if t is not None else None for t in self.buffers)

    @classmethod
    def allocate(cls, *, n_layers: int, n_pages: int, kv_heads: int, page_tokens: int, head_dim: int,
                 key_format: KeyFormat | str = KeyFormat.INT8,
                 value_format: ValueFormat | str = ValueFormat.BF16, key_group: int = 32,
                 summary_tokens: int = 16, chunk_sums: bool = False,
                 pin_memory: bool = False) -> "HostStoreView":
        """Zeroed buffers for a store; chunk_sums=True adds the per-chunk key and value sums that
        residual plans read (8 * head_dim bytes per summary chunk and kv-head). A buffer that cannot
        be allocated raises NativeMemoryError naming its size and the store's."""
        if not isinstance(chunk_sums, bool):
            raise NativeValueError(f"chunk_sums: expected a bool, got {chunk_sums!r}")
        specs = buffer_specs(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format, value_format,
                             key_group, summary_tokens, chunk_sums)
        kf, vf = _enum(KeyFormat, key_format, "key_format"), _enum(ValueFormat, value_format, "value_format")
        total = store_nbytes(specs)

        def z(name, spec):
            if spec is None:
                return None
            shape, dtype = spec
            try:
                if pin_memory:
                    return torch.zeros(shape, dtype=dtype, pin_memory=True)
                t = torch.empty(shape, dtype=dtype)
            except RuntimeError as exc:  # torch's allocators raise RuntimeError, not MemoryError
                one = store_nbytes(StoreBuffers(spec, None, None, None, None))
                kind = ", page-locked" if pin_memory else ""
                raise NativeMemoryError(
                    f"HostStoreView.allocate: cannot allocate {name} {tuple(shape)} "
                    f"{str(dtype).replace('torch.', '')} ({one / 2**30:.3f} GiB{kind}) "
                    f"of a store of {total / 2**30:.3f} GiB: {exc}") from exc
            if t.numel() * t.element_size() >= HUGE_ADVICE_BYTES:  # huge pages before the first touch
                advise_hugepages(t)
            return t.zero_()

        bufs = StoreBuffers(*(z(name, spec) for name, spec in zip(StoreBuffers._fields, specs)))
        return cls(n_layers=n_layers, n_pages=n_pages, kv_heads=kv_heads, page_tokens=page_tokens,
                   head_dim=head_dim, key_format=kf, value_format=vf, key_group=key_group,
                   summary_tokens=summary_tokens, keys=bufs.keys, key_scales=bufs.key_scales, values=bufs.values,
                   value_scales=bufs.value_scales, summary=bufs.summary, chunk_sums=bufs.chunk_sums)

    @staticmethod
    def bytes_for(*, n_layers: int, n_pages: int, kv_heads: int, page_tokens: int, head_dim: int,
                  key_format: KeyFormat | str = KeyFormat.INT8, value_format: ValueFormat | str = ValueFormat.BF16,
                  key_group: int = 32, summary_tokens: int = 16, chunk_sums: bool = False) -> int:
        """Bytes of every buffer `allocate` would make for these arguments (nothing is allocated)."""
        return store_nbytes(buffer_specs(n_layers, n_pages, kv_heads, page_tokens, head_dim, key_format,
                                         value_format, key_group, summary_tokens, chunk_sums))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers if t is not None)

    def _handle(self) -> int:
        if self.handle is None:
            raise NativeValueError("HostStoreView: the store is closed")
        now = tuple((t.data_ptr(), t.numel()) if t is not None else None for t in self.buffers)
        if now != self._opened:
            moved = [n for n, a, b in zip(StoreBuffers._fields, now, self._opened) if a != b]
            raise NativeValueError(f"HostStoreView: {', '.join(moved)} moved or resized since the store was "
                                   f"opened over them; the C store still points at the old memory")
        return self.handle

    def _layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise NativeValueError(f"layer: expected an int, got {layer!r}")
        if not -2**31 <= layer < 2**31:
            raise NativeIndexError(f"layer: expected a layer of the store, got {layer}")
        return layer

    def append(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v [n, H, T, D] (f32 or bf16) into pages page_ids of layer."""
        h = self._handle()
        ids = C.int32_vector("page_ids", page_ids)
        n = ids.numel()
        shape = (n, self.kv_heads, self.page_tokens, self.head_dim)
        C.tensor("k", k, (torch.float32, torch.bfloat16), shape)
        C.tensor("v", v, (k.dtype,), shape)
        src = lib.KVT_SRC_F32 if k.dtype == torch.float32 else lib.KVT_SRC_BF16
        check(lib.kvt_append(h, self._layer(layer), n, C.ptr("int32_t *", ids), C.ptr("void *", k),
                             C.ptr("void *", v), src))

    def _dequant(self, fn, layer, page_ids) -> torch.Tensor:
        h = self._handle()
        ids = C.int32_vector("page_ids", page_ids)
        out = torch.empty((ids.numel(), self.kv_heads, self.page_tokens, self.head_dim), dtype=torch.float32)
        check(fn(h, self._layer(layer), ids.numel(), C.ptr("int32_t *", ids), C.ptr("float *", out)))
        return out

    def dequant_keys(self, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
        """Keys of page_ids as f32 [n, H, T, D], dequantized exactly as the engine scores them."""
        return self._dequant(lib.kvt_dequant_keys, layer, page_ids)

    def values(self, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
        """Values of page_ids as f32 [n, H, T, D]."""
        return self._dequant(lib.kvt_dequant_values, layer, page_ids)

    dequant_values = values

    def raw_pages(self, layer: int, page_ids: torch.Tensor, heads: Optional[torch.Tensor] = None) -> "StoreBuffers":
        """The stored keys, values and scales of page_ids in layer, as stored (no summary); with
        heads (one kv-head per page id), only that head of each page, its head dimension kept (1).

        A gather on the CPU, for copying the quantized bytes elsewhere and dequantizing there
        with `dequant_raw_keys` / `dequant_raw_values`: fewer bytes to move than float32.
        """
        self._handle()
        ids = C.int32_vector("page_ids", page_ids)
        layer = self._layer(layer)
        if not 0 <= layer < self.n_layers:
            raise NativeValueError(f"raw_pages: layer: expected 0 <= layer < {self.n_layers}, got {layer}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_pages):
            raise NativeValueError(f"raw_pages: page_ids: expected ids in [0, {self.n_pages}), got "
                                   f"{int(ids.min())}..{int(ids.max())}")
        idx = ids.long()
        if heads is not None:
            hd = heads.long()
            if hd.shape != idx.shape or (hd.numel() and (int(hd.min()) < 0 or int(hd.max()) >= self.kv_heads)):
                raise NativeValueError(f"raw_pages: heads: expected one kv-head in [0, {self.kv_heads}) per page id")

        def pick(t):
            if t is None:
                return None
            return t[layer].index_select(0, idx) if heads is None else t[layer][idx, hd].unsqueeze(1)

        return StoreBuffers(pick(self.keys), pick(self.key_scales), pick(self.buffers.values),
                            pick(self.value_scales), None)

    def close(self) -> None:
        """Close the C store: new calls over it are refused at once; this returns once the engine calls
        in flight over it (runs, plans, appends) have returned. Idempotent."""
        if getattr(self, "handle", None) is not None:
            check(lib.kvt_store_close(self.handle))
            self.handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dequant_raw_keys(raw: StoreBuffers, key_format: KeyFormat | str, key_group: int) -> torch.Tensor:
    """raw_pages() keys -> float32 [n, H, T, D] on raw's device, equal to `dequant_keys`."""
    kf = _enum(KeyFormat, key_format, "key_format")
    k = raw.keys
    if kf is KeyFormat.BF16:
        return k.float()
    if kf is KeyFormat.INT8:
        return k.float() * raw.key_scales.unsqueeze(-1)
    if kf is KeyFormat.INT8_CHANNEL:  # [n, H, 2, D] (or [n, 2, D] for one head): scales, zero points
        sc = raw.key_scales.float()
        return k.float() * sc.select(-2, 0).unsqueeze(-2) + sc.select(-2, 1).unsqueeze(-2)
    b = k.view(torch.int8)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(b, 4), 4)  # sign-extended low nibble: channel 2i
    high = torch.bitwise_right_shift(b, 4)  # channel 2i + 1
    q = torch.stack([low, high], dim=-1).flatten(-2).float()
    return q * raw.key_scales.repeat_interleave(key_group, dim=-1)


def dequant_raw_values(raw: StoreBuffers, value_format: ValueFormat | str) -> torch.Tensor:
    """raw_pages() values -> float32 [n, H, T, D] on raw's device, equal to `values`."""
    vf = _enum(ValueFormat, value_format, "value_format")
    if vf is ValueFormat.BF16:
        return raw.values.float()
    return raw.values.float() * raw.value_scales.unsqueeze(-1)
