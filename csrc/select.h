// The k smallest of n keys, in increasing order: the exponential race's last step.
//
// O(n) to find the candidates (keys below a threshold estimated from a sample of 1024 keys,
// with a 4-sigma margin so it almost never needs a second pass), then an O(c) radix sort of
// the c ~ k candidates on keys quantised to ~log2(c) + 8 bits (two passes up to 65,536
// candidates); runs of equal quanta are re-sorted by the true keys, so the order is exact.
// Ties between equal keys go to the lower index.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace isample {

struct SelectScratch {
  std::vector<int64_t> candidates;
  std::vector<double> candidate_keys;
  std::vector<double> sample;
  std::vector<uint64_t> packed, packed_swap;  // (quantum << 32) | slot
  std::vector<uint32_t> histogram;
  // Give back memory above `bytes`, so one huge call does not pin it for the tree's lifetime.
  void trim(size_t bytes);
};

// Keys sampled for a threshold: this many, at sample_position(j, n) (when n is large enough
// for a threshold to pay, threshold_pays(n)).
constexpr int64_t kThresholdSample = 1024;
inline bool threshold_pays(int64_t n) { return n >= 8 * kThresholdSample; }
inline int64_t sample_position(int64_t j, int64_t n) {
  return (j * n) / kThresholdSample + (n / kThresholdSample) / 2;
}

// A key bound that keeps about k + 4 sigma of the n keys, judged from the kThresholdSample
// keys in `sample` (reordered). The largest finite double when a bound would keep (nearly)
// everything.
double threshold_from_sample(double* sample, int64_t n, int64_t k);

// Writes to out[0..k) the indices of the k smallest keys in increasing order, and to
// *next_key (when not null) the (k+1)-th smallest key (+inf if there is none). A key of +inf
// is never selected. Returns false (out untouched) when fewer than k keys are finite.
bool smallest_in_order(const double* keys, int64_t n, int64_t k, int64_t* out, SelectScratch& scratch,
                       double* next_key = nullptr);

// The same from `count` candidates (index[j] increasing, key[j] their keys) known to hold
// the k smallest keys: out[0..k) in increasing order of key, and *next_key (when not null)
// the smallest key after them, +inf if count == k (the caller knows the keys outside).
void smallest_of_candidates(const int64_t* index, const double* key, int64_t count, int64_t k, int64_t* out,
                            SelectScratch& scratch, double* next_key = nullptr);

}  // namespace isample
