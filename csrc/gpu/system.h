// The two systems the GPU algorithms are compiled for, behind one set of names:
//
//   nvcc (cuda_tree.cu)        the CUDA system: device memory, the caller's stream, Thrust's
//                              par_nosync policy, CUDA atomics
//   g++  (host_tree.cpp)       Thrust's OpenMP system on the CPU: host memory, no stream,
//                              thrust::omp::par, GCC atomics; what the tests here run
//
// Everything in this header is either __host__ __device__ (ISAMPLE_HD) or host-only
// orchestration; the algorithms in device_tree.h use only these names. The including file
// defines ISAMPLE_GPU_NS: the two builds live in different namespaces, so the linker never
// confuses one build's definition for the other's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include <thrust/execution_policy.h>

#include "../common.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>
#else
#include <thrust/system/omp/execution_policy.h>
#endif

namespace isample {
namespace ISAMPLE_GPU_NS {

// -- atomics (device side) ---------------------------------------------------------------------

ISAMPLE_FN int32_t atomic_cas(int32_t* address, int32_t expected, int32_t desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(reinterpret_cast<int*>(address), expected, desired);
#else
  __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
#endif
}

ISAMPLE_FN void atomic_add(int64_t* address, int64_t value) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
#else
  __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
#endif
}

ISAMPLE_FN void atomic_store(int32_t* address, int32_t value) {
#if defined(__CUDA_ARCH__)
  atomicExch(reinterpret_cast<int*>(address), value);
#else
  __atomic_store_n(address, value, __ATOMIC_RELAXED);
#endif
}

// -- host-side orchestration ------------------------------------------------------------------

#if defined(__CUDACC__)
using Stream = cudaStream_t;

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

// Device memory for a tree's arrays, at construction and destruction only: cudaMalloc and
// cudaFree may synchronise the device, so neither is reachable from update or sample.
inline void* allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t status = cudaMalloc(&p, bytes);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw std::bad_alloc();
  }
  check_cuda(status, "cudaMalloc");
  return p;
}
inline void release(void* p) {
  if (p != nullptr) cudaFree(p);
}
// Stream-ordered memory (the device's default pool), for scratch that grows inside a call:
// usable on `s` once queued, freed after the work queued before it on `s`. No host sync.
// Work on other streams is not ordered with it, as it is not with the tree itself: calls
// on one tree from several streams must be ordered by the caller.
inline void* allocate_async(size_t bytes, Stream s) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t status = cudaMallocAsync(&p, bytes, s);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw std::bad_alloc();
  }
  check_cuda(status, "cudaMallocAsync");
  return p;
}
inline void release_async(void* p, Stream s) {
  if (p != nullptr) check_cuda(cudaFreeAsync(p, s), "cudaFreeAsync");
}
inline void zero_async(void* p, size_t bytes, Stream s) { check_cuda(cudaMemsetAsync(p, 0, bytes, s), "cudaMemsetAsync"); }
inline void copy_async(void* dst, const void* src, size_t bytes, Stream s) {
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
}
// Blocking copy to the host: only for state export and explicit checks, never update/sample.
inline void copy_to_host(void* dst, const void* src, size_t bytes, Stream s) {
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}
inline void check_launch() { check_cuda(cudaGetLastError(), "kernel launch"); }

// Thrust's temporary storage (sorting) comes from a buffer the tree owns, so Thrust never
// calls cudaMalloc / cudaFree on the hot path.
struct ScratchAllocator {
  using value_type = char;
  char* base = nullptr;
  size_t capacity = 0;
  size_t used = 0;
  char* allocate(std::ptrdiff_t bytes) {
    size_t aligned = (size_t(bytes) + 255) / 256 * 256;
    if (used + aligned > capacity) throw std::bad_alloc();
    char* p = base + used;
    used += aligned;
    return p;
  }
  void deallocate(char*, size_t) {}
};
inline auto policy(Stream s) { return thrust::cuda::par_nosync.on(s); }
inline auto policy(Stream s, ScratchAllocator& a) { return thrust::cuda::par_nosync(a).on(s); }

#else  // host build: the same algorithms on the CPU through Thrust's OpenMP system

using Stream = uintptr_t;  // unused

inline void* allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = std::malloc(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
inline void release(void* p) { std::free(p); }
inline void* allocate_async(size_t bytes, Stream) { return allocate(bytes); }
inline void release_async(void* p, Stream) { release(p); }
inline void zero_async(void* p, size_t bytes, Stream) { std::memset(p, 0, bytes); }
inline void copy_async(void* dst, const void* src, size_t bytes, Stream) { std::memcpy(dst, src, bytes); }
inline void copy_to_host(void* dst, const void* src, size_t bytes, Stream) { std::memcpy(dst, src, bytes); }
inline void check_launch() {}

struct ScratchAllocator {
  using value_type = char;
  char* base = nullptr;
  size_t capacity = 0;
  size_t used = 0;
  char* allocate(std::ptrdiff_t bytes) {
    size_t aligned = (size_t(bytes) + 255) / 256 * 256;
    if (used + aligned > capacity) throw std::bad_alloc();
    char* p = base + used;
    used += aligned;
    return p;
  }
  void deallocate(char*, size_t) {}
};
inline auto policy(Stream) { return thrust::omp::par; }
inline auto policy(Stream, ScratchAllocator& a) { return thrust::omp::par(a); }

#endif

// An owned buffer of T in the system's memory. Construction and destruction allocate and
// free synchronously (cudaMalloc / cudaFree); reserve() grows stream-ordered on the call's
// stream, so it is safe on the update / sample path.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t count) : data_(static_cast<T*>(allocate(count * sizeof(T)))), count_(count) {}
  ~Buffer() { release(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : data_(o.data_), count_(o.count_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(count_, o.count_);
    return *this;
  }
  // Grows (discarding the contents) to at least `count`, by half as much again, with
  // stream-ordered allocation on `s`; nothing when it is already large enough. On failure
  // (std::bad_alloc) the buffer keeps its old memory.
  void reserve(size_t count, Stream s) {
    if (count <= count_) return;
    const size_t grown = count + count / 2;
    T* fresh = static_cast<T*>(allocate_async(grown * sizeof(T), s));
    release_async(data_, s);
    data_ = fresh;
    count_ = grown;
  }
  T* data() const { return data_; }
  size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
};

}  // namespace ISAMPLE_GPU_NS
}  // namespace isample
