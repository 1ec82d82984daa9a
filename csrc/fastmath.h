// Branch-free natural logarithm for the exponential race (one per item, so libm's scalar
// call would dominate the O(n) pass). Same algorithm as fdlibm's __ieee754_log, written
// with selects instead of branches so compilers vectorise it, and shared by host and
// device so both produce the same keys. Error < 1 ulp for finite x > 0, subnormals
// included; the caller never passes 0, negatives, inf or NaN.
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

}  // namespace isample
