// Per-thread register fragments of kVec consecutive floats, loaded and stored as one 16-byte
// access when kVec == 4, with an explicit cache policy. Shared by the elementwise kernels.
#pragma once

#include <cstdint>
#include <initializer_list>

#include <cuda_runtime.h>

namespace titans {

template <int kVec>
struct Frag {
  float v[kVec];
};

// kStream: read or written once (__ldcs / __stcs, evict-first);
// kReadOnly: loads through the read-only path (__ldg); kDefault: plain loads and stores
// (data the same kernel writes and reads back).
enum class Cache { kStream, kReadOnly, kDefault };

template <Cache kCache, typename T>
__device__ __forceinline__ T load_one(const T* ptr) {
  if constexpr (kCache == Cache::kStream) {
    return __ldcs(ptr);
  } else if constexpr (kCache == Cache::kReadOnly) {
    return __ldg(ptr);  // only for data no thread writes during the kernel
  } else {
    return *ptr;
  }
}

template <int kVec, Cache kCache>
__device__ __forceinline__ Frag<kVec> load(const float* ptr) {
  static_assert(kVec == 1 || kVec == 4, "fragments are 1 or 4 floats");
  Frag<kVec> f;
  if constexpr (kVec == 4) {
    const float4 x = load_one<kCache>(reinterpret_cast<const float4*>(ptr));
    f.v[0] = x.x;
    f.v[1] = x.y;
    f.v[2] = x.z;
    f.v[3] = x.w;
  } else {
    f.v[0] = load_one<kCache>(ptr);
  }
  return f;
}

template <Cache kCache, typename T>
__device__ __forceinline__ void store_one(T* ptr, const T& x) {
  if constexpr (kCache == Cache::kStream) {
    __stcs(ptr, x);
  } else {
    *ptr = x;
  }
}

template <int kVec, Cache kCache>
__device__ __forceinline__ void store(float* ptr, const Frag<kVec>& f) {
  static_assert(kVec == 1 || kVec == 4, "fragments are 1 or 4 floats");
  if constexpr (kVec == 4) {
    store_one<kCache>(reinterpret_cast<float4*>(ptr),
                      make_float4(f.v[0], f.v[1], f.v[2], f.v[3]));
  } else {
    store_one<kCache>(ptr, f.v[0]);
  }
}

template <int kVec>
__device__ __forceinline__ Frag<kVec> zeros() {
  Frag<kVec> f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) f.v[i] = 0.f;
  return f;
}

// Host side: a float4 path needs 16-byte aligned row starts.
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

inline bool all_aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

inline bool all_multiple_of4(std::initializer_list<int64_t> strides) {
  for (int64_t s : strides) {
    if (s % 4 != 0) return false;
  }
  return true;
}

}  // namespace titans
