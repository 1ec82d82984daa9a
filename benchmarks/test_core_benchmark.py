"""isample's trees against what a user would write instead, on the DESIGN.md workloads.

Run:  python -m pytest benchmarks/test_core_benchmark.py --benchmark-only \
          --benchmark-json=benchmarks/results/core.json
      python benchmarks/report.py --compact benchmarks/results/core.json
Table: python benchmarks/report.py benchmarks/results/core.json

Baselines keep a float64 weight tensor and, because scores change every step, redo their
O(n) work on every call: torch.multinomial, numpy's Generator.choice, numpy cumsum +
searchsorted, and for k distinct items numpy's exponential race (keys E / w, the k smallest
by argpartition, then sorted). Their "update" is a plain indexed assignment. Every benchmark's
extra_info records the CPU (lscpu: model, caches) and the versions of numpy, torch and the
peers. pytest-benchmark times one method after another; ``isample bench`` times the same
cells with the contenders alternating, which a loaded machine disturbs less.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isample
from isample import bench

N_SMALL, N_LARGE, BATCH = 50_000, 10_000_000, 128


@pytest.fixture(autouse=True)
def _machine(benchmark):
    benchmark.extra_info.update(bench.machine_summary())


def weights_of(n: int) -> np.ndarray:
    return np.random.default_rng(0).random(n) + 1e-3


class Workload:
    """One n: the isample tree and the baselines' state, built once per size."""

    cache: dict = {}

    @classmethod
    def get(cls, n: int) -> "Workload":
        if n not in cls.cache:
            cls.cache[n] = cls(n)
        return cls.cache[n]

    def __init__(self, n: int) -> None:
        self.n = n
        self.numpy_weights = weights_of(n)
        self.torch_weights = torch.from_numpy(self.numpy_weights.copy())
        self.tree = isample.SumTree.from_weights(self.numpy_weights, seed=0)
        rng = np.random.default_rng(1)
        self.indices = torch.from_numpy(rng.integers(0, n, BATCH))
        self.values = torch.from_numpy(rng.random(BATCH) + 1e-3)
        self.numpy_rng = np.random.default_rng(2)


def _slow(benchmark, function, rounds: int = 5):
    return benchmark.pedantic(function, rounds=rounds, iterations=1, warmup_rounds=1)


# -- update 128 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", ["isample", "torch_index_put"])
def test_update_128(benchmark, n, method):
    benchmark.group = f"update {BATCH}, n={n:,}"
    w = Workload.get(n)
    if method == "isample":
        benchmark(w.tree.update, w.indices, w.values)
    else:
        weights = w.torch_weights.clone()

        def update():
            weights[w.indices] = w.values

        benchmark(update)


# -- sample 128 with replacement -----------------------------------------------------------------


def _sampler(w: Workload, method: str):
    if method == "isample":
        return lambda: w.tree.sample(BATCH)
    if method == "torch_multinomial":
        return lambda: torch.multinomial(w.torch_weights, BATCH, replacement=True)
    if method == "numpy_choice":
        return lambda: w.numpy_rng.choice(w.n, BATCH, p=w.numpy_weights / w.numpy_weights.sum())
    if method == "numpy_cumsum_searchsorted":

        def draw():
            cumulative = np.cumsum(w.numpy_weights)
            return np.searchsorted(cumulative, w.numpy_rng.random(BATCH) * cumulative[-1], side="right")

        return draw
    raise ValueError(method)


SAMPLERS = ["isample", "torch_multinomial", "numpy_choice", "numpy_cumsum_searchsorted"]


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", SAMPLERS)
def test_sample_128(benchmark, n, method):
    benchmark.group = f"sample {BATCH} with replacement, n={n:,}"
    w = Workload.get(n)
    draw = _sampler(w, method)
    if method != "isample" and n == N_LARGE:
        _slow(benchmark, draw)
    else:
        benchmark(draw)


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", ["isample", "torch_multinomial"])
def test_step_sample_and_update(benchmark, n, method):
    benchmark.group = f"step: sample {BATCH} + update them, n={n:,}"
    w = Workload.get(n)
    if method == "isample":
        tree = w.tree

        def step():
            tree.update(tree.sample(BATCH), w.values)

        benchmark(step)
    else:
        weights = w.torch_weights.clone()

        def step():
            weights[torch.multinomial(weights, BATCH, replacement=True)] = w.values

        if n == N_LARGE:
            _slow(benchmark, step)
        else:
            benchmark(step)


# -- without replacement -------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(N_SMALL, 8192), (N_SMALL, 30_000), (1_000_000, 128)])
@pytest.mark.parametrize("method", ["isample", "numpy_race", "torch_multinomial", "numpy_choice"])
def test_sample_without_replacement(benchmark, n, k, method):
    benchmark.group = f"{k:,} of {n:,} without replacement"
    w = Workload.get(n)
    if method == "isample":
        benchmark(w.tree.sample, k, replace=False)
    elif method == "numpy_race":
        race = bench.NumpyRaceMethod(seed=2)
        race.setup(w.numpy_weights)
        _slow(benchmark, lambda: race.sample_without_replacement(k), rounds=20)
    elif method == "torch_multinomial":
        _slow(benchmark, lambda: torch.multinomial(w.torch_weights, k, replacement=False), rounds=10)
    else:
        p = w.numpy_weights / w.numpy_weights.sum()
        _slow(benchmark, lambda: w.numpy_rng.choice(n, k, replace=False, p=p), rounds=10)


# -- build -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["isample", "numpy_cumsum", "torch_cumsum"])
def test_build_10m(benchmark, method):
    benchmark.group = f"build from an array, n={N_LARGE:,}"
    w = Workload.get(N_LARGE)
    if method == "isample":  # a new tree, as np.cumsum makes a new array
        _slow(benchmark, lambda: isample.SumTree.from_weights(w.numpy_weights, seed=0), rounds=7)
    elif method == "numpy_cumsum":
        _slow(benchmark, lambda: np.cumsum(w.numpy_weights), rounds=7)
    else:
        _slow(benchmark, lambda: torch.cumsum(w.torch_weights, 0), rounds=7)
