/* y = x W^T with W kept in GGUF blocks (Q4_0, Q4_1, Q8_0): the weights are dequantized in
 * registers, exactly as gguf / llama.cpp define the dequantized values, and multiplied in fp32.
 *
 * Why: decoding one token reads every weight once, so it runs at memory speed. A Q4_1 row is
 * 5 bits per weight instead of fp32's 32, so the same fp32 arithmetic reads ~6x fewer bytes.
 *
 * Layout: W is [n rows][n_blocks blocks of 32 weights along k], each block `type_size` bytes:
 *   Q4_0 (18 B): f16 d, 16 B nibbles               w = d * (q - 8)
 *   Q4_1 (20 B): f16 d, f16 m, 16 B nibbles        w = d * q + m
 *   Q8_0 (34 B): f16 d, 32 x int8                  w = d * q
 * Nibbles: the low nibble of byte j is element j, the high nibble element j + 16.
 * d * q (and d * (q - 8)) is exact in fp32 (11 + 8 significant bits), so every w equals the
 * fp32 value gguf's dequantize produces; only the summation order differs from a dense sgemm.
 *
 * Tiling (AVX-512): 4 output rows x 4 tokens; a row group's blocks are dequantized once per token
 * group and reused by all 4 tokens, each x block is loaded once for all 4 rows. AVX2: 4 rows x 2
 * tokens in registers, or for 3+ tokens the row group dequantized once into a buffer. Otherwise a
 * portable scalar loop. Rows are split across OpenMP threads. Built at run time with the host's
 * compiler (-march=native) by clib.py.
 */
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

enum { QK = 32, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, NR = 4, MT = 4 };

#if defined(__F16C__)
#include <immintrin.h>
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline int type_size(int qtype) {
    switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    default: return 0;
    }
}

/* Scalar: one block's 32 weights. */
static inline void dequant_block(int qtype, const uint8_t *b, float *w) {
    float d = f16_to_f32(rd16(b));
    if (qtype == Q8_0) {
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < QK; j++) w[j] = d * (float)q[j];
    } else if (qtype == Q4_1) {
        float m = f16_to_f32(rd16(b + 2));
        const uint8_t *q = b + 4;
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)(q[j] & 0x0f) + m;
            w[j + 16] = d * (float)(q[j] >> 4) + m;
        }
    } else {
        const uint8_t *q = b + 2;
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)((int)(q[j] & 0x0f) - 8);
            w[j + 16] = d * (float)((int)(q[j] >> 4) - 8);
        }
    }
}

#if defined(__AVX512F__)
/* One block as two 16-lane vectors: elements 0-15 and 16-31. */
static inline __attribute__((always_inline)) void dequant_block_v(int qtype, const uint8_t *b, __m512 *lo,
                                                                  __m512 *hi) {
    __m512 d = _mm512_set1_ps(f16_to_f32(rd16(b)));
    if (qtype == Q8_0) {
        __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 2));
        __m128i q1 = _mm_loadu_si128((const __m128i *)(b + 18));
        *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)));
        *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
        return;
    }
    const uint8_t *qs = b + (qtype == Q4_1 ? 4 : 2);
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    __m512i ql = _mm512_and_si512(q, _mm512_set1_epi32(0x0f));
    __m512i qh = _mm512_srli_epi32(q, 4);
    if (qtype == Q4_1) {
        __m512 m = _mm512_set1_ps(f16_to_f32(rd16(b + 2)));
        /* d * q is exact, so the fused multiply-add rounds once, like d * q + m in two steps. */
        *lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(ql), m);
        *hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(qh), m);
    } else {
        __m512i eight = _mm512_set1_epi32(8);
        *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(ql, eight)));
        *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(qh, eight)));
    }
}

/* y[t][r] for rows r0..r0+nr, tokens t0..t0+mt (nr <= NR, mt <= MT). */
static inline __attribute__((always_inline)) void tile(int qtype, int nr, int mt, const float *x, int64_t k,
                                                       const uint8_t *w, int64_t row_bytes, int64_t nb,
                                                       float *y, int64_t n, int64_t r0, int64_t t0) {
    const int ts = type_size(qtype);
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 lo[NR], hi[NR];
        for (int r = 0; r < nr; r++) dequant_block_v(qtype, w + (r0 + r) * row_bytes + b * ts, &lo[r], &hi[r]);
        for (int t = 0; t < mt; t++) {
            const float *xb = x + (t0 + t) * k + b * QK;
            __m512 xl = _mm512_loadu_ps(xb), xh = _mm512_loadu_ps(xb + 16);
            for (int r = 0; r < nr; r++) {
                acc[r][t] = _mm512_fmadd_ps(xl, lo[r], acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(xh, hi[r], acc[r][t]);
            }
        }
    }
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < nr; r++) y[(t0 + t) * n + r0 + r] = _mm512_reduce_add_ps(acc[r][t]);
}

static void tile_any(int qtype, int nr, int mt, const float *x, int64_t k, const uint8_t *w, int64_t row_bytes,
                     int64_t nb, float *y, int64_t n, int64_t r0, int64_t t0) {
    tile(qtype, nr, mt, x, k, w, row_bytes, nb, y, n, r0, t0);
}

static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    (void)buf;
    int64_t t0 = 0;
    if (nr == NR) {
        /* The full tile with constant sizes, so the accumulators live in registers. */
        if (qtype == Q4_1)
            for (; t0 + MT <= m; t0 += MT) tile(Q4_1, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
        else if (qtype == Q4_0)
            for (; t0 + MT <= m; t0 += MT) tile(Q4_0, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
        else
            for (; t0 + MT <= m; t0 += MT) tile(Q8_0, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
        if (m - t0 == 1) {
            if (qtype == Q4_1) tile(Q4_1, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
            else if (qtype == Q4_0) tile(Q4_0, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
            else tile(Q8_0, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
            t0 += 1;
        }
    }
    for (; t0 < m; t0 += MT)
        tile_any(qtype, nr, (int)(m - t0 < MT ? m - t0 : MT), x, k, w, row_bytes, nb, y, n, r0, t0);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 (most x86 CPUs without AVX-512): one block as four 8-lane vectors, elements 0-7, 8-15,
 * 16-23, 24-31; the same values as the scalar and AVX-512 dequantization. */
static inline __attribute__((always_inline)) void dequant_block_v8(int qtype, const uint8_t *b, __m256 *w) {
    const __m256 d = _mm256_set1_ps(f16_to_f32(rd16(b)));
    if (qtype == Q8_0) {
        for (int i = 0; i < 4; i++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i));
            w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        }
        return;
    }
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + (qtype == Q4_1 ? 4 : 2)));
    const __m128i nib = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(q, nib), hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
    __m256i e[4] = {_mm256_cvtepu8_epi32(lo), _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                    _mm256_cvtepu8_epi32(hi), _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))};
    if (qtype == Q4_1) {
        const __m256 m = _mm256_set1_ps(f16_to_f32(rd16(b + 2)));
        /* d * q is exact, so the fused multiply-add rounds once, like d * q + m in two steps. */
        for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(e[i]), m);
    } else {
        const __m256i eight = _mm256_set1_epi32(8);
        for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(e[i], eight)));
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two tokens per pass (8 accumulators + a row's 4 weight vectors fit the 16 registers): each
 * row's block is dequantized once per pair of tokens. */
enum { MT2 = 2 };

static inline __attribute__((always_inline)) void tile8(int qtype, int nr, int mt, const float *x, int64_t k,
                                                        const uint8_t *w, int64_t row_bytes, int64_t nb,
                                                        float *y, int64_t n, int64_t r0, int64_t t0) {
    const int ts = type_size(qtype);
    __m256 acc[NR][MT2];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT2; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < nr; r++) {
            __m256 wv[4];
            dequant_block_v8(qtype, w + (r0 + r) * row_bytes + b * ts, wv);
            for (int t = 0; t < mt; t++) {
                const float *xb = x + (t0 + t) * k + b * QK;
                for (int i = 0; i < 4; i++) acc[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), wv[i], acc[r][t]);
            }
        }
    }
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < nr; r++) y[(t0 + t) * n + r0 + r] = hsum8(acc[r][t]);
}

static void tile8_any(int qtype, int nr, int mt, const float *x, int64_t k, const uint8_t *w, int64_t row_bytes,
                      int64_t nb, float *y, int64_t n, int64_t r0, int64_t t0) {
    tile8(qtype, nr, mt, x, k, w, row_bytes, nb, y, n, r0, t0);
}

/* Three or more tokens: the row group's weights are dequantized once into buf (nr x k floats, in
 * L1/L2) and every pair of tokens reads them from there. Each output is summed exactly as in
 * tile8 (per block, four fused multiply-adds in order), so a row's result does not depend on m. */
static void row_group_buffered(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                               int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    const int ts = type_size(qtype);
    for (int r = 0; r < nr; r++)
        for (int64_t b = 0; b < nb; b++) {
            __m256 wv[4];
            dequant_block_v8(qtype, w + (r0 + r) * row_bytes + b * ts, wv);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(buf + r * k + b * QK + 8 * i, wv[i]);
        }
    for (int64_t t0 = 0; t0 < m; t0 += MT2) {
        const int mt = (int)(m - t0 < MT2 ? m - t0 : MT2);
        __m256 acc[NR][MT2];
        for (int r = 0; r < NR; r++)
            for (int t = 0; t < MT2; t++) acc[r][t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < nr; r++)
                for (int t = 0; t < mt; t++) {
                    const float *xb = x + (t0 + t) * k + b * QK, *wb = buf + r * k + b * QK;
                    for (int i = 0; i < 4; i++)
                        acc[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), _mm256_loadu_ps(wb + 8 * i), acc[r][t]);
                }
        for (int t = 0; t < mt; t++)
            for (int r = 0; r < nr; r++) y[(t0 + t) * n + r0 + r] = hsum8(acc[r][t]);
    }
}

static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    int64_t t0 = 0;
    if (buf && m > MT2) {
        row_group_buffered(qtype, nr, x, m, k, w, row_bytes, nb, y, n, r0, buf);
        return;
    }
    if (nr == NR) { /* constant sizes, so the accumulators live in registers */
        for (; t0 + MT2 <= m; t0 += MT2) {
            if (qtype == Q4_1) tile8(Q4_1, NR, MT2, x, k, w, row_bytes, nb, y, n, r0, t0);
            else if (qtype == Q4_0) tile8(Q4_0, NR, MT2, x, k, w, row_bytes, nb, y, n, r0, t0);
            else tile8(Q8_0, NR, MT2, x, k, w, row_bytes, nb, y, n, r0, t0);
        }
        if (t0 < m) {
            if (qtype == Q4_1) tile8(Q4_1, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
            else if (qtype == Q4_0) tile8(Q4_0, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
            else tile8(Q8_0, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
        }
        return;
    }
    for (; t0 < m; t0 += MT2) tile8_any(qtype, nr, (int)(m - t0 < MT2 ? m - t0 : MT2), x, k, w, row_bytes, nb, y, n, r0, t0);
}
#else
static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    (void)buf;
    const int ts = type_size(qtype);
    float wb[QK];
    for (int r = 0; r < nr; r++) {
        for (int64_t t = 0; t < m; t++) y[t * n + r0 + r] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            dequant_block(qtype, w + (r0 + r) * row_bytes + b * ts, wb);
            for (int64_t t = 0; t < m; t++) {
                const float *xb = x + t * k + b * QK;
                float s = 0.0f;
                for (int j = 0; j < QK; j++) s += xb[j] * wb[j];
                y[t * n + r0 + r] += s;
            }
        }
    }
}
#endif

/* Token rows up to which multiplying the blocks beats the fp32 panel GEMM on the dense weights
 * (weights streamed from memory, SmolLM2 shapes, end to end): with AVX-512, 8 (2-core Xeon: m = 1
 * ~2.5x faster, m = 4 ~2x, m = 16 about even); with AVX2, where dequantizing costs more than the
 * memory it saves beyond one row (2-core EPYC Zen 1: m = 1 ~1.1x, m = 4 0.6x), 1; the portable
 * build's scalar loop never wins: 0. */
int pagedllm_gguf_max_rows(void) {
#if defined(__AVX512F__)
    return 8;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* Returns 0, or -1 for an unsupported type, -2 for a k that is not whole blocks or a row size
 * that does not match. x: [m][k] fp32, w: [n][row_bytes], y: [m][n] fp32, all contiguous. */
int pagedllm_gguf_linear(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int64_t row_bytes, float *y, int nthreads) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    if (k % QK != 0 || row_bytes != k / QK * ts) return -2;
    const int64_t nb = k / QK;
    const int64_t groups = (n + NR - 1) / NR;
    nthreads = KERNEL_THREADS(nthreads);
    if (nthreads < 1) nthreads = 1;
    /* Runs of row groups, about eight per thread, handed out as threads come free (a descheduled
     * thread delays one run, not a static share). */
    const int64_t chunk = groups / (8 * (int64_t)nthreads) > 1 ? groups / (8 * (int64_t)nthreads) : 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = 0;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
        /* The buffered path's scratch: one row group's dequantized weights. Without it (no memory)
         * the register path computes the same sums, only slower. */
        if (m > MT2) buf = (float *)malloc((size_t)NR * (size_t)k * sizeof(float));
#endif
#pragma omp for schedule(dynamic, chunk)
        for (int64_t g = 0; g < groups; g++) {
            int64_t r0 = g * NR;
            int nr = (int)(n - r0 < NR ? n - r0 : NR);
            row_group(qtype, nr, x, m, k, w, row_bytes, nb, y, n, r0, buf);
        }
        free(buf);
    }
    return 0;
}

/* Dequantize whole rows to fp32 (tests compare it with gguf's own dequantize). */
int pagedllm_gguf_dequantize(int qtype, const uint8_t *w, int64_t n, int64_t k, float *out) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    if (k % QK != 0) return -2;
    const int64_t nb = k / QK;
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < nb; b++) dequant_block(qtype, w + (r * nb + b) * ts, out + r * k + b * QK);
    return 0;
}
