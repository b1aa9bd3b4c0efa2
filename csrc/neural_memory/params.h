// NeuralMemoryParams: the arguments of the neural_memory kernels (decode.h: short calls token
// by token; chunked.h: the chunked dual form). Pointers are device addresses (nullptr = absent),
// strides are in elements.
#pragma once

#include <cstdint>

namespace titans {

constexpr int kNeuralMemoryMaxLayers = 2;

// The chunk of the fused backward's sub-chunk instances (NeuralMemoryParams::sub below), which
// a depth-1 forward that keeps its checkpoints walks too: the largest whose backward plan fits
// (ops.bwd_chunking is the Python side).
constexpr int neural_memory_bwd_sub_chunk(int dim) { return dim == 128 ? 32 : 64; }

struct NeuralMemoryParams {
  // q, k, v [B, T, H, D] in the input dtype, feature axis contiguous. Sequence n's token t is at
  // n * n_stride + (start_n + t) * t_stride + h * h_stride, with start_n = cu_seqlens[n] when
  // cu_seqlens is given (then B = 1 and n_stride is unused), else 0.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_n_stride, q_t_stride, q_h_stride;
  int64_t k_n_stride, k_t_stride, k_h_stride;
  int64_t v_n_stride, v_t_stride, v_h_stride;
  // gates theta, alpha, eta: fp32 [B, T, H] contiguous
  const float* lr;
  const float* forget;
  const float* momentum;
  // [N + 1] int64 sequence starts in the packed token axis (chunked kernel only), or nullptr:
  // N = B rows of `seqlen` tokens
  const int64_t* cu_seqlens;
  // state in, per layer [N, H, d_in, d_out] fp32 with contiguous inner matrix; n stride 0
  // broadcasts (the learned initial weights); s_in / cw_in nullptr: zero momentum / no open
  // chunk (then every offset must be 0)
  const float* w_in[kNeuralMemoryMaxLayers];
  int64_t w_in_n_stride[kNeuralMemoryMaxLayers], w_in_h_stride[kNeuralMemoryMaxLayers];
  const float* s_in[kNeuralMemoryMaxLayers];
  const float* cw_in[kNeuralMemoryMaxLayers];  // s_in / cw_in: contiguous [N, H, d_in, d_out]
  const int64_t* offset;                       // [N] or nullptr (all 0); int64 as MemoryState
  const float* ln_weight;                      // [H, D] or nullptr (no LayerNorm)
  const float* ln_bias;                        // [H, D] or nullptr
  float ln_eps;
  void* o;                                     // contiguous [B, T, H, D], input dtype
  float* w_out[kNeuralMemoryMaxLayers];        // contiguous [N, H, d_in, d_out]
  float* s_out[kNeuralMemoryMaxLayers];
  float* cw_out[kNeuralMemoryMaxLayers];
  int n_seq, seqlen, heads, dim, hidden, depth, chunk;
  int activation;  // 0 silu, 1 gelu (erf)
  bool residual;
  bool read_chunk;
  int dtype;       // 0 bf16, 1 fp16, 2 fp32
  // CTAs per (sequence, head), a thread-block cluster on sm_90+ (1 below sm_90), each owning a
  // slice of the hidden units.
  // decode: a slice must be a multiple of 4 wide. 0: the launcher's choice (decode.cu,
  // auto_split: 4 or 2 for small batches at depth 2 on sm_90+, else 1).
  // chunked: depth 2 only, 1..8 and at most the hidden blocks (CTA r owns the hidden blocks b
  // with b % split == r: 32 columns each, 16 in the backward at D = 128). 0: the fewest blocks
  // per CTA whose clusters are all resident at once.
  // depth-1 backward: a cluster of 1, 2 or 4 (at most D / 16), CTA r owning the output columns
  // [r D / s, (r + 1) D / s) of W. 0: 4, else 2, where every cluster fits at once (sm_90+).
  int split;
  // chunked: sub-chunks. sub = R > 1 walks each chunk of the call as R chunks of `chunk` = C / R
  // tokens where the call's chunk C has no kernel instance that fits (shared memory). Depth 2:
  // chunk 128 at D = 64 and 128 in both, at D = 32 in the backward; D = 128 with chunk 64 in the
  // backward. Depth 1, in the backward and in the forward that keeps its checkpoints (every
  // sub-chunk's start state): chunk 128 at D <= 64 as 2 x 64, chunks 64 and 128 at D = 128 as
  // 32s; in every forward chunk 128 at D = 128 and for fp32 inputs (the fp32 kernel's chunks go
  // to 64). Every sub-chunk takes its gradient at the weights of its call chunk's start (SPEC §2
  // for C).
  // `offset` stays in the call's chunks (0 <= offset < C; sub-chunks before the first token
  // have no tokens and pass the state through). The forward keeps a call chunk's start
  // weights in cw_out while its later sub-chunks read them. 1 (or 0): no sub-chunks.
  int sub;
  // chunked only, for the backward: the state (W, S) at the start of chunks 0, K, 2K, ... of
  // each sequence's padded timeline (K = ckpt_every > 0), per layer [n_ckpt, N, H, d_in,
  // d_out] fp32, checkpoint c of sequence n, head h at ((c * N + n) * H + h) * d_in * d_out;
  // slots past a sequence's last chunk are not written. nullptr / 0: none.
  float* ckpt_w[kNeuralMemoryMaxLayers];
  float* ckpt_s[kNeuralMemoryMaxLayers];
  int ckpt_every;
  // chunked, depth 2 (either read), for the backward: the read's output before its head (z2,
  // LayerNorm's and the residual's input), fp32 [B, T, H, D] as o; the forward writes it, the
  // backward (chunked_bwd.h) reads it instead of recomputing the read. nullptr: not kept.
  float* read_z2;
  // the same for the keys' forward at the chunk's gradient weights (fk, the keys' head's
  // input), fp32 [B, T, H, D]: the backward reads it instead of a keys pass.
  float* keys_fk;
  // chunked forward only: the exchange of a split over ordinary CTAs (a cooperative launch,
  // the sums through global memory, where clusters of that size would not all be resident at
  // once): per (sequence, head) kMaxSplit * 2 * chunk * dim floats, and an arrival counter
  // every 32 unsigned (one 128-byte line each), zero at launch. nullptr: clusters only.
  float* exchange;
  unsigned* arrivals;
};

}  // namespace titans
