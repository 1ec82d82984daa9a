"""Scoring workers beyond one machine: the last ranks of a torch.distributed job score, the
others train, and the ``ScorerPool`` API stays the same.

    torchrun --nnodes 2 --nproc_per_node 4 ... train.py      # 8 ranks: say 6 train, 2 score

    dist.init_process_group("nccl")                 # or gloo
    ranks = ScorerRanks.split(scorers=2)            # every rank calls it (it makes the groups)
    if ranks.is_scorer:
        ranks.serve(model, train_set, device=f"cuda:{local_rank}")  # until the trainers close their pool
    else:
        model = DDP(model, process_group=ranks.trainers)
        sampler = DistributedImportanceSampler(N, group=ranks.trainers, transform="proportional", uniform_mix=0.1)
        with ScorerPool(sampler, model, train_set, score="grad_norm", publish_every=50, ranks=ranks) as pool:
            ...  # the same loop as on one machine, pool.step(model) after each optimizer step
    dist.destroy_process_group()

Roles: with W ranks and K scorers, ranks 0 .. W-K-1 train (DDP and the distributed sampler
over ``ranks.trainers``) and ranks W-K .. W-1 score. Trainer rank 0 is the *lead*: it alone
publishes parameters and receives scores. Two extra process groups link the lead and the
scorers, and a third the trainers among themselves (``ranks.control``), all gloo (CPU
tensors over TCP, whatever the trainers' back end), so that scoring traffic never queues
behind the trainers' NCCL all-reduces and the pool's agreements never synchronise a GPU:

- **parameters**: the lead broadcasts one flat byte buffer (``ParameterLayout``: the
  floating-point state, each tensor 8-byte aligned, then an int64 version) every
  ``publish_every`` steps, asynchronously. If the previous broadcast has not finished (a
  scorer is still busy with a chunk) the publish is skipped and counted, never waited for.
  A scorer polls for it between chunks and posts the next receive at once.
- **scores**: each scorer sends fixed-size messages (``messages``: 32 + 16 b bytes for b
  items) to the lead by point-to-point ``isend``, two in flight. On the lead a daemon thread
  waits in ``recv`` from any scorer (gloo completes a point-to-point receive only inside a
  blocking wait) and queues what arrives; ``pool.step`` takes the queue without waiting.

The lead applies what arrived every ``publish_every`` steps, when every trainer calls
``sampler.set_scores`` at the same step (the lead with the pairs, the others with none), so
the distributed sampler's exchange keeps the replicas identical. Just before, one broadcast of
8 bytes over the trainers tells them whether a scorer failed, so that every trainer raises
``ScorerError`` at the same step instead of waiting in a collective for one that raised alone.

Shutdown (``pool.close()`` on the lead): a final broadcast with version -1 asks the scorers to
stop; each finishes its chunk, sends a BYE message and returns from ``serve``; the lead waits
for the BYEs (at most ``timeout`` seconds), so no operation is left pending when the process
group is destroyed. Scores that arrive after the last apply are dropped.

A scorer rank that dies is torchrun's business (it stops or restarts the whole job,
``--max-restarts``). A scorer that raises sends its traceback to the lead and keeps answering
the parameter broadcasts until the stop, so the job shuts down cleanly.

A scorer waits in an asynchronous broadcast between publishes: the trainers must step (or
close the pool) at least once per process-group timeout (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from . import messages
from .layout import ParameterLayout, copy_all, unwrap
from .scores import Score, get_score
from .worker import ChunkPlan, Scorer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ScorerRanks", "RankTransport"]

_STOP = -1
_POLL_S = 0.001


@dataclass
class ScorerRanks:
    """Which ranks train and which score, and the process groups between them.

    Make it with ``ScorerRanks.split(scorers=K)`` on every rank, after ``init_process_group``.

    Attributes:
        rank: this process's global rank.
        trainer_ranks, scorer_ranks: global ranks; the lead is ``trainer_ranks[0]``.
        trainers: the process group of the training ranks (for DDP and the sampler), on the
            job's back end.
        control: a gloo group of the training ranks, for the pool's own small agreements
            (a scorer's error, ``stats()``): CPU tensors, so no GPU synchronisation.
        params_group, scores_group: gloo groups of the lead and the scorers.
    """

    rank: int
    trainer_ranks: List[int]
    scorer_ranks: List[int]
    trainers: "ProcessGroup"
    control: "ProcessGroup"
    params_group: "ProcessGroup"
    scores_group: "ProcessGroup"

    @property
    def lead(self) -> int:
        """The lead trainer's global rank (trainer rank 0): it publishes and receives."""
        return self.trainer_ranks[0]

    @classmethod
    def split(cls, scorers: int) -> "ScorerRanks":
        """The last `scorers` ranks score, the others train. A collective over the default
        group (it creates four process groups): every rank calls it, in the same order
        relative to its other ``new_group`` calls."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ScorerRanks.split needs torch.distributed: call init_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(scorers, bool) or not isinstance(scorers, int) or not 1 <= scorers < world:
            raise ValueError(f"scorers must be an int in [1, {world - 1}] (at least one rank trains), got {scorers!r}")
        trainer_ranks = list(range(world - scorers))
        scorer_ranks = list(range(world - scorers, world))
        trainers = dist.new_group(trainer_ranks)
        control = dist.new_group(trainer_ranks, backend="gloo")
        link = [trainer_ranks[0], *scorer_ranks]
        params_group = dist.new_group(link, backend="gloo")
        scores_group = dist.new_group(link, backend="gloo")
        return cls(rank, trainer_ranks, scorer_ranks, trainers, control, params_group, scores_group)

    @property
    def is_scorer(self) -> bool:
        """This rank scores: call ``serve`` here."""
        return self.rank in self.scorer_ranks

    @property
    def is_trainer(self) -> bool:
        """This rank trains: build the ScorerPool here, with ``ranks=self``."""
        return not self.is_scorer

    @property
    def is_lead(self) -> bool:
        """This rank is the lead trainer."""
        return self.rank == self.lead

    def serve(self, model: torch.nn.Module, dataset: Any, *, device: Any = "cpu",
              threads: Optional[int] = None) -> Dict[str, Any]:
        """Score on this (scorer) rank until the trainers close their pool; returns what it
        did: ``{"chunks", "items", "versions", "error"}``. The score, chunk size and seed come
        from the lead's ``ScorerPool``; `model` must have the trainers' architecture (its
        parameters are replaced by the first publish) and `dataset` their items."""
        if not self.is_scorer:
            raise RuntimeError(f"rank {self.rank} trains; serve() runs on the scorer ranks {self.scorer_ranks}")
        if threads is not None:
            torch.set_num_threads(threads)
        return _serve(self, unwrap(model), dataset, torch.device(device))

    def __repr__(self) -> str:
        role = "lead trainer" if self.is_lead else ("scorer" if self.is_scorer else "trainer")
        return f"ScorerRanks(rank={self.rank} ({role}), trainers={self.trainer_ranks}, scorers={self.scorer_ranks})"


def _publish_buffer(layout: ParameterLayout) -> torch.Tensor:
    return torch.zeros(layout.nbytes + 8, dtype=torch.uint8)


def _version_view(buffer: torch.Tensor, layout: ParameterLayout) -> torch.Tensor:
    return buffer[layout.nbytes : layout.nbytes + 8].view(torch.int64)


class RankTransport:
    """The ScorerPool's transport on trainer ranks (see the module docstring)."""

    collective = True  # scores are applied every publish_every steps, by every trainer together

    def __init__(self, ranks: ScorerRanks, layout: ParameterLayout, score: Score, batch_size: int,
                 num_items: int, seed: int) -> None:
        if not isinstance(ranks, ScorerRanks):
            raise TypeError(f"ranks must be a ScorerRanks (ScorerRanks.split(scorers=K)), got {type(ranks).__name__}")
        if not ranks.is_trainer:
            raise RuntimeError(f"rank {ranks.rank} is a scorer: call ranks.serve(model, dataset) there, not ScorerPool")
        self.ranks = ranks
        self.layout = layout
        self.count = len(ranks.scorer_ranks)
        self.restarts = 0
        self._handshake = {
            "score": score, "batch_size": batch_size, "num_items": num_items, "seed": seed,
            "signature": layout.signature(), "nbytes": layout.nbytes, "scorers": self.count,
        }
        self._message_bytes = messages.message_bytes(batch_size)
        self._buffer = _publish_buffer(layout)
        self._views = layout.views(self._buffer)
        self._version = _version_view(self._buffer, layout)
        self._broadcast: Any = None
        self._receiver: Optional[_Receiver] = None
        self._finished: set = set()  # scorer indices
        self._failed: set = set()

    # -- life cycle -----------------------------------------------------------------------
    def start(self, publish: Callable[[], None]) -> None:
        """The lead sends the handshake and starts receiving; then the first publish."""
        if self.ranks.is_lead:
            dist.broadcast_object_list([self._handshake], src=self.ranks.lead, group=self.ranks.params_group)
            self._receiver = _Receiver(self.ranks, self._message_bytes)
            self._receiver.start()
        publish()

    def restart(self) -> int:
        """Refused: a scorer rank is a process of the job, which torchrun restarts."""
        raise RuntimeError("scorer ranks are restarted by torchrun (--max-restarts), not by the pool")

    # -- the trainer's calls --------------------------------------------------------------
    def publish(self, tensors: List[torch.Tensor], version: int) -> bool:
        """The lead broadcasts asynchronously; False (skipped) while the last one is in flight."""
        if not self.ranks.is_lead:
            return True  # the lead publishes for every trainer (DDP keeps them identical)
        if self._broadcast is not None and not self._broadcast.is_completed():
            return False  # a scorer has not taken the last one yet: skip, never wait
        if self._broadcast is not None:
            self._broadcast.wait()  # completed: surfaces an error, returns at once
        copy_all(self._views, tensors)
        self._version.fill_(version)
        self._broadcast = dist.broadcast(self._buffer, src=self.ranks.lead, group=self.ranks.params_group,
                                         async_op=True)
        return True

    def receive(self) -> List[messages.Message]:
        """What the lead's receiving thread has queued (nothing on other trainers)."""
        if self._receiver is None:
            return []
        out = self._receiver.take()
        for message in out:
            if isinstance(message, messages.Bye):
                self._finished.add(message.worker)
            elif isinstance(message, messages.Error):
                self._failed.add(message.worker)
        return out

    def agree_on_errors(self, errors: List[str]) -> List[str]:
        """Every trainer, at the same step: the lead's worker errors, on every trainer."""
        group, lead = self.ranks.control, self.ranks.lead
        flag = torch.tensor([len(errors) if self.ranks.is_lead else 0], dtype=torch.int64)
        dist.broadcast(flag, src=lead, group=group)
        if int(flag[0]) == 0:
            return []
        box = [errors if self.ranks.is_lead else None]
        dist.broadcast_object_list(box, src=lead, group=group)
        if self.ranks.is_lead:
            return errors
        return [f"(received from the lead trainer, rank {lead})\n{text}" for text in box[0]]

    def from_lead(self, value: Any) -> Any:
        """The lead's `value` on every trainer (a collective over ``ranks.control``)."""
        box = [value if self.ranks.is_lead else None]
        dist.broadcast_object_list(box, src=self.ranks.lead, group=self.ranks.control)
        return box[0]

    def alive(self) -> int:
        """Scorers that have neither failed nor stopped (as the lead knows)."""
        return self.count - len(self._finished | self._failed)

    def close(self, timeout: float) -> List[messages.Message]:
        """The lead stops the scorers and waits for their BYE (at most `timeout` seconds)."""
        if not self.ranks.is_lead or self._receiver is None:
            return []
        deadline = time.monotonic() + timeout
        # a scorer takes a publish only between chunks: let the last one complete, then stop
        while self._broadcast is not None and not self._broadcast.is_completed() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if self._broadcast is None or self._broadcast.is_completed():
            self._version.fill_(_STOP)
            self._broadcast = dist.broadcast(self._buffer, src=self.ranks.lead, group=self.ranks.params_group,
                                             async_op=True)
        self._receiver.join(max(0.0, deadline - time.monotonic()))
        late = self.receive()
        if self._receiver.is_alive() or not self._broadcast.is_completed():
            warnings.warn(
                f"scorer ranks did not all stop within {timeout} s; destroying the process group now may "
                "wait on them",
                RuntimeWarning,
                stacklevel=3,
            )
        return late


class _Receiver(threading.Thread):
    """The lead's receiving thread: gloo completes a point-to-point receive only inside a
    blocking wait, so one daemon thread waits on ``recv`` from any scorer and queues what
    arrives; the trainer takes the queue without waiting. It ends when every scorer has said
    BYE (or a receive fails: the failure is queued as a refused message)."""

    def __init__(self, ranks: ScorerRanks, size: int) -> None:
        super().__init__(name="isample-score-receiver", daemon=True)
        self.ranks = ranks
        self.buffer = torch.zeros(size, dtype=torch.uint8)
        self.queue: "queue.SimpleQueue[messages.Message]" = queue.SimpleQueue()

    def run(self) -> None:
        """Receive from any scorer until every one has said BYE."""
        waiting = set(range(len(self.ranks.scorer_ranks)))
        while waiting:
            try:
                source = dist.recv(self.buffer, group=self.ranks.scores_group)  # any scorer
            except Exception as error:  # noqa: BLE001 - a timeout or a lost peer: report, stop
                for index in waiting:
                    self.queue.put(messages.Error(index, f"receiving scores failed: {error!r}"))
                return
            index = self.ranks.scorer_ranks.index(source)
            message = messages.decode(bytes(self.buffer.numpy()), index)  # a copy: the buffer is reused
            self.queue.put(message)
            if isinstance(message, messages.Bye):
                waiting.discard(index)

    def take(self) -> List[messages.Message]:
        """Everything queued so far, without waiting."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


def _serve(ranks: ScorerRanks, model: torch.nn.Module, dataset: Any, device: torch.device) -> Dict[str, Any]:
    """The scorer rank's loop (see ScorerRanks.serve and the module docstring)."""
    box: List[Any] = [None]
    dist.broadcast_object_list(box, src=ranks.lead, group=ranks.params_group)
    config = box[0]
    index = ranks.scorer_ranks.index(ranks.rank)
    batch_size, num_items = int(config["batch_size"]), int(config["num_items"])
    # the buffer has the lead's size even when this model does not match, so that the
    # broadcasts still pair up and the job can shut down
    params = _Params(ranks, torch.zeros(int(config["nbytes"]) + 8, dtype=torch.uint8))
    sender = _Sender(ranks, messages.message_bytes(batch_size))
    report: Dict[str, Any] = {"chunks": 0, "items": 0, "versions": [], "error": None}

    def fail() -> None:
        report["error"] = f"scorer rank {ranks.rank} failed:\n{traceback.format_exc()}"
        sender.send(messages.encode_error(index, report["error"], limit=16 * batch_size))

    scorer: Optional[Scorer] = None
    try:
        layout = ParameterLayout.of(model)
        if layout.signature() != tuple(config["signature"]):
            raise ValueError(
                "this scorer's model does not match the parameters the lead publishes: build the same "
                "architecture on every rank"
            )
        if len(dataset) != num_items:
            raise ValueError(f"this scorer's data set has {len(dataset)} items, the trainers' sampler {num_items}")
        plan = ChunkPlan(num_items, batch_size, index, int(config["scorers"]), int(config["seed"]))
        scorer = Scorer(model, dataset, get_score(config["score"]), plan, device)
        views = layout.views(params.buffer)
    except Exception:  # noqa: BLE001 - reported to the lead, which raises it on every trainer
        fail()
    version = params.wait()  # the first publish (or the stop)
    if scorer is not None and version != _STOP:
        try:
            params.unpack_into(scorer.tensors, views)
            report["versions"].append(version)
            with torch.no_grad():
                for start, stop in scorer.plan.sweeps():
                    newer = params.poll()
                    if newer == _STOP:
                        version = _STOP
                        break
                    if newer is not None:
                        params.unpack_into(scorer.tensors, views)
                        version = newer
                        report["versions"].append(version)
                    indices, scores = scorer.score_chunk(start, stop)
                    sender.send(messages.encode_scores(index, version, indices, scores))
                    report["chunks"] += 1
                    report["items"] += int(indices.size)
        except Exception:  # noqa: BLE001
            fail()
    while version != _STOP:  # failed: keep answering the broadcasts until the lead stops us
        params.skip()
        version = params.wait()
    sender.send(messages.encode_bye(index))
    sender.flush()
    return report


class _Params:
    """A scorer's side of the parameter broadcast: a receive is posted whenever the buffer is
    free; a publish that arrived stays in the buffer until it is unpacked (or skipped)."""

    def __init__(self, ranks: ScorerRanks, buffer: torch.Tensor) -> None:
        self.ranks, self.buffer = ranks, buffer
        self.version_view = buffer[-8:].view(torch.int64)
        self.work: Any = None
        self._post()

    def _post(self) -> None:
        if self.work is None:
            self.work = dist.broadcast(self.buffer, src=self.ranks.lead, group=self.ranks.params_group, async_op=True)

    def wait(self) -> int:
        """Block until the posted receive completes; the version it carries (-1: stop)."""
        self._post()
        self.work.wait()
        self.work = None
        return int(self.version_view[0])

    def poll(self) -> Optional[int]:
        """The version of a publish that has arrived, or None (without waiting)."""
        if self.work is not None and not self.work.is_completed():
            return None
        return self.wait()

    def unpack_into(self, tensors: List[torch.Tensor], views: List[torch.Tensor]) -> None:
        """Copy the publish that arrived into the model, then post the next receive."""
        copy_all(tensors, views)
        self._post()  # only now, so that the next publish cannot overwrite the buffer mid-copy

    def skip(self) -> None:
        """Drop the publish that arrived and post the next receive."""
        self._post()


class _Sender:
    """A scorer's sends to the lead: two buffers in flight, each reused once its send is done."""

    def __init__(self, ranks: ScorerRanks, size: int) -> None:
        self.ranks = ranks
        self.buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]
        self.works: List[Any] = [None, None]
        self.next = 0

    def send(self, payload: bytes) -> None:
        """Send `payload` (at most the buffer's size) once the buffer's last send is done."""
        k = self.next
        self.next = 1 - k
        self._finish(k)
        buffer = self.buffers[k]
        data = torch.frombuffer(bytearray(payload[: buffer.numel()]), dtype=torch.uint8)
        buffer.zero_()
        buffer[: data.numel()] = data
        self.works[k] = dist.isend(buffer, dst=self.ranks.lead, group=self.ranks.scores_group)

    def _finish(self, k: int) -> None:
        work = self.works[k]
        if work is not None:
            work.wait()  # the lead's receiver thread takes every message as it comes
            self.works[k] = None

    def flush(self) -> None:
        """Wait for every send in flight."""
        self._finish(0)
        self._finish(1)
