"""Shared helpers: a numpy reference tree, a chi-square test with bin merging, kernel builds."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from typing import List, Sequence

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, Phase, settings

from isample import _core

ALPHA = 1e-3  # significance level of every statistical test

# Property-based tests: bounded by default ("ci"); `pytest --hypothesis-profile thorough`
# runs many more examples.
settings.register_profile(
    "ci", max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "thorough", max_examples=1000, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
# Debugging a failure: the same examples as "ci", reported at once instead of shrunk.
settings.register_profile(
    "no-shrink",
    parent=settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)
settings.register_profile(
    "thorough-no-shrink",
    parent=settings.get_profile("thorough"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)
settings.load_profile("ci")


def reference_descent(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The numpy reference for sample_from_uniforms: cumsum + searchsorted.

    Item i owns [cumsum[i-1], cumsum[i]); a target on a boundary goes right, so zero-weight
    items are never returned. Exact when the sums are exact (power-of-two weights).
    """
    cumulative = np.cumsum(weights)
    return np.searchsorted(cumulative, u * cumulative[-1], side="right")


def chi_square_pvalue(observed: np.ndarray, expected_probability: np.ndarray) -> float:
    """Pearson's chi-square of counts against probabilities, after merging small bins.

    Bins are sorted by expected count and merged from the smallest up until each merged bin
    expects at least 5, so that the chi-square approximation holds.
    """
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected_probability, dtype=np.float64) * observed.sum()
    assert observed.shape == expected.shape
    if np.any(observed[expected == 0] > 0):
        return 0.0  # an impossible outcome happened
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    order = np.argsort(expected)
    observed, expected = observed[order], expected[order]
    merged_obs, merged_exp = [], []
    acc_obs = acc_exp = 0.0
    for o, e in zip(observed, expected):
        acc_obs += o
        acc_exp += e
        if acc_exp >= 5:
            merged_obs.append(acc_obs)
            merged_exp.append(acc_exp)
            acc_obs = acc_exp = 0.0
    if acc_exp > 0:
        if merged_exp:
            merged_obs[-1] += acc_obs
            merged_exp[-1] += acc_exp
        else:
            merged_obs.append(acc_obs)
            merged_exp.append(acc_exp)
    if len(merged_exp) < 2:
        return 1.0
    merged_obs_arr, merged_exp_arr = np.array(merged_obs), np.array(merged_exp)
    merged_exp_arr *= merged_obs_arr.sum() / merged_exp_arr.sum()
    return float(scipy.stats.chisquare(merged_obs_arr, merged_exp_arr).pvalue)


def power_of_two_weights(rng: np.random.Generator, n: int, zero_fraction: float = 0.2) -> np.ndarray:
    """Weights 2^-e (e in 0..20) with some zeros: every partial sum is exact in float64."""
    weights = np.ldexp(1.0, -rng.integers(0, 21, size=n))
    weights[rng.random(n) < zero_fraction] = 0.0
    if not weights.any():
        weights[0] = 1.0
    return weights


def kernel_builds() -> list:
    """The CPU kernel builds this machine can run (always 'generic'; 'avx2' where supported)."""
    builds = ["generic"]
    current = _core.build_info()["cpu_kernels"]
    try:
        _core.select_cpu_kernels("avx2")
        builds.append("avx2")
    except ValueError:
        pass
    finally:
        _core.select_cpu_kernels(current)
    return builds


@pytest.fixture(params=kernel_builds())
def kernels(request):
    """Run a test under each CPU kernel build, restoring the default afterwards."""
    default = _core.build_info()["cpu_kernels"]
    _core.select_cpu_kernels(request.param)
    yield request.param
    _core.select_cpu_kernels(default)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_configure(config):
    """README.md's and docs/*.md's Python blocks run as tests: see tests/test_docs_examples.py."""
    import test_docs_examples

    config.pluginmanager.register(test_docs_examples.MarkdownExamples(), "isample-markdown-examples")


def pytest_report_header(config):
    return f"isample core: {_core.build_info()} (ISAMPLE_CPU_KERNELS={os.environ.get('ISAMPLE_CPU_KERNELS')})"


# The variables torch.distributed, torchrun, Lightning and accelerate read to find a process
# group. Lightning's DDP strategy sets them in os.environ and leaves them there; a later
# Hugging Face Trainer (accelerate) then sees LOCAL_RANK and starts a process group of its own,
# which breaks the next test that starts one. Every test gets them back as they were.
DISTRIBUTED_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                           "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def distributed_environment_restored():
    before = {name: os.environ.get(name) for name in DISTRIBUTED_ENVIRONMENT}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def one_torch_thread():
    """Small tensors: one intra-op thread is fastest, and a busy machine cannot stall it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_threads(worker, count: int) -> None:
    """Run worker(0), ..., worker(count - 1) in as many Python threads at once, and wait."""
    import threading

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_identical(a, b, where: str = "state") -> None:
    """Two states are identical: same types all the way down, equal values, float64 tensors
    bit for bit (NaN included), numpy arrays equal."""
    import torch

    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for j, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{j}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        if a.dtype is torch.float64:
            assert torch.equal(a.view(torch.int64), b.view(torch.int64)), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{where}: {a} != {b}"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_processes(what: str, commands: Sequence[Sequence[str]], timeout_s: float) -> List[str]:
    """Start one process per command (the ranks of a gloo group, say), with one BLAS/OpenMP
    thread each, and wait for all of them within `timeout_s`. Fails the test, with every
    process's output, when one exits non-zero or they do not all finish in time (a hang
    kills them all). Returns each process's combined stdout and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for command in commands
    ]
    deadline = time.monotonic() + timeout_s
    outputs: List[str] = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = "\n".join(f"--- process {r} ---\n{proc.communicate()[0]}" for r, proc in enumerate(procs))
        pytest.fail(f"the {what} processes did not finish within {timeout_s} s\n{logs}")
    if any(proc.returncode for proc in procs):
        logs = "\n".join(f"--- process {r} (exit {p.returncode}) ---\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
        pytest.fail(f"a {what} process failed\n{logs}")
    return outputs
