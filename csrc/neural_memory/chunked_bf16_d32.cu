// The neural_memory_chunked instances of bf16 inputs at D = 32 (chunked_kernel.cuh).
#include "chunked_kernel.cuh"

namespace titans {
namespace chunked {
template cudaError_t by_chunk<__nv_bfloat16, 32>(const NeuralMemoryParams&, cudaStream_t);
}  // namespace chunked
}  // namespace titans
