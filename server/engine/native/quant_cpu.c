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
// Two paths, both splitting the output rows over OpenMP threads in contiguous runs (each thread
// streams one region of the packed bytes):
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
// No activation is quantized.
#include <immintrin.h>
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
