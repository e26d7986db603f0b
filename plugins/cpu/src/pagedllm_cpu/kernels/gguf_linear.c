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
 * Tiling: 4 output rows x 4 tokens; a row group's blocks are dequantized once per token group
 * and reused by all 4 tokens, each x block is loaded once for all 4 rows. Rows are split across
 * OpenMP threads. Built at run time with the host's compiler (-march=native) by gguf_kernels.py.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
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
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0) {
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
#else
static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0) {
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

/* Returns 0, or -1 for an unsupported type, -2 for a k that is not whole blocks or a row size
 * that does not match. x: [m][k] fp32, w: [n][row_bytes], y: [m][n] fp32, all contiguous. */
int pagedllm_gguf_linear(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int64_t row_bytes, float *y, int nthreads) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    if (k % QK != 0 || row_bytes != k / QK * ts) return -2;
    const int64_t nb = k / QK;
    const int64_t groups = (n + NR - 1) / NR;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        int64_t r0 = g * NR;
        int nr = (int)(n - r0 < NR ? n - r0 : NR);
        row_group(qtype, nr, x, m, k, w, row_bytes, nb, y, n, r0);
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
