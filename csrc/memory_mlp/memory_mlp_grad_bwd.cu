// memory_grad's backward (kGradBackward): given G^l = dL/dU^l of each chunk, the second-order
// terms dk, dv, dlr, dW^l (per tile) and d ln_weight / d ln_bias (per tile), for the tile's 64
// tokens. Per token (row vectors, w = lr, depth 2; depth 1 drops the hidden layer):
//
//   forward   z = k W1, h = phi(z), f = h W2, y = [k +] [LN](f), g_y = 2 (y - v)
//   errors    df = LN_bwd(g_y), e = w df, dh = e W2^T, dz = dh * phi'(z)
//             (U1 = sum k^T dz, U2 = sum h^T e)
//   adjoint   e_bar = h G2 + (dz_bar * phi'(z)) W2  with dz_bar = k G1;  k_bar = dz G1^T
//             w_bar = <e_bar, df>;  df_bar = w e_bar
//             LN second order (df = r (g - mean g - xhat mean(g xhat)), g = g_y gamma):
//               g_bar = r (df_bar - mean df_bar - xhat mean(df_bar xhat))
//               xhat_bar = -r (df_bar mean(g xhat) + g mean(df_bar xhat)) + y_bar gamma
//               r_bar = <df_bar, df> / r;  y_bar = 2 g_bar gamma;  v_bar = -y_bar
//               f_bar = r (xhat_bar - mean xhat_bar - xhat mean(xhat_bar xhat))
//                       - (r^2 / D) r_bar xhat
//             h_bar = e G2^T + f_bar W2^T;  z_bar = h_bar * phi'(z) + dz_bar * dh * phi''(z)
//             k_bar += z_bar W1^T [+ y_bar];  W1_bar = sum k^T z_bar;
//             W2_bar = sum (dz_bar * phi'(z))^T e + h^T f_bar
//
// Three sweeps over the hidden blocks: (1) f; (2, reverse order) e_bar and the G1^T part of
// k_bar; (3) z_bar, k_bar, the weight gradients. f is kept per thread in shared memory (fp32)
// between the sweeps and the row head is recomputed from it rather than held in registers;
// that stash shares its space with the operands only sweep 3 uses (e, f_bar, h, dh_bar, z_bar),
// which keeps two CTAs per SM at D = 64.
// The formulas were checked against autograd through the reference in float64.
#include "../common/cuda_check.h"
#include "tile.cuh"

namespace titans {
namespace {

using namespace mlp;

template <int D, int HB, int kDepth>
struct GradBwdSmem {
  static constexpr int kLdD = D + 8;
  static constexpr int kLdH = HB + 8;
  static constexpr int kX = kRows * kLdD;
  static constexpr int kW1 = D * (kDepth == 2 ? kLdH : kLdD);  // W1 / G1 blocks [D][HB | D]
  static constexpr int kW2 = kDepth == 2 ? HB * kLdD : 0;      // W2 / G2 blocks [HB][D]
  static constexpr int kRowsD = kRows * kLdD;                  // f_bar [64][D]
  static constexpr int kE = kDepth == 2 ? kRowsD : 0;          // e [64][D]
  static constexpr int kHid = kDepth == 2 ? kRows * kLdH : 0;  // h, dh_bar, z_bar [64][HB]
  static constexpr int kEarly = kX + 2 * kW1 + 2 * kW2;        // operands of every sweep
  static constexpr int kLate = kRowsD + kE + 3 * kHid;         // sweep 3's, over the stash
  static constexpr size_t kStashBytes = size_t(kRows) * D * 4;
  static constexpr size_t round16(size_t n) { return (n + 15) / 16 * 16; }
  static constexpr size_t kLateBytes(size_t elem) {
    return round16(kLate * elem) > kStashBytes ? round16(kLate * elem) : kStashBytes;
  }
  static constexpr int kRedFloats = kWarps * 2 * D;
  static constexpr size_t bytes(size_t elem) {
    return round16(kEarly * elem) + kLateBytes(elem) + kRedFloats * 4;
  }
};

template <typename T, int D, int HB, int kDepth>
__global__ void __launch_bounds__(kThreads) memory_mlp_grad_bwd_kernel(const MemoryMlpParams p) {
  using S = GradBwdSmem<D, HB, kDepth>;
  constexpr int kLdD = S::kLdD, kLdH = S::kLdH;
  constexpr int kNtD = D / 8, kNtH = HB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_x = reinterpret_cast<T*>(smem_raw);
  T* s_w1 = s_x + S::kX;
  T* s_g1 = s_w1 + S::kW1;
  T* s_w2 = s_g1 + S::kW1;
  T* s_g2 = s_w2 + S::kW2;
  unsigned char* late = smem_raw + S::round16(S::kEarly * sizeof(T));
  float* s_stash = reinterpret_cast<float*>(late);  // f, thread-private, until head 2
  T* s_fbar = reinterpret_cast<T*>(late);           // from head 2 on
  T* s_e = s_fbar + S::kRowsD;                      // (depth 2)
  T* s_h = s_e + S::kE;
  T* s_dhbar = s_h + S::kHid;
  T* s_zbar = s_dhbar + S::kHid;
  float* s_red = reinterpret_cast<float*>(late + S::kLateBytes(sizeof(T)));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_tiles = p.n_chunks * p.n_sub;
  const int chunk = tile / p.n_sub, sub = tile % p.n_sub;
  const int t0 = chunk * p.chunk + sub * kRows;
  const int valid = max(0, min(kRows, min(p.chunk - sub * kRows, p.seqlen - t0)));
  const int hidden = kDepth == 2 ? p.hidden : D;
  const int n_blocks = kDepth == 2 ? hidden / HB : 1;
  const int m0 = warp * 16;
  const int row_lo = m0 + lane / 4;
  const int row_hi = row_lo + 8;
  const int64_t bhc = (int64_t(b) * p.heads + h) * p.n_chunks + chunk;
  const int64_t tile_index = (int64_t(b) * p.heads + h) * n_tiles + tile;

  load_rows<T, D>(s_x, kLdD, static_cast<const T*>(p.x) + b * p.x_b_stride +
                  h * p.x_h_stride + int64_t(t0) * p.x_t_stride, p.x_t_stride, valid);
  const float* w1g = p.w1 + b * p.w1_b_stride + h * p.w1_h_stride + chunk * p.w1_c_stride;
  const float* w2g = kDepth == 2 ?
      p.w2 + b * p.w2_b_stride + h * p.w2_h_stride + chunk * p.w2_c_stride : nullptr;
  const float* g1g = p.grad_u1 + bhc * D * hidden;
  const float* g2g = kDepth == 2 ? p.grad_u2 + bhc * hidden * D : nullptr;
  auto stage_w = [&](int j) {
    stage_block<T, D, HB, kDepth, kLdD, kLdH>(s_w1, s_w2, w1g, w2g, j, hidden);
  };
  auto stage_g = [&](int j) {
    stage_block<T, D, HB, kDepth, kLdD, kLdH>(s_g1, s_g2, g1g, g2g, j, hidden);
  };

  // ---- sweep 1: f ----
  float f[kNtD][4] = {};
  for (int j = 0; j < n_blocks; ++j) {
    if (j > 0) __syncthreads();
    stage_w(j);
    if (kDepth == 1) stage_g(0);
    __syncthreads();
    if constexpr (kDepth == 2) {
      mlp_block_forward<T, D, HB>(f, s_x, kLdD, s_w1, kLdH, s_w2, kLdD, m0, lane, p.activation);
    } else {
      mma_smem_a_kmajor_b<T, D, D>(f, s_x, kLdD, m0, s_w1, kLdD, lane);
    }
  }
#pragma unroll
  for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s_stash[(nt * 4 + e) * kThreads + threadIdx.x] = f[nt][e];

  // ---- the row head: f -> xhat (in place), g_y, df; recomputed identically in head 2 ----
  const bool ln = p.ln_weight != nullptr;
  const float* gamma = ln ? p.ln_weight + h * D : nullptr;
  const float* beta = p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;
  auto col_of = [&](int nt, int e) { return nt * 8 + 2 * (lane % 4) + (e & 1); };
  auto row_of = [&](int e) { return e < 2 ? row_lo : row_hi; };
  float rstd[2] = {0.f, 0.f}, m2[2] = {0.f, 0.f};
  auto errors = [&](float (&xf)[kNtD][4], float (&gy)[kNtD][4], float (&df)[kNtD][4]) {
    const T* vg = static_cast<const T*>(p.v) + b * p.v_b_stride + h * p.v_h_stride;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (ln) {
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt) sum += xf[nt][2 * half] + xf[nt][2 * half + 1];
        const float mean = quad_sum(sum) * (1.f / D);
        float sq = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            xf[nt][e] -= mean;
            sq += xf[nt][e] * xf[nt][e];
          }
        rstd[half] = rsqrtf(quad_sum(sq) * (1.f / D) + p.ln_eps);
      }
      const int row = row_of(2 * half);
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        float2 vv = make_float2(0.f, 0.f);
        if (row < valid) {
          vv = load2(vg + int64_t(t0 + row) * p.v_t_stride + col_of(nt, 0));
        }
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int col = col_of(nt, e);
          float y = xf[nt][e];
          if (ln) {
            xf[nt][e] *= rstd[half];
            y = xf[nt][e] * __ldg(gamma + col) + (beta != nullptr ? __ldg(beta + col) : 0.f);
          }
          if (p.residual) y += static_cast<float>(s_x[row * kLdD + col]);
          gy[nt][e] = row < valid ? 2.f * (y - ((e & 1) ? vv.y : vv.x)) : 0.f;
        }
      }
      if (ln) {
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float g = gy[nt][e] * __ldg(gamma + col_of(nt, e));
            mg += g;
            mgx += g * xf[nt][e];
          }
        mg = quad_sum(mg) * (1.f / D);
        m2[half] = quad_sum(mgx) * (1.f / D);
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float g = gy[nt][e] * __ldg(gamma + col_of(nt, e));
            df[nt][e] = rstd[half] * (g - mg - xf[nt][e] * m2[half]);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) df[nt][e] = gy[nt][e];
      }
    }
  };
  float wrow[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_of(2 * half);
    wrow[half] = row < valid ? __ldg(p.lr + b * p.lr_b_stride + int64_t(t0 + row) * p.lr_t_stride +
                                     h * p.lr_h_stride) : 0.f;
  }

  // ---- head 1: e = w df as A fragments (written to shared for sweep 3 after head 2) ----
  FragA<T> ea[D / 16];
  {
    float gy[kNtD][4], df[kNtD][4];
    errors(f, gy, df);
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) df[nt][e] *= wrow[e / 2];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) pack_a(ea[kk], df[2 * kk], df[2 * kk + 1]);
  }

  // ---- sweep 2: e_bar, and k_bar's dz G1^T part ----
  float ebar[kNtD][4] = {}, xbar[kNtD][4] = {};
  if constexpr (kDepth == 2) {
    for (int j = n_blocks - 1; j >= 0; --j) {
      __syncthreads();
      if (j != n_blocks - 1) stage_w(j);
      stage_g(j);
      __syncthreads();
      float acc[kNtH][4] = {}, pz[kNtH][4];
      FragA<T> ha[HB / 16], dza[HB / 16], dhba[HB / 16];
      mma_smem_a_kmajor_b<T, D, HB>(acc, s_x, kLdD, m0, s_w1, kLdH, lane);  // z
      activate<T, kNtH, false>(acc, pz, pz, p.activation);
#pragma unroll
      for (int kk = 0; kk < HB / 16; ++kk) pack_a(ha[kk], acc[2 * kk], acc[2 * kk + 1]);
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      mma_reg_a<T, D, HB, false>(acc, ea, s_w2, kLdD, lane);  // dh = e W2^T
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= pz[nt][e];  // dz
#pragma unroll
      for (int kk = 0; kk < HB / 16; ++kk) pack_a(dza[kk], acc[2 * kk], acc[2 * kk + 1]);
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      mma_smem_a_kmajor_b<T, D, HB>(acc, s_x, kLdD, m0, s_g1, kLdH, lane);  // dz_bar = k G1
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= pz[nt][e];  // dh_bar
#pragma unroll
      for (int kk = 0; kk < HB / 16; ++kk) pack_a(dhba[kk], acc[2 * kk], acc[2 * kk + 1]);
      mma_reg_a<T, HB, D, true>(ebar, ha, s_g2, kLdD, lane);     // += h G2
      mma_reg_a<T, HB, D, true>(ebar, dhba, s_w2, kLdD, lane);   // += dh_bar W2
      mma_reg_a<T, HB, D, false>(xbar, dza, s_g1, kLdH, lane);   // += dz G1^T
    }
  } else {
    mma_smem_a_kmajor_b<T, D, D>(ebar, s_x, kLdD, m0, s_g1, kLdD, lane);  // e_bar = k G
    mma_reg_a<T, D, D, false>(xbar, ea, s_g1, kLdD, lane);                // k_bar = e G^T
  }

  // ---- head 2: w_bar, LN second order -> f_bar, v_bar, d gamma, d beta ----
  FragA<T> fba[D / 16];
  {
    float xf[kNtD][4], gy[kNtD][4], df[kNtD][4];
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) xf[nt][e] = s_stash[(nt * 4 + e) * kThreads + threadIdx.x];
    __syncthreads();  // every stash is read: its space now holds e, f_bar, h, dh_bar, z_bar
#pragma unroll
    if constexpr (kDepth == 2) {  // e (the A fragments' rows / columns) -> shared
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) store_a(s_e, kLdD, row_lo, kk * 16, ea[kk], lane);
    }
    errors(xf, gy, df);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float wb = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          wb += ebar[nt][e] * df[nt][e];
          ebar[nt][e] *= wrow[half];  // df_bar
        }
      wb = quad_sum(wb);
      const int row = row_of(2 * half);
      if (lane % 4 == 0 && row < valid) {
        p.grad_lr[(int64_t(b) * p.seqlen + t0 + row) * p.heads + h] = wb;
      }
      if (ln) {
        const float r = rstd[half];
        float mb = 0.f, mbx = 0.f, rb = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            mb += ebar[nt][e];
            mbx += ebar[nt][e] * xf[nt][e];
            rb += ebar[nt][e] * df[nt][e];
          }
        mb = quad_sum(mb) * (1.f / D);
        mbx = quad_sum(mbx) * (1.f / D);
        rb = quad_sum(rb) / r;
        float mx = 0.f, mxx = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float gam = __ldg(gamma + col_of(nt, e));
            const float xh = xf[nt][e], dfb = ebar[nt][e];
            const float gbar = r * (dfb - mb - xh * mbx);
            float xhb = -r * (dfb * m2[half] + gy[nt][e] * gam * mbx);
            const float ybar = 2.f * gbar * gam;
            xhb += ybar * gam;
            gy[nt][e] = gbar * gy[nt][e] + ybar * xh;  // d gamma (per element)
            ebar[nt][e] = ybar;                        // = d beta (per element)
            df[nt][e] = xhb;
            mx += xhb;
            mxx += xhb * xh;
          }
        mx = quad_sum(mx) * (1.f / D);
        mxx = quad_sum(mxx) * (1.f / D);
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float xh = xf[nt][e];
            df[nt][e] = r * (df[nt][e] - mx - xh * mxx) - r * r * (1.f / D) * rb * xh;
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            ebar[nt][e] *= 2.f;  // y_bar
            df[nt][e] = ebar[nt][e];  // f_bar
          }
      }
    }
    // v_bar = -y_bar; residual: k_bar += y_bar
    store_rows<T, D>(p.grad_v, p, b, h, t0, row_lo, valid, ebar, lane, -1.f);
    if (p.residual) {
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) xbar[nt][e] += ebar[nt][e];
    }
    if (ln) column_partials<D>(s_red, gy, ebar, warp, lane);
    store_acc_smem<T, D>(s_fbar, kLdD, row_lo, df, lane);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) pack_a(fba[kk], df[2 * kk], df[2 * kk + 1]);
  }

  // ---- sweep 3: z_bar, k_bar, weight gradients ----
  const int ksteps = (valid + 15) / 16;
  float* dw1 = p.u1 + tile_index * int64_t(D) * hidden;
  if constexpr (kDepth == 2) {
    float* dw2 = p.u2 + tile_index * int64_t(hidden) * D;
    for (int j = 0; j < n_blocks; ++j) {
      __syncthreads();  // s_fbar, s_red complete; previous block's reads done
      if (j != 0) {
        stage_w(j);
        stage_g(j);
        __syncthreads();
      }
      float acc[kNtH][4] = {}, pz[kNtH][4], p2[kNtH][4], dh[kNtH][4] = {};
      mma_smem_a_kmajor_b<T, D, HB>(acc, s_x, kLdD, m0, s_w1, kLdH, lane);  // z
      activate<T, kNtH, true>(acc, pz, p2, p.activation);
      store_acc_smem<T, HB>(s_h, kLdH, row_lo, acc, lane);
      mma_reg_a<T, D, HB, false>(dh, ea, s_w2, kLdD, lane);  // dh = e W2^T
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      mma_smem_a_kmajor_b<T, D, HB>(acc, s_x, kLdD, m0, s_g1, kLdH, lane);  // dz_bar
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p2[nt][e] *= acc[nt][e] * dh[nt][e];  // dz_bar dh phi''
          acc[nt][e] *= pz[nt][e];              // dh_bar
          dh[nt][e] = 0.f;
        }
      store_acc_smem<T, HB>(s_dhbar, kLdH, row_lo, acc, lane);
      mma_reg_a<T, D, HB, false>(dh, ea, s_g2, kLdD, lane);   // h_bar = e G2^T
      mma_reg_a<T, D, HB, false>(dh, fba, s_w2, kLdD, lane);  //       + f_bar W2^T
      FragA<T> zba[HB / 16];
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dh[nt][e] = dh[nt][e] * pz[nt][e] + p2[nt][e];  // z_bar
      store_acc_smem<T, HB>(s_zbar, kLdH, row_lo, dh, lane);
#pragma unroll
      for (int kk = 0; kk < HB / 16; ++kk) pack_a(zba[kk], dh[2 * kk], dh[2 * kk + 1]);
      mma_reg_a<T, HB, D, false>(xbar, zba, s_w1, kLdH, lane);  // k_bar += z_bar W1^T
      __syncthreads();
      gemm_tn_store<T, HB, D>(s_dhbar, kLdH, s_e, kLdD, ksteps, dw2 + int64_t(j) * HB * D, D,
                              warp, lane, s_h, kLdH, s_fbar, kLdD);
      gemm_tn_store<T, D, HB>(s_x, kLdD, s_zbar, kLdH, ksteps, dw1 + j * HB, hidden, warp,
                              lane);
    }
  } else {
    mma_reg_a<T, D, D, false>(xbar, fba, s_w1, kLdD, lane);  // k_bar += f_bar W^T
    __syncthreads();
    gemm_tn_store<T, D, D>(s_x, kLdD, s_fbar, kLdD, ksteps, dw1, D, warp, lane);
  }
  if (ln) column_partials_store<D>(p.grad_ln + tile_index * 2 * D, s_red);

  store_rows<T, D>(p.grad_x, p, b, h, t0, row_lo, valid, xbar, lane);
}

struct Launcher {
  template <typename T, int D, int HB, int kDepth>
  static cudaError_t run(const MemoryMlpParams& p, cudaStream_t stream) {
    return launch_tiles(memory_mlp_grad_bwd_kernel<T, D, HB, kDepth>,
                        GradBwdSmem<D, HB, kDepth>::bytes(sizeof(T)), p, stream);
  }
};

struct SmemBytes {
  template <typename T, int D, int HB, int kDepth>
  static size_t run(const MemoryMlpParams&, cudaStream_t) {
    return GradBwdSmem<D, HB, kDepth>::bytes(sizeof(T));
  }
};

}  // namespace

cudaError_t memory_mlp_grad_bwd(const MemoryMlpParams& p, cudaStream_t stream) {
  return dispatch<Launcher>(p, stream);
}

size_t memory_mlp_grad_bwd_smem_bytes(const MemoryMlpParams& p) {
  return dispatch<SmemBytes>(p, nullptr);
}

}  // namespace titans
