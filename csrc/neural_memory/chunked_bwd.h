// neural_memory_chunked_bwd: the fused backward of neural_memory_chunked (chunked.h), both
// reads. Depth 2 (chunked_bwd_kernel.cuh): per (sequence, head) one CTA, or on sm_90+ a
// thread-block cluster of up to 8 CTAs each owning every split-th hidden block (as the
// forward), walks the chunks in reverse and carries the state's cotangents (W̄, S̄) in global
// memory, computing per chunk what python/titans_cuda/ops/neural_memory/chunk_vjp_blocked.py
// computes. The chunk-start states come from the forward's checkpoints
// (NeuralMemoryParams::ckpt_every = K): every chunk, or every K-th with the others recomputed in
// the kernel a group at a time (ring), and the read's z2 and the keys' fk from the forward's
// NeuralMemoryParams::read_z2 / keys_fk (required). Depth 1 (chunked_bwd1_kernel.cuh): one CTA
// per (sequence, head) or a cluster of 2 or 4 (params.f.split 0: the launcher's choice; 1, 2, 4
// force one), fp32 products on CUDA cores, checkpoints at every chunk (K = 1 required), the read
// and the keys recomputed (read_z2 / keys_fk unused).
// Supported (neural_memory_chunked_bwd_supported): bf16/fp16 inputs; D 32 or 64 with chunk 16,
// 32 or 64, or D 128 with chunk 16 or 32 (at depth 1 as a cluster of 4 only: sm_90+); depth 1,
// or depth 2 with hidden a multiple of 32 up to 512. Everything else falls back to the
// reference's VJP in Python. At depth 2 params.f.split forces a split: 1..8 CTAs per
// (sequence, head), a cluster on sm_90+, or -2..-8, ordinary CTAs of a cooperative launch that
// exchange through global memory (any architecture; every CTA must be resident at once), at most
// hidden / 32 either way; 0 lets the launcher choose (neural_memory_chunked_bwd_plan tells its
// choice first, so that the caller can allocate the exchange).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "params.h"

namespace titans {

struct NeuralMemoryBwdParams {
  // The forward's arguments (q, k, v, gates, cu_seqlens, w_in / cw_in / offset of the initial
  // state, LayerNorm, sizes, and read_z2 / keys_fk, which the forward wrote; its outputs and
  // s_in are unused).
  NeuralMemoryParams f;
  // dl/do: contiguous [B, T, H, D] in the input dtype.
  const void* o_bar;
  // The state at the start of every chunk of each sequence's padded timeline, per layer
  // [n_chunks, N, H, d_in, d_out] fp32 (the forward's checkpoints with ckpt_every = 1).
  const float* ckpt_w[kNeuralMemoryMaxLayers];
  const float* ckpt_s[kNeuralMemoryMaxLayers];
  // In: the cotangents of the final W and S (the final chunk weights' cotangent already added
  // to W̄ where the final chunk is closed). Out: those of the initial W0 and S0 (the W0 part
  // only: chunk 0's gradient weights go to wg0_bar). Contiguous [N, H, d_in, d_out] fp32.
  float* w_bar[kNeuralMemoryMaxLayers];
  float* s_bar[kNeuralMemoryMaxLayers];
  // Out: the cotangent of chunk 0's gradient weights (W0, or the open chunk's weights of the
  // initial state), plus cw_bar for sequences without tokens; [N, H, d_in, d_out] fp32.
  float* wg0_bar[kNeuralMemoryMaxLayers];
  // The final chunk weights' cotangent owed to the last chunk's gradient weights (zero where
  // the final chunk is closed), [N, H, d_in, d_out] fp32, or nullptr.
  const float* cw_bar[kNeuralMemoryMaxLayers];
  // Out: dq, dk, dv contiguous [B, T, H, D] (input dtype); dlr, dforget, dmomentum [B, T, H]
  // fp32; LayerNorm parameters per (sequence, head, chunk row) [N, H, C, D] fp32 partials
  // (nullptr without LayerNorm / bias), summed by the caller.
  void* dq;
  void* dk;
  void* dv;
  float* dlr;
  float* dforget;
  float* dmomentum;
  float* dln_w;
  float* dln_b;
  // Sub-chunks (f.sub = R > 1, params.h; either read): per layer [N, H, d_in, d_out] fp32, the
  // cotangent of a call chunk's start weights that its later sub-chunks owe (written by them,
  // added to W̄ at the chunk's first sub-chunk). f.ckpt_every counts sub-chunks: a multiple of R
  // at depth 2, 1 at depth 1. nullptr without sub-chunks.
  float* wg_carry[kNeuralMemoryMaxLayers];
  // Per (sequence, head) scratch of neural_memory_chunked_bwd_scratch_floats floats.
  float* scratch;
  // With checkpoints every K = f.ckpt_every > 1 chunks (ckpt_w / ckpt_s then hold chunks 0, K,
  // 2K, ...): per (sequence, head) K - 1 chunk-start states [W1, W2, S1, S2] fp32, recomputed
  // group by group from the checkpoint. nullptr when K = 1.
  float* ring;
  // A split over ordinary CTAs (params.f.split = -s: s CTAs per (sequence, head) in one
  // cooperative launch, the sums exchanged through global memory): per (sequence, head)
  // neural_memory_chunked_bwd_exchange_floats(-s) floats, and an arrival counter 32 unsigned
  // apart (its own 128-byte line), zero at launch. nullptr otherwise.
  float* exchange;
  unsigned* arrivals;
};

bool neural_memory_chunked_bwd_supported(int dim, int hidden, int depth, int chunk, int dtype,
                                         bool read_chunk);

// Dynamic shared memory one CTA needs (0 when unsupported; depth 1: one CTA's plan at D <= 64,
// a cluster of 4's CTA at D = 128).
size_t neural_memory_chunked_bwd_smem_bytes(int dim, int hidden, int depth, int chunk,
                                            int dtype);

// fp32 scratch per (sequence, head) (depth 1 or 2; hidden = dim at depth 1).
size_t neural_memory_chunked_bwd_scratch_floats(int dim, int hidden, int depth, int chunk);

// The split the launcher takes for `split` (0: its choice; otherwise `split` itself once
// checked) on `device`: the fewest hidden blocks per CTA, a cluster where the
// clusters of every (sequence, head) are resident at once, else ordinary CTAs (a negative
// split) where those are and give fewer blocks per CTA. 0 when unsupported or invalid.
int neural_memory_chunked_bwd_plan(int n_seq, int heads, int dim, int hidden, int chunk,
                                   int dtype, int split, int device);

// fp32 exchange floats per (sequence, head) for a split (0 unless split < 0).
size_t neural_memory_chunked_bwd_exchange_floats(int dim, int chunk, int split);

cudaError_t neural_memory_chunked_bwd(const NeuralMemoryBwdParams& params, cudaStream_t stream,
                                      int device);

}  // namespace titans
