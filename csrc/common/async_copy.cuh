// cp.async (sm_80+): 16-byte copies from global into shared memory that do not pass through
// the registers, so a thread can have many in flight and keep computing meanwhile. Copies
// are grouped (commit) and waited for by group, oldest first; a thread waits only for its own
// copies, so a barrier must follow the wait before other threads read what they landed.
#pragma once

#include <cstdint>

namespace titans {

// 16 bytes from `src` (16-byte aligned, global) to `dst` (16-byte aligned, shared); with
// `fill` false nothing is read and the 16 bytes are zeros (`src` must still be a valid
// address). .cg: cached in L2 only, as the state's other reads (it may have been written by
// this kernel).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(fill ? 16 : 0)
               : "memory");
}

// Closes the group of this thread's copies issued since the last commit (possibly empty).
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace titans
