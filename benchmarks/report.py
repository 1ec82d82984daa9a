"""Markdown table of pytest-benchmark medians, with each method's time relative to isample.

Usage: python benchmarks/report.py RESULTS.json [MORE.json ...]
       python benchmarks/report.py --compact RESULTS.json   # drop the raw timings (MBs) before committing
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(paths):
    groups = defaultdict(dict)
    machine = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        for bench in data["benchmarks"]:
            method = bench["params"].get("method", bench["name"])
            groups[bench["group"]][method] = bench["stats"]["median"] * 1e6
    return groups, machine


def table(groups) -> str:
    lines = ["| workload | method | median (µs) | × isample's time |", "|---|---|---:|---:|"]
    for group, methods in groups.items():
        ours = methods.get("isample")
        for method, median in sorted(methods.items(), key=lambda item: (item[0] != "isample", item[1])):
            ratio = f"{median / ours:,.1f}×" if ours and method != "isample" else ""
            lines.append(f"| {group} | {method} | {median:,.1f} | {ratio} |")
    return "\n".join(lines)


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
    groups, machine = load(sys.argv[1:])
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    print(f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, Python {machine.get('python_version', '?')}\n")
    print(table(groups))
