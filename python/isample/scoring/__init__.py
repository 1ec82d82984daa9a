"""Scoring workers: fresh importance scores for every item, computed beside the trainer.

The system of the second seed (Alain et al., "Variance reduction in SGD by distributed
importance sampling", 2015): workers score every item of the training set with a recent copy
of the parameters while one trainer samples from those scores. ``import isample.scoring``
explicitly; ``import isample`` does not load it.

    from isample.scoring import ScorerPool
    with ScorerPool(sampler, model, train_set, score="grad_norm", workers=1) as pool:
        ...  # after every optimizer step: pool.step(model)

Across machines, the last ranks of a torch.distributed job score: see ``ScorerRanks``.
See docs/scoring.md.
"""

from .pool import ScorerError, ScorerPool
from .scores import SCORES, Score, get_score, grad_norm, grad_norm_exact, loss

__all__ = ["ScorerPool", "ScorerError", "ScorerRanks", "Score", "SCORES", "get_score", "loss", "grad_norm",
           "grad_norm_exact"]


def __getattr__(name: str):
    if name == "ScorerRanks":  # torch.distributed is only imported when asked for
        from .distributed import ScorerRanks

        return ScorerRanks
    raise AttributeError(f"module 'isample.scoring' has no attribute {name!r}")
