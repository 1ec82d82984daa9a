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

from typing import Any, Dict, Optional, Union

import torch

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

    def commit(self, indices: torch.Tensor) -> None:
        """Called after the scores returned for `indices` were written (a rejected batch is
        never committed): where a policy with state advances it."""

    def state_dict(self) -> Dict[str, Any]:
        """State the policy keeps between calls (most keep none); saved with the sampler."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self!r} keeps no state, but the saved state has {sorted(state)}")

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
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = self.keep = float(beta)

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
        if logits is None or targets is None:
            raise TypeError("GradNormBound needs update(indices, losses, logits=..., targets=...)")
        if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"logits must be (b, C) and targets (b,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if logits.shape[0] != losses.shape[0]:
            raise ValueError(f"logits hold {logits.shape[0]} rows but there are {losses.shape[0]} losses")
        with torch.no_grad():
            p = torch.softmax(logits.detach().to(torch.float64), dim=1)
            p[torch.arange(p.shape[0], device=p.device), targets.to(p.device)] -= 1.0
            return torch.linalg.vector_norm(p, dim=1).to(losses.device)


class ReducibleLoss(ScorePolicy):
    """S_i = L_i - L_irreducible_i: the part of the loss that training can still remove.

    ``irreducible`` (N,) holds each item's loss under a small model trained on held-out data
    (Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning,
    and Not Yet Learnt", ICML 2022). Scores may be negative; with a softmax transform that is
    fine, a proportional transform clips them at zero.
    """

    name = "reducible_loss"

    def __init__(self, irreducible: Any) -> None:
        irreducible = torch.as_tensor(irreducible, dtype=torch.float64)
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
        if not (isinstance(observations, int) and observations >= 1):
            raise ValueError(f"observations must be an int >= 1, got {observations!r}")
        if not (isinstance(num_items, int) and num_items >= 1):
            raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
        self.observations = observations
        try:
            self.counts = torch.zeros(num_items, dtype=torch.int32)
        except RuntimeError as error:  # torch's allocation failure: say what it was for
            raise MemoryError(f"EarlyImportance needs {4 * num_items:,} bytes for its counts: {error}") from None

    def __call__(self, losses, previous, indices, *, logits: Optional[torch.Tensor] = None,
                 targets: Optional[torch.Tensor] = None, **extra):
        if logits is None or targets is None:
            raise TypeError("EarlyImportance needs update(indices, losses, logits=..., targets=...)")
        if logits.dim() != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] != losses.shape[0]:
            raise ValueError(f"logits must be (b, C) and targets (b,) for {losses.shape[0]} losses")
        with torch.no_grad():
            p = torch.softmax(logits.detach().to(torch.float64), dim=1)
            hardness = 1.0 - p.gather(1, targets.to(p.device).view(-1, 1)).squeeze(1)
        hardness = hardness.to(losses.device)
        counts = self.counts.to(indices.device)[indices].to(torch.float64)
        # a running mean over the first `observations` sightings; later ones change nothing
        averaged = previous + (hardness - previous) / (counts + 1.0)
        # the counts advance in commit(), once the sampler has written these scores
        return torch.where(counts < self.observations, averaged, previous)

    def commit(self, indices: torch.Tensor) -> None:
        counts = self.counts
        idx = indices.to(counts.device)
        counts.index_put_((idx,), torch.ones_like(idx, dtype=counts.dtype), accumulate=True)
        counts.clamp_(max=self.observations)

    def config(self):
        return {"name": self.name, "observations": self.observations, "items": int(self.counts.numel())}

    def state_dict(self):
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state):
        counts = state.get("counts")
        if not isinstance(counts, torch.Tensor) or counts.shape != self.counts.shape:
            raise ValueError("the saved EarlyImportance counts do not match this policy")
        self.counts = counts.to(torch.int32).clone()


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
