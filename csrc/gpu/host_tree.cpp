// The host build of the GPU algorithms: device_tree.h compiled by g++ against Thrust's
// OpenMP system (-fopenmp -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP), so that the code
// the CUDA build runs is exercised by the ordinary test suite on machines without a GPU.
#define ISAMPLE_GPU_NS host_impl
#include "device_tree.h"

namespace isample {

std::unique_ptr<DeviceTreeApi> make_host_gpu_tree(int64_t capacity, bool softmax, double temperature) {
  return std::make_unique<host_impl::DeviceTree>(capacity, softmax, temperature, /*device=*/-1);
}

}  // namespace isample
