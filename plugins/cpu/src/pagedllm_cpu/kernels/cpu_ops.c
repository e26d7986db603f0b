/* fp32 CPU kernels for the small per-layer ops and paged decode attention.
 *
 * Why: at decode sizes each of these is microseconds of arithmetic but a torch expression of
 * several ops costs tens of microseconds of dispatch; over 30 layers that overhead was as large
 * as the matmuls. One C call per op (and one per layer for decode attention) removes it.
 *
 * Numerics follow the core's native ops: the same operation order per element (built with
 * -ffp-contract=off, so no silent fused multiply-adds), sums in fp32. Reductions (RMS, softmax,
 * dot products) differ from torch's only in summation order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_OPENMP)
#include <omp.h>
/* nthreads 0: the calling thread's OpenMP default, which torch.set_num_threads sets. The Python
 * wrappers pass 0, so captured decode steps follow the count the CPU backend adapts to contention. */
#define KERNEL_THREADS(n) ((n) > 0 ? (n) : omp_get_max_threads())
#else
#define KERNEL_THREADS(n) 1
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define PAGEDLLM_AVX2 1 /* 8-lane paths for CPUs without AVX-512 */
#endif

#if defined(__AVX512F__)
/* exp(x) for 16 lanes (Cephes expf: range reduction by ln 2, degree-7 polynomial, ~1 ulp).
 * Inputs below -87.3 give ~1e-38 instead of 0; above ~88.7, inf. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(PAGEDLLM_AVX2)
/* The same exp for 8 lanes; 2^n built in the exponent field (n is in [-126, 128]; 128 gives inf). */
static inline __m256 exp_ps8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(89.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as two factors (2^(n/2) twice) so that n = 128 overflows to inf and n = -126 stays normal */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h = _mm256_srai_epi32(ni, 1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    __m256 s2 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---- RMSNorm ------------------------------------------------------------------------------ */

static inline float sum_squares(const float *x, int64_t n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
#elif defined(PAGEDLLM_AVX2)
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float s = hsum8(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
#else
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
#endif
}

static inline void scale_row(const float *x, const float *w, float r, float *out, int64_t n) {
    /* (x * r) * w, rounded per step like x * rsqrt(...) followed by * weight. */
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* out[t] = rms_norm(x[t]); x rows `x_stride` floats apart, out contiguous [m][n]. */
void pagedllm_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t m,
                       int64_t n, int nthreads) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(KERNEL_THREADS(nthreads)) if (m >= 32)
    for (int64_t t = 0; t < m; t++) {
        const float *xr = x + t * x_stride;
        float r = 1.0f / sqrtf(sum_squares(xr, n) / (float)n + eps);
        scale_row(xr, w, r, out + t * n, n);
    }
}

/* summed = x + residual; out = rms_norm(summed). All [m][n] contiguous. */
void pagedllm_fused_add_rms_norm(const float *x, const float *residual, const float *w, float eps, float *out,
                                 float *summed, int64_t m, int64_t n, int nthreads) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(KERNEL_THREADS(nthreads)) if (m >= 32)
    for (int64_t t = 0; t < m; t++) {
        float *s = summed + t * n;
        for (int64_t i = 0; i < n; i++) s[i] = x[t * n + i] + residual[t * n + i];
        float r = 1.0f / sqrtf(sum_squares(s, n) / (float)n + eps);
        scale_row(s, w, r, out + t * n, n);
    }
}

/* The thread count a kernel given `nthreads` runs with (0: the calling thread's current default). */
int pagedllm_kernel_threads(int nthreads) { return KERNEL_THREADS(nthreads); }

/* ---- SiLU-and-mul ---------------------------------------------------------------------------- */

/* o[i] = silu(g[i]) * u[i], i < d; silu(g) = g / (1 + exp(-g)). Also the AMX kernel's fused gated
 * MLP (gguf_linear.c), so both give the same values. */
void pagedllm_silu_mul_row(const float *g, const float *u, float *o, int64_t d) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= d; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        /* exp(-g) overflows to inf for g < -88: g / inf = -0, as torch gives. */
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#elif defined(PAGEDLLM_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= d; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp_ps8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < d; i++) o[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

/* out[t][i] = silu(x[t][i]) * x[t][d + i]. x [m][2d], out [m][d]. */
void pagedllm_silu_and_mul(const float *x, float *out, int64_t m, int64_t d, int nthreads) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(KERNEL_THREADS(nthreads)) if (m * d >= 65536)
    for (int64_t t = 0; t < m; t++) pagedllm_silu_mul_row(x + t * 2 * d, x + t * 2 * d + d, out + t * d, d);
}

/* ---- Token bitmask (structured outputs) --------------------------------------------------- */

/* Row rows[i] of logits (rows `stride` floats apart) gets -inf at every token t < n whose bit
 * t % 32 of bitmask word i * words + t / 32 is clear. Fully allowed words (the common case in a
 * JSON string) are skipped with one compare. */
void pagedllm_apply_token_bitmask(float *logits, int64_t stride, const int32_t *bitmask, int64_t words,
                                  const int64_t *rows, int64_t m, int64_t n) {
    for (int64_t i = 0; i < m; i++) {
        float *row = logits + rows[i] * stride;
        const uint32_t *bm = (const uint32_t *)(bitmask + i * words);
        for (int64_t w = 0; w * 32 < n; w++) {
            uint32_t bits = bm[w];
            if (bits == 0xFFFFFFFFu) continue;
            int64_t end = n - w * 32 < 32 ? n - w * 32 : 32;
            float *dst = row + w * 32;
            for (int64_t j = 0; j < end; j++)
                if (!((bits >> j) & 1u)) dst[j] = -INFINITY;
        }
    }
}

/* ---- Rotary embedding -------------------------------------------------------------------- */

/* Rotates the first rotary_dim features of each head; the rest are copied. src rows (tokens)
 * are `src_stride` floats apart, heads `head_size` apart; dst is contiguous [m][heads][head_size].
 * cache: [max_position][rotary_dim] = cos (first half), sin (second half). */
static void rotate(const float *src, int64_t src_stride, float *dst, int64_t m, int64_t heads, int64_t head_size,
                   const int64_t *positions, const float *cache, int64_t rotary_dim, int neox) {
    const int64_t half = rotary_dim / 2;
    for (int64_t t = 0; t < m; t++) {
        const float *cs = cache + positions[t] * rotary_dim, *sn = cs + half;
        for (int64_t h = 0; h < heads; h++) {
            const float *x = src + t * src_stride + h * head_size;
            float *o = dst + (t * heads + h) * head_size;
            if (neox) {
                for (int64_t j = 0; j < half; j++) {
                    float x1 = x[j], x2 = x[j + half];
                    o[j] = x1 * cs[j] - x2 * sn[j];
                    o[j + half] = x2 * cs[j] + x1 * sn[j];
                }
            } else {
                for (int64_t j = 0; j < half; j++) {
                    float x1 = x[2 * j], x2 = x[2 * j + 1];
                    o[2 * j] = x1 * cs[j] - x2 * sn[j];
                    o[2 * j + 1] = x2 * cs[j] + x1 * sn[j];
                }
            }
            if (rotary_dim < head_size) memcpy(o + rotary_dim, x + rotary_dim, (head_size - rotary_dim) * sizeof(float));
        }
    }
}

/* Returns 0, or -1 (nothing written) when a position is outside [0, max_position). */
int pagedllm_rotary(const float *q, int64_t q_stride, const float *k, int64_t k_stride, float *q_out, float *k_out,
                    int64_t m, int64_t q_heads, int64_t k_heads, int64_t head_size, const int64_t *positions,
                    const float *cache, int64_t max_position, int64_t rotary_dim, int neox) {
    for (int64_t t = 0; t < m; t++)
        if (positions[t] < 0 || positions[t] >= max_position) return -1;
    rotate(q, q_stride, q_out, m, q_heads, head_size, positions, cache, rotary_dim, neox);
    rotate(k, k_stride, k_out, m, k_heads, head_size, positions, cache, rotary_dim, neox);
    return 0;
}

/* ---- Paged KV write ---------------------------------------------------------------------- */

/* fp32 -> bf16, rounded to nearest even as torch's ``.to(torch.bfloat16)`` (NaN -> 0x7FC0). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* cache: [2][num_blocks][kv_heads][block_size][head_size], fp32 or (bf16 != 0) bf16; key/value rows
 * `*_stride` floats apart with heads head_size apart. Tokens with slot < 0 are skipped. */
void pagedllm_write_kv(const float *key, int64_t key_stride, const float *value, int64_t value_stride, void *cache,
                       const int64_t *slots, int64_t m, int64_t num_blocks, int64_t kv_heads, int64_t block_size,
                       int64_t head_size, int bf16) {
    const int64_t half = num_blocks * kv_heads * block_size * head_size; /* values start here */
    /* A prefill's tokens are split between threads (distinct slots: no two write the same row). */
#pragma omp parallel for schedule(static) num_threads(KERNEL_THREADS(0)) if (m * kv_heads * head_size >= 65536)
    for (int64_t t = 0; t < m; t++) {
        int64_t slot = slots[t];
        if (slot < 0) continue;
        int64_t block = slot / block_size, off = slot % block_size;
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t dst = ((block * kv_heads + h) * block_size + off) * head_size;
            const float *k = key + t * key_stride + h * head_size, *v = value + t * value_stride + h * head_size;
            if (bf16) {
                uint16_t *kc = (uint16_t *)cache + dst, *vc = (uint16_t *)cache + half + dst;
                for (int64_t d = 0; d < head_size; d++) {
                    kc[d] = to_bf16(k[d]);
                    vc[d] = to_bf16(v[d]);
                }
            } else {
                memcpy((float *)cache + dst, k, head_size * sizeof(float));
                memcpy((float *)cache + half + dst, v, head_size * sizeof(float));
            }
        }
    }
}

/* ---- Paged decode attention -------------------------------------------------------------- */

static inline float dot(const float *a, const float *b, int64_t n) {
#if defined(__AVX512F__)
    if ((n & 15) == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(PAGEDLLM_AVX2)
    if ((n & 7) == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        return hsum8(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
#if defined(__AVX512F__)
    if ((n & 15) == 0) {
        __m512 va = _mm512_set1_ps(a);
        for (int64_t i = 0; i < n; i += 16)
            _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
        return;
    }
#elif defined(PAGEDLLM_AVX2)
    if ((n & 7) == 0) {
        __m256 va = _mm256_set1_ps(a);
        for (int64_t i = 0; i < n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* scores[i] = exp(scores[i] - mx); returns their sum. */
static inline float exp_shift_sum(float *scores, int64_t n, float mx) {
    float denom = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vm = _mm512_set1_ps(mx), acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + i), vm));
        _mm512_storeu_ps(scores + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + i), vm));
        _mm512_mask_storeu_ps(scores + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
        i = n;
    }
    denom = _mm512_reduce_add_ps(acc);
#elif defined(PAGEDLLM_AVX2)
    __m256 vm = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_ps8(_mm256_sub_ps(_mm256_loadu_ps(scores + i), vm));
        _mm256_storeu_ps(scores + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    denom = hsum8(acc);
#endif
    for (; i < n; i++) {
        scores[i] = expf(scores[i] - mx);
        denom += scores[i];
    }
    return denom;
}

/* KV cache elements: fp32, or bf16 (bf != 0: the upper half of an fp32, widened by a 16-bit shift).
 * Inlined with a constant bf, so each cache type gets its own loop. */
static inline __attribute__((always_inline)) float kv_get(const void *base, int64_t i, int bf) {
    if (!bf) return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Row i .. i + n of the cache as fp32: in place when fp32, widened into tmp when bf16. */
static inline __attribute__((always_inline)) const float *kv_row(const void *base, int64_t i, int bf, float *tmp,
                                                                  int64_t n) {
    if (!bf) return (const float *)base + i;
    for (int64_t d = 0; d < n; d++) tmp[d] = kv_get(base, i + d, 1);
    return tmp;
}

#if defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 kv_load16(const void *base, int64_t i, int bf) {
    if (!bf) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

#if defined(__AVX512F__)
/* The G query heads of one KV head together (G * NV <= 16, both compile-time constants after
 * inlining): each key and value row is loaded (and, from a bf16 cache, widened) once for the whole
 * group instead of once per head. Each head's sums are taken in the same order whatever G is, so a
 * head's result does not depend on how its group is split. scores: scratch of G * (pos + 1 - start). */
static inline __attribute__((always_inline)) void attend_group_v(const int NV, const int G, const int bf,
                                                               const float *qv, float *o, const void *kbase,
                                                               const void *vbase, const int32_t *table,
                                                               int64_t kv_heads, int64_t g, int64_t block_size,
                                                               int64_t start, int64_t pos, float scale,
                                                               float *scores) {
    const int64_t head_size = 16 * NV, esize = bf ? 2 : 4, len = pos + 1 - start;
    __m512 qr[4][8], acc[4][8];
    float mx[4], inv[4];
    for (int h = 0; h < G; h++) {
        mx[h] = -INFINITY;
        for (int k = 0; k < NV; k++)
            qr[h][k] = _mm512_mul_ps(_mm512_loadu_ps(qv + h * head_size + 16 * k), _mm512_set1_ps(scale));
    }
    for (int64_t p = start; p <= pos;) {
        const int64_t off = p % block_size;
        const int64_t run = (block_size - off < pos + 1 - p) ? block_size - off : pos + 1 - p;
        const int64_t at = (((int64_t)table[p / block_size] * kv_heads + g) * block_size + off) * head_size;
        /* Each block's rows are a separate run of memory (often a page of its own), which the hardware
         * prefetcher meets cold: fetch this block's values and the next block's keys meanwhile. */
        const char *vpf = (const char *)vbase + at * esize;
        const char *kpf = p / block_size < pos / block_size
                              ? (const char *)kbase +
                                    ((int64_t)table[p / block_size + 1] * kv_heads + g) * block_size * head_size * esize
                              : 0;
        int64_t kr = at;
        for (int64_t e = 0; e < run; e++, kr += head_size) {
            for (int64_t b = 0; b < head_size * esize; b += 64) {
                _mm_prefetch(vpf + e * head_size * esize + b, _MM_HINT_T0);
                if (kpf) _mm_prefetch(kpf + e * head_size * esize + b, _MM_HINT_T0);
            }
            __m512 kv[8];
            for (int k = 0; k < NV; k++) kv[k] = kv_load16(kbase, kr + 16 * k, bf);
            for (int h = 0; h < G; h++) {
                __m512 a = _mm512_mul_ps(qr[h][0], kv[0]);
                for (int k = 1; k < NV; k++) a = _mm512_fmadd_ps(qr[h][k], kv[k], a);
                const float sc = _mm512_reduce_add_ps(a);
                scores[h * len + p - start + e] = sc;
                mx[h] = sc > mx[h] ? sc : mx[h];
            }
        }
        p += run;
    }
    for (int h = 0; h < G; h++) {
        inv[h] = 1.0f / exp_shift_sum(scores + h * len, len, mx[h]);
        for (int k = 0; k < NV; k++) acc[h][k] = _mm512_setzero_ps();
    }
    for (int64_t p = start; p <= pos;) {
        const int64_t off = p % block_size;
        const int64_t run = (block_size - off < pos + 1 - p) ? block_size - off : pos + 1 - p;
        int64_t vr = (((int64_t)table[p / block_size] * kv_heads + g) * block_size + off) * head_size;
        for (int64_t e = 0; e < run; e++, vr += head_size) {
            __m512 vv[8];
            for (int k = 0; k < NV; k++) vv[k] = kv_load16(vbase, vr + 16 * k, bf);
            for (int h = 0; h < G; h++) {
                const __m512 w = _mm512_set1_ps(scores[h * len + p - start + e]);
                for (int k = 0; k < NV; k++) acc[h][k] = _mm512_fmadd_ps(w, vv[k], acc[h][k]);
            }
        }
        p += run;
    }
    for (int h = 0; h < G; h++) {
        const __m512 vinv = _mm512_set1_ps(inv[h]);
        for (int k = 0; k < NV; k++) _mm512_storeu_ps(o + h * head_size + 16 * k, _mm512_mul_ps(acc[h][k], vinv));
    }
}

/* A KV head's whole group of query heads for head sizes 64 and 128 (0 for others): attend_group_v on
 * runs of up to 4 heads of 64 features or 2 of 128, what fits the registers (G * NV <= 16). */
static inline __attribute__((always_inline)) int attend_group(const int bf, int64_t head_size, int64_t group,
                                                             const float *qv, float *o, const void *kbase,
                                                             const void *vbase, const int32_t *table, int64_t kv_heads,
                                                             int64_t g, int64_t block_size, int64_t start, int64_t pos,
                                                             float scale, float *scores) {
    if (head_size != 64 && head_size != 128) return 0;
    const int64_t most = head_size == 64 ? 4 : 2;
    for (int64_t h = 0; h < group; h += most) {
        const int64_t n = group - h < most ? group - h : most;
        const float *qh = qv + h * head_size;
        float *oh = o + h * head_size;
#define GROUP_CASE(NV, G)                                                                                        \
    attend_group_v(NV, G, bf, qh, oh, kbase, vbase, table, kv_heads, g, block_size, start, pos, scale, scores); \
    break
        if (head_size == 64) switch (n) {
            case 1: GROUP_CASE(4, 1);
            case 2: GROUP_CASE(4, 2);
            case 3: GROUP_CASE(4, 3);
            default: GROUP_CASE(4, 4);
        }
        else switch (n) {
            case 1: GROUP_CASE(8, 1);
            default: GROUP_CASE(8, 2);
        }
#undef GROUP_CASE
    }
    return 1;
}
#endif

/* Prefetch (to L2) the key and value rows of positions [first, last] of one KV head (elements of
 * esize bytes). */
static void prefetch_positions(const char *kbase, const char *vbase, const int32_t *table, int64_t kv_heads,
                               int64_t g, int64_t block_size, int64_t head_size, int64_t esize, int64_t first,
                               int64_t last) {
#if defined(__AVX512F__) || defined(PAGEDLLM_AVX2)
    for (int64_t b = first / block_size; b <= last / block_size; b++) {
        const int64_t lo = b == first / block_size ? first % block_size : 0;
        const int64_t hi = b == last / block_size ? last % block_size : block_size - 1;
        const int64_t at = (((int64_t)table[b] * kv_heads + g) * block_size) * head_size * esize;
        const char *k0 = kbase + at + lo * head_size * esize, *k1 = kbase + at + (hi + 1) * head_size * esize;
        const char *v0 = vbase + at + lo * head_size * esize;
        for (const char *a = k0, *v = v0; a < k1; a += 64, v += 64) {
            _mm_prefetch(a, _MM_HINT_T1);
            _mm_prefetch(v, _MM_HINT_T1);
        }
    }
#else
    (void)kbase, (void)vbase, (void)table, (void)kv_heads, (void)g, (void)block_size, (void)head_size, (void)esize,
        (void)first, (void)last;
#endif
}

/* Paged attention over the KV cache for a batch of sequences, each with q_lens[i] query tokens
 * (1 for a decode, more for a prefill chunk) in rows q_starts[i] .. q_starts[i] + q_lens[i] of q
 * and out. The cache already holds every key and value of the sequence, this step's included.
 * Query j of sequence i sits at position p = seq_lens[i] - q_lens[i] + j and attends to
 * positions [max(0, p + 1 - window), p] (window <= 0: no window).
 * q: [*][heads][head_size], token rows q_stride floats apart; out: contiguous [*][heads][head_size];
 * cache: [2][num_blocks][kv_heads][block_size][head_size]; q_starts, q_lens, seq_lens: [n] int32;
 * block_tables: [n][max_blocks] int32 (the model runner's own dtypes, so captured steps read them).
 * soft_cap > 0: scores = cap * tanh(scores / cap). Work is split over (sequence, KV head, block
 * of QB queries). Returns 0, -1 when the scratch allocation fails, -2 for more than MAX_GROUP query
 * heads per KV head, -3 for a bf16 cache with heads of more than MAX_BF16_HEAD features. */
enum { QB = 16, MAX_GROUP = 64, MAX_BF16_HEAD = 1024 };
#define PARALLEL_ATTENTION_FLOPS (1 << 20)

static inline __attribute__((always_inline)) int paged_attention(
    const int bf, const float *q, int64_t q_stride, const void *cache, float *out, const int32_t *q_starts,
    const int32_t *q_lens, const int32_t *seq_lens, const int32_t *block_tables, int64_t max_blocks, int64_t n,
    int64_t heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_size, float scale,
    int64_t window, float soft_cap, int nthreads) {
    const int64_t group = heads / kv_heads;
    const int64_t half = num_blocks * kv_heads * block_size * head_size, esize = bf ? 2 : 4;
    const void *vcache = (const char *)cache + half * esize;
    if (bf && head_size > MAX_BF16_HEAD) return -3;
    nthreads = KERNEL_THREADS(nthreads);
    if (nthreads < 1) nthreads = 1;
    int64_t longest = 1, items = 0, flops = 0;
    for (int64_t i = 0; i < n; i++) {
        longest = seq_lens[i] > longest ? seq_lens[i] : longest;
        items += (q_lens[i] + QB - 1) / QB;
        flops += (int64_t)q_lens[i] * seq_lens[i];
    }
    /* Small steps (one sequence's decode at short context: ~0.1 ms) run on this thread alone: a
     * parallel region must wait for every team thread to check in, a whole timeslice when another
     * process has descheduled one, and is not worth its fork even on an idle machine. */
    flops *= heads * head_size;
    if (flops < PARALLEL_ATTENTION_FLOPS) nthreads = 1;
    /* item -> (sequence, first query): a flat list so one parallel loop balances everything. */
    int64_t *work = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(items > 0 ? items : 1));
    if (group > MAX_GROUP) return -2;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)longest * (size_t)group * (size_t)nthreads);
    if (work == NULL || scratch == NULL) {
        free(work);
        free(scratch);
        return -1;
    }
    for (int64_t i = 0, w = 0; i < n; i++)
        for (int64_t j = 0; j < q_lens[i]; j += QB, w++) {
            work[2 * w] = i;
            work[2 * w + 1] = j;
        }
#pragma omp parallel for schedule(dynamic, 1) collapse(2) num_threads(nthreads) if (nthreads > 1)
    for (int64_t w = 0; w < items; w++) {
        for (int64_t g = 0; g < kv_heads; g++) {
            float *scores = scratch; /* [group][longest] for this thread */
#if defined(_OPENMP)
            scores += (int64_t)omp_get_thread_num() * longest * group;
#endif
            /* Pull the next item's keys and values toward L2 while this one computes (each block is
             * a separate run of memory that the hardware prefetcher would meet cold); items are
             * handed out one at a time, so a descheduled thread holds up one item, not a share. */
            if (w * kv_heads + g + 1 < items * kv_heads) {
                const int64_t nf = w * kv_heads + g + 1, ni = work[2 * (nf / kv_heads)], ng = nf % kv_heads;
                const int64_t last = (int64_t)seq_lens[ni] - 1;
                const int64_t first = window > 0 && last + 1 > window ? last + 1 - window : 0;
                prefetch_positions((const char *)cache, (const char *)vcache, block_tables + ni * max_blocks,
                                   kv_heads, ng, block_size, head_size, esize, first, last);
            }
            const int64_t i = work[2 * w], j0 = work[2 * w + 1];
            const int64_t j1 = j0 + QB < q_lens[i] ? j0 + QB : q_lens[i];
            const int32_t *table = block_tables + i * max_blocks;
            for (int64_t j = j0; j < j1; j++) {
                const int64_t pos = (int64_t)seq_lens[i] - q_lens[i] + j;
                const int64_t start = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
                const int64_t len = pos + 1 - start;
                const int64_t row = (int64_t)q_starts[i] + j;
                const float *qv = q + row * q_stride + g * group * head_size; /* this group's heads */
                float *o = out + (row * heads + g * group) * head_size;
#if defined(__AVX512F__)
                /* Common head sizes without soft-capping: registers-resident query and output. */
                if (soft_cap <= 0.0f && attend_group(bf, head_size, group, qv, o, cache, vcache, table, kv_heads,
                                                     g, block_size, start, pos, scale, scores))
                    continue;
#endif
                float mx[MAX_GROUP], widened[MAX_BF16_HEAD]; /* a bf16 cache row as fp32 */
                for (int64_t h = 0; h < group; h++) mx[h] = -INFINITY;
                /* Scores: one pass over the keys, block by block (no division per position), each key
                 * row dotted with every query head of the group while it is in L1. */
                for (int64_t p = start; p <= pos;) {
                    const int64_t off = p % block_size;
                    const int64_t run = (block_size - off < pos + 1 - p) ? block_size - off : pos + 1 - p;
                    int64_t ki = (((int64_t)table[p / block_size] * kv_heads + g) * block_size + off) * head_size;
                    for (int64_t e = 0; e < run; e++, ki += head_size) {
                        const float *kr = kv_row(cache, ki, bf, widened, head_size);
                        for (int64_t h = 0; h < group; h++) {
                            float sc = dot(qv + h * head_size, kr, head_size) * scale;
                            if (soft_cap > 0.0f) sc = soft_cap * tanhf(sc / soft_cap);
                            scores[h * longest + p - start + e] = sc;
                            mx[h] = sc > mx[h] ? sc : mx[h];
                        }
                    }
                    p += run;
                }
                float inv[MAX_GROUP];
                for (int64_t h = 0; h < group; h++) {
                    inv[h] = 1.0f / exp_shift_sum(scores + h * longest, len, mx[h]);
                    memset(o + h * head_size, 0, head_size * sizeof(float));
                }
                for (int64_t p = start; p <= pos;) {
                    const int64_t off = p % block_size;
                    const int64_t run = (block_size - off < pos + 1 - p) ? block_size - off : pos + 1 - p;
                    int64_t vi = (((int64_t)table[p / block_size] * kv_heads + g) * block_size + off) * head_size;
                    for (int64_t e = 0; e < run; e++, vi += head_size) {
                        const float *vr = kv_row(vcache, vi, bf, widened, head_size);
                        for (int64_t h = 0; h < group; h++)
                            axpy(scores[h * longest + p - start + e], vr, o + h * head_size, head_size);
                    }
                    p += run;
                }
                for (int64_t h = 0; h < group; h++)
                    for (int64_t d = 0; d < head_size; d++) o[h * head_size + d] *= inv[h];
            }
        }
    }
    free(work);
    free(scratch);
    return 0;
}

/* cache: fp32, or bf16 when bf16 != 0 (widened to fp32 as it is read; the arithmetic is the same). */
int pagedllm_paged_attention(const float *q, int64_t q_stride, const void *cache, float *out, const int32_t *q_starts,
                             const int32_t *q_lens, const int32_t *seq_lens, const int32_t *block_tables,
                             int64_t max_blocks, int64_t n, int64_t heads, int64_t kv_heads, int64_t num_blocks,
                             int64_t block_size, int64_t head_size, float scale, int64_t window, float soft_cap,
                             int nthreads, int bf16) {
    if (bf16)
        return paged_attention(1, q, q_stride, cache, out, q_starts, q_lens, seq_lens, block_tables, max_blocks, n,
                               heads, kv_heads, num_blocks, block_size, head_size, scale, window, soft_cap, nthreads);
    return paged_attention(0, q, q_stride, cache, out, q_starts, q_lens, seq_lens, block_tables, max_blocks, n, heads,
                           kv_heads, num_blocks, block_size, head_size, scale, window, soft_cap, nthreads);
}

/* ---- Greedy sampling: each row's argmax --------------------------------------------------------
 *
 * out[t] = the index of row t's first maximum over x[t][0..n), a NaN counting as larger than any
 * number (the first NaN's index if the row has one), exactly as torch.max(x, -1).indices and argmax.
 * -0.0 and +0.0 are equal, so the first of them wins a tie. Rows are split between threads. */
static int64_t first_nan(const float *x, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        if (x[j] != x[j]) return j;
    return -1;
}

static int64_t argmax_row(const float *x, int64_t n) {
    int64_t i, best;
    float top;
#if defined(__AVX512F__)
    if (n >= 16) {
        /* lane l keeps the first maximum among elements l, l + 16, ...; then the lanes are merged */
        __m512 vmax = _mm512_loadu_ps(x);
        __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), cur = vidx;
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
        for (i = 16; i + 16 <= n && !nan; i += 16) {
            cur = _mm512_add_epi32(cur, step);
            const __m512 v = _mm512_loadu_ps(x + i);
            nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ); /* strictly larger: ties keep the first */
            vmax = _mm512_mask_mov_ps(vmax, gt, v);
            vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        }
        if (nan) return first_nan(x, n);
        float vals[16];
        int32_t idx[16];
        _mm512_storeu_ps(vals, vmax);
        _mm512_storeu_si512((void *)idx, vidx);
        top = vals[0];
        best = idx[0];
        for (int l = 1; l < 16; l++)
            if (vals[l] > top || (vals[l] == top && idx[l] < best)) {
                top = vals[l];
                best = idx[l];
            }
    } else
#endif
    {
        if (x[0] != x[0]) return 0;
        top = x[0];
        best = 0;
        i = 1;
    }
    for (; i < n; i++) {
        const float v = x[i];
        if (v != v) return first_nan(x, n);
        if (v > top) {
            top = v;
            best = i;
        }
    }
    return best;
}

int pagedllm_argmax_rows(const float *x, int64_t m, int64_t n, int64_t row_stride, int64_t *out, int nthreads) {
    if (m < 0 || n <= 0 || row_stride < n) return -1;
#pragma omp parallel for schedule(static) num_threads(KERNEL_THREADS(nthreads)) if (m * n >= 65536)
    for (int64_t t = 0; t < m; t++) out[t] = argmax_row(x + t * row_stride, n);
    return 0;
}
