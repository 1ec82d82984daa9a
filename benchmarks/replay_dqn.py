"""Prioritized replay in a real DQN loop: isample's buffer against cpprb's, call by call.

    python benchmarks/replay_dqn.py --out benchmarks/results/replay_dqn.json
    python benchmarks/replay_dqn.py --before e0fd639 --out ...   # also an earlier isample, from git
    python benchmarks/replay_dqn.py --table benchmarks/results/replay_dqn.json   # print the table

Runs ``examples/dqn_cartpole.py`` (gymnasium CartPole-v1, capacity 50k, batch 64, alpha 0.6,
beta 0.4 -> 1, 30k steps) once per buffer variant and seed, the variants interleaved (their
order reversed from one seed to the next) so that the machine's drift spreads over all of
them. For each run it records the median time of each buffer call inside the loop (``add``
of one transition, ``sample`` of 64, ``update_priorities`` of 64), the run's wall time and
the mean return of the last 20 episodes; the summary gives, per variant and call, the
per-seed medians and their ratio to cpprb's in the same seed. The result file also records
the CPU (``lscpu``), the load average and the versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import types
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = ("add", "sample", "update_priorities")


def _load_example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("dqn_cartpole", os.path.join(ROOT, "examples", "dqn_cartpole.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replay_at(revision: str) -> types.ModuleType:
    """isample's replay module as it was at a git revision (imported inside today's package)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:python/isample/integrations/replay.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    name = "isample.integrations._replay_at_" + revision.replace("/", "_")
    module = types.ModuleType(name)
    module.__package__ = "isample.integrations"
    sys.modules[name] = module
    exec(compile(source, f"replay.py@{revision}", "exec"), module.__dict__)
    return module


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> Dict[str, str]:
    """Versions of everything measured, and the commit the run started from (with the files
    of the package that differed from it, if any)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from isample.bench.machine import machine_summary

    changed = _git("status", "--porcelain", "--", "python/isample", "csrc")
    summary = machine_summary()
    summary.pop("cpu")
    return {
        "python": platform.python_version(), **summary, "gymnasium": of("gymnasium"),
        "isample_commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_package_files": [line[3:] for line in changed.splitlines()] if changed != "unknown" else "unknown",
    }


def variants(example: types.ModuleType, before: Optional[str], seed: int, capacity: int) -> Dict[str, Callable[[], Any]]:
    """name -> a function that makes that buffer."""
    from isample.integrations.replay import PrioritizedReplayBuffer

    common = dict(alpha=0.6, eps=1e-6)
    made: Dict[str, Callable[[], Any]] = {
        "cpprb": lambda: example.make_buffer("cpprb", capacity, normalize="buffer", seed=seed, **common),
        "isample, normalize='buffer'": lambda: PrioritizedReplayBuffer(
            capacity, normalize="buffer", bool_as_float=True, seed=seed, **common),
        "isample, normalize='batch'": lambda: PrioritizedReplayBuffer(
            capacity, normalize="batch", bool_as_float=True, seed=seed, **common),
    }
    if before:
        old = _replay_at(before).PrioritizedReplayBuffer
        # the earlier buffer keeps bool dones as bool, and has no "indexes" alias
        made[f"isample@{before}, normalize='buffer'"] = lambda: _Before(old(capacity, normalize="buffer", seed=seed, **common))
        made[f"isample@{before}, normalize='batch'"] = lambda: _Before(old(capacity, normalize="batch", seed=seed, **common))
    return made


class _Before:
    """The earlier isample buffer behind the loop's calls: done as float, batch["indexes"]."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer

    def add(self, **transition: Any) -> None:
        transition["done"] = float(transition["done"])
        self.buffer.add(**transition)

    def sample(self, batch_size: int, beta: float) -> Dict[str, Any]:
        batch = self.buffer.sample(batch_size, beta=beta)
        batch["indexes"] = batch["indices"]
        return batch

    def update_priorities(self, indexes: Any, priorities: Any) -> None:
        self.buffer.update_priorities(indexes, priorities)


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per variant: per-seed medians of each call and their ratio to cpprb's in the same seed."""
    cpprb = {r["seed"]: r for r in runs if r["variant"] == "cpprb"}
    out: Dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])
        entry: Dict[str, Any] = {
            "seeds": [r["seed"] for r in mine],
            "wall_s": [round(r["wall_s"], 1) for r in mine],
            "last20_mean_return": [round(r["last20_mean_return"], 1) for r in mine],
        }
        for call in CALLS:
            entry[call] = {
                "median_us": [round(r["median_us"][call], 1) for r in mine],
                "ratio_to_cpprb": [round(r["median_us"][call] / cpprb[r["seed"]]["median_us"][call], 2) for r in mine if r["seed"] in cpprb],
                "total_s": [round(r["total_s"][call], 2) for r in mine],
            }
        out[name] = entry
    return out


def table(result: Dict[str, Any]) -> str:
    """Markdown: per variant, each call's medians over the seeds (range) and ratio to cpprb."""
    lines = [
        "| buffer | add one transition | sample 64 | update_priorities 64 | whole run | return, last 20 episodes |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def span(values: List[float], unit: str = "") -> str:
        lo, hi = min(values), max(values)
        return f"{lo:g}{unit}" if lo == hi else f"{lo:g}–{hi:g}{unit}"

    for name, entry in result["summary"].items():
        cells = []
        for call in CALLS:
            text = span(entry[call]["median_us"], " µs")
            if name != "cpprb":
                text += f" ({span(entry[call]['ratio_to_cpprb'], '×')})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {span(entry['wall_s'], ' s')} | {span(entry['last20_mean_return'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--capacity", type=int, default=50_000)
    parser.add_argument("--before", help="also run isample's replay.py at this git revision")
    parser.add_argument("--out", help="write the result (JSON) here")
    parser.add_argument("--table", metavar="JSON", help="only print the table of a result file")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    torch.set_num_threads(1)
    example = _load_example()
    versions = _versions()  # at the start: the code that runs
    load_before = os.getloadavg()
    runs = []
    for i, seed in enumerate(args.seeds):
        makers = variants(example, args.before, seed, args.capacity)
        order = list(makers) if i % 2 == 0 else list(makers)[::-1]
        for name in order:
            print(f"seed {seed}: {name} ...", flush=True)
            result = example.train(makers[name], steps=args.steps, seed=seed, log_every=None)
            result.pop("returns")
            runs.append({"variant": name, **result})
            print("   ", {k: round(v, 1) for k, v in result["median_us"].items()},
                  f"wall {result['wall_s']:.1f} s, return {result['last20_mean_return']:.1f}", flush=True)
    from isample.bench.machine import cpu_description

    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpu": cpu_description(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": "development VM, 2 cores shared with other jobs running at the same time; torch on one thread",
        },
        "versions": versions,
        "setting": {
            "env": "CartPole-v1", "steps": args.steps, "capacity": args.capacity, "batch": 64, "alpha": 0.6,
            "eps": 1e-6, "beta": "0.4 -> 1 linearly", "learning_starts": 1000, "seeds": args.seeds,
            "timing": "median of perf_counter_ns around each buffer call inside the loop (total_s: their sum; "
                      "a loaded machine's preemptions land in it, not in the medians)",
            "before": "the earlier isample runs behind a thin adapter (done as float, batch['indexes']): "
                      "about a microsecond per call of its own" if args.before else None,
        },
        "runs": runs,
        "summary": summarise(runs),
    }
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
