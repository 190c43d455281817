/* Native CPU decoding kernels (see kernels/__init__.py): products y_r = W x_r for a few rows x_r
 * (float32 and int8 weights, any number of rows; bfloat16 weights, one or two rows with AVX512-BF16
 * pair dot products, any number widened to float32 without them), single-query attention over a
 * K/V cache, and one whole decoder layer of a decoding step.
 *
 * Decoding one image multiplies two rows (prompt and empty caption) by every weight matrix, so
 * the step is bound by how fast W streams from memory. The products read each weight row once
 * and keep the x rows in registers: ~30 GB/s on a 2-core Zen 4 against ~21 GB/s for oneDNN's
 * small-batch sgemm (benchmarks/bench_generate.py measures it). Float32 arithmetic throughout;
 * only the summation order differs from a plain matmul.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 8

#ifdef __AVX512F__
#define F32_ROWS 4
#define F32_XR 6
/* 16 weights from element k of a float32 (BF16 = 0) or bfloat16 (BF16 = 1, widened: exact) row;
 * m masks a tail. */
static inline __m512 load_w(const void* row, long k, __mmask16 m, const int BF16) {
  if (BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const unsigned short*)row + k)), 16));
  return _mm512_maskz_loadu_ps(m, (const float*)row + k);
}

/* load_w of a whole vector (plain loads, as before bfloat16 shared this code). */
static inline __m512 load_w16(const void* row, long k, const int BF16) {
  if (BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const unsigned short*)row + k))),
        16));
  return _mm512_loadu_ps((const float*)row + k);
}

/* Outputs n..n+rows-1 of X rows r0..r0+xr-1 (xr <= XR) for dallemini_gemm_f32 (BF16:
 * for dallemini_gemm_bf16w, weights widened as loaded); XR is a constant at
 * every call, so each call compiles to exactly XR accumulators per weight row. Per output: 16-wide
 * partial sums over k, the masked tail, one reduction, whatever the other rows, so a row's result
 * does not depend on which rows decode beside it. `next` (or NULL): the next block's weight rows,
 * of which this call, pass `pass` of `passes` over the block, prefetches its share. */
static inline void f32_block(const void* Wn, const float* X, float* Y, long N, long K, long n,
                             long rows, long r0, long xr, const int XR, const void* next,
                             long pass, long passes, const int BF16) {
  const long size = BF16 ? 2 : 4; /* bytes per weight */
  const char* w[F32_ROWS];
  const float* x[F32_XR];
  for (int i = 0; i < F32_ROWS; i++) w[i] = (const char*)Wn + (i < rows ? i : 0) * K * size;
  for (int j = 0; j < XR; j++) x[j] = X + (r0 + (j < xr ? j : 0)) * K;
  __m512 acc[F32_ROWS][F32_XR];
  for (int i = 0; i < F32_ROWS; i++)
    for (int j = 0; j < XR; j++) acc[i][j] = _mm512_setzero_ps();
  long k = 0;
  for (; k + 16 <= K; k += 16) { /* the weight vectors stay in registers, X rows stream past */
    __m512 v[F32_ROWS];
    for (int i = 0; i < F32_ROWS; i++) v[i] = load_w16(w[i], k, BF16);
    if (next && (k / 16) % passes == 0) { /* this pass's share of the next block */
      long at = pass * K / passes / 16 * 16 + k / passes / 16 * 16;
      if (at < K)
        for (int i = 0; i < F32_ROWS; i++)
          _mm_prefetch((const char*)next + (i * K + at) * size, _MM_HINT_T1);
    }
    for (int j = 0; j < XR; j++) {
      __m512 xv = _mm512_loadu_ps(x[j] + k);
      for (int i = 0; i < F32_ROWS; i++) acc[i][j] = _mm512_fmadd_ps(v[i], xv, acc[i][j]);
    }
  }
  if (k < K) { /* the last K % 16 columns */
    __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
    __m512 v[F32_ROWS];
    for (int i = 0; i < F32_ROWS; i++) v[i] = load_w(w[i], k, m, BF16);
    for (int j = 0; j < XR; j++) {
      __m512 xv = _mm512_maskz_loadu_ps(m, x[j] + k);
      for (int i = 0; i < F32_ROWS; i++) acc[i][j] = _mm512_fmadd_ps(v[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < xr; j++) Y[(r0 + j) * N + n + i] = _mm512_reduce_add_ps(acc[i][j]);
}

/* X rows in the next pass: six, then four or two, then one. */
static inline long f32_group(long left) {
  return left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

/* Outputs n..n+rows-1 of all R rows of X from the weight block at Wn (rows of K floats), in passes
 * of up to six X rows; the passes prefetch `next` (NULL: nothing), a share each. */
static inline void f32_rows_of(const void* Wn, const float* X, float* Y, long R, long N, long K,
                               long n, long rows, const void* next, const int BF16) {
  long passes = 0;
  for (long r0 = 0; r0 < R; r0 += f32_group(R - r0)) passes++;
  long pass = 0;
  for (long r0 = 0; r0 < R; pass++) {
    long xr = f32_group(R - r0);
    if (xr == 6)
      f32_block(Wn, X, Y, N, K, n, rows, r0, 6, 6, next, pass, passes, BF16);
    else if (xr == 4)
      f32_block(Wn, X, Y, N, K, n, rows, r0, 4, 4, next, pass, passes, BF16);
    else if (xr == 2)
      f32_block(Wn, X, Y, N, K, n, rows, r0, 2, 2, next, pass, passes, BF16);
    else
      f32_block(Wn, X, Y, N, K, n, rows, r0, 1, 1, next, pass, passes, BF16);
    r0 += xr;
  }
}

#else
/* AVX2 + FMA (no AVX-512): the same blocking with 8-wide vectors. Sixteen registers hold four
 * weight rows' accumulators against two X rows (8), the two X vectors and one weight vector. */
#define F32_ROWS 4
#define F32_XR 2
static const int TAIL_MASK[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* Lanes 0..n-1 set (n <= 8): a maskload's mask for the last n elements. */
static inline __m256i tail_mask(long n) {
  return _mm256_loadu_si256((const __m256i*)(TAIL_MASK + 8 - n));
}

/* Weight types of the AVX2 blocks: float32, bfloat16 and int8 (both widened exactly to float32). */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

/* 8 weights from element k of a row of type T, as floats. */
static inline __m256 load_w8(const void* row, long k, const int T) {
  if (T == W_BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const unsigned short*)row + k))),
        16));
  if (T == W_I8)
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const signed char*)row + k))));
  return _mm256_loadu_ps((const float*)row + k);
}

/* The last n < 8 weights of a row of type T from element k, zeros after. */
static inline __m256 load_w_tail(const void* row, long k, long n, const int T) {
  if (T == W_F32) return _mm256_maskload_ps((const float*)row + k, tail_mask(n));
  long size = T == W_BF16 ? 2 : 1;
  unsigned short t[16] = {0}; /* room for a whole vector's load of either type */
  memcpy(t, (const char*)row + k * size, (size_t)(n * size));
  return load_w8(t, 0, T);
}

/* The sum of a vector's 8 lanes (fixed order). */
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* acc[i][j] += the 8 weights of row w[i] from element k times those of x[j] (j < XR). */
static inline void fma8(__m256 acc[F32_ROWS][F32_XR], const char* const* w, const float* const* x,
                        long k, const int XR, const int T) {
  __m256 xv[F32_XR];
  for (int j = 0; j < XR; j++) xv[j] = _mm256_loadu_ps(x[j] + k);
  for (int i = 0; i < F32_ROWS; i++) {
    __m256 v = load_w8(w[i], k, T);
    for (int j = 0; j < XR; j++) acc[i][j] = _mm256_fmadd_ps(v, xv[j], acc[i][j]);
  }
}

/* As the AVX-512 f32_block: outputs n..n+rows-1 of X rows r0..r0+xr-1 (xr <= XR <= 2), per output
 * 8-wide partial sums over k, the tail, one reduction, so a row's result does not depend on the
 * rows beside it; each pass prefetches its share of `next`, one cache line per row at a time. */
static inline void f32_block(const void* Wn, const float* X, float* Y, long N, long K, long n,
                             long rows, long r0, long xr, const int XR, const void* next,
                             long pass, long passes, const int T) {
  const long size = T == W_BF16 ? 2 : T == W_I8 ? 1 : 4;
  const char* w[F32_ROWS];
  const float* x[F32_XR];
  for (int i = 0; i < F32_ROWS; i++) w[i] = (const char*)Wn + (i < rows ? i : 0) * K * size;
  for (int j = 0; j < XR; j++) x[j] = X + (r0 + (j < xr ? j : 0)) * K;
  __m256 acc[F32_ROWS][F32_XR];
  for (int i = 0; i < F32_ROWS; i++)
    for (int j = 0; j < XR; j++) acc[i][j] = _mm256_setzero_ps();
  long k = 0;
  if (T != W_F32) {
    /* Widened weights: a cache line of every weight row per step (L elements); every `passes`
     * lines this pass prefetches the next line of its share of `next`. Per output the same sums
     * in the same order as below, without a prefetch test and division every 16 elements (one
     * image's int8 step on an AVX2 EPYC: docs/speed.md, benchmarks/bench_generate.py). */
    const long L = 64 / size;
    long at = pass * K / passes / L * L, tick = 0;
    for (; k + L <= K; k += L) {
      if (next && tick == 0 && at < K)
        for (int i = 0; i < F32_ROWS; i++)
          _mm_prefetch((const char*)next + (i * K + at) * size, _MM_HINT_T1);
      if (++tick == passes) {
        tick = 0;
        at += L;
      }
#pragma GCC unroll 8
      for (long u = 0; u < L; u += 8) fma8(acc, w, x, k + u, XR, T);
    }
  }
  for (; k + 8 <= K; k += 8) {
    if (T == W_F32 && next && k % 16 == 0 && (k / 16) % passes == 0) {
      long at = pass * K / passes / 16 * 16 + k / passes / 16 * 16;
      if (at < K)
        for (int i = 0; i < F32_ROWS; i++)
          _mm_prefetch((const char*)next + (i * K + at) * size, _MM_HINT_T1);
    }
    fma8(acc, w, x, k, XR, T);
  }
  if (k < K) { /* the last K % 8 columns */
    __m256i m = tail_mask(K - k);
    __m256 xv[F32_XR];
    for (int j = 0; j < XR; j++) xv[j] = _mm256_maskload_ps(x[j] + k, m);
    for (int i = 0; i < F32_ROWS; i++) {
      __m256 v = load_w_tail(w[i], k, K - k, T);
      for (int j = 0; j < XR; j++) acc[i][j] = _mm256_fmadd_ps(v, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < xr; j++) Y[(r0 + j) * N + n + i] = hsum8(acc[i][j]);
}

/* Outputs n..n+rows-1 of all R rows of X, two X rows a pass (then the odd one). */
static inline void f32_rows_of(const void* Wn, const float* X, float* Y, long R, long N, long K,
                               long n, long rows, const void* next, const int T) {
  long passes = (R + 1) / 2, pass = 0;
  for (long r0 = 0; r0 < R; r0 += 2, pass++) {
    if (R - r0 >= 2)
      f32_block(Wn, X, Y, N, K, n, rows, r0, 2, 2, next, pass, passes, T);
    else
      f32_block(Wn, X, Y, N, K, n, rows, r0, 1, 1, next, pass, passes, T);
  }
}
#endif

static void f32_rows(const float* Wn, const float* X, float* Y, long R, long N, long K, long n,
                     long rows, const float* next) {
  f32_rows_of(Wn, X, Y, R, N, K, n, rows, next, 0);
}

#ifdef __AVX512F__
/* As f32_rows, for a block of bfloat16 weight rows, each vector widened in registers. */
static void bf16_rows(const unsigned short* Wn, const float* X, float* Y, long R, long N, long K,
                      long n, long rows, const unsigned short* next) {
  f32_rows_of(Wn, X, Y, R, N, K, n, rows, next, 1);
}
#endif

#ifndef __AVX512F__
/* AVX2: rows 0..rows-1 of a weight block of type T (bfloat16 or int8) widened to float32 into f
 * (rows of K floats), prefetching the block at `next`. */
static void widen_rows(const void* Wn, const int T, float* f, long K, long rows, const char* next) {
  const long size = T == W_BF16 ? 2 : 1;
  for (long i = 0; i < rows; i++) {
    const char* w = (const char*)Wn + i * K * size;
    long k = 0;
    for (; k + 8 <= K; k += 8) {
      if (next && (k * size) % 64 == 0) _mm_prefetch(next + (i * K + k) * size, _MM_HINT_T1);
      _mm256_storeu_ps(f + i * K + k, load_w8(w, k, T));
    }
    if (k < K) _mm256_maskstore_ps(f + i * K + k, tail_mask(K - k), load_w_tail(w, k, K - k, T));
  }
}

/* AVX2: Y [R, N] = X [R, K] W^T (times scale [N] unless NULL) for bfloat16 or int8 weights (T).
 * One or two rows widen each weight vector in registers as it streams; more rows widen each block
 * of weight rows once into per-thread scratch (it stays in cache) and multiply it as float32, so
 * the widening is not repeated for every pair of rows. Both give the same values in the same
 * order, so a row's result does not depend on the rows beside it. */
static void typed_gemm(const void* W, const int T, const float* scale, const float* X, float* Y,
                       long R, long N, long K, int threads) {
  const long size = T == W_BF16 ? 2 : 1;
  long blocks = (N + F32_ROWS - 1) / F32_ROWS;
#pragma omp parallel num_threads(threads)
  {
    float* f = R > 2 ? (float*)malloc(F32_ROWS * K * sizeof(float)) : NULL;
#pragma omp for schedule(static)
    for (long b = 0; b < blocks; b++) {
      long n = b * F32_ROWS, rows = N - n < F32_ROWS ? N - n : F32_ROWS;
      const char* Wn = (const char*)W + n * K * size;
      const char* next = b + 1 < blocks ? Wn + F32_ROWS * K * size : NULL;
      if (f) {
        widen_rows(Wn, T, f, K, rows, next);
        f32_rows(f, X, Y, R, N, K, n, rows, NULL);
      } else if (T == W_BF16) { /* (also where the scratch could not be had) */
        f32_rows_of(Wn, X, Y, R, N, K, n, rows, next, W_BF16);
      } else {
        f32_rows_of(Wn, X, Y, R, N, K, n, rows, next, W_I8);
      }
      if (scale)
        for (long r = 0; r < R; r++)
          for (long i = 0; i < rows; i++) Y[r * N + n + i] *= scale[n + i];
    }
    free(f);
  }
}
#endif

/* Y [R, N] = X [R, K] W^T, W [N, K] row-major, for any number of rows R: four weight rows at a
 * time against up to six X rows (two with AVX2), so each weight block streams from memory once and
 * is read again from cache per further group of rows. The passes over a block prefetch the next
 * one, a share each, so that memory stays busy while they compute (benchmarks/bench_kernels.py:
 * nine images' mini step through the layer kernels 50 ms against 68 ms op by op on oneDNN, on a
 * 2-core Xeon). */
void dallemini_gemm_f32(const float* W, const float* X, float* Y, long R, long N, long K,
                        int threads) {
  long blocks = (N + F32_ROWS - 1) / F32_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; b++) {
    long n = b * F32_ROWS;
    long rows = N - n < F32_ROWS ? N - n : F32_ROWS;
    f32_rows(W + n * K, X, Y, R, N, K, n, rows, b + 1 < blocks ? W + (n + F32_ROWS) * K : NULL);
  }
}

#ifdef __AVX512BF16__
/* bfloat16: the weight in a blocked layout Wp [ceil(N/8)][Kp/32][8][32] (rows padded to a multiple of
 * 8, columns to Kp, a multiple of 32, with zeros; see kernels.pack_bf16), so every block of eight
 * rows streams as one contiguous run (~29 GB/s here, against ~23 row by row and ~20 for oneDNN);
 * x0, x1 [Kp] bfloat16. Products of two bfloat16 values are exact in float32 and accumulate in
 * float32 (AVX512-BF16's pair dot product). */
void dallemini_gemv2_bf16(const unsigned short* Wp, const unsigned short* x0,
                          const unsigned short* x1, float* y0, float* y1, long N, long Kp,
                          int threads) {
  long blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; b++) {
    const unsigned short* w = Wp + b * Kp * ROWS;
    __m512 a0[ROWS], a1[ROWS];
    for (int i = 0; i < ROWS; i++) {
      a0[i] = _mm512_setzero_ps();
      a1[i] = _mm512_setzero_ps();
    }
    for (long k = 0; k < Kp; k += 32, w += 32 * ROWS) {
      __m512bh v0 = (__m512bh)_mm512_loadu_si512(x0 + k);
      __m512bh v1 = (__m512bh)_mm512_loadu_si512(x1 + k);
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; i++) {
        __m512bh v = (__m512bh)_mm512_loadu_si512(w + 32 * i);
        a0[i] = _mm512_dpbf16_ps(a0[i], v, v0);
        a1[i] = _mm512_dpbf16_ps(a1[i], v, v1);
      }
    }
    long n = b * ROWS;
    for (long i = 0; i < ROWS && n + i < N; i++) {
      y0[n + i] = _mm512_reduce_add_ps(a0[i]);
      y1[n + i] = _mm512_reduce_add_ps(a1[i]);
    }
  }
}
#endif

/* ---- One decoder layer of a decoding step, in one call ----------------------------------------
 * A step of one image is ~110 weight products of one or two rows; run op by op from Python, the
 * work between them (layer norms, attention, casts, dispatch: ~400 small ops) costs a bf16 step
 * ~40% on top of streaming the weights, and a float32 step of nine images ~1/3. Here the whole
 * NormFormer layer (models/bart.py DecoderLayer, eval mode) runs in C: the residual stream stays
 * float32, weights are float32 row-major, the bfloat16 blocked copies above or int8 rows with a
 * scale each, the K/V cache float32 or (bfloat16 models) bfloat16. */

typedef struct {
  long d, heads, head_dim, ffn; /* model width, heads, head width, GLU width */
  long kp_d, kp_f;              /* bfloat16: d and ffn padded to the blocked layout's 32 columns */
  long max_len, text_len;       /* self-attention cache positions, cross-attention keys */
  float eps;
  int bf16; /* 1: w[] are bfloat16 blocked copies, 2: bfloat16 [N, K], 0: float32 [N, K] */
  int kv16;                     /* 1: the K/V caches are bfloat16, 0: float32 */
  const void* w[9];             /* q, k, v, out, cross q, cross out, fc0, fc1, fc2 */
  const float* ln_w[6];         /* pre-self, self, pre-cross, cross, glu ln0, glu ln1; NULL = 1 */
  const float* ln_b[6];
  int i8;                       /* 1: w[] are int8 [N, K] with one float32 scale per row */
  const float* scale[9];        /* int8: the scales of w[] */
} dallemini_layer;

/* Layer norm of n floats, float32 statistics as torch's (two passes). */
static void layer_norm(const float* x, float* y, long n, const float* w, const float* b,
                       float eps) {
  float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
  for (long i = 0; i < n; i++) mean += x[i];
  mean /= (float)n;
#pragma omp simd reduction(+ : var)
  for (long i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
  float r = 1.f / sqrtf(var / (float)n + eps);
  for (long i = 0; i < n; i++) y[i] = (x[i] - mean) * r * (w ? w[i] : 1.f) + b[i];
}

void dallemini_gemv_i8(const signed char* W, const float* scale, const float* X, float* Y, long R,
                       long N, long K, int threads);

int dallemini_gemm_bf16w(const unsigned short* W, const float* X, float* Y, long R, long N, long K,
                         int threads);
static inline unsigned short to_bf16(float f);

/* 8 floats rounded to bfloat16 and widened back (the bits of to_bf16 << 16, NaN included). */
static inline __m256i round_bf16_8(const float* x) {
  const __m256i u = _mm256_loadu_si256((const __m256i*)x), high = _mm256_set1_epi32((int)0xffff0000u);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), high);
  __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                   _mm256_set1_epi32(0x7f800000));
  __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), high);
  return _mm256_blendv_epi8(r, quiet, nan);
}

/* y[r] = W x[r] for rows r < R (x: R rows of K floats, y: R rows of N; spare: N floats of
 * scratch); bfloat16 weights take their input rounded to bfloat16 (nearest even, as torch's cast),
 * zero-padded to Kp. */
static void product(const dallemini_layer* p, int which, const float* x, float* y, int R, long N,
                    long K, long Kp, void* xb, float* spare, int threads) {
  if (p->i8) { /* rows of y are contiguous: y, y + N */
    dallemini_gemv_i8((const signed char*)p->w[which], p->scale[which], x, y, R, N, K, threads);
    return;
  }
  if (!p->bf16) {
    dallemini_gemm_f32((const float*)p->w[which], x, y, R, N, K, threads);
    return;
  }
  if (p->bf16 == 2) { /* plain bfloat16 [N, K]: the input rounded to bfloat16, kept as floats */
    float* xr = (float*)xb;
    long i = 0;
    for (; i + 8 <= R * K; i += 8) _mm256_storeu_si256((__m256i*)(xr + i), round_bf16_8(x + i));
    for (; i < R * K; i++) {
      unsigned int u = (unsigned int)to_bf16(x[i]) << 16;
      memcpy(xr + i, &u, 4);
    }
    if (dallemini_gemm_bf16w((const unsigned short*)p->w[which], xr, y, R, N, K, threads) != 0)
      for (long i = 0; i < R * N; i++) y[i] = NAN; /* no scratch memory: never a silent result */
    return;
  }
#ifdef __AVX512BF16__
  unsigned short* b = (unsigned short*)xb;
  for (int r = 0; r < R; r++) {
    long k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256((__m256i*)(b + r * Kp + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * K + k)));
    if (k < K) {
      __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
      _mm256_storeu_si256((__m256i*)(b + r * Kp + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + r * K + k)));
      k += 16;
    }
    for (; k < Kp; k++) b[r * Kp + k] = 0;
  }
  for (int r = 0; r < R; r += 2) /* two rows per pass over the weight */
    dallemini_gemv2_bf16((const unsigned short*)p->w[which], b + r * Kp,
                         r + 1 < R ? b + (r + 1) * Kp : b + r * Kp, y + r * N,
                         r + 1 < R ? y + (r + 1) * N : spare, N, Kp, threads);
#else
  (void)Kp, (void)xb, (void)spare; /* the layer refuses bfloat16 weights in this build */
#endif
}

/* float32 -> bfloat16 bits, rounding to nearest even (finite values; NaN stays NaN). */
static inline unsigned short to_bf16(float f) {
  unsigned int u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
/* 16 cache values from element i of a float32 (kv16 = 0) or bfloat16 (kv16 = 1) row, as floats;
 * m masks the last Dh % 16 of a head. bfloat16 -> float32 is exact: the bits shifted up by 16. */
static inline __m512 load_kv(const void* row, long i, __mmask16 m, int kv16) {
  if (kv16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const unsigned short*)row + i)), 16));
  return _mm512_maskz_loadu_ps(m, (const float*)row + i);
}

/* exp(y) for y <= 0 (down to where it underflows to 0), 16 at a time: y = n ln2 + r, |r| <= ln2/2,
 * exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7 there), times 2^n by scalef. */
static inline __m512 exp_neg(__m512 y) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-104.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), y); /* ln2, split in two */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 e = _mm512_set1_ps(1.f / 720.f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, n);
}

/* The 16 lane sums of a[0..15], as one vector (a is scratch): halving the lanes of pairs
 * level by level costs ~2 shuffles and 1 add a key where a horizontal sum per key costs ~8 and
 * stalls on its latency (the score loop's bottleneck before). */
static inline __m512 sum16(__m512* a) {
  for (int i = 0; i < 8; i++) /* [keys 2i | 2i+1], 8 partial sums each */
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++) /* 128-bit lane j: key 4i + j, 4 partial sums */
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; i++) /* lane j: keys 8i + j and 8i + 4 + j, 2 partial sums each */
    a[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  /* lane j, element e: key j + 4e */
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(a[0], a[1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_ps(a[0], a[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

/* Softmax(q K^T * scale + mask) V for one query over T keys of Dh values each (float32 or
 * bfloat16 cache, see load_kv); s holds T scores; float32 arithmetic. Heads of 64 (DALL-E
 * Mini's and Mega's) keep the query and the output in registers: one pass over each cache row. */
static void attend_one(const float* q, const void* K, const void* V, int kv16, long T, long Dh,
                       const float* mask, float scale, float* s, float* out) {
  long size = kv16 ? 2 : 4;
  const __mmask16 all = (__mmask16)0xFFFF;
  float m = -INFINITY;
  if (Dh == 64) {
    __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16);
    __m512 q2 = _mm512_loadu_ps(q + 32), q3 = _mm512_loadu_ps(q + 48);
    __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(-INFINITY), acc[16];
    long t = 0;
    for (; t + 16 <= T; t += 16) { /* 16 keys' scores at once */
      for (int i = 0; i < 16; i++) {
        const char* k = (const char*)K + (t + i) * 64 * size;
        __m512 a = _mm512_mul_ps(q0, load_kv(k, 0, all, kv16));
        a = _mm512_fmadd_ps(q1, load_kv(k, 16, all, kv16), a);
        a = _mm512_fmadd_ps(q2, load_kv(k, 32, all, kv16), a);
        acc[i] = _mm512_fmadd_ps(q3, load_kv(k, 48, all, kv16), a);
      }
      __m512 sc = _mm512_mul_ps(sum16(acc), vs);
      if (mask) sc = _mm512_add_ps(sc, _mm512_loadu_ps(mask + t));
      _mm512_storeu_ps(s + t, sc);
      vm = _mm512_max_ps(vm, sc);
    }
    m = _mm512_reduce_max_ps(vm);
    for (; t < T; t++) { /* the last T % 16 */
      const char* k = (const char*)K + t * 64 * size;
      __m512 a = _mm512_mul_ps(q0, load_kv(k, 0, all, kv16));
      a = _mm512_fmadd_ps(q1, load_kv(k, 16, all, kv16), a);
      a = _mm512_fmadd_ps(q2, load_kv(k, 32, all, kv16), a);
      a = _mm512_fmadd_ps(q3, load_kv(k, 48, all, kv16), a);
      s[t] = _mm512_reduce_add_ps(a) * scale + (mask ? mask[t] : 0.f);
      if (s[t] > m) m = s[t];
    }
  } else {
    for (long t = 0; t < T; t++) {
      const char* k = (const char*)K + t * Dh * size;
      __m512 acc = _mm512_setzero_ps();
      for (long j = 0; j < Dh; j += 16) {
        __mmask16 mk = Dh - j >= 16 ? all : (__mmask16)((1u << (Dh - j)) - 1u);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + j), load_kv(k, j, mk, kv16), acc);
      }
      s[t] = _mm512_reduce_add_ps(acc) * scale + (mask ? mask[t] : 0.f);
      if (s[t] > m) m = s[t];
    }
  }
  __m512 vsum = _mm512_setzero_ps(), vmax = _mm512_set1_ps(m);
  for (long t = 0; t < T; t += 16) { /* exp(s - m) <= 1, 16 at a time */
    __mmask16 mk = T - t >= 16 ? all : (__mmask16)((1u << (T - t)) - 1u);
    __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), vmax));
    _mm512_mask_storeu_ps(s + t, mk, e);
    vsum = _mm512_mask_add_ps(vsum, mk, vsum, e);
  }
  __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  if (Dh == 64) {
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (long t = 0; t < T; t++) {
      const char* v = (const char*)V + t * 64 * size;
      __m512 w = _mm512_set1_ps(s[t]);
      o0 = _mm512_fmadd_ps(w, load_kv(v, 0, all, kv16), o0);
      o1 = _mm512_fmadd_ps(w, load_kv(v, 16, all, kv16), o1);
      o2 = _mm512_fmadd_ps(w, load_kv(v, 32, all, kv16), o2);
      o3 = _mm512_fmadd_ps(w, load_kv(v, 48, all, kv16), o3);
    }
    _mm512_storeu_ps(out, _mm512_mul_ps(o0, inv));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(o1, inv));
    _mm512_storeu_ps(out + 32, _mm512_mul_ps(o2, inv));
    _mm512_storeu_ps(out + 48, _mm512_mul_ps(o3, inv));
    return;
  }
  for (long j = 0; j < Dh; j += 16) {
    __mmask16 mk = Dh - j >= 16 ? all : (__mmask16)((1u << (Dh - j)) - 1u);
    __m512 acc = _mm512_setzero_ps();
    for (long t = 0; t < T; t++)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(s[t]),
                            load_kv((const char*)V + t * Dh * size, j, mk, kv16), acc);
    _mm512_mask_storeu_ps(out + j, mk, _mm512_mul_ps(acc, inv));
  }
}
#else
static inline float kv_at(const void* row, long i, int kv16) {
  if (!kv16) return ((const float*)row)[i];
  unsigned int u = (unsigned int)((const unsigned short*)row)[i] << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* 8 cache values from element i of a float32 or bfloat16 (kv16) row, as floats (exact). */
static inline __m256 load_kv8(const void* row, long i, int kv16) {
  if (kv16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const unsigned short*)row + i))),
        16));
  return _mm256_loadu_ps((const float*)row + i);
}

/* exp(y) for y <= 0, 8 at a time: as the AVX-512 exp_neg, with 2^n built in the exponent bits
 * (y clamped at -87, where 2^n stays a normal float). */
static inline __m256 exp_neg8(__m256 y) {
  y = _mm256_max_ps(y, _mm256_set1_ps(-87.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), y);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 e = _mm256_set1_ps(1.f / 720.f);
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 120.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 24.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 6.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  __m256i p2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(p2));
}

/* Without AVX-512: heads of 64 keep the query and the output in eight registers each (one pass
 * over each cache row, as the AVX-512 code); other widths in plain loops. */
static void attend_one(const float* q, const void* K, const void* V, int kv16, long T, long Dh,
                       const float* mask, float scale, float* s, float* out) {
  long size = kv16 ? 2 : 4;
  float m = -INFINITY;
  if (Dh == 64) {
    __m256 qv[8];
    for (int i = 0; i < 8; i++) qv[i] = _mm256_loadu_ps(q + 8 * i);
    for (long t = 0; t < T; t++) {
      const char* k = (const char*)K + t * 64 * size;
      __m256 a0 = _mm256_mul_ps(qv[0], load_kv8(k, 0, kv16));
      __m256 a1 = _mm256_mul_ps(qv[1], load_kv8(k, 8, kv16));
      for (int i = 2; i < 8; i += 2) {
        a0 = _mm256_fmadd_ps(qv[i], load_kv8(k, 8 * i, kv16), a0);
        a1 = _mm256_fmadd_ps(qv[i + 1], load_kv8(k, 8 * i + 8, kv16), a1);
      }
      s[t] = hsum8(_mm256_add_ps(a0, a1)) * scale + (mask ? mask[t] : 0.f);
      if (s[t] > m) m = s[t];
    }
  } else {
    for (long t = 0; t < T; t++) {
      const char* k = (const char*)K + t * Dh * size;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (long j = 0; j < Dh; j++) acc += q[j] * kv_at(k, j, kv16);
      s[t] = acc * scale + (mask ? mask[t] : 0.f);
      if (s[t] > m) m = s[t];
    }
  }
  float sum = 0.f;
  long t = 0;
  for (; t + 8 <= T; t += 8) { /* exp(s - m) <= 1, 8 at a time */
    __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(m)));
    _mm256_storeu_ps(s + t, e);
    sum += hsum8(e);
  }
  for (; t < T; t++) {
    s[t] = expf(s[t] - m);
    sum += s[t];
  }
  if (Dh == 64) {
    __m256 o[8];
    for (int i = 0; i < 8; i++) o[i] = _mm256_setzero_ps();
    for (t = 0; t < T; t++) {
      const char* v = (const char*)V + t * 64 * size;
      __m256 w = _mm256_set1_ps(s[t]);
      for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(w, load_kv8(v, 8 * i, kv16), o[i]);
    }
    __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(o[i], inv));
    return;
  }
  for (long j = 0; j < Dh; j++) out[j] = 0.f;
  for (t = 0; t < T; t++) {
    const char* v = (const char*)V + t * Dh * size;
    for (long j = 0; j < Dh; j++) out[j] += s[t] * kv_at(v, j, kv16);
  }
  for (long j = 0; j < Dh; j++) out[j] /= sum;
}
#endif

/* Every (row, head) pair's attention for one query: q, out [R, H*Dh]; key t of (r, h) at element
 * r*sb + h*sh + t*Dh of K (likewise V); row r reads keys 0..last[r] (last NULL: all T); mask
 * [R][T] additive or NULL; s: R*H*T floats of scratch. */
static void attention(const float* q, const void* K, const void* V, int kv16, long T,
                      const long* last, long sb, long sh, const float* mask, long R, long H,
                      long Dh, float* s, float* out, int threads) {
  float scale = 1.f / sqrtf((float)Dh);
  long size = kv16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long rh = 0; rh < R * H; rh++) {
    long r = rh / H, h = rh % H, at = (r * sb + h * sh) * size;
    attend_one(q + rh * Dh, (const char*)K + at, (const char*)V + at, kv16,
               last ? last[r] + 1 : T, Dh, mask ? mask + r * T : NULL, scale, s + rh * T,
               out + rh * Dh);
  }
}

/* Single-query attention for decoding, as scaled_dot_product_attention (default scale) over a
 * float32 or bfloat16 (kv16) cache: the flash kernel PyTorch uses on CPU spends ~1.6x the time of
 * reading a float32 cache at one query a row, and its bfloat16 one is slower still. */
void dallemini_attend1(const float* q, const void* K, const void* V, int kv16, long R, long H,
                       long Dh, long T, long sb, long sh, const float* mask, float* s, float* out,
                       int threads) {
  attention(q, K, V, kv16, T, NULL, sb, sh, mask, R, H, Dh, s, out, threads);
}

#ifdef __AVX512F__
/* erf(x), 16 at a time: Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) on |x|, sign restored. */
static inline __m512 erf16(__m512 x) {
  __m512 ax = _mm512_abs_ps(x);
  __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                           _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  __m512 e = exp_neg(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax));
  __m512 y = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));
  /* copy x's sign bit onto y (>= 0) */
  __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

/* g = gelu(a) * g over n floats; exact (erf) gelu as F.gelu's default, to ~1e-7 of its value. */
static void glu(const float* a, float* g, long n, int threads) {
  long chunks = (n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < chunks; c++) {
    long i = c * 16;
    __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    __m512 x = _mm512_maskz_loadu_ps(m, a + i);
    __m512 e = erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                             _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(h, _mm512_maskz_loadu_ps(m, g + i)));
  }
}
#else
/* erf(x), 8 at a time: the AVX-512 erf16's formula. */
static inline __m256 erf8(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  __m256 ax = _mm256_andnot_ps(sign_bit, x);
  __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f),
                           _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  __m256 e = exp_neg8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), ax), ax));
  __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.f));
  return _mm256_or_ps(y, _mm256_and_ps(x, sign_bit));
}

/* g = gelu(a) * g over n floats, as the AVX-512 glu, 8 at a time. */
static void glu(const float* a, float* g, long n, int threads) {
  long chunks = (n + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long c = 0; c < chunks; c++) {
    long i = c * 8;
    /* the last n % 8 masked: every value takes the same formula, whatever rows run beside it */
    __m256i m = tail_mask(n - i < 8 ? n - i : 8);
    __m256 x = _mm256_maskload_ps(a + i, m);
    __m256 e = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    __m256 h = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x),
                             _mm256_add_ps(_mm256_set1_ps(1.f), e));
    _mm256_maskstore_ps(g + i, m, _mm256_mul_ps(h, _mm256_maskload_ps(g + i, m)));
  }
}
#endif

/* Size in floats of the scratch `work` that dallemini_decoder_layer needs for R rows. */
long dallemini_layer_work(const dallemini_layer* p, long R) {
  long d = p->d, f = p->ffn, kp = p->kp_d > p->kp_f ? p->kp_d : p->kp_f;
  long t = p->max_len > p->text_len ? p->max_len : p->text_len;
  return R * (6 * d + 2 * f) + (f > d ? f : d) + R * kp + R * p->heads * t + 64;
}

/* x[r] += LN_which(y[r]) for each of R rows of d (h: R rows of scratch). */
static void add_normed(const dallemini_layer* p, int which, const float* y, float* h, float* x,
                       int R) {
  long d = p->d;
  for (int r = 0; r < R; r++) {
    layer_norm(y + r * d, h + r * d, d, p->ln_w[which], p->ln_b[which], p->eps);
    for (long i = 0; i < d; i++) x[r * d + i] += h[r * d + i];
  }
}

/* x [R, d] float32 (R rows, one new token each, row r's at position pos[r]) through the layer, in
 * place; work: dallemini_layer_work(p, R) floats. self_k/self_v: this layer's cache
 * [rows >= R][H][max_len][Dh] (row r's keys/values at pos[r] are written here, and it reads
 * 0..pos[r]); cross_k/cross_v [rows][H][text_len][Dh], float32 or bfloat16 (kv16); cross_mask
 * [rows][text_len] additive. Returns 0, -1 where the bfloat16 path is asked for but not built, or
 * -2 where a position lies outside the cache (nothing is written then). */
int dallemini_decoder_layer(const dallemini_layer* p, float* x, int R, const long* pos,
                            void* self_k, void* self_v, const void* cross_k, const void* cross_v,
                            const float* cross_mask, float* work, int threads) {
#ifndef __AVX512BF16__
  if (p->bf16 == 1) return -1;
#endif
  for (int r = 0; r < R; r++)
    if (pos[r] < 0 || pos[r] >= p->max_len) return -2;
  long d = p->d, f = p->ffn, H = p->heads, Dh = p->head_dim, L = p->max_len;
  float *h = work, *q = h + R * d, *k = q + R * d, *v = k + R * d, *o = v + R * d, *y = o + R * d;
  float *a = y + R * d, *g = a + R * f, *spare = g + R * f;
  float* s = spare + (f > d ? f : d);
  void* xb = s + R * H * (L > p->text_len ? L : p->text_len);
  const long Kd = p->bf16 ? p->kp_d : d, Kf = p->bf16 ? p->kp_f : f;

  /* x + LN(self_attn(LN x)) */
  for (int r = 0; r < R; r++) layer_norm(x + r * d, h + r * d, d, p->ln_w[0], p->ln_b[0], p->eps);
  product(p, 0, h, q, R, d, d, Kd, xb, spare, threads);
  product(p, 1, h, k, R, d, d, Kd, xb, spare, threads);
  product(p, 2, h, v, R, d, d, Kd, xb, spare, threads);
  for (int r = 0; r < R; r++)
    for (long hh = 0; hh < H; hh++) {
      long at = ((r * H + hh) * L + pos[r]) * Dh;
      const float *kr = k + (r * H + hh) * Dh, *vr = v + (r * H + hh) * Dh;
      if (p->kv16)
        for (long j = 0; j < Dh; j++) { /* round to nearest even, as torch's cast */
          ((unsigned short*)self_k)[at + j] = to_bf16(kr[j]);
          ((unsigned short*)self_v)[at + j] = to_bf16(vr[j]);
        }
      else {
        memcpy((float*)self_k + at, kr, Dh * sizeof(float));
        memcpy((float*)self_v + at, vr, Dh * sizeof(float));
      }
    }
  attention(q, self_k, self_v, p->kv16, L, pos, H * L * Dh, L * Dh, NULL, R, H, Dh, s, o, threads);
  product(p, 3, o, y, R, d, d, Kd, xb, spare, threads);
  add_normed(p, 1, y, h, x, R);
  /* x + LN(cross_attn(LN x)) */
  for (int r = 0; r < R; r++) layer_norm(x + r * d, h + r * d, d, p->ln_w[2], p->ln_b[2], p->eps);
  product(p, 4, h, q, R, d, d, Kd, xb, spare, threads);
  long tl = p->text_len;
  attention(q, cross_k, cross_v, p->kv16, tl, NULL, H * tl * Dh, tl * Dh, cross_mask, R, H, Dh, s,
            o, threads);
  product(p, 5, o, y, R, d, d, Kd, xb, spare, threads);
  add_normed(p, 3, y, h, x, R);
  /* x + fc2(LN1(gelu(fc0 z) * fc1 z)), z = LN0 x */
  for (int r = 0; r < R; r++) layer_norm(x + r * d, h + r * d, d, p->ln_w[4], p->ln_b[4], p->eps);
  product(p, 6, h, a, R, f, d, Kd, xb, spare, threads);
  product(p, 7, h, g, R, f, d, Kd, xb, spare, threads);
  glu(a, g, R * f, threads);
  for (int r = 0; r < R; r++) layer_norm(g + r * f, a + r * f, f, p->ln_w[5], p->ln_b[5], p->eps);
  product(p, 8, a, y, R, d, f, Kf, xb, spare, threads);
  for (int r = 0; r < R; r++)
    for (long i = 0; i < d; i++) x[r * d + i] += y[r * d + i];
  return 0;
}

/* int8 weights (weight-only quantization): Y [R, N] = (X [R, K] float32) W^T * scale, W [N, K] int8,
 * scale [N] float32 (one per output row). Each weight value is widened to float32 in the CPU (in
 * cache, see i8_widened), so memory carries one byte per weight (a quarter of float32's); the
 * arithmetic is float32. */
#define I8_ROWS 4
#define I8_XR 4
#ifdef __AVX512F__
static inline __m512 widen16(const signed char* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

/* Outputs n..n+rows-1 of X rows r0..r0+xr-1 (xr <= XR); XR is a constant at every call, so each
 * call compiles to a loop with exactly XR accumulators per weight row (no wasted products). */
static inline void i8_block(const signed char* W, const float* scale, const float* X, float* Y,
                            long N, long K, long n, long rows, long r0, long xr, const int XR) {
  long K16 = K - K % 16;
  const signed char* w[I8_ROWS];
  const float* x[I8_XR];
  for (int i = 0; i < I8_ROWS; i++) w[i] = W + (n + (i < rows ? i : 0)) * K;
  for (int j = 0; j < XR; j++) x[j] = X + (r0 + (j < xr ? j : 0)) * K;
  __m512 acc[I8_ROWS][I8_XR];
  for (int i = 0; i < I8_ROWS; i++)
    for (int j = 0; j < XR; j++) acc[i][j] = _mm512_setzero_ps();
  for (long k = 0; k < K16; k += 16) {
    __m512 xv[I8_XR];
    for (int j = 0; j < XR; j++) xv[j] = _mm512_loadu_ps(x[j] + k);
#pragma GCC unroll 4
    for (int i = 0; i < I8_ROWS; i++) {
      __m512 wv = widen16(w[i] + k);
      for (int j = 0; j < XR; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++) {
    for (int j = 0; j < xr; j++) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (long k = K16; k < K; k++) s += (float)w[i][k] * x[j][k]; /* the last K % 16 */
      Y[(r0 + j) * N + n + i] = s * scale[n + i];
    }
  }
}

/* Rows n..n+rows-1 of W widened to float32 into f (rows of K floats), prefetching `next`. */
static void i8_widen(const signed char* W, float* f, long K, long n, long rows,
                     const signed char* next) {
  for (long i = 0; i < rows; i++) {
    const signed char* w = W + (n + i) * K;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
      if (next && k % 64 == 0) _mm_prefetch((const char*)(next + i * K + k), _MM_HINT_T1);
      _mm512_storeu_ps(f + i * K + k, widen16(w + k));
    }
    for (; k < K; k++) f[i * K + k] = (float)w[k];
  }
}


/* Each block of F32_ROWS weight rows widened to float32 once, into per-thread scratch that stays
 * in cache, and multiplied as float32 (f32_rows): faster than widening in registers per four rows
 * of X (i8_block) at every row count, and a row's result does not depend on the rows beside it.
 * Returns -1 where a thread could not get its scratch (Y is then incomplete). */
static int i8_widened(const signed char* W, const float* scale, const float* X, float* Y, long R,
                      long N, long K, int threads) {
  long blocks = (N + F32_ROWS - 1) / F32_ROWS;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float* f = (float*)malloc(F32_ROWS * K * sizeof(float));
    failed = f == NULL;
#pragma omp for schedule(static)
    for (long b = 0; b < blocks; b++) {
      if (!f) continue;
      long n = b * F32_ROWS, rows = N - n < F32_ROWS ? N - n : F32_ROWS;
      i8_widen(W, f, K, n, rows, b + 1 < blocks ? W + (n + F32_ROWS) * K : NULL);
      f32_rows(f, X, Y, R, N, K, n, rows, NULL);
      for (long r = 0; r < R; r++)
        for (long i = 0; i < rows; i++) Y[r * N + n + i] *= scale[n + i];
    }
    free(f);
  }
  return failed ? -1 : 0;
}

void dallemini_gemv_i8(const signed char* W, const float* scale, const float* X, float* Y, long R,
                       long N, long K, int threads) {
  if (i8_widened(W, scale, X, Y, R, N, K, threads) == 0) return;
  /* no memory for the scratch: widened in registers, per four rows of X */
  long blocks = (N + I8_ROWS - 1) / I8_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; b++) {
    long n = b * I8_ROWS;
    long rows = N - n < I8_ROWS ? N - n : I8_ROWS;
    for (long r0 = 0; r0 < R; r0 += I8_XR) {
      long xr = R - r0 < I8_XR ? R - r0 : I8_XR;
      if (xr == 1)
        i8_block(W, scale, X, Y, N, K, n, rows, r0, xr, 1);
      else if (xr == 2)
        i8_block(W, scale, X, Y, N, K, n, rows, r0, xr, 2);
      else
        i8_block(W, scale, X, Y, N, K, n, rows, r0, xr, 4);
    }
  }
}
#else
void dallemini_gemv_i8(const signed char* W, const float* scale, const float* X, float* Y, long R,
                       long N, long K, int threads) {
  typed_gemm(W, W_I8, scale, X, Y, R, N, K, threads);
}
#endif

/* bfloat16 weights on CPUs without AVX512-BF16: Y [R, N] = X [R, K] W^T, W [N, K] bfloat16
 * row-major, X float32 holding bfloat16 values (the caller rounds it), so every product is exact in
 * float32 and only the summation order differs from bfloat16 pair dot products. Memory carries two
 * bytes per weight; each weight vector is widened to float32 in registers (two instructions) and
 * used for up to six X rows, as the float32 product's. */
/* Returns 0 (an int, so that callers can tell a build that reports failures). */
int dallemini_gemm_bf16w(const unsigned short* W, const float* X, float* Y, long R, long N, long K,
                         int threads) {
#ifdef __AVX512F__
  long blocks = (N + F32_ROWS - 1) / F32_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; b++) {
    long n = b * F32_ROWS, rows = N - n < F32_ROWS ? N - n : F32_ROWS;
    bf16_rows(W + n * K, X, Y, R, N, K, n, rows, b + 1 < blocks ? W + (n + F32_ROWS) * K : NULL);
  }
#else
  typed_gemm(W, W_BF16, NULL, X, Y, R, N, K, threads);
#endif
  return 0;
}
