// Weight-only quantized linear layers for batches of 1 to 64 rows on AVX2/FMA (quant_cpu.py).
//
//   y[n, o] = sum_k x[n, k] * w[o, k]        (or y += ... with accumulate)
//
// The quantized bytes are streamed once per output row and dequantized in registers; the row's
// bytes stay in L1 while every tile of up to 4 batch rows reads them. Output rows are split over
// OpenMP threads. Weight layouts (k padded to kp, a multiple of 32, with zeros):
//
//   int8:  q int8 [out, kp];  w = q * scale[o, k / group] (+ min[o, k / group] when min is not
//          NULL)                                          (group: 16 or a multiple of 32)
//   4-bit: q uint8 [out, kp/2], per group of 32 weights 16 bytes: byte j holds weight j in its
//          low nibble and weight j + 16 in its high nibble (GGUF's Q4_0/Q4_1 layout);
//          w = (q + offset) * scale[o, k / 32] (+ min[o, k / 32] when min is not NULL)
//
// Scales and mins are float32, or float16 (half != 0: widened exactly with F16C).
//
// Each weight is computed with the same float32 operations, in the same order, as the Python
// reference dequantizers (multiply, then add: built with -ffp-contract=off), so the weights
// equal those dequantized tensors exactly; only the dot products' summation order differs.
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4  // batch rows per tile

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

// ---------------------------------------------------------------------------------------- int8

static inline float q8_scalar(const int8_t *qr, int64_t kk, const void *sr, const void *mr,
                              int64_t group, int half) {
    float w = (float)qr[kk] * at(sr, kk / group, half);
    return mr ? w + at(mr, kk / group, half) : w;
}

static inline __attribute__((always_inline)) void q8_tile(
    const float *x, int64_t ldx, int64_t k, const int8_t *qr, const void *sr, const void *mr,
    int64_t group, int half, float *y, int64_t ldy, int accumulate, const int nb) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < nb; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t k32 = k & ~(int64_t)31;
    for (int64_t kk = 0; kk < k32; kk += 32) {
        __m256 s[4], m[4];  // per 8 weights: a group of 16 changes scale halfway through the 32
        const int per8 = group < 32;  // else one scale (and min) for all 32: read once
        for (int v = 0; v < 4; v++) {
            if (v > 0 && !per8) {
                s[v] = s[0], m[v] = m[0];
                continue;
            }
            const int64_t g = (kk + 8 * v) / group;
            s[v] = _mm256_set1_ps(at(sr, g, half));
            m[v] = _mm256_set1_ps(mr ? at(mr, g, half) : 0.0f);
        }
        for (int v = 0; v < 4; v++) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(qr + kk + 8 * v));
            __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s[v]);
            if (mr) w = _mm256_add_ps(w, m[v]);
            for (int r = 0; r < nb; r++)
                acc[r][v & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * ldx + kk + 8 * v), acc[r][v & 1]);
        }
    }
    for (int r = 0; r < nb; r++) {
        float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int64_t kk = k32; kk < k; kk++) sum += q8_scalar(qr, kk, sr, mr, group, half) * x[r * ldx + kk];
        store(y + r * ldy, sum, accumulate);
    }
}

int q8_linear(const float *x, int64_t n, int64_t ldx, int64_t k, const int8_t *q, int64_t kp,
              const void *scale, const void *min, int64_t group, int half, float *y, int64_t ldy,
              int64_t out, int accumulate, int threads) {
    const int64_t groups = kp / group;
    const int64_t bytes = half ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *qr = q + o * kp;
        const void *sr = (const char *)scale + o * groups * bytes;
        const void *mr = min ? (const char *)min + o * groups * bytes : 0;
        for (int64_t n0 = 0; n0 < n; n0 += ROWS) {
            const float *xr = x + n0 * ldx;
            float *yr = y + n0 * ldy + o;
            switch (n - n0 < ROWS ? n - n0 : ROWS) {
                case 1: q8_tile(xr, ldx, k, qr, sr, mr, group, half, yr, ldy, accumulate, 1); break;
                case 2: q8_tile(xr, ldx, k, qr, sr, mr, group, half, yr, ldy, accumulate, 2); break;
                case 3: q8_tile(xr, ldx, k, qr, sr, mr, group, half, yr, ldy, accumulate, 3); break;
                default: q8_tile(xr, ldx, k, qr, sr, mr, group, half, yr, ldy, accumulate, 4); break;
            }
        }
    }
    return 0;
}

static inline float q4_scalar(const uint8_t *qr, int64_t kk, int offset, const void *sr, const void *mr,
                              int half) {
    const int64_t g = kk / 32, j = kk % 32;
    const uint8_t byte = qr[g * 16 + (j & 15)];
    const int value = (j < 16 ? byte & 15 : byte >> 4) + offset;
    float w = (float)value * at(sr, g, half);
    return mr ? w + at(mr, g, half) : w;
}

static inline __attribute__((always_inline)) void q4_tile(
    const float *x, int64_t ldx, int64_t k, const uint8_t *qr, const void *sr, const void *mr,
    int offset, int half, float *y, int64_t ldy, int accumulate, const int nb) {
    __m256 acc[ROWS][2];
    for (int r = 0; r < nb; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t k32 = k & ~(int64_t)31;
    const __m128i low4 = _mm_set1_epi8(15);
    const __m256i off = _mm256_set1_epi32(offset);
    for (int64_t kk = 0; kk < k32; kk += 32) {
        const int64_t g = kk / 32;
        const __m256 s = _mm256_set1_ps(at(sr, g, half));
        const __m256 m = _mm256_set1_ps(mr ? at(mr, g, half) : 0.0f);
        const __m128i b = _mm_loadu_si128((const __m128i *)(qr + g * 16));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        const __m128i nibbles[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int v = 0; v < 4; v++) {
            __m256i i = _mm256_add_epi32(_mm256_cvtepu8_epi32(nibbles[v]), off);
            __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(i), s);
            if (mr) w = _mm256_add_ps(w, m);
            for (int r = 0; r < nb; r++)
                acc[r][v & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * ldx + kk + 8 * v), acc[r][v & 1]);
        }
    }
    for (int r = 0; r < nb; r++) {
        float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for (int64_t kk = k32; kk < k; kk++) sum += q4_scalar(qr, kk, offset, sr, mr, half) * x[r * ldx + kk];
        store(y + r * ldy, sum, accumulate);
    }
}

int q4_linear(const float *x, int64_t n, int64_t ldx, int64_t k, const uint8_t *q, int64_t kp,
              const void *scale, const void *min, int offset, int half, float *y, int64_t ldy,
              int64_t out, int accumulate, int threads) {
    const int64_t groups = kp / 32;
    const int64_t bytes = half ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *qr = q + o * (kp / 2);
        const void *sr = (const char *)scale + o * groups * bytes;
        const void *mr = min ? (const char *)min + o * groups * bytes : 0;
        for (int64_t n0 = 0; n0 < n; n0 += ROWS) {
            const float *xr = x + n0 * ldx;
            float *yr = y + n0 * ldy + o;
            switch (n - n0 < ROWS ? n - n0 : ROWS) {
                case 1: q4_tile(xr, ldx, k, qr, sr, mr, offset, half, yr, ldy, accumulate, 1); break;
                case 2: q4_tile(xr, ldx, k, qr, sr, mr, offset, half, yr, ldy, accumulate, 2); break;
                case 3: q4_tile(xr, ldx, k, qr, sr, mr, offset, half, yr, ldy, accumulate, 3); break;
                default: q4_tile(xr, ldx, k, qr, sr, mr, offset, half, yr, ldy, accumulate, 4); break;
            }
        }
    }
    return 0;
}
