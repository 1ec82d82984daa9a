// The sampler's per-step score work for the transforms whose tree holds leaf values rather
// than the scores themselves (Proportional, RankBased), done in the core in one pass.
//
//   blend_scores(store, ...)      s_j = keep * store[i_j] + (1 - keep) * v_j, from the store
//                                 as it was before the call; v itself when keep = 0. O(k)
//   proportional_leaves(s, ...)   (max(s, 0) + eps) ** alpha, the Proportional transform. O(k)
//   write_scores(store, ...)      store[i_j] = s_j in order, so a repeated index keeps its last. O(k)
//
// blend_scores validates everything (indices in [0, n), finite values) before the caller
// writes anything, so a rejected batch changes nothing; the same formula as the softmax
// tree's blend and the RunningLoss policy.
#pragma once

#include <cstdint>

namespace isample {

// Returns the blended scores: `values` itself when keep is 0 (nothing to mix, nothing
// copied), else `out` (k doubles). Throws std::out_of_range for an index outside [0, n),
// std::invalid_argument for a value that is not finite.
const double* blend_scores(const double* store, int64_t n, const int64_t* indices, const double* values, int64_t k,
                           double keep, double* out);

void proportional_leaves(const double* scores, int64_t k, double alpha, double eps, double* out);

void write_scores(double* store, const int64_t* indices, const double* scores, int64_t k);

}  // namespace isample
