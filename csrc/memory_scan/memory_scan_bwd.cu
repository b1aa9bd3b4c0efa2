// memory_scan backward: the reverse scan of memory_scan.h, one thread per kVec elements of one
// (b, h), like the forward.
//
//   pass 1  recompute S forward, storing S_{j-1} at every kScanCheckpointEvery-th chunk
//   pass 2  for each segment, last first: recompute its S_{j-1} into registers from the
//           checkpoint, then sweep it in reverse carrying lamW, lamS; write dU_j and one
//           partial of each gate gradient per warp
//   reduce  a warp per (gate, b, h, j) sums the partials in a fixed order
//
// Bytes per (b, h) and layer: U twice, W_all, dL/dW_all and dU once each, checkpoints 2/8:
// about 5.25 * NC * E * 4, against 4 * NC * E * 4 for a kernel that could keep every S.
#include "memory_scan.h"

#include "../common/cuda_check.h"
#include "../common/vec.cuh"

namespace titans {
namespace {

constexpr int kThreads = kScanBwdThreads;
constexpr int kEvery = kScanCheckpointEvery;
constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

template <int kVec>
__device__ __forceinline__ float dot(const Frag<kVec>& a, const Frag<kVec>& b) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc += a.v[i] * b.v[i];
  return acc;
}

template <int kVec>
__global__ void __launch_bounds__(kThreads) memory_scan_bwd_kernel(const MemoryScanBwdParams p,
                                                                   int warps_per_head) {
  const int64_t tiles_per_head = ceil_div(p.elements, int64_t(kThreads) * kVec);
  const int64_t bh = blockIdx.x / tiles_per_head;
  const int64_t tile = blockIdx.x % tiles_per_head;
  const int b = int(bh / p.heads);
  const int h = int(bh % p.heads);
  const int64_t t_in_head = tile * kThreads + threadIdx.x;
  const int64_t warp_in_head = t_in_head / kWarp;
  if (warp_in_head >= warps_per_head) return;  // whole warps only: the shuffles stay full
  const int lane = threadIdx.x % kWarp;
  const int64_t e = t_in_head * kVec;
  const bool active = e < p.elements;  // E % kVec == 0: a fragment is all in or all out
  const int n_chunks = p.n_chunks;
  const int64_t E = p.elements;
  const int64_t head = int64_t(b) * p.heads + h;

  const float* u_ptr = p.updates + b * p.updates_b_stride + h * p.updates_h_stride + e;
  const float* forget = p.forget + b * p.forget_b_stride + h * p.forget_h_stride;
  const float* momentum = p.momentum + b * p.momentum_b_stride + h * p.momentum_h_stride;
  const int n_ckpt = int(ceil_div(n_chunks, kEvery));
  float* ckpt = p.checkpoints + head * n_ckpt * E + e;

  // pass 1: S forward, checkpoints of S_{j-1} at j = 0, kEvery, 2 kEvery, ...; a segment's
  // kEvery updates are loaded before the first is used (kEvery loads in flight per thread,
  // not one: the loads cannot move above the checkpoint store by themselves)
  Frag<kVec> s = zeros<kVec>();
  if (active && p.initial_momentum != nullptr) {
    s = load<kVec, Cache::kReadOnly>(p.initial_momentum + b * p.initial_momentum_b_stride +
                                     h * p.initial_momentum_h_stride + e);
  }
  for (int g = 0; g < n_ckpt && active; ++g) {
    const int j0 = g * kEvery;
    const int len = min(kEvery, n_chunks - j0);
    Frag<kVec> u[kEvery];
    float eta[kEvery];
#pragma unroll
    for (int r = 0; r < kEvery; ++r) {
      if (r < len) {
        u[r] = load<kVec, Cache::kReadOnly>(u_ptr + (j0 + r) * p.updates_c_stride);
        eta[r] = __ldg(momentum + (j0 + r) * p.momentum_c_stride);
      }
    }
    store<kVec, Cache::kDefault>(ckpt + int64_t(g) * E, s);
#pragma unroll
    for (int r = 0; r < kEvery; ++r) {
      if (r < len) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) s.v[i] = eta[r] * s.v[i] - u[r].v[i];
      }
    }
  }

  // pass 2: reverse sweep, segment by segment
  Frag<kVec> carry_w = zeros<kVec>();  // (1 - alpha_{j+1}) lamW_{j+1}
  Frag<kVec> carry_s = zeros<kVec>();  // eta_{j+1} lamS_{j+1}; starts as dL/dS_last
  if (active && p.grad_momentum != nullptr) {
    carry_s = load<kVec, Cache::kReadOnly>(p.grad_momentum + head * E + e);
  }
  const float* w_all = p.weights + head * n_chunks * E + e;
  const float* g_w = p.grad_weights == nullptr ? nullptr : p.grad_weights + head * n_chunks * E + e;
  float* d_u = p.grad_updates + head * n_chunks * E + e;
  const int64_t partial_stride = int64_t(p.batch) * p.heads * n_chunks * warps_per_head;
  float* partial_alpha = p.gate_partials + head * n_chunks * warps_per_head + warp_in_head;
  float* partial_eta = partial_alpha + partial_stride;

  for (int g = n_ckpt - 1; g >= 0; --g) {
    const int j0 = g * kEvery;
    const int len = min(kEvery, n_chunks - j0);
    Frag<kVec> s_prev[kEvery];
    Frag<kVec> s_run = zeros<kVec>();
    if (active) s_run = load<kVec, Cache::kDefault>(ckpt + int64_t(g) * E);
#pragma unroll
    for (int r = 0; r < kEvery; ++r) {
      if (r < len) {
        s_prev[r] = s_run;
        if (active) {
          const Frag<kVec> u = load<kVec, Cache::kReadOnly>(u_ptr + (j0 + r) * p.updates_c_stride);
          const float eta = __ldg(momentum + (j0 + r) * p.momentum_c_stride);
#pragma unroll
          for (int i = 0; i < kVec; ++i) s_run.v[i] = eta * s_run.v[i] - u.v[i];
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kEvery; ++rr) {
      const int r = kEvery - 1 - rr;
      if (r < len) {
        const int j = j0 + r;
        Frag<kVec> lam_w = carry_w, lam_s, w_prev = zeros<kVec>();
        if (active) {
          if (g_w != nullptr) {
            const Frag<kVec> gw = load<kVec, Cache::kStream>(g_w + int64_t(j) * E);
#pragma unroll
            for (int i = 0; i < kVec; ++i) lam_w.v[i] += gw.v[i];
          }
          w_prev = j > 0 ? load<kVec, Cache::kReadOnly>(w_all + int64_t(j - 1) * E)
                         : load<kVec, Cache::kReadOnly>(p.initial_weights +
                                                        b * p.initial_weights_b_stride +
                                                        h * p.initial_weights_h_stride + e);
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) lam_s.v[i] = lam_w.v[i] + carry_s.v[i];
        if (active) {
          Frag<kVec> du;
#pragma unroll
          for (int i = 0; i < kVec; ++i) du.v[i] = -lam_s.v[i];
          store<kVec, Cache::kStream>(d_u + int64_t(j) * E, du);
        }
        // inactive lanes hold zeros, so they add nothing to the warp sums
        const float pa = warp_sum(dot(lam_w, w_prev));
        const float pe = warp_sum(dot(lam_s, s_prev[r]));
        if (lane == 0) {
          partial_alpha[int64_t(j) * warps_per_head] = pa;
          partial_eta[int64_t(j) * warps_per_head] = pe;
        }
        const float decay = 1.f - __ldg(forget + j * p.forget_c_stride);
        const float eta = __ldg(momentum + j * p.momentum_c_stride);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          carry_w.v[i] = decay * lam_w.v[i];
          carry_s.v[i] = eta * lam_s.v[i];
        }
      }
    }
  }
  if (active) {
    store<kVec, Cache::kDefault>(p.grad_initial_weights + head * E + e, carry_w);
    if (p.grad_initial_momentum != nullptr) {
      store<kVec, Cache::kDefault>(p.grad_initial_momentum + head * E + e, carry_s);
    }
  }
}

// One warp per (gate, b, h, j): lanes sum strided partials in order, then a fixed shuffle tree.
// d alpha_j = -sum, d eta_j = +sum, written to [B, NC, H].
__global__ void gate_reduce_kernel(const float* __restrict__ partials, int batch, int heads,
                                   int n_chunks, int warps_per_head, float* __restrict__ d_forget,
                                   float* __restrict__ d_eta) {
  const int64_t rows_per_gate = int64_t(batch) * heads * n_chunks;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= 2 * rows_per_gate) return;
  const float* src = partials + row * warps_per_head;
  float acc = 0.f;
  for (int k = lane; k < warps_per_head; k += kWarp) acc += src[k];
  acc = warp_sum(acc);
  if (lane == 0) {
    const bool is_eta = row >= rows_per_gate;
    const int64_t r = is_eta ? row - rows_per_gate : row;  // (b, h, j) row-major
    const int j = int(r % n_chunks);
    const int64_t bh = r / n_chunks;
    const int h = int(bh % heads);
    const int b = int(bh / heads);
    const int64_t out = (int64_t(b) * n_chunks + j) * heads + h;
    if (is_eta) {
      d_eta[out] = acc;
    } else {
      d_forget[out] = -acc;
    }
  }
}

bool can_vectorize(const MemoryScanBwdParams& p) {
  return p.elements % 4 == 0 &&
         all_aligned16({p.grad_weights, p.grad_momentum, p.updates, p.initial_weights,
                        p.initial_momentum, p.weights, p.grad_updates, p.grad_initial_weights,
                        p.grad_initial_momentum, p.checkpoints}) &&
         all_multiple_of4({p.updates_b_stride, p.updates_h_stride, p.updates_c_stride,
                           p.initial_weights_b_stride, p.initial_weights_h_stride,
                           p.initial_momentum_b_stride, p.initial_momentum_h_stride});
}

template <int kVec>
cudaError_t launch(const MemoryScanBwdParams& p, cudaStream_t stream) {
  const long long tiles_per_head = ceil_div(p.elements, (long long)kThreads * kVec);
  const long long blocks = tiles_per_head * p.batch * p.heads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const int warps_per_head = int(ceil_div(p.elements, (long long)kWarp * kVec));
  memory_scan_bwd_kernel<kVec><<<dim3(unsigned(blocks)), dim3(kThreads), 0, stream>>>(
      p, warps_per_head);
  TITANS_RETURN_IF_ERROR(cudaGetLastError());
  const long long reduce_threads = 2LL * p.batch * p.heads * p.n_chunks * kWarp;
  if (reduce_threads == 0) return cudaSuccess;
  const long long reduce_blocks = ceil_div(reduce_threads, kThreads);
  if (reduce_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gate_reduce_kernel<<<dim3(unsigned(reduce_blocks)), dim3(kThreads), 0, stream>>>(
      p.gate_partials, p.batch, p.heads, p.n_chunks, warps_per_head, p.grad_forget,
      p.grad_momentum_gate);
  return cudaGetLastError();
}

}  // namespace

int64_t memory_scan_bwd_checkpoint_floats(int batch, int heads, int n_chunks, int64_t elements) {
  return int64_t(batch) * heads * ceil_div(n_chunks, kEvery) * elements;
}

int64_t memory_scan_bwd_partial_floats(int batch, int heads, int n_chunks, int64_t elements) {
  return 2 * int64_t(batch) * heads * n_chunks * ceil_div(elements, kWarp);  // scalar path: most
}

cudaError_t memory_scan_bwd(const MemoryScanBwdParams& p, cudaStream_t stream, int device) {
  if (p.batch < 0 || p.heads < 0 || p.n_chunks < 0 || p.elements < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  return can_vectorize(p) ? launch<4>(p, stream) : launch<1>(p, stream);
}

}  // namespace titans
