// Zero-initialised, 64-byte-aligned array of doubles for the CPU trees.
// Small buffers come from calloc. Large ones are mapped directly, 2 MiB-aligned, and marked
// for transparent huge pages: fresh zero pages cost nothing until touched (a 1e9-leaf tree
// is free to create), and touching them takes one fault per 2 MiB instead of one per 4 KiB
// (a first build of 10M weights: ~270 ms of faults down to a few ms on a VM).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace isample {

// Raised (as Python's MemoryError) when a tree cannot be allocated; says how much it needed.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline std::string format_bytes(double bytes) {
  char text[64];
  std::snprintf(text, sizeof text, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return text;
}

// Refuse up front what cannot fit in physical memory: with overcommit, a huge calloc can
// succeed and the process is killed later, when the pages are first touched.
inline void check_fits_in_memory(double bytes, const std::string& what) {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page_size > 0 && bytes > double(pages) * double(page_size)) {
    throw OutOfMemory(what + " needs " + format_bytes(bytes) + " but this machine has " +
                      format_bytes(double(pages) * double(page_size)) + " of memory");
  }
}

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t count) : count_(count) {
    if (count == 0) return;
    if (count > (SIZE_MAX - kHugePage) / sizeof(double)) throw std::bad_alloc();
    const size_t bytes = count * sizeof(double);
    if (bytes >= kMapThreshold) {
      mapped_bytes_ = bytes + kHugePage;
      void* region = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (region == MAP_FAILED) throw std::bad_alloc();
      raw_ = region;
      data_ = reinterpret_cast<double*>(align_up(reinterpret_cast<uintptr_t>(region), kHugePage));
#if defined(MADV_HUGEPAGE)
      madvise(data_, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is off
#endif
      return;
    }
    raw_ = std::calloc(bytes + kAlign, 1);
    if (raw_ == nullptr) throw std::bad_alloc();
    data_ = reinterpret_cast<double*>(align_up(reinterpret_cast<uintptr_t>(raw_), kAlign));
  }
  ~AlignedBuffer() { release(); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept { swap(other); }
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    swap(other);
    return *this;
  }
  void swap(AlignedBuffer& other) noexcept {
    std::swap(raw_, other.raw_);
    std::swap(mapped_bytes_, other.mapped_bytes_);
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
  }

  double* data() { return data_; }
  const double* data() const { return data_; }
  double& operator[](size_t i) { return data_[i]; }
  const double& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return count_; }

 private:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kMapThreshold = size_t(4) << 20;
  static uintptr_t align_up(uintptr_t address, size_t alignment) {
    return (address + alignment - 1) / alignment * alignment;
  }
  void release() {
    if (mapped_bytes_ != 0) {
      munmap(raw_, mapped_bytes_);
    } else {
      std::free(raw_);
    }
    raw_ = nullptr;
    mapped_bytes_ = 0;
  }
  void* raw_ = nullptr;
  size_t mapped_bytes_ = 0;  // nonzero when raw_ came from mmap
  double* data_ = nullptr;
  size_t count_ = 0;
};

}  // namespace isample
