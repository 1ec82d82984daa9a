"""The seed paper's figures from run folders (``isample plot RUN... --out DIR``).

- ``fig1_train_loss.png``, ``fig2_train_accuracy.png``, ``fig3_test_accuracy.png``: against
  epoch, the mean over seeds with a ± one standard deviation band, one line per method, one
  panel per augmentation setting (shared y axis), as the paper's Figures 1-3;
- ``fig4_scores_<method>.png``, one per importance-sampling method: the distribution of the
  scores after each epoch (an image of epochs × score bins; darker = more items, on a log
  scale) with the median and the 5% / 95% quantiles drawn over it, for the lowest seed, as the
  paper's Figures 4-5;
- ``fig6_cost_breakdown.png``: the share of wall-clock in training, evaluation and sampling
  per method, as the paper's Appendix C Figure 6;
- ``fig7_test_accuracy_by_budget.png``: test accuracy against gradient steps and against
  training + sampling seconds, where methods with short epochs (|Z| < N, pruning) compete;
- ``fig_balanced_accuracy.png`` on long-tailed data: balanced and worst-class test accuracy;
- ``fig_weights.png`` when the records hold importance weights: the mean weight of the items
  each epoch trained on (it multiplies the epoch's step size) and the largest, against
  gradient steps, one line per seed, on a log scale (how the weights of the seed paper's
  samplers grow before they diverge).

When the runs hold more than one data set / model, every file name gets a ``_<data>_<model>``
suffix. matplotlib is imported only here, through its object-oriented API (no pyplot), so the
caller's backend is left alone and no figure outlives the call.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .report import Group, PathLike, Run, load_runs, time_split

__all__ = ["plot_runs"]

DPI = 100
SCORE_ROWS = 120  # score bins of the fig4 image (each epoch's histogram is re-binned onto them)
PHASE_COLORS = {"training": "#4c72b0", "evaluation": "#b0b0b0", "sampling": "#d62728"}


def plot_runs(runs: Iterable[PathLike], out: PathLike) -> List[Path]:
    """Draw the figures of the run folders `runs` (run folders or folders of them) into `out`.

    Incomplete runs are drawn with the epochs they have. Returns the paths written.
    Raises ValueError for a path that is not a run folder, or when no run has an epoch yet.
    """
    from matplotlib.figure import Figure  # lazily: the experiments import without matplotlib

    groups = [g for g in load_runs(runs) if any(r["history"] for r in g["runs"])]
    if not groups:
        raise ValueError("none of the runs has finished an epoch yet: nothing to draw")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = _method_colors(groups)
    settings: Dict[Tuple[str, str], List[Group]] = {}
    for g in groups:
        settings.setdefault((g["dataset"], g["model"]), []).append(g)
    written: List[Path] = []
    for (dataset, model), members in settings.items():
        suffix = "" if len(settings) == 1 else f"_{_slug(dataset)}_{_slug(model)}"
        where = f"{dataset}, {model}"

        def save(fig: Any, name: str) -> None:
            path = out / f"{name}{suffix}.png"
            fig.savefig(path, dpi=DPI)
            written.append(path)

        for name, key, label, percent in (
            ("fig1_train_loss", "train_loss", "training loss", False),
            ("fig2_train_accuracy", "train_accuracy", "training accuracy (%)", True),
            ("fig3_test_accuracy", "test_accuracy", "test accuracy (%)", True),
        ):
            fig = Figure(figsize=(_width(members), 4.2), layout="constrained")
            _curves(fig, members, [(key, label)], colors, percent)
            title = label.replace(" (%)", "").capitalize()
            fig.suptitle(f"{title} per epoch\n{where}; mean ± std over seeds", fontsize=11)
            save(fig, name)
        for method in dict.fromkeys(g["method"] for g in members):
            scored = [g for g in members if g["method"] == method and _scored_run(g) is not None]
            if scored:
                fig = Figure(figsize=(_width(scored) + 0.5, 4.2), layout="constrained")
                _score_images(fig, scored)
                fig.suptitle(f"Distribution of the scores under {method}\n{where}", fontsize=11)
                save(fig, f"fig4_scores_{_slug(method)}")
        fig = Figure(figsize=(10, 1.4 + 0.45 * len(members)), layout="constrained")
        _cost_breakdown(fig, members)
        fig.suptitle(f"Where the wall-clock goes: training, evaluation, sampling\n{where}", fontsize=11)
        save(fig, "fig6_cost_breakdown")
        fig = Figure(figsize=(11, 4.2 * len({g["augment"] for g in members})), layout="constrained")
        _budget_curves(fig, members, colors)
        fig.suptitle(f"Test accuracy against gradient steps and training time\n{where}; mean ± std over seeds",
                     fontsize=11)
        save(fig, "fig7_test_accuracy_by_budget")
        weighted = [g for g in members if any("weights" in x for r in g["runs"] for x in r["history"])]
        if weighted:
            fig = Figure(figsize=(13, 5), layout="constrained")
            _weight_curves(fig, weighted, colors)
            fig.suptitle(f"Importance weights per epoch (each seed a line)\n{where}", fontsize=11)
            save(fig, "fig_weights")
        if any(g["long_tailed"] for g in members):
            fig = Figure(figsize=(_width(members), 7), layout="constrained")
            _curves(fig, members, [("balanced_accuracy", "balanced test accuracy (%)"),
                                   ("worst_class_accuracy", "worst-class test accuracy (%)")], colors, True)
            fig.suptitle(f"Balanced and worst-class test accuracy per epoch\n{where}; mean ± std over seeds",
                         fontsize=11)
            save(fig, "fig_balanced_accuracy")
    return written


def _width(groups: Sequence[Group]) -> float:
    """Figure width in inches: one panel per augmentation setting present."""
    return 1.5 + 5.0 * len({g["augment"] for g in groups})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def _method_colors(groups: Sequence[Group]) -> Dict[str, Any]:
    """One colour per method, the same in every figure (uniform: black)."""
    methods = [m for m in dict.fromkeys(g["method"] for g in groups) if m != "uniform"]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    colors["uniform"] = "black"
    return colors


def _aug_label(augment: bool) -> str:
    return "with augmentation" if augment else "without augmentation"


def _curve(runs: Sequence[Run], key: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs (1-based), mean, std (ddof 1; NaN with one seed) and seed count at each epoch.

    Seeds that stopped earlier (early stopping, incomplete) drop out of the later epochs.
    """
    length = max(len(r["history"]) for r in runs)
    values = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        for j, record in enumerate(r["history"]):
            values[i, j] = record.get(key, np.nan)
    count = np.sum(~np.isnan(values), axis=0)
    mean = np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)  # no empty-slice warning
    std = np.full(length, np.nan)
    several = count >= 2
    std[several] = np.nanstd(values[:, several], axis=0, ddof=1)
    return np.arange(1, length + 1), mean, std, count


def _curves(fig: Any, groups: Sequence[Group], metrics: Sequence[Tuple[str, str]], colors: Dict[str, Any],
            percent: bool) -> None:
    """Rows: metrics; columns: augmentation settings (augmented first); one line per method."""
    from matplotlib.ticker import MaxNLocator

    settings = sorted({g["augment"] for g in groups}, reverse=True)
    axes = fig.subplots(len(metrics), len(settings), sharey="row", sharex=True, squeeze=False)
    scale = 100.0 if percent else 1.0
    for row, (key, label) in enumerate(metrics):
        for col, augment in enumerate(settings):
            ax = axes[row, col]
            partial = False
            for g in groups:
                runs = [r for r in g["runs"] if r["history"]]
                if g["augment"] != augment or not runs:
                    continue
                x, mean, std, count = _curve(runs, key)
                incomplete = sum(r["summary"] is None for r in g["runs"])
                name = f"{g['method']} ({len(runs)} seed{'s' if len(runs) > 1 else ''}"
                name += f", {incomplete} incomplete)" if incomplete else ")"
                color = colors[g["method"]]
                marker = "o" if len(x) <= 12 else None
                # Past the epoch where a seed stopped, the mean is over fewer seeds and may jump:
                # that part is dotted with hollow markers.
                full = int(np.sum(count == len(runs)))
                ax.plot(x[:full], scale * mean[:full], color=color, lw=1.8, marker=marker, ms=3.5, label=name)
                if full < len(x):
                    partial = True
                    start = max(full - 1, 0)
                    ax.plot(x[start:], scale * mean[start:], color=color, lw=1.5, ls=":", marker=marker, ms=4,
                            mfc="white", markevery=slice(full - start, None),
                            label=None if full else name)
                low, high = scale * (mean - std), scale * (mean + std)
                if percent:
                    low, high = np.clip(low, 0.0, 100.0), np.clip(high, 0.0, 100.0)
                ax.fill_between(x, low, high, color=color, alpha=0.18, lw=0)
            if partial:
                ax.plot([], [], color="0.4", lw=1.5, ls=":", marker="o", ms=4, mfc="white",
                        label="fewer seeds (the others stopped earlier)")
            if row == 0:
                ax.set_title(_aug_label(augment))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if row == len(metrics) - 1:
                ax.set_xlabel("epoch")
            if row == 0 or partial:
                ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _weight_curves(fig: Any, groups: Sequence[Group], colors: Dict[str, Any]) -> None:
    """Left: the mean weight of each epoch's items; right: the largest; against steps, log y."""
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, key, label in ((axes[0], "mean", "mean weight of the items trained on"),
                           (axes[1], "max", "largest weight of the items trained on")):
        for g in groups:
            for i, r in enumerate(g["runs"]):
                points = [(x["steps"], x["weights"][key]) for x in r["history"] if "weights" in x]
                points = [(s, w) for s, w in points if np.isfinite(w) and w > 0]
                if not points:
                    continue
                steps, values = zip(*points)
                ax.plot(steps, values, color=colors[g["method"]], lw=1.2, alpha=0.85,
                        label=g["method"] if i == 0 else None)
                if r["summary"] is not None and str(r["summary"].get("stop_reason", "")).startswith("diverged"):
                    ax.plot(steps[-1], values[-1], "x", color=colors[g["method"]], ms=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel(label + " (log)")
        ax.grid(alpha=0.3)
    axes[1].plot([], [], "x", color="0.3", label="diverged after this epoch")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def _budget_x(runs: Sequence[Run], length: int, seconds: bool) -> np.ndarray:
    """Per epoch index, the mean over the seeds that have it of the gradient steps, or of the
    training + sampling seconds, at the end of that epoch."""
    values = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        if seconds:
            x = np.cumsum([rec["seconds"].get("training", 0.0) + rec["seconds"].get("sampling", 0.0)
                           for rec in r["history"]])
        else:
            x = np.array([float(rec.get("steps", np.nan)) for rec in r["history"]])
        values[i, : len(x)] = x
    return np.nanmean(values, axis=0)


def _budget_curves(fig: Any, groups: Sequence[Group], colors: Dict[str, Any]) -> None:
    """Rows: augmentation settings; columns: test accuracy against steps and against seconds.

    Methods whose epochs are shorter (|Z| < N, pruning) do more epochs in the same budget, so
    these axes, not the epoch, are where they compete with uniform sampling."""
    settings = sorted({g["augment"] for g in groups}, reverse=True)
    axes = fig.subplots(len(settings), 2, sharey=True, squeeze=False)
    for row, augment in enumerate(settings):
        for col, (seconds, xlabel) in enumerate(((False, "gradient steps"), (True, "training + sampling seconds"))):
            ax = axes[row, col]
            for g in groups:
                runs = [r for r in g["runs"] if r["history"]]
                if g["augment"] != augment or not runs:
                    continue
                _, mean, std, _ = _curve(runs, "test_accuracy")
                x = _budget_x(runs, len(mean), seconds)
                color = colors[g["method"]]
                ax.plot(x, 100 * mean, color=color, lw=1.6, label=g["method"])
                ax.fill_between(x, np.clip(100 * (mean - std), 0, 100), np.clip(100 * (mean + std), 0, 100),
                                color=color, alpha=0.15, lw=0)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"test accuracy (%), {_aug_label(augment)}")
                ax.legend(fontsize=8, loc="lower right", framealpha=0.85)


def _scored_run(group: Group) -> Optional[Run]:
    """The lowest seed with score snapshots (the figure shows one seed, as the paper does)."""
    for r in group["runs"]:
        if any("scores" in record for record in r["history"]):
            return r
    return None


def _rebin(snapshot: Dict[str, Any], edges: np.ndarray) -> np.ndarray:
    """An epoch's score histogram (its own bins over [min, max]) as counts on common `edges`,
    assuming the items spread evenly within each bin."""
    counts = np.asarray(snapshot["histogram"], dtype=np.float64)
    lo, hi = float(snapshot["min"]), float(snapshot["max"])
    if not hi > lo:  # every score equal: a point mass
        out = np.zeros(len(edges) - 1)
        out[min(max(np.searchsorted(edges, lo, side="right") - 1, 0), len(out) - 1)] = counts.sum()
        return out
    source = np.linspace(lo, hi, len(counts) + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(edges, source, cumulative))


def _score_images(fig: Any, groups: Sequence[Group]) -> None:
    """One panel per augmentation setting: epochs × score bins, shaded by the share of items."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    # The palest blues read as white; white is kept for empty bins (NaN).
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.2, 1.0, 256))).with_extremes(bad="white")
    image = None
    for ax, g in zip(axes, sorted(groups, key=lambda g: not g["augment"])):
        run = _scored_run(g)
        assert run is not None
        records = [(i + 1, r) for i, r in enumerate(run["history"]) if "scores" in r]
        snapshots = [r["scores"] for _, r in records]
        epochs = np.array([e for e, _ in records])
        lo = min(s["min"] for s in snapshots)
        hi = max(s["max"] for s in snapshots)
        hi = hi if hi > lo else lo + 1.0
        edges = np.linspace(lo, hi, SCORE_ROWS + 1)
        share = np.stack([_rebin(s, edges) / max(1.0, float(sum(s["histogram"]))) for s in snapshots], axis=1)
        items = max(float(sum(s["histogram"])) for s in snapshots)
        # Log colour scale: the tail of high scores (the items importance sampling favours)
        # holds few items and would be invisible on a linear one. Only empty bins are white; a
        # lone item re-binned over a few rows is still drawn, in the lightest blue.
        shown = np.where(share > 0, share, np.nan)
        image = ax.imshow(
            shown, origin="lower", aspect="auto", interpolation="nearest", cmap=cmap,
            extent=(epochs[0] - 0.5, epochs[-1] + 0.5, lo, hi),
            norm=LogNorm(vmin=0.5 / items, vmax=max(float(np.nanmax(shown)), 1.0 / items), clip=True),
        )
        for q, style, name in (("0.5", "-", "median"), ("0.05", "--", "5% / 95%"), ("0.95", "--", None)):
            ys = [s["quantiles"].get(q, np.nan) for s in snapshots]
            ax.plot(epochs, ys, color="#ff7f0e", ls=style, lw=1.3, marker="." if len(epochs) <= 30 else None,
                    label=name)
        warmup = [e for e, r in records if r.get("sampler", {}).get("kind") == "warmup"]
        if warmup:
            # A line, not a shade: a shade would change the colours that encode the counts.
            ax.axvline(max(warmup) + 0.5, color="0.3", ls="--", lw=1)
            ax.text(max(warmup) + 0.45, hi, "warm-up\n(uniform) ", va="top", ha="right", fontsize=7, color="0.3")
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_aug_label(g['augment'])}, seed {run['seed']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("score")
        ax.legend(fontsize=8, loc="upper right", framealpha=0.85)
    fig.colorbar(image, ax=list(axes), label="share of items in the score bin (log scale)", shrink=0.9)


def _cost_breakdown(fig: Any, groups: Sequence[Group]) -> None:
    """Stacked horizontal bars: each phase's mean share of a run's wall-clock, over seeds."""
    ax = fig.subplots()
    labels, shares, totals = [], [], []
    for g in groups:
        splits = [time_split(r) for r in g["runs"] if r["history"]]
        per_run = [{k: v / sum(s.values()) for k, v in s.items()} for s in splits if sum(s.values()) > 0]
        if not per_run:
            continue
        labels.append(f"{g['method']}, {'aug' if g['augment'] else 'no aug'}")
        shares.append({k: float(np.mean([p[k] for p in per_run])) for k in PHASE_COLORS})
        totals.append(float(np.mean([sum(s.values()) for s in splits])))
    y = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    for phase, color in PHASE_COLORS.items():
        widths = np.array([100 * s[phase] for s in shares])
        ax.barh(y, widths, left=left, color=color, label=phase, height=0.6)
        if phase != "sampling":
            for yi, l, w in zip(y, left, widths):
                if w > 8:
                    ax.text(l + w / 2, yi, f"{w:.0f}%", ha="center", va="center", fontsize=8, color="white")
        left += widths
    for yi, s, total in zip(y, shares, totals):
        # The sampling share is usually far too thin to see, so it is printed beside the bar.
        percent = 100 * s["sampling"]
        ax.text(101, yi, f"sampling {percent:.{2 if percent >= 0.1 else 3}f}%  ({total:.0f} s/run)", va="center",
                fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 128)
    ax.set_xticks(np.arange(0, 101, 20))
    ax.set_xlabel("share of wall-clock (%), mean over seeds")
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
