"""The variance study's results: tables, figures and per-checkpoint data (see variance_study).

``write_variance_results(folder, trajectories, owns, command)`` writes

- ``report.md``: V(q) / V(uniform) of every proposal at steps 100 … 700 (mean over seeds, with
  the range), the largest weight 1 / (N q) of each, the own-run ratios, and the gradient's own
  numbers (V(uniform), |g|², how well the bound and the loss track |g_i|);
- ``figures/ratio_vs_step.png``, ``figures/largest_weight_vs_step.png``, ``figures/own_runs.png``;
- ``checkpoints.csv`` (one row per seed, step and proposal) and ``variance.json`` (everything);
- ``lscpu.txt`` and the versions of the packages that computed it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .report import table_lines

__all__ = ["write_variance_results", "ratio_table", "own_table"]

STEPS = (100, 200, 300, 400, 500, 600, 700)


def _at(trajectory: Dict[str, Any], step: int) -> Optional[Dict[str, Any]]:
    return next((r for r in trajectory["checkpoints"] if r["step"] == step), None)


def _summary(values: Sequence[float]) -> str:
    """mean (min–max), or – when there is nothing."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if any(math.isinf(v) for v in values):
        return "inf"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ({min(values):.3g}–{max(values):.3g})"


def _median(values: Sequence[float]) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _proposals(trajectories: Sequence[Dict[str, Any]]) -> List[str]:
    """Every proposal label: the oracles in their fixed order, then the shadows as they come."""
    from .variance_study import PROPOSALS

    present = {label for t in trajectories for r in t["checkpoints"] for label in r["proposals"]}
    seen: List[str] = [label for label in PROPOSALS if label in present]
    for t in trajectories:
        for record in t["checkpoints"]:
            for label in record["proposals"]:
                if label not in seen:
                    seen.append(label)
    return seen


def _steps(trajectories: Sequence[Dict[str, Any]]) -> List[int]:
    present = sorted({r["step"] for t in trajectories for r in t["checkpoints"]})
    shown = [s for s in STEPS if s in present]
    return shown or present


def ratio_table(trajectories: Sequence[Dict[str, Any]]) -> List[str]:
    """Markdown: one row per proposal, V(q)/V(uniform) at each shown step, the largest weight."""
    steps = _steps(trajectories)
    last = steps[-1]
    header = ["proposal (score, form)"] + [f"step {s}" for s in steps] + [
        f"largest weight 1/(Nq), step {last} (median)", "largest weight, any step (max)"]
    lines = table_lines(header)
    for label in _proposals(trajectories):
        cells = []
        for step in steps:
            values = []
            for t in trajectories:
                record = _at(t, step)
                if record is not None and label in record["proposals"]:
                    values.append(record["proposals"][label]["ratio"])
            cells.append(_summary(values))
        weights_last = [(_at(t, last) or {}).get("proposals", {}).get(label, {}).get("largest_weight") for t in trajectories]
        weights_any = [r["proposals"][label]["largest_weight"] for t in trajectories for r in t["checkpoints"]
                       if label in r["proposals"]]
        median = _median(weights_last)
        cells += ["–" if median is None else f"{median:.3g}", "–" if not weights_any else f"{max(weights_any):.3g}"]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines


def gradient_table(trajectories: Sequence[Dict[str, Any]]) -> List[str]:
    """Markdown: the gradient's own numbers at each shown step (means over seeds)."""
    steps = [0] + _steps(trajectories)
    header = ["step", "V(uniform) = mean ‖g_i‖² − ‖g‖²", "‖g‖²", "median ‖g_i‖", "99th percentile ‖g_i‖",
              "corr(bound, ‖g_i‖)", "corr(loss, ‖g_i‖)"]
    lines = table_lines(header)
    for step in steps:
        records = [r for r in (_at(t, step) for t in trajectories) if r is not None]
        if not records:
            continue

        def mean(key: str, sub: Optional[str] = None) -> str:
            values = [r[key][sub] if sub else r[key] for r in records]
            return f"{sum(values) / len(values):.3g}"

        lines.append("| " + " | ".join([str(step), mean("v_uniform"), mean("mean_gradient_sq"),
                                           mean("norm_quantiles", "0.5"), mean("norm_quantiles", "0.99"),
                                           mean("corr_bound_norm"), mean("corr_loss_norm")]) + " |")
    return lines


def own_table(owns: Sequence[Dict[str, Any]]) -> List[str]:
    """Markdown: per own run kind, the ratio of the q it drew from at its own parameters."""
    labels: List[str] = []
    for o in owns:
        if o["label"] not in labels:
            labels.append(o["label"])
    steps = sorted({r["step"] for o in owns for r in o["checkpoints"]})
    header = ["run (its own parameters)", "quantity"] + [f"step {s}" for s in steps]
    lines = table_lines(header)
    rows = [("ratio of the q it drew from", "ratio"), ("optimal at the same parameters", "optimal_ratio"),
            ("bound now + 10% uniform, same parameters", "bound_mix_ratio"), ("largest weight 1/(Nq)", "largest_weight"),
            ("median age of the scores (steps)", "score_age_median"), ("items scored at least once", "scored_fraction")]
    for label in labels:
        runs = [o for o in owns if o["label"] == label]
        for title, key in rows:
            if not any(key in r for o in runs for r in o["checkpoints"]):
                continue
            cells = []
            for step in steps:
                values = [r.get(key) for o in runs for r in o["checkpoints"] if r["step"] == step]
                cells.append(_summary(values))
            lines.append("| " + " | ".join([label, title] + cells) + " |")
    return lines


def _csv(trajectories: Sequence[Dict[str, Any]], owns: Sequence[Dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = ["kind", "seed", "step", "proposal", "ratio", "largest_weight", "v_uniform", "mean_gradient_sq",
              "optimal_ratio", "score_age_median", "scored_fraction"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for t in trajectories:
        for r in t["checkpoints"]:
            for label, value in r["proposals"].items():
                writer.writerow({"kind": "same parameters", "seed": t["seed"], "step": r["step"], "proposal": label,
                                 "ratio": value["ratio"], "largest_weight": value["largest_weight"],
                                 "v_uniform": r["v_uniform"], "mean_gradient_sq": r["mean_gradient_sq"]})
    for o in owns:
        for r in o["checkpoints"]:
            writer.writerow({"kind": "own run", "seed": o["seed"], "step": r["step"], "proposal": o["label"],
                             "ratio": r["ratio"], "largest_weight": r["largest_weight"],
                             "optimal_ratio": r["optimal_ratio"], "score_age_median": r.get("score_age_median"),
                             "scored_fraction": r.get("scored_fraction")})
    return buffer.getvalue()


def _figures(folder: Path, trajectories: Sequence[Dict[str, Any]], owns: Sequence[Dict[str, Any]]) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    steps = sorted({r["step"] for t in trajectories for r in t["checkpoints"]})
    labels = _proposals(trajectories)
    for key, name, ylabel in (("ratio", "ratio_vs_step.png", "V(q) / V(uniform)  (log scale)"),
                              ("largest_weight", "largest_weight_vs_step.png", "largest weight 1 / (N q)  (log scale)")):
        fig, ax = plt.subplots(figsize=(11, 6.5))
        cmap = plt.get_cmap("tab20")
        for i, label in enumerate(labels):
            xs, mean, low, high = [], [], [], []
            for step in steps:
                values = [r["proposals"][label][key] for t in trajectories for r in t["checkpoints"]
                          if r["step"] == step and label in r["proposals"]]
                values = [v for v in values if math.isfinite(v)]
                if values:
                    xs.append(step)
                    mean.append(sum(values) / len(values))
                    low.append(min(values))
                    high.append(max(values))
            if not xs:
                continue
            style = "--" if label.startswith("in-training") else "-"
            ax.plot(xs, mean, style, marker="o", markersize=3, color=cmap(i % 20), label=label)
            ax.fill_between(xs, low, high, color=cmap(i % 20), alpha=0.12)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("training step of the uniform run (parameters where every ratio is taken)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'Exact gradient variance' if key == 'ratio' else 'Largest importance weight'} of each proposal, "
                     f"balanced Fashion-MNIST (10,000), small CNN; mean and range over {len(trajectories)} seeds")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if owns:
        fig, ax = plt.subplots(figsize=(9, 5))
        by_label: Dict[str, List[Dict[str, Any]]] = {}
        for o in owns:
            by_label.setdefault(o["label"], []).append(o)
        for i, (label, runs) in enumerate(by_label.items()):
            for key, style, what in (("ratio", "-", "its q"), ("optimal_ratio", ":", "optimal")):
                own_steps = sorted({r["step"] for o in runs for r in o["checkpoints"]})
                means = [sum(r[key] for o in runs for r in o["checkpoints"] if r["step"] == s)
                         / sum(1 for o in runs for r in o["checkpoints"] if r["step"] == s) for s in own_steps]
                ax.plot(own_steps, means, style, marker="o", color=f"C{i}", label=f"{label}: {what}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("training step (each run's own parameters)")
        ax.set_ylabel("V(q) / V(uniform)")
        ax.set_title("Own runs: the q each run drew from, against the optimal q at the same parameters")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "own_runs.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _versions() -> Dict[str, str]:
    import torch

    import isample

    return {"python": platform.python_version(), "torch": torch.__version__, "isample": isample.__version__}


def write_variance_results(folder: Path, trajectories: Sequence[Dict[str, Any]], owns: Sequence[Dict[str, Any]], *,
                           command: str) -> None:
    """Write the variance study's results into `folder` (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints.csv").write_text(_csv(trajectories, owns))
    (folder / "variance.json").write_text(json.dumps({"command": command, "versions": _versions(),
                                                      "trajectories": list(trajectories), "own_runs": list(owns)}, indent=1))
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = "lscpu not available\n"
    (folder / "lscpu.txt").write_text(lscpu)
    figures = _figures(folder / "figures", trajectories, owns)
    seconds = [t["seconds"]["total"] for t in trajectories] + [o["seconds"] for o in owns]
    lines = [
        "# The exact variance of the importance-sampled gradient",
        "",
        f"Command: `{command}` (trains what is missing, then writes this folder). "
        f"Seeds: {sorted({t['seed'] for t in trajectories})}. Machine: {trajectories[0]['cpu'] if trajectories else '?'}; "
        f"versions {_versions()}; task time {sum(seconds) / 60:.1f} min in all (CPU tasks, 1 thread each).",
        "",
        "**Same parameters.** V(q) / V(uniform) of one weighted draw (a batch of b draws with replacement divides "
        "both by b), at the parameters of a uniform SGD run; mean over seeds, (min–max). Below 1: less gradient "
        "noise than uniform sampling. *in-training shadow* rows: the q an in-training policy holds at that step, "
        "its scores updated only when it drew the item (see variance_study).",
        "",
        *ratio_table(trajectories),
        "",
        "**Own runs.** The ratio of the q each run actually drew from, at its own parameters (mean (min–max) over "
        "seeds).",
        "",
        *own_table(owns),
        "",
        "**The gradient itself** (means over seeds): how noisy uniform sampling is, and how well the bound and the "
        "loss track the exact per-example norm (Pearson correlation over the items).",
        "",
        *gradient_table(trajectories),
        "",
        "Files: `checkpoints.csv` (every seed, step and proposal), `variance.json` (everything, with each run's "
        "settings), `figures/` (" + ", ".join(p.name for p in figures) + "), `lscpu.txt`.",
    ]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
