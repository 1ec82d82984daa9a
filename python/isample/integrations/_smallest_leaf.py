"""The smallest positive leaf of a replay buffer's sum tree on a GPU, for ``normalize="buffer"``.

cpprb and OpenAI baselines divide the importance weights by the largest weight any stored
item could get, (N p_min)^-beta, and keep a min tree beside the sum tree for p_min. On the
CPU isample's tree keeps that minimum itself (``SumTree(track_min=True)``); the GPU trees
keep sums only, so a buffer on a GPU keeps a copy of the leaves (8 bytes per slot) and their
minimum here. An update that lowers a leaf lowers the minimum at once; an update that
overwrites the slot holding the minimum marks it stale, and the next read rescans the copy
(O(n), one reduction). In prioritized replay the smallest-priority item is the least likely
to be drawn and updated, so rescans are rare.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["SmallestLeaf"]


class SmallestLeaf:
    """The smallest positive value among `capacity` leaves (inf when none is positive)."""

    def __init__(self, capacity: int, device: torch.device, zeros_possible: bool = True) -> None:
        # Leaves that cannot be drawn (0: empty slots, or priority 0 with eps 0) are kept as inf.
        # `zeros_possible` False (eps > 0) skips looking for them in every update.
        self._zeros_possible = zeros_possible
        if device.type == "cpu":
            self._leaves: Any = np.full(capacity, math.inf)
        else:
            self._leaves = torch.full((capacity,), math.inf, dtype=torch.float64, device=device)
        self._smallest: Optional[float] = math.inf  # None: stale, rescan on the next read

    def _as_array(self, values: torch.Tensor) -> Any:
        return values.numpy() if isinstance(self._leaves, np.ndarray) else values

    def set(self, slots: torch.Tensor, leaves: torch.Tensor) -> None:
        """Record that the tree now holds `leaves` at `slots` (read back from the tree, so a
        repeated slot holds the value the tree kept). Takes `leaves` over: it may change it."""
        index, new = self._as_array(slots), self._as_array(leaves)
        if self._zeros_possible:
            new[new == 0] = math.inf
        old = self._leaves[index]
        self._leaves[index] = new
        if self._smallest is not None and new.shape[0]:
            low = float(new.min())
            if low <= self._smallest:  # every other leaf is >= the old minimum
                self._smallest = low
            elif bool((old == self._smallest).any()):  # the minimum's slot was raised
                self._smallest = None

    def set_one(self, slot: int, leaf: float) -> None:
        """``set`` of one slot, without array overhead."""
        new = leaf if leaf > 0 else math.inf
        old = float(self._leaves[slot])
        self._leaves[slot] = new
        if self._smallest is not None:
            if new <= self._smallest:
                self._smallest = new
            elif old == self._smallest:
                self._smallest = None

    def reset(self, leaves: torch.Tensor) -> None:
        """Take every leaf anew (shape (capacity,))."""
        fresh = self._as_array(leaves).copy()
        fresh[fresh == 0] = math.inf
        self._leaves[:] = fresh
        self._smallest = None

    @property
    def value(self) -> float:
        """The smallest positive leaf (inf when there is none)."""
        if self._smallest is None:
            self._smallest = float(self._leaves.min())
        return self._smallest
