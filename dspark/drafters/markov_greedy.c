/* Greedy drafting with DSpark's Markov head, the whole block in one call (CPU, float32).
 *
 * `DSparkDrafter.draft_block` drafts left to right: position k's logits are the backbone's U_k plus the
 * rank-r transition bias B(x_{k-1}) = W2 W1[x_{k-1}] of the token drafted before (the anchor for k = 0),
 * and a greedy draft takes their argmax. In torch that is half a dozen small ops per position, each a few
 * microseconds of dispatch; here the loop runs in C: per row and position, e = W1[prev] (r floats),
 * logits += W2 e (each output one float32 dot product over r, in index order), the first maximal draft
 * id, its target id through the draft vocabulary map, and (with a confidence head) the confidence logit
 * c_k = w . [h_k ; W1[prev]] + b before the token is drafted. Drafts are proposals: whatever this rounding
 * picks, verification against the target keeps the output distribution exact.
 *
 * Built at first use by dspark/drafters/markov_kernel.py with the system C compiler.
 */

#include <stdint.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the greedy Markov kernel needs AVX2 and FMA"
#endif

static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* logits: [n][gamma][V] float32 (row i, position k at i * ls_i + k * ls_k), U_k on entry, U_k + B_k on
 * return. w1: [Vt][r] float32 (rows indexed by target ids), w2: [V][r] float32 (r a multiple of 8). d2t: [V] target id of each draft id, or NULL (the identity). anchor: [n]
 * target ids. Out: draft ids and target ids [n][gamma] (int64). Confidence (cw != NULL): h [n][gamma][H]
 * (row stride hs_i, position stride hs_k), cw [H + r], cb; conf [n][gamma]. Returns 0, -1 on a target
 * id outside [0, Vt), -2 when r is not a multiple of 8. */
int dspark_markov_greedy(int64_t n, int64_t gamma, int64_t V, int64_t Vt, int64_t r, float *logits, int64_t ls_i,
                         int64_t ls_k, const float *w1, const float *w2, const int64_t *d2t, const int64_t *anchor,
                         int64_t *draft_ids, int64_t *target_ids, const float *h, int64_t hs_i, int64_t hs_k,
                         int64_t H, const float *cw, float cb, float *conf, int64_t threads) {
    if (r % 8) return -2;
    for (int64_t i = 0; i < n; i++) {
        int64_t prev = anchor[i];
        for (int64_t k = 0; k < gamma; k++) {
            if (prev < 0 || prev >= Vt) return -1;
            const float *e = w1 + prev * r;
            if (cw) {
                const float *hk = h + i * hs_i + k * hs_k;
                float c = 0.0f;
                for (int64_t j = 0; j < H; j++) c += cw[j] * hk[j];
                for (int64_t j = 0; j < r; j++) c += cw[H + j] * e[j];
                conf[i * gamma + k] = c + cb;
            }
            float *lk = logits + i * ls_i + k * ls_k;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
            for (int64_t v = 0; v < V; v++) {
                const float *w = w2 + v * r;
                __m256 acc = _mm256_setzero_ps();
                for (int64_t j = 0; j < r; j += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(e + j), acc);
                lk[v] += hsum(acc);
            }
            int64_t best = 0;
            float bv = lk[0];
            for (int64_t v = 1; v < V; v++)
                if (lk[v] > bv) { best = v; bv = lk[v]; }
            draft_ids[i * gamma + k] = best;
            prev = d2t ? d2t[best] : best;
            target_ids[i * gamma + k] = prev;
        }
    }
    return 0;
}
