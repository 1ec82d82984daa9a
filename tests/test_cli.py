"""The ``isample`` command under bad arguments: every subcommand ends with exit status 2 and one
line on stderr, before it creates anything.

Each case runs ``isample.cli.main`` in this process (the command's own code path, fast); one
test runs ``python -m isample`` as real subprocesses, for the exit status and the stream the
shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from isample.cli import main
from isample.experiments.config import RunConfig


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder holding: a file, an empty folder, a junk run folder and a run folder
    with no finished epoch. The cases run inside it."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(RunConfig(dataset="fashion-mnist").dumps())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


TRAIN = [
    "--max-epochs -1", "--max-epochs 0", "--batch-size 0", "--dataset nosuch", "--model nosuch", "--out a_file",
    "--lr nan", "--lr -1", "--lr inf", "--lr abc", "--seeds 0", "--seeds -2", "--seed -1", "--data-dir /nonexistent",
    "--data-dir a_file", "--preset nosuch", "--preset uniform nosuch", "--grid nosuch", "--grid paper --preset uniform",
    "--samples-fraction 0", "--samples-fraction nan", "--samples-fraction 50", "--uniform-mix 2", "--uniform-mix -0.1",
    "--imbalance-ratio 0.5", "--temperature 0", "--budget-steps 0", "--budget-seconds nan", "--target-accuracy 1.5",
    "--device gpu", "--device cuda:x", "--checkpoint-seconds -1", "--max-wall-seconds 0", "--replacement maybe",
    "--lr-milestones -1", "--train-subset 0", "--test-subset -5", "--patience -1", "--warmup-epochs -1",
    "--weighting fancy", "--nosuch-flag", "--augment --no-augment",
    # settings each option allows but the preset does not: refused when the runs are built
    "--preset last_loss --samples-fraction 5",
    # a data set that is not on disk (the folder exists, the files do not)
    "--dataset cifar10 --data-dir empty", "--dataset mnist --data-dir empty",
]
STUDY = [
    "nosuch", "science --seeds 0", "science --preset nosuch", "science --out a_file", "science --results a_file",
    "science --lr nan", "science --max-epochs 0", "science --data-dir /nonexistent", "science --dataset cifar10 --data-dir empty",
    "",
]
PLOT = ["nosuch_folder", "empty", "junk", "unfinished", "unfinished --out a_file", ""]
REPORT = [
    "nosuch_folder", "empty", "junk", "unfinished --target 2", "unfinished --target nan", "unfinished --relative-target 0",
    "unfinished --target 0.5 --relative-target 0.5", "unfinished --out empty", "unfinished --out nosuch_dir/table.md", "",
]
BENCH = [
    "--budget nan", "--budget 0", "--repeats 0", "--min-repeats 0", "--sizes abc", "--sizes 0", "--methods nosuch",
    "--workloads nosuch", "--from-json /nonexistent", "--json empty", "--plot empty", "--peer-max-n nan",
    "--mc-draws inf", "--wait-for-quiet -1", "--max-call 0", "--max-build nan", "--seed -1", "--nosuch",
]
TOP = ["", "nosuch", "--nosuch"]

CASES = (
    [f"train {a}" for a in TRAIN] + [f"study {a}" for a in STUDY] + [f"plot {a}" for a in PLOT]
    + [f"report {a}" for a in REPORT] + [f"bench {a}" for a in BENCH] + TOP
)


@pytest.mark.parametrize("command", CASES)
def test_a_bad_argument_exits_2_with_one_line_and_leaves_nothing(place, capsys, command):
    before = _listing(place)
    with pytest.raises(SystemExit) as caught:
        main(command.split())
    out, err = capsys.readouterr()
    assert caught.value.code == 2, f"exit status {caught.value.code}; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("isample") and "error:" in lines[0], lines[0]
    assert out == ""
    assert _listing(place) == before, "the command left something behind"


def test_the_bench_check_restores_argparse(place, capsys):
    """The bench subcommand makes bench's own parser report on one line, and only while it parses."""
    import argparse

    original = argparse.ArgumentParser.error
    with pytest.raises(SystemExit):
        main(["bench", "--nosuch"])
    assert argparse.ArgumentParser.error is original


@pytest.mark.slow  # two Python starts with torch (2-5 s each on a loaded 2-core machine), run together
def test_bad_arguments_in_a_real_process(place):
    commands = ["train --lr nan", "report junk"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    running = [
        subprocess.Popen([sys.executable, "-m", "isample", *c.split()], cwd=place, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    before = _listing(place)
    for command, process in zip(commands, running):
        out, err = process.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 2, f"{command!r}: exit {process.returncode}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("isample"), f"{command!r}:\n{err}"
        assert out == ""
    assert _listing(place) == before


def test_valid_report_arguments_still_work(place, capsys):
    """The checks refuse only what is wrong: a finished run folder reports."""
    run = place / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text(RunConfig(dataset="fashion-mnist", model="small_cnn").dumps())
    record = {"epoch": 0, "train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0, "test_accuracy": 0.5,
              "seconds": {"train": 1.0, "eval": 0.1, "sampling": 0.01}, "steps": 10, "samples": 100}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    try:
        code = main(["report", str(place / "runs"), "--out", "table.md"])
    except SystemExit as error:  # the record format is the runner's: say what it refused
        pytest.fail(f"report refused a run folder: {capsys.readouterr().err}")
    assert code == 0 and (place / "table.md").read_text().startswith("|")
