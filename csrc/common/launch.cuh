// Host-side launch helpers of the split kernels (the chunked forward, the fused backward, the
// decode step): a (sequence, head) over `split` CTAs, either a thread-block cluster (sm_90+) or
// ordinary CTAs of a cooperative launch exchanging through global memory (GlobalGroup,
// cluster.cuh). The occupancy queries behind the launchers' choice are cached per process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include <cuda_runtime.h>

namespace titans {

// The launch attribute of a cluster of `split` CTAs along x.
inline cudaLaunchAttribute cluster_attribute(int split) {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = unsigned(split);
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

namespace detail {

// One answer per (device, kernel, kind, split, threads, shared memory) (kind 0 / 1: the
// occupancy queries below, 2: allow_smem, 3: binary_arch), computed by `query` on first use; 0
// when the query fails. Every instance of a kernel template has the same function type, so the
// kernel's address is part of the key.
template <typename Query>
int64_t cached_occupancy(const void* kernel, int kind, int split, int threads, size_t smem,
                         Query&& query) {
  struct Entry {
    int device, kind, split, threads;
    const void* kernel;
    size_t smem;
    int64_t count;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache)
      if (e.device == device && e.kind == kind && e.split == split && e.threads == threads &&
          e.kernel == kernel && e.smem == smem)
        return e.count;
  }
  int64_t count = query(device);
  if (count < 0) {
    (void)cudaGetLastError();
    count = 0;
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_back(Entry{device, kind, split, threads, kernel, smem, count});
  return count;
}

}  // namespace detail

// Clusters of `split` CTAs of `kernel` that can be resident at once on the current device
// (0 when such a cluster cannot launch).
template <typename Kernel>
int64_t max_clusters(Kernel kernel, int split, size_t smem, int threads) {
  return detail::cached_occupancy(
      reinterpret_cast<const void*>(kernel), 0, split, threads, smem, [&](int) -> int64_t {
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3(unsigned(split), 1, 1);
        config.blockDim = dim3(unsigned(threads));
        config.dynamicSmemBytes = smem;
        cudaLaunchAttribute attr[1] = {cluster_attribute(split)};
        config.attrs = attr;
        config.numAttrs = 1;
        int count = 0;
        return cudaOccupancyMaxActiveClusters(&count, kernel, &config) == cudaSuccess ? count
                                                                                       : -1;
      });
}

// CTAs of `kernel` resident at once on the current device (a cooperative launch's limit).
template <typename Kernel>
int64_t resident_ctas(Kernel kernel, int threads, size_t smem) {
  return detail::cached_occupancy(
      reinterpret_cast<const void*>(kernel), 1, 1, threads, smem, [&](int device) -> int64_t {
        int per_sm = 0, sms = 0;
        if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) !=
                cudaSuccess) {
          return -1;
        }
        return int64_t(per_sm) * sms;
      });
}

// Lets `kernel` use `smem` bytes of dynamic shared memory on the current device: the attribute
// is set once per (device, kernel, size) and remembered (a failure too: cudaErrorInvalidValue,
// which is what the driver answers for a size above the device's opt-in limit).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  const int64_t ok = detail::cached_occupancy(
      reinterpret_cast<const void*>(kernel), 2, 0, 0, smem, [&](int) -> int64_t {
        return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem)) == cudaSuccess
                   ? 1
                   : -1;
      });
  return ok == 1 ? cudaSuccess : cudaErrorInvalidValue;
}

// The arch (major * 10 + minor) of the binary of `kernel` that the current device runs (its
// cubin's, or the device's own for PTX compiled at load time): the __CUDA_ARCH__ / 10 that its
// code was compiled with.
template <typename Kernel>
cudaError_t binary_arch(Kernel kernel, int* arch) {
  *arch = int(detail::cached_occupancy(
      reinterpret_cast<const void*>(kernel), 3, 0, 0, 0, [&](int) -> int64_t {
        cudaFuncAttributes a{};
        return cudaFuncGetAttributes(&a, kernel) == cudaSuccess ? a.binaryVersion : -1;
      }));
  return *arch > 0 ? cudaSuccess : cudaErrorInvalidDeviceFunction;
}

// A split kernel's three instances: one CTA per (sequence, head), a cluster, ordinary CTAs.
template <typename Kernel>
struct SplitKernels {
  Kernel one, cluster, global;
  int threads;
  size_t smem;             // dynamic shared memory of the one-CTA instance
  size_t smem_split = 0;   // and of the split instances (0: the same)
  size_t split_smem() const { return smem_split != 0 ? smem_split : smem; }
  cudaError_t prepare() const {
    const Kernel all[3] = {one, cluster, global};
    for (int i = 0; i < 3; ++i) {
      const cudaError_t err = allow_smem(all[i], i == 0 ? smem : split_smem());
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
};

// The launchers' choice for `pairs` (sequence, head) pairs of `n_blocks` hidden blocks each:
// the fewest blocks per CTA (then the fewest CTAs) such that every CTA of the grid is resident
// at once (the chunk loops are latency bound: a group that waits for a free slot doubles the
// time). Splits need not divide the blocks (the last CTAs take one block fewer). A cluster
// (`clusters`: the device has them) where its clusters all fit; then, with `allow_global`,
// ordinary CTAs of a cooperative launch where they give fewer blocks per CTA (their barriers
// and exchanges are slower than the cluster's). Returns s > 0 (a cluster of s, 1: one CTA) or
// -s (s ordinary CTAs); `cluster_choice`, when given, receives the choice without the global
// splits (the fallback when a cooperative launch is refused).
template <typename Kernel>
int choose_split(const SplitKernels<Kernel>& ks, int n_blocks, int64_t pairs, int max_split,
                 bool clusters, bool allow_global, int* cluster_choice = nullptr) {
  auto per_cta = [&](int s) { return (n_blocks + s - 1) / s; };
  int split = 1;
  if (clusters) {
    for (int s = 2; s <= max_split && s <= n_blocks; ++s) {
      if (per_cta(s) == per_cta(split)) continue;
      if (pairs > max_clusters(ks.cluster, s, ks.split_smem(), ks.threads)) continue;
      split = s;
    }
  }
  if (cluster_choice != nullptr) *cluster_choice = split;
  if (!allow_global) return split;
  const int64_t resident = resident_ctas(ks.global, ks.threads, ks.split_smem());
  int global = 0;
  for (int s = 2; s <= max_split && s <= n_blocks; ++s) {
    if (per_cta(s) >= per_cta(global > 0 ? global : split) || pairs * s > resident) continue;
    global = s;
  }
  return global > 0 ? -global : split;
}

// Launches `params` (whose split field the caller has set to |split|) on a grid of
// (heads x |split|, n_seq): ks.global cooperatively for split < 0, ks.cluster in clusters of
// split > 1, ks.one for split 1.
template <typename Kernel, typename Params>
cudaError_t launch_split(const SplitKernels<Kernel>& ks, const Params& params, int heads,
                         int n_seq, int split, cudaStream_t stream) {
  const bool global = split < 0;
  const int s = global ? -split : split;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(heads) * unsigned(s), unsigned(n_seq));
  config.blockDim = dim3(unsigned(ks.threads));
  config.dynamicSmemBytes = global || s > 1 ? ks.split_smem() : ks.smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  if (global) {  // every CTA resident at once (or the launch fails): the barriers spin
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    config.attrs = attr;
    config.numAttrs = 1;
  } else if (s > 1) {
    attr[0] = cluster_attribute(s);
    config.attrs = attr;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, global ? ks.global : s > 1 ? ks.cluster : ks.one, params);
}

}  // namespace titans
