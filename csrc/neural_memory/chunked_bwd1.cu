// The depth-1 fused backward's instances (chunked_bwd1_kernel.cuh): bf16 / fp16 / fp32 inputs,
// D 32 / 64 with every supported chunk, D 128 with chunks 16 and 32 (clusters of 4). Its products run on CUDA cores in fp32, so one translation unit
// compiles them all in seconds.
#include "chunked_bwd1_kernel.cuh"

namespace titans {
namespace chunked_bwd1 {
TITANS_BWD1_INSTANCES(, __nv_bfloat16, 32)
TITANS_BWD1_INSTANCES(, __nv_bfloat16, 64)
TITANS_BWD1_INSTANCES(, __half, 32)
TITANS_BWD1_INSTANCES(, __half, 64)
TITANS_BWD1_INSTANCES(, __nv_bfloat16, 128)
TITANS_BWD1_INSTANCES(, __half, 128)
TITANS_BWD1_INSTANCES(, float, 32)
TITANS_BWD1_INSTANCES(, float, 64)
TITANS_BWD1_INSTANCES(, float, 128)
}  // namespace chunked_bwd1
}  // namespace titans
