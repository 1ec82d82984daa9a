"""What a scorer does, in a worker process on this machine or on a scorer rank: sweep the data
set in chunks, each scored with the latest parameters it has.

The data set is cut into chunks of ``batch_size`` consecutive items; scorer ``w`` of ``W``
owns the chunks ``c`` with ``c % W == w`` and sweeps them over and over, in a new shuffled
order each sweep (seeded, so a run is reproducible up to timing). Before each chunk it loads
the newest parameters, if any arrived; it scores the chunk in eval mode and sends back
``(indices, scores, version)``.

A data set may define ``chunk(start, stop) -> (x, y)``, the batch of items [start, stop): the
way to keep images as uint8 in shared memory and normalise a chunk at a time. A
``TensorDataset`` (or any data set with a ``tensors`` tuple of two) is sliced, so a chunk
costs no per-item Python; other map-style data sets go through ``__getitems__`` when they
have it, else item by item, and torch's ``default_collate``.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from . import messages
from .layout import ParameterLayout
from .scores import Score

__all__ = ["ChunkPlan", "load_chunk", "ScorerConfig", "worker_main"]


class ChunkPlan:
    """The chunks one scorer owns, and the order it sweeps them in."""

    def __init__(self, num_items: int, batch_size: int, scorer: int, scorers: int, seed: int, generation: int = 0) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        chunks = -(-num_items // batch_size)
        self.chunks = np.arange(scorer, chunks, scorers, dtype=np.int64)
        self._rng = np.random.default_rng([seed, scorer, generation])

    def sweeps(self) -> Iterator[Tuple[int, int]]:
        """(start, stop) of each chunk, sweep after sweep, forever."""
        while True:
            for chunk in self._rng.permutation(self.chunks):
                start = int(chunk) * self.batch_size
                yield start, min(start + self.batch_size, self.num_items)


def load_chunk(dataset: Dataset, start: int, stop: int) -> Tuple[Any, torch.Tensor]:
    """Items [start, stop) of a map-style data set of (x, y), batched: ``dataset.chunk(start,
    stop)`` when the data set defines it, slices of a TensorDataset's two tensors, else its
    ``__getitems__`` (or item by item) and ``default_collate``."""
    chunk = getattr(dataset, "chunk", None)
    if callable(chunk):
        return chunk(start, stop)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) == 2 and all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors[0][start:stop], tensors[1][start:stop]
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(range(start, stop))) if callable(getitems) else [dataset[i] for i in range(start, stop)]
    if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) != 2:
        raise TypeError(
            f"the data set's items must be (x, y) pairs, as in a TensorDataset; item {start} is "
            f"{type(items[0]).__name__ if items else 'missing'}"
        )
    x, y = default_collate(items)
    return x, y


def to_device(x: Any, device: torch.device) -> Any:
    """`x` (a tensor, or tuples, lists and dicts of them) on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


class Scorer:
    """One scorer's model copy, chunk plan and score: ``score(start, stop) -> (indices, scores)``."""

    def __init__(self, model: torch.nn.Module, dataset: Dataset, score: Score, plan: ChunkPlan, device: Any) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.layout = ParameterLayout.of(self.model)
        self.tensors = self.layout.tensors(self.model)
        self.dataset, self.score, self.plan = dataset, score, plan

    def score_chunk(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """(indices, float64 scores) of items [start, stop) with the model's current parameters."""
        x, y = load_chunk(self.dataset, start, stop)
        x, y = to_device(x, self.device), to_device(y, self.device)
        scores = self.score(self.model, x, y)
        return np.arange(start, stop, dtype=np.int64), scores.numpy()


@dataclass
class ScorerConfig:
    """What every worker of a pool is started with (pickled once, at start)."""

    score: Score
    batch_size: int
    num_items: int
    workers: int
    seed: int
    threads: int
    device: str
    parent: int  # the trainer's pid: a worker whose parent is gone exits
    generation: int = 0  # how many times this worker was restarted


def worker_main(index: int, config: ScorerConfig, model: torch.nn.Module, dataset: Dataset, board: Any,
                connection: Any) -> None:
    """A worker process on this machine: score chunks until the board says stop, the trainer
    is gone, or something fails (then send the traceback and exit)."""
    try:
        torch.set_num_threads(config.threads)
        plan = ChunkPlan(config.num_items, config.batch_size, index, config.workers, config.seed, config.generation)
        scorer = Scorer(model, dataset, config.score, plan, config.device)
        if scorer.layout.signature() != board.layout.signature():
            raise ValueError("the worker's model does not match the parameters the trainer publishes")
        version: Optional[int] = None
        with torch.no_grad():
            for start, stop in plan.sweeps():
                if board.stop_requested or os.getppid() != config.parent:
                    break
                version = board.read_into(scorer.tensors, version)
                if version is None:  # nothing published yet (the pool publishes before it starts us)
                    raise RuntimeError("no parameters were published before the worker started")
                indices, scores = scorer.score_chunk(start, stop)
                connection.send_bytes(messages.encode_scores(index, version, indices, scores))
        code = 0
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        code = 0  # the trainer closed its end or is stopping us: nothing to report
    except BaseException:  # noqa: BLE001 - every failure goes to the trainer with its traceback
        code = 1
        text = f"scoring worker {index} (pid {os.getpid()}) failed:\n{traceback.format_exc()}"
        try:
            connection.send_bytes(messages.encode_error(index, text))
        except OSError:
            sys.stderr.write(text)
    try:
        connection.close()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        # leave at once: an interpreter that imported torch takes a second or more to tear
        # down, and the worker holds nothing that needs it (shared memory goes with the process)
        os._exit(code)
