"""What one run measures (its settings) and its progress log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List

from .workloads import DEFAULT_ACCURACY_SIZES


@dataclass
class Settings:
    """What one run measures, and how long it may take; ``parse_args`` fills it from the options."""

    sizes: List[int]
    workloads: List[str]
    methods: List[str]
    budget_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 20_000
    max_call_s: float = 5.0
    max_build_s: float = 60.0
    peer_max_n: int = 100_000_000
    accuracy_sizes: List[int] = field(default_factory=lambda: list(DEFAULT_ACCURACY_SIZES))
    mc_draws: int = 20_000_000
    seed: int = 0
    quiet_wait_s: float = 0.0  # total seconds the run may wait for other processes to go quiet
    quiet_left_s: float = 0.0
    rounds: int = 5  # each cell alternates its contenders over this many rounds
    train_threads: int = 1  # torch threads for the training-step cells
    overhead: bool = True  # the sampler's costs in a training loop (run_overhead)


class Log:
    """Progress lines, each stamped with the seconds since the run started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", flush=True)
