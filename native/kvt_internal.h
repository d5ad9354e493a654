/* Shared declarations of the engine's translation units (not part of the API). */
#ifndef KVT_INTERNAL_H
#define KVT_INTERNAL_H
#include <stddef.h>
#include <stdint.h>
#include "kvtier_engine.h"

/* Error reporting: records a thread-local message and returns code. */
int32_t kvt_err(int32_t code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int32_t kvt_ensure_init(void);
/* The kernel table's lock, held shared by every call that runs kernels (kvt_set_isa
 * takes it exclusively, or refuses while it is held). */
void kvt_isa_hold(void);
void kvt_isa_drop(void);

/* Limits that keep every token and page count in int32 arithmetic: n + T - 1 and the
 * like never overflow. */
#define KVT_MAX_TOKENS (1 << 30)      /* host tokens of one request */
#define KVT_MAX_PAGE_TOKENS (1 << 20) /* tokens per page */
#define KVT_MAX_BATCH (1 << 20)       /* requests of one plan */
#define KVT_MAX_Q_HEADS (1 << 12)     /* query heads (so kv heads too) of one plan */
#define KVT_MAX_ROWS (1 << 24)        /* batch x query heads of one plan */

/* Index of the first element of x[0..n) that is NaN or infinite, or -1. */
int64_t kvt_first_nonfinite_f32(const float *x, int64_t n);
int64_t kvt_first_nonfinite_bf16(const uint16_t *x, int64_t n);

/* fmaxf/fminf are library calls under strict IEEE flags; these inline to maxss/minss. */
static inline float kvt_maxf(float a, float b) { return a > b ? a : b; }
static inline float kvt_minf(float a, float b) { return a < b ? a : b; }

static inline float kvt_bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)b << 16;
    return x.f;
}

static inline uint16_t kvt_f32_to_bf16(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40);
    x.u += 0x7fffu + ((x.u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(x.u >> 16);
}

/* bf16 rounded toward -inf / +inf: a summary's min and max stay bounds of the keys */
static inline uint16_t kvt_f32_to_bf16_down(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40);
    uint16_t hi = (uint16_t)(x.u >> 16);
    if ((x.u & 0xffffu) && (x.u >> 31)) hi++; /* negative: truncation rounded up */
    return hi;
}
static inline uint16_t kvt_f32_to_bf16_up(float f) { return kvt_f32_to_bf16_down(-f) ^ 0x8000u; }

/* ---- kernels, one table per ISA ------------------------------------------------
 * score_*: out[g*ostride + t] = scale_t * dot(q[g*D:], key_t) for t < n, g < G.
 * accum_*: acc[g*D + d] += p[g*pstride] * v[d] for g < G.                       */
typedef struct kvt_kernels {
    const char *name;
    void (*score_bf16)(const uint16_t *k, int n, int D, const float *q, int G,
                       float *out, int64_t ostride);
    void (*score_i8)(const int8_t *k, const float *ks, int n, int D, const float *q, int G,
                     float *out, int64_t ostride);
    void (*score_i4)(const uint8_t *k, const float *ks, int n, int D, int grp, const float *q,
                     int G, float *out, int64_t ostride);
    void (*accum_bf16)(const uint16_t *v, int D, const float *p, int64_t pstride, int G,
                       float *acc);
    void (*accum_i8)(const int8_t *v, float scale, int D, const float *p, int64_t pstride,
                     int G, float *acc);
    uint64_t (*sum_bytes)(const uint8_t *buf, int64_t n);
    /* acc[g*D + d] += sum_j p[g*pstride + j] * scale_j * row_j[d]; is_i8 selects the
     * row type (int8 with scales, else bf16 and scales unused) */
    void (*accum_rows)(const void *const *rows, const float *scales, int is_i8, int count, int D,
                       const float *p, int64_t pstride, int G, float *acc);
    /* p[j] = exp(x[j] - max) / sum over j < n (n >= 1); returns max + log(sum) */
    float (*softmax)(const float *x, int n, float *p);
    /* Selection-stage scoring of int8 keys against an integer query (NULL if the
     * ISA has none): out[g*ostride + t] = ks[t] * qs[g] * sum_d k_t[d] * q[g*D + d],
     * the sum exact in int32 (|q| <= kvt_q16_max(D)). Keys are prefetched ahead,
     * past the end of these n rows into next[0..next_bytes) (the next segment). */
    void (*score_i8_q16)(const int8_t *k, const float *ks, int n, int D, const int16_t *q,
                         const float *qs, int G, float *out, int64_t ostride,
                         const int8_t *next, int64_t next_bytes);
    /* The same for int4 keys with grp % 4 == 0 (kvt_i4_q16_ok): out = qs[g] *
     * sum over groups of ks[t, group] * (exact int32 sum of the group's k * q), with q
     * [G, kvt_i4_q16_dp(D)] in the layout of kvt_i4_q16_layout; next as above. */
    void (*score_i4_q16)(const uint8_t *k, const float *ks, int n, int D, int grp,
                         const int16_t *q, const float *qs, int G, float *out, int64_t ostride,
                         const uint8_t *next, int64_t next_bytes);
    /* x[i] = cap * tanh(x[i] / cap), i < n (selection stage only) */
    void (*soft_cap)(float *x, int n, float cap);
    /* sum of exp(x[i] - ref) over i < n with x[i] < below (below = +inf: all i);
     * every such x[i] <= ref. generic sums exp in double, the SIMD variants in float. */
    double (*sum_exp)(const float *x, int n, float ref, float below);
    /* out[g*ostride + c] = dot(w[g*D2:], s[c*D2:]) for c < n, g < G (D2 % 32 == 0), s
     * bf16: summary-chunk upper bounds, with s a chunk's [min | max] row and w the
     * query's [min(q, 0) | max(q, 0)] */
    void (*bound_bf16)(const uint16_t *s, int n, int D2, const float *w, int G, float *out, int64_t ostride);
    /* out[g] = scale * dot(q[g*D:], x) for g < G (D % 16 == 0): the residual's chunk logits */
    void (*dot_f32)(const float *x, int D, const float *q, int G, float scale, float *out);
    /* acc[g*D + d] += w[g] * x[d] for g < G (D % 16 == 0): the residual's weighted value means */
    void (*axpy_f32)(const float *x, int D, const float *w, int G, float *acc);
    /* NULL, or the layout score_i8_q16 takes its query in: rearranges a group's G
     * rows of D int16 in place (same size), once per run */
    void (*q16_i8_layout)(int16_t *q, int D, int G);
} kvt_kernels;

/* Largest |q| integer for the q16 kernels at head dim D: D * 127 * qmax < 2^31. */
static inline int kvt_q16_max(int D) {
    int64_t m = (int64_t)2147483647 / ((int64_t)127 * D);
    return m > 32767 ? 32767 : (int)m;
}

/* int4 selection query: rows padded to whole 64-channel steps; in each step the
 * even channels j, j+2, .., j+62 then the odd ones (the kernel's nibble order);
 * padding is zero. */
static inline int kvt_i4_q16_ok(int D, int grp) { return grp % 4 == 0 && D % grp == 0; }
static inline int kvt_i4_q16_dp(int D) { return (D + 63) / 64 * 64; }
static inline void kvt_i4_q16_layout(const int16_t *q, int D, int16_t *o) {
    for (int j = 0; j < kvt_i4_q16_dp(D); j += 64)
        for (int m = 0; m < 32; m++) {
            o[j + m] = j + 2 * m < D ? q[j + 2 * m] : 0;
            o[j + 32 + m] = j + 2 * m + 1 < D ? q[j + 2 * m + 1] : 0;
        }
}

extern const kvt_kernels *kvt_k; /* the active table */
const kvt_kernels *kvt_kernels_for(const char *name); /* NULL if unknown/unsupported */
int kvt_isa_name_known(const char *name);

/* ---- thread pool ---------------------------------------------------------------- */
typedef void (*kvt_task_fn)(void *ctx, int64_t item, int tid);
typedef struct kvt_pool kvt_pool;
kvt_pool *kvt_pool_create(int n_threads);
void kvt_pool_destroy(kvt_pool *p);
int kvt_pool_size(const kvt_pool *p);
void kvt_pool_run(kvt_pool *p, int64_t n_items, kvt_task_fn fn, void *ctx);

/* ---- store ---------------------------------------------------------------------- */
typedef struct kvt_store {
    kvt_store_desc d;
    int64_t serial;      /* distinguishes a reopened handle slot from the planned store */
    int holds;           /* calls using the store (under the store table's lock); close waits for 0 */
    int32_t handle;
    int64_t key_tok;     /* bytes of one token's key */
    int64_t kscale_tok;  /* key scales per token (0, 1 or D/G) */
    int chan_scales;     /* INT8_CHANNEL: D bf16 scales per (page, head), none per token */
    int64_t val_tok;     /* bytes of one token's value */
    int64_t n_chunks;    /* summary chunks per page */
} kvt_store;

/* The store of a handle, held until kvt_store_release: kvt_store_close waits for every
 * hold to end. NULL + KVT_ERR_HANDLE error if not open. */
kvt_store *kvt_store_acquire(int32_t handle);
void kvt_store_release(kvt_store *s);

/* (layer, page, head) -> flat index of the [T, ...] block */
static inline int64_t kvt_lph(const kvt_store *s, int layer, int page, int head) {
    return ((int64_t)layer * s->d.n_pages + page) * s->d.kv_heads + head;
}
static inline const uint8_t *kvt_key_ptr(const kvt_store *s, int64_t lph) {
    return (const uint8_t *)s->d.keys + lph * s->d.page_tokens * s->key_tok;
}
static inline const float *kvt_kscale_ptr(const kvt_store *s, int64_t lph) {
    return s->d.key_scales && s->kscale_tok ? (const float *)s->d.key_scales + lph * s->d.page_tokens * s->kscale_tok
                                            : NULL;
}
/* INT8_CHANNEL: the D channel scales, then the D zero points (bf16), of one (layer, page,
 * head) block: a key is scale * k + zero point per channel */
static inline const uint16_t *kvt_kchan_ptr(const kvt_store *s, int64_t lph) {
    return (const uint16_t *)s->d.key_scales + lph * 2 * s->d.head_dim;
}

static inline const uint8_t *kvt_val_ptr(const kvt_store *s, int64_t lph) {
    return (const uint8_t *)s->d.values + lph * s->d.page_tokens * s->val_tok;
}
static inline const float *kvt_vscale_ptr(const kvt_store *s, int64_t lph) {
    return s->d.value_scales ? s->d.value_scales + lph * s->d.page_tokens : NULL;
}
/* Summaries (bf16, min rounded down, max up) are head-major within a layer,
 * [L, H, P, T/S, 2, D], so that one kv-head's summaries over a request's pages
 * are one sequential read. */
static inline const uint16_t *kvt_summary_ptr(const kvt_store *s, int layer, int page, int head) {
    return s->d.summary + (((int64_t)layer * s->d.kv_heads + head) * s->d.n_pages + page) * s->n_chunks * 2 *
                              s->d.head_dim;
}

/* Chunk sums (f32 [L, H, P, T/S, 2, D], head-major like the summaries): per summary
 * chunk the sum of its dequantized keys, then of its values. */
static inline const float *kvt_chunk_sums_ptr(const kvt_store *s, int layer, int page, int head) {
    return s->d.chunk_sums + (((int64_t)layer * s->d.kv_heads + head) * s->d.n_pages + page) * s->n_chunks * 2 *
                                 s->d.head_dim;
}

/* Token t of one page/head, dequantized exactly as the engine attends it: o[0..D). */
void kvt_dequant_key_row(const kvt_store *s, int64_t lph, int t, float *o);
void kvt_dequant_value_row(const kvt_store *s, int64_t lph, int t, float *o);

/* Scores tokens [t0, t0+n) of one page/head for G query heads (dispatches on key format). */
void kvt_score_page(const kvt_store *s, int64_t lph, int t0, int n, const float *q, int G,
                    float *out, int64_t ostride);
/* The same for n key rows laid out as a page's (key_tok bytes each) with their scales
 * (kscale_tok each), wherever they are; not for INT8_CHANNEL keys (kvt_score_rows_chan). */
void kvt_score_rows(const kvt_store *s, const uint8_t *kp, const float *ks, int n, const float *q, int G,
                    float *out, int64_t ostride);
/* Unit token scales, for calls of the int8 kernels over INT8_CHANNEL rows (n <= KVT_ONES). */
#define KVT_ONES 256
extern const float kvt_ones[KVT_ONES];
/* INT8_CHANNEL: n int8 key rows (D bytes each) of one page whose channel scales and zero
 * points are c (kvt_kchan_ptr). */
void kvt_score_rows_chan(const kvt_store *s, const uint8_t *kp, const uint16_t *c, int n, const float *q, int G,
                         float *out, int64_t ostride);
/* INT8_CHANNEL: one int8 key row of a page whose channel scales and zero points are c,
 * dequantized to floats (k * scale + zero) and scored: out[g * ostride] for G query heads.
 * For scattered tokens, where a call of kvt_score_rows_chan per page would scale the
 * queries for a row or two. */
void kvt_score_row_chan(const kvt_store *s, const uint8_t *kp, const uint16_t *c, const float *q, int G,
                        float *out, int64_t ostride);
/* acc[g*D+d] += p[g*pstride] * v_t[d] for token t of one page/head. */
void kvt_accum_token(const kvt_store *s, int64_t lph, int t, const float *p, int64_t pstride,
                     int G, float *acc);

#endif
