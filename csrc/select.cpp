#include "select.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace isample {
namespace {

// Radix digits of at most 12 bits: 4,096 buckets, whose counts (16 KiB) stay in L1.
constexpr int kMaxDigitBits = 12;

template <class T>
void release_if_larger(std::vector<T>& v, size_t bytes) {
  if (v.capacity() * sizeof(T) > bytes) std::vector<T>().swap(v);
}

// Indices i with keys[i] <= threshold and their keys, written without a data-dependent branch.
int64_t compact(const double* keys, int64_t n, double threshold, std::vector<int64_t>& index,
                std::vector<double>& key) {
  constexpr int64_t kBlock = 4096;
  int64_t count = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    if (index.size() < size_t(count + (end - start))) {
      index.resize(size_t(count + (end - start)) * 3 / 2 + 1024);
      key.resize(index.size());
    }
    int64_t* dst = index.data();
    double* dst_key = key.data();
    for (int64_t i = start; i < end; ++i) {
      dst[count] = i;
      dst_key[count] = keys[i];
      count += keys[i] <= threshold ? 1 : 0;
    }
  }
  return count;
}

// Smallest and largest of n finite keys: four chains, so the comparisons do not wait on
// one another.
void key_range(const double* key, int64_t n, double& lo, double& hi) {
  double l[4] = {key[0], key[0], key[0], key[0]}, h[4] = {key[0], key[0], key[0], key[0]};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int t = 0; t < 4; ++t) {
      l[t] = std::min(l[t], key[j + t]);
      h[t] = std::max(h[t], key[j + t]);
    }
  }
  for (; j < n; ++j) {
    l[0] = std::min(l[0], key[j]);
    h[0] = std::max(h[0], key[j]);
  }
  lo = std::min(std::min(l[0], l[1]), std::min(l[2], l[3]));
  hi = std::max(std::max(h[0], h[1]), std::max(h[2], h[3]));
}

}  // namespace

void SelectScratch::trim(size_t bytes) {
  release_if_larger(candidates, bytes);
  release_if_larger(candidate_keys, bytes);
  release_if_larger(packed, bytes);
  release_if_larger(packed_swap, bytes);
}

double threshold_from_sample(double* sample, int64_t n, int64_t k) {
  const double max_finite = std::numeric_limits<double>::max();
  const double q = double(k) / double(n);
  const double want = q * kThresholdSample + 4.0 * std::sqrt(kThresholdSample * q * (1.0 - q)) + 2.0;
  if (want >= kThresholdSample - 1) return max_finite;
  const int64_t rank = int64_t(std::ceil(want));
  std::nth_element(sample, sample + rank, sample + kThresholdSample);
  return std::min(sample[rank], max_finite);
}

bool smallest_in_order(const double* keys, int64_t n, int64_t k, int64_t* out, SelectScratch& s, double* next_key) {
  const double max_finite = std::numeric_limits<double>::max();
  double threshold = max_finite;
  if (threshold_pays(n)) {
    s.sample.resize(size_t(kThresholdSample));
    for (int64_t j = 0; j < kThresholdSample; ++j) s.sample[j] = keys[sample_position(j, n)];
    threshold = threshold_from_sample(s.sample.data(), n, k);
  }
  int64_t count = compact(keys, n, threshold, s.candidates, s.candidate_keys);
  if (count < k && threshold < max_finite) {
    threshold = max_finite;
    count = compact(keys, n, threshold, s.candidates, s.candidate_keys);
  }
  if (count < k) return false;
  smallest_of_candidates(s.candidates.data(), s.candidate_keys.data(), count, k, out, s, next_key);
  if (next_key != nullptr && count == k) {
    // The (k+1)-th smallest key lies outside the candidates, all above the threshold.
    double smallest = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) smallest = keys[i] > threshold ? std::min(smallest, keys[i]) : smallest;
    *next_key = smallest;
  }
  return true;
}

void smallest_of_candidates(const int64_t* cand, const double* key, int64_t count, int64_t k, int64_t* out,
                            SelectScratch& s, double* next_key) {
  const double infinity = std::numeric_limits<double>::infinity();
  if (count == 0 || k == 0) {
    if (next_key != nullptr) {
      double smallest = infinity;
      for (int64_t j = 0; j < count; ++j) smallest = std::min(smallest, key[j]);
      *next_key = smallest;
    }
    return;
  }
  auto before = [&](int64_t a, int64_t b) { return key[a] < key[b] || (key[a] == key[b] && cand[a] < cand[b]); };
  if (count > int64_t(UINT32_MAX)) {  // beyond the 32-bit slots below: a plain partial sort
    std::vector<int64_t> slot(static_cast<size_t>(count));
    for (int64_t j = 0; j < count; ++j) slot[j] = j;
    const int64_t sorted = std::min(count, k + 1);
    std::partial_sort(slot.begin(), slot.begin() + sorted, slot.end(), before);
    for (int64_t j = 0; j < k; ++j) out[j] = cand[slot[j]];
    if (next_key != nullptr) *next_key = count > k ? key[slot[k]] : infinity;
    return;
  }

  // Quantise the candidates' keys over their own range onto ~log2(c) + 8 bits (monotone:
  // sorting the quanta sorts the keys up to ties inside one quantum, about c / 512 of them,
  // which are fixed below), and sort (quantum, slot) pairs packed in 64 bits by an LSD radix
  // sort of 1 to 3 passes of at most 12 bits: two passes up to 65,536 candidates.
  double lo, hi;
  key_range(key, count, lo, hi);
  int quantum_bits = 8;
  while (quantum_bits < 32 && (int64_t(1) << (quantum_bits - 8)) < count) ++quantum_bits;
  quantum_bits = std::max(quantum_bits, 12);
  const int passes = (quantum_bits + kMaxDigitBits - 1) / kMaxDigitBits;
  const int digit_bits = (quantum_bits + passes - 1) / passes;
  const uint64_t digit_mask = (uint64_t(1) << digit_bits) - 1;
  const size_t buckets = size_t(1) << digit_bits;
  const double top = double((uint64_t(1) << quantum_bits) - 1);
  const double scale = hi > lo ? top / (hi - lo) : 0.0;
  s.packed.resize(size_t(count));
  s.packed_swap.resize(size_t(count));
  uint64_t* packed = s.packed.data();
  // (via int64: x86 converts a double to a signed integer in one instruction)
  for (int64_t j = 0; j < count; ++j) {
    packed[j] = (uint64_t(int64_t(std::min((key[j] - lo) * scale, top))) << 32) | uint64_t(j);
  }

  // One histogram pass for every digit; a digit shared by every candidate is skipped.
  s.histogram.assign(size_t(passes) * buckets, 0);
  uint32_t* histogram = s.histogram.data();
  uint32_t* histogram_high = histogram + buckets;
  const int high_shift = 32 + digit_bits;
  if (passes == 2) {  // the common case, unrolled
    for (int64_t j = 0; j < count; ++j) {
      ++histogram[(packed[j] >> 32) & digit_mask];
      ++histogram_high[(packed[j] >> high_shift) & digit_mask];
    }
  } else {
    for (int64_t j = 0; j < count; ++j) {
      const uint64_t quantum = packed[j] >> 32;
      for (int d = 0; d < passes; ++d) ++histogram[size_t(d) * buckets + ((quantum >> (d * digit_bits)) & digit_mask)];
    }
  }
  uint64_t* packed_out = s.packed_swap.data();
  for (int d = 0; d < passes; ++d) {
    uint32_t* counts = histogram + size_t(d) * buckets;
    bool trivial = false;
    uint32_t offset = 0;
    for (size_t b = 0; b < buckets; ++b) {
      const uint32_t c = counts[b];
      trivial = trivial || c == uint32_t(count);
      counts[b] = offset;
      offset += c;
    }
    if (trivial) continue;
    const int shift = 32 + d * digit_bits;
    for (int64_t j = 0; j < count; ++j) packed_out[counts[(packed[j] >> shift) & digit_mask]++] = packed[j];
    std::swap(packed, packed_out);
  }
  auto quantum_at = [&](int64_t j) { return uint32_t(packed[j] >> 32); };
  auto slot_at = [&](int64_t j) { return int64_t(uint32_t(packed[j])); };

  // Candidates that share a quantum are ordered by their true keys. Only runs that reach
  // into the first k (and position k, for next_key) matter.
  const int64_t needed = std::min(count, k + 1);
  for (int64_t start = 0; start < needed;) {
    int64_t end = start + 1;
    while (end < count && quantum_at(end) == quantum_at(start)) ++end;
    if (end - start > 1) {
      std::sort(packed + start, packed + end, [&](uint64_t a, uint64_t b) { return before(int64_t(uint32_t(a)), int64_t(uint32_t(b))); });
    }
    start = end;
  }
  for (int64_t j = 0; j < k; ++j) out[j] = cand[slot_at(j)];
  if (next_key != nullptr) *next_key = count > k ? key[slot_at(k)] : infinity;
}

}  // namespace isample
