/* Row-wise argmax of float32 logits, with torch.argmax's result: the index of the first maximum, or of
 * the first NaN when a row has one. Two passes over each row: the maximum (and whether any value is
 * NaN) with vector max instructions, then the first index equal to it. torch's CPU argmax keeps an
 * index beside every compared value and runs 3-6x slower on a 49,152-token vocabulary; greedy decoding
 * calls it once a step for every row (dspark.models.argmax). */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static int64_t first_nan(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] != x[i]) return i;
    return -1;
}

static int64_t argmax_row(const float *x, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
    int nan = 0;
#if defined(__AVX512F__)
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __mmask16 un = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, v);
    }
    nan = un != 0;
    if (!nan) m = _mm512_reduce_max_ps(vm);
#elif defined(__AVX2__)
    __m256 vm = _mm256_set1_ps(-INFINITY);
    __m256 un = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vm = _mm256_max_ps(vm, v);
    }
    nan = _mm256_movemask_ps(un) != 0;
    if (!nan) {
        float t[8];
        _mm256_storeu_ps(t, vm);
        for (int j = 0; j < 8; j++) m = t[j] > m ? t[j] : m;
    }
#endif
    for (; i < n && !nan; i++) {
        float v = x[i];
        if (v != v) nan = 1;
        else if (v > m) m = v;
    }
    if (nan) return first_nan(x, n);
    i = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) {
        __mmask16 k = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vmax, _CMP_EQ_OQ);
        if (k) return i + __builtin_ctz((unsigned)k);
    }
#elif defined(__AVX2__)
    __m256 vmax = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        int k = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vmax, _CMP_EQ_OQ));
        if (k) return i + __builtin_ctz((unsigned)k);
    }
#endif
    for (; i < n; i++)
        if (x[i] == m) return i;
    return 0; /* not reached: m is one of the values (n >= 1) */
}

/* x: rows of n floats, row r at x + r * stride; out[r] = argmax of row r. Returns 0, or -1 if n < 1. */
int dspark_argmax_rows(int64_t rows, int64_t n, const float *x, int64_t stride, int64_t *out) {
    if (n < 1) return -1;
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, n);
    return 0;
}
