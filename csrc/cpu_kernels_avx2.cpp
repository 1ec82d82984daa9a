// The AVX2 build of the CPU kernels (compiled with -mavx2 -mfma -ffp-contract=off).
#define ISAMPLE_KERNELS_NS avx2
#define ISAMPLE_KERNELS_NAME "avx2"
#include "cpu_kernels.inc"
