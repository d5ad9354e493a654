/* Token selection: quickselect-based top-k (O(n), no full sort, branch-free
 * partitions) and the softmax-mass cut of every query head of a set. */
#include <math.h>
#include <stdlib.h>
#include "kvt_engine_internal.h"

static inline float med3(float a, float b, float c) {
    if (a > b) { float t = a; a = b; b = t; }
    if (b > c) b = c;
    return a > b ? a : b;
}

/* Moves the values of a[lo..hi] above pv (or, with ge, at or above it) to the
 * front; returns the end of them. Branch-free: a swap with itself costs less than
 * the mispredicted branches of a classic partition on random scores. */
static int partition_front(float *a, int lo, int hi, float pv, int ge) {
    int j = lo;
    for (int i = lo; i <= hi; i++) {
        const float x = a[i];
        const int up = ge ? x >= pv : x > pv;
        a[i] = a[j];
        a[j] = x;
        j += up;
    }
    return j;
}

/* k-th largest (1-based) of a[0..n); reorders a. */
float kvt_kth_largest(float *a, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;
    while (hi - lo >= 16) {
        const float pv = med3(a[lo], a[lo + (hi - lo) / 2], a[hi]);
        const int gt = partition_front(a, lo, hi, pv, 0);
        if (want < gt) { hi = gt - 1; continue; }
        const int ge = partition_front(a, gt, hi, pv, 1); /* > gt: pv is in the range */
        if (want < ge || ge == gt) return pv; /* ge == gt only for a NaN pivot: no hang */
        lo = ge;
    }
    for (int i = lo + 1; i <= hi; i++) { /* insertion sort, descending */
        float x = a[i];
        int j = i - 1;
        while (j >= lo && a[j] < x) { a[j + 1] = a[j]; j--; }
        a[j + 1] = x;
    }
    return a[want];
}

int kvt_sampled_floor(const float *r, int n, int k, float *vals, float *lo) {
    if (n < 4096 || k >= n) return 0;
    const int s = 1024, stride = n / s;
    for (int i = 0; i < s; i++) vals[i] = r[(int64_t)i * stride];
    double e = (double)k * s / n;
    int j = (int)(e + 4.0 * sqrt(e) + 8.0);
    if (j >= s) return 0;
    *lo = kvt_kth_largest(vals, s, j);
    return 1;
}

/* Long arrays: only the values at or above the sampled floor go through the
 * select. Falls back to the whole array when the floor holds fewer than k values,
 * so the result is always exact. Worth it up to budgets of most of the array
 * (k = n/4 still leaves a third of it). */
float kvt_kth_value(const float *r, int n, int k, float *vals) {
    float lo;
    if (kvt_sampled_floor(r, n, k, vals, &lo)) {
        int c = 0;
        for (int t = 0; t < n; t++) { /* branch-free collection */
            vals[c] = r[t];
            c += r[t] >= lo;
        }
        if (c >= k) return kvt_kth_largest(vals, c, k);
    }
    for (int t = 0; t < n; t++) vals[t] = r[t];
    return kvt_kth_largest(vals, n, k);
}

int kvt_topk_indices(const float *r, int n, int k, float *tmp, int32_t *out) {
    if (k <= 0) return 0; /* plans clamp budgets to [1, n]; never a negative rank below */
    if (k >= n) {
        for (int t = 0; t < n; t++) out[t] = t;
        return n;
    }
    float thr = kvt_kth_value(r, n, k, tmp);
    int above = 0;
    for (int t = 0; t < n; t++) above += r[t] > thr;
    /* branch-free: each index is written at out[c] (c < k), and c moves on only
     * when it is kept; ties at the threshold fill up to k in token order */
    int ties = k - above, c = 0;
    for (int t = 0; t < n && c < k; t++) {
        const int eq = r[t] == thr, keep = (r[t] > thr) | (eq & (ties > 0));
        out[c] = t;
        c += keep;
        ties -= eq & keep;
    }
    return c;
}

typedef struct { float v; int32_t i; } pair_t;

static int by_value_desc(const void *a, const void *b) {
    float x = ((const pair_t *)a)->v, y = ((const pair_t *)b)->v;
    return (x < y) - (x > y);
}

/* partition_front on pairs: those of pr[lo..hi) above pv (or at or above it) first */
static int partition_pairs(pair_t *pr, int lo, int hi, float pv, int ge) {
    int j = lo;
    for (int i = lo; i < hi; i++) {
        const pair_t x = pr[i];
        const int up = ge ? x.v >= pv : x.v > pv;
        pr[i] = pr[j];
        pr[j] = x;
        j += up;
    }
    return j;
}

/* acc[g] += sum of P[g * ps + pr[i].i] over i in [lo, hi) */
static void add_heads(const pair_t *pr, int lo, int hi, const float *P, int64_t ps, int G, double *acc) {
    for (int g = 0; g < G; g++) {
        const float *pg = P + (int64_t)g * ps;
        double a = 0.0;
        for (int i = lo; i < hi; i++) a += pg[pr[i].i];
        acc[g] += a;
    }
}

static int all_reach(const double *acc, const double *add, int G, double need) {
    for (int g = 0; g < G; g++)
        if (acc[g] + (add ? add[g] : 0.0) < need) return 0;
    return 1;
}

/* A selection by mass, not a sort, as a quickselect: each round splits the range at a
 * pivot; the part above it either brings every head to tau (the answer is inside it) or
 * is kept whole and the search goes on below. Values equal to the pivot count one by
 * one. Expected O(G * count). */
int kvt_mass_keep_heads(const float *r, int32_t *idx, int count, const float *P, int64_t ps, int G, float tau,
                        float *pairs, double *acc2) {
    if (count == 0) return 0;
    pair_t *pr = (pair_t *)pairs;
    for (int j = 0; j < count; j++) { pr[j].v = r[idx[j]]; pr[j].i = j; }
    double *acc = acc2, *above = acc2 + G; /* mass of pr[0..lo) per head, all kept; of the part above the pivot */
    for (int g = 0; g < G; g++) acc[g] = 0.0;
    const double need = (double)tau;
    int lo = 0, hi = count, keep = -1;
    while (hi - lo > 16) {
        const float pv = med3(pr[lo].v, pr[lo + (hi - lo) / 2].v, pr[hi - 1].v);
        const int gt = partition_pairs(pr, lo, hi, pv, 0);
        for (int g = 0; g < G; g++) above[g] = 0.0;
        add_heads(pr, lo, gt, P, ps, G, above);
        if (all_reach(acc, above, G, need)) { hi = gt; continue; }
        const int eq = partition_pairs(pr, gt, hi, pv, 1);
        if (eq == gt) break; /* a NaN pivot: the sort below decides */
        for (int g = 0; g < G; g++) acc[g] += above[g];
        int j = gt;
        while (j < eq && !all_reach(acc, NULL, G, need)) { add_heads(pr, j, j + 1, P, ps, G, acc); j++; }
        if (all_reach(acc, NULL, G, need)) { keep = j; break; }
        lo = eq;
    }
    if (keep < 0) { /* a short range (or NaNs): sorted, then summed in order */
        qsort(pr + lo, (size_t)(hi - lo), sizeof(pair_t), by_value_desc);
        keep = hi;
        for (int j = lo; j < hi; j++) {
            add_heads(pr, j, j + 1, P, ps, G, acc);
            if (all_reach(acc, NULL, G, need)) { keep = j + 1; break; }
        }
    }
    for (int j = 0; j < keep; j++) idx[pr[j].i] = -idx[pr[j].i] - 1;
    int c = 0;
    for (int j = 0; j < count; j++)
        if (idx[j] < 0) idx[c++] = -idx[j] - 1;
    return c;
}
