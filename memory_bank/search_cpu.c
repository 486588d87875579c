/* Memory reads of a decode step, called through ctypes (memory_bank/search_cpu.py).
 *
 * At one query token a search is a scan of the stored keys and a small top-k: torch runs it
 * as a dozen small operations whose dispatch costs more than the arithmetic. Each function
 * here is that whole search in one call; the answers equal torch's up to fp32 summation
 * order, and ties go to the lower stored index.
 *
 *   search_chunks_f16: top-k chunk slots per (head, query) by q . key over float16 chunk
 *                      keys (MemoryBank._flat_topk).
 *   search_tokens_bf16: TokenMemory.search before its projection exists: a shortlist by
 *                      bfloat16 products over the keys themselves, rounded to bfloat16 as
 *                      torch's product rounds them, rescored exactly in fp32 (also ties to
 *                      the lower stored index, as TokenMemory's torch path).
 *   token_search_step: TokenMemory.search of one raw query of a decode step, normalized and
 *                      projected here, the shortlist scored over the int8 projections with
 *                      one scale per row against the query rounded to int16 (exact integer
 *                      sums), rescored the same way; returns the stored next tokens.
 *
 * isa: 0 plain C, 1 AVX2 + FMA + F16C (chosen at run time; the library runs on any x86-64).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define AVX2 __attribute__((target("avx2,fma,f16c")))

int search_cpu_features(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* ---------------------------------------------------------------- number formats */

static inline float bf16_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* round to nearest even, as torch's .to(torch.bfloat16) */
static inline float round_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return f; /* NaN */
    b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &b, 4);
    return f;
}

static inline float f16_f32(uint16_t h) {
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

/* ---------------------------------------------------------------- top-k */

/* The k best (score, index) pairs seen, as a min-heap whose root is the worst kept. A pair
 * beats another by a higher score, or an equal score and a lower index. */
typedef struct {
    float *score;
    int64_t *index;
    int64_t size, k;
} Best;

static inline int beats(float s, int64_t i, float t, int64_t j) { return s > t || (s == t && i < j); }

/* puts (s, i) at the root in place of the root's pair and sifts it down to its place */
static void root_down(Best *b, float s, int64_t i) {
    int64_t n = 0;
    for (;;) {
        int64_t c = 2 * n + 1;
        if (c >= b->size) break;
        if (c + 1 < b->size && beats(b->score[c], b->index[c], b->score[c + 1], b->index[c + 1])) c++;
        if (!beats(s, i, b->score[c], b->index[c])) break;
        b->score[n] = b->score[c];
        b->index[n] = b->index[c];
        n = c;
    }
    b->score[n] = s;
    b->index[n] = i;
}

static void best_push(Best *b, float s, int64_t i) {
    int64_t n;
    if (b->size < b->k) { /* sift up from the end */
        n = b->size++;
        while (n > 0) {
            int64_t p = (n - 1) / 2;
            if (!beats(b->score[p], b->index[p], s, i)) break;
            b->score[n] = b->score[p];
            b->index[n] = b->index[p];
            n = p;
        }
        b->score[n] = s;
        b->index[n] = i;
    } else if (beats(s, i, b->score[0], b->index[0])) {
        root_down(b, s, i); /* it replaces the worst kept */
    }
}

/* a cut below which nothing enters: -inf until the heap is full */
static inline float best_floor(const Best *b) { return b->size < b->k ? -INFINITY : b->score[0]; }

/* empties the heap into score/index arrays, best first */
static void best_sorted(Best *b, float *score, int64_t *index) {
    int64_t n = b->size;
    for (int64_t m = n - 1; m >= 0; m--) { /* pop the worst to the back */
        score[m] = b->score[0];
        index[m] = b->index[0];
        b->size--;
        if (b->size == 0) break;
        root_down(b, b->score[b->size], b->index[b->size]); /* the last pair fills the root */
    }
}

/* ---------------------------------------------------------------- dot products, 8 rows at a time */

AVX2 static inline __m256 hsum_8x8(const __m256 v[8]) { /* lane r: the sum of v[r]'s lanes */
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

AVX2 static inline __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Rows to score: `p` [N, ld] of one format. Int8 rows carry one fp32 scale per row and are
 * scored against the query rounded to int16 (`xq`, times `xscale`): integer products summed
 * exactly, so every path gives the same bits. */
enum { ROWS_BF16, ROWS_F16, ROWS_I8 };
typedef struct {
    int fmt;
    const void *p;
    int64_t ld;
    const float *scale; /* ROWS_I8: [N] */
    const int16_t *xq;  /* ROWS_I8: the query [n] */
    float xscale;
} Rows;

/* out[r] = x . rows[r] for 8 rows of n (a multiple of 8) 16-bit values, row stride ld */
#define DOT8(NAME, LOAD)                                                                            \
    AVX2 static __m256 NAME(const float *x, const uint16_t *rows, int64_t ld, int64_t n) {          \
        __m256 acc[8];                                                                              \
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();                                   \
        for (int64_t c = 0; c < n; c += 8) {                                                        \
            __m256 xc = _mm256_loadu_ps(x + c);                                                     \
            for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(LOAD(rows + r * ld + c), xc, acc[r]); \
        }                                                                                           \
        return hsum_8x8(acc);                                                                       \
    }
DOT8(dot8_bf16, load_bf16)
DOT8(dot8_f16, load_f16)

/* out[i * ldo + r] = x[i] . rows[r] for NQ queries (x[i] at x + i * n) and 8 rows of n (a
 * multiple of 8) 16-bit values: each row converted once for all the queries (a kv head's
 * queries scan the same chunk keys), each sum in dot8's order, so the same bits as NQ dot8 */
#define DOT8Q(NAME, LOAD, NQ)                                                                        \
    AVX2 static void NAME(const float *x, const uint16_t *rows, int64_t ld, int64_t n, float *out,    \
                          int64_t ldo) {                                                             \
        __m256 acc[NQ][8];                                                                           \
        for (int half = 0; half < 2; half++) { /* 4 rows x NQ accumulators stay in registers */      \
            __m256 a[NQ][4];                                                                         \
            for (int i = 0; i < NQ; i++)                                                             \
                for (int r = 0; r < 4; r++) a[i][r] = _mm256_setzero_ps();                           \
            for (int64_t c = 0; c < n; c += 8)                                                       \
                for (int r = 0; r < 4; r++) {                                                        \
                    __m256 w = LOAD(rows + (half * 4 + r) * ld + c);                                 \
                    for (int i = 0; i < NQ; i++) a[i][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * n + c), a[i][r]); \
                }                                                                                    \
            for (int i = 0; i < NQ; i++)                                                             \
                for (int r = 0; r < 4; r++) acc[i][half * 4 + r] = a[i][r];                          \
        }                                                                                            \
        for (int i = 0; i < NQ; i++) _mm256_storeu_ps(out + i * ldo, hsum_8x8(acc[i]));              \
    }
DOT8Q(dot8q2_f16, load_f16, 2)
DOT8Q(dot8q3_f16, load_f16, 3)
DOT8Q(dot8q2_bf16, load_bf16, 2)
DOT8Q(dot8q3_bf16, load_bf16, 3)

/* lane r: xq . rows[r] for 8 int8 rows of n (a multiple of 16) values, in int32 */
AVX2 static __m256i dot8_i8(const int16_t *xq, const int8_t *rows, int64_t ld, int64_t n) {
    __m256i acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t c = 0; c < n; c += 16) {
        __m256i xc = _mm256_loadu_si256((const __m256i *)(xq + c));
        for (int r = 0; r < 8; r++) {
            __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows + r * ld + c)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w, xc));
        }
    }
    __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[4], acc[5]), _mm256_hadd_epi32(acc[6], acc[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

AVX2 static void dot8(const float *x, Rows rows, int64_t j, int64_t n, float *out) {
    if (rows.fmt == ROWS_I8) {
        __m256i d = dot8_i8(rows.xq, (const int8_t *)rows.p + j * rows.ld, rows.ld, n);
        __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(rows.scale + j), _mm256_set1_ps(rows.xscale));
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(d), scale));
    } else {
        const uint16_t *r = (const uint16_t *)rows.p + j * rows.ld;
        _mm256_storeu_ps(out, rows.fmt == ROWS_F16 ? dot8_f16(x, r, rows.ld, n) : dot8_bf16(x, r, rows.ld, n));
    }
}

AVX2 static float dot1_bf16(const float *x, const uint16_t *row, int64_t n) { /* n % 8 == 0 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) acc = _mm256_fmadd_ps(load_bf16(row + c), _mm256_loadu_ps(x + c), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

static float dot_bf16(const float *x, const uint16_t *row, int64_t n) {
    float s = 0.0f;
    for (int64_t c = 0; c < n; c++) s += x[c] * bf16_f32(row[c]);
    return s;
}

static float dot1(const float *x, Rows rows, int64_t j, int64_t n) {
    float s = 0.0f;
    if (rows.fmt == ROWS_I8) {
        const int8_t *r = (const int8_t *)rows.p + j * rows.ld;
        int32_t sum = 0;
        for (int64_t c = 0; c < n; c++) sum += (int32_t)rows.xq[c] * r[c];
        return (float)sum * (rows.scale[j] * rows.xscale);
    }
    const uint16_t *r = (const uint16_t *)rows.p + j * rows.ld;
    for (int64_t c = 0; c < n; c++) s += x[c] * (rows.fmt == ROWS_F16 ? f16_f32(r[c]) : bf16_f32(r[c]));
    return s;
}

/* scores[j - j0] = x . rows[j] for j in [j0, j0 + m), rows of n values; the vector path for
 * n % 8 == 0 */
static void dots(const float *x, Rows rows, int64_t j0, int64_t m, int64_t n, float *scores, int isa) {
    int64_t j = 0;
    if (isa && n % (rows.fmt == ROWS_I8 ? 16 : 8) == 0)
        for (; j + 8 <= m; j += 8) dot8(x, rows, j0 + j, n, scores + j);
    for (; j < m; j++) scores[j] = dot1(x, rows, j0 + j, n);
}

/* scores[i * BLOCK + j - j0] = x[i] . rows[j] for nq (2 or 3) queries and j in [j0, j0 + m),
 * 16-bit rows of n (a multiple of 8) values: `dots` of each query, rows converted once */
static void dots_q(const float *x, int64_t nq, Rows rows, int64_t j0, int64_t m, int64_t n, float *scores);

/* ---------------------------------------------------------------- scans */

#define BLOCK 256 /* rows scored at a time (in L1 for the next query), then offered to the heaps */
#define MIN_WORK_PER_THREAD (1 << 18) /* multiply-adds: below this a second thread costs more */

/* Offer rows [j0, j1) to the heaps best[0..nq): query i's score of row j is x[i] . rows[j]
 * (rows of n values), rounded to bfloat16 when `round`; rows with skip[j] set or a score of
 * -inf are left out. */
static void scan(int round, const float *x, int64_t nq, Rows rows, int64_t n, int64_t j0, int64_t j1,
                 const uint8_t *skip, Best *best, int isa) {
    float scores[3 * BLOCK];
    const int shared = isa && rows.fmt != ROWS_I8 && n % 8 == 0;
    for (int64_t a = j0; a < j1; a += BLOCK) {
        int64_t m = j1 - a < BLOCK ? j1 - a : BLOCK;
        for (int64_t i0 = 0; i0 < nq; i0 += 3) {
            int64_t g = nq - i0 < 3 ? nq - i0 : 3;
            if (shared && g > 1)
                dots_q(x + i0 * n, g, rows, a, m, n, scores);
            else
                for (int64_t i = 0; i < g; i++) dots(x + (i0 + i) * n, rows, a, m, n, scores + i * BLOCK, isa);
            for (int64_t i = 0; i < g; i++) {
                const float *score = scores + i * BLOCK;
                Best *b = &best[i0 + i];
                float floor = best_floor(b);
                for (int64_t j = 0; j < m; j++) {
                    float v = round ? round_bf16(score[j]) : score[j];
                    if (v >= floor && v != -INFINITY && !(skip && skip[a + j])) {
                        best_push(b, v, a + j);
                        floor = best_floor(b);
                    }
                }
            }
        }
    }
}

static void dots_q(const float *x, int64_t nq, Rows rows, int64_t j0, int64_t m, int64_t n, float *scores) {
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
        const uint16_t *r = (const uint16_t *)rows.p + (j0 + j) * rows.ld;
        if (rows.fmt == ROWS_F16)
            (nq == 2 ? dot8q2_f16 : dot8q3_f16)(x, r, rows.ld, n, scores + j, BLOCK);
        else
            (nq == 2 ? dot8q2_bf16 : dot8q3_bf16)(x, r, rows.ld, n, scores + j, BLOCK);
    }
    for (; j < m; j++)
        for (int64_t i = 0; i < nq; i++) scores[i * BLOCK + j] = dot1(x + i * n, rows, j0 + j, n);
}

/* `scan` of rows [0, N) on up to nthreads threads, each over its own range into its own
 * heaps, merged into best[0..nq) (k each, empty on entry). The k best under a strict order
 * do not depend on how the rows were split. */
static void scan_all(int round, const float *x, int64_t nq, Rows rows, int64_t n, int64_t N, const uint8_t *skip,
                     int64_t k, Best *best, int nthreads, int isa) {
    int64_t useful = N * n * nq / MIN_WORK_PER_THREAD;
    int nt = useful < nthreads ? (int)useful : nthreads;
    if (nt <= 1) {
        scan(round, x, nq, rows, n, 0, N, skip, best, isa);
        return;
    }
    float *hs = (float *)malloc(sizeof(float) * nt * nq * k);
    int64_t *hi = (int64_t *)malloc(sizeof(int64_t) * nt * nq * k);
    Best *own = (Best *)malloc(sizeof(Best) * nt * nq);
    for (int64_t i = 0; i < nt * nq; i++) own[i] = (Best){hs + i * k, hi + i * k, 0, k};
    #pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int p = 0; p < nt; p++)
        scan(round, x, nq, rows, n, N * p / nt, N * (p + 1) / nt, skip, own + p * nq, isa);
    for (int p = 0; p < nt; p++)
        for (int64_t i = 0; i < nq; i++)
            for (int64_t e = 0; e < own[p * nq + i].size; e++)
                best_push(&best[i], own[p * nq + i].score[e], own[p * nq + i].index[e]);
    free(hs);
    free(hi);
    free(own);
}

/* ---------------------------------------------------------------- chunk search

 * For H heads, Tq queries each (q [H, Tq, D] fp32) against the first `used` chunk keys of
 * each head (keys: head h's row j at keys + h * head_stride + j * D, float16): the k best
 * slots per (head, query), best first, into out [H, Tq, k] int64; `sentinel` where fewer
 * exist. skip [used] (or NULL): nonzero marks a freed slot, never returned. */
void search_chunks_f16(const float *q, int64_t H, int64_t Tq, int64_t D, const uint16_t *keys, int64_t head_stride,
                       int64_t used, const uint8_t *skip, int64_t k, int64_t sentinel, int64_t *out, int nthreads,
                       int isa) {
    float *hs = (float *)malloc(sizeof(float) * (Tq + 1) * k), *scores = hs + Tq * k; /* scores: not returned */
    int64_t *hi = (int64_t *)malloc(sizeof(int64_t) * Tq * k);
    Best *best = (Best *)malloc(sizeof(Best) * Tq);
    for (int64_t h = 0; h < H; h++) {
        for (int64_t t = 0; t < Tq; t++) best[t] = (Best){hs + t * k, hi + t * k, 0, k};
        Rows rows = {ROWS_F16, keys + h * head_stride, D, NULL, NULL, 0.0f};
        scan_all(0, q + h * Tq * D, Tq, rows, D, used, skip, k, best, nthreads, isa);
        for (int64_t t = 0; t < Tq; t++) {
            int64_t *o = out + (h * Tq + t) * k, got = best[t].size;
            best_sorted(&best[t], scores, o);
            for (int64_t i = got; i < k; i++) o[i] = sentinel;
        }
    }
    free(hs);
    free(hi);
    free(best);
}

/* ---------------------------------------------------------------- token search */

/* For T unit queries q [T, dim] fp32 against N stored keys [N, dim] bfloat16: the kk best by
 * exact fp32 cosine, of a shortlist of the `shortlist` best by an approximate score
 * qs[t] . rows[j] (qs [T, s]: the queries as the caller projected them), into sims [T, kk]
 * fp32 and index [T, kk] int64, best first. `round`: round the approximate scores to
 * bfloat16, as torch's bfloat16 product rounds its output. */
static void search_tokens(const float *q, int64_t T, int64_t dim, const float *qs, Rows rows, int64_t s, int round,
                          const uint16_t *keys, int64_t N, int64_t shortlist, int64_t kk, float *sims,
                          int64_t *index, int nthreads, int isa) {
    float *hs = (float *)malloc(sizeof(float) * 2 * shortlist), *approx = hs + shortlist;
    int64_t *hi = (int64_t *)malloc(sizeof(int64_t) * 2 * shortlist), *cand = hi + shortlist;
    int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * s);
    for (int64_t t = 0; t < T; t++) {
        const float *x = q + t * dim;
        if (rows.fmt == ROWS_I8) { /* the query to int16, one scale: NaN or inf make every score NaN */
            float amax = 0.0f;
            int finite = 1;
            for (int64_t c = 0; c < s; c++) {
                finite &= isfinite(qs[t * s + c]) != 0;
                amax = fmaxf(amax, fabsf(qs[t * s + c]));
            }
            /* |sum| <= s * qmax * 127 must fit int32: qmax 32767 up to s = 516 */
            const float qmax = s <= 516 ? 32767.0f : (float)(2147483647LL / (127 * s));
            rows.xscale = !finite ? NAN : amax > 0.0f ? amax / qmax : 1.0f;
            for (int64_t c = 0; c < s; c++) xq[c] = finite ? (int16_t)lrintf(qs[t * s + c] / rows.xscale) : 0;
            rows.xq = xq;
        }
        Best best = {hs, hi, 0, shortlist};
        scan_all(round, qs + t * s, 1, rows, s, N, NULL, shortlist, &best, nthreads, isa);
        int64_t got = best.size;
        best_sorted(&best, approx, cand);
        Best top = {hs, hi, 0, kk};
        for (int64_t i = 0; i < got; i++) /* the candidates are scattered: one row at a time */
            best_push(&top, (isa && dim % 8 == 0 ? dot1_bf16 : dot_bf16)(x, keys + cand[i] * dim, dim), cand[i]);
        int64_t found = top.size;
        best_sorted(&top, sims + t * kk, index + t * kk);
        for (int64_t i = found; i < kk; i++) { /* NaN scores enter no heap: as the batch pads rows */
            sims[t * kk + i] = -INFINITY;
            index[t * kk + i] = 0;
        }
    }
    free(hs);
    free(hi);
    free(xq);
}

/* the shortlist over rows [N, s] bfloat16 (the keys themselves), scores rounded to bfloat16
 * as torch's product rounds them */
void search_tokens_bf16(const float *q, int64_t T, int64_t dim, const float *qs, const uint16_t *rows, int64_t s,
                        const uint16_t *keys, int64_t N, int64_t shortlist, int64_t kk, float *sims, int64_t *index,
                        int nthreads, int isa) {
    Rows r = {ROWS_BF16, rows, s, NULL, NULL, 0.0f};
    search_tokens(q, T, dim, qs, r, s, 1, keys, N, shortlist, kk, sims, index, nthreads, isa);
}

/* the shortlist over int8 projections rows [N, s] times their scale [N] fp32, against the
 * query qs rounded to int16 with one scale (amax / 32767 for s <= 516, round half to even) */
static void search_tokens_i8(const float *q, int64_t T, int64_t dim, const float *qs, const int8_t *rows,
                             const float *scale, int64_t s, const uint16_t *keys, int64_t N, int64_t shortlist,
                             int64_t kk, float *sims, int64_t *index, int nthreads, int isa) {
    Rows r = {ROWS_I8, rows, s, scale, NULL, 0.0f};
    search_tokens(q, T, dim, qs, r, s, 0, keys, N, shortlist, kk, sims, index, nthreads, isa);
}

/* q [dim] -> q / max(|q|, 1e-12) (torch's normalize) into unit, and unit @ basis [dim, s]
 * (row-major) into qs [s] */
AVX2 static void project_avx2(const float *unit, int64_t dim, const float *basis, int64_t s, float *qs) {
    for (int64_t j = 0; j < s; j += 8) _mm256_storeu_ps(qs + j, _mm256_setzero_ps());
    for (int64_t d = 0; d < dim; d++) {
        __m256 u = _mm256_set1_ps(unit[d]);
        for (int64_t j = 0; j < s; j += 8)
            _mm256_storeu_ps(qs + j, _mm256_fmadd_ps(u, _mm256_loadu_ps(basis + d * s + j), _mm256_loadu_ps(qs + j)));
    }
}

static void normalize_project(const float *q, int64_t dim, const float *basis, int64_t s, float *unit, float *qs,
                              int isa) {
    double ss = 0.0;
    for (int64_t d = 0; d < dim; d++) ss += (double)q[d] * q[d];
    float norm = (float)sqrt(ss);
    norm = norm > 1e-12f ? norm : 1e-12f;
    for (int64_t d = 0; d < dim; d++) unit[d] = q[d] / norm;
    if (isa && s % 8 == 0) {
        project_avx2(unit, dim, basis, s, qs);
        return;
    }
    for (int64_t j = 0; j < s; j++) qs[j] = 0.0f;
    for (int64_t d = 0; d < dim; d++)
        for (int64_t j = 0; j < s; j++) qs[j] += unit[d] * basis[d * s + j];
}

/* A decode step's TokenMemory.search of one raw query q [dim]: normalized and projected onto
 * basis [dim, s] here, shortlisted over the int8 projections (search_tokens_i8), rescored;
 * the kk best as sims [kk] and the stored next tokens next[index] [kk] (0 past the found). */
int token_search_step(const float *q, int64_t dim, const float *basis, int64_t s, const int8_t *rows,
                      const float *scale, const uint16_t *keys, int64_t N, int64_t shortlist, int64_t kk,
                      const int64_t *next, float *sims, int64_t *out_next, int nthreads, int isa) {
    float *unit = (float *)malloc(sizeof(float) * (dim + s)), *qs = unit + dim;
    int64_t *index = (int64_t *)malloc(sizeof(int64_t) * kk);
    if (!unit || !index) {
        free(unit);
        free(index);
        return -1;
    }
    normalize_project(q, dim, basis, s, unit, qs, isa);
    search_tokens_i8(unit, 1, dim, qs, rows, scale, s, keys, N, shortlist, kk, sims, index, nthreads, isa);
    for (int64_t i = 0; i < kk; i++) out_next[i] = sims[i] == -INFINITY ? 0 : next[index[i]];
    free(unit);
    free(index);
    return 0;
}

/* ---------------------------------------------------------------- exact-match read */

#define HASH_P 2147483647LL /* TokenMemory's n-gram hash (token_memory.py) */
#define HASH_BASE 1000003LL

static int64_t first_at_least(const int64_t *v, int64_t n, int64_t x) { /* searchsorted, left */
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (v[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* TokenMemory.match for the last position of stream = text [M1] ++ context [C] (a decode
 * step): for the longest order n (orders[i], descending) whose n-gram ending there occurs in
 * memory (vals[i] [len[i]]: its sorted hashes; pos[i]: the text position each ends at), the
 * k most recent occurrences; lens [k]: how many tokens agree counting back from each (up to
 * max_match, never into text[0]), 0 where there is no candidate; follow [k]: the token after
 * it (next_ids[p], 0 where lens is 0). */
void match_last(const int64_t *text, int64_t M1, const int64_t *context, int64_t C, int64_t n_orders,
                const int64_t *orders, const int64_t *const *vals, const int64_t *const *pos, const int64_t *len,
                const int64_t *next_ids, int64_t k, int64_t max_match, int64_t *lens, int64_t *follow) {
    const int64_t S = M1 + C, q = S - 1;
#define AT(j) ((j) < M1 ? text[j] : context[(j) - M1])
    for (int64_t j = 0; j < k; j++) lens[j] = follow[j] = 0;
    for (int64_t i = 0; i < n_orders; i++) {
        int64_t n = orders[i];
        if (n > S) continue;
        int64_t h = 0;
        for (int64_t j = S - n; j < S; j++) h = (h * HASH_BASE + AT(j) + 2) % HASH_P;
        int64_t lo = first_at_least(vals[i], len[i], h), hi = first_at_least(vals[i], len[i], h + 1);
        if (hi <= lo) continue;
        for (int64_t j = 0; j < k && hi - 1 - j >= lo; j++) { /* most recent first */
            int64_t p = pos[i][hi - 1 - j], m = 0;
            while (m < max_match && p - m >= 1 && AT(p - m) == AT(q - m)) m++;
            lens[j] = m;
            follow[j] = m > 0 ? next_ids[p] : 0;
        }
        break;
    }
#undef AT
}

/* ---------------------------------------------------------------- reading the chunks found */

AVX2 static void f16_to_f32_avx2(const uint16_t *in, int64_t n, float *out) { /* n % 8 == 0 */
    for (int64_t c = 0; c < n; c += 8) _mm256_storeu_ps(out + c, load_f16(in + c));
}

/* What MemoryBank.search returns for the slots search_chunks_f16 chose: slots [H, T*g, k]
 * (row t*g + i: query token t, query head i of kv head h) -> keys_out, values_out
 * [T, H*g, k*S, D] fp32 (chunk j's S tokens at j*S) and mask [T, H*g, k*S] (1: a stored
 * token) from keys, values [H, C+1, S, D] float16 and fill [C+1] (tokens in each slot; slot C
 * is the empty sentinel). hits [C+1] int32 (or NULL) counts each real slot a counted query
 * token (counted [T], or NULL: all) retrieved. */
void read_chunks_f16(const int64_t *slots, int64_t H, int64_t T, int64_t g, int64_t k, int64_t S, int64_t D,
                     const uint16_t *keys, const uint16_t *values, const uint8_t *fill, int64_t C, int32_t *hits,
                     const uint8_t *counted, float *keys_out, float *values_out, uint8_t *mask, int nthreads,
                     int isa) {
    const int64_t chunk = S * D, Hq = H * g;
    /* a prompt's many tokens: both threads (the outputs are fresh memory, whose first touch costs
     * more than the copy); one token: no team */
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (T > 1 && nthreads > 1)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < g; i++) {
                const int64_t *sl = slots + (h * T * g + t * g + i) * k, hq = h * g + i;
                float *ko = keys_out + (t * Hq + hq) * k * chunk, *vo = values_out + (t * Hq + hq) * k * chunk;
                uint8_t *mo = mask + (t * Hq + hq) * k * S;
                for (int64_t j = 0; j < k; j++) {
                    const int64_t s = sl[j], at = (h * (C + 1) + s) * chunk;
                    if (hits && s != C && (!counted || counted[t])) {
                        #pragma omp atomic
                        hits[s]++;
                    }
                    if (isa && chunk % 8 == 0) {
                        f16_to_f32_avx2(keys + at, chunk, ko + j * chunk);
                        f16_to_f32_avx2(values + at, chunk, vo + j * chunk);
                    } else {
                        for (int64_t e = 0; e < chunk; e++) {
                            ko[j * chunk + e] = f16_f32(keys[at + e]);
                            vo[j * chunk + e] = f16_f32(values[at + e]);
                        }
                    }
                    for (int64_t r = 0; r < S; r++) mo[j * S + r] = r < fill[s];
                }
            }
}
