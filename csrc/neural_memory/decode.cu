// neural_memory_decode (decode.h): one CTA of kThreads threads per (sequence, head) (at small
// batches a cluster of 2 or 4, each CTA owning a slice of the hidden units: auto_split) walks
// the call's tokens; per token, with Wc the chunk weights and W, S the running state:
//
//   1. keys      z = k Wc1, h = phi(z), f = h Wc2   (column sums: thread (row lane, float4
//                column group) partials in shared memory, summed over lanes in a fixed order)
//   2. head      warp 0: y = [k +] [LN](f), dl/dy = 2 (y - v), LN backward -> dF
//   3. errors    dh = Wc2 dF (row sums: D / 4 lanes per row, shuffle tree), dz = dh phi'(z)
//   4. write     layer 1: S1 = eta S1 - theta k^T dz,  W1 = (1 - alpha) W1 + S1
//                layer 2: S2 = eta S2 - theta h^T dF,  W2 = (1 - alpha) W2 + S2
//                (one float4 pass each, the read "token" products q W1 and phi(q W1) W2 summed
//                 on the fly; the open chunk's weights written alongside when they change)
//   5. read      o = [q +] [LN](f_q)
// Depth 1 drops the hidden layer (f = k W1, u = k^T dF). read "chunk" evaluates M_Wc(q) in
// steps 1-2 instead. Tokens after the first read W and S back from the outputs, which the
// previous token wrote (the same CTA; __syncthreads orders them).
#include "decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cluster.cuh"
#include "../common/cuda_check.h"
#include "../common/launch.cuh"

namespace titans {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float from_float(float x) { return x; }

__device__ __forceinline__ float act(float z, int kind) {
  if (kind == 0) return z / (1.f + expf(-z));
  return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
}
__device__ __forceinline__ float act_grad(float z, int kind) {
  if (kind == 0) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
  }
  return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
         z * expf(-0.5f * z * z) * 0.39894228040143268f;
}

__device__ __forceinline__ float4 ld4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
// Dot products over the state accumulate in fp64: LayerNorm amplifies the rounding of its
// input wherever f's spread is small against its terms (README, precision), and the kernel is
// memory-bound, so the extra precision is free. Inputs and results stay fp32.
struct Acc4 {
  double x = 0., y = 0., z = 0., w = 0.;
};
__device__ __forceinline__ void fma4(Acc4& acc, float a, float4 w) {
  const double ad = a;
  acc.x = fma(ad, double(w.x), acc.x);
  acc.y = fma(ad, double(w.y), acc.y);
  acc.z = fma(ad, double(w.z), acc.z);
  acc.w = fma(ad, double(w.w), acc.w);
}

struct Smem {
  float q[kDecodeMaxDim], k[kDecodeMaxDim], v[kDecodeMaxDim];
  float f[kDecodeMaxDim], fq[kDecodeMaxDim], df[kDecodeMaxDim];
  float ln_w[kDecodeMaxDim], ln_b[kDecodeMaxDim];  // the head's LayerNorm, loaded once per call
  float z[kDecodeMaxHidden], hk[kDecodeMaxHidden], dphi[kDecodeMaxHidden];
  float zq[kDecodeMaxHidden], hq[kDecodeMaxHidden], dz[kDecodeMaxHidden];
  double red[2 * 4 * kThreads];  // column partials; group_sum's scratch when free
};

// Thread (row lane rl, float4 column group cg) of a row-major [R][Cn] matrix: G = Cn / 4
// groups, RL = kThreads / G lanes; lane rl covers rows rl, rl + RL, ...
struct Lanes {
  int G, RL, rl, cg;
  __device__ explicit Lanes(int Cn)
      : G(Cn / 4), RL(kThreads / (Cn / 4)), rl(threadIdx.x / (Cn / 4)),
        cg(threadIdx.x % (Cn / 4)) {}
  __device__ bool active() const { return rl < RL; }
};

__device__ __forceinline__ void st4(double* p, const Acc4& v) {
  p[0] = v.x;
  p[1] = v.y;
  p[2] = v.z;
  p[3] = v.w;
}

// Per-lane partials -> out[c] = sum over lanes (fixed order). `red` holds RL * Cn doubles per
// output.
__device__ void finish_columns(const Lanes& L, int Cn, const Acc4& a, float* out,
                               const Acc4* a2, float* out2, double* red) {
  if (L.active()) {
    st4(red + L.rl * Cn + 4 * L.cg, a);
    if (a2 != nullptr) st4(red + (L.RL + L.rl) * Cn + 4 * L.cg, *a2);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < Cn; c += kThreads) {
    double s = 0., s2 = 0.;
    for (int l = 0; l < L.RL; ++l) {
      s += red[l * Cn + c];
      if (out2 != nullptr) s2 += red[(L.RL + l) * Cn + c];
    }
    out[c] = float(s);
    if (out2 != nullptr) out2[c] = float(s2);
  }
  __syncthreads();
}

// out[c] = sum_r x[r] W[r][c] (and out2 with x2 when given) over [R][Cn] (row stride ld).
__device__ void col_products(const float* W, int R, int Cn, int64_t ld, const float* x,
                             float* out, const float* x2, float* out2, double* red) {
  const Lanes L(Cn);
  Acc4 a, a2;
  if (L.active()) {
    const float* base = W + 4 * L.cg;
    int r = L.rl;
    for (; r + 3 * L.RL < R; r += 4 * L.RL) {
      float4 w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) w[u] = ld4(base + (r + u * L.RL) * ld);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        fma4(a, x[r + u * L.RL], w[u]);
        if (x2 != nullptr) fma4(a2, x2[r + u * L.RL], w[u]);
      }
    }
    for (; r < R; r += L.RL) {
      const float4 w = ld4(base + r * ld);
      fma4(a, x[r], w);
      if (x2 != nullptr) fma4(a2, x2[r], w);
    }
  }
  finish_columns(L, Cn, a, out, x2 != nullptr ? &a2 : nullptr, out2, red);
}

// out[r] = mul[r] * sum_c W[r][c] y[c] over [R][Cn], Cn / 4 lanes per row (Cn <= 128).
__device__ void row_products(const float* W, int R, int Cn, const float* y, const float* mul,
                             float* out) {
  const int G = Cn / 4, rows = 32 / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / G, lg = lane % G;
  const float4 yy = make_float4(y[4 * lg], y[4 * lg + 1], y[4 * lg + 2], y[4 * lg + 3]);
  constexpr int kUnroll = 4;
  for (int r0 = warp * rows; r0 < R; r0 += kUnroll * kWarps * rows) {
    float4 w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = r0 + u * kWarps * rows + sub;
      w[u] = r < R ? ld4(W + int64_t(r) * Cn + 4 * lg) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = r0 + u * kWarps * rows + sub;
      double s = double(w[u].x) * yy.x + double(w[u].y) * yy.y + double(w[u].z) * yy.z +
                 double(w[u].w) * yy.w;
      for (int off = G / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (r < R && lg == 0) out[r] = float(s) * mul[r];
    }
  }
  __syncthreads();
}

// What a layer's write pass stores into the open chunk's weights.
enum class ChunkCopy : int { kNone, kOld, kSource, kNew };

// The write of one layer slice [R][Cn] (row stride ld): S = eta S - theta a^T b,
// W = decay W + S (both written),
// the open chunk's weights per `copy`, and out[c] = sum_r xq[r] W_new[r][c] when xq is given.
// w_src may alias w_dst and s_src s_dst (each element is read, then written, by one thread).
__device__ void write_layer(const float* w_src, const float* s_src, const float* cw_src,
                            float* w_dst, float* s_dst, float* cw_dst, ChunkCopy copy, int R,
                            int Cn, int64_t ld, const float* a, const float* b, float theta,
                            float eta,
                            float decay, const float* xq, float* out, double* red) {
  const Lanes L(Cn);
  Acc4 acc;
  if (L.active()) {
    const int c = 4 * L.cg;
    const float4 bb = make_float4(theta * b[c], theta * b[c + 1], theta * b[c + 2],
                                  theta * b[c + 3]);
    constexpr int kUnroll = 4;
    for (int r0 = L.rl; r0 < R; r0 += kUnroll * L.RL) {
      float4 w[kUnroll], s[kUnroll], cw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int r = r0 + u * L.RL;
        if (r < R) {
          const int64_t e = r * ld + c;
          w[u] = ld4(w_src + e);
          s[u] = s_src != nullptr ? ld4(s_src + e) : make_float4(0.f, 0.f, 0.f, 0.f);
          if (copy == ChunkCopy::kSource) cw[u] = ld4(cw_src + e);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int r = r0 + u * L.RL;
        if (r < R) {
          const int64_t e = r * ld + c;
          const float ar = a[r];
          if (copy == ChunkCopy::kOld) st4(cw_dst + e, w[u]);
          float4 sn, wn;
          sn.x = fmaf(eta, s[u].x, -ar * bb.x);
          sn.y = fmaf(eta, s[u].y, -ar * bb.y);
          sn.z = fmaf(eta, s[u].z, -ar * bb.z);
          sn.w = fmaf(eta, s[u].w, -ar * bb.w);
          wn.x = fmaf(decay, w[u].x, sn.x);
          wn.y = fmaf(decay, w[u].y, sn.y);
          wn.z = fmaf(decay, w[u].z, sn.z);
          wn.w = fmaf(decay, w[u].w, sn.w);
          st4(s_dst + e, sn);
          st4(w_dst + e, wn);
          if (copy == ChunkCopy::kSource) st4(cw_dst + e, cw[u]);
          if (copy == ChunkCopy::kNew) st4(cw_dst + e, wn);
          if (xq != nullptr) fma4(acc, xq[r], wn);
        }
      }
    }
  }
  if (xq != nullptr) {
    finish_columns(L, Cn, acc, out, nullptr, nullptr, red);
  } else {
    __syncthreads();
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Warp 0's row head on f [D] (statistics in fp64, like the dot products): with `target` (the
// key's v) writes dF = dl/df of ||[x +] [LN](f) - target||^2 into df; without, writes
// y = [x +] [LN](f) to o (global).
// gamma / beta: the head's LayerNorm weight and bias in shared memory (nullptr: none).
template <typename T>
__device__ void row_head(const float* f, const float* x, const float* target, float* df,
                         T* o, const DecodeParams& p, const float* gamma, const float* beta) {
  const int D = p.dim, lane = threadIdx.x % 32;
  constexpr int kPer = kDecodeMaxDim / 32;
  double xh[kPer], g[kPer];
  double rstd = 1.;
  if (gamma != nullptr) {
    double s = 0.;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < D) s += f[d];
    }
    const double mean = warp_sum(s) / D;
    double sq = 0.;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      xh[i] = d < D ? f[d] - mean : 0.;
      sq += xh[i] * xh[i];
    }
    rstd = 1. / sqrt(warp_sum(sq) / D + double(p.ln_eps));
  }
  double mg = 0., mgx = 0.;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d >= D) continue;
    double y;
    if (gamma != nullptr) {
      xh[i] *= rstd;
      y = xh[i] * gamma[d] + (beta != nullptr ? beta[d] : 0.f);
    } else {
      y = f[d];
    }
    if (p.residual) y += x[d];
    if (target == nullptr) {
      o[d] = from_float<T>(float(y));
      continue;
    }
    g[i] = 2. * (y - target[d]);
    if (gamma != nullptr) {
      g[i] *= gamma[d];
      mg += g[i];
      mgx += g[i] * xh[i];
    }
  }
  if (target == nullptr) return;
  if (gamma != nullptr) {
    mg = warp_sum(mg) / D;
    mgx = warp_sum(mgx) / D;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < D) df[d] = float(gamma != nullptr ? rstd * (g[i] - mg - xh[i] * mgx) : g[i]);
  }
}

// The CTAs of one (sequence, head): a thread-block cluster of `split` CTAs on sm_90+, each
// owning a slice of the hidden units (depth 2: columns of W1, rows of W2; depth 1: columns of
// W1), so that a small batch still spreads its state over many SMs. A token needs two vectors
// summed over the slices (f of the key, f of the query); each CTA adds the others' partials from
// their shared memory (DSMEM) in rank order, so every CTA holds the same bits.
using Group = ClusterGroup;

// vec[d] (and vec2[d] when given) <- sum over the group's CTAs, in rank order.
__device__ void group_sum(Group& g, int split, int D, float* vec, float* vec2, float* tmp) {
  if (split == 1) {
    __syncthreads();
    return;
  }
  g.sync();  // every partial written
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float s = 0.f, s2 = 0.f;
    for (int r = 0; r < split; ++r) {
      s += g.remote(vec, r)[d];
      if (vec2 != nullptr) s2 += g.remote(vec2, r)[d];
    }
    tmp[d] = s;
    tmp[kDecodeMaxDim + d] = s2;
  }
  g.sync();  // every remote read done before any CTA overwrites its partial
  for (int d = threadIdx.x; d < D; d += kThreads) {
    vec[d] = tmp[d];
    if (vec2 != nullptr) vec2[d] = tmp[kDecodeMaxDim + d];
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  __shared__ __align__(16) Smem sm;
  Group group;
  const int split = p.split, rank = blockIdx.x % p.split;
  const int n = blockIdx.x / p.split, h = blockIdx.y;
  const int D = p.dim, depth = p.depth;
  const int hid = depth == 2 ? p.hidden : D;  // layer 1's output width
  // this CTA's slice: depth 2, hidden units [j0, j0 + hs); depth 1, output columns of W1
  const int hs = hid / split, j0 = rank * hs;
  const int off = p.offset != nullptr ? int(p.offset[n]) : 0;
  const int64_t nh = int64_t(n) * p.heads + h;
  const int64_t size[kDecodeMaxLayers] = {int64_t(D) * hid, int64_t(hid) * D};
  // slice start inside each layer's matrix, and row stride
  const int64_t slice[kDecodeMaxLayers] = {j0, int64_t(j0) * D};
  const int64_t ld[kDecodeMaxLayers] = {hid, D};
  const float* w_first[kDecodeMaxLayers];
  float *w_dst[kDecodeMaxLayers], *s_dst[kDecodeMaxLayers], *cw_dst[kDecodeMaxLayers];
#pragma unroll
  for (int l = 0; l < kDecodeMaxLayers; ++l) {
    if (l >= depth) break;
    w_first[l] = p.w_in[l] + n * p.w_in_n_stride[l] + h * p.w_in_h_stride[l] + slice[l];
    w_dst[l] = p.w_out[l] + nh * size[l] + slice[l];
    s_dst[l] = p.s_out[l] + nh * size[l] + slice[l];
    cw_dst[l] = p.cw_out[l] + nh * size[l] + slice[l];
  }
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  float* tmp = reinterpret_cast<float*>(sm.red);  // group_sum's scratch (2 * kDecodeMaxDim)
  // the heads' LayerNorm weights stay in shared memory: two global round trips fewer on warp
  // 0's chain per head
  const float* ln_w = p.ln_weight != nullptr ? sm.ln_w : nullptr;
  const float* ln_b = p.ln_weight != nullptr && p.ln_bias != nullptr ? sm.ln_b : nullptr;
  const int col = threadIdx.x;  // the prologue's column (D <= kDecodeMaxDim < kThreads)

  for (int t = 0; t < p.seqlen; ++t) {
    const int pos = off + t;
    const bool new_chunk = pos % p.chunk == 0;
    const bool last = t == p.seqlen - 1;
    const bool closes = (pos + 1) % p.chunk == 0;
    ChunkCopy copy = ChunkCopy::kNone;
    if (last && closes) {
      copy = ChunkCopy::kNew;  // the final state has no open chunk: its weights are W
    } else if (new_chunk) {
      copy = ChunkCopy::kOld;  // this chunk takes its gradients at the weights before t
    } else if (t == 0) {
      copy = ChunkCopy::kSource;  // the state's open chunk continues
    }
    const float *w_src[kDecodeMaxLayers], *s_src[kDecodeMaxLayers], *gw[kDecodeMaxLayers],
        *cw_src[kDecodeMaxLayers];
#pragma unroll
    for (int l = 0; l < kDecodeMaxLayers; ++l) {
      if (l >= depth) break;
      w_src[l] = t == 0 ? w_first[l] : w_dst[l];
      s_src[l] = t == 0 ? (p.s_in[l] != nullptr ? p.s_in[l] + nh * size[l] + slice[l] : nullptr)
                        : s_dst[l];
      cw_src[l] = p.cw_in[l] != nullptr ? p.cw_in[l] + nh * size[l] + slice[l] : nullptr;
      gw[l] = new_chunk ? w_src[l] : (t == 0 ? cw_src[l] : cw_dst[l]);
    }
    // the prologue's loads all issued before its shared stores: one round trip, not one per
    // load and store (a warp issues in order, and each store waits for its load's data)
    const int64_t gate = (int64_t(n) * p.seqlen + t) * p.heads + h;
    const float theta = p.lr[gate], decay = 1.f - p.forget[gate], eta = p.momentum[gate];
    if (col < D) {
      float lw = 0.f, lb = 0.f;
      const float qd = to_float(q[n * p.q_n_stride + t * p.q_t_stride + h * p.q_h_stride + col]);
      const float kd = to_float(k[n * p.k_n_stride + t * p.k_t_stride + h * p.k_h_stride + col]);
      const float vd = to_float(v[n * p.v_n_stride + t * p.v_t_stride + h * p.v_h_stride + col]);
      if (t == 0 && ln_w != nullptr) lw = p.ln_weight[h * D + col];
      if (t == 0 && ln_b != nullptr) lb = p.ln_bias[h * D + col];
      sm.q[col] = qd;
      sm.k[col] = kd;
      sm.v[col] = vd;
      sm.f[col] = 0.f;  // depth 1 with a split: the slice's columns only, the rest summed in
      sm.fq[col] = 0.f;
      if (t == 0 && ln_w != nullptr) sm.ln_w[col] = lw;
      if (t == 0 && ln_b != nullptr) sm.ln_b[col] = lb;
    }
    T* o_row = rank == 0 ? static_cast<T*>(p.o) + gate * D : nullptr;
    __syncthreads();

    // 1-3: the key's errors at the chunk weights (and read "chunk")
    const bool rc = p.read_chunk;
    if (depth == 2) {
      col_products(gw[0], D, hs, ld[0], sm.k, sm.z, rc ? sm.q : nullptr, sm.zq, sm.red);
      for (int j = threadIdx.x; j < hs; j += kThreads) {
        sm.hk[j] = act(sm.z[j], p.activation);
        sm.dphi[j] = act_grad(sm.z[j], p.activation);
        if (rc) sm.hq[j] = act(sm.zq[j], p.activation);
      }
      __syncthreads();
      col_products(gw[1], hs, D, ld[1], sm.hk, sm.f, rc ? sm.hq : nullptr, sm.fq, sm.red);
    } else {
      col_products(gw[0], D, hs, ld[0], sm.k, sm.f + j0, rc ? sm.q : nullptr, sm.fq + j0,
                   sm.red);
    }
    group_sum(group, split, D, sm.f, rc ? sm.fq : nullptr, tmp);
    if (threadIdx.x < 32) {
      row_head<T>(sm.f, sm.k, sm.v, sm.df, static_cast<T*>(nullptr), p, ln_w, ln_b);
      if (rc && o_row != nullptr) {
        row_head<T>(sm.fq, sm.q, nullptr, nullptr, o_row, p, ln_w, ln_b);
      }
    }
    __syncthreads();
    if (depth == 2) row_products(gw[1], hs, D, sm.df, sm.dphi, sm.dz);

    // 4-5: the write, and read "token"
    const bool tok = !rc;
    if (tok) {
      for (int d = threadIdx.x; d < D; d += kThreads) sm.fq[d] = 0.f;
      __syncthreads();
    }
    if (depth == 2) {
      write_layer(w_src[0], s_src[0], cw_src[0], w_dst[0], s_dst[0], cw_dst[0], copy, D, hs,
                  ld[0], sm.k, sm.dz, theta, eta, decay, tok ? sm.q : nullptr, sm.zq, sm.red);
      if (tok) {
        for (int j = threadIdx.x; j < hs; j += kThreads) sm.hq[j] = act(sm.zq[j], p.activation);
        __syncthreads();
      }
      write_layer(w_src[1], s_src[1], cw_src[1], w_dst[1], s_dst[1], cw_dst[1], copy, hs, D,
                  ld[1], sm.hk, sm.df, theta, eta, decay, tok ? sm.hq : nullptr, sm.fq, sm.red);
    } else {
      write_layer(w_src[0], s_src[0], cw_src[0], w_dst[0], s_dst[0], cw_dst[0], copy, D, hs,
                  ld[0], sm.k, sm.df + j0, theta, eta, decay, tok ? sm.q : nullptr, sm.fq + j0,
                  sm.red);
    }
    if (tok) {
      group_sum(group, split, D, sm.fq, nullptr, tmp);
      if (threadIdx.x < 32 && o_row != nullptr) {
        row_head<T>(sm.fq, sm.q, nullptr, nullptr, o_row, p, ln_w, ln_b);
      }
    }
    // this token's state and shared vectors are complete before the next token (group_sum's
    // second cluster barrier already ordered every remote read before any overwrite or exit)
    __syncthreads();
  }
}

}  // namespace

bool neural_memory_decode_supported(int dim, int hidden, int depth) {
  const bool dim_ok = dim == 16 || dim == 32 || dim == 64 || dim == 128;
  return dim_ok && (depth == 1 || (depth == 2 && hidden >= 4 && hidden % 4 == 0 &&
                                   hidden <= kDecodeMaxHidden));
}

namespace {

// The launcher's split where the caller leaves it (p.split < 1), depth 2 with hidden >= 128 on
// sm_90+: 4 CTAs per (sequence, head) where the grid takes at most half the SMs, 2 where it
// fits the SMs, else 1; each only where the slices stay 4-aligned and the device holds every
// cluster at once. Smaller states and depth 1 keep one CTA (not measured with a split).
// Measured (H200, 2026-11-27, H = 16, D = 64, hidden 256, bf16, us per token at split 1 / 2 /
// 4): B = 1 25.3 / 21.7 / 20.1, B = 2 25.4 / 22.7 / 37.0 (128 CTAs in clusters of 4 ran as two
// waves), B = 4 34.0 / 31.8 / -. The write passes are bound by what one SM moves, so more SMs
// pay; the other steps are chains of dependent passes that a split does not shorten, and a
// split adds two cluster sums per token.
int auto_split(const DecodeParams& p, int width, int device) {
  int major = 0, sms = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  if (major < 9 || p.depth != 2 || p.hidden < 128) return 1;
  const int64_t pairs = int64_t(p.n_seq) * p.heads;
  auto kernel = p.dtype == 0 ? decode_kernel<__nv_bfloat16>
                             : (p.dtype == 1 ? decode_kernel<__half> : decode_kernel<float>);
  auto ok = [&](int s, int64_t ctas) {
    return width % (4 * s) == 0 && pairs * s <= ctas && pairs <= max_clusters(kernel, s, 0,
                                                                               kThreads);
  };
  if (ok(4, sms / 2)) return 4;
  if (ok(2, sms)) return 2;
  return 1;
}

}  // namespace

cudaError_t neural_memory_decode(const DecodeParams& params, cudaStream_t stream, int device) {
  DecodeParams p = params;
  if (!neural_memory_decode_supported(p.dim, p.hidden, p.depth) || p.n_seq < 1 ||
      p.heads < 1 || p.heads > 65535 || p.seqlen < 1 || p.chunk < 1 || p.dtype < 0 ||
      p.dtype > 2 || int64_t(p.n_seq) * kDecodeMaxSplit > 0x7fffffffLL) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  const int width = p.depth == 2 ? p.hidden : p.dim;
  if (p.split < 1) p.split = auto_split(p, width, device);
  if (p.split > kDecodeMaxSplit || width % (4 * p.split) != 0) return cudaErrorInvalidValue;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(p.n_seq) * unsigned(p.split), unsigned(p.heads));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (p.split > 1) {
    attr[0] = cluster_attribute(p.split);
    config.attrs = attr;
    config.numAttrs = 1;
  }
  switch (p.dtype) {
    case 0: return cudaLaunchKernelEx(&config, decode_kernel<__nv_bfloat16>, p);
    case 1: return cudaLaunchKernelEx(&config, decode_kernel<__half>, p);
    default: return cudaLaunchKernelEx(&config, decode_kernel<float>, p);
  }
}

}  // namespace titans
