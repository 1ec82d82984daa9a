// Branch-free elementary functions shared by the CPU trees and the GPU kernels, so that
// both compute the same bits: libm's and CUDA's own exp / log are each accurate to about an
// ulp, but not the same ulp, so a softmax leaf or a race key could differ in its last bit
// between the CPU and the GPU. Each is fdlibm's algorithm written with selects instead of
// branches, so compilers vectorise the O(n) loops over items, and made only of IEEE-754
// additions, multiplications and divisions (correctly rounded on every back end; the
// builds forbid fused multiply-adds: -ffp-contract=off, nvcc --fmad=false).
//
//   log_positive(x)   natural logarithm, finite x > 0 (the exponential race's keys)
//   exp_shared(x)     e^x for any double (softmax leaves, inclusion probabilities)
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace isample {

ISAMPLE_FN uint64_t double_bits(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

ISAMPLE_FN double bits_double(uint64_t bits) {
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// mask ? a : b, for a mask of all ones or all zeros.
ISAMPLE_FN double blend(uint64_t mask, double a, double b) {
  return bits_double((double_bits(a) & mask) | (double_bits(b) & ~mask));
}

// Natural logarithm. Same algorithm as fdlibm's __ieee754_log. Error < 1 ulp for finite
// x > 0, subnormals included; the caller never passes 0, negatives, inf or NaN.
ISAMPLE_FN double log_positive(double x) {
  const double ln2_hi = 6.93147180369123816490e-01;
  const double ln2_lo = 1.90821492927058770002e-10;
  const double lg1 = 6.666666666666735130e-01, lg2 = 3.999999999940941908e-01;
  const double lg3 = 2.857142874366239149e-01, lg4 = 2.222219843214978396e-01;
  const double lg5 = 1.818357216161805012e-01, lg6 = 1.531383769920937332e-01;
  const double lg7 = 1.479819860511658591e-01;

  // No branches: both sides of each choice are computed and blended with a bit mask, so
  // the loop over items vectorises even under -ftrapping-math (which forbids compilers to
  // if-convert a floating-point operation done on one side only), and no int64 -> double
  // conversion is needed (AVX2 has none).
  // Subnormals: scale by 2^54 into the normal range first.
  const uint64_t subnormal = uint64_t(0) - uint64_t(x < 2.2250738585072014e-308);
  x = blend(subnormal, x * 18014398509481984.0, x);
  const uint64_t bits = double_bits(x);
  // The biased exponent field as an exact double: plant it in the mantissa of 2^52.
  double e = bits_double((bits >> 52) | 0x4330000000000000ULL) - 4503599627370496.0;
  e -= blend(subnormal, 1077.0, 1023.0);  // the bias, plus 54 for the scaling
  // Mantissa m in [1, 2); fold it into [sqrt(2)/2, sqrt(2)) so that f = m - 1 is small.
  double m = bits_double((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
  const uint64_t high = uint64_t(0) - uint64_t(m > 1.4142135623730951);
  m = blend(high, m * 0.5, m);
  e += blend(high, 1.0, 0.0);

  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (lg2 + w * (lg4 + w * lg6));
  const double t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)));
  const double r = t2 + t1;
  const double hfsq = 0.5 * f * f;
  return e * ln2_hi - ((hfsq - (s * (hfsq + r) + e * ln2_lo)) - f);
}

// 2^k for an integer-valued double k in [-1022, 1023], built from its bits: planted in the
// mantissa of 2^52 (exactly), then shifted into the exponent field.
ISAMPLE_FN double power_of_two(double k) {
  return bits_double(double_bits(k + 4503599627371519.0) << 52);  // 2^52 + 1023
}

// e^x for every double: +inf above 709.78, 0 below -745.14 (-inf included), NaN for NaN;
// subnormal results are rounded once. fdlibm's __ieee754_exp: x = k ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two so k * ln2_hi is exact), a degree-5 minimax polynomial
// for e^r, then the scaling by 2^k, in two exact-then-rounded steps so that results in the
// subnormal range are rounded once. Error < 1 ulp (fdlibm's bound; checked in
// tests/test_core_fastmath.py against correctly rounded values). k is rounded to nearest
// even (fdlibm: away from zero), which only moves r across +-ln2 / 2 at exact ties.
ISAMPLE_FN double exp_shared(double x) {
  const double ln2_hi = 6.93147180369123816490e-01;
  const double ln2_lo = 1.90821492927058770002e-10;
  const double inv_ln2 = 1.44269504088896338700e+00;
  const double p1 = 1.66666666666666019037e-01, p2 = -2.77777777770155933842e-03;
  const double p3 = 6.61375632143793436117e-05, p4 = -1.65339022054652515390e-06;
  const double p5 = 4.13813679705723846039e-08;
  const double overflow = 7.09782712893383973096e+02;    // e^x > DBL_MAX above this
  const double underflow = -7.45133219101941108420e+02;  // e^x < 2^-1075 below this
  const double round_magic = 6755399441055744.0;          // 1.5 * 2^52: adding it rounds to an integer

  // Clamp first (NaN to 0), so every step below stays in range; the ends are chosen last.
  // Every choice is a blend of values computed on both paths, as in log_positive: compilers
  // then vectorise the loops over items (a ternary, or an operation done on one side only,
  // keeps GCC from it under -ftrapping-math).
  const double quiet = x + x;  // NaN in, NaN out
  const uint64_t number = uint64_t(0) - uint64_t(x == x);
  double a = blend(number, x, 0.0);
  a = blend(uint64_t(0) - uint64_t(a < -746.0), -746.0, a);
  a = blend(uint64_t(0) - uint64_t(a > 710.0), 710.0, a);
  const double k = (a * inv_ln2 + round_magic) - round_magic;  // nearest integer, |k| <= 1077
  const double hi = a - k * ln2_hi;                             // exact: k * ln2_hi has spare bits
  const double lo = k * ln2_lo;
  const double r = hi - lo;
  const double t = r * r;
  const double c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))));
  const double y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);  // e^r, in [0.7, 1.42]
  // y * 2^k as (y * 2^k1) * 2^k2, k1 + k2 = k, both in [-539, 539]: the first product is
  // exact, the second rounds once (into the subnormals or to inf where it must).
  const double k1 = (k * 0.5 + round_magic) - round_magic;
  const double scaled = (y * power_of_two(k1)) * power_of_two(k - k1);
  double result = blend(uint64_t(0) - uint64_t(x > overflow), positive_infinity(), scaled);
  result = blend(uint64_t(0) - uint64_t(x < underflow), 0.0, result);
  return blend(number, result, quiet);
}

}  // namespace isample
