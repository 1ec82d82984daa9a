"""Importance sampling across DDP ranks over ``torch.distributed``: one global distribution.

    from isample.distributed import DistributedImportanceSampler

    sampler = DistributedImportanceSampler(len(train_set), score="running_loss", seed=0)
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for index, x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            (losses * sampler.weights(index).to(losses)).mean().backward()
            sampler.update(index, losses)  # a collective: every rank calls it once per step
            ...

It is a drop-in for ``DistributedSampler`` with the API of ``ImportanceSampler``. Every rank
yields a disjoint part of one global sample drawn from the global probabilities, all parts
of the same length, and the importance weights are ``1 / (N p_global)``. Two layouts:

- **replicated** (default): every rank holds the whole tree, and ``update`` all-gathers the
  step's (index, loss) pairs so that every replica applies the same updates in rank order.
  All ranks then draw the same global epoch from the shared seed, without communicating.
- **sharded** (``sharded=True``): rank r holds only items [start_r, end_r) (``shard_range``).
  Updates go to their owner (all-to-all); each importance epoch all-gathers the shard masses,
  a multinomial over shards with a shared seed sets how many draws each shard makes for
  each rank, each rank descends its own tree, and an all-to-all delivers the draws. Pick it
  when the replicated tree (16.5 bytes per item for softmax, plus 8 for the epoch's weights)
  does not fit on one rank, or when the W x B updates per step that every replica applies
  cost more than the step (see ``docs/distributed.md``).

Costs, with W ranks, N items, m = samples_per_epoch, B the batch of one rank and
L = ceil(m / W) the per-rank epoch length (bytes are what one rank receives):

=====================  ========================================  =======================================
call                   replicated                                sharded
=====================  ========================================  =======================================
memory per rank        16.5 N + 8 N + 8 m; about 48 m more       16.5 N / W + 32 L; about 24 c_r more
                       while drawing an epoch                    while drawing (c_r: this shard's draws)
``update``, per step   2 all-gathers: 24 W + 16 W max(B) bytes;  2 all-to-alls: 24 W + 16 B bytes on
                       applies W B updates                       average; applies about B updates
``iter``, per epoch    no communication; draws all m items       all-gather 16 W, all-to-all 16 L,
                                                                 all-reduce 16 bytes; draws c_r items
``weights``, ``len``,  local                                     local
``state_dict``
``load_state_dict``    an all-gather of 16 bytes (checks)        an all-gather of 16 bytes (checks)
=====================  ========================================  =======================================

(SumTree-backed transforms hold 8.53 bytes per item in the tree plus 8 for the scores.)
``update``, ``load_state_dict``, ``check_consistency``, sharded ``iter`` and sharded
``probabilities`` are collectives: every rank must call them, in the same order. A bad batch
on any rank (NaN loss, index out of range, wrong type) raises the same exception on every
rank before anything is applied; a rank that stops calling leaves the others waiting only
until the process group's ``timeout`` (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import _backend
from ._backend import DeviceLike
from .sampler import Epoch, ImportanceSampler, ScoreUpdate, _as_losses, derive_seed
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

# A failed check on one rank travels to all ranks as a code, so that every rank raises the
# same exception class (0 = fine).
_ERRORS: Tuple[type, ...] = (ValueError, IndexError, TypeError, RuntimeError)


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


class _Group:
    """The process group a sampler talks over, and the few collectives it uses.

    Without an initialised process group it stands for one process (world size 1) and every
    collective is the identity, so the samplers then behave as ImportanceSampler.
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
            self.active = world > 1
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

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's `tensor` (same shape and dtype on every rank), in rank order."""
        if not self.active:
            return [tensor]
        local = tensor.to(self.device).contiguous()
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        return out

    def all_to_all(self, rows: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        """Send rows[sum(send[:d]) : sum(send[:d + 1])] to rank d; receive receive[s] rows
        from each rank s, concatenated in rank order."""
        if not self.active:
            return rows
        local = rows.to(self.device).contiguous()
        out = local.new_empty((int(sum(receive)), *local.shape[1:]))
        dist.all_to_all_single(
            out,
            local,
            output_split_sizes=[int(k) for k in receive],
            input_split_sizes=[int(k) for k in send],
            group=self.group,
        )
        return out

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return tensor
        local = tensor.to(self.device).clone()
        dist.all_reduce(local, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return local.to(tensor.device)

    def raise_if_failed(self, codes: Sequence[int], error: Optional[BaseException], what: str) -> None:
        """Raise on every rank when any rank's code is non-zero. Collective only on failure,
        which every rank sees at once, since they all hold the same codes."""
        failed = [r for r, code in enumerate(codes) if code]
        if not failed:
            return
        mine = None if error is None else f"{type(error).__name__}: {error}"
        if self.active:
            messages: List[Any] = [None] * self.world
            dist.all_gather_object(messages, mine, group=self.group)
        else:
            messages = [mine]
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


class _Replicated:
    """Every rank holds an identical ImportanceSampler; ranks take strided parts of its epochs."""

    def __init__(self, comm: _Group, drop_last: bool, options: Dict[str, Any]) -> None:
        self.comm = comm
        self.drop_last = drop_last
        self.local = ImportanceSampler(**options)
        self.num_items = self.local.num_items

    # -- lengths and epochs ---------------------------------------------------------------
    def rank_length(self, length: int) -> int:
        return _rank_length(length, self.comm.world, self.drop_last)

    def length(self) -> int:
        current = self.local.active_epoch
        return self.rank_length(current.order.numel() if current is not None else len(self.local))

    def epoch_length(self, epoch: int) -> int:
        return self.rank_length(self.local.epoch_length(epoch))

    def set_epoch(self, epoch: int) -> None:
        self.local.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.local.epoch

    def iter(self) -> Iterator[int]:
        # EpochSampler.__iter__, with this rank's part of the order instead of all of it.
        return self._yield_from(self.local.begin_epoch())

    def _yield_from(self, current: Epoch) -> Iterator[int]:
        # The inner epoch's position counts global items, W per step of this rank (all ranks
        # step together), so that its state_dict and an exact resume keep working.
        world, n = self.comm.world, current.order.numel()
        length = self.rank_length(n)
        start = current.position // world
        if start >= length:
            current.position = n
            return
        for first in range(start, length, _CHUNK):
            positions = _rank_positions(n, world, self.comm.rank, self.drop_last, first, first + _CHUNK)
            items = current.order[positions.to(current.order.device)].tolist()
            for j, item in enumerate(items, first + 1):
                current.position = n if j == length else j * world
                yield item

    # -- scores ---------------------------------------------------------------------------
    def update(self, indices: Any, losses: Any, extra: Dict[str, Any]) -> None:
        inner, comm = self.local, self.comm
        error: Optional[BaseException] = None
        idx = torch.empty(0, dtype=torch.int64, device=inner.device)
        values = torch.empty(0, dtype=torch.float64, device=inner.device)
        skipped = 0
        try:
            idx, values, skipped = inner.prepare_update(indices, losses, **extra)
        except Exception as caught:  # every rank must hear of it, or the others would wait
            error = caught
        code = 0 if error is None else _code_of(error)
        header = comm.all_gather(torch.tensor([idx.numel() if error is None else 0, code, skipped], dtype=torch.int64))
        rows = [row.tolist() for row in header]
        comm.raise_if_failed([r[1] for r in rows], error, "update()")
        sizes = [r[0] for r in rows]
        if comm.active:
            widest = max(sizes)
            pairs = torch.zeros((2, widest), dtype=torch.int64, device=comm.device)
            pairs[0, : idx.numel()] = idx
            pairs[1, : idx.numel()] = values.contiguous().view(torch.int64)  # the float64 bits, exactly
            gathered = comm.all_gather(pairs) if widest else [pairs] * comm.world
            pairs = torch.cat([g[:, :k] for g, k in zip(gathered, sizes)], dim=1).to(inner.device)
            idx, values = pairs[0].contiguous(), pairs[1].contiguous().view(torch.float64)
        inner.apply_update(ScoreUpdate(idx, values, sum(r[2] for r in rows)))

    def weights(self, indices: Any, dtype: Optional[torch.dtype], device: Optional[DeviceLike]) -> torch.Tensor:
        return self.local.weights(indices, dtype=dtype, device=device)

    def scores(self) -> torch.Tensor:
        return self.local.scores()

    def probabilities(self) -> torch.Tensor:
        return self.local.probabilities()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, consumed: Optional[int]) -> Dict[str, Any]:
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
        return {"mode": "replicated", "world_size": world, "sampler": inner.state_dict(consumed=position)}

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
        self.local.load_state_dict(saved)

    def digest(self, full: bool) -> int:
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


class _Sharded:
    """Rank r holds items [start_r, end_r) in a local ImportanceSampler (used for its tree,
    score policy and state); epochs are drawn jointly, updates are routed to their owner."""

    def __init__(self, comm: _Group, drop_last: bool, options: Dict[str, Any]) -> None:
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
        self._pending: Optional[BaseException] = None  # an owner-side failure, told at the next update

    @property
    def counters(self) -> Dict[str, int]:
        return self.local.counters

    # -- lengths and epochs ---------------------------------------------------------------
    def epoch_length(self, epoch: int) -> int:
        length = self.num_items if epoch < self.warmup_epochs else self.samples_per_epoch
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
        current = self._in_progress() or self._resumable()
        return current.order.numel() if current is not None else self.epoch_length(self._next_epoch)

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = _backend.check_count(epoch, "epoch")

    @property
    def epoch(self) -> int:
        current = self._in_progress() or self._resumable()
        return current.epoch if current is not None else self._next_epoch

    def iter(self) -> Iterator[int]:
        current = self._resumable()
        if current is None:
            current = self._draw(self._next_epoch)
            self._current = current
            self.history.append(current.info)
        self._next_epoch = current.epoch + 1
        return self._yield_from(current)

    @staticmethod
    def _yield_from(current: _ShardEpoch) -> Iterator[int]:
        for first in range(current.position, current.order.numel(), _CHUNK):
            for item in current.order[first : first + _CHUNK].tolist():
                current.position += 1
                yield item

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
            if self._pending is not None:
                pending, self._pending = self._pending, None
                raise RuntimeError(f"the last update() failed on this rank's shard after the exchange: {pending}")
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

    # -- scores ---------------------------------------------------------------------------
    def update(self, indices: Any, losses: Any, extra: Dict[str, Any]) -> None:
        comm, world, local = self.comm, self.comm.world, self.local
        error: Optional[BaseException] = None
        if self._pending is not None:
            error = RuntimeError(f"the last update() failed on this rank's shard after the exchange: {self._pending}")
            self._pending = None
        idx = torch.empty(0, dtype=torch.int64, device=local.device)
        values = torch.empty(0, dtype=torch.float64, device=local.device)
        skipped = 0
        if error is None:
            try:
                idx, values, skipped = local.prepare_update(indices, losses, num_items=self.num_items, **extra)
            except Exception as caught:
                error = caught
        if error is not None:
            idx, values, skipped = idx[:0], values[:0], 0
        # Group the pairs by owner; a stable sort keeps each owner's pairs in batch order.
        owner = torch.bucketize(idx, self._inner_bounds.to(idx.device), right=True)
        owner, by_owner = torch.sort(owner, stable=True)
        idx, values = idx[by_owner], values[by_owner]
        send = torch.bincount(owner, minlength=world).to(_CPU)
        code = 0 if error is None else _code_of(error)
        header = torch.stack([send, torch.full_like(send, code), torch.full_like(send, skipped)], dim=1)
        heard = comm.all_to_all(header, [1] * world, [1] * world).to(_CPU)  # row s: from rank s
        comm.raise_if_failed(heard[:, 1].tolist(), error, "update()")
        pairs = torch.stack([idx, values.view(torch.int64)], dim=1)
        pairs = comm.all_to_all(pairs, send.tolist(), heard[:, 0].tolist()).to(local.device)
        mine = pairs[:, 0] - self.start  # in source-rank order, so the last write wins as in one process
        try:
            local.apply_update(
                ScoreUpdate(mine.contiguous(), pairs[:, 1].contiguous().view(torch.float64), int(heard[:, 2].sum()))
            )
        except Exception as caught:
            # Only this owner failed; the other ranks learn of it at the next update.
            self._pending = caught
            raise

    def weights(self, indices: Any, dtype: Optional[torch.dtype], device: Optional[DeviceLike]) -> torch.Tensor:
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
            out = out.to(dtype=dtype or out.dtype, device=device or out.device)
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
        return {
            "mode": "sharded",
            "world_size": self.comm.world,
            "rank": self.comm.rank,
            "shard": (self.start, self.end),
            "next_epoch": self._next_epoch,
            "current": saved,
            "history": [dict(entry) for entry in self.history],
            "local": self.local.state_dict(),
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
        self.local.load_state_dict(state["local"])  # validates; raises before changing anything
        self._current = restored
        # An epoch saved part-way is the one the next iter() continues.
        self._next_epoch = (
            restored.epoch if restored is not None and restored.position < restored.order.numel() else next_epoch
        )
        self.history = [dict(entry) for entry in state.get("history", [])]
        self._pending = None

    def digest(self, full: bool) -> int:
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
        drop_last: cut the sample to a multiple of the world size instead of padding it.
        num_replicas, rank, group: the process group (default: the default group); like
            DistributedSampler's, but they must agree with the group. Without an initialised
            process group the sampler is a single process and behaves as ImportanceSampler.
        score, transform, samples_per_epoch, replacement, warmup_epochs, weighting,
        uniform_mix, weight_exponent, normalize_weights, initial_score, nonfinite, seed,
        device: as for ImportanceSampler; ``samples_per_epoch`` is the size of the global
            sample.

    Costs per call are in the module docstring and ``docs/distributed.md``.
    """

    def __init__(
        self,
        num_items: int,
        *,
        sharded: bool = False,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        group: Optional["ProcessGroup"] = None,
        score: Union[str, ScorePolicy] = "last_loss",
        transform: Union[str, Transform] = "softmax",
        samples_per_epoch: Optional[int] = None,
        replacement: bool = True,
        warmup_epochs: int = 0,
        weighting: str = "auto",
        uniform_mix: float = 0.0,
        weight_exponent: Union[float, Callable[[int], float]] = 1.0,
        normalize_weights: Optional[str] = None,
        initial_score: float = 0.0,
        nonfinite: str = "raise",
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
            seed=seed,
            device=device,
        )
        comm = _Group(group, num_replicas, rank, _backend.resolve_device(device))
        self.sharded = bool(sharded)
        self.drop_last = bool(drop_last)
        error: Optional[BaseException] = None
        config: Any = None
        try:
            engine_type = _Sharded if self.sharded else _Replicated
            self._engine: Union[_Replicated, _Sharded] = engine_type(comm, self.drop_last, options)
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
        comm.agree(
            0 if error is None else _code_of(error),
            error,
            _fingerprint(config),
            "DistributedImportanceSampler() arguments",
        )
        self._comm = comm
        self._config_digest = _fingerprint(config)

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
        DistributedSampler); without it the sampler counts epochs itself."""
        self._engine.set_epoch(epoch)

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
        """Items this rank yields in the epoch being iterated, or else in the next one. Local
        (replicated mode may draw the next epoch ahead, without communicating)."""
        return self._engine.length()

    def __iter__(self) -> Iterator[int]:
        """This rank's part of the epoch. Replicated: local, O(m log N) to draw. Sharded: a
        collective at the start of each importance epoch (see the module docstring)."""
        return self._engine.iter()

    # -- ImportanceSampler's API ------------------------------------------------------------
    def update(self, indices: Any, losses: Any, **extra: Any) -> None:
        """Hand back this rank's batch of per-example losses (shape (b,); b may differ between
        ranks and be 0). A collective: every rank calls it once per step.

        Replicated: the (index, value) pairs of all ranks are all-gathered and every replica
        applies them in one call, in rank order (16 bytes per pair, so 16 W max(b) bytes
        received per rank, plus a 24-byte header per rank). Sharded: each pair goes to the
        rank that owns its item (all-to-all: 16 b bytes on average, plus 24 W).

        ``extra`` goes to the score policy on this rank (``logits=``, ``targets=``). A bad
        batch on any rank (a non-finite loss with ``nonfinite="raise"``, an index outside
        [0, N), a wrong type or shape) raises the same exception class on every rank, and no
        rank applies anything.
        """
        self._engine.update(indices, losses, extra)

    def weights(
        self, indices: Any, *, dtype: Optional[torch.dtype] = None, device: Optional[DeviceLike] = None
    ) -> torch.Tensor:
        """Importance weights 1 / (N p_global) of items this rank was given in the current
        epoch, from the probabilities they were drawn with, shape (b,). Local."""
        return self._engine.weights(indices, dtype, device)

    def scores(self) -> torch.Tensor:
        """Scores of the items in ``shard_range``, float64: all N when replicated. Local."""
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
        """Optimizer steps of each rank over epochs 0 .. num_epochs - 1 (for an LR schedule)."""
        num_epochs = _backend.check_count(num_epochs, "num_epochs")
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        steps = 0
        for epoch in range(num_epochs):
            length = self._engine.epoch_length(epoch)
            steps += length // batch_size if drop_last else -(-length // batch_size)
        return steps

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, *, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Everything needed to resume exactly. Local, no communication. Replicated: the same on
        every rank, so rank 0 saves it and every rank loads it. Sharded: this rank's shard,
        so every rank saves and loads its own. Pass `consumed` (items of this epoch that this
        rank's training loop has used) when saving mid-epoch behind a prefetching DataLoader.
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
        """Raise RuntimeError unless every rank is at the same point (epoch, position, update
        count) and, replicated, holds bit-identical scores. A collective; O(N) to hash the
        scores (about 1 s per GB), so a debugging aid rather than something to call every step."""
        digest = self._engine.digest(full=True)
        rows = self._comm.all_gather(torch.tensor([digest], dtype=torch.int64))
        values = [int(row[0]) for row in rows]
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise RuntimeError(f"ranks {differ} hold a different sampler state from rank 0")

    def __repr__(self) -> str:
        mode = "sharded" if self.sharded else "replicated"
        return (
            f"DistributedImportanceSampler(num_items={self.num_items}, {mode}, rank={self.rank}, "
            f"num_replicas={self.num_replicas}, drop_last={self.drop_last}, sampler={self._engine.local!r})"
        )
