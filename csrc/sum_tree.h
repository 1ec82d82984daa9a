// CPU sum tree over n non-negative float64 weights, and the softmax tree built on it.
//
// Semantics (shared with the GPU back end):
//   * p_i = w_i / total. A zero weight is never drawn.
//   * update() with a repeated index: the last value wins.
//   * Every method validates all of its input before changing anything; a call that throws
//     leaves the tree exactly as it was. Errors: std::out_of_range for a bad index,
//     std::invalid_argument for a bad value (pybind11 maps them to IndexError / ValueError).
//   * Not thread-safe on its own: the Python bindings serialise calls with a mutex.
//
// Costs, with B = 16 and L = ceil(log_16 n) levels:
//   update k            O(k B L), re-sums only the touched ancestors (a whole level once k
//                       is comparable to its size)
//   sample k (replace)  O(k B L), descents run level by level so their memory loads overlap
//   sample k (distinct) O(k B L) by rejection + removal/restore for small k/n, or O(n) by an
//                       exponential race for large k/n; both give successive sampling
//   assign / build      O(n), one pass over the weights to check them and one to load them,
//                       each on two threads above 2^20 items
//   min_positive        O(1) once track_min() was called: a min over children beside the
//                       sums (same layout, 8/15 bytes per item), re-computed with them
#pragma once

#include <cstdint>
#include <vector>

#include "buffer.h"
#include "common.h"
#include "cpu_kernels.h"
#include "select.h"

namespace isample {

// How sample_without_replacement draws: by the rule of thumb on k / n, or forced.
enum class DistinctMethod { kAuto, kRace, kRemoval };

class SumTree {
 public:
  explicit SumTree(int64_t capacity);

  int64_t capacity() const { return layout_.capacity; }
  const TreeLayout& layout() const { return layout_; }
  double total() const { return internal_[0]; }
  // Number of items with a positive weight (the most that can be drawn without replacement).
  int64_t num_positive() const { return num_positive_; }
  // Bytes held by the tree's arrays.
  size_t nbytes() const;
  const double* leaves() const { return leaves_.data(); }
  const double* internal() const { return internal_.data(); }

  // Keep, from now on, the smallest positive weight (a prioritized replay buffer normalises
  // its importance weights by it): a min over children beside the sums, where a zero weight
  // counts as +inf. Every call that changes weights then updates it with the sums.
  void track_min();
  bool tracks_min() const { return min_internal_.size() != 0; }
  // The smallest positive weight, +inf when none is positive; track_min() first (else
  // std::logic_error).
  double min_positive() const;

  // Set w[indices[j]] = weights[j]. Weights must be finite and >= 0, and the new total
  // must stay finite.
  void update(const int64_t* indices, const double* weights, int64_t k);
  // Set all n weights at once, O(n).
  void assign(const double* weights);
  void get(const int64_t* indices, int64_t k, double* out) const;
  void probability(const int64_t* indices, int64_t k, double* out) const;

  // Descend for each u in [0, 1): out[j] = the leaf holding mass u[j] * total.
  void sample_from_uniforms(const double* u, int64_t k, int64_t* out) const;
  // k draws with replacement, from stream `key` (uniform_at(key, 0 .. k-1)), so it equals
  // sample_from_uniforms on those uniforms.
  void sample_with_replacement(uint64_t key, int64_t k, int64_t* out) const;
  // k distinct items by successive sampling (each next item drawn with probability
  // proportional to its weight among those not yet drawn), in draw order for the tree
  // methods and in key order (which is also a draw order) for the race. The tree is
  // modified during the call and restored bit for bit before it returns.
  void sample_without_replacement(uint64_t key, int64_t k, int64_t* out,
                                  DistinctMethod method = DistinctMethod::kAuto);
  // The exponential race, also writing each drawn item's inclusion probability given the
  // other items' keys: pi_j = 1 - exp(-p_j * tau), tau the (k+1)-th smallest key. Then
  // sum over the sample of f_j / pi_j is an exactly unbiased estimate of sum_i f_i
  // (priority sampling; Duffield, Lund & Thorup 2007; Cohen & Kaplan 2007).
  void sample_with_inclusion(uint64_t key, int64_t k, int64_t* out, double* inclusion);

  // For SoftmaxTree, which validates on its own: write leaves without checking values.
  void write_unchecked(const int64_t* indices, const double* weights, int64_t k);
  // Recompute every leaf as leaf_value(i) and rebuild all sums, O(n).
  template <class LeafValue>
  void rebuild_from(LeafValue leaf_value) {
    double* leaves = leaves_.data();
    for (int64_t i = 0; i < layout_.capacity; ++i) leaves[i] = leaf_value(i);
    rebuild_internal();
  }
  // Leaves exp_shared(exponent(i)) and all sums, O(n): the exponents in one pass, then the
  // exponentials in another, which the AVX2 kernels vectorise.
  template <class Exponent>
  void rebuild_from_exponents(Exponent exponent) {
    double* leaves = leaves_.data();
    for (int64_t i = 0; i < layout_.capacity; ++i) leaves[i] = exponent(i);
    cpu_kernels().exp_in_place(leaves, layout_.capacity);
    rebuild_internal();
  }

  void check_indices(const int64_t* indices, int64_t k) const;

 private:
  void rebuild_internal();
  // Leaves from `weights` (checked) and every sum, in one pass over the weights.
  void load(const double* weights);
  void rebuild_above_level1();
  // Re-sum the ancestors of the k leaves, level by level.
  void propagate(const int64_t* leaf_indices, int64_t k);
  void propagate_one(int64_t leaf);
  // The min over children (when tracked): every node, or the ancestors of k leaves.
  void rebuild_min();
  void propagate_min(const int64_t* leaf_indices, int64_t k);
  // Descend m <= kChunk targets in place: on return node[j] is the leaf of target[j].
  void descend_chunk(double* target, int64_t* node, int m) const;
  // The leaf holding mass u * total of a tree whose total is tiny (descend.h).
  int64_t descend_tiny(double u) const;
  void sample_by_race(uint64_t key, int64_t k, int64_t* out, double* inclusion = nullptr);
  bool race_by_candidates(uint64_t key, int64_t k, int64_t* out, double* next_key);
  void sample_by_rejection_and_removal(uint64_t key, int64_t k, int64_t* out);
  bool race_is_cheaper(int64_t k) const;

  TreeLayout layout_;
  AlignedBuffer leaves_;
  AlignedBuffer internal_;
  // Node j of level l holds the smallest positive leaf below it (+inf for none), at the same
  // offset as its sum in internal_; the padding of each level is +inf. Empty: not tracked.
  AlignedBuffer min_internal_;
  int64_t num_positive_ = 0;
  // Per-call scratch, kept to avoid allocating on every call.
  std::vector<int64_t> node_scratch_;
  std::vector<int64_t> min_scratch_;
  std::vector<double> value_scratch_;
  std::vector<int64_t> set_scratch_;
  std::vector<double> race_keys_;
  SelectScratch select_scratch_;
};

// Builds and full rebuilds split their pass over the leaf blocks between two threads from
// this many blocks on (default 2^21 blocks, 33.5M items); returns the previous value. For
// tests, which exercise the split on smaller trees.
int64_t set_parallel_blocks(int64_t blocks);

}  // namespace isample
