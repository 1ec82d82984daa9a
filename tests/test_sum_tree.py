"""SumTree: exactness against a numpy reference, distributions, state, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue, power_of_two_weights, reference_descent, run_threads


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 255, 256, 257, 4096, 70_001])
def test_descent_matches_numpy_reference_exactly(n, rng, kernels):
    weights = power_of_two_weights(rng, n)
    tree = isample.SumTree.from_weights(weights, seed=0)
    u = np.concatenate([rng.random(20_000), [0.0, np.nextafter(1.0, 0.0)]])
    got = tree.sample_from_uniforms(u).numpy()
    np.testing.assert_array_equal(got, reference_descent(weights, u))
    assert tree.total == weights.sum()


@pytest.fixture
def two_threads_from_a_million():
    """Builds split between two threads from 2^16 blocks (2^20 items) on, instead of 2^21
    blocks: the split runs on a tree a test can afford."""
    previous = isample._core._set_parallel_blocks(1 << 16)
    yield
    isample._core._set_parallel_blocks(previous)


def test_a_large_build_on_two_threads_matches_the_reference(rng, kernels, two_threads_from_a_million):
    """Above the threshold the weights are checked and loaded by two threads: the same
    tree, the same errors (the first bad weight named, nothing changed)."""
    n = (1 << 20) + 12_345  # a partial last block
    weights = power_of_two_weights(rng, n)
    tree = isample.SumTree.from_weights(weights, seed=0)
    assert tree.total == weights.sum() and tree.num_positive == int((weights > 0).sum())
    u = rng.random(5000)
    np.testing.assert_array_equal(tree.sample_from_uniforms(u).numpy(), reference_descent(weights, u))
    small = isample.SumTree.from_weights(weights[: n // 2], seed=0)  # one thread, same sums
    assert small.total == weights[: n // 2].sum()
    bad = weights.copy()
    bad[n - 3], bad[n - 2] = -1.0, np.nan  # in the second half, found by its thread
    with pytest.raises(ValueError, match=f"at position {n - 3}"):
        tree.assign(bad)
    assert torch.equal(tree.get(), torch.from_numpy(weights))


def test_descent_lands_on_boundaries_exactly(kernels):
    # weights 1,0,2,0,1: cumulative 1,1,3,3,4; a target exactly on a boundary goes right
    weights = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
    tree = isample.SumTree.from_weights(weights, seed=0)
    u = np.array([0.0, 0.25, 0.5, 0.75, 0.999])
    assert tree.sample_from_uniforms(u).tolist() == [0, 2, 2, 4, 4]
    assert tree.sample_from_uniforms(u).tolist() == reference_descent(weights, u).tolist()


def test_kernel_builds_draw_identically_on_arbitrary_weights(rng):
    """The generic and AVX2 kernel builds must agree bit for bit on any weights."""
    from conftest import kernel_builds

    builds = kernel_builds()
    if len(builds) < 2:
        pytest.skip("only one CPU kernel build runs on this machine")
    weights = rng.random(100_003) ** 3
    weights[rng.random(weights.size) < 0.3] = 0.0
    weights[:50] = rng.random(50) * 1e-300
    u = rng.random(50_000)
    update_idx, update_val = rng.integers(0, weights.size, 1000), rng.random(1000)
    results = {}
    default = isample.build_info()["cpu_kernels"]
    try:
        for build in builds:
            isample._core.select_cpu_kernels(build)
            tree = isample.SumTree.from_weights(weights, seed=0)
            tree.update(update_idx, update_val)
            results[build] = (
                tree.total,
                tree.sample_from_uniforms(u).numpy(),
                tree.sample(9000, replace=False, seed=1, method="race").numpy(),
                tree.sample(300, replace=False, seed=1, method="removal").numpy(),
            )
    finally:
        isample._core.select_cpu_kernels(default)
    first = results[builds[0]]
    for build in builds[1:]:
        assert results[build][0] == first[0]
        for a, b in zip(results[build][1:], first[1:]):
            np.testing.assert_array_equal(a, b)


def test_zero_weights_are_never_drawn(rng, kernels):
    weights = rng.random(5000)
    weights[rng.random(5000) < 0.5] = 0.0
    weights[-1] = 0.0  # the last leaf: where rounding would fall off the end
    tree = isample.SumTree.from_weights(weights, seed=3)
    draws = tree.sample(200_000).numpy()
    assert (weights[draws] > 0).all()
    u = np.concatenate([np.linspace(0, 1, 10_001)[:-1], [np.nextafter(1.0, 0.0)] * 5])
    assert (weights[tree.sample_from_uniforms(u).numpy()] > 0).all()
    distinct = tree.sample(int((weights > 0).sum()), replace=False, seed=4).numpy()
    assert (weights[distinct] > 0).all() and len(set(distinct.tolist())) == distinct.size


def test_total_does_not_drift_after_a_million_updates(rng, kernels):
    n = 10_000
    tree = isample.SumTree(n, seed=0)
    for _ in range(1000):
        idx = rng.integers(0, n, 1000)
        # values across many magnitudes, including zeros: the hard case for delta updates
        values = rng.random(1000) * 10.0 ** rng.integers(-12, 13, 1000)
        values[rng.random(1000) < 0.1] = 0.0
        tree.update(idx, values)
    leaves = tree.get().numpy()
    exact = math.fsum(leaves.tolist())
    assert abs(tree.total - exact) <= 1e-12 * exact
    # Every sum is recomputed from its children, so the tree equals a fresh build bit for bit.
    fresh = isample.SumTree.from_weights(leaves, seed=0)
    assert fresh.total == tree.total
    u = rng.random(10_000)
    np.testing.assert_array_equal(fresh.sample_from_uniforms(u), tree.sample_from_uniforms(u))


def test_repeated_index_last_value_wins(kernels):
    tree = isample.SumTree(10, seed=0)
    tree.update([3, 3, 5, 3], [1.0, 7.0, 2.0, 4.0])
    assert tree.get([3, 5]).tolist() == [4.0, 2.0]
    assert tree.total == 6.0
    assert tree.num_positive == 2


def test_probability_and_get():
    tree = isample.SumTree(4, seed=0)
    tree.update([0, 1, 3], [1.0, 3.0, 4.0])
    assert tree.probability().tolist() == [0.125, 0.375, 0.0, 0.5]
    assert tree.probability(torch.tensor([3, 0])).tolist() == [0.5, 0.125]
    assert tree.get(np.array([1, 2], dtype=np.int32)).tolist() == [3.0, 0.0]
    assert tree.get([]).shape == (0,)


def test_results_are_torch_tensors_with_the_documented_dtypes():
    tree = isample.SumTree.from_weights([1.0, 2.0], seed=0)
    assert tree.sample(3).dtype == torch.int64
    assert tree.sample(2, replace=False).dtype == torch.int64
    assert tree.get([0]).dtype == torch.float64
    assert tree.probability([0]).dtype == torch.float64
    assert len(tree) == 2 and tree.capacity == 2


# -- distributions --------------------------------------------------------------------------


@pytest.mark.statistical
def test_with_replacement_frequencies_match_probabilities(rng, kernels):
    weights = rng.random(60) ** 2
    weights[::7] = 0.0
    tree = isample.SumTree.from_weights(weights, seed=11)
    counts = np.bincount(tree.sample(300_000).numpy(), minlength=60)
    p = weights / weights.sum()
    assert chi_square_pvalue(counts, p) > ALPHA
    # Negative control: the same counts against slightly wrong probabilities must fail.
    wrong = weights.copy()
    wrong[1] *= 1.1
    wrong[2] *= 0.9
    assert chi_square_pvalue(counts, wrong / wrong.sum()) < ALPHA


def successive_sampling_probabilities(weights: np.ndarray, k: int) -> dict:
    """Exact probability of each ordered k-tuple under successive sampling."""
    out = {}

    def visit(prefix, prob, remaining):
        if len(prefix) == k:
            out[tuple(prefix)] = prob
            return
        mass = sum(weights[i] for i in remaining)
        for i in remaining:
            if weights[i] > 0:
                visit(prefix + [i], prob * weights[i] / mass, [j for j in remaining if j != i])

    visit([], 1.0, list(range(len(weights))))
    return out


@pytest.mark.statistical
@pytest.mark.parametrize("method", ["race", "removal"])
@pytest.mark.parametrize(
    "weights",
    [
        [1.0, 2.0, 3.0, 0.5, 0.0, 4.0],  # generic
        [1000.0, 1.0, 2.0, 1.5, 0.0, 3.0],  # one heavy item: the rejection phase gives way to removal
    ],
)
def test_without_replacement_is_successive_sampling(weights, method, kernels):
    weights = np.array(weights)
    k = 3
    exact = successive_sampling_probabilities(weights, k)
    tuples = list(exact)
    index = {t: j for j, t in enumerate(tuples)}
    tree = isample.SumTree.from_weights(weights, seed=5)
    counts = np.zeros(len(tuples))
    for call in range(30_000):
        draw = tuple(tree.sample(k, replace=False, seed=call, method=method).tolist())
        counts[index[draw]] += 1
    p = np.array([exact[t] for t in tuples])
    assert chi_square_pvalue(counts, p) > ALPHA
    # Negative control: unordered sets with the right inclusion of the first item, but the
    # order within each draw reversed, must be rejected.
    reversed_p = np.array([exact[t[::-1]] if t[::-1] in exact else 0.0 for t in tuples])
    assert chi_square_pvalue(counts, reversed_p / reversed_p.sum()) < ALPHA


@pytest.mark.statistical
def test_inclusion_probabilities_of_a_larger_case(rng):
    """First-order inclusion probabilities for n=8, k=4, exact by enumeration, both methods."""
    weights = np.array([0.3, 1.0, 2.5, 0.7, 4.0, 0.0, 1.2, 0.1])
    k = 4
    exact = successive_sampling_probabilities(weights, k)
    inclusion = np.zeros(weights.size)
    for t, p in exact.items():
        inclusion[list(t)] += p
    tree = isample.SumTree.from_weights(weights, seed=0)
    calls = 20_000
    for method in ("race", "removal"):
        hits = np.zeros(weights.size)
        for call in range(calls):
            hits[tree.sample(k, replace=False, seed=call, method=method).numpy()] += 1
        # each item's inclusion count is binomial; compare with 4.5-sigma bands
        sigma = np.sqrt(calls * inclusion * (1 - inclusion)) + 1e-9
        assert np.all(np.abs(hits - calls * inclusion) < 4.5 * sigma), (method, hits / calls, inclusion)
        assert hits[5] == 0


@pytest.mark.statistical
def test_race_falls_back_to_log_keys_for_extreme_spreads(kernels):
    # Linear keys E / p overflow for the two tiny items (p ~ 1e-600 underflows to 0); only
    # log-domain keys can order them, and the third draw must pick item 3 with chance 3/4.
    weights = np.array([1e300, 2e300, 1e-300, 3e-300])
    tree = isample.SumTree.from_weights(weights, seed=0)
    third = np.array([tree.sample(3, replace=False, seed=s, method="race")[2].item() for s in range(4000)])
    assert set(third.tolist()) <= {2, 3}
    counts = np.array([(third == 2).sum(), (third == 3).sum()])
    assert chi_square_pvalue(counts, np.array([0.25, 0.75])) > ALPHA
    assert chi_square_pvalue(counts, np.array([0.5, 0.5])) < ALPHA


@pytest.mark.parametrize("method", ["auto", "race", "removal"])
def test_without_replacement_leaves_the_tree_unchanged(rng, method):
    weights = rng.random(20_000)
    weights[rng.random(20_000) < 0.2] = 0.0
    tree = isample.SumTree.from_weights(weights, seed=0)
    before = (tree.total, tree.num_positive, tree.probability().clone())
    u = rng.random(5000)
    draws_before = tree.sample_from_uniforms(u)
    for k in (1, 100, 5000, int((weights > 0).sum())):
        out = tree.sample(k, replace=False, seed=k, method=method)
        assert len(set(out.tolist())) == k
    assert tree.total == before[0] and tree.num_positive == before[1]
    assert torch.equal(tree.probability(), before[2])
    assert torch.equal(tree.sample_from_uniforms(u), draws_before)


# -- reproducibility ------------------------------------------------------------------------


def test_seed_generator_and_stream_reproducibility():
    weights = np.arange(1.0, 101.0)
    a = isample.SumTree.from_weights(weights, seed=7)
    b = isample.SumTree.from_weights(weights, seed=7)
    assert torch.equal(a.sample(50), b.sample(50))  # same tree seed, same stream
    assert not torch.equal(a.sample(50), a.sample(50))  # the stream advances
    assert torch.equal(a.sample(50, seed=3), b.sample(50, seed=3))
    assert torch.equal(a.sample(50, seed=3), a.sample(50, seed=3))  # an explicit seed does not advance
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(a.sample(20, replace=False, generator=g1), b.sample(20, replace=False, generator=g2))
    torch.manual_seed(123)
    c = isample.SumTree.from_weights(weights)
    torch.manual_seed(123)
    d = isample.SumTree.from_weights(weights)
    assert torch.equal(c.sample(30), d.sample(30))


def test_sample_equals_descent_from_the_published_uniforms(rng):
    weights = rng.random(1000)
    tree = isample.SumTree.from_weights(weights, seed=0)
    u = isample.uniforms(500, seed=42)
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(tree.sample(500, seed=42), tree.sample_from_uniforms(u))
    # offsets address later positions of the same stream
    assert torch.equal(isample.uniforms(5, seed=42, offset=10), isample.uniforms(15, seed=42)[10:])


# -- state ----------------------------------------------------------------------------------


def test_state_round_trip_is_exact(rng):
    tree = isample.SumTree.from_weights(rng.random(3000), seed=1)
    tree.sample(10)  # advance the stream
    state = tree.state_dict()
    other = isample.SumTree(3000, seed=999)
    other.load_state_dict(state)
    assert other.total == tree.total
    assert torch.equal(other.probability(), tree.probability())
    assert torch.equal(other.sample(100), tree.sample(100))  # same stream position
    assert torch.equal(other.sample(500, replace=False), tree.sample(500, replace=False))
    # the state is a copy, not a view of the tree
    state["weights"][0] = 123.0
    assert tree.get([0]).item() != 123.0


def test_bad_state_is_refused_and_changes_nothing(rng):
    tree = isample.SumTree.from_weights(rng.random(10), seed=1)
    before = tree.state_dict()
    total_before = tree.total
    bad_states = [
        {**before, "format": "isample.SoftmaxTree"},
        {**before, "version": 99},
        {**before, "capacity": 11},
        {**before, "weights": before["weights"][:5]},
        {**before, "weights": torch.full((10,), float("nan"), dtype=torch.float64)},
        {**before, "weights": -before["weights"]},
        {**before, "stream_seed": "x"},
        {k: v for k, v in before.items() if k != "weights"},
        "not a dict",
    ]
    for bad in bad_states:
        with pytest.raises((ValueError, TypeError)):
            tree.load_state_dict(bad)
        assert torch.equal(tree.get(), before["weights"])
        assert tree.total == total_before


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors_and_changes_nothing():
    tree = isample.SumTree(8, seed=0)
    tree.update([0, 1], [1.0, 2.0])
    tree.sample(3)  # the stream is at call 1, not at its start
    snapshot = tree.state_dict()

    def unchanged():
        assert torch.equal(tree.get(), snapshot["weights"]) and tree.total == 3.0 and tree.num_positive == 2
        assert_same_state(tree.state_dict(), snapshot)

    cases = [
        (IndexError, lambda: tree.update([8], [1.0])),
        (IndexError, lambda: tree.update([2, -1], [1.0, 1.0])),
        (ValueError, lambda: tree.update([2], [float("nan")])),
        (ValueError, lambda: tree.update([2, 3], [1.0, float("inf")])),
        (ValueError, lambda: tree.update([2], [-1.0])),
        (ValueError, lambda: tree.update([2, 3], [1.0])),
        (ValueError, lambda: tree.update([[2]], [[1.0]])),
        (TypeError, lambda: tree.update([2.0], [1.0])),
        (TypeError, lambda: tree.update([True], [1.0])),
        (TypeError, lambda: tree.update("ab", [1.0])),
        (TypeError, lambda: tree.update([2], ["x"])),
        (ValueError, lambda: tree.update([2, 3], [1e308, 1e308])),  # the total would overflow
        (IndexError, lambda: tree.get([9])),
        (IndexError, lambda: tree.probability([-3])),
        (ValueError, lambda: tree.sample(-1)),
        (TypeError, lambda: tree.sample(2.0)),
        (TypeError, lambda: tree.sample(True)),
        (ValueError, lambda: tree.sample(3, replace=False)),  # only 2 positive
        (ValueError, lambda: tree.sample(2, seed=1, generator=torch.Generator())),
        (TypeError, lambda: tree.sample(2, seed=1.5)),
        (TypeError, lambda: tree.sample(2, generator=3)),
        (ValueError, lambda: tree.sample(2, replace=False, method="fastest")),
        (ValueError, lambda: tree.sample(2, method="race")),
        (ValueError, lambda: tree.sample_from_uniforms([0.5, 1.0])),
        (ValueError, lambda: tree.sample_from_uniforms([-0.1])),
        (ValueError, lambda: tree.sample_from_uniforms([float("nan")])),
        (ValueError, lambda: tree.assign([1.0] * 7)),
        (ValueError, lambda: tree.assign([1.0] * 7 + [float("nan")])),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        unchanged()
    # ... so the next unseeded draws are those of a tree that never saw the rejected calls
    twin = isample.SumTree(8, seed=1)
    twin.load_state_dict(snapshot)
    assert torch.equal(tree.sample(100), twin.sample(100))
    assert torch.equal(tree.sample(2, replace=False), twin.sample(2, replace=False))


def assert_same_state(state: dict, expected: dict) -> None:
    """Two state_dicts are equal: every array bit for bit, every other entry by ==."""
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
        else:
            assert state[key] == value, (key, state[key], value)


@pytest.mark.parametrize("draw", ["sample", "distinct", "inclusion"])
def test_a_rejected_draw_does_not_advance_the_stream(draw):
    """A draw that raises (too few positive items, an all-zero tree) leaves stream_calls and
    every later unseeded draw as they were."""
    calls = {
        "sample": lambda t: t.sample(4),
        "distinct": lambda t: t.sample(3, replace=False),
        "inclusion": lambda t: t.sample_with_inclusion(3),
    }
    for weights in ([0.0] * 4, [1.0, 2.0, 0.0, 0.0]):
        tree = isample.SumTree.from_weights(weights, seed=5)
        before = tree.state_dict()
        if draw == "sample" and any(weights):
            continue  # draws with replacement fail only on an all-zero tree
        with pytest.raises(ValueError):
            calls[draw](tree)
        assert tree.state_dict()["stream_calls"] == before["stream_calls"] == 0
        assert_same_state(tree.state_dict(), before)
    tree.update([2], [4.0])  # three positive items now: the same call succeeds and advances
    calls[draw](tree)
    assert tree.state_dict()["stream_calls"] == 1


def test_all_zero_tree_refuses_to_sample():
    tree = isample.SumTree(5, seed=0)
    before = tree.state_dict()
    with pytest.raises(ValueError, match="zero"):
        tree.sample(1)
    with pytest.raises(ValueError, match="zero"):
        tree.sample_from_uniforms([0.5])
    with pytest.raises(ValueError, match="zero"):
        tree.probability()
    with pytest.raises(ValueError, match="positive"):
        tree.sample(1, replace=False)
    assert_same_state(tree.state_dict(), before)  # the stream did not move either
    assert tree.sample(0).shape == (0,) and tree.sample(0, replace=False).shape == (0,)


@pytest.mark.parametrize(
    "capacity, error",
    [(0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError), (2**41, ValueError),
     (2**63, ValueError), (np.float64(3), TypeError), (None, TypeError)],
)
def test_bad_capacity(capacity, error):
    with pytest.raises(error):
        isample.SumTree(capacity)


def test_capacity_beyond_memory_raises_memory_error_with_the_size():
    with pytest.raises(MemoryError, match="GiB"):
        isample.SumTree(2**39)


def test_bad_device():
    with pytest.raises(ValueError, match="device"):
        isample.SumTree(4, device="tpu")


def test_capacity_one(kernels):
    tree = isample.SumTree(1, seed=0)
    tree.update([0], [0.25])
    assert tree.sample(10).tolist() == [0] * 10
    assert tree.sample(1, replace=False).tolist() == [0]
    assert tree.probability().tolist() == [1.0]
    assert tree.sample_from_uniforms([0.0, 0.999]).tolist() == [0, 0]
    tree.update([0], [0.0])
    with pytest.raises(ValueError):
        tree.sample(1)


def test_inputs_of_every_array_kind_are_accepted():
    tree = isample.SumTree(6, seed=0)
    tree.update(np.array([0, 1], dtype=np.int32), np.array([1.0, 2.0], dtype=np.float32))
    tree.update(torch.tensor([2, 3], dtype=torch.int16), torch.tensor([3.0, 4.0], dtype=torch.float16))
    tree.update((4,), (5,))
    tree.update(torch.arange(6)[::2][2:], 6.0)  # non-contiguous view, scalar broadcast
    assert tree.get().tolist() == [1.0, 2.0, 3.0, 4.0, 6.0, 0.0]
    assert tree.get(torch.tensor([4, 4])[:1]).tolist() == [6.0]


def test_concurrent_threads_keep_the_tree_consistent(rng):
    """Calls are serialised inside the core: hammering one tree from threads is safe."""
    n = 200_000
    tree = isample.SumTree.from_weights(rng.random(n) + 0.1, seed=0)
    errors = []

    def worker(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            for _ in range(200):
                tree.update(local.integers(0, n, 512), local.random(512) + 0.1)
                draws = tree.sample(256)
                assert ((draws >= 0) & (draws < n)).all()
                tree.sample(20_000, replace=False)  # long call: releases the GIL
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    run_threads(worker, 4)
    assert not errors
    leaves = tree.get().numpy()
    assert isample.SumTree.from_weights(leaves).total == tree.total


def test_nbytes_matches_the_layout_formula():
    for n in (1, 1000, 1_000_000):
        tree = isample.SumTree(n, seed=0)
        leaf_slots = -(-n // 16) * 16
        # internal levels, each padded to a block of 16
        internal, nodes = 0, leaf_slots // 16
        while True:
            internal += -(-nodes // 16) * 16
            if nodes == 1:
                break
            nodes = -(-nodes // 16)
        assert tree.nbytes == 8 * (leaf_slots + internal)
    assert isample.SumTree(10**6).nbytes / 10**6 < 8.6


# -- inclusion probabilities --------------------------------------------------------------------


@pytest.mark.statistical
def test_inclusion_weighted_sum_is_unbiased(rng):
    """sum over the sample of f / pi estimates sum(f) without bias (priority sampling)."""
    n, k, calls = 40, 12, 20_000
    weights = rng.random(n) ** 4 + 1e-3
    f = rng.random(n) * 10 + 30 * weights  # correlated with the weights: a naive estimator is biased
    tree = isample.SumTree.from_weights(weights, seed=0)
    ht, naive = [], []
    p = weights / weights.sum()
    for call in range(calls):
        idx, inclusion = tree.sample_with_inclusion(k, seed=call)
        idx = idx.numpy()
        ht.append((f[idx] / inclusion.numpy()).sum())
        naive.append((f[idx] / (k * p[idx])).sum())  # 1 / (k p): right only with replacement
    for estimates, unbiased in ((np.array(ht), True), (np.array(naive), False)):
        z = (estimates.mean() - f.sum()) / (estimates.std(ddof=1) / math.sqrt(calls))
        assert (abs(z) < 4.0) if unbiased else (abs(z) > 8.0), z


def test_inclusion_probabilities_edge_cases(rng):
    weights = rng.random(100)
    weights[::3] = 0.0
    tree = isample.SumTree.from_weights(weights, seed=0)
    positive = int((weights > 0).sum())
    idx, inclusion = tree.sample_with_inclusion(positive, seed=1)  # everything drawable: pi = 1
    assert sorted(idx.tolist()) == np.flatnonzero(weights).tolist()
    assert torch.all(inclusion == 1.0)
    idx, inclusion = tree.sample_with_inclusion(10, seed=1)
    assert torch.all((inclusion > 0) & (inclusion <= 1))
    # the same draw as the race itself
    assert torch.equal(idx, tree.sample(10, replace=False, seed=1, method="race"))
    with pytest.raises(ValueError):
        tree.sample_with_inclusion(positive + 1)


def test_softmax_blend_is_an_exponential_moving_average():
    tree = isample.SoftmaxTree(4, seed=0)
    tree.update([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    tree.blend([1, 2, 2], [10.0, 0.0, 5.0], keep=0.25)
    assert tree.get().tolist() == [1.0, 0.25 * 2 + 7.5, 0.25 * 3 + 0.75 * 5, 4.0]
    with pytest.raises(ValueError):
        tree.blend([0], [1.0], keep=1.5)
    with pytest.raises(ValueError):
        tree.blend([0], [float("nan")], keep=0.5)
    assert tree.get().tolist()[0] == 1.0


def test_python_floats_keep_full_precision():
    """Regression: lists of Python floats once passed through torch's float32 default dtype."""
    tree = isample.SumTree(3, seed=0)
    values = [5e-324, 0.1, 1e300]
    tree.update([0, 1, 2], values)
    assert tree.get().tolist() == values
    soft = isample.SoftmaxTree(2, seed=0)
    soft.update((0, 1), (0.1, 1e-310))
    assert soft.get().tolist() == [0.1, 1e-310]
    with pytest.raises(TypeError):
        tree.update([0], ["0.5"])
    with pytest.raises(TypeError):
        tree.update([0], [None])


# -- the stub of the compiled core ------------------------------------------------------------


def _stub_surface() -> dict:
    """From python/isample/_core.pyi: {name: params or None} for module functions, and
    {class: {member: params or None}} (inherited stub members included); params are the
    argument names of a method, None for properties and attributes."""
    import ast
    import pathlib

    stub = pathlib.Path(isample.__file__).with_name("_core.pyi")
    module = ast.parse(stub.read_text())
    classes, functions = {}, {}

    def params(node):
        return [a.arg for a in node.args.args if a.arg != "self"]

    for node in module.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            members = {}
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in classes:
                    members.update(classes[base.id])
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
                    members[item.name] = None if is_property else params(item)
                elif isinstance(item, ast.FunctionDef):
                    members["__init__"] = params(item)
                elif isinstance(item, ast.AnnAssign):
                    members[item.target.id] = None
            classes[node.name] = members
    return {"functions": functions, "classes": classes}


def _runtime_params(function) -> list:
    """Argument names from the signature line pybind11 writes at the top of a docstring."""
    import re

    signature = function.__doc__.strip().splitlines()[0]
    return [name for name in re.findall(r"[(,] ?(\w+): ", signature) if name != "self"]


def test_core_stub_matches_the_compiled_module():
    from isample import _core

    surface = _stub_surface()
    public_classes = {name for name in surface["classes"] if not name.startswith("_")}
    runtime = {name for name in dir(_core) if not name.startswith("_")}
    assert set(surface["functions"]) | public_classes == runtime
    for name, params in surface["functions"].items():
        assert _runtime_params(getattr(_core, name)) == params, name
    for name in public_classes - {"OutOfMemory"}:
        cls = getattr(_core, name)
        stub = surface["classes"][name]
        members = {m for m in dir(cls) if not m.startswith("_")}
        assert {m for m in stub if not m.startswith("_")} == members, name  # dunders: checked below
        assert _runtime_params(cls.__init__) == stub["__init__"], f"{name}.__init__"
        for member, params in stub.items():
            if params is not None and member != "__init__":
                assert _runtime_params(getattr(cls, member)) == params, f"{name}.{member}"
            elif member != "__init__":
                assert isinstance(getattr(cls, member), property), f"{name}.{member} is a method in _core"


# -- the fast paths: plain tensors and arrays read by the core itself ----------------------------


@pytest.fixture
def general_path_only():
    """The core reads no tensor or array itself: every call takes the general Python path."""
    isample._core.configure_arrays(None, None)
    yield
    isample._backend.configure_fast_paths()


def _argument_forms(indices, values):
    """(name, indices, values): the same numbers in every form the API takes."""
    i64, f64 = np.asarray(indices, dtype=np.int64), np.asarray(values, dtype=np.float64)
    double_i = torch.from_numpy(np.repeat(i64, 2))[::2]  # strided views
    double_v = torch.from_numpy(np.repeat(f64, 2))[::2]
    return [
        ("int64 and float64 tensors", torch.from_numpy(i64.copy()), torch.from_numpy(f64.copy())),
        ("float32 tensor", torch.from_numpy(i64.copy()), torch.from_numpy(f64.astype(np.float32))),
        ("numpy arrays", i64.copy(), f64.copy()),
        ("numpy float32", i64.copy(), f64.astype(np.float32)),
        ("strided views", double_i, double_v),
        ("int32 indices", torch.from_numpy(i64.astype(np.int32)), torch.from_numpy(f64.copy())),
        ("lists", i64.tolist(), f64.tolist()),
        ("requires grad", torch.from_numpy(i64.copy()), torch.from_numpy(f64.copy()).requires_grad_()),
        ("a parameter", torch.from_numpy(i64.copy()), torch.nn.Parameter(torch.from_numpy(f64.copy()))),
        ("big-endian numpy", i64.astype(">i8"), f64.astype(">f8")),
        ("negated view", torch.from_numpy(i64.copy()), (-torch.from_numpy(f64.copy()))._neg_view()),  # reads +values
    ]


def test_the_fast_path_reads_plain_arrays_only():
    tree = isample.SumTree(8, seed=0)
    i, v = torch.tensor([1, 2]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert tree._fast.update_arrays(i, v)
    assert tree._fast.update_arrays(i.numpy(), v.float().numpy())
    for bad_i, bad_v in [
        (i, v[:1]),  # lengths differ
        (i.int(), v),
        (i, v.to(torch.int64)),
        (i.double(), v),
        (i, torch.tensor([[1.0, 2.0]], dtype=torch.float64)),
        (i, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[::2]),
        ([1, 2], v),
        (i, torch.tensor([1.0, 2.0], dtype=torch.float64)._neg_view()),
        (i, torch.nn.Parameter(v)),
    ]:
        assert not tree._fast.update_arrays(bad_i, bad_v)
    assert tree.get().tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("softmax", [False, True])
def test_fast_and_general_paths_write_the_same_bits(softmax, general_path_only, rng):
    n = 300
    indices = rng.integers(0, n, 64)
    indices[:5] = indices[5]  # repeats: the last value wins, and blend reads the score before the call
    values = rng.random(64) * 3.0 + 0.1
    forms = _argument_forms(indices, values)

    def run(i, v):
        tree = isample.SoftmaxTree(n, temperature=0.7, seed=3) if softmax else isample.SumTree(n, seed=3)
        tree.update(i, v)
        if softmax:
            tree.blend(i, v, 0.3)
        return tree.get(), tree.total, tree.sample(50, seed=1), tree.sample(20, replace=False, seed=2)

    general = {name: run(i, v) for name, i, v in forms}
    isample._backend.configure_fast_paths()
    for name, i, v in forms:
        fast = run(i, v)
        assert torch.equal(fast[0], general[name][0]) and fast[1] == general[name][1], name
        assert torch.equal(fast[2], general[name][2]) and torch.equal(fast[3], general[name][3]), name
        if "float32" not in name:  # every exact form holds the same numbers
            assert torch.equal(fast[0], general["int64 and float64 tensors"][0]), name


def test_fast_paths_raise_the_general_paths_errors(general_path_only):
    cases = [
        (IndexError, lambda t: t.update(torch.tensor([0, 9]), torch.ones(2, dtype=torch.float64))),
        (IndexError, lambda t: t.update(np.array([-1]), np.ones(1))),
        (ValueError, lambda t: t.update(torch.tensor([0]), torch.tensor([float("nan")], dtype=torch.float64))),
        (ValueError, lambda t: t.update(torch.tensor([0]), torch.tensor([-1.0]))),
        (ValueError, lambda t: t.update(torch.tensor([0, 1]), torch.ones(3, dtype=torch.float64))),
        (ValueError, lambda t: t.sample(2, replace=False, method="race")),
        (ValueError, lambda t: t.sample(4, replace=False)),
        (ValueError, lambda t: t.sample(3, method="race")),
        (TypeError, lambda t: t.sample(2.0)),
        (TypeError, lambda t: t.sample(True)),
        (ValueError, lambda t: t.sample(-1)),
        (TypeError, lambda t: t.sample(2, seed=1.5)),
        (TypeError, lambda t: t.sample(2, replace="yes")),
    ]
    messages = {}
    for fast in (False, True):
        if fast:
            isample._backend.configure_fast_paths()
        for j, (error, call) in enumerate(cases):
            tree = isample.SumTree.from_weights([1.0, 0.0, 0.0], seed=0)
            with pytest.raises(error) as caught:
                call(tree)
            messages.setdefault(j, set()).add(str(caught.value))
            assert tree.get().tolist() == [1.0, 0.0, 0.0] and tree._core.stream_calls == 0
    assert all(len(texts) == 1 for texts in messages.values()), messages


def test_fast_sample_draws_what_the_general_path_draws(general_path_only):
    weights = np.random.default_rng(5).random(20_000)
    calls = [
        dict(k=300), dict(k=0), dict(k=128, seed=7), dict(k=128, seed=-7), dict(k=50, seed=2**70),
        dict(k=9000, replace=False), dict(k=9000, replace=False, method="race", seed=3),
        dict(k=40, replace=False, method="removal"), dict(k=20_000, replace=False), dict(k=5, seed=np.int64(4)),
        dict(k=np.int64(6)), dict(k=6, replace=np.bool_(False)),
    ]
    draws = {}
    for fast in (False, True):
        if fast:
            isample._backend.configure_fast_paths()
        tree = isample.SumTree.from_weights(weights, seed=11)
        draws[fast] = [tree.sample(**call) for call in calls] + [tree._core.stream_calls]
    for a, b in zip(draws[False][:-1], draws[True][:-1]):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    assert draws[False][-1] == draws[True][-1]


def test_fast_get_probability_and_sample_with_weights(general_path_only):
    weights = np.random.default_rng(6).random(5000)
    weights[::7] = 0.0
    index = np.random.default_rng(7).integers(0, 5000, 300)
    results = {}
    for fast in (False, True):
        if fast:
            isample._backend.configure_fast_paths()
        tree = isample.SumTree.from_weights(weights, seed=2)
        soft = isample.SoftmaxTree.from_scores(weights, seed=2)
        drawn, held = tree.sample_with_weights(200)  # the tree's own stream, as sample()
        again, held_again = tree.sample_with_weights(50, seed=9)
        results[fast] = [
            tree.get(torch.from_numpy(index)), tree.get(index), tree.probability(index), soft.get(index),
            soft.probability(torch.from_numpy(index)), drawn, held, again, held_again, tree.sample(10),
        ]
        assert torch.equal(held, tree.get(drawn)) and torch.equal(again, isample.SumTree.from_weights(weights, seed=2).sample(50, seed=9))
        assert (held > 0).all()
    for a, b in zip(results[False], results[True]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(IndexError, match="out of range"):
        isample.SumTree(4, seed=0).get(torch.tensor([4]))


def test_take_rows_reads_rows_of_any_plain_tensor(general_path_only):
    g = torch.Generator().manual_seed(0)
    sources = [
        torch.randn(50, 4, generator=g),
        torch.randint(0, 100, (50,), generator=g),
        torch.rand(50, generator=g) > 0.5,
        torch.randint(0, 255, (50, 3, 2), generator=g).to(torch.uint8),
        torch.randn(50, generator=g, dtype=torch.float64),
    ]
    index = torch.tensor([3, 0, 49, 3, 17])
    expected = [source[index] for source in sources]
    isample._backend.configure_fast_paths()
    assert isample._core.take_rows(sources, index) is not None  # the core read them all
    for taken in (isample._backend.take_rows(sources, index), isample._backend.take_rows(sources, index.numpy())):
        for a, b in zip(taken, expected):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # not plain: a transposed view, a complex tensor, a list of indices: torch takes them
    odd = [torch.randn(4, 50, generator=g).t(), torch.randn(50, dtype=torch.complex64, generator=g)]
    assert isample._core.take_rows(odd, index) is None
    for a, source in zip(isample._backend.take_rows(odd, index), odd):
        assert torch.equal(a, source[index])
    with pytest.raises(IndexError):
        isample._backend.take_rows(sources, torch.tensor([50]))


# -- issue 19: inputs that used to reach torch, numpy or pybind11 raw ---------------------------


def test_lazily_negated_views_are_read_as_their_values():
    """x.conj().imag is a view whose sign lives in a flag, not in memory: it must be resolved."""
    minus_two = torch.tensor([1 + 2j], dtype=torch.complex128).conj().imag  # -2.0, raw memory +2.0
    assert minus_two.is_neg() and minus_two.is_contiguous()
    tree = isample.SumTree(2, seed=0)
    with pytest.raises(ValueError, match="-2"):
        tree.update([0], minus_two)
    assert tree.get().tolist() == [0.0, 0.0]
    tree.update([0], -minus_two)  # +2 as a negated view of -2
    assert tree.get().tolist() == [2.0, 0.0]
    soft = isample.SoftmaxTree(2, seed=0)
    soft.update([1], minus_two)
    assert soft.get().tolist() == [0.0, -2.0]
    index = torch.tensor([-1])._neg_view()  # item 1, negated lazily
    soft.update(index, [3.0])
    assert soft.get().tolist() == [0.0, 3.0]


def test_numpy_arrays_of_every_byte_order_and_width_are_read():
    tree = isample.SumTree(4, seed=0)
    tree.update(np.array([0, 3], dtype=">i8"), np.array([1.5, 2.5], dtype=">f8"))
    tree.update(np.array([1], dtype=np.uint64), np.array([0.25], dtype=np.longdouble))
    assert tree.get().tolist() == [1.5, 0.25, 0.0, 2.5]
    with pytest.raises(IndexError, match="above"):
        tree.update(np.array([2**64 - 1], dtype=np.uint64), [1.0])  # would wrap to -1 in int64


@pytest.mark.parametrize("values", [torch.tensor([1.0]).to_sparse(), torch.empty(1, device="meta")])
def test_sparse_and_meta_tensors_are_refused_with_a_type_error(values):
    tree = isample.SumTree(2, seed=0)
    with pytest.raises(TypeError, match="values"):
        tree.update([0], values)


def test_sample_arguments_are_checked_before_anything_is_allocated(monkeypatch):
    from isample import _backend

    tree = isample.SumTree.from_weights([1.0, 1.0, 1.0, 1.0], seed=0)

    def no_allocation(k, device):
        raise AssertionError(f"{k} indices allocated before the arguments were checked")

    monkeypatch.setattr(_backend, "empty_indices", no_allocation)
    with pytest.raises(ValueError, match="distinct"):
        tree.sample(10**12, replace=False)
    with pytest.raises(ValueError, match="distinct"):
        tree.sample_with_inclusion(5)
    with pytest.raises(MemoryError, match="bytes"):
        tree.sample(10**12)
    for kwargs, error in [({"method": None}, ValueError), ({"method": "fast"}, ValueError),
                          ({"replace": "no"}, TypeError), ({"replace": None}, TypeError)]:
        with pytest.raises(error):
            tree.sample(2, **kwargs)


@pytest.mark.parametrize("kind", ["sum", "softmax"])
def test_trees_pickle_and_deep_copy_through_state_dict(kind):
    import copy
    import pickle

    tree = isample.SumTree.from_weights([1.0, 2.0, 3.0], seed=4) if kind == "sum" else (
        isample.SoftmaxTree.from_scores([1.0, 2.0, 3.0], temperature=2.0, seed=4))
    tree.sample(5)
    for twin in (pickle.loads(pickle.dumps(tree)), copy.deepcopy(tree)):
        assert type(twin) is type(tree) and torch.equal(twin.get(), tree.get())
        assert twin.state_dict()["stream_calls"] == tree.state_dict()["stream_calls"]
        assert torch.equal(twin.sample(50), copy.deepcopy(tree).sample(50))
    pickle.dumps(isample.SumTree(3))  # an empty tree too
