"""A DDP training loop with torch's DistributedSampler against isample's distributed sampler.

    python benchmarks/distributed_benchmark.py --out benchmarks/results/distributed.json
    python benchmarks/distributed_benchmark.py --table benchmarks/results/distributed.json   # print the table

Two gloo processes on the CPU (one torch thread each) train a small MLP (32-128-10, SGD with
momentum) with DistributedDataParallel on the synthetic data of ``examples/ddp_train.py``
(20,000 items, batch 64 per rank, 157 steps per rank per epoch). Each contender holds its own
model, optimiser, DDP wrapper and DataLoader (``isample.IndexedDataset``, the same for all),
and trains whole epochs: ``DistributedSampler`` (a plain mean loss, what a user would run
instead), and ``DistributedImportanceSampler`` (the library's defaults, with its warm-up epoch
left out so that every timed epoch is an importance epoch; weights
and ``update`` every step) with each exchange setting, replicated and sharded. The contenders
are interleaved, one epoch each per round, their order rotated from one round to the next,
so that the machine's drift (other jobs share its 2 cores) spreads over all of them; the
summary gives per contender the median time per step, the median over rounds of its epoch
time divided by DistributedSampler's in the same round (and the ratio of the two fastest
epochs, the least disturbed by other jobs, and the same ratio of CPU time, the work each
process did, which other jobs disturb much less than the wall clock), the sampler's share of
the step (its calls on the steps, plus its exchange and draw at the epoch's start), and the
bytes and collectives of its exchanges, per epoch and on the steps themselves (what the
traffic counters of ``sampler.stats`` saw; bytes are what rank 0 received and sent). The
result file also records the CPU (``lscpu``: model, caches, vector extensions, from
``isample.bench.machine``), the load average and the versions. Not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "DistributedSampler"
#: name -> DistributedImportanceSampler settings (None: torch's DistributedSampler)
CONTENDERS: Dict[str, Optional[Dict[str, Any]]] = {
    BASELINE: None,
    "isample, exchange per epoch (default)": dict(exchange="epoch"),
    "isample, exchange every 16 steps": dict(exchange=16),
    "isample, exchange per step": dict(exchange="step"),
    "isample sharded, per epoch": dict(sharded=True, exchange="epoch"),
    "isample sharded, per step": dict(sharded=True, exchange="step"),
}


def _load_example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_train", os.path.join(ROOT, "examples", "ddp_train.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions() -> Dict[str, str]:
    import numpy

    import isample

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "isample": isample.__version__,
        "commit": commit,
    }


class _Contender:
    """One way to train: its sampler, DataLoader, model, DDP wrapper and optimiser."""

    def __init__(self, name: str, settings: Optional[Dict[str, Any]], train: Any, seed: int) -> None:
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DataLoader, DistributedSampler

        import isample
        from isample.distributed import DistributedImportanceSampler

        self.name = name
        if settings is None:
            self.sampler: Any = DistributedSampler(train, seed=seed)
            self.importance = False
        else:
            self.sampler = DistributedImportanceSampler(
                len(train), warmup_epochs=0, seed=seed, **settings  # the defaults: last loss, proportional, 20% uniform
            )
            self.importance = True
        self.loader = DataLoader(isample.IndexedDataset(train), batch_size=64, sampler=self.sampler)
        torch.manual_seed(seed)  # every contender starts from the same weights
        model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
        self.model = DistributedDataParallel(model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)

    def traffic(self) -> Dict[str, float]:
        if not self.importance:
            return {"bytes_received": 0, "bytes_sent": 0, "collectives": 0, "exchange_seconds": 0.0, "draw_seconds": 0.0}
        stats = self.sampler.stats
        return {k: stats[k] for k in ("bytes_received", "bytes_sent", "collectives", "exchange_seconds", "draw_seconds")}

    def epoch(self, epoch: int) -> Dict[str, Any]:
        """Train one epoch; its time, steps, the sampler's time on the steps, and its traffic."""
        import torch.nn.functional as F

        sampler, model, optimizer = self.sampler, self.model, self.optimizer
        sampler.set_epoch(epoch)
        at_start = self.traffic()
        after_first: Optional[Dict[str, float]] = None
        steps, on_step = 0, 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        for index, x, y in self.loader:  # the first batch starts the epoch: exchange, then draw
            if after_first is None:
                after_first = self.traffic()
            losses = F.cross_entropy(model(x), y, reduction="none")
            if self.importance:
                tick = time.perf_counter()
                weights = sampler.weights(index)
                on_step += time.perf_counter() - tick
                loss = (losses * weights.to(losses)).mean()
            else:
                loss = losses.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if self.importance:
                tick = time.perf_counter()
                sampler.update(index, losses.detach())
                on_step += time.perf_counter() - tick
            steps += 1
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        at_end = self.traffic()
        assert after_first is not None
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # this process's threads (gloo's included), not the time it waited
            "steps": steps,
            "sampler_seconds_on_steps": on_step,  # weights() and update(), a per-step exchange included
            # the epoch's start, in the loader's first batch: the exchange before the draw, and the draw
            "exchange_seconds": after_first["exchange_seconds"] - at_start["exchange_seconds"],
            "draw_seconds": after_first["draw_seconds"] - at_start["draw_seconds"],
            "bytes_received": at_end["bytes_received"] - at_start["bytes_received"],
            "bytes_sent": at_end["bytes_sent"] - at_start["bytes_sent"],
            "collectives": at_end["collectives"] - at_start["collectives"],
            # what the training steps themselves sent, after the epoch's start
            "step_bytes_received": at_end["bytes_received"] - after_first["bytes_received"],
            "step_collectives": at_end["collectives"] - after_first["collectives"],
        }


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5)
    )
    train, _ = _load_example().make_data(args.items, 32, 10, args.seed)
    contenders = [_Contender(name, settings, train, args.seed) for name, settings in CONTENDERS.items()]
    runs: List[Dict[str, Any]] = []
    for r in range(args.warmup + args.rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        for contender in order:
            result = contender.epoch(r)
            if r >= args.warmup:
                runs.append({"round": r - args.warmup, "contender": contender.name, **result})
            if rank == 0:
                print(
                    f"round {r}{' (warm-up)' if r < args.warmup else ''}: {contender.name:40s} "
                    f"{1e3 * result['seconds'] / result['steps']:6.3f} ms/step",
                    flush=True,
                )
    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, runs)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per contender: medians over rounds, and its epoch time over DistributedSampler's in the
    same round (rank 0's clock: DDP keeps the ranks in step)."""
    baseline = {run["round"]: run["seconds"] for run in runs if run["contender"] == BASELINE}
    baseline_cpu = {run["round"]: run["cpu_seconds"] for run in runs if run["contender"] == BASELINE}
    summary: Dict[str, Any] = {}
    for name in CONTENDERS:
        mine = [run for run in runs if run["contender"] == name]
        ms = [1e3 * run["seconds"] / run["steps"] for run in mine]
        share = [
            (run["sampler_seconds_on_steps"] + run["exchange_seconds"] + run["draw_seconds"]) / run["seconds"]
            for run in mine
        ]
        steps = mine[0]["steps"]
        summary[name] = {
            "ms_per_step_median": round(statistics.median(ms), 4),
            "ms_per_step_min_max": [round(min(ms), 4), round(max(ms), 4)],
            "ratio_to_DistributedSampler_median_of_rounds": round(
                statistics.median(run["seconds"] / baseline[run["round"]] for run in mine), 4
            ),
            "ratio_to_DistributedSampler_quartiles_of_rounds": [
                round(q, 4) for q in statistics.quantiles([run["seconds"] / baseline[run["round"]] for run in mine], n=4)
            ],
            # CPU time: the work of each approach, much less disturbed by other jobs than the wall clock
            "cpu_ms_per_step_median": round(statistics.median(1e3 * run["cpu_seconds"] / run["steps"] for run in mine), 4),
            "cpu_ratio_to_DistributedSampler_median_of_rounds": round(
                statistics.median(run["cpu_seconds"] / baseline_cpu[run["round"]] for run in mine), 4
            ),
            "cpu_ratio_to_DistributedSampler_quartiles_of_rounds": [
                round(q, 4)
                for q in statistics.quantiles([run["cpu_seconds"] / baseline_cpu[run["round"]] for run in mine], n=4)
            ],
            # the fastest epoch of each: the least disturbed by the other jobs on the machine
            "ratio_to_DistributedSampler_of_fastest_epochs": round(
                min(run["seconds"] for run in mine) / min(baseline.values()), 4
            ),
            "sampler_share_of_step_median": round(statistics.median(share), 4),
            "sampler_us_per_step_on_steps_median": round(
                statistics.median(1e6 * run["sampler_seconds_on_steps"] / run["steps"] for run in mine), 2
            ),
            "exchange_ms_per_epoch_median": round(statistics.median(1e3 * run["exchange_seconds"] for run in mine), 3),
            "draw_ms_per_epoch_median": round(statistics.median(1e3 * run["draw_seconds"] for run in mine), 3),
            "steps_per_epoch": steps,
            "bytes_received_per_epoch": statistics.median(run["bytes_received"] for run in mine),
            "bytes_sent_per_epoch": statistics.median(run["bytes_sent"] for run in mine),
            "bytes_received_per_step": round(statistics.median(run["bytes_received"] for run in mine) / steps, 1),
            "bytes_received_on_the_steps_per_epoch": statistics.median(run["step_bytes_received"] for run in mine),
            "collectives_per_epoch": statistics.median(run["collectives"] for run in mine),
            "collectives_on_the_steps_per_epoch": statistics.median(run["step_collectives"] for run in mine),
        }
    return summary


def table(result: Dict[str, Any]) -> str:
    lines = [
        f"{'contender':40s} {'ms/step':>8s} {'ratio':>6s} {'fastest':>7s} {'cpu':>6s} {'share':>6s} {'B/epoch':>9s} "
        f"{'B/step':>8s} {'coll/epoch':>10s} {'on steps':>8s}"
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"{name:40s} {s['ms_per_step_median']:8.3f} {s['ratio_to_DistributedSampler_median_of_rounds']:6.3f} "
            f"{s['ratio_to_DistributedSampler_of_fastest_epochs']:7.3f} "
            f"{s['cpu_ratio_to_DistributedSampler_median_of_rounds']:6.3f} "
            f"{100 * s['sampler_share_of_step_median']:5.1f}% {s['bytes_received_per_epoch']:9.0f} "
            f"{s['bytes_received_per_step']:8.1f} {s['collectives_per_epoch']:10.0f} "
            f"{s['collectives_on_the_steps_per_epoch']:8.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=21, help="measured rounds (one epoch per contender each)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    parser.add_argument("--table", default=None, help="only print the table of an earlier result JSON")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return

    import torch.multiprocessing as mp

    from isample.bench.machine import machine_summary  # here: the spawned ranks do not need it

    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "runs.json")
        mp.spawn(_worker, args=(2, os.path.join(scratch, "store"), args, out), nprocs=2, join=True)
        with open(out) as f:
            per_rank = json.load(f)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {
            **machine_summary(),  # lscpu's model, caches and vector extensions; the versions
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "development VM, 2 cores shared with other jobs running at the same time; "
            "each of the 2 processes on one torch thread",
        },
        "versions": _versions(),
        "setting": {
            "processes": 2,
            "backend": "gloo",
            "items": args.items,
            "batch_per_rank": 64,
            "model": "MLP 32-128-10, SGD lr 0.05 momentum 0.9, DistributedDataParallel",
            "sampler": "the library's defaults (last loss, proportional, uniform_mix 0.2, with replacement), no warm-up (DistributedSampler: a plain mean loss)",
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "timing": "perf_counter (and process_time) around each whole epoch on rank 0, first batch "
            "(exchange and draw) included",
            "seconds": round(time.time() - started, 1),
        },
        "summary": summarise(per_rank[0]),
        "runs": per_rank,
    }
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
