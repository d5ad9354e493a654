/* kvtier native engine: quantized host KV store + sparse CPU attention.
 *
 * This header doubles as the cffi cdef: build_engine.py drops the lines that
 * start with '#', so everything else must stay plain C declarations.
 * Every int32_t-returning function returns KVT_OK or an error code; the
 * message for the calling thread is in kvt_last_error().
 */
#ifndef KVTIER_ENGINE_H
#define KVTIER_ENGINE_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

enum {
    KVT_OK = 0,
    KVT_ERR_VALUE = 1,       /* bad size, format, mode, budget */
    KVT_ERR_RANGE = 2,       /* page id, layer, token index out of range */
    KVT_ERR_HANDLE = 3,      /* unknown or closed handle */
    KVT_ERR_STATE = 4,       /* no plan, plan's store closed, buffers sized for another plan, refused
                                while a run or serve loop is in flight */
    KVT_ERR_NOMEM = 5,
    KVT_ERR_UNSUPPORTED = 6, /* ISA not available on this CPU */
    KVT_ERR_INTERNAL = 7,
    KVT_ERR_TIMEOUT = 8      /* kvt_serve: a job's query never arrived */
};

/* INT8_CHANNEL: int8 keys with one scale per channel of each (page, kv-head), as KIVI
 * quantizes keys: an outlier channel no longer takes the int8 range of the others */
enum { KVT_KEY_BF16 = 0, KVT_KEY_INT8 = 1, KVT_KEY_INT4 = 2, KVT_KEY_INT8_CHANNEL = 3 };
enum { KVT_VAL_BF16 = 0, KVT_VAL_INT8 = 1 };
enum { KVT_SRC_F32 = 0, KVT_SRC_BF16 = 1 };
enum { KVT_SELECT_TOPK = 0, KVT_SELECT_MASS = 1, KVT_SELECT_BLOCKS = 2, KVT_SELECT_ALL = 3 };
enum { KVT_REDUCE_MAX = 0, KVT_REDUCE_MEAN = 1, KVT_PER_QHEAD = 2 };
/* kvt_run's phases, as kvt_engine_phase_times reports them; CALL is the whole call */
enum {
    KVT_PHASE_QUERY = 0, KVT_PHASE_SCORE = 1, KVT_PHASE_BOUND = 2, KVT_PHASE_SELECT = 3, KVT_PHASE_EXACT = 4,
    KVT_PHASE_ATTEND = 5, KVT_PHASE_RESIDUAL = 6, KVT_PHASE_RESIDUAL_MERGE = 7, KVT_PHASE_CALL = 8,
    KVT_N_PHASES = 9
};

typedef struct kvt_store_desc {
    int32_t n_layers;
    int32_t n_pages;
    int32_t kv_heads;
    int32_t page_tokens;
    int32_t head_dim;
    int32_t key_format;
    int32_t value_format;
    int32_t key_group;      /* INT4 keys: channels per scale */
    int32_t summary_tokens; /* tokens per min/max summary chunk */
    void *keys;             /* see native/README.md for shapes */
    void *key_scales;       /* NULL for BF16 keys; f32 per token (INT8) or per token and group (INT4);
                               bf16 [L, P, H, D] (INT8_CHANNEL) */
    void *values;
    float *value_scales;    /* NULL for BF16 values */
    uint16_t *summary;      /* bf16 [L, H, P, T/S, 2, D] */
    float *chunk_sums;      /* NULL, or f32 [L, H, P, T/S, 2, D]: per summary chunk the sum of its
                               dequantized keys, then of its values (needed by residual plans) */
} kvt_store_desc;

typedef struct kvt_plan_desc {
    int32_t batch;
    int32_t num_q_heads;
    const int32_t *page_table;
    const int32_t *page_offsets;  /* [batch + 1] */
    const int32_t *n_tokens;      /* [batch] */
    int32_t mode;
    int32_t group_reduce;
    const int32_t *budget_tokens; /* [batch * kv_heads], > 0; clamped to each request's host tokens */
    const int32_t *block_tokens;  /* [kv_heads], BLOCKS mode only */
    float mass_threshold;
    float sm_scale;
    float soft_cap;
    double prefilter;             /* TOPK/MASS: >= 1 token-scores only the summary chunks
                                     with the best key upper bounds, ceil(prefilter x budget /
                                     summary_tokens) of them (in double); 0 scores every host token */
    int32_t residual;             /* 1: the host tokens a selection leaves out join its softmax
                                     as one pseudo-token per summary chunk (their mean key and
                                     value, weighted by their count); needs chunk_sums */
} kvt_plan_desc;

int32_t kvt_init(void);
const char *kvt_last_error(void);
const char *kvt_active_isa(void);
int32_t kvt_set_isa(const char *name);
int32_t kvt_isa_supported(const char *name);
const char *kvt_version(void);
const char *kvt_build_hash(void);

int32_t kvt_store_open(const kvt_store_desc *desc, int32_t *handle);
int32_t kvt_store_close(int32_t store);
/* Asks the OS to back the whole 2 MiB-aligned pages inside [p, p + nbytes) with huge
 * pages (Linux: madvise MADV_HUGEPAGE), before the caller first touches them: fewer
 * TLB misses when the engine scans or gathers a store's rows. *advised = 1 when the
 * advice was taken, 0 when the range holds no whole huge page or the OS declined. */
int32_t kvt_advise_hugepages(void *p, int64_t nbytes, int32_t *advised);
int32_t kvt_append(int32_t store, int32_t layer, int32_t n, const int32_t *page_ids,
                   const void *k, const void *v, int32_t src_dtype);
int32_t kvt_dequant_keys(int32_t store, int32_t layer, int32_t n, const int32_t *page_ids,
                         float *out);
int32_t kvt_dequant_values(int32_t store, int32_t layer, int32_t n, const int32_t *page_ids,
                           float *out);

/* The pipelined decode step (kvt_serve): jobs fed through flags in page-locked
 * memory that the GPU writes and waits on, so the host thread that queues the
 * GPU work never waits for the engine. Job j uses slot j % n_slots. */
typedef struct kvt_serve_desc {
    int32_t n_slots;
    int32_t first_seq;          /* job j is ready when q_ready[slot] == first_seq + j */
    const int32_t *layer;       /* [n_slots]: the layer of the slot's job, set before its q_ready */
    const float *q;             /* [n_slots][q_stride]: the job's query [B, Hq, D] f32 */
    int64_t q_stride;
    float *far;                 /* [n_slots][far_stride]: out [B, Hq, D] then lse [B, Hq] */
    int64_t far_stride;
    const int32_t *q_ready;     /* [n_slots], stored by the device after the query lands */
    int32_t *far_ready;         /* [n_slots], stored here once far holds the job's result */
    const int32_t *stop;        /* 0: keep serving; n + 1: return after n jobs */
    int64_t *done;              /* jobs finished so far */
    double *engine_seconds;     /* time spent in runs, accumulated */
    int32_t timeout_ms;         /* after stop is set, how long to wait for a job's query */
} kvt_serve_desc;

int32_t kvt_engine_create(int32_t n_threads, int32_t *handle);
int32_t kvt_engine_destroy(int32_t engine);
int32_t kvt_engine_threads(int32_t engine);
int32_t kvt_plan(int32_t engine, int32_t store, const kvt_plan_desc *desc);
int32_t kvt_plan_max_tokens(int32_t engine);
/* The calls over a plan take the batch shape their buffers were sized for (batch,
 * num_q_heads, head_dim) and refuse (KVT_ERR_STATE) when it is not the plan's: the
 * engine owns the plan, and another thread may have planned again. */
int32_t kvt_run(int32_t engine, int32_t layer, int32_t batch, int32_t num_q_heads, int32_t head_dim,
                const float *q, float *out, float *lse, int32_t *n_selected, int32_t *sel_index,
                int32_t sel_cap);
int32_t kvt_score(int32_t engine, int32_t layer, int32_t batch, int32_t num_q_heads, int32_t head_dim,
                  const float *q, float *scores, int32_t n_max);
int32_t kvt_weighted_values(int32_t engine, int32_t store, int32_t layer, int32_t batch, int32_t num_q_heads,
                            int32_t head_dim, const int32_t *idx, const float *p, int32_t m, float *out);
/* Exact attention over given host tokens, per (request, query head): idx [B, Hq, m]
 * (token indices of the planned request, -1 = none; unique within a row), q [B, Hq, D].
 * The logits come from the store's keys, scaled and soft-capped as the plan says;
 * out [B, Hq, D] = softmax . V over the row's tokens, lse [B, Hq] (natural log; an
 * empty row gives out 0, lse -inf). */
int32_t kvt_attend_indices(int32_t engine, int32_t store, int32_t layer, int32_t batch, int32_t num_q_heads,
                           int32_t head_dim, const float *q, const int32_t *idx, int32_t m, float *out,
                           float *lse);
/* The same with one set per (request, kv-head): idx [B, Hkv, m]; every query head of
 * the kv-head attends the set (each key and value row read once for them all). */
int32_t kvt_attend_kv_indices(int32_t engine, int32_t store, int32_t layer, int32_t batch, int32_t num_q_heads,
                              int32_t head_dim, const float *q, const int32_t *idx, int32_t m, float *out,
                              float *lse);
int32_t kvt_serve(int32_t engine, const kvt_serve_desc *desc);
int32_t kvt_stream_read(int32_t engine, const void *buf, int64_t nbytes, uint64_t *checksum);
/* Profiling: while on, every kvt_run adds the wall time of each of its phases (ns)
 * to the engine's counters; turning it on clears them. */
int32_t kvt_engine_trace(int32_t engine, int32_t on);
/* The counters: ns[0..n) per KVT_PHASE_* (n <= KVT_N_PHASES) and the runs they add up. */
int32_t kvt_engine_phase_times(int32_t engine, int64_t *ns, int32_t n, int64_t *runs);

#ifdef __cplusplus
}
#endif
#endif
