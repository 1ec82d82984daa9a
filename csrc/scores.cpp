#include "scores.h"

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace isample {

const double* blend_scores(const double* store, int64_t n, const int64_t* indices, const double* values, int64_t k,
                           double keep, double* out) {
  // One branch-free pass decides; only a bad batch is walked again for the message.
  uint64_t bad = 0;
  for (int64_t j = 0; j < k; ++j) {
    bad |= uint64_t(uint64_t(indices[j]) >= uint64_t(n));
    bad |= uint64_t(!(values[j] - values[j] == 0.0));  // NaN or +-inf
  }
  for (int64_t j = 0; bad && j < k; ++j) {
    if (indices[j] < 0 || indices[j] >= n) {
      throw std::out_of_range("index " + std::to_string(indices[j]) + " (at position " + std::to_string(j) +
                              ") is out of range for " + std::to_string(n) + " items");
    }
    if (!std::isfinite(values[j])) {
      char text[128];
      std::snprintf(text, sizeof text, "score %.17g (at position %lld) is not finite", values[j], static_cast<long long>(j));
      throw std::invalid_argument(text);
    }
  }
  if (keep == 0.0) return values;
  // A convex mix of finite values is finite.
  for (int64_t j = 0; j < k; ++j) out[j] = keep * store[indices[j]] + (1.0 - keep) * values[j];
  return out;
}

void proportional_leaves(const double* scores, int64_t k, double alpha, double eps, double* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = (scores[j] > 0.0 ? scores[j] : 0.0) + eps;
  if (alpha != 1.0) {
    for (int64_t j = 0; j < k; ++j) out[j] = std::pow(out[j], alpha);
  }
}

void write_scores(double* store, const int64_t* indices, const double* scores, int64_t k) {
  for (int64_t j = 0; j < k; ++j) store[indices[j]] = scores[j];
}

}  // namespace isample
