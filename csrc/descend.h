// The two per-node routines of the sum tree, shared verbatim by the CPU tree and the GPU
// code (host and device), so that every back end computes identical sums and identical
// descents.
//
//   node_sum(children)                 sum of one block of kFanout children, O(B)
//   choose_child(children, &target)    one descent step, O(B), branch-free
//   descend(...)                       a whole root-to-leaf descent, O(B log_B n)
//   tiny_total_scale(total)            1, or the power of two that lifts a tiny total
//   descend_scaled(...)                a descent in a tree read as scaled by that power
//   softmax_exponent(s, ref, T)        (s - ref) / T of a softmax leaf, O(1)
#pragma once

#include <cstdint>

#include "common.h"

namespace isample {

// Sum of kFanout children in a fixed pairwise association: c[j] + c[j+8], then halves.
// The fixed order is what makes recomputation reproducible everywhere; it also maps
// directly onto SIMD lanes. Never compiled with -ffast-math (reassociation breaks this).
ISAMPLE_FN double node_sum(const double* c) {
  static_assert(kFanout == 16, "node_sum is written for a fan-out of 16");
  double t[8];
  for (int j = 0; j < 8; ++j) t[j] = c[j] + c[j + 8];
  for (int j = 0; j < 4; ++j) t[j] = t[j] + t[j + 4];
  for (int j = 0; j < 2; ++j) t[j] = t[j] + t[j + 2];
  return t[0] + t[1];
}

// One descent step. `target` is a mass in [0, node sum); returns the child it falls in and
// leaves in `target` the mass remaining inside that child.
//
// Child c owns the mass interval [P(c-1), P(c)) of the prefix sums P, taken in two steps
// to keep the dependency chain short: running sums q inside four groups of four, and group
// starts G (G_0 = 0, G_{g+1} = G_g + q_{4g+3}); P(4g+i) = G_g + q_{4g+i}. Rounding is
// monotone, so P never decreases, P(4g+3) == G_{g+1}, and a zero-weight child has
// P(c) == P(c-1): goes-left-when-target-< P (ties go right) never chooses it.
// Rounding can leave target >= P(15) ("falling off" the block). Then the last child with
// positive weight is taken and target becomes +inf, so every level below also takes its
// last positive child; a positive node always has a positive child.
ISAMPLE_FN int choose_child(const double* c, double& target) {
  static_assert(kFanout == 16, "choose_child is written for a fan-out of 16");
  double q[16];
  for (int g = 0; g < 4; ++g) {
    q[4 * g] = c[4 * g];
    for (int i = 1; i < 4; ++i) q[4 * g + i] = q[4 * g + i - 1] + c[4 * g + i];
  }
  const double start1 = q[3];
  const double start2 = start1 + q[7];
  const double start3 = start2 + q[11];
  // The group starts and the prefixes are non-decreasing, so "the last one <= t" is a
  // cascade of selects: no data-dependent branch, nothing to mispredict.
  const double t = target;
  const int group = int(start1 <= t) + int(start2 <= t) + int(start3 <= t);
  double start = 0.0;
  start = start1 <= t ? start1 : start;
  start = start2 <= t ? start2 : start;
  start = start3 <= t ? start3 : start;
  const double* qg = q + 4 * group;
  const double p0 = start + qg[0], p1 = start + qg[1], p2 = start + qg[2], p3 = start + qg[3];
  const int within = int(p0 <= t) + int(p1 <= t) + int(p2 <= t) + int(p3 <= t);
  if (within == 4) {  // only possible in the last group
    int last_positive = 0;
    for (int j = 0; j < kFanout; ++j) last_positive = c[j] > 0.0 ? j : last_positive;
    target = positive_infinity();
    return last_positive;
  }
  double before = start;
  before = p0 <= t ? p0 : before;
  before = p1 <= t ? p1 : before;
  before = p2 <= t ? p2 : before;
  target = t - before;
  return 4 * group + within;
}

// The 16 prefix sums P(0..15) of one block, in exactly the association choose_child uses.
ISAMPLE_FN void block_prefix(const double* c, double* prefix) {
  double q[16];
  for (int g = 0; g < 4; ++g) {
    q[4 * g] = c[4 * g];
    for (int i = 1; i < 4; ++i) q[4 * g + i] = q[4 * g + i - 1] + c[4 * g + i];
  }
  const double start[4] = {0.0, q[3], q[3] + q[7], (q[3] + q[7]) + q[11]};
  for (int g = 0; g < 4; ++g) {
    for (int i = 0; i < 4; ++i) prefix[4 * g + i] = start[g] + q[4 * g + i];
  }
}

// choose_child for a block whose prefixes are already known (the root's block, shared by
// every draw of a batch). Same result as choose_child(c, target), bit for bit.
ISAMPLE_FN int choose_by_prefix(const double* prefix, const double* c, double& target) {
  const double t = target;
  int below = 0;
  double before = 0.0;
  for (int j = 0; j < kFanout; ++j) {
    below += int(prefix[j] <= t);
    before = prefix[j] <= t ? prefix[j] : before;
  }
  if (below == kFanout) {
    int last_positive = 0;
    for (int j = 0; j < kFanout; ++j) last_positive = c[j] > 0.0 ? j : last_positive;
    target = positive_infinity();
    return last_positive;
  }
  target = t - before;
  return below;
}

// Full descent from the root for mass `target` in [0, total). `internal` holds the levels
// of `layout` above the leaves; returns a leaf index with positive weight.
ISAMPLE_FN int64_t descend(const TreeLayout& layout, const double* internal,
                                  const double* leaves, double target) {
  int64_t node = 0;
  for (int level = layout.levels; level >= 1; --level) {
    const double* block = (level == 1 ? leaves : internal + layout.level_offset[level - 1]) +
                          node * kFanout;
    node = node * kFanout + choose_child(block, target);
  }
  return node;
}

// Totals below 2^-1000 (weights in the subnormal range, say 100 items of 5e-324): a target
// u * total would be rounded to a multiple of 2^-1074, losing most of u's 53 random bits
// (item 0 of 100 equal weights of 5e-324 would get half its share), and 1 / total may be
// inf. Such trees are drawn from as if every leaf and sum were multiplied by 2^1000. That
// is exact, and it is the tree the scaled leaves would build: a sum below 2^-1022 is an
// exact multiple of 2^-1074 (so its scaled twin, below 2^-22, is exact too), and above it
// both round to 53 bits alike. The scaled total is in [2^-74, 1), with full precision.
// Every back end decides with this one function.
constexpr double kTinyTotal = 0x1.0p-1000;
constexpr double kTinyTotalScale = 0x1.0p+1000;

ISAMPLE_FN double tiny_total_scale(double total) { return total < kTinyTotal ? kTinyTotalScale : 1.0; }

// descend() in the tree scaled by `scale` (a power of two): each block is read multiplied
// by it, and `target` is a mass of the scaled tree. With scale = 1 it is descend().
ISAMPLE_FN int64_t descend_scaled(const TreeLayout& layout, const double* internal, const double* leaves,
                                  double target, double scale) {
  int64_t node = 0;
  for (int level = layout.levels; level >= 1; --level) {
    const double* block = (level == 1 ? leaves : internal + layout.level_offset[level - 1]) + node * kFanout;
    double scaled[kFanout];
    for (int j = 0; j < kFanout; ++j) scaled[j] = block[j] * scale;
    node = node * kFanout + choose_child(scaled, target);
  }
  return node;
}

// The exponent of a softmax leaf, exp((s - ref) / T), for any finite s, ref and T > 0.
// s - ref overflows when the two have opposite signs and are near DBL_MAX (s = 1e308,
// ref = -1e308); then s / T - ref / T is used, which is finite whenever the true exponent
// is, and never inf - inf (the two terms have opposite signs). Either way about 2 ulps of
// the exponent, so p keeps ~|exponent| * 1e-16 relative error. Every back end (the CPU
// softmax tree, the GPU kernels) computes leaves through this one routine.
ISAMPLE_FN double softmax_exponent(double s, double reference, double temperature) {
  const double difference = s - reference;
  if (difference - difference == 0.0) return difference / temperature;  // finite
  return s / temperature - reference / temperature;
}

// Counter-based uniforms: the i-th number of stream `key` is a pure function of (key, i)
// (SplitMix64's output function over a Weyl sequence), so the CPU and GPU produce the
// same stream with no shared state, and any draw can be recomputed in isolation.
ISAMPLE_FN uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

ISAMPLE_FN uint64_t stream_bits(uint64_t key, uint64_t i) {
  return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ULL);
}

// Uniform in [0, 1) with 53 random bits.
ISAMPLE_FN double uniform_at(uint64_t key, uint64_t i) {
  return double(stream_bits(key, i) >> 11) * 0x1.0p-53;
}

// Uniform in (0, 1): safe to take the logarithm of.
ISAMPLE_FN double open_uniform_at(uint64_t key, uint64_t i) {
  return (double(stream_bits(key, i) >> 11) + 0.5) * 0x1.0p-53;
}

// The stream key of a user seed, and of the n-th call of a tree's own stream.
ISAMPLE_FN uint64_t key_from_seed(uint64_t seed) {
  return mix64(seed ^ 0x5851f42d4c957f2dULL);
}

ISAMPLE_FN uint64_t key_for_call(uint64_t tree_seed, uint64_t call) {
  return mix64(key_from_seed(tree_seed) ^ mix64(call + 0x2545f4914f6cdd1dULL));
}

}  // namespace isample
