"""Draws from trees whose total is tiny (weights in the subnormal range), on the CPU tree and
the host build of the GPU code (issue 19 item 5).

Below a total of 2^-1000 a target u * total would be rounded to a multiple of 2^-1074 and
1 / total may be inf, so such trees are drawn from as if every weight were multiplied by
2^1000 (exactly: descend.h's tiny_total_scale). The exact reference is therefore the same
tree built from the scaled weights, which has an ordinary total: draws with the same seed
must be the same items.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue

IMPLEMENTATIONS = ["auto"] + (["gpu_on_host"] if isample.build_info()["gpu_on_host"] else [])
TINY = 5e-324  # 2^-1074, the smallest subnormal
SCALE = 2.0**1000


def tree_of(weights, implementation, seed=0):
    return isample.SumTree.from_weights(np.asarray(weights, dtype=np.float64), seed=seed, _implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_draws_are_those_of_the_scaled_tree(implementation, rng):
    weights = rng.integers(0, 1000, 300) * TINY  # exact multiples of the smallest subnormal, some 0
    tiny = tree_of(weights, implementation)
    scaled = tree_of(weights * SCALE, implementation)  # exact: a power of two
    assert tiny.total * SCALE == scaled.total
    assert torch.equal(tiny.sample(20_000, seed=1), scaled.sample(20_000, seed=1))
    u = rng.random(5000)
    assert torch.equal(tiny.sample_from_uniforms(u), scaled.sample_from_uniforms(u))
    assert torch.equal(tiny.probability(), scaled.probability())
    k = int((weights > 0).sum()) // 2
    # Both trees use the race in the log domain on the same (scaled) weights on the host
    # build; the CPU's scaled tree uses linear keys, which order the items the same way.
    assert torch.equal(tiny.sample(k, replace=False, seed=2), scaled.sample(k, replace=False, seed=2))
    ti, tp = tiny.sample_with_inclusion(k, seed=3)
    si, sp = scaled.sample_with_inclusion(k, seed=3)
    assert torch.equal(ti, si)
    torch.testing.assert_close(tp, sp, rtol=1e-12, atol=0)


@pytest.mark.statistical
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_with_replacement_every_item_gets_its_share(implementation):
    """Unscaled, u * total is rounded to whole multiples of 2^-1074: item 0 (one such
    multiple) got half its share and the last item half a share too many."""
    weights = np.arange(1, 51) * TINY
    counts = np.bincount(tree_of(weights, implementation).sample(200_000, seed=0).numpy(), minlength=50)
    p = weights / weights.sum()
    assert chi_square_pvalue(counts, p) > ALPHA
    rounded = p.copy()  # negative control: the shares the rounded targets gave
    rounded[0] /= 2
    rounded[-1] += p[0] / 2
    assert chi_square_pvalue(counts, rounded) < ALPHA


@pytest.mark.statistical
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_replacement_the_first_item_is_drawn_in_proportion(implementation):
    """The issue's reproducer: 100 weights of 5e-324 gave items 0..59 for every seed. The
    first item of a successive sample is drawn with p_i = w_i / total."""
    equal = tree_of([TINY] * 100, implementation)
    draws = [equal.sample(60, replace=False, seed=s) for s in range(40)]
    assert len({tuple(d.tolist()) for d in draws}) == 40
    weights = np.arange(1, 21) * TINY
    tree = tree_of(weights, implementation)
    first = [int(tree.sample(5, replace=False, seed=s)[0]) for s in range(4000)]
    counts = np.bincount(first, minlength=20)
    assert chi_square_pvalue(counts, weights / weights.sum()) > ALPHA
    assert chi_square_pvalue(counts, np.full(20, 1 / 20)) < ALPHA  # negative control: uniform


@pytest.mark.statistical
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inclusion_probabilities_are_finite_and_unbiased(implementation, rng):
    """They were NaN (1 / total is inf below ~5.6e-309). Horvitz-Thompson estimates of
    sum f must average to it."""
    n, k = 30, 8
    calls = 1500 if implementation == "auto" else 500  # the host build runs several OpenMP regions a call
    weights = rng.integers(1, 50, n) * TINY
    f = rng.random(n) * 10
    tree = tree_of(weights, implementation)
    estimates = []
    for call in range(calls):
        idx, inclusion = tree.sample_with_inclusion(k, seed=call)
        assert torch.all((inclusion > 0) & (inclusion <= 1))
        estimates.append((f[idx.numpy()] / inclusion.numpy()).sum())
    estimates = np.array(estimates)
    z = (estimates.mean() - f.sum()) / (estimates.std(ddof=1) / math.sqrt(calls))
    assert abs(z) < 4.0


def test_removal_takes_the_race_at_tiny_totals():
    """The CPU's rejection-and-removal method draws from u * total too: a tiny total always
    takes the race, which gives the same distribution."""
    tree = tree_of(np.arange(1, 101) * TINY, "auto")
    for seed in range(5):
        assert torch.equal(tree.sample(3, replace=False, seed=seed, method="removal"),
                           tree.sample(3, replace=False, seed=seed, method="race"))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ordinary_totals_are_unchanged_by_the_scaling(implementation):
    """Above 2^-1000 nothing is scaled: a total just above it draws as before (the numpy
    reference descent, which knows nothing of scaling, agrees exactly on power-of-two
    weights), and one just below it draws as its scaled twin."""
    from conftest import reference_descent

    weights = np.full(64, 2.0**-1005)  # total 2^-999
    u = np.linspace(0, 1, 257)[:-1]
    tree = tree_of(weights, implementation)
    np.testing.assert_array_equal(tree.sample_from_uniforms(u).numpy(), reference_descent(weights, u))
    below = tree_of(weights / 4, implementation)  # total 2^-1001: scaled
    assert torch.equal(below.sample_from_uniforms(u), tree_of(weights / 4 * SCALE, implementation).sample_from_uniforms(u))
