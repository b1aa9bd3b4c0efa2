// Error handling shared by every launcher: launchers never exit or throw; they return a
// cudaError_t that the bindings turn into a Python exception naming the op.
#pragma once

#include <cuda_runtime.h>

#define TITANS_RETURN_IF_ERROR(expr)              \
  do {                                            \
    cudaError_t titans_err_ = (expr);             \
    if (titans_err_ != cudaSuccess) {             \
      return titans_err_;                         \
    }                                             \
  } while (0)

namespace titans {

// Runs launches on `device` and restores the caller's current device afterwards, so that a
// call on cuda:1 from a thread whose current device is cuda:0 neither launches on the wrong
// GPU nor changes the caller's state.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

__host__ __device__ inline constexpr long long ceil_div(long long a, long long b) {
  return (a + b - 1) / b;
}

}  // namespace titans
