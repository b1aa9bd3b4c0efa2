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

#include "params.h"

namespace titans {

constexpr int kDecodeMaxLayers = kNeuralMemoryMaxLayers;
constexpr int kDecodeMaxDim = 128;
constexpr int kDecodeMaxHidden = 512;
constexpr int kDecodeMaxSplit = 8;

using DecodeParams = NeuralMemoryParams;  // params.h (cu_seqlens unused: dense batches)

// dim in {16, 32, 64, 128}; depth 1, or depth 2 with hidden % 4 == 0 and hidden <= 512.
bool neural_memory_decode_supported(int dim, int hidden, int depth);

cudaError_t neural_memory_decode(const DecodeParams& params, cudaStream_t stream, int device);

}  // namespace titans
