"""SoftmaxTree: exact softmax for any finite scores, rebasing, distributions, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue


def stable_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(s / T), subtracting the max before dividing, in x87 extended precision.

    (torch.softmax(s / T) divides first: for |s / T| ~ 1e4 that rounding alone moves p by
    ~1e-12 relative, more than the tree's own error.)
    """
    s = np.asarray(scores, dtype=np.longdouble)
    x = (s - s.max()) / np.longdouble(temperature)
    e = np.exp(x)
    return (e / e.sum()).astype(np.float64)


def log_sum_exp(scores: np.ndarray, temperature: float) -> float:
    s = np.asarray(scores, dtype=np.longdouble)
    m = s.max()
    return float(m / np.longdouble(temperature) + np.log(np.exp((s - m) / np.longdouble(temperature)).sum()))


def assert_matches_softmax(tree: isample.SoftmaxTree, scores: np.ndarray, temperature: float) -> None:
    """p matches an exact softmax to 1e-12 relative wherever p > 1e-250."""
    expected = stable_softmax(scores, temperature)
    got = tree.probability().numpy()
    big = expected > 1e-250
    np.testing.assert_allclose(got[big], expected[big], rtol=1e-12, atol=0)
    assert np.all(got[~big] <= 1e-250)
    assert tree.log_total == pytest.approx(log_sum_exp(scores, temperature), rel=1e-14, abs=1e-12)


def test_starts_uniform():
    tree = isample.SoftmaxTree(7, seed=0)
    np.testing.assert_allclose(tree.probability().numpy(), np.full(7, 1 / 7), rtol=1e-15)
    assert tree.get().tolist() == [0.0] * 7
    assert tree.log_total == pytest.approx(np.log(7))


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1.0, 7.0, 1e4])
@pytest.mark.parametrize("spread", [1.0, 50.0, 1e4, 1e6])
def test_matches_stable_softmax_for_wide_spreads(spread, temperature, rng):
    scores = (rng.random(3000) - 0.5) * spread
    tree = isample.SoftmaxTree.from_scores(scores, temperature=temperature, seed=0)
    assert_matches_softmax(tree, scores, temperature)
    # ... and still after batched updates that trigger rebases in both directions
    for shift in (spread * 10, -spread * 30, spread * 5, 1e9, -1e9):
        idx = rng.integers(0, scores.size, 64)
        values = scores[idx] + shift * rng.random(64)
        tree.update(idx, values)
        scores[idx] = values  # sequential assignment: the last of a repeated index wins
        assert_matches_softmax(tree, scores, temperature)


def test_one_huge_score_then_back():
    tree = isample.SoftmaxTree(1000, seed=0)
    tree.update([17], [1e6])
    p = tree.probability().numpy()
    assert p[17] == 1.0 and p.sum() == 1.0
    tree.update([17], [-1e6])  # everything else is now the maximum: p is uniform over the rest
    p = tree.probability().numpy()
    assert p[17] == 0.0
    np.testing.assert_allclose(np.delete(p, 17), np.full(999, 1 / 999), rtol=1e-13)
    assert (tree.sample(10_000).numpy() != 17).all()


def test_all_scores_far_below_zero_do_not_underflow():
    tree = isample.SoftmaxTree(100, seed=0)
    scores = -1e300 + np.arange(100) * 1e286
    tree.assign(scores)
    assert_matches_softmax(tree, scores, 1.0)
    tree.assign(np.full(100, -1e300))
    np.testing.assert_allclose(tree.probability().numpy(), np.full(100, 0.01), rtol=1e-14)


@pytest.mark.statistical
def test_sampling_frequencies_follow_softmax(rng, kernels):
    scores = rng.normal(size=40) * 2
    tree = isample.SoftmaxTree.from_scores(scores, temperature=1.5, seed=2)
    counts = np.bincount(tree.sample(200_000).numpy(), minlength=40)
    p = stable_softmax(scores, 1.5)
    assert chi_square_pvalue(counts, p) > ALPHA
    assert chi_square_pvalue(counts, stable_softmax(scores, 1.0)) < ALPHA  # wrong temperature


def test_temperature_can_change():
    scores = np.array([0.0, 1.0, 2.0])
    tree = isample.SoftmaxTree.from_scores(scores, temperature=1.0, seed=0)
    tree.temperature = 0.25
    assert tree.temperature == 0.25
    assert_matches_softmax(tree, scores, 0.25)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            tree.temperature = bad
    with pytest.raises(TypeError):
        tree.temperature = "hot"
    assert tree.temperature == 0.25


def test_repeated_index_last_score_wins():
    tree = isample.SoftmaxTree(4, seed=0)
    tree.update([1, 1, 2, 1], [5.0, 900.0, 1.0, 3.0])  # 900 would trigger a rebase on its own
    assert tree.get().tolist() == [0.0, 3.0, 1.0, 0.0]
    assert_matches_softmax(tree, np.array([0.0, 3.0, 1.0, 0.0]), 1.0)


def test_bad_scores_are_refused_and_change_nothing():
    tree = isample.SoftmaxTree(5, seed=0)
    tree.update([0, 1], [1.0, 2.0])
    before = tree.state_dict()
    for error, call in [
        (ValueError, lambda: tree.update([2], [float("nan")])),
        (ValueError, lambda: tree.update([2, 3], [0.0, float("inf")])),
        (ValueError, lambda: tree.update([2], [-float("inf")])),
        (IndexError, lambda: tree.update([5], [0.0])),
        (TypeError, lambda: tree.update([0.5], [0.0])),
        (ValueError, lambda: tree.assign([1.0, 2.0])),
        (ValueError, lambda: tree.assign([1.0, 2.0, 3.0, 4.0, float("nan")])),
        (ValueError, lambda: isample.SoftmaxTree(3, temperature=0.0)),
        (TypeError, lambda: isample.SoftmaxTree(3, temperature=None)),
    ]:
        with pytest.raises(error):
            call()
        assert torch.equal(tree.get(), before["scores"])
        assert tree.log_total == pytest.approx(np.log(np.exp(1) + np.exp(2) + 3), rel=1e-14)


def test_state_round_trip_is_exact(rng):
    tree = isample.SoftmaxTree(500, temperature=0.7, seed=3)
    tree.update(rng.integers(0, 500, 300), rng.normal(size=300) * 40)
    tree.sample(7)
    state = tree.state_dict()
    other = isample.SoftmaxTree(500, seed=0)
    other.load_state_dict(state)
    assert other.temperature == 0.7
    assert torch.equal(other.probability(), tree.probability())
    assert other.log_total == tree.log_total
    assert torch.equal(other.sample(1000), tree.sample(1000))
    with pytest.raises(ValueError):
        other.load_state_dict({**state, "reference": float("nan")})
    with pytest.raises(ValueError):
        isample.SumTree(500).load_state_dict(state)
    assert torch.equal(other.probability(), tree.probability())


def test_without_replacement_on_softmax(rng):
    scores = rng.normal(size=1000)
    tree = isample.SoftmaxTree.from_scores(scores, seed=0)
    before = tree.probability().clone()
    out = tree.sample(600, replace=False)
    assert len(set(out.tolist())) == 600
    assert torch.equal(tree.probability(), before)
