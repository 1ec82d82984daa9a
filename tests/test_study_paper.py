"""`isample study paper`, README's main job, runs what the README's earlier command ran.

The earlier main job was
``isample train --grid paper --dataset fashion-mnist --model small_cnn --seeds 3
--train-subset 10000 --max-epochs 20 --lr-milestones 8 15 --patience 8 --out runs/paper-fmnist``;
its runs are committed in docs/results/paper-fmnist. These tests go through the command line
itself (``isample.cli.main``) with training, the data check and the report replaced by
recorders, so nothing trains and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isample import cli
from isample.experiments.config import STUDIES, RunConfig

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "results" / "paper-fmnist"
TRAIN_FLAGS = ["--dataset", "fashion-mnist", "--model", "small_cnn", "--seeds", "3", "--train-subset", "10000",
               "--max-epochs", "20", "--lr-milestones", "8", "15", "--patience", "8"]


@pytest.fixture
def planned(monkeypatch, tmp_path):
    """Runs `isample ARGS` and returns what it would have trained and where it would have
    written: a dict with "configs", "out" and, for a study, "results"."""
    monkeypatch.chdir(tmp_path)  # any folder the command made would land here
    seen: dict = {}

    def run_all(configs, out, args):
        seen.update(configs=list(configs), out=Path(out))
        return 0

    def run_scheduled(plans, variance, args):
        assert variance is None
        ((configs, out, _),) = plans.values()
        seen.update(configs=list(configs), out=Path(out), jobs=args.jobs)
        return 0

    def write_results(name, configs, out, results):
        seen.update(results=Path(results), name=name)

    monkeypatch.setattr(cli, "_run_all", run_all)
    monkeypatch.setattr(cli, "_run_scheduled", run_scheduled)
    monkeypatch.setattr(cli, "_check_data", lambda parser, configs: None)
    monkeypatch.setattr(cli, "_write_study_results", write_results)

    def plan(*argv: str) -> dict:
        seen.clear()
        assert cli.main(list(argv)) == 0
        return dict(seen)

    return plan


def _by_name(configs):
    names = [c.name for c in configs]
    assert len(set(names)) == len(names), "two runs would share a folder"
    return dict(zip(names, configs))


def test_study_paper_runs_the_readme_grid(planned):
    train = planned("train", "--grid", "paper", *TRAIN_FLAGS, "--out", "runs/paper-fmnist")
    study = planned("study", "paper")
    assert len(train["configs"]) == 18  # 3 presets x augmentation on/off x 3 seeds
    assert _by_name(study["configs"]) == _by_name(train["configs"])
    assert {c.method for c in study["configs"]} == {"uniform", "last_loss", "running_loss"}
    assert {c.augment for c in study["configs"]} == {True, False}
    assert study["out"] == Path("runs/paper")
    assert study["results"] == Path("docs/results/paper-fmnist")  # where the committed report and figures are
    assert STUDIES["paper"].report == {"target_accuracy": 0.85}  # the earlier `isample report --target 0.85`


def test_study_paper_with_two_jobs_plans_the_same_runs(planned):
    one, two = planned("study", "paper"), planned("study", "paper", "--jobs", "2")
    assert two["jobs"] == 2
    assert _by_name(two["configs"]) == _by_name(one["configs"])


def test_study_paper_reproduces_the_committed_runs(planned):
    """Each committed run's config.json is one of the study's runs, and the study has no other."""
    study = _by_name(planned("study", "paper")["configs"])
    committed = {p.name: RunConfig.from_dict(json.loads((p / "config.json").read_text()))
                 for p in sorted((COMMITTED / "runs").iterdir())}
    assert committed == study


def test_a_changed_flag_gives_other_runs(planned):
    """Negative control: the comparison above sees a difference of one setting."""
    study = _by_name(planned("study", "paper")["configs"])
    flags = [("15" if flag == "8" and TRAIN_FLAGS[i - 1] == "--patience" else flag) for i, flag in enumerate(TRAIN_FLAGS)]
    train = _by_name(planned("train", "--grid", "paper", *flags)["configs"])
    assert train.keys() == study.keys()  # the patience is not in the folder name...
    assert all(train[name].patience == 15 for name in train) and train != study  # ...but the runs differ
