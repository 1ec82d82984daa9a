"""The world a run trains in: one process, or the ranks of a ``torchrun`` job.

The training loop (``train.train``) is written once. Everything in it that differs when it
runs on several processes (the device, the share of a batch, the sampler's class, the model's
wrapper, sums and agreements across processes, who writes the run folder, scoring workers)
it asks of its *world*:

- ``OneProcess`` (here): the plain answers; nothing is communicated.
- ``distributed_run.DistributedWorld``: one rank of a torchrun job (DDP, the distributed
  sampler, rank 0 writes), optionally with its last ``scorer_ranks`` ranks serving scores
  instead of training (``isample.scoring.ScorerRanks``).

``make_world`` picks one from the environment (torchrun's ``WORLD_SIZE``). It is the only
place that names both worlds; it imports ``distributed_run`` only when the run is
distributed, so a single-process run never loads DDP.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

import torch

import isample

from .config import SCORED_METHODS, RunConfig
from .data import Dataset
from .evaluation import evaluate

__all__ = ["OneProcess", "make_world", "resolve_device", "world_size", "check_scorer_ranks"]


def resolve_device(name: str) -> torch.device:
    """The torch device of a run's ``device`` setting ("auto": a GPU when torch sees one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no GPU")
    return device


def world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 when unset or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_scorer_ranks(config: RunConfig, scorer_ranks: int, processes: int) -> None:
    """Refuse a number of scorer ranks that cannot work with this run on `processes`
    processes (ValueError naming the fix). Every rank checks the same things, so all of them
    refuse together, before any process group exists."""
    if isinstance(scorer_ranks, bool) or not isinstance(scorer_ranks, int) or scorer_ranks < 0:
        raise ValueError(f"scorer_ranks must be an int >= 0, got {scorer_ranks!r}")
    if not scorer_ranks:
        return
    if processes <= scorer_ranks:
        raise ValueError(
            f"--scorer-ranks {scorer_ranks} needs more processes than scorer ranks (at least one must train), but "
            f"there {'is' if processes == 1 else 'are'} {processes}: start it with torchrun --nproc_per_node "
            f"{scorer_ranks + 1} or more"
        )
    if config.method not in SCORED_METHODS:
        raise ValueError(
            f"--scorer-ranks serves scores for method {' or '.join(SCORED_METHODS)}; method {config.method!r} has no "
            "score a scorer rank can compute (e.g. use --preset grad_norm_proportional)"
        )
    if config.scorers:
        raise ValueError(
            f"--scorer-ranks replaces the local scoring workers, but the run also asks for scorers={config.scorers}: "
            "pass --scorers 0 (or use --preset grad_norm_proportional instead of grad_norm_scorers)"
        )


def make_world(scorer_ranks: int = 0) -> "OneProcess":
    """The world of this process: ``DistributedWorld`` under torchrun (``WORLD_SIZE > 1``),
    else ``OneProcess``. `scorer_ranks` > 0 makes the job's last ranks scorers (torchrun only)."""
    if world_size() > 1:
        from .distributed_run import DistributedWorld

        return DistributedWorld(scorer_ranks)
    if scorer_ranks:
        raise ValueError(
            f"scorer_ranks={scorer_ranks} makes ranks of a torchrun job serve scores, but this is one process "
            "(WORLD_SIZE is unset or 1): start it with torchrun, or use local scoring workers (--scorers)"
        )
    return OneProcess()


class OneProcess:
    """The world of a run in one process. The training loop in ``train.train`` asks its world
    for everything that differs under torchrun (see ``distributed_run.DistributedWorld``, which
    has the same methods); here each answer is the plain one, so nothing is communicated."""

    rank, size, lead = 0, 1, True  # lead: this process writes the run folder, logs and shows progress
    where = ""  # appended to the "resumed at" line
    scorer_ranks = 0  # processes of the job that serve scores instead of training
    serves = False  # this process is a scorer rank: it calls serve() instead of training

    def setup(self, config: RunConfig) -> torch.device:
        """This process's device (and, under torchrun, the process groups)."""
        return resolve_device(config.device)

    def on_lead(self, work: Callable[[], Any]) -> Any:
        """work() run by the lead process, its result (or error) on every process."""
        return work()

    def checkpoint_location(self, device: torch.device) -> Any:
        """Where the lead loads a checkpoint (``map_location``)."""
        return device

    def batch_size(self, config: RunConfig) -> int:
        """This process's share of a step's batch."""
        return config.batch_size

    def importance_sampler(self, config: RunConfig) -> Callable[..., Any]:
        """The class that ``train.make_sampler`` builds the importance-sampling methods' sampler
        with (under torchrun, the distributed one, which takes the same arguments)."""
        return isample.ImportanceSampler

    def make_scorers(self, config: RunConfig, data: Dataset, model: torch.nn.Module, sampler: Any,
                     state: Optional[Dict[str, Any]]) -> Any:
        """The run's scorers (``scorers.RunScorers``), or None: here ``config.scorers`` local
        worker processes. `state` is their saved state when the run resumes."""
        if not config.scorers:
            return None
        from .scorers import RunImages, RunScorers

        return RunScorers(config, RunImages.of(data), model, sampler, state)

    def serve(self, config: RunConfig, data: Dataset, model: torch.nn.Module) -> Dict[str, Any]:
        """On a scorer rank: score until the trainers finish, then return their summary."""
        raise RuntimeError("only a scorer rank of a torchrun job serves scores")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training steps call (under torchrun, DistributedDataParallel)."""
        return model

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This process's part of a uniform epoch's shuffled order."""
        return order

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the processes."""
        return values

    def agree(self, *flags: bool) -> List[bool]:
        """Each flag, true everywhere when it is true on any process (so all stop or save together)."""
        return list(flags)

    def evaluate(self, model: torch.nn.Module, data: Dataset, **options: Any) -> Dict[str, Any]:
        """``evaluation.evaluate`` on the whole test set (the same record on every process)."""
        return evaluate(model, data.test_images, data.test_labels, data, **options)

    def lead_seconds(self, seconds: Dict[str, float]) -> Dict[str, float]:
        """The lead process's wall-clock split (the one the records keep)."""
        return dict(seconds)

    def random_state(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        """This process's random-number state ("augment_generator", "torch_rng") in a checkpoint."""
        return saved

    def gather_random_state(self, mine: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint entries that keep every process's random-number state."""
        return mine

    def checkpoint_tag(self) -> Dict[str, Any]:
        """Entries that say which world saved a checkpoint."""
        return {}  # a checkpoint without a world_size is a single-process one

    def summary_extras(self) -> Dict[str, Any]:
        """Entries that the world adds to ``summary.json``."""
        return {}

    def finish(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """Called once the run folder holds `result` (the summary, or an incomplete run's
        marker) and the scorers are closed; returns what this process's ``train`` returns."""
        return result
