/* Engine and plan structures shared by kvtier_engine.c, kvt_plan.c, kvt_serve.c and kvt_run*.c. */
#ifndef KVT_ENGINE_INTERNAL_H
#define KVT_ENGINE_INTERNAL_H
#include <pthread.h>
#include <stdatomic.h>
#include "kvt_internal.h"

/* tokens per score post-processing segment (q16 path) */
#define KVT_SEG 256
/* split select + attend: most chunks per selection set, fewest candidates or
 * selected tokens per chunk */
#define KVT_SPLIT_MAX 16
#define KVT_SPLIT_MIN 32
/* exact logits of scattered candidates: rows gathered per kernel call */
#define KVT_GATHER 64
#define KVT_KV_CHUNK_MIN 256 /* kvt_attend_kv_indices: fewest tokens of a set per chunk */

/* One selection set (request, kv-head: the kv-head's query heads share one selection) of the split path. */
typedef struct kvt_set_state {
    int32_t cnt, count; /* candidates, selected */
    int32_t nce, nca;   /* exact-logit chunks, attend chunks (0: the set is done) */
    float cut;          /* candidates: selection logit >= cut */
    float lo;           /* a sampled lower bound of the k-th selection logit, */
    int32_t nlo;        /* over this many token ranges, collected in parallel (0: none) */
    int32_t nlo_found[KVT_SPLIT_MAX]; /* tokens >= lo of each range (-1: its share of cand overflowed) */
    atomic_int left;    /* chunks of the current phase not yet finished */
} kvt_set_state;

typedef struct kvt_plan_state {
    int valid;
    kvt_store *store;
    int32_t store_h;
    int64_t serial;
    int B, Hq, Hkv, G, D, mode, reduce; /* D: the store's head_dim (kept should the store close) */
    float tau, sm_scale, soft_cap;
    double prefilter;     /* > 0: candidates from summary-chunk bounds (TOPK/MASS); double, as the
                           * documented ceil(prefilter * budget / S) is computed */
    int residual;         /* 1: unselected host tokens join each set's softmax per summary chunk */
    int64_t res_off;      /* the residual's part of each thread's scratch (floats from its start) */
    int64_t gather_off;   /* KVT_GATHER key rows and their scales, likewise */
    /* residual, after every set is attended: per set (index as the split path's) a bitmap of
     * its selection at res_bits + res_bits_off[s]; work items (set, first chunk, end chunk)
     * over summary chunks, each writing its partial [m, D + 2] (max, sum, weighted values)
     * to res_part + item * res_part_floats; then one merge per set, in item order */
    int64_t *res_bits_off, *res_item_off; /* [n_sets + 1] */
    uint64_t *res_bits;
    int64_t n_res_items, res_part_floats;
    int32_t *res_items;
    float *res_part;
    int32_t *page_table, *page_off, *ntok, *block; /* copies of the desc arrays */
    int32_t *budget;      /* the desc's budgets clamped to [1, the request's host tokens] */
    int64_t *score_off;   /* [B*Hkv]: start of (b, h)'s [G, n_b] logits in scores (per_qhead: then its
                           * reduced logits [n_b]) */
    float *scores;
    int n_max;
    /* score work items: (b, h, t0, t1) */
    int64_t n_items;
    int32_t *items;
    int64_t *item_off;    /* [B*Hkv + 1]: first score item of (b, h) */
    float *item_ksmax;    /* [n_items]: largest key scale seen by the item (q16 path) */
    /* need_lse (per_qhead, or MASS): each query head's log-sum-exp over its set's host tokens
     * (prefilter: over the candidates), lse_sel [B*Hq], from the selection-stage logits; on the
     * q16 path each score item's running max item_lm and sum of exp(x - max) item_ls, per head
     * ([n_items, G]), merged per set */
    int need_lse;
    float *lse_sel, *item_lm;
    double *item_ls;
    /* selection-stage query (q16 path): per query head int16 q, sm_scale * q scale,
     * and the error term sum|q - scale*q16| + D*2^-20*sum|q| */
    int16_t *q16;         /* rows of q16_stride (int4 keys: the kernel's layout) */
    int q16_stride;
    float *q16s, *qerr;
    /* split select + attend (few selection sets, int8 or q16-able int4 keys, TOPK/MASS): the exact
     * logits of the candidates and the attend of the selection are split into
     * chunks across threads; attend chunks merge by log-sum-exp. Per set s:
     * cand, pos, sel (int32) and re (float), set_cap[s] each, then E [m, set_cap[s]]. */
    int split, split_want;
    int64_t n_sets;
    int64_t *set_off;
    int32_t *set_cap;
    float *set_buf;
    kvt_set_state *sets;
    atomic_int *bh_left;  /* [B*Hkv]: score items of (b, h) not yet finished (q16 split path) */
    float *part;          /* [n_sets, KVT_SPLIT_MAX, m, D + 1]: partial sum p.V and lse */
    /* split prefilter: per set its chunk bounds [m, nc] at pf_off[s]; bound work
     * items (set, first page, end page) */
    int64_t *pf_off;
    float *pf_ub;
    int64_t n_pf_items;
    int32_t *pf_items;
    int32_t *work;        /* [n_sets * KVT_SPLIT_MAX, 2]: (set, chunk) items of a phase */
    /* per-thread scratch for score post-processing and select + attend */
    int n_threads;
    int64_t scratch_floats;
    float *scratch;
    /* floats held by scores, scratch and set_buf: the next plan reuses them when
     * they are large enough, so that a plan per decode step neither allocates
     * nor faults fresh pages in at steady state */
    int64_t scores_cap, scratch_cap, set_buf_cap;
} kvt_plan_state;

typedef struct kvt_engine {
    kvt_pool *pool;
    pthread_mutex_t mu; /* one call at a time per engine */
    kvt_plan_state plan;
    int trace;                         /* kvt_engine_trace; under mu */
    int64_t phase_ns[KVT_N_PHASES], traced_runs;
    /* under the handle table's lock (kvtier_engine.c): calls holding the engine, of which
     * runs over its plan, and whether a kvt_serve loop is on. kvt_engine_destroy refuses
     * while any is non-zero, kvt_plan while runs or serving is. */
    int calls, runs, serving;
    int32_t handle;
} kvt_engine;

/* The engine of handle h, held until kvt_engine_release (NULL + error if not open);
 * run = 1 counts the call as a run over the plan. */
kvt_engine *kvt_engine_acquire(int32_t h, int run);
void kvt_engine_release(kvt_engine *e, int run);
/* KVT_ERR_STATE (message naming fn) while a run over the plan or a serve loop is on. */
int32_t kvt_engine_check_idle(kvt_engine *e, const char *fn);
/* on = 1: marks the engine serving, or KVT_ERR_STATE if it already is; on = 0: clears it. */
int32_t kvt_engine_serving(kvt_engine *e, int on);
/* kvt_run on a held engine (the caller holds the ISA lock): what kvt_serve's jobs call. */
int32_t kvt_run_held(kvt_engine *e, int32_t layer, int32_t batch, int32_t num_q_heads, int32_t head_dim,
                     const float *q, float *out, float *lse, int32_t *n_selected, int32_t *sel_index,
                     int32_t sel_cap);
void kvt_plan_free(kvt_plan_state *p);

/* selection helpers (kvt_select.c) */
float kvt_kth_largest(float *a, int n, int k);
/* A lower bound *lo of the k-th largest of r[0..n): the k-th largest of an evenly
 * strided sample of 1024, taken with a margin above the expected rank. 0 (no bound)
 * when n < 4096, k >= n or the margin reaches past the sample. vals: 1024 floats. */
int kvt_sampled_floor(const float *r, int n, int k, float *vals, float *lo);
/* k-th largest of r[0..n) (1 <= k <= n) without reordering r; vals: n floats scratch. */
float kvt_kth_value(const float *r, int n, int k, float *vals);
/* Writes the indices of the k largest r[0..n) in ascending order; returns the count. */
int kvt_topk_indices(const float *r, int n, int k, float *tmp, int32_t *out);
/* The mass cut of every query head at once: P[g * ps + j] is head g's share of its own
 * host softmax mass on token idx[j] (j < count); keeps the smallest prefix (by
 * descending r[idx[j]]) of idx that holds at least tau of every head's mass, or all of
 * idx when some head never does; idx stays ascending. pairs: 2*count floats, acc: 2*G
 * doubles of scratch. Expected O(G * count). */
int kvt_mass_keep_heads(const float *r, int32_t *idx, int count, const float *P, int64_t ps, int G, float tau,
                        float *pairs, double *acc);
#endif
