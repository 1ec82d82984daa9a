"""Evaluating a model on a split of the run's data: eval mode, no augmentation, every example once.

``evaluate`` is what one process runs; ``predict_range`` and ``evaluation_record`` are its two
halves, so that a world of several processes (``distributed_run.DistributedWorld``) can
evaluate a slice per rank and sum the results.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from .augment import normalize
from .data import Dataset

__all__ = ["class_accuracy", "evaluate", "predict_range", "evaluation_record"]


def class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class accuracy, float64 (C,): correct / present for each class (NaN if absent)."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    present = torch.bincount(labels, minlength=num_classes).double()
    return correct / present


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    *,
    batch_size: int,
    autocast: Callable[[], Any],
    channels_last: bool,
) -> Dict[str, Any]:
    """Loss and accuracy on a whole split: eval mode, no augmentation, every example once.

    (The seed paper's presentation had a bug exactly here; tests check this against hand-made
    cases.) Returns loss, accuracy, balanced accuracy (mean over classes present), the worst
    class's accuracy and the per-class accuracies.
    """
    total_loss, predictions = predict_range(model, images, labels, data, 0, labels.shape[0], batch_size=batch_size,
                                            autocast=autocast, channels_last=channels_last)
    per_class = class_accuracy(predictions, labels, data.num_classes)
    return evaluation_record(float(total_loss) / labels.shape[0], float((predictions == labels).double().mean()), per_class)


@torch.no_grad()
def predict_range(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    lo: int,
    hi: int,
    *,
    batch_size: int,
    autocast: Callable[[], Any],
    channels_last: bool,
):
    """The summed loss (float64) and the predictions on items lo..hi-1, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=images.device)
    predictions = torch.empty_like(labels[lo:hi])
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x = normalize(images[start:stop], data.mean, data.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), labels[start:stop], reduction="sum").double()
        predictions[start - lo : stop - lo] = logits.argmax(1)
    model.train(was_training)
    return total_loss, predictions


def evaluation_record(loss: float, accuracy: float, per_class: torch.Tensor) -> Dict[str, Any]:
    """The evaluation record from the mean loss, the accuracy and the per-class accuracies."""
    present = per_class[~torch.isnan(per_class)]
    return {
        "loss": loss,
        "accuracy": accuracy,
        "balanced_accuracy": float(present.mean()),
        "worst_class_accuracy": float(present.min()),
        "per_class_accuracy": [None if math.isnan(a) else float(a) for a in per_class.tolist()],
    }

