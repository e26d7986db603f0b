/* y = x W^T with W kept in GGUF blocks and x quantized to int8: llama.cpp's arithmetic, integer
 * dot products with AVX-512 VNNI, at any number of token rows.
 *
 * Why: decoding one token reads every weight once; with fp32 activations each 4-bit weight costs
 * a widening, a conversion and an fp32 fused multiply-add per token (gguf_linear.c), and a 2-core
 * machine cannot do that at the speed its memory delivers the blocks. Multiplying the weights'
 * small integers by int8 activations does 64 products per instruction instead of 16.
 *
 * Activations (each token row on its own, so a row's result never depends on its batch mates):
 *   K-quant weights (Q4_K, Q5_K, Q6_K): per 256 elements one fp32 scale dx = max|x| / 127 and
 *     q = round(x / dx) in [-127, 127] (llama.cpp's Q8_K), with the sums of q per 16 and per 32
 *     elements (for the weights' offsets and mins);
 *   32-weight formats (Q4_0, Q4_1, Q8_0): per 32 elements one scale (llama.cpp's Q8_0/Q8_1).
 * A row holding NaN or infinity gets a NaN scale for that block, so its outputs are NaN (the fp32
 * path propagates them too) instead of silently dropping the value.
 *
 * Products (all exact integers until the last step of each block):
 *   K-quants: the unsigned weight integers (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63) times the int8
 *     activations in pairs (vpmaddubsw: at most 2 * 63 * 127, no saturation), then times the
 *     sub-block's 6/8-bit scale and summed into int32 (vpdpwssd); per super-block
 *     y += (d dx) isum - sum_j (dmin m_j) (dx bsum_j) (Q4_K / Q5_K; bsum_j: the sum of the
 *     activation integers of sub-block j) or y += (d dx) isum + sum_s (-32 d sc_s) (dx bsum_s)
 *     (Q6_K, whose integers are stored +32), the offset terms as one 16-lane fused multiply-add.
 *   32-weight formats: 64 weights (two blocks) against 64 activations per vpdpbusd (unsigned x
 *     signed, 4 products per int32 lane; Q8_0's signed integers are offset by 128), then per lane
 *     y += (isum dx) dw + cw xs, where xs = dx * (the lane's 4 activation integers summed) and cw
 *     undoes the offset (Q4_0: -8 d, Q8_0: -128 d) or adds the min (Q4_1: m).
 * Each output y[t][r] is summed in one fixed order (blocks in k order into 16 fp32 lanes, then one
 * fixed reduction tree), by one thread, whatever the number of rows or threads: results are
 * batch- and thread-invariant, bit for bit (tests check this).
 *
 * Error: the activations' rounding, about 2^-8 of max|x| per block; measured against an fp64
 * reference on the dequantized weights (tests and benchmarks/bench_gguf_kernels.py), ~1e-3 of the
 * sum of |terms| of an output (the fp32 kernels: ~1e-7).
 *
 * Built where the compiler targets AVX-512 F/BW/VNNI (Intel Xeon since Cascade Lake, AMD Zen 4
 * and later); elsewhere pagedllm_gguf_int8_available() returns 0 and the fp32 kernels are used.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_OPENMP)
#include <omp.h>
#define I8_THREADS(n) ((n) > 0 ? (n) : omp_get_max_threads())
#else
#define I8_THREADS(n) 1
#endif

enum { I8_Q4_0 = 2, I8_Q4_1 = 3, I8_Q8_0 = 8, I8_Q4_K = 12, I8_Q5_K = 13, I8_Q6_K = 14 };

/* Quantized activations per token row: K-quants, per 256 elements XK_BYTES bytes (q at 0, the
 * scale dx at XK_D, at XK_S 16 floats: dx times the sums of q per 16 (Q6_K) or per 32 (Q4_K /
 * Q5_K, then 8 zeros)); 32-weight formats, per 64 elements X32_BYTES (q at 0, 16 lane scales at
 * 64, 16 lane sums xs at 128). */
enum { XK_BYTES = 384, XK_D = 256, XK_S = 320, X32_BYTES = 192 };


#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>

static int i8_type_size(int qtype) {
    switch (qtype) {
    case I8_Q4_0: return 18;
    case I8_Q4_1: return 20;
    case I8_Q8_0: return 34;
    case I8_Q4_K: return 144;
    case I8_Q5_K: return 176;
    case I8_Q6_K: return 210;
    default: return 0;
    }
}

static inline int is_kquant(int qtype) { return qtype >= I8_Q4_K; }

enum { NR8 = 4, MT8 = 4, PANEL8 = 32 };
#ifndef SMALL8
#define SMALL8 16
#endif
#ifndef UNITS_PER_THREAD
#define UNITS_PER_THREAD 2
#endif
#ifndef PF_BLOCKS
#define PF_BLOCKS 6
#endif

static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* The 16 lanes added in one fixed tree. */
static inline float hsum(__m512 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* max |x| over 16 * c floats; NaN if any is NaN */
static inline float absmax(const float *x, int c) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < c; i++) {
        const __m512 v = _mm512_loadu_ps(x + 16 * i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    return nan ? NAN : _mm512_reduce_max_ps(m);
}

/* 16 floats to 16 int8 at scale iscale (round to nearest even; |q| <= 127). */
static inline __m128i quant16(const float *x, __m512 iscale) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), iscale));
    q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    return _mm512_cvtepi32_epi8(q);
}

/* One token row of k elements into the K-quant activation layout. Q4_K / Q5_K store the 32-element
 * sub-blocks of each 256 in the order their weights' nibbles come out of 64 bytes of qs:
 * 0, 2, 1, 3, 4, 6, 5, 7; Q6_K in natural order. */
static void quantize_row_k(int qtype, const float *x, int64_t k, uint8_t *out) {
    static const int order_q4k[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int64_t b = 0; b < k / 256; b++) {
        const float *xb = x + 256 * b;
        uint8_t *ob = out + XK_BYTES * b;
        float amax = absmax(xb, 16);
        float d, id;
        if (isnan(amax) || isinf(amax)) {
            d = NAN;
            id = 0.0f;
        } else if (amax == 0.0f) {
            d = 0.0f;
            id = 0.0f;
        } else {
            d = amax / 127.0f;
            id = 127.0f / amax;
        }
        const __m512 is = _mm512_set1_ps(id);
        int8_t q[256];
        int bs16[16];
        float sums[16];
        for (int i = 0; i < 16; i++) {
            __m128i v = quant16(xb + 16 * i, is);
            _mm_storeu_si128((__m128i *)(q + 16 * i), v);
            bs16[i] = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(v));
        }
        for (int i = 0; i < 16; i++) /* exact integers; one rounding each when scaled */
            sums[i] = qtype == I8_Q6_K ? d * (float)bs16[i] : i < 8 ? d * (float)(bs16[2 * i] + bs16[2 * i + 1]) : 0.0f;
        if (qtype == I8_Q6_K) {
            memcpy(ob, q, 256);
        } else {
            for (int s = 0; s < 8; s++) memcpy(ob + 32 * s, q + 32 * order_q4k[s], 32);
        }
        memcpy(ob + XK_D, &d, 4);
        memset(ob + XK_D + 4, 0, XK_S - XK_D - 4);
        memcpy(ob + XK_S, sums, 64);
    }
}

/* One token row into the 32-weight formats' layout, two blocks (64 elements) at a time. Q8_0: the
 * 64 int8 in natural order, lanes 0-7 block 0 and 8-15 block 1. Q4_0 / Q4_1 (whose bytes hold
 * element j low and j + 16 high): elements 0-15 of block 0, 0-15 of block 1, 16-31 of block 0,
 * 16-31 of block 1, so lanes 0-3 and 8-11 are block 0's, 4-7 and 12-15 block 1's. */
static void quantize_row_32(int qtype, const float *x, int64_t k, uint8_t *out) {
    for (int64_t p = 0; p < k / 64; p++) {
        const float *xp = x + 64 * p;
        uint8_t *op = out + X32_BYTES * p;
        float dx[2];
        __m128i q[2][2];
        for (int h = 0; h < 2; h++) {
            float amax = absmax(xp + 32 * h, 2);
            float id;
            if (isnan(amax) || isinf(amax)) {
                dx[h] = NAN;
                id = 0.0f;
            } else if (amax == 0.0f) {
                dx[h] = 0.0f;
                id = 0.0f;
            } else {
                dx[h] = amax / 127.0f;
                id = 127.0f / amax;
            }
            const __m512 is = _mm512_set1_ps(id);
            q[h][0] = quant16(xp + 32 * h, is);
            q[h][1] = quant16(xp + 32 * h + 16, is);
        }
        __m512i all;
        __m512 lane_d;
        if (qtype == I8_Q8_0) {
            all = _mm512_inserti32x4(_mm512_castsi128_si512(q[0][0]), q[0][1], 1);
            all = _mm512_inserti32x4(_mm512_inserti32x4(all, q[1][0], 2), q[1][1], 3);
            lane_d = _mm512_insertf32x8(_mm512_set1_ps(dx[0]), _mm256_set1_ps(dx[1]), 1);
        } else {
            all = _mm512_inserti32x4(_mm512_castsi128_si512(q[0][0]), q[1][0], 1);
            all = _mm512_inserti32x4(_mm512_inserti32x4(all, q[0][1], 2), q[1][1], 3);
            const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
            lane_d = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_setr_ps(dx[0], dx[1], 0.0f, 0.0f)));
        }
        /* each lane's 4 integers summed (exact), times the lane's scale */
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), all);
        _mm512_storeu_si512((void *)op, all);
        _mm512_storeu_ps((float *)(op + 64), lane_d);
        _mm512_storeu_ps((float *)(op + 128), _mm512_mul_ps(_mm512_cvtepi32_ps(sums), lane_d));
    }
}

/* A K-quant super-block's weights as 4 x 64 unsigned bytes in the activation layout's order, with
 * their int16 scale vectors (vpdpwssd multiplies lane pair i by scale lane i). */
struct kblock {
    __m512i w[4], sc[4];
    /* the offset term per lane, against the activations' scaled sums at XK_S: Q6_K -32 d sc_s
     * (its integers are stored +32), Q4_K / Q5_K dmin m_j (subtracted; lanes 8-15 zero) */
    __m512 cs;
    float d;
};

static inline __attribute__((always_inline)) void unpack_k(int qtype, const uint8_t *b, struct kblock *kb) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    if (qtype == I8_Q6_K) {
        const __m512i three = _mm512_set1_epi8(3);
        kb->d = half(b + 208);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(b + 192));
        const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
        kb->cs = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)), _mm512_set1_ps(-32.0f * kb->d));
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * h));
            const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
            /* low nibbles: elements 0-31 (qh bits 0-1) and 32-63 (bits 2-3) of the half; high: 64-95, 96-127 */
            const __m512i sl = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
            const __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
            const __m512i hl = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sl), three), 4);
            const __m512i hh = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh), three), 4);
            kb->w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, nib), hl);
            kb->w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nib), hh);
        }
        /* int16 lane l of step s covers elements 64 s + 2 l and + 1: 16-element sub-block 4 s + l / 8 */
        for (int s = 0; s < 4; s++) {
            const __m512i idx = _mm512_set_epi16(
                4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 3, 4 * s + 2,
                4 * s + 2, 4 * s + 2, 4 * s + 2, 4 * s + 2, 4 * s + 2, 4 * s + 2, 4 * s + 2, 4 * s + 1, 4 * s + 1,
                4 * s + 1, 4 * s + 1, 4 * s + 1, 4 * s + 1, 4 * s + 1, 4 * s + 1, 4 * s, 4 * s, 4 * s, 4 * s, 4 * s,
                4 * s, 4 * s, 4 * s);
            kb->sc[s] = _mm512_permutexvar_epi16(idx, sc);
        }
        return;
    }
    kb->d = half(b);
    const float dmin = half(b + 2);
    /* 6-bit scales and mins of the 8 sub-blocks from 12 bytes (gguf's get_scale_min_k4) */
    uint32_t u[3];
    memcpy(u, b + 4, 12);
    const uint64_t sc8 = (uint64_t)(u[0] & 0x3f3f3f3f) |
                         (uint64_t)((u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030)) << 32;
    const uint64_t m8 = (uint64_t)(u[1] & 0x3f3f3f3f) |
                        (uint64_t)(((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030)) << 32;
    const __m512i sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc8)));
    const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m8)));
    kb->cs = _mm512_zextps256_ps512(_mm256_mul_ps(mins, _mm256_set1_ps(dmin)));
    const uint8_t *qs = b + (qtype == I8_Q5_K ? 48 : 16);
    __m512i qh = _mm512_setzero_si512();
    if (qtype == I8_Q5_K) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
    static const int sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    for (int s = 0; s < 4; s++) {
        const __m512i v = _mm512_loadu_si512((const void *)(qs + 64 * (s / 2)));
        __m512i q = (s & 1) ? _mm512_and_si512(_mm512_srli_epi16(v, 4), nib) : _mm512_and_si512(v, nib);
        if (qtype == I8_Q5_K) {
            const __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16((short)sub[s][0]),
                                                  _mm256_set1_epi16((short)sub[s][1]), 1);
            const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, sh), _mm512_set1_epi8(1));
            q = _mm512_or_si512(q, _mm512_slli_epi16(hb, 4));
        }
        kb->w[s] = q;
        const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16((short)sub[s][0]),
                                               _mm256_set1_epi16((short)sub[s][1]), 1);
        kb->sc[s] = _mm512_permutexvar_epi16(idx, sc);
    }
}

/* y[t][r] for rows r0..r0+nr and the mt token rows at xq (stride xs bytes), K-quants. */
static inline __attribute__((always_inline)) void tile_k8(int qtype, int nr, int mt, const uint8_t *xq, int64_t xs,
                                                          int64_t nb, const uint8_t *w, int64_t row_bytes, float *y,
                                                          int64_t n, int64_t r0) {
    const int ts = i8_type_size(qtype);
    __m512 acc[NR8][MT8];
    for (int r = 0; r < NR8; r++)
        for (int t = 0; t < MT8; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < nr; r++) {
            struct kblock kb;
            const uint8_t *blk = w + (r0 + r) * row_bytes + b * ts;
            /* rows are contiguous, so this runs on into the next row (a prefetch past the end of the
             * matrix is harmless: prefetches never fault) */
            for (int c = 0; c < ts; c += 64) _mm_prefetch((const char *)(blk + PF_BLOCKS * ts + c), _MM_HINT_T0);
            unpack_k(qtype, blk, &kb);
            for (int t = 0; t < mt; t++) {
                const uint8_t *xb = xq + t * xs + b * XK_BYTES;
                __m512i isum = _mm512_setzero_si512();
                for (int s = 0; s < 4; s++) {
                    const __m512i a = _mm512_loadu_si512((const void *)(xb + 64 * s));
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(kb.w[s], a), kb.sc[s]);
                }
                float dx;
                memcpy(&dx, xb + XK_D, 4);
                const __m512 sums = _mm512_loadu_ps((const float *)(xb + XK_S));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(kb.d * dx), acc[r][t]);
                acc[r][t] = qtype == I8_Q6_K ? _mm512_fmadd_ps(kb.cs, sums, acc[r][t])
                                             : _mm512_fnmadd_ps(kb.cs, sums, acc[r][t]);
            }
        }
    }
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < nr; r++) y[t * n + r0 + r] = hsum(acc[r][t]);
}

/* Two 32-weight blocks as 64 unsigned bytes in the activation layout's order, with their lane
 * scales dw and lane offsets cw (see the header). */
static inline __attribute__((always_inline)) void unpack_32(int qtype, const uint8_t *b0, const uint8_t *b1,
                                                            __m512i *w, __m512 *dw, __m512 *cw) {
    /* the two blocks' leading 4 bytes (d, and Q4_1's m) converted together: [d0, m0, d1, m1] */
    uint32_t h0, h1;
    memcpy(&h0, b0, 4);
    memcpy(&h1, b1, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)h0), (int)h1, 1));
    const __m512 dm4 = _mm512_castps128_ps512(dm);
    if (qtype == I8_Q8_0) {
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(b0 + 2));
        const __m256i q1 = _mm256_loadu_si256((const __m256i *)(b1 + 2));
        *w = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), _mm512_set1_epi8((char)0x80));
        *dw = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), dm4);
        *cw = _mm512_mul_ps(*dw, _mm512_set1_ps(-128.0f));
        return;
    }
    const int off = qtype == I8_Q4_1 ? 4 : 2;
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + off))),
                                              _mm_loadu_si128((const __m128i *)(b1 + off)), 1);
    const __m256i nib = _mm256_set1_epi8(0x0f);
    *w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, nib)),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), 1);
    const __m512i i_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
    *dw = _mm512_permutexvar_ps(i_d, dm4);
    if (qtype == I8_Q4_1) *cw = _mm512_permutexvar_ps(_mm512_add_epi32(i_d, _mm512_set1_epi32(1)), dm4);
    else *cw = _mm512_mul_ps(*dw, _mm512_set1_ps(-8.0f));
}

/* y[t][r] for rows r0..r0+nr and the mt token rows at xq (stride xs bytes), 32-weight formats. */
static inline __attribute__((always_inline)) void tile_32(int qtype, int nr, int mt, const uint8_t *xq, int64_t xs,
                                                          int64_t np, const uint8_t *w, int64_t row_bytes, float *y,
                                                          int64_t n, int64_t r0) {
    const int ts = i8_type_size(qtype);
    __m512 acc[NR8][MT8];
    for (int r = 0; r < NR8; r++)
        for (int t = 0; t < MT8; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        for (int r = 0; r < nr; r++) {
            const uint8_t *b0 = w + (r0 + r) * row_bytes + 2 * p * ts;
            for (int c = 0; c < 2 * ts; c += 64) _mm_prefetch((const char *)(b0 + 2 * PF_BLOCKS * ts + c), _MM_HINT_T0);
            __m512i wv;
            __m512 dw, cw;
            unpack_32(qtype, b0, b0 + ts, &wv, &dw, &cw);
            for (int t = 0; t < mt; t++) {
                const uint8_t *xb = xq + t * xs + p * X32_BYTES;
                const __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                                       _mm512_loadu_si512((const void *)xb));
                const __m512 sx = _mm512_mul_ps(_mm512_cvtepi32_ps(dp), _mm512_loadu_ps((const float *)(xb + 64)));
                acc[r][t] = _mm512_fmadd_ps(sx, dw, acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(cw, _mm512_loadu_ps((const float *)(xb + 128)), acc[r][t]);
            }
        }
    }
    for (int t = 0; t < mt; t++)
        for (int r = 0; r < nr; r++) y[t * n + r0 + r] = hsum(acc[r][t]);
}

/* One (rows, tokens) tile with the sizes as constants where they are full, so the accumulators
 * live in registers; the same instructions per output either way. */
#define I8_TILE(FN, Q)                                                                                   \
    static void FN##_##Q(int nr, int mt, const uint8_t *xq, int64_t xs, int64_t nb, const uint8_t *w,  \
                         int64_t rb, float *y, int64_t n, int64_t r0) {                                 \
        if (nr == NR8 && mt == MT8) FN(Q, NR8, MT8, xq, xs, nb, w, rb, y, n, r0);                      \
        else if (nr == NR8 && mt == 1) FN(Q, NR8, 1, xq, xs, nb, w, rb, y, n, r0);                     \
        else if (nr == NR8 && mt == 2) FN(Q, NR8, 2, xq, xs, nb, w, rb, y, n, r0);                     \
        else if (nr == NR8 && mt == 3) FN(Q, NR8, 3, xq, xs, nb, w, rb, y, n, r0);                     \
        else if (nr == 1 && mt == 1) FN(Q, 1, 1, xq, xs, nb, w, rb, y, n, r0);                         \
        else if (nr == 1 && mt == 2) FN(Q, 1, 2, xq, xs, nb, w, rb, y, n, r0);                         \
        else if (nr == 1 && mt == 3) FN(Q, 1, 3, xq, xs, nb, w, rb, y, n, r0);                         \
        else if (nr == 1 && mt == 4) FN(Q, 1, 4, xq, xs, nb, w, rb, y, n, r0);                         \
        else FN(Q, nr, mt, xq, xs, nb, w, rb, y, n, r0);                                                \
    }
I8_TILE(tile_k8, I8_Q4_K)
I8_TILE(tile_k8, I8_Q5_K)
I8_TILE(tile_k8, I8_Q6_K)
I8_TILE(tile_32, I8_Q4_0)
I8_TILE(tile_32, I8_Q4_1)
I8_TILE(tile_32, I8_Q8_0)

typedef void (*tile_fn)(int, int, const uint8_t *, int64_t, int64_t, const uint8_t *, int64_t, float *, int64_t,
                        int64_t);

static tile_fn pick_tile(int qtype) {
    switch (qtype) {
    case I8_Q4_K: return tile_k8_I8_Q4_K;
    case I8_Q5_K: return tile_k8_I8_Q5_K;
    case I8_Q6_K: return tile_k8_I8_Q6_K;
    case I8_Q4_0: return tile_32_I8_Q4_0;
    case I8_Q4_1: return tile_32_I8_Q4_1;
    default: return tile_32_I8_Q8_0;
    }
}

int pagedllm_gguf_int8_available(void) { return 1; }

/* Returns 0, or -1 for an unsupported type, -2 for a k the layout cannot take (K-quants: whole
 * 256-blocks; 32-weight formats: whole pairs of blocks, k % 64 == 0) or a row size that does not
 * match, -4 when the activation buffer could not be allocated. Shapes as pagedllm_gguf_linear. */
int pagedllm_gguf_linear_int8(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                              int64_t row_bytes, float *y, int nthreads) {
    const int ts = i8_type_size(qtype);
    if (ts == 0) return -1;
    const int kq = is_kquant(qtype);
    const int bw = kq ? 256 : 32;
    if (k <= 0 || k % (kq ? 256 : 64) != 0 || row_bytes != k / bw * ts) return -2;
    if (m <= 0 || n <= 0) return 0;
    nthreads = I8_THREADS(nthreads);
    if (nthreads < 1) nthreads = 1;
    const int64_t xs = kq ? k / 256 * XK_BYTES : k / 64 * X32_BYTES; /* bytes per quantized token row */
    uint8_t *xq = (uint8_t *)aligned_alloc(64, (size_t)((m * xs + 63) / 64 * 64));
    if (!xq) return -4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (m * k >= (1 << 15))
    for (int64_t t = 0; t < m; t++) {
        if (kq) quantize_row_k(qtype, x + t * k, k, xq + t * xs);
        else quantize_row_32(qtype, x + t * k, k, xq + t * xs);
    }
    const int64_t nb = kq ? k / 256 : k / 64;
    /* Work units: a panel of PANEL8 rows x a block of tokens whose activations stay in L2 (~256
     * KiB) while the panel's blocks (re-read from cache per token tile) are shared by all of them. */
    int64_t tb = (256 * 1024) / xs / MT8 * MT8;
    if (tb < MT8) tb = MT8;
    if (tb > m) tb = m;
    /* Few tokens (memory-bound): longer runs of rows per unit, ~UNITS_PER_THREAD per thread, so each
     * thread streams long contiguous stretches of the weight (the prefetchers follow them better) */
    int64_t pr = PANEL8;
    if (m <= SMALL8) {
        const int64_t even = n / ((int64_t)nthreads * UNITS_PER_THREAD) / NR8 * NR8;
        if (even > pr) pr = even;
    }
    const int64_t panels = (n + pr - 1) / pr, tblocks = (m + tb - 1) / tb, units = panels * tblocks;
    const tile_fn fn = pick_tile(qtype);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t u = 0; u < units; u++) {
        const int64_t tbi = u / panels, p = u % panels;
        const int64_t r_end = (p + 1) * pr < n ? (p + 1) * pr : n;
        const int64_t t_end = (tbi + 1) * tb < m ? (tbi + 1) * tb : m;
        const int64_t step = m <= SMALL8 ? 1 : NR8;
        for (int64_t r0 = p * pr; r0 < r_end; r0 += step) {
            const int nr = (int)(r_end - r0 < step ? r_end - r0 : step);
            for (int64_t t0 = tbi * tb; t0 < t_end; t0 += MT8) {
                const int mt = (int)(t_end - t0 < MT8 ? t_end - t0 : MT8);
                fn(nr, mt, xq + t0 * xs, xs, nb, w, row_bytes, y + t0 * n, n, r0);
            }
        }
    }
    free(xq);
    return 0;
}
#else
int pagedllm_gguf_int8_available(void) { return 0; }

int pagedllm_gguf_linear_int8(int qtype, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                              int64_t row_bytes, float *y, int nthreads) {
    (void)qtype, (void)x, (void)m, (void)k, (void)w, (void)n, (void)row_bytes, (void)y, (void)nthreads;
    return -1;
}
#endif
