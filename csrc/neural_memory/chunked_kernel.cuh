// The kernel of neural_memory_chunked (chunked.h), included by the per-(dtype, D) instance
// files chunked_<dtype>_d<D>.cu and by chunked.cu (shared-memory plan). One CTA per (sequence,
// head) walks its chunks; at depth 2 on sm_90+ a thread-block cluster of `split` CTAs does
// (see "Cluster" below).
//
// Precision. Every operand is held as two bf16 planes, x = hi + lo with hi = bf16(x) and
// lo = bf16(x - hi), and every product as hi*hi + hi*lo + lo*hi with fp32 accumulation
// ("bf16x3": about 17 significant bits per operand, where one bf16 keeps 8). A single bf16
// rounding of the fp32 state, of the keys' activations or of the errors dz is amplified by
// LayerNorm in ill-conditioned draws beyond SPEC §7's bound (measured 0.14 against 2e-2, see
// docs/perf_notes.md); the split keeps the kernel within ~1e-4 of float64. fp16 inputs are
// exact as a split pair (11 significant bits); bf16 inputs have lo = 0.
//
// Eight warps. Row group g = warp % (C / 16) owns chunk rows 16g..16g+15 for the row-local
// products (keys, head, read); at C <= 64 two warps share a group, each taking 16 of every
// hidden block's 32 columns, and add their partial sums once per chunk (reduce_parts). All
// warps share the staging and the state update. Per chunk (C rows, D features, the hidden axis
// in blocks of 32 columns):
//
//   load     q, k rows of the chunk's slots -> shared (inactive slots: zero rows), gates
//            (bf16 at D <= 64: the rows by cp.async, load_rows_async)
//   gates    thread j runs column j of N and G down the chunk:
//              N[j,j] = theta_j,  N[t,j] = eta_t N[t-1,j];  G[t,j] = a_t G[t-1,j] + act_t N[t,j]
//            (a = 1 - alpha, act = slot is a token), and one thread m, beta, c (c_t = a_t
//            c_{t-1} + act_t m_t): the running products of SPEC §2, never a ratio
//   keys     per hidden block (Wg blocks staged): hk = phi(k W1g), fk += hk W2g (registers)
//   head     y = [k +] [LN](fk), dl/dy = 2 (y - v), LN backward -> dz2 (the last layer's error)
//   blocks   per hidden block, with W0 / S0 (and Wg) blocks staged:
//              hk = phi(k W1g), dz1 = (dz2 W2g^T) * phi'(k W1g) recomputed for the block;
//              read "token": z1 = (beta q) W0 + (c q) S0 + A1 dz1 (A1 = -G * q k^T), h1 =
//              phi(z1), z2 += (beta h1) W0 + (c h1) S0, P += h1 hk^T;
//              state: W[:, blk] / W[blk, :] = beta_C W0 + c_C S0 + (x^T diag(-g)) dz and S
//              = m_C S0 + (x^T diag(-n)) dz (g, n: the last rows of G, N), 16 x 16 tiles over
//              all warps, read from and written to the fp32 state in global memory; at every
//              ckpt_every-th chunk the values read (W0, S0) also go to the backward's checkpoint
//   read     z2 += (-G * P) dz2, o = [q +] [LN](z2); read "chunk": o = M_Wg(q) in the keys pass
//
// Cluster. With split > 1 (depth 2, sm_90+), CTA r of the cluster owns the hidden blocks b with
// b % split == r: it runs the keys pass and the per-block work for those only, and alone reads
// and writes their columns of W1, S1 and rows of W2, S2. Loads, gates, A1 and the head are
// repeated in every CTA. Two sums cross the cluster per chunk, each through DSMEM in rank order
// (two cluster barriers): fk (every CTA needs dz2) and z2 (rank 0 stores o); (-G * P) dz2 is
// linear in P, so each CTA adds its own blocks' part before the z2 sum. The launcher picks the
// fewest blocks per CTA whose clusters can all be resident at once (at B = 2, H = 16, D = 64,
// hidden 256 on H100: 3 CTAs per (sequence, head); B = 1: 4; B = 8: 1), or, given an
// exchange (params.h), ordinary CTAs of a cooperative launch that sum through global memory
// (GlobalGroup, csrc/common/cluster.cuh: the same sums in the same order) where those give
// fewer blocks per CTA (B = 2: 4 CTAs; B = 1: 8).
//
// Every block of the state is read (staged) before the warps write it back, and the next block
// is disjoint, so the update runs in place. Depth 1 is the same with one D x D block (dz =
// the head's error). Every sum is a fixed-order mma chain or shuffle tree: deterministic. The
// state is read with ld.global.cg (L2): the same CTA wrote it in the previous chunk.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "chunked.h"
#include "../common/async_copy.cuh"
#include "../common/cluster.cuh"
#include "../common/cuda_check.h"
#include "../common/launch.cuh"
#include "../common/mma.cuh"
#include "../memory_mlp/tile.cuh"

namespace titans {
namespace chunked {

using mlp::quad_sum;
using bf16 = __nv_bfloat16;

constexpr int kHB = 32;  // hidden block (columns of W1, rows of W2)
constexpr int kMaxSplit = 8;  // CTAs per (sequence, head): the portable cluster size

// 8 warps (one 16-row group each at C = 128; at smaller C the warps past C / 16 join the
// staging and the state update only).
template <int C>
struct Threads {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
};

// Shared-memory plan in bytes. Each operand buffer holds its hi plane then its lo plane; rows
// padded by 8 elements (16 bytes) so that the 8 rows of an ldmatrix phase hit distinct banks.
struct Layout {
  size_t q, k, dz2, hk, dz1, w1, s1, w2, s2, g, vec, dg2, dn2, dg1, dn1, total;
  int plane_q, plane_hk, plane_w1, plane_w2;  // plane sizes in elements
  bool pre;  // the state update's row scales on B (dg2, dn2, dg1, dn1 below)
};

// Four more buffers (Layout::pre) hold the state update's B operands with their row scales:
// gneg * dz2, nneg * dz2 ([C][D], made once per chunk by the keys' head) and gneg * dz1,
// nneg * dz1 ([C][32], per hidden block), split from fp32, so that the update's products take
// A as stored instead of joining, scaling and re-splitting it at every k step (scale_cols2).
// Measured (H200, 2026-11-28, docs/perf_notes.md v32/v33) at depth 2, D = 64, C = 64 only:
// the one-CTA instance's B = 8 forward -8%, the split instances +0.5% (so they leave them out).
// want_pre: the one-CTA instance, not sub-chunked, in a binary for an arch where a block may
// take kPreScaledMax bytes (pre_arch); the plan then is 187 KiB instead of 131.
constexpr size_t kPreScaledMax = 227 * 1024;

// The archs (major * 10 + minor) whose binaries take the larger plan: sm_90 up to sm_11x, 227
// KiB per block. Not an sm_80 binary (it also runs on sm_86 / sm_89, 99 KiB per block, and on
// sm_80 itself the plan would exceed 163 KiB), nor sm_12x (99 KiB): there the larger plan would
// send shapes that fit before to the reference. The kernel applies the rule to the arch it is
// compiled for, the launcher to the arch of the binary the device runs (binary_arch).
__host__ __device__ constexpr bool pre_arch(int arch) { return arch >= 90 && arch < 120; }

__host__ __device__ constexpr bool pre_arch_here() {
#ifdef __CUDA_ARCH__
  return pre_arch(__CUDA_ARCH__ / 10);
#else
  return false;  // the host pass: the launcher asks the binary instead
#endif
}

__host__ __device__ constexpr Layout make_layout(int D, int C, int depth, bool want_pre) {
  const int bw = depth == 2 ? kHB : D;  // layer-1 block width
  Layout l{};
  l.plane_q = C * (D + 8);
  l.plane_hk = C * (kHB + 8);
  l.plane_w1 = D * (bw + 8);
  l.plane_w2 = kHB * (D + 8);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += (bytes + 15) / 16 * 16;
    return here;
  };
  const size_t pair = 2 * sizeof(bf16);
  l.q = take(pair * l.plane_q);
  l.k = take(pair * l.plane_q);
  l.dz2 = take(pair * l.plane_q);
  l.hk = take(depth == 2 ? pair * l.plane_hk : 0);
  l.dz1 = take(depth == 2 ? pair * l.plane_hk : 0);
  l.w1 = take(pair * l.plane_w1);
  l.s1 = take(pair * l.plane_w1);
  l.w2 = take(depth == 2 ? pair * l.plane_w2 : 0);
  l.s2 = take(depth == 2 ? pair * l.plane_w2 : 0);
  l.g = take(size_t(C) * (C + 4) * 4);
  l.vec = take(size_t(9) * C * 4);
  const size_t extra = 2 * ((pair * l.plane_q + 15) / 16 * 16) +
                       2 * ((pair * l.plane_hk + 15) / 16 * 16);
  l.pre = want_pre && depth == 2 && D == 64 && C == 64 && at + extra <= kPreScaledMax;
  if (l.pre) {
    l.dg2 = take(pair * l.plane_q);
    l.dn2 = take(pair * l.plane_q);
    l.dg1 = take(pair * l.plane_hk);
    l.dn1 = take(pair * l.plane_hk);
  }
  l.total = at;
  return l;
}

// phi(z), phi'(z), phi''(z), all from one exponential and, for silu, one reciprocal (what a
// call site leaves unused is dead code; the same arguments at one site are computed once).
// silu: s = 1 / (1 + e^-z), phi = z s, phi' = s (1 + z (1 - s)), phi'' = s (1 - s)
// (2 + z (1 - 2 s)); gelu: phi = z Phi, phi' = Phi + z pdf, phi'' = pdf (2 - z^2). The inputs
// are bf16/fp16, so the fast exponential (as memory_mlp's 16-bit kernels) and the fast
// reciprocal (__fdividef, 2 ulp; 0 where 1 + e^-z overflows, z < -87, the limit s -> 0) serve:
// the IEEE division of memory_mlp's helpers took ~18% of the backward's stall samples (Nsight).
struct Act {
  float f, d1, d2;
};
__device__ __forceinline__ Act act3(float z, int kind) {
  Act r;
  if (kind == 0) {
    const float s = __fdividef(1.f, 1.f + __expf(-z));
    r.f = z * s;
    r.d1 = s * (1.f + z * (1.f - s));
    r.d2 = s * (1.f - s) * (2.f + z * (1.f - 2.f * s));
  } else {
    const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
    const float pdf = __expf(-0.5f * z * z) * 0.39894228040143268f;
    r.f = z * cdf;
    r.d1 = cdf + z * pdf;
    r.d2 = pdf * (2.f - z * z);
  }
  return r;
}

// ---- split bf16 operands ----

// (x, y) -> packed bf16 pairs hi = bf16(x, y), lo = bf16(x - hi, y - hi).
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = MmaOps<bf16>::pack(x, y);
  const float2 h = MmaOps<bf16>::unpack(hi);
  lo = MmaOps<bf16>::pack(x - h.x, y - h.y);
}
__device__ __forceinline__ float2 join2(uint32_t hi, uint32_t lo) {
  const float2 h = MmaOps<bf16>::unpack(hi), l = MmaOps<bf16>::unpack(lo);
  return make_float2(h.x + l.x, h.y + l.y);
}

// A shared buffer of two planes (hi at p, lo at p + plane), leading dimension ld.
struct Planes {
  bf16* p;
  int plane, ld;
  __device__ __forceinline__ const bf16* hi() const { return p; }
  __device__ __forceinline__ const bf16* lo() const { return p + plane; }
  __device__ __forceinline__ Planes cols(int c0) const { return Planes{p + c0, plane, ld}; }
  __device__ __forceinline__ Planes rows(int r0) const { return Planes{p + r0 * ld, plane, ld}; }
  // stores the split of (x, y) at (row, col), (row, col + 1)
  __device__ __forceinline__ void put2(int row, int col, float x, float y) const {
    uint32_t h, l;
    split2(x, y, h, l);
    *reinterpret_cast<uint32_t*>(p + row * ld + col) = h;
    *reinterpret_cast<uint32_t*>(p + plane + row * ld + col) = l;
  }
  __device__ __forceinline__ float2 get2(int row, int col) const {
    return join2(*reinterpret_cast<const uint32_t*>(p + row * ld + col),
                 *reinterpret_cast<const uint32_t*>(p + plane + row * ld + col));
  }
};

struct SplitA {
  FragA<bf16> hi, lo;
};

// A fragment (16 x 16 at (m0, k0)) of split planes stored [m][k] (or [k][m] when kKMajor);
// with kHiOnly its lo plane is known to be zero (q, k of bf16 inputs): not loaded, and left
// unset, for the products skip its mmas (mma_split_b's kAHi).
template <bool kKMajor = false, bool kHiOnly = false>
__device__ __forceinline__ void load_a_split(SplitA& a, const Planes& s, int m0, int k0,
                                             int lane) {
  if constexpr (kKMajor) {
    load_a_kmajor(a.hi, s.hi(), s.ld, m0, k0, lane);
    if constexpr (!kHiOnly) load_a_kmajor(a.lo, s.lo(), s.ld, m0, k0, lane);
  } else {
    load_a(a.hi, s.hi(), s.ld, m0, k0, lane);
    if constexpr (!kHiOnly) load_a(a.lo, s.lo(), s.ld, m0, k0, lane);
  }
}
// Both planes, by value.
template <bool kKMajor = false>
__device__ __forceinline__ SplitA load_a_split(const Planes& s, int m0, int k0, int lane) {
  SplitA a;
  load_a_split<kKMajor>(a, s, m0, k0, lane);
  return a;
}
// The split A fragment of fp32 values: accumulators of two neighbouring n-tiles (pack_a's
// element order), each element times row scale (lo_s for row g, hi_s for row g + 8).
__device__ __forceinline__ SplitA split_a(const float (&lo)[4], const float (&hi)[4],
                                          float row_s = 1.f, float row8_s = 1.f) {
  SplitA a;
  split2(lo[0] * row_s, lo[1] * row_s, a.hi.r[0], a.lo.r[0]);
  split2(lo[2] * row8_s, lo[3] * row8_s, a.hi.r[1], a.lo.r[1]);
  split2(hi[0] * row_s, hi[1] * row_s, a.hi.r[2], a.lo.r[2]);
  split2(hi[2] * row8_s, hi[3] * row8_s, a.hi.r[3], a.lo.r[3]);
  return a;
}
// a with row g scaled by row_s, row g + 8 by row8_s, re-split.
__device__ __forceinline__ SplitA scale_rows(const SplitA& a, float row_s, float row8_s) {
  SplitA r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = join2(a.hi.r[i], a.lo.r[i]);
    const float s = (i & 1) ? row8_s : row_s;
    split2(v.x * s, v.y * s, r.hi.r[i], r.lo.r[i]);
  }
  return r;
}
// a (k at k0) with column k scaled by s1[k] (into r1) and by s2[k] (into r2): one join, two
// re-splits.
__device__ __forceinline__ void scale_cols2(const SplitA& a, const float* s1, const float* s2,
                                            int k0, int lane, SplitA& r1, SplitA& r2) {
  const int k = k0 + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = join2(a.hi.r[i], a.lo.r[i]);
    const int kc = k + (i < 2 ? 0 : 8);
    split2(v.x * s1[kc], v.y * s1[kc + 1], r1.hi.r[i], r1.lo.r[i]);
    split2(v.x * s2[kc], v.y * s2[kc + 1], r2.hi.r[i], r2.lo.r[i]);
  }
}

// B (k 16 at k0, n 16 at n0: n-tiles n0 and n0 + 8) of split planes stored [k][n] (kKMajor)
// or [n][k]; with kHiOnly its lo plane is known to be zero and is not loaded.
struct SplitB {
  FragB<bf16> hi[2], lo[2];
};
template <bool kKMajor, bool kHiOnly = false>
__device__ __forceinline__ SplitB load_b_split(const Planes& b, int k0, int n0, int lane) {
  SplitB r;
  if constexpr (kKMajor) {
    load_b2_kmajor(r.hi, b.hi(), b.ld, k0, n0, lane);
    if constexpr (!kHiOnly) load_b2_kmajor(r.lo, b.lo(), b.ld, k0, n0, lane);
  } else {
    load_b2(r.hi, b.hi(), b.ld, k0, n0, lane);
    if constexpr (!kHiOnly) load_b2(r.lo, b.lo(), b.ld, k0, n0, lane);
  }
  return r;
}
// acc (two n-tiles) += A * B: hi*hi + hi*lo + lo*hi, less the terms of a plane known to be
// zero (kAHi / kBHi: that operand is exact in bf16, e.g. bf16 inputs, so its lo plane is 0).
template <bool kAHi = false, bool kBHi = false>
__device__ __forceinline__ void mma_split_b(float (&acc0)[4], float (&acc1)[4], const SplitA& a,
                                            const SplitB& b) {
  mma(acc0, a.hi, b.hi[0]);
  mma(acc1, a.hi, b.hi[1]);
  if constexpr (!kBHi) {
    mma(acc0, a.hi, b.lo[0]);
    mma(acc1, a.hi, b.lo[1]);
  }
  if constexpr (!kAHi) {
    mma(acc0, a.lo, b.hi[0]);
    mma(acc1, a.lo, b.hi[1]);
  }
}
// acc (two n-tiles at n0, n0 + 8) += A * B(k 16 at k0, n 16 at n0); B stored [k][n] (kKMajor)
// or [n][k]. Three mmas per n-tile: hi*hi + hi*lo + lo*hi.
template <bool kKMajor>
__device__ __forceinline__ void mma_split(float (&acc0)[4], float (&acc1)[4], const SplitA& a,
                                          const Planes& b, int k0, int n0, int lane) {
  mma_split_b(acc0, acc1, a, load_b_split<kKMajor>(b, k0, n0, lane));
}

// acc[N / 8][4] += A (16 x K: register fragments) * B (K x N in shared memory).
template <int K, int N, bool kKMajor>
__device__ __forceinline__ void gemm_reg(float (&acc)[N / 8][4], const SplitA (&a)[K / 16],
                                         const Planes& b, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
    for (int np = 0; np < N / 16; ++np)
      mma_split<kKMajor>(acc[2 * np], acc[2 * np + 1], a[kk], b, kk * 16, np * 16, lane);
}

// acc[N / 8][4] += A (16 rows at m0 of a shared [m][k] buffer, K wide) * B. kAHi / kBHi: that
// operand's lo plane is zero (q, k of bf16 inputs): not loaded, its mmas skipped (same sum).
template <int K, int N, bool kKMajor, bool kAHi = false, bool kBHi = false>
__device__ __forceinline__ void gemm_rows(float (&acc)[N / 8][4], const Planes& a, int m0,
                                          const Planes& b, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    SplitA af;
    load_a_split<false, kAHi>(af, a, m0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np)
      mma_split_b<kAHi, kBHi>(acc[2 * np], acc[2 * np + 1], af,
                              load_b_split<kKMajor, kBHi>(b, kk * 16, np * 16, lane));
  }
}

// fp32 rows [0, R) x cols [0, Cc) of `src` (leading dim ld; nullptr reads zeros) -> the split
// planes of dst. Loads go through L2 (.cg): the state may have been written by this CTA.
// Groups of up to 8 float4 per thread are loaded before any is converted.
template <int R, int Cc, int kThreads>
__device__ __forceinline__ void stage(const Planes& dst, const float* src, int64_t ld) {
  static_assert(Cc % 4 == 0, "blocks are read as float4");
  constexpr int kTotal = R * Cc / 4;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  constexpr int kGroup = kIters < 8 ? kIters : 8;
#pragma unroll
  for (int g0 = 0; g0 < kIters; g0 += kGroup) {
    float4 w[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + threadIdx.x;
      w[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (src != nullptr && (kTotal % kThreads == 0 || i < kTotal)) {
        w[u] = __ldcg(reinterpret_cast<const float4*>(src + (i / (Cc / 4)) * ld +
                                                       (i % (Cc / 4)) * 4));
      }
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + threadIdx.x;
      if (kTotal % kThreads == 0 || i < kTotal) {
        const int r = i / (Cc / 4), c = (i % (Cc / 4)) * 4;
        dst.put2(r, c, w[u].x, w[u].y);
        dst.put2(r, c + 2, w[u].z, w[u].w);
      }
    }
  }
}

// dst[e] = src[e] (nullptr: zeros) for e in [0, count) with owned(e), fp32, float4 per thread;
// count % 4 == 0 and owned is constant over each aligned group of 4. kGroup loads are issued
// before their stores (the compiler cannot move a load past a store that may alias it: one
// at a time, every float4 waits a memory latency; Nsight, B = 8: ~5% of the forward).
template <int kThreads, int kGroup, typename Owned>
__device__ __forceinline__ void copy_state(float* dst, const float* src, int64_t count,
                                           Owned owned) {
  const int64_t n4 = count / 4;
  if constexpr (kGroup == 1) {  // the loop as before the batches (D = 128's spills move with
    for (int64_t i = threadIdx.x; i < n4; i += kThreads) {  // any change of it)
      if (!owned(4 * i)) continue;
      const float4 v = src != nullptr ? __ldcg(reinterpret_cast<const float4*>(src) + i)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
      reinterpret_cast<float4*>(dst)[i] = v;
    }
  } else {
    for (int64_t i0 = threadIdx.x; i0 < n4; i0 += kGroup * kThreads) {
      float4 v[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int64_t i = i0 + int64_t(u) * kThreads;
        v[u] = src != nullptr && i < n4 && owned(4 * i)
                   ? __ldcg(reinterpret_cast<const float4*>(src) + i)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const int64_t i = i0 + int64_t(u) * kThreads;
        if (i < n4 && owned(4 * i)) reinterpret_cast<float4*>(dst)[i] = v[u];
      }
    }
  }
}

// Adds the accumulators of the writer warps (part 1) of each row group into those of the readers
// (part 0) through `red` ([row group][16][NT * 8] fp32). Every thread of the CTA calls it (two
// __syncthreads); `red` must be free on entry.
template <int NT>
__device__ __forceinline__ void reduce_parts(float (&acc)[NT][4], float* red, bool writer,
                                             bool reader, int rg, int lane) {
  float* base = red + rg * 16 * (NT * 8);
  const int r = lane / 4;
  if (writer) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(base + r * (NT * 8) + c) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(base + (r + 8) * (NT * 8) + c) =
          make_float2(acc[nt][2], acc[nt][3]);
    }
  }
  __syncthreads();
  if (reader) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * (lane % 4);
      const float2 a = *reinterpret_cast<const float2*>(base + r * (NT * 8) + c);
      const float2 b = *reinterpret_cast<const float2*>(base + (r + 8) * (NT * 8) + c);
      acc[nt][0] += a.x;
      acc[nt][1] += a.y;
      acc[nt][2] += b.x;
      acc[nt][3] += b.y;
    }
  }
  __syncthreads();
}

// Sums the accumulators of the holder warps (one per row group) over the CTAs of the group,
// through `red` (same layout as reduce_parts; a GlobalGroup publishes in its own global
// buffers instead): each CTA publishes its partial, then the receiving CTAs add all partials
// in rank order (so every receiver holds the same bits). Every thread of every CTA of the group
// calls it; `red` must be free on entry in every CTA, and is again on return.
template <typename Group, int NT>
__device__ __forceinline__ void cluster_sum(Group& grp, int split, float (&acc)[NT][4],
                                            float* red, bool holder, bool receive, int rg,
                                            int lane) {
  float* base = grp.publish(red) + rg * 16 * (NT * 8);
  const int r = lane / 4;
  if (holder) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(base + r * (NT * 8) + c) = make_float2(acc[nt][0], acc[nt][1]);
      *reinterpret_cast<float2*>(base + (r + 8) * (NT * 8) + c) =
          make_float2(acc[nt][2], acc[nt][3]);
    }
  }
  grp.sync();  // every partial published
  if (holder && receive) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    for (int src = 0; src < split; ++src) {
      const float* rb = grp.remote(static_cast<const float*>(base), src);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int c = nt * 8 + 2 * (lane % 4);
        const float2 a = grp.load2(rb + r * (NT * 8) + c);
        const float2 b = grp.load2(rb + (r + 8) * (NT * 8) + c);
        acc[nt][0] += a.x;
        acc[nt][1] += a.y;
        acc[nt][2] += b.x;
        acc[nt][3] += b.y;
      }
    }
  }
  grp.done();  // a cluster: every remote read done before any CTA reuses its `red`
}

__device__ __forceinline__ float2 to_float2(const __nv_bfloat162& v) {
  return __bfloat1622float2(v);
}
__device__ __forceinline__ float2 to_float2(const __half2& v) { return __half22float2(v); }

template <int D>
struct Head {
  const float* gamma;  // nullptr: no LayerNorm
  const float* beta;
  float eps;
  bool residual;
  float rstd[2];

  __device__ __forceinline__ void normalize(float (&f)[D / 8][4]) {
    rstd[0] = rstd[1] = 1.f;
    if (gamma == nullptr) return;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) sum += f[nt][2 * half] + f[nt][2 * half + 1];
      const float mean = quad_sum(sum) * (1.f / D);
      float sq = 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        f[nt][2 * half] -= mean;
        f[nt][2 * half + 1] -= mean;
        sq += f[nt][2 * half] * f[nt][2 * half] + f[nt][2 * half + 1] * f[nt][2 * half + 1];
      }
      rstd[half] = rsqrtf(quad_sum(sq) * (1.f / D) + eps);
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        f[nt][2 * half] *= rstd[half];
        f[nt][2 * half + 1] *= rstd[half];
      }
    }
  }

  // y at (row, col), (row, col + 1) from the normalized f of n-tile nt, elements e0, e0 + 1;
  // x = the input tile (split planes in shared memory).
  __device__ __forceinline__ float2 y2(const float (&f)[D / 8][4], int nt, int e0,
                                       const Planes& x, int row, int col) const {
    float2 v = make_float2(f[nt][e0], f[nt][e0 + 1]);
    if (gamma != nullptr) {
      v.x = v.x * __ldg(gamma + col) + (beta != nullptr ? __ldg(beta + col) : 0.f);
      v.y = v.y * __ldg(gamma + col + 1) + (beta != nullptr ? __ldg(beta + col + 1) : 0.f);
    }
    if (residual) {
      const float2 xv = x.get2(row, col);
      v.x += xv.x;
      v.y += xv.y;
    }
    return v;
  }

  // dy -> dl/df in place (LN backward; f holds xhat).
  __device__ __forceinline__ void backward(float (&dy)[D / 8][4], const float (&f)[D / 8][4],
                                           int lane) const {
    if (gamma == nullptr) return;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mg = 0.f, mgx = 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const float g = dy[nt][e] * __ldg(gamma + nt * 8 + 2 * (lane % 4) + (e & 1));
          dy[nt][e] = g;
          mg += g;
          mgx += g * f[nt][e];
        }
      mg = quad_sum(mg) * (1.f / D);
      mgx = quad_sum(mgx) * (1.f / D);
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e)
          dy[nt][e] = rstd[half] * (dy[nt][e] - mg - f[nt][e] * mgx);
    }
  }
};

// Column `col` of the chunk's gate matrices, run down the chunk (SPEC §2's running products,
// never a ratio): N[j,j] = theta_j, N[t,j] = eta_t N[t-1,j]; G[j,j] = act_j theta_j, G[t,j] =
// a_t G[t-1,j] + act_t N[t,j]; zero above the diagonal. G goes to g[t * ld + col] (kG = false:
// not stored; a template flag, so the callers that store it compile as before), N to
// n[t * ld + col] when n is given; returns (G[C-1, col], N[C-1, col]).
template <int C, bool kG = true>
__device__ __forceinline__ float2 gate_column(int col, const float* theta, const float* a,
                                              const float* eta, const float* act, float* g,
                                              float* n, int ld) {
  float nv = 0.f, gv = 0.f;
  // unrolled, the branches as selects: the gate loads of 16 rows issue ahead of the chain
  // (all threads read the same row: broadcasts)
#pragma unroll 16
  for (int t = 0; t < C; ++t) {
    const float n1 = t == col ? theta[t] : nv * eta[t];
    const float g1 = t == col ? act[t] * n1 : a[t] * gv + act[t] * n1;
    nv = t < col ? nv : n1;
    gv = t < col ? gv : g1;
    if constexpr (kG) g[t * ld + col] = gv;
    if (n != nullptr) n[t * ld + col] = nv;
  }
  return make_float2(gv, nv);
}

// The chunk's scalar running products: m_t = prod eta, beta_t = prod a, c_t = a_t c_{t-1} +
// act_t m_t.
template <int C>
__device__ __forceinline__ void gate_scalars(const float* a, const float* eta, const float* act,
                                             float* m_out, float* beta_out, float* c_out) {
  float m = 1.f, beta = 1.f, c = 0.f;
#pragma unroll 16
  for (int t = 0; t < C; ++t) {
    m *= eta[t];
    beta *= a[t];
    c = a[t] * c + act[t] * m;
    m_out[t] = m;
    beta_out[t] = beta;
    c_out[t] = c;
  }
}

// Token addresses of sequence n: element (t, h, 0) of a [.., T, H, D] tensor.
struct Rows {
  int64_t n_part, start, t_stride, h_part;
  __device__ __forceinline__ int64_t at(int64_t t) const {
    return n_part + (start + t) * t_stride + h_part;
  }
};

// Sequence n of a chunked kernel's call, head h: its first slot in the token axis (cu_seqlens[n]
// when packed, else 0), its length, the row of its token 0 in the [B, T, H] gates and the
// contiguous [B, T, H, D] outputs, and its q / k / v rows.
struct SeqRows {
  int64_t start, len, row_base;
  Rows q, k, v;
};
__device__ __forceinline__ SeqRows seq_rows(const NeuralMemoryParams& p, int n, int h) {
  SeqRows s{0, p.seqlen, int64_t(n) * p.seqlen, {}, {}, {}};
  if (p.cu_seqlens != nullptr) {
    s.start = p.cu_seqlens[n];
    s.len = p.cu_seqlens[n + 1] - s.start;
    s.row_base = s.start;
  }
  const bool packed = p.cu_seqlens != nullptr;
  s.q = Rows{packed ? 0 : n * p.q_n_stride, s.start, p.q_t_stride, h * p.q_h_stride};
  s.k = Rows{packed ? 0 : n * p.k_n_stride, s.start, p.k_t_stride, h * p.k_h_stride};
  s.v = Rows{packed ? 0 : n * p.v_n_stride, s.start, p.v_t_stride, h * p.v_h_stride};
  return s;
}

// Asks L2 for the rows of chunk slots t0 .. t0 + C - 1 (those in [0, len)) of up to four
// [.., T, H, D] inputs (nullptr: none) and for the slots' gates, so that the next chunk's
// loads find them there instead of waiting on DRAM. A hint: no effect on any value.
template <typename TIn, int D, int C, int kThreads>
__device__ __forceinline__ void prefetch_chunk(const TIn* p0, const Rows& r0, const TIn* p1,
                                               const Rows& r1, const TIn* p2, const Rows& r2,
                                               const TIn* p3, const Rows& r3,
                                               const NeuralMemoryParams& p, int64_t row_base,
                                               int h, int64_t t0, int64_t len) {
  constexpr int kLines = (D * int(sizeof(TIn)) + 127) / 128;  // 128-byte lines per row
  constexpr int kRows = 4 * C * kLines;
  for (int i = threadIdx.x; i < kRows + 3 * C; i += kThreads) {
    const char* at = nullptr;
    if (i < kRows) {  // (selects of addresses: an array or a selected reference would live in
                      // local memory)
      const int which = i / (C * kLines), r = (i / kLines) % C;
      const int64_t t = t0 + r;
      const TIn* row = which == 0   ? (p0 != nullptr ? p0 + r0.at(t) : nullptr)
                       : which == 1 ? (p1 != nullptr ? p1 + r1.at(t) : nullptr)
                       : which == 2 ? (p2 != nullptr ? p2 + r2.at(t) : nullptr)
                                    : (p3 != nullptr ? p3 + r3.at(t) : nullptr);
      if (row != nullptr && t >= 0 && t < len)
        at = reinterpret_cast<const char*>(row) + 128 * (i % kLines);
    } else {
      const int g = (i - kRows) / C, r = (i - kRows) % C;
      const int64_t t = t0 + r;
      const float* gate = g == 0 ? p.lr : g == 1 ? p.forget : p.momentum;
      if (t >= 0 && t < len)
        at = reinterpret_cast<const char*>(gate + (row_base + t) * p.heads + h);
    }
    if (at != nullptr) asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
  }
}

// Slot r of the chunk starting at sequence slot t0: its gates (an inactive slot, outside
// [0, len): theta 0, a = 1 - alpha = 1, eta 1, act 0).
__device__ __forceinline__ void load_gates(int r, const NeuralMemoryParams& p, int64_t row_base,
                                           int h, int64_t t0, int64_t len, float* theta,
                                           float* a, float* eta, float* act) {
  const int64_t t = t0 + r;
  const bool on = t >= 0 && t < len;
  const int64_t gi = (row_base + t) * p.heads + h;
  theta[r] = on ? __ldg(p.lr + gi) : 0.f;
  a[r] = on ? 1.f - __ldg(p.forget + gi) : 1.f;
  eta[r] = on ? __ldg(p.momentum + gi) : 1.f;
  act[r] = on ? 1.f : 0.f;
}

// The chunk's slots t0 .. t0 + C - 1 of sequence rows [0, len): q and k rows into split planes
// (inactive slots: zero rows) and the gates (inactive slots: theta 0, a = eta = 1, act 0).
// Every thread of the CTA calls it; the caller synchronises before use.
template <typename TIn, int D, int C, int kThreads, int kGroupMax>
__device__ __forceinline__ void load_chunk(const Planes& s_q, const Planes& s_k, const TIn* gq,
                                           const TIn* gk, const Rows& rq, const Rows& rk,
                                           const NeuralMemoryParams& p, int64_t row_base,
                                           int h, int64_t t0, int64_t len, float* theta,
                                           float* a, float* eta, float* act) {
  const int tid = threadIdx.x;
  // Groups of up to kGroupMax pairs per thread are loaded before any is converted (as stage):
  // one load latency per group, not per pair. The backward takes 8 (its profile showed the
  // chunk load waiting on each pair in turn); the forward keeps 1: with 8 its split-1 instance
  // spilled more (C = 64: 28 -> 68 B of stores) and it timed no faster.
  constexpr int kTotal = 2 * C * (D / 2);
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  constexpr int kGroup = kIters < kGroupMax ? kIters : kGroupMax;
  // pair i: q (which 0) or k, slot r, columns c, c + 1
  auto pair = [](int i, int& which, int& r, int& c) {
    which = i / (C * (D / 2));
    r = (i / (D / 2)) % C;
    c = (i % (D / 2)) * 2;
  };
#pragma unroll 1
  for (int g0 = 0; g0 < kIters; g0 += kGroup) {
    float2 x[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + tid;
      x[u] = make_float2(0.f, 0.f);
      if (g0 + u < kIters && i < kTotal) {
        int which, r, c;
        pair(i, which, r, c);
        const int64_t t = t0 + r;
        if (t >= 0 && t < len) x[u] = load2(which == 0 ? gq + rq.at(t) + c : gk + rk.at(t) + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      const int i = (g0 + u) * kThreads + tid;
      if (g0 + u < kIters && i < kTotal) {
        int which, r, c;
        pair(i, which, r, c);
        (which == 0 ? s_q : s_k).put2(r, c, x[u].x, x[u].y);
      }
    }
  }
  if (tid < C) load_gates(tid, p, row_base, h, t0, len, theta, a, eta, act);
}

// load_chunk's rows for bf16 inputs whose rows are 16-byte aligned: straight into the hi planes
// by cp.async, every piece in flight at once (inactive slots: zeros), committed as one group.
// bf16 inputs are exact in bf16, so the lo planes stay the zeros the kernel writes once.
template <int D, int C, int kThreads>
__device__ __forceinline__ void load_rows_async(const Planes& s_q, const Planes& s_k,
                                                const bf16* gq, const bf16* gk, const Rows& rq,
                                                const Rows& rk, int64_t t0, int64_t len) {
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  constexpr int kTotal = 2 * C * kPieces;
  for (int i = threadIdx.x; i < kTotal; i += kThreads) {
    const bool is_q = i < C * kPieces;
    const int r = (i / kPieces) % C, c = (i % kPieces) * 8;
    const int64_t t = t0 + r;
    const bool on = t >= 0 && t < len;
    const bf16* src = is_q ? gq + (on ? rq.at(t) : 0) + c : gk + (on ? rk.at(t) : 0) + c;
    bf16* dst = (is_q ? s_q : s_k).p + r * s_q.ld + c;
    cp_async16(dst, src, on);
  }
  cp_async_commit();
}

// The instances: kMode 0 one CTA per (sequence, head), 1 a cluster of split CTAs (sm_90+), 2
// split ordinary CTAs of a cooperative launch exchanging through global memory (GlobalGroup).
// The split-1 instance compiles the group code out (rank 0, split 1 as constants: the hot loop
// keeps two registers fewer).
// kSub: the instance that walks sub-chunks (params.h, sub > 1: depth 2 with chunk 64, depth 1
// with chunk 64 at D <= 64 or 32 at D = 128); the others are compiled with R = 1.
template <typename TIn, int D, int C, int kDepth, int kMode, bool kSub = false>
__global__ void __launch_bounds__(Threads<C>::kThreads)
    chunked_kernel(const NeuralMemoryParams p) {
  constexpr bool kCluster = kMode != 0;
  constexpr int kThreads = Threads<C>::kThreads, kWarps = Threads<C>::kWarps;
  constexpr int kRowGroups = C / 16;
  constexpr int kBW = kDepth == 2 ? kHB : D;  // width of a staged layer-1 block
  constexpr int kLdG = C + 4;
  constexpr int kNtD = D / 8, kNtC = C / 8;
  // Depth 2 with at least two warps per row group: the two warps of a group split each hidden
  // block's columns (kCW each) and add their partial sums once per chunk (reduce_parts).
  constexpr int kParts = (kDepth == 2 && kWarps / kRowGroups >= 2) ? 2 : 1;
  constexpr int kCW = kDepth == 2 ? kHB / kParts : D;  // columns of a block per warp
  constexpr int kNtW = kCW / 8;
  // bf16 inputs are exact in bf16: the lo planes of s_q and s_k are zero (gemm_rows' kAHi)
  constexpr bool kX = std::is_same<TIn, bf16>::value;
  const int hidden = kDepth == 2 ? p.hidden : D;
  const int n_blocks = kDepth == 2 ? hidden / kHB : 1;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr bool kWantPre = kMode == 0 && !kSub && pre_arch_here();
  const Layout lay = make_layout(D, C, kDepth, kWantPre);
  auto planes = [&](size_t off, int plane, int ld) {
    return Planes{reinterpret_cast<bf16*>(smem_raw + off), plane, ld};
  };
  const Planes s_q = planes(lay.q, lay.plane_q, D + 8);
  const Planes s_k = planes(lay.k, lay.plane_q, D + 8);
  const Planes s_dz2 = planes(lay.dz2, lay.plane_q, D + 8);  // the last layer's error [C][D]
  const Planes s_hk = planes(lay.hk, lay.plane_hk, kHB + 8);   // block of phi(k W1g) [C][32]
  const Planes s_dz1 = planes(lay.dz1, lay.plane_hk, kHB + 8);  // block of dz1 [C][32]
  const Planes s_w1 = planes(lay.w1, lay.plane_w1, kBW + 8);   // W1 block [D][kBW]
  const Planes s_s1 = planes(lay.s1, lay.plane_w1, kBW + 8);   // S1 block
  const Planes s_w2 = planes(lay.w2, lay.plane_w2, D + 8);     // W2 block [32][D]
  const Planes s_s2 = planes(lay.s2, lay.plane_w2, D + 8);     // S2 block
  float* s_g = reinterpret_cast<float*>(smem_raw + lay.g);     // G [C][C]
  constexpr bool kPre = make_layout(D, C, kDepth, kWantPre).pre;
  const Planes s_dg2 = planes(lay.dg2, lay.plane_q, D + 8);    // gneg * dz2 (kPre)
  const Planes s_dn2 = planes(lay.dn2, lay.plane_q, D + 8);    // nneg * dz2
  const Planes s_dg1 = planes(lay.dg1, lay.plane_hk, kHB + 8);  // gneg * dz1 of the block
  const Planes s_dn1 = planes(lay.dn1, lay.plane_hk, kHB + 8);  // nneg * dz1
  float* s_theta = reinterpret_cast<float*>(smem_raw + lay.vec);
  float* s_a = s_theta + C;
  float* s_eta = s_a + C;
  float* s_act = s_eta + C;
  float* s_m = s_act + C;
  float* s_beta = s_m + C;
  float* s_c = s_beta + C;
  float* s_gneg = s_c + C;   // -G[C-1, :]
  float* s_nneg = s_gneg + C;  // -N[C-1, :]

  // the CTAs of one (sequence, head): a cluster of p.split along x (depth 2; at most one CTA
  // per hidden block), CTA `rank` owning the hidden blocks b with b % split == rank
  const int split = kCluster ? p.split : 1;
  const int rank = kCluster ? int(blockIdx.x) % split : 0;
  const int h = kCluster ? int(blockIdx.x) / split : int(blockIdx.x), n = blockIdx.y;
  using Group = std::conditional_t<kMode == 2, GlobalGroup, ClusterGroup>;
  Group grp{};
  if constexpr (kMode == 2) {  // this CTA's exchange buffers and the group's counter
    grp = GlobalGroup::make(p.exchange, p.arrivals, int64_t(n) * p.heads + h, kMaxSplit, rank,
                            split, int64_t(C) * D);
  }
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rg = warp % kRowGroups, part = warp / kRowGroups;
  const int m0 = rg * 16, row_lo = m0 + lane / 4;
  const bool row_warp = part < kParts;  // takes part in the row-local products
  const bool lead = part == 0;          // holds a row group's sums after reduce_parts
  const int c0 = part * kCW;            // this warp's first column of a hidden block
  float* red = reinterpret_cast<float*>(smem_raw + lay.w1);  // staging blocks, when free

  const SeqRows seq = seq_rows(p, n, h);
  const int64_t len = seq.len, row_base = seq.row_base;
  const Rows rq = seq.q, rk = seq.k, rv = seq.v;
  const Rows ro{0, row_base, int64_t(p.heads) * D, int64_t(h) * D};
  const TIn* __restrict__ gq = static_cast<const TIn*>(p.q);
  const TIn* __restrict__ gk = static_cast<const TIn*>(p.k);
  const TIn* __restrict__ gv = static_cast<const TIn*>(p.v);
  TIn* __restrict__ go = static_cast<TIn*>(p.o);

  const int off = p.offset != nullptr ? int(p.offset[n]) : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;
  // sub-chunks (params.h): R chunks of this kernel's per call chunk; `off` and the chunk left
  // open count in the call's chunks
  const int R = kSub && p.sub > 1 ? p.sub : 1;
  const int final_off = int((off + len) % (C * R));

  const int64_t size[2] = {int64_t(D) * hidden, int64_t(hidden) * D};
  const float *w_src[2], *s_src[2], *cw_src[2];
  float *w_dst[2], *s_dst[2], *cw_dst[2];
  const int64_t nh = int64_t(n) * p.heads + h;
#pragma unroll
  for (int l = 0; l < kDepth; ++l) {
    w_src[l] = p.w_in[l] + n * p.w_in_n_stride[l] + h * p.w_in_h_stride[l];
    s_src[l] = p.s_in[l] != nullptr ? p.s_in[l] + nh * size[l] : nullptr;
    cw_src[l] = p.cw_in[l] != nullptr && off > 0 ? p.cw_in[l] + nh * size[l] : w_src[l];
    w_dst[l] = p.w_out[l] + nh * size[l];
    s_dst[l] = p.s_out[l] + nh * size[l];
    cw_dst[l] = p.cw_out[l] != nullptr ? p.cw_out[l] + nh * size[l] : nullptr;
  }

  // The elements of layer l's matrices this CTA owns (and alone writes): layer 1 columns,
  // layer 2 rows, of its hidden blocks.
  auto owned = [=](int l) {
    return [=](int64_t e) {
      if (split == 1) return true;
      const int64_t blk = (l == 0 ? e % hidden : e / D) / kHB;
      return int(blk % split) == rank;
    };
  };

  // Loads batched or asynchronous at D <= 64 (copy_state's batches, load_rows_async); D = 128
  // (2-3 KB of spills per thread already) keeps plain loads: with them its cluster instances
  // spilled more and ran 8% slower (H100, D 128, hidden 512, chunk 32, B 2).
  constexpr bool kBatchedLoads = D <= 64;

  // dst <- src over layer l's elements this CTA owns
  auto copy = [&](float* dst, const float* src, int l) {
    copy_state<kThreads, kBatchedLoads ? 4 : 1>(dst, src, size[l], owned(l));
  };

  if (n_chunks == 0) {  // no tokens: the state passes through
#pragma unroll
    for (int l = 0; l < kDepth; ++l) {
      copy(w_dst[l], w_src[l], l);
      copy(s_dst[l], s_src[l], l);
      if (cw_dst[l] != nullptr) copy(cw_dst[l], cw_src[l], l);
    }
    return;
  }

  // bf16 at D <= 64: the chunk's q, k rows by cp.async (load_rows_async; the launcher checks
  // that the rows are 16-byte aligned), over lo planes zeroed once here.
  constexpr bool rows_async = kX && kBatchedLoads;
  if constexpr (rows_async) {
    for (int i = tid; i < lay.plane_q / 2; i += kThreads) {
      reinterpret_cast<uint32_t*>(s_q.p + lay.plane_q)[i] = 0u;
      reinterpret_cast<uint32_t*>(s_k.p + lay.plane_q)[i] = 0u;
    }
  }

  const Head<D> head{p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr,
                     p.ln_weight != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr,
                     p.ln_eps, p.residual, {1.f, 1.f}};

  // What the backward reads instead of recomputing: the read's z2 and the keys' fk before
  // their heads, fp32 rows [B, T, H, D] as o; this lane's rows of a warp tile, by streaming
  // stores (st.global.cs: the forward never reads them back, so they should not evict the state
  // from L2).
  float* __restrict__ gz2 = p.read_z2;
  float* __restrict__ gfk = p.keys_fk;
  auto store_f32 = [&](float* __restrict__ dst, const float (&f)[kNtD][4], int64_t t0) {
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t t = t0 + row_lo + 8 * half;
        if (t >= 0 && t < len)
          __stcs(reinterpret_cast<float2*>(dst + ro.at(t) + nt * 8 + 2 * (lane % 4)),
                 make_float2(f[nt][2 * half], f[nt][2 * half + 1]));
      }
  };
  // Stores o (this lane's rows of a warp tile, normalized in place by hd) for active slots.
  auto store_o = [&](float (&f)[kNtD][4], int64_t t0) {
    if (gz2 != nullptr) store_f32(gz2, f, t0);
    Head<D> hd = head;
    hd.normalize(f);
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt) {
      const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_lo + 8 * half;
        const int64_t t = t0 + row;
        if (t >= 0 && t < len) {
          const float2 y = hd.y2(f, nt, 2 * half, s_q, row, col);
          store2(go + ro.at(t) + col, y.x, y.y);
        }
      }
    }
  };

  for (int j = 0; j < n_chunks; ++j) {
    const bool first = j == 0;
    const float *wsrc[2], *ssrc[2], *gsrc[2];
#pragma unroll
    for (int l = 0; l < kDepth; ++l) {
      wsrc[l] = first ? w_src[l] : w_dst[l];
      ssrc[l] = first ? s_src[l] : s_dst[l];
      // the gradient weights: the call chunk's start, which a sub-chunk past the first of a
      // call chunk past the first reads from cw_dst (kept there at its chunk's start, below)
      gsrc[l] = j < R ? cw_src[l] : j % R == 0 ? w_dst[l] : cw_dst[l];
    }
    const bool g_is_w = gsrc[0] == wsrc[0];  // the gradient weights are the chunk's W0
    // the backward's checkpoint: this chunk's start state (the CTA's own blocks), written by
    // the state update below from the values it loads anyway. (A copy here, every CTA at the
    // same chunk and waiting on it, cost ~34 us per checkpoint at B = 8 on an H200:
    // docs/perf_notes.md v31.)
    const int ck = p.ckpt_every > 0 && j % p.ckpt_every == 0 ? j / p.ckpt_every : -1;
    // the open chunk's weights of the final state: this chunk's gradient weights
    if (j == n_chunks - 1 && final_off > 0) {
#pragma unroll
      for (int l = 0; l < kDepth; ++l)
        if (cw_dst[l] != nullptr && cw_dst[l] != gsrc[l])
          copy(cw_dst[l], gsrc[l], l);
    }
    // a call chunk's first sub-chunk (past the call's first chunk): its start weights, which
    // its later sub-chunks take their gradients at, into cw_dst before the update runs in place
    // (the launcher checks cw_dst; the same CTA reads its own blocks of it)
    if (kSub && j >= R && j % R == 0 && j + 1 < n_chunks) {
#pragma unroll
      for (int l = 0; l < kDepth; ++l)
        copy(cw_dst[l], w_dst[l], l);
    }

    // ---- load: q, k rows and gates of the chunk's slots ----
    const int64_t t0 = int64_t(j) * C - off;  // token of slot 0
    if constexpr (rows_async) {
      load_rows_async<D, C, kThreads>(s_q, s_k, gq, gk, rq, rk, t0, len);
      if (tid < C) load_gates(tid, p, row_base, h, t0, len, s_theta, s_a, s_eta, s_act);
      cp_async_wait<0>();
    } else {
      load_chunk<TIn, D, C, kThreads, 1>(s_q, s_k, gq, gk, rq, rk, p, row_base, h, t0, len,
                                         s_theta, s_a, s_eta, s_act);
    }
    if (j + 1 < n_chunks) {  // the next chunk's rows into L2 while this one computes
      prefetch_chunk<TIn, D, C, kThreads>(gq, rq, gk, rk, gv, rv, nullptr, rv, p, row_base, h,
                                          t0 + C, len);
    }
    __syncthreads();

    // ---- gates ----
    if (tid < C) {
      const float2 last = gate_column<C>(tid, s_theta, s_a, s_eta, s_act, s_g, nullptr, kLdG);
      s_gneg[tid] = -last.x;
      s_nneg[tid] = -last.y;
    } else if (tid == kThreads - 1) {
      gate_scalars<C>(s_a, s_eta, s_act, s_m, s_beta, s_c);
    }

    // ---- keys: forward at Wg (and read "chunk": M_Wg(q)) ----
    float fk[kNtD][4] = {}, fq[kNtD][4] = {};
    for (int b = rank; b < n_blocks; b += split) {
      __syncthreads();  // gates done (b = 0) / the previous block's operands are no longer read
      if constexpr (kDepth == 2) {
        stage<D, kHB, kThreads>(s_w1, gsrc[0] + b * kHB, hidden);
        stage<kHB, D, kThreads>(s_w2, gsrc[1] + int64_t(b) * kHB * D, D);
      } else {
        stage<D, D, kThreads>(s_w1, gsrc[0], D);
      }
      __syncthreads();
      if (!row_warp) continue;
      if constexpr (kDepth == 2) {
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
          if (pass == 1 && !p.read_chunk) break;
          float z[kNtW][4] = {};
          gemm_rows<D, kCW, true, kX>(z, pass == 0 ? s_k : s_q, m0, s_w1.cols(c0), lane);
          SplitA ha[kCW / 16];
#pragma unroll
          for (int kk = 0; kk < kCW / 16; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              z[2 * kk][e] = act3(z[2 * kk][e], p.activation).f;
              z[2 * kk + 1][e] = act3(z[2 * kk + 1][e], p.activation).f;
            }
            ha[kk] = split_a(z[2 * kk], z[2 * kk + 1]);
          }
          gemm_reg<kCW, D, true>(pass == 0 ? fk : fq, ha, s_w2.rows(c0), lane);
        }
      } else {
        gemm_rows<D, D, true, kX>(fk, s_k, m0, s_w1, lane);
        if (p.read_chunk) gemm_rows<D, D, true, kX>(fq, s_q, m0, s_w1, lane);
      }
    }

    if constexpr (kParts == 2) {
      __syncthreads();  // the staging blocks (red) are no longer read
      reduce_parts(fk, red, row_warp && !lead, row_warp && lead, rg, lane);
      if (p.read_chunk) reduce_parts(fq, red, row_warp && !lead, row_warp && lead, rg, lane);
    }
    if (split > 1) {  // every CTA needs the whole fk (its own dz2); only rank 0 stores o
      __syncthreads();  // the staging blocks (red) are no longer read
      cluster_sum(grp, split, fk, red, row_warp && lead, true, rg, lane);
      if (p.read_chunk) cluster_sum(grp, split, fq, red, row_warp && lead, rank == 0, rg, lane);
    }

    // ---- head of the keys: dl/df of the last layer -> s_dz2 ----
    if (row_warp && lead) {
      if (gfk != nullptr && rank == 0) store_f32(gfk, fk, t0);
      Head<D> hd = head;
      hd.normalize(fk);
      float dy[kNtD][4];
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row_lo + 8 * half;
          const int64_t t = t0 + row;
          float2 g = make_float2(0.f, 0.f);
          if (t >= 0 && t < len) {
            const float2 vv = load2(gv + rv.at(t) + col);
            const float2 y = hd.y2(fk, nt, 2 * half, s_k, row, col);
            g = make_float2(2.f * (y.x - vv.x), 2.f * (y.y - vv.y));
          }
          dy[nt][2 * half] = g.x;
          dy[nt][2 * half + 1] = g.y;
        }
      }
      hd.backward(dy, fk, lane);
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
        s_dz2.put2(row_lo, col, dy[nt][0], dy[nt][1]);
        s_dz2.put2(row_lo + 8, col, dy[nt][2], dy[nt][3]);
      }
      if constexpr (kPre) {  // the state update's B of layer 2, its rows scaled
        const float g0 = s_gneg[row_lo], g8 = s_gneg[row_lo + 8];
        const float n0 = s_nneg[row_lo], n8 = s_nneg[row_lo + 8];
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt) {
          const int col = nt * 8 + 2 * (lane % 4);
          s_dg2.put2(row_lo, col, g0 * dy[nt][0], g0 * dy[nt][1]);
          s_dg2.put2(row_lo + 8, col, g8 * dy[nt][2], g8 * dy[nt][3]);
          s_dn2.put2(row_lo, col, n0 * dy[nt][0], n0 * dy[nt][1]);
          s_dn2.put2(row_lo + 8, col, n8 * dy[nt][2], n8 * dy[nt][3]);
        }
      }
      if (p.read_chunk && rank == 0) store_o(fq, t0);
    }

    // ---- A1 = -G * (q k^T) for this warp's rows (read "token") ----
    SplitA a1[C / 16];
    float beta_r[2] = {0.f, 0.f}, c_r[2] = {0.f, 0.f};
    if (row_warp && !p.read_chunk) {
      float acc[kNtC][4] = {};
      gemm_rows<D, C, false, kX, kX>(acc, s_q, m0, s_k, lane);  // k^T: [k = feature][n = token]
#pragma unroll
      for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_lo + (e >> 1) * 8, col = nt * 8 + 2 * (lane % 4) + (e & 1);
          acc[nt][e] *= -s_g[row * kLdG + col];
        }
#pragma unroll
      for (int kk = 0; kk < C / 16; ++kk) a1[kk] = split_a(acc[2 * kk], acc[2 * kk + 1]);
      beta_r[0] = s_beta[row_lo], beta_r[1] = s_beta[row_lo + 8];
      c_r[0] = s_c[row_lo], c_r[1] = s_c[row_lo + 8];
    }

    // ---- per hidden block: errors of layer 1, read "token", state ----
    const float beta_c = s_beta[C - 1], c_c = s_c[C - 1], m_c = s_m[C - 1];
    float z2[kNtD][4] = {}, pp[kNtC][4] = {};
    for (int b = rank; b < n_blocks; b += split) {
      __syncthreads();  // s_dz2 complete (b = 0); the previous block's operands are free
      if constexpr (kDepth == 2) {
        // hk and dz1 of the block at Wg, into s_hk / s_dz1
        if (!g_is_w) {
          stage<D, kHB, kThreads>(s_w1, gsrc[0] + b * kHB, hidden);
          stage<kHB, D, kThreads>(s_w2, gsrc[1] + int64_t(b) * kHB * D, D);
          __syncthreads();
        }
        auto errors = [&]() {
          float z[kNtW][4] = {}, dh[kNtW][4] = {};
          gemm_rows<D, kCW, true, kX>(z, s_k, m0, s_w1.cols(c0), lane);
          gemm_rows<D, kCW, false>(dh, s_dz2, m0, s_w2.rows(c0), lane);  // W2 block as [n][k]
#pragma unroll
          for (int nt = 0; nt < kNtW; ++nt) {
            const int col = c0 + nt * 8 + 2 * (lane % 4);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const float z0 = z[nt][2 * half], z1 = z[nt][2 * half + 1];
              const int row = row_lo + 8 * half;
              const Act a0 = act3(z0, p.activation), a1 = act3(z1, p.activation);
              s_hk.put2(row, col, a0.f, a1.f);
              const float d0 = dh[nt][2 * half] * a0.d1, d1 = dh[nt][2 * half + 1] * a1.d1;
              s_dz1.put2(row, col, d0, d1);
              if constexpr (kPre) {  // the state update's B of layer 1, its rows scaled
                const float g = s_gneg[row], nn = s_nneg[row];
                s_dg1.put2(row, col, g * d0, g * d1);
                s_dn1.put2(row, col, nn * d0, nn * d1);
              }
            }
          }
        };
        if (!g_is_w) {
          if (row_warp) errors();
          __syncthreads();  // Wg blocks no longer read
        }
        stage<D, kHB, kThreads>(s_w1, wsrc[0] + b * kHB, hidden);
        stage<D, kHB, kThreads>(s_s1, ssrc[0] == nullptr ? nullptr : ssrc[0] + b * kHB, hidden);
        stage<kHB, D, kThreads>(s_w2, wsrc[1] + int64_t(b) * kHB * D, D);
        stage<kHB, D, kThreads>(
            s_s2, ssrc[1] == nullptr ? nullptr : ssrc[1] + int64_t(b) * kHB * D, D);
        __syncthreads();
        if (g_is_w) {
          if (row_warp) errors();
          __syncthreads();  // every row of the block's hk, dz1
        }
      } else {
        stage<D, D, kThreads>(s_w1, wsrc[0], D);
        stage<D, D, kThreads>(s_s1, ssrc[0], D);
        __syncthreads();
      }

      // read "token": z1 (block) = (beta q) W0 + (c q) S0 + A1 dz1
      if (row_warp && !p.read_chunk) {
        const Planes dz1 = (kDepth == 2 ? s_dz1 : s_dz2).cols(c0);
        float z[kNtW][4] = {};
        if constexpr (kDepth == 2) {  // diag(beta) (q W0) + diag(c) (q S0): the row scales on
          float zs[kNtW][4] = {};     // the fp32 products (q's fragments loaded per product)
          gemm_rows<D, kCW, true, kX>(z, s_q, m0, s_w1.cols(c0), lane);
          gemm_rows<D, kCW, true, kX>(zs, s_q, m0, s_s1.cols(c0), lane);
#pragma unroll
          for (int nt = 0; nt < kNtW; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              z[nt][e] = beta_r[e >> 1] * z[nt][e] + c_r[e >> 1] * zs[nt][e];
        } else {  // (D wide: two accumulator sets would not fit the registers)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            const SplitA qa = load_a_split(s_q, m0, kk * 16, lane);
            const SplitA qb = scale_rows(qa, beta_r[0], beta_r[1]);
            const SplitA qc = scale_rows(qa, c_r[0], c_r[1]);
#pragma unroll
            for (int np = 0; np < kCW / 16; ++np) {
              mma_split<true>(z[2 * np], z[2 * np + 1], qb, s_w1.cols(c0), kk * 16, np * 16,
                              lane);
              mma_split<true>(z[2 * np], z[2 * np + 1], qc, s_s1.cols(c0), kk * 16, np * 16,
                              lane);
            }
          }
        }
        gemm_reg<C, kCW, true>(z, a1, dz1, lane);
        if constexpr (kDepth == 2) {
          SplitA hf[kCW / 16], hb[kCW / 16], hc[kCW / 16];
#pragma unroll
          for (int kk = 0; kk < kCW / 16; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              z[2 * kk][e] = act3(z[2 * kk][e], p.activation).f;
              z[2 * kk + 1][e] = act3(z[2 * kk + 1][e], p.activation).f;
            }
            hf[kk] = split_a(z[2 * kk], z[2 * kk + 1]);
            hb[kk] = split_a(z[2 * kk], z[2 * kk + 1], beta_r[0], beta_r[1]);
            hc[kk] = split_a(z[2 * kk], z[2 * kk + 1], c_r[0], c_r[1]);
          }
          gemm_reg<kCW, D, true>(z2, hb, s_w2.rows(c0), lane);
          gemm_reg<kCW, D, true>(z2, hc, s_s2.rows(c0), lane);
          gemm_reg<kCW, C, false>(pp, hf, s_hk.cols(c0), lane);  // hk^T: [k = hidden][n = token]
        } else {
#pragma unroll
          for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) z2[nt][e] = z[nt][e];
        }
      }

      // state of the block: layer 1 columns [b * kBW, +kBW), layer 2 rows [b * kHB, +kHB)
      constexpr int kTiles1 = (D / 16) * (kBW / 16);
      constexpr int kTiles2 = kDepth == 2 ? (kHB / 16) * (D / 16) : 0;
      for (int item = warp; item < kTiles1 + kTiles2; item += kWarps) {
        const bool l2 = item >= kTiles1;
        const int it = l2 ? item - kTiles1 : item;
        const int tile_cols = l2 ? D : kBW;
        const int tm0 = (it / (tile_cols / 16)) * 16, tn0 = (it % (tile_cols / 16)) * 16;
        const int l = l2 ? 1 : 0;
        const Planes sa = l2 ? s_hk : s_k;  // [token][row of the tile]
        const Planes sb = (l2 || kDepth == 1) ? s_dz2 : s_dz1;  // [token][col of the tile]
        const int cols = l2 ? D : hidden;
        const int64_t base = l2 ? int64_t(b) * kHB * D : int64_t(b) * kBW;
        float aw[2][4], as[2][4];
        const int r = tm0 + lane / 4;
        auto at = [&](int t, int half) {
          return base + int64_t(r + 8 * half) * cols + tn0 + t * 8 + 2 * (lane % 4);
        };
        float2 w[2][2], s[2][2];  // the tile's start state: all loads before any store
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            w[t][half] = __ldcg(reinterpret_cast<const float2*>(wsrc[l] + at(t, half)));
            s[t][half] = ssrc[l] != nullptr
                ? __ldcg(reinterpret_cast<const float2*>(ssrc[l] + at(t, half)))
                : make_float2(0.f, 0.f);
          }
        if (ck >= 0) {  // the checkpoint (above): streamed, never read here
          const int64_t slot = (int64_t(ck) * p.n_seq + n) * p.heads + h;  // size[0] == size[1]
          float* const cw = (l2 ? p.ckpt_w[1] : p.ckpt_w[0]) + slot * size[0];
          float* const cs = (l2 ? p.ckpt_s[1] : p.ckpt_s[0]) + slot * size[0];
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              __stcs(reinterpret_cast<float2*>(cw + at(t, half)), w[t][half]);
              __stcs(reinterpret_cast<float2*>(cs + at(t, half)), s[t][half]);
            }
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            aw[t][2 * half] = beta_c * w[t][half].x + c_c * s[t][half].x;
            aw[t][2 * half + 1] = beta_c * w[t][half].y + c_c * s[t][half].y;
            as[t][2 * half] = m_c * s[t][half].x;
            as[t][2 * half + 1] = m_c * s[t][half].y;
          }
        if constexpr (kPre) {  // B with its row scales (the head, errors): A as stored
          const Planes bg = l2 ? s_dg2 : s_dg1, bn = l2 ? s_dn2 : s_dn1;
#pragma unroll
          for (int ks = 0; ks < C / 16; ++ks) {
            const SplitA a = load_a_split<true>(sa, tm0, ks * 16, lane);
            mma_split_b(aw[0], aw[1], a, load_b_split<true>(bg, ks * 16, tn0, lane));
            mma_split_b(as[0], as[1], a, load_b_split<true>(bn, ks * 16, tn0, lane));
          }
        } else {
#pragma unroll
          for (int ks = 0; ks < C / 16; ++ks) {
            SplitA ag, an;
            scale_cols2(load_a_split<true>(sa, tm0, ks * 16, lane), s_gneg, s_nneg, ks * 16,
                        lane, ag, an);
            const SplitB bs = load_b_split<true>(sb, ks * 16, tn0, lane);
            mma_split_b(aw[0], aw[1], ag, bs);
            mma_split_b(as[0], as[1], an, bs);
          }
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            *reinterpret_cast<float2*>(w_dst[l] + at(t, half)) = make_float2(aw[t][2 * half],
                                                                             aw[t][2 * half + 1]);
            *reinterpret_cast<float2*>(s_dst[l] + at(t, half)) = make_float2(as[t][2 * half],
                                                                             as[t][2 * half + 1]);
          }
      }
    }

    // ---- read "token": z2 += (-G * P) dz2, o = head(z2) ----
    // Linear in P: each warp adds its own columns' part, so only z2 is summed over the warps
    // of a row group and over the cluster.
    if (row_warp && !p.read_chunk) {
      if constexpr (kDepth == 2) {
#pragma unroll
        for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = row_lo + (e >> 1) * 8, col = nt * 8 + 2 * (lane % 4) + (e & 1);
            pp[nt][e] *= -s_g[row * kLdG + col];
          }
        SplitA a2[C / 16];
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) a2[kk] = split_a(pp[2 * kk], pp[2 * kk + 1]);
        gemm_reg<C, D, true>(z2, a2, s_dz2, lane);
      }
    }
    if constexpr (kParts == 2) {
      if (!p.read_chunk) {
        __syncthreads();  // the staging blocks (red) are no longer read
        reduce_parts(z2, red, row_warp && !lead, row_warp && lead, rg, lane);
      }
    }
    if (split > 1 && !p.read_chunk) {  // rank 0 stores o
      __syncthreads();  // the staging blocks (red) are no longer read
      cluster_sum(grp, split, z2, red, row_warp && lead, rank == 0, rg, lane);
    }
    if (row_warp && lead && !p.read_chunk && rank == 0) store_o(z2, t0);
    __syncthreads();  // the new state is visible to the next chunk's staging
  }

  if (final_off == 0) {  // no chunk left open: the chunk weights are the final weights
#pragma unroll
    for (int l = 0; l < kDepth; ++l)
      if (cw_dst[l] != nullptr) copy(cw_dst[l], w_dst[l], l);
  }
}

template <typename TIn, int D, int C, int kDepth, bool kSub = false>
cudaError_t launch(NeuralMemoryParams p, cudaStream_t stream) {
  int arch = 0;  // the one-CTA instance's plan follows the binary the device runs
  TITANS_RETURN_IF_ERROR(binary_arch(chunked_kernel<TIn, D, C, kDepth, 0, kSub>, &arch));
  const size_t smem = make_layout(D, C, kDepth, !kSub && pre_arch(arch)).total;
  const size_t smem_split = make_layout(D, C, kDepth, false).total;
  constexpr int kThreads = Threads<C>::kThreads;
  const SplitKernels<decltype(&chunked_kernel<TIn, D, C, kDepth, 0>)> ks{
      chunked_kernel<TIn, D, C, kDepth, 0, kSub>,
      chunked_kernel<TIn, D, C, kDepth, kDepth == 2 ? 1 : 0, kSub>,
      chunked_kernel<TIn, D, C, kDepth, kDepth == 2 ? 2 : 0, kSub>, kThreads, smem, smem_split};
  TITANS_RETURN_IF_ERROR(ks.prepare());
  int device = 0, major = 0;
  TITANS_RETURN_IF_ERROR(cudaGetDevice(&device));
  TITANS_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const int n_blocks = kDepth == 2 ? p.hidden / kHB : 1;
  const bool can_global = kDepth == 2 && p.exchange != nullptr && p.arrivals != nullptr;
  const int64_t pairs = int64_t(p.n_seq) * p.heads;
  const bool chosen = p.split == 0;
  int split = p.split;  // signed: -s for s ordinary CTAs (launch.cuh)
  int cluster_split = 1;  // the launcher's choice without an exchange
  if (chosen) {
    split = choose_split(ks, n_blocks, pairs, kMaxSplit, kDepth == 2 && major >= 9, can_global,
                         &cluster_split);
  } else if (split < 0 && (!can_global || split > -2 ||
                           pairs * -split > resident_ctas(ks.global, kThreads, ks.split_smem()))) {
    return cudaErrorInvalidValue;
  }
  // cluster_sum's buffer (C x D fp32) is the staging blocks' region
  const Layout lay = make_layout(D, C, kDepth, false);
  const bool red_fits = lay.g - lay.w1 >= size_t(C) * D * sizeof(float);
  auto run = [&](int split) -> cudaError_t {
    const int s = split < 0 ? -split : split;
    if (s != 1 && (kDepth != 2 || (major < 9 && split > 0) || s > kMaxSplit || s > n_blocks ||
                   !red_fits)) {
      return cudaErrorInvalidValue;
    }
    NeuralMemoryParams q = p;
    q.split = s;
    return launch_split(ks, q, q.heads, q.n_seq, split, stream);
  };
  const cudaError_t err = run(split);
  // The launcher's global split sized itself by the device's SMs; where fewer are available
  // (MPS with a thread percentage, green contexts) the cooperative launch is refused: the
  // cluster choice then runs instead.
  if (chosen && split < 0 && err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return run(cluster_split);
  }
  return err;
}

// The instances of one (dtype, D), compiled in their own translation unit.
template <typename TIn, int D>
cudaError_t by_chunk(const NeuralMemoryParams& p, cudaStream_t stream) {
  auto by_depth = [&](auto chunk_tag) {
    constexpr int C = decltype(chunk_tag)::value;
    return p.depth == 1 ? launch<TIn, D, C, 1>(p, stream) : launch<TIn, D, C, 2>(p, stream);
  };
  // sub-chunks (params.h): at depth 2 chunk 128 as 2 x 64 at D = 64 and 128, where its own plan
  // does not fit a block (D = 32's does); at depth 1 the call chunks whose backward has no
  // instance (chunk 128 as 2 x 64 at D <= 64, chunks 64 / 128 as 32s at D = 128) in a forward
  // that keeps every sub-chunk's start state for that backward (chunked_bwd1_kernel.cuh), and
  // chunk 128 at D = 128 in any forward (its own plan does not fit)
  if (p.sub > 1) {
    bool cw_ok = true;
    for (int l = 0; l < p.depth; ++l) cw_ok = cw_ok && p.cw_out[l] != nullptr;
    if (p.sub > 8 || !cw_ok) return cudaErrorInvalidValue;
    if (p.depth == 1) {
      constexpr int kC1 = neural_memory_bwd_sub_chunk(D);
      if (p.chunk != kC1) return cudaErrorInvalidValue;
      return launch<TIn, D, kC1, 1, true>(p, stream);
    }
    if constexpr (D == 32) {
      return cudaErrorInvalidValue;
    } else {
      if (p.depth != 2 || p.chunk != 64 || (p.ckpt_every > 0 && p.ckpt_every % p.sub != 0)) {
        return cudaErrorInvalidValue;
      }
      return launch<TIn, D, 64, 2, true>(p, stream);
    }
  }
  switch (p.chunk) {
    case 16: return by_depth(std::integral_constant<int, 16>{});
    case 32: return by_depth(std::integral_constant<int, 32>{});
    case 64: return by_depth(std::integral_constant<int, 64>{});
    default: return by_depth(std::integral_constant<int, 128>{});
  }
}

extern template cudaError_t by_chunk<__nv_bfloat16, 32>(const NeuralMemoryParams&, cudaStream_t);
extern template cudaError_t by_chunk<__nv_bfloat16, 64>(const NeuralMemoryParams&, cudaStream_t);
extern template cudaError_t by_chunk<__nv_bfloat16, 128>(const NeuralMemoryParams&, cudaStream_t);
extern template cudaError_t by_chunk<__half, 32>(const NeuralMemoryParams&, cudaStream_t);
extern template cudaError_t by_chunk<__half, 64>(const NeuralMemoryParams&, cudaStream_t);
extern template cudaError_t by_chunk<__half, 128>(const NeuralMemoryParams&, cudaStream_t);

}  // namespace chunked
}  // namespace titans
