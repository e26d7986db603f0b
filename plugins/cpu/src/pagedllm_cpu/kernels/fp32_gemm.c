/* y = x W^T (+ bias) in fp32, with W re-laid out once, at load, into column panels.
 *
 * Why: a batched decode step multiplies 16-64 token rows by every weight matrix. MKL's sgemm
 * reaches ~100-135 GFLOP/s on these shapes here (K = 576..1536) because it re-packs W on every
 * call; with W already in the order the inner loop reads it, the same arithmetic runs at the
 * FMA units' speed. The packing costs one copy of the weights, made once.
 *
 * Layout: W [n][k] (row-major, one row per output feature) becomes ceil(n / NR) panels, each
 * [k][NR] floats: for every k, the NR outputs of the panel side by side (zero-padded past n).
 * Microkernel: MR token rows x NR outputs held in 24 AVX-512 registers; for each k, three
 * vector loads of the panel, one broadcast per row, 3 * MR fused multiply-adds. Without AVX-512,
 * AVX2 + FMA: 6 rows x 16 outputs in 12 registers (panels 16 wide). Elsewhere a portable loop.
 *
 * Numerics: every output is one fp32 accumulator summed over k in order (k = 0, 1, ...) with
 * fused multiply-adds, then the bias added. The result for a row does not depend on the other
 * rows or on how many there are (batch-invariant), nor on the number of threads.
 *
 * Prefetch: while a panel is multiplied, each row tile pulls a slice of the next panel into L2
 * (one cache line every other k), so the first tile of a panel does not wait on L3 / memory.
 *
 * Threads: work is (block of MC rows) x (panel); OpenMP splits it statically.
 *
 * Measured (2-core Xeon, 2 threads, GFLOP/s, this kernel vs torch's F.linear on MKL), SmolLM2 shapes:
 * m = 16: 118-178 vs 44-88; m = 64: 134-187 vs 76-147; m = 2048: 149-169 vs 164-190.
 * AVX2 (2-core EPYC Zen 1): m = 16-64: 62-69 vs 15-57 (a 2048^3 sgemm reaches 67 there).
 */
#include <stdint.h>
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

/* k is walked in equal blocks of at most KC, so a block of the panel (KC x NR floats, at most
 * 144 KiB) and of MC rows of x stay in L2 while the row tiles pass over them. The tile is MR rows
 * x NR outputs: 8 x 48 in 24 of AVX-512's 32 registers, 6 x 16 in 12 of AVX2's 16. */
#if defined(__AVX512F__) || !(defined(__AVX2__) && defined(__FMA__))
enum { NR = 48, MR = 8 };
#else
enum { NR = 16, MR = 6 };
#endif
enum { MC = 256, KC = 768 };

int pagedllm_gemm_panel_width(void) { return NR; }

/* Which vector code this build of the kernels runs (all three files choose the same way). */
const char *pagedllm_kernel_isa(void) {
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "AVX2";
#else
    return "portable";
#endif
}

/* w [n][k] with row stride ldw -> panels [ceil(n / NR)][k][NR], zero-padded. */
int pagedllm_gemm_pack(const float *w, int64_t n, int64_t k, int64_t ldw, float *out, int nthreads) {
    if (n <= 0 || k <= 0 || ldw < k) return 1;
    int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for schedule(dynamic, 4) num_threads(KERNEL_THREADS(nthreads))
    for (int64_t p = 0; p < panels; p++) {
        float *dst = out + p * k * NR;
        for (int j = 0; j < NR; j++) {
            int64_t row = p * NR + j;
            if (row < n) {
                const float *src = w + row * ldw;
                for (int64_t kk = 0; kk < k; kk++) dst[kk * NR + j] = src[kk];
            } else {
                for (int64_t kk = 0; kk < k; kk++) dst[kk * NR + j] = 0.0f;
            }
        }
    }
    return 0;
}

#if defined(__AVX512F__)

static inline __mmask16 cols_mask(int valid, int v) {
    int c = valid - 16 * v;
    if (c >= 16) return (__mmask16)0xffff;
    if (c <= 0) return 0;
    return (__mmask16)((1u << c) - 1u);
}

/* mr rows (a constant after inlining) x one panel, over all of k. */
static inline __attribute__((always_inline)) void micro(int mr, int64_t k, const float *x, int64_t ldx,
                                                        const float *b, const float *bias, int valid, float *y,
                                                        int64_t ldy, int first, int last, const char *pf) {
    __m512 acc[MR][3];
    __mmask16 m0 = cols_mask(valid, 0), m1 = cols_mask(valid, 1), m2 = cols_mask(valid, 2);
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) {
        if (first) {
            acc[r][0] = _mm512_setzero_ps();
            acc[r][1] = _mm512_setzero_ps();
            acc[r][2] = _mm512_setzero_ps();
        } else { /* continue the sums of the previous k block, stored exactly in y */
            acc[r][0] = _mm512_maskz_loadu_ps(m0, y + r * ldy);
            acc[r][1] = _mm512_maskz_loadu_ps(m1, y + r * ldy + 16);
            acc[r][2] = _mm512_maskz_loadu_ps(m2, y + r * ldy + 32);
        }
    }
    int64_t kk = 0;
    for (; kk + 2 <= k; kk += 2) { /* two k per iteration; one prefetched line per iteration */
        if (pf) _mm_prefetch(pf + (kk >> 1) * 64, _MM_HINT_T1);
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) {
            const float *bk = b + (kk + u) * NR;
            __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16), b2 = _mm512_loadu_ps(bk + 32);
#pragma GCC unroll 8
            for (int r = 0; r < mr; r++) {
                __m512 a = _mm512_set1_ps(x[r * ldx + kk + u]);
                acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
            }
        }
    }
    for (; kk < k; kk++) {
        const float *bk = b + kk * NR;
        __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16), b2 = _mm512_loadu_ps(bk + 32);
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) {
            __m512 a = _mm512_set1_ps(x[r * ldx + kk]);
            acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
        }
    }
    if (bias && last) {
        __m512 c0 = _mm512_maskz_loadu_ps(m0, bias), c1 = _mm512_maskz_loadu_ps(m1, bias + 16),
               c2 = _mm512_maskz_loadu_ps(m2, bias + 32);
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) {
            acc[r][0] = _mm512_add_ps(acc[r][0], c0);
            acc[r][1] = _mm512_add_ps(acc[r][1], c1);
            acc[r][2] = _mm512_add_ps(acc[r][2], c2);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) {
        _mm512_mask_storeu_ps(y + r * ldy, m0, acc[r][0]);
        _mm512_mask_storeu_ps(y + r * ldy + 16, m1, acc[r][1]);
        _mm512_mask_storeu_ps(y + r * ldy + 32, m2, acc[r][2]);
    }
}

static void tile(int mr, int64_t k, const float *x, int64_t ldx, const float *b, const float *bias, int valid,
                 float *y, int64_t ldy, int first, int last, const char *pf) {
    switch (mr) {
    case 8: micro(8, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 7: micro(7, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 6: micro(6, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 5: micro(5, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 4: micro(4, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 3: micro(3, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 2: micro(2, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    default: micro(1, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    }
}

#elif defined(__AVX2__) && defined(__FMA__)

/* Lanes [0, valid - 8 v) of the v-th 8-float vector of a panel row, as an AVX2 lane mask. */
static inline __m256i cols_mask8(int valid, int v) {
    int c = valid - 8 * v;
    c = c < 0 ? 0 : (c > 8 ? 8 : c);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* mr rows (a constant after inlining) x one 16-wide panel, over all of k: the AVX-512 kernel's
 * arithmetic (one fp32 accumulator per output, k in order, fused multiply-adds) in 8-lane vectors. */
static inline __attribute__((always_inline)) void micro(int mr, int64_t k, const float *x, int64_t ldx,
                                                        const float *b, const float *bias, int valid, float *y,
                                                        int64_t ldy, int first, int last, const char *pf) {
    __m256 acc[MR][2];
    const __m256i m0 = cols_mask8(valid, 0), m1 = cols_mask8(valid, 1);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        if (first) {
            acc[r][0] = _mm256_setzero_ps();
            acc[r][1] = _mm256_setzero_ps();
        } else { /* continue the sums of the previous k block, stored exactly in y */
            acc[r][0] = _mm256_maskload_ps(y + r * ldy, m0);
            acc[r][1] = _mm256_maskload_ps(y + r * ldy + 8, m1);
        }
    }
    int64_t kk = 0;
    for (; kk + 2 <= k; kk += 2) { /* two k per iteration; one prefetched line per iteration */
        if (pf) _mm_prefetch(pf + (kk >> 1) * 64, _MM_HINT_T1);
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) {
            const float *bk = b + (kk + u) * NR;
            __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
            for (int r = 0; r < mr; r++) {
                __m256 a = _mm256_broadcast_ss(x + r * ldx + kk + u);
                acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
        }
    }
    for (; kk < k; kk++) {
        const float *bk = b + kk * NR;
        __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    if (bias && last) {
        __m256 c0 = _mm256_maskload_ps(bias, m0), c1 = _mm256_maskload_ps(bias + 8, m1);
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            acc[r][0] = _mm256_add_ps(acc[r][0], c0);
            acc[r][1] = _mm256_add_ps(acc[r][1], c1);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        _mm256_maskstore_ps(y + r * ldy, m0, acc[r][0]);
        _mm256_maskstore_ps(y + r * ldy + 8, m1, acc[r][1]);
    }
}

static void tile(int mr, int64_t k, const float *x, int64_t ldx, const float *b, const float *bias, int valid,
                 float *y, int64_t ldy, int first, int last, const char *pf) {
    switch (mr) {
    case 6: micro(6, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 5: micro(5, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 4: micro(4, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 3: micro(3, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    case 2: micro(2, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    default: micro(1, k, x, ldx, b, bias, valid, y, ldy, first, last, pf); break;
    }
}

#else /* portable: the same panels and the same per-output summation order, without intrinsics */

#include <math.h>

static void tile(int mr, int64_t k, const float *x, int64_t ldx, const float *b, const float *bias, int valid,
                 float *y, int64_t ldy, int first, int last, const char *pf) {
    (void)pf;
    for (int r = 0; r < mr; r++) {
        float acc[NR];
        for (int j = 0; j < NR; j++) acc[j] = (first || j >= valid) ? 0.0f : y[r * ldy + j];
        for (int64_t kk = 0; kk < k; kk++) {
            float a = x[r * ldx + kk];
            const float *bk = b + kk * NR;
            for (int j = 0; j < NR; j++) acc[j] = fmaf(a, bk[j], acc[j]);
        }
        for (int j = 0; j < valid; j++) y[r * ldy + j] = (bias && last) ? acc[j] + bias[j] : acc[j];
    }
}

#endif

/* x [m][k] (row stride ldx) times the panels of W [n][k] -> y [m][n] (row stride ldy). */
int pagedllm_gemm(const float *x, int64_t m, int64_t k, int64_t ldx, const float *panels, int64_t n,
                  const float *bias, float *y, int64_t ldy, int nthreads) {
    if (m < 0 || k <= 0 || n <= 0 || ldx < k || ldy < n) return 1;
    if (m == 0) return 0;
    int64_t np = (n + NR - 1) / NR;
    int64_t blocks = (m + MC - 1) / MC;
    /* Runs of consecutive panels (each prefetches the next), about eight per thread, handed out as
     * threads come free: a thread that another process's work has descheduled delays one run, not
     * a static half of the matmul. */
    const int threads = KERNEL_THREADS(nthreads);
    const int64_t chunk = blocks * np / (8 * (int64_t)threads) > 1 ? blocks * np / (8 * (int64_t)threads) : 1;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
    for (int64_t u = 0; u < blocks * np; u++) {
        int64_t mb = u / np, p = u % np;
        int64_t end = (mb + 1) * MC < m ? (mb + 1) * MC : m;
        int valid = (int)(n - p * NR < NR ? n - p * NR : NR);
        const float *b = panels + p * k * NR;
        const float *bp = bias ? bias + p * NR : 0;
        int64_t kblock = (k + (k + KC - 1) / KC - 1) / ((k + KC - 1) / KC); /* equal blocks <= KC */
        for (int64_t k0 = 0; k0 < k; k0 += kblock) {
            int64_t kc = k - k0 < kblock ? k - k0 : kblock;
            for (int64_t i = mb * MC; i < end; i += MR) {
                int mr = (int)(end - i < MR ? end - i : MR);
                /* while this panel is multiplied, the tiles pull the next one into L2, a slice each */
                int64_t t = (i - mb * MC) / MR;
                const char *next = (const char *)(b + k * NR + k0 * NR); /* the next panel's k block */
                const char *pf = p + 1 < np ? next + t * (kc / 2) * 64 : 0;
                if (pf && pf + (kc / 2) * 64 > next + kc * NR * sizeof(float)) pf = 0;
                tile(mr, kc, x + i * ldx + k0, ldx, b + k0 * NR, bp, valid, y + i * ldy + p * NR, ldy, k0 == 0,
                     k0 + kc == k, pf);
            }
        }
    }
    return 0;
}
