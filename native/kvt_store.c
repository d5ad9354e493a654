/* Host store: handle table, append (quantize + summarize), dequantization.
 * The store never owns memory: Python allocates the buffers and keeps them
 * alive for as long as the handle is open. */
#define _GNU_SOURCE /* sched_getaffinity, MADV_HUGEPAGE */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include "kvt_internal.h"

#define MAX_STORES 1024

static kvt_store *g_stores[MAX_STORES];
/* handles as the engine's: slot + 1 + MAX_STORES * (the slot's use count, wrapped) */
static int32_t g_store_uses[MAX_STORES];
static int64_t g_serial;
static pthread_mutex_t g_store_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_store_released = PTHREAD_COND_INITIALIZER; /* a hold ended */

/* the store of handle h (NULL if not open); under g_store_mu */
static kvt_store *store_at(int32_t h) {
    if (h < 1) return NULL;
    kvt_store *s = g_stores[(h - 1) % MAX_STORES];
    return s && s->handle == h ? s : NULL;
}

kvt_store *kvt_store_acquire(int32_t h) {
    pthread_mutex_lock(&g_store_mu);
    kvt_store *s = store_at(h);
    if (s) s->holds++;
    pthread_mutex_unlock(&g_store_mu);
    if (!s) kvt_err(KVT_ERR_HANDLE, "store handle %d is not open", (int)h);
    return s;
}

void kvt_store_release(kvt_store *s) {
    pthread_mutex_lock(&g_store_mu);
    if (--s->holds == 0) pthread_cond_broadcast(&g_store_released);
    pthread_mutex_unlock(&g_store_mu);
}

/* Non-finite floats have every exponent bit set; the loops only OR flags, so they vectorize. */
int64_t kvt_first_nonfinite_f32(const float *x, int64_t n) {
    const uint32_t *u = (const uint32_t *)x;
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        const int64_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
        if (bad)
            for (int64_t i = i0; i < i1; i++)
                if ((u[i] & 0x7f800000u) == 0x7f800000u) return i;
    }
    return -1;
}

int64_t kvt_first_nonfinite_bf16(const uint16_t *x, int64_t n) {
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        const int64_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((x[i] & 0x7f80u) == 0x7f80u);
        if (bad)
            for (int64_t i = i0; i < i1; i++)
                if ((x[i] & 0x7f80u) == 0x7f80u) return i;
    }
    return -1;
}

static int32_t validate_desc(const kvt_store_desc *d) {
    if (!d) return kvt_err(KVT_ERR_VALUE, "store desc: expected a descriptor, got NULL");
    if (d->n_layers <= 0 || d->n_pages <= 0 || d->kv_heads <= 0 || d->page_tokens <= 0 ||
        d->head_dim <= 0)
        return kvt_err(KVT_ERR_VALUE,
                       "store desc: expected n_layers, n_pages, kv_heads, page_tokens, head_dim > 0, "
                       "got %d, %d, %d, %d, %d", d->n_layers, d->n_pages, d->kv_heads,
                       d->page_tokens, d->head_dim);
    if (d->head_dim % 16 != 0 || d->head_dim > 1024)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected head_dim a multiple of 16 and <= 1024, got %d",
                       d->head_dim);
    if (d->key_format < KVT_KEY_BF16 || d->key_format > KVT_KEY_INT8_CHANNEL)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected key_format 0 (bf16), 1 (int8), 2 (int4) or 3 "
                       "(int8_channel), got %d", d->key_format);
    if (d->value_format < KVT_VAL_BF16 || d->value_format > KVT_VAL_INT8)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected value_format 0 (bf16) or 1 (int8), got %d",
                       d->value_format);
    if (d->key_format == KVT_KEY_INT4 &&
        (d->key_group <= 0 || d->key_group % 2 != 0 || d->head_dim % d->key_group != 0))
        return kvt_err(KVT_ERR_VALUE, "store desc: expected an even key_group dividing head_dim %d, got %d",
                       d->head_dim, d->key_group);
    if (d->summary_tokens <= 0 || d->page_tokens % d->summary_tokens != 0)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected summary_tokens dividing page_tokens %d, got %d",
                       d->page_tokens, d->summary_tokens);
    if (d->page_tokens > KVT_MAX_PAGE_TOKENS || d->kv_heads > KVT_MAX_Q_HEADS)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected page_tokens <= %d and kv_heads <= %d, got %d and %d",
                       KVT_MAX_PAGE_TOKENS, KVT_MAX_Q_HEADS, d->page_tokens, d->kv_heads);
    /* the largest buffer, f32 chunk sums or keys of 4 bytes a channel at most, must be addressable */
    int64_t elems = 8;
    const int32_t dims[5] = {d->n_layers, d->n_pages, d->kv_heads, d->page_tokens, d->head_dim};
    for (int i = 0; i < 5; i++)
        if (__builtin_mul_overflow(elems, (int64_t)dims[i], &elems) || elems > ((int64_t)1 << 62))
            return kvt_err(KVT_ERR_VALUE, "store desc: %d layers x %d pages x %d kv heads x %d tokens x %d "
                           "channels do not fit a 64-bit byte count", d->n_layers, d->n_pages, d->kv_heads,
                           d->page_tokens, d->head_dim);
    if (!d->keys || !d->values || !d->summary)
        return kvt_err(KVT_ERR_VALUE, "store desc: expected non-NULL keys, values and summary buffers");
    if (d->key_format != KVT_KEY_BF16 && !d->key_scales)
        return kvt_err(KVT_ERR_VALUE, "store desc: quantized keys need a key_scales buffer, got NULL");
    if (d->value_format == KVT_VAL_INT8 && !d->value_scales)
        return kvt_err(KVT_ERR_VALUE, "store desc: int8 values need a value_scales buffer, got NULL");
    return KVT_OK;
}

int32_t kvt_store_open(const kvt_store_desc *desc, int32_t *handle) {
    int32_t rc = kvt_ensure_init();
    if (rc) return rc;
    if (!handle) return kvt_err(KVT_ERR_VALUE, "kvt_store_open: expected a handle pointer, got NULL");
    if ((rc = validate_desc(desc))) return rc;
    kvt_store *s = calloc(1, sizeof *s);
    if (!s) return kvt_err(KVT_ERR_NOMEM, "kvt_store_open: out of memory");
    s->d = *desc;
    int D = desc->head_dim;
    switch (desc->key_format) {
    case KVT_KEY_BF16: s->key_tok = 2 * D; s->kscale_tok = 0; s->d.key_scales = NULL; break;
    case KVT_KEY_INT8: s->key_tok = D; s->kscale_tok = 1; break;
    case KVT_KEY_INT8_CHANNEL: s->key_tok = D; s->kscale_tok = 0; s->chan_scales = 1; break;
    default: s->key_tok = D / 2; s->kscale_tok = D / desc->key_group; break;
    }
    s->val_tok = desc->value_format == KVT_VAL_BF16 ? 2 * D : D;
    if (desc->value_format == KVT_VAL_BF16) s->d.value_scales = NULL;
    s->n_chunks = desc->page_tokens / desc->summary_tokens;
    pthread_mutex_lock(&g_store_mu);
    int slot = -1;
    for (int i = 0; i < MAX_STORES; i++)
        if (!g_stores[i]) { slot = i; break; }
    if (slot >= 0) {
        s->serial = ++g_serial;
        g_store_uses[slot] = (g_store_uses[slot] + 1) % (INT32_MAX / MAX_STORES);
        s->handle = g_store_uses[slot] * MAX_STORES + slot + 1;
        g_stores[slot] = s;
    }
    pthread_mutex_unlock(&g_store_mu);
    if (slot < 0) {
        free(s);
        return kvt_err(KVT_ERR_NOMEM, "kvt_store_open: all %d store handles are in use", MAX_STORES);
    }
    *handle = s->handle;
    return KVT_OK;
}

/* The handle closes at once (no new call finds it); the store is freed once the calls
 * in flight that hold it (runs, plans, appends) have returned. */
int32_t kvt_store_close(int32_t h) {
    pthread_mutex_lock(&g_store_mu);
    kvt_store *s = store_at(h);
    if (s) g_stores[(h - 1) % MAX_STORES] = NULL;
    while (s && s->holds > 0) pthread_cond_wait(&g_store_released, &g_store_mu);
    pthread_mutex_unlock(&g_store_mu);
    if (!s) return kvt_err(KVT_ERR_HANDLE, "store handle %d is not open", (int)h);
    free(s);
    return KVT_OK;
}

static int32_t check_pages(const kvt_store *s, int32_t layer, int32_t n, const int32_t *ids,
                           const char *fn) {
    if (layer < 0 || layer >= s->d.n_layers)
        return kvt_err(KVT_ERR_RANGE, "%s: expected layer in [0, %d), got %d", fn, s->d.n_layers, layer);
    if (n < 0) return kvt_err(KVT_ERR_VALUE, "%s: expected n >= 0 pages, got %d", fn, n);
    if (n > 0 && !ids) return kvt_err(KVT_ERR_VALUE, "%s: expected page_ids, got NULL", fn);
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= s->d.n_pages)
            return kvt_err(KVT_ERR_RANGE, "%s: expected page ids in [0, %d), got %d at position %d",
                           fn, s->d.n_pages, ids[i], i);
    return KVT_OK;
}

/* Symmetric quantization: q = round(x / scale), scale = max|x| / qmax. Rounds
 * to nearest even as lrintf does (|x * inv| <= qmax + 1/2 is far below 2^22, where
 * adding and subtracting 1.5 * 2^23 rounds exactly), without a library call, so
 * the loop vectorizes. */
static float quant_sym(const float *x, int n, int qmax, int8_t *q) {
    float m8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, m = 0.f; /* independent lanes: vectorizes */
    int i0 = 0;
    for (; i0 + 8 <= n; i0 += 8)
        for (int j = 0; j < 8; j++) m8[j] = kvt_maxf(m8[j], fabsf(x[i0 + j]));
    for (int j = 0; j < 8; j++) m = kvt_maxf(m, m8[j]);
    for (; i0 < n; i0++) m = kvt_maxf(m, fabsf(x[i0]));
    float scale = m / (float)qmax;
    float inv = scale > 0.f ? 1.f / scale : 0.f, fq = (float)qmax;
    for (int i = 0; i < n; i++) {
        float r = (x[i] * inv + 12582912.f) - 12582912.f; /* IEEE: not folded without -ffast-math */
        r = r > fq ? fq : (r < -fq ? -fq : r);
        q[i] = (int8_t)(int)r;
    }
    return scale;
}

/* int8_channel, one (page, head) block from each channel's min and max over its tokens:
 * the zero point z = bf16((min + max) / 2) and the scale max|x - z| / 127 rounded up to
 * bf16 (so that every |x - z| / scale <= 127, up to float rounding), written to c as
 * [scales | zero points]; cinv the scales' float inverse (0 where a channel is constant). */
static void chan_scales(const float *mn, const float *mx, int D, uint16_t *c, float *cinv) {
    for (int d = 0; d < D; d++) {
        c[D + d] = kvt_f32_to_bf16(0.5f * mn[d] + 0.5f * mx[d]);
        const float z = kvt_bf16_to_f32(c[D + d]);
        c[d] = kvt_f32_to_bf16_up(kvt_maxf(mx[d] - z, z - mn[d]) / 127.f);
        const float sc = kvt_bf16_to_f32(c[d]);
        cinv[d] = sc > 0.f ? 1.f / sc : 0.f;
    }
}

/* q = round((x - z) * cinv) per channel (half to even, as quant_sym), clamped to
 * [-127, 127]: the clamp only absorbs float rounding. */
static void quant_chan(const float *x, int D, const float *z, const float *cinv, int8_t *q) {
    for (int d = 0; d < D; d++) {
        float r = ((x[d] - z[d]) * cinv[d] + 12582912.f) - 12582912.f;
        r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
        q[d] = (int8_t)(int)r;
    }
}

static void load_row(const void *src, int32_t src_dtype, int64_t off, int D, float *dst) {
    if (src_dtype == KVT_SRC_F32) {
        memcpy(dst, (const float *)src + off, (size_t)D * sizeof(float));
    } else {
        const uint16_t *b = (const uint16_t *)src + off;
        for (int d = 0; d < D; d++) dst[d] = kvt_bf16_to_f32(b[d]);
    }
}

void kvt_dequant_key_row(const kvt_store *s, int64_t lph, int t, float *o) {
    const int D = s->d.head_dim;
    const uint8_t *kp = kvt_key_ptr(s, lph) + (int64_t)t * s->key_tok;
    const float *ks = kvt_kscale_ptr(s, lph);
    if (s->d.key_format == KVT_KEY_BF16) {
        for (int d = 0; d < D; d++) o[d] = kvt_bf16_to_f32(((const uint16_t *)kp)[d]);
    } else if (s->d.key_format == KVT_KEY_INT8) {
        for (int d = 0; d < D; d++) o[d] = (float)((const int8_t *)kp)[d] * ks[t];
    } else if (s->chan_scales) {
        const uint16_t *c = kvt_kchan_ptr(s, lph);
        for (int d = 0; d < D; d++)
            o[d] = (float)((const int8_t *)kp)[d] * kvt_bf16_to_f32(c[d]) + kvt_bf16_to_f32(c[D + d]);
    } else {
        int grp = s->d.key_group;
        const float *sc = ks + (int64_t)t * (D / grp);
        for (int d = 0; d < D; d += 2) {
            uint8_t b = kp[d / 2];
            o[d] = (float)((int8_t)(uint8_t)(b << 4) >> 4) * sc[d / grp];
            o[d + 1] = (float)((int8_t)b >> 4) * sc[d / grp];
        }
    }
}

void kvt_dequant_value_row(const kvt_store *s, int64_t lph, int t, float *o) {
    const int D = s->d.head_dim;
    if (s->d.value_format == KVT_VAL_BF16) {
        const uint16_t *vp = (const uint16_t *)kvt_val_ptr(s, lph) + (int64_t)t * D;
        for (int d = 0; d < D; d++) o[d] = kvt_bf16_to_f32(vp[d]);
    } else {
        const int8_t *vp = (const int8_t *)kvt_val_ptr(s, lph) + (int64_t)t * D;
        float sc = kvt_vscale_ptr(s, lph)[t];
        for (int d = 0; d < D; d++) o[d] = (float)vp[d] * sc;
    }
}

typedef struct {
    const kvt_store *s;
    int32_t layer, src;
    const int32_t *ids;
    const void *k, *v;
    atomic_llong bad; /* scan: 2 * (first non-finite element) + (1 if in v), or INT64_MAX */
} append_ctx;

/* scan one (page position, head) block of k and v for NaN and infinities */
static void scan_task(void *c, int64_t item, int tid) {
    (void)tid;
    append_ctx *a = c;
    const int64_t len = (int64_t)a->s->d.page_tokens * a->s->d.head_dim, off = item * len;
    for (int which = 0; which < 2; which++) {
        const void *x = which ? a->v : a->k;
        const int64_t j = a->src == KVT_SRC_F32 ? kvt_first_nonfinite_f32((const float *)x + off, len)
                                                : kvt_first_nonfinite_bf16((const uint16_t *)x + off, len);
        if (j < 0) continue;
        long long want = 2 * (off + j) + which, cur = atomic_load(&a->bad);
        while (want < cur && !atomic_compare_exchange_weak(&a->bad, &cur, want)) {}
    }
}

/* quantize + summarize the T tokens of (page ids[i], head hh) */
static void append_block(const append_ctx *a, int32_t i, int hh) {
    const kvt_store *s = a->s;
    const int H = s->d.kv_heads, T = s->d.page_tokens, D = s->d.head_dim, S = s->d.summary_tokens;
    float x[1024];
    int8_t qb[1024];
    int64_t lph = kvt_lph(s, a->layer, a->ids[i], hh);
    uint8_t *kp = (uint8_t *)kvt_key_ptr(s, lph);
    float *ksp = (float *)kvt_kscale_ptr(s, lph);
    uint8_t *vp = (uint8_t *)kvt_val_ptr(s, lph);
    float *vsp = (float *)kvt_vscale_ptr(s, lph);
    uint16_t *sum = (uint16_t *)kvt_summary_ptr(s, a->layer, a->ids[i], hh);
    float mn[1024], mx[1024];
    float cinv[1024], zp[1024]; /* int8_channel: 1 / each channel's scale, and its zero point */
    if (s->chan_scales) {
        uint16_t *c = (uint16_t *)kvt_kchan_ptr(s, lph);
        for (int t = 0; t < T; t++) {
            load_row(a->k, a->src, (((int64_t)i * H + hh) * T + t) * D, D, x);
            for (int d = 0; d < D; d++) {
                mn[d] = t ? kvt_minf(mn[d], x[d]) : x[d];
                mx[d] = t ? kvt_maxf(mx[d], x[d]) : x[d];
            }
        }
        chan_scales(mn, mx, D, c, cinv);
        for (int d = 0; d < D; d++) zp[d] = kvt_bf16_to_f32(c[D + d]);
    }
    for (int t = 0; t < T; t++) {
        int64_t off = (((int64_t)i * H + hh) * T + t) * D;
        load_row(a->k, a->src, off, D, x);
        if (t % S == 0)
            for (int d = 0; d < D; d++) { mn[d] = x[d]; mx[d] = x[d]; }
        else
            for (int d = 0; d < D; d++) { mn[d] = kvt_minf(mn[d], x[d]); mx[d] = kvt_maxf(mx[d], x[d]); }
        if (t % S == S - 1) {
            uint16_t *o = sum + (int64_t)(t / S) * 2 * D;
            for (int d = 0; d < D; d++) { o[d] = kvt_f32_to_bf16_down(mn[d]); o[D + d] = kvt_f32_to_bf16_up(mx[d]); }
        }
        if (s->d.key_format == KVT_KEY_BF16) {
            uint16_t *o = (uint16_t *)kp + (int64_t)t * D;
            for (int d = 0; d < D; d++) o[d] = kvt_f32_to_bf16(x[d]);
        } else if (s->d.key_format == KVT_KEY_INT8) {
            ksp[t] = quant_sym(x, D, 127, (int8_t *)kp + (int64_t)t * D);
        } else if (s->chan_scales) {
            quant_chan(x, D, zp, cinv, (int8_t *)kp + (int64_t)t * D);
        } else {
            int grp = s->d.key_group;
            for (int g0 = 0; g0 < D; g0 += grp)
                ksp[(int64_t)t * (D / grp) + g0 / grp] = quant_sym(x + g0, grp, 7, qb + g0);
            uint8_t *o = kp + (int64_t)t * (D / 2);
            for (int d = 0; d < D; d += 2)
                o[d / 2] = (uint8_t)((qb[d] & 0xf) | ((qb[d + 1] & 0xf) << 4));
        }
        load_row(a->v, a->src, off, D, x);
        if (s->d.value_format == KVT_VAL_BF16) {
            uint16_t *o = (uint16_t *)vp + (int64_t)t * D;
            for (int d = 0; d < D; d++) o[d] = kvt_f32_to_bf16(x[d]);
        } else {
            vsp[t] = quant_sym(x, D, 127, (int8_t *)vp + (int64_t)t * D);
        }
        if (s->d.chunk_sums) { /* sums of the tokens as stored: what the engine would attend */
            float *cs = (float *)kvt_chunk_sums_ptr(s, a->layer, a->ids[i], hh) + (int64_t)(t / S) * 2 * D;
            if (t % S == 0) memset(cs, 0, sizeof(float) * 2 * (size_t)D);
            kvt_dequant_key_row(s, lph, t, x);
            for (int d = 0; d < D; d++) cs[d] += x[d];
            kvt_dequant_value_row(s, lph, t, x);
            for (int d = 0; d < D; d++) cs[D + d] += x[d];
        }
    }
}

static void append_task(void *c, int64_t item, int tid) {
    (void)tid;
    const append_ctx *a = c;
    append_block(a, (int32_t)(item / a->s->d.kv_heads), (int)(item % a->s->d.kv_heads));
}

/* One process-wide pool for appends (every store), started on the first large
 * append with as many threads as the process may run on (again in a forked
 * child, which has none of the parent's threads); an append that finds it busy
 * (another thread appending) runs on its own thread. */
static kvt_pool *g_append_pool;
static pid_t g_append_pid;
static pthread_mutex_t g_append_mu = PTHREAD_MUTEX_INITIALIZER;

/* with g_append_mu held */
static kvt_pool *append_pool(void) {
    pid_t pid = getpid();
    if (g_append_pid != pid) {
        g_append_pid = pid; /* a parent's pool (after fork) is left alone: its threads are gone */
        g_append_pool = NULL;
        int n = 0;
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
        if (n <= 0) {
            long c = sysconf(_SC_NPROCESSORS_ONLN);
            n = c > 0 ? (int)c : 1;
        }
        if (n > 1) g_append_pool = kvt_pool_create(n);
    }
    return g_append_pool;
}

/* blocks of at least this many elements (k and v together) go through the pool */
#define APPEND_POOL_MIN_ELEMS (1 << 17)

static int cmp_i32(const void *x, const void *y) {
    const int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

/* KVT_ERR_VALUE if a page id repeats (two blocks would write one page at once) */
static int32_t check_unique(const int32_t *ids, int32_t n) {
    if (n < 2) return KVT_OK;
    int32_t *c = malloc(sizeof(int32_t) * (size_t)n);
    if (!c) return kvt_err(KVT_ERR_NOMEM, "kvt_append: out of memory checking %d page ids", n);
    memcpy(c, ids, sizeof(int32_t) * (size_t)n);
    qsort(c, (size_t)n, sizeof(int32_t), cmp_i32);
    int32_t dup = -1;
    for (int32_t i = 1; i < n && dup < 0; i++)
        if (c[i] == c[i - 1]) dup = c[i];
    free(c);
    if (dup >= 0) return kvt_err(KVT_ERR_VALUE, "kvt_append: expected distinct page ids, got page %d twice", dup);
    return KVT_OK;
}

/* Runs fn over the append's items, on the append pool when the blocks are large and
 * the pool is free, else on this thread. */
static void append_items(append_ctx *a, int64_t items, kvt_task_fn fn) {
    if (items > 1 && 2 * items * a->s->d.page_tokens * a->s->d.head_dim >= APPEND_POOL_MIN_ELEMS) {
        if (pthread_mutex_trylock(&g_append_mu) == 0) {
            kvt_pool *pool = append_pool();
            if (pool) kvt_pool_run(pool, items, fn, a);
            pthread_mutex_unlock(&g_append_mu);
            if (pool) return;
        }
    }
    for (int64_t it = 0; it < items; it++) fn(a, it, 0);
}

/* k and v are checked whole before anything is written: a refused append changes nothing. */
static int32_t append_held(kvt_store *s, int32_t layer, int32_t n, const int32_t *ids, const void *k,
                           const void *v, int32_t src_dtype) {
    int32_t rc = check_pages(s, layer, n, ids, "kvt_append");
    if (rc) return rc;
    if (src_dtype != KVT_SRC_F32 && src_dtype != KVT_SRC_BF16)
        return kvt_err(KVT_ERR_VALUE, "kvt_append: expected src_dtype 0 (f32) or 1 (bf16), got %d", src_dtype);
    if (n > 0 && (!k || !v)) return kvt_err(KVT_ERR_VALUE, "kvt_append: expected k and v, got NULL");
    if ((rc = check_unique(ids, n))) return rc;
    append_ctx a = {s, layer, src_dtype, ids, k, v, INT64_MAX};
    const int64_t items = (int64_t)n * s->d.kv_heads;
    append_items(&a, items, scan_task);
    const long long bad = atomic_load(&a.bad);
    if (bad != INT64_MAX) {
        const int64_t e = bad / 2, D = s->d.head_dim, T = s->d.page_tokens, H = s->d.kv_heads;
        const int64_t blk = e / (T * D);
        return kvt_err(KVT_ERR_VALUE, "kvt_append: expected finite keys and values, got a NaN or infinity in %s "
                       "at [%lld, %lld, %lld, %lld] (page %d, kv head %lld, token %lld, channel %lld); nothing "
                       "was written", bad % 2 ? "v" : "k", (long long)(blk / H), (long long)(blk % H),
                       (long long)(e / D % T), (long long)(e % D), ids[blk / H], (long long)(blk % H),
                       (long long)(e / D % T), (long long)(e % D));
    }
    append_items(&a, items, append_task);
    return KVT_OK;
}

int32_t kvt_append(int32_t h, int32_t layer, int32_t n, const int32_t *ids, const void *k,
                   const void *v, int32_t src_dtype) {
    kvt_store *s = kvt_store_acquire(h);
    if (!s) return KVT_ERR_HANDLE;
    const int32_t rc = append_held(s, layer, n, ids, k, v, src_dtype);
    kvt_store_release(s);
    return rc;
}

static int32_t dequant(int32_t h, int32_t layer, int32_t n, const int32_t *ids, float *out, int keys) {
    const char *fn = keys ? "kvt_dequant_keys" : "kvt_dequant_values";
    kvt_store *s = kvt_store_acquire(h);
    if (!s) return KVT_ERR_HANDLE;
    int32_t rc = check_pages(s, layer, n, ids, fn);
    if (!rc && n > 0 && !out) rc = kvt_err(KVT_ERR_VALUE, "%s: expected an output buffer, got NULL", fn);
    if (rc) {
        kvt_store_release(s);
        return rc;
    }
    const int H = s->d.kv_heads, T = s->d.page_tokens, D = s->d.head_dim;
    for (int32_t i = 0; i < n; i++)
        for (int hh = 0; hh < H; hh++) {
            int64_t lph = kvt_lph(s, layer, ids[i], hh);
            for (int t = 0; t < T; t++) {
                float *o = out + (((int64_t)i * H + hh) * T + t) * D;
                if (keys) kvt_dequant_key_row(s, lph, t, o);
                else kvt_dequant_value_row(s, lph, t, o);
            }
        }
    kvt_store_release(s);
    return KVT_OK;
}

int32_t kvt_dequant_keys(int32_t h, int32_t layer, int32_t n, const int32_t *ids, float *out) {
    return dequant(h, layer, n, ids, out, 1);
}

int32_t kvt_dequant_values(int32_t h, int32_t layer, int32_t n, const int32_t *ids, float *out) {
    return dequant(h, layer, n, ids, out, 0);
}

/* int8_channel rows of one page, whose channel scales and zero points are c: the scores
 * are q'.k + q.z with q' = q * scale per channel, from the int8 kernel with unit token
 * scales, in blocks of KVT_CHAN_HEADS query heads and KVT_ONES tokens */
#define KVT_CHAN_HEADS 8
const float kvt_ones[KVT_ONES] = {[0 ... KVT_ONES - 1] = 1.f};

/* o[d] = bf16 c[d] as float: a shift, in a loop that vectorizes */
static inline void bf16_row(const uint16_t *restrict c, int D, float *restrict o) {
    for (int d = 0; d < D; d++) {
        const uint32_t u = (uint32_t)c[d] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        o[d] = f;
    }
}

static inline void mul_row(const float *restrict a, const float *restrict b, int D, float *restrict o) {
    for (int d = 0; d < D; d++) o[d] = a[d] * b[d];
}

void kvt_score_rows_chan(const kvt_store *s, const uint8_t *kp, const uint16_t *c, int n, const float *q, int G,
                         float *out, int64_t os) {
    const int D = s->d.head_dim;
    float cf[1024], zf[1024], qc[KVT_CHAN_HEADS * 1024], off[KVT_CHAN_HEADS];
    bf16_row(c, D, cf);
    bf16_row(c + D, D, zf);
    for (int g0 = 0; g0 < G; g0 += KVT_CHAN_HEADS) {
        const int gn = G - g0 < KVT_CHAN_HEADS ? G - g0 : KVT_CHAN_HEADS;
        const float *qg = q + (int64_t)g0 * D;
        for (int g = 0; g < gn; g++) mul_row(qg + (int64_t)g * D, cf, D, qc + g * D);
        kvt_k->dot_f32(zf, D, qg, gn, 1.f, off); /* q . z per head */
        for (int t0 = 0; t0 < n; t0 += KVT_ONES) {
            const int tn = n - t0 < KVT_ONES ? n - t0 : KVT_ONES;
            kvt_k->score_i8((const int8_t *)kp + (int64_t)t0 * D, kvt_ones, tn, D, qc, gn, out + g0 * os + t0, os);
        }
        for (int g = 0; g < gn; g++) {
            float *o = out + (g0 + g) * os;
            for (int t = 0; t < n; t++) o[t] += off[g];
        }
    }
}

void kvt_score_row_chan(const kvt_store *s, const uint8_t *kp, const uint16_t *c, const float *q, int G,
                        float *out, int64_t os) {
    const int D = s->d.head_dim;
    float cf[1024], zf[1024], x[1024], r[KVT_CHAN_HEADS];
    bf16_row(c, D, cf);
    bf16_row(c + D, D, zf);
    const int8_t *k8 = (const int8_t *)kp;
    for (int d = 0; d < D; d++) x[d] = (float)k8[d] * cf[d] + zf[d];
    for (int g0 = 0; g0 < G; g0 += KVT_CHAN_HEADS) {
        const int gn = G - g0 < KVT_CHAN_HEADS ? G - g0 : KVT_CHAN_HEADS;
        kvt_k->dot_f32(x, D, q + (int64_t)g0 * D, gn, 1.f, r);
        for (int g = 0; g < gn; g++) out[(int64_t)(g0 + g) * os] = r[g];
    }
}

void kvt_score_rows(const kvt_store *s, const uint8_t *kp, const float *ks, int n, const float *q, int G,
                    float *out, int64_t os) {
    const int D = s->d.head_dim;
    switch (s->d.key_format) {
    case KVT_KEY_BF16: kvt_k->score_bf16((const uint16_t *)kp, n, D, q, G, out, os); break;
    case KVT_KEY_INT8: kvt_k->score_i8((const int8_t *)kp, ks, n, D, q, G, out, os); break;
    default: kvt_k->score_i4(kp, ks, n, D, s->d.key_group, q, G, out, os);
    }
}

void kvt_score_page(const kvt_store *s, int64_t lph, int t0, int n, const float *q, int G,
                    float *out, int64_t os) {
    if (s->chan_scales) {
        kvt_score_rows_chan(s, kvt_key_ptr(s, lph) + (int64_t)t0 * s->key_tok, kvt_kchan_ptr(s, lph), n, q, G, out,
                            os);
        return;
    }
    const float *ks = kvt_kscale_ptr(s, lph);
    kvt_score_rows(s, kvt_key_ptr(s, lph) + (int64_t)t0 * s->key_tok, ks ? ks + (int64_t)t0 * s->kscale_tok : NULL,
                   n, q, G, out, os);
}

void kvt_accum_token(const kvt_store *s, int64_t lph, int t, const float *p, int64_t ps, int G,
                     float *acc) {
    const int D = s->d.head_dim;
    const uint8_t *vp = kvt_val_ptr(s, lph) + (int64_t)t * s->val_tok;
    if (s->d.value_format == KVT_VAL_BF16)
        kvt_k->accum_bf16((const uint16_t *)vp, D, p, ps, G, acc);
    else
        kvt_k->accum_i8((const int8_t *)vp, kvt_vscale_ptr(s, lph)[t], D, p, ps, G, acc);
}

int32_t kvt_advise_hugepages(void *p, int64_t nbytes, int32_t *advised) {
    if (!advised) return kvt_err(KVT_ERR_VALUE, "kvt_advise_hugepages: expected an advised pointer, got NULL");
    *advised = 0;
    if (nbytes < 0 || (!p && nbytes > 0))
        return kvt_err(KVT_ERR_VALUE, "kvt_advise_hugepages: expected a buffer and nbytes >= 0, got %p, %lld", p,
                       (long long)nbytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21, a = (uintptr_t)p, e = a + (uintptr_t)nbytes;
    const uintptr_t lo = (a + huge - 1) & ~(huge - 1), hi = e & ~(huge - 1);
    if (hi > lo && madvise((void *)lo, hi - lo, MADV_HUGEPAGE) == 0) *advised = 1;
#endif
    return KVT_OK;
}
