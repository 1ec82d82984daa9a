"""Per-step cost of the sampler: what update + weights add on top of the core tree update.

Run:  python -m pytest benchmarks/test_sampler_benchmark.py --benchmark-only \
          --benchmark-json=benchmarks/results/sampler.json
      python benchmarks/report.py --compact benchmarks/results/sampler.json
Table: python benchmarks/report.py benchmarks/results/sampler.json

One group per transform and score policy, all for a batch of 128 drawn items, n = 50,000,
float64 CPU losses:
- ``core_tree_update``: the compiled tree's own update of those 128 items, what the sampler
  cannot avoid. Softmax: ``SoftmaxTree.update`` (``blend`` for the running loss, which the
  core applies in the same call). Proportional: ``SumTree.update`` of the leaf values. Rank:
  its tree is rebuilt from all scores once per epoch, so a step writes only the score tensor;
  the same ``SumTree.update`` is the baseline, the cost a per-step tree would have.
- ``sampler_update``, ``sampler_weights``: one call each (``update`` holds the sampler's lock).
- ``sampler_update_and_weights``: both, as a training step makes them.
"""

from __future__ import annotations

import pytest
import torch

import isample

N, BATCH = 50_000, 128
TRANSFORMS = ["softmax", "proportional", "rank"]


def drawn_sampler(score: str, transform: str = "softmax") -> tuple:
    """A sampler one epoch in, and the first batch of that epoch."""
    sampler = isample.ImportanceSampler(N, score=score, transform=transform, seed=0)
    sampler.update(range(N), torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    batch = next(iter(torch.utils.data.BatchSampler(sampler, BATCH, drop_last=False)))
    return sampler, torch.tensor(batch)


def core_update(sampler: isample.ImportanceSampler, score: str, index: torch.Tensor, losses: torch.Tensor):
    """The tree call a step of this sampler amounts to, with its arguments ready."""
    tree = sampler._tree
    if isinstance(tree, isample.SoftmaxTree):
        if score == "running_loss":
            return tree.blend, (index, losses, 0.2)
        return tree.update, (index, losses)
    leaves = sampler.transform.leaf_values(losses) if not sampler.transform.epoch_level else losses
    return tree.update, (index, leaves)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("score", ["last_loss", "running_loss"])
@pytest.mark.parametrize(
    "method", ["core_tree_update", "sampler_update", "sampler_weights", "sampler_update_and_weights"]
)
def test_per_step_cost(benchmark, transform, score, method):
    benchmark.group = f"per step, batch {BATCH}, n={N:,}, {transform}, {score}: float64 CPU losses"
    sampler, index = drawn_sampler(score, transform)
    losses = torch.rand(BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if method == "core_tree_update":
        call, args = core_update(sampler, score, index, losses)
        benchmark(call, *args)
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
