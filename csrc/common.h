// Shared definitions for the host (g++) and device (nvcc) builds of isample's trees.
//
// Tree layout (fan-out B = kFanout = 16; n = 40 leaves shown with B = 4 for brevity):
//
//   level 2 (root)          [r . . .]                       one node, block padded to B
//   level 1           [a  b  c  .]                          a = sum(leaf 0..3), ...
//   level 0 (leaves)  [0 1 2 3][4 5 6 7][8 9 10 11] ...     padded with zeros to a multiple of B
//
// Node j of level l is the sum of children j*B .. j*B+B-1 of level l-1, computed by
// node_sum() in one fixed association. Every node is always *recomputed* from its children
// (never adjusted by a delta), so sums never drift and a remove-then-restore leaves the
// tree bit-for-bit unchanged. Each level starts on a B-aligned offset, so one child block
// is exactly two 64-byte cache lines.
//
// Memory: 8 bytes per leaf plus 8/(B-1) bytes per leaf of internal nodes = ~8.53 bytes/item.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ISAMPLE_HD __host__ __device__
#else
#define ISAMPLE_HD
#endif

// Shared routines get internal linkage: the CPU kernels are compiled once per instruction
// set, and an inline function with external linkage would let the linker keep one build's
// copy (say the AVX2 one) for every caller.
#define ISAMPLE_FN ISAMPLE_HD static inline

namespace isample {

constexpr int kFanout = 16;
constexpr int kFanoutLog2 = 4;
static_assert((1 << kFanoutLog2) == kFanout, "kFanout must be 2^kFanoutLog2");

// 16 levels of fan-out 16 address 2^64 leaves: more than any capacity we accept.
constexpr int kMaxLevels = 16;

// Largest capacity accepted: indices are int64 and the padded leaf count must not overflow.
constexpr int64_t kMaxCapacity = int64_t(1) << 40;

// Usable in device code, unlike std::numeric_limits' (host-only) constexpr functions.
ISAMPLE_FN double positive_infinity() { return __builtin_huge_val(); }
ISAMPLE_FN double not_a_number() { return __builtin_nan(""); }

ISAMPLE_FN int64_t round_up_to_block(int64_t x) {
  return (x + kFanout - 1) / kFanout * kFanout;
}

// Sizes and offsets of every level; a plain struct so it can be passed to a kernel by value.
struct TreeLayout {
  int64_t capacity = 0;       // n, the number of real items
  int64_t leaf_slots = 0;     // n rounded up to a multiple of B
  int levels = 0;             // internal levels, the root's included (>= 1)
  int64_t level_nodes[kMaxLevels + 1] = {};   // [l] nodes on level l (l = 1 .. levels)
  int64_t level_offset[kMaxLevels + 1] = {};  // [l] where level l starts in the internal buffer
  int64_t internal_slots = 0;                 // size of the internal buffer, in doubles

  // Root is level `levels`, at internal offset 0; lower levels follow, each B-aligned.
  static TreeLayout for_capacity(int64_t capacity) {
    TreeLayout t;
    t.capacity = capacity;
    t.leaf_slots = round_up_to_block(capacity < 1 ? 1 : capacity);
    int64_t below = t.leaf_slots;
    int l = 0;
    while (true) {
      ++l;
      int64_t nodes = below / kFanout;
      t.level_nodes[l] = nodes;
      if (nodes == 1) break;
      below = round_up_to_block(nodes);
    }
    t.levels = l;
    int64_t offset = 0;
    for (int level = t.levels; level >= 1; --level) {
      t.level_offset[level] = offset;
      offset += round_up_to_block(t.level_nodes[level]);
    }
    t.internal_slots = offset;
    return t;
  }
};

}  // namespace isample
