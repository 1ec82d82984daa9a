"""What a scoring worker computes for a batch: ``(model, x, y) -> (b,)`` non-negative scores.

=====================  ========================================================  ===================
name                   score of item i                                           cost (small CNN)
=====================  ========================================================  ===================
``"loss"``             cross-entropy L_i                                         one forward pass
``"grad_norm"``        ||softmax(z_i) - onehot(y_i)||_2, the bound of            one forward pass
                       ``isample.GradNormBound`` (Katharopoulos & Fleuret 2018)
``"grad_norm_exact"``  ||d L_i / d theta||_2 over every trainable parameter,     a per-example
                       with ``torch.func`` (``functional_call``, ``vmap``,       backward pass
                       ``grad``)                                                 (see the benchmark)
a callable             whatever ``fn(model, x, y)`` returns, shape (b,)          yours
=====================  ========================================================  ===================

The worker puts the model in eval mode (BatchNorm uses its running statistics, dropout is
off), so each item's score depends on that item alone. Every score runs under
``torch.no_grad()``: ``torch.func.grad`` is a function transform and differentiates under it
anyway. A callable that needs autograd itself is wrapped in ``Score(fn, needs_grad=True)``.

The second seed (Alain et al., "Variance reduction in SGD by distributed importance
sampling") samples in proportion to the exact per-example gradient norm; ``"grad_norm"`` is
the cheap bound of it that needs no backward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

from ..scores import GradNormBound

__all__ = ["Score", "SCORES", "get_score", "loss", "grad_norm", "grad_norm_exact"]

ScoreFn = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]


class Score:
    """A score function with what the worker must know to run it.

    Args:
        fn: ``fn(model, x, y) -> (b,)`` tensor of scores, one per item of the batch.
        name: shown in ``ScorerPool.stats()`` and errors (default: the function's name).
        needs_grad: run ``fn`` with autograd enabled (default: under ``torch.no_grad()``).

    Under the ``spawn`` and ``forkserver`` start methods the score travels to the worker by
    pickling: ``fn`` must be a module-level function (not a lambda or a closure).
    """

    def __init__(self, fn: ScoreFn, *, name: Optional[str] = None, needs_grad: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"a score must be callable as fn(model, x, y), got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.needs_grad = bool(needs_grad)

    def __call__(self, model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The batch's scores as float64 on the CPU, shape (b,) with b = len(y). A wrong shape
        or dtype raises TypeError naming the score; NaN, inf and negative values are left for
        the trainer to refuse and count."""
        with torch.set_grad_enabled(self.needs_grad):
            scores = self.fn(model, x, y)
        b = int(y.shape[0])
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"score {self.name!r} returned {type(scores).__name__}, expected a tensor of shape ({b},)")
        if scores.shape != (b,):
            raise TypeError(f"score {self.name!r} returned shape {tuple(scores.shape)} for a batch of {b}; expected ({b},)")
        if scores.is_complex() or scores.dtype is torch.bool:
            raise TypeError(f"score {self.name!r} returned dtype {scores.dtype}; expected real numbers")
        return scores.detach().to(device="cpu", dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Score({self.name!r}{', needs_grad=True' if self.needs_grad else ''})"


def _loss(model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _grad_norm(model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    # isample.GradNormBound's own arithmetic (float64 softmax minus one-hot); it only reads
    # the losses' length and device
    placeholder = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    return _BOUND(placeholder, None, None, logits=logits, targets=y)


_BOUND = GradNormBound()


class _ExactGradNorm:
    """||grad of the cross-entropy of one item|| over all trainable parameters, batched with
    torch.func: vmap over the items of grad of a functional_call. ``chunk_size`` items are
    differentiated at once (memory: chunk_size x the parameters' size)."""

    __name__ = "grad_norm_exact"

    def __init__(self, chunk_size: int = 32) -> None:
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def __call__(self, model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())

        def item_loss(trainable: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, ({**trainable, **frozen}, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        def item_norm(trainable: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            grads = grad(item_loss)(trainable, xi, yi)
            # the norm inside the vmapped function: only (b,) leaves it, never b x |theta|
            return torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))

        return vmap(item_norm, in_dims=(None, 0, 0), chunk_size=self.chunk_size)(params, x, y)

    def __reduce__(self):  # picklable by value under spawn
        return (_ExactGradNorm, (self.chunk_size,))


loss = Score(_loss, name="loss")
grad_norm = Score(_grad_norm, name="grad_norm")


def grad_norm_exact(chunk_size: int = 32) -> Score:
    """The exact per-example gradient norm, ``chunk_size`` items differentiated at once."""
    return Score(_ExactGradNorm(chunk_size), name="grad_norm_exact")


SCORES: Dict[str, Callable[[], Score]] = {
    "loss": lambda: loss,
    "grad_norm": lambda: grad_norm,
    "grad_norm_exact": grad_norm_exact,
}


def get_score(score: Union[str, Score, ScoreFn]) -> Score:
    """A Score from a name (``"loss"``, ``"grad_norm"``, ``"grad_norm_exact"``), a Score, or a
    callable ``(model, x, y) -> (b,)`` (run under ``torch.no_grad()``)."""
    if isinstance(score, Score):
        return score
    if isinstance(score, str):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {sorted(SCORES)} or pass a callable (model, x, y) -> (b,)")
        return SCORES[score]()
    if callable(score):
        return Score(score)
    raise TypeError(f"score must be a name, a Score or a callable (model, x, y) -> (b,), got {type(score).__name__}")
