"""The backend protocol: the few calls any training loop makes to use an isample sampler.

1. get the batch's dataset indices (``split_batch``; the dataset is wrapped in
   ``isample.IndexedDataset`` so every item carries its index);
2. compute per-example losses, shape (b,) (``reduction="none"``);
3. weight them with ``sampler.weights(indices)``: the importance weights of the
   probabilities the items were drawn with;
4. hand the losses back with ``sampler.update(indices, losses)``.

``weighted_loss`` does 3 and 4 and returns the scalar to call ``backward()`` on. Every
adapter (Lightning, Hugging Face) goes through it, so the checks and the arithmetic live here
once::

    for batch in loader:                       # DataLoader(IndexedDataset(ds), sampler=sampler)
        index, x, y = batch
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = weighted_loss(sampler, index, losses)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch

from ..sampler import EpochSampler

__all__ = ["SamplerProtocol", "weighted_loss", "split_batch", "check_per_example_losses", "MISSING_INDEX_HELP"]

#: loss dtypes the weights come in as they are (float16 / bfloat16 losses get float32 weights)
_WEIGHT_DTYPES = frozenset((torch.float32, torch.float64))
#: index dtypes the one-expression check of weighted_loss lets through (the sampler checks values)
_INDEX_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))

#: how to make a dataset yield its indices; every adapter's error for a batch without them ends with it
MISSING_INDEX_HELP = (
    "wrap the training dataset in isample.IndexedDataset(dataset), which gives each item its "
    "index (first in a tuple, under 'index' in a dict), or add an integer 'index' field yourself"
)


@runtime_checkable
class SamplerProtocol(Protocol):
    """What ``weighted_loss`` needs of a sampler: ``isample.ImportanceSampler``,
    ``SoftPruningSampler`` and any other ``EpochSampler`` have it."""

    def weights(self, indices: Any, *, dtype: Optional[torch.dtype] = None, device: Any = None) -> torch.Tensor: ...

    def update(self, indices: Any, losses: Any, **extra: Any) -> None: ...


def _check_indices(indices: Any, length: Optional[int]) -> None:
    """Catch what is not a batch of dataset indices before the sampler sees it."""
    if isinstance(indices, torch.Tensor):
        if indices.dtype is torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(
                f"indices must be the batch's dataset indices (integers), got a {indices.dtype} tensor: "
                + MISSING_INDEX_HELP
            )
        if indices.dim() != 1:
            raise ValueError(
                f"indices must have shape (b,), one dataset index per example, got {tuple(indices.shape)}: "
                + MISSING_INDEX_HELP
            )
        if length is not None and indices.shape[0] != length:
            raise ValueError(f"got {indices.shape[0]} indices for {length} per-example losses: they must match")
    elif indices is None:
        raise TypeError("indices is None: the batch carries no dataset indices; " + MISSING_INDEX_HELP)


def _check_sampler(sampler: Any) -> None:
    """TypeError for a first argument that is not a sampler, naming the call meant for it."""
    if callable(getattr(sampler, "weights", None)) and callable(getattr(sampler, "update", None)):
        return
    kind = type(sampler)
    if hasattr(kind, "training_step") and hasattr(kind, "trainer"):  # a LightningModule (its .trainer may raise)
        raise TypeError(
            "protocol.weighted_loss takes the sampler first, weighted_loss(sampler, index, losses); inside a "
            "LightningModule's training_step use isample.integrations.lightning.weighted_loss(self, index, losses), "
            "which finds the sampler through the trainer's ImportanceSamplingCallback"
        )
    raise TypeError(
        f"weighted_loss needs the sampler the DataLoader draws from (an isample.EpochSampler, with weights() and "
        f"update()) as its first argument, got {type(sampler).__name__}"
    )


def check_per_example_losses(losses: Any, batch_size: Optional[int] = None) -> torch.Tensor:
    """``losses`` as given, after checking it is a tensor of per-example losses, shape (b,).

    A scalar (a loss already averaged over the batch) or any other shape raises one
    ValueError that says to compute the loss with ``reduction="none"``.
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"losses must be a torch tensor of per-example losses, shape (b,), got {type(losses).__name__}"
        )
    if losses.dim() == 0:
        raise ValueError(
            "got a scalar loss, but importance sampling needs one loss per example: compute it with "
            "reduction='none' (e.g. F.cross_entropy(logits, y, reduction='none')), which gives shape (b,)"
        )
    if losses.dim() != 1:
        raise ValueError(
            f"losses must have shape (b,), one loss per example, got {tuple(losses.shape)}: compute the loss "
            "with reduction='none' and reduce the other dimensions per example "
            "(e.g. token losses of shape (b, T): losses.mean(dim=1))"
        )
    if batch_size is not None and losses.shape[0] != batch_size:
        raise ValueError(f"got {losses.shape[0]} per-example losses for {batch_size} indices: they must match")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    return losses


def weighted_loss(
    sampler: SamplerProtocol,
    indices: Any,
    losses: torch.Tensor,
    *,
    reduction: str = "mean",
    update: bool = True,
    **extra: Any,
) -> torch.Tensor:
    """Weight a batch's per-example losses and hand them back to the sampler.

    Args:
        sampler: the sampler the DataLoader draws from (an ``isample.EpochSampler``).
        indices: the batch's dataset indices, int (b,) (tensor, array or sequence).
        losses: per-example losses, float (b,), with grad (``reduction="none"``).
        reduction: ``"mean"`` (default): mean of w_i * L_i over the batch; ``"sum"``: their sum.
        update: hand the losses to ``sampler.update`` (default True: isample's samplers read
            them as they are and keep no graph; any other sampler gets them detached); False
            only weights, e.g. for a micro-batch whose scores another call reports.
        extra: passed to ``sampler.update`` (``logits=``, ``targets=`` for ``GradNormBound``),
            detached.

    Returns:
        A scalar tensor on the losses' device, in their dtype (float32 for float16/bfloat16
        losses, since weights 1 / (N p) can exceed float16's range): the loss to call
        ``backward()`` on.

    The weights come from the probabilities the items were drawn with (``sampler.weights``),
    never from the current scores. With an isample sampler they come scaled by 1/b for the
    mean, and the loss is ``losses @ weights``: one autograd node. The scores change at once; the probabilities at the next
    epoch. Raises ValueError for a scalar or wrongly shaped loss (use ``reduction="none"``),
    TypeError for a first argument that is not a sampler (a LightningModule's
    ``training_step`` calls ``isample.integrations.lightning.weighted_loss(self, ...)``
    instead), TypeError for indices that are not integers, and the sampler's ValueError for an index
    its current epoch did not draw. A rejected call leaves the sampler unchanged.
    """
    if update and not extra and type(losses) is torch.Tensor and isinstance(sampler, EpochSampler):
        # A CPU sampler's compiled step: the weights and the update in one core call, which
        # reads plain arrays and checks them itself (None: nothing done, go on below).
        weights = sampler._weighted_update(indices, losses, reduction)
        if weights is not None:
            return losses @ weights
    if (
        type(losses) is torch.Tensor
        and type(indices) is torch.Tensor
        and isinstance(sampler, EpochSampler)
        and losses.dim() == 1
        and indices.dim() == 1
        and indices.shape[0] == losses.shape[0] > 0
        and losses.dtype in _WEIGHT_DTYPES
        and indices.dtype in _INDEX_DTYPES
        and (reduction == "mean" or reduction == "sum")
        and not extra
    ):
        # The common case, checked in one expression (a training step runs this with cold
        # caches, where every Python statement counts). isample's samplers scale the weights
        # in the core (1/b for the mean), so the loss is one dot product (one autograd node
        # instead of two), and read losses that require grad without a detached copy.
        # Weights first: they raise for an item the epoch did not draw, before any score changes.
        weights = sampler.weights(
            indices, dtype=losses.dtype, device=losses.device, scale=1.0 / losses.shape[0] if reduction == "mean" else 1.0
        )
        if update:
            sampler.update(indices, losses)
        return losses @ weights
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_sampler(sampler)
    losses = check_per_example_losses(losses)
    _check_indices(indices, losses.shape[0])
    dtype = losses.dtype if losses.dtype in _WEIGHT_DTYPES else torch.float32
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    b = losses.shape[0]
    if isinstance(sampler, EpochSampler) and b:  # as above: scaled weights, one dot product
        weights = sampler.weights(indices, dtype=dtype, device=losses.device, scale=1.0 / b if reduction == "mean" else 1.0)
        if update:
            sampler.update(indices, losses, **detached)
        return (losses if losses.dtype is dtype else losses.to(dtype)) @ weights
    # any other sampler (SamplerProtocol asks for no `scale`), or an empty batch (whose mean is NaN)
    weights = sampler.weights(indices, dtype=dtype, device=losses.device)
    if update:
        sampler.update(indices, losses.detach(), **detached)
    weighted = (losses if losses.dtype is dtype else losses.to(dtype)) * weights
    return weighted.mean() if reduction == "mean" else weighted.sum()


def split_batch(batch: Any, *, key: str = "index") -> Tuple[torch.Tensor, Any]:
    """``(indices, rest)`` of a batch from a DataLoader over ``isample.IndexedDataset``.

    A tuple/list batch ``(index, x, y, ...)`` gives ``(index, (x, y, ...))`` (``(index, x)``
    for two elements); a dict batch gives ``(batch[key], batch without key)``. A batch that
    carries no integer indices raises one error that says how to wrap the dataset.
    """
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(
                f"the batch has no {key!r} field (fields: {sorted(map(str, batch))}), so the sampler cannot "
                "tell which examples it holds: " + MISSING_INDEX_HELP
            )
        indices, where = batch[key], f"batch[{key!r}]"
        rest: Any = {k: v for k, v in batch.items() if k != key}
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        indices, where = batch[0], "the batch's first element"
        rest = batch[1] if len(batch) == 2 else tuple(batch[1:])
    else:
        raise TypeError(
            f"cannot find dataset indices in a batch of type {type(batch).__name__}: " + MISSING_INDEX_HELP
        )
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices)
    if indices.dtype is torch.bool or indices.is_floating_point() or indices.is_complex() or indices.dim() != 1:
        raise TypeError(
            f"{where} is not a batch of dataset indices (dtype {indices.dtype}, shape "
            f"{tuple(indices.shape)}; expected integers of shape (b,)): " + MISSING_INDEX_HELP
        )
    return indices, rest
