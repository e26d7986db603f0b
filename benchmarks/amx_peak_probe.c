/* How fast this host's AMX unit multiplies right now: TDPBF16PS on L1-resident tiles (2 A x 2 B tiles
 * into 4 accumulators, as the CPU backend's kernel blocks them), in ns per 16x16x32 tile product.
 * On the Intel Xeon VM these benchmarks ran on it reads ~5.6-7 ns most of the time and ~22-27 ns in
 * stretches (seconds to minutes) with the same code and an idle guest, so AMX-bound timings there
 * move by up to 4x between runs; run it beside a benchmark to know which state the host was in.
 *
 *     cc -O2 -march=native benchmarks/amx_peak_probe.c -o /tmp/amx_peak && /tmp/amx_peak 10
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint16_t a[2][512] __attribute__((aligned(64))), b[2][512] __attribute__((aligned(64)));

int main(int argc, char **argv) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        fprintf(stderr, "the OS grants no AMX tile data here\n");
        return 1;
    }
    tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    const int samples = argc > 1 ? atoi(argv[1]) : 10;
    const long n = 200000;
    for (int s = 0; s < samples; s++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const double t0 = now();
        for (long i = 0; i < n; i++) {
            _tile_loadd(4, a[0], 64);
            _tile_loadd(5, a[1], 64);
            _tile_loadd(6, b[0], 64);
            _tile_loadd(7, b[1], 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        printf("%.2f ns per tile product (%.0f GFLOP/s on one core)\n", (now() - t0) / n / 4 * 1e9,
               16.0 * 16 * 32 * 2 * n * 4 / (now() - t0) / 1e9);
        fflush(stdout);
        usleep(500000);
    }
    _tile_release();
    return 0;
}
