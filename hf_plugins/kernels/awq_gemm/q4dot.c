/* Integer-code x int8 dot-product GEMM for CPUs: y[m, n] = sum_k x[m, k] * (q[n, k] - z[g, n]) * s[g, n], with
 * 4-bit codes (AWQ W<=4, two per byte) or up to 8-bit codes (W5..W8, one per byte: the "wide" layout).
 *
 * Built on the user's machine on first use (see hf_plugins/kernels/_native.py) with -O3 -march=native, so the
 * same source takes AVX2 (vpmaddubsw), AVX-VNNI or AVX512-VNNI (vpdpbusd) where the CPU has them, and a plain C
 * loop elsewhere. The weights stay at 4 bits; the activations are quantized per 64-input block to int8 with one
 * fp32 scale (as llama.cpp's q8 blocks) and the rounding remainder again (LEVELS); the group's zero term uses
 * the exact fp32 sum of the group's inputs.
 *
 * Layouts (all row-major, contiguous):
 *   x      float [M, K]         activations
 *   codes  uint8 [N, K / 2]     for column n, byte j of each 32-byte chunk c holds k = 64c + j in its low nibble
 *                               and k = 64c + 32 + j in its high nibble
 *   or     uint8 [N, K]         wide: one code per byte, in input order
 *   scales float [N, G]         s[g, n] stored per column, G = ceil(K / group)
 *   szeros float [N, G]         z[g, n] * s[g, n]
 *   y      float [M, N]
 * Requirements (checked by the caller): K % 64 == 0, group % 64 == 0.
 *
 * `bits` is the code width (1..8): up to 4 the codes are packed two per byte, else wide.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 64
#define ROW_TILE 4
#define COLUMN_TILE 16
/* int8 levels per activation row: the second rounds the first's remainder, max relative error ~2e-5 instead of ~7e-3
 * for 30-50% more arithmetic, so greedy tokens match the exact fp32 route. */
#define LEVELS 2
/* AVX2 without VNNI multiplies 8-bit codes by int16 activations of one level (vpmaddwd): vpmaddubsw's int16 pair
 * sums would saturate (255 * 127 * 2), and one int16 level (max relative error ~1.5e-5) is as exact as two int8
 * levels. A row's int16 activations take the bytes of its two int8 levels. */
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
#define WIDE_INT16 1
#else
#define WIDE_INT16 0
#endif

#if defined(__AVX2__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Loads `in` [BLOCK] into v; returns max |in|; `*sum` gets the sum of `in` when `sum` is not NULL. */
static inline float load_block(const float *in, __m256 v[BLOCK / 8], float *sum) {
    __m256 amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < BLOCK / 8; ++i) {
        v[i] = _mm256_loadu_ps(in + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        total = _mm256_add_ps(total, v[i]);
    }
    if (sum) *sum = hsum(total);
    return hmax(amax);
}

/* Rounds `in` [BLOCK] to int8 `out` with one scale, returned (rounding to nearest even, as lrintf); `in` keeps the
 * rounding remainder when `residual`; `*sum` gets the sum of `in` when `sum` is not NULL. */
static float quantize_block(float *in, int8_t *out, int residual, float *sum) {
    __m256 v[BLOCK / 8];
    const float top = load_block(in, v, sum), d = top / 127.0f;
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f), scale = _mm256_set1_ps(d);
    /* packs interleave the 128-bit lanes: this puts the eight 4-byte runs back in input order. */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < BLOCK / 8; i += 4) {
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
            q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + j], inv));
            if (residual)
                _mm256_storeu_ps(in + 8 * (i + j), _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q[j]), scale, v[i + j]));
        }
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(out + 8 * i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    return d;
}

/* As quantize_block, to int16 in one level (for WIDE_INT16). */
static float quantize_block16(const float *in, int16_t *out, float *sum) {
    __m256 v[BLOCK / 8];
    const float top = load_block(in, v, sum);
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    for (int i = 0; i < BLOCK / 8; i += 2) {
        const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv));
        /* packs interleaves the 128-bit lanes; the permute restores input order. */
        const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(out + 8 * i), words);
    }
    return top / 32767.0f;
}
#else
/* As the AVX2 version above. */
static float quantize_block(float *in, int8_t *out, int residual, float *sum) {
    float amax = 0.0f, total = 0.0f;
    for (int k = 0; k < BLOCK; ++k) {
        const float a = fabsf(in[k]);
        amax = a > amax ? a : amax;
        total += in[k];
    }
    if (sum) *sum = total;
    const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int k = 0; k < BLOCK; ++k) {
        out[k] = (int8_t)lrintf(in[k] * inv);
        if (residual) in[k] -= d * (float)out[k];
    }
    return d;
}
#endif

/* Per row m: group sums xsum [M, G], and LEVELS int8 rows m * LEVELS + l (xq [M * LEVELS, K], one scale per 64-block
 * in dx [M * LEVELS, K / 64]) whose scaled sum approximates the row: level 0 rounds the row, level 1 its rounding
 * remainder. With `int16`, one int16 row in the bytes of the two (scales in the level-0 rows of dx). */
static void quantize_rows(const float *x, int64_t rows, int64_t K, int64_t group, int8_t *xq, float *dx,
                          float *xsum, int int16) {
    const int64_t blocks = K / BLOCK, groups = (K + group - 1) / group;
    float work[BLOCK];
    for (int64_t m = 0; m < rows; ++m) {
        const float *row = x + m * K;
        for (int64_t g = 0; g < groups; ++g) xsum[m * groups + g] = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) {
            float block_sum;
#if WIDE_INT16
            if (int16) {
                int16_t *out = (int16_t *)(xq + m * LEVELS * K) + b * BLOCK;
                dx[m * LEVELS * blocks + b] = quantize_block16(row + b * BLOCK, out, &block_sum);
                xsum[m * groups + b * BLOCK / group] += block_sum;
                continue;
            }
#endif
            memcpy(work, row + b * BLOCK, sizeof(work));
            for (int l = 0; l < LEVELS; ++l) {
                const int64_t v = m * LEVELS + l;
                dx[v * blocks + b] =
                    quantize_block(work, xq + v * K + b * BLOCK, l + 1 < LEVELS, l == 0 ? &block_sum : NULL);
            }
            xsum[m * groups + b * BLOCK / group] += block_sum;
        }
    }
}

#if defined(__AVX2__)
/* Eight int32 lanes of sum(lo * a) + sum(hi * b) over 64 unsigned codes and 64 int8 activations: 4-bit codes
 * (wide 0), or bytes (wide 1; 8-bit codes only with VNNI, see WIDE_INT16). */
static inline __attribute__((always_inline)) __m256i dot64(const int wide, __m256i lo, __m256i hi,
                                                          const int8_t *xq) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i b = _mm256_loadu_si256((const __m256i *)(xq + 32));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a), hi, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a), hi, b);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    /* Up to 7-bit codes one int16 pair sum fits (127 * 127 * 2 = 32258), two would not: each widens on its own. */
    if (wide)
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, a), ones),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, b), ones));
    /* 15 * 127 * 2 per 16-bit lane, twice: 7620, no saturation. */
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a), _mm256_maddubs_epi16(hi, b));
    return _mm256_madd_epi16(pairs, ones);
#endif
}

/* Eight int32 lanes of sum(codes * a) over 64 8-bit codes and 64 int16 activations (WIDE_INT16): pairs of at most
 * 255 * 32767 * 2, four per lane. */
static inline __m256i dot64_int16(const uint8_t *codes, const int16_t *a) {
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < BLOCK; j += 16) {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + j)));
        total = _mm256_add_epi32(total, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(a + j))));
    }
    return total;
}

/* `R` rows from r0 times `NC` columns from n0: R * NC independent accumulator chains (R * NC <= 4 keeps the
 * accumulators, the group partial sums and the unpacked codes within AVX2's 16 vector registers). */
static inline __attribute__((always_inline)) void tile(const int R, const int NC, const int wide, const uint8_t *codes,
                                                       const float *scales, const float *szeros, const int8_t *xq,
                                                       const float *dx, const float *xsum, int64_t r0, int64_t n0,
                                                       int64_t K, int64_t group, float *y, int64_t N) {
    const int64_t blocks = K / BLOCK, groups = (K + group - 1) / group, per_group = group / BLOCK;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc[R * NC], part[R * NC];
    for (int i = 0; i < R * NC; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = g * per_group, last = first + per_group < blocks ? first + per_group : blocks;
        for (int i = 0; i < R * NC; ++i) part[i] = _mm256_setzero_ps();
        for (int64_t b = first; b < last; ++b) {
            for (int c = 0; c < NC; ++c) {
                if (WIDE_INT16 && wide == 2) {
                    const uint8_t *chunk = codes + (n0 + c) * K + b * BLOCK;
                    for (int r = 0; r < R; ++r) {
                        const int64_t v = (r0 + r) * LEVELS;
                        const __m256 dot = _mm256_cvtepi32_ps(dot64_int16(chunk, (const int16_t *)(xq + v * K) + b * BLOCK));
                        part[r * NC + c] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(dx + v * blocks + b),
                                                           part[r * NC + c]);
                    }
                    continue;
                }
                __m256i lo, hi;
                if (wide) {
                    const uint8_t *chunk = codes + (n0 + c) * K + b * BLOCK;
                    lo = _mm256_loadu_si256((const __m256i *)chunk);
                    hi = _mm256_loadu_si256((const __m256i *)(chunk + BLOCK / 2));
                } else {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + (n0 + c) * (K / 2) + b * (BLOCK / 2)));
                    lo = _mm256_and_si256(v, mask);
                    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
                for (int r = 0; r < R; ++r)
                    for (int l = 0; l < LEVELS; ++l) {
                        const int64_t v = (r0 + r) * LEVELS + l;
                        const __m256 dot = _mm256_cvtepi32_ps(dot64(wide, lo, hi, xq + v * K + b * BLOCK));
                        part[r * NC + c] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(dx + v * blocks + b),
                                                           part[r * NC + c]);
                    }
            }
        }
        for (int c = 0; c < NC; ++c) {
            const __m256 scale = _mm256_broadcast_ss(scales + (n0 + c) * groups + g);
            for (int r = 0; r < R; ++r) acc[r * NC + c] = _mm256_fmadd_ps(part[r * NC + c], scale, acc[r * NC + c]);
        }
    }
    for (int r = 0; r < R; ++r) {
        const int64_t m = r0 + r;
        for (int c = 0; c < NC; ++c) {
            const float *sz = szeros + (n0 + c) * groups;
            float zero_term = 0.0f;
            for (int64_t g = 0; g < groups; ++g) zero_term += sz[g] * xsum[m * groups + g];
            y[m * N + n0 + c] = hsum(acc[r * NC + c]) - zero_term;
        }
    }
}

/* Rows r0 .. r0 + rows (rows <= ROW_TILE) for columns n0 .. n0 + COLUMN_TILE (or to N). */
static inline __attribute__((always_inline)) void column_tile_of(const int wide, const uint8_t *codes,
                                                                 const float *scales, const float *szeros,
                                                                 const int8_t *xq, const float *dx, const float *xsum,
                                                                 int64_t r0, int rows, int64_t n0, int64_t K,
                                                                 int64_t group, float *y, int64_t N) {
    const int64_t n1 = n0 + COLUMN_TILE < N ? n0 + COLUMN_TILE : N;
    int64_t n = n0;
    if (rows == 1)
        for (; n + 4 <= n1; n += 4) tile(1, 4, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N);
    if (rows == 2)
        for (; n + 2 <= n1; n += 2) tile(2, 2, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N);
    for (; n < n1; ++n) switch (rows) {
            case 1: tile(1, 1, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N); break;
            case 2: tile(2, 1, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N); break;
            case 3: tile(3, 1, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N); break;
            default: tile(4, 1, wide, codes, scales, szeros, xq, dx, xsum, r0, n, K, group, y, N); break;
        }
}

static void column_tile(int wide, const uint8_t *codes, const float *scales, const float *szeros, const int8_t *xq,
                        const float *dx, const float *xsum, int64_t r0, int rows, int64_t n0, int64_t K,
                        int64_t group, float *y, int64_t N) {
    if (wide == 2)
        column_tile_of(2, codes, scales, szeros, xq, dx, xsum, r0, rows, n0, K, group, y, N);
    else if (wide == 1)
        column_tile_of(1, codes, scales, szeros, xq, dx, xsum, r0, rows, n0, K, group, y, N);
    else
        column_tile_of(0, codes, scales, szeros, xq, dx, xsum, r0, rows, n0, K, group, y, N);
}
#else
static void column_tile(int wide, const uint8_t *codes, const float *scales, const float *szeros, const int8_t *xq,
                        const float *dx, const float *xsum, int64_t r0, int rows, int64_t n0, int64_t K,
                        int64_t group, float *y, int64_t N) {
    const int64_t blocks = K / BLOCK, groups = (K + group - 1) / group, per_group = group / BLOCK;
    const int64_t n1 = n0 + COLUMN_TILE < N ? n0 + COLUMN_TILE : N;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *col = codes + n * (wide ? K : K / 2);
        for (int r = 0; r < rows; ++r) {
            const int64_t m = r0 + r;
            float total = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t first = g * per_group, last = first + per_group < blocks ? first + per_group : blocks;
                float part = 0.0f;
                for (int64_t b = first; b < last; ++b)
                    for (int l = 0; l < LEVELS; ++l) {
                        const int64_t v = m * LEVELS + l;
                        const int8_t *a = xq + v * K + b * BLOCK;
                        int32_t dot = 0;
                        if (wide) {
                            const uint8_t *chunk = col + b * BLOCK;
                            for (int j = 0; j < BLOCK; ++j) dot += chunk[j] * a[j];
                        } else {
                            const uint8_t *chunk = col + b * (BLOCK / 2);
                            for (int j = 0; j < BLOCK / 2; ++j) dot += (chunk[j] & 0x0F) * a[j] + (chunk[j] >> 4) * a[j + 32];
                        }
                        part += (float)dot * dx[v * blocks + b];
                    }
                total += part * scales[n * groups + g] - szeros[n * groups + g] * xsum[m * groups + g];
            }
            y[m * N + n] = total;
        }
    }
}
#endif

/* Returns 0, or -1 when the scratch rows cannot be allocated (y is then untouched). */
int q4dot_gemm(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scales,
               const float *szeros, int64_t N, int64_t group, int bits, float *y, int threads) {
    const int64_t groups = (K + group - 1) / group;
    /* Scratch for the quantized rows: block scales, group sums, int8 codes (a few KiB per row). */
    float *dx = malloc(sizeof(float) * (LEVELS * M * (K / BLOCK) + M * groups) + LEVELS * M * K);
    if (!dx) return -1;
    float *xsum = dx + LEVELS * M * (K / BLOCK);
    int8_t *xq = (int8_t *)(xsum + M * groups);
    /* 0: nibbles; 1: bytes of 5..7 bits; 2: bytes of 8 bits (see WIDE_INT16). */
    const int wide = bits <= 4 ? 0 : bits < 8 ? 1 : 2;
    quantize_rows(x, M, K, group, xq, dx, xsum, WIDE_INT16 && wide == 2);
    /* Small layers run on one thread: waking the pool costs more than their few microseconds of work. */
    if (N * K * M < (1 << 19)) threads = 1;
    const int64_t tiles = (N + COLUMN_TILE - 1) / COLUMN_TILE;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t t = 0; t < tiles; ++t)
        for (int64_t r0 = 0; r0 < M; r0 += ROW_TILE) {
            const int rows = M - r0 < ROW_TILE ? (int)(M - r0) : ROW_TILE;
            column_tile(wide, codes, scales, szeros, xq, dx, xsum, r0, rows, t * COLUMN_TILE, K, group, y, N);
        }
    free(dx);
    return 0;
}

/* Dequantize columns n0 .. n1 to fp32 rows w [n1 - n0, K] (w[n, k] = q * s - z * s): one pass over the codes, for
 * the many-row products, which multiply these cache-sized slabs with sgemm. */
void q4dot_dequant(const uint8_t *codes, const float *scales, const float *szeros, int64_t K, int64_t group,
                   int bits, int64_t n0, int64_t n1, float *w) {
    const int64_t groups = (K + group - 1) / group;
    const int wide = bits > 4;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *col = codes + n * (wide ? K : K / 2);
        float *out = w + (n - n0) * K;
        for (int64_t c = 0; c < K / BLOCK; ++c) {
            const int64_t g = c * BLOCK / group;
            const float s = scales[n * groups + g], sz = szeros[n * groups + g];
            float *lo = out + c * BLOCK, *hi = lo + BLOCK / 2;
            if (wide) {
                const uint8_t *chunk = col + c * BLOCK;
                for (int j = 0; j < BLOCK; ++j) lo[j] = (float)chunk[j] * s - sz;
                continue;
            }
            const uint8_t *chunk = col + c * (BLOCK / 2);
            for (int j = 0; j < BLOCK / 2; ++j) {
                lo[j] = (float)(chunk[j] & 0x0F) * s - sz;
                hi[j] = (float)(chunk[j] >> 4) * s - sz;
            }
        }
    }
}
