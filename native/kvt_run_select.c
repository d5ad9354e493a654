/* Selection. The one-item path: per (request, kv-head) every selection set is
 * selected and attended on one thread. The split path (few sets): per set the
 * candidate band of the selection-stage logits, found in parallel for long sets,
 * whose exact logits kvt_run_attend.c then computes in chunks across threads. */
#include <math.h>
#include <string.h>
#include "kvt_run_internal.h"

void kvtr_group_reduce(const kvt_plan_state *p, const float *x, int64_t xs, int m, int n, float *rr,
                       const float *shift) {
    if (p->reduce == KVT_PER_QHEAD) {
        const float s0 = shift[0];
        for (int t = 0; t < n; t++) rr[t] = x[t] - s0;
        for (int g = 1; g < m; g++) {
            const float *y = x + (int64_t)g * xs, sg = shift[g];
            for (int t = 0; t < n; t++) rr[t] = kvt_maxf(rr[t], y[t] - sg);
        }
        return;
    }
    for (int t = 0; t < n; t++) rr[t] = x[t];
    for (int g = 1; g < m; g++) {
        const float *y = x + (int64_t)g * xs;
        if (p->reduce == KVT_REDUCE_MEAN)
            for (int t = 0; t < n; t++) rr[t] += y[t];
        else
            for (int t = 0; t < n; t++) rr[t] = kvt_maxf(rr[t], y[t]);
    }
    if (p->reduce == KVT_REDUCE_MEAN)
        for (int t = 0; t < n; t++) rr[t] /= (float)m;
}

void kvtr_bound_reduce(const kvt_plan_state *p, const float *ub, int64_t us, int m, int n, float *red) {
    float shift[KVT_MAX_Q_HEADS];
    if (p->reduce == KVT_PER_QHEAD)
        for (int g = 0; g < m; g++) {
            float mx = -INFINITY;
            for (int c = 0; c < n; c++) mx = kvt_maxf(mx, ub[(int64_t)g * us + c]);
            shift[g] = mx;
        }
    kvtr_group_reduce(p, ub, us, m, n, red, shift);
}

/* natural log of sum exp over x[0..n) (n >= 1), in the ISA's sum_exp */
static float lse_of(const float *x, int n) {
    float mx = -INFINITY;
    for (int t = 0; t < n; t++) mx = kvt_maxf(mx, x[t]);
    return mx + (float)log(kvt_k->sum_exp(x, n, mx, INFINITY));
}

void kvtr_lse_rows(const kvt_plan_state *p, int64_t bh, const float *x, int64_t xs, int m, int n) {
    float *o = p->lse_sel + (bh / p->Hkv) * p->Hq + (bh % p->Hkv) * p->G;
    for (int g = 0; g < m; g++) o[g] = n > 0 ? lse_of(x + (int64_t)g * xs, n) : -INFINITY;
}

void kvtr_lse_items(const kvt_plan_state *p, int64_t bh) {
    const int G = p->G;
    float *o = p->lse_sel + (bh / p->Hkv) * p->Hq + (bh % p->Hkv) * G;
    for (int g = 0; g < G; g++) {
        float M = -INFINITY;
        for (int64_t i = p->item_off[bh]; i < p->item_off[bh + 1]; i++) M = kvt_maxf(M, p->item_lm[i * G + g]);
        double S = 0.0;
        for (int64_t i = p->item_off[bh]; i < p->item_off[bh + 1]; i++)
            if (p->item_lm[i * G + g] > -INFINITY) S += p->item_ls[i * G + g] * exp((double)p->item_lm[i * G + g] - M);
        o[g] = M > -INFINITY ? M + (float)log(S) : -INFINITY;
    }
}

/* per_qhead on the q16 path: kv item bh's reduced row (set_logits) from its heads' rows, once
 * its lse_sel is in */
static void qhead_row(const kvt_plan_state *p, int64_t bh) {
    const int n = p->ntok[bh / p->Hkv];
    const float *x = p->scores + p->score_off[bh];
    kvtr_group_reduce(p, x, n, p->G, n, (float *)set_logits(p, bh, n),
                      p->lse_sel + (bh / p->Hkv) * p->Hq + (bh % p->Hkv) * p->G);
}

int kvtr_mass_cut(const kvt_plan_state *p, int64_t bh, int m, const float *E, int64_t es, const float *re,
                  int32_t *pos, int count, float *P, float *pairs, double *acc) {
    const float *l = p->lse_sel + (bh / p->Hkv) * p->Hq + (bh % p->Hkv) * p->G;
    for (int g = 0; g < m; g++)
        for (int j = 0; j < count; j++) P[(int64_t)g * count + j] = expf(E[(int64_t)g * es + pos[j]] - l[g]);
    return kvt_mass_keep_heads(re, pos, count, P, count, m, p->tau, pairs, acc);
}

/* The exact logits of the candidates z.cand[0..cnt) (ascending) decide the top k by the
 * group's reduced logit; MASS then keeps the smallest part of it holding tau of every
 * query head's mass (each head's softmax over every host token, or over the candidates
 * when over_candidates: the prefilter's). */
void kvtr_decide_attend(run_ctx *r, int64_t bh, int g0, int m, int cnt, int over_candidates, set_scratch z,
                        int tid) {
    kvt_plan_state *p = r->p;
    const int b = (int)(bh / p->Hkv), h = (int)(bh % p->Hkv);
    const int D = p->store->d.head_dim;
    const int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * p->G;
    kvtr_exact_logits(p, r->layer, b, h, z.cand, cnt, r->q + (qh0 + g0) * D, m, z.E, cnt, tid);
    if (over_candidates && p->need_lse) kvtr_lse_rows(p, bh, z.E, cnt, m, cnt);
    float *ex = z.E;
    if (m > 1) { kvtr_group_reduce(p, z.E, cnt, m, cnt, z.re, p->lse_sel + qh0 + g0); ex = z.re; }
    int count = kvt_topk_indices(ex, cnt, p->budget[bh], z.tmp, z.pos);
    if (p->mode == KVT_SELECT_MASS)
        count = kvtr_mass_cut(p, bh, m, z.E, cnt, ex, z.pos, count, z.prob, z.pairs, (double *)z.acc);
    for (int j = 0; j < count; j++) z.sel[j] = z.cand[z.pos[j]];
    /* compact the exact logits of the selection in place (pos ascending, count <= cnt) */
    for (int g = 0; g < m; g++)
        for (int j = 0; j < count; j++) z.E[(int64_t)g * count + j] = z.E[(int64_t)g * cnt + z.pos[j]];
    kvtr_attend(r, b, h, g0, m, z.E, z.sel, count, z.prob, z.acc, (const void **)z.pairs, z.tmp, tid);
}

/* q16 path, one selection set (heads g0..g0+m of (b, h)): x holds the
 * selection-stage logits (reduced over the set when m > 1). Every token whose
 * logit lies within twice the error bound of the k-th largest is a candidate;
 * the exact logits of the candidates decide, so the selection is the one the
 * exact logits make. */
static void select_attend_q16(run_ctx *r, int64_t bh, int g0, int m, float *x, float *sc, int tid) {
    kvt_plan_state *p = r->p;
    const int b = (int)(bh / p->Hkv), n = p->ntok[b];
    const int64_t qh0 = (int64_t)b * p->Hq + (int64_t)(bh % p->Hkv) * p->G;
    set_scratch z = set_scratch_at(p, sc, n);
    const int k = p->budget[bh];
    int cnt = 0;
    if (k >= n) {
        for (int t = 0; t < n; t++) z.cand[t] = t;
        cnt = n;
    } else {
        float theta = kvt_kth_value(x, n, k, z.tmp);
        float cut = theta - 3.f * kvtr_q16_bound(p, bh, qh0 + g0, m, theta);
        for (int t = 0; t < n; t++)
            if (x[t] >= cut) z.cand[cnt++] = t;
    }
    kvtr_decide_attend(r, bh, g0, m, cnt, 0, z, tid);
}

/* The one-item path: kv item `item`'s selection set (all of its query heads) on this thread. */
void kvtr_attend_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int b = (int)(item / p->Hkv), h = (int)(item % p->Hkv), G = p->G, n = p->ntok[b];
    const int D = p->store->d.head_dim;
    int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * G;
    if (n == 0) {
        kvtr_write_empty(r, qh0, G);
        return;
    }
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    float *L = p->scores + p->score_off[item];
    if (p->prefilter > 0.0) {
        kvtr_select_attend_prefilter(r, item, 0, G, sc, tid);
        return;
    }
    if (r->q16) {
        if (p->need_lse) kvtr_lse_items(p, item);
        if (p->reduce == KVT_PER_QHEAD) qhead_row(p, item);
        select_attend_q16(r, item, 0, G, set_logits(p, item, n), sc, tid);
        return;
    }
    float *rr = sc, *tmp = rr + n, *pairs = tmp + n, *prob = pairs + 2 * (int64_t)n;
    int32_t *sel = (int32_t *)(prob + (int64_t)G * n);
    /* acc holds MASS's per-head sums as doubles: an even float offset from the (aligned) thread scratch */
    float *acc = (float *)(sel + n + (((int64_t)n * (5 + G)) & 1)), *mnmx = acc + (int64_t)G * D, *X = mnmx + 2 * D;
    const int k = p->mode == KVT_SELECT_ALL ? n : p->budget[item];
    int count;
    if (p->mode == KVT_SELECT_ALL) {
        for (int t = 0; t < n; t++) sel[t] = t;
        count = n;
    } else if (p->mode == KVT_SELECT_BLOCKS) {
        int bt = p->block[h];
        int nb = kvtr_block_scores(r, b, h, 0, G, bt, rr, mnmx, prob);
        int32_t *bsel = (int32_t *)pairs;
        int nsb = kvt_topk_indices(rr, nb, (k + bt - 1) / bt, tmp, bsel);
        count = 0;
        const float *qs = r->q + qh0 * D;
        for (int i = 0; i < nsb; i++) {
            int t0 = bsel[i] * bt, t1 = t0 + bt < n ? t0 + bt : n;
            kvtr_score_range(p, r->layer, b, h, t0, t1, qs, G, L, n);
            for (int t = t0; t < t1; t++) sel[count++] = t;
        }
    } else {
        const float *x = L;
        if (p->need_lse) kvtr_lse_rows(p, item, L, n, G, n);
        if (G > 1) { kvtr_group_reduce(p, L, n, G, n, rr, p->lse_sel + qh0); x = rr; }
        count = kvt_topk_indices(x, n, k, tmp, sel);
        if (p->mode == KVT_SELECT_MASS) count = kvtr_mass_cut(p, item, G, L, n, x, sel, count, prob, pairs, (double *)acc);
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < count; j++)
            X[(int64_t)g * count + j] = L[(int64_t)g * n + sel[j]];
    kvtr_attend(r, b, h, 0, G, X, sel, count, prob, acc, (const void **)pairs, tmp, tid);
}

/* ---- the candidate band of a long set, in parallel (q16 split path) ----
 * select_lo_task (per set): a lower bound lo of the k-th selection logit
 * (kvt_sampled_floor, as kvt_kth_value takes it), and how many token ranges to
 * collect; kvtr_select_collect_task (per set and range): the range's tokens at or
 * above lo, in order, into the range's share of the set's candidate buffer.
 * kvtr_select_task then takes the exact k-th logit among them and cuts the band from
 * them; when a share overflowed, fewer than k were found, or the band reaches below
 * lo, it scans every token as before. Either way the band is the same. */
#define KVT_LO_RANGE 2048 /* fewest tokens per collected range */

static void select_lo_task(void *c, int64_t s, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    st->nlo = 0;
    const int n = p->ntok[b];
    if (!kvt_sampled_floor(set_logits(p, bh, n), n, p->budget[bh], p->scratch + (int64_t)tid * p->scratch_floats,
                           &st->lo))
        return;
    const int nr = n / KVT_LO_RANGE; /* >= 2: the floor needs n >= 4096 */
    st->nlo = nr < p->split_want ? nr : p->split_want;
}

void kvtr_select_collect_task(void *c, int64_t item, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int64_t s = p->work[2 * item];
    const int ri = p->work[2 * item + 1];
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    const int n = p->ntok[b], share = p->set_cap[s] / st->nlo;
    const int t0 = (int)((int64_t)ri * n / st->nlo), t1 = (int)((int64_t)(ri + 1) * n / st->nlo);
    const float *x = set_logits(p, bh, n), lo = st->lo;
    int32_t *dst = set_buffers(p, s).cand + (int64_t)ri * share;
    int found = 0;
    for (int t = t0; t < t1; t++) {
        if (found == share) { found = -1; break; }
        dst[found] = t; /* branch-free: kept when at or above lo */
        found += x[t] >= lo;
    }
    st->nlo_found[ri] = found;
    if (r->fused_select && atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1)
        kvtr_select_task(r, s, tid); /* the set's last range: its band */
}

/* Fused select (q16 split path), once every logit of kv item bh is in: its heads' log-sum-exp
 * and per_qhead's reduced row where the plan needs them, then its set's sampled floor; a set
 * with ranges to collect is selected by the last of them (st->left counts them), any other at
 * once. */
void kvtr_kv_item_scored(run_ctx *r, int64_t bh, int tid) {
    kvt_plan_state *p = r->p;
    if (p->need_lse) kvtr_lse_items(p, bh);
    if (p->reduce == KVT_PER_QHEAD) qhead_row(p, bh);
    kvt_set_state *st = &p->sets[bh];
    select_lo_task(r, bh, tid);
    if (st->nlo == 0) kvtr_select_task(r, bh, tid);
    else atomic_store_explicit(&st->left, st->nlo, memory_order_relaxed);
}

/* The band from the tokens kvtr_select_collect_task found: their count, or -1 when the
 * scan of every token must decide (a share overflowed, fewer than k, band below lo). */
static int band_from_collected(kvt_plan_state *p, int64_t s, const float *x, int k, int64_t bh, int64_t qh0,
                               int m, float *sc, float *cut) {
    kvt_set_state *st = &p->sets[s];
    int32_t *cand = set_buffers(p, s).cand;
    const int share = p->set_cap[s] / st->nlo;
    int c = 0;
    for (int i = 0; i < st->nlo; i++) {
        const int f = st->nlo_found[i];
        if (f < 0) return -1;
        memmove(cand + c, cand + (int64_t)i * share, sizeof(int32_t) * (size_t)f); /* c <= i * share */
        c += f;
    }
    if (c < k) return -1;
    for (int i = 0; i < c; i++) sc[i] = x[cand[i]];
    const float theta = kvt_kth_largest(sc, c, k);
    *cut = theta - 3.f * kvtr_q16_bound(p, bh, qh0, m, theta);
    if (*cut < st->lo) return -1;
    int cnt = 0;
    for (int i = 0; i < c; i++) {
        cand[cnt] = cand[i];
        cnt += x[cand[i]] >= *cut;
    }
    return cnt;
}

void kvtr_select_task(void *c, int64_t s, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int m = p->G;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    st->nce = st->nca = 0;
    const int n = p->ntok[b], k = p->budget[bh];
    if (n == 0) {
        kvtr_write_empty(r, qh0, m);
        return;
    }
    float *x = set_logits(p, bh, n), *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    set_bufs sb = set_buffers(p, s);
    const int cap = p->set_cap[s];
    int cnt = 0;
    float cut = -INFINITY;
    if (p->prefilter > 0.0) { /* candidates from the chunk bounds; MASS over them (cut = -inf) */
        cnt = kvtr_prefilter_pick(p, bh, m, p->pf_ub + p->pf_off[s], sc, sc + n, (int32_t *)(sc + 2 * (int64_t)n),
                                  sb.cand);
    } else if (k >= n) {
        if (n <= cap) {
            for (int t = 0; t < n; t++) sb.cand[t] = t;
            cnt = n;
        } else {
            cnt = -1;
        }
    } else if (st->nlo > 0 && (cnt = band_from_collected(p, s, x, k, bh, qh0, m, sc, &cut)) >= 0) {
        /* the band, from the tokens collected in parallel */
    } else {
        cnt = 0;
        float theta = kvt_kth_value(x, n, k, sc);
        cut = theta - 3.f * kvtr_q16_bound(p, bh, qh0, m, theta);
        for (int t = 0; t < n; t++)
            if (x[t] >= cut) {
                if (cnt == cap) { cnt = -1; break; }
                sb.cand[cnt++] = t;
            }
    }
    if (cnt < 0) { /* the band does not fit: the whole set on this thread */
        select_attend_q16(r, bh, g0, m, x, sc, tid);
        return;
    }
    st->cnt = cnt;
    st->cut = cut;
    st->nce = split_chunks(p, cnt);
    atomic_store_explicit(&st->left, st->nce, memory_order_relaxed);
}
