// memory_mlp kernel: one CTA (4 warps) per 64-token tile, warp w owning token rows 16w..16w+15.
//
// Depth 2 (x [64, D] -> z1 = x W1 [64, hidden] -> h = phi(z1) -> f = h W2 [64, D]) streams the
// hidden axis in blocks of HB columns: W1[:, block] and W2[block, :] are converted from fp32 to
// the operand type into shared memory, z1 for the block is an fp32 accumulator in registers,
// phi is applied there and the result re-packed in registers as the A operand of h W2 (it
// never touches shared memory). f accumulates over the blocks.
//
// Head (per row, in registers): LayerNorm statistics are quad shuffles over the 4 lanes that
// share a row; residual adds the x tile.
//
// Gradient modes then take dl/dy (2 (y - v), or the caller's), back-propagate LN by hand, scale
// the rows by the token weight (lr, or 1), and sweep the hidden blocks again in reverse order
// (so the block still resident from the forward sweep is used first), recomputing z1:
//   dh = (w dF) W2^T   (A operand = dF re-packed from registers, B = W2 block read as [n][k])
//   dz1 = dh * phi'(z1)
//   U2[block, :] = h^T (w dF),  U1[:, block] = x^T dz1   (token axis = k: h, dz1 and dF go
//                                                          through shared memory, k-major)
//   dx += dz1 W1[:, block]^T   (kBackward)
// The U products are cut into 16 x 16 output tiles handed round-robin to the warps; each is
// written to global memory once.
#include "memory_mlp.h"

#include "../common/cuda_check.h"
#include "tile.cuh"

namespace titans {
namespace {

using namespace mlp;

// Shared-memory plan (elements of T unless said): rows padded by 8 elements so that the 8 rows
// an ldmatrix phase reads fall in distinct banks.
template <int D, int HB, int kDepth>
struct Smem {
  static constexpr int kLdD = D + 8;
  static constexpr int kLdH = HB + 8;
  static constexpr int kX = kRows * kLdD;                              // x tile [64][D]
  static constexpr int kW1 = kDepth == 2 ? D * kLdH : D * kLdD;        // W1 block [D][HB]
  static constexpr int kW2 = kDepth == 2 ? HB * kLdD : 0;              // W2 block [HB][D]
  static constexpr int kDF = kRows * kLdD;                             // w dF [64][D]
  static constexpr int kH = kDepth == 2 ? kRows * kLdH : 0;            // h block [64][HB]
  static constexpr int kDZ = kDepth == 2 ? kRows * kLdH : 0;           // dz1 block [64][HB]
  static constexpr int kElems = kX + kW1 + kW2 + kDF + kH + kDZ;
  static constexpr int kRedFloats = kWarps * 2 * D;                    // LN grad partials
  static constexpr size_t bytes(size_t elem) { return kElems * elem + kRedFloats * 4; }
};

template <typename T, int D, int HB, int kDepth>
__global__ void __launch_bounds__(kThreads) memory_mlp_kernel(const MemoryMlpParams p) {
  using S = Smem<D, HB, kDepth>;
  constexpr int kLdD = S::kLdD, kLdH = S::kLdH;
  constexpr int kNtD = D / 8, kNtH = HB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_x = reinterpret_cast<T*>(smem_raw);
  T* s_w1 = s_x + S::kX;
  T* s_w2 = s_w1 + S::kW1;
  T* s_df = s_w2 + S::kW2;
  T* s_h = s_df + S::kDF;
  T* s_dz = s_h + S::kH;
  float* s_red = reinterpret_cast<float*>(s_dz + S::kDZ);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_tiles = p.n_chunks * p.n_sub;
  const int chunk = tile / p.n_sub, sub = tile % p.n_sub;
  const int t0 = chunk * p.chunk + sub * kRows;
  const int valid = max(0, min(kRows, min(p.chunk - sub * kRows, p.seqlen - t0)));
  const int hidden = kDepth == 2 ? p.hidden : D;
  const int n_blocks = kDepth == 2 ? hidden / HB : 1;
  const bool grad = p.mode != MlpMode::kForward;

  // ---- x tile -> shared (rows past the tile's end are zero) ----
  load_rows<T, D>(s_x, kLdD, static_cast<const T*>(p.x) + b * p.x_b_stride +
                  h * p.x_h_stride + int64_t(t0) * p.x_t_stride, p.x_t_stride, valid);
  // shifted: chunk c reads W_{c-1} of the per-chunk weights, chunk 0 the first weights
  const bool first = p.shifted && chunk == 0;
  const int wchunk = p.shifted ? chunk - 1 : chunk;
  const float* w1g = first ? p.w1_first + b * p.w1_first_b_stride + h * p.w1_first_h_stride
                           : p.w1 + b * p.w1_b_stride + h * p.w1_h_stride + wchunk * p.w1_c_stride;
  const float* w2g = kDepth != 2 ? nullptr
      : first ? p.w2_first + b * p.w2_first_b_stride + h * p.w2_first_h_stride
              : p.w2 + b * p.w2_b_stride + h * p.w2_h_stride + wchunk * p.w2_c_stride;
  auto stage_w = [&](int j) {
    stage_block<T, D, HB, kDepth, kLdD, kLdH>(s_w1, s_w2, w1g, w2g, j, hidden);
  };

  const int m0 = warp * 16;                 // this warp's first row
  const int row_lo = m0 + lane / 4;         // rows this lane holds in accumulators
  const int row_hi = row_lo + 8;

  // ---- forward: f = MLP(x) ----
  float f[kNtD][4] = {};
  for (int j = 0; j < n_blocks; ++j) {
    if (j > 0) __syncthreads();  // the previous block's operands are no longer read
    stage_w(j);
    __syncthreads();
    if constexpr (kDepth == 2) {
      mlp_block_forward<T, D, HB>(f, s_x, kLdD, s_w1, kLdH, s_w2, kLdD, m0, lane, p.activation);
    } else {
      mma_smem_a_kmajor_b<T, D, D>(f, s_x, kLdD, m0, s_w1, kLdD, lane);
    }
  }

  // ---- head: LayerNorm (f -> xhat in place) and y ----
  const bool ln = p.ln_weight != nullptr;
  const float* gamma = ln ? p.ln_weight + h * D : nullptr;
  const float* beta = p.ln_bias != nullptr ? p.ln_bias + h * D : nullptr;
  float rstd[2] = {0.f, 0.f};
  if (ln) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) sum += f[nt][2 * half] + f[nt][2 * half + 1];
      const float mean = quad_sum(sum) * (1.f / D);
      float sq = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        f[nt][2 * half] -= mean;
        f[nt][2 * half + 1] -= mean;
        sq += f[nt][2 * half] * f[nt][2 * half] + f[nt][2 * half + 1] * f[nt][2 * half + 1];
      }
      rstd[half] = rsqrtf(quad_sum(sq) * (1.f / D) + p.ln_eps);
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
        f[nt][2 * half] *= rstd[half];
        f[nt][2 * half + 1] *= rstd[half];
      }
    }
  }
  // y (or dl/dy) per element: e = 0..3 -> (row_lo|row_hi, col, col + 1)
  auto y_of = [&](int nt, int e) {
    const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
    const int row = e < 2 ? row_lo : row_hi;
    float y = f[nt][e];
    if (ln) y = y * __ldg(gamma + col) + (beta != nullptr ? __ldg(beta + col) : 0.f);
    if (p.residual) {
      y += static_cast<float>(s_x[row * kLdD + col]);
    }
    return y;
  };

  if (!grad) {
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) f[nt][e] = y_of(nt, e);
    store_rows<T, D>(p.y, p, b, h, t0, row_lo, valid, f, lane);
    return;
  }

  // ---- dl/dy, LN backward, token weights ----
  float dy[kNtD][4];
  {
    const bool backward = p.mode == MlpMode::kBackward;
    const T* src = static_cast<const T*>(backward ? p.grad_y : p.v);
    const int64_t sb = backward ? p.grad_y_b_stride : p.v_b_stride;
    const int64_t st = backward ? p.grad_y_t_stride : p.v_t_stride;
    const int64_t sh = backward ? p.grad_y_h_stride : p.v_h_stride;
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt) {
      const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = half == 0 ? row_lo : row_hi;
        float2 g = make_float2(0.f, 0.f);
        if (row < valid) {
          g = load2(src + b * sb + int64_t(t0 + row) * st + h * sh + col);
          if (!backward) {  // 2 (y - v)
            g.x = 2.f * (y_of(nt, 2 * half) - g.x);
            g.y = 2.f * (y_of(nt, 2 * half + 1) - g.y);
          }
        }
        dy[nt][2 * half] = g.x;
        dy[nt][2 * half + 1] = g.y;
      }
    }
  }
  float dx[kNtD][4];  // kBackward: dl/dx, starting with the residual branch
#pragma unroll
  for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dx[nt][e] = p.residual ? dy[nt][e] : 0.f;

  if (ln && p.mode == MlpMode::kBackward) {
    // d gamma = sum_rows dy * xhat, d beta = sum_rows dy (fixed-order partials per tile)
    float dyx[kNtD][4];
#pragma unroll
    for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dyx[nt][e] = dy[nt][e] * f[nt][e];
    column_partials<D>(s_red, dyx, dy, warp, lane);
  }
  float wrow[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half == 0 ? row_lo : row_hi;
    float w = 0.f;
    if (row < valid) {
      w = p.mode == MlpMode::kGrad ?
          __ldg(p.lr + b * p.lr_b_stride + int64_t(t0 + row) * p.lr_t_stride + h * p.lr_h_stride)
          : 1.f;
    }
    wrow[half] = w;
  }
  // dF (scaled by the token weight) overwrites dy
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (ln) {
      float mg = 0.f, mgx = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
          const float g = dy[nt][e] * __ldg(gamma + col);
          dy[nt][e] = g;
          mg += g;
          mgx += g * f[nt][e];
        }
      }
      mg = quad_sum(mg) * (1.f / D);
      mgx = quad_sum(mgx) * (1.f / D);
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e)
          dy[nt][e] = wrow[half] * rstd[half] * (dy[nt][e] - mg - f[nt][e] * mgx);
    } else {
#pragma unroll
      for (int nt = 0; nt < kNtD; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) dy[nt][e] *= wrow[half];
    }
  }
  const int64_t tile_index = (int64_t(b) * p.heads + h) * n_tiles + tile;
  if (ln && p.mode == MlpMode::kBackward) {
    __syncthreads();
    column_partials_store<D>(p.grad_ln + tile_index * 2 * D, s_red);
  }
  store_acc_smem<T, D>(s_df, kLdD, row_lo, dy, lane);
  FragA<T> dfa[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) pack_a(dfa[kk], dy[2 * kk], dy[2 * kk + 1]);

  const int ksteps = (valid + 15) / 16;
  // per-tile sums; shifted: chunk 0's go to u*_first [B, H, n_sub, ...], chunk c's to the slot
  // of W_{c-1} (the last chunk slot of u* is left to the caller)
  const int64_t u_index = !p.shifted ? tile_index
      : first ? (int64_t(b) * p.heads + h) * p.n_sub + sub : tile_index - p.n_sub;
  float* u1 = (first ? p.u1_first : p.u1) + u_index * int64_t(D) * hidden;
  if constexpr (kDepth == 1) {
    __syncthreads();  // s_df complete
    gemm_tn_store<T, D, D>(s_x, kLdD, s_df, kLdD, ksteps, u1, D, warp, lane);
    if (p.mode == MlpMode::kBackward) mma_reg_a<T, D, D, false>(dx, dfa, s_w1, kLdD, lane);
  } else {
    float* u2 = (first ? p.u2_first : p.u2) + u_index * int64_t(hidden) * D;
    for (int j = n_blocks - 1; j >= 0; --j) {
      __syncthreads();  // previous block's operands and s_h / s_dz reads are done; s_df ready
      if (j != n_blocks - 1) {
        stage_w(j);
        __syncthreads();
      }
      // (phi' is applied as dh is consumed: holding a phi' array while dh accumulates costs
      // 56 more registers at D = 64 and one CTA per SM)
      float z[kNtH][4] = {};
      mma_smem_a_kmajor_b<T, D, HB>(z, s_x, kLdD, m0, s_w1, kLdH, lane);
      float dh[kNtH][4] = {};
      mma_reg_a<T, D, HB, false>(dh, dfa, s_w2, kLdD, lane);
#pragma unroll
      for (int nt = 0; nt < kNtH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dh[nt][e] *= activation_grad<T>(z[nt][e], p.activation);
          z[nt][e] = activation_fn<T>(z[nt][e], p.activation);
        }
      store_acc_smem<T, HB>(s_h, kLdH, row_lo, z, lane);
      store_acc_smem<T, HB>(s_dz, kLdH, row_lo, dh, lane);
      if (p.mode == MlpMode::kBackward) {
        FragA<T> dza[HB / 16];
#pragma unroll
        for (int kk = 0; kk < HB / 16; ++kk) pack_a(dza[kk], dh[2 * kk], dh[2 * kk + 1]);
        mma_reg_a<T, HB, D, false>(dx, dza, s_w1, kLdH, lane);
      }
      __syncthreads();
      gemm_tn_store<T, HB, D>(s_h, kLdH, s_df, kLdD, ksteps, u2 + int64_t(j) * HB * D, D, warp,
                              lane);
      gemm_tn_store<T, D, HB>(s_x, kLdD, s_dz, kLdH, ksteps, u1 + j * HB, hidden, warp, lane);
    }
  }

  if (p.mode == MlpMode::kBackward) {
    store_rows<T, D>(p.grad_x, p, b, h, t0, row_lo, valid, dx, lane);
  }
}

struct Launcher {
  template <typename T, int D, int HB, int kDepth>
  static cudaError_t run(const MemoryMlpParams& p, cudaStream_t stream) {
    return launch_tiles(memory_mlp_kernel<T, D, HB, kDepth>,
                        Smem<D, HB, kDepth>::bytes(sizeof(T)), p, stream);
  }
};

struct SmemBytes {
  template <typename T, int D, int HB, int kDepth>
  static size_t run(const MemoryMlpParams&, cudaStream_t) {
    return Smem<D, HB, kDepth>::bytes(sizeof(T));
  }
};

}  // namespace

size_t memory_mlp_smem_bytes(const MemoryMlpParams& p) {
  if (!memory_mlp_supported(p.dim, p.hidden, p.depth)) return 0;
  if (p.mode == MlpMode::kGradBackward) return memory_mlp_grad_bwd_smem_bytes(p);
  return dispatch<SmemBytes>(p, nullptr);
}

bool memory_mlp_supported(int dim, int hidden, int depth) {
  const bool dim_ok = dim == 16 || dim == 32 || dim == 64 || dim == 128;
  return dim_ok && (depth == 1 || (depth == 2 && hidden >= 16 && hidden % 16 == 0));
}

cudaError_t memory_mlp(const MemoryMlpParams& p, cudaStream_t stream, int device) {
  if (!memory_mlp_supported(p.dim, p.hidden, p.depth) || p.n_sub < 1 || p.n_chunks < 1 ||
      p.batch < 1 || p.heads < 1 || p.batch > 65535 || p.heads > 65535 ||
      int(p.dtype) < 0 || int(p.dtype) > int(MlpDtype::kFloat32) ||
      (p.shifted && (p.w1_first == nullptr || p.mode == MlpMode::kGrad ||
                     p.mode == MlpMode::kGradBackward))) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  if (p.mode == MlpMode::kGradBackward) return memory_mlp_grad_bwd(p, stream);
  return dispatch<Launcher>(p, stream);
}

}  // namespace titans
