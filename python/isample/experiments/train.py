"""The training loop of the experiments: the seed paper's Algorithm 1 with a real model.

The data set lives on the training device as uint8 tensors; each batch is gathered by the
sampler's indices, augmented there (random crop + flip, batched) and normalised, so the loop
is never input-bound. Per-example losses are weighted by the sampler's importance weights
and handed back to it. Every epoch appends one record (training loss and accuracy, test loss
and accuracy on the whole test set in eval mode, balanced and worst-class accuracy, a
histogram of the scores, and the wall-clock split into training / evaluation / sampling of
the seed paper's Appendix C) to ``metrics.jsonl`` and ``metrics.csv`` in the run folder,
and saves a checkpoint (atomically) from which ``resume=True`` continues, mid-epoch too.

Timing: on a GPU the sampler's calls are bracketed by synchronisations so the sampling share
is the sampler's own time (the syncs slow training a little; the share is what matters).

Under ``torchrun`` with several processes (``WORLD_SIZE > 1``) ``train`` hands the run to
:mod:`isample.experiments.distributed_run` (DistributedImportanceSampler, DDP, rank 0 writes);
one process never leaves this module.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import isample

from ..checkpoint import load_checkpoint, save_checkpoint
from .augment import normalize, random_crop_flip
from .config import RunConfig
from .data import Dataset, load_dataset, long_tailed, subset
from .models import build_model

__all__ = ["train", "evaluate", "class_accuracy", "load_run_data", "resolve_device"]

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no GPU")
    return device


def load_run_data(config: RunConfig) -> Dataset:
    """The configuration's data set: long-tailed and/or subsetted as asked (seeded)."""
    data = load_dataset(config.dataset, config.data_dir)
    if config.imbalance_ratio > 1.0:
        data = long_tailed(data, config.imbalance_ratio, seed=config.seed)
    if config.train_subset or config.test_subset:
        data = subset(data, config.train_subset, config.test_subset, seed=config.seed)
    return data


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
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=images.device)
    predictions = torch.empty_like(labels)
    for start in range(0, labels.shape[0], batch_size):
        x = normalize(images[start : start + batch_size], data.mean, data.std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        y = labels[start : start + batch_size]
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        predictions[start : start + batch_size] = logits.argmax(1)
    model.train(was_training)
    per_class = class_accuracy(predictions, labels, data.num_classes)
    present = per_class[~torch.isnan(per_class)]
    return {
        "loss": float(total_loss) / labels.shape[0],
        "accuracy": float((predictions == labels).double().mean()),
        "balanced_accuracy": float(present.mean()),
        "worst_class_accuracy": float(present.min()),
        "per_class_accuracy": [None if math.isnan(a) else float(a) for a in per_class.tolist()],
    }


def make_sampler(config: RunConfig, num_items: int, device: torch.device) -> Optional[isample.EpochSampler]:
    """The configuration's sampler; None for uniform (a plain shuffle each epoch)."""
    if config.method == "uniform":
        return None
    if config.method == "infobatch":
        return isample.SoftPruningSampler(
            num_items, num_epochs=config.max_epochs, prune_ratio=config.prune_ratio,
            anneal_fraction=config.anneal_fraction, seed=config.seed, device=device,
        )
    score = {
        "last_loss": lambda: isample.LastLoss(),
        "running_loss": lambda: isample.RunningLoss(config.beta),
        "grad_norm": lambda: isample.GradNormBound(),
        "early_importance": lambda: isample.EarlyImportance(num_items, config.importance_epochs),
    }[config.method]()
    # The third seed samples in proportion to its importance; the others use the paper's softmax.
    transform = isample.Proportional(1.0, 1e-6) if config.method == "early_importance" else isample.Softmax(config.temperature)
    return isample.ImportanceSampler(
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


def score_snapshot(scores: torch.Tensor, bins: int) -> Dict[str, Any]:
    """A histogram and quantiles of the scores, for the score-distribution figures."""
    values = scores.double().cpu()
    finite = values[torch.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    counts = torch.histc(finite, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
    q = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0], dtype=torch.float64)
    return {
        "min": lo,
        "max": hi,
        "mean": float(finite.mean()),
        "std": float(finite.std()) if finite.numel() > 1 else 0.0,
        "quantiles": dict(zip([f"{x:g}" for x in q.tolist()], torch.quantile(finite, q).tolist())),
        "histogram": counts.long().tolist(),
    }


@dataclass
class _EpochState:
    """The part of an epoch in progress that a mid-epoch checkpoint must keep."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    seconds: Dict[str, float] = field(default_factory=lambda: {"training": 0.0, "evaluation": 0.0, "sampling": 0.0})


class _Clock:
    """Accumulates wall-clock per phase; on a GPU, synchronises at the phase boundaries."""

    def __init__(self, device: torch.device, seconds: Dict[str, float]) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = seconds

    def measure(self, phase: str):
        clock = self

        class _Phase:
            def __enter__(self):
                clock.sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.sync()
                clock.seconds[phase] += time.perf_counter() - self.start

        return _Phase()


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)


def train(
    config: RunConfig,
    run_dir: os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
    log: Callable[[str], None] = print,
    max_wall_seconds: Optional[float] = None,
) -> Dict[str, Any]:
    """Run (or continue) one training run in `run_dir`; returns its summary.

    Args:
        config: the run.
        run_dir: its folder (created); holds config.json, metrics.jsonl/.csv, checkpoint.pt
            and, when the run is complete, summary.json.
        resume: continue from run_dir's checkpoint if there is one (its config must match).
        progress: a progress bar per epoch (tqdm) on the terminal.
        checkpoint_seconds: also checkpoint mid-epoch this often (a GPU command may be cut
            after 10 minutes; resuming then loses at most this much work).
        log: where the one-line-per-epoch report goes.
        max_wall_seconds: stop (after a checkpoint) once this much wall-clock has passed in
            this call; the run is then incomplete and ``resume=True`` continues it.

    Under torchrun with WORLD_SIZE > 1 every process calls this and the run goes to
    ``distributed_run.train_distributed`` (same arguments and result; rank 0 writes).
    """
    if _world_size() > 1:
        from .distributed_run import train_distributed

        return train_distributed(config, run_dir, resume=resume, progress=progress,
                                 checkpoint_seconds=checkpoint_seconds, log=log, max_wall_seconds=max_wall_seconds)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if config_path.exists() and resume:
        saved = RunConfig.from_dict(json.loads(config_path.read_text()))
        if saved != config:
            raise ValueError(f"{run_dir} holds a run with a different configuration; use another folder")
    _write_text(config_path, config.dumps())
    summary_path = run_dir / "summary.json"
    if resume and summary_path.exists():
        return json.loads(summary_path.read_text())

    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    data = load_run_data(config).to(device)
    n = data.num_train
    model = build_model(config.model, data.num_classes, data.in_channels, data.image_size).to(device)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu and config.amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu and config.amp else _nullcontext
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    sampler_device = device if on_gpu and isample.cuda_available() else torch.device("cpu")
    sampler = make_sampler(config, n, sampler_device)
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 1_000_003)
    shuffle_generator = torch.Generator().manual_seed(config.seed + 2_000_003)

    history: List[Dict[str, Any]] = []
    epoch, total_steps, best, best_epoch = 0, 0, -1.0, -1
    partial: Optional[_EpochState] = None
    uniform_order: Optional[torch.Tensor] = None
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])
        augment_generator.set_state(state["augment_generator"].cpu())
        shuffle_generator.set_state(state["shuffle_generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        history, epoch, total_steps = state["history"], state["epoch"], state["total_steps"]
        best, best_epoch = state["best"], state["best_epoch"]
        if state.get("partial") is not None:
            partial = _EpochState(**state["partial"])
            uniform_order = state.get("uniform_order")
        log(f"[{config.name}] resumed at epoch {epoch}" + (f", {partial.seen} items into it" if partial else ""))

    def flush(state: _EpochState, loss_sum: torch.Tensor, correct: torch.Tensor):
        """Move the device-side running sums into the epoch state (one synchronisation)."""
        state.loss_sum += float(loss_sum)
        state.correct += int(correct)
        return torch.zeros_like(loss_sum), torch.zeros_like(correct)

    def save(epoch_state: Optional[_EpochState], consumed: int = 0) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": None if sampler is None else sampler.state_dict(consumed=consumed if epoch_state else None),
                "augment_generator": augment_generator.get_state(),
                "shuffle_generator": shuffle_generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "epoch": epoch,
                "total_steps": total_steps,
                "best": best,
                "best_epoch": best_epoch,
                "partial": None if epoch_state is None else epoch_state.__dict__,
                "uniform_order": uniform_order if epoch_state is not None else None,
            },
        )

    stop_reason = None
    last_checkpoint = time.perf_counter()
    images, labels = data.train_images, data.train_labels
    while epoch < config.max_epochs and stop_reason is None:
        state = partial or _EpochState()
        clock = _Clock(device, state.seconds)
        consumed_before = state.seen
        # -- draw the epoch (sampling) ----------------------------------------------------
        with clock.measure("sampling"):
            if sampler is None:
                if uniform_order is None or consumed_before == 0:
                    uniform_order = torch.randperm(n, generator=shuffle_generator)
                order = uniform_order[consumed_before:].to(device)
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
        bar = _progress(epoch_length, f"{config.name} epoch {epoch}", progress)
        if bar is not None:
            bar.update(consumed_before)
        model.train()
        for start in range(0, order.numel(), config.batch_size):
            idx = order[start : start + config.batch_size]
            with clock.measure("training"):
                x = images[idx]
                if config.augment:
                    x = random_crop_flip(x, generator=augment_generator)
                x = normalize(x, data.mean, data.std)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                with autocast():
                    logits = model(x)
                losses = F.cross_entropy(logits.float(), y, reduction="none")
            weights = None
            if sampler is not None:
                with clock.measure("sampling"):
                    weights = sampler.weights(idx.to(sampler_device), dtype=losses.dtype, device=losses.device)
            with clock.measure("training"):
                loss = losses.mean() if weights is None else (losses * weights).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if sampler is not None:
                with clock.measure("sampling"):
                    needs_logits = config.method in ("grad_norm", "early_importance")
                    extra = {"logits": logits.detach(), "targets": y} if needs_logits else {}
                    try:
                        sampler.update(idx.to(sampler_device), losses.detach(), **extra)
                    except ValueError:
                        if bool(torch.isfinite(losses).all()):
                            raise
                        stop_reason = "diverged (non-finite loss)"
            # Running sums stay on the device: reading them every step would synchronise a GPU.
            loss_sum = loss_sum + losses.detach().double().sum()
            correct = correct + (logits.detach().argmax(1) == y).sum()
            state.seen += idx.numel()
            state.steps += 1
            total_steps += 1
            if bar is not None:
                bar.update(idx.numel())
                if state.steps % 20 == 1:
                    bar.set_postfix(loss=f"{(state.loss_sum + float(loss_sum)) / state.seen:.3f}",
                                    acc=f"{(state.correct + int(correct)) / state.seen:.3f}")
            elapsed = state.seconds["training"] + state.seconds["sampling"]
            if config.budget_steps is not None and total_steps >= config.budget_steps:
                stop_reason = "step budget"
            elif config.budget_seconds is not None and _train_seconds(history) + elapsed >= config.budget_seconds:
                stop_reason = "time budget"
            if stop_reason:
                break
            if time.perf_counter() - last_checkpoint > checkpoint_seconds and state.seen < epoch_length:
                loss_sum, correct = flush(state, loss_sum, correct)
                save(state, consumed=state.seen)
                last_checkpoint = time.perf_counter()
            if max_wall_seconds is not None and time.perf_counter() - started > max_wall_seconds:
                if bar is not None:
                    bar.close()
                loss_sum, correct = flush(state, loss_sum, correct)
                save(state, consumed=state.seen)
                log(f"[{config.name}] stopped after {max_wall_seconds:.0f} s in epoch {epoch}; resume to continue")
                return {"complete": False, "epoch": epoch}
        if bar is not None:
            bar.close()
        loss_sum, correct = flush(state, loss_sum, correct)
        if not math.isfinite(state.loss_sum) and stop_reason is None:
            stop_reason = "diverged (non-finite loss)"
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # -- evaluate ---------------------------------------------------------------------
        with clock.measure("evaluation"):
            test = evaluate(model, data.test_images, data.test_labels, data, batch_size=config.eval_batch_size,
                            autocast=autocast, channels_last=channels_last)
        record: Dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "samples": state.seen,
            "steps": total_steps,
            "train_loss": state.loss_sum / max(1, state.seen),
            "train_accuracy": state.correct / max(1, state.seen),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "balanced_accuracy": test["balanced_accuracy"],
            "worst_class_accuracy": test["worst_class_accuracy"],
            "per_class_accuracy": test["per_class_accuracy"],
            "seconds": dict(state.seconds),
        }
        if sampler is not None:
            record["sampler"] = {k: v for k, v in sampler.history[-1].items() if k != "epoch"}
            record["scores"] = score_snapshot(sampler.scores(), config.score_bins)
        history.append(record)
        if record["test_accuracy"] > best:
            best, best_epoch = record["test_accuracy"], epoch
        log(_epoch_line(config, record))
        epoch += 1
        partial, uniform_order = None, None
        _write_metrics(run_dir, history)
        if stop_reason is None and epoch - 1 - best_epoch >= config.patience:
            stop_reason = f"no better test accuracy for {config.patience} epochs"
        save(None)
        last_checkpoint = time.perf_counter()
    summary = summarize(config, history, stop_reason or "max_epochs")
    summary["device"] = str(device)
    summary["device_name"] = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    summary["isample_build"] = isample.build_info()
    _write_text(summary_path, json.dumps(summary, indent=2))
    return summary


def summarize(config: RunConfig, history: List[Dict[str, Any]], stop_reason: str) -> Dict[str, Any]:
    """Best and final test accuracy, when the target was reached, and the time split."""
    seconds = {k: sum(r["seconds"][k] for r in history) for k in ("training", "evaluation", "sampling")}
    best = max(history, key=lambda r: r["test_accuracy"]) if history else None
    reached = None
    if config.target_accuracy is not None:
        elapsed = 0.0
        for r in history:
            elapsed += r["seconds"]["training"] + r["seconds"]["sampling"]
            if r["test_accuracy"] >= config.target_accuracy:
                # "epoch" is the record's 0-based epoch index; "epochs" how many were trained.
                reached = {"epoch": r["epoch"], "epochs": r["epoch"] + 1, "steps": r["steps"], "train_seconds": elapsed}
                break
    total = sum(seconds.values())
    return {
        "complete": True,
        "name": config.name,
        "config": config.to_dict(),
        "stop_reason": stop_reason,
        "epochs": len(history),
        "steps": history[-1]["steps"] if history else 0,
        "best_test_accuracy": best["test_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "final_balanced_accuracy": history[-1]["balanced_accuracy"] if history else None,
        "final_worst_class_accuracy": history[-1]["worst_class_accuracy"] if history else None,
        "target_accuracy": config.target_accuracy,
        "target_reached": reached,
        "seconds": seconds,
        "sampling_share": seconds["sampling"] / total if total else 0.0,
    }


def _world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 when unset or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def _train_seconds(history: List[Dict[str, Any]]) -> float:
    return sum(r["seconds"]["training"] + r["seconds"]["sampling"] for r in history)


def _epoch_line(config: RunConfig, r: Dict[str, Any]) -> str:
    s = r["seconds"]
    return (
        f"[{config.name}] epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}  "
        f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f}  ({r['samples']} samples; "
        f"train {s['training']:.1f}s, eval {s['evaluation']:.1f}s, sampling {s['sampling']:.2f}s)"
    )


CSV_FIELDS = [
    "epoch", "lr", "samples", "steps", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
    "balanced_accuracy", "worst_class_accuracy", "seconds_training", "seconds_evaluation", "seconds_sampling",
]


def _write_metrics(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    """metrics.jsonl (everything) and metrics.csv (the scalars), rewritten atomically."""
    _write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in history:
        row = {k: r[k] for k in CSV_FIELDS if k in r}
        row.update({f"seconds_{k}": v for k, v in r["seconds"].items()})
        writer.writerow(row)
    _write_text(run_dir / "metrics.csv", buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_history(run_dir: os.PathLike) -> List[Dict[str, Any]]:
    """The per-epoch records of a run folder."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

