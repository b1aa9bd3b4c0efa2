// Tensor-core building blocks for sm_80+: ldmatrix loads of 16-bit shared-memory tiles and the
// m16n8k16 mma.sync with fp32 accumulation, for bf16 and fp16 operands.
//
// Fragment layouts (lane = 4 g + q, g = lane / 4, q = lane % 4), PTX ISA "mma.m16n8k16":
//   C/D 16 x 8 fp32: c[0], c[1] at (row g, cols 2q, 2q+1); c[2], c[3] at (row g+8, same cols).
//   A 16 x 16: a[0] (row g, k 2q..2q+1), a[1] (row g+8, k 2q..), a[2] (row g, k 2q+8..),
//              a[3] (row g+8, k 2q+8..).
//   B 16 x 8 (k x n): b[0] (k 2q..2q+1, col g), b[1] (k 2q+8.., col g).
// The accumulators of two neighbouring n-tiles are exactly an A fragment of k16 once packed
// (pack_a below): how a product's result feeds the next product without shared memory.
//
// The *_addr helpers give each lane's ldmatrix row address for a tile stored row-major in
// shared memory with leading dimension `ld` (elements); "kmajor" means the tile is stored
// with the mma's k index as its row (so the fragment is loaded transposed).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace titans {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(ptr)));
}

// A fragment (16 x 16 at (m0, k0)) of a tile stored [m][k].
template <typename T>
__device__ __forceinline__ const T* a_addr(const T* base, int ld, int m0, int k0, int lane) {
  return base + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8;
}
// A fragment (16 x 16 at (m0, k0)) of a tile stored [k][m] (A = stored^T): ldmatrix_x4_trans.
template <typename T>
__device__ __forceinline__ const T* a_addr_kmajor(const T* base, int ld, int m0, int k0,
                                                  int lane) {
  return base + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}
// Two B fragments (k 16 x n 16 at (k0, n0): n-tiles n0 and n0 + 8 in r[0..1] and r[2..3]) of a
// tile stored [n][k]: ldmatrix_x4.
template <typename T>
__device__ __forceinline__ const T* b_addr(const T* base, int ld, int k0, int n0, int lane) {
  return base + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// The same from a tile stored [k][n]: ldmatrix_x4_trans.
template <typename T>
__device__ __forceinline__ const T* b_addr_kmajor(const T* base, int ld, int k0, int n0,
                                                  int lane) {
  return base + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The A fragment (k16) made of the fp32 accumulators of two neighbouring n-tiles lo and hi.
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&lo)[4],
                                       const float (&hi)[4]) {
  a[0] = MmaOps<T>::pack(lo[0], lo[1]);
  a[1] = MmaOps<T>::pack(lo[2], lo[3]);
  a[2] = MmaOps<T>::pack(hi[0], hi[1]);
  a[3] = MmaOps<T>::pack(hi[2], hi[3]);
}

}  // namespace titans
