/* Measurement probe, not used by pagedllm: llama.cpp's decode arithmetic for Q4_0 weights, to
 * compare with gguf_linear.c's fp32 path (benchmarks/bench_gguf_kernels.py --int8-probe builds it).
 *
 * Each activation row is quantized per 32-block to int8 (d = max|x| / 127, q = round(x / d)), and
 * each pair of weight blocks (64 nibbles, unsigned 0..15) is multiplied with AVX-512 VNNI's
 * vpdpbusd (64 u8 x s8 products into 16 int32 lanes per instruction); the -8 offset of Q4_0 is
 * removed with the precomputed 8 * sum(x_q) of the same lanes, and each block's integer sum is
 * scaled by d_w * d_x in fp32. Needs AVX-512 VNNI and an even number of blocks per row.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* y [m][n] = x [m][k] W^T, W Q4_0 [n][k / 32 * 18]; returns 0, or -1 (odd block count / no memory). */
int probe_q4_0_int8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, float *y, int nthreads) {
    const int64_t nb = k / 32, pairs = nb / 2, row_bytes = nb * 18;
    if (k % 64 != 0) return -1;
    int8_t *xq = aligned_alloc(64, (size_t)(m * k));
    float *dx = malloc((size_t)(m * nb) * sizeof(float));
    __m512i *off = aligned_alloc(64, (size_t)(m * pairs) * sizeof(__m512i));
    if (!xq || !dx || !off) {
        free(xq);
        free(dx);
        free(off);
        return -1;
    }
    for (int64_t t = 0; t < m; t++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + t * k + b * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            dx[t * nb + b] = d;
            for (int j = 0; j < 32; j++) xq[t * k + b * 32 + j] = (int8_t)nearbyintf(xb[j] * id);
        }
    const __m512i eights = _mm512_set1_epi8(8);
    for (int64_t t = 0; t < m; t++)
        for (int64_t p = 0; p < pairs; p++)
            off[t * pairs + p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eights,
                                                     _mm512_loadu_si512((const void *)(xq + t * k + p * 64)));
    const __m512i nib = _mm512_set1_epi8(0x0f);
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *wr = w + r * row_bytes;
        for (int64_t t = 0; t < m; t++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t p = 0; p < pairs; p++) {
                const uint8_t *a = wr + (2 * p) * 18, *b = a + 18;
                __m256i qa = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + 2)));
                qa = _mm256_inserti128_si256(qa, _mm_loadu_si128((const __m128i *)(b + 2)), 1);
                /* lanes: [a low nibbles | a high | b low | b high] = elements in x's order */
                __m512i q = _mm512_castsi256_si512(qa);
                __m512i lo = _mm512_and_si512(q, nib), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
                __m512i wv = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
                __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                                 _mm512_loadu_si512((const void *)(xq + t * k + p * 64)));
                dp = _mm512_sub_epi32(dp, off[t * pairs + p]);
                const float sa = f16(a) * dx[t * nb + 2 * p], sb = f16(b) * dx[t * nb + 2 * p + 1];
                const __m512 scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(sa), _mm512_set1_ps(sb));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc);
            }
            y[t * n + r] = _mm512_reduce_add_ps(acc);
        }
    }
    free(xq);
    free(dx);
    free(off);
    return 0;
}
