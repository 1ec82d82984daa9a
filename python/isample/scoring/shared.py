"""The parameter board: the trainer publishes its parameters into shared memory, workers read
the latest copy, and nobody waits for anybody.

Two slots of ``ParameterLayout.nbytes`` bytes each, in shared memory, and a small shared
header of int64 counters. A publish writes the slot that is *not* the latest, under that
slot's sequence number (a seqlock: odd while it is being written), then makes it the latest.
A reader copies the latest slot into its model and checks that the slot's sequence number is
even and unchanged; otherwise a publish overtook it and it tries again (up to a few times,
then it keeps the last copy, labelled with the older of the versions it may mix). The writer
never waits: with two slots a reader is only overtaken when two publishes land during one
copy (a copy takes about a millisecond per million parameters; publishes come every
``publish_every`` steps).

Memory order: on x86-64 stores are not reordered with stores, nor loads with loads, which is
all a seqlock needs. On weakly ordered CPUs (ARM) the check can in principle miss a copy that
mixes two consecutive publishes; such a score then comes from a blend of two adjacent
parameter versions, which is harmless for an importance estimate (Hogwild-style training reads
shared parameters with no check at all) and is recorded under the older version.

The header also carries the pool's stop flag, which workers read before every chunk.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .layout import ParameterLayout, copy_all

__all__ = ["ParameterBoard"]

# header fields (int64)
_LATEST, _SEQ0, _SEQ1, _VERSION0, _VERSION1, _STOP, _PUBLISHES, _TORN = range(8)
_READ_TRIES = 4


class ParameterBoard:
    """Shared-memory parameters for the workers on this machine (see the module docstring).

    Pickles (for a ``spawn`` / ``forkserver`` child) as handles to the same shared memory.
    """

    def __init__(self, layout: ParameterLayout) -> None:
        self.layout = layout
        self.header = torch.zeros(8, dtype=torch.int64).share_memory_()
        self.header[_LATEST] = -1
        self.slots = torch.zeros(2, max(layout.nbytes, 8), dtype=torch.uint8).share_memory_()
        self._attach()

    def _attach(self) -> None:
        self._h = self.header.numpy()  # element reads and writes without torch's per-call cost
        self._views = [self.layout.views(self.slots[0]), self.layout.views(self.slots[1])]

    def __getstate__(self):
        return {"layout": self.layout, "header": self.header, "slots": self.slots}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._attach()

    # -- the trainer's side ---------------------------------------------------------------
    def publish(self, tensors: List[torch.Tensor], version: int) -> None:
        """Copy `tensors` (in layout order) into the free slot and make it the latest."""
        h = self._h
        latest = int(h[_LATEST])
        slot = 1 if latest == 0 else 0
        seq = _SEQ0 + slot
        h[seq] += 1  # odd: being written
        copy_all(self._views[slot], tensors)
        h[_VERSION0 + slot] = version
        h[seq] += 1  # even: complete
        h[_LATEST] = slot
        h[_PUBLISHES] += 1

    @property
    def version(self) -> Optional[int]:
        """The version of the latest publish, None before the first."""
        latest = int(self._h[_LATEST])
        return None if latest < 0 else int(self._h[_VERSION0 + latest])

    @property
    def torn_reads(self) -> int:
        """Reads that a publish overtook on every try (the reader kept its parameters)."""
        return int(self._h[_TORN])

    def request_stop(self) -> None:
        """Ask every worker to stop before its next chunk."""
        self._h[_STOP] = 1

    @property
    def stop_requested(self) -> bool:
        """Whether the pool asked the workers to stop."""
        return bool(self._h[_STOP])

    # -- a worker's side ------------------------------------------------------------------
    def read_into(self, tensors: List[torch.Tensor], known: Optional[int]) -> Optional[int]:
        """Copy the latest publish into `tensors` if its version differs from `known`; return
        the version now held (`known` when nothing newer, or when every try was overtaken)."""
        h = self._h
        copied: Optional[int] = None
        for _ in range(_READ_TRIES):
            slot = int(h[_LATEST])
            if slot < 0:
                return known
            seq = _SEQ0 + slot
            before = int(h[seq])
            if before % 2:  # overtaken before we began: the slot is being rewritten
                continue
            version = int(h[_VERSION0 + slot])
            if version == known and copied is None:
                return known
            copy_all(tensors, self._views[slot])
            copied = version
            if int(h[seq]) == before:
                return version
        if copied is None:
            return known
        # every try was overtaken: the tensors hold `copied` partly overwritten by a newer
        # publish; label them with the older version (staleness is then over-, never under-stated)
        h[_TORN] += 1  # not atomic across workers: a diagnostic count
        return copied
