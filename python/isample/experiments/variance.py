"""The exact variance of an importance-sampled gradient (DESIGN.md, "Round 2 contracts").

With per-example gradients g_i (i = 1..N), their mean g and a proposal q, one draw I ~ q
weighted by 1 / (N q_I) gives the estimate g_I / (N q_I), whose mean is g and whose trace of
covariance is

    V(q) = sum_i |g_i|^2 / (N^2 q_i) - |g|^2;

a batch of b draws with replacement divides it by b. V is smallest at q ∝ |g_i| (Cauchy-Schwarz:
V(q*) = (mean_i |g_i|)^2 - |g|^2 <= mean_i |g_i|^2 - |g|^2 = V(uniform)). It needs only the norms
|g_i| and |g|, so ``gradient_stats`` computes every item's exact per-example gradient with
``torch.func`` (``functional_call``, ``vmap`` over ``grad``) a chunk at a time and keeps only
the norms, the running sum of the gradients, and the losses and logits it gets for free.

The per-example gradients are taken in eval mode: BatchNorm uses its running statistics, so
g_i depends on item i alone and the mean of the g_i is the gradient of the mean loss. (In train
mode a batch's normalisation couples its items, and "the gradient of item i" is not defined
apart from its batch.) Weight decay adds the same vector to every estimate and no variance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["GradientStats", "gradient_stats", "variance", "variance_ratio", "largest_weight", "proportional",
           "softmax_q", "mixed", "bound_scores"]


@dataclasses.dataclass
class GradientStats:
    """What the variance of any proposal needs, at one set of parameters.

    norms: |g_i|, float64 (N,). mean_sq: |g|^2 with g the mean gradient. losses: the
    per-example losses (float64, N), and bound: |softmax(z_i) - onehot(y_i)| (float64, N), the
    gradient-norm bound of the logits, both from the same eval-mode forward pass.
    """

    norms: torch.Tensor
    mean_sq: float
    losses: torch.Tensor
    bound: torch.Tensor

    @property
    def num_items(self) -> int:
        return int(self.norms.numel())


def bound_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|softmax(z_i) - onehot(y_i)|_2 in float64, per row (isample.GradNormBound's score)."""
    p = torch.softmax(logits.double(), dim=1)
    p[torch.arange(len(targets)), targets] -= 1.0
    return p.norm(dim=1)


def gradient_stats(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, chunk: int = 128,
                   prepare=None) -> GradientStats:
    """Every item's exact per-example gradient norm, the mean gradient's squared norm, and the
    losses and gradient-norm bounds, for the cross-entropy of `model` (in eval mode).

    images, labels: the whole set, N items (any dtype `prepare` turns into the model's input).
    chunk: items differentiated at once (memory: chunk × the parameters, in float32).
    prepare: maps a slice of `images` to the model's input (default: as it is), e.g. uint8
        images to normalised floats.
    """
    from torch.func import functional_call, grad, vmap

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"images and labels must hold the same positive number of items, got {len(images)} and {len(labels)}")
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def item_loss(trainable, x, y):
        logits = functional_call(model, ({**trainable, **frozen}, buffers), (x.unsqueeze(0),))
        loss = F.cross_entropy(logits, y.unsqueeze(0))
        return loss, (loss.detach(), logits.squeeze(0).detach())

    per_item = vmap(grad(item_loss, has_aux=True), in_dims=(None, 0, 0))
    n = len(labels)
    norms = torch.empty(n, dtype=torch.float64)
    losses = torch.empty(n, dtype=torch.float64)
    bound = torch.empty(n, dtype=torch.float64)
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
    try:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            x = images[start:stop] if prepare is None else prepare(images[start:stop])
            y = labels[start:stop]
            grads, (loss, logits) = per_item(params, x, y)
            squared = torch.zeros(stop - start, dtype=torch.float64)
            for name, g in grads.items():
                # reduced in float32 (pairwise sums), accumulated in float64: converting the
                # chunk × parameters gradients to float64 first would cost several times more
                squared += g.pow(2).flatten(1).sum(1).double()
                total[name] += g.sum(0).double()
            norms[start:stop] = squared.sqrt()
            losses[start:stop] = loss.double()
            bound[start:stop] = bound_scores(logits, y)
    finally:
        model.train(was_training)
    mean_sq = float(sum((t / n).pow(2).sum() for t in total.values()))
    return GradientStats(norms=norms, mean_sq=mean_sq, losses=losses, bound=bound)


def _check_q(q: torch.Tensor, n: int) -> torch.Tensor:
    q = torch.as_tensor(q, dtype=torch.float64)
    if q.shape != (n,):
        raise ValueError(f"q must have one probability per item, shape ({n},), got {tuple(q.shape)}")
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("q must be finite and non-negative")
    total = float(q.sum())
    if not math.isclose(total, 1.0, rel_tol=1e-6):
        raise ValueError(f"q must sum to 1, got {total}")
    return q


def variance(norms: torch.Tensor, mean_sq: float, q: torch.Tensor) -> float:
    """V(q) = sum_i |g_i|^2 / (N^2 q_i) - |g|^2: the trace of the covariance of one weighted draw.

    An item with q_i = 0 and g_i != 0 makes the estimate biased: V is then inf. (Items with
    g_i = 0 and q_i = 0 add nothing.)"""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    n = norms.numel()
    q = _check_q(q, n)
    squared = norms.pow(2)
    if bool(((q == 0) & (squared > 0)).any()):
        return math.inf
    terms = torch.where(q > 0, squared / (n * n * q.clamp_min(1e-300)), torch.zeros_like(squared))
    return float(terms.sum()) - float(mean_sq)


def variance_ratio(stats: GradientStats, q: Optional[torch.Tensor]) -> float:
    """V(q) / V(uniform) at the parameters of `stats` (q None: uniform, 1)."""
    n = stats.num_items
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    base = variance(stats.norms, stats.mean_sq, uniform)
    if q is None:
        return 1.0
    return variance(stats.norms, stats.mean_sq, q) / base


def largest_weight(q: Optional[torch.Tensor], n: Optional[int] = None) -> float:
    """max_i 1 / (N q_i) over the items q can draw (1 for uniform, None)."""
    if q is None:
        return 1.0
    q = torch.as_tensor(q, dtype=torch.float64)
    positive = q[q > 0]
    return float(1.0 / (q.numel() * positive.min())) if positive.numel() else math.inf


def mixed(q: torch.Tensor, mix: float) -> torch.Tensor:
    """(1 - mix) q + mix / N."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    return q * (1.0 - mix) + mix / q.numel()


def proportional(scores: torch.Tensor, *, eps: float = 0.0, mix: float = 0.0) -> torch.Tensor:
    """q ∝ scores + eps, mixed with uniform: the variance-optimal family (eps as isample.Proportional's)."""
    s = torch.as_tensor(scores, dtype=torch.float64) + eps
    if bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ValueError("proportional needs non-negative scores with a positive sum")
    return mixed(s / s.sum(), mix)


def softmax_q(scores: torch.Tensor, *, temperature: float = 1.0, mix: float = 0.0) -> torch.Tensor:
    """q = softmax(scores / T), mixed with uniform: the seed paper's transform."""
    return mixed(torch.softmax(torch.as_tensor(scores, dtype=torch.float64) / temperature, dim=0), mix)


def stats_from_gradients(gradients: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(norms, |mean|^2) of an N×P matrix of per-example gradients (for tests on tiny models)."""
    g = torch.as_tensor(gradients, dtype=torch.float64)
    return g.norm(dim=1), float(g.mean(0).pow(2).sum())
