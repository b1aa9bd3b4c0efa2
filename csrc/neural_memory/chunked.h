// neural_memory_chunked: the exact chunked neural memory of SPEC §2-4 (the dual form of
// python/titans_cuda/ops/neural_memory/README.md), one CTA per (sequence, head) walking the
// sequence's chunks. Per chunk, with W0, S0 the state before it and Wg the weights its
// gradients are taken at (W0, or the open chunk's weights of an initial state):
//
//   1. gates   N, G (C x C) and m, beta, c by running products along each column (no ratios)
//   2. keys    forward of the chunk's keys at Wg, head, dl/dy = 2 (y - v), errors dz per layer
//   3. read    "token": z_t = beta_t (h_t W0) + c_t (h_t S0) - sum_j G[t,j] (h_t . hk_j) dz_j,
//              layer by layer; "chunk": M_Wg(q)
//   4. state   W = beta_C W0 + c_C S0 - hk^T (G[C,:] dz),  S = m_C S0 - hk^T (N[C,:] dz)
//
// At depth 2 a (sequence, head) may span up to 8 CTAs, each owning every split-th hidden block:
// a thread-block cluster on sm_90+, or ordinary CTAs of a cooperative launch exchanging through
// global memory (params.split < 0, or the launcher's choice given params.exchange; 0 lets the
// launcher choose).
// The fp32 state lives in the output tensors (L2-resident between chunks); every product takes
// split-bf16 operands (hi + lo, three mma.sync m16n8k16 per product, fp32 accumulation) staged
// in shared memory, the hidden axis in blocks of 32. Supported: bf16/fp16 inputs, D in
// {32, 64, 128}, depth 1, or depth 2 with hidden a multiple of 32 up to 512, chunk in
// {16, 32, 64, 128}, and a shared-memory plan that fits the GPU
// (neural_memory_chunked_smem_bytes; it does not depend on hidden).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "params.h"

namespace titans {

bool neural_memory_chunked_supported(int dim, int hidden, int depth, int chunk, int dtype);

// Dynamic shared memory one CTA needs (0 when the configuration is unsupported).
size_t neural_memory_chunked_smem_bytes(int dim, int hidden, int depth, int chunk, int dtype);

// fp32 exchange floats per (sequence, head) for a forward split over ordinary CTAs
// (params.exchange: room for the most CTAs, kMaxSplit, two C x D buffers each).
size_t neural_memory_chunked_exchange_floats(int dim, int chunk);

// unsigned apart of the arrival counters of a split over ordinary CTAs, forward and backward
// (params.arrivals: one counter per (sequence, head), each on a 128-byte line of its own).
int neural_memory_arrival_stride();

cudaError_t neural_memory_chunked(const NeuralMemoryParams& params, cudaStream_t stream,
                                  int device);

}  // namespace titans
