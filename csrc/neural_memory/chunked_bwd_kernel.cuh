// The fused backward of neural_memory_chunked (chunked_bwd.h) at depth 2 (read "token"; read
// "chunk" is the same walk with the read's row scales 1, 0 and no couplings to G): the
// kernel template and its launcher; chunked_bwd.cu holds the entry points, and
// chunked_bwd_<dtype>_d<D>.cu the instances of one (dtype, D) for every supported chunk.
//
// One CTA of 8 warps per (sequence, head) (or `split` of them, CTA r owning the hidden blocks
// b with b % split == r: the per-block work divides, the chunk-wide work repeats, and two sums
// cross the group per chunk in rank order: dz̄2 to every CTA, the end group to rank
// 0, which alone stores the per-token gradients; the group is a cluster on sm_90+, over DSMEM,
// or ordinary CTAs of a cooperative launch exchanging through global memory, where clusters of
// that size would not all be resident at once: GlobalGroup, csrc/common/cluster.cuh)
// walks the chunks last to first. W̄ and S̄ (the cotangents of the state after the chunk)
// live in the fp32 output tensors and are updated in place, hidden block by hidden block, into
// those of the state before it. The chunk-start states come from the forward's checkpoints
// every K = params.f.ckpt_every chunks: entering a group (walking down), the kernel first
// recomputes the group's other chunk starts into a ring (load, head, then the state update per
// block: the forward without its keys pass and read, whose fk it kept). Per chunk (notation
// of chunk_vjp.py; gneg = -G[C-1, :], nneg = -N[C-1, :]; every product takes split-bf16
// operands from shared memory, three mma.sync per product, fp32 accumulation):
//
//   load      q, k, gates; G (column recurrences), ga1 = -G * (q k^T)
//   head      (row mode) e = 2 (y - v), dz2 = LNB(fk, e); e, xhat, rstd to scratch, from the
//             keys' forward at Wg that the forward kept (params.h keys_fk: no keys pass here)
//   read      (row mode) z̄2 = LN backward of dl/do at the read's z2, which the forward kept
//             (params.h read_z2: no recompute of the read); mm2 = -z̄2 dz2^T, a2_bar = mm2 * G
//   pass C    per block (chunk_vjp_blocked's pass C): the read's adjoint (layer 2, then 1), the
//             state's cotangents (layer 2, then 1), the errors' second-order adjoint; W̄_b, S̄_b
//             written in place, the block's keys' adjoints kept in scratch for pass D; P +=
//             h1 hk1^T; after the blocks dz̄2 += (-G * P)^T z̄2 and Ḡ = mm2 * P (this CTA's part).
//             Two staging points per block: W0, S0 and W̄', S̄' of layer 2 at its start, W̄', S̄'
//             of layer 1 over W0_1, S0_1 once C3 (with C4 in the same step) has read them
//   sync 3    (row mode) LayerNorm double backward: f̄, dv, and the head's cotangents
//   pass D    the keys' forward adjoint: W̄g_b (into W̄, or wg0_bar at chunk 0), k̄
//   end       q̄, k̄ (+ a1_bar terms), Ḡ; the gates' adjoint by reverse-mode through the
//             column recurrences (chunk_vjp.gates_vjp_recurrences)
//
// Matrices are cut into 16 x 16 tiles dealt to the warps in a fixed order (TileMap), so a
// warp owns the same tiles of a matrix in every step: sums over the hidden blocks (dz̄2, k̄,
// q̄, mm1, ...) stay in its registers, values produced in one step are read back by the same
// threads in a later one, and every sum has a fixed order (deterministic). Row-wise work (the
// LayerNorm heads) runs in "row mode": 256 / C threads per row, shuffles within the row.
#pragma once

#include <type_traits>

#include "chunked_bwd.h"
#include "chunked_bwd_gates.cuh"

#include "chunked_kernel.cuh"

namespace titans {
namespace chunked_bwd {

using chunked::kHB;
using chunked::Planes;
using chunked::Act;
using chunked::Rows;
using chunked::SplitA;
using chunked::SplitB;
using chunked::act3;
using chunked::load_a_split;
using chunked::load_b_split;
using chunked::mma_split_b;
using chunked::scale_cols2;
using chunked::stage;
using bf16 = __nv_bfloat16;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// The 16 x 16 tiles of an R x Cc matrix dealt to the warps: tile w + 8 i to warp w.
template <int R, int Cc>
struct TileMap {
  static constexpr int kTiles = (R / 16) * (Cc / 16);
  static constexpr int kIt = (kTiles + kWarps - 1) / kWarps;
  __device__ static bool ok(int i, int w) {
    return kTiles % kWarps == 0 || w + kWarps * i < kTiles;
  }
  __device__ static int m0(int i, int w) { return (w + kWarps * i) / (Cc / 16) * 16; }
  __device__ static int n0(int i, int w) { return (w + kWarps * i) % (Cc / 16) * 16; }
};

// Element e of n-half t of a tile at (m0, n0): row and column.
__device__ __forceinline__ int trow(int m0, int e, int lane) {
  return m0 + lane / 4 + 8 * (e >> 1);
}
__device__ __forceinline__ int tcol(int n0, int t, int e, int lane) {
  return n0 + 8 * t + 2 * (lane % 4) + (e & 1);
}

template <int N>
__device__ __forceinline__ void zero(float (&a)[N][2][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) a[i][t][e] = 0.f;
}
__device__ __forceinline__ void zero(float (&a)[2][4]) {
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[t][e] = 0.f;
}

// f(kk) for kk in [0, N): unrolled, or rolled (one copy of the body) when kRolled.
template <bool kRolled, int N, typename F>
__device__ __forceinline__ void k_steps(F&& f) {
  if constexpr (kRolled) {
#pragma unroll 1
    for (int kk = 0; kk < N; ++kk) f(kk);
  } else {
#pragma unroll
    for (int kk = 0; kk < N; ++kk) f(kk);
  }
}

// acc (the 16 x 16 tile at (m0, n0)) += A B over K. A stored [m][k] (or [k][m] when kAK), B
// stored [k][n] (kBK) or [n][k]. kAHi / kBHi: that operand's lo plane is zero (q, k of bf16
// inputs), so it is not loaded and its mma is skipped (the same sum: the skipped terms are 0).
// kR: the k steps rolled (one copy of the body) rather than unrolled (k_steps; the kernel's kR).
template <bool kR, int K, bool kAK, bool kBK, bool kAHi = false, bool kBHi = false>
__device__ __forceinline__ void mma_tile(float (&acc)[2][4], const Planes& A, int m0,
                                         const Planes& B, int n0, int lane) {
  k_steps<kR, K / 16>([&](int kk) {
    SplitA a;
    load_a_split<kAK, kAHi>(a, A, m0, kk * 16, lane);
    mma_split_b<kAHi, kBHi>(acc[0], acc[1], a, load_b_split<kBK, kBHi>(B, kk * 16, n0, lane));
  });
}

// acc1 += A^T diag(s1) B and acc2 += A^T diag(s2) B on the 16 x 16 tile at (m0, n0) (A stored
// [k][m], B [k][n], k over K): A is loaded and joined once per k step and re-split for each
// scale (scale_cols2); B is loaded once for both products.
template <bool kR, int K>
__device__ __forceinline__ void mma_tile_cols2(float (&acc1)[2][4], float (&acc2)[2][4],
                                               const Planes& A, int m0, const Planes& B, int n0,
                                               int lane, const float* s1, const float* s2) {
  k_steps<kR, K / 16>([&](int kk) {
    SplitA a1, a2;
    scale_cols2(load_a_split<true>(A, m0, kk * 16, lane), s1, s2, kk * 16, lane, a1, a2);
    const SplitB b = load_b_split<true>(B, kk * 16, n0, lane);
    mma_split_b(acc1[0], acc1[1], a1, b);
    mma_split_b(acc2[0], acc2[1], a2, b);
  });
}

// acc += diag(r1) (A B1) + diag(r2) (A B2) on the 16 x 16 tile at (m0, n0), A stored [m][k],
// B as mma_tile's: A's fragments are loaded once per k step for both products, and the row
// scales apply to the two fp32 products at the end, rather than to A re-split per use
// (unpack, scale and split again every fragment, ~14 instructions per register). kAHi as
// mma_tile's.
template <bool kR, int K, bool kBK, bool kAHi = false>
__device__ __forceinline__ void mma_tile_rows2(float (&acc)[2][4], const Planes& A, int m0,
                                               const Planes& B1, const Planes& B2, int n0,
                                               int lane, const float* r1, const float* r2) {
  float t1[2][4], t2[2][4];
  zero(t1);
  zero(t2);
  k_steps<kR, K / 16>([&](int kk) {
    SplitA a;
    load_a_split<false, kAHi>(a, A, m0, kk * 16, lane);
    mma_split_b<kAHi>(t1[0], t1[1], a, load_b_split<kBK>(B1, kk * 16, n0, lane));
    mma_split_b<kAHi>(t2[0], t2[1], a, load_b_split<kBK>(B2, kk * 16, n0, lane));
  });
  const float r1g[2] = {r1[m0 + lane / 4], r1[m0 + lane / 4 + 8]};
  const float r2g[2] = {r2[m0 + lane / 4], r2[m0 + lane / 4 + 8]};
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] += r1g[e >> 1] * t1[t][e] + r2g[e >> 1] * t2[t][e];
}

// The tile's values as split planes.
__device__ __forceinline__ void put_tile(const Planes& P, int m0, int n0, const float (&v)[2][4],
                                         int lane) {
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      P.put2(m0 + lane / 4 + 8 * half, n0 + 8 * t + 2 * (lane % 4), v[t][2 * half],
             v[t][2 * half + 1]);
}

// fp32 [R][ld] tile <-> registers (global memory through L2, or shared).
__device__ __forceinline__ void load_tile_cg(float (&v)[2][4], const float* src, int64_t ld,
                                             int m0, int n0, int lane) {
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float2 x = __ldcg(reinterpret_cast<const float2*>(
          src + int64_t(m0 + lane / 4 + 8 * half) * ld + n0 + 8 * t + 2 * (lane % 4)));
      v[t][2 * half] = x.x;
      v[t][2 * half + 1] = x.y;
    }
}
__device__ __forceinline__ void store_tile(float* dst, int64_t ld, int m0, int n0,
                                           const float (&v)[2][4], int lane) {
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      *reinterpret_cast<float2*>(dst + int64_t(m0 + lane / 4 + 8 * half) * ld + n0 + 8 * t +
                                 2 * (lane % 4)) = make_float2(v[t][2 * half],
                                                               v[t][2 * half + 1]);
}

// The block's zk = k Wg1_b and u = dz2 Wg2_b^T on this warp's C x HB tile at (m0, n0) (g1:
// Wg1_b [D][HB], g2: Wg2_b [HB][D]); hk1 = phi(zk) and dz1 = u phi'(zk) stored as split planes.
// kKHi: k is exact in bf16 (mma_tile's kAHi).
template <bool kR, int D, bool kKHi>
__device__ __forceinline__ void block_errors(float (&zk)[2][4], float (&u)[2][4],
                                             const Planes& s_k, const Planes& g1,
                                             const Planes& s_dz2, const Planes& g2,
                                             const Planes& s_hk1, const Planes& s_dz1, int m0,
                                             int n0, int lane, int act_kind) {
  zero(zk);
  zero(u);
  mma_tile<kR, D, false, true, kKHi>(zk, s_k, m0, g1, n0, lane);
  mma_tile<kR, D, false, false>(u, s_dz2, m0, g2, n0, lane);
  float hk[2][4], dz[2][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const Act a = act3(zk[t][e], act_kind);
      hk[t][e] = a.f;
      dz[t][e] = u[t][e] * a.d1;
    }
  put_tile(s_hk1, m0, n0, hk, lane);
  put_tile(s_dz1, m0, n0, dz, lane);
}

// The state's own cotangent terms on one 16 x 16 tile at (m0, n0) of a state block (leading
// dimension ld): aw += beta_C W̄', as += c_C W̄' + m_C S̄'; returns the tile's parts of
// <W0, W̄'>, <S0, W̄'>, <S0, S̄'>.
__device__ __forceinline__ float3 state_cotangent_tile(float (&aw)[2][4], float (&as)[2][4],
                                                       const float* wb, const float* sb,
                                                       const float* w0, const float* s0,
                                                       int64_t ld, int m0, int n0, int lane,
                                                       float beta_c, float c_c, float m_c) {
  float wbv[2][4], sbv[2][4], wv[2][4], sv[2][4];
  load_tile_cg(wbv, wb, ld, m0, n0, lane);
  load_tile_cg(sbv, sb, ld, m0, n0, lane);
  load_tile_cg(wv, w0, ld, m0, n0, lane);
  load_tile_cg(sv, s0, ld, m0, n0, lane);
  float3 fro = make_float3(0.f, 0.f, 0.f);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      aw[t][e] += beta_c * wbv[t][e];
      as[t][e] += c_c * wbv[t][e] + m_c * sbv[t][e];
      fro.x += wv[t][e] * wbv[t][e];
      fro.y += sv[t][e] * wbv[t][e];
      fro.z += sv[t][e] * sbv[t][e];
    }
  return fro;
}

// aw = beta_C W0 + c_C S0 and as = m_C S0 on the 16 x 16 tile at (m0, n0) of w0, s0 (leading
// dimension ld): the state update's start, before its products.
__device__ __forceinline__ void state_update_init(float (&aw)[2][4], float (&as)[2][4],
                                                  const float* w0, const float* s0, int64_t ld,
                                                  int m0, int n0, int lane, float beta_c,
                                                  float c_c, float m_c) {
  float sv[2][4];
  load_tile_cg(aw, w0, ld, m0, n0, lane);
  load_tile_cg(sv, s0, ld, m0, n0, lane);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      aw[t][e] = beta_c * aw[t][e] + c_c * sv[t][e];
      as[t][e] = m_c * sv[t][e];
    }
}

// One 16 x 16 tile at (m0, n0) of the forward's state update, W' = beta_C W0 + c_C S0 +
// x^T (gneg * dz) and S' = m_C S0 + x^T (nneg * dz) (x [C][rows], dz [C][cols] in shared
// memory), read from w0, s0 and written to wn, sn (leading dimension ld).
template <bool kR, int C>
__device__ __forceinline__ void state_update_tile(const Planes& x, const Planes& dz,
                                                  const float* gneg, const float* nneg,
                                                  const float* w0, const float* s0, float* wn,
                                                  float* sn, int64_t ld, int m0, int n0,
                                                  int lane, float beta_c, float c_c,
                                                  float m_c) {
  float aw[2][4], as[2][4];
  state_update_init(aw, as, w0, s0, ld, m0, n0, lane, beta_c, c_c, m_c);
  mma_tile_cols2<kR, C>(aw, as, x, m0, dz, n0, lane, gneg, nneg);
  store_tile(wn, ld, m0, n0, aw, lane);
  store_tile(sn, ld, m0, n0, as, lane);
}

// The recompute's block errors (block_errors' products): hk1 = phi(zk) into s_hk1, and dz1 =
// u phi'(zk) with its rows scaled, gneg * dz1 into s_dg and nneg * dz1 into s_dn, split from the
// fp32 values, so that the state update takes plain products (state_update_tile_pre) instead of
// joining, scaling and re-splitting its A operand at every k step (state_update_tile's cols2).
template <bool kR, int D, bool kKHi>
__device__ __forceinline__ void block_errors_scaled(const Planes& s_k, const Planes& g1,
                                                    const Planes& s_dz2, const Planes& g2,
                                                    const Planes& s_hk1, const Planes& s_dg,
                                                    const Planes& s_dn, const float* gneg,
                                                    const float* nneg, int m0, int n0,
                                                    int lane, int act_kind) {
  float zk[2][4], u[2][4];
  zero(zk);
  zero(u);
  mma_tile<kR, D, false, true, kKHi>(zk, s_k, m0, g1, n0, lane);
  mma_tile<kR, D, false, false>(u, s_dz2, m0, g2, n0, lane);
  const float gr[2] = {gneg[m0 + lane / 4], gneg[m0 + lane / 4 + 8]};
  const float nr[2] = {nneg[m0 + lane / 4], nneg[m0 + lane / 4 + 8]};
  float hk[2][4], dg[2][4], dn[2][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const Act a = act3(zk[t][e], act_kind);
      hk[t][e] = a.f;
      const float dz = u[t][e] * a.d1;
      dg[t][e] = gr[e >> 1] * dz;
      dn[t][e] = nr[e >> 1] * dz;
    }
  put_tile(s_hk1, m0, n0, hk, lane);
  put_tile(s_dg, m0, n0, dg, lane);
  put_tile(s_dn, m0, n0, dn, lane);
}

// state_update_tile with the row scales already on B (x^T (gneg * dz) = x^T dg, x^T (nneg * dz)
// = x^T dn; dg, dn [C][cols] split planes): A's fragments are loaded once per k step for both
// products and used as stored. kAHi: x is exact in bf16 (k of bf16 inputs).
template <bool kR, int C, bool kAHi>
__device__ __forceinline__ void state_update_tile_pre(const Planes& x, const Planes& dg,
                                                      const Planes& dn, const float* w0,
                                                      const float* s0, float* wn, float* sn,
                                                      int64_t ld, int m0, int n0, int lane,
                                                      float beta_c, float c_c, float m_c) {
  float aw[2][4], as[2][4];
  state_update_init(aw, as, w0, s0, ld, m0, n0, lane, beta_c, c_c, m_c);
  k_steps<kR, C / 16>([&](int kk) {
    SplitA a;
    load_a_split<true, kAHi>(a, x, m0, kk * 16, lane);
    mma_split_b<kAHi>(aw[0], aw[1], a, load_b_split<true>(dg, kk * 16, n0, lane));
    mma_split_b<kAHi>(as[0], as[1], a, load_b_split<true>(dn, kk * 16, n0, lane));
  });
  store_tile(wn, ld, m0, n0, aw, lane);
  store_tile(sn, ld, m0, n0, as, lane);
}

// Sum over the kTPR consecutive lanes that share a row (row mode).
template <int kTPR>
__device__ __forceinline__ float row_reduce(float v) {
#pragma unroll
  for (int o = 1; o < kTPR; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[0, N) += v (N even; dst 16-byte aligned where N % 4 == 0, else 8-byte; fp32 scratch in
// global memory that only this thread updates): every load is issued before the first store, so
// the row costs one memory latency, not one per element (the compiler cannot reorder the stores
// of `+=` past loads that may alias).
template <int N>
__device__ __forceinline__ void add_row(float* dst, const float (&v)[N]) {
  static_assert(N % 2 == 0, "float2 rows");
  if constexpr (N % 4 == 0) {
    float4 x[N / 4];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) x[i] = reinterpret_cast<const float4*>(dst)[i];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      x[i].x += v[4 * i];
      x[i].y += v[4 * i + 1];
      x[i].z += v[4 * i + 2];
      x[i].w += v[4 * i + 3];
      reinterpret_cast<float4*>(dst)[i] = x[i];
    }
  } else {
    float2 x[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) x[i] = reinterpret_cast<const float2*>(dst)[i];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      x[i].x += v[2 * i];
      x[i].y += v[2 * i + 1];
      reinterpret_cast<float2*>(dst)[i] = x[i];
    }
  }
}

// Asks L2 for the fp32 rows [.., T, H, D] (through r) of chunk slots t0 .. t0 + C - 1 (those
// in [0, len)) of a and b (nullptr: none). A hint: no effect on any value.
template <int D, int C>
__device__ __forceinline__ void prefetch_rows_f32(const float* a, const float* b, const Rows& r,
                                                  int64_t t0, int64_t len) {
  constexpr int kLines = (D * int(sizeof(float)) + 127) / 128;  // 128-byte lines per row
  for (int i = threadIdx.x; i < 2 * C * kLines; i += kThreads) {
    const int which = i / (C * kLines), rr = (i / kLines) % C;
    const int64_t t = t0 + rr;
    const float* base = which == 0 ? a : b;
    if (base != nullptr && t >= 0 && t < len) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(base + r.at(t) + 32 * (i % kLines)));
    }
  }
}

// Shared-memory plan (bytes). Planes as in chunked_kernel.cuh (hi then lo, rows padded by 8).
struct BwdLayout {
  size_t q, k, dz2, zb2, ga1, a2b, w1, s1, w2, s2, pw, ps, hk1, dz1, h1, zb1, vec, total;
  int pq, pcc, pw1, pw2, ppr, pch;
};

constexpr int kVecs = 18;  // per-row vectors of C floats (gates, sums, ones and zeros)

// The backward's hidden block: 32 columns (the forward's kHB), 16 at D = 128, where the
// layer-2 block [HB][D] and the layer-1 block [D][HB] keep one 16 x 16 tile per warp and the
// shared-memory plan fits C <= 32 (chunked_bwd.cu).
__host__ __device__ constexpr int bwd_hb(int D) { return D == 128 ? 16 : kHB; }

// row partials: one slot per 16-column tile of a C x HB block
__host__ __device__ constexpr int row_slots(int D) { return bwd_hb(D) / 16; }

// Per thread, the values of the end group's cluster sum (sum 4): q̄, k̄ (C x D tiles), z̄1 dz1^T
// and Ḡ's part (C x C tiles), 11 row and state sums. Its buffer spans the weight blocks and the
// block intermediates, all free by then.
__host__ __device__ constexpr int end_sum_floats(int D, int C) {
  return 2 * 8 * (((C / 16) * (D / 16) + kWarps - 1) / kWarps) +
         2 * 8 * (((C / 16) * (C / 16) + kWarps - 1) / kWarps) + 11;
}

__host__ __device__ inline BwdLayout make_bwd_layout(int D, int C) {
  BwdLayout l{};
  l.pq = C * (D + 8);
  l.pcc = C * (C + 8);
  const int hb = bwd_hb(D);
  l.pw1 = D * (hb + 8);
  l.pw2 = hb * (D + 8);
  l.ppr = l.pw1 > l.pw2 ? l.pw1 : l.pw2;
  l.pch = C * (hb + 8);
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += (bytes + 15) / 16 * 16;
    return here;
  };
  const size_t pair = 2 * sizeof(bf16);
  l.q = take(pair * l.pq);
  l.k = take(pair * l.pq);
  l.dz2 = take(pair * l.pq);
  l.zb2 = take(pair * l.pq);
  l.ga1 = take(pair * l.pcc);
  l.a2b = take(pair * l.pcc);
  l.w1 = take(pair * l.pw1);
  l.s1 = take(pair * l.pw1);
  l.w2 = take(pair * l.pw2);
  l.s2 = take(pair * l.pw2);
  // G and N (fp32 [C][C + 4] each) alias the weight blocks: at D = 32, C = 64 those are smaller
  auto at_least = [&](size_t from, size_t bytes) {
    if (at < from + bytes) at = (from + bytes + 15) / 16 * 16;
  };
  at_least(l.w1, sizeof(float) * 2 * size_t(C) * (C + 4));
  l.pw = take(pair * l.ppr);
  l.ps = take(pair * l.ppr);
  l.hk1 = take(pair * l.pch);
  l.dz1 = take(pair * l.pch);
  l.h1 = take(pair * l.pch);
  l.zb1 = take(pair * l.pch);
  // the row-mode buffer and Ḡ alias the block intermediates, the end group's sum (sum 4) the
  // weight blocks and block intermediates together (aliases_fit): small D and C need padding
  at_least(l.hk1, sizeof(float) * (size_t(C) * (D + 4) + size_t(C) * (C + 4)));
  at_least(l.w1, sizeof(float) * size_t(end_sum_floats(D, C)) * kThreads);
  l.vec = take(sizeof(float) * (size_t(kVecs) * C + size_t(4) * row_slots(D) * C + 4 * kWarps));
  l.total = at;
  return l;
}

// What aliases what: the row-mode buffer [C][D+4] and Ḡ [C][C+4] (fp32) over the block
// intermediates; G and N [C][C+4] (fp32) over the weight blocks.
__host__ __device__ inline bool aliases_fit(const BwdLayout& l, int D, int C) {
  const size_t f = sizeof(float);
  return l.vec - l.hk1 >= f * (size_t(C) * (D + 4) + size_t(C) * (C + 4)) &&
         l.pw - l.w1 >= f * 2 * size_t(C) * (C + 4) &&
         l.vec - l.w1 >= f * size_t(end_sum_floats(D, C)) * kThreads;
}

// Per (sequence, head): the keys' pre-activations and adjoints of every hidden block (each CTA
// of a cluster writes its own blocks), then one copy per cluster rank of the keys' head (e,
// xhat, rstd; every CTA computes the head).
__host__ __device__ inline size_t head_floats(int D, int C) { return size_t(2) * C * D + C; }
__host__ __device__ inline size_t scratch_floats(int D, int hidden, int C) {
  return size_t(2) * C * hidden + chunked::kMaxSplit * head_floats(D, C);
}

// Sums this thread's values over the CTAs of the group in rank order, so that every receiving
// CTA holds the same bits. `smem_buf` (NF * kThreads floats of shared memory, free on entry in
// every CTA and again on return) carries the parts of a cluster; a GlobalGroup publishes in its
// own global buffers instead. Every thread of every CTA calls it.
template <typename Group, int NF>
__device__ __forceinline__ void cluster_sum(Group& grp, int split, float (&v)[NF],
                                            float* smem_buf, bool receive) {
  const int tid = threadIdx.x;
  float* buf = grp.publish(smem_buf);
#pragma unroll
  for (int k = 0; k < NF; ++k) buf[k * kThreads + tid] = v[k];
  grp.sync();
  if (receive) {
#pragma unroll
    for (int k = 0; k < NF; ++k) v[k] = 0.f;
    for (int r = 0; r < split; ++r) {
      const float* rb = grp.remote(static_cast<const float*>(buf), r);
#pragma unroll
      for (int k = 0; k < NF; ++k) v[k] += grp.load(rb + k * kThreads + tid);
    }
  }
  grp.done();
}
// The same for an array of tiles.
template <typename Group, int N>
__device__ __forceinline__ void cluster_sum(Group& grp, int split, float (&a)[N][2][4],
                                            float* smem_buf, bool receive) {
  float v[N * 8];
#pragma unroll
  for (int k = 0; k < N * 8; ++k) v[k] = a[k / 8][(k / 4) % 2][k % 4];
  cluster_sum(grp, split, v, smem_buf, receive);
#pragma unroll
  for (int k = 0; k < N * 8; ++k) a[k / 8][(k / 4) % 2][k % 4] = v[k];
}
// Sum 4 in one publish and one barrier round (not three sums): qb, kb (CD tiles), mm1, gpart
// (CC tiles) and rs[11], in that order, through `smem_buf` (end_sum_floats * kThreads floats)
// or the group's buffers; the same rank-order sums as cluster_sum, into the receiving CTA only.
template <typename Group, int ND, int NC>
__device__ __forceinline__ void cluster_sum_end(Group& grp, int split, float (&qb)[ND][2][4],
                                                float (&kb)[ND][2][4], float (&mm1)[NC][2][4],
                                                float (&gp)[NC][2][4], float (&rs)[11],
                                                float* smem_buf, bool receive) {
  const int tid = threadIdx.x;
  auto each = [&](auto&& f) {
    int k = 0;
#pragma unroll
    for (int i = 0; i < ND * 8; ++i) f(qb[i / 8][(i / 4) % 2][i % 4], k++);
#pragma unroll
    for (int i = 0; i < ND * 8; ++i) f(kb[i / 8][(i / 4) % 2][i % 4], k++);
#pragma unroll
    for (int i = 0; i < NC * 8; ++i) f(mm1[i / 8][(i / 4) % 2][i % 4], k++);
#pragma unroll
    for (int i = 0; i < NC * 8; ++i) f(gp[i / 8][(i / 4) % 2][i % 4], k++);
#pragma unroll
    for (int i = 0; i < 11; ++i) f(rs[i], k++);
  };
  float* buf = grp.publish(smem_buf);
  each([&](float& v, int k) { buf[k * kThreads + tid] = v; });
  grp.sync();
  if (receive) {
    each([&](float& v, int) { v = 0.f; });
    for (int r = 0; r < split; ++r) {
      const float* rb = grp.remote(static_cast<const float*>(buf), r);
      each([&](float& v, int k) { v += grp.load(rb + k * kThreads + tid); });
    }
  }
  grp.done();
}

// The kernel's instances: one CTA per (sequence, head), a cluster of `split` CTAs (sm_90+),
// or `split` ordinary CTAs of a cooperative launch exchanging through global memory (any
// architecture: splits whose clusters would not all be resident at once). With a split, CTA r
// owns the hidden blocks b with b % split == r, as the forward; the one-CTA instance compiles
// the group code out.
enum Mode : int { kOne = 0, kClusterSplit = 1, kGlobalSplit = 2 };

// A GlobalGroup's buffer: the largest sum (sum 4) of every thread.
__host__ __device__ constexpr int64_t exchange_buffer_floats(int D, int C) {
  return int64_t(end_sum_floats(D, C)) * kThreads;
}

// kSub: the instance that walks sub-chunks (chunked_bwd.h, sub > 1); the others are compiled
// with R = 1, the code they had before sub-chunks (their spills move with any change).
template <typename TIn, int D, int C, int kMode, bool kSub = false>
__global__ void __launch_bounds__(kThreads, 1) bwd_kernel(const NeuralMemoryBwdParams bp) {
  const NeuralMemoryParams& p = bp.f;
  constexpr int HB = bwd_hb(D);
  using CD = TileMap<C, D>;
  using CC = TileMap<C, C>;
  using CH = TileMap<C, HB>;
  using HD = TileMap<HB, D>;
  using DH = TileMap<D, HB>;
  static_assert(CH::kIt == 1 && HD::kIt == 1 && DH::kIt == 1, "one block tile per warp");
  constexpr int kTPR = kThreads / C;  // row mode: threads per row
  constexpr int kCPT = D / kTPR;      // and columns per thread
  static_assert(kCPT % 2 == 0 && kTPR <= 32, "row mode");
  // bf16 inputs are exact in bf16: the lo planes of s_q and s_k are zero (mma_tile's kAHi)
  constexpr bool kX = std::is_same<TIn, bf16>::value;
  constexpr int kSlots = row_slots(D);
  constexpr int kLdF = D + 4, kLdC = C + 4;
  const int hidden = p.hidden, n_blocks = hidden / HB;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BwdLayout lay = make_bwd_layout(D, C);
  auto planes = [&](size_t off, int plane, int ld) {
    return Planes{reinterpret_cast<bf16*>(smem_raw + off), plane, ld};
  };
  const Planes s_q = planes(lay.q, lay.pq, D + 8);
  const Planes s_k = planes(lay.k, lay.pq, D + 8);
  const Planes s_dz2 = planes(lay.dz2, lay.pq, D + 8);
  const Planes s_zb2 = planes(lay.zb2, lay.pq, D + 8);  // z̄2; f̄ from sync 3 on
  const Planes s_ga1 = planes(lay.ga1, lay.pcc, C + 8);  // -G * (q k^T)
  const Planes s_a2b = planes(lay.a2b, lay.pcc, C + 8);  // -G * P, a2_bar, a1_bar in turn
  const Planes s_w1 = planes(lay.w1, lay.pw1, HB + 8);   // layer-1 blocks [D][HB]
  const Planes s_s1 = planes(lay.s1, lay.pw1, HB + 8);
  const Planes s_w2 = planes(lay.w2, lay.pw2, D + 8);    // layer-2 blocks [HB][D]
  const Planes s_s2 = planes(lay.s2, lay.pw2, D + 8);
  const Planes s_pw1 = planes(lay.pw, lay.ppr, HB + 8);  // W̄'/S̄' blocks, or Wg's at chunk 0
  const Planes s_ps1 = planes(lay.ps, lay.ppr, HB + 8);
  const Planes s_pw2 = planes(lay.pw, lay.ppr, D + 8);
  const Planes s_ps2 = planes(lay.ps, lay.ppr, D + 8);
  const Planes s_hk1 = planes(lay.hk1, lay.pch, HB + 8);  // [C][HB] block intermediates
  const Planes s_dz1 = planes(lay.dz1, lay.pch, HB + 8);
  const Planes s_h1 = planes(lay.h1, lay.pch, HB + 8);    // h1, then u_bar
  const Planes s_zb1 = planes(lay.zb1, lay.pch, HB + 8);  // z̄1, then zk1_bar
  float* f_row = reinterpret_cast<float*>(smem_raw + lay.hk1);  // [C][D + 4]
  float* f_gbar = f_row + C * kLdF;                              // [C][C + 4]
  float* f_g = reinterpret_cast<float*>(smem_raw + lay.w1);      // [C][C + 4]
  float* f_n = f_g + C * kLdC;
  float* v_theta = reinterpret_cast<float*>(smem_raw + lay.vec);
  float* v_a = v_theta + C;
  float* v_eta = v_a + C;
  float* v_act = v_eta + C;
  float* v_m = v_act + C;
  float* v_beta = v_m + C;
  float* v_c = v_beta + C;
  float* v_gneg = v_c + C;
  float* v_nneg = v_gneg + C;
  float* v_bb = v_nneg + C;  // row totals: beta-bar, c-bar, G-bar and N-bar of the last row
  float* v_cb = v_bb + C;
  float* v_gl = v_cb + C;
  float* v_nl = v_gl + C;
  float* v_abar = v_nl + C;  // the scalar recurrences' parts of a-bar and eta-bar
  float* v_ebar = v_abar + C;
  float* v_thbar = v_ebar + C;
  float* v_one = v_thbar + C;  // 1 and 0 per row: read "chunk"'s row scales (below)
  float* v_zero = v_one + C;
  float* v_rp = v_theta + kVecs * C;     // [4][kSlots][C] row partials
  float* v_red = v_rp + 4 * kSlots * C;  // [kWarps][4] (frobenius partials)

  constexpr bool kCluster = kMode != kOne;  // split over CTAs (a cluster or a global group)
  // The products' k steps unrolled, or rolled (kR). The kernel is ~300 KB of SASS, beyond
  // the instruction caches, and at one or two hidden blocks per CTA (the global splits)
  // instruction fetch stalls lead; rolled k steps shrink it and spill less. Measured (H100,
  // long shape, split -8): 105.1 -> 101.1 ms forward+backward; at split 1 (B = 8) the same
  // change cost 18.1 -> 19.0 ms, so the one-CTA and cluster instances stay unrolled.
  constexpr bool kR = kMode == kGlobalSplit;
  // The group recompute's state update with its row scales put on dz1 / dz2 where those are
  // made (block_errors_scaled, the keys' head) instead of re-split from A at every k step
  // (state_update_tile's cols2). Measured (H200, 2026-11-28, docs/perf_notes.md v32): the
  // one-CTA instance -1.3% forward+backward at B = 8; the global split of the long shape +1.4%
  // (ptxas: its spills 512 / 832 -> 700 / 984 B), so the split instances keep cols2.
  constexpr bool kPreScaled = kMode == kOne;
  const int split = kCluster ? p.split : 1;
  const int rank = kCluster ? int(blockIdx.x) % split : 0;
  const int h = kCluster ? int(blockIdx.x) / split : int(blockIdx.x), n = blockIdx.y;
  using Group = std::conditional_t<kMode == kGlobalSplit, GlobalGroup, ClusterGroup>;
  Group grp{};
  if constexpr (kMode == kGlobalSplit) {  // this CTA's exchange buffers and the group's counter
    grp = GlobalGroup::make(bp.exchange, bp.arrivals, int64_t(n) * p.heads + h, split, rank,
                            split, exchange_buffer_floats(D, C));
  }
  const bool lead = rank == 0;  // stores what every CTA computes (dq, dk, dv, gates, LN)
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const chunked::SeqRows seq = chunked::seq_rows(p, n, h);
  const int64_t start = seq.start, len = seq.len, row_base = seq.row_base;
  const bool packed = p.cu_seqlens != nullptr;  // (the prefetch builds its rows itself, below)
  const Rows rq = seq.q, rk = seq.k, rv = seq.v;
  const Rows ro{0, row_base, int64_t(p.heads) * D, int64_t(h) * D};  // o_bar, dq, dk, dv
  const TIn* __restrict__ gq = static_cast<const TIn*>(p.q);
  const TIn* __restrict__ gk = static_cast<const TIn*>(p.k);
  const TIn* __restrict__ gv = static_cast<const TIn*>(p.v);
  const TIn* __restrict__ gob = static_cast<const TIn*>(bp.o_bar);
  const float* __restrict__ gz2 = p.read_z2;  // the forward's z2 (read "token")
  const float* __restrict__ gfk = p.keys_fk;  // and its keys' fk
  TIn* __restrict__ gdq = static_cast<TIn*>(bp.dq);
  TIn* __restrict__ gdk = static_cast<TIn*>(bp.dk);
  TIn* __restrict__ gdv = static_cast<TIn*>(bp.dv);

  const int off = p.offset != nullptr ? int(p.offset[n]) : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;

  const int64_t size[2] = {int64_t(D) * hidden, int64_t(hidden) * D};
  const int64_t nh = int64_t(n) * p.heads + h;
  const float* w_src[2];
  const float* cw_src[2];
  const float* cwb[2];
  float *wbar[2], *sbar[2], *wg0[2];
  // sub-chunks (chunked_bwd.h): R per call chunk, each taking its gradient at the weights of
  // its call chunk's start (sub-chunk j - j % R's start state); R = 1: every chunk its own
  const int R = kSub && p.sub > 1 ? p.sub : 1;
#pragma unroll
  for (int l = 0; l < 2; ++l) {
    w_src[l] = p.w_in[l] + n * p.w_in_n_stride[l] + h * p.w_in_h_stride[l];
    cw_src[l] = p.cw_in[l] != nullptr && off > 0 ? p.cw_in[l] + nh * size[l] : w_src[l];
    cwb[l] = bp.cw_bar[l] != nullptr ? bp.cw_bar[l] + nh * size[l] : nullptr;
    wbar[l] = bp.w_bar[l] + nh * size[l];
    sbar[l] = bp.s_bar[l] + nh * size[l];
    wg0[l] = bp.wg0_bar[l] + nh * size[l];
  }
  float* scr = bp.scratch + nh * int64_t(scratch_floats(D, hidden, C));
  float* scr_zk = scr;                           // [block][C][HB]
  float* scr_zb = scr_zk + int64_t(C) * hidden;  // [block][C][HB]
  float* scr_e = scr_zb + int64_t(C) * hidden + rank * head_floats(D, C);
  float* scr_xh = scr_e + C * D;
  float* scr_rstd = scr_xh + C * D;
  float* dlnw = bp.dln_w != nullptr ? bp.dln_w + nh * C * D : nullptr;
  float* dlnb = bp.dln_b != nullptr ? bp.dln_b + nh * C * D : nullptr;
  const float* gamma = p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr;
  const float* lbeta = gamma != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;
  const int act_kind = p.activation;
  // read "chunk" (SPEC §3: o_t = M_{W_c}(q_t), the chunk's gradient weights Wg) is read
  // "token" through Wg's blocks (staged where W0's go) with the row scales (beta, c) = (1, 0)
  // and without the dual form's couplings to G (A1, P): the read's row vectors v_rb / v_rc and
  // the factor rg = 0 on those couplings. Its W-part is W̄g's: the same buffer as W̄ where Wg is
  // this step's W0; elsewhere (the call's first chunk, later sub-chunks) C6 moves it to W̄g's
  // destination, wg0 or the carry (beta_w, read_part_to_wg below).
  // (chunk_vjp_blocked.py: the same walk in PyTorch, tested against chunk_vjp.)
  auto rg = [&] { return p.read_chunk ? 0.f : 1.f; };  // from the parameters at each use
  auto v_rb = [&] { return p.read_chunk ? v_one : v_beta; };
  auto v_rc = [&] { return p.read_chunk ? v_zero : v_c; };

  // the elements of layer l's matrices this CTA owns: layer 1 columns, layer 2 rows, of its
  // hidden blocks
  auto owned = [=](int l, int64_t e) {
    if (!kCluster) return true;
    const int64_t blk = (l == 0 ? e % hidden : e / D) / HB;
    return int(blk % split) == rank;
  };
  if (n_chunks == 0) {  // no tokens: W̄, S̄ pass through; the owed chunk weights' cotangent
#pragma unroll
    for (int l = 0; l < 2; ++l)
      for (int64_t i = tid; i < size[l]; i += kThreads)
        if (owned(l, i)) wg0[l][i] = cwb[l] != nullptr ? __ldcg(cwb[l] + i) : 0.f;
    return;
  }

  // row mode: this thread's row and first column
  const int rr = tid / kTPR, rc0 = (tid % kTPR) * kCPT;
  // the block tile of this warp (C x HB, HB x D, D x HB maps)
  const bool ch_ok = CH::ok(0, warp), hd_ok = HD::ok(0, warp), dh_ok = DH::ok(0, warp);
  const int chm = CH::m0(0, warp), chn = CH::n0(0, warp);
  const int hdm = HD::m0(0, warp), hdn = HD::n0(0, warp);
  const int dhm = DH::m0(0, warp), dhn = DH::n0(0, warp);

  // Checkpoints every K chunks: on entering a group (walking down), the start states of its
  // chunks past the first are recomputed from the checkpoint into the ring (the forward's keys
  // pass and state update, no read), then the group's chunks are taken in reverse.
  const int K = p.ckpt_every > 1 ? p.ckpt_every : 1;
  if (tid < C) {  // the first chunk's load barrier publishes them
    v_one[tid] = 1.f;
    v_zero[tid] = 0.f;
  }
  const int64_t ring_slot = 2 * (size[0] + size[1]);  // W1, W2, S1, S2
  float* ring = bp.ring != nullptr ? bp.ring + nh * (K - 1) * ring_slot : nullptr;
  for (int jb = n_chunks - 1; jb >= 0; --jb) {
   const int g0 = jb - jb % K;
   const int group_last = min(g0 + K - 1, n_chunks - 1);
   for (int j = jb == group_last ? g0 : jb; j <= jb; ++j) {
    const bool recompute = j < jb;  // this step only makes chunk j + 1's start state
    const float *w0[2], *s0[2], *wg[2];
    if (j == g0) {
      const int64_t slot = (int64_t(j / K) * p.n_seq + n) * p.heads + h;
#pragma unroll
      for (int l = 0; l < 2; ++l) {
        w0[l] = bp.ckpt_w[l] + slot * size[l];
        s0[l] = bp.ckpt_s[l] + slot * size[l];
      }
    } else {
      const float* base = ring + (j - g0 - 1) * ring_slot;
      w0[0] = base;
      w0[1] = base + size[0];
      s0[0] = base + size[0] + size[1];
      s0[1] = s0[0] + size[0];
    }
    // The gradient weights Wg: the call's first chunk (sub-chunks j < R) takes cw_src (W0 or
    // the initial state's open chunk's weights); later ones the start state of their call
    // chunk's first sub-chunk j - j % R, in the group since K is a multiple of R (the
    // checkpoint or a ring slot). W̄g goes apart from W̄ where Wg is not this step's W0 (as
    // a tensor): into wg0 (the call's first chunk) or the carry (later sub-chunks, added to
    // W̄ at their chunk's first sub-chunk); the first of them the walk meets writes it, the
    // others add to it.
    const int jg = j - j % R;  // the sub-chunk whose start state is Wg (j >= R)
    const bool g_is_w = j % R == 0 && (j >= R || cw_src[0] == w_src[0]);
    const bool apart = j < R || j % R != 0;
    // the first to write W̄g apart
    const bool wg_first = !kSub || j == min(jg + R - 1, n_chunks - 1);
    float* const wgc[2] = {kSub ? bp.wg_carry[0] + nh * size[0] : nullptr,
                           kSub ? bp.wg_carry[1] + nh * size[1] : nullptr};
    float* const* wg_dst = j < R ? wg0 : j % R != 0 ? wgc : wbar;  // where W̄g goes
    if (j < R) {
#pragma unroll
      for (int l = 0; l < 2; ++l) wg[l] = cw_src[l];
    } else if (jg == j) {
#pragma unroll
      for (int l = 0; l < 2; ++l) wg[l] = w0[l];
    } else if (jg == g0) {
      const int64_t slot = (int64_t(jg / K) * p.n_seq + n) * p.heads + h;
#pragma unroll
      for (int l = 0; l < 2; ++l) wg[l] = bp.ckpt_w[l] + slot * size[l];
    } else {
      const float* base = ring + (jg - g0 - 1) * ring_slot;
      wg[0] = base;
      wg[1] = base + size[0];
    }
    const Planes s_g1 = g_is_w ? s_w1 : s_pw1, s_g2 = g_is_w ? s_w2 : s_ps2;
    const int64_t t0 = int64_t(j) * C - off;

    // ---- load ----
    __syncthreads();  // the previous chunk is done with shared memory
    chunked::load_chunk<TIn, D, C, kThreads, 8>(s_q, s_k, gq, gk, rq, rk, p, row_base, h, t0,
                                                len, v_theta, v_a, v_eta, v_act);
    // The next step's rows into L2 while this one computes (a hint): j + 1 within the group,
    // else the first step of jb - 1 (its group's first chunk when jb opens a group); with the
    // forward's fk (read by every step) and z2 (by a full step). The rows are built from the
    // parameters, the form that was timed (the same prefetch written with rq, rk, ... compiles
    // to other spills: not timed). Issued at pass D instead, closer to the next step's loads,
    // it spilled more and was slower (B = 8: 16.4 against 16.0 ms, docs/perf_notes.md v15).
    auto prefetch_next = [&](const NeuralMemoryParams& pp_, const NeuralMemoryBwdParams& bp_) {
      const int nx = j < jb ? j + 1 : jb == 0 ? -1 : jb % K == 0 ? (jb - 1) - (jb - 1) % K
                                                                 : jb - 1;
      if (nx < 0) return;
      const bool next_full = j < jb ? nx == jb : nx == jb - 1;
      const int64_t tn = int64_t(nx) * C - off;
      const Rows r_q{packed ? 0 : n * pp_.q_n_stride, start, pp_.q_t_stride, h * pp_.q_h_stride};
      const Rows r_k{packed ? 0 : n * pp_.k_n_stride, start, pp_.k_t_stride, h * pp_.k_h_stride};
      const Rows r_v{packed ? 0 : n * pp_.v_n_stride, start, pp_.v_t_stride, h * pp_.v_h_stride};
      const Rows r_o{0, row_base, int64_t(pp_.heads) * D, int64_t(h) * D};
      chunked::prefetch_chunk<TIn, D, C, kThreads>(
          static_cast<const TIn*>(pp_.q), r_q, static_cast<const TIn*>(pp_.k), r_k,
          static_cast<const TIn*>(pp_.v), r_v, static_cast<const TIn*>(bp_.o_bar), r_o, pp_,
          row_base, h, tn, len);
      // the forward's fk (every step) and z2 (when the next step is a full one)
      prefetch_rows_f32<D, C>(pp_.keys_fk, next_full ? pp_.read_z2 : nullptr, r_o, tn, len);
    };
    prefetch_next(p, bp);
    __syncthreads();
    if (tid < C) {  // column tid of G
      const float2 last = chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, f_g, nullptr,
                                                  kLdC);
      v_gneg[tid] = -last.x;
      v_nneg[tid] = -last.y;
    } else if (tid == kThreads - 1) {
      chunked::gate_scalars<C>(v_a, v_eta, v_act, v_m, v_beta, v_c);
    }
    __syncthreads();
    // G on this warp's C x C tiles: the one-CTA instance reads it from f_g where it is needed
    // (here, for a2_bar below, after pass C and at the end, each time from the gates again)
    // rather than holding 16 registers across the passes (fewer spills: B = 8 forward+backward
    // went from 4.5% slower than main's to 0.5% faster, each beside main on its H100,
    // docs/perf_notes.md v15). The split instances keep it in registers (greg): with two more
    // gate_column recurrences and barriers per chunk they were 0.4-0.5% slower, near the noise.
    constexpr bool kGreg = kMode != kOne;
    float greg[kGreg ? CC::kIt : 1][2][4];
    auto g_at = [&](int i, int m0, int n0, int t, int e) {
      if constexpr (kGreg) {
        return greg[i][t][e];
      } else {
        return f_g[trow(m0, e, lane) * kLdC + tcol(n0, t, e, lane)];
      }
    };
#pragma unroll
    for (int i = 0; i < CC::kIt; ++i) {
      if (recompute || !CC::ok(i, warp)) continue;
      const int m0 = CC::m0(i, warp), n0 = CC::n0(i, warp);
      if constexpr (kGreg) {
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            greg[i][t][e] = f_g[trow(m0, e, lane) * kLdC + tcol(n0, t, e, lane)];
      }
      float a[2][4];
      zero(a);
      mma_tile<kR, D, false, false, kX, kX>(a, s_q, m0, s_k, n0, lane);  // q k^T
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[t][e] *= -rg() * g_at(i, m0, n0, t, e);
      put_tile(s_ga1, m0, n0, a, lane);
    }
    const float beta_c = v_beta[C - 1], c_c = v_c[C - 1], m_c = v_m[C - 1];
    // Where W̄g goes apart (the call's first chunk, where an open chunk makes Wg and W0 different
    // tensors, and sub-chunks past a call chunk's first) read "chunk"'s W-part belongs to W̄g
    // (wg_dst), not to W̄: C4 / C5 then leave beta_C W̄' out of the W̄ tiles (beta_w), which
    // hold the read's part alone until C6 moves it to W̄g's tile g and puts beta_C W̄' (W̄' is
    // still in wbar: C6 is the block's first write) in its place.
    auto beta_w = [&] { return p.read_chunk && apart ? 0.f : beta_c; };
    auto read_part_to_wg = [&](float (&aw)[2][4], float (&g)[2][4], const float* wb, int64_t ld,
                               int m0, int n0) {
      float wbv[2][4];
      load_tile_cg(wbv, wb, ld, m0, n0, lane);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          g[t][e] += aw[t][e];
          aw[t][e] = beta_c * wbv[t][e];
        }
    };

    // The keys' forward fk = sum_b phi(k Wg1_b) Wg2_b at the chunk's gradient weights comes from
    // the forward (params.h keys_fk) instead of a pass over the hidden blocks.
    // ---- head of the keys (row mode), from the forward's fk ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float f[kCPT], e[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) {
        float2 x = make_float2(0.f, 0.f);  // fk of a padding row: phi(0) W2 = 0
        if (active) x = load2(gfk + ro.at(t) + rc0 + c);
        f[c] = x.x;
        f[c + 1] = x.y;
      }
      float rstd = 1.f;
      if (gamma != nullptr) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) s += f[c];
        const float mean = row_reduce<kTPR>(s) * (1.f / D);
        float sq = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          f[c] -= mean;
          sq += f[c] * f[c];
        }
        rstd = rsqrtf(row_reduce<kTPR>(sq) * (1.f / D) + p.ln_eps);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) f[c] *= rstd;  // xhat
      }
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) {
        const int col = rc0 + c;
        float2 y = make_float2(f[c], f[c + 1]);
        if (gamma != nullptr) {
          y.x = y.x * __ldg(gamma + col) + (lbeta != nullptr ? __ldg(lbeta + col) : 0.f);
          y.y = y.y * __ldg(gamma + col + 1) + (lbeta != nullptr ? __ldg(lbeta + col + 1) : 0.f);
        }
        if (p.residual) {
          const float2 kv = s_k.get2(rr, col);
          y.x += kv.x;
          y.y += kv.y;
        }
        e[c] = e[c + 1] = 0.f;
        if (active) {
          const float2 vv = load2(gv + rv.at(t) + col);
          e[c] = 2.f * (y.x - vv.x);
          e[c + 1] = 2.f * (y.y - vv.y);
        }
      }
      float dz[kCPT];
      if (gamma != nullptr) {  // dz2 = J(gamma e)
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          dz[c] = e[c] * __ldg(gamma + rc0 + c);
          mg += dz[c];
          mgx += dz[c] * f[c];
        }
        mg = row_reduce<kTPR>(mg) * (1.f / D);
        mgx = row_reduce<kTPR>(mgx) * (1.f / D);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) dz[c] = rstd * (dz[c] - mg - f[c] * mgx);
      } else {
#pragma unroll
        for (int c = 0; c < kCPT; ++c) dz[c] = e[c];
      }
      if (kPreScaled && recompute) {  // dz2, and its rows scaled by gneg, nneg (s_q, s_zb2)
        const float gr = v_gneg[rr], nr = v_nneg[rr];
#pragma unroll
        for (int c = 0; c < kCPT; c += 2) {
          s_dz2.put2(rr, rc0 + c, dz[c], dz[c + 1]);
          s_q.put2(rr, rc0 + c, gr * dz[c], gr * dz[c + 1]);
          s_zb2.put2(rr, rc0 + c, nr * dz[c], nr * dz[c + 1]);
        }
      } else {
#pragma unroll
        for (int c = 0; c < kCPT; c += 2) {
          s_dz2.put2(rr, rc0 + c, dz[c], dz[c + 1]);
          *reinterpret_cast<float2*>(scr_e + rr * D + rc0 + c) = make_float2(e[c], e[c + 1]);
          *reinterpret_cast<float2*>(scr_xh + rr * D + rc0 + c) = make_float2(f[c], f[c + 1]);
        }
        if (tid % kTPR == 0) scr_rstd[rr] = rstd;
      }
    }

    if (recompute) {  // chunk j + 1's start state into the ring (the CTA's own blocks)
      float* base = ring + (j - g0) * ring_slot;
      float* const wn[2] = {base, base + size[0]};
      float* const sn[2] = {base + size[0] + size[1], base + 2 * size[0] + size[1]};
      for (int b = rank; b < n_blocks; b += split) {
        const int64_t c1 = b * HB, r2 = int64_t(b) * HB * D;
        __syncthreads();  // s_dz2 complete (first block); the previous block's operands are free
        stage<D, HB, kThreads>(s_w1, wg[0] + c1, hidden);
        stage<HB, D, kThreads>(s_w2, wg[1] + r2, D);
        __syncthreads();
        if constexpr (kPreScaled) {  // hk1; dz1 scaled by gneg, nneg into s_h1, s_zb1
          if (ch_ok) {
            block_errors_scaled<kR, D, kX>(s_k, s_w1, s_dz2, s_w2, s_hk1, s_h1, s_zb1, v_gneg,
                                           v_nneg, chm, chn, lane, act_kind);
          }
          __syncthreads();
          if (dh_ok) {
            state_update_tile_pre<kR, C, kX>(s_k, s_h1, s_zb1, w0[0] + c1, s0[0] + c1,
                                             wn[0] + c1, sn[0] + c1, hidden, dhm, dhn, lane,
                                             beta_c, c_c, m_c);
          }
          if (hd_ok) {
            state_update_tile_pre<kR, C, false>(s_hk1, s_q, s_zb2, w0[1] + r2, s0[1] + r2,
                                                wn[1] + r2, sn[1] + r2, D, hdm, hdn, lane,
                                                beta_c, c_c, m_c);
          }
        } else {
          if (ch_ok) {
            float z[2][4], u[2][4];
            block_errors<kR, D, kX>(z, u, s_k, s_w1, s_dz2, s_w2, s_hk1, s_dz1, chm, chn, lane,
                                    act_kind);
          }
          __syncthreads();
          if (dh_ok) {
            state_update_tile<kR, C>(s_k, s_dz1, v_gneg, v_nneg, w0[0] + c1, s0[0] + c1,
                                     wn[0] + c1, sn[0] + c1, hidden, dhm, dhn, lane, beta_c, c_c,
                                     m_c);
          }
          if (hd_ok) {
            state_update_tile<kR, C>(s_hk1, s_dz2, v_gneg, v_nneg, w0[1] + r2, s0[1] + r2,
                                     wn[1] + r2, sn[1] + r2, D, hdm, hdn, lane, beta_c, c_c, m_c);
          }
        }
      }
      continue;
    }

    // The read's z2 (summed over the hidden blocks, with (-G * P) dz2) comes from the forward
    // (params.h, read_z2) instead of a recompute pass; P enters below only through terms that
    // are summed over the group, so each CTA accumulates its own blocks' part in pass C. The
    // head of the read touches none of the head of the keys' buffers: no barrier between them.
    // ---- head of the read (row mode): z̄2 from dl/do and the forward's z2 ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float f[kCPT], ob[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) {
        float2 x = make_float2(0.f, 0.f), z = make_float2(0.f, 0.f);
        if (active) {
          x = load2(gob + ro.at(t) + rc0 + c);
          z = load2(gz2 + ro.at(t) + rc0 + c);
        }
        ob[c] = x.x;
        ob[c + 1] = x.y;
        f[c] = z.x;
        f[c + 1] = z.y;
      }
      float zb[kCPT];
      if (gamma != nullptr) {
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) s += f[c];
        const float mean = row_reduce<kTPR>(s) * (1.f / D);
        float sq = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          f[c] -= mean;
          sq += f[c] * f[c];
        }
        const float rstd = rsqrtf(row_reduce<kTPR>(sq) * (1.f / D) + p.ln_eps);
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          f[c] *= rstd;
          zb[c] = ob[c] * __ldg(gamma + rc0 + c);
          mg += zb[c];
          mgx += zb[c] * f[c];
        }
        mg = row_reduce<kTPR>(mg) * (1.f / D);
        mgx = row_reduce<kTPR>(mgx) * (1.f / D);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          zb[c] = rstd * (zb[c] - mg - f[c] * mgx);
          f[c] *= ob[c];  // gamma-bar's row
        }
        if (lead) {
          add_row(dlnw + rr * D + rc0, f);
          if (dlnb != nullptr) add_row(dlnb + rr * D + rc0, ob);
        }
      } else {
#pragma unroll
        for (int c = 0; c < kCPT; ++c) zb[c] = ob[c];
      }
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) s_zb2.put2(rr, rc0 + c, zb[c], zb[c + 1]);
    }
    __syncthreads();

    // ---- mm2 = -z̄2 dz2^T: a2_bar = mm2 * G (mm2 * P and (-G * P)^T z̄2 after pass C) ----
    float dzb[CD::kIt][2][4];
    zero(dzb);
    float pp[CC::kIt][2][4];  // a2_bar, then P = h1 hk1^T over this CTA's blocks
#pragma unroll
    for (int i = 0; i < CC::kIt; ++i) {
      if (!CC::ok(i, warp)) continue;
      float mm[2][4];
      zero(mm);
      mma_tile<kR, D, false, false>(mm, s_zb2, CC::m0(i, warp), s_dz2, CC::n0(i, warp), lane);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          pp[i][t][e] = -rg() * mm[t][e] * g_at(i, CC::m0(i, warp), CC::n0(i, warp), t, e);
      put_tile(s_a2b, CC::m0(i, warp), CC::n0(i, warp), pp[i], lane);
    }
    zero(pp);

    // ---- pass C ----
    float qb[CD::kIt][2][4], kb[CD::kIt][2][4], mm1[CC::kIt][2][4];  // mm1: sum z̄1 dz1^T
    zero(qb);
    zero(kb);
    zero(mm1);
    // beta-bar, c-bar, -G-bar, -N-bar row partials (rows lane/4, +8) at [2 q + half], then the
    // three Frobenius products of the state with its cotangents at [8..10]
    float rs[11] = {};
    for (int b = rank; b < n_blocks; b += split) {
      const int64_t c1 = b * HB, r2 = int64_t(b) * HB * D;  // block offsets, layers 1 and 2
      __syncthreads();  // a2_bar complete (b = 0); the previous block's operands are free
      // the read's weights: W0, or Wg for read "chunk" (the same but in an open chunk)
      stage<D, HB, kThreads>(s_w1, (p.read_chunk ? wg[0] : w0[0]) + c1, hidden);
      stage<D, HB, kThreads>(s_s1, s0[0] + c1, hidden);
      stage<HB, D, kThreads>(s_w2, (p.read_chunk ? wg[1] : w0[1]) + r2, D);
      stage<HB, D, kThreads>(s_s2, s0[1] + r2, D);
      if (g_is_w) {  // the layer-2 blocks of W̄', S̄' (C4) now: their buffers are free
        stage<HB, D, kThreads>(s_pw2, wbar[1] + r2, D);
        stage<HB, D, kThreads>(s_ps2, sbar[1] + r2, D);
      } else {  // Wg's blocks take them until C1 is done
        stage<D, HB, kThreads>(s_pw1, wg[0] + c1, hidden);
        stage<HB, D, kThreads>(s_ps2, wg[1] + r2, D);
      }
      __syncthreads();
      // C1: zk, u, hk1, dz1; then z1 (x = q W0_1, y = q S0_1), h1
      float zk[2][4], uu[2][4], z1[2][4], xq[2][4], yq[2][4];
      zero(zk);
      zero(uu);
      if (ch_ok) {
        block_errors<kR, D, kX>(zk, uu, s_k, s_g1, s_dz2, s_g2, s_hk1, s_dz1, chm, chn, lane,
                                act_kind);
      }
      __syncthreads();
      zero(xq);
      zero(yq);
      zero(z1);
      if (ch_ok) {
        mma_tile<kR, D, false, true, kX>(xq, s_q, chm, s_w1, chn, lane);
        mma_tile<kR, D, false, true, kX>(yq, s_q, chm, s_s1, chn, lane);
        mma_tile<kR, C, false, true>(z1, s_ga1, chm, s_dz1, chn, lane);
        float h1[2][4];
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = trow(chm, e, lane);
            z1[t][e] += v_rb()[row] * xq[t][e] + v_rc()[row] * yq[t][e];
            h1[t][e] = act3(z1[t][e], act_kind).f;
          }
        put_tile(s_h1, chm, chn, h1, lane);
      }
      if (!g_is_w) {  // C1 has read Wg's blocks
        stage<HB, D, kThreads>(s_pw2, wbar[1] + r2, D);
        stage<HB, D, kThreads>(s_ps2, sbar[1] + r2, D);
      }
      __syncthreads();
      // C2: the read's adjoint, layer 2 (h̄1 = beta z̄2 W0_2^T + c z̄2 S0_2^T + a2_bar hk1) and
      // layer 1's z̄1; W̄_2 += h1^T (beta z̄2), S̄_2 += h1^T (c z̄2)
      float aw2[2][4], as2[2][4], aw1[2][4], as1[2][4];
      zero(aw2);
      zero(as2);
      zero(aw1);
      zero(as1);
      if (ch_ok) {
        float X[2][4], Y[2][4], R[2][4];
        zero(X);
        zero(Y);
        zero(R);
        mma_tile<kR, D, false, false>(X, s_zb2, chm, s_w2, chn, lane);
        mma_tile<kR, D, false, false>(Y, s_zb2, chm, s_s2, chn, lane);
        mma_tile<kR, C, false, true>(R, s_a2b, chm, s_hk1, chn, lane);
        float zb1[2][4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = chm + lane / 4 + 8 * half;
          const float be = v_rb()[row], ce = v_rc()[row];
          float sb = 0.f, scb = 0.f;
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const Act a = act3(z1[t][e], act_kind);
              const float h1 = a.f;
              const float h1b = be * X[t][e] + ce * Y[t][e] + R[t][e];
              zb1[t][e] = h1b * a.d1;
              sb += h1 * X[t][e] + zb1[t][e] * xq[t][e];
              scb += h1 * Y[t][e] + zb1[t][e] * yq[t][e];
            }
          rs[0 + half] += rg() * sb;  // the read's beta-bar, c-bar
          rs[2 + half] += rg() * scb;
        }
        put_tile(s_zb1, chm, chn, zb1, lane);
      }
      if (hd_ok) {
        mma_tile_cols2<kR, C>(aw2, as2, s_h1, hdm, s_zb2, hdn, lane, v_rb(), v_rc());
      }
      __syncthreads();
      // C3: q̄ += (beta z̄1) W0_1^T + (c z̄1) S0_1^T; mm1 += z̄1 dz1^T; W̄_1 += q^T (beta z̄1),
      // S̄_1 += q^T (c z̄1); P += h1 hk1^T. C3 and C4 read disjoint inputs: one step
#pragma unroll
      for (int i = 0; i < CD::kIt; ++i) {
        if (!CD::ok(i, warp)) continue;
        const int m0 = CD::m0(i, warp), n0 = CD::n0(i, warp);
        mma_tile_rows2<kR, HB, false>(qb[i], s_zb1, m0, s_w1, s_s1, n0, lane, v_rb(), v_rc());
      }
#pragma unroll
      for (int i = 0; i < CC::kIt; ++i) {
        if (!CC::ok(i, warp)) continue;
        mma_tile<kR, HB, false, false>(mm1[i], s_zb1, CC::m0(i, warp), s_dz1, CC::n0(i, warp),
                                       lane);
        mma_tile<kR, HB, false, false>(pp[i], s_h1, CC::m0(i, warp), s_hk1, CC::n0(i, warp),
                                       lane);  // P += h1 hk1^T
      }
      if (dh_ok) {
        mma_tile_cols2<kR, C>(aw1, as1, s_q, dhm, s_zb1, dhn, lane, v_rb(), v_rc());
      }
      // C4: the state, layer 2
      float hkb[2][4];
      zero(hkb);
      if (ch_ok) {
        float X[2][4], Y[2][4];
        zero(X);
        zero(Y);
        mma_tile<kR, D, false, false>(X, s_dz2, chm, s_pw2, chn, lane);
        mma_tile<kR, D, false, false>(Y, s_dz2, chm, s_ps2, chn, lane);
        mma_tile<kR, C, true, true>(hkb, s_a2b, chm, s_h1, chn, lane);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = chm + lane / 4 + 8 * half;
          const float gn = v_gneg[row], nn = v_nneg[row];
          float sg = 0.f, sn = 0.f;
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const float hk = act3(zk[t][e], act_kind).f;
              hkb[t][e] += gn * X[t][e] + nn * Y[t][e];
              sg += hk * X[t][e];
              sn += hk * Y[t][e];
            }
          rs[4 + half] += sg;
          rs[6 + half] += sn;
        }
      }
#pragma unroll
      for (int i = 0; i < CD::kIt; ++i) {
        if (!CD::ok(i, warp)) continue;
        const int m0 = CD::m0(i, warp), n0 = CD::n0(i, warp);
        mma_tile_rows2<kR, HB, true>(dzb[i], s_hk1, m0, s_pw2, s_ps2, n0, lane, v_gneg, v_nneg);
      }
      if (hd_ok) {
        const float3 fro = state_cotangent_tile(aw2, as2, wbar[1] + r2, sbar[1] + r2, w0[1] + r2,
                                                s0[1] + r2, D, hdm, hdn, lane, beta_w(), c_c,
                                                m_c);
        rs[8] += fro.x;
        rs[9] += fro.y;
        rs[10] += fro.z;
      }
      __syncthreads();
      // the layer-1 blocks of W̄', S̄' over W0's and S0's (C3 has read them); C6's Wg2 (when
      // not W0's) over S̄'_2 (C4 has read it)
      stage<D, HB, kThreads>(s_w1, wbar[0] + c1, hidden);
      stage<D, HB, kThreads>(s_s1, sbar[0] + c1, hidden);
      if (!g_is_w) stage<HB, D, kThreads>(s_ps2, wg[1] + r2, D);
      __syncthreads();
      // C5: the state, layer 1; the errors' second-order adjoint
      if (ch_ok) {
        float X[2][4], Y[2][4], dzb1[2][4];
        zero(X);
        zero(Y);
        zero(dzb1);
        mma_tile<kR, D, false, true, kX>(X, s_k, chm, s_w1, chn, lane);
        mma_tile<kR, D, false, true, kX>(Y, s_k, chm, s_s1, chn, lane);
        mma_tile<kR, C, true, true>(dzb1, s_ga1, chm, s_zb1, chn, lane);
        float ub[2][4], Z[2][4];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = chm + lane / 4 + 8 * half;
          const float gn = v_gneg[row], nn = v_nneg[row];
          float sg = 0.f, sn = 0.f;
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const Act a = act3(zk[t][e], act_kind);
              const float d1 = a.d1;
              const float dz1 = uu[t][e] * d1;
              dzb1[t][e] += gn * X[t][e] + nn * Y[t][e];
              sg += dz1 * X[t][e];
              sn += dz1 * Y[t][e];
              ub[t][e] = dzb1[t][e] * d1;
              Z[t][e] = dzb1[t][e] * uu[t][e] * a.d2 + hkb[t][e] * d1;
            }
          rs[4 + half] += sg;
          rs[6 + half] += sn;
        }
        put_tile(s_h1, chm, chn, ub, lane);
        store_tile(scr_zk + int64_t(b) * C * HB, HB, chm, chn, zk, lane);
        store_tile(scr_zb + int64_t(b) * C * HB, HB, chm, chn, Z, lane);
      }
#pragma unroll
      for (int i = 0; i < CD::kIt; ++i) {
        if (!CD::ok(i, warp)) continue;
        const int m0 = CD::m0(i, warp), n0 = CD::n0(i, warp);
        mma_tile_rows2<kR, HB, false>(kb[i], s_dz1, m0, s_w1, s_s1, n0, lane, v_gneg, v_nneg);
      }
      if (dh_ok) {
        const float3 fro = state_cotangent_tile(aw1, as1, wbar[0] + c1, sbar[0] + c1, w0[0] + c1,
                                                s0[0] + c1, hidden, dhm, dhn, lane, beta_w(), c_c,
                                                m_c);
        rs[8] += fro.x;
        rs[9] += fro.y;
        rs[10] += fro.z;
      }
      __syncthreads();
      // C6: dz̄2 += ū Wg2; W̄g_2 = ū^T dz2; the block's W̄, S̄ written in place
#pragma unroll
      for (int i = 0; i < CD::kIt; ++i)
        if (CD::ok(i, warp))
          mma_tile<kR, HB, false, true>(dzb[i], s_h1, CD::m0(i, warp), s_g2, CD::n0(i, warp), lane);
      if (hd_ok) {
        float ag[2][4];
        zero(ag);
        mma_tile<kR, C, true, true>(ag, s_h1, hdm, s_dz2, hdn, lane);
        if (!apart) {
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) aw2[t][e] += ag[t][e];
        } else {
          if (p.read_chunk) read_part_to_wg(aw2, ag, wbar[1] + r2, D, hdm, hdn);
          if (!wg_first) {  // a later sub-chunk of this call chunk wrote it first (R > 1)
            float prev[2][4];
            load_tile_cg(prev, wg_dst[1] + r2, D, hdm, hdn, lane);
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) ag[t][e] += prev[t][e];
          }
          store_tile(wg_dst[1] + r2, D, hdm, hdn, ag, lane);
        }
        store_tile(wbar[1] + r2, D, hdm, hdn, aw2, lane);
        store_tile(sbar[1] + r2, D, hdm, hdn, as2, lane);
      }
      if (dh_ok) {
        if (apart && p.read_chunk) {  // W̄g_1 takes the read's part (pass D adds to it)
          float rp[2][4];
          zero(rp);
          // a later sub-chunk of this call chunk wrote it first (R > 1)
          if (!wg_first) load_tile_cg(rp, wg_dst[0] + c1, hidden, dhm, dhn, lane);
          read_part_to_wg(aw1, rp, wbar[0] + c1, hidden, dhm, dhn);
          store_tile(wg_dst[0] + c1, hidden, dhm, dhn, rp, lane);
        }
        store_tile(wbar[0] + c1, hidden, dhm, dhn, aw1, lane);
        store_tile(sbar[0] + c1, hidden, dhm, dhn, as1, lane);
      }
    }
    // the read's P terms of this CTA's blocks: Ḡ's part mm2 * P, dz̄2 += (-G * P)^T z̄2 (s_a2b
    // was last read in the last block's C4, before two barriers). mm2 is computed again rather
    // than kept from before pass C: its 16 registers would be live across the whole pass; G
    // likewise in the one-CTA instance, into f_g again (the blocks' buffers it spans are free
    // once every warp is here).
    if constexpr (!kGreg) {
      __syncthreads();
      if (tid < C) chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, f_g, nullptr, kLdC);
      __syncthreads();
    }
    float gpart[CC::kIt][2][4];
    zero(gpart);
#pragma unroll
    for (int i = 0; i < CC::kIt; ++i) {
      if (!CC::ok(i, warp)) continue;
      float mm[2][4];
      zero(mm);
      mma_tile<kR, D, false, false>(mm, s_zb2, CC::m0(i, warp), s_dz2, CC::n0(i, warp), lane);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          gpart[i][t][e] = -rg() * mm[t][e] * pp[i][t][e];
          pp[i][t][e] *= -rg() * g_at(i, CC::m0(i, warp), CC::n0(i, warp), t, e);
        }
      put_tile(s_a2b, CC::m0(i, warp), CC::n0(i, warp), pp[i], lane);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < CD::kIt; ++i)
      if (CD::ok(i, warp))
        mma_tile<kR, C, true, true>(dzb[i], s_a2b, CD::m0(i, warp), s_zb2, CD::n0(i, warp), lane);
    __syncthreads();
    if (kCluster) cluster_sum(grp, split, dzb, f_row, true);  // sum 3: dz̄2
#pragma unroll
    for (int i = 0; i < CD::kIt; ++i)
      if (CD::ok(i, warp)) store_tile(f_row, kLdF, CD::m0(i, warp), CD::n0(i, warp), dzb[i], lane);
    __syncthreads();

    // ---- sync 3 (row mode): LayerNorm double backward, the keys' head backward ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float top[kCPT], e[kCPT], xh[kCPT], dz[kCPT], fb[kCPT], yb[kCPT];
      const float rstd = scr_rstd[rr];
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) {
        top[c] = f_row[rr * kLdF + rc0 + c];
        top[c + 1] = f_row[rr * kLdF + rc0 + c + 1];
        const float2 ev = *reinterpret_cast<const float2*>(scr_e + rr * D + rc0 + c);
        const float2 xv = *reinterpret_cast<const float2*>(scr_xh + rr * D + rc0 + c);
        const float2 dv = s_dz2.get2(rr, rc0 + c);
        e[c] = ev.x;
        e[c + 1] = ev.y;
        xh[c] = xv.x;
        xh[c + 1] = xv.y;
        dz[c] = dv.x;
        dz[c + 1] = dv.y;
      }
      if (gamma != nullptr) {
        float mt = 0.f, mtx = 0.f, tdz = 0.f, s = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          mt += top[c];
          mtx += top[c] * xh[c];
          tdz += top[c] * dz[c];
          s += __ldg(gamma + rc0 + c) * e[c] * xh[c];
        }
        mt = row_reduce<kTPR>(mt) * (1.f / D);
        const float stx = row_reduce<kTPR>(mtx);
        mtx = stx * (1.f / D);
        tdz = row_reduce<kTPR>(tdz);
        s = row_reduce<kTPR>(s) * (1.f / D);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          const float je = rstd * (top[c] - mt - xh[c] * mtx);
          e[c] *= je;  // gamma-bar's row, first part
          fb[c] = -(rstd / D) * (xh[c] * tdz + dz[c] * stx) - rstd * s * je;
          yb[c] = 2.f * __ldg(gamma + rc0 + c) * je;  // ȳk = 2 ē
        }
        // f̄ += J(gamma ȳk); gamma-bar += ȳk xhat, beta-bar += ȳk
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          const float g = yb[c] * __ldg(gamma + rc0 + c);
          mg += g;
          mgx += g * xh[c];
        }
        mg = row_reduce<kTPR>(mg) * (1.f / D);
        mgx = row_reduce<kTPR>(mgx) * (1.f / D);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          fb[c] += rstd * (yb[c] * __ldg(gamma + rc0 + c) - mg - xh[c] * mgx);
          e[c] += yb[c] * xh[c];  // and its second
        }
        if (lead) {
          add_row(dlnw + rr * D + rc0, e);
          if (dlnb != nullptr) add_row(dlnb + rr * D + rc0, yb);
        }
      } else {
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          yb[c] = 2.f * top[c];
          fb[c] = yb[c];
        }
      }
#pragma unroll
      for (int c = 0; c < kCPT; c += 2) {
        s_zb2.put2(rr, rc0 + c, fb[c], fb[c + 1]);  // f̄
        f_row[rr * kLdF + rc0 + c] = p.residual && lead ? yb[c] : 0.f;
        f_row[rr * kLdF + rc0 + c + 1] = p.residual && lead ? yb[c + 1] : 0.f;
        if (active && lead) store2(gdv + ro.at(t) + rc0 + c, -yb[c], -yb[c + 1]);  // v̄ = -2 ē
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < CD::kIt; ++i) {  // k̄ += ȳk (residual)
      if (!CD::ok(i, warp)) continue;
      const int m0 = CD::m0(i, warp), n0 = CD::n0(i, warp);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          kb[i][t][e] += f_row[trow(m0, e, lane) * kLdF + tcol(n0, t, e, lane)];
    }

    // ---- pass D: the keys' forward adjoint ----
    for (int b = rank; b < n_blocks; b += split) {
      const int64_t c1 = b * HB, r2 = int64_t(b) * HB * D;
      __syncthreads();  // f_row read (b = 0); the previous block's operands are free
      // this block's fp32 tiles first (the stored Z, W̄g's two blocks): their latency overlaps
      // the staging's instead of following a barrier
      float zb[2][4], ag2[2][4], ag1[2][4];
      if (ch_ok) load_tile_cg(zb, scr_zb + int64_t(b) * C * HB, HB, chm, chn, lane);
      if (hd_ok) load_tile_cg(ag2, wg_dst[1] + r2, D, hdm, hdn, lane);
      if (dh_ok) {
        // (read "chunk" at j = 0: the read's part, C6; sub-chunks: an earlier visitor's part)
        if (!apart || !wg_first || p.read_chunk) {
          load_tile_cg(ag1, wg_dst[0] + c1, hidden, dhm, dhn, lane);
        } else {
          zero(ag1);
        }
      }
      stage<D, HB, kThreads>(s_w1, wg[0] + c1, hidden);
      stage<HB, D, kThreads>(s_w2, wg[1] + r2, D);
      float zk[2][4];
      zero(zk);
      if (ch_ok) {
        load_tile_cg(zk, scr_zk + int64_t(b) * C * HB, HB, chm, chn, lane);
        float hk[2][4];
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) hk[t][e] = act3(zk[t][e], act_kind).f;
        put_tile(s_hk1, chm, chn, hk, lane);
      }
      __syncthreads();
      if (ch_ok) {  // zk1_bar = Z + (f̄ Wg2^T) phi'(zk)
        float F[2][4];
        zero(F);
        mma_tile<kR, D, false, false>(F, s_zb2, chm, s_w2, chn, lane);
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            zb[t][e] += F[t][e] * act3(zk[t][e], act_kind).d1;
        put_tile(s_zb1, chm, chn, zb, lane);
      }
      if (hd_ok) {  // W̄g_2 += hk1^T f̄
        mma_tile<kR, C, true, true>(ag2, s_hk1, hdm, s_zb2, hdn, lane);
        store_tile(wg_dst[1] + r2, D, hdm, hdn, ag2, lane);
      }
      __syncthreads();
      if (dh_ok) {  // W̄g_1 += k^T zk1_bar
        mma_tile<kR, C, true, true, kX>(ag1, s_k, dhm, s_zb1, dhn, lane);
        store_tile(wg_dst[0] + c1, hidden, dhm, dhn, ag1, lane);
      }
#pragma unroll
      for (int i = 0; i < CD::kIt; ++i)
        if (CD::ok(i, warp))
          mma_tile<kR, HB, false, false>(kb[i], s_zb1, CD::m0(i, warp), s_w1, CD::n0(i, warp),
                                         lane);
    }
    __syncthreads();
    // the final chunk weights' cotangent owed to this chunk's Wg (the CTA's own blocks)
    if (j == n_chunks - 1) {
#pragma unroll
      for (int l = 0; l < 2; ++l)
        if (cwb[l] != nullptr)
          for (int64_t i = tid; i < size[l]; i += kThreads)
            if (owned(l, i)) wg_dst[l][i] += __ldcg(cwb[l] + i);
    }
    // a call chunk's first sub-chunk (past the call's first chunk): its later sub-chunks' W̄g,
    // which the carry holds, into W̄ (pass D's tiles are complete: the barrier above); where
    // the call ends in this sub-chunk no later one wrote the carry
    if (kSub && !apart && j + 1 < n_chunks) {
#pragma unroll
      for (int l = 0; l < 2; ++l)
        for (int64_t i = tid; i < size[l]; i += kThreads)
          if (owned(l, i)) wbar[l][i] += __ldcg(wgc[l] + i);
    }
    if (kCluster) {  // sum 4, to rank 0: q̄, k̄, z̄1 dz1^T, Ḡ's part, the row and state sums
      static_assert(2 * 8 * (CD::kIt + CC::kIt) + 11 == end_sum_floats(D, C), "sum 4's size");
      cluster_sum_end(grp, split, qb, kb, mm1, gpart, rs,
                      reinterpret_cast<float*>(smem_raw + lay.w1), lead);
      if (!lead) continue;
    }

    // ---- end: G, N columns for the gates' adjoint; a1_bar = mm1 * G, Ḡ; the row sums ----
    if constexpr (!kGreg) {  // G (for a1_bar) before it is read
      if (tid < C) chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, f_g, f_n, kLdC);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < CC::kIt; ++i) {
      if (!CC::ok(i, warp)) continue;
      const int m0 = CC::m0(i, warp), n0 = CC::n0(i, warp);
      float a1[2][4], ab[2][4];
      zero(a1);
      mma_tile<kR, D, false, false, kX, kX>(a1, s_q, m0, s_k, n0, lane);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float mm = -rg() * mm1[i][t][e];
          ab[t][e] = mm * g_at(i, m0, n0, t, e);
          f_gbar[trow(m0, e, lane) * kLdC + tcol(n0, t, e, lane)] =
              mm * a1[t][e] + gpart[i][t][e];
        }
      put_tile(s_a2b, m0, n0, ab, lane);
    }
    if (ch_ok) {
#pragma unroll
      for (int qq = 0; qq < 4; ++qq)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float v = mlp::quad_sum(rs[2 * qq + half]);
          if (lane % 4 == 0)
            v_rp[(qq * kSlots + chn / 16) * C + chm + lane / 4 + 8 * half] = qq >= 2 ? -v : v;
        }
    }
#pragma unroll
    for (int k3 = 0; k3 < 3; ++k3) {
      float v = rs[8 + k3];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) v_red[warp * 4 + k3] = v;
    }
    if constexpr (kGreg) {  // G, N columns for the gates' adjoint
      if (tid < C) chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, f_g, f_n, kLdC);
    }
    __syncthreads();
    // q̄ = beta z̄1 W0^T + c z̄1 S0^T + a1_bar k [+ dl/do]; k̄ += a1_bar^T q [+ ȳk]
#pragma unroll
    for (int i = 0; i < CD::kIt; ++i) {
      if (!CD::ok(i, warp)) continue;
      const int m0 = CD::m0(i, warp), n0 = CD::n0(i, warp);
      mma_tile<kR, C, false, true, false, kX>(qb[i], s_a2b, m0, s_k, n0, lane);
      mma_tile<kR, C, true, true, false, kX>(kb[i], s_a2b, m0, s_q, n0, lane);
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = m0 + lane / 4 + 8 * half, col = n0 + 8 * t + 2 * (lane % 4);
          const int64_t tok = t0 + row;
          if (tok < 0 || tok >= len) continue;
          float2 qv = make_float2(qb[i][t][2 * half], qb[i][t][2 * half + 1]);
          if (p.residual) {
            const float2 ob = load2(gob + ro.at(tok) + col);
            qv.x += ob.x;
            qv.y += ob.y;
          }
          store2(gdq + ro.at(tok) + col, qv.x, qv.y);
          store2(gdk + ro.at(tok) + col, kb[i][t][2 * half], kb[i][t][2 * half + 1]);
        }
    }
    if (tid < C) {
      float s4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int qq = 0; qq < 4; ++qq)
        for (int sl = 0; sl < kSlots; ++sl) s4[qq] += v_rp[(qq * kSlots + sl) * C + tid];
      v_bb[tid] = s4[0];
      v_cb[tid] = s4[1];
      v_gl[tid] = s4[2];
      v_nl[tid] = s4[3];
    }
    __syncthreads();
    // ---- the gates' adjoint: reverse-mode through the column recurrences ----
    gates_adjoint<C, kThreads, kWarps>(tid, kLdC, f_g, f_n, f_gbar, v_gl, v_nl, v_bb, v_cb,
                                       v_red, v_a, v_eta, v_act, v_m, v_beta, v_c, v_thbar,
                                       v_abar, v_ebar);
    __syncthreads();
    gates_adjoint_store<C>(tid, kLdC, f_g, f_n, v_thbar, v_abar, v_ebar, t0, len, row_base,
                           p.heads, h, bp.dlr, bp.dforget, bp.dmomentum);
   }
  }
}

template <typename TIn, int D, int C, bool kSub = false>
struct Kernels : SplitKernels<decltype(&bwd_kernel<TIn, D, C, kOne>)> {
  Kernels()
      : SplitKernels<decltype(&bwd_kernel<TIn, D, C, kOne>)>{
            bwd_kernel<TIn, D, C, kOne, kSub>, bwd_kernel<TIn, D, C, kClusterSplit, kSub>,
            bwd_kernel<TIn, D, C, kGlobalSplit, kSub>, kThreads, make_bwd_layout(D, C).total} {}
};

// The launcher's split for a request (chunked_bwd.h, neural_memory_chunked_bwd_plan), given
// the prepared kernels; 0 when the request cannot run here. `allow_global`: whether the
// launcher's choice may be a split over ordinary CTAs (launch.cuh, choose_split).
template <typename TIn, int D, int C, bool kSub>
int plan(const Kernels<TIn, D, C, kSub>& ks, int n_seq, int heads, int hidden, int split,
         bool allow_global = true) {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const int n_blocks = hidden / bwd_hb(D);
  const int64_t pairs = int64_t(n_seq) * heads;
  if (split == 0) {
    return choose_split(ks, n_blocks, pairs, chunked::kMaxSplit, major >= 9, allow_global);
  }
  const int s = split < 0 ? -split : split;
  if (s > chunked::kMaxSplit || s > n_blocks) return 0;
  if (split > 1 && major < 9) return 0;
  if (split < 0 && (s < 2 || pairs * s > resident_ctas(ks.global, kThreads, ks.smem))) return 0;
  return split;
}

template <typename TIn, int D, int C>
int plan(int n_seq, int heads, int hidden, int split) {
  const Kernels<TIn, D, C> ks;
  if (ks.prepare() != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return plan(ks, n_seq, heads, hidden, split);
}

// (The sub-chunk instances take the same resources as the others: the same plan.)
template <typename TIn, int D, int C, bool kSub = false>
cudaError_t launch(NeuralMemoryBwdParams p, cudaStream_t stream) {
  const Kernels<TIn, D, C, kSub> ks;
  const BwdLayout lay = make_bwd_layout(D, C);
  if (!aliases_fit(lay, D, C)) return cudaErrorInvalidValue;
  TITANS_RETURN_IF_ERROR(ks.prepare());
  const bool chosen = p.f.split == 0;
  const int split = plan(ks, p.f.n_seq, p.f.heads, p.f.hidden, p.f.split);
  if (split == 0) return cudaErrorInvalidValue;
  if (split < 0 && (p.exchange == nullptr || p.arrivals == nullptr)) return cudaErrorInvalidValue;
  auto run = [&](int split) -> cudaError_t {
    NeuralMemoryBwdParams q = p;
    q.f.split = split < 0 ? -split : split;
    return launch_split(ks, q, q.f.heads, q.f.n_seq, split, stream);
  };
  const cudaError_t err = run(split);
  // The launcher's global split sized itself by the device's SMs; where fewer are available
  // (MPS with a thread percentage, green contexts) the cooperative launch is refused: the
  // cluster choice then runs instead (the exchange goes unused).
  if (chosen && split < 0 && err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    const int fallback = plan(ks, p.f.n_seq, p.f.heads, p.f.hidden, 0, false);
    return fallback > 0 ? run(fallback) : err;
  }
  return err;
}

// The instances of one (dtype, D), one translation unit each (chunked_bwd_<dtype>_d<D>.cu):
// the chunks of neural_memory_chunked_bwd_supported.
// (D = 128: chunks 16 and 32 only, whose shared-memory plan fits; callers check
// neural_memory_chunked_bwd_supported first.)
template <typename TIn, int D>
cudaError_t launch_by_chunk(const NeuralMemoryBwdParams& p, cudaStream_t stream) {
  // sub-chunks (chunked_bwd.h): chunk 128 as 2 x 64 at D <= 64, chunks 64 and 128 as 2 or 4 x
  // 32 at D = 128, where the call's chunk has no instance (shared memory)
  if (p.f.sub > 1) {
    constexpr int kSubChunk = neural_memory_bwd_sub_chunk(D);
    if (p.f.chunk != kSubChunk) return cudaErrorInvalidValue;
    return launch<TIn, D, kSubChunk, true>(p, stream);
  }
  switch (p.f.chunk) {
    case 16: return launch<TIn, D, 16>(p, stream);
    case 32: return launch<TIn, D, 32>(p, stream);
    default:
      if constexpr (D == 128) return cudaErrorInvalidValue;
      else return launch<TIn, D, 64>(p, stream);
  }
}

template <typename TIn, int D>
int plan_by_chunk(int n_seq, int heads, int hidden, int chunk, int split) {
  switch (chunk) {
    case 16: return plan<TIn, D, 16>(n_seq, heads, hidden, split);
    case 32: return plan<TIn, D, 32>(n_seq, heads, hidden, split);
    default:
      if constexpr (D == 128) return 0;
      else return plan<TIn, D, 64>(n_seq, heads, hidden, split);
  }
}

#define TITANS_BWD_INSTANCES(EXTERN, TIn, D)                                                  \
  EXTERN template cudaError_t launch_by_chunk<TIn, D>(const NeuralMemoryBwdParams&,           \
                                                      cudaStream_t);                          \
  EXTERN template int plan_by_chunk<TIn, D>(int, int, int, int, int);
TITANS_BWD_INSTANCES(extern, __nv_bfloat16, 32)
TITANS_BWD_INSTANCES(extern, __nv_bfloat16, 64)
TITANS_BWD_INSTANCES(extern, __half, 32)
TITANS_BWD_INSTANCES(extern, __half, 64)
TITANS_BWD_INSTANCES(extern, __nv_bfloat16, 128)
TITANS_BWD_INSTANCES(extern, __half, 128)

}  // namespace chunked_bwd
}  // namespace titans
