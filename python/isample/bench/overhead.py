"""What the sampler costs a training loop: sampler calls per transform, a training step and
a DataLoader batch, each against the same loop without importance sampling."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

import isample

from .settings import Log, Settings
from .timing import Timing, interleaved
from .workloads import BATCH


OVERHEAD_N = 50_000


def _overhead_row(cell: str, timings: Dict[str, Timing], ours: str, baseline: str, goal: float, note: str) -> Dict[str, Any]:
    row = {
        "cell": cell,
        "isample": ours,
        "isample_us": timings[ours].median_us,
        "baseline": baseline,
        "baseline_us": timings[baseline].median_us,
        "goal": goal,
        "note": note,
        "calls": {name: len(t.times_ns) for name, t in timings.items()},
    }
    row["ratio"] = row["isample_us"] / row["baseline_us"]
    return row


def run_overhead(settings: Settings, log: Log) -> List[Dict[str, Any]]:
    """The sampler's cost in a training loop, each against what the loop costs without it:
    sampler.weights + sampler.update of a drawn batch of 128 (n = 50k) against the tree's own
    update of 128, per transform and for the defaults; one training step (MLP 64-256-10, batch 128, SGD) with the
    importance-weighted loss against the same step with a plain mean loss; one DataLoader
    batch through IndexedDataset and the sampler against a shuffled DataLoader."""
    from ..integrations.protocol import weighted_loss

    rows: List[Dict[str, Any]] = []
    n, batch = OVERHEAD_N, BATCH
    generator = torch.Generator().manual_seed(settings.seed)
    losses = torch.rand(batch, dtype=torch.float64, generator=generator)
    for transform in ("softmax", "proportional", "rank", "defaults"):
        if transform == "defaults":  # what ImportanceSampler(n) does once its warm-up epoch is over
            sampler = isample.ImportanceSampler(n, seed=settings.seed)
        else:
            sampler = isample.ImportanceSampler(n, transform=transform, uniform_mix=0.0, warmup_epochs=0, seed=settings.seed)
        sampler.update(torch.arange(n), torch.rand(n, dtype=torch.float64, generator=generator))
        for _ in range(sampler.warmup_epochs):
            for _ in sampler:
                pass
        index = torch.tensor(next(iter(torch.utils.data.BatchSampler(sampler, batch, drop_last=False))))
        tree = sampler._tree
        # the tree call a step amounts to: the softmax tree takes the scores; the others take
        # leaf values (the rank transform's tree is rebuilt per epoch: the same update is the
        # cost a per-step tree would have)
        leaves = losses if transform in ("softmax", "rank") else sampler.transform.leaf_values(losses)
        timings = interleaved(
            {
                "the tree's own update": lambda tree=tree, index=index, leaves=leaves: tree.update(index, leaves),
                "sampler.weights + sampler.update": lambda s=sampler, index=index: (s.weights(index), s.update(index, losses)),
            },
            settings,
        )
        row = _overhead_row(
            f"sampler.weights + sampler.update, {transform}, batch {batch}, n = {n:,}",
            timings, "sampler.weights + sampler.update", "the tree's own update", 2.0,
            "float64 CPU losses, last_loss" + (": proportional, 20% uniform, an importance epoch" if transform == "defaults" else ""),
        )
        rows.append(row)
        log(f"overhead {transform}: {row['isample_us']:.2f} µs against the tree's {row['baseline_us']:.2f} µs ({row['ratio']:.2f}×)")

    # One torch thread: on a machine shared with other jobs two threads wait on each other at
    # every operation (a step then takes ~100 ms instead of ~0.5 ms), which no ratio survives.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.train_threads)
    try:
        rows += _training_step_rows(settings, generator, n, batch, weighted_loss, log)
    finally:
        torch.set_num_threads(threads_before)
    rows.append(_dataloader_row(settings, generator, n, batch, log))
    return rows


def _training_step_rows(settings: Settings, generator: torch.Generator, n: int, batch: int, weighted_loss: Callable,
                        log: Log) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    torch.manual_seed(settings.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(16, batch, 64, generator=generator)
    targets = torch.randint(0, 10, (16, batch), generator=generator)
    sampler = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=settings.seed)
    sampler.update(torch.arange(n), torch.rand(n, dtype=torch.float64, generator=generator))
    index = torch.tensor(next(iter(torch.utils.data.BatchSampler(sampler, batch, drop_last=False))))
    turn = [0]

    def step(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:  # a new batch every step, as in training (one fixed batch would be memorised)
            turn[0] += 1
            x, y = inputs[turn[0] % 16], targets[turn[0] % 16]
            optimizer.zero_grad(set_to_none=True)
            loss_of(model(x), y).backward()
            optimizer.step()

        return run

    def cheapest(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_example = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        weights = sampler.weights(index, dtype=per_example.dtype, device=per_example.device, scale=1.0 / batch)
        sampler.update(index, per_example)
        return per_example @ weights

    timings = interleaved(
        {
            "plain mean loss": step(lambda logits, y: torch.nn.functional.cross_entropy(logits, y)),
            "per-example losses, mean": step(lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="none").mean()),
            "protocol.weighted_loss": step(
                lambda logits, y: weighted_loss(sampler, index, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
            ),
            "weights(scale=1/b) + update + losses @ weights": step(cheapest),
        },
        settings,
    )
    threads = f"torch {torch.get_num_threads()} thread(s)"
    for name in ("per-example losses, mean", "protocol.weighted_loss", "weights(scale=1/b) + update + losses @ weights"):
        row = _overhead_row(f"training step, MLP 64-256-10, batch {batch}, SGD: {name}", timings, name, "plain mean loss", 1.10, threads)
        rows.append(row)
        log(f"overhead step ({name}): {row['isample_us']:.1f} µs against {row['baseline_us']:.1f} µs ({row['ratio']:.3f}×)")
    return rows


def _dataloader_row(settings: Settings, generator: torch.Generator, n: int, batch: int, log: Log) -> Dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    features = torch.randn(n, 64, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    dataset = TensorDataset(features, labels)
    loaders = {
        "DataLoader(TensorDataset, shuffle=True)": DataLoader(dataset, batch_size=batch, shuffle=True),
        "DataLoader(IndexedDataset(TensorDataset), sampler=ImportanceSampler)": DataLoader(
            isample.IndexedDataset(dataset), batch_size=batch, sampler=isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=settings.seed)
        ),
    }
    iterators = {name: [iter(loader), loader] for name, loader in loaders.items()}

    def next_batch(name: str) -> Callable[[], Any]:
        def run() -> Any:
            state = iterators[name]
            try:
                return next(state[0])
            except StopIteration:  # a new epoch
                state[0] = iter(state[1])
                return next(state[0])

        return run

    timings = interleaved({name: next_batch(name) for name in loaders}, settings)
    names = list(loaders)
    row = _overhead_row(f"one DataLoader batch of {batch}, n = {n:,}", timings, names[1], names[0], 1.10, "")
    log(f"overhead DataLoader: {row['isample_us']:.1f} µs against {row['baseline_us']:.1f} µs ({row['ratio']:.3f}×)")
    return row
