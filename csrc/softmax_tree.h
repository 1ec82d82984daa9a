// Softmax tree: stores a score s_i per item and samples with p_i = softmax(s / T)_i.
//
// Leaves of the underlying SumTree hold exp((s_i - ref) / T). The reference `ref` is moved
// to the largest score (an O(n) rebase) when a new score would put a leaf above e^64, or
// when the total falls below e^-64; in between, updates cost what SumTree updates cost.
// So no leaf overflows, the largest leaf is at least e^-(64 + ln n), and every p_i whose
// true value is above ~1e-250 matches a float64 stable softmax to ~1e-13 relative, for any
// finite scores and temperature. Smaller probabilities may round to zero, as they do in a
// float64 softmax that subtracts the max.
#pragma once

#include <cstdint>
#include <vector>

#include "buffer.h"
#include "sum_tree.h"

namespace isample {

class SoftmaxTree {
 public:
  SoftmaxTree(int64_t capacity, double temperature);

  int64_t capacity() const { return tree_.capacity(); }
  double temperature() const { return temperature_; }
  // The score that maps to a leaf of exactly 1.
  double reference() const { return ref_; }
  // log(sum_i exp(s_i / T)), exact for any finite scores.
  double log_total() const;
  size_t nbytes() const { return tree_.nbytes() + scores_.size() * sizeof(double); }
  const double* scores() const { return scores_.data(); }
  const SumTree& tree() const { return tree_; }
  SumTree& tree() { return tree_; }

  // Set s[indices[j]] = keep * s_old + (1 - keep) * scores[j], s_old being the score before
  // the call (keep = 0: plain assignment; keep = beta: an exponential moving average).
  // Scores must be finite and keep in [0, 1]. A repeated index: the last wins.
  void update(const int64_t* indices, const double* scores, int64_t k, double keep = 0.0);
  // Set all n scores, O(n).
  void assign(const double* scores);
  void get(const int64_t* indices, int64_t k, double* out) const;
  // Change T (> 0, finite); O(n).
  void set_temperature(double temperature);
  // Restore scores and reference exactly as saved, so the leaves come back bit for bit.
  void load(const double* scores, double reference);

 private:
  void rebase();

  SumTree tree_;
  AlignedBuffer scores_;
  double temperature_;
  double ref_ = 0.0;
  std::vector<double> leaf_scratch_;
  std::vector<double> value_scratch_;
};

}  // namespace isample
