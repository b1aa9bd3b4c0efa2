// The fused backward's instances of bf16 inputs at D = 32, every supported chunk
// (chunked_bwd_kernel.cuh).
#include "chunked_bwd_kernel.cuh"

namespace titans {
namespace chunked_bwd {
TITANS_BWD_INSTANCES(, __nv_bfloat16, 32)
}  // namespace chunked_bwd
}  // namespace titans
