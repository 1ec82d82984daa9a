"""The experiment runner with scorer ranks: ``isample train --scorer-ranks K`` on 3 gloo
processes, 2 trainers and 1 rank that serves scores (``isample.scoring.ScorerRanks``).

The test starts this file as a script three times (``python test_scorer_ranks_run.py RANK
WORLD STORE OUT``), as torchrun would start the ranks but without its agent (a file store
instead of a rendezvous: seconds less on a loaded machine). Each process runs the command
twice in the same process group:

1. ``--preset grad_norm_proportional --scorer-ranks 1``: ranks 0 and 1 train (DDP and the
   distributed sampler over their own group), rank 2 scores until they finish;
2. the negative control, the same run without ``--scorer-ranks``: three trainers, which
   score their own batches;
3. the first run again, stopped after one step (``--max-wall-seconds``) and resumed.

The refusals (too many scorer ranks, a method without a score, local ``--scorers`` too, a
resume with another number of scorer ranks) are checked in this process, with no group.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")
RUN_TIMEOUT_S = 240  # the three processes, start-up and both runs included
PG_TIMEOUT_S = 60
RUN = ["train", "--preset", "grad_norm_proportional", "--dataset", "fashion-mnist", "--model", "small_cnn",
       "--train-subset", "512", "--test-subset", "100", "--no-augment", "--device", "cpu", "--no-progress",
       "--epoch-steps", "6", "--max-epochs", "2", "--publish-every", "2", "--lr-milestones"]


def _main(rank: int, world: int, store: str, out: str) -> None:
    """One rank: both runs, then the exit codes in rank{rank}.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from isample.cli import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    ranks = [*RUN, "--batch-size", "32", "--scorer-ranks", "1"]
    codes = {
        "scorer_ranks": main([*ranks, "--out", f"{out}/ranks"]),
        "control": main([*RUN, "--batch-size", "48", "--out", f"{out}/control"]),
        "stopped": main([*ranks, "--out", f"{out}/resumed", "--max-wall-seconds", "1e-9"]),  # after one step
    }
    print("--- resuming ---", flush=True)
    codes["resumed"] = main([*ranks, "--out", f"{out}/resumed"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(codes))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Test side.
# ---------------------------------------------------------------------------------------------


def _run_folder(parent: Path) -> Path:
    (run,) = parent.iterdir()  # one run folder
    return run


def _history(run: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import run_processes

    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("scorer_ranks_run")
    world = 3
    outputs = run_processes("3-process runner", [[__file__, str(r), str(world), str(out / "store"), str(out)]
                                                 for r in range(world)], RUN_TIMEOUT_S)
    codes = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return out, codes, outputs


@pytest.mark.slow  # three Python processes with torch on a loaded 2-core machine: ~15-25 s
def test_two_trainers_and_a_scorer_rank_train_from_the_scorer_s_scores(runs):
    out, codes, outputs = runs
    assert all(c["scorer_ranks"] == 0 for c in codes), codes  # the scorer rank returned too
    run = _run_folder(out / "ranks")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 2 and summary["scorer_ranks"] == 1
    history = _history(run)
    assert [r["steps"] for r in history] == [6, 12]  # global batches of 32: 16 on each of the 2 trainers
    assert all(r["samples"] == 6 * 32 for r in history)
    pools = [r["scorers"] for r in history]
    assert all(p["scorer_ranks"] == 1 and p["workers_alive"] == 1 and p["rejected"] == 0 for p in pools), pools
    assert pools[-1]["coverage"] > 0 and pools[-1]["items_scored"] > 0 and pools[-1]["published"] > 0
    assert pools[-1]["cpu_seconds"] is None  # another process's CPU: not read here
    # The trainers call no sampler.update with scorer ranks: every score below the initial
    # sqrt(2) (the bound's maximum) was written by the scorer rank.
    assert history[-1]["scores"]["min"] < 2 ** 0.5 - 1e-9
    # Only rank 0 prints; it names the scorer rank nowhere it should not.
    assert "] done:" in outputs[0] and "] done:" not in outputs[1] + outputs[2]


@pytest.mark.slow  # (the same three processes as above)
def test_without_scorer_ranks_the_same_processes_all_train_and_record_no_scorer(runs):
    out, codes, _ = runs
    assert all(c["control"] == 0 for c in codes), codes
    run = _run_folder(out / "control")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 3 and "scorer_ranks" not in summary
    history = _history(run)
    assert all("scorers" not in r for r in history)
    assert history[-1]["scores"]["min"] < 2 ** 0.5 - 1e-9  # the trainers scored their own batches


@pytest.mark.slow  # (the same three processes as above)
def test_a_run_with_scorer_ranks_stops_and_resumes_with_its_pool(runs):
    out, codes, outputs = runs
    # every rank, the scorer too, hears that the run stopped early (exit 3) and then finished
    assert all(c["stopped"] == 3 and c["resumed"] == 0 for c in codes), codes
    resumed = outputs[0].split("--- resuming ---")[1]
    assert "resumed at epoch 0 on 2 processes and 1 scorer rank(s), 32 items into it" in resumed
    run = _run_folder(out / "resumed")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["scorer_ranks"] == 1
    history = _history(run)
    assert [r["steps"] for r in history] == [6, 12]
    pools = [r["scorers"] for r in history]
    assert all(p["rejected"] == 0 and p["workers_alive"] == 1 for p in pools)
    # the pool's ledger came through the checkpoint: its step count goes on from the stop
    assert pools[-1]["coverage"] > 0 and pools[-1]["published"] >= 1
    assert history[-1]["scores"]["min"] < 2 ** 0.5 - 1e-9


# -- refusals, in this process ----------------------------------------------------------------


def _config(preset: str = "grad_norm_proportional", **overrides: Any):
    from isample.experiments.config import preset as make

    return make(preset, dataset="fashion-mnist", model="small_cnn", train_subset=64, test_subset=20, device="cpu",
                **overrides)


@pytest.mark.parametrize(
    "preset, overrides, scorer_ranks, processes, message",
    [
        ("grad_norm_proportional", {}, 1, 1, r"--scorer-ranks 1 needs more processes than scorer ranks.*there is 1"),
        ("grad_norm_proportional", {}, 3, 3, r"at least one must train.*there are 3.*--nproc_per_node 4"),
        ("uniform", {}, 1, 3, r"method 'uniform' has no score a scorer rank can compute"),
        ("running_loss", {}, 1, 3, r"method 'running_loss' has no score"),
        ("grad_norm_scorers", {}, 1, 3, r"replaces the local scoring workers.*scorers=1"),
        ("grad_norm_proportional", {}, -1, 3, r"scorer_ranks must be an int >= 0"),
        ("grad_norm_proportional", {}, True, 3, r"scorer_ranks must be an int >= 0"),
    ],
)
def test_bad_combinations_are_refused_with_the_fix(preset, overrides, scorer_ranks, processes, message):
    from isample.experiments.world import check_scorer_ranks

    with pytest.raises(ValueError, match=message):
        check_scorer_ranks(_config(preset, **overrides), scorer_ranks, processes)


def test_good_combinations_pass():
    """Negative control of the refusals: what can work is let through."""
    from isample.experiments.world import check_scorer_ranks

    check_scorer_ranks(_config(), 1, 3)
    check_scorer_ranks(_config("last_loss"), 2, 3)
    check_scorer_ranks(_config("uniform"), 0, 1)  # no scorer ranks: nothing to check


def test_scorer_ranks_in_one_process_are_refused_before_any_folder(monkeypatch, tmp_path):
    from isample.experiments.train import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="this is one process.*torchrun"):
        train(_config(), tmp_path / "run", scorer_ranks=1, progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "world, extra, message",
    [
        ("1", ["--preset", "grad_norm_proportional"], "needs more processes than scorer ranks"),
        ("3", ["--preset", "uniform"], "method 'uniform' has no score"),
        ("3", ["--preset", "grad_norm_proportional", "--scorers", "2"], "replaces the local scoring workers"),
    ],
)
def test_the_command_refuses_them_in_one_line_on_every_rank(monkeypatch, capsys, tmp_path, world, extra, message):
    from isample.cli import main

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "1")  # a rank other than 0 refuses too (it would otherwise wait for the others)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *extra, "--scorer-ranks", "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_resume_with_another_number_of_scorer_ranks_is_refused(tmp_path):
    from isample.checkpoint import save_checkpoint
    from isample.experiments.train import CHECKPOINT, _open_run
    from isample.experiments.world import OneProcess

    class Trainers(OneProcess):  # how two trainers of a job without scorer ranks see themselves
        size = 2

    config = _config()
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / CHECKPOINT, {"world_size": 2, "scorer_ranks": 1})
    with pytest.raises(ValueError, match=r"saved with 1 scorer rank\(s\); resume it with --scorer-ranks 1"):
        _open_run(config, run, True, Trainers(), None)
    save_checkpoint(run / CHECKPOINT, {"world_size": 2})  # negative control: the same world resumes
    assert _open_run(config, run, True, Trainers(), None)[0] == "resume"


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
