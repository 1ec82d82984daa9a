// The k smallest of n keys, in increasing order: the exponential race's last step.
//
// O(n) to find the candidates (keys below a threshold estimated from a sample of 1024 keys,
// with a 4-sigma margin so it almost never needs a second pass), then an O(c) radix sort of
// the c ~ k candidates on 32-bit quantised keys; runs of equal quanta are re-sorted by the
// true keys, so the order is exact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace isample {

struct SelectScratch {
  std::vector<int64_t> candidates;
  std::vector<double> sample;
  std::vector<uint32_t> quanta, quanta_swap, slots, slots_swap;
  // Give back memory above `bytes`, so one huge call does not pin it for the tree's lifetime.
  void trim(size_t bytes);
};

// Writes to out[0..k) the indices of the k smallest keys in increasing order, and to
// *next_key (when not null) the (k+1)-th smallest key (+inf if there is none). A key of +inf
// is never selected. Returns false (out untouched) when fewer than k keys are finite.
bool smallest_in_order(const double* keys, int64_t n, int64_t k, int64_t* out, SelectScratch& scratch,
                       double* next_key = nullptr);

}  // namespace isample
