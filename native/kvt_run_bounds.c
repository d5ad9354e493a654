/* Selection from the summaries' upper bounds, which read no keys: BLOCKS ranks
 * blocks of tokens; the prefilter ranks summary chunks, and the exact logits of the
 * best chunks' tokens decide (on one item per set, or split over page ranges). */
#include <math.h>
#include "kvt_run_internal.h"

/* Block upper bounds from the min/max summaries: q.k <= sum_d max(q_d mn_d, q_d mx_d), per
 * head into ubh [m, nb], reduced over the heads into rb (per_qhead: each head less its own
 * largest block bound). */
int kvtr_block_scores(run_ctx *r, int b, int h, int g0, int m, int bt, float *rb, float *mnmx, float *ubh) {
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
            const uint16_t *c = kvt_summary_ptr(s, r->layer, pages[t / T], h) + (int64_t)((t % T) / S) * 2 * D;
            for (int d = 0; d < D; d++) {
                float lo = kvt_bf16_to_f32(c[d]), hi = kvt_bf16_to_f32(c[D + d]);
                mn[d] = first ? lo : kvt_minf(mn[d], lo);
                mx[d] = first ? hi : kvt_maxf(mx[d], hi);
            }
            first = 0;
        }
        for (int g = 0; g < m; g++) {
            const float *qg = q + (int64_t)g * D;
            float ub = 0.f;
            for (int d = 0; d < D; d++) ub += kvt_maxf(qg[d] * mn[d], qg[d] * mx[d]);
            ubh[(int64_t)g * nb + bi] = ub * p->sm_scale;
        }
    }
    kvtr_bound_reduce(p, ubh, nb, m, nb, rb);
    return nb;
}

/* pages of summaries prefetched ahead of the bound pass */
#define KVT_PF_PAGES 6

/* The bound query of heads q[0..m): w[g] = [min(q_g, 0) | max(q_g, 0)] */
static void bound_query(const float *q, int m, int D, float *w) {
    for (int g = 0; g < m; g++)
        for (int d = 0; d < D; d++) {
            float v = q[(int64_t)g * D + d];
            w[(int64_t)g * 2 * D + d] = v < 0.f ? v : 0.f;
            w[(int64_t)g * 2 * D + D + d] = v > 0.f ? v : 0.f;
        }
}

/* Upper bounds of the summary chunks of pages [pi0, pi1) of request b, kv-head h:
 * ub[g * nc + c] = w[g] . [mn | mx] of chunk c, the largest logit (before
 * sm_scale) any token of the chunk can have. */
static void chunk_bounds(const kvt_plan_state *p, int layer, int b, int h, const float *w, int m, int pi0,
                         int pi1, float *ub) {
    const kvt_store *s = p->store;
    const int D = s->d.head_dim, S = s->d.summary_tokens, T = s->d.page_tokens, n = p->ntok[b];
    const int per_page = T / S, nc = (n + S - 1) / S;
    const int32_t *pages = p->page_table + p->page_off[b];
    const int64_t row_bytes = (int64_t)per_page * 2 * D * sizeof(uint16_t);
    /* a page's summaries are a few lines, pages apart in memory: prefetch ahead */
    for (int pi = pi0; pi < pi1; pi++) {
        if (pi + KVT_PF_PAGES < pi1) {
            const char *a = (const char *)kvt_summary_ptr(s, layer, pages[pi + KVT_PF_PAGES], h);
            for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(a + o);
        }
        int c0 = pi * per_page, len = nc - c0 < per_page ? nc - c0 : per_page;
        kvt_k->bound_bf16(kvt_summary_ptr(s, layer, pages[pi], h), len, 2 * D, w, m, ub + c0, nc);
    }
}

/* Summary chunks the prefilter keeps for kv item bh, or 0 when they would cover
 * the whole request (then every token is a candidate and no bound is needed). */
static int prefilter_chunks(const kvt_plan_state *p, int64_t bh) {
    const int S = p->store->d.summary_tokens, nc = (p->ntok[bh / p->Hkv] + S - 1) / S;
    const double want = ceil(p->prefilter * p->budget[bh] / S);
    return want < nc ? (int)want : 0;
}

/* Candidates from the chunk bounds ub [m, nc] (reduced over the set's heads into red, as
 * kvtr_bound_reduce does): the tokens of the best chunks, ascending. Returns their count. */
int kvtr_prefilter_pick(const kvt_plan_state *p, int64_t bh, int m, const float *ub, float *red, float *tmp,
                        int32_t *pos, int32_t *cand) {
    const int S = p->store->d.summary_tokens, n = p->ntok[bh / p->Hkv], nc = (n + S - 1) / S;
    const int want = prefilter_chunks(p, bh);
    int cnt = 0;
    if (!want) {
        for (int t = 0; t < n; t++) cand[t] = t;
        return n;
    }
    if (m > 1) { kvtr_bound_reduce(p, ub, nc, m, nc, red); ub = red; }
    int nsel = kvt_topk_indices(ub, nc, want, tmp, pos);
    for (int i = 0; i < nsel; i++)
        for (int t = pos[i] * S; t < (pos[i] + 1) * S && t < n; t++) cand[cnt++] = t;
    return cnt;
}

/* Prefilter, one selection set on one thread: the upper bound of every summary
 * chunk, sum_d max(q_d mn_d, q_d mx_d) = [min(q, 0) | max(q, 0)] . [mn | mx]
 * (reduced over the set like the logits), ranks the chunks; the tokens of the
 * best ones, prefilter x budget of them, are the candidates whose exact logits
 * decide. Only the summaries and the candidates' keys are read. */
void kvtr_select_attend_prefilter(run_ctx *r, int64_t bh, int g0, int m, float *sc, int tid) {
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int b = (int)(bh / p->Hkv), h = (int)(bh % p->Hkv), n = p->ntok[b];
    const int D = s->d.head_dim, T = s->d.page_tokens;
    set_scratch z = set_scratch_at(p, sc, n);
    if (prefilter_chunks(p, bh)) {
        bound_query(r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G + g0) * D, m, D, z.w);
        chunk_bounds(p, r->layer, b, h, z.w, m, 0, (n + T - 1) / T, z.E);
    }
    int cnt = kvtr_prefilter_pick(p, bh, m, z.E, z.re, z.tmp, z.pos, z.cand);
    kvtr_decide_attend(r, bh, g0, m, cnt, 1, z, tid);
}

/* split prefilter: the chunk bounds of a part of a set's pages */
void kvtr_bound_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int32_t *w = p->pf_items + 3 * item;
    const int m = p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, w[0], &b, &h, &g0, &bh, &qh0);
    if (!prefilter_chunks(p, bh)) return; /* also an empty request */
    float *q = p->scratch + (int64_t)tid * p->scratch_floats;
    bound_query(r->q + qh0 * D, m, D, q);
    chunk_bounds(p, r->layer, b, h, q, m, w[1], w[2], p->pf_ub + p->pf_off[w[0]]);
}
