"""The trainer's record of the scores that arrived: which parameter version scored each item,
how many batches and items were applied or refused, and the statistics the pool reports.

Every message is checked before anything is applied; a refused message changes nothing but
the ``rejected`` counters. Versions are trainer steps at which parameters were published; an
item's staleness is the current step minus the version behind its score.

Memory: 4 bytes per item (the index of the publish behind its score).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

from .messages import Scores

__all__ = ["ScoreLedger"]

_FORMAT = "isample.scoring.ScoreLedger"
_VERSION = 1


class ScoreLedger:
    """Checks score messages and keeps coverage and staleness (see the module docstring)."""

    def __init__(self, num_items: int) -> None:
        self.num_items = int(num_items)
        self.publish_steps: List[int] = []  # the step of each publish, increasing
        self.item_publish = np.full(self.num_items, -1, dtype=np.int32)  # -1: never scored
        self.counters: Dict[str, int] = {"batches": 0, "items": 0, "rejected": 0, "rejected_items": 0}
        self.recent_rejections: Deque[str] = deque(maxlen=5)
        self._first_arrival: Optional[float] = None
        self._last_arrival: Optional[float] = None
        self._items_timed = 0  # items that arrived after the first batch (the rate's numerator)

    # -- publishes ------------------------------------------------------------------------
    def record_publish(self, step: int) -> None:
        """Note a publish at `step`: messages may carry it as their version from now on."""
        if self.publish_steps and step <= self.publish_steps[-1]:
            if step == self.publish_steps[-1]:
                return  # published again at the same step: the same version
            raise ValueError(f"publish at step {step} after one at step {self.publish_steps[-1]}")
        self.publish_steps.append(int(step))

    def _publish_index(self, version: int) -> int:
        k = bisect.bisect_left(self.publish_steps, version)
        return k if k < len(self.publish_steps) and self.publish_steps[k] == version else -1

    # -- messages -------------------------------------------------------------------------
    def check(self, message: Scores) -> Optional[str]:
        """Why `message` must be refused, or None when it may be applied."""
        indices, scores = message.indices, message.scores
        if indices.shape != scores.shape or indices.ndim != 1:
            return f"{indices.shape[0]} indices but {scores.shape[0]} scores"
        if self._publish_index(message.version) < 0:
            return f"version {message.version} was never published"
        if indices.size:
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_items:
                bad = low if low < 0 else high
                return f"index {bad} is outside [0, {self.num_items})"
            if not np.isfinite(scores).all():
                return f"{int((~np.isfinite(scores)).sum())} non-finite score(s)"
            if float(scores.min()) < 0.0:
                return f"{int((scores < 0).sum())} negative score(s), e.g. {float(scores.min())}"
        return None

    def accept(self, message: Scores) -> None:
        """Record an applied message (checked with ``check`` first)."""
        self.item_publish[message.indices] = self._publish_index(message.version)
        self.counters["batches"] += 1
        self.counters["items"] += int(message.indices.size)

    def arrived(self, items: int) -> None:
        """Time a good batch's arrival (scores may be applied later: across ranks, every
        ``publish_every`` steps), for ``items_per_second``."""
        now = time.perf_counter()
        if self._first_arrival is None:
            self._first_arrival = now
        else:
            self._items_timed += int(items)
        self._last_arrival = now

    def reject(self, reason: str, worker: int, items: int) -> None:
        """Count a refused message of `items` items and keep its reason."""
        self.counters["rejected"] += 1
        self.counters["rejected_items"] += int(items)
        self.recent_rejections.append(f"worker {worker}: {reason}")

    # -- statistics -----------------------------------------------------------------------
    def coverage(self) -> float:
        """The fraction of items scored at least once."""
        return float(np.count_nonzero(self.item_publish >= 0)) / self.num_items

    def staleness(self, step: int) -> Tuple[Optional[float], Optional[int]]:
        """(median, max) of step - version over the items scored so far; (None, None) before any."""
        counts = np.bincount(self.item_publish.astype(np.int64) + 1, minlength=len(self.publish_steps) + 1)[1:]
        total = int(counts.sum())
        if total == 0:
            return None, None
        ages = step - np.asarray(self.publish_steps, dtype=np.int64)  # decreasing with the publish
        present = np.nonzero(counts)[0]
        oldest = int(ages[present[0]])
        # the median of the ages, each repeated counts[k] times (numpy's rule: the mean of the
        # two middle values for an even total)
        order = np.argsort(ages, kind="stable")
        cumulative = np.cumsum(counts[order])
        lower = int(ages[order][np.searchsorted(cumulative, (total - 1) // 2, side="right")])
        upper = int(ages[order][np.searchsorted(cumulative, total // 2, side="right")])
        return (lower + upper) / 2.0, oldest

    def items_per_second(self) -> float:
        """Items that arrived per second, from the first good batch to the last (start-up excluded)."""
        if self._first_arrival is None or self._last_arrival is None or self._last_arrival <= self._first_arrival:
            return 0.0
        return self._items_timed / (self._last_arrival - self._first_arrival)

    def versions(self) -> np.ndarray:
        """The version (trainer step) behind each item's score, int64 (N,), -1 if never scored."""
        steps = np.asarray(self.publish_steps + [-1], dtype=np.int64)
        return steps[self.item_publish]  # -1 indexes the appended -1

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Publishes, the publish behind each item's score, and the counters."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_items": self.num_items,
            "publish_steps": list(self.publish_steps),
            "item_publish": self.item_publish.copy(),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict``; a state that does not fit raises ValueError or TypeError
        and changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} state of version {_VERSION}")
        if state.get("num_items") != self.num_items:
            raise ValueError(f"the state is for {state.get('num_items')} items, this pool has {self.num_items}")
        steps = [int(s) for s in state["publish_steps"]]
        if any(b <= a for a, b in zip(steps, steps[1:])) or any(s < 0 for s in steps):
            raise ValueError("state['publish_steps'] must be increasing non-negative steps")
        item_publish = np.asarray(state["item_publish"])
        if item_publish.shape != (self.num_items,) or item_publish.dtype.kind not in "iu":
            raise ValueError(f"state['item_publish'] must be ({self.num_items},) integers")
        if item_publish.size and (int(item_publish.min()) < -1 or int(item_publish.max()) >= len(steps)):
            raise ValueError("state['item_publish'] refers to publishes the state does not hold")
        counters = {k: int(state["counters"].get(k, 0)) for k in self.counters}
        self.publish_steps = steps
        self.item_publish = item_publish.astype(np.int32, copy=True)
        self.counters = counters
