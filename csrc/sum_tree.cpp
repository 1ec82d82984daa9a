#include "sum_tree.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#include "cpu_kernels.h"
#include "descend.h"
#include "fastmath.h"
#include "select.h"

namespace isample {
namespace {

// Descents are processed in chunks so their per-level state stays in L1.
constexpr int kChunk = 256;

// Scratch above this size is released after the call instead of kept for the next one.
constexpr size_t kKeepScratchBytes = size_t(64) << 20;

std::string number_text(double v) {
  char text[64];
  std::snprintf(text, sizeof text, "%.17g", v);
  return text;
}

void check_count(int64_t k, const char* what) {
  if (k < 0) throw std::invalid_argument(std::string(what) + " must be >= 0, got " + std::to_string(k));
}

// The smallest of a block's 16 values; of a leaf block (Leaves), the smallest positive one,
// zeros counting as +inf (they are never drawn). Blocks are 64-byte aligned; no value is NaN.
template <bool Leaves>
inline double block_min(const double* c) {
#if defined(__SSE2__)
  const __m128d infinity = _mm_set1_pd(std::numeric_limits<double>::infinity()), zero = _mm_setzero_pd();
  __m128d m[2] = {infinity, infinity};
  for (int j = 0; j < kFanout; j += 4) {
    for (int h = 0; h < 2; ++h) {
      __m128d v = _mm_load_pd(c + j + 2 * h);
      if (Leaves) {
        const __m128d positive = _mm_cmpgt_pd(v, zero);
        v = _mm_or_pd(_mm_and_pd(positive, v), _mm_andnot_pd(positive, infinity));
      }
      m[h] = _mm_min_pd(m[h], v);
    }
  }
  const __m128d both = _mm_min_pd(m[0], m[1]);
  return std::min(_mm_cvtsd_f64(both), _mm_cvtsd_f64(_mm_unpackhi_pd(both, both)));
#else
  double m = std::numeric_limits<double>::infinity();
  for (int j = 0; j < kFanout; ++j) {
    const double v = Leaves && !(c[j] > 0.0) ? std::numeric_limits<double>::infinity() : c[j];
    m = v < m ? v : m;
  }
  return m;
#endif
}

}  // namespace

SumTree::SumTree(int64_t capacity) {
  if (capacity < 1 || capacity > kMaxCapacity) {
    throw std::invalid_argument("capacity must be between 1 and 2^40, got " + std::to_string(capacity));
  }
  layout_ = TreeLayout::for_capacity(capacity);
  double bytes = double(layout_.leaf_slots + layout_.internal_slots) * sizeof(double);
  check_fits_in_memory(bytes, "a tree of capacity " + std::to_string(capacity));
  try {
    leaves_ = AlignedBuffer(size_t(layout_.leaf_slots));
    internal_ = AlignedBuffer(size_t(layout_.internal_slots));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("could not allocate " + format_bytes(bytes) + " for a tree of capacity " +
                      std::to_string(capacity));
  }
}

size_t SumTree::nbytes() const {
  return (leaves_.size() + internal_.size() + min_internal_.size()) * sizeof(double);
}

void SumTree::track_min() {
  if (tracks_min()) return;
  const double bytes = double(layout_.internal_slots) * sizeof(double);
  check_fits_in_memory(bytes, "the min over children of a tree of capacity " + std::to_string(layout_.capacity));
  try {
    min_internal_ = AlignedBuffer(size_t(layout_.internal_slots));
  } catch (const std::bad_alloc&) {
    throw OutOfMemory("could not allocate " + format_bytes(bytes) + " for the min over children of a tree of capacity " +
                      std::to_string(layout_.capacity));
  }
  rebuild_min();
}

double SumTree::min_positive() const {
  if (!tracks_min()) throw std::logic_error("min_positive() needs track_min() first");
  return min_internal_[0];  // the root
}

void SumTree::rebuild_min() {
  if (!tracks_min()) return;
  double* m = min_internal_.data();
  std::fill(m, m + layout_.internal_slots, std::numeric_limits<double>::infinity());  // padding: +inf
  for (int64_t p = 0; p < layout_.level_nodes[1]; ++p) m[layout_.level_offset[1] + p] = block_min<true>(leaves_.data() + p * kFanout);
  for (int level = 2; level <= layout_.levels; ++level) {
    const double* below = m + layout_.level_offset[level - 1];
    double* out = m + layout_.level_offset[level];
    for (int64_t p = 0; p < layout_.level_nodes[level]; ++p) out[p] = block_min<false>(below + p * kFanout);
  }
}

// Level by level, as propagate(), in chunks of leaves so that nothing is allocated (this runs
// between writing leaves and returning, where an allocation failure would leave the tree
// half updated). Each chunk leaves every ancestor of its leaves re-computed from children
// that are final, so after the last chunk every touched node is.
void SumTree::propagate_min(const int64_t* leaf_indices, int64_t k) {
  constexpr int64_t kMinChunk = 256;
  int64_t nodes[kMinChunk];
  double* m = min_internal_.data();
  for (int64_t start = 0; start < k; start += kMinChunk) {
    const int64_t c = std::min(kMinChunk, k - start);
    const int64_t* children = leaf_indices + start;
    for (int level = 1; level <= layout_.levels; ++level) {
      double* out = m + layout_.level_offset[level];
      const double* below = level == 1 ? leaves_.data() : m + layout_.level_offset[level - 1];
      if (c >= layout_.level_nodes[level]) {  // as many leaves as nodes: every node of the rest
        for (int rest = level; rest <= layout_.levels; ++rest) {
          double* to = m + layout_.level_offset[rest];
          const double* from = rest == 1 ? leaves_.data() : m + layout_.level_offset[rest - 1];
          for (int64_t p = 0; p < layout_.level_nodes[rest]; ++p) {
            to[p] = rest == 1 ? block_min<true>(from + p * kFanout) : block_min<false>(from + p * kFanout);
          }
        }
        break;
      }
      for (int64_t j = 0; j < c; ++j) {
        const int64_t node = children[j] >> kFanoutLog2;
        nodes[j] = node;
        out[node] = level == 1 ? block_min<true>(below + node * kFanout) : block_min<false>(below + node * kFanout);
      }
      children = nodes;
    }
  }
}

void SumTree::check_indices(const int64_t* indices, int64_t k) const {
  const int64_t n = layout_.capacity;
  for (int64_t j = 0; j < k; ++j) {
    if (indices[j] < 0 || indices[j] >= n) {
      throw std::out_of_range("index " + std::to_string(indices[j]) + " (at position " +
                              std::to_string(j) + ") is out of range for capacity " +
                              std::to_string(n));
    }
  }
}

// Splits [0, count) into two halves run on two threads, where count is at least
// parallel_blocks() and the machine has two cores; otherwise, or when no thread can be had,
// runs f(0, count) here. f must not throw.
// A thread costs ~30 us to start and a block of 16 items ~10 ns to load, but on a VM the
// second thread now and then waits ~80 ms for its core (2-core AMD EPYC KVM guest: a 10M
// build took 10 ms typically and ~90 ms in such spells, 15 ms every time on one thread;
// the same spells showed with plain std::thread and memset). So two threads only from 2^21
// blocks (33.5M items), where one thread takes over 50 ms and a spell costs less than the
// split saves.
static std::atomic<int64_t> parallel_from{int64_t(1) << 21};

int64_t set_parallel_blocks(int64_t blocks) { return parallel_from.exchange(blocks < 1 ? 1 : blocks); }

template <class F>
void in_two_halves(int64_t count, F f) {
  if (count >= parallel_from.load(std::memory_order_relaxed) && std::thread::hardware_concurrency() >= 2) {
    const int64_t half = count / 2;
    std::thread other;
    try {
      other = std::thread([&f, half, count] { f(half, count); });
    } catch (const std::system_error&) {
      f(0, count);
      return;
    }
    f(0, half);
    other.join();
    return;
  }
  f(0, count);
}

// Throws for a weight that is not finite and >= 0, naming the first; returns the largest.
static double check_weights(const double* weights, int64_t k) {
  bool ok[2] = {true, true};
  double largest[2] = {0.0, 0.0};
  const int64_t blocks = k / kFanout;  // halves split on whole blocks
  in_two_halves(blocks, [&](int64_t first, int64_t last) {
    const int64_t end = last == blocks ? k : last * kFanout;
    const int half = first != 0;
    ok[half] = cpu_kernels().scan_weights(weights + first * kFanout, end - first * kFanout, &largest[half]);
  });
  if (!(ok[0] && ok[1])) {
    for (int64_t j = 0; j < k; ++j) {
      const double w = weights[j];
      if (!(w >= 0.0 && w <= std::numeric_limits<double>::max())) {
        throw std::invalid_argument("weight " + number_text(w) + " (at position " + std::to_string(j) +
                                    ") is not a finite non-negative number");
      }
    }
  }
  return std::max(largest[0], largest[1]);
}

void SumTree::rebuild_internal() {
  int64_t positive[2] = {0, 0};
  double* level1 = internal_.data() + layout_.level_offset[1];
  in_two_halves(layout_.level_nodes[1], [&](int64_t first, int64_t last) {
    positive[first != 0] = cpu_kernels().sum_leaves(leaves_.data(), first, last, level1);
  });
  rebuild_above_level1();
  num_positive_ = positive[0] + positive[1];
  rebuild_min();
}

void SumTree::load(const double* weights) {
  int64_t positive[2] = {0, 0};
  double* level1 = internal_.data() + layout_.level_offset[1];
  in_two_halves(layout_.level_nodes[1], [&](int64_t first, int64_t last) {
    positive[first != 0] = cpu_kernels().load_leaves(weights, layout_.capacity, first, last, leaves_.data(), level1);
  });
  rebuild_above_level1();
  num_positive_ = positive[0] + positive[1];
  rebuild_min();
}

void SumTree::rebuild_above_level1() {
  for (int level = 2; level <= layout_.levels; ++level) {
    cpu_kernels().recompute_level(layout_, internal_.data(), leaves_.data(), level);
  }
}

void SumTree::propagate(const int64_t* leaf_indices, int64_t k) {
  node_scratch_.resize(size_t(k));
  cpu_kernels().propagate(layout_, internal_.data(), leaves_.data(), leaf_indices, k, node_scratch_.data());
  if (tracks_min()) propagate_min(leaf_indices, k);
}

void SumTree::propagate_one(int64_t leaf) {
  cpu_kernels().propagate_one(layout_, internal_.data(), leaves_.data(), leaf);
  if (tracks_min()) propagate_min(&leaf, 1);
}

void SumTree::write_unchecked(const int64_t* indices, const double* weights, int64_t k) {
  double* leaves = leaves_.data();
  for (int64_t j = 0; j < k; ++j) {
    double& leaf = leaves[indices[j]];
    num_positive_ += int64_t(weights[j] > 0.0) - int64_t(leaf > 0.0);
    leaf = weights[j];
  }
  propagate(indices, k);
}

void SumTree::update(const int64_t* indices, const double* weights, int64_t k) {
  check_count(k, "the number of updates");
  check_indices(indices, k);
  const double largest = check_weights(weights, k);
  // Replacing weights can only lower the old part of the total, so while total + k * largest
  // is far from DBL_MAX the new total is finite and nothing needs to be kept for a rollback.
  if (total() + double(k) * largest <= std::numeric_limits<double>::max() / 2) {
    write_unchecked(indices, weights, k);
    return;
  }
  value_scratch_.resize(size_t(k));
  const int64_t positive_before = num_positive_;
  double* leaves = leaves_.data();
  for (int64_t j = 0; j < k; ++j) value_scratch_[j] = leaves[indices[j]];
  write_unchecked(indices, weights, k);
  if (std::isfinite(total())) return;
  // The new total overflows: put back every leaf as it was before the call, re-sum, refuse.
  for (int64_t j = 0; j < k; ++j) leaves[indices[j]] = value_scratch_[j];
  propagate(indices, k);
  num_positive_ = positive_before;
  throw std::invalid_argument("these weights would make the total overflow to inf");
}

void SumTree::assign(const double* weights) {
  const int64_t n = layout_.capacity;
  const double largest = check_weights(weights, n);  // reads only: a rejected call changes nothing
  // The exact sum is at most n * largest; below DBL_MAX / 2 the rounded tree sums cannot
  // overflow, so the common case writes in place, in one pass over the weights. Otherwise
  // build aside and swap on success.
  if (largest * double(n) <= std::numeric_limits<double>::max() / 2) {
    load(weights);
    return;
  }
  SumTree fresh(n);
  fresh.load(weights);
  if (!std::isfinite(fresh.total())) {
    throw std::invalid_argument("these weights would make the total overflow to inf");
  }
  leaves_.swap(fresh.leaves_);
  internal_.swap(fresh.internal_);
  num_positive_ = fresh.num_positive_;
  rebuild_min();
}

void SumTree::get(const int64_t* indices, int64_t k, double* out) const {
  check_count(k, "the number of indices");
  check_indices(indices, k);
  for (int64_t j = 0; j < k; ++j) out[j] = leaves_[indices[j]];
}

void SumTree::probability(const int64_t* indices, int64_t k, double* out) const {
  check_count(k, "the number of indices");
  check_indices(indices, k);
  const double sum = total();
  if (!(sum > 0.0)) throw std::invalid_argument("probabilities are undefined: every weight is zero");
  for (int64_t j = 0; j < k; ++j) out[j] = leaves_[indices[j]] / sum;
}

void SumTree::descend_chunk(double* target, int64_t* node, int m) const {
  cpu_kernels().descend_chunk(layout_, internal_.data(), leaves_.data(), target, node, m);
}

void SumTree::sample_from_uniforms(const double* u, int64_t k, int64_t* out) const {
  check_count(k, "the number of uniforms");
  for (int64_t j = 0; j < k; ++j) {
    if (!(u[j] >= 0.0 && u[j] < 1.0)) {
      throw std::invalid_argument("uniform " + number_text(u[j]) + " (at position " + std::to_string(j) +
                                  ") is not in [0, 1)");
    }
  }
  const double sum = total();
  if (k > 0 && !(sum > 0.0)) throw std::invalid_argument("cannot sample: every weight is zero");
  const double scale = tiny_total_scale(sum);
  if (scale != 1.0) {
    for (int64_t j = 0; j < k; ++j) out[j] = descend_tiny(u[j]);
    return;
  }
  double target[kChunk];
  for (int64_t start = 0; start < k; start += kChunk) {
    int m = int(std::min<int64_t>(kChunk, k - start));
    for (int j = 0; j < m; ++j) target[j] = u[start + j] * sum;
    descend_chunk(target, out + start, m);
  }
}

int64_t SumTree::descend_tiny(double u) const {
  const double scale = tiny_total_scale(total());
  return descend_scaled(layout_, internal_.data(), leaves_.data(), u * (total() * scale), scale);
}

void SumTree::sample_with_replacement(uint64_t key, int64_t k, int64_t* out) const {
  check_count(k, "the number of draws");
  const double sum = total();
  if (k > 0 && !(sum > 0.0)) throw std::invalid_argument("cannot sample: every weight is zero");
  if (tiny_total_scale(sum) != 1.0) {
    for (int64_t j = 0; j < k; ++j) out[j] = descend_tiny(uniform_at(key, uint64_t(j)));
    return;
  }
  double target[kChunk];
  for (int64_t start = 0; start < k; start += kChunk) {
    int m = int(std::min<int64_t>(kChunk, k - start));
    cpu_kernels().uniform_targets(key, uint64_t(start), m, sum, target);
    descend_chunk(target, out + start, m);
  }
}

void SumTree::sample_without_replacement(uint64_t key, int64_t k, int64_t* out, DistinctMethod method) {
  check_count(k, "the number of draws");
  if (k > num_positive_) {
    throw std::invalid_argument("cannot draw " + std::to_string(k) + " distinct items: only " +
                                std::to_string(num_positive_) + " have a positive weight");
  }
  if (k == 0) return;
  // A tiny total always takes the race, which handles it exactly (see sample_by_race);
  // "removal" then gives the same distribution, as the two methods always do.
  const bool race = method == DistinctMethod::kRace || tiny_total_scale(total()) != 1.0 ||
                    (method == DistinctMethod::kAuto && race_is_cheaper(k));
  if (race) {
    sample_by_race(key, k, out);
  } else {
    sample_by_rejection_and_removal(key, k, out);
  }
}

bool SumTree::race_is_cheaper(int64_t k) const {
  // Measured (an AMD EPYC, AVX2 kernels; n = 1e4 .. 1e6): the two cost the same where
  // k * levels is 0.35 to 0.5 of n (the race skips most items' logarithms, a removal draw
  // costs ~7 ns per level), so the race is taken above 0.4 n.
  return double(k) * double(layout_.levels) * 2.5 > double(layout_.capacity);
}

// Exponential race (Efraimidis-Spirakis): with E_i ~ Exp(1), the items in increasing order
// of E_i / w_i are a successive sample. Keys are E_i / p_i with p_i = w_i / total; a key
// that overflows belongs to an item that could only be drawn after every finite-key item,
// so the linear keys are exact whenever k of them are finite. Otherwise the keys are
// recomputed in the log domain, log(E_i) - log(w_i), which cannot overflow. A tiny total
// (where 1 / total may be inf) goes straight to the log domain, on the weights scaled by
// tiny_total_scale (exactly), so that w e^tau in the inclusion probabilities stays finite.
void SumTree::sample_by_race(uint64_t key, int64_t k, int64_t* out, double* inclusion) {
  const int64_t n = layout_.capacity;
  const double inverse_total = 1.0 / total();
  const double scale = tiny_total_scale(total());
  double tau = 0.0;
  double* next_key = inclusion != nullptr ? &tau : nullptr;
  bool linear = scale == 1.0;
  if (linear && !race_by_candidates(key, k, out, next_key)) {
    race_keys_.resize(size_t(n));
    cpu_kernels().race_keys(leaves_.data(), n, key, inverse_total, race_keys_.data());
    linear = smallest_in_order(race_keys_.data(), n, k, out, select_scratch_, next_key);
  }
  if (!linear) {
    race_keys_.resize(size_t(n));
    cpu_kernels().race_log_keys(leaves_.data(), n, key, scale, race_keys_.data());
    smallest_in_order(race_keys_.data(), n, k, out, select_scratch_, next_key);
  }
  if (inclusion != nullptr) {
    // P(E / p < tau) = 1 - exp(-p tau) for linear keys; P(log E - log w < tau) = 1 - exp(-w e^tau).
    const double* leaves = leaves_.data();
    for (int64_t j = 0; j < k; ++j) {
      const double rate = linear ? leaves[out[j]] * inverse_total * tau : (leaves[out[j]] * scale) * exp_shared(tau);
      inclusion[j] = -std::expm1(-rate);
    }
  }
  if (race_keys_.capacity() * sizeof(double) > kKeepScratchBytes) std::vector<double>().swap(race_keys_);
  select_scratch_.trim(kKeepScratchBytes);
}

// The linear race without most of its keys: a threshold from the keys of an evenly spread
// sample (with the margin that almost always keeps k + 1 items below it), then only the
// items whose keys fall below it (race_candidates skips the logarithm of the others). The
// same items, keys and order as the full race; false (nothing written) where it cannot
// tell: small n, a threshold that keeps everything, or too few items below it.
bool SumTree::race_by_candidates(uint64_t key, int64_t k, int64_t* out, double* next_key) {
  const int64_t n = layout_.capacity;
  if (!threshold_pays(n)) return false;
  const double inverse_total = 1.0 / total();
  const double* leaves = leaves_.data();
  SelectScratch& s = select_scratch_;
  s.sample.resize(size_t(kThresholdSample));
  for (int64_t j = 0; j < kThresholdSample; ++j) {
    const int64_t i = sample_position(j, n);
    s.sample[j] = -log_positive(open_uniform_at(key, uint64_t(i))) / (leaves[i] * inverse_total);  // race_keys' key
  }
  const double threshold = threshold_from_sample(s.sample.data(), n, k);
  if (!(threshold < std::numeric_limits<double>::max())) return false;
  if (s.candidates.size() < size_t(n)) {  // grown once, kept (up to kKeepScratchBytes) for the next calls
    s.candidates.resize(size_t(n));
    s.candidate_keys.resize(size_t(n));
  }
  const int64_t count =
      cpu_kernels().race_candidates(leaves, n, key, inverse_total, threshold, s.candidates.data(), s.candidate_keys.data());
  // With exactly k below the threshold, the (k + 1)-th key lies outside: the full race finds it.
  if (count < k || (count == k && next_key != nullptr)) return false;
  smallest_of_candidates(s.candidates.data(), s.candidate_keys.data(), count, k, out, s, next_key);
  return true;
}

void SumTree::sample_with_inclusion(uint64_t key, int64_t k, int64_t* out, double* inclusion) {
  check_count(k, "the number of draws");
  if (k > num_positive_) {
    throw std::invalid_argument("cannot draw " + std::to_string(k) + " distinct items: only " +
                                std::to_string(num_positive_) + " have a positive weight");
  }
  if (k > 0) sample_by_race(key, k, out, inclusion);
}

// Draws i.i.d. candidates in batches and keeps each first occurrence: the first k distinct
// values of an i.i.d. sequence are exactly a successive sample. When too many candidates
// repeat (the kept items hold much of the mass), switches to removal: the kept items are
// zeroed in the tree and each further draw removes its item, so it is drawn from the rest.
// Every removed leaf is restored before returning.
void SumTree::sample_by_rejection_and_removal(uint64_t key, int64_t k, int64_t* out) {
  int64_t slots = 64;
  while (slots < 2 * k) slots *= 2;
  set_scratch_.assign(size_t(slots), -1);
  value_scratch_.resize(size_t(k));
  node_scratch_.resize(size_t(k));  // propagate() below must not allocate mid-call
  const uint64_t mask = uint64_t(slots - 1);
  auto insert = [&](int64_t item) {
    uint64_t slot = mix64(uint64_t(item)) & mask;
    while (set_scratch_[slot] != -1) {
      if (set_scratch_[slot] == item) return false;
      slot = (slot + 1) & mask;
    }
    set_scratch_[slot] = item;
    return true;
  };

  int64_t accepted = 0;
  uint64_t drawn = 0;  // position in the stream
  double target[kChunk];
  int64_t node[kChunk];
  const double sum = total();
  while (accepted < k) {
    int m = int(std::min<int64_t>(kChunk, k - accepted));
    cpu_kernels().uniform_targets(key, drawn, m, sum, target);
    drawn += uint64_t(m);
    descend_chunk(target, node, m);
    int repeats = 0;
    for (int j = 0; j < m && accepted < k; ++j) {
      if (insert(node[j])) {
        out[accepted++] = node[j];
      } else {
        ++repeats;
      }
    }
    if (2 * repeats > m) break;
  }
  if (accepted == k) return;

  const int64_t positive_before = num_positive_;
  double* leaves = leaves_.data();
  for (int64_t j = 0; j < accepted; ++j) {
    value_scratch_[j] = leaves[out[j]];
    leaves[out[j]] = 0.0;
  }
  propagate(out, accepted);
  while (accepted < k) {
    int64_t leaf = descend(layout_, internal_.data(), leaves, uniform_at(key, drawn++) * total());
    value_scratch_[accepted] = leaves[leaf];
    leaves[leaf] = 0.0;
    propagate_one(leaf);
    out[accepted++] = leaf;
  }
  for (int64_t j = 0; j < k; ++j) leaves[out[j]] = value_scratch_[j];
  propagate(out, k);
  num_positive_ = positive_before;
}

}  // namespace isample
