"""ScorerPool: scoring workers beside one trainer, the system of the second seed (Alain et al.,
"Variance reduction in SGD by distributed importance sampling").

Workers sweep the training set over and over, scoring every item with a recent copy of the
parameters; the trainer samples from those scores and weights its losses by 1 / (N p):

    sampler = isample.ImportanceSampler(len(train_set), transform="proportional", uniform_mix=0.1)
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)
    with ScorerPool(sampler, model, train_set, score="grad_norm", workers=1) as pool:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for index, x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                loss = (losses * sampler.weights(index).to(losses)).mean()
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                pool.step(model)  # publish every publish_every steps; apply what arrived; never waits
            print(pool.stats())   # coverage, staleness, items/s, workers alive, refused messages

Scores reach the sampler through ``sampler.set_scores(indices, scores)``: no score policy,
so sample from them with ``transform="proportional"`` (the seed's q proportional to the
norm), with a ``uniform_mix`` to bound the weights (the seed adds a constant to the norms).
The sampler draws each epoch from the scores it holds when the epoch begins.

Faults (see docs/scoring.md):

- A worker that raises: its traceback comes back, and the next ``step`` raises
  ``ScorerError`` with it (after applying every good score that arrived). The worker has
  exited; ``restart()`` starts it again.
- A worker that dies without a word (SIGKILL, the OOM killer): training goes on with the
  scores it has, ``stats()["workers_alive"]`` drops and a RuntimeWarning says so. Nothing is
  restarted behind your back (as with torchrun's default ``--max-restarts 0``):
  ``pool.restart()`` starts every dead worker again.
- A message with NaN, infinite or negative scores, indices outside [0, N) or a version
  that was never published is refused whole, counted in ``stats()["rejected"]``, and never
  applied.
- ``close()`` (also on leaving the ``with``, whatever the reason) stops the workers, waits at
  most ``timeout`` seconds for them, then terminates and kills the rest: no child process
  outlives the pool. It is idempotent.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from . import messages
from .layout import ParameterLayout, unwrap
from .ledger import ScoreLedger
from .scores import Score, ScoreFn, get_score
from .worker import ScorerConfig

__all__ = ["ScorerPool", "ScorerError"]

_FORMAT = "isample.scoring.ScorerPool"
_VERSION = 1


class ScorerError(RuntimeError):
    """A scoring worker failed; the message carries its traceback."""


def _count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class ScorerPool:
    """Scoring workers that keep every item's score fresh while one trainer trains.

    Args:
        sampler: an ``ImportanceSampler`` or ``DistributedImportanceSampler`` (anything with
            ``num_items`` and ``set_scores(indices, scores)``).
        model: the model being trained (a DDP wrapper is unwrapped). Workers get a copy when
            they start and the trainer's parameters (and floating-point buffers) at every
            publish, through shared memory.
        dataset: map-style, item i is ``(x, y)`` as in a ``TensorDataset``; ``len(dataset)``
            must be the sampler's N. Workers read it themselves (unshuffled, no augmentation).
        score: ``"grad_norm"`` (default, the bound of ``isample.GradNormBound``), ``"loss"``,
            ``"grad_norm_exact"``, a callable ``(model, x, y) -> (b,)`` or a ``Score``.
        workers: worker processes on this machine.
        batch_size: items per chunk, the unit a worker scores and sends.
        publish_every: publish the parameters every this many ``step`` calls.
        device: where the workers score (``"cpu"``, ``"cuda:1"``, ...).
        threads: torch threads per worker (default 1: workers share the machine's cores with
            the trainer).
        start_method: ``"spawn"`` (default; safe with CUDA and threads), ``"forkserver"`` or
            ``"fork"`` (starts in milliseconds and needs nothing picklable, but not with CUDA).
        seed: the order in which workers sweep their chunks.
        timeout: seconds ``close`` waits for the workers before terminating them.
        ranks: a ``ScorerRanks`` (``isample.scoring.distributed``): the scorers are the last
            ranks of a torch.distributed job instead of local processes; ``workers``,
            ``device``, ``threads`` and ``start_method`` then belong to the scorer ranks.

    The pool starts its workers on ``with`` (or ``start()``, or the first ``step``).
    """

    def __init__(
        self,
        sampler: Any,
        model: torch.nn.Module,
        dataset: Dataset,
        *,
        score: Union[str, Score, ScoreFn] = "grad_norm",
        workers: int = 1,
        batch_size: int = 256,
        publish_every: int = 50,
        device: Union[str, torch.device] = "cpu",
        threads: int = 1,
        start_method: str = "spawn",
        seed: int = 0,
        timeout: float = 10.0,
        ranks: Any = None,
    ) -> None:
        if not callable(getattr(sampler, "set_scores", None)) or not hasattr(sampler, "num_items"):
            raise TypeError(
                f"sampler must have num_items and set_scores(indices, scores), as ImportanceSampler and "
                f"DistributedImportanceSampler do; got {type(sampler).__name__}"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}")
        num_items = int(sampler.num_items)
        if len(dataset) != num_items:
            raise ValueError(f"the data set has {len(dataset)} items but the sampler has {num_items}: they must match")
        self.score = get_score(score)
        self.workers = _count(workers, "workers")
        self.batch_size = _count(batch_size, "batch_size")
        self.publish_every = _count(publish_every, "publish_every")
        threads = _count(threads, "threads")
        seed = _count(seed, "seed", 0)
        if not (isinstance(timeout, numbers.Real) and 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        device = torch.device(device)
        self.sampler = sampler
        self.model = unwrap(model)
        self.num_items = num_items
        self._layout = ParameterLayout.of(self.model)
        self._ledger = ScoreLedger(num_items)
        self._steps = 0
        self._published = 0
        self._skipped_publishes = 0
        self._pending: List[messages.Scores] = []
        self._errors: List[str] = []
        self._started = self._closed = False
        if ranks is not None:
            from .distributed import RankTransport

            if workers != 1:
                raise ValueError("with ranks=..., the scorers are the scorer ranks: leave workers at 1")
            self._transport: Any = RankTransport(ranks, self._layout, self.score, self.batch_size, num_items, seed)
        else:
            import torch.multiprocessing as multiprocessing

            if start_method not in multiprocessing.get_all_start_methods():
                raise ValueError(
                    f"start_method must be one of {multiprocessing.get_all_start_methods()}, got {start_method!r}"
                )
            if device.type == "cuda" and start_method == "fork":
                raise ValueError("workers on CUDA need start_method='spawn' or 'forkserver': CUDA does not survive fork")
            config = ScorerConfig(self.score, self.batch_size, num_items, self.workers, seed, threads, str(device), os.getpid())
            from .local import LocalWorkers

            self._transport = LocalWorkers(self.workers, config, self.model, dataset, self._layout, start_method)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> "ScorerPool":
        """Publish the parameters and start the workers (once; ``with`` calls it)."""
        if self._closed:
            raise RuntimeError("this ScorerPool is closed; make a new one")
        if self._started:
            return self
        self._started = True
        try:
            # the first publish goes out before any worker can ask for it (after the scorer
            # ranks' handshake, which must come first on their group)
            self._transport.start(lambda: self._publish(self.model))
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> "ScorerPool":
        return self.start()

    def __exit__(self, kind, error, trace) -> None:
        self.close(apply=kind is None)

    def close(self, *, apply: bool = True) -> None:
        """Stop the workers, wait at most ``timeout`` seconds, then terminate and kill those
        still running. Scores that arrived meanwhile are applied (``apply=False``: dropped;
        the ``with`` block drops them when it is left by an exception). Idempotent. On scorer
        ranks (``ranks=...``) it is not a collective: the scores that arrive while closing
        are dropped, since applying them would need every trainer."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        late = self._transport.close(self.timeout)
        if apply and not self._transport.collective:
            for message in late:
                self._take(message)
            self._apply_local()
        self._pending.clear()

    def __del__(self) -> None:
        if getattr(self, "_started", False) and not getattr(self, "_closed", True):
            try:
                self.close(apply=False)
            except Exception:  # noqa: BLE001 - nothing to report to at interpreter exit
                pass

    def restart(self) -> int:
        """Start again every worker that has died or failed; returns how many were started.
        They load the latest parameters and sweep in a new order."""
        if self._closed:
            raise RuntimeError("this ScorerPool is closed")
        self.start()
        return self._transport.restart()

    # -- the training step ----------------------------------------------------------------
    def step(self, model: Optional[torch.nn.Module] = None) -> None:
        """Call after every optimizer step. Every ``publish_every`` calls it publishes the
        parameters of `model` (default: the pool's model); it applies every score batch that
        has arrived. It never waits for a worker. Raises ScorerError if a worker failed."""
        if not self._started:
            self.start()
        elif self._closed:
            raise RuntimeError("this ScorerPool is closed")
        self._steps += 1
        publish = self._steps % self.publish_every == 0
        if publish:
            self._publish(self.model if model is None else unwrap(model))
        for message in self._transport.receive():
            self._take(message)
        if not self._transport.collective:
            self._apply_local()
        elif publish:
            self._apply_collective()
        else:
            return  # across ranks, errors wait for the next apply, where every trainer raises them
        if self._errors:
            errors, self._errors = self._errors, []
            raise ScorerError("\n".join(errors))

    def _publish(self, model: torch.nn.Module) -> None:
        tensors = self._layout.tensors(model)
        if self._transport.publish(tensors, self._steps):
            self._ledger.record_publish(self._steps)
            self._published += 1
        else:
            self._skipped_publishes += 1

    def _take(self, message: messages.Message) -> None:
        """Queue a score batch for the sampler, or refuse it, or keep a worker's error."""
        if isinstance(message, messages.Scores):
            reason = self._ledger.check(message)
            if reason is None:
                self._pending.append(message)
                self._ledger.arrived(message.indices.size)
            else:
                self._ledger.reject(reason, message.worker, message.indices.size)
        elif isinstance(message, messages.Bad):
            self._ledger.reject(message.reason, message.worker, 0)
        elif isinstance(message, messages.Error):
            self._errors.append(message.text)

    def _batch(self) -> tuple:
        pending, self._pending = self._pending, []
        if not pending:
            return pending, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64)
        # in arrival order: an item scored twice keeps its newer score (the last value wins)
        indices = torch.from_numpy(np.concatenate([m.indices for m in pending]))
        scores = torch.from_numpy(np.concatenate([m.scores for m in pending]))
        return pending, indices, scores

    def _apply_local(self) -> None:
        if not self._pending:
            return
        pending, indices, scores = self._batch()
        self.sampler.set_scores(indices, scores)
        for message in pending:
            self._ledger.accept(message)

    def _apply_collective(self) -> None:
        """Every trainer rank, at the same step: agree on worker errors, then set_scores with
        what this rank received (the lead everything, the others nothing)."""
        self._errors = self._transport.agree_on_errors(self._errors)
        pending, indices, scores = self._batch()
        self.sampler.set_scores(indices, scores)
        for message in pending:
            self._ledger.accept(message)

    # -- what the pool reports ------------------------------------------------------------
    @property
    def steps(self) -> int:
        """``step`` calls so far (restored by ``load_state_dict``)."""
        return self._steps

    def stats(self) -> Dict[str, Any]:
        """What the pool has done, as a JSON-able dict:

        - ``coverage``: fraction of the items scored at least once;
        - ``staleness``: ``{"median", "max"}`` over the scored items of (current step - the
          step whose parameters scored the item), in trainer steps (None before any score);
        - ``items_per_second``: items scored per second, from the arrival of the first good
          batch to the last (start-up excluded);
        - ``workers``, ``workers_alive``;
        - ``rejected`` (messages refused), ``rejected_items``, ``last_rejections``;
        - ``steps``, ``published`` (publishes made), ``publishes_skipped`` (a broadcast was
          still in flight), ``version`` (the step of the latest publish), ``batches`` and
          ``items_scored`` (applied), ``pending`` (arrived, not yet applied), ``restarts``,
          ``score``.

        With ``ranks=...`` it is a collective among the trainer ranks (the lead's figures,
        on every trainer)."""
        ledger = self._ledger
        median, oldest = ledger.staleness(self._steps)
        stats = {
            "steps": self._steps,
            "coverage": ledger.coverage(),
            "staleness": {"median": median, "max": oldest},
            "items_per_second": ledger.items_per_second(),
            "workers": self._transport.count,
            "workers_alive": self._transport.alive() if self._started and not self._closed else 0,
            "rejected": ledger.counters["rejected"],
            "rejected_items": ledger.counters["rejected_items"],
            "last_rejections": list(ledger.recent_rejections),
            "published": self._published,
            "publishes_skipped": self._skipped_publishes,
            "version": ledger.publish_steps[-1] if ledger.publish_steps else None,
            "batches": ledger.counters["batches"],
            "items_scored": ledger.counters["items"],
            "pending": sum(m.indices.size for m in self._pending),
            "restarts": self._transport.restarts,
            "score": self.score.name,
        }
        if self._transport.collective:
            stats = self._transport.from_lead(stats)
        return stats

    def item_versions(self) -> torch.Tensor:
        """The step whose parameters scored each item's current score, int64 (N,); -1 for
        items no worker has scored yet. (On scorer ranks: complete on the lead trainer.)"""
        return torch.from_numpy(self._ledger.versions())

    @property
    def worker_pids(self) -> List[Optional[int]]:
        """Process ids of the local workers (None for one not running); [] with ``ranks``."""
        return list(getattr(self._transport, "pids", []))

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The step count and the ledger (which version scored each item): save it beside the
        sampler's state, whose scores it describes. With ``ranks``, the lead's is complete."""
        return {"format": _FORMAT, "version": _VERSION, "steps": self._steps, "ledger": self._ledger.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: restore the step count, coverage and staleness of a saved pool. Call it
        before the pool starts (before ``with``), after loading the sampler's state, which
        holds the scores themselves; the workers then refresh them from the restored step on.
        A state that does not fit raises and changes nothing."""
        if self._started:
            raise RuntimeError("load_state_dict must be called before the pool starts (before `with` or step())")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} state of version {_VERSION}")
        steps = _count(state.get("steps"), "state['steps']", 0)
        ledger = ScoreLedger(self.num_items)
        ledger.load_state_dict(state.get("ledger"))
        if ledger.publish_steps and ledger.publish_steps[-1] > steps:
            raise ValueError("the state's ledger holds a publish after its step count")
        self._ledger = ledger
        self._steps = steps

    def __repr__(self) -> str:
        where = "ranks" if self._transport.collective else f"workers={self.workers}"
        state = "closed" if self._closed else ("running" if self._started else "not started")
        return (
            f"ScorerPool({where}, score={self.score.name!r}, batch_size={self.batch_size}, "
            f"publish_every={self.publish_every}, steps={self._steps}, {state})"
        )
