// The CUDA build of the GPU algorithms in device_tree.h (compiled by nvcc for the CUDA system),
// and what the Python layer needs to know of the CUDA runtime and devices.
#define ISAMPLE_GPU_NS cuda_impl
#include "device_tree.h"

namespace isample {

namespace {

// An empty kernel compiled like every other kernel of this file (same fatbinary, same
// architectures): if the runtime finds no image of it for a device, it finds none of the
// tree's kernels either.
__global__ void kernel_image_probe() {}

// "sm_75, sm_80, sm_90 and PTX for compute_90", from the lists CMake passes.
std::string archs_text() {
  auto listed = [](std::string list, const std::string& prefix) {
    std::string text;
    size_t start = 0;
    while (start < list.size()) {
      size_t end = list.find(',', start);
      if (end == std::string::npos) end = list.size();
      text += (text.empty() ? "" : ", ") + prefix + list.substr(start, end - start);
      start = end + 1;
    }
    return text;
  };
  const std::string sass = listed(ISAMPLE_CUDA_SASS, "sm_"), ptx = listed(ISAMPLE_CUDA_PTX, "compute_");
  return ptx.empty() ? sass : sass + " and PTX for " + ptx;
}

std::string capability_text(int device) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return std::to_string(major) + "." + std::to_string(minor);
}

// Throws a clear std::invalid_argument when this build has no kernel image (and no PTX the
// driver can compile) for the current device, instead of the first launch failing.
void check_kernel_image(int device) {
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel_image_probe);
  if (status == cudaSuccess) return;
  cudaGetLastError();
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction ||
      status == cudaErrorUnsupportedPtxVersion || status == cudaErrorInvalidPtx) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " (compute capability " +
                                capability_text(device) + ") cannot run this build of isample: it has kernels for " +
                                archs_text() + " (" + cudaGetErrorString(status) +
                                "); rebuild with ISAMPLE_CUDA_ARCHS naming this device's architecture");
  }
  cuda_impl::check_cuda(status, "cudaFuncGetAttributes");
}

}  // namespace

std::unique_ptr<DeviceTreeApi> make_cuda_tree(int64_t capacity, bool softmax, double temperature, int device) {
  cuda_impl::DeviceGuard guard(device);
  if (!guard.ok()) cuda_impl::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_kernel_image(device);
  return std::make_unique<cuda_impl::DeviceTree>(capacity, softmax, temperature, device);
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // cuda_status() reports why
    return 0;
  }
  return count;
}

CudaStatus cuda_status() {
  CudaStatus result;
  cudaRuntimeGetVersion(&result.runtime_version);
  if (cudaDriverGetVersion(&result.driver_version) != cudaSuccess) result.driver_version = 0;
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();
    result.error = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
    return result;
  }
  for (int device = 0; device < count; ++device) {
    cudaDeviceProp properties{};
    if (cudaGetDeviceProperties(&properties, device) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    CudaDevice d;
    d.name = properties.name;
    d.major = properties.major;
    d.minor = properties.minor;
    d.multiprocessors = properties.multiProcessorCount;
    d.total_memory = properties.totalGlobalMem;
    result.devices.push_back(d);
  }
  return result;
}

CudaPoolStats cuda_memory_pool(int device, bool reset_peaks) {
  cudaMemPool_t pool = nullptr;
  cuda_impl::check_cuda(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
  auto read = [pool](cudaMemPoolAttr attribute) {
    uint64_t value = 0;  // cuuint64_t
    cuda_impl::check_cuda(cudaMemPoolGetAttribute(pool, attribute, &value), "cudaMemPoolGetAttribute");
    return value;
  };
  CudaPoolStats stats;
  stats.reserved = read(cudaMemPoolAttrReservedMemCurrent);
  stats.reserved_peak = read(cudaMemPoolAttrReservedMemHigh);
  stats.used = read(cudaMemPoolAttrUsedMemCurrent);
  stats.used_peak = read(cudaMemPoolAttrUsedMemHigh);
  if (reset_peaks) {
    uint64_t zero = 0;  // the only value these two accept: "the current value"
    cuda_impl::check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero), "cudaMemPoolSetAttribute");
    cuda_impl::check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero), "cudaMemPoolSetAttribute");
  }
  return stats;
}

}  // namespace isample
