"""Compressed keys of every host page, on the device: what GPU-side selection reads.

HCAttention keeps a compressed copy of each evicted token's key where the selector
runs (the GPU in a server), and the exact keys and values on the host. A `KeyIndex`
holds those copies by host page id, for every layer: `store(layer, page_ids, k)` is
called when pages are written to the host store (`TierManager.key_listeners`), and
`scores(...)` returns approximate logits of every host token of a batch's requests.
Page ids are the store's, so pages shared by requests (a fork, an adopted prefix) are
stored once and indexed by every request that holds them.

Two forms:
- `ScalarKeys`: each key in `bits` (8, 4 or 2) with one float scale per (token,
  kv-head), symmetric: the low-bit keys the paper offers as a second form.
- `VqKeys`: grouped vector quantization (the paper's form). The head dim is split in
  `groups` groups of D/groups channels, each with its own codebook of `entries`
  centroids per (layer, kv-head); the device keeps one index per (token, kv-head,
  group). Scoring builds a lookup table q·C per group and sums it over the groups:
  score = sum_g T[g, code[t, g]]. A layer's codebooks are trained by k-means once
  `train_tokens` of its keys have been stored (or set by `set_codebooks`); until then
  its pages are kept as they came (bf16, on the device) and scored exactly, and at
  training they are encoded like every later page.

Shapes: k [pages, Hkv, T, D]; q [B, Hq, D] float32; scores [B, Hq, N] float32 with
-inf past each request's host tokens (N = the batch's longest host part).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional

import torch

from ..config import ModelShape
from . import key_index_triton

SCORE_TOKENS_AT_ONCE = 16384  # host tokens scored per chunk (bounds the scratch of a long request)


class KeyIndex(ABC):
    """Compressed keys by host page id (see the module docstring)."""

    def __init__(self, shape: ModelShape, n_pages: int, page_tokens: int, device: torch.device):
        self.shape, self.n_pages, self.page_tokens, self.device = shape, n_pages, page_tokens, torch.device(device)
        self.group = shape.num_q_heads // shape.kv_heads

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Device bytes held."""

    @abstractmethod
    def store(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        """Compress k [pages, Hkv, T, D] (any device) into the given page ids of layer."""

    @abstractmethod
    def _chunk_scores(self, layer: int, q: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Unscaled q·k~ [Hq, len(pages) * T] of one request's q [Hq, D] over whole pages."""

    def scores(self, layer: int, q: torch.Tensor, table: torch.Tensor, n_tokens: torch.Tensor, *,
               sm_scale: float, soft_cap: float = 0.0, counts: Optional[List[int]] = None) -> torch.Tensor:
        """Approximate logits [B, Hq, max(n_tokens)] of each request's host tokens.

        table [B, P] int32 on the device: request b's host pages, padded; n_tokens [B] int32 on
        the device; counts: the same as Python ints where the caller has them (a plan's), else
        they are read from n_tokens (a device sync). Scaled and soft-capped as the exact logits
        are; -inf past a request's tokens. On CUDA with Triton one kernel scores the batch
        (`key_index_triton`); elsewhere torch does, a request and SCORE_TOKENS_AT_ONCE tokens at
        a time (the reference).
        """
        b, hq = q.shape[0], q.shape[1]
        counts = [int(n) for n in n_tokens.tolist()] if counts is None else counts
        n_max = max(counts, default=0)
        out = torch.full((b, hq, n_max), float("-inf"), dtype=torch.float32, device=self.device)
        qf = q.to(self.device, torch.float32)
        if n_max and self._kernel(layer):
            self._kernel_scores(layer, qf, table, n_tokens, out, sm_scale, soft_cap)
            return out
        T = self.page_tokens
        per = max(1, SCORE_TOKENS_AT_ONCE // T)
        for i, n in enumerate(counts):
            pages = table[i, : -(-n // T)].to(torch.long)
            for j in range(0, pages.numel(), per):
                s = self._chunk_scores(layer, qf[i], pages[j: j + per])
                lo = j * T
                hi = min(n, lo + s.shape[1])
                out[i, :, lo:hi] = s[:, : hi - lo]
        out *= sm_scale
        if soft_cap > 0:  # -inf past the tokens stays -inf (tanh would bring it to -soft_cap)
            out = torch.where(torch.isfinite(out), soft_cap * torch.tanh(out / soft_cap), out)
        return out

    def _kernel(self, layer: int) -> bool:
        """Whether the Triton kernel scores this layer (CUDA, Triton, power-of-two tile shapes)."""
        return False

    def _kernel_scores(self, layer, q, table, n_tokens, out, sm_scale, soft_cap) -> None:
        raise AssertionError("no kernel for this index")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ScalarKeys(KeyIndex):
    """Symmetric `bits`-bit keys with one scale per (token, kv-head)."""

    def __init__(self, shape: ModelShape, n_pages: int, page_tokens: int, device, *, bits: int):
        super().__init__(shape, n_pages, page_tokens, device)
        if bits not in (2, 4, 8):
            raise ValueError(f"ScalarKeys: expected bits 2, 4 or 8, got {bits!r}")
        self.bits = bits
        self.per_byte = 8 // bits
        d = shape.head_dim
        if d % self.per_byte:
            raise ValueError(f"ScalarKeys: head_dim {d} must be a multiple of {self.per_byte} for {bits}-bit keys")
        L, h = shape.n_layers, shape.kv_heads
        self.codes = torch.zeros(L, n_pages, h, page_tokens, d // self.per_byte, dtype=torch.uint8, device=self.device)
        self.scale = torch.zeros(L, n_pages, h, page_tokens, dtype=torch.float16, device=self.device)
        self.qmax = 2 ** (bits - 1) - 1

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scale.numel()

    def store(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        k = k.to(self.device, torch.float32)
        amax = k.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
        q = torch.clamp(torch.round(k / scale[..., None]), -self.qmax, self.qmax).to(torch.int16) + self.qmax
        q = q.to(torch.uint8)
        if self.per_byte > 1:
            q = q.view(*q.shape[:-1], -1, self.per_byte)
            packed = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=self.device)
            for i in range(self.per_byte):
                packed |= q[..., i] << (i * self.bits)
            q = packed
        ids = page_ids.to(self.device, torch.long)
        self.codes[layer, ids] = q
        self.scale[layer, ids] = scale.to(torch.float16)

    def keys(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """The dequantized keys of pages as [pages * T, Hkv, D] float32 (the scoring input)."""
        c = self.codes[layer, pages]
        if self.per_byte > 1:
            mask = (1 << self.bits) - 1
            c = torch.stack([(c >> (i * self.bits)) & mask for i in range(self.per_byte)], dim=-1).flatten(-2)
        k = (c.to(torch.float32) - self.qmax) * self.scale[layer, pages].to(torch.float32)[..., None]
        p, h, t, d = k.shape
        return k.transpose(1, 2).reshape(p * t, h, d)

    def _kernel(self, layer: int) -> bool:
        return key_index_triton.available(self.device) and _pow2(self.shape.head_dim)

    def _kernel_scores(self, layer, q, table, n_tokens, out, sm_scale, soft_cap) -> None:
        key_index_triton.scalar_scores(q, self.codes[layer], self.scale[layer], table, n_tokens, out,
                                       page_tokens=self.page_tokens, group=self.group, bits=self.bits,
                                       scale=sm_scale, soft_cap=soft_cap)

    def _chunk_scores(self, layer: int, q: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        k = self.keys(layer, pages)  # [N, Hkv, D]
        k = k.repeat_interleave(self.group, dim=1)  # [N, Hq, D]
        return torch.einsum("hd,nhd->hn", q, k)


class VqKeys(KeyIndex):
    """Grouped vector quantization: `groups` channel groups, `entries` centroids each."""

    def __init__(self, shape: ModelShape, n_pages: int, page_tokens: int, device, *, groups: int, entries: int,
                 train_tokens: int = 16384, iterations: int = 10, seed: int = 0):
        super().__init__(shape, n_pages, page_tokens, device)
        d = shape.head_dim
        if groups < 1 or d % groups:
            raise ValueError(f"VqKeys: codebook.groups must divide head_dim {d}, got {groups!r}")
        if not 2 <= entries <= 32768:
            raise ValueError(f"VqKeys: codebook.entries must be in [2, 32768], got {entries!r}")
        self.groups, self.entries, self.sub = groups, entries, d // groups
        self.train_tokens, self.iterations, self.seed = train_tokens, iterations, seed
        L, h = shape.n_layers, shape.kv_heads
        dtype = torch.uint8 if entries <= 256 else torch.int16
        self.codes = torch.zeros(L, n_pages, h, page_tokens, groups, dtype=dtype, device=self.device)
        self.codebooks = torch.zeros(L, h, groups, entries, self.sub, dtype=torch.float32, device=self.device)
        self.trained = [False] * L
        self._staged: List[Dict[int, torch.Tensor]] = [{} for _ in range(L)]  # untrained layers' pages, as stored

    @property
    def nbytes(self) -> int:
        staged = sum(t.numel() * t.element_size() for layer in self._staged for t in layer.values())
        return self.codes.numel() * self.codes.element_size() + self.codebooks.numel() * 4 + staged

    def set_codebooks(self, layer: int, codebooks: torch.Tensor) -> None:
        """codebooks [Hkv, groups, entries, D/groups] for layer (a calibration file's)."""
        want = tuple(self.codebooks.shape[1:])
        if tuple(codebooks.shape) != want:
            raise ValueError(f"codebooks of layer {layer}: expected shape {want}, got {tuple(codebooks.shape)}")
        self.codebooks[layer] = codebooks.to(self.device, torch.float32)
        self.trained[layer] = True
        staged, self._staged[layer] = self._staged[layer], {}
        for pid, k in staged.items():
            self._encode(layer, torch.tensor([pid]), k[None])

    def store(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        if self.trained[layer]:
            self._encode(layer, page_ids, k.to(self.device, torch.float32))
            return
        staged = self._staged[layer]
        for pid, kp in zip(page_ids.tolist(), k.to(self.device, torch.bfloat16)):
            staged[pid] = kp.clone()
        if len(staged) * self.page_tokens >= self.train_tokens:
            ids = list(staged)
            ks = torch.stack([staged[i] for i in ids]).to(torch.float32)  # [P, Hkv, T, D]
            p, h, t, _ = ks.shape
            x = ks.permute(1, 0, 2, 3).reshape(h, p * t, self.groups, self.sub)
            self.codebooks[layer] = kmeans(x, self.entries, self.iterations, self.train_tokens, self.seed + layer)
            self.trained[layer] = True
            self._staged[layer] = {}
            self._encode(layer, torch.tensor(ids), ks)

    def _encode(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor) -> None:
        p, h, t, _ = k.shape
        x = k.permute(1, 0, 2, 3).reshape(h, p * t, self.groups, self.sub)  # [Hkv, N, g, sub]
        codes = assign(x, self.codebooks[layer]).view(h, p, t, self.groups).permute(1, 0, 2, 3)
        self.codes[layer, page_ids.to(self.device, torch.long)] = codes.to(self.codes.dtype)

    def lut(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [..., Hq, D] -> the lookup tables q·C [..., Hq, groups, entries] of layer's codebooks."""
        hq = q.shape[-2]
        qg = q.reshape(*q.shape[:-2], hq // self.group, self.group, self.groups, self.sub)  # [..., Hkv, G, g, s]
        lut = torch.einsum("...kqgs,kgcs->...kqgc", qg, self.codebooks[layer])
        return lut.reshape(*q.shape[:-2], hq, self.groups, self.entries)

    def _kernel(self, layer: int) -> bool:
        return key_index_triton.available(self.device) and self.trained[layer] and _pow2(self.groups)

    def _kernel_scores(self, layer, q, table, n_tokens, out, sm_scale, soft_cap) -> None:
        key_index_triton.vq_scores(self.lut(layer, q), self.codes[layer], table, n_tokens, out,
                                   page_tokens=self.page_tokens, group=self.group, scale=sm_scale,
                                   soft_cap=soft_cap)

    def _chunk_scores(self, layer: int, q: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        if not self.trained[layer]:  # the layer's first keys, kept as they came: exact scores
            k = torch.stack([self._staged[layer][p] for p in pages.tolist()]).to(torch.float32)
            p, h, t, d = k.shape
            k = k.transpose(1, 2).reshape(p * t, h, d).repeat_interleave(self.group, dim=1)
            return torch.einsum("hd,nhd->hn", q, k)
        lut = self.lut(layer, q)  # [Hq, g, c]
        codes = self.codes[layer, pages].to(torch.long)  # [P, Hkv, T, g]
        p, h, t, g = codes.shape
        codes = codes.permute(1, 3, 0, 2).reshape(h, g, p * t).repeat_interleave(self.group, dim=0)  # [Hq, g, N]
        return torch.gather(lut, 2, codes).sum(dim=1)


class CodebookFileError(ValueError):
    """A codebook file that is missing, unreadable, or not for this model and codebook shape."""


def save_codebooks(path, books: torch.Tensor, meta: dict) -> None:
    """books [L, Hkv, groups, entries, D/groups] float32, with where they came from."""
    torch.save({"codebooks": books.float().cpu(), "meta": dict(meta)}, path)


def load_codebooks(path, shape: ModelShape, groups: int, entries: int, field: str = "hcattention.codebook.path"):
    """The codebooks of a file for this model shape and codebook: [L, Hkv, groups, entries, D/groups]."""
    import pathlib

    p = pathlib.Path(path)
    if not p.is_file():
        raise CodebookFileError(f"{field}: expected a codebook file (kvtier bench codebooks), found no file {p}")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
        books = data["codebooks"]
    except Exception as exc:  # not an archive of tensors, or no codebooks in it
        raise CodebookFileError(f"{field}: expected a codebook file (kvtier bench codebooks): {p}: {exc}") from None
    want = (shape.n_layers, shape.kv_heads, groups, entries, shape.head_dim // groups)
    if not isinstance(books, torch.Tensor) or tuple(books.shape) != want or not books.is_floating_point():
        found = tuple(books.shape) if isinstance(books, torch.Tensor) else type(books).__name__
        raise CodebookFileError(f"{field}: expected codebooks of shape {want} (layers, kv-heads, groups, entries, "
                                f"channels) for this model and codebook, found {found} in {p}")
    if not bool(torch.isfinite(books).all()):
        raise CodebookFileError(f"{field}: expected finite codebooks, found NaN or Inf in {p}")
    return books.float()


def train_codebooks(keys: torch.Tensor, groups: int, entries: int, *, iterations: int = 10,
                    max_points: int = 65536, seed: int = 0) -> torch.Tensor:
    """k-means codebooks of keys [L, N, Hkv, D] per (layer, kv-head, group): [L, Hkv, groups, entries, D/groups]."""
    L, n, h, d = keys.shape
    if groups < 1 or d % groups:
        raise ValueError(f"codebook.groups must divide head_dim {d}, got {groups!r}")
    out = []
    for layer in range(L):
        x = keys[layer].float().permute(1, 0, 2).reshape(h, n, groups, d // groups)
        out.append(kmeans(x, entries, iterations, max_points, seed + layer))
    return torch.stack(out)


def assign(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per group: x [H, N, g, s], books [H, g, c, s] -> codes [H, N, g] (int64)."""
    out = torch.empty(x.shape[:3], dtype=torch.long, device=x.device)
    scratch = 1 << (27 if x.is_cuda else 24)  # distance elements at a time
    step = max(1, scratch // max(1, books.shape[2] * x.shape[2] * x.shape[0]))
    bn = (books * books).sum(-1)  # [H, g, c]
    for i in range(0, x.shape[1], step):
        xi = x[:, i: i + step]  # [H, n, g, s]
        d = bn[:, None] - 2 * torch.einsum("hngs,hgcs->hngc", xi, books)
        out[:, i: i + step] = d.argmin(-1)
    return out


def kmeans(x: torch.Tensor, entries: int, iterations: int, max_points: int, seed: int) -> torch.Tensor:
    """Per (head, group) k-means of x [H, N, g, s] -> centroids [H, g, entries, s] (float32).

    Starts from `entries` points drawn at random (with replacement when there are fewer
    points than entries), then Lloyd steps; an empty cluster keeps its centroid.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, n, g, s = x.shape
    if n > max_points:
        x = x[:, torch.randperm(n, generator=gen)[:max_points].to(x.device)]
        n = max_points
    pick = torch.randint(n, (entries,), generator=gen) if n < entries else torch.randperm(n, generator=gen)[:entries]
    books = x[:, pick.to(x.device)].permute(0, 2, 1, 3).contiguous()  # [H, g, c, s]
    for _ in range(iterations):
        codes = assign(x, books)  # [H, N, g]
        sums = torch.zeros_like(books)
        counts = torch.zeros(books.shape[:3], dtype=torch.float32, device=x.device)
        idx = codes.permute(0, 2, 1)  # [H, g, N]
        sums.scatter_add_(2, idx[..., None].expand(h, g, n, s), x.permute(0, 2, 1, 3))
        counts.scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float32))
        books = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], books)
    return books


def select_mass(scores: torch.Tensor, tau: float, cap: int, *, with_lse: bool = False):
    """The smallest set of each row's tokens reaching softmax mass tau, at most cap.

    scores [B, H, N] (-inf padded). Returns (idx [B, H, m] int32, -1 where not kept;
    logits [B, H, m] of the kept tokens, -inf elsewhere), m = min(cap, N), and with_lse the
    row's LSE over all N tokens [B, H]. The mass is measured against the softmax over all
    N tokens of the row, so a capped set may hold less than tau.
    """
    b, h, n = scores.shape
    m = min(cap, n)
    if m == 0:
        out = (torch.full((b, h, 0), -1, dtype=torch.int32, device=scores.device),
               scores.new_full((b, h, 0), float("-inf")))
        return out + (scores.new_full((b, h), float("-inf")),) if with_lse else out
    top, idx = torch.topk(scores, m, dim=-1)  # sorted, descending
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(top - lse).nan_to_num(0.0)
    before = torch.cumsum(p, dim=-1) - p
    keep = (before < tau) & torch.isfinite(top)
    out = (torch.where(keep, idx, torch.full_like(idx, -1)).to(torch.int32),
           torch.where(keep, top, torch.full_like(top, float("-inf"))))
    return out + (lse[..., 0],) if with_lse else out


def union_per_kv(idx: torch.Tensor, group: int) -> torch.Tensor:
    """idx [B, Hq, m] int32 token indices (-1: none) -> [B, Hq / group, group * m] int32: each kv-head's
    union of its `group` query heads' tokens, ascending, -1 padded; on idx's device, no sync."""
    b, hq, m = idx.shape
    big = torch.iinfo(torch.int32).max
    x = idx.reshape(b, hq // group, group * m)
    x = torch.where(x < 0, torch.full_like(x, big), x).sort(dim=-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = x.masked_fill(dup, big).sort(dim=-1).values
    return torch.where(x == big, torch.full_like(x, -1), x)


__all__ = ["CodebookFileError", "KeyIndex", "ScalarKeys", "VqKeys", "assign", "kmeans", "load_codebooks",
           "save_codebooks", "select_mass", "train_codebooks", "union_per_kv"]
