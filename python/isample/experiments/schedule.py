"""Run a study's tasks a few at a time, each in its own process, with progress and an ETA.

On a CPU a small CNN's step gains little from a second thread, so ``isample study NAME --jobs
J`` trains J runs at once, each on one thread (``OMP_NUM_THREADS=1``), instead of one run on
J threads. A task declares the cores it occupies: a run with scoring workers takes one for
the trainer and one per worker, so on 2 cores it runs alone and its wall-clock is not
disturbed by another run of ours. Tasks start in the order given, each as soon as its cores
are free (a task that needs more cores than are free waits; later, smaller tasks may pass it).

Each task's output goes to its log file; the scheduler prints one line per start and finish
and a progress line (tasks done of total, elapsed, ETA from the tasks finished so far) at
least every ``report_every`` seconds. It also reads the CPU time of each finished task (its
process and the processes it waited for, such as scoring workers): on a machine shared with
other work the wall-clock stretches, while the CPU time is the work the task did, so the
total CPU time over the cores is what the study takes on idle ones. ``record`` gets every
task's wall-clock and CPU seconds as JSON. A task that fails is reported with the end of its log,
and the others go on; ``run_tasks`` returns the failed ones. Runs resume from their
checkpoints, so rerunning the same command continues an interrupted study.

The training child is ``python -m isample.experiments.schedule train RUN_DIR CONFIG_JSON``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .config import RunConfig

__all__ = ["Task", "run_tasks", "training_task", "format_seconds"]


@dataclasses.dataclass
class Task:
    """One unit of a study: a command run in its own process.

    label: shown in the progress lines. argv: the command. log: its stdout and stderr.
    cores: the cores it occupies (1 thread each). done: True when there is nothing left to do
    (the task is then not started).
    """

    label: str
    argv: List[str]
    log: Path
    cores: int = 1
    done: Callable[[], bool] = lambda: False
    kind: str = "task"  # tasks of a kind take about as long: the ETA is estimated per kind


def format_seconds(seconds: float) -> str:
    """1h02m, 4m05s or 12s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def training_task(config: RunConfig, run_dir: Path, *, restart: bool = False, checkpoint_seconds: float = 300.0) -> Task:
    """The task that trains `config` in `run_dir` (resuming it) in a child process."""
    argv = [sys.executable, "-m", "isample.experiments.schedule", "train", str(run_dir), config.dumps(),
            "--checkpoint-seconds", repr(float(checkpoint_seconds))]
    if restart:
        argv.append("--restart")
    return Task(
        label=config.name,
        kind="training run" + (" with scoring workers" if config.scorers else ""),
        argv=argv,
        log=run_dir / "train.log",
        cores=1 + config.scorers,
        done=(lambda: False) if restart else (lambda: _same_finished_run(run_dir, config)),
    )


def _same_finished_run(run_dir: Path, config: RunConfig) -> bool:
    try:
        saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError):
        return False
    return saved == config and (run_dir / "summary.json").is_file()


def run_tasks(tasks: Sequence[Task], jobs: int, *, say: Callable[[str], None] = print, title: str = "",
              report_every: float = 60.0, poll: float = 0.5, record: Optional[Path] = None) -> List[Task]:
    """Run `tasks` with at most `jobs` cores busy; returns the tasks that failed. `record`: a
    JSON file for each task's wall-clock and CPU seconds (appended to what it holds)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    title = f"[{title}] " if title else ""
    pending = [t for t in tasks if not t.done()]
    skipped = len(tasks) - len(pending)
    total = len(tasks)
    for task in pending:
        if task.cores > jobs:
            say(f"{title}{task.label} needs {task.cores} cores; it runs alone (--jobs {jobs})")
    say(f"{title}{total} task(s): {skipped} already done, {len(pending)} to run, {jobs} core(s) at a time")
    running: List[tuple] = []  # (task, process, log file, start time)
    failed: List[Task] = []
    durations: dict = {}  # kind -> core-seconds of each task of that kind finished here
    started = last_report = time.monotonic()
    done = skipped
    timings = json.loads(record.read_text()) if record is not None and record.is_file() else []
    cpu_total = 0.0

    def progress() -> str:
        elapsed = time.monotonic() - started
        eta = ""
        finished = [d for values in durations.values() for d in values]
        if finished:
            overall = sum(finished) / len(finished)

            def expected(task: Task) -> float:
                same = durations.get(task.kind)
                return sum(same) / len(same) if same else overall * task.cores

            left_seconds = sum(expected(t) for t in pending) + sum(max(0.0, expected(t) - (time.monotonic() - began) * t.cores)
                                                                   for t, _, _, began in running)
            eta = f", ETA ~{format_seconds(left_seconds / jobs)} (from the {len(finished)} task(s) finished, per kind)"
        return f"{title}{done}/{total} done, {len(running)} running, {len(failed)} failed; elapsed {format_seconds(elapsed)}{eta}"

    while pending or running:
        busy = sum(t.cores for t, *_ in running)
        for task in list(pending):
            need = min(task.cores, jobs)  # a task bigger than the machine runs alone
            if busy + need > jobs:
                continue
            task.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(task.log, "a")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(task.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((task, process, log, time.monotonic()))
            pending.remove(task)
            busy += need
            say(f"{title}start {task.label} ({task.cores} core(s)); log {task.log}")
        time.sleep(poll)
        for entry in list(running):
            task, process, log, began = entry
            before = _children_cpu()
            code = process.poll()
            if code is None:
                continue
            cpu = _children_cpu() - before  # this child and what it waited for (its scoring workers)
            cpu_total += cpu
            running.remove(entry)
            log.close()
            seconds = time.monotonic() - began
            done += 1
            timings.append({"task": task.label, "cores": task.cores, "wall_seconds": seconds, "cpu_seconds": cpu,
                            "exit": code, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            if record is not None:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(timings, indent=1))
            if code == 0:
                durations.setdefault(task.kind, []).append(seconds * task.cores)
                say(f"{title}done {task.label} in {format_seconds(seconds)} (CPU {format_seconds(cpu)})")
            else:
                failed.append(task)
                say(f"{title}FAILED {task.label} (exit {code}) after {format_seconds(seconds)}; the end of {task.log}:")
                for line in _tail(task.log, 15):
                    say(f"    {line}")
            say(progress())
            last_report = time.monotonic()
        if running and time.monotonic() - last_report >= report_every:
            say(progress())
            last_report = time.monotonic()
    say(f"{title}finished: {total - len(failed)}/{total} tasks, {len(failed)} failed, "
        f"in {format_seconds(time.monotonic() - started)}; CPU time {format_seconds(cpu_total)} "
        f"(about {format_seconds(cpu_total / jobs)} on {jobs} idle core(s))")
    return failed


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(path: Path, lines: int) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def main(argv: Optional[List[str]] = None) -> int:
    """The training child: train one configuration in its folder (resuming it)."""
    parser = argparse.ArgumentParser(prog="python -m isample.experiments.schedule")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (the child of a scheduled study)")
    t.add_argument("run_dir")
    t.add_argument("config", help="the RunConfig as JSON")
    t.add_argument("--restart", action="store_true")
    t.add_argument("--checkpoint-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    import torch

    from .train import train

    torch.set_num_threads(1)
    config = RunConfig.from_dict(json.loads(args.config))
    summary = train(config, Path(args.run_dir), resume=not args.restart, progress=False,
                    checkpoint_seconds=args.checkpoint_seconds, log=lambda line: print(line, flush=True))
    print(f"[{config.name}] done: best test accuracy {summary['best_test_accuracy']:.4f}, final "
          f"{summary['final_test_accuracy']:.4f} ({summary['stop_reason']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
