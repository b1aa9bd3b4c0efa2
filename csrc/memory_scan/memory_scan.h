// memory_scan: the chunk-level recurrence of SPEC §5 for one memory layer,
//
//     S_j = eta_j S_{j-1} - U_j,     W_j = (1 - alpha_j) W_{j-1} + S_j,     j = 1..NC,
//
// elementwise over the flattened weight (E = d_in * d_out). The derivation and the reverse
// scan are in python/titans_cuda/ops/memory_scan/README.md.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace titans {

// Strides are in elements. Within one (b, h, chunk) the E weight elements are contiguous.
struct MemoryScanFwdParams {
  const float* updates;  // U [B, H, NC, E]
  int64_t updates_b_stride, updates_h_stride, updates_c_stride;
  const float* forget;  // alpha [B, NC, H]
  int64_t forget_b_stride, forget_c_stride, forget_h_stride;
  const float* momentum;  // eta [B, NC, H]
  int64_t momentum_b_stride, momentum_c_stride, momentum_h_stride;
  const float* initial_weights;  // W_0 [B, H, E]; b stride 0 broadcasts [H, E] over the batch
  int64_t initial_weights_b_stride, initial_weights_h_stride;
  const float* initial_momentum;  // S_0 [B, H, E], or nullptr for S_0 = 0
  int64_t initial_momentum_b_stride, initial_momentum_h_stride;
  float* weights_out;  // W_1..W_NC [B, H, NC, E], contiguous
  float* momentum_out;  // S_NC [B, H, E], contiguous
  int batch, heads, n_chunks;
  int64_t elements;  // E
};

// Checks the parameters it can (sizes, alignment-dependent vector width), launches on
// `stream` on `device`, and returns the launch status.
cudaError_t memory_scan_fwd(const MemoryScanFwdParams& params, cudaStream_t stream, int device);

// The address of the kernel the launcher would run, for cudaFuncGetAttributes diagnostics.
const void* memory_scan_fwd_kernel_address();

}  // namespace titans
