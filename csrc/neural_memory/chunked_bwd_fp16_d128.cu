// The fused backward's instances of fp16 inputs at D = 128, every supported chunk (16 and 32)
// (chunked_bwd_kernel.cuh).
#include "chunked_bwd_kernel.cuh"

namespace titans {
namespace chunked_bwd {
TITANS_BWD_INSTANCES(, __half, 128)
}  // namespace chunked_bwd
}  // namespace titans
