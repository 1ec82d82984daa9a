"""CUDA back end: a static check that runs everywhere, and tests that need a GPU (marked
`cuda`, skipped without one). The GPU algorithms themselves are tested without a GPU in
test_gpu_on_host.py."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue, power_of_two_weights, reference_descent

GPU_SOURCES = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "gpu"

# The methods that run on the update / sample path, and what they must never call.
HOT_METHODS = [
    "update", "get", "probability", "sample_from_uniforms", "sample", "sample_distinct",
    "prepare_batch", "resum_levels", "run_rebase", "begin_call", "for_each",
]
SYNCHRONISING = [
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "copy_to_host", "check_cuda_sync",
    "cudaMalloc(", "cudaFree(", "cudaMemcpy(", "device_vector", "thrust::device,", "thrust::cuda::par.",
    "allocate(",
]


def method_bodies(source: str) -> dict:
    """name -> body of each member function defined in the DeviceTree class."""
    bodies = {}
    for match in re.finditer(r"\n  (?:[\w:<>,&* ]+ )?(\w+)\((?:[^;{])*?\)\s*(?:const\s*)?(?:override\s*)?\{", source):
        name, start, depth = match.group(1), match.end(), 1
        position = start
        while depth:
            position += 1
            depth += {"{": 1, "}": -1}.get(source[position], 0)
        bodies.setdefault(name, source[start:position])
    return bodies


def test_no_synchronisation_on_the_update_and_sample_paths():
    source = (GPU_SOURCES / "device_tree.h").read_text()
    tree = source[source.index("class DeviceTree final") :]
    bodies = method_bodies(tree)
    for method in HOT_METHODS:
        assert method in bodies, f"DeviceTree::{method} not found: update this test"
        for forbidden in SYNCHRONISING:
            assert forbidden not in bodies[method], f"DeviceTree::{method} calls {forbidden}"
    # Thrust only with par_nosync on the caller's stream; no cudaMalloc inside Thrust either
    system = (GPU_SOURCES / "system.h").read_text()
    policies = re.findall(r"inline auto policy\(Stream s[^)]*\) \{ return ([^;]+); \}", system)
    assert policies and all("par_nosync" in p and ".on(s)" in p for p in policies), policies
    assert "thrust::sort_by_key(policy(s, sort_arena_)" in source  # sorts use the tree's own scratch


def test_the_static_check_can_fail():
    bad = "class DeviceTree final {\n  void sample(int k) {\n    cudaStreamSynchronize(s);\n  }\n};"
    body = method_bodies(bad[bad.index("class DeviceTree final") :])["sample"]
    assert "cudaStreamSynchronize" in body


def test_cuda_unavailable_gives_one_clear_error():
    if isample.cuda_available():
        pytest.skip("a GPU is available")
    with pytest.raises(ValueError, match="cuda"):
        isample.SumTree(10, device="cuda")


# -- on a real GPU ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not isample.cuda_available(), reason="needs a CUDA GPU and a CUDA build")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 17, 4096, 1_000_003])
def test_cuda_parity_with_the_cpu_tree(n, rng):
    weights = power_of_two_weights(rng, n)
    gpu = isample.SumTree.from_weights(torch.from_numpy(weights).cuda(), device="cuda", seed=1)
    cpu = isample.SumTree.from_weights(weights, seed=1)
    u = rng.random(100_000)
    got = gpu.sample_from_uniforms(torch.from_numpy(u).cuda()).cpu().numpy()
    np.testing.assert_array_equal(got, reference_descent(weights, u))
    arbitrary = rng.random(n) ** 3
    gpu.assign(torch.from_numpy(arbitrary).cuda())
    cpu.assign(arbitrary)
    assert gpu.total == cpu.total
    assert torch.equal(gpu.sample(50_000, seed=9).cpu(), cpu.sample(50_000, seed=9))
    idx = rng.integers(0, n, 300)
    vals = rng.random(300)
    gpu.update(torch.from_numpy(idx).cuda(), torch.from_numpy(vals).cuda())
    cpu.update(idx, vals)
    assert gpu.total == cpu.total


@pytest.mark.cuda
@cuda
@pytest.mark.statistical
def test_cuda_draw_frequencies(rng):
    weights = rng.random(50) ** 2
    tree = isample.SumTree.from_weights(torch.from_numpy(weights).cuda(), device="cuda", seed=1)
    counts = np.bincount(tree.sample(300_000).cpu().numpy(), minlength=50)
    assert chi_square_pvalue(counts, weights / weights.sum()) > ALPHA
    wrong = weights.copy()
    wrong[np.argmax(weights)] *= 1.1  # negative control: a 10% error on the heaviest item
    assert chi_square_pvalue(counts, wrong / wrong.sum()) < ALPHA


@pytest.mark.cuda
@cuda
def test_cuda_update_and_sample_do_not_synchronise():
    tree = isample.SoftmaxTree(10_000_000, device="cuda", seed=0)
    idx = torch.randint(0, 10_000_000, (128,), device="cuda")
    losses = torch.rand(128, device="cuda", dtype=torch.float64)
    tree.update(idx, losses)  # warm-up: first-use allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            draws = tree.sample(128)
            tree.update(draws, losses)
            tree.blend(draws, losses, 0.2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    tree.check()


@pytest.mark.cuda
@cuda
def test_cuda_bad_input_is_deferred_then_raised():
    tree = isample.SumTree(100, device="cuda", seed=0)
    tree.update(torch.arange(10, device="cuda"), torch.ones(10, device="cuda", dtype=torch.float64))
    tree.update(torch.tensor([5], device="cuda"), torch.tensor([float("nan")], device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="nan"):
        tree.check()
    assert tree.total == 10.0  # the bad call changed nothing
    strict = isample.SumTree(100, device="cuda", sync_errors=True, seed=0)
    with pytest.raises(IndexError):
        strict.update(torch.tensor([100], device="cuda"), torch.ones(1, device="cuda", dtype=torch.float64))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("transform", ["softmax", "proportional"])
def test_sampler_steps_do_not_synchronise_on_cuda(transform):
    n = 100_000
    sampler = isample.ImportanceSampler(n, transform=transform, score="running_loss", samples_per_epoch=4096,
                                        nonfinite="skip", device="cuda", seed=0)
    order = torch.tensor(list(iter(sampler)), device="cuda")
    losses = torch.rand(4096, device="cuda")
    losses[7] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(0, 4096, 128):
            batch = order[start : start + 128]
            weights = sampler.weights(batch, dtype=torch.float32)
            sampler.update(batch, losses[start : start + 128] * weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sampler.counters["nonfinite_skipped"] == 1
    list(iter(sampler))  # the next epoch: errors recorded on the device would surface here


@pytest.mark.cuda
@cuda
def test_sampler_reports_rejected_batches_at_the_next_epoch():
    sampler = isample.ImportanceSampler(1000, samples_per_epoch=100, device="cuda", seed=0)
    items = torch.tensor(list(iter(sampler)), device="cuda")
    sampler.update(items[:10], torch.full((10,), float("nan"), device="cuda"))
    with pytest.raises(ValueError):
        list(iter(sampler))
