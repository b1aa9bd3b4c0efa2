// neural_memory_chunked (chunked.h): support rule, shared-memory size and dispatch; the
// split-bf16 kernel is in chunked_kernel.cuh, its instances in chunked_<dtype>_d<D>.cu; the
// depth-1 fp32 kernel in chunked_fwd1_kernel.cuh, its instances in chunked_fwd1.cu.
#include "chunked_fwd1_kernel.cuh"
#include "chunked_kernel.cuh"

namespace titans {
namespace chunked {
namespace {

template <typename T>
cudaError_t by_dim(const NeuralMemoryParams& p, cudaStream_t stream) {
  switch (p.dim) {
    case 32: return by_chunk<T, 32>(p, stream);
    case 64: return by_chunk<T, 64>(p, stream);
    default: return by_chunk<T, 128>(p, stream);
  }
}

// Which forward runs a supported call: the depth-1 fp32 kernel (chunked_fwd1_kernel.cuh) for
// fp32 inputs and for D = 128 with chunk 64 (the split-bf16 plan does not fit a block), chunks
// up to 64 (`chunk` is the kernel's: a sub-chunk where the call's runs as several, params.h
// sub); also for D = 128 at small batches (chunked_fwd1::f1_preferred); the split-bf16 kernel
// otherwise.
bool takes_fwd1(int dim, int depth, int chunk, int dtype) {
  return depth == 1 && chunk <= 64 && (dtype == 2 || (dim == 128 && chunk == 64));
}

template <int D>
cudaError_t fwd1_by_dtype(const NeuralMemoryParams& p, cudaStream_t stream) {
  using chunked_fwd1::launch_f1_by_chunk;
  if (p.dtype == 2) return launch_f1_by_chunk<float, D>(p, stream);
  if constexpr (D == 128) {  // bf16 / fp16 take it at D = 128 only
    return p.dtype == 0 ? launch_f1_by_chunk<__nv_bfloat16, D>(p, stream)
                        : launch_f1_by_chunk<__half, D>(p, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace chunked

bool neural_memory_chunked_supported(int dim, int hidden, int depth, int chunk, int dtype) {
  const bool dim_ok = dim == 32 || dim == 64 || dim == 128;
  const bool chunk_ok = chunk == 16 || chunk == 32 || chunk == 64 || chunk == 128;
  const int hb = chunked::kHB;
  const bool depth_ok = depth == 1 || (depth == 2 && hidden >= hb && hidden <= 512 &&
                                       hidden % hb == 0);
  // fp32 inputs: the depth-1 fp32 kernel only (its chunks go to 64: chunk 128 as sub-chunks,
  // params.h sub)
  const bool dtype_ok = dtype == 0 || dtype == 1 || (dtype == 2 && depth == 1);
  return dim_ok && chunk_ok && depth_ok && dtype_ok;
}

size_t neural_memory_chunked_smem_bytes(int dim, int hidden, int depth, int chunk, int dtype) {
  if (!neural_memory_chunked_supported(dim, hidden, depth, chunk, dtype)) return 0;
  if (chunked::takes_fwd1(dim, depth, chunk, dtype)) {  // one CTA's, or at D = 128 a cluster's
    return chunked_fwd1::smem_bytes_f1(dim, chunk, dim > 64 ? chunked_fwd1::kSplitF1At128 : 1);
  }
  // the plan every instance can run with; the one-CTA instance's larger one (Layout::pre) is
  // taken only by binaries for archs that allow 227 KiB per block (chunked::pre_arch)
  return chunked::make_layout(dim, chunk, depth, false).total;
}

size_t neural_memory_chunked_exchange_floats(int dim, int chunk) {
  return size_t(chunked::kMaxSplit) * 2 * size_t(chunk) * size_t(dim);
}

int neural_memory_arrival_stride() { return GlobalGroup::kArrivalStride; }

cudaError_t neural_memory_chunked(const NeuralMemoryParams& p, cudaStream_t stream, int device) {
  if (!neural_memory_chunked_supported(p.dim, p.hidden, p.depth, p.chunk, p.dtype) ||
      p.n_seq < 1 || p.heads < 1 || p.n_seq > 65535 || p.heads > 65535 || p.seqlen < 0) {
    return cudaErrorInvalidValue;
  }
  for (int l = 0; l < p.depth; ++l) {
    if (p.w_in[l] == nullptr || p.w_out[l] == nullptr || p.s_out[l] == nullptr) {
      return cudaErrorInvalidValue;
    }
    if (p.ckpt_every > 0 && (p.ckpt_w[l] == nullptr || p.ckpt_s[l] == nullptr)) {
      return cudaErrorInvalidValue;
    }
  }
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.o == nullptr || p.lr == nullptr ||
      p.forget == nullptr || p.momentum == nullptr) {
    return cudaErrorInvalidValue;
  }
  DeviceGuard guard(device);
  TITANS_RETURN_IF_ERROR(guard.status());
  const bool fwd1 = chunked::takes_fwd1(p.dim, p.depth, p.chunk, p.dtype) ||
                    (p.dim == 128 && p.dtype != 2 &&
                     (p.dtype == 0 ? chunked_fwd1::f1_preferred<__nv_bfloat16, 128>(p)
                                   : chunked_fwd1::f1_preferred<__half, 128>(p)));
  if (p.dtype == 2 && !fwd1) return cudaErrorInvalidValue;  // chunk 128 without sub-chunks
  if (fwd1) {  // (sub-chunks: p.chunk is the kernel's, a sub-chunk)
    switch (p.dim) {
      case 32: return chunked::fwd1_by_dtype<32>(p, stream);
      case 64: return chunked::fwd1_by_dtype<64>(p, stream);
      default: return chunked::fwd1_by_dtype<128>(p, stream);
    }
  }
  // The bf16 kernel loads the q, k rows by cp.async at D <= 64 (chunked_kernel.cuh,
  // load_rows_async): every row 16-byte aligned. One rule for every bf16 call, D = 128 too
  // (ops._qkv copies other layouts; the GPU tests expect the refusal at D = 128 as well).
  if (p.dtype == 0) {
    auto aligned = [&](const void* x, int64_t n_stride, int64_t t_stride, int64_t h_stride) {
      return reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
             (p.cu_seqlens != nullptr || p.n_seq == 1 || n_stride % 8 == 0) &&
             (p.seqlen <= 1 || t_stride % 8 == 0) && (p.heads == 1 || h_stride % 8 == 0);
    };
    if (!aligned(p.q, p.q_n_stride, p.q_t_stride, p.q_h_stride) ||
        !aligned(p.k, p.k_n_stride, p.k_t_stride, p.k_h_stride)) {
      return cudaErrorInvalidValue;
    }
  }
  return p.dtype == 0 ? chunked::by_dim<__nv_bfloat16>(p, stream)
                      : chunked::by_dim<__half>(p, stream);
}

}  // namespace titans
