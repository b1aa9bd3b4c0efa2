// The CTAs that share one (sequence, head): a thread-block cluster on sm_90+ (DSMEM reads of
// each other's shared memory, cluster-wide barriers), a single CTA below sm_90 (the launchers
// only ask for a cluster where the device has them, so there the group is always of size 1).
#pragma once

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
};

}  // namespace titans
