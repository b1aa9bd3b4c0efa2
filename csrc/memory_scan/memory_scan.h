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

// The reverse scan (SPEC: every gradient of memory_scan). With lamW_j = dL/dW_j and
// lamS_j = dL/dS_j accumulated from the last chunk:
//   lamW_j = gW_j + (1 - alpha_{j+1}) lamW_{j+1},   lamS_j = lamW_j + eta_{j+1} lamS_{j+1}
//   dU_j = -lamS_j,  d eta_j = <lamS_j, S_{j-1}>,  d alpha_j = -<lamW_j, W_{j-1}>
//   dW_0 = (1 - alpha_1) lamW_1,  dS_0 = eta_1 lamS_1
// S_{j-1} is recomputed: one forward pass stores S every kCheckpointEvery chunks in
// `checkpoints`, then each segment is recomputed into registers and swept in reverse.
// The per-(b, j, h) gate reductions over E are written per warp into `gate_partials` and
// summed in a fixed order by a second kernel: deterministic, no atomics.
struct MemoryScanBwdParams {
  const float* grad_weights;  // dL/dW_all [B, H, NC, E] contiguous, or nullptr (zero)
  const float* grad_momentum;  // dL/dS_last [B, H, E] contiguous, or nullptr (zero)
  const float* updates;  // U [B, H, NC, E]
  int64_t updates_b_stride, updates_h_stride, updates_c_stride;
  const float* forget;  // alpha [B, NC, H]
  int64_t forget_b_stride, forget_c_stride, forget_h_stride;
  const float* momentum;  // eta [B, NC, H]
  int64_t momentum_b_stride, momentum_c_stride, momentum_h_stride;
  const float* initial_weights;  // W_0 [B, H, E] (b stride may be 0)
  int64_t initial_weights_b_stride, initial_weights_h_stride;
  const float* initial_momentum;  // S_0 [B, H, E] or nullptr
  int64_t initial_momentum_b_stride, initial_momentum_h_stride;
  const float* weights;  // W_1..W_NC [B, H, NC, E] contiguous (the forward's output)
  float* grad_updates;  // dU [B, H, NC, E] contiguous
  float* grad_forget;  // [B, NC, H] contiguous
  float* grad_momentum_gate;  // d eta [B, NC, H] contiguous
  float* grad_initial_weights;  // dW_0 [B, H, E] contiguous
  float* grad_initial_momentum;  // dS_0 [B, H, E] contiguous, or nullptr when S_0 was not given
  float* checkpoints;  // scratch [B, H, ceil(NC / kCheckpointEvery), E]
  float* gate_partials;  // scratch [2, B, H, NC, warps_per_head(E)]
  int batch, heads, n_chunks;
  int64_t elements;
};

inline constexpr int kScanCheckpointEvery = 8;
inline constexpr int kScanBwdThreads = 256;

// Scratch sizes (in floats) the caller allocates for memory_scan_bwd.
int64_t memory_scan_bwd_checkpoint_floats(int batch, int heads, int n_chunks, int64_t elements);
int64_t memory_scan_bwd_partial_floats(int batch, int heads, int n_chunks, int64_t elements);

cudaError_t memory_scan_bwd(const MemoryScanBwdParams& params, cudaStream_t stream, int device);

// The address of the kernel the launcher would run, for cudaFuncGetAttributes diagnostics.
const void* memory_scan_fwd_kernel_address();

}  // namespace titans
