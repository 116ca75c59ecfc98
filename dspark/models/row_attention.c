/* Batch-invariant attention for CPU decoding: each query row attends to its own keys in a fixed order.
 *
 * For one query row (one new token of one sequence) and one head, with L keys (the sequence's cached
 * prefix up to and including the token):
 *     s_j = scale * <q, k_j>          (8-lane partial sums over head_dim, then a fixed tree)
 *     p_j = exp(s_j - max_j s_j)      (one polynomial exp, the same for every row)
 *     out = sum_j p_j v_j / sum_j p_j (keys in order 0..L-1)
 * Nothing here depends on how many rows, heads or sequences share the call, on the other sequences'
 * lengths or on padding: a token scored in a verification call of k tokens, in a decode step of a batch
 * of 8 or alone gets the same bits. That is what makes greedy speculative decoding reproduce plain
 * decoding token for token on models whose activations are rounded to bf16 (the int4 GEMM), where any
 * last-bit difference grows over the layers.
 *
 * Keys and values are float32, or float16 (`dspark_row_attention_f16`: a cache of half the bytes, the
 * format llama.cpp keeps its KV cache in by default); each half is widened to float32 exactly and every
 * sum is then the float32 kernel's, so the f16 kernel gives the bits the f32 kernel gives on the same
 * (rounded) keys and values. q and out are float32 either way.
 *
 * Built at first use by dspark/models/row_attention.py with the system C compiler.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }

#if defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif

/* a * b + c, fused where the CPU has FMA. Built with -ffp-contract=off, so the compiler fuses nothing on
 * its own: which operations are fused is written here, the same in every copy of a loop (a contraction
 * left to the compiler can differ between two inlined copies of the same code, and with it the bits). */
static inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* 8 float16 values widened to float32 (exact: every half is a float) */
#if defined(__F16C__)
static inline v8 load8h(const uint16_t *p) {
    __m256 r = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    v8 o;
    memcpy(&o, &r, sizeof o);
    return o;
}
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13); /* inf, nan */
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (m << 13);
    } else if (m) { /* subnormal: m * 2^-24, normalised */
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        bits = sign | (e << 23) | ((m & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline v8 load8h(const uint16_t *p) {
    v8 o;
    for (int i = 0; i < 8; i++) o[i] = half_to_float(p[i]);
    return o;
}
#endif

/* 8 keys or values at element offset i of a cache row: float32, or float16 when `half` */
#define KV8(base, i) (half ? load8h((const uint16_t *)(base) + (i)) : load8((const float *)(base) + (i)))

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline float hsum8(v8 a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^n * P(r), r = x - n ln2 in [-ln2/2, ln2/2], P of
 * degree 6 (relative error ~2e-7). Below -87 the result is 0. */
static inline v8 bits_select(v8i mask, v8 a, v8 b) { /* a where mask, else b */
    v8i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    v8i ri = (ai & mask) | (bi & ~mask);
    v8 r;
    memcpy(&r, &ri, sizeof r);
    return r;
}

static inline v8 exp8(v8 x) {
    const v8 lo = splat(-87.0f);
    v8i under = x < lo;
    x = bits_select(under, lo, x);
    v8 t = x * splat(1.44269504088896341f);
    /* round to nearest: add and subtract 1.5 * 2^23 */
    v8 n = (t + splat(12582912.0f)) - splat(12582912.0f);
    v8 r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return bits_select(under, splat(0.0f), p * scale);
}

#define MAX_D 256

static inline __attribute__((always_inline)) void head_nd(const float *q, const void *k, const void *v,
                                                          int64_t pos_stride, int64_t L, int64_t nd,
                                                          float scale, float *scores, float *out, int half) {
    v8 qv[MAX_D / 8];
    for (int64_t c = 0; c < nd; c++) qv[c] = load8(q + 8 * c) * splat(scale);
    float m = -3.0e38f;
    int64_t j = 0;
    /* Four keys at a time: four independent FMA chains. Each key's sum is the same sequence of
     * operations as in the one-key loop below, so grouping changes no score. */
    for (; j + 4 <= L; j += 4) {
        int64_t o0 = j * pos_stride, o1 = o0 + pos_stride, o2 = o1 + pos_stride, o3 = o2 + pos_stride;
        v8 a0 = qv[0] * KV8(k, o0), a1 = qv[0] * KV8(k, o1), a2 = qv[0] * KV8(k, o2), a3 = qv[0] * KV8(k, o3);
        for (int64_t c = 1; c < nd; c++) {
            a0 = fma8(qv[c], KV8(k, o0 + 8 * c), a0);
            a1 = fma8(qv[c], KV8(k, o1 + 8 * c), a1);
            a2 = fma8(qv[c], KV8(k, o2 + 8 * c), a2);
            a3 = fma8(qv[c], KV8(k, o3 + 8 * c), a3);
        }
        float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
        scores[j] = s0;
        scores[j + 1] = s1;
        scores[j + 2] = s2;
        scores[j + 3] = s3;
        if (s0 > m) m = s0;
        if (s1 > m) m = s1;
        if (s2 > m) m = s2;
        if (s3 > m) m = s3;
    }
    for (; j < L; j++) {
        int64_t oj = j * pos_stride;
        v8 acc = qv[0] * KV8(k, oj);
        for (int64_t c = 1; c < nd; c++) acc = fma8(qv[c], KV8(k, oj + 8 * c), acc);
        float s = hsum8(acc);
        scores[j] = s;
        if (s > m) m = s;
    }
    int64_t L8 = (L + 7) & ~(int64_t)7;
    for (int64_t j = L; j < L8; j++) scores[j] = -1.0e30f;  /* exp gives exactly 0 */
    v8 mv = splat(m), sv = splat(0.0f);
    for (int64_t j = 0; j < L8; j += 8) {
        v8 p = exp8(load8(scores + j) - mv);
        store8(scores + j, p);
        sv += p;
    }
    float denom = hsum8(sv);
    v8 acc[MAX_D / 8];
    for (int64_t c = 0; c < nd; c++) acc[c] = splat(0.0f);
    for (int64_t j = 0; j < L; j++) {
        int64_t oj = j * pos_stride;
        v8 p = splat(scores[j]);
        for (int64_t c = 0; c < nd; c++) acc[c] = fma8(p, KV8(v, oj + 8 * c), acc[c]);
    }
    v8 inv = splat(1.0f / denom);
    for (int64_t c = 0; c < nd; c++) store8(out + 8 * c, acc[c] * inv);
}

/* One (row, head): q [D], keys/values [L, D] at pos_stride, scores scratch [L rounded up to 8].
 * Common head sizes get a copy with a constant trip count (unrolled, q and the sums in registers); each
 * computes exactly what the general loop does. */
static inline __attribute__((always_inline)) void one_head(const float *q, const void *k, const void *v,
                                                           int64_t pos_stride, int64_t L, int64_t D, float scale,
                                                           float *scores, float *out, int half) {
    switch (D) {
    case 64: head_nd(q, k, v, pos_stride, L, 8, scale, scores, out, half); break;
    case 128: head_nd(q, k, v, pos_stride, L, 16, scale, scores, out, half); break;
    default: head_nd(q, k, v, pos_stride, L, D / 8, scale, scores, out, half);
    }
}

static void one_head_f32(const float *q, const void *k, const void *v, int64_t pos_stride, int64_t L, int64_t D,
                         float scale, float *scores, float *out) {
    one_head(q, k, v, pos_stride, L, D, scale, scores, out, 0);
}

static void one_head_f16(const float *q, const void *k, const void *v, int64_t pos_stride, int64_t L, int64_t D,
                         float scale, float *scores, float *out) {
    one_head(q, k, v, pos_stride, L, D, scale, scores, out, 1);
}

/* Attention for n_rows query rows.
 *   q:   row r, head h at q + row_q[r] * q_row_stride + h * q_head_stride (D contiguous floats)
 *   k,v: slot s, kv head g, position j at base + s * slot_stride + g * head_stride + j * pos_stride
 *   row r attends to positions 0 .. row_len[r] - 1 of slot row_slot[r]
 *   out: row r, head h at out + row_q[r] * out_row_stride + h * out_head_stride
 * threads: at most this many threads (OpenMP builds), over the (row, head) pairs when there are several
 * rows; one row's 9-15 heads stay on one thread (measured on a 2-core CPU, a second thread cost more than
 * it saved there). Each pair is computed the same way on any thread, so the bits do not depend on it.
 * Returns 0, or -1 for an unsupported shape (D not a multiple of 8 or above MAX_D, H not a multiple of
 * Hkv), -2 when scratch memory cannot be had. */
static int row_attention(int64_t n_rows, int64_t H, int64_t Hkv, int64_t D,
                         const float *q, int64_t q_row_stride, int64_t q_head_stride,
                         const void *k, const void *v, int64_t slot_stride, int64_t head_stride,
                         int64_t pos_stride, const int64_t *row_q, const int64_t *row_slot,
                         const int64_t *row_len, float *out, int64_t out_row_stride,
                         int64_t out_head_stride, float scale, int64_t threads, int half) {
    if (D % 8 || D > MAX_D || D < 8 || Hkv < 1 || H % Hkv) return -1;
    int64_t max_len = 0;
    for (int64_t r = 0; r < n_rows; r++)
        if (row_len[r] > max_len) max_len = row_len[r];
    int nt = threads > 1 && n_rows > 1 ? (int)threads : 1;
    size_t per = (size_t)(max_len + 8);
    float *scores = malloc(sizeof(float) * per * (size_t)nt);
    if (!scores) return -2;
    int64_t group = H / Hkv, pairs = n_rows * H;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t p = 0; p < pairs; p++) {
        int64_t r = p / H, h = p % H;
#ifdef _OPENMP
        float *sc = scores + per * (size_t)omp_get_thread_num();
#else
        float *sc = scores;
#endif
        int64_t base = row_slot[r] * slot_stride + (h / group) * head_stride;
        const float *qh = q + row_q[r] * q_row_stride + h * q_head_stride;
        float *oh = out + row_q[r] * out_row_stride + h * out_head_stride;
        if (half)
            one_head_f16(qh, (const uint16_t *)k + base, (const uint16_t *)v + base, pos_stride, row_len[r], D,
                         scale, sc, oh);
        else
            one_head_f32(qh, (const float *)k + base, (const float *)v + base, pos_stride, row_len[r], D, scale,
                         sc, oh);
    }
    free(scores);
    return 0;
}

int dspark_row_attention(int64_t n_rows, int64_t H, int64_t Hkv, int64_t D, const float *q, int64_t q_row_stride,
                         int64_t q_head_stride, const float *k, const float *v, int64_t slot_stride,
                         int64_t head_stride, int64_t pos_stride, const int64_t *row_q, const int64_t *row_slot,
                         const int64_t *row_len, float *out, int64_t out_row_stride, int64_t out_head_stride,
                         float scale, int64_t threads) {
    return row_attention(n_rows, H, Hkv, D, q, q_row_stride, q_head_stride, k, v, slot_stride, head_stride,
                         pos_stride, row_q, row_slot, row_len, out, out_row_stride, out_head_stride, scale, threads, 0);
}

/* The same with float16 keys and values (k, v: IEEE binary16; strides in elements). */
int dspark_row_attention_f16(int64_t n_rows, int64_t H, int64_t Hkv, int64_t D, const float *q,
                             int64_t q_row_stride, int64_t q_head_stride, const uint16_t *k, const uint16_t *v,
                             int64_t slot_stride, int64_t head_stride, int64_t pos_stride, const int64_t *row_q,
                             const int64_t *row_slot, const int64_t *row_len, float *out, int64_t out_row_stride,
                             int64_t out_head_stride, float scale, int64_t threads) {
    return row_attention(n_rows, H, Hkv, D, q, q_row_stride, q_head_stride, k, v, slot_stride, head_stride,
                         pos_stride, row_q, row_slot, row_len, out, out_row_stride, out_head_stride, scale, threads, 1);
}
