// The CPU tree's hot loops, compiled twice from cpu_kernels.inc: for baseline x86-64 (or
// whatever the target is) and, on x86-64, for AVX2. cpu_kernels() picks the AVX2 build once
// when the processor has AVX2 and FMA, unless ISAMPLE_CPU_KERNELS=generic is set.
//
// Both builds compute bit-identical results: the kernels are compiled with
// -ffp-contract=off (no fused multiply-add) and without reassociation, so vector lanes do
// exactly the scalar operations. The tests run both and compare them.
#pragma once

#include <cstdint>

#include "common.h"

namespace isample {

struct CpuKernels {
  const char* name;
  // Descend m targets level by level; on return node[j] is the leaf holding target[j].
  void (*descend_chunk)(const TreeLayout& layout, const double* internal, const double* leaves,
                        double* target, int64_t* node, int m);
  // Re-sum every node of one level from the level below.
  void (*recompute_level)(const TreeLayout& layout, double* internal, const double* leaves, int level);
  // Re-sum the ancestors of leaves leaf_indices[0..k), level by level (nodes: k scratch).
  void (*propagate)(const TreeLayout& layout, double* internal, const double* leaves,
                    const int64_t* leaf_indices, int64_t k, int64_t* nodes);
  // Re-sum the ancestors of one leaf.
  void (*propagate_one)(const TreeLayout& layout, double* internal, const double* leaves, int64_t leaf);
  // target[j] = uniform_at(key, offset + j) * total.
  void (*uniform_targets)(uint64_t key, uint64_t offset, int64_t m, double total, double* target);
  // Exponential-race keys: keys[i] = E_i / (w_i * inverse_total) with E_i = -log(u_i),
  // u_i = open_uniform_at(key, i); +inf for w_i = 0 (and where the quotient overflows).
  void (*race_keys)(const double* leaves, int64_t n, uint64_t key, double inverse_total, double* keys);
  // The items whose race_keys value is <= threshold (finite), in index order, with those
  // keys, into index[0..count) and keys[0..count) (room for n); returns count. Most items'
  // keys are never computed: see the kernel.
  int64_t (*race_candidates)(const double* leaves, int64_t n, uint64_t key, double inverse_total, double threshold,
                             int64_t* index, double* keys);
  // The same race in the log domain, for weights so spread out that the linear keys
  // overflow (or a total so tiny that 1 / total does): keys[i] = log(E_i) - log(w_i * scale),
  // scale a power of two (exact); +inf for w_i = 0.
  void (*race_log_keys)(const double* leaves, int64_t n, uint64_t key, double scale, double* keys);
  // values[i] = exp_shared(values[i]) (fastmath.h: the exp the GPU kernels use too), the
  // softmax tree's leaves; vectorised in the AVX2 build.
  void (*exp_in_place)(double* values, int64_t n);
  // The largest of w[0..n) into *largest; false when some w is not finite and >= 0.
  bool (*scan_weights)(const double* w, int64_t n, double* largest);
  // For the leaf blocks p in [first, last): leaves = w (items < n; the last block's padding
  // is left as it is), level1[p] = the block's sum. Returns the number of positive weights.
  int64_t (*load_leaves)(const double* w, int64_t n, int64_t first, int64_t last, double* leaves, double* level1);
  // level1[p] = the sum of leaf block p, for p in [first, last); returns the positive leaves.
  int64_t (*sum_leaves)(const double* leaves, int64_t first, int64_t last, double* level1);
};

const CpuKernels& cpu_kernels();
// Select a build by name ("generic" or "avx2"); returns false if it is not available here.
bool select_cpu_kernels(const char* name);

}  // namespace isample
