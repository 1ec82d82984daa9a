"""ImportanceSampler: Algorithm 1 of the seed paper as a ``torch.utils.data.Sampler[int]``.

Each epoch the sampler either shuffles all N items (uniform warm-up), or draws
``samples_per_epoch`` items from the current probabilities, with or without replacement,
and yields them in random order. During the epoch the training loop hands back each batch's
per-example losses with ``update`` (scores change at once, probabilities next epoch) and
asks for the batch's importance weights with ``weights``; the weights come from the
probabilities the items were drawn with, never from the tree's current ones.

The defaults are the recipe the project's studies back (docs/results/defaults,
docs/results/variance): the last loss, sampled in proportion (q ∝ loss + 1e-6) mixed with
20% uniform, with replacement, unbiased weights 1 / (N q) (every weight <= 5), after one
epoch of uniform shuffling that scores every item. ``ImportanceSampler.paper(N)`` builds the
seed paper's own method (softmax of the scores, |Z| draws without replacement, 1 / (N p)).

    sampler = isample.ImportanceSampler(len(train_set))
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)
    for epoch in range(epochs):
        for index, x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            (losses * sampler.weights(index).to(losses)).mean().backward()
            sampler.update(index, losses)
            ...
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from . import _backend, _core
from ._backend import DeviceLike
from .scores import LastLoss, RunningLoss, ScorePolicy, get_score_policy
from .transforms import Proportional, Softmax, Transform, get_transform
from .tree import MAX_CAPACITY, SumTree

__all__ = ["EpochSampler", "ImportanceSampler", "IndexedDataset", "Epoch", "ScoreUpdate"]

_STATE_VERSION = 1
_MASK64 = 2**64 - 1
_COUNTERS = ("updates", "nonfinite_skipped", "nonfinite_clamped")


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite (CPU). One reduction: a finite sum holds no NaN or inf;
    only a sum that overflowed needs the element-wise check. A third of isfinite().all()."""
    return math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())


# Memory checks live in _backend (the trees use them too); these names stay importable here.
_memory_of = _backend.memory_of
check_fits = _backend.check_fits
_is_out_of_memory = _backend.is_out_of_memory
allocate = _backend.allocate

#: CPU scatters of this many items or more may run on several threads, where a repeated
#: index keeps an arbitrary value: resolve duplicates first (torch's parallel grain size)
_PARALLEL_SCATTER = 32768


def last_wins(indices: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(indices', values')`` such that ``store[indices'] = values'`` leaves every repeated
    index with the value of its last occurrence, whatever order the scatter applies them in
    (on CUDA ``index_put_`` keeps an arbitrary duplicate). No host synchronisation: a stable
    sort groups the duplicates in batch order, and searchsorted finds each group's last
    position; every member of a group then carries that value. O(k log k), any device."""
    sorted_indices, order = torch.sort(indices, stable=True)
    last = torch.searchsorted(sorted_indices, sorted_indices, right=True) - 1
    return sorted_indices, values[order[last]]


def store_all_or_nothing(
    store: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, accept: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``store[indices] = scores`` decided on the device, without a host synchronisation: the
    batch is written only if every index lies in [0, len(store)), every score is finite and
    ``accept`` (a 0-d bool tensor: the tree's own decision on the same batch) holds; otherwise
    nothing changes. A repeated index takes its last value. Returns ``(rejected, outside)``,
    0-d bool tensors, for the caller to report later. Runs on any device (the tests use CPU
    tensors)."""
    inside = (indices >= 0) & (indices < store.numel())
    all_inside = inside.all()
    accepted = torch.isfinite(scores).all() & all_inside
    if accept is not None:
        accepted = accepted & accept
    safe = torch.where(inside, indices, torch.zeros_like(indices))  # read without a device assert
    safe, values = last_wins(safe, scores)
    store[safe] = torch.where(accepted, values, store[safe])
    return ~accepted, ~all_inside


_same = _backend.same_value
_CPU = _backend.CPU
# The kinds of _core.SamplerStep: weights only, a softmax tree, Proportional leaves, a score store alone
_STEP_WEIGHTS, _STEP_SOFTMAX, _STEP_PROPORTIONAL, _STEP_SCORES = 0, 1, 2, 3


def derive_seed(*parts: Union[int, str]) -> int:
    """A 63-bit seed from integers and short strings, the same in every process (unlike hash())."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        value = int.from_bytes(part.encode()[:8].ljust(8, b"\0"), "little") if isinstance(part, str) else int(part)
        h = (h ^ (value & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64  # SplitMix64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@dataclass
class Epoch:
    """An epoch once drawn: the order of its items and their importance weights.

    ``position`` counts the items of ``order`` already handed out; a wrapper that yields its
    own part of the order (a distributed sampler) advances it itself.
    """

    epoch: int
    order: torch.Tensor  # int64 (L,): the items, in the order they are yielded
    weight_of: Optional[torch.Tensor]  # float64 (N,): the weight of each drawn item, NaN elsewhere; None = all 1
    position: int = 0  # items yielded so far
    info: Dict[str, Any] = field(default_factory=dict)


_Epoch = Epoch  # the name subclasses used before Epoch was public


class ScoreUpdate(NamedTuple):
    """A checked batch of score updates: what ``prepare_update`` returns, ``apply_update`` writes."""

    indices: torch.Tensor  # int64 (b,), all in [0, N)
    values: torch.Tensor  # float64 (b,): losses for EMA policies (keep is not None), new scores otherwise
    skipped: int  # items left out as non-finite (nonfinite="skip")


class EpochSampler(Sampler[int]):
    """What every isample sampler shares: epochs, per-epoch weights, score updates and an
    exact resume. Subclasses decide how an epoch is drawn and where scores live.

    Threads: the calls that change the sampler (``update``, ``prepare_update``,
    ``apply_update``, drawing an epoch with ``iter()``/``begin_epoch``/``len()``,
    ``set_epoch``, ``state_dict``, ``load_state_dict``) hold one lock (about 0.1 µs a call),
    so several threads may update scores and ask for weights at once (``weights`` reads only
    the drawn epoch, which never changes once drawn). An epoch's iterator is not shared:
    iterate each epoch from one thread, as a DataLoader does.

    Non-finite scores: each ``history`` entry counts the values of that epoch's updates that
    were skipped (``"nonfinite_skipped"``) or clamped (``"nonfinite_clamped"``), and
    ``counters`` keeps the running totals. On CUDA they are counted on the device, without a
    synchronisation, and read when ``history`` or ``counters`` is read, or the next epoch begins.
    """

    _format = "isample.EpochSampler"

    def __init__(
        self,
        num_items: int,
        *,
        score: Union[str, ScorePolicy],
        nonfinite: str,
        seed: int,
        device: DeviceLike,
        clamp_value: float = 1e4,
        policy_items: Optional[int] = None,
    ) -> None:
        # Every argument is checked, and numbers become plain Python numbers, before anything
        # is built: saved configurations then load with torch.load(weights_only=True).
        num_items = _backend.check_count(num_items, "num_items", limit=MAX_CAPACITY)
        if num_items < 1:
            raise ValueError("num_items must be at least 1")
        nonfinite = _backend.check_choice(nonfinite, "nonfinite", ("raise", "skip", "clamp"))
        self.clamp_value = _backend.check_real(clamp_value, "clamp_value", low=0.0, low_open=True)
        self.num_items = num_items
        self.device = _backend.resolve_device(device)
        self.score_policy = get_score_policy(score)
        # the items the policy indexes: N, or the whole item set when this sampler holds a shard
        self.score_policy.check_items(num_items if policy_items is None else _backend.check_count(policy_items, "policy_items"))
        self.seed = _backend.check_seed(seed)
        self.nonfinite = nonfinite
        self._lock = _core.SamplerLock()
        self._next_epoch = 0
        self._current: Optional[_Epoch] = None
        self._history: List[Dict[str, Any]] = []
        self._counters: Dict[str, int] = {"updates": 0, "nonfinite_skipped": 0, "nonfinite_clamped": 0}
        # CUDA: NaN and +-inf values seen by updates since the last read, counted on the device
        # (int64 (2,)), and the history entry of the epoch they belong to
        self._nonfinite_on_device: Optional[torch.Tensor] = None
        self._nonfinite_info: Optional[Dict[str, Any]] = None
        self._rejected_on_device: Optional[torch.Tensor] = None  # CUDA: a batch held a non-finite score
        self._bad_index_on_device: Optional[torch.Tensor] = None  # CUDA: a batch held an index out of range
        self._negative_on_device: Optional[torch.Tensor] = None  # CUDA: set_scores was given a negative score
        self._step = EpochSampler._make_step(self)  # subclasses make theirs once their scores exist

    def _make_step(self) -> Optional[Any]:
        """The compiled per-step calls (``weights``, and ``update`` where the scores allow
        it) of a CPU sampler, or None. Here: weights only."""
        if self.device is not _CPU:
            return None
        return _core.SamplerStep(self.num_items, _STEP_WEIGHTS, None, None, 1.0, 0.0, self._lock)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be copied or pickled; each copy gets its own
        del state["_step"]  # holds the lock, the tree and the scores: made again from the copy's
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.device.type == "cpu":  # a copied torch.device: the fast paths test for _CPU by identity
            self.device = _CPU
        self._lock = _core.SamplerLock()
        self._step = self._make_step()

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One dict per drawn epoch: its kind, length, weight range, the non-finite values
        its updates skipped or clamped, and more. The last entry is the epoch being trained."""
        if self._nonfinite_on_device is not None:
            self._read_device_counts()
        return self._history

    @history.setter
    def history(self, value: List[Dict[str, Any]]) -> None:
        self._history = value

    @property
    def counters(self) -> Dict[str, int]:
        """Running totals: score updates made, non-finite scores skipped or clamped."""
        if self._nonfinite_on_device is not None:
            self._read_device_counts()
        return self._counters

    @counters.setter
    def counters(self, value: Dict[str, int]) -> None:
        self._counters = dict(value)
        self._nonfinite_on_device = self._nonfinite_info = None

    def _epoch_info(self) -> Optional[Dict[str, Any]]:
        """The history entry that updates count toward now: the current epoch's (None before the first)."""
        current = self._current
        return None if current is None else current.info

    def _count_nonfinite(self, skipped: int, clamped: int, info: Optional[Dict[str, Any]]) -> None:
        """Add to the totals and, unless `info` is None (before the first epoch), to that
        epoch's history entry."""
        if not (skipped or clamped):
            return
        self._counters["nonfinite_skipped"] += skipped
        self._counters["nonfinite_clamped"] += clamped
        if info is not None:
            info["nonfinite_skipped"] = info.get("nonfinite_skipped", 0) + skipped
            info["nonfinite_clamped"] = info.get("nonfinite_clamped", 0) + clamped

    def _read_device_counts(self) -> None:
        """Move the counts kept on the device to the host (one synchronisation)."""
        with self._lock:
            counts, info = self._nonfinite_on_device, self._nonfinite_info
            self._nonfinite_on_device = self._nonfinite_info = None
            if counts is None:
                return
            nans, infs = counts.tolist()
            if self.nonfinite == "clamp":  # inf became +-clamp_value; NaN has nothing to clamp to
                self._count_nonfinite(nans, infs, info)
            else:
                self._count_nonfinite(nans + infs, 0, info)

    # -- what subclasses provide ----------------------------------------------------------
    def _draw(self, epoch: int, generator: torch.Generator) -> _Epoch:
        raise NotImplementedError

    def _read_scores(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _write_scores(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Store new scores; must validate first so that a rejected call changes nothing."""
        raise NotImplementedError

    def scores(self) -> torch.Tensor:
        """All N current scores, float64 (N,)."""
        raise NotImplementedError

    def _check_device(self) -> None:
        """Raise errors a GPU recorded during the epoch (drawing an epoch synchronises anyway)."""
        bad_index, self._bad_index_on_device = self._bad_index_on_device, None
        rejected, self._rejected_on_device = self._rejected_on_device, None
        negative, self._negative_on_device = self._negative_on_device, None
        if bad_index is not None and bool(bad_index):
            raise IndexError(
                f"a score update during the last epoch held an index outside [0, {self.num_items}) "
                "and was left out"
            )
        if negative is not None and bool(negative):
            raise ValueError("a set_scores() call during the last epoch held a negative score and was left out")
        if rejected is not None and bool(rejected):
            raise ValueError(
                "a score update during the last epoch held a non-finite score and was left out; "
                "pass nonfinite='skip' to drop only the bad items"
            )

    def _safe_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """CUDA: indices that can be read without a device-side assert (out-of-range ones
        read item 0); the write that follows rejects the batch (_store_scores)."""
        if self.device is _backend.CPU:
            return indices
        return torch.where((indices >= 0) & (indices < self.num_items), indices, torch.zeros_like(indices))

    def _store_scores(
        self,
        store: torch.Tensor,
        indices: torch.Tensor,
        scores: torch.Tensor,
        *,
        checked: bool = False,
        accept: Optional[torch.Tensor] = None,
    ) -> None:
        """store[indices] = scores, all or nothing, a repeated index taking its last value: an
        index outside [0, N) (IndexError naming it; torch would wrap a negative one around) or
        a non-finite score (ValueError) rejects the whole batch. On a GPU the checks are made
        on the device, without a synchronisation (``store_all_or_nothing``; ``accept`` is the
        tree's decision on the same batch), and reported by _check_device. ``checked``: the
        caller has validated both on the CPU already."""
        k = indices.numel()
        if self.device.type != "cuda":
            if not checked:
                if k:
                    if indices.dtype is not torch.int64 or not indices.is_contiguous():
                        indices = indices.to(torch.int64).contiguous()
                    # the compiled gather checks every index and names the first bad one
                    scratch = _backend.empty_values(k, self.device)  # held: gather writes into it
                    _core.gather(store.data_ptr(), store.numel(), indices.data_ptr(), k, scratch.data_ptr())
                if not _all_finite(scores):
                    raise ValueError("scores must be finite")
            if k >= _PARALLEL_SCATTER:  # torch may scatter this on several threads
                indices, scores = last_wins(indices, scores)
            store[indices] = scores
            return
        rejected, outside = store_all_or_nothing(store, indices, scores, accept)
        self._rejected_on_device = rejected if self._rejected_on_device is None else self._rejected_on_device | rejected
        if self._bad_index_on_device is not None:
            outside = self._bad_index_on_device | outside
        self._bad_index_on_device = outside

    def _config(self) -> Dict[str, Any]:
        return {"num_items": self.num_items, "score": self.score_policy.config(), "seed": self.seed}

    def _state_extra(self) -> Dict[str, Any]:
        return {}

    def _check_extra(self, state: Dict[str, Any]) -> Any:
        """Validate the subclass's part of a state (scores, tree) without changing anything;
        returns what ``_apply_extra`` needs."""
        return None

    def _apply_extra(self, checked: Any) -> None:
        """Write what ``_check_extra`` validated. May raise only before changing anything."""

    def _load_extra(self, state: Dict[str, Any]) -> None:
        self._apply_extra(self._check_extra(state))

    # -- epochs ---------------------------------------------------------------------------
    # _current is the epoch being yielded (or last yielded): weights() answer for it. The next
    # epoch is drawn only by iter() (begin_epoch), after every update of the epoch before it:
    # len(), steps_per_epoch and total_steps never draw.

    def _resumable(self) -> Optional[Epoch]:
        """The current epoch if the next iter() must continue it (it was saved part-way)."""
        current = self._current
        if current is not None and current.epoch == self._next_epoch and current.position < len(current.order):
            return current
        return None

    def _in_progress(self) -> Optional[Epoch]:
        current = self._current
        if current is not None and current.epoch == self._next_epoch - 1 and current.position < len(current.order):
            return current
        return None

    def _draw_epoch(self, epoch: int) -> Epoch:
        """Draw epoch `epoch` from the scores as they are now (nothing is kept here)."""
        self._check_device()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "epoch"))
        try:
            drawn = self._draw(epoch, generator)
        except RuntimeError as error:  # a temporary of the draw did not fit; nothing has changed
            if _is_out_of_memory(error):
                message = f"drawing epoch {epoch} of {self.num_items:,} items ran out of memory: {error}"
                raise MemoryError(message) from None
            raise
        drawn.info.setdefault("epoch", epoch)
        drawn.info.setdefault("samples", int(drawn.order.numel()))
        drawn.info.setdefault("nonfinite_skipped", 0)
        drawn.info.setdefault("nonfinite_clamped", 0)
        return drawn

    @property
    def current_epoch(self) -> Optional[Epoch]:
        """The epoch being (or last) iterated; ``weights`` answer for it. None before the first."""
        return self._current

    @property
    def active_epoch(self) -> Optional[Epoch]:
        """The epoch being iterated, or the one the next ``iter()`` continues (saved part-way);
        None when the next ``iter()`` starts a new epoch."""
        return self._in_progress() or self._resumable()

    def begin_epoch(self) -> Epoch:
        """What ``iter()`` does before yielding: continue the epoch saved part-way, or draw
        the next one from the scores as they are now. Returns it; it becomes the current
        epoch and enters ``history``."""
        with self._lock:
            if self._nonfinite_on_device is not None:
                self._read_device_counts()  # they belong to the epoch that ends here
            current = self._resumable()
            if current is None:
                if self._next_epoch > _backend.MAX_INT64:
                    raise ValueError(
                        f"epoch {self._next_epoch} is beyond the last epoch ({_backend.MAX_INT64}): "
                        "call set_epoch() with a smaller epoch"
                    )
                current = self._draw_epoch(self._next_epoch)
                self._current = current
                self._history.append(current.info)
            self._next_epoch = current.epoch + 1
            return current

    def epoch_length(self, epoch: int) -> Optional[int]:
        """Items epoch `epoch` will yield, when that is known before drawing it (else None)."""
        return None

    def _predicted_length(self, epoch: int) -> int:
        """Items epoch `epoch` would yield if it were drawn now, for samplers whose epoch
        length depends on the draw (``epoch_length`` None); must change nothing. This
        fallback draws the epoch and throws it away (deterministic: the draw is seeded by the
        epoch), which is right for a ``_draw`` without side effects; subclasses compute it
        more cheaply (SoftPruningSampler) or say it with ``epoch_length``."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "epoch"))
        return int(self._draw(epoch, generator).order.numel())

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or else the one the next ``iter()`` yields."""
        current = self.active_epoch
        return current.epoch if current is not None else self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` draw epoch `epoch` (as DistributedSampler). Without
        calls to set_epoch the sampler counts epochs itself, one per ``iter()``. Epochs are
        ints in [0, 2**63)."""
        epoch = _backend.check_count(epoch, "epoch")
        with self._lock:
            self._next_epoch = epoch

    def __len__(self) -> int:
        """Number of items in the epoch being iterated, or else in the next one. Never draws
        an epoch: a length known in advance (``epoch_length``) is returned as is; one that
        depends on the draw (soft pruning) is what the epoch would yield if drawn now, exact
        unless scores change before it is drawn."""
        with self._lock:
            current = self.active_epoch
            if current is not None:
                return int(current.order.numel())
            length = self.epoch_length(self._next_epoch)
            return int(length) if length is not None else self._predicted_length(self._next_epoch)

    def __iter__(self) -> Iterator[int]:
        return self._yield_from(self.begin_epoch())

    @staticmethod
    def _yield_from(current: Epoch) -> Iterator[int]:
        for item in current.order[current.position :].tolist():
            current.position += 1
            yield item

    def steps_per_epoch(self, batch_size: int, *, drop_last: bool = False) -> int:
        """Optimizer steps in the next (or current) epoch for a DataLoader of `batch_size`."""
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        length = len(self)
        return length // batch_size if drop_last else -(-length // batch_size)

    # -- weights and scores -----------------------------------------------------------------
    def weights(
        self,
        indices: Any,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[DeviceLike] = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Importance weights of a batch of items drawn in the current epoch, shape (b,).

        Multiply the per-example losses by them before averaging. They use the
        probabilities the items were drawn with. Raises ValueError for an item that the
        current epoch did not draw (on CUDA its weight is NaN instead: a check would
        synchronise), IndexError for an index outside [0, N), RuntimeError before the first
        epoch is drawn. ``dtype`` (a floating torch.dtype) and ``device`` convert the result.
        ``scale`` multiplies the weights (in float64, before any conversion): ``scale=1 / b``
        makes ``losses @ weights`` the weighted mean in one operation.
        """
        # (A CPU sampler's compiled step took this call first, where it could: see _compiled_calls.)
        current = self._current
        scale = _backend.check_real(scale, "scale")
        if dtype is not None:
            dtype = _backend.check_float_dtype(dtype)
        if device is not None:
            device = _backend.torch_device(device)
        if current is None:
            raise RuntimeError("no epoch has been drawn yet: iterate the sampler first")
        idx = _backend.as_indices(indices, self.device)
        k = idx.numel()
        if current.weight_of is None:  # an epoch drawn uniformly: every weight is 1
            self._check_range(idx, self.num_items)
            weights = torch.ones(k, dtype=torch.float64, device=self.device)
        elif self.device is _backend.CPU:
            weights = _backend.empty_values(k, self.device)
            missing = _core.gather(current.weight_of.data_ptr(), self.num_items, idx.data_ptr(), k, weights.data_ptr())
            if missing >= 0:
                raise ValueError(f"item {int(idx[missing])} was not drawn in epoch {current.epoch}: it has no weight")
        else:
            # On a GPU an undrawn item's weight comes back NaN, and so does an index out of
            # range (read as item 0, without a device-side assert): checking would synchronise.
            inside = (idx >= 0) & (idx < self.num_items)
            weights = torch.index_select(current.weight_of, 0, self._safe_indices(idx))
            weights = torch.where(inside, weights, torch.full_like(weights, math.nan))
        if scale != 1.0:
            weights = weights * scale
        if dtype is not None or device is not None:
            try:
                weights = weights.to(dtype=dtype or weights.dtype, device=device or weights.device)
            except (RuntimeError, AssertionError) as error:  # e.g. torch built without CUDA
                raise ValueError(f"cannot move the weights to device={device}: {error}") from None
        return weights

    def _weighted_update(self, indices: Any, losses: Any, reduction: str) -> Optional[torch.Tensor]:
        """``weights(indices, dtype=losses.dtype, scale=1 / b)`` (``reduction="mean"``; 1 for
        ``"sum"``) and ``update(indices, losses)`` in one call of the compiled step, for
        protocol.weighted_loss; None, having done nothing, wherever either would take its
        general path or raise (and for a subclass with a ``weights`` or an ``update`` of its own)."""
        step, current, cls = self._step, self._current, type(self)
        if (step is None or current is None or (reduction != "mean" and reduction != "sum")
                or cls.update is not EpochSampler.update or cls.weights is not EpochSampler.weights):
            return None
        return step.weighted_update(current.weight_of, indices, losses, reduction == "mean", self.score_policy, self._counters)

    def _blend_scores(self, indices: torch.Tensor, losses: torch.Tensor, keep: float) -> None:
        """S = keep * S + (1 - keep) * L for policies that say so (ScorePolicy.keep)."""
        if keep == 0.0:
            new = losses
        elif self.device.type != "cuda":  # the core's arithmetic (its fast paths compute the same bits)
            new = self._read_scores(indices) * keep + losses * (1.0 - keep)
        else:  # lerp(L, S, keep) = L + keep (S - L): one kernel instead of three
            new = torch.lerp(losses, self._read_scores(indices), keep)
        self._write_scores(indices, new)

    def update(self, indices: Any, losses: Any, **extra: Any) -> None:
        """Hand back a batch's per-example losses (shape (b,), CPU or CUDA, any float
        dtype, with or without grad); the score policy turns them into new scores.

        ``extra`` goes to the score policy (``logits=``, ``targets=`` for GradNormBound).
        An index outside ``[0, N)`` (negative ones included) raises IndexError naming it.
        Non-finite scores raise ValueError, or are skipped (``nonfinite="skip"``) or clamped
        (``"clamp"``) and counted in ``counters`` and in the epoch's ``history`` entry; either
        way no bad value reaches the scores, and a rejected call changes nothing.

        Before the first epoch: allowed. The scores are recorded as a warm-up epoch would
        record them, and the first epoch draws from them (a way to start from known scores);
        such updates count in ``counters`` but in no ``history`` entry, and ``weights``
        raises RuntimeError until an epoch is drawn. Between epochs (after an epoch's last
        item, before the next ``iter()``) updates count toward the epoch just iterated.
        """
        # (A CPU sampler's compiled step took this call first, where it could: see _compiled_calls.)
        idx = _backend.as_indices(indices, self.device)
        losses = _as_losses(losses, idx.numel(), self.device)
        lock = self._lock
        lock.acquire()  # explicit acquire/release: half the cost of `with`
        try:
            if self.device.type == "cuda":
                self._update_on_device(idx, losses, extra)
                return
            policy = self.score_policy
            try:  # the fast path: the tree or the score store validates before it writes
                if policy.keep is not None:
                    self._blend_scores(idx, losses, policy.keep)
                else:
                    self._write_scores(idx, self._new_scores(idx, losses, extra))
                    policy.commit(idx)
                self._counters["updates"] += 1
            except (ValueError, IndexError):
                # Rejected, nothing written: check explicitly, which raises the clear error or,
                # with nonfinite="skip"/"clamp", leaves out or clamps the bad items.
                update, clamped = self._prepare_update(idx, losses, self.num_items, extra, count=False)
                self.apply_update(update)
                self._count_nonfinite(0, clamped, self._epoch_info())
        finally:
            lock.release()

    def prepare_update(self, indices: Any, losses: Any, *, num_items: Optional[int] = None, **extra: Any) -> ScoreUpdate:
        """Check a batch and run the score policy without writing anything: raises what
        ``update`` would raise, or (nonfinite="skip") leaves out the non-finite items. A
        distributed sampler prepares on every rank, exchanges, then applies. ``num_items``
        is the range the indices are checked against (default: this sampler's N; a shard of
        a larger item set passes the global N). Values clamped (nonfinite="clamp") are
        counted here, skipped ones when the update is applied."""
        limit = self.num_items if num_items is None else _backend.check_count(num_items, "num_items")
        idx = _backend.as_indices(indices, self.device)
        losses = _as_losses(losses, idx.numel(), self.device)
        with self._lock:
            return self._prepare_update(idx, losses, limit, extra)[0]

    def _check_range(self, idx: torch.Tensor, limit: int) -> None:
        if idx.numel():
            outside = (idx < 0) | (idx >= limit)
            if bool(outside.any()):
                raise IndexError(f"indices {idx[outside][:5].tolist()} are outside [0, {limit})")

    def _prepare_update(
        self, idx: torch.Tensor, losses: torch.Tensor, limit: int, extra: Dict[str, Any], *, count: bool = True
    ) -> Tuple[ScoreUpdate, int]:
        """(the checked update, how many values were clamped); ``count``: add the clamped
        ones to the counters now (else the caller does, once the update is written)."""
        self._check_range(idx, limit)
        policy = self.score_policy
        values = losses if policy.keep is not None else self._new_scores(idx, losses, extra)
        update, clamped = self._without_nonfinite(idx, values, losses, "losses")
        if count:
            self._count_nonfinite(0, clamped, self._epoch_info())
        return update, clamped

    def _without_nonfinite(
        self, idx: torch.Tensor, values: torch.Tensor, given: torch.Tensor, given_name: str
    ) -> Tuple[ScoreUpdate, int]:
        """Apply the ``nonfinite`` setting to new scores `values` (computed from `given`):
        raise ValueError, or leave out NaN (and inf with "skip"), or clamp +-inf. Returns the
        update and the number of clamped values (counted by the caller)."""
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return ScoreUpdate(idx, values, 0), 0
        bad = int((~finite).sum())
        if self.nonfinite == "raise":
            raise ValueError(
                f"{bad} non-finite score(s) (items {idx[~finite][:5].tolist()}, {given_name} "
                f"{given[~finite][:5].tolist()}); the scores are unchanged. "
                "Pass nonfinite='skip' (leave such items out) or 'clamp' (inf becomes +-clamp_value)."
            )
        if self.nonfinite == "clamp":
            # +-inf -> +-clamp_value (counted as clamped); NaN has no value to clamp to: skipped
            values = values.clamp(-self.clamp_value, self.clamp_value)
            keep = ~torch.isnan(values)
            nans = int((~keep).sum())
            return ScoreUpdate(idx[keep], values[keep], nans), bad - nans
        return ScoreUpdate(idx[finite], values[finite], bad), 0

    def apply_update(self, update: ScoreUpdate) -> None:
        """Write a prepared update in one step: a repeated index takes its last value, and an
        EMA policy blends each item with its score from before the call."""
        with self._lock:
            keep = self.score_policy.keep
            if keep is not None:
                self._blend_scores(update.indices, update.values, keep)
            else:
                self._write_scores(update.indices, update.values)
                self.score_policy.commit(update.indices)
            self._counters["updates"] += 1
            self._count_nonfinite(update.skipped, 0, self._epoch_info())

    def set_scores(self, indices: Any, scores: Any) -> None:
        """Write scores directly, without the score policy: item ``indices[j]`` gets score
        ``scores[j]``, and the next epoch draws from the new scores through the sampler's
        transform (softmax, proportional, rank, soft pruning's mean) and uniform mixture.
        For scores computed elsewhere: a scoring worker's gradient norms, or a distributed
        sampler after its exchange.

        ``indices`` (b,) integers and ``scores`` (b,) real numbers: tensors (CPU or CUDA, any
        real dtype, with or without grad), numpy arrays or sequences. Checked as ``update``:
        an index outside ``[0, N)`` raises IndexError; a NaN or infinite score raises
        ValueError, or is skipped (``nonfinite="skip"``) or clamped (``"clamp"``) and counted;
        a negative score always raises ValueError. A refused call changes nothing. A
        repeated index takes its last value. Counts as one update in ``counters["updates"]``.
        A policy with state (EarlyImportance's counts) does not advance; an EMA policy's next
        ``update`` blends with these scores.

        On CUDA nothing here synchronises: a batch with a bad index, a negative score, or a
        non-finite one under ``nonfinite="raise"`` is left out on the device, and the error
        is raised when the next epoch is drawn, as for ``update``.
        """
        idx = _backend.as_indices(indices, self.device)
        values = _as_losses(scores, idx.numel(), self.device, name="scores")
        with self._lock:
            if self.device.type == "cuda":
                self._set_scores_on_device(idx, values)
                return
            self._check_range(idx, self.num_items)
            negative = values < 0
            if idx.numel() and bool(negative.any()):
                raise ValueError(
                    f"scores must be >= 0: items {idx[negative][:5].tolist()} were given "
                    f"{values[negative][:5].tolist()}; the scores are unchanged"
                )
            update, clamped = self._without_nonfinite(idx, values, values, "scores")
            self._write_scores(update.indices, update.values)  # validates before it writes
            self._counters["updates"] += 1
            self._count_nonfinite(update.skipped, clamped, self._epoch_info())

    def _set_scores_on_device(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        """set_scores on CUDA: every check is made on the device. A negative score turns the
        batch into a write of the items' current scores (a no-op) and is recorded for
        _check_device; non-finite ones go through the ``nonfinite`` setting as in update."""
        if self.nonfinite in ("skip", "clamp"):
            values = self._replace_nonfinite_on_device(idx, values)
        negative = (values < 0).any()
        current = self._read_scores(self._safe_indices(idx))
        values = torch.where(negative, current, values)
        previous = self._negative_on_device
        self._negative_on_device = negative if previous is None else previous | negative
        self._write_scores(idx, values)
        self._counters["updates"] += 1

    def _new_scores(self, idx: torch.Tensor, losses: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        policy = self.score_policy
        idx = self._safe_indices(idx)  # CUDA: a policy's look-up must not hit a device-side assert
        previous = self._read_scores(idx) if policy.needs_previous else None
        new = policy(losses, previous, idx, **extra)
        if not isinstance(new, torch.Tensor) or new.shape != losses.shape:
            raise TypeError(f"{policy!r} must return a tensor of shape {tuple(losses.shape)}")
        return new.to(dtype=torch.float64, device=self.device)

    def _replace_nonfinite_on_device(self, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """nonfinite="skip"/"clamp" without a synchronisation: NaN (and +-inf with "skip")
        become the items' current scores, +-inf become +-clamp_value ("clamp"); the counts
        stay on the device until ``history`` or ``counters`` is read."""
        nan, inf = torch.isnan(values), torch.isinf(values)
        seen = torch.stack((nan.sum(), inf.sum()))
        if self._nonfinite_on_device is None:
            self._nonfinite_on_device = seen
            self._nonfinite_info = self._epoch_info()
        else:
            self._nonfinite_on_device += seen
        if self.nonfinite == "clamp":
            values = values.clamp(-self.clamp_value, self.clamp_value)  # +-inf only: NaN stays NaN
            bad = nan
        else:
            bad = nan | inf
        return torch.where(bad, self._read_scores(self._safe_indices(idx)), values)

    def _update_on_device(self, idx: torch.Tensor, losses: torch.Tensor, extra: Dict[str, Any]) -> None:
        """The CUDA path: no host synchronisation. A non-finite score is left out by keeping
        the item's current score (nonfinite="skip"), clamped ("clamp"), or recorded by the
        tree and raised when the next epoch is drawn ("raise"). Skipped and clamped values
        are counted on the device and read at the end of the epoch (see ``history``)."""
        policy = self.score_policy
        values = losses if policy.keep is not None else self._new_scores(idx, losses, extra)
        if self.nonfinite in ("skip", "clamp"):
            values = self._replace_nonfinite_on_device(idx, values)
        if policy.keep is not None:
            self._blend_scores(idx, values, policy.keep)
        else:
            self._write_scores(idx, values)
            policy.commit(idx)
        self._counters["updates"] += 1

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, *, consumed: Optional[int] = None) -> Dict[str, Any]:
        """Everything needed to resume exactly: scores, epoch, the current epoch's order and
        weights, and how far it got. A DataLoader prefetches, so pass `consumed` (items the
        training loop has actually used this epoch) when saving mid-epoch."""
        with self._lock:
            return self._state_dict(consumed)

    def _state_dict(self, consumed: Optional[int]) -> Dict[str, Any]:
        current = self._current
        saved_current = None
        if current is not None:
            position = current.position if consumed is None else _backend.check_count(consumed, "consumed")
            if position > current.order.numel():
                raise ValueError(f"consumed={position} exceeds the epoch's {current.order.numel()} items")
            saved_current = {
                "epoch": current.epoch,
                "order": current.order.clone(),
                "weight_of": None if current.weight_of is None else current.weight_of.clone(),
                "position": position,
                "info": dict(current.info),
            }
        next_epoch = self._next_epoch
        if saved_current is not None and _continues(current.epoch, saved_current["position"], current.order.numel(), next_epoch):
            next_epoch = current.epoch  # saved part-way: the next iter() continues it (as after loading)
        return {
            "format": self._format,
            "version": _STATE_VERSION,
            "config": self._config(),
            "next_epoch": next_epoch,
            "current": saved_current,
            "history": [dict(entry) for entry in self.history],
            "counters": dict(self.counters),
            "policy": self.score_policy.state_dict(),
            **self._state_extra(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict``. An epoch saved part-way is continued by the next
        ``iter()`` from where it stopped, with the same order and weights. A state that does
        not fit this sampler raises (ValueError or TypeError) and changes nothing."""
        with self._lock:
            self._load_state_dict(state)

    def _load_state_dict(self, state: Dict[str, Any]) -> None:
        # Everything is checked first; only then is anything written, so a state that does
        # not fit (a mangled checkpoint, a key missing or of the wrong type) changes nothing.
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not (_same(state.get("format"), self._format) and _same(state.get("version"), _STATE_VERSION)):
            raise ValueError(
                f"not a {self._format} state of version {_STATE_VERSION} "
                f"(format={state.get('format')!r:.60}, version={state.get('version')!r:.60})"
            )
        missing = [key for key in ("config", "next_epoch", "current", "history", "counters") if key not in state]
        if missing:
            raise ValueError(f"the state lacks {missing}: pass a state from {type(self).__name__}.state_dict()")
        config = self._config()
        saved = state["config"]
        if not isinstance(saved, dict):
            raise ValueError(f"state['config'] must be a dict, got {type(saved).__name__}")
        differences = sorted(str(k) for k in set(config) | set(saved) if not _same(config.get(k), saved.get(k)))
        if differences:
            raise ValueError(
                "the state comes from a sampler configured differently: "
                + ", ".join(f"{k}: saved {saved.get(k)!r:.60}, here {config.get(k)!r:.60}" for k in differences)
            )
        restored = self._checked_epoch(state["current"])
        # after epoch 2**63 - 1 has been drawn, the next is 2**63 (which iter() refuses)
        next_epoch = _backend.check_count(state["next_epoch"], "state['next_epoch']", limit=_backend.MAX_INT64 + 1)
        history = state["history"]
        if not isinstance(history, list):
            raise ValueError(f"state['history'] must be a list of dicts, got {type(history).__name__}")
        history = [_checked_info(entry, f"state['history'][{j}]") for j, entry in enumerate(history)]
        counters = _checked_counters(state["counters"])
        policy_state = state.get("policy", {})
        policy = self.score_policy
        # Check the policy's state without loading it, unless a policy of the user's own loads
        # without saying how to check (it is then restored if what follows fails).
        if type(policy).check_state_dict is not ScorePolicy.check_state_dict or (
            type(policy).load_state_dict is ScorePolicy.load_state_dict
        ):
            policy.check_state_dict(policy_state)
        extra = self._check_extra(state)

        # -- write: the core may still refuse (before changing anything); the rest cannot fail
        if restored is not None and history and history[-1].get("epoch") == restored.epoch:
            restored.info = history[-1]  # one dict, as when the epoch was drawn: counts go to both
        previous_policy = policy.state_dict()
        policy.load_state_dict(policy_state)
        try:
            self._apply_extra(extra)
        except BaseException:
            policy.load_state_dict(previous_policy)
            raise
        self._current = restored
        # An epoch saved part-way is the one the next iter() must continue (unless set_epoch
        # had moved on to another epoch before the save).
        if restored is not None and _continues(restored.epoch, restored.position, len(restored.order), next_epoch):
            next_epoch = restored.epoch
        self._next_epoch = next_epoch
        self.counters = {**self.counters, **counters}
        self._history = history
        self._rejected_on_device = self._bad_index_on_device = self._negative_on_device = None

    def _checked_epoch(self, current: Any) -> Optional[Epoch]:
        """The saved current epoch as an Epoch, checked against this sampler (None stays None)."""
        if current is None:
            return None
        if not isinstance(current, dict):
            raise ValueError(f"state['current'] must be a dict or None, got {type(current).__name__}")
        missing = [key for key in ("epoch", "order", "weight_of", "position") if key not in current]
        if missing:
            raise ValueError(f"state['current'] lacks {missing}: the state is damaged")
        epoch = _backend.check_count(current["epoch"], "state['current']['epoch']")
        order = _backend.as_indices(current["order"], self.device, name="state['current']['order']")
        weight_of = current["weight_of"]
        if weight_of is not None:
            weight_of = _backend.as_values(weight_of, self.device, self.num_items, name="state['current']['weight_of']")
            if weight_of is current["weight_of"]:
                weight_of = weight_of.clone()  # the sampler must not share the caller's tensor
            if bool((weight_of[~torch.isnan(weight_of)] < 0).any()):
                raise ValueError("state['current']['weight_of'] holds a negative weight")
        position = _backend.check_count(current["position"], "state['current']['position']")
        if position > order.numel() or (order.numel() and (int(order.max()) >= self.num_items or int(order.min()) < 0)):
            raise ValueError("the saved epoch is inconsistent with this sampler (its order or position)")
        if order is current["order"]:
            order = order.clone()
        info = _checked_info(current.get("info", {}), "state['current']['info']")
        return _Epoch(epoch, order, weight_of, position, info)


def _compiled_calls(cls: type) -> None:
    """Make ``cls.weights`` and ``cls.update`` methods of the core (_core.StepMethod) that
    hand each call to the sampler's compiled step (``_step``: plain CPU arrays, the CPU
    transforms, a policy of the form keep * S + (1 - keep) * L) and to the Python function
    otherwise, which is unchanged: same name, docstring and signature. They run once per
    training step, where a Python frame costs as much as the step's own work."""
    for name in ("weights", "update"):
        general = _general_calls[name] = cls.__dict__[name]
        setattr(cls, name, functools.update_wrapper(_core.StepMethod(general, name), general))


_general_calls: Dict[str, Callable[..., Any]] = {}  # the Python functions behind them
_compiled_calls(EpochSampler)


def _continues(epoch: int, position: int, length: int, next_epoch: int) -> bool:
    """Whether an epoch saved at `position` of `length` items is the one the next iter()
    continues: it was not finished, and it is the epoch being iterated (next_epoch is the one
    after it) or the one saved to be continued (next_epoch is itself)."""
    return position < length and next_epoch in (epoch, epoch + 1)


def _checked_info(entry: Any, name: str) -> Dict[str, Any]:
    """A copy of a saved history entry: string keys and plain values (what a checkpoint can
    hold), and ints for the counts that updates add to."""
    if not isinstance(entry, dict):
        raise ValueError(f"{name} must be a dict, got {type(entry).__name__}")
    entry = dict(entry)
    for key, value in entry.items():
        if not isinstance(key, str) or type(value) not in (str, int, float, bool, type(None)):
            raise ValueError(f"{name} must map names to plain values, got {key!r:.40}: {type(value).__name__}")
    for key in ("epoch", "samples", "nonfinite_skipped", "nonfinite_clamped"):
        if key in entry:
            entry[key] = _backend.check_count(entry[key], f"{name}[{key!r}]")
    return entry


def _checked_counters(counters: Any) -> Dict[str, int]:
    if not isinstance(counters, dict):
        raise ValueError(f"state['counters'] must be a dict, got {type(counters).__name__}")
    unknown = sorted(str(k) for k in counters if k not in _COUNTERS)
    if unknown:
        raise ValueError(f"state['counters'] holds unknown counters {unknown}; expected {list(_COUNTERS)}")
    return {key: _backend.check_count(value, f"state['counters'][{key!r}]") for key, value in counters.items()}


#: Appendix A of the seed paper on CIFAR-10 (N = 50,000): per score, |Z| as a fraction of N
#: and the warm-up epochs (the paper-study runner's presets "last_loss" and "running_loss")
PAPER_APPENDIX_A: Dict[str, Tuple[float, int]] = {
    "last_loss": (8192 / 50000, 5),
    "running_loss": (30000 / 50000, 0),
}


def paper_options(
    num_items: int,
    *,
    score: str = "last_loss",
    samples_per_epoch: Optional[int] = None,
    warmup_epochs: Optional[int] = None,
    beta: Optional[float] = None,
    temperature: float = 1.0,
    replacement: bool = False,
) -> Dict[str, Any]:
    """The ``ImportanceSampler`` arguments (all but num_items, seed, device, nonfinite and
    clamp_value) of the seed paper's method: see ``ImportanceSampler.paper``."""
    if not isinstance(score, str) or score not in PAPER_APPENDIX_A:
        raise ValueError(
            f"score must be one of the seed paper's scores {sorted(PAPER_APPENDIX_A)}, got {score!r}; "
            "for another score build ImportanceSampler(..., transform='softmax', weighting='inverse_probability', "
            "uniform_mix=0.0) yourself"
        )
    num_items = _backend.check_count(num_items, "num_items", limit=MAX_CAPACITY)
    fraction, paper_warmup = PAPER_APPENDIX_A[score]
    if score == "running_loss":
        policy: ScorePolicy = RunningLoss(0.2 if beta is None else beta)
    elif beta is not None:
        raise ValueError("beta is the running loss's: pass score='running_loss', or leave beta out")
    else:
        policy = LastLoss()
    return dict(
        score=policy,
        transform=Softmax(temperature),
        samples_per_epoch=max(1, round(fraction * num_items)) if samples_per_epoch is None else samples_per_epoch,
        replacement=replacement,
        warmup_epochs=paper_warmup if warmup_epochs is None else warmup_epochs,
        weighting="inverse_probability",
        uniform_mix=0.0,
        initial_score=0.0,
    )


class ImportanceSampler(EpochSampler):
    """Algorithm 1 of the seed paper: uniform warm-up, then importance-sampled epochs.

    The defaults are the recipe the project's studies back, which does no harm where
    importance sampling does not help: after one epoch of uniform shuffling (every item
    scored once), each epoch draws N items with replacement from
    q_i = 0.8 (L_i + 1e-6) / sum_j (L_j + 1e-6) + 0.2 / N, L_i being the item's last loss,
    and weights them 1 / (N q_i), which is unbiased and at most 5. The seed paper's softmax of
    the loss with 1 / (N p) weights raised the exact gradient variance above uniform
    sampling's (0.9-1.8x in training) where this recipe lowered it (0.5-0.86x); see
    docs/results/variance and docs/results/defaults. ``ImportanceSampler.paper(N)`` builds the
    paper's method; the defaults before this change were ``transform="softmax",
    uniform_mix=0.0, warmup_epochs=0``.

    Args:
        num_items: N, the dataset's length.
        score: a ScorePolicy or ``"last_loss"`` (default), ``"running_loss"``, ``"grad_norm"``.
        transform: a Transform or ``"proportional"`` (default: ``Proportional(1.0, 1e-6)``,
            p ∝ score + 1e-6), ``"softmax"`` (T = 1, the seed paper's), ``"rank"``.
        samples_per_epoch: |Z|, items drawn per importance epoch (default N).
        replacement: draw Z with replacement (i.i.d., default) or without (k distinct items).
        warmup_epochs: epochs of uniform shuffling (all N items, weights 1) that only record
            scores (default 1: every item has a loss before the first importance epoch).
        weighting: ``"auto"`` (default) gives unbiased weights: 1 / (N p_i) with replacement, and
            |Z| / (N pi_i) without, pi_i being the item's inclusion probability given the
            other items (exactly unbiased, see SumTree.sample_with_inclusion);
            ``"inverse_probability"`` uses 1 / (N p_i) in both cases, as the seed paper does
            (biased without replacement); ``"none"`` gives weights 1 (biased).
        uniform_mix: lam in [0, 1]: sample from (1 - lam) p + lam / N, which bounds the
            weights by 1 / lam (default 0.2: weights <= 5).
        weight_exponent: beta, a float or a function epoch -> float: weights ** beta
            (PER-style; anneal it towards 1 to remove the bias it adds).
        normalize_weights: None (default), ``"max"`` (divide by the epoch's largest weight,
            as PER does) or ``"mean"``.
        initial_score: score of every item before its first update (default 0).
        nonfinite: what ``update`` does with a NaN or infinite score (a diverging model):
            ``"raise"`` (default: ValueError, nothing changes), ``"skip"`` (leave those items
            out, counted in ``counters["nonfinite_skipped"]``) or ``"clamp"`` (+-inf becomes
            +-``clamp_value``, counted in ``counters["nonfinite_clamped"]``; NaN is skipped).
        clamp_value: the bound for ``nonfinite="clamp"`` (default 1e4).
        seed: makes every epoch's draw reproducible.
        device: where the tree lives (``"cpu"``).

    Memory: the tree (8.5–16.5 bytes per item), 8 bytes per item of scores for the
    proportional and rank transforms, 8 bytes per item for the current epoch's weights, and 8
    bytes per drawn item for its order. A sampler that cannot fit raises MemoryError naming
    the bytes it needs, at construction.

    Threads: see EpochSampler.
    """

    _format = "isample.ImportanceSampler"

    def __init__(
        self,
        num_items: int,
        *,
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
        _policy_items: Optional[int] = None,
    ) -> None:
        super().__init__(
            num_items, score=score, nonfinite=nonfinite, seed=seed, device=device, clamp_value=clamp_value,
            policy_items=_policy_items,
        )
        num_items = self.num_items
        self.transform = get_transform(transform)
        samples = num_items if samples_per_epoch is None else _backend.check_count(samples_per_epoch, "samples_per_epoch")
        if samples < 1:
            raise ValueError("samples_per_epoch must be at least 1")
        replacement = _backend.check_bool(replacement, "replacement")
        if not replacement and samples > num_items:
            raise ValueError(f"samples_per_epoch={samples} exceeds num_items={num_items} without replacement")
        weighting = _backend.check_choice(weighting, "weighting", ("auto", "inverse_probability", "none"))
        uniform_mix = _backend.check_real(uniform_mix, "uniform_mix", low=0.0, high=1.0)
        if not callable(weight_exponent):
            weight_exponent = _backend.check_real(weight_exponent, "weight_exponent (a number or a function of the epoch)", low=0.0, high=1.0)
        normalize_weights = _backend.check_choice(normalize_weights, "normalize_weights", (None, "max", "mean"))
        initial_score = _backend.check_real(initial_score, "initial_score")
        self.samples_per_epoch = samples
        self.replacement = replacement
        self.warmup_epochs = _backend.check_count(warmup_epochs, "warmup_epochs")
        self.weighting = weighting
        self.uniform_mix = uniform_mix
        self.weight_exponent = weight_exponent
        self.normalize_weights = normalize_weights
        self.initial_score = initial_score

        # Everything is checked before it is touched: first with a lower bound of the tree's
        # size (a SoftmaxTree fills its leaves when built), then with its exact size (a SumTree
        # costs nothing until touched on the CPU). A rejected construction keeps nothing: the
        # tree goes with the frame's last reference.
        holds_scores = self.transform.tree_holds_scores
        what = f"ImportanceSampler({num_items:,} items, {self.transform.name})"
        longest_epoch = max(samples, num_items if self.warmup_epochs else 0)
        others = {
            "scores": 0 if holds_scores else 8 * num_items,
            "epoch weights": 8 * num_items,
            "epoch order": 8 * longest_epoch,
        }
        check_fits(what, {"tree (at least)": (16 if holds_scores else 8) * num_items, **others}, self.device)
        tree = self.transform.make_tree(num_items, device=self.device, seed=derive_seed(self.seed, "tree"))
        try:
            check_fits(what, {"tree": tree.nbytes, **others}, self.device)
            scores: Optional[torch.Tensor] = None
            if holds_scores:
                if self.initial_score != 0.0:
                    tree.assign(allocate("the initial scores", 8 * num_items,
                                         lambda: torch.full((num_items,), self.initial_score, dtype=torch.float64)))
            else:
                scores = allocate(
                    "the score of every item", 8 * num_items,
                    lambda: torch.full((num_items,), self.initial_score, dtype=torch.float64, device=self.device),
                )
                if not self.transform.epoch_level:
                    tree.assign(self.transform.leaf_values(scores))
        except BaseException:
            tree = scores = None  # noqa: F841  (the traceback keeps this frame: drop the memory now)
            raise
        self._tree = tree
        self._scores = scores
        self._max_leaf = tree.max_device_weight  # the GPU tree refuses leaves above it
        self._step = self._make_step()

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
    ) -> "ImportanceSampler":
        """The seed paper's method exactly (Algorithm 1 with its Appendix A settings): the
        softmax of the scores (``Softmax(temperature)``), |Z| draws per epoch without
        replacement, weights 1 / (N p_i) (``weighting="inverse_probability"``), no uniform
        mixture, every score 0 before its first loss. It is what the paper-study runner
        (``isample train --preset last_loss`` / ``running_loss``) builds.

        Args:
            num_items: N, the dataset's length.
            score: ``"last_loss"`` (default) or ``"running_loss"``, the paper's two scores.
            samples_per_epoch: |Z| (default: Appendix A's, scaled from CIFAR-10's 50,000
                items to N: round(8192 / 50000 N) for the last loss, round(30000 / 50000 N)
                for the running loss).
            warmup_epochs: uniform epochs first (default: Appendix A's, 5 for the last loss,
                0 for the running loss).
            beta: the running loss's S = beta S + (1 - beta) L (default 0.2, Appendix A);
                only with ``score="running_loss"``.
            temperature: the softmax's T (1, the paper's).
            replacement: draw Z with replacement (the paper leaves it open; Appendix A: False).
            nonfinite: as for ``ImportanceSampler``.
            clamp_value: as for ``ImportanceSampler``.
            seed: as for ``ImportanceSampler``.
            device: as for ``ImportanceSampler``.

        Returns the same sampler as ``ImportanceSampler(num_items, **paper_options(...))``:
        ``ImportanceSampler(N, score="last_loss", transform=Softmax(1.0),
        samples_per_epoch=round(8192 / 50000 * N), replacement=False, warmup_epochs=5,
        weighting="inverse_probability", uniform_mix=0.0, initial_score=0.0)`` by default.
        """
        options = paper_options(
            num_items, score=score, samples_per_epoch=samples_per_epoch, warmup_epochs=warmup_epochs,
            beta=beta, temperature=temperature, replacement=replacement,
        )
        return cls(num_items, **options, nonfinite=nonfinite, clamp_value=clamp_value, seed=seed, device=device)

    # -- scores ---------------------------------------------------------------------------
    def _read_scores(self, indices):
        if self._scores is None:
            return self._tree.get(indices)
        return torch.index_select(self._scores, 0, self._safe_indices(indices))  # no wrap-around, unlike []

    def _check_device(self):
        self._tree.check()
        super()._check_device()

    def _blend_scores(self, indices, losses, keep):
        if self._scores is None:  # one call of the core; it validates before writing
            self._tree.blend(indices, losses, keep)
        elif not self._store_in_core(indices, losses, keep):
            super()._blend_scores(indices, losses, keep)

    def _make_step(self):
        """The compiled step of a CPU sampler: for the softmax tree, for Proportional leaves
        (the core computes them as Proportional.leaf_values does) and for the score store of
        an epoch-level transform; weights only otherwise (a transform of the user's, or the
        GPU algorithms built for the host)."""
        if self.device is not _CPU:
            return None
        fast, transform = self._tree._fast, self.transform  # fast: None for the GPU algorithms on the host
        alpha, eps = 1.0, 0.0
        if self._scores is None:
            kind = _STEP_SOFTMAX if fast is not None else _STEP_WEIGHTS
        elif transform.epoch_level:
            kind = _STEP_SCORES  # the scores only: the tree is rebuilt when an epoch is drawn
        elif type(transform) is Proportional and fast is not None:
            kind, alpha, eps = _STEP_PROPORTIONAL, transform.alpha, transform.eps
        else:
            kind = _STEP_WEIGHTS
        return _core.SamplerStep(self.num_items, kind, fast, self._scores, alpha, eps, self._lock)

    def _store_in_core(self, indices: Any, values: Any, keep: float) -> bool:
        """CPU: s = keep * S + (1 - keep) * values into the score store (s = values for keep
        0) and, for Proportional, its leaves into the tree, in one call of the core that
        checks everything before writing. The same arithmetic as the softmax tree's blend.
        False (nothing done) for arguments that are not plain arrays, a batch the core
        refuses, or a sampler without a compiled step for its transform."""
        step = self._step
        return step is not None and self._scores is not None and step.store(indices, values, keep)

    def _write_scores(self, indices, scores):
        if self._scores is None:  # the SoftmaxTree holds the scores and validates them itself
            self._tree.update(indices, scores)
            return
        if self._store_in_core(indices, scores, 0.0):
            return
        if self.transform.epoch_level:  # only the score tensor: it checks the indices and scores
            self._store_scores(self._scores, indices, scores)
            return
        if self.device.type != "cuda":
            if not _all_finite(scores):
                raise ValueError("scores must be finite")  # leaf_values could make -inf finite
            self._tree.update(indices, self.transform.leaf_values(scores))  # checks the indices before writing
            self._store_scores(self._scores, indices, scores, checked=True)
            return
        # CUDA: the tree refuses the batch on the device; the score store follows the same
        # decision (the tree's own test of the leaves), so the two never diverge.
        leaves = self.transform.leaf_values(scores)
        self._tree.update(indices, leaves)
        tree_accepts = ((leaves >= 0.0) & (leaves <= self._max_leaf)).all()  # False for NaN too
        self._store_scores(self._scores, indices, scores, accept=tree_accepts)

    def scores(self) -> torch.Tensor:
        return self._tree.get() if self._scores is None else self._scores.clone()

    def probabilities(self) -> torch.Tensor:
        """p of every item as the next importance epoch would draw it, float64 (N,)."""
        if self.transform.epoch_level:
            p = self.transform.probabilities(self._scores)
        else:
            p = self._tree.probability()
        if self.uniform_mix:
            p = p * (1.0 - self.uniform_mix) + self.uniform_mix / self.num_items
        return p

    # -- drawing --------------------------------------------------------------------------
    def _epoch_exponent(self, epoch: int) -> float:
        if not callable(self.weight_exponent):
            return self.weight_exponent
        value = self.weight_exponent(epoch)
        try:
            return _backend.check_real(value, f"weight_exponent({epoch})", low=0.0, high=1.0)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{error}: the function must return a number in [0, 1]") from None

    def _draw(self, epoch, generator):
        n, m = self.num_items, self.samples_per_epoch
        if epoch < self.warmup_epochs:
            order = torch.randperm(n, generator=generator).to(self.device)
            return _Epoch(epoch, order, None, info={"kind": "warmup", "distinct": n})
        if self.transform.epoch_level:
            self._tree.assign(self.transform.leaf_values(self._scores))
        lam = self.uniform_mix
        draw_seed = derive_seed(self.seed, epoch, "draw")
        if self.replacement:
            items = self._tree.sample(m, seed=draw_seed)
            if lam > 0.0:
                uniform = torch.rand(m, generator=generator, dtype=torch.float64) < lam
                items[uniform.to(items.device)] = torch.randint(
                    n, (int(uniform.sum()),), generator=generator
                ).to(items.device)
            p = self._tree.probability(items) * (1.0 - lam) + lam / n
            weights = 1.0 / (n * p)
            order = items  # i.i.d. draws: already in random order
        else:
            tree = self._tree
            if lam > 0.0:
                mixed = tree.probability() * (1.0 - lam) + lam / n
                tree = SumTree.from_weights(mixed, device=self.device, seed=0)
            items, inclusion = tree.sample_with_inclusion(m, seed=draw_seed)
            if self.weighting == "inverse_probability":
                weights = 1.0 / (n * tree.probability(items))
            else:
                weights = m / (n * inclusion)
            shuffle = torch.randperm(m, generator=generator).to(items.device)
            order = items[shuffle]
        if self.weighting == "none":
            weights = torch.ones_like(weights)
        exponent = self._epoch_exponent(epoch)
        if exponent != 1.0:
            weights = weights.pow(exponent)
        if self.normalize_weights == "max":
            weights = weights / weights.max()
        elif self.normalize_weights == "mean":
            weights = weights / weights.mean()
        weight_of = allocate(
            f"the weights of epoch {epoch}", 8 * n,
            lambda: torch.full((n,), math.nan, dtype=torch.float64, device=self.device),
        )
        weight_of[items] = weights
        info = {
            "kind": "importance",
            "distinct": int((~torch.isnan(weight_of)).sum()),  # cheaper than torch.unique(items)
            "min_weight": float(weights.min()),
            "max_weight": float(weights.max()),
            "weight_exponent": exponent,
        }
        return _Epoch(epoch, order, weight_of, info=info)

    def epoch_length(self, epoch: int) -> Optional[int]:
        return self.num_items if epoch < self.warmup_epochs else self.samples_per_epoch

    _epoch_length = epoch_length

    def total_steps(self, num_epochs: int, batch_size: int, *, drop_last: bool = False) -> int:
        """Optimizer steps over epochs 0 .. num_epochs - 1 (warm-up epochs are N long, the
        others samples_per_epoch): what a per-step LR schedule such as OneCycleLR needs.
        Draws nothing."""
        num_epochs = _backend.check_count(num_epochs, "num_epochs")
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")

        def steps(length: int) -> int:
            return length // batch_size if drop_last else -(-length // batch_size)

        warmup = min(num_epochs, self.warmup_epochs)
        return warmup * steps(self.num_items) + (num_epochs - warmup) * steps(self.samples_per_epoch)

    # -- state ----------------------------------------------------------------------------
    def _config(self):
        exponent = "callable" if callable(self.weight_exponent) else self.weight_exponent
        return {
            **super()._config(),
            "transform": self.transform.config(),
            "samples_per_epoch": self.samples_per_epoch,
            "replacement": self.replacement,
            "warmup_epochs": self.warmup_epochs,
            "weighting": self.weighting,
            "uniform_mix": self.uniform_mix,
            "weight_exponent": exponent,
            "normalize_weights": self.normalize_weights,
            "initial_score": self.initial_score,
        }

    def _state_extra(self):
        return {"tree": self._tree.state_dict(), "scores": None if self._scores is None else self._scores.clone()}

    def _check_extra(self, state):
        if "tree" not in state or "scores" not in state:
            raise ValueError("the state lacks 'tree' or 'scores': pass a state from ImportanceSampler.state_dict()")
        scores = state["scores"]
        if (scores is None) != (self._scores is None):
            raise ValueError("the state's scores do not match this sampler's transform")
        if scores is not None:
            scores = _backend.as_values(scores, self.device, self.num_items, name="state['scores']")
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("state['scores'] holds a non-finite score")
        tree_state = state["tree"]
        self._tree.check_state_dict(tree_state)
        return tree_state, scores

    def _apply_extra(self, checked):
        tree_state, scores = checked
        self._tree.load_state_dict(tree_state)  # the core may still refuse, before changing anything
        if scores is not None:
            self._scores.copy_(scores)

    def __repr__(self) -> str:
        return (
            f"ImportanceSampler(num_items={self.num_items}, score={self.score_policy!r}, "
            f"transform={self.transform!r}, samples_per_epoch={self.samples_per_epoch}, "
            f"replacement={self.replacement}, warmup_epochs={self.warmup_epochs}, weighting={self.weighting!r})"
        )


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that each item comes with its index: ``(i, x, y)`` for a
    dataset of ``(x, y)`` tuples, ``{..., "index": i}`` for dicts, ``(i, item)`` otherwise.
    The default collate function then gives the batch's indices as an int64 tensor, ready
    for ``sampler.update`` and ``sampler.weights``."""

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("IndexedDataset needs a map-style dataset with __getitem__ and __len__")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _with_index(index, self.dataset[index])

    def __getitems__(self, indices: List[int]) -> List[Any]:
        """A whole batch at once (torch's DataLoader calls this where a dataset defines it):
        the same items as ``[self[i] for i in indices]``. A ``TensorDataset`` is read with one
        indexing per tensor instead of one per item and tensor; a dataset with its own
        ``__getitems__`` is asked for the batch in one call."""
        dataset = self.dataset
        if type(dataset) is TensorDataset and dataset.tensors and indices and 0 <= min(indices) and max(indices) < len(dataset):
            where = torch.as_tensor(indices, dtype=torch.int64)
            columns = [tensor.index_select(0, where).unbind(0) for tensor in dataset.tensors]
            return [(index, *row) for index, row in zip(indices, zip(*columns))]
        if callable(getattr(dataset, "__getitems__", None)):
            items = dataset.__getitems__(indices)
            if isinstance(items, list) and len(items) == len(indices):
                return [_with_index(index, item) for index, item in zip(indices, items)]
        return [_with_index(index, dataset[index]) for index in indices]


def _with_index(index: int, item: Any) -> Any:
    """An item with its index, as IndexedDataset gives it."""
    if isinstance(item, tuple):
        return (index, *item)
    if isinstance(item, dict):
        if "index" in item:
            raise ValueError("the dataset's items already have an 'index' key")
        return {**item, "index": index}
    return (index, item)


def _as_losses(losses: Any, length: int, device: torch.device, name: str = "losses") -> torch.Tensor:
    """Per-example losses (or scores) as float64 (length,) on `device`, detached; errors name
    the argument and the fix."""
    if type(losses) is torch.Tensor and losses.dim() == 1 and losses.shape[0] == length and not losses.requires_grad:
        if losses.dtype is torch.float64 and losses.is_contiguous() and _backend._on(losses, device) and not losses.is_neg():
            return losses
    if isinstance(losses, torch.Tensor):
        t = _backend.checked_tensor(losses, name)
        if t.dim() == 0:
            if name == "losses":
                raise ValueError(
                    "update() needs one loss per example, got a scalar: compute the loss with reduction='none'"
                )
            raise ValueError(f"{name} must hold one value per index, got a scalar (0-d tensor)")
        if t.is_complex() or t.dtype is torch.bool:
            raise TypeError(f"{name} must be real numbers, got dtype {t.dtype}")
        t = t.detach()
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{name} must have shape ({length},) like the indices, got {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.float64).contiguous()
    if isinstance(losses, (numbers.Number, np.generic)) and not isinstance(losses, (bool, np.bool_)) and name == "losses":
        raise ValueError("update() needs one loss per example, got a scalar: compute the loss with reduction='none'")
    return _backend.as_values(losses, device, length, name=name)
