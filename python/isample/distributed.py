"""Importance sampling across DDP ranks over ``torch.distributed``: one global distribution.

    from isample.distributed import DistributedImportanceSampler

    sampler = DistributedImportanceSampler(len(train_set), seed=0)   # ImportanceSampler's defaults
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for index, x, y in loader:             # iter(): exchange the last epoch's updates, draw
            losses = F.cross_entropy(model(x), y, reduction="none")
            (losses * sampler.weights(index).to(losses)).mean().backward()
            sampler.update(index, losses)      # local: no collective, no host read
            ...

It is a drop-in for ``DistributedSampler`` with the API of ``ImportanceSampler``. Every rank
yields a disjoint part of one global sample drawn from the global probabilities, all parts
of the same length, and the importance weights are ``1 / (N p_global)``. Two layouts:

- **replicated** (default): every rank holds the whole tree and applies every rank's
  updates. All ranks then draw the same global epoch from the shared seed, without
  communicating, and each keeps its part.
- **sharded** (``sharded=True``): rank r holds only items [start_r, end_r) (``shard_range``);
  updates travel to their owner; each importance epoch all-gathers the shard masses, a
  multinomial over shards with a shared seed sets how many draws each shard makes for each
  rank, each rank descends its own tree, and an all-to-all delivers the draws.

**When updates travel** (``exchange=``). Scores change only the next epoch's probabilities,
so nothing requires them to travel on the training step:

- ``"epoch"`` (default): ``update`` and ``set_scores`` record this rank's (index, value)
  pairs in buffers on the values' device, allocated ahead and grown by doubling from sizes
  the host knows (the batch's shape): no collective and no read of a tensor's value. The
  next ``iter()`` (or ``flush()``) exchanges them, once, and every replica (or each pair's
  owner) applies them step by step, in (step, rank) order, before the epoch is drawn.
- an int K: every K calls the last K steps leave with ``async_op=True``; their sizes are
  read one boundary later and their pairs arrive and are applied one boundary after that,
  so the collectives overlap the K steps of compute in between, and memory stays bounded
  on very long epochs. Every rank must then call ``update``/``set_scores`` the same number
  of times (as in DDP, where every rank takes every step).
- ``"step"``: the exchange of earlier versions, a collective in every call, for loops that
  want other ranks' scores mid-epoch.

The three give bit-identical draws, weights, scores and ``state_dict`` after each exchange:
the same steps are applied in the same order with the same arithmetic (tested on two
processes for every score policy and ``set_scores``).

**Bad input.** A call that cannot be recorded (a tensor of the wrong type or shape, a
scalar loss, a score policy's TypeError) or whose values fail the checks at the exchange (an
index outside [0, N), a non-finite value under ``nonfinite="raise"``, a negative score given
to ``set_scores``) is refused: that call changes nothing. With ``"step"`` every rank raises
at once and nothing of that step is applied anywhere. Otherwise the refusal is kept, the
call returns, and the next exchange applies every accepted call and then raises the
refusal's exception class on every rank, naming the rank and the call (``iter()``,
``flush()``, or ``update()`` at a K boundary). No rank ever waits in a collective for a
rank that raised, since all of them raise at the same exchange.

Costs, with W ranks, N items, m = samples_per_epoch, B the batch of one rank, S the steps
of an epoch and L = ceil(m / W) the per-rank epoch length (bytes are what one rank receives;
a pair is 16 bytes, 24 sharded, plus a policy's extra tensors, see below):

=====================  ==========================================  =========================================
call                   replicated                                  sharded
=====================  ==========================================  =========================================
memory per rank        16.5 N + 8 N + 8 m; about 48 m more         16.5 N / W + 32 L; about 24 c_r more
                       while drawing; 16 L recorded pairs          while drawing; 16 L recorded pairs
``update``, per step   local: copies B pairs into the record       local
``iter``, per epoch    exchange: all-gather of 72 B per rank,      exchange: all-to-all of 80 B per peer,
                       all-gather of 8 (S + 2 L) B per rank;       all-to-all of 8 S B per peer plus 24 B
                       applies W L updates in S calls; draws m     per pair it owns; applies about L; draw:
                       items locally                               all-gather 16 W, all-to-all 16 L,
                                                                   all-reduce 16 B
``weights``, ``len``,  local                                       local
``state_dict``
``load_state_dict``    an all-gather of 16 bytes (checks)          an all-gather of 16 bytes (checks)
=====================  ==========================================  =========================================

A policy that needs the previous score and is not an EMA (``EarlyImportance``) runs at the
exchange, where the previous score is known, so its extra tensors (``logits=``,
``targets=``) travel too: 4 C (rounded up to a multiple of 8) + 8 more bytes per pair for
float32 logits of C classes and int64 targets.

``iter()`` (except with ``"step"``), ``flush``, ``load_state_dict``, ``check_consistency``,
sharded ``probabilities``, and ``update``/``set_scores`` with ``"step"`` are collectives:
every rank calls them, in the same order. A rank that stops calling leaves the others
waiting only until the process group's ``timeout`` (``init_process_group(timeout=...)``).
On NCCL the record lives on the GPU and the step launches only copies; each exchange reads
its sizes on the host (one synchronisation per exchange: per epoch by default, per K steps
with ``exchange=K``).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import numbers
import operator
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import _backend
from ._backend import DeviceLike
from .sampler import Epoch, ImportanceSampler, ScoreUpdate, _as_losses, _continues, derive_seed, paper_options
from .scores import ScorePolicy
from .transforms import Transform
from .tree import SoftmaxTree, SumTree, uniforms

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DistributedImportanceSampler"]

_FORMAT = "isample.DistributedImportanceSampler"
_STATE_VERSION = 1
_CPU = torch.device("cpu")
# Epochs are yielded in chunks converted to Python ints, so that a rank's part of a large
# epoch is never held as one Python list (about 36 bytes per item).
_CHUNK = 1 << 16
#: epochs are seeds' parts: at most the largest int64 (set_epoch refuses more)
_MAX_EPOCH = 2**63 - 1

# A failed check on one rank travels to all ranks as a code, so that every rank raises the
# same exception class (0 = fine).
_ERRORS: Tuple[type, ...] = (ValueError, IndexError, TypeError, RuntimeError)

# A recorded step is one int64: rows << 2 | refused << 1 | kind.
_UPDATE, _SET = 0, 1
_REFUSED = 2
_CALLS = ("update()", "set_scores()")

# The header of a window every rank receives from every rank (int64 fields); sharded, then
# the rows that rank sends to this one.
_H_ROWS, _H_STEPS, _H_WORDS, _H_CODE, _H_FIRST, _H_REFUSALS, _H_SKIPPED, _H_CLAMPED, _H_SCHEMA = range(9)
_HEADER = 9
#: refusal messages that travel per rank and window (the count travels in the header)
_MESSAGES = 3


def _code_of(error: BaseException) -> int:
    for code, kind in enumerate(_ERRORS, 1):
        if isinstance(error, kind):
            return code
    return len(_ERRORS)


def _fingerprint(value: Any) -> int:
    """A signed 64-bit digest of a JSON-able value, equal in every process (unlike hash())."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _tensor_digest(t: torch.Tensor) -> int:
    data = t.detach().to(_CPU).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def _rank_length(length: int, world: int, drop_last: bool) -> int:
    """Items per rank for a global epoch of `length` items, as DistributedSampler counts."""
    if drop_last and length % world:
        return length // world
    return -(-length // world)


def _rank_positions(
    length: int, world: int, rank: int, drop_last: bool, start: int = 0, stop: Optional[int] = None
) -> torch.Tensor:
    """Positions in a global epoch of `length` items of the items `rank` yields (its `start`-th
    to before its `stop`-th): rank + W j of the order padded by repeating its start (or cut,
    with drop_last), as DistributedSampler does; position p of the padded order is p mod length."""
    end = _rank_length(length, world, drop_last)
    steps = torch.arange(start, end if stop is None else min(stop, end), dtype=torch.int64)
    return (rank + world * steps) % max(length, 1)


def _shard_bounds(num_items: int, world: int) -> List[int]:
    """Rank r owns items [bounds[r], bounds[r + 1]); shard sizes differ by at most one."""
    base, extra = divmod(num_items, world)
    return [r * base + min(r, extra) for r in range(world + 1)]


def _check_exchange(value: Any) -> Union[str, int]:
    """``exchange=``: "epoch", "step" or a number of steps K >= 1."""
    if isinstance(value, str):
        if value in ("epoch", "step"):
            return value
        raise ValueError(f"exchange must be 'epoch', 'step' or a number of steps >= 1, got {value!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"exchange must be 'epoch', 'step' or an int number of steps, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"exchange must be at least 1 step, got {value}")
    return int(value)


def _device_of(x: Any) -> torch.device:
    """Where a recorded tensor stays: its GPU, or else the CPU (the checks refuse other devices)."""
    return x.device if isinstance(x, torch.Tensor) and x.is_cuda else _CPU


def _steps(length: int, batch_size: int, drop_last: bool) -> int:
    return length // batch_size if drop_last else -(-length // batch_size)


def _pack(t: torch.Tensor) -> torch.Tensor:
    """Rows of any dtype and shape (R, ...) as int64 words (R, w), bit for bit."""
    raw = t.reshape(t.shape[0], -1).contiguous().view(torch.uint8)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = torch.cat([raw, raw.new_zeros((raw.shape[0], pad))], dim=1)
    return raw.contiguous().view(torch.int64)


def _unpack(words: torch.Tensor, dtype: torch.dtype, trailing: Sequence[int]) -> torch.Tensor:
    """The inverse of _pack for rows of `dtype` and shape (R, *trailing)."""
    size = torch.empty((), dtype=dtype).element_size() * math.prod(trailing)
    raw = words.contiguous().view(torch.uint8)[:, :size].contiguous()
    return raw.view(dtype).reshape(words.shape[0], *trailing)


def _words(schema: Optional[Tuple[Tuple[str, str, Tuple[int, ...]], ...]]) -> List[int]:
    """int64 words per row of each extra tensor of a schema."""
    if not schema:
        return []
    return [-(-getattr(torch, name).itemsize * math.prod(shape) // 8) for _, name, shape in schema]


class _Pending:
    """A collective in flight (``async_op=True``); ``wait()`` returns its result."""

    def __init__(self, work: Any, result: Any) -> None:
        self._work, self._result = work, result

    def wait(self) -> Any:
        if self._work is not None:
            self._work.wait()  # on NCCL: orders the current stream after it, without a host wait
            self._work = None
        return self._result


class _Group:
    """The process group a sampler talks over, the few collectives it uses, and the bytes
    they move (``traffic``).

    Without an initialised process group it stands for one process (world size 1) and every
    collective is the identity; the samplers then behave as ImportanceSampler.
    """

    def __init__(
        self, group: Optional["ProcessGroup"], num_replicas: Optional[int], rank: Optional[int], device: torch.device
    ) -> None:
        if dist.is_available() and dist.is_initialized():
            world, me = dist.get_world_size(group), dist.get_rank(group)
            if me < 0:
                raise ValueError("this process is not a member of `group`")
            if num_replicas is not None and num_replicas != world:
                raise ValueError(f"num_replicas={num_replicas} but the process group has {world} ranks")
            if rank is not None and rank != me:
                raise ValueError(f"rank={rank} but this process is rank {me} of the process group")
            backend = str(dist.get_backend(group))
            # NCCL moves only CUDA tensors: use the sampler's GPU, else the current one.
            if backend == "nccl" or (device.type == "cuda" and "nccl" in backend):
                self.device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
            else:
                self.device = _CPU
            self.active = True  # every collective goes through torch.distributed, even with one rank
        else:
            if num_replicas not in (None, 1) or rank not in (None, 0):
                raise RuntimeError(
                    "torch.distributed is not initialised: call torch.distributed.init_process_group "
                    "first (torchrun sets its environment), or leave num_replicas and rank unset for "
                    "a single process"
                )
            world, me, self.device, self.active = 1, 0, _CPU, False
        self.group = group
        self.world = world
        self.rank = me
        self.traffic = {"collectives": 0, "bytes_sent": 0, "bytes_received": 0}

    def _count(self, sent: int, received: int) -> None:
        self.traffic["collectives"] += 1
        self.traffic["bytes_sent"] += sent
        self.traffic["bytes_received"] += received

    def start_all_gather(self, tensor: torch.Tensor) -> _Pending:
        """Every rank's `tensor` (same shape and dtype on every rank), in rank order, once
        ``wait()`` returns."""
        if not self.active:
            return _Pending(None, [tensor])
        local = tensor.to(self.device).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world)]
        nbytes = local.numel() * local.element_size()
        self._count(nbytes, nbytes * (self.world - 1))
        return _Pending(dist.all_gather(out, local, group=self.group, async_op=True), out)

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return self.start_all_gather(tensor).wait()

    def start_all_to_all(self, rows: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> _Pending:
        """Send rows[sum(send[:d]) : sum(send[:d + 1])] to rank d; receive receive[s] rows
        from each rank s, concatenated in rank order, once ``wait()`` returns."""
        if not self.active:
            return _Pending(None, rows)
        local = rows.to(self.device).contiguous()
        out = local.new_empty((int(sum(receive)), *local.shape[1:]))
        row_bytes = local.element_size() * math.prod(local.shape[1:])
        me = self.rank
        self._count(
            row_bytes * (int(sum(send)) - int(send[me])), row_bytes * (int(sum(receive)) - int(receive[me]))
        )
        work = dist.all_to_all_single(
            out,
            local,
            output_split_sizes=[int(k) for k in receive],
            input_split_sizes=[int(k) for k in send],
            group=self.group,
            async_op=True,
        )
        return _Pending(work, out)

    def all_to_all(self, rows: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        return self.start_all_to_all(rows, send, receive).wait()

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return tensor
        local = tensor.to(self.device).clone()
        nbytes = local.numel() * local.element_size()
        self._count(nbytes, nbytes)
        dist.all_reduce(local, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return local.to(tensor.device)

    def all_gather_object(self, value: Any) -> List[Any]:
        """Every rank's picklable `value`, in rank order (only where something went wrong, or
        for a policy's extra tensors' layout)."""
        if not self.active:
            return [value]
        out: List[Any] = [None] * self.world
        self.traffic["collectives"] += 1
        dist.all_gather_object(out, value, group=self.group)
        return out

    def raise_if_failed(self, codes: Sequence[int], error: Optional[BaseException], what: str) -> None:
        """Raise on every rank when any rank's code is non-zero. Collective only on failure,
        which every rank sees at once, since they all hold the same codes."""
        failed = [r for r, code in enumerate(codes) if code]
        if not failed:
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        messages = self.all_gather_object(mine)
        kind = _ERRORS[min(int(codes[failed[0]]), len(_ERRORS)) - 1]
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise kind(f"{what} was refused on every rank and changed nothing ({detail})") from error

    def agree(self, code: int, error: Optional[BaseException], value: int, what: str) -> None:
        """All-gather (code, value); raise on every rank if any rank failed or if the values
        differ (one all-gather of 16 bytes per rank)."""
        rows = self.all_gather(torch.tensor([code, value], dtype=torch.int64))
        codes = [int(row[0]) for row in rows]
        self.raise_if_failed(codes, error, what)
        values = [int(row[1]) for row in rows]
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(f"{what}: ranks {differ} differ from rank 0 (same arguments and state on every rank?)")


# ---------------------------------------------------------------------------------------------
# The record of this rank's steps, and its exchange.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Refusal:
    """A refused update()/set_scores() call: its step in the window and why."""

    step: int
    code: int  # _ERRORS index + 1
    call: str
    message: str  # "ValueError: ..."
    error: Optional[BaseException] = None  # the exception itself, on the rank that refused


Schema = Tuple[Tuple[str, str, Tuple[int, ...]], ...]  # (name, torch dtype name, trailing shape) per extra


@dataclass
class _Window:
    """The steps one rank recorded between two exchange points, as they leave it."""

    codes: List[int]  # one per step: rows << 2 | refused << 1 | kind
    index: torch.Tensor  # int64 (R,)
    value: torch.Tensor  # float64 (R,): losses (EMA and deferred policies), new scores otherwise
    extras: Dict[str, torch.Tensor]  # a deferred policy's extra tensors, (R, ...) each
    schema: Optional[Schema]
    refusals: List[_Refusal]
    skipped: int = 0  # non-finite values left out (nonfinite="skip"/"clamp")
    clamped: int = 0
    checked: bool = False  # _validate ran: refused steps hold no rows, values are clean

    @property
    def rows(self) -> int:
        return int(self.index.numel())


class _Recorder:
    """This rank's steps since its last exchange: (index, value[, extras]) rows in buffers
    allocated ahead and grown by doubling. Only sizes the host already knows (the batch's
    shape) decide anything here, and no tensor value is read, so a GPU is never synchronised:
    the step costs two copies (plus one per extra tensor)."""

    def __init__(self) -> None:
        self.floor = 0  # rows to allocate at least (the rank's epoch length, set by iter())
        # the extra tensors' layout, fixed by the first call that brings some (for the sampler's life)
        self.schema: Optional[Schema] = None
        self._clear()

    def _clear(self) -> None:
        self.codes: List[int] = []
        self.rows = 0
        self.capacity = 0
        self.index: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self.extras: Dict[str, torch.Tensor] = {}  # buffers, once a call of the window brought extras
        self.refusals: List[_Refusal] = []
        self.skipped = 0
        self.clamped = 0

    @property
    def steps(self) -> int:
        return len(self.codes)

    def check_extras(self, extra: Dict[str, Any], length: int, policy: ScorePolicy) -> Dict[str, torch.Tensor]:
        """The extra tensors of a policy that runs at the exchange, detached; TypeError or
        ValueError when they cannot travel (one row per example, the same names, dtypes and
        shapes in every call of a window)."""
        out: Dict[str, torch.Tensor] = {}
        for name in sorted(extra):
            t = extra[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{policy!r} runs at the exchange, so update(..., {name}=...) must be a tensor with one row "
                    f"per example, got {type(t).__name__}"
                )
            t = _backend.checked_tensor(t, name)
            if t.dim() == 0 or t.shape[0] != length:
                raise ValueError(f"{name} must have one row per example ({length}), got shape {tuple(t.shape)}")
            out[name] = t.detach()
        schema = tuple((name, str(t.dtype).replace("torch.", ""), tuple(t.shape[1:])) for name, t in out.items())
        if self.schema is not None and schema != self.schema:
            raise TypeError(
                f"the extra tensors {schema} differ from those of this rank's earlier calls since the last "
                f"exchange {self.schema}: pass the same names, dtypes and shapes in every call"
            )
        return out

    def _grow(self, needed: int, idx: torch.Tensor, values: torch.Tensor, extras: Optional[Dict[str, torch.Tensor]]):
        old = 0 if self.index is None else self.index.numel()
        capacity = max(needed, 2 * old, self.floor, 64)
        index = torch.empty(capacity, dtype=torch.int64, device=self.index.device if self.index is not None else idx.device)
        value = torch.empty(
            capacity, dtype=torch.float64, device=self.value.device if self.value is not None else values.device
        )
        if self.rows:
            index[: self.rows].copy_(self.index[: self.rows])
            value[: self.rows].copy_(self.value[: self.rows])
        self.index, self.value, self.capacity = index, value, capacity
        for name, buffer in list(self.extras.items()):
            grown = buffer.new_zeros((capacity, *buffer.shape[1:]))
            grown[: self.rows].copy_(buffer[: self.rows])
            self.extras[name] = grown

    def record(
        self, kind: int, idx: torch.Tensor, values: torch.Tensor, extras: Optional[Dict[str, torch.Tensor]] = None
    ) -> None:
        b, r = idx.numel(), self.rows
        if self.index is None or r + b > self.capacity:
            self._grow(r + b, idx, values, extras)
        self.index[r : r + b].copy_(idx)  # type: ignore[index]
        self.value[r : r + b].copy_(values)  # type: ignore[index]
        if extras is None and not self.extras:  # the usual call: done
            self.rows = r + b
            self.codes.append(b << 2 | kind)
            return
        if extras is not None and not self.extras:  # the window's first call with extras
            self.schema = tuple((n, str(t.dtype).replace("torch.", ""), tuple(t.shape[1:])) for n, t in extras.items())
            capacity = self.index.numel()
            self.extras = {n: t.new_zeros((capacity, *t.shape[1:])) for n, t in extras.items()}
        if extras is not None:
            for name, t in extras.items():
                self.extras[name][r : r + b].copy_(t)
        else:
            for buffer in self.extras.values():
                buffer[r : r + b].zero_()
        self.rows = r + b
        self.codes.append(b << 2 | kind)

    def refuse(self, kind: int, error: BaseException) -> None:
        """Keep a refused call (it records no rows) to report at the next exchange."""
        self.refusals.append(_Refusal(len(self.codes), _code_of(error), _CALLS[kind], f"{type(error).__name__}: {error}", error))
        self.codes.append(_REFUSED | kind)

    def peek(self) -> _Window:
        """The window so far, without closing it."""
        if self.index is None:
            index = torch.empty(0, dtype=torch.int64)
            value = torch.empty(0, dtype=torch.float64)
        else:
            index, value = self.index[: self.rows], self.value[: self.rows]
        return _Window(
            list(self.codes),
            index,
            value,
            {n: t[: self.rows] for n, t in self.extras.items()},
            self.schema if self.extras else None,
            list(self.refusals),
            self.skipped,
            self.clamped,
        )

    def take(self) -> _Window:
        """Close the window: hand its rows over and start an empty one (new buffers, since
        the window's rows may still be in flight)."""
        window = self.peek()
        self._clear()
        return window

    def restore(self, window: _Window) -> None:
        """Start from a saved window (a checkpoint's pending steps)."""
        self._clear()
        if window.rows:
            self.record(_UPDATE, window.index, window.value, window.extras or None)
        self.codes = list(window.codes)
        if window.schema is not None:
            self.schema = window.schema
        self.refusals = list(window.refusals)
        self.skipped, self.clamped = window.skipped, window.clamped


@dataclass
class _Flight:
    """A closed window on its way: its header all-gather, then its payload."""

    window: _Window
    header: _Pending
    all_or_nothing: bool
    headers: Optional[List[List[int]]] = None
    payload: Optional[_Pending] = None
    messages: Optional[List[List[Tuple[int, int, str, str]]]] = None  # per rank, when any refused
    schemas: Optional[List[Optional[Schema]]] = None
    layout: Any = None  # the rows this rank sends, as the layout packs them
    counts: List[int] = field(default_factory=list)  # sharded: rows for each owner


@dataclass
class _Source:
    """What one rank sent for a window, as the applying rank reads it."""

    codes: List[int]  # that rank's steps
    counts: List[int]  # rows of each step that this rank applies
    index: torch.Tensor
    value: torch.Tensor
    extras: Dict[str, torch.Tensor]


def _merge_windows(windows: Sequence[_Window]) -> _Window:
    """One window holding the steps of `windows`, in order (for a checkpoint)."""
    codes: List[int] = []
    refusals: List[_Refusal] = []
    for w in windows:
        refusals += [_Refusal(r.step + len(codes), r.code, r.call, r.message) for r in w.refusals]
        codes += w.codes
    schemas = {w.schema for w in windows if w.schema is not None}
    extras: Dict[str, torch.Tensor] = {}
    schema = next(iter(schemas)) if len(schemas) == 1 else None
    if schema is not None:
        for name, dtype, shape in schema:
            parts = []
            for w in windows:
                part = w.extras.get(name)
                parts.append(part.to(_CPU) if part is not None else torch.zeros((w.rows, *shape), dtype=getattr(torch, dtype)))
            extras[name] = torch.cat(parts)
    return _Window(
        codes,
        torch.cat([w.index.to(_CPU) for w in windows]),
        torch.cat([w.value.to(_CPU) for w in windows]),
        extras,
        schema,
        refusals,
        sum(w.skipped for w in windows),
        sum(w.clamped for w in windows),
    )


@dataclass
class _Report:
    """A refused call as every rank reports it."""

    step: int
    rank: int
    code: int
    call: str
    message: str
    error: Optional[BaseException] = None


@dataclass
class _Reports:
    """The refusals an exchange found: those whose messages travelled, and how many more."""

    listed: List[_Report] = field(default_factory=list)
    unlisted: int = 0


class _Exchanger:
    """What both layouts share: this rank's record of its ``update``/``set_scores`` calls,
    and their exchange (see the module docstring).

    A closed window travels in two collectives: an all-gather of a fixed header (its sizes,
    refusal and non-finite counts; with ``exchange=K`` launched asynchronously at a boundary
    and read at the next one), then its rows (launched once every rank knows every size, and
    read, with ``exchange=K``, one boundary later). The applying rank then replays every
    rank's steps in (step, rank) order, one ``apply_update`` per step as the per-step
    exchange does, so every mode applies the same calls in the same order.

    A layout sets ``comm``, ``local`` (its ImportanceSampler), ``limit`` (the range of the
    indices), ``offset`` (the first item it holds) and provides ``_route``,
    ``_start_payload`` and ``_read_payload``.
    """

    comm: _Group
    local: ImportanceSampler
    limit: int
    offset: int

    def _init_exchange(self, exchange: Union[str, int], deferred_policy: bool) -> None:
        self.exchange: Union[str, int] = exchange if self.comm.active else "step"
        # a policy that needs the previous score and is not an EMA runs where it is applied
        self.deferred_policy = deferred_policy
        self.recorder = _Recorder()
        self.in_flight: Deque[_Flight] = collections.deque()
        self.stage = self.comm.device if self.comm.active else self.local.device
        self.timing = {"exchanges": 0, "exchange_seconds": 0.0, "draw_seconds": 0.0}
        self._cursor: Optional[Tuple[Any, int, int, Iterator[int]]] = None

    # -- where this rank's iteration of an epoch stands ---------------------------------------
    def _iterate(self, current: Any, chunks: Iterator[Tuple[int, List[int]]]) -> Iterator[int]:
        """Yield the items of `chunks` ((first, items): this rank's items first, first + 1, ...
        of `current`) at the speed of a list iterator, with no Python work per item, as
        DistributedSampler does; how far it got is read from the iterator when asked (_sync)."""

        def lists() -> Iterator[Iterator[int]]:
            for first, items in chunks:
                it = iter(items)
                self._cursor = (current, first, len(items), it)
                yield it

        return itertools.chain.from_iterable(lists())

    def _sync(self) -> None:
        """Write how many items this rank's iterator has yielded into its epoch's position."""
        if self._cursor is not None:
            current, first, total, it = self._cursor
            self._set_position(current, first + total - operator.length_hint(it))

    def _set_position(self, current: Any, yielded: int) -> None:
        raise NotImplementedError

    # -- recording ------------------------------------------------------------------------
    def record_update(self, indices: Any, losses: Any, extra: Dict[str, Any]) -> None:
        if not self.comm.active:  # one process: nothing to exchange
            self.local.update(indices, losses, **extra)
            return
        recorder, policy = self.recorder, self.local.score_policy
        try:  # (nothing recorded keeps an autograd graph: the conversions detach)
            idx = _backend.as_indices(indices, _device_of(indices))
            if policy.keep is None and not self.deferred_policy:
                values = self._policy_scores(idx, _as_losses(losses, idx.numel(), _device_of(losses)), extra)
            elif (
                type(losses) is torch.Tensor
                and losses.dim() == 1
                and losses.shape[0] == idx.numel()
                and losses.is_floating_point()
                and losses.layout is torch.strided
                and not losses.is_neg()
            ):
                values = losses.detach()  # a loss as it comes: the record's float64 buffer converts it
            else:
                values = _as_losses(losses, idx.numel(), _device_of(losses))
            extras = recorder.check_extras(extra, idx.numel(), policy) if self.deferred_policy else None
        except Exception as error:  # kept and reported on every rank at the exchange
            recorder.refuse(_UPDATE, error)
        else:
            recorder.record(_UPDATE, idx, values, extras)
        self._recorded()

    def record_set(self, indices: Any, scores: Any) -> None:
        if not self.comm.active:
            self.local.set_scores(indices, scores)
            return
        recorder = self.recorder
        try:
            idx = _backend.as_indices(indices, _device_of(indices))
            values = _as_losses(scores, idx.numel(), _device_of(scores), name="scores")
        except Exception as error:
            recorder.refuse(_SET, error)
        else:
            recorder.record(_SET, idx, values)
        self._recorded()

    def _policy_scores(self, idx: torch.Tensor, losses: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        """New scores of a policy that needs no previous score (grad_norm), computed now, on
        the rank that holds its inputs (the logits): only the scores travel."""
        policy = self.local.score_policy
        # a policy that looks items up must not read outside its table; the exchange refuses such a step
        safe = torch.where((idx >= 0) & (idx < self.limit), idx, torch.zeros_like(idx))
        with torch.no_grad():
            new = policy(losses, None, safe, **extra)
        if not isinstance(new, torch.Tensor) or new.shape != losses.shape:
            raise TypeError(f"{policy!r} must return a tensor of shape {tuple(losses.shape)}")
        return new.detach().to(torch.float64)

    def _recorded(self) -> None:
        if self.exchange == "step":
            self._exchange_now()
        elif self.exchange != "epoch" and self.recorder.steps >= self.exchange:
            self._boundary()

    # -- exchange points ------------------------------------------------------------------
    def flush(self) -> None:
        """Exchange and apply every recorded step of every rank now (a collective), then
        raise the first refused call, if any, on every rank."""
        if self.exchange == "step":
            return  # nothing is ever left pending
        reports = _Reports()
        while self.in_flight:
            self._finish(self.in_flight.popleft(), reports)
        self._finish(self._launch(self.recorder.take(), all_or_nothing=False), reports)
        self._raise(reports, all_or_nothing=False)

    def _exchange_now(self) -> None:
        """exchange="step": this call's step, on every rank, applied whole or not at all."""
        reports = _Reports()
        self._finish(self._launch(self.recorder.take(), all_or_nothing=True), reports)
        self._raise(reports, all_or_nothing=True)

    def _boundary(self) -> None:
        """exchange=K, every K calls: each window in flight moves one stage on (the oldest
        is applied), and this one leaves."""
        reports = _Reports()
        for flight in list(self.in_flight):
            if flight.payload is None:
                self._settle(flight)
                self._start_payload(flight)
            else:
                self.in_flight.popleft()
                self._apply(flight, reports)
        self.in_flight.append(self._launch(self.recorder.take(), all_or_nothing=False))
        self._raise(reports, all_or_nothing=False)

    def drain(self) -> None:
        """Wait for the collectives in flight, without moving any window on (before the
        windows are dropped: every rank launched them, so they complete)."""
        for flight in self.in_flight:
            flight.header.wait()
            if flight.payload is not None:
                flight.payload.wait()

    # -- the stages of a window -------------------------------------------------------------
    def _launch(self, window: _Window, all_or_nothing: bool) -> _Flight:
        started = time.perf_counter()
        self._validate(window)
        layout, counts = self._route(window)
        first = window.refusals[0] if window.refusals else None
        common = [
            window.rows,
            len(window.codes),
            int(layout.shape[1]) if layout.dim() == 2 else 0,
            first.code if first else 0,
            first.step if first else 0,
            len(window.refusals),
            window.skipped,
            window.clamped,
            _fingerprint([list(map(list, window.schema))]) if window.schema else 0,
        ]
        flight = _Flight(window, self._start_header(common, counts), all_or_nothing)
        flight.layout, flight.counts = layout, counts
        self.timing["exchange_seconds"] += time.perf_counter() - started
        return flight

    def _settle(self, flight: _Flight) -> None:
        """Read every rank's header; their refusal messages (and extra tensors' layouts) travel
        now, only where some rank has any."""
        started = time.perf_counter()
        flight.headers = self._read_header(flight.header.wait())
        if any(h[_H_REFUSALS] for h in flight.headers):
            mine = [(r.step, r.code, r.call, r.message) for r in flight.window.refusals[:_MESSAGES]]
            flight.messages = self.comm.all_gather_object(mine)
        if any(h[_H_SCHEMA] for h in flight.headers):
            flight.schemas = self.comm.all_gather_object(flight.window.schema)
        self.timing["exchange_seconds"] += time.perf_counter() - started
        if flight.all_or_nothing and flight.messages is not None:
            reports = _Reports()
            self._collect_refusals(flight, reports)
            self._raise(reports, all_or_nothing=True)

    def _finish(self, flight: _Flight, reports: _Reports) -> None:
        if flight.headers is None:
            self._settle(flight)
        if flight.payload is None:
            self._start_payload(flight)
        self._apply(flight, reports)

    def _apply(self, flight: _Flight, reports: _Reports) -> None:
        started = time.perf_counter()
        assert flight.headers is not None
        self._apply_steps(self._read_payload(flight), reports, flight.all_or_nothing)
        skipped = sum(h[_H_SKIPPED] for h in flight.headers)
        clamped = sum(h[_H_CLAMPED] for h in flight.headers)
        if skipped or clamped:
            self.local._count_nonfinite(skipped, clamped, self.local._epoch_info())
        self._collect_refusals(flight, reports)
        self.timing["exchanges"] += 1
        self.timing["exchange_seconds"] += time.perf_counter() - started

    def _collect_refusals(self, flight: _Flight, reports: _Reports) -> None:
        if flight.messages is None:
            return
        assert flight.headers is not None
        mine = {r.step: r.error for r in flight.window.refusals}
        for rank, (header, messages) in enumerate(zip(flight.headers, flight.messages)):
            for step, code, call, message in messages:
                error = mine.get(step) if rank == self.comm.rank else None
                reports.listed.append(_Report(step, rank, code, call, message, error))
            reports.unlisted += header[_H_REFUSALS] - len(messages)

    def _raise(self, reports: _Reports, all_or_nothing: bool) -> None:
        if not reports.listed:
            return
        ordered = sorted(reports.listed, key=lambda r: (r.step, r.rank))
        first = ordered[0]
        kind = _ERRORS[min(max(first.code, 1), len(_ERRORS)) - 1]
        cause = next((r.error for r in ordered if r.error is not None), None)
        if all_or_nothing:
            by_rank: Dict[int, _Report] = {}
            for report in ordered:
                by_rank.setdefault(report.rank, report)
            detail = "; ".join(f"rank {r}: {report.message}" for r, report in sorted(by_rank.items()))
            raise kind(f"{first.call} was refused on every rank and changed nothing ({detail})") from cause
        others = len(ordered) - 1 + reports.unlisted
        where = "after the exchange" if first.step < 0 else f"call {first.step + 1} since the exchange before"
        text = (
            f"{first.call} on rank {first.rank} ({where}) was refused and changed nothing: {first.message}"
            + (f"; and {others} more refused call(s)" if others else "")
            + ". Every accepted call was applied; this is raised on every rank at the exchange"
        )
        raise kind(text) from cause

    # -- checks, on the rank that recorded ------------------------------------------------------
    def _validate(self, w: _Window) -> None:
        """Check a closed window's rows as update() and set_scores() check a batch, all at
        once, here (the sender, so that a refusal is known to every rank with the header): a
        step with an index outside [0, limit), a negative score given to set_scores, or a
        non-finite value under nonfinite="raise" is refused and keeps no rows; "skip" and
        "clamp" leave out or clamp non-finite values as ImportanceSampler does. The values of
        a policy that runs at the exchange are checked there. Idempotent."""
        local, device = self.local, self.stage
        lengths = [c >> 2 for c in w.codes]
        steps, rows = len(lengths), sum(lengths)
        index, value, extras = w.index.to(device), w.value.to(device), dict(w.extras)
        if rows:
            step_cpu = torch.repeat_interleave(torch.arange(steps), torch.tensor(lengths, dtype=torch.int64))
            step_of_row = step_cpu.to(device)
            is_set = torch.tensor([c & 1 == _SET for c in w.codes], dtype=torch.bool)[step_cpu].to(device)
            judged = is_set if self.deferred_policy else torch.ones_like(is_set)
            outside = (index < 0) | (index >= self.limit)
            nonfinite = ~torch.isfinite(value) & judged
            negative = (value < 0) & is_set
            flags = torch.stack([outside, nonfinite, negative]).to(torch.int64)
            counts = torch.zeros((3, steps), dtype=torch.int64, device=device).index_add_(1, step_of_row, flags)
            outside_n, nonfinite_n, negative_n = counts.tolist()
            refused = [False] * steps
            start = 0
            for k, n in enumerate(lengths):
                a, start = start, start + n
                if not n or not (outside_n[k] or negative_n[k] or (nonfinite_n[k] and local.nonfinite == "raise")):
                    continue
                refused[k] = True
                kind = w.codes[k] & 1
                error = self._refusal(kind, index[a:start], value[a:start], outside[a:start], nonfinite[a:start])
                w.refusals.append(_Refusal(k, _code_of(error), _CALLS[kind], f"{type(error).__name__}: {error}", error))
            drop = torch.tensor(refused, dtype=torch.bool)[step_cpu].to(device)
            if local.nonfinite != "raise" and any(nonfinite_n):
                bad = nonfinite & ~drop
                if local.nonfinite == "clamp":  # +-inf -> +-clamp_value; NaN has nothing to clamp to: skipped
                    value = torch.where(bad, value.clamp(-local.clamp_value, local.clamp_value), value)
                    nan = torch.isnan(value) & bad
                    nans = int(nan.sum())
                    w.clamped += int(bad.sum()) - nans
                    w.skipped += nans
                    drop = drop | nan
                else:
                    w.skipped += int(bad.sum())
                    drop = drop | bad
            if bool(drop.any()):
                keep = ~drop
                index, value = index[keep], value[keep]
                extras = {name: t[keep.to(t.device)] for name, t in extras.items()}
                kept = torch.bincount(step_of_row[keep], minlength=steps).tolist()
                w.codes = [kept[k] << 2 | (w.codes[k] & 1) | (_REFUSED if refused[k] or w.codes[k] & _REFUSED else 0) for k in range(steps)]
        w.index, w.value, w.extras = index, value, extras
        w.refusals.sort(key=lambda r: r.step)
        w.checked = True

    def _refusal(
        self, kind: int, idx: torch.Tensor, values: torch.Tensor, outside: torch.Tensor, nonfinite: torch.Tensor
    ) -> Exception:
        """The exception ImportanceSampler would raise for this batch (the first failed check)."""
        if bool(outside.any()):
            return IndexError(f"indices {idx[outside][:5].tolist()} are outside [0, {self.limit})")
        if kind == _SET:
            negative = values < 0
            if bool(negative.any()):
                return ValueError(
                    f"scores must be >= 0: items {idx[negative][:5].tolist()} were given "
                    f"{values[negative][:5].tolist()}; the scores are unchanged"
                )
        given = "losses" if kind == _UPDATE and self.local.score_policy.keep is not None else "scores"
        return ValueError(
            f"{int(nonfinite.sum())} non-finite score(s) (items {idx[nonfinite][:5].tolist()}, {given} "
            f"{values[nonfinite][:5].tolist()}); the scores are unchanged. "
            "Pass nonfinite='skip' (leave such items out) or 'clamp' (inf becomes +-clamp_value)."
        )

    # -- applying ---------------------------------------------------------------------------
    def _apply_steps(self, sources: List[_Source], reports: _Reports, all_or_nothing: bool) -> None:
        """Replay the window's steps: step k of every rank, in rank order, as one update
        (then one set_scores, when some rank set scores at that step)."""
        local, offset = self.local, self.offset
        starts = [0] * len(sources)
        for k in range(max((len(s.codes) for s in sources), default=0)):
            updates: List[Tuple[int, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]] = []
            sets: List[Tuple[torch.Tensor, torch.Tensor]] = []
            any_update = any_set = False
            for rank, source in enumerate(sources):
                if k >= len(source.codes):
                    continue
                code, a = source.codes[k], starts[rank]
                b = starts[rank] = a + source.counts[k]
                if code & _REFUSED:
                    continue
                if code & 1 == _SET:
                    any_set = True
                    if b > a:
                        sets.append((source.index[a:b], source.value[a:b]))
                else:
                    any_update = True
                    if b > a:
                        extras = {name: t[a:b] for name, t in source.extras.items()}
                        updates.append((rank, source.index[a:b], source.value[a:b], extras))
            if any_update:
                self._apply_update_step(k, updates, reports, all_or_nothing)
            if any_set:
                idx = torch.cat([i for i, _ in sets]) if sets else torch.empty(0, dtype=torch.int64, device=local.device)
                val = torch.cat([v for _, v in sets]) if sets else torch.empty(0, dtype=torch.float64, device=local.device)
                local.set_scores(idx - offset if offset else idx, val)  # checked: only clean values reach it

    def _apply_update_step(
        self,
        step: int,
        updates: List[Tuple[int, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]],
        reports: _Reports,
        all_or_nothing: bool,
    ) -> None:
        local = self.local
        if self.deferred_policy:
            # The policy reads each item's score from before this step, as on the rank that
            # called update() in the per-step exchange: prepare every rank's batch, then write.
            prepared, failed = [], []
            for rank, idx, losses, extras in updates:
                try:
                    prepared.append(local.prepare_update(idx, losses, **extras))
                except Exception as error:  # the same on every replica: each refuses this call
                    failed.append(_Report(step, rank, _code_of(error), "update()", f"{type(error).__name__}: {error}"))
            reports.listed += failed
            if failed and all_or_nothing:
                return
            parts = [(u.indices, u.values) for u in prepared]
            skipped = sum(u.skipped for u in prepared)
        else:
            parts = [(idx - self.offset if self.offset else idx, val) for _, idx, val, _ in updates]
            skipped = 0
        if parts:
            idx, val = torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts])
        else:
            idx = torch.empty(0, dtype=torch.int64, device=local.device)
            val = torch.empty(0, dtype=torch.float64, device=local.device)
        local.apply_update(ScoreUpdate(idx, val, skipped))

    # -- what a checkpoint keeps -------------------------------------------------------------
    def pending_state(self) -> Optional[Dict[str, Any]]:
        """This rank's steps not yet applied (in flight or still recorded), or None."""
        windows = [f.window for f in self.in_flight] + [self.recorder.peek()]
        windows = [w for w in windows if w.codes or w.refusals or w.skipped or w.clamped]
        if not windows:
            return None
        w = _merge_windows(windows)
        return {
            "rank": self.comm.rank,
            "world_size": self.comm.world,
            "codes": torch.tensor(w.codes, dtype=torch.int64),
            "index": w.index.clone(),
            "value": w.value.clone(),
            "schema": None if w.schema is None else [[n, d, list(s)] for n, d, s in w.schema],
            "extras": {name: t.clone() for name, t in w.extras.items()},
            "refusals": [[r.step, r.code, r.call, r.message] for r in w.refusals],
            "skipped": w.skipped,
            "clamped": w.clamped,
        }

    def check_pending(self, saved: Any) -> Optional[_Window]:
        """A saved ``pending_state`` as a window, or ValueError/TypeError (changes nothing)."""
        if saved is None:
            return None
        if not isinstance(saved, dict):
            raise TypeError(f"state['pending'] must be a dict or None, got {type(saved).__name__}")
        if saved.get("rank") != self.comm.rank or saved.get("world_size") != self.comm.world:
            raise ValueError(
                f"the state holds the unexchanged updates of rank {saved.get('rank')} of {saved.get('world_size')}, "
                f"and this is rank {self.comm.rank} of {self.comm.world}: a state saved before its updates were "
                "exchanged resumes only on the rank that saved it (each rank saves and loads its own), or call "
                "flush() on every rank before rank 0 saves one state for all"
            )
        if self.exchange == "step":
            where = "with exchange='step'" if self.comm.active else "without a process group (one process)"
            raise ValueError(
                f"the state holds updates not yet exchanged, which a sampler {where} never keeps: load it, on "
                "the rank that saved it, into one with exchange='epoch' or a number of steps, then flush()"
            )
        codes_t = saved.get("codes")
        if not isinstance(codes_t, torch.Tensor) or codes_t.dtype != torch.int64 or codes_t.dim() != 1:
            raise ValueError("state['pending']['codes'] must be a 1-D int64 tensor")
        codes = codes_t.tolist()
        if any(c < 0 for c in codes):
            raise ValueError("state['pending']['codes'] holds a negative step code")
        rows = sum(c >> 2 for c in codes)
        index, value = saved.get("index"), saved.get("value")
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.int64 and index.shape == (rows,)):
            raise ValueError(f"state['pending']['index'] must be an int64 tensor of {rows} rows")
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.shape == (rows,)):
            raise ValueError(f"state['pending']['value'] must be a float64 tensor of {rows} rows")
        schema: Optional[Schema] = None
        extras: Dict[str, torch.Tensor] = {}
        if saved.get("schema") is not None:
            try:
                schema = tuple((str(n), str(d), tuple(int(x) for x in s)) for n, d, s in saved["schema"])
                dtypes = [getattr(torch, d) for _, d, _ in schema]
            except (TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"state['pending']['schema'] is not a layout of extra tensors: {error}") from None
            given = saved.get("extras")
            for (name, _, shape), dtype in zip(schema, dtypes):
                t = given.get(name) if isinstance(given, dict) else None
                if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == (rows, *shape)):
                    raise ValueError(f"state['pending']['extras'][{name!r}] does not match its layout")
                extras[name] = t.clone()
        refusals = []
        for entry in saved.get("refusals", []):
            try:
                step, code, call, message = entry
                refusals.append(_Refusal(int(step), int(code), str(call), str(message)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"state['pending']['refusals'] holds a malformed entry: {error}") from None
            if not 1 <= refusals[-1].code <= len(_ERRORS):
                raise ValueError(f"state['pending']['refusals'] holds an unknown error code {refusals[-1].code}")
        skipped, clamped = saved.get("skipped", 0), saved.get("clamped", 0)
        skipped = _backend.check_count(skipped, "state['pending']['skipped']")
        clamped = _backend.check_count(clamped, "state['pending']['clamped']")
        return _Window(codes, index.clone(), value.clone(), extras, schema, refusals, skipped, clamped)

    def restore_pending(self, window: Optional[_Window]) -> None:
        """After a load: drop what was in flight (every rank does) and start from `window`."""
        self.drain()
        self.in_flight.clear()
        if window is None:
            self.recorder.take()
        else:
            self.recorder.restore(window)

@dataclass
class _ShardEpoch:
    """A sharded epoch as this rank sees it: its items in order and their weights."""

    epoch: int
    order: torch.Tensor  # int64 (L,), global indices
    weights: Optional[torch.Tensor]  # float64 (L,), aligned with order; None = all 1
    position: int = 0
    info: Dict[str, Any] = field(default_factory=dict)
    sorted_items: Optional[torch.Tensor] = None  # order sorted, for weights() look-ups
    sorted_weights: Optional[torch.Tensor] = None


def _check_policy_sharded(policy: ScorePolicy) -> None:
    if policy.keep is None and policy.needs_previous:
        raise ValueError(
            f"{policy!r} needs the previous score and is not an EMA (keep=None): in sharded mode the "
            "previous score lives on the owner and the extra inputs on the sender; use sharded=False"
        )


class _Replicated(_Exchanger):
    """Every rank holds an identical ImportanceSampler; ranks take strided parts of its epochs."""

    def __init__(self, comm: _Group, drop_last: bool, options: Dict[str, Any], exchange: Union[str, int]) -> None:
        self.comm = comm
        self.drop_last = drop_last
        self.local = ImportanceSampler(**options)
        self.num_items = self.limit = self.local.num_items
        self.offset = 0
        policy = self.local.score_policy
        self._init_exchange(exchange, deferred_policy=policy.keep is None and policy.needs_previous)

    # -- lengths and epochs ---------------------------------------------------------------
    def rank_length(self, length: int) -> int:
        return _rank_length(length, self.comm.world, self.drop_last)

    def length(self) -> int:
        self._sync()
        current = self.local.active_epoch  # never draws: the next epoch's length is known ahead
        return self.rank_length(current.order.numel()) if current is not None else self.epoch_length(self.local.epoch)

    def epoch_length(self, epoch: int) -> int:
        length = self.local.epoch_length(epoch)
        assert length is not None  # ImportanceSampler knows every epoch's length
        return self.rank_length(length)

    @property
    def warmup_epochs(self) -> int:
        return self.local.warmup_epochs

    def set_epoch(self, epoch: int) -> None:
        self.local.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        self._sync()
        return self.local.epoch

    def iter(self) -> Iterator[int]:
        # EpochSampler.__iter__, with this rank's part of the order instead of all of it, drawn
        # once every rank's updates of the epoch before it are in.
        self._sync()
        self.flush()
        started = time.perf_counter()
        current = self.local.begin_epoch()
        self.timing["draw_seconds"] += time.perf_counter() - started
        self.recorder.floor = self.rank_length(current.order.numel())
        return self._yield_from(current)

    def _yield_from(self, current: Epoch) -> Iterator[int]:
        world, n = self.comm.world, current.order.numel()
        length = self.rank_length(n)
        start = current.position // world
        if start >= length:
            current.position = n
            return iter(())

        def chunks() -> Iterator[Tuple[int, List[int]]]:
            for first in range(start, length, _CHUNK):
                positions = _rank_positions(n, world, self.comm.rank, self.drop_last, first, first + _CHUNK)
                yield first, current.order[positions.to(current.order.device)].tolist()

        return self._iterate(current, chunks())

    def _set_position(self, current: Epoch, yielded: int) -> None:
        # The inner epoch's position counts global items, W per item of this rank (all ranks
        # step together), or n at its end, so that its state_dict and an exact resume work.
        n = current.order.numel()
        current.position = n if yielded >= self.rank_length(n) else yielded * self.comm.world

    # -- the exchange, as this layout sends and reads it -------------------------------------
    def _route(self, w: _Window) -> Tuple[torch.Tensor, List[int]]:
        """Rows as they travel to every rank: index, value bits, then the extra tensors' bytes."""
        columns = [w.index.view(-1, 1), w.value.view(torch.int64).view(-1, 1)]
        for name, _, _ in w.schema or ():
            columns.append(_pack(w.extras[name].to(self.stage)))
        return torch.cat(columns, dim=1), []

    def _start_header(self, common: List[int], counts: List[int]) -> _Pending:
        """All-gather of the header (72 bytes per rank)."""
        return self.comm.start_all_gather(torch.tensor(common, dtype=torch.int64))

    @staticmethod
    def _read_header(gathered: List[torch.Tensor]) -> List[List[int]]:
        return [row.tolist() for row in gathered]

    @staticmethod
    def _sizes(headers: List[List[int]]) -> Tuple[int, int, int]:
        """Steps, rows and words per row of the widest rank: every rank's part is padded to them."""
        return (
            max(h[_H_STEPS] for h in headers),
            max(h[_H_ROWS] for h in headers),
            max(max(h[_H_WORDS] for h in headers), 2),
        )

    def _start_payload(self, flight: _Flight) -> None:
        """All-gather of every rank's step codes and rows (8 (S + w R) bytes per rank)."""
        assert flight.headers is not None
        steps, rows, words = self._sizes(flight.headers)
        if not steps:
            flight.payload = _Pending(None, None)
            return
        payload = torch.zeros(steps + rows * words, dtype=torch.int64, device=self.stage)
        codes = flight.window.codes
        if codes:
            payload[: len(codes)] = torch.tensor(codes, dtype=torch.int64)
        mine: torch.Tensor = flight.layout
        if mine.shape[0]:
            payload[steps : steps + mine.shape[0] * words].view(mine.shape[0], words)[:, : mine.shape[1]] = mine
        flight.payload = self.comm.start_all_gather(payload)

    def _read_payload(self, flight: _Flight) -> List[_Source]:
        assert flight.headers is not None and flight.payload is not None
        parts = flight.payload.wait()
        if parts is None:
            return []
        steps, _, words = self._sizes(flight.headers)
        device, sources = self.local.device, []
        for rank, (header, part) in enumerate(zip(flight.headers, parts)):
            codes = part[: header[_H_STEPS]].tolist()
            block = part[steps : steps + header[_H_ROWS] * words].view(header[_H_ROWS], words).to(device)
            extras: Dict[str, torch.Tensor] = {}
            schema = flight.schemas[rank] if flight.schemas else None
            column = 2
            for (name, dtype, shape), width in zip(schema or (), _words(schema)):
                extras[name] = _unpack(block[:, column : column + width], getattr(torch, dtype), shape)
                column += width
            index, value = block[:, 0].contiguous(), block[:, 1].contiguous().view(torch.float64)
            sources.append(_Source(codes, [c >> 2 for c in codes], index, value, extras))
        return sources

    # -- scores ---------------------------------------------------------------------------
    def weights(self, indices: Any, dtype: Optional[torch.dtype], device: Optional[DeviceLike]) -> torch.Tensor:
        return self.local.weights(indices, dtype=dtype, device=device)

    def scores(self) -> torch.Tensor:
        return self.local.scores()

    def probabilities(self) -> torch.Tensor:
        return self.local.probabilities()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, consumed: Optional[int]) -> Dict[str, Any]:
        self._sync()
        inner, world = self.local, self.comm.world
        position = None
        if consumed is not None:
            consumed = _backend.check_count(consumed, "consumed")
            current = inner.current_epoch
            if current is None:
                raise ValueError("consumed was given but no epoch has been drawn yet")
            n = current.order.numel()
            length = self.rank_length(n)
            if consumed > length:
                raise ValueError(f"consumed={consumed} exceeds this rank's {length} items of the epoch")
            position = n if consumed == length else consumed * world
        return {
            "mode": "replicated",
            "world_size": world,
            "sampler": inner.state_dict(consumed=position),
            "pending": self.pending_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state["sampler"]
        current = saved.get("current") if isinstance(saved, dict) else None
        if current is not None:
            n, position = len(current["order"]), int(current["position"])
            if 0 < position < n and position % self.comm.world:
                raise ValueError(
                    f"the state was saved part-way through an epoch on {state.get('world_size')} ranks, "
                    f"{position} items in, which {self.comm.world} ranks cannot continue evenly: resume "
                    "on as many ranks, or from a checkpoint taken between epochs"
                )
        pending = self.check_pending(state.get("pending"))
        self.local.load_state_dict(saved)  # validates; raises before changing anything
        self._cursor = None
        self.restore_pending(pending)

    def digest(self, full: bool) -> int:
        self._sync()
        inner = self.local
        current = inner.current_epoch
        where = None if current is None else (current.epoch, current.position)
        parts: List[Any] = [inner.epoch, where, inner.counters]
        if full:
            parts.append(_tensor_digest(inner.scores()))
        return _fingerprint(parts)

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.local.history

    @property
    def counters(self) -> Dict[str, int]:
        return self.local.counters


class _Sharded(_Exchanger):
    """Rank r holds items [start_r, end_r) in a local ImportanceSampler (used for its tree,
    score policy and state); epochs are drawn jointly, updates are routed to their owner."""

    def __init__(self, comm: _Group, drop_last: bool, options: Dict[str, Any], exchange: Union[str, int]) -> None:
        self.comm = comm
        self.drop_last = drop_last
        num_items = _backend.check_count(options["num_items"], "num_items")
        if num_items < comm.world:
            raise ValueError(f"sharded mode needs at least one item per rank: {num_items} items, {comm.world} ranks")
        if not options["replacement"]:
            raise ValueError(
                "sharded mode draws with replacement only (each shard descends its tree independently); "
                "use sharded=False for replacement=False"
            )
        self.bounds = _shard_bounds(num_items, comm.world)
        self._inner_bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64)
        self.start, self.end = self.bounds[comm.rank], self.bounds[comm.rank + 1]
        local_options = dict(
            options,
            num_items=self.end - self.start,
            samples_per_epoch=None,
            warmup_epochs=0,
            uniform_mix=0.0,
            weight_exponent=1.0,
            normalize_weights=None,
            _policy_items=num_items,  # a policy's per-item table covers every item, indexed globally
        )
        self.local = ImportanceSampler(**local_options)  # validates every option it shares
        if self.local.transform.epoch_level:
            raise ValueError(
                f"{self.local.transform!r} needs every score at once (global ranks); sharded mode supports "
                "the softmax and proportional transforms"
            )
        _check_policy_sharded(self.local.score_policy)
        self.num_items = num_items
        samples = options["samples_per_epoch"]
        self.samples_per_epoch = num_items if samples is None else _backend.check_count(samples, "samples_per_epoch")
        if self.samples_per_epoch < 1:
            raise ValueError("samples_per_epoch must be at least 1")
        # The options the local sampler does not apply; ImportanceSampler checked their values.
        probe = ImportanceSampler(
            1,
            **{
                k: options[k]
                for k in ("warmup_epochs", "weighting", "uniform_mix", "weight_exponent", "normalize_weights")
            },
        )
        self.warmup_epochs: int = probe.warmup_epochs
        self.weighting: str = probe.weighting
        self.uniform_mix: float = probe.uniform_mix
        self.weight_exponent = options["weight_exponent"]
        self.normalize_weights: Optional[str] = probe.normalize_weights
        self.seed = self.local.seed
        self.device = self.local.device
        self._epoch_exponent = probe._epoch_exponent
        self._next_epoch = 0
        self._current: Optional[_ShardEpoch] = None
        self.history: List[Dict[str, Any]] = []
        self.limit, self.offset = num_items, self.start
        self._init_exchange(exchange, deferred_policy=False)  # _check_policy_sharded refused the others

    @property
    def counters(self) -> Dict[str, int]:
        return self.local.counters

    # -- lengths and epochs ---------------------------------------------------------------
    def epoch_length(self, epoch: int) -> int:
        length = self.num_items if epoch < self.warmup_epochs else self.samples_per_epoch
        return self.rank_length(length)

    def rank_length(self, length: int) -> int:
        return _rank_length(length, self.comm.world, self.drop_last)

    def _resumable(self) -> Optional[_ShardEpoch]:
        current = self._current
        if current is not None and current.epoch == self._next_epoch and current.position < current.order.numel():
            return current
        return None

    def _in_progress(self) -> Optional[_ShardEpoch]:
        current = self._current
        if current is not None and current.epoch == self._next_epoch - 1 and current.position < current.order.numel():
            return current
        return None

    def length(self) -> int:
        self._sync()
        current = self._in_progress() or self._resumable()
        return current.order.numel() if current is not None else self.epoch_length(self._next_epoch)

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = _backend.check_count(epoch, "epoch")

    @property
    def epoch(self) -> int:
        self._sync()
        current = self._in_progress() or self._resumable()
        return current.epoch if current is not None else self._next_epoch

    def iter(self) -> Iterator[int]:
        self._sync()
        self.flush()  # every update of the epoch before reaches its owner first
        current = self._resumable()
        if current is None:
            started = time.perf_counter()
            current = self._draw(self._next_epoch)
            self.timing["draw_seconds"] += time.perf_counter() - started
            self._current = current
            self.history.append(current.info)
        self._next_epoch = current.epoch + 1
        self.recorder.floor = current.order.numel()
        return self._yield_from(current)

    def _yield_from(self, current: _ShardEpoch) -> Iterator[int]:
        chunks = (
            (first, current.order[first : first + _CHUNK].tolist())
            for first in range(current.position, current.order.numel(), _CHUNK)
        )
        return self._iterate(current, chunks)

    def _set_position(self, current: _ShardEpoch, yielded: int) -> None:
        current.position = yielded

    def _rank_generator(self, epoch: int, tag: str) -> torch.Generator:
        # Rank 0 uses ImportanceSampler's seed, so that one rank reproduces it exactly.
        rank = self.comm.rank
        seed = derive_seed(self.seed, epoch, tag) if rank == 0 else derive_seed(self.seed, epoch, tag, rank)
        return torch.Generator().manual_seed(seed)

    def _draw(self, epoch: int) -> _ShardEpoch:
        comm, world, rank = self.comm, self.comm.world, self.comm.rank
        n_local, n = self.end - self.start, self.num_items
        length = self.epoch_length(epoch)
        generator = self._rank_generator(epoch, "epoch")
        if epoch < self.warmup_epochs:
            # Each rank shuffles its own items, padded by repeating the start of its
            # permutation (ranks own N // W or N // W + 1 items): no communication.
            order = torch.randperm(n_local, generator=generator)
            if length != n_local:
                order = order[torch.arange(length) % n_local]
            order = (order + self.start).to(self.device)
            return _ShardEpoch(epoch, order, None, info={"epoch": epoch, "samples": length, "kind": "warmup"})

        # 1. Every shard's log-mass (all-gather of 16 bytes per rank), with a failure flag.
        tree: Union[SumTree, SoftmaxTree] = self.local._tree
        error: Optional[BaseException] = None
        log_mass = -math.inf
        try:
            self.local._check_device()
            if isinstance(tree, SoftmaxTree):
                log_mass = tree.log_total
            else:
                total = tree.total
                log_mass = math.log(total) if total > 0 else -math.inf
        except Exception as caught:
            error = caught
        code = 0 if error is None else _code_of(error)
        rows = comm.all_gather(torch.tensor([float(code), log_mass], dtype=torch.float64))
        comm.raise_if_failed([int(row[0]) for row in rows], error, f"drawing epoch {epoch}")
        log_masses = np.array([float(row[1]) for row in rows])
        top = log_masses.max()
        lam = self.uniform_mix
        if top == -math.inf and lam == 0.0:
            raise ValueError("every item has weight zero: there is nothing to draw")
        shard_p = (
            np.zeros(world)
            if top == -math.inf
            else np.exp(log_masses - (top + math.log(np.exp(log_masses - top).sum())))
        )
        sizes = np.diff(np.array(self.bounds, dtype=np.float64)) / n
        mass = (1.0 - lam) * shard_p + lam * sizes  # P(a draw lands in shard s)

        # 2. How many of rank d's draws come from shard s: one multinomial per rank d, from a
        #    seed every rank shares, so every rank computes the same W x W matrix.
        if world == 1:
            counts = np.array([[length]], dtype=np.int64)
        else:
            rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, "shards")))
            counts = rng.multinomial(length, mass / mass.sum(), size=world)  # counts[d, s]
        mine = int(counts[:, rank].sum())
        offset = int(counts[:, :rank].sum())

        # 3. This shard's draws: one uniform stream shared by all shards, at disjoint offsets
        #    (with one rank this is exactly tree.sample(m, seed=...), as in ImportanceSampler).
        p_shard = float(shard_p[rank])
        u = uniforms(mine, seed=derive_seed(self.seed, epoch, "draw"), offset=offset)
        if p_shard > 0.0 and mine:
            items = tree.sample_from_uniforms(u.to(self.device))
        else:
            items = torch.zeros(mine, dtype=torch.int64, device=self.device)
        if lam > 0.0:
            # a draw in this shard is uniform over the shard with this probability
            share = lam * float(sizes[rank]) / float(mass[rank]) if mass[rank] > 0 else 1.0
            uniform = torch.rand(mine, generator=generator, dtype=torch.float64) < share
            items[uniform.to(self.device)] = torch.randint(n_local, (int(uniform.sum()),), generator=generator).to(
                self.device
            )
            p_tree = (
                tree.probability(items) if p_shard > 0.0 else torch.zeros(mine, dtype=torch.float64, device=self.device)
            )
            p = p_tree * p_shard * (1.0 - lam) + lam / n
        else:
            p = tree.probability(items) * p_shard
        weights = torch.ones_like(p) if self.weighting == "none" else 1.0 / (n * p)
        exponent = self._epoch_exponent(epoch)
        if exponent != 1.0:
            weights = weights.pow(exponent)

        # 4. Deliver: rank d gets counts[d, rank] of these draws (all-to-all of 16 bytes per item).
        pairs = torch.stack([items + self.start, weights.view(torch.int64)], dim=1)
        del u, items, p, weights  # this shard's draws now live in pairs only
        received = comm.all_to_all(pairs, counts[:, rank].tolist(), counts[rank, :].tolist()).to(self.device)
        del pairs
        if world > 1:  # the draws arrive grouped by shard: shuffle them into i.i.d. order
            received = received[torch.randperm(length, generator=self._rank_generator(epoch, "order")).to(self.device)]
        order = received[:, 0].contiguous()
        weights = received[:, 1].contiguous().view(torch.float64)
        del received

        # 5. Global weight range (an all-reduce of 16 bytes), and normalisation if asked for.
        local_max = float(weights.max()) if length else -math.inf
        local_min = float(weights.min()) if length else math.inf
        extremes = comm.all_reduce(torch.tensor([local_max, -local_min], dtype=torch.float64), "max")
        high, low = float(extremes[0]), -float(extremes[1])
        scale = 1.0
        if self.normalize_weights == "max":
            scale = high
        elif self.normalize_weights == "mean":
            if comm.active:
                sums = comm.all_reduce(torch.tensor([float(weights.sum()), float(length)], dtype=torch.float64), "sum")
                scale = float(sums[0]) / float(sums[1])
            else:
                scale = float(weights.mean())
        if self.normalize_weights is not None:
            weights = weights / scale
            high, low = high / scale, low / scale
        sorted_items, permutation = torch.sort(order)
        distinct = int((sorted_items[1:] != sorted_items[:-1]).sum()) + 1 if length else 0
        info = {
            "epoch": epoch,
            "samples": length,
            "kind": "importance",
            "distinct": distinct,  # on this rank
            "local_draws": mine,
            "min_weight": low,
            "max_weight": high,
            "weight_exponent": exponent,
        }
        return _ShardEpoch(
            epoch, order, weights, info=info, sorted_items=sorted_items, sorted_weights=weights[permutation]
        )

    # -- the exchange, as this layout sends and reads it -------------------------------------
    def _route(self, w: _Window) -> Tuple[torch.Tensor, List[int]]:
        """Rows (index, value bits, step) grouped by owner, and how many go to each rank; a
        stable sort keeps each owner's rows in step and batch order."""
        lengths = torch.tensor([c >> 2 for c in w.codes], dtype=torch.int64)
        step = torch.repeat_interleave(torch.arange(len(w.codes)), lengths).to(self.stage)
        owner = torch.bucketize(w.index, self._inner_bounds.to(self.stage), right=True)
        owner, by_owner = torch.sort(owner, stable=True)
        rows = torch.stack([w.index[by_owner], w.value.view(torch.int64)[by_owner], step[by_owner]], dim=1)
        return rows, torch.bincount(owner, minlength=self.comm.world).tolist()

    def _start_header(self, common: List[int], counts: List[int]) -> _Pending:
        """All-to-all: each rank gets the header and how many rows will come to it (80 bytes
        per peer, so O(W) per rank, not the O(W^2) of an all-gather of every count)."""
        rows = torch.tensor([[count, *common] for count in counts], dtype=torch.int64)
        world = self.comm.world
        return self.comm.start_all_to_all(rows, [1] * world, [1] * world)

    @staticmethod
    def _read_header(received: torch.Tensor) -> List[List[int]]:
        """Row s: rank s's header, then the rows it sends here (at _HEADER)."""
        return [row[1:] + row[:1] for row in received.tolist()]

    def _start_payload(self, flight: _Flight) -> None:
        """All-to-all: every rank gets each rank's step codes and the rows it owns (8 (S + 3 n)
        bytes from each rank)."""
        assert flight.headers is not None
        headers, world = flight.headers, self.comm.world
        if not any(h[_H_STEPS] for h in headers):
            flight.payload = _Pending(None, None)
            return
        rows: torch.Tensor = flight.layout
        codes = torch.tensor(flight.window.codes, dtype=torch.int64).to(self.stage)
        counts = flight.counts
        pieces, start = [], 0
        for d in range(world):
            pieces += [codes, rows[start : start + counts[d]].reshape(-1)]
            start += counts[d]
        send = [codes.numel() + 3 * counts[d] for d in range(world)]
        receive = [h[_H_STEPS] + 3 * h[_HEADER] for h in headers]
        flight.payload = self.comm.start_all_to_all(torch.cat(pieces), send, receive)

    def _read_payload(self, flight: _Flight) -> List[_Source]:
        assert flight.headers is not None and flight.payload is not None
        received = flight.payload.wait()
        if received is None:
            return []
        sources, at = [], 0
        for header in flight.headers:
            steps, rows = header[_H_STEPS], header[_HEADER]
            codes = received[at : at + steps].tolist()
            block = received[at + steps : at + steps + 3 * rows].view(rows, 3).to(self.local.device)
            at += steps + 3 * rows
            counts = torch.bincount(block[:, 2], minlength=steps).tolist() if rows else [0] * steps
            index, value = block[:, 0].contiguous(), block[:, 1].contiguous().view(torch.float64)
            sources.append(_Source(codes, counts, index, value, {}))
        return sources

    def _apply_steps(self, sources: List[_Source], reports: _Reports, all_or_nothing: bool) -> None:
        try:
            super()._apply_steps(sources, reports, all_or_nothing)
        except Exception as error:
            # Only this owner failed: every rank hears of it at the next exchange.
            self.recorder.refusals.append(
                _Refusal(-1, _code_of(error), "applying the exchanged updates", f"{type(error).__name__}: {error}", error)
            )

    # -- scores ---------------------------------------------------------------------------
    def weights(self, indices: Any, dtype: Optional[torch.dtype], device: Optional[DeviceLike]) -> torch.Tensor:
        if dtype is not None:
            dtype = _backend.check_float_dtype(dtype)
        if device is not None:
            device = _backend.torch_device(device)
        current = self._current
        if current is None:
            raise RuntimeError("no epoch has been drawn yet: iterate the sampler first")
        idx = _backend.as_indices(indices, self.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_items):
            bad = idx[(idx < 0) | (idx >= self.num_items)][0]
            raise IndexError(f"index {int(bad)} is outside [0, {self.num_items})")
        if current.weights is None:
            out = torch.ones(idx.numel(), dtype=torch.float64, device=self.device)
        else:
            items, weights = current.sorted_items, current.sorted_weights
            assert items is not None and weights is not None  # set with the weights, never alone
            where = torch.searchsorted(items, idx).clamp(max=max(items.numel() - 1, 0))
            found = items[where] == idx if items.numel() else torch.zeros_like(idx, dtype=torch.bool)
            if not bool(found.all()):
                missing = int(idx[~found][0])
                raise ValueError(
                    f"item {missing} was not drawn for this rank in epoch {current.epoch}: it has no weight"
                )
            out = weights[where]
        if dtype is not None or device is not None:
            try:
                out = out.to(dtype=dtype or out.dtype, device=device or out.device)
            except (RuntimeError, AssertionError) as error:  # e.g. torch built without CUDA
                raise ValueError(f"cannot move the weights to device={device}: {error}") from None
        return out

    def scores(self) -> torch.Tensor:
        return self.local.scores()

    def probabilities(self) -> torch.Tensor:
        tree: Union[SumTree, SoftmaxTree] = self.local._tree
        log_mass = (
            tree.log_total if isinstance(tree, SoftmaxTree) else (math.log(tree.total) if tree.total > 0 else -math.inf)
        )
        rows = self.comm.all_gather(torch.tensor([log_mass], dtype=torch.float64))
        log_masses = np.array([float(row[0]) for row in rows])
        top = log_masses.max()
        if top == -math.inf:
            shard = 0.0
        else:
            shard = math.exp(log_mass - (top + math.log(np.exp(log_masses - top).sum())))
        lam = self.uniform_mix
        p = self.local.probabilities() * shard if shard > 0 else torch.zeros(self.end - self.start, dtype=torch.float64)
        return p * (1.0 - lam) + lam / self.num_items if lam else p

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, consumed: Optional[int]) -> Dict[str, Any]:
        self._sync()
        current = self._current
        saved = None
        if current is not None:
            position = current.position if consumed is None else _backend.check_count(consumed, "consumed")
            if position > current.order.numel():
                raise ValueError(f"consumed={position} exceeds this rank's {current.order.numel()} items of the epoch")
            saved = {
                "epoch": current.epoch,
                "order": current.order.clone(),
                "weights": None if current.weights is None else current.weights.clone(),
                "position": position,
                "info": dict(current.info),
            }
        elif consumed is not None:
            raise ValueError("consumed was given but no epoch has been drawn yet")
        next_epoch = self._next_epoch
        if saved is not None and _continues(current.epoch, saved["position"], current.order.numel(), next_epoch):
            next_epoch = current.epoch  # saved part-way: the next iter() continues it (as after loading)
        return {
            "mode": "sharded",
            "world_size": self.comm.world,
            "rank": self.comm.rank,
            "shard": (self.start, self.end),
            "next_epoch": next_epoch,
            "current": saved,
            "history": [dict(entry) for entry in self.history],
            "local": self.local.state_dict(),
            "pending": self.pending_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("world_size") != self.comm.world or state.get("rank") != self.comm.rank:
            raise ValueError(
                f"this state holds rank {state.get('rank')}'s shard of {state.get('world_size')}: in sharded mode "
                f"each rank loads its own state (this is rank {self.comm.rank} of {self.comm.world})"
            )
        current, restored = state.get("current"), None
        if current is not None:
            order = _backend.as_indices(current["order"], self.device)
            weights = current["weights"]
            if weights is not None:
                weights = _backend.as_values(weights, self.device, order.numel(), name="weights")
            position = _backend.check_count(current["position"], "position")
            if position > order.numel() or (
                order.numel() and not (0 <= int(order.min()) and int(order.max()) < self.num_items)
            ):
                raise ValueError("the saved epoch is inconsistent with this sampler")
            restored = _ShardEpoch(int(current["epoch"]), order, weights, position, dict(current.get("info", {})))
            if weights is not None:
                restored.sorted_items, permutation = torch.sort(order)
                restored.sorted_weights = weights[permutation]
        next_epoch = _backend.check_count(state["next_epoch"], "next_epoch")
        pending = self.check_pending(state.get("pending"))
        self.local.load_state_dict(state["local"])  # validates; raises before changing anything
        self._cursor = None
        self.restore_pending(pending)
        self._current = restored
        # An epoch saved part-way is the one the next iter() continues.
        continues = restored is not None and _continues(
            restored.epoch, restored.position, restored.order.numel(), next_epoch
        )
        self._next_epoch = restored.epoch if continues else next_epoch
        self.history = [dict(entry) for entry in state.get("history", [])]

    def digest(self, full: bool) -> int:
        self._sync()
        current = self._current
        where = None if current is None else (current.epoch, current.position)
        return _fingerprint([self._next_epoch, where, self.counters])




class DistributedImportanceSampler(Sampler[int]):
    """ImportanceSampler across the ranks of a process group; a drop-in for DistributedSampler.

    Every rank must construct it with the same arguments (checked: one all-gather). Each
    epoch, rank r yields its part of one global sample: ``len(sampler)`` items, the same on
    every rank, padded by repeating items when the sample does not divide evenly (or cut,
    with ``drop_last``), as DistributedSampler does.

    Args:
        num_items: N, the dataset's length.
        sharded: False (default): every rank holds all N scores. True: rank r holds items
            [start_r, end_r) only (``shard_range``), for N beyond one rank's memory; draws
            with replacement, softmax or proportional transforms.
        exchange: when the recorded (index, value) pairs travel: ``"epoch"`` (default: at
            the next ``iter()`` or ``flush()``; the training step makes no collective and
            reads no tensor on the host), an int K (every K calls, asynchronously, overlapped
            with the next K steps; every rank must then make the same number of calls) or
            ``"step"`` (a collective in every ``update``). All three give the same draws,
            weights, scores and state after each exchange; see the module docstring.
        drop_last: cut the sample to a multiple of the world size instead of padding it.
        num_replicas: the number of ranks; like DistributedSampler's, but it must agree with
            the group. Without an initialised process group the sampler is a single process
            and behaves as ImportanceSampler.
        rank: this process's rank; like DistributedSampler's, but it must agree with the group.
        group: the process group (default: the default group).

    The other arguments (``score``, ``transform``, ``samples_per_epoch``, ``replacement``,
    ``warmup_epochs``, ``weighting``, ``uniform_mix``, ``weight_exponent``,
    ``normalize_weights``, ``initial_score``, ``nonfinite``, ``clamp_value``, ``seed``,
    ``device``) and their defaults are ImportanceSampler's (the recipe: the last loss, in
    proportion, 20% uniform, with replacement, unbiased weights, one warm-up epoch);
    ``samples_per_epoch`` is the size of the global sample. ``DistributedImportanceSampler.paper``
    builds the seed paper's method, as ``ImportanceSampler.paper`` does.

    Costs per call are in the module docstring and ``docs/distributed.md``.
    """

    def __init__(
        self,
        num_items: int,
        *,
        sharded: bool = False,
        exchange: Union[str, int] = "epoch",
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        group: Optional["ProcessGroup"] = None,
        score: Union[str, ScorePolicy] = "last_loss",
        transform: Union[str, Transform] = "proportional",
        samples_per_epoch: Optional[int] = None,
        replacement: bool = True,
        warmup_epochs: int = 1,
        weighting: str = "auto",
        uniform_mix: float = 0.2,
        weight_exponent: Union[float, Callable[[int], float]] = 1.0,
        normalize_weights: Optional[str] = None,
        initial_score: float = 0.0,
        nonfinite: str = "raise",
        clamp_value: float = 1e4,
        seed: int = 0,
        device: DeviceLike = "cpu",
    ) -> None:
        options: Dict[str, Any] = dict(
            num_items=num_items,
            score=score,
            transform=transform,
            samples_per_epoch=samples_per_epoch,
            replacement=replacement,
            warmup_epochs=warmup_epochs,
            weighting=weighting,
            uniform_mix=uniform_mix,
            weight_exponent=weight_exponent,
            normalize_weights=normalize_weights,
            initial_score=initial_score,
            nonfinite=nonfinite,
            clamp_value=clamp_value,
            seed=seed,
            device=device,
        )
        comm = _Group(group, num_replicas, rank, _backend.resolve_device(device))
        self.sharded = bool(sharded)
        self.drop_last = bool(drop_last)
        error: Optional[BaseException] = None
        config: Any = None
        try:
            exchange = _check_exchange(exchange)
            engine_type = _Sharded if self.sharded else _Replicated
            self._engine: Union[_Replicated, _Sharded] = engine_type(comm, self.drop_last, options, exchange)
            # the local sampler's config without the sizes of its shard, which differ by rank
            local_config = dict(self._engine.local._config(), num_items=self._engine.num_items, samples_per_epoch=None)
            config = [
                self.sharded,
                self.drop_last,
                local_config,
                samples_per_epoch,
                warmup_epochs,
                weighting,
                uniform_mix,
                normalize_weights,
                "callable" if callable(weight_exponent) else weight_exponent,
            ]
        except Exception as caught:  # tell the other ranks, which would otherwise wait for us
            error = caught
        # Every rank must exchange alike; a checkpoint loads whatever the exchange setting.
        comm.agree(
            0 if error is None else _code_of(error),
            error,
            _fingerprint([config, None if error else self._engine.exchange]),
            "DistributedImportanceSampler() arguments",
        )
        self._comm = comm
        self._config_digest = _fingerprint(config)

    @classmethod
    def paper(
        cls,
        num_items: int,
        *,
        score: str = "last_loss",
        samples_per_epoch: Optional[int] = None,
        warmup_epochs: Optional[int] = None,
        beta: Optional[float] = None,
        temperature: float = 1.0,
        replacement: bool = False,
        nonfinite: str = "raise",
        clamp_value: float = 1e4,
        seed: int = 0,
        device: DeviceLike = "cpu",
        sharded: bool = False,
        exchange: Union[str, int] = "epoch",
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        group: Optional["ProcessGroup"] = None,
    ) -> "DistributedImportanceSampler":
        """The seed paper's method across the ranks: the arguments of
        ``ImportanceSampler.paper`` (softmax of the scores, Appendix A's |Z| drawn without
        replacement, 1 / (N p) weights, no uniform mixture) and this class's own (``sharded``,
        which needs ``replacement=True``, ``exchange``, ``drop_last``, ``num_replicas``,
        ``rank``, ``group``). ``samples_per_epoch`` is the size of the global sample. What the
        paper-study runner builds under torchrun."""
        options = paper_options(
            num_items, score=score, samples_per_epoch=samples_per_epoch, warmup_epochs=warmup_epochs,
            beta=beta, temperature=temperature, replacement=replacement,
        )
        return cls(
            num_items, **options, nonfinite=nonfinite, clamp_value=clamp_value, seed=seed, device=device,
            sharded=sharded, exchange=exchange, drop_last=drop_last, num_replicas=num_replicas, rank=rank, group=group,
        )

    # -- what DistributedSampler has ------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        return self._comm.world

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def num_items(self) -> int:
        return self._engine.num_items

    @property
    def seed(self) -> int:
        return self._engine.local.seed

    @property
    def device(self) -> torch.device:
        return self._engine.local.device

    @property
    def num_samples(self) -> int:
        """Items this rank yields in the current (or next) epoch: ``len(self)``."""
        return len(self)

    @property
    def total_size(self) -> int:
        """Items all ranks yield together this epoch, padding included."""
        return len(self) * self._comm.world

    @property
    def shard_range(self) -> Tuple[int, int]:
        """The items whose scores this rank holds: (0, N) replicated, (start_r, end_r) sharded."""
        engine = self._engine
        return (engine.start, engine.end) if isinstance(engine, _Sharded) else (0, engine.num_items)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` draw epoch `epoch` (call it on every rank, as for
        DistributedSampler); without it the sampler counts epochs itself. Local. Epochs are
        ints in [0, 2**63): TypeError or ValueError otherwise, and nothing changes."""
        epoch = _backend.check_count(epoch, "epoch")
        if epoch > _MAX_EPOCH:
            raise ValueError(f"epoch must be below 2**63, got {epoch:,}")
        self._engine.set_epoch(epoch)

    @property
    def exchange(self) -> Union[str, int]:
        """When updates travel: "epoch", "step" or every K calls (see the constructor).
        Without a process group, "step" (there is nothing to exchange)."""
        return self._engine.exchange

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or else the one the next ``iter()`` yields."""
        return self._engine.epoch

    @property
    def progress(self) -> Optional[Tuple[int, int]]:
        """(epoch, items this rank has yielded of it) for the epoch being (or last) iterated,
        None before the first. Local. What ``state_dict(consumed=k)`` counts in: a training
        loop behind a prefetching DataLoader passes its own k when k is smaller."""
        engine = self._engine
        engine._sync()
        if isinstance(engine, _Sharded):
            current = engine._current
            return None if current is None else (current.epoch, current.position)
        inner = engine.local.current_epoch
        if inner is None:
            return None
        n = inner.order.numel()
        # the inner position counts global items: W per item of this rank, or n at the end
        yielded = engine.rank_length(n) if inner.position >= n else inner.position // self._comm.world
        return inner.epoch, yielded

    def __len__(self) -> int:
        """Items this rank yields in the epoch being iterated, or else in the next one. Local,
        and never draws: the next epoch is drawn by ``iter()``, after the exchange of every
        update of the epoch before it, whenever ``len`` was asked."""
        return self._engine.length()

    def __iter__(self) -> Iterator[int]:
        """This rank's part of the epoch. First the exchange of every rank's recorded updates
        (a collective, except with ``exchange="step"``, which has none left), then the draw:
        replicated, local, O(m log N); sharded, a collective at the start of each importance
        epoch (see the module docstring). Raises, on every rank, a call refused since the
        last exchange, after applying every other one."""
        return self._engine.iter()

    # -- ImportanceSampler's API ------------------------------------------------------------
    def update(self, indices: Any, losses: Any, **extra: Any) -> None:
        """Hand back this rank's batch of per-example losses (shape (b,); b may differ between
        ranks and be 0; any device, any float dtype, with or without grad).

        ``exchange="epoch"`` (default): local. The pairs are copied into this rank's record,
        on the losses' device, and travel at the next ``iter()`` or ``flush()``; no tensor
        value is read, so a GPU is not synchronised. Every replica (or each item's owner)
        then applies step k of every rank, in rank order, as one update, exactly as
        ``"step"`` applies it at once. ``exchange=K``: the same, with an asynchronous
        exchange every K calls. ``"step"``: a collective; every rank calls it once per step.

        ``extra`` goes to the score policy (``logits=``, ``targets=``): a policy that needs
        no previous score (grad_norm) runs here and only its scores travel; one that needs
        the previous score and is not an EMA (EarlyImportance) runs at the exchange, and the
        extra tensors travel with the losses.

        A bad batch (a non-finite loss with ``nonfinite="raise"``, an index outside [0, N),
        a wrong type or shape, the policy's own error) is refused and changes nothing. With
        ``"step"`` every rank raises now and nothing of the step is applied anywhere;
        otherwise the call returns, and the next exchange raises the same exception class on
        every rank after applying every accepted call.
        """
        self._engine.record_update(indices, losses, extra)

    def set_scores(self, indices: Any, scores: Any) -> None:
        """Write scores directly, without the score policy (``ImportanceSampler.set_scores``):
        for scores computed elsewhere, such as a scoring worker's gradient norms. Checked as
        ``update`` is, and exchanged like it: every replica (or the item's owner) applies
        them in (step, rank) order with the updates. An index outside [0, N) or a negative
        score is refused, and a non-finite one follows ``nonfinite``; a refused call changes
        nothing (reported as for ``update``)."""
        self._engine.record_set(indices, scores)

    def flush(self) -> None:
        """Exchange and apply every rank's recorded updates now: a collective, for a
        checkpoint that rank 0 saves for every rank, or to read ``scores()`` mid-epoch.
        ``iter()`` does it before each draw. Raises, on every rank, a call refused since
        the last exchange (after applying every other one). Nothing to do with
        ``exchange="step"``."""
        self._engine.flush()

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters since construction: ``exchanges`` (windows applied), ``collectives`` and
        the ``bytes_sent`` / ``bytes_received`` by this rank's collectives (drawing and
        checks included), seconds spent exchanging and drawing on this rank, and the steps
        recorded but not yet exchanged (``pending_steps``)."""
        engine = self._engine
        return {
            **engine.timing,
            **engine.comm.traffic,
            "pending_steps": engine.recorder.steps + sum(len(f.window.codes) for f in engine.in_flight),
        }

    def weights(
        self, indices: Any, *, dtype: Optional[torch.dtype] = None, device: Optional[DeviceLike] = None
    ) -> torch.Tensor:
        """Importance weights 1 / (N p_global) of items this rank was given in the current
        epoch, from the probabilities they were drawn with, shape (b,). Local."""
        return self._engine.weights(indices, dtype, device)

    def scores(self) -> torch.Tensor:
        """Scores of the items in ``shard_range``, float64: all N when replicated, as of the
        last exchange (``flush()`` first for this epoch's). Local."""
        return self._engine.scores()

    def probabilities(self) -> torch.Tensor:
        """Global p of the items in ``shard_range`` as the next importance epoch would draw
        them. Replicated: local, all N. Sharded: a collective (all-gather of 8 W bytes)."""
        return self._engine.probabilities()

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One dict per drawn epoch (kind, samples per rank, weight range, ...)."""
        return self._engine.history

    @property
    def counters(self) -> Dict[str, int]:
        """Global updates made and non-finite scores skipped: the same on every rank."""
        return self._engine.counters

    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """Optimizer steps of this rank in the next (or current) epoch for a DataLoader of `batch_size`."""
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        length = len(self)
        return length // batch_size if drop_last else -(-length // batch_size)

    def total_steps(self, num_epochs: int, batch_size: int, *, drop_last: bool = False) -> int:
        """Optimizer steps of each rank over epochs 0 .. num_epochs - 1 (for an LR schedule).
        Local; never draws. Warm-up epochs and importance epochs each have one length, so
        this is a formula, not a loop over the epochs."""
        num_epochs = _backend.check_count(num_epochs, "num_epochs")
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        engine = self._engine
        warmup = min(num_epochs, engine.warmup_epochs)
        steps = warmup * _steps(engine.epoch_length(0), batch_size, drop_last) if warmup else 0
        if num_epochs > warmup:
            steps += (num_epochs - warmup) * _steps(engine.epoch_length(warmup), batch_size, drop_last)
        return steps

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, *, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Everything needed to resume exactly, with this rank's recorded updates that no
        exchange has applied yet (``"pending"``). Local, no communication. Replicated: after
        ``flush()`` on every rank (or with ``exchange="step"``) the same on every rank, so
        rank 0 saves it and every rank loads it; with updates pending it is this rank's, and
        resumes only on this rank (each rank saves and loads its own). Sharded: this rank's
        shard, so every rank saves and loads its own. Pass `consumed` (items of this epoch
        that this rank's training loop has used) when saving mid-epoch behind a prefetching
        DataLoader.
        """
        return {
            "format": _FORMAT,
            "version": _STATE_VERSION,
            "drop_last": self.drop_last,
            "config_digest": self._config_digest,
            **self._engine.state_dict(consumed),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict`` on every rank (a collective: an all-gather of 16 bytes checks
        that every rank loaded the same point of training). A replicated state saved between
        epochs loads on any number of ranks; one saved mid-epoch on as many ranks, or on any
        number that divides the items consumed so far. If any rank refuses its state, every
        rank raises (ranks that did load keep the new state: load again before going on)."""
        error: Optional[BaseException] = None
        try:
            if not isinstance(state, dict):
                raise TypeError(f"state must be a dict, got {type(state).__name__}")
            if state.get("format") != _FORMAT or state.get("version") != _STATE_VERSION:
                raise ValueError(
                    f"not a {_FORMAT} state of version {_STATE_VERSION} "
                    f"(format={state.get('format')!r}, version={state.get('version')!r})"
                )
            mode = "sharded" if self.sharded else "replicated"
            if state.get("mode") != mode or state.get("drop_last") != self.drop_last:
                raise ValueError(
                    f"the state comes from a {state.get('mode')} sampler with drop_last={state.get('drop_last')}, "
                    f"this one is {mode} with drop_last={self.drop_last}"
                )
            if state.get("config_digest") != self._config_digest:
                raise ValueError("the state comes from a sampler constructed with different arguments")
            self._engine.load_state_dict(state)
        except Exception as caught:
            error = caught
        self._comm.agree(
            0 if error is None else _code_of(error),
            error,
            0 if error is not None else self._engine.digest(full=False),
            "load_state_dict()",
        )

    def check_consistency(self) -> None:
        """Exchange every recorded update (``flush()``), then raise RuntimeError unless every
        rank is at the same point (epoch, position, update count) and, replicated, holds
        bit-identical scores. A collective; O(N) to hash the scores (about 1 s per GB), so a
        debugging aid rather than something to call every step."""
        self._engine.flush()
        digest = self._engine.digest(full=True)
        rows = self._comm.all_gather(torch.tensor([digest], dtype=torch.int64))
        values = [int(row[0]) for row in rows]
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise RuntimeError(f"ranks {differ} hold a different sampler state from rank 0")

    def __repr__(self) -> str:
        mode = "sharded" if self.sharded else "replicated"
        return (
            f"DistributedImportanceSampler(num_items={self.num_items}, {mode}, exchange={self.exchange!r}, "
            f"rank={self.rank}, num_replicas={self.num_replicas}, drop_last={self.drop_last}, "
            f"sampler={self._engine.local!r})"
        )
