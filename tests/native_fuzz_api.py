"""The fuzzer's API cases (`native_fuzz`): stores, page tables, edges, hand-built stores, threads.

Each takes (rng, generator) and returns its outcome ("ok", or "refused: ErrorType" where
its input called for a typed error); anything else it raises is a failure.
"""

from __future__ import annotations

import math
import random
import threading
import time

import torch

import kvtier._native as N
from kvtier._native._loader import check, ffi, lib
from native_fuzz_check import Mismatch

I32, I64 = 2**31 - 1, 2**63 - 1


def _snapshot(store):
    return [t.clone() for t in store.buffers if t is not None]


def _same(store, snap) -> bool:
    return all(torch.equal(a, b) for a, b in zip(snap, [t for t in store.buffers if t is not None]))


def _quant_ok(store, layer, ids, k, v) -> str | None:
    """Appended pages within the format's bounds (tests/test_native_store.py) and inside their summaries.

    The bounds get 1e-4 of themselves for float rounding: x / scale is rounded in float32, so where it
    lands within ~127·2^-23 of a half-integer it may round to the farther integer, and the stored
    scale is itself rounded (1e-5, as test_native_store allows, was exceeded once in 10^4 cases)."""
    kd, vd = store.dequant_keys(layer, ids), store.values(layer, ids)
    k, v = k.float(), v.float()
    kf, G = store.key_format.value, store.key_group
    if kf == "int8":
        bound = k.abs().amax(-1, keepdim=True) / 127 / 2
    elif kf == "int8_channel":  # per channel of each page: half its range around the bf16 zero point, / 127
        mn, mx = k.amin(-2, keepdim=True), k.amax(-2, keepdim=True)
        z = ((mn + mx) / 2).bfloat16().float()
        bound = torch.maximum(mx - z, z - mn) / 127 * (1 + 2.0**-7) / 2
    elif kf == "int4":
        bound = (k.unflatten(-1, (-1, G)).abs().amax(-1) / 7 / 2).repeat_interleave(G, -1)
    else:
        bound = k.abs() * 2.0**-8
    if not ((kd - k).abs() <= bound * (1 + 1e-4) + 1e-7).all():
        return "keys off their quantization bound"
    vb = v.abs().amax(-1, keepdim=True) / 127 / 2 if store.value_format.value == "int8" else v.abs() * 2.0**-8
    if not ((vd - v).abs() <= vb * (1 + 1e-4) + 1e-7).all():
        return "values off their quantization bound"
    S = store.summary_tokens
    s = store.summary[layer][:, ids.long()].transpose(0, 1).float()  # [n, H, T/S, 2, D]
    chunks = k.unflatten(2, (-1, S))
    if not ((s[..., 0, :] <= chunks.amin(3)).all() and (s[..., 1, :] >= chunks.amax(3)).all()):
        return "summary does not bound the keys"
    return None


def case_store(rng: random.Random, g: torch.Generator) -> str:
    """Appends (valid, NaN/Inf, repeated or bad ids, bad layers) and dequantization."""
    D = rng.choice((16, 32, 64, 128))
    T = rng.choice((4, 8, 16))
    kf = rng.choice(("bf16", "int8", "int8_channel", "int4"))
    store = N.HostStoreView.allocate(
        n_layers=rng.choice((1, 2)), n_pages=rng.randint(2, 9), kv_heads=rng.choice((1, 2, 3)), page_tokens=T,
        head_dim=D, key_format=kf, value_format=rng.choice(("bf16", "int8")),
        key_group=rng.choice([x for x in range(2, D + 1, 2) if D % x == 0]) if kf == "int4" else 32,
        summary_tokens=rng.choice([s for s in (1, 2, 4, 8) if T % s == 0]), chunk_sums=rng.random() < 0.5)
    P, H, L = store.n_pages, store.kv_heads, store.n_layers
    outcome = "ok"
    with store:
        for _ in range(rng.randint(3, 8)):
            n = rng.randint(1, P)
            ids = torch.tensor(rng.sample(range(P), n), dtype=torch.int32)
            src = rng.choice((torch.float32, torch.bfloat16))
            k = (torch.randn(n, H, T, D, generator=g) * rng.choice((0.01, 1.0, 50.0))).to(src)
            v = torch.randn(n, H, T, D, generator=g).to(src)
            layer = rng.randrange(L)
            what = rng.choice(("ok", "ok", "nan", "id", "dup", "layer"))
            snap = _snapshot(store) if what != "ok" else None
            if what == "ok":
                store.append(layer, ids, k, v)
                why = _quant_ok(store, layer, ids, k, v)
                if why:
                    raise Mismatch(f"append: {why}")
                continue
            if what == "nan":
                x = rng.choice((k, v))
                x.view(-1)[rng.randrange(x.numel())] = rng.choice((math.nan, math.inf, -math.inf))
                want, msg = N.NativeValueError, "finite keys and values"
            elif what == "id":
                ids[rng.randrange(n)] = rng.choice((-1, P, I32, -I32 - 1))
                want, msg = N.NativeIndexError, "page ids"
            elif what == "dup":
                if n < 2:
                    continue
                ids[1] = ids[0]
                want, msg = N.NativeValueError, "twice"
            else:
                layer = rng.choice((-1, L, I32))
                want, msg = N.NativeIndexError, "layer"
            try:
                store.append(layer, ids, k, v)
            except want as exc:
                if msg not in str(exc):
                    raise Mismatch(f"append ({what}): message {exc} does not name {msg!r}")
                outcome = f"refused: {type(exc).__name__}"
            else:
                raise Mismatch(f"append ({what}) was accepted")
            if not _same(store, snap):
                raise Mismatch(f"a refused append ({what}) changed the store")
        try:
            store.dequant_keys(rng.randrange(L), torch.tensor([rng.choice((-1, P, I32))]))
            raise Mismatch("dequant of a page out of range was accepted")
        except N.NativeIndexError:
            pass
    return outcome


def case_tables(rng: random.Random, g: torch.Generator) -> str:
    """HostStore page accounting under random admit/allocate/release/share/adopt/holds/writes."""
    from kvtier.config import ModelShape, from_mapping
    from kvtier.store import CapacityError, HostStore, PageOwnerError, UnknownRequestError

    shape = ModelShape(n_layers=1, num_q_heads=1, kv_heads=1, head_dim=16)
    cfg = from_mapping({"policy": "hgca", "window": {"sink_tokens": 0, "window_tokens": 16, "page_tokens": 16},
                        "host_store": {"on_full": rng.choice(("reject", "evict")), "key_format": "bf16",
                                       "value_format": "bf16"}})
    P = rng.randint(2, 12)
    store = HostStore(cfg, shape, n_pages=P)
    shadow = {}  # page -> the value its owner last wrote
    rids = list(range(5))
    holds = []
    outcome = "ok"

    def kv(n, x):
        return torch.full((n, 1, 16, 16), float(x))

    for step in range(rng.randint(10, 40)):
        op = rng.choice(("admit", "alloc", "alloc", "release", "share", "adopt", "hold", "unhold", "write",
                         "write", "stray"))
        r = rng.choice(rids)
        try:
            if op == "admit":
                store.admit(r, first_pos=0)
            elif op == "alloc":
                store.allocate(r, rng.randint(1, 3))
            elif op == "release":
                store.release(r)
            elif op == "share":
                src = rng.choice(rids)
                store.share(src, r, rng.randint(0, len(store.table(src).pages)))
            elif op == "adopt":
                live = [p for p in range(P) if store._refs[p] > 0]
                store.adopt(r, first_pos=0, pages=rng.sample(live, min(len(live), rng.randint(0, 2))))
            elif op == "hold":
                live = [p for p in range(P) if store._refs[p] > 0]
                pick = rng.sample(live, min(len(live), rng.randint(1, 2)))
                store.cache_hold(pick)
                holds += pick
            elif op == "unhold" and holds:
                pick = [holds.pop(rng.randrange(len(holds)))]
                store.cache_release(pick)
            elif op in ("write", "stray"):
                table = store.table(r).pages
                pages = rng.sample(table, rng.randint(0, len(table))) if op == "write" else \
                    rng.sample(range(P), rng.randint(1, P))
                val = step + 1
                owned = set(pages) <= set(table)
                try:
                    store.write(r, 0, pages, kv(len(pages), val), kv(len(pages), val))
                except PageOwnerError:
                    if owned:
                        raise Mismatch(f"write of request {r}'s own pages {pages} was refused")
                    outcome = "refused: PageOwnerError"
                else:
                    if not owned:
                        raise Mismatch(f"write of pages {pages} outside request {r}'s table {table} was accepted")
                    for p in pages:
                        shadow[p] = val
        except (CapacityError, UnknownRequestError, ValueError) as exc:
            if isinstance(exc, PageOwnerError):
                raise
            outcome = outcome if outcome != "ok" else f"refused: {type(exc).__name__}"
        # invariants: reference counts are tables plus holds, free pages are exactly those with none
        refs = [0] * P
        for t in store._tables.values():
            for p in t.pages:
                refs[p] += 1
        for p in holds:
            refs[p] += 1
        if refs != store._refs:
            raise Mismatch(f"after {op}: page references {store._refs}, tables and holds say {refs}")
        free = sorted(store._free)
        if free != sorted(set(free)) or free != [p for p in range(P) if refs[p] == 0]:
            raise Mismatch(f"after {op}: free list {free} is not the pages without references")
        for p in range(P):
            if refs[p] == 0:
                shadow.pop(p, None)
        for p, val in shadow.items():
            if not (store.view.values(0, torch.tensor([p])) == val).all():
                raise Mismatch(f"after {op}: page {p} lost the value its owner wrote")
    store.close()
    return outcome


def _engine_case(rng, g):
    from native_cases import make_case

    D = rng.choice((16, 32, 64))
    case = make_case(D=D, T=16, G=rng.choice((1, 2)), Hkv=rng.choice((1, 2)),
                     lengths=tuple(rng.randint(0, 90) for _ in range(rng.randint(1, 3))), layers=1,
                     seed=rng.randrange(2**31), kf=rng.choice(("bf16", "int8", "int4")), sums=rng.random() < 0.5,
                     grp=rng.choice((2, 8, D)))
    return case


def _typed(fn):
    """('ok', value) or ('refused: T', exc) for a typed native error; anything else propagates."""
    try:
        return "ok", fn()
    except N.NativeError as exc:
        return f"refused: {type(exc).__name__}", exc


def case_edges(rng: random.Random, g: torch.Generator) -> str:
    """Garbage and extreme arguments through the Python API and the C API: typed errors or results."""
    store, table, offs, ntok, q = _engine_case(rng, g)
    B, Hq, D = q.shape
    Hkv = store.kv_heads
    pick = lambda *xs: rng.choice(xs)  # noqa: E731
    kw = dict(mode=pick("topk", "mass", "blocks", "all", "bogus"), group_reduce=pick("max", "mean", "per_qhead"),
              budget_tokens=torch.full((B, Hkv), pick(1, 7, 0, -1, I32, I32 + 1, I64, -I64 - 1), dtype=torch.int64),
              block_tokens=torch.full((Hkv,), pick(16, 32, 0, -16, 2**30, I32), dtype=torch.int64),
              mass_threshold=pick(0.5, 1.0, 0.0, 1.5, math.nan), sm_scale=pick(0.1, 1e-30, 0.0, -1.0, math.inf),
              soft_cap=pick(0.0, 5.0, -1.0, math.nan), prefilter=pick(0.0, 1.0, 1.6, 0.5, math.nan, math.inf, 1e300),
              residual=pick(False, True) and store.chunk_sums is not None)
    nt = ntok.clone().long()
    of = offs.clone().long()
    tb = table.clone().long()
    heads = Hq
    edge = rng.randrange(8)
    if edge == 0:
        nt[rng.randrange(B)] = pick(-1, I32, 2**30 + 1, int(nt.max()) + 17)
    elif edge == 1:
        of[rng.randrange(B + 1)] = pick(-1, I32, int(of[-1]) + 1, I32 + 1)
    elif edge == 2 and len(tb):
        tb[rng.randrange(len(tb))] = pick(-1, store.n_pages, I32, I32 + 5)
    elif edge == 3:
        heads = pick(0, Hkv * 3 + (Hkv > 1), 2**12 + Hkv, I32)
    outcome, _ = _typed(lambda: None)
    with store, N.Engine(rng.choice((1, 2))) as eng:
        outcome, _ = _typed(lambda: eng.plan(store, tb, of, nt, heads, **kw))
        planned = (B, heads, D) if outcome == "ok" else None
        if outcome == "ok":
            layer = pick(0, 0, -1, 1, I32, I32 + 1)
            got, res = _typed(lambda: eng.run(layer, q if heads == Hq else torch.randn(B, heads, D, generator=g)))
            if got == "ok":
                finite = torch.isfinite(res.out).all() and not torch.isnan(res.lse).any()
                sane = kw["sm_scale"] >= 1e-3 and math.isfinite(kw["sm_scale"])
                if sane and not finite:
                    raise Mismatch(f"a run with sane inputs gave non-finite output ({kw})")
            outcome = got
        # the C calls over the plan with sizes that are not the plan's, bogus handles, NULL buffers
        # big enough for every shape below: a call the engine wrongly accepted reads and writes in bounds
        qb = ffi.new("float[]", (B + 1) * (max(Hq, heads if heads < 2**13 else 0) + 1) * (D + 16) + 64)
        for args in ((eng.handle, 0, B + 1, Hq, D), (eng.handle, 0, B, Hq + 1, D), (eng.handle, 0, B, Hq, D + 16),
                     (pick(0, -1, I32, eng.handle + 256), 0, B, Hq, D), (eng.handle, I32, B, Hq, D)):
            accepted = _typed(lambda: check(lib.kvt_run(*args, qb, qb, qb, ffi.NULL, ffi.NULL, 0)))[0] == "ok"
            if accepted != (args[:2] == (eng.handle, 0) and args[2:] == planned):
                raise Mismatch(f"kvt_run{args} over a plan of {planned}: {'accepted' if accepted else 'refused'}")
        null_q = _typed(lambda: check(lib.kvt_run(eng.handle, 0, B, Hq, D, ffi.NULL, qb, qb, ffi.NULL, ffi.NULL, 0)))
        if null_q[0] == "ok":
            raise Mismatch("kvt_run with a NULL query was accepted")
        if _typed(lambda: check(lib.kvt_stream_read(eng.handle, qb, -5, ffi.NULL)))[0] == "ok":
            raise Mismatch("kvt_stream_read of -5 bytes was accepted")
    # store descriptors near the limits (C, no buffers are touched) and allocations past memory
    d = ffi.new("kvt_store_desc *")
    d.n_layers, d.n_pages, d.kv_heads = pick(1, I32), pick(1, I32, 0), pick(1, I32, -3)
    d.page_tokens, d.head_dim, d.summary_tokens = pick(16, 2**21, I32 - I32 % 16), pick(16, 1040, I32), 16
    d.key_format, d.value_format, d.key_group = pick(0, 1, 2, 7), pick(0, 1, -1), pick(2, 0, 3)
    buf = ffi.new("char[]", 64)
    d.keys = d.values = d.summary = d.key_scales = d.value_scales = ffi.cast("void *", buf)
    h = ffi.new("int32_t *")
    dims = (d.n_layers, d.n_pages, d.kv_heads, d.page_tokens, d.head_dim)
    valid = (min(dims) > 0 and d.page_tokens <= 2**20 and d.kv_heads <= 2**12 and d.head_dim % 16 == 0
             and d.head_dim <= 1024 and d.key_format in (0, 1, 2) and d.value_format in (0, 1)
             and (d.key_format != 2 or (d.key_group > 0 and d.key_group % 2 == 0 and d.head_dim % d.key_group == 0))
             and 8 * math.prod(dims) <= 2**62)
    rc = lib.kvt_store_open(d, h)
    if rc == 0:
        check(lib.kvt_store_close(h[0]))  # its buffers are 64 bytes: never used
    if (rc == 0) != valid:
        raise Mismatch(f"kvt_store_open of {dims}, formats {d.key_format}, {d.value_format}, group {d.key_group}: "
                       f"rc {rc}, expected {'success' if valid else 'a refusal'}")
    big = dict(n_layers=pick(1, I32), n_pages=pick(2**28, I32), kv_heads=pick(1, 2**12), page_tokens=16, head_dim=128)
    got, exc = _typed(lambda: N.HostStoreView.allocate(**big))
    if got == "ok":
        exc.close()
        raise Mismatch(f"a store of {N.HostStoreView.bytes_for(**big)} bytes was allocated")
    return outcome


def case_handbuilt(rng: random.Random, g: torch.Generator) -> str:
    """HostStoreView(...) over given buffers: a wrong one is refused by name, right ones work."""
    D = rng.choice((16, 32, 64))
    T = rng.choice((8, 16))
    kf, vf = rng.choice(("bf16", "int8", "int8_channel", "int4")), rng.choice(("bf16", "int8"))
    dims = dict(n_layers=rng.choice((1, 2)), n_pages=rng.randint(1, 5), kv_heads=rng.choice((1, 2)), page_tokens=T,
                head_dim=D, key_format=kf, value_format=vf, key_group=rng.choice((2, 8, D)) if kf == "int4" else 32,
                summary_tokens=rng.choice((4, 8)))
    ref = N.HostStoreView.allocate(**dims, chunk_sums=rng.random() < 0.5)
    ref.close()
    bufs = dict(ref.buffers._asdict())
    name = rng.choice(list(bufs))
    how = rng.choice(("none", "ok", "shape", "dtype", "strided", "other", "list"))
    t = bufs[name]
    if how == "shape" and t is not None:
        dim = rng.randrange(t.dim())
        shape = list(t.shape)
        shape[dim] += rng.choice((-1, 1)) if shape[dim] > 1 else 1
        bufs[name] = torch.zeros(shape, dtype=t.dtype)
    elif how == "dtype" and t is not None:
        bufs[name] = t.view(torch.uint8) if t.dtype != torch.uint8 else t.view(torch.int8)
        if bufs[name].shape != t.shape:
            bufs[name] = torch.zeros(t.shape, dtype=torch.float64)
    elif how == "strided" and t is not None and t.dim() >= 2 and t.shape[-1] > 1:
        bufs[name] = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)[..., ::2]
    elif how == "other" and name != "chunk_sums":  # a store may or may not have chunk sums
        bufs[name] = None if t is not None else torch.zeros(4)
    elif how == "list":
        bufs[name] = [0] * 8
    else:
        how = "ok"
    if how == "ok":
        s = N.HostStoreView(**dims, **bufs)
        with s:
            k = torch.randn(1, dims["kv_heads"], T, D, generator=g)
            s.append(0, torch.tensor([0]), k, k)
            why = _quant_ok(s, 0, torch.tensor([0]), k, k)
            if why:
                raise Mismatch(f"hand-built store: {why}")
        return "ok"
    try:
        N.HostStoreView(**dims, **bufs).close()
    except N.NativeValueError as exc:
        if name not in str(exc):
            raise Mismatch(f"a bad {name} ({how}) was refused without naming it: {exc}")
        return "refused: NativeValueError"
    raise Mismatch(f"a bad {name} ({how}) was accepted")


def case_threads(rng: random.Random, g: torch.Generator) -> str:
    """plan, run, score, serve, close and set_isa from several threads at once for a moment: every
    call returns its plan's result or a typed error."""
    from native_cases import make_case

    store, table, offs, ntok, q1 = make_case(D=64, T=16, lengths=(rng.randint(500, 3000),), layers=1,
                                             seed=rng.randrange(2**31), kf=rng.choice(("int8", "int4", "bf16")))
    qb = torch.randn(5, q1.shape[1], 64, generator=g)
    big = (table[:1].repeat(5), torch.arange(6, dtype=torch.int32), torch.full((5,), min(16, int(ntok[0])),
                                                                           dtype=torch.int32))
    budget = lambda b: torch.full((b, store.kv_heads), 32, dtype=torch.int32)  # noqa: E731
    switch_isa = rng.random() < 0.3
    isas = [n for n in N.ISA_NAMES if N.isa_supported(n)]
    eng = N.Engine(rng.choice((1, 2, 3)))
    want = {}
    eng.plan(store, big[0], big[1], big[2], q1.shape[1], budget_tokens=budget(5), sm_scale=0.125)
    want[5] = eng.run(0, qb).out
    eng.plan(store, table, offs, ntok, q1.shape[1], budget_tokens=budget(1), sm_scale=0.125)
    want[1] = eng.run(0, q1).out
    stop = time.monotonic() + rng.uniform(0.05, 0.25)
    errors = []

    def guard(fn):
        def body():
            try:
                while time.monotonic() < stop:
                    fn()
            except Exception as exc:  # noqa: BLE001 - handed back
                errors.append(exc)
        return body

    def runner():
        p = eng._plan
        if p is None:
            return
        q = q1 if p["B"] == 1 else qb
        ok, res = _typed(lambda: eng.run(0, q))
        if ok == "ok" and not switch_isa and not torch.equal(res.out, want[p["B"]]):
            raise Mismatch(f"a run of batch {p['B']} differs from the same plan's result alone")
        if ok == "ok" and not torch.isfinite(res.out).all():
            raise Mismatch("a run gave non-finite output")

    def planner():
        if rng.random() < 0.5:
            _typed(lambda: eng.plan(store, big[0], big[1], big[2], q1.shape[1], budget_tokens=budget(5),
                                    sm_scale=0.125))
        else:
            _typed(lambda: eng.plan(store, table, offs, ntok, q1.shape[1], budget_tokens=budget(1), sm_scale=0.125))
        if rng.random() < 0.1 and eng._plan is not None:  # a short serve loop
            p = eng._plan
            buf = N.ServeBuffers.allocate(1, p["B"], p["Hq"], p["D"])
            ok, loop = _typed(lambda: eng.server(buf, first_seq=1, timeout_s=5.0))
            if ok == "ok":
                t = threading.Thread(target=lambda: _typed(loop))
                t.start()
                buf.q[0].copy_(q1 if p["B"] == 1 else qb)
                buf.q_ready[0] = 1
                buf.stop[0] = 2
                t.join()

    def other():
        r = rng.random()
        if r < 0.3 and switch_isa:
            _typed(lambda: N.set_isa(rng.choice(isas)))
        elif r < 0.5 and eng._plan is not None:
            p = eng._plan
            _typed(lambda: eng.score(0, q1 if p["B"] == 1 else qb))
        elif r < 0.52:
            _typed(lambda: check(lib.kvt_engine_destroy(eng.handle)) if eng.handle else None)
        time.sleep(0.001)

    threads = [threading.Thread(target=guard(f)) for f in (runner, runner, planner, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if rng.random() < 0.5:  # the store closes under the engine: later runs are refused, not crashed
        store.close()
        if eng._plan is not None and eng.handle is not None:
            p = eng._plan
            if _typed(lambda: eng.run(0, q1 if p["B"] == 1 else qb))[0] == "ok":
                raise Mismatch("a run over a closed store was accepted")
    try:
        eng.close()
    except N.NativeError:
        pass
    store.close()
    if errors:
        raise errors[0]
    return "ok"
