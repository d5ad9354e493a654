/* kvt_plan: validate a batch once and size every buffer that kvt_run needs,
 * so that run itself never allocates. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kvt_engine_internal.h"

/* Tokens per scoring work item: long contexts are split so that one request
 * with few kv heads still keeps every thread busy. */
#define SCORE_CHUNK_TOKENS 2048

void kvt_plan_free(kvt_plan_state *p) {
    free(p->page_table); free(p->page_off); free(p->ntok); free(p->budget); free(p->block);
    free(p->score_off); free(p->scores); free(p->items); free(p->scratch);
    free(p->item_off); free(p->item_ksmax); free(p->lse_sel); free(p->item_lm); free(p->item_ls); free(p->q16); free(p->q16s); free(p->qerr);
    free(p->set_off); free(p->set_cap); free(p->set_buf); free(p->sets); free(p->bh_left); free(p->part); free(p->work);
    free(p->pf_off); free(p->pf_ub); free(p->pf_items);
    free(p->res_bits_off); free(p->res_item_off); free(p->res_bits); free(p->res_items); free(p->res_part);
    memset(p, 0, sizeof *p);
}

/* Frees the plan but keeps its three large buffers (and their capacities). */
static void plan_clear(kvt_plan_state *p) {
    float *scores = p->scores, *scratch = p->scratch, *set_buf = p->set_buf;
    int64_t c0 = p->scores_cap, c1 = p->scratch_cap, c2 = p->set_buf_cap;
    p->scores = p->scratch = p->set_buf = NULL;
    kvt_plan_free(p);
    p->scores = scores; p->scratch = scratch; p->set_buf = set_buf;
    p->scores_cap = c0; p->scratch_cap = c1; p->set_buf_cap = c2;
}

/* buf if it holds need floats, else a fresh allocation (NULL when out of memory, or
 * when need passes 2^52 floats: a count that large came from a saturated sum) */
static float *reuse(float *buf, int64_t *cap, int64_t need) {
    if (need < 1) need = 1;
    if (need > ((int64_t)1 << 52)) return NULL;
    if (buf && *cap >= need) return buf;
    free(buf);
    buf = malloc(sizeof(float) * (size_t)need);
    *cap = buf ? need : 0;
    return buf;
}

static int32_t *dup_i32(const int32_t *src, int64_t n) {
    int32_t *d = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    if (d && n > 0) memcpy(d, src, (size_t)n * sizeof(int32_t));
    return d;
}

static int32_t validate(const kvt_store *s, const kvt_plan_desc *d) {
    const int Hkv = s->d.kv_heads, T = s->d.page_tokens, S = s->d.summary_tokens;
    if (d->batch <= 0 || d->batch > KVT_MAX_BATCH)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected batch in [1, %d], got %d", KVT_MAX_BATCH, d->batch);
    if (d->num_q_heads <= 0 || d->num_q_heads % Hkv != 0 || d->num_q_heads > KVT_MAX_Q_HEADS)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected num_q_heads a positive multiple of kv_heads %d, at most "
                       "%d, got %d", Hkv, KVT_MAX_Q_HEADS, d->num_q_heads);
    if ((int64_t)d->batch * d->num_q_heads > KVT_MAX_ROWS)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected batch x num_q_heads <= %d query rows, got %d x %d",
                       KVT_MAX_ROWS, d->batch, d->num_q_heads);
    if (!d->page_offsets || !d->n_tokens)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected page_offsets and n_tokens, got NULL");
    if (d->page_offsets[0] < 0)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected page_offsets[0] >= 0, got %d", d->page_offsets[0]);
    for (int b = 0; b < d->batch; b++) {
        int32_t a = d->page_offsets[b], e = d->page_offsets[b + 1];
        if (e < a)
            return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected non-decreasing page_offsets, got %d then %d at request %d",
                           a, e, b);
        if (d->n_tokens[b] < 0 || (int64_t)d->n_tokens[b] > (int64_t)(e - a) * T)
            return kvt_err(KVT_ERR_VALUE, "kvt_plan: request %d: expected n_tokens in [0, %lld] (%d pages of %d), got %d",
                           b, (long long)(e - a) * T, e - a, T, d->n_tokens[b]);
        if (d->n_tokens[b] > KVT_MAX_TOKENS)
            return kvt_err(KVT_ERR_VALUE, "kvt_plan: request %d: expected at most %d host tokens, got %d", b,
                           KVT_MAX_TOKENS, d->n_tokens[b]);
    }
    int32_t n_pages = d->page_offsets[d->batch];
    if (n_pages > 0 && !d->page_table)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected a page_table of %d entries, got NULL", n_pages);
    for (int32_t i = d->page_offsets[0]; i < n_pages; i++)
        if (d->page_table[i] < 0 || d->page_table[i] >= s->d.n_pages)
            return kvt_err(KVT_ERR_RANGE, "kvt_plan: expected page ids in [0, %d), got %d at page_table[%d]",
                           s->d.n_pages, d->page_table[i], i);
    if (d->mode < KVT_SELECT_TOPK || d->mode > KVT_SELECT_ALL)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected mode 0..3 (topk, mass, blocks, all), got %d", d->mode);
    if (d->group_reduce < KVT_REDUCE_MAX || d->group_reduce > KVT_PER_QHEAD)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected group_reduce 0..2 (max, mean, per_qhead), got %d",
                       d->group_reduce);
    if (!isfinite(d->sm_scale) || d->sm_scale <= 0.f)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected a finite sm_scale > 0, got %g", (double)d->sm_scale);
    if (!isfinite(d->soft_cap) || d->soft_cap < 0.f)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected a finite soft_cap >= 0, got %g", (double)d->soft_cap);
    if (!isfinite(d->prefilter) || (d->prefilter != 0.0 && d->prefilter < 1.0))
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected prefilter 0 (off) or a finite factor >= 1, got %g",
                       d->prefilter);
    if (d->prefilter > 0.0 && d->mode != KVT_SELECT_TOPK && d->mode != KVT_SELECT_MASS)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: prefilter applies to modes topk and mass, got mode %d with "
                       "prefilter %g", d->mode, d->prefilter);
    if (d->residual != 0 && d->residual != 1)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected residual 0 (off) or 1 (on), got %d", d->residual);
    if (d->residual && !s->d.chunk_sums)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: residual 1 needs a store opened with chunk_sums; this store has "
                       "none");
    if (d->mode == KVT_SELECT_ALL) return KVT_OK;
    if (!d->budget_tokens)
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected budget_tokens [batch * kv_heads], got NULL");
    for (int64_t i = 0; i < (int64_t)d->batch * Hkv; i++)
        if (d->budget_tokens[i] <= 0)
            return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected budget_tokens > 0, got %d for request %lld kv-head %lld",
                           d->budget_tokens[i], (long long)(i / Hkv), (long long)(i % Hkv));
    if (d->mode == KVT_SELECT_MASS && !(d->mass_threshold > 0.f && d->mass_threshold <= 1.f))
        return kvt_err(KVT_ERR_VALUE, "kvt_plan: expected mass_threshold in (0, 1], got %g",
                       (double)d->mass_threshold);
    if (d->mode == KVT_SELECT_BLOCKS) {
        if (!d->block_tokens)
            return kvt_err(KVT_ERR_VALUE, "kvt_plan: blocks mode expects block_tokens [kv_heads], got NULL");
        for (int h = 0; h < Hkv; h++) {
            int B = d->block_tokens[h];
            if (B <= 0 || B > KVT_MAX_TOKENS || B % S != 0 || (T % B != 0 && B % T != 0))
                return kvt_err(KVT_ERR_VALUE,
                               "kvt_plan: kv-head %d: expected block_tokens a multiple of summary_tokens %d that "
                               "divides or is a multiple of page_tokens %d, got %d", h, S, T, B);
        }
    }
    return KVT_OK;
}

/* Split select + attend when the selection sets are few against the threads
 * (small batches): candidates are capped at 2k + 4096 per set (a set with more
 * falls back to the one-item path at run time). */
/* Prefilter candidates of a set of request b, kv-head h: the tokens of the
 * best prefilter x budget / summary_tokens chunks (every token when that covers
 * the request). */
static int64_t prefilter_cap(const kvt_plan_state *p, const kvt_store *s, int64_t bh) {
    const int S = s->d.summary_tokens, n = p->ntok[bh / p->Hkv];
    const double want = ceil(p->prefilter * p->budget[bh] / S) * S;
    return want < n ? (int64_t)want : n;
}

/* Parts of a set's np pages for the bound pass: parts_want, with at least 32 pages each. */
static int64_t bound_parts(int np, int64_t parts_want) {
    int64_t parts = np / 32 < parts_want ? np / 32 : parts_want;
    return parts < 1 ? 1 : parts;
}

/* Bound work items of the split prefilter: each set's pages in parts, about
 * two items per thread in all. */
static int32_t plan_prefilter_bounds(kvt_plan_state *p, const kvt_store *s, int m) {
    const int T = s->d.page_tokens, S = s->d.summary_tokens;
    p->pf_off = malloc(sizeof(int64_t) * (size_t)p->n_sets);
    if (!p->pf_off) return KVT_ERR_NOMEM;
    int64_t total = 0, items = 0;
    const int64_t parts_want = (2 * (int64_t)p->n_threads + p->n_sets - 1) / p->n_sets;
    for (int64_t i = 0; i < p->n_sets; i++) {
        int n = p->ntok[i / p->Hkv], np = (n + T - 1) / T;
        p->pf_off[i] = total;
        total += (int64_t)m * ((n + S - 1) / S);
        items += bound_parts(np, parts_want);
    }
    p->pf_ub = malloc(sizeof(float) * (size_t)(total > 0 ? total : 1));
    p->pf_items = malloc(sizeof(int32_t) * 3 * (size_t)items);
    if (!p->pf_ub || !p->pf_items) return KVT_ERR_NOMEM;
    int64_t it = 0;
    for (int64_t i = 0; i < p->n_sets; i++) {
        int n = p->ntok[i / p->Hkv], np = (n + T - 1) / T;
        const int64_t parts = bound_parts(np, parts_want);
        for (int64_t j = 0; j < parts; j++) {
            int32_t *w = p->pf_items + 3 * it++;
            w[0] = (int32_t)i;
            w[1] = (int32_t)(j * np / parts);
            w[2] = (int32_t)((j + 1) * np / parts);
        }
    }
    p->n_pf_items = it;
    return KVT_OK;
}

/* Fewest summary chunks per residual work item */
#define KVT_RES_MIN_CHUNKS 64

/* Residual buffers and work items: each set's chunks in parts, about four
 * items per thread in all, at least KVT_RES_MIN_CHUNKS chunks each. */
static int32_t plan_residual(kvt_plan_state *p, const kvt_store *s) {
    const int S = s->d.summary_tokens, D = s->d.head_dim, m = p->G;
    const int64_t ns = p->n_sets;
    p->res_bits_off = malloc(sizeof(int64_t) * (size_t)(ns + 1));
    p->res_item_off = malloc(sizeof(int64_t) * (size_t)(ns + 1));
    if (!p->res_bits_off || !p->res_item_off) return KVT_ERR_NOMEM;
    const int64_t want = (4 * (int64_t)p->n_threads + ns - 1) / (ns > 0 ? ns : 1);
    int64_t words = 0, items = 0;
    for (int64_t i = 0; i < ns; i++) {
        const int n = p->ntok[i / p->Hkv], nc = (n + S - 1) / S;
        int64_t parts = nc / KVT_RES_MIN_CHUNKS < want ? nc / KVT_RES_MIN_CHUNKS : want;
        if (parts < 1) parts = nc > 0;
        p->res_bits_off[i] = words;
        p->res_item_off[i] = items;
        words += (n + 63) / 64;
        items += parts;
    }
    p->res_bits_off[ns] = words;
    p->res_item_off[ns] = items;
    p->res_part_floats = (int64_t)m * (D + 2);
    p->res_bits = malloc(sizeof(uint64_t) * (size_t)(words > 0 ? words : 1));
    p->res_items = malloc(sizeof(int32_t) * 3 * (size_t)(items > 0 ? items : 1));
    p->res_part = malloc(sizeof(float) * (size_t)((items > 0 ? items : 1) * p->res_part_floats));
    if (!p->res_bits || !p->res_items || !p->res_part) return KVT_ERR_NOMEM;
    for (int64_t i = 0; i < ns; i++) {
        const int n = p->ntok[i / p->Hkv], nc = (n + S - 1) / S;
        const int64_t parts = p->res_item_off[i + 1] - p->res_item_off[i];
        for (int64_t j = 0; j < parts; j++) {
            int32_t *w = p->res_items + 3 * (p->res_item_off[i] + j);
            w[0] = (int32_t)i;
            w[1] = (int32_t)(j * nc / parts);
            w[2] = (int32_t)((j + 1) * nc / parts);
        }
    }
    p->n_res_items = items;
    return KVT_OK;
}

static int32_t plan_split(kvt_plan_state *p, const kvt_store *s) {
    const int m = p->G, D = s->d.head_dim;
    p->n_sets = (int64_t)p->B * p->Hkv;
    const int q16_keys = s->d.key_format == KVT_KEY_INT8 ||
                         (s->d.key_format == KVT_KEY_INT4 && kvt_i4_q16_ok(D, s->d.key_group));
    const int pf = p->prefilter > 0.0;
    if ((!q16_keys && !pf) || (p->mode != KVT_SELECT_TOPK && p->mode != KVT_SELECT_MASS) ||
        p->n_threads < 2 || p->n_sets >= 4 * (int64_t)p->n_threads)
        return KVT_OK;
    int64_t want = (4 * (int64_t)p->n_threads + p->n_sets - 1) / p->n_sets;
    p->split_want = (int)(want < KVT_SPLIT_MAX ? want : KVT_SPLIT_MAX);
    p->set_off = malloc(sizeof(int64_t) * (size_t)p->n_sets);
    p->set_cap = malloc(sizeof(int32_t) * (size_t)p->n_sets);
    p->sets = calloc((size_t)p->n_sets, sizeof(kvt_set_state));
    p->part = malloc(sizeof(float) * (size_t)(p->n_sets * KVT_SPLIT_MAX * m * (D + 1)));
    p->work = malloc(sizeof(int32_t) * 2 * (size_t)(p->n_sets * KVT_SPLIT_MAX));
    p->bh_left = calloc((size_t)p->B * p->Hkv, sizeof(atomic_int));
    if (!p->set_off || !p->set_cap || !p->sets || !p->part || !p->work || !p->bh_left) return KVT_ERR_NOMEM;
    int64_t total = 0;
    for (int64_t i = 0; i < p->n_sets; i++) {
        int64_t bh = i, n = p->ntok[bh / p->Hkv], cap = 2 * (int64_t)p->budget[bh] + 4096;
        p->set_cap[i] = (int32_t)(pf ? prefilter_cap(p, s, bh) : cap < n ? cap : n);
        p->set_off[i] = total;
        total += (int64_t)p->set_cap[i] * (4 + m);
    }
    p->set_buf = reuse(p->set_buf, &p->set_buf_cap, total);
    if (!p->set_buf) return KVT_ERR_NOMEM;
    if (pf && plan_prefilter_bounds(p, s, m) != KVT_OK) return KVT_ERR_NOMEM;
    p->split = 1;
    return KVT_OK;
}

static int32_t plan_held(kvt_engine *e, kvt_store *s, int32_t sh, const kvt_plan_desc *d);

int32_t kvt_plan(int32_t eh, int32_t sh, const kvt_plan_desc *d) {
    kvt_engine *e = kvt_engine_acquire(eh, 0);
    if (!e) return KVT_ERR_HANDLE;
    kvt_store *s = kvt_store_acquire(sh);
    int32_t rc = s ? KVT_OK : KVT_ERR_HANDLE;
    if (rc == KVT_OK) rc = kvt_engine_check_idle(e, "kvt_plan");
    if (rc == KVT_OK && !d) rc = kvt_err(KVT_ERR_VALUE, "kvt_plan: expected a plan descriptor, got NULL");
    if (rc == KVT_OK) rc = validate(s, d);
    if (rc == KVT_OK) {
        pthread_mutex_lock(&e->mu);
        rc = plan_held(e, s, sh, d);
        pthread_mutex_unlock(&e->mu);
    }
    if (s) kvt_store_release(s);
    kvt_engine_release(e, 0);
    return rc;
}

/* The plan, under e->mu; d is valid for s. */
static int32_t plan_held(kvt_engine *e, kvt_store *s, int32_t sh, const kvt_plan_desc *d) {
    kvt_plan_state *p = &e->plan;
    plan_clear(p);
    const int B = d->batch, Hkv = s->d.kv_heads, T = s->d.page_tokens;
    p->store = s; p->store_h = sh; p->serial = s->serial;
    p->B = B; p->Hq = d->num_q_heads; p->Hkv = Hkv; p->G = d->num_q_heads / Hkv; p->D = s->d.head_dim;
    p->mode = d->mode;
    /* one query head per kv-head: its own ranking is the group's (per_qhead's shift changes no order) */
    p->reduce = d->group_reduce == KVT_PER_QHEAD && p->G == 1 ? KVT_REDUCE_MAX : d->group_reduce;
    p->need_lse = (d->mode == KVT_SELECT_TOPK || d->mode == KVT_SELECT_MASS) &&
                  (p->reduce == KVT_PER_QHEAD || d->mode == KVT_SELECT_MASS);
    p->tau = d->mass_threshold; p->sm_scale = d->sm_scale; p->soft_cap = d->soft_cap;
    p->prefilter = d->prefilter;
    p->residual = d->residual;
    int64_t total_pages = d->page_offsets[B];
    p->page_table = dup_i32(d->page_table, total_pages);
    p->page_off = dup_i32(d->page_offsets, B + 1);
    p->ntok = dup_i32(d->n_tokens, B);
    p->budget = dup_i32(d->mode == KVT_SELECT_ALL ? NULL : d->budget_tokens,
                        d->mode == KVT_SELECT_ALL ? 0 : (int64_t)B * Hkv);
    /* a budget past the request's host tokens selects all of them either way: clamped here,
     * every later budget sum (2k + 4096, k + block - 1, prefilter x k) stays small */
    if (p->budget && p->ntok && d->mode != KVT_SELECT_ALL)
        for (int64_t i = 0; i < (int64_t)B * Hkv; i++) {
            const int32_t n = p->ntok[i / Hkv] > 0 ? p->ntok[i / Hkv] : 1;
            if (p->budget[i] > n) p->budget[i] = n;
        }
    p->block = dup_i32(d->mode == KVT_SELECT_BLOCKS ? d->block_tokens : NULL,
                       d->mode == KVT_SELECT_BLOCKS ? Hkv : 0);
    p->score_off = malloc(sizeof(int64_t) * (size_t)B * Hkv);
    int64_t total = 0, n_items = 0;
    int chunk = ((SCORE_CHUNK_TOKENS + T - 1) / T) * T;
    p->n_max = 0;
    for (int b = 0; b < B; b++) {
        int n = p->ntok ? p->ntok[b] : 0;
        if (n > p->n_max) p->n_max = n;
        for (int h = 0; h < Hkv && p->score_off; h++) {
            p->score_off[(int64_t)b * Hkv + h] = total;
            /* <= 2^54 over the batch (KVT_MAX_ROWS x KVT_MAX_TOKENS); per_qhead's reduced row after */
            total += ((int64_t)p->G + (p->reduce == KVT_PER_QHEAD)) * n;
        }
        n_items += (int64_t)Hkv * ((n + chunk - 1) / chunk);
    }
    p->scores = reuse(p->scores, &p->scores_cap, total);
    p->items = malloc(sizeof(int32_t) * 4 * (size_t)(n_items > 0 ? n_items : 1));
    p->item_off = malloc(sizeof(int64_t) * ((size_t)B * Hkv + 1));
    p->item_ksmax = malloc(sizeof(float) * (size_t)(n_items > 0 ? n_items : 1));
    p->lse_sel = malloc(sizeof(float) * (size_t)B * p->Hq);
    p->item_lm = malloc(sizeof(float) * (size_t)(n_items > 0 ? n_items : 1) * p->G);
    p->item_ls = malloc(sizeof(double) * (size_t)(n_items > 0 ? n_items : 1) * p->G);
    p->q16_stride = s->d.key_format == KVT_KEY_INT4 ? kvt_i4_q16_dp(s->d.head_dim) : s->d.head_dim;
    p->q16 = malloc(sizeof(int16_t) * (size_t)B * p->Hq * p->q16_stride);
    p->q16s = malloc(sizeof(float) * (size_t)B * p->Hq);
    p->qerr = malloc(sizeof(float) * (size_t)B * p->Hq);
    p->n_threads = kvt_pool_size(e->pool);
    /* per thread: tmp, cand, re, pos, sel (n each), pairs (2n), exact logits and
     * p ([G, n] each), acc [G, D], block min/max [2D] or the prefilter's bound
     * query [G, 2D], score segment [G, KVT_SEG] */
    int64_t n = p->n_max > 0 ? p->n_max : 1, D = s->d.head_dim;
    p->scratch_floats = n * (7 + 2 * (int64_t)p->G) + D * (3 * (int64_t)p->G + 2) + (int64_t)p->G * KVT_SEG + 64;
    p->scratch_floats = (p->scratch_floats + 15) & ~(int64_t)15; /* threads on separate lines */
    /* residual: a chunk's adjusted key or value sum [D], a token row [D], and one chunk's
     * logits or weights [G] */
    p->res_off = p->scratch_floats;
    if (p->residual) p->scratch_floats += (2 * D + (int64_t)p->G + 16 + 15) & ~(int64_t)15;
    p->gather_off = p->scratch_floats;
    p->scratch_floats += ((KVT_GATHER * (s->key_tok + 4 * s->kscale_tok) + 3) / 4 + 15) & ~(int64_t)15;
    p->scratch = reuse(p->scratch, &p->scratch_cap, p->scratch_floats * p->n_threads);
    if (!p->page_table || !p->page_off || !p->ntok || !p->budget || !p->block || !p->score_off ||
        !p->scores || !p->items || !p->scratch || !p->item_off || !p->item_ksmax || !p->lse_sel || !p->item_lm ||
        !p->item_ls || !p->q16 ||
        !p->q16s || !p->qerr) {
        kvt_plan_free(p);
        return kvt_err(KVT_ERR_NOMEM, "kvt_plan: out of memory sizing scratch for %lld logits",
                       (long long)total);
    }
    if (plan_split(p, s) != KVT_OK) {
        kvt_plan_free(p);
        return kvt_err(KVT_ERR_NOMEM, "kvt_plan: out of memory sizing the split select + attend buffers");
    }
    if (p->residual && plan_residual(p, s) != KVT_OK) {
        kvt_plan_free(p);
        return kvt_err(KVT_ERR_NOMEM, "kvt_plan: out of memory sizing the residual's buffers");
    }
    int64_t it = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hkv; h++) {
            p->item_off[b * Hkv + h] = it;
            for (int t0 = 0; t0 < p->ntok[b]; t0 += chunk) {
                int32_t *w = p->items + 4 * it++;
                w[0] = b; w[1] = h; w[2] = t0;
                w[3] = t0 + chunk < p->ntok[b] ? t0 + chunk : p->ntok[b];
            }
        }
    p->item_off[B * Hkv] = it;
    p->n_items = it;
    p->valid = 1;
    return KVT_OK;
}
