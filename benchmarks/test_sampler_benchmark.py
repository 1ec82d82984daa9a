"""Per-step cost of the sampler: what update + weights add on top of the core tree update.

Run:  python -m pytest benchmarks/test_sampler_benchmark.py --benchmark-only \
          --benchmark-json=benchmarks/results/sampler.json
Table: python benchmarks/report.py benchmarks/results/sampler.json
"""

from __future__ import annotations

import pytest
import torch

import isample

N, BATCH = 50_000, 128


def drawn_sampler(score: str) -> tuple:
    sampler = isample.ImportanceSampler(N, score=score, seed=0)
    batch = next(iter(torch.utils.data.BatchSampler(sampler, BATCH, drop_last=False)))
    return sampler, torch.tensor(batch)


@pytest.mark.parametrize("score", ["last_loss", "running_loss"])
@pytest.mark.parametrize(
    "method", ["core_tree_update", "sampler_update", "sampler_weights", "sampler_update_and_weights"]
)
def test_per_step_cost(benchmark, score, method):
    benchmark.group = f"per step, batch {BATCH}, n={N:,}, {score}: float64 CPU losses"
    sampler, index = drawn_sampler(score)
    losses = torch.rand(BATCH, dtype=torch.float64)
    if method == "core_tree_update":
        tree = sampler._tree
        if score == "running_loss":
            benchmark(tree.blend, index, losses, 0.2)
        else:
            benchmark(tree.update, index, losses)
    elif method == "sampler_update":
        benchmark(sampler.update, index, losses)
    elif method == "sampler_weights":
        benchmark(sampler.weights, index)
    else:

        def step():
            sampler.weights(index)
            sampler.update(index, losses)

        benchmark(step)


@pytest.mark.parametrize("method", ["float32_losses", "float64_losses"])
def test_update_by_loss_dtype(benchmark, method):
    benchmark.group = f"sampler.update, batch {BATCH}, n={N:,}: loss dtype"
    sampler, index = drawn_sampler("last_loss")
    losses = torch.rand(BATCH, dtype=torch.float32 if method == "float32_losses" else torch.float64)
    benchmark(sampler.update, index, losses)
