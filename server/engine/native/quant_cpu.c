// Weight-only quantized linear layers for batches of 1 to 64 rows on AVX2/FMA (quant_cpu.py).
//
//   y[n, o] = sum_k x[n, k] * w[o, k]        (or y += ... with accumulate)
//
// Weight layouts (k padded to kp, a multiple of 32, with zeros):
//
//   int8:  q int8 [out, kp];  w = q * scale[o, k / group] (+ min[o, k / group] when min is not
//          NULL)                                          (group: 16 or a multiple of 32)
//   4-bit: q uint8 [out, kp/2], per group of 32 weights 16 bytes: byte j holds weight j in its
//          low nibble and weight j + 16 in its high nibble (GGUF's Q4_0/Q4_1 layout);
//          w = (q + offset) * scale[o, k / 32] (+ min[o, k / 32] when min is not NULL)
//
// Scales and mins are float32, or float16 (half != 0: widened exactly with F16C).
//
// Two kinds of kernels with the same arguments: q8_linear / q4_linear (float inputs, below) and
// q8_linear_int / q4_linear_int (and _vnni), which quantize the inputs to int8 blocks and use
// integer dot products (the second half of this file). quant_cpu.py chooses (--quant-dot).
//
// Float kernels: two paths, both splitting the output rows over OpenMP threads in contiguous runs
// (each thread streams one region of the packed bytes):
//
// - Up to STREAM_MAX batch rows (a decode step: one stream, a few): the packed bytes are streamed
//   and unpacked in registers with the fewest operations per weight. The group's scale and min
//   are factored out of its dot product:
//       sum_i w_i x_i = scale * sum_i q_i x_i + (min + offset * scale) * sum_i x_i,
//   with sum_i x_i per group computed once per call for each input row. Per 8 weights: one
//   widening (4-bit: plus a mask or shift), one int->float conversion, one FMA per input row (plus
//   one FMA per group for the scale). A pass takes 4 output rows at one input row, else 2, and
//   the input rows 4 at a time (the pass's bytes, read once from memory, stay in L1 for the next
//   4); each pass's rows are one contiguous run of bytes, prefetched AHEAD bytes ahead (without
//   it int8 read at a third of the float32 kernel's bandwidth, measured).
// - Larger batches: the cost is the multiply-adds, so PANEL output rows are dequantized once into
//   a float32 tile (each weight exactly as the Python reference computes it: multiply, then add,
//   built with -ffp-contract=off) and multiplied by every input row with a ROWS x COLS register
//   tile, as a dense float32 kernel would: the unpacking is shared by the whole batch. At 4 to 8
//   rows both paths cost the same (measured); at 12-16 this one is faster for 4-bit.
//
// The weights are the reference dequantizer's values on both paths (the streaming path applies
// the same scale and min, factored); only the dot products' rounding and summation order differ.
// The float kernels quantize no input.
#ifndef QUANT_INT_VARIANT
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef STREAM_MAX
#define STREAM_MAX 8  // up to this many batch rows: the streaming path
#endif
#define CHUNK 4       // batch rows per streaming tile (the pass's bytes are re-read from L1)
#define PANEL 12      // weight rows dequantized together on the batched path (a multiple of COLS)
#define COLS 3        // weight rows per register tile (batched path)
#define ROWS 4        // batch rows per register tile (batched path)
#define AHEAD 4096  // bytes prefetched ahead of the streamed weights
#define WIDE 4        // weight rows per streaming pass at one batch row (2 at more)

typedef struct {
    int q4;                     // 1: the 4-bit layout, 0: int8
    const void *q;              // int8 [out, kp] or uint8 [out, kp / 2]
    int64_t kp, group, groups;  // group: weights per scale (32 for 4-bit); groups = kp / group
    const void *scale, *min;    // [out, groups]; min may be NULL
    int half, offset;           // float16 scales; offset added to 4-bit values (0 for int8)
    int64_t g8;                 // groups rounded up to a multiple of 8 (factor buffers' stride)
} weights;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void store(float *y, float v, int accumulate) { *y = accumulate ? *y + v : v; }

// scale[i] (or min[i]) as float32: stored as float32, or as float16 bits when half.
static inline float at(const void *p, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void *alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

// ------------------------------------------------------------------------------ streaming path

// Row o's factors: sf[g] = scale, mf[g] = min + offset * scale (0 without either); g8 floats each,
// zero past groups.
static void row_factors(const weights *w, int64_t o, float *sf, float *mf) {
    const int64_t base = o * w->groups;
    for (int64_t g = 0; g < w->groups; g++) {
        const float s = at(w->scale, base + g, w->half);
        const float m = w->min ? at(w->min, base + g, w->half) : 0.0f;
        sf[g] = s;
        mf[g] = w->offset ? m + (float)w->offset * s : m;
    }
    for (int64_t g = w->groups; g < w->g8; g++) sf[g] = mf[g] = 0.0f;
}

static inline float dot8(const float *a, const float *b, int64_t n8) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    return hsum(s);
}

// res[c][r] = row (o + c) . x_r for wr weight rows and nb batch rows (constants after inlining).
// xp: [nb, kp] (zero past k); xs: [nb, g8] the inputs' group sums; sf/mf: [wr, g8].
static inline __attribute__((always_inline)) void stream_tile(
    const weights *w, int64_t o, const int wr, const int nb, const float *xp, const float *xs,
    const float *sf, const float *mf, float res[WIDE][CHUNK]) {
    __m256 acc[WIDE][CHUNK];
    for (int c = 0; c < wr; c++)
        for (int r = 0; r < nb; r++) acc[c][r] = _mm256_setzero_ps();
    const int64_t kp = w->kp, g8 = w->g8;
    if (w->q4) {
        const uint8_t *q = (const uint8_t *)w->q + o * (kp / 2);
        const __m256i low = _mm256_set1_epi32(15);
        for (int64_t g = 0; g < w->groups; g++) {
            // the pass's wr rows are one contiguous run, read at wr * 16 bytes a group: one line ahead
            _mm_prefetch((const char *)q + wr * 16 * g + AHEAD, _MM_HINT_T0);
            for (int c = 0; c < wr; c++) {
                const uint8_t *b = q + c * (kp / 2) + g * 16;
                // bytes 0-7 hold weights 0-7 (low nibbles) and 16-23 (high), bytes 8-15: 8-15, 24-31
                const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
                const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)));
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low));
                const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low));
                const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
                const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
                const __m256 s = _mm256_broadcast_ss(sf + c * g8 + g);
                for (int r = 0; r < nb; r++) {
                    const float *x = xp + r * kp + g * 32;
                    __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
                    t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), t);
                    t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), t);
                    t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), t);
                    acc[c][r] = _mm256_fmadd_ps(s, t, acc[c][r]);
                }
            }
        }
    } else {
        const int8_t *q = (const int8_t *)w->q + o * kp;
        const int64_t group = w->group;
        for (int64_t g = 0; g < w->groups; g++) {
            __m256 t[WIDE][CHUNK];
            for (int c = 0; c < wr; c++)
                for (int r = 0; r < nb; r++) t[c][r] = _mm256_setzero_ps();
            for (int64_t v = g * group; v < (g + 1) * group; v += 8) {
                if ((v & 15) == 0)  // as above: wr * 16 bytes per two steps
                    _mm_prefetch((const char *)q + wr * v + AHEAD, _MM_HINT_T0);
                for (int c = 0; c < wr; c++) {
                    const __m128i b = _mm_loadl_epi64((const __m128i *)(q + c * kp + v));
                    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                    for (int r = 0; r < nb; r++)
                        t[c][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + r * kp + v), t[c][r]);
                }
            }
            for (int c = 0; c < wr; c++) {
                const __m256 s = _mm256_broadcast_ss(sf + c * g8 + g);
                for (int r = 0; r < nb; r++) acc[c][r] = _mm256_fmadd_ps(s, t[c][r], acc[c][r]);
            }
        }
    }
    for (int c = 0; c < wr; c++)
        for (int r = 0; r < nb; r++) res[c][r] = hsum(acc[c][r]) + dot8(mf + c * g8, xs + r * g8, g8);
}

static void stream(const weights *w, int64_t n, const float *xp, float *y, int64_t ldy, int64_t out,
                   int accumulate, int threads) {
    const int64_t g8 = w->g8;
    // the inputs' group sums: xs [n, g8]
    float *xs = alloc(sizeof(float) * n * g8);
    for (int64_t r = 0; r < n; r++) {
        for (int64_t g = 0; g < g8; g++) {
            float s = 0.0f;
            if (g < w->groups)
                for (int64_t i = g * w->group; i < (g + 1) * w->group; i++) s += xp[r * w->kp + i];
            xs[r * g8 + g] = s;
        }
    }
    const int wide = n == 1 ? WIDE : 2;  // weight rows per pass
    const int64_t passes = (out + wide - 1) / wide;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *sf = alloc(sizeof(float) * WIDE * g8), *mf = alloc(sizeof(float) * WIDE * g8);
        float res[WIDE][CHUNK];
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < passes; p++) {
            const int64_t o = p * wide;
            const int wr = out - o < wide ? (int)(out - o) : wide;
            for (int c = 0; c < wr; c++) row_factors(w, o + c, sf + c * g8, mf + c * g8);
            for (int64_t r0 = 0; r0 < n; r0 += CHUNK) {
                const int nb = n - r0 < CHUNK ? (int)(n - r0) : CHUNK;
                const float *xr = xp + r0 * w->kp, *sr = xs + r0 * g8;
                // constant tile sizes: the accumulators stay in registers
#define TILE(WR, NB) stream_tile(w, o, WR, NB, xr, sr, sf, mf, res)
                switch (wr * 8 + nb) {
                    case 4 * 8 + 1: TILE(4, 1); break;
                    case 2 * 8 + 1: TILE(2, 1); break;
                    case 2 * 8 + 2: TILE(2, 2); break;
                    case 2 * 8 + 3: TILE(2, 3); break;
                    case 2 * 8 + 4: TILE(2, 4); break;
                    case 1 * 8 + 1: TILE(1, 1); break;
                    case 1 * 8 + 2: TILE(1, 2); break;
                    case 1 * 8 + 3: TILE(1, 3); break;
                    case 1 * 8 + 4: TILE(1, 4); break;
                    default:  // 3 rows left of a 4-row pass: one at a time
                        for (int c = 0; c < wr; c++)
                            stream_tile(w, o + c, 1, 1, xr, sr, sf + c * g8, mf + c * g8, res + c);
                }
#undef TILE
                for (int c = 0; c < wr; c++)
                    for (int r = 0; r < nb; r++) store(y + (r0 + r) * ldy + o + c, res[c][r], accumulate);
            }
        }
        free(sf);
        free(mf);
    }
    free(xs);
}

// -------------------------------------------------------------------------------- batched path

// Row o dequantized into dst [kp]: each weight as the reference computes it.
static void dequantize_row(const weights *w, int64_t o, float *dst) {
    const int64_t kp = w->kp, base = o * w->groups;
    if (w->q4) {
        const uint8_t *q = (const uint8_t *)w->q + o * (kp / 2);
        const __m256i low = _mm256_set1_epi32(15), off = _mm256_set1_epi32(w->offset);
        for (int64_t g = 0; g < w->groups; g++) {
            const __m256 s = _mm256_set1_ps(at(w->scale, base + g, w->half));
            const __m256 m = _mm256_set1_ps(w->min ? at(w->min, base + g, w->half) : 0.0f);
            const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + g * 16)));
            const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + g * 16 + 8)));
            __m256i parts[4] = {_mm256_and_si256(v0, low), _mm256_and_si256(v1, low),
                                _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)};
            if (w->offset)
                for (int v = 0; v < 4; v++) parts[v] = _mm256_add_epi32(parts[v], off);
            for (int v = 0; v < 4; v++) {
                __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(parts[v]), s);
                if (w->min) wv = _mm256_add_ps(wv, m);
                _mm256_storeu_ps(dst + g * 32 + 8 * v, wv);
            }
        }
    } else {
        const int8_t *q = (const int8_t *)w->q + o * kp;
        for (int64_t g = 0; g < w->groups; g++) {
            const __m256 s = _mm256_set1_ps(at(w->scale, base + g, w->half));
            const __m256 m = _mm256_set1_ps(w->min ? at(w->min, base + g, w->half) : 0.0f);
            for (int64_t v = g * w->group; v < (g + 1) * w->group; v += 8) {
                const __m128i b = _mm_loadl_epi64((const __m128i *)(q + v));
                __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
                if (w->min) wv = _mm256_add_ps(wv, m);
                _mm256_storeu_ps(dst + v, wv);
            }
        }
    }
}

// res[r][c] = panel row c . x_r for nr (<= ROWS, a constant after inlining) rows; panel: [COLS, kp].
static inline __attribute__((always_inline)) void panel_tile(const float *xp, int64_t kp, const int nr,
                                                              const float *panel, float res[ROWS][COLS]) {
    __m256 acc[ROWS][COLS];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < COLS; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < kp; kk += 8) {
        __m256 wv[COLS];
        for (int c = 0; c < COLS; c++) wv[c] = _mm256_loadu_ps(panel + c * kp + kk);
        for (int r = 0; r < nr; r++) {
            const __m256 xv = _mm256_loadu_ps(xp + r * kp + kk);
            for (int c = 0; c < COLS; c++) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < COLS; c++) res[r][c] = hsum(acc[r][c]);
}

static void batched(const weights *w, int64_t n, const float *xp, float *y, int64_t ldy, int64_t out,
                    int accumulate, int threads) {
    const int64_t kp = w->kp, panels = (out + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *panel = alloc(sizeof(float) * PANEL * kp);
        float res[ROWS][COLS];
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < panels; p++) {
            const int64_t o0 = p * PANEL, rows = out - o0 < PANEL ? out - o0 : PANEL;
            for (int64_t c = 0; c < rows; c++) dequantize_row(w, o0 + c, panel + c * kp);
            if (rows < PANEL) memset(panel + rows * kp, 0, sizeof(float) * (PANEL - rows) * kp);
            for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
                const int nr = n - r0 < ROWS ? (int)(n - r0) : ROWS;
                for (int64_t c0 = 0; c0 < rows; c0 += COLS) {
                    const float *xr = xp + r0 * kp, *pc = panel + c0 * kp;
                    switch (nr) {  // constant row counts: the accumulators stay in registers
                        case 1: panel_tile(xr, kp, 1, pc, res); break;
                        case 2: panel_tile(xr, kp, 2, pc, res); break;
                        case 3: panel_tile(xr, kp, 3, pc, res); break;
                        default: panel_tile(xr, kp, 4, pc, res); break;
                    }
                    const int64_t cols = rows - c0 < COLS ? rows - c0 : COLS;
                    for (int r = 0; r < nr; r++)
                        for (int64_t c = 0; c < cols; c++)
                            store(y + (r0 + r) * ldy + o0 + c0 + c, res[r][c], accumulate);
                }
            }
        }
        free(panel);
    }
}

// ----------------------------------------------------------------------------------- entries

static int run(const weights *w, const float *x, int64_t n, int64_t ldx, int64_t k, float *y, int64_t ldy,
               int64_t out, int accumulate, int threads) {
    if (n <= 0 || out <= 0) return 0;
    if (threads < 1) threads = 1;
    // the inputs zero-padded to kp: every loop runs whole groups, the padding's weights meet zeros
    float *xp = alloc(sizeof(float) * n * w->kp);
    if (!xp) return 1;
    for (int64_t r = 0; r < n; r++) {
        memcpy(xp + r * w->kp, x + r * ldx, sizeof(float) * k);
        memset(xp + r * w->kp + k, 0, sizeof(float) * (w->kp - k));
    }
    if (n <= STREAM_MAX)
        stream(w, n, xp, y, ldy, out, accumulate, threads);
    else
        batched(w, n, xp, y, ldy, out, accumulate, threads);
    free(xp);
    return 0;
}

int q8_linear(const float *x, int64_t n, int64_t ldx, int64_t k, const int8_t *q, int64_t kp,
              const void *scale, const void *min, int64_t group, int half, float *y, int64_t ldy,
              int64_t out, int accumulate, int threads) {
    const int64_t groups = kp / group;
    const weights w = {0, q, kp, group, groups, scale, min, half, 0, (groups + 7) & ~(int64_t)7};
    return run(&w, x, n, ldx, k, y, ldy, out, accumulate, threads);
}

int q4_linear(const float *x, int64_t n, int64_t ldx, int64_t k, const uint8_t *q, int64_t kp,
              const void *scale, const void *min, int offset, int half, float *y, int64_t ldy,
              int64_t out, int accumulate, int threads) {
    const int64_t groups = kp / 32;
    const weights w = {1, q, kp, 32, groups, scale, min, half, offset, (groups + 7) & ~(int64_t)7};
    return run(&w, x, n, ldx, k, y, ldy, out, accumulate, threads);
}

// ============================================================================ integer dot products
//
// q8_linear_int / q4_linear_int: the same arguments and results as q8_linear / q4_linear, but each
// input row is first quantized to int8 in blocks of 32 along k (llama.cpp's Q8_0 activations):
//
//     d_b = max_{i in b} |x_i| / 127,   a_i = round(x_i / d_b)  (x_i * (1 / d_b), half to even)
//
// (d_b = 0 and a = 0 where max |x| < 1e-30; a block holding an inf or NaN gets d_b = NaN, so the
// row's outputs are NaN, as a float product would make them). The weights are the reference
// dequantizer's: w_i = (u_i + offset) * s_g + m_g with u the stored integer (0..15 for 4-bit, the
// int8 byte) and s, m the group's scale and min, so
//
//     sum_i w_i x'_i = sum_b s_g d_b sum_{i in b} u_i a_i  +  sum_g (m_g + offset s_g) sum_{i in g} x'_i
//
// where x'_i = a_i d_b is the quantized activation. The first term's inner sums are integer dot
// products of 32 bytes (AVX2 _mm256_maddubs_epi16: unsigned x signed bytes into int16 pairs, then
// _mm256_madd_epi16 into int32); the second is added per lane with the blocks' sums of x' (groups
// of 32), else as a dot product of the groups' sums (int8 rows on the streaming path, groups of
// 16 or more than 32). x' differs from x by at most d_b / 2 per element.
//
// Layout. Eight blocks (a superblock, 256 weights) are rearranged so that each 32-bit lane of a
// vector holds 4 consecutive bytes of one block: vector 2t (t = 0..3) holds bytes 4t..4t+3 of the
// lane's block, vector 2t + 1 bytes 16 + 4t..16 + 4t + 3, with lanes 0-3 the even blocks (0, 2, 4,
// 6) and 4-7 the odd ones. Summing the eight vectors' products lane by lane then gives one int32
// per block per lane, so a superblock needs one int->float conversion and one FMA (against the
// lanes' scale products) instead of eight. For 4-bit weights this arrangement costs a 4x4
// transpose of 32-bit elements within each 128-bit half (8 unpacks for 8 blocks), and the nibbles
// fall out as the two vectors of each t (low nibbles: bytes 4t..; high: 16 + 4t..); the int16
// products of 4-bit weights (|u * a| pairs <= 2 * 15 * 127) are summed over all eight vectors
// before widening. int8 weights use the sign trick (|w| times a with w's sign: pairs <= 2 * 128 *
// 127) and widen after each vector. The blocks after the last full superblock are taken in pairs
// (lanes 0-3: block g, 4-7: g + 1; vector 0 holds bytes 0-15 of both, vector 1 bytes 16-31).
// Activations are quantized and arranged once per call.
//
// Paths (the output rows split over OpenMP threads in contiguous runs, as the float kernels do):
// - 1 to NMAX (8) input rows, streamed: each weight row is read once from memory. 4-bit rows are
//   arranged in registers unit by unit (4 loads, 8 unpacks, the nibble masks) and multiplied by
//   the input rows 4 at a time; the unit's scale and min lanes come straight from the row's
//   float16/float32 arrays (one load, a widening and a permutation). int8 rows are not arranged
//   (it costs more than it saves at a few rows): block by block, |w| times the inputs with w's
//   sign, one int->float conversion and FMA per block, alternating two FMA chains. A pass of 4
//   output rows reduces its 4 x rows sums together (hadd) and stores 4 contiguous outputs.
// - 9 to 64 rows, batched: PANEL_I weight rows are arranged once into a panel (with their lane
//   scales and min lanes; the next panel's bytes prefetched meanwhile), then multiplied by every
//   input row in register tiles (Q4_WR x Q4_NB etc. below) that keep each arranged weight vector
//   for several input rows.
// The integer sums are exact, and both paths apply the same float operations per unit and reduce
// the lanes in the same order (the int8 streaming path aside): the reference is the dense product
// of the dequantized weights and the quantized inputs, up to float32 rounding (quantized.py).
//
// The variant body (QUANT_INT_VARIANT, the end of the file) is compiled twice: for AVX2, and with
// GCC's target pragma for AVX-512 VNNI on 256-bit vectors, where vpdpbusd sums the unsigned x
// signed byte products into int32 in one instruction (no int16 step, no widening), 32 vector
// registers allow 4 x 4 tiles, and int8 weights meet inputs stored plus 128 (unsigned) with sums
// that start from -128 x the weights' lane sums (no sign instructions). The CPU (and OS) support
// is read at run time (quant_vnni_supported); quant_cpu.py checks each variant it may use.

#define SB 8        // blocks of 32 per superblock
#define UNIT 256    // bytes of an arranged superblock
#define PAIR 64     // bytes of an arranged tail pair
#define NMAX 8      // input rows of the integer streaming path (more: batched)
#ifndef PANEL_I
#define PANEL_I 16  // weight rows arranged together on the integer batched path
#endif
#define TINY 1e-30f // an activation block below this maximum is taken as zero

typedef struct {
    int64_t nblk, nsb, units, bytes;  // blocks of 32, full superblocks, units, bytes per arranged row
} ulayout;

static ulayout layout_of(int64_t kp) {
    ulayout L;
    L.nblk = kp / 32;
    L.nsb = L.nblk / SB;
    const int64_t pairs = (L.nblk - L.nsb * SB + 1) / 2;
    L.units = L.nsb + pairs;
    L.bytes = L.nsb * UNIT + pairs * PAIR;
    return L;
}

static inline int64_t unit_offset(const ulayout *L, int64_t u) {
    return u < L->nsb ? u * UNIT : L->nsb * UNIT + (u - L->nsb) * PAIR;
}

// The block whose products lane l of unit u sums (-1: none, the missing half of a last pair).
static inline int64_t lane_block(const ulayout *L, int64_t u, int l) {
    if (u < L->nsb) return u * SB + (l < 4 ? 2 * l : 2 * (l - 4) + 1);
    const int64_t g = L->nsb * SB + 2 * (u - L->nsb) + (l >= 4);
    return g < L->nblk ? g : -1;
}

// v[t] lane j (within each 128-bit half) <- v[j] lane t.
static inline void transpose4(__m256i v[4]) {
    const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm256_unpacklo_epi64(t0, t2);
    v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3);
    v[3] = _mm256_unpackhi_epi64(t1, t3);
}

// Unit u of an int8 row (32 bytes per block, natural order) arranged into dst.
static inline void arrange_s8(const int8_t *row, const ulayout *L, int64_t u, uint8_t *dst) {
    if (u < L->nsb) {
        const int8_t *s = row + u * UNIT;
        __m256i x[4], y[4];
        for (int i = 0; i < 4; i++) {  // blocks 2i and 2i + 1: their first halves, their second halves
            const __m256i a = _mm256_loadu_si256((const __m256i *)(s + 64 * i));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(s + 64 * i + 32));
            x[i] = _mm256_permute2x128_si256(a, b, 0x20);
            y[i] = _mm256_permute2x128_si256(a, b, 0x31);
        }
        transpose4(x);
        transpose4(y);
        for (int t = 0; t < 4; t++) {
            _mm256_store_si256((__m256i *)(dst + 64 * t), x[t]);
            _mm256_store_si256((__m256i *)(dst + 64 * t + 32), y[t]);
        }
    } else {
        const int64_t g = L->nsb * SB + 2 * (u - L->nsb);
        const __m256i a = _mm256_loadu_si256((const __m256i *)(row + g * 32));
        const __m256i b = g + 1 < L->nblk ? _mm256_loadu_si256((const __m256i *)(row + g * 32 + 32))
                                          : _mm256_setzero_si256();
        _mm256_store_si256((__m256i *)dst, _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_store_si256((__m256i *)(dst + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
}

// Unit u of weight row o arranged into dst (4-bit: the values 0..15; int8: the bytes).
static inline void arrange_weights(const weights *w, const ulayout *L, int64_t o, int64_t u, uint8_t *dst) {
    if (!w->q4) {
        arrange_s8((const int8_t *)w->q + o * w->kp, L, u, dst);
        return;
    }
    const uint8_t *q = (const uint8_t *)w->q + o * (w->kp / 2);
    const __m256i low = _mm256_set1_epi8(15);
    if (u < L->nsb) {
        __m256i v[4];  // v[i]: blocks 2i and 2i + 1, 16 bytes each (weight j low, j + 16 high)
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_si256((const __m256i *)(q + u * 128 + 32 * i));
        transpose4(v);
        for (int t = 0; t < 4; t++) {
            _mm256_store_si256((__m256i *)(dst + 64 * t), _mm256_and_si256(v[t], low));
            _mm256_store_si256((__m256i *)(dst + 64 * t + 32), _mm256_and_si256(_mm256_srli_epi16(v[t], 4), low));
        }
    } else {
        const int64_t g = L->nsb * SB + 2 * (u - L->nsb);
        const __m128i a = _mm_loadu_si128((const __m128i *)(q + g * 16));
        const __m128i b = g + 1 < L->nblk ? _mm_loadu_si128((const __m128i *)(q + g * 16 + 16)) : _mm_setzero_si128();
        const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
        _mm256_store_si256((__m256i *)dst, _mm256_and_si256(v, low));
        _mm256_store_si256((__m256i *)(dst + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    }
}

// n values of p (float32, or float16 when half) as float32 into dst.
static inline void widen(const void *p, int64_t n, int half, float *dst) {
    int64_t i = 0;
    if (half) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))));
        for (; i < n; i++) dst[i] = _cvtsh_ss(((const uint16_t *)p)[i]);
    } else {
        memcpy(dst, p, sizeof(float) * n);
    }
}

// Row o's scales per unit lane: sw [units][8] (group 16: [units][16], the first halves' 8 then the
// second halves'), 0 for a missing block. tmp: 2 * nblk + 8 floats.
static void unit_scales(const weights *w, const ulayout *L, int64_t o, float *sw, float *tmp) {
    const int64_t nblk = L->nblk;
    const int g16 = w->group == 16;
    const float *bs = tmp;  // per block (group 16: per half block) scales, natural order
    if (w->group <= 32) {
        if (w->half)
            widen((const uint16_t *)w->scale + o * w->groups, w->groups, 1, tmp);
        else
            bs = (const float *)w->scale + o * w->groups;
    } else {
        const int64_t per = w->group / 32;
        for (int64_t g = 0; g < w->groups; g++) {
            const float v = at(w->scale, o * w->groups + g, w->half);
            for (int64_t j = 0; j < per; j++) tmp[g * per + j] = v;
        }
    }
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // lane -> block of a superblock
    for (int64_t u = 0; u < L->nsb; u++) {
        if (!g16) {
            _mm256_storeu_ps(sw + u * 8, _mm256_permutevar8x32_ps(_mm256_loadu_ps(bs + u * 8), perm));
        } else {
            for (int l = 0; l < 8; l++) {
                const int64_t b = u * SB + (l < 4 ? 2 * l : 2 * (l - 4) + 1);
                sw[u * 16 + l] = bs[2 * b];
                sw[u * 16 + 8 + l] = bs[2 * b + 1];
            }
        }
    }
    for (int64_t u = L->nsb; u < L->units; u++) {  // pairs: lanes 0-3 block g, 4-7 block g + 1
        const int per = g16 ? 16 : 8;
        for (int l = 0; l < 8; l++) {
            const int64_t b = L->nsb * SB + 2 * (u - L->nsb) + (l >= 4);
            sw[u * per + l] = b < nblk ? (g16 ? bs[2 * b] : bs[b]) : 0.0f;
            if (g16) sw[u * per + 8 + l] = b < nblk ? bs[2 * b + 1] : 0.0f;
        }
    }
}

// One input row x [kp] (zero past k) quantized to qn [kp] with block scales d [nblk], natural order.
static void quantize_row(const float *x, int64_t nblk, int8_t *qn, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < nblk; b++) {
        const float *v = x + b * 32;
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(v));
        __m256 z = _mm256_sub_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v));  // 0, or NaN for an inf or NaN
        for (int i = 8; i < 32; i += 8) {
            const __m256 e = _mm256_loadu_ps(v + i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, e));
            z = _mm256_add_ps(z, _mm256_sub_ps(e, e));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        if (_mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q))) {  // max_ps drops NaNs: found by z
            d[b] = NAN;
            memset(qn + b * 32, 0, 32);
            continue;
        }
        if (!(amax >= TINY)) {
            d[b] = 0.0f;
            memset(qn + b * 32, 0, 32);
            continue;
        }
        const float db = amax / 127.0f, id = 1.0f / db;
        d[b] = db;
        const __m256 s = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v), s));  // nearest, ties to even
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8), s));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 16), s));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 24), s));
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
        _mm256_storeu_si256((__m256i *)(qn + b * 32), i0);
    }
}

// Sum of 16 int8 values.
static inline int sum16(const int8_t *q) {
    int s = 0;
    for (int i = 0; i < 16; i++) s += q[i];
    return s;
}

// What the paths read of one quantized row (qn, d): the arranged bytes aq [L.bytes] and lane
// scales da [units][8] (when aq is not NULL), the group sums of the quantized values xs [g8] and
// the block sums in lane order xl [units][8] (a pair's in its lanes 0 and 4; when not NULL).
static void prepare_row(const weights *w, const ulayout *L, const int8_t *qn, const float *d, uint8_t *aq, float *da,
                        float *xs, float *xl) {
    if (aq)
        for (int64_t u = 0; u < L->units; u++) {
            arrange_s8(qn, L, u, aq + unit_offset(L, u));
            for (int l = 0; l < 8; l++) {
                const int64_t b = lane_block(L, u, l);
                da[u * 8 + l] = b < 0 ? 0.0f : d[b];
            }
        }
    if (xs) {
        for (int64_t g = 0; g < w->g8; g++) xs[g] = 0.0f;
        for (int64_t b = 0; b < L->nblk; b++) {
            const int lo = sum16(qn + b * 32), hi = sum16(qn + b * 32 + 16);
            if (w->group == 16) {
                xs[2 * b] = d[b] * (float)lo;
                xs[2 * b + 1] = d[b] * (float)hi;
            } else {
                xs[b * 32 / w->group] += d[b] * (float)(lo + hi);
            }
        }
    }
    if (xl)
        for (int64_t u = 0; u < L->units; u++)
            for (int l = 0; l < 8; l++) {
                const int64_t b = lane_block(L, u, l);
                const int used = u < L->nsb || l == 0 || l == 4;
                xl[u * 8 + l] = b < 0 || !used ? 0.0f : d[b] * (float)(sum16(qn + b * 32) + sum16(qn + b * 32 + 16));
            }
}

typedef struct {
    ulayout L;
    int64_t n;          // input rows
    int64_t sws;        // floats per weight row of lane scales (units * 8, group 16: units * 16)
    const int8_t *qn;   // [n][kp] the quantized rows in natural order
    const float *d;     // [n][nblk] their block scales
    const uint8_t *aq;  // [n][L.bytes] arranged (superblock layout)
    const float *da;    // [n][units * 8] block scales in lane order
    const float *xs;    // [n][g8] the quantized rows' group sums, or NULL (no min term)
    const float *xl;    // [n][units * 8] block sums in lane order (4-bit streaming), or NULL
} prepared;

// Row o's min factors mf [g8] (min + offset * scale per group, 0 past groups). tmp: groups + 8 floats.
static void min_factors(const weights *w, int64_t o, float *mf, float *tmp) {
    const int64_t n = w->groups;
    widen((const char *)w->scale + o * n * (w->half ? 2 : 4), n, w->half, tmp);  // scales
    if (w->min)
        widen((const char *)w->min + o * n * (w->half ? 2 : 4), n, w->half, mf);
    else
        memset(mf, 0, sizeof(float) * n);
    if (w->offset) {
        const float off = (float)w->offset;
        for (int64_t g = 0; g < n; g++) mf[g] = mf[g] + off * tmp[g];
    }
    for (int64_t g = n; g < w->g8; g++) mf[g] = 0.0f;
}

// ------------------------------------------------------------------ integer streaming (1-8 rows)

// Unit u of 4-bit row q (packed bytes) arranged in registers: v[2t], v[2t + 1] (see the layout).
static inline __attribute__((always_inline)) void q4_unit_regs(const uint8_t *q, const ulayout *L, int64_t u,
                                                              __m256i v[8]) {
    const __m256i low = _mm256_set1_epi8(15);
    if (u < L->nsb) {
        __m256i t[4];
        for (int i = 0; i < 4; i++) t[i] = _mm256_loadu_si256((const __m256i *)(q + u * 128 + 32 * i));
        transpose4(t);
        for (int i = 0; i < 4; i++) {
            v[2 * i] = _mm256_and_si256(t[i], low);
            v[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(t[i], 4), low);
        }
    } else {
        const int64_t g = L->nsb * SB + 2 * (u - L->nsb);
        const __m128i a = _mm_loadu_si128((const __m128i *)(q + g * 16));
        const __m128i b = g + 1 < L->nblk ? _mm_loadu_si128((const __m128i *)(q + g * 16 + 16)) : _mm_setzero_si128();
        const __m256i x = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
        v[0] = _mm256_and_si256(x, low);
        v[1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    }
}

// 8 values of a per-block array (float32, or float16 when half) from index i, in a superblock's
// lane order (lanes 0-3: blocks i, i + 2, i + 4, i + 6; 4-7: the odd ones).
static inline __m256 lanes8(const void *p, int64_t i, int half) {
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 v = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                          : _mm256_loadu_ps((const float *)p + i);
    return _mm256_permutevar8x32_ps(v, perm);
}

// A pair's lanes: p[base + g] in lanes 0-3, p[base + g + 1] (0 when g + 1 is past n) in 4-7.
static inline __m256 lanes2(const void *p, int64_t base, int64_t g, int64_t n, int half) {
    const float a = at(p, base + g, half), b = g + 1 < n ? at(p, base + g + 1, half) : 0.0f;
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(a)), _mm_set1_ps(b), 1);
}

// [sum a, sum b, sum c, sum d] of four vectors' lanes.
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[c] (+)= v[c] for the first `count` of four outputs (contiguous).
static inline void store4(float *y, __m128 v, int count, int accumulate) {
    if (count == 4) {
        _mm_storeu_ps(y, accumulate ? _mm_add_ps(_mm_loadu_ps(y), v) : v);
    } else {
        float t[4];
        _mm_storeu_ps(t, v);
        for (int c = 0; c < count; c++) store(y + c, t[c], accumulate);
    }
}

// --------------------------------------------------------------- integer batched (9-64 rows)

// Lanes of a per-group array of row o with groups of 32 (scales or mins), every unit: dst [units][8].
static void group_lanes(const void *p, int half, int64_t base, int64_t groups, const ulayout *L, float *dst) {
    for (int64_t u = 0; u < L->units; u++) {
        const __m256 v = u < L->nsb ? lanes8(p, base + u * SB, half)
                                    : lanes2(p, base, L->nsb * SB + 2 * (u - L->nsb), groups, half);
        _mm256_storeu_ps(dst + u * 8, v);
    }
}

// The integer kernels, compiled twice: for AVX2 (vpmaddubsw / vpmaddwd) and, with the same code,
// for AVX-512 VNNI on 256-bit vectors (vpdpbusd: the unsigned x signed byte products summed into
// int32 in one instruction, and 32 vector registers for larger tiles). quant_vnni_supported says
// whether this CPU (and OS) runs the second; quant_cpu.py checks both against the reference.
#define QUANT_INT_VARIANT
#define VNNI 0
#define V(name) name##_avx2
#include __FILE__
#undef VNNI
#undef V
#if defined(__GNUC__) && !defined(__clang__)  // GCC's target pragma (clang builds the AVX2 kernels only)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#define VNNI 1
#define V(name) name##_vnni
#include __FILE__
#undef VNNI
#undef V
#pragma GCC pop_options

int quant_vnni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#else
int quant_vnni_supported(void) { return 0; }
#define run_int_vnni run_int_avx2  // never called: quant_vnni_supported says no
#endif

#define ENTRIES(SUFFIX, RUN)                                                                                \
    int q8_linear_##SUFFIX(const float *x, int64_t n, int64_t ldx, int64_t k, const int8_t *q, int64_t kp, \
                           const void *scale, const void *min, int64_t group, int half, float *y, int64_t ldy,  \
                           int64_t out, int accumulate, int threads) {                                         \
        const int64_t groups = kp / group;                                                                  \
        const weights w = {0, q, kp, group, groups, scale, min, half, 0, (groups + 7) & ~(int64_t)7};       \
        return RUN(&w, x, n, ldx, k, y, ldy, out, accumulate, threads);                                     \
    }                                                                                                       \
    int q4_linear_##SUFFIX(const float *x, int64_t n, int64_t ldx, int64_t k, const uint8_t *q, int64_t kp,\
                           const void *scale, const void *min, int offset, int half, float *y, int64_t ldy,    \
                           int64_t out, int accumulate, int threads) {                                         \
        const int64_t groups = kp / 32;                                                                     \
        const weights w = {1, q, kp, 32, groups, scale, min, half, offset, (groups + 7) & ~(int64_t)7};     \
        return RUN(&w, x, n, ldx, k, y, ldy, out, accumulate, threads);                                     \
    }
ENTRIES(int, run_int_avx2)
ENTRIES(vnni, run_int_vnni)
#undef ENTRIES

// Activation quantization alone (for the reference): x [n, ldx] -> q [n, kp] int8, d [n, kp / 32].
void quantize_activations(const float *x, int64_t n, int64_t ldx, int64_t k, int64_t kp, int8_t *q, float *d) {
    float *xp = alloc(sizeof(float) * kp);
    for (int64_t r = 0; r < n; r++) {
        memcpy(xp, x + r * ldx, sizeof(float) * k);
        memset(xp + k, 0, sizeof(float) * (kp - k));
        quantize_row(xp, kp / 32, q + r * kp, d + r * (kp / 32));
    }
    free(xp);
}

#else  // ------------------------------------------------ QUANT_INT_VARIANT: the integer kernels' body
//
// Compiled twice (see the end of the main part): V(name) is name_avx2 or name_vnni, and the byte
// dot products are:
//   DOT_U8(acc, u, s): acc + the products of unsigned u and signed s bytes, 4 a 32-bit lane
//     (AVX2: int16 pairs added to int16 sums, widened by WIDEN16; VNNI: vpdpbusd into int32);
//   DOT_S8(acc, u, s): the same into int32 sums (AVX2: widened at once).

#if VNNI
#define DOT_U8(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define ADD_SUMS(a, b) _mm256_add_epi32(a, b)
#define WIDEN16(x) (x)
#define DOT_S8(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define DOT_U8(acc, u, s) _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s))
#define ADD_SUMS(a, b) _mm256_add_epi16(a, b)
#define WIDEN16(x) _mm256_madd_epi16(x, _mm256_set1_epi16(1))
#define DOT_S8(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

// acc[r] (+)= row o . input rows r0..r0 + NB - 1 for every unit (4-bit weights, streamed from memory).
static inline __attribute__((always_inline)) void V(q4_stream_rows)(const weights *w, const prepared *P, int64_t o,
                                                                int64_t r0, const int NB, __m256 acc[NMAX]) {
    const ulayout *L = &P->L;
    const uint8_t *q = (const uint8_t *)w->q + o * (w->kp / 2);
    const int64_t base = o * w->groups, das = L->units * 8;
    const __m256 off = _mm256_set1_ps((float)w->offset);
    const int mins = w->min != NULL || w->offset != 0;
    for (int64_t u = 0; u < L->units; u++) {
        const int full = u < L->nsb;
        if (full) _mm_prefetch((const char *)q + u * 128 + AHEAD, _MM_HINT_T0);
        if (full) _mm_prefetch((const char *)q + u * 128 + 64 + AHEAD, _MM_HINT_T0);
        __m256i v[8];
        q4_unit_regs(q, L, u, v);
        const int nv = full ? 8 : 2;
        const int64_t off_u = unit_offset(L, u);
        __m256i s16[NMAX], odd[NMAX];  // two sums per row: at one row a single chain of vpdpbusd waits on its latency
        for (int r = 0; r < NB; r++) s16[r] = odd[r] = _mm256_setzero_si256();
        for (int i = 0; i < nv; i += 2)
            for (int r = 0; r < NB; r++) {
                const uint8_t *a = P->aq + (r0 + r) * L->bytes + off_u + 32 * i;
                s16[r] = DOT_U8(s16[r], v[i], _mm256_load_si256((const __m256i *)a));
                odd[r] = DOT_U8(odd[r], v[i + 1], _mm256_load_si256((const __m256i *)(a + 32)));
            }
        for (int r = 0; r < NB; r++) s16[r] = ADD_SUMS(s16[r], odd[r]);  // 8 x 2 x 15 x 127 fits int16
        const int64_t g = full ? u * SB : L->nsb * SB + 2 * (u - L->nsb);
        const __m256 sc = full ? lanes8(w->scale, base + g, w->half) : lanes2(w->scale, base, g, w->groups, w->half);
        __m256 mf = _mm256_setzero_ps();
        if (mins) {
            if (w->min) mf = full ? lanes8(w->min, base + g, w->half) : lanes2(w->min, base, g, w->groups, w->half);
            if (w->offset) mf = _mm256_add_ps(mf, _mm256_mul_ps(off, sc));
        }
        for (int r = 0; r < NB; r++) {
            const float *da = P->da + (r0 + r) * das + u * 8;
            const __m256 sd = _mm256_mul_ps(sc, _mm256_loadu_ps(da));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(WIDEN16(s16[r])), sd, acc[r]);
            if (mins) acc[r] = _mm256_fmadd_ps(mf, _mm256_loadu_ps(P->xl + (r0 + r) * das + u * 8), acc[r]);
        }
    }
}

// acc[r] (+)= row o . input rows r0..r0 + NB - 1 (int8 weights in natural order, streamed; the
// min term, if any, is added by the caller). sfb: row o's scales (one per group); sd: scratch
// for the products of scales and the input rows' block scales (groups of 16 or 32).
static inline __attribute__((always_inline)) void V(s8_stream_rows)(const weights *w, const prepared *P, int64_t o,
                                                                int64_t r0, const int NB, const float *sfb,
                                                                float *sd, __m256 acc[NMAX]) {
    const int8_t *q = (const int8_t *)w->q + o * w->kp;
    const int64_t nblk = P->L.nblk, kp = w->kp;
    const int8_t *qn = P->qn + r0 * kp;
    if (w->group > 32) {  // a scale per several blocks (per output channel: one): applied per group
        const int64_t blocks = w->group / 32;
        for (int64_t g = 0; g < w->groups; g++) {
            __m256 a0[NMAX], a1[NMAX];  // even and odd blocks: two FMA chains per row
            for (int r = 0; r < NB; r++) a0[r] = a1[r] = _mm256_setzero_ps();
            for (int64_t b = g * blocks; b < (g + 1) * blocks; b++) {
                if ((b & 1) == 0) _mm_prefetch((const char *)q + b * 32 + AHEAD, _MM_HINT_T0);
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + b * 32));
                const __m256i wa = _mm256_sign_epi8(wv, wv);
                for (int r = 0; r < NB; r++) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(qn + r * kp + b * 32));
                    const __m256i p = DOT_S8(_mm256_setzero_si256(), wa, _mm256_sign_epi8(a, wv));
                    const __m256 dv = _mm256_broadcast_ss(P->d + (r0 + r) * nblk + b);
                    if (b & 1)
                        a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, a1[r]);
                    else
                        a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, a0[r]);
                }
            }
            const __m256 sv = _mm256_broadcast_ss(sfb + g);
            for (int r = 0; r < NB; r++) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(a0[r], a1[r]), sv, acc[r]);
        }
        return;
    }
    const int g16 = w->group == 16, per = g16 ? 2 : 1;
    const int64_t sds = per * nblk + 8;  // sd's row stride
    for (int r = 0; r < NB; r++) {  // sd[r][j] = scale j * the input row's scale of j's block
        const float *d = P->d + (r0 + r) * nblk;
        float *t = sd + r * sds;
        if (g16)
            for (int64_t j = 0; j < 2 * nblk; j++) t[j] = sfb[j] * d[j / 2];
        else
            for (int64_t j = 0; j < nblk; j++) t[j] = sfb[j] * d[j];
    }
    __m256 a0[NMAX], a1[NMAX];  // even and odd blocks: two FMA chains per row
    for (int r = 0; r < NB; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; b++) {
        if ((b & 1) == 0) _mm_prefetch((const char *)q + b * 32 + AHEAD, _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(q + b * 32));
        const __m256i wa = _mm256_sign_epi8(wv, wv);
        for (int r = 0; r < NB; r++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(qn + r * kp + b * 32));
            const __m256i p = DOT_S8(_mm256_setzero_si256(), wa, _mm256_sign_epi8(a, wv));
            const float *t = sd + r * sds + per * b;
            const __m256 sv = g16 ? _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(t)),
                                                         _mm_broadcast_ss(t + 1), 1)
                                  : _mm256_broadcast_ss(t);
            if (b & 1)
                a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, a1[r]);
            else
                a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, a0[r]);
        }
    }
    for (int r = 0; r < NB; r++) acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(a0[r], a1[r]));
}

// 1 to NMAX input rows: each weight row is read once from memory (output rows split over the
// threads in contiguous runs of passes of 4 rows) and multiplied by the input rows 4 at a time
// (a row's bytes stay in L1 for the next 4); a pass's four sums per input row are reduced together.
static void V(stream_int)(const weights *w, const prepared *P, float *y, int64_t ldy, int64_t out, int accumulate,
                       int threads) {
    const int64_t n = P->n, passes = (out + 3) / 4;
    const int s8 = !w->q4, mins = s8 && (w->min != NULL || w->offset != 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t nblk = P->L.nblk;
        float *sf = alloc(sizeof(float) * (2 * nblk + 8)), *mf = alloc(sizeof(float) * 4 * w->g8);
        float *tmp = alloc(sizeof(float) * (w->groups + 16)), *sd = alloc(sizeof(float) * 4 * (2 * nblk + 8));
        __m256 acc[4][NMAX];
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < passes; p++) {
            const int64_t o0 = p * 4;
            const int rows = out - o0 < 4 ? (int)(out - o0) : 4;
            for (int c = 0; c < 4; c++)
                for (int r = 0; r < NMAX; r++) acc[c][r] = _mm256_setzero_ps();
            for (int c = 0; c < rows; c++) {
                const int64_t o = o0 + c;
                if (s8) {  // the row's scales
                    widen((const char *)w->scale + o * w->groups * (w->half ? 2 : 4), w->groups, w->half, sf);
                    if (mins) min_factors(w, o, mf + c * w->g8, tmp);
                }
                for (int64_t r0 = 0; r0 < n; r0 += 4) {
                    const int nb = n - r0 < 4 ? (int)(n - r0) : 4;
                    __m256 *a = acc[c] + r0;
                    if (s8) {
                        switch (nb) {
                            case 1: V(s8_stream_rows)(w, P, o, r0, 1, sf, sd, a); break;
                            case 2: V(s8_stream_rows)(w, P, o, r0, 2, sf, sd, a); break;
                            case 3: V(s8_stream_rows)(w, P, o, r0, 3, sf, sd, a); break;
                            default: V(s8_stream_rows)(w, P, o, r0, 4, sf, sd, a); break;
                        }
                    } else {
                        switch (nb) {
                            case 1: V(q4_stream_rows)(w, P, o, r0, 1, a); break;
                            case 2: V(q4_stream_rows)(w, P, o, r0, 2, a); break;
                            case 3: V(q4_stream_rows)(w, P, o, r0, 3, a); break;
                            default: V(q4_stream_rows)(w, P, o, r0, 4, a); break;
                        }
                    }
                }
            }
            for (int64_t r = 0; r < n; r++) {
                __m128 v = hsum4(acc[0][r], acc[1][r], acc[2][r], acc[3][r]);
                if (mins) {
                    float m[4] = {0, 0, 0, 0};
                    for (int c = 0; c < rows; c++) m[c] = dot8(mf + c * w->g8, P->xs + r * w->g8, w->g8);
                    v = _mm_add_ps(v, _mm_loadu_ps(m));
                }
                store4(y + r * ldy + o0, v, rows, accumulate);
            }
        }
        free(sf);
        free(mf);
        free(tmp);
        free(sd);
    }
}

// acc[c][r] (+)= arranged weight rows wp + c * ws . arranged input rows ap + r * as, every unit,
// for WR x NB rows (constants after inlining): integer sums per unit, scaled by the lanes' weight
// scales sw + c * sws (group 16: 16 a unit) times input scales da + r * das, plus (mw not NULL)
// the lanes' min factors mw + c * das times the inputs' block sums xl + r * das. With VNNI, int8
// weights meet inputs stored plus 128 (unsigned): each sum starts from the weight rows' -128 x
// their lanes' sums, nc + c * ncs (per unit 8 int32, group 16: 16), and takes one vpdpbusd.
static inline __attribute__((always_inline)) void V(batch_tile)(
    const int s8, const int g16, const int WR, const int NB, const ulayout *L, const uint8_t *wp, int64_t ws,
    const uint8_t *ap, int64_t as, const float *sw, int64_t sws, const float *mw, const float *da,
    const float *xl, int64_t das, const int32_t *nc, int64_t ncs, __m256 acc[4][8]) {
    const int per = g16 ? 16 : 8;
#if !VNNI
    (void)nc, (void)ncs;
#endif
    for (int c = 0; c < WR; c++)
        for (int r = 0; r < NB; r++) acc[c][r] = _mm256_setzero_ps();
    for (int64_t u = 0; u < L->units; u++) {
        const int nv = u < L->nsb ? 8 : 2;
        const int64_t off = unit_offset(L, u);
        const uint8_t *wu = wp + off, *au = ap + off;
        __m256i sum[4][8][2];
        for (int c = 0; c < WR; c++) {
            __m256i start0 = _mm256_setzero_si256(), start1 = start0;
#if VNNI
            if (s8) {
                start0 = _mm256_loadu_si256((const __m256i *)(nc + c * ncs + u * per));
                if (g16) start1 = _mm256_loadu_si256((const __m256i *)(nc + c * ncs + u * per + 8));
            }
#endif
            for (int r = 0; r < NB; r++) {
                sum[c][r][0] = start0;
                sum[c][r][1] = start1;
            }
        }
#pragma GCC unroll 2  // fully unrolled, GCC computes every product before summing (spills)
        for (int i = 0; i < nv; i++) {
            const int h = g16 ? (i & 1) : 0;
            __m256i av[8];  // the input rows' vector i, then one weight row's at a time: NB + WR x NB + 1 registers
            for (int r = 0; r < NB; r++) av[r] = _mm256_load_si256((const __m256i *)(au + r * as + 32 * i));
            for (int c = 0; c < WR; c++) {
                const __m256i wv = _mm256_load_si256((const __m256i *)(wu + c * ws + 32 * i));
                if (s8) {
#if VNNI
                    for (int r = 0; r < NB; r++) sum[c][r][h] = _mm256_dpbusd_epi32(sum[c][r][h], av[r], wv);
#else
                    const __m256i wa = _mm256_sign_epi8(wv, wv);
                    for (int r = 0; r < NB; r++) sum[c][r][h] = DOT_S8(sum[c][r][h], wa, _mm256_sign_epi8(av[r], wv));
#endif
                } else {  // 4-bit: int16 sums over the unit (8 x 2 x 15 x 127 fits), widened below
                    for (int r = 0; r < NB; r++)
                        sum[c][r][0] = DOT_U8(sum[c][r][0], wv, av[r]);
                }
            }
        }
        for (int c = 0; c < WR; c++) {
            const __m256 sc = _mm256_loadu_ps(sw + c * sws + u * per);
            const __m256 sh = g16 ? _mm256_loadu_ps(sw + c * sws + u * per + 8) : sc;
            const __m256 mc = mw ? _mm256_loadu_ps(mw + c * das + u * 8) : sc;
            for (int r = 0; r < NB; r++) {
                const __m256 dv = _mm256_loadu_ps(da + r * das + u * 8);
                const __m256i i0 = s8 ? sum[c][r][0] : WIDEN16(sum[c][r][0]);
                acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(sc, dv), acc[c][r]);
                if (g16)
                    acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[c][r][1]), _mm256_mul_ps(sh, dv), acc[c][r]);
                if (mw) acc[c][r] = _mm256_fmadd_ps(mc, _mm256_loadu_ps(xl + r * das + u * 8), acc[c][r]);
            }
        }
    }
}

// The tile shapes. AVX2 (16 vector registers): 4-bit 4 weight rows x 2 input rows (8 int16 sums,
// 2 input vectors, 1 weight vector), int8 2 x 4 (8 int32 sums, 4 + 2), int8 in groups of 16 2 x 2
// (two sums each). AVX-512 VL (32 registers): 4 x 4 for both, groups of 16 2 x 4.
#if VNNI
#define Q4_WR 4
#define Q4_NB 4
#define S8_WR 4
#define S8_NB 4
#define G16_WR 2
#define G16_NB 4
#else
#define Q4_WR 4
#define Q4_NB 2
#define S8_WR 2
#define S8_NB 4
#define G16_WR 2
#define G16_NB 2
#endif

// More rows: PANEL_I weight rows arranged once (every unit) with their lane scales, then multiplied
// by every input row in register tiles; the panel stays in L1/L2 while the input rows pass.
static void V(batched_int)(const weights *w, const prepared *P, float *y, int64_t ldy, int64_t out, int accumulate,
                        int threads) {
    const ulayout *L = &P->L;
    const int64_t n = P->n, das = L->units * 8, panels = (out + PANEL_I - 1) / PANEL_I;
    const int64_t rowbytes = w->q4 ? w->kp / 2 : w->kp;
    const int kind = w->q4 ? 0 : (w->group == 16 ? 2 : 1);
    const int WR = kind == 0 ? Q4_WR : kind == 1 ? S8_WR : G16_WR;
    const int NB = kind == 0 ? Q4_NB : kind == 1 ? S8_NB : G16_NB;
    const int lanes = P->xl != NULL;  // the min term by lanes (groups of 32), else by group sums
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        uint8_t *panel = alloc((size_t)PANEL_I * L->bytes);
        float *sw = alloc(sizeof(float) * PANEL_I * P->sws), *mf = alloc(sizeof(float) * PANEL_I * w->g8);
        float *mw = lanes ? alloc(sizeof(float) * PANEL_I * das) : NULL;
        float *tmp = alloc(sizeof(float) * (2 * L->nblk + 2 * w->groups + 16));
        // VNNI, int8 weights: -128 x each lane's weight sum, the start of its integer sums
        int32_t *nc = VNNI && !w->q4 ? alloc(sizeof(int32_t) * PANEL_I * P->sws) : NULL;
        memset(panel, 0, (size_t)PANEL_I * L->bytes);
        if (nc) memset(nc, 0, sizeof(int32_t) * PANEL_I * P->sws);
        __m256 acc[4][8];
#pragma omp for schedule(static) nowait
        for (int64_t p = 0; p < panels; p++) {
            const int64_t o0 = p * PANEL_I;
            const int rows = out - o0 < PANEL_I ? (int)(out - o0) : PANEL_I;
            for (int c = 0; c < PANEL_I; c++) {
                if (c >= rows) {  // a missing row: zero scales (its stale bytes then add nothing)
                    memset(sw + c * P->sws, 0, sizeof(float) * P->sws);
                    if (lanes) memset(mw + c * das, 0, sizeof(float) * das);
                    continue;
                }
                const int64_t o = o0 + c;
                if (o + PANEL_I < out) {  // the next panel's row, while this one is multiplied
                    const char *next = (const char *)w->q + (o + PANEL_I) * rowbytes;
                    for (int64_t b = 0; b < rowbytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
                }
                for (int64_t u = 0; u < L->units; u++)
                    arrange_weights(w, L, o, u, panel + c * L->bytes + unit_offset(L, u));
#if VNNI
                if (nc) {
                    const int g16 = w->group == 16, per = g16 ? 16 : 8;
                    const __m256i c128 = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
                    for (int64_t u = 0; u < L->units; u++) {
                        const uint8_t *wu = panel + c * L->bytes + unit_offset(L, u);
                        __m256i sums[2] = {zero, zero};
                        for (int i = 0; i < (u < L->nsb ? 8 : 2); i++) {
                            const __m256i wv = _mm256_load_si256((const __m256i *)(wu + 32 * i));
                            sums[g16 ? (i & 1) : 0] = _mm256_dpbusd_epi32(sums[g16 ? (i & 1) : 0], c128, wv);
                        }
                        int32_t *dst = nc + c * P->sws + u * per;
                        _mm256_storeu_si256((__m256i *)dst, _mm256_sub_epi32(zero, sums[0]));
                        if (g16) _mm256_storeu_si256((__m256i *)(dst + 8), _mm256_sub_epi32(zero, sums[1]));
                    }
                }
#endif
                if (w->group == 32) {  // scales (and min + offset * scale) by lanes, straight from the row
                    float *sc = sw + c * P->sws;
                    group_lanes(w->scale, w->half, o * w->groups, w->groups, L, sc);
                    if (lanes) {
                        float *m = mw + c * das;
                        if (w->min)
                            group_lanes(w->min, w->half, o * w->groups, w->groups, L, m);
                        else
                            memset(m, 0, sizeof(float) * das);
                        if (w->offset) {
                            const __m256 off = _mm256_set1_ps((float)w->offset);
                            for (int64_t i = 0; i < das; i += 8)
                                _mm256_storeu_ps(m + i, _mm256_add_ps(_mm256_loadu_ps(m + i),
                                                                      _mm256_mul_ps(off, _mm256_loadu_ps(sc + i))));
                        }
                    }
                } else {
                    unit_scales(w, L, o, sw + c * P->sws, tmp);
                }
                if (!lanes && P->xs) min_factors(w, o, mf + c * w->g8, tmp);
            }
            for (int64_t r0 = 0; r0 < n; r0 += NB) {
                const int nb = n - r0 < NB ? (int)(n - r0) : NB;
                const uint8_t *ap = P->aq + r0 * L->bytes;
                const float *da = P->da + r0 * das, *xl = lanes ? P->xl + r0 * das : NULL;
                for (int c0 = 0; c0 < rows; c0 += WR) {
                    const uint8_t *wp = panel + c0 * L->bytes;
                    const float *s = sw + c0 * P->sws, *m = lanes ? mw + c0 * das : NULL;
#define TILE(K, WR_, NB_) \
    V(batch_tile)(K != 0, K == 2, WR_, NB_, L, wp, L->bytes, ap, L->bytes, s, P->sws, m, da, xl, das, \
                  nc ? nc + c0 * P->sws : NULL, P->sws, acc)
#define TILES(K, WR_, NBMAX)                                 \
    switch (nb) {                                            \
        case 1: TILE(K, WR_, 1); break;                      \
        case 2: TILE(K, WR_, 2 < NBMAX ? 2 : NBMAX); break; \
        case 3: TILE(K, WR_, 3 < NBMAX ? 3 : NBMAX); break; \
        case 4: TILE(K, WR_, 4 < NBMAX ? 4 : NBMAX); break; \
        case 5: TILE(K, WR_, 5 < NBMAX ? 5 : NBMAX); break; \
        default: TILE(K, WR_, NBMAX); break;                 \
    }
                    if (kind == 0) {
                        TILES(0, Q4_WR, Q4_NB)
                    } else if (kind == 1) {
                        TILES(1, S8_WR, S8_NB)
                    } else {
                        TILES(2, G16_WR, G16_NB)
                    }
#undef TILES
#undef TILE
                    const int count = rows - c0 < WR ? rows - c0 : WR;
                    for (int r = 0; r < nb; r++) {
                        const __m256 z = _mm256_setzero_ps();
                        __m128 v = hsum4(acc[0][r], WR > 1 ? acc[1][r] : z, WR > 2 ? acc[2][r] : z,
                                         WR > 3 ? acc[3][r] : z);
                        if (!lanes && P->xs) {
                            float m4[4] = {0, 0, 0, 0};
                            for (int c = 0; c < count; c++)
                                m4[c] = dot8(mf + (c0 + c) * w->g8, P->xs + (r0 + r) * w->g8, w->g8);
                            v = _mm_add_ps(v, _mm_loadu_ps(m4));
                        }
                        store4(y + (r0 + r) * ldy + o0 + c0, v, count, accumulate);
                    }
                }
            }
        }
        free(panel);
        free(sw);
        free(mf);
        free(mw);
        free(tmp);
        free(nc);
    }
}

static int V(run_int)(const weights *w, const float *x, int64_t n, int64_t ldx, int64_t k, float *y, int64_t ldy,
                   int64_t out, int accumulate, int threads) {
    if (n <= 0 || out <= 0) return 0;
    if (threads < 1) threads = 1;
    prepared P;
    const ulayout L = layout_of(w->kp);
    P.L = L;
    P.n = n;
    P.sws = L.units * (w->group == 16 ? 16 : 8);
    const int mins = w->min != NULL || w->offset != 0, streamed = n <= NMAX;
    const int arranged = !streamed || w->q4;  // the natural order serves streamed int8
    // the min term by lanes (groups of 32, arranged), else by group sums (xs)
    const int lanes = mins && arranged && w->group == 32;
    int8_t *qn = alloc((size_t)n * w->kp);
    float *d = alloc(sizeof(float) * n * L.nblk), *xp = alloc(sizeof(float) * w->kp);
    uint8_t *aq = arranged ? alloc((size_t)n * L.bytes) : NULL;
    float *da = arranged ? alloc(sizeof(float) * n * L.units * 8) : NULL;
    float *xs = mins && !lanes ? alloc(sizeof(float) * n * w->g8) : NULL;
    float *xl = lanes ? alloc(sizeof(float) * n * L.units * 8) : NULL;
    const int rc = !qn || !d || !xp || (arranged && (!aq || !da)) || (mins && !lanes && !xs) || (lanes && !xl);
    if (!rc) {
        for (int64_t r = 0; r < n; r++) {
            memcpy(xp, x + r * ldx, sizeof(float) * k);
            memset(xp + k, 0, sizeof(float) * (w->kp - k));
            quantize_row(xp, L.nblk, qn + r * w->kp, d + r * L.nblk);
            prepare_row(w, &L, qn + r * w->kp, d + r * L.nblk, arranged ? aq + r * L.bytes : NULL,
                        arranged ? da + r * L.units * 8 : NULL, xs ? xs + r * w->g8 : NULL,
                        xl ? xl + r * L.units * 8 : NULL);
        }
#if VNNI
        if (!w->q4 && !streamed)  // int8 weights on the batched path: the inputs plus 128, unsigned
            for (int64_t i = 0; i < n * L.bytes; i += 32) {
                const __m256i v = _mm256_load_si256((const __m256i *)(aq + i));
                _mm256_store_si256((__m256i *)(aq + i), _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)));
            }
#endif
        P.qn = qn;
        P.d = d;
        P.aq = aq;
        P.da = da;
        P.xs = xs;
        P.xl = xl;
        if (streamed)
            V(stream_int)(w, &P, y, ldy, out, accumulate, threads);
        else
            V(batched_int)(w, &P, y, ldy, out, accumulate, threads);
    }
    free(qn);
    free(d);
    free(xp);
    free(aq);
    free(da);
    free(xs);
    free(xl);
    return rc;
}

#undef Q4_WR
#undef Q4_NB
#undef S8_WR
#undef S8_NB
#undef G16_WR
#undef G16_NB
#undef DOT_U8
#undef ADD_SUMS
#undef WIDEN16
#undef DOT_S8

#endif  // QUANT_INT_VARIANT
