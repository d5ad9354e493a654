/* Shared by kvt_run.c and its phases (kvt_run_score.c, kvt_run_bounds.c,
 * kvt_run_select.c, kvt_run_attend.c, kvt_run_residual.c); none of it is API.
 * Helpers called per token or per set are static inline here, so that every
 * phase's file still inlines them. */
#ifndef KVT_RUN_INTERNAL_H
#define KVT_RUN_INTERNAL_H
#include <math.h>
#include "kvt_engine_internal.h"

typedef struct {
    kvt_plan_state *p;
    int layer;
    const float *q;
    float *out, *lse;
    int32_t *nsel, *sel_index;
    int32_t sel_cap;
    int q16;        /* selection-stage scores from the int16-query kernel */
    int reduced;    /* q16 path: score items write the group-reduced logit only */
    float *dst;     /* per-head logits: (b, h) rows at dst + dst_off(b, h), stride dst_stride */
    int64_t dst_stride; /* 0: the plan's own buffer, stride n_b */
    int fused_select; /* q16 split path: the last score item of a (b, h) takes its sets' floors,
                       * the last collected range of a set its band (no phase of their own) */
} run_ctx;

static inline void apply_scale(float *x, int n, float sm, float cap) {
    if (cap > 0.f)
        for (int t = 0; t < n; t++) x[t] = cap * tanhf(x[t] * sm / cap);
    else
        for (int t = 0; t < n; t++) x[t] *= sm;
}

/* Where token t of request b lies for kv-head h of a layer: its (layer, page, head)
 * block is lph0 + page_table[t / T] * kv_heads, its row t % T (a shift and a mask
 * when T is a power of two, as page sizes are in practice). */
typedef struct {
    const int32_t *pages;
    int64_t lph0, heads;
    int T, shift; /* shift < 0: T is not a power of two */
} tok_loc;

static inline tok_loc tok_locator(const kvt_plan_state *p, int layer, int b, int h) {
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens;
    tok_loc L = {p->page_table + p->page_off[b], kvt_lph(s, layer, 0, h), s->d.kv_heads, T,
                 (T & (T - 1)) ? -1 : __builtin_ctz((unsigned)T)};
    return L;
}
static inline int64_t tok_lph(const tok_loc *L, int t) {
    return L->lph0 + (int64_t)L->pages[L->shift >= 0 ? t >> L->shift : t / L->T] * L->heads;
}
static inline int64_t tok_off(const tok_loc *L, int t) { return L->shift >= 0 ? t & (L->T - 1) : t % L->T; }

/* Per-thread scratch of one selection set, n = the request's host tokens. */
typedef struct {
    float *tmp, *re, *pairs, *E, *prob, *acc, *w;
    int32_t *cand, *pos, *sel;
} set_scratch;

static inline set_scratch set_scratch_at(const kvt_plan_state *p, float *sc, int n) {
    const int64_t G = p->G, D = p->store->d.head_dim;
    set_scratch o;
    o.tmp = sc;
    o.re = o.tmp + n;
    o.pairs = o.re + n;
    o.E = o.pairs + 2 * (int64_t)n;
    o.prob = o.E + G * n;
    o.cand = (int32_t *)(o.prob + G * n);
    o.pos = o.cand + n;
    o.sel = o.pos + n;
    o.acc = (float *)(o.sel + n + (n & 1)); /* 8-byte aligned: MASS keeps per-head sums in doubles here */
    o.w = o.acc + G * D;
    return o;
}

/* ---- split select + attend (q16 path or prefilter, few selection sets) ----------
 * kvtr_select_task (per set): k-th selection logit, candidate band (or the one-item
 * path when the band overflows the set's buffers), or the prefilter's candidates
 * (after kvtr_bound_task); kvtr_exact_task (per candidate chunk): exact logits, group
 * reduce, MASS partial sums, and the last chunk of a set picks the selection;
 * kvtr_attend_chunk_task (per chunk of the selection): softmax and sum p.V of the
 * chunk, the last chunk of a set merges the partials by log-sum-exp. */
typedef struct {
    int32_t *cand, *pos, *sel;
    float *re, *E;
} set_bufs;

static inline set_bufs set_buffers(const kvt_plan_state *p, int64_t s) {
    int64_t c = p->set_cap[s];
    float *base = p->set_buf + p->set_off[s];
    set_bufs o = {(int32_t *)base, (int32_t *)base + c, (int32_t *)base + 2 * c, base + 3 * c, base + 4 * c};
    return o;
}

static inline int split_chunks(const kvt_plan_state *p, int len) {
    int nc = len / KVT_SPLIT_MIN;
    if (nc > p->split_want) nc = p->split_want;
    return nc < 1 ? 1 : nc;
}

/* set s (one per kv item: the kv-head's query heads share a selection) -> (b, h), its
 * kv item bh and its first query head; g0 is 0 */
static inline void set_coords(const kvt_plan_state *p, int64_t s, int *b, int *h, int *g0, int64_t *bh,
                              int64_t *qh0) {
    *bh = s;
    *b = (int)(*bh / p->Hkv);
    *h = (int)(*bh % p->Hkv);
    *g0 = 0;
    *qh0 = (int64_t)*b * p->Hq + (int64_t)*h * p->G;
}

/* The selection-stage logits a set ranks by (q16 path): the group-reduced row, which per_qhead
 * keeps after its heads' rows */
static inline float *set_logits(const kvt_plan_state *p, int64_t bh, int n) {
    return p->scores + p->score_off[bh] + (p->reduce == KVT_PER_QHEAD ? (int64_t)p->G * n : 0);
}

/* ---- kvt_run_score.c ---- */
/* exact logits of tokens [t0, t1) of request b, kv-head h, for query heads q[0..G) */
void kvtr_score_range(const kvt_plan_state *p, int layer, int b, int h, int t0, int t1,
                      const float *q, int G, float *dst, int64_t ds);
void kvtr_score_task(void *c, int64_t item, int tid);
void kvtr_score_task_q16(void *c, int64_t item, int tid);
void kvtr_prepare_q16(kvt_plan_state *p, const float *q);
float kvtr_q16_bound(const kvt_plan_state *p, int64_t bh, int64_t qh, int m, float theta);

/* ---- kvt_run_bounds.c ---- */
int kvtr_block_scores(run_ctx *r, int b, int h, int g0, int m, int bt, float *rb, float *mnmx, float *ubh);
int kvtr_prefilter_pick(const kvt_plan_state *p, int64_t bh, int m, const float *ub, float *red, float *tmp,
                        int32_t *pos, int32_t *cand);
void kvtr_select_attend_prefilter(run_ctx *r, int64_t bh, int g0, int m, float *sc, int tid);
void kvtr_bound_task(void *c, int64_t item, int tid);

/* ---- kvt_run_select.c ---- */
/* rr[t] over the heads g < m of x[g * xs + t]: their max, their mean, or per_qhead the max of
 * x - shift[g] (each head's logit less its log-sum-exp: its log-probability) */
void kvtr_group_reduce(const kvt_plan_state *p, const float *x, int64_t xs, int m, int n, float *rr,
                       const float *shift);
/* the same over summary upper bounds ub [m, n] (blocks or prefilter chunks): per_qhead shifts
 * each head by its own largest bound */
void kvtr_bound_reduce(const kvt_plan_state *p, const float *ub, int64_t us, int m, int n, float *red);
/* lse_sel of kv item bh's heads from rows x [m, xs] of n logits, or from its score items' partials */
void kvtr_lse_rows(const kvt_plan_state *p, int64_t bh, const float *x, int64_t xs, int m, int n);
void kvtr_lse_items(const kvt_plan_state *p, int64_t bh);
/* MASS: keeps the smallest prefix of pos[0..count) (candidates, by descending re[pos]) holding tau
 * of every head's host mass, E [m, es] the candidates' exact logits; P: m * count floats, acc:
 * 2m doubles of scratch */
int kvtr_mass_cut(const kvt_plan_state *p, int64_t bh, int m, const float *E, int64_t es, const float *re,
                  int32_t *pos, int count, float *P, float *pairs, double *acc);
void kvtr_decide_attend(run_ctx *r, int64_t bh, int g0, int m, int cnt, int over_candidates, set_scratch z,
                        int tid);
void kvtr_attend_task(void *c, int64_t item, int tid);
void kvtr_select_collect_task(void *c, int64_t item, int tid);
void kvtr_kv_item_scored(run_ctx *r, int64_t bh, int tid);
void kvtr_select_task(void *c, int64_t s, int tid);

/* ---- kvt_run_attend.c ---- */
void kvtr_exact_logits(const kvt_plan_state *p, int layer, int b, int h, const int32_t *tok,
                       int cnt, const float *q, int G, float *E, int64_t es, int tid);
void kvtr_attend(run_ctx *r, int b, int h, int g0, int m, const float *X, const int32_t *sel,
                 int count, float *prob, float *acc, const void **rows, float *vscale, int tid);
void kvtr_write_empty(run_ctx *r, int64_t qh0, int m);
void kvtr_exact_task(void *c, int64_t item, int tid);
void kvtr_attend_chunk_task(void *c, int64_t item, int tid);
/* Softmax . V of m query heads over `len` tokens sel of (b, kv-head h), from their logits X (head g's
 * at X + g xs), into part [m, D + 1]: each head's normalized sums and, at [D], its lse. */
void kvtr_attend_part(const kvt_plan_state *p, int layer, int b, int h, int m, const float *X, int64_t xs,
                      const int32_t *sel, int len, float *prob, float *acc, const void **rows, float *vscale,
                      float *part);
/* Merge nparts (<= KVT_SPLIT_MAX) parts [nparts, m, D + 1] of m heads by LSE into out [m, D] and lse
 * [m]; a part of lse -inf (no tokens) weighs nothing, and with every part empty out is 0, lse -inf. */
void kvtr_merge_parts(const float *part, int nparts, int m, int D, float *out, float *lse);

/* ---- kvt_run_residual.c ---- */
void kvtr_mark_selection(const kvt_plan_state *p, int b, int h, int g0, const int32_t *sel, int count);
void kvtr_residual_task(void *c, int64_t item, int tid);
void kvtr_residual_merge_task(void *c, int64_t set, int tid);

#endif
