"""The experiment runner under ``torchrun``: one training run over several processes.

    torchrun --standalone --nproc_per_node 2 -m isample.cli train --preset running_loss \\
        --dataset fashion-mnist --model small_cnn --train-subset 1000 --test-subset 500 --max-epochs 1

``train()`` hands a run here when the environment says ``WORLD_SIZE > 1`` (torchrun sets it);
with one process nothing here runs, and the single-process loop in ``train.py`` is unchanged.
What differs from one process:

- **Process group.** Initialised here unless the caller already did: gloo on the CPU, NCCL on
  GPUs (one per process, ``cuda:LOCAL_RANK``), with a timeout (``$ISAMPLE_DIST_TIMEOUT``
  seconds, default 600), so a rank that dies leaves the others waiting at most that long.
- **Sampling.** ``isample.distributed.DistributedImportanceSampler`` (replicated): every rank
  holds the same scores, draws the same global sample from the shared seed and trains on its
  shard of it; each step's (index, loss) pairs are all-gathered so every replica applies the
  same updates. Uniform runs shuffle with a shared seed and shard as ``DistributedSampler``
  does. InfoBatch (``SoftPruningSampler``) has no distributed version yet and is refused.
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

Results with W processes differ from one process's (other shards, per-rank augmentation
streams, padding when the sample does not divide by W); ``summary.json`` records
``world_size`` and the back end.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import isample

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import DistributedImportanceSampler
from .augment import normalize, random_crop_flip
from .config import RunConfig
from .data import Dataset
from .models import build_model
from .train import (
    CHECKPOINT,
    _Clock,
    _cpu_name,
    _epoch_line,
    _nullcontext,
    _progress,
    _train_seconds,
    _write_metrics,
    _write_text,
    class_accuracy,
    load_run_data,
    resolve_device,
    score_snapshot,
    summarize,
)

__all__ = ["train_distributed", "world_size", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0
_FORMAT = "isample.experiments.distributed_run"


def world_size() -> int:
    """The number of processes the environment asks for (torchrun's WORLD_SIZE; 1 if unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _timeout() -> datetime.timedelta:
    seconds = float(os.environ.get("ISAMPLE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not seconds > 0:
        raise ValueError(f"ISAMPLE_DIST_TIMEOUT must be a positive number of seconds, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def _setup(config: RunConfig) -> torch.device:
    """This rank's device; initialises the process group if nobody has."""
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
    return device


def _teardown() -> None:
    if dist.is_initialized():
        gc.collect()  # free DistributedDataParallel's reducers (reference cycles) while the group exists
        dist.destroy_process_group()


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_distributed_sampler(config: RunConfig, num_items: int, device: torch.device) -> Optional[DistributedImportanceSampler]:
    """The configuration's sampler across the ranks; None for uniform (a shared shuffle)."""
    if config.method == "uniform":
        return None
    if config.method == "infobatch":
        raise ValueError(
            "method 'infobatch' (SoftPruningSampler) has no distributed version yet: run it in one process"
        )
    score = {
        "last_loss": lambda: isample.LastLoss(),
        "running_loss": lambda: isample.RunningLoss(config.beta),
        "grad_norm": lambda: isample.GradNormBound(),
        "early_importance": lambda: isample.EarlyImportance(num_items, config.importance_epochs),
    }[config.method]()
    transform = (
        isample.Proportional(1.0, 1e-6) if config.method == "early_importance" else isample.Softmax(config.temperature)
    )
    return DistributedImportanceSampler(
        num_items,
        score=score,
        transform=transform,
        samples_per_epoch=max(1, round(config.samples_fraction * num_items)),
        replacement=config.replacement,
        warmup_epochs=config.warmup_epochs,
        weighting=config.weighting,
        uniform_mix=config.uniform_mix,
        seed=config.seed,
        device=device,
    )


@dataclass
class _RankEpochState:
    """An epoch in progress. loss_sum, correct and seen are global totals up to the last
    flush (rank 0 carries them across a resume); rank_seen and steps are this rank's."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    rank_seen: int = 0
    steps: int = 0
    seconds: Dict[str, float] = field(default_factory=lambda: {"training": 0.0, "evaluation": 0.0, "sampling": 0.0})


@torch.no_grad()
def _evaluate_sharded(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    *,
    batch_size: int,
    autocast: Callable[[], Any],
    channels_last: bool,
    comm_device: torch.device,
) -> Dict[str, Any]:
    """``train.evaluate`` over the whole split, each rank taking a contiguous slice."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n, classes = labels.shape[0], data.num_classes
    lo, hi = rank * n // world, (rank + 1) * n // world
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    predictions = torch.empty_like(labels[lo:hi])
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x = normalize(images[start:stop], data.mean, data.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        y = labels[start:stop]
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        predictions[start - lo : stop - lo] = logits.argmax(1)
    model.train(was_training)
    mine = labels[lo:hi]
    correct = torch.bincount(mine[predictions == mine], minlength=classes).double()
    present = torch.bincount(mine, minlength=classes).double()
    sums = torch.cat([loss_sum.reshape(1), correct, present]).to(comm_device)
    dist.all_reduce(sums)
    sums = sums.cpu()
    loss, correct, present = float(sums[0]), sums[1 : 1 + classes], sums[1 + classes :]
    per_class = correct / present
    seen = per_class[~torch.isnan(per_class)]
    return {
        "loss": loss / n,
        "accuracy": float(correct.sum() / n),
        "balanced_accuracy": float(seen.mean()),
        "worst_class_accuracy": float(seen.min()),
        "per_class_accuracy": [None if math.isnan(a) else float(a) for a in per_class.tolist()],
    }


def _shard_positions(length: int, world: int, rank: int) -> torch.Tensor:
    """Positions rank, rank + W, ... of an order of `length` items, padded by wrapping round
    to ceil(length / W) items, as DistributedSampler shards."""
    per_rank = -(-length // world)
    return (rank + world * torch.arange(per_rank, dtype=torch.int64)) % length


def train_distributed(
    config: RunConfig,
    run_dir: os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
    log: Callable[[str], None] = print,
    max_wall_seconds: Optional[float] = None,
) -> Dict[str, Any]:
    """``train()`` for one rank of a torchrun job (the same arguments and result); every rank
    calls it with the same arguments. Returns the same summary on every rank."""
    started = time.perf_counter()
    device = _setup(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    if config.batch_size % world:
        raise ValueError(
            f"batch_size={config.batch_size} is the global batch and must divide among the {world} processes"
        )
    batch = config.batch_size // world
    run_dir = Path(run_dir)

    # -- rank 0 looks at the run folder and tells the others what it found ----------------------
    decision: Any = None
    if lead:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir / "config.json"
            if config_path.exists() and resume:
                saved = RunConfig.from_dict(json.loads(config_path.read_text()))
                if saved != config:
                    raise ValueError(f"{run_dir} holds a run with a different configuration; use another folder")
            _write_text(config_path, config.dumps())
            summary_path = run_dir / "summary.json"
            checkpoint_path = run_dir / CHECKPOINT
            if resume and summary_path.exists():
                decision = ("done", json.loads(summary_path.read_text()))
            elif resume and checkpoint_path.exists():
                state = load_checkpoint(checkpoint_path, map_location="cpu")
                if state.get("format") != _FORMAT:
                    raise ValueError(
                        f"{checkpoint_path} comes from a single-process run: resume it without torchrun, "
                        "or pass --restart"
                    )
                if state["world_size"] != world:
                    raise ValueError(
                        f"{checkpoint_path} was saved by {state['world_size']} processes; resume it on as "
                        f"many (this is {world}), or pass --restart"
                    )
                decision = ("resume", state)
            else:
                decision = ("fresh", None)
        except Exception as error:  # every rank must hear of it
            decision = ("error", f"{type(error).__name__}: {error}")
            _broadcast(decision)
            raise
    decision = _broadcast(decision)
    if decision[0] == "error":
        raise ValueError(f"rank 0 could not start the run: {decision[1]}")
    if decision[0] == "done":
        return decision[1]
    state = decision[1]

    torch.manual_seed(config.seed)
    data = load_run_data(config).to(device)
    n = data.num_train
    model = build_model(config.model, data.num_classes, data.in_channels, data.image_size).to(device)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu and config.amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu and config.amp else _nullcontext
    if state is not None:
        model.load_state_dict(state["model"])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    sampler_device = device if on_gpu and isample.cuda_available() else torch.device("cpu")
    sampler = make_distributed_sampler(config, n, sampler_device)
    # Each rank augments its own items: its own stream (rank 0's is the single-process one).
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 1_000_003 + 7_919 * rank)
    shuffle_generator = torch.Generator().manual_seed(config.seed + 2_000_003)  # shared: one global shuffle

    history: List[Dict[str, Any]] = []
    epoch, total_steps, best, best_epoch = 0, 0, -1.0, -1
    partial: Optional[_RankEpochState] = None
    uniform_order: Optional[torch.Tensor] = None
    checkpoint_path = run_dir / CHECKPOINT
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])  # a collective
        mine = state["ranks"][rank]
        augment_generator.set_state(mine["augment_generator"].cpu())
        torch.set_rng_state(mine["torch_rng"].cpu())
        shuffle_generator.set_state(state["shuffle_generator"].cpu())
        history, epoch, total_steps = state["history"], state["epoch"], state["total_steps"]
        best, best_epoch = state["best"], state["best_epoch"]
        if state.get("partial") is not None:
            partial = _RankEpochState(**state["partial"])
            if not lead:  # the global sums so far travel with rank 0 only
                partial.loss_sum, partial.correct, partial.seen = 0.0, 0, 0
            uniform_order = state.get("uniform_order")
        if lead:
            log(f"[{config.name}] resumed at epoch {epoch} on {world} processes"
                + (f", {partial.seen} items into it" if partial else ""))
        del state

    def flush(epoch_state: _RankEpochState, loss_sum: torch.Tensor, correct: torch.Tensor, items: int):
        """Add every rank's running sums since the last flush into the epoch state (a collective)."""
        sums = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(items), dtype=torch.float64,
                                                                              device=loss_sum.device)]).to(comm_device)
        dist.all_reduce(sums)
        sums = sums.cpu()
        epoch_state.loss_sum += float(sums[0])
        epoch_state.correct += int(sums[1])
        epoch_state.seen += int(sums[2])
        return torch.zeros_like(loss_sum), torch.zeros_like(correct), 0

    def save(epoch_state: Optional[_RankEpochState]) -> None:
        """A collective (every rank's random state goes to rank 0); rank 0 writes."""
        mine = {"augment_generator": augment_generator.get_state(), "torch_rng": torch.get_rng_state()}
        ranks: List[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        if not lead:
            return
        consumed = epoch_state.rank_seen if epoch_state is not None else None
        save_checkpoint(
            checkpoint_path,
            {
                "format": _FORMAT,
                "world_size": world,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": None if sampler is None else sampler.state_dict(consumed=consumed),
                "shuffle_generator": shuffle_generator.get_state(),
                "ranks": ranks,
                "history": history,
                "epoch": epoch,
                "total_steps": total_steps,
                "best": best,
                "best_epoch": best_epoch,
                "partial": None if epoch_state is None else asdict(epoch_state),
                "uniform_order": uniform_order if epoch_state is not None else None,
            },
        )

    def agree(*flags: bool) -> List[bool]:
        """Each flag, true on every rank when it is true on any (one small all-reduce)."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def sync_buffers() -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, for evaluation and saving."""
        for buffer in model.buffers():
            if buffer.is_floating_point() or buffer.dtype in (torch.int64, torch.int32):
                staged = buffer.data.to(comm_device)
                dist.broadcast(staged, src=0)
                buffer.data.copy_(staged)

    stop_reason = None
    last_checkpoint = time.perf_counter()
    images, labels = data.train_images, data.train_labels
    while epoch < config.max_epochs and stop_reason is None:
        state_e = partial or _RankEpochState()
        clock = _Clock(device, state_e.seconds)
        consumed_before = state_e.rank_seen
        # -- draw the epoch (sampling): this rank's shard of the global draw -----------------
        with clock.measure("sampling"):
            if sampler is None:
                if uniform_order is None or consumed_before == 0:
                    uniform_order = torch.randperm(n, generator=shuffle_generator)
                order = uniform_order[_shard_positions(n, world, rank)][consumed_before:].to(device)
            else:
                sampler.set_epoch(epoch)
                try:
                    order = torch.tensor(list(iter(sampler)), dtype=torch.int64).to(device)
                except ValueError as error:  # a GPU sampler reports rejected (NaN) updates here
                    stop_reason = f"diverged ({error})"
                    break
        epoch_length = consumed_before + order.numel()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        pending = 0  # this rank's items since the last flush
        bar = _progress(epoch_length * world, f"{config.name} epoch {epoch}", progress and lead)
        if bar is not None:
            bar.update(consumed_before * world)
        ddp.train()
        for start in range(0, order.numel(), batch):
            idx = order[start : start + batch]
            with clock.measure("training"):
                x = images[idx]
                if config.augment:
                    x = random_crop_flip(x, generator=augment_generator)
                x = normalize(x, data.mean, data.std)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                with autocast():
                    logits = ddp(x)
                losses = F.cross_entropy(logits.float(), y, reduction="none")
            weights = None
            if sampler is not None:
                with clock.measure("sampling"):
                    weights = sampler.weights(idx.to(sampler_device), dtype=losses.dtype, device=losses.device)
            with clock.measure("training"):
                loss = losses.mean() if weights is None else (losses * weights).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DistributedDataParallel averages the gradients over the ranks
                optimizer.step()
            if sampler is not None:
                with clock.measure("sampling"):
                    needs_logits = config.method in ("grad_norm", "early_importance")
                    extra = {"logits": logits.detach(), "targets": y} if needs_logits else {}
                    try:
                        sampler.update(idx.to(sampler_device), losses.detach(), **extra)  # a collective
                    except ValueError:
                        # The sampler raised on every rank; agree on whether a loss was non-finite.
                        (nonfinite,) = agree(not bool(torch.isfinite(losses).all()))
                        if not nonfinite:
                            raise
                        stop_reason = "diverged (non-finite loss)"
            loss_sum = loss_sum + losses.detach().double().sum()
            correct = correct + (logits.detach().argmax(1) == y).sum()
            pending += idx.numel()
            state_e.rank_seen += idx.numel()
            state_e.steps += 1
            total_steps += 1
            if bar is not None:
                bar.update(idx.numel() * world)
            elapsed = state_e.seconds["training"] + state_e.seconds["sampling"]
            out_of_time, checkpoint_due, wall_stop = agree(
                config.budget_seconds is not None and _train_seconds(history) + elapsed >= config.budget_seconds,
                time.perf_counter() - last_checkpoint > checkpoint_seconds and state_e.rank_seen < epoch_length,
                max_wall_seconds is not None and time.perf_counter() - started > max_wall_seconds,
            )
            if config.budget_steps is not None and total_steps >= config.budget_steps:
                stop_reason = "step budget"
            elif out_of_time:
                stop_reason = "time budget"
            if stop_reason:
                break
            if checkpoint_due:
                loss_sum, correct, pending = flush(state_e, loss_sum, correct, pending)
                save(state_e)
                last_checkpoint = time.perf_counter()
            if wall_stop:
                if bar is not None:
                    bar.close()
                loss_sum, correct, pending = flush(state_e, loss_sum, correct, pending)
                save(state_e)
                if lead:
                    log(f"[{config.name}] stopped after {max_wall_seconds:.0f} s in epoch {epoch}; resume to continue")
                return {"complete": False, "epoch": epoch}
        if bar is not None:
            bar.close()
        loss_sum, correct, pending = flush(state_e, loss_sum, correct, pending)
        if not math.isfinite(state_e.loss_sum) and stop_reason is None:
            stop_reason = "diverged (non-finite loss)"
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # -- evaluate (each rank a slice of the test set) ---------------------------------------
        with clock.measure("evaluation"):
            sync_buffers()
            test = _evaluate_sharded(model, data.test_images, data.test_labels, data,
                                     batch_size=config.eval_batch_size, autocast=autocast,
                                     channels_last=channels_last, comm_device=comm_device)
        seconds = torch.tensor([state_e.seconds[k] for k in ("training", "evaluation", "sampling")],
                               dtype=torch.float64, device=comm_device)
        dist.broadcast(seconds, src=0)  # the record keeps rank 0's wall-clock
        record: Dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "samples": state_e.seen,
            "steps": total_steps,
            "train_loss": state_e.loss_sum / max(1, state_e.seen),
            "train_accuracy": state_e.correct / max(1, state_e.seen),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "balanced_accuracy": test["balanced_accuracy"],
            "worst_class_accuracy": test["worst_class_accuracy"],
            "per_class_accuracy": test["per_class_accuracy"],
            "seconds": dict(zip(("training", "evaluation", "sampling"), seconds.cpu().tolist())),
        }
        if sampler is not None:
            record["sampler"] = {k: v for k, v in sampler.history[-1].items() if k != "epoch"}
            record["scores"] = score_snapshot(sampler.scores(), config.score_bins)
        history.append(record)
        if record["test_accuracy"] > best:
            best, best_epoch = record["test_accuracy"], epoch
        if lead:
            log(_epoch_line(config, record))
        epoch += 1
        partial, uniform_order = None, None
        if lead:
            _write_metrics(run_dir, history)
        if stop_reason is None and epoch - 1 - best_epoch >= config.patience:
            stop_reason = f"no better test accuracy for {config.patience} epochs"
        save(None)
        last_checkpoint = time.perf_counter()
    summary = summarize(config, history, stop_reason or "max_epochs")
    summary["device"] = str(device)
    summary["device_name"] = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    summary["isample_build"] = isample.build_info()
    summary["world_size"] = world
    summary["backend"] = str(dist.get_backend())
    if lead:
        _write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()  # every rank returns once the run folder is complete
    return summary
