"""The ``isample`` command: train, plot, report, bench.

    isample train --preset last_loss --dataset fashion-mnist --model small_cnn --seeds 3
    isample train --grid paper --dataset cifar10 --data-dir data/     # the seed paper's study
    torchrun --nproc_per_node 3 -m isample.cli train --preset grad_norm_proportional --scorer-ranks 1
    isample plot runs/* --out figures/
    isample report runs/*
    isample study science                     # a named study: runs, report, figures, metrics
    isample study round2 --jobs 2             # round 2: variance, divergence, early importance, fresh scores
    isample bench --quick

A bad argument (a value out of range, an unknown name, a missing folder, an output path that
is an existing file) ends the command with exit status 2 and one line on stderr, before any
folder is created.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

GRIDS = {
    "paper": ("uniform", "last_loss", "running_loss"),
    "all": ("uniform", "last_loss", "running_loss", "grad_norm", "infobatch"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (``isample train: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _number(kind: Callable[[str], Any], what: str, test: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: `kind` of the text, refused unless finite and `test` holds."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
_count = _number(int, "an integer >= 0", lambda v: v >= 0)
_positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
_non_negative_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
_at_least_one = _number(float, "a finite number >= 1", lambda v: v >= 1)
_unit = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
_fraction = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
_samples_fraction = _number(float, "a number in (0, 10]", lambda v: 0 < v <= 10)
_finite_float = _number(float, "a finite number", lambda v: True)


def _device_name(text: str) -> str:
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _overrides(args: argparse.Namespace) -> dict:
    """The RunConfig fields given on the command line."""
    overrides = {}
    for name in (
        "dataset", "data_dir", "model", "max_epochs", "patience", "batch_size", "lr", "imbalance_ratio",
        "train_subset", "test_subset", "device", "weighting", "temperature", "uniform_mix", "budget_steps",
        "budget_seconds", "target_accuracy", "samples_fraction", "replacement", "warmup_epochs", "scorers",
        "transform", "epoch_steps", "initial_score", "publish_every",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.lr_milestones is not None:
        overrides["lr_milestones"] = tuple(args.lr_milestones)
    return overrides


def _configs(parser: argparse.ArgumentParser, make: Callable[[], list]) -> list:
    """The run configurations, or a one-line argument error (exit 2) for settings they refuse."""
    try:
        configs = make()
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    if not configs:
        parser.error("these options select no run")
    return configs


def _check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """What the run options name on this machine, checked before any folder is created."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is an existing file: name a folder")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder (it does not exist)")
    if args.device is not None and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu or auto")


def _check_data(parser: argparse.ArgumentParser, configs: list) -> None:
    """Each data set the runs need is on disk (training would otherwise fail after creating its
    run folder). Only looks for the files; reading them is the run's job."""
    from .experiments import data

    for dataset, data_dir in sorted({(c.dataset, c.data_dir) for c in configs}, key=str):
        root = Path(data_dir).expanduser() if data_dir is not None else data.default_data_dir()
        if dataset in ("cifar10", "cifar100"):
            folder, probe = ("cifar-10-batches-py", "data_batch_1") if dataset == "cifar10" else ("cifar-100-python", "train")
            found = data._find_cifar_dir(root, folder, probe)[0]
        else:
            found = data._find_idx_files(dataset, root)[0]
        if found is None:
            hint = "--data-dir" if data_dir is None else f"--data-dir {data_dir}"
            parser.error(
                f"{dataset}: no copy found under {root}; put the files there or pass {hint} pointing at them "
                "(see isample.experiments.data for the layout and where to get them)"
            )


def _train(args: argparse.Namespace) -> int:
    from .experiments.config import grid, preset

    parser = args.parser
    overrides = _overrides(args)
    seeds = range(args.seed, args.seed + args.seeds)
    augment = (True, False) if args.augment is None else (args.augment,)
    out = Path(args.out)
    _check_run_options(parser, args, out)
    if args.grid:
        configs = _configs(parser, lambda: grid(GRIDS[args.grid], seeds=seeds, augment=augment, **overrides))
    else:
        names = args.preset or ["uniform"]
        configs = _configs(
            parser, lambda: [preset(n, augment=a, seed=s, **overrides) for n in names for a in augment for s in seeds]
        )
    _check_scorer_ranks(parser, configs, args.scorer_ranks)
    _check_data(parser, configs)
    return _run_all(configs, out, args)


def _check_scorer_ranks(parser: argparse.ArgumentParser, configs: list, scorer_ranks: int) -> None:
    """--scorer-ranks fits the processes torchrun started and every run (each rank checks the
    same, so all of them refuse together)."""
    from .experiments.world import check_scorer_ranks, world_size

    for config in configs:
        try:
            check_scorer_ranks(config, scorer_ranks, world_size())
        except ValueError as error:
            parser.error(f"{config.name}: {error}" if len(configs) > 1 else str(error))


def _lead() -> bool:
    """False on torchrun's ranks other than 0: they train, but print and write nothing."""
    return os.environ.get("WORLD_SIZE", "1") in ("", "1") or os.environ.get("RANK", "0") in ("", "0")


def _run_all(configs: list, out: Path, args: argparse.Namespace) -> int:
    """Train each configuration in its folder under `out` (resuming where it stopped)."""
    import time

    from .experiments.schedule import format_seconds
    from .experiments.train import train

    say = print if _lead() else (lambda *_, **__: None)  # under torchrun only rank 0 prints
    say(f"{len(configs)} run(s) in {out}/", flush=True)
    began, trained = time.monotonic(), []  # the seconds of the runs trained here (not already done)
    for number, config in enumerate(configs, start=1):
        eta = ""
        if trained:
            eta = f", ETA ~{format_seconds(sum(trained) / len(trained) * (len(configs) - number + 1))}"
        say(f"run {number}/{len(configs)}: {config.name} (elapsed {format_seconds(time.monotonic() - began)}{eta})",
            flush=True)
        start = time.monotonic()
        done_before = (out / config.name / "summary.json").is_file() and not args.restart
        summary = train(
            config, out / config.name, resume=not args.restart, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds, max_wall_seconds=args.max_wall_seconds,
            scorer_ranks=getattr(args, "scorer_ranks", 0),
        )
        if not done_before:
            trained.append(time.monotonic() - start)
        if not summary.get("complete"):
            say("stopped before the end (time limit); rerun the same command to resume", flush=True)
            return 3
        say(
            f"[{config.name}] done: best test accuracy {summary['best_test_accuracy']:.4f} "
            f"(epoch {summary['best_epoch']}), final {summary['final_test_accuracy']:.4f}, "
            f"sampling {100 * summary['sampling_share']:.2f}% of the time ({summary['stop_reason']})",
            flush=True,
        )
    return 0


def _study_plan(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> tuple:
    """(configs, run folder, results folder) of a named study with the command's options."""
    from .experiments.config import STUDIES, study

    spec = STUDIES[name]
    overrides = _overrides(args)
    if args.augment is not None:
        overrides["augment"] = args.augment
    seeds = range(args.seed, args.seed + (spec.seeds if args.seeds is None else args.seeds))
    out = Path(args.out or Path("runs") / name)
    results = Path(args.results or spec.results or Path("docs") / "results" / name)
    configs = _configs(parser, lambda: study(name, presets=args.preset, seeds=seeds, **overrides))
    return configs, out, results


def _study(args: argparse.Namespace) -> int:
    from .experiments.config import ROUND2

    parser = args.parser
    names = ["variance", *ROUND2] if args.name == "round2" else [args.name]
    if len(names) > 1 and (args.out or args.results or args.preset):
        parser.error("round2 runs every study whole, each in its own folders: --out, --results and --preset "
                     "belong to a single study")
    if args.name == "variance" and args.preset:
        parser.error("the variance study has no presets to choose from")
    _check_run_options(parser, args, Path(args.out or "runs"))
    if args.results is not None and Path(args.results).exists() and not Path(args.results).is_dir():
        parser.error(f"--results {args.results} is an existing file: name a folder")
    variance = None  # the variance study is not a grid of training runs: it plans its own tasks
    plans = {}
    for name in names:
        if name == "variance":
            from .experiments.variance_study import VarianceStudy

            variance = _configs(parser, lambda: [VarianceStudy.from_args(args)])[0]
        else:
            plans[name] = _study_plan(parser, args, name)
    _check_data(parser, [c for plan in plans.values() for c in plan[0]] + (variance.configs() if variance else []))
    if args.jobs > 1 or variance is not None:
        code = _run_scheduled(plans, variance, args)
    else:
        configs, out, _ = plans[names[0]]
        code = _run_all(configs, out, args)
    if code or not _lead():
        return code  # rank 0 writes the report
    if variance is not None:
        variance.write_results()
    for name, plan in plans.items():
        _write_study_results(name, *plan)
    return 0


def _run_scheduled(plans: dict, variance: Any, args: argparse.Namespace) -> int:
    """Every task of the studies through the scheduler, --jobs cores at a time."""
    from .experiments.schedule import run_tasks, training_task

    tasks = [] if variance is None else variance.tasks(restart=args.restart)
    for configs, out, _ in plans.values():
        tasks += [training_task(c, out / c.name, restart=args.restart, checkpoint_seconds=args.checkpoint_seconds)
                  for c in configs]
    title = "+".join((["variance"] if variance is not None else []) + list(plans))
    record = Path(args.out or "runs") / f"{title.replace('+', '-')}-timings.json"
    failed = run_tasks(tasks, args.jobs, title=title, report_every=args.report_every, record=record)
    if failed:
        print(f"{len(failed)} task(s) failed: {', '.join(t.label for t in failed)}; their logs say why. Rerun the "
              "same command to retry them (finished runs are kept).", file=sys.stderr)
        return 1
    return 0


def _write_study_results(name: str, configs: list, out: Path, results: Path) -> None:
    """report.md, the figures and each run's per-epoch metrics of a finished study."""
    import shutil

    from .experiments.config import STUDIES
    from .experiments.plots import plot_runs
    from .experiments.report import report

    folders = [out / c.name for c in configs]
    results.mkdir(parents=True, exist_ok=True)
    text = report(folders, **STUDIES[name].report)
    (results / "report.md").write_text(text)
    figures = plot_runs(folders, results / "figures")
    # The per-epoch metrics of every run (not the checkpoints), so the tables can be recomputed.
    for folder in folders:
        dest = results / "runs" / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        for file in ("config.json", "metrics.jsonl", "summary.json"):
            shutil.copy2(folder / file, dest / file)
    print(text)
    print(f"wrote {results / 'report.md'}, {len(figures)} figures in {results / 'figures'}, "
          f"metrics of {len(folders)} runs in {results / 'runs'}")


def _load_runs(parser: argparse.ArgumentParser, runs: List[str]) -> list:
    """The run groups of `runs`, or a one-line error for a folder that is missing, empty or
    not a run folder (or holds files that cannot be read as one)."""
    from .experiments.report import load_runs

    try:
        return load_runs(runs)
    except (ValueError, OSError, KeyError, TypeError) as error:
        parser.error(f"cannot read the runs: {error}")


def _plot(args: argparse.Namespace) -> int:
    from .experiments.plots import plot_runs

    parser = args.parser
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is an existing file: name a folder for the figures")
    groups = _load_runs(parser, args.runs)
    if not any(run["history"] for group in groups for run in group["runs"]):
        parser.error("none of the runs has finished an epoch yet: nothing to draw")
    written = plot_runs(args.runs, args.out)
    for path in written:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    parser = args.parser
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            parser.error(f"--out {args.out} is a folder: name a file for the table")
        if not out.parent.is_dir():
            parser.error(f"--out {args.out}: the folder {out.parent} does not exist")
    _load_runs(parser, args.runs)
    text = report(args.runs, target_accuracy=args.target, relative_target=args.relative_target,
                  equal_time=args.equal_time)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _bench(args: argparse.Namespace, rest: List[str]) -> int:
    from . import bench

    _check_bench_arguments(bench, rest)
    return bench.main(rest)


def _check_bench_arguments(bench: Any, rest: List[str]) -> None:
    """Parse bench's arguments once with one-line errors (exit 2), and refuse values that its
    parser lets through (NaN, negative counts, missing files) before anything runs."""
    parser = _Parser(prog="isample bench")
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _Parser.error  # bench builds its own parser: same one-line errors
    try:
        settings, options = bench.parse_args(rest)
    except (ValueError, OverflowError) as error:  # bench converts --peer-max-n and --mc-draws to int
        parser.error(f"{error}: --peer-max-n and --mc-draws must be finite numbers")
    finally:
        argparse.ArgumentParser.error = original
    checks = [
        ("--budget", settings.budget_s, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("--min-repeats", settings.min_repeats, lambda v: v >= 1, "an integer >= 1"),
        ("--repeats", settings.max_repeats, lambda v: v >= settings.min_repeats, "an integer >= --min-repeats"),
        ("--max-call", settings.max_call_s, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("--max-build", settings.max_build_s, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("--peer-max-n", settings.peer_max_n, lambda v: v >= 1, "a number >= 1"),
        ("--mc-draws", settings.mc_draws, lambda v: v >= 1, "a number >= 1"),
        ("--wait-for-quiet", settings.quiet_wait_s, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        ("--seed", settings.seed, lambda v: v >= 0, "an integer >= 0"),
    ]
    for flag, value, test, expected in checks:
        if not test(value):
            parser.error(f"argument {flag}: expected {expected}, got {value}")
    if options.from_json is not None and not Path(options.from_json).is_file():
        parser.error(f"argument --from-json: {options.from_json} is not a file")
    for flag, path in (("--json", options.json), ("--plot", options.plot)):
        if path is not None and Path(path).is_dir():
            parser.error(f"argument {flag}: {path} is a folder: name a file")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.config import PRESETS, STUDIES

    parser = _Parser(prog="isample", description="isample: importance sampling of training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run training experiments (presets from the seed paper's Appendix A)")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--preset", nargs="+", choices=sorted(PRESETS), metavar="PRESET", help=", ".join(PRESETS))
    which.add_argument("--grid", choices=sorted(GRIDS), help="a study: paper = uniform + last_loss + running_loss")
    t.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (default 1)")
    t.add_argument("--seed", type=_count, default=0, help="first seed (default 0)")
    _add_run_options(t)
    t.add_argument("--scorer-ranks", type=_count, default=0, metavar="K",
                   help="under torchrun: the last K ranks serve fresh scores to the others, which train (the second "
                        "seed's scoring workers as ranks; methods grad_norm and last_loss, e.g. --preset "
                        "grad_norm_proportional; not with --scorers)")
    t.add_argument("--out", default="runs", help="folder of the run folders (default runs/)")
    t.set_defaults(handler=_train, parser=t)  # errors name the subcommand

    st = sub.add_parser(
        "study", help="run a named study end to end: its runs (resumable), report, figures and metrics",
        description="Run a named study (isample.experiments.config.STUDIES): train every run that is not "
                    "complete yet, then write report.md, the figures and each run's per-epoch metrics to "
                    "--results. Training options override the study's settings (for a smaller trial).",
    )
    st.add_argument("name", choices=sorted([*STUDIES, "variance", "round2"]), metavar="NAME",
                    help="the study: " + ", ".join(f"{k} ({v.description})" for k, v in STUDIES.items())
                    + ", variance (the exact variance of the importance-sampled gradient under each proposal, "
                    "docs/results/variance), round2 (variance and the round-2 studies in one queue)")
    st.add_argument("--preset", nargs="+", choices=sorted(PRESETS), metavar="PRESET",
                    help="only these of the study's presets")
    st.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the study's)")
    st.add_argument("--seed", type=_count, default=0, help="first seed (default 0)")
    _add_run_options(st)
    st.add_argument("--out", help="folder of the run folders (default runs/NAME)")
    st.add_argument("--results", help="where report, figures and metrics go (default docs/results/NAME)")
    st.add_argument("--jobs", type=_positive_int, default=1,
                    help="cores to use: runs at a time, each on one thread; a run with K scoring workers takes "
                         "K + 1 (default 1: one run at a time, in this process)")
    st.add_argument("--report-every", type=_positive_float, default=60.0,
                    help="seconds between progress lines while runs are going (default 60)")
    st.set_defaults(handler=_study, parser=st)  # errors name the subcommand

    p = sub.add_parser("plot", help="the seed paper's figures 1-6 from run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="figures")
    p.set_defaults(handler=_plot, parser=p)  # errors name the subcommand

    r = sub.add_parser("report", help="a markdown table of the runs")
    r.add_argument("runs", nargs="+")
    target = r.add_mutually_exclusive_group()
    target.add_argument("--target", type=_unit, help="target test accuracy for epochs / time to target")
    target.add_argument("--relative-target", type=_fraction,
                        help="per setting, this fraction of uniform's mean best test accuracy (e.g. 0.98)")
    r.add_argument("--equal-time", action="store_true",
                   help="also compare the methods at an equal wall-clock budget per setting")
    r.add_argument("--out", help="write the table here instead of printing it")
    r.set_defaults(handler=_report, parser=r)  # errors name the subcommand

    b = sub.add_parser("bench", help="time isample against the samplers users would pick instead", add_help=False)
    b.set_defaults(handler=None)
    return parser


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """The options of one training run, shared by train and study."""
    from .experiments.data import DATASETS
    from .experiments.models import MODELS

    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_const", const=True, help="only with augmentation")
    aug.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="only without")
    t.add_argument("--dataset", choices=DATASETS, help=f"{', '.join(DATASETS)} (default cifar10)")
    t.add_argument("--data-dir", help="where the data sets are (default $ISAMPLE_DATA_DIR or ~/.cache/isample/data)")
    t.add_argument("--model", choices=MODELS, help=f"{' or '.join(MODELS)} (default resnet18)")
    t.add_argument("--max-epochs", type=_positive_int)
    t.add_argument("--patience", type=_count, help="early stopping patience in epochs (default 15)")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--lr", type=_positive_float)
    t.add_argument("--lr-milestones", type=_count, nargs="*")
    t.add_argument("--imbalance-ratio", type=_at_least_one, help="> 1: the long-tailed variant of the data set")
    t.add_argument("--train-subset", type=_positive_int, help="train on a stratified subset of this size")
    t.add_argument("--test-subset", type=_positive_int, help="test on a stratified subset of this size")
    t.add_argument("--samples-fraction", type=_samples_fraction, help="|Z| / N of importance epochs (overrides the preset)")
    t.add_argument("--replacement", type=_bool, help="draw |Z| with replacement (true/false)")
    t.add_argument("--warmup-epochs", type=_count)
    t.add_argument("--weighting", choices=("inverse_probability", "auto", "none"),
                   help="inverse_probability: the paper's 1/(Np); auto: isample's unbiased weights")
    t.add_argument("--temperature", type=_positive_float)
    t.add_argument("--uniform-mix", type=_unit)
    t.add_argument("--transform", choices=("softmax", "proportional"),
                   help="scores -> probabilities: the paper's softmax, or q proportional to the score")
    t.add_argument("--epoch-steps", type=_positive_int, help="importance epochs of this many steps (|Z| = steps x batch)")
    t.add_argument("--initial-score", type=_finite_float, help="score of every item before its first one")
    t.add_argument("--scorers", type=_count,
                   help="scoring worker processes that keep every item's score fresh (the second seed's system; "
                        "methods grad_norm and last_loss; e.g. --preset grad_norm_scorers --scorers 2)")
    t.add_argument("--publish-every", type=_positive_int, help="with --scorers: steps between parameter publishes")
    t.add_argument("--budget-steps", type=_positive_int, help="stop after this many optimizer steps")
    t.add_argument("--budget-seconds", type=_positive_float, help="stop after this much training + sampling time")
    t.add_argument("--target-accuracy", type=_unit, help="report when the test accuracy first reaches this")
    t.add_argument("--device", type=_device_name, help="auto (default), cpu or cuda")
    t.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--checkpoint-seconds", type=_non_negative_float, default=300.0, help="mid-epoch checkpoint interval")
    t.add_argument("--max-wall-seconds", type=_positive_float, help="stop (resumably) after this long")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argparse.Namespace(), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
