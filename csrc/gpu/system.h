// The two systems the GPU algorithms are compiled for, behind one set of names:
//
//   nvcc (cuda_tree.cu)        the CUDA system: stream-ordered device memory, the caller's
//                              stream, Thrust's par_nosync policy, CUB's radix sort, CUDA
//                              atomics
//   g++  (host_tree.cpp)       Thrust's OpenMP system on the CPU: host memory, no stream,
//                              thrust::omp::par, Thrust's stable sort, GCC atomics; what the
//                              tests here run
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
#include "../fastmath.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cub/device/device_radix_sort.cuh>
#include <thrust/system/cuda/execution_policy.h>
#else
#include <thrust/sort.h>
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

ISAMPLE_FN void atomic_max(uint64_t* address, uint64_t value) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
#else
  uint64_t seen = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (seen < value && !__atomic_compare_exchange_n(address, &seen, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

ISAMPLE_FN void atomic_store(int32_t* address, int32_t value) {
#if defined(__CUDA_ARCH__)
  atomicExch(reinterpret_cast<int*>(address), value);
#else
  __atomic_store_n(address, value, __ATOMIC_RELAXED);
#endif
}

// Doubles as unsigned integers in the same order (NaN aside), so that an integer atomic max
// finds the largest double. 0 is below every double's key: a zeroed word means "none yet".
ISAMPLE_FN uint64_t order_key(double x) {
  const uint64_t bits = double_bits(x);
  return (bits >> 63) != 0 ? ~bits : bits | 0x8000000000000000ULL;
}
ISAMPLE_FN double from_order_key(uint64_t key) {
  return bits_double((key >> 63) != 0 ? key & 0x7fffffffffffffffULL : ~key);
}

// -- host-side orchestration ------------------------------------------------------------------

#if defined(__CUDACC__)
using Stream = cudaStream_t;

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

// Makes `device` current for one scope and then restores the caller's device: a tree on
// cuda:1 is built and destroyed on cuda:1 while the caller (and torch) keep cuda:0 current.
// Never throws (a destructor uses it); ok() says whether the switch happened.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    switched_ = cudaGetDevice(&previous_) == cudaSuccess && cudaSetDevice(device) == cudaSuccess;
    if (!switched_) cudaGetLastError();
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  bool ok() const { return switched_; }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// All of a tree's memory, its arrays included, is stream-ordered (cudaMallocAsync /
// cudaFreeAsync from the device's default pool): usable on `s` once queued, and freed only
// after the work queued before it on `s` has run, with no host synchronisation. Work on
// other streams is not ordered with it, as it is not with the tree itself: calls on one
// tree from several streams must be ordered by the caller.
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
// Never throws (destructors use it). A failure (a context already torn down at exit) leaks
// the block rather than free memory the device may still use.
inline void release_async(void* p, Stream s) noexcept {
  if (p != nullptr && cudaFreeAsync(p, s) != cudaSuccess) cudaGetLastError();
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
inline void synchronise(Stream s) { check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize"); }
inline void check_launch() { check_cuda(cudaGetLastError(), "kernel launch"); }

inline auto policy(Stream s) { return thrust::cuda::par_nosync.on(s); }

// Threads that fill `device`: its multiprocessors times the threads each can hold. The
// strided kernels (one pass over all n items) launch this many workers.
inline int64_t device_threads(int device) {
  int processors = 0, threads = 0;
  check_cuda(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device), "cudaDeviceGetAttribute");
  return int64_t(processors) * int64_t(threads);
}

// Stable sort of n (key, value) pairs by key with CUB's radix sort on key bits [0, end_bit),
// given alternate buffers for both (its DoubleBuffer mode: no O(n) temporary of its own).
// sort_temp_bytes asks CUB for the exact temporary size (its null-buffer call: no launch).
template <class K, class V>
size_t sort_temp_bytes(int64_t n, int end_bit) {
  size_t bytes = 0;
  cub::DoubleBuffer<K> keys(nullptr, nullptr);
  cub::DoubleBuffer<V> values(nullptr, nullptr);
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values, n, 0, end_bit), "cub::DeviceRadixSort");
  return bytes > 0 ? bytes : 1;  // a null temporary would make the sort a size query
}
template <class K, class V>
std::pair<K*, V*> sort_pairs(K* keys, K* keys_alt, V* values, V* values_alt, int64_t n, int end_bit, void* temp,
                             size_t temp_bytes, Stream s) {
  cub::DoubleBuffer<K> k(keys, keys_alt);
  cub::DoubleBuffer<V> v(values, values_alt);
  check_cuda(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, k, v, n, 0, end_bit, s), "cub::DeviceRadixSort");
  return {k.Current(), v.Current()};
}

#else  // host build: the same algorithms on the CPU through Thrust's OpenMP system

using Stream = uintptr_t;  // unused

class DeviceGuard {
 public:
  explicit DeviceGuard(int) {}
  bool ok() const { return true; }
};

inline void* allocate_async(size_t bytes, Stream) {
  if (bytes == 0) return nullptr;
  void* p = std::malloc(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
inline void release_async(void* p, Stream) noexcept { std::free(p); }
inline void zero_async(void* p, size_t bytes, Stream) { std::memset(p, 0, bytes); }
inline void copy_async(void* dst, const void* src, size_t bytes, Stream) { std::memcpy(dst, src, bytes); }
inline void copy_to_host(void* dst, const void* src, size_t bytes, Stream) { std::memcpy(dst, src, bytes); }
inline void synchronise(Stream) {}
inline void check_launch() {}

inline auto policy(Stream) { return thrust::omp::par; }

inline int64_t device_threads(int) { return 4096; }

// Thrust's stable sort, in place; its temporary memory is Thrust's own (host memory, not
// counted). The alternate buffers are unused here but allocated alike, so that the scratch
// accounting the tests check is the CUDA build's.
template <class K, class V>
size_t sort_temp_bytes(int64_t, int) {
  return 0;
}
template <class K, class V>
std::pair<K*, V*> sort_pairs(K* keys, K*, V* values, V*, int64_t n, int, void*, size_t, Stream s) {
  thrust::stable_sort_by_key(policy(s), keys, keys + n, values);
  return {keys, values};
}

#endif

// An owned buffer of T in the system's memory, allocated and freed stream-ordered. The
// owner frees it with release() on the stream of its last use; the destructor's fallback
// frees it on the stream it was allocated on.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { release(stream_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Makes room for at least `count` items (discarding the contents), stream-ordered on
  // `s`: exactly `count`, or with `spare` half as much again (buffers sized by batches of
  // varying size, so that a slowly growing batch does not reallocate every call). Nothing
  // when it is already large enough. On failure (std::bad_alloc) it keeps its old memory.
  void reserve(size_t count, Stream s, bool spare = false) {
    if (count <= count_) return;
    const size_t wanted = spare ? count + count / 2 : count;
    if (wanted > SIZE_MAX / sizeof(T)) throw std::bad_alloc();
    T* fresh = static_cast<T*>(allocate_async(wanted * sizeof(T), s));
    release_async(data_, s);
    data_ = fresh;
    count_ = wanted;
    stream_ = s;
  }
  // Frees the memory after the work queued on `s` before this call. Never throws.
  void release(Stream s) noexcept {
    release_async(data_, s);
    data_ = nullptr;
    count_ = 0;
  }
  T* data() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
  Stream stream_{};
};

}  // namespace ISAMPLE_GPU_NS
}  // namespace isample
