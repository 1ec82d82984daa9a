"""Prioritized experience replay (Schaul et al. 2016) on isample's exact float64 sum tree.

What TorchRL's ``PrioritizedSampler`` and cpprb's ``PrioritizedReplayBuffer`` use their sum
trees for: a ring buffer of transitions, each drawn with probability

    P(i) = (p_i + eps)^alpha / sum_j (p_j + eps)^alpha

and weighted by w_i = (N P(i))^-beta, N the number of stored items, normalised so that the
largest weight is 1 (``normalize="batch"``: the batch's largest, as the PER paper writes it;
``"buffer"``: the largest any stored item could get, as cpprb and OpenAI baselines do).
New items get the largest priority given so far (1.0 at first), so each is likely to be
seen soon.

Moving from cpprb (``docs/adapters.md`` has the full diff)::

    rb = PrioritizedReplayBuffer(100_000, alpha=0.6, eps=1e-4, normalize="buffer",  # no env_dict
                                 bool_as_float=True)             # gymnasium's bool done -> 0./1.
    rb.add(obs=obs, act=act, rew=rew, next_obs=next_obs, done=done)                # one transition
    batch = rb.sample(32, beta=0.4)       # dict of tensors + "indices" (or "indexes"), "weights"
    rb.update_priorities(batch["indexes"], np.abs(td))      # numpy or torch
    rb.get_stored_size()                                      # == len(rb)

Cost, on the CPU: each of ``add`` (one transition), ``sample`` and ``update_priorities`` is
one call into the compiled core, which checks everything before it changes anything:
``sample(k)`` is one O(k log n) tree descent, the drawn leaves, the weights and a gather per
field; ``update_priorities(k)`` checks the slots and priorities, computes the leaves and
re-sums the touched ancestors, O(k log n); ``add`` checks and converts each field's value
and sets one leaf. Arguments the core does not read as they are (lists, uint64 indices,
non-contiguous or big-endian arrays, float16 fields, ...) take a general Python path with
the same results. ``normalize="buffer"`` needs the smallest priority: the tree keeps it, as
a min over children beside the sums (O(1) to read, updated with the sums). Memory: the
fields' storage plus 8.5 bytes per slot for the tree (9.1 with ``normalize="buffer"``; on a
GPU that buffer keeps a copy of the leaves instead, 16.5).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .. import _backend, _core
from .._backend import DeviceLike, check_count, resolve_device
from ..tree import SumTree
from ._replay_fields import FieldStorage, as_field
from ._smallest_leaf import SmallestLeaf

__all__ = ["PrioritizedReplayBuffer", "ReplayBatch"]

_FORMAT = "isample.PrioritizedReplayBuffer"
_VERSION = 1
_STATE_KEYS = ("format", "version", "config", "beta", "size", "position", "max_priority", "storage", "tree")
#: the core's codes for ``normalize`` (csrc/replay.h)
_NORMALIZE_CODES = {None: 0, "batch": 1, "buffer": 2}


class ReplayBatch(dict):
    """``sample``'s result: a dict of tensors. ``batch["indexes"]`` (cpprb's name) reads
    ``batch["indices"]``; only "indices" is a key (iteration, ``in`` and ``get`` see it alone)."""

    def __missing__(self, key: Any) -> torch.Tensor:
        if key == "indexes":
            return self["indices"]
        raise KeyError(key)


def _real(value: Any, name: str) -> float:
    """A real number (Python or numpy, not bool) as a float; TypeError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


class PrioritizedReplayBuffer:
    """A ring buffer of transitions sampled in proportion to (priority + eps)^alpha.

    Args:
        capacity: number of slots; once full, each new item overwrites the oldest.
        alpha: priority exponent >= 0 (default 0.6; 0 samples uniformly).
        beta: weight exponent in [0, 1] (default 0.4; anneal it to 1); ``sample`` may
            override it per call.
        eps: added to every priority (default 1e-6) so that an item with priority 0 can
            still be drawn; with ``eps=0`` such an item is never drawn.
        normalize: ``"batch"`` (default): divide the weights by the batch's largest;
            ``"buffer"``: by the largest weight of any stored item (cpprb's choice; the tree
            keeps the smallest priority, 0.53 bytes per slot more, at the same speed);
            ``None``: raw (N P(i))^-beta.
        bool_as_float: store a field whose first value is bool (gymnasium's ``terminated``)
            as float32 0/1, so that ``1 - batch["done"]`` works as with cpprb (default False:
            every field keeps its first value's dtype).
        device: where the tree and the storage live (``"cpu"``, or ``"cuda"`` in a CUDA build).
        seed: seed of the draws (default: from torch's default generator, so
            ``torch.manual_seed`` makes a run reproducible).

    Fields are whatever the first ``add`` is given: each becomes a tensor of shape
    (capacity, *item_shape) with that first value's dtype. Later values must have the same
    names and shapes and a dtype that casts safely (``torch.can_cast``); integers must fit
    a narrower integer field. Every call checks all its input before it changes anything.
    Copies (``copy.deepcopy``, ``pickle``) go through ``state_dict``.
    """

    def __init__(
        self,
        capacity: int,
        *,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        normalize: Optional[str] = "batch",
        bool_as_float: bool = False,
        device: DeviceLike = "cpu",
        seed: Optional[int] = None,
    ) -> None:
        capacity = check_count(capacity, "capacity")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        alpha, eps = _real(alpha, "alpha"), _real(eps, "eps")
        if not (math.isfinite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        beta = self._check_beta(beta)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if normalize not in ("batch", "buffer", None):
            raise ValueError(f"normalize must be 'batch', 'buffer' or None, got {normalize!r}")
        if not isinstance(bool_as_float, bool):
            raise TypeError(f"bool_as_float must be True or False, got {bool_as_float!r}")
        self.capacity = capacity
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.normalize = normalize
        self.bool_as_float = bool_as_float
        self.device = resolve_device(device)
        self._cpu = self.device.type == "cpu"
        # normalize="buffer" needs the smallest priority: a CPU tree keeps it (a min over children
        # beside the sums); on a GPU a copy of the leaves beside the tree does
        self._tree = self._new_tree(seed)
        self._smallest = (
            SmallestLeaf(capacity, self.device, zeros_possible=eps == 0.0 and alpha > 0.0)
            if normalize == "buffer" and not self._cpu
            else None
        )
        self._fields: Optional[FieldStorage] = None
        # the core's one-call add / sample / update_priorities (CPU; None until the fields exist)
        self._store: Any = None
        self._size = 0
        self._position = 0  # next slot to write
        self._set_max_priority(1.0)
        self._one_leaf = torch.from_numpy(np.zeros(1))  # the leaf of a one-item add (the tree copies it)
        self._scratch_pair: Optional[Tuple[torch.Tensor, np.ndarray]] = None

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of stored items (at most ``capacity``)."""
        return self._size

    def get_stored_size(self) -> int:
        """``len(self)``, under cpprb's name."""
        return self._size

    def get_buffer_size(self) -> int:
        """``capacity``, under cpprb's name."""
        return self.capacity

    def get_next_index(self) -> int:
        """The slot the next item goes to, under cpprb's name."""
        return self._position

    def is_Nstep(self) -> bool:  # noqa: N802  (cpprb's name)
        """False: cpprb's N-step returns are not provided."""
        return False

    def on_episode_end(self) -> None:
        """cpprb's end-of-episode call; here it does nothing: the buffer keeps no episode
        structure (cpprb needs it only for N-step returns and ``next_of`` compression, which
        are not provided), so a loop that calls it runs unchanged."""

    def get_all_transitions(self) -> Dict[str, torch.Tensor]:
        """Every stored item, in slot order: each field's first ``len(self)`` rows (copies)."""
        return {} if self._fields is None else self._fields.head(self._size)

    @property
    def max_priority(self) -> float:
        """The largest priority given so far (1.0 before any): what new items get."""
        return self._max_priority

    def get_max_priority(self) -> float:
        """``max_priority``, under cpprb's name."""
        return self._max_priority

    @property
    def fields(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Each field's item shape and dtype (empty before the first ``add``)."""
        return {} if self._fields is None else self._fields.layout

    def _new_tree(self, seed: Optional[int]) -> SumTree:
        track_min = self.normalize == "buffer" and self._cpu
        return SumTree(self.capacity, device=self.device, seed=seed, track_min=track_min)

    def _make_store(self) -> None:
        """The core's one-call paths for the current tree and fields, where the buffer lives
        on the CPU, the fields all have a dtype the core writes, and the core makes tensors."""
        self._store = None
        fields, handle = self._fields, self._tree._fast
        if fields is None or handle is None or not _backend.FAST_TENSORS:
            return
        described = fields.core_fields()
        if described is None:
            return
        store = _core.ReplayStore(handle, np.generic, self.alpha, self.eps, _NORMALIZE_CODES[self.normalize])
        for name, storage, sources, python in described:
            store.add_field(name, storage, sources, python)
        self._store = store

    # -- checks ---------------------------------------------------------------------------
    @staticmethod
    def _check_beta(beta: Any) -> float:
        if type(beta) is float and 0.0 <= beta <= 1.0:
            return beta
        beta = _real(beta, "beta")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        return beta

    def _leaf_of(self, priority: float) -> float:
        """(priority + eps) ** alpha, or ValueError when it overflows float64."""
        try:
            leaf = (priority + self.eps) ** self.alpha
        except OverflowError:
            leaf = math.inf
        if not math.isfinite(leaf):
            raise ValueError(
                f"(priority + eps) ** alpha overflows float64 for priority {priority!r} and alpha={self.alpha}: "
                "rescale the priorities"
            )
        return leaf

    def _set_max_priority(self, priority: float) -> None:
        self._new_leaf = self._leaf_of(priority)  # the leaf new items get
        self._max_priority = priority

    def _bad_slots(self, slots: torch.Tensor) -> IndexError:
        bad = slots[(slots < 0) | (slots >= self._size)][:5].tolist()
        where = f"slots 0..{self._size - 1}" if self._size else "no slot (the buffer is empty)"
        return IndexError(f"indices {bad} hold no item: the buffer stores {self._size} items in {where}")

    def _slots(self, indices: Any) -> torch.Tensor:
        """`indices` as int64 (k,) on the device, each a slot that holds an item.

        An int64 tensor on the buffer's device is taken as it is. Once a CPU buffer is full,
        the tree's own range check is the check (its IndexError is reworded by the caller);
        a CUDA tree finds bad indices only later, so there they are always checked here."""
        if (
            type(indices) is torch.Tensor
            and indices.dtype is torch.int64
            and indices.dim() == 1
            and (indices.is_cpu if self._cpu else indices.device == self.device)
            and not indices.is_neg()
        ):
            slots = indices
        else:
            slots = self._as_slots(indices)
        if slots.shape[0] and (self._size < self.capacity or not self._cpu):
            if self._cpu:
                index = slots.numpy()
                out_of_range = index.min() < 0 or index.max() >= self._size
            else:
                out_of_range = bool(((slots < 0) | (slots >= self._size)).any())
            if out_of_range:
                raise self._bad_slots(slots)
        return slots

    def _as_slots(self, indices: Any) -> torch.Tensor:
        if isinstance(indices, (str, bytes)):
            raise TypeError(f"indices must be integers (sample()['indices']), got {type(indices).__name__} {indices!r}")
        if isinstance(indices, torch.Tensor):
            if indices.layout is not torch.strided:
                raise TypeError(f"indices is a {indices.layout} tensor: pass a dense one")
            array: Any = indices.detach().resolve_neg()
            kind = "b" if array.dtype is torch.bool else "f" if array.is_floating_point() or array.is_complex() else "i"
        else:
            try:
                array = np.asarray(indices)
            except (TypeError, ValueError) as error:
                raise TypeError(f"indices must be integers (sample()['indices']): {error}") from None
            kind = array.dtype.kind
        if kind not in "iu":
            raise TypeError(f"indices must be integers (sample()['indices']), got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"indices must have shape (k,), got {tuple(array.shape)}")
        if isinstance(array, np.ndarray):
            if kind == "u" and array.size and int(array.max()) > 2**63 - 1:
                raise IndexError(f"indices {array[array > 2**63 - 1][:5].tolist()} hold no item: the buffer stores {self._size} items")
            array = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        elif array.dtype is torch.uint64:
            return self._as_slots(array.cpu().numpy())
        return array.to(device=self.device, dtype=torch.int64).contiguous()

    def _as_priorities(self, priorities: Any) -> Union[float, Any]:
        """A Python float for a scalar, else (k,) real numbers: a numpy array on the CPU (any
        real dtype: ``_leaves`` computes in float64), a float64 tensor elsewhere."""
        if type(priorities) is np.ndarray:
            array = priorities
        elif isinstance(priorities, torch.Tensor):
            p = priorities.detach()
            if p.layout is not torch.strided or p.dtype is torch.bool or p.is_complex():
                raise TypeError(f"priorities must be real numbers, got a {p.layout} tensor of dtype {p.dtype}")
            if p.dim() == 0:
                return float(p)
            if not self._cpu:
                p = p.to(device=self.device, dtype=torch.float64)
                if p.dim() != 1:
                    raise ValueError(f"priorities must have shape (k,), one per item, got {tuple(p.shape)}")
                return p
            if p.is_floating_point() and p.dtype not in (torch.float16, torch.float32, torch.float64):
                p = p.to(torch.float64)  # bfloat16 and float8 have no numpy dtype
            array = p.resolve_neg().cpu().numpy()
        elif isinstance(priorities, (str, bytes)):
            raise TypeError(f"priorities must be numbers (a tensor, an array or a number), got {type(priorities).__name__} {priorities!r}")
        elif isinstance(priorities, numbers.Real) and not isinstance(priorities, bool):
            return float(priorities)
        else:
            try:
                array = np.asarray(priorities)
            except (TypeError, ValueError) as error:
                raise TypeError(f"priorities must be real numbers: {error}") from None
        if array.dtype.kind not in "iuf":
            raise TypeError(f"priorities must be real numbers, got an array of dtype {array.dtype}")
        if array.ndim == 0:
            return float(array)
        if array.ndim != 1:
            raise ValueError(
                f"priorities must have shape (k,), one per item, got {tuple(array.shape)}"
                + ("; flatten them with .reshape(-1)" if array.size == max(array.shape) else "")
            )
        if not self._cpu:
            return torch.from_numpy(array.astype(np.float64)).to(self.device)
        return array

    def _scratch(self, k: int) -> Tuple[torch.Tensor, np.ndarray]:
        """A float64 (k,) tensor and its numpy view, reused from call to call (the tree copies
        what it is given), so that a training loop's calls allocate nothing for their leaves."""
        if k > 4096:
            t = torch.from_numpy(np.empty(k))
            return t, t.numpy()
        if self._scratch_pair is None or self._scratch_pair[1].shape[0] != k:
            t = torch.from_numpy(np.empty(k))
            self._scratch_pair = (t, t.numpy())
        return self._scratch_pair

    def _leaves(self, priorities: Any, count: int) -> Tuple[torch.Tensor, float]:
        """Validated priorities -> tree leaves (p + eps)^alpha, float64 (count,), and their max.
        On the CPU the leaves are scratch memory: valid until the next call."""
        p = self._as_priorities(priorities)
        if isinstance(p, float):
            if not (0.0 <= p < math.inf):
                raise ValueError(f"priorities must be finite and >= 0, got {p} (e.g. pass td_error.abs())")
            leaf = self._leaf_of(p)
            return torch.full((count,), leaf, dtype=torch.float64, device=self.device), (p if count else -math.inf)
        if p.shape[0] != count:
            raise ValueError(f"priorities must have shape ({count},), one per item, got {tuple(p.shape)}")
        if count == 0:
            return torch.empty(0, dtype=torch.float64, device=self.device), -math.inf
        lowest, largest = float(p.min()), float(p.max())
        if not (lowest >= 0.0 and largest < math.inf):  # NaN fails both
            bad = p[~((p >= 0) & (p < math.inf))][:5].tolist()
            raise ValueError(f"priorities must be finite and >= 0, got {bad} (e.g. pass td_error.abs())")
        self._leaf_of(largest)  # the largest leaf must be finite: then all are
        if not self._cpu:
            return (p + self.eps) ** self.alpha, largest
        leaves, buffer = self._scratch(count)
        buffer[:] = p  # in float64 whatever p's dtype; then (p + eps) ** alpha as the core's paths compute it
        _core.proportional_leaves(leaves.data_ptr(), count, self.alpha, self.eps, leaves.data_ptr())
        return leaves, largest

    # -- the tree -------------------------------------------------------------------------
    def _write_tree(self, slots: torch.Tensor, leaves: torch.Tensor) -> None:
        """Set the leaves; the tree refuses (and keeps) everything on bad input."""
        try:
            self._tree.update(slots, leaves)
        except IndexError:
            raise self._bad_slots(slots) from None
        except ValueError as error:
            if "overflow" in str(error):
                raise ValueError(
                    "these priorities would make the sum of (priority + eps) ** alpha overflow float64: rescale them"
                ) from None
            raise

    def _get_leaves(self, slots: torch.Tensor) -> torch.Tensor:
        try:
            return self._tree.get(slots)
        except IndexError:
            raise self._bad_slots(slots) from None

    # -- priorities -----------------------------------------------------------------------
    def update_priorities(self, indices: Any, priorities: Any) -> None:
        """Set the priorities of stored items (e.g. to |TD error| after a learning step).

        Args:
            indices: int (k,): slots from ``sample()["indices"]`` (tensor, or an array such
                as cpprb's uint64 ``"indexes"``).
            priorities: float (k,) >= 0 (tensor with or without grad, array, or a number for all).

        A repeated index takes its last priority. Raises IndexError for a slot that holds no
        item, ValueError for NaN, infinite or negative priorities, TypeError for anything
        but numbers; a rejected call changes nothing. An item overwritten since it was
        sampled gets the priority all the same (as in cpprb without ``check_for_update``).
        """
        store = self._store
        if store is not None:  # one core call: checks, leaves, the tree; None: not plain or refused
            largest = store.update(indices, priorities, self._size)
            if largest is not None:
                if largest > self._max_priority:
                    self._set_max_priority(largest)
                return
        slots = self._slots(indices)
        leaves, largest = self._leaves(priorities, slots.shape[0])
        if not slots.shape[0]:
            return
        self._write_tree(slots, leaves)
        if self._smallest is not None:
            self._smallest.set(slots, self._tree.get(slots))
        if largest > self._max_priority:
            self._set_max_priority(largest)

    def priorities(self, indices: Any = None) -> torch.Tensor:
        """Stored priorities p_i (float64, (k,), or all ``len(self)`` when None), recovered
        from the tree's (p + eps)^alpha (exact to rounding; for alpha = 0 they are unknown:
        NaN). IndexError for a slot that holds no item."""
        slots = torch.arange(self._size, device=self.device) if indices is None else self._slots(indices)
        leaves = self._get_leaves(slots)
        if self.alpha == 0.0:
            return torch.full_like(leaves, math.nan)
        return leaves.pow(1.0 / self.alpha) - self.eps

    def probabilities(self, indices: Any = None) -> torch.Tensor:
        """P(i) of one draw (float64, (k,), or all ``len(self)`` when None). IndexError for a
        slot that holds no item."""
        slots = torch.arange(self._size, device=self.device) if indices is None else self._slots(indices)
        try:
            return self._tree.probability(slots)
        except IndexError:
            raise self._bad_slots(slots) from None

    def weights(self, indices: Any, *, beta: Optional[float] = None) -> torch.Tensor:
        """Importance weights (N P(i))^-beta of `indices` (int (k,)), normalised as
        ``normalize`` says ("batch": over these indices), float32 (k,). IndexError for a slot
        that holds no item; ValueError for one that cannot be drawn (priority 0 with eps 0)."""
        beta = self.beta if beta is None else self._check_beta(beta)
        if self._size == 0:
            raise ValueError("the buffer is empty: add items first")
        slots = self._slots(indices)
        leaves = self._get_leaves(slots)
        if slots.shape[0] and not float(leaves.min()) > 0.0:
            raise ValueError(
                f"indices {slots[leaves <= 0][:5].tolist()} have probability 0 (priority 0 with eps=0): "
                "they are never drawn, so they have no importance weight"
            )
        return self._weights_of(leaves, beta)

    def _weights_of(self, leaves: torch.Tensor, beta: float) -> torch.Tensor:
        """Normalised weights of items with these (positive) leaves, float32.

        w_i / w_ref = (P(ref) / P(i))^beta = (leaf_ref / leaf_i)^beta, so only the
        unnormalised weights need the total."""
        k = leaves.shape[0]
        if beta == 0.0 or k == 0:
            return torch.ones(k, dtype=torch.float32, device=self.device)
        if not self._cpu:
            reference = leaves.min() if self.normalize == "batch" else self._smallest.value if self.normalize else None
            w = (leaves * (self._size / self._tree.total)) ** -beta if reference is None else (reference / leaves) ** beta
            return w.to(torch.float32)
        reference = self._tree.min_positive if self.normalize == "buffer" else self._size / self._tree.total
        weights = _core.replay_weights(leaves, beta, _NORMALIZE_CODES[self.normalize], reference)
        if weights is not None:  # the core's arithmetic: the bits sample() gives
            return weights
        x = leaves.numpy()
        if self.normalize == "batch":
            reference = x.min()
        ratio = reference / x if self.normalize else x * reference
        return torch.from_numpy(np.power(ratio, beta if self.normalize else -beta).astype(np.float32))

    # -- adding ---------------------------------------------------------------------------
    def add(self, batch: Optional[Mapping[str, Any]] = None, /, *, priorities: Any = None, **fields: Any) -> torch.Tensor:
        """Store items; returns the slots they went to, int64 (k,).

        ``add(obs=o, act=a, ...)`` stores one item; ``add({"obs": O, "act": A, ...})`` stores
        a batch along dim 0 (a batch larger than ``capacity`` keeps its last ``capacity``
        items). ``priorities`` (a number or (k,)) defaults to ``max_priority``.

        The first call defines the fields. There, keyword fields that all have k entries
        along dim 0 with ``priorities`` of shape (k,) are a batch (cpprb's
        ``add(**batch, priorities=p)``); two or more keyword fields that all have k >= 2
        entries along dim 0, without such priorities, are refused as ambiguous (the error
        shows the dict form). A call that does not fit the fields raises and changes nothing.
        """
        if batch is None and priorities is None:
            store = self._store
            if store is not None:  # one core call: check the values, set the leaf, write them
                slots = store.add_one(fields, self._position, self._new_leaf)
                if slots is not None:
                    position = self._position + 1
                    self._position = position if position < self.capacity else 0
                    if self._size < self.capacity:
                        self._size += 1
                    return slots
            if self._fields is not None:
                ready = self._fields.prepare_one(fields)
                if ready is not None:
                    return self._add_one(ready)
        return self._add(batch, priorities, fields)

    def _add_one(self, ready: list) -> torch.Tensor:
        """One item whose values ``FieldStorage.prepare_one`` checked (CPU), at max priority."""
        slot = self._position
        slots = torch.from_numpy(np.array([slot], dtype=np.int64))
        self._one_leaf[0] = self._new_leaf
        self._write_tree(slots, self._one_leaf)  # first: a refused leaf (overflow) leaves the fields as they were
        self._fields.write_one(slot, ready)
        if self._smallest is not None:
            self._smallest.set_one(slot, self._new_leaf)
        self._position = slot + 1 if slot + 1 < self.capacity else 0
        if self._size < self.capacity:
            self._size += 1
        return slots

    def _keyword_batch(self, values: Dict[str, torch.Tensor], priorities: Any) -> bool:
        """Whether the first add's keyword fields are a batch (see ``add``)."""
        lengths = [v.shape[0] if v.dim() else None for v in values.values()]
        try:
            p = priorities if isinstance(priorities, (torch.Tensor, np.ndarray)) else np.asarray(priorities)
            count = p.shape[0] if p.ndim == 1 else None
        except (TypeError, ValueError):
            count = None  # _leaves explains
        if count is not None and all(n == count for n in lengths):
            return True
        first = lengths[0]
        # one field of k entries is one item (cpprb's add(obs=o) with env_dict {"obs": {"shape": k}})
        if count is None and len(lengths) >= 2 and first is not None and first >= 2 and all(n == first for n in lengths):
            names = list(values)
            as_dict = "{" + ", ".join(f"'{n}': {n}" for n in names) + "}"
            raise ValueError(
                f"add() got keyword fields that all have {first} entries along dim 0 "
                f"({', '.join(f'{n} {tuple(v.shape)}' for n, v in values.items())}). On the first add, which "
                f"defines the fields, that reads as a batch of {first} items, which add(**fields) would store as "
                f"one item. Pass a batch as one dict: rb.add({as_dict}) (or add(..., priorities=p) with p of "
                f"shape ({first},)); to store one item whose fields all have {first} entries, pass a batch of "
                f"one: rb.add({{name: value[None], ...}})"
            )
        return False

    def _add(self, batch: Optional[Mapping[str, Any]], priorities: Any, fields: Dict[str, Any]) -> torch.Tensor:
        if (batch is None) == (not fields):
            raise TypeError("add() takes one item as keyword fields, add(obs=..., ...), or a batch as one dict, add({...})")
        if batch is not None and not isinstance(batch, Mapping):
            raise TypeError(f"add()'s positional argument is a batch as a dict of field -> values, got {type(batch).__name__}")
        batched = batch is not None
        raw = dict(batch) if batched else fields
        if not raw:
            raise ValueError("add() got no fields")
        values = {str(name): as_field(v, str(name), self.device) for name, v in raw.items()}
        storage = self._fields
        if storage is None:  # the first add defines the fields; they are kept only if it succeeds
            batched = batched or self._keyword_batch(values, priorities)
            if batched:
                counts = {name: (v.shape[0] if v.dim() else None) for name, v in values.items()}
                if None in counts.values() or len(set(counts.values())) != 1:
                    raise ValueError(f"a batch needs a leading dimension of one size in every field, got {counts}")
            storage = FieldStorage.define(values, batched, self.capacity, self.device, self.bool_as_float)
        count, converted = storage.check(values, batched)
        if priorities is None:
            leaves, largest = torch.full((count,), self._new_leaf, dtype=torch.float64, device=self.device), -math.inf
        else:
            leaves, largest = self._leaves(priorities, count)
        skip = max(0, count - self.capacity)  # only the last `capacity` items of a large batch survive
        start = (self._position + skip) % self.capacity
        slots = (torch.arange(count - skip, device=self.device) + start) % self.capacity
        leaves = leaves[skip:]
        # everything is checked; the tree goes first, since it alone can still refuse (a total
        # that overflows), and it keeps its leaves when it does
        self._write_tree(slots, leaves)
        storage.write(slots, converted, batched, skip)
        if self._fields is not storage:
            self._fields = storage
            self._make_store()
        if self._smallest is not None and slots.shape[0]:
            self._smallest.set(slots, leaves)  # distinct slots: the leaves are what the tree holds
        if largest > self._max_priority:
            self._set_max_priority(largest)
        self._position = (self._position + count) % self.capacity
        self._size = min(self.capacity, self._size + count)
        return slots

    # -- sampling -------------------------------------------------------------------------
    def sample(self, batch_size: int, beta: Optional[float] = None) -> ReplayBatch:
        """Draw `batch_size` items with replacement, with probability P(i).

        Returns a dict (``ReplayBatch``) of each field's values, shape (batch_size,
        *item_shape), plus ``"indices"`` (int64 (batch_size,): pass them to
        ``update_priorities``; ``batch["indexes"]``, cpprb's name, reads them too) and
        ``"weights"`` (float32 (batch_size,): multiply the per-item losses by them).
        ``beta`` overrides the buffer's for this call. Raises ValueError on an empty buffer.
        """
        beta = self.beta if beta is None else self._check_beta(beta)
        store = self._store
        if store is not None:  # one core call: draws, their weights and the fields' rows
            out = ReplayBatch()
            if store.sample_into(out, batch_size, beta, self._size):
                return out
        if type(batch_size) is not int or batch_size < 0:
            batch_size = check_count(batch_size, "batch_size")
        if self._size == 0:
            raise ValueError("the buffer is empty: add items before sampling")
        slots, leaves = self._tree.sample_with_weights(batch_size)
        out = ReplayBatch(self._fields.gather(slots))
        out["indices"] = slots
        out["weights"] = self._weights_of(leaves, beta)
        return out

    def clear(self) -> None:
        """Forget every item (the fields stay defined) and reset the max priority to 1."""
        zeros = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
        self._tree.assign(zeros)
        if self._smallest is not None:
            self._smallest.reset(zeros)
        self._size = 0
        self._position = 0
        self._set_max_priority(1.0)

    # -- state ----------------------------------------------------------------------------
    def _config(self) -> Dict[str, Any]:
        return {"capacity": self.capacity, "alpha": self.alpha, "eps": self.eps, "normalize": self.normalize}

    def state_dict(self) -> Dict[str, Any]:
        """Items, priorities, ring position and the random stream: ``load_state_dict``
        restores them exactly (the next ``sample`` draws the same items)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self._config(),
            "beta": self.beta,
            "size": self._size,
            "position": self._position,
            "max_priority": self._max_priority,
            "storage": {} if self._fields is None else self._fields.head(self._size),
            "tree": self._tree.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` of a buffer with the same capacity, alpha, eps and
        normalize. Everything is checked first (sizes, priorities, fields, the tree, and that
        no slot beyond the size can be drawn); a state that does not fit raises and changes
        nothing."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} state of version {_VERSION}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"the state lacks {missing}: it is not a complete {_FORMAT} state")
        saved, config = state["config"], self._config()
        if not isinstance(saved, Mapping) or dict(saved) != config:
            saved = saved if isinstance(saved, Mapping) else {}
            diff = ", ".join(f"{k}: saved {saved.get(k)!r}, here {config[k]!r}" for k in config if saved.get(k) != config[k])
            raise ValueError(f"the state comes from a buffer configured differently: {diff}")
        size, position = check_count(state["size"], "state['size']"), check_count(state["position"], "state['position']")
        if size > self.capacity or position >= self.capacity or (size < self.capacity and position != size):
            raise ValueError(
                f"the state's size {size} and position {position} do not fit a ring of {self.capacity} slots "
                "(size <= capacity, position < capacity, and position == size until the ring is full)"
            )
        max_priority = _real(state["max_priority"], "state['max_priority']")
        if not (0.0 <= max_priority < math.inf):
            raise ValueError(f"state['max_priority'] must be finite and >= 0, got {max_priority!r}")
        self._leaf_of(max_priority)
        beta = self._check_beta(state["beta"])
        tree = self._new_tree(seed=0)
        tree.load_state_dict(state["tree"])  # checks the weights and the stream
        leaves = tree.get()
        if size < self.capacity and bool((leaves[size:] != 0).any()):
            raise ValueError(f"the state's tree gives weight to slots beyond its {size} items: they hold no item")
        fields = FieldStorage.from_state(state["storage"], size, self.capacity, self.device)
        self._tree, self._fields = tree, (fields if fields.storage else None)
        self._size, self._position, self.beta = size, position, beta
        self._set_max_priority(max_priority)
        if self._smallest is not None:
            self._smallest.reset(leaves)
        self._make_store()

    # -- copies ---------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        options = {**self._config(), "beta": self.beta, "bool_as_float": self.bool_as_float, "device": str(self.device)}
        return {"options": options, "state": self.state_dict()}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        self.__init__(**saved["options"], seed=0)  # the seed is replaced by the state's stream
        self.load_state_dict(saved["state"])

    def __repr__(self) -> str:
        return (
            f"PrioritizedReplayBuffer(capacity={self.capacity}, size={self._size}, alpha={self.alpha}, "
            f"beta={self.beta}, eps={self.eps}, normalize={self.normalize!r}, fields={list(self.fields)})"
        )
