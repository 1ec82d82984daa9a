"""The log-log scaling plot (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence

from .peers import METHOD_NAMES, METHODS
from .workloads import SWEPT, WORKLOADS


def plot(results: List[Dict[str, Any]], methods: Sequence[str], path: str, machine: str = "") -> None:
    """Log-log time per call against n, one panel per swept workload, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    workloads = [w for w in SWEPT if any(r["workload"] == w and r["status"] == "ok" for r in results)]
    columns = 3
    rows = -(-(len(workloads) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), squeeze=False)
    styles = dict(zip(METHOD_NAMES, ["o-", "s--", "^--", "v-.", "x:", "D-", "d--", "P-.", "*-", "h:"]))
    colors = dict(
        zip(
            METHOD_NAMES,
            ["#000000", "#1f77b4", "#17becf", "#ff7f0e", "#bcbd22", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"],
        )
    )
    assert set(METHOD_NAMES) <= set(styles), "every method needs a style in the plot"
    handles = {}
    for ax, workload in zip(axes.flat, workloads):
        for name in methods:
            points = sorted(
                (r["n"], r["median_us"])
                for r in results
                if r["method"] == name and r["workload"] == workload and r["status"] == "ok"
            )
            if points:
                xs, ys = zip(*points)
                (line,) = ax.loglog(
                    xs, ys, styles[name], color=colors[name], label=METHODS[name].label,
                    lw=2.4 if name == "isample" else 1.2, ms=4,
                )
                handles[name] = line
        ax.set_title(WORKLOADS[workload], fontsize=9)
        ax.set_xlabel("n", fontsize=8)
        ax.set_ylabel("median µs per call", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        if high / low < 100:  # a flat panel: label 1-2-5 steps, not decades only
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    legend_ax = list(axes.flat)[len(workloads)] if len(workloads) < rows * columns else axes.flat[-1]
    shown = [m for m in methods if m in handles]
    legend_ax.legend(
        [handles[m] for m in shown], [METHODS[m].label for m in shown], loc="center", fontsize=9, frameon=False
    )
    fig.suptitle(f"isample vs peers, median time per call on the CPU ({machine})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    try:  # a 64-colour palette keeps the committed PNG small
        from PIL import Image

        buffer.seek(0)
        Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
