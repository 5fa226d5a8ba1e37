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
 *
 * From 2 rows on, a pass spends several FMAs per weight cache line (2 per row), and the hardware
 * prefetcher alone no longer keeps the stream ahead of them: time grew with the rows (a pass over
 * the embedded model's projections and head at 5 rows cost 1.8x one row, one thread). An explicit
 * prefetch PREFETCH_LINES cache lines (one line: one k step of a block) ahead overlaps the stream
 * with the arithmetic: 5 rows 1.06-1.30x, 8 rows 1.6-1.9x one row against 1.6-2.0x and 2.2-2.6x
 * before (interleaved, one thread, 2-core EPYC under load ~2; 8, 16, 128 and 256 lines ahead were
 * slower; bench/verify_step.py --kernel reports the curve). One row keeps its own two-chain loop
 * (at the bandwidth already).
 */
#include <immintrin.h>
#include <omp.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 16 /* output columns per packed block */
#define MAX_ROWS 6
#define PREFETCH_LINES 64 /* how far ahead a multi-row pass prefetches the weights (see above) */

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
    _mm_prefetch((const char*)(a + PREFETCH_LINES * BLOCK), _MM_HINT_T0); /* past the end: no fault */
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

/* linear_blocked's blocks [b0, b1) on the calling thread. */
static void linear_blocks(const float* x, int64_t ldx, int64_t m, const float* packed, int64_t k,
                          int64_t out, const float* bias, float* y, int64_t ldy, int accumulate,
                          int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; b++) {
    int64_t col = b * BLOCK, width = out - col < BLOCK ? out - col : BLOCK;
    block_all_rows(x, ldx, m, packed + b * k * BLOCK, k, y, ldy, col, width, bias, accumulate);
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
  for (int64_t b = 0; b < blocks; b++) linear_blocks(x, ldx, m, packed, k, out, bias, y, ldy, accumulate, b, b + 1);
}

/* ---------------------------------------------------------------------------------------------
 * The one-call decode paths below run a whole step in ONE OpenMP region: each thread takes its
 * share of every projection's blocks and of the attention's heads, and the threads meet at
 * step_wait between the stages of each layer. An OpenMP region per projection (4 a layer, ~120 a
 * step of the embedded model) left the waiting to libgomp, whose threads spin only while the
 * process has no more OpenMP threads than cores: in the server the engine thread's team comes
 * beside the main thread's (the model is loaded there), libgomp then waits on a futex at once,
 * and every region's end put the worker to sleep and woke it again: 160 voluntary context
 * switches a token on the OpenMP worker and 77 on the engine thread (measured, `loraplex serve`,
 * LORAPLEX_DECODE_THREADS=2), where a benchmark stepping the same runner on its main thread spun
 * (libgomp's 300000 pauses: ~15 ms on this CPU, 50 ns a pause; under load spinning that long
 * while the other thread waits for a core made a 2-thread step 10-30x a 1-thread one). Here a
 * waiting thread spins, then sleeps on a futex until the last one arrives, whatever the process;
 * between steps the threads are libgomp's again. How long it spins adapts (step_spins): when
 * both threads run, the stages' imbalance is microseconds and a spin ends every wait (a sleep
 * and a wake cost more); on a loaded machine the thread waited for is often descheduled, and
 * spinning for it takes the core from it or from the machine's other work (a fixed 1024-pause
 * spin made 2-thread int8 steps 1.4x slower than libgomp's immediate sleep at load ~4; 64 pauses
 * as fast, measured interleaved): each wait that ends asleep halves the spin, each that ends
 * spinning lengthens it by STEP_SPINS_STEP pauses, between STEP_SPINS_MIN and STEP_SPINS_MAX.
 * ------------------------------------------------------------------------------------------- */
#define STEP_SPINS_MIN 64   /* pauses (~3 us at 50 ns a pause, as measured on the CI machine) */
#define STEP_SPINS_MAX 4096 /* ~200 us: above a stage's imbalance at a few thousand tokens of context */
#define STEP_SPINS_STEP 32

static int step_spins = 1024; /* the current spin before sleeping: every step's waits adapt it */

typedef struct {
  int arrived;  /* threads at the barrier in this round */
  int round;    /* rounds completed: the futex word */
  int sleepers; /* threads asleep on round */
} step_barrier;

/* Every thread of the region waits until all have arrived (writes before it are seen after). */
static void step_wait(step_barrier* b, int threads) {
  if (threads <= 1) return;
  int round = __atomic_load_n(&b->round, __ATOMIC_ACQUIRE);
  if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == threads) {
    __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&b->round, round + 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST))
      syscall(SYS_futex, &b->round, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    return;
  }
  int limit = __atomic_load_n(&step_spins, __ATOMIC_RELAXED); /* (races between threads: harmless) */
  for (int spins = 0; spins < limit; spins++) {
    if (__atomic_load_n(&b->round, __ATOMIC_ACQUIRE) != round) {
      if (limit < STEP_SPINS_MAX) __atomic_store_n(&step_spins, limit + STEP_SPINS_STEP, __ATOMIC_RELAXED);
      return;
    }
    _mm_pause();
  }
  if (limit > STEP_SPINS_MIN)
    __atomic_store_n(&step_spins, limit / 2 > STEP_SPINS_MIN ? limit / 2 : STEP_SPINS_MIN, __ATOMIC_RELAXED);
  __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST); /* then round is read again: no lost wake */
  while (__atomic_load_n(&b->round, __ATOMIC_SEQ_CST) == round)
    syscall(SYS_futex, &b->round, FUTEX_WAIT_PRIVATE, round, NULL, NULL, 0);
  __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_RELAXED);
}

/* Thread t of n's share [lo, hi) of count items, in whole units of unit items. */
static void share_of(int64_t count, int64_t unit, int t, int n, int64_t* lo, int64_t* hi) {
  int64_t units = (count + unit - 1) / unit;
  *lo = units * t / n * unit;
  *hi = units * (t + 1) / n * unit;
  if (*hi > count) *hi = count;
  if (*lo > count) *lo = count;
}

/* Thread t of n's share of linear_blocked (its run of blocks). */
static void linear_share(const float* x, int64_t ldx, int64_t m, const float* packed, int64_t k,
                         int64_t out, const float* bias, float* y, int64_t ldy, int accumulate,
                         int t, int n) {
  int64_t lo, hi;
  share_of(out, BLOCK, t, n, &lo, &hi);
  linear_blocks(x, ldx, m, packed, k, out, bias, y, ldy, accumulate, lo / BLOCK, (hi + BLOCK - 1) / BLOCK);
}

/* ---------------------------------------------------------------------------------------------
 * The rest of a Llama-family decode layer at a few rows, for the native model's small-batch path
 * (server/engine/native/fused_cpu.py, which holds each function to its PyTorch form). At batch 1
 * the linear layers above stream the weights; what is left of a layer is ~15 tiny tensor ops
 * (norms, rotary, the KV write, attention over the paged KV blocks, SiLU*mul), each costing more
 * in dispatch than in arithmetic. These run on the calling thread.
 * ------------------------------------------------------------------------------------------- */
#include <math.h>

static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum256(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for m rows of n (row strides ldx, ldy). */
void rms_norm_rows(const float* x, int64_t ldx, int64_t m, int64_t n, const float* w, float eps,
                   float* y, int64_t ldy) {
  for (int64_t r = 0; r < m; r++) {
    const float* xr = x + r * ldx;
    float inv = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
    float* yr = y + r * ldy;
    for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
  }
}

/* act[r][i] = silu(gu[r][i]) * gu[r][inter + i] (gate, then up, in one row of 2 * inter), for
 * the columns i in [i0, i1). */
static void silu_mul_cols(const float* gu, int64_t ldg, int64_t m, int64_t inter, float* act,
                          int64_t lda, int64_t i0, int64_t i1) {
  for (int64_t r = 0; r < m; r++) {
    const float* g = gu + r * ldg;
    const float* u = g + inter;
    float* a = act + r * lda;
    for (int64_t i = i0; i < i1; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  }
}

void silu_mul_rows(const float* gu, int64_t ldg, int64_t m, int64_t inter, float* act, int64_t lda) {
  silu_mul_cols(gu, ldg, m, inter, act, lda, 0, inter);
}

/* Decode and verify tokens, one per row of qkv: qkv[r] = [q (heads x d) | k (kvh x d) | v (kvh x d)].
 * A row is a token: several rows may be tokens of one sequence (a verify step's last sampled token
 * and its drafts), each with its own position, its own slot and its own context length over its
 * sequence's blocks. First every row's q and k are rotated in place (rotate-half convention; cos,
 * sin: [m][d], two equal halves) and its k and v written into the pools ([blocks][block_size][kvh]
 * [d]) at (write_blocks[r], write_offsets[r]); then each query head attends to its KV head's
 * (h / (heads / kvh)) first lengths[r] positions of the row's blocks (table: [m][nb]), so a token
 * sees the tokens of its own step before it (causal: lengths[r] = its position + 1) in any row
 * order. out[r]: [heads x d]. scores: scratch of nb * block_size floats. */
/* Rotates the q heads [q0, q1) and the k heads [g0, g1) of every row, and writes k and v of the
 * KV heads [g0, g1): attend_decode's first half, shared out between threads by heads. */
static void rotate_and_write_heads(int64_t m, float* qkv, int64_t ldq, int64_t heads, int64_t kvh,
                                   int64_t d, const float* cos, const float* sin, float* k_pool,
                                   float* v_pool, int64_t block_size, const int64_t* write_blocks,
                                   const int64_t* write_offsets, int64_t q0, int64_t q1, int64_t g0,
                                   int64_t g1) {
  int64_t half = d / 2, token = kvh * d;
  for (int64_t r = 0; r < m; r++) {
    float* q = qkv + r * ldq;
    const float* c = cos + r * d;
    const float* s = sin + r * d;
    for (int64_t j = 0; j < (q1 - q0) + (g1 - g0); j++) { /* q's heads, then k's: adjacent */
      float* x = q + (j < q1 - q0 ? q0 + j : heads + g0 + j - (q1 - q0)) * d;
      for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
    int64_t slot = (write_blocks[r] * block_size + write_offsets[r]) * token;
    for (int64_t i = g0 * d; i < g1 * d; i++) {
      k_pool[slot + i] = q[heads * d + i];
      v_pool[slot + i] = q[heads * d + token + i];
    }
  }
}

/* The attention of the q heads [h0, h1) of every row, once every row's K and V are written. */
static void attend_heads(int64_t m, const float* qkv, int64_t ldq, int64_t heads, int64_t kvh,
                         int64_t d, const float* k_pool, const float* v_pool, int64_t block_size,
                         const int64_t* table, int64_t nb, const int64_t* lengths, float scale,
                         float* out, int64_t ldo, float* scores, int64_t h0, int64_t h1) {
  int64_t group = heads / kvh, token = kvh * d;
  for (int64_t r = 0; r < m; r++) {
    const float* q = qkv + r * ldq;
    int64_t length = lengths[r];
    const int64_t* blocks = table + r * nb;
    for (int64_t h = h0; h < h1; h++) {
      const float* qh = q + h * d;
      int64_t g = h / group;
      float top = -INFINITY;
      for (int64_t t = 0; t < length; t++) {
        const float* kt = k_pool + (blocks[t / block_size] * block_size + t % block_size) * token + g * d;
        scores[t] = dot(qh, kt, d) * scale;
        if (scores[t] > top) top = scores[t];
      }
      float total = 0.f;
      for (int64_t t = 0; t < length; t++) total += (scores[t] = expf(scores[t] - top));
      float* o = out + r * ldo + h * d;
      for (int64_t i = 0; i < d; i++) o[i] = 0.f;
      for (int64_t t = 0; t < length; t++) {
        const float* vt = v_pool + (blocks[t / block_size] * block_size + t % block_size) * token + g * d;
        float p = scores[t] / total;
        int64_t i = 0;
        __m256 pp = _mm256_set1_ps(p);
        for (; i + 8 <= d; i += 8)
          _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pp, _mm256_loadu_ps(vt + i), _mm256_loadu_ps(o + i)));
        for (; i < d; i++) o[i] += p * vt[i];
      }
    }
  }
}

void attend_decode(int64_t m, float* qkv, int64_t ldq, int64_t heads, int64_t kvh, int64_t d,
                   const float* cos, const float* sin, float* k_pool, float* v_pool,
                   int64_t block_size, const int64_t* write_blocks, const int64_t* write_offsets,
                   const int64_t* table, int64_t nb, const int64_t* lengths, float scale,
                   float* out, int64_t ldo, float* scores) {
  rotate_and_write_heads(m, qkv, ldq, heads, kvh, d, cos, sin, k_pool, v_pool, block_size,
                         write_blocks, write_offsets, 0, heads, 0, kvh);
  attend_heads(m, qkv, ldq, heads, kvh, d, k_pool, v_pool, block_size, table, nb, lengths, scale,
               out, ldo, scores, 0, heads);
}

/* The one-call decode paths' scratch, laid out in work (the size fused_cpu._layers_step gives):
 * h [m][hidden], qkv [m][qkv_width], attn [m][q_size], gu [m][2 inter], act [m][inter], scores. */
static void split_work(float* work, int64_t m, int64_t hidden, int64_t qkv_width, int64_t q_size,
                       int64_t inter, float** h, float** qkv, float** attn, float** gu,
                       float** act, float** scores) {
  *h = work;
  *qkv = *h + m * hidden;
  *attn = *qkv + m * qkv_width;
  *gu = *attn + m * q_size;
  *act = *gu + m * 2 * inter;
  *scores = *act + m * inter;
}

/* Thread t's normed rows and attention scores: the first thread's from split_work, each other
 * thread's after them, [m][hidden] then nb * block_size floats each (fused_cpu._layers_step gives
 * work that room for every thread it asks for). */
static void thread_work(float* h, float* scores, int64_t m, int64_t hidden, int64_t nb,
                        int64_t block_size, int t, float** own_h, float** own_scores) {
  if (t == 0) {
    *own_h = h, *own_scores = scores;
    return;
  }
  *own_h = scores + nb * block_size + (t - 1) * (m * hidden + nb * block_size);
  *own_scores = *own_h + m * hidden;
}

/* The attention stage of a step on thread t of n: its q and KV heads rotated and written, a wait
 * (every token's K and V in the pools before any is read: a verify step's tokens see each other),
 * then its q heads' attention. scores: this thread's scratch. */
static void attend_share(int64_t m, float* qkv, int64_t ldq, int64_t heads, int64_t kvh, int64_t d,
                         const float* cos, const float* sin, float* k_pool, float* v_pool,
                         int64_t block_size, const int64_t* write_blocks,
                         const int64_t* write_offsets, const int64_t* table, int64_t nb,
                         const int64_t* lengths, float scale, float* out, int64_t ldo,
                         float* scores, int t, int n, step_barrier* barrier) {
  int64_t q0, q1, g0, g1;
  share_of(heads, 1, t, n, &q0, &q1);
  share_of(kvh, 1, t, n, &g0, &g1);
  rotate_and_write_heads(m, qkv, ldq, heads, kvh, d, cos, sin, k_pool, v_pool, block_size,
                         write_blocks, write_offsets, q0, q1, g0, g1);
  step_wait(barrier, n);
  attend_heads(m, qkv, ldq, heads, kvh, d, k_pool, v_pool, block_size, table, nb, lengths, scale,
               out, ldo, scores, q0, q1);
}

/* Every layer of a decode (or verify) step of m token rows without adapters, in one call: per layer
 *   h = norm(x); qkv = h @ Wqkv.T (+ b); attend_decode; x += attn @ Wo.T;
 *   h = norm(x); gu = h @ Wgu.T; act = silu(gate) * up; x += act @ Wdown.T
 * layers: [num_layers][9] addresses: input norm, packed qkv, qkv bias (0: none), packed o, post
 * norm, packed gate_up, packed down, k pool, v pool. dims: hidden, heads, kvh, d, inter, block
 * size. x: [m][hidden], the residual stream, updated in place. work: scratch of
 * m * ((heads + 2 kvh) d + heads d + 3 inter) + num_threads * (m * hidden + nb * block_size)
 * floats. On num_threads threads, in one region: the projections, the attention's heads and
 * SiLU*mul shared out, each thread norming the rows into its own h (no wait for it), step_wait
 * between the stages. */
void decode_layers(int64_t num_layers, const int64_t* layers, const int64_t* dims, float eps,
                   float scale, int64_t m, float* x, const float* cos, const float* sin,
                   const int64_t* write_blocks, const int64_t* write_offsets,
                   const int64_t* table, int64_t nb, const int64_t* lengths, float* work,
                   int num_threads) {
  int64_t hidden = dims[0], heads = dims[1], kvh = dims[2], d = dims[3], inter = dims[4];
  int64_t block_size = dims[5], qkv_width = (heads + 2 * kvh) * d, q_size = heads * d;
  float *h, *qkv, *attn, *gu, *act, *scores;
  split_work(work, m, hidden, qkv_width, q_size, inter, &h, &qkv, &attn, &gu, &act, &scores);
  step_barrier barrier = {0, 0, 0};
  if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    float *hn, *own_scores;
    thread_work(h, scores, m, hidden, nb, block_size, t, &hn, &own_scores);
    int64_t i0, i1;
    share_of(inter, BLOCK, t, n, &i0, &i1);
    for (int64_t l = 0; l < num_layers; l++) {
      const int64_t* p = layers + 9 * l;
      rms_norm_rows(x, hidden, m, hidden, (const float*)p[0], eps, hn, hidden);
      linear_share(hn, hidden, m, (const float*)p[1], hidden, qkv_width, (const float*)p[2], qkv,
                   qkv_width, 0, t, n);
      step_wait(&barrier, n);
      attend_share(m, qkv, qkv_width, heads, kvh, d, cos, sin, (float*)p[7], (float*)p[8],
                   block_size, write_blocks, write_offsets, table, nb, lengths, scale, attn, q_size,
                   own_scores, t, n, &barrier);
      step_wait(&barrier, n);
      linear_share(attn, q_size, m, (const float*)p[3], q_size, hidden, 0, x, hidden, 1, t, n);
      step_wait(&barrier, n);
      rms_norm_rows(x, hidden, m, hidden, (const float*)p[4], eps, hn, hidden);
      linear_share(hn, hidden, m, (const float*)p[5], hidden, 2 * inter, 0, gu, 2 * inter, 0, t, n);
      step_wait(&barrier, n);
      silu_mul_cols(gu, 2 * inter, m, inter, act, inter, i0, i1);
      step_wait(&barrier, n);
      linear_share(act, inter, m, (const float*)p[6], inter, hidden, 0, x, hidden, 1, t, n);
      step_wait(&barrier, n);
    }
  }
}

/* ---------------------------------------------------------------------------------------------
 * decode_layers with each projection described by parts, so that quantized weights (int8, 4-bit:
 * server/engine/native/quant_cpu.c's kernels, called through the addresses the Python side reads
 * from that library) run in the same single call as float32 blocked ones. A projection is a run
 * of parts stacked along its output (a GGUF file may mix block types within a fused projection).
 * ------------------------------------------------------------------------------------------- */

/* quant_cpu.c's entries: q8_linear and q4_linear (the same arguments but the 9th: int8's group,
 * 4-bit's offset). Nonzero: a buffer could not be allocated. */
typedef int (*q8_linear_fn)(const float* x, int64_t n, int64_t ldx, int64_t k, const int8_t* q,
                            int64_t kp, const void* scale, const void* min, int64_t group, int half,
                            float* y, int64_t ldy, int64_t out, int accumulate, int threads);
typedef int (*q4_linear_fn)(const float* x, int64_t n, int64_t ldx, int64_t k, const uint8_t* q,
                            int64_t kp, const void* scale, const void* min, int offset, int half,
                            float* y, int64_t ldy, int64_t out, int accumulate, int threads);

enum { PART_BLOCKED = 0, PART_Q8 = 1, PART_Q4 = 2 };
/* One part: [PART_FIELDS] int64: kind, weights (packed float32 [ceil(rows/16)][k][16], or q),
 * kp, scale, min (0: none), group (int8) or offset (4-bit), half (float16 scales), rows, the
 * kernel's address (quantized kinds). */
#define PART_FIELDS 9
/* One layer: [QLAYER_FIELDS] int64: input norm, qkv bias (0: none), post norm, k pool, v pool,
 * then (first part, part count) for qkv, o, gate_up, down. */
#define QLAYER_FIELDS 13

/* Thread t of n's share of project_parts: of every part its run of rows (whole blocks of BLOCK
 * rows), the quantized kernels called on that run alone (on this thread: one thread, their own
 * OpenMP region inactive), the bias added to those columns. */
static int project_share(const int64_t* parts, int64_t first, int64_t count, const float* x,
                         int64_t ldx, int64_t m, int64_t k, const float* bias, float* y,
                         int64_t ldy, int accumulate, int t, int n) {
  int64_t col = 0;
  for (int64_t i = first; i < first + count; i++) {
    const int64_t* p = parts + PART_FIELDS * i;
    int64_t rows = p[7], lo, hi;
    share_of(rows, BLOCK, t, n, &lo, &hi);
    int rc = 0;
    if (lo < hi) {
      int64_t kp = p[2], esize = p[6] ? 2 : 4; /* scale / min: float16 or float32 */
      switch (p[0]) {
        case PART_BLOCKED:
          linear_blocks(x, ldx, m, (const float*)p[1], k, rows, 0, y + col, ldy, accumulate,
                        lo / BLOCK, (hi + BLOCK - 1) / BLOCK);
          break;
        case PART_Q8: {
          int64_t groups = kp / p[5];
          rc = ((q8_linear_fn)p[8])(x, m, ldx, k, (const int8_t*)p[1] + lo * kp, kp,
                                    (const char*)p[3] + lo * groups * esize,
                                    p[4] ? (const char*)p[4] + lo * groups * esize : 0, p[5],
                                    (int)p[6], y + col + lo, ldy, hi - lo, accumulate, 1);
          break;
        }
        case PART_Q4: {
          int64_t groups = kp / 32;
          rc = ((q4_linear_fn)p[8])(x, m, ldx, k, (const uint8_t*)p[1] + lo * (kp / 2), kp,
                                    (const char*)p[3] + lo * groups * esize,
                                    p[4] ? (const char*)p[4] + lo * groups * esize : 0, (int)p[5],
                                    (int)p[6], y + col + lo, ldy, hi - lo, accumulate, 1);
          break;
        }
        default:
          rc = 2;
      }
      if (bias)
        for (int64_t r = 0; r < m; r++)
          for (int64_t c = col + lo; c < col + hi; c++) y[r * ldy + c] += bias[c];
    }
    if (rc) return rc;
    col += rows;
  }
  return 0;
}

/* decode_layers (same arithmetic, same work layout) with projections as parts: layers:
 * [num_layers][QLAYER_FIELDS], parts: [*][PART_FIELDS]. Returns 0, or a quantized kernel's
 * nonzero code (x is then partly updated). Threads as decode_layers'. */
int decode_layers_parts(int64_t num_layers, const int64_t* layers, const int64_t* parts,
                        const int64_t* dims, float eps, float scale, int64_t m, float* x,
                        const float* cos, const float* sin, const int64_t* write_blocks,
                        const int64_t* write_offsets, const int64_t* table, int64_t nb,
                        const int64_t* lengths, float* work, int num_threads) {
  int64_t hidden = dims[0], heads = dims[1], kvh = dims[2], d = dims[3], inter = dims[4];
  int64_t block_size = dims[5], qkv_width = (heads + 2 * kvh) * d, q_size = heads * d;
  float *h, *qkv, *attn, *gu, *act, *scores;
  split_work(work, m, hidden, qkv_width, q_size, inter, &h, &qkv, &attn, &gu, &act, &scores);
  step_barrier barrier = {0, 0, 0};
  int rc = 0; /* a kernel's failure: every thread stops after the same stage */
  if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads(), code;
    float *hn, *own_scores;
    thread_work(h, scores, m, hidden, nb, block_size, t, &hn, &own_scores);
    int64_t i0, i1;
    share_of(inter, BLOCK, t, n, &i0, &i1);
#define STAGE_END(code_of)                                                    \
  if ((code = (code_of)) != 0) __atomic_store_n(&rc, code, __ATOMIC_RELAXED); \
  step_wait(&barrier, n);                                                     \
  if (__atomic_load_n(&rc, __ATOMIC_RELAXED)) break;
    for (int64_t l = 0; l < num_layers; l++) {
      const int64_t* p = layers + QLAYER_FIELDS * l;
      rms_norm_rows(x, hidden, m, hidden, (const float*)p[0], eps, hn, hidden);
      STAGE_END(project_share(parts, p[5], p[6], hn, hidden, m, hidden, (const float*)p[1], qkv,
                              qkv_width, 0, t, n));
      attend_share(m, qkv, qkv_width, heads, kvh, d, cos, sin, (float*)p[3], (float*)p[4],
                   block_size, write_blocks, write_offsets, table, nb, lengths, scale, attn, q_size,
                   own_scores, t, n, &barrier);
      step_wait(&barrier, n);
      STAGE_END(project_share(parts, p[7], p[8], attn, q_size, m, q_size, 0, x, hidden, 1, t, n));
      rms_norm_rows(x, hidden, m, hidden, (const float*)p[2], eps, hn, hidden);
      STAGE_END(project_share(parts, p[9], p[10], hn, hidden, m, hidden, 0, gu, 2 * inter, 0, t, n));
      silu_mul_cols(gu, 2 * inter, m, inter, act, inter, i0, i1);
      step_wait(&barrier, n);
      STAGE_END(project_share(parts, p[11], p[12], act, inter, m, inter, 0, x, hidden, 1, t, n));
    }
#undef STAGE_END
  }
  return rc;
}
