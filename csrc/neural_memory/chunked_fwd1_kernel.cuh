// A second forward of neural_memory_chunked (chunked.h) at depth 1 (M_W(x) = [x +] [LN](x W),
// W: D x D), either read, with the depth-1 backward's structure (chunked_bwd1_kernel.cuh) and
// its helpers: every product in fp32 on CUDA cores from shared memory, 256 threads as a 16 x 16
// grid, row mode for the LayerNorm heads, and a (sequence, head) over a cluster of S CTAs that
// own D / S output columns each (the LayerNorm's row sums cross the cluster; A = q k^T and the
// gates are computed by every CTA). It serves fp32 inputs (its products are exact to fp32
// rounding, as SPEC §7's 1e-5 needs), which the split-bf16 kernel (chunked_kernel.cuh) does
// not, and D = 128 where the split-bf16 kernel's plan does not fit (chunk 64) or where its one
// CTA per (sequence, head) leaves most SMs idle (small batches; chunked.cu, f1_preferred).
//
// Unlike the split-bf16 kernel the state stays on chip: the CTA's columns of W and S are staged
// once into shared memory, updated there chunk by chunk, and written to the output tensors at
// the end (the backward's checkpoints, every ckpt_every-th chunk start, are copied out as the
// walk passes them). Per chunk (gneg = -G[C-1, :], nneg = -N[C-1, :]):
//
//   load      q, k rows (fp32), gates; an open chunk 0's weights Wg; G (column recurrences)
//   keys      fk = k Wg; (row mode) y = [k +] [LN](fk), e = 2 (y - v), dz = [J(gamma e)] e
//   read      token: z = beta (q W0) + c (q S0) - (G * q k^T) dz; chunk: z = q Wg;
//             (row mode) o = [q +] [LN](z)
//   state     W = beta_C W0 + c_C S0 + k^T (gneg dz),  S = m_C S0 + k^T (nneg dz)
//
// Sub-chunks (params.h sub = R > 1: chunk 128 as 2 x 64 at D <= 64, chunks 64 / 128 as 32s at
// D = 128, where the depth-1 backward has no instance of the call's chunk): the walk is over
// sub-chunks, all of a call chunk's taking their gradients at (and for read "chunk" reading
// through) its start weights Wg, which its first sub-chunk copies into the Wg buffer for the
// others (the call's first chunk: cw_src there). Offsets and the final state's open chunk count
// in call chunks.
#pragma once

#include "chunked_bwd1_kernel.cuh"

namespace titans {
namespace chunked_fwd1 {

using chunked::Rows;
using chunked_bwd1::chunk_gates;
using chunked_bwd1::Exchange;
using chunked_bwd1::gemm;
using chunked_bwd1::keys_head;
using chunked_bwd1::kThreads;
using chunked_bwd1::launch_columns;
using chunked_bwd1::ln_stats;
using chunked_bwd1::load_rows;
using chunked_bwd1::put;
using chunked_bwd1::read_z_token;
using chunked_bwd1::row_totals;
using chunked_bwd1::st1;
using chunked_bwd1::stage_cols;
using chunked_bwd1::zero;

// Shared memory in floats: q and k (C x D), fk / dz and z (C x DS, this CTA's columns), W, S
// and an open chunk's Wg (D x DS), A and G (C x C), nine row vectors and (S > 1) the cluster's
// two exchange buffers (a head's row sums: at most two values per row).
struct LayoutF1 {
  int ld, ls, lc, q, k, t, z, w, s, wg, a, g, vec, x, xf, total;
};
constexpr int kVecsF1 = 9;
__host__ __device__ constexpr LayoutF1 make_layout_f1(int D, int C, int S) {
  const int ds = D / S, ld = D + 1, ls = ds + 1, lc = C + 1;
  const int rm = C * ld, rs = C * ls, dm = D * ls, cm = C * lc;
  const int q = 0, k = q + rm, t = k + rm, z = t + rs, w = z + rs, s = w + dm, wg = s + dm;
  const int a = wg + dm, g = a + cm, vec = g + cm, x = vec + kVecsF1 * C;
  const int xf = S > 1 ? 2 * C : 0;
  return LayoutF1{ld, ls, lc, q, k, t, z, w, s, wg, a, g, vec, x, xf, x + 2 * xf};
}
__host__ __device__ constexpr size_t smem_bytes_f1(int D, int C, int S) {
  return size_t(make_layout_f1(D, C, S).total) * sizeof(float);
}
constexpr int kSplitF1At128 = chunked_bwd1::kSplit128;  // D = 128: always a cluster of 4

template <typename TIn, int D, int C, int S>
__global__ void __launch_bounds__(kThreads, 1) fwd1_kernel(const NeuralMemoryParams p) {
  constexpr int DS = D / S;  // this CTA's output columns of W
  constexpr LayoutF1 L = make_layout_f1(D, C, S);
  constexpr int LD = L.ld, LS = L.ls, LC = L.lc;
  constexpr int TC = C / 16, TD = D / 16, TS = DS / 16;
  constexpr int kTPR = kThreads / C;  // row mode: threads per row
  constexpr int kCPT = DS / kTPR;     // and columns per thread
  static_assert(C % 16 == 0 && DS % 16 == 0 && kTPR <= 32 && kCPT >= 1, "shape");

  extern __shared__ __align__(16) float sm[];
  float* sQ = sm + L.q;    // C x D (every column)
  float* sK = sm + L.k;
  float* sT = sm + L.t;    // fk, then dz (C x DS)
  float* sZ = sm + L.z;    // the read's z (C x DS)
  float* sW = sm + L.w;    // W, S (D x DS), resident across the chunks
  float* sS = sm + L.s;
  float* sWg = sm + L.wg;  // Wg where it is not W (an open chunk 0; sub-chunks)
  float* sA = sm + L.a;    // q k^T
  float* sG = sm + L.g;
  float* v_theta = sm + L.vec;
  float* v_a = v_theta + C;
  float* v_eta = v_a + C;
  float* v_act = v_eta + C;
  float* v_m = v_act + C;
  float* v_beta = v_m + C;
  float* v_c = v_beta + C;
  float* v_gneg = v_c + C;
  float* v_nneg = v_gneg + C;
  Exchange<S> xc{sm + L.x, L.xf, 0};

  const int tid = threadIdx.x;
  const int tr = tid / 16, tc = tid % 16;
  const int h = blockIdx.x / S, rank = blockIdx.x % S, n = blockIdx.y;
  const int col0 = rank * DS;
  const chunked::SeqRows seq = chunked::seq_rows(p, n, h);
  const int64_t len = seq.len, row_base = seq.row_base;
  const Rows rq = seq.q, rk = seq.k, rv = seq.v;
  const Rows ro{0, row_base, int64_t(p.heads) * D, int64_t(h) * D};  // o
  const TIn* __restrict__ gq = static_cast<const TIn*>(p.q);
  const TIn* __restrict__ gk = static_cast<const TIn*>(p.k);
  const TIn* __restrict__ gv = static_cast<const TIn*>(p.v);
  TIn* __restrict__ go = static_cast<TIn*>(p.o);

  const int off = p.offset != nullptr ? int(p.offset[n]) : 0;
  const int n_chunks = len > 0 ? int((off + len + C - 1) / C) : 0;
  const int R = p.sub > 1 ? p.sub : 1;  // sub-chunks per call chunk (above)
  const int final_off = int((off + len) % (int64_t(C) * R));
  const int64_t size = int64_t(D) * D;
  const int64_t nh = int64_t(n) * p.heads + h;
  const float* w_src = p.w_in[0] + n * p.w_in_n_stride[0] + h * p.w_in_h_stride[0];
  const float* s_src = p.s_in[0] != nullptr ? p.s_in[0] + nh * size : nullptr;
  const float* cw_src = p.cw_in[0] != nullptr && off > 0 ? p.cw_in[0] + nh * size : w_src;
  float* w_dst = p.w_out[0] + nh * size;
  float* s_dst = p.s_out[0] + nh * size;
  float* cw_dst = p.cw_out[0] != nullptr ? p.cw_out[0] + nh * size : nullptr;
  const float* gamma = p.ln_weight != nullptr ? p.ln_weight + h * D : nullptr;
  const float* lbeta = gamma != nullptr && p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;

  // This CTA's columns of a D x D matrix (row stride D) from shared memory (row stride LS).
  auto put_cols = [&](float* dst, const float* src) {
    for (int i = tid; i < D * DS; i += kThreads) {
      const int r = i / DS, c = i % DS;
      dst[int64_t(r) * D + col0 + c] = src[r * LS + c];
    }
  };
  if (n_chunks == 0) {  // no tokens: the state passes through (this CTA's columns)
    for (int i = tid; i < D * DS; i += kThreads) {
      const int64_t e = int64_t(i / DS) * D + col0 + i % DS;
      w_dst[e] = w_src[e];
      s_dst[e] = s_src != nullptr ? s_src[e] : 0.f;
      if (cw_dst != nullptr) cw_dst[e] = cw_src[e];
    }
    return;
  }
  stage_cols<D, DS>(sW, LS, w_src + col0);
  if (s_src != nullptr) {
    stage_cols<D, DS>(sS, LS, s_src + col0);
  } else {
    for (int i = tid; i < D * DS; i += kThreads) sS[(i / DS) * LS + i % DS] = 0.f;
  }

  const int rr = tid / kTPR, rc0 = (tid % kTPR) * kCPT;  // row mode: row, first column (local)
  const int gc0 = col0 + rc0;                            // and its column of D
  const bool rlead = tid % kTPR == 0;
  auto tot = [&](auto& v) { row_totals<kTPR, C, S>(xc, v, rr, rlead); };
  const float inv_d = 1.f / float(D);

  for (int j = 0; j < n_chunks; ++j) {
    // the gradient weights: W at a call chunk's first sub-chunk (but an open chunk 0's), else
    // sWg (staged at chunk 0, or copied from W at the call chunk's first sub-chunk)
    const bool g_is_w = j % R == 0 && (j >= R || cw_src == w_src);
    const float* sWgp = g_is_w ? sW : sWg;
    const int64_t t0 = int64_t(j) * C - off;

    // ---- load; the backward's checkpoint of this chunk's start state ----
    __syncthreads();  // the previous chunk's state update (and the first staging) is done
    if (p.ckpt_every > 0 && j % p.ckpt_every == 0) {
      const int64_t slot = (int64_t(j / p.ckpt_every) * p.n_seq + n) * p.heads + h;
      put_cols(p.ckpt_w[0] + slot * size, sW);
      put_cols(p.ckpt_s[0] + slot * size, sS);
    }
    load_rows<TIn, D, C>(sQ, sK, LD, gq, gk, rq, rk, t0, len);
    if (j == 0 && !g_is_w) stage_cols<D, DS>(sWg, LS, cw_src + col0);
    if (R > 1 && g_is_w) {  // the call chunk's start weights, for its later sub-chunks
      for (int i = tid; i < D * DS; i += kThreads) {
        const int at = (i / DS) * LS + i % DS;
        sWg[at] = sW[at];
      }
    }
    if (tid < C) chunked::load_gates(tid, p, row_base, h, t0, len, v_theta, v_a, v_eta, v_act);
    __syncthreads();
    if (j == n_chunks - 1 && final_off > 0 && cw_dst != nullptr) {
      put_cols(cw_dst, sWgp);  // the final state's open chunk: this chunk's gradient weights
    }

    // ---- G, the scalars; fk = k Wg; A = q k^T (token) or z = q Wg (chunk) ----
    chunk_gates<C>(tid, v_theta, v_a, v_eta, v_act, sG, LC, v_gneg, v_nneg, v_m, v_beta, v_c);
    {
      float f[TC][TS];
      zero(f);
      gemm<TC, TS, D>(f, tr, tc, [&](int m, int k) { return sK[m * LD + k]; },
                      [&](int k, int c) { return sWgp[k * LS + c]; });
      put(sT, LS, tr, tc, f);
    }
    if (p.read_chunk) {
      float z[TC][TS];
      zero(z);
      gemm<TC, TS, D>(z, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                      [&](int k, int c) { return sWgp[k * LS + c]; });
      put(sZ, LS, tr, tc, z);
    } else {
      float a[TC][TC];
      zero(a);
      gemm<TC, TC, D>(a, tr, tc, [&](int m, int k) { return sQ[m * LD + k]; },
                      [&](int k, int c) { return sK[c * LD + k]; });
      put(sA, LC, tr, tc, a);
    }
    __syncthreads();

    // ---- the keys' head (row mode): e = 2 (y - v), dz = J(gamma e) (LN) or e ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float f[kCPT], e[kCPT], xh[kCPT];
      float rstd = 1.f;
#pragma unroll
      for (int c = 0; c < kCPT; ++c) f[c] = sT[rr * LS + rc0 + c];
      keys_head(f, e, xh, rstd, gamma != nullptr ? gamma + gc0 : nullptr,
                lbeta != nullptr ? lbeta + gc0 : nullptr, sK + rr * LD + gc0,
                active ? gv + rv.at(t) + gc0 : nullptr, p.residual, p.ln_eps, inv_d, tot);
#pragma unroll
      for (int c = 0; c < kCPT; ++c) sT[rr * LS + rc0 + c] = f[c];
    }
    __syncthreads();

    // ---- the read's z (token): beta (q W0) + c (q S0) - (G * A) dz ----
    if (!p.read_chunk) {
      float z[TC][TS], hw[TC][TS], hs[TC][TS];
      read_z_token<TC, TS, D, C>(z, hw, hs, tr, tc, sQ, LD, sW, sS, LS, sG, sA, LC, sT, v_beta,
                                 v_c);
      put(sZ, LS, tr, tc, z);
    }
    __syncthreads();  // z complete; W0, S0 no longer read but by their own updaters below

    // ---- the read's head (row mode): o = [q +] [LN](z), this CTA's columns ----
    {
      const int64_t t = t0 + rr;
      const bool active = t >= 0 && t < len;
      float x[kCPT], xh[kCPT];
#pragma unroll
      for (int c = 0; c < kCPT; ++c) x[c] = sZ[rr * LS + rc0 + c];
      if (gamma != nullptr) {
        ln_stats(x, xh, inv_d, p.ln_eps, tot);
#pragma unroll
        for (int c = 0; c < kCPT; ++c)
          x[c] = __ldg(gamma + gc0 + c) * xh[c] + (lbeta != nullptr ? __ldg(lbeta + gc0 + c) : 0.f);
      }
      if (active) {
#pragma unroll
        for (int c = 0; c < kCPT; ++c)
          st1(go + ro.at(t) + gc0 + c, x[c] + (p.residual ? sQ[rr * LD + gc0 + c] : 0.f));
      }
    }

    // ---- the state (this CTA's columns), in place: each thread reads and writes its own
    // elements of W, S ----
    {
      float aw[TD][TS], as[TD][TS];
      zero(aw);
      zero(as);
      gemm<TD, TS, C>(aw, tr, tc, [&](int m, int k) { return sK[k * LD + m] * v_gneg[k]; },
                      [&](int k, int c) { return sT[k * LS + c]; });
      gemm<TD, TS, C>(as, tr, tc, [&](int m, int k) { return sK[k * LD + m] * v_nneg[k]; },
                      [&](int k, int c) { return sT[k * LS + c]; });
      const float beta_c = v_beta[C - 1], c_c = v_c[C - 1], m_c = v_m[C - 1];
#pragma unroll
      for (int i = 0; i < TD; ++i)
#pragma unroll
        for (int jj = 0; jj < TS; ++jj) {
          const int at = (tr + 16 * i) * LS + tc + 16 * jj;
          const float w0 = sW[at], s0 = sS[at];
          sW[at] = beta_c * w0 + c_c * s0 + aw[i][jj];
          sS[at] = m_c * s0 + as[i][jj];
        }
    }
  }
  __syncthreads();
  put_cols(w_dst, sW);
  put_cols(s_dst, sS);
  if (final_off == 0 && cw_dst != nullptr) put_cols(cw_dst, sW);  // no chunk left open
  if constexpr (S > 1) xc.sync();  // no CTA exits while another may still read its buffers
}

// CTAs per (sequence, head) (params.h split): the depth-1 column split, launch_columns
// (chunked_bwd1_kernel.cuh).
template <typename TIn, int D, int C>
cudaError_t launch_f1(const NeuralMemoryParams& p, cudaStream_t stream) {
  return launch_columns<D>(p, p.heads, p.n_seq, p.split, [](auto s) {
    constexpr int kS = decltype(s)::value;
    return std::make_pair(fwd1_kernel<TIn, D, C, kS>, smem_bytes_f1(D, C, kS));
  }, stream);
}

// Whether bf16 / fp16 inputs at D = 128 with chunk 16 or 32, which the split-bf16 kernel also
// runs (one CTA per (sequence, head)), take this kernel instead: where its clusters of 4 need
// at most one SM per CTA and all fit at once, i.e. small batches. Measured on an H100 (B = 2 /
// 8, T = 8192 / 2048, H = 8, C = 32, bf16; docs/perf_notes.md v24): forward 13.8 -> 8.7 ms at
// 16 (sequence, head) pairs, but 3.5 -> 6.5 ms at 64 (256 CTAs).
template <typename TIn, int D>
bool f1_preferred(const NeuralMemoryParams& p) {
  if constexpr (D != 128) {
    return false;
  } else {
    if (p.depth != 1 || p.chunk > 32) return false;
    const int64_t pairs = int64_t(p.heads) * p.n_seq;
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    if (pairs * kSplitF1At128 > sms) return false;
    auto all_fit = [&](auto kernel, size_t smem) {
      return allow_smem(kernel, smem) == cudaSuccess &&
             max_clusters(kernel, kSplitF1At128, smem, kThreads) >= pairs;
    };
    return p.chunk == 16 ? all_fit(fwd1_kernel<TIn, D, 16, kSplitF1At128>,
                                   smem_bytes_f1(D, 16, kSplitF1At128))
                         : all_fit(fwd1_kernel<TIn, D, 32, kSplitF1At128>,
                                   smem_bytes_f1(D, 32, kSplitF1At128));
  }
}

template <typename TIn, int D>
cudaError_t launch_f1_by_chunk(const NeuralMemoryParams& p, cudaStream_t stream) {
  switch (p.chunk) {
    case 16: return launch_f1<TIn, D, 16>(p, stream);
    case 32: return launch_f1<TIn, D, 32>(p, stream);
    case 64: return launch_f1<TIn, D, 64>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

#define TITANS_FWD1_INSTANCES(EXTERN, TIn, D)                                                 \
  EXTERN template cudaError_t launch_f1_by_chunk<TIn, D>(const NeuralMemoryParams&, cudaStream_t); \
  EXTERN template bool f1_preferred<TIn, D>(const NeuralMemoryParams&);
TITANS_FWD1_INSTANCES(extern, __nv_bfloat16, 128)
TITANS_FWD1_INSTANCES(extern, __half, 128)
TITANS_FWD1_INSTANCES(extern, float, 32)
TITANS_FWD1_INSTANCES(extern, float, 64)
TITANS_FWD1_INSTANCES(extern, float, 128)

}  // namespace chunked_fwd1
}  // namespace titans
