/* kvt_run and the single ops: score every host token (parallel over
 * (request, kv-head, token chunk)), then select and attend (parallel over
 * (request, kv-head)). The logits used to select are the logits attended.
 * This file sequences the phases; their tasks are in kvt_run_score.c,
 * kvt_run_bounds.c, kvt_run_select.c, kvt_run_attend.c and kvt_run_residual.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kvt_run_internal.h"

/* Under e->mu: a plan whose store is still open (held in *held until the caller's
 * kvt_store_release), the caller's batch shape equal to the plan's, and a layer of the
 * store. The buffers a call is handed were sized by its caller from a plan: when
 * another thread planned again in between, the shapes differ and the call is refused
 * before anything is written. */
static int32_t begin(kvt_engine *e, int32_t layer, int32_t B, int32_t Hq, int32_t D, const char *fn,
                     kvt_store **held) {
    kvt_plan_state *p = &e->plan;
    *held = NULL;
    if (!p->valid) return kvt_err(KVT_ERR_STATE, "%s: expected a plan (call kvt_plan first)", fn);
    kvt_store *s = kvt_store_acquire(p->store_h);
    if (s && (s != p->store || s->serial != p->serial)) {
        kvt_store_release(s);
        s = NULL;
    }
    if (!s) return kvt_err(KVT_ERR_STATE, "%s: the planned store (handle %d) was closed", fn, p->store_h);
    *held = s;
    if (B != p->B || Hq != p->Hq || D != p->D)
        return kvt_err(KVT_ERR_STATE, "%s: the buffers are for batch %d x %d query heads x head_dim %d, the "
                       "engine's plan is for %d x %d x %d: it was planned again after they were sized", fn, B, Hq,
                       D, p->B, p->Hq, p->D);
    if (layer < 0 || layer >= s->d.n_layers)
        return kvt_err(KVT_ERR_RANGE, "%s: expected layer in [0, %d), got %d", fn, s->d.n_layers, layer);
    return KVT_OK;
}

/* KVT_ERR_VALUE naming the first NaN or infinity of x [B, Hq, D]: one bad query head
 * would otherwise decide its whole group's selection (the group max of a NaN). */
static int32_t check_finite(const char *fn, const char *what, const float *x, int B, int Hq, int D) {
    const int64_t i = kvt_first_nonfinite_f32(x, (int64_t)B * Hq * D);
    if (i < 0) return KVT_OK;
    return kvt_err(KVT_ERR_VALUE, "%s: expected finite %s values, got %g at [%lld, %lld, %lld] (request %lld, "
                   "query head %lld)", fn, what, (double)x[i], (long long)(i / D / Hq), (long long)(i / D % Hq),
                   (long long)(i % D), (long long)(i / D / Hq), (long long)(i / D % Hq));
}

enum { ITEMS_COLLECT, ITEMS_EXACT, ITEMS_ATTEND };

/* (set, part) work items of a phase: the band's token ranges (kvtr_select_collect_task),
 * the candidate chunks (kvtr_exact_task) or the selection's chunks (kvtr_attend_chunk_task) */
static int64_t split_items(kvt_plan_state *p, int phase_items) {
    int64_t w = 0;
    for (int64_t s = 0; s < p->n_sets; s++) {
        const kvt_set_state *st = &p->sets[s];
        int nc = phase_items == ITEMS_COLLECT ? st->nlo : phase_items == ITEMS_EXACT ? st->nce : st->nca;
        for (int i = 0; i < nc; i++) {
            p->work[2 * w] = (int32_t)s;
            p->work[2 * w + 1] = i;
            w++;
        }
    }
    return w;
}

/* The int16-query path applies to int8 keys with per-token scales, and int4 keys whose groups are whole
 * 4-channel lanes, on an ISA that has the kernel; the modes that attend to every
 * token or score blocks use exact logits only. */
static int use_q16(const kvt_plan_state *p, int for_run) {
    const kvt_store_desc *d = &p->store->d;
    int ok = d->key_format == KVT_KEY_INT8 ? kvt_k->score_i8_q16 != NULL
           : d->key_format == KVT_KEY_INT4 ? kvt_k->score_i4_q16 && kvt_i4_q16_ok(d->head_dim, d->key_group)
           : 0;
    if (!ok) return 0;
    return !for_run || ((p->mode == KVT_SELECT_TOPK || p->mode == KVT_SELECT_MASS) && p->prefilter == 0.0);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One phase of kvt_run: a pool run, its wall time added to the engine's counters while tracing. */
static void phase(kvt_engine *e, int which, int64_t n_items, kvt_task_fn fn, run_ctx *r) {
    const int64_t t0 = e->trace ? now_ns() : 0;
    kvt_pool_run(e->pool, n_items, fn, r);
    if (e->trace) e->phase_ns[which] += now_ns() - t0;
}

int32_t kvt_run_held(kvt_engine *e, int32_t layer, int32_t B, int32_t Hq, int32_t D, const float *q, float *out,
                     float *lse, int32_t *n_selected, int32_t *sel_index, int32_t sel_cap) {
    if (!q || !out || !lse) return kvt_err(KVT_ERR_VALUE, "kvt_run: expected q, out and lse buffers, got NULL");
    if (sel_index && sel_cap <= 0)
        return kvt_err(KVT_ERR_VALUE, "kvt_run: expected sel_cap > 0 with sel_index, got %d", sel_cap);
    const int64_t t_call = now_ns();
    pthread_mutex_lock(&e->mu);
    kvt_store *held;
    int32_t rc = begin(e, layer, B, Hq, D, "kvt_run", &held);
    if (rc == KVT_OK) rc = check_finite("kvt_run", "query", q, B, Hq, D);
    if (rc == KVT_OK) {
        kvt_plan_state *p = &e->plan;
        run_ctx r = {p, layer, q, out, lse, n_selected, sel_index, sel_index ? sel_cap : 0,
                     use_q16(p, 1), p->reduce != KVT_PER_QHEAD && p->G > 1, NULL, 0, 0};
        if (r.q16) {
            const int64_t t0 = e->trace ? now_ns() : 0;
            kvtr_prepare_q16(p, q);
            r.fused_select = p->split;
            if (r.fused_select)
                for (int64_t bh = 0; bh < (int64_t)p->B * p->Hkv; bh++)
                    atomic_store_explicit(&p->bh_left[bh], (int)(p->item_off[bh + 1] - p->item_off[bh]),
                                          memory_order_relaxed);
            if (e->trace) e->phase_ns[KVT_PHASE_QUERY] += now_ns() - t0;
            phase(e, KVT_PHASE_SCORE, p->n_items, kvtr_score_task_q16, &r);
        } else if (p->mode != KVT_SELECT_BLOCKS && p->prefilter == 0.0) {
            phase(e, KVT_PHASE_SCORE, p->n_items, kvtr_score_task, &r);
        }
        if (p->prefilter > 0.0 && p->split) {
            phase(e, KVT_PHASE_BOUND, p->n_pf_items, kvtr_bound_task, &r);
            phase(e, KVT_PHASE_SELECT, p->n_sets, kvtr_select_task, &r);
            phase(e, KVT_PHASE_EXACT, split_items(p, ITEMS_EXACT), kvtr_exact_task, &r);
            phase(e, KVT_PHASE_ATTEND, split_items(p, ITEMS_ATTEND), kvtr_attend_chunk_task, &r);
        } else if (r.q16 && p->split) {
            /* the score phase took each set's floor (and the band of sets without ranges to
             * collect); a request without host tokens had no score items: its sets here */
            for (int64_t bh = 0; bh < (int64_t)p->B * p->Hkv; bh++)
                if (p->item_off[bh + 1] == p->item_off[bh]) kvtr_kv_item_scored(&r, bh, 0);
            phase(e, KVT_PHASE_SELECT, split_items(p, ITEMS_COLLECT), kvtr_select_collect_task, &r);
            phase(e, KVT_PHASE_EXACT, split_items(p, ITEMS_EXACT), kvtr_exact_task, &r);
            phase(e, KVT_PHASE_ATTEND, split_items(p, ITEMS_ATTEND), kvtr_attend_chunk_task, &r);
        } else {
            phase(e, KVT_PHASE_ATTEND, (int64_t)p->B * p->Hkv, kvtr_attend_task, &r);
        }
        if (p->residual) {
            phase(e, KVT_PHASE_RESIDUAL, p->n_res_items, kvtr_residual_task, &r);
            phase(e, KVT_PHASE_RESIDUAL_MERGE, p->n_sets, kvtr_residual_merge_task, &r);
        }
    }
    if (e->trace && rc == KVT_OK) {
        e->phase_ns[KVT_PHASE_CALL] += now_ns() - t_call;
        e->traced_runs++;
    }
    pthread_mutex_unlock(&e->mu);
    if (held) kvt_store_release(held);
    return rc;
}

int32_t kvt_run(int32_t eh, int32_t layer, int32_t batch, int32_t num_q_heads, int32_t head_dim, const float *q,
                float *out, float *lse, int32_t *n_selected, int32_t *sel_index, int32_t sel_cap) {
    kvt_engine *e = kvt_engine_acquire(eh, 1);
    if (!e) return KVT_ERR_HANDLE;
    kvt_isa_hold();
    const int32_t rc = kvt_run_held(e, layer, batch, num_q_heads, head_dim, q, out, lse, n_selected, sel_index,
                                    sel_cap);
    kvt_isa_drop();
    kvt_engine_release(e, 1);
    return rc;
}

int32_t kvt_engine_trace(int32_t eh, int32_t on) {
    kvt_engine *e = kvt_engine_acquire(eh, 0);
    if (!e) return KVT_ERR_HANDLE;
    pthread_mutex_lock(&e->mu);
    if (on) {
        memset(e->phase_ns, 0, sizeof e->phase_ns);
        e->traced_runs = 0;
    }
    e->trace = on != 0;
    pthread_mutex_unlock(&e->mu);
    kvt_engine_release(e, 0);
    return KVT_OK;
}

int32_t kvt_engine_phase_times(int32_t eh, int64_t *ns, int32_t n, int64_t *runs) {
    if (!ns || !runs || n < 0 || n > KVT_N_PHASES)
        return kvt_err(KVT_ERR_VALUE, "kvt_engine_phase_times: expected ns, runs and n in [0, %d], got n=%d",
                       KVT_N_PHASES, n);
    kvt_engine *e = kvt_engine_acquire(eh, 0);
    if (!e) return KVT_ERR_HANDLE;
    pthread_mutex_lock(&e->mu);
    memcpy(ns, e->phase_ns, sizeof(int64_t) * (size_t)n);
    *runs = e->traced_runs;
    pthread_mutex_unlock(&e->mu);
    kvt_engine_release(e, 0);
    return KVT_OK;
}

int32_t kvt_score(int32_t eh, int32_t layer, int32_t B, int32_t Hq, int32_t D, const float *q, float *scores,
                  int32_t n_max) {
    if (!q || !scores) return kvt_err(KVT_ERR_VALUE, "kvt_score: expected q and scores buffers, got NULL");
    kvt_engine *e = kvt_engine_acquire(eh, 1);
    if (!e) return KVT_ERR_HANDLE;
    kvt_isa_hold();
    pthread_mutex_lock(&e->mu);
    kvt_store *held;
    int32_t rc = begin(e, layer, B, Hq, D, "kvt_score", &held);
    kvt_plan_state *p = &e->plan;
    if (rc == KVT_OK && n_max < p->n_max)
        rc = kvt_err(KVT_ERR_VALUE, "kvt_score: expected n_max >= %d (longest planned request), got %d",
                     p->n_max, n_max);
    if (rc == KVT_OK) rc = check_finite("kvt_score", "query", q, B, Hq, D);
    if (rc == KVT_OK) {
        run_ctx r = {p, layer, q, NULL, NULL, NULL, NULL, 0, use_q16(p, 0), 0, scores, n_max};
        if (r.q16) {
            kvtr_prepare_q16(p, q);
            kvt_pool_run(e->pool, p->n_items, kvtr_score_task_q16, &r);
        } else {
            kvt_pool_run(e->pool, p->n_items, kvtr_score_task, &r);
        }
        for (int64_t i = 0; i < (int64_t)p->B * p->Hq; i++)
            for (int t = p->ntok[i / p->Hq]; t < n_max; t++) scores[i * n_max + t] = -INFINITY;
    }
    pthread_mutex_unlock(&e->mu);
    if (held) kvt_store_release(held);
    kvt_isa_drop();
    kvt_engine_release(e, 1);
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

int32_t kvt_weighted_values(int32_t eh, int32_t sh, int32_t layer, int32_t B, int32_t Hq, int32_t D,
                            const int32_t *idx, const float *pr, int32_t m, float *out) {
    if (m < 0 || !out || (m > 0 && (!idx || !pr)))
        return kvt_err(KVT_ERR_VALUE, "kvt_weighted_values: expected m >= 0 and idx, p, out buffers, got m=%d", m);
    kvt_engine *e = kvt_engine_acquire(eh, 1);
    if (!e) return KVT_ERR_HANDLE;
    kvt_isa_hold();
    pthread_mutex_lock(&e->mu);
    kvt_store *held;
    int32_t rc = begin(e, layer, B, Hq, D, "kvt_weighted_values", &held);
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
    if (rc == KVT_OK) rc = check_finite("kvt_weighted_values", "weight", pr, B, Hq, m);
    if (rc == KVT_OK) {
        wv_ctx w = {p, layer, m, idx, pr, out};
        kvt_pool_run(e->pool, (int64_t)p->B * p->Hq, wv_task, &w);
    }
    pthread_mutex_unlock(&e->mu);
    if (held) kvt_store_release(held);
    kvt_isa_drop();
    kvt_engine_release(e, 1);
    return rc;
}

/* Under e->mu, for the calls over given token indices: begin()'s checks, the planned store,
 * a plan without the residual. */
static int32_t begin_indices(kvt_engine *e, int32_t sh, int32_t layer, int32_t B, int32_t Hq, int32_t D,
                             const char *fn, kvt_store **held) {
    int32_t rc = begin(e, layer, B, Hq, D, fn, held);
    const kvt_plan_state *p = &e->plan;
    if (rc == KVT_OK && sh != p->store_h)
        rc = kvt_err(KVT_ERR_VALUE, "%s: expected the planned store (handle %d), got %d", fn, p->store_h, sh);
    if (rc == KVT_OK && p->residual) rc = kvt_err(KVT_ERR_STATE, "%s: expected a plan without the residual", fn);
    return rc;
}

/* idx [B, per_b, m]: every index in [-1, ntok[b]), and no row naming more tokens than its request
 * has (more means repeats, and more than the scratch holds). *most: the most tokens of a row. */
static int32_t check_index_rows(const kvt_plan_state *p, const char *fn, const int32_t *idx, int per_b, int m,
                                int64_t *most) {
    *most = 0;
    for (int64_t row = 0; row < (int64_t)p->B * per_b; row++) {
        const int b = (int)(row / per_b);
        int valid = 0;
        for (int j = 0; j < m; j++) {
            const int32_t t = idx[row * m + j];
            if (t < -1 || t >= p->ntok[b])
                return kvt_err(KVT_ERR_RANGE, "%s: request %d: expected token index in [-1, %d), got %d", fn, b,
                               p->ntok[b], t);
            valid += t >= 0;
        }
        if (valid > p->ntok[b])
            return kvt_err(KVT_ERR_VALUE, "%s: request %d: expected unique token indices, got %d of its %d tokens "
                           "in one row", fn, b, valid, p->ntok[b]);
        if (valid > *most) *most = valid;
    }
    return KVT_OK;
}

typedef struct {
    kvt_plan_state *p;
    int layer, m;
    const float *q;
    const int32_t *idx;
    float *out, *lse;
} ai_ctx;

/* One (request, query head): its tokens' exact logits, then softmax . V (kvtr_attend).
 * Scratch: the thread's plan scratch holds a set of up to n_max tokens with G query
 * heads; one head's tokens, logits, weights, row pointers and scales take 6 n + D. */
static void ai_task(void *c, int64_t item, int tid) {
    ai_ctx *a = c;
    kvt_plan_state *p = a->p;
    const int D = p->store->d.head_dim, b = (int)(item / p->Hq), qh = (int)(item % p->Hq), h = qh / p->G;
    const int64_t n = p->n_max > 0 ? p->n_max : 1;
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    int32_t *tok = (int32_t *)sc;
    float *E = sc + n, *prob = E + n, *vscale = prob + n, *acc = vscale + n;
    const void **rows = (const void **)(acc + D + (D & 1)); /* 2 n floats, 8-byte aligned */
    const int32_t *ix = a->idx + item * a->m;
    int cnt = 0;
    for (int j = 0; j < a->m; j++)
        if (ix[j] >= 0) tok[cnt++] = ix[j];
    run_ctx r = {0};
    r.p = p;
    r.layer = a->layer;
    r.q = a->q;
    r.out = a->out;
    r.lse = a->lse;
    if (cnt == 0) {
        kvtr_write_empty(&r, item, 1);
        return;
    }
    kvtr_exact_logits(p, a->layer, b, h, tok, cnt, a->q + item * D, 1, E, cnt, tid);
    kvtr_attend(&r, b, h, qh - h * p->G, 1, E, tok, cnt, prob, acc, rows, vscale, tid);
}

/* Shared sets: one (request, kv-head, chunk of its set) per item; every query head of the
 * kv-head attends the set's tokens, so each key and value row is read once for the G heads.
 * A chunk's G partial results go to `part` (kvtr_attend_part); kvt_attend_kv_indices merges
 * the chunks of a set by LSE (kvtr_merge_parts) on the calling thread.
 * Scratch: the set's tokens (n), logits and weights (2 G n), scales (n), G D sums and 2 n
 * row pointers: within the plan's n (7 + 2 G) + D (3 G + 2). */
typedef struct {
    kvt_plan_state *p;
    int layer, m, chunks;
    const float *q;
    const int32_t *idx;
    float *part; /* [B, Hkv, chunks, G, D + 1] */
} akv_ctx;

static void akv_task(void *c, int64_t item, int tid) {
    akv_ctx *a = c;
    kvt_plan_state *p = a->p;
    const int D = p->store->d.head_dim, G = p->G, Hkv = p->Hq / p->G;
    const int64_t set = item / a->chunks;
    const int ci = (int)(item % a->chunks), b = (int)(set / Hkv), h = (int)(set % Hkv);
    const int64_t n = p->n_max > 0 ? p->n_max : 1;
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    int32_t *tok = (int32_t *)sc;
    float *E = sc + n, *prob = E + (int64_t)G * n, *vscale = prob + (int64_t)G * n, *acc = vscale + n;
    const void **rows = (const void **)(acc + (((int64_t)G * D + 1) & ~(int64_t)1)); /* 8-byte aligned */
    const int32_t *ix = a->idx + set * a->m;
    int cnt = 0;
    for (int j = 0; j < a->m; j++)
        if (ix[j] >= 0) tok[cnt++] = ix[j];
    const int j0 = (int)((int64_t)ci * cnt / a->chunks), j1 = (int)((int64_t)(ci + 1) * cnt / a->chunks);
    const int len = j1 - j0;
    float *part = a->part + item * (int64_t)G * (D + 1);
    if (len == 0) { /* an empty chunk: lse -inf, its sums unread by the merge */
        for (int g = 0; g < G; g++) part[(int64_t)g * (D + 1) + D] = -INFINITY;
        return;
    }
    kvtr_exact_logits(p, a->layer, b, h, tok + j0, len, a->q + ((int64_t)b * p->Hq + (int64_t)h * G) * D, G, E,
                      len, tid);
    kvtr_attend_part(p, a->layer, b, h, G, E, len, tok + j0, len, prob, acc, rows, vscale, part);
}

/* The calls over given token indices: idx [B, rows per request, m], a row per query head
 * (attend_indices: each head its own tokens) or, per_kv, per kv-head (attend_kv_indices). */
static int32_t attend_given(const char *fn, int per_kv, int32_t eh, int32_t sh, int32_t layer, int32_t B,
                            int32_t Hq, int32_t D, const float *q, const int32_t *idx, int32_t m, float *out,
                            float *lse) {
    if (m < 0 || !q || !out || !lse || (m > 0 && !idx))
        return kvt_err(KVT_ERR_VALUE, "%s: expected m >= 0 and q, idx, out, lse buffers, got m=%d", fn, m);
    kvt_engine *e = kvt_engine_acquire(eh, 1);
    if (!e) return KVT_ERR_HANDLE;
    kvt_isa_hold();
    pthread_mutex_lock(&e->mu);
    kvt_store *held;
    int32_t rc = begin_indices(e, sh, layer, B, Hq, D, fn, &held);
    kvt_plan_state *p = &e->plan;
    const int rows = rc == KVT_OK ? (per_kv ? p->Hq / p->G : p->Hq) : 0;
    int64_t most = 0; /* the longest row: how finely the kv-heads' sets are chunked */
    if (rc == KVT_OK) rc = check_index_rows(p, fn, idx, rows, m, &most);
    if (rc == KVT_OK) rc = check_finite(fn, "query", q, B, Hq, D);
    if (rc == KVT_OK && !per_kv) {
        ai_ctx a = {p, layer, m, q, idx, out, lse};
        kvt_pool_run(e->pool, (int64_t)p->B * p->Hq, ai_task, &a);
    } else if (rc == KVT_OK) {
        /* enough items for every worker twice over, no chunk under KVT_KV_CHUNK_MIN tokens */
        const int64_t sets = (int64_t)p->B * rows, want = (2 * (int64_t)p->n_threads + sets - 1) / sets;
        const int64_t room = most / KVT_KV_CHUNK_MIN > 1 ? most / KVT_KV_CHUNK_MIN : 1;
        int chunks = (int)(want < room ? want : room);
        if (chunks > KVT_SPLIT_MAX) chunks = KVT_SPLIT_MAX;
        const size_t bytes = sizeof(float) * (size_t)(sets * chunks * p->G * (D + 1));
        float *part = malloc(bytes);
        if (!part) {
            rc = kvt_err(KVT_ERR_NOMEM, "%s: expected %zu bytes of partial results", fn, bytes);
        } else {
            akv_ctx a = {p, layer, m, chunks, q, idx, part};
            kvt_pool_run(e->pool, sets * chunks, akv_task, &a);
            for (int64_t s = 0; s < sets; s++)
                kvtr_merge_parts(part + s * chunks * p->G * (D + 1), chunks, p->G, D, out + s * p->G * D,
                                 lse + s * p->G);
            free(part);
        }
    }
    pthread_mutex_unlock(&e->mu);
    if (held) kvt_store_release(held);
    kvt_isa_drop();
    kvt_engine_release(e, 1);
    return rc;
}

int32_t kvt_attend_kv_indices(int32_t eh, int32_t sh, int32_t layer, int32_t B, int32_t Hq, int32_t D,
                              const float *q, const int32_t *idx, int32_t m, float *out, float *lse) {
    return attend_given("kvt_attend_kv_indices", 1, eh, sh, layer, B, Hq, D, q, idx, m, out, lse);
}

int32_t kvt_attend_indices(int32_t eh, int32_t sh, int32_t layer, int32_t B, int32_t Hq, int32_t D, const float *q,
                           const int32_t *idx, int32_t m, float *out, float *lse) {
    return attend_given("kvt_attend_indices", 0, eh, sh, layer, B, Hq, D, q, idx, m, out, lse);
}
