"""Timing: single calls with perf_counter_ns, medians over interleaved rounds, other processes' load."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .settings import Settings


@dataclass
class Timing:
    """The times of single calls, in nanoseconds; medians and minima in microseconds."""

    times_ns: List[int]

    @property
    def median_us(self) -> float:
        return float(np.median(self.times_ns)) / 1e3

    @property
    def min_us(self) -> float:
        return min(self.times_ns) / 1e3


def time_calls(
    function: Callable[[], Any],
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    before: Optional[Callable[[], Any]] = None,
    warmup: bool = True,
) -> Timing:
    """Single calls of `function`, timed with perf_counter_ns until the budget is spent.

    ``before`` runs untimed before every call (the build's release of the previous tree).
    The garbage collector is off while timing, so a collection is not charged to a call.
    """
    if warmup:
        if before:
            before()
        function()
    times: List[int] = []
    enabled = gc.isenabled()
    gc.disable()
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    try:
        while len(times) < max_repeats:
            if before:
                before()
            start = clock()
            function()
            end = clock()
            times.append(end - start)
            if len(times) >= min_repeats and end >= deadline:
                break
    finally:
        if enabled:
            gc.enable()
    return Timing(times)


class OtherLoad:
    """CPU used by other processes while a cell ran, in cores, from /proc/stat (Linux)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / ticks
        ours = os.times()
        return busy, ours.user + ours.system, time.perf_counter()

    def cores(self) -> Optional[float]:
        """Cores that other processes kept busy since this object was made (None: unknown)."""
        end = self._sample()
        if self.start is None or end is None or end[2] - self.start[2] < 0.05:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(others, 0.0) / (end[2] - self.start[2]), 2)


QUIET_CORES = 0.3  # other processes' CPU use (cores) above which a cell counts as disturbed


def wait_until_quiet(settings: Settings) -> float:
    """Sleep while other processes keep a core busy, within --wait-for-quiet's budget."""
    waited = 0.0
    while settings.quiet_left_s > 0:
        probe = OtherLoad()
        time.sleep(0.5)
        cores = probe.cores()
        waited += 0.5
        settings.quiet_left_s -= 0.5
        if cores is None or cores <= QUIET_CORES:
            break
    return waited


def interleaved(contenders: Dict[str, Callable[[], Any]], settings: Settings) -> Dict[str, Timing]:
    """Time each contender in turn over settings.rounds rounds (forward, then backward), each
    round a share of the budget; one Timing per contender, over all its calls."""
    rounds = max(1, settings.rounds)
    times: Dict[str, List[int]] = {name: [] for name in contenders}
    for function in contenders.values():
        function()  # warm up
    names = list(contenders)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            timing = time_calls(
                contenders[name], settings.budget_s / rounds, max(1, -(-settings.min_repeats // rounds)),
                max(1, settings.max_repeats // rounds), warmup=False,
            )
            times[name].extend(timing.times_ns)
    return {name: Timing(t) for name, t in times.items()}
