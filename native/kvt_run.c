/* kvt_run and the single ops: score every host token (parallel over
 * (request, kv-head, token chunk)), then select and attend (parallel over
 * (request, kv-head)). The logits used to select are the logits attended. */
#include <math.h>
#include <string.h>
#include <time.h>
#include "kvt_engine_internal.h"
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

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

static void kv_item_scored(run_ctx *r, int64_t bh, int tid);
static void select_task(void *c, int64_t s, int tid);

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

static void apply_scale(float *x, int n, float sm, float cap) {
    if (cap > 0.f)
        for (int t = 0; t < n; t++) x[t] = cap * tanhf(x[t] * sm / cap);
    else
        for (int t = 0; t < n; t++) x[t] *= sm;
}

/* Exact logits of tokens [t0, t1) of request b for query heads q[0..G) of kv-head h,
 * written to dst[g * ds + t]. */
static void score_range(const kvt_plan_state *p, int layer, int b, int h, int t0, int t1,
                        const float *q, int G, float *dst, int64_t ds) {
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens;
    for (int t = t0; t < t1;) {
        int off = t % T, cnt = T - off < t1 - t ? T - off : t1 - t;
        int64_t lph = kvt_lph(s, layer, p->page_table[p->page_off[b] + t / T], h);
        kvt_score_page(s, lph, off, cnt, q, G, dst + t, ds);
        t += cnt;
    }
    for (int g = 0; g < G; g++) apply_scale(dst + (int64_t)g * ds + t0, t1 - t0, p->sm_scale, p->soft_cap);
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
static void exact_logits(const kvt_plan_state *p, int layer, int b, int h, const int32_t *tok,
                         int cnt, const float *q, int G, float *E, int64_t es, int tid) {
    const kvt_store *s = p->store;
    const tok_loc L = tok_locator(p, layer, b, h);
    const int64_t kb = s->key_tok, ns = s->kscale_tok;
    uint8_t *gk = (uint8_t *)(p->scratch + (int64_t)tid * p->scratch_floats + p->gather_off);
    float *gs = (float *)(gk + ((KVT_GATHER * kb + 3) & ~(int64_t)3));
    int pf = 0; /* candidates below pf are prefetched (key row and scales) */
    for (int j0 = 0; j0 < cnt; j0 += KVT_GATHER) {
        const int len = cnt - j0 < KVT_GATHER ? cnt - j0 : KVT_GATHER;
        for (int i = 0; i < len; i++) {
            for (; pf < j0 + i + 16 && pf < cnt; pf++) {
                const int64_t lph = tok_lph(&L, tok[pf]), o = tok_off(&L, tok[pf]);
                const char *a = (const char *)kvt_key_ptr(s, lph) + o * kb;
                for (int64_t x = 0; x < kb; x += 64) __builtin_prefetch(a + x);
                if (ns) __builtin_prefetch(kvt_kscale_ptr(s, lph) + o * ns);
            }
            const int t = tok[j0 + i];
            const int64_t lph = tok_lph(&L, t), o = tok_off(&L, t);
            copy_row(gk + i * kb, kvt_key_ptr(s, lph) + o * kb, kb);
            if (ns == 1) gs[i] = kvt_kscale_ptr(s, lph)[o];
            else if (ns) memcpy(gs + i * ns, kvt_kscale_ptr(s, lph) + o * ns, sizeof(float) * (size_t)ns);
        }
        kvt_score_rows(s, gk, ns ? gs : NULL, len, q, G, E + j0, es);
    }
    for (int g = 0; g < G; g++) apply_scale(E + (int64_t)g * es, cnt, p->sm_scale, p->soft_cap);
}

static float *dst_rows(const run_ctx *r, int b, int h, int64_t *ds) {
    const kvt_plan_state *p = r->p;
    if (r->dst_stride) {
        *ds = r->dst_stride;
        return r->dst + ((int64_t)b * p->Hq + (int64_t)h * p->G) * r->dst_stride;
    }
    *ds = p->ntok[b];
    return p->scores + p->score_off[b * p->Hkv + h];
}

static void score_task(void *c, int64_t item, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int32_t *w = p->items + 4 * item;
    int b = w[0], h = w[1], D = p->store->d.head_dim;
    int64_t ds;
    float *dst = dst_rows(r, b, h, &ds);
    score_range(p, r->layer, b, h, w[2], w[3], r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G) * D,
                p->G, dst, ds);
}

/* The largest of x[0..n) and 0 (max is exact in any order: 8 SSE lanes on x86-64). */
static inline float max_of(const float *x, int64_t n) {
    float m = 0.f;
    int64_t i = 0;
#if defined(__x86_64__)
    __m128 a = _mm_setzero_ps(), b = _mm_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        a = _mm_max_ps(a, _mm_loadu_ps(x + i));
        b = _mm_max_ps(b, _mm_loadu_ps(x + i + 4));
    }
    float l[4];
    _mm_storeu_ps(l, _mm_max_ps(a, b));
    m = kvt_maxf(kvt_maxf(l[0], l[1]), kvt_maxf(l[2], l[3]));
#endif
    for (; i < n; i++) m = kvt_maxf(m, x[i]);
    return m;
}

/* o[i] = max over g of loc[g * KVT_SEG + i], or their mean (summed in g order, then
 * times 1/G), i < cnt; restrict lets both loops vectorize, each element's arithmetic
 * in the same order as one at a time */
static void reduce_group(float *restrict o, const float *restrict loc, int G, int cnt, int mean) {
    for (int i = 0; i < cnt; i++) o[i] = loc[i];
    if (mean) {
        const float inv = 1.f / (float)G;
        for (int g = 1; g < G; g++) {
            const float *restrict lg = loc + (int64_t)g * KVT_SEG;
            for (int i = 0; i < cnt; i++) o[i] += lg[i];
        }
        for (int i = 0; i < cnt; i++) o[i] *= inv;
    } else {
        for (int g = 1; g < G; g++) {
            const float *restrict lg = loc + (int64_t)g * KVT_SEG;
            for (int i = 0; i < cnt; i++) o[i] = kvt_maxf(o[i], lg[i]);
        }
    }
}

/* Selection-stage scores (int16 query): per-head logits, or with `reduced` the
 * group max/mean, of tokens [t0, t1). Records the largest key scale seen. */
static void score_task_q16(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int32_t *w = p->items + 4 * item;
    const int b = w[0], h = w[1], t1 = w[3], G = p->G, D = s->d.head_dim, T = s->d.page_tokens;
    const float cap = p->soft_cap;
    const int i4 = s->d.key_format == KVT_KEY_INT4;
    const int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * G, rb = s->key_tok, ns = s->kscale_tok;
    const int16_t *q = p->q16 + qh0 * p->q16_stride;
    const float *qs = p->q16s + qh0;
    float *loc = p->scratch + (int64_t)tid * p->scratch_floats; /* [G, KVT_SEG] */
    int64_t ds = 0;
    float *dst = r->reduced ? p->scores + p->score_off[b * p->Hkv + h] : dst_rows(r, b, h, &ds);
    float ksmax = 0.f;
    for (int t = w[2]; t < t1;) {
        int off = t % T, cnt = T - off < t1 - t ? T - off : t1 - t;
        if (cnt > KVT_SEG) cnt = KVT_SEG;
        int64_t lph = kvt_lph(s, r->layer, p->page_table[p->page_off[b] + t / T], h);
        const uint8_t *kp = kvt_key_ptr(s, lph) + (int64_t)off * rb;
        const float *ks = kvt_kscale_ptr(s, lph) + (int64_t)off * ns;
        ksmax = kvt_maxf(ksmax, max_of(ks, (int64_t)cnt * ns));
        /* the next segment of this item, for the kernel's prefetch */
        const uint8_t *next = NULL;
        int64_t next_bytes = 0;
        int tn = t + cnt;
        if (tn < t1) {
            int offn = tn % T, cn = T - offn < t1 - tn ? T - offn : t1 - tn;
            int64_t lphn = kvt_lph(s, r->layer, p->page_table[p->page_off[b] + tn / T], h);
            next = kvt_key_ptr(s, lphn) + (int64_t)offn * rb;
            next_bytes = (int64_t)(cn < KVT_SEG ? cn : KVT_SEG) * rb;
            const float *ksn = kvt_kscale_ptr(s, lphn) + (int64_t)offn * ns;
            for (int64_t i = 0; i < (int64_t)(cn < KVT_SEG ? cn : KVT_SEG) * ns; i += 16) __builtin_prefetch(ksn + i);
        }
        const int direct = !r->reduced && cap == 0.f; /* straight into the per-head rows */
        float *od = direct ? dst + t : loc;
        const int64_t ods = direct ? ds : KVT_SEG;
        if (i4)
            kvt_k->score_i4_q16(kp, ks, cnt, D, s->d.key_group, q, qs, G, od, ods, next, next_bytes);
        else
            kvt_k->score_i8_q16((const int8_t *)kp, ks, cnt, D, q, qs, G, od, ods, (const int8_t *)next,
                                next_bytes);
        if (!direct) {
            if (cap > 0.f)
                for (int g = 0; g < G; g++) kvt_k->soft_cap(loc + g * KVT_SEG, cnt, cap);
            if (!r->reduced) {
                for (int g = 0; g < G; g++)
                    memcpy(dst + g * ds + t, loc + g * KVT_SEG, sizeof(float) * (size_t)cnt);
            } else {
                reduce_group(dst + t, loc, G, cnt, p->reduce == KVT_REDUCE_MEAN);
            }
        }
        t += cnt;
    }
    p->item_ksmax[item] = ksmax;
    if (r->fused_select) { /* the last item of (b, h): every logit and key scale of its sets is in */
        const int64_t bh = (int64_t)b * p->Hkv + h;
        if (atomic_fetch_sub_explicit(&p->bh_left[bh], 1, memory_order_acq_rel) == 1) kv_item_scored(r, bh, tid);
    }
}

/* int16 selection query: q16 = round(q / scale) with scale = max|q| / kvt_q16_max(D);
 * q16s folds sm_scale in; qerr bounds the logit error per unit of key scale times
 * the largest key integer (see q16_bound). int4 keys take the query in the
 * kernel's nibble order (kvt_i4_q16_layout).
 * On x86-64 four channels at a time in SSE2 (in the baseline, so every build has it):
 * cvtps2dq rounds half to even as lrintf does in the default mode. The sums of |q -
 * scale * q16| and |q| then run in float lanes. Each term of the first is off by at
 * most 2^-24 * (|q_d| + scale) (the product's rounding) plus 2^-24 of itself (the
 * difference's), and a lane sum by (D / 4 + 4) * 2^-24 of itself, so the exact sum is
 * at most the float one times 1 + (D / 4 + 6) * 2^-24 <= 1 + 2^-15 (D <= 1024) plus
 * 2^-24 * (sum|q| + D * scale) <= 2^-23 * sum|q| (D * scale <= max|q|, as kvt_q16_max(D)
 * >= D); the same factor covers the float sum of |q| in the kernels' D * 2^-20 * sum|q|. */
static void q16_row(const float *x, int D, int qmax, int16_t *o, float *scale, float *err_out, float *l1_out) {
    float mx = 0.f, err = 0.f, l1 = 0.f;
#if defined(__x86_64__)
    const __m128 sign = _mm_set1_ps(-0.f);
    __m128 m4 = _mm_setzero_ps();
    for (int d = 0; d < D; d += 4) m4 = _mm_max_ps(m4, _mm_andnot_ps(sign, _mm_loadu_ps(x + d)));
    float ml[4];
    _mm_storeu_ps(ml, m4);
    for (int j = 0; j < 4; j++) mx = kvt_maxf(mx, ml[j]);
#else
    for (int d = 0; d < D; d++) mx = kvt_maxf(mx, fabsf(x[d]));
#endif
    const float sc = mx / (float)qmax, inv = sc > 0.f ? 1.f / sc : 0.f;
#if defined(__x86_64__)
    const __m128 vinv = _mm_set1_ps(inv), vsc = _mm_set1_ps(sc), lim = _mm_set1_ps((float)qmax);
    const __m128 nlim = _mm_set1_ps(-(float)qmax);
    __m128 e4 = _mm_setzero_ps(), l4 = _mm_setzero_ps();
    for (int d = 0; d < D; d += 4) {
        const __m128 xv = _mm_loadu_ps(x + d);
        const __m128i vi = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(xv, vinv), nlim), lim));
        _mm_storel_epi64((__m128i *)(o + d), _mm_packs_epi32(vi, vi));
        e4 = _mm_add_ps(e4, _mm_andnot_ps(sign, _mm_sub_ps(xv, _mm_mul_ps(vsc, _mm_cvtepi32_ps(vi)))));
        l4 = _mm_add_ps(l4, _mm_andnot_ps(sign, xv));
    }
    float el[4], ll[4];
    _mm_storeu_ps(el, e4);
    _mm_storeu_ps(ll, l4);
    for (int j = 0; j < 4; j++) {
        err += el[j];
        l1 += ll[j];
    }
#else /* one sum of D terms, not four lanes: in double, so the bound above holds here too */
    double errd = 0.0, l1d = 0.0;
    for (int d = 0; d < D; d++) {
        long v = lrintf(x[d] * inv);
        v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
        o[d] = (int16_t)v;
        errd += fabs((double)x[d] - (double)sc * (double)v);
        l1d += fabs((double)x[d]);
    }
    err = (float)errd;
    l1 = (float)l1d;
#endif
    *scale = sc;
    *err_out = err;
    *l1_out = l1;
}

static void prepare_q16(kvt_plan_state *p, const float *q) {
    const int D = p->store->d.head_dim, qmax = kvt_q16_max(D);
    const int i4 = p->store->d.key_format == KVT_KEY_INT4;
    int16_t row[1024];
    for (int64_t i = 0; i < (int64_t)p->B * p->Hq; i++) {
        float sc, err, l1;
        q16_row(q + i * D, D, qmax, i4 ? row : p->q16 + i * p->q16_stride, &sc, &err, &l1);
        if (i4) kvt_i4_q16_layout(row, D, p->q16 + i * p->q16_stride);
        p->q16s[i] = sc * p->sm_scale;
        const double up = 1.0 + 1.0 / 32768.0;
        p->qerr[i] = (float)((double)err * up + (double)l1 * up * (D / 1048576.0 + 1.0 / 8388608.0));
    }
    if (!i4 && kvt_k->q16_i8_layout)
        for (int64_t bh = 0; bh < (int64_t)p->B * p->Hkv; bh++)
            kvt_k->q16_i8_layout(p->q16 + bh * p->G * p->q16_stride, D, p->G);
}

/* Bound on |selection logit - exact logit| for one selection set; ksmax is the
 * largest key scale of the set's tokens (int4: of any group), qe the largest qerr.
 * With Δ_d = q_d - s·q16_d, the exact logit is sm Σ_d q_d c_d k_d and the selection
 * logit sm Σ_d s·q16_d c_d k_d, where k_d is the key integer and c_d its scale
 * (int8: the token's, int4: the scale of d's group). Their difference is
 * sm Σ_d Δ_d c_d k_d, at most sm · ksmax · kmax · Σ_d |Δ_d| with kmax = max|k_d|:
 * 127 for int8, 8 for int4 (a nibble holds -8..7; the store writes -7..7). Both
 * sums are taken in float: the integer dot products are exact, the rest is fewer
 * than D/16 + 8 float roundings of terms bounded by sm · ksmax · kmax · Σ|q_d|, far
 * inside the D·2^-20·Σ|q_d| that qerr adds. The soft cap x -> cap·tanh(x/cap) is
 * 1-Lipschitz, so it keeps the bound; its vectorized tanh is within a few ulp of
 * cap, and the k-th value within a few ulp of theta: the 1e-6 term. */
static float q16_bound(const kvt_plan_state *p, int64_t bh, int64_t qh, int m, float theta) {
    float ksmax = 0.f, qe = 0.f;
    for (int64_t i = p->item_off[bh]; i < p->item_off[bh + 1]; i++) ksmax = kvt_maxf(ksmax, p->item_ksmax[i]);
    for (int g = 0; g < m; g++) qe = kvt_maxf(qe, p->qerr[qh + g]);
    const float kmax = p->store->d.key_format == KVT_KEY_INT4 ? 8.f : 127.f;
    return p->sm_scale * ksmax * kmax * qe + 1e-6f * (p->soft_cap + fabsf(theta)) + 1e-30f;
}

static int is_set(const uint64_t *bits, int t) { return (int)((bits[t >> 6] >> (t & 63)) & 1); }

/* The residual's record of a set's selection (query heads g0.. of (b, h)): its
 * bitmap, which the residual work items read once every set is attended. */
static void mark_selection(const kvt_plan_state *p, int b, int h, int g0, const int32_t *sel, int count) {
    const int64_t set = ((int64_t)b * p->Hkv + h) * p->nsub + (p->nsub > 1 ? g0 : 0);
    uint64_t *bits = p->res_bits + p->res_bits_off[set];
    memset(bits, 0, sizeof(uint64_t) * (size_t)(p->res_bits_off[set + 1] - p->res_bits_off[set]));
    for (int j = 0; j < count; j++) bits[sel[j] >> 6] |= (uint64_t)1 << (sel[j] & 63);
}

/* softmax over the selection (X: [m, count] logits), then sum p * V */
static void attend(run_ctx *r, int b, int h, int g0, int m, const float *X, const int32_t *sel,
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
    if (p->residual) mark_selection(p, b, h, g0, sel, count);
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
            const uint16_t *c = kvt_summary_ptr(s, r->layer, pages[t / T], h) + (int64_t)((t % T) / S) * 2 * D;
            for (int d = 0; d < D; d++) {
                float lo = kvt_bf16_to_f32(c[d]), hi = kvt_bf16_to_f32(c[D + d]);
                mn[d] = first ? lo : kvt_minf(mn[d], lo);
                mx[d] = first ? hi : kvt_maxf(mx[d], hi);
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

/* rr[t] = max or mean over g < m of x[g * xs + t] (the order of operations is fixed) */
static void group_reduce(const kvt_plan_state *p, const float *x, int64_t xs, int m, int n, float *rr) {
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

static int find_i32(const int32_t *a, int n, int32_t v) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Per-thread scratch of one selection set, n = the request's host tokens. */
typedef struct {
    float *tmp, *re, *pairs, *E, *prob, *acc, *w;
    int32_t *cand, *pos, *sel;
} set_scratch;

static set_scratch set_scratch_at(const kvt_plan_state *p, float *sc, int n) {
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
    o.acc = (float *)(o.sel + n);
    o.w = o.acc + G * D;
    return o;
}

/* The exact logits of the candidates z.cand[0..cnt) (ascending) decide the top k;
 * MASS then keeps the smallest part of it reaching tau of the softmax mass, over
 * every host token when x holds their selection logits, else over the candidates. */
static void decide_attend(run_ctx *r, int64_t bh, int g0, int m, int cnt, float *x, set_scratch z, int tid) {
    kvt_plan_state *p = r->p;
    const int b = (int)(bh / p->Hkv), h = (int)(bh % p->Hkv), n = p->ntok[b];
    const int D = p->store->d.head_dim;
    const int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * p->G;
    exact_logits(p, r->layer, b, h, z.cand, cnt, r->q + (qh0 + g0) * D, m, z.E, cnt, tid);
    float *ex = z.E;
    if (m > 1) { group_reduce(p, z.E, cnt, m, cnt, z.re); ex = z.re; }
    int count = kvt_topk_indices(ex, cnt, p->budget[bh], z.tmp, z.pos);
    if (p->mode == KVT_SELECT_MASS && x) {
        for (int j = 0; j < count; j++) z.sel[j] = z.cand[z.pos[j]];
        for (int j = 0; j < cnt; j++) x[z.cand[j]] = ex[j];
        count = kvt_mass_cut(x, n, z.sel, count, p->tau, z.pairs);
        for (int j = 0; j < count; j++) z.pos[j] = find_i32(z.cand, cnt, z.sel[j]);
    } else if (p->mode == KVT_SELECT_MASS) {
        count = kvt_mass_cut(ex, cnt, z.pos, count, p->tau, z.pairs);
    }
    for (int j = 0; j < count; j++) z.sel[j] = z.cand[z.pos[j]];
    /* compact the exact logits of the selection in place (pos ascending, count <= cnt) */
    for (int g = 0; g < m; g++)
        for (int j = 0; j < count; j++) z.E[(int64_t)g * count + j] = z.E[(int64_t)g * cnt + z.pos[j]];
    attend(r, b, h, g0, m, z.E, z.sel, count, z.prob, z.acc, (const void **)z.pairs, z.tmp, tid);
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
        float cut = theta - 3.f * q16_bound(p, bh, qh0 + g0, m, theta);
        for (int t = 0; t < n; t++)
            if (x[t] >= cut) z.cand[cnt++] = t;
    }
    decide_attend(r, bh, g0, m, cnt, x, z, tid);
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
    const double want = ceil((double)p->prefilter * p->budget[bh] / S);
    return want < nc ? (int)want : 0;
}

/* Candidates from the chunk bounds ub [m, nc] (reduced over the set like the
 * logits, into red): the tokens of the best chunks, ascending. Returns their count. */
static int prefilter_pick(const kvt_plan_state *p, int64_t bh, int m, const float *ub, float *red, float *tmp,
                          int32_t *pos, int32_t *cand) {
    const int S = p->store->d.summary_tokens, n = p->ntok[bh / p->Hkv], nc = (n + S - 1) / S;
    const int want = prefilter_chunks(p, bh);
    int cnt = 0;
    if (!want) {
        for (int t = 0; t < n; t++) cand[t] = t;
        return n;
    }
    if (m > 1) { group_reduce(p, ub, nc, m, nc, red); ub = red; }
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
static void select_attend_prefilter(run_ctx *r, int64_t bh, int g0, int m, float *sc, int tid) {
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int b = (int)(bh / p->Hkv), h = (int)(bh % p->Hkv), n = p->ntok[b];
    const int D = s->d.head_dim, T = s->d.page_tokens;
    set_scratch z = set_scratch_at(p, sc, n);
    if (prefilter_chunks(p, bh)) {
        bound_query(r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G + g0) * D, m, D, z.w);
        chunk_bounds(p, r->layer, b, h, z.w, m, 0, (n + T - 1) / T, z.E);
    }
    int cnt = prefilter_pick(p, bh, m, z.E, z.re, z.tmp, z.pos, z.cand);
    decide_attend(r, bh, g0, m, cnt, NULL, z, tid);
}

/* empty request: out = 0, lse = -inf for query heads qh0 .. qh0 + m */
static void write_empty(run_ctx *r, int64_t qh0, int m) {
    const int D = r->p->store->d.head_dim;
    for (int g = 0; g < m; g++) {
        memset(r->out + (qh0 + g) * D, 0, sizeof(float) * (size_t)D);
        r->lse[qh0 + g] = -INFINITY;
        if (r->nsel) r->nsel[qh0 + g] = 0;
        if (r->sel_index)
            for (int j = 0; j < r->sel_cap; j++) r->sel_index[(qh0 + g) * r->sel_cap + j] = -1;
    }
}

static void attend_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int b = (int)(item / p->Hkv), h = (int)(item % p->Hkv), G = p->G, n = p->ntok[b];
    const int D = p->store->d.head_dim;
    int64_t qh0 = (int64_t)b * p->Hq + (int64_t)h * G;
    if (n == 0) {
        write_empty(r, qh0, G);
        return;
    }
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    float *L = p->scores + p->score_off[item];
    const int per_q = p->reduce == KVT_PER_QHEAD, m = per_q ? 1 : G;
    if (p->prefilter > 0.f) {
        for (int g0 = 0; g0 < G; g0 += m) select_attend_prefilter(r, item, g0, m, sc, tid);
        return;
    }
    if (r->q16) {
        for (int g0 = 0; g0 < G; g0 += m) select_attend_q16(r, item, g0, m, per_q ? L + (int64_t)g0 * n : L, sc, tid);
        return;
    }
    float *rr = sc, *tmp = rr + n, *pairs = tmp + n, *prob = pairs + 2 * (int64_t)n;
    int32_t *sel = (int32_t *)(prob + (int64_t)G * n);
    float *acc = (float *)(sel + n), *mnmx = acc + (int64_t)G * D, *X = mnmx + 2 * D;
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
            if (m > 1) { group_reduce(p, x, n, m, n, rr); x = rr; }
            count = kvt_topk_indices(x, n, k, tmp, sel);
            if (p->mode == KVT_SELECT_MASS) count = kvt_mass_cut(x, n, sel, count, p->tau, pairs);
        }
        for (int g = 0; g < m; g++)
            for (int j = 0; j < count; j++)
                X[(int64_t)g * count + j] = L[(int64_t)(g0 + g) * n + sel[j]];
        attend(r, b, h, g0, m, X, sel, count, prob, acc, (const void **)pairs, tmp, tid);
    }
}

/* ---- split select + attend (q16 path or prefilter, few selection sets) ----------
 * select_task (per set): k-th selection logit, candidate band (or the one-item
 * path when the band overflows the set's buffers), or the prefilter's candidates
 * (after bound_task); exact_task (per candidate chunk): exact logits, group reduce, MASS partial sums, and the last chunk of a
 * set picks the selection (finalize_set); attend_chunk_task (per chunk of the
 * selection): softmax and sum p.V of the chunk, the last chunk of a set merges
 * the partials by log-sum-exp. */
typedef struct {
    int32_t *cand, *pos, *sel;
    float *re, *E;
} set_bufs;

static set_bufs set_buffers(const kvt_plan_state *p, int64_t s) {
    int64_t c = p->set_cap[s];
    float *base = p->set_buf + p->set_off[s];
    set_bufs o = {(int32_t *)base, (int32_t *)base + c, (int32_t *)base + 2 * c, base + 3 * c, base + 4 * c};
    return o;
}

static int split_chunks(const kvt_plan_state *p, int len) {
    int nc = len / KVT_SPLIT_MIN;
    if (nc > p->split_want) nc = p->split_want;
    return nc < 1 ? 1 : nc;
}

/* set s -> (b, h, g0), its kv item bh and its first query head */
static void set_coords(const kvt_plan_state *p, int64_t s, int *b, int *h, int *g0, int64_t *bh,
                       int64_t *qh0) {
    const int m = p->nsub > 1 ? 1 : p->G;
    *bh = s / p->nsub;
    *b = (int)(*bh / p->Hkv);
    *h = (int)(*bh % p->Hkv);
    *g0 = (int)(s % p->nsub) * m;
    *qh0 = (int64_t)*b * p->Hq + (int64_t)*h * p->G + *g0;
}

static float *set_logits(const kvt_plan_state *p, int64_t bh, int g0, int n) {
    return p->scores + p->score_off[bh] + (p->nsub > 1 ? (int64_t)g0 * n : 0);
}

/* ---- the candidate band of a long set, in parallel (q16 split path) ----
 * select_lo_task (per set): a lower bound lo of the k-th selection logit
 * (kvt_sampled_floor, as kvt_kth_value takes it), and how many token ranges to
 * collect; select_collect_task (per set and range): the range's tokens at or above
 * lo, in order, into the range's share of the set's candidate buffer. select_task
 * then takes the exact k-th logit among them and cuts the band from them; when a
 * share overflowed, fewer than k were found, or the band reaches below lo, it
 * scans every token as before. Either way the band is the same. */
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
    if (!kvt_sampled_floor(set_logits(p, bh, g0, n), n, p->budget[bh], p->scratch + (int64_t)tid * p->scratch_floats,
                           &st->lo))
        return;
    const int nr = n / KVT_LO_RANGE; /* >= 2: the floor needs n >= 4096 */
    st->nlo = nr < p->split_want ? nr : p->split_want;
}

static void select_collect_task(void *c, int64_t item, int tid) {
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
    const float *x = set_logits(p, bh, g0, n), lo = st->lo;
    int32_t *dst = set_buffers(p, s).cand + (int64_t)ri * share;
    int found = 0;
    for (int t = t0; t < t1; t++) {
        if (found == share) { found = -1; break; }
        dst[found] = t; /* branch-free: kept when at or above lo */
        found += x[t] >= lo;
    }
    st->nlo_found[ri] = found;
    if (r->fused_select && atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1)
        select_task(r, s, tid); /* the set's last range: its band */
}

/* Fused select (q16 split path), once every logit of kv item bh is in: each of its
 * sets' sampled floor; a set with ranges to collect is selected by the last of them
 * (st->left counts them), any other at once. */
static void kv_item_scored(run_ctx *r, int64_t bh, int tid) {
    kvt_plan_state *p = r->p;
    for (int64_t s = bh * p->nsub; s < (bh + 1) * p->nsub; s++) {
        kvt_set_state *st = &p->sets[s];
        select_lo_task(r, s, tid);
        if (st->nlo == 0) select_task(r, s, tid);
        else atomic_store_explicit(&st->left, st->nlo, memory_order_relaxed);
    }
}

/* The band from the tokens select_collect_task found: their count, or -1 when the
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
    *cut = theta - 3.f * q16_bound(p, bh, qh0, m, theta);
    if (*cut < st->lo) return -1;
    int cnt = 0;
    for (int i = 0; i < c; i++) {
        cand[cnt] = cand[i];
        cnt += x[cand[i]] >= *cut;
    }
    return cnt;
}

static void select_task(void *c, int64_t s, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int m = p->nsub > 1 ? 1 : p->G;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    st->nce = st->nca = 0;
    const int n = p->ntok[b], k = p->budget[bh];
    if (n == 0) {
        write_empty(r, qh0, m);
        return;
    }
    float *x = set_logits(p, bh, g0, n), *sc = p->scratch + (int64_t)tid * p->scratch_floats;
    set_bufs sb = set_buffers(p, s);
    const int cap = p->set_cap[s];
    int cnt = 0;
    float cut = -INFINITY;
    if (p->prefilter > 0.f) { /* candidates from the chunk bounds; MASS over them (cut = -inf) */
        cnt = prefilter_pick(p, bh, m, p->pf_ub + p->pf_off[s], sc, sc + n, (int32_t *)(sc + 2 * (int64_t)n),
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
        cut = theta - 3.f * q16_bound(p, bh, qh0, m, theta);
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

static void finalize_set(run_ctx *r, int64_t s, int tid) {
    kvt_plan_state *p = r->p;
    const int m = p->nsub > 1 ? 1 : p->G;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    float *sc = p->scratch + (int64_t)tid * p->scratch_floats, *pairs = sc + p->ntok[b];
    const int cnt = st->cnt;
    int count = kvt_topk_indices(sb.re, cnt, p->budget[bh], sc, sb.pos);
    if (p->mode == KVT_SELECT_MASS) {
        float M = -INFINITY;
        for (int i = 0; i < st->nce; i++) M = kvt_maxf(M, st->cm[i]);
        double z = 0.0;
        for (int i = 0; i < st->nce; i++) {
            z += st->cs[i] * exp((double)st->cm[i] - (double)M);
            if (st->ns[i] > 0.0) z += st->ns[i] * exp((double)st->cut - (double)M);
        }
        count = kvt_mass_keep(sb.re, sb.pos, count, p->tau, M, z, pairs);
    }
    for (int j = 0; j < count; j++) sb.sel[j] = sb.cand[sb.pos[j]];
    /* compact the exact logits of the selection in place (pos ascending, count <= cnt) */
    for (int g = 0; g < m; g++)
        for (int j = 0; j < count; j++) sb.E[(int64_t)g * count + j] = sb.E[(int64_t)g * cnt + sb.pos[j]];
    st->count = count;
    st->nca = split_chunks(p, count);
    atomic_store_explicit(&st->left, st->nca, memory_order_relaxed);
}

static void exact_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int64_t s = p->work[2 * item];
    const int ci = p->work[2 * item + 1], m = p->nsub > 1 ? 1 : p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    const int cnt = st->cnt, n = p->ntok[b];
    const int c0 = (int)((int64_t)ci * cnt / st->nce), c1 = (int)((int64_t)(ci + 1) * cnt / st->nce);
    const int len = c1 - c0;
    exact_logits(p, r->layer, b, h, sb.cand + c0, len, r->q + qh0 * D, m, sb.E + c0, cnt, tid);
    if (m > 1) group_reduce(p, sb.E + c0, cnt, m, len, sb.re + c0);
    else memcpy(sb.re + c0, sb.E + c0, sizeof(float) * (size_t)len);
    if (p->mode == KVT_SELECT_MASS) {
        float cm = -INFINITY;
        for (int j = c0; j < c1; j++) cm = kvt_maxf(cm, sb.re[j]);
        st->cm[ci] = cm;
        st->cs[ci] = len > 0 ? kvt_k->sum_exp(sb.re + c0, len, cm, INFINITY) : 0.0;
        const int t0 = (int)((int64_t)ci * n / st->nce), t1 = (int)((int64_t)(ci + 1) * n / st->nce);
        st->ns[ci] = st->cut > -INFINITY ? kvt_k->sum_exp(set_logits(p, bh, g0, n) + t0, t1 - t0, st->cut, st->cut)
                                         : 0.0;
    }
    if (atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1) finalize_set(r, s, tid);
}

static void merge_set(run_ctx *r, int64_t s, int tid) {
    kvt_plan_state *p = r->p;
    const int m = p->nsub > 1 ? 1 : p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, s, &b, &h, &g0, &bh, &qh0);
    const kvt_set_state *st = &p->sets[s];
    set_bufs sb = set_buffers(p, s);
    const float *part = p->part + s * KVT_SPLIT_MAX * m * (D + 1);
    for (int g = 0; g < m; g++) {
        float L = -INFINITY, w[KVT_SPLIT_MAX];
        for (int i = 0; i < st->nca; i++) L = kvt_maxf(L, part[((int64_t)i * m + g) * (D + 1) + D]);
        double S = 0.0;
        for (int i = 0; i < st->nca; i++) {
            w[i] = expf(part[((int64_t)i * m + g) * (D + 1) + D] - L);
            S += w[i];
        }
        float inv = (float)(1.0 / S), *o = r->out + (qh0 + g) * D;
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int i = 0; i < st->nca; i++) {
            const float *a = part + ((int64_t)i * m + g) * (D + 1), wi = w[i] * inv;
            for (int d = 0; d < D; d++) o[d] += wi * a[d];
        }
        r->lse[qh0 + g] = L + (float)log(S);
        if (r->nsel) r->nsel[qh0 + g] = st->count;
        if (r->sel_index && r->sel_cap > 0) {
            int32_t *os = r->sel_index + (qh0 + g) * r->sel_cap;
            int cc = st->count < r->sel_cap ? st->count : r->sel_cap;
            memcpy(os, sb.sel, sizeof(int32_t) * (size_t)cc);
            for (int j = cc; j < r->sel_cap; j++) os[j] = -1;
        }
    }
    if (p->residual) mark_selection(p, b, h, g0, sb.sel, st->count);
}

static void attend_chunk_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const kvt_store *st_ = p->store;
    const int64_t s = p->work[2 * item];
    const int ci = p->work[2 * item + 1], m = p->nsub > 1 ? 1 : p->G, D = st_->d.head_dim;
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
        attend(r, b, h, g0, m, sb.E, sb.sel, count, prob, acc, rows, vscale, tid);
        return;
    }
    const int j0 = (int)((int64_t)ci * count / st->nca), j1 = (int)((int64_t)(ci + 1) * count / st->nca);
    const int len = j1 - j0;
    float *part = p->part + ((s * KVT_SPLIT_MAX + ci) * m) * (D + 1);
    for (int g = 0; g < m; g++)
        part[(int64_t)g * (D + 1) + D] = kvt_k->softmax(sb.E + (int64_t)g * count + j0, len, prob + (int64_t)g * len);
    const tok_loc L = tok_locator(p, r->layer, b, h);
    const int is_i8 = st_->d.value_format == KVT_VAL_INT8;
    for (int j = 0; j < len; j++) {
        const int tok = sb.sel[j0 + j];
        const int64_t lph = tok_lph(&L, tok), o = tok_off(&L, tok);
        rows[j] = kvt_val_ptr(st_, lph) + o * st_->val_tok;
        if (is_i8) vscale[j] = kvt_vscale_ptr(st_, lph)[o];
    }
    memset(acc, 0, sizeof(float) * (size_t)m * D);
    kvt_k->accum_rows(rows, vscale, is_i8, len, D, prob, len, m, acc);
    for (int g = 0; g < m; g++) memcpy(part + (int64_t)g * (D + 1), acc + (int64_t)g * D, sizeof(float) * (size_t)D);
    if (atomic_fetch_sub_explicit(&st->left, 1, memory_order_acq_rel) == 1) merge_set(r, s, tid);
}

/* split prefilter: the chunk bounds of a part of a set's pages */
static void bound_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int32_t *w = p->pf_items + 3 * item;
    const int m = p->nsub > 1 ? 1 : p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, w[0], &b, &h, &g0, &bh, &qh0);
    if (!prefilter_chunks(p, bh)) return; /* also an empty request */
    float *q = p->scratch + (int64_t)tid * p->scratch_floats;
    bound_query(r->q + qh0 * D, m, D, q);
    chunk_bounds(p, r->layer, b, h, q, m, w[1], w[2], p->pf_ub + p->pf_off[w[0]]);
}

/* ---- residual (hgca.residual), after every set is attended -------------------
 * The host tokens a selection left out, as one pseudo-token per summary chunk: the
 * mean key and value of the chunk's unselected tokens, whose logit stands for all of
 * them (+ log of their count). residual_task (per part of a set's chunks) folds its
 * chunks into a partial softmax [m, D + 2] (running max, sum, weighted values);
 * residual_merge_task (per set) merges the parts in order and then, by log-sum-exp,
 * with the out and lse the selection left. A whole chunk's means come from the
 * store's chunk sums less the selected tokens (or from its unselected tokens, when
 * those are fewer); the last chunk of a request that ends inside it, from its
 * unselected tokens. */
/* The chunk's unselected tokens' key (part 0) or value (part 1) sum: the store's
 * chunk sum when every token is unselected, else the sum less the selected rows (at
 * least half unselected) or the unselected rows alone, written to buf. */
static const float *chunk_part_sum(const kvt_store *s, const uint64_t *bits, const float *cs, int64_t lph,
                                   int c0, int c1, int nu, int part, float *buf, float *row) {
    const int T = s->d.page_tokens, S = s->d.summary_tokens, D = s->d.head_dim;
    const int from_sums = c1 - c0 == S && 2 * nu > S;
    if (from_sums && nu == c1 - c0) return cs + (int64_t)part * D;
    if (from_sums) memcpy(buf, cs + (int64_t)part * D, sizeof(float) * (size_t)D);
    else memset(buf, 0, sizeof(float) * (size_t)D);
    const float sign = from_sums ? -1.f : 1.f;
    for (int t = c0; t < c1; t++) {
        if (is_set(bits, t) != from_sums) continue;
        if (part == 0) kvt_dequant_key_row(s, lph, t % T, row);
        else kvt_dequant_value_row(s, lph, t % T, row);
        for (int d = 0; d < D; d++) buf[d] += sign * row[d];
    }
    return buf;
}

/* pages of chunk sums prefetched ahead of the residual's pass */
#define KVT_RES_PF_PAGES 4

/* One pass over the item's chunks with a running maximum per head: the accumulated
 * values are rescaled only when a chunk's logit exceeds it. */
static void residual_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int32_t *w = p->res_items + 3 * item;
    const int m = p->nsub > 1 ? 1 : p->G;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, w[0], &b, &h, &g0, &bh, &qh0);
    const int T = s->d.page_tokens, S = s->d.summary_tokens, D = s->d.head_dim, n = p->ntok[b];
    const int np = (n + T - 1) / T;
    const int64_t page_bytes = (int64_t)(T / S) * 2 * D * sizeof(float);
    const uint64_t *bits = p->res_bits + p->res_bits_off[w[0]];
    float *buf = p->scratch + (int64_t)tid * p->scratch_floats + p->res_off, *row = buf + D, *lg = row + D;
    float *M = p->res_part + item * p->res_part_floats, *L = M + m, *acc = L + m;
    for (int g = 0; g < m; g++) { M[g] = -INFINITY; L[g] = 0.f; }
    memset(acc, 0, sizeof(float) * (size_t)m * D);
    const float *q = r->q + qh0 * D;
    const int32_t *pages = p->page_table + p->page_off[b];
    /* a page's sums are a few KB, pages apart in memory (pages in any order): prefetch ahead */
    const int pi0 = w[1] * S / T, pi1 = (w[2] * S + T - 1) / T;
    for (int pi = pi0; pi < pi0 + KVT_RES_PF_PAGES && pi < pi1 && pi < np; pi++) {
        const char *a = (const char *)kvt_chunk_sums_ptr(s, r->layer, pages[pi], h);
        for (int64_t o = 0; o < page_bytes; o += 64) __builtin_prefetch(a + o);
    }
    for (int ci = w[1]; ci < w[2]; ci++) {
        const int c0 = ci * S, c1 = c0 + S < n ? c0 + S : n;
        const int pi = c0 / T;
        if (c0 % T == 0 && pi + KVT_RES_PF_PAGES < pi1 && pi + KVT_RES_PF_PAGES < np) {
            const char *a = (const char *)kvt_chunk_sums_ptr(s, r->layer, pages[pi + KVT_RES_PF_PAGES], h);
            for (int64_t o = 0; o < page_bytes; o += 64) __builtin_prefetch(a + o);
        }
        int nu = c1 - c0;
        for (int t = c0; t < c1; t++) nu -= is_set(bits, t);
        if (nu == 0) continue;
        const int64_t lph = kvt_lph(s, r->layer, pages[pi], h);
        const float *cs = kvt_chunk_sums_ptr(s, r->layer, pages[pi], h) + (int64_t)((c0 % T) / S) * 2 * D;
        const float *ks = chunk_part_sum(s, bits, cs, lph, c0, c1, nu, 0, buf, row);
        const float inv = 1.f / (float)nu, lc = logf((float)nu);
        kvt_k->dot_f32(ks, D, q, m, p->sm_scale * inv, lg);
        for (int g = 0; g < m; g++) {
            float x = lg[g];
            if (p->soft_cap > 0.f) x = p->soft_cap * tanhf(x / p->soft_cap);
            x += lc;
            float e = 1.f;
            if (x > M[g]) {
                if (L[g] > 0.f) { /* a new maximum: rescale what is summed so far */
                    const float sc = expf(M[g] - x);
                    float *a = acc + (int64_t)g * D;
                    for (int d = 0; d < D; d++) a[d] *= sc;
                    L[g] *= sc;
                }
                M[g] = x;
            } else {
                e = expf(x - M[g]);
            }
            L[g] += e;
            lg[g] = e * inv;
        }
        kvt_k->axpy_f32(chunk_part_sum(s, bits, cs, lph, c0, c1, nu, 1, buf, row), D, lg, m, acc);
    }
}

static void residual_merge_task(void *c, int64_t set, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int m = p->nsub > 1 ? 1 : p->G, D = p->store->d.head_dim;
    int b, h, g0;
    int64_t bh, qh0;
    set_coords(p, set, &b, &h, &g0, &bh, &qh0);
    const int64_t i0 = p->res_item_off[set], i1 = p->res_item_off[set + 1], pf = p->res_part_floats;
    for (int g = 0; g < m; g++) {
        float Mx = -INFINITY;
        for (int64_t i = i0; i < i1; i++) {
            const float *part = p->res_part + i * pf;
            if (part[m + g] > 0.f) Mx = kvt_maxf(Mx, part[g]);
        }
        if (Mx == -INFINITY) continue; /* every token selected, or none on the host */
        float Lx = 0.f;
        for (int64_t i = i0; i < i1; i++) {
            const float *part = p->res_part + i * pf;
            if (part[m + g] > 0.f) Lx += part[m + g] * expf(part[g] - Mx);
        }
        float *o = r->out + (qh0 + g) * D, le = r->lse[qh0 + g];
        const float R = Mx + logf(Lx), hi = le > R ? le : R;
        const float a0 = le == -INFINITY ? 0.f : expf(le - hi), a1 = expf(R - hi), z = a0 + a1;
        const float c0 = a0 / z, c1 = a1 / (z * Lx);
        for (int d = 0; d < D; d++) o[d] *= c0;
        for (int64_t i = i0; i < i1; i++) {
            const float *part = p->res_part + i * pf;
            const float wi = c1 * expf(part[g] - Mx);
            if (part[m + g] > 0.f) kvt_k->axpy_f32(part + 2 * m + (int64_t)g * D, D, &wi, 1, o);
        }
        r->lse[qh0 + g] = hi + logf(z);
    }
}

enum { ITEMS_COLLECT, ITEMS_EXACT, ITEMS_ATTEND };

/* (set, part) work items of a phase: the band's token ranges (select_collect_task),
 * the candidate chunks (exact_task) or the selection's chunks (attend_chunk_task) */
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

/* The int16-query path applies to int8 keys, and int4 keys whose groups are whole
 * 4-channel lanes, on an ISA that has the kernel; the modes that attend to every
 * token or score blocks use exact logits only. */
static int use_q16(const kvt_plan_state *p, int for_run) {
    const kvt_store_desc *d = &p->store->d;
    int ok = d->key_format == KVT_KEY_INT8 ? kvt_k->score_i8_q16 != NULL
           : d->key_format == KVT_KEY_INT4 ? kvt_k->score_i4_q16 && kvt_i4_q16_ok(d->head_dim, d->key_group)
           : 0;
    if (!ok) return 0;
    return !for_run || ((p->mode == KVT_SELECT_TOPK || p->mode == KVT_SELECT_MASS) && p->prefilter == 0.f);
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

int32_t kvt_run(int32_t eh, int32_t layer, const float *q, float *out, float *lse,
                int32_t *n_selected, int32_t *sel_index, int32_t sel_cap) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    if (!q || !out || !lse) return kvt_err(KVT_ERR_VALUE, "kvt_run: expected q, out and lse buffers, got NULL");
    if (sel_index && sel_cap <= 0)
        return kvt_err(KVT_ERR_VALUE, "kvt_run: expected sel_cap > 0 with sel_index, got %d", sel_cap);
    const int64_t t_call = now_ns();
    pthread_mutex_lock(&e->mu);
    int32_t rc = check_ready(e, layer, "kvt_run");
    if (rc == KVT_OK) {
        kvt_plan_state *p = &e->plan;
        run_ctx r = {p, layer, q, out, lse, n_selected, sel_index, sel_index ? sel_cap : 0,
                     use_q16(p, 1), p->reduce != KVT_PER_QHEAD && p->G > 1, NULL, 0, 0};
        if (r.q16) {
            const int64_t t0 = e->trace ? now_ns() : 0;
            prepare_q16(p, q);
            r.fused_select = p->split;
            if (r.fused_select)
                for (int64_t bh = 0; bh < (int64_t)p->B * p->Hkv; bh++)
                    atomic_store_explicit(&p->bh_left[bh], (int)(p->item_off[bh + 1] - p->item_off[bh]),
                                          memory_order_relaxed);
            if (e->trace) e->phase_ns[KVT_PHASE_QUERY] += now_ns() - t0;
            phase(e, KVT_PHASE_SCORE, p->n_items, score_task_q16, &r);
        } else if (p->mode != KVT_SELECT_BLOCKS && p->prefilter == 0.f) {
            phase(e, KVT_PHASE_SCORE, p->n_items, score_task, &r);
        }
        if (p->prefilter > 0.f && p->split) {
            phase(e, KVT_PHASE_BOUND, p->n_pf_items, bound_task, &r);
            phase(e, KVT_PHASE_SELECT, p->n_sets, select_task, &r);
            phase(e, KVT_PHASE_EXACT, split_items(p, ITEMS_EXACT), exact_task, &r);
            phase(e, KVT_PHASE_ATTEND, split_items(p, ITEMS_ATTEND), attend_chunk_task, &r);
        } else if (r.q16 && p->split) {
            /* the score phase took each set's floor (and the band of sets without ranges to
             * collect); a request without host tokens had no score items: its sets here */
            for (int64_t bh = 0; bh < (int64_t)p->B * p->Hkv; bh++)
                if (p->item_off[bh + 1] == p->item_off[bh]) kv_item_scored(&r, bh, 0);
            phase(e, KVT_PHASE_SELECT, split_items(p, ITEMS_COLLECT), select_collect_task, &r);
            phase(e, KVT_PHASE_EXACT, split_items(p, ITEMS_EXACT), exact_task, &r);
            phase(e, KVT_PHASE_ATTEND, split_items(p, ITEMS_ATTEND), attend_chunk_task, &r);
        } else {
            phase(e, KVT_PHASE_ATTEND, (int64_t)p->B * p->Hkv, attend_task, &r);
        }
        if (p->residual) {
            phase(e, KVT_PHASE_RESIDUAL, p->n_res_items, residual_task, &r);
            phase(e, KVT_PHASE_RESIDUAL_MERGE, p->n_sets, residual_merge_task, &r);
        }
    }
    if (e->trace && rc == KVT_OK) {
        e->phase_ns[KVT_PHASE_CALL] += now_ns() - t_call;
        e->traced_runs++;
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int32_t kvt_engine_trace(int32_t eh, int32_t on) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    pthread_mutex_lock(&e->mu);
    if (on) {
        memset(e->phase_ns, 0, sizeof e->phase_ns);
        e->traced_runs = 0;
    }
    e->trace = on != 0;
    pthread_mutex_unlock(&e->mu);
    return KVT_OK;
}

int32_t kvt_engine_phase_times(int32_t eh, int64_t *ns, int32_t n, int64_t *runs) {
    kvt_engine *e = kvt_engine_get(eh);
    if (!e) return KVT_ERR_HANDLE;
    if (!ns || !runs || n < 0 || n > KVT_N_PHASES)
        return kvt_err(KVT_ERR_VALUE, "kvt_engine_phase_times: expected ns, runs and n in [0, %d], got n=%d",
                       KVT_N_PHASES, n);
    pthread_mutex_lock(&e->mu);
    memcpy(ns, e->phase_ns, sizeof(int64_t) * (size_t)n);
    *runs = e->traced_runs;
    pthread_mutex_unlock(&e->mu);
    return KVT_OK;
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
        run_ctx r = {p, layer, q, NULL, NULL, NULL, NULL, 0, use_q16(p, 0), 0, scores, n_max};
        if (r.q16) {
            prepare_q16(p, q);
            kvt_pool_run(e->pool, p->n_items, score_task_q16, &r);
        } else {
            kvt_pool_run(e->pool, p->n_items, score_task, &r);
        }
        for (int64_t i = 0; i < (int64_t)p->B * p->Hq; i++)
            for (int t = p->ntok[i / p->Hq]; t < n_max; t++) scores[i * n_max + t] = -INFINITY;
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
