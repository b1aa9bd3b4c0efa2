// Device helpers shared by the memory-MLP tile kernels (memory_mlp.cu: forward / grad /
// backward modes; memory_mlp_grad_bwd.cu: memory_grad's backward). One CTA of kThreads threads
// per 64-token tile; warp w owns token rows 16w..16w+15 of the mma products.
#pragma once

#include <cstdint>

#include "../common/cuda_check.h"
#include "../common/mma.cuh"
#include "memory_mlp.h"

namespace titans {
namespace mlp {

constexpr int kThreads = 128;
constexpr int kRows = kMlpTileRows;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float activation_fn(float z, int kind) {
  if (kind == 0) return z / (1.f + __expf(-z));
  return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
}

__device__ __forceinline__ float activation_grad(float z, int kind) {
  if (kind == 0) {
    const float s = 1.f / (1.f + __expf(-z));
    return s * (1.f + z * (1.f - s));
  }
  return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
         z * __expf(-0.5f * z * z) * 0.39894228040143268f;
}

// phi''(z): silu s (1 - s) (2 + z (1 - 2 s)); gelu pdf(z) (2 - z^2).
__device__ __forceinline__ float activation_grad2(float z, int kind) {
  if (kind == 0) {
    const float s = 1.f / (1.f + __expf(-z));
    return s * (1.f - s) * (2.f + z * (1.f - 2.f * s));
  }
  return __expf(-0.5f * z * z) * 0.39894228040143268f * (2.f - z * z);
}

// In place z -> phi(z) with d1 = phi'(z) (and d2 = phi''(z) when kSecond; d2 untouched else).
template <int N, bool kSecond>
__device__ __forceinline__ void activate(float (&z)[N][4], float (&d1)[N][4], float (&d2)[N][4],
                                         int kind) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      d1[nt][e] = activation_grad(z[nt][e], kind);
      if constexpr (kSecond) d2[nt][e] = activation_grad2(z[nt][e], kind);
      z[nt][e] = activation_fn(z[nt][e], kind);
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
        uint2 packed;
        packed.x = MmaOps<T>::pack(w[u].x, w[u].y);
        packed.y = MmaOps<T>::pack(w[u].z, w[u].w);
        *reinterpret_cast<uint2*>(dst + (i / (Cc / 4)) * LD + (i % (Cc / 4)) * 4) = packed;
      }
    }
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
      uint32_t a[4], b[4];
      ldmatrix_x4_trans(a, a_addr_kmajor(sa, lda, m0, ks * 16, lane));
      ldmatrix_x4_trans(b, b_addr_kmajor(sb, ldb, ks * 16, n0, lane));
      MmaOps<T>::mma(acc[0], a, b[0], b[1]);
      MmaOps<T>::mma(acc[1], a, b[2], b[3]);
      if (sa2 != nullptr) {
        ldmatrix_x4_trans(a, a_addr_kmajor(sa2, lda2, m0, ks * 16, lane));
        ldmatrix_x4_trans(b, b_addr_kmajor(sb2, ldb2, ks * 16, n0, lane));
        MmaOps<T>::mma(acc[0], a, b[0], b[1]);
        MmaOps<T>::mma(acc[1], a, b[2], b[3]);
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
    uint32_t a[4];
    ldmatrix_x4(a, a_addr(sa, lda, m0, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr_kmajor(sb, ldb, kk * 16, np * 16, lane));
      MmaOps<T>::mma(acc[2 * np], a, b[0], b[1]);
      MmaOps<T>::mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[n-tiles of N] += A (register fragments, K / 16 of them) * B; B from shared stored [k][n]
// (kKMajor) or [n][k].
template <typename T, int K, int N, bool kKMajor>
__device__ __forceinline__ void mma_reg_a(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                          const T* sb, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      if constexpr (kKMajor) {
        ldmatrix_x4_trans(b, b_addr_kmajor(sb, ldb, kk * 16, np * 16, lane));
      } else {
        ldmatrix_x4(b, b_addr(sb, ldb, kk * 16, np * 16, lane));
      }
      MmaOps<T>::mma(acc[2 * np], a[kk], b[0], b[1]);
      MmaOps<T>::mma(acc[2 * np + 1], a[kk], b[2], b[3]);
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
    *reinterpret_cast<uint32_t*>(dst + row * ld + col) = MmaOps<T>::pack(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<uint32_t*>(dst + (row + 8) * ld + col) =
        MmaOps<T>::pack(acc[nt][2], acc[nt][3]);
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
  for (int i = threadIdx.x; i < kRows * D / 8; i += kThreads) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
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
  uint32_t ha[HB / 16][4];
#pragma unroll
  for (int kk = 0; kk < HB / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      z[2 * kk][e] = activation_fn(z[2 * kk][e], kind);
      z[2 * kk + 1][e] = activation_fn(z[2 * kk + 1][e], kind);
    }
    pack_a<T>(ha[kk], z[2 * kk], z[2 * kk + 1]);
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
        *reinterpret_cast<uint32_t*>(base + off) =
            MmaOps<T>::pack(scale * acc[nt][2 * half], scale * acc[nt][2 * half + 1]);
      }
    }
  }
}

// Launches a tile kernel over (n_chunks * n_sub, H, B) CTAs with `smem` bytes of dynamic
// shared memory.
template <typename Kernel>
cudaError_t launch_tiles(Kernel kernel, size_t smem, const MemoryMlpParams& p,
                         cudaStream_t stream) {
  TITANS_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned(p.n_chunks) * unsigned(p.n_sub), unsigned(p.heads),
                  unsigned(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Host side: the compiled (dtype, D, hidden block, depth) instances. Launcher::run<T, D, HB,
// kDepth>(params, stream) launches one; hidden blocks are 64 columns when hidden allows, else
// 32 or 16 (memory_mlp_supported admits hidden % 16 == 0).
inline int hidden_block(int hidden) {
  return hidden % 64 == 0 ? 64 : hidden % 32 == 0 ? 32 : 16;
}

template <typename Launcher, typename T, int D>
cudaError_t dispatch_depth(const MemoryMlpParams& p, cudaStream_t stream) {
  if (p.depth == 1) return Launcher::template run<T, D, D, 1>(p, stream);
  switch (hidden_block(p.hidden)) {
    case 64: return Launcher::template run<T, D, 64, 2>(p, stream);
    case 32: return Launcher::template run<T, D, 32, 2>(p, stream);
    default: return Launcher::template run<T, D, 16, 2>(p, stream);
  }
}

template <typename Launcher>
cudaError_t dispatch(const MemoryMlpParams& p, cudaStream_t stream) {
  auto by_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (p.dim) {
      case 16: return dispatch_depth<Launcher, T, 16>(p, stream);
      case 32: return dispatch_depth<Launcher, T, 32>(p, stream);
      case 64: return dispatch_depth<Launcher, T, 64>(p, stream);
      default: return dispatch_depth<Launcher, T, 128>(p, stream);
    }
  };
  return p.dtype == MlpDtype::kBFloat16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
}

}  // namespace mlp
}  // namespace titans
