/* Float32 linear layers for decode-sized batches on an x86-64 CPU with AVX2 and FMA, threaded
 * with OpenMP: y = x @ W.T (+ b), or y += x @ W.T. Built and loaded by gemv_cpu.py, which holds it
 * to F.linear.
 *
 * At batch 1 a decode step is a matrix-vector product per projection: every weight byte is read
 * once and used once, so the step costs the weights' bytes over the memory bandwidth, if the
 * weights stream at that bandwidth. PyTorch's dense x @ W.T reached about a third of it here at
 * batch 1. This kernel reads W packed in blocks of 16 output columns, [ceil(out/16)][in][16]
 * (the packing of sgmv_cpu.c's factors): each block is one contiguous stretch, each thread takes a
 * contiguous run of blocks, so every thread streams one sequential region, what the hardware
 * prefetcher reads fastest. Rows of x are taken up to 6 at a time (6 rows x 2 vectors = 12
 * accumulators in registers); the same block is then re-read from the L2 cache for the next rows,
 * so W leaves memory once per call whatever the batch.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define BLOCK 16 /* output columns per packed block */
#define MAX_ROWS 6

/* acc[r][0:BLOCK] = sum_kk x_r[kk] * w[kk][0:BLOCK] for mr (<= MAX_ROWS, a constant after
 * inlining) rows of x; w: one packed block [k][BLOCK]. */
static inline __attribute__((always_inline)) void block_rows(int mr, const float* x, int64_t ldx,
                                                             const float* w, int64_t k,
                                                             float acc[MAX_ROWS][BLOCK]) {
  __m256 c0[MAX_ROWS], c1[MAX_ROWS];
  for (int r = 0; r < mr; r++) c0[r] = c1[r] = _mm256_setzero_ps();
  int64_t kk = 0;
  if (mr == 1) { /* two independent chains per vector: FMA latency is not the bound either */
    __m256 d0 = _mm256_setzero_ps(), d1 = d0;
    for (; kk + 1 < k; kk += 2) {
      const float* a = w + kk * BLOCK;
      __m256 x0 = _mm256_broadcast_ss(x + kk), x1 = _mm256_broadcast_ss(x + kk + 1);
      c0[0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(a), c0[0]);
      c1[0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(a + 8), c1[0]);
      d0 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(a + BLOCK), d0);
      d1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(a + BLOCK + 8), d1);
    }
    c0[0] = _mm256_add_ps(c0[0], d0), c1[0] = _mm256_add_ps(c1[0], d1);
  }
  for (; kk < k; kk++) {
    const float* a = w + kk * BLOCK;
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    for (int r = 0; r < mr; r++) {
      __m256 xr = _mm256_broadcast_ss(x + r * ldx + kk);
      c0[r] = _mm256_fmadd_ps(xr, a0, c0[r]);
      c1[r] = _mm256_fmadd_ps(xr, a1, c1[r]);
    }
  }
  for (int r = 0; r < mr; r++) {
    _mm256_storeu_ps(acc[r], c0[r]);
    _mm256_storeu_ps(acc[r] + 8, c1[r]);
  }
}

/* y[r][b*BLOCK + c] (=|+=) acc[r][c] (+ bias) for the block's w valid columns. */
static void store_rows(int mr, float acc[MAX_ROWS][BLOCK], float* y, int64_t ldy, int64_t col,
                       int64_t w, const float* bias, int accumulate) {
  for (int r = 0; r < mr; r++) {
    float* out = y + r * ldy + col;
    for (int64_t c = 0; c < w; c++) {
      float v = acc[r][c] + (bias ? bias[col + c] : 0.f);
      out[c] = accumulate ? out[c] + v : v;
    }
  }
}

static void block_all_rows(const float* x, int64_t ldx, int64_t m, const float* w, int64_t k,
                           float* y, int64_t ldy, int64_t col, int64_t width, const float* bias,
                           int accumulate) {
  float acc[MAX_ROWS][BLOCK];
  for (int64_t r = 0; r < m; r += MAX_ROWS) {
    int mr = m - r < MAX_ROWS ? (int)(m - r) : MAX_ROWS;
    const float* xr = x + r * ldx;
    switch (mr) { /* constant row counts: the row loops unroll, the accumulators stay in registers */
      case 1: block_rows(1, xr, ldx, w, k, acc); break;
      case 2: block_rows(2, xr, ldx, w, k, acc); break;
      case 3: block_rows(3, xr, ldx, w, k, acc); break;
      case 4: block_rows(4, xr, ldx, w, k, acc); break;
      case 5: block_rows(5, xr, ldx, w, k, acc); break;
      default: block_rows(6, xr, ldx, w, k, acc); break;
    }
    store_rows(mr, acc, y + r * ldy, ldy, col, width, bias, accumulate);
  }
}

/* x: [m, k] (row stride ldx); packed: [ceil(out / BLOCK), k, BLOCK], zero-padded columns;
 * bias: [out] or NULL; y: [m, >= out] (row stride ldy), set (accumulate 0) or added to (1). */
void linear_blocked(const float* x, int64_t ldx, int64_t m, const float* packed, int64_t k,
                    int64_t out, const float* bias, float* y, int64_t ldy, int accumulate,
                    int num_threads) {
  int64_t blocks = (out + BLOCK - 1) / BLOCK;
  if (num_threads < 1) num_threads = 1;
  if (blocks < 2 * num_threads) num_threads = 1; /* too little work to split */
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t col = b * BLOCK, width = out - col < BLOCK ? out - col : BLOCK;
    block_all_rows(x, ldx, m, packed + b * k * BLOCK, k, y, ldy, col, width, bias, accumulate);
  }
}
