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

Everything that differs between one process and several the loop asks of its *world*
(:mod:`isample.experiments.world`): in one process ``OneProcess``, which communicates nothing;
under ``torchrun`` (``WORLD_SIZE > 1``) ``distributed_run.DistributedWorld``
(DistributedImportanceSampler, DDP, rank 0 writes; optionally scorer ranks).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import isample

from ..checkpoint import load_checkpoint, save_checkpoint
from .augment import normalize, random_crop_flip
from .config import RunConfig
from .data import Dataset, load_dataset, long_tailed, subset
from .evaluation import class_accuracy, evaluate
from .models import build_model
from .world import OneProcess, make_world, resolve_device

__all__ = ["train", "evaluate", "class_accuracy", "load_run_data", "resolve_device"]

CHECKPOINT = "checkpoint.pt"


def load_run_data(config: RunConfig) -> Dataset:
    """The configuration's data set: long-tailed and/or subsetted as asked (seeded)."""
    data = load_dataset(config.dataset, config.data_dir)
    if config.imbalance_ratio > 1.0:
        data = long_tailed(data, config.imbalance_ratio, seed=config.seed)
    if config.train_subset or config.test_subset:
        data = subset(data, config.train_subset, config.test_subset, seed=config.seed)
    return data


def make_sampler(
    config: RunConfig, num_items: int, device: torch.device, importance_sampler: Callable[..., Any] = isample.ImportanceSampler,
) -> Optional[isample.EpochSampler]:
    """The configuration's sampler; None for uniform (a plain shuffle each epoch).
    `importance_sampler` builds the importance-sampling methods' sampler (under torchrun, the
    distributed one, which takes the same arguments)."""
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
    # The third seed samples in proportion to its importance; the others default to the paper's softmax.
    form = config.transform or ("proportional" if config.method == "early_importance" else "softmax")
    transform = isample.Proportional(1.0, 1e-6) if form == "proportional" else isample.Softmax(config.temperature)
    samples = epoch_draws(config, num_items)
    if not config.replacement and samples > num_items:
        raise ValueError(f"epoch_steps={config.epoch_steps} × batch_size={config.batch_size} = {samples} draws exceed the "
                         f"{num_items} items, which drawing without replacement cannot do: use replacement=True")
    return importance_sampler(
        num_items,
        score=score,
        transform=transform,
        samples_per_epoch=samples,
        replacement=config.replacement,
        warmup_epochs=config.warmup_epochs,
        weighting=config.weighting,
        uniform_mix=config.uniform_mix,
        initial_score=config.initial_score,
        seed=config.seed,
        device=device,
    )


def epoch_draws(config: RunConfig, num_items: int) -> int:
    """|Z|, the draws of an importance epoch: epoch_steps × batch_size, else samples_fraction × N."""
    if config.epoch_steps is not None:
        return config.epoch_steps * config.batch_size
    return max(1, round(config.samples_fraction * num_items))


class UniformStream:
    """Uniform sampling cut into epochs of `length` items: one continuing shuffled stream (a
    new permutation of the N items whenever the last one is used up), so the order is plain
    shuffled SGD and only the epoch boundaries (where the run evaluates) move."""

    def __init__(self, num_items: int, length: int, generator: torch.Generator) -> None:
        self.num_items, self.length, self.generator = num_items, length, generator
        self.permutation = torch.empty(0, dtype=torch.int64)
        self.position = 0

    def next_epoch(self) -> torch.Tensor:
        parts, needed = [], self.length
        while needed:
            if self.position == self.permutation.numel():
                self.permutation, self.position = torch.randperm(self.num_items, generator=self.generator), 0
            take = min(needed, self.permutation.numel() - self.position)
            parts.append(self.permutation[self.position : self.position + take])
            self.position += take
            needed -= take
        return torch.cat(parts)

    def state_dict(self) -> Dict[str, Any]:
        return {"permutation": self.permutation, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.permutation, self.position = state["permutation"].cpu(), int(state["position"])


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
    """The part of an epoch in progress that a mid-epoch checkpoint must keep.

    loss_sum, correct and seen are totals over all processes up to the last flush (under
    torchrun rank 0 carries them across a resume); rank_seen and steps are this process's.
    """

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    rank_seen: int = 0
    steps: int = 0
    cpu_seconds: float = 0.0  # this process's CPU time in training and sampling (evaluation left out)
    weight_sum: float = 0.0  # the importance weights of the items trained on (their mean: the epoch's
    weight_max: float = 0.0  # effective learning-rate multiplier), this process's
    seconds: Dict[str, float] = field(default_factory=lambda: {"training": 0.0, "evaluation": 0.0, "sampling": 0.0})

    @classmethod
    def restore(cls, saved: Dict[str, Any]) -> "_EpochState":
        # Checkpoints from before rank_seen existed are single-process ones, where it is seen.
        return cls(**{"rank_seen": saved["seen"], **saved})


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


def _open_run(config: RunConfig, run_dir: Path, resume: bool, world: OneProcess, device: torch.device):
    """Check and prepare the run folder: ("done", summary), ("resume", checkpoint) or ("fresh", None)."""
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
        return "done", json.loads(summary_path.read_text())
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=world.checkpoint_location(device))
        saved_by, saved_scorers = state.get("world_size", 1), state.get("scorer_ranks", 0)
        if saved_scorers != world.scorer_ranks:
            raise ValueError(f"{checkpoint_path} was saved with {saved_scorers} scorer rank(s); resume it with "
                             f"--scorer-ranks {saved_scorers} (this is {world.scorer_ranks}), or pass --restart")
        if saved_by != world.size:
            if saved_by == 1:
                raise ValueError(f"{checkpoint_path} comes from a single-process run: resume it without torchrun, "
                                 "or pass --restart")
            raise ValueError(f"{checkpoint_path} was saved by {saved_by} processes; resume it on as many "
                             f"(this is {world.size}), or pass --restart")
        return "resume", state
    return "fresh", None


def train(
    config: RunConfig,
    run_dir: os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
    log: Callable[[str], None] = print,
    max_wall_seconds: Optional[float] = None,
    scorer_ranks: int = 0,
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
        scorer_ranks: under torchrun, the job's last this many ranks serve scores to the
            others (the second seed's scoring workers as ranks: methods grad_norm and
            last_loss, no local ``scorers``); 0: every rank trains.

    Under torchrun with WORLD_SIZE > 1 every process calls this with the same arguments and
    gets the same summary; the loop then runs in a ``distributed_run.DistributedWorld`` and
    rank 0 writes.
    """
    started = time.perf_counter()
    world = make_world(scorer_ranks)
    device = world.setup(config)
    run_dir = Path(run_dir)
    outcome, saved = world.on_lead(lambda: _open_run(config, run_dir, resume, world, device))
    if outcome == "done":
        return saved
    batch_size = world.batch_size(config)

    torch.manual_seed(config.seed)
    data = load_run_data(config).to(device)
    n = data.num_train
    model = build_model(config.model, data.num_classes, data.in_channels, data.image_size).to(device)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu and config.amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu and config.amp else _nullcontext
    if world.serves:  # a scorer rank: its parameters come from the lead's publishes
        return world.serve(config, data, model)
    if saved is not None:
        model.load_state_dict(saved["model"])  # before wrapping: DDP starts every rank from rank 0's weights
    net = world.wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    sampler_device = device if on_gpu and isample.cuda_available() else torch.device("cpu")
    sampler = make_sampler(config, n, sampler_device, importance_sampler=world.importance_sampler(config))
    # Each process augments its own items, so each has its own stream (rank 0's is the
    # single-process one); the shuffle is one global order, so its seed is shared.
    augment_generator = torch.Generator(device=device).manual_seed(config.seed + 1_000_003 + 7_919 * world.rank)
    shuffle_generator = torch.Generator().manual_seed(config.seed + 2_000_003)
    # uniform sampling with epoch_steps: one shuffled stream cut into epochs of that many steps
    stream = UniformStream(n, epoch_draws(config, n), shuffle_generator) if sampler is None and config.epoch_steps else None
    snapshots = set(config.snapshot_steps)
    scorer_state: Optional[Dict[str, Any]] = None  # the scoring workers' ledger, when the run resumes
    epoch_q: Optional[torch.Tensor] = None  # with snapshots: the q this epoch was drawn from (None: uniform)

    history: List[Dict[str, Any]] = []
    epoch, total_steps, best, best_epoch = 0, 0, -1.0, -1
    partial: Optional[_EpochState] = None
    uniform_order: Optional[torch.Tensor] = None
    checkpoint_path = run_dir / CHECKPOINT
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if sampler is not None:
            sampler.load_state_dict(saved["sampler"])  # under torchrun, a collective
        mine = world.random_state(saved)
        augment_generator.set_state(mine["augment_generator"].cpu())
        torch.set_rng_state(mine["torch_rng"].cpu())
        shuffle_generator.set_state(saved["shuffle_generator"].cpu())
        history, epoch, total_steps = saved["history"], saved["epoch"], saved["total_steps"]
        best, best_epoch = saved["best"], saved["best_epoch"]
        if stream is not None and saved.get("uniform_stream") is not None:
            stream.load_state_dict(saved["uniform_stream"])
        epoch_q = saved.get("epoch_q")
        scorer_state = saved.get("scorers")
        if saved.get("partial") is not None:
            partial = _EpochState.restore(saved["partial"])
            if not world.lead:  # the totals so far are counted once, by the lead process
                partial.loss_sum, partial.correct, partial.seen = 0.0, 0, 0
            uniform_order = saved.get("uniform_order")
        if world.lead:
            log(f"[{config.name}] resumed at epoch {epoch}{world.where}"
                + (f", {partial.seen} items into it" if partial else ""))
        del saved

    cpu_mark = time.process_time()

    def flush(state: _EpochState, loss_sum: torch.Tensor, correct: torch.Tensor, items: int):
        """Add the running sums since the last flush (of every process) into the epoch state:
        one synchronisation, and under torchrun a collective."""
        nonlocal cpu_mark
        now = time.process_time()
        state.cpu_seconds += now - cpu_mark
        cpu_mark = now
        sums = torch.stack([loss_sum.double(), correct.double(),
                            torch.tensor(float(items), dtype=torch.float64, device=loss_sum.device)])
        loss, hits, seen = world.sum(sums).tolist()
        state.loss_sum += loss
        state.correct += int(hits)
        state.seen += int(seen)
        return torch.zeros_like(loss_sum), torch.zeros_like(correct), 0

    def keep_weights(state: _EpochState, weight_sum: torch.Tensor, weight_max: torch.Tensor):
        """Add this process's weight sums since the last call into the epoch state (one sync)."""
        total, largest = torch.stack([weight_sum, weight_max]).tolist()
        state.weight_sum += total
        state.weight_max = max(state.weight_max, largest)
        return torch.zeros_like(weight_sum), torch.zeros_like(weight_max)

    def save(epoch_state: Optional[_EpochState]) -> None:
        """Under torchrun a collective (every rank's random state goes to rank 0, which writes)."""
        random_state = world.gather_random_state(
            {"augment_generator": augment_generator.get_state(), "torch_rng": torch.get_rng_state()})
        if not world.lead:
            return
        consumed = None if epoch_state is None else epoch_state.rank_seen
        save_checkpoint(
            checkpoint_path,
            {
                **world.checkpoint_tag(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": None if sampler is None else sampler.state_dict(consumed=consumed),
                **random_state,
                "shuffle_generator": shuffle_generator.get_state(),
                "history": history,
                "epoch": epoch,
                "total_steps": total_steps,
                "best": best,
                "best_epoch": best_epoch,
                "partial": None if epoch_state is None else asdict(epoch_state),
                "uniform_order": uniform_order if epoch_state is not None else None,
                "uniform_stream": None if stream is None else stream.state_dict(),
                "epoch_q": epoch_q,
                "scorers": None if scorers is None else scorers.state_dict(),
            },
        )

    stop_reason = None
    last_checkpoint = time.perf_counter()
    images, labels = data.train_images, data.train_labels
    scorers = world.make_scorers(config, data, model, sampler, scorer_state)
    stopped_mid_epoch = False  # the last epoch ended before its last batch (a step budget)
    try:
        while epoch < config.max_epochs and stop_reason is None:
            state = partial or _EpochState()
            clock = _Clock(device, state.seconds)
            consumed_before = state.rank_seen
            # -- draw the epoch (sampling): this process's part of the global draw -----------------
            with clock.measure("sampling"):
                if sampler is None:
                    if uniform_order is None or consumed_before == 0:
                        uniform_order = stream.next_epoch() if stream else torch.randperm(n, generator=shuffle_generator)
                    order = world.shard(uniform_order)[consumed_before:].to(device)
                else:
                    sampler.set_epoch(epoch)
                    try:
                        order = torch.tensor(list(iter(sampler)), dtype=torch.int64).to(device)
                    except ValueError as error:  # a GPU sampler reports rejected (NaN) updates here
                        stop_reason = f"diverged ({error})"
                        break
                    if snapshots and consumed_before == 0:
                        epoch_q = _drawn_from(sampler)
            epoch_length = consumed_before + order.numel()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            weight_sum = torch.zeros((), dtype=torch.float64, device=device)
            weight_max = torch.zeros((), dtype=torch.float64, device=device)
            pending = 0  # this process's items since the last flush
            bar = _progress(epoch_length * world.size, f"{config.name} epoch {epoch}", progress and world.lead)
            if bar is not None:
                bar.update(consumed_before * world.size)
            net.train()
            for start in range(0, order.numel(), batch_size):
                idx = order[start : start + batch_size]
                if total_steps in snapshots:  # the parameters and the q this step's batch comes from
                    if world.lead:  # rank 0 writes (with scorer ranks only its item_versions are complete)
                        _save_snapshot(run_dir, total_steps, model, epoch_q, scorers)
                    snapshots.discard(total_steps)
                with clock.measure("training"):
                    x = images[idx]
                    if config.augment:
                        x = random_crop_flip(x, generator=augment_generator)
                    x = normalize(x, data.mean, data.std)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = labels[idx]
                    with autocast():
                        logits = net(x)
                    losses = F.cross_entropy(logits.float(), y, reduction="none")
                weights = None
                if sampler is not None:
                    with clock.measure("sampling"):
                        weights = sampler.weights(idx.to(sampler_device), dtype=losses.dtype, device=losses.device)
                    weight_sum = weight_sum + weights.detach().double().sum()  # on the device: no sync
                    weight_max = torch.maximum(weight_max, weights.detach().double().max())
                with clock.measure("training"):
                    loss = losses.mean() if weights is None else (losses * weights).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # under torchrun DistributedDataParallel averages the gradients
                    optimizer.step()
                if scorers is not None:
                    with clock.measure("sampling"):
                        scorers.step(model)  # publish when due; apply the workers' scores (never waits)
                elif sampler is not None:
                    with clock.measure("sampling"):
                        needs_logits = config.method in ("grad_norm", "early_importance")
                        extra = {"logits": logits.detach(), "targets": y} if needs_logits else {}
                        try:
                            sampler.update(idx.to(sampler_device), losses.detach(), **extra)  # under torchrun a collective
                        except ValueError:
                            # A distributed sampler raised on every rank: they agree on whether a loss was non-finite.
                            (nonfinite,) = world.agree(not bool(torch.isfinite(losses).all()))
                            if not nonfinite:
                                raise
                            stop_reason = "diverged (non-finite loss)"
                # Running sums stay on the device: reading them every step would synchronise a GPU.
                loss_sum = loss_sum + losses.detach().double().sum()
                correct = correct + (logits.detach().argmax(1) == y).sum()
                pending += idx.numel()
                state.rank_seen += idx.numel()
                state.steps += 1
                total_steps += 1
                if bar is not None:
                    bar.update(idx.numel() * world.size)
                    if world.size == 1 and state.steps % 20 == 1:  # under torchrun the running sums are one rank's
                        bar.set_postfix(loss=f"{(state.loss_sum + float(loss_sum)) / state.rank_seen:.3f}",
                                        acc=f"{(state.correct + int(correct)) / state.rank_seen:.3f}")
                elapsed = state.seconds["training"] + state.seconds["sampling"]
                # Decisions on the clock differ between processes: they are agreed, so all stop or save together.
                out_of_time, checkpoint_due, wall_stop = world.agree(
                    config.budget_seconds is not None and _train_seconds(history) + elapsed >= config.budget_seconds,
                    time.perf_counter() - last_checkpoint > checkpoint_seconds and state.rank_seen < epoch_length,
                    max_wall_seconds is not None and time.perf_counter() - started > max_wall_seconds,
                )
                if config.budget_steps is not None and total_steps >= config.budget_steps:
                    stop_reason = "step budget"
                elif out_of_time:
                    stop_reason = "time budget"
                if stop_reason:
                    break
                if checkpoint_due:
                    weight_sum, weight_max = keep_weights(state, weight_sum, weight_max)
                    loss_sum, correct, pending = flush(state, loss_sum, correct, pending)
                    save(state)
                    last_checkpoint = time.perf_counter()
                if wall_stop:
                    if bar is not None:
                        bar.close()
                    weight_sum, weight_max = keep_weights(state, weight_sum, weight_max)
                    loss_sum, correct, pending = flush(state, loss_sum, correct, pending)
                    save(state)
                    if world.lead:
                        log(f"[{config.name}] stopped after {max_wall_seconds:.0f} s in epoch {epoch}; resume to continue")
                    if scorers is not None:
                        scorers.close()  # before finish: scorer ranks return only once the pool is closed
                    return world.finish({"complete": False, "epoch": epoch})
            if bar is not None:
                bar.close()
            stopped_mid_epoch = state.rank_seen < epoch_length
            weight_sum, weight_max = keep_weights(state, weight_sum, weight_max)
            loss_sum, correct, pending = flush(state, loss_sum, correct, pending)
            if not math.isfinite(state.loss_sum) and stop_reason is None:
                stop_reason = "diverged (non-finite loss)"
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            # -- evaluate ---------------------------------------------------------------------
            with clock.measure("evaluation"):
                test = world.evaluate(model, data, batch_size=config.eval_batch_size, autocast=autocast,
                                      channels_last=channels_last)
            cpu_mark = time.process_time()  # the evaluation's CPU time is not the method's
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
                "seconds": world.lead_seconds(state.seconds),
                "cpu_seconds": state.cpu_seconds,
            }
            if scorers is not None:
                record["scorers"] = scorers.record()
            if sampler is not None:
                record["sampler"] = {k: v for k, v in sampler.history[-1].items() if k != "epoch"}
                # the weights of the items trained on: their mean scales the epoch's step size
                record["weights"] = {"mean": state.weight_sum / max(1, state.rank_seen), "max": state.weight_max}
                record["scores"] = score_snapshot(sampler.scores(), config.score_bins)
            history.append(record)
            if record["test_accuracy"] > best:
                best, best_epoch = record["test_accuracy"], epoch
            if world.lead:
                log(_epoch_line(config, record))
            epoch += 1
            partial, uniform_order = None, None
            if world.lead:
                _write_metrics(run_dir, history)
            if stop_reason is None and epoch - 1 - best_epoch >= config.patience:
                stop_reason = f"no better test accuracy for {config.patience} epochs"
            save(None)
            last_checkpoint = time.perf_counter()
        if total_steps in snapshots and world.lead:  # the end: the q the next step would be drawn from
            _save_snapshot(run_dir, total_steps, model, epoch_q if stopped_mid_epoch else _next_q(sampler, epoch), scorers)
    finally:
        if scorers is not None:
            scorers.close()  # no worker outlives the run, whatever ends it
    summary = summarize(config, history, stop_reason or "max_epochs")
    if config.train_eval:
        whole = evaluate(model, data.train_images, data.train_labels, data, batch_size=config.eval_batch_size,
                         autocast=autocast, channels_last=channels_last)
        summary["train_eval"] = {"loss": whole["loss"], "accuracy": whole["accuracy"]}
    summary["device"] = str(device)
    summary["device_name"] = torch.cuda.get_device_name(device) if on_gpu else _cpu_name()
    summary["isample_build"] = isample.build_info()
    summary.update(world.summary_extras())
    if world.lead:
        _write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return world.finish(summary)


def _drawn_from(sampler: Any) -> Optional[torch.Tensor]:
    """The q the epoch just drawn came from (float64, N), None for a uniform (warm-up) epoch."""
    if sampler.history and sampler.history[-1].get("kind") == "warmup":
        return None
    probabilities = getattr(sampler, "probabilities", None)
    return None if probabilities is None else probabilities().cpu()


def _next_q(sampler: Any, epoch: int) -> Optional[torch.Tensor]:
    """The q that epoch `epoch` would be drawn from now (None: uniform)."""
    if sampler is None or epoch < getattr(sampler, "warmup_epochs", 0):
        return None
    probabilities = getattr(sampler, "probabilities", None)
    return None if probabilities is None else probabilities().cpu()


def _save_snapshot(run_dir: Path, step: int, model: torch.nn.Module, q: Optional[torch.Tensor], scorers: Any) -> None:
    """snapshots/step{step}.pt: the parameters after `step` steps, the q that step + 1 draws
    from (None: uniform) and, with scoring workers, the step behind each item's score."""
    save_checkpoint(
        run_dir / "snapshots" / f"step{step:06d}.pt",
        {
            "step": step,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "q": q,
            "item_versions": None if scorers is None else scorers.item_versions(),
        },
    )


def load_snapshot(run_dir: os.PathLike, step: int) -> Dict[str, Any]:
    """A snapshot saved at `step` (RunConfig.snapshot_steps): "model" (state dict), "q" (the
    q that step + 1 draws from; None: uniform) and "item_versions" (with scoring workers)."""
    path = Path(run_dir) / "snapshots" / f"step{step:06d}.pt"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: was the run trained with snapshot_steps including {step}?")
    return load_checkpoint(path)


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

