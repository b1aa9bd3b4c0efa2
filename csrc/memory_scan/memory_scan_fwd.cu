// memory_scan forward: one thread owns kVec consecutive weight elements of one (b, h) and runs
// the recurrence over all chunks with W and S in registers. Work-efficient and a single pass
// over memory: U is read once and every W_j written once, which is the byte floor of the op
// (the recurrence is elementwise, so element parallelism B*H*E/kVec fills the GPU at the sizes
// the library targets; a time-split scan for tiny B*H*E is left to the next kernel issue).
//
// Memory pipeline: kUnroll chunks' updates are loaded before the first is used, so each thread
// keeps kUnroll 16-byte loads in flight; U is streamed (__ldcs, read once) and W_j stored with
// __stcs (written once, not re-read by this kernel).
#include "memory_scan.h"

#include "../common/cuda_check.h"
#include "../common/vec.cuh"

namespace titans {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// One scan step: S = eta S - U;  W = (1 - alpha) W + S.
template <int kVec>
__device__ __forceinline__ void scan_step(Frag<kVec>& w, Frag<kVec>& s, const Frag<kVec>& u,
                                          float decay, float eta) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    s.v[i] = eta * s.v[i] - u.v[i];
    w.v[i] = decay * w.v[i] + s.v[i];
  }
}

template <int kVec>
__global__ void __launch_bounds__(kThreads) memory_scan_fwd_kernel(const MemoryScanFwdParams p) {
  const int64_t tiles_per_head = ceil_div(p.elements, int64_t(kThreads) * kVec);
  const int64_t bh = blockIdx.x / tiles_per_head;
  const int64_t tile = blockIdx.x % tiles_per_head;
  const int b = int(bh / p.heads);
  const int h = int(bh % p.heads);
  const int64_t e = (tile * kThreads + threadIdx.x) * kVec;
  if (e >= p.elements) return;  // E % kVec == 0, so a fragment is all in or all out

  const float* __restrict__ u_ptr =
      p.updates + b * p.updates_b_stride + h * p.updates_h_stride + e;
  const float* __restrict__ forget =
      p.forget + b * p.forget_b_stride + h * p.forget_h_stride;
  const float* __restrict__ momentum =
      p.momentum + b * p.momentum_b_stride + h * p.momentum_h_stride;
  float* __restrict__ w_out =
      p.weights_out + ((int64_t(b) * p.heads + h) * p.n_chunks) * p.elements + e;

  Frag<kVec> w = load<kVec, Cache::kReadOnly>(p.initial_weights + b * p.initial_weights_b_stride +
                                   h * p.initial_weights_h_stride + e);
  Frag<kVec> s;
  if (p.initial_momentum != nullptr) {
    s = load<kVec, Cache::kReadOnly>(p.initial_momentum + b * p.initial_momentum_b_stride +
                          h * p.initial_momentum_h_stride + e);
  } else {
    s = zeros<kVec>();
  }

  int j = 0;
  for (; j + kUnroll <= p.n_chunks; j += kUnroll) {
    Frag<kVec> u[kUnroll];
    float decay[kUnroll], eta[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      u[r] = load<kVec, Cache::kStream>(u_ptr + (j + r) * p.updates_c_stride);
      decay[r] = 1.f - __ldg(forget + (j + r) * p.forget_c_stride);
      eta[r] = __ldg(momentum + (j + r) * p.momentum_c_stride);
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      scan_step<kVec>(w, s, u[r], decay[r], eta[r]);
      store<kVec, Cache::kStream>(w_out + (j + r) * p.elements, w);
    }
  }
  for (; j < p.n_chunks; ++j) {
    const Frag<kVec> u = load<kVec, Cache::kStream>(u_ptr + j * p.updates_c_stride);
    scan_step<kVec>(w, s, u, 1.f - __ldg(forget + j * p.forget_c_stride),
                    __ldg(momentum + j * p.momentum_c_stride));
    store<kVec, Cache::kStream>(w_out + j * p.elements, w);
  }
  store<kVec, Cache::kDefault>(p.momentum_out + (int64_t(b) * p.heads + h) * p.elements + e, s);
}

// The float4 path needs every row start 16-byte aligned: pointers aligned, and every stride
// that moves between rows a multiple of 4 elements (zero strides included).
bool can_vectorize(const MemoryScanFwdParams& p) {
  return p.elements % 4 == 0 &&
         all_aligned16({p.updates, p.initial_weights, p.initial_momentum, p.weights_out,
                        p.momentum_out}) &&
         all_multiple_of4({p.updates_b_stride, p.updates_h_stride, p.updates_c_stride,
                           p.initial_weights_b_stride, p.initial_weights_h_stride,
                           p.initial_momentum_b_stride, p.initial_momentum_h_stride});
}

template <int kVec>
cudaError_t launch(const MemoryScanFwdParams& p, cudaStream_t stream) {
  const long long tiles_per_head = ceil_div(p.elements, (long long)kThreads * kVec);
  const long long blocks = tiles_per_head * p.batch * p.heads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  memory_scan_fwd_kernel<kVec><<<dim3(unsigned(blocks)), dim3(kThreads), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t memory_scan_fwd(const MemoryScanFwdParams& p, cudaStream_t stream, int device) {
  if (p.batch < 0 || p.heads < 0 || p.n_chunks < 0 || p.elements < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.updates == nullptr && p.n_chunks > 0) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  return can_vectorize(p) ? launch<4>(p, stream) : launch<1>(p, stream);
}

const void* memory_scan_fwd_kernel_address() {
  return reinterpret_cast<const void*>(&memory_scan_fwd_kernel<4>);
}

}  // namespace titans
