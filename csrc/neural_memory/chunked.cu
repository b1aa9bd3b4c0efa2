// neural_memory_chunked (chunked.h): support rule, shared-memory size and dispatch; the kernel
// is in chunked_kernel.cuh, its instances in chunked_<dtype>_d<D>.cu.
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

}  // namespace
}  // namespace chunked

bool neural_memory_chunked_supported(int dim, int hidden, int depth, int chunk, int dtype) {
  const bool dim_ok = dim == 32 || dim == 64 || dim == 128;
  const bool chunk_ok = chunk == 16 || chunk == 32 || chunk == 64 || chunk == 128;
  const int hb = chunked::kHB;
  const bool depth_ok = depth == 1 || (depth == 2 && hidden >= hb && hidden <= 512 &&
                                       hidden % hb == 0);
  return dim_ok && chunk_ok && depth_ok && (dtype == 0 || dtype == 1);
}

size_t neural_memory_chunked_smem_bytes(int dim, int hidden, int depth, int chunk, int dtype) {
  if (!neural_memory_chunked_supported(dim, hidden, depth, chunk, dtype)) return 0;
  return chunked::make_layout(dim, chunk, depth).total;
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
  return p.dtype == 0 ? chunked::by_dim<__nv_bfloat16>(p, stream)
                      : chunked::by_dim<__half>(p, stream);
}

}  // namespace titans
