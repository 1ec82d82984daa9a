"""DistributedImportanceSampler: two real processes on the CPU over gloo, and world size 1.

The two-process runs start this file as a script (``python test_distributed.py SCENARIO
RANK WORLD STORE OUT``): the workers meet through a file store, run a scenario (replicated,
sharded, the exchange modes, faults) that batches many checks into one start-up, and save
what they saw for the tests below to judge against a single-process ImportanceSampler and
against each other. Every run is bounded: a collective that waits longer than PG_TIMEOUT_S
raises in the worker, and a run that takes longer than RUN_TIMEOUT_S is killed and fails its
tests.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import isample
from conftest import run_processes

RUN_TIMEOUT_S = 120  # one two-process run, start-up included; a hang fails after this
PG_TIMEOUT_S = 30  # any collective of the runs
SHORT_TIMEOUT_S = 3  # the process group of the hang test
# ImportanceSampler's defaults before issue 24 (softmax, no uniform mixture, no warm-up),
# which the configurations below were written for; _old_defaults fills them in
OLD_DEFAULTS = {"transform": "softmax", "uniform_mix": 0.0, "warmup_epochs": 0}


def _old_defaults(configs: List[Dict[str, Any]]) -> None:
    """Give every configuration the OLD_DEFAULTS it does not set itself."""
    for config in configs:
        for name, value in OLD_DEFAULTS.items():
            config.setdefault(name, value)


# ---------------------------------------------------------------------------------------------
# Worker side: runs in the spawned processes.
# ---------------------------------------------------------------------------------------------


def _loss(idx: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic stand-in for per-example losses that moves with the step."""
    return 0.25 + ((idx * 7 + step * 3) % 11).to(torch.float64) / 4.0


def _sent(idx: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """What a rank hands back: rank 0 its whole batch, rank 1 0, 2, 4 or 6 items of it, so
    that batch sizes differ between ranks and are sometimes empty."""
    return idx if rank == 0 else idx[: (step % 4) * 2]


def _train(
    sampler: Any,
    rank: int,
    epochs: int,
    *,
    first_epoch: int = 0,
    step: int = 0,
    stop: Optional[int] = None,
    batch: int = 8,
    check: bool = False,
    flush_at_stop: bool = True,
) -> Tuple[List[Dict[str, Any]], Any]:
    """A DDP-style loop without a model; stops after global step `stop` with a state_dict
    (taken after a flush on every rank, so that rank 0's serves every rank, unless
    `flush_at_stop` is False: then each rank's own state, with its pending updates)."""
    log: List[Dict[str, Any]] = []
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        it, consumed = iter(sampler), 0
        while True:
            chunk = list(itertools.islice(it, batch))
            if not chunk:
                break
            consumed += len(chunk)
            idx = torch.tensor(chunk, dtype=torch.int64)
            weights = sampler.weights(idx)
            send = _sent(idx, rank, step)
            losses = _loss(send, step)
            sampler.update(send, losses)
            if check:
                sampler.check_consistency()  # replicas bit-identical after every step
            log.append(
                {
                    "epoch": epoch,
                    "items": chunk,
                    "weights": weights.tolist(),
                    "sent": send.tolist(),
                    "losses": losses.tolist(),
                }
            )
            step += 1
            if stop is not None and step == stop:
                if flush_at_stop:
                    sampler.flush()
                return log, sampler.state_dict(consumed=consumed)
    return log, None


def _outcome(call: Callable[[], Any]) -> Tuple[str, str]:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test reads the class and message
        return type(error).__name__, str(error)
    return "none", ""


def _gather_scores(sampler: Any) -> torch.Tensor:
    """All N scores of a sharded sampler, on every rank (test helper: small N only)."""
    import torch.distributed as dist

    mine = sampler.scores()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()]))
    widest = int(max(sizes))
    parts = [torch.zeros(widest, dtype=torch.float64) for _ in sizes]
    dist.all_gather(parts, torch.cat([mine, torch.zeros(widest - mine.numel(), dtype=torch.float64)]))
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])


def _overlapping_updates(sampler: Any, rank: int) -> Dict[str, Any]:
    """Six steps in which both ranks update items 5 and 40 with different losses: one process
    handed the ranks' batches in rank order must end with the same scores."""
    steps = []
    for step in range(6):
        idx = torch.tensor([5, 40, 17 + step, 59 - step]) if rank == 0 else torch.tensor([40, 5, 31, step])
        losses = _loss(idx, step + rank)
        sampler.update(idx, losses)
        steps.append((idx.tolist(), losses.tolist()))
    sampler.flush()  # the default exchange waits for an exchange point
    return {"steps": steps, "counters": dict(sampler.counters)}


REPLICATED_CONFIGS = [
    dict(num_items=101, score="running_loss", samples_per_epoch=75, warmup_epochs=1, seed=7),
    dict(
        num_items=50,
        transform="proportional",
        replacement=False,
        samples_per_epoch=33,
        drop_last=True,
        uniform_mix=0.1,
        seed=3,
    ),
]
_old_defaults(REPLICATED_CONFIGS)


def _scenario_replicated(rank: int, world: int, out: Path) -> Dict[str, Any]:
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler as D

    results: Dict[str, Any] = {}
    # Many steps, replicas checked after each one; the log is replayed by the parent.
    runs = []
    for config in REPLICATED_CONFIGS:
        sampler = D(**config)
        log, _ = _train(sampler, rank, 6, check=True)
        runs.append({"log": log, "scores": sampler.scores(), "len": len(sampler), "counters": dict(sampler.counters)})
    results["runs"] = runs
    s = D(60, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", initial_score=1.0, seed=14)
    results["overlap"] = {**_overlapping_updates(s, rank), "scores": s.scores()}

    # Exact resume: after a flush on every rank, rank 0 saves mid-epoch and every rank loads
    # that file; or, without a flush, each rank saves and loads its own (pending updates in it).
    config = REPLICATED_CONFIGS[0]
    full, _ = _train(D(**config), rank, 6)
    full_scores = None
    head, state = _train(D(**config), rank, 6, stop=13)
    if rank == 0:
        torch.save(state, out / "replicated_state.pt")
        results["state"] = state
    dist.barrier()
    resumed = D(**config)
    resumed.load_state_dict(torch.load(out / "replicated_state.pt", weights_only=False))
    tail, _ = _train(resumed, rank, 6, first_epoch=resumed.epoch, step=13)
    resumed.flush()
    results["resume"] = {"full": full, "head": head, "tail": tail}
    straight = D(**config)
    full, _ = _train(straight, rank, 6)
    straight.flush()
    full_scores = straight.scores()
    head, own = _train(D(**config), rank, 6, stop=13, flush_at_stop=False)
    results["own_state_pending"] = own["pending"] is not None and own["pending"]["rank"] == rank
    torch.save(own, out / f"replicated_own_{rank}.pt")
    dist.barrier()
    resumed = D(**config)
    theirs = torch.load(out / f"replicated_own_{1 - rank}.pt", weights_only=False)
    results["wrong_rank_load"] = _outcome(lambda: resumed.load_state_dict(theirs))
    resumed.load_state_dict(torch.load(out / f"replicated_own_{rank}.pt", weights_only=False))
    tail, _ = _train(resumed, rank, 6, first_epoch=resumed.epoch, step=13)
    resumed.flush()
    results["own_resume"] = {"full": full, "head": head, "tail": tail}
    results["own_resume_scores_equal"] = torch.equal(resumed.scores(), full_scores)
    results["own_resume_states_equal"] = _same(resumed.state_dict(), straight.state_dict())
    # the same with exchange=3: a checkpoint taken while windows are in flight
    k_config = dict(config, exchange=3)
    straight = D(**k_config)
    full, _ = _train(straight, rank, 6)
    straight.flush()
    head, own = _train(D(**k_config), rank, 6, stop=13, flush_at_stop=False)
    resumed = D(**k_config)
    resumed.load_state_dict(own)
    tail, _ = _train(resumed, rank, 6, first_epoch=resumed.epoch, step=13)
    resumed.flush()
    results["k_resume"] = {"full": full, "head": head, "tail": tail, "pending": own["pending"] is not None}
    results["k_resume_states_equal"] = _same(resumed.state_dict(), straight.state_dict())

    # Bad input on one rank, exchange="step": every rank raises the same class at once, and
    # nothing of that step is applied anywhere.
    s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=1, exchange="step")
    s.update(torch.arange(20), torch.linspace(0.0, 2.0, 20, dtype=torch.float64))
    before = s.scores().clone()
    nan = torch.tensor([1.0, math.nan], dtype=torch.float64)
    good = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cases = {
        "nan_on_rank1": lambda: s.update([3, 4], nan if rank == 1 else good),
        "index_out_of_range_on_rank0": lambda: s.update([3, 20] if rank == 0 else [3, 4], good),
        "negative_index_on_rank1": lambda: s.update([-1, 4] if rank == 1 else [3, 4], good),
        "float_indices_on_rank1": lambda: s.update(torch.tensor([3.0, 4.0]) if rank == 1 else [3, 4], good),
        "scalar_loss_on_rank0": lambda: s.update([3, 4], torch.tensor(1.0) if rank == 0 else good),
    }
    results["bad"] = {name: _outcome(call) for name, call in cases.items()}
    results["bad_unchanged"] = torch.equal(s.scores(), before)
    s.update([5], [9.0])  # the group is still usable
    s.check_consistency()
    results["after_bad"] = s.scores()
    results["bad_construction"] = {
        "different_seeds": _outcome(lambda: D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=rank)),
        "bad_argument_on_rank1": _outcome(lambda: D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=0 if rank == 1 else 5)),
    }

    # A rank that never calls flush: the other fails after the group's timeout, not forever.
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, group=short, seed=0)
    if rank == 0:
        started = time.monotonic()
        results["hang"] = _outcome(s.flush)
        results["hang_seconds"] = time.monotonic() - started
        (out / "released").touch()
    else:
        waited = time.monotonic()
        while not (out / "released").exists() and time.monotonic() - waited < 60:
            time.sleep(0.05)
    return results


def _scenario_sharded(rank: int, world: int, out: Path) -> Dict[str, Any]:
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler as D

    results: Dict[str, Any] = {}
    n = 60
    scores = 3.0 * (torch.arange(n, dtype=torch.float64) / (n - 1)) ** 2  # shard 1 holds most mass

    # Softmax: updates cross to the other rank's shard; one epoch of 20,000 draws per rank.
    s = D(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True, samples_per_epoch=40_000, seed=11)
    theirs = torch.arange(n // 2, n) if rank == 0 else torch.arange(0, n // 2)
    s.update(theirs, scores[theirs])
    items = list(s)  # iter() first routes the updates to their owners
    results["softmax"] = {
        "items": items,
        "weights": s.weights(items),
        "probabilities": s.probabilities(),
        "shard": s.shard_range,
        "len": len(s),
    }

    # Proportional with a uniform mixture and max-normalised weights.
    s = D(
        n, warmup_epochs=0,
        sharded=True,
        transform="proportional",
        uniform_mix=0.2,
        normalize_weights="max",
        samples_per_epoch=20_000,
        seed=12,
    )
    s.update(theirs, scores[theirs])
    items = list(s)
    results["proportional"] = {
        "items": items,
        "weights": s.weights(items),
        "probabilities": s.probabilities(),
        "history": s.history[-1],
    }

    # Warm-up: each rank shuffles its own shard, padded to equal lengths.
    s = D(61, transform="softmax", uniform_mix=0.0, sharded=True, warmup_epochs=1, seed=13)
    results["warmup"] = {"items": list(s), "shard": s.shard_range}

    # Routing: running loss with the same item updated by both ranks in one step.
    s = D(n, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True, score="running_loss", initial_score=1.0, seed=14)
    results["overlap"] = {**_overlapping_updates(s, rank), "scores": _gather_scores(s)}

    # Many training steps, then an exact resume where every rank saves and loads its own state.
    config = dict(num_items=90, sharded=True, score="running_loss", samples_per_epoch=70, warmup_epochs=1, seed=5,
                  transform="softmax", uniform_mix=0.0)
    full, _ = _train(D(**config), rank, 5, check=True)
    head, state = _train(D(**config), rank, 5, stop=9, flush_at_stop=False)  # pending updates in it
    torch.save(state, out / f"sharded_state_{rank}.pt")
    dist.barrier()
    resumed = D(**config)
    wrong = torch.load(out / f"sharded_state_{1 - rank}.pt", weights_only=False)
    results["wrong_shard_load"] = _outcome(lambda: resumed.load_state_dict(wrong))
    resumed.load_state_dict(torch.load(out / f"sharded_state_{rank}.pt", weights_only=False))
    tail, _ = _train(resumed, rank, 5, first_epoch=resumed.epoch, step=9)
    results["resume"] = {"full": full, "head": head, "tail": tail}

    # Bad input on one rank, exchange="step".
    s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True, score="running_loss", seed=1, exchange="step")
    s.update(torch.arange(20), torch.linspace(0.0, 2.0, 20, dtype=torch.float64))
    before = _gather_scores(s)
    good = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cases = {
        "nan_on_rank0": lambda: s.update([3, 14], torch.tensor([math.inf, 1.0]) if rank == 0 else good),
        "index_out_of_range_on_rank1": lambda: s.update([3, 20] if rank == 1 else [3, 4], good),
        "policy_error_on_rank1": lambda: s.update([3, 4], torch.ones(3) if rank == 1 else good),
    }
    results["bad"] = {name: _outcome(call) for name, call in cases.items()}
    results["bad_unchanged"] = torch.equal(_gather_scores(s), before)
    s.update([5, 15], good)
    results["after_bad"] = _gather_scores(s)
    results["unsupported"] = _outcome(lambda: D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True, replacement=False))
    return results


def _same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two states: tensors by dtype, shape and bytes (NaN included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.detach().cpu().contiguous().numpy().tobytes() == b.detach().cpu().contiguous().numpy().tobytes()
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


CLASSES = 7


def _logits(idx: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic float32 logits (b, CLASSES) and targets for grad_norm and EarlyImportance."""
    z = torch.sin(idx[:, None].to(torch.float32) * 0.37 + torch.arange(CLASSES) * 1.3 + step) * 3.0
    return z, idx % CLASSES


def _odd_loss(idx: torch.Tensor, step: int) -> torch.Tensor:
    """Losses with a NaN and an infinity every third step (for nonfinite="skip" / "clamp")."""
    losses = _loss(idx, step)
    if step % 3 == 1 and idx.numel() >= 2:
        losses[0], losses[1] = math.nan, math.inf if step % 2 else -math.inf
    return losses


# (name, sampler options, which score calls: "update", "extras" (logits/targets), "set" (set_scores
# on rank `step % 3` ... see _mode_run), "odd" (non-finite losses))
MODE_CASES = [
    ("last_loss", dict(num_items=40, seed=21), "update"),
    ("running_loss", dict(num_items=40, score="running_loss", samples_per_epoch=50, seed=22), "update"),
    ("grad_norm", dict(num_items=40, score="grad_norm", transform="proportional", uniform_mix=0.1, seed=23), "extras"),
    ("early_importance", dict(num_items=40, transform="proportional", warmup_epochs=2, uniform_mix=0.1, seed=24), "extras"),
    ("set_scores", dict(num_items=40, score="running_loss", transform="proportional", seed=25), "set"),
    ("skip", dict(num_items=40, score="running_loss", nonfinite="skip", seed=26), "odd"),
    ("clamp", dict(num_items=40, nonfinite="clamp", clamp_value=50.0, seed=27), "odd"),
]
_old_defaults([options for _, options, _ in MODE_CASES])
SHARDED_MODE_CASES = ["last_loss", "running_loss", "grad_norm", "set_scores", "skip"]
MODES: List[Any] = ["step", "epoch", 2]
MODE_EPOCHS = 4


def _mode_sampler(case: str, mode: Any, sharded_mode: bool) -> Any:
    from isample.distributed import DistributedImportanceSampler as D

    options = dict(next(o for name, o, _ in MODE_CASES if name == case))
    if case == "early_importance":
        options["score"] = isample.EarlyImportance(40, 2)  # a fresh one: it keeps counts
    return D(**options, sharded=sharded_mode, exchange=mode)


def _mode_run(case: str, mode: Any, sharded_mode: bool, rank: int, len_before_last: bool = False) -> Dict[str, Any]:
    """Train MODE_EPOCHS epochs in batches of 6; hand back every batch plus item 5 (so that a
    running loss blends it several times per epoch and on both ranks in one step). Record
    what each epoch yields and weighs, the state right after each iter() (its exchange and
    draw), and how many collectives the steps made."""
    kind = next(k for name, _, k in MODE_CASES if name == case)
    sampler = _mode_sampler(case, mode, sharded_mode)
    log: Dict[str, Any] = {"items": [], "weights": [], "states": [], "step_collectives": [], "calls": []}
    step = 0
    for epoch in range(MODE_EPOCHS):
        sampler.set_epoch(epoch)
        it = iter(sampler)
        log["states"].append(sampler.state_dict())
        batches = []
        while True:
            chunk = list(itertools.islice(it, 6))
            if not chunk:
                break
            batches.append(chunk)  # every batch fetched before the first update (a prefetching loader)
        before = sampler.stats["collectives"]
        for j, chunk in enumerate(batches):
            idx = torch.tensor(chunk, dtype=torch.int64)
            log["items"].append(chunk)
            log["weights"].append(sampler.weights(idx).tolist())
            send = torch.cat([idx, torch.tensor([5])])
            if len_before_last and j == len(batches) - 1:
                # after the last batch was fetched, before its update: none of these may draw
                log["lengths"] = (len(sampler), sampler.steps_per_epoch(6), sampler.total_steps(MODE_EPOCHS, 6))
            if kind == "set" and step % 3 != 0:
                scores = 0.1 + _loss(send, step + rank)
                sampler.set_scores(send, scores)
                log["calls"].append(("set", send.tolist(), scores.tolist(), None))
            elif kind == "extras":
                losses = _loss(send, step + rank)
                logits, targets = _logits(send, step + rank)
                sampler.update(send, losses, logits=logits, targets=targets)
                log["calls"].append(("update", send.tolist(), losses.tolist(), (logits, targets)))
            else:
                losses = (_odd_loss if kind == "odd" else _loss)(send, step + rank)
                sampler.update(send, losses)
                log["calls"].append(("update", send.tolist(), losses.tolist(), None))
            step += 1
        log["step_collectives"].append(sampler.stats["collectives"] - before)
    sampler.flush()
    log["final"] = sampler.state_dict()
    log["scores"] = _gather_scores(sampler) if sharded_mode else sampler.scores()
    log["counters"] = dict(sampler.counters)
    log["stats"] = sampler.stats
    return log


def _scenario_modes(rank: int, world: int, out: Path) -> Dict[str, Any]:
    """Every score policy, replicated and sharded, in each exchange mode."""
    results: Dict[str, Any] = {}
    for case, _, _ in MODE_CASES:
        for mode in MODES:
            results[("replicated", case, mode)] = _mode_run(case, mode, False, rank)
        results[("replicated", case, "epoch+len")] = _mode_run(case, "epoch", False, rank, len_before_last=True)
    for case in SHARDED_MODE_CASES:
        for mode in MODES:
            results[("sharded", case, mode)] = _mode_run(case, mode, True, rank)
        results[("sharded", case, "epoch+len")] = _mode_run(case, "epoch", True, rank, len_before_last=True)
    return results


def _scenario_faults(rank: int, world: int, out: Path) -> Dict[str, Any]:
    """Refused calls under the deferred exchanges: kept, reported on every rank at the next
    exchange, every accepted call applied; checkpoints with pending updates."""
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler as D

    results: Dict[str, Any] = {}
    good = torch.tensor([1.0, 2.0], dtype=torch.float64)
    nan = torch.tensor([1.0, math.nan], dtype=torch.float64)
    for layout in (False, True):
        # exchange="epoch": rank 1's second call holds a NaN; flush() raises on both ranks
        s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", sharded=layout, seed=1)
        calls = [([0, 11], good), ([2, 13], nan if rank == 1 else good), ([4, 15], good * 3)]
        results[(layout, "epoch_calls")] = [_outcome(lambda c=c: s.update(*c)) for c in calls]
        started = time.monotonic()
        results[(layout, "epoch_flush")] = _outcome(s.flush)
        results[(layout, "epoch_seconds")] = time.monotonic() - started
        results[(layout, "epoch_scores")] = _gather_scores(s) if layout else s.scores()
        results[(layout, "epoch_counters")] = dict(s.counters)
        results[(layout, "epoch_calls_made")] = [(idx, loss.tolist()) for idx, loss in calls]
        # the next exchange has nothing left to report
        results[(layout, "epoch_flush_again")] = _outcome(s.flush)

        # exchange=2: rank 0's first call passes float indices (refused when recorded); it is
        # reported where that window is applied, two boundaries later, on both ranks.
        s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", sharded=layout, seed=1, exchange=2)
        outcomes = []
        for k in range(7):
            idx = torch.tensor([3.0, 4.0]) if (rank == 0 and k == 0) else [k, 19 - k]
            outcomes.append(_outcome(lambda idx=idx: s.update(idx, good)))
        results[(layout, "k_calls")] = outcomes
        results[(layout, "k_flush")] = _outcome(s.flush)

        # set_scores: a negative score on rank 1; iter() raises on both ranks, then draws next time
        s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=layout, seed=2)
        s.set_scores([1, 12], [0.5, -1.0] if rank == 1 else [0.5, 1.0])
        s.set_scores([2, 13], [2.0, 3.0])
        results[(layout, "set_iter")] = _outcome(lambda: iter(s))
        results[(layout, "set_scores")] = _gather_scores(s) if layout else s.scores()
        results[(layout, "set_iter_again")] = _outcome(lambda: list(s))

    # A state saved with pending updates resumes only on the rank that saved it.
    s = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=3)
    list(s)
    s.update([rank, 10 + rank], good)
    state = s.state_dict()
    results["pending_state"] = state["pending"]
    torch.save(state, out / f"faults_state_{rank}.pt")
    dist.barrier()
    other = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=3)
    theirs = torch.load(out / f"faults_state_{1 - rank}.pt", weights_only=False)
    results["load_theirs"] = _outcome(lambda: other.load_state_dict(theirs))
    results["load_theirs_state_unchanged"] = _same(other.state_dict(), D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=3).state_dict())
    step_mode = D(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=3, exchange="step")
    mine = torch.load(out / f"faults_state_{rank}.pt", weights_only=False)
    results["load_into_step_mode"] = _outcome(lambda: step_mode.load_state_dict(mine))
    other.load_state_dict(mine)
    other.flush()
    s.flush()
    results["own_load_same"] = _same(other.state_dict(), s.state_dict())
    return results


SCENARIOS = {
    "replicated": _scenario_replicated,
    "sharded": _scenario_sharded,
    "modes": _scenario_modes,
    "faults": _scenario_faults,
}


def _worker(scenario: str, rank: int, world: int, store: str, out: str) -> None:
    import isample

    assert "isample.distributed" not in sys.modules, "import isample must not import isample.distributed"
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    results = SCENARIOS[scenario](rank, world, Path(out))
    results["isample"] = isample.__version__
    torch.save(results, Path(out) / f"{scenario}_rank{rank}.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no teardown: the hang test leaves a group whose operation timed out


# ---------------------------------------------------------------------------------------------
# Test side.
# ---------------------------------------------------------------------------------------------


def _launch(scenario: str, out: Path, world: int = 2) -> List[Dict[str, Any]]:
    store = out / "store"
    commands = [[__file__, scenario, str(r), str(world), str(store), str(out)] for r in range(world)]
    run_processes(scenario, commands, RUN_TIMEOUT_S)
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return _launch("replicated", tmp_path_factory.mktemp("replicated"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _launch("sharded", tmp_path_factory.mktemp("sharded"))


def _reference_options(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.items() if k != "drop_last"}


# -- replicated, two processes ------------------------------------------------------------


@pytest.mark.parametrize("which", range(len(REPLICATED_CONFIGS)))
def test_replicated_shards_are_the_single_process_draw_and_replicas_match_it(replicated, which):
    """Replay the logged steps on one ImportanceSampler: each epoch's draw, split as
    DistributedSampler splits, must be what the ranks yielded, with the same weights, and
    the final scores must match bit for bit (each rank also checked the replicas after
    every step)."""
    from isample.distributed import _rank_length, _rank_positions

    config = REPLICATED_CONFIGS[which]
    world, drop_last = len(replicated), config.get("drop_last", False)
    logs = [r["runs"][which]["log"] for r in replicated]
    assert len(logs[0]) == len(logs[1]) >= 12
    reference = isample.ImportanceSampler(**_reference_options(config))
    steps = list(zip(*logs))
    for epoch in range(6):
        reference.set_epoch(epoch)
        order = torch.tensor(list(reference), dtype=torch.int64)
        for rank in range(world):
            entries = [entry for entry in logs[rank] if entry["epoch"] == epoch]
            items = [i for entry in entries for i in entry["items"]]
            expected = order[_rank_positions(len(order), world, rank, drop_last)].tolist()
            assert items == expected
            weights = [w for entry in entries for w in entry["weights"]]
            assert weights == reference.weights(items).tolist()
        # Together the ranks yield the whole draw (padded by its start, or cut with drop_last).
        union = sorted(
            i for rank in range(world) for entry in logs[rank] if entry["epoch"] == epoch for i in entry["items"]
        )
        total = _rank_length(len(order), world, drop_last) * world
        assert union == sorted((order.tolist() * 2)[:total])
        for step in (s for s in steps if s[0]["epoch"] == epoch):
            reference.update(sum((e["sent"] for e in step), []), sum((e["losses"] for e in step), []))
    for r in replicated:
        assert torch.equal(r["runs"][which]["scores"], reference.scores())
        assert r["runs"][which]["counters"] == reference.counters


def test_replicated_resume_from_rank0_checkpoint_is_exact(replicated):
    """After flush() on every rank, rank 0's state serves every rank."""
    for r in replicated:
        full, head, tail = r["resume"]["full"], r["resume"]["head"], r["resume"]["tail"]
        assert len(head) == 13 and len(tail) > 10
        assert head + tail == full
        if "state" in r:  # rank 0's, saved after a flush on every rank
            assert r["state"]["pending"] is None


def test_replicated_resume_from_each_ranks_own_checkpoint_with_pending_updates_is_exact(replicated):
    """Without a flush each rank's state holds its own recorded updates: each rank loads its
    own and continues exactly (another rank's is refused on every rank)."""
    for r in replicated:
        assert r["own_state_pending"]
        full, head, tail = r["own_resume"]["full"], r["own_resume"]["head"], r["own_resume"]["tail"]
        assert len(head) == 13 and head + tail == full
        assert r["own_resume_scores_equal"] and r["own_resume_states_equal"]
        full, head, tail = r["k_resume"]["full"], r["k_resume"]["head"], r["k_resume"]["tail"]
        assert r["k_resume"]["pending"] and head + tail == full and r["k_resume_states_equal"]
        kind, message = r["wrong_rank_load"]
        assert kind == "ValueError" and "resumes only on the rank that saved it" in message


def test_replicated_checkpoint_taken_on_two_ranks_resumes_on_one(replicated):
    from isample.distributed import DistributedImportanceSampler

    state = replicated[0]["state"]
    saved = state["sampler"]["current"]
    consumed = saved["position"]  # global items: 2 ranks x the items each had used
    assert 0 < consumed < len(saved["order"])
    sampler = DistributedImportanceSampler(**REPLICATED_CONFIGS[0])  # no process group: one rank
    sampler.load_state_dict(state)
    assert sampler.epoch == saved["epoch"]
    rest = list(iter(sampler))
    assert rest == saved["order"][consumed:].tolist()
    assert torch.equal(sampler.weights(rest), saved["weight_of"][rest])


def test_replicated_bad_input_raises_on_every_rank_and_changes_nothing(replicated):
    expected = {
        "nan_on_rank1": ("ValueError", "rank 1"),
        "index_out_of_range_on_rank0": ("IndexError", "rank 0"),
        "negative_index_on_rank1": ("IndexError", "rank 1"),
        "float_indices_on_rank1": ("TypeError", "rank 1"),
        "scalar_loss_on_rank0": ("ValueError", "reduction='none'"),
    }
    for r in replicated:
        for name, (kind, text) in expected.items():
            got_kind, message = r["bad"][name]
            assert got_kind == kind, (name, r["bad"][name])
            assert text in message and "refused on every rank" in message
        assert r["bad_unchanged"]
        assert r["bad_construction"]["different_seeds"][0] == "ValueError"
        assert "differ" in r["bad_construction"]["different_seeds"][1]
        assert r["bad_construction"]["bad_argument_on_rank1"][0] == "ValueError"
        assert "rank 1" in r["bad_construction"]["bad_argument_on_rank1"][1]
    assert torch.equal(replicated[0]["after_bad"], replicated[1]["after_bad"])


def test_a_rank_that_stops_calling_leaves_the_other_waiting_only_until_the_timeout(replicated):
    kind, message = replicated[0]["hang"]
    assert kind == "RuntimeError", (kind, message)
    assert SHORT_TIMEOUT_S * 0.8 < replicated[0]["hang_seconds"] < SHORT_TIMEOUT_S + 20


# -- sharded, two processes ---------------------------------------------------------------


def _softmax(scores: torch.Tensor) -> np.ndarray:
    return torch.softmax(scores, 0).numpy()


SCORES = 3.0 * (torch.arange(60, dtype=torch.float64) / 59) ** 2


@pytest.mark.statistical
def test_sharded_draws_follow_the_global_softmax(sharded):
    from conftest import ALPHA, chi_square_pvalue

    p = _softmax(SCORES)
    per_rank = [np.array(r["softmax"]["items"]) for r in sharded]
    assert [len(items) for items in per_rank] == [20_000, 20_000] == [r["softmax"]["len"] for r in sharded]
    union = np.concatenate(per_rank)
    assert chi_square_pvalue(np.bincount(union, minlength=60), p) > ALPHA
    for items in per_rank:  # each rank's part is itself a sample of the global p
        assert chi_square_pvalue(np.bincount(items, minlength=60), p) > ALPHA
    # Negative control: shards weighted equally (the softmax of each shard halved) is rejected.
    wrong = np.concatenate([_softmax(SCORES[:30]), _softmax(SCORES[30:])]) / 2
    assert chi_square_pvalue(np.bincount(union, minlength=60), wrong) < ALPHA


def test_sharded_weights_and_probabilities_are_global(sharded):
    p = torch.softmax(SCORES, 0)
    for r in sharded:
        items = torch.tensor(r["softmax"]["items"])
        torch.testing.assert_close(r["softmax"]["weights"], 1.0 / (60 * p[items]), rtol=1e-12, atol=0)
    glued = torch.cat([r["softmax"]["probabilities"] for r in sharded])
    torch.testing.assert_close(glued, p, rtol=1e-12, atol=0)
    assert [r["softmax"]["shard"] for r in sharded] == [(0, 30), (30, 60)]


@pytest.mark.statistical
def test_sharded_proportional_with_uniform_mix(sharded):
    from conftest import ALPHA, chi_square_pvalue

    w = SCORES.clamp(min=0) + 1e-6
    q = 0.8 * w / w.sum() + 0.2 / 60
    union = np.concatenate([np.array(r["proportional"]["items"]) for r in sharded])
    assert chi_square_pvalue(np.bincount(union, minlength=60), q.numpy()) > ALPHA
    assert chi_square_pvalue(np.bincount(union, minlength=60), (w / w.sum()).numpy()) < ALPHA  # no mixture
    raw = 1.0 / (60 * q[torch.from_numpy(union)])
    glued = torch.cat([r["proportional"]["weights"] for r in sharded])
    torch.testing.assert_close(glued, raw / raw.max(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([r["proportional"]["probabilities"] for r in sharded]), q, rtol=1e-12, atol=0)
    assert all(r["proportional"]["history"]["max_weight"] == 1.0 for r in sharded)


def test_sharded_warmup_covers_every_item_from_its_own_shard(sharded):
    parts = [r["warmup"]["items"] for r in sharded]
    assert len(parts[0]) == len(parts[1]) == 31  # 61 items: rank 1 owns 30 and pads one
    for part, r in zip(parts, sharded):
        start, end = r["warmup"]["shard"]
        assert all(start <= i < end for i in part)
    assert sorted(set(parts[0]) | set(parts[1])) == list(range(61))


def _check_overlapping_updates(results: List[Dict[str, Any]]) -> None:
    reference = isample.ImportanceSampler(60, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", initial_score=1.0, seed=14)
    for step in zip(*(r["overlap"]["steps"] for r in results)):
        reference.update(sum((idx for idx, _ in step), []), sum((loss for _, loss in step), []))
    for r in results:
        assert torch.equal(r["overlap"]["scores"], reference.scores())
        assert r["overlap"]["counters"] == {"updates": 6, "nonfinite_skipped": 0, "nonfinite_clamped": 0}


def test_replicated_updates_apply_in_rank_order(replicated):
    _check_overlapping_updates(replicated)


def test_sharded_updates_reach_their_owner_in_rank_order(sharded):
    _check_overlapping_updates(sharded)


def test_sharded_resume_from_each_ranks_own_checkpoint_is_exact(sharded):
    for r in sharded:
        full, head, tail = r["resume"]["full"], r["resume"]["head"], r["resume"]["tail"]
        assert len(head) == 9 and len(tail) > 5
        assert head + tail == full
        kind, message = r["wrong_shard_load"]
        assert kind == "ValueError" and "its own state" in message


def test_sharded_bad_input_raises_on_every_rank_and_changes_nothing(sharded):
    expected = {
        "nan_on_rank0": ("ValueError", "rank 0"),
        "index_out_of_range_on_rank1": ("IndexError", "rank 1"),
        "policy_error_on_rank1": ("ValueError", "rank 1"),
    }
    for r in sharded:
        for name, (kind, text) in expected.items():
            assert r["bad"][name][0] == kind and text in r["bad"][name][1], (name, r["bad"][name])
        assert r["bad_unchanged"]
        assert r["unsupported"][0] == "ValueError" and "replacement" in r["unsupported"][1]
    assert torch.equal(sharded[0]["after_bad"], sharded[1]["after_bad"])


# -- the exchange modes, two processes ------------------------------------------------------


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    return _launch("modes", tmp_path_factory.mktemp("modes"))


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return _launch("faults", tmp_path_factory.mktemp("faults"))


MODE_KEYS = [("replicated", case) for case, _, _ in MODE_CASES] + [("sharded", case) for case in SHARDED_MODE_CASES]


@pytest.mark.parametrize("layout,case", MODE_KEYS)
def test_every_exchange_mode_gives_the_same_draws_weights_and_state(modes, layout, case):
    """"step" (a collective per call), "epoch" (one exchange before each draw, with len()
    asked before the last update or not) and every 2 calls (asynchronous): the same items,
    weights, state after every exchange, final scores and counters, bit for bit."""
    for r in modes:
        reference = r[(layout, case, "step")]
        assert len(reference["items"]) >= MODE_EPOCHS * 2
        for mode in ("epoch", 2, "epoch+len"):
            run = r[(layout, case, mode)]
            assert run["items"] == reference["items"], mode
            assert run["weights"] == reference["weights"], mode
            for epoch, (a, b) in enumerate(zip(run["states"], reference["states"])):
                assert _same(a, b), (mode, epoch)
            assert _same(run["final"], reference["final"]), mode
            assert torch.equal(run["scores"], reference["scores"]) and run["counters"] == reference["counters"]
        # len() and the step counts asked before the last update of each epoch, as the epoch knew them
        per_epoch = len(reference["items"]) // MODE_EPOCHS
        last = reference["items"][-per_epoch:]
        assert r[(layout, case, "epoch+len")]["lengths"] == (sum(map(len, last)), per_epoch, len(reference["items"]))


@pytest.mark.parametrize("layout,case", MODE_KEYS)
def test_the_default_exchange_makes_no_collective_on_the_training_step(modes, layout, case):
    for r in modes:
        assert r[(layout, case, "epoch")]["step_collectives"] == [0] * MODE_EPOCHS
        assert r[(layout, case, "epoch+len")]["step_collectives"] == [0] * MODE_EPOCHS
        # the controls: the per-step exchange and exchange=2 do communicate on the step
        assert all(n >= 2 for n in r[(layout, case, "step")]["step_collectives"])
        assert sum(r[(layout, case, 2)]["step_collectives"]) > 0
        stats = r[(layout, case, "epoch")]["stats"]
        assert stats["pending_steps"] == 0 and stats["exchanges"] >= MODE_EPOCHS
        assert stats["bytes_received"] > 0


def _reference_step(reference: Any, step: Sequence[Tuple[str, List[int], List[float], Any]]) -> None:
    """Hand step k of rank 0, then of rank 1, to one ImportanceSampler as one call (a policy
    with keep=None prepares each rank's batch on its own, as the ranks do)."""
    from isample.sampler import ScoreUpdate

    kinds = {call[0] for call in step}
    assert len(kinds) == 1  # the scenario never mixes update and set_scores in one step
    if "set" in kinds:
        reference.set_scores(sum((c[1] for c in step), []), sum((c[2] for c in step), []))
    elif reference.score_policy.keep is None:
        parts = []
        for _, idx, losses, extra in step:
            kwargs = {} if extra is None else {"logits": extra[0], "targets": extra[1]}
            parts.append(reference.prepare_update(idx, losses, **kwargs))
        indices, values = torch.cat([u.indices for u in parts]), torch.cat([u.values for u in parts])
        reference.apply_update(ScoreUpdate(indices, values, sum(u.skipped for u in parts)))
    else:
        reference.update(sum((c[1] for c in step), []), torch.tensor(sum((c[2] for c in step), []), dtype=torch.float64))


@pytest.mark.parametrize("layout,case", MODE_KEYS)
def test_the_exchange_applies_every_rank_s_steps_in_step_then_rank_order(modes, layout, case):
    """One ImportanceSampler handed step k of rank 0 then of rank 1, epoch by epoch, ends
    with the same scores and counters; replicated, each epoch's parts are its draw, split as
    DistributedSampler splits."""
    from isample.distributed import _rank_positions

    options = dict(next(o for name, o, _ in MODE_CASES if name == case))
    if case == "early_importance":
        options["score"] = isample.EarlyImportance(40, 2)
    reference = isample.ImportanceSampler(**options)
    logs = [r[(layout, case, "epoch")] for r in modes]
    per_epoch = len(logs[0]["calls"]) // MODE_EPOCHS
    for epoch in range(MODE_EPOCHS):
        order = torch.tensor(list(reference), dtype=torch.int64)
        if layout == "replicated":
            for rank, log in enumerate(logs):
                items = sum(log["items"][epoch * per_epoch : (epoch + 1) * per_epoch], [])
                assert items == order[_rank_positions(len(order), 2, rank, False)].tolist(), epoch
        for step in zip(*(log["calls"][epoch * per_epoch : (epoch + 1) * per_epoch] for log in logs)):
            _reference_step(reference, step)
    for log in logs:
        assert torch.equal(log["scores"], reference.scores())
        assert log["counters"] == reference.counters


def test_refused_calls_are_kept_and_raised_on_every_rank_at_the_exchange(faults):
    from isample.sampler import ImportanceSampler

    for layout in (False, True):
        for rank, r in enumerate(faults):
            assert r[(layout, "epoch_calls")] == [("none", "")] * 3  # update() never raises
            kind, message = r[(layout, "epoch_flush")]
            assert kind == "ValueError", message
            assert "update() on rank 1 (call 2 since the exchange before) was refused" in message
            assert "non-finite" in message and "Every accepted call was applied" in message
            assert r[(layout, "epoch_seconds")] < 10  # nobody waited for a timeout
            assert r[(layout, "epoch_flush_again")] == ("none", "")
        # every accepted call applied, in (step, rank) order; rank 1's second call changed nothing
        reference = ImportanceSampler(20, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", seed=1)
        calls = [f[(layout, "epoch_calls_made")] for f in faults]
        for k in range(3):
            idx = sum((c[k][0] for rank, c in enumerate(calls) if not (rank == 1 and k == 1)), [])
            losses = sum((c[k][1] for rank, c in enumerate(calls) if not (rank == 1 and k == 1)), [])
            reference.update(idx, losses)
        for r in faults:
            assert torch.equal(r[(layout, "epoch_scores")], reference.scores())
            assert r[(layout, "epoch_counters")]["updates"] == 3

            # exchange=2: rank 0's first call is reported where its window is applied, the 6th call
            outcomes = r[(layout, "k_calls")]
            assert [o[0] for o in outcomes] == ["none"] * 5 + ["TypeError", "none"], outcomes
            assert "update() on rank 0 (call 1 since the exchange before) was refused" in outcomes[5][1]
            assert "must hold integers" in outcomes[5][1]
            assert r[(layout, "k_flush")] == ("none", "")

            kind, message = r[(layout, "set_iter")]
            assert kind == "ValueError" and "set_scores() on rank 1" in message and ">= 0" in message
            expected = torch.zeros(20, dtype=torch.float64)
            expected[[1, 12, 2, 13]] = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
            assert torch.equal(r[(layout, "set_scores")], expected)
            assert r[(layout, "set_iter_again")] == ("none", "")


def test_a_state_with_pending_updates_resumes_only_on_its_own_rank(faults):
    for rank, r in enumerate(faults):
        pending = r["pending_state"]
        assert pending["rank"] == rank and pending["world_size"] == 2
        assert pending["index"].tolist() == [rank, 10 + rank]
        kind, message = r["load_theirs"]
        assert kind == "ValueError" and "resumes only on the rank that saved it" in message
        assert r["load_theirs_state_unchanged"]
        kind, message = r["load_into_step_mode"]
        assert kind == "ValueError" and "exchange='step'" in message
        assert r["own_load_same"]


# -- one process ----------------------------------------------------------------------------

EQUIVALENCE_CONFIGS = [
    dict(score="running_loss", samples_per_epoch=70, warmup_epochs=1),
    dict(transform="proportional", uniform_mix=0.3, weight_exponent=0.5, normalize_weights="mean"),
    dict(transform=isample.Softmax(temperature=0.5), normalize_weights="max", samples_per_epoch=333),
]
_old_defaults(EQUIVALENCE_CONFIGS)


def _single_process_log(sampler: Any, epochs: int = 4) -> List[Any]:
    log = []
    for epoch in range(epochs):
        items = list(sampler)
        log.append((items, sampler.weights(items).tolist(), len(items)))
        idx = torch.tensor(items[:40], dtype=torch.int64)
        sampler.update(idx, _loss(idx, epoch))
    if hasattr(sampler, "flush"):
        sampler.flush()  # in a process group the last epoch's updates wait for an exchange point
    log.append(sampler.scores().tolist())
    return log


@pytest.mark.parametrize("sharded_mode", [False, True])
@pytest.mark.parametrize("config", EQUIVALENCE_CONFIGS)
def test_world_size_one_is_importance_sampler(config, sharded_mode):
    from isample.distributed import DistributedImportanceSampler

    reference = _single_process_log(isample.ImportanceSampler(97, seed=4, **config))
    sampler = DistributedImportanceSampler(97, sharded=sharded_mode, seed=4, **config)
    assert sampler.num_replicas == 1 and sampler.rank == 0
    assert _single_process_log(sampler) == reference


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one rank in this process: the samplers then exchange through
    real collectives, as on many ranks."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_size_one_process_group_is_importance_sampler(one_process_group):
    from isample.distributed import DistributedImportanceSampler

    config = EQUIVALENCE_CONFIGS[0]
    reference = _single_process_log(isample.ImportanceSampler(97, seed=4, **config))
    for sharded_mode in (False, True):
        for exchange in ("epoch", "step", 3):
            sampler = DistributedImportanceSampler(97, sharded=sharded_mode, seed=4, exchange=exchange, **config)
            assert sampler.num_replicas == 1 and sampler.exchange == exchange
            assert _single_process_log(sampler) == reference
            sampler.check_consistency()


class _NoHostReads(TorchFunctionMode):
    """Fails on every read of a tensor's value by the host: what would synchronise a GPU."""

    BANNED = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"a tensor was read on the host ({getattr(func, '__name__', func)})")
        return func(*args, **(kwargs or {}))


class _SquaredLoss(isample.ScorePolicy):
    """A policy that needs no previous score and reads nothing on the host (GradNormBound
    checks its targets on the host on the CPU; on a GPU it flags them on the device)."""

    name = "squared_loss"

    def __call__(self, losses, previous, indices, *, logits=None, **extra):
        return losses * losses + logits.sum(dim=1).to(losses)


@pytest.mark.parametrize("sharded_mode", [False, True])
def test_the_default_update_and_set_scores_read_no_tensor_on_the_host(one_process_group, sharded_mode):
    """The training step's calls only copy (the record's sizes come from shapes): checked for
    an EMA policy, a policy computed on the step from extra tensors (as grad_norm is) and,
    replicated, EarlyImportance (its extra tensors recorded); the exchange then applies them."""
    from isample.distributed import DistributedImportanceSampler as D

    idx = torch.tensor([3, 7, 7, 12, 0, 29])
    logits, targets = _logits(idx, 0)
    cases = [({}, {}), (dict(score=_SquaredLoss()), dict(logits=logits.abs()))]
    if not sharded_mode:
        cases.append((dict(score=isample.EarlyImportance(30, 2), transform="proportional"), dict(logits=logits, targets=targets)))
    for options, extra in cases:
        s = D(30, sharded=sharded_mode, seed=5, **{**OLD_DEFAULTS, **options})
        list(s)
        losses = torch.rand(6, dtype=torch.float32, requires_grad=True) * 2  # as a loss comes: float32, with grad
        with _NoHostReads():
            for _ in range(3):
                s.update(idx, losses, **extra)
                s.set_scores(idx[:2], losses.detach()[:2])
        assert s.stats["pending_steps"] == 6
        s.flush()
        assert s.counters["updates"] == 6 and s.stats["pending_steps"] == 0
    # the negative control: the per-step exchange reads sizes on the host
    s = D(30, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=sharded_mode, exchange="step")
    with pytest.raises(AssertionError, match="read on the host"):
        with _NoHostReads():
            s.update(idx, torch.ones(6))


@pytest.mark.parametrize("sharded_mode", [False, True])
def test_len_and_step_counts_never_draw_and_absurd_epochs_are_refused(sharded_mode):
    """len(), steps_per_epoch and total_steps before an epoch's last update leave its next
    draw as it would be; set_epoch refuses what is no epoch, and changes nothing then."""
    from isample.distributed import DistributedImportanceSampler as D

    def run(ask: bool) -> List[int]:
        s = D(50, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=sharded_mode, score="running_loss", samples_per_epoch=30, seed=8)
        for epoch in range(2):
            items = list(s)
            if ask:
                assert (len(s), s.steps_per_epoch(7), s.total_steps(10**12, 7)) == (30, 5, 5 * 10**12)
            idx = torch.tensor(items)
            s.update(idx, _loss(idx, epoch))
        return list(s)

    assert run(True) == run(False)
    s = D(50, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=sharded_mode, seed=8)
    before = s.state_dict()
    for bad, kind in ((2**70, ValueError), (2**63, ValueError), (-1, ValueError), (1.5, TypeError), ("3", TypeError)):
        with pytest.raises(kind, match="epoch"):
            s.set_epoch(bad)
        assert _same(s.state_dict(), before)
    s.set_epoch(2**63 - 1)
    assert s.epoch == 2**63 - 1 and len(list(s)) == 50


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [1, 5, 16, 17, 23])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_parts_split_as_distributed_sampler_splits(world, length, drop_last):
    from isample.distributed import _rank_length, _rank_positions
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(world):
        reference = DistributedSampler(range(length), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        assert _rank_length(length, world, drop_last) == reference.num_samples
        assert _rank_positions(length, world, rank, drop_last).tolist() == list(reference)


def test_single_process_errors_and_state():
    from isample.distributed import DistributedImportanceSampler

    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="replacement"):
        DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True, replacement=False)
    with pytest.raises(ValueError, match="global ranks"):
        DistributedImportanceSampler(10, uniform_mix=0.0, warmup_epochs=0, sharded=True, transform="rank")
    s = DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=6, seed=0)
    with pytest.raises(RuntimeError, match="iterate"):
        s.weights([0])
    it = iter(s)
    head = list(itertools.islice(it, 2))
    state = s.state_dict(consumed=2)
    rest = list(it)
    other = DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=6, seed=0)
    other.load_state_dict(state)
    assert head + list(iter(other)) == head + rest
    with pytest.raises(ValueError, match="different arguments"):
        DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=7, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="sharded"):
        DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=6, seed=0, sharded=True).load_state_dict(state)
    assert s.total_steps(3, 4) == 3 * 2 and s.steps_per_epoch(4) == 2


def test_progress_counts_what_this_rank_was_yielded():
    from isample.distributed import DistributedImportanceSampler

    for sharded in (False, True):
        s = DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=6, sharded=sharded, seed=0)
        assert s.progress is None
        it = iter(s)
        list(itertools.islice(it, 2))
        assert s.progress == (0, 2)
        list(it)
        assert s.progress == (0, 6)


# -- the experiment runner under torchrun (two processes, gloo) ----------------------------------

FASHION = Path("/usr/share/datasets/fashion-mnist")
TORCHRUN_TIMEOUT_S = 240  # one torchrun of the experiment runner, start-up and data loading included
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "summary.json"}


def _torchrun_train(out: Path, *extra: str) -> "subprocess.CompletedProcess[str]":
    """`torchrun --standalone --nproc_per_node 2 -m isample.cli train ...` (torchrun is
    torch.distributed.run; --standalone rendezvous on localhost picks a free port)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "isample.cli", "train", "--preset", "running_loss", "--dataset", "fashion-mnist",
        "--model", "small_cnn", "--train-subset", "1000", "--test-subset", "500", "--max-epochs", "1",
        "--no-augment", "--device", "cpu", "--out", str(out), *extra,
    ]
    env = dict(os.environ, ISAMPLE_DIST_TIMEOUT="60")
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s\n{error.stdout}\n{error.stderr}")


def _records(run: Path) -> List[Dict[str, Any]]:
    import json

    return [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "cpu_seconds")}  # timings differ
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("torchrun")
    started = time.monotonic()
    done = _torchrun_train(out)
    return out, done, time.monotonic() - started


def test_the_experiment_runner_under_torchrun_trains_and_rank0_writes_once(torchrun_run):
    import json

    out, done, _ = torchrun_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (run,) = out.iterdir()  # one run folder
    assert run.name == "fashion-mnist-sub1000-small_cnn-running_loss-z0.6-noaug-s0"
    assert {p.name for p in run.iterdir()} == RUN_FILES  # and no temporary files left behind
    (record,) = _records(run)
    assert record["epoch"] == 0 and record["test_accuracy"] > 0.2  # chance is 0.1
    assert record["samples"] == 600 and record["steps"] == 5  # the global draw of 600, global batches of 128
    assert (run / "metrics.csv").read_text().count("\n") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 2 and summary["backend"] == "gloo"
    from isample.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and len(state["history"]) == 1
    # only rank 0 prints
    assert done.stdout.count("run(s) in") == 1
    assert done.stdout.count("] epoch   0") == 1 and done.stdout.count("] done:") == 1


def test_the_experiment_runner_under_torchrun_resumes_exactly(torchrun_run, tmp_path):
    out, straight, _ = torchrun_run
    assert straight.returncode == 0
    (run,) = out.iterdir()
    stopped = _torchrun_train(tmp_path, "--max-wall-seconds", "1e-9")  # stops after one step, checkpointed
    assert stopped.returncode != 0 and "rerun the same command to resume" in stopped.stdout
    resumed = _torchrun_train(tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resumed at epoch 0 on 2 processes, 128 items into it" in resumed.stdout
    assert _records(tmp_path / run.name) == _records(run)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
