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
  // Bytes of the tree's arrays (held for its lifetime), and of the scratch it holds now
  // between calls (batch sorting, softmax updates, the race; large scratch is given back
  // after its call).
  virtual size_t nbytes() const = 0;
  virtual size_t scratch_nbytes() const = 0;

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
// The CUDA build, on the given device. Throws std::invalid_argument when this build holds
// no kernel the device can run (its compute capability is not among the build's).
std::unique_ptr<DeviceTreeApi> make_cuda_tree(int64_t capacity, bool softmax, double temperature, int device);
// Visible devices; 0 when the runtime cannot start (no driver, a driver too old for this
// build's runtime: cuda_status() says which).
int cuda_device_count();

struct CudaDevice {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int multiprocessors = 0;
  uint64_t total_memory = 0;
};
// What the statically linked CUDA runtime sees, launching and allocating nothing: its version,
// the driver's (both as 1000 * major + 10 * minor, 0 when there is no driver), the error
// that kept it from listing devices ("" when none: cudaErrorInsufficientDriver when the
// driver is older than the runtime), and the visible devices.
struct CudaStatus {
  int runtime_version = 0;
  int driver_version = 0;
  std::string error;
  std::vector<CudaDevice> devices;
};
CudaStatus cuda_status();

// The device's default memory pool, from which every device tree allocates: bytes reserved
// from the driver and in use, now and at their peak since the last reset.
struct CudaPoolStats {
  uint64_t reserved = 0, reserved_peak = 0, used = 0, used_peak = 0;
};
CudaPoolStats cuda_memory_pool(int device, bool reset_peaks);
#endif

}  // namespace isample
