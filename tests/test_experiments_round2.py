"""Round 2 of the science study: its named studies and presets, uniform epochs cut from one
shuffled stream, the scheduler that runs tasks a few at a time, the weight and cost tables of
the report, the variance study's shadows, and the command line's new options."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

from isample.cli import main
from isample.experiments.config import PRESETS, ROUND2, STUDIES, RunConfig, preset, study, uniform_canonical
from isample.experiments.report import cost_table, load_runs, weight_table
from isample.experiments.schedule import Task, run_tasks
from isample.experiments.train import UniformStream, _write_metrics, summarize


# -- studies and presets -------------------------------------------------------------------


def test_the_divergence_study_is_the_factorial_with_one_uniform_run_per_seed():
    configs = study("divergence")
    uniform = [c for c in configs if c.method == "uniform"]
    assert len(uniform) == 3 and len(configs) == 3 + 2 * 5 * 3  # the variants share uniform's runs
    cells = {(c.method, c.replacement, c.weighting, c.samples_fraction < 1) for c in configs if c.method != "uniform"}
    for method, fraction in (("last_loss", 8192 / 50000), ("running_loss", 30000 / 50000)):
        assert {(r, w, z) for m, r, w, z in cells if m == method} == {
            (True, "inverse_probability", False), (True, "inverse_probability", True),  # with replacement auto = 1/(Np)
            (False, "inverse_probability", False), (False, "inverse_probability", True), (False, "auto", True),
        }
        mine = [c for c in configs if c.method == method]
        assert {c.samples_fraction for c in mine} == {1.0, fraction}
        assert {c.warmup_epochs for c in mine} == {PRESETS[method]["warmup_epochs"]}  # the paper's other settings
    assert len({c.name for c in configs}) == len(configs)
    assert all(c.budget_steps == 700 and c.train_subset == 10_000 for c in configs)


def test_early_importance_has_ten_paired_seeds_and_fresh_scores_two_settings():
    ei = study("early_importance_lt100")
    assert sorted(c.seed for c in ei if c.method == "uniform") == list(range(10))
    assert {c.imbalance_ratio for c in ei} == {100.0} and {c.method for c in ei} == {"uniform", "early_importance"}
    fresh = study("fresh_scores")
    assert len(fresh) == 3 * 2 * 3
    assert {(c.imbalance_ratio, c.train_subset) for c in fresh} == {(1.0, 10_000), (100.0, 10_000)}
    full = study("fresh_scores_full")
    assert {(c.imbalance_ratio, c.train_subset) for c in full} == {(1.0, None)} and len(full) == 3 * 3
    assert {c.epoch_steps for c in fresh} == {50} and all(c.train_eval for c in fresh)
    scorers = [c for c in fresh if c.scorers]
    in_training = [c for c in fresh if c.method == "grad_norm" and not c.scorers]
    assert len(scorers) == len(in_training) == 6
    for c in scorers + in_training:  # the proportional form, with replacement, unbiased weights, uniform mix
        assert (c.transform, c.replacement, c.weighting, c.uniform_mix) == ("proportional", True, "auto", 0.1)
    assert {c.replace(scorers=0) for c in scorers} == set(in_training)  # the same proposal, scored elsewhere
    assert set(ROUND2) <= set(STUDIES)


def test_uniform_runs_ignore_sampling_fields_and_labels_name_the_form():
    a = uniform_canonical(preset("uniform", replacement=True, weighting="auto", samples_fraction=0.5))
    assert a == uniform_canonical(preset("uniform")) and a.name == preset("uniform").name
    assert uniform_canonical(preset("uniform", epoch_steps=50)).epoch_steps == 50  # that one moves evaluations
    assert preset("grad_norm_scorers").method_label == "grad_norm-prop-rep-mix0.1-unbiased-init1.414-e50-scorers1"
    assert preset("last_loss", replacement=True, samples_fraction=1.0).method_label == "last_loss-rep"
    # older folders keep their names: the science study's labels are unchanged
    assert preset("last_loss").method_label == "last_loss-z0.16384"
    assert preset("early_importance").method_label == "early_importance"
    with pytest.raises(ValueError, match="scoring workers"):
        preset("uniform", scorers=1)
    with pytest.raises(ValueError, match="transform"):
        preset("grad_norm", transform="cubic")
    with pytest.raises(ValueError, match="epoch_steps"):
        preset("grad_norm", epoch_steps=0)
    c = preset("grad_norm_scorers", snapshot_steps=(700, 100, 100))
    assert c.snapshot_steps == (100, 700) and RunConfig.from_dict(json.loads(c.dumps())) == c


def test_a_uniform_stream_is_plain_shuffling_cut_into_epochs():
    stream = UniformStream(10, 4, torch.Generator().manual_seed(5))
    epochs = [stream.next_epoch() for _ in range(5)]
    assert all(e.numel() == 4 for e in epochs)
    flat = torch.cat(epochs)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    # the state continues the stream exactly
    saved = stream.state_dict()
    ahead = [stream.next_epoch() for _ in range(3)]
    again = UniformStream(10, 4, torch.Generator().manual_seed(5))
    again.load_state_dict(saved)
    again.generator.set_state(stream.generator.get_state())  # the generator travels in the run's checkpoint
    stream2 = UniformStream(10, 4, torch.Generator().manual_seed(5))
    for _ in range(5):
        stream2.next_epoch()
    assert [e.tolist() for e in ahead] == [stream2.next_epoch().tolist() for _ in range(3)]


# -- the scheduler -------------------------------------------------------------------------


def _task(tmp_path: Path, name: str, code: str, cores: int = 1) -> Task:
    return Task(label=name, argv=[sys.executable, "-c", code], log=tmp_path / f"{name}.log", cores=cores)


def _stamp(tmp_path: Path, name: str, seconds: float) -> str:
    return (f"import time; a = time.time(); time.sleep({seconds}); "
            f"open({str(tmp_path / (name + '.t'))!r}, 'w').write(f'{{a}} {{time.time()}}')")


def test_the_scheduler_keeps_to_its_cores_and_reports_failures(tmp_path):
    tasks = [
        _task(tmp_path, "a", _stamp(tmp_path, "a", 0.6)),
        _task(tmp_path, "big", _stamp(tmp_path, "big", 0.3), cores=2),
        _task(tmp_path, "b", _stamp(tmp_path, "b", 0.6)),
        _task(tmp_path, "broken", "import sys; print('the reason'); sys.exit(3)"),
        Task(label="finished", argv=[sys.executable, "-c", "raise SystemExit(9)"], log=tmp_path / "f.log",
             done=lambda: True),
    ]
    lines: List[str] = []
    failed = run_tasks(tasks, 2, say=lines.append, poll=0.05, record=tmp_path / "timings.json")
    assert [t.label for t in failed] == ["broken"]
    assert any("FAILED broken (exit 3)" in line for line in lines) and any("the reason" in line for line in lines)
    assert any("1 already done" in line for line in lines) and not (tmp_path / "f.log").exists()
    spans = {n: tuple(map(float, (tmp_path / f"{n}.t").read_text().split())) for n in ("a", "b", "big")}
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]  # two one-core tasks overlap
    for other in ("a", "b"):  # the two-core task runs alone
        assert spans["big"][1] <= spans[other][0] or spans["big"][0] >= spans[other][1]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert sorted(t["task"] for t in timings) == ["a", "b", "big", "broken"]
    assert all(t["wall_seconds"] > 0 and t["cpu_seconds"] >= 0 for t in timings)
    with pytest.raises(ValueError):
        run_tasks([], 0)


# -- report tables -------------------------------------------------------------------------


def _run(root: Path, config: RunConfig, records: List[dict], summary_extra=None, stop="step budget") -> None:
    folder = root / config.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.dumps())
    history = []
    for epoch, extra in enumerate(records):
        history.append({"epoch": epoch, "lr": 0.01, "samples": 10, "steps": 10 * (epoch + 1), "train_loss": 1.0,
                        "train_accuracy": 0.5, "test_loss": 1.0, "test_accuracy": 0.5 + 0.01 * epoch,
                        "balanced_accuracy": 0.5, "worst_class_accuracy": 0.4, "per_class_accuracy": [0.5] * 10,
                        "seconds": {"training": 2.0, "evaluation": 1.0, "sampling": 0.5}, "cpu_seconds": 2.0, **extra})
    _write_metrics(folder, history)
    summary = summarize(config, history, stop)
    summary.update(summary_extra or {})
    (folder / "summary.json").write_text(json.dumps(summary))


def test_the_weight_table_follows_the_records(tmp_path):
    base = dict(dataset="fashion-mnist", model="small_cnn", train_subset=100)
    config = RunConfig(**base, method="last_loss", warmup_epochs=1)
    warm = {"sampler": {"kind": "warmup"}, "weights": {"mean": 1.0, "max": 1.0}}
    for seed, growth in ((0, (1.5, 3.0, 500.0)), (1, (1.2, 1.4, 1.9))):
        records = [warm] + [{"sampler": {"kind": "importance", "min_weight": 0.1 / g, "max_weight": 10 * g},
                             "weights": {"mean": g, "max": 10 * g}} for g in growth]
        _run(tmp_path, config.replace(seed=seed), records, stop="diverged (non-finite loss)" if seed == 0 else "step budget")
    _run(tmp_path, RunConfig(**base, seed=0), [{}, {}])  # uniform: no weights, no row
    lines = weight_table(load_runs([tmp_path]))
    rows = [line for line in lines if line.startswith("| fashion")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # diverged 1/2; stopped at step 40; first importance mean median(1.5, 1.2); largest mean median(500, 1.9);
    # mean > 2 first at step 30 in seed 0 only; largest drawn median(5000, 19); weight > 100 at step 40 (seed 0)
    assert cells[2:] == ["1/2", "40", "1.35", "251", "30 (1/2)", "2.51e+03", "40 (1/2)",
                         f"{(0.1 / 500 + 0.1 / 1.9) / 2:.3g}"]


def test_the_cost_table_shows_the_workers_apart(tmp_path):
    base = dict(dataset="fashion-mnist", model="small_cnn", train_subset=100)
    pool = {"coverage": 1.0, "staleness": {"median": 30, "max": 90}, "items_per_second": 2000.0, "cpu_seconds": 7.0,
            "startup_seconds": 0.5}
    for seed in (0, 1):
        _run(tmp_path, RunConfig(**base, method="grad_norm", scorers=1, seed=seed), [{"scorers": pool}] * 2,
             {"train_eval": {"loss": 0.2 + seed, "accuracy": 0.9}})
    lines = cost_table(load_runs([tmp_path]))
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert cells[2:] == ["0.7", "90.00 ± 0.00", "5", "4", "7", "0.5", "1", "30 / 90", "2000"]


def test_the_cost_table_leaves_out_the_cpu_time_of_scorer_ranks(tmp_path):
    # scorer ranks are other processes (perhaps other machines): their records carry cpu_seconds None
    base = dict(dataset="fashion-mnist", model="small_cnn", train_subset=100)
    pool = {"coverage": 1.0, "staleness": {"median": 30, "max": 90}, "items_per_second": 2000.0, "cpu_seconds": None,
            "startup_seconds": 0.5, "scorer_ranks": 1}
    _run(tmp_path, RunConfig(**base, method="grad_norm", seed=0), [{"scorers": pool}] * 2,
         {"train_eval": {"loss": 0.2, "accuracy": 0.9}})
    cells = [c.strip() for c in cost_table(load_runs([tmp_path]))[-1].strip("|").split("|")]
    assert cells[6:] == ["–", "0.5", "1", "30 / 90", "2000"]


# -- the variance study's shadows ------------------------------------------------------------


def test_a_shadow_updates_only_what_it_drew_and_holds_the_q_it_draws_from():
    from isample.experiments.variance_study import SHADOWS, Shadow, oracle_proposals
    from isample.experiments.variance import GradientStats

    options = SHADOWS["bound, proportional + 10% uniform (grad_norm_proportional)"]
    shadow = Shadow("s", 50, 8, 16, 0, options)
    first = shadow.next_batch()
    assert first.numel() == 8 and torch.allclose(shadow.q, torch.full((50,), 1 / 50, dtype=torch.float64))
    logits = torch.zeros(8, 10)
    logits[:, 0] = 10.0  # confident and right: a small bound
    shadow.update(first, torch.full((8,), 0.01), logits, torch.zeros(8, dtype=torch.int64))
    scores = shadow.sampler.scores()
    others = torch.ones(50, dtype=torch.bool)
    others[first] = False
    assert torch.all(scores[others] == 2 ** 0.5) and torch.all(scores[first] < 0.01)
    assert torch.allclose(shadow.q, torch.full((50,), 1 / 50, dtype=torch.float64))  # the epoch in progress
    shadow.next_batch()
    shadow.next_batch()  # a new epoch (16 draws): drawn from the updated scores
    assert torch.allclose(shadow.q, shadow.sampler.probabilities())
    assert float(shadow.q[first[0]]) < 1 / 50 and float(shadow.q.min()) >= 0.1 / 50 - 1e-12
    stats = GradientStats(norms=torch.rand(50, dtype=torch.float64), mean_sq=0.01, losses=torch.rand(50, dtype=torch.float64),
                          bound=torch.rand(50, dtype=torch.float64))
    proposals = oracle_proposals(stats, None, stats)
    assert sum(q is None for q in proposals.values()) == 2  # nothing 50 steps before (pure and mixed)
    assert all(math.isclose(float(q.sum()), 1.0) for q in proposals.values() if q is not None)


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    "train --scorers -1", "train --preset uniform --scorers 1", "train --transform cubic", "train --epoch-steps 0",
    "train --initial-score nan", "train --publish-every 0", "study round2 --out somewhere", "study round2 --preset uniform",
    "study variance --preset uniform", "study variance --uniform-mix 0.5", "study science --jobs 0",
    "study fresh_scores --report-every 0",
])
def test_new_options_refuse_bad_values_with_exit_2(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(command.split())
    err = capsys.readouterr().err
    assert caught.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err
    assert list(tmp_path.iterdir()) == []
