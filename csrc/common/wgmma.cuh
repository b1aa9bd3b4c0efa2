// Hopper's warpgroup MMA (wgmma, sm_90a only) for bf16 operands with fp32 accumulation, and
// the shared-memory layout its descriptors read without swizzling.
//
// Layout ("tiled", the no-swizzle canonical layout, PTX ISA "Shared Memory Matrix Layout"): a
// R x Cc tile of 16-bit values is stored as 8 x 8 core matrices, each 128 contiguous bytes (its
// 8 rows of 16 bytes back to back), the core matrices row-major: element (r, c) at
//   ((r / 8) * (Cc / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8.
// ldmatrix reads it too (each 8 x 8 matrix of an ldmatrix is one core matrix: conflict-free), so
// one buffer serves mma.sync and wgmma. A tile stored [n][k] (k along its columns) is a
// K-major wgmma operand: the two core matrices of a k16 step lie 128 B apart (the leading byte
// offset, LBO) and neighbouring 8-row groups Cc / 8 * 128 B apart (the stride byte offset, SBO).
// A tile stored [k][n] is an MN-major operand (imm-trans 1): neighbouring 8-column groups lie
// 128 B apart (SBO) and the two 8-row k groups of a step Cc / 8 * 128 B apart (LBO).
//
// Register operands and accumulators: warp w of the warpgroup owns rows 16 w .. 16 w + 15 of the
// m64 tile, in mma.sync's m16n8k16 fragment layouts (mma.cuh): A as FragA, and the N / 8 n-tiles
// of the accumulator as float[4] each, concatenated (d[4 t + e]).
#pragma once

#include <cstdint>

#include "mma.cuh"

namespace titans {

// Element offset of (r, c) in a tiled R x Cc tile (Cc a multiple of 8).
__host__ __device__ constexpr int tiled_offset(int r, int c, int cols) {
  return ((r >> 3) * (cols >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}

// Generic-proxy shared-memory writes made visible to the async proxy (wgmma's operand reads):
// each writing thread, before the barrier that precedes the wgmma (a no-op before sm_90).
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TITANS_HAS_WGMMA 1
#endif

#ifdef TITANS_HAS_WGMMA

// A shared-memory matrix descriptor without swizzling: start address, LBO and SBO in bytes
// (each a multiple of 16; the descriptor keeps them >> 4 in 14-bit fields).
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = smem_u32(smem);
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across wgmma's asynchronous window.
__device__ __forceinline__ void wgmma_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
template <int N>
__device__ __forceinline__ void wgmma_pin(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wgmma_pin(d[i]);
}

// d (m64 n16, 8 floats per thread) += A (registers) * B (descriptor), bf16 operands (the
// kernels' split planes are bf16 for every input dtype); kTransB: B MN-major.
template <int kTransB>
__device__ __forceinline__ void wgmma_m64n16_rs(float (&d)[8], const FragA<__nv_bfloat16>& a,
                                                uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, %13;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "l"(b), "n"(kTransB));
}

// d (m64 n16) += A (descriptor) * B (descriptor), bf16; kTransA: A M-major, kTransB: B N-major.
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n16_ss(float (&d)[8], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %10, %11;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "l"(a), "l"(b), "n"(kTransA), "n"(kTransB));
}

#endif  // TITANS_HAS_WGMMA

}  // namespace titans
