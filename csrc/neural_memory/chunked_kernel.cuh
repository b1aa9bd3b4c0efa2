// The kernel of neural_memory_chunked (chunked.h), included by the per-(dtype, D) instance
// files chunked_*.cu and by chunked.cu (shared-memory plan). One CTA per (sequence, head) walks its chunks.
//
// Warp w < C / 16 owns chunk rows 16w..16w+15 for the row-local products (keys, head, read);
// all warps share the staging and the state update. Per chunk (C rows, D features, hidden Dh
// streamed in blocks of HB columns):
//
//   load     q, k rows of the chunk's slots -> shared (inactive slots: zero rows), gates
//   gates    thread j runs column j of N and G down the chunk:
//              N[j,j] = theta_j,  N[t,j] = eta_t N[t-1,j];  G[t,j] = a_t G[t-1,j] + act_t N[t,j]
//            (a = 1 - alpha, act = slot is a token), and one thread m, beta, c (c_t = a_t
//            c_{t-1} + act_t m_t): the running products of SPEC §2, never a ratio
//   keys     per hidden block: W1g[:, blk], W2g[blk, :] staged; zk = k W1g (registers), hk =
//            phi(zk) and phi'(zk) stored for the chunk; fk += hk W2g (hk re-packed in registers)
//   head     y = [k +] [LN](fk), dl/dy = 2 (y - v), LN backward -> dz2 (the last layer's error)
//   errors   per block (reverse): dz1 = (dz2 W2g^T) * phi'(zk)
//   read     A1 = -G * (q k^T) (registers); per block: z1 = (beta q) W0 + (c q) S0 + A1 dz1,
//            h1 = phi(z1); z2 += (beta h1) W0 + (c h1) S0, P += h1 hk^T; then z2 += (-G * P)
//            dz2 and o = [q +] [LN](z2). read "chunk": o = M_Wg(q), evaluated in the keys pass.
//   state    16 x 16 tiles of every layer: W = beta_C W0 + c_C S0 + (k^T diag(-g)) dz,
//            S = m_C S0 + (k^T diag(-n)) dz (g, n = the chunk's last rows of G, N), read from
//            and written to the fp32 state in global memory
//
// Depth 1 is the same with one layer (dz1 = the head's error). Every sum is a fixed-order mma
// chain or shuffle tree: the kernel is deterministic. The state is read with ld.global.cg
// (L2): the same CTA wrote it in the previous chunk.
#pragma once

#include "chunked.h"

#include <type_traits>

#include "../common/cuda_check.h"
#include "../common/mma.cuh"
#include "../memory_mlp/tile.cuh"

namespace titans {
namespace chunked {

using mlp::activation_fn;
using mlp::activation_grad;
using mlp::mma_reg_a;
using mlp::quad_sum;

template <int C>
struct Threads {
  static constexpr int kWarps = C / 16 > 4 ? C / 16 : 4;
  static constexpr int kThreads = 32 * kWarps;
};

// The hidden block of a depth-2 memory: 32 columns at D = 32, else 64.
template <int D>
constexpr int hidden_block() {
  return D == 32 ? 32 : 64;
}
inline int hidden_block(int dim) { return dim == 32 ? 32 : 64; }

// Shared-memory plan in bytes; rows padded by 8 elements (16 bytes) against bank conflicts.
struct Layout {
  size_t q, k, hk, dz1, dz2, b1, b3, b2, b4, g, vec, total;
};

__host__ __device__ inline Layout make_layout(int D, int C, int depth, int HB, int hidden,
                                              int elem) {
  const int ld_d = D + 8;
  const int bw = depth == 2 ? HB : D;
  const int ld_h = (depth == 2 ? hidden : D) + 8;
  Layout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += (bytes + 15) / 16 * 16;
    return here;
  };
  l.q = take(size_t(C) * ld_d * elem);
  l.k = take(size_t(C) * ld_d * elem);
  l.hk = take(depth == 2 ? size_t(C) * ld_h * elem : 0);
  l.dz1 = take(size_t(C) * ld_h * elem);
  l.dz2 = take(depth == 2 ? size_t(C) * ld_d * elem : 0);
  l.b1 = take(size_t(D) * (bw + 8) * elem);
  l.b3 = take(size_t(D) * (bw + 8) * elem);
  l.b2 = take(depth == 2 ? size_t(HB) * ld_d * elem : 0);
  l.b4 = take(depth == 2 ? size_t(HB) * ld_d * elem : 0);
  l.g = take(size_t(C) * (C + 4) * 4);
  l.vec = take(size_t(9) * C * 4);
  l.total = at;
  return l;
}

// fp32 rows [0, R) x cols [0, Cc) of `src` (leading dim ld; nullptr reads zeros) -> shared
// [R][LD] of T. Loads go through L2 (.cg): the state may have been written by this CTA.
// Groups of up to 8 float4 per thread are loaded before any is converted.
template <typename T, int R, int Cc, int LD, int kThreads>
__device__ __forceinline__ void stage(T* dst, const float* src, int64_t ld) {
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
        store4(dst + (i / (Cc / 4)) * LD + (i % (Cc / 4)) * 4, w[u]);
      }
    }
  }
}

// dst[0, count) = src (nullptr: zeros), fp32, float4 per thread; count % 4 == 0.
template <int kThreads>
__device__ __forceinline__ void copy_state(float* dst, const float* src, int64_t count) {
  for (int64_t i = threadIdx.x; i < count / 4; i += kThreads) {
    const float4 v = src != nullptr ? __ldcg(reinterpret_cast<const float4*>(src) + i)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
    reinterpret_cast<float4*>(dst)[i] = v;
  }
}

// acc[N / 8][4] += A (16 rows at m0 of shared [m][k], K wide) * B (K x N): B shared [k][n]
// (kBKMajor) or [n][k].
template <typename T, int K, int N, bool kBKMajor>
__device__ __forceinline__ void mma_smem(float (&acc)[N / 8][4], const T* sa, int lda, int m0,
                                         const T* sb, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    FragA<T> a;
    load_a(a, sa, lda, m0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      FragB<T> b[2];
      if constexpr (kBKMajor) {
        load_b2_kmajor(b, sb, ldb, kk * 16, np * 16, lane);
      } else {
        load_b2(b, sb, ldb, kk * 16, np * 16, lane);
      }
      mma(acc[2 * np], a, b[0]);
      mma(acc[2 * np + 1], a, b[1]);
    }
  }
}

// An A fragment with row g scaled by lo and row g + 8 by hi (re-rounded to T).
template <typename T>
__device__ __forceinline__ FragA<T> scale_rows(const FragA<T>& a, float lo, float hi) {
  FragA<T> r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = MmaOps<T>::unpack(a.r[i]);
    const float s = (i & 1) ? hi : lo;
    r.r[i] = MmaOps<T>::pack(v.x * s, v.y * s);
  }
  return r;
}

// An A fragment (k at k0) with column k scaled by s[k] (re-rounded to T).
template <typename T>
__device__ __forceinline__ FragA<T> scale_cols(const FragA<T>& a, const float* s, int k0,
                                               int lane) {
  const int k = k0 + 2 * (lane % 4);
  const float s0 = s[k], s1 = s[k + 1], s8 = s[k + 8], s9 = s[k + 9];
  FragA<T> r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = MmaOps<T>::unpack(a.r[i]);
    r.r[i] = (i < 2) ? MmaOps<T>::pack(v.x * s0, v.y * s1) : MmaOps<T>::pack(v.x * s8, v.y * s9);
  }
  return r;
}

// The memory's output head for this lane's rows of a warp's 16-row tile: f (D / 8 n-tiles)
// -> xhat in place (with LayerNorm), y = [x +] [gamma xhat + beta].
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

  // y for element e of n-tile nt (normalized f), x = this row of the input tile in shared.
  template <typename T>
  __device__ __forceinline__ float y(const float (&f)[D / 8][4], int nt, int e, const T* s_x,
                                     int ldx, int row_lo, int lane) const {
    const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
    float v = f[nt][e];
    if (gamma != nullptr) v = v * __ldg(gamma + col) + (beta != nullptr ? __ldg(beta + col) : 0.f);
    if (residual) v += static_cast<float>(s_x[(row_lo + (e >> 1) * 8) * ldx + col]);
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

// Token addresses of sequence n: element (t, h, 0) of a [.., T, H, D] tensor.
struct Rows {
  int64_t n_part, start, t_stride, h_part;
  __device__ __forceinline__ int64_t at(int64_t t) const {
    return n_part + (start + t) * t_stride + h_part;
  }
};

template <typename T, int D, int C, int kDepth, int HB>
__global__ void __launch_bounds__(Threads<C>::kThreads)
    chunked_kernel(const NeuralMemoryParams p) {
  constexpr int kThreads = Threads<C>::kThreads, kWarps = Threads<C>::kWarps;
  constexpr int kRowGroups = C / 16;
  constexpr int kLdD = D + 8;
  constexpr int kBW = kDepth == 2 ? HB : D;  // width of a staged layer-1 block
  constexpr int kLdB = kBW + 8;
  constexpr int kLdG = C + 4;
  constexpr int kNtD = D / 8, kNtB = kBW / 8, kNtC = C / 8;
  const int hidden = kDepth == 2 ? p.hidden : D;
  const int ld_h = hidden + 8;
  const int n_blocks = kDepth == 2 ? hidden / HB : 1;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Layout lay = make_layout(D, C, kDepth, HB, hidden, sizeof(T));
  T* s_q = reinterpret_cast<T*>(smem_raw + lay.q);
  T* s_k = reinterpret_cast<T*>(smem_raw + lay.k);
  T* s_hk = reinterpret_cast<T*>(smem_raw + lay.hk);    // [C][hidden] phi(zk)   (depth 2)
  T* s_dz1 = reinterpret_cast<T*>(smem_raw + lay.dz1);  // [C][hidden] phi'(zk), then dz1
  T* s_dz2 = reinterpret_cast<T*>(smem_raw + lay.dz2);  // [C][D] dz2             (depth 2)
  T* s_b1 = reinterpret_cast<T*>(smem_raw + lay.b1);    // W1 block [D][kBW]
  T* s_b3 = reinterpret_cast<T*>(smem_raw + lay.b3);    // S1 block [D][kBW]
  T* s_b2 = reinterpret_cast<T*>(smem_raw + lay.b2);    // W2 block [HB][D]      (depth 2)
  T* s_b4 = reinterpret_cast<T*>(smem_raw + lay.b4);    // S2 block [HB][D]      (depth 2)
  float* s_g = reinterpret_cast<float*>(smem_raw + lay.g);  // G [C][C]
  float* s_theta = reinterpret_cast<float*>(smem_raw + lay.vec);
  float* s_a = s_theta + C;
  float* s_eta = s_a + C;
  float* s_act = s_eta + C;
  float* s_m = s_act + C;
  float* s_beta = s_m + C;
  float* s_c = s_beta + C;
  float* s_gneg = s_c + C;  // -G[C-1, :]
  float* s_nneg = s_gneg + C;  // -N[C-1, :]

  const int h = blockIdx.x, n = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = warp * 16, row_lo = m0 + lane / 4;
  const bool row_warp = warp < kRowGroups;

  int64_t start = 0, len = p.seqlen, row_base = int64_t(n) * p.seqlen;
  if (p.cu_seqlens != nullptr) {
    start = p.cu_seqlens[n];
    len = p.cu_seqlens[n + 1] - start;
    row_base = start;
  }
  const bool packed = p.cu_seqlens != nullptr;
  const Rows rq{packed ? 0 : n * p.q_n_stride, start, p.q_t_stride, h * p.q_h_stride};
  const Rows rk{packed ? 0 : n * p.k_n_stride, start, p.k_t_stride, h * p.k_h_stride};
  const Rows rv{packed ? 0 : n * p.v_n_stride, start, p.v_t_stride, h * p.v_h_stride};
  const Rows ro{0, row_base, int64_t(p.heads) * D, int64_t(h) * D};
  const T* __restrict__ gq = static_cast<const T*>(p.q);
  const T* __restrict__ gk = static_cast<const T*>(p.k);
  const T* __restrict__ gv = static_cast<const T*>(p.v);
  T* __restrict__ go = static_cast<T*>(p.o);

  const int off = p.offset != nullptr ? p.offset[n] : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;
  const int final_off = int((off + len) % C);

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

  if (n_chunks == 0) {  // no tokens: the state passes through
#pragma unroll
    for (int l = 0; l < kDepth; ++l) {
      copy_state<kThreads>(w_dst[l], w_src[l], size[l]);
      copy_state<kThreads>(s_dst[l], s_src[l], size[l]);
      if (cw_dst[l] != nullptr) copy_state<kThreads>(cw_dst[l], cw_src[l], size[l]);
    }
    return;
  }

  const Head<D> head{p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr,
                     p.ln_weight != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr,
                     p.ln_eps, p.residual, {1.f, 1.f}};

  for (int j = 0; j < n_chunks; ++j) {
    const bool first = j == 0;
    const float *wsrc[2], *ssrc[2], *gsrc[2];
#pragma unroll
    for (int l = 0; l < kDepth; ++l) {
      wsrc[l] = first ? w_src[l] : w_dst[l];
      ssrc[l] = first ? s_src[l] : s_dst[l];
      gsrc[l] = first ? cw_src[l] : w_dst[l];
    }
    // the open chunk's weights of the final state: this chunk's gradient weights
    if (j == n_chunks - 1 && final_off > 0) {
#pragma unroll
      for (int l = 0; l < kDepth; ++l)
        if (cw_dst[l] != nullptr) copy_state<kThreads>(cw_dst[l], gsrc[l], size[l]);
    }

    // ---- load: q, k rows and gates of the chunk's slots ----
    const int64_t t0 = int64_t(j) * C - off;  // token of slot 0
    {
      constexpr int kVec = 16 / sizeof(T);
      for (int i = tid; i < 2 * C * (D / kVec); i += kThreads) {
        const int which = i / (C * (D / kVec));
        const int r = (i / (D / kVec)) % C, c = (i % (D / kVec)) * kVec;
        const int64_t t = t0 + r;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (t >= 0 && t < len) {
          val = which == 0 ? *reinterpret_cast<const uint4*>(gq + rq.at(t) + c)
                           : *reinterpret_cast<const uint4*>(gk + rk.at(t) + c);
        }
        *reinterpret_cast<uint4*>((which == 0 ? s_q : s_k) + r * kLdD + c) = val;
      }
      if (tid < C) {
        const int64_t t = t0 + tid;
        const bool act = t >= 0 && t < len;
        const int64_t gi = (row_base + t) * p.heads + h;
        s_theta[tid] = act ? __ldg(p.lr + gi) : 0.f;
        s_a[tid] = act ? 1.f - __ldg(p.forget + gi) : 1.f;
        s_eta[tid] = act ? __ldg(p.momentum + gi) : 1.f;
        s_act[tid] = act ? 1.f : 0.f;
      }
    }
    __syncthreads();

    // ---- gates ----
    if (tid < C) {
      const int col = tid;
      float nv = 0.f, gv = 0.f;
      for (int t = 0; t < C; ++t) {
        if (t == col) {
          nv = s_theta[t];
          gv = s_act[t] * nv;
        } else if (t > col) {
          nv *= s_eta[t];
          gv = s_a[t] * gv + s_act[t] * nv;
        }
        s_g[t * kLdG + col] = gv;
      }
      s_gneg[col] = -gv;
      s_nneg[col] = -nv;
    } else if (tid == kThreads - 1) {
      float m = 1.f, beta = 1.f, c = 0.f;
      for (int t = 0; t < C; ++t) {
        m *= s_eta[t];
        beta *= s_a[t];
        c = s_a[t] * c + s_act[t] * m;
        s_m[t] = m;
        s_beta[t] = beta;
        s_c[t] = c;
      }
    }

    // ---- keys: forward at Wg ----
    float fk[kNtD][4] = {}, fq[kNtD][4] = {};
    for (int b = 0; b < n_blocks; ++b) {
      __syncthreads();  // gates done (b = 0) / the previous block's operands are no longer read
      if constexpr (kDepth == 2) {
        stage<T, D, HB, kLdB, kThreads>(s_b1, gsrc[0] + b * HB, hidden);
        stage<T, HB, D, kLdD, kThreads>(s_b2, gsrc[1] + int64_t(b) * HB * D, D);
      } else {
        stage<T, D, D, kLdB, kThreads>(s_b1, gsrc[0], D);
      }
      __syncthreads();
      if (!row_warp) continue;
      if constexpr (kDepth == 2) {
        float z[kNtB][4] = {};
        mma_smem<T, D, HB, true>(z, s_k, kLdD, m0, s_b1, kLdB, lane);
        FragA<T> ha[HB / 16];
#pragma unroll
        for (int nt = 0; nt < kNtB; ++nt) {
          float d1[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            d1[e] = activation_grad<T>(z[nt][e], p.activation);
            z[nt][e] = activation_fn<T>(z[nt][e], p.activation);
          }
          const int col = b * HB + nt * 8 + 2 * (lane % 4);
          store2(s_hk + row_lo * ld_h + col, z[nt][0], z[nt][1]);
          store2(s_hk + (row_lo + 8) * ld_h + col, z[nt][2], z[nt][3]);
          store2(s_dz1 + row_lo * ld_h + col, d1[0], d1[1]);
          store2(s_dz1 + (row_lo + 8) * ld_h + col, d1[2], d1[3]);
        }
#pragma unroll
        for (int kk = 0; kk < HB / 16; ++kk) pack_a(ha[kk], z[2 * kk], z[2 * kk + 1]);
        mma_reg_a<T, HB, D, true>(fk, ha, s_b2, kLdD, lane);
        if (p.read_chunk) {
          float zq[kNtB][4] = {};
          mma_smem<T, D, HB, true>(zq, s_q, kLdD, m0, s_b1, kLdB, lane);
#pragma unroll
          for (int kk = 0; kk < HB / 16; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              zq[2 * kk][e] = activation_fn<T>(zq[2 * kk][e], p.activation);
              zq[2 * kk + 1][e] = activation_fn<T>(zq[2 * kk + 1][e], p.activation);
            }
            pack_a(ha[kk], zq[2 * kk], zq[2 * kk + 1]);
          }
          mma_reg_a<T, HB, D, true>(fq, ha, s_b2, kLdD, lane);
        }
      } else {
        mma_smem<T, D, D, true>(fk, s_k, kLdD, m0, s_b1, kLdB, lane);
        if (p.read_chunk) mma_smem<T, D, D, true>(fq, s_q, kLdD, m0, s_b1, kLdB, lane);
      }
    }

    // ---- head of the keys: dl/df of the last layer -> shared (and registers, depth 2) ----
    FragA<T> dfa[D / 16];
    if (row_warp) {
      Head<D> hd = head;
      hd.normalize(fk);
      float dy[kNtD][4];
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t t = t0 + row_lo + 8 * half;
          float2 g = make_float2(0.f, 0.f);
          if (t >= 0 && t < len) {
            const float2 vv = load2(gv + rv.at(t) + col);
            g.x = 2.f * (hd.y(fk, nt, 2 * half, s_k, kLdD, row_lo, lane) - vv.x);
            g.y = 2.f * (hd.y(fk, nt, 2 * half + 1, s_k, kLdD, row_lo, lane) - vv.y);
          }
          dy[nt][2 * half] = g.x;
          dy[nt][2 * half + 1] = g.y;
        }
      }
      hd.backward(dy, fk, lane);
      T* s_last = kDepth == 2 ? s_dz2 : s_dz1;
      const int ld_last = kDepth == 2 ? kLdD : ld_h;
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
        store2(s_last + row_lo * ld_last + col, dy[nt][0], dy[nt][1]);
        store2(s_last + (row_lo + 8) * ld_last + col, dy[nt][2], dy[nt][3]);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) pack_a(dfa[kk], dy[2 * kk], dy[2 * kk + 1]);

      if (p.read_chunk) {  // o = M_Wg(q)
        Head<D> hq = head;
        hq.normalize(fq);
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt) {
          const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t t = t0 + row_lo + 8 * half;
            if (t >= 0 && t < len) {
              store2(go + ro.at(t) + col, hq.y(fq, nt, 2 * half, s_q, kLdD, row_lo, lane),
                     hq.y(fq, nt, 2 * half + 1, s_q, kLdD, row_lo, lane));
            }
          }
        }
      }
    }

    // ---- errors of layer 1 (depth 2): dz1 = (dz2 W2g^T) * phi'(zk) ----
    if constexpr (kDepth == 2) {
      for (int b = n_blocks - 1; b >= 0; --b) {
        if (b != n_blocks - 1) {
          __syncthreads();
          stage<T, HB, D, kLdD, kThreads>(s_b2, gsrc[1] + int64_t(b) * HB * D, D);
          __syncthreads();
        }
        if (!row_warp) continue;
        float dh[kNtB][4] = {};
        mma_reg_a<T, D, HB, false>(dh, dfa, s_b2, kLdD, lane);
#pragma unroll
        for (int nt = 0; nt < kNtB; ++nt) {
          const int col = b * HB + nt * 8 + 2 * (lane % 4);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            T* at = s_dz1 + (row_lo + 8 * half) * ld_h + col;
            const float2 d1 = load2(at);
            store2(at, dh[nt][2 * half] * d1.x, dh[nt][2 * half + 1] * d1.y);
          }
        }
      }
    }
    __syncthreads();  // dz1, dz2, hk complete for every row

    // ---- read "token" through the dual form ----
    if (!p.read_chunk) {
      FragA<T> a1[C / 16], qb[D / 16], qc[D / 16];
      float beta_r[2] = {0.f, 0.f}, c_r[2] = {0.f, 0.f};
      if (row_warp) {
        float acc[kNtC][4] = {};
        mma_smem<T, D, C, false>(acc, s_q, kLdD, m0, s_k, kLdD, lane);  // q k^T
#pragma unroll
        for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = row_lo + (e >> 1) * 8, col = nt * 8 + 2 * (lane % 4) + (e & 1);
            acc[nt][e] *= -s_g[row * kLdG + col];
          }
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) pack_a(a1[kk], acc[2 * kk], acc[2 * kk + 1]);
        beta_r[0] = s_beta[row_lo], beta_r[1] = s_beta[row_lo + 8];
        c_r[0] = s_c[row_lo], c_r[1] = s_c[row_lo + 8];
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          FragA<T> a;
          load_a(a, s_q, kLdD, m0, kk * 16, lane);
          qb[kk] = scale_rows(a, beta_r[0], beta_r[1]);
          qc[kk] = scale_rows(a, c_r[0], c_r[1]);
        }
      }
      float z2[kNtD][4] = {}, pp[kNtC][4] = {};
      for (int b = 0; b < n_blocks; ++b) {
        __syncthreads();  // the previous block's operands are no longer read
        if constexpr (kDepth == 2) {
          stage<T, D, HB, kLdB, kThreads>(s_b1, wsrc[0] + b * HB, hidden);
          stage<T, D, HB, kLdB, kThreads>(s_b3, ssrc[0] == nullptr ? nullptr : ssrc[0] + b * HB,
                                          hidden);
          stage<T, HB, D, kLdD, kThreads>(s_b2, wsrc[1] + int64_t(b) * HB * D, D);
          stage<T, HB, D, kLdD, kThreads>(
              s_b4, ssrc[1] == nullptr ? nullptr : ssrc[1] + int64_t(b) * HB * D, D);
        } else {
          stage<T, D, D, kLdB, kThreads>(s_b1, wsrc[0], D);
          stage<T, D, D, kLdB, kThreads>(s_b3, ssrc[0], D);
        }
        __syncthreads();
        if (!row_warp) continue;
        float z[kNtB][4] = {};
        mma_reg_a<T, D, kBW, true>(z, qb, s_b1, kLdB, lane);
        mma_reg_a<T, D, kBW, true>(z, qc, s_b3, kLdB, lane);
        mma_reg_a<T, C, kBW, true>(z, a1, s_dz1 + b * kBW, ld_h, lane);
        if constexpr (kDepth == 2) {
#pragma unroll
          for (int kk = 0; kk < HB / 16; ++kk) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              z[2 * kk][e] = activation_fn<T>(z[2 * kk][e], p.activation);
              z[2 * kk + 1][e] = activation_fn<T>(z[2 * kk + 1][e], p.activation);
            }
            FragA<T> hf;
            pack_a(hf, z[2 * kk], z[2 * kk + 1]);
            const FragA<T> hb = scale_rows(hf, beta_r[0], beta_r[1]);
            const FragA<T> hc = scale_rows(hf, c_r[0], c_r[1]);
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
              FragB<T> bw[2], bs[2];
              load_b2_kmajor(bw, s_b2, kLdD, kk * 16, np * 16, lane);
              load_b2_kmajor(bs, s_b4, kLdD, kk * 16, np * 16, lane);
              mma(z2[2 * np], hb, bw[0]);
              mma(z2[2 * np + 1], hb, bw[1]);
              mma(z2[2 * np], hc, bs[0]);
              mma(z2[2 * np + 1], hc, bs[1]);
            }
#pragma unroll
            for (int np = 0; np < C / 16; ++np) {
              FragB<T> bh[2];  // hk^T: [k = hidden][n = token], stored [token][hidden]
              load_b2(bh, s_hk + b * HB, ld_h, kk * 16, np * 16, lane);
              mma(pp[2 * np], hf, bh[0]);
              mma(pp[2 * np + 1], hf, bh[1]);
            }
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) z2[nt][e] = z[nt][e];
        }
      }
      if (row_warp) {
        if constexpr (kDepth == 2) {
#pragma unroll
          for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = row_lo + (e >> 1) * 8, col = nt * 8 + 2 * (lane % 4) + (e & 1);
              pp[nt][e] *= -s_g[row * kLdG + col];
            }
          FragA<T> a2[C / 16];
#pragma unroll
          for (int kk = 0; kk < C / 16; ++kk) pack_a(a2[kk], pp[2 * kk], pp[2 * kk + 1]);
          mma_reg_a<T, C, D, true>(z2, a2, s_dz2, kLdD, lane);
        }
        Head<D> hq = head;
        hq.normalize(z2);
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt) {
          const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t t = t0 + row_lo + 8 * half;
            if (t >= 0 && t < len) {
              store2(go + ro.at(t) + col, hq.y(z2, nt, 2 * half, s_q, kLdD, row_lo, lane),
                     hq.y(z2, nt, 2 * half + 1, s_q, kLdD, row_lo, lane));
            }
          }
        }
      }
    }

    // ---- state after the chunk: 16 x 16 tiles of every layer over all warps ----
    // (every read of W0 / S0 into shared memory happened before the last __syncthreads)
    {
      const float beta_c = s_beta[C - 1], c_c = s_c[C - 1], m_c = s_m[C - 1];
      const int n_tiles1 = (D / 16) * (hidden / 16);
      const int n_tiles2 = kDepth == 2 ? (hidden / 16) * (D / 16) : 0;
      for (int item = warp; item < n_tiles1 + n_tiles2; item += kWarps) {
        const bool l2 = item >= n_tiles1;
        const int it = l2 ? item - n_tiles1 : item;
        const int cols = l2 ? D : hidden;
        const int tm0 = (it / (cols / 16)) * 16, tn0 = (it % (cols / 16)) * 16;
        const int l = l2 ? 1 : 0;
        const T* sa = l2 ? s_hk : s_k;  // [token][row of W]
        const int lda = l2 ? ld_h : kLdD;
        const T* sb = l2 ? s_dz2 : s_dz1;  // [token][col of W]
        const int ldb = l2 ? kLdD : ld_h;
        float aw[2][4], as[2][4];
        const int r = tm0 + lane / 4;
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t at = int64_t(r + 8 * half) * cols + tn0 + t * 8 + 2 * (lane % 4);
            const float2 w = __ldcg(reinterpret_cast<const float2*>(wsrc[l] + at));
            const float2 s = ssrc[l] != nullptr
                ? __ldcg(reinterpret_cast<const float2*>(ssrc[l] + at)) : make_float2(0.f, 0.f);
            aw[t][2 * half] = beta_c * w.x + c_c * s.x;
            aw[t][2 * half + 1] = beta_c * w.y + c_c * s.y;
            as[t][2 * half] = m_c * s.x;
            as[t][2 * half + 1] = m_c * s.y;
          }
#pragma unroll
        for (int ks = 0; ks < C / 16; ++ks) {
          FragA<T> a;
          load_a_kmajor(a, sa, lda, tm0, ks * 16, lane);
          const FragA<T> ag = scale_cols(a, s_gneg, ks * 16, lane);
          const FragA<T> an = scale_cols(a, s_nneg, ks * 16, lane);
          FragB<T> bb[2];
          load_b2_kmajor(bb, sb, ldb, ks * 16, tn0, lane);
          mma(aw[0], ag, bb[0]);
          mma(aw[1], ag, bb[1]);
          mma(as[0], an, bb[0]);
          mma(as[1], an, bb[1]);
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t at = int64_t(r + 8 * half) * cols + tn0 + t * 8 + 2 * (lane % 4);
            *reinterpret_cast<float2*>(w_dst[l] + at) = make_float2(aw[t][2 * half],
                                                                    aw[t][2 * half + 1]);
            *reinterpret_cast<float2*>(s_dst[l] + at) = make_float2(as[t][2 * half],
                                                                    as[t][2 * half + 1]);
          }
      }
    }
    __syncthreads();  // the new state is visible to the next chunk's staging
  }

  if (final_off == 0) {  // no chunk left open: the chunk weights are the final weights
#pragma unroll
    for (int l = 0; l < kDepth; ++l)
      if (cw_dst[l] != nullptr) copy_state<kThreads>(cw_dst[l], w_dst[l], size[l]);
  }
}

template <typename T, int D, int C, int kDepth>
cudaError_t launch(const NeuralMemoryParams& p, cudaStream_t stream) {
  constexpr int HB = hidden_block<D>();
  const size_t smem = make_layout(D, C, kDepth, HB, kDepth == 2 ? p.hidden : D, sizeof(T)).total;
  auto kernel = chunked_kernel<T, D, C, kDepth, HB>;
  TITANS_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned(p.heads), unsigned(p.n_seq));
  kernel<<<grid, Threads<C>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The instances of one (dtype, D), compiled in their own translation unit.
template <typename T, int D>
cudaError_t by_chunk(const NeuralMemoryParams& p, cudaStream_t stream) {
  auto by_depth = [&](auto chunk_tag) {
    constexpr int C = decltype(chunk_tag)::value;
    return p.depth == 1 ? launch<T, D, C, 1>(p, stream) : launch<T, D, C, 2>(p, stream);
  };
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
