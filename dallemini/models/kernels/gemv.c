/* Matrix-vector products for CPU decoding: y_r = W x_r for one or two rows x_r, float32 or bfloat16.
 *
 * Decoding one image multiplies two rows (prompt and empty caption) by every weight matrix, so
 * the step is bound by how fast W streams from memory. This kernel reads each weight row once,
 * eight rows at a time, and keeps both x rows in registers: ~31 GB/s on a 2-core Zen 4 against
 * ~21 GB/s for oneDNN's small-batch sgemm (benchmarks/bench_generate.py measures it). Float32
 * arithmetic throughout; only the summation order differs from a plain matmul.
 */
#include <immintrin.h>

#define ROWS 8

/* W [N, K] row-major; x0, x1 [K]; y0, y1 [N]. For one row pass x1 = x0 and any y1 of N floats. */
void dallemini_gemv2(const float* W, const float* x0, const float* x1, float* y0, float* y1,
                     long N, long K, int threads) {
  long blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < blocks; b++) {
    long n = b * ROWS;
    long rows = N - n < ROWS ? N - n : ROWS;
    __m512 a0[ROWS], a1[ROWS];
    const float* w[ROWS];
    for (int i = 0; i < ROWS; i++) {
      a0[i] = _mm512_setzero_ps();
      a1[i] = _mm512_setzero_ps();
      w[i] = W + (n + (i < rows ? i : 0)) * K;
    }
    long k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 v0 = _mm512_loadu_ps(x0 + k), v1 = _mm512_loadu_ps(x1 + k);
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; i++) {
        __m512 v = _mm512_loadu_ps(w[i] + k);
        a0[i] = _mm512_fmadd_ps(v, v0, a0[i]);
        a1[i] = _mm512_fmadd_ps(v, v1, a1[i]);
      }
    }
    if (k < K) { /* the last K % 16 columns */
      __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
      __m512 v0 = _mm512_maskz_loadu_ps(m, x0 + k), v1 = _mm512_maskz_loadu_ps(m, x1 + k);
      for (int i = 0; i < ROWS; i++) {
        __m512 v = _mm512_maskz_loadu_ps(m, w[i] + k);
        a0[i] = _mm512_fmadd_ps(v, v0, a0[i]);
        a1[i] = _mm512_fmadd_ps(v, v1, a1[i]);
      }
    }
    for (long i = 0; i < rows; i++) {
      y0[n + i] = _mm512_reduce_add_ps(a0[i]);
      y1[n + i] = _mm512_reduce_add_ps(a1[i]);
    }
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
