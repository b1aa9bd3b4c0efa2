// The CTAs that share one (sequence, head), two ways:
//  - ClusterGroup: a thread-block cluster on sm_90+ (DSMEM reads of each other's shared
//    memory, cluster-wide barriers), a single CTA below sm_90 (the launchers only ask for a
//    cluster where the device has them, so there the group is always of size 1);
//  - GlobalGroup: ordinary CTAs of a cooperative launch (every CTA resident at once, on any
//    architecture), exchanging through global memory and meeting at a barrier on a per-group
//    arrival counter. It serves splits whose clusters would not all be resident at once.
// Both give the sums of cluster_sum (chunked_bwd.cu) one interface: publish(buffer) is where
// this CTA writes its part, sync() the barrier after the writes, remote(p, r) rank r's copy of
// p, load() one read of it, done() the end of the reads.
#pragma once

#include <cstdint>

#include <cooperative_groups.h>

namespace titans {

struct ClusterGroup {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  // every thread of every CTA of the cluster arrives; orders shared and global memory
  __device__ __forceinline__ void sync() { cluster.sync(); }
  // `local` (this CTA's shared address) as seen in the shared memory of CTA `rank`
  template <typename T>
  __device__ __forceinline__ const T* remote(const T* local, int rank) {
    return cluster.map_shared_rank(local, rank);
  }
#else
  __device__ __forceinline__ void sync() { __syncthreads(); }
  template <typename T>
  __device__ __forceinline__ const T* remote(const T* local, int) { return local; }
#endif
  // the parts are published in the caller's shared-memory buffer
  __device__ __forceinline__ float* publish(float* smem_buf) { return smem_buf; }
  __device__ __forceinline__ float load(const float* p) { return *p; }
  __device__ __forceinline__ float2 load2(const float* p) {
    return *reinterpret_cast<const float2*>(p);
  }
  // the buffer is reused right after the sum: every CTA must have read it
  __device__ __forceinline__ void done() { sync(); }
};

// Each CTA owns two exchange buffers of `floats` floats in global memory, used by alternate
// sums: a CTA can write buffer b for sum i + 2 only after sum i + 1's barrier, which every
// other CTA reaches after its reads of sum i, so one barrier per sum suffices. The barrier is
// CUTLASS's generic barrier restricted to the group: every thread's writes, a CTA barrier, one
// thread's release arrival, its acquire spin until all `split` CTAs have arrived as often, a
// CTA barrier. Reads go to L2 (ld.global.cg): another SM wrote them. Each group's counter has
// a 128-byte line of its own (kArrivalStride), so the groups' spins do not share one.
struct GlobalGroup {
  static constexpr int kArrivalStride = 32;  // unsigned per group: one 128-byte line
  float* mine;        // this CTA's two buffers ([2][floats])
  unsigned* arrivals; // the group's counter, zero at launch
  int64_t floats;     // per buffer
  int rank, split;
  unsigned target = 0;  // arrivals that complete the next barrier (thread 0's copy is used)
  int parity = 0;

  // CTA `rank` of the `split` CTAs of group `pair`: its two buffers at slot pair * slots + rank
  // of `exchange` (`slots` >= split pairs of buffers per group), the group's counter in
  // `arrivals`.
  __device__ static GlobalGroup make(float* exchange, unsigned* arrivals, int64_t pair,
                                     int slots, int rank, int split, int64_t floats) {
    GlobalGroup g{};
    g.mine = exchange + (pair * slots + rank) * 2 * floats;
    g.arrivals = arrivals + pair * kArrivalStride;
    g.floats = floats;
    g.rank = rank;
    g.split = split;
    return g;
  }

  __device__ __forceinline__ float* publish(float*) { return mine + parity * floats; }
  __device__ __forceinline__ void sync() {
    __syncthreads();
    if (threadIdx.x == 0) {
      target += unsigned(split);
      // release: the CTA's writes (ordered before this by the CTA barrier) before the arrival
      asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(arrivals), "r"(1u)
                   : "memory");
      unsigned seen = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrivals)
                     : "memory");
      } while (seen < target);
    }
    __syncthreads();
  }
  // rank r's buffers follow this CTA's at (r - rank) * 2 * floats
  template <typename T>
  __device__ __forceinline__ const T* remote(const T* local, int r) {
    return local + int64_t(r - rank) * 2 * floats;
  }
  __device__ __forceinline__ float load(const float* p) { return __ldcg(p); }
  __device__ __forceinline__ float2 load2(const float* p) {
    return __ldcg(reinterpret_cast<const float2*>(p));
  }
  __device__ __forceinline__ void done() { parity ^= 1; }
};

}  // namespace titans
