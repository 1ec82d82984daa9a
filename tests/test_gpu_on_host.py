"""The GPU algorithms (csrc/gpu/device_tree.h), built for the CPU against Thrust's OpenMP
system, checked against the CPU tree. The CUDA build compiles the same header; OpenMP runs
it on several threads here, so an order-dependent update shows up as a mismatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue, power_of_two_weights, reference_descent
from test_softmax_tree import HUGE_SPREADS, assert_matches_softmax, check_bad_softmax_input, check_huge_spread
from test_sum_tree import assert_same_state

pytestmark = [
    pytest.mark.gpu_on_host,
    pytest.mark.skipif(not isample.build_info()["gpu_on_host"], reason="built without the host GPU algorithms"),
]

HOST = {"_implementation": "gpu_on_host"}


def host_sum(n, **kwargs):
    return isample.SumTree(n, **HOST, **kwargs)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 4096, 70_001])
def test_descent_matches_numpy_and_cpu_exactly(n, rng):
    weights = power_of_two_weights(rng, n)
    gpu = isample.SumTree.from_weights(weights, seed=0, **HOST)
    cpu = isample.SumTree.from_weights(weights, seed=0)
    u = np.concatenate([rng.random(20_000), [0.0, np.nextafter(1.0, 0.0)]])
    np.testing.assert_array_equal(gpu.sample_from_uniforms(u).numpy(), reference_descent(weights, u))
    assert gpu.total == cpu.total


def test_parity_with_the_cpu_tree_on_arbitrary_weights(rng):
    """Same layout, same sums, same descent code: bit-identical on any weights."""
    n = 100_003
    weights = rng.random(n) ** 3
    weights[rng.random(n) < 0.3] = 0.0
    gpu = isample.SumTree.from_weights(weights, seed=7, **HOST)
    cpu = isample.SumTree.from_weights(weights, seed=7)
    for batch in (17, 256, 257, 5000):  # both the scanned and the sorted batch paths
        idx = rng.integers(0, n, batch)
        values = rng.random(batch) * 10.0 ** rng.integers(-5, 5, batch)
        gpu.update(idx, values)
        cpu.update(idx, values)
        assert gpu.total == cpu.total
    u = rng.random(50_000)
    assert torch.equal(gpu.sample_from_uniforms(u), cpu.sample_from_uniforms(u))
    assert torch.equal(gpu.sample(10_000, seed=3), cpu.sample(10_000, seed=3))  # the same stream
    assert torch.equal(gpu.probability(), cpu.probability())
    assert gpu.num_positive == cpu.num_positive
    # distinct draws: the device's log-domain race orders items as the CPU's linear race does
    assert torch.equal(gpu.sample(2000, replace=False, seed=4), cpu.sample(2000, replace=False, seed=4, method="race"))
    gi, gp = gpu.sample_with_inclusion(2000, seed=5)
    ci, cp = cpu.sample_with_inclusion(2000, seed=5)
    assert torch.equal(gi, ci)
    torch.testing.assert_close(gp, cp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch", [5, 300])
def test_repeated_index_last_value_wins(batch, rng):
    tree = host_sum(1000, seed=0)
    idx = rng.integers(0, 20, batch)  # many repeats
    values = rng.random(batch)
    tree.update(idx, values)
    expected = np.zeros(1000)
    for i, v in zip(idx, values):
        expected[i] = v
    np.testing.assert_array_equal(tree.get().numpy(), expected)
    assert tree.num_positive == int((expected > 0).sum())


def test_totals_stay_exact_after_many_updates(rng):
    n = 20_000
    gpu = host_sum(n, seed=0)
    for _ in range(80):
        batch = int(rng.choice([64, 256, 1000]))
        idx = rng.integers(0, n, batch)
        values = rng.random(batch) * 10.0 ** rng.integers(-12, 13, batch)
        values[rng.random(batch) < 0.1] = 0.0
        gpu.update(idx, values)
    leaves = gpu.get().numpy()
    assert abs(gpu.total - math.fsum(leaves.tolist())) <= 1e-12 * gpu.total
    assert isample.SumTree.from_weights(leaves).total == gpu.total  # as a fresh CPU build


@pytest.mark.statistical
def test_draw_frequencies(rng):
    weights = rng.random(50) ** 2
    weights[::6] = 0.0
    tree = isample.SumTree.from_weights(weights, seed=1, **HOST)
    counts = np.bincount(tree.sample(300_000).numpy(), minlength=50)
    assert chi_square_pvalue(counts, weights / weights.sum()) > ALPHA
    wrong = weights.copy()
    wrong[np.argmax(weights)] *= 1.1  # negative control: a 10% error on the heaviest item
    assert chi_square_pvalue(counts, wrong / wrong.sum()) < ALPHA


@pytest.mark.statistical
def test_inclusion_weights_are_unbiased(rng):
    # Each call runs several OpenMP regions here (~2 ms); the CPU suite tests the statistics
    # with more calls, and test_parity... checks these draws equal the CPU's.
    n, k, calls = 40, 12, 1500
    weights = rng.random(n) ** 4 + 1e-3
    f = rng.random(n) * 10 + 30 * weights
    tree = isample.SumTree.from_weights(weights, seed=0, **HOST)
    estimates = []
    for call in range(calls):
        idx, inclusion = tree.sample_with_inclusion(k, seed=call)
        estimates.append((f[idx.numpy()] / inclusion.numpy()).sum())
    estimates = np.array(estimates)
    z = (estimates.mean() - f.sum()) / (estimates.std(ddof=1) / math.sqrt(calls))
    assert abs(z) < 4.0


@pytest.mark.parametrize("spread", [1.0, 1e4, 1e6])
def test_softmax_extremes_and_rebases(spread, rng):
    scores = (rng.random(2000) - 0.5) * spread
    tree = isample.SoftmaxTree.from_scores(scores, temperature=0.5, seed=0, **HOST)
    assert_matches_softmax(tree, scores, 0.5)
    for shift in (spread * 10, -spread * 30, 1e9, -1e9):
        idx = rng.integers(0, scores.size, 300)  # 300: the sorted batch path
        values = scores[idx] + shift * rng.random(300)
        tree.update(idx, values)
        scores[idx] = values
        assert_matches_softmax(tree, scores, 0.5)
    tree.temperature = 3.0
    assert_matches_softmax(tree, scores, 3.0)


@pytest.mark.parametrize("scores, temperature", HUGE_SPREADS)
def test_softmax_scores_near_the_float_limits(scores, temperature):
    """s - ref overflows here: the kernels must use the same exponent routine as the CPU."""
    check_huge_spread(scores, temperature, **HOST)
    cpu = isample.SoftmaxTree.from_scores(scores, temperature=temperature, seed=0)
    gpu = isample.SoftmaxTree.from_scores(scores, temperature=temperature, seed=0, **HOST)
    torch.testing.assert_close(gpu.probability(), cpu.probability(), rtol=1e-15, atol=0)


def test_softmax_blend_and_state_match_the_cpu(rng):
    cpu = isample.SoftmaxTree(500, temperature=0.7, seed=3)
    gpu = isample.SoftmaxTree(500, temperature=0.7, seed=3, **HOST)
    for _ in range(20):
        idx, values = rng.integers(0, 500, 64), rng.normal(size=64) * 30
        cpu.blend(idx, values, 0.2)
        gpu.blend(idx, values, 0.2)
    assert torch.equal(gpu.get(), cpu.get())
    torch.testing.assert_close(gpu.probability(), cpu.probability(), rtol=1e-13, atol=0)
    state = gpu.state_dict()
    other = isample.SoftmaxTree(500, seed=0, **HOST)
    other.load_state_dict(state)
    assert torch.equal(other.probability(), gpu.probability())
    assert torch.equal(other.sample(100), gpu.sample(100))
    cpu_copy = isample.SoftmaxTree(500, seed=0)
    cpu_copy.load_state_dict(state)  # states move between back ends
    torch.testing.assert_close(cpu_copy.probability(), gpu.probability(), rtol=1e-13, atol=0)


def test_bad_input_is_refused_and_changes_nothing():
    tree = host_sum(8, seed=0)
    tree.update([0, 1], [1.0, 2.0])
    tree.sample(3)  # the stream is at call 1
    before = tree.get().clone()
    state = tree.state_dict()
    for error, call in [
        (IndexError, lambda: tree.update([8], [1.0])),
        (IndexError, lambda: tree.update([2, 300], [1.0, 1.0])),
        (ValueError, lambda: tree.update([2], [float("nan")])),
        (ValueError, lambda: tree.update([2, 3], [1.0, -1.0])),
        (ValueError, lambda: tree.update(list(range(8)) * 40, [1.0] * 319 + [float("inf")])),  # sorted path
        (ValueError, lambda: tree.assign([1.0] * 7 + [float("nan")])),
        (IndexError, lambda: tree.get([9])),
        (IndexError, lambda: tree.probability([-1])),
        (ValueError, lambda: tree.sample_from_uniforms([0.5, 1.0])),
        (ValueError, lambda: tree.sample(3, replace=False)),
        (ValueError, lambda: tree.sample_with_inclusion(3)),
        (ValueError, lambda: tree.sample(9, replace=False)),
        (ValueError, lambda: tree.sample(2, replace=False, method="removal")),
    ]:
        with pytest.raises(error):
            call()
        assert torch.equal(tree.get(), before) and tree.total == 3.0 and tree.num_positive == 2
        assert_same_state(tree.state_dict(), state)
    twin = host_sum(8, seed=1)
    twin.load_state_dict(state)
    assert torch.equal(tree.sample(100), twin.sample(100))  # no rejected draw moved the stream
    empty = host_sum(4, seed=0)
    for call in (lambda: empty.sample(1), lambda: empty.sample(1, replace=False), lambda: empty.sample_with_inclusion(1)):
        with pytest.raises(ValueError, match="zero|positive"):
            call()
        assert empty.state_dict()["stream_calls"] == 0
    soft = isample.SoftmaxTree(4, seed=0, **HOST)
    with pytest.raises(ValueError, match="score"):
        soft.update([1], [float("inf")])
    assert soft.get().tolist() == [0.0] * 4
    with pytest.raises(ValueError):
        isample.SumTree(4, device="cpu", _implementation="gpu_on_cloud")


def test_softmax_bad_input_is_refused_and_changes_nothing():
    check_bad_softmax_input(**HOST)


def test_sampler_runs_on_the_host_build(rng):
    """The ImportanceSampler on a device tree (swapped in by hand: the sampler picks CUDA
    trees by its device): its epochs equal those on the CPU tree."""
    cpu = isample.ImportanceSampler(300, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=100, replacement=True, seed=2)
    host = isample.ImportanceSampler(300, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=100, replacement=True, seed=2)
    host._tree = isample.SoftmaxTree(300, seed=isample.sampler.derive_seed(2, "tree"), **HOST)
    scores = torch.from_numpy(rng.normal(size=300))
    for sampler in (cpu, host):
        sampler.update(range(300), scores)
    assert list(iter(cpu)) == list(iter(host))


def test_scratch_is_exact_and_large_scratch_is_given_back(rng):
    """Issue 21 item 3: a draw without replacement holds exactly 32 bytes per item (keys,
    items and their alternates for the radix sort; the host build has no CUB temporary),
    with no growth factor, and gives it back after the call above 64 MiB; a sorted batch's
    buffers grow by half as much again (batch sizes vary), a softmax update's likewise."""
    n = 5000
    tree = isample.SumTree.from_weights(rng.random(n) + 1e-3, seed=0, **HOST)
    core = tree._core
    assert core.scratch_nbytes == 0 and core.nbytes == isample.SumTree(n).nbytes  # the arrays, from the layout
    tree.sample(100, replace=False, seed=1)
    assert core.scratch_nbytes == 32 * n
    tree.sample(n, replace=False, seed=2)  # no regrowth
    assert core.scratch_nbytes == 32 * n
    tree.update(rng.integers(0, n, 300), rng.random(300))  # sorted batch: 4 buffers of 1.5 * 300 int64
    assert core.scratch_nbytes == 32 * n + 4 * 450 * 8
    big = 2_200_000  # 32 bytes each: 70.4 MB, above the 64 MiB kept
    large = isample.SumTree.from_weights(np.full(big, 1.0), seed=0, **HOST)
    drawn = large.sample(10, replace=False, seed=3)
    assert len(set(drawn.tolist())) == 10
    assert large._core.scratch_nbytes == 0
    soft = isample.SoftmaxTree(1000, seed=0, **HOST)
    soft.update(np.arange(128), rng.normal(size=128))
    assert soft._core.scratch_nbytes == 8 * (2 * 128 + 128)  # old and new leaves, with room to grow


def test_softmax_leaves_are_the_cpus_bit_for_bit(rng, kernels):
    """Issue 21 item 6: the CPU and GPU trees compute softmax leaves with one exp
    (fastmath.h's exp_shared), so leaves, totals and probabilities agree in every bit, with
    either build of the CPU kernels (the AVX2 one vectorises it) and on the host build of
    the GPU code (the CUDA build runs the same code: tests/test_cuda.py checks it on a GPU)."""
    scores = rng.normal(size=20_011) * 30
    cpu = isample.SoftmaxTree.from_scores(scores, temperature=0.7, seed=0)
    gpu = isample.SoftmaxTree.from_scores(scores, temperature=0.7, seed=0, **HOST)
    assert torch.equal(gpu.probability(), cpu.probability())
    assert gpu.log_total == cpu.log_total
    idx = rng.integers(0, scores.size, 200)
    values = scores[idx] + rng.normal(size=200)  # stays within the headroom: no rebase on either side
    cpu.update(idx, values)
    gpu.update(idx, values)
    assert torch.equal(gpu.probability(), cpu.probability())
    assert torch.equal(gpu.sample(5000, seed=1), cpu.sample(5000, seed=1))
    leaves = torch.empty(scores.size, dtype=torch.float64)
    cpu._core.export_leaves(leaves.data_ptr())
    exponents = (scores - scores.max()) / 0.7
    exponents[idx] = (values - scores.max()) / 0.7
    expected = np.empty_like(exponents)
    isample._core.exp_shared(exponents.ctypes.data, exponents.size, expected.ctypes.data)
    np.testing.assert_array_equal(leaves.numpy(), expected)


def test_a_large_softmax_batch_predicts_the_total_in_two_passes(rng):
    """PredictTotal sums k > 256 old and new leaves in groups of a fixed shape, then the
    groups: a batch that drives every leaf below e^-64 must still rebase, as on the CPU."""
    n = 70_000
    cpu = isample.SoftmaxTree(n, seed=0)
    gpu = isample.SoftmaxTree(n, seed=0, **HOST)
    scores = -100.0 - rng.random(n)  # every leaf e^-100: the total falls below e^-64
    for tree in (cpu, gpu):
        tree.update(np.arange(n), scores)
    assert gpu._core.reference == cpu._core.reference == scores.max()  # both rebased
    torch.testing.assert_close(gpu.probability(), cpu.probability(), rtol=1e-15, atol=0)
