"""Run configurations and the seed paper's presets (its Appendix A).

A ``RunConfig`` is everything one training run depends on; it is saved as ``config.json`` in
the run folder and checked when a run is resumed. ``preset(name)`` gives the paper's
settings; ``grid(...)`` expands presets × augmentation × seeds into the runs of a study.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

METHODS = ("uniform", "last_loss", "running_loss", "grad_norm", "early_importance", "infobatch")
# The methods whose score scoring workers can compute (isample.scoring's "grad_norm" and "loss").
SCORED_METHODS = ("grad_norm", "last_loss")
# Fields that only shape an importance sampler: a uniform run ignores them (see study()).
SAMPLING_FIELDS = (
    "samples_fraction", "replacement", "warmup_epochs", "beta", "importance_epochs", "temperature", "transform",
    "weighting", "uniform_mix", "initial_score", "prune_ratio", "anneal_fraction", "publish_every",
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults are the seed paper's (Appendix A) on CIFAR-10 with ResNet18."""

    # data
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    imbalance_ratio: float = 1.0  # > 1: the long-tailed variant (exponential profile)
    train_subset: Optional[int] = None  # a stratified subset, for short runs
    test_subset: Optional[int] = None
    augment: bool = True  # random crop (pad 4) + horizontal flip
    # model and optimiser
    model: str = "resnet18"
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: Tuple[int, ...] = (15, 30)
    lr_gamma: float = 0.1
    max_epochs: int = 60
    patience: int = 15  # early stopping: epochs without a better test accuracy
    # sampling
    method: str = "uniform"
    samples_fraction: float = 1.0  # |Z| / N in importance epochs (the paper: 8192/50000, 30000/50000)
    replacement: bool = False
    warmup_epochs: int = 0
    beta: float = 0.2  # running loss: S = beta S + (1 - beta) L
    importance_epochs: int = 2  # early_importance: epochs (sightings) the importance is averaged over
    temperature: float = 1.0
    # scores -> probabilities: None is the method's own (the seed paper's softmax; early
    # importance: proportional); "proportional": q ∝ score (Katharopoulos & Fleuret, the second seed)
    transform: Optional[str] = None
    weighting: str = "inverse_probability"  # the paper's 1/(N p); "auto": isample's unbiased weights
    uniform_mix: float = 0.0
    initial_score: float = 0.0  # the score of an item before its first one (a high one: unseen items first)
    # epochs of this many steps (|Z| = epoch_steps × batch_size, overrides samples_fraction);
    # uniform sampling then cuts one continuing shuffled stream into such epochs
    epoch_steps: Optional[int] = None
    # scoring workers (the second seed's system): this many processes keep every item's score
    # fresh with parameters published every publish_every steps; the trainer then scores nothing
    scorers: int = 0
    publish_every: int = 50
    prune_ratio: float = 0.5  # InfoBatch
    anneal_fraction: float = 0.125  # InfoBatch: the last epochs on the full data
    # budgets (for equal-budget comparisons); None: no limit
    budget_steps: Optional[int] = None
    budget_seconds: Optional[float] = None
    target_accuracy: Optional[float] = None  # epochs / steps / seconds to reach it are reported
    # run
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    amp: bool = True  # bf16 autocast and channels-last on a GPU (ignored on the CPU)
    eval_batch_size: int = 1000
    score_bins: int = 40  # per-epoch histogram of the scores (figures 4-5)
    train_eval: bool = False  # at the end: loss and accuracy over the whole training set (eval mode)
    snapshot_steps: Tuple[int, ...] = ()  # save the model and the proposal q at these steps (snapshots/)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.samples_fraction <= (10.0 if self.replacement else 1.0):
            raise ValueError(f"samples_fraction must be in (0, 1] without replacement, got {self.samples_fraction}")
        if self.weighting not in ("inverse_probability", "auto", "none"):
            raise ValueError(f"weighting must be 'inverse_probability', 'auto' or 'none', got {self.weighting!r}")
        for name in ("batch_size", "max_epochs", "eval_batch_size", "score_bins", "publish_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.transform not in (None, "softmax", "proportional"):
            raise ValueError(f"transform must be None, 'softmax' or 'proportional', got {self.transform!r}")
        if self.epoch_steps is not None and self.epoch_steps < 1:
            raise ValueError(f"epoch_steps must be at least 1 (or None), got {self.epoch_steps}")
        if self.scorers < 0:
            raise ValueError(f"scorers must be >= 0, got {self.scorers}")
        if self.scorers and self.method not in SCORED_METHODS:
            raise ValueError(f"scoring workers (scorers={self.scorers}) need method {' or '.join(SCORED_METHODS)}, "
                             f"whose score they compute; got method {self.method!r}")
        if any(int(s) < 0 for s in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must be steps >= 0, got {self.snapshot_steps}")
        if self.imbalance_ratio < 1.0:
            raise ValueError("imbalance_ratio must be >= 1 (1: balanced)")
        for f in dataclasses.fields(self):  # NaN or inf would train until the run "diverged"
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        object.__setattr__(self, "snapshot_steps", tuple(sorted({int(s) for s in self.snapshot_steps})))

    @property
    def name(self) -> str:
        """A folder name that identifies the run within a study."""
        parts = [self.dataset]
        if self.imbalance_ratio > 1:
            parts.append(f"lt{self.imbalance_ratio:g}")
        if self.train_subset:
            parts.append(f"sub{self.train_subset}")
        parts += [self.model, self.method_label, "aug" if self.augment else "noaug", f"s{self.seed}"]
        return "-".join(parts)

    @property
    def method_label(self) -> str:
        """The method with what distinguishes it from the same method in other settings."""
        # Only settings that differ from the defaults add to the label, so older run folders keep their names.
        label = self.method
        sampled = ("last_loss", "running_loss", "grad_norm", "early_importance")
        scored = ("last_loss", "running_loss", "grad_norm")
        if self.method in scored and self.transform == "proportional":
            label += "-prop"
        if self.method in sampled and self.epoch_steps is None and self.samples_fraction < 1.0:
            label += f"-z{self.samples_fraction:g}"
        if self.method in scored and self.replacement:
            label += "-rep"
        if self.method in scored and self.uniform_mix > 0:
            label += f"-mix{self.uniform_mix:g}"
        if self.weighting == "auto" and self.method in sampled:
            label += "-unbiased"
        if self.method in scored and self.initial_score != 0.0:
            label += f"-init{self.initial_score:.4g}"
        if self.epoch_steps is not None and self.method != "infobatch":
            label += f"-e{self.epoch_steps}"
        if self.scorers:
            label += f"-scorers{self.scorers}" + (f"-pub{self.publish_every}" if self.publish_every != 50 else "")
        return label

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {unknown}")
        values = dict(values)
        for key in ("lr_milestones", "snapshot_steps"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Appendix A of the seed paper, on CIFAR-10 (N = 50,000): |Z| is kept as a fraction of N so
# the budgets scale to other data sets.
PRESETS: Dict[str, Dict[str, Any]] = {
    "uniform": {"method": "uniform"},
    "last_loss": {"method": "last_loss", "samples_fraction": 8192 / 50000, "warmup_epochs": 5, "replacement": False},
    "running_loss": {
        "method": "running_loss", "samples_fraction": 30000 / 50000, "beta": 0.2, "warmup_epochs": 0,
        "replacement": False,
    },
    # Beyond the paper: the gradient-norm bound (Katharopoulos & Fleuret 2018) with the
    # paper's running-loss budget, and InfoBatch's soft pruning (Qin et al. 2024).
    "grad_norm": {"method": "grad_norm", "samples_fraction": 30000 / 50000, "warmup_epochs": 1, "replacement": False},
    "infobatch": {"method": "infobatch", "prune_ratio": 0.5, "anneal_fraction": 0.125},
    # The third seed (002): importance = mean of 1 - p(true class) over the first 2 (uniform)
    # epochs, then sampling in proportion to it, mixed with 10% uniform; SGD is biased
    # towards important items on purpose (no reweighting), as that paper does.
    "early_importance": {
        "method": "early_importance", "importance_epochs": 2, "warmup_epochs": 2, "replacement": True,
        "uniform_mix": 0.1, "weighting": "none",
    },
}
# The paper's two loss policies with a uniform mixture of 20%, which bounds every weight by
# 1 / 0.2 = 5: with the paper's unbounded 1 / (N p) weights, a few growing losses can raise
# the weights of the other items without limit (see docs/results/paper-fmnist).
PRESETS["last_loss_mix"] = {**PRESETS["last_loss"], "uniform_mix": 0.2}
PRESETS["running_loss_mix"] = {**PRESETS["running_loss"], "uniform_mix": 0.2}
# The gradient-norm bound in the variance-optimal family (DESIGN.md, "Which proposal a study
# tests"): q ∝ the bound, mixed with 10% uniform (weights <= 10), drawn with replacement,
# weighted 1 / (N q). Epochs of 50 steps, so each draw uses scores at most 50 steps older than
# the epoch; items never scored start at the bound's largest value, sqrt(2), so they are drawn
# early rather than left at q = 0.1 / N. `grad_norm_scorers` is the same proposal with its
# scores kept fresh by one scoring worker (parameters published every 50 steps) instead of by
# the trainer's own draws: the second seed's system.
PRESETS["grad_norm_proportional"] = {
    "method": "grad_norm", "transform": "proportional", "replacement": True, "uniform_mix": 0.1, "weighting": "auto",
    "initial_score": 2 ** 0.5, "epoch_steps": 50, "warmup_epochs": 0, "samples_fraction": 1.0,
}
PRESETS["grad_norm_scorers"] = {**PRESETS["grad_norm_proportional"], "scorers": 1, "publish_every": 50}
# isample.ImportanceSampler's defaults (the recipe that the `defaults` study backs): the last
# loss, sampled in proportion (q ∝ loss) mixed with 20% uniform (every weight <= 5), with
# replacement, unbiased weights 1 / (N q), after one epoch of uniform shuffling that scores
# every item once. tests/test_defaults.py checks that this preset and the sampler agree.
PRESETS["default"] = {
    "method": "last_loss", "transform": "proportional", "replacement": True, "uniform_mix": 0.2, "weighting": "auto",
    "warmup_epochs": 1, "samples_fraction": 1.0, "initial_score": 0.0,
}
PAPER_PRESETS = ("uniform", "last_loss", "running_loss")


def preset(name: str, **overrides: Any) -> RunConfig:
    """The configuration of a named preset (see PRESETS), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return RunConfig(**{**PRESETS[name], **overrides})


def grid(
    presets: Sequence[str],
    *,
    seeds: Iterable[int] = (0, 1, 2),
    augment: Iterable[bool] = (True, False),
    **overrides: Any,
) -> List[RunConfig]:
    """Every preset × augmentation setting × seed, with the same overrides."""
    return [preset(name, augment=aug, seed=seed, **overrides) for name in presets for aug in augment for seed in seeds]


@dataclasses.dataclass(frozen=True)
class Study:
    """A named grid: presets × data variants × seeds, all with the same settings.

    ``variants`` are the data settings compared (each a dict of RunConfig fields, e.g. an
    imbalance ratio); ``settings`` apply to every run; ``report`` holds the options that the
    study's report uses (see :func:`isample.experiments.report.report`).
    """

    presets: Tuple[str, ...]
    variants: Tuple[Dict[str, Any], ...]
    settings: Dict[str, Any]
    seeds: int = 3
    report: Dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    results: str = ""  # where `isample study` writes report, figures and metrics (default docs/results/NAME)


# The settings of the science study: Fashion-MNIST, a stratified 10,000 training images, the
# small CNN, 700 steps of batch 128, constant learning rate, no augmentation, 2,000 test images.
SCIENCE_SETTINGS: Dict[str, Any] = {
    "dataset": "fashion-mnist", "model": "small_cnn", "train_subset": 10_000, "test_subset": 2_000,
    "augment": False, "budget_steps": 700, "max_epochs": 10_000, "patience": 10_000, "lr_milestones": (),
}

STUDIES: Dict[str, Study] = {
    # The main job (README, "Set up and run"): the seed paper's grid (its presets uniform,
    # last loss and running loss, with and without augmentation, 3 seeds) reduced to fit 2 CPU
    # cores: Fashion-MNIST, the small CNN, a stratified 10,000 training images, at most 20
    # epochs with the learning rate x0.1 at epochs 8 and 15, early stopping after 8 (the paper:
    # CIFAR-10, ResNet18, 15 / 30 / 15). The same runs as
    #     isample train --grid paper --dataset fashion-mnist --model small_cnn --seeds 3 \
    #       --train-subset 10000 --max-epochs 20 --lr-milestones 8 15 --patience 8
    # (tests/test_study_paper.py checks it), reported against a target accuracy of 85%.
    "paper": Study(
        results="docs/results/paper-fmnist",
        presets=PAPER_PRESETS,
        variants=({"augment": True}, {"augment": False}),
        settings={"dataset": "fashion-mnist", "model": "small_cnn", "train_subset": 10_000, "max_epochs": 20,
                  "lr_milestones": (8, 15), "patience": 8},
        seeds=3,
        report={"target_accuracy": 0.85},
        description="the seed paper's grid reduced for a CPU: uniform / last loss / running loss x augmentation, "
                    "Fashion-MNIST, small CNN, 3 seeds",
    ),
    # When does importance sampling pay off? Every policy of the library against uniform
    # sampling on real Fashion-MNIST, balanced and long-tailed (ratios 10 and 100), with the
    # small CNN, sized to finish in about an hour on 2 CPU cores. Every run gets the same
    # budget of gradient steps (700 of batch 128, about 9 passes over the 10,000 items),
    # so methods with short epochs (|Z| < N, pruning) do more epochs; the report compares
    # them at equal steps and at equal wall-clock. A constant learning rate and no early
    # stopping, since an epoch-based schedule would treat methods with short epochs
    # differently. The test set is a stratified 2,000 (200 per class), evaluated each epoch.
    "science": Study(
        presets=("uniform", "last_loss", "running_loss", "grad_norm", "early_importance", "infobatch",
                 "last_loss_mix", "running_loss_mix"),
        variants=({"imbalance_ratio": 1.0}, {"imbalance_ratio": 10.0}, {"imbalance_ratio": 100.0}),
        settings=SCIENCE_SETTINGS,
        seeds=3,
        report={"relative_target": 0.98, "equal_time": True},
        description="every policy vs uniform, Fashion-MNIST balanced / long-tailed 10 / 100, small CNN, "
                    "equal step budgets",
    ),
    # Round 2. Why do the seed paper's samplers diverge? Its two loss policies (with their
    # warm-ups, 5 and 0 epochs) on the science study's balanced data, in every combination of
    # replacement × weights × |Z|. With replacement isample's unbiased weights ("auto") are
    # 1 / (N p), the paper's, so those cells are run once; without replacement at |Z| = N every
    # item is drawn exactly once, so its unbiased weights are all 1 and the run is uniform
    # shuffling (the uniform rows stand for that cell).
    "divergence": Study(
        results="docs/results/science-round2/divergence",
        presets=("uniform", "last_loss", "running_loss"),
        variants=(
            {"replacement": True, "samples_fraction": 1.0},  # the independent plain-torch run's draw
            {"replacement": True},  # the paper's |Z|, with replacement
            {"replacement": False, "samples_fraction": 1.0},  # every item once, weighted 1 / (N p)
            {"replacement": False},  # the paper's own setting (the science study's rows)
            {"replacement": False, "weighting": "auto"},  # the paper's |Z| with exact inclusion weights
        ),
        settings=SCIENCE_SETTINGS,
        seeds=3,
        report={"relative_target": 0.98, "weights": True},
        description="the seed paper's loss samplers: replacement x weights x |Z|, balanced Fashion-MNIST",
    ),
    # The independent plain-torch run that did not diverge, inside the runner: all 60,000
    # images, |Z| = N with replacement, 1 / (N p), warm-up 1, 8 epochs (3,750 steps).
    "divergence_full": Study(
        results="docs/results/science-round2/divergence_full",
        presets=("uniform", "last_loss"),
        variants=({"replacement": True, "samples_fraction": 1.0, "warmup_epochs": 1},),
        settings={**SCIENCE_SETTINGS, "train_subset": None, "budget_steps": None, "max_epochs": 8},
        seeds=1,
        report={"weights": True},
        description="the plain-torch run that did not diverge: full Fashion-MNIST, |Z| = N with replacement, "
                    "1/(Np), warm-up 1, 8 epochs",
    ),
    # The third seed's early importance on long-tailed ×100 against uniform with 10 seeds,
    # paired by seed (the science study's 3 seeds left it at p = 0.15).
    "early_importance_lt100": Study(
        results="docs/results/science-round2/early_importance_lt100",
        presets=("uniform", "early_importance"),
        variants=({"imbalance_ratio": 100.0},),
        settings=SCIENCE_SETTINGS,
        seeds=10,
        report={"relative_target": 0.98},
        description="early importance vs uniform on long-tailed x100, 10 seeds, paired",
    ),
    # Fresh against in-training scores at equal trainer steps: the gradient-norm bound in the
    # proportional form (with replacement, 1 / (N q), 10% uniform), its scores kept by the
    # trainer's own draws or by one scoring worker, against uniform shuffling. Every run is
    # cut into epochs of 50 steps (uniform: one continuing shuffled stream), so all are
    # evaluated at the same steps. The third variant is where freshness can matter: all
    # 60,000 images, which 700 steps see about 1.5 times.
    "fresh_scores": Study(
        results="docs/results/science-round2/fresh_scores",
        presets=("uniform", "grad_norm_proportional", "grad_norm_scorers"),
        variants=({"imbalance_ratio": 1.0}, {"imbalance_ratio": 100.0}),
        settings={**SCIENCE_SETTINGS, "epoch_steps": 50, "train_eval": True},
        seeds=3,
        report={"relative_target": 0.98, "cost": True},
        description="uniform vs the grad-norm proposal with in-training or fresh (scoring worker) scores, "
                    "balanced / long-tailed x100",
    ),
    # The same on all 60,000 images, which 700 steps see about 1.5 times: where freshness could
    # matter most. Not in round2's queue (about an hour more on 2 cores).
    "fresh_scores_full": Study(
        results="docs/results/science-round2/fresh_scores_full",
        presets=("uniform", "grad_norm_proportional", "grad_norm_scorers"),
        variants=({"imbalance_ratio": 1.0, "train_subset": None},),
        settings={**SCIENCE_SETTINGS, "epoch_steps": 50, "train_eval": True},
        seeds=3,
        report={"relative_target": 0.98, "cost": True},
        description="fresh_scores on all 60,000 images",
    ),
    # Issue 24: the library's default sampler (preset "default") against uniform shuffling on
    # the science study's settings, balanced and long-tailed x10 / x100, 5 seeds, paired.
    "defaults": Study(
        results="docs/results/defaults",
        presets=("uniform", "default"),
        variants=({"imbalance_ratio": 1.0}, {"imbalance_ratio": 10.0}, {"imbalance_ratio": 100.0}),
        settings=SCIENCE_SETTINGS,
        seeds=5,
        report={"relative_target": 0.98},
        description="ImportanceSampler's defaults vs uniform, Fashion-MNIST balanced / long-tailed 10 / 100, 5 seeds",
    ),
}

# `isample study round2` runs these one after the other (and the variance study).
ROUND2 = ("divergence", "early_importance_lt100", "fresh_scores", "divergence_full")


def study(
    name: str,
    *,
    presets: Optional[Sequence[str]] = None,
    seeds: Optional[Iterable[int]] = None,
    **overrides: Any,
) -> List[RunConfig]:
    """The runs of a named study (see STUDIES): presets × variants × seeds.

    presets: a subset of the study's presets (default: all). seeds: default 0 … study.seeds-1.
    overrides: RunConfig fields set in every run; an override of a variant's field (such as
    ``imbalance_ratio``) replaces the variants by that one setting.
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {sorted(STUDIES)}")
    spec = STUDIES[name]
    chosen = tuple(spec.presets if presets is None else presets)
    unknown = [p for p in chosen if p not in spec.presets]
    if unknown:
        raise ValueError(f"preset(s) {unknown} are not in study {name!r}; it has {list(spec.presets)}")
    variant_keys = {k for v in spec.variants for k in v}
    variants = [{}] if variant_keys & set(overrides) else list(spec.variants)
    seeds = list(range(spec.seeds) if seeds is None else seeds)
    configs: List[RunConfig] = []
    for variant in variants:
        for p in chosen:
            for s in seeds:
                config = uniform_canonical(preset(p, **{**spec.settings, **variant, **overrides, "seed": s}))
                if config not in configs:  # one uniform run serves every variant that differs only in sampling
                    configs.append(config)
    return configs


def uniform_canonical(config: RunConfig) -> RunConfig:
    """A uniform run with the sampling-only fields (SAMPLING_FIELDS) at their defaults: they
    do not change what it trains, so variants that differ only in them share one run."""
    if config.method != "uniform":
        return config
    defaults = RunConfig()
    return config.replace(**{name: getattr(defaults, name) for name in SAMPLING_FIELDS})
