"""Scoring workers in the runner: a ``ScorerPool`` beside the training loop (``RunConfig.scorers``,
or under torchrun the job's last ranks, ``--scorer-ranks``).

The second seed's system (Alain et al. 2015, ``isample.scoring``): ``config.scorers`` worker
processes sweep the run's training images over and over, each scoring every item with the
parameters the trainer published at most ``config.publish_every`` steps earlier, and the
sampler draws each epoch from those scores (the trainer itself then scores nothing). This
module adapts the pool to the runner:

- ``RunImages`` hands the workers the run's uint8 images (shared memory under ``spawn``) and
  normalises a chunk at a time, exactly as the trainer does;
- ``RunScorers`` opens the pool (restoring its ledger on resume), steps it, and gives each
  epoch's record: the pool's coverage, staleness (median and max, in trainer steps), items/s,
  workers alive and refused messages, and the CPU seconds the workers used, read from
  ``/proc`` so that the wall-clock of the trainer and the extra hardware of the workers are
  reported apart.

Under torchrun with scorer ranks (``distributed_run``) ``RunScorers`` opens the same pool with
``ranks=`` on every trainer; the scorer ranks serve ``RunImages`` of the same data. Its
records then say how many ``scorer_ranks`` served, and ``cpu_seconds`` is None: those
processes are not this one's children, perhaps not on this machine.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import torch

from .augment import normalize
from .config import RunConfig
from .data import Dataset

__all__ = ["RunImages", "RunScorers", "process_cpu_seconds"]

# The pool's score for each method that scoring workers can serve (config.SCORED_METHODS).
POOL_SCORES = {"grad_norm": "grad_norm", "last_loss": "loss"}
MAX_RESTARTS = 3


class RunImages(torch.utils.data.Dataset):
    """The run's training images as a map-style data set of (x, y) for the scoring workers:
    uint8 in memory, normalised a chunk at a time (``chunk(start, stop)``) with the run's
    per-channel mean and std, as the training loop normalises its batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError("RunImages takes uint8 N×C×H×W images and N labels")
        self.images = images.cpu()
        self.labels = labels.cpu()
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def of(cls, data: Dataset) -> "RunImages":
        """The training split of a run's data set."""
        return cls(data.train_images, data.train_labels, data.mean, data.std)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int):
        x, y = self.chunk(index, index + 1)
        return x[0], y[0]

    def chunk(self, start: int, stop: int):
        """Items [start, stop): normalised float images and their labels."""
        return normalize(self.images[start:stop], self.mean, self.std), self.labels[start:stop]


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a live process (Linux /proc), None if it cannot be read."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name: state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RunScorers:
    """The scoring workers of one run (see the module docstring).

    Args:
        config: the run (``scorers`` workers, ``publish_every``, the method's score).
        images: the workers' data set (``RunImages``).
        model: the model being trained (the workers get a copy, then published parameters).
        sampler: the run's ``ImportanceSampler`` (``DistributedImportanceSampler`` with
            ranks); the pool writes the scores into it.
        state: the pool's saved state (``state_dict``) when the run resumes.
        ranks: a ``ScorerRanks`` on a trainer rank: the scorers are the job's scorer ranks
            instead of ``config.scorers`` local processes.
    """

    def __init__(self, config: RunConfig, images: RunImages, model: torch.nn.Module, sampler: Any,
                 state: Optional[Dict[str, Any]] = None, ranks: Any = None) -> None:
        from ..scoring import ScorerPool

        self.ranks = ranks
        workers = {} if ranks is not None else {"workers": config.scorers}
        self.pool = ScorerPool(sampler, model, images, score=POOL_SCORES[config.method], publish_every=config.publish_every,
                               seed=config.seed, ranks=ranks, **workers)
        if state is not None:
            self.pool.load_state_dict(state["pool"])
        # earlier sessions' workers (None: scorer ranks, whose CPU time is not read here)
        self._cpu_before = 0.0 if state is None or state["cpu_seconds"] is None else float(state["cpu_seconds"])
        self._cpu: Dict[int, float] = {}  # last reading of each worker process of this session
        started = time.perf_counter()
        self.pool.start()
        self.startup_seconds = time.perf_counter() - started

    def step(self, model: torch.nn.Module) -> None:
        """After every optimizer step: publish when due, apply the scores that arrived."""
        self.pool.step(model)

    def cpu_seconds(self) -> Optional[float]:
        """CPU seconds the workers have used in this run so far (all sessions of a resumed run);
        None with scorer ranks (other processes, perhaps on other machines)."""
        if self.ranks is not None:
            return None
        for pid in self.pool.worker_pids:
            if pid is not None:
                seconds = process_cpu_seconds(pid)
                if seconds is not None:
                    self._cpu[pid] = seconds
        return self._cpu_before + sum(self._cpu.values())

    def record(self) -> Dict[str, Any]:
        """The epoch record's ``scorers`` entry. A worker found dead (killed, say) is started
        again here, once an epoch, at most MAX_RESTARTS times a session; then the run fails.
        (A scorer rank is not restarted here: one that fails raises ScorerError on every
        trainer, and one that dies is torchrun's business.) With ranks, a collective of the
        trainers."""
        stats = self.pool.stats()
        if self.ranks is None and stats["workers_alive"] < stats["workers"]:
            if self.pool.stats()["restarts"] >= MAX_RESTARTS:
                raise RuntimeError(f"the scoring workers died {MAX_RESTARTS + 1} times in this run; see the warnings above")
            self.pool.restart()
        ranks = {} if self.ranks is None else {"scorer_ranks": stats["workers"]}
        return {
            **ranks,
            "coverage": stats["coverage"],
            "staleness": stats["staleness"],
            "items_per_second": stats["items_per_second"],
            "workers_alive": stats["workers_alive"],
            "rejected": stats["rejected"],
            "items_scored": stats["items_scored"],
            "restarts": stats["restarts"],
            "published": stats["published"],
            "cpu_seconds": self.cpu_seconds(),
            "startup_seconds": self.startup_seconds,
        }

    def item_versions(self) -> torch.Tensor:
        """The step whose parameters scored each item's current score (-1: not yet scored)."""
        return self.pool.item_versions()

    def state_dict(self) -> Dict[str, Any]:
        """The pool's state and the workers' CPU time so far, in types that weights-only
        checkpoint loading reads (the pool's ledger holds a numpy array: saved as a tensor)."""
        pool = self.pool.state_dict()
        ledger = dict(pool["ledger"], item_publish=torch.from_numpy(pool["ledger"]["item_publish"].copy()))
        return {"pool": dict(pool, ledger=ledger), "cpu_seconds": self.cpu_seconds()}

    def close(self) -> None:
        """Stop the workers (idempotent); their CPU time is read first."""
        if not getattr(self, "_closed", False):
            self.cpu_seconds()
            self.pool.close()
            self._closed = True
