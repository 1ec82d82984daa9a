// The baseline build of the CPU kernels, and the choice between builds.
#include <cstdlib>
#include <cstring>

#define ISAMPLE_KERNELS_NS generic
#define ISAMPLE_KERNELS_NAME "generic"
#include "cpu_kernels.inc"

namespace isample {

#if defined(ISAMPLE_HAVE_AVX2_KERNELS)
namespace avx2 {
extern const CpuKernels kernels;
}
#endif

namespace {

const CpuKernels* named(const char* name) {
  if (std::strcmp(name, "generic") == 0) return &generic::kernels;
#if defined(ISAMPLE_HAVE_AVX2_KERNELS)
  if (std::strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return &avx2::kernels;
  }
#endif
  return nullptr;
}

const CpuKernels* best() {
  const char* forced = std::getenv("ISAMPLE_CPU_KERNELS");
  if (forced != nullptr && named(forced) != nullptr) return named(forced);
  const CpuKernels* fast = named("avx2");
  return fast != nullptr ? fast : &generic::kernels;
}

const CpuKernels* current = best();

}  // namespace

const CpuKernels& cpu_kernels() { return *current; }

bool select_cpu_kernels(const char* name) {
  const CpuKernels* chosen = named(name);
  if (chosen == nullptr) return false;
  current = chosen;
  return true;
}

}  // namespace isample
