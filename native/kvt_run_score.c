/* kvt_run's score phase: the logits of every host token, per (request, kv-head,
 * token chunk), either exact or (int8 keys, and int4 keys whose scale groups are
 * whole 4-channel lanes, on an ISA with the kernel) from the int16 query, whose
 * preparation and error bound live here too. */
#include <math.h>
#include <string.h>
#include "kvt_run_internal.h"
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

/* Exact logits of tokens [t0, t1) of request b for query heads q[0..G) of kv-head h,
 * written to dst[g * ds + t]. */
void kvtr_score_range(const kvt_plan_state *p, int layer, int b, int h, int t0, int t1,
                      const float *q, int G, float *dst, int64_t ds) {
    const kvt_store *s = p->store;
    const int T = s->d.page_tokens;
    for (int t = t0; t < t1;) {
        int off = t % T, cnt = T - off < t1 - t ? T - off : t1 - t;
        int64_t lph = kvt_lph(s, layer, p->page_table[p->page_off[b] + t / T], h);
        if (s->chan_scales && t + cnt < t1) { /* the next page's keys and channel scales (pages lie apart) */
            const int64_t nx = kvt_lph(s, layer, p->page_table[p->page_off[b] + t / T + 1], h);
            const char *a = (const char *)kvt_kchan_ptr(s, nx), *k = (const char *)kvt_key_ptr(s, nx);
            for (int64_t o = 0; o < 4 * (int64_t)s->d.head_dim; o += 64) __builtin_prefetch(a + o);
            for (int64_t o = 0; o < (int64_t)T * s->key_tok; o += 64) __builtin_prefetch(k + o);
        }
        kvt_score_page(s, lph, off, cnt, q, G, dst + t, ds);
        t += cnt;
    }
    for (int g = 0; g < G; g++) apply_scale(dst + (int64_t)g * ds + t0, t1 - t0, p->sm_scale, p->soft_cap);
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

void kvtr_score_task(void *c, int64_t item, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int32_t *w = p->items + 4 * item;
    int b = w[0], h = w[1], D = p->store->d.head_dim;
    int64_t ds;
    float *dst = dst_rows(r, b, h, &ds);
    kvtr_score_range(p, r->layer, b, h, w[2], w[3], r->q + ((int64_t)b * p->Hq + (int64_t)h * p->G) * D,
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

/* running log-sum-exp of head logits y[0..n): max *m, sum of exp(y - *m) *s */
static inline void lse_acc(float *m, double *s, const float *y, int n) {
    float mx = *m;
    for (int i = 0; i < n; i++) mx = kvt_maxf(mx, y[i]);
    if (mx == -INFINITY) return;
    *s = *s * exp((double)*m - (double)mx) + kvt_k->sum_exp(y, n, mx, INFINITY);
    *m = mx;
}

/* Selection-stage scores (int16 query): per-head logits, or with `reduced` the
 * group max/mean, of tokens [t0, t1). Records the largest key scale seen, and
 * where the plan needs them each head's running log-sum-exp (item_lm, item_ls). */
void kvtr_score_task_q16(void *c, int64_t item, int tid) {
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
    float ksmax = 0.f, *lm = p->item_lm + item * G;
    double *ls = p->item_ls + item * G;
    const int want_lse = p->need_lse && !r->dst_stride;
    for (int g = 0; g < G && want_lse; g++) { lm[g] = -INFINITY; ls[g] = 0.0; }
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
        if (!direct && cap > 0.f)
            for (int g = 0; g < G; g++) kvt_k->soft_cap(loc + g * KVT_SEG, cnt, cap);
        if (want_lse)
            for (int g = 0; g < G; g++) lse_acc(lm + g, ls + g, od + g * ods, cnt);
        if (!direct) {
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
        if (atomic_fetch_sub_explicit(&p->bh_left[bh], 1, memory_order_acq_rel) == 1) kvtr_kv_item_scored(r, bh, tid);
    }
}

/* int16 selection query: q16 = round(q / scale) with scale = max|q| / kvt_q16_max(D);
 * q16s folds sm_scale in; qerr bounds the logit error per unit of key scale times
 * the largest key integer (see kvtr_q16_bound). int4 keys take the query in the
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

void kvtr_prepare_q16(kvt_plan_state *p, const float *q) {
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
float kvtr_q16_bound(const kvt_plan_state *p, int64_t bh, int64_t qh, int m, float theta) {
    float ksmax = 0.f, qe = 0.f;
    for (int64_t i = p->item_off[bh]; i < p->item_off[bh + 1]; i++) ksmax = kvt_maxf(ksmax, p->item_ksmax[i]);
    for (int g = 0; g < m; g++) qe = kvt_maxf(qe, p->qerr[qh + g]);
    const float kmax = p->store->d.key_format == KVT_KEY_INT4 ? 8.f : 127.f;
    return p->sm_scale * ksmax * kmax * qe + 1e-6f * (p->soft_cap + fabsf(theta)) + 1e-30f;
}
