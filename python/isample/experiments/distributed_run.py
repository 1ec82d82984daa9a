"""The experiment runner under ``torchrun``: one training run over several processes.

    torchrun --standalone --nproc_per_node 2 -m isample.cli train --preset running_loss \\
        --dataset fashion-mnist --model small_cnn --train-subset 1000 --test-subset 500 --max-epochs 1

There is one training loop, ``train.train``; when the environment says ``WORLD_SIZE > 1``
(torchrun sets it) ``world.make_world`` gives it a :class:`DistributedWorld`, which supplies
everything that differs from one process (with one process nothing here runs):

- **Process group.** Initialised here unless the caller already did: gloo on the CPU, NCCL on
  GPUs (one per process, ``cuda:LOCAL_RANK``), with a timeout (``$ISAMPLE_DIST_TIMEOUT``
  seconds, default 600), so a rank that dies leaves the others waiting at most that long.
- **Sampling.** ``isample.distributed.DistributedImportanceSampler`` (replicated): every rank
  holds the same scores, draws the same global sample from the shared seed and trains on its
  shard of it. The runner keeps ``exchange="step"``: each step's (index, loss) pairs are
  all-gathered in ``update``, so that the loop in ``train.py`` (rank 0's mid-epoch
  checkpoints, the scores each epoch's record snapshots, its divergence check at ``update``)
  sees every rank's updates at once. Its step already makes one all-reduce (the agreed
  stop/checkpoint flags), so the deferred exchange would save two of three collectives, not
  all. Uniform runs shuffle with a shared seed and shard as ``DistributedSampler`` does.
  InfoBatch (``SoftPruningSampler``) has no distributed version yet and is refused.
- **Batches.** ``batch_size`` is the *global* batch: each rank takes ``batch_size / W`` items
  a step (it must divide), and DistributedDataParallel averages the gradients, so a step is
  the same size and an epoch has the same number of steps as in one process; learning rates
  and step budgets keep their meaning.
- **Evaluation.** Each rank evaluates a slice of the test set with rank 0's BatchNorm
  statistics; the sums are all-reduced, so every rank holds the same record.
- **Output.** Only rank 0 writes config.json, metrics, checkpoints and summary.json, logs and
  shows a progress bar. Records count the items of all ranks and rank 0's wall-clock.
- **Checkpoints and resume.** Rank 0 saves the model (unwrapped, as in one process),
  optimiser, scheduler and the replicated sampler, plus every rank's random-number state;
  on resume rank 0 reads the checkpoint and broadcasts it (no shared file system needed).
  A run resumes on the same number of processes. Time-based decisions (mid-epoch
  checkpoints, ``budget_seconds``, ``max_wall_seconds``) are agreed by all ranks each step
  (one all-reduce of 24 bytes), so every rank stops or saves at the same step.

Scorer ranks (``--scorer-ranks K``, ``train(..., scorer_ranks=K)``): the last K ranks of the job
score items instead of training, as the second seed's workers do (``isample.scoring.ScorerRanks``).
``ScorerRanks.split`` gives the W - K trainers their own process group, and everything above
(DDP, the distributed sampler, the sums, agreements and broadcasts of the loop) runs over it:
to the loop the world has W - K processes, and ``batch_size`` divides among them. A scorer
rank loads the same data and model, serves scores (``ScorerRanks.serve``) until the trainers
close their ``ScorerPool`` at the end of the run (or when it stops to resume later), then
returns the lead's summary. Each epoch's record carries the pool's stats under ``scorers``, as
with local workers (``cpu_seconds`` is None: the scorers' CPU is on other processes, maybe
other machines); checkpoints and ``summary.json`` record ``scorer_ranks``, and a run resumes
only with as many. A method without a score that a scorer can compute, local ``--scorers`` as
well, or as many scorer ranks as processes are refused on every rank before any process group
is made (``world.check_scorer_ranks``).

Results with W processes differ from one process's (other shards, per-rank augmentation
streams, padding when the sample does not divide by W); ``summary.json`` records
``world_size`` and the back end.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import gc
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..distributed import DistributedImportanceSampler
from .config import RunConfig
from .data import Dataset
from .evaluation import evaluation_record, predict_range
from .world import OneProcess, check_scorer_ranks, resolve_device, world_size

__all__ = ["DistributedWorld", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0
_FORMAT = "isample.experiments.distributed_run"


def _timeout() -> datetime.timedelta:
    seconds = float(os.environ.get("ISAMPLE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not seconds > 0:
        raise ValueError(f"ISAMPLE_DIST_TIMEOUT must be a positive number of seconds, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def _teardown() -> None:
    if dist.is_initialized():
        gc.collect()  # free DistributedDataParallel's reducers (reference cycles) while the group exists
        dist.destroy_process_group()


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shard_positions(length: int, world: int, rank: int) -> torch.Tensor:
    """Positions rank, rank + W, ... of an order of `length` items, padded by wrapping round
    to ceil(length / W) items, as DistributedSampler shards."""
    per_rank = -(-length // world)
    return (rank + world * torch.arange(per_rank, dtype=torch.int64)) % length


class DistributedWorld(OneProcess):
    """One rank of a torchrun job, as the training loop in ``train.train`` sees it; with
    `scorer_ranks` = K > 0 the job's last K ranks serve scores (see the module docstring)."""

    def __init__(self, scorer_ranks: int = 0) -> None:
        self.scorer_ranks = scorer_ranks
        self.group: Any = None  # the trainers' process group (None: the default group, every rank)
        self.ranks: Any = None  # the ScorerRanks, with scorer ranks

    def setup(self, config: RunConfig) -> torch.device:
        """This rank's device; initialises the process group if nobody has (and, with scorer
        ranks, splits the job into trainers and scorers)."""
        check_scorer_ranks(config, self.scorer_ranks, world_size())
        if config.scorers:
            raise ValueError(f"scoring workers (scorers={config.scorers}) run beside a single-process trainer; under "
                             "torchrun the scorers are ranks: pass --scorer-ranks K (and --scorers 0) instead")
        device = resolve_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_timeout())
            atexit.register(_teardown)
        expected = world_size()
        if dist.get_world_size() != expected:
            raise RuntimeError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={expected}")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.where = f" on {self.size} processes"
        if self.scorer_ranks:
            from ..scoring import ScorerRanks

            self.ranks = ScorerRanks.split(scorers=self.scorer_ranks)  # trainers 0 .. W-K-1: their rank is global
            self.serves = self.ranks.is_scorer
            self.group = None if self.serves else self.ranks.trainers
            self.size -= self.scorer_ranks
            self.where = f" on {self.size} processes and {self.scorer_ranks} scorer rank(s)"
        self.lead = self.rank == 0
        self.device = device
        # gloo reduces CPU tensors, NCCL GPU ones
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return device

    def on_lead(self, work: Callable[[], Any]) -> Any:
        outcome: Any = None
        if self.lead:
            try:
                outcome = ("ok", work())
            except Exception as error:  # every rank must hear of it, or the others wait for the timeout
                _broadcast(("error", f"{type(error).__name__}: {error}"))
                raise
        outcome = _broadcast(outcome)
        if outcome[0] == "error":
            raise ValueError(f"rank 0 could not start the run: {outcome[1]}")
        return outcome[1]

    def checkpoint_location(self, device: torch.device) -> Any:
        return "cpu"  # rank 0 reads it and broadcasts it as Python objects

    def batch_size(self, config: RunConfig) -> int:
        if config.batch_size % self.size:
            raise ValueError(
                f"batch_size={config.batch_size} is the global batch and must divide among the {self.size} processes"
            )
        return config.batch_size // self.size

    def importance_sampler(self, config: RunConfig) -> Callable[..., DistributedImportanceSampler]:
        if config.method == "infobatch":
            raise ValueError(
                "method 'infobatch' (SoftPruningSampler) has no distributed version yet: run it in one process"
            )
        return functools.partial(DistributedImportanceSampler, exchange="step", group=self.group)

    def make_scorers(self, config: RunConfig, data: Dataset, model: torch.nn.Module, sampler: Any,
                     state: Optional[Dict[str, Any]]) -> Any:
        """With scorer ranks, the trainers' side of them (a ScorerPool over ``self.ranks``)."""
        if not self.scorer_ranks:
            return None
        from .scorers import RunImages, RunScorers

        return RunScorers(config, RunImages.of(data), model, sampler, state, ranks=self.ranks)

    def serve(self, config: RunConfig, data: Dataset, model: torch.nn.Module) -> Dict[str, Any]:
        """This scorer rank's work: score the run's training items with the parameters the
        lead publishes until the trainers close their pool; then the lead's summary."""
        from .scorers import RunImages

        report = self.ranks.serve(model, RunImages.of(data), device=self.device)
        if report["error"] is not None:  # the trainers raise it too (ScorerError), at their next apply
            raise RuntimeError(report["error"])
        return self.finish(None)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       process_group=self.group)

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        return order[_shard_positions(order.numel(), self.size, self.rank)]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        staged = values.to(self.comm_device)
        dist.all_reduce(staged, group=self.group)
        return staged.cpu()

    def agree(self, *flags: bool) -> List[bool]:
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: Dataset, **options: Any) -> Dict[str, Any]:
        """``train.evaluate`` over the whole test set, each rank taking a contiguous slice with
        rank 0's BatchNorm statistics; the sums are all-reduced, so every rank holds the same record."""
        self._sync_buffers(model)
        labels = data.test_labels
        n, classes = labels.shape[0], data.num_classes
        lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
        loss_sum, predictions = predict_range(model, data.test_images, labels, data, lo, hi, **options)
        mine = labels[lo:hi]
        correct = torch.bincount(mine[predictions == mine], minlength=classes).double()
        present = torch.bincount(mine, minlength=classes).double()
        sums = self.sum(torch.cat([loss_sum.reshape(1), correct, present]))
        loss, correct, present = float(sums[0]), sums[1 : 1 + classes], sums[1 + classes :]
        return evaluation_record(loss / n, float(correct.sum() / n), correct / present)

    def _sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, for evaluation and saving."""
        for buffer in model.buffers():
            if buffer.is_floating_point() or buffer.dtype in (torch.int64, torch.int32):
                staged = buffer.data.to(self.comm_device)
                dist.broadcast(staged, src=0, group=self.group)
                buffer.data.copy_(staged)

    def lead_seconds(self, seconds: Dict[str, float]) -> Dict[str, float]:
        phases = ("training", "evaluation", "sampling")
        t = torch.tensor([seconds[k] for k in phases], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(t, src=0, group=self.group)
        return dict(zip(phases, t.cpu().tolist()))

    def random_state(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        return saved["ranks"][self.rank]

    def gather_random_state(self, mine: Dict[str, Any]) -> Dict[str, Any]:
        ranks: List[Any] = [None] * self.size
        dist.all_gather_object(ranks, mine, group=self.group)
        return {"ranks": ranks}

    def checkpoint_tag(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "world_size": self.size, **self._scorer_entry()}

    def summary_extras(self) -> Dict[str, Any]:
        return {"world_size": self.size, "backend": str(dist.get_backend()), **self._scorer_entry()}

    def _scorer_entry(self) -> Dict[str, Any]:
        return {"scorer_ranks": self.scorer_ranks} if self.scorer_ranks else {}

    def finish(self, result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        dist.barrier()  # every rank returns once rank 0 has completed the run folder
        if self.scorer_ranks:  # the scorer ranks return the lead's result (the trainers their own)
            lead_result = _broadcast(result)
            return lead_result if self.serves else result
        return result
