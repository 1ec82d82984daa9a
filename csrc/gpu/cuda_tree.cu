// The CUDA build of the GPU algorithms in device_tree.h (compiled by nvcc for the CUDA system).
#define ISAMPLE_GPU_NS cuda_impl
#include "device_tree.h"

namespace isample {

std::unique_ptr<DeviceTreeApi> make_cuda_tree(int64_t capacity, bool softmax, double temperature, int device) {
  cuda_impl::check_cuda(cudaSetDevice(device), "cudaSetDevice");
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
