"""benchmarks/quickstart_defaults.py (issue 24's quick-start evidence): its statistics on
hand-made runs, and its --quick path end to end (tiny sizes; no accuracy is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("sklearn", reason="the quick-start benchmark reads sklearn's digits: pip install scikit-learn")
pytest.importorskip("transformers", reason="pip install 'isample[hf]'")
pytest.importorskip("lightning", reason="pip install 'isample[lightning]'")
pytest.importorskip("scipy", reason="pip install scipy")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "quickstart_defaults.py")


@pytest.fixture(scope="module")
def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_defaults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs_of(task, accuracies):
    return [dict(task=task, arm=arm, seed=seed, accuracy=acc) for arm, accs in accuracies.items() for seed, acc in enumerate(accs)]


def test_summary_pairs_by_seed_and_gives_the_t_interval(quickstart):
    runs = runs_of("hf", {"uniform": [0.5, 0.6, 0.7], "defaults": [0.6, 0.6, 0.9], "old": [0.3, 0.35, 0.45]})
    runs += runs_of("other", {"uniform": [0.0, 0.0, 0.0], "defaults": [1.0, 1.0, 1.0]})  # another task: ignored
    summary = quickstart.summarize(runs, "hf")
    defaults, old = summary["defaults"], summary["old"]
    assert defaults["diff_points"] == pytest.approx([10.0, 0.0, 20.0])
    assert defaults["diff_mean_points"] == pytest.approx(10.0)
    assert defaults["diff_se_points"] == pytest.approx(10.0 / math.sqrt(3))
    half = 4.302652729911275 * 10.0 / math.sqrt(3)  # t(0.975, 2 df)
    assert defaults["diff_ci95_points"] == pytest.approx([10.0 - half, 10.0 + half])
    assert defaults["verdict"] == "level"  # the interval covers 0
    # old: -20, -25, -25 points, a tight interval below 0
    assert old["diff_mean_points"] == pytest.approx(-70.0 / 3)
    assert old["verdict"] == "worse"
    assert summary["uniform"]["mean"] == pytest.approx(0.6) and summary["uniform"]["sd"] == pytest.approx(0.1)
    better = quickstart.summarize(runs_of("t", {"uniform": [0.5, 0.5, 0.5], "defaults": [0.6, 0.61, 0.6]}), "t")
    assert better["defaults"]["verdict"] == "better"


def test_summary_pairs_only_the_seeds_both_arms_ran(quickstart):
    runs = runs_of("hf", {"uniform": [0.5, 0.6], "defaults": [0.7, 0.7, 0.1]})  # seed 2 has no uniform run
    entry = quickstart.summarize(runs, "hf")["defaults"]
    assert entry["paired_seeds"] == [0, 1] and entry["diff_points"] == pytest.approx([20.0, 10.0])


def test_the_arms_settings_are_the_recipe_and_the_issues(quickstart):
    import isample

    assert quickstart.same_settings(quickstart.describe(quickstart.make_sampler("defaults", 10, 0)), quickstart.RECIPE)
    old = quickstart.describe(quickstart.make_sampler("old", 10, 0))
    assert quickstart.same_settings(old, quickstart.OLD)
    assert not quickstart.same_settings(old, quickstart.RECIPE)  # the check can tell them apart
    assert not quickstart.same_settings(quickstart.describe(isample.ImportanceSampler(10, **{**quickstart.RECIPE, "uniform_mix": 0.1})),
                                        quickstart.RECIPE)
    iid = quickstart.describe(quickstart.make_sampler("iid_uniform", 10, 0))
    assert iid["uniform_mix"] == 1.0 and iid["replacement"] is True
    with pytest.raises(ValueError, match="arm 'uniform' has no sampler"):
        quickstart.make_sampler("uniform", 10, 0)


@pytest.mark.slow  # six transformers Trainer fits and six Lightning fits: 3-9 s on a loaded 2-core machine
def test_quick_run_writes_well_formed_results(quickstart, tmp_path, capsys):
    options = ["--quick", "--tasks", "hf", "lightning", "--arms", "defaults", "old", "--out-dir", str(tmp_path)]
    first = quickstart.main(["--seeds", "1", *options])
    result = quickstart.main(["--seeds", "2", "--extend", *options])  # runs seed 1 only
    assert [r for r in result["runs"] if r["seed"] == 0] == first["runs"]
    assert [i["argv"][:2] for i in result["invocations"]] == [["--seeds", "1"], ["--seeds", "2"]]
    saved = json.loads((tmp_path / "quickstart.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert saved["quick"] is True and saved["tasks"] == ["hf", "lightning"] and saved["arms"] == ["uniform", "defaults", "old"]
    assert len(saved["runs"]) == 2 * 2 * 3  # tasks x seeds x arms
    for run in saved["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["steps"] > 0 and run["seconds"] >= 0
        if run["arm"] == "uniform":
            assert run["sampler"] is None
        else:
            assert quickstart.same_settings(run["sampler"], quickstart.SETTINGS[run["arm"]])
    for task in ("hf", "lightning"):
        steps = {run["steps"] for run in saved["runs"] if run["task"] == task}
        assert len(steps) == 1  # the same step budget in every arm
        summary = saved["summary"][task]
        assert set(summary) == {"uniform", "defaults", "old"}
        accs = {(r["arm"], r["seed"]): r["accuracy"] for r in saved["runs"] if r["task"] == task}
        for arm in ("defaults", "old"):
            assert summary[arm]["diff_points"] == pytest.approx([100 * (accs[arm, s] - accs["uniform", s]) for s in (0, 1)])
            assert summary[arm]["verdict"] in ("better", "level", "worse")
    assert saved["machine"]["cpu"] and saved["machine"]["torch"] and saved["versions"]["transformers"]
    assert len(saved["verdict"]) == 4 + 2  # one line per task and arm, and the two answers
    page = (tmp_path / "quickstart.md").read_text()
    assert page.count("| uniform |") == 2 and "## Verdict" in page and "## Machine" in page
    assert "[" in capsys.readouterr().err  # progress lines
    (tmp_path / "quickstart.md").unlink()
    quickstart.main(["--render-only", "--out-dir", str(tmp_path)])  # the page again, from the JSON alone
    assert (tmp_path / "quickstart.md").read_text() == page


def test_extend_refuses_a_file_made_with_other_settings(quickstart, tmp_path):
    (tmp_path / "quickstart.json").write_text(json.dumps(dict(config={"hf": {}}, recipe=quickstart.RECIPE, old=quickstart.OLD,
                                                              quick=True, runs=[])))
    with pytest.raises(SystemExit, match="other sizes or settings"):
        quickstart.main(["--quick", "--extend", "--out-dir", str(tmp_path)])


def test_bad_arguments_are_refused(quickstart, tmp_path):
    with pytest.raises(SystemExit):
        quickstart.main(["--seeds", "0", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        quickstart.main(["--tasks", "vision", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written
