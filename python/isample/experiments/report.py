"""A markdown report of training runs, and the reader of run folders that the figures share.

``load_runs(paths)`` reads each run folder once (``config.json``, ``metrics.jsonl``, and
``summary.json`` when the run is complete) and groups the runs that differ only by seed.
``report(paths)`` turns the groups into one markdown table (one row per data set, model,
method and augmentation setting) and a paired comparison of each method against uniform
sampling with the same seeds.

Everything is computed from the per-epoch records, so an incomplete run (no summary.json)
counts with the epochs it has. Accuracies are fractions in the records and percentages in the
report; "± x" is the sample standard deviation over seeds (ddof = 1).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypedDict, Union

from .config import METHODS, RunConfig
from .train import load_history

__all__ = [
    "load_runs", "run_folders", "report", "group_stats", "paired_comparisons", "time_split", "best_within",
    "equal_time_budgets", "relative_targets",
]

PathLike = Union[str, "os.PathLike[str]"]

# Configuration fields that do not make two runs different experiments: the seed is what a
# group averages over; the others change where a run ran or what it reports, not what it trains.
NOT_GROUPED = ("seed", "device", "data_dir", "target_accuracy", "eval_batch_size", "score_bins")
PHASES = ("training", "evaluation", "sampling")


class Run(TypedDict):
    """One run folder, read."""

    path: Path
    config: RunConfig
    seed: int
    history: List[Dict[str, Any]]  # the records of metrics.jsonl, one per finished epoch
    summary: Optional[Dict[str, Any]]  # summary.json; None while the run is incomplete


class Group(TypedDict):
    """Runs that differ only by seed, sorted by seed."""

    dataset: str  # with its variant, as in RunConfig.name: "cifar10-lt100", "fashion-mnist-sub2000"
    model: str
    method: str  # RunConfig.method_label, plus what else tells it apart from a same-named group
    augment: bool
    long_tailed: bool  # imbalanced data: balanced and worst-class accuracy are reported too
    runs: List[Run]


def run_folders(paths: Iterable[PathLike]) -> List[Path]:
    """The run folders named by `paths`: each is a run folder (it holds config.json) or a folder
    of run folders. Raises ValueError for anything else."""
    found: List[Path] = []
    for entry in paths:
        path = Path(entry)
        if (path / "config.json").is_file():
            found.append(path)
            continue
        children = sorted(p for p in path.iterdir() if (p / "config.json").is_file()) if path.is_dir() else []
        if not children:
            what = "does not exist" if not path.exists() else "holds no config.json and no run folders"
            raise ValueError(f"{path} is not a run folder: it {what}")
        found.extend(children)
    unique: Dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)  # the same run named twice counts once
    return list(unique.values())


def _read_run(path: Path) -> Tuple[Run, Dict[str, Any]]:
    """The run, and its config.json as written (for grouping)."""
    try:
        values = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a run folder: config.json is not valid JSON ({error})") from None
    # Keep only the fields this version knows, so folders written by an older or newer
    # version still load; the grouping below uses the raw values, so nothing is merged by it.
    known = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig.from_dict({k: v for k, v in values.items() if k in known})
    history = load_history(path) if (path / "metrics.jsonl").is_file() else []
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return {"path": path, "config": config, "seed": config.seed, "history": history, "summary": summary}, values


def _dataset_label(config: RunConfig) -> str:
    parts = [config.dataset]
    if config.imbalance_ratio > 1:
        parts.append(f"lt{config.imbalance_ratio:g}")
    if config.train_subset:
        parts.append(f"sub{config.train_subset}")
    return "-".join(parts)


def _method_order(label: str) -> Tuple[int, str]:
    base = label.split("-")[0]
    return (METHODS.index(base) if base in METHODS else len(METHODS), label)


def load_runs(paths: Iterable[PathLike]) -> List[Group]:
    """Read the run folders in `paths` (run folders or folders of them) and group them.

    Runs are in one group when their config.json agree on everything but the seed (and the
    fields in NOT_GROUPED). Groups come sorted by data set, model, augmentation (augmented
    first) and method (uniform first).
    """
    by_key: Dict[str, List[Run]] = collections.defaultdict(list)
    for path in run_folders(paths):
        run, raw = _read_run(path)
        key = json.dumps({k: v for k, v in raw.items() if k not in NOT_GROUPED}, sort_keys=True)
        by_key[key].append(run)
    groups: List[Group] = []
    keys: List[Dict[str, Any]] = []
    for key, members in by_key.items():
        seeds = [r["seed"] for r in members]
        if len(set(seeds)) < len(seeds):
            where = ", ".join(str(r["path"]) for r in members)
            raise ValueError(f"two runs of the same configuration share a seed: {where}")
        config = members[0]["config"]
        groups.append({
            "dataset": _dataset_label(config),
            "model": config.model,
            "method": config.method_label,
            "augment": config.augment,
            "long_tailed": config.imbalance_ratio > 1 or any(_imbalanced(r["history"]) for r in members),
            "runs": sorted(members, key=lambda r: r["seed"]),
        })
        keys.append(json.loads(key))
    _disambiguate(groups, keys)
    groups.sort(key=lambda g: (g["dataset"], g["model"], not g["augment"], _method_order(g["method"])))
    return groups


def _imbalanced(history: Sequence[Dict[str, Any]]) -> bool:
    # On a test set with equal class counts the balanced accuracy equals the accuracy.
    return any(abs(r.get("balanced_accuracy", r["test_accuracy"]) - r["test_accuracy"]) > 1e-9 for r in history)


def _disambiguate(groups: List[Group], keys: List[Dict[str, Any]]) -> None:
    """Append the differing settings to the labels of groups that would otherwise read the same
    (`keys`: each group's configuration without the seed)."""
    same: Dict[Tuple[str, str, str, bool], List[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        same[(g["dataset"], g["model"], g["method"], g["augment"])].append(i)
    for indices in same.values():
        if len(indices) == 1:
            continue
        members, configs = [groups[i] for i in indices], [keys[i] for i in indices]
        differing = sorted(k for k in set().union(*configs) if len({json.dumps(d.get(k)) for d in configs}) > 1)
        for g, d in zip(members, configs):
            g["method"] += " (" + ", ".join(f"{k}={d.get(k)}" for k in differing) + ")"


# -- per-run and per-group numbers ---------------------------------------------------------


def time_split(run: Run) -> Dict[str, float]:
    """Seconds of the run in training, evaluation and sampling (summed over its epochs)."""
    return {k: sum(r["seconds"].get(k, 0.0) for r in run["history"]) for k in PHASES}


def _train_seconds(record: Dict[str, Any]) -> float:
    return record["seconds"].get("training", 0.0) + record["seconds"].get("sampling", 0.0)


def _time_to_target(history: Sequence[Dict[str, Any]], target: float) -> Optional[Tuple[int, float, int]]:
    """(epochs, training + sampling seconds, gradient steps) until the test accuracy first
    reaches `target`."""
    elapsed = 0.0
    for count, r in enumerate(history, start=1):
        elapsed += _train_seconds(r)
        if r["test_accuracy"] >= target:
            return count, elapsed, int(r.get("steps", 0))
    return None


def best_within(history: Sequence[Dict[str, Any]], seconds: float) -> Optional[float]:
    """The best test accuracy of the epochs that ended within `seconds` of training + sampling
    time (a wall-clock budget, evaluation not counted); None if the first epoch took longer."""
    elapsed, best = 0.0, None
    for r in history:
        elapsed += _train_seconds(r)
        if elapsed > seconds * (1 + 1e-9):
            break
        best = r["test_accuracy"] if best is None else max(best, r["test_accuracy"])
    return best


def _setting(g: Group) -> Tuple[str, str, bool]:
    return g["dataset"], g["model"], g["augment"]


def equal_time_budgets(groups: Sequence[Group]) -> Dict[Tuple[str, str, bool], float]:
    """Per setting (data, model, augmentation): the wall-clock budget at which its methods are
    compared, uniform sampling's mean training + sampling time there (without uniform: the
    smallest mean of any group). A method that costs more per step gets fewer steps in it; one
    that stopped earlier (diverged, early stopping) counts what it reached."""
    budgets: Dict[Tuple[str, str, bool], float] = {}
    uniform: Dict[Tuple[str, str, bool], float] = {}
    for g in groups:
        runs = [r for r in g["runs"] if r["history"]]
        if not runs:
            continue
        mean = sum(sum(_train_seconds(x) for x in r["history"]) for r in runs) / len(runs)
        key = _setting(g)
        budgets[key] = min(budgets.get(key, math.inf), mean)
        if g["runs"][0]["config"].method == "uniform":
            uniform[key] = mean
    return {**budgets, **uniform}


def relative_targets(groups: Sequence[Group], fraction: float) -> Dict[Tuple[str, str, bool], float]:
    """Per setting: `fraction` × the mean best test accuracy of uniform sampling there."""
    targets = {}
    for g in groups:
        runs = [r for r in g["runs"] if r["history"]]
        if g["runs"][0]["config"].method == "uniform" and runs:
            targets[_setting(g)] = fraction * sum(max(x["test_accuracy"] for x in r["history"]) for r in runs) / len(runs)
    return targets


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _resolve_target(groups: Sequence[Group], target_accuracy: Optional[float]) -> Optional[float]:
    if target_accuracy is None:
        # Fall back to the target the runs were trained with, when they all agree on one.
        targets = {r["config"].target_accuracy for g in groups for r in g["runs"]}
        target_accuracy = targets.pop() if len(targets) == 1 else None
    if target_accuracy is not None and target_accuracy > 1.0:
        target_accuracy /= 100.0  # given in percent
    return target_accuracy


def group_stats(group: Group, target_accuracy: Optional[float] = None) -> Dict[str, Any]:
    """The numbers of one report row, as fractions and seconds (None where undefined).

    Keys: seeds, incomplete, best/final (test accuracy), final_balanced, final_worst (each a
    (mean, std) pair), overhead (sampling share of all wall-clock, (mean, std)), reached (seeds
    that reached the target), epochs_to_target, seconds_to_target and steps_to_target (means
    over those), steps (mean gradient steps trained), stop_reasons (a Counter).
    """
    runs = [r for r in group["runs"] if r["history"]]
    stats: Dict[str, Any] = {"seeds": len(runs), "incomplete": sum(r["summary"] is None for r in group["runs"])}
    for name, key, pick in (
        ("best", "test_accuracy", max),
        ("final", "test_accuracy", lambda v: v[-1]),
        ("final_balanced", "balanced_accuracy", lambda v: v[-1]),
        ("final_worst", "worst_class_accuracy", lambda v: v[-1]),
    ):
        stats[name] = _mean_std([pick([rec[key] for rec in r["history"]]) for r in runs if key in r["history"][0]])
    shares = []
    for r in runs:
        split = time_split(r)
        total = sum(split.values())
        shares.append(split["sampling"] / total if total > 0 else 0.0)
    stats["overhead"] = _mean_std(shares)
    stats["target"] = target_accuracy
    hits = []
    if target_accuracy is not None:
        hits = [h for h in (_time_to_target(r["history"], target_accuracy) for r in runs) if h is not None]
    stats["reached"] = len(hits)
    stats["epochs_to_target"] = _mean_std([float(h[0]) for h in hits])[0]
    stats["seconds_to_target"] = _mean_std([h[1] for h in hits])[0]
    stats["steps_to_target"] = _mean_std([float(h[2]) for h in hits])[0]
    stats["steps"] = _mean_std([float(r["history"][-1].get("steps", 0)) for r in runs])[0]
    stats["stop_reasons"] = collections.Counter(
        f"incomplete ({len(r['history'])} epochs)" if r["summary"] is None else str(r["summary"].get("stop_reason"))
        for r in group["runs"]
    )
    return stats


def paired_comparisons(
    groups: Sequence[Group], value: Optional[Callable[[Group, Run], Optional[float]]] = None
) -> List[Dict[str, Any]]:
    """Each method against uniform sampling with the same data, model and augmentation.

    `value(group, run)` is the number compared (default: the run's best test accuracy); the
    values are paired by seed (seeds only one side has, or with no value, are left out).
    Returns dicts with the two groups, seeds (paired), differences (method − uniform, one per
    paired seed), mean, se (standard error of the mean, None with one seed) and p (two-sided
    paired t-test, None with fewer than two seeds or without scipy).
    """
    def uniform(g: Group) -> bool:
        return g["runs"][0]["config"].method == "uniform"

    out: List[Dict[str, Any]] = []
    for g in groups:
        if uniform(g):
            continue
        for base in groups:
            if not uniform(base) or (base["dataset"], base["model"], base["augment"]) != (
                g["dataset"], g["model"], g["augment"]
            ):
                continue
            best_base = _values(base, value)
            best = _values(g, value)
            seeds = sorted(set(best) & set(best_base))
            diffs = [best[s] - best_base[s] for s in seeds]
            mean, std = _mean_std(diffs)
            se = None if std is None else std / math.sqrt(len(diffs))
            out.append({"method": g, "uniform": base, "seeds": seeds, "differences": diffs, "mean": mean,
                        "se": se, "p": _paired_p(diffs)})
    return out


def _values(group: Group, value: Optional[Callable[[Group, Run], Optional[float]]]) -> Dict[int, float]:
    out = {}
    for r in group["runs"]:
        if not r["history"]:
            continue
        v = max(x["test_accuracy"] for x in r["history"]) if value is None else value(group, r)
        if v is not None:
            out[r["seed"]] = v
    return out


def _paired_p(diffs: Sequence[float]) -> Optional[float]:
    if len(diffs) < 2:
        return None
    if all(d == diffs[0] for d in diffs):
        return 1.0 if diffs[0] == 0 else 0.0  # no spread: the t statistic is 0 or infinite
    try:
        import scipy.stats
    except ImportError:
        return None
    return float(scipy.stats.ttest_1samp(diffs, 0.0).pvalue)  # the paired t-test on the differences


# -- markdown ------------------------------------------------------------------------------


def table_lines(header: Sequence[str], rows: Iterable[Sequence[str]] = ()) -> List[str]:
    """A markdown table's lines: the header, its rule, then one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows]


def _pct(value: Optional[Tuple[Optional[float], Optional[float]]], digits: int = 2) -> str:
    mean, std = value if value is not None else (None, None)
    if mean is None:
        return "–"
    return f"{100 * mean:.{digits}f}" + ("" if std is None else f" ± {100 * std:.{digits}f}")


def _verdict(c: Dict[str, Any], alpha: float = 0.05) -> str:
    if c["mean"] is None:
        return "no seed in common with uniform"
    if c["se"] is None:
        return "one seed: no estimate of the noise"
    outside = c["p"] < alpha if c["p"] is not None else abs(c["mean"]) >= 2 * c["se"]
    if not outside:
        return "within the noise"
    return "better than uniform" if c["mean"] > 0 else "worse than uniform"


def report(
    runs: Iterable[PathLike],
    target_accuracy: Optional[float] = None,
    *,
    relative_target: Optional[float] = None,
    equal_time: bool = False,
    weights: bool = False,
    cost: bool = False,
) -> str:
    """A markdown report of the run folders in `runs` (run folders or folders of them).

    target_accuracy: test accuracy (a fraction, or a percentage if > 1) for the epochs, steps
        and training time to reach it; default: the runs' own config target_accuracy, if they
        share one.
    relative_target: instead, a target per setting (data, model, augmentation): this fraction
        of uniform sampling's mean best test accuracy there (0.98: within 2% of uniform's best).
    equal_time: add the best test accuracy within an equal wall-clock budget per setting (see
        :func:`equal_time_budgets`), and a paired comparison at that budget.
    weights: add how each importance-sampled group's weights evolved (:func:`weight_table`).
    cost: add the training loss over the whole training set and the cost of each group
        (:func:`cost_table`): wall-clock, the trainer's CPU time and the scoring workers' apart.
    """
    groups = load_runs(runs)
    if relative_target is not None and target_accuracy is not None:
        raise ValueError("give target_accuracy or relative_target, not both")
    if relative_target is not None and not 0.0 < relative_target <= 1.0:
        raise ValueError(f"relative_target must be in (0, 1], got {relative_target}")
    targets = relative_targets(groups, relative_target) if relative_target is not None else {}
    target = None if relative_target is not None else _resolve_target(groups, target_accuracy)
    budgets = equal_time_budgets(groups) if equal_time else {}
    long_tailed = any(g["long_tailed"] for g in groups)
    header = ["data", "model", "method", "augment", "seeds", "steps", "best test acc %", "final test acc %"]
    if long_tailed:
        header += ["final balanced acc %", "final worst-class acc %"]
    if equal_time:
        header += ["best test acc % within the time budget (s)"]
    if target is not None or relative_target is not None:
        name = f"{100 * target:g}%" if target is not None else "target"
        if relative_target is not None:
            header += [f"target: {100 * relative_target:g}% of uniform's best"]
        header += [f"epochs to {name} (reached)", f"steps to {name}", f"train s to {name}"]
    header += ["sampling % of time", "stop"]
    rows = []
    for g in groups:
        goal = targets.get(_setting(g)) if relative_target is not None else target
        s = group_stats(g, goal)
        seeds = str(s["seeds"]) + (f" ({s['incomplete']} incomplete)" if s["incomplete"] else "")
        steps = "–" if s["steps"] is None else f"{s['steps']:.0f}"
        row = [g["dataset"], g["model"], g["method"], "yes" if g["augment"] else "no", seeds, steps, _pct(s["best"]),
               _pct(s["final"])]
        if long_tailed:
            row += [_pct(s["final_balanced"]), _pct(s["final_worst"])] if g["long_tailed"] else ["–", "–"]
        if equal_time:
            budget = budgets.get(_setting(g))
            within = [v for v in (best_within(r["history"], budget) for r in g["runs"] if r["history"]) if v is not None]
            row += ["–" if budget is None or not within else f"{_pct(_mean_std(within))} ({budget:.0f} s)"]
        if target is not None or relative_target is not None:
            if relative_target is not None:
                row += ["–" if goal is None else f"{100 * goal:.2f}"]
            epochs = "–" if s["epochs_to_target"] is None else f"{s['epochs_to_target']:.1f}"
            steps_to = "–" if s["steps_to_target"] is None else f"{s['steps_to_target']:.0f}"
            seconds = "–" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.1f}"
            row += [f"{epochs} ({s['reached']}/{s['seeds']})", steps_to, seconds]
        reasons = "; ".join(r if n == 1 else f"{r} ×{n}" for r, n in sorted(s["stop_reasons"].items()))
        row += [_pct(s["overhead"], 3), reasons]
        rows.append(row)
    lines = table_lines(header, rows)
    notes = (
        "Accuracies: mean ± sample standard deviation over seeds. Steps: gradient steps trained (mean). "
        "Epochs (counted from 1), steps and training seconds (training + sampling, without evaluation) "
        "to the target are means over the seeds that reached it. Sampling % is the sampler's share of all "
        "wall-clock (training + evaluation + sampling)."
    )
    if equal_time:
        notes += (
            " The time budget of a setting is uniform sampling's mean training + sampling time there; "
            "each run counts the epochs that ended within it."
        )
    lines += ["", notes]
    sections = [("best test accuracy", None)]
    if equal_time:
        def within_budget(g: Group, r: Run) -> Optional[float]:
            budget = budgets.get(_setting(g))
            return None if budget is None else best_within(r["history"], budget)

        sections.append(("best test accuracy within the time budget", within_budget))
    for title, value in sections:
        comparisons = paired_comparisons(groups, value)
        if not comparisons:
            continue
        lines += [
            "",
            f"**Paired comparison against uniform: {title}** (method − uniform, paired by seed; "
            "mean ± standard error in percentage points). Rule: within the noise when a two-sided paired "
            "t-test gives p ≥ 0.05, i.e. |mean| < t(0.975, n − 1) standard errors (with 2 or 3 seeds that "
            "is 12.7 or 4.3, not 2); without scipy, |mean| < 2 standard errors.",
            "",
        ]
        for c in comparisons:
            g, base = c["method"], c["uniform"]
            where = f"{g['dataset']} / {g['model']}, {'augmented' if g['augment'] else 'not augmented'}"
            if c["mean"] is None:
                lines.append(f"- {where}: {g['method']} vs {base['method']}: {_verdict(c)}.")
                continue
            se = "" if c["se"] is None else f" ± {100 * c['se']:.2f}"
            p = "" if c["p"] is None else f", p = {c['p']:.3g}"
            lines.append(
                f"- {where}: {g['method']} − {base['method']} = {100 * c['mean']:+.2f}{se} pp "
                f"(n = {len(c['seeds'])}{p}): {_verdict(c)}."
            )
    if weights:
        lines += ["", *weight_table(groups)]
    if cost:
        lines += ["", *cost_table(groups)]
    return "\n".join(lines) + "\n"


def _median(values: Sequence[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _number(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _first_step(history: Sequence[Dict[str, Any]], key: str, above: float) -> Optional[int]:
    for r in history:
        value = r.get("weights", {}).get(key)
        if value is not None and value > above:
            return int(r["steps"])
    return None


def weight_table(groups: Sequence[Group]) -> List[str]:
    """Markdown lines: per importance-sampled group, how its weights grew and where it stopped.

    From each epoch record's ``weights`` (the mean and the largest weight of the items trained
    on: the mean multiplies the epoch's step size) and ``sampler`` (the epoch's kind and the
    range of the weights it drew). Medians over seeds; "never" when no seed got there.
    """
    header = ["data", "method", "diverged (seeds)", "step it stopped (median)", "mean weight, first importance epoch",
              "largest mean weight of an epoch", "first step with a mean weight > 2", "largest weight drawn",
              "first step with a weight > 100", "smallest weight drawn"]
    rows = []
    for g in groups:
        runs = [r for r in g["runs"] if r["history"] and any("weights" in x for x in r["history"])]
        if not runs:
            continue
        diverged = sum(1 for r in g["runs"] if r["summary"] and str(r["summary"].get("stop_reason", "")).startswith("diverged"))
        stopped = _median([float(r["history"][-1]["steps"]) for r in runs])
        first = [next((x["weights"]["mean"] for x in r["history"] if x.get("sampler", {}).get("kind") == "importance"), None)
                 for r in runs]
        means = [max(x["weights"]["mean"] for x in r["history"] if "weights" in x) for r in runs]
        drawn = [max((x["sampler"]["max_weight"] for x in r["history"] if x.get("sampler", {}).get("kind") == "importance"),
                     default=None) for r in runs]
        smallest = [min((x["sampler"].get("min_weight", math.inf) for x in r["history"]
                         if x.get("sampler", {}).get("kind") == "importance"), default=None) for r in runs]
        over2 = [_first_step(r["history"], "mean", 2.0) for r in runs]
        over100 = [_first_step(r["history"], "max", 100.0) for r in runs]

        def steps(values: List[Optional[int]]) -> str:
            hit = [v for v in values if v is not None]
            return "never" if not hit else f"{_median(hit):.0f} ({len(hit)}/{len(values)})"

        rows.append([g["dataset"], g["method"], f"{diverged}/{len(g['runs'])}", _number(stopped, 4),
                     _number(_median([v for v in first if v is not None])), _number(_median(means)), steps(over2),
                     _number(_median([v for v in drawn if v is not None])), steps(over100),
                     _number(_median([v for v in smallest if v is not None and math.isfinite(v)]))])
    if not rows:
        return []
    lines = [
        "**How the weights grew** (medians over seeds). *Mean weight*: the mean importance weight of the items an "
        "epoch trained on, which multiplies that epoch's step size (1 for unbiased weights in expectation); "
        "*largest / smallest weight drawn*: the range of the weights the sampler gave its draws, over the run. "
        "Steps to a threshold count the seeds that crossed it.",
        "",
        *table_lines(header, rows),
    ]
    return lines


def cost_table(groups: Sequence[Group]) -> List[str]:
    """Markdown lines: per group, the final training loss over the whole training set and the
    cost: wall-clock of training + sampling, the trainer's CPU time, and the scoring workers'
    CPU time, coverage and staleness apart (means over seeds)."""
    header = ["data", "method", "final train loss, whole set", "final train acc %, whole set",
              "train + sampling wall s", "trainer CPU s", "scoring workers' CPU s", "worker start s",
              "coverage at the end", "staleness at the end: median / max steps", "items/s scored"]
    rows = []
    for g in groups:
        runs = [r for r in g["runs"] if r["history"]]
        if not runs:
            continue
        whole = [r["summary"]["train_eval"] for r in runs if r["summary"] and "train_eval" in r["summary"]]
        wall = [sum(_train_seconds(x) for x in r["history"]) for r in runs]
        cpu = [sum(x.get("cpu_seconds", 0.0) for x in r["history"]) for r in runs if "cpu_seconds" in r["history"][0]]
        pools = [r["history"][-1]["scorers"] for r in runs if "scorers" in r["history"][-1]]

        def mean(values: Sequence[float], digits: int = 3) -> str:
            return _number(sum(values) / len(values), digits) if values else "–"

        row = [g["dataset"], g["method"], mean([w["loss"] for w in whole], 4),
               _pct(_mean_std([w["accuracy"] for w in whole])), mean(wall), mean(cpu)]
        if pools:
            medians = [p["staleness"]["median"] for p in pools if p["staleness"]["median"] is not None]
            maxima = [p["staleness"]["max"] for p in pools if p["staleness"]["max"] is not None]
            # cpu_seconds is None for scorer ranks (other processes, perhaps other machines)
            row += [mean([p["cpu_seconds"] for p in pools if p.get("cpu_seconds") is not None]),
                    mean([p["startup_seconds"] for p in pools], 2),
                    mean([p["coverage"] for p in pools]), f"{mean(medians)} / {mean(maxima)}",
                    mean([p["items_per_second"] for p in pools], 4)]
        else:
            row += ["–"] * 5
        rows.append(row)
    if not rows:
        return []
    lines = [
        "**Training loss and cost** (means over seeds). *Whole set*: eval mode, every training item once, after "
        "the last step (the per-epoch training loss of the table above is over the items drawn, which importance "
        "sampling tilts towards hard ones). *Wall s*: training + sampling, evaluation left out; the scoring "
        "workers run on their own core beside it, so their CPU time is extra hardware, not wall-clock. "
        "*Staleness*: trainer steps since the parameters behind each item's score were published.",
        "",
        *table_lines(header, rows),
    ]
    return lines
