// The gates' adjoint of one chunk, shared by the fused backward kernels (depth 2:
// chunked_bwd_kernel.cuh, depth 1: chunked_bwd1_kernel.cuh): reverse-mode through the forward's
// column recurrences of G and N and its scalar recurrences of m, beta and c
// (chunk_vjp.gates_vjp_recurrences), O(C^2), no division.
#pragma once

namespace titans {
namespace chunked_bwd {

// Per chunk: threads 0 .. C-1 one column each, thread kThreads - 1 the scalars. In: g / nm hold
// G and N (row stride ld), gbar holds Ḡ from the read (the last row's state part apart in gl,
// and N̄'s last row in nl); bb / cb are the rows' beta-bar / c-bar, red[w * 4 + {0, 1, 2}] the
// warps' partials of <W0, W̄>, <S0, W̄>, <S0, S̄> (beta-bar, c-bar, m-bar of the last row). Out:
// g / nm overwritten with the columns' parts of a-bar / eta-bar per (row, column) (zero on and
// above the diagonal), thbar, and the scalars' parts abar / ebar per row. The caller
// synchronises, then calls gates_adjoint_store.
template <int C, int kThreads, int kWarps>
__device__ __forceinline__ void gates_adjoint(int tid, int ld, float* g, float* nm,
                                              const float* gbar, const float* gl,
                                              const float* nl, const float* bb, const float* cb,
                                              const float* red, const float* a, const float* eta,
                                              const float* act, const float* m,
                                              const float* beta, const float* c, float* thbar,
                                              float* abar, float* ebar) {
  if (tid < C) {
    const int col = tid;
    float gh = 0.f, nhat = 0.f;
    for (int t = C - 1; t >= col; --t) {
      const float a_next = t + 1 < C ? a[t + 1] : 0.f;
      const float e_next = t + 1 < C ? eta[t + 1] : 0.f;
      const float gb = gbar[t * ld + col] + (t == C - 1 ? gl[col] : 0.f);
      const float nb = t == C - 1 ? nl[col] : 0.f;
      gh = gb + a_next * gh;
      nhat = nb + act[t] * gh + e_next * nhat;
      if (t > col) {
        g[t * ld + col] = gh * g[(t - 1) * ld + col];
        nm[t * ld + col] = nhat * nm[(t - 1) * ld + col];
      }
    }
    thbar[col] = nhat;
    for (int t = 0; t <= col; ++t) {
      g[t * ld + col] = 0.f;
      nm[t * ld + col] = 0.f;
    }
  } else if (tid == kThreads - 1) {
    float s0v = 0.f, s1v = 0.f, s2v = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      s0v += red[w * 4];
      s1v += red[w * 4 + 1];
      s2v += red[w * 4 + 2];
    }
    float chat = 0.f, mhat = 0.f, bhat = 0.f;
    for (int t = C - 1; t >= 0; --t) {
      const float a_next = t + 1 < C ? a[t + 1] : 0.f;
      const float e_next = t + 1 < C ? eta[t + 1] : 0.f;
      const bool last = t == C - 1;
      chat = cb[t] + (last ? s1v : 0.f) + a_next * chat;
      mhat = (last ? s2v : 0.f) + act[t] * chat + e_next * mhat;
      bhat = bb[t] + (last ? s0v : 0.f) + a_next * bhat;
      const float m_prev = t > 0 ? m[t - 1] : 1.f;
      const float b_prev = t > 0 ? beta[t - 1] : 1.f;
      const float c_prev = t > 0 ? c[t - 1] : 0.f;
      abar[t] = chat * c_prev + bhat * b_prev;
      ebar[t] = mhat * m_prev;
    }
  }
}

// After gates_adjoint and a barrier: thread r < C sums row r's parts and stores the gradients
// of token t0 + r (when it is in [0, len)): dlr = theta-bar, dforget = -a-bar, dmomentum.
template <int C>
__device__ __forceinline__ void gates_adjoint_store(int tid, int ld, const float* g,
                                                    const float* nm, const float* thbar,
                                                    const float* abar, const float* ebar,
                                                    int64_t t0, int64_t len, int64_t row_base,
                                                    int heads, int h, float* dlr,
                                                    float* dforget, float* dmomentum) {
  if (tid < C) {
    const int64_t t = t0 + tid;
    if (t >= 0 && t < len) {
      float ab = abar[tid], eb = ebar[tid];
      for (int c = 0; c < C; ++c) {
        ab += g[tid * ld + c];
        eb += nm[tid * ld + c];
      }
      const int64_t gi = (row_base + t) * heads + h;
      dlr[gi] = thbar[tid];
      dforget[gi] = -ab;
      dmomentum[gi] = eb;
    }
  }
}

}  // namespace chunked_bwd
}  // namespace titans
