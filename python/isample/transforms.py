"""Transforms: scores in, sampling probabilities out.

``Softmax`` and ``Proportional`` are maintained incrementally in a tree (each score update
costs O(log n)); ``RankBased`` needs every score's rank, so the sampler recomputes it once
per epoch, when it draws (which is when Algorithm 1 of the seed paper computes p anyway).

================================  ===============================  ==========================
transform                         p_i proportional to              source
================================  ===============================  ==========================
``Softmax(temperature)``          exp(s_i / T)                     seed paper (000), Sec. 3.2
``Proportional(alpha, eps)``      (max(s_i, 0) + eps) ** alpha     Schaul et al. 2016 (PER)
``RankBased(alpha)``              rank(s_i) ** -alpha              Schaul et al. 2016 (PER)
================================  ===============================  ==========================

The sampler adds, on top of any transform, a uniform mixture ``(1 - lam) p + lam / N``
(``uniform_mix``) that bounds importance weights by ``1 / lam``.
"""

from __future__ import annotations

from typing import Any, Dict, Union

import torch

from . import _backend, _core
from .tree import SoftmaxTree, SumTree

__all__ = ["Transform", "Softmax", "Proportional", "RankBased", "get_transform"]


class Transform:
    """Base class: how scores become probabilities, and which tree holds them."""

    name: str = "transform"
    #: p needs every score at once: rebuilt from all scores when an epoch is drawn
    epoch_level: bool = False
    #: the tree stores the scores themselves (SoftmaxTree); otherwise it stores leaf_values
    tree_holds_scores: bool = False
    #: set at the end of __init__ by Softmax and Proportional themselves (not subclasses, which
    #: the core does not compute for): a sampler's tree (and its compiled step) holds leaves
    #: computed with their parameters, so a change would leave the two disagreeing
    _fixed: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._fixed:
            raise AttributeError(
                f"{type(self).__name__}'s parameters are fixed once it is made (a sampler's tree holds what it "
                f"computed with them): make a new {type(self).__name__}(...) and a new sampler instead"
            )
        object.__setattr__(self, name, value)

    def make_tree(self, num_items: int, *, device: Any, seed: int) -> Union[SumTree, SoftmaxTree]:
        return SumTree(num_items, device=device, seed=seed)

    def leaf_values(self, scores: torch.Tensor) -> torch.Tensor:
        """Tree weights for these scores (SumTree-backed transforms)."""
        raise NotImplementedError

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """p for a full score vector (N,): the reference the tree must agree with."""
        weights = self.leaf_values(scores)
        return weights / weights.sum()

    def config(self) -> Dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


class Softmax(Transform):
    """p = softmax(s / T), exact for any finite scores (SoftmaxTree). Higher T is flatter."""

    name = "softmax"
    tree_holds_scores = True

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _backend.check_real(temperature, "temperature", low=0.0, low_open=True)
        self._fixed = type(self) is Softmax

    def make_tree(self, num_items, *, device, seed):
        return SoftmaxTree(num_items, temperature=self.temperature, device=device, seed=seed)

    def leaf_values(self, scores):
        return scores

    def probabilities(self, scores):
        return torch.softmax(scores.to(torch.float64) / self.temperature, dim=0)

    def config(self):
        return {"name": self.name, "temperature": self.temperature}


class Proportional(Transform):
    """p ∝ (max(s, 0) + eps) ** alpha: alpha = 1 samples in proportion to the score (for
    losses or gradient norms), alpha = 0 is uniform; eps keeps zero-score items drawable."""

    name = "proportional"

    def __init__(self, alpha: float = 1.0, eps: float = 1e-6) -> None:
        self.alpha = _backend.check_real(alpha, "alpha", low=0.0)
        self.eps = _backend.check_real(eps, "eps", low=0.0)
        self._fixed = type(self) is Proportional

    def leaf_values(self, scores):
        if scores.device.type == "cpu" and scores.dtype is torch.float64:
            # the core's arithmetic, which the sampler's per-step updates use too (its pow may
            # differ from torch's vectorised one in the last bit)
            scores = scores.resolve_neg().contiguous()
            leaves = torch.empty_like(scores)
            _core.proportional_leaves(scores.data_ptr(), scores.numel(), self.alpha, self.eps, leaves.data_ptr())
            return leaves
        base = scores.clamp(min=0.0).add_(self.eps)  # clamp made a new tensor: add in place
        return base if self.alpha == 1.0 else base.pow_(self.alpha)

    def config(self):
        return {"name": self.name, "alpha": self.alpha, "eps": self.eps}


class RankBased(Transform):
    """p ∝ 1 / rank ** alpha, rank 1 being the highest score: insensitive to the scale and
    outliers of the scores. Recomputed once per epoch, O(n log n)."""

    name = "rank"
    epoch_level = True

    def __init__(self, alpha: float = 0.7) -> None:
        self.alpha = _backend.check_real(alpha, "alpha", low=0.0)

    def leaf_values(self, scores):
        order = torch.argsort(scores, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, scores.shape[0] + 1, device=scores.device)
        return ranks.to(torch.float64).pow(-self.alpha)

    def config(self):
        return {"name": self.name, "alpha": self.alpha}


_TRANSFORMS = {"softmax": Softmax, "proportional": Proportional, "rank": RankBased}


def get_transform(transform: Union[str, Transform, None], **kwargs: Any) -> Transform:
    """A transform from a name (``"softmax"``, ``"proportional"``, ``"rank"``) or as is."""
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, str) and transform in _TRANSFORMS:
        return _TRANSFORMS[transform](**kwargs)
    raise ValueError(f"unknown transform {transform!r}; choose one of {sorted(_TRANSFORMS)} or pass a Transform")
