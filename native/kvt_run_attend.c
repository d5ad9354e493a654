/* Exact logits of candidates, and the attend of a selection (softmax, sum p.V).
 * On the split path both run in chunks across threads: the last exact chunk of a
 * set picks its selection, the last attend chunk merges the partials by
 * log-sum-exp. */
#include <math.h>
#include <string.h>
#include "kvt_run_internal.h"

/* int8_channel: page runs shorter than this score row by row (kvt_score_row_chan) */
#define KVT_CHAN_RUN 4

/* n bytes (a multiple of 8) in 16- and 8-byte moves, inline */
static inline void copy_row(uint8_t *d, const uint8_t *src, int64_t n) {
    int64_t o = 0;
    for (; o + 16 <= n; o += 16) memcpy(d + o, src + o, 16);
    for (; o < n; o += 8) memcpy(d + o, src + o, 8);
}

/* Exact logits of the ascending tokens tok[0..cnt) (mostly scattered): E[g * es + j].
 * Their key rows and scales are gathered into the thread's buffer, KVT_GATHER at a
 * time, and scored by one kernel call each, so the kernels' token tiles apply wherever
 * the rows were; rows are prefetched 16 candidates ahead of the gather. */
void kvtr_exact_logits(const kvt_plan_state *p, int layer, int b, int h, const int32_t *tok,
                       int cnt, const float *q, int G, float *E, int64_t es, int tid) {
    const kvt_store *s = p->store;
    const tok_loc L = tok_locator(p, layer, b, h);
    const int64_t kb = s->key_tok, ns = s->kscale_tok;
    uint8_t *gk = (uint8_t *)(p->scratch + (int64_t)tid * p->scratch_floats + p->gather_off);
    float *gs = (float *)(gk + ((KVT_GATHER * kb + 3) & ~(int64_t)3));
    int pf = 0; /* candidates below pf are prefetched (key row and scales) */
    for (int j0 = 0; j0 < cnt;) {
        int len = cnt - j0 < KVT_GATHER ? cnt - j0 : KVT_GATHER, scattered = 0;
        if (s->chan_scales) { /* a call per page: its rows share the page's channel scales */
            const int64_t page = tok_lph(&L, tok[j0]);
            int same = 1;
            while (same < len && tok_lph(&L, tok[j0 + same]) == page) same++;
            len = same;
            /* a run of a few rows: each row dequantized and scored alone, not the queries scaled */
            scattered = len < KVT_CHAN_RUN;
        }
        for (int i = 0; i < len; i++) {
            for (; pf < j0 + i + 16 && pf < cnt; pf++) {
                const int64_t lph = tok_lph(&L, tok[pf]), o = tok_off(&L, tok[pf]);
                const char *a = (const char *)kvt_key_ptr(s, lph) + o * kb;
                for (int64_t x = 0; x < kb; x += 64) __builtin_prefetch(a + x);
                if (ns) __builtin_prefetch(kvt_kscale_ptr(s, lph) + o * ns);
                if (s->chan_scales) { /* the page's scales and zero points: 2 x D bf16 */
                    const char *c = (const char *)kvt_kchan_ptr(s, lph);
                    for (int64_t x = 0; x < 4 * (int64_t)s->d.head_dim; x += 64) __builtin_prefetch(c + x);
                }
            }
            const int t = tok[j0 + i];
            const int64_t lph = tok_lph(&L, t), o = tok_off(&L, t);
            if (scattered) {
                kvt_score_row_chan(s, kvt_key_ptr(s, lph) + o * kb, kvt_kchan_ptr(s, lph), q, G, E + j0 + i, es);
                continue;
            }
            copy_row(gk + i * kb, kvt_key_ptr(s, lph) + o * kb, kb);
            if (ns == 1) gs[i] = kvt_kscale_ptr(s, lph)[o];
            else if (ns) memcpy(gs + i * ns, kvt_kscale_ptr(s, lph) + o * ns, sizeof(float) * (size_t)ns);
        }
        if (!scattered) { /* the gathered rows, in one call */
            if (s->chan_scales)
                kvt_score_rows_chan(s, gk, kvt_kchan_ptr(s, tok_lph(&L, tok[j0])), len, q, G, E + j0, es);
            else
                kvt_score_rows(s, gk, ns ? gs : NULL, len, q, G, E + j0, es);
        }
        j0 += len;
    }
    for (int g = 0; g < G; g++) apply_scale(E + (int64_t)g * es, cnt, p->sm_scale, p->soft_cap);
}

/* softmax over the selection (X: [m, count] logits), then sum p * V */
void kvtr_attend(run_ctx *r, int b, int h, int g0, int m, const float *X, const int32_t *sel,
                 int count, float *prob, float *acc, const void **rows, float *vscale, int tid) {
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int D = s->d.head_dim;
    int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * p->G + g0;
    for (int g = 0; g < m; g++)
        r->lse[qh0 + g] = kvt_k->softmax(X + (int64_t)g * count, count, prob + (int64_t)g * count);
    memset(acc, 0, sizeof(float) * (size_t)m * D);
    const tok_loc L = tok_locator(p, r->layer, b, h);
    const int is_i8 = s->d.value_format == KVT_VAL_INT8;
    for (int j = 0; j < count; j++) {
        const int64_t lph = tok_lph(&L, sel[j]), o = tok_off(&L, sel[j]);
        rows[j] = kvt_val_ptr(s, lph) + o * s->val_tok;
        if (is_i8) vscale[j] = kvt_vscale_ptr(s, lph)[o];
    }
    kvt_k->accum_rows(rows, vscale, is_i8, count, D, prob, count, m, acc);
    for (int g = 0; g < m; g++) {
        memcpy(r->out + (qh0 + g) * D, acc + (int64_t)g * D, sizeof(float) * (size_t)D);
        if (r->nsel) r->nsel[qh0 + g] = count;
        if (r->sel_index && r->sel_cap > 0) {
            int32_t *o = r->sel_index + (qh0 + g) * r->sel_cap;
            int c = count < r->sel_cap ? count : r->sel_cap;
            memcpy(o, sel, sizeof(int32_t) * (size_t)c);
            for (int j = c; j < r->sel_cap; j++) o[j] = -1;
        }
    }
    if (p->residual) kvtr_mark_selection(p, b, h, g0, sel, count);
}

/* empty request: out = 0, lse = -inf for query heads qh0 .. qh0 + m */
void kvtr_write_empty(run_ctx *r, int64_t qh0, int m) {
    const int D = r->p->store->d.head_dim;
    for (int g = 0; g < m; g++) {
        memset(r->out + (qh0 + g) * D, 0, sizeof(float) * (size_t)D);
        r->lse[qh0 + g] = -INFINITY;
        if (r->nsel) r->nsel[qh0 + g] = 0;
        if (r->sel_index)
            for (int j = 0; j < r->sel_cap; j++) r->sel_index[(qh0 + g) * r->sel_cap + j] = -1;
    }
}

/* The last exact chunk of a set: the top k by the reduced logit, MASS's cut of every head's
 * mass. With the prefilter the heads' log-sum-exp comes from the candidates (and per_qhead's
 * reduce waits for it here); otherwise it came from the score phase. */
static void finalize_set(run_ctx *r, int64_t s, int tid) {
    kvt_plan_state *p = r->p;
    const int m = p->G;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    const int n = p->ntok[b];
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats, *pairs = sc + n, *P = sc + 3 * (int64_t)n;
    /* the doubles start at an even float offset from the (aligned) thread scratch */
    double *acc = (double *)(sc + ((3 * (int64_t)n + (int64_t)m * n + 1) & ~(int64_t)1));
    const int cnt = st->cnt;
    if (p->prefilter > 0.0 && p->need_lse) kvtr_lse_rows(p, bh, sb.E, cnt, m, cnt);
    if (p->prefilter > 0.0 && p->reduce == KVT_PER_QHEAD) kvtr_group_reduce(p, sb.E, cnt, m, cnt, sb.re, p->lse_sel + qh0);
    int count = kvt_topk_indices(sb.re, cnt, p->budget[bh], sc, sb.pos);
    if (p->mode == KVT_SELECT_MASS) count = kvtr_mass_cut(p, bh, m, sb.E, cnt, sb.re, sb.pos, count, P, pairs, acc);
    for (int j = 0; j < count; j++) sb.sel[j] = sb.cand[sb.pos[j]];
    /* compact the exact logits of the selection in place (pos ascending, count <= cnt) */
    for (int g = 0; g < m; g++)
        for (int j = 0; j < count; j++) sb.E[(int64_t)g * count + j] = sb.E[(int64_t)g * cnt + sb.pos[j]];
    st->count = count;
    st->nca = split_chunks(p, count);
    atomic_store_explicit(&st->left, st->nca, memory_order_relaxed);
}

void kvtr_exact_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int64_t s = p->work[2 * item];
    const int ci = p->work[2 * item + 1], m = p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    const int cnt = st->cnt;
    const int c0 = (int)((int64_t)ci * cnt / st->nce), c1 = (int)((int64_t)(ci + 1) * cnt / st->nce);
    const int len = c1 - c0;
    kvtr_exact_logits(p, r->layer, b, h, sb.cand + c0, len, r->q + qh0 * D, m, sb.E + c0, cnt, tid);
    if (m == 1) memcpy(sb.re + c0, sb.E + c0, sizeof(float) * (size_t)len);
    else if (!(p->prefilter > 0.0 && p->reduce == KVT_PER_QHEAD)) /* that one waits for the candidates' lse */
        kvtr_group_reduce(p, sb.E + c0, cnt, m, len, sb.re + c0, p->lse_sel + qh0);
    if (atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1) finalize_set(r, s, tid);
}

void kvtr_merge_parts(const float *part, int nparts, int m, int D, float *out, float *lse) {
    for (int g = 0; g < m; g++) {
        float L = -INFINITY, w[KVT_SPLIT_MAX];
        for (int i = 0; i < nparts; i++) L = kvt_maxf(L, part[((int64_t)i * m + g) * (D + 1) + D]);
        float *o = out + (int64_t)g * D;
        for (int d = 0; d < D; d++) o[d] = 0.f;
        if (L == -INFINITY) { /* every part empty */
            lse[g] = -INFINITY;
            continue;
        }
        double S = 0.0;
        for (int i = 0; i < nparts; i++) {
            w[i] = expf(part[((int64_t)i * m + g) * (D + 1) + D] - L); /* an empty part weighs 0 */
            S += w[i];
        }
        const float inv = (float)(1.0 / S);
        for (int i = 0; i < nparts; i++) {
            if (w[i] == 0.f) continue; /* its sums are not read: an empty part's are not written */
            const float *a = part + ((int64_t)i * m + g) * (D + 1), wi = w[i] * inv;
            for (int d = 0; d < D; d++) o[d] += wi * a[d];
        }
        lse[g] = L + (float)log(S);
    }
}

static void merge_set(run_ctx *r, int64_t s, int tid) {
    kvt_plan_state *p = r->p;
    const int m = p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    const kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    kvtr_merge_parts(p->part + s * KVT_SPLIT_MAX * m * (D + 1), st->nca, m, D, r->out + qh0 * D, r->lse + qh0);
    for (int g = 0; g < m; g++) {
        if (r->nsel) r->nsel[qh0 + g] = st->count;
        if (r->sel_index && r->sel_cap > 0) {
            int32_t *os = r->sel_index + (qh0 + g) * r->sel_cap;
            int cc = st->count < r->sel_cap ? st->count : r->sel_cap;
            memcpy(os, sb.sel, sizeof(int32_t) * (size_t)cc);
            for (int j = cc; j < r->sel_cap; j++) os[j] = -1;
        }
    }
    if (p->residual) kvtr_mark_selection(p, b, h, g0, sb.sel, st->count);
}

void kvtr_attend_part(const kvt_plan_state *p, int layer, int b, int h, int m, const float *X, int64_t xs,
                      const int32_t *sel, int len, float *prob, float *acc, const void **rows, float *vscale,
                      float *part) {
    const kvt_store *st_ = p->store;
    const int D = st_->d.head_dim;
    for (int g = 0; g < m; g++)
        part[(int64_t)g * (D + 1) + D] = kvt_k->softmax(X + (int64_t)g * xs, len, prob + (int64_t)g * len);
    const tok_loc L = tok_locator(p, layer, b, h);
    const int is_i8 = st_->d.value_format == KVT_VAL_INT8;
    for (int j = 0; j < len; j++) {
        const int64_t lph = tok_lph(&L, sel[j]), o = tok_off(&L, sel[j]);
        rows[j] = kvt_val_ptr(st_, lph) + o * st_->val_tok;
        if (is_i8) vscale[j] = kvt_vscale_ptr(st_, lph)[o];
    }
    memset(acc, 0, sizeof(float) * (size_t)m * D);
    kvt_k->accum_rows(rows, vscale, is_i8, len, D, prob, len, m, acc);
    for (int g = 0; g < m; g++) memcpy(part + (int64_t)g * (D + 1), acc + (int64_t)g * D, sizeof(float) * (size_t)D);
}

void kvtr_attend_chunk_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const kvt_store *st_ = p->store;
    const int64_t s = p->work[2 * item];
    const int ci = p->work[2 * item + 1], m = p->G, D = st_->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    const int count = st->count, n = p->ntok[b];
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    float *prob = sc, *vscale = prob + (int64_t)m * n, *acc = vscale + n;
    const void **rows = (const void **)(acc + (((int64_t)m * D + 17) & ~(int64_t)1) + (((int64_t)(m + 1) * n) & 1));
    if (st->nca == 1) { /* one chunk: the one-item attend, bit for bit */
        kvtr_attend(r, b, h, g0, m, sb.E, sb.sel, count, prob, acc, rows, vscale, tid);
        return;
    }
    const int j0 = (int)((int64_t)ci * count / st->nca), j1 = (int)((int64_t)(ci + 1) * count / st->nca);
    kvtr_attend_part(p, r->layer, b, h, m, sb.E + j0, count, sb.sel + j0, j1 - j0, prob, acc, rows, vscale,
                     p->part + ((s * KVT_SPLIT_MAX + ci) * m) * (D + 1));
    if (atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1) merge_set(r, s, tid);
}
