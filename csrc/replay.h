// Prioritized replay's per-call arithmetic (python/isample/integrations/replay.py): the
// leaves of given priorities, and the importance weights of drawn items.
//
//   priority_leaves      leaf_j = (p_j + eps)^alpha in float64, all checked first. O(k)
//   importance_weights   w_j = (N P(j))^-beta, normalised, rounded once to float32. O(k)
//
// Both run inside the one core call that a buffer's update_priorities / sample makes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace isample {

// How the weights are normalised: not at all, by the batch's largest weight (the PER
// paper), or by the largest any stored item could get (cpprb, OpenAI baselines).
enum class Normalize { kNone, kBatch, kBuffer };

// leaves[j] = (p[j] + eps) ** alpha, with p widened to float64 (p + eps rounded once, then
// std::pow, as Python's float ** does). Returns false, leaving `leaves` partly written and
// nothing else touched, when some p is not finite and >= 0 or some leaf is not finite (the
// caller then explains which); `largest` is the largest p (-inf for k = 0).
template <class P>
bool priority_leaves(const P* p, int64_t k, double alpha, double eps, double* leaves, double& largest) {
  const double max_finite = std::numeric_limits<double>::max();
  double top = -std::numeric_limits<double>::infinity();
  bool ok = true;
  for (int64_t j = 0; j < k; ++j) {
    const double v = double(p[j]);
    ok &= v >= 0.0 && v <= max_finite;  // NaN fails
    top = v > top ? v : top;
    leaves[j] = v + eps;
  }
  if (!ok) return false;
  if (alpha != 1.0) {
    for (int64_t j = 0; j < k; ++j) leaves[j] = std::pow(leaves[j], alpha);
  }
  for (int64_t j = 0; j < k; ++j) ok &= leaves[j] <= max_finite;
  largest = top;
  return ok;
}

// Importance weights of k drawn items from their (positive) leaves, into float32:
//   kNone:   (leaf * size / total) ** -beta          (reference = size / total)
//   kBatch:  (min over the batch's leaves / leaf) ** beta
//   kBuffer: (smallest positive leaf stored / leaf) ** beta   (reference = that leaf)
// w_i / w_ref = (P(ref) / P(i))^beta = (leaf_ref / leaf_i)^beta: the normalised forms need
// no total. The ratio and the power are float64; the result is rounded once.
inline void importance_weights(const double* leaves, int64_t k, double beta, Normalize how, double reference,
                               float* out) {
  if (beta == 0.0) {
    for (int64_t j = 0; j < k; ++j) out[j] = 1.0f;
    return;
  }
  if (how == Normalize::kNone) {
    for (int64_t j = 0; j < k; ++j) out[j] = float(std::pow(leaves[j] * reference, -beta));
    return;
  }
  if (how == Normalize::kBatch) {
    reference = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < k; ++j) reference = leaves[j] < reference ? leaves[j] : reference;
  }
  for (int64_t j = 0; j < k; ++j) out[j] = float(std::pow(reference / leaves[j], beta));
}

}  // namespace isample
