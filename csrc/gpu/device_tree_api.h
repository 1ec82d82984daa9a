// The interface through which bindings.cpp (compiled by the host compiler, without CUDA or
// Thrust) reaches the two builds of the GPU tree: the CUDA one (cuda_tree.cu) and the host
// one (host_tree.cpp, Thrust's OpenMP system). Array arguments are addresses in the tree's
// memory (device memory for CUDA); `stream` is a cudaStream_t as an integer (ignored by the
// host build).
//
// Errors in the data (a bad index, weight, score or uniform, sampling an all-zero tree, too
// few positive items) are found on the device without a host synchronisation: the call is
// skipped as a whole, so the tree is unchanged, and the first such error is kept until
// check() throws it (std::out_of_range or std::invalid_argument) and clears it.
// Errors in host-side arguments (a negative count, keep outside [0, 1]) throw at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace isample {

class DeviceTreeApi {
 public:
  virtual ~DeviceTreeApi() = default;
  virtual int64_t capacity() const = 0;
  virtual bool softmax() const = 0;
  virtual int levels() const = 0;
  virtual size_t nbytes() const = 0;

  // SumTree: w[idx] = values; SoftmaxTree: s[idx] = keep * s_before + (1 - keep) * values.
  virtual void update(const int64_t* indices, const double* values, int64_t k, double keep, uintptr_t stream) = 0;
  // All n weights (SumTree) or scores (SoftmaxTree), from the tree's memory.
  virtual void assign(const double* values, uintptr_t stream) = 0;
  // SoftmaxTree: scores and reference exactly as saved.
  virtual void load(const double* scores, double reference, uintptr_t stream) = 0;
  virtual void set_temperature(double temperature, uintptr_t stream) = 0;
  // Weights (SumTree) or scores (SoftmaxTree).
  virtual void get(const int64_t* indices, int64_t k, double* out, uintptr_t stream) = 0;
  virtual void probability(const int64_t* indices, int64_t k, double* out, uintptr_t stream) = 0;
  virtual void sample_from_uniforms(const double* u, int64_t k, int64_t* out, uintptr_t stream) = 0;
  virtual void sample(uint64_t key, int64_t k, int64_t* out, uintptr_t stream) = 0;
  // k distinct items by the exponential race, in draw order; inclusion may be null.
  virtual void sample_distinct(uint64_t key, int64_t k, int64_t* out, double* inclusion, uintptr_t stream) = 0;

  // Host-side reads: these synchronise with the stream.
  struct Status {
    double total, reference, temperature;
    int64_t positive;
  };
  virtual Status status(uintptr_t stream) = 0;
  // Copies n leaves (or, for a SoftmaxTree, scores) into host memory.
  virtual void export_values(double* host_out, bool scores, uintptr_t stream) = 0;
  // Throws the first error recorded since the last check, and forgets it.
  virtual void check(uintptr_t stream) = 0;
};

// The host build of the GPU algorithms (always compiled when Thrust's headers are found).
std::unique_ptr<DeviceTreeApi> make_host_gpu_tree(int64_t capacity, bool softmax, double temperature);

#if defined(ISAMPLE_HAVE_CUDA)
// The CUDA build, on the given device.
std::unique_ptr<DeviceTreeApi> make_cuda_tree(int64_t capacity, bool softmax, double temperature, int device);
int cuda_device_count();
#endif

}  // namespace isample
