"""Score policies: per-example losses (and, for some, logits) in, per-item scores out.

A policy is called with the batch's losses (float64, shape (b,)), the items' previous scores
(shape (b,), or None when the policy does not need them) and whatever extra tensors the
training loop passed to ``ImportanceSampler.update``; it returns the new scores, shape (b,).
All arithmetic is batched: no Python loop over items.

=====================  ===========================================  ===========================
policy                 score                                        source
=====================  ===========================================  ===========================
``LastLoss``           S_i = L_i                                    seed paper (000), Sec. 3.1
``RunningLoss(beta)``  S_i = beta S_i + (1 - beta) L_i              seed paper (000), Sec. 3.1
``GradNormBound``      ||softmax(z_i) - onehot(y_i)||_2             Katharopoulos & Fleuret 2018
``ReducibleLoss(irr)`` S_i = L_i - irr_i                            Mindermann et al. 2022 (RHO-LOSS)
``EarlyImportance(E)`` mean of 1 - p(true class) over the first E   the third seed (002):
                       times the item is seen, then frozen          "Sample importance in SGD"
=====================  ===========================================  ===========================
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import _backend

__all__ = [
    "ScorePolicy",
    "LastLoss",
    "RunningLoss",
    "GradNormBound",
    "ReducibleLoss",
    "EarlyImportance",
    "get_score_policy",
]


class ScorePolicy:
    """Base class. Subclasses set ``needs_previous`` and implement ``__call__``."""

    #: whether __call__ uses the items' previous scores (the sampler fetches them only then)
    needs_previous: bool = False
    #: for policies of the form S = keep * S + (1 - keep) * L: keep, so the sampler can apply
    #: the whole policy in one call of the compiled core; None for any other policy
    keep: Optional[float] = None
    name: str = "policy"

    def __call__(
        self, losses: torch.Tensor, previous: Optional[torch.Tensor], indices: torch.Tensor, **extra: Any
    ) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """The policy's settings, saved with the sampler's state and checked on load."""
        return {"name": self.name}

    def check_items(self, num_items: int) -> None:
        """Raise ValueError when this policy is sized for another number of items than the
        sampler's `num_items` (policies that hold a value per item); called at construction."""

    def commit(self, indices: torch.Tensor) -> None:
        """Called after the scores returned for `indices` were written (a rejected batch is
        never committed): where a policy with state advances it."""

    def state_dict(self) -> Dict[str, Any]:
        """State the policy keeps between calls (most keep none); saved with the sampler."""
        return {}

    def check_state_dict(self, state: Any) -> None:
        """Raise what ``load_state_dict(state)`` would raise, changing nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"the policy's state must be a dict, got {type(state).__name__}")
        if state:
            raise ValueError(f"{self!r} keeps no state, but the saved state has {sorted(map(str, state))}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict``; a state that does not fit raises and changes nothing."""
        self.check_state_dict(state)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


class LastLoss(ScorePolicy):
    """S_i = L_i: the item's latest loss. Free: it is what the forward pass computed anyway."""

    name = "last_loss"
    keep = 0.0

    def __call__(self, losses, previous, indices, **extra):
        return losses


class RunningLoss(ScorePolicy):
    """S_i = beta * S_i + (1 - beta) * L_i: an exponential moving average of the loss.

    Smoother than the last loss (the seed paper's "running loss score", beta = 0.2 in its
    Appendix A). Items start from the sampler's ``initial_score``.
    """

    name = "running_loss"
    needs_previous = True

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = self.keep = _backend.check_real(beta, "beta", low=0.0, high=1.0)

    def __call__(self, losses, previous, indices, **extra):
        return previous * self.beta + losses * (1.0 - self.beta)

    def config(self):
        return {"name": self.name, "beta": self.beta}


class GradNormBound(ScorePolicy):
    """||softmax(z_i) - onehot(y_i)||_2: an upper bound (up to a per-batch constant) of the
    norm of the loss gradient for cross-entropy, from the logits the forward pass already
    computed (Katharopoulos & Fleuret, "Not All Samples Are Created Equal", ICML 2018).

    Pass ``logits`` (b, C) and ``targets`` (b,) to ``ImportanceSampler.update``. More
    faithful to the gradient than the loss itself, and as cheap.
    """

    name = "grad_norm"

    def __call__(self, losses, previous, indices, *, logits: Optional[torch.Tensor] = None,
                 targets: Optional[torch.Tensor] = None, **extra):
        with torch.no_grad():
            p, targets, invalid = _probabilities_and_targets(self, losses, logits, targets)
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, targets] -= 1.0
            norm = torch.linalg.vector_norm(p, dim=1)
            if invalid is not None:
                norm = torch.where(invalid, torch.full_like(norm, math.nan), norm)
            return norm.to(losses.device)


def _probabilities_and_targets(
    policy: ScorePolicy, losses: torch.Tensor, logits: Any, targets: Any
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """softmax(logits) in float64 (b, C), the targets as int64 (b,) on the same device, and on
    a GPU a mask of out-of-range targets (or None).

    Checked: logits (b, C) of real numbers, targets (b,) of integers in [0, C): a target out of
    range raises IndexError on the CPU (-1 must not wrap around to the last class). On a GPU
    that check would synchronise, so such rows are computed with target 0 and flagged: the
    policy scores them NaN, which the sampler treats as any non-finite score.
    """
    name = type(policy).__name__
    if logits is None or targets is None:
        raise TypeError(f"{name} needs update(indices, losses, logits=..., targets=...)")
    logits = _backend._as_tensor(logits, "logits")
    targets = _backend._as_tensor(targets, "targets")
    if logits.is_complex() or logits.dtype is torch.bool:
        raise TypeError(f"logits must be real numbers, got dtype {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype is torch.bool:
        raise TypeError(f"targets must be class indices (integers), got dtype {targets.dtype}")
    b = losses.shape[0]
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"logits must be (b, C) and targets (b,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[0] != b:
        raise ValueError(f"logits hold {logits.shape[0]} rows but there are {b} losses")
    classes = logits.shape[1]
    targets = targets.detach().to(device=logits.device, dtype=torch.int64)
    invalid: Optional[torch.Tensor] = None
    outside = (targets < 0) | (targets >= classes)
    if logits.device.type == "cuda":
        invalid = outside
        targets = torch.where(outside, torch.zeros_like(targets), targets)
    elif b and bool(outside.any()):
        raise IndexError(f"targets {targets[outside][:5].tolist()} are outside [0, {classes}): one class index per row")
    if classes == 0 and b:
        raise ValueError("logits must have at least one class (column)")
    p = torch.softmax(logits.detach().to(torch.float64), dim=1)
    return p, targets, invalid


class ReducibleLoss(ScorePolicy):
    """S_i = L_i - L_irreducible_i: the part of the loss that training can still remove.

    ``irreducible`` (N,) holds each item's loss under a small model trained on held-out data
    (Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning,
    and Not Yet Learnt", ICML 2022). Scores may be negative; with a softmax transform that is
    fine, a proportional transform clips them at zero.
    """

    name = "reducible_loss"

    def __init__(self, irreducible: Any) -> None:
        irreducible = _backend._as_tensor(irreducible, "irreducible")
        if irreducible.is_complex() or irreducible.dtype is torch.bool:
            raise TypeError(f"irreducible must hold real numbers, got dtype {irreducible.dtype}")
        irreducible = irreducible.detach().to(torch.float64).clone()
        if irreducible.dim() != 1:
            raise ValueError(f"irreducible must be 1-D (one loss per item), got shape {tuple(irreducible.shape)}")
        if not bool(torch.isfinite(irreducible).all()):
            raise ValueError("irreducible losses must be finite")
        self.irreducible = irreducible

    def __call__(self, losses, previous, indices, **extra):
        irreducible = self.irreducible
        if irreducible.device != losses.device:
            irreducible = self.irreducible = irreducible.to(losses.device)
        return losses - irreducible[indices]

    def check_items(self, num_items):
        items = int(self.irreducible.shape[0])
        if items != num_items:
            raise ValueError(
                f"ReducibleLoss holds {items:,} irreducible losses but the sampler has {num_items:,} items: "
                "pass one irreducible loss per item"
            )

    def config(self):
        return {"name": self.name, "items": int(self.irreducible.shape[0])}


class EarlyImportance(ScorePolicy):
    """Importance estimated once, early in training, from the prediction probabilities the
    forward pass already computes (the third seed, 002: "Sample importance in SGD training"):
    each item's score is the mean of 1 - p(true class) over the first `observations` times it
    is trained on, then stays fixed. With uniform warm-up epochs each item is seen once per
    epoch, so `observations` = E means "over the first E epochs": no extra passes, no restart.

    Pass ``logits`` (b, C) and ``targets`` (b,) to ``ImportanceSampler.update``. Sample in
    proportion to the score, with a uniform mixture to bound the weights, e.g.
    ``ImportanceSampler(n, score=EarlyImportance(n, 2), transform="proportional",
    warmup_epochs=2, uniform_mix=0.1)``. Keeps a count per item (4 bytes each).
    """

    name = "early_importance"
    needs_previous = True

    def __init__(self, num_items: int, observations: int = 2) -> None:
        observations = _backend.check_count(observations, "observations", limit=2**31 - 1)
        if observations < 1:
            raise ValueError(f"observations must be an int >= 1, got {observations!r}")
        num_items = _backend.check_count(num_items, "num_items")
        if num_items < 1:
            raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
        _backend.check_fits(f"EarlyImportance({num_items:,})", {"counts": 4 * num_items}, _backend.CPU)
        self.observations = observations
        try:
            self.counts = torch.zeros(num_items, dtype=torch.int32)
        except RuntimeError as error:  # torch's allocation failure: say what it was for
            raise MemoryError(f"EarlyImportance needs {4 * num_items:,} bytes for its counts: {error}") from None

    def __call__(self, losses, previous, indices, *, logits: Optional[torch.Tensor] = None,
                 targets: Optional[torch.Tensor] = None, **extra):
        with torch.no_grad():
            p, targets, invalid = _probabilities_and_targets(self, losses, logits, targets)
            hardness = 1.0 - p.gather(1, targets.view(-1, 1)).squeeze(1)
            if invalid is not None:
                hardness = torch.where(invalid, torch.full_like(hardness, math.nan), hardness)
        hardness = hardness.to(losses.device)
        counts = self.counts.to(indices.device)[indices].to(torch.float64)
        # a running mean over the first `observations` sightings; later ones change nothing
        averaged = previous + (hardness - previous) / (counts + 1.0)
        # the counts advance in commit(), once the sampler has written these scores
        return torch.where(counts < self.observations, averaged, previous)

    def check_items(self, num_items: int) -> None:
        """Raise ValueError when this policy is sized for another number of items than the
        sampler's `num_items` (policies that hold a value per item); called at construction."""

    def commit(self, indices: torch.Tensor) -> None:
        counts = self.counts
        idx = indices.to(counts.device)
        counts.index_put_((idx,), torch.ones_like(idx, dtype=counts.dtype), accumulate=True)
        counts.clamp_(max=self.observations)

    def check_items(self, num_items):
        items = int(self.counts.numel())
        if items != num_items:
            raise ValueError(
                f"EarlyImportance({items:,}) is sized for {items:,} items but the sampler has {num_items:,}: "
                f"pass EarlyImportance({num_items})"
            )

    def config(self):
        return {"name": self.name, "observations": self.observations, "items": int(self.counts.numel())}

    def state_dict(self):
        return {"counts": self.counts.clone()}

    def check_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"counts"}:
            raise ValueError("the saved EarlyImportance state must be a dict with one key, 'counts'")
        counts = state["counts"]
        if not isinstance(counts, torch.Tensor) or counts.shape != self.counts.shape:
            raise ValueError("the saved EarlyImportance counts do not match this policy")
        if counts.is_floating_point() or counts.is_complex() or counts.dtype is torch.bool:
            raise TypeError(f"the saved EarlyImportance counts must be integers, got dtype {counts.dtype}")
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > self.observations):
            raise ValueError(f"the saved EarlyImportance counts must lie in [0, {self.observations}]")

    def load_state_dict(self, state):
        self.check_state_dict(state)
        self.counts = state["counts"].to(device=self.counts.device, dtype=torch.int32).clone()


_POLICIES = {"last_loss": LastLoss, "running_loss": RunningLoss, "grad_norm": GradNormBound}


def get_score_policy(policy: Union[str, ScorePolicy], **kwargs: Any) -> ScorePolicy:
    """A policy object from a name (``"last_loss"``, ``"running_loss"``, ``"grad_norm"``) or as is."""
    if isinstance(policy, ScorePolicy):
        return policy
    if isinstance(policy, str) and policy in _POLICIES:
        return _POLICIES[policy](**kwargs)
    if isinstance(policy, str) and policy == "reducible_loss":
        raise ValueError("reducible_loss needs the irreducible losses: pass ReducibleLoss(irreducible)")
    raise ValueError(f"unknown score policy {policy!r}; choose one of {sorted(_POLICIES)} or pass a ScorePolicy")
