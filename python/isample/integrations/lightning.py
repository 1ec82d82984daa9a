"""PyTorch Lightning: importance sampling with one callback and one call in ``training_step``.

    sampler = isample.ImportanceSampler(len(train_set))   # the defaults: see below
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            index, x, y = batch
            losses = F.cross_entropy(self(x), y, reduction="none")   # per example, shape (b,)
            return weighted_loss(self, index, losses)                # weights them, updates the scores

    trainer = L.Trainer(callbacks=[ImportanceSamplingCallback(sampler)], use_distributed_sampler=False)
    trainer.fit(Model(), loader)

``isample.ImportanceSampler(N)``'s defaults are the recipe the project's studies back (the
last loss, in proportion, mixed with 20% uniform, with replacement, unbiased weights <= 5,
one uniform warm-up epoch); earlier examples here used ``score="running_loss"`` under the
seed paper's softmax, and ``isample.ImportanceSampler.paper(N)`` still builds that method.

The callback checks, before the first step, that the Trainer keeps the sampler
(``use_distributed_sampler=False``: it raises otherwise, on one device too), that the train
DataLoader draws from the sampler and that its items carry their indices, keeps ``sampler.set_epoch`` equal to ``trainer.current_epoch``, saves the
sampler's state in Lightning checkpoints (and restores it on ``fit(ckpt_path=...)``, continuing
a part-done epoch where it stopped), and raises if a training step never handed its losses
back.

Under DDP (``Trainer(strategy="ddp", ...)``) pass an ``isample.distributed.DistributedImportanceSampler``
(replicated, the default) and ``Trainer(use_distributed_sampler=False)``: Lightning then keeps
the sampler instead of wrapping it in a ``DistributedSampler``. Every rank draws its shard of
one global sample, ``weighted_loss`` records each step's losses on its rank (no collective on
the step), the sampler exchanges them before it draws the next epoch so every replica applies
the same updates, the callback flushes them on every rank before Lightning writes a
checkpoint, and the rank-0 checkpoint holds a state every rank loads (see
``docs/distributed.md``). The sharded mode keeps a different state on every rank, which
Lightning's rank-0 checkpoints cannot hold, so the callback refuses it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "isample.integrations.lightning needs PyTorch Lightning: pip install 'isample[lightning]' "
        "(or pip install lightning)"
    ) from error

from ..distributed import DistributedImportanceSampler
from ..sampler import EpochSampler, IndexedDataset
from .protocol import MISSING_INDEX_HELP, weighted_loss as _protocol_weighted_loss

__all__ = ["ImportanceSamplingCallback", "weighted_loss"]

_SETUP_HELP = (
    "build the train DataLoader as DataLoader(isample.IndexedDataset(dataset), sampler=sampler, "
    "batch_size=...) and pass Trainer(use_distributed_sampler=False), so that Lightning keeps the sampler"
)

#: what the callback drives: any single-process sampler, or the replicated distributed one
_SAMPLERS = (EpochSampler, DistributedImportanceSampler)


def _sampler_of(dataloader: Any) -> Any:
    sampler = getattr(dataloader, "sampler", None)
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return inner if isinstance(inner, _SAMPLERS) else sampler


def _progress(sampler: Any) -> Optional[Tuple[int, int]]:
    """(epoch, items this process has been yielded) of the epoch being (or last) iterated."""
    if isinstance(sampler, DistributedImportanceSampler):
        return sampler.progress
    current = sampler.current_epoch
    return None if current is None else (current.epoch, current.position)


def _yields_indices(dataset: Any) -> bool:
    """Whether the dataset's items carry their index (one item is read to tell)."""
    if isinstance(dataset, IndexedDataset):
        return True
    try:
        item = dataset[0]
    except Exception:  # an unusual dataset: let weighted_loss catch bad indices instead
        return True
    if isinstance(item, dict):
        return "index" in item
    if isinstance(item, (tuple, list)) and item:
        first = item[0]
        return isinstance(first, int) or (isinstance(first, torch.Tensor) and first.dim() == 0 and not first.is_floating_point())
    return False


class ImportanceSamplingCallback(Callback):
    """Connects an ``isample`` sampler to a ``lightning.Trainer``.

    Args:
        sampler: the sampler the train DataLoader draws from (``ImportanceSampler``,
            ``SoftPruningSampler``, ...), or under DDP a replicated
            ``isample.distributed.DistributedImportanceSampler``.
        check_dataset: check at the start of training that the Trainer keeps the sampler
            (``use_distributed_sampler=False``, on one device too), that the DataLoader uses
            `sampler` and that its dataset yields indices (reads one item); each mistake raises
            one ValueError that says what to change (default True).
        log_weights: log ``isample/weight_mean`` and ``isample/weight_max`` of each batch
            through the LightningModule (default False).

    The LightningModule's ``training_step`` returns ``weighted_loss(self, index, losses)``
    (per-example losses, shape (b,)); that call finds this callback.
    """

    def __init__(
        self,
        sampler: Union[EpochSampler, DistributedImportanceSampler],
        *,
        check_dataset: bool = True,
        log_weights: bool = False,
    ) -> None:
        if not isinstance(sampler, _SAMPLERS):
            raise TypeError(
                "sampler must be an isample sampler (EpochSampler, or DistributedImportanceSampler under DDP), "
                f"got {type(sampler).__name__}"
            )
        if isinstance(sampler, DistributedImportanceSampler) and sampler.sharded:
            raise ValueError(
                "a sharded DistributedImportanceSampler keeps a different state on every rank, which Lightning's "
                "checkpoints (written by rank 0) cannot hold: use DistributedImportanceSampler(..., sharded=False)"
            )
        self.sampler = sampler
        self.check_dataset = check_dataset
        self.log_weights = log_weights
        self._consumed = 0  # items of epoch `_epoch` handed back so far (for mid-epoch checkpoints)
        self._epoch = -1
        self._reported = False  # whether the current batch went through weighted_loss
        self._module: Optional[pl.LightningModule] = None
        self._loaders: list = []  # the train DataLoaders that draw from the sampler

    @property
    def state_key(self) -> str:
        return f"ImportanceSamplingCallback[{type(self.sampler).__name__}]"

    # -- the step -------------------------------------------------------------------------
    def weighted_loss(self, indices: Any, losses: torch.Tensor, **extra: Any) -> torch.Tensor:
        """The protocol step: weight per-example `losses` (b,) of the items `indices` (b,),
        hand them to the sampler, return the scalar mean to optimise."""
        loss = _protocol_weighted_loss(self.sampler, indices, losses, **extra)
        self._consumed += int(losses.shape[0])
        self._reported = True
        if self.log_weights and self._module is not None:
            w = self.sampler.weights(indices)
            self._module.log_dict({"isample/weight_mean": float(w.mean()), "isample/weight_max": float(w.max())})
        return loss

    # -- hooks ----------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._module = pl_module

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.check_dataset:
            return
        # Lightning's default, use_distributed_sampler=True, swaps the sampler for a
        # DistributedSampler as soon as the run has several processes; on one device it leaves
        # it. Refusing it on every setup makes a script fail here, on the first run, rather
        # than only once it is moved to several GPUs.
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False) is True:
            raise ValueError(
                "Trainer(use_distributed_sampler=True) (Lightning's default) replaces the sampler with a "
                "DistributedSampler whenever the run has several processes: " + _SETUP_HELP
            )
        loader = trainer.train_dataloader
        loaders = loader if isinstance(loader, (list, tuple)) else list(loader.values()) if isinstance(loader, dict) else [loader]
        ours = [dl for dl in loaders if _sampler_of(dl) is self.sampler]
        if not ours:
            found = type(_sampler_of(loaders[0])).__name__ if loaders else "no DataLoader"
            raise ValueError(f"the train DataLoader does not draw from the callback's sampler (it uses {found}): " + _SETUP_HELP)
        if not _yields_indices(ours[0].dataset):
            raise ValueError("the train dataset's items do not carry their indices: " + MISSING_INDEX_HELP)
        self._loaders = ours

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning already calls set_epoch(current_epoch) on the DataLoader's sampler before
        # iterating; this keeps the two equal should a custom loader wrapper hide the sampler.
        if self.sampler.epoch != trainer.current_epoch:
            self.sampler.set_epoch(trainer.current_epoch)
        # Lightning counts an epoch's batches once, when it loads the DataLoader, and stops the
        # epoch there: an epoch longer than the first (warm-up over N, then samples_per_epoch > N)
        # would be cut short without a word. len() gives the length of the epoch about to run.
        limit = trainer.limit_train_batches
        limited = not (limit is None or (isinstance(limit, float) and limit == 1.0))  # an int 1 means one batch
        for dl in self._loaders:
            if not limited and len(dl) > trainer.num_training_batches:
                raise ValueError(
                    f"epoch {trainer.current_epoch} of the sampler has {len(dl)} batches but Lightning counted "
                    f"{trainer.num_training_batches} when it loaded the DataLoader and would stop there: pass "
                    "Trainer(reload_dataloaders_every_n_epochs=1) so that it counts every epoch"
                )
        # (not called when a fit resumes part-way through an epoch: the count comes from the checkpoint)
        self._consumed, self._epoch = 0, trainer.current_epoch

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._reported = False

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if loss.dim() != 0:
            raise ValueError(
                f"training_step returned a loss of shape {tuple(loss.shape)}; return "
                "isample.integrations.lightning.weighted_loss(self, index, losses), which weights the "
                "per-example losses and reduces them to a scalar"
            )

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._reported and outputs is not None:  # None: training_step chose to skip the batch
            raise RuntimeError(
                "training_step did not hand the batch's per-example losses to isample, so the scores and "
                "weights are not used: return isample.integrations.lightning.weighted_loss(self, index, "
                "losses) with losses computed with reduction='none'"
            )

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The sampler's state, saved in every Lightning checkpoint. A checkpoint taken
        part-way through an epoch records the items used so far (not what the DataLoader
        prefetched), so a resumed fit continues the epoch with the same order and weights."""
        if isinstance(self.sampler, DistributedImportanceSampler):
            # Lightning builds the checkpoint on every rank and rank 0 writes it: exchange the
            # updates each rank recorded since the last draw, so rank 0's state holds them all
            # (a collective; nothing to do with exchange="step").
            self.sampler.flush()
        progress = _progress(self.sampler)  # (epoch, items yielded) of the epoch being (or last) iterated
        consumed = None
        if progress is not None and progress[0] == self._epoch and self._consumed < progress[1]:
            consumed = self._consumed
        return {"sampler": self.sampler.state_dict(consumed=consumed), "consumed": self._consumed, "epoch": self._epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state_dict["sampler"])
        self._consumed = int(state_dict.get("consumed", 0))
        self._epoch = int(state_dict.get("epoch", -1))


def weighted_loss(module: "pl.LightningModule", indices: Any, losses: torch.Tensor, **extra: Any) -> torch.Tensor:
    """Call from ``training_step``: weight per-example `losses` (b,) of the dataset items
    `indices` (b,), hand them to the sampler of the trainer's ``ImportanceSamplingCallback``,
    and return the scalar weighted mean. ``extra`` goes to ``sampler.update``.

    Raises ValueError for a scalar loss (use ``reduction="none"``), RuntimeError when the
    trainer has no ``ImportanceSamplingCallback``, and TypeError when `module` is not a
    LightningModule (a sampler goes to ``isample.integrations.protocol.weighted_loss``).
    """
    if not isinstance(module, pl.LightningModule):
        if callable(getattr(module, "weights", None)) and callable(getattr(module, "update", None)):
            raise TypeError(
                "lightning.weighted_loss takes the LightningModule first: return weighted_loss(self, index, losses) "
                "from training_step. For a sampler outside Lightning, use "
                "isample.integrations.protocol.weighted_loss(sampler, index, losses)"
            )
        raise TypeError(
            f"lightning.weighted_loss takes the LightningModule (self in training_step) first, got {type(module).__name__}"
        )
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        trainer = None
    callbacks = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, ImportanceSamplingCallback)]
    if len(callbacks) != 1:
        raise RuntimeError(
            f"weighted_loss needs the module to be trained by a Trainer with one ImportanceSamplingCallback, "
            f"found {len(callbacks)}: Trainer(callbacks=[ImportanceSamplingCallback(sampler)], use_distributed_sampler=False)"
        )
    return callbacks[0].weighted_loss(indices, losses, **extra)
