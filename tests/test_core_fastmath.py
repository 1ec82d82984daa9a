"""The exp that the CPU and GPU trees share (csrc/fastmath.h, exp_shared), checked on the host
against correctly rounded values (issue 21 item 6).

libm's exp and CUDA's exp are each accurate to about an ulp, but not the same ulp, so softmax
leaves computed with them would differ in the last bit between the CPU and the GPU. Both
back ends compute leaves with exp_shared instead: fdlibm's algorithm, written with selects and
made only of IEEE additions, multiplications and divisions, so every back end rounds it alike.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from isample import _core


def exp_shared(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _core.exp_shared(x.ctypes.data, x.size, out.ctypes.data)
    return out


def ulps_from_exact(x: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|got - e^x| in units of the last place of the correctly rounded e^x (2^-1074 for
    subnormal results), from 120-bit arithmetic."""
    mpmath.mp.prec = 120
    errors = []
    for xi, gi in zip(x.tolist(), got.tolist()):
        exact = mpmath.exp(mpmath.mpf(xi))
        rounded = float(exact)
        ulp = max(np.spacing(rounded), 2.0**-1074)
        errors.append(float(abs(mpmath.mpf(gi) - exact) / mpmath.mpf(ulp)))
    return np.array(errors)


def test_within_one_ulp_of_the_exact_value(rng):
    """fdlibm's bound (< 1 ulp) on arguments across the whole range, the subnormal results
    (x < -708.4) and the neighbourhood of 0 included."""
    x = np.concatenate([
        rng.uniform(-745.13, 709.78, 3000),
        rng.uniform(-745.13, -708.3, 500),  # subnormal results, rounded once
        rng.uniform(-1.0, 1.0, 500),
        rng.normal(size=500) * 1e-9,
        rng.uniform(-64.0, 64.0, 1000),  # a softmax tree's leaves live here
    ])
    errors = ulps_from_exact(x, exp_shared(x))
    assert errors.max() < 1.0, x[np.argmax(errors)]
    assert errors.mean() < 0.3  # and usually well within it


def test_against_libm_on_a_million_arguments(rng):
    """Never more than one ulp from glibc's exp (itself within ~0.5 ulp)."""
    x = rng.uniform(-745.0, 709.7, 1_000_000)
    got = exp_shared(x).view(np.int64)
    libm = np.exp(x).view(np.int64)
    assert np.abs(got - libm).max() <= 1


@pytest.mark.parametrize(
    "x, expected",
    [
        (0.0, 1.0),
        (-0.0, 1.0),
        (float("inf"), float("inf")),
        (-float("inf"), 0.0),
        (709.79, float("inf")),  # above log(DBL_MAX)
        (1e308, float("inf")),
        (-745.14, 0.0),  # below log(2^-1075)
        (-1e308, 0.0),
        (-745.13, 5e-324),  # the smallest subnormal
        (709.782712893384, 1.7976931348622732e308),  # the largest result below DBL_MAX
    ],
)
def test_the_ends_of_the_range(x, expected):
    assert exp_shared([x])[0] == expected


def test_nan_stays_nan():
    assert np.isnan(exp_shared([float("nan")])[0])
