// The CUDA build of the GPU algorithms in device_tree.h (compiled by nvcc for the CUDA system).
#define ISAMPLE_GPU_NS cuda_impl
#include "device_tree.h"

namespace isample {

namespace {

// Makes `device` current for one scope and then restores the caller's device, so building a
// tree on cuda:1 does not leave cuda:1 current for the caller (and for torch) afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cuda_impl::check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    cuda_impl::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

std::unique_ptr<DeviceTreeApi> make_cuda_tree(int64_t capacity, bool softmax, double temperature, int device) {
  DeviceScope scope(device);
  return std::make_unique<cuda_impl::DeviceTree>(capacity, softmax, temperature);
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for us
    return 0;
  }
  return count;
}

}  // namespace isample
