"""The ``isample`` command: train, plot, report, bench.

    isample train --preset last_loss --dataset fashion-mnist --model small_cnn --seeds 3
    isample train --grid paper --dataset cifar10 --data-dir data/     # the seed paper's study
    isample plot runs/* --out figures/
    isample report runs/*
    isample bench --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

GRIDS = {
    "paper": ("uniform", "last_loss", "running_loss"),
    "all": ("uniform", "last_loss", "running_loss", "grad_norm", "infobatch"),
}


def _train(args: argparse.Namespace) -> int:
    from .experiments.config import PRESETS, RunConfig, grid, preset
    from .experiments.train import train

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
    out = Path(args.out)
    print(f"{len(configs)} run(s) in {out}/", flush=True)
    for config in configs:
        summary = train(
            config, out / config.name, resume=not args.restart, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds, max_wall_seconds=args.max_wall_seconds,
        )
        if not summary.get("complete"):
            print("stopped before the end (time limit); rerun the same command to resume", flush=True)
            return 3
        print(
            f"[{config.name}] done: best test accuracy {summary['best_test_accuracy']:.4f} "
            f"(epoch {summary['best_epoch']}), final {summary['final_test_accuracy']:.4f}, "
            f"sampling {100 * summary['sampling_share']:.2f}% of the time ({summary['stop_reason']})",
            flush=True,
        )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .experiments.plots import plot_runs

    written = plot_runs(args.runs, args.out)
    for path in written:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    text = report(args.runs, target_accuracy=args.target)
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
    parser = argparse.ArgumentParser(prog="isample", description="isample: importance sampling of training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run training experiments (presets from the seed paper's Appendix A)")
    t.add_argument("--preset", nargs="+", help="uniform, last_loss, running_loss, grad_norm, infobatch")
    t.add_argument("--grid", choices=sorted(GRIDS), help="a study: paper = uniform + last_loss + running_loss")
    t.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    t.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
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
    t.add_argument("--out", default="runs", help="folder of the run folders (default runs/)")
    t.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--checkpoint-seconds", type=float, default=300.0, help="mid-epoch checkpoint interval")
    t.add_argument("--max-wall-seconds", type=float, help="stop (resumably) after this long")
    t.set_defaults(handler=_train)

    p = sub.add_parser("plot", help="the seed paper's figures 1-6 from run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="figures")
    p.set_defaults(handler=_plot)

    r = sub.add_parser("report", help="a markdown table of the runs")
    r.add_argument("runs", nargs="+")
    r.add_argument("--target", type=float, help="target test accuracy for epochs / time to target")
    r.add_argument("--out", help="write the table here instead of printing it")
    r.set_defaults(handler=_report)

    b = sub.add_parser("bench", help="time isample against the samplers users would pick instead", add_help=False)
    b.set_defaults(handler=None)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argparse.Namespace(), argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
