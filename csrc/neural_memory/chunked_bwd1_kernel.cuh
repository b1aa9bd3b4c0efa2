// The fused backward of neural_memory_chunked (chunked_bwd.h) at depth 1 (M_W(x) = [x +]
// [LN](x W), W: D x D), either read: the kernel template and its launcher; chunked_bwd1.cu
// holds the instances (bf16 / fp16 / fp32 inputs, D 32 / 64 with chunk 16 / 32 / 64, D 128 with
// chunk 16 / 32).
//
// One CTA of 8 warps per (sequence, head) (or a cluster, below) walks the chunks last to
// first, the state's cotangents W̄, S̄ carried in place in the fp32 output tensors, each chunk's
// start state (W0, S0) read from the forward's checkpoint of that chunk (ckpt_every = 1: at
// depth 1 a state is D x D, so checkpoints at every chunk cost T / C * 2 D^2 floats per
// (sequence, head), less than depth 2's every fourth). Per chunk, chunk_vjp.chunk_step_vjp at
// L = 1 (notation of chunk_vjp.py; gneg = -G[C-1, :], nneg = -N[C-1, :]):
//
//   load      q, k rows (fp32), gates; W0, S0, W̄, S̄ (and Wg at an open chunk 0); G
//   keys      fk = k Wg; (row mode) e = 2 (y - v), dz = LNB(fk, e); e, xhat to scratch, rstd
//             to shared memory
//   read      token: z = beta (q W0) + c (q S0) - (G * q k^T) dz; chunk: z = q Wg;
//             (row mode) z̄ = the head's backward of dl/do at z
//   state     dz̄ = gneg (k W̄) + nneg (k S̄), Ḡ / N̄ last row, beta-bar / c-bar rows;
//             token: dz̄ -= (G * A)^T z̄, Ḡ = mm * A, a_bar = mm * G with mm = -z̄ dz^T
//   keys'     (row mode) LayerNorm double backward, dv, the keys' head backward: zk̄
//   end       q̄, k̄; W̄g = k^T zk̄ (+ q^T z̄ for read "chunk"), W̄0 = beta_C W̄ + q^T (beta z̄),
//             S̄0 = c_C W̄ + m_C S̄ + q^T (c z̄); the gates' adjoint (chunked_bwd_gates.cuh)
//
// Every product is fp32 on CUDA cores from shared memory (exact to fp32 rounding: no split
// operands): 256 threads as a 16 x 16 grid, thread (tr, tc) owning rows tr + 16 i and columns
// tc + 16 j of an output (one grid for every product of a shape, so sums over several
// products stay in its registers and row sums reduce over the 16 lanes of a half-warp); row
// strides of D + 1 and C + 1 floats keep the transposed reads free of bank conflicts. Row-wise
// work (the LayerNorm heads) runs in "row mode": 256 / C threads per row.
//
// Small batches (launch1): a (sequence, head) over a cluster of S = 2 or 4 CTAs (sm_90+), CTA r
// owning the output columns [r D / S, (r + 1) D / S) of W, S and their cotangents, and the
// same columns of every D-sided matrix of the chunk (fk, dz, z, z̄, dz̄, zk̄, e, ȳ). Without the
// LayerNorm the columns are independent. What crosses the cluster (Exchange: each CTA's part in
// its shared memory, a cluster barrier, every CTA adding the parts in rank order, so every CTA
// holds the same bits) is the heads' row sums (mean, variance, the J sums, the double
// backward's sums), the row dots of Ḡ / N̄'s last row and beta-bar / c-bar, mm (C x C), q̄ and
// k̄ (C x D, each CTA then writing its own columns of dq, dk) and the Frobenius sums. Every CTA
// computes A = q k^T and the gates' adjoint in full; rank 0 stores the gates' gradients.
//
// Sub-chunks (params.h sub = R > 1: chunk 128 at D <= 64 as 2 x 64, chunks 64 / 128 at D = 128
// as 32s): the walk is over sub-chunks, each with its own checkpoint (the forward kept every
// sub-chunk's start state), all of a call chunk's taking their gradients at, and for read
// "chunk" reading through, the call chunk's start weights Wg: cw_src in the call's first chunk,
// else the checkpoint of the call chunk's first sub-chunk. Where Wg is not the sub-chunk's W0,
// W̄g goes apart from W̄: to wg0 in the call's first chunk, else to the carry (wg_carry), which
// the call chunk's first sub-chunk adds to W̄. The first sub-chunk of a call chunk that the
// walk meets stores it, the others add to it (the same thread owns an element every step).
#pragma once

#include <type_traits>
#include <utility>

#include "chunked_bwd.h"
#include "chunked_bwd_gates.cuh"
#include "chunked_kernel.cuh"

namespace titans {
namespace chunked_bwd1 {

using chunked::Rows;
using chunked_bwd::gates_adjoint;
using chunked_bwd::gates_adjoint_store;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxSplit1 = 4;  // CTAs per (sequence, head) at most (a cluster)
constexpr int kSplit128 = 4;   // D = 128: always a cluster of 4 (32 columns of W per CTA)

// Shared memory in floats: q and k (C x D), three C x DS row matrices (this CTA's columns),
// five D x DS state matrices, three C x C gate matrices, the per-row vectors, the warps' partial
// sums and (S > 1) the cluster's two exchange buffers of xf floats.
struct Layout1 {
  int ld, ls, lc, q, k, dz, zb, t, w0, s0, wb, sb, wg, a, g, gb, vec, red, x, xf, total;
};
constexpr int kVecs1 = 17;
__host__ __device__ constexpr int max3(int a, int b, int c) {
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}
__host__ __device__ constexpr Layout1 make_layout1(int D, int C, int S = 1) {
  const int ds = D / S, ld = D + 1, ls = ds + 1, lc = C + 1;
  const int rm = C * ld, rs = C * ls, dm = D * ls, cm = C * lc;
  const int q = 0, k = q + rm, dz = k + rm, zb = dz + rs, t = zb + rs;
  const int w0 = t + rs, s0 = w0 + dm, wb = s0 + dm, sb = wb + dm, wg = sb + dm;
  const int a = wg + dm, g = a + cm, gb = g + cm, vec = gb + cm;
  const int red = vec + kVecs1 * C, x = red + 4 * kWarps;
  // the largest exchange: q̄ or k̄ (C x D), mm (C x C), five row vectors, the warps' partials
  const int xf = S > 1 ? max3(C * D, C * C, max3(5 * C, 4 * kWarps, 0)) : 0;
  return Layout1{ld, ls, lc, q, k, dz, zb, t, w0, s0, wb, sb, wg, a, g, gb, vec, red,
                 x, xf, x + 2 * xf};
}
__host__ __device__ constexpr size_t smem_bytes1(int D, int C, int S = 1) {
  return size_t(make_layout1(D, C, S).total) * sizeof(float);
}
// fp32 scratch per (sequence, head): e (then ȳ), xhat of the keys' head (each CTA of a
// cluster writes its columns)
__host__ __device__ constexpr size_t scratch_floats1(int D, int C) {
  return size_t(2) * C * D;
}

// One value of the input dtype (bf16, fp16 or fp32) as fp32, and back.
template <typename T>
__device__ __forceinline__ float ld1(const T* p) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(*p);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(*p);
  } else {
    return *p;
  }
}
template <typename T>
__device__ __forceinline__ void st1(T* p, float x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    *p = __float2bfloat16_rn(x);
  } else if constexpr (std::is_same<T, __half>::value) {
    *p = __float2half_rn(x);
  } else {
    *p = x;
  }
}

// acc[i][j] += sum_k a(tr + 16 i, k) b(k, tc + 16 j), k in [0, K) in order (deterministic).
template <int TM, int TN, int K, typename FA, typename FB>
__device__ __forceinline__ void gemm(float (&acc)[TM][TN], int tr, int tc, FA&& a, FB&& b) {
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = a(tr + 16 * i, k);
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = b(k, tc + 16 * j);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

template <int TM, int TN>
__device__ __forceinline__ void zero(float (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

// Sum over the 16 lanes of a half-warp (the threads of one tile row group tr).
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the kTPR consecutive lanes that share a row (row mode).
template <int kTPR>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = 1; o < kTPR; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A thread's tile (rows tr + 16 i, columns tc + 16 j) into a row-major matrix of stride ld.
template <int TM, int TN>
__device__ __forceinline__ void put(float* dst, int ld, int tr, int tc,
                                    const float (&acc)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) dst[(tr + 16 * i) * ld + tc + 16 * j] = acc[i][j];
}

// acc[i][j] += r1[m] h1[i][j] + r2[m] h2[i][j], m = tr + 16 i: two products joined with row
// scales (beta / c, gneg / nneg).
template <int TM, int TN>
__device__ __forceinline__ void add_row_scaled(float (&acc)[TM][TN], int tr,
                                               const float (&h1)[TM][TN],
                                               const float (&h2)[TM][TN], const float* r1,
                                               const float* r2) {
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = tr + 16 * i;
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] += r1[m] * h1[i][j] + r2[m] * h2[i][j];
  }
}

// acc += diag(r1) (a b1) + diag(r2) (a b2) over K, the two products in fp32 and scaled at the
// end (a read once per k for both).
template <int TM, int TN, int K, typename FA, typename FB1, typename FB2>
__device__ __forceinline__ void gemm_row_scaled_pair(float (&acc)[TM][TN], int tr, int tc,
                                                     FA&& a, FB1&& b1, FB2&& b2,
                                                     const float* r1, const float* r2) {
  float h1[TM][TN], h2[TM][TN];
  zero(h1);
  zero(h2);
  gemm<TM, TN, K>(h1, tr, tc, a, b1);
  gemm<TM, TN, K>(h2, tr, tc, a, b2);
  add_row_scaled(acc, tr, h1, h2, r1, r2);
}

// Per row m = tr + 16 i: d1[m] = sign sum_j h1[i][j] x(m, tc + 16 j) over the half-warp's 16
// column groups, d2[m] likewise with h2 (lane tc = 0 writes).
template <int TM, int TN, typename FX>
__device__ __forceinline__ void row_dots(const float (&h1)[TM][TN], const float (&h2)[TM][TN],
                                         FX&& x, int tr, int tc, float sign, float* d1,
                                         float* d2) {
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = tr + 16 * i;
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const float xv = x(m, tc + 16 * j);
      s1 += h1[i][j] * xv;
      s2 += h2[i][j] * xv;
    }
    s1 = half_warp_sum(s1);
    s2 = half_warp_sum(s2);
    if (tc == 0) {
      d1[m] = sign * s1;
      d2[m] = sign * s2;
    }
  }
}

// The sums that cross a cluster (S CTAs per (sequence, head), CTA r owning the output columns
// [r D / S, (r + 1) D / S) of W): each CTA writes its part into its buffer, a cluster barrier,
// then every thread adds the S parts of what it needs in rank order, so every CTA holds the
// same bits. Two buffers of xf floats alternate: a CTA writes a buffer again only after the
// next exchange's barrier, which every CTA reaches after its reads of this one, so one barrier
// per exchange suffices. Unused at S = 1.
template <int S>
struct Exchange {
  float* buf;  // [2][xf] shared memory
  int xf;
  int parity;
  __device__ __forceinline__ float* mine() const { return buf + parity * xf; }
  __device__ __forceinline__ void sync() const {
    ClusterGroup g;
    g.sync();
  }
  __device__ __forceinline__ float total(int i) const {
    ClusterGroup g;
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < S; ++r) s += *g.remote(mine() + i, r);
    return s;
  }
  __device__ __forceinline__ void next() { parity ^= 1; }
};

// A thread's tile (rows tr + 16 i, columns tc + 16 j of a matrix of row stride ld) <- its sum
// over the cluster, for the column groups j where take(j) (one exchange).
template <int S, int TM, int TN, typename F>
__device__ __forceinline__ void tile_totals(Exchange<S>& x, float (&acc)[TM][TN], int ld, int tr,
                                            int tc, F&& take) {
  put(x.mine(), ld, tr, tc, acc);
  x.sync();
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
      if (take(j)) acc[i][j] = x.total((tr + 16 * i) * ld + tc + 16 * j);
  x.next();
}

// Row mode: v[i] <- the totals over the row's columns, first over the kTPR threads of a row,
// then (S > 1) over the cluster (one exchange for the NV values; `lead`: the row's first
// thread).
template <int kTPR, int C, int S, int NV>
__device__ __forceinline__ void row_totals(Exchange<S>& x, float (&v)[NV], int row, bool lead) {
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = row_sum<kTPR>(v[i]);
  if constexpr (S > 1) {
    if (lead) {
#pragma unroll
      for (int i = 0; i < NV; ++i) x.mine()[i * C + row] = v[i];
    }
    x.sync();
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = x.total(i * C + row);
    x.next();
  }
}

// Row mode, a thread's N columns x of a row of D features: xh = (x - mean) rstd; returns rstd.
// `tot` turns a thread's partial sums into the row's totals (row_totals).
template <int N, typename Tot>
__device__ __forceinline__ float ln_stats(const float (&x)[N], float (&xh)[N], float inv_d,
                                          float eps, Tot&& tot) {
  float s[1] = {0.f};
#pragma unroll
  for (int c = 0; c < N; ++c) s[0] += x[c];
  tot(s);
  const float mean = s[0] * inv_d;
  float var[1] = {0.f};
#pragma unroll
  for (int c = 0; c < N; ++c) var[0] += (x[c] - mean) * (x[c] - mean);
  tot(var);
  const float rstd = rsqrtf(var[0] * inv_d + eps);
#pragma unroll
  for (int c = 0; c < N; ++c) xh[c] = (x[c] - mean) * rstd;
  return rstd;
}

// Row mode: x <- J(gamma x) = rstd (gamma x - mean(gamma x) - xh mean(gamma x xh)), the
// LayerNorm's backward (chunk_vjp._ln_j after the gamma scale; gamma nullptr: 1).
template <int N, typename Tot>
__device__ __forceinline__ void ln_j(float (&x)[N], const float (&xh)[N], const float* gamma,
                                     float rstd, float inv_d, Tot&& tot) {
  float m[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < N; ++c) {
    x[c] *= gamma != nullptr ? __ldg(gamma + c) : 1.f;
    m[0] += x[c];
    m[1] += x[c] * xh[c];
  }
  tot(m);
  const float m1 = m[0] * inv_d, m2 = m[1] * inv_d;
#pragma unroll
  for (int c = 0; c < N; ++c) x[c] = rstd * (x[c] - m1 - xh[c] * m2);
}

// Columns [0, DS) of a D x D fp32 matrix from global memory (src: its first column; L2: the
// kernel updates W̄, S̄ in place) into shared memory with row stride ld.
template <int D, int DS>
__device__ __forceinline__ void stage_cols(float* dst, int ld, const float* src) {
  for (int i = threadIdx.x; i < D * DS / 4; i += kThreads) {
    const int r = (4 * i) / DS, c = (4 * i) % DS;
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src + int64_t(r) * D + c));
    float* d = dst + r * ld + c;
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
  }
}

// The chunk's q and k rows (slots t0 .. t0 + C - 1 of rows [0, len); inactive slots: zero
// rows) into fp32 shared memory of row stride ld, two columns per load.
template <typename TIn, int D, int C>
__device__ __forceinline__ void load_rows(float* sQ, float* sK, int ld, const TIn* gq,
                                          const TIn* gk, const Rows& rq, const Rows& rk,
                                          int64_t t0, int64_t len) {
  for (int i = threadIdx.x; i < C * (D / 2); i += kThreads) {
    const int r = i / (D / 2), c = (i % (D / 2)) * 2;
    const int64_t t = t0 + r;
    float2 xq = make_float2(0.f, 0.f), xk = xq;
    if (t >= 0 && t < len) {
      xq = load2(gq + rq.at(t) + c);
      xk = load2(gk + rk.at(t) + c);
    }
    sQ[r * ld + c] = xq.x;
    sQ[r * ld + c + 1] = xq.y;
    sK[r * ld + c] = xk.x;
    sK[r * ld + c + 1] = xk.y;
  }
}

// G by its column recurrences (thread j < C runs column j; gneg, nneg: -G, -N of the last row)
// and, on the last thread, the running scalars m, beta, c.
template <int C>
__device__ __forceinline__ void chunk_gates(int tid, float* theta, float* a, float* eta,
                                            float* act, float* G, int ldg, float* gneg,
                                            float* nneg, float* m, float* beta, float* c) {
  if (tid < C) {
    const float2 last = chunked::gate_column<C>(tid, theta, a, eta, act, G, nullptr, ldg);
    gneg[tid] = -last.x;
    nneg[tid] = -last.y;
  } else if (tid == kThreads - 1) {
    chunked::gate_scalars<C>(a, eta, act, m, beta, c);
  }
}

// Row mode, the keys' head on a thread's N columns of one row: f (fk) -> dz, which is J(gamma e)
// with the LayerNorm and e without; e = 2 (y - v) with y = [k +] [LN](fk); xh and rstd are the
// LayerNorm's (left alone without it). gamma, lbeta, k, v point at the thread's first column
// (v nullptr: an inactive slot, v = 0).
template <int N, typename TIn, typename Tot>
__device__ __forceinline__ void keys_head(float (&f)[N], float (&e)[N], float (&xh)[N],
                                          float& rstd, const float* gamma, const float* lbeta,
                                          const float* k, const TIn* v, bool residual,
                                          float eps, float inv_d, Tot&& tot) {
  if (gamma != nullptr) {
    rstd = ln_stats(f, xh, inv_d, eps, tot);
#pragma unroll
    for (int c = 0; c < N; ++c)
      f[c] = __ldg(gamma + c) * xh[c] + (lbeta != nullptr ? __ldg(lbeta + c) : 0.f);
  }
#pragma unroll
  for (int c = 0; c < N; ++c) {
    const float y = f[c] + (residual ? k[c] : 0.f);
    e[c] = 2.f * (y - (v != nullptr ? ld1(v + c) : 0.f));
    f[c] = e[c];
  }
  if (gamma != nullptr) ln_j(f, xh, gamma, rstd, inv_d, tot);
}

// The read's z for read "token" on a thread's tiles of this CTA's columns: z = beta (q W0) +
// c (q S0) - (G * A) dz, with q W0 and q S0 left in hw, hs.
template <int TC, int TS, int D, int C>
__device__ __forceinline__ void read_z_token(float (&z)[TC][TS], float (&hw)[TC][TS],
                                             float (&hs)[TC][TS], int tr, int tc,
                                             const float* sQ, int ld, const float* sW0,
                                             const float* sS0, int ls, const float* sG,
                                             const float* sA, int lc, const float* sDz,
                                             const float* beta, const float* c) {
  zero(z);
  zero(hw);
  zero(hs);
  gemm<TC, TS, D>(hw, tr, tc, [&](int m, int k) { return sQ[m * ld + k]; },
                  [&](int k, int n) { return sW0[k * ls + n]; });
  gemm<TC, TS, D>(hs, tr, tc, [&](int m, int k) { return sQ[m * ld + k]; },
                  [&](int k, int n) { return sS0[k * ls + n]; });
  gemm<TC, TS, C>(z, tr, tc, [&](int m, int k) { return -sG[m * lc + k] * sA[m * lc + k]; },
                  [&](int k, int n) { return sDz[k * ls + n]; });
  add_row_scaled(z, tr, hw, hs, beta, c);
}

template <typename TIn, int D, int C, int S>
__global__ void __launch_bounds__(kThreads, 1) bwd1_kernel(const NeuralMemoryBwdParams bp) {
  const NeuralMemoryParams& p = bp.f;
  constexpr int DS = D / S;  // this CTA's output columns of W (all of them at S = 1)
  constexpr Layout1 L = make_layout1(D, C, S);
  constexpr int LD = L.ld, LS = L.ls, LC = L.lc;
  // a thread's rows / columns of C-, D- and DS-sized sides
  constexpr int TC = C / 16, TD = D / 16, TS = DS / 16;
  constexpr int kTPR = kThreads / C;  // row mode: threads per row
  constexpr int kCPT = DS / kTPR;     // and columns per thread
  static_assert(C % 16 == 0 && DS % 16 == 0 && kTPR <= 32 && kCPT >= 1, "shape");

  extern __shared__ __align__(16) float sm[];
  float* sQ = sm + L.q;    // C x D (every column)
  float* sK = sm + L.k;
  float* sDz = sm + L.dz;  // the keys' errors dz (C x DS, this CTA's columns, as below)
  float* sZb = sm + L.zb;  // the read's z, then z̄
  float* sT = sm + L.t;    // fk, then dz̄, then zk̄
  float* sW0 = sm + L.w0;  // D x DS
  float* sS0 = sm + L.s0;
  float* sWb = sm + L.wb;  // W̄, S̄ after the chunk
  float* sSb = sm + L.sb;
  float* sWg = sm + L.wg;  // Wg where it is not W0 (an open chunk 0; sub-chunks)
  float* sA = sm + L.a;    // q k^T, then a_bar; N for the gates' adjoint
  float* sG = sm + L.g;
  float* sGb = sm + L.gb;  // Ḡ
  float* v_theta = sm + L.vec;
  float* v_a = v_theta + C;
  float* v_eta = v_a + C;
  float* v_act = v_eta + C;
  float* v_m = v_act + C;
  float* v_beta = v_m + C;
  float* v_c = v_beta + C;
  float* v_gneg = v_c + C;
  float* v_nneg = v_gneg + C;
  float* v_bb = v_nneg + C;  // row sums: beta-bar, c-bar, Ḡ and N̄ of the last row
  float* v_cb = v_bb + C;
  float* v_gl = v_cb + C;
  float* v_nl = v_gl + C;
  float* v_abar = v_nl + C;
  float* v_ebar = v_abar + C;
  float* v_thbar = v_ebar + C;
  float* v_rstd = v_thbar + C;  // the keys' head's rstd per row
  float* v_red = sm + L.red;    // [kWarps][4]
  Exchange<S> xc{sm + L.x, L.xf, 0};

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tr = tid / 16, tc = tid % 16;
  const int h = blockIdx.x / S, rank = blockIdx.x % S, n = blockIdx.y;
  const int col0 = rank * DS;  // this CTA's first column of W (and of every D_out-sided row)
  const chunked::SeqRows seq = chunked::seq_rows(p, n, h);
  const int64_t len = seq.len, row_base = seq.row_base;
  const Rows rq = seq.q, rk = seq.k, rv = seq.v;
  const Rows ro{0, row_base, int64_t(p.heads) * D, int64_t(h) * D};  // o_bar, dq, dk, dv
  const TIn* __restrict__ gq = static_cast<const TIn*>(p.q);
  const TIn* __restrict__ gk = static_cast<const TIn*>(p.k);
  const TIn* __restrict__ gv = static_cast<const TIn*>(p.v);
  const TIn* __restrict__ gob = static_cast<const TIn*>(bp.o_bar);
  TIn* __restrict__ gdq = static_cast<TIn*>(bp.dq);
  TIn* __restrict__ gdk = static_cast<TIn*>(bp.dk);
  TIn* __restrict__ gdv = static_cast<TIn*>(bp.dv);

  const int off = p.offset != nullptr ? int(p.offset[n]) : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;
  const int64_t size = int64_t(D) * D;
  const int64_t nh = int64_t(n) * p.heads + h;
  const float* w_src = p.w_in[0] + n * p.w_in_n_stride[0] + h * p.w_in_h_stride[0];
  const float* cw_src = p.cw_in[0] != nullptr && off > 0 ? p.cw_in[0] + nh * size : w_src;
  const float* cwb = bp.cw_bar[0] != nullptr ? bp.cw_bar[0] + nh * size : nullptr;
  float* wbar = bp.w_bar[0] + nh * size;
  float* sbar = bp.s_bar[0] + nh * size;
  float* wg0 = bp.wg0_bar[0] + nh * size;
  const int R = p.sub > 1 ? p.sub : 1;  // sub-chunks per call chunk (above)
  float* wgc = R > 1 ? bp.wg_carry[0] + nh * size : nullptr;
  float* scr_e = bp.scratch + nh * int64_t(scratch_floats1(D, C));  // e, then ȳ (C x D)
  float* scr_xh = scr_e + C * D;
  float* dlnw = bp.dln_w != nullptr ? bp.dln_w + nh * C * D : nullptr;
  float* dlnb = bp.dln_b != nullptr ? bp.dln_b + nh * C * D : nullptr;
  const float* gamma = p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr;
  const float* lbeta = gamma != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;
  const bool rchunk = p.read_chunk;
  if (n_chunks == 0) {  // no tokens: W̄, S̄ pass through; the owed chunk weights' cotangent
    for (int64_t i = tid; i < size; i += kThreads) {
      if (int(i % D) / DS == rank) wg0[i] = cwb != nullptr ? __ldcg(cwb + i) : 0.f;
    }
    return;
  }
  const int rr = tid / kTPR, rc0 = (tid % kTPR) * kCPT;  // row mode: row, first column (local)
  const int gc0 = col0 + rc0;                            // and its column of D
  const bool rlead = tid % kTPR == 0;
  auto tot = [&](auto& v) { row_totals<kTPR, C, S>(xc, v, rr, rlead); };
  const float inv_d = 1.f / float(D);
  // which of a thread's D-wide column groups (tc + 16 j) this CTA writes
  auto own_j = [&](int j) { return j / TS == rank; };

  for (int j = n_chunks - 1; j >= 0; --j) {
    const int64_t slot = (int64_t(j) * p.n_seq + n) * p.heads + h;
    // the gradient weights Wg (sub-chunks: above): the call's first chunk (j < R) takes cw_src,
    // a later one the start state of its first sub-chunk jg
    const int jg = j - j % R;
    const bool g_is_w = j % R == 0 && (j >= R || cw_src == w_src);
    const float* wg_src =
        j < R ? cw_src : bp.ckpt_w[0] + ((int64_t(jg) * p.n_seq + n) * p.heads + h) * size;
    const float* sWgp = g_is_w ? sW0 : sWg;  // the chunk's gradient weights
    // W̄g apart from W̄ (wg0 or the carry), and whether this sub-chunk is the first of its call
    // chunk that the walk meets (R = 1: apart at chunk 0 only, always first)
    const bool apart = j < R || j % R != 0;
    const bool wg_first = j == min(jg + R - 1, n_chunks - 1);
    float* wg_dst = j < R ? wg0 : wgc;
    const int64_t t0 = int64_t(j) * C - off;

    // ---- load ----
    __syncthreads();  // the previous chunk is done with shared memory (and W̄, S̄ written)
    load_rows<TIn, D, C>(sQ, sK, LD, gq, gk, rq, rk, t0, len);
    stage_cols<D, DS>(sW0, LS, bp.ckpt_w[0] + slot * size + col0);
    stage_cols<D, DS>(sS0, LS, bp.ckpt_s[0] + slot * size + col0);
    stage_cols<D, DS>(sWb, LS, wbar + col0);
    stage_cols<D, DS>(sSb, LS, sbar + col0);
    if (!g_is_w) stage_cols<D, DS>(sWg, LS, wg_src + col0);
    if (tid < C) chunked::load_gates(tid, p, row_base, h, t0, len, v_theta, v_a, v_eta, v_act);
    __syncthreads();

    // ---- G, the scalars; fk = k Wg; A = q k^T (every CTA: it sums over all of D) ----
    chunk_gates<C>(tid, v_theta, v_a, v_eta, v_act, sG, LC, v_gneg, v_nneg, v_m, v_beta, v_c);
    {
      float f[TC][TS];
      zero(f);
      gemm<TC, TS, D>(f, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                      [&](int k, int c) { return sWgp[k * LS + c]; });
      put(sT, LS, tr, tc, f);
    }
    if (!rchunk) {
      float a[TC][TC];
      zero(a);
      gemm<TC, TC, D>(a, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                      [&](int k, int c) { return sK[c * LD + k]; });
      put(sA, LC, tr, tc, a);
    }
    __syncthreads();

    // ---- the keys' head (row mode): e = 2 (y - v), dz = LNB(fk, e) ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float f[kCPT], xh[kCPT], e[kCPT];
      float rstd = 1.f;
#pragma unroll
      for (int c = 0; c < kCPT; ++c) f[c] = sT[rr * LS + rc0 + c];
      keys_head(f, e, xh, rstd, gamma != nullptr ? gamma + gc0 : nullptr,
                lbeta != nullptr ? lbeta + gc0 : nullptr, sK + rr * LD + gc0,
                active ? gv + rv.at(t) + gc0 : nullptr, p.residual, p.ln_eps, inv_d, tot);
#pragma unroll
      for (int c = 0; c < kCPT; ++c) scr_e[rr * D + gc0 + c] = e[c];
      if (gamma != nullptr) {  // (f holds dz = J(gamma e))
#pragma unroll
        for (int c = 0; c < kCPT; ++c) scr_xh[rr * D + gc0 + c] = xh[c];
        if (rlead) v_rstd[rr] = rstd;
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) sDz[rr * LS + rc0 + c] = f[c];
    }
    __syncthreads();

    // ---- the read's z ----
    float hw0[TC][TS], hs0[TC][TS];  // q W0, q S0 (read "token"), kept for the row sums
    {
      float z[TC][TS];
      if (!rchunk) {
        read_z_token<TC, TS, D, C>(z, hw0, hs0, tr, tc, sQ, LD, sW0, sS0, LS, sG, sA, LC, sDz,
                                   v_beta, v_c);
      } else {
        zero(z);
        gemm<TC, TS, D>(z, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                        [&](int k, int c) { return sWgp[k * LS + c]; });
      }
      put(sZb, LS, tr, tc, z);
    }
    __syncthreads();

    // ---- the read's head backward (row mode): z̄ from dl/do at z ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float ob[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; ++c) ob[c] = active ? ld1(gob + ro.at(t) + gc0 + c) : 0.f;
      if (gamma != nullptr) {
        float z[kCPT], xh[kCPT];
#pragma unroll
        for (int c = 0; c < kCPT; ++c) z[c] = sZb[rr * LS + rc0 + c];
        const float rstd = ln_stats(z, xh, inv_d, p.ln_eps, tot);
        if (active) {
#pragma unroll
          for (int c = 0; c < kCPT; ++c) {
            dlnw[rr * D + gc0 + c] += ob[c] * xh[c];
            if (dlnb != nullptr) dlnb[rr * D + gc0 + c] += ob[c];
          }
        }
        ln_j(ob, xh, gamma + gc0, rstd, inv_d, tot);
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) sZb[rr * LS + rc0 + c] = ob[c];
    }
    __syncthreads();

    // ---- the state's cotangents into dz̄ and the last rows of Ḡ, N̄; the read's dz̄ and row
    // sums (this CTA's columns; the row sums cross the cluster below) ----
    {
      // [4][C] in shared memory's order (v_bb, v_cb, v_gl, v_nl are contiguous): beta-bar,
      // c-bar, the last rows of Ḡ and N̄; at S > 1 this CTA's part, in the exchange buffer
      float* r_bb = S > 1 ? xc.mine() : v_bb;
      float* r_cb = r_bb + C;
      float* r_gl = r_bb + 2 * C;
      float* r_nl = r_bb + 3 * C;
      float dzb[TC][TS];
      zero(dzb);
      {
        float hw[TC][TS], hs[TC][TS];
        zero(hw);
        zero(hs);
        gemm<TC, TS, D>(hw, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                        [&](int k, int c) { return sWb[k * LS + c]; });
        gemm<TC, TS, D>(hs, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                        [&](int k, int c) { return sSb[k * LS + c]; });
        row_dots(hw, hs, [&](int m, int c) { return sDz[m * LS + c]; }, tr, tc, -1.f, r_gl, r_nl);
        add_row_scaled(dzb, tr, hw, hs, v_gneg, v_nneg);
      }
      if (!rchunk) {
        row_dots(hw0, hs0, [&](int m, int c) { return sZb[m * LS + c]; }, tr, tc, 1.f, r_bb,
                 r_cb);
        // dz̄ -= (G * A)^T z̄
        gemm<TC, TS, C>(dzb, tr, tc, [&](int m, int k) { return -sG[k * LC + m] * sA[k * LC + m]; },
                        [&](int k, int c) { return sZb[k * LS + c]; });
      } else if (tc == 0) {
#pragma unroll
        for (int i = 0; i < TC; ++i) {
          r_bb[tr + 16 * i] = 0.f;
          r_cb[tr + 16 * i] = 0.f;
        }
      }
      put(sT, LS, tr, tc, dzb);
    }
    if constexpr (S > 1) {  // the four row vectors over the cluster: v_bb, v_cb, v_gl, v_nl
      xc.sync();
      for (int i = tid; i < 4 * C; i += kThreads) v_bb[i] = xc.total(i);
      xc.next();
    }
    __syncthreads();

    // ---- Ḡ = mm * A and a_bar = mm * G, mm = -z̄ dz^T (read "token"; summed over D) ----
    {
      float mm[TC][TC];
      zero(mm);
      if (!rchunk) {
        gemm<TC, TC, DS>(mm, tr, tc, [&](int m, int k) { return -sZb[m * LS + k]; },
                         [&](int k, int c) { return sDz[c * LS + k]; });
        if constexpr (S > 1) tile_totals(xc, mm, C, tr, tc, [](int) { return true; });
      }
#pragma unroll
      for (int i = 0; i < TC; ++i)
#pragma unroll
        for (int jj = 0; jj < TC; ++jj) {
          const int at = (tr + 16 * i) * LC + tc + 16 * jj;
          sGb[at] = rchunk ? 0.f : mm[i][jj] * sA[at];
          if (!rchunk) sA[at] = mm[i][jj] * sG[at];
        }
    }
    // ---- the keys' errors' adjoint (row mode): LayerNorm double backward, dv, the keys' head
    // backward; sT: dz̄ -> zk̄, scr_e: e -> ȳ ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float top[kCPT], yb[kCPT], zk[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; ++c) top[c] = sT[rr * LS + rc0 + c];
      if (gamma != nullptr) {
        const float rstd = v_rstd[rr];
        float e[kCPT], xh[kCPT], dz[kCPT], je[kCPT];
        // sum top dz, sum top xh, sum gamma e xh, and J(top)'s sum top, sum top xh
        float r5[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          e[c] = scr_e[rr * D + gc0 + c];
          xh[c] = scr_xh[rr * D + gc0 + c];
          dz[c] = sDz[rr * LS + rc0 + c];
          je[c] = top[c];
          r5[0] += top[c] * dz[c];
          r5[1] += top[c] * xh[c];
          r5[2] += __ldg(gamma + gc0 + c) * e[c] * xh[c];
          r5[3] += top[c];
          r5[4] += top[c] * xh[c];
        }
        tot(r5);
        const float tdz = r5[0], tx = r5[1], s = r5[2] * inv_d;
        const float jm1 = r5[3] * inv_d, jm2 = r5[4] * inv_d;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) je[c] = rstd * (je[c] - jm1 - xh[c] * jm2);  // J(top)
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          zk[c] = -(rstd * inv_d) * (xh[c] * tdz + dz[c] * tx) - rstd * s * je[c];  // f̄
          yb[c] = 2.f * __ldg(gamma + gc0 + c) * je[c];                             // 2 ē
          if (active) {
            dlnw[rr * D + gc0 + c] += e[c] * je[c] + yb[c] * xh[c];
            if (dlnb != nullptr) dlnb[rr * D + gc0 + c] += yb[c];
          }
          e[c] = yb[c];
        }
        ln_j(e, xh, gamma + gc0, rstd, inv_d, tot);  // the keys' head: J(gamma ȳ)
#pragma unroll
        for (int c = 0; c < kCPT; ++c) zk[c] += e[c];
      } else {
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          yb[c] = 2.f * top[c];
          zk[c] = yb[c];
        }
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) {
        sT[rr * LS + rc0 + c] = zk[c];
        scr_e[rr * D + gc0 + c] = yb[c];
        if (active) st1(gdv + ro.at(t) + gc0 + c, -yb[c]);
      }
    }
    __syncthreads();

    // ---- q̄, k̄ (C x D: this CTA's part sums over its columns; rank 0 adds the A-terms of q̄,
    // rank S - 1 those of k̄; then each CTA writes its columns of dq, dk) ----
    {
      float qb[TC][TD], kb[TC][TD];
      zero(qb);
      zero(kb);
      if (!rchunk) {
        gemm_row_scaled_pair<TC, TD, DS>(
            qb, tr, tc, [&](int m, int k) { return sZb[m * LS + k]; },
            [&](int k, int c) { return sW0[c * LS + k]; },
            [&](int k, int c) { return sS0[c * LS + k]; }, v_beta, v_c);
        if (rank == 0)
          gemm<TC, TD, C>(qb, tr, tc, [&](int m, int k) { return sA[m * LC + k]; },
                          [&](int k, int c) { return sK[k * LD + c]; });
        if (rank == S - 1)
          gemm<TC, TD, C>(kb, tr, tc, [&](int m, int k) { return sA[k * LC + m]; },
                          [&](int k, int c) { return sQ[k * LD + c]; });
      } else {
        gemm<TC, TD, DS>(qb, tr, tc, [&](int m, int k) { return sZb[m * LS + k]; },
                         [&](int k, int c) { return sWgp[c * LS + k]; });
      }
      // the state's part: gneg (dz W̄^T) + nneg (dz S̄^T)
      gemm_row_scaled_pair<TC, TD, DS>(
          kb, tr, tc, [&](int m, int k) { return sDz[m * LS + k]; },
          [&](int k, int c) { return sWb[c * LS + k]; },
          [&](int k, int c) { return sSb[c * LS + k]; }, v_gneg, v_nneg);
      // the keys' forward: zk̄ Wg^T
      gemm<TC, TD, DS>(kb, tr, tc, [&](int m, int k) { return sT[m * LS + k]; },
                       [&](int k, int c) { return sWgp[c * LS + k]; });
      if constexpr (S > 1) {  // q̄ then k̄ over the cluster, each thread its own columns
        tile_totals(xc, qb, D, tr, tc, own_j);
        tile_totals(xc, kb, D, tr, tc, own_j);
      }
#pragma unroll
      for (int i = 0; i < TC; ++i) {
        const int m = tr + 16 * i;
        const int64_t t = t0 + m;
        if (t < 0 || t >= len) continue;
#pragma unroll
        for (int jj = 0; jj < TD; ++jj) {
          if (!own_j(jj)) continue;
          const int c = tc + 16 * jj;
          float qv = qb[i][jj], kv = kb[i][jj];
          if (p.residual) {
            qv += ld1(gob + ro.at(t) + c);
            kv += scr_e[m * D + c];  // ȳ (this CTA's column)
          }
          st1(gdq + ro.at(t) + c, qv);
          st1(gdk + ro.at(t) + c, kv);
        }
      }
    }

    // ---- the state: W̄g, W̄0, S̄0 (this CTA's columns) and the Frobenius sums of the last
    // row's gates ----
    {
      float ag[TD][TS], aw[TD][TS], as[TD][TS];
      zero(ag);
      zero(aw);
      zero(as);
      gemm<TD, TS, C>(ag, tr, tc, [&](int m, int k) { return sK[k * LD + m]; },
                      [&](int k, int c) { return sT[k * LS + c]; });
      if (rchunk) {
        gemm<TD, TS, C>(ag, tr, tc, [&](int m, int k) { return sQ[k * LD + m]; },
                        [&](int k, int c) { return sZb[k * LS + c]; });
      } else {
        gemm<TD, TS, C>(aw, tr, tc, [&](int m, int k) { return sQ[k * LD + m] * v_beta[k]; },
                        [&](int k, int c) { return sZb[k * LS + c]; });
        gemm<TD, TS, C>(as, tr, tc, [&](int m, int k) { return sQ[k * LD + m] * v_c[k]; },
                        [&](int k, int c) { return sZb[k * LS + c]; });
      }
      const float beta_c = v_beta[C - 1], c_c = v_c[C - 1], m_c = v_m[C - 1];
      const bool last = j == n_chunks - 1 && cwb != nullptr;
      float f0 = 0.f, f1 = 0.f, f2 = 0.f;
#pragma unroll
      for (int i = 0; i < TD; ++i)
#pragma unroll
        for (int jj = 0; jj < TS; ++jj) {
          const int r = tr + 16 * i, c = tc + 16 * jj;
          const float wb = sWb[r * LS + c], sb = sSb[r * LS + c];
          const float w0 = sW0[r * LS + c], s0 = sS0[r * LS + c];
          f0 += w0 * wb;
          f1 += s0 * wb;
          f2 += s0 * sb;
          const int64_t e = int64_t(r) * D + col0 + c;
          const float g = ag[i][jj] + (last ? __ldcg(cwb + e) : 0.f);
          const float w = aw[i][jj] + beta_c * wb;
          const float s = as[i][jj] + c_c * wb + m_c * sb;
          if (!apart) {  // Wg is W0: with the later sub-chunks' part the carry holds
            wbar[e] = w + (R > 1 && !wg_first ? g + __ldcg(wgc + e) : g);
          } else {
            wbar[e] = w;
            wg_dst[e] = wg_first ? g : __ldcg(wg_dst + e) + g;
          }
          sbar[e] = s;
        }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        f0 += __shfl_xor_sync(0xffffffffu, f0, o);
        f1 += __shfl_xor_sync(0xffffffffu, f1, o);
        f2 += __shfl_xor_sync(0xffffffffu, f2, o);
      }
      float* red = S > 1 ? xc.mine() : v_red;
      if (lane == 0) {
        red[warp * 4] = f0;
        red[warp * 4 + 1] = f1;
        red[warp * 4 + 2] = f2;
      }
    }
    if constexpr (S > 1) {  // the warps' partials over the cluster
      xc.sync();
      if (tid < 4 * kWarps && tid % 4 < 3) v_red[tid] = xc.total(tid);
      xc.next();
    }
    __syncthreads();  // a_bar (sA) read: N may take its place

    // ---- the gates' adjoint (N into sA; G is still in sG); rank 0 stores it ----
    if (tid < C) chunked::gate_column<C, false>(tid, v_theta, v_a, v_eta, v_act, nullptr, sA, LC);
    __syncthreads();
    gates_adjoint<C, kThreads, kWarps>(tid, LC, sG, sA, sGb, v_gl, v_nl, v_bb, v_cb, v_red, v_a,
                                       v_eta, v_act, v_m, v_beta, v_c, v_thbar, v_abar, v_ebar);
    __syncthreads();
    if (rank == 0)
      gates_adjoint_store<C>(tid, LC, sG, sA, v_thbar, v_abar, v_ebar, t0, len, row_base,
                             p.heads, h, bp.dlr, bp.dforget, bp.dmomentum);
  }
  if constexpr (S > 1) xc.sync();  // no CTA exits while another may still read its buffers
}

// The launch of a depth-1 kernel (this backward, or the forward of chunked_fwd1_kernel.cuh)
// over its (sequence, head) pairs: a grid of (heads * S, n_seq) CTAs, one per pair at S = 1, else
// a cluster of S along x.
template <int S, typename Kernel, typename P>
cudaError_t launch_pairs(Kernel kernel, size_t smem, int heads, int n_seq, const P& p,
                         cudaStream_t stream) {
  TITANS_RETURN_IF_ERROR(allow_smem(kernel, smem));
  if constexpr (S == 1) {
    kernel<<<dim3(heads, n_seq), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned(heads) * S, unsigned(n_seq), 1);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attr[1] = {cluster_attribute(S)};
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, p);
  }
}

// The column split of a depth-1 kernel (params.h split): a cluster of 4, else 2, owning D / S
// columns of W each, where clusters of that size for every pair are resident at once (sm_90+:
// resident_ctas and max_clusters), else one CTA; `split` > 0 forces 1, 2 or 4 (at most D / 16).
// D = 128 always takes a cluster of 4 (kSplit128: one or two CTAs cannot hold its D x D / S
// matrices), in waves where they do not all fit, and cudaErrorNotSupported where the device has
// no clusters of 4 for it. pick(std::integral_constant<int, S>) gives the kernel for S and its
// shared memory.
template <int D, typename P, typename Pick>
cudaError_t launch_columns(const P& p, int heads, int n_seq, int split, Pick&& pick,
                           cudaStream_t stream) {
  using S1 = std::integral_constant<int, 1>;
  using S2 = std::integral_constant<int, 2>;
  using S4 = std::integral_constant<int, 4>;
  static_assert(kSplit128 == 4, "D = 128 takes clusters of 4");
  if (split < 0 || split == 3 || split > kMaxSplit1 || split > D / 16) {
    return cudaErrorInvalidValue;
  }
  if constexpr (D > 64) {
    if (split != 0 && split != kSplit128) return cudaErrorInvalidValue;
    const auto k = pick(S4{});
    TITANS_RETURN_IF_ERROR(allow_smem(k.first, k.second));
    if (max_clusters(k.first, kSplit128, k.second, kThreads) < 1) return cudaErrorNotSupported;
    return launch_pairs<kSplit128>(k.first, k.second, heads, n_seq, p, stream);
  } else {
    const int64_t pairs = int64_t(heads) * n_seq;
    auto all_fit = [&](auto s) {
      constexpr int kS = decltype(s)::value;
      const auto k = pick(s);
      return allow_smem(k.first, k.second) == cudaSuccess &&
             resident_ctas(k.first, kThreads, k.second) >= pairs * kS &&
             max_clusters(k.first, kS, k.second, kThreads) >= pairs;
    };
    int s = split;
    if (s == 0) {
      s = 1;
      if constexpr (D / 16 >= 4) {
        if (all_fit(S4{})) s = 4;
      }
      if (s == 1 && all_fit(S2{})) s = 2;
    }
    if constexpr (D / 16 >= 4) {
      if (s == 4) {
        const auto k = pick(S4{});
        return launch_pairs<4>(k.first, k.second, heads, n_seq, p, stream);
      }
    }
    if (s == 2) {
      const auto k = pick(S2{});
      return launch_pairs<2>(k.first, k.second, heads, n_seq, p, stream);
    }
    const auto k = pick(S1{});
    return launch_pairs<1>(k.first, k.second, heads, n_seq, p, stream);
  }
}

// The backward's CTAs per (sequence, head): launch_columns.
template <typename TIn, int D, int C>
cudaError_t launch1(const NeuralMemoryBwdParams& p, cudaStream_t stream) {
  return launch_columns<D>(p, p.f.heads, p.f.n_seq, p.f.split, [](auto s) {
    constexpr int kS = decltype(s)::value;
    return std::make_pair(bwd1_kernel<TIn, D, C, kS>, smem_bytes1(D, C, kS));
  }, stream);
}

template <typename TIn, int D>
cudaError_t launch1_by_chunk(const NeuralMemoryBwdParams& p, cudaStream_t stream) {
  if constexpr (D > 64) {  // chunk 64 does not fit (make_layout1(128, 64, 4): 289 KiB)
    switch (p.f.chunk) {
      case 16: return launch1<TIn, D, 16>(p, stream);
      case 32: return launch1<TIn, D, 32>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    switch (p.f.chunk) {
      case 16: return launch1<TIn, D, 16>(p, stream);
      case 32: return launch1<TIn, D, 32>(p, stream);
      default: return launch1<TIn, D, 64>(p, stream);
    }
  }
}

#define TITANS_BWD1_INSTANCES(EXTERN, TIn, D) \
  EXTERN template cudaError_t launch1_by_chunk<TIn, D>(const NeuralMemoryBwdParams&, cudaStream_t);
TITANS_BWD1_INSTANCES(extern, __nv_bfloat16, 32)
TITANS_BWD1_INSTANCES(extern, __nv_bfloat16, 64)
TITANS_BWD1_INSTANCES(extern, __half, 32)
TITANS_BWD1_INSTANCES(extern, __half, 64)
TITANS_BWD1_INSTANCES(extern, __nv_bfloat16, 128)
TITANS_BWD1_INSTANCES(extern, __half, 128)
TITANS_BWD1_INSTANCES(extern, float, 32)
TITANS_BWD1_INSTANCES(extern, float, 64)
TITANS_BWD1_INSTANCES(extern, float, 128)

}  // namespace chunked_bwd1
}  // namespace titans
