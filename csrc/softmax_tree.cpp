#include "softmax_tree.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"
#include "descend.h"
#include "fastmath.h"

namespace isample {
namespace {

// A leaf may reach e^kMaxExponent before a rebase; the total may fall to e^-kMaxExponent.
constexpr double kMaxExponent = 64.0;

void check_temperature(double t) {
  if (!(t > 0.0 && t <= std::numeric_limits<double>::max())) {
    char text[96];
    std::snprintf(text, sizeof text, "temperature must be a finite number > 0, got %.17g", t);
    throw std::invalid_argument(text);
  }
}

void check_scores(const double* scores, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    if (!std::isfinite(scores[j])) {
      char text[128];
      std::snprintf(text, sizeof text, "score %.17g (at position %lld) is not finite", scores[j],
                    static_cast<long long>(j));
      throw std::invalid_argument(text);
    }
  }
}

int64_t checked_capacity(int64_t capacity) {
  if (capacity >= 1 && capacity <= kMaxCapacity) {
    TreeLayout layout = TreeLayout::for_capacity(capacity);
    double bytes = double(layout.leaf_slots + layout.internal_slots + capacity) * sizeof(double);
    check_fits_in_memory(bytes, "a softmax tree of capacity " + std::to_string(capacity));
  }
  return capacity;  // SumTree reports a bad capacity itself
}

}  // namespace

SoftmaxTree::SoftmaxTree(int64_t capacity, double temperature)
    : tree_(checked_capacity(capacity)), temperature_(temperature) {
  check_temperature(temperature);
  try {
    scores_ = AlignedBuffer(size_t(capacity));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("could not allocate the scores of a softmax tree of capacity " + std::to_string(capacity));
  }
  tree_.rebuild_from([](int64_t) { return 1.0; });
}

double SoftmaxTree::log_total() const { return ref_ / temperature_ + std::log(tree_.total()); }

void SoftmaxTree::rebase() {
  const double* s = scores_.data();
  ref_ = *std::max_element(s, s + capacity());
  const double ref = ref_, t = temperature_;
  tree_.rebuild_from_exponents([s, ref, t](int64_t i) { return softmax_exponent(s[i], ref, t); });
}

void SoftmaxTree::update(const int64_t* indices, const double* scores, int64_t k, double keep) {
  if (k < 0) throw std::invalid_argument("the number of updates must be >= 0");
  if (!(keep >= 0.0 && keep <= 1.0)) throw std::invalid_argument("keep must be in [0, 1]");
  tree_.check_indices(indices, k);
  check_scores(scores, k);
  leaf_scratch_.resize(size_t(k));
  value_scratch_.resize(size_t(k));
  double* stored = scores_.data();
  // New scores from the scores before the call (gathered first, so a repeated index blends
  // with the old score, not with its own earlier occurrence); a convex mix of finite values
  // is finite.
  for (int64_t j = 0; j < k; ++j) {
    value_scratch_[j] = keep == 0.0 ? scores[j] : keep * stored[indices[j]] + (1.0 - keep) * scores[j];
  }
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    stored[indices[j]] = value_scratch_[j];
    double exponent = softmax_exponent(value_scratch_[j], ref_, temperature_);
    top = std::max(top, exponent);
    leaf_scratch_[j] = exponent;
  }
  if (!(top <= kMaxExponent)) {
    rebase();
    return;
  }
  cpu_kernels().exp_in_place(leaf_scratch_.data(), k);
  tree_.write_unchecked(indices, leaf_scratch_.data(), k);
  if (tree_.total() < exp_shared(-kMaxExponent)) rebase();
}

void SoftmaxTree::assign(const double* scores) {
  check_scores(scores, capacity());
  std::copy(scores, scores + capacity(), scores_.data());
  rebase();
}

void SoftmaxTree::get(const int64_t* indices, int64_t k, double* out) const {
  if (k < 0) throw std::invalid_argument("the number of indices must be >= 0");
  tree_.check_indices(indices, k);
  for (int64_t j = 0; j < k; ++j) out[j] = scores_[indices[j]];
}

void SoftmaxTree::set_temperature(double temperature) {
  check_temperature(temperature);
  temperature_ = temperature;
  rebase();
}

void SoftmaxTree::load(const double* scores, double reference) {
  check_scores(scores, capacity());
  check_scores(&reference, 1);
  std::copy(scores, scores + capacity(), scores_.data());
  const double* s = scores_.data();
  const double t = temperature_;
  double top = softmax_exponent(*std::max_element(s, s + capacity()), reference, t);
  if (!(top <= kMaxExponent)) {
    rebase();
    return;
  }
  ref_ = reference;
  tree_.rebuild_from_exponents([s, reference, t](int64_t i) { return softmax_exponent(s[i], reference, t); });
  if (tree_.total() < exp_shared(-kMaxExponent)) rebase();
}

}  // namespace isample
