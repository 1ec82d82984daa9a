"""What is timed: the workloads, their sizes, and the weights and update arguments they use."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

BATCH = 128
DEFAULT_SIZES = (10_000, 50_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000)
QUICK_SIZES = (10_000, 50_000)
DEFAULT_ACCURACY_SIZES = (1_000_000, 10_000_000)

WORKLOADS: Dict[str, str] = {
    "build": "build from an array of n weights",
    "update": f"update {BATCH} weights",
    "sample": f"sample {BATCH} with replacement",
    "step": f"step: sample {BATCH} + update them",
    "wor128": f"{BATCH} distinct items (without replacement)",
    "wor8192": "8,192 of 50k without replacement",
    "wor30000": "30,000 of 50k without replacement",
}
# Workloads run at one n only (the CIFAR-10 settings of DESIGN.md).
FIXED_N = {"wor8192": 50_000, "wor30000": 50_000}
WOR_K = {"wor128": BATCH, "wor8192": 8192, "wor30000": 30_000}
SWEPT = ("build", "update", "sample", "step", "wor128")


class Unsupported(Exception):
    """A method that cannot run a workload; the message says why."""


def timing_weights(n: int, seed: int = 0) -> np.ndarray:
    """The weights the speed runs use: uniform in [0.001, 1.001), as in the core benchmark."""
    weights = np.random.default_rng(seed).random(n)
    weights += 1e-3
    return weights


def update_arguments(n: int, seed: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """The update cells' arguments: 128 indices in [0, n) and weights in [0.001, 1.001)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, BATCH), rng.random(BATCH) + 1e-3
