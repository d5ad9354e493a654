/* kvt_run's residual (hgca.residual), after every set is attended: the host tokens
 * a selection left out, as one pseudo-token per summary chunk: the mean key and
 * value of the chunk's unselected tokens, whose logit stands for all of them (+ log
 * of their count). kvtr_residual_task (per part of a set's chunks) folds its chunks
 * into a partial softmax [m, D + 2] (running max, sum, weighted values);
 * kvtr_residual_merge_task (per set) merges the parts in order and then, by
 * log-sum-exp, with the out and lse the selection left. A whole chunk's means come
 * from the store's chunk sums less the selected tokens (or from its unselected
 * tokens, when those are fewer); the last chunk of a request that ends inside it,
 * from its unselected tokens. */
#include <math.h>
#include <string.h>
#include "kvt_run_internal.h"

static int is_set(const uint64_t *bits, int t) { return (int)((bits[t >> 6] >> (t & 63)) & 1); }

/* The residual's record of a set's selection (query heads g0.. of (b, h)): its
 * bitmap, which the residual work items read once every set is attended. */
void kvtr_mark_selection(const kvt_plan_state *p, int b, int h, int g0, const int32_t *sel, int count) {
    (void)g0;
    const int64_t set = (int64_t)b * p->Hkv + h;
    uint64_t *bits = p->res_bits + p->res_bits_off[set];
    memset(bits, 0, sizeof(uint64_t) * (size_t)(p->res_bits_off[set + 1] - p->res_bits_off[set]));
    for (int j = 0; j < count; j++) bits[sel[j] >> 6] |= (uint64_t)1 << (sel[j] & 63);
}

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
void kvtr_residual_task(void *c, int64_t item, int tid) {
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const kvt_store *s = p->store;
    const int32_t *w = p->res_items + 3 * item;
    const int m = p->G;
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

void kvtr_residual_merge_task(void *c, int64_t set, int tid) {
    (void)tid;
    run_ctx *r = c;
    kvt_plan_state *p = r->p;
    const int m = p->G, D = p->store->d.head_dim;
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
