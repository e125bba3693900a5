/* Two weight layouts of one product, alternating in one process: bench/layout_ab.py builds this with
 * kernels/qkernels.c and the C kernels' own flags.  No Python in the timing.
 *
 *   layout_ab FMT_A FMT_B ROWS COLS THREADS RING_BYTES SAMPLES
 *
 * FMT_* are qkernels.c's format codes.  Each sample times enough calls for ~20 ms, walking a ring of
 * copies whose total is at least RING_BYTES (0: one copy, hot).  Prints one JSON object: bytes/s of
 * each side (medians) and the median of the per-sample time ratios B/A. */
#include "qkernels.c"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Random bytes with ordinary f16 scales where the layout keeps them (NaN or infinite scales could
 * change the speed of the float side). */
static void fill(int fmt, uint8_t *w, int64_t rows, int64_t rb) {
    for (int64_t i = 0; i < rows * rb; i++) w[i] = (uint8_t)rand();
    const uint16_t h = 0x1400;
    const int base = is_x8(fmt) ? x8_base(fmt) : fmt;
    const int64_t bs = base == Q4_0 ? 18 : base == Q8_0 ? 34 : 144;
    const int fields = base == Q4_K ? 2 : 1;   /* f16 fields at a block's start: d (and dmin) */
    if (!is_x8(fmt)) {
        for (int64_t o = 0; o < rows * rb; o += bs)
            for (int f = 0; f < fields; f++) memcpy(w + o + 2 * f, &h, 2);
    } else {
        for (int64_t o = 0; o < rows * rb; o += 8 * bs)   /* a run's block: 8 rows' fields first */
            for (int f = 0; f < 8 * fields; f++) memcpy(w + o + 2 * f, &h, 2);
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s FMT_A FMT_B ROWS COLS THREADS RING_BYTES SAMPLES\n", argv[0]);
        return 2;
    }
    const int fmt[2] = {atoi(argv[1]), atoi(argv[2])};
    const int64_t rows = atoll(argv[3]), cols = atoll(argv[4]), ring = atoll(argv[6]);
    const int threads = atoi(argv[5]), samples = atoi(argv[7]);
    const int64_t rb = fmt_row_bytes(fmt[0], cols);
    if (rb < 0 || rb != fmt_row_bytes(fmt[1], cols) || rows % 8 || samples < 1) {
        fprintf(stderr, "formats, shape or samples do not fit\n");
        return 2;
    }
    const int64_t size = rows * rb;
    const int copies = ring > size ? (int)((ring + size - 1) / size) : 1;
    uint8_t **w[2];
    srand(1);
    for (int s = 0; s < 2; s++) {
        w[s] = malloc(sizeof(uint8_t *) * copies);
        for (int c = 0; c < copies; c++) {
            w[s][c] = aligned_alloc(64, (size_t)((size + 63) / 64 * 64));
            fill(fmt[s], w[s][c], rows, rb);
        }
    }
    float *x = malloc(sizeof(float) * cols), *y = malloc(sizeof(float) * rows);
    for (int64_t i = 0; i < cols; i++) x[i] = (float)(rand() % 2000) / 1000.0f - 1.0f;
    int64_t k[2] = {0, 0}, per[2];
    for (int s = 0; s < 2; s++) { /* warm up, and size a sample to ~20 ms */
        for (int c = 0; c < copies; c++) mk_matmul(fmt[s], w[s][c], rb, rows, cols, x, 1, y, threads);
        const double t = now();
        mk_matmul(fmt[s], w[s][0], rb, rows, cols, x, 1, y, threads);
        per[s] = (int64_t)(0.02 / (now() - t + 1e-9)) + 1;
    }
    double *ts[2] = {malloc(sizeof(double) * samples), malloc(sizeof(double) * samples)};
    double *ratio = malloc(sizeof(double) * samples);
    for (int i = 0; i < samples; i++) {
        for (int s = 0; s < 2; s++) {
            const double t = now();
            for (int64_t j = 0; j < per[s]; j++, k[s]++)
                mk_matmul(fmt[s], w[s][k[s] % copies], rb, rows, cols, x, 1, y, threads);
            ts[s][i] = (now() - t) / (double)per[s];
        }
        ratio[i] = ts[1][i] / ts[0][i];
    }
    qsort(ts[0], samples, sizeof(double), cmp);
    qsort(ts[1], samples, sizeof(double), cmp);
    qsort(ratio, samples, sizeof(double), cmp);
    printf("{\"copies\": %d, \"a_bytes_per_s\": %.6g, \"b_bytes_per_s\": %.6g, \"b_over_a_time\": %.4f}\n", copies,
           size / ts[0][samples / 2], size / ts[1][samples / 2], ratio[samples / 2]);
    return 0;
}
