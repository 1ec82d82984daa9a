#include "select.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace isample {
namespace {

constexpr int64_t kSampleSize = 1024;
// 4 digits of 8 bits: 256 buckets keep the scatter's write streams within L1.
constexpr int kDigitBits = 8;
constexpr int kDigits = 4;
constexpr uint32_t kBuckets = 1u << kDigitBits;

template <class T>
void release_if_larger(std::vector<T>& v, size_t bytes) {
  if (v.capacity() * sizeof(T) > bytes) std::vector<T>().swap(v);
}

// A key bound that keeps about k + 4 sigma of the n keys, judged from an evenly spread
// sample. Returns the largest finite double when a bound would keep (nearly) everything.
double estimate_threshold(const double* keys, int64_t n, int64_t k, std::vector<double>& sample) {
  const double max_finite = std::numeric_limits<double>::max();
  if (n < 8 * kSampleSize) return max_finite;
  sample.resize(size_t(kSampleSize));
  for (int64_t j = 0; j < kSampleSize; ++j) sample[j] = keys[(j * n) / kSampleSize + (n / kSampleSize) / 2];
  const double q = double(k) / double(n);
  const double want = q * kSampleSize + 4.0 * std::sqrt(kSampleSize * q * (1.0 - q)) + 2.0;
  if (want >= kSampleSize - 1) return max_finite;
  const int64_t rank = int64_t(std::ceil(want));
  std::nth_element(sample.begin(), sample.begin() + rank, sample.end());
  return std::min(sample[rank], max_finite);
}

// Indices i with keys[i] <= threshold, written without a data-dependent branch.
int64_t compact(const double* keys, int64_t n, double threshold, std::vector<int64_t>& out) {
  constexpr int64_t kBlock = 4096;
  int64_t count = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    if (out.size() < size_t(count + (end - start))) out.resize(size_t(count + (end - start)) * 3 / 2 + 1024);
    int64_t* dst = out.data();
    for (int64_t i = start; i < end; ++i) {
      dst[count] = i;
      count += keys[i] <= threshold ? 1 : 0;
    }
  }
  return count;
}

}  // namespace

void SelectScratch::trim(size_t bytes) {
  release_if_larger(candidates, bytes);
  release_if_larger(quanta, bytes);
  release_if_larger(quanta_swap, bytes);
  release_if_larger(slots, bytes);
  release_if_larger(slots_swap, bytes);
}

bool smallest_in_order(const double* keys, int64_t n, int64_t k, int64_t* out, SelectScratch& s, double* next_key) {
  const double max_finite = std::numeric_limits<double>::max();
  double threshold = estimate_threshold(keys, n, k, s.sample);
  int64_t count = compact(keys, n, threshold, s.candidates);
  if (count < k && threshold < max_finite) {
    threshold = max_finite;
    count = compact(keys, n, threshold, s.candidates);
  }
  if (count < k) return false;
  const int64_t* cand = s.candidates.data();
  // The (k+1)-th smallest key. Outside the candidates every key exceeds the threshold, so
  // when exactly k keys passed it, the answer is the smallest key of all the others.
  auto smallest_outside = [&] {
    double smallest = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) smallest = keys[i] > threshold ? std::min(smallest, keys[i]) : smallest;
    return smallest;
  };
  if (k == 0) {
    if (next_key != nullptr) {
      double smallest = std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < count; ++j) smallest = std::min(smallest, keys[cand[j]]);
      *next_key = count > 0 ? smallest : smallest_outside();
    }
    return true;
  }
  if (count > int64_t(UINT32_MAX)) {  // beyond the 32-bit slots below: plain partial sort
    const int64_t sorted = std::min(count, k + 1);
    std::partial_sort(s.candidates.begin(), s.candidates.begin() + sorted, s.candidates.begin() + count,
                      [keys](int64_t a, int64_t b) { return keys[a] < keys[b] || (keys[a] == keys[b] && a < b); });
    std::copy(cand, cand + k, out);
    if (next_key != nullptr) *next_key = count > k ? keys[cand[k]] : smallest_outside();
    return true;
  }

  // Quantise the candidates' keys onto 32 bits over their own range (monotone, so sorting
  // the quanta sorts the keys up to ties inside one quantum, which are fixed below).
  double lo = keys[cand[0]], hi = lo;
  for (int64_t j = 1; j < count; ++j) {
    lo = std::min(lo, keys[cand[j]]);
    hi = std::max(hi, keys[cand[j]]);
  }
  const double top = 4294967295.0;
  const double scale = hi > lo ? top / (hi - lo) : 0.0;
  s.quanta.resize(size_t(count));
  s.slots.resize(size_t(count));
  s.quanta_swap.resize(size_t(count));
  s.slots_swap.resize(size_t(count));
  uint32_t* quanta = s.quanta.data();
  uint32_t* slots = s.slots.data();
  for (int64_t j = 0; j < count; ++j) {
    quanta[j] = uint32_t(std::min((keys[cand[j]] - lo) * scale, top));
    slots[j] = uint32_t(j);
  }

  // LSD radix sort; a digit shared by every candidate is skipped.
  std::vector<uint32_t> histogram(size_t(kDigits) * kBuckets, 0);
  for (int64_t j = 0; j < count; ++j) {
    for (int d = 0; d < kDigits; ++d) ++histogram[size_t(d) * kBuckets + ((quanta[j] >> (d * kDigitBits)) & (kBuckets - 1))];
  }
  uint32_t* quanta_out = s.quanta_swap.data();
  uint32_t* slots_out = s.slots_swap.data();
  for (int d = 0; d < kDigits; ++d) {
    uint32_t* counts = histogram.data() + size_t(d) * kBuckets;
    bool trivial = false;
    for (uint32_t b = 0; b < kBuckets; ++b) trivial = trivial || counts[b] == uint32_t(count);
    if (trivial) continue;
    uint32_t offset = 0;
    for (uint32_t b = 0; b < kBuckets; ++b) {
      uint32_t c = counts[b];
      counts[b] = offset;
      offset += c;
    }
    for (int64_t j = 0; j < count; ++j) {
      uint32_t pos = counts[(quanta[j] >> (d * kDigitBits)) & (kBuckets - 1)]++;
      quanta_out[pos] = quanta[j];
      slots_out[pos] = slots[j];
    }
    std::swap(quanta, quanta_out);
    std::swap(slots, slots_out);
  }

  // Candidates that share a quantum are ordered by their true keys. Only runs that reach
  // into the first k matter.
  auto true_key = [&](uint32_t slot) { return keys[cand[slot]]; };
  for (int64_t start = 0; start < k;) {
    int64_t end = start + 1;
    while (end < count && quanta[end] == quanta[start]) ++end;
    if (end - start > 1) {
      std::sort(slots + start, slots + end, [&](uint32_t a, uint32_t b) {
        return true_key(a) < true_key(b) || (true_key(a) == true_key(b) && cand[a] < cand[b]);
      });
    }
    start = end;
  }
  for (int64_t j = 0; j < k; ++j) out[j] = cand[slots[j]];
  if (next_key != nullptr) {
    if (count == k) {
      *next_key = smallest_outside();
    } else {
      // Position k starts or continues a run of equal quanta, possibly unsorted: its minimum.
      double smallest = true_key(slots[k]);
      for (int64_t j = k + 1; j < count && quanta[j] == quanta[k]; ++j) smallest = std::min(smallest, true_key(slots[j]));
      *next_key = smallest;
    }
  }
  return true;
}

}  // namespace isample
