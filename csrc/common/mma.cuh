// Tensor-core building blocks for sm_80+: ldmatrix loads of 16-bit shared-memory tiles and the
// m16n8k16 mma.sync with fp32 accumulation, for bf16 and fp16 operands; fp32 operands through
// split TF32 products (FragA / FragB / mma below).
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

// ---- Operand-typed fragments: one interface for bf16 / fp16 (one mma) and fp32 (3xTF32) ----
//
// FragA<T> / FragB<T> hold what one lane owns of a 16 x 16 A tile / a 16 x 8 B tile, with the
// same element ownership for every T (the layouts above). For 16-bit T that is packed pairs; for
// float it is the fp32 values themselves, and mma() below computes the k16 product as two
// m16n8k8 TF32 mmas whose k index is permuted consistently for A and B (lane q's physical k
// 2q, 2q+1 are the TF32 mma's logical k q, q + 4), so fragments from accumulators (pack_a) and
// from shared memory mix freely. Each fp32 operand is split as big = tf32(x), small =
// tf32(x - big) and the product taken as small*big + big*small + big*big ("3xTF32"): about
// 2^-21 relative error per product, i.e. fp32-accurate products from the TF32 tensor cores
// (without the split, TF32 alone keeps 10 mantissa bits).
template <typename T>
struct FragA {
  uint32_t r[4];
};
template <>
struct FragA<float> {
  float r[8];  // (g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1), then the same at k + 8
};
template <typename T>
struct FragB {
  uint32_t r[2];
};
template <>
struct FragB<float> {
  float r[4];  // (k 2q, n g), (2q+1, g), (2q+8, g), (2q+9, g)
};

template <typename T>
__device__ __forceinline__ void store2(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = MmaOps<T>::pack(lo, hi);
}
__device__ __forceinline__ void store2(float* dst, float lo, float hi) {
  *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
}
template <typename T>
__device__ __forceinline__ float2 load2(const T* src) {
  return MmaOps<T>::unpack(*reinterpret_cast<const uint32_t*>(src));
}
__device__ __forceinline__ float2 load2(const float* src) {
  return *reinterpret_cast<const float2*>(src);
}
// Four consecutive values (16-bit T: 8-byte store; float: 16-byte store).
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  uint2 packed;
  packed.x = MmaOps<T>::pack(v.x, v.y);
  packed.y = MmaOps<T>::pack(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = packed;
}
__device__ __forceinline__ void store4(float* dst, float4 v) {
  *reinterpret_cast<float4*>(dst) = v;
}

// The A fragment (k16) made of the fp32 accumulators of two neighbouring n-tiles lo and hi.
template <typename T>
__device__ __forceinline__ void pack_a(FragA<T>& a, const float (&lo)[4], const float (&hi)[4]) {
  a.r[0] = MmaOps<T>::pack(lo[0], lo[1]);
  a.r[1] = MmaOps<T>::pack(lo[2], lo[3]);
  a.r[2] = MmaOps<T>::pack(hi[0], hi[1]);
  a.r[3] = MmaOps<T>::pack(hi[2], hi[3]);
}
__device__ __forceinline__ void pack_a(FragA<float>& a, const float (&lo)[4],
                                       const float (&hi)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    a.r[e] = lo[e];
    a.r[4 + e] = hi[e];
  }
}

// Writes an A fragment back as the 16 x 16 tile it came from (rows row_lo, row_lo + 8 of a
// shared [rows][ld] tile, columns col0 .. col0 + 15).
template <typename T>
__device__ __forceinline__ void store_a(T* dst, int ld, int row_lo, int col0, const FragA<T>& a,
                                        int lane) {
  const int col = col0 + 2 * (lane % 4);
  *reinterpret_cast<uint32_t*>(dst + row_lo * ld + col) = a.r[0];
  *reinterpret_cast<uint32_t*>(dst + (row_lo + 8) * ld + col) = a.r[1];
  *reinterpret_cast<uint32_t*>(dst + row_lo * ld + col + 8) = a.r[2];
  *reinterpret_cast<uint32_t*>(dst + (row_lo + 8) * ld + col + 8) = a.r[3];
}
__device__ __forceinline__ void store_a(float* dst, int ld, int row_lo, int col0,
                                        const FragA<float>& a, int lane) {
  const int col = col0 + 2 * (lane % 4);
  store2(dst + row_lo * ld + col, a.r[0], a.r[1]);
  store2(dst + (row_lo + 8) * ld + col, a.r[2], a.r[3]);
  store2(dst + row_lo * ld + col + 8, a.r[4], a.r[5]);
  store2(dst + (row_lo + 8) * ld + col + 8, a.r[6], a.r[7]);
}

// Shared-memory fragment loads. 16-bit T: ldmatrix; float: per-lane loads of the same
// elements (8-byte loads where the pair is contiguous).
// A (16 x 16 at (m0, k0)) of a tile stored [m][k].
template <typename T>
__device__ __forceinline__ void load_a(FragA<T>& a, const T* s, int ld, int m0, int k0,
                                       int lane) {
  ldmatrix_x4(a.r, a_addr(s, ld, m0, k0, lane));
}
__device__ __forceinline__ void load_a(FragA<float>& a, const float* s, int ld, int m0, int k0,
                                       int lane) {
  const float* p = s + (m0 + lane / 4) * ld + k0 + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // i: (row + 8 (i & 1), k + 8 (i >> 1))
    const float2 v = load2(p + (i & 1) * 8 * ld + (i >> 1) * 8);
    a.r[2 * i] = v.x;
    a.r[2 * i + 1] = v.y;
  }
}
// A (16 x 16 at (m0, k0)) of a tile stored [k][m].
template <typename T>
__device__ __forceinline__ void load_a_kmajor(FragA<T>& a, const T* s, int ld, int m0, int k0,
                                              int lane) {
  ldmatrix_x4_trans(a.r, a_addr_kmajor(s, ld, m0, k0, lane));
}
__device__ __forceinline__ void load_a_kmajor(FragA<float>& a, const float* s, int ld, int m0,
                                              int k0, int lane) {
  const float* p = s + (k0 + 2 * (lane % 4)) * ld + m0 + lane / 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float* q = p + (i >> 1) * 8 * ld + (i & 1) * 8;
    a.r[2 * i] = q[0];
    a.r[2 * i + 1] = q[ld];
  }
}
// An ldmatrix x4 of B holds n-tile n0 in r[0..1] and n0 + 8 in r[2..3].
template <typename T>
__device__ __forceinline__ void unpack_b2(FragB<T> (&b)[2], const uint32_t (&r)[4]) {
  b[0].r[0] = r[0];
  b[0].r[1] = r[1];
  b[1].r[0] = r[2];
  b[1].r[1] = r[3];
}
// Two B fragments (k 16 x n 16 at (k0, n0): n-tiles n0 and n0 + 8) of a tile stored [n][k].
template <typename T>
__device__ __forceinline__ void load_b2(FragB<T> (&b)[2], const T* s, int ld, int k0, int n0,
                                        int lane) {
  uint32_t r[4];
  ldmatrix_x4(r, b_addr(s, ld, k0, n0, lane));
  unpack_b2(b, r);
}
__device__ __forceinline__ void load_b2(FragB<float> (&b)[2], const float* s, int ld, int k0,
                                        int n0, int lane) {
  const float* p = s + (n0 + lane / 4) * ld + k0 + 2 * (lane % 4);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 v = load2(p + t * 8 * ld + i * 8);
      b[t].r[2 * i] = v.x;
      b[t].r[2 * i + 1] = v.y;
    }
}
// The same from a tile stored [k][n].
template <typename T>
__device__ __forceinline__ void load_b2_kmajor(FragB<T> (&b)[2], const T* s, int ld, int k0,
                                               int n0, int lane) {
  uint32_t r[4];
  ldmatrix_x4_trans(r, b_addr_kmajor(s, ld, k0, n0, lane));
  unpack_b2(b, r);
}
__device__ __forceinline__ void load_b2_kmajor(FragB<float> (&b)[2], const float* s, int ld,
                                               int k0, int n0, int lane) {
  const float* p = s + (k0 + 2 * (lane % 4)) * ld + n0 + lane / 4;
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float* q = p + i * 8 * ld + t * 8;
      b[t].r[2 * i] = q[0];
      b[t].r[2 * i + 1] = q[ld];
    }
}

// d (16 x 8 fp32) += A (16 x 16) B (16 x 8).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const FragA<T>& a, const FragB<T>& b) {
  MmaOps<T>::mma(d, a.r, b.r[0], b.r[1]);
}

__device__ __forceinline__ uint32_t tf32_rna(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// x = big + small, both TF32 (as raw bits).
__device__ __forceinline__ void tf32_split(float x, uint32_t& big, uint32_t& small) {
  big = tf32_rna(x);
  small = tf32_rna(x - __uint_as_float(big));
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&d)[4], const FragA<float>& a, const FragB<float>& b) {
  uint32_t ab[8], as[8], bb[4], bs[4];
#pragma unroll
  for (int i = 0; i < 8; ++i) tf32_split(a.r[i], ab[i], as[i]);
#pragma unroll
  for (int i = 0; i < 4; ++i) tf32_split(b.r[i], bb[i], bs[i]);
  // k half h covers physical k 2q + 8h (TF32 logical k q) and 2q + 8h + 1 (logical k q + 4):
  // A registers (row g, k), (row g + 8, k), (row g, k + 1), (row g + 8, k + 1).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int o = 4 * h;
    mma_tf32(d, as[o], as[o + 2], as[o + 1], as[o + 3], bb[2 * h], bb[2 * h + 1]);
    mma_tf32(d, ab[o], ab[o + 2], ab[o + 1], ab[o + 3], bs[2 * h], bs[2 * h + 1]);
    mma_tf32(d, ab[o], ab[o + 2], ab[o + 1], ab[o + 3], bb[2 * h], bb[2 * h + 1]);
  }
}

}  // namespace titans
