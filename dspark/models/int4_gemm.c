/* Weight-only 4- and 8-bit GEMMs for CPU decoding (AVX2 + FMA): float32 activations times GGUF Q4_0 / Q4_1
 * weights, read as 4-bit codes (a quarter of fp16's bytes), or Q8_0 weights (8-bit codes, the LM head of
 * most Q4 files), dequantized in registers.
 *
 * The model it runs: each weight is w = fl(d * q + m) in float32 (q the 4-bit code, d and m the
 * group's scale and offset from the file: Q4_1 stores them, Q4_0 has m = -8 d), which are the file's
 * weights exactly (d * q is exact in float32, the one rounding is the add); activations and sums stay in
 * float32. Every output (row r, column n) is one accumulation chain, always the same operations in the
 * same order: for each group g of 32 inputs, for each 8-lane part j, acc = fma(w_j, x_j, acc); then a
 * fixed horizontal sum. Blocks of rows and columns only decide how many chains run side by side, so a
 * row gets the same bits whether it is alone in the call or one of 96 (greedy speculative decoding
 * needs that: a token verified with 7 others must get the logits it gets decoded alone). Threads split
 * the columns, which does not change any chain either.
 *
 * Built at first use by dspark/models/int4_gemm.py with the system C compiler (-march=native).
 */

#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the int4 GEMM needs AVX2 and FMA"
#endif

#define GROUP 32

static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); /* a0+a4 .. a3+a7 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                       /* (0+4)+(2+6), (1+5)+(3+7) */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 codes of sub-vector j (0..3) of a group: lo holds elements 0..15 (low nibbles), hi 16..31 */
static inline __m256 codes8(__m128i lo, __m128i hi, int j) {
    __m128i v = j < 2 ? lo : hi;
    if (j & 1) v = _mm_srli_si128(v, 8);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

#define KERNEL(R, C)                                                                                  \
static void kern_##R##_##C(int64_t G, const uint8_t *codes, const float *d, const float *m,          \
                           const float *x, int64_t xs, float *y, int64_t ys) {                       \
    __m256 acc[R][C];                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();         \
    const __m128i m15 = _mm_set1_epi8(15);                                                            \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        __m128i lo[C], hi[C];                                                                         \
        __m256 dv[C], mv[C];                                                                          \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) {                                         \
            __m128i b = _mm_loadu_si128((const __m128i *)(codes + (c * G + g) * 16));                 \
            lo[c] = _mm_and_si128(b, m15);                                                            \
            hi[c] = _mm_and_si128(_mm_srli_epi16(b, 4), m15);                                         \
            dv[c] = _mm256_broadcast_ss(d + c * G + g);                                               \
            mv[c] = _mm256_broadcast_ss(m + c * G + g);                                               \
        }                                                                                             \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                                           \
            _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) {                                     \
                __m256 w = _mm256_fmadd_ps(dv[c], codes8(lo[c], hi[c], j), mv[c]);                    \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
                    acc[r][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * xs + g * GROUP + j * 8), acc[r][c]); \
            }                                                                                         \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) y[r * ys + c] = hsum(acc[r][c]);         \
}
KERNEL(8, 1)
KERNEL(4, 1)
KERNEL(4, 2)
KERNEL(2, 2)
KERNEL(1, 4)
KERNEL(2, 1)
KERNEL(1, 1)

/* Q8_0: 32 signed bytes per group, w = fl(d * q) (exact in float32). Same chains as above. */
#define KERNEL8(R, C)                                                                                 \
static void k8_##R##_##C(int64_t G, const uint8_t *codes, const float *d, const float *m,             \
                         const float *x, int64_t xs, float *y, int64_t ys) {                          \
    (void)m;                                                                                          \
    __m256 acc[R][C];                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();         \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        __m256 dv[C];                                                                                 \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) dv[c] = _mm256_broadcast_ss(d + c * G + g); \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                                           \
            _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) {                                     \
                __m128i b = _mm_loadl_epi64((const __m128i *)(codes + (c * G + g) * GROUP + j * 8));  \
                __m256 w = _mm256_mul_ps(dv[c], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));         \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                   \
                    acc[r][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * xs + g * GROUP + j * 8), acc[r][c]); \
            }                                                                                         \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 4") for (int c = 0; c < C; c++) y[r * ys + c] = hsum(acc[r][c]);         \
}
KERNEL8(8, 1)
KERNEL8(4, 1)
KERNEL8(4, 2)
KERNEL8(2, 2)
KERNEL8(1, 4)
KERNEL8(2, 1)
KERNEL8(1, 1)

/* The block shapes of one weight format, from most rows to one. */
typedef void (*kern_fn)(int64_t, const uint8_t *, const float *, const float *, const float *, int64_t, float *,
                        int64_t);
struct kernels { kern_fn r8c1, r4c1, r4c2, r2c2, r1c4, r2c1, r1c1; };
static const struct kernels Q4 = {kern_8_1, kern_4_1, kern_4_2, kern_2_2, kern_1_4, kern_2_1, kern_1_1};
static const struct kernels Q8 = {k8_8_1, k8_4_1, k8_4_2, k8_2_2, k8_1_4, k8_2_1, k8_1_1};

/* y = x @ W^T for one format: `group_bytes` code bytes per group of 32 weights (16 for Q4, 32 for Q8). */
static int run(const struct kernels *k, int64_t group_bytes, int64_t M, int64_t N, int64_t K, const float *x,
               int64_t xs, const uint8_t *codes, const float *d, const float *m, float *y, int64_t ys,
               int64_t threads) {
    if (K % GROUP || M < 0 || N < 0) return -1;
    int64_t G = K / GROUP, row = G * group_bytes;
    int64_t NB = (N + 3) / 4; /* blocks of 4 outputs */
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t nb = 0; nb < NB; nb++) {
        int64_t n = nb * 4;
        const uint8_t *cn = codes + n * row;
        const float *dn = d + n * G, *mn = m + n * G;
        const float *xr = x;
        float *yr = y + n;
        int64_t r = 0;
        if (N - n >= 4) {
            /* every (row, output) is one accumulation chain whose operations do not depend on the block
             * shape: the shapes only decide how many chains run side by side */
            for (; r + 8 <= M; r += 8, xr += 8 * xs, yr += 8 * ys)
                for (int c = 0; c < 4; c++) k->r8c1(G, cn + c * row, dn + c * G, mn + c * G, xr, xs, yr + c, ys);
            for (; r + 4 <= M; r += 4, xr += 4 * xs, yr += 4 * ys)
                for (int c = 0; c < 4; c += 2) k->r4c2(G, cn + c * row, dn + c * G, mn + c * G, xr, xs, yr + c, ys);
            for (; r + 2 <= M; r += 2, xr += 2 * xs, yr += 2 * ys)
                for (int c = 0; c < 4; c += 2) k->r2c2(G, cn + c * row, dn + c * G, mn + c * G, xr, xs, yr + c, ys);
            for (; r < M; r++, xr += xs, yr += ys) k->r1c4(G, cn, dn, mn, xr, xs, yr, ys);
        } else {
            for (int64_t c = 0; c < N - n; c++) {
                const uint8_t *cc = cn + c * row;
                const float *dc = dn + c * G, *mc = mn + c * G;
                for (r = 0; r + 8 <= M; r += 8) k->r8c1(G, cc, dc, mc, x + r * xs, xs, y + r * ys + n + c, ys);
                for (; r + 4 <= M; r += 4) k->r4c1(G, cc, dc, mc, x + r * xs, xs, y + r * ys + n + c, ys);
                for (; r + 2 <= M; r += 2) k->r2c1(G, cc, dc, mc, x + r * xs, xs, y + r * ys + n + c, ys);
                for (; r < M; r++) k->r1c1(G, cc, dc, mc, x + r * xs, xs, y + r * ys + n + c, ys);
            }
        }
    }
    return 0;
}

/* y[M, N] (row stride ys) = x[M, K] (row stride xs) @ W^T, with W[n, k] = fl(d[n, g] * code[n, k] + m[n, g]),
 * g = k / 32. codes: [N][K / 32][16] bytes, byte j of a group holding element j (low nibble) and j + 16
 * (high nibble), as GGUF's Q4_0 / Q4_1 blocks store them. d, m: [N][K / 32] float32.
 * Returns 0, or -1 when K is not a multiple of 32. */
int dspark_int4_mm(int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const uint8_t *codes,
                   const float *d, const float *m, float *y, int64_t ys, int64_t threads) {
    return run(&Q4, 16, M, N, K, x, xs, codes, d, m, y, ys, threads);
}

/* y[M, N] = x[M, K] @ W^T with W[n, k] = fl(d[n, k / 32] * codes[n, k]): GGUF Q8_0 (codes int8 [N][K]).
 * The same arguments as dspark_int4_mm; m is not read (Q8_0 has no offset). Returns 0, or -1 when K is
 * not a multiple of 32. */
int dspark_int8_mm(int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const int8_t *codes,
                   const float *d, const float *m, float *y, int64_t ys, int64_t threads) {
    return run(&Q8, GROUP, M, N, K, x, xs, (const uint8_t *)codes, d, m, y, ys, threads);
}
