"""``isample study variance``: the second seed's claim, measured exactly.

How much does importance sampling reduce the variance of SGD's gradient, for which proposal,
with fresh or stale scores? At checkpoints of real training runs this computes every item's
exact per-example gradient (``variance.gradient_stats``) and, for each proposal q, the exact
ratio V(q) / V(uniform) (``variance.variance``): no sampling noise at all.

**Where the ratios are taken.** Two kinds of rows, each stated in the output:

1. *Proposals at the same parameters* (one uniform SGD run per seed: the science study's
   settings, balanced Fashion-MNIST, 10,000 images, 700 steps; checkpoints every 50 steps).
   - Oracles computed at the checkpoint: q ∝ |g_i| (optimal, fresh); |g_i| from 50 and 200
     steps earlier (stale); the bound |softmax − onehot| (fresh, pure and + 10% uniform); the
     seed paper's softmax of the fresh losses; q ∝ the fresh loss.
   - In-training policies as *shadows*: a real ``isample.ImportanceSampler`` per policy that
     draws its own batch of 128 at every step, from the q it holds, and updates the scores of
     exactly the items it drew with their losses (and logits) at the uniform run's current
     parameters. So each shadow's scores are as old as its own draws make them (the
     neglected items' scores never get fresher), while every ratio is taken at the same
     parameters. The shadow does not steer the parameters: its q is evaluated along the
     uniform trajectory, not along its own. Its q at step t is the one the batch of step
     t + 1 is drawn from (the q of the epoch in progress; epochs of 50 steps, draws with
     replacement, which is the setting V(q) describes).
2. *Each policy's own run*: the in-training grad-norm policy (``grad_norm_proportional``) and
   the same proposal kept fresh by one scoring worker (``grad_norm_scorers``) are trained
   with the runner (``RunConfig.snapshot_steps``); at steps 100 … 700 the ratio of the q each
   run actually drew from is computed at that run's own parameters, beside the optimal and
   the fresh-bound ratios at the same parameters.

Losses and logits for the shadows and the oracles come from eval-mode forward passes (as the
per-example gradients do; see ``variance``).

The command trains what is missing (one task per seed and kind, resumable at that grain),
then writes ``docs/results/variance``: ``report.md`` (tables), ``figures/``, the per-checkpoint
data (``checkpoints.csv``, ``variance.json``) and ``lscpu.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import SCIENCE_SETTINGS, RunConfig, preset

__all__ = ["VarianceStudy", "PROPOSALS", "SHADOWS", "run_trajectory", "run_own"]

# In-training policies, run as shadows: (label, ImportanceSampler arguments). Every shadow
# draws with replacement, 50-step epochs (6,400 draws), as the proportional presets do. The
# loss policies start with one uniform epoch, so every item has a score; the grad-norm ones
# start from sqrt(2), the bound's largest value, as the grad_norm_proportional preset does.
SHADOWS: Dict[str, Dict[str, Any]] = {
    "last loss, softmax (first seed)": {"score": "last_loss", "transform": "softmax", "warmup_epochs": 1,
                                        "uniform_mix": 0.0},
    "last loss, softmax + 20% uniform": {"score": "last_loss", "transform": "softmax", "warmup_epochs": 1,
                                         "uniform_mix": 0.2},
    "running loss, softmax (first seed)": {"score": "running_loss", "transform": "softmax", "warmup_epochs": 1,
                                           "uniform_mix": 0.0},
    "running loss, softmax + 20% uniform": {"score": "running_loss", "transform": "softmax", "warmup_epochs": 1,
                                            "uniform_mix": 0.2},
    "bound, proportional": {"score": "grad_norm", "transform": "proportional", "initial_score": 2 ** 0.5,
                            "warmup_epochs": 0, "uniform_mix": 0.0},
    "bound, proportional + 10% uniform (grad_norm_proportional)": {
        "score": "grad_norm", "transform": "proportional", "initial_score": 2 ** 0.5, "warmup_epochs": 0,
        "uniform_mix": 0.1},
}
# Every shadow names all of its sampler's settings: ImportanceSampler's defaults may change
# (they did, in issue 24), and the study's trajectories must not change with them.


def proposal_labels(every: int = 50):
    """The oracle rows, made at each checkpoint from its statistics (now) and those `every` and
    4 × `every` steps before."""
    return (
        "optimal: ‖g_i‖ now, proportional",
        f"‖g_i‖ {every} steps stale, proportional",
        f"‖g_i‖ {4 * every} steps stale, proportional",
        "‖g_i‖ now, proportional + 10% uniform",
        f"‖g_i‖ {every} steps stale, proportional + 10% uniform",
        f"‖g_i‖ {4 * every} steps stale, proportional + 10% uniform",
        "bound now, proportional",
        "bound now, proportional + 10% uniform",
        "loss now, softmax (first seed)",
        "loss now, proportional",
    )


PROPOSALS = proposal_labels(50)
EPS = 1e-6  # isample.Proportional's default eps: q ∝ score + eps
STEPS_SHOWN = (100, 200, 300, 400, 500, 600, 700)


def oracle_proposals(now, before_50, before_200, every: int = 50) -> Dict[str, Optional[torch.Tensor]]:
    """The oracle rows' q at one checkpoint (stats now, `every` and 4 × `every` steps before;
    None: missing)."""
    from .variance import proportional, softmax_q

    def norms(stats, mix=0.0):
        return None if stats is None else proportional(stats.norms, mix=mix)

    return dict(zip(proposal_labels(every), (
        norms(now), norms(before_50), norms(before_200),
        norms(now, 0.1), norms(before_50, 0.1), norms(before_200, 0.1),
        proportional(now.bound, eps=EPS),
        proportional(now.bound, eps=EPS, mix=0.1),
        softmax_q(now.losses),
        proportional(now.losses, eps=EPS),
    )))


class Shadow:
    """An in-training policy drawing its own batches along another run's parameters (see the
    module docstring): a real ImportanceSampler, updated only with the items it drew."""

    def __init__(self, label: str, num_items: int, batch_size: int, epoch_draws: int, seed: int, options: Dict[str, Any]):
        import isample

        self.label, self.batch_size = label, batch_size
        self.needs_logits = options["score"] == "grad_norm"
        self.sampler = isample.ImportanceSampler(num_items, replacement=True, samples_per_epoch=epoch_draws,
                                                 weighting="auto", seed=seed, **options)
        self.epoch, self.position = -1, 0
        self.order = torch.empty(0, dtype=torch.int64)
        self.q: Optional[torch.Tensor] = None  # the q of the epoch in progress (None: uniform warm-up)

    def next_batch(self) -> torch.Tensor:
        """The items of the next step, drawing a new epoch when this one is used up."""
        if self.position >= self.order.numel():
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
            self.position = 0
            warmup = self.sampler.history[-1].get("kind") == "warmup"
            self.q = None if warmup else self.sampler.probabilities().clone()
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += batch.numel()
        return batch

    def update(self, index: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        extra = {"logits": logits, "targets": targets} if self.needs_logits else {}
        self.sampler.update(index, losses, **extra)


def _checkpoint_record(step: int, stats, proposals: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Any]:
    from .variance import largest_weight, variance, variance_ratio

    n = stats.num_items
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    norms = stats.norms
    record = {
        "step": step,
        "mean_gradient_sq": stats.mean_sq,
        "v_uniform": variance(norms, stats.mean_sq, uniform),
        "mean_sq_norm": float(norms.pow(2).mean()),
        "norm_quantiles": dict(zip(("0", "0.1", "0.5", "0.9", "0.99", "1"),
                                   torch.quantile(norms, torch.tensor([0, .1, .5, .9, .99, 1], dtype=torch.float64)).tolist())),
        "corr_bound_norm": _correlation(stats.bound, norms),
        "corr_loss_norm": _correlation(stats.losses, norms),
        "proposals": {},
    }
    for label, q in proposals.items():
        if q is None:
            continue
        record["proposals"][label] = {"ratio": variance_ratio(stats, q), "largest_weight": largest_weight(q)}
    return record


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def run_trajectory(config: RunConfig, out: Path, every: int = 50, chunk: int = 128,
                   log=lambda line: print(line, flush=True)) -> Dict[str, Any]:
    """The uniform run of `config` with the shadows beside it; the exact ratios of every
    proposal at steps 0, every, 2 every, ... budget. Writes `out` (JSON) and returns it."""
    from .augment import normalize
    from .models import build_model
    from .train import load_run_data
    from .variance import gradient_stats

    began = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = config.budget_steps or 700
    torch.manual_seed(config.seed)  # as the runner: the same data, initial parameters and shuffles
    data = load_run_data(config)
    n, batch = data.num_train, config.batch_size
    model = build_model(config.model, data.num_classes, data.in_channels, data.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    shuffle = torch.Generator().manual_seed(config.seed + 2_000_003)
    shadows = [Shadow(label, n, batch, 50 * batch, config.seed, options) for label, options in SHADOWS.items()]
    prepare = lambda images: normalize(images, data.mean, data.std)  # noqa: E731
    images, labels = data.train_images, data.train_labels
    history: Dict[int, Any] = {}  # step -> GradientStats (for the stale proposals)
    records: List[Dict[str, Any]] = []
    seconds = {"training": 0.0, "shadows": 0.0, "exact gradients": 0.0}

    def checkpoint(step: int, held: Dict[str, Optional[torch.Tensor]]) -> None:
        start = time.perf_counter()
        stats = gradient_stats(model, images, labels, chunk=chunk, prepare=prepare)
        seconds["exact gradients"] += time.perf_counter() - start
        history[step] = stats
        torch.save({"step": step, "norms": stats.norms.float(), "mean_sq": stats.mean_sq, "losses": stats.losses.float(),
                    "bound": stats.bound.float(), "held": {k: None if q is None else q.float() for k, q in held.items()}},
                   out.parent / f"stats-step{step:04d}.pt")  # the work folder (runs/), not the results
        proposals = oracle_proposals(stats, history.get(step - every), history.get(step - 4 * every), every)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)  # a shadow in its warm-up draws uniformly
        proposals.update({f"in-training shadow: {label}": uniform if q is None else q for label, q in held.items()})
        record = _checkpoint_record(step, stats, proposals)
        records.append(record)
        shown = ", ".join(f"{k.split(':')[0][:24]} {v['ratio']:.3g}" for k, v in list(record["proposals"].items())[:5])
        log(f"[variance s{config.seed}] step {step}: V(uniform) {record['v_uniform']:.4g}; ratios {shown} ... "
            f"({time.perf_counter() - began:.0f} s)")

    step = 0
    while True:
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, batch):
            # the shadows: each takes its batch for step + 1, from the q it holds now
            tick = time.perf_counter()
            drawn = [s.next_batch() for s in shadows]
            if step % every == 0 or step >= budget:
                checkpoint(step, {s.label: s.q for s in shadows})
            if step >= budget:
                _write_json(out, _trajectory_result(config, every, records, seconds, began))
                return json.loads(out.read_text())
            tick = time.perf_counter()
            together = torch.cat(drawn)
            model.eval()
            with torch.no_grad():
                logits = model(prepare(images[together]))
                losses = F.cross_entropy(logits, labels[together], reduction="none")
            model.train()
            at = 0
            for s, index in zip(shadows, drawn):
                part = slice(at, at + index.numel())
                s.update(index, losses[part], logits[part], labels[index])
                at += index.numel()
            seconds["shadows"] += time.perf_counter() - tick
            # the uniform run's step, as the runner takes it
            tick = time.perf_counter()
            idx = order[start : start + batch]
            out_logits = model(prepare(images[idx]))
            loss = F.cross_entropy(out_logits.float(), labels[idx], reduction="none").mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds["training"] += time.perf_counter() - tick
            step += 1


def _trajectory_result(config: RunConfig, every: int, records, seconds, began) -> Dict[str, Any]:
    return {
        "kind": "same parameters (uniform run, shadows)",
        "seed": config.seed,
        "config": config.to_dict(),
        "every": every,
        "shadows": {label: dict(options, replacement=True, epoch_steps=50) for label, options in SHADOWS.items()},
        "checkpoints": records,
        "seconds": dict(seconds, total=time.perf_counter() - began),
        "cpu": _cpu_name(),
    }


def run_own(config: RunConfig, run_dir: Path, out: Path, chunk: int = 128,
            log=lambda line: print(line, flush=True)) -> Dict[str, Any]:
    """Train `config` (with its snapshot_steps; resumes), then the exact ratio of the q it drew
    from at each snapshot, at its own parameters. Writes `out` (JSON) and returns it."""
    from .augment import normalize
    from .models import build_model
    from .train import load_run_data, load_snapshot, train
    from .variance import largest_weight, proportional, variance_ratio

    began = time.perf_counter()
    summary = train(config, run_dir, progress=False, log=log)
    data = load_run_data(config)
    prepare = lambda images: normalize(images, data.mean, data.std)  # noqa: E731
    model = build_model(config.model, data.num_classes, data.in_channels, data.image_size)
    records = []
    for step in config.snapshot_steps:
        snapshot = load_snapshot(run_dir, step)
        model.load_state_dict(snapshot["model"])
        stats = gradient_stats_for(model, data, prepare, chunk)
        q = snapshot["q"]
        record = {
            "step": step,
            "ratio": variance_ratio(stats, q),
            "largest_weight": largest_weight(q),
            "optimal_ratio": variance_ratio(stats, proportional(stats.norms)),
            "bound_mix_ratio": variance_ratio(stats, proportional(stats.bound, eps=EPS, mix=0.1)),
            "corr_bound_norm": _correlation(stats.bound, stats.norms),
        }
        versions = snapshot.get("item_versions")
        if versions is not None:
            scored = versions[versions >= 0].double()
            ages = step - scored
            record["scored_fraction"] = float(scored.numel()) / float(versions.numel())
            record["score_age_median"] = float(ages.median()) if ages.numel() else None
            record["score_age_max"] = float(ages.max()) if ages.numel() else None
        records.append(record)
        log(f"[variance own {config.method_label} s{config.seed}] step {step}: ratio {record['ratio']:.3g} "
            f"(optimal {record['optimal_ratio']:.3g}), largest weight {record['largest_weight']:.3g}")
    result = {
        "kind": "own run",
        "seed": config.seed,
        "config": config.to_dict(),
        "label": config.method_label,
        "run": str(run_dir),
        "final_test_accuracy": summary.get("final_test_accuracy"),
        "checkpoints": records,
        "seconds": time.perf_counter() - began,
        "cpu": _cpu_name(),
    }
    _write_json(out, result)
    return result


def gradient_stats_for(model, data, prepare, chunk):
    from .variance import gradient_stats

    return gradient_stats(model, data.train_images, data.train_labels, chunk=chunk, prepare=prepare)


def _cpu_name() -> str:
    from .train import _cpu_name as name

    return name()


# -- the study: tasks, then tables and figures ----------------------------------------------


@dataclasses.dataclass
class VarianceStudy:
    """The variance study's plan: seeds, folders, settings (SCIENCE_SETTINGS, balanced, plus
    the command's overrides for a smaller trial)."""

    seeds: List[int]
    out: Path = Path("runs/variance")
    results: Path = Path("docs/results/variance")
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    every: int = 50

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "VarianceStudy":
        """From `isample study variance`'s options (seeds, folders, run-setting overrides)."""
        from ..cli import _overrides

        overrides = _overrides(args)
        if args.augment is not None:
            overrides["augment"] = args.augment
        unknown = set(overrides) - {"dataset", "data_dir", "model", "batch_size", "lr", "train_subset", "test_subset",
                                    "budget_steps", "device", "augment"}
        if unknown:
            raise ValueError(f"the variance study takes no {sorted(unknown)}: its proposals are fixed "
                             "(see isample.experiments.variance_study)")
        count = 3 if args.seeds is None else args.seeds
        study = cls(seeds=list(range(args.seed, args.seed + count)), overrides=overrides,
                    out=Path(args.out or "runs/variance"), results=Path(args.results or "docs/results/variance"))
        study.configs()  # refuse bad settings now
        return study

    def settings(self) -> Dict[str, Any]:
        return {**SCIENCE_SETTINGS, **self.overrides}

    def trajectory_config(self, seed: int) -> RunConfig:
        return preset("uniform", **self.settings(), seed=seed)

    def own_configs(self, seed: int) -> List[RunConfig]:
        budget = self.settings()["budget_steps"]
        steps = tuple(s for s in range(2 * self.every, budget + 1, 2 * self.every)) or (budget,)
        return [preset(name, **self.settings(), seed=seed, snapshot_steps=steps)
                for name in ("grad_norm_proportional", "grad_norm_scorers")]

    def configs(self) -> List[RunConfig]:
        return [c for s in self.seeds for c in [self.trajectory_config(s), *self.own_configs(s)]]

    def trajectory_file(self, seed: int) -> Path:
        return self.out / f"s{seed}" / "trajectory.json"

    def own_file(self, config: RunConfig) -> Path:
        return self.out / f"s{config.seed}" / f"own-{config.method_label}.json"

    def tasks(self, *, restart: bool = False) -> list:
        """One task per seed for the shadows' trajectory, and one per own run (train, then ratios)."""
        from .schedule import Task

        tasks = []
        for seed in self.seeds:
            config = self.trajectory_config(seed)
            out = self.trajectory_file(seed)
            tasks.append(Task(label=f"variance trajectory s{seed}", kind="variance trajectory", cores=1,
                              log=out.with_suffix(".log"),
                              argv=[sys.executable, "-m", "isample.experiments.variance_study", "trajectory",
                                    config.dumps(), str(out), "--every", str(self.every)],
                              done=(lambda out=out: False) if restart else (lambda out=out: out.is_file())))
            for own in self.own_configs(seed):
                out_own = self.own_file(own)
                tasks.append(Task(label=f"variance own run {own.method_label} s{seed}", cores=1 + own.scorers,
                                  kind=f"variance own run{' with scoring workers' if own.scorers else ''}",
                                  log=out_own.with_suffix(".log"),
                                  argv=[sys.executable, "-m", "isample.experiments.variance_study", "own", own.dumps(),
                                        str(self.out / "own" / own.name), str(out_own)],
                                  done=(lambda o=out_own: False) if restart else (lambda o=out_own: o.is_file())))
        return tasks

    def write_results(self) -> None:
        """report.md, figures, checkpoints.csv, variance.json and lscpu.txt in `results`."""
        from .variance_report import write_variance_results

        trajectories = [json.loads(self.trajectory_file(s).read_text()) for s in self.seeds]
        owns = [json.loads(self.own_file(c).read_text()) for s in self.seeds for c in self.own_configs(s)]
        write_variance_results(self.results, trajectories, owns, command=self.command())

    def command(self) -> str:
        extra = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.overrides.items())
        seeds = "" if self.seeds == [0, 1, 2] else f" --seed {self.seeds[0]} --seeds {len(self.seeds)}"
        return f"isample study variance{seeds}{(' ' + extra) if extra else ''}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The study's child processes: `trajectory CONFIG OUT` and `own CONFIG RUN_DIR OUT`."""
    parser = argparse.ArgumentParser(prog="python -m isample.experiments.variance_study")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trajectory")
    t.add_argument("config")
    t.add_argument("out")
    t.add_argument("--every", type=int, default=50)
    o = sub.add_parser("own")
    o.add_argument("config")
    o.add_argument("run_dir")
    o.add_argument("out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = RunConfig.from_dict(json.loads(args.config))
    if args.command == "trajectory":
        run_trajectory(config, Path(args.out), every=args.every)
    else:
        run_own(config, Path(args.run_dir), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
