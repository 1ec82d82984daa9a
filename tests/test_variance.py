"""The exact variance of an importance-sampled gradient (isample.experiments.variance).

The per-example gradients of ``gradient_stats`` (torch.func) are checked against a plain loop
of autograd calls, V(q) against a Monte Carlo estimate of the weighted one-draw estimator (with
the unweighted estimator as the negative control), and the optimal proposal against uniform
(with the inverse proposal as the negative control).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from isample.experiments.variance import (
    bound_scores, gradient_stats, largest_weight, mixed, proportional, softmax_q, stats_from_gradients, variance,
    variance_ratio,
)

N = 48


def _tiny_model() -> nn.Module:
    """A conv layer with BatchNorm (running statistics that are not the identity) and a head."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    model.train()
    with torch.no_grad():
        for _ in range(5):  # move BatchNorm's running statistics away from (0, 1)
            model(torch.randn(16, 1, 6, 6) * 2 + 1)
    return model


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, 1, 6, 6, generator=g), torch.randint(0, 4, (N,), generator=g)


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every item's gradient by one autograd call each, in eval mode: N × P (float64)."""
    model.eval()
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.train()
    return torch.stack(rows)


def test_gradient_stats_equal_a_loop_of_autograd_calls():
    model, (x, y) = _tiny_model(), _data()
    stats = gradient_stats(model, x, y, chunk=5)  # chunks that do not divide N
    assert model.training, "the model's mode is restored"
    reference = _loop_gradients(model, x, y)
    norms, mean_sq = stats_from_gradients(reference)
    torch.testing.assert_close(stats.norms, norms, rtol=1e-5, atol=1e-8)
    assert stats.mean_sq == pytest.approx(mean_sq, rel=1e-5)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(stats.losses, F.cross_entropy(logits, y, reduction="none").double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.bound, bound_scores(logits, y))
    # the bound, by hand for one row: |softmax - onehot|
    p = torch.softmax(logits[0].double(), 0)
    p[y[0]] -= 1
    assert float(stats.bound[0]) == pytest.approx(float(p.norm()))


def _monte_carlo_trace(gradients: torch.Tensor, q: torch.Tensor, draws: int) -> float:
    """The trace of the sample covariance of `draws` one-draw estimates g_I / (N q_I), I ~ q
    (computed from how often each item was drawn, which is the same sum in another order)."""
    n = gradients.shape[0]
    index = torch.multinomial(q, draws, replacement=True, generator=torch.Generator().manual_seed(11))
    counts = torch.bincount(index, minlength=n).double()
    estimates = gradients / (n * q).unsqueeze(1)  # the estimate each item gives when drawn
    mean = (counts.unsqueeze(1) * estimates).sum(0) / draws
    second = float((counts * estimates.pow(2).sum(1)).sum()) / draws
    return (second - float(mean.pow(2).sum())) * draws / (draws - 1)


def test_the_formula_matches_a_monte_carlo_estimate():
    model, (x, y) = _tiny_model(), _data()
    gradients = _loop_gradients(model, x, y)
    norms, mean_sq = stats_from_gradients(gradients)
    losses = F.cross_entropy(model.eval()(x), y, reduction="none").detach().double()
    proposals = {
        "uniform": torch.full((N,), 1.0 / N, dtype=torch.float64),
        "loss + 10% uniform": proportional(losses, mix=0.1),
        "optimal": proportional(norms),
        "softmax of 3 x loss": softmax_q(3 * losses),
        "skewed, q ∝ |g_i|^4": proportional(norms.pow(4)),
    }
    for name, q in proposals.items():
        exact = variance(norms, mean_sq, q)
        estimate = _monte_carlo_trace(gradients, q, 1_000_000)
        assert estimate == pytest.approx(exact, rel=0.02), name
    # negative control: the formula at another proposal (uniform's) misses the same Monte Carlo
    # estimate by far more than the tolerance, so the comparison can tell proposals apart
    q = proposals["skewed, q ∝ |g_i|^4"]
    estimate = _monte_carlo_trace(gradients, q, 1_000_000)
    assert abs(estimate / variance(norms, mean_sq, proposals["uniform"]) - 1) > 0.15


def test_the_weighted_estimate_is_unbiased_and_the_ratio_is_exact_for_uniform():
    model, (x, y) = _tiny_model(), _data()
    stats = gradient_stats(model, x, y)
    assert variance_ratio(stats, None) == 1.0
    uniform = torch.full((N,), 1.0 / N, dtype=torch.float64)
    assert variance_ratio(stats, uniform) == pytest.approx(1.0)
    # V(uniform) = mean |g_i|^2 - |g|^2 exactly
    assert variance(stats.norms, stats.mean_sq, uniform) == pytest.approx(float(stats.norms.pow(2).mean()) - stats.mean_sq)
    assert variance_ratio(stats, proportional(stats.norms)) < 0.99  # norms differ, so it gains


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(2, 60), elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e3))), st.floats(0.0, 1.0))
def test_the_optimal_proposal_is_never_above_uniform(norms, mean_fraction):
    norms = torch.from_numpy(norms)
    if float(norms.sum()) == 0:
        return
    n = norms.numel()
    mean_sq = (mean_fraction * float(norms.mean())) ** 2  # any |g| <= mean |g_i| (triangle inequality)
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    best = variance(norms, mean_sq, proportional(norms))
    base = variance(norms, mean_sq, uniform)
    assert best <= base + 1e-9 * max(1.0, abs(base))
    # negative control: q ∝ 1 / |g_i| (on items with g_i > 0) is never below uniform
    if bool((norms > 0).all()):
        assert variance(norms, mean_sq, proportional(1.0 / norms)) >= base - 1e-9 * max(1.0, abs(base))


def test_an_item_that_cannot_be_drawn_makes_the_estimate_biased():
    norms = torch.tensor([1.0, 2.0, 0.0])
    assert variance(norms, 0.1, torch.tensor([0.5, 0.5, 0.0])) == pytest.approx((1 / 0.5 + 4 / 0.5) / 9 - 0.1)
    assert variance(norms, 0.1, torch.tensor([1.0, 0.0, 0.0])) == math.inf


@pytest.mark.parametrize("q", [torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.6, -0.1]), torch.tensor([0.2, 0.2, 0.2]),
                               torch.tensor([0.5, float("nan"), 0.5])])
def test_bad_proposals_are_refused(q):
    with pytest.raises(ValueError):
        variance(torch.ones(3), 0.0, q)


def test_weights_and_transforms_by_hand():
    q = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    assert largest_weight(q) == pytest.approx(1 / (4 * 0.25))
    assert largest_weight(None) == 1.0
    torch.testing.assert_close(mixed(q, 0.2), q * 0.8 + 0.05)
    torch.testing.assert_close(proportional(torch.tensor([1.0, 3.0]), mix=0.5), torch.tensor([0.375, 0.625], dtype=torch.float64))
    torch.testing.assert_close(softmax_q(torch.tensor([0.0, math.log(3.0)])), torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        proportional(torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError):
        gradient_stats(_tiny_model(), torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.int64))


FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.slow  # 20 real steps with six shadow samplers and three exact passes: 10-30 s on 2 loaded cores
@pytest.mark.skipif(not __import__("os").path.exists(FASHION), reason="Fashion-MNIST is not installed")
def test_the_variance_study_end_to_end_on_a_small_trajectory(tmp_path):
    """run_trajectory on 200 images for 20 steps (checkpoints every 10), then the results
    folder: ratios where they must be (uniform-held shadows at 1, the optimal below the
    others), well-formed tables."""
    from isample.experiments.config import SCIENCE_SETTINGS, preset
    from isample.experiments.variance_report import write_variance_results
    from isample.experiments.variance_study import SHADOWS, proposal_labels, run_trajectory

    PROPOSALS = proposal_labels(10)
    config = preset("uniform", **{**SCIENCE_SETTINGS, "train_subset": 200, "test_subset": 100, "budget_steps": 20})
    result = run_trajectory(config, tmp_path / "s0" / "trajectory.json", every=10, log=lambda _: None)
    assert [r["step"] for r in result["checkpoints"]] == [0, 10, 20]
    first, last = result["checkpoints"][0], result["checkpoints"][-1]
    for label in SHADOWS:  # step 0: the loss shadows are in their uniform warm-up, the others hold equal scores
        assert first["proposals"][f"in-training shadow: {label}"]["ratio"] == pytest.approx(1.0)
    assert PROPOSALS[1] in last["proposals"] and PROPOSALS[2] not in last["proposals"]  # 10 steps back, not 40
    optimal = last["proposals"][PROPOSALS[0]]["ratio"]
    assert 0 < optimal < 1 and all(v["ratio"] >= optimal * (1 - 1e-9) for v in last["proposals"].values())
    assert last["v_uniform"] > 0 and (tmp_path / "s0" / "stats-step0020.pt").is_file()
    write_variance_results(tmp_path / "results", [result], [], command="test")
    report = (tmp_path / "results" / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    widths = {line.count(" | ") for line in table[: 1 + len(last["proposals"])]}  # the header and one row each
    assert len(widths) == 1, "a label broke the table's columns"
    assert (tmp_path / "results" / "figures" / "ratio_vs_step.png").stat().st_size > 1000
    assert "step,proposal" in (tmp_path / "results" / "checkpoints.csv").read_text().replace("kind,seed,", "")
