// The GPU tree: the same layout, sums and descents as the CPU tree (common.h, descend.h),
// as __host__ __device__ functors run through Thrust. Included once by cuda_tree.cu (CUDA
// system) and once by host_tree.cpp (Thrust's OpenMP system, the build the tests run); the
// including file defines ISAMPLE_GPU_NS.
//
// No host synchronisation on the update / sample paths: every step is a Thrust algorithm,
// a CUB radix sort or an async memset on the caller's stream, Thrust runs with par_nosync,
// temporary storage comes from buffers the tree owns (grown, when a batch outgrows them,
// by stream-ordered cudaMallocAsync / cudaFreeAsync), and decisions that depend on the
// data (a rejected batch, a softmax rebase) are taken on the device by the kernels
// themselves.
//
// Launches per call, L = levels (6 at n = 1e7):
//   update (SumTree)        1 memset + validate + write + L level re-sums
//   update (SoftmaxTree)    the same + the prediction of the total (2 launches when
//                           k > kSumChunk) + 3 rebase kernels that exit at once unless a
//                           score left the exp(+-64) headroom
//   sample k, replace       1 (one thread per draw, full descent)
//   sample k, distinct      keys + radix sort (CUB) + output: O(n)
//
// A batch of k <= kScanBatch updates finds repeated indices and shared ancestors by
// scanning the batch (O(k) per thread, no sort); a larger batch is sorted once.
//
// Memory (bytes): the arrays, 8 per leaf slot + 8 per internal node (+ 8 per item of scores
// for a SoftmaxTree), held for the tree's life; scratch, held between calls unless above
// kKeepScratchBytes: a sorted batch 32 per item (+ CUB's temporary), a softmax update 16 per
// item, a draw without replacement 32 per item (keys, items and their alternates for the
// radix sort) + CUB's temporary, exactly (scratch_nbytes() reports what is held).
//
// Lifetime: every call records its stream; the destructor frees everything, with that
// tree's device current, stream-ordered on the last call's stream, so memory still used by
// queued work is not reused before that work has run. That stream must outlive the tree
// (torch's streams do).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/sequence.h>

#include "../common.h"
#include "../descend.h"
#include "../fastmath.h"
#include "device_tree_api.h"
#include "system.h"

namespace isample {
namespace ISAMPLE_GPU_NS {

constexpr int64_t kScanBatch = 256;
// The strided kernels (one pass over all n items: assign, load, rebase) give each worker at
// least this many items, and launch at most as many workers as the device holds threads.
// Every softmax update launches the rebase kernels, which exit at once unless a rebase is
// due: 256 items a worker keeps those launches small up to n ~ 1e7 (39,063 workers), while
// a tree of 1e8 or more gets every thread of the device for its rare O(n) passes.
constexpr int64_t kItemsPerWorker = 256;
// The prediction of a softmax total sums k values in chunks of at least this many.
constexpr int64_t kSumChunk = 256;
// Scratch above this many bytes is given back after the call that needed it (as the CPU
// tree does), so one large draw does not pin memory for the tree's lifetime.
constexpr size_t kKeepScratchBytes = size_t(64) << 20;
constexpr double kMaxExponent = 64.0;

enum ErrorCode : int32_t {
  kNoError = 0,
  kIndexOutOfRange = 1,
  kBadWeight = 2,
  kBadScore = 3,
  kBadUniform = 4,
  kAllZero = 5,
  kTooFewPositive = 6,
};

// Lives in the tree's memory; read by the host only in status() and check().
struct Control {
  double reference;    // softmax: the score whose leaf is exactly 1
  double temperature;  // softmax
  int64_t positive;    // leaves > 0
  int64_t counted;     // scratch for recounting `positive`
  int64_t error_position;
  double error_value;
  int32_t call_error;  // this call's input was bad: its later steps do nothing  } reset at the
  int32_t rebase;      // softmax: this call must move the reference             } start of a
  uint64_t largest;    // softmax rebase: order_key of the largest score         } call
  int32_t first_error; // sticky until check(): the code of the first error
  int32_t padding;
};

ISAMPLE_FN void record_error(Control* c, int32_t code, int64_t position, double value) {
  atomic_store(&c->call_error, 1);
  if (atomic_cas(&c->first_error, kNoError, code) == kNoError) {
    c->error_position = position;
    c->error_value = value;
  }
}

ISAMPLE_FN bool finite(double v) { return v - v == 0.0; }  // false for inf and NaN

struct View {
  TreeLayout layout;
  double* leaves;
  double* internal;
  double* scores;  // SoftmaxTree only
  Control* control;

  ISAMPLE_HD double* level(int l) const { return l == 0 ? leaves : internal + layout.level_offset[l]; }
  ISAMPLE_HD void resum(int l, int64_t node) const { level(l)[node] = node_sum(level(l - 1) + node * kFanout); }
};

// A batch of item indices, as given (small batches) or sorted once (large ones).
struct Batch {
  const int64_t* idx;  // items, in processing order
  const int64_t* pos;  // each one's position in the caller's arrays; null: the identity
  int64_t k;
  bool sorted;

  ISAMPLE_HD int64_t position(int64_t r) const { return pos != nullptr ? pos[r] : r; }
  // The last occurrence of its item writes it: a repeated index takes its last value.
  ISAMPLE_HD bool writes(int64_t r) const {
    if (sorted) return r + 1 == k || idx[r + 1] != idx[r];
    for (int64_t s = r + 1; s < k; ++s) {
      if (idx[s] == idx[r]) return false;
    }
    return true;
  }
  // The first entry under an ancestor re-sums it, so no node is written twice at once.
  ISAMPLE_HD bool owns(int64_t r, int shift) const {
    const int64_t ancestor = idx[r] >> shift;
    if (sorted) return r == 0 || (idx[r - 1] >> shift) != ancestor;
    for (int64_t s = 0; s < r; ++s) {
      if ((idx[s] >> shift) == ancestor) return false;
    }
    return true;
  }
};

// -- functors ------------------------------------------------------------------------------

struct ValidateBatch {
  View t;
  const int64_t* idx;
  const double* values;
  bool scores;        // true: finite scores; false: weights in [0, max_weight]
  double max_weight;  // keeps every sum finite: n * max_weight < DBL_MAX
  ISAMPLE_HD void operator()(int64_t j) const {
    const int64_t i = idx[j];
    if (i < 0 || i >= t.layout.capacity) {
      record_error(t.control, kIndexOutOfRange, j, double(i));
      return;
    }
    const double v = values[j];
    if (scores ? !finite(v) : !(v >= 0.0 && v <= max_weight)) record_error(t.control, scores ? kBadScore : kBadWeight, j, v);
  }
};

struct WriteWeights {
  View t;
  Batch b;
  const double* values;
  ISAMPLE_HD void operator()(int64_t r) const {
    if (t.control->call_error || !b.writes(r)) return;
    double& leaf = t.leaves[b.idx[r]];
    const double w = values[b.position(r)];
    const int64_t delta = int64_t(w > 0.0) - int64_t(leaf > 0.0);
    leaf = w;
    if (delta != 0) atomic_add(&t.control->positive, delta);
  }
};

// Also asks for a rebase (kept on the device) when a new score leaves the headroom, and
// records each written item's old and new leaf for PredictTotal.
struct WriteScores {
  View t;
  Batch b;
  const double* values;
  double keep;
  double* old_leaves;  // (k,): 0 for entries that do not write
  double* new_leaves;
  ISAMPLE_HD void operator()(int64_t r) const {
    old_leaves[r] = 0.0;
    new_leaves[r] = 0.0;
    if (t.control->call_error || !b.writes(r)) return;
    const int64_t i = b.idx[r];
    const double v = values[b.position(r)];
    const double s = keep == 0.0 ? v : keep * t.scores[i] + (1.0 - keep) * v;
    t.scores[i] = s;
    const double exponent = softmax_exponent(s, t.control->reference, t.control->temperature);
    if (!(exponent <= kMaxExponent)) atomic_store(&t.control->rebase, 1);
    // Past the headroom the leaf is provisional: the rebase later in this call rewrites it.
    const double leaf = exp_shared(exponent < 700.0 ? exponent : 700.0);
    old_leaves[r] = t.leaves[i];
    new_leaves[r] = leaf;
    const int64_t delta = int64_t(leaf > 0.0) - int64_t(t.leaves[i] > 0.0);
    t.leaves[i] = leaf;
    if (delta != 0) atomic_add(&t.control->positive, delta);
  }
};

// The total after a softmax update is
//   (total - sum of old leaves) + sum of new leaves
// up to rounding; if it may be below e^-64 (its lower bound is), ask for a rebase now, as
// the CPU tree does after re-summing (where it knows the total exactly). Conservative: it
// may rebase a little earlier than the CPU, never later. The two sums are taken in a
// shape fixed by k alone, so the decision is deterministic: k <= chunk values by one
// thread in order; more, by PredictPartial in groups of `chunk` consecutive values, then
// the groups' sums in order.
struct PredictPartial {
  const double* old_leaves;  // (k,)
  const double* new_leaves;
  int64_t k;
  int64_t chunk;
  int64_t groups;
  double* sums;  // (2 * groups,): removed, then added
  ISAMPLE_HD void operator()(int64_t g) const {
    const int64_t end = (g + 1) * chunk < k ? (g + 1) * chunk : k;
    double removed = 0.0, added = 0.0;
    for (int64_t r = g * chunk; r < end; ++r) {
      removed += old_leaves[r];
      added += new_leaves[r];
    }
    sums[g] = removed;
    sums[groups + g] = added;
  }
};

struct PredictTotal {
  View t;
  int64_t k;
  const double* removed_parts;  // (parts,): the old leaves, or PredictPartial's group sums
  const double* added_parts;
  int64_t parts;
  ISAMPLE_HD void operator()(int64_t) const {
    if (t.control->call_error) return;
    const double total = t.internal[0];
    double removed = 0.0, added = 0.0;
    for (int64_t p = 0; p < parts; ++p) {
      removed += removed_parts[p];
      added += added_parts[p];
    }
    const double predicted = (total - removed) + added;
    // Any order of summation of k terms errs by at most (k - 1) ulps of their magnitude.
    const double rounding = (total + removed + added) * double(k + 4 * kMaxLevels) * 0x1.0p-52;
    if (!(predicted - rounding >= exp_shared(-kMaxExponent))) atomic_store(&t.control->rebase, 1);
  }
};

// Re-sums, at `level`, the ancestors of the batch; or, when a rebase is under way, every
// node of the level (strided over the `threads` launched).
struct ResumLevel {
  View t;
  Batch b;
  int level;
  int64_t threads;
  ISAMPLE_HD void operator()(int64_t r) const {
    if (t.scores != nullptr && t.control->rebase) {
      for (int64_t node = r; node < t.layout.level_nodes[level]; node += threads) t.resum(level, node);
      return;
    }
    if (r >= b.k || t.control->call_error) return;
    const int shift = kFanoutLog2 * level;
    if (b.owns(r, shift)) t.resum(level, b.idx[r] >> shift);
  }
};

struct ResumAll {
  View t;
  int level;
  ISAMPLE_HD void operator()(int64_t node) const {
    if (!t.control->call_error) t.resum(level, node);
  }
};

// Rebase, step 1: the largest score, in two passes: each worker's over its stride, then
// an atomic max of the workers' (exact, so the order does not matter). The positive count
// is restarted.
struct RebaseMax {
  View t;
  int64_t workers;
  ISAMPLE_HD void operator()(int64_t w) const {
    if (!t.control->rebase) return;
    if (w == 0) t.control->counted = 0;
    double largest = -positive_infinity();
    for (int64_t i = w; i < t.layout.capacity; i += workers) largest = t.scores[i] > largest ? t.scores[i] : largest;
    atomic_max(&t.control->largest, order_key(largest));
  }
};

// Rebase, step 2: the reference becomes the largest score; every leaf is recomputed, and
// the positive leaves counted (each worker's count, then one atomic add per worker).
struct RebaseLeaves {
  View t;
  int64_t workers;
  ISAMPLE_HD void operator()(int64_t w) const {
    if (!t.control->rebase) return;
    const double reference = from_order_key(t.control->largest);
    const double temperature = t.control->temperature;
    int64_t positive = 0;
    for (int64_t i = w; i < t.layout.capacity; i += workers) {
      const double leaf = exp_shared(softmax_exponent(t.scores[i], reference, temperature));
      t.leaves[i] = leaf;
      positive += leaf > 0.0;
    }
    atomic_add(&t.control->counted, positive);
    if (w == 0) t.control->reference = reference;
  }
};

// After a rebase or a full assignment: the recount becomes the positive count.
struct CommitCount {
  View t;
  bool always;
  ISAMPLE_HD void operator()(int64_t) const {
    if (t.control->call_error) return;
    if (always || t.control->rebase) t.control->positive = t.control->counted;
  }
};

struct ValidateAll {
  View t;
  const double* values;
  bool scores;
  double max_weight;
  ISAMPLE_HD void operator()(int64_t i) const {
    const double v = values[i];
    if (scores ? !finite(v) : !(v >= 0.0 && v <= max_weight)) record_error(t.control, scores ? kBadScore : kBadWeight, i, v);
  }
};

// Copies all n values in (weights to the leaves, or scores), counting positive weights;
// nothing when the call's input was rejected.
struct CopyIn {
  View t;
  const double* values;
  int64_t workers;
  bool request_rebase;  // softmax assign: the reference moves to the new largest score
  ISAMPLE_HD void operator()(int64_t w) const {
    if (t.control->call_error) return;
    if (w == 0 && request_rebase) atomic_store(&t.control->rebase, 1);
    int64_t positive = 0;
    for (int64_t i = w; i < t.layout.capacity; i += workers) {
      if (t.scores != nullptr) {
        t.scores[i] = values[i];
      } else {
        t.leaves[i] = values[i];
        positive += values[i] > 0.0;
      }
    }
    if (t.scores == nullptr) atomic_add(&t.control->counted, positive);
  }
};

// Softmax load: leaves under the saved reference; a rebase follows if it breaks the headroom.
struct LoadLeaves {
  View t;
  double reference;
  int64_t workers;
  ISAMPLE_HD void operator()(int64_t w) const {
    if (t.control->call_error) return;
    if (w == 0) t.control->reference = reference;
    const double temperature = t.control->temperature;
    int64_t positive = 0;
    for (int64_t i = w; i < t.layout.capacity; i += workers) {
      const double exponent = softmax_exponent(t.scores[i], reference, temperature);
      if (!(exponent <= kMaxExponent)) atomic_store(&t.control->rebase, 1);
      const double leaf = exp_shared(exponent < 700.0 ? exponent : 700.0);
      t.leaves[i] = leaf;
      positive += leaf > 0.0;
    }
    atomic_add(&t.control->counted, positive);
  }
};

struct SetTemperature {
  View t;
  double temperature;
  ISAMPLE_HD void operator()(int64_t) const {
    t.control->temperature = temperature;
    t.control->rebase = 1;
  }
};

// A tiny total (descend.h) descends in the tree read as scaled by a power of two.
struct Draw {
  View t;
  uint64_t key;
  const double* uniforms;  // null: draw from stream `key`
  int64_t* out;
  ISAMPLE_HD void operator()(int64_t j) const {
    const double total = t.internal[0];
    const double u = uniforms != nullptr ? uniforms[j] : uniform_at(key, uint64_t(j));
    if (!(total > 0.0)) {
      record_error(t.control, kAllZero, j, total);
      out[j] = 0;
      return;
    }
    if (!(u >= 0.0 && u < 1.0)) {
      record_error(t.control, kBadUniform, j, u);
      out[j] = 0;
      return;
    }
    const double scale = tiny_total_scale(total);
    out[j] = scale == 1.0 ? descend(t.layout, t.internal, t.leaves, u * total)
                          : descend_scaled(t.layout, t.internal, t.leaves, u * (total * scale), scale);
  }
};

struct Gather {
  View t;
  const int64_t* idx;
  const double* source;
  bool normalise;  // divide by the total: probabilities
  double* out;
  ISAMPLE_HD void operator()(int64_t j) const {
    const int64_t i = idx[j];
    if (i < 0 || i >= t.layout.capacity) {
      record_error(t.control, kIndexOutOfRange, j, double(i));
      out[j] = not_a_number();
      return;
    }
    if (normalise && !(t.internal[0] > 0.0)) {
      record_error(t.control, kAllZero, j, t.internal[0]);
      out[j] = not_a_number();
      return;
    }
    out[j] = normalise ? source[i] / t.internal[0] : source[i];
  }
};

// The race in the log domain: key_i = log(E_i) - log(w_i) orders the items exactly as
// E_i / w_i does (the CPU's linear keys), and cannot overflow. A tiny total (descend.h)
// scales the weights by a power of two (exactly), as the CPU's log keys do, so that w e^tau
// stays finite in RaceOutput.
struct RaceKeys {
  View t;
  uint64_t key;
  double* keys;
  int64_t* items;
  ISAMPLE_HD void operator()(int64_t i) const {
    const double w = t.leaves[i] * tiny_total_scale(t.internal[0]);
    items[i] = i;
    const double exponential = -log_positive(open_uniform_at(key, uint64_t(i)));
    keys[i] = w > 0.0 ? log_positive(exponential) - log_positive(w) : positive_infinity();
  }
};

struct RaceOutput {
  View t;
  const double* keys;  // sorted
  const int64_t* items;
  int64_t k;
  int64_t* out;
  double* inclusion;
  ISAMPLE_HD void operator()(int64_t j) const {
    if (!(keys[k - 1] < positive_infinity())) {
      record_error(t.control, kTooFewPositive, k, double(k));
      out[j] = items[j];
      return;
    }
    out[j] = items[j];
    if (inclusion != nullptr) {
      // P(log E - log w < tau) = 1 - exp(-w e^tau), tau the (k+1)-th smallest key.
      const double tau = k < t.layout.capacity ? keys[k] : positive_infinity();
      const double w = t.leaves[items[j]] * tiny_total_scale(t.internal[0]);
      inclusion[j] = -std::expm1(-w * exp_shared(tau));
    }
  }
};

// -- the tree --------------------------------------------------------------------------------

class DeviceTree final : public DeviceTreeApi {
 public:
  // On CUDA device `device` (which the caller has made current), or the host build (-1).
  DeviceTree(int64_t capacity, bool softmax, double temperature, int device)
      : layout_(TreeLayout::for_capacity(capacity)),
        device_(device),
        device_threads_(device_threads(device)),
        softmax_(softmax) {
    const Stream s = Stream(0);
    last_stream_ = s;
    leaves_.reserve(size_t(layout_.leaf_slots), s);
    internal_.reserve(size_t(layout_.internal_slots), s);
    if (softmax) scores_.reserve(size_t(capacity), s);
    control_.reserve(1, s);
    zero_async(leaves_.data(), leaves_.bytes(), s);
    zero_async(internal_.data(), internal_.bytes(), s);
    zero_async(control_.data(), sizeof(Control), s);
    if (softmax) zero_async(scores_.data(), scores_.bytes(), s);
    Control initial{};
    initial.temperature = temperature;
    copy_async(control_.data(), &initial, sizeof(Control), s);
    if (softmax) {
      // All scores 0, reference 0: every leaf is exp(0) = 1. A rebase builds exactly that.
      run_rebase(Batch{nullptr, nullptr, 0, false}, s, /*force=*/true);
    }
    synchronise(s);  // a failed allocation or launch surfaces here, not in the first call
  }

  // Frees everything on the stream of the last call, with the tree's device current: the
  // frees are queued behind that call's work, so nothing it still reads or writes can be
  // handed to another user (another stream, torch's allocator) before it has run.
  ~DeviceTree() override {
    DeviceGuard guard(device_);
    for (Buffer<double>* b : {&leaves_, &internal_, &scores_, &leaf_changes_, &race_keys_, &race_keys_alt_}) {
      b->release(last_stream_);
    }
    for (Buffer<int64_t>* b : {&race_items_, &race_items_alt_, &batch_items_, &batch_items_alt_, &batch_positions_,
                               &batch_positions_alt_}) {
      b->release(last_stream_);
    }
    race_sort_temp_.release(last_stream_);
    batch_sort_temp_.release(last_stream_);
    control_.release(last_stream_);
  }

  int64_t capacity() const override { return layout_.capacity; }
  bool softmax() const override { return softmax_; }
  int levels() const override { return layout_.levels; }
  size_t nbytes() const override { return leaves_.bytes() + internal_.bytes() + scores_.bytes(); }
  size_t scratch_nbytes() const override {
    return leaf_changes_.bytes() + race_scratch_bytes() + batch_items_.bytes() + batch_items_alt_.bytes() +
           batch_positions_.bytes() + batch_positions_alt_.bytes() + batch_sort_temp_.bytes();
  }

  void update(const int64_t* indices, const double* values, int64_t k, double keep, uintptr_t stream) override {
    if (k < 0) throw std::invalid_argument("the number of updates must be >= 0");
    if (!(keep >= 0.0 && keep <= 1.0)) throw std::invalid_argument("keep must be in [0, 1]");
    if (keep != 0.0 && !softmax_) throw std::invalid_argument("keep applies to softmax trees only");
    if (k == 0) return;
    const Stream s = on(stream);
    begin_call(s);
    for_each(s, k, ValidateBatch{view(), indices, values, softmax_, max_weight()});
    const Batch batch = prepare_batch(indices, k, s);
    if (softmax_) {
      const int64_t chunk = std::max<int64_t>(kSumChunk, int64_t(std::ceil(std::sqrt(double(k)))));
      const int64_t groups = k > chunk ? (k + chunk - 1) / chunk : 0;
      leaf_changes_.reserve(2 * size_t(k) + 2 * size_t(groups), s, /*spare=*/true);
      double* old_leaves = leaf_changes_.data();
      double* new_leaves = old_leaves + k;
      for_each(s, k, WriteScores{view(), batch, values, keep, old_leaves, new_leaves});
      if (groups == 0) {
        for_each(s, 1, PredictTotal{view(), k, old_leaves, new_leaves, k});
      } else {
        double* sums = new_leaves + k;
        for_each(s, groups, PredictPartial{old_leaves, new_leaves, k, chunk, groups, sums});
        for_each(s, 1, PredictTotal{view(), k, sums, sums + groups, groups});
      }
      run_rebase(batch, s, /*force=*/false);
    } else {
      for_each(s, k, WriteWeights{view(), batch, values});
      resum_levels(batch, s, /*rebase_possible=*/false);
    }
    trim_batch_scratch(s);
  }

  void assign(const double* values, uintptr_t stream) override {
    const Stream s = on(stream);
    begin_call(s);
    const int64_t n = layout_.capacity;
    for_each(s, n, ValidateAll{view(), values, softmax_, max_weight()});
    zero_async(&control_.data()->counted, sizeof(int64_t), s);
    const int64_t workers = worker_count();
    for_each(s, workers, CopyIn{view(), values, workers, softmax_});
    if (softmax_) {
      run_rebase(Batch{nullptr, nullptr, 0, false}, s, /*force=*/false);  // CopyIn asked for it
    } else {
      for (int level = 1; level <= layout_.levels; ++level) for_each(s, layout_.level_nodes[level], ResumAll{view(), level});
      for_each(s, 1, CommitCount{view(), true});
    }
  }

  void load(const double* scores, double reference, uintptr_t stream) override {
    if (!softmax_) throw std::invalid_argument("load() is for softmax trees");
    if (!std::isfinite(reference)) throw std::invalid_argument("the reference must be finite");
    const Stream s = on(stream);
    begin_call(s);
    const int64_t n = layout_.capacity;
    for_each(s, n, ValidateAll{view(), scores, true, 0.0});
    zero_async(&control_.data()->counted, sizeof(int64_t), s);
    const int64_t workers = worker_count();
    for_each(s, workers, CopyIn{view(), scores, workers, false});
    for_each(s, workers, LoadLeaves{view(), reference, workers});
    for_each(s, 1, CommitCount{view(), true});
    run_rebase(Batch{nullptr, nullptr, 0, false}, s, /*force=*/false, /*full_levels=*/true);
  }

  void set_temperature(double temperature, uintptr_t stream) override {
    if (!softmax_) throw std::invalid_argument("set_temperature() is for softmax trees");
    if (!(temperature > 0.0 && std::isfinite(temperature))) throw std::invalid_argument("temperature must be a finite number > 0");
    const Stream s = on(stream);
    begin_call(s);
    for_each(s, 1, SetTemperature{view(), temperature});
    run_rebase(Batch{nullptr, nullptr, 0, false}, s, /*force=*/false);
  }

  void get(const int64_t* indices, int64_t k, double* out, uintptr_t stream) override {
    if (k < 0) throw std::invalid_argument("the number of indices must be >= 0");
    if (k == 0) return;
    for_each(on(stream), k, Gather{view(), indices, softmax_ ? scores_.data() : leaves_.data(), false, out});
  }

  void probability(const int64_t* indices, int64_t k, double* out, uintptr_t stream) override {
    if (k < 0) throw std::invalid_argument("the number of indices must be >= 0");
    if (k == 0) return;
    for_each(on(stream), k, Gather{view(), indices, leaves_.data(), true, out});
  }

  void sample_from_uniforms(const double* u, int64_t k, int64_t* out, uintptr_t stream) override {
    if (k < 0) throw std::invalid_argument("the number of uniforms must be >= 0");
    if (k > 0) for_each(on(stream), k, Draw{view(), 0, u, out});
  }

  void sample(uint64_t key, int64_t k, int64_t* out, uintptr_t stream) override {
    if (k < 0) throw std::invalid_argument("the number of draws must be >= 0");
    if (k > 0) for_each(on(stream), k, Draw{view(), key, nullptr, out});
  }

  void sample_distinct(uint64_t key, int64_t k, int64_t* out, double* inclusion, uintptr_t stream) override {
    const int64_t n = layout_.capacity;
    if (k < 0) throw std::invalid_argument("the number of draws must be >= 0");
    if (k > n) {
      throw std::invalid_argument("cannot draw " + std::to_string(k) + " distinct items from " + std::to_string(n));
    }
    if (k == 0) return;
    const Stream s = on(stream);
    const size_t temp_bytes = sort_temp_bytes<double, int64_t>(n, 64);
    try {
      race_keys_.reserve(size_t(n), s);
      race_keys_alt_.reserve(size_t(n), s);
      race_items_.reserve(size_t(n), s);
      race_items_alt_.reserve(size_t(n), s);
      race_sort_temp_.reserve(temp_bytes, s);
    } catch (...) {
      release_race_scratch(s);  // a partial reservation must not stay pinned
      throw;
    }
    for_each(s, n, RaceKeys{view(), key, race_keys_.data(), race_items_.data()});
    const auto sorted = sort_pairs(race_keys_.data(), race_keys_alt_.data(), race_items_.data(), race_items_alt_.data(),
                                   n, 64, race_sort_temp_.data(), temp_bytes, s);
    for_each(s, k, RaceOutput{view(), sorted.first, sorted.second, k, out, inclusion});
    if (race_scratch_bytes() > kKeepScratchBytes) release_race_scratch(s);
  }

  Status status(uintptr_t stream) override {
    const Stream s = on(stream);
    Control c{};
    double total = 0.0;
    copy_to_host(&c, control_.data(), sizeof(Control), s);
    copy_to_host(&total, internal_.data(), sizeof(double), s);
    return Status{total, c.reference, c.temperature, c.positive};
  }

  void export_values(double* host_out, bool scores, uintptr_t stream) override {
    const double* source = scores ? scores_.data() : leaves_.data();
    if (scores && !softmax_) throw std::invalid_argument("only softmax trees hold scores");
    copy_to_host(host_out, source, size_t(layout_.capacity) * sizeof(double), on(stream));
  }

  void check(uintptr_t stream) override {
    const Stream s = on(stream);
    Control c{};
    copy_to_host(&c, control_.data(), sizeof(Control), s);
    if (c.first_error == kNoError) return;
    zero_async(&control_.data()->first_error, sizeof(int32_t), s);
    synchronise(s);
    const std::string where = " (at position " + std::to_string(c.error_position) + ")";
    char value[64];
    std::snprintf(value, sizeof value, "%.17g", c.error_value);
    switch (c.first_error) {
      case kIndexOutOfRange:
        throw std::out_of_range("index " + std::string(value) + where + " is out of range for capacity " +
                                std::to_string(layout_.capacity));
      case kBadWeight:
        throw std::invalid_argument("weight " + std::string(value) + where +
                                    " is not a finite non-negative number (below DBL_MAX / 2n)");
      case kBadScore:
        throw std::invalid_argument("score " + std::string(value) + where + " is not finite");
      case kBadUniform:
        throw std::invalid_argument("uniform " + std::string(value) + where + " is not in [0, 1)");
      case kAllZero:
        throw std::invalid_argument("cannot sample: every weight is zero");
      case kTooFewPositive:
        throw std::invalid_argument("cannot draw " + std::string(value) +
                                    " distinct items: fewer have a positive weight");
      default:
        throw std::runtime_error("unknown device error code " + std::to_string(c.first_error));
    }
  }

 private:
  View view() const { return View{layout_, leaves_.data(), internal_.data(), scores_.data(), control_.data()}; }

  // The stream of this call, remembered for the destructor.
  Stream on(uintptr_t stream) {
    last_stream_ = Stream(stream);
    return last_stream_;
  }

  // Every sum stays finite when each weight is at most DBL_MAX / (2n).
  double max_weight() const {
    return std::numeric_limits<double>::max() / (2.0 * double(layout_.leaf_slots));
  }

  // Workers of the strided kernels: enough to fill the device, each with kItemsPerWorker
  // items or more (so a small tree launches few idle workers, and few atomics).
  int64_t worker_count() const {
    const int64_t wanted = (layout_.capacity + kItemsPerWorker - 1) / kItemsPerWorker;
    return std::max<int64_t>(1, std::min<int64_t>(device_threads_, wanted));
  }

  size_t race_scratch_bytes() const {
    return race_keys_.bytes() + race_keys_alt_.bytes() + race_items_.bytes() + race_items_alt_.bytes() +
           race_sort_temp_.bytes();
  }
  void release_race_scratch(Stream s) {
    race_keys_.release(s);
    race_keys_alt_.release(s);
    race_items_.release(s);
    race_items_alt_.release(s);
    race_sort_temp_.release(s);
  }
  // A huge sorted batch's scratch is given back once its call is queued.
  void trim_batch_scratch(Stream s) {
    if (leaf_changes_.bytes() > kKeepScratchBytes) leaf_changes_.release(s);
    const size_t batch = batch_items_.bytes() + batch_items_alt_.bytes() + batch_positions_.bytes() +
                         batch_positions_alt_.bytes() + batch_sort_temp_.bytes();
    if (batch > kKeepScratchBytes) {
      batch_items_.release(s);
      batch_items_alt_.release(s);
      batch_positions_.release(s);
      batch_positions_alt_.release(s);
      batch_sort_temp_.release(s);
    }
  }

  template <class F>
  void for_each(Stream s, int64_t count, const F& f) {
    thrust::for_each(policy(s), thrust::counting_iterator<int64_t>(0), thrust::counting_iterator<int64_t>(count), f);
    check_launch();
  }

  // Clears this call's error flag, the rebase request and the rebase's largest score (one
  // async memset).
  void begin_call(Stream s) {
    static_assert(offsetof(Control, rebase) == offsetof(Control, call_error) + sizeof(int32_t), "layout");
    static_assert(offsetof(Control, largest) == offsetof(Control, rebase) + sizeof(int32_t), "layout");
    zero_async(&control_.data()->call_error, 2 * sizeof(int32_t) + sizeof(uint64_t), s);
  }

  Batch prepare_batch(const int64_t* indices, int64_t k, Stream s) {
    if (k <= kScanBatch) return Batch{indices, nullptr, k, false};
    // Sort (item, position) pairs, stably (a radix sort), so that within one item the
    // positions stay in order; only the bits an index below the capacity can have.
    int index_bits = 1;
    while (index_bits < 63 && (int64_t(1) << index_bits) < layout_.capacity) ++index_bits;
    const size_t temp_bytes = sort_temp_bytes<int64_t, int64_t>(k, index_bits);
    batch_items_.reserve(size_t(k), s, /*spare=*/true);
    batch_items_alt_.reserve(size_t(k), s, /*spare=*/true);
    batch_positions_.reserve(size_t(k), s, /*spare=*/true);
    batch_positions_alt_.reserve(size_t(k), s, /*spare=*/true);
    batch_sort_temp_.reserve(temp_bytes, s, /*spare=*/true);
    copy_async(batch_items_.data(), indices, size_t(k) * sizeof(int64_t), s);
    thrust::sequence(policy(s), batch_positions_.data(), batch_positions_.data() + k);
    check_launch();
    const auto sorted = sort_pairs(batch_items_.data(), batch_items_alt_.data(), batch_positions_.data(),
                                   batch_positions_alt_.data(), k, index_bits, batch_sort_temp_.data(), temp_bytes, s);
    return Batch{sorted.first, sorted.second, k, true};
  }

  void resum_levels(const Batch& batch, Stream s, bool rebase_possible) {
    for (int level = 1; level <= layout_.levels; ++level) {
      const int64_t nodes = layout_.level_nodes[level];
      if (batch.k >= nodes) {
        for_each(s, nodes, ResumAll{view(), level});
      } else {
        const int64_t threads = rebase_possible ? std::max(batch.k, std::min(nodes, worker_count())) : batch.k;
        for_each(s, threads, ResumLevel{view(), batch, level, threads});
      }
    }
  }

  // The softmax rebase, decided on the device: the kernels do nothing unless the flag is
  // set (by WriteScores, PredictTotal, CopyIn, LoadLeaves or SetTemperature), or `force`
  // sets it here.
  void run_rebase(const Batch& batch, Stream s, bool force, bool full_levels = false) {
    if (force) {
      const int32_t one = 1;
      copy_async(&control_.data()->rebase, &one, sizeof(int32_t), s);
    }
    const int64_t workers = worker_count();
    for_each(s, workers, RebaseMax{view(), workers});
    for_each(s, workers, RebaseLeaves{view(), workers});
    for_each(s, 1, CommitCount{view(), false});
    if (full_levels) {
      for (int level = 1; level <= layout_.levels; ++level) for_each(s, layout_.level_nodes[level], ResumAll{view(), level});
    } else {
      resum_levels(batch, s, /*rebase_possible=*/true);
    }
  }

  TreeLayout layout_;
  int device_;              // CUDA device ordinal; unused by the host build
  int64_t device_threads_;  // threads the device holds at once (the strided kernels' cap)
  Stream last_stream_{};    // the stream of the last call: the destructor frees behind it
  Buffer<double> leaves_;
  Buffer<double> internal_;
  Buffer<double> scores_;
  Buffer<Control> control_;
  // scratch
  Buffer<double> leaf_changes_;  // softmax update: old and new leaves, then group sums
  Buffer<double> race_keys_, race_keys_alt_;
  Buffer<int64_t> race_items_, race_items_alt_;
  Buffer<char> race_sort_temp_;
  Buffer<int64_t> batch_items_, batch_items_alt_, batch_positions_, batch_positions_alt_;
  Buffer<char> batch_sort_temp_;
  bool softmax_;
};

}  // namespace ISAMPLE_GPU_NS
}  // namespace isample
