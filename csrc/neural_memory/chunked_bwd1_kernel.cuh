// The fused backward of neural_memory_chunked (chunked_bwd.h) at depth 1 (M_W(x) = [x +]
// [LN](x W), W: D x D), either read: the kernel template and its launcher; chunked_bwd1.cu
// holds the instances (bf16 / fp16, D 32 / 64, chunk 16 / 32 / 64).
//
// One CTA of 8 warps per (sequence, head) walks the chunks last to first, the state's
// cotangents W̄, S̄ carried in place in the fp32 output tensors, each chunk's start state
// (W0, S0) read from the forward's checkpoint of that chunk (ckpt_every = 1: at depth 1 a
// state is D x D, so checkpoints at every chunk cost T / C * 2 D^2 floats per (sequence, head),
// less than depth 2's every fourth). Per chunk, chunk_vjp.chunk_step_vjp at L = 1 (notation of
// chunk_vjp.py; gneg = -G[C-1, :], nneg = -N[C-1, :]):
//
//   load      q, k rows (fp32), gates; W0, S0, W̄, S̄ (and Wg at an open chunk 0); G
//   keys      fk = k Wg; (row mode) e = 2 (y - v), dz = LNB(fk, e); e, xhat, rstd to scratch
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
#pragma once

#include <type_traits>

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

// Shared memory in floats: five C x D row matrices, five D x D state matrices, three C x C
// gate matrices, the per-row vectors and the warps' partial sums.
struct Layout1 {
  int ld, lc, q, k, dz, zb, t, w0, s0, wb, sb, wg, a, g, gb, vec, red, total;
};
constexpr int kVecs1 = 16;
__host__ __device__ constexpr Layout1 make_layout1(int D, int C) {
  const int ld = D + 1, lc = C + 1, rm = C * ld, dm = D * ld, cm = C * lc;
  const int q = 0, k = q + rm, dz = k + rm, zb = dz + rm, t = zb + rm;
  const int w0 = t + rm, s0 = w0 + dm, wb = s0 + dm, sb = wb + dm, wg = sb + dm;
  const int a = wg + dm, g = a + cm, gb = g + cm, vec = gb + cm;
  const int red = vec + kVecs1 * C, total = red + 4 * kWarps;
  return Layout1{ld, lc, q, k, dz, zb, t, w0, s0, wb, sb, wg, a, g, gb, vec, red, total};
}
__host__ __device__ constexpr size_t smem_bytes1(int D, int C) {
  return size_t(make_layout1(D, C).total) * sizeof(float);
}
// fp32 scratch per (sequence, head): e (then ȳ), xhat of the keys' head, rstd
__host__ __device__ constexpr size_t scratch_floats1(int D, int C) {
  return size_t(2) * C * D + C;
}

template <typename T>
__device__ __forceinline__ float ld1(const T* p) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(*p);
  } else {
    return __half2float(*p);
  }
}
template <typename T>
__device__ __forceinline__ void st1(T* p, float x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    *p = __float2bfloat16_rn(x);
  } else {
    *p = __float2half_rn(x);
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

// Row mode, a thread's N columns x of a row of D = N kTPR: xh = (x - mean) rstd; returns rstd.
template <int kTPR, int N>
__device__ __forceinline__ float ln_stats(const float (&x)[N], float (&xh)[N], float inv_d,
                                          float eps) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < N; ++c) s += x[c];
  const float mean = row_sum<kTPR>(s) * inv_d;
  float var = 0.f;
#pragma unroll
  for (int c = 0; c < N; ++c) var += (x[c] - mean) * (x[c] - mean);
  const float rstd = rsqrtf(row_sum<kTPR>(var) * inv_d + eps);
#pragma unroll
  for (int c = 0; c < N; ++c) xh[c] = (x[c] - mean) * rstd;
  return rstd;
}

// Row mode: x <- J(gamma x) = rstd (gamma x - mean(gamma x) - xh mean(gamma x xh)), the
// LayerNorm's backward (chunk_vjp._ln_j after the gamma scale; gamma nullptr: 1).
template <int kTPR, int N>
__device__ __forceinline__ void ln_j(float (&x)[N], const float (&xh)[N], const float* gamma,
                                     float rstd, float inv_d) {
  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int c = 0; c < N; ++c) {
    x[c] *= gamma != nullptr ? __ldg(gamma + c) : 1.f;
    s1 += x[c];
    s2 += x[c] * xh[c];
  }
  const float m1 = row_sum<kTPR>(s1) * inv_d, m2 = row_sum<kTPR>(s2) * inv_d;
#pragma unroll
  for (int c = 0; c < N; ++c) x[c] = rstd * (x[c] - m1 - xh[c] * m2);
}

// A contiguous D x D fp32 matrix from global memory (L2: the kernel updates W̄, S̄ in place)
// into shared memory with row stride ld.
template <int D>
__device__ __forceinline__ void stage_state(float* dst, int ld, const float* src) {
  for (int i = threadIdx.x; i < D * D / 4; i += kThreads) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src) + i);
    const int r = (4 * i) / D, c = (4 * i) % D;
    float* d = dst + r * ld + c;
    d[0] = v.x;
    d[1] = v.y;
    d[2] = v.z;
    d[3] = v.w;
  }
}

template <typename TIn, int D, int C>
__global__ void __launch_bounds__(kThreads, 1) bwd1_kernel(const NeuralMemoryBwdParams bp) {
  const NeuralMemoryParams& p = bp.f;
  constexpr Layout1 L = make_layout1(D, C);
  constexpr int LD = L.ld, LC = L.lc;
  constexpr int TC = C / 16, TD = D / 16;  // a thread's rows / columns of C- and D-sized sides
  constexpr int kTPR = kThreads / C;       // row mode: threads per row
  constexpr int kCPT = D / kTPR;           // and columns per thread
  static_assert(C % 16 == 0 && D % 16 == 0 && kTPR <= 32 && kCPT >= 1, "shape");

  extern __shared__ __align__(16) float sm[];
  float* sQ = sm + L.q;
  float* sK = sm + L.k;
  float* sDz = sm + L.dz;  // the keys' errors dz
  float* sZb = sm + L.zb;  // the read's z, then z̄
  float* sT = sm + L.t;    // fk, then dz̄, then zk̄
  float* sW0 = sm + L.w0;
  float* sS0 = sm + L.s0;
  float* sWb = sm + L.wb;  // W̄, S̄ after the chunk
  float* sSb = sm + L.sb;
  float* sWg = sm + L.wg;  // an open chunk's weights (chunk 0 only)
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
  float* v_red = sm + L.red;  // [kWarps][4]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tr = tid / 16, tc = tid % 16;
  const int h = blockIdx.x, n = blockIdx.y;
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

  const int off = p.offset != nullptr ? p.offset[n] : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;
  const int64_t size = int64_t(D) * D;
  const int64_t nh = int64_t(n) * p.heads + h;
  const float* w_src = p.w_in[0] + n * p.w_in_n_stride[0] + h * p.w_in_h_stride[0];
  const float* cw_src = p.cw_in[0] != nullptr && off > 0 ? p.cw_in[0] + nh * size : w_src;
  const float* cwb = bp.cw_bar[0] != nullptr ? bp.cw_bar[0] + nh * size : nullptr;
  float* wbar = bp.w_bar[0] + nh * size;
  float* sbar = bp.s_bar[0] + nh * size;
  float* wg0 = bp.wg0_bar[0] + nh * size;
  float* scr_e = bp.scratch + nh * int64_t(scratch_floats1(D, C));  // e, then ȳ
  float* scr_xh = scr_e + C * D;
  float* scr_rstd = scr_xh + C * D;
  float* dlnw = bp.dln_w != nullptr ? bp.dln_w + nh * C * D : nullptr;
  float* dlnb = bp.dln_b != nullptr ? bp.dln_b + nh * C * D : nullptr;
  const float* gamma = p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr;
  const float* lbeta = gamma != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;
  const bool rchunk = p.read_chunk;
  if (n_chunks == 0) {  // no tokens: W̄, S̄ pass through; the owed chunk weights' cotangent
    for (int64_t i = tid; i < size; i += kThreads) wg0[i] = cwb != nullptr ? __ldcg(cwb + i) : 0.f;
    return;
  }
  const int rr = tid / kTPR, rc0 = (tid % kTPR) * kCPT;  // row mode: row, first column
  const float inv_d = 1.f / float(D);

  for (int j = n_chunks - 1; j >= 0; --j) {
    const int64_t slot = (int64_t(j) * p.n_seq + n) * p.heads + h;
    const bool g_is_w = j > 0 || cw_src == w_src;
    const float* sWgp = g_is_w ? sW0 : sWg;  // the chunk's gradient weights
    const int64_t t0 = int64_t(j) * C - off;

    // ---- load ----
    __syncthreads();  // the previous chunk is done with shared memory (and W̄, S̄ written)
    for (int i = tid; i < C * (D / 2); i += kThreads) {
      const int r = i / (D / 2), c = (i % (D / 2)) * 2;
      const int64_t t = t0 + r;
      float2 xq = make_float2(0.f, 0.f), xk = xq;
      if (t >= 0 && t < len) {
        xq = load2(gq + rq.at(t) + c);
        xk = load2(gk + rk.at(t) + c);
      }
      sQ[r * LD + c] = xq.x;
      sQ[r * LD + c + 1] = xq.y;
      sK[r * LD + c] = xk.x;
      sK[r * LD + c + 1] = xk.y;
    }
    stage_state<D>(sW0, LD, bp.ckpt_w[0] + slot * size);
    stage_state<D>(sS0, LD, bp.ckpt_s[0] + slot * size);
    stage_state<D>(sWb, LD, wbar);
    stage_state<D>(sSb, LD, sbar);
    if (!g_is_w) stage_state<D>(sWg, LD, cw_src);
    if (tid < C) chunked::load_gates(tid, p, row_base, h, t0, len, v_theta, v_a, v_eta, v_act);
    __syncthreads();

    // ---- G, the scalars; fk = k Wg; A = q k^T ----
    if (tid < C) {
      const float2 last = chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, sG, nullptr,
                                                  LC);
      v_gneg[tid] = -last.x;
      v_nneg[tid] = -last.y;
    } else if (tid == kThreads - 1) {
      chunked::gate_scalars<C>(v_a, v_eta, v_act, v_m, v_beta, v_c);
    }
    {
      float f[TC][TD];
      zero(f);
      gemm<TC, TD, D>(f, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                      [&](int k, int c) { return sWgp[k * LD + c]; });
      put(sT, LD, tr, tc, f);
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
      for (int c = 0; c < kCPT; ++c) f[c] = sT[rr * LD + rc0 + c];
      if (gamma != nullptr) {
        rstd = ln_stats<kTPR>(f, xh, inv_d, p.ln_eps);
#pragma unroll
        for (int c = 0; c < kCPT; ++c)
          f[c] = __ldg(gamma + rc0 + c) * xh[c] + (lbeta != nullptr ? __ldg(lbeta + rc0 + c) : 0.f);
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) {
        const float y = f[c] + (p.residual ? sK[rr * LD + rc0 + c] : 0.f);
        const float vv = active ? ld1(gv + rv.at(t) + rc0 + c) : 0.f;
        e[c] = 2.f * (y - vv);
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) {
        scr_e[rr * D + rc0 + c] = e[c];
        f[c] = e[c];
      }
      if (gamma != nullptr) {  // dz = J(gamma e)
        ln_j<kTPR>(f, xh, gamma + rc0, rstd, inv_d);
#pragma unroll
        for (int c = 0; c < kCPT; ++c) scr_xh[rr * D + rc0 + c] = xh[c];
        if (tid % kTPR == 0) scr_rstd[rr] = rstd;
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) sDz[rr * LD + rc0 + c] = f[c];
    }
    __syncthreads();

    // ---- the read's z ----
    float hw0[TC][TD], hs0[TC][TD];  // q W0, q S0 (read "token"), kept for the row sums
    {
      float z[TC][TD];
      zero(z);
      if (!rchunk) {
        zero(hw0);
        zero(hs0);
        gemm<TC, TD, D>(hw0, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                        [&](int k, int c) { return sW0[k * LD + c]; });
        gemm<TC, TD, D>(hs0, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                        [&](int k, int c) { return sS0[k * LD + c]; });
        gemm<TC, TD, C>(z, tr, tc, [&](int m, int k) { return -sG[m * LC + k] * sA[m * LC + k]; },
                        [&](int k, int c) { return sDz[k * LD + c]; });
        add_row_scaled(z, tr, hw0, hs0, v_beta, v_c);
      } else {
        gemm<TC, TD, D>(z, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                        [&](int k, int c) { return sWgp[k * LD + c]; });
      }
      put(sZb, LD, tr, tc, z);
    }
    __syncthreads();

    // ---- the read's head backward (row mode): z̄ from dl/do at z ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float ob[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; ++c) ob[c] = active ? ld1(gob + ro.at(t) + rc0 + c) : 0.f;
      if (gamma != nullptr) {
        float z[kCPT], xh[kCPT];
#pragma unroll
        for (int c = 0; c < kCPT; ++c) z[c] = sZb[rr * LD + rc0 + c];
        const float rstd = ln_stats<kTPR>(z, xh, inv_d, p.ln_eps);
        if (active) {
#pragma unroll
          for (int c = 0; c < kCPT; ++c) {
            dlnw[rr * D + rc0 + c] += ob[c] * xh[c];
            if (dlnb != nullptr) dlnb[rr * D + rc0 + c] += ob[c];
          }
        }
        ln_j<kTPR>(ob, xh, gamma + rc0, rstd, inv_d);
      }
#pragma unroll
      for (int c = 0; c < kCPT; ++c) sZb[rr * LD + rc0 + c] = ob[c];
    }
    __syncthreads();

    // ---- the state's cotangents into dz̄ and the last rows of Ḡ, N̄; the read's dz̄ and row
    // sums ----
    {
      float dzb[TC][TD];
      zero(dzb);
      {
        float hw[TC][TD], hs[TC][TD];
        zero(hw);
        zero(hs);
        gemm<TC, TD, D>(hw, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                        [&](int k, int c) { return sWb[k * LD + c]; });
        gemm<TC, TD, D>(hs, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                        [&](int k, int c) { return sSb[k * LD + c]; });
        row_dots(hw, hs, [&](int m, int c) { return sDz[m * LD + c]; }, tr, tc, -1.f, v_gl, v_nl);
        add_row_scaled(dzb, tr, hw, hs, v_gneg, v_nneg);
      }
      if (!rchunk) {
        row_dots(hw0, hs0, [&](int m, int c) { return sZb[m * LD + c]; }, tr, tc, 1.f, v_bb,
                 v_cb);
        // dz̄ -= (G * A)^T z̄
        gemm<TC, TD, C>(dzb, tr, tc, [&](int m, int k) { return -sG[k * LC + m] * sA[k * LC + m]; },
                        [&](int k, int c) { return sZb[k * LD + c]; });
      } else if (tc == 0) {
#pragma unroll
        for (int i = 0; i < TC; ++i) {
          v_bb[tr + 16 * i] = 0.f;
          v_cb[tr + 16 * i] = 0.f;
        }
      }
      put(sT, LD, tr, tc, dzb);
    }
    __syncthreads();

    // ---- Ḡ = mm * A and a_bar = mm * G, mm = -z̄ dz^T (read "token") ----
    {
      float mm[TC][TC];
      zero(mm);
      if (!rchunk)
        gemm<TC, TC, D>(mm, tr, tc, [&](int m, int k) { return -sZb[m * LD + k]; },
                        [&](int k, int c) { return sDz[c * LD + k]; });
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
      for (int c = 0; c < kCPT; ++c) top[c] = sT[rr * LD + rc0 + c];
      if (gamma != nullptr) {
        const float rstd = scr_rstd[rr];
        float e[kCPT], xh[kCPT], dz[kCPT], je[kCPT];
        float tdz = 0.f, tx = 0.f, s = 0.f;
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          e[c] = scr_e[rr * D + rc0 + c];
          xh[c] = scr_xh[rr * D + rc0 + c];
          dz[c] = sDz[rr * LD + rc0 + c];
          je[c] = top[c];
          tdz += top[c] * dz[c];
          tx += top[c] * xh[c];
          s += __ldg(gamma + rc0 + c) * e[c] * xh[c];
        }
        tdz = row_sum<kTPR>(tdz);
        tx = row_sum<kTPR>(tx);
        s = row_sum<kTPR>(s) * inv_d;
        ln_j<kTPR>(je, xh, nullptr, rstd, inv_d);  // J(top)
#pragma unroll
        for (int c = 0; c < kCPT; ++c) {
          zk[c] = -(rstd * inv_d) * (xh[c] * tdz + dz[c] * tx) - rstd * s * je[c];  // f̄
          yb[c] = 2.f * __ldg(gamma + rc0 + c) * je[c];                              // 2 ē
          if (active) {
            dlnw[rr * D + rc0 + c] += e[c] * je[c] + yb[c] * xh[c];
            if (dlnb != nullptr) dlnb[rr * D + rc0 + c] += yb[c];
          }
          e[c] = yb[c];
        }
        ln_j<kTPR>(e, xh, gamma + rc0, rstd, inv_d);  // the keys' head: J(gamma ȳ)
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
        sT[rr * LD + rc0 + c] = zk[c];
        scr_e[rr * D + rc0 + c] = yb[c];
        if (active) st1(gdv + ro.at(t) + rc0 + c, -yb[c]);
      }
    }
    __syncthreads();

    // ---- q̄, k̄ ----
    {
      float qb[TC][TD], kb[TC][TD];
      zero(qb);
      zero(kb);
      if (!rchunk) {
        gemm_row_scaled_pair<TC, TD, D>(
            qb, tr, tc, [&](int m, int k) { return sZb[m * LD + k]; },
            [&](int k, int c) { return sW0[c * LD + k]; },
            [&](int k, int c) { return sS0[c * LD + k]; }, v_beta, v_c);
        gemm<TC, TD, C>(qb, tr, tc, [&](int m, int k) { return sA[m * LC + k]; },
                        [&](int k, int c) { return sK[k * LD + c]; });
        gemm<TC, TD, C>(kb, tr, tc, [&](int m, int k) { return sA[k * LC + m]; },
                        [&](int k, int c) { return sQ[k * LD + c]; });
      } else {
        gemm<TC, TD, D>(qb, tr, tc, [&](int m, int k) { return sZb[m * LD + k]; },
                        [&](int k, int c) { return sWgp[c * LD + k]; });
      }
      // the state's part: gneg (dz W̄^T) + nneg (dz S̄^T)
      gemm_row_scaled_pair<TC, TD, D>(
          kb, tr, tc, [&](int m, int k) { return sDz[m * LD + k]; },
          [&](int k, int c) { return sWb[c * LD + k]; },
          [&](int k, int c) { return sSb[c * LD + k]; }, v_gneg, v_nneg);
      // the keys' forward: zk̄ Wg^T
      gemm<TC, TD, D>(kb, tr, tc, [&](int m, int k) { return sT[m * LD + k]; },
                      [&](int k, int c) { return sWgp[c * LD + k]; });
#pragma unroll
      for (int i = 0; i < TC; ++i) {
        const int m = tr + 16 * i;
        const int64_t t = t0 + m;
        if (t < 0 || t >= len) continue;
#pragma unroll
        for (int jj = 0; jj < TD; ++jj) {
          const int c = tc + 16 * jj;
          float qv = qb[i][jj], kv = kb[i][jj];
          if (p.residual) {
            qv += ld1(gob + ro.at(t) + c);
            kv += scr_e[m * D + c];  // ȳ
          }
          st1(gdq + ro.at(t) + c, qv);
          st1(gdk + ro.at(t) + c, kv);
        }
      }
    }

    // ---- the state: W̄g, W̄0, S̄0 and the Frobenius sums of the last row's gates ----
    {
      float ag[TD][TD], aw[TD][TD], as[TD][TD];
      zero(ag);
      zero(aw);
      zero(as);
      gemm<TD, TD, C>(ag, tr, tc, [&](int m, int k) { return sK[k * LD + m]; },
                      [&](int k, int c) { return sT[k * LD + c]; });
      if (rchunk) {
        gemm<TD, TD, C>(ag, tr, tc, [&](int m, int k) { return sQ[k * LD + m]; },
                        [&](int k, int c) { return sZb[k * LD + c]; });
      } else {
        gemm<TD, TD, C>(aw, tr, tc, [&](int m, int k) { return sQ[k * LD + m] * v_beta[k]; },
                        [&](int k, int c) { return sZb[k * LD + c]; });
        gemm<TD, TD, C>(as, tr, tc, [&](int m, int k) { return sQ[k * LD + m] * v_c[k]; },
                        [&](int k, int c) { return sZb[k * LD + c]; });
      }
      const float beta_c = v_beta[C - 1], c_c = v_c[C - 1], m_c = v_m[C - 1];
      const bool last = j == n_chunks - 1 && cwb != nullptr;
      float f0 = 0.f, f1 = 0.f, f2 = 0.f;
#pragma unroll
      for (int i = 0; i < TD; ++i)
#pragma unroll
        for (int jj = 0; jj < TD; ++jj) {
          const int r = tr + 16 * i, c = tc + 16 * jj;
          const float wb = sWb[r * LD + c], sb = sSb[r * LD + c];
          const float w0 = sW0[r * LD + c], s0 = sS0[r * LD + c];
          f0 += w0 * wb;
          f1 += s0 * wb;
          f2 += s0 * sb;
          const int64_t e = int64_t(r) * D + c;
          const float g = ag[i][jj] + (last ? __ldcg(cwb + e) : 0.f);
          const float w = aw[i][jj] + beta_c * wb;
          const float s = as[i][jj] + c_c * wb + m_c * sb;
          if (j > 0) {
            wbar[e] = w + g;
          } else {
            wbar[e] = w;
            wg0[e] = g;
          }
          sbar[e] = s;
        }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        f0 += __shfl_xor_sync(0xffffffffu, f0, o);
        f1 += __shfl_xor_sync(0xffffffffu, f1, o);
        f2 += __shfl_xor_sync(0xffffffffu, f2, o);
      }
      if (lane == 0) {
        v_red[warp * 4] = f0;
        v_red[warp * 4 + 1] = f1;
        v_red[warp * 4 + 2] = f2;
      }
    }
    __syncthreads();  // a_bar (sA) read: N may take its place

    // ---- the gates' adjoint (N into sA; G is still in sG) ----
    if (tid < C) chunked::gate_column<C>(tid, v_theta, v_a, v_eta, v_act, nullptr, sA, LC);
    __syncthreads();
    gates_adjoint<C, kThreads, kWarps>(tid, LC, sG, sA, sGb, v_gl, v_nl, v_bb, v_cb, v_red, v_a,
                                       v_eta, v_act, v_m, v_beta, v_c, v_thbar, v_abar, v_ebar);
    __syncthreads();
    gates_adjoint_store<C>(tid, LC, sG, sA, v_thbar, v_abar, v_ebar, t0, len, row_base, p.heads,
                           h, bp.dlr, bp.dforget, bp.dmomentum);
  }
}

template <typename TIn, int D, int C>
cudaError_t launch1(const NeuralMemoryBwdParams& p, cudaStream_t stream) {
  const size_t smem = smem_bytes1(D, C);
  auto kernel = bwd1_kernel<TIn, D, C>;
  TITANS_RETURN_IF_ERROR(allow_smem(kernel, smem));
  kernel<<<dim3(p.f.heads, p.f.n_seq), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename TIn, int D>
cudaError_t launch1_by_chunk(const NeuralMemoryBwdParams& p, cudaStream_t stream) {
  switch (p.f.chunk) {
    case 16: return launch1<TIn, D, 16>(p, stream);
    case 32: return launch1<TIn, D, 32>(p, stream);
    default: return launch1<TIn, D, 64>(p, stream);
  }
}

#define TITANS_BWD1_INSTANCES(EXTERN, TIn, D) \
  EXTERN template cudaError_t launch1_by_chunk<TIn, D>(const NeuralMemoryBwdParams&, cudaStream_t);
TITANS_BWD1_INSTANCES(extern, __nv_bfloat16, 32)
TITANS_BWD1_INSTANCES(extern, __nv_bfloat16, 64)
TITANS_BWD1_INSTANCES(extern, __half, 32)
TITANS_BWD1_INSTANCES(extern, __half, 64)

}  // namespace chunked_bwd1
}  // namespace titans
