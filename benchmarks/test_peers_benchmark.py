"""isample against its peers on the DESIGN.md workloads, as a pytest-benchmark suite.

Run:  python -m pytest benchmarks/test_peers_benchmark.py --benchmark-only \
          --benchmark-json=benchmarks/results/peers-pytest.json
Table: python benchmarks/report.py benchmarks/results/peers-pytest.json

The methods are the adapters of ``isample.bench`` (see its docstring for what each one
times); a peer that is not installed, or cannot run a workload, is skipped with the reason.
Every benchmark's extra_info records the CPU (lscpu: model, caches) and the peers' versions.
pytest-benchmark times one method after another; ``isample bench`` alternates them.
``python -m isample.bench`` runs the same comparisons over n = 1e4 .. 1e9 with exactness and
memory figures. The last benchmarks use a 1e9-item tree and are skipped when
/proc/meminfo's MemAvailable is below what the tree needs.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest
import torch

import isample
from isample import bench

N_SMALL, N_LARGE, N_HUGE = 50_000, 10_000_000, 1_000_000_000
METHODS = bench.METHOD_NAMES


@pytest.fixture(autouse=True)
def _machine(benchmark):
    benchmark.extra_info.update(bench.machine_summary())


class Built:
    """Each method's state at each n, built once (the build benchmarks build their own)."""

    cache: Dict[Tuple[str, int], bench.Method] = {}

    @classmethod
    def get(cls, name: str, n: int) -> bench.Method:
        key = (name, n)
        if key not in cls.cache:
            method_class = bench.METHODS[name]
            reason = method_class.unavailable()
            if reason:
                pytest.skip(reason)
            method = method_class(seed=0)
            need = method.state_bytes(n) + method.transient_bytes(n)
            if not bench.fits_in_memory(need):
                pytest.skip(f"needs ~{need / bench.GiB:.1f} GiB of free memory")
            method.setup(weights_of(n))
            cls.cache[key] = method
        return cls.cache[key]

    @classmethod
    def clear(cls) -> None:
        for method in cls.cache.values():
            method.release()
        cls.cache.clear()


_weights: Dict[int, np.ndarray] = {}


def weights_of(n: int) -> np.ndarray:
    if n not in _weights:
        _weights[n] = bench.timing_weights(n)
    return _weights[n]


def _run(benchmark, method: bench.Method, n: int, function) -> None:
    if method.linear_per_call and n >= 1_000_000:
        benchmark.pedantic(function, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark(function)


def _method_for(name: str, workload: str, n: int) -> bench.Method:
    method = Built.get(name, n)
    reason = method.supports(workload, n)
    if reason:
        pytest.skip(reason)
    return method


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", METHODS)
def test_update_128(benchmark, n, method):
    benchmark.group = f"update {bench.BATCH}, n={n:,}"
    m = _method_for(method, "update", n)
    indices, values = m.native(*bench.update_arguments(n))
    _run(benchmark, m, n, lambda: m.update(indices, values))


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", METHODS)
def test_sample_128(benchmark, n, method):
    benchmark.group = f"sample {bench.BATCH} with replacement, n={n:,}"
    m = _method_for(method, "sample", n)
    _run(benchmark, m, n, lambda: m.sample(bench.BATCH))


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", METHODS)
def test_step_sample_and_update(benchmark, n, method):
    benchmark.group = f"step: sample {bench.BATCH} + update them, n={n:,}"
    m = _method_for(method, "step", n)
    values = m.native_values(bench.update_arguments(n)[1])
    _run(benchmark, m, n, lambda: m.step(values))


@pytest.mark.parametrize("n, k", [(N_SMALL, 8192), (N_SMALL, 30_000), (1_000_000, 128), (N_LARGE, 128)])
@pytest.mark.parametrize("method", METHODS)
def test_sample_without_replacement(benchmark, n, k, method):
    benchmark.group = f"{k:,} of {n:,} without replacement"
    m = _method_for(method, f"wor{k}", n)
    if m.linear_per_call or k > 1000:
        benchmark.pedantic(lambda: m.sample_without_replacement(k), rounds=10, iterations=1, warmup_rounds=1)
    else:
        benchmark(lambda: m.sample_without_replacement(k))


@pytest.mark.parametrize("n", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("method", METHODS)
def test_build(benchmark, n, method):
    benchmark.group = f"build from an array, n={n:,}"
    m = _method_for(method, "build", n)
    weights = weights_of(n)
    rounds = 5 if n >= 1_000_000 else 50
    if m.build_is_setup:
        fresh = type(m)(seed=0)

        def build():
            fresh.release()
            fresh.setup(weights)

        benchmark.pedantic(build, rounds=rounds, iterations=1, warmup_rounds=1)
        fresh.release()
    else:
        try:
            m.build(weights[:16])
        except bench.Unsupported as reason:
            pytest.skip(str(reason))
        benchmark.pedantic(lambda: m.build(weights), rounds=rounds, iterations=1, warmup_rounds=1)


# -- n = 1e9, isample only --------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_tree():
    """A 1e9-item tree, built in chunks so that only the tree (~8.5 GB) must fit."""
    Built.clear()
    _weights.clear()
    need = bench.isample_tree_bytes(N_HUGE)
    available = bench.memory_available()
    if not bench.fits_in_memory(need, available):
        pytest.skip(
            f"a tree of 1e9 items needs {need / bench.GiB:.2f} GiB; "
            f"MemAvailable is {(available or 0) / bench.GiB:.2f} GiB"
        )
    tree = isample.SumTree(N_HUGE, seed=0)
    chunk = 10_000_000
    rng = np.random.default_rng(0)
    for start in range(0, N_HUGE, chunk):
        values = rng.random(chunk)
        values += 1e-3
        tree.update(torch.arange(start, start + chunk), values)
    yield tree
    del tree


@pytest.mark.parametrize("workload", ["update", "sample", "step", "wor128"])
@pytest.mark.parametrize("method", ["isample"])
def test_isample_at_1e9(benchmark, huge_tree, method, workload):
    benchmark.group = {
        "update": f"update {bench.BATCH}, n={N_HUGE:,}",
        "sample": f"sample {bench.BATCH} with replacement, n={N_HUGE:,}",
        "step": f"step: sample {bench.BATCH} + update them, n={N_HUGE:,}",
        "wor128": f"{bench.BATCH} of {N_HUGE:,} without replacement",
    }[workload]
    assert huge_tree.nbytes == bench.isample_tree_bytes(N_HUGE)
    indices, values = (torch.from_numpy(a) for a in bench.update_arguments(N_HUGE))
    calls = {
        "update": lambda: huge_tree.update(indices, values),
        "sample": lambda: huge_tree.sample(bench.BATCH),
        "step": lambda: huge_tree.update(huge_tree.sample(bench.BATCH), values),
        "wor128": lambda: huge_tree.sample(bench.BATCH, replace=False),
    }
    benchmark(calls[workload])
