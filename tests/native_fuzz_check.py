"""The fuzzer's judge: an engine run against the float64 reference (`native_cases`).

Per selection set the engine's selection must equal the reference's or differ only
where float32 and float64 rounding may order things differently, and its out and lse
must equal float64 attention over the engine's own selection. The explanations
admitted, each at its own cut and within the float rounding of the sums involved
(`tol_*`), are the ones native/README.md states: two tokens a few ulp apart at the
k-th logit, the mass cut landing on the other side of tau (every head's mass as the engine
normalizes it: over its selection-stage logits, `Engine.score`), two blocks (BLOCKS) or two
summary chunks (prefilter) whose upper bounds tie at the cut. `judge` returns the
explanations it used; anything else raises Mismatch.
"""

from __future__ import annotations

import math

import torch

from native_cases import flat, ref_bound_reduce, ref_keys, ref_mass_keep, ref_reduce, ref_topk, ref_values


class Mismatch(AssertionError):
    """The engine's result is not the reference's, and no rounding explains it."""


def _tol_dot(qg: torch.Tensor, K: torch.Tensor, sm: float) -> torch.Tensor:
    """Per token: 4·sqrt(D)·2^-24·sm·max_g Σ_d |q_gd k_td|, a float32 D-term sum's rounding (any order)."""
    D = qg.shape[-1]
    return 4 * math.sqrt(D) * 2.0**-24 * sm * (qg.abs() @ K.abs().T).amax(0) + 1e-12


def _tol_rank(r: torch.Tensor, lse: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per token: the float32 rounding of the ranking value itself, 2^-23·(|r| + max|lse| for
    per_qhead): the engine ranks by float32 values (per_qhead: a logit less a log-sum-exp, each
    rounded), so two tokens a few ulp of r apart may trade places (seen at |r| 4.4: 1.4e-7 apart)."""
    shift = float(lse.abs().max()) if reduce == "per_qhead" and lse.numel() > 1 else 0.0
    return 2.0**-23 * (r.abs() + shift)


def request_kv(case: dict, b: int):
    """Float64 (keys, values) [H, n, D] of request b's host tokens."""
    n = int(case["ntok"][b])
    pages = case["table"][int(case["offs"][b]):int(case["offs"][b + 1])]
    return (flat(ref_keys(case["store"], case["layer"], pages), n),
            flat(ref_values(case["store"], case["layer"], pages), n))


class SetRef:
    """Float64 quantities of one selection set: query heads g0..g1 of request b, kv-head h (every
    head of the kv-head: they share one selection). A head's log-sum-exp, per_qhead's shift and
    MASS's normalizer, is over its selection-stage logits (`case["sel_logits"]`, the engine's
    `score`) when the case has them, else its exact ones; with the prefilter, over the
    candidates' exact logits (`select` sets `r` and `lse` to what ranked them)."""

    def __init__(self, case: dict, b: int, h: int, g0: int, g1: int, KV=None):
        """KV: the request's float64 (keys, values) [H, n, D], if already at hand."""
        store, layer, q = case["store"], case["layer"], case["q"]
        self.n = int(case["ntok"][b])
        pages = case["table"][int(case["offs"][b]):int(case["offs"][b + 1])]
        G = q.shape[1] // store.kv_heads
        self.D, self.S, self.sm, self.cap = q.shape[2], store.summary_tokens, case["sm"], case["cap"]
        K, V = KV if KV is not None else request_kv(case, b)
        self.K, self.V = K[h], V[h]
        self.qg = q[b, h * G + g0:h * G + g1].double()
        x = (self.qg @ self.K.T) * self.sm
        if self.cap > 0:
            x = self.cap * torch.tanh(x / self.cap)
        self.x = x  # [m, n] exact logits
        sel_logits = case.get("sel_logits")
        self.lse = torch.logsumexp(sel_logits[b, h * G + g0:h * G + g1, :self.n].double(), 1) \
            if sel_logits is not None else torch.logsumexp(x, 1)
        self.r = ref_reduce(x, self.lse, case["reduce"])
        self.tol_dot = _tol_dot(self.qg, self.K, self.sm)
        self.tol = self.tol_dot + _tol_rank(self.r, self.lse, case["reduce"])
        self.summ = store.summary[layer, h, pages.long()].double().reshape(-1, 2, self.D) if len(pages) else None
        self.reduce = case["reduce"]

    def attend(self, sel: list[int], residual: bool):
        """(out [m, D], lse [m]) of float64 attention over sel (plus the residual's pseudo-tokens)."""
        idx = torch.tensor(sel, dtype=torch.long)
        xs, vs = self.x[:, idx], self.V[idx]
        if residual:
            rx, rv = self.residual(idx)
            xs, vs = torch.cat([xs, rx], 1), torch.cat([vs, rv])
        if xs.shape[1] == 0:
            return torch.zeros(self.qg.shape[0], self.D, dtype=torch.float64), \
                torch.full((self.qg.shape[0],), -math.inf, dtype=torch.float64)
        return torch.softmax(xs, 1) @ vs, torch.logsumexp(xs, 1)

    def residual(self, sel: torch.Tensor):
        """native_cases.ref_residual, vectorized: per summary chunk with unselected tokens their mean key
        and value, and the logit of the mean key plus the log of their count."""
        nc = -(-self.n // self.S)
        out = torch.zeros(nc * self.S, dtype=torch.float64)
        out[: self.n] = 1.0
        out[sel] = 0.0

        def sums(X):
            Xp = torch.zeros(nc * self.S, self.D, dtype=torch.float64)
            Xp[: self.n] = X
            return (Xp * out[:, None]).view(nc, self.S, self.D).sum(1)

        cnt = out.view(nc, self.S).sum(1)
        keep = cnt > 0
        K, V, cnt = sums(self.K)[keep] / cnt[keep, None], sums(self.V)[keep] / cnt[keep, None], cnt[keep]
        x = (self.qg @ K.T) * self.sm
        if self.cap > 0:
            x = self.cap * torch.tanh(x / self.cap)
        return x + cnt.log(), V

    def chunk_bounds(self):
        """(ub [nc] reduced over the set like the engine's prefilter, tolerance)."""
        nc = -(-self.n // self.S)
        s = self.summ[:nc]
        ub = torch.maximum(self.qg[:, None] * s[None, :, 0], self.qg[:, None] * s[None, :, 1]).sum(-1)
        terms = torch.maximum((self.qg[:, None] * s[None, :, 0]).abs(), (self.qg[:, None] * s[None, :, 1]).abs())
        tol = 4 * math.sqrt(2 * self.D) * 2.0**-24 * terms.sum(-1).amax(0) + 1e-12
        return ref_bound_reduce(ub, self.reduce), tol

    def block_bounds(self, bt: int):
        """(ub [nb], tolerance) of BLOCKS: min/max over each block's summary chunks, sm-scaled, reduced."""
        S, nb, nc = self.S, -(-self.n // bt), -(-self.n // self.S)
        per = bt // S
        s = torch.empty(nb * per, 2, self.D, dtype=torch.float64)
        s[:, 0], s[:, 1] = math.inf, -math.inf  # chunks past the request take no part
        s[:nc] = self.summ[:nc]
        s = s.view(nb, per, 2, self.D)
        mn, mx = s[:, :, 0].amin(1), s[:, :, 1].amax(1)  # [nb, D]
        u = torch.maximum(self.qg[:, None] * mn, self.qg[:, None] * mx).sum(-1) * self.sm  # [m, nb]
        mag = (self.qg.abs()[:, None] * torch.maximum(mn.abs(), mx.abs())).sum(-1).amax(0)
        tol = 2 * self.D * 2.0**-24 * self.sm * mag + 1e-12
        return ref_bound_reduce(u, self.reduce), tol

    def select(self, case: dict, k: int, h: int) -> list[int]:
        """The reference selection, as native_cases.ref_attention makes it (the same torch calls, so
        ties break alike), from this set's logits and summaries."""
        n = self.n
        if case["mode"] == "all":
            return list(range(n))
        if case["mode"] == "blocks":
            bt = int(case["blocks"][h])
            ub, _ = self.block_bounds(bt)
            chosen = ref_topk(ub, min(ub.numel(), -(-k // bt)))
            return sorted(t for c in chosen.tolist() for t in range(c * bt, min((c + 1) * bt, n)))
        cand = torch.tensor(_prefilter_candidates(self, k, case["prefilter"], loose=False)) \
            if case["prefilter"] > 0 else torch.arange(n)
        if case["prefilter"] > 0:
            self.lse = torch.logsumexp(self.x[:, cand], 1)
            self.r = ref_reduce(self.x, self.lse, self.reduce)
            self.tol = self.tol_dot + _tol_rank(self.r, self.lse, self.reduce)
        r = self.r
        sel = cand[ref_topk(r[cand], min(k, len(cand)))]
        if case["mode"] == "mass":
            sel = ref_mass_keep(sel, r, torch.exp(self.x[:, sel] - self.lse[:, None]), case["tau"])
        return sorted(sel.tolist())

    def mass_held(self, sel) -> float:
        """The smallest share of a head's mass (as `lse` normalizes it) that sel holds."""
        return float(torch.exp(self.x[:, sorted(sel)] - self.lse[:, None]).sum(1).min())


def _token_tie(ref: SetRef, a: set, c: set) -> bool:
    """Equal sizes, and the tokens in one but not the other pair up, in logit order, with those of the
    other within rounding: a swap of tokens whose logits tie (duplicate keys, repeated pages) or
    nearly tie at the cut leaves a top-k a top-k."""
    if len(a) != len(c):
        return False
    x, y = sorted(a - c, key=lambda t: float(ref.r[t])), sorted(c - a, key=lambda t: float(ref.r[t]))
    return all(abs(float(ref.r[i] - ref.r[j])) <= float(ref.tol[i] + ref.tol[j]) for i, j in zip(x, y))


def _cut_tie(ub: torch.Tensor, tol: torch.Tensor, keep: int) -> float | None:
    """The value at the cut when the keep-th and (keep+1)-th largest of ub tie within rounding, else None."""
    if keep >= ub.numel() or keep <= 0:
        return None
    order = torch.argsort(ub, descending=True)
    i, j = order[keep - 1], order[keep]
    return float(ub[i]) if float(ub[i] - ub[j]) <= float(tol[i] + tol[j]) else None


def _explain(case: dict, ref: SetRef, got: list[int], want: list[int], k: int, h: int) -> str | None:
    a, c = set(got), set(want)
    mode, pf = case["mode"], case["prefilter"]
    if mode == "all":
        return None
    if _token_tie(ref, a, c):
        return "tie at the k-th logit"
    if mode == "mass" and a != c:
        small, big = (a, c) if len(a) < len(c) else (c, a)
        if small < big and abs(ref.mass_held(small) - case["tau"]) < 1e-3:
            return "the mass cut on the other side of tau"
        # tokens whose ranking values tie at the cut (duplicate keys, saturated soft caps) are taken in
        # either order, and their heads' masses differ: both are cuts if every differing token ranks at
        # the tail and each selection holds tau of every head (or is the whole top k)
        common = a & c
        floor = min(float(ref.r[t]) for t in common) if common else math.inf
        tail = all(float(ref.r[t]) <= floor + 2 * float(ref.tol.max()) for t in a ^ c)
        full = min(k, ref.n)
        if tail and all(ref.mass_held(x) >= case["tau"] - 1e-3 or len(x) == full for x in (a, c)):
            return "tokens tied at the mass cut"
    if mode == "blocks":
        bt = int(case["blocks"][h])
        ub, tol = ref.block_bounds(bt)
        keep = min(ub.numel(), -(-k // bt))
        cut = _cut_tie(ub, tol, keep)
        if cut is not None:
            ok_blocks = {int(i) for i in (ub >= cut - 2 * tol.max()).nonzero().flatten()}
            if {t // bt for t in a} <= ok_blocks and len({t // bt for t in a}) == keep:
                return "tie at the blocks' upper-bound cut"
    if pf > 0 and mode in ("topk", "mass"):
        loose = set(_prefilter_candidates(ref, k, pf, loose=True))
        sure = set(_prefilter_candidates(ref, k, pf, loose=False, sure=True))
        if loose != sure and a <= loose:
            # a token of a chunk surely kept but not selected must not be clearly above (beyond both
            # tokens' rounding) a token that was: ties, duplicate keys included, go either way
            worst = min(float(ref.r[t] + ref.tol[t]) for t in a) if a else math.inf
            left_out = [t for t in sure - a if float(ref.r[t] - ref.tol[t]) > worst]
            if not left_out or mode == "mass":
                return "tie at the prefilter's chunk cut"
    return None


def _prefilter_candidates(ref: SetRef, k: int, pf: float, *, loose: bool, sure: bool = False) -> list[int]:
    """The prefilter's candidate tokens: the reference's (ties broken by torch), or with loose every
    chunk within rounding of the cut, or with sure only the chunks clearly above it."""
    nc, want = -(-ref.n // ref.S), math.ceil(pf * min(k, ref.n) / ref.S)
    if want >= nc:
        return list(range(ref.n))
    ub, tol = ref.chunk_bounds()
    if loose or sure:
        order = torch.argsort(ub, descending=True)
        cut = float(ub[order[want - 1]])
        m = float(tol.max())
        chosen = (ub >= cut - 2 * m).nonzero().flatten() if loose else (ub > cut + 2 * m).nonzero().flatten()
    else:
        chosen = torch.sort(torch.topk(ub, want).indices).values
    return [t for c in chosen.tolist() for t in range(c * ref.S, min((c + 1) * ref.S, ref.n))]


def judge(case: dict, res) -> list[str]:
    """Check one run (EngineResult with selections) against the reference; returns the explanations
    used for selections that differ (empty when all equal)."""
    store, q = case["store"], case["q"]
    B, Hq, D = q.shape
    Hkv = store.kv_heads
    G = Hq // Hkv
    used = []
    for b in range(B):
        n = int(case["ntok"][b])
        KV = request_kv(case, b) if n else None
        for h in range(Hkv):
            sets = [(0, G)]  # a kv-head's query heads share one selection
            k = n if case["mode"] == "all" else min(int(case["budget"][b, h]), max(n, 1))
            for g0, g1 in sets:
                qh = h * G + g0
                cnt = int(res.n_selected[b, qh])
                got = res.sel_index[b, qh, :cnt].tolist()
                for g in range(g0 + 1, g1):
                    if int(res.n_selected[b, h * G + g]) != cnt or \
                            res.sel_index[b, h * G + g, :cnt].tolist() != got:
                        raise Mismatch(f"request {b} kv-head {h}: the heads of one set selected differently")
                if n == 0:
                    if cnt != 0 or not torch.isinf(res.lse[b, qh]) or res.out[b, qh].abs().max() != 0:
                        raise Mismatch(f"request {b}: an empty request must give out 0, lse -inf, no selection")
                    continue
                if got != sorted(set(got)) or (got and (got[0] < 0 or got[-1] >= n)):
                    raise Mismatch(f"request {b} head {qh}: selection not ascending, unique, in [0, {n}): {got[:8]}")
                ref = SetRef(case, b, h, g0, g1, KV)
                want = ref.select(case, k, h)
                if got != want:
                    why = _explain(case, ref, got, want, k, h)
                    if why is None:
                        diff = sorted(set(got) ^ set(want))[:6]
                        logits = [round(float(ref.r[t]), 6) for t in diff]
                        raise Mismatch(f"request {b} head {qh} ({case['mode']}, {case['reduce']}, k={k}, "
                                       f"n={n}): engine selected {len(got)}, reference {len(want)}; they differ "
                                       f"at {diff} (float64 selection logits {logits})")
                    used.append(why)
                out, lse = ref.attend(got, case["residual"])
                for g in range(g0, g1):
                    qh_g = h * G + g
                    eo, el = res.out[b, qh_g].double(), float(res.lse[b, qh_g])
                    wo, wl = out[g - g0], float(lse[g - g0])
                    if not torch.allclose(eo, wo, atol=2e-4, rtol=1e-4) or not math.isclose(el, wl, rel_tol=1e-4,
                                                                                             abs_tol=2e-4):
                        raise Mismatch(f"request {b} head {qh_g}: out/lse differ from float64 attention over the "
                                       f"engine's selection: |d out| {float((eo - wo).abs().max()):.3g}, lse {el} "
                                       f"vs {wl}")
    return used
