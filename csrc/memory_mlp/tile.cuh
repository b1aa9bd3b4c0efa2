// Device helpers shared by the memory-MLP tile kernels (memory_mlp.cu: forward / grad /
// backward modes; memory_mlp_grad_bwd.cu: memory_grad's backward). One CTA of kThreads threads
// per 64-token tile; warp w owns token rows 16w..16w+15 of the mma products.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/cuda_check.h"
#include "../common/launch.cuh"
#include "../common/mma.cuh"
#include "memory_mlp.h"

namespace titans {
namespace mlp {

constexpr int kThreads = 128;
constexpr int kRows = kMlpTileRows;
constexpr int kWarps = kThreads / 32;

// exp for the activations: the fast approximation for 16-bit operands, expf (about 1 ulp)
// for fp32 ones, whose results are held to 1e-5.
template <typename T>
__device__ __forceinline__ float act_exp(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(x);
  } else {
    return __expf(x);
  }
}

template <typename T>
__device__ __forceinline__ float activation_fn(float z, int kind) {
  if (kind == 0) return z / (1.f + act_exp<T>(-z));
  return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
}

template <typename T>
__device__ __forceinline__ float activation_grad(float z, int kind) {
  if (kind == 0) {
    const float s = 1.f / (1.f + act_exp<T>(-z));
    return s * (1.f + z * (1.f - s));
  }
  return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
         z * act_exp<T>(-0.5f * z * z) * 0.39894228040143268f;
}

// phi''(z): silu s (1 - s) (2 + z (1 - 2 s)); gelu pdf(z) (2 - z^2).
template <typename T>
__device__ __forceinline__ float activation_grad2(float z, int kind) {
  if (kind == 0) {
    const float s = 1.f / (1.f + act_exp<T>(-z));
    return s * (1.f - s) * (2.f + z * (1.f - 2.f * s));
  }
  return act_exp<T>(-0.5f * z * z) * 0.39894228040143268f * (2.f - z * z);
}

// In place z -> phi(z) with d1 = phi'(z) (and d2 = phi''(z) when kSecond; d2 untouched else).
template <typename T, int N, bool kSecond>
__device__ __forceinline__ void activate(float (&z)[N][4], float (&d1)[N][4], float (&d2)[N][4],
                                         int kind) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      d1[nt][e] = activation_grad<T>(z[nt][e], kind);
      if constexpr (kSecond) d2[nt][e] = activation_grad2<T>(z[nt][e], kind);
      z[nt][e] = activation_fn<T>(z[nt][e], kind);
    }
}

// fp32 rows [0, R) x cols [0, Cc) of `src` (leading dim ld) -> shared [R][LD] of T. Loads are
// issued in groups of up to 8 float4 per thread before any is converted, so that one L2
// round trip, not one per float4, is exposed per group.
template <typename T, int R, int Cc, int LD>
__device__ __forceinline__ void stage_weights(T* dst, const float* __restrict__ src, int64_t ld) {
  static_assert(Cc % 4 == 0, "weight blocks are read as float4");
  constexpr int kTotal = R * Cc / 4;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  constexpr int kGroup = kIters < 8 ? kIters : 8;
#pragma unroll
  for (int g0 = 0; g0 < kIters; g0 += kGroup) {
    float4 w[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + threadIdx.x;
      if (kTotal % kThreads == 0 || i < kTotal) {
        w[u] = __ldg(reinterpret_cast<const float4*>(src + (i / (Cc / 4)) * ld +
                                                     (i % (Cc / 4)) * 4));
      }
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + threadIdx.x;
      if (kTotal % kThreads == 0 || i < kTotal) {
        store4(dst + (i / (Cc / 4)) * LD + (i % (Cc / 4)) * 4, w[u]);
      }
    }
  }
}

// Hidden block j of a layer pair into shared memory: depth 2, W1[:, block] -> [D][HB] (ld
// kLdH) and W2[block, :] -> [HB][D] (ld kLdD) from fp32 w1 [D][hidden] and w2 [hidden][D];
// depth 1, the whole D x D w1 (ld kLdD). Used for the weights and for dL/dU alike.
template <typename T, int D, int HB, int kDepth, int kLdD, int kLdH>
__device__ __forceinline__ void stage_block(T* s_w1, T* s_w2, const float* w1, const float* w2,
                                            int j, int hidden) {
  if constexpr (kDepth == 2) {
    stage_weights<T, D, HB, kLdH>(s_w1, w1 + j * HB, hidden);
    stage_weights<T, HB, D, kLdD>(s_w2, w2 + int64_t(j) * HB * D, D);
  } else {
    stage_weights<T, D, D, kLdD>(s_w1, w1, D);
  }
}

// out[m][n] = sum_k A[k][m] B[k][n] over ksteps * 16 rows k; A [k][M] and B [k][N] in shared
// memory (k-major), out fp32 global with leading dim ldo. 16 x 16 output tiles round-robin
// over the warps.
// With sa2 != nullptr, adds A2^T B2 (same shapes) into the same outputs.
template <typename T, int M, int N>
__device__ __forceinline__ void gemm_tn_store(const T* sa, int lda, const T* sb, int ldb,
                                              int ksteps, float* __restrict__ out, int64_t ldo,
                                              int warp, int lane, const T* sa2 = nullptr,
                                              int lda2 = 0, const T* sb2 = nullptr,
                                              int ldb2 = 0) {
  constexpr int kTilesN = N / 16;
  for (int item = warp; item < (M / 16) * kTilesN; item += kWarps) {
    const int m0 = (item / kTilesN) * 16, n0 = (item % kTilesN) * 16;
    float acc[2][4] = {};
    for (int ks = 0; ks < ksteps; ++ks) {
      FragA<T> a;
      FragB<T> b[2];
      load_a_kmajor(a, sa, lda, m0, ks * 16, lane);
      load_b2_kmajor(b, sb, ldb, ks * 16, n0, lane);
      mma(acc[0], a, b[0]);
      mma(acc[1], a, b[1]);
      if (sa2 != nullptr) {
        load_a_kmajor(a, sa2, lda2, m0, ks * 16, lane);
        load_b2_kmajor(b, sb2, ldb2, ks * 16, n0, lane);
        mma(acc[0], a, b[0]);
        mma(acc[1], a, b[1]);
      }
    }
    const int row = m0 + lane / 4;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int col = n0 + t * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(out + row * ldo + col) = make_float2(acc[t][0], acc[t][1]);
      *reinterpret_cast<float2*>(out + (row + 8) * ldo + col) =
          make_float2(acc[t][2], acc[t][3]);
    }
  }
}

// acc[n-tiles of N] += A (16 x K, A fragments from shared [m][k]) * B (K x N, shared [k][n]).
template <typename T, int K, int N>
__device__ __forceinline__ void mma_smem_a_kmajor_b(float (&acc)[N / 8][4], const T* sa, int lda,
                                                    int m0, const T* sb, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    FragA<T> a;
    load_a(a, sa, lda, m0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      FragB<T> b[2];
      load_b2_kmajor(b, sb, ldb, kk * 16, np * 16, lane);
      mma(acc[2 * np], a, b[0]);
      mma(acc[2 * np + 1], a, b[1]);
    }
  }
}

// acc[n-tiles of N] += A (register fragments, K / 16 of them) * B; B from shared stored [k][n]
// (kKMajor) or [n][k].
template <typename T, int K, int N, bool kKMajor>
__device__ __forceinline__ void mma_reg_a(float (&acc)[N / 8][4], const FragA<T> (&a)[K / 16],
                                          const T* sb, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      FragB<T> b[2];
      if constexpr (kKMajor) {
        load_b2_kmajor(b, sb, ldb, kk * 16, np * 16, lane);
      } else {
        load_b2(b, sb, ldb, kk * 16, np * 16, lane);
      }
      mma(acc[2 * np], a[kk], b[0]);
      mma(acc[2 * np + 1], a[kk], b[1]);
    }
  }
}

// Writes accumulators (rows r, r + 8 of this lane) as T pairs into shared [64][ld].
template <typename T, int N>
__device__ __forceinline__ void store_acc_smem(T* dst, int ld, int row,
                                               const float (&acc)[N / 8][4], int lane) {
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    const int col = nt * 8 + 2 * (lane % 4);
    store2(dst + row * ld + col, acc[nt][0], acc[nt][1]);
    store2(dst + (row + 8) * ld + col, acc[nt][2], acc[nt][3]);
  }
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// x tile [64][D] of T (rows >= valid zero) -> shared with leading dim ld; 16-byte accesses.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* __restrict__ src,
                                          int64_t row_stride, int valid) {
  constexpr int kVec = 16 / sizeof(T);
  for (int i = threadIdx.x; i < kRows * D / kVec; i += kThreads) {
    const int r = i / (D / kVec), c = (i % (D / kVec)) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

// Column sums over the tile's rows of two per-lane accumulator sets a, b ([D / 8][4], the
// mma C layout), written to s_red [warp][2][D] by the lanes of row group 0; a __syncthreads
// and column_partials_store finish the fixed-order sum over warps.
template <int D>
__device__ __forceinline__ void column_partials(float* s_red, const float (&a)[D / 8][4],
                                                const float (&b)[D / 8][4], int warp, int lane) {
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float sa = a[nt][e] + a[nt][e + 2];
      float sb = b[nt][e] + b[nt][e + 2];
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        sa += __shfl_xor_sync(0xffffffffu, sa, off);
        sb += __shfl_xor_sync(0xffffffffu, sb, off);
      }
      if (lane < 4) {
        const int col = nt * 8 + 2 * lane + e;
        s_red[(warp * 2 + 0) * D + col] = sa;
        s_red[(warp * 2 + 1) * D + col] = sb;
      }
    }
  }
}

template <int D>
__device__ __forceinline__ void column_partials_store(float* __restrict__ out,
                                                      const float* s_red) {
  for (int i = threadIdx.x; i < 2 * D; i += kThreads) {
    const int which = i / D, col = i % D;
    float acc = 0.f;
    for (int w = 0; w < kWarps; ++w) acc += s_red[(w * 2 + which) * D + col];
    out[i] = acc;
  }
}

// f += phi(x W1[:, block]) W2[block, :] for this warp's 16 rows: z in registers, phi applied
// there and re-packed as the A operand of the second product.
template <typename T, int D, int HB>
__device__ __forceinline__ void mlp_block_forward(float (&f)[D / 8][4], const T* s_x, int ldx,
                                                  const T* s_w1, int ldw1, const T* s_w2,
                                                  int ldw2, int m0, int lane, int kind) {
  float z[HB / 8][4] = {};
  mma_smem_a_kmajor_b<T, D, HB>(z, s_x, ldx, m0, s_w1, ldw1, lane);
  FragA<T> ha[HB / 16];
#pragma unroll
  for (int kk = 0; kk < HB / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      z[2 * kk][e] = activation_fn<T>(z[2 * kk][e], kind);
      z[2 * kk + 1][e] = activation_fn<T>(z[2 * kk + 1][e], kind);
    }
    pack_a(ha[kk], z[2 * kk], z[2 * kk + 1]);
  }
  mma_reg_a<T, HB, D, true>(f, ha, s_w2, ldw2, lane);
}

// Stores a lane's accumulators (rows row_lo and row_lo + 8 of the tile, scaled by `scale`) as
// T pairs into a contiguous [B, T, H, D] tensor, rows >= valid skipped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(void* out, const MemoryMlpParams& p, int b, int h,
                                           int t0, int row_lo, int valid,
                                           const float (&acc)[D / 8][4], int lane,
                                           float scale = 1.f) {
  T* base = static_cast<T*>(out);
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_lo + 8 * half;
      if (row < valid) {
        const int64_t off = ((int64_t(b) * p.seqlen + t0 + row) * p.heads + h) * D + col;
        store2(base + off, scale * acc[nt][2 * half], scale * acc[nt][2 * half + 1]);
      }
    }
  }
}

// Launches a tile kernel over (n_chunks * n_sub, H, B) CTAs with `smem` bytes of dynamic
// shared memory.
template <typename Kernel>
cudaError_t launch_tiles(Kernel kernel, size_t smem, const MemoryMlpParams& p,
                         cudaStream_t stream) {
  TITANS_RETURN_IF_ERROR(allow_smem(kernel, smem));
  const dim3 grid(unsigned(p.n_chunks) * unsigned(p.n_sub), unsigned(p.heads),
                  unsigned(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Host side: the compiled (dtype, D, hidden block, depth) instances. Launcher::run<T, D, HB,
// kDepth>(params, stream) launches one; hidden blocks are 64 columns when hidden allows, else
// 32 or 16 (memory_mlp_supported admits hidden % 16 == 0). fp32 operands use at most 32: their
// fragments and shared tiles are twice the size.
// (Launcher::run may return anything: a launch's cudaError_t, or SmemBytes' byte count.)
template <typename Launcher, typename T, int D>
auto dispatch_depth(const MemoryMlpParams& p, cudaStream_t stream) {
  if (p.depth == 1) return Launcher::template run<T, D, D, 1>(p, stream);
  if constexpr (!std::is_same_v<T, float>) {
    if (p.hidden % 64 == 0) return Launcher::template run<T, D, 64, 2>(p, stream);
  }
  if (p.hidden % 32 == 0) return Launcher::template run<T, D, 32, 2>(p, stream);
  return Launcher::template run<T, D, 16, 2>(p, stream);
}

template <typename Launcher>
auto dispatch(const MemoryMlpParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (p.dim) {
      case 16: return dispatch_depth<Launcher, T, 16>(p, stream);
      case 32: return dispatch_depth<Launcher, T, 32>(p, stream);
      case 64: return dispatch_depth<Launcher, T, 64>(p, stream);
      default: return dispatch_depth<Launcher, T, 128>(p, stream);
    }
  };
  switch (p.dtype) {
    case MlpDtype::kBFloat16: return by_dim(__nv_bfloat16{});
    case MlpDtype::kFloat16: return by_dim(__half{});
    default: return by_dim(float{});
  }
}

}  // namespace mlp
}  // namespace titans
