"""Markdown table of pytest-benchmark medians, with each method's time relative to isample.

Usage: python benchmarks/report.py RESULTS.json [MORE.json ...]
       python benchmarks/report.py --compact RESULTS.json   # drop the raw timings (MBs) before committing

The machine line comes from the first benchmark's extra_info (isample.bench.machine.machine_summary:
lscpu's model and caches, the versions of numpy, torch and every peer) where the suite
recorded it, else from pytest-benchmark's machine_info.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from isample.bench.machine import summary_line


def load(paths):
    groups = defaultdict(dict)
    machine, extra = None, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            method = bench["params"].get("method", bench["name"])
            groups[bench["group"]][method] = bench["stats"]["median"] * 1e6
            extra = extra or bench.get("extra_info") or None
    return groups, machine, extra


# Each group's reference: isample where it runs, else the tree call a sampler step amounts to
# (test_sampler_benchmark's per-step groups, whose ratios then read "× the tree's update").
REFERENCES = ("isample", "core_tree_update")


def table(groups) -> str:
    lines = ["| workload | method | median (µs) | × the reference's time |", "|---|---|---:|---:|"]
    for group, methods in groups.items():
        reference = next((name for name in REFERENCES if name in methods), None)
        ours = methods.get(reference) if reference else None
        for method, median in sorted(methods.items(), key=lambda item: (item[0] != reference, item[1])):
            if method == reference:
                ratio = "reference"
            else:
                ratio = f"{median / ours:,.2f}×" if ours else ""
            lines.append(f"| {group} | {method} | {median:,.1f} | {ratio} |")
    return "\n".join(lines)


def machine_line(machine, extra) -> str:
    if extra and extra.get("cpu"):
        return "Machine: " + summary_line(extra)
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    return f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, Python {machine.get('python_version', '?')}"


def compact(path: str) -> None:
    """Rewrite a pytest-benchmark JSON without each benchmark's raw timings (stats["data"])."""
    with open(path) as f:
        data = json.load(f)
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--compact":
        for path in sys.argv[2:]:
            compact(path)
        sys.exit(0)
    groups, machine, extra = load(sys.argv[1:])
    print(machine_line(machine or {}, extra) + "\n")
    print(table(groups))
