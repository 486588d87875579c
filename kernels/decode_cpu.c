/* One decode step of a Llama-style backbone on GGUF blocks, every block in one C call.
 *
 * The lean Python step (longside/backbone/decode_step.py) spends about as long in ~20 small
 * torch ops per block (norms, rotary, a grouped-query attention of one query, cache appends)
 * as in the block's four products; here they are plain loops between the same product
 * kernels (ggml_gemv_int8 / ggml_gemv_f32 of ggml_cpu.c, so the products give the same bits
 * as in Python), and the key/value cache is written in place.
 *
 * Shapes (all float32, row-major): hidden [L+1, B, d] (hidden[0] is filled by the caller,
 * block i writes hidden[i+1]); cos, sin [B, D] (rotary of each row's new position); block i's
 * cache kbuf, vbuf [B, G, cap_i, D], rotated keys, of which columns [0, n) hold the past: the
 * new token goes to column n. key_mask [B, ldm] uint8 (nonzero: a real key; NULL: all are).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __x86_64__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

void ggml_gemv_int8(int type, const uint8_t *w, int64_t row_bytes, const float *x, int64_t ldx, int64_t M,
                    float *y, int64_t ldy, int64_t N, int64_t K, int nthreads, int isa);
void ggml_gemv_f32(int type, const uint8_t *w, int64_t row_bytes, const float *x, int64_t ldx, int64_t M,
                   float *y, int64_t ldy, int64_t N, int64_t K, int nthreads, int use_avx2);

/* One block's entry in the caller's table of int64 words. A product is 4 words: blocks
 * pointer, ggml type id, row bytes, 1 for int8 activations (0: exact fp32 activations). */
enum {
    E_ATTN_NORM = 0, E_QKV = 1, E_O = 5, E_FFN_NORM = 9, E_GATE_UP = 10, E_DOWN = 14,
    E_KBUF = 18, E_VBUF = 19, E_CAP = 20, TABLE_WORDS = 21
};

static void product(const int64_t *p, const float *x, int64_t M, float *y, int64_t N, int64_t K, int nthreads,
                    int isa) {
    const uint8_t *w = (const uint8_t *)(intptr_t)p[0];
    if (p[3])
        ggml_gemv_int8((int)p[1], w, p[2], x, K, M, y, N, N, K, nthreads, isa);
    else
        ggml_gemv_f32((int)p[1], w, p[2], x, K, M, y, N, N, K, nthreads, isa > 0);
}

/* y = x / sqrt(mean(x^2) + eps) * w, x and y [d] (as torch's rms_norm: the mean in float) */
static void rms_norm(const float *x, const float *w, float eps, int64_t d, float *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) y[i] = x[i] * r * w[i];
}

/* rotate-half rotary of one head x [D] in place */
static void rotary(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

#ifdef __x86_64__
#define AVX2F __attribute__((target("avx2,fma")))

/* the sum of v's 8 lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the two left */
AVX2F static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2F static float dot_avx2(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float t = hsum256(acc);
    for (; i < D; i++) t += a[i] * b[i];
    return t;
}

/* y[D] += p * x[D] */
AVX2F static void axpy_avx2(float p, const float *x, float *y, int64_t D) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < D; i++) y[i] += p * x[i];
}
#endif

static float dot(const float *a, const float *b, int64_t D, int simd) {
#ifdef __x86_64__
    if (simd) return dot_avx2(a, b, D);
#endif
    float t = 0.0f;
    for (int64_t i = 0; i < D; i++) t += a[i] * b[i];
    return t;
}

static void axpy(float p, const float *x, float *y, int64_t D, int simd) {
#ifdef __x86_64__
    if (simd) {
        axpy_avx2(p, x, y, D);
        return;
    }
#endif
    for (int64_t i = 0; i < D; i++) y[i] += p * x[i];
}

/* float16 bits -> float32 (exact; every float16 is a float32) */
static float half_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu, bits;
    if (e == 0x1fu) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (m << 13);
    } else if (m) { /* subnormal: normalize */
        uint32_t ex = 113;
        while (!(m & 0x400u)) {
            m <<= 1;
            ex--;
        }
        bits = sign | (ex << 23) | ((m & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef __x86_64__
/* y[n] = W[n] . x for 4 rows of K values, float32 or float16 (half) weights: four independent
 * sums in flight instead of one chain, each in dot_avx2's order, so the same bits as dot(). */
__attribute__((target("avx2,fma,f16c"))) static void dot4_avx2(const void *W, int half, int64_t n, int64_t K,
                                                               const float *x, float *y) {
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) {
        const __m256 xv = _mm256_loadu_ps(x + i);
        for (int r = 0; r < 4; r++) {
            const __m256 w = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + (n + r) * K + i)))
                                  : _mm256_loadu_ps((const float *)W + (n + r) * K + i);
            acc[r] = _mm256_fmadd_ps(w, xv, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        float t = hsum256(acc[r]);
        for (int64_t j = i; j < K; j++)
            t += (half ? half_float(((const uint16_t *)W)[(n + r) * K + j]) : ((const float *)W)[(n + r) * K + j]) * x[j];
        y[r] = t;
    }
}
#endif

#ifdef __x86_64__
__attribute__((target("avx2,fma,f16c"))) static float dot_half_avx2(const uint16_t *w, const float *x, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= K; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), acc);
    float t = hsum256(acc);
    for (; i < K; i++) t += half_float(w[i]) * x[i];
    return t;
}
#endif

/* y[n - lo] = W[n] . x for rows [lo, hi) of W [N, K], float32 or float16 (`half`) weights. Every
 * row is summed in dot()'s order, whichever kernel takes it, and a float16 weight is exactly
 * its float32 value: a float32 W holding float16 values gives the same bits either way. */
static void rows_dot(const void *W, int half, int64_t lo, int64_t hi, int64_t K, const float *x, float *y,
                     int simd) {
    int64_t n = lo;
#ifdef __x86_64__
    if (simd) {
        for (; n + 4 <= hi; n += 4) dot4_avx2(W, half, n, K, x, y + n - lo);
        for (; n < hi; n++)
            y[n - lo] = half ? dot_half_avx2((const uint16_t *)W + n * K, x, K) : dot_avx2((const float *)W + n * K, x, K);
        return;
    }
#endif
    for (; n < hi; n++) {
        float t = 0.0f;
        for (int64_t i = 0; i < K; i++)
            t += (half ? half_float(((const uint16_t *)W)[n * K + i]) : ((const float *)W)[n * K + i]) * x[i];
        y[n - lo] = t;
    }
}

/* One query head against S cached keys/values of its group: out [D] (AVX2 or plain loops).
 * The sums over keys run in key order, one at a time, so a row's result does not depend on how
 * many masked columns (another row's padding) come before its keys. lse (unless NULL): the
 * log-sum-exp of the scaled scores; v NULL: that alone, no output. No real key: out zeros,
 * lse -inf. */
static void attend_portable(const float *q, const float *k, const float *v, int64_t S, int64_t D, const uint8_t *mask,
                   float scaling, float *scores, float *out, float *lse, int simd) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            scores[s] = -INFINITY;
            continue;
        }
        scores[s] = dot(q, k + s * D, D, simd) * scaling;
        if (scores[s] > mx) mx = scores[s];
    }
    if (mx == -INFINITY) { /* no real key */
        if (v) memset(out, 0, sizeof(float) * D);
        if (lse) *lse = -INFINITY;
        return;
    }
    float sum = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        scores[s] = scores[s] == -INFINITY ? 0.0f : expf(scores[s] - mx);
        sum += scores[s];
    }
    if (lse) *lse = mx + logf(sum);
    if (!v) return;
    memset(out, 0, sizeof(float) * D);
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < S; s++)
        if (scores[s] != 0.0f) axpy(scores[s] * inv, v + s * D, out, D, simd);
}

#ifdef __x86_64__
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

/* exp(x), x <= 88.7, within ~2 ulp: x = n ln2 + r, |r| <= ln2/2, exp(r) by Cephes' expf
 * polynomial, times 2^n (vscalefps; large negative x gives 0). */
AVX512 static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* y[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, i < n */
AVX512 static void swiglu512(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(88.0f)));
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
    }
}

/* attend for D a multiple of 16 up to 128: the real keys (by the mask) are listed first, so
 * scores, exponentials and sums run over them alone, in key order, and a row's result does not
 * depend on how many masked columns come before its keys; the output stays in registers.
 * scores: 2 S floats of scratch (the second half holds the real keys' columns). */
AVX512 static void attend512(const float *q, const float *k, const float *v, int64_t S, int64_t D,
                             const uint8_t *mask, float scaling, float *scores, float *out, float *lse) {
    int32_t *col = (int32_t *)(scores + S);
    int64_t nr = 0;
    for (int64_t s = 0; s < S; s++)
        if (!mask || mask[s]) col[nr++] = (int32_t)s;
    const int C = (int)(D / 16);
    __m512 qv[8], o[8];
    for (int c = 0; c < C; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    float mx = -INFINITY;
    for (int64_t i = 0; i < nr; i++) {
        const float *ks = k + (int64_t)col[i] * D;
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ks));
        for (int c = 1; c < C; c++) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(ks + 16 * c), acc);
        const float sc = _mm512_reduce_add_ps(acc) * scaling;
        scores[i] = sc;
        mx = sc > mx ? sc : mx;
    }
    if (nr == 0) { /* no real key */
        if (v) memset(out, 0, sizeof(float) * D);
        if (lse) *lse = -INFINITY;
        return;
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 mxv = _mm512_set1_ps(mx);
    for (int64_t i = 0; i < nr; i += 16) {
        const __mmask16 m = nr - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nr - i)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + i), mxv));
        _mm512_mask_storeu_ps(scores + i, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const float total = _mm512_reduce_add_ps(sum), inv = 1.0f / total;
    if (lse) *lse = mx + logf(total);
    if (!v) return;
    for (int c = 0; c < C; c++) o[c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nr; i++) {
        const __m512 pv = _mm512_set1_ps(scores[i] * inv);
        const float *vs = v + (int64_t)col[i] * D;
        for (int c = 0; c < C; c++) o[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vs + 16 * c), o[c]);
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(out + 16 * c, o[c]);
}
#endif

#ifdef __x86_64__
/* exp(x) on 8 lanes, the same reduction and polynomial as exp512; 2^n is built in the exponent
 * bits, so x is clamped to [-87, 88] (n in [-126, 127]) and lanes below -87 give 0 (exp512
 * gives denormals down to -103 there: either is nothing beside a softmax sum >= 1). */
AVX2F static inline __m256 exp256(__m256 x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

AVX2F static inline __m256i tail_mask8(int64_t left) {
    const int32_t k = left >= 8 ? 8 : (int32_t)left;
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), idx);
}

/* swiglu512 on 8 lanes */
AVX2F static void swiglu256(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        const __m256i m = tail_mask8(n - i);
        const __m256 gv = _mm256_maskload_ps(g + i, m);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), _mm256_set1_ps(88.0f)));
        const __m256 sv = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(sv, _mm256_maskload_ps(u + i, m)));
    }
}

/* attend512 on 8 lanes, for D a multiple of 8 up to 128 (the same order of operations per
 * lane group: real keys listed first, the query and the output held in registers). */
AVX2F static void attend256(const float *q, const float *k, const float *v, int64_t S, int64_t D,
                            const uint8_t *mask, float scaling, float *scores, float *out, float *lse) {
    int32_t *col = (int32_t *)(scores + S);
    int64_t nr = 0;
    for (int64_t s = 0; s < S; s++)
        if (!mask || mask[s]) col[nr++] = (int32_t)s;
    const int C = (int)(D / 8);
    __m256 qv[16], o[16];
    for (int c = 0; c < C; c++) qv[c] = _mm256_loadu_ps(q + 8 * c);
    float mx = -INFINITY;
    for (int64_t i = 0; i < nr; i++) {
        const float *ks = k + (int64_t)col[i] * D;
        __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(ks));
        for (int c = 1; c < C; c++) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(ks + 8 * c), acc);
        const float sc = hsum256(acc) * scaling;
        scores[i] = sc;
        mx = sc > mx ? sc : mx;
    }
    if (nr == 0) { /* no real key */
        if (v) memset(out, 0, sizeof(float) * D);
        if (lse) *lse = -INFINITY;
        return;
    }
    __m256 sum = _mm256_setzero_ps();
    const __m256 mxv = _mm256_set1_ps(mx);
    for (int64_t i = 0; i < nr; i += 8) {
        const __m256i m = tail_mask8(nr - i);
        const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(scores + i, m), mxv)),
                                       _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(scores + i, m, e);
        sum = _mm256_add_ps(sum, e);
    }
    const float total = hsum256(sum), inv = 1.0f / total;
    if (lse) *lse = mx + logf(total);
    if (!v) return;
    for (int c = 0; c < C; c++) o[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nr; i++) {
        const __m256 pv = _mm256_set1_ps(scores[i] * inv);
        const float *vs = v + (int64_t)col[i] * D;
        for (int c = 0; c < C; c++) o[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vs + 8 * c), o[c]);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + 8 * c, o[c]);
}
#endif

/* One query head against S cached keys/values: out [D]. isa 3 (AVX-512) takes attend512, isa 1-2
 * (AVX2) attend256 where D allows; scores: 2 S floats of scratch. */
static void attend(const float *q, const float *k, const float *v, int64_t S, int64_t D, const uint8_t *mask,
                   float scaling, float *scores, float *out, float *lse, int isa) {
#ifdef __x86_64__
    if (isa == 3 && D % 16 == 0 && D <= 128) {
        attend512(q, k, v, S, D, mask, scaling, scores, out, lse);
        return;
    }
    if (isa > 0 && D % 8 == 0 && D <= 128) {
        attend256(q, k, v, S, D, mask, scaling, scores, out, lse);
        return;
    }
#endif
    attend_portable(q, k, v, S, D, mask, scaling, scores, out, lse, isa > 0);
}

/* y[i] = silu(g[i]) * u[i] */
static void swiglu(const float *g, const float *u, float *y, int64_t n, int isa) {
#ifdef __x86_64__
    if (isa == 3) {
        swiglu512(g, u, y, n);
        return;
    }
    if (isa > 0) {
        swiglu256(g, u, y, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Scratch of one call of llama_decode_step; att and lse are the caller's where it keeps them
 * between calls (a block's attention in one call, its memory read and the rest in the next). */
typedef struct {
    float *x, *qkv, *att, *lse, *gu, *y, *scores;
    int64_t per_thread; /* floats of scores per thread */
} Scratch;

/* Block l's attention for one new token per row: norm, q/k/v, rotary, the new key/value into
 * the cache at column n, one query head per (row, head) against its n + 1 keys -> s->att
 * [B, H*D] and, where s->lse, each head's log-sum-exp [B, H]. kv_pre (unless NULL): block l's
 * pre-rotary k, v [B, 2, G*D]; the memory layer's q, k, v, a copied to mq, mk, mv, ma; qm
 * (unless NULL): the pre-rotary q rotated by cos_m, sin_m [D] (backbone memory's query) [B, H*D]. */
static void block_attention(const int64_t *t, int64_t l, const float *h, int64_t B, int64_t d, int64_t H, int64_t G,
                            int64_t D, const float *cos, const float *sin, int64_t n, const uint8_t *key_mask,
                            int64_t ldm, float eps, float scaling, int64_t mem_layer, float *mq, float *mk, float *mv,
                            float *ma, float *kv_pre, const float *cos_m, const float *sin_m, float *qm, Scratch *s,
                            int nthreads, int isa) {
    const int64_t nq = H * D, nkv = G * D, nqkv = nq + 2 * nkv, S = n + 1, per = H / G;
    const float *attn_norm = (const float *)(intptr_t)t[E_ATTN_NORM];
    float *kc = (float *)(intptr_t)t[E_KBUF], *vc = (float *)(intptr_t)t[E_VBUF];
    const int64_t cap = t[E_CAP];
    int nt = nthreads < 1 ? 1 : nthreads;
    for (int64_t b = 0; b < B; b++) rms_norm(h + b * d, attn_norm, eps, d, s->x + b * d);
    product(t + E_QKV, s->x, B, s->qkv, nqkv, d, nthreads, isa);
    for (int64_t b = 0; b < B; b++) {
        float *q = s->qkv + b * nqkv, *k = q + nq, *v = k + nkv;
        if (l == mem_layer) { /* the memory layer's pre-rotary q, k, v */
            memcpy(mq + b * nq, q, sizeof(float) * nq);
            memcpy(mk + b * nkv, k, sizeof(float) * nkv);
            memcpy(mv + b * nkv, v, sizeof(float) * nkv);
        }
        if (kv_pre) memcpy(kv_pre + b * 2 * nkv, k, sizeof(float) * 2 * nkv);
        if (qm) {
            memcpy(qm + b * nq, q, sizeof(float) * nq);
            for (int64_t j = 0; j < H; j++) rotary(qm + b * nq + j * D, cos_m, sin_m, D);
        }
        for (int64_t j = 0; j < H; j++) rotary(q + j * D, cos + b * D, sin + b * D, D);
        for (int64_t g = 0; g < G; g++) {
            rotary(k + g * D, cos + b * D, sin + b * D, D);
            memcpy(kc + ((b * G + g) * cap + n) * D, k + g * D, sizeof(float) * D);
            memcpy(vc + ((b * G + g) * cap + n) * D, v + g * D, sizeof(float) * D);
        }
    }
    /* one query head per (row, head): a few hundred keys each, spread over the threads */
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t bj = 0; bj < B * H; bj++) {
        const int64_t b = bj / H, j = bj % H, g = j / per;
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        attend(s->qkv + b * nqkv + j * D, kc + (b * G + g) * cap * D, vc + (b * G + g) * cap * D, S, D,
               key_mask ? key_mask + b * ldm : NULL, scaling, s->scores + me * s->per_thread,
               s->att + b * nq + j * D, s->lse ? s->lse + bj : NULL, isa);
    }
    if (l == mem_layer) memcpy(ma, s->att, sizeof(float) * B * nq);
}

/* Backbone memory's read into a block's attention s->att [B, H*D] (log-sum-exps s->lse [B, H]):
 * per (row, head), position-free attention of qm over the M retrieved keys/values [B, H, M, D]
 * (mask [B, H, M] uint8: real slots) gives a_mem, lse_mem; the joint softmax over memory and
 * window is att + w (a_mem - att), w = sigmoid(lse_mem - lse); a head that retrieved nothing
 * keeps att (BackboneMemory._read). */
static void memory_blend(int64_t B, int64_t H, int64_t D, int64_t M, const float *qm, const float *keys,
                         const float *values, const uint8_t *mask, float scaling, Scratch *s, int nthreads, int isa) {
    int nt = nthreads < 1 ? 1 : nthreads;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < B * H; i++) {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *scores = s->scores + me * s->per_thread, *am = scores + 2 * M, lse_mem;
        attend(qm + i * D, keys + i * M * D, values + i * M * D, M, D, mask + i * M, scaling, scores, am, &lse_mem,
               isa);
        if (lse_mem == -INFINITY) continue;
        const float w = 1.0f / (1.0f + expf(s->lse[i] - lse_mem));
        float *a = s->att + i * D;
        for (int64_t j = 0; j < D; j++) a[j] += w * (am[j] - a[j]);
    }
}

/* The rest of block l once s->att holds its attention: output projection and residual, norm,
 * gate/up, SwiGLU, down and residual -> out [B, d]. */
static void block_finish(const int64_t *t, const float *h, float *out, int64_t B, int64_t d, int64_t nq, int64_t F,
                         float eps, Scratch *s, int nthreads, int isa) {
    const float *ffn_norm = (const float *)(intptr_t)t[E_FFN_NORM];
    product(t + E_O, s->att, B, s->y, d, nq, nthreads, isa);
    for (int64_t i = 0; i < B * d; i++) out[i] = h[i] + s->y[i];
    for (int64_t b = 0; b < B; b++) rms_norm(out + b * d, ffn_norm, eps, d, s->x + b * d);
    product(t + E_GATE_UP, s->x, B, s->gu, 2 * F, d, nthreads, isa);
    for (int64_t b = 0; b < B; b++) swiglu(s->gu + b * 2 * F, s->gu + b * 2 * F + F, s->x + b * F, F, isa);
    product(t + E_DOWN, s->x, B, s->y, d, F, nthreads, isa);
    for (int64_t i = 0; i < B * d; i++) out[i] += s->y[i];
}

/* Blocks of a Llama-style backbone for one new token per row. The whole step is one call with
 * l0 = 0, resume = 0, l1 = L. Backbone memory splits it at the blocks that read memory, whose
 * retrieval runs between calls: a call with l1 < L runs blocks [l0, l1) and then block l1's
 * attention alone, leaving it in att / lse [B, H*D] / [B, H] and backbone memory's query in qm
 * [B, H*D] (the pre-rotary q rotated by cos_m, sin_m [D]); the next call, with resume = 1 and
 * l0 = that block, blends in what memory returned (mkeys, mvalues [B, H, M, D], mmask [B, H, M]
 * uint8; mkeys NULL: nothing) and finishes it, then goes on. kv_pre (unless NULL): every run
 * block's pre-rotary k, v at [l, B, 2, G*D]. att, lse NULL: this call's own scratch (then no
 * split). Returns 0, or -1 when a scratch allocation failed (nothing was written to the caches). */
int llama_decode_step(int64_t L, int64_t B, int64_t d, int64_t H, int64_t G, int64_t D, int64_t F,
                      const int64_t *table, float *hidden, const float *cos, const float *sin, int64_t n,
                      const uint8_t *key_mask, int64_t ldm, float eps, float scaling, int64_t mem_layer,
                      float *mq, float *mk, float *mv, float *ma, int64_t l0, int64_t l1, int64_t resume,
                      float *att, float *lse, float *kv_pre, const float *cos_m, const float *sin_m, float *qm,
                      int64_t M, const float *mkeys, const float *mvalues, const uint8_t *mmask, int nthreads,
                      int isa) {
    const int64_t nq = H * D, nkv = G * D, nqkv = nq + 2 * nkv, S = n + 1;
    if (l0 < 0 || l1 > L || l0 > l1 || (resume && (l0 >= L || !att || !lse)) || (l1 < L && (!att || !lse || !qm))
        || (resume && mkeys && (!qm || !mvalues || !mmask)))
        return -2;
    int nt = nthreads < 1 ? 1 : nthreads;
    Scratch s = {0};
    s.per_thread = 2 * (S > M ? S : M) + D;
    s.x = (float *)malloc(sizeof(float) * B * (d > F ? d : F));
    s.qkv = (float *)malloc(sizeof(float) * B * nqkv);
    s.att = att ? att : (float *)malloc(sizeof(float) * B * nq);
    s.lse = lse;
    s.gu = (float *)malloc(sizeof(float) * B * 2 * F);
    s.y = (float *)malloc(sizeof(float) * B * d);
    s.scores = (float *)malloc(sizeof(float) * nt * s.per_thread);
    int rc = (!s.x || !s.qkv || !s.att || !s.gu || !s.y || !s.scores) ? -1 : 0;
    if (!rc) {
        int64_t l = l0;
        if (resume) { /* block l0's attention is in att: memory, then the rest of it */
            if (mkeys) memory_blend(B, H, D, M, qm, mkeys, mvalues, mmask, scaling, &s, nthreads, isa);
            block_finish(table + l * TABLE_WORDS, hidden + l * B * d, hidden + (l + 1) * B * d, B, d, nq, F, eps, &s,
                         nthreads, isa);
            l++;
        }
        for (; l <= l1 && l < L; l++) {
            const int64_t *t = table + l * TABLE_WORDS;
            block_attention(t, l, hidden + l * B * d, B, d, H, G, D, cos, sin, n, key_mask, ldm, eps, scaling,
                            mem_layer, mq, mk, mv, ma, kv_pre ? kv_pre + l * B * 2 * nkv : NULL, cos_m, sin_m,
                            l == l1 ? qm : NULL, &s, nthreads, isa);
            if (l == l1) break; /* its memory is read before the next call finishes it */
            block_finish(t, hidden + l * B * d, hidden + (l + 1) * B * d, B, d, nq, F, eps, &s, nthreads, isa);
        }
    }
    free(s.x), free(s.qkv), free(s.gu), free(s.y), free(s.scores);
    if (!att) free(s.att);
    return rc;
}

/* ------------------------------------------------------------ the side network's blocks */

/* x / sqrt(mean(x^2) + eps) * w, as longside/nn/side_network.py's RMSNorm */
static void side_norm(const float *x, const float *w, float eps, int64_t s, float *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < s; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)s + eps);
    for (int64_t i = 0; i < s; i++) y[i] = x[i] * r * w[i];
}

/* Per side layer, the caller's table of int64 words. */
enum {
    S_STATE = 0, S_MIX = 1, S_BLOCK = 2, S_ATTN_NORM = 3, S_Q = 4, S_K = 5, S_V = 6, S_O = 7, S_MLP_NORM = 8,
    S_GATE = 9, S_UP = 10, S_DOWN = 11, S_KBUF = 12, S_VBUF = 13, S_CAP = 14, S_HALF = 15, SIDE_WORDS = 16
};

/* rows [lo, hi) of a concatenation of products, of which W holds rows [base, base + N):
 * those in both, into y (indexed in the concatenation) */
static void span_dot(const void *W, int half, int64_t base, int64_t N, int64_t lo, int64_t hi, int64_t K,
                     const float *x, float *y, int simd) {
    const int64_t a = lo > base ? lo : base, b = hi < base + N ? hi : base + N;
    if (a < b) rows_dot(W, half, a - base, b - base, K, x, y + a, simd);
}

/* this thread's share [lo, hi) of N rows in a parallel region (all of them outside one) */
static void thread_rows(int64_t N, int64_t *lo, int64_t *hi) {
    int64_t me = 0, nt = 1;
#ifdef _OPENMP
    me = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
    *lo = N * me / nt, *hi = N * (me + 1) / nt;
}

/* A side block's new position for row b: q [H*Dh] and k rotated, the new key/value
 * (kv [2*G*Dh]) written at position P of the block's buffers. */
static void side_cache_write(const int64_t *t, int64_t b, int64_t H, int64_t G, int64_t Dh, int64_t P, float *q,
                             float *kv, const float *cos, const float *sin) {
    float *kc = (float *)(intptr_t)t[S_KBUF], *vc = (float *)(intptr_t)t[S_VBUF];
    const int64_t cap = t[S_CAP], nkv = G * Dh;
    for (int64_t h = 0; h < H; h++) rotary(q + h * Dh, cos + b * Dh, sin + b * Dh, Dh);
    for (int64_t gi = 0; gi < G; gi++) {
        rotary(kv + gi * Dh, cos + b * Dh, sin + b * Dh, Dh);
        const int64_t row = b * G + gi;
        memcpy(kc + (row * cap + P) * Dh, kv + gi * Dh, sizeof(float) * Dh);
        memcpy(vc + (row * cap + P) * Dh, kv + nkv + gi * Dh, sizeof(float) * Dh);
    }
}

/* side_decode_layers for fewer rows than threads (one user decoding): rows cannot be split
 * over the threads, so the team splits each product's output rows and the attention's heads
 * (every output the same dot as on the one-thread path, so the same bits) and one thread does
 * the small steps between them. */
static int side_rows_team(int64_t J, int64_t B, int64_t d, int64_t s, int64_t H, int64_t G, int64_t Dh, int64_t F,
                          const int64_t *table, const float *gates, const int64_t *keep, float *x, const float *cos,
                          const float *sin, int64_t P, const uint8_t *key_mask, int64_t ldm, float eps, int first_mix,
                          int last_block, const float *final_norm, float final_eps, const float *up,
                          float final_gate, const float *last, float *out, int nt, int isa) {
    const int simd = isa > 0;
    const int64_t nq = H * Dh, nkv = G * Dh, per = H / G, S = P + 1;
    const float scaling = 1.0f / sqrtf((float)Dh);
    float *hn = (float *)malloc(sizeof(float) * (s > F ? s : F)), *qkv = (float *)malloc(sizeof(float) * (nq + 2 * nkv));
    float *att = (float *)malloc(sizeof(float) * nq), *y = (float *)malloc(sizeof(float) * s);
    float *g = (float *)malloc(sizeof(float) * 2 * F), *scores = (float *)malloc(sizeof(float) * 2 * S * nt);
    float *fin = (float *)malloc(sizeof(float) * d);
    if (!hn || !qkv || !att || !y || !g || !scores || !fin) {
        free(hn), free(qkv), free(att), free(y), free(g), free(scores), free(fin);
        return -1;
    }
    float *q = qkv, *kv = qkv + nq;
    #pragma omp parallel num_threads(nt)
    for (int64_t b = 0; b < B; b++) {
        float *xb = x + b * s;
        for (int64_t j = 0; j < J; j++) {
            const int64_t *t = table + j * SIDE_WORDS;
            const int block = t[S_BLOCK] && !(j == J - 1 && !last_block);
            #pragma omp single
            {
                if (t[S_MIX] && (j || first_mix)) {
                    const float *h = (const float *)(intptr_t)t[S_STATE] + b * d;
                    const float gj = gates[j], keepw = 1.0f - gates[j];
                    for (int64_t i = 0; i < s; i++)
                        xb[i] = t[S_MIX] == 2 ? h[keep[i]] : keepw * h[keep[i]] + gj * xb[i];
                }
                if (block) side_norm(xb, (const float *)(intptr_t)t[S_ATTN_NORM], eps, s, hn);
            }
            if (!block) continue;
            const int half = (int)t[S_HALF];
            const void *wq = (const void *)(intptr_t)t[S_Q], *wk = (const void *)(intptr_t)t[S_K];
            const void *wv = (const void *)(intptr_t)t[S_V];
            int64_t lo, hi;
            thread_rows(nq + 2 * nkv, &lo, &hi);
            span_dot(wq, half, 0, nq, lo, hi, s, hn, qkv, simd);
            span_dot(wk, half, nq, nkv, lo, hi, s, hn, qkv, simd);
            span_dot(wv, half, nq + nkv, nkv, lo, hi, s, hn, qkv, simd);
            #pragma omp barrier
            #pragma omp single
            side_cache_write(t, b, H, G, Dh, P, q, kv, cos, sin);
            {
                const float *kn = (const float *)(intptr_t)t[S_KBUF], *vn = (const float *)(intptr_t)t[S_VBUF];
                const int64_t nc = t[S_CAP];
                int me = 0;
#ifdef _OPENMP
                me = omp_get_thread_num();
#endif
                float *sc = scores + (int64_t)me * 2 * S;
                #pragma omp for schedule(static)
                for (int64_t h = 0; h < H; h++) {
                    const int64_t row = b * G + h / per;
                    attend(q + h * Dh, kn + row * nc * Dh, vn + row * nc * Dh, S, Dh,
                           key_mask ? key_mask + b * ldm : NULL, scaling, sc, att + h * Dh, NULL, isa);
                }
            }
            thread_rows(s, &lo, &hi);
            rows_dot((const void *)(intptr_t)t[S_O], half, lo, hi, nq, att, y + lo, simd);
            #pragma omp barrier
            #pragma omp single
            {
                for (int64_t i = 0; i < s; i++) xb[i] += y[i];
                side_norm(xb, (const float *)(intptr_t)t[S_MLP_NORM], eps, s, hn);
            }
            thread_rows(2 * F, &lo, &hi);
            span_dot((const void *)(intptr_t)t[S_GATE], half, 0, F, lo, hi, s, hn, g, simd);
            span_dot((const void *)(intptr_t)t[S_UP], half, F, F, lo, hi, s, hn, g, simd);
            #pragma omp barrier
            #pragma omp single
            swiglu(g, g + F, hn, F, isa);
            thread_rows(s, &lo, &hi);
            rows_dot((const void *)(intptr_t)t[S_DOWN], half, lo, hi, F, hn, y + lo, simd);
            #pragma omp barrier
            #pragma omp single
            for (int64_t i = 0; i < s; i++) xb[i] += y[i];
        }
        if (final_norm) {
            #pragma omp single
            side_norm(xb, final_norm, final_eps, s, hn);
            int64_t lo, hi;
            thread_rows(d, &lo, &hi);
            rows_dot(up, 0, lo, hi, s, hn, fin + lo, simd);
            for (int64_t i = lo; i < hi; i++) out[b * d + i] = last[b * d + i] + final_gate * fin[i];
            #pragma omp barrier
        }
    }
    free(hn), free(qkv), free(att), free(y), free(g), free(scores), free(fin);
    return 0;
}

/* Side layers for one new token per row. x [B, s] in/out. Layer j: S_MIX 2 sets x to the
 * backbone state's kept dimensions (state [B, d] rows, keep [s]), 1 mixes them in with
 * gates[j] ((1 - g) h + g x), 0 leaves x; S_BLOCK 1 runs the block: RMSNorm, rotary GQA
 * attention over the P cached keys/values (S_KBUF, S_VBUF: [B, G, S_CAP, Dh] buffers whose
 * first P positions are cached, S_CAP > P) and the new one, written at position P, SwiGLU.
 * S_HALF 1: the block's seven product weights are float16 (else float32); their products are
 * summed in the same order either way. first_mix 0 skips the first layer's mixing, last_block 0 the last layer's block (a call that stops at the
 * memory read, and the one after it). With final_norm, each row ends with the side
 * network's output: out [B, d] = last [B, d] + final_gate * (up [d, s] . RMSNorm(x)). */
int side_decode_layers(int64_t J, int64_t B, int64_t d, int64_t s, int64_t H, int64_t G, int64_t Dh, int64_t F,
                       const int64_t *table, const float *gates, const int64_t *keep, float *x, const float *cos,
                       const float *sin, int64_t P, const uint8_t *key_mask, int64_t ldm, float eps, int first_mix,
                       int last_block, const float *final_norm, float final_eps, const float *up, float final_gate,
                       const float *last, float *out, int nthreads, int isa) {
    const int simd = isa > 0;
    if (B < nthreads)
        return side_rows_team(J, B, d, s, H, G, Dh, F, table, gates, keep, x, cos, sin, P, key_mask, ldm, eps,
                              first_mix, last_block, final_norm, final_eps, up, final_gate, last, out, nthreads, isa);
    const int64_t nq = H * Dh, nkv = G * Dh, per = H / G, S = P + 1;
    const float scaling = 1.0f / sqrtf((float)Dh);
    int failed = 0;
    /* rows are independent through every layer: each thread takes whole rows */
    const int nt = (int)(B < nthreads ? B : (nthreads < 1 ? 1 : nthreads));
    #pragma omp parallel num_threads(nt)
    {
        float *hn = (float *)malloc(sizeof(float) * (s > F ? s : F)), *q = (float *)malloc(sizeof(float) * nq);
        float *kv = (float *)malloc(sizeof(float) * 2 * nkv), *att = (float *)malloc(sizeof(float) * nq);
        float *y = (float *)malloc(sizeof(float) * s), *g = (float *)malloc(sizeof(float) * 2 * F);
        float *scores = (float *)malloc(sizeof(float) * 2 * S), *fin = (float *)malloc(sizeof(float) * d);
        if (!hn || !q || !kv || !att || !y || !g || !scores || !fin) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (failed) continue;
            float *xb = x + b * s;
            for (int64_t j = 0; j < J; j++) {
                const int64_t *t = table + j * SIDE_WORDS;
                if (t[S_MIX] && (j || first_mix)) {
                    const float *h = (const float *)(intptr_t)t[S_STATE] + b * d;
                    const float gj = gates[j], keepw = 1.0f - gates[j];
                    for (int64_t i = 0; i < s; i++)
                        xb[i] = t[S_MIX] == 2 ? h[keep[i]] : keepw * h[keep[i]] + gj * xb[i];
                }
                if (!t[S_BLOCK] || (j == J - 1 && !last_block)) continue;
                const float *kn = (const float *)(intptr_t)t[S_KBUF], *vn = (const float *)(intptr_t)t[S_VBUF];
                const int64_t nc = t[S_CAP];
                side_norm(xb, (const float *)(intptr_t)t[S_ATTN_NORM], eps, s, hn);
                const int half = (int)t[S_HALF];
                rows_dot((const void *)(intptr_t)t[S_Q], half, 0, nq, s, hn, q, simd);
                rows_dot((const void *)(intptr_t)t[S_K], half, 0, nkv, s, hn, kv, simd);
                rows_dot((const void *)(intptr_t)t[S_V], half, 0, nkv, s, hn, kv + nkv, simd);
                side_cache_write(t, b, H, G, Dh, P, q, kv, cos, sin);
                for (int64_t h = 0; h < H; h++) {
                    const int64_t row = b * G + h / per;
                    attend(q + h * Dh, kn + row * nc * Dh, vn + row * nc * Dh, S, Dh,
                           key_mask ? key_mask + b * ldm : NULL, scaling, scores, att + h * Dh, NULL, isa);
                }
                rows_dot((const void *)(intptr_t)t[S_O], half, 0, s, nq, att, y, simd);
                for (int64_t i = 0; i < s; i++) xb[i] += y[i];
                side_norm(xb, (const float *)(intptr_t)t[S_MLP_NORM], eps, s, hn);
                rows_dot((const void *)(intptr_t)t[S_GATE], half, 0, F, s, hn, g, simd);
                rows_dot((const void *)(intptr_t)t[S_UP], half, 0, F, s, hn, g + F, simd);
                swiglu(g, g + F, hn, F, isa);
                rows_dot((const void *)(intptr_t)t[S_DOWN], half, 0, s, F, hn, y, simd);
                for (int64_t i = 0; i < s; i++) xb[i] += y[i];
            }
            if (final_norm) {
                side_norm(xb, final_norm, final_eps, s, hn);
                rows_dot(up, 0, 0, d, s, hn, fin, simd);
                for (int64_t i = 0; i < d; i++) out[b * d + i] = last[b * d + i] + final_gate * fin[i];
            }
        }
        free(hn), free(q), free(kv), free(att), free(y), free(g), free(scores), free(fin);
    }
    return failed ? -1 : 0;
}

/* Per row of logits x [N, V] (row stride ldx): out[3n] = logsumexp, out[3n+1] = entropy of
 * the softmax (-sum p log p), out[3n+2] = the largest log-probability, in two passes over
 * the row (its max, then the sums of e = exp(x - max) and e * (x - max)) instead of the
 * several vocabulary-wide tensors torch makes for them: lse = max + log S, entropy =
 * log S - T / S, max log-prob = -log S. Differences below -104 count as -104 (their
 * exponentials vanish either way, and a -inf logit gives no 0 * inf). A NaN logit makes its
 * row's three NaN, as in torch. */
#ifdef __x86_64__
AVX512 static void logit_stats512(const float *x, int64_t V, double *S, double *T, float *mx) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0; /* vmaxps drops a NaN: they are looked for beside it */
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, v);
    }
    float mm = _mm512_reduce_max_ps(m);
    for (; i < V; i++) {
        nan |= x[i] != x[i];
        mm = x[i] > mm ? x[i] : mm;
    }
    if (nan) {
        *S = *T = NAN, *mx = NAN;
        return;
    }
    const __m512 mv = _mm512_set1_ps(mm), lo = _mm512_set1_ps(-104.0f);
    __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
    for (i = 0; i < V; i += 16) {
        const __mmask16 k = V - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - i)) - 1);
        const __m512 dlt = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv), lo);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(dlt));
        s = _mm512_add_ps(s, e);
        t = _mm512_fmadd_ps(e, dlt, t);
    }
    *S = _mm512_reduce_add_ps(s), *T = _mm512_reduce_add_ps(t), *mx = mm;
}
#endif

static void logit_stats_portable(const float *x, int64_t V, double *S, double *T, float *mx) {
    float mm = -INFINITY;
    for (int64_t i = 0; i < V; i++) {
        if (x[i] != x[i]) {
            *S = *T = NAN, *mx = NAN;
            return;
        }
        mm = x[i] > mm ? x[i] : mm;
    }
    double s = 0.0, t = 0.0;
    for (int64_t i = 0; i < V; i++) {
        float dlt = x[i] - mm;
        dlt = dlt < -104.0f ? -104.0f : dlt;
        const float e = expf(dlt);
        s += e, t += (double)e * dlt;
    }
    *S = s, *T = t, *mx = mm;
}

void logit_stats(const float *x, int64_t N, int64_t V, int64_t ldx, float *out, int nthreads, int isa) {
    const int nt = N < nthreads ? (int)N : nthreads; /* one row is ~50k floats: not worth a team */
    #pragma omp parallel for schedule(static) num_threads(nt > 0 ? nt : 1)
    for (int64_t n = 0; n < N; n++) {
        double S, T;
        float mx;
#ifdef __x86_64__
        if (isa == 3) logit_stats512(x + n * ldx, V, &S, &T, &mx);
        else
#endif
            logit_stats_portable(x + n * ldx, V, &S, &T, &mx);
        if (mx == -INFINITY) { /* every logit -inf: no distribution (torch: -inf, NaN, NaN) */
            out[3 * n] = -INFINITY, out[3 * n + 1] = out[3 * n + 2] = NAN;
            continue;
        }
        const double ls = log(S);
        out[3 * n] = (float)(mx + ls);
        out[3 * n + 1] = (float)(ls - T / S);
        out[3 * n + 2] = (float)(-ls);
    }
}

/* out[n] = the index of row n's largest value of x [N, V] (row stride ldx), as torch.argmax:
 * the first of equal maxima, and the first NaN where a row holds one (NaN counts as the
 * largest). The vector path keeps, per lane, the first index of that lane's maximum, then
 * takes the lanes' best (ties: the lower index), so both paths agree. */
static int64_t argmax_portable(const float *x, int64_t V) {
    int64_t best = 0;
    for (int64_t i = 0; i < V; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

#ifdef __x86_64__
AVX2F static int64_t argmax_avx2(const float *x, int64_t V) {
    if (V < 8) return argmax_portable(x, V);
    __m256 best = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
    __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), idx = at;
    const __m256i step = _mm256_set1_epi32(8);
    int64_t i = 8;
    for (; i + 8 <= V; i += 8) {
        idx = _mm256_add_epi32(idx, step);
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ); /* strictly greater: a lane keeps its first */
        best = _mm256_blendv_ps(best, v, gt);
        at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), gt));
    }
    if (_mm256_movemask_ps(nan)) return argmax_portable(x, V); /* the first NaN, wherever it is */
    float bv[8];
    int32_t bi[8];
    _mm256_storeu_ps(bv, best);
    _mm256_storeu_si256((__m256i *)bi, at);
    int64_t b = bi[0];
    float m = bv[0];
    for (int r = 1; r < 8; r++)
        if (bv[r] > m || (bv[r] == m && bi[r] < b)) m = bv[r], b = bi[r];
    for (; i < V; i++) {
        if (x[i] != x[i]) return argmax_portable(x, V);
        if (x[i] > m) m = x[i], b = i;
    }
    return b;
}
#endif

void argmax_rows(const float *x, int64_t N, int64_t V, int64_t ldx, int64_t *out, int isa) {
    for (int64_t n = 0; n < N; n++) {
#ifdef __x86_64__
        if (isa > 0 && V < (1LL << 31)) {
            out[n] = argmax_avx2(x + n * ldx, V);
            continue;
        }
#endif
        out[n] = argmax_portable(x + n * ldx, V);
    }
}

/* The side network's memory read (MemoryReader) for one new token per row, in the backbone's
 * key space at the memory layer. Per row b and query head h (group g = h / (H / G)):
 *   a_mem, lse_mem: position-free attention of q[b, h] over the retrieved keys/values [b, h]
 *       (S slots, mask [b, h] uint8: real ones);
 *   lse_local: the log-sum-exp of the rotated query qr[b, h] against the window's rotated keys
 *       of group g (P1 of them, key p of row b at kr + b*sb + g*sg + p*D; kmask [b] uint8 of
 *       ldm bytes, NULL: all real);
 *   w = sigmoid(lse_mem - lse_local) (the joint softmax's share of memory), or sigmoid(gate[h])
 *       when gate is given (the gated mode); w = 0 for a head that retrieved nothing;
 *   delta[b, h] = w (a_mem - a_local[b, h]).
 * q, qr, a_local, delta [B, H, D]; keys, values [B, H, S, D]; all float32 and contiguous.
 * qr NULL: q rotated here by cos, sin [B, D] (each row's position; rotate-half layout).
 * Returns 0, or -1 when a scratch allocation failed (delta not written). */
int memory_read_step(int64_t B, int64_t H, int64_t G, int64_t D, int64_t S, int64_t P1, const float *q,
                     const float *qr, const float *cos, const float *sin, const float *keys, const float *values,
                     const uint8_t *mask, const float *kr, int64_t sb, int64_t sg, const uint8_t *kmask, int64_t ldm,
                     const float *a_local, const float *gate, float scaling, float *delta, int nthreads,
                     int isa) {
    const int64_t n = B * H, most = S > P1 ? S : P1;
    int nt = (int)(n < nthreads ? n : nthreads);
    if (n * (S + P1) * D < (1 << 16)) nt = 1; /* a team costs more than it saves */
    int failed = 0;
    #pragma omp parallel num_threads(nt > 0 ? nt : 1)
    {
        float *scores = (float *)malloc(sizeof(float) * 2 * (size_t)most), *a = (float *)malloc(sizeof(float) * 2 * D);
        if (!scores || !a) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (!failed) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                const int64_t b = i / H, h = i % H, g = h / (H / G);
                float lse_mem, lse_local;
                attend(q + i * D, keys + i * S * D, values + i * S * D, S, D, mask + i * S, scaling, scores, a,
                       &lse_mem, isa);
                float *out = delta + i * D;
                if (lse_mem == -INFINITY) {
                    memset(out, 0, sizeof(float) * D);
                    continue;
                }
                float w;
                if (gate) {
                    w = 1.0f / (1.0f + expf(-gate[h]));
                } else {
                    const float *x = qr ? qr + i * D : a + D;
                    if (!qr) { /* rotated here: a's second half is free */
                        memcpy(a + D, q + i * D, sizeof(float) * D);
                        rotary(a + D, cos + b * D, sin + b * D, D);
                    }
                    attend(x, kr + b * sb + g * sg, NULL, P1, D, kmask ? kmask + b * ldm : NULL, scaling,
                           scores, NULL, &lse_local, isa);
                    w = 1.0f / (1.0f + expf(lse_local - lse_mem));
                }
                const float *al = a_local + i * D;
                for (int64_t j = 0; j < D; j++) out[j] = w * (a[j] - al[j]);
            }
        }
        free(scores);
        free(a);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------ the token cache's mixture */

/* softmax of n floats in place (torch's: exp(x - max) / sum); every x -inf gives NaN as torch */
static void softmax_inplace(float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) x[i] = expf(x[i] - m), s += x[i];
    for (int64_t i = 0; i < n; i++) x[i] /= s;
}

/* the weight of the candidates whose token is the heaviest one's (the first heaviest) */
static float agreement(const float *w, const int64_t *nxt, int64_t n) {
    int64_t top = 0;
    for (int64_t i = 1; i < n; i++) top = w[i] > w[top] ? i : top;
    float a = 0.0f;
    for (int64_t i = 0; i < n; i++) a += nxt[i] == nxt[top] ? w[i] : 0.0f;
    return a;
}

static int cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* log(distinct next tokens among the valid neighbours) / log(valid neighbours, at least 2) */
static float vote_spread(const float *sims, const int64_t *nxt, int64_t k, int row_valid, int64_t *tmp) {
    int64_t nv = 0;
    for (int64_t i = 0; i < k; i++) {
        const int ok = row_valid && isfinite(sims[i]);
        tmp[i] = ok ? nxt[i] : -1;
        nv += ok;
    }
    qsort(tmp, (size_t)k, sizeof(int64_t), cmp_i64);
    int64_t distinct = 1 - (tmp[0] < 0);
    for (int64_t i = 1; i < k; i++) distinct += tmp[i] != tmp[i - 1];
    return logf((float)(distinct < 1 ? 1 : distinct)) / logf((float)(nv < 2 ? 2 : nv));
}

/* TokenCacheReader.mix (nn/token_cache.py) for N rows of a decode step, in one call: the
 * logits' statistics, the gates, the mixture's weights and the mixed logits.
 *   logits, out [N, V] float32 (rows contiguous, out may not alias logits);
 *   sims [N, k] float32 (-inf: padding, best first), nxt [N, k] int64;
 *   clen, cnxt [N, c] int64 (match lengths, 0: none; next tokens), c = 0 without the copy read;
 *   params: log_tau, gate[5], spread_gate[2], copy_log_scale, copy_gate[5] (14 floats; the
 *   spread and copy entries are read only where `spread`, `copy` say).
 * Per row: out = logits + log pi_model, and at each voted token v (the k + c candidates' next
 * tokens, padding -> 0) the mixture's logit lse + logsumexp(log pi_model + logits[v] - lse,
 * log pi_knn + log vote_knn(v), log pi_copy + log vote_copy(v)), or logits[v] where memory is
 * silent (log pi_model = 0). Returns 0, -1 when a scratch allocation failed (out not written), or
 * -2 when a candidate's token is >= V (out not valid). */
int token_cache_mix(int64_t N, int64_t V, const float *logits, float *out, const float *sims, const int64_t *nxt,
                    int64_t k, const int64_t *clen, const int64_t *cnxt, int64_t c, const float *params, int spread,
                    int copy, int nthreads, int isa) {
    const int64_t kc = k + c;
    float *stats = (float *)malloc(sizeof(float) * 3 * (N > 0 ? N : 1));
    float *scratch = (float *)malloc(sizeof(float) * (k + c + 1) * (N > 0 ? N : 1));
    int64_t *tmp = (int64_t *)malloc(sizeof(int64_t) * (k + 1) * (N > 0 ? N : 1));
    if (!stats || !scratch || !tmp) {
        free(stats), free(scratch), free(tmp);
        return -1;
    }
    logit_stats(logits, N, V, V, stats, nthreads, isa);
    const float tau = expf(params[0]), *gate = params + 1, *sgate = params + 6, *cgate = params + 9;
    const float cscale = expf(params[8]);
    const int nt = N < nthreads ? (int)N : nthreads;
    int bad = 0;
    #pragma omp parallel for schedule(static) num_threads(nt > 0 ? nt : 1)
    for (int64_t n = 0; n < N; n++) {
        const float lse = stats[3 * n], ent = stats[3 * n + 1], lpmax = stats[3 * n + 2];
        const float *sm = k ? sims + n * k : NULL, *lg = logits + n * V;
        const int64_t *nx = k ? nxt + n * k : NULL, *cl = c ? clen + n * c : NULL, *cn = c ? cnxt + n * c : NULL;
        float *wk = scratch + n * (k + c + 1), *wc = wk + k;
        float a_knn = -INFINITY, a_copy = -INFINITY;
        if (k) {
            const int valid = isfinite(sm[0]);
            for (int64_t i = 0; i < k; i++) wk[i] = (valid ? sm[i] : 0.0f) / tau;
            softmax_inplace(wk, k);
            for (int64_t i = 0; i < k; i++) wk[i] = valid ? wk[i] : 0.0f;
            const float s0 = valid ? sm[0] : 0.0f;
            float a = gate[0] + s0 * gate[1] + ent * gate[2] + lpmax * gate[3] + agreement(wk, nx, k) * gate[4];
            if (spread) {
                const float sp = vote_spread(sm, nx, k, valid, tmp + n * (k + 1));
                a += sp * sgate[0] + sp * s0 * sgate[1];
            }
            a_knn = valid ? a : -INFINITY;
        }
        const int64_t cv = copy ? c : 0; /* without the copy read its candidates get no votes */
        if (cv) {
            int any = 0;
            int64_t longest = 0;
            for (int64_t i = 0; i < cv; i++) any |= cl[i] > 0, longest = cl[i] > longest ? cl[i] : longest;
            for (int64_t i = 0; i < cv; i++) wc[i] = !any ? 0.0f : cl[i] > 0 ? cscale * (float)cl[i] : -INFINITY;
            softmax_inplace(wc, cv);
            for (int64_t i = 0; i < cv; i++) wc[i] = cl[i] > 0 ? wc[i] : 0.0f;
            const float y = cgate[0] + log1pf((float)longest) * cgate[1] + agreement(wc, cn, cv) * cgate[2] +
                            ent * cgate[3] + lpmax * cgate[4];
            a_copy = any ? y : -INFINITY;
        }
        /* log_softmax([0, a_knn, a_copy]) */
        const float m = a_knn > 0.0f ? (a_copy > a_knn ? a_copy : a_knn) : (a_copy > 0.0f ? a_copy : 0.0f);
        const float ls = logf(expf(-m) + expf(a_knn - m) + expf(a_copy - m));
        const float lp0 = 0.0f - m - ls, lp1 = a_knn - m - ls, lp2 = a_copy - m - ls;
        float *o = out + n * V;
        for (int64_t v = 0; v < V; v++) o[v] = lg[v] + lp0;
        for (int64_t j = 0; j < kc; j++) {
            int64_t v = j < k ? nx[j] : cn[j - k];
            v = v < 0 ? 0 : v;
            if (v >= V) { /* a stored token the head has no logit for: refused, nothing read past V */
                #pragma omp atomic write
                bad = 1;
                continue;
            }
            const float at_model = lg[v];
            if (!(lp0 < 0.0f)) { /* memory silent: the model's logit, bit for bit */
                o[v] = at_model;
                continue;
            }
            float t[3];
            int nterm = 0;
            t[nterm++] = lp0 + (at_model - lse);
            if (k) {
                float vote = 0.0f;
                for (int64_t i = 0; i < k; i++) vote += (nx[i] < 0 ? 0 : nx[i]) == v ? wk[i] : 0.0f;
                t[nterm++] = lp1 + logf(vote > 1e-30f ? vote : 1e-30f);
            }
            if (cv) {
                float vote = 0.0f;
                for (int64_t i = 0; i < cv; i++) vote += (cn[i] < 0 ? 0 : cn[i]) == v ? wc[i] : 0.0f;
                t[nterm++] = lp2 + logf(vote > 1e-30f ? vote : 1e-30f);
            }
            float tm = t[0];
            for (int i = 1; i < nterm; i++) tm = t[i] > tm ? t[i] : tm;
            tm = isinf(tm) ? 0.0f : tm; /* as torch.logsumexp: all -inf gives -inf, not NaN */
            float se = 0.0f;
            for (int i = 0; i < nterm; i++) se += expf(t[i] - tm);
            o[v] = logf(se) + tm + lse;
        }
    }
    free(stats), free(scratch), free(tmp);
    return bad ? -2 : 0;
}
