/* Engine and plan structures shared by kvtier_engine.c and kvt_run.c. */
#ifndef KVT_ENGINE_INTERNAL_H
#define KVT_ENGINE_INTERNAL_H
#include <pthread.h>
#include "kvt_internal.h"

/* tokens per score post-processing segment (q16 path) */
#define KVT_SEG 256

typedef struct kvt_plan_state {
    int valid;
    kvt_store *store;
    int32_t store_h;
    int64_t serial;
    int B, Hq, Hkv, G, mode, reduce;
    float tau, sm_scale, soft_cap;
    int32_t *page_table, *page_off, *ntok, *budget, *block; /* copies of the desc arrays */
    int64_t *score_off;   /* [B*Hkv]: start of (b, h)'s [G, n_b] logits in scores */
    float *scores;
    int n_max;
    /* score work items: (b, h, t0, t1) */
    int64_t n_items;
    int32_t *items;
    int64_t *item_off;    /* [B*Hkv + 1]: first score item of (b, h) */
    float *item_ksmax;    /* [n_items]: largest key scale seen by the item (q16 path) */
    /* selection-stage query (q16 path): per query head int16 q, sm_scale * q scale,
     * and the error term sum|q - scale*q16| + D*2^-20*sum|q| */
    int16_t *q16;
    float *q16s, *qerr;
    /* per-thread scratch for score post-processing and select + attend */
    int n_threads;
    int64_t scratch_floats;
    float *scratch;
} kvt_plan_state;

typedef struct kvt_engine {
    kvt_pool *pool;
    pthread_mutex_t mu; /* one call at a time per engine */
    kvt_plan_state plan;
} kvt_engine;

kvt_engine *kvt_engine_get(int32_t h);
void kvt_plan_free(kvt_plan_state *p);

/* selection helpers (kvt_select.c) */
float kvt_kth_largest(float *a, int n, int k);
/* k-th largest of r[0..n) (1 <= k <= n) without reordering r; vals: n floats scratch. */
float kvt_kth_value(const float *r, int n, int k, float *vals);
/* Writes the indices of the k largest r[0..n) in ascending order; returns the count. */
int kvt_topk_indices(const float *r, int n, int k, float *tmp, int32_t *out);
/* Keeps the smallest prefix (by descending r) of sel whose softmax mass over all n
 * tokens reaches tau; sel stays ascending. pairs needs 2*count floats. */
int kvt_mass_cut(const float *r, int n, int32_t *sel, int count, float tau, float *pairs);
#endif
