/* kvt_run and the single ops: score every host token (parallel over
 * (request, kv-head, token chunk)), then select and attend (parallel over
 * (request, kv-head)). The logits used to select are the logits attended. */
#include <math.h>
#include <string.h>
#include "kvt_engine_internal.h"

typedef struct {
    kvt_plan_state *p;
    int layer;
    const float *q;
    float *out, *lse;
    int32_t *nsel, *sel_index;
    int32_t sel_cap;
} run_ctx;

static int32_t check_ready(kvt_engine *e, int32_t layer, const char *fn) {
    kvt_plan_state *p = &e->plan;
    if (!p->valid) return kvt_err(KVT_ERR_STATE, "%s: expected a plan (call kvt_plan first)", fn);
    kvt_store *s = kvt_store_get(p->store_h);
    if (!s || s != p->store || s->serial != p->serial)
        return kvt_err(KVT_ERR_STATE, "%s: the planned store (handle %d) was closed", fn, p->store_h);
    if (layer < 0 || layer >= s->d.n_layers)
        return kvt_err(KVT_ERR_RANGE, "%s: expected layer in [0, %d), got %d", fn, s->d.n_layers, layer);
    return KVT_OK;
}

/* Logits of tokens [t0, t1) of request b for query heads q[0..G) of kv-head h,
 * written to dst[g * n + t]. */
static void score_range(const kvt_plan_state *p, int layer, int b, int h, int t0, int t1,
                        const float *q, int G, float *dst, int n) {
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens;
    for (int t = t0; t < t1;) {
        int off = t % T, cnt = T - off < t1 - t ? T - off : t1 - t;
        int64_t lph = kvt_lph(s, layer, p->page_table[p->page_off[b] + t / T], h);
        kvt_score_page(s, lph, off, cnt, q, G, dst + t, n);
        t += cnt;
    }
    const float sm = p->sm_scale, cap = p->soft_cap;
    for (int g = 0; g < G; g++) {
        float *x = dst + (int64_t)g * n;
        if (cap > 0.f)
            for (int t = t0; t < t1; t++) x[t] = cap * tanhf(x[t] * sm / cap);
        else
            for (int t = t0; t < t1; t++) x[t] *= sm;
    }
}

static void score_task(void *c, int64_t item, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int32_t *w = p->items + 4 * item;
    int b = w[0], h = w[1], D = p->store->d.head_dim;
    score_range(p, r->layer, b, h, w[2], w[3], r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G) * D,
                p->G, p->scores + p->score_off[b * p->Hkv + h], p->ntok[b]);
}

/* softmax over sel of logits L[g][.] for g in [g0, g0+m), then sum p * V */
static void attend(run_ctx *r, int b, int h, int g0, int m, const float *L, int n,
                   const int32_t *sel, int count, float *prob, float *acc, const void **rows,
                   float *vscale) {
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens, D = s->d.head_dim;
    int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * p->G + g0;
    for (int g = 0; g < m; g++) {
        const float *x = L + (int64_t)(g0 + g) * n;
        float *pr = prob + (int64_t)g * count, mx = -INFINITY;
        for (int j = 0; j < count; j++) mx = kvt_maxf(mx, x[sel[j]]);
        float sum = 0.f;
        for (int j = 0; j < count; j++) { pr[j] = expf(x[sel[j]] - mx); sum += pr[j]; }
        float inv = 1.f / sum;
        for (int j = 0; j < count; j++) pr[j] *= inv;
        r->lse[qh0 + g] = mx + logf(sum);
    }
    memset(acc, 0, sizeof(float) * (size_t)m * D);
    const int32_t *pages = p->page_table + p->page_off[b];
    const int is_i8 = s->d.value_format == KVT_VAL_INT8;
    for (int j = 0; j < count; j++) {
        int tok = sel[j];
        int64_t lph = kvt_lph(s, r->layer, pages[tok / T], h);
        rows[j] = kvt_val_ptr(s, lph) + (int64_t)(tok % T) * s->val_tok;
        if (is_i8) vscale[j] = kvt_vscale_ptr(s, lph)[tok % T];
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
}

/* Block upper bounds from the min/max summaries: q.k <= sum_d max(q_d mn_d, q_d mx_d). */
static int block_scores(run_ctx *r, int b, int h, int g0, int m, int bt, float *rb, float *mnmx) {
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens, S = s->d.summary_tokens, D = s->d.head_dim, n = p->ntok[b];
    const int32_t *pages = p->page_table + p->page_off[b];
    const float *q = r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G + g0) * D;
    int nb = (n + bt - 1) / bt;
    for (int bi = 0; bi < nb; bi++) {
        float *mn = mnmx, *mx = mnmx + D;
        int first = 1;
        for (int t = bi * bt; t < (bi + 1) * bt && t < n; t += S) {
            const float *c = kvt_summary_ptr(s, kvt_lph(s, r->layer, pages[t / T], h)) +
                             (int64_t)((t % T) / S) * 2 * D;
            for (int d = 0; d < D; d++) {
                mn[d] = first ? c[d] : kvt_minf(mn[d], c[d]);
                mx[d] = first ? c[D + d] : kvt_maxf(mx[d], c[D + d]);
            }
            first = 0;
        }
        float red = p->reduce == KVT_REDUCE_MEAN ? 0.f : -INFINITY;
        for (int g = 0; g < m; g++) {
            const float *qg = q + (int64_t)g * D;
            float ub = 0.f;
            for (int d = 0; d < D; d++) ub += kvt_maxf(qg[d] * mn[d], qg[d] * mx[d]);
            ub *= p->sm_scale;
            red = p->reduce == KVT_REDUCE_MEAN ? red + ub / (float)m : kvt_maxf(red, ub);
        }
        rb[bi] = red;
    }
    return nb;
}

static void attend_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int b = (int)(item / p->Hkv), h = (int)(item % p->Hkv), G = p->G, n = p->ntok[b];
    const int D = p->store->d.head_dim;
    int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * G;
    if (n == 0) {
        for (int g = 0; g < G; g++) {
            memset(r->out + (qh0 + g) * D, 0, sizeof(float) * (size_t)D);
            r->lse[qh0 + g] = -INFINITY;
            if (r->nsel) r->nsel[qh0 + g] = 0;
            if (r->sel_index)
                for (int j = 0; j < r->sel_cap; j++) r->sel_index[(qh0 + g) * r->sel_cap + j] = -1;
        }
        return;
    }
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    float *rr = sc, *tmp = rr + n, *pairs = tmp + n, *prob = pairs + 2 * (int64_t)n;
    int32_t *sel = (int32_t *)(prob + (int64_t)G * n);
    float *acc = (float *)(sel + n), *mnmx = acc + (int64_t)G * D;
    float *L = p->scores + p->score_off[item];
    const int per_q = p->reduce == KVT_PER_QHEAD, m = per_q ? 1 : G;
    const int k = p->mode == KVT_SELECT_ALL ? n : p->budget[item];
    for (int g0 = 0; g0 < G; g0 += m) {
        int count;
        if (p->mode == KVT_SELECT_ALL) {
            for (int t = 0; t < n; t++) sel[t] = t;
            count = n;
        } else if (p->mode == KVT_SELECT_BLOCKS) {
            int bt = p->block[h];
            int nb = block_scores(r, b, h, g0, m, bt, rr, mnmx);
            int32_t *bsel = (int32_t *)pairs;
            int nsb = kvt_topk_indices(rr, nb, (k + bt - 1) / bt, tmp, bsel);
            count = 0;
            const float *qs = r->q + (qh0 + g0) * D;
            for (int i = 0; i < nsb; i++) {
                int t0 = bsel[i] * bt, t1 = t0 + bt < n ? t0 + bt : n;
                score_range(p, r->layer, b, h, t0, t1, qs, m, L + (int64_t)g0 * n, n);
                for (int t = t0; t < t1; t++) sel[count++] = t;
            }
        } else {
            const float *x = L + (int64_t)g0 * n;
            if (m > 1) {
                for (int t = 0; t < n; t++) rr[t] = x[t];
                for (int g = 1; g < m; g++) {
                    const float *y = x + (int64_t)g * n;
                    if (p->reduce == KVT_REDUCE_MEAN)
                        for (int t = 0; t < n; t++) rr[t] += y[t];
                    else
                        for (int t = 0; t < n; t++) rr[t] = kvt_maxf(rr[t], y[t]);
                }
                if (p->reduce == KVT_REDUCE_MEAN)
                    for (int t = 0; t < n; t++) rr[t] /= (float)m;
                x = rr;
            }
            count = kvt_topk_indices(x, n, k, tmp, sel);
            if (p->mode == KVT_SELECT_MASS) count = kvt_mass_cut(x, n, sel, count, p->tau, pairs);
        }
        attend(r, b, h, g0, m, L, n, sel, count, prob, acc, (const void **)pairs, tmp);
    }
}

int32_t kvt_run(int32_t eh, int32_t layer, const float *q, float *out, float *lse,
                int32_t *n_selected, int32_t *sel_index, int32_t sel_cap) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    if (!q || !out || !lse) return kvt_err(KVT_ERR_VALUE, "kvt_run: expected q, out and lse buffers, got NULL");
    if (sel_index && sel_cap <= 0)
        return kvt_err(KVT_ERR_VALUE, "kvt_run: expected sel_cap > 0 with sel_index, got %d", sel_cap);
    pthread_mutex_lock(&e->mu);
    int32_t rc = check_ready(e, layer, "kvt_run");
    if (rc == KVT_OK) {
        run_ctx r = {&e->plan, layer, q, out, lse, n_selected, sel_index, sel_index ? sel_cap : 0};
        if (e->plan.mode != KVT_SELECT_BLOCKS) kvt_pool_run(e->pool, e->plan.n_items, score_task, &r);
        kvt_pool_run(e->pool, (int64_t)e->plan.B * e->plan.Hkv, attend_task, &r);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int32_t kvt_score(int32_t eh, int32_t layer, const float *q, float *scores, int32_t n_max) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    if (!q || !scores) return kvt_err(KVT_ERR_VALUE, "kvt_score: expected q and scores buffers, got NULL");
    pthread_mutex_lock(&e->mu);
    int32_t rc = check_ready(e, layer, "kvt_score");
    kvt_plan_state *p = &e->plan;
    if (rc == KVT_OK && n_max < p->n_max)
        rc = kvt_err(KVT_ERR_VALUE, "kvt_score: expected n_max >= %d (longest planned request), got %d",
                     p->n_max, n_max);
    if (rc == KVT_OK) {
        run_ctx r = {p, layer, q, NULL, NULL, NULL, NULL, 0};
        kvt_pool_run(e->pool, p->n_items, score_task, &r);
        for (int b = 0; b < p->B; b++)
            for (int h = 0; h < p->Hkv; h++)
                for (int g = 0; g < p->G; g++) {
                    int n = p->ntok[b];
                    float *o = scores + ((int64_t)b * p->Hq + (int64_t)h * p->G + g) * n_max;
                    memcpy(o, p->scores + p->score_off[b * p->Hkv + h] + (int64_t)g * n,
                           sizeof(float) * (size_t)n);
                    for (int t = n; t < n_max; t++) o[t] = -INFINITY;
                }
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

typedef struct {
    kvt_plan_state *p;
    int layer, m;
    const int32_t *idx;
    const float *pr;
    float *out;
} wv_ctx;

static void wv_task(void *c, int64_t item, int tid) {
    (void)tid;
    wv_ctx *w = c;
    kvt_plan_state *p = w->p;
    const kvt_store *s = p->store;
    const int b = (int)(item / p->Hq), h = (int)(item % p->Hq) / p->G, T = s->d.page_tokens;
    const int D = s->d.head_dim;
    float *o = w->out + item * D;
    memset(o, 0, sizeof(float) * (size_t)D);
    const int32_t *ix = w->idx + item * w->m, *pages = p->page_table + p->page_off[b];
    const float *pr = w->pr + item * w->m;
    for (int j = 0; j < w->m; j++)
        if (ix[j] >= 0)
            kvt_accum_token(s, kvt_lph(s, w->layer, pages[ix[j] / T], h), ix[j] % T, pr + j, 0, 1, o);
}

int32_t kvt_weighted_values(int32_t eh, int32_t sh, int32_t layer, const int32_t *idx,
                            const float *pr, int32_t m, float *out) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    if (m < 0 || !out || (m > 0 && (!idx || !pr)))
        return kvt_err(KVT_ERR_VALUE, "kvt_weighted_values: expected m >= 0 and idx, p, out buffers, got m=%d", m);
    pthread_mutex_lock(&e->mu);
    int32_t rc = check_ready(e, layer, "kvt_weighted_values");
    kvt_plan_state *p = &e->plan;
    if (rc == KVT_OK && sh != p->store_h)
        rc = kvt_err(KVT_ERR_VALUE, "kvt_weighted_values: expected the planned store (handle %d), got %d",
                     p->store_h, sh);
    for (int64_t i = 0; rc == KVT_OK && i < (int64_t)p->B * p->Hq * m; i++) {
        int b = (int)(i / ((int64_t)p->Hq * m));
        if (idx[i] < -1 || idx[i] >= p->ntok[b])
            rc = kvt_err(KVT_ERR_RANGE, "kvt_weighted_values: request %d: expected token index in [-1, %d), got %d",
                         b, p->ntok[b], idx[i]);
    }
    if (rc == KVT_OK) {
        wv_ctx w = {p, layer, m, idx, pr, out};
        kvt_pool_run(e->pool, (int64_t)p->B * p->Hq, wv_task, &w);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}
