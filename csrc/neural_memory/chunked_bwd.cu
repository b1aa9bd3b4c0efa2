// neural_memory_chunked_bwd (chunked_bwd.h): support rule, sizes, plan and dispatch; the kernel
// is in chunked_bwd_kernel.cuh, its instances in chunked_bwd_<dtype>_d<D>.cu.
#include <type_traits>

#include "chunked_bwd1_kernel.cuh"
#include "chunked_bwd_kernel.cuh"

namespace titans {
namespace {

// f(T{}, std::integral_constant<int, D>{}) for the (dtype, D) instances: bf16 / fp16 (dtype 0 /
// 1), D 32 / 64 / 128 (callers check neural_memory_chunked_bwd_supported first; depth 1 has
// no D = 128 instances).
template <typename F>
auto by_dtype_dim(int dtype, int dim, F&& f) {
  using D32 = std::integral_constant<int, 32>;
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype == 0) {
    return dim == 32 ? f(__nv_bfloat16{}, D32{})
                     : (dim == 64 ? f(__nv_bfloat16{}, D64{}) : f(__nv_bfloat16{}, D128{}));
  }
  return dim == 32 ? f(__half{}, D32{}) : (dim == 64 ? f(__half{}, D64{}) : f(__half{}, D128{}));
}

}  // namespace

bool neural_memory_chunked_bwd_supported(int dim, int hidden, int depth, int chunk, int dtype,
                                         bool read_chunk) {
  // D = 128: chunks 16 and 32 (depth 2: hidden blocks of 16; depth 1: clusters of 4; the
  // shared-memory plans of chunk 64 do not fit a block)
  const bool dim_ok = dim == 32 || dim == 64 || (dim == 128 && chunk <= 32);
  const bool chunk_ok = chunk == 16 || chunk == 32 || chunk == 64;
  (void)read_chunk;  // both reads
  const bool hidden_ok = depth == 1 ? hidden == dim
                                    : depth == 2 && hidden >= chunked::kHB && hidden <= 512 &&
                                          hidden % chunked::kHB == 0;
  // fp32 inputs: depth 1 only (its products are fp32 on CUDA cores)
  return dim_ok && chunk_ok && hidden_ok && (dtype == 0 || dtype == 1 || (dtype == 2 && depth == 1));
}

size_t neural_memory_chunked_bwd_smem_bytes(int dim, int hidden, int depth, int chunk,
                                            int dtype) {
  if (!neural_memory_chunked_bwd_supported(dim, hidden, depth, chunk, dtype, false)) return 0;
  return depth == 1 ? chunked_bwd1::smem_bytes1(dim, chunk,
                                                dim > 64 ? chunked_bwd1::kSplit128 : 1)
                    : chunked_bwd::make_bwd_layout(dim, chunk).total;
}

size_t neural_memory_chunked_bwd_scratch_floats(int dim, int hidden, int depth, int chunk) {
  return depth == 1 ? chunked_bwd1::scratch_floats1(dim, chunk)
                    : chunked_bwd::scratch_floats(dim, hidden, chunk);
}

int neural_memory_chunked_bwd_plan(int n_seq, int heads, int dim, int hidden, int chunk,
                                   int dtype, int split, int device) {
  if (!neural_memory_chunked_bwd_supported(dim, hidden, 2, chunk, dtype, false) || n_seq < 1 ||
      heads < 1) {
    return 0;
  }
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return 0;
  return by_dtype_dim(dtype, dim, [&](auto t, auto d) {
    return chunked_bwd::plan_by_chunk<decltype(t), d()>(n_seq, heads, hidden, chunk, split);
  });
}

size_t neural_memory_chunked_bwd_exchange_floats(int dim, int chunk, int split) {
  if (split >= 0) return 0;
  return size_t(-split) * 2 * size_t(chunked_bwd::exchange_buffer_floats(dim, chunk));
}

cudaError_t neural_memory_chunked_bwd(const NeuralMemoryBwdParams& bp, cudaStream_t stream,
                                      int device) {
  const NeuralMemoryParams& p = bp.f;
  if (!neural_memory_chunked_bwd_supported(p.dim, p.hidden, p.depth, p.chunk, p.dtype,
                                           p.read_chunk) ||
      p.n_seq < 1 || p.heads < 1 || p.n_seq > 65535 || p.heads > 65535 || p.seqlen < 0) {
    return cudaErrorInvalidValue;
  }
  const bool common_ok =
      p.q != nullptr && p.k != nullptr && p.v != nullptr && bp.o_bar != nullptr &&
      p.lr != nullptr && p.forget != nullptr && p.momentum != nullptr && bp.dq != nullptr &&
      bp.dk != nullptr && bp.dv != nullptr && bp.dlr != nullptr && bp.dforget != nullptr &&
      bp.dmomentum != nullptr && bp.scratch != nullptr &&
      (p.ln_weight == nullptr || bp.dln_w != nullptr) &&
      (p.ln_weight == nullptr || p.ln_bias == nullptr || bp.dln_b != nullptr);
  // sub-chunks (chunked_bwd.h): a carry buffer per layer; at depth 2 checkpoint groups made of
  // whole call chunks (depth 1 reads every sub-chunk's start state: below)
  const int sub = p.sub > 1 ? p.sub : 1;
  if (sub > 1 && (sub > 8 || bp.wg_carry[0] == nullptr ||
                  (p.depth == 2 && (p.ckpt_every < sub || p.ckpt_every % sub != 0 ||
                                    bp.wg_carry[1] == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  if (p.depth == 1) {  // checkpoints at every chunk; the read and keys are recomputed
    if (p.w_in[0] == nullptr || bp.ckpt_w[0] == nullptr || bp.ckpt_s[0] == nullptr ||
        p.ckpt_every != 1 || bp.w_bar[0] == nullptr || bp.s_bar[0] == nullptr ||
        bp.wg0_bar[0] == nullptr || !common_ok) {
      return cudaErrorInvalidValue;
    }
    DeviceGuard guard(device);
    TITANS_RETURN_IF_ERROR(guard.status());
    if (p.dtype == 2) {
      switch (p.dim) {
        case 32: return chunked_bwd1::launch1_by_chunk<float, 32>(bp, stream);
        case 64: return chunked_bwd1::launch1_by_chunk<float, 64>(bp, stream);
        default: return chunked_bwd1::launch1_by_chunk<float, 128>(bp, stream);
      }
    }
    return by_dtype_dim(p.dtype, p.dim, [&](auto t, auto d) {
      return chunked_bwd1::launch1_by_chunk<decltype(t), d()>(bp, stream);
    });
  }
  for (int l = 0; l < 2; ++l) {
    if (p.w_in[l] == nullptr || bp.ckpt_w[l] == nullptr || bp.ckpt_s[l] == nullptr ||
        (p.ckpt_every > 1 && bp.ring == nullptr) ||
        bp.w_bar[l] == nullptr || bp.s_bar[l] == nullptr || bp.wg0_bar[l] == nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  if (!common_ok || p.read_z2 == nullptr || p.keys_fk == nullptr) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  return by_dtype_dim(p.dtype, p.dim, [&](auto t, auto d) {
    return chunked_bwd::launch_by_chunk<decltype(t), d()>(bp, stream);
  });
}

}  // namespace titans
