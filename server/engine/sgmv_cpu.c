/* The grouped LoRA kernel (Punica SGMV semantics) for float32 rows on an x86-64 CPU with AVX2 and
 * FMA, threaded with OpenMP. Built and loaded by sgmv_cpu.py; the PyTorch form of the same kernel
 * is the grouped backend (lora/grouped.py), and the tests hold the two to the dense W + s*B*A.
 *
 * For each group g (the rows of one adapter slot s) and each of its rows i, for one fused projection:
 *     h_i = x_i @ A_s                                  A_s: [k, R_s], every part's A along R_s
 *     y_i[cols of part p] += w_i * h_i[ranks of p] @ B_ps     B_ps: [r_ps, d_p], already scaled
 *
 * Why not PyTorch ops: at decode sizes the factors are tiny matrices (16 x 576), and each matmul,
 * slice, cat and add is a separate dispatch with its own fixed cost. Here one call does a whole
 * projection: rows are taken four at a time so every factor byte read from memory is used by four
 * rows, partial tiles are filled with a zero row (whose output goes to a scratch row), and the
 * work is split over the threads in two phases (all h first, then all of y).
 *
 * The factors come packed in blocks of 16 columns, one layout per slot (sgmv_cpu.py packs a slot's
 * once, when its contents change; a batch names each group's slot, so a new batch composition
 * copies no factor): A_s as [R_s/16][k][16] and B_ps as [d_p/16][r_ps][16], zero-padded, each
 * slot at its own rank. Every work item then streams one contiguous stretch of memory, which is
 * what the hardware prefetcher reads fastest once the step's other weights have pushed the
 * factors out of the caches.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE 4     /* rows per tile: 4 rows x 2 vectors = 8 accumulators in registers */
#define BLOCK 16   /* columns per packed block of A and of B */
#define UP_BLOCKS 4 /* packed blocks of B per work item in phase 2 */

/* The batch's rows grouped by adapter: group g is rows[group_start[g] .. group_start[g+1]), of
 * slot group_slot[g]. */
typedef struct {
  int64_t num_groups;
  const int64_t* group_start; /* [num_groups + 1] */
  const int64_t* rows;        /* row index of x and y */
  const float* row_weight;    /* [len(rows)] factor on each row's update, or NULL for all 1 */
  const int64_t* group_slot;  /* [num_groups] index into lora_factors.slots */
} lora_groups;

/* One slot's factors for one projection, laid out once when the slot is filled (sgmv_cpu.py). */
typedef struct {
  int64_t R;                  /* the slot's rank over every part, padded to a multiple of BLOCK; 0: none */
  const float* A;             /* [R / BLOCK, k, BLOCK] */
  const int64_t* part_rank;   /* [num_parts] first column of h the part reads */
  const int64_t* part_r;      /* [num_parts] r_p; 0: the slot does not adapt part p */
  const float* const* part_B; /* [num_parts] -> [ceil(d_p / BLOCK), r_p, BLOCK], scaled */
} lora_slot;

/* One projection: its parts' columns and every slot's factors. */
typedef struct {
  int64_t k, num_parts, num_slots;
  const int64_t* part_col;    /* [num_parts] first output column of each part */
  const int64_t* part_width;  /* [num_parts] d_p */
  const lora_slot* slots;     /* [num_slots] */
} lora_factors;

typedef struct {
  int64_t group, first, count; /* rows[first .. first + count) of one group, count <= TILE */
  const lora_slot* slot;
  int64_t h;                   /* its h: TILE rows of slot->R floats from here */
} row_tile;

/* h[i][0:BLOCK] = sum_kk x_i[kk] * A[kk][0:BLOCK] for TILE rows; A: one packed block [k][BLOCK]. */
static void down_block(const float* const x[TILE], const float* A, int64_t k, float* h, int64_t R) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
  __m256 c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t kk = 0; kk < k; kk++) {
    const float* a = A + kk * BLOCK;
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    __m256 x0 = _mm256_broadcast_ss(x[0] + kk), x1 = _mm256_broadcast_ss(x[1] + kk);
    __m256 x2 = _mm256_broadcast_ss(x[2] + kk), x3 = _mm256_broadcast_ss(x[3] + kk);
    c00 = _mm256_fmadd_ps(x0, a0, c00), c01 = _mm256_fmadd_ps(x0, a1, c01);
    c10 = _mm256_fmadd_ps(x1, a0, c10), c11 = _mm256_fmadd_ps(x1, a1, c11);
    c20 = _mm256_fmadd_ps(x2, a0, c20), c21 = _mm256_fmadd_ps(x2, a1, c21);
    c30 = _mm256_fmadd_ps(x3, a0, c30), c31 = _mm256_fmadd_ps(x3, a1, c31);
  }
  _mm256_storeu_ps(h + 0 * R, c00), _mm256_storeu_ps(h + 0 * R + 8, c01);
  _mm256_storeu_ps(h + 1 * R, c10), _mm256_storeu_ps(h + 1 * R + 8, c11);
  _mm256_storeu_ps(h + 2 * R, c20), _mm256_storeu_ps(h + 2 * R + 8, c21);
  _mm256_storeu_ps(h + 3 * R, c30), _mm256_storeu_ps(h + 3 * R + 8, c31);
}

/* y_i[0:w] += sum_rr h_i[rr] * B[rr][0:w] for TILE rows (w <= BLOCK valid columns); B: one packed
 * block [r][BLOCK]; h has row stride R. */
static void up_block(float* const y[TILE], const float* B, int64_t r, int64_t w, const float* h,
                     int64_t R) {
  float partial[TILE][BLOCK]; /* a last block narrower than BLOCK is computed here, then copied */
  float* out[TILE];
  for (int i = 0; i < TILE; i++) {
    out[i] = y[i];
    if (w < BLOCK) {
      for (int64_t c = 0; c < BLOCK; c++) partial[i][c] = c < w ? y[i][c] : 0.f;
      out[i] = partial[i];
    }
  }
  __m256 c00 = _mm256_loadu_ps(out[0]), c01 = _mm256_loadu_ps(out[0] + 8);
  __m256 c10 = _mm256_loadu_ps(out[1]), c11 = _mm256_loadu_ps(out[1] + 8);
  __m256 c20 = _mm256_loadu_ps(out[2]), c21 = _mm256_loadu_ps(out[2] + 8);
  __m256 c30 = _mm256_loadu_ps(out[3]), c31 = _mm256_loadu_ps(out[3] + 8);
  for (int64_t rr = 0; rr < r; rr++) {
    const float* b = B + rr * BLOCK;
    __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 h0 = _mm256_broadcast_ss(h + 0 * R + rr), h1 = _mm256_broadcast_ss(h + 1 * R + rr);
    __m256 h2 = _mm256_broadcast_ss(h + 2 * R + rr), h3 = _mm256_broadcast_ss(h + 3 * R + rr);
    c00 = _mm256_fmadd_ps(h0, b0, c00), c01 = _mm256_fmadd_ps(h0, b1, c01);
    c10 = _mm256_fmadd_ps(h1, b0, c10), c11 = _mm256_fmadd_ps(h1, b1, c11);
    c20 = _mm256_fmadd_ps(h2, b0, c20), c21 = _mm256_fmadd_ps(h2, b1, c21);
    c30 = _mm256_fmadd_ps(h3, b0, c30), c31 = _mm256_fmadd_ps(h3, b1, c31);
  }
  _mm256_storeu_ps(out[0], c00), _mm256_storeu_ps(out[0] + 8, c01);
  _mm256_storeu_ps(out[1], c10), _mm256_storeu_ps(out[1] + 8, c11);
  _mm256_storeu_ps(out[2], c20), _mm256_storeu_ps(out[2] + 8, c21);
  _mm256_storeu_ps(out[3], c30), _mm256_storeu_ps(out[3] + 8, c31);
  if (w < BLOCK)
    for (int i = 0; i < TILE; i++)
      for (int64_t c = 0; c < w; c++) y[i][c] = partial[i][c];
}

/* y[rows] += the grouped LoRA update of x[rows]; x: rows of k floats (row stride x_stride),
 * y: rows whose columns the parts cover (row stride y_stride); num_threads: PyTorch's setting (an
 * OpenMP thread count is per calling thread, so it is passed, not inherited). Returns 0, or -1 when
 * out of memory (then y is unchanged). */
int lora_grouped_add(const float* x, int64_t x_stride, float* y, int64_t y_stride,
                     const lora_groups* groups, const lora_factors* f, int num_threads) {
  const int64_t k = f->k;
  int64_t num_tiles = 0, width = 0, h_size = 0, down_items = 0, up_items = 0;
  for (int64_t g = 0; g < groups->num_groups; g++) {
    const lora_slot* slot = f->slots + groups->group_slot[g];
    if (slot->R == 0) continue;
    const int64_t tiles = (groups->group_start[g + 1] - groups->group_start[g] + TILE - 1) / TILE;
    num_tiles += tiles, h_size += tiles * TILE * slot->R, down_items += tiles * (slot->R / BLOCK);
    for (int64_t p = 0; p < f->num_parts; p++)
      if (slot->part_r[p] > 0) up_items += tiles * ((f->part_width[p] + UP_BLOCKS * BLOCK - 1) / (UP_BLOCKS * BLOCK));
  }
  for (int64_t p = 0; p < f->num_parts; p++)
    if (f->part_col[p] + f->part_width[p] > width) width = f->part_col[p] + f->part_width[p];
  if (num_tiles == 0) return 0;
  row_tile* tiles = malloc(sizeof(row_tile) * (size_t)num_tiles);
  float* h = malloc(sizeof(float) * (size_t)h_size);
  float* zero_row = calloc((size_t)k, sizeof(float)); /* x of padding rows */
  int64_t* down_tile = malloc(sizeof(int64_t) * (size_t)down_items); /* phase-1 item -> tile */
  int64_t* down_block_of = malloc(sizeof(int64_t) * (size_t)down_items); /* -> block of A */
  int64_t* up_tile = malloc(sizeof(int64_t) * (size_t)up_items);     /* phase-2 item -> tile */
  int64_t* up_part = malloc(sizeof(int64_t) * (size_t)up_items);     /* -> part */
  int64_t* up_first = malloc(sizeof(int64_t) * (size_t)up_items);    /* -> its first block of B */
  if (num_threads < 1) num_threads = 1;
  float* scratch_rows = calloc((size_t)(num_threads * width), sizeof(float)); /* y of padding rows, one per thread */
  const int failed = !tiles || !h || !zero_row || !down_tile || !down_block_of || !up_tile || !up_part ||
                     !up_first || !scratch_rows;
  if (!failed) {
    int64_t t = 0, hp = 0, nd = 0, nu = 0;
    for (int64_t g = 0; g < groups->num_groups; g++) {
      const lora_slot* slot = f->slots + groups->group_slot[g];
      if (slot->R == 0) continue;
      for (int64_t first = groups->group_start[g]; first < groups->group_start[g + 1]; first += TILE) {
        int64_t left = groups->group_start[g + 1] - first;
        tiles[t] = (row_tile){g, first, left < TILE ? left : TILE, slot, hp};
        hp += TILE * slot->R;
        for (int64_t jb = 0; jb < slot->R / BLOCK; jb++) down_tile[nd] = t, down_block_of[nd++] = jb;
        for (int64_t p = 0; p < f->num_parts; p++)
          if (slot->part_r[p] > 0)
            for (int64_t b = 0; b * BLOCK < f->part_width[p]; b += UP_BLOCKS)
              up_tile[nu] = t, up_part[nu] = p, up_first[nu++] = b;
        t++;
      }
    }

#pragma omp parallel num_threads(num_threads)
    {
      /* phase 1: h = w * (x @ A_slot), one (tile, packed block of A) per item */
#pragma omp for schedule(static)
      for (int64_t item = 0; item < down_items; item++) {
        const row_tile tile = tiles[down_tile[item]];
        const int64_t jb = down_block_of[item], R = tile.slot->R;
        const float* rows_x[TILE];
        for (int i = 0; i < TILE; i++)
          rows_x[i] = i < tile.count ? x + groups->rows[tile.first + i] * x_stride : zero_row;
        float* out = h + tile.h + jb * BLOCK;
        down_block(rows_x, tile.slot->A + jb * k * BLOCK, k, out, R);
        if (groups->row_weight)
          for (int i = 0; i < tile.count; i++)
            for (int64_t j = 0; j < BLOCK; j++) out[i * R + j] *= groups->row_weight[tile.first + i];
      }
      /* (the implicit barrier: every h is written before any is read) */
      /* phase 2: y += h @ B, one (tile, part, UP_BLOCKS packed blocks of B) per item */
      float* scratch = scratch_rows + omp_get_thread_num() * width;
#pragma omp for schedule(static)
      for (int64_t item = 0; item < up_items; item++) {
        const row_tile tile = tiles[up_tile[item]];
        const int64_t p = up_part[item], R = tile.slot->R;
        const int64_t d = f->part_width[p], r = tile.slot->part_r[p], blocks = (d + BLOCK - 1) / BLOCK;
        const float* h_tile = h + tile.h + tile.slot->part_rank[p];
        for (int64_t b = up_first[item]; b < blocks && b < up_first[item] + UP_BLOCKS; b++) {
          const int64_t c = b * BLOCK;
          float* rows_y[TILE];
          for (int i = 0; i < TILE; i++)
            rows_y[i] = (i < tile.count ? y + groups->rows[tile.first + i] * y_stride : scratch) +
                        f->part_col[p] + c;
          up_block(rows_y, tile.slot->part_B[p] + b * r * BLOCK, r, d - c < BLOCK ? d - c : BLOCK, h_tile, R);
        }
      }
    }
  }
  free(tiles), free(h), free(zero_row), free(down_tile), free(down_block_of);
  free(up_tile), free(up_part), free(up_first), free(scratch_rows);
  return failed ? -1 : 0;
}
