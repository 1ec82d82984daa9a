"""The experiment runner: presets, accuracy, a real short run, exact resume, a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from isample.experiments.config import PRESETS, RunConfig, grid, preset
from isample.experiments.train import class_accuracy, evaluate, load_history, train

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)",
)


def test_presets_are_the_papers_appendix_a():
    last, running, uniform = preset("last_loss"), preset("running_loss"), preset("uniform")
    n = 50_000  # CIFAR-10
    assert round(last.samples_fraction * n) == 8192 and last.warmup_epochs == 5 and not last.replacement
    assert round(running.samples_fraction * n) == 30_000 and running.beta == 0.2 and running.warmup_epochs == 0
    assert uniform.method == "uniform" and uniform.samples_fraction == 1.0
    for c in (last, running, uniform):
        assert (c.batch_size, c.lr, c.momentum, c.weight_decay) == (128, 0.01, 0.9, 5e-4)
        assert c.lr_milestones == (15, 30) and c.lr_gamma == 0.1 and c.patience == 15
        assert c.weighting == "inverse_probability" and c.temperature == 1.0
    runs = grid(("uniform", "last_loss", "running_loss"), seeds=range(3))
    assert len(runs) == 18 and len({r.name for r in runs}) == 18
    assert set(PRESETS) >= {"uniform", "last_loss", "running_loss", "grad_norm", "infobatch"}
    mixed = preset("last_loss_mix")
    assert mixed.uniform_mix == 0.2 and mixed.replace(uniform_mix=0.0) == last  # the paper's, weights <= 5
    assert mixed.name != last.name and "mix0.2" in preset("running_loss_mix").name


def test_config_round_trip_and_errors():
    c = preset("running_loss", dataset="fashion-mnist", imbalance_ratio=10.0, seed=2)
    assert RunConfig.from_dict(json.loads(c.dumps())) == c
    assert c.name == "fashion-mnist-lt10-resnet18-running_loss-z0.6-aug-s2"
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict({"learning_rate": 0.1})
    for bad in ({"method": "oracle"}, {"samples_fraction": 1.5}, {"weighting": "fancy"}, {"imbalance_ratio": 0.5}):
        with pytest.raises(ValueError):
            RunConfig(**bad)


def test_class_accuracy_by_hand():
    predictions = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 2, 0, 0])
    acc = class_accuracy(predictions, labels, num_classes=4)
    assert acc[:3].tolist() == [2 / 3, 1.0, 2 / 3]
    assert torch.isnan(acc[3])  # class 3 absent


class _ModeProbe(torch.nn.Module):
    """Predicts class 0 in train mode and the true class (from the input) in eval mode."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x):
        label = x.flatten(1)[:, 0].round().long().clamp(0, self.classes - 1)
        logits = torch.zeros(x.shape[0], self.classes)
        logits[torch.arange(x.shape[0]), 0 if self.training else label] = 5.0
        return logits


def test_evaluate_uses_eval_mode_the_whole_set_and_no_augmentation():
    from isample.experiments.data import Dataset

    labels = torch.arange(30) % 3
    images = labels.to(torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).contiguous()
    data = Dataset("probe", images, labels, images, labels, 3, ("a", "b", "c"), (0.0,), (1 / 255,), (10, 10, 10))
    model = _ModeProbe(3).train()
    result = evaluate(model, images, labels, data, batch_size=7, autocast=_Null, channels_last=False)
    assert result["accuracy"] == 1.0  # eval mode, all 30 examples (5 batches, the last short)
    assert result["per_class_accuracy"] == [1.0, 1.0, 1.0]
    assert model.training  # restored
    expected_loss = torch.nn.functional.cross_entropy(torch.eye(3)[labels] * 5.0, labels).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _tiny(method: str, **overrides) -> RunConfig:
    settings = dict(
        dataset="fashion-mnist", model="small_cnn", train_subset=1200, test_subset=500, max_epochs=2,
        lr_milestones=(1,), lr=0.05, device="cpu", warmup_epochs=0, samples_fraction=0.5, augment=False,
    )
    settings.update(overrides)
    if method in ("uniform", "infobatch"):
        settings.pop("samples_fraction")
        settings.pop("warmup_epochs")
    return preset(method, **settings)


@needs_fashion
def test_a_short_real_run_learns_and_writes_its_records(tmp_path):
    config = _tiny("running_loss", max_epochs=2, train_subset=3000, samples_fraction=1.0, augment=True)
    summary = train(config, tmp_path / config.name, progress=False, log=lambda _: None)
    assert summary["complete"] and summary["epochs"] == 2
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    history = load_history(tmp_path / config.name)
    assert [r["epoch"] for r in history] == [0, 1]
    for r in history:
        assert set(r["seconds"]) == {"training", "evaluation", "sampling"} and r["seconds"]["sampling"] > 0
        assert len(r["per_class_accuracy"]) == 10 and r["scores"]["histogram"]
    assert (tmp_path / config.name / "metrics.csv").read_text().count("\n") == 3
    assert 0 < summary["sampling_share"] < 0.5


def _strip_times(history):
    """The records without what the clock decides: the seconds and the CPU time (of the
    trainer and of scoring workers), and the weights' mean to 12 digits (a resumed epoch sums
    them in another grouping)."""
    out = []
    for r in history:
        r = {k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}
        if "weights" in r:
            r["weights"] = {**r["weights"], "mean": round(r["weights"]["mean"], 12)}
        out.append(r)
    return out


@needs_fashion
@pytest.mark.parametrize("method", ["uniform", "last_loss", "infobatch"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, method):
    config = _tiny(method)
    torch.set_num_threads(1)  # bit-identical CPU arithmetic across the two runs
    try:
        straight = train(config, tmp_path / "straight", progress=False, log=lambda _: None)
        stopped = train(config, tmp_path / "stopped", progress=False, log=lambda _: None, max_wall_seconds=0.0)
        assert not stopped["complete"]
        assert (tmp_path / "stopped" / "checkpoint.pt").exists()
        resumed = train(config, tmp_path / "stopped", progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert resumed["complete"]
    assert _strip_times(load_history(tmp_path / "stopped")) == _strip_times(load_history(tmp_path / "straight"))
    assert resumed["best_test_accuracy"] == straight["best_test_accuracy"]


@needs_fashion
def test_a_killed_training_process_resumes_with_nothing_lost(tmp_path):
    """SIGKILL a real `isample train` mid-epoch, resume it, and get the uninterrupted run."""
    args = [
        sys.executable, "-m", "isample.cli", "train", "--preset", "running_loss", "--dataset", "fashion-mnist",
        "--model", "small_cnn", "--train-subset", "1200", "--test-subset", "500", "--max-epochs", "2",
        "--lr-milestones", "1", "--device", "cpu", "--no-augment", "--no-progress", "--checkpoint-seconds", "0",
        "--samples-fraction", "0.5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    run = next(iter((tmp_path / "straight").iterdir())).name
    checkpoint = tmp_path / "killed" / run / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it get further into an epoch, writing checkpoints as it goes
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / run / "summary.json").exists()
    subprocess.run(args + ["--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True, timeout=300)
    assert _strip_times(load_history(tmp_path / "killed" / run)) == _strip_times(load_history(tmp_path / "straight" / run))


@needs_fashion
def test_a_diverging_run_stops_with_a_reason_instead_of_crashing(tmp_path):
    config = _tiny("last_loss", lr=1e6, max_epochs=3, train_subset=600, test_subset=200)
    summary = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert summary["complete"] and summary["stop_reason"].startswith("diverged")
    assert summary["epochs"] <= 3 and (tmp_path / "run" / "summary.json").exists()


def test_the_science_study_is_every_policy_on_three_data_settings():
    from isample.experiments.config import STUDIES, study

    configs = study("science")
    spec = STUDIES["science"]
    assert len(configs) == len(spec.presets) * 3 * 3  # presets × (balanced, LT10, LT100) × seeds
    assert {c.method for c in configs} == {"uniform", "last_loss", "running_loss", "grad_norm", "early_importance",
                                           "infobatch"}
    assert sorted({c.imbalance_ratio for c in configs}) == [1.0, 10.0, 100.0]
    assert {c.budget_steps for c in configs} == {700} and {c.dataset for c in configs} == {"fashion-mnist"}
    last = next(c for c in configs if c.method == "last_loss")
    assert last.samples_fraction == pytest.approx(8192 / 50000) and last.warmup_epochs == 5  # the paper's |Z|
    # an override of the variant's field replaces the variants; unknown presets are refused
    assert {c.imbalance_ratio for c in study("science", seeds=[0], imbalance_ratio=10.0)} == {10.0}
    with pytest.raises(ValueError, match="not in study"):
        study("science", presets=["nonsense"])


@needs_fashion
def test_the_science_study_command_runs_end_to_end(tmp_path):
    """The study's command on a tiny trial: running loss against uniform, one epoch, long-tailed.
    It checks the command, the records, the report and the exported metrics, not the conclusion."""
    from isample.cli import main

    out, results = tmp_path / "runs", tmp_path / "results"
    code = main([
        "study", "science", "--preset", "uniform", "running_loss", "--seeds", "2", "--imbalance-ratio", "10",
        "--train-subset", "2000", "--test-subset", "400", "--max-epochs", "1", "--no-progress",
        "--out", str(out), "--results", str(results),
    ])
    assert code == 0
    names = sorted(p.name for p in (results / "runs").iterdir())
    assert len(names) == 4 and all("lt10-sub2000" in n for n in names)
    for name in names:
        records = load_history(results / "runs" / name)
        assert len(records) == 1 and records[0]["test_accuracy"] > 0.25  # chance is 0.1
        assert json.loads((results / "runs" / name / "summary.json").read_text())["complete"]
    text = (results / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| fashion-mnist-lt10-sub2000")]
    assert len(rows) == 2 and "running_loss-z0.6" in rows[1]
    assert "within the time budget" in text and "98% of uniform's best" in text
    assert "Paired comparison against uniform: best test accuracy**" in text
    assert (results / "figures" / "fig7_test_accuracy_by_budget.png").stat().st_size > 1000


@needs_fashion
def test_snapshots_hold_the_parameters_and_the_q_each_step_draws_from(tmp_path):
    """A proportional grad-norm run with 2-step epochs: every item starts at sqrt(2), so the
    first epoch's q is uniform; later ones follow the scores. Records carry the weights' mean
    and the trainer's CPU time; the summary carries the loss over the whole training set."""
    from isample.experiments.train import load_snapshot, load_run_data

    config = preset("grad_norm_proportional", dataset="fashion-mnist", model="small_cnn", train_subset=600,
                    test_subset=200, augment=False, budget_steps=6, epoch_steps=2, snapshot_steps=(0, 3, 6),
                    train_eval=True, device="cpu", lr_milestones=())
    summary = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    history = load_history(tmp_path / "run")
    assert [r["steps"] for r in history] == [2, 4, 6]
    first, third = load_snapshot(tmp_path / "run", 0), load_snapshot(tmp_path / "run", 6)
    assert torch.allclose(first["q"], torch.full((600,), 1 / 600, dtype=torch.float64))
    assert float(third["q"].sum()) == pytest.approx(1.0)
    assert float(third["q"].max()) > 1.2 / 600 and float(third["q"].min()) < 0.9 / 600  # it follows the scores
    assert float(third["q"].min()) >= 0.1 / 600 - 1e-12  # the uniform mixture
    assert not torch.equal(first["model"]["classifier.3.weight"], third["model"]["classifier.3.weight"])
    with pytest.raises(ValueError, match="snapshot_steps"):
        load_snapshot(tmp_path / "run", 5)
    for r in history:
        assert r["cpu_seconds"] > 0 and 0 < r["weights"]["mean"] and r["weights"]["max"] <= 10 + 1e-9
    # the whole training set, in eval mode, after the last step
    data = load_run_data(config)
    model = __import__("isample.experiments.models", fromlist=["build_model"]).build_model("small_cnn", 10, 1, 28)
    model.load_state_dict(third["model"])
    whole = evaluate(model, data.train_images, data.train_labels, data, batch_size=1000, autocast=_no_autocast,
                     channels_last=False)
    assert summary["train_eval"]["loss"] == pytest.approx(whole["loss"]) and summary["train_eval"]["accuracy"] == whole["accuracy"]


class _no_autocast:
    def __init__(self):
        pass

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@needs_fashion
def test_uniform_epochs_of_some_steps_are_one_shuffled_stream(tmp_path):
    """uniform with epoch_steps: epochs of 4 steps cut from one shuffled stream, resumed exactly."""
    config = preset("uniform", dataset="fashion-mnist", model="small_cnn", train_subset=600, test_subset=200,
                    augment=False, budget_steps=10, epoch_steps=4, device="cpu", lr_milestones=(), max_epochs=100)
    torch.set_num_threads(1)
    try:
        straight = train(config, tmp_path / "a", progress=False, log=lambda _: None)
        stopped = train(config, tmp_path / "b", progress=False, log=lambda _: None, max_wall_seconds=0.0)
        resumed = train(config, tmp_path / "b", progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert not stopped["complete"] and resumed["complete"]
    history = load_history(tmp_path / "a")
    assert [r["steps"] for r in history] == [4, 8, 10] and [r["samples"] for r in history] == [512, 512, 256]
    assert _strip_times(load_history(tmp_path / "b")) == _strip_times(history)
    assert straight["final_test_accuracy"] == resumed["final_test_accuracy"]


@needs_fashion
@pytest.mark.slow  # a real scoring worker process (spawned: a Python start with torch, 3-10 s here) in two sessions
def test_a_run_with_a_scoring_worker_records_the_pool_and_resumes(tmp_path):
    """grad_norm_scorers on 600 images: the worker's scores reach the sampler (coverage 1), the
    records carry coverage, staleness and the worker's CPU time, the pool's ledger survives a
    resume, and no worker process outlives the run."""
    config = preset("grad_norm_scorers", dataset="fashion-mnist", model="small_cnn", train_subset=600,
                    test_subset=200, augment=False, budget_steps=30, epoch_steps=5, publish_every=5, device="cpu",
                    lr_milestones=())
    stopped = train(config, tmp_path / "run", progress=False, log=lambda _: None, max_wall_seconds=0.0)
    assert not stopped["complete"]
    assert not _children(), "the stopped run left a worker behind"
    summary = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert summary["complete"] and not _children()
    history = load_history(tmp_path / "run")
    pools = [r["scorers"] for r in history]
    assert pools[-1]["items_scored"] >= 600 and pools[-1]["coverage"] > 0
    assert all(p["workers_alive"] == 1 and p["rejected"] == 0 for p in pools)
    assert pools[-1]["cpu_seconds"] > 0 and pools[-1]["staleness"]["max"] is not None
    assert pools[-1]["published"] >= 30 // 5 - 1  # the resumed session went on publishing
    # the sampler drew from the worker's scores, not uniformly: the weights spread once they came
    assert max(r["sampler"]["max_weight"] for r in history) > 1.05


def _children():
    """Live child processes of this test process (Linux /proc)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] not in ("Z", "X"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"resource_tracker" not in command:  # multiprocessing's own, until the interpreter exits
                    found.append(int(entry.name))
    return found
