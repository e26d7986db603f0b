/* y = x W^T with W kept in GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), at any number of
 * token rows: the weights are dequantized (in registers or into a small cache-resident tile),
 * exactly as gguf-py / llama.cpp define the dequantized values, and multiplied in fp32.
 *
 * Why: decoding one token reads every weight once, so it runs at memory speed, and a Q4_K weight
 * is 4.5 bits instead of fp32's 32. Batched steps (prefill, many sequences) are compute-bound:
 * there a tile of rows is dequantized once into an L2-resident fp32 buffer and reused by every
 * token of a block of up to a few hundred, so the dequantization costs a few percent and the
 * model needs no dense fp32 copy of the weight at all.
 *
 * Layouts (a row of W is its blocks along k, byte for byte as in the GGUF file):
 *   Q4_0 (32 w, 18 B): f16 d, 16 B nibbles               w = d * (q - 8)
 *   Q4_1 (32 w, 20 B): f16 d, f16 m, 16 B nibbles        w = d * q + m
 *   Q8_0 (32 w, 34 B): f16 d, 32 x int8                  w = d * q
 *     nibbles: the low nibble of byte j is element j, the high nibble element j + 16.
 *   Q4_K (256 w, 144 B): f16 d, f16 dmin, 12 B of 6-bit scales/mins, 128 B nibbles;
 *     sub-block j (32 w) has sc_j, m_j; w = (d sc_j) q - (dmin m_j); bytes 32c..32c+31 hold
 *     sub-block 2c in their low nibbles and 2c + 1 in their high nibbles.
 *   Q5_K (256 w, 176 B): as Q4_K plus 32 B of high bits before the nibbles: bit j of byte l
 *     is bit 4 of element l of sub-block j.
 *   Q6_K (256 w, 210 B): 128 B low nibbles, 64 B 2-bit highs, 16 x int8 scales, f16 d; each
 *     128-weight half h takes ql[64h..64h+63] and qh[32h..32h+31]; element 32g + l of the half
 *     (g = 0..3) is (low or high nibble of ql[64h + 32(g & 1) + l]) | (bits 2g of qh[32h + l]) << 4,
 *     minus 32; w = (d sc_s) q for the 16-weight sub-block s.
 * Every product above (scale x integer) is exact in fp32 (at most 24 significant bits), so the
 * fused multiply-adds used here round exactly like gguf-py's separate multiply and add: every w is
 * the fp32 value gguf's dequantize produces.
 *
 * Numerics (batch- and thread-invariance): every output y[t][r] is summed in ONE fixed order,
 * whatever the path, the number of token rows or the thread count: V lane accumulators (V = 16
 * with AVX-512, 8 with AVX2), lane j summing x[k] w[k] for k = j, j + V, j + 2V, ... in order
 * with fused multiply-adds, then the lanes added by the same reduction tree (the portable build:
 * 16 lanes, separate multiply and add, lanes added pairwise). Each output is computed by one
 * thread. So a token row's result does not depend on its batch mates or the thread count (the
 * tests check this bit for bit).
 *
 * Paths (AVX-512): up to SMALL_M token rows, tiles of 4 output rows x up to 4 tokens, the blocks
 * dequantized in registers 32 weights at a time, x read once per tile; more rows: work units of
 * (a panel of up to 32 output rows) x (a block of 24 to 240 tokens), the panel dequantized once
 * per unit into a buffer of <= 256 KiB, then a 4-row x 6-token register tile (24 accumulators, 10
 * loads per 24 FMAs) over all of k. AVX2: 4 rows x 2 tokens in registers for the 32-weight formats
 * up to 2 tokens; otherwise a row group dequantized into a buffer. Portable: a row dequantized into
 * a buffer, 16 lane sums in plain C (compilers vectorize it). Rows (or units) are split across
 * OpenMP threads. Built at run time with the host's compiler (-march=native) by clib.py.
 *
 * One-token steps take one row per group, so each thread streams its rows' blocks in address
 * order. llama.cpp's arithmetic (int8 activations, VNNI integer dot products) is gguf_int8.c,
 * chosen by PAGEDLLM_CPU_INT8_DOT=on.
 */
#define _DEFAULT_SOURCE /* syscall(), for the AMX permission */
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

enum { QK = 32, QK_K = 256, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, NR = 4, MT = 4 };

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

/* Bytes of one block, or 0 for a type without a kernel. */
static inline int type_size(int qtype) {
    switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}

/* Weights of one block. */
static inline int block_weights(int qtype) { return qtype >= Q4_K ? QK_K : QK; }

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 packed bytes. */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Scalar: one block's weights (32 or 256). */
static void dequant_block(int qtype, const uint8_t *b, float *w) {
    if (qtype == Q4_K || qtype == Q5_K) {
        const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (qtype == Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(scales, j, &sc, &m);
            const float dj = d * (float)sc, mj = dmin * (float)m;
            const uint8_t *q = qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            for (int l = 0; l < 32; l++) {
                int v = (q[l] >> shift) & 0x0f;
                if (qtype == Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                w[32 * j + l] = dj * (float)v - mj; /* dj * v is exact: one rounding, like numpy's */
            }
        }
        return;
    }
    if (qtype == Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16_to_f32(rd16(b + 208));
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 4; g++)
                for (int l = 0; l < 32; l++) {
                    const int i = 128 * h + 32 * g + l;
                    const uint8_t lo = ql[64 * h + 32 * (g & 1) + l];
                    const int v = (((g < 2 ? lo : lo >> 4) & 0x0f) | (((qh[32 * h + l] >> (2 * g)) & 3) << 4)) - 32;
                    w[i] = (d * (float)sc[i / 16]) * (float)v;
                }
        return;
    }
    const float d = f16_to_f32(rd16(b));
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
/* One 32-weight block as two 16-lane vectors: elements 0-15 and 16-31. */
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

/* The lanes of four accumulators added, each in one fixed tree: lane i + lane i+8, then i + i+4,
 * i + i+2, i + i+1 (written out, not _mm512_reduce_add_ps, whose order a compiler may choose),
 * four accumulators at a time; the sums of the first nr go to out[0..nr). */
static inline __attribute__((always_inline)) void hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d, float *out,
                                                           int nr) {
    /* [a lanes 0-7 | b lanes 0-7] + [a lanes 8-15 | b lanes 8-15]: each half is one s8 */
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarter j: s4 of accumulator j */
    __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512i first_lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    float sums[4];
    _mm_storeu_ps(sums, _mm512_castps512_ps128(_mm512_permutexvar_ps(first_lanes, s1)));
    for (int r = 0; r < nr; r++) out[r] = sums[r];
}

static inline __m512i load16_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }

/* One block's weights into w (32 or 256 floats), the same values as dequant_block. */
static inline void dequant_block_avx512(int qtype, const uint8_t *b, float *w) {
    const __m512i nib = _mm512_set1_epi32(0x0f);
    if (qtype == Q4_K || qtype == Q5_K) {
        const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (qtype == Q5_K ? 48 : 16);
        __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
        if (qtype == Q5_K) {
            h0 = load16_u8(qh);
            h1 = load16_u8(qh + 16);
        }
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(scales, j, &sc, &m);
            const __m512 dj = _mm512_set1_ps(d * (float)sc), mj = _mm512_set1_ps(-(dmin * (float)m));
            const uint8_t *q = qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            __m512i v0 = _mm512_and_si512(_mm512_srli_epi32(load16_u8(q), shift), nib);
            __m512i v1 = _mm512_and_si512(_mm512_srli_epi32(load16_u8(q + 16), shift), nib);
            if (qtype == Q5_K) {
                const __m512i one = _mm512_set1_epi32(1);
                v0 = _mm512_or_si512(v0, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h0, j), one), 4));
                v1 = _mm512_or_si512(v1, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h1, j), one), 4));
            }
            _mm512_storeu_ps(w + 32 * j, _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(v0), mj));
            _mm512_storeu_ps(w + 32 * j + 16, _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(v1), mj));
        }
        return;
    }
    if (qtype == Q6_K) {
        const uint8_t *ql = b, *qhb = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16_to_f32(rd16(b + 208));
        const __m512i three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
        for (int h = 0; h < 2; h++)
            for (int l0 = 0; l0 < 32; l0 += 16) {
                const __m512i a = load16_u8(ql + 64 * h + l0), c = load16_u8(ql + 64 * h + 32 + l0);
                const __m512i hb = load16_u8(qhb + 32 * h + l0);
                __m512i v[4] = {_mm512_and_si512(a, nib), _mm512_and_si512(c, nib), _mm512_srli_epi32(a, 4),
                                _mm512_srli_epi32(c, 4)};
                for (int g = 0; g < 4; g++) {
                    const int i = 128 * h + 32 * g + l0;
                    __m512i hi = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2 * g), three), 4);
                    __m512i q = _mm512_sub_epi32(_mm512_or_si512(v[g], hi), bias);
                    const __m512 ds = _mm512_set1_ps(d * (float)sc[i / 16]);
                    _mm512_storeu_ps(w + i, _mm512_mul_ps(ds, _mm512_cvtepi32_ps(q)));
                }
            }
        return;
    }
    __m512 lo, hi;
    dequant_block_v(qtype, b, &lo, &hi);
    _mm512_storeu_ps(w, lo);
    _mm512_storeu_ps(w + 16, hi);
}

/* Small steps, 32-weight formats: y[t][r] for rows r0..r0+nr, tokens t0..t0+mt (nr <= NR,
 * mt <= MT), every block dequantized in registers once per tile. */
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
        hsum16x4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], y + (t0 + t) * n + r0, nr);
}

static void tile_any(int qtype, int nr, int mt, const float *x, int64_t k, const uint8_t *w, int64_t row_bytes,
                     int64_t nb, float *y, int64_t n, int64_t r0, int64_t t0) {
    tile(qtype, nr, mt, x, k, w, row_bytes, nb, y, n, r0, t0);
}

/* Weights 32 j .. 32 j + 31 of a K-quant super-block as two 16-lane vectors (sub-block j of Q4_K /
 * Q5_K; for Q6_K group j % 4 of half j / 4, two 16-weight sub-blocks): the values of dequant_block. */
static inline __attribute__((always_inline)) void dequant_sub_v(int qtype, const uint8_t *b, int j, __m512 *lo,
                                                                __m512 *hi) {
    /* the 32 integers are assembled as bytes (shifts in 16-bit lanes, then masks that drop what
     * crossed in from the neighbouring byte), then widened 16 at a time */
    const __m256i nib = _mm256_set1_epi8(0x0f);
    if (qtype == Q6_K) {
        const int h = j / 4, g = j % 4;
        const int8_t *sc = (const int8_t *)(b + 192) + 8 * h + 2 * g;
        const float d = f16_to_f32(rd16(b + 208));
        __m256i a = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (g & 1)));
        a = _mm256_and_si256(g >= 2 ? _mm256_srli_epi16(a, 4) : a, nib);
        __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * g)), _mm256_set1_epi8(3)), 4);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(a, hb), _mm256_set1_epi8(32)); /* -32..31 */
        *lo = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[0]),
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))));
        *hi = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[1]),
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))));
        return;
    }
    int sc, m;
    k_scale_min(b + 4, j, &sc, &m);
    const __m512 dj = _mm512_set1_ps(f16_to_f32(rd16(b)) * (float)sc);
    const __m512 mj = _mm512_set1_ps(-(f16_to_f32(rd16(b + 2)) * (float)m));
    __m256i v = _mm256_loadu_si256((const __m256i *)(b + (qtype == Q5_K ? 48 : 16) + 32 * (j / 2)));
    v = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(v, 4) : v, nib);
    if (qtype == Q5_K) {
        __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 16));
        hb = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
        v = _mm256_or_si256(v, _mm256_slli_epi16(hb, 4));
    }
    *lo = _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v))), mj);
    *hi = _mm512_fmadd_ps(dj, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1))), mj);
}

/* Small steps, K-quants: as tile, each 32 weights of the nr rows dequantized in registers and
 * multiplied 16 at a time in k order. */
static inline __attribute__((always_inline)) void tile_k(int qtype, int nr, int mt, const float *x, int64_t k,
                                                         const uint8_t *w, int64_t row_bytes, int64_t nb,
                                                         float *y, int64_t n, int64_t r0, int64_t t0) {
    const int ts = type_size(qtype);
    __m512 acc[NR][MT];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int j = 0; j < 8; j++) {
            __m512 lo[NR], hi[NR];
            for (int r = 0; r < nr; r++) dequant_sub_v(qtype, w + (r0 + r) * row_bytes + b * ts, j, &lo[r], &hi[r]);
            for (int t = 0; t < mt; t++) {
                const float *xb = x + (t0 + t) * k + b * QK_K + 32 * j;
                __m512 xl = _mm512_loadu_ps(xb), xh = _mm512_loadu_ps(xb + 16);
                for (int r = 0; r < nr; r++) {
                    acc[r][t] = _mm512_fmadd_ps(xl, lo[r], acc[r][t]);
                    acc[r][t] = _mm512_fmadd_ps(xh, hi[r], acc[r][t]);
                }
            }
        }
    for (int t = 0; t < mt; t++)
        hsum16x4(acc[0][t], acc[1][t], acc[2][t], acc[3][t], y + (t0 + t) * n + r0, nr);
}

static void tile_k_any(int qtype, int nr, int mt, const float *x, int64_t k, const uint8_t *w, int64_t row_bytes,
                       int64_t nb, float *y, int64_t n, int64_t r0, int64_t t0) {
    tile_k(qtype, nr, mt, x, k, w, row_bytes, nb, y, n, r0, t0);
}

static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    (void)buf;
    int64_t t0 = 0;
    if (nr == 1 && m == 1) { /* one token: rows one at a time (pagedllm_gguf_linear) */
        switch (qtype) {
        case Q4_K: tile_k(Q4_K, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        case Q5_K: tile_k(Q5_K, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        case Q6_K: tile_k(Q6_K, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        case Q4_0: tile(Q4_0, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        case Q4_1: tile(Q4_1, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        default: tile(Q8_0, 1, 1, x, k, w, row_bytes, nb, y, n, r0, 0); return;
        }
    }
    if (qtype >= Q4_K) {
        if (nr == NR) {
            if (qtype == Q4_K)
                for (; t0 + MT <= m; t0 += MT) tile_k(Q4_K, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
            else if (qtype == Q5_K)
                for (; t0 + MT <= m; t0 += MT) tile_k(Q5_K, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
            else
                for (; t0 + MT <= m; t0 += MT) tile_k(Q6_K, NR, MT, x, k, w, row_bytes, nb, y, n, r0, t0);
            if (m - t0 == 1) {
                if (qtype == Q4_K) tile_k(Q4_K, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
                else if (qtype == Q5_K) tile_k(Q5_K, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
                else tile_k(Q6_K, NR, 1, x, k, w, row_bytes, nb, y, n, r0, t0);
                t0 += 1;
            }
        }
        for (; t0 < m; t0 += MT)
            tile_k_any(qtype, nr, (int)(m - t0 < MT ? m - t0 : MT), x, k, w, row_bytes, nb, y, n, r0, t0);
        return;
    }
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

/* Large steps: RN dequantized rows (stride k, from the panel buffer) x mr tokens, over all of k,
 * 16 weights at a time: the same per-output order as tile / tile_k. */
enum { RN = 4, RM = 6, PANEL_MAX = 32, SMALL_M = 8 };

static inline __attribute__((always_inline)) void micro(int mr, const float *x, int64_t k, const float *wb,
                                                        float *y, int64_t n, int nr) {
    __m512 acc[RM][RN];
#pragma GCC unroll 6
    for (int t = 0; t < mr; t++)
#pragma GCC unroll 4
        for (int r = 0; r < RN; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __m512 wv[RN];
#pragma GCC unroll 4
        for (int r = 0; r < RN; r++) wv[r] = _mm512_loadu_ps(wb + r * k + i);
#pragma GCC unroll 6
        for (int t = 0; t < mr; t++) {
            __m512 xv = _mm512_loadu_ps(x + t * k + i);
#pragma GCC unroll 4
            for (int r = 0; r < RN; r++) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
        }
    }
    for (int t = 0; t < mr; t++) hsum16x4(acc[t][0], acc[t][1], acc[t][2], acc[t][3], y + t * n, nr);
}

static void micro_any(int mr, const float *x, int64_t k, const float *wb, float *y, int64_t n, int nr) {
    switch (mr) {
    case 6: micro(6, x, k, wb, y, n, nr); break;
    case 5: micro(5, x, k, wb, y, n, nr); break;
    case 4: micro(4, x, k, wb, y, n, nr); break;
    case 3: micro(3, x, k, wb, y, n, nr); break;
    case 2: micro(2, x, k, wb, y, n, nr); break;
    default: micro(1, x, k, wb, y, n, nr); break;
    }
}

/* Rows per panel and tokens per block for k: each buffer (panel, x block) at most ~256 KiB, so
 * both stay in L2 while the register tiles pass over them; but at least 4 token tiles per block
 * (large k: a panel's dequantization is shared by at least 24 tokens). */
static inline int64_t panel_rows(int64_t k) {
    int64_t p = (int64_t)(256 * 1024 / 4) / k / RN * RN;
    return p < RN ? RN : (p > PANEL_MAX ? PANEL_MAX : p);
}

static inline int64_t token_block(int64_t k) {
    int64_t t = (int64_t)(256 * 1024 / 4) / k / RM * RM;
    return t < 4 * RM ? 4 * RM : (t > 40 * RM ? 40 * RM : t);
}

static int gemm_blocks(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                       int64_t row_bytes, float *y, int nthreads) {
    const int ts = type_size(qtype), bw = block_weights(qtype);
    const int64_t nb = k / bw, pr = panel_rows(k), tb = token_block(k);
    const int64_t panels = (n + pr - 1) / pr, tblocks = (m + tb - 1) / tb, units = panels * tblocks;
    const int64_t chunk = units / (4 * (int64_t)nthreads) > 1 ? units / (4 * (int64_t)nthreads) : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* the panel, padded to whole RN-row tiles with zero rows (computed, never stored) */
        float *wb = (float *)aligned_alloc(64, (size_t)((pr * k * sizeof(float) + 63) / 64 * 64));
        if (!wb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, chunk)
        for (int64_t u = 0; u < units; u++) {
            if (!wb) continue;
            const int64_t tbi = u / panels, p = u % panels;
            const int64_t r0 = p * pr, rows = n - r0 < pr ? n - r0 : pr;
            const int64_t padded = (rows + RN - 1) / RN * RN;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t b = 0; b < nb; b++)
                    dequant_block_avx512(qtype, w + (r0 + r) * row_bytes + b * ts, wb + r * k + b * bw);
            if (padded > rows) memset(wb + rows * k, 0, (size_t)((padded - rows) * k) * sizeof(float));
            const int64_t t_end = (tbi + 1) * tb < m ? (tbi + 1) * tb : m;
            for (int64_t t0 = tbi * tb; t0 < t_end; t0 += RM) {
                const int mr = (int)(t_end - t0 < RM ? t_end - t0 : RM);
                for (int64_t rr = 0; rr < padded; rr += RN) {
                    const int nr = (int)(rows - rr < RN ? rows - rr : RN);
                    if (mr == RM) micro(RM, x + t0 * k, k, wb + rr * k, y + t0 * n + r0 + rr, n, nr);
                    else micro_any(mr, x + t0 * k, k, wb + rr * k, y + t0 * n + r0 + rr, n, nr);
                }
            }
        }
        free(wb);
    }
    return failed ? -4 : 0;
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

/* The row group's weights are dequantized once into buf (nr x k floats, in L1/L2) and every pair
 * of tokens reads them from there. Each output is summed exactly as in tile8 (8 lanes, k in
 * order, fused multiply-adds), so a row's result does not depend on m. */
static void row_group_buffered(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                               int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    const int ts = type_size(qtype), bw = block_weights(qtype);
    for (int r = 0; r < nr; r++)
        for (int64_t b = 0; b < nb; b++) {
            if (bw == QK) {
                __m256 wv[4];
                dequant_block_v8(qtype, w + (r0 + r) * row_bytes + b * ts, wv);
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(buf + r * k + b * QK + 8 * i, wv[i]);
            } else {
                dequant_block(qtype, w + (r0 + r) * row_bytes + b * ts, buf + r * k + b * bw);
            }
        }
    for (int64_t t0 = 0; t0 < m; t0 += MT2) {
        const int mt = (int)(m - t0 < MT2 ? m - t0 : MT2);
        __m256 acc[NR][MT2];
        for (int r = 0; r < NR; r++)
            for (int t = 0; t < MT2; t++) acc[r][t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i += 8)
            for (int r = 0; r < nr; r++)
                for (int t = 0; t < mt; t++)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (t0 + t) * k + i), _mm256_loadu_ps(buf + r * k + i),
                                                acc[r][t]);
        for (int t = 0; t < mt; t++)
            for (int r = 0; r < nr; r++) y[(t0 + t) * n + r0 + r] = hsum8(acc[r][t]);
    }
}

static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    int64_t t0 = 0;
    if (buf && (m > MT2 || qtype >= Q4_K)) {
        row_group_buffered(qtype, nr, x, m, k, w, row_bytes, nb, y, n, r0, buf);
        return;
    }
    if (qtype >= Q4_K) { /* no buffer (out of memory): the caller reports it */
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
/* Portable: each row dequantized into buf (k floats), then per token 16 lane sums, lane j adding
 * x[k] w[k] for k = j, j + 16, ... in order, and the lanes added pairwise (8, 4, 2, 1): plain C
 * that compilers vectorize (SSE2, NEON), the same order at every m. */
enum { PL = 16 };

static void row_group(int qtype, int nr, const float *x, int64_t m, int64_t k, const uint8_t *w,
                      int64_t row_bytes, int64_t nb, float *y, int64_t n, int64_t r0, float *buf) {
    const int ts = type_size(qtype), bw = block_weights(qtype);
    for (int r = 0; r < nr; r++) {
        for (int64_t b = 0; b < nb; b++) dequant_block(qtype, w + (r0 + r) * row_bytes + b * ts, buf + b * bw);
        for (int64_t t = 0; t < m; t++) {
            const float *xt = x + t * k;
            float acc[PL] = {0};
            for (int64_t i = 0; i < k; i += PL)
                for (int j = 0; j < PL; j++) acc[j] += xt[i + j] * buf[i + j];
            for (int h = PL / 2; h > 0; h /= 2)
                for (int j = 0; j < h; j++) acc[j] += acc[j + h];
            y[t * n + r0 + r] = acc[0];
        }
    }
}
#endif

/* Token rows up to which multiplying the blocks beats the fp32 panel GEMM on the dense weights
 * (weights streamed from memory, SmolLM2 shapes, end to end): with AVX-512, 8 (2-core Xeon: m = 1
 * ~2.5x faster, m = 4 ~2x, m = 16 about even); with AVX2, where dequantizing costs more than the
 * memory it saves beyond one row (2-core EPYC Zen 1: m = 1 ~1.1x, m = 4 0.6x), 1; the portable
 * build's scalar loop never wins: 0. The blocks are multiplied at every row count when the layer
 * keeps no dense weight (the loader's default where the CPU op supports the format). */
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
 * that does not match, -4 when a scratch buffer could not be allocated. x: [m][k] fp32,
 * w: [n][row_bytes], y: [m][n] fp32, all contiguous. */
int pagedllm_gguf_linear(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                         int64_t row_bytes, float *y, int nthreads) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    const int bw = block_weights(qtype);
    if (k <= 0 || k % bw != 0 || row_bytes != k / bw * ts) return -2;
    if (m <= 0 || n <= 0) return 0;
    const int64_t nb = k / bw;
    nthreads = KERNEL_THREADS(nthreads);
    if (nthreads < 1) nthreads = 1;
#if defined(__AVX512F__)
    if (m > SMALL_M) return gemm_blocks(qtype, x, m, k, w, n, row_bytes, y, nthreads);
#endif
#if defined(__AVX512F__)
    /* One token: each row on its own, so a thread streams its rows' blocks in address order (four
     * rows interleaved are four short streams, which the hardware prefetchers follow worse: measured
     * ~1.3-2x slower from memory). The same sums per output either way. */
    const int rows_per_group = m == 1 ? 1 : NR;
#else
    const int rows_per_group = NR;
#endif
    const int64_t groups = (n + rows_per_group - 1) / rows_per_group;
    /* Runs of row groups, about eight per thread, handed out as threads come free (a descheduled
     * thread delays one run, not a static share). */
    const int64_t chunk = groups / (8 * (int64_t)nthreads) > 1 ? groups / (8 * (int64_t)nthreads) : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = 0;
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
        /* The buffered path's scratch: one row group's dequantized weights. Without it (no memory)
         * the register path computes the same sums for the 32-weight formats, only slower. */
        if (m > MT2 || bw == QK_K) {
            buf = (float *)malloc((size_t)NR * (size_t)k * sizeof(float));
            if (!buf && bw == QK_K) {
#pragma omp atomic write
                failed = 1;
            }
        }
#elif !defined(__AVX512F__)
        buf = (float *)malloc((size_t)k * sizeof(float)); /* one dequantized row */
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#endif
#pragma omp for schedule(dynamic, chunk)
        for (int64_t g = 0; g < groups; g++) {
            int64_t r0 = g * rows_per_group;
            int nr = (int)(n - r0 < rows_per_group ? n - r0 : rows_per_group);
#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
            if (!buf) continue; /* reported: failed */
#endif
            row_group(qtype, nr, x, m, k, w, row_bytes, nb, y, n, r0, buf);
        }
        free(buf);
    }
    return failed ? -4 : 0;
}

/* Dequantize whole rows to fp32 (tests compare it with gguf's own dequantize). */
int pagedllm_gguf_dequantize(int qtype, const uint8_t *w, int64_t n, int64_t k, float *out) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    const int bw = block_weights(qtype);
    if (k % bw != 0) return -2;
    const int64_t nb = k / bw;
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < nb; b++) dequant_block(qtype, w + (r * nb + b) * ts, out + r * k + b * bw);
    return 0;
}

/* Rows ids[0..count) of the block matrix w [n][k] dequantized into out [count][k] (an embedding
 * lookup on blocks). Returns 0, -1 / -2 as pagedllm_gguf_linear, -3 for an id outside [0, n). */
int pagedllm_gguf_rows(int qtype, const uint8_t *w, int64_t n, int64_t k, const int64_t *ids, int64_t count,
                       float *out, int nthreads) {
    const int ts = type_size(qtype);
    if (ts == 0) return -1;
    const int bw = block_weights(qtype);
    if (k <= 0 || k % bw != 0) return -2;
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return -3;
    const int64_t nb = k / bw, row_bytes = nb * ts;
    nthreads = KERNEL_THREADS(nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (count * k >= (1 << 16))
    for (int64_t i = 0; i < count; i++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + ids[i] * row_bytes + b * ts;
#if defined(__AVX512F__)
            dequant_block_avx512(qtype, blk, out + i * k + b * bw);
#else
            dequant_block(qtype, blk, out + i * k + b * bw);
#endif
        }
    return 0;
}

/* ---- Batched steps in bf16 on AMX tiles, straight from the blocks ----
 *
 * y = bf16(x) bf16(W)^T with fp32 accumulation (TDPBF16PS), for steps of many token rows on CPUs
 * with AMX: a panel of AMX_PN output rows is dequantized (exactly, as above), rounded to bf16 and
 * laid out as B tiles once per unit of work, then multiplied against up to AMX_TB tokens of x
 * (rounded to bf16 once per call, row-major: A tiles load it as it is). No weight copy is kept: the
 * blocks are the only weights in memory. C tiles are [16 tokens][16 outputs] of fp32, stored
 * straight into y. Every output sums its k in one fixed order (32-wide chunks in k order, each
 * chunk's pairs as the AMX unit adds them), so a token row's result does not depend on its batch
 * mates or the thread count. Numerics: both operands rounded to bf16 (8 significant bits), sums in
 * fp32: about 2^-8 of sum |x_i w_i| per output.
 * B tile layout (k chunk c of 32, 16 output rows): 16 rows r of 16 (w[o][32c + 2r], w[o][32c + 2r + 1])
 * bf16 pairs, one per output o. Needs the OS's permission for tile data (arch_prctl), asked once. */
/* Kept tiles' formats (see "Compact kept tiles" below) and the bytes of one tile's record in each. */
enum { AMX_BF16 = 0, AMX_Q4 = 1, AMX_Q4S = 2, AMX_Q8 = 3, AMX_Q8H = 4 };

static inline int64_t amx_record_bytes(int fmt) {
    switch (fmt) {
    case AMX_Q4: case AMX_Q4S: return 384;
    case AMX_Q8: return 640;
    case AMX_Q8H: return 768;
    default: return 1024;
    }
}

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PAGEDLLM_HAVE_AMX 1

enum { AMX_PN = 32, AMX_TM = 32 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

static int amx_permitted(void) {
    static int state; /* 0: not asked yet, 1: granted, -1: refused (no AMX, or an old kernel) */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s == 1;
}

static void amx_configure(void) {
    amx_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* Tokens per unit: their bf16 rows (AMX_TB x k x 2 bytes) stay in L2 while a panel passes over them. */
static inline int64_t amx_token_block(int64_t k) {
    int64_t t = (int64_t)(1 << 20) / (2 * k) / AMX_TM * AMX_TM;
    return t < AMX_TM ? AMX_TM : (t > 1024 ? 1024 : t);
}

/* fp32 row f[k] (0: zeros) -> bf16 (round to nearest even), chunk c of 32 at out + 512 c: one row of
 * each of its 16-row group's A tiles (see amx_round_rows). */
static inline void amx_round_row(const float *f, int64_t k, uint16_t *out) {
    for (int64_t c = 0; c < k / 32; c++) {
        const __m512i v = f ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + 32 * c + 16), _mm512_loadu_ps(f + 32 * c))
                            : _mm512_setzero_si512();
        _mm512_store_si512((void *)(out + 512 * c), v);
    }
}

/* 16 vectors of 16 x 32 bits, transposed in place: r[i] lane j <-> r[j] lane i. */
static inline __attribute__((always_inline)) void transpose16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    /* u[4g + j], 128-bit lane L: element 4L + j of rows 4g..4g+3 */
    for (int j = 0; j < 4; j++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xee);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xee);
        r[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        r[8 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

/* 16 output rows' fp32 weights (f, row stride k) into their B tiles: for each k chunk c, 16 rows r of
 * (w[o][32c + 2r], w[o][32c + 2r + 1]) for o = 0..15, as bf16 (rounded to nearest even). */
static inline void amx_pack_group(const float *f, int64_t k, uint32_t *group) {
    for (int64_t c = 0; c < k / 32; c++) {
        __m512i v[16];
        for (int o = 0; o < 16; o++)
            v[o] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + o * k + 32 * c + 16), _mm512_loadu_ps(f + o * k + 32 * c));
        transpose16x16(v);
        for (int r = 0; r < 16; r++) _mm512_store_si512((void *)(group + c * 256 + r * 16), v[r]);
    }
}

/* As amx_pack_group, straight from 16 rows of blocks (the first ``valid``; the rest zeros): each
 * 32-weight chunk dequantized in registers (the values of dequant_block), rounded to bf16 and
 * transposed into place, with no fp32 copy of the rows. */
static inline void amx_pack_blocks(int qtype, const uint8_t *w, int64_t row_bytes, int valid, int64_t k,
                                   uint32_t *group) {
    const int ts = type_size(qtype), bw = block_weights(qtype);
    for (int64_t c = 0; c < k / 32; c++) {
        const int64_t blk = c * 32 / bw;
        const int j = (int)(c % (bw / 32));
        __m512i v[16];
        for (int o = 0; o < 16; o++) {
            if (o >= valid) {
                v[o] = _mm512_setzero_si512();
                continue;
            }
            const uint8_t *b = w + o * row_bytes + blk * ts;
            __m512 lo, hi;
            if (bw == QK)
                dequant_block_v(qtype, b, &lo, &hi);
            else
                dequant_sub_v(qtype, b, j, &lo, &hi);
            v[o] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
        transpose16x16(v);
        for (int r = 0; r < 16; r++) _mm512_store_si512((void *)(group + c * 256 + r * 16), v[r]);
    }
}

/* C tile (16 tokens x 16 outputs) into y, only the mt x nr corner that exists. */
static inline void amx_store(const float *tmp, float *y, int64_t n, int mt, int nr) {
    const __mmask16 mask = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < mt; t++) _mm512_mask_storeu_ps(y + t * n, mask, _mm512_loadu_ps(tmp + 16 * t));
}

#define AMX_STORE(tile, yp, mt, nr)                                                                  \
    do {                                                                                            \
        if ((mt) == 16 && (nr) == 16) {                                                             \
            _tile_stored(tile, (yp), n * 4);                                                        \
        } else if ((mt) > 0 && (nr) > 0) {                                                          \
            _tile_stored(tile, tmp, 64);                                                            \
            amx_store(tmp, (yp), n, (mt), (nr));                                                 \
        }                                                                                           \
    } while (0)

enum { F32 = 0 }; /* GGML's type number for plain fp32 rows: a dense weight */

/* Panel p (output rows 32p..32p+31, zeros past n) of W as bf16 B tiles: two groups of k/32 tiles,
 * the first for rows 32p..32p+15 (AMX_PN * k * 2 bytes in all). rows16: scratch of 16 k floats. */
static void amx_pack_panel(int qtype, const uint8_t *w, int64_t k, int64_t n, int64_t row_bytes, int64_t p,
                           uint32_t *panel, float *rows16) {
    const int64_t r0 = p * AMX_PN, rows = n - r0 < AMX_PN ? n - r0 : AMX_PN;
    for (int64_t g = 0; g < AMX_PN / 16; g++) {
        const int valid = (int)(rows - 16 * g < 0 ? 0 : (rows - 16 * g > 16 ? 16 : rows - 16 * g));
        uint32_t *group = panel + g * (k / 32) * 256;
        if (qtype != F32) {
            amx_pack_blocks(qtype, w + (r0 + 16 * g) * row_bytes, row_bytes, valid, k, group);
        } else if (valid == 16) { /* a dense weight's rows are packed as they are */
            amx_pack_group((const float *)(w + (r0 + 16 * g) * row_bytes), k, group);
        } else {
            for (int64_t o = 0; o < 16; o++) {
                if (o < valid)
                    memcpy(rows16 + o * k, w + (r0 + 16 * g + o) * row_bytes, (size_t)k * 4);
                else
                    memset(rows16 + o * k, 0, (size_t)k * 4);
            }
            amx_pack_group(rows16, k, group);
        }
    }
}

/* ---- Compact kept tiles: a quantized weight's tiles at 0.75-1.5 bytes a weight ----
 *
 * Kept bf16 tiles cost 2 bytes a weight, and a batched decode step reads every one of them from
 * memory: on a 2-core host that read is most of the step. A compact tile keeps, for each B tile
 * (16 output rows x 32 k), the block's integers pre-arranged in the tile's order and the fp32 scale
 * and offset that dequantize them, and is expanded into the bf16 tile in registers, into a panel's
 * scratch during a unit of work's first pass over the panel (amx_block_expanding: chunk c + 1's
 * tiles while chunk c's products run; the later passes read the scratch). The expanded tile is the bf16 tile
 * amx_pack_panel packs, bit for bit: w = fma(d, q, m) in fp32 with d and m computed at pack time by
 * the same C expressions as dequant_block_v / dequant_sub_v (every d * q is exact, so one fused
 * rounding equals theirs; m = -0.0 where they only multiply, which leaves every product's bits as
 * they are), then rounded to bf16 to nearest even by the same instruction.
 * Formats (one per GGML type; a record per tile, tiles in the order of the bf16 tiles):
 *   AMX_Q4  (Q4_1, Q4_K): 256 B of nibbles, d[16], m[16] fp32                 384 B (0.75 B a weight)
 *   AMX_Q4S (Q4_0):       as AMX_Q4, the nibble minus 8                       384 B
 *   AMX_Q8  (Q8_0, Q5_K): 512 x int8, d[16], m[16]                            640 B (1.25 B a weight)
 *   AMX_Q8H (Q6_K):       512 x int8, d[2][16], m[2][16] (k 0-15, k 16-31)    768 B (1.5 B a weight)
 * Integers: byte 32 r + 2 o + j is q[o][2 r + j] (tile row r, output o); AMX_Q4 keeps rows r and r + 8
 * in the low and high nibble of byte 32 r + 2 o + j (r < 8). d and m: per output o of the tile. */

static inline int amx_format_of(int qtype) {
    switch (qtype) {
    case Q4_1: case Q4_K: return AMX_Q4;
    case Q4_0: return AMX_Q4S;
    case Q8_0: case Q5_K: return AMX_Q8;
    case Q6_K: return AMX_Q8H;
    default: return AMX_BF16;
    }
}

/* The integers, scales and offsets of weights 32 c .. 32 c + 31 of one row's blocks: q[l] such that
 * w[l] = fma(d[l / 16], q[l], m[l / 16]) is the value dequant_block gives (AMX_Q4S: q is the raw
 * nibble, the expansion subtracts 8). */
static void amx_chunk_ints(int qtype, const uint8_t *row, int64_t c, int8_t q[32], float d[2], float m[2]) {
    const int bw = block_weights(qtype);
    const uint8_t *b = row + (c * 32 / bw) * type_size(qtype);
    const int j = (int)(c % (bw / 32));
    const float neg0 = -0.0f;
    if (qtype == Q4_K || qtype == Q5_K) {
        int sc, mn;
        k_scale_min(b + 4, j, &sc, &mn);
        d[0] = d[1] = f16_to_f32(rd16(b)) * (float)sc;
        m[0] = m[1] = -(f16_to_f32(rd16(b + 2)) * (float)mn);
        const uint8_t *qs = b + (qtype == Q5_K ? 48 : 16) + 32 * (j / 2);
        for (int l = 0; l < 32; l++) {
            int v = (qs[l] >> (4 * (j & 1))) & 0x0f;
            if (qtype == Q5_K) v |= ((b[16 + l] >> j) & 1) << 4;
            q[l] = (int8_t)v;
        }
        return;
    }
    if (qtype == Q6_K) {
        const int h = j / 4, g = j % 4;
        const int8_t *sc = (const int8_t *)(b + 192) + 8 * h + 2 * g;
        const float dd = f16_to_f32(rd16(b + 208));
        d[0] = dd * (float)sc[0];
        d[1] = dd * (float)sc[1];
        m[0] = m[1] = neg0;
        for (int l = 0; l < 32; l++) {
            const uint8_t lo = b[64 * h + 32 * (g & 1) + l];
            q[l] = (int8_t)((((g < 2 ? lo : lo >> 4) & 0x0f) | (((b[128 + 32 * h + l] >> (2 * g)) & 3) << 4)) - 32);
        }
        return;
    }
    d[0] = d[1] = f16_to_f32(rd16(b));
    m[0] = m[1] = qtype == Q4_1 ? f16_to_f32(rd16(b + 2)) : neg0;
    if (qtype == Q8_0) {
        for (int l = 0; l < 32; l++) q[l] = (int8_t)b[2 + l];
        return;
    }
    const uint8_t *qs = b + (qtype == Q4_1 ? 4 : 2);
    for (int l = 0; l < 16; l++) {
        q[l] = (int8_t)(qs[l] & 0x0f);
        q[l + 16] = (int8_t)(qs[l] >> 4);
    }
}

/* Panel p of W (output rows 32 p .. 32 p + 31, zeros past n) as compact records: two groups of k / 32. */
static void amx_pack_panel_compact(int qtype, int fmt, const uint8_t *w, int64_t k, int64_t n, int64_t row_bytes,
                                   int64_t p, uint8_t *panel) {
    const int64_t rb = amx_record_bytes(fmt), r0 = p * AMX_PN;
    for (int64_t g = 0; g < AMX_PN / 16; g++)
        for (int64_t c = 0; c < k / 32; c++) {
            uint8_t *rec = panel + (g * (k / 32) + c) * rb;
            const int halves = fmt == AMX_Q8H ? 2 : 1;
            float *dv = (float *)(rec + (fmt == AMX_Q4 || fmt == AMX_Q4S ? 256 : 512)), *mv = dv + 16 * halves;
            memset(rec, 0, (size_t)rb);
            for (int o = 0; o < 16; o++) {
                const int64_t row = r0 + 16 * g + o;
                if (row >= n) continue; /* zeros: d = m = 0, so the expanded weights are +0 */
                int8_t q[32];
                float d[2], m[2];
                amx_chunk_ints(qtype, w + row * row_bytes, c, q, d, m);
                for (int h = 0; h < halves; h++) {
                    dv[16 * h + o] = d[h];
                    mv[16 * h + o] = m[h];
                }
                for (int r = 0; r < 16; r++)
                    for (int jj = 0; jj < 2; jj++) {
                        const uint8_t v = (uint8_t)q[2 * r + jj];
                        if (fmt == AMX_Q4 || fmt == AMX_Q4S)
                            rec[32 * (r & 7) + 2 * o + jj] |= (uint8_t)(r < 8 ? v : v << 4);
                        else
                            rec[32 * r + 2 * o + jj] = v;
                    }
            }
        }
}

/* One tile row from its 32 integers (int8, in the tile's order) and its scale / offset vectors. */
static inline __attribute__((always_inline)) void amx_expand_row(__m256i v, __m512 d0, __m512 d1, __m512 m0,
                                                                 __m512 m1, uint32_t *out) {
    const __m512 f0 = _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))), m0);
    const __m512 f1 = _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))), m1);
    _mm512_store_si512((void *)out, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
}

/* One compact record (format fmt) expanded into its bf16 B tile (256 words), the tile amx_pack_panel packs. */
static inline __attribute__((always_inline)) void amx_expand_tile(int fmt, const uint8_t *rec, uint32_t *tile) {
    const __m512i lo_idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i hi_idx = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const int q4 = fmt == AMX_Q4 || fmt == AMX_Q4S, halves = fmt == AMX_Q8H ? 2 : 1;
    const __m256i nib = _mm256_set1_epi8(0x0f), off = _mm256_set1_epi8(fmt == AMX_Q4S ? 8 : 0);
    const float *dv = (const float *)(rec + (q4 ? 256 : 512)), *mv = dv + 16 * halves;
    for (int h = 0; h < halves; h++) {
        const __m512 d = _mm512_loadu_ps(dv + 16 * h), m = _mm512_loadu_ps(mv + 16 * h);
        const __m512 d0 = _mm512_permutexvar_ps(lo_idx, d), d1 = _mm512_permutexvar_ps(hi_idx, d);
        const __m512 m0 = _mm512_permutexvar_ps(lo_idx, m), m1 = _mm512_permutexvar_ps(hi_idx, m);
        if (q4) {
            for (int r = 0; r < 8; r++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(rec + 32 * r));
                const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(b, nib), off);
                const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), nib), off);
                amx_expand_row(lo, d0, d1, m0, m1, tile + 16 * r);
                amx_expand_row(hi, d0, d1, m0, m1, tile + 16 * (r + 8));
            }
        } else {
            const int r_end = halves == 2 ? 8 * (h + 1) : 16;
            for (int r = halves == 2 ? 8 * h : 0; r < r_end; r++)
                amx_expand_row(_mm256_loadu_si256((const __m256i *)(rec + 32 * r)), d0, d1, m0, m1, tile + 16 * r);
        }
    }
}

/* Chunk c (k 32 c .. 32 c + 31) of the 32 x 32 block's sums: tiles 0 (a0 x b0), 1 (a0 x b1), 2 (a1 x b0),
 * 3 (a1 x b1) += the products of token rows a0 (a 16-row group of A tiles, amx_round_rows), a1 (the next
 * 16) and a panel's B tiles b0 (its first 16 output rows), b1 (the next 16). */
static inline __attribute__((always_inline)) void amx_chunk(const uint16_t *a0, const uint16_t *a1, const uint32_t *b0,
                                                            const uint32_t *b1, int64_t c) {
    _tile_loadd(4, a0 + 512 * c, 64);
    _tile_loadd(5, a1 + 512 * c, 64);
    _tile_loadd(6, b0 + 256 * c, 64);
    _tile_loadd(7, b1 + 256 * c, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

static inline __attribute__((always_inline)) void amx_zero_block(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

/* The 32 x 32 block of sums over all of k (amx_chunk, chunk by chunk in k order), left in tiles 0-3.
 * next: the following panel's tiles to prefetch meanwhile, or 0. */
static inline __attribute__((always_inline)) void amx_block(const uint16_t *a0, const uint16_t *a1,
                                                            const uint32_t *b0, const uint32_t *b1, int64_t k,
                                                            const char *next) {
    amx_zero_block();
    for (int64_t c = 0; c < k / 32; c++) {
        if (next)
            for (int l = 0; l < 1024; l += 64) {
                _mm_prefetch(next + 1024 * c + l, _MM_HINT_T0);
                _mm_prefetch(next + 1024 * (k / 32 + c) + l, _MM_HINT_T0);
            }
        amx_chunk(a0, a1, b0, b1, c);
    }
}

/* amx_block's first pass over a compact panel (records recs, format fmt), expanding its bf16 B tiles
 * into out (b0 = out, b1 = out + (k / 32) * 256, for the later passes) as it goes: chunk c + 1's two
 * tiles are expanded after chunk c's products are issued, so the vector units expand while the tile
 * unit multiplies. The same tiles, and the same products in the same order, as expanding the whole
 * panel first and then amx_block. next: the following panel's records to prefetch meanwhile, or 0. */
static inline __attribute__((always_inline)) void amx_block_expanding(const uint16_t *a0, const uint16_t *a1, int fmt,
                                                                      const uint8_t *recs, int64_t k, uint32_t *out,
                                                                      const uint8_t *next) {
    const int64_t rb = amx_record_bytes(fmt), kc = k / 32;
    uint32_t *b0 = out, *b1 = out + kc * 256;
    const uint8_t *r0 = recs, *r1 = recs + kc * rb;
    amx_expand_tile(fmt, r0, b0);
    amx_expand_tile(fmt, r1, b1);
    amx_zero_block();
    for (int64_t c = 0; c < kc; c++) {
        amx_chunk(a0, a1, b0, b1, c);
        if (next)
            for (int64_t l = 0; l < rb; l += 64) {
                _mm_prefetch((const char *)(next + c * rb + l), _MM_HINT_T0);
                _mm_prefetch((const char *)(next + (kc + c) * rb + l), _MM_HINT_T0);
            }
        if (c + 1 < kc) {
            amx_expand_tile(fmt, r0 + (c + 1) * rb, b0 + 256 * (c + 1));
            amx_expand_tile(fmt, r1 + (c + 1) * rb, b1 + 256 * (c + 1));
        }
    }
}

/* x's rows rounded to bf16 (rows past m, up to a whole AMX_TM, zero): the A side of every AMX product,
 * laid out as its tiles, [t / 16][c][t % 16][32]: each 16-row x 32 tile one contiguous KiB (a tile load
 * reads 16 consecutive lines instead of one line from each of 16 rows k * 2 bytes apart: 2048-row
 * products 0.1-0.15x faster when the AMX unit is fast, Intel Xeon with AMX). Group g starts at 16 g k. */
static uint16_t *amx_round_rows(const float *x, int64_t m, int64_t k, int nthreads) {
    const int64_t mp = (m + AMX_TM - 1) / AMX_TM * AMX_TM;
    uint16_t *xb = (uint16_t *)aligned_alloc(64, (size_t)(mp * k * 2));
    if (!xb) return 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < mp; t++) amx_round_row(t < m ? x + t * k : 0, k, xb + (t / 16) * 16 * k + (t % 16) * 32);
    return xb;
}

/* tiles: W's panels packed ahead (pagedllm_amx_pack) in format fmt (bf16 tiles, or compact records
 * expanded here panel by panel), or 0 to pack each panel here, per step. */
static int gemm_blocks_amx(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                           int64_t row_bytes, const uint8_t *tiles, int fmt, float *y, int nthreads) {
    const int64_t mp = (m + AMX_TM - 1) / AMX_TM * AMX_TM, tb = amx_token_block(k);
    const int64_t panels = (n + AMX_PN - 1) / AMX_PN, tblocks = (mp + tb - 1) / tb, units = panels * tblocks;
    const int64_t cpanel = 2 * (k / 32) * amx_record_bytes(fmt); /* a compact panel's bytes */
    uint16_t *xb = amx_round_rows(x, m, k, nthreads);
    if (!xb) return -4;
    const int64_t chunk = units / (4 * (int64_t)nthreads) > 1 ? units / (4 * (int64_t)nthreads) : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        uint32_t *panel = tiles && fmt == AMX_BF16 ? 0 : (uint32_t *)aligned_alloc(64, (size_t)(AMX_PN * k * 2));
        float *row = (float *)aligned_alloc(64, (size_t)(16 * k * 4 + 16 * 16 * 4)); /* 16 rows, then a C tile */
        const int ok = ((tiles && fmt == AMX_BF16) || panel) && row;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure();
        }
        float *rows16 = row, *tmp = row ? row + 16 * k : 0;
        int64_t packed = -1;
#pragma omp for schedule(dynamic, chunk)
        for (int64_t u = 0; u < units; u++) {
            if (!ok) continue;
            /* Packing at each step: a thread's consecutive units share a panel (packed once for all the
             * token blocks). Kept tiles: they share a token block, whose bf16 rows stay in L2 while the
             * panels stream past (the rows of a long prefill would otherwise be re-read for every panel). */
            const int64_t p = tiles ? u % panels : u / tblocks, tbi = tiles ? u / panels : u % tblocks;
            const int64_t r0 = p * AMX_PN, rows = n - r0 < AMX_PN ? n - r0 : AMX_PN;
            int expand = 0; /* compact records: the unit's first pass expands the panel (amx_block_expanding) */
            if (!tiles && packed != p) {
                amx_pack_panel(qtype, w, k, n, row_bytes, p, panel, rows16);
                packed = p;
            } else if (tiles && fmt != AMX_BF16 && packed != p) {
                expand = 1;
                packed = p;
            }
            const uint32_t *b0 = tiles && fmt == AMX_BF16 ? (const uint32_t *)tiles + p * (AMX_PN * k / 2) : panel;
            const uint32_t *b1 = b0 + (k / 32) * 256;
            const int64_t t_end = (tbi + 1) * tb < mp ? (tbi + 1) * tb : mp;
            const int nr0 = rows < 16 ? (int)rows : 16, nr1 = rows > 16 ? (int)(rows - 16) : 0;
            for (int64_t t0 = tbi * tb; t0 < t_end; t0 += AMX_TM) {
                const uint16_t *a0 = xb + t0 * k, *a1 = xb + (t0 + 16) * k;
                /* Kept tiles stream from memory: the first pass over a panel fetches the next one's. */
                const char *next = tiles && fmt == AMX_BF16 && t0 == tbi * tb && p + 1 < panels
                                       ? (const char *)((const uint32_t *)tiles + (p + 1) * (AMX_PN * k / 2))
                                       : 0;
                if (expand) {
                    amx_block_expanding(a0, a1, fmt, tiles + p * cpanel, k, panel,
                                        p + 1 < panels ? tiles + (p + 1) * cpanel : 0);
                    expand = 0;
                } else {
                    amx_block(a0, a1, b0, b1, k, next);
                }
                const int mt0 = m - t0 >= 16 ? 16 : (int)(m - t0 > 0 ? m - t0 : 0);
                const int mt1 = m - t0 - 16 >= 16 ? 16 : (int)(m - t0 - 16 > 0 ? m - t0 - 16 : 0);
                float *y0 = y + t0 * n + r0, *y1 = y + (t0 + 16) * n + r0;
                AMX_STORE(0, y0, mt0, nr0);
                AMX_STORE(1, y0 + 16, mt0, nr1);
                AMX_STORE(2, y1, mt1, nr0);
                AMX_STORE(3, y1 + 16, mt1, nr1);
            }
        }
        if (ok) _tile_release();
        free(panel);
        free(row);
    }
    free(xb);
    return failed ? -4 : 0;
}

void pagedllm_silu_mul_row(const float *g, const float *u, float *o, int64_t d); /* cpu_ops.c */

/* y[t] = silu(x[t] G^T) * (x[t] U^T), [m][d]: a gated MLP's gate and up projections from their kept
 * tiles, and pagedllm_silu_and_mul over the pair, without writing the [m][2d] projection out. Each
 * 32 x 32 block of the gate and of the up product is summed as gemm_blocks_amx sums it and combined
 * by the same SiLU code, so y is bit for bit silu_and_mul(gemm_blocks_amx([G; U])). d % 32 == 0. */
static int gemm_tiles_amx_silu(const float *x, int64_t m, int64_t k, const uint8_t *gate, const uint8_t *up,
                               int fmt, int64_t d, float *y, int nthreads) {
    const int64_t mp = (m + AMX_TM - 1) / AMX_TM * AMX_TM, tb = amx_token_block(k);
    const int64_t panels = d / AMX_PN, tblocks = (mp + tb - 1) / tb, units = panels * tblocks;
    const int64_t panel_words = AMX_PN * k / 2, cpanel = 2 * (k / 32) * amx_record_bytes(fmt);
    uint16_t *xb = amx_round_rows(x, m, k, nthreads);
    if (!xb) return -4;
    const int64_t chunk = units / (4 * (int64_t)nthreads) > 1 ? units / (4 * (int64_t)nthreads) : 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *gu = (float *)aligned_alloc(64, (size_t)(2 * AMX_TM * AMX_PN * 4)); /* a gate and an up block */
        /* compact records: the gate's and the up panel's bf16 tiles, expanded per unit */
        uint32_t *gp = fmt == AMX_BF16 ? 0 : (uint32_t *)aligned_alloc(64, (size_t)(2 * AMX_PN * k * 2));
        if (gp == 0 && fmt != AMX_BF16) {
            free(gu);
            gu = 0;
        }
        if (!gu) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure();
        }
        float *g = gu, *uq = gu ? gu + AMX_TM * AMX_PN : 0;
#pragma omp for schedule(dynamic, chunk)
        for (int64_t u = 0; u < units; u++) {
            if (!gu) continue;
            const int64_t p = u % panels, tbi = u / panels; /* token block by token block, as kept tiles */
            const uint32_t *g0, *u0;
            if (fmt == AMX_BF16) {
                g0 = (const uint32_t *)gate + p * panel_words;
                u0 = (const uint32_t *)up + p * panel_words;
            } else { /* compact records: expanded into gp by the unit's first pass (amx_block_expanding) */
                g0 = gp;
                u0 = gp + panel_words;
            }
            const uint32_t *g1 = g0 + (k / 32) * 256, *u1 = u0 + (k / 32) * 256;
            const int64_t t_end = (tbi + 1) * tb < mp ? (tbi + 1) * tb : mp;
            const int more = p + 1 < panels;
            for (int64_t t0 = tbi * tb; t0 < t_end; t0 += AMX_TM) {
                const uint16_t *a0 = xb + t0 * k, *a1 = xb + (t0 + 16) * k;
                const int first_pass = t0 == tbi * tb, expand = fmt != AMX_BF16 && first_pass;
                const int first = fmt == AMX_BF16 && first_pass && more;
                if (expand)
                    amx_block_expanding(a0, a1, fmt, gate + p * cpanel, k, gp, more ? gate + (p + 1) * cpanel : 0);
                else
                    amx_block(a0, a1, g0, g1, k, first ? (const char *)(g0 + panel_words) : 0);
                _tile_stored(0, g, AMX_PN * 4);
                _tile_stored(1, g + 16, AMX_PN * 4);
                _tile_stored(2, g + 16 * AMX_PN, AMX_PN * 4);
                _tile_stored(3, g + 16 * AMX_PN + 16, AMX_PN * 4);
                if (expand)
                    amx_block_expanding(a0, a1, fmt, up + p * cpanel, k, gp + panel_words, more ? up + (p + 1) * cpanel : 0);
                else
                    amx_block(a0, a1, u0, u1, k, first ? (const char *)(u0 + panel_words) : 0);
                _tile_stored(0, uq, AMX_PN * 4);
                _tile_stored(1, uq + 16, AMX_PN * 4);
                _tile_stored(2, uq + 16 * AMX_PN, AMX_PN * 4);
                _tile_stored(3, uq + 16 * AMX_PN + 16, AMX_PN * 4);
                const int64_t rows = m - t0 < AMX_TM ? m - t0 : AMX_TM;
                for (int64_t r = 0; r < rows; r++)
                    pagedllm_silu_mul_row(g + r * AMX_PN, uq + r * AMX_PN, y + (t0 + r) * d + p * AMX_PN, AMX_PN);
            }
        }
        if (gu) _tile_release();
        free(gu);
        free(gp);
    }
    free(xb);
    return failed ? -4 : 0;
}
#endif

/* 1 when this build multiplies blocks on AMX tiles and the OS grants tile data (asked here once). */
int pagedllm_gguf_amx_available(void) {
#if defined(PAGEDLLM_HAVE_AMX)
    return amx_permitted();
#else
    return 0;
#endif
}

/* y = bf16(x) bf16(W)^T in fp32 on AMX tiles (see above). qtype 0 (GGML's F32): W is a dense fp32
 * [n][k] weight (row_bytes = 4k), rounded to bf16 as it is packed. k must be whole 32-chunks.
 * Returns as pagedllm_gguf_linear, or -5 where this build or the OS has no AMX. */
int pagedllm_gguf_linear_amx(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                             int64_t row_bytes, float *y, int nthreads) {
    const int ts = qtype == 0 ? 4 : type_size(qtype);
    if (ts == 0) return -1;
    const int bw = qtype == 0 ? 1 : block_weights(qtype);
    if (k <= 0 || k % 32 != 0 || k % bw != 0 || row_bytes != k / bw * ts) return -2;
#if defined(PAGEDLLM_HAVE_AMX)
    if (!amx_permitted()) return -5;
    if (m <= 0 || n <= 0) return 0;
    nthreads = KERNEL_THREADS(nthreads);
    return gemm_blocks_amx(qtype, x, m, k, w, n, row_bytes, 0, AMX_BF16, y, nthreads < 1 ? 1 : nthreads);
#else
    (void)x; (void)m; (void)w; (void)n; (void)y; (void)nthreads;
    return -5;
#endif
}

/* The compact format of GGML type qtype's kept tiles (see "Compact kept tiles"), 0 (bf16 tiles) for
 * a dense weight (type 0) or a type without one. */
int pagedllm_amx_tile_format(int qtype) {
#if defined(PAGEDLLM_HAVE_AMX)
    return amx_format_of(qtype);
#else
    (void)qtype;
    return 0;
#endif
}

/* Bytes of W's tiles packed ahead (pagedllm_amx_pack) in format fmt: whole 32-row panels of k. */
int64_t pagedllm_amx_tiles_bytes(int fmt, int64_t k, int64_t n) {
    return (n + 31) / 32 * 2 * (k / 32) * amx_record_bytes(fmt);
}

/* W's B tiles, every panel as pagedllm_gguf_linear_amx packs it at each step, into tiles
 * (pagedllm_amx_tiles_bytes(fmt, k, n) bytes, 64-byte aligned), so that pagedllm_amx_linear_tiles
 * reads them instead of packing: the same values, the same products, bit for bit. fmt 0: bf16 tiles
 * (2 bytes a weight, any type); else pagedllm_amx_tile_format(qtype)'s compact records.
 * Returns as pagedllm_gguf_linear_amx; -3 for a format that is not qtype's. */
int pagedllm_amx_pack(int qtype, const uint8_t *w, int64_t k, int64_t n, int64_t row_bytes, int fmt, void *tiles,
                      int nthreads) {
    const int ts = qtype == 0 ? 4 : type_size(qtype);
    if (ts == 0) return -1;
    const int bw = qtype == 0 ? 1 : block_weights(qtype);
    if (k <= 0 || k % 32 != 0 || k % bw != 0 || row_bytes != k / bw * ts || ((uintptr_t)tiles & 63)) return -2;
#if defined(PAGEDLLM_HAVE_AMX)
    if (!amx_permitted()) return -5;
    if (fmt != AMX_BF16 && fmt != amx_format_of(qtype)) return -3;
    if (n <= 0) return 0;
    nthreads = KERNEL_THREADS(nthreads);
    const int64_t panels = (n + AMX_PN - 1) / AMX_PN, cpanel = 2 * (k / 32) * amx_record_bytes(fmt);
    int failed = 0;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads)
    {
        float *rows16 = fmt == AMX_BF16 ? (float *)aligned_alloc(64, (size_t)(16 * k * 4)) : 0;
        if (!rows16 && fmt == AMX_BF16) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (fmt != AMX_BF16)
                amx_pack_panel_compact(qtype, fmt, w, k, n, row_bytes, p, (uint8_t *)tiles + p * cpanel);
            else if (rows16)
                amx_pack_panel(qtype, w, k, n, row_bytes, p, (uint32_t *)tiles + p * (AMX_PN * k / 2), rows16);
        }
        free(rows16);
    }
    return failed ? -4 : 0;
#else
    (void)w; (void)n; (void)fmt; (void)tiles; (void)nthreads;
    return -5;
#endif
}

/* y = bf16(x) W^T on AMX tiles from W's tiles packed ahead by pagedllm_amx_pack in format fmt (n rows
 * of k): the result of pagedllm_gguf_linear_amx on the weight they were packed from, without the
 * packing. */
int pagedllm_amx_linear_tiles(const float *x, int64_t m, int64_t k, const void *tiles, int fmt, int64_t n, float *y,
                              int nthreads) {
    if (k <= 0 || k % 32 != 0 || ((uintptr_t)tiles & 63) || fmt < AMX_BF16 || fmt > AMX_Q8H) return -2;
#if defined(PAGEDLLM_HAVE_AMX)
    if (!amx_permitted()) return -5;
    if (m <= 0 || n <= 0) return 0;
    nthreads = KERNEL_THREADS(nthreads);
    return gemm_blocks_amx(F32, x, m, k, 0, n, 4 * k, (const uint8_t *)tiles, fmt, y, nthreads < 1 ? 1 : nthreads);
#else
    (void)x; (void)m; (void)tiles; (void)n; (void)y; (void)nthreads;
    return -5;
#endif
}

/* y [m][d] = silu(x G^T) * (x U^T) from the gate's and the up projection's kept tiles (each packed by
 * pagedllm_amx_pack in format fmt, d rows of k): pagedllm_silu_and_mul of pagedllm_amx_linear_tiles
 * over [G; U], bit for bit, without the [m][2d] intermediate. d must be a whole number of 32-row panels. */
int pagedllm_amx_linear_tiles_silu(const float *x, int64_t m, int64_t k, const void *gate, const void *up, int fmt,
                                   int64_t d, float *y, int nthreads) {
    if (k <= 0 || k % 32 != 0 || d % 32 != 0 || ((uintptr_t)gate & 63) || ((uintptr_t)up & 63) || fmt < AMX_BF16 || fmt > AMX_Q8H)
        return -2;
#if defined(PAGEDLLM_HAVE_AMX)
    if (!amx_permitted()) return -5;
    if (m <= 0 || d <= 0) return 0;
    nthreads = KERNEL_THREADS(nthreads);
    return gemm_tiles_amx_silu(x, m, k, (const uint8_t *)gate, (const uint8_t *)up, fmt, d, y,
                               nthreads < 1 ? 1 : nthreads);
#else
    (void)x; (void)m; (void)gate; (void)up; (void)d; (void)y; (void)nthreads;
    return -5;
#endif
}
