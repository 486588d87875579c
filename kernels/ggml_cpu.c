/* GGUF (ggml) block kernels for x86 CPUs, called through ctypes (kernels/ggml_cpu.py).
 *
 * A weight [N, K] is N rows of row_bytes bytes, each row K/QK blocks in the file's own
 * format (kernels/ggml.py documents Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K).
 *
 *   ggml_dequant_rows: rows [n0, n1) -> fp32 [n1-n0, K], bit-identical to the gguf
 *                      package (same fp32 operations in the same order; built with
 *                      -ffp-contract=off so no multiply-add is fused).
 *   ggml_gemv_int8:    y = x W^T with x quantized to int8 blocks of 32 (an fp32 scale and
 *                      the scaled block sum, llama.cpp's Q8_1 idea): integer dot products
 *                      per block (vpmaddubsw, or vpdpbusd where AVX-VNNI exists), one fp32
 *                      FMA per block. Q4_0, Q4_1 with 8 or 16 weight rows as the lanes of
 *                      a vector; Q8_0 four weight rows per pass, or, packed (the LM head,
 *                      AVX-512 VNNI), 16 rows as lanes.
 *   ggml_gemv_f32:     y = x W^T from fp32 activations, fused per type with AVX2 (equal
 *                      to decode-then-dot up to summation order). Any type.
 *
 * A type id with LANES_PACKED set means Q4_0 / Q4_1 / Q8_0 blocks in the lanes layout
 * (kernels/ggml.py pack_lanes; rows a multiple of LANE_ROWS): every entry point takes it, the
 * int8 kernel reads it as it is, the others unpack one row at a time (same bits).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* AVX-VNNI (vpdpbusd on ymm) needs GCC >= 11 or clang >= 12 to compile; older compilers
 * build the AVX2 path only, and the library then reports no VNNI. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define HAVE_AVXVNNI 1
#else
#define HAVE_AVXVNNI 0
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };
enum { LANES_PACKED = 0x100, LANE_ROWS = 16 };

#define MIN_WEIGHTS_PER_THREAD (1 << 16)

static int pick_threads(int64_t work, int nthreads) {
    int64_t useful = work / MIN_WEIGHTS_PER_THREAD;
    if (useful < 1) useful = 1;
    return (int)(useful < nthreads ? useful : nthreads);
}

static inline float f16(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f); /* subnormal: man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

int ggml_block_elems(int type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q6_K: return 256;
    default: return 0;
    }
}

static inline int block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

int ggml_block_bytes(int type) { return block_bytes(type); }

/* Strips LANES_PACKED from *type; 1 if it was set on a type that has the layout (Q4_0, Q4_1,
 * Q8_0): on any other type the bit is ignored, so no row is unpacked from a layout it cannot have */
static inline int lanes_packed(int *type) {
    const int bit = *type & LANES_PACKED;
    *type &= ~LANES_PACKED;
    return bit && (*type == T_Q4_0 || *type == T_Q4_1 || *type == T_Q8_0);
}

/* Code dwords per block: 4 for Q4_0 / Q4_1 (16 bytes of nibbles), 8 for Q8_0 (32 bytes) */
static inline int code_dwords(int type) { return type == T_Q8_0 ? 8 : 4; }

/* Row n of a lanes-packed Q4_0 / Q4_1 / Q8_0 weight into out[row_bytes], its blocks as in the
 * file. A group of LANE_ROWS rows holds, per block: code_dwords x 64 bytes (code dword j of
 * rows 0..15), the rows' d halves, then (Q4_1) their m halves. */
static void unpack_row(int type, const uint8_t *w, int64_t row_bytes, int64_t n, uint8_t *out) {
    const int bb = block_bytes(type), off = type == T_Q4_1 ? 4 : 2, cw = code_dwords(type);
    const int64_t nb = row_bytes / bb, r = n % LANE_ROWS;
    const uint8_t *group = w + (n - r) * row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *src = group + b * LANE_ROWS * bb, *halves = src + 64 * cw;
        uint8_t *dst = out + b * bb;
        memcpy(dst, halves + 2 * r, 2);
        if (off == 4) memcpy(dst + 2, halves + 32 + 2 * r, 2);
        for (int j = 0; j < cw; j++) memcpy(dst + off + 4 * j, src + 64 * j + 4 * r, 4);
    }
}

/* Row n's blocks in the file's order: in place, or unpacked into tmp[row_bytes] when packed */
static inline const uint8_t *file_row(int type, int packed, const uint8_t *w, int64_t row_bytes, int64_t n,
                                      uint8_t *tmp) {
    if (!packed) return w + n * row_bytes;
    unpack_row(type, w, row_bytes, n, tmp);
    return tmp;
}

int ggml_cpu_features(void) {
    __builtin_cpu_init();
    int f = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) f |= 1;
#if HAVE_AVXVNNI
    if (__builtin_cpu_supports("avxvnni")) f |= 2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
        f |= 4;
#endif
    return f;
}

/* ---------------------------------------------------------------- exact block decode */

/* Q4_K's six-bit scale and min of sub-block j from its 12 packed scale bytes s. */
static inline void q4_k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void dequant_block(int type, const uint8_t *b, float *out) {
    switch (type) {
    case T_Q4_0: {
        float d = f16(b);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)(b[2 + j] & 0xF) - 8);
            out[j + 16] = d * (float)((int)(b[2 + j] >> 4) - 8);
        }
        break;
    }
    case T_Q4_1: {
        float d = f16(b), m = f16(b + 2);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)(b[4 + j] & 0xF) + m;
            out[j + 16] = d * (float)(b[4 + j] >> 4) + m;
        }
        break;
    }
    case T_Q5_0: {
        float d = f16(b);
        uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((int)((b[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
            out[j + 16] = d * (float)((int)((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
        break;
    }
    case T_Q8_0: {
        float d = f16(b);
        for (int j = 0; j < 32; j++) out[j] = (float)(int8_t)b[2 + j] * d;
        break;
    }
    case T_Q4_K: {
        float d = f16(b), dmin = f16(b + 2);
        const uint8_t *s = b + 4, *qs = b + 16;
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            q4_k_scale_min(s, j, &sc, &mn);
            float dd = d * (float)sc, dm = dmin * (float)mn;
            const uint8_t *q = qs + (j / 2) * 32;
            for (int l = 0; l < 32; l++) {
                int v = (j & 1) ? (q[l] >> 4) : (q[l] & 0xF);
                out[j * 32 + l] = dd * (float)v - dm;
            }
        }
        break;
    }
    case T_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = f16(b + 208);
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) {
                    int e = h * 128 + j * 32 + l;
                    uint8_t byte = ql[h * 64 + (j & 1) * 32 + l];
                    int lo = (j >= 2) ? (byte >> 4) : (byte & 0xF);
                    int hi = (qh[h * 32 + l] >> (2 * j)) & 3;
                    int q = (int)(int8_t)(uint8_t)(lo | (hi << 4)) - 32;
                    out[e] = (d * (float)sc[e / 16]) * (float)q;
                }
        break;
    }
    }
}

static void dequant_row(int type, const uint8_t *row, int64_t K, float *out) {
    int qk = ggml_block_elems(type), nb = ggml_block_bytes(type);
    for (int64_t b = 0; b < K / qk; b++) dequant_block(type, row + b * nb, out + b * qk);
}

void ggml_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, float *out, int64_t n0,
                       int64_t n1, int64_t K, int nthreads) {
    const int packed = lanes_packed(&type);
    int nt = pick_threads((n1 - n0) * K, nthreads);
    #pragma omp parallel num_threads(nt)
    {
        uint8_t *tmp = packed ? (uint8_t *)malloc((size_t)row_bytes) : NULL;
        #pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *row = file_row(type, packed, w, row_bytes, n, tmp);
            dequant_row(type, row, K, out + (n - n0) * K);
        }
        free(tmp);
    }
}

/* ---------------------------------------------------------------- fp32 activations */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float f16c(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static float dot_scalar(const float *a, const float *b, int64_t K) {
    float r = 0.0f;
    for (int64_t k = 0; k < K; k++) r += a[k] * b[k];
    return r;
}

/* One Q4_0 / Q4_1 / Q8_0 weight row against MX fp32 x rows (row stride ldx), fused: per block
 * the integer codes times x accumulate unscaled, then one FMA applies the block's scale; the
 * offset (Q4_1's m, Q4_0's -8d) multiplies the block's sum of x (xs, rows of nb). Equal to
 * decoding the row and taking the dot product, up to fp32 summation order. The codes are
 * converted once for the MX rows; per x row the operations and their order do not depend on
 * MX, so a row of a batch has the bits of the row alone. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void rows_dot_f32_t(
    const int type, const int MX, const uint8_t *row, const float *x, int64_t ldx, const float *xs, int64_t nb,
    float *out) {
    __m256 acc[4];
    float extra[4];
    for (int m = 0; m < MX; m++) {
        acc[m] = _mm256_setzero_ps();
        extra[m] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256 v0, v1, v2, v3;
        float d, mw = 0.0f;
        if (type == T_Q8_0) {
            const uint8_t *blk = row + b * 34;
            d = f16c(blk);
            __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
            __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
            v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0));
            v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)));
            v2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1));
            v3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)));
        } else {
            const int q1 = type == T_Q4_1;
            const uint8_t *blk = row + b * (q1 ? 20 : 18);
            d = f16c(blk);
            if (q1) mw = f16c(blk + 2);
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + (q1 ? 4 : 2)));
            __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
            v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            v2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            v3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        }
        for (int m = 0; m < MX; m++) {
            const float *xb = x + m * ldx + b * 32;
            __m256 s0 = _mm256_mul_ps(v0, _mm256_loadu_ps(xb));
            __m256 s1 = _mm256_mul_ps(v1, _mm256_loadu_ps(xb + 8));
            s0 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xb + 16), s0);
            s1 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xb + 24), s1);
            if (type == T_Q4_1) extra[m] += mw * xs[m * nb + b];
            else if (type == T_Q4_0) extra[m] += -8.0f * d * xs[m * nb + b];
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(d), acc[m]);
        }
    }
    for (int m = 0; m < MX; m++) out[m] = hsum8(acc[m]) + extra[m];
}

#define ROWS_F32_TYPES(MX)                                                                          \
    if (type == T_Q4_1) rows_dot_f32_t(T_Q4_1, MX, row, x, ldx, xs, nb, out);                      \
    else if (type == T_Q4_0) rows_dot_f32_t(T_Q4_0, MX, row, x, ldx, xs, nb, out);                 \
    else rows_dot_f32_t(T_Q8_0, MX, row, x, ldx, xs, nb, out);

AVX2 static void rows_dot_f32(int type, int MX, const uint8_t *row, const float *x, int64_t ldx, const float *xs,
                              int64_t nb, float *out) {
    if (MX == 4) { ROWS_F32_TYPES(4) }
    else if (MX == 3) { ROWS_F32_TYPES(3) }
    else if (MX == 2) { ROWS_F32_TYPES(2) }
    else { ROWS_F32_TYPES(1) }
}

/* 32 small integers (bytes, element order; signed or not) times 32 fp32 x: the two
 * partial sums of elements 0-15 and 16-31 (K-quant scales change every 16). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
dot32(__m256i q, const float *xb, const int is_signed, __m256 *s_lo, __m256 *s_hi) {
    __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
    __m256 v0, v1, v2, v3;
    if (is_signed) {
        v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
        v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
        v2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        v3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    } else {
        v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
        v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
        v2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        v3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
    }
    *s_lo = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(v0, _mm256_loadu_ps(xb)));
    *s_hi = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xb + 24), _mm256_mul_ps(v2, _mm256_loadu_ps(xb + 16)));
}

/* Bit j of the 32-bit word at p, as byte j: 0x10 where set, 0 where not (Q5_0's fifth bits). */
AVX2 static inline __m256i fifth_bits(const uint8_t *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), which);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* Q5_0, Q4_K and Q6_K rows against fp32 x, fused like row_dot_f32. xs: sums of x per 32. */
AVX2 static float row_dot_f32_q5_0(const uint8_t *row, const float *x, const float *xs, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float extra = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 22;
        float d = f16c(blk);
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 6));
        __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
        __m256i v = _mm256_or_si256(_mm256_set_m128i(hi, lo), fifth_bits(blk + 2));
        __m256 s0, s1;
        dot32(v, x + b * 32, 0, &s0, &s1);
        acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(d), acc);
        extra -= 16.0f * d * xs[b];
    }
    return hsum8(acc) + extra;
}

AVX2 static float row_dot_f32_q4_k(const uint8_t *row, const float *x, const float *xs, int64_t nsb) {
    __m256 acc = _mm256_setzero_ps();
    float extra = 0.0f;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = row + sb * 144, *s = blk + 4, *qs = blk + 16;
        float d = f16c(blk), dmin = f16c(blk + 2);
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            q4_k_scale_min(s, j, &sc, &mn);
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + (j / 2) * 32));
            if (j & 1) q = _mm256_srli_epi16(q, 4);
            q = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
            __m256 s0, s1;
            dot32(q, x + sb * 256 + j * 32, 0, &s0, &s1);
            acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(d * (float)sc), acc);
            extra -= dmin * (float)mn * xs[sb * 8 + j];
        }
    }
    return hsum8(acc) + extra;
}

AVX2 static float row_dot_f32_q6_k(const uint8_t *row, const float *x, int64_t nsb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = row + sb * 210, *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        float d = f16c(blk + 208);
        for (int h = 0; h < 2; h++) {
            __m256i high = _mm256_loadu_si256((const __m256i *)(qh + h * 32));
            for (int j = 0; j < 4; j++) {
                __m256i lo = _mm256_loadu_si256((const __m256i *)(ql + h * 64 + (j & 1) * 32));
                if (j >= 2) lo = _mm256_srli_epi16(lo, 4);
                lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
                __m256i hb = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
                __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hb, 4)), _mm256_set1_epi8(32));
                int e = h * 128 + j * 32;
                __m256 s0, s1;
                dot32(q, x + sb * 256 + e, 1, &s0, &s1);
                acc = _mm256_fmadd_ps(s0, _mm256_set1_ps(d * (float)sc[e / 16]), acc);
                acc = _mm256_fmadd_ps(s1, _mm256_set1_ps(d * (float)sc[e / 16 + 1]), acc);
            }
        }
    }
    return hsum8(acc);
}

/* y[m, n] (row stride ldy) = sum_k x[m, k] (row stride ldx) * W[n, k] on fp32 x: fused for
 * every type with AVX2; the portable path decodes each row exactly into a buffer, then dots. */
void ggml_gemv_f32(int type, const uint8_t *w, int64_t row_bytes, const float *x, int64_t ldx, int64_t M,
                   float *y, int64_t ldy, int64_t N, int64_t K, int nthreads, int use_avx2) {
    const int packed = lanes_packed(&type);
    int nt = pick_threads(N * K, nthreads);
    if (use_avx2) {
        int64_t nb = K / 32;
        float *xs = (float *)malloc(sizeof(float) * M * nb);
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < nb; b++) {
                float t = 0.0f;
                for (int j = 0; j < 32; j++) t += x[m * ldx + b * 32 + j];
                xs[m * nb + b] = t;
            }
        #pragma omp parallel num_threads(nt)
        {
            uint8_t *tmp = packed ? (uint8_t *)malloc((size_t)row_bytes) : NULL;
            #pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const uint8_t *row = file_row(type, packed, w, row_bytes, n, tmp);
                if (type == T_Q4_0 || type == T_Q4_1 || type == T_Q8_0) { /* x rows four at a time */
                    for (int64_t m = 0; m < M; m += 4) {
                        float out[4];
                        int MX = M - m < 4 ? (int)(M - m) : 4;
                        rows_dot_f32(type, MX, row, x + m * ldx, ldx, xs + m * nb, nb, out);
                        for (int j = 0; j < MX; j++) y[(m + j) * ldy + n] = out[j];
                    }
                    continue;
                }
                for (int64_t m = 0; m < M; m++) {
                    const float *xm = x + m * ldx, *sm = xs + m * nb;
                    float v;
                    switch (type) {
                    case T_Q5_0: v = row_dot_f32_q5_0(row, xm, sm, nb); break;
                    case T_Q4_K: v = row_dot_f32_q4_k(row, xm, sm, nb / 8); break;
                    default: v = row_dot_f32_q6_k(row, xm, nb / 8); /* T_Q6_K */
                    }
                    y[m * ldy + n] = v;
                }
            }
            free(tmp);
        }
        free(xs);
        return;
    }
    #pragma omp parallel num_threads(nt)
    {
        float *buf = (float *)malloc(sizeof(float) * K);
        uint8_t *tmp = packed ? (uint8_t *)malloc((size_t)row_bytes) : NULL;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = file_row(type, packed, w, row_bytes, n, tmp);
            dequant_row(type, row, K, buf);
            for (int64_t m = 0; m < M; m++)
                y[m * ldy + n] = dot_scalar(buf, x + m * ldx, K);
        }
        free(buf);
        free(tmp);
    }
}

/* ---------------------------------------------------------------- int8 activations */

/* x [M, K] (row stride ldx) -> qx int8 [M, K], dx [M, stride] (scale per block of 32), sx
 * [M, stride] (scale * sum of the block's int8 values; zero past K/32). Round half away from
 * zero, like roundf. The SIMD versions give the same bits: the block's max |v| is exact in
 * any order, v * id is one rounding either way, and roundf is trunc(v) plus the sign where
 * |v - trunc(v)| >= 0.5 (v - trunc(v) is exact). Decode quantizes every product's input, so
 * a scalar loop here cost ~30% of an 8-row product. */
static void quantize_x_scalar(const float *x, int64_t ldx, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx,
                              int64_t stride) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * ldx;
        for (int64_t b = 0; b < stride; b++) dx[m * stride + b] = sx[m * stride + b] = 0.0f;
        for (int64_t b = 0; b < K / 32; b++) {
            const float *v = xm + b * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) {
                float a = v[j] < 0 ? -v[j] : v[j];
                if (a > amax) amax = a;
            }
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            if (!(id < INFINITY)) id = 0.0f; /* a block of tiny values (1/d overflows): all codes 0 */
            int sum = 0;
            int8_t *q = qx + m * K + b * 32;
            for (int j = 0; j < 32; j++) {
                float r = v[j] * id;
                int iv = r == r ? (int)roundf(r) : 0; /* NaN (an inf or NaN input): code 0 */
                q[j] = (int8_t)iv;
                sum += iv;
            }
            dx[m * stride + b] = d;
            sx[m * stride + b] = d * (float)sum;
        }
    }
}

/* roundf of 8 floats (|v| < 2^23), as int32 */
AVX2 static inline __m256i round_away8(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    __m256 step = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ),
                                _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(sign, v)));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, step));
}

AVX2 static void quantize_x_avx2(const float *x, int64_t ldx, int64_t M, int64_t K, int8_t *qx, float *dx,
                                 float *sx, int64_t stride) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * ldx;
        for (int64_t b = 0; b < stride; b++) dx[m * stride + b] = sx[m * stride + b] = 0.0f;
        for (int64_t b = 0; b < K / 32; b++) {
            const float *v = xm + b * 32;
            __m256 f[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                f[i] = _mm256_loadu_ps(v + 8 * i);
                amax = _mm256_max_ps(_mm256_andnot_ps(sign, f[i]), amax); /* a NaN is skipped, as above */
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
            float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            if (!(id < INFINITY)) id = 0.0f;
            __m256i q[4], total = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                __m256 r = _mm256_mul_ps(f[i], _mm256_set1_ps(id));
                q[i] = round_away8(_mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q))); /* NaN -> 0 */
                total = _mm256_add_epi32(total, q[i]);
            }
            /* int32 -> int8 in element order: packs interleave 128-bit lanes, the permute undoes it */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(qx + m * K + b * 32), p);
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            dx[m * stride + b] = d;
            sx[m * stride + b] = d * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

/* isa as in gemv_q8: 0 scalar, else AVX2 */
static void quantize_x(const float *x, int64_t ldx, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx,
                       int64_t stride, int isa) {
    (isa ? quantize_x_avx2 : quantize_x_scalar)(x, ldx, M, K, qx, dx, sx, stride);
}

/* The quantized activations themselves (tests: every path gives the scalar loop's bits). */
void ggml_quantize_x(const float *x, int64_t ldx, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx,
                     int64_t stride, int isa) {
    quantize_x(x, ldx, M, K, qx, dx, sx, stride, isa);
}

/* The int8 decode product of one Q8_0 weight row and one quantized x row, computed the same
 * way on every SIMD path and in every tiling, so all give the same bits (rows of a batch equal
 * the row alone; AVX2, AVX-VNNI and AVX-512 agree):
 *   per block b: p_b = 8 int32 lanes (lane j: codes 4j..4j+3 times the x bytes); d_b = dw_b * dx_b;
 *   acc[b % 2] = fma(float(p_b), d_b, acc[b % 2]): two accumulators, so that AVX-512 takes two
 *   blocks per instruction (lanes 0-7 the even block, 8-15 the odd one);
 *   y = hsum8(acc[0] + acc[1]).
 * (Q4_0 and Q4_1 take the rows-as-lanes kernel below.) */

/* sum over 32 lanes of u8 a * s8 b, as 8 int32 partial sums (no int16 overflow: |a*b| <= 128*127) */
AVX2 static inline __m256i dot_u8s8(__m256i a, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

#if HAVE_AVXVNNI
#define VNNI_TARGET "avx2,fma,f16c,avxvnni"
__attribute__((target(VNNI_TARGET))) static inline __m256i dot_u8s8_vnni(__m256i a, __m256i b) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
}
#else /* never chosen at run time (features report no VNNI); keeps one code path */
#define VNNI_TARGET "avx2,fma,f16c"
#define dot_u8s8_vnni dot_u8s8
#endif

/* A Q8_0 weight row's block scales dw [nb] */
AVX2 static void row_scales(const uint8_t *row, int64_t nb, float *dw) {
    for (int64_t b = 0; b < nb; b++) dw[b] = f16c(row + b * 34);
}

#define TILE256_TYPES(NAME, R, MX) NAME##_t(T_Q8_0, R, MX, row, row_bytes, qx, K, dw, dx, ldd, nb, out);

/* R weight rows x MX x rows, 256-bit: out[r * MX + m] = hsum8(acc0 + acc1). (R, MX) is (4, 1), (2, 2) or (1, 1); each is specialised with the type
 * as a constant, so the loops unroll and no branch stays. */
#define TILE256(NAME, DOT, TARGET)                                                                  \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_t(                    \
        const int type, const int R, const int MX, const uint8_t *row, int64_t row_bytes,         \
        const int8_t *qx, int64_t K, const float *dw, const float *dx, int64_t ldd, int64_t nb,    \
        float *out) {                                                                               \
        const int bb = block_bytes(type);                                                      \
        __m256 acc[4][2][2];                                                                        \
        for (int r = 0; r < R; r++)                                                                 \
            for (int m = 0; m < MX; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();         \
        for (int64_t b = 0; b < nb; b++) {                                                          \
            const int h = (int)(b & 1);                                                             \
            __m256i xq[2];                                                                          \
            for (int m = 0; m < MX; m++) xq[m] = _mm256_loadu_si256((const __m256i *)(qx + m * K + b * 32)); \
            for (int r = 0; r < R; r++) {                                                           \
                const uint8_t *blk = row + r * row_bytes + b * bb;                                  \
                const __m256 w_d = _mm256_set1_ps(dw[r * nb + b]);                                  \
                __m256i wq = _mm256_loadu_si256((const __m256i *)(blk + 2));                       \
                __m256i aw = _mm256_sign_epi8(wq, wq);                                              \
                for (int m = 0; m < MX; m++) {                                                      \
                    __m256i p = DOT(aw, _mm256_sign_epi8(xq[m], wq));                               \
                    __m256 d = _mm256_mul_ps(w_d, _mm256_set1_ps(dx[m * ldd + b]));                 \
                    acc[r][m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r][m][h]);         \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int m = 0; m < MX; m++) out[r * MX + m] = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1])); \
    }                                                                                               \
    __attribute__((target(TARGET))) static void NAME(int type, int R, int MX, const uint8_t *row,   \
                                                     int64_t row_bytes, const int8_t *qx, int64_t K, \
                                                     const float *dw, const float *dx, int64_t ldd,   \
                                                     int64_t nb, float *out) {                      \
        if (R == 4 && MX == 1) { TILE256_TYPES(NAME, 4, 1) }                                       \
        else if (R == 2 && MX == 2) { TILE256_TYPES(NAME, 2, 2) }                                  \
        else { TILE256_TYPES(NAME, 1, 1) }                                                         \
    }

TILE256(tile_avx2, dot_u8s8, "avx2,fma,f16c")
TILE256(tile_vnni, dot_u8s8_vnni, VNNI_TARGET)

/* Weight rows 2h, 2h+1 x x rows m, m+1 (h = 0, 1: a group of four rows), as TILE256's (2, 2)
 * with the same arithmetic, its block scales products read from dd [4][2][nb] (row, x row,
 * block; each dw * dx computed by the caller, as TILE256 computes it): per block a broadcast
 * load instead of two broadcasts and a multiply. */
#define TILE22D(NAME, DOT, TARGET)                                                                  \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_b(                   \
        const uint8_t *row, int64_t row_bytes, const int8_t *qx, int64_t K, const float *dd,     \
        int64_t nb, int64_t b, __m256 *a00, __m256 *a01, __m256 *a10, __m256 *a11) {              \
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(qx + b * 32));                     \
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(qx + K + b * 32));                 \
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + b * 34 + 2));                      \
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(row + row_bytes + b * 34 + 2));          \
        __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);                      \
        *a00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(a0, _mm256_sign_epi8(x0, w0))),              \
                               _mm256_broadcast_ss(dd + b), *a00);                                 \
        *a01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(a0, _mm256_sign_epi8(x1, w0))),              \
                               _mm256_broadcast_ss(dd + nb + b), *a01);                            \
        *a10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(a1, _mm256_sign_epi8(x0, w1))),              \
                               _mm256_broadcast_ss(dd + 2 * nb + b), *a10);                        \
        *a11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(a1, _mm256_sign_epi8(x1, w1))),              \
                               _mm256_broadcast_ss(dd + 3 * nb + b), *a11);                        \
    }                                                                                               \
    __attribute__((target(TARGET))) static void NAME(const uint8_t *row, int64_t row_bytes,         \
                                                     const int8_t *qx, int64_t K, const float *dd,  \
                                                     int64_t nb, float *out) {                      \
        __m256 e00 = _mm256_setzero_ps(), e01 = e00, e10 = e00, e11 = e00;                          \
        __m256 o00 = e00, o01 = e00, o10 = e00, o11 = e00;                                          \
        int64_t b = 0;                                                                              \
        for (; b + 1 < nb; b += 2) {                                                                \
            NAME##_b(row, row_bytes, qx, K, dd, nb, b, &e00, &e01, &e10, &e11);                     \
            NAME##_b(row, row_bytes, qx, K, dd, nb, b + 1, &o00, &o01, &o10, &o11);                 \
        }                                                                                           \
        if (b < nb) NAME##_b(row, row_bytes, qx, K, dd, nb, b, &e00, &e01, &e10, &e11);             \
        out[0] = hsum8(_mm256_add_ps(e00, o00));                                                    \
        out[1] = hsum8(_mm256_add_ps(e01, o01));                                                    \
        out[2] = hsum8(_mm256_add_ps(e10, o10));                                                    \
        out[3] = hsum8(_mm256_add_ps(e11, o11));                                                    \
    }

/* dd [4][2][nb] = dw [4][nb] (four rows' block scales) times dx rows 0, 1 (ldd apart): the
 * float products TILE256 forms one at a time */
AVX2 static void scale_products(const float *dw, const float *dx, int64_t ldd, int64_t nb, float *dd) {
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 2; j++) {
            const float *a = dw + r * nb, *c = dx + j * ldd;
            float *o = dd + (r * 2 + j) * nb;
            int64_t b = 0;
            for (; b + 8 <= nb; b += 8)
                _mm256_storeu_ps(o + b, _mm256_mul_ps(_mm256_loadu_ps(a + b), _mm256_loadu_ps(c + b)));
            for (; b < nb; b++) o[b] = a[b] * c[b];
        }
}

TILE22D(tile22d_avx2, dot_u8s8, "avx2,fma,f16c")
TILE22D(tile22d_vnni, dot_u8s8_vnni, VNNI_TARGET)

#if HAVE_AVXVNNI
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"

/* The codes of Q8_0 blocks b and b+1 (blk points at block b) as 64 bytes |w|, block b's 32
 * first, and in *neg the lanes where w < 0. */
__attribute__((target(AVX512_TARGET), always_inline)) static inline __m512i codes2(const uint8_t *blk, int bb,
                                                                                   __mmask64 *neg) {
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(blk + 2))),
                                   _mm256_loadu_si256((const __m256i *)(blk + bb + 2)), 1);
    *neg = _mm512_movepi8_mask(w);
    return _mm512_abs_epi8(w);
}

/* R weight rows x MX x rows, two blocks per instruction (the canonical arithmetic above: lanes
 * 0-7 accumulate the even blocks, 8-15 the odd ones; an odd last block goes to lanes 0-7). */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void tile512_t(
    const int type, const int R, const int MX, const uint8_t *row, int64_t row_bytes, const int8_t *qx, int64_t K,
    const float *dw, const float *dx, int64_t ldd, int64_t nb, float *out) {
    const int bb = block_bytes(type);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MX; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        __m512i xq[4];
        __m512 xd[4];
        for (int m = 0; m < MX; m++) {
            xq[m] = _mm512_loadu_si512((const void *)(qx + m * K + b * 32));
            xd[m] = _mm512_insertf32x8(_mm512_set1_ps(dx[m * ldd + b]), _mm256_set1_ps(dx[m * ldd + b + 1]), 1);
        }
        for (int r = 0; r < R; r++) {
            __mmask64 neg = 0;
            __m512i wq = codes2(row + r * row_bytes + b * bb, bb, &neg);
            __m512 wd = _mm512_insertf32x8(_mm512_set1_ps(dw[r * nb + b]), _mm256_set1_ps(dw[r * nb + b + 1]), 1);
            for (int m = 0; m < MX; m++) {
                __m512i xm = _mm512_mask_sub_epi8(xq[m], neg, _mm512_setzero_si512(), xq[m]);
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xm);
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(wd, xd[m]), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MX; m++) {
            __m256 lo = _mm512_castps512_ps256(acc[r][m]), hi = _mm512_extractf32x8_ps(acc[r][m], 1);
            if (b < nb) {
                const uint8_t *blk = row + r * row_bytes + b * bb;
                __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + m * K + b * 32)), p;
                __m256i wq = _mm256_loadu_si256((const __m256i *)(blk + 2));
                p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
                __m256 d = _mm256_mul_ps(_mm256_set1_ps(dw[r * nb + b]), _mm256_set1_ps(dx[m * ldd + b]));
                lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, lo);
            }
            out[r * MX + m] = hsum8(_mm256_add_ps(lo, hi));
        }
}

#define TILE512_TYPES(R, MX) tile512_t(T_Q8_0, R, MX, row, row_bytes, qx, K, dw, dx, ldd, nb, out);

/* R = 4 with MX = 1..4, or R = MX = 1 */
__attribute__((target(AVX512_TARGET))) static void tile_avx512(int type, int R, int MX, const uint8_t *row,
                                                               int64_t row_bytes, const int8_t *qx, int64_t K,
                                                               const float *dw, const float *dx, int64_t ldd,
                                                               int64_t nb, float *out) {
    if (R == 4 && MX == 4) { TILE512_TYPES(4, 4) }
    else if (R == 4 && MX == 3) { TILE512_TYPES(4, 3) }
    else if (R == 4 && MX == 2) { TILE512_TYPES(4, 2) }
    else if (R == 4 && MX == 1) { TILE512_TYPES(4, 1) }
    else { TILE512_TYPES(1, 1) }
}
#else
#define tile_avx512 tile_vnni /* never chosen at run time (features report no AVX-512 VNNI) */
#endif

/* ---------------------------------------------------- Q4 rows as SIMD lanes (the decode GEMV)
 *
 * For Q4_0 and Q4_1 a weight row is one lane of a vector (16 rows with AVX-512, 8 with AVX2),
 * so the scales of a block are one vector for all its rows, no horizontal sum is left to do,
 * and a weight block's codes, unpacked once, serve every x row. The rows' 16 code bytes of a
 * block are transposed in registers (dword j of every row in one vector), and each x dword is
 * broadcast against them. Per (weight row, x row) the arithmetic is, on every path:
 *   per block b: p_b = the exact int32 sum of codes times x bytes; d_b = dw_b * dx_b;
 *   acc = fma(float(p_b), d_b, acc); off = fma(c_b, sx_b, off)   (c_b: Q4_1 m_b, Q4_0 -8 dw_b)
 *   y = acc + off
 * so AVX2, AVX-VNNI, AVX-512 and the scalar loop (fmaf) give the same bits, and a row of a
 * batch has the bits of the row alone. */

#define LANES_MAX_MX 8

/* Q4 codes 0..15 times int8 x (|x| <= 127): per dword lane, 4 products summed (u8 x s8) */
static inline int dot4_scalar(const uint8_t *codes, const int8_t *x) {
    return codes[0] * x[0] + codes[1] * x[1] + codes[2] * x[2] + codes[3] * x[3];
}

/* weight row n (its blocks at `row`, in the file's order) against the M x rows */
static void lanes_scalar(int type, const uint8_t *row, const int8_t *qx, const float *dx, const float *sx,
                         int64_t ldd, int64_t M, float *y, int64_t ldy, int64_t n, int64_t K) {
    const int bb = block_bytes(type), q1 = type == T_Q4_1;
    const int64_t nb = K / 32;
    for (int64_t m = 0; m < M; m++) {
        float acc = 0.0f, off = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb, *qs = blk + (q1 ? 4 : 2);
            const int8_t *xb = qx + m * K + b * 32;
            int p = 0;
            for (int j = 0; j < 16; j++) p += (qs[j] & 0xF) * xb[j] + (qs[j] >> 4) * xb[j + 16];
            const float dw = f16(blk), c = q1 ? f16(blk + 2) : -8.0f * dw;
            acc = fmaf((float)p, dw * dx[m * ldd + b], acc);
            off = fmaf(c, sx[m * ldd + b], off);
        }
        y[m * ldy + n] = acc + off;
    }
}

/* 8 rows from `row0` (rows past `nrows` repeat the last one): their block-b codes as 4
 * vectors, vector j holding each row's dword j (code bytes 4j..4j+3), and their scales. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void lanes8_block(
    const int type, const uint8_t *const *rows, __m256i at, int64_t b, __m256i *W, __m256 *dw, __m256 *c) {
    const int bb = block_bytes(type), off = type == T_Q4_1 ? 4 : 2;
    __m256i A[4];
    for (int i = 0; i < 4; i++) /* rows i and i + 4 */
        A[i] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(rows[i + 4] + b * bb + off)),
                                _mm_loadu_si128((const __m128i *)(rows[i] + b * bb + off)));
    __m256i t0 = _mm256_unpacklo_epi32(A[0], A[1]), t1 = _mm256_unpackhi_epi32(A[0], A[1]);
    __m256i t2 = _mm256_unpacklo_epi32(A[2], A[3]), t3 = _mm256_unpackhi_epi32(A[2], A[3]);
    W[0] = _mm256_unpacklo_epi64(t0, t2), W[1] = _mm256_unpackhi_epi64(t0, t2);
    W[2] = _mm256_unpacklo_epi64(t1, t3), W[3] = _mm256_unpackhi_epi64(t1, t3);
    /* d, then Q4_1's m, of each row's block b (offsets of the rows from rows[0] in `at`) */
    __m256i hv = _mm256_i32gather_epi32((const int *)(rows[0] + b * bb), at, 1);
    const __m256i lo16 = _mm256_set1_epi32(0xFFFF);
    *dw = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(hv, lo16), _mm256_setzero_si256()), 0x08)));
    if (type == T_Q4_1)
        *c = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(
            _mm256_packus_epi32(_mm256_srli_epi32(hv, 16), _mm256_setzero_si256()), 0x08)));
    else
        *c = _mm256_mul_ps(*dw, _mm256_set1_ps(-8.0f));
}

/* The same from a lanes-packed group (pk: its first row; half 0: rows 0-7, 1: rows 8-15) */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void lanes8_packed(
    const int type, const uint8_t *pk, int half, int64_t b, __m256i *W, __m256 *dw, __m256 *c) {
    const uint8_t *blk = pk + b * LANE_ROWS * block_bytes(type);
    for (int j = 0; j < 4; j++) W[j] = _mm256_loadu_si256((const __m256i *)(blk + 64 * j + 32 * half));
    *dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 256 + 16 * half)));
    *c = type == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 288 + 16 * half)))
                        : _mm256_mul_ps(*dw, _mm256_set1_ps(-8.0f));
}

/* pk: NULL, or a lanes-packed group whose rows `half` (see lanes8_packed) stand in for `rows` */
#define LANES8(NAME, TARGET, VNNI)                                                                  \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_t(                    \
        const int type, const int MX, const uint8_t *const *rows, const uint8_t *pk, int half,      \
        const int8_t *qx, const float *dx, const float *sx, int64_t ldd, int64_t K, float *out) {   \
        const int64_t nb = K / 32;                                                                  \
        const __m256i low = _mm256_set1_epi8(0x0F);                                                 \
        __m256 acc[8], off[8];                                                                      \
        for (int m = 0; m < MX; m++) acc[m] = off[m] = _mm256_setzero_ps();                         \
        int32_t gap[8];                                                                             \
        for (int i = 0; i < 8; i++) gap[i] = (int32_t)(rows[i] - rows[0]);                          \
        const __m256i at = _mm256_loadu_si256((const __m256i *)gap);                                \
        for (int64_t b = 0; b < nb; b++) {                                                          \
            __m256i W[4];                                                                           \
            __m256 dw, c;                                                                           \
            if (pk) lanes8_packed(type, pk, half, b, W, &dw, &c);                                    \
            else lanes8_block(type, rows, at, b, W, &dw, &c);                                       \
            for (int m = 0; m < MX; m++) {                                                          \
                const int8_t *xb = qx + m * K + b * 32;                                             \
                __m256i p;                                                                          \
                if (VNNI) {                                                                         \
                    __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();               \
                    for (int j = 0; j < 4; j++) {                                                   \
                        int32_t a0, a1;                                                             \
                        memcpy(&a0, xb + 4 * j, 4), memcpy(&a1, xb + 16 + 4 * j, 4);                \
                        p0 = DPBUSD8(p0, _mm256_and_si256(W[j], low), _mm256_set1_epi32(a0));       \
                        p1 = DPBUSD8(p1, _mm256_and_si256(_mm256_srli_epi16(W[j], 4), low), _mm256_set1_epi32(a1)); \
                    }                                                                               \
                    p = _mm256_add_epi32(p0, p1);                                                   \
                } else { /* int16 sums: 8 x 2 x 15 x 128 < 2^15 */                                  \
                    __m256i s = _mm256_setzero_si256();                                             \
                    for (int j = 0; j < 4; j++) {                                                   \
                        int32_t a0, a1;                                                             \
                        memcpy(&a0, xb + 4 * j, 4), memcpy(&a1, xb + 16 + 4 * j, 4);                \
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(W[j], low),  \
                                                                      _mm256_set1_epi32(a0)));      \
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(                               \
                                                    _mm256_and_si256(_mm256_srli_epi16(W[j], 4), low), \
                                                    _mm256_set1_epi32(a1)));                        \
                    }                                                                               \
                    p = _mm256_madd_epi16(s, _mm256_set1_epi16(1));                                 \
                }                                                                                   \
                const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(dx[m * ldd + b]));                \
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[m]);                         \
                off[m] = _mm256_fmadd_ps(c, _mm256_set1_ps(sx[m * ldd + b]), off[m]);               \
            }                                                                                       \
        }                                                                                           \
        for (int m = 0; m < MX; m++) _mm256_storeu_ps(out + 8 * m, _mm256_add_ps(acc[m], off[m]));  \
    }                                                                                               \
    __attribute__((target(TARGET))) static void NAME(int type, int MX, const uint8_t *const *rows,  \
                                                     const uint8_t *pk, int half, const int8_t *qx,  \
                                                     const float *dx, const float *sx, int64_t ldd,  \
                                                     int64_t K, float *out) {                        \
        for (int m = 0; m < MX;) {                                                                  \
            const int mx = MX - m >= 8 ? 8 : MX - m >= 4 ? 4 : MX - m;                             \
            const int8_t *q = qx + m * K;                                                           \
            const float *d = dx + m * ldd, *s = sx + m * ldd;                                       \
            float *o = out + 8 * m;                                                                 \
            m += mx;                                                                                \
            if (type == T_Q4_1) {                                                                   \
                if (mx == 8) NAME##_t(T_Q4_1, 8, rows, pk, half, q, d, s, ldd, K, o);                         \
                else if (mx == 4) NAME##_t(T_Q4_1, 4, rows, pk, half, q, d, s, ldd, K, o);                    \
                else if (mx == 3) NAME##_t(T_Q4_1, 3, rows, pk, half, q, d, s, ldd, K, o);                    \
                else if (mx == 2) NAME##_t(T_Q4_1, 2, rows, pk, half, q, d, s, ldd, K, o);                    \
                else NAME##_t(T_Q4_1, 1, rows, pk, half, q, d, s, ldd, K, o);                                 \
            } else {                                                                                \
                if (mx == 8) NAME##_t(T_Q4_0, 8, rows, pk, half, q, d, s, ldd, K, o);                         \
                else if (mx == 4) NAME##_t(T_Q4_0, 4, rows, pk, half, q, d, s, ldd, K, o);                    \
                else if (mx == 3) NAME##_t(T_Q4_0, 3, rows, pk, half, q, d, s, ldd, K, o);                    \
                else if (mx == 2) NAME##_t(T_Q4_0, 2, rows, pk, half, q, d, s, ldd, K, o);                    \
                else NAME##_t(T_Q4_0, 1, rows, pk, half, q, d, s, ldd, K, o);                                 \
            }                                                                                       \
        }                                                                                           \
    }

#define DPBUSD8(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
LANES8(lanes8_avx2, "avx2,fma,f16c", 0)
#undef DPBUSD8
#if HAVE_AVXVNNI
#define DPBUSD8(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
LANES8(lanes8_vnni, VNNI_TARGET, 1)
#undef DPBUSD8
#else
#define lanes8_vnni lanes8_avx2
#endif

#if HAVE_AVXVNNI
/* 16 rows' block-b codes as 4 vectors (dword j of every row in vector j) and their scales */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void lanes16_block(
    const int type, const uint8_t *const *rows, __m512i at, int64_t b, __m512i *W, __m512 *dw, __m512 *c) {
    const int bb = block_bytes(type), off = type == T_Q4_1 ? 4 : 2;
    __m512i A[4];
    for (int k = 0; k < 4; k++) { /* rows 4k..4k+3, 16 bytes each */
        __m512i a = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[4 * k] + b * bb + off)));
        a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(rows[4 * k + 1] + b * bb + off)), 1);
        a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(rows[4 * k + 2] + b * bb + off)), 2);
        A[k] = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i *)(rows[4 * k + 3] + b * bb + off)), 3);
    }
    /* A[k] lane 4r + j = row 4k+r's dword j -> X (rows 0-7), Y (rows 8-15): dwords 0,1 / 2,3 */
    const __m512i i01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i i23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i ilo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    __m512i X01 = _mm512_permutex2var_epi32(A[0], i01, A[1]), X23 = _mm512_permutex2var_epi32(A[0], i23, A[1]);
    __m512i Y01 = _mm512_permutex2var_epi32(A[2], i01, A[3]), Y23 = _mm512_permutex2var_epi32(A[2], i23, A[3]);
    W[0] = _mm512_permutex2var_epi32(X01, ilo, Y01), W[1] = _mm512_permutex2var_epi32(X01, ihi, Y01);
    W[2] = _mm512_permutex2var_epi32(X23, ilo, Y23), W[3] = _mm512_permutex2var_epi32(X23, ihi, Y23);
    /* d, then Q4_1's m, of each row's block b (offsets of the rows from rows[0] in `at`) */
    __m512i hv = _mm512_i32gather_epi32(at, (const void *)(rows[0] + b * bb), 1);
    *dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hv));
    *c = type == T_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hv, 16)))
                        : _mm512_mul_ps(*dw, _mm512_set1_ps(-8.0f));
}

/* The same from a lanes-packed group (pk: its first row): plain loads */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void lanes16_packed(
    const int type, const uint8_t *pk, int64_t b, __m512i *W, __m512 *dw, __m512 *c) {
    const uint8_t *blk = pk + b * LANE_ROWS * block_bytes(type);
    for (int j = 0; j < 4; j++) W[j] = _mm512_loadu_si512((const void *)(blk + 64 * j));
    *dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
    *c = type == T_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)))
                        : _mm512_mul_ps(*dw, _mm512_set1_ps(-8.0f));
}

/* pk: NULL, or a lanes-packed group standing in for `rows` (then `pre` and `ahead` are unused) */
__attribute__((target(AVX512_TARGET), always_inline)) static inline void lanes16_t(
    const int type, const int MX, const uint8_t *const *rows, const uint8_t *pk, int64_t ahead, __m512i *pre, int fill,
    const int8_t *qx, const float *dx, const float *sx, int64_t ldd, int64_t K, float *out) {
    const int64_t nb = K / 32, bb = block_bytes(type);
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[LANES_MAX_MX], off[LANES_MAX_MX];
    for (int m = 0; m < MX; m++) acc[m] = off[m] = _mm512_setzero_ps();
    int32_t gap[16];
    for (int i = 0; i < 16; i++) gap[i] = (int32_t)(rows[i] - rows[0]);
    const __m512i at = _mm512_loadu_si512((const void *)gap);
    for (int64_t b = 0; b < nb; b++) {
        __m512i W[4], L[4], H[4];
        __m512 dw, c;
        if (ahead) /* the next group's rows, one block each step: memory is read ahead of use */
            for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(rows[i] + ahead + b * bb), _MM_HINT_T0);
        if (pk) {
            lanes16_packed(type, pk, b, W, &dw, &c);
        } else if (pre && !fill) { /* transposed by an earlier pass over these rows */
            for (int j = 0; j < 4; j++) W[j] = pre[6 * b + j];
            dw = _mm512_castsi512_ps(pre[6 * b + 4]), c = _mm512_castsi512_ps(pre[6 * b + 5]);
        } else {
            lanes16_block(type, rows, at, b, W, &dw, &c);
            if (pre) {
                for (int j = 0; j < 4; j++) pre[6 * b + j] = W[j];
                pre[6 * b + 4] = _mm512_castps_si512(dw), pre[6 * b + 5] = _mm512_castps_si512(c);
            }
        }
        for (int j = 0; j < 4; j++) L[j] = _mm512_and_si512(W[j], low), H[j] = _mm512_and_si512(_mm512_srli_epi16(W[j], 4), low);
        for (int m = 0; m < MX; m++) {
            const int8_t *xb = qx + m * K + b * 32;
            __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                int32_t a0, a1;
                memcpy(&a0, xb + 4 * j, 4), memcpy(&a1, xb + 16 + 4 * j, 4);
                p0 = _mm512_dpbusd_epi32(p0, L[j], _mm512_set1_epi32(a0));
                p1 = _mm512_dpbusd_epi32(p1, H[j], _mm512_set1_epi32(a1));
            }
            const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(dx[m * ldd + b]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), d, acc[m]);
            off[m] = _mm512_fmadd_ps(c, _mm512_set1_ps(sx[m * ldd + b]), off[m]);
        }
    }
    for (int m = 0; m < MX; m++) _mm512_storeu_ps(out + 16 * m, _mm512_add_ps(acc[m], off[m]));
}

#define LANES16_MX(T)                                                                               \
    switch (mx) {                                                                                   \
    case 8: lanes16_t(T, 8, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 7: lanes16_t(T, 7, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 6: lanes16_t(T, 6, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 5: lanes16_t(T, 5, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 4: lanes16_t(T, 4, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 3: lanes16_t(T, 3, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    case 2: lanes16_t(T, 2, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o); break;                                       \
    default: lanes16_t(T, 1, rows, pk, ahead, pre, m == 0, q, d, s, ldd, K, o);                                             \
    }

/* `pre`: room for K/32 x 6 vectors, where a call of more than LANES_MAX_MX x rows keeps the
 * rows' transposed blocks from its first pass for the next ones (NULL: transpose every pass) */
__attribute__((target(AVX512_TARGET))) static void lanes16_avx512(int type, int MX, const uint8_t *const *rows,
                                                                  const uint8_t *pk, int64_t ahead, __m512i *pre,
                                                                  const int8_t *qx,
                                                                  const float *dx, const float *sx, int64_t ldd,
                                                                  int64_t K, float *out) {
    if (MX <= LANES_MAX_MX) pre = NULL;
    for (int m = 0; m < MX; m += LANES_MAX_MX) {
        const int mx = MX - m < LANES_MAX_MX ? MX - m : LANES_MAX_MX;
        if (m) ahead = 0;
        const int8_t *q = qx + m * K;
        const float *d = dx + m * ldd, *s = sx + m * ldd;
        float *o = out + 16 * m;
        if (type == T_Q4_1) { LANES16_MX(T_Q4_1) }
        else { LANES16_MX(T_Q4_0) }
    }
}
#endif

/* y[m, n] = sum_k x[m, k] W[n, k] for Q4_0 / Q4_1 with rows as lanes (see above); isa as in
 * gemv_q8. Groups of `lanes` rows go to the threads; a last partial group repeats its last row
 * in the spare lanes and stores only its own. `packed`: W is in the lanes layout (N a multiple
 * of LANE_ROWS), whose groups are read with plain loads, nothing transposed. */
static void gemv_q4_lanes(int type, int packed, const uint8_t *w, int64_t row_bytes, const int8_t *qx,
                          const float *dx, const float *sx, int64_t ldd, int64_t M, float *y, int64_t ldy, int64_t N,
                          int64_t K, int nthreads, int isa) {
    int nt = pick_threads(N * K, nthreads);
    if (isa == 0) {
        #pragma omp parallel num_threads(nt)
        {
            uint8_t *tmp = packed ? (uint8_t *)malloc((size_t)row_bytes) : NULL;
            #pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const uint8_t *row = file_row(type, packed, w, row_bytes, n, tmp);
                lanes_scalar(type, row, qx, dx, sx, ldd, M, y, ldy, n, K);
            }
            free(tmp);
        }
        return;
    }
    const int lanes = HAVE_AVXVNNI && isa == 3 ? 16 : 8;
    const int64_t groups = (N + lanes - 1) / lanes, mb = M < 64 ? M : 64;
    /* the transposed blocks kept between passes (lanes16_avx512): AVX-512 only, not when packed */
    const int keep = HAVE_AVXVNNI && isa == 3 && !packed && M > LANES_MAX_MX;
    #pragma omp parallel num_threads(nt)
    {
        float out[16 * 64];
        void *pre = keep ? aligned_alloc(64, (size_t)(K / 32) * 6 * 64) : NULL;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t n0 = g * lanes, R = N - n0 < lanes ? N - n0 : lanes;
            const uint8_t *rows[16];
            for (int i = 0; i < lanes; i++) rows[i] = w + (n0 + (i < R ? i : R - 1)) * row_bytes;
            /* a packed group of 16 rows; 8 lanes read its rows 0-7 or 8-15 */
            const uint8_t *pk = packed ? w + (n0 - n0 % LANE_ROWS) * row_bytes : NULL;
            const int half = (int)(n0 % LANE_ROWS) / 8;
            /* the next group is read ahead where it is whole (unpacked rows: the hardware
             * prefetcher does not follow 16 strided rows; packed ones are one stream) */
            const int64_t ahead = !packed && (g + 2) * lanes <= N ? lanes * row_bytes : 0;
            for (int64_t m0 = 0; m0 < M; m0 += mb) {
                const int MX = (int)(M - m0 < mb ? M - m0 : mb);
                const int8_t *q = qx + m0 * K;
                const float *d = dx + m0 * ldd, *s = sx + m0 * ldd;
#if HAVE_AVXVNNI
                if (isa == 3)
                    lanes16_avx512(type, MX, rows, pk, m0 == 0 ? ahead : 0, (__m512i *)pre, q, d, s, ldd, K, out);
                else
#endif
                (isa == 2 ? lanes8_vnni : lanes8_avx2)(type, MX, rows, pk, half, q, d, s, ldd, K, out);
                for (int m = 0; m < MX; m++)
                    for (int64_t r = 0; r < R; r++) y[(m0 + m) * ldy + n0 + r] = out[m * lanes + r];
            }
        }
        free(pre);
    }
}

/* ---------------------------------------------------- Q8_0 rows as SIMD lanes (the LM head)
 *
 * A lanes-packed Q8_0 weight: per 16 rows and block, 8 x 64 bytes (code dword j of rows
 * 0..15), then the rows' 16 d halves (kernels/ggml.py pack_lanes). Per (weight row, x row)
 * the arithmetic is, on every path:
 *   per block b: p_b = the exact int32 sum of codes times x bytes;
 *   acc = fma(float(p_b), dw_b * dx_b, acc);   y = acc
 * AVX-512 VNNI multiplies codes + 128 (unsigned, as vpdpbusd wants them) by x and starts from
 * -128 times the block's x sum: the same integer, eight instructions per 16 rows and x row
 * for a block, the codes loaded once for every x row. A weight is packed only where AVX-512
 * VNNI runs (kernels/gguf_linear.py); other instruction sets, asked for by LONGSIDE_GGML_ISA,
 * take the scalar loop: the same bits. */

static void lanes_scalar_q8(const uint8_t *row, const int8_t *qx, const float *dx, int64_t ldd, int64_t M,
                            float *y, int64_t ldy, int64_t n, int64_t K) {
    const int64_t nb = K / 32;
    for (int64_t m = 0; m < M; m++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            const int8_t *codes = (const int8_t *)(blk + 2), *xb = qx + m * K + b * 32;
            int p = 0;
            for (int i = 0; i < 32; i++) p += codes[i] * xb[i];
            acc = fmaf((float)p, f16(blk) * dx[m * ldd + b], acc);
        }
        y[m * ldy + n] = acc;
    }
}

#if HAVE_AVXVNNI
__attribute__((target(AVX512_TARGET), always_inline)) static inline void q8_lanes16_t(
    const int MX, const uint8_t *pk, const int8_t *qx, const float *dx, const int32_t *xs, int64_t ldd, int64_t K,
    float *out) {
    const int64_t nb = K / 32;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[LANES_MAX_MX];
    for (int m = 0; m < MX; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = pk + b * LANE_ROWS * 34;
        __m512i W[8];
        for (int j = 0; j < 8; j++) W[j] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(blk + 64 * j)), flip);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 512)));
        for (int m = 0; m < MX; m++) {
            const int8_t *xb = qx + m * K + b * 32;
            __m512i p0 = _mm512_set1_epi32(-128 * xs[m * ldd + b]), p1 = _mm512_setzero_si512();
            for (int j = 0; j < 8; j += 2) {
                int32_t a0, a1;
                memcpy(&a0, xb + 4 * j, 4), memcpy(&a1, xb + 4 * j + 4, 4);
                p0 = _mm512_dpbusd_epi32(p0, W[j], _mm512_set1_epi32(a0));
                p1 = _mm512_dpbusd_epi32(p1, W[j + 1], _mm512_set1_epi32(a1));
            }
            const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(dx[m * ldd + b]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), d, acc[m]);
        }
    }
    for (int m = 0; m < MX; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

/* one packed group of 16 rows against MX x rows (passes of up to LANES_MAX_MX) -> out[MX, 16] */
__attribute__((target(AVX512_TARGET))) static void q8_lanes16_avx512(int MX, const uint8_t *pk, const int8_t *qx,
                                                                     const float *dx, const int32_t *xs, int64_t ldd,
                                                                     int64_t K, float *out) {
    for (int m = 0; m < MX; m += LANES_MAX_MX) {
        const int mx = MX - m < LANES_MAX_MX ? MX - m : LANES_MAX_MX;
        const int8_t *q = qx + m * K;
        const float *d = dx + m * ldd;
        const int32_t *s = xs + m * ldd;
        float *o = out + 16 * m;
        switch (mx) {
        case 8: q8_lanes16_t(8, pk, q, d, s, ldd, K, o); break;
        case 7: q8_lanes16_t(7, pk, q, d, s, ldd, K, o); break;
        case 6: q8_lanes16_t(6, pk, q, d, s, ldd, K, o); break;
        case 5: q8_lanes16_t(5, pk, q, d, s, ldd, K, o); break;
        case 4: q8_lanes16_t(4, pk, q, d, s, ldd, K, o); break;
        case 3: q8_lanes16_t(3, pk, q, d, s, ldd, K, o); break;
        case 2: q8_lanes16_t(2, pk, q, d, s, ldd, K, o); break;
        default: q8_lanes16_t(1, pk, q, d, s, ldd, K, o);
        }
    }
}
#endif

/* y[m, n] = sum_k x[m, k] W[n, k] for a lanes-packed Q8_0 W (N a multiple of LANE_ROWS) */
static void gemv_q8_lanes(const uint8_t *w, int64_t row_bytes, const int8_t *qx, const float *dx, int64_t ldd,
                          int64_t M, float *y, int64_t ldy, int64_t N, int64_t K, int nthreads, int isa) {
    const int nt = pick_threads(N * K, nthreads);
    if (!(HAVE_AVXVNNI && isa == 3)) {
        #pragma omp parallel num_threads(nt)
        {
            uint8_t *tmp = (uint8_t *)malloc((size_t)row_bytes);
            #pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++)
                lanes_scalar_q8(file_row(T_Q8_0, 1, w, row_bytes, n, tmp), qx, dx, ldd, M, y, ldy, n, K);
            free(tmp);
        }
        return;
    }
#if HAVE_AVXVNNI
    const int64_t nb = K / 32, groups = N / LANE_ROWS, mb = M < 64 ? M : 64;
    int32_t *xs = (int32_t *)malloc(sizeof(int32_t) * M * ldd); /* each x block's integer sum */
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            int32_t t = 0;
            for (int i = 0; i < 32; i++) t += qx[m * K + b * 32 + i];
            xs[m * ldd + b] = t;
        }
    #pragma omp parallel num_threads(nt)
    {
        float out[16 * 64];
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *pk = w + g * LANE_ROWS * row_bytes;
            for (int64_t m0 = 0; m0 < M; m0 += mb) {
                const int MX = (int)(M - m0 < mb ? M - m0 : mb);
                q8_lanes16_avx512(MX, pk, qx + m0 * K, dx + m0 * ldd, xs + m0 * ldd, ldd, K, out);
                for (int m = 0; m < MX; m++)
                    for (int r = 0; r < LANE_ROWS; r++) y[(m0 + m) * ldy + g * LANE_ROWS + r] = out[m * 16 + r];
            }
        }
    }
    free(xs);
#endif
}

/* one Q8_0 row against one quantized x row, plain C (the order differs from the SIMD tiles) */
static float row_dot_scalar_q8_0(const uint8_t *row, const int8_t *qx, const float *dx, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = qx + b * 32;
        const uint8_t *blk = row + b * 34;
        int s = 0;
        for (int j = 0; j < 32; j++) s += (int8_t)blk[2 + j] * xq[j];
        acc += (float)s * (f16(blk) * dx[b]);
    }
    return acc;
}

/* y[m, n] = sum_k x[m, k] W[n, k] from quantized x (quantize_x; dx, sx rows of ldd floats).
 * isa: 0 scalar, 1 AVX2, 2 AVX2 + AVX-VNNI, 3 AVX-512 VNNI. Types Q4_0, Q4_1, Q8_0. Q4_0 and
 * Q4_1 take the rows-as-lanes kernel (gemv_q4_lanes); Q8_0 weight rows go four at a time, x
 * rows two (AVX2) or four (AVX-512) at a time against each, so a weight block is unpacked once
 * for them. */
static void gemv_q8(int type, const uint8_t *w, int64_t row_bytes, const int8_t *qx, const float *dx,
                    const float *sx, int64_t ldd, int64_t M, float *y, int64_t ldy, int64_t N, int64_t K,
                    int nthreads, int isa) {
    const int packed = lanes_packed(&type);
    if (type == T_Q8_0 && packed) {
        gemv_q8_lanes(w, row_bytes, qx, dx, ldd, M, y, ldy, N, K, nthreads, isa);
        return;
    }
    if (type == T_Q4_0 || type == T_Q4_1) {
        gemv_q4_lanes(type, packed, w, row_bytes, qx, dx, sx, ldd, M, y, ldy, N, K, nthreads, isa);
        return;
    }
    int nt = pick_threads(N * K, nthreads);
    int64_t nb = K / 32;
    if (isa == 0) {
        #pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t n = 0; n < N; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * ldy + n] = row_dot_scalar_q8_0(w + n * row_bytes, qx + m * K, dx + m * ldd, nb);
        return;
    }
    int64_t groups = (N + 3) / 4;
    #pragma omp parallel num_threads(nt)
    {
        float *dw = (float *)malloc(sizeof(float) * 12 * nb), *dd = dw + 4 * nb;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t n0 = 4 * g;
            const int R = N - n0 >= 4 ? 4 : (int)(N - n0);
            const uint8_t *row = w + n0 * row_bytes;
            for (int r = 0; r < R; r++) row_scales(row + r * row_bytes, nb, dw + r * nb);
            for (int64_t m = 0; m < M;) {
                float out[16];
                int MX;
                if (R < 4) { /* the last rows of W, one pair at a time */
                    MX = 1;
                    for (int r = 0; r < R; r++)
                        (isa == 3   ? tile_avx512
                         : isa == 2 ? tile_vnni
                                    : tile_avx2)(type, 1, 1, row + r * row_bytes, row_bytes, qx + m * K, K,
                                                 dw + r * nb, dx + m * ldd, ldd, nb, out + r);
                } else if (isa == 3) {
                    MX = M - m < 4 ? (int)(M - m) : 4;
                    tile_avx512(type, 4, MX, row, row_bytes, qx + m * K, K, dw, dx + m * ldd, ldd, nb, out);
                } else if (M - m >= 2) { /* 2 x 2 twice: 16 ymm registers hold 8 accumulators */
                    MX = 2;
                    scale_products(dw, dx + m * ldd, ldd, nb, dd);
                    for (int h = 0; h < 2; h++)
                        (isa == 2 ? tile22d_vnni : tile22d_avx2)(row + 2 * h * row_bytes, row_bytes, qx + m * K, K,
                                                                 dd + 4 * h * nb, nb, out + 4 * h);
                } else {
                    MX = 1;
                    (isa == 2 ? tile_vnni : tile_avx2)(type, 4, 1, row, row_bytes, qx + m * K, K, dw, dx + m * ldd,
                                                        ldd, nb, out);
                }
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < MX; j++) y[(m + j) * ldy + n0 + r] = out[r * MX + j];
                m += MX;
            }
        }
        free(dw);
    }
}

/* y[m, n] = sum_k x[m, k] W[n, k] from fp32 x, quantized here (one call per product: decode
 * runs hundreds of them per token, so each saved call and allocation counts). */
void ggml_gemv_int8(int type, const uint8_t *w, int64_t row_bytes, const float *x, int64_t ldx, int64_t M,
                    float *y, int64_t ldy, int64_t N, int64_t K, int nthreads, int isa) {
    int64_t nb = K / 32, ldd = (nb + 7) / 8 * 8;
    int8_t *qx = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc(sizeof(float) * M * ldd), *sx = (float *)malloc(sizeof(float) * M * ldd);
    quantize_x(x, ldx, M, K, qx, dx, sx, ldd, isa);
    gemv_q8(type, w, row_bytes, qx, dx, sx, ldd, M, y, ldy, N, K, nthreads, isa);
    free(qx);
    free(dx);
    free(sx);
}
