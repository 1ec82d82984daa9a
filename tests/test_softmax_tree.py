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


# Scores near +-DBL_MAX, where s - ref overflows although (s - ref) / T is small.
HUGE_SPREADS = [
    (np.array([1e308, -1e308]), 1e308),  # p = [0.881, 0.119]
    (np.array([1.7e308, -1.7e308, 0.0, 1e308]), 1e308),
    (np.array([-1.5e308, 1.5e308, 1.5e308]), 3e307),  # p[0] = e^-10 / (2 + e^-10)
    (np.array([1.7e308, -1.7e308]), 1e305),  # p[1] = e^-3400 truly underflows to 0
]


@pytest.mark.parametrize("scores, temperature", HUGE_SPREADS)
def test_scores_near_the_float_limits_stay_exact(scores, temperature):
    if scores.size == 2 and temperature == 1e308:
        np.testing.assert_allclose(stable_softmax(scores, temperature), [1 / (1 + np.exp(-2)), 1 - 1 / (1 + np.exp(-2))])
    check_huge_spread(scores, temperature)


def check_huge_spread(scores: np.ndarray, temperature: float, **tree_kwargs) -> None:
    """Every way in: assign, updates from a reference at the far end, load_state_dict."""
    tree = isample.SoftmaxTree.from_scores(scores, temperature=temperature, seed=0, **tree_kwargs)
    assert_matches_softmax(tree, scores, temperature)
    lowest_first = isample.SoftmaxTree.from_scores(np.full(scores.size, scores.min()), temperature=temperature, seed=0, **tree_kwargs)
    lowest_first.update(np.arange(scores.size), scores)  # the reference sits at -1e308 before
    assert_matches_softmax(lowest_first, scores, temperature)
    highest_first = isample.SoftmaxTree.from_scores(np.full(scores.size, scores.max()), temperature=temperature, seed=0, **tree_kwargs)
    for i in np.argsort(scores):  # one at a time, the lowest first: no rebase along the way
        highest_first.update([int(i)], [scores[i]])
    assert_matches_softmax(highest_first, scores, temperature)
    state = tree.state_dict()
    state["reference"] = float(scores.min())  # a saved reference at the other end
    loaded = isample.SoftmaxTree(scores.size, seed=0, **tree_kwargs)
    loaded.load_state_dict(state)
    assert_matches_softmax(loaded, scores, temperature)


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


def bad_softmax_calls(tree, state: dict) -> list:
    """(exception, call) pairs that DESIGN.md says must raise, on a 5-item tree with
    scores [1, 2, 0, 0, 0] whose state_dict is `state`."""
    nan = float("nan")
    scores = state["scores"]
    bad_states = [
        {**state, "format": "isample.SumTree"},
        {**state, "version": 99},
        {**state, "capacity": 6},
        {**state, "scores": scores[:4]},
        {**state, "scores": scores.reshape(1, 5)},
        {**state, "scores": torch.full((5,), nan, dtype=torch.float64)},
        {**state, "scores": torch.tensor([0.0, 1.0, float("inf"), 0.0, 0.0], dtype=torch.float64)},
        {**state, "scores": scores.tolist()},
        {**state, "reference": nan},
        {**state, "reference": "1.0"},
        {**state, "temperature": 0.0},
        {**state, "temperature": nan},
        {**state, "temperature": -2.0},
        {**state, "stream_calls": -1.5},
        {k: v for k, v in state.items() if k != "scores"},
    ]
    return [
        (ValueError, lambda: tree.update([2], [nan])),
        (ValueError, lambda: tree.update([2, 3], [0.0, float("inf")])),
        (ValueError, lambda: tree.update([2], [-float("inf")])),
        (ValueError, lambda: tree.update([2, 3], [1.0])),
        (IndexError, lambda: tree.update([5], [0.0])),
        (TypeError, lambda: tree.update([0.5], [0.0])),
        (TypeError, lambda: tree.update([2], ["x"])),
        (ValueError, lambda: tree.assign([1.0, 2.0])),
        (ValueError, lambda: tree.assign([1.0, 2.0, 3.0, 4.0, nan])),
        (IndexError, lambda: tree.get([5])),
        (IndexError, lambda: tree.get([0, -1])),
        (TypeError, lambda: tree.get([1.0])),
        (ValueError, lambda: tree.get([[0]])),
        (IndexError, lambda: tree.probability([7])),
        (TypeError, lambda: tree.probability([True])),
        (ValueError, lambda: tree.probability([[1]])),
        (ValueError, lambda: tree.sample(-1)),
        (TypeError, lambda: tree.sample(2.0)),
        (ValueError, lambda: tree.sample(6, replace=False)),  # more than n distinct items
        (ValueError, lambda: tree.sample(2, seed=1, generator=torch.Generator())),
        (TypeError, lambda: tree.sample(2, seed="1")),
        (ValueError, lambda: tree.sample(2, replace=False, method="fastest")),
        (ValueError, lambda: tree.sample_with_inclusion(6)),
        (ValueError, lambda: tree.sample_from_uniforms([0.5, 1.0])),
        (ValueError, lambda: tree.sample_from_uniforms([-0.25])),
        (ValueError, lambda: tree.sample_from_uniforms([nan])),
        (ValueError, lambda: tree.sample_from_uniforms([[0.5]])),
        (TypeError, lambda: tree.sample_from_uniforms("0.5")),
        (ValueError, lambda: tree.blend([2], [nan], 0.5)),
        (ValueError, lambda: tree.blend([2], [1.0], 1.5)),
        (ValueError, lambda: tree.blend([2], [1.0], -0.1)),
        (ValueError, lambda: tree.blend([2], [1.0], nan)),
        (IndexError, lambda: tree.blend([9], [1.0], 0.5)),
        (ValueError, lambda: tree.blend([2, 3], [1.0], 0.5)),
        (ValueError, lambda: isample.SoftmaxTree(3, temperature=0.0)),
        (TypeError, lambda: isample.SoftmaxTree(3, temperature=None)),
        (TypeError, lambda: tree.load_state_dict("not a dict")),
    ] + [((TypeError, ValueError), (lambda bad=bad: tree.load_state_dict(bad))) for bad in bad_states]


def check_bad_softmax_input(**tree_kwargs) -> None:
    tree = isample.SoftmaxTree(5, seed=0, **tree_kwargs)
    tree.update([0, 1], [1.0, 2.0])
    tree.sample(3)  # the stream is at call 1
    before = tree.state_dict()
    total = np.log(np.exp(1) + np.exp(2) + 3)
    for error, call in bad_softmax_calls(tree, before):
        with pytest.raises(error):
            call()
        state = tree.state_dict()
        assert torch.equal(state["scores"], before["scores"])
        assert {k: v for k, v in state.items() if k != "scores"} == {k: v for k, v in before.items() if k != "scores"}
        assert tree.log_total == pytest.approx(total, rel=1e-14)
    twin = isample.SoftmaxTree(5, seed=99, **tree_kwargs)
    twin.load_state_dict(before)
    assert torch.equal(tree.sample(50), twin.sample(50))  # the rejected draws moved no stream


def test_bad_input_is_refused_and_changes_nothing():
    check_bad_softmax_input()


def test_a_rejected_draw_does_not_advance_the_stream():
    # One item holds all the mass, the other's p underflows: only one positive item.
    tree = isample.SoftmaxTree.from_scores([0.0, -1e6], temperature=1e-3, seed=4)
    assert tree.num_positive == 1
    for call in (lambda: tree.sample(2, replace=False), lambda: tree.sample_with_inclusion(2)):
        with pytest.raises(ValueError, match="positive"):
            call()
        assert tree.state_dict()["stream_calls"] == 0
    tree.sample(1, replace=False)
    assert tree.state_dict()["stream_calls"] == 1


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
