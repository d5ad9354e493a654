"""Engine: a persistent native thread pool with one batch plan at a time."""

from __future__ import annotations

import enum
import logging
import math
import time
import weakref
from typing import Callable, Dict, NamedTuple

import torch

from ..config import env
from . import _checks as C
from ._loader import (NativeIndexError, NativeStateError, NativeUnsupportedError, NativeValueError, active_isa, check,
                      ffi, isa_supported, lib, set_isa)
from ._store import HostStoreView

log = logging.getLogger("kvtier")

ISA_NAMES = ("generic", "avx2", "avx512", "avx512bw", "amx")
_open_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class SelectMode(str, enum.Enum):
    TOPK = "topk"
    MASS = "mass"
    BLOCKS = "blocks"
    ALL = "all"


class GroupReduce(str, enum.Enum):
    MAX = "max"
    MEAN = "mean"
    PER_QHEAD = "per_qhead"


_MODE = {SelectMode.TOPK: lib.KVT_SELECT_TOPK, SelectMode.MASS: lib.KVT_SELECT_MASS,
         SelectMode.BLOCKS: lib.KVT_SELECT_BLOCKS, SelectMode.ALL: lib.KVT_SELECT_ALL}
_REDUCE = {GroupReduce.MAX: lib.KVT_REDUCE_MAX, GroupReduce.MEAN: lib.KVT_REDUCE_MEAN,
           GroupReduce.PER_QHEAD: lib.KVT_PER_QHEAD}


class EngineResult(NamedTuple):
    out: torch.Tensor                 # [B, Hq, D] f32
    lse: torch.Tensor                 # [B, Hq] f32, natural log; -inf for an empty request
    n_selected: torch.Tensor          # [B, Hq] int32
    sel_index: torch.Tensor | None    # [B, Hq, sel_cap] int32, -1 padded (return_selection=True)


class ServeBuffers(NamedTuple):
    """Host memory that a serving engine and the GPU stream share (see `Engine.server`).

    Slot i holds one job: its layer, its query, and its result (out [B, Hq, D]
    then lse [B, Hq], flat, so one copy brings both to the device). q_ready[i]
    is stored by the device once the query landed, far_ready[i] by the engine
    once the result is there; both hold the job's sequence number.
    """

    layer: torch.Tensor           # [n_slots] int32
    q: torch.Tensor               # [n_slots, B, Hq, D] f32
    far: torch.Tensor             # [n_slots, B * Hq * (D + 1)] f32
    q_ready: torch.Tensor         # [n_slots] int32
    far_ready: torch.Tensor       # [n_slots] int32
    stop: torch.Tensor            # [1] int32: 0 = serve on; n + 1 = end after n jobs
    done: torch.Tensor            # [1] int64: jobs finished
    engine_seconds: torch.Tensor  # [1] float64: time in runs, accumulated

    @classmethod
    def allocate(cls, n_slots: int, batch: int, num_q_heads: int, head_dim: int, *,
                 pin_memory: bool = False) -> "ServeBuffers":
        C.positive_int("n_slots", n_slots)
        rows = C.positive_int("batch", batch) * C.positive_int("num_q_heads", num_q_heads)
        C.positive_int("head_dim", head_dim)

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)

        return cls(zeros(n_slots, dtype=torch.int32), zeros(n_slots, batch, num_q_heads, head_dim),
                   zeros(n_slots, rows * (head_dim + 1)), zeros(n_slots, dtype=torch.int32),
                   zeros(n_slots, dtype=torch.int32), zeros(1, dtype=torch.int32), zeros(1, dtype=torch.int64),
                   zeros(1, dtype=torch.float64))

    @property
    def n_slots(self) -> int:
        return self.layer.numel()


def _enum(cls, v, name):
    try:
        return cls(v)
    except ValueError:
        raise NativeValueError(f"{name}: expected one of {[m.value for m in cls]}, got {v!r}") from None


def _clamp_budgets(budget: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Budgets [B, Hkv] of any integer dtype, each positive one clamped to its request's host tokens
    (at least 1): a larger budget selects the same tokens, and every budget then fits int32. Zero and
    negative budgets pass through for the engine to refuse."""
    if budget.dtype not in C._INT_DTYPES:
        got = str(budget.dtype).replace("torch.", "")
        raise NativeValueError(f"budget_tokens: expected an integer dtype, got {got}")
    b = budget.to(torch.int64)
    cap = n_tokens.to(torch.int64).clamp(min=1)[:, None]
    return torch.where(b > 0, torch.minimum(b, cap), b)


def _finite(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise NativeValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def use_isa(name: str) -> str:
    """Apply a policy's ``engine.isa`` to this process and return the active variant.

    The kernel variant is process-wide. ``auto`` keeps what the engine chose at
    load (the best one CPUID and the OS allow, or ``KVTIER_ISA``); a named
    variant is switched to, unless ``KVTIER_ISA`` forces one (the environment
    wins, with a warning when the two differ). Switching while an engine is open
    is refused: a run in flight would mix two variants' layouts."""
    if name == "auto":
        return active_isa()
    if name not in ISA_NAMES:
        raise NativeValueError(f"engine.isa: expected auto or one of {', '.join(ISA_NAMES)}, got {name!r}")
    forced = env.get(env.ISA)
    if forced:
        if forced != name:
            log.warning("kvtier: engine.isa %s is not applied: KVTIER_ISA=%s forces the engine's variant (%s)",
                        name, forced, active_isa())
        return active_isa()
    current = active_isa()
    if current == name:
        return name
    if not isa_supported(name):
        have = ", ".join(n for n in ISA_NAMES if isa_supported(n))
        raise NativeUnsupportedError(f"engine.isa: expected a variant this CPU and OS support ({have}), got {name!r}")
    still_open = sum(1 for e in list(_open_engines) if e.handle is not None)
    if still_open:
        raise NativeStateError(f"engine.isa: cannot switch the process-wide kernel variant from {current} to "
                               f"{name} while {still_open} engine(s) are open; close them first or give every "
                               f"policy in this process the same engine.isa")
    set_isa(name)
    log.info("kvtier: engine.isa=%s (the engine had picked %s)", name, current)
    return name


class Engine:
    """A native thread pool and the one plan it runs (`plan` once per batch, `run` per layer).

    The C engine owns the plan: `run`, `score`, `weighted_values` and `attend_indices` size their
    buffers from the plan this object last made and pass that shape to C, which refuses it
    (NativeStateError) when another thread has planned again since. Calls from several threads
    are serialized; `plan` is refused while a run or the serving loop is in flight, `close`
    while any call is, and a second `server` while one serves. A query with a NaN or infinity is
    refused (NativeValueError naming request and head). native/README.md, "Ownership".
    """

    def __init__(self, n_threads: int = 0):
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 0:
            raise NativeValueError(f"n_threads: expected an int >= 0 (0 = all CPUs), got {n_threads!r}")
        h = ffi.new("int32_t *")
        check(lib.kvt_engine_create(n_threads, h))
        self.handle: int | None = int(h[0])
        _open_engines.add(self)
        self.n_threads = int(lib.kvt_engine_threads(self.handle))
        self._plan: dict | None = None
        self._serving = False

    def _h(self) -> int:
        if self.handle is None:
            raise NativeValueError("Engine: the engine is closed")
        return self.handle

    def plan(self, store: HostStoreView, page_table: torch.Tensor, page_offsets: torch.Tensor,
             n_tokens: torch.Tensor, num_q_heads: int, *, mode: SelectMode | str = SelectMode.TOPK,
             group_reduce: GroupReduce | str = GroupReduce.MAX,
             budget_tokens: torch.Tensor | None = None, block_tokens: torch.Tensor | None = None,
             mass_threshold: float = 1.0, sm_scale: float, soft_cap: float = 0.0,
             prefilter: float = 0.0, residual: bool = False, sel_cap: int = 0) -> None:
        """Validate a batch and size all scratch; later run() calls allocate nothing in C.

        prefilter (topk and mass modes): 0 scores every host token; a factor >= 1
        ranks the store's summary chunks by their key upper bound and scores only
        the tokens of the best chunks, prefilter x budget of them.
        residual: the host tokens a selection leaves out join its softmax as one
        pseudo-token per summary chunk (their mean key and value; the logit plus the
        log of their count), so out and lse estimate the whole host part rather than
        the selection's. Needs a store allocated with chunk_sums=True.
        """
        h = self._h()
        if self._serving:
            raise NativeStateError("Engine.plan: the engine is serving a step (Engine.server); stop it first")
        if not isinstance(store, HostStoreView):
            raise NativeValueError(f"store: expected a HostStoreView, got {type(store).__name__}")
        sh = store._handle()
        if not isinstance(residual, bool):
            raise NativeValueError(f"residual: expected a bool, got {residual!r}")
        if residual and store.chunk_sums is None:
            raise NativeValueError("residual: needs a store allocated with chunk_sums=True, and this one has none")
        mode = _enum(SelectMode, mode, "mode")
        reduce = _enum(GroupReduce, group_reduce, "group_reduce")
        n_tok = C.int32_vector("n_tokens", n_tokens)
        B = n_tok.numel()
        if B == 0:
            raise NativeValueError("n_tokens: expected at least one request, got 0")
        offs = C.int32_vector("page_offsets", page_offsets, B + 1)
        table = C.int32_vector("page_table", page_table)
        if int(offs[-1]) > table.numel():
            raise NativeValueError(
                f"page_offsets: last offset {int(offs[-1])} exceeds page_table length {table.numel()}")
        C.positive_int("num_q_heads", num_q_heads)
        Hkv = store.kv_heads
        budget = None
        if mode is not SelectMode.ALL:
            if budget_tokens is None:
                raise NativeValueError(f"budget_tokens: expected an int tensor [{B}, {Hkv}] for mode {mode.value}")
            if not isinstance(budget_tokens, torch.Tensor) or tuple(budget_tokens.shape) != (B, Hkv):
                got = tuple(budget_tokens.shape) if isinstance(budget_tokens, torch.Tensor) else type(budget_tokens).__name__
                raise NativeValueError(f"budget_tokens: expected shape ({B}, {Hkv}), got {got}")
            budget = C.int32_vector("budget_tokens", _clamp_budgets(budget_tokens, n_tok).reshape(-1))
        blocks = None
        if mode is SelectMode.BLOCKS:
            if block_tokens is None:
                raise NativeValueError(f"block_tokens: expected an int tensor [{Hkv}] for mode blocks")
            blocks = C.int32_vector("block_tokens", block_tokens, Hkv)
        d = ffi.new("kvt_plan_desc *")
        d.batch, d.num_q_heads = B, num_q_heads
        d.page_table, d.page_offsets = C.ptr("int32_t *", table), C.ptr("int32_t *", offs)
        d.n_tokens = C.ptr("int32_t *", n_tok)
        d.mode, d.group_reduce = _MODE[mode], _REDUCE[reduce]
        d.budget_tokens, d.block_tokens = C.ptr("int32_t *", budget), C.ptr("int32_t *", blocks)
        d.mass_threshold = _finite("mass_threshold", mass_threshold)
        d.sm_scale = _finite("sm_scale", sm_scale)
        d.soft_cap = _finite("soft_cap", soft_cap)
        d.prefilter = _finite("prefilter", prefilter)
        d.residual = int(residual)
        check(lib.kvt_plan(h, sh, d))
        n_max = int(n_tok.max())
        if isinstance(sel_cap, bool) or not isinstance(sel_cap, int) or sel_cap < 0:
            raise NativeValueError(f"sel_cap: expected an int >= 0 (0 = derive from the budget), got {sel_cap!r}")
        if sel_cap == 0:
            if mode is SelectMode.ALL:
                sel_cap = n_max
            elif mode is SelectMode.BLOCKS:
                sel_cap = int(max(((budget.view(B, Hkv) + blocks - 1) // blocks * blocks).max(), 1))
            else:
                sel_cap = int(budget.max())
            sel_cap = max(1, min(sel_cap, n_max) if n_max > 0 else 1)
        self._plan = dict(store=store, B=B, Hq=num_q_heads, D=store.head_dim, n_max=n_max,
                          sel_cap=sel_cap, mode=mode)

    def _planned(self) -> dict:
        if self._plan is None:
            raise NativeStateError("Engine: expected plan() before run()")
        return self._plan

    def _q(self, q) -> torch.Tensor:
        p = self._planned()
        return C.tensor("q", q, (torch.float32,), (p["B"], p["Hq"], p["D"]))

    def run(self, layer: int, q: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_selection: bool = False) -> EngineResult:
        """Sparse attention of q [B, Hq, D] f32 over the planned host tokens of layer."""
        h = self._h()
        p = self._planned()
        q = self._q(q)
        B, Hq, D = p["B"], p["Hq"], p["D"]
        out = torch.empty((B, Hq, D), dtype=torch.float32) if out is None else \
            C.tensor("out", out, (torch.float32,), (B, Hq, D))
        lse = torch.empty((B, Hq), dtype=torch.float32) if lse is None else \
            C.tensor("lse", lse, (torch.float32,), (B, Hq))
        nsel = torch.empty((B, Hq), dtype=torch.int32)
        sel = torch.empty((B, Hq, p["sel_cap"]), dtype=torch.int32) if return_selection else None
        check(lib.kvt_run(h, self._layer(layer), B, Hq, D, C.ptr("float *", q), C.ptr("float *", out),
                          C.ptr("float *", lse), C.ptr("int32_t *", nsel), C.ptr("int32_t *", sel),
                          p["sel_cap"]))
        return EngineResult(out, lse, nsel, sel)

    def server(self, buf: ServeBuffers, *, first_seq: int, timeout_s: float = 60.0) -> Callable[[], None]:
        """Check `buf` against the plan and return the serving loop, to call on its own thread.

        The loop runs the jobs the GPU feeds through `buf`: job j uses slot
        j % n_slots and starts when q_ready of that slot equals first_seq + j,
        after which the engine stores that number in far_ready. It blocks (GIL
        released) until `buf.stop` is set to n + 1 and n jobs are done. A failed
        job still completes (out 0, lse -inf, so a stream waiting on it goes on)
        and the first failure is raised when the loop ends; a job whose query has
        not come timeout_s after stop was set raises NativeTimeoutError. Every
        check happens here, before the loop starts, so a loop that starts serves.
        """
        h = self._h()
        p = self._planned()
        if self._serving:
            raise NativeStateError("Engine.server: a serving loop of this engine is already out; one at a time")
        if not isinstance(buf, ServeBuffers):
            raise NativeValueError(f"buf: expected ServeBuffers, got {type(buf).__name__}")
        n = buf.n_slots
        B, Hq, D = p["B"], p["Hq"], p["D"]
        C.tensor("layer", buf.layer, (torch.int32,), (n,))
        C.tensor("q", buf.q, (torch.float32,), (n, B, Hq, D))
        C.tensor("far", buf.far, (torch.float32,), (n, B * Hq * (D + 1)))
        C.tensor("q_ready", buf.q_ready, (torch.int32,), (n,))
        C.tensor("far_ready", buf.far_ready, (torch.int32,), (n,))
        C.tensor("stop", buf.stop, (torch.int32,), (1,))
        C.tensor("done", buf.done, (torch.int64,), (1,))
        C.tensor("engine_seconds", buf.engine_seconds, (torch.float64,), (1,))
        if isinstance(first_seq, bool) or not isinstance(first_seq, int) or not 0 < first_seq < 2**31 - 2**24:
            raise NativeValueError(f"first_seq: expected an int in [1, 2**31 - 2**24), got {first_seq!r}")
        timeout_ms = int(_finite("timeout_s", timeout_s) * 1e3)
        if timeout_ms <= 0:
            raise NativeValueError(f"timeout_s: expected at least 0.001, got {timeout_s!r}")
        d = ffi.new("kvt_serve_desc *")
        d.n_slots, d.first_seq, d.timeout_ms = n, first_seq, timeout_ms
        d.layer, d.q, d.far = C.ptr("int32_t *", buf.layer), C.ptr("float *", buf.q), C.ptr("float *", buf.far)
        d.q_stride, d.far_stride = B * Hq * D, B * Hq * (D + 1)
        d.q_ready, d.far_ready = C.ptr("int32_t *", buf.q_ready), C.ptr("int32_t *", buf.far_ready)
        d.stop, d.done = C.ptr("int32_t *", buf.stop), C.ptr("int64_t *", buf.done)
        d.engine_seconds = C.ptr("double *", buf.engine_seconds)
        self._serving = True

        def serve(d=d, buf=buf) -> None:  # both stay alive while the loop runs
            try:
                check(lib.kvt_serve(h, d))
            finally:
                self._serving = False

        return serve

    @staticmethod
    def _layer(layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise NativeValueError(f"layer: expected an int, got {layer!r}")
        if not -2**31 <= layer < 2**31:
            raise NativeIndexError(f"layer: expected a layer of the store, got {layer}")
        return layer

    def score(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Scaled (and soft-capped) logits [B, Hq, n_max] of every host token; -inf past n_tokens.

        With int8 keys, or int4 keys in groups of a multiple of 4 channels, on a SIMD ISA
        these are the selection stage's int16-query logits, within the error bound that
        native/README.md states; other keys and `generic` give float logits."""
        h = self._h()
        p = self._planned()
        q = self._q(q)
        n_max = max(p["n_max"], 1)
        scores = torch.empty((p["B"], p["Hq"], n_max), dtype=torch.float32)
        check(lib.kvt_score(h, self._layer(layer), p["B"], p["Hq"], p["D"], C.ptr("float *", q),
                            C.ptr("float *", scores), n_max))
        return scores

    def weighted_values(self, store: HostStoreView, layer: int, idx: torch.Tensor, p: torch.Tensor,
                        *, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_j p[b,h,j] * V[token idx[b,h,j]] over the planned batch; idx -1 = skip."""
        h = self._h()
        pl = self._planned()
        if not isinstance(store, HostStoreView):
            raise NativeValueError(f"store: expected a HostStoreView, got {type(store).__name__}")
        B, Hq, D = pl["B"], pl["Hq"], pl["D"]
        C.tensor("idx", idx, (torch.int32,), (B, Hq, None))
        m = idx.shape[2]
        C.tensor("p", p, (torch.float32,), (B, Hq, m))
        out = torch.empty((B, Hq, D), dtype=torch.float32) if out is None else \
            C.tensor("out", out, (torch.float32,), (B, Hq, D))
        check(lib.kvt_weighted_values(h, store._handle(), self._layer(layer), B, Hq, D, C.ptr("int32_t *", idx),
                                      C.ptr("float *", p), m, C.ptr("float *", out)))
        return out

    def attend_indices(self, store: HostStoreView, layer: int, q: torch.Tensor, idx: torch.Tensor, *,
                       out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """Exact attention of each (request, query head) over the host tokens idx[b, h, :] names
        (-1 = none; unique within a row), over the planned batch: (out [B, Hq, D], lse [B, Hq]),
        logits from the store's keys, scaled and soft-capped as planned; lse in natural log,
        -inf for an empty row."""
        return self._attend_given(lib.kvt_attend_indices, store, layer, q, idx, out, lse, per_kv=False)

    def attend_kv_indices(self, store: HostStoreView, layer: int, q: torch.Tensor, idx: torch.Tensor, *,
                          out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """`attend_indices` with one set per (request, kv-head): idx [B, Hkv, m] (-1 = none; unique
        within a row), attended by every query head of the kv-head, each key and value row read
        once for them all. (out [B, Hq, D], lse [B, Hq])."""
        return self._attend_given(lib.kvt_attend_kv_indices, store, layer, q, idx, out, lse, per_kv=True)

    def _attend_given(self, fn, store, layer, q, idx, out, lse, *, per_kv: bool):
        h = self._h()
        pl = self._planned()
        if not isinstance(store, HostStoreView):
            raise NativeValueError(f"store: expected a HostStoreView, got {type(store).__name__}")
        B, Hq, D = pl["B"], pl["Hq"], pl["D"]
        q = self._q(q)
        C.tensor("idx", idx, (torch.int32,), (B, store.kv_heads if per_kv else Hq, None))
        out = torch.empty((B, Hq, D), dtype=torch.float32) if out is None else \
            C.tensor("out", out, (torch.float32,), (B, Hq, D))
        lse = torch.empty((B, Hq), dtype=torch.float32) if lse is None else \
            C.tensor("lse", lse, (torch.float32,), (B, Hq))
        check(fn(h, store._handle(), self._layer(layer), B, Hq, D, C.ptr("float *", q), C.ptr("int32_t *", idx),
                 idx.shape[2], C.ptr("float *", out), C.ptr("float *", lse)))
        return out, lse

    def stream_read(self, buf: torch.Tensor) -> int:
        """Sum of the bytes of buf, read by the engine's pool (the bandwidth ceiling probe)."""
        if not isinstance(buf, torch.Tensor) or buf.device.type != "cpu" or not buf.is_contiguous():
            raise NativeValueError("buf: expected a contiguous CPU tensor")
        s = ffi.new("uint64_t *")
        check(lib.kvt_stream_read(self._h(), C.ptr("void *", buf), buf.numel() * buf.element_size(), s))
        return int(s[0])

    PHASES = ("query", "score", "bound", "select", "exact", "attend", "residual", "residual_merge", "call")

    def trace(self, on: bool = True) -> None:
        """Time each phase of every `run` from now on (clearing the counters), or stop timing."""
        check(lib.kvt_engine_trace(self._h(), 1 if on else 0))

    def phase_times(self) -> Dict[str, float]:
        """Mean seconds per traced `run` of each phase (`PHASES`; `call` is the whole call), and `runs`."""
        ns = ffi.new("int64_t[]", len(self.PHASES))
        runs = ffi.new("int64_t *")
        check(lib.kvt_engine_phase_times(self._h(), ns, len(self.PHASES), runs))
        n = int(runs[0])
        times = {name: (ns[i] / n * 1e-9 if n else 0.0) for i, name in enumerate(self.PHASES)}
        times["runs"] = float(n)
        return times

    def close(self) -> None:
        if getattr(self, "handle", None) is not None:
            check(lib.kvt_engine_destroy(self.handle))
            self.handle = None
            self._plan = None
            _open_engines.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream_read_gbps(nbytes: int, n_threads: int = 0, repeats: int = 5,
                     engine: Engine | None = None) -> float:
    """Best-of-repeats GB/s (1e9 bytes/s) of a pooled streaming read of nbytes."""
    C.positive_int("nbytes", nbytes)
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    eng = engine if engine is not None else Engine(n_threads)
    try:
        eng.stream_read(buf)
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            eng.stream_read(buf)
            best = min(best, time.perf_counter() - t0)
    finally:
        if engine is None:
            eng.close()
    return nbytes / best / 1e9
