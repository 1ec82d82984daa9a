"""The backend protocol (isample.integrations.protocol) by hand, its errors, and the plain-loop
recipe of docs/backend_protocol.md run as written."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import isample
from isample.integrations.protocol import SamplerProtocol, check_per_example_losses, split_batch, weighted_loss

# ImportanceSampler's defaults before issue 24 (softmax, no uniform mixture, no warm-up): the
# helpers below keep them, so their first epoch is importance-sampled with the weights these tests check
OLD_DEFAULTS = {"transform": "softmax", "uniform_mix": 0.0, "warmup_epochs": 0}

N, BATCH = 64, 16
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "backend_protocol.md"


def drawn(seed: int = 0, **kwargs) -> tuple:
    """A sampler whose epoch 0 was drawn from unequal scores, and that epoch's first batch."""
    sampler = isample.ImportanceSampler(N, seed=seed, **{**OLD_DEFAULTS, **kwargs})
    sampler.update(torch.arange(N), torch.linspace(0.0, 2.0, N))
    scores = sampler.scores()
    batch = torch.tensor(list(iter(sampler))[:BATCH])
    return sampler, scores, batch


def test_weighted_loss_by_hand():
    sampler, scores, index = drawn()
    assert isinstance(sampler, SamplerProtocol)
    losses = torch.rand(BATCH, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss = weighted_loss(sampler, index, losses)

    weights = 1.0 / (N * torch.softmax(scores, 0)[index])  # draw-time p: softmax of the scores before
    assert weights.std() > 0.1
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, (losses.detach().double() * weights).mean().float())
    loss.backward()
    torch.testing.assert_close(losses.grad, (weights / BATCH).float())
    # the scores are the losses now (last_loss); the probabilities of this epoch are not
    torch.testing.assert_close(sampler.scores()[index], losses.detach().double())
    torch.testing.assert_close(sampler.weights(index), weights)

    total = weighted_loss(sampler, index, losses.detach(), reduction="sum")
    torch.testing.assert_close(total, (losses.detach().double() * weights).sum().float())


class ProtocolOnly:
    """A sampler that has only what SamplerProtocol asks for (weights without ``scale``)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def weights(self, indices, *, dtype=None, device=None):
        return self.sampler.weights(indices, dtype=dtype, device=device)

    def update(self, indices, losses, **extra):
        self.sampler.update(indices, losses, **extra)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["int64 tensor", "int32 tensor", "list", "protocol-only sampler"])
def test_every_path_of_weighted_loss_gives_the_same_loss_gradient_and_scores(kind, reduction):
    """The one-expression fast path (isample sampler, tensor indices: scaled weights, one dot
    product) against the general paths (other index types, a sampler with SamplerProtocol's
    calls only), by hand."""
    sampler, scores, index = drawn()
    weights = 1.0 / (N * torch.softmax(scores, 0)[index])
    given = {"int64 tensor": index, "int32 tensor": index.int(), "list": index.tolist(), "protocol-only sampler": index}[kind]
    target = ProtocolOnly(sampler) if kind == "protocol-only sampler" else sampler
    losses = torch.rand(BATCH, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss = weighted_loss(target, given, losses, reduction=reduction)
    expected = (losses.detach().double() * weights).sum() / (BATCH if reduction == "mean" else 1)
    torch.testing.assert_close(loss, expected.float())
    loss.backward()
    torch.testing.assert_close(losses.grad, (weights / (BATCH if reduction == "mean" else 1)).float())
    torch.testing.assert_close(sampler.scores()[index], losses.detach().double())
    assert not sampler.scores().requires_grad


@pytest.mark.parametrize("transform", ["softmax", "proportional", "rank"])
def test_the_one_call_step_and_the_separate_calls_agree_bit_for_bit(transform):
    """weighted_loss on a CPU sampler makes the weights and the update in one core call; the
    same step through sampler.weights and sampler.update gives the same loss, gradient,
    scores, counters and next epoch, bit for bit."""
    outcomes = []
    for fused in (True, False):
        sampler = isample.ImportanceSampler(N, transform=transform, uniform_mix=0.1, warmup_epochs=0, seed=3)
        sampler.update(torch.arange(N), torch.linspace(0.5, 2.0, N, dtype=torch.float64))
        index = torch.tensor(list(iter(sampler))[:BATCH])
        losses = torch.rand(BATCH, generator=torch.Generator().manual_seed(1)).requires_grad_()
        if fused:
            loss = weighted_loss(sampler, index, losses)
        else:
            loss = losses @ sampler.weights(index, dtype=losses.dtype, scale=1.0 / BATCH)
            sampler.update(index, losses)
        loss.backward()
        outcomes.append((loss.detach(), losses.grad, sampler.scores(), dict(sampler.counters), torch.tensor(list(iter(sampler)))))
    for a, b in zip(*outcomes):
        assert a == b if isinstance(a, dict) else torch.equal(a, b)


def test_a_sampler_with_an_update_of_its_own_gets_it_called():
    """A subclass that overrides update is called, not skipped by the one-call step."""
    calls = []

    class Logged(isample.ImportanceSampler):
        def update(self, indices, losses, **extra):
            calls.append(len(indices))
            super().update(indices, losses, **extra)

    sampler = Logged(N, uniform_mix=0.0, warmup_epochs=0, seed=0)
    index = torch.tensor(list(iter(sampler))[:BATCH])
    weighted_loss(sampler, index, torch.rand(BATCH))
    assert calls == [BATCH] and sampler.counters["updates"] == 1


def test_an_empty_batch_weighs_to_what_torch_gives_for_nothing():
    sampler, scores, _ = drawn()
    empty = torch.zeros(0, dtype=torch.int64)
    assert math.isnan(weighted_loss(sampler, empty, torch.zeros(0)).item())  # the mean of nothing, as torch's
    assert weighted_loss(sampler, empty, torch.zeros(0), reduction="sum").item() == 0.0
    assert torch.equal(sampler.scores(), scores)


def test_weights_follow_the_losses_dtype_and_device_and_update_can_be_skipped():
    sampler, scores, index = drawn()
    half = torch.rand(BATCH).half()
    assert weighted_loss(sampler, index, half, update=False).dtype == torch.float32  # weights may exceed float16
    assert torch.equal(sampler.scores(), scores)
    assert weighted_loss(sampler, index, half.double()).dtype == torch.float64


def test_extra_tensors_reach_the_score_policy_detached():
    sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="grad_norm", seed=0)
    index = torch.tensor(list(iter(sampler))[:BATCH])
    g = torch.Generator().manual_seed(2)
    # logits and targets of each item, so that repeated draws of one item agree
    logits = torch.randn(N, 3, generator=g)[index].requires_grad_()
    targets = torch.randint(0, 3, (N,), generator=g)[index]
    losses = F.cross_entropy(logits, targets, reduction="none")
    weighted_loss(sampler, index, losses, logits=logits, targets=targets)
    p = torch.softmax(logits.detach().double(), 1)
    expected = (p - F.one_hot(targets, 3)).norm(dim=1)
    torch.testing.assert_close(sampler.scores()[index], expected)


@pytest.mark.parametrize(
    "losses, error, match",
    [
        (torch.tensor(0.7), ValueError, "reduction='none'"),
        (torch.rand(BATCH, 5), ValueError, r"losses.mean\(dim=1\)"),
        (torch.rand(BATCH + 1), ValueError, "must match"),
        ([0.1] * BATCH, TypeError, "torch tensor"),
        (torch.ones(BATCH, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_losses_that_are_not_per_example_are_refused_and_change_nothing(losses, error, match):
    sampler, scores, index = drawn()
    with pytest.raises(error, match=match):
        weighted_loss(sampler, index, losses)
    assert torch.equal(sampler.scores(), scores)


def test_indices_that_are_not_the_batch_s_are_refused_and_change_nothing():
    sampler, scores, index = drawn()
    losses = torch.rand(BATCH)
    with pytest.raises(TypeError, match="IndexedDataset"):
        weighted_loss(sampler, index.float(), losses)  # e.g. a feature column taken for indices
    with pytest.raises(TypeError, match="IndexedDataset"):
        weighted_loss(sampler, None, losses)
    with pytest.raises(ValueError, match=r"shape \(b,\)"):
        weighted_loss(sampler, index.view(4, 4), losses)
    undrawn = sorted(set(range(N)) - set(sampler._current.order.tolist()))[:1]
    with pytest.raises(ValueError, match="was not drawn"):
        weighted_loss(sampler, torch.tensor(undrawn * BATCH), losses)
    with pytest.raises(ValueError, match="reduction must be"):
        weighted_loss(sampler, index, losses, reduction="none")
    assert torch.equal(sampler.scores(), scores)


def test_split_batch_finds_the_indices_or_says_how_to_add_them():
    x, y = torch.randn(N, 3), torch.randint(0, 2, (N,))
    tuple_batch = next(iter(DataLoader(isample.IndexedDataset(TensorDataset(x, y)), batch_size=4)))
    index, (bx, by) = split_batch(tuple_batch)
    assert index.tolist() == [0, 1, 2, 3] and torch.equal(bx, x[:4]) and torch.equal(by, y[:4])
    index, rest = split_batch({"input": x[:2], "index": torch.tensor([5, 6])})
    assert index.tolist() == [5, 6] and list(rest) == ["input"]
    plain = next(iter(DataLoader(TensorDataset(x, y), batch_size=4)))
    with pytest.raises(TypeError, match="IndexedDataset"):
        split_batch(plain)
    with pytest.raises(ValueError, match="IndexedDataset"):
        split_batch({"input": x[:2]})
    with pytest.raises(TypeError, match="IndexedDataset"):
        split_batch(x[:4])
    with pytest.raises(ValueError, match="reduction='none'"):
        check_per_example_losses(torch.tensor(1.0))


def recipe() -> str:
    """The plain-loop recipe: the first python block after the '## A plain loop' heading."""
    text = DOCS.read_text()
    section = text[text.index("## A plain loop") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_plain_loop_recipe_runs_as_written_and_learns():
    code = recipe()
    assert len(code.strip().splitlines()) <= 18
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :2].sum(1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    namespace = {"train_set": TensorDataset(x, y), "model": model, "epochs": 3}
    exec(compile(code, str(DOCS), "exec"), namespace)
    sampler = namespace["sampler"]
    assert [h["kind"] for h in sampler.history][:3] == ["warmup", "importance", "importance"]
    assert sampler.counters["updates"] == 3 * 512 // 128
    accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.85


@pytest.mark.parametrize(
    "module, libraries, extra",
    [
        ("isample.integrations.lightning", ["lightning", "lightning.pytorch"], "isample[lightning]"),
        ("isample.integrations.huggingface", ["transformers", "accelerate"], "isample[hf]"),
    ],
)
def test_a_missing_framework_names_the_extra_to_install(monkeypatch, module, libraries, extra):
    import importlib
    import sys

    import isample.integrations  # the package itself imports no framework

    monkeypatch.delitem(sys.modules, module, raising=False)
    for library in libraries:
        monkeypatch.setitem(sys.modules, library, None)  # makes `import library` fail
    with pytest.raises(ImportError, match=re.escape(extra)):
        importlib.import_module(module)
    assert isample.integrations.__doc__
