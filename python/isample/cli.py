"""The ``isample`` command: train, plot, report, bench.

    isample train --preset last_loss --dataset fashion-mnist --model small_cnn --seeds 3
    isample train --grid paper --dataset cifar10 --data-dir data/     # the seed paper's study
    isample plot runs/* --out figures/
    isample report runs/*
    isample study science                     # a named study: runs, report, figures, metrics
    isample bench --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

GRIDS = {
    "paper": ("uniform", "last_loss", "running_loss"),
    "all": ("uniform", "last_loss", "running_loss", "grad_norm", "infobatch"),
}


def _overrides(args: argparse.Namespace) -> dict:
    """The RunConfig fields given on the command line."""
    overrides = {}
    for name in (
        "dataset", "data_dir", "model", "max_epochs", "patience", "batch_size", "lr", "imbalance_ratio",
        "train_subset", "test_subset", "device", "weighting", "temperature", "uniform_mix", "budget_steps",
        "budget_seconds", "target_accuracy", "samples_fraction", "replacement", "warmup_epochs",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.lr_milestones is not None:
        overrides["lr_milestones"] = tuple(args.lr_milestones)
    return overrides


def _train(args: argparse.Namespace) -> int:
    from .experiments.config import PRESETS, grid, preset

    overrides = _overrides(args)
    seeds = range(args.seed, args.seed + args.seeds)
    augment = (True, False) if args.augment is None else (args.augment,)
    if args.grid:
        configs = grid(GRIDS[args.grid], seeds=seeds, augment=augment, **overrides)
    else:
        names = args.preset or ["uniform"]
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise SystemExit(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
        configs = [preset(n, augment=a, seed=s, **overrides) for n in names for a in augment for s in seeds]
    return _run_all(configs, Path(args.out), args)


def _lead() -> bool:
    """False on torchrun's ranks other than 0: they train, but print and write nothing."""
    return os.environ.get("WORLD_SIZE", "1") in ("", "1") or os.environ.get("RANK", "0") in ("", "0")


def _run_all(configs: list, out: Path, args: argparse.Namespace) -> int:
    """Train each configuration in its folder under `out` (resuming where it stopped)."""
    from .experiments.train import train

    say = print if _lead() else (lambda *_, **__: None)  # under torchrun only rank 0 prints
    say(f"{len(configs)} run(s) in {out}/", flush=True)
    for config in configs:
        summary = train(
            config, out / config.name, resume=not args.restart, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds, max_wall_seconds=args.max_wall_seconds,
        )
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


def _study(args: argparse.Namespace) -> int:
    import shutil

    from .experiments.config import STUDIES, study
    from .experiments.plots import plot_runs
    from .experiments.report import report

    if args.name not in STUDIES:
        raise SystemExit(f"unknown study {args.name!r}; choose from {sorted(STUDIES)}")
    spec = STUDIES[args.name]
    overrides = _overrides(args)
    if args.augment is not None:
        overrides["augment"] = args.augment
    seeds = range(args.seed, args.seed + (spec.seeds if args.seeds is None else args.seeds))
    try:
        configs = study(args.name, presets=args.preset, seeds=seeds, **overrides)
    except ValueError as error:
        raise SystemExit(str(error))
    out = Path(args.out or Path("runs") / args.name)
    code = _run_all(configs, out, args)
    if code:
        return code
    if not _lead():
        return 0  # rank 0 writes the report
    results = Path(args.results or Path("docs") / "results" / args.name)
    folders = [out / c.name for c in configs]
    results.mkdir(parents=True, exist_ok=True)
    text = report(folders, **spec.report)
    (results / "report.md").write_text(text)
    figures = plot_runs(folders, results / "figures")
    # The per-epoch metrics of every run (not the checkpoints), so the tables can be recomputed.
    for folder in folders:
        dest = results / "runs" / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            shutil.copy2(folder / name, dest / name)
    print(text)
    print(f"wrote {results / 'report.md'}, {len(figures)} figures in {results / 'figures'}, "
          f"metrics of {len(folders)} runs in {results / 'runs'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .experiments.plots import plot_runs

    written = plot_runs(args.runs, args.out)
    for path in written:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.report import report

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

    return bench.main(rest)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.config import PRESETS, STUDIES

    parser = argparse.ArgumentParser(prog="isample", description="isample: importance sampling of training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run training experiments (presets from the seed paper's Appendix A)")
    t.add_argument("--preset", nargs="+", help=", ".join(PRESETS))
    t.add_argument("--grid", choices=sorted(GRIDS), help="a study: paper = uniform + last_loss + running_loss")
    t.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    t.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    _add_run_options(t)
    t.add_argument("--out", default="runs", help="folder of the run folders (default runs/)")
    t.set_defaults(handler=_train)

    st = sub.add_parser(
        "study", help="run a named study end to end: its runs (resumable), report, figures and metrics",
        description="Run a named study (isample.experiments.config.STUDIES): train every run that is not "
                    "complete yet, then write report.md, the figures and each run's per-epoch metrics to "
                    "--results. Training options override the study's settings (for a smaller trial).",
    )
    st.add_argument("name", help="the study: " + ", ".join(f"{k} ({v.description})" for k, v in STUDIES.items()))
    st.add_argument("--preset", nargs="+", help="only these of the study's presets")
    st.add_argument("--seeds", type=int, help="number of seeds (default: the study's)")
    st.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    _add_run_options(st)
    st.add_argument("--out", help="folder of the run folders (default runs/NAME)")
    st.add_argument("--results", help="where report, figures and metrics go (default docs/results/NAME)")
    st.set_defaults(handler=_study)

    p = sub.add_parser("plot", help="the seed paper's figures 1-6 from run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="figures")
    p.set_defaults(handler=_plot)

    r = sub.add_parser("report", help="a markdown table of the runs")
    r.add_argument("runs", nargs="+")
    target = r.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="target test accuracy for epochs / time to target")
    target.add_argument("--relative-target", type=float,
                        help="per setting, this fraction of uniform's mean best test accuracy (e.g. 0.98)")
    r.add_argument("--equal-time", action="store_true",
                   help="also compare the methods at an equal wall-clock budget per setting")
    r.add_argument("--out", help="write the table here instead of printing it")
    r.set_defaults(handler=_report)

    b = sub.add_parser("bench", help="time isample against the samplers users would pick instead", add_help=False)
    b.set_defaults(handler=None)
    return parser


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """The options of one training run, shared by train and study."""
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_const", const=True, help="only with augmentation")
    aug.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="only without")
    t.add_argument("--dataset", help="cifar10, cifar100, fashion-mnist, mnist (default cifar10)")
    t.add_argument("--data-dir", help="where the data sets are (default $ISAMPLE_DATA_DIR or ~/.cache/isample/data)")
    t.add_argument("--model", help="resnet18 or small_cnn (default resnet18)")
    t.add_argument("--max-epochs", type=int)
    t.add_argument("--patience", type=int, help="early stopping patience in epochs (default 15)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-milestones", type=int, nargs="*")
    t.add_argument("--imbalance-ratio", type=float, help="> 1: the long-tailed variant of the data set")
    t.add_argument("--train-subset", type=int, help="train on a stratified subset of this size")
    t.add_argument("--test-subset", type=int, help="test on a stratified subset of this size")
    t.add_argument("--samples-fraction", type=float, help="|Z| / N of importance epochs (overrides the preset)")
    t.add_argument("--replacement", type=_bool, help="draw |Z| with replacement (true/false)")
    t.add_argument("--warmup-epochs", type=int)
    t.add_argument("--weighting", choices=("inverse_probability", "auto", "none"),
                   help="inverse_probability: the paper's 1/(Np); auto: isample's unbiased weights")
    t.add_argument("--temperature", type=float)
    t.add_argument("--uniform-mix", type=float)
    t.add_argument("--budget-steps", type=int, help="stop after this many optimizer steps")
    t.add_argument("--budget-seconds", type=float, help="stop after this much training + sampling time")
    t.add_argument("--target-accuracy", type=float, help="report when the test accuracy first reaches this")
    t.add_argument("--device", help="auto (default), cpu or cuda")
    t.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--checkpoint-seconds", type=float, default=300.0, help="mid-epoch checkpoint interval")
    t.add_argument("--max-wall-seconds", type=float, help="stop (resumably) after this long")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argparse.Namespace(), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
