/* NF4 (bitsandbytes layout) matmul kernels for x86 CPUs: AVX2+FMA with OpenMP, and a
 * portable scalar path. Called from Python through ctypes (kernels/cpu.py); no Python or
 * torch headers.
 *
 * Weight layout: W [N, K] read flat row-major, element e = n*K + k; its 4-bit code index
 * sits in byte e/2, high nibble when e is even; block e/blocksize has scale absmax[...].
 * Value = NF4[idx] * absmax[block], in fp32.
 *
 *   nf4_dequant_rows: W[n0:n1, :] -> fp32 [n1-n0, K] (any K, blocks may span rows).
 *   nf4_gemv:         y[m, n] = sum_k x[m, k] * W[n, k] for small M, fused (K must be a
 *                     multiple of blocksize, blocksize a multiple of 32).
 *
 * The AVX2 path looks code values up with two 8-entry vpermps and a blend on bit 3 of the
 * index (lookup8). Shuffle ports are the bottleneck of a 4-bit GEMV on x86, so the nibbles
 * are unpacked with per-lane variable shifts of a broadcast word (ALU ops), leaving two
 * shuffles per 8 weights.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* Below this many weights per thread, one thread is about as fast as a team and does not
 * stall at a barrier when another process holds the other core (decode of a small model
 * runs hundreds of such products per token). */
#define MIN_WEIGHTS_PER_THREAD (1 << 19)

static int pick_threads(int64_t weights, int nthreads) {
    int64_t useful = weights / MIN_WEIGHTS_PER_THREAD;
    if (useful < 1) useful = 1;
    return (int)(useful < nthreads ? useful : nthreads);
}

int nf4_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* ---------------------------------------------------------------- scalar paths */

static inline float nf4_at(const uint8_t *packed, const float *absmax, int64_t e, int64_t bs) {
    uint8_t b = packed[e >> 1];
    uint8_t idx = (e & 1) ? (b & 0xF) : (b >> 4);
    return NF4[idx] * absmax[e / bs];
}

static void dequant_rows_scalar(const uint8_t *packed, const float *absmax, float *out,
                                int64_t n0, int64_t n1, int64_t K, int64_t bs, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k++) o[k] = nf4_at(packed, absmax, n * K + k, bs);
    }
}

static void gemv_scalar(const float *x, int64_t ldx, int64_t M, const uint8_t *packed,
                        const float *absmax, float *y, int64_t ldy, int64_t N, int64_t K,
                        int64_t bs, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            float acc = 0.0f;
            for (int64_t k0 = 0; k0 < K; k0 += bs) {
                float part = 0.0f;
                const uint8_t *p = packed + (n * K + k0) / 2;
                for (int64_t j = 0; j < bs; j += 2) {
                    part += NF4[p[j / 2] >> 4] * xm[k0 + j] + NF4[p[j / 2] & 0xF] * xm[k0 + j + 1];
                }
                acc += part * absmax[(n * K + k0) / bs];
            }
            y[m * ldy + n] = acc;
        }
    }
}

/* ---------------------------------------------------------------- AVX2 paths */

#define AVX2 __attribute__((target("avx2,fma")))

/* 4 packed bytes (8 weights) -> the 8 fp32 code values, in element order.
 * The 32-bit word is broadcast to all lanes; lane j shifts element j's nibble down to bits
 * 0-3 (vpermps reads only bits 0-2) and, in a second copy, its bit 3 up to the sign bit
 * (the blend mask). Little-endian: byte i holds element 2i high, 2i+1 low. */
AVX2 static inline __m256 lookup8(const uint8_t *p, __m256 tab_lo, __m256 tab_hi) {
    const __m256i to_idx = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    const __m256i to_sign = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4);
    int32_t word;
    memcpy(&word, p, 4);
    __m256i w = _mm256_set1_epi32(word);
    __m256i idx = _mm256_srlv_epi32(w, to_idx);
    __m256 sign = _mm256_castsi256_ps(_mm256_sllv_epi32(w, to_sign));
    __m256 lo = _mm256_permutevar8x32_ps(tab_lo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(tab_hi, idx);
    return _mm256_blendv_ps(lo, hi, sign);
}

AVX2 static void dequant_rows_avx2(const uint8_t *packed, const float *absmax, float *out,
                                   int64_t n0, int64_t n1, int64_t K, int64_t bs, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = n0; n < n1; n++) {
        const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
        float *o = out + (n - n0) * K;
        const uint8_t *p = packed + n * K / 2;
        const float *am = absmax + n * K / bs;
        for (int64_t k0 = 0; k0 < K; k0 += bs) {
            __m256 s = _mm256_set1_ps(am[k0 / bs]);
            for (int64_t k = k0; k < k0 + bs; k += 8)
                _mm256_storeu_ps(o + k, _mm256_mul_ps(lookup8(p + k / 2, tab_lo, tab_hi), s));
        }
    }
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One weight row n against MR rows of x (row stride ldx); fully unrolled for
 * MR in {1, 2, 4}. Per block the products accumulate unscaled, then one FMA applies the
 * block's absmax. NACC independent partial sums per x row hide the FMA latency. */
#define NACC(MR) ((MR) == 1 ? 4 : (MR) == 2 ? 2 : 1)

__attribute__((always_inline)) AVX2 static inline void
gemv_row(const int MR, const float *x, int64_t ldx, int64_t K, const uint8_t *p, const float *am,
         int64_t bs, float *y, int64_t ldy) {
    const __m256 tab_lo = _mm256_loadu_ps(NF4), tab_hi = _mm256_loadu_ps(NF4 + 8);
    __m256 acc[4], part[4][4];
    for (int m = 0; m < MR; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += bs) {
        for (int m = 0; m < MR; m++)
            for (int a = 0; a < NACC(MR); a++) part[m][a] = _mm256_setzero_ps();
        for (int64_t k = k0; k < k0 + bs; k += 32) {
            for (int q = 0; q < 4; q++) {
                __m256 w = lookup8(p + k / 2 + 4 * q, tab_lo, tab_hi);
                for (int m = 0; m < MR; m++) {
                    __m256 xv = _mm256_loadu_ps(x + m * ldx + k + 8 * q);
                    part[m][q % NACC(MR)] = _mm256_fmadd_ps(w, xv, part[m][q % NACC(MR)]);
                }
            }
        }
        __m256 s = _mm256_set1_ps(am[k0 / bs]);
        for (int m = 0; m < MR; m++) {
            __m256 sum = part[m][0];
            for (int a = 1; a < NACC(MR); a++) sum = _mm256_add_ps(sum, part[m][a]);
            acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
        }
    }
    for (int m = 0; m < MR; m++) y[m * ldy] = hsum(acc[m]);
}

AVX2 static void gemv_avx2(const float *x, int64_t ldx, int64_t M, const uint8_t *packed,
                           const float *absmax, float *y, int64_t ldy, int64_t N, int64_t K,
                           int64_t bs, int nt) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = packed + n * K / 2;
        const float *am = absmax + n * K / bs;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) gemv_row(4, x + m * ldx, ldx, K, p, am, bs, y + m * ldy + n, ldy);
        for (; m + 2 <= M; m += 2) gemv_row(2, x + m * ldx, ldx, K, p, am, bs, y + m * ldy + n, ldy);
        for (; m < M; m++) gemv_row(1, x + m * ldx, ldx, K, p, am, bs, y + m * ldy + n, ldy);
    }
}

/* ---------------------------------------------------------------- entry points */

/* W[n0:n1, :] -> out, fp32 row-major [n1-n0, K]. use_avx2 needs K % bs == 0, bs % 32 == 0. */
void nf4_dequant_rows(const uint8_t *packed, const float *absmax, float *out, int64_t n0,
                      int64_t n1, int64_t K, int64_t bs, int nthreads, int use_avx2) {
    int nt = pick_threads((n1 - n0) * K, nthreads);
    if (use_avx2 && K % bs == 0 && bs % 32 == 0)
        dequant_rows_avx2(packed, absmax, out, n0, n1, K, bs, nt);
    else
        dequant_rows_scalar(packed, absmax, out, n0, n1, K, bs, nt);
}

/* y[m, n] (row stride ldy) = sum_k x[m, k] (row stride ldx) * W[n, k]. Needs K % bs == 0,
 * bs even; the AVX2 path also bs % 32 == 0. */
void nf4_gemv(const float *x, int64_t ldx, int64_t M, const uint8_t *packed, const float *absmax,
              float *y, int64_t ldy, int64_t N, int64_t K, int64_t bs, int nthreads, int use_avx2) {
    int nt = pick_threads(N * K * (M < 4 ? M : 4), nthreads);
    if (use_avx2 && bs % 32 == 0)
        gemv_avx2(x, ldx, M, packed, absmax, y, ldy, N, K, bs, nt);
    else
        gemv_scalar(x, ldx, M, packed, absmax, y, ldy, N, K, bs, nt);
}
