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

Then what a training loop pays (the groups ``training step`` and ``DataLoader batch``): one
step of an MLP 64-256-10 (batch 128, SGD, one torch thread) with a plain mean loss (the
baseline, ``method`` ``isample`` being the weighted one so that report.py's ratios read
"× isample's time"), and one DataLoader batch, plain and through IndexedDataset + sampler.
``isample bench`` measures the same cells with the contenders alternating.
"""

from __future__ import annotations

import pytest
import torch

import isample
from isample import bench

N, BATCH = 50_000, 128
TRANSFORMS = ["softmax", "proportional", "rank"]


@pytest.fixture(autouse=True)
def _machine(benchmark):
    benchmark.extra_info.update(bench.machine_summary())


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


# -- a training step, a DataLoader batch --------------------------------------------------------


class _Step:
    """An MLP 64-256-10 training step on 16 rotating batches (one batch would be memorised)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(16, BATCH, 64, generator=generator)
        self.targets = torch.randint(0, 10, (16, BATCH), generator=generator)
        self.sampler, self.index = drawn_sampler("last_loss")
        self.turn = 0

    def run(self, method: str) -> None:
        from isample.integrations.protocol import weighted_loss

        self.turn += 1
        x, y = self.inputs[self.turn % 16], self.targets[self.turn % 16]
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        if method == "plain_mean_loss":
            loss = torch.nn.functional.cross_entropy(logits, y)
        elif method == "isample":  # protocol.weighted_loss, as the integrations call it
            loss = weighted_loss(self.sampler, self.index, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
        else:  # the cheapest loss the sampler allows: weights scaled by 1/b, one dot product
            losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            weights = self.sampler.weights(self.index, dtype=losses.dtype, scale=1.0 / BATCH)
            self.sampler.update(self.index, losses)
            loss = losses @ weights
        loss.backward()
        self.optimizer.step()


@pytest.mark.parametrize("method", ["isample", "scaled_weights_dot", "plain_mean_loss"])
def test_training_step(benchmark, method):
    benchmark.group = f"training step, MLP 64-256-10, batch {BATCH}, SGD, one torch thread"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: two threads wait on each other
    try:
        step = _Step()
        benchmark(step.run, method)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["isample", "plain_shuffled"])
def test_dataloader_batch(benchmark, method):
    from torch.utils.data import DataLoader, TensorDataset

    benchmark.group = f"DataLoader batch of {BATCH}, TensorDataset of {N:,}"
    generator = torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.randn(N, 64, generator=generator), torch.randint(0, 10, (N,), generator=generator))
    if method == "isample":
        loader = DataLoader(isample.IndexedDataset(dataset), batch_size=BATCH, sampler=isample.ImportanceSampler(N, seed=0))
    else:
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    state = [iter(loader)]

    def next_batch():
        try:
            return next(state[0])
        except StopIteration:
            state[0] = iter(loader)
            return next(state[0])

    benchmark(next_batch)
