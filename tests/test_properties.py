"""Property-based tests: random sequences of operations on the trees, checked step by step
against a numpy reference (Hypothesis stateful testing).

Bounded in CI (profile "ci", the default); ``pytest --hypothesis-profile thorough`` runs
many more examples. Covered: capacities 1 .. 1e5, empty batches, repeated indices,
denormals, 1e300, score spreads of 1e6, rejected calls, draws with and without
replacement, state round trips; for the CPU tree and the host build of the GPU code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import isample

IMPLEMENTATIONS = ["auto"] + (["gpu_on_host"] if isample.build_info()["gpu_on_host"] else [])
CAPACITIES = st.sampled_from([1, 2, 15, 16, 17, 255, 4097, 100_000])

weight_values = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=1e3),
    st.floats(min_value=5e-324, max_value=1e-300),  # denormals and tiny normals
    st.floats(min_value=1e280, max_value=1e300),  # huge, far from overflow of a sum of a few
    st.sampled_from([1.0, 2.0**-1074, 1e300]),
)
bad_weights = st.sampled_from([float("nan"), float("inf"), -1.0, -5e-324, -float("inf")])
score_values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.floats(min_value=-50.0, max_value=50.0),
    st.sampled_from([0.0, -1e6, 1e6, 700.0, -745.0]),
)


def _indices(capacity: int, size: int) -> st.SearchStrategy:
    # small batches, often repeating an index (the last value must win)
    return st.lists(st.integers(0, capacity - 1), min_size=0, max_size=size)


class _TreeMachine(RuleBasedStateMachine):
    implementation = "auto"

    def _last_wins(self, reference: np.ndarray, idx, values) -> None:
        for i, v in zip(idx, values):
            reference[i] = v

    def _tree_state_unchanged(self, before) -> None:
        assert self.tree.total == before[0]
        assert torch.equal(self.tree.get(), before[1])


class SumTreeMachine(_TreeMachine):
    @initialize(capacity=CAPACITIES)
    def create(self, capacity):
        self.tree = isample.SumTree(capacity, seed=0, _implementation=self.implementation)
        self.weights = np.zeros(capacity)

    @rule(data=st.data())
    def update(self, data):
        n = self.weights.size
        idx = data.draw(_indices(n, 20))
        values = data.draw(st.lists(weight_values, min_size=len(idx), max_size=len(idx)))
        candidate = self.weights.copy()
        self._last_wins(candidate, idx, values)
        # A total that would overflow is refused: keep such cases out of this rule.
        assume(math.fsum(candidate.tolist()) < 1e305)
        self.tree.update(idx, values)
        self.weights = candidate

    @rule(data=st.data())
    def rejected_update(self, data):
        n = self.weights.size
        idx = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5))
        values = data.draw(st.lists(weight_values, min_size=len(idx), max_size=len(idx)))
        if data.draw(st.booleans()):
            values[data.draw(st.integers(0, len(idx) - 1))] = data.draw(bad_weights)
            error = ValueError
        else:
            idx[data.draw(st.integers(0, len(idx) - 1))] = data.draw(st.sampled_from([-1, n, n + 7, 2**40]))
            error = IndexError
        before = (self.tree.total, self.tree.get().clone())
        with pytest.raises(error):
            self.tree.update(idx, values)
        self._tree_state_unchanged(before)

    @rule(data=st.data())
    def draw_with_replacement(self, data):
        k = data.draw(st.integers(0, 300))
        if not (self.weights > 0).any():
            if k > 0:
                with pytest.raises(ValueError):
                    self.tree.sample(k)
            return
        draws = self.tree.sample(k, seed=data.draw(st.integers(0, 2**63))).numpy()
        assert draws.shape == (k,) and (self.weights[draws] > 0).all()

    @precondition(lambda self: (self.weights > 0).any())
    @rule(u=st.lists(st.floats(min_value=0.0, max_value=1.0, exclude_max=True), min_size=1, max_size=50))
    def descent_lands_in_the_right_interval(self, u):
        """The drawn item's mass interval contains u * total, up to rounding."""
        u = np.array(u)
        got = self.tree.sample_from_uniforms(u).numpy()
        total = self.tree.total
        cumulative = np.concatenate([[0.0], np.cumsum(self.weights)])
        slack = 1e-12 * total
        for item, target in zip(got, u * total):
            assert self.weights[item] > 0
            assert cumulative[item] - slack <= target <= cumulative[item + 1] + slack

    @rule(data=st.data())
    def draw_without_replacement(self, data):
        positive = int((self.weights > 0).sum())
        k = data.draw(st.integers(0, positive + 2))
        method = data.draw(st.sampled_from(["auto", "race", "removal"] if self.implementation == "auto" else ["auto"]))
        before = (self.tree.total, self.tree.get().clone())
        if k > positive:
            with pytest.raises(ValueError):
                self.tree.sample(k, replace=False, method=method)
        else:
            draws = self.tree.sample(k, replace=False, seed=data.draw(st.integers(0, 2**63)), method=method).numpy()
            assert len(set(draws.tolist())) == k and (self.weights[draws] > 0).all()
        self._tree_state_unchanged(before)

    @rule()
    def state_round_trip(self):
        copy = isample.SumTree(self.weights.size, seed=1)
        copy.load_state_dict(self.tree.state_dict())
        assert copy.total == self.tree.total
        if (self.weights > 0).any():
            u = np.linspace(0, 1, 33)[:-1]
            assert torch.equal(copy.sample_from_uniforms(u), self.tree.sample_from_uniforms(u))

    @invariant()
    def matches_the_reference(self):
        if not hasattr(self, "tree"):
            return
        np.testing.assert_array_equal(self.tree.get().numpy(), self.weights)
        assert self.tree.num_positive == int((self.weights > 0).sum())
        exact = math.fsum(self.weights.tolist())
        assert abs(self.tree.total - exact) <= 1e-12 * exact
        # every sum is recomputed from its children: identical to a fresh build
        assert isample.SumTree.from_weights(self.weights).total == self.tree.total


def _exact_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    s = scores.astype(np.longdouble)
    e = np.exp((s - s.max()) / np.longdouble(temperature))
    return (e / e.sum()).astype(np.float64)


class SoftmaxTreeMachine(_TreeMachine):
    @initialize(capacity=CAPACITIES, temperature=st.sampled_from([1e-3, 0.5, 1.0, 40.0]))
    def create(self, capacity, temperature):
        self.tree = isample.SoftmaxTree(capacity, temperature=temperature, seed=0, _implementation=self.implementation)
        self.scores = np.zeros(capacity)
        self.temperature = temperature

    @rule(data=st.data())
    def update(self, data):
        idx = data.draw(_indices(self.scores.size, 20))
        values = data.draw(st.lists(score_values, min_size=len(idx), max_size=len(idx)))
        self.tree.update(idx, values)
        self._last_wins(self.scores, idx, values)

    @rule(data=st.data(), keep=st.sampled_from([0.0, 0.2, 0.9, 1.0]))
    def blend(self, data, keep):
        idx = data.draw(_indices(self.scores.size, 10))
        values = data.draw(st.lists(score_values, min_size=len(idx), max_size=len(idx)))
        before = self.scores.copy()
        self.tree.blend(idx, values, keep)
        for i, v in zip(idx, values):
            self.scores[i] = keep * before[i] + (1.0 - keep) * v if keep else v

    @rule(data=st.data())
    def rejected_update(self, data):
        n = self.scores.size
        before = (self.tree.total, self.tree.get().clone())
        bad = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        with pytest.raises(ValueError):
            self.tree.update([0, n - 1], [1.0, bad])
        with pytest.raises(IndexError):
            self.tree.update([n], [1.0])
        self._tree_state_unchanged(before)

    @rule(data=st.data())
    def draws(self, data):
        k = data.draw(st.integers(0, 200))
        draws = self.tree.sample(k, seed=data.draw(st.integers(0, 2**63))).numpy()
        assert draws.shape == (k,) and ((draws >= 0) & (draws < self.scores.size)).all()
        positive = self.tree.num_positive
        j = data.draw(st.integers(0, positive))
        distinct = self.tree.sample(j, replace=False, seed=1).numpy()
        assert len(set(distinct.tolist())) == j

    @rule()
    def state_round_trip(self):
        copy = isample.SoftmaxTree(self.scores.size, seed=1)
        copy.load_state_dict(self.tree.state_dict())
        np.testing.assert_allclose(copy.probability().numpy(), self.tree.probability().numpy(), rtol=1e-13, atol=0)

    @invariant()
    def matches_an_exact_softmax(self):
        if not hasattr(self, "tree"):
            return
        np.testing.assert_array_equal(self.tree.get().numpy(), self.scores)
        expected = _exact_softmax(self.scores, self.temperature)
        got = self.tree.probability().numpy()
        big = expected > 1e-250
        np.testing.assert_allclose(got[big], expected[big], rtol=1e-12, atol=0)
        assert (got[~big] <= 1e-250).all()


def _for(machine, implementation):
    return type(f"{machine.__name__}_{implementation}", (machine,), {"implementation": implementation}).TestCase


for _impl in IMPLEMENTATIONS:
    globals()[f"TestSumTree_{_impl}"] = _for(SumTreeMachine, _impl)
    globals()[f"TestSoftmaxTree_{_impl}"] = _for(SoftmaxTreeMachine, _impl)
