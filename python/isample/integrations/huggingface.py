"""Hugging Face ``transformers.Trainer`` with importance sampling of the training set.

    from isample.integrations.huggingface import ImportanceTrainer

    train = isample.IndexedDataset(train_set)      # items are dicts: each gets an "index" key
    # (a datasets.Dataset instead: train = ds.add_column("index", list(range(len(ds)))))
    trainer = ImportanceTrainer(
        model=model, args=TrainingArguments(...), train_dataset=train,
        sampler=isample.ImportanceSampler(len(train)),   # optional: this is the default
    )
    trainer.train()

Without ``sampler=`` the trainer builds ``isample.ImportanceSampler(len(train_dataset),
seed=args.seed)``: the library's defaults (the last loss, in proportion, mixed with 20%
uniform, with replacement, unbiased weights <= 5, one uniform warm-up epoch). Earlier
versions' examples suggested ``score="running_loss"`` under the seed paper's softmax, which
cost accuracy in one report (a BERT fine-tune, 39% against the plain Trainer's 66%, issue
24; level with uniform on the digits task of docs/results/defaults/quickstart.md); pass
``sampler=isample.ImportanceSampler.paper(len(train))`` for the paper's method.

``ImportanceTrainer`` is a ``Trainer`` whose train DataLoader draws from ``trainer.sampler``
and whose ``compute_loss`` runs the model without labels, computes per-example losses
(cross-entropy with ``reduction="none"`` from the logits and labels, or ``per_example_loss``),
weights them by the sampler's draw-time importance weights, and hands them back to the
sampler (``isample.integrations.protocol.weighted_loss``). The "index" field is kept through
``remove_unused_columns`` and never reaches the model. The sampler's state is saved in each
checkpoint folder (``isample_sampler.pt``, written atomically by ``isample.checkpoint``, with
the sampler's item count and a checksum) and restored by ``train(resume_from_checkpoint=...)``,
which refuses a file saved for another number of items before changing anything.
Evaluation is the Trainer's own. Single process only (one sampler, one tree).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it; say so here, not at Trainer())
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"isample.integrations.huggingface needs transformers and accelerate ({error}): "
        "pip install 'isample[hf]' (or pip install 'transformers[torch]')"
    ) from error

from ..checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ..sampler import EpochSampler, ImportanceSampler
from .protocol import MISSING_INDEX_HELP, weighted_loss

__all__ = ["ImportanceTrainer", "per_example_loss", "load_sampler_state", "SAMPLER_FILE"]

#: the file in each checkpoint folder that holds the sampler's state
SAMPLER_FILE = "isample_sampler.pt"

PerExampleLoss = Callable[[Any, Optional[torch.Tensor]], torch.Tensor]


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:  # ModelOutput is a dict
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in the model's output ({type(outputs).__name__}): pass "
        "ImportanceTrainer(per_example_loss=fn), fn(outputs, labels) -> losses of shape (b,)"
    )


def per_example_loss(
    outputs: Any, labels: Optional[torch.Tensor], *, shift: bool = False, label_smoothing: float = 0.0
) -> torch.Tensor:
    """One loss per example, shape (b,), from a model's logits and labels.

    - logits (b, C), integer labels (b,): cross-entropy (classification);
    - logits (b, 1) or (b,), float labels (b,): squared error (regression);
    - logits (b, C), float labels (b, C): binary cross-entropy averaged over C (multi-label);
    - logits (b, T, C), integer labels (b, T): token cross-entropy averaged over each
      example's tokens whose label is not -100 (``shift=True``: predict token t+1 from t, as
      causal language models do).
    """
    logits = _logits_of(outputs)
    if labels is None:
        raise ValueError(
            "the batch has no labels, so per-example losses cannot be computed: give the dataset a 'labels' "
            "field or pass ImportanceTrainer(per_example_loss=fn)"
        )
    if logits.dim() == 3 and labels.dim() == 2:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100, label_smoothing=label_smoothing)
        counted = (labels != -100).sum(dim=1).clamp(min=1)
        return token.sum(dim=1) / counted
    if labels.is_floating_point():
        if logits.shape == labels.shape and logits.dim() == 2:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(dim=1)
        if logits.dim() in (1, 2) and logits.shape[0] == labels.shape[0] and logits.numel() == labels.numel():
            return (logits.reshape(-1) - labels.to(logits.dtype)) ** 2
    elif logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == labels.shape[0]:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    raise ValueError(
        f"no per-example loss for logits of shape {tuple(logits.shape)} and labels of shape {tuple(labels.shape)} "
        f"({labels.dtype}): pass ImportanceTrainer(per_example_loss=fn), fn(outputs, labels) -> losses of shape (b,) "
        "computed with reduction='none'"
    )


def _is_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class _SaveSampler(TrainerCallback):
    """Writes the sampler's state into each checkpoint folder the Trainer saves."""

    def __init__(self, trainer: "ImportanceTrainer") -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            # The epoch is saved from its start: on resume the Trainer skips the batches it
            # already trained on (skip_first_batches), replaying the same order, or moves to the
            # next epoch (set_epoch) after an epoch's last step.
            sampler = self.trainer.sampler
            save_checkpoint(os.path.join(folder, SAMPLER_FILE), sampler.state_dict(consumed=0), capacity=sampler.num_items)


def load_sampler_state(path: Union[str, os.PathLike], num_items: int) -> Dict[str, Any]:
    """The sampler state in `path`, checked to be for `num_items` items (ValueError if not).
    Reads the files written by ``isample.checkpoint.save_checkpoint``, and the plain
    ``torch.save`` files of earlier isample versions."""
    try:
        return load_checkpoint(path, expected_capacity=num_items)
    except ValueError as error:
        if "not an isample checkpoint" not in str(error):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # an earlier, plain file
        if not (isinstance(state, dict) and str(state.get("format", "")).startswith("isample.")):
            raise ValueError(f"{path} holds neither an {CHECKPOINT_FORMAT} nor an isample sampler state") from None
        return state


class ImportanceTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on importance-sampled, importance-weighted data.

    Args (beyond ``Trainer``'s, keyword only):
        sampler: the sampler of the training set (default
            ``isample.ImportanceSampler(len(train_dataset), seed=args.seed)``, the library's
            defaults: see the module docstring).
        index_key: the field of each example that holds its dataset index (default "index",
            which ``isample.IndexedDataset`` adds to dict items).
        per_example_loss: ``fn(outputs, labels) -> (b,)`` losses with ``reduction="none"``;
            default ``isample.integrations.huggingface.per_example_loss`` (cross-entropy for
            classification and token classification, shifted for causal LMs, squared error for
            regression, BCE for multi-label).

    Attributes:
        sampler: the ``EpochSampler`` the train DataLoader draws from (the one passed in, or
            the default one), read-only: ``trainer.sampler.scores()``,
            ``trainer.sampler.history``, ``trainer.sampler.weights(indices)``. Its state is
            saved in every checkpoint folder and restored on resume.
        last_step: the last training batch's ``indices`` and ``losses`` (detached), for
            logging; ``trainer.sampler.weights(last_step["indices"])`` gives their weights.
    """

    def __init__(
        self,
        *args: Any,
        sampler: Optional[EpochSampler] = None,
        index_key: str = "index",
        per_example_loss: Optional[PerExampleLoss] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("ImportanceTrainer needs a train_dataset: the sampler draws from it")
        if not hasattr(self.train_dataset, "__len__"):
            raise TypeError("ImportanceTrainer needs a map-style train_dataset with __len__ (not an IterableDataset)")
        n = len(self.train_dataset)
        if sampler is None:
            sampler = ImportanceSampler(n, seed=self.args.seed)
        if not isinstance(sampler, EpochSampler):
            raise TypeError(f"sampler must be an isample sampler (EpochSampler), got {type(sampler).__name__}")
        if sampler.num_items != n:
            raise ValueError(f"the sampler has {sampler.num_items} items but train_dataset has {n}: they must match")
        if self.args.world_size > 1:
            raise ValueError("ImportanceTrainer runs in one process: the sampler and its scores are not sharded")
        self._sampler = sampler
        self.index_key = index_key
        self.per_example_loss = per_example_loss
        self.last_step: Dict[str, torch.Tensor] = {}
        self._shift: Optional[bool] = None  # whether the model is a causal LM (found at the first step)
        # compute_loss returns the batch's weighted mean, not a sum over the accumulated batch:
        # the Trainer must divide it by the gradient-accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = False
        self.add_callback(_SaveSampler(self))

    @property
    def sampler(self) -> EpochSampler:
        """The sampler of the training set (read-only: the DataLoader, the checkpoints and
        ``compute_loss`` all use this one)."""
        return self._sampler

    # -- data -----------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # keep the index through remove_unused_columns; compute_loss takes it out before the model
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.index_key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.index_key]

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> EpochSampler:
        return self.sampler

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        self._check_indexed(self.train_dataset)
        return super().get_train_dataloader()

    def _check_indexed(self, dataset: Any) -> None:
        """Fail before training when the examples carry no index (reads one example)."""
        columns = getattr(dataset, "column_names", None)  # a datasets.Dataset
        if columns is not None:
            ok = self.index_key in columns
        else:
            item = dataset[0]
            ok = isinstance(item, dict) and self.index_key in item
        if not ok:
            raise ValueError(
                f"the train_dataset's examples have no {self.index_key!r} field, so the sampler cannot tell which "
                "examples a batch holds: " + MISSING_INDEX_HELP
                + f" (a datasets.Dataset: ds.add_column({self.index_key!r}, list(range(len(ds)))))"
            )

    # -- loss -----------------------------------------------------------------------------
    def _label_key(self) -> str:
        names = getattr(self, "label_names", None) or ["labels"]
        return names[0]

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, tuple]:
        """Training: the weighted mean of per-example losses (see the class). Evaluation
        (``model.training`` False): the Trainer's own ``compute_loss``, without the index."""
        if not model.training:
            inputs = {k: v for k, v in inputs.items() if k != self.index_key}
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.index_key not in inputs:
            raise ValueError(
                f"the training batch has no {self.index_key!r} field (fields: {sorted(inputs)}): " + MISSING_INDEX_HELP
                + "; keep it through your data collator"
            )
        label_key = self._label_key()
        indices = inputs[self.index_key]
        labels = inputs.get(label_key)
        model_inputs = {k: v for k, v in inputs.items() if k not in (self.index_key, label_key)}
        outputs = model(**model_inputs)
        if self.per_example_loss is not None:
            losses = self.per_example_loss(outputs, labels)
        else:
            if self._shift is None:
                self._shift = _is_causal_lm(self.accelerator.unwrap_model(model))
            losses = per_example_loss(outputs, labels, shift=self._shift, label_smoothing=float(self.args.label_smoothing_factor))
        loss = weighted_loss(self.sampler, indices, losses)
        self.last_step = {"indices": indices, "losses": losses.detach()}
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints ----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint``, the sampler's state saved in
        that checkpoint folder is restored first."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, os.PathLike)):
            path = os.path.join(folder, SAMPLER_FILE)
            if os.path.isfile(path):
                self.sampler.load_state_dict(load_sampler_state(path, self.sampler.num_items))
            else:
                warnings.warn(
                    f"{folder} holds no {SAMPLER_FILE}: the sampler starts afresh (scores of 0, epoch 0)",
                    stacklevel=2,
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

