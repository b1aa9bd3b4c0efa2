// neural_memory_decode: the exact neural memory of SPEC §2-4 for short calls (streaming
// decode), token by token on the state, one CTA (or a cluster of CTAs) per (sequence, head).
//
// For each token t of a call (position p = offset + t in its sequence's chunk grid):
//   chunk weights   Wc = W (the weights before t) when p % C == 0, else the open chunk's
//   gradient        u = grad_W ||M_Wc(k_t) - v_t||^2 (per layer: rank one, h^T dz)
//   write           S = eta S - theta u;  W = (1 - alpha) W + S
//   read            o_t = M_W(q_t) (read "token") or M_Wc(q_t) (read "chunk")
// and the final state (W, S, the open chunk's weights, (offset + T) % C).
//
// A token costs one pass over W and S (read and write) plus reads of Wc (L2-resident after the
// first): the kernel is memory-bound, and does its arithmetic in fp32 on CUDA cores (float4
// accesses, fixed-order reductions through shared memory and shuffles: deterministic).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace titans {

constexpr int kDecodeMaxLayers = 2;
constexpr int kDecodeMaxDim = 128;
constexpr int kDecodeMaxHidden = 512;
constexpr int kDecodeMaxSplit = 8;

struct DecodeParams {
  // q, k, v [N, T, H, D] in the input dtype; strides in elements, feature axis contiguous
  const void* q;
  const void* k;
  const void* v;
  int64_t q_n_stride, q_t_stride, q_h_stride;
  int64_t k_n_stride, k_t_stride, k_h_stride;
  int64_t v_n_stride, v_t_stride, v_h_stride;
  // gates theta, alpha, eta: fp32 [N, T, H] contiguous
  const float* lr;
  const float* forget;
  const float* momentum;
  // state in, per layer [N, H, d_in, d_out] fp32 with contiguous inner matrix; n stride 0
  // broadcasts (the learned initial weights); s_in / cw_in nullptr: zero momentum / no open
  // chunk (then every offset must be 0)
  const float* w_in[kDecodeMaxLayers];
  int64_t w_in_n_stride[kDecodeMaxLayers], w_in_h_stride[kDecodeMaxLayers];
  const float* s_in[kDecodeMaxLayers];
  const float* cw_in[kDecodeMaxLayers];  // s_in / cw_in: contiguous [N, H, d_in, d_out]
  const int* offset;                     // [N] or nullptr (all 0)
  const float* ln_weight;                // [H, D] or nullptr (no LayerNorm)
  const float* ln_bias;                  // [H, D] or nullptr
  float ln_eps;
  void* o;                               // [N, T, H, D] contiguous, input dtype
  float* w_out[kDecodeMaxLayers];        // contiguous [N, H, d_in, d_out]
  float* s_out[kDecodeMaxLayers];
  float* cw_out[kDecodeMaxLayers];
  int n_seq, seqlen, heads, dim, hidden, depth, chunk;
  int activation;  // 0 silu, 1 gelu (erf)
  bool residual;
  bool read_chunk;
  int dtype;       // 0 bf16, 1 fp16, 2 fp32
  // CTAs per (sequence, head), a thread-block cluster on sm_90+ (each owns a slice of the
  // hidden units; 1 below sm_90); a slice must be a multiple of 4 wide. 0 means 1: on H100 at
  // B = 2, H = 16, D = 64, hidden 256 (2026-11-26) splits 1 / 2 / 4 / 8 took 26 / 25 / 40 /
  // 55 us per token, the cluster barriers costing more than the extra SMs bring.
  int split;
};

// dim in {16, 32, 64, 128}; depth 1, or depth 2 with hidden % 4 == 0 and hidden <= 512.
bool neural_memory_decode_supported(int dim, int hidden, int depth);

cudaError_t neural_memory_decode(const DecodeParams& params, cudaStream_t stream, int device);

}  // namespace titans
