"""Figures and report from run folders: fabricated folders in the exact format train.py writes
(config.json, metrics.jsonl/.csv, summary.json), checked against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from isample.experiments.config import RunConfig
from isample.experiments.report import (
    best_within, equal_time_budgets, group_stats, load_runs, paired_comparisons, relative_targets, report,
)
from isample.experiments.train import _write_metrics, score_snapshot, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE = dict(dataset="fashion-mnist", model="small_cnn", train_subset=100, max_epochs=3)


def fabricate_run(
    root: Path,
    config: RunConfig,
    test_accuracy: Sequence[float],
    seconds: Dict[str, float],
    *,
    complete: bool = True,
    balanced: Optional[Sequence[float]] = None,
    worst: Optional[Sequence[float]] = None,
) -> Path:
    """A run folder as train() leaves it: one record per epoch (test accuracies as given, the
    same `seconds` every epoch), scores for non-uniform methods, summary.json if complete."""
    run_dir = root / config.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(config.dumps())
    generator = torch.Generator().manual_seed(config.seed)
    history: List[dict] = []
    for epoch, accuracy in enumerate(test_accuracy):
        record = {
            "epoch": epoch, "lr": config.lr, "samples": 100, "steps": 4 * (epoch + 1),
            "train_loss": 2.0 / (epoch + 1), "train_accuracy": accuracy + 0.05,
            "test_loss": 1.5 / (epoch + 1), "test_accuracy": accuracy,
            "balanced_accuracy": accuracy if balanced is None else balanced[epoch],
            "worst_class_accuracy": accuracy - 0.2 if worst is None else worst[epoch],
            "per_class_accuracy": [accuracy] * 10,
            "seconds": dict(seconds),
        }
        if config.method != "uniform":
            kind = "warmup" if epoch < config.warmup_epochs else "importance"
            record["sampler"] = {"kind": kind, "distinct": 100, "samples": 100}
            losses = torch.distributions.Exponential(1.0 + epoch).sample((100,)) if epoch else torch.ones(100)
            record["scores"] = score_snapshot(losses.double(), config.score_bins)
        history.append(record)
    _write_metrics(run_dir, history)
    if complete:
        (run_dir / "summary.json").write_text(json.dumps(summarize(config, history, "max_epochs"), indent=2))
    return run_dir


UNIFORM_AUG = {0: [0.50, 0.70, 0.80], 1: [0.55, 0.75, 0.78], 2: [0.60, 0.65, 0.70]}
LAST_LOSS_AUG = {0: [0.40, 0.72, 0.82], 1: [0.45, 0.60, 0.79], 2: [0.50, 0.66, 0.74]}
UNIFORM_NOAUG = {0: [0.60, 0.70, 0.72], 1: [0.62, 0.68, 0.71]}
RUNNING_NOAUG = {0: [0.58, 0.69, 0.73], 1: [0.61, 0.66], 2: [0.55, 0.60, 0.65]}  # seed 1 is incomplete


def seconds_of(seed: int, sampling: float) -> Dict[str, float]:
    return {"training": 10.0 + seed, "evaluation": 2.0, "sampling": sampling}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for seed, acc in UNIFORM_AUG.items():
        fabricate_run(root, RunConfig(**BASE, seed=seed), acc, seconds_of(seed, 0.01))
    for seed, acc in LAST_LOSS_AUG.items():
        config = RunConfig(**BASE, method="last_loss", samples_fraction=0.5, warmup_epochs=1, seed=seed)
        fabricate_run(root, config, acc, seconds_of(seed, 0.5))
    for seed, acc in UNIFORM_NOAUG.items():
        fabricate_run(root, RunConfig(**BASE, augment=False, seed=seed), acc, seconds_of(seed, 0.01))
    for seed, acc in RUNNING_NOAUG.items():
        config = RunConfig(**BASE, method="running_loss", samples_fraction=0.6, augment=False, seed=seed)
        fabricate_run(root, config, acc, seconds_of(seed, 0.25), complete=seed != 1)
    (root / "notes").mkdir()  # a stray folder among the runs is skipped when the parent is given
    return root


def mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def by_label(groups):
    return {(g["method"], g["augment"]): g for g in groups}


def test_load_runs_groups_by_everything_but_the_seed(study):
    groups = load_runs([study])
    assert [(g["method"], g["augment"], [r["seed"] for r in g["runs"]]) for g in groups] == [
        ("uniform", True, [0, 1, 2]),
        ("last_loss-z0.5", True, [0, 1, 2]),
        ("uniform", False, [0, 1]),
        ("running_loss-z0.6", False, [0, 1, 2]),
    ]
    assert all(g["dataset"] == "fashion-mnist-sub100" and not g["long_tailed"] for g in groups)
    incomplete = by_label(groups)[("running_loss-z0.6", False)]["runs"][1]
    assert incomplete["summary"] is None and len(incomplete["history"]) == 2
    # the same folders named one by one, twice over, give the same groups
    folders = sorted(p for p in study.iterdir() if (p / "config.json").exists())
    again = load_runs(folders + folders[:3])
    assert [[r["path"] for r in g["runs"]] for g in again] == [[r["path"] for r in g["runs"]] for g in groups]


def test_groups_that_differ_beyond_the_seed_are_told_apart(tmp_path):
    fabricate_run(tmp_path, RunConfig(**BASE, lr=0.01), [0.5], seconds_of(0, 0.0))
    fabricate_run(tmp_path / "b", RunConfig(**BASE, lr=0.1), [0.6], seconds_of(0, 0.0))
    labels = sorted(g["method"] for g in load_runs([tmp_path, tmp_path / "b"]))
    assert labels == ["uniform (lr=0.01)", "uniform (lr=0.1)"]


def test_group_stats_match_a_hand_computation(study):
    groups = by_label(load_runs([study]))
    s = group_stats(groups[("uniform", True)], target_accuracy=0.75)
    assert s["seeds"] == 3 and s["incomplete"] == 0
    assert s["best"] == pytest.approx(mean_std([0.80, 0.78, 0.70]))
    assert s["final"] == pytest.approx(mean_std([0.80, 0.78, 0.70]))
    # target 0.75: seed 0 at epoch 3, seed 1 at epoch 2 (0.75 >= 0.75), seed 2 never
    assert s["reached"] == 2
    assert s["epochs_to_target"] == pytest.approx(2.5)
    assert s["steps_to_target"] == pytest.approx((12 + 8) / 2)  # 4 steps an epoch
    assert s["steps"] == pytest.approx(12)
    assert s["seconds_to_target"] == pytest.approx((3 * 10.01 + 2 * 11.01) / 2)
    shares = [0.01 / (12.01 + seed) for seed in range(3)]
    assert s["overhead"] == pytest.approx(mean_std(shares))
    assert s["stop_reasons"] == {"max_epochs": 3}

    s = group_stats(groups[("running_loss-z0.6", False)], target_accuracy=0.75)
    assert s["seeds"] == 3 and s["incomplete"] == 1
    assert s["best"] == pytest.approx(mean_std([0.73, 0.66, 0.65]))
    assert s["final"] == pytest.approx(mean_std([0.73, 0.66, 0.65]))
    assert s["reached"] == 0 and s["epochs_to_target"] is None and s["seconds_to_target"] is None
    assert s["overhead"] == pytest.approx(mean_std([0.25 / (12.25 + seed) for seed in range(3)]))
    assert s["stop_reasons"] == {"max_epochs": 2, "incomplete (2 epochs)": 1}


def test_paired_comparisons_match_scipy(study):
    scipy_stats = pytest.importorskip("scipy.stats")
    comparisons = {c["method"]["method"]: c for c in paired_comparisons(load_runs([study]))}
    assert set(comparisons) == {"last_loss-z0.5", "running_loss-z0.6"}

    c = comparisons["last_loss-z0.5"]
    best = [max(UNIFORM_AUG[s]) for s in range(3)], [max(LAST_LOSS_AUG[s]) for s in range(3)]
    diffs = [b - a for a, b in zip(*best)]  # 0.02, 0.01, 0.04
    assert c["seeds"] == [0, 1, 2]
    assert c["mean"] == pytest.approx(0.07 / 3)
    assert c["se"] == pytest.approx(mean_std(diffs)[1] / math.sqrt(3))
    assert c["p"] == pytest.approx(scipy_stats.ttest_rel(best[1], best[0]).pvalue)

    c = comparisons["running_loss-z0.6"]
    assert c["seeds"] == [0, 1]  # seed 2 has no uniform partner
    assert c["differences"] == pytest.approx([0.73 - 0.72, 0.66 - 0.71])
    assert c["p"] == pytest.approx(scipy_stats.ttest_rel([0.73, 0.66], [0.72, 0.71]).pvalue)


def test_report_markdown(study):
    text = report([study], target_accuracy=75)  # a percentage is read as 0.75
    lines = text.splitlines()
    header = lines[0]
    assert "epochs to 75% (reached)" in header and "balanced" not in header
    rows = [line for line in lines if line.startswith("| fashion-mnist-sub100")]
    assert len(rows) == 4
    uniform_aug = rows[0].split(" | ")
    mean, std = mean_std([0.80, 0.78, 0.70])
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" == "76.00 ± 5.29" and "76.00 ± 5.29" in uniform_aug
    assert "2.5 (2/3)" in uniform_aug and "26.0" in uniform_aug
    overhead = mean_std([0.01 / (12.01 + seed) for seed in range(3)])
    assert f"{100 * overhead[0]:.3f} ± {100 * overhead[1]:.3f}" in uniform_aug
    assert "3 (1 incomplete)" in rows[3] and "incomplete (2 epochs)" in rows[3] and "– (0/3)" in rows[3]
    paired = [line for line in lines if line.startswith("- ")]
    assert len(paired) == 2
    assert "last_loss-z0.5 − uniform = +2.33 ± 0.88 pp (n = 3, p = 0.118): within the noise" in paired[0]
    assert "running_loss-z0.6 − uniform = -2.00 ± 3.00 pp (n = 2" in paired[1]
    # without a target (none in the configs) the target columns are left out
    assert "epochs to" not in report([study]).splitlines()[0]


def test_equal_budgets_match_a_hand_computation(study):
    groups = by_label(load_runs([study]))
    seed0 = groups[("uniform", True)]["runs"][0]["history"]  # epochs end at 10.01, 20.02, 30.03 s
    assert best_within(seed0, 20.02) == pytest.approx(0.70)
    assert best_within(seed0, 20.0) == pytest.approx(0.50)
    assert best_within(seed0, 5.0) is None
    budgets = equal_time_budgets(load_runs([study]))
    # augmented: uniform's mean time, 3 × 11.01 = 33.03 s
    assert budgets[("fashion-mnist-sub100", "small_cnn", True)] == pytest.approx(33.03)
    # not augmented: uniform's (seeds 0 and 1), although running loss (seed 1 stopped after 2
    # epochs) took less on average
    assert budgets[("fashion-mnist-sub100", "small_cnn", False)] == pytest.approx((3 * 10.01 + 3 * 11.01) / 2)
    running = equal_time_budgets([g for g in load_runs([study]) if g["method"] != "uniform"])
    assert running[("fashion-mnist-sub100", "small_cnn", False)] == pytest.approx((3 * 10.25 + 2 * 11.25 + 3 * 12.25) / 3)
    targets = relative_targets(load_runs([study]), 0.9)
    assert targets[("fashion-mnist-sub100", "small_cnn", True)] == pytest.approx(0.9 * (0.80 + 0.78 + 0.70) / 3)
    assert targets[("fashion-mnist-sub100", "small_cnn", False)] == pytest.approx(0.9 * (0.72 + 0.71) / 2)


def test_report_with_relative_target_and_equal_time(study):
    text = report([study], relative_target=0.9, equal_time=True)
    header = text.splitlines()[0]
    assert "within the time budget" in header and "target: 90% of uniform's best" in header
    uniform_aug = next(line for line in text.splitlines() if "| uniform | yes |" in line).split(" | ")
    assert f"{100 * 0.9 * 0.76:.2f}" in uniform_aug  # the setting's target, 68.40
    assert "33 s)" in " | ".join(uniform_aug)  # the budget of the augmented setting
    sections = [line for line in text.splitlines() if line.startswith("**Paired comparison")]
    assert len(sections) == 2 and "within the time budget" in sections[1]
    with pytest.raises(ValueError, match="not both"):
        report([study], 0.75, relative_target=0.9)


def test_report_long_tailed_columns(tmp_path):
    config = RunConfig(**BASE, imbalance_ratio=10.0)
    fabricate_run(tmp_path, config, [0.6, 0.7], seconds_of(0, 0.1), balanced=[0.5, 0.55], worst=[0.1, 0.2])
    fabricate_run(tmp_path, config.replace(seed=1), [0.6, 0.8], seconds_of(1, 0.1), balanced=[0.5, 0.65],
                  worst=[0.1, 0.4])
    (group,) = load_runs([tmp_path])
    assert group["long_tailed"] and group["dataset"] == "fashion-mnist-lt10-sub100"
    s = group_stats(group)
    assert s["final_balanced"] == pytest.approx(mean_std([0.55, 0.65]))
    assert s["final_worst"] == pytest.approx(mean_std([0.2, 0.4]))
    text = report([tmp_path])
    assert "final balanced acc %" in text and "60.00 ± 7.07" in text and "30.00 ± 14.14" in text


def read_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size < 150_000
    return matplotlib.image.imread(path)


def test_plot_runs_writes_every_figure(study, tmp_path):
    pytest.importorskip("matplotlib")
    from isample.experiments.plots import plot_runs

    written = plot_runs([str(study)], tmp_path / "figures")
    names = sorted(p.name for p in written)
    assert names == sorted([
        "fig1_train_loss.png", "fig2_train_accuracy.png", "fig3_test_accuracy.png",
        "fig4_scores_last_loss-z0.5.png", "fig4_scores_running_loss-z0.6.png", "fig6_cost_breakdown.png",
        "fig7_test_accuracy_by_budget.png",
    ])
    for path in written:
        image = read_png(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
        assert image[..., :3].std() > 0.01  # something was drawn


def test_plot_runs_long_tailed_and_several_settings(tmp_path):
    pytest.importorskip("matplotlib")
    from isample.experiments.plots import plot_runs

    lt = RunConfig(**BASE, imbalance_ratio=10.0, method="running_loss", samples_fraction=0.6)
    fabricate_run(tmp_path / "runs", lt, [0.6, 0.7], seconds_of(0, 0.1), balanced=[0.5, 0.55], worst=[0.1, 0.2])
    fabricate_run(tmp_path / "runs", RunConfig(**BASE), [0.6, 0.7], seconds_of(0, 0.1), complete=False)
    written = plot_runs([tmp_path / "runs"], tmp_path / "figures")
    names = {p.name for p in written}
    # two data sets (balanced and long-tailed): every file is suffixed with its data set and model
    assert "fig_balanced_accuracy_fashion-mnist-lt10-sub100_small_cnn.png" in names
    assert "fig_balanced_accuracy_fashion-mnist-sub100_small_cnn.png" not in names
    assert "fig3_test_accuracy_fashion-mnist-sub100_small_cnn.png" in names
    assert "fig4_scores_running_loss-z0.6_fashion-mnist-lt10-sub100_small_cnn.png" in names
    assert len(names) == 7 + 5  # long-tailed: fig1-3, fig4, fig6, fig7, balanced; balanced: fig1-3, fig6, fig7
    for path in written:
        read_png(path)


def test_an_incomplete_run_is_drawn_with_what_it_has(tmp_path):
    pytest.importorskip("matplotlib")
    from isample.experiments.plots import plot_runs

    config = RunConfig(**BASE, method="last_loss", samples_fraction=0.5)
    run = fabricate_run(tmp_path, config, [0.5], seconds_of(0, 0.1), complete=False)
    written = plot_runs([run], tmp_path / "figures")
    assert {p.name for p in written} == {
        "fig1_train_loss.png", "fig2_train_accuracy.png", "fig3_test_accuracy.png",
        "fig4_scores_last_loss-z0.5.png", "fig6_cost_breakdown.png", "fig7_test_accuracy_by_budget.png",
    }
    assert "incomplete (1 epochs)" in report([run])
    # a run that has not finished an epoch yet has nothing to draw
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text(config.replace(seed=1).dumps())
    assert "incomplete (0 epochs)" in report([run, started])
    with pytest.raises(ValueError, match="finished an epoch"):
        plot_runs([started], tmp_path / "figures2")


def test_a_path_that_is_not_a_run_folder_raises(tmp_path, study):
    from isample.experiments.plots import plot_runs

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    for bad in (empty, tmp_path / "missing", empty / "metrics.jsonl"):
        with pytest.raises(ValueError, match="is not a run folder"):
            load_runs([bad])
        with pytest.raises(ValueError, match="is not a run folder"):
            report([study, bad])
        with pytest.raises(ValueError, match="is not a run folder"):
            plot_runs([bad], tmp_path / "figures")
    assert not (tmp_path / "figures").exists()
