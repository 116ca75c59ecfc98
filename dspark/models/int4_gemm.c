/* Weight-only 4- and 8-bit GEMMs for CPU decoding (AVX2 + FMA; VNNI kernels where the CPU has them): float32 activations times GGUF Q4_0 / Q4_1
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
#include <string.h>
#include <math.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the int4 GEMM needs AVX2, FMA and F16C (every AVX2 CPU has F16C)"
#endif

#define GROUP 32

/* Work buffers, one set per calling thread, kept between calls and grown when a call needs more: a
 * decode step's buffers (up to ~150 KB a layer at 8 rows) would otherwise be mapped and zeroed by the
 * kernel on every call (glibc serves blocks over 128 KB with mmap). Each function that needs one uses
 * its own slot, so nested calls never share a buffer. They live as long as the thread (a few MB at
 * most: the largest prefill chunk's activations). */
enum { S_QX, S_DX, S_CX, S_H, S_T, S_GU, S_QKV, S_ATT, S_ROWQ, N_SCRATCH };
static __thread struct { void *p; size_t n; } scratch_buf[N_SCRATCH];

static void *scratch(int slot, size_t bytes) {
    if (bytes == 0) bytes = 1;
    if (scratch_buf[slot].n < bytes) {
        free(scratch_buf[slot].p);
        scratch_buf[slot].p = malloc(bytes);
        scratch_buf[slot].n = scratch_buf[slot].p ? bytes : 0;
    }
    return scratch_buf[slot].p;
}

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
KERNEL(7, 1)
KERNEL(6, 1)
KERNEL(5, 1)
KERNEL(4, 1)
KERNEL(4, 2)
KERNEL(3, 1)
KERNEL(3, 2)
KERNEL(2, 2)
KERNEL(1, 2)
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
KERNEL8(7, 1)
KERNEL8(6, 1)
KERNEL8(5, 1)
KERNEL8(4, 1)
KERNEL8(4, 2)
KERNEL8(3, 1)
KERNEL8(3, 2)
KERNEL8(2, 2)
KERNEL8(1, 2)
KERNEL8(2, 1)
KERNEL8(1, 1)

/* The block shapes of one weight format: by1[R] runs R rows x 1 output (R = 1..8); the wider ones share
 * an output block's rows between several outputs where registers allow. */
typedef void (*kern_fn)(int64_t, const uint8_t *, const float *, const float *, const float *, int64_t, float *,
                        int64_t);
struct kernels { kern_fn by1[9]; kern_fn r4c2, r3c2, r2c2, r1c2; };
static const struct kernels Q4 = {{0, kern_1_1, kern_2_1, kern_3_1, kern_4_1, kern_5_1, kern_6_1, kern_7_1, kern_8_1},
                                  kern_4_2, kern_3_2, kern_2_2, kern_1_2};
static const struct kernels Q8 = {{0, k8_1_1, k8_2_1, k8_3_1, k8_4_1, k8_5_1, k8_6_1, k8_7_1, k8_8_1},
                                  k8_4_2, k8_3_2, k8_2_2, k8_1_2};

/* y = x @ W^T for one format: `group_bytes` code bytes per group of 32 weights (16 for Q4, 32 for Q8).
 * Rows go 8 at a time, then the 1..7 left in one pass (each pass converts the codes once: verifying
 * 3..7 tokens costs one pass, not up to three). */
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
        int64_t cols = N - n < 4 ? N - n : 4;
        /* every (row, output) is one accumulation chain whose operations do not depend on the block
         * shape: the shapes only decide how many chains run side by side */
        int64_t r = 0;
        for (; r + 8 <= M; r += 8)
            for (int64_t c = 0; c < cols; c++)
                k->by1[8](G, cn + c * row, dn + c * G, mn + c * G, x + r * xs, xs, y + r * ys + n + c, ys);
        int64_t rem = M - r;
        if (rem == 0) continue;
        const float *xr = x + r * xs;
        float *yr = y + r * ys + n;
        if (cols == 4 && rem <= 4) {
            /* one row: 2 outputs at a time (4 kept the codes of 4 outputs live and spilled registers:
             * 1.15-1.2x slower over SmolLM2's 30 layers) */
            kern_fn f = rem == 4 ? k->r4c2 : rem == 3 ? k->r3c2 : rem == 2 ? k->r2c2 : k->r1c2;
            for (int c = 0; c < 4; c += 2) f(G, cn + c * row, dn + c * G, mn + c * G, xr, xs, yr + c, ys);
        } else {
            for (int64_t c = 0; c < cols; c++)
                k->by1[rem](G, cn + c * row, dn + c * G, mn + c * G, xr, xs, yr + c, ys);
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

/* ---- 8-bit activations (llama.cpp's numerics) --------------------------------------------------------
 * The same weights, with each activation row quantized per group of 32 to 8-bit integers first:
 * dx = max|x| / 127, qx = round-half-even(x / dx) (all 0 when max|x| = 0), sx = dx * sum(qx). A group's
 * dot product is then integer: sum(q * qx) exactly (AVX2's maddubs/madd), and
 *     y = sum over groups of fl(d * dx) * sum(q * qx)   (one 8-lane float chain, then the fixed hsum)
 *       + sum over groups of m * sx                      (one scalar chain, group order)
 * for Q4_0 / Q4_1 (Q4_0's m = -8 d), and the first term alone for Q8_0 (signed codes: |w| times the
 * activations with w's sign). This is what llama.cpp computes for these types (Q8_1 / Q8_0 activations),
 * with its own rounding details. Per-row quantization and fixed chains keep a row's bits independent of
 * the other rows in the call, as above. Fewer instructions per weight than converting 4-bit codes to
 * float: 1.5-2x faster at 1-8 rows here. */

static void quant_row8(int64_t K, const float *x, int8_t *q, float *dx, float *sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / GROUP; g++) {
        const float *xg = x + g * GROUP;
        __m256 v[4], a = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xg + j * 8);
            a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i i32[4];
        for (int j = 0; j < 4; j++)
            i32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* sum of the codes (exact in int32) */
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* pack 32 int32 -> 32 int8 in element order */
        __m256i p01 = _mm256_packs_epi32(i32[0], i32[1]), p23 = _mm256_packs_epi32(i32[2], i32[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + g * GROUP), p);
        dx[g] = d;
        sx[g] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* 32 codes of a Q4 group as bytes in element order: low nibbles (elements 0..15), then high (16..31) */
static inline __m256i q4bytes(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(v, _mm256_set1_epi8(15));
}

/* The scales of 4 outputs side by side, group by group (`sc4`): for outputs n..n+3 (a block) and group
 * g, 8 floats d[n..n+3, g], m[n..n+3, g] (Q4: SC = 8) or 4 floats d[n..n+3, g] (Q8_0: SC = 4), so one
 * load reads a block's scales for a group; the last block is padded with zeros. */

/* R rows x 4 outputs (columns n..n+3 of W). Per group g and row r: p_c = madd(maddubs(w_c, qx_r), 1)
 * holds 8 exact int32 partial sums of output c (elements 4i..4i+3 in lane i); two rounds of hadd put
 * sum(elements 0..15) of output c in lane c and sum(16..31) in lane c + 4, exactly. One float chain per
 * row and lane: acc = fma(float(those sums), fl(d_c * dx_r), acc), then (Q4, lanes 0..3 only)
 * acc = fma(m_c, sx_r, acc). Output c is lane c + lane c + 4. A lane's operations do not depend on R or
 * on the other outputs, so a row gets the same bits in any call. */
/* Codes are prefetched PFB blocks of 4 outputs ahead: at one row the kernel streams weights faster than
 * the hardware prefetcher fetches them (a SmolLM2 decode step 9.75 -> 8.5 ms here, median of 3 A/B pairs) */
#ifndef PFB
#define PFB 4
#endif
/* The four outputs' int16 pair sums (maddubs) -> int32 lane c = elements 0..15 of output c, lane c + 4
 * = elements 16..31. Q8_0 (|pair| up to 2 * 128 * 127): each to int32 first (madd), then two rounds of
 * hadd. Q4 (|pair| <= 2 * 15 * 127 = 3810): two rounds of int16 hadd (sums of 8 products, <= 15240,
 * no overflow), then one madd: 8 instructions instead of 11, the same exact integers. */
#define SUM4_MADD(m0, m1, m2, m3, ones)                                                                \
    _mm256_hadd_epi32(_mm256_hadd_epi32(_mm256_madd_epi16(m0, ones), _mm256_madd_epi16(m1, ones)),    \
                      _mm256_hadd_epi32(_mm256_madd_epi16(m2, ones), _mm256_madd_epi16(m3, ones)))
#define SUM4_HADD16(m0, m1, m2, m3, ones)                                                              \
    _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(m0, m1), _mm256_hadd_epi16(m2, m3)), ones)
#define QKERNEL(NAME, R, LOADW, DOT, SC, SUM4)                                                        \
static void NAME##_##R(int64_t G, const uint8_t *codes, int64_t gb, int64_t row, const float *sc4,    \
                       const int8_t *qx, int64_t qs, const float *dx, const float *sx, int64_t ds,     \
                       float *y, int64_t ys) {                                                         \
    __m256 acc[R];                                                                                    \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                \
    const __m256i ones = _mm256_set1_epi16(1);                                                        \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        if (PFB && (g * gb) % 64 == 0) /* the same bytes PFB blocks of 4 outputs ahead */             \
            for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(codes + (4 * PFB + c) * row + g * gb), _MM_HINT_T0); \
        __m256i w0 = LOADW(codes + g * gb), w1 = LOADW(codes + row + g * gb);                         \
        __m256i w2 = LOADW(codes + 2 * row + g * gb), w3 = LOADW(codes + 3 * row + g * gb);           \
        __m256 dw, mw;                                                                                \
        if (SC == 8) {                                                                                \
            __m256 dm = _mm256_loadu_ps(sc4 + g * 8);                                                 \
            dw = _mm256_permute2f128_ps(dm, dm, 0x00);   /* d0..d3 | d0..d3 */                        \
            mw = _mm256_permute2f128_ps(dm, dm, 0x81);   /* m0..m3 | 0 */                             \
        } else {                                                                                      \
            dw = _mm256_broadcast_ps((const __m128 *)(sc4 + g * 4));                                  \
            mw = _mm256_setzero_ps();                                                                 \
        }                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                         \
            __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + r * qs + g * GROUP));              \
            __m256i s = SUM4(DOT(w0, xv), DOT(w1, xv), DOT(w2, xv), DOT(w3, xv), ones);                 \
            __m256 sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(dx + r * ds + g));                      \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);                              \
            if (SC == 8) acc[r] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(sx + r * ds + g), acc[r]);  \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                               \
        _mm_storeu_ps(y + r * ys, _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1))); \
}
#define Q4DOT(w, x) _mm256_maddubs_epi16(w, x)
#define Q8LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define Q8DOT(w, x) _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
QKERNEL(qa4, 4, q4bytes, Q4DOT, 8, SUM4_HADD16)
QKERNEL(qa4, 3, q4bytes, Q4DOT, 8, SUM4_HADD16)
QKERNEL(qa4, 2, q4bytes, Q4DOT, 8, SUM4_HADD16)
QKERNEL(qa4, 1, q4bytes, Q4DOT, 8, SUM4_HADD16)
QKERNEL(qa8, 4, Q8LOAD, Q8DOT, 4, SUM4_MADD)
QKERNEL(qa8, 3, Q8LOAD, Q8DOT, 4, SUM4_MADD)
QKERNEL(qa8, 2, Q8LOAD, Q8DOT, 4, SUM4_MADD)
QKERNEL(qa8, 1, Q8LOAD, Q8DOT, 4, SUM4_MADD)

typedef void (*qkern_fn)(int64_t, const uint8_t *, int64_t, int64_t, const float *, const int8_t *, int64_t,
                         const float *, const float *, int64_t, float *, int64_t);
static const qkern_fn QA4[5] = {0, qa4_1, qa4_2, qa4_3, qa4_4};
static const qkern_fn QA8[5] = {0, qa8_1, qa8_2, qa8_3, qa8_4};

/* One output of the chains above, one row at a time (the last N % 4 outputs, lane c of their block):
 * the same integer sums, the same float operations, so the same bits. */
static float qa_one(int64_t G, const uint8_t *codes, int64_t gb, int64_t SC, const float *sc4, int c,
                    const int8_t *qx, const float *dx, const float *sx) {
    float lo = 0.0f, hi = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *w = codes + g * gb;
        const int8_t *xq = qx + g * GROUP;
        int32_t a = 0, b = 0;
        for (int j = 0; j < 16; j++) {
            int wl = SC == 4 ? (int)(int8_t)w[j] : (w[j] & 15), wh = SC == 4 ? (int)(int8_t)w[16 + j] : (w[j] >> 4);
            a += wl * xq[j];
            b += wh * xq[16 + j];
        }
        float sc = sc4[g * SC + c] * dx[g];
        lo = fmaf((float)a, sc, lo);
        hi = fmaf((float)b, sc, hi);
        if (SC == 8) lo = fmaf(sc4[g * SC + 4 + c], sx[g], lo);
    }
    return lo + hi;
}

/* y[M, N] = x @ W^T with 8-bit activations. codes as for the float kernels; sc4: the scales by block. */
static int run_a8(const qkern_fn *k, int64_t SC, int64_t gb, int64_t M, int64_t N, int64_t K, const float *x,
                  int64_t xs, const uint8_t *codes, const float *sc4, float *y, int64_t ys, int64_t threads) {
    if (K % GROUP || M < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    int64_t G = K / GROUP, row = G * gb, bsc = G * SC; /* floats of scales per block */
    int8_t *qx = scratch(S_QX, (size_t)M * (size_t)K);
    float *dx = scratch(S_DX, sizeof(float) * (size_t)M * (size_t)G * 2);
    if (!qx || !dx) return -2;
    float *sx = dx + M * G;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
    for (int64_t r = 0; r < M; r++) quant_row8(K, x + r * xs, qx + r * K, dx + r * G, sx + r * G);
    int64_t NB = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t nb = 0; nb < NB; nb++) {
        int64_t n = nb * 4;
        for (int64_t r = 0; r < M; r += 4) {
            int64_t t = M - r < 4 ? M - r : 4;
            k[t](G, codes + n * row, gb, row, sc4 + nb * bsc, qx + r * K, K, dx + r * G, sx + r * G, G,
                 y + r * ys + n, ys);
        }
    }
    for (int64_t n = NB * 4; n < N; n++)
        for (int64_t r = 0; r < M; r++)
            y[r * ys + n] = qa_one(G, codes + n * row, gb, SC, sc4 + NB * bsc, (int)(n - NB * 4), qx + r * K,
                                   dx + r * G, sx + r * G);
    return 0;
}

/* ---- The same kernels on VNNI (AVX512-VNNI with VL, or AVX-VNNI) --------------------------------------
 * The same integers and the same float chains as qa4_* / qa8_* (so the same bits), in another weight
 * layout: 8 outputs interleaved by 4 bytes, so one vpdpbusd leaves each output's exact partial sum in
 * its own int32 lane and no horizontal sums are needed (the AVX2 kernels spend most of their
 * instructions on those). Layout ("il"), per block of 8 outputs n..n+7 and group g:
 *   Q4: 4 vectors of 32 bytes; vector t, lane o (bytes 4o..4o+3) = bytes 4t..4t+3 of output n+o's group
 *       (low nibbles: elements 4t..4t+3, high nibbles: 16+4t..16+4t+3);
 *   Q8_0: 8 vectors; vector t < 4, lane o = elements 4t..4t+3 of output n+o, vector 4 + t: elements
 *       16+4t..16+4t+3, each code stored + 128 (vpdpbusd multiplies unsigned by signed bytes; the
 *       128 * sum(qx) it adds is taken off exactly: each half's accumulator starts at -128 * sum(qx)).
 * Scales sc8, per block and group: d of the 8 outputs, then (Q4) their m. Per row and output: the
 * half-sums lo (elements 0..15) and hi (16..31), lo = fma(float(lo), fl(d * dx), lo), lo = fma(m, sx, lo),
 * hi = fma(float(hi), fl(d * dx), hi), y = lo + hi: what the AVX2 kernels do lane by lane. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define HAVE_VNNI 1
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

/* whether this build has the interleaved kernels (dspark_il_mm_a8) */
int dspark_has_vnni(void) { return HAVE_VNNI; }

#if HAVE_VNNI
#ifndef IL_ROWS
#define IL_ROWS 8
#endif

static inline int32_t four_bytes(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One kernel family for both register widths: V = Y (256-bit: one block of 8 outputs) or Z (512-bit:
 * blocks nb and nb + 1 side by side, the second block's codes bb bytes and scales bs floats further on).
 * Each lane does the same operations at either width, so the bits do not depend on it. */
#define Y_VI __m256i
#define Y_VF __m256
#define Y_ZEROF() _mm256_setzero_ps()
#define Y_ZEROI() _mm256_setzero_si256()
#define Y_AND(a, b) _mm256_and_si256(a, b)
#define Y_SHR4(a) _mm256_srli_epi16(a, 4)
#define Y_SET8(x) _mm256_set1_epi8(x)
#define Y_SET32(x) _mm256_set1_epi32(x)
#define Y_DP(acc, a, b) DPBUSD(acc, a, b)
#define Y_SETF(x) _mm256_set1_ps(x)
#define Y_MUL(a, b) _mm256_mul_ps(a, b)
#define Y_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define Y_CVT(a) _mm256_cvtepi32_ps(a)
#define Y_ADD(a, b) _mm256_add_ps(a, b)
#define Y_LOADI(p, bb) _mm256_loadu_si256((const __m256i *)(p))
#define Y_LOADF(p, bs) _mm256_loadu_ps(p)
#define Y_STORE(y, v) _mm256_storeu_ps(y, v)

/* Q4 (q8 = 0): per group 4 vectors of 32 code bytes, low nibbles elements 4t.., high 16 + 4t.., scales
 * d then m (16 floats); Q8_0 (q8 = 1): 8 vectors (codes + 128), scales d (8 floats), each half's
 * accumulator starting at -128 * sum(qx) of that half (cx). */
#define ILKERNEL(V, NAME, R, Q8)                                                                      \
static void NAME##_##R(int64_t G, const uint8_t *il, int64_t bb, const float *sc8, int64_t bs,          \
                       const int8_t *qx, int64_t qs, const float *dx, const float *sx, const int32_t *cx, \
                       int64_t ds, float *y, int64_t ys) {                                            \
    (void)bb; (void)bs; (void)sx; (void)cx;                                                           \
    V##_VF lo[R], hi[R];                                                                              \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) lo[r] = hi[r] = V##_ZEROF();                  \
    const V##_VI m15 = V##_SET8(15);                                                                  \
    const int64_t gb = Q8 ? 256 : 128, gs = Q8 ? 8 : 16;                                              \
    for (int64_t g = 0; g < G; g++) {                                                                 \
        V##_VI wl[4], wh[4];                                                                          \
        _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                         \
            if (Q8) {                                                                                 \
                wl[t] = V##_LOADI(il + g * gb + 32 * t, bb);                                          \
                wh[t] = V##_LOADI(il + g * gb + 32 * (4 + t), bb);                                    \
            } else {                                                                                  \
                V##_VI v = V##_LOADI(il + g * gb + 32 * t, bb);                                       \
                wl[t] = V##_AND(v, m15);                                                              \
                wh[t] = V##_AND(V##_SHR4(v), m15);                                                    \
            }                                                                                         \
        }                                                                                             \
        V##_VF dv = V##_LOADF(sc8 + g * gs, bs), mv = Q8 ? V##_ZEROF() : V##_LOADF(sc8 + g * gs + 8, bs); \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                         \
            const int8_t *xq = qx + r * qs + g * GROUP;                                               \
            V##_VI sl = Q8 ? V##_SET32(cx[(r * ds + g) * 2]) : V##_ZEROI();                           \
            V##_VI sh = Q8 ? V##_SET32(cx[(r * ds + g) * 2 + 1]) : V##_ZEROI();                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                     \
                sl = V##_DP(sl, wl[t], V##_SET32(four_bytes(xq + 4 * t)));                            \
                sh = V##_DP(sh, wh[t], V##_SET32(four_bytes(xq + 16 + 4 * t)));                       \
            }                                                                                         \
            V##_VF sc = V##_MUL(dv, V##_SETF(dx[r * ds + g]));                                        \
            lo[r] = V##_FMA(V##_CVT(sl), sc, lo[r]);                                                  \
            if (!Q8) lo[r] = V##_FMA(mv, V##_SETF(sx[r * ds + g]), lo[r]);                            \
            hi[r] = V##_FMA(V##_CVT(sh), sc, hi[r]);                                                  \
        }                                                                                             \
    }                                                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) V##_STORE(y + r * ys, V##_ADD(lo[r], hi[r])); \
}
#define ILKERNELS(V, NAME, Q8)                                                                        \
    ILKERNEL(V, NAME, 1, Q8) ILKERNEL(V, NAME, 2, Q8) ILKERNEL(V, NAME, 3, Q8) ILKERNEL(V, NAME, 4, Q8) \
    ILKERNEL(V, NAME, 5, Q8) ILKERNEL(V, NAME, 6, Q8) ILKERNEL(V, NAME, 7, Q8) ILKERNEL(V, NAME, 8, Q8) \
    static const ilkern_fn NAME[9] = {0, NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6,   \
                                      NAME##_7, NAME##_8};
/* il: the block's codes; sc8: its scales; (Z: the next block's at + bb, + bs); y: its outputs */
typedef void (*ilkern_fn)(int64_t, const uint8_t *, int64_t, const float *, int64_t, const int8_t *, int64_t,
                          const float *, const float *, const int32_t *, int64_t, float *, int64_t);
ILKERNELS(Y, IL4, 0)
ILKERNELS(Y, IL8, 1)

/* With AVX-512 (VNNI on 512-bit registers): two blocks of 8 outputs side by side in one register (16
 * lanes), so each row's activation broadcasts, conversions and float operations serve 16 outputs. */
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(NO_IL_ZMM)
#define HAVE_IL_ZMM 1
/* Only from this many rows: below it a step streams its weights from memory, and reading two blocks'
 * codes side by side was slower there (a SmolLM2 decode step 4.2-4.7 -> 5.5-5.6 ms, alternating builds),
 * while with many rows the kernel is bound by arithmetic and the wider registers gain 1.2-1.3x. */
#ifndef IL_ZMM_MIN_ROWS
#define IL_ZMM_MIN_ROWS 16
#endif
static inline __m512i join256i(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
static inline __m512 join256f(const float *a, const float *b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a))),
                                               _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}
static inline void store2x8(float *y, __m512 v) {
    _mm256_storeu_ps(y, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(y + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#define Z_VI __m512i
#define Z_VF __m512
#define Z_ZEROF() _mm512_setzero_ps()
#define Z_ZEROI() _mm512_setzero_si512()
#define Z_AND(a, b) _mm512_and_si512(a, b)
#define Z_SHR4(a) _mm512_srli_epi16(a, 4)
#define Z_SET8(x) _mm512_set1_epi8(x)
#define Z_SET32(x) _mm512_set1_epi32(x)
#define Z_DP(acc, a, b) _mm512_dpbusd_epi32(acc, a, b)
#define Z_SETF(x) _mm512_set1_ps(x)
#define Z_MUL(a, b) _mm512_mul_ps(a, b)
#define Z_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define Z_CVT(a) _mm512_cvtepi32_ps(a)
#define Z_ADD(a, b) _mm512_add_ps(a, b)
#define Z_LOADI(p, bb) join256i(p, (p) + (bb))
#define Z_LOADF(p, bs) join256f(p, (p) + (bs))
#define Z_STORE(y, v) store2x8(y, v)
ILKERNELS(Z, IL4Z_, 0)
ILKERNELS(Z, IL8Z_, 1)
#else
#define HAVE_IL_ZMM 0
#endif
#endif

/* y[M, N] (row stride ys) = x[M, K] (row stride xs) @ W^T on 8-bit activations, W in the interleaved
 * layout above (q8: Q8_0, else Q4; N a multiple of 8). The bits of dspark_int4_mm_a8 /
 * dspark_int8_mm_a8 on the same weights. Returns 0, -1 on bad sizes, -2 without memory, -3 when this
 * build has no VNNI. */
static int run_il(int64_t q8, int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const uint8_t *il,
                  const float *sc8, float *y, int64_t ys, int64_t threads) {
#if HAVE_VNNI
    if (K % GROUP || N % 8 || M < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    int64_t G = K / GROUP, bb = G * (q8 ? 256 : 128), bs = G * (q8 ? 8 : 16);
    int8_t *qx = scratch(S_QX, (size_t)M * (size_t)K);
    float *dx = scratch(S_DX, sizeof(float) * (size_t)M * (size_t)G * 2);
    int32_t *cx = scratch(S_CX, sizeof(int32_t) * (size_t)M * (size_t)G * 2);
    if (!qx || !dx || !cx) return -2;
    float *sx = dx + M * G;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
    for (int64_t r = 0; r < M; r++) {
        quant_row8(K, x + r * xs, qx + r * K, dx + r * G, sx + r * G);
        if (q8)
            for (int64_t g = 0; g < G; g++)
                for (int h = 0; h < 2; h++) {
                    int32_t s = 0;
                    for (int j = 0; j < 16; j++) s += qx[r * K + g * GROUP + h * 16 + j];
                    cx[(r * G + g) * 2 + h] = -128 * s;
                }
    }
    /* units of `step` blocks of 8 outputs: 2 on 512-bit registers from IL_ZMM_MIN_ROWS rows (an odd last
     * block on 256-bit ones), else 1 */
    const ilkern_fn *k = q8 ? IL8 : IL4, *kw = k;
    int64_t NB = N / 8, step = 1;
#if HAVE_IL_ZMM
    if (M >= IL_ZMM_MIN_ROWS) {
        kw = q8 ? IL8Z_ : IL4Z_;
        step = 2;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t u = 0; u < (NB + step - 1) / step; u++) {
        int64_t nb = u * step;
        const ilkern_fn *f = nb + step <= NB ? kw : k;
        for (int64_t r = 0; r < M; r += IL_ROWS) {
            int64_t t = M - r < IL_ROWS ? M - r : IL_ROWS;
            f[t](G, il + nb * bb, bb, sc8 + nb * bs, bs, qx + r * K, K, dx + r * G, sx + r * G, cx + r * G * 2, G,
                 y + r * ys + nb * 8, ys);
        }
    }
    return 0;
#else
    (void)q8; (void)M; (void)N; (void)K; (void)x; (void)xs; (void)il; (void)sc8; (void)y; (void)ys; (void)threads;
    return -3;
#endif
}

/* dspark_int4_mm_a8 (q8 = 0) or dspark_int8_mm_a8 (q8 = 1) on the interleaved layout: see run_il */
int dspark_il_mm_a8(int64_t q8, int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const uint8_t *il,
                    const float *sc8, float *y, int64_t ys, int64_t threads) {
    return run_il(q8, M, N, K, x, xs, il, sc8, y, ys, threads);
}

/* y[M, N] (row stride ys) = x[M, K] (row stride xs) @ W^T on 8-bit activations (see above), W a Q4
 * weight: codes as dspark_int4_mm takes them, scales and offsets as sc4 [ceil(N / 4)][K / 32][8] (see
 * above). Returns 0, -1 when K is not a multiple of 32, -2 without memory. */
int dspark_int4_mm_a8(int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const uint8_t *codes,
                      const float *sc4, float *y, int64_t ys, int64_t threads) {
    return run_a8(QA4, 8, 16, M, N, K, x, xs, codes, sc4, y, ys, threads);
}

/* The same for a Q8_0 weight: codes int8 [N][K], scales sc4 [ceil(N / 4)][K / 32][4]. */
int dspark_int8_mm_a8(int64_t M, int64_t N, int64_t K, const float *x, int64_t xs, const int8_t *codes,
                      const float *sc4, float *y, int64_t ys, int64_t threads) {
    return run_a8(QA8, 4, GROUP, M, N, K, x, xs, (const uint8_t *)codes, sc4, y, ys, threads);
}

/* ---- Fused decoder-layer parts on the Q4 GEMM ------------------------------------------------------
 * A decode step of a small model spends as long in its per-layer small ops (norms, RoPE, SiLU, residual
 * adds: a dozen torch calls a layer, each a few microseconds of dispatch) as in its weight GEMMs. These
 * two functions do the work before and after attention in one call each. Every op is per row, in a
 * fixed order, so a row gets the same bits whatever else is in the call (as the GEMM guarantees). */

/* out = x * (1 / sqrt(mean(x^2) + eps)) * w for one row of K floats (K a multiple of 8) */
static void rms_row(int64_t K, const float *x, const float *w, float eps, float *out) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < K; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        s = _mm256_fmadd_ps(v, v, s);
    }
    float inv = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(hsum(s) * (1.0f / (float)K) + eps)));
    __m256 iv = _mm256_set1_ps(inv);
    for (int64_t i = 0; i < K; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(w + i)));
}

/* x += t for one row of K floats (K a multiple of 8) */
static void add_row(int64_t K, float *x, const float *t) {
    for (int64_t i = 0; i < K; i += 8)
        _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(t + i)));
}

/* exp(x) for 8 floats: Cody-Waite range reduction and a degree-6 polynomial (Cephes' expf), within
 * 2 ulp over the float range; inputs below -87.3 give 0, above 88.7 are clamped. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.7f));
    __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* rows of [gate | up] (2 * I floats) -> silu(gate) * up (I floats), I a multiple of 8 */
static void silu_mul_row(int64_t I, const float *gu, float *out) {
    for (int64_t i = 0; i < I; i += 8) {
        __m256 g = _mm256_loadu_ps(gu + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(gu + I + i)));
    }
}

/* One Q4 projection as the layer functions take it: codes, scales, offsets, optional bias [N]. */
/* sc4: the scales and offsets by block of 4 outputs (see run_a8) when the projection runs on 8-bit
 * activations, else NULL */
/* q8: the codes are Q8_0's (int8 [N][K], scales only; sc4 required: 8-bit activations) */
/* il, sc8: the same weight in the VNNI kernels' layout (see run_il), used instead when set (the same bits) */
struct q4w { const uint8_t *codes; const float *d, *m, *sc4, *bias; int64_t n, q8; const uint8_t *il; const float *sc8; };

static int q4_mm(const struct q4w *w, int64_t M, int64_t K, const float *x, float *y, int64_t threads) {
    int rc = w->il && w->sc8 ? run_il(w->q8, M, w->n, K, x, K, w->il, w->sc8, y, w->n, threads)
           : w->q8 ? (w->sc4 ? run_a8(QA8, 4, GROUP, M, w->n, K, x, K, w->codes, w->sc4, y, w->n, threads) : -1)
           : w->sc4 ? run_a8(QA4, 8, 16, M, w->n, K, x, K, w->codes, w->sc4, y, w->n, threads)
                    : run(&Q4, 16, M, w->n, K, x, K, w->codes, w->d, w->m, y, w->n, threads);
    if (rc == 0 && w->bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t j = 0; j < w->n; j++) y[r * w->n + j] += w->bias[j];
    return rc;
}

/* Before attention: qkv[M, (Hr + Hv) * D] = RoPE(rmsnorm(x) @ Wqkv^T + b) on the first Hr heads (q and k
 * heads, pairs (2i, 2i + 1) rotated by rope[r, i] = (cos, sin)); the Hv value heads are left as they are.
 * x: [M, K] (row stride xs); w: the projection (w->n = N outputs). Returns 0, or -1 on bad sizes or no memory. */
int dspark_layer_in(int64_t M, int64_t K, const float *x, int64_t xs, const float *norm_w, float eps,
                    const struct q4w *w, const float *rope, int64_t Hr, int64_t D, float *qkv, int64_t threads) {
    int64_t N = w->n;
    if (K % GROUP || D % 8 || Hr * D > N || M < 0) return -1;
    float *h = scratch(S_H, sizeof(float) * (size_t)(M > 0 ? M : 1) * (size_t)K);
    if (!h) return -1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
    for (int64_t r = 0; r < M; r++) rms_row(K, x + r * xs, norm_w, eps, h + r * K);
    int rc = q4_mm(w, M, K, h, qkv, threads);
    if (rc) return rc;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
    for (int64_t r = 0; r < M; r++) {
        const float *cs = rope + r * D; /* D / 2 (cos, sin) pairs */
        for (int64_t hd = 0; hd < Hr; hd++) {
            float *v = qkv + r * N + hd * D;
            for (int64_t i = 0; i < D; i += 8) {
                __m256 a = _mm256_loadu_ps(v + i), c = _mm256_loadu_ps(cs + i);
                __m256 sw = _mm256_permute_ps(a, 0xB1); /* (b, a) pairs */
                __m256 re = _mm256_moveldup_ps(c), im = _mm256_movehdup_ps(c);
                /* even lanes a*cos - b*sin, odd lanes b*cos + a*sin */
                _mm256_storeu_ps(v + i, _mm256_fmaddsub_ps(a, re, _mm256_mul_ps(sw, im)));
            }
        }
    }
    return 0;
}

/* After attention, in place on x [M, K] (row stride xs): x += attn @ Wo^T + bo; then
 * x += (silu(g) * u) @ Wdown^T + bdown with [g | u] = rmsnorm(x) @ Wgu^T + bgu (I = gate width).
 * attn: [M, A] contiguous. Returns 0, or -1 on bad sizes or no memory. */
int dspark_layer_out(int64_t M, int64_t K, float *x, int64_t xs, const float *attn, int64_t A, const struct q4w *wo,
                     const float *norm_w, float eps, const struct q4w *wgu, int64_t I, const struct q4w *wdn,
                     int64_t threads) {
    if (K % GROUP || A % GROUP || I % GROUP || M < 0) return -1;
    size_t rows = (size_t)(M > 0 ? M : 1);
    float *t = scratch(S_T, sizeof(float) * rows * (size_t)K), *gu = scratch(S_GU, sizeof(float) * rows * (size_t)(3 * I));
    if (!t || !gu) return -1;
    float *act = gu + rows * (size_t)(2 * I);
    int rc = q4_mm(wo, M, A, attn, t, threads);
    if (rc == 0) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
        for (int64_t r = 0; r < M; r++) {
            add_row(K, x + r * xs, t + r * K);
            rms_row(K, x + r * xs, norm_w, eps, t + r * K);
        }
        rc = q4_mm(wgu, M, K, t, gu, threads);
    }
    if (rc == 0) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (M >= 16)
        for (int64_t r = 0; r < M; r++) silu_mul_row(I, gu + r * 2 * I, act + r * I);
        rc = q4_mm(wdn, M, I, act, t, threads);
    }
    if (rc == 0)
        for (int64_t r = 0; r < M; r++) add_row(K, x + r * xs, t + r * K);
    return rc;
}

/* ---- A whole decoder layer in one call ------------------------------------------------------------
 * dspark_layer_in, then each row's new key and value written into the KV cache, then attention by a row
 * kernel passed in (dspark_row_attention of row_attention.c: the same function the per-part path calls),
 * then dspark_layer_out. The same operations in the same order as the three calls with the cache write
 * and the attention call between them in Python, so the same bits; what it saves is the Python between
 * them (a dozen tensor ops and two library calls a layer, ~40 us). The layer's weights are described
 * once, in a struct built when the layer is set up. */

struct dspark_layer_weights {
    const float *norm_in, *norm_post;
    float eps;
    struct q4w qkv, o, gu, dn; /* qkv.n = (H + 2 Hkv) D, o.n = dn.n = K, gu.n = 2 I */
    int64_t K, H, Hkv, D, I;
};

/* k, v: float32, or float16 (kv_half) for dspark_row_attention_f16 */
typedef int (*row_attention_fn)(int64_t, int64_t, int64_t, int64_t, const float *, int64_t, int64_t, const void *,
                                const void *, int64_t, int64_t, int64_t, const int64_t *, const int64_t *,
                                const int64_t *, float *, int64_t, int64_t, float, int64_t);

/* float32 -> IEEE float16, rounding to nearest even (what torch's .half() does; F16C's vcvtps2ph with
 * rounding mode 0) */
static void to_half(int64_t n, const float *x, uint16_t *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

/* D values of row r's key (or value) into the cache at element offset `at`: copied, or rounded to float16 */
static inline void put_kv(void *cache, int64_t at, const float *src, int64_t D, int64_t kv_half) {
    if (kv_half)
        to_half(D, src, (uint16_t *)cache + at);
    else
        memcpy((float *)cache + at, src, sizeof(float) * (size_t)D);
}

/* x [M, K] contiguous, in place. rope [M, D / 2] (cos, sin) pairs. Row r of x is the token at position
 * row_len[r] - 1 of cache slot row_slot[r]; its key and value go there (k_cache / v_cache: slot, kv head,
 * position at the given strides, in elements; float32, or float16 when kv_half, rounded to nearest even,
 * with `attention` the kernel for that type), and it attends to positions 0 .. row_len[r] - 1 of that slot.
 * Returns 0, or the first failing part's code (-1 bad sizes, -2 no memory, else the attention's). */
int dspark_layer(const struct dspark_layer_weights *w, int64_t M, float *x, const float *rope, void *k_cache,
                 void *v_cache, int64_t slot_stride, int64_t head_stride, int64_t pos_stride, const int64_t *row_slot,
                 const int64_t *row_len, row_attention_fn attention, float scale, int64_t kv_half, int64_t threads) {
    if (M < 1) return M == 0 ? 0 : -1;
    int64_t N = w->qkv.n, H = w->H, Hkv = w->Hkv, D = w->D, A = H * D;
    if (N != (H + 2 * Hkv) * D) return -1;
    float *qkv = scratch(S_QKV, sizeof(float) * (size_t)M * (size_t)N), *att = scratch(S_ATT, sizeof(float) * (size_t)M * (size_t)A);
    int64_t *row_q = scratch(S_ROWQ, sizeof(int64_t) * (size_t)M);
    int rc = (!qkv || !att || !row_q) ? -2 : 0;
    if (rc == 0)
        rc = dspark_layer_in(M, w->K, x, w->K, w->norm_in, w->eps, &w->qkv, rope, H + Hkv, D, qkv, threads);
    if (rc == 0) {
        for (int64_t r = 0; r < M; r++) {
            row_q[r] = r;
            int64_t at = row_slot[r] * slot_stride + (row_len[r] - 1) * pos_stride;
            for (int64_t g = 0; g < Hkv; g++) {
                put_kv(k_cache, at + g * head_stride, qkv + r * N + (H + g) * D, D, kv_half);
                put_kv(v_cache, at + g * head_stride, qkv + r * N + (H + Hkv + g) * D, D, kv_half);
            }
        }
        rc = attention(M, H, Hkv, D, qkv, N, D, k_cache, v_cache, slot_stride, head_stride, pos_stride, row_q,
                       row_slot, row_len, att, A, D, scale, threads);
    }
    if (rc == 0)
        rc = dspark_layer_out(M, w->K, x, w->K, att, A, &w->o, w->norm_post, w->eps, &w->gu, w->I, &w->dn, threads);
    return rc;
}

/* Every decoder layer of a decode or verification step in one call: dspark_layer for layers 0 .. L - 1
 * in order (ws[l] the weights of layer l, its K/V cache at k_cache + l * layer_stride), with x after
 * each layer listed in tap_layer[0 .. n_taps - 1] copied to taps [M, n_taps, K] (the drafter's
 * hidden-state taps). The same operations as L calls, so the same bits; it saves the Python between the
 * layers (~25 us a layer). */
int dspark_layers(const struct dspark_layer_weights *const *ws, int64_t L, int64_t M, float *x, const float *rope,
                  void *k_cache, void *v_cache, int64_t layer_stride, int64_t slot_stride, int64_t head_stride,
                  int64_t pos_stride, const int64_t *row_slot, const int64_t *row_len, row_attention_fn attention,
                  float scale, float *taps, const int64_t *tap_layer, int64_t n_taps, int64_t kv_half,
                  int64_t threads) {
    size_t elem = kv_half ? sizeof(uint16_t) : sizeof(float);
    for (int64_t l = 0; l < L; l++) {
        int rc = dspark_layer(ws[l], M, x, rope, (char *)k_cache + (size_t)(l * layer_stride) * elem,
                              (char *)v_cache + (size_t)(l * layer_stride) * elem, slot_stride, head_stride, pos_stride,
                              row_slot, row_len, attention, scale, kv_half, threads);
        if (rc) return rc;
        for (int64_t j = 0; j < n_taps; j++)
            if (tap_layer[j] == l)
                for (int64_t r = 0; r < M; r++)
                    memcpy(taps + (r * n_taps + j) * ws[l]->K, x + r * ws[l]->K, sizeof(float) * (size_t)ws[l]->K);
    }
    return 0;
}

/* ---- A DSpark draft layer in one call ------------------------------------------------------------
 * The drafter's decoder layer (Qwen3-style: an RMSNorm over each query and key head before RoPE; RoPE
 * rotating halves, out = v * cos + roll(v, D / 2) * sin with the sign folded into sin's first half, as
 * `dspark.drafters.dspark_drafter.rope_tables` builds them) on Q8_0 weights and 8-bit activations
 * (qkv, o, gu, dn with q8 = 1), over the rows of draft blocks. Row r's key and value are written at
 * position row_pos[r] of cache slot row_slot[r], and it attends to positions 0 .. row_len[r] - 1 of that
 * slot (its context and its whole block). What it saves against the same layer in torch ops is the
 * Python and dispatch between them (~25 calls a layer). */

struct dspark_draft_layer_weights {
    const float *norm_in, *norm_post, *q_norm, *k_norm;
    float eps;
    struct q4w qkv, o, gu, dn; /* qkv.n = (H + 2 Hkv) D, o.n = dn.n = K, gu.n = 2 I */
    int64_t K, H, Hkv, D, I;
};

#define MAX_D 256

/* x [M, K] contiguous, in place; cos, sin [M, D] (each row's position). Returns 0, or the first failing
 * part's code (-1 bad sizes, -2 no memory, else the attention's). */
int dspark_draft_layer(const struct dspark_draft_layer_weights *w, int64_t M, float *x, const float *cos,
                       const float *sin, float *k_cache, float *v_cache, int64_t slot_stride, int64_t head_stride,
                       int64_t pos_stride, const int64_t *row_slot, const int64_t *row_pos, const int64_t *row_len,
                       row_attention_fn attention, float scale, int64_t threads) {
    if (M < 1) return M == 0 ? 0 : -1;
    int64_t K = w->K, N = w->qkv.n, H = w->H, Hkv = w->Hkv, D = w->D, A = H * D, half = D / 2;
    if (N != (H + 2 * Hkv) * D || D % 16 || D > MAX_D || K % GROUP) return -1;
    float *h = scratch(S_H, sizeof(float) * (size_t)M * (size_t)K), *qkv = scratch(S_QKV, sizeof(float) * (size_t)M * (size_t)N);
    float *att = scratch(S_ATT, sizeof(float) * (size_t)M * (size_t)A);
    int64_t *row_q = scratch(S_ROWQ, sizeof(int64_t) * (size_t)M);
    int rc = (!h || !qkv || !att || !row_q) ? -2 : 0;
    if (rc == 0) {
        for (int64_t r = 0; r < M; r++) rms_row(K, x + r * K, w->norm_in, w->eps, h + r * K);
        rc = q4_mm(&w->qkv, M, K, h, qkv, threads);
    }
    if (rc == 0) {
        for (int64_t r = 0; r < M; r++) {
            const float *cs = cos + r * D, *sn = sin + r * D;
            for (int64_t hd = 0; hd < H + Hkv; hd++) {
                float *v = qkv + r * N + hd * D, t[MAX_D];
                rms_row(D, v, hd < H ? w->q_norm : w->k_norm, w->eps, t);
                for (int64_t i = 0; i < D; i += 8) {
                    int64_t j = i < half ? i + half : i - half; /* roll(t, D / 2)[i] = t[i - D / 2 mod D] */
                    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(t + i), _mm256_loadu_ps(cs + i));
                    _mm256_storeu_ps(v + i, _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(t + j), _mm256_loadu_ps(sn + i))));
                }
            }
            row_q[r] = r;
            int64_t at = row_slot[r] * slot_stride + row_pos[r] * pos_stride;
            for (int64_t g = 0; g < Hkv; g++) {
                memcpy(k_cache + at + g * head_stride, qkv + r * N + (H + g) * D, sizeof(float) * (size_t)D);
                memcpy(v_cache + at + g * head_stride, qkv + r * N + (H + Hkv + g) * D, sizeof(float) * (size_t)D);
            }
        }
        rc = attention(M, H, Hkv, D, qkv, N, D, k_cache, v_cache, slot_stride, head_stride, pos_stride, row_q,
                       row_slot, row_len, att, A, D, scale, threads);
    }
    if (rc == 0) rc = dspark_layer_out(M, K, x, K, att, A, &w->o, w->norm_post, w->eps, &w->gu, w->I, &w->dn, threads);
    return rc;
}

/* ---- A DSpark drafter's context keys and values in one call ---------------------------------------
 * What a commit appends to the drafter's cache for M new context positions: the features
 * rmsnorm(fc(taps)) (taps: the target's hidden states at the drafter's target layers, concatenated),
 * then for every draft layer its keys (k_proj, the key-head RMSNorm, half-rotating RoPE) and values
 * (v_proj) of those features, written at position row_pos[r] of cache slot row_slot[r]. The same
 * projections (k|v fused by rows) and the same norm and RoPE arithmetic as dspark_draft_layer's block
 * rows; what it saves against the torch ops is their Python and dispatch (~20 calls a commit). */

struct dspark_draft_context_weights {
    struct q4w fc;              /* [K, F] */
    const float *hidden_norm;
    float eps;
    int64_t K, F, Hkv, D, L;    /* L draft layers */
    const struct q4w *kv;       /* [L]: k|v of each layer, n = 2 Hkv D */
    const float *const *k_norm; /* [L] */
};

/* feats [M, F] contiguous; cos, sin [M, D] (each row's position, sign-folded sin); k_cache / v_cache: layer
 * 0's cache, layer l at + l * layer_stride. Returns 0, -1 on bad sizes, -2 without memory. */
int dspark_draft_context(const struct dspark_draft_context_weights *w, int64_t M, const float *feats,
                         const float *cos, const float *sin, float *k_cache, float *v_cache, int64_t layer_stride,
                         int64_t slot_stride, int64_t head_stride, int64_t pos_stride, const int64_t *row_slot,
                         const int64_t *row_pos, int64_t threads) {
    if (M < 1) return M == 0 ? 0 : -1;
    int64_t K = w->K, Hkv = w->Hkv, D = w->D, N = 2 * Hkv * D, half = D / 2;
    if (D % 16 || D > MAX_D || K % GROUP || w->F % GROUP || w->fc.n != K) return -1;
    for (int64_t l = 0; l < w->L; l++)
        if (w->kv[l].n != N) return -1;
    float *y = scratch(S_T, sizeof(float) * (size_t)M * (size_t)K), *h = scratch(S_H, sizeof(float) * (size_t)M * (size_t)K);
    float *kv = scratch(S_QKV, sizeof(float) * (size_t)M * (size_t)N);
    if (!y || !h || !kv) return -2;
    int rc = q4_mm(&w->fc, M, w->F, feats, y, threads);
    if (rc) return rc;
    for (int64_t r = 0; r < M; r++) rms_row(K, y + r * K, w->hidden_norm, w->eps, h + r * K);
    for (int64_t l = 0; l < w->L; l++) {
        rc = q4_mm(&w->kv[l], M, K, h, kv, threads);
        if (rc) return rc;
        float *kc = k_cache + l * layer_stride, *vc = v_cache + l * layer_stride;
        for (int64_t r = 0; r < M; r++) {
            const float *cs = cos + r * D, *sn = sin + r * D;
            int64_t at = row_slot[r] * slot_stride + row_pos[r] * pos_stride;
            for (int64_t g = 0; g < Hkv; g++) {
                float t[MAX_D], *dst = kc + at + g * head_stride;
                rms_row(D, kv + r * N + g * D, w->k_norm[l], w->eps, t);
                for (int64_t i = 0; i < D; i += 8) {
                    int64_t j = i < half ? i + half : i - half; /* roll(t, D / 2)[i] = t[i - D / 2 mod D] */
                    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(t + i), _mm256_loadu_ps(cs + i));
                    _mm256_storeu_ps(dst + i, _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(t + j), _mm256_loadu_ps(sn + i))));
                }
                memcpy(vc + at + g * head_stride, kv + r * N + (Hkv + g) * D, sizeof(float) * (size_t)D);
            }
        }
    }
    return 0;
}
