"""ImportanceSampler, score policies, transforms and SoftPruningSampler."""

from __future__ import annotations

import copy
import gc
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

import isample
from conftest import ALPHA, assert_identical, chi_square_pvalue


def drain(sampler) -> list:
    return list(iter(sampler))


# -- score policies against hand computations ---------------------------------------------------


def test_last_loss_and_running_loss_by_hand():
    s = isample.ImportanceSampler(4, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="last_loss", seed=0)
    s.update([1, 2], torch.tensor([0.5, 2.0]))
    assert s.scores().tolist() == [0.0, 0.5, 2.0, 0.0]
    r = isample.ImportanceSampler(4, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score=isample.RunningLoss(beta=0.2), initial_score=1.0, seed=0)
    r.update([1, 2], [0.5, 2.0])
    r.update([1], [3.0])
    expected_1 = 0.2 * (0.2 * 1.0 + 0.8 * 0.5) + 0.8 * 3.0
    np.testing.assert_allclose(r.scores().numpy(), [1.0, expected_1, 0.2 + 0.8 * 2.0, 1.0], rtol=1e-15)


@pytest.mark.parametrize("transform", ["softmax", "proportional"])
def test_running_loss_with_a_repeated_index_uses_the_score_before_the_call(transform):
    # Both storage paths (SoftmaxTree in C++, a score tensor in Python) must agree.
    r = isample.ImportanceSampler(3, uniform_mix=0.0, warmup_epochs=0, score="running_loss", transform=transform, initial_score=2.0, seed=0)
    r.update([0, 0, 1], [10.0, 4.0, 1.0])
    np.testing.assert_allclose(r.scores().numpy(), [0.2 * 2 + 0.8 * 4, 0.2 * 2 + 0.8 * 1, 2.0], rtol=1e-15)


def test_grad_norm_bound_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1)
    expected = [
        math.sqrt((p[0, 0] - 1) ** 2 + p[0, 1] ** 2 + p[0, 2] ** 2),
        math.sqrt((1 / 3) ** 2 * 2 + (1 / 3 - 1) ** 2),
    ]
    s = isample.ImportanceSampler(5, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="grad_norm", seed=0)
    s.update([3, 1], torch.tensor([9.0, 9.0]), logits=logits, targets=targets)
    np.testing.assert_allclose(s.scores()[[3, 1]].numpy(), expected, rtol=1e-14)
    with pytest.raises(TypeError, match="logits"):
        s.update([3], [1.0])
    with pytest.raises(ValueError):
        s.update([3], [1.0], logits=logits, targets=targets)


def test_reducible_loss_by_hand():
    irreducible = torch.tensor([0.5, 1.0, 0.25, 0.0])
    s = isample.ImportanceSampler(4, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score=isample.ReducibleLoss(irreducible), seed=0)
    s.update([2, 1], [1.0, 0.5])
    assert s.scores().tolist() == [0.0, -0.5, 0.75, 0.0]
    with pytest.raises(ValueError):
        isample.ReducibleLoss(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="irreducible"):
        isample.ImportanceSampler(4, score="reducible_loss")


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="score policy"):
        isample.ImportanceSampler(4, score="loss_squared")
    with pytest.raises(ValueError, match="transform"):
        isample.ImportanceSampler(4, transform="sigmoid")


# -- transforms -------------------------------------------------------------------------------


def test_transform_probabilities_by_hand():
    scores = torch.tensor([0.0, 1.0, 3.0, -2.0], dtype=torch.float64)
    soft = isample.ImportanceSampler(4, uniform_mix=0.0, warmup_epochs=0, transform=isample.Softmax(temperature=2.0), seed=0)
    soft.update(range(4), scores)
    np.testing.assert_allclose(soft.probabilities().numpy(), torch.softmax(scores / 2, 0).numpy(), rtol=1e-14)
    prop = isample.ImportanceSampler(4, uniform_mix=0.0, warmup_epochs=0, transform=isample.Proportional(alpha=2.0, eps=0.5), seed=0)
    prop.update(range(4), scores)
    w = np.array([0.5**2, 1.5**2, 3.5**2, 0.5**2])  # negative scores clip to 0
    np.testing.assert_allclose(prop.probabilities().numpy(), w / w.sum(), rtol=1e-14)
    rank = isample.ImportanceSampler(4, uniform_mix=0.0, warmup_epochs=0, transform=isample.RankBased(alpha=1.0), seed=0)
    rank.update(range(4), scores)
    w = np.array([1 / 3, 1 / 2, 1.0, 1 / 4])  # ranks 3, 2, 1, 4
    np.testing.assert_allclose(rank.probabilities().numpy(), w / w.sum(), rtol=1e-14)
    mixed = isample.ImportanceSampler(4, transform="softmax", warmup_epochs=0, uniform_mix=0.2, seed=0)
    mixed.update(range(4), scores)
    np.testing.assert_allclose(
        mixed.probabilities().numpy(), 0.8 * torch.softmax(scores, 0).numpy() + 0.05, rtol=1e-14
    )


@pytest.mark.statistical
@pytest.mark.parametrize("transform", ["softmax", "proportional", "rank"])
@pytest.mark.parametrize("uniform_mix", [0.0, 0.3])
def test_epoch_draws_follow_the_probabilities(transform, uniform_mix):
    n = 30
    scores = torch.linspace(0.0, 3.0, n, dtype=torch.float64)
    s = isample.ImportanceSampler(n, warmup_epochs=0, transform=transform, uniform_mix=uniform_mix, samples_per_epoch=20_000, seed=3)
    s.update(range(n), scores)
    p = s.probabilities().numpy()
    counts = np.bincount(np.array(drain(s)), minlength=n)
    assert chi_square_pvalue(counts, p) > ALPHA
    assert chi_square_pvalue(counts, np.full(n, 1 / n)) < ALPHA  # negative control: not uniform


# -- epochs, lengths, DataLoader ----------------------------------------------------------------


def test_warmup_then_importance_epochs_and_lengths():
    s = isample.ImportanceSampler(1000, transform="softmax", uniform_mix=0.0, samples_per_epoch=300, warmup_epochs=2, seed=0)
    assert s.total_steps(5, 128) == 2 * 8 + 3 * 3
    assert s.total_steps(5, 128, drop_last=True) == 2 * 7 + 3 * 2
    lengths, kinds = [], []
    for epoch in range(4):
        assert s.epoch == epoch
        assert s.steps_per_epoch(128) == (8 if epoch < 2 else 3)
        items = drain(s)
        lengths.append(len(items))
        kinds.append(s.history[-1]["kind"])
        if epoch < 2:
            assert sorted(items) == list(range(1000))  # warm-up: a permutation of everything
            assert torch.equal(s.weights(items[:10]), torch.ones(10, dtype=torch.float64))
    assert lengths == [1000, 1000, 300, 300]
    assert kinds == ["warmup", "warmup", "importance", "importance"]


def test_set_epoch_reproduces_an_epoch_and_len_does_not_disturb_iteration():
    s = isample.ImportanceSampler(200, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=50, seed=1)
    s.update(range(200), torch.rand(200))
    s.set_epoch(7)
    first = drain(s)
    s.set_epoch(7)
    assert drain(s) == first  # same seed, epoch and scores: the same draw
    it = iter(s)
    head = [next(it) for _ in range(10)]
    assert len(s) == 50  # len() mid-epoch reports this epoch and draws nothing new
    weights_before = s.weights(head)
    rest = list(it)
    assert len(head) + len(rest) == 50
    assert torch.equal(s.weights(head), weights_before)


def test_dataloader_and_batch_sampler_integration():
    n = 500
    data = TensorDataset(torch.randn(n, 3), torch.randint(0, 4, (n,)))
    s = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=200, seed=0)
    loader = DataLoader(isample.IndexedDataset(data), batch_size=64, sampler=s)
    assert len(loader) == s.steps_per_epoch(64) == 4
    seen = []
    for index, x, y in loader:
        assert index.dtype == torch.int64 and x.shape[1] == 3
        assert torch.equal(x, data.tensors[0][index]) and torch.equal(y, data.tensors[1][index])
        losses = torch.rand(index.shape[0])
        w = s.weights(index)
        assert w.shape == index.shape
        s.update(index, losses)
        seen.extend(index.tolist())
    assert len(seen) == 200
    batches = list(BatchSampler(s, batch_size=50, drop_last=False))
    assert [len(b) for b in batches] == [50, 50, 50, 50]
    # a DataLoader with workers: the sampler runs in the main process, indices still arrive
    workers = DataLoader(isample.IndexedDataset(data), batch_size=100, sampler=s, num_workers=2)
    assert sum(batch[0].shape[0] for batch in workers) == 200


def test_indexed_dataset_shapes():
    assert isample.IndexedDataset([("a", 1)])[0] == (0, "a", 1)
    assert isample.IndexedDataset([{"x": 5}])[0] == {"x": 5, "index": 0}
    assert isample.IndexedDataset([7, 8])[1] == (1, 8)
    with pytest.raises(ValueError, match="index"):
        isample.IndexedDataset([{"index": 3}])[0]
    with pytest.raises(TypeError):
        isample.IndexedDataset(object())


def test_indexed_dataset_batches_equal_item_by_item_reads():
    """__getitems__ (what a DataLoader calls) gives the items __getitem__ gives, for a
    TensorDataset (one read per tensor), a dataset with its own __getitems__, and any other."""
    x, y = torch.randn(20, 3), torch.arange(20) * 10
    tensors = TensorDataset(x, y)

    class Listed(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"x": x[i], "y": int(y[i])}

    datasets = [tensors, torch.utils.data.Subset(tensors, list(range(19, -1, -1))), Listed(), [(i, -i) for i in range(20)]]
    for dataset in datasets:
        wrapped = isample.IndexedDataset(dataset)
        for indices in ([3, 0, 19, 3], [7], [], [-1, 2]):
            batch, expected = wrapped.__getitems__(indices), [wrapped[i] for i in indices]
            assert len(batch) == len(expected)
            for got, want in zip(batch, expected):
                assert type(got) is type(want) and len(got) == len(want)
                for a, b in (zip(got.values(), want.values()) if isinstance(got, dict) else zip(got, want)):
                    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        loader = DataLoader(wrapped, batch_size=6, sampler=[5, 1, 1, 18, 0, 9, 2])
        for batch in loader:
            index = batch["index"] if isinstance(batch, dict) else batch[0]
            assert index.dtype == torch.int64
    with pytest.raises(IndexError):
        isample.IndexedDataset(tensors).__getitems__([0, 20])


# -- weights ------------------------------------------------------------------------------------


def test_weights_use_the_probabilities_of_the_draw():
    n = 100
    s = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=1000, seed=0)
    s.update(range(n), torch.linspace(0, 4, n))
    p_draw = s.probabilities().clone()
    items = drain(s)
    expected = 1.0 / (n * p_draw[items])
    s.update(range(n), torch.linspace(4, 0, n))  # scores change during the epoch
    torch.testing.assert_close(s.weights(items), expected, rtol=1e-14, atol=0)


@pytest.mark.statistical
@pytest.mark.parametrize(
    "transform, replacement, weighting, uniform_mix, unbiased",
    [
        ("softmax", True, "auto", 0.0, True),
        ("softmax", False, "auto", 0.0, True),
        ("softmax", False, "inverse_probability", 0.0, False),
        ("softmax", True, "auto", 0.3, True),
        ("softmax", False, "auto", 0.3, True),
        ("softmax", False, "inverse_probability", 0.3, False),
        ("proportional", True, "auto", 0.0, True),
        ("proportional", False, "auto", 0.0, True),
        ("proportional", False, "auto", 0.3, True),
        ("rank", True, "auto", 0.0, True),
        ("rank", False, "auto", 0.0, True),
        ("rank", True, "auto", 0.3, True),
        ("rank", False, "inverse_probability", 0.0, False),
    ],
)
def test_weighted_mean_is_unbiased_where_claimed(transform, replacement, weighting, uniform_mix, unbiased):
    """Mean over an epoch of w_i f_i estimates the dataset mean of f exactly where we say so:
    weighting="auto" for every transform, with or without replacement and a uniform mixture.

    The seed paper's 1 / (N p) without replacement is the negative control: it is biased."""
    rng = np.random.default_rng(0)
    n, m, epochs = 60, 25, 6000
    scores = torch.from_numpy(rng.normal(size=n) * 1.5)
    f = torch.from_numpy(rng.random(n) * 10 + scores.numpy() ** 2)  # correlated with p: bias shows
    if transform == "proportional":
        scores = scores.abs() + 0.1  # p follows |s|, which f follows too; no item is (nearly) never drawn
    s = isample.ImportanceSampler(n, warmup_epochs=0, transform=transform, samples_per_epoch=m, replacement=replacement,
                                  weighting=weighting, uniform_mix=uniform_mix, seed=5)
    s.update(range(n), scores)
    p = s.probabilities()
    assert float(p.max() / p.min()) > 5  # far from uniform, or the test shows nothing
    estimates = []
    for _ in range(epochs):
        items = torch.tensor(drain(s))
        estimates.append(float((s.weights(items) * f[items]).mean()))
    estimates = np.array(estimates)
    z = (estimates.mean() - float(f.mean())) / (estimates.std(ddof=1) / math.sqrt(epochs))
    if unbiased:
        assert abs(z) < 4.0, z
    else:
        assert abs(z) > 8.0, z


def test_weight_exponent_and_normalisation():
    n = 50
    base = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=200, seed=0)
    tempered = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=200, weight_exponent=lambda e: 0.5, normalize_weights="max", seed=0)
    for s in (base, tempered):
        s.update(range(n), torch.linspace(0, 3, n))
    a, b = drain(base), drain(tempered)
    assert a == b  # the exponent changes weights, not draws
    wa, wb = base.weights(a), tempered.weights(b)
    torch.testing.assert_close(wb, wa.sqrt() / wa.sqrt().max(), rtol=1e-14, atol=0)
    assert tempered.history[-1]["weight_exponent"] == 0.5
    with pytest.raises(ValueError):
        isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, weight_exponent=1.5)


def test_annealed_weight_exponent_by_hand_and_in_history():
    """PER's beta, annealed linearly from 0.4 to 1 over the importance epochs: every epoch's
    weights are (1 / (N p))^beta with that epoch's beta and draw-time p."""
    n, m, warmup, epochs = 40, 120, 1, 6
    schedule = lambda e: min(1.0, 0.4 + 0.6 * (e - warmup) / (epochs - 1 - warmup))  # noqa: E731
    s = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, samples_per_epoch=m, warmup_epochs=warmup, weight_exponent=schedule, seed=2)
    rng = np.random.default_rng(2)
    for epoch in range(epochs):
        s.update(range(n), torch.from_numpy(rng.normal(size=n)))  # new scores each epoch: new p
        p = s.probabilities().clone()
        items = torch.tensor(drain(s))
        s.update(items[:10], torch.full((10,), 5.0))  # scores change during the epoch: weights must not
        entry = s.history[epoch]
        if epoch < warmup:
            assert entry["kind"] == "warmup" and "weight_exponent" not in entry
            assert torch.equal(s.weights(items), torch.ones(n, dtype=torch.float64))
            continue
        beta = [0.4, 0.55, 0.7, 0.85, 1.0][epoch - warmup]  # by hand
        expected = (1.0 / (n * p[items])) ** beta
        torch.testing.assert_close(s.weights(items), expected, rtol=1e-13, atol=0)
        assert entry["weight_exponent"] == pytest.approx(beta, rel=1e-15)
        assert entry["min_weight"] == pytest.approx(float(expected.min()), rel=1e-13)
        assert entry["max_weight"] == pytest.approx(float(expected.max()), rel=1e-13)
    assert [h.get("weight_exponent") for h in s.history] == [None, *(schedule(e) for e in range(1, epochs))]
    # a schedule that leaves [0, 1] is refused when the epoch is drawn, and nothing changes
    bad = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=m, weight_exponent=lambda e: 1.0 + e, seed=2)
    drain(bad)
    with pytest.raises(ValueError, match="weight_exponent"):
        drain(bad)
    assert len(bad.history) == 1 and bad.epoch == 1


def test_uniform_mix_bounds_the_weights():
    n = 1000
    s = isample.ImportanceSampler(n, transform="softmax", warmup_epochs=0, uniform_mix=0.1, samples_per_epoch=5000, seed=0)
    s.update(range(n), torch.linspace(0, 30, n))  # extremely skewed softmax
    drain(s)
    assert s.history[-1]["max_weight"] <= 1 / 0.1 + 1e-9


# -- a tiny real training loop -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_subset():
    """300 real Fashion-MNIST training images (a fixed random subset), flattened and normalised."""
    from isample.experiments.data import load_dataset

    try:
        data = load_dataset("fashion-mnist")
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): {error}")
    pick = torch.randperm(data.train_images.shape[0], generator=torch.Generator().manual_seed(0))[:300]
    x = (data.train_images[pick].float().div(255).flatten(1) - data.mean[0]) / data.std[0]
    return TensorDataset(x, data.train_labels[pick])


TRAINING_POLICIES = [
    "last_loss", "running_loss", "grad_norm", "reducible_loss", "early_importance",
    "softmax", "proportional", "rank", "soft_pruning",
]


def training_sampler(policy: str, n: int, epochs: int):
    if policy == "soft_pruning":
        return isample.SoftPruningSampler(n, num_epochs=epochs, seed=0)
    score, transform = {
        "last_loss": ("last_loss", "softmax"),
        "running_loss": ("running_loss", "softmax"),
        "grad_norm": ("grad_norm", "softmax"),
        # a stand-in for a held-out model's losses: what this data set's loss floor might be
        "reducible_loss": (isample.ReducibleLoss(0.3 * torch.rand(n, generator=torch.Generator().manual_seed(1))),
                           "softmax"),
        "early_importance": (isample.EarlyImportance(n, observations=1), "proportional"),
        "softmax": ("last_loss", isample.Softmax(temperature=0.5)),
        "proportional": ("last_loss", "proportional"),
        "rank": ("last_loss", "rank"),
    }[policy]
    return isample.ImportanceSampler(n, uniform_mix=0.0, score=score, transform=transform, warmup_epochs=1, seed=0)


@pytest.mark.parametrize("policy", TRAINING_POLICIES)
def test_a_real_training_loop_learns_with_every_policy(fashion_subset, one_torch_thread, policy):
    """A linear classifier on 300 Fashion-MNIST images, 5 epochs through a DataLoader over
    IndexedDataset: losses weighted by sampler.weights, scores updated every step. The
    loop's own loss estimate (the weighted mean, unbiased for the data set's mean loss) and
    the loss on all 300 images must both fall well below where they started."""
    x, y = fashion_subset.tensors
    n, epochs = len(fashion_subset), 5
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = training_sampler(policy, n, epochs)
    loader = DataLoader(isample.IndexedDataset(fashion_subset), batch_size=30, sampler=sampler)
    with torch.no_grad():
        initial = float(F.cross_entropy(model(x), y))
    estimates = []
    for _ in range(epochs):
        weighted_sum, drawn = 0.0, 0
        for index, xb, yb in loader:
            logits = model(xb)
            losses = F.cross_entropy(logits, yb, reduction="none")
            w = sampler.weights(index).to(losses)
            optimizer.zero_grad()
            (losses * w).mean().backward()
            optimizer.step()
            sampler.update(index, losses.detach(), logits=logits.detach(), targets=yb)
            weighted_sum += float((losses.detach() * w).sum())
            drawn += index.numel()
        # soft pruning's weights make the sum over all N items unbiased; 1 / (N p) the mean of the draws
        estimates.append(weighted_sum / (n if policy == "soft_pruning" else drawn))
        assert sampler.history[-1]["nonfinite_skipped"] == 0
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    assert sampler.counters["updates"] == sum(-(-h["samples"] // 30) for h in sampler.history)
    assert estimates[-1] < 0.7 * estimates[0], estimates
    assert final < 0.7 * initial, (initial, final)
    if policy not in ("soft_pruning",):
        assert [h["kind"] for h in sampler.history] == ["warmup"] + ["importance"] * (epochs - 1)
        assert float(sampler.scores().std()) > 0  # the scores did move the draws


# -- bad input --------------------------------------------------------------------------------


def make_sampler(kind: str, n: int, score="running_loss", **kwargs):
    """An ImportanceSampler with transform `kind`, or a SoftPruningSampler for "soft_pruning"."""
    if kind == "soft_pruning":
        return isample.SoftPruningSampler(n, num_epochs=4, score=score, **kwargs)
    # no uniform mixture or warm-up (the defaults before issue 24): the transform alone decides
    return isample.ImportanceSampler(n, score=score, transform=kind, **{"uniform_mix": 0.0, "warmup_epochs": 0, **kwargs})


SAMPLER_KINDS = ["softmax", "proportional", "rank", "soft_pruning"]


@pytest.mark.parametrize("score", ["running_loss", "last_loss"])
@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_bad_updates_are_refused_and_change_nothing(kind, score, nonfinite):
    n = 10
    s = make_sampler(kind, n, score=score, nonfinite=nonfinite, seed=0)
    s.update(range(n), torch.arange(1.0, n + 1))
    drain(s)  # mid-training: an epoch has been drawn
    before = s.scores().clone()
    cases = [
        (ValueError, lambda: s.update([1, 2], torch.tensor(3.0))),  # a reduced (scalar) loss
        (ValueError, lambda: s.update([1, 2], torch.ones(3))),
        (ValueError, lambda: s.update([1, 2], torch.ones(2, 1))),
        (IndexError, lambda: s.update([n], [1.0])),
        (IndexError, lambda: s.update([-1], [7.0])),  # torch would write item n - 1
        (IndexError, lambda: s.update([3, -n], [7.0, 7.0])),  # and here item 0
        (IndexError, lambda: s.update(torch.tensor([2, n + 5]), torch.tensor([7.0, 7.0]))),
        (TypeError, lambda: s.update([1.5], [1.0])),
        (TypeError, lambda: s.update([1], torch.tensor([True]))),
    ]
    if nonfinite == "raise":
        cases += [
            (ValueError, lambda: s.update([1, 2], torch.tensor([1.0, float("nan")]))),
            (ValueError, lambda: s.update([1], torch.tensor([float("inf")]))),
        ]
    for error, call in cases:
        with pytest.raises(error):
            call()
        assert torch.equal(s.scores(), before)
    with pytest.raises(IndexError, match=r"-1\b"):  # the error names the bad index
        s.update([0, -1], [7.0, 7.0])
    with pytest.raises(IndexError, match=rf"\b{n}\b"):
        s.update([n], [7.0])
    assert torch.equal(s.scores(), before)
    if kind != "soft_pruning":
        p = s.probabilities()
        s.update([n - 1], [before[n - 1].item()])
        assert torch.equal(s.probabilities(), p)  # the tree was not touched either


def test_scalar_loss_error_says_what_to_change():
    s = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=0)
    with pytest.raises(ValueError, match="reduction='none'"):
        s.update([1, 2], torch.tensor(0.3))


def test_nonfinite_skip_policy_counts_and_keeps_the_rest():
    s = isample.ImportanceSampler(5, transform="softmax", uniform_mix=0.0, warmup_epochs=0, nonfinite="skip", seed=0)
    s.update([0, 1, 2], torch.tensor([1.0, float("nan"), float("inf")]))
    assert s.scores().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert s.counters["nonfinite_skipped"] == 2
    g = isample.ImportanceSampler(5, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="grad_norm", nonfinite="skip", seed=0)
    logits = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    g.update([0, 1], torch.ones(2), logits=logits, targets=torch.tensor([0, 1]))
    assert g.counters["nonfinite_skipped"] == 1 and g.scores()[0] == 0.0 and g.scores()[1] > 0


def test_weights_errors():
    s = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=3, replacement=False, seed=0)
    s.update([0], [1.0])  # updating before any epoch is allowed: it only records scores
    with pytest.raises(RuntimeError, match="iterate"):
        s.weights([0])
    items = drain(s)
    missing = next(i for i in range(10) if i not in items)
    with pytest.raises(ValueError, match="not drawn"):
        s.weights([items[0], missing])
    with pytest.raises(IndexError):
        s.weights([10])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"samples_per_epoch": 0},
        {"samples_per_epoch": 11, "replacement": False},
        {"weighting": "fancy"},
        {"uniform_mix": 1.5},
        {"normalize_weights": "sum"},
        {"initial_score": float("nan")},
        {"nonfinite": "ignore"},
        {"warmup_epochs": -1},
    ],
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        isample.ImportanceSampler(10, **kwargs)


# -- exact resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [True, False])
def test_resume_mid_epoch_is_exact(replacement):
    def run(sampler, epochs, stop_at=None):
        """Trains a fake model: the loss of an item depends on how often it was seen."""
        log = []
        seen = torch.zeros(sampler.num_items)
        for _ in range(epochs):
            items = []
            for j, item in enumerate(sampler):
                if stop_at is not None and len(log) == stop_at:
                    return log, sampler.state_dict(consumed=j), seen
                items.append(item)
                if len(items) == 16:
                    idx = torch.tensor(items)
                    seen[idx] += 1
                    sampler.update(idx, 1.0 / (1.0 + seen[idx]) + 0.01 * idx)
                    log.append((idx.tolist(), sampler.weights(idx).tolist()))
                    items = []
        return log, None, seen

    make = lambda: isample.ImportanceSampler(  # noqa: E731
        100, transform="softmax", uniform_mix=0.0, score="running_loss", samples_per_epoch=64, replacement=replacement, warmup_epochs=1, seed=9
    )
    full, _, _ = run(make(), epochs=4)
    head, state, seen = run(make(), epochs=4, stop_at=9)  # stops in the 3rd epoch (7 + 2 batches in)
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    seen_rest = seen.clone()
    remaining_epochs = 4 - state["current"]["epoch"]
    for _ in range(remaining_epochs):
        items = []
        for item in resumed:
            items.append(item)
            if len(items) == 16:
                idx = torch.tensor(items)
                seen_rest[idx] += 1
                resumed.update(idx, 1.0 / (1.0 + seen_rest[idx]) + 0.01 * idx)
                rest.append((idx.tolist(), resumed.weights(idx).tolist()))
                items = []
    assert head + rest == full


def test_state_of_a_different_sampler_is_refused():
    a = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=5, seed=0)
    drain(a)
    state = a.state_dict()
    for other in (
        isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=6, seed=0),
        isample.ImportanceSampler(11, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=5, seed=0),
        isample.ImportanceSampler(10, uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=5, transform="proportional", seed=0),
    ):
        with pytest.raises(ValueError):
            other.load_state_dict(state)
    with pytest.raises(ValueError):
        isample.SoftPruningSampler(10, num_epochs=3).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed"):
        a.state_dict(consumed=6)


# -- soft pruning -------------------------------------------------------------------------------


def test_soft_pruning_by_hand():
    n = 1000
    s = isample.SoftPruningSampler(n, num_epochs=8, prune_ratio=0.5, anneal_fraction=0.25, seed=0)
    assert s.full_data_from == 6
    first = drain(s)  # all scores equal: nothing is below the mean, nothing pruned
    assert sorted(first) == list(range(n)) and s.history[-1]["pruned_fraction"] == 0.0
    losses = torch.where(torch.arange(n) < 600, 0.1, 1.0).double()  # 600 items below the mean
    s.update(range(n), losses)
    items = drain(s)
    pruned = s.history[-1]["pruned_fraction"]
    assert abs(pruned - 0.3) < 0.05  # half of the 60% well learned
    assert len(items) == n - round(pruned * n)
    w = s.weights(items)
    assert torch.all(w[torch.tensor(items) < 600] == 2.0) and torch.all(w[torch.tensor(items) >= 600] == 1.0)
    for epoch in range(2, 8):
        s.update(range(n), losses)
        items = drain(s)
        if epoch >= 6:
            assert len(items) == n and s.history[-1]["kind"] == "full"
            assert torch.all(s.weights(items) == 1.0)


@pytest.mark.statistical
def test_soft_pruning_weighted_sum_is_unbiased():
    n, epochs = 200, 4000
    f = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    s = isample.SoftPruningSampler(n, num_epochs=10**6, prune_ratio=0.7, seed=1)
    s.update(range(n), f)  # scores = f: the lower half is "well learned"
    totals = []
    for _ in range(epochs):
        items = torch.tensor(drain(s))
        totals.append(float((s.weights(items) * f[items]).sum()))
    totals = np.array(totals)
    z = (totals.mean() - float(f.sum())) / (totals.std(ddof=1) / math.sqrt(epochs))
    assert abs(z) < 4.0
    # without the reweighting the sum is clearly too small
    unweighted = float(f.sum()) - 0.7 * float(f[f < f.mean()].sum())
    assert abs(totals.mean() - unweighted) > 10 * totals.std(ddof=1) / math.sqrt(epochs)


def test_soft_pruning_resume_and_errors():
    s = isample.SoftPruningSampler(50, num_epochs=4, seed=2)
    s.update(range(50), torch.rand(50))
    drain(s)
    other = isample.SoftPruningSampler(50, num_epochs=4, seed=2)
    other.load_state_dict(s.state_dict())
    assert drain(other) == drain(s)
    for bad in ({"prune_ratio": 1.0}, {"anneal_fraction": 2.0}, {"initial_score": float("inf")}):
        with pytest.raises(ValueError):
            isample.SoftPruningSampler(50, num_epochs=4, **bad)


# -- the public hooks wrappers build on --------------------------------------------------------


def test_begin_epoch_and_epoch_views():
    s = isample.ImportanceSampler(50, transform="softmax", uniform_mix=0.0, samples_per_epoch=20, warmup_epochs=1, seed=0)
    assert s.current_epoch is None and s.active_epoch is None
    assert (s.epoch_length(0), s.epoch_length(1)) == (50, 20)
    assert len(s) == 50 and s.history == []  # drawn ahead by len(): not an epoch yet
    epoch = s.begin_epoch()
    assert epoch.epoch == 0 and epoch.position == 0 and epoch.order.numel() == 50
    assert s.current_epoch is epoch and s.active_epoch is epoch and len(s.history) == 1
    epoch.position = 10  # a wrapper hands out part of the order itself
    assert s.active_epoch is epoch
    epoch.position = 50
    assert s.active_epoch is None and s.epoch == 1
    assert len(list(iter(s))) == 20 and [h["kind"] for h in s.history] == ["warmup", "importance"]


def test_prepare_then_apply_equals_update():
    a = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", nonfinite="skip", seed=0)
    b = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", nonfinite="skip", seed=0)
    idx, losses = torch.tensor([1, 2, 2, 7]), torch.tensor([0.5, float("nan"), 3.0, 1.0])
    a.update(idx, losses)
    prepared = b.prepare_update(idx, losses)
    assert prepared.skipped == 1 and prepared.indices.tolist() == [1, 2, 7]
    assert torch.equal(b.scores(), torch.zeros(10, dtype=torch.float64))  # nothing written yet
    b.apply_update(prepared)
    assert torch.equal(a.scores(), b.scores()) and a.counters == b.counters
    with pytest.raises(IndexError):
        b.prepare_update([10], [1.0])
    assert b.prepare_update([10], [1.0], num_items=20).indices.tolist() == [10]


def test_early_importance_by_hand():
    n = 4
    s = isample.ImportanceSampler(n, uniform_mix=0.0, score=isample.EarlyImportance(n, observations=2), transform="proportional",
                                  warmup_epochs=2, seed=0)
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    targets = torch.tensor([0, 0, 0])
    s.update([0, 1, 2], torch.zeros(3), logits=logits, targets=targets)  # 1 - p: 0.5, 0.1, 0.8
    torch.testing.assert_close(s.scores(), torch.tensor([0.5, 0.1, 0.8, 0.0], dtype=torch.float64))
    s.update([0], torch.zeros(1), logits=torch.log(torch.tensor([[0.9, 0.1]])), targets=torch.tensor([0]))
    assert s.scores()[0].item() == pytest.approx((0.5 + 0.1) / 2)  # the mean of two sightings
    state = s.state_dict()
    s.update([0], torch.zeros(1), logits=torch.log(torch.tensor([[0.0001, 0.9999]])), targets=torch.tensor([0]))
    assert s.scores()[0].item() == pytest.approx(0.3)  # frozen after two sightings
    # a rejected batch does not count as a sighting
    with pytest.raises(ValueError):
        s.update([3], torch.zeros(1), logits=torch.tensor([[float("nan"), 0.0]]), targets=torch.tensor([0]))
    assert s.score_policy.counts.tolist() == [2, 1, 1, 0]
    other = isample.ImportanceSampler(n, uniform_mix=0.0, score=isample.EarlyImportance(n, observations=2), transform="proportional",
                                      warmup_epochs=2, seed=0)
    other.load_state_dict(state)
    assert other.score_policy.counts.tolist() == [2, 1, 1, 0]
    with pytest.raises(TypeError, match="logits"):
        s.update([0], torch.zeros(1))


def test_update_before_any_epoch_follows_the_documented_policy():
    """Allowed: it records scores that the first epoch draws from; counted in the totals but
    in no epoch's history entry; weights() waits for an epoch."""
    n = 50
    s = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=4000, nonfinite="skip", seed=0)
    s.update(range(n), torch.where(torch.arange(n) < 5, 10.0, 0.0).double())
    s.update([7], [float("nan")])
    assert s.counters == {"updates": 2, "nonfinite_skipped": 1, "nonfinite_clamped": 0}
    with pytest.raises(RuntimeError, match="iterate"):
        s.weights([0])
    items = torch.tensor(drain(s))
    assert (items < 5).float().mean() > 0.95  # the first epoch drew from those scores
    assert s.history[0]["nonfinite_skipped"] == 0 and s.history[0]["nonfinite_clamped"] == 0


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize("nonfinite", ["skip", "clamp"])
def test_nonfinite_values_are_counted_per_epoch_in_history(kind, nonfinite):
    """Each epoch's history entry counts what that epoch's updates skipped or clamped, read
    where a training loop reads it (history[-1] once the epoch is over); totals in counters."""
    n, nan, inf = 20, float("nan"), float("inf")
    s = make_sampler(kind, n, score="last_loss", nonfinite=nonfinite, clamp_value=50.0, seed=0)
    s.update([0], [nan])  # before the first epoch: totals only
    per_epoch = [([1.0, nan, inf, -inf], 1, 2), ([1.0, 2.0, 3.0, 4.0], 0, 0), ([nan, nan, 5.0, inf], 2, 1)]
    for epoch, (losses, nans, infs) in enumerate(per_epoch):
        drain(s)
        batch = torch.arange(4) + 4 * epoch  # distinct items (draws with replacement repeat)
        s.update(batch, torch.tensor(losses))
        entry = s.history[-1]
        assert entry["epoch"] == epoch
        if nonfinite == "skip":
            assert (entry["nonfinite_skipped"], entry["nonfinite_clamped"]) == (nans + infs, 0)
        else:
            assert (entry["nonfinite_skipped"], entry["nonfinite_clamped"]) == (nans, infs)
            stored = s.scores()[batch]
            expected = torch.tensor(losses, dtype=torch.float64).clamp(-50.0, 50.0)
            finite = ~torch.isnan(expected)
            assert torch.equal(stored[finite], expected[finite])  # +-inf became +-clamp_value
    totals = s.counters
    assert totals["nonfinite_skipped"] == 1 + sum(h["nonfinite_skipped"] for h in s.history)
    assert totals["nonfinite_clamped"] == sum(h["nonfinite_clamped"] for h in s.history)
    assert bool(torch.isfinite(s.scores()).all())
    # an exact resume keeps the counts, and later updates still land in the epoch's entry
    state = s.state_dict()
    resumed = make_sampler(kind, n, score="last_loss", nonfinite=nonfinite, clamp_value=50.0, seed=0)
    resumed.load_state_dict(state)
    assert resumed.history == s.history and resumed.counters == s.counters
    resumed.update([0], [inf])
    assert resumed.history[-1]["nonfinite_skipped" if nonfinite == "skip" else "nonfinite_clamped"] == (
        s.history[-1]["nonfinite_skipped" if nonfinite == "skip" else "nonfinite_clamped"] + 1
    )


@pytest.mark.parametrize("kind", ["softmax", "rank"])
@pytest.mark.parametrize("nonfinite", ["skip", "clamp"])
def test_device_side_nonfinite_counts_are_read_with_history(kind, nonfinite):
    """The CUDA update path (no host sync) keeps NaN/inf counts in a tensor; they reach the
    epoch's history entry when history or counters is read, or the next epoch begins. Its
    bookkeeping runs unchanged on the CPU, which is how it is tested without a GPU."""
    nan, inf = float("nan"), float("inf")
    s = make_sampler(kind, 10, score="last_loss", nonfinite=nonfinite, clamp_value=50.0, seed=0)
    drain(s)
    s._update_on_device(torch.arange(4), torch.tensor([1.0, nan, inf, -inf], dtype=torch.float64), {})
    assert s._nonfinite_on_device is not None  # counted on the "device", not read yet
    skipped, clamped = (3, 0) if nonfinite == "skip" else (1, 2)
    entry = s.history[-1]
    assert (entry["nonfinite_skipped"], entry["nonfinite_clamped"]) == (skipped, clamped)
    assert s._nonfinite_on_device is None
    expected = [1.0, 0.0, 0.0, 0.0] if nonfinite == "skip" else [1.0, 0.0, 50.0, -50.0]
    assert s.scores()[:4].tolist() == expected
    s._update_on_device(torch.tensor([5]), torch.tensor([nan], dtype=torch.float64), {})
    drain(s)  # the next epoch begins: the count belongs to the one that ended
    assert s.history[0]["nonfinite_skipped"] == skipped + 1 and s.history[1]["nonfinite_skipped"] == 0
    assert s.counters["nonfinite_skipped"] == skipped + 1 and s.counters["nonfinite_clamped"] == clamped


def test_nonfinite_clamp_policy():
    s = isample.ImportanceSampler(5, transform="softmax", uniform_mix=0.0, warmup_epochs=0, nonfinite="clamp", clamp_value=50.0, seed=0)
    s.update([0, 1, 2, 3], torch.tensor([1.0, float("inf"), -float("inf"), float("nan")]))
    assert s.scores().tolist() == [1.0, 50.0, -50.0, 0.0, 0.0]
    assert s.counters["nonfinite_clamped"] == 2 and s.counters["nonfinite_skipped"] == 1
    with pytest.raises(ValueError, match="clamp_value"):
        isample.ImportanceSampler(5, nonfinite="clamp", clamp_value=float("inf"))
    pruning = isample.SoftPruningSampler(5, num_epochs=2, nonfinite="clamp", clamp_value=50.0, seed=0)
    pruning.update([0, 1, 2, 3], torch.tensor([1.0, float("inf"), -float("inf"), float("nan")]))
    assert pruning.scores().tolist() == [1.0, 50.0, -50.0, 1.0, 1.0]  # initial_score 1 where skipped
    assert pruning.counters["nonfinite_clamped"] == 2 and pruning.counters["nonfinite_skipped"] == 1
    with pytest.raises(ValueError, match="clamp_value"):
        isample.SoftPruningSampler(5, num_epochs=2, nonfinite="clamp", clamp_value=0.0)


# -- memory -------------------------------------------------------------------------------------


def _live_trees() -> int:
    gc.collect()
    return sum(type(o) in (isample.SumTree, isample.SoftmaxTree) for o in gc.get_objects())


@pytest.fixture
def no_large_tensor(monkeypatch):
    """Make a regression fail safely: torch.full/ones of more than 1 GiB raise instead of
    touching that much memory on the test machine."""
    for name in ("full", "ones"):
        real = getattr(torch, name)

        def guarded(size, *args, _real=real, **kwargs):
            if math.prod(size if isinstance(size, (tuple, list, torch.Size)) else (size,)) * 8 > 2**30:
                raise AssertionError(f"torch.{_real.__name__} of {size} was about to allocate for real")
            return _real(size, *args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="needs os.sysconf")
def test_a_sampler_that_cannot_fit_raises_memory_error_and_keeps_nothing(no_large_tensor):
    # 2^39 * (8 scores + 8 weights + 8 order)
    with pytest.raises(MemoryError, match=r"needs 13,194,139,533,312 bytes"):
        isample.SoftPruningSampler(2**39, num_epochs=2)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # the tree alone fits (and costs nothing until touched); with the scores, an epoch's
    # weights and its order it does not
    for transform in ("proportional", "rank"):
        # far too big: refused from the lower bound, before the tree is built
        n = memory // 16
        with pytest.raises(MemoryError, match=f"needs {32 * n:,} bytes"):
            isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, transform=transform)
        # just too big: the tree (8.53 bytes per item, built for free) shows that it is
        n = int(memory / 32.25)
        probe = isample.SumTree(n, seed=0)  # free: its pages are not touched
        needed = probe.nbytes + 24 * n
        assert 32 * n < memory < needed
        del probe
        before = _live_trees()
        with pytest.raises(MemoryError, match=f"needs {needed:,} bytes") as caught:
            isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, transform=transform)
        assert _live_trees() == before, "a rejected sampler kept its tree"
        del caught
    # A SoftmaxTree fills its leaves when built (seconds, and all its memory, at this size):
    # the sampler must refuse before building it, from a lower bound of 16 bytes per item.
    n = memory // 28
    with pytest.raises(MemoryError, match=f"needs {32 * n:,} bytes"):
        isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0)
    # |Z| far beyond N (with replacement): its order alone cannot fit, refused at construction
    with pytest.raises(MemoryError, match="epoch order"):
        isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=10**15)


def test_allocation_failures_become_memory_errors_and_change_nothing(monkeypatch):
    """When the memory is there at the check but not at the allocation (other processes),
    torch's RuntimeError becomes a MemoryError naming the bytes, and nothing changes."""
    def failing_full(size, *args, **kwargs):
        numel = math.prod(size)
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            f"you tried to allocate {numel * 8} bytes. Error code 12 (Cannot allocate memory)"
        )

    with monkeypatch.context() as patch:
        patch.setattr(torch, "full", failing_full)
        before = _live_trees()
        with pytest.raises(MemoryError, match="8,000 bytes"):
            isample.ImportanceSampler(1000, uniform_mix=0.0, warmup_epochs=0, transform="rank")
        assert _live_trees() == before
        with pytest.raises(MemoryError, match="8,000 bytes"):
            isample.SoftPruningSampler(1000, num_epochs=2)
    s = isample.ImportanceSampler(1000, uniform_mix=0.0, warmup_epochs=0, transform="proportional", samples_per_epoch=100, seed=4)
    twin = isample.ImportanceSampler(1000, uniform_mix=0.0, warmup_epochs=0, transform="proportional", samples_per_epoch=100, seed=4)
    for sampler in (s, twin):
        sampler.update(range(1000), torch.linspace(0, 2, 1000))
        drain(sampler)
    state = s.state_dict()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "full", failing_full)
        with pytest.raises(MemoryError, match=r"8,000 bytes .*weights of epoch 1"):
            drain(s)  # the epoch's weights cannot be allocated
    assert len(s.history) == 1 and s.epoch == 1
    assert torch.equal(s.scores(), state["scores"])
    assert drain(s) == drain(twin)
    assert torch.equal(s.weights(s.current_epoch.order), twin.weights(twin.current_epoch.order))


# -- issue 19: hardening from the outside -------------------------------------------------------


def _same_state(a, b):
    assert_identical(a, b)


def test_len_in_the_loop_never_draws_the_next_epoch_early():
    """len(loader) / steps_per_epoch inside the loop, after the last batch but before its
    update, must not draw the next epoch: it would miss the last batch's losses."""
    n = 20

    def run(ask_lengths: bool):
        s = isample.ImportanceSampler(n, transform="softmax", uniform_mix=0.0, warmup_epochs=1, seed=0)
        loader = DataLoader(isample.IndexedDataset(TensorDataset(torch.arange(n))), batch_size=5, sampler=s)
        for step, (index, _) in enumerate(loader):
            if ask_lengths:  # as progress bars, Lightning and the HF Trainer do
                assert len(loader) == 4 and s.steps_per_epoch(5) == 4 and s.total_steps(3, 5) == 12
            # the last batch's items become by far the most likely (p of the others ~ 1e-17)
            s.update(index, torch.full((5,), 40.0 if step == 3 else 0.0, dtype=torch.float64))
            last = set(index.tolist())
        if ask_lengths:
            assert len(loader) == 4  # between epochs too
        return drain(s), last

    (without, _), (with_len, last) = run(False), run(True)
    assert with_len == without
    assert set(with_len) <= last, "the next epoch missed the last batch's update"


def test_len_does_not_draw_and_soft_pruning_predicts_its_length_exactly():
    s = isample.SoftPruningSampler(200, num_epochs=10, prune_ratio=0.5, seed=3)
    s.update(range(200), torch.linspace(0.0, 1.0, 200))
    before = s.state_dict()
    predicted = len(s)
    assert s.steps_per_epoch(7) == -(-predicted // 7)
    _same_state(s.state_dict(), before)  # nothing drawn, no random number used
    assert 200 - 80 < predicted < 200 - 20  # about half of the 100 below-mean items dropped
    assert len(drain(s)) == predicted
    # an update after len() and before iter() changes the length: the draw follows the update
    s.update(range(200), torch.linspace(1.0, 0.0, 200) ** 8)
    predicted = len(s)
    assert len(drain(s)) == predicted
    assert s.epoch_length(9) == 200 and s.epoch_length(2) is None  # full-data epochs are known


def test_total_steps_is_closed_form():
    s = isample.ImportanceSampler(100, transform="softmax", uniform_mix=0.0, samples_per_epoch=30, warmup_epochs=2, seed=0)
    assert s.total_steps(5, 8) == 2 * 13 + 3 * 4
    assert s.total_steps(10**15, 8, drop_last=True) == 2 * 12 + (10**15 - 2) * 3  # no loop over epochs
    assert s.history == []


@pytest.mark.parametrize("epoch", [2**63, 2**70, -1])
def test_epochs_beyond_int64_are_refused(epoch):
    s = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(epoch)
    s.set_epoch(2**63 - 1)  # the last epoch is drawn, then nothing later aliases epoch 0
    first = drain(s)
    with pytest.raises(ValueError, match="beyond the last epoch"):
        iter(s)
    s.set_epoch(0)
    assert drain(s) != first or len(first) == 1


def test_numpy_numbers_are_accepted_and_saved_as_python_numbers(tmp_path):
    from isample.checkpoint import load_checkpoint, save_checkpoint

    s = isample.ImportanceSampler(
        np.int64(30), score=isample.RunningLoss(np.float32(0.5)), transform=isample.Proportional(np.float64(0.5)),
        samples_per_epoch=np.int32(10), replacement=np.bool_(False), warmup_epochs=np.int64(1),
        uniform_mix=np.float32(0.1), weight_exponent=np.float64(0.5), initial_score=np.float16(1.0),
        clamp_value=np.float64(5.0), seed=np.uint64(3), weighting=np.str_("auto"),
    )
    p = isample.SoftPruningSampler(np.int64(30), num_epochs=np.int64(4), prune_ratio=np.float32(0.5),
                                   anneal_fraction=torch.tensor(0.25), initial_score=np.float64(1.0))
    for sampler in (s, p):
        sampler.update(range(30), np.linspace(0.0, 1.0, 30))
        drain(sampler)
        save_checkpoint(tmp_path / "ck.pt", sampler.state_dict())
        state = load_checkpoint(tmp_path / "ck.pt")  # weights-only: a numpy scalar would be refused here
        assert all(type(v) in (int, float, bool, str, type(None), dict) for v in state["config"].values())
        fresh = type(sampler).__new__(type(sampler))
        fresh.__setstate__(copy.deepcopy(sampler.__getstate__()))
        fresh.load_state_dict(state)
        _same_state(fresh.state_dict(), sampler.state_dict())


@pytest.mark.parametrize("mangle", [
    lambda st: st.update(counters=[1]),
    lambda st: st.update(counters={"updates": "x"}),
    lambda st: st.update(counters={"nosuch": 1}),
    lambda st: st.update(history="x"),
    lambda st: st.update(history=[{"epoch": 0, "nonfinite_skipped": "x"}]),
    lambda st: st["current"].pop("order"),
    lambda st: st["current"].update(position=10**6),
    lambda st: st["current"].update(info=[1]),
    lambda st: st.pop("next_epoch"),
    lambda st: st.update(next_epoch=-1),
    lambda st: st["tree"]["weights"].fill_(float("nan")),
    lambda st: st["tree"].update(capacity=torch.ones(3)),
    lambda st: st.update(format=torch.ones(2)),
    lambda st: st.update(scores=torch.ones(3)),
])
def test_a_refused_state_changes_nothing(mangle):
    """Every part of a state is checked before any of it is loaded."""
    s = isample.ImportanceSampler(10, uniform_mix=0.0, warmup_epochs=0, transform="proportional", samples_per_epoch=4, seed=0)
    s.update(range(10), torch.rand(10, generator=torch.Generator().manual_seed(0)))
    drain(s)
    other = isample.ImportanceSampler(10, uniform_mix=0.0, warmup_epochs=0, transform="proportional", samples_per_epoch=4, seed=0)
    other.update([1, 2], [5.0, 6.0])
    drain(other)
    state = other.state_dict()
    mangle(state)
    before = s.state_dict()
    with pytest.raises((ValueError, TypeError, IndexError)):
        s.load_state_dict(state)
    _same_state(s.state_dict(), before)
    s.update([0], [1.0])  # still whole: the next update works and counts
    assert s.counters["updates"] == 2


def test_a_state_saved_mid_epoch_loads_back_identical():
    s = isample.ImportanceSampler(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=8, seed=1)
    s.update(range(20), torch.linspace(0.0, 1.0, 20))
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    fresh = isample.ImportanceSampler(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=8, seed=1)
    fresh.load_state_dict(state)
    _same_state(fresh.state_dict(), state)  # a fixed point: saving again gives the same state
    assert head + drain(fresh) == s.current_epoch.order.tolist()


@pytest.mark.parametrize("policy", ["reducible", "early"])
def test_policies_sized_for_other_items_are_refused_at_construction(policy):
    make = (lambda k: isample.ReducibleLoss(torch.zeros(k))) if policy == "reducible" else isample.EarlyImportance
    with pytest.raises(ValueError, match="10"):
        isample.ImportanceSampler(10, score=make(5))
    with pytest.raises(ValueError, match="10"):
        isample.SoftPruningSampler(10, num_epochs=2, score=make(12))
    isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score=make(10))


@pytest.mark.parametrize("score", ["grad_norm", "early"])
def test_targets_are_checked_in_every_policy_that_takes_them(score):
    policy = isample.EarlyImportance(4) if score == "early" else score
    s = isample.ImportanceSampler(4, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score=policy, seed=0)
    logits = torch.zeros(2, 3)
    before = s.state_dict()
    for targets, error in [
        (torch.tensor([0, -1]), IndexError),  # would wrap around to the last class
        (torch.tensor([0, 3]), IndexError),
        (torch.tensor([0.0, 1.0]), TypeError),
        (torch.tensor([True, False]), TypeError),
        (torch.tensor([[0, 1]]), ValueError),
        ("01", TypeError),
    ]:
        with pytest.raises(error):
            s.update([0, 1], [1.0, 1.0], logits=logits, targets=targets)
        _same_state(s.state_dict(), before)
    with pytest.raises(TypeError, match="logits"):
        s.update([0, 1], [1.0, 1.0], logits=torch.zeros(2, 3, dtype=torch.complex64), targets=torch.tensor([0, 1]))
    s.update([0, 1], [1.0, 1.0], logits=np.zeros((2, 3)), targets=np.array([2, 0]))  # numpy arrays work
    assert s.scores()[0] > 0


def test_weights_dtype_and_device_are_checked():
    s = isample.ImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=0)
    drain(s)
    assert s.weights([0, 1], dtype=torch.float32).dtype is torch.float32
    with pytest.raises(TypeError, match="torch.dtype"):
        s.weights([0], dtype="float32")
    with pytest.raises(ValueError, match="floating"):
        s.weights([0], dtype=torch.int64)  # would truncate the weights
    with pytest.raises(ValueError, match="device"):
        s.weights([0], device="gpu")


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_samplers_pickle_and_deep_copy(kind, how):
    import pickle

    s = make_sampler(kind, 30, seed=2, samples_per_epoch=10) if kind != "soft_pruning" else make_sampler(kind, 30, seed=2)
    s.update(range(30), torch.linspace(0.0, 3.0, 30))
    it = iter(s)
    next(it)
    twin = pickle.loads(pickle.dumps(s)) if how == "pickle" else copy.deepcopy(s)
    _same_state(twin.state_dict(), s.state_dict())
    s.set_epoch(4)
    twin.set_epoch(4)
    assert drain(twin) == drain(s)
    before = s.state_dict()
    twin.update([0], [100.0])
    _same_state(s.state_dict(), before)  # nothing shared


# -- set_scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_set_scores_writes_scores_without_the_policy(kind):
    s = make_sampler(kind, 6, score="running_loss", initial_score=1.0, seed=0)
    s.set_scores([1, 3, 1], torch.tensor([5.0, 2.0, 7.0], requires_grad=True))  # repeated index: last wins
    assert s.scores().tolist() == [1.0, 7.0, 1.0, 2.0, 1.0, 1.0]  # no running-loss blend
    assert s.counters["updates"] == 1
    if kind != "soft_pruning":  # sampling uses the sampler's transform of the new scores
        expected = s.transform.probabilities(s.scores())
        np.testing.assert_allclose(s.probabilities().numpy(), expected.numpy(), rtol=1e-12)
    s.update([1], [0.0])  # the policy goes on from the scores set
    assert s.scores()[1].item() == pytest.approx(0.2 * 7.0)


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize("nonfinite", ["raise", "skip", "clamp"])
def test_set_scores_checks_like_update_and_refuses_negative_scores(kind, nonfinite):
    s = make_sampler(kind, 5, score="last_loss", nonfinite=nonfinite, clamp_value=9.0, seed=0)
    s.set_scores(range(5), [1.0] * 5)
    drain(s)
    before = s.state_dict()
    for indices, scores, error in [
        ([5], [1.0], IndexError), ([-1], [1.0], IndexError), ([0.5], [1.0], TypeError), ([0, 1], [1.0], ValueError),
        ([0, 1], [2.0, -1.0], ValueError), ([0], [-float("inf")], ValueError), ([0], [-5e-324], ValueError),
        ([0], ["1"], TypeError), ([0], torch.tensor([1j]), TypeError),
    ]:
        with pytest.raises(error):
            s.set_scores(indices, scores)
        _same_state(s.state_dict(), before)
    nan, inf = float("nan"), float("inf")
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="non-finite"):
            s.set_scores([0, 1], [3.0, nan])
        _same_state(s.state_dict(), before)
        return
    s.set_scores([0, 1, 2], [3.0, nan, inf])
    assert s.scores().tolist() == ([3.0, 1.0, 1.0, 1.0, 1.0] if nonfinite == "skip" else [3.0, 1.0, 9.0, 1.0, 1.0])
    assert s.counters["nonfinite_skipped"] == (2 if nonfinite == "skip" else 1)
    assert s.counters["nonfinite_clamped"] == (0 if nonfinite == "skip" else 1)


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_set_scores_device_path_on_cpu_tensors(kind):
    """The CUDA path of set_scores runs unchanged on CPU tensors: a negative score leaves the
    batch out on the device and is raised when the next epoch is drawn."""
    s = make_sampler(kind, 5, score="last_loss", seed=0)
    s._set_scores_on_device(torch.tensor([0, 2, 0]), torch.tensor([4.0, 3.0, 6.0], dtype=torch.float64))
    assert s.scores().tolist() == [6.0, 0.0 if kind != "soft_pruning" else 1.0, 3.0] + s.scores()[3:].tolist()
    before = s.scores().clone()
    s._set_scores_on_device(torch.tensor([1, 3]), torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert torch.equal(s.scores(), before)  # nothing written
    with pytest.raises(ValueError, match="negative"):
        iter(s)
    drain(s)  # reported once


# -- issue 21 item 2: repeated indices in the score store, decided on the device ----------------


@settings(max_examples=60)
@given(
    n=st.integers(1, 12),
    indices=st.lists(st.integers(0, 11), max_size=40),
    data=st.data(),
)
def test_the_device_store_gives_every_repeated_index_its_last_value(n, indices, data):
    """store_all_or_nothing (the CUDA store path, run on CPU tensors): duplicate-heavy batches
    against a last-wins reference; a rejected batch (bad index, non-finite score, or the tree's
    refusal) changes nothing."""
    from isample.sampler import last_wins, store_all_or_nothing

    indices = [i % n for i in indices]
    values = data.draw(st.lists(st.floats(-1e3, 1e3), min_size=len(indices), max_size=len(indices)))
    store = torch.arange(n, dtype=torch.float64)
    expected = store.clone()
    for i, v in zip(indices, values):
        expected[i] = v
    idx, val = torch.tensor(indices, dtype=torch.int64), torch.tensor(values, dtype=torch.float64)
    sorted_idx, winners = last_wins(idx, val)
    shuffled = torch.randperm(len(indices))  # any scatter order gives the same result
    scattered = torch.arange(n, dtype=torch.float64)
    scattered[sorted_idx[shuffled]] = winners[shuffled]
    assert torch.equal(scattered, expected)
    rejected, outside = store_all_or_nothing(store, idx, val)
    assert not rejected and not outside and torch.equal(store, expected)
    # rejections: the tree refused, an index outside, a NaN
    for bad_idx, bad_val, accept in [
        (idx, val, torch.tensor(False)),
        (torch.cat([idx, torch.tensor([n])]), torch.cat([val, torch.tensor([1.0], dtype=torch.float64)]), None),
        (torch.cat([idx, torch.tensor([0])]), torch.cat([val, torch.tensor([math.nan], dtype=torch.float64)]), None),
    ]:
        before = store.clone()
        rejected, _ = store_all_or_nothing(store, bad_idx, bad_val, accept)
        assert rejected and torch.equal(store, before)


def test_large_cpu_batches_with_repeats_keep_the_last_value(one_torch_thread):
    """Above torch's parallel grain a CPU scatter may run on several threads: the store
    resolves repeats first."""
    n, k = 50, 100_000
    s = isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, transform="rank", seed=0)
    idx = torch.arange(k) % n
    values = torch.arange(k, dtype=torch.float64)
    torch.set_num_threads(2)
    s.set_scores(idx, values)
    assert torch.equal(s.scores(), torch.arange(k - n, k, dtype=torch.float64))


def test_the_proportional_store_follows_the_trees_decision():
    """On CUDA the tree refuses leaves above DBL_MAX / 2n on the device; the score store must
    take the same decision (run here on CPU tensors through the store's device path)."""
    from isample.sampler import store_all_or_nothing

    s = isample.ImportanceSampler(4, uniform_mix=0.0, warmup_epochs=0, transform=isample.Proportional(alpha=2.0), seed=0)
    scores = torch.tensor([1e200, 1.0], dtype=torch.float64)  # finite, but its leaf 1e400 is not
    leaves = s.transform.leaf_values(scores)
    accept = ((leaves >= 0.0) & (leaves <= s._max_leaf)).all()
    store = torch.zeros(4, dtype=torch.float64)
    rejected, _ = store_all_or_nothing(store, torch.tensor([0, 1]), scores, accept)
    assert rejected and torch.equal(store, torch.zeros(4, dtype=torch.float64))
    assert s._max_leaf == sys.float_info.max / (2.0 * 16)  # n = 4 rounds up to one block of 16


def test_a_custom_sampler_without_epoch_lengths_still_never_draws_in_len():
    """EpochSampler's fallback: len() draws the epoch aside (seeded, so the same as iter()
    will draw) and keeps nothing."""

    class EveryOther(isample.EpochSampler):
        def __init__(self, n):
            super().__init__(n, score="last_loss", nonfinite="raise", seed=0, device="cpu")
            self._scores = torch.zeros(n, dtype=torch.float64)

        def _read_scores(self, indices):
            return self._scores[indices]

        def _write_scores(self, indices, scores):
            self._store_scores(self._scores, indices, scores)

        def scores(self):
            return self._scores.clone()

        def _draw(self, epoch, generator):
            kept = torch.nonzero(self._scores <= self._scores.median()).squeeze(1)
            return isample.sampler.Epoch(epoch, kept[torch.randperm(kept.numel(), generator=generator)], None)

    s = EveryOther(9)
    s.update(range(9), torch.arange(9.0))
    before = s.state_dict()
    predicted = len(s)
    _same_state(s.state_dict(), before)
    assert predicted == 5 and len(drain(s)) == predicted


# -- the fast paths: weights and updates read plain arrays in the core -------------------------


@pytest.fixture
def general_path_only():
    """The core reads no tensor or array itself: every call takes the general Python path."""
    isample._core.configure_arrays(None, None)
    yield
    isample._backend.configure_fast_paths()


@pytest.mark.parametrize("transform", ["softmax", "proportional", "rank", isample.Proportional(alpha=0.6, eps=0.1)])
@pytest.mark.parametrize("score", ["last_loss", "running_loss"])
def test_fast_and_general_sampler_steps_agree_bit_for_bit(transform, score, general_path_only):
    """weights() and update() give the same weights, scores and next epoch whether the core
    reads the arguments itself or the general path converts them first."""
    losses_of = np.random.default_rng(1).random((6, 32)) * 4.0
    outcomes = {}
    for fast in (False, True):
        if fast:
            isample._backend.configure_fast_paths()
        s = isample.ImportanceSampler(200, uniform_mix=0.0, warmup_epochs=0, score=score, transform=transform, samples_per_epoch=96, seed=4)
        s.update(np.arange(200), np.linspace(0.0, 3.0, 200))
        order = torch.tensor(drain(s))
        seen = []
        for step in range(6):
            batch = order[32 * (step % 3) : 32 * (step % 3 + 1)]
            batch[:3] = batch[3]  # a repeated index: the last value wins
            seen.append(s.weights(batch))
            seen.append(s.weights(batch.numpy(), dtype=torch.float32, device=torch.device("cpu")))
            seen.append(s.weights(batch, dtype=torch.float64, scale=1 / 32))
            losses = losses_of[step]
            s.update(batch, torch.from_numpy(losses).float() if step % 2 else torch.from_numpy(losses))
        outcomes[fast] = (seen, s.scores(), s.probabilities(), torch.tensor(drain(s)), dict(s.counters))
    for a, b in zip(outcomes[False][0], outcomes[True][0]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(outcomes[False][1:4], outcomes[True][1:4]):
        assert torch.equal(a, b)
    assert outcomes[False][4] == outcomes[True][4]


@pytest.mark.parametrize("fast", [True, False])
def test_weights_of_a_uniform_epoch(fast, request):
    """A warm-up epoch weights every item 1 (scaled, in the dtype asked for), and refuses an
    index outside [0, N) as an importance epoch does, on the compiled and the general path."""
    if not fast:
        request.getfixturevalue("general_path_only")
    s = isample.ImportanceSampler(50, warmup_epochs=1, seed=0)
    batch = torch.tensor(drain(s)[:16])
    assert s.history[-1]["kind"] == "warmup"
    assert torch.equal(s.weights(batch), torch.ones(16, dtype=torch.float64))
    w = s.weights(batch, dtype=torch.float32, scale=1 / 16)
    assert w.dtype == torch.float32 and torch.equal(w, torch.full((16,), 1 / 16, dtype=torch.float32))
    for bad in (torch.tensor([3, 50]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="out of range|outside"):
            s.weights(bad)


@pytest.mark.parametrize("transform", ["softmax", "proportional", "rank"])
def test_a_copied_sampler_updates_its_own_scores(transform):
    """A copy (deepcopy, pickle) gets a compiled step of its own: its updates change its
    scores and never the original's."""
    import copy
    import pickle

    s = isample.ImportanceSampler(30, transform=transform, uniform_mix=0.0, warmup_epochs=0, seed=0)
    s.update(torch.arange(30), torch.linspace(0.0, 1.0, 30, dtype=torch.float64))
    before = s.scores()
    for twin in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert twin._step is not None and twin._step is not s._step
        twin.update(torch.arange(5), torch.full((5,), 9.0, dtype=torch.float64))
        assert bool((twin.scores()[:5] == 9.0).all()) and twin.counters["updates"] == 2
        assert torch.equal(s.scores(), before) and s.counters["updates"] == 1
        assert twin.device is s.device  # the CPU device object the fast paths look for
        with twin._lock:  # a lock of its own
            assert not s._lock.held()


@pytest.mark.parametrize("transform", [isample.Softmax(2.0), isample.Proportional(0.5, 0.1)])
def test_a_transform_s_parameters_are_fixed_once_made(transform):
    """A tree holds leaves computed with them (and the compiled step its constants): a
    change would leave the tree and later updates disagreeing, so it is refused. Subclasses
    (the core computes nothing for them) and RankBased (recomputed at every draw) are free."""
    import copy
    import pickle

    name = next(iter(k for k in transform.config() if k != "name"))
    with pytest.raises(AttributeError, match="fixed once it is made"):
        setattr(transform, name, 1.0)
    for twin in (copy.deepcopy(transform), pickle.loads(pickle.dumps(transform))):
        assert twin.config() == transform.config()
        with pytest.raises(AttributeError, match="fixed"):
            setattr(twin, name, 1.0)

    class Tagged(type(transform)):
        def __init__(self):
            super().__init__(1.0)
            self.tag = "mine"

    assert Tagged().tag == "mine"
    rank = isample.RankBased(0.7)
    rank.alpha = 1.0
    assert rank.config()["alpha"] == 1.0


def test_weights_and_update_keep_their_python_face():
    """weights and update are methods of the core that try the compiled step first; to a
    user they are the documented functions: name, docstring, signature, binding, errors."""
    import inspect

    general = isample.sampler._general_calls
    for name in ("weights", "update"):
        method = getattr(isample.ImportanceSampler, name)
        assert method is getattr(isample.EpochSampler, name) is getattr(isample.SoftPruningSampler, name)
        assert method.__name__ == name and method.__doc__ == general[name].__doc__ and method.__wrapped__ is general[name]
        assert inspect.signature(method) == inspect.signature(general[name])
    s = isample.ImportanceSampler(20, uniform_mix=0.0, warmup_epochs=0, seed=0)
    batch = torch.tensor(drain(s)[:4])
    assert list(inspect.signature(s.weights).parameters) == ["indices", "dtype", "device", "scale"]
    assert torch.equal(isample.ImportanceSampler.weights(s, batch), s.weights(batch))  # called on the class
    with pytest.raises(TypeError, match="positional"):
        s.weights(batch, torch.float32)  # dtype is keyword-only
    with pytest.raises(TypeError, match="dtypo"):
        s.weights(batch, dtypo=torch.float32)
    with pytest.raises(TypeError, match="missing"):
        s.update(batch)
    with pytest.raises(ValueError, match="callable"):
        isample._core.StepMethod(1, "update")


def test_the_compiled_step_follows_the_sampler_s_score_policy():
    """The score policy is read at each call: a new policy, or a new keep, takes effect on
    the compiled path as on the general one; a keep outside [0, 1] is refused there too."""
    s = isample.ImportanceSampler(10, transform="rank", uniform_mix=0.0, warmup_epochs=0, seed=0)
    s.score_policy = isample.RunningLoss(beta=0.5)
    s.update(torch.tensor([0]), torch.tensor([4.0], dtype=torch.float64))  # compiled
    s.update([1], [4.0])  # general
    assert s.scores()[:2].tolist() == [2.0, 2.0]

    broken = isample.RunningLoss(beta=0.5)
    broken.keep = float("nan")
    s.score_policy = broken
    before = s.scores()
    with pytest.raises(ValueError):
        s.update(torch.tensor([2]), torch.tensor([1.0], dtype=torch.float64))
    assert torch.equal(s.scores(), before)


def test_weighted_loss_calls_a_subclass_s_weights():
    from isample.integrations.protocol import weighted_loss

    class Halved(isample.ImportanceSampler):
        def weights(self, indices, **kwargs):
            return super().weights(indices, **kwargs) / 2

    s = Halved(20, uniform_mix=0.0, warmup_epochs=0, seed=0)
    batch = torch.tensor(drain(s)[:4])
    losses = torch.ones(4, dtype=torch.float64)
    plain = isample.ImportanceSampler(20, uniform_mix=0.0, warmup_epochs=0, seed=0)
    drain(plain)
    assert weighted_loss(s, batch, losses).item() == weighted_loss(plain, batch, losses).item() / 2


def test_the_compiled_methods_pickle_as_the_functions_they_stand_for():
    import copy
    import pickle

    for method in (isample.EpochSampler.weights, isample.ImportanceSampler.update):
        assert pickle.loads(pickle.dumps(method)) is method and copy.copy(method) is method


def test_weights_scale():
    s = isample.ImportanceSampler(40, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=30, seed=0)
    batch = torch.tensor(drain(s)[:8])
    w = s.weights(batch)
    assert torch.equal(s.weights(batch, scale=0.125), w * 0.125)
    assert torch.equal(s.weights(batch, dtype=torch.float32, scale=0.125), (w * 0.125).float())
    assert torch.equal(s.weights(batch.tolist(), scale=3), w * 3)  # the general path: any real number
    with pytest.raises(ValueError, match="scale"):
        s.weights(batch, scale=float("nan"))
    with pytest.raises(TypeError, match="scale"):
        s.weights(batch, scale="1")


def test_fast_weights_refuse_like_the_general_path():
    s = isample.ImportanceSampler(50, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=5, replacement=False, seed=0)
    drawn = set(drain(s))
    undrawn = next(i for i in range(50) if i not in drawn)
    with pytest.raises(ValueError, match=f"item {undrawn} was not drawn in epoch 0"):
        s.weights(torch.tensor([min(drawn), undrawn]))
    with pytest.raises(IndexError, match="out of range"):
        s.weights(torch.tensor([50]))
    with pytest.raises(TypeError, match="integers"):
        s.weights(torch.tensor([0.0]))


def test_a_rejected_fast_update_changes_nothing():
    """The core checks every index and score before writing; the general path then says why."""
    for transform in ("softmax", "proportional", "rank"):
        s = isample.ImportanceSampler(10, uniform_mix=0.0, warmup_epochs=0, transform=transform, score="running_loss", seed=0)
        before = s.scores()
        with pytest.raises(IndexError, match=r"\[10\]"):
            s.update(torch.tensor([0, 10]), torch.ones(2))
        with pytest.raises(ValueError, match="non-finite"):
            s.update(torch.tensor([0, 1]), torch.tensor([1.0, float("inf")]))
        assert torch.equal(s.scores(), before) and s.counters["updates"] == 0
