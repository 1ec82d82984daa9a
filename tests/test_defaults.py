"""The sampler's defaults (issue 24) and the seed paper's method under its own name.

- ``ImportanceSampler()``'s defaults are the study's preset "default" (so the library and the
  accuracy study that backs it cannot drift apart), and they give the documented proposal:
  q_i = 0.8 (L_i + 1e-6) / sum_j (L_j + 1e-6) + 0.2 / N after one uniform warm-up epoch,
  weights 1 / (N q_i), drawn with replacement.
- ``ImportanceSampler.paper`` is Algorithm 1 with Appendix A's settings: the same sampler as
  its explicit construction, and the same one the paper-study runner builds.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import isample
from isample.distributed import DistributedImportanceSampler
from isample.experiments.config import PRESETS, preset
from isample.experiments.train import make_sampler

CPU = torch.device("cpu")
LAM, EPS = 0.2, 1e-6

#: each key of PRESETS["default"] -> (the ImportanceSampler argument, its value as the sampler takes it)
PRESET_TO_SAMPLER = {
    "method": lambda v: ("score", v),  # the loss methods' names are the score policies' names
    "transform": lambda v: ("transform", v),
    "replacement": lambda v: ("replacement", v),
    "uniform_mix": lambda v: ("uniform_mix", v),
    "weighting": lambda v: ("weighting", v),
    "warmup_epochs": lambda v: ("warmup_epochs", v),
    "samples_fraction": lambda v: ("samples_per_epoch", None if v == 1.0 else v),  # None: N
    "initial_score": lambda v: ("initial_score", v),
}


def _defaults(cls) -> dict:
    return {
        name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _run(sampler, epochs: int, seed: int = 0) -> list:
    """Iterate `epochs` epochs, handing back random losses for every drawn item (the same
    losses for the same draws); the items and weights of each epoch."""
    g = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        items = torch.tensor(list(sampler), dtype=torch.int64)
        log.append((items, sampler.weights(items)))
        for batch in items.split(64):
            sampler.update(batch, torch.rand(len(batch), generator=g, dtype=torch.float64) * 3.0)
    return log


def _same_log(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (items_a, w_a), (items_b, w_b) in zip(a, b):
        assert torch.equal(items_a, items_b)
        assert torch.equal(w_a, w_b)  # bit for bit


# -- the defaults are the study's preset ---------------------------------------------------------


def test_signature_defaults_are_the_default_preset():
    defaults = _defaults(isample.ImportanceSampler)
    recipe = PRESETS["default"]
    assert set(recipe) == set(PRESET_TO_SAMPLER), "a key of PRESETS['default'] has no sampler argument here"
    for key, value in recipe.items():
        argument, expected = PRESET_TO_SAMPLER[key](value)
        assert defaults[argument] == expected, f"ImportanceSampler's {argument}={defaults[argument]!r}, preset {key}={value!r}"
    # the whole configuration, transform parameters included (the runner builds Proportional(1.0, 1e-6))
    runner = make_sampler(preset("default", seed=5), 300, CPU)
    assert runner._config() == isample.ImportanceSampler(300, seed=5)._config()


def test_distributed_and_trainer_defaults_are_the_samplers():
    ours, theirs = _defaults(isample.ImportanceSampler), _defaults(DistributedImportanceSampler)
    shared = set(ours) & set(theirs)
    assert {"score", "transform", "replacement", "warmup_epochs", "weighting", "uniform_mix", "initial_score"} <= shared
    assert {k: theirs[k] for k in shared} == {k: ours[k] for k in shared}
    single = DistributedImportanceSampler(40, seed=2)  # no process group: one process
    _same_log(_run(single, 3), _run(isample.ImportanceSampler(40, seed=2), 3))


# -- what the defaults draw ------------------------------------------------------------------------


def test_warmup_epoch_is_a_permutation_of_all_items_with_weight_one():
    n = 1000
    s = isample.ImportanceSampler(n, seed=4)
    items = torch.tensor(list(s))
    assert torch.equal(items.sort().values, torch.arange(n))
    assert s.history[-1]["kind"] == "warmup"
    assert torch.equal(s.weights(items), torch.ones(n, dtype=torch.float64))


def _scored(n: int, losses: torch.Tensor, **options) -> isample.ImportanceSampler:
    """A default sampler after its warm-up epoch, every item given its loss."""
    s = isample.ImportanceSampler(n, **options)
    list(s)
    s.update(torch.arange(n), losses)
    return s


def test_default_proposal_after_warmup_is_exact():
    n = 6
    losses = torch.tensor([0.0, 0.05, 0.3, 1.0, 2.5, 7.0], dtype=torch.float64)
    q = (1 - LAM) * (losses + EPS) / (losses + EPS).sum() + LAM / n  # the documented proposal
    s = _scored(n, losses, samples_per_epoch=200_000, seed=11)
    torch.testing.assert_close(s.probabilities(), q, rtol=1e-12, atol=0.0)

    s.set_epoch(1)
    items = torch.tensor(list(s))
    assert s.history[-1]["kind"] == "importance"
    torch.testing.assert_close(s.weights(items), 1.0 / (n * q[items]), rtol=1e-12, atol=0.0)
    assert float(s.weights(items).max()) <= 1.0 / LAM  # every weight <= 5

    # the draws follow q (with replacement: i.i.d.), within 5 standard errors for every item
    m = items.numel()
    freq = torch.bincount(items, minlength=n).double() / m
    se = (q * (1 - q) / m).sqrt()
    assert bool(((freq - q).abs() < 5 * se).all()), (freq, q)

    # negative control: the seed paper's softmax of the same losses is another proposal,
    # which these draws reject
    softmax = torch.softmax(losses, 0)
    paper = isample.ImportanceSampler.paper(n, warmup_epochs=0, samples_per_epoch=n)
    paper.update(torch.arange(n), losses)
    torch.testing.assert_close(paper.probabilities(), softmax, rtol=1e-12, atol=0.0)
    assert float((softmax - q).abs().max()) > 0.1
    assert bool(((freq - softmax).abs() > 5 * se).any())


def test_default_weights_stay_bounded_by_the_mixture():
    """One item with a huge loss: under the paper's softmax every other item's weight would be
    astronomical; the mixture keeps them at most 1 / 0.2."""
    n = 50
    losses = torch.full((n,), 0.1, dtype=torch.float64)
    losses[7] = 60.0
    s = _scored(n, losses, seed=1)
    s.set_epoch(1)
    items = torch.tensor(list(s))
    weights = s.weights(items)
    assert float(weights.max()) <= 5.0
    assert math.isclose(float(weights.max()), 1.0 / (n * ((1 - LAM) * (0.1 + EPS) / (60.0 + 49 * 0.1 + n * EPS) + LAM / n)), rel_tol=1e-9)


# -- the seed paper's method -----------------------------------------------------------------------


@pytest.mark.parametrize("score", ["last_loss", "running_loss"])
def test_paper_is_the_explicit_construction(score):
    n = 500
    fraction, warmup = (8192 / 50000, 5) if score == "last_loss" else (30000 / 50000, 0)
    explicit = isample.ImportanceSampler(
        n,
        score=isample.LastLoss() if score == "last_loss" else isample.RunningLoss(0.2),
        transform=isample.Softmax(1.0),
        samples_per_epoch=round(fraction * n),
        replacement=False,
        warmup_epochs=warmup,
        weighting="inverse_probability",
        uniform_mix=0.0,
        initial_score=0.0,
        seed=3,
    )
    paper = isample.ImportanceSampler.paper(n, score=score, seed=3)
    assert paper._config() == explicit._config()
    log = _run(paper, warmup + 3)
    _same_log(log, _run(explicit, warmup + 3))
    assert [len(items) for items, _ in log[warmup:]] == [round(fraction * n)] * 3
    assert all(len(set(items.tolist())) == len(items) for items, _ in log)  # without replacement
    # 1 / (N p) with the softmax p of the draw (Algorithm 1, line 16), not inclusion weights
    items, weights = log[-1]
    assert float(weights.max() - weights.min()) > 0.01


def test_distributed_paper_is_the_paper():
    single = DistributedImportanceSampler.paper(300, score="running_loss", seed=8)  # no process group
    _same_log(_run(single, 3), _run(isample.ImportanceSampler.paper(300, score="running_loss", seed=8), 3))


@pytest.mark.parametrize("name", ["last_loss", "running_loss"])
def test_paper_runner_builds_the_paper(name):
    """The paper-study runner's sampler for the preset is ImportanceSampler.paper: the same
    configuration and the same draws and weights, so the reproduction is unchanged."""
    n, seed = 700, 2
    runner = make_sampler(preset(name, seed=seed), n, CPU)
    paper = isample.ImportanceSampler.paper(n, score=name, seed=seed)
    assert runner._config() == paper._config()
    epochs = PRESETS[name]["warmup_epochs"] + 3
    _same_log(_run(runner, epochs), _run(paper, epochs))
    # negative control: the comparison tells another seed's draws apart
    with pytest.raises(AssertionError):
        _same_log(_run(make_sampler(preset(name, seed=seed + 1), n, CPU), epochs), _run(isample.ImportanceSampler.paper(n, score=name, seed=seed), epochs))


def test_paper_arguments_are_checked():
    with pytest.raises(ValueError, match="seed paper's scores"):
        isample.ImportanceSampler.paper(10, score="grad_norm")
    with pytest.raises(ValueError, match="beta"):
        isample.ImportanceSampler.paper(10, beta=0.5)
    assert isample.ImportanceSampler.paper(10, score="running_loss", beta=0.5).score_policy.beta == 0.5
    with pytest.raises(ValueError, match="samples_per_epoch"):
        isample.ImportanceSampler.paper(10, samples_per_epoch=11)  # without replacement
    assert isample.ImportanceSampler.paper(10, samples_per_epoch=11, replacement=True).samples_per_epoch == 11
