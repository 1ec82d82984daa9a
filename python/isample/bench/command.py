"""The command: ``isample bench`` and ``python -m isample.bench`` (options, the run, its JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .exact import measure_accuracy
from .machine import machine_info
from .memory import isample_tree_bytes
from .overhead import run_overhead
from .peers import METHOD_NAMES, METHODS, peer_status
from .plots import plot
from .settings import Log, Settings
from .speed import add_ratios, run_speed
from .tables import accuracy_table, markdown_report, memory_table, overhead_table, speed_table
from .workloads import BATCH, DEFAULT_ACCURACY_SIZES, DEFAULT_SIZES, QUICK_SIZES, WORKLOADS


def _sizes(text: str, allow_zero: bool = False) -> List[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if part:
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a size: {part!r}") from None
            if value < (0 if allow_zero else 1) or value != int(value):
                raise argparse.ArgumentTypeError(f"not a size: {part!r}")
            sizes.append(int(value))
    return sizes


def _names(allowed: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [x for x in names if x not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
        return names

    return parse


def parse_args(argv: Optional[List[str]]) -> Tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="isample bench",
        description="Time isample against its peers (medians of single calls), measure exactness and memory.",
    )
    parser.add_argument("--sizes", type=_sizes, help="comma-separated n (default: 1e4,5e4,1e5,1e6,1e7,1e8,1e9)")
    parser.add_argument(
        "--workloads", type=_names(list(WORKLOADS), "workload"), help=f"default: all of {','.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--methods", type=_names(METHOD_NAMES, "method"), help=f"default: all of {','.join(METHOD_NAMES)}"
    )
    parser.add_argument("--repeats", type=int, default=20_000, help="most timed calls per cell (default 20000)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed calls per cell (default 3)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timed calls per cell (default 0.5)")
    parser.add_argument(
        "--max-call", type=float, default=5.0, help="skip cells whose one call is predicted above this (s, default 5)"
    )
    parser.add_argument(
        "--max-build", type=float, default=60.0, help="skip a method where its build is predicted above this (s, 60)"
    )
    parser.add_argument("--peer-max-n", type=float, default=1e8, help="largest n for peers; above, isample only (1e8)")
    parser.add_argument(
        "--accuracy-sizes",
        type=lambda text: _sizes(text, allow_zero=True),
        help="n for the exactness figures (default 1e6,1e7); 0 to skip",
    )
    parser.add_argument("--mc-draws", type=float, default=2e7, help="draws for the Monte Carlo exactness rows (2e7)")
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: wait while other processes use a core (before each method's cells, and "
        "before timing a disturbed cell again), at most this many seconds in all (default 0: never wait)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5,
        help="each cell alternates its contenders over this many rounds (forward, then backward; default 5)",
    )
    parser.add_argument(
        "--train-threads", type=int, default=1,
        help="torch threads for the training-step cells (default 1: on a shared machine two threads wait on each other)",
    )
    parser.add_argument(
        "--no-overhead", action="store_true",
        help="skip the sampler-overhead cells (sampler calls, a training step, a DataLoader batch)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the log-log scaling plot (PNG; needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables (and --plot) of a saved run, run nothing")
    parser.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: small n, tiny budgets")
    args = parser.parse_args(argv)
    quick = args.quick
    accuracy_sizes = args.accuracy_sizes
    if accuracy_sizes is None:
        accuracy_sizes = [10_000] if quick else list(DEFAULT_ACCURACY_SIZES)
    settings = Settings(
        sizes=args.sizes or list(QUICK_SIZES if quick else DEFAULT_SIZES),
        workloads=args.workloads or list(WORKLOADS),
        methods=args.methods or METHOD_NAMES,
        budget_s=0.01 if quick and args.budget == 0.5 else args.budget,
        min_repeats=args.min_repeats,
        max_repeats=200 if quick and args.repeats == 20_000 else args.repeats,
        max_call_s=args.max_call,
        max_build_s=args.max_build,
        peer_max_n=int(args.peer_max_n),
        accuracy_sizes=[n for n in accuracy_sizes if n > 0],
        mc_draws=int(200_000 if quick and args.mc_draws == 2e7 else args.mc_draws),
        seed=args.seed,
        quiet_wait_s=args.wait_for_quiet,
        quiet_left_s=args.wait_for_quiet,
        rounds=args.rounds,
        overhead=not args.no_overhead,
        train_threads=args.train_threads,
    )
    if settings.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {settings.rounds}")
    return settings, args


def run(settings: Settings, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run every measurement (printing progress) and return the report that --json writes."""
    log = Log()
    info = machine_info()
    peers = peer_status(settings.methods)
    print(f"isample {info['isample']} {info['isample_build_info']}")
    print(f"{info['cpu']}, {info['cores']} cores; Python {info['python']}, numpy {info['numpy']}, "
          f"torch {info['torch']}")
    for name, status in peers.items():
        text = "ok" if status["available"] else f"SKIPPED: {status['reason']}"
        print(f"  {name:<18} {text}{'; ' + status['note'] if status['note'] else ''}")
    sys.stdout.flush()
    started = time.time()
    results, memory = run_speed(settings, log)
    noisy = [r for r in results if (r.get("other_processes_cores") or 0) > 0.3]
    if noisy:
        cells = ", ".join(f"{r['method']} {r['workload']} n={r['n']:,}" for r in noisy[:10])
        more = " …" if len(noisy) > 10 else ""
        log(f"{len(noisy)} cells ran while other processes used > 0.3 cores: {cells}{more}")
    best = add_ratios(results)
    overhead = run_overhead(settings, log) if settings.overhead else []
    accuracy: List[Dict[str, Any]] = []
    for n in settings.accuracy_sizes:
        methods = [METHODS[name](settings.seed) for name in settings.methods if METHODS[name].unavailable() is None]
        accuracy += measure_accuracy(methods, n, settings.seed, settings.mc_draws, log)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = os.getloadavg()
    return {
        "schema": "isample.bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m isample.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "settings": {
            **vars(settings),
            "batch": BATCH,
            "weights": "timing: uniform [0.001, 1.001); accuracy: accuracy_weights()",
        },
        "workloads": WORKLOADS,
        "peers": peers,
        "results": results,
        "best_peer": best,
        "overhead": overhead,
        "accuracy": accuracy,
        "memory": memory,
        "isample_1e9_bytes": isample_tree_bytes(10**9),
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (or reload one with --from-json); print tables; write JSON and plot."""
    settings, args = parse_args(argv)
    started = time.time()
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        report = run(settings, argv)
    print(speed_table(report["results"], report["settings"]["methods"]))
    if report.get("overhead"):
        print(overhead_table(report["overhead"]))
    if report["accuracy"]:
        print(accuracy_table(report["accuracy"]))
    print(memory_table(report["memory"]))
    if args.markdown:
        print("\n" + markdown_report(report))
    if args.json and not args.from_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"\nwrote {args.json}")
    if args.plot:
        machine = report["machine"]
        plot(report["results"], report["settings"]["methods"], args.plot, f"{machine['cpu']}, {machine['cores']} cores")
        print(f"wrote {args.plot}")
    print(f"total {time.time() - started:.0f} s")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
