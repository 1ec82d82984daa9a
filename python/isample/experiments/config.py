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
    weighting: str = "inverse_probability"  # the paper's 1/(N p); "auto": isample's unbiased weights
    uniform_mix: float = 0.0
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.samples_fraction <= (10.0 if self.replacement else 1.0):
            raise ValueError(f"samples_fraction must be in (0, 1] without replacement, got {self.samples_fraction}")
        if self.weighting not in ("inverse_probability", "auto", "none"):
            raise ValueError(f"weighting must be 'inverse_probability', 'auto' or 'none', got {self.weighting!r}")
        for name in ("batch_size", "max_epochs", "eval_batch_size", "score_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.imbalance_ratio < 1.0:
            raise ValueError("imbalance_ratio must be >= 1 (1: balanced)")
        for f in dataclasses.fields(self):  # NaN or inf would train until the run "diverged"
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))

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
        label = self.method
        sampled = ("last_loss", "running_loss", "grad_norm", "early_importance")
        if self.method in sampled and self.samples_fraction < 1.0:
            label += f"-z{self.samples_fraction:g}"
        if self.method in ("last_loss", "running_loss", "grad_norm") and self.uniform_mix > 0:
            label += f"-mix{self.uniform_mix:g}"
        if self.weighting == "auto" and self.method in sampled:
            label += "-unbiased"
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
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(values["lr_milestones"])
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


STUDIES: Dict[str, Study] = {
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
        settings={
            "dataset": "fashion-mnist", "model": "small_cnn", "train_subset": 10_000, "test_subset": 2_000,
            "augment": False, "budget_steps": 700, "max_epochs": 10_000, "patience": 10_000,
            "lr_milestones": (),
        },
        seeds=3,
        report={"relative_target": 0.98, "equal_time": True},
        description="every policy vs uniform, Fashion-MNIST balanced / long-tailed 10 / 100, small CNN, "
                    "equal step budgets",
    ),
}


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
    seeds = range(spec.seeds) if seeds is None else seeds
    return [
        preset(p, **{**spec.settings, **variant, **overrides, "seed": s})
        for variant in variants for p in chosen for s in seeds
    ]
