// The depth-1 fp32 forward's instances (chunked_fwd1_kernel.cuh): fp32 inputs at D 32 / 64 /
// 128, bf16 / fp16 at D 128 (chunked.cu, takes_fwd1), every chunk up to 64.
#include "chunked_fwd1_kernel.cuh"

namespace titans {
namespace chunked_fwd1 {
TITANS_FWD1_INSTANCES(, float, 32)
TITANS_FWD1_INSTANCES(, float, 64)
TITANS_FWD1_INSTANCES(, float, 128)
TITANS_FWD1_INSTANCES(, __nv_bfloat16, 128)
TITANS_FWD1_INSTANCES(, __half, 128)
}  // namespace chunked_fwd1
}  // namespace titans
