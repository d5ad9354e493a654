/* Per-ISA kernels. Every variant computes the same sums as the generic one
 * (only the summation order differs); the build has no -march flags, so the
 * SIMD variants are compiled per function with target attributes and picked
 * at run time from CPUID. */
#define _GNU_SOURCE /* syscall (the AMX permission) */
#include <math.h>
#include <string.h>
#include <immintrin.h>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "kvt_internal.h"

/* int4: two signed nibbles per byte, low nibble = even channel. */
static inline int i4_lo(uint8_t b) { return (int)((int8_t)(uint8_t)(b << 4) >> 4); }
static inline int i4_hi(uint8_t b) { return (int)((int8_t)b >> 4); }

static inline void i4_dequant_token(const uint8_t *k, const float *ks, int D, int grp, float *kf) {
    for (int d = 0; d < D; d += 2) {
        uint8_t b = k[d >> 1];
        float sc = ks[d / grp];
        kf[d] = (float)i4_lo(b) * sc;
        kf[d + 1] = (float)i4_hi(b) * sc;
    }
}

/* ------------------------------------------------------------------ generic */
static void score_bf16_generic(const uint16_t *k, int n, int D, const float *q, int G,
                               float *out, int64_t os) {
    for (int t = 0; t < n; t++, k += D)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int d = 0; d < D; d++) s += q[g * D + d] * kvt_bf16_to_f32(k[d]);
            out[g * os + t] = s;
        }
}

static void score_i8_generic(const int8_t *k, const float *ks, int n, int D, const float *q,
                             int G, float *out, int64_t os) {
    for (int t = 0; t < n; t++, k += D)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int d = 0; d < D; d++) s += q[g * D + d] * (float)k[d];
            out[g * os + t] = s * ks[t];
        }
}

static void score_i4_generic(const uint8_t *k, const float *ks, int n, int D, int grp,
                             const float *q, int G, float *out, int64_t os) {
    float kf[1024];
    for (int t = 0; t < n; t++, k += D / 2, ks += D / grp) {
        i4_dequant_token(k, ks, D, grp, kf);
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int d = 0; d < D; d++) s += q[g * D + d] * kf[d];
            out[g * os + t] = s;
        }
    }
}

static void accum_bf16_generic(const uint16_t *v, int D, const float *p, int64_t ps, int G,
                               float *acc) {
    for (int g = 0; g < G; g++) {
        float w = p[g * ps];
        for (int d = 0; d < D; d++) acc[g * D + d] += w * kvt_bf16_to_f32(v[d]);
    }
}

static void accum_i8_generic(const int8_t *v, float scale, int D, const float *p, int64_t ps,
                             int G, float *acc) {
    for (int g = 0; g < G; g++) {
        float w = p[g * ps] * scale;
        for (int d = 0; d < D; d++) acc[g * D + d] += w * (float)v[d];
    }
}

#define ACCUM_ROWS_VIA_TOKENS(NAME, BF16, I8, ATTR)                                           \
    ATTR static void NAME(const void *const *rows, const float *scales, int is_i8, int count,   \
                          int D, const float *p, int64_t ps, int G, float *acc) {               \
        for (int j = 0; j < count; j++) {                                                       \
            if (is_i8) I8((const int8_t *)rows[j], scales[j], D, p + j, ps, G, acc);            \
            else BF16((const uint16_t *)rows[j], D, p + j, ps, G, acc);                         \
        }                                                                                       \
    }

ACCUM_ROWS_VIA_TOKENS(accum_rows_generic, accum_bf16_generic, accum_i8_generic, )

static uint64_t sum_bytes_generic(const uint8_t *buf, int64_t n) {
    uint64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += buf[i];
    return s;
}

static float softmax_generic(const float *x, int n, float *p) {
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = kvt_maxf(mx, x[j]);
    float sum = 0.f;
    for (int j = 0; j < n; j++) { p[j] = expf(x[j] - mx); sum += p[j]; }
    float inv = 1.f / sum;
    for (int j = 0; j < n; j++) p[j] *= inv;
    return mx + logf(sum);
}

static void soft_cap_generic(float *x, int n, float cap) {
    for (int i = 0; i < n; i++) x[i] = cap * tanhf(x[i] / cap);
}

static double sum_exp_generic(const float *x, int n, float ref, float below) {
    double z = 0.0;
    for (int i = 0; i < n; i++)
        if (x[i] < below) z += exp((double)(x[i] - ref));
    return z;
}

static void bound_bf16_generic(const uint16_t *s, int n, int D2, const float *w, int G, float *out, int64_t os) {
    for (int c = 0; c < n; c++, s += D2)
        for (int g = 0; g < G; g++) {
            const float *wg = w + (int64_t)g * D2;
            float a = 0.f;
            for (int d = 0; d < D2; d++) a += wg[d] * kvt_bf16_to_f32(s[d]);
            out[g * os + c] = a;
        }
}

/* in a fixed order of 8 lanes */
static void dot_f32_generic(const float *x, int D, const float *q, int G, float scale, float *out) {
    for (int g = 0; g < G; g++) {
        const float *qg = q + (int64_t)g * D;
        float a[8] = {0.f};
        for (int d = 0; d < D; d += 8)
            for (int l = 0; l < 8; l++) a[l] += qg[d + l] * x[d + l];
        out[g] = (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) * scale;
    }
}

static void axpy_f32_generic(const float *x, int D, const float *w, int G, float *acc) {
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) acc[(int64_t)g * D + d] += w[g] * x[d];
}

static const kvt_kernels K_GENERIC = {
    "generic", score_bf16_generic, score_i8_generic, score_i4_generic,
    accum_bf16_generic, accum_i8_generic, sum_bytes_generic, accum_rows_generic,
    softmax_generic, NULL, NULL, soft_cap_generic, sum_exp_generic, bound_bf16_generic,
    dot_f32_generic, axpy_f32_generic,
};

#if defined(__x86_64__) || defined(__i386__)
/* ------------------------------------------------------------------- AVX2 */
#define T_AVX2 __attribute__((target("avx2,fma")))

T_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* kf holds the token as floats; one key load serves every query head of the group */
T_AVX2 static inline void dot_group_avx2(const float *kf, int D, const float *q, int G,
                                         float scale, float *out, int64_t os) {
    for (int g = 0; g < G; g++) {
        const float *qg = q + (int64_t)g * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int d = 0;
        for (; d + 16 <= D; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kf + d), _mm256_loadu_ps(qg + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(kf + d + 8), _mm256_loadu_ps(qg + d + 8), a1);
        }
        for (; d < D; d += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(kf + d), _mm256_loadu_ps(qg + d), a0);
        out[g * os] = hsum256(_mm256_add_ps(a0, a1)) * scale;
    }
}

T_AVX2 static void score_bf16_avx2(const uint16_t *k, int n, int D, const float *q, int G,
                                   float *out, int64_t os) {
    float kf[1024] __attribute__((aligned(32)));
    for (int t = 0; t < n; t++, k += D) {
        for (int d = 0; d < D; d += 8) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(k + d)));
            _mm256_store_ps(kf + d, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
        dot_group_avx2(kf, D, q, G, 1.f, out + t, os);
    }
}

T_AVX2 static void score_i8_avx2_tok(const int8_t *k, const float *ks, int n, int D, const float *q,
                                     int G, float *out, int64_t os) {
    float kf[1024] __attribute__((aligned(32)));
    for (int t = 0; t < n; t++, k += D) {
        for (int d = 0; d < D; d += 8) {
            __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k + d)));
            _mm256_store_ps(kf + d, _mm256_cvtepi32_ps(w));
        }
        dot_group_avx2(kf, D, q, G, ks[t], out + t, os);
    }
}

/* Throughput kernel as TILE_512: TT tokens x GG heads (TT * GG = 8) keep 8
 * accumulators, one key conversion serves every head of the tile, and one
 * transpose-reduce (hsum8_ps) turns them into 8 logits; lane i = g * TT + t. */
T_AVX2 static inline __m256 hsum8_ps(const __m256 *a) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo4 = _mm256_hadd_ps(s01, s23), hi4 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

#define TILE_I8_AVX2(NAME, TT, GG)                                                                \
    T_AVX2 __attribute__((noinline)) static void NAME(const int8_t *k, const float *ks, int D,    \
                                                      const float *q, float *out, int64_t os) {    \
        __m256 acc[8];                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();         \
        for (int j = 0; j < D; j += 8) {                                                          \
            __m256 qv[GG];                                                                        \
            _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++) qv[g] = _mm256_loadu_ps(q + (int64_t)g * D + j); \
            _Pragma("GCC unroll 8") for (int t = 0; t < TT; t++) {                                \
                __m256 kv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                              \
                    _mm_loadl_epi64((const __m128i *)(k + (int64_t)t * D + j))));                 \
                _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++)                              \
                    acc[g * TT + t] = _mm256_fmadd_ps(kv, qv[g], acc[g * TT + t]);                \
            }                                                                                     \
        }                                                                                         \
        float r[8] __attribute__((aligned(32)));                                                  \
        _mm256_store_ps(r, hsum8_ps(acc));                                                        \
        for (int g = 0; g < GG; g++)                                                              \
            for (int t = 0; t < TT; t++) out[g * os + t] = r[g * TT + t] * ks[t];                 \
    }

TILE_I8_AVX2(tile_i8_2x4_avx2, 2, 4)
TILE_I8_AVX2(tile_i8_4x2_avx2, 4, 2)
TILE_I8_AVX2(tile_i8_8x1_avx2, 8, 1)

T_AVX2 static void score_i8_avx2(const int8_t *k, const float *ks, int n, int D, const float *q,
                                 int G, float *out, int64_t os) {
    for (int g = 0; g < G;) {
        const int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 8 / gg;
        const int nt = n - n % tt;
        const float *qg = q + (int64_t)g * D;
        for (int t = 0; t < nt; t += tt) {
            const int8_t *kt = k + (int64_t)t * D;
            if (gg == 4) tile_i8_2x4_avx2(kt, ks + t, D, qg, out + g * os + t, os);
            else if (gg == 2) tile_i8_4x2_avx2(kt, ks + t, D, qg, out + g * os + t, os);
            else tile_i8_8x1_avx2(kt, ks + t, D, qg, out + g * os + t, os);
        }
        if (nt < n) score_i8_avx2_tok(k + (int64_t)nt * D, ks + nt, n - nt, D, qg, gg, out + g * os + nt, os);
        g += gg;
    }
}

/* int4 keys, 8 channels (4 bytes) -> floats in channel order times the group
 * scale, the same products as i4_dequant_token (the nibble split of i4_dq16_512). */
T_AVX2 static inline __m256 i4_dq8_avx2(const uint8_t *kp, float sc) {
    int32_t b4;
    memcpy(&b4, kp, 4);
    __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(b4));
    __m128i x = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x000f)),
                             _mm_and_si128(_mm_slli_epi16(w, 4), _mm_set1_epi16(0x0f00)));
    x = _mm_sub_epi8(_mm_xor_si128(x, _mm_set1_epi8(8)), _mm_set1_epi8(8));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)), _mm256_set1_ps(sc));
}

/* grp % 8 == 0: one scale per 8 channels. Tiles as TILE_I8_AVX2. */
#define TILE_I4_AVX2(NAME, TT, GG)                                                                \
    T_AVX2 __attribute__((noinline)) static void NAME(const uint8_t *k, const float *ks, int D,   \
                                                      int grp, const float *q, float *out,        \
                                                      int64_t os) {                               \
        __m256 acc[8];                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();         \
        const int rb = D / 2, ng = D / grp;                                                       \
        for (int j = 0, gi = 0, left = grp; j < D; j += 8) {                                      \
            __m256 qv[GG];                                                                        \
            _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++) qv[g] = _mm256_loadu_ps(q + (int64_t)g * D + j); \
            _Pragma("GCC unroll 8") for (int t = 0; t < TT; t++) {                                \
                __m256 kv = i4_dq8_avx2(k + (int64_t)t * rb + j / 2, ks[t * ng + gi]);            \
                _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++)                              \
                    acc[g * TT + t] = _mm256_fmadd_ps(kv, qv[g], acc[g * TT + t]);                \
            }                                                                                     \
            if ((left -= 8) == 0) { gi++; left = grp; }                                           \
        }                                                                                         \
        float r[8] __attribute__((aligned(32)));                                                  \
        _mm256_store_ps(r, hsum8_ps(acc));                                                        \
        for (int g = 0; g < GG; g++)                                                              \
            for (int t = 0; t < TT; t++) out[g * os + t] = r[g * TT + t];                         \
    }

TILE_I4_AVX2(tile_i4_2x4_avx2, 2, 4)
TILE_I4_AVX2(tile_i4_4x2_avx2, 4, 2)
TILE_I4_AVX2(tile_i4_8x1_avx2, 8, 1)

T_AVX2 static void score_i4_avx2_tok(const uint8_t *k, const float *ks, int n, int D, int grp,
                                     const float *q, int G, float *out, int64_t os) {
    float kf[1024] __attribute__((aligned(32)));
    for (int t = 0; t < n; t++, k += D / 2, ks += D / grp) {
        if (grp % 8 == 0)
            for (int d = 0; d < D; d += 8) _mm256_store_ps(kf + d, i4_dq8_avx2(k + d / 2, ks[d / grp]));
        else
            i4_dequant_token(k, ks, D, grp, kf);
        dot_group_avx2(kf, D, q, G, 1.f, out + t, os);
    }
}

T_AVX2 static void score_i4_avx2(const uint8_t *k, const float *ks, int n, int D, int grp,
                                 const float *q, int G, float *out, int64_t os) {
    if (grp % 8 != 0) { /* groups that split an 8-channel vector: per token */
        score_i4_avx2_tok(k, ks, n, D, grp, q, G, out, os);
        return;
    }
    const int rb = D / 2, ng = D / grp;
    for (int g = 0; g < G;) {
        const int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 8 / gg;
        const int nt = n - n % tt;
        const float *qg = q + (int64_t)g * D;
        for (int t = 0; t < nt; t += tt) {
            const uint8_t *kt = k + (int64_t)t * rb;
            const float *kst = ks + (int64_t)t * ng;
            if (gg == 4) tile_i4_2x4_avx2(kt, kst, D, grp, qg, out + g * os + t, os);
            else if (gg == 2) tile_i4_4x2_avx2(kt, kst, D, grp, qg, out + g * os + t, os);
            else tile_i4_8x1_avx2(kt, kst, D, grp, qg, out + g * os + t, os);
        }
        if (nt < n)
            score_i4_avx2_tok(k + (int64_t)nt * rb, ks + (int64_t)nt * ng, n - nt, D, grp, qg, gg,
                              out + g * os + nt, os);
        g += gg;
    }
}

T_AVX2 static void accum_bf16_avx2(const uint16_t *v, int D, const float *p, int64_t ps, int G,
                                   float *acc) {
    for (int d = 0; d < D; d += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + d)));
        __m256 vf = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        for (int g = 0; g < G; g++) {
            float *a = acc + (int64_t)g * D + d;
            _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[g * ps]), vf, _mm256_loadu_ps(a)));
        }
    }
}

T_AVX2 static void accum_i8_avx2(const int8_t *v, float scale, int D, const float *p, int64_t ps,
                                 int G, float *acc) {
    for (int d = 0; d < D; d += 8) {
        __m256 vf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + d))));
        for (int g = 0; g < G; g++) {
            float *a = acc + (int64_t)g * D + d;
            _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[g * ps] * scale), vf, _mm256_loadu_ps(a)));
        }
    }
}

T_AVX2 static uint64_t sum_bytes_avx2(const uint8_t *buf, int64_t n) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256(), z = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm256_add_epi64(acc0, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(buf + i)), z));
        acc1 = _mm256_add_epi64(acc1, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(buf + i + 32)), z));
    }
    uint64_t l[4];
    _mm256_storeu_si256((__m256i *)l, _mm256_add_epi64(acc0, acc1));
    uint64_t s = l[0] + l[1] + l[2] + l[3];
    for (; i < n; i++) s += buf[i];
    return s;
}

/* Register-tiled as accum_rows_512: 4 heads x 16 channels of accumulators (8 ymm)
 * stay in registers across all selected rows, instead of a load/store of acc per
 * (row, head); acc gets each tile's sums added once at the end. */
T_AVX2 static void accum_rows_avx2(const void *const *rows, const float *scales, int is_i8, int count, int D,
                                   const float *p, int64_t ps, int G, float *acc) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int gg = G - g0 < 4 ? G - g0 : 4;
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m256 a[4][2];
            for (int g = 0; g < 4; g++) a[g][0] = a[g][1] = _mm256_setzero_ps();
            for (int j = 0; j < count; j++) {
                if (j + 8 < count) /* rows are scattered: prefetch 8 ahead */
                    _mm_prefetch((const char *)rows[j + 8] + (is_i8 ? d0 : 2 * d0), _MM_HINT_T0);
                __m256 x0, x1;
                if (is_i8) {
                    const __m128i w = _mm_loadu_si128((const __m128i *)((const int8_t *)rows[j] + d0));
                    x0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
                    x1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(w, w)));
                } else {
                    const uint16_t *r = (const uint16_t *)rows[j] + d0;
                    x0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)r)), 16));
                    x1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + 8))), 16));
                }
                for (int g = 0; g < 4; g++) {
                    if (g >= gg) break;
                    const __m256 w = _mm256_set1_ps(p[(g0 + g) * ps + j] * (is_i8 ? scales[j] : 1.f));
                    a[g][0] = _mm256_fmadd_ps(w, x0, a[g][0]);
                    a[g][1] = _mm256_fmadd_ps(w, x1, a[g][1]);
                }
            }
            for (int g = 0; g < gg; g++) {
                float *o = acc + (int64_t)(g0 + g) * D + d0;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[g][0]));
                _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), a[g][1]));
            }
        }
    }
}

T_AVX2 static void bound_bf16_avx2(const uint16_t *s, int n, int D2, const float *w, int G, float *out,
                                   int64_t os) {
    float sf[2048] __attribute__((aligned(32)));
    for (int c = 0; c < n; c++, s += D2) {
        for (int d = 0; d < D2; d += 8) {
            __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + d)));
            _mm256_store_ps(sf + d, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
        }
        for (int g = 0; g < G; g++) {
            const float *wg = w + (int64_t)g * D2;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int d = 0; d < D2; d += 16) {
                a0 = _mm256_fmadd_ps(_mm256_load_ps(sf + d), _mm256_loadu_ps(wg + d), a0);
                a1 = _mm256_fmadd_ps(_mm256_load_ps(sf + d + 8), _mm256_loadu_ps(wg + d + 8), a1);
            }
            out[g * os + c] = hsum256(_mm256_add_ps(a0, a1));
        }
    }
}

T_AVX2 static void dot_f32_avx2(const float *x, int D, const float *q, int G, float scale, float *out) {
    dot_group_avx2(x, D, q, G, scale, out, 1);
}

T_AVX2 static void axpy_f32_avx2(const float *x, int D, const float *w, int G, float *acc) {
    for (int g = 0; g < G; g++) {
        const __m256 wg = _mm256_set1_ps(w[g]);
        float *a = acc + (int64_t)g * D;
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(a + d, _mm256_fmadd_ps(wg, _mm256_loadu_ps(x + d), _mm256_loadu_ps(a + d)));
    }
}

/* ---- int8 keys x int16 query (selection stage), AVX2 --------------------------
 * vpmaddwd sums two int16 x int16 products into each int32 lane: 16 channels per
 * step, the integer sums exact as on AVX-512 (|q16| <= kvt_q16_max(D)). A tile of
 * TT tokens x GG query heads keeps TT * GG = 8 accumulators (16 ymm registers in
 * all), one key load serving every head of the tile; hsum8_epi32 reduces the 8
 * accumulators to one vector, lane i the sum of accumulator i. D is a multiple of
 * 16 (the store takes no other head dim). */
T_AVX2 static inline __m256i hsum8_epi32(const __m256i *a) {
    __m256i s01 = _mm256_hadd_epi32(a[0], a[1]), s23 = _mm256_hadd_epi32(a[2], a[3]);
    __m256i s45 = _mm256_hadd_epi32(a[4], a[5]), s67 = _mm256_hadd_epi32(a[6], a[7]);
    __m256i lo4 = _mm256_hadd_epi32(s01, s23), hi4 = _mm256_hadd_epi32(s45, s67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(lo4, hi4, 0x20), _mm256_permute2x128_si256(lo4, hi4, 0x31));
}

#define TILE_Q16_AVX2(NAME, TT, GG)                                                               \
    T_AVX2 __attribute__((noinline)) static void NAME(const int8_t *k, const float *ks, int D,    \
                                                      const int16_t *q, const float *qs,          \
                                                      float *out, int64_t os) {                    \
        __m256i acc[8];                                                                           \
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();      \
        for (int j = 0; j < D; j += 16) {                                                         \
            __m256i qv[GG];                                                                       \
            _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++)                                  \
                qv[g] = _mm256_loadu_si256((const __m256i *)(q + (int64_t)g * D + j));            \
            _Pragma("GCC unroll 8") for (int t = 0; t < TT; t++) {                                \
                __m256i kv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k + (int64_t)t * D + j))); \
                _Pragma("GCC unroll 8") for (int g = 0; g < GG; g++)                              \
                    acc[g * TT + t] = _mm256_add_epi32(acc[g * TT + t], _mm256_madd_epi16(kv, qv[g])); \
            }                                                                                     \
        }                                                                                         \
        int32_t sums[8] __attribute__((aligned(32)));                                             \
        _mm256_store_si256((__m256i *)sums, hsum8_epi32(acc));                                    \
        for (int g = 0; g < GG; g++)                                                              \
            for (int t = 0; t < TT; t++) out[g * os + t] = ((float)sums[g * TT + t] * ks[t]) * qs[g]; \
    }

TILE_Q16_AVX2(tile_q16_2x4_avx2, 2, 4)
TILE_Q16_AVX2(tile_q16_4x2_avx2, 4, 2)
TILE_Q16_AVX2(tile_q16_8x1_avx2, 8, 1)

T_AVX2 static void q16_tok_avx2(const int8_t *k, const float *ks, int n, int D, const int16_t *q,
                                const float *qs, int G, float *out, int64_t os) {
    for (int t = 0; t < n; t++, k += D)
        for (int g = 0; g < G; g++) {
            const int16_t *qg = q + (int64_t)g * D;
            __m256i a = _mm256_setzero_si256();
            for (int j = 0; j < D; j += 16)
                a = _mm256_add_epi32(a, _mm256_madd_epi16(
                        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k + j))),
                        _mm256_loadu_si256((const __m256i *)(qg + j))));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
            out[g * os + t] = ((float)_mm_cvtsi128_si32(s) * ks[t]) * qs[g];
        }
}

T_AVX2 static void score_i8_q16_avx2(const int8_t *k, const float *ks, int n, int D, const int16_t *q,
                                     const float *qs, int G, float *out, int64_t os, const int8_t *next,
                                     int64_t next_bytes) {
    (void)next, (void)next_bytes; /* sequential keys: the hardware prefetcher keeps up on AVX2 machines */
    for (int g = 0; g < G;) {
        const int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 8 / gg;
        const int nt = n - n % tt;
        const int16_t *qg = q + (int64_t)g * D;
        for (int t = 0; t < nt; t += tt) {
            const int8_t *kt = k + (int64_t)t * D;
            if (gg == 4) tile_q16_2x4_avx2(kt, ks + t, D, qg, qs + g, out + g * os + t, os);
            else if (gg == 2) tile_q16_4x2_avx2(kt, ks + t, D, qg, qs + g, out + g * os + t, os);
            else tile_q16_8x1_avx2(kt, ks + t, D, qg, qs + g, out + g * os + t, os);
        }
        if (nt < n) q16_tok_avx2(k + (int64_t)nt * D, ks + nt, n - nt, D, qg, qs + g, gg, out + g * os + nt, os);
        g += gg;
    }
}

/* ---- int4 keys x int16 query (selection stage), AVX2 --------------------------
 * As the AVX-512 kernel (score_i4_q16_*), in half steps of 32 channels = 16 key
 * bytes: vpmovsxbw widens them to 16-bit lanes w, (w << 12) >> 8 is 16 x the low
 * nibble (even channel) and w & 0xfff0 16 x the high nibble (odd channel); the
 * query is in kvt_i4_q16_layout's order, so vpmaddwd of the low nibbles with the
 * even channels' query plus that of the high nibbles with the odd ones gives int32
 * lane i = the exact sum of channels 4i..4i+3 of the half, all in one scale group
 * (grp % 4 == 0). Each half's lanes are converted to float and multiplied by
 * their group's scale. A half of 16 channels (D % 32 == 16) loads 8 bytes. */
typedef struct {
    __m256i idx[32];  /* lane i -> group of channel 32h + 4i, relative to base[h] */
    __m256i smask[32]; /* scales that exist from base[h] on (at most 8) */
    int base[32];     /* first group of half h */
    int nh, last8;    /* halves; 1 when the last holds 16 channels */
} i4_halves;

T_AVX2 static void i4_halves_init(i4_halves *st, int D, int grp) {
    const int ng = D / grp;
    st->nh = (D + 31) / 32;
    st->last8 = D % 32 != 0;
    for (int h = 0; h < st->nh; h++) {
        int32_t ix[8], mk[8];
        const int j = 32 * h, b = j / grp, cnt = ng - b < 8 ? ng - b : 8;
        for (int i = 0; i < 8; i++) {
            ix[i] = j + 4 * i < D ? (j + 4 * i) / grp - b : 0;
            mk[i] = i < cnt ? -1 : 0;
        }
        st->idx[h] = _mm256_loadu_si256((const __m256i *)ix);
        st->smask[h] = _mm256_loadu_si256((const __m256i *)mk);
        st->base[h] = b;
    }
}

/* half h of token kp (its bytes at kp + 16h) against GG heads: acc[g * TT] += scale * sum */
#define I4Q16_HALF_AVX2(GG, TT, kp, ksr, h, qg, Dp, acc)                                          \
    do {                                                                                          \
        const __m128i b_ = (h) == st->nh - 1 && st->last8 ? _mm_loadl_epi64((const __m128i *)((kp) + 16 * (h))) \
                                                          : _mm_loadu_si128((const __m128i *)((kp) + 16 * (h))); \
        const __m256i w_ = _mm256_cvtepi8_epi16(b_);                                              \
        const __m256i lo_ = _mm256_srai_epi16(_mm256_slli_epi16(w_, 12), 8);                      \
        const __m256i hi_ = _mm256_and_si256(w_, _mm256_set1_epi16((short)0xfff0));               \
        const __m256 sc_ = _mm256_permutevar8x32_ps(_mm256_maskload_ps((ksr) + st->base[h], st->smask[h]), st->idx[h]); \
        const int o_ = 64 * ((h) >> 1) + 16 * ((h) & 1);                                           \
        _Pragma("GCC unroll 8") for (int g_ = 0; g_ < GG; g_++) {                                 \
            const int16_t *q_ = (qg) + (int64_t)g_ * (Dp) + o_;                                   \
            const __m256i s_ = _mm256_add_epi32(                                                  \
                _mm256_madd_epi16(lo_, _mm256_loadu_si256((const __m256i *)q_)),                  \
                _mm256_madd_epi16(hi_, _mm256_loadu_si256((const __m256i *)(q_ + 32))));          \
            (acc)[g_ * (TT)] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s_), sc_, (acc)[g_ * (TT)]);    \
        }                                                                                         \
    } while (0)

#define TILE_I4Q16_AVX2(NAME, TT, GG)                                                             \
    T_AVX2 __attribute__((noinline)) static void NAME(const uint8_t *k, const float *ks, int D,   \
                                                      int ng, const int16_t *q, int Dp,           \
                                                      const float *qs, const i4_halves *st,        \
                                                      float *out, int64_t os) {                    \
        __m256 acc[8];                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();         \
        for (int h = 0; h < st->nh; h++)                                                          \
            _Pragma("GCC unroll 8") for (int t = 0; t < TT; t++)                                  \
                I4Q16_HALF_AVX2(GG, TT, k + (int64_t)t * (D / 2), ks + (int64_t)t * ng, h, q, Dp, acc + t); \
        float r[8] __attribute__((aligned(32)));                                                  \
        _mm256_store_ps(r, hsum8_ps(acc));                                                        \
        for (int g = 0; g < GG; g++)                                                              \
            for (int t = 0; t < TT; t++) out[g * os + t] = r[g * TT + t] * (qs[g] * 0.0625f);     \
    }

TILE_I4Q16_AVX2(tile_i4q16_2x4_avx2, 2, 4)
TILE_I4Q16_AVX2(tile_i4q16_4x2_avx2, 4, 2)
TILE_I4Q16_AVX2(tile_i4q16_8x1_avx2, 8, 1)

T_AVX2 static void i4q16_tok_avx2(const uint8_t *k, const float *ks, int n, int D, int ng, const int16_t *q,
                                  int Dp, const float *qs, const i4_halves *st, int G, float *out, int64_t os) {
    for (int t = 0; t < n; t++, k += D / 2, ks += ng)
        for (int g = 0; g < G; g++) {
            __m256 a[1] = {_mm256_setzero_ps()};
            for (int h = 0; h < st->nh; h++) I4Q16_HALF_AVX2(1, 1, k, ks, h, q + (int64_t)g * Dp, Dp, a);
            __m128 x = _mm_add_ps(_mm256_castps256_ps128(a[0]), _mm256_extractf128_ps(a[0], 1));
            x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
            out[g * os + t] = _mm_cvtss_f32(x) * (qs[g] * 0.0625f);
        }
}

T_AVX2 static void score_i4_q16_avx2(const uint8_t *k, const float *ks, int n, int D, int grp, const int16_t *q,
                                     const float *qs, int G, float *out, int64_t os, const uint8_t *next,
                                     int64_t next_bytes) {
    (void)next, (void)next_bytes; /* sequential keys: the hardware prefetcher keeps up on AVX2 machines */
    i4_halves st;
    i4_halves_init(&st, D, grp);
    const int ng = D / grp, Dp = kvt_i4_q16_dp(D), rb = D / 2;
    for (int g = 0; g < G;) {
        const int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 8 / gg;
        const int nt = n - n % tt;
        const int16_t *qg = q + (int64_t)g * Dp;
        for (int t = 0; t < nt; t += tt) {
            const uint8_t *kt = k + (int64_t)t * rb;
            const float *kst = ks + (int64_t)t * ng;
            if (gg == 4) tile_i4q16_2x4_avx2(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os);
            else if (gg == 2) tile_i4q16_4x2_avx2(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os);
            else tile_i4q16_8x1_avx2(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os);
        }
        if (nt < n)
            i4q16_tok_avx2(k + (int64_t)nt * rb, ks + (int64_t)nt * ng, n - nt, D, ng, qg, Dp, qs + g, &st, gg,
                           out + g * os + nt, os);
        g += gg;
    }
}

/* exp(x) for x <= 0 as exp_neg_512 computes it (2^n * p(r), |r| <= ln2/2, degree-7 Taylor);
 * 2^n is put into the exponent bits (n >= -104 + rounding: x is clamped at -87, below which
 * every term is under 2^-125 of the largest, 1: counted as 0 by the float sums either way) */
T_AVX2 static inline __m256 exp_neg_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* sum_exp in float over 8 lanes, two partial sums combined in double (as sum_exp_512) */
T_AVX2 static double sum_exp_avx2(const float *x, int n, float ref, float below) {
    const __m256 vr = _mm256_set1_ps(ref), vb = _mm256_set1_ps(below);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
        s0 = _mm256_add_ps(s0, _mm256_and_ps(_mm256_cmp_ps(a, vb, _CMP_LT_OQ), exp_neg_avx2(_mm256_sub_ps(a, vr))));
        s1 = _mm256_add_ps(s1, _mm256_and_ps(_mm256_cmp_ps(b, vb, _CMP_LT_OQ), exp_neg_avx2(_mm256_sub_ps(b, vr))));
    }
    for (; j + 8 <= n; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j);
        s0 = _mm256_add_ps(s0, _mm256_and_ps(_mm256_cmp_ps(a, vb, _CMP_LT_OQ), exp_neg_avx2(_mm256_sub_ps(a, vr))));
    }
    double z = (double)hsum256(s0) + (double)hsum256(s1);
    for (; j < n; j++)
        if (x[j] < below) z += exp((double)(x[j] - ref));
    return z;
}

static const kvt_kernels K_AVX2 = {
    "avx2", score_bf16_avx2, score_i8_avx2, score_i4_avx2,
    accum_bf16_avx2, accum_i8_avx2, sum_bytes_avx2, accum_rows_avx2,
    softmax_generic, score_i8_q16_avx2, score_i4_q16_avx2, soft_cap_generic, sum_exp_avx2, bound_bf16_avx2,
    dot_f32_avx2, axpy_f32_avx2,
};

/* ----------------------------------------------------------------- AVX-512 */
#define T_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

T_512 static inline void dot_group_512(const __m512 *kf, int nv, const float *q, int D, int G,
                                       float scale, float *out, int64_t os) {
    for (int g = 0; g < G; g++) {
        const float *qg = q + (int64_t)g * D;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int j = 0;
        for (; j + 2 <= nv; j += 2) {
            a0 = _mm512_fmadd_ps(kf[j], _mm512_loadu_ps(qg + 16 * j), a0);
            a1 = _mm512_fmadd_ps(kf[j + 1], _mm512_loadu_ps(qg + 16 * j + 16), a1);
        }
        if (j < nv) a0 = _mm512_fmadd_ps(kf[j], _mm512_loadu_ps(qg + 16 * j), a0);
        out[g * os] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
    }
}

/* Throughput kernel: a tile of TT tokens x GG query heads (TT*GG = 16) keeps 16
 * accumulators in registers, and one transpose-reduce turns them into 16 logits,
 * instead of a horizontal reduction per (token, head). Lane i = g*TT + t. */
T_512 static inline __m512 reduce16_512(__m512 *v) {
    __m512 u[8], w[4], x[2];
    for (int i = 0; i < 8; i++)
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* KF: 0 = int8 keys (row bytes D), 1 = bf16 keys (row elements D) */
#define TILE_512(NAME, KT, KF, TT, GG)                                                          \
    T_512 __attribute__((noinline)) static void NAME(const KT *k, const float *ks, int D,         \
                                                     const float *q, float *out, int64_t os) {    \
        __m512 acc[16];                                                                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();       \
        for (int j = 0; j < D; j += 16) {                                                         \
            __m512 qv[GG];                                                                        \
            _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++) qv[g] = _mm512_loadu_ps(q + g * D + j); \
            _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++) {                               \
                __m512 kv;                                                                        \
                if (KF == 0)                                                                      \
                    kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(                                 \
                        _mm_loadu_si128((const __m128i *)((const int8_t *)k + (int64_t)t * D + j)))); \
                else                                                                              \
                    kv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(            \
                        _mm256_loadu_si256((const __m256i *)((const uint16_t *)k + (int64_t)t * D + j))), 16)); \
                _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                             \
                    acc[g * TT + t] = _mm512_fmadd_ps(kv, qv[g], acc[g * TT + t]);                \
            }                                                                                     \
        }                                                                                         \
        __m512 r = reduce16_512(acc);                                                             \
        if (KF == 0) {                                                                            \
            __m512 sc;                                                                            \
            if (TT == 16) sc = _mm512_loadu_ps(ks);                                               \
            else if (TT == 8) {                                                                   \
                sc = _mm512_castps256_ps512(_mm256_loadu_ps(ks));                                 \
                sc = _mm512_shuffle_f32x4(sc, sc, _MM_SHUFFLE(1, 0, 1, 0));                       \
            }                                                                                     \
            else sc = _mm512_broadcast_f32x4(_mm_loadu_ps(ks));                                   \
            r = _mm512_mul_ps(r, sc);                                                             \
        }                                                                                         \
        float tmp[16] __attribute__((aligned(64)));                                               \
        _mm512_store_ps(tmp, r);                                                                  \
        for (int g = 0; g < GG; g++) memcpy(out + g * os, tmp + g * TT, sizeof(float) * TT);     \
    }

TILE_512(tile_i8_16x1, int8_t, 0, 16, 1)
TILE_512(tile_i8_8x2, int8_t, 0, 8, 2)
TILE_512(tile_i8_4x4, int8_t, 0, 4, 4)
TILE_512(tile_bf16_16x1, uint16_t, 1, 16, 1)
TILE_512(tile_bf16_8x2, uint16_t, 1, 8, 2)
TILE_512(tile_bf16_4x4, uint16_t, 1, 4, 4)

typedef void (*tile_fn)(const void *, const float *, int, const float *, float *, int64_t);

typedef void (*tile_fn)(const void *, const float *, int, const float *, float *, int64_t);
typedef void (*tok_fn)(const void *, const float *, int, int, const float *, int, float *, int64_t);

/* Cover n tokens x G heads with tiles of 4x4, 8x2 or 16x1; tokens left over at
 * the end of a head block go through the per-token kernel. */
T_512 static void tile_pass_512(const char *k, int64_t row, const float *ks, int n, int D,
                                const float *q, int G, float *out, int64_t os,
                                const tile_fn *tiles, tok_fn tail) {
    for (int g = 0; g < G;) {
        int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 16 / gg;
        tile_fn f = tiles[gg == 4 ? 0 : (gg == 2 ? 1 : 2)];
        int nt = n - n % tt;
        for (int t = 0; t < nt; t += tt)
            f(k + t * row, ks ? ks + t : NULL, D, q + (int64_t)g * D, out + g * os + t, os);
        if (nt < n)
            tail(k + nt * row, ks ? ks + nt : NULL, n - nt, D, q + (int64_t)g * D, gg,
                 out + g * os + nt, os);
        g += gg;
    }
}

T_512 static void score_bf16_512_tok(const void *kv, const float *unused, int n, int D, const float *q, int G,
                                     float *out, int64_t os) {
    (void)unused;
    const uint16_t *k = kv;
    __m512 kf[64];
    int nv = D / 16;
    for (int t = 0; t < n; t++, k += D) {
        for (int j = 0; j < nv; j++) {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k + 16 * j)));
            kf[j] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        }
        dot_group_512(kf, nv, q, D, G, 1.f, out + t, os);
    }
}

T_512 static void score_i8_512_tok(const void *kv, const float *ks, int n, int D, const float *q,
                                   int G, float *out, int64_t os) {
    const int8_t *k = kv;
    __m512 kf[64];
    int nv = D / 16;
    for (int t = 0; t < n; t++, k += D) {
        if (t + 4 < n) _mm_prefetch((const char *)(k + 4 * D), _MM_HINT_T0);
        for (int j = 0; j < nv; j++)
            kf[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(k + 16 * j))));
        dot_group_512(kf, nv, q, D, G, ks[t], out + t, os);
    }
}

static const tile_fn TILES_I8[3] = {(tile_fn)tile_i8_4x4, (tile_fn)tile_i8_8x2, (tile_fn)tile_i8_16x1};
static const tile_fn TILES_BF16[3] = {(tile_fn)tile_bf16_4x4, (tile_fn)tile_bf16_8x2, (tile_fn)tile_bf16_16x1};

T_512 static void score_i8_512(const int8_t *k, const float *ks, int n, int D, const float *q,
                               int G, float *out, int64_t os) {
    tile_pass_512((const char *)k, D, ks, n, D, q, G, out, os, TILES_I8, score_i8_512_tok);
}

T_512 static void score_bf16_512(const uint16_t *k, int n, int D, const float *q, int G,
                                 float *out, int64_t os) {
    tile_pass_512((const char *)k, 2 * D, NULL, n, D, q, G, out, os, TILES_BF16, score_bf16_512_tok);
}

/* int4 keys, 16 channels (8 bytes) -> floats in channel order times the group
 * scale, the same products as i4_dequant_token: each byte widens to a 16-bit lane
 * whose low byte takes the low nibble and high byte the high nibble; (x ^ 8) - 8
 * sign-extends a nibble within its byte. */
T_512 static inline __m512 i4_dq16_512(const uint8_t *kp, float sc) {
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)kp));
    __m128i x = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x000f)),
                             _mm_and_si128(_mm_slli_epi16(w, 4), _mm_set1_epi16(0x0f00)));
    x = _mm_sub_epi8(_mm_xor_si128(x, _mm_set1_epi8(8)), _mm_set1_epi8(8));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)), _mm512_set1_ps(sc));
}

/* grp % 16 == 0: one scale per 16 channels. Tiles as TILE_512. */
#define TILE_I4_512(NAME, TT, GG)                                                                 \
    T_512 __attribute__((noinline)) static void NAME(const uint8_t *k, const float *ks, int D,    \
                                                     int grp, const float *q, float *out,         \
                                                     int64_t os) {                                \
        __m512 acc[16];                                                                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();       \
        const int rb = D / 2, ng = D / grp;                                                       \
        for (int j = 0, gi = 0, left = grp; j < D; j += 16) {                                     \
            __m512 qv[GG];                                                                        \
            _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++) qv[g] = _mm512_loadu_ps(q + g * D + j); \
            _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++) {                               \
                __m512 kv = i4_dq16_512(k + (int64_t)t * rb + j / 2, ks[t * ng + gi]);            \
                _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                             \
                    acc[g * TT + t] = _mm512_fmadd_ps(kv, qv[g], acc[g * TT + t]);                \
            }                                                                                     \
            if ((left -= 16) == 0) { gi++; left = grp; }                                          \
        }                                                                                         \
        float tmp[16] __attribute__((aligned(64)));                                               \
        _mm512_store_ps(tmp, reduce16_512(acc));                                                  \
        for (int g = 0; g < GG; g++) memcpy(out + g * os, tmp + g * TT, sizeof(float) * TT);     \
    }

TILE_I4_512(tile_i4_16x1, 16, 1)
TILE_I4_512(tile_i4_8x2, 8, 2)
TILE_I4_512(tile_i4_4x4, 4, 4)

T_512 static void score_i4_512_tok(const uint8_t *k, const float *ks, int n, int D, int grp,
                                   const float *q, int G, float *out, int64_t os) {
    __m512 kf[64];
    const int nv = D / 16, ng = D / grp;
    for (int t = 0; t < n; t++, k += D / 2, ks += ng) {
        for (int j = 0; j < nv; j++) kf[j] = i4_dq16_512(k + 8 * j, ks[16 * j / grp]);
        dot_group_512(kf, nv, q, D, G, 1.f, out + t, os);
    }
}

T_512 static void score_i4_512(const uint8_t *k, const float *ks, int n, int D, int grp,
                               const float *q, int G, float *out, int64_t os) {
    if (grp % 16 != 0) { /* groups that split a 16-channel vector: per token, scalar dequantization */
        float kbuf[1024] __attribute__((aligned(64)));
        __m512 kf[64];
        int nv = D / 16;
        for (int t = 0; t < n; t++, k += D / 2, ks += D / grp) {
            i4_dequant_token(k, ks, D, grp, kbuf);
            for (int j = 0; j < nv; j++) kf[j] = _mm512_load_ps(kbuf + 16 * j);
            dot_group_512(kf, nv, q, D, G, 1.f, out + t, os);
        }
        return;
    }
    const int rb = D / 2, ng = D / grp;
    for (int g = 0; g < G;) {
        int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 16 / gg, nt = n - n % tt;
        const float *qg = q + (int64_t)g * D;
        for (int t = 0; t < nt; t += tt) {
            const uint8_t *kt = k + (int64_t)t * rb;
            const float *kst = ks + (int64_t)t * ng;
            if (gg == 4) tile_i4_4x4(kt, kst, D, grp, qg, out + g * os + t, os);
            else if (gg == 2) tile_i4_8x2(kt, kst, D, grp, qg, out + g * os + t, os);
            else tile_i4_16x1(kt, kst, D, grp, qg, out + g * os + t, os);
        }
        if (nt < n)
            score_i4_512_tok(k + (int64_t)nt * rb, ks + (int64_t)nt * ng, n - nt, D, grp, qg, gg,
                             out + g * os + nt, os);
        g += gg;
    }
}

T_512 static void accum_bf16_512(const uint16_t *v, int D, const float *p, int64_t ps, int G,
                                 float *acc) {
    for (int d = 0; d < D; d += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + d)));
        __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        for (int g = 0; g < G; g++) {
            float *a = acc + (int64_t)g * D + d;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * ps]), vf, _mm512_loadu_ps(a)));
        }
    }
}

T_512 static void accum_i8_512(const int8_t *v, float scale, int D, const float *p, int64_t ps,
                               int G, float *acc) {
    for (int d = 0; d < D; d += 16) {
        __m512 vf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(v + d))));
        for (int g = 0; g < G; g++) {
            float *a = acc + (int64_t)g * D + d;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g * ps] * scale), vf, _mm512_loadu_ps(a)));
        }
    }
}

T_512 static uint64_t sum_bytes_512(const uint8_t *buf, int64_t n) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512(), z = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        acc0 = _mm512_add_epi64(acc0, _mm512_sad_epu8(_mm512_loadu_si512(buf + i), z));
        acc1 = _mm512_add_epi64(acc1, _mm512_sad_epu8(_mm512_loadu_si512(buf + i + 64), z));
    }
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1));
    for (; i < n; i++) s += buf[i];
    return s;
}

/* Register-tiled: 4 heads x 64 channels of accumulators stay in registers across
 * all selected rows, instead of a load/store of acc per (row, head). */
T_512 static void accum_rows_512(const void *const *rows, const float *scales, int is_i8, int count,
                                 int D, const float *p, int64_t ps, int G, float *acc) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        int gg = G - g0 < 4 ? G - g0 : 4;
        for (int d0 = 0; d0 < D; d0 += 64) {
            int nv = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
            __m512 a[4][4];
            for (int g = 0; g < 4; g++)
                for (int v = 0; v < 4; v++) a[g][v] = _mm512_setzero_ps();
            for (int j = 0; j < count; j++) {
                if (j + 8 < count) /* rows are scattered: prefetch 8 ahead */
                    for (int v = 0; v < nv; v++)
                        _mm_prefetch((const char *)rows[j + 8] + (is_i8 ? d0 + 16 * v : 2 * (d0 + 16 * v)), _MM_HINT_T0);
                __m512 x[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                               _mm512_setzero_ps()};
                if (is_i8) {
                    const int8_t *r = (const int8_t *)rows[j] + d0;
                    for (int v = 0; v < 4; v++)
                        if (v < nv)
                            x[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r + 16 * v))));
                } else {
                    const uint16_t *r = (const uint16_t *)rows[j] + d0;
                    for (int v = 0; v < 4; v++)
                        if (v < nv)
                            x[v] = _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + 16 * v))), 16));
                }
                for (int g = 0; g < 4; g++) {
                    if (g >= gg) break;
                    __m512 w = _mm512_set1_ps(p[(g0 + g) * ps + j] * (is_i8 ? scales[j] : 1.f));
                    for (int v = 0; v < 4; v++)
                        if (v < nv) a[g][v] = _mm512_fmadd_ps(w, x[v], a[g][v]);
                }
            }
            for (int g = 0; g < gg; g++)
                for (int v = 0; v < nv; v++) {
                    float *o = acc + (int64_t)(g0 + g) * D + d0 + 16 * v;
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[g][v]));
                }
        }
    }
}

/* exp(x) for x <= 0 (softmax arguments): 2^n * p(r), |r| <= ln2/2, degree-7
 * Taylor polynomial (truncation < 1e-8 relative); scalef does the 2^n. */
T_512 static inline __m512 exp_neg_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

T_512 static float softmax_512(const float *x, int n, float *p) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
    float mx = _mm512_reduce_max_ps(m);
    for (; j < n; j++) mx = kvt_maxf(mx, x[j]);
    __m512 vm = _mm512_set1_ps(mx), s = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 e = exp_neg_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vm));
        e = _mm512_maskz_mov_ps(k, e);
        _mm512_mask_storeu_ps(p + j, k, e);
        s = _mm512_add_ps(s, e);
    }
    float sum = _mm512_reduce_add_ps(s);
    __m512 inv = _mm512_set1_ps(1.f / sum);
    for (j = 0; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(p + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j), inv));
    }
    return mx + logf(sum);
}

/* float exp over 16 lanes (x <= ref, so every term is in (0, 1]); four partial
 * sums, combined in double at the end */
T_512 static double sum_exp_512(const float *x, int n, float ref, float below) {
    __m512 vr = _mm512_set1_ps(ref), vb = _mm512_set1_ps(below);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
        __mmask16 ka = _mm512_cmp_ps_mask(a, vb, _CMP_LT_OQ), kb = _mm512_cmp_ps_mask(b, vb, _CMP_LT_OQ);
        s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(ka, exp_neg_512(_mm512_sub_ps(a, vr))));
        s1 = _mm512_add_ps(s1, _mm512_maskz_mov_ps(kb, exp_neg_512(_mm512_sub_ps(b, vr))));
    }
    for (; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(k, x + j);
        k &= _mm512_cmp_ps_mask(a, vb, _CMP_LT_OQ);
        s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(k, exp_neg_512(_mm512_sub_ps(a, vr))));
    }
    return (double)_mm512_reduce_add_ps(s0) + (double)_mm512_reduce_add_ps(s1);
}

/* cap * tanh(x / cap) = cap * sign(x) * (1 - 2 / (exp(2|x|/cap) + 1)); absolute error
 * a few ulp of cap (selection stage only; attend recomputes with tanhf) */
T_512 static void soft_cap_512(float *x, int n, float cap) {
    __m512 c = _mm512_set1_ps(cap), m2 = _mm512_set1_ps(-2.f / cap), one = _mm512_set1_ps(1.f);
    for (int j = 0; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, x + j);
        __m512 a = _mm512_abs_ps(v);
        __m512 e = exp_neg_512(_mm512_mul_ps(a, m2)); /* exp(-2|x|/cap) in (0, 1] */
        __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
        t = _mm512_mul_ps(c, t);
        /* copy the sign of v */
        t = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
                _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32((int)0x80000000u))));
        _mm512_mask_storeu_ps(x + j, k, t);
    }
}

/* ---- int8 keys x int16 query (selection stage) --------------------------------
 * Keys are sign-extended to int16 (vpmovsxbw) and multiplied with the int16
 * query by vpdpwssd (VNNI) or vpmaddwd + vpaddd (AVX512BW): one key load serves
 * every query head of the group, sums are exact in int32. Tiles as the float
 * kernels: TT tokens x GG heads = 16 accumulators, one transpose-reduce. */
#define T_512V __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#ifndef KVT_PF_BYTES
#define KVT_PF_BYTES 2048 /* key prefetch distance of the selection kernels */
#endif
#define DP_VNNI(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#define DP_BW(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))

#define REDUCE16_EPI32(ATTR, NAME)                                                                \
    ATTR static inline __m512i NAME(__m512i *v) {                                                \
        __m512i u[8], w[4], x[2];                                                                 \
        for (int i = 0; i < 8; i++)                                                               \
            u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),               \
                                    _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));              \
        for (int i = 0; i < 4; i++)                                                               \
            w[i] = _mm512_add_epi32(                                                              \
                _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(u[2 * i]),              \
                    _mm512_castsi512_ps(u[2 * i + 1]), _MM_SHUFFLE(1, 0, 1, 0))),                 \
                _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(u[2 * i]),              \
                    _mm512_castsi512_ps(u[2 * i + 1]), _MM_SHUFFLE(3, 2, 3, 2))));                \
        for (int i = 0; i < 2; i++)                                                               \
            x[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)), \
                                    _mm512_shuffle_i32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1))); \
        return _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),      \
                                _mm512_shuffle_i32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));     \
    }
REDUCE16_EPI32(T_512, reduce16_epi32_bw)
REDUCE16_EPI32(T_512V, reduce16_epi32_vnni)

#define TILE_Q16(ATTR, NAME, DP, RED, TT, GG)                                                    \
    ATTR __attribute__((noinline)) static void NAME(const int8_t *k, const float *ks, int D,      \
                                                    const int16_t *q, const float *qs,            \
                                                    float *out, int64_t os, const char *pf) {      \
        __m512i acc[16];                                                                          \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();    \
        if (pf)                                                                                   \
            for (int i = 0; i < TT * D; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);               \
        int j = 0;                                                                                \
        for (; j + 32 <= D; j += 32) {                                                            \
            __m512i qv[GG];                                                                       \
            _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                                 \
                qv[g] = _mm512_loadu_si512((const void *)(q + (int64_t)g * D + j));               \
            _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++) {                               \
                __m512i kv = _mm512_cvtepi8_epi16(                                                \
                    _mm256_loadu_si256((const __m256i *)(k + (int64_t)t * D + j)));               \
                _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                             \
                    acc[g * TT + t] = DP(acc[g * TT + t], kv, qv[g]);                             \
            }                                                                                     \
        }                                                                                         \
        if (j < D) { /* D % 32 == 16 */                                                           \
            __m512i qv[GG];                                                                       \
            _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                                 \
                qv[g] = _mm512_maskz_loadu_epi16(0xffff, q + (int64_t)g * D + j);                 \
            _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++) {                               \
                __m512i kv = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(                         \
                    _mm_loadu_si128((const __m128i *)(k + (int64_t)t * D + j))));                 \
                _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++)                             \
                    acc[g * TT + t] = DP(acc[g * TT + t], kv, qv[g]);                             \
            }                                                                                     \
        }                                                                                         \
        __m512 r = _mm512_cvtepi32_ps(RED(acc));                                                  \
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); \
        __m512 kss = _mm512_maskz_loadu_ps((__mmask16)((1u << TT) - 1), ks);                     \
        __m512 qss = _mm512_maskz_loadu_ps((__mmask16)((1u << GG) - 1), qs);                     \
        kss = _mm512_permutexvar_ps(_mm512_and_si512(lane, _mm512_set1_epi32(TT - 1)), kss);     \
        qss = _mm512_permutexvar_ps(_mm512_srli_epi32(lane, TT == 16 ? 4 : (TT == 8 ? 3 : 2)), qss); \
        r = _mm512_mul_ps(_mm512_mul_ps(r, kss), qss);                                            \
        float tmp[16] __attribute__((aligned(64)));                                               \
        _mm512_store_ps(tmp, r);                                                                  \
        for (int g = 0; g < GG; g++) memcpy(out + g * os, tmp + g * TT, sizeof(float) * TT);     \
    }

#define Q16_FAMILY(ATTR, SFX, DP, RED)                                                            \
    TILE_Q16(ATTR, tile_q16_4x4_##SFX, DP, RED, 4, 4)                                            \
    TILE_Q16(ATTR, tile_q16_8x2_##SFX, DP, RED, 8, 2)                                            \
    TILE_Q16(ATTR, tile_q16_16x1_##SFX, DP, RED, 16, 1)                                          \
    ATTR static void q16_tok_##SFX(const int8_t *k, const float *ks, int n, int D,                \
                                   const int16_t *q, const float *qs, int G, float *out,          \
                                   int64_t os) {                                                  \
        for (int t = 0; t < n; t++, k += D)                                                       \
            for (int g = 0; g < G; g++) {                                                         \
                const int16_t *qg = q + (int64_t)g * D;                                           \
                __m512i a = _mm512_setzero_si512();                                               \
                int j = 0;                                                                        \
                for (; j + 32 <= D; j += 32)                                                      \
                    a = DP(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(k + j))), \
                           _mm512_loadu_si512((const void *)(qg + j)));                           \
                if (j < D)                                                                        \
                    a = DP(a, _mm512_cvtepi8_epi16(_mm256_castsi128_si256(                        \
                               _mm_loadu_si128((const __m128i *)(k + j)))),                       \
                           _mm512_maskz_loadu_epi16(0xffff, qg + j));                             \
                out[g * os + t] = ((float)_mm512_reduce_add_epi32(a) * ks[t]) * qs[g];            \
            }                                                                                     \
    }                                                                                             \
    ATTR static void score_i8_q16_##SFX(const int8_t *k, const float *ks, int n, int D,           \
                                        const int16_t *q, const float *qs, int G, float *out,     \
                                        int64_t os, const int8_t *next, int64_t next_bytes) {     \
        const int64_t nb = (int64_t)n * D;                                                        \
        for (int g = 0; g < G;) {                                                                 \
            int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 16 / gg;                         \
            int nt = n - n % tt;                                                                  \
            const int16_t *qg = q + (int64_t)g * D;                                               \
            for (int t = 0; t < nt; t += tt) {                                                    \
                const int8_t *kt = k + (int64_t)t * D;                                            \
                /* prefetch KVT_PF_BYTES ahead, continuing into the next segment (first       \
                 * head group only: the others find the keys in cache) */                     \
                int64_t a = (int64_t)t * D + KVT_PF_BYTES;                                        \
                const char *pf = NULL;                                                            \
                if (g == 0) {                                                                     \
                    if (a + (int64_t)tt * D <= nb) pf = (const char *)k + a;                      \
                    else if (next && a - nb + (int64_t)tt * D <= next_bytes)                      \
                        pf = (const char *)next + (a - nb);                                       \
                }                                                                                 \
                if (gg == 4) tile_q16_4x4_##SFX(kt, ks + t, D, qg, qs + g, out + g * os + t, os, pf); \
                else if (gg == 2) tile_q16_8x2_##SFX(kt, ks + t, D, qg, qs + g, out + g * os + t, os, pf); \
                else tile_q16_16x1_##SFX(kt, ks + t, D, qg, qs + g, out + g * os + t, os, pf);    \
            }                                                                                     \
            if (nt < n)                                                                           \
                q16_tok_##SFX(k + (int64_t)nt * D, ks + nt, n - nt, D, qg, qs + g, gg,            \
                              out + g * os + nt, os);                                             \
            g += gg;                                                                              \
        }                                                                                         \
    }

Q16_FAMILY(T_512, bw, DP_BW, reduce16_epi32_bw)
Q16_FAMILY(T_512V, vnni, DP_VNNI, reduce16_epi32_vnni)

/* ---- int4 keys x int16 query (selection stage) --------------------------------
 * A step covers 64 channels = 32 key bytes: vpmovsxbw widens the bytes to 16-bit
 * lanes w, (w << 12) >> 8 is 16 x the low nibble (even channel) and w & 0xfff0 16 x
 * the high nibble (odd channel) of lane m, channels j + 2m and j + 2m + 1 (one
 * shift fewer than unscaled nibbles; the 1/16 goes into the query scale, exactly).
 * The query is stored in that order (kvt_i4_q16_layout), so no interleave is
 * needed: int32 lane i of vpmaddwd(lo) + vpdpwssd(hi) sums channels j + 4i ..
 * j + 4i + 3 exactly (|sum| <= 4 * 128 * 32767 < 2^24, so also exact in float),
 * all in one scale group when grp % 4 == 0. Each step's sums are converted to
 * float and multiplied lane-wise by their group's scale. */
typedef struct {
    __m512i idx[16];     /* lane i -> group of channel j + 4i, relative to base[s] */
    __mmask16 smask[16]; /* scales that exist from base[s] on (at most 16) */
    int base[16];        /* first group of step s */
    int ns, nfull;       /* steps; steps with 64 channels (the last may have 16..48) */
    __mmask32 tail;      /* key bytes of the partial step */
} i4_steps;

T_512 static void i4_steps_init(i4_steps *st, int D, int grp) {
    const int ng = D / grp;
    st->ns = (D + 63) / 64;
    st->nfull = D / 64;
    st->tail = (__mmask32)((1u << ((D % 64) / 2)) - 1);
    for (int s = 0; s < st->ns; s++) {
        int32_t ix[16];
        const int j = 64 * s, b = j / grp, cnt = ng - b < 16 ? ng - b : 16;
        for (int i = 0; i < 16; i++) ix[i] = j + 4 * i < D ? (j + 4 * i) / grp - b : 0;
        st->idx[s] = _mm512_loadu_si512(ix);
        st->base[s] = b;
        st->smask[s] = (__mmask16)((1u << cnt) - 1);
    }
}

/* one step of token kp against GG heads: acc[g * TT] += scale * (lo.qlo + hi.qhi) */
#define I4Q16_STEP(DP, LOAD, GG, TT, kp, ksr, s, acc)                                            \
    do {                                                                                          \
        __m512i w_ = _mm512_cvtepi8_epi16(LOAD(kp));                                              \
        __m512i lo_ = _mm512_srai_epi16(_mm512_slli_epi16(w_, 12), 8);                            \
        __m512i hi_ = _mm512_and_si512(w_, _mm512_set1_epi16((short)0xfff0));                     \
        __m512 sc_ = _mm512_permutexvar_ps(st->idx[s], _mm512_maskz_loadu_ps(st->smask[s], (ksr) + st->base[s])); \
        _Pragma("GCC unroll 16") for (int g_ = 0; g_ < GG; g_++)                                  \
            (acc)[g_ * (TT)] = _mm512_fmadd_ps(                                                   \
                _mm512_cvtepi32_ps(DP(_mm512_madd_epi16(lo_, ql[g_]), hi_, qh[g_])), sc_, (acc)[g_ * (TT)]); \
    } while (0)
#define I4_LOAD_FULL(kp) _mm256_loadu_si256((const __m256i *)(kp))
#define I4_LOAD_TAIL(kp) _mm256_maskz_loadu_epi8(st->tail, (kp))

#define TILE_I4Q16(ATTR, NAME, DP, TT, GG)                                                        \
    ATTR __attribute__((noinline)) static void NAME(const uint8_t *k, const float *ks, int D,     \
                                                    int ng, const int16_t *q, int Dp,             \
                                                    const float *qs, const i4_steps *st,          \
                                                    float *out, int64_t os, const char *pf) {      \
        __m512 acc[16];                                                                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();       \
        const int rb = D / 2;                                                                     \
        if (pf)                                                                                   \
            for (int i = 0; i < TT * rb; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);              \
        for (int s = 0; s < st->ns; s++) {                                                        \
            __m512i ql[GG], qh[GG];                                                               \
            _Pragma("GCC unroll 16") for (int g = 0; g < GG; g++) {                               \
                ql[g] = _mm512_loadu_si512((const void *)(q + (int64_t)g * Dp + 64 * s));         \
                qh[g] = _mm512_loadu_si512((const void *)(q + (int64_t)g * Dp + 64 * s + 32));    \
            }                                                                                     \
            if (s < st->nfull) {                                                                  \
                _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++)                             \
                    I4Q16_STEP(DP, I4_LOAD_FULL, GG, TT, k + (int64_t)t * rb + 32 * s, ks + t * ng, s, acc + t); \
            } else {                                                                              \
                _Pragma("GCC unroll 16") for (int t = 0; t < TT; t++)                             \
                    I4Q16_STEP(DP, I4_LOAD_TAIL, GG, TT, k + (int64_t)t * rb + 32 * s, ks + t * ng, s, acc + t); \
            }                                                                                     \
        }                                                                                         \
        __m512 r = reduce16_512(acc);                                                             \
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); \
        __m512 qss = _mm512_maskz_loadu_ps((__mmask16)((1u << GG) - 1), qs);                     \
        qss = _mm512_permutexvar_ps(_mm512_srli_epi32(lane, TT == 16 ? 4 : (TT == 8 ? 3 : 2)), qss); \
        r = _mm512_mul_ps(r, _mm512_mul_ps(qss, _mm512_set1_ps(0.0625f)));                        \
        float tmp[16] __attribute__((aligned(64)));                                               \
        _mm512_store_ps(tmp, r);                                                                  \
        for (int g = 0; g < GG; g++) memcpy(out + g * os, tmp + g * TT, sizeof(float) * TT);     \
    }

#define I4Q16_FAMILY(ATTR, SFX, DP)                                                               \
    TILE_I4Q16(ATTR, tile_i4q16_4x4_##SFX, DP, 4, 4)                                             \
    TILE_I4Q16(ATTR, tile_i4q16_8x2_##SFX, DP, 8, 2)                                             \
    TILE_I4Q16(ATTR, tile_i4q16_16x1_##SFX, DP, 16, 1)                                           \
    ATTR static void i4q16_tok_##SFX(const uint8_t *k, const float *ks, int n, int D, int ng,     \
                                     const int16_t *q, int Dp, const float *qs,                   \
                                     const i4_steps *st, int G, float *out, int64_t os) {         \
        for (int t = 0; t < n; t++, k += D / 2, ks += ng)                                         \
            for (int g = 0; g < G; g++) {                                                         \
                const int16_t *qg = q + (int64_t)g * Dp;                                          \
                __m512 a[1] = {_mm512_setzero_ps()};                                              \
                for (int s = 0; s < st->ns; s++) {                                                \
                    __m512i ql[1] = {_mm512_loadu_si512((const void *)(qg + 64 * s))};            \
                    __m512i qh[1] = {_mm512_loadu_si512((const void *)(qg + 64 * s + 32))};       \
                    if (s < st->nfull) I4Q16_STEP(DP, I4_LOAD_FULL, 1, 1, k + 32 * s, ks, s, a);  \
                    else I4Q16_STEP(DP, I4_LOAD_TAIL, 1, 1, k + 32 * s, ks, s, a);                \
                }                                                                                 \
                out[g * os + t] = _mm512_reduce_add_ps(a[0]) * (qs[g] * 0.0625f);                 \
            }                                                                                     \
    }                                                                                             \
    ATTR static void score_i4_q16_##SFX(const uint8_t *k, const float *ks, int n, int D, int grp, \
                                        const int16_t *q, const float *qs, int G, float *out,     \
                                        int64_t os, const uint8_t *next, int64_t next_bytes) {    \
        i4_steps st;                                                                              \
        i4_steps_init(&st, D, grp);                                                               \
        const int rb = D / 2, ng = D / grp, Dp = 64 * st.ns;                                      \
        const int64_t nb = (int64_t)n * rb;                                                       \
        for (int g = 0; g < G;) {                                                                 \
            int gg = G - g >= 4 ? 4 : (G - g >= 2 ? 2 : 1), tt = 16 / gg;                         \
            int nt = n - n % tt;                                                                  \
            const int16_t *qg = q + (int64_t)g * Dp;                                              \
            for (int t = 0; t < nt; t += tt) {                                                    \
                const uint8_t *kt = k + (int64_t)t * rb;                                          \
                const float *kst = ks + (int64_t)t * ng;                                          \
                int64_t a = (int64_t)t * rb + KVT_PF_BYTES;                                       \
                const char *pf = NULL;                                                            \
                if (g == 0) {                                                                     \
                    if (a + (int64_t)tt * rb <= nb) pf = (const char *)k + a;                     \
                    else if (next && a - nb + (int64_t)tt * rb <= next_bytes)                     \
                        pf = (const char *)next + (a - nb);                                       \
                }                                                                                 \
                if (gg == 4) tile_i4q16_4x4_##SFX(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os, pf); \
                else if (gg == 2) tile_i4q16_8x2_##SFX(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os, pf); \
                else tile_i4q16_16x1_##SFX(kt, kst, D, ng, qg, Dp, qs + g, &st, out + g * os + t, os, pf); \
            }                                                                                     \
            if (nt < n)                                                                           \
                i4q16_tok_##SFX(k + (int64_t)nt * rb, ks + (int64_t)nt * ng, n - nt, D, ng, qg, Dp, \
                                qs + g, &st, gg, out + g * os + nt, os);                          \
            g += gg;                                                                              \
        }                                                                                         \
    }

I4Q16_FAMILY(T_512, bw, DP_BW)
I4Q16_FAMILY(T_512V, vnni, DP_VNNI)

/* ---- int8 keys x int16 query on AMX (selection stage) -------------------------
 * The same exact int32 sums as the VNNI kernel, from tile dot products: with the
 * query split as q = 256 * hi + lo (hi = q >> 8 signed, lo = q & 255 unsigned),
 * tdpbssd sums k * hi and tdpbsud k * lo over 64 channels per step for 16 tokens
 * (rows of the A tile, read straight from the page at stride D) times N <= 16
 * query heads (columns of the B tiles). 256 * hi_sum + lo_sum is then the sum of
 * k * q, which fits int32 (|q| <= kvt_q16_max(D)); the int32 arithmetic wraps, so
 * the intermediate 256 * hi_sum may overflow without changing it. The query is in
 * the B tiles' layout (q16_layout_amx), prepared once per run.
 *
 * Tiles: 0, 1 the hi and lo sums [16 tokens, N]; 2 a full 64-channel step of
 * keys, 3 the last step (D - 64 * (nb - 1) channels); 4, 5 a full step's hi and
 * lo query, 6, 7 the last step's. With nb <= 2 steps every query tile stays
 * loaded for the whole call. The tile instructions are written as inline asm
 * with memory clobbers (the compiler's intrinsics of this generation tell it
 * nothing about the memory that tile loads and stores touch). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

#define AMX_LOAD(t, base, stride) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"((int64_t)(stride)) : "memory")
#define AMX_STORE(t, base, stride) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"((int64_t)(stride)) : "memory")
#define AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define AMX_DPBSSD(c, a, b) __asm__ volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define AMX_DPBSUD(c, a, b) __asm__ volatile("tdpbsud %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

#ifndef KVT_AMX_PF
#define KVT_AMX_PF 8192 /* key prefetch distance: about a 64-token page of 128 channels ahead */
#endif
/* Loads the tile configuration for N heads and a last step of lastb channels unless the
 * thread already holds exactly it. The thread's tile state is read back (sttilecfg, about
 * 12 ns) rather than remembered: other code on the same thread (oneDNN's AMX kernels under
 * torch, for one) configures tiles its own way or releases them (tilerelease), and a tile
 * instruction after a release raises #UD, which kills the process with SIGILL. */
static void amx_configure(int N, int lastb) {
    amx_cfg c, cur;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16;
    c.colsb[0] = c.colsb[1] = c.colsb[4] = c.colsb[5] = c.colsb[6] = c.colsb[7] = (uint16_t)(4 * N);
    c.colsb[2] = 64;
    c.colsb[3] = (uint16_t)lastb;
    c.rows[6] = c.rows[7] = (uint8_t)(lastb / 4);
    __asm__ volatile("sttilecfg %0" : "=m"(cur)::"memory");
    if (memcmp(&c, &cur, sizeof c) != 0) __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory");
}

/* AMX selection query, in place: per block of N = min(16, G - g0) heads (at
 * q + g0 * D), the hi bytes as B rows [D / 4][N][4] (row r: channels 4r..4r+3 of
 * each head), then the lo bytes likewise; 2 * N * D bytes, the block's size. */
static void q16_layout_amx(int16_t *q, int D, int G) {
    uint8_t tmp[2 * 16 * 1024];
    for (int g0 = 0; g0 < G; g0 += 16) {
        const int N = G - g0 < 16 ? G - g0 : 16;
        int16_t *b = q + (int64_t)g0 * D;
        uint8_t *hi = tmp, *lo = tmp + (int64_t)N * D;
        for (int r = 0; r < D / 4; r++)
            for (int n = 0; n < N; n++)
                for (int i = 0; i < 4; i++) {
                    const int v = b[(int64_t)n * D + 4 * r + i];
                    hi[(r * N + n) * 4 + i] = (uint8_t)(int8_t)(v >> 8);
                    lo[(r * N + n) * 4 + i] = (uint8_t)(v & 255);
                }
        memcpy(b, tmp, (size_t)2 * N * D);
    }
}

/* 16 tokens (rows at kt, stride D) x N heads: the hi and lo sums into hs, ls
 * ([16][N] int32). Query tiles 6, 7 (and with nb == 2 also 4, 5) are loaded. */
T_512V static inline void amx_tile16(const int8_t *kt, int D, int nb, const uint8_t *bh, const uint8_t *bl,
                                     int N, int32_t *hs, int32_t *ls) {
    AMX_ZERO(0);
    AMX_ZERO(1);
    for (int s = 0; s < nb - 1; s++) {
        AMX_LOAD(2, kt + 64 * s, D);
        if (nb > 2) {
            AMX_LOAD(4, bh + (int64_t)64 * N * s, 4 * N);
            AMX_LOAD(5, bl + (int64_t)64 * N * s, 4 * N);
        }
        AMX_DPBSSD(0, 2, 4);
        AMX_DPBSUD(1, 2, 5);
    }
    AMX_LOAD(3, kt + 64 * (nb - 1), D);
    AMX_DPBSSD(0, 3, 6);
    AMX_DPBSUD(1, 3, 7);
    AMX_STORE(0, hs, 4 * N);
    AMX_STORE(1, ls, 4 * N);
}

/* out[g * os + i] = ((float)(256 * hs + ls)[i][g] * ks[i]) * qs[g], i < cnt (<= 16):
 * the VNNI kernel's arithmetic, in its order. The [16][N] sums are turned head-major
 * by permutes for N = 1, 2, 4 (Llama's and Mistral's groups), else by gathers. */
T_512V static inline void amx_finish16(int32_t *hs, const int32_t *ls, int N, const float *ks, int cnt,
                                       const float *qs, float *out, int64_t os) {
    const __mmask16 cm = cnt >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
    const __m512 kss = _mm512_maskz_loadu_ps(cm, ks);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i v[16], col[16];
    const int nv = N < 16 ? N : 16; /* vectors of 16 sums */
    for (int i = 0; i < nv; i++) {
        const __mmask16 m = 16 * N - 16 * i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (16 * N - 16 * i)) - 1);
        v[i] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, hs + 16 * i), 8),
                                _mm512_maskz_loadu_epi32(m, ls + 16 * i));
    }
    if (N == 1) {
        col[0] = v[0];
    } else if (N == 2) { /* v[i]: tokens 8i..8i+7, lane 2t + g */
        for (int g = 0; g < 2; g++)
            col[g] = _mm512_permutex2var_epi32(v[0], _mm512_add_epi32(_mm512_slli_epi32(lane, 1), _mm512_set1_epi32(g)), v[1]);
    } else if (N == 4) { /* v[i]: tokens 4i..4i+3, lane 4t + g; first tokens 0..7 (and 8..15) of two heads */
        const __m512i low8 = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 2);
        const __m512i hi8 = _mm512_srli_epi32(lane, 3); /* 0 for lanes 0..7, 1 for 8..15 */
        for (int g = 0; g < 4; g += 2) {
            const __m512i idx = _mm512_add_epi32(low8, _mm512_add_epi32(hi8, _mm512_set1_epi32(g)));
            __m512i a = _mm512_permutex2var_epi32(v[0], idx, v[1]), b = _mm512_permutex2var_epi32(v[2], idx, v[3]);
            col[g] = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(1, 0, 1, 0));
            col[g + 1] = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 2, 3, 2));
        }
    } else {
        for (int i = 0; i < nv; i++) _mm512_store_si512(hs + 16 * i, v[i]);
        const __m512i idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(N));
        for (int g = 0; g < N; g++) col[g] = _mm512_i32gather_epi32(_mm512_add_epi32(idx, _mm512_set1_epi32(g)), hs, 4);
    }
    for (int g = 0; g < N; g++)
        _mm512_mask_storeu_ps(out + g * os, cm,
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(col[g]), kss), _mm512_set1_ps(qs[g])));
}

T_512V static void score_i8_q16_amx(const int8_t *k, const float *ks, int n, int D, const int16_t *q,
                                    const float *qs, int G, float *out, int64_t os, const int8_t *next,
                                    int64_t next_bytes) {
    const int nb = (D + 63) / 64, lastb = D - 64 * (nb - 1), nt = n - n % 16;
    const int64_t nbytes = (int64_t)n * D;
    int32_t hs[256] __attribute__((aligned(64))), ls[256] __attribute__((aligned(64)));
    for (int g0 = 0; g0 < G; g0 += 16) {
        const int N = G - g0 < 16 ? G - g0 : 16;
        const uint8_t *bh = (const uint8_t *)(q + (int64_t)g0 * D), *bl = bh + (int64_t)N * D;
        amx_configure(N, lastb);
        AMX_LOAD(6, bh + (int64_t)64 * N * (nb - 1), 4 * N);
        AMX_LOAD(7, bl + (int64_t)64 * N * (nb - 1), 4 * N);
        if (nb == 2) {
            AMX_LOAD(4, bh, 4 * N);
            AMX_LOAD(5, bl, 4 * N);
        }
        for (int t = 0; t < nt; t += 16) {
            if (g0 == 0) { /* prefetch as the VNNI kernel, into the next segment past the end */
                const int64_t a = (int64_t)t * D + KVT_AMX_PF;
                const char *pf = NULL;
                if (a + 16 * (int64_t)D <= nbytes) pf = (const char *)k + a;
                else if (next && a - nbytes + 16 * (int64_t)D <= next_bytes) pf = (const char *)next + (a - nbytes);
                if (pf)
                    for (int i = 0; i < 16 * D; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
            }
            amx_tile16(k + (int64_t)t * D, D, nb, bh, bl, N, hs, ls);
            amx_finish16(hs, ls, N, ks + t, 16, qs + g0, out + (int64_t)g0 * os + t, os);
        }
        if (nt < n) { /* the last n % 16 tokens, padded with zero rows */
            int8_t pad[16 * 1024] __attribute__((aligned(64)));
            memset(pad, 0, (size_t)16 * D);
            memcpy(pad, k + (int64_t)nt * D, (size_t)(n - nt) * D);
            amx_tile16(pad, D, nb, bh, bl, N, hs, ls);
            amx_finish16(hs, ls, N, ks + nt, n - nt, qs + g0, out + (int64_t)g0 * os + nt, os);
        }
    }
}

/* The sums of four vectors at once: [sum a0, sum a1, sum a2, sum a3]. */
T_512 static inline __m128 hsum4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 b01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 b23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 c = _mm512_add_ps(_mm512_shuffle_ps(b01, b23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b01, b23, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

T_512 static void bound_bf16_512(const uint16_t *s, int n, int D2, const float *w, int G, float *out,
                                 int64_t os) {
    __m512 sf[128];
    const int nv = D2 / 16;
    for (int c = 0; c < n; c++, s += D2) {
        for (int j = 0; j < nv; j++) {
            __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + 16 * j)));
            sf[j] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        }
        int g = 0;
        for (; g + 4 <= G; g += 4) { /* four heads: one combined reduction */
            const float *w0 = w + (int64_t)g * D2;
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int j = 0; j < nv; j++)
                for (int i = 0; i < 4; i++)
                    a[i] = _mm512_fmadd_ps(sf[j], _mm512_loadu_ps(w0 + (int64_t)i * D2 + 16 * j), a[i]);
            float r[4];
            _mm_storeu_ps(r, hsum4_512(a[0], a[1], a[2], a[3]));
            for (int i = 0; i < 4; i++) out[(g + i) * os + c] = r[i];
        }
        for (; g < G; g++) {
            const float *wg = w + (int64_t)g * D2;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int j = 0; j < nv; j += 2) {
                a0 = _mm512_fmadd_ps(sf[j], _mm512_loadu_ps(wg + 16 * j), a0);
                a1 = _mm512_fmadd_ps(sf[j + 1], _mm512_loadu_ps(wg + 16 * j + 16), a1);
            }
            out[g * os + c] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        }
    }
}

T_512 static void dot_f32_512(const float *x, int D, const float *q, int G, float scale, float *out) {
    __m512 kf[64];
    const int nv = D / 16;
    for (int j = 0; j < nv; j++) kf[j] = _mm512_loadu_ps(x + 16 * j);
    dot_group_512(kf, nv, q, D, G, scale, out, 1);
}

T_512 static void axpy_f32_512(const float *x, int D, const float *w, int G, float *acc) {
    for (int g = 0; g < G; g++) {
        const __m512 wg = _mm512_set1_ps(w[g]);
        float *a = acc + (int64_t)g * D;
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(a + d, _mm512_fmadd_ps(wg, _mm512_loadu_ps(x + d), _mm512_loadu_ps(a + d)));
    }
}

static const kvt_kernels K_AVX512 = {
    "avx512", score_bf16_512, score_i8_512, score_i4_512,
    accum_bf16_512, accum_i8_512, sum_bytes_512, accum_rows_512,
    softmax_512, score_i8_q16_bw, score_i4_q16_bw, soft_cap_512, sum_exp_512, bound_bf16_512,
    dot_f32_512, axpy_f32_512,
};

/* K_AVX512 under its own name: KVTIER_ISA=avx512bw forces the AVX512BW selection
 * kernels on a CPU that has VNNI, so that tests cover them there too */
static const kvt_kernels K_AVX512_BW = {
    "avx512bw", score_bf16_512, score_i8_512, score_i4_512,
    accum_bf16_512, accum_i8_512, sum_bytes_512, accum_rows_512,
    softmax_512, score_i8_q16_bw, score_i4_q16_bw, soft_cap_512, sum_exp_512, bound_bf16_512,
    dot_f32_512, axpy_f32_512,
};

/* the VNNI table with the AMX selection kernel for int8 keys (ISA "amx") */
static const kvt_kernels K_AMX = {
    "amx", score_bf16_512, score_i8_512, score_i4_512,
    accum_bf16_512, accum_i8_512, sum_bytes_512, accum_rows_512,
    softmax_512, score_i8_q16_amx, score_i4_q16_vnni, soft_cap_512, sum_exp_512, bound_bf16_512,
    dot_f32_512, axpy_f32_512, q16_layout_amx,
};

/* the same table with the VNNI selection kernel (picked when the CPU has it) */
static const kvt_kernels K_AVX512_VNNI = {
    "avx512", score_bf16_512, score_i8_512, score_i4_512,
    accum_bf16_512, accum_i8_512, sum_bytes_512, accum_rows_512,
    softmax_512, score_i8_q16_vnni, score_i4_q16_vnni, soft_cap_512, sum_exp_512, bound_bf16_512,
    dot_f32_512, axpy_f32_512,
};
#endif

const kvt_kernels *kvt_k = &K_GENERIC;

int kvt_isa_name_known(const char *name) {
    return name && (!strcmp(name, "generic") || !strcmp(name, "avx2") || !strcmp(name, "avx512") ||
                    !strcmp(name, "avx512bw") || !strcmp(name, "amx"));
}

#if defined(__x86_64__) && defined(__linux__)
/* AMX-TILE and AMX-INT8 in CPUID, tile state enabled by the OS (XCR0 bits 17, 18),
 * and the kernel's permission for this process to use tile data (asked once). */
static int amx_usable(void) {
    static int usable = -1;
    if (usable >= 0) return usable;
    unsigned a, b, c, d;
    usable = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return usable;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return usable; /* OSXSAVE */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return usable;
    usable = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return usable;
}
#endif

const kvt_kernels *kvt_kernels_for(const char *name) {
    if (!name) return NULL;
    if (!strcmp(name, "generic")) return &K_GENERIC;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(name, "avx2")) return avx2 ? &K_AVX2 : NULL;
    if (!strcmp(name, "avx512") || !strcmp(name, "avx512bw")) {
        if (!(avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl")))
            return NULL;
        if (!strcmp(name, "avx512bw")) return &K_AVX512_BW;
        return __builtin_cpu_supports("avx512vnni") ? &K_AVX512_VNNI : &K_AVX512;
    }
    if (!strcmp(name, "amx")) {
#if defined(__x86_64__) && defined(__linux__)
        if (kvt_kernels_for("avx512") == &K_AVX512_VNNI && amx_usable()) return &K_AMX;
#endif
        return NULL;
    }
#endif
    return NULL;
}
