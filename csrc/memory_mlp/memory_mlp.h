// memory_mlp: the memory MLP of SPEC §1 on 64-token tiles, with tensor cores (mma.sync, bf16 or
// fp16 operands, fp32 accumulation, fp32 weights converted to the operand type in shared memory;
// fp32 inputs keep fp32 operands and take split "3xTF32" products, accurate to fp32 rounding
// level, see common/mma.cuh).
//
// One kernel, three modes (what a tile computes; f = the MLP's last pre-activation):
//   kForward  y = [x +] [LN](f)                                          (memory_forward)
//   kGrad     U^l = sum_t lr_t h^{l-1}_t^T dz^l_t with dl/dy = 2 (y - v)  (memory_grad)
//   kBackward given dl/dy: dx, the per-tile dW^l = sum_t h^{l-1}_t^T dz^l_t and the per-tile
//             d ln_weight, d ln_bias partials                            (memory_forward's VJP)
//   kGradBackward given dL/dU per chunk: dk, dv, dlr, per-tile dW and d ln partials
//             (memory_grad's VJP, the second-order terms; memory_mlp_grad_bwd.cu)
// A tile is up to 64 tokens of one (b, h, chunk): chunk c, sub-tile s covers tokens
// c * chunk + 64 s ... (at most the chunk's end and T). Per-tile sums (U, dW, dln) are written
// once per tile, never accumulated with atomics, so the results are deterministic; when a chunk
// spans several tiles (or weights are shared over tiles) the caller sums the tile axis.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace titans {

enum class MlpMode : int { kForward = 0, kGrad = 1, kBackward = 2, kGradBackward = 3 };
enum class MlpDtype : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

// Strides are in elements; the feature axis of x/v/dy and the inner two axes of each weight
// are contiguous. Outputs are contiguous.
struct MemoryMlpParams {
  const void* x;  // x (forward, backward) or k (grad): [B, T, H, D]
  int64_t x_b_stride, x_t_stride, x_h_stride;
  const void* v;  // kGrad, kGradBackward: values [B, T, H, D]
  int64_t v_b_stride, v_t_stride, v_h_stride;
  const float* lr;  // kGrad, kGradBackward: token weights theta [B, T, H]
  int64_t lr_b_stride, lr_t_stride, lr_h_stride;
  const void* grad_y;  // kBackward: dl/dy [B, T, H, D]
  int64_t grad_y_b_stride, grad_y_t_stride, grad_y_h_stride;
  const float* w1;  // layer 1 [.., D, d_out1]; b/h/chunk strides (0 broadcasts)
  int64_t w1_b_stride, w1_h_stride, w1_c_stride;
  const float* w2;  // layer 2 [.., hidden, D] (depth 2 only)
  int64_t w2_b_stride, w2_h_stride, w2_c_stride;
  // shifted (kForward, kBackward; per-chunk w1/w2): chunk c reads w*[c - 1] and chunk 0 reads
  // w*_first [B | 1, H, ...] (b stride 0 broadcasts); kBackward then writes chunk 0's dW to
  // u*_first [B, H, n_sub, ...] and chunk c's to the tiles of slot c - 1 of u*. This is the
  // read of the parallel variant (chunk j with W_{j-1}) without concatenating W_0 and W_all.
  bool shifted;
  const float* w1_first;
  int64_t w1_first_b_stride, w1_first_h_stride;
  const float* w2_first;
  int64_t w2_first_b_stride, w2_first_h_stride;
  float* u1_first;
  float* u2_first;
  const float* ln_weight;  // [H, D] contiguous or nullptr (no LayerNorm)
  const float* ln_bias;    // [H, D] contiguous or nullptr
  float ln_eps;
  void* y;          // kForward: [B, T, H, D], x's dtype
  void* grad_x;     // kBackward, kGradBackward: [B, T, H, D], x's dtype
  void* grad_v;     // kGradBackward: [B, T, H, D], x's dtype
  float* grad_lr;   // kGradBackward: [B, T, H]
  const float* grad_u1;  // kGradBackward: dL/dU1 [B, H, n_chunks, D, d_out1], contiguous
  const float* grad_u2;  // kGradBackward, depth 2: dL/dU2 [B, H, n_chunks, hidden, D]
  float* u1;        // kGrad: U1; kBackward, kGradBackward: dW1 [B, H, n_tiles, D, d_out1]
  float* u2;        // depth 2: [B, H, n_tiles, hidden, D]
  float* grad_ln;   // kBackward, kGradBackward with LN: [B, H, n_tiles, 2, D] (d weight, bias)
  int batch, heads, seqlen, dim, hidden, depth;
  int chunk;        // tokens per chunk (T for a single chunk)
  int n_chunks, n_sub;  // n_tiles = n_chunks * n_sub, n_sub = ceil(min(chunk, T) / 64)
  int activation;   // 0 silu, 1 gelu (exact erf)
  bool residual;
  MlpMode mode;
  MlpDtype dtype;
};

constexpr int kMlpTileRows = 64;

// Whether (dim, hidden, depth) has a compiled kernel: dim in {16, 32, 64, 128}; depth 1
// (hidden ignored, the layer is dim x dim) or depth 2 with hidden a multiple of 16.
bool memory_mlp_supported(int dim, int hidden, int depth);

cudaError_t memory_mlp(const MemoryMlpParams& params, cudaStream_t stream, int device);

// Dynamic shared memory (bytes) of the kernel that memory_mlp() would launch for params'
// (dtype, dim, hidden, depth, mode); 0 when unsupported. Every instance fits the 227 KB of
// sm_90/sm_100 and most fit the 163 KB of sm_80; callers compare it with the device's opt-in
// limit and use the reference where it does not fit (e.g. D = 128 on sm_86/sm_89's 99 KB).
size_t memory_mlp_smem_bytes(const MemoryMlpParams& params);

// kGradBackward's launcher (memory_mlp_grad_bwd.cu); memory_mlp() routes to it.
cudaError_t memory_mlp_grad_bwd(const MemoryMlpParams& params, cudaStream_t stream);
size_t memory_mlp_grad_bwd_smem_bytes(const MemoryMlpParams& params);

}  // namespace titans
