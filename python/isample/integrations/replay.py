"""Prioritized experience replay (Schaul et al. 2016) on isample's exact float64 sum tree.

What TorchRL's ``PrioritizedSampler`` and cpprb's ``PrioritizedReplayBuffer`` use their sum
trees for: a ring buffer of transitions, each drawn with probability

    P(i) = (p_i + eps)^alpha / sum_j (p_j + eps)^alpha

and weighted by w_i = (N P(i))^-beta, N the number of stored items, normalised so that the
largest weight is 1 (``normalize="batch"``: the batch's largest, as the PER paper writes it;
``"buffer"``: the largest any stored item could get, as cpprb and OpenAI baselines do).
New items get the largest priority given so far (1.0 at first), so each is likely to be
seen soon.

Moving from cpprb (see ``docs/backend_protocol.md`` for the full diff)::

    rb = PrioritizedReplayBuffer(100_000, alpha=0.6, eps=1e-4, normalize="buffer")  # no env_dict
    rb.add(obs=obs, act=act, rew=rew, next_obs=next_obs, done=done)                # one transition
    batch = rb.sample(32, beta=0.4)                   # dict of tensors + "indices", "weights"
    rb.update_priorities(batch["indices"], td_error.abs())
    rb.get_stored_size()                              # == len(rb)

Cost: ``sample(k)`` is one O(k log n) tree descent plus a gather per field;
``update_priorities(k)`` re-sums the touched ancestors, O(k log n). Memory: the fields'
storage plus 8.5 bytes per slot for the tree.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .._backend import DeviceLike, check_count, resolve_device
from ..tree import SumTree

__all__ = ["PrioritizedReplayBuffer"]

_FORMAT = "isample.PrioritizedReplayBuffer"
_VERSION = 1
_RESERVED = ("indices", "weights", "priorities")


def _as_field(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A field's value as a tensor on `device` (numpy arrays and Python numbers accepted)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"field {name!r} must be numeric, got a numpy array of objects")
        return torch.from_numpy(np.ascontiguousarray(value)).to(device)
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"field {name!r} must be a tensor, an array or a number: {error}") from error


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
            ``"buffer"``: by the largest weight of any stored item (cpprb's choice; O(n) per
            ``sample``); ``None``: raw (N P(i))^-beta.
        device: where the tree and the storage live (``"cpu"``, or ``"cuda"`` in a CUDA build).
        seed: seed of the draws (default: from torch's default generator, so
            ``torch.manual_seed`` makes a run reproducible).

    Fields are whatever ``add`` is given first: each becomes a tensor of shape
    (capacity, *item_shape) with that first value's dtype. Later values must have the same
    names and shapes and a dtype that casts safely (``torch.can_cast``).
    """

    def __init__(
        self,
        capacity: int,
        *,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        normalize: Optional[str] = "batch",
        device: DeviceLike = "cpu",
        seed: Optional[int] = None,
    ) -> None:
        capacity = check_count(capacity, "capacity")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0.0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self._check_beta(beta)
        if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if normalize not in ("batch", "buffer", None):
            raise ValueError(f"normalize must be 'batch', 'buffer' or None, got {normalize!r}")
        self.capacity = capacity
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.eps = float(eps)
        self.normalize = normalize
        self.device = resolve_device(device)
        self._tree = SumTree(capacity, device=self.device, seed=seed)
        self._storage: Dict[str, torch.Tensor] = {}
        self._size = 0
        self._position = 0  # next slot to write
        self._max_priority = 1.0

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of stored items (at most ``capacity``)."""
        return self._size

    def get_stored_size(self) -> int:
        """``len(self)``, under cpprb's name."""
        return self._size

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
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in self._storage.items()}

    # -- priorities -----------------------------------------------------------------------
    @staticmethod
    def _check_beta(beta: Any) -> float:
        if not (isinstance(beta, numbers.Real) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        return float(beta)

    def _leaves(self, priorities: Any, count: int) -> Tuple[torch.Tensor, float]:
        """Validated priorities -> tree leaves (p + eps)^alpha, float64 (count,), and their max."""
        if isinstance(priorities, torch.Tensor):
            p = priorities.detach()
        elif isinstance(priorities, numbers.Real) and not isinstance(priorities, bool):
            p = torch.full((count,), float(priorities), dtype=torch.float64)
        else:
            p = torch.as_tensor(np.asarray(priorities) if not isinstance(priorities, np.ndarray) else priorities)
        if p.dtype is torch.bool or p.is_complex():
            raise TypeError(f"priorities must be real numbers, got dtype {p.dtype}")
        p = p.to(device=self.device, dtype=torch.float64)
        if p.dim() == 0:
            p = p.expand(count)
        if p.dim() != 1 or p.shape[0] != count:
            raise ValueError(
                f"priorities must have shape ({count},), one per item, got {tuple(p.shape)}"
                + ("; flatten them with .reshape(-1)" if p.numel() == count else "")
            )
        if count == 0:
            return p, -math.inf
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            bad = p[~torch.isfinite(p) | (p < 0)][:5].tolist()
            raise ValueError(f"priorities must be finite and >= 0, got {bad} (e.g. pass td_error.abs())")
        leaves = (p + self.eps).pow(self.alpha)
        if not bool(torch.isfinite(leaves).all()):
            raise ValueError(f"(priority + eps) ** alpha overflows float64 for alpha={self.alpha}: rescale the priorities")
        return leaves, float(p.max())

    def update_priorities(self, indices: Any, priorities: Any) -> None:
        """Set the priorities of stored items (e.g. to |TD error| after a learning step).

        Args:
            indices: int (k,): slots from ``sample()["indices"]``.
            priorities: float (k,) >= 0 (tensor with or without grad, array, or a scalar for all).

        A repeated index takes its last priority. Raises IndexError for a slot that holds no
        item, ValueError for NaN, infinite or negative priorities; a rejected call changes
        nothing. An item overwritten since it was sampled gets the priority all the same
        (as in cpprb without ``check_for_update``).
        """
        idx = torch.as_tensor(indices.detach() if isinstance(indices, torch.Tensor) else np.asarray(indices))
        if idx.dtype is torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"indices must be integers (sample()['indices']), got dtype {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"indices must have shape (k,), got {tuple(idx.shape)}")
        idx = idx.to(device=self.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._size):
            bad = idx[(idx < 0) | (idx >= self._size)][:5].tolist()
            raise IndexError(f"indices {bad} hold no item: the buffer stores {self._size} items in slots 0..{self._size - 1}")
        leaves, largest = self._leaves(priorities, idx.numel())
        self._tree.update(idx, leaves)
        self._max_priority = max(self._max_priority, largest)

    def priorities(self, indices: Any = None) -> torch.Tensor:
        """Stored priorities p_i (float64, (k,), or all ``len(self)`` when None), recovered
        from the tree's (p + eps)^alpha (exact to rounding; for alpha = 0 they are unknown: NaN)."""
        idx = torch.arange(self._size, device=self.device) if indices is None else torch.as_tensor(indices, device=self.device)
        leaves = self._tree.get(idx)
        if self.alpha == 0.0:
            return torch.full_like(leaves, math.nan)
        return leaves.pow(1.0 / self.alpha) - self.eps

    def probabilities(self, indices: Any = None) -> torch.Tensor:
        """P(i) of one draw (float64, (k,), or all ``len(self)`` when None)."""
        idx = torch.arange(self._size, device=self.device) if indices is None else indices
        return self._tree.probability(idx)

    def weights(self, indices: Any, *, beta: Optional[float] = None) -> torch.Tensor:
        """Importance weights (N P(i))^-beta of `indices` (int (k,)), normalised as
        ``normalize`` says ("batch": over these indices), float32 (k,)."""
        beta = self.beta if beta is None else self._check_beta(beta)
        n = self._size
        if n == 0:
            raise ValueError("the buffer is empty: add items first")
        p = self._tree.probability(indices)
        if beta == 0.0:
            return torch.ones(p.shape, dtype=torch.float32, device=p.device)
        weights = (n * p).pow(-beta)
        if self.normalize == "batch" and weights.numel():
            weights = weights / weights.max()
        elif self.normalize == "buffer":
            # the smallest probability of any item that can be drawn gives the largest weight: O(n)
            leaves = self._tree.get(torch.arange(n, device=self.device))
            p_min = leaves[leaves > 0].min() / self._tree.total
            weights = weights / (n * p_min).pow(-beta)
        return weights.to(torch.float32)

    # -- adding ---------------------------------------------------------------------------
    def _define_fields(self, values: Dict[str, torch.Tensor], batched: bool) -> None:
        for name in values:
            if name in _RESERVED:
                raise ValueError(f"{name!r} is reserved for sample()'s output: rename the field")
        storage = {}
        for name, v in values.items():
            shape = tuple(v.shape[1:]) if batched else tuple(v.shape)
            storage[name] = torch.zeros((self.capacity, *shape), dtype=v.dtype, device=self.device)
        self._storage = storage

    def _check_fields(self, values: Dict[str, torch.Tensor], batched: bool) -> int:
        """The number of items in `values`, after checking them against the fields."""
        if set(values) != set(self._storage):
            missing, extra = sorted(set(self._storage) - set(values)), sorted(set(values) - set(self._storage))
            raise KeyError(f"add() got fields {sorted(values)}; the buffer stores {sorted(self._storage)} "
                           f"(missing {missing}, unknown {extra})")
        count = None
        for name, v in values.items():
            store = self._storage[name]
            item_shape = tuple(store.shape[1:])
            if batched:
                if v.dim() == 0 or tuple(v.shape[1:]) != item_shape:
                    raise ValueError(f"field {name!r}: a batch must have shape (k, *{item_shape}), got {tuple(v.shape)}")
                if count is None:
                    count = v.shape[0]
                elif v.shape[0] != count:
                    raise ValueError(f"fields hold different numbers of items ({count} and {v.shape[0]} for {name!r})")
            elif tuple(v.shape) != item_shape:
                hint = (
                    "; add(**fields) stores one item: pass a batch as a dict, add({'name': batch, ...})"
                    if tuple(v.shape[1:]) == item_shape
                    else ""
                )
                raise ValueError(f"field {name!r} must have shape {item_shape}, got {tuple(v.shape)}{hint}")
            if not torch.can_cast(v.dtype, store.dtype):
                raise TypeError(f"field {name!r} is stored as {store.dtype}; a {v.dtype} value would not cast safely")
        return 1 if count is None else count

    def add(self, batch: Optional[Mapping[str, Any]] = None, /, *, priorities: Any = None, **fields: Any) -> torch.Tensor:
        """Store items; returns the slots they went to, int64 (k,).

        ``add(obs=o, act=a, ...)`` stores one item; ``add({"obs": O, "act": A, ...})`` stores
        a batch along dim 0 (a batch larger than ``capacity`` keeps its last ``capacity``
        items). ``priorities`` (a scalar or (k,)) defaults to ``max_priority``. The first call
        defines the fields; a call that does not fit them raises and changes nothing.
        """
        if (batch is None) == (not fields):
            raise TypeError("add() takes one item as keyword fields, add(obs=..., ...), or a batch as one dict, add({...})")
        batched = batch is not None
        raw = dict(batch) if batched else fields
        if not raw:
            raise ValueError("add() got no fields")
        values = {str(name): _as_field(v, str(name), self.device) for name, v in raw.items()}
        new_fields = not self._storage
        if new_fields:
            if batched:
                counts = {name: (v.shape[0] if v.dim() else None) for name, v in values.items()}
                if None in counts.values() or len(set(counts.values())) != 1:
                    raise ValueError(f"a batch needs a leading dimension of one size in every field, got {counts}")
            self._define_fields(values, batched)
        try:
            count = self._check_fields(values, batched)
            leaves, largest = (
                (torch.full((count,), (self._max_priority + self.eps) ** self.alpha, dtype=torch.float64, device=self.device),
                 -math.inf)
                if priorities is None
                else self._leaves(priorities, count)
            )
        except Exception:
            if new_fields:
                self._storage = {}
            raise
        if count == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        skip = max(0, count - self.capacity)  # only the last `capacity` items of a large batch survive
        kept = count - skip
        start = (self._position + skip) % self.capacity
        slots = (torch.arange(kept, device=self.device) + start) % self.capacity
        for name, v in values.items():
            self._storage[name][slots] = (v[skip:] if batched else v.unsqueeze(0)).to(self._storage[name].dtype)
        self._tree.update(slots, leaves[skip:])
        self._max_priority = max(self._max_priority, largest)
        self._position = (self._position + count) % self.capacity
        self._size = min(self.capacity, self._size + count)
        return slots

    # -- sampling -------------------------------------------------------------------------
    def sample(self, batch_size: int, beta: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Draw `batch_size` items with replacement, with probability P(i).

        Returns a dict of each field's values, shape (batch_size, *item_shape), plus
        ``"indices"`` (int64 (batch_size,): pass them to ``update_priorities``) and
        ``"weights"`` (float32 (batch_size,): multiply the per-item losses by them).
        ``beta`` overrides the buffer's for this call. Raises ValueError on an empty buffer.
        """
        batch_size = check_count(batch_size, "batch_size")
        if self._size == 0:
            raise ValueError("the buffer is empty: add items before sampling")
        indices = self._tree.sample(batch_size)
        out = {name: store[indices] for name, store in self._storage.items()}
        out["indices"] = indices
        out["weights"] = self.weights(indices, beta=beta)
        return out

    def clear(self) -> None:
        """Forget every item (the fields stay defined) and reset the max priority to 1."""
        self._tree.assign(torch.zeros(self.capacity, dtype=torch.float64, device=self.device))
        self._size = 0
        self._position = 0
        self._max_priority = 1.0

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
            "storage": {name: t[: self._size].clone() for name, t in self._storage.items()},
            "tree": self._tree.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` of a buffer with the same capacity, alpha, eps and
        normalize; a state that does not fit raises and changes nothing."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"not a {_FORMAT} state of version {_VERSION}")
        saved = state.get("config", {})
        config = self._config()
        if saved != config:
            diff = ", ".join(f"{k}: saved {saved.get(k)!r}, here {config[k]!r}" for k in config if saved.get(k) != config[k])
            raise ValueError(f"the state comes from a buffer configured differently: {diff}")
        size, position = check_count(state["size"], "size"), check_count(state["position"], "position")
        if size > self.capacity or position >= self.capacity:
            raise ValueError("the state's size or position does not fit this buffer's capacity")
        storage = {}
        for name, t in state["storage"].items():
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != size:
                raise ValueError(f"state['storage'][{name!r}] must be a tensor of {size} items")
            full = torch.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype, device=self.device)
            full[:size] = t.to(self.device)
            storage[name] = full
        max_priority = float(state["max_priority"])
        beta = self._check_beta(state["beta"])
        self._tree.load_state_dict(state["tree"])  # validates itself before changing anything
        self._storage, self._size, self._position = storage, size, position
        self._max_priority, self.beta = max_priority, beta

    def __repr__(self) -> str:
        return (
            f"PrioritizedReplayBuffer(capacity={self.capacity}, size={self._size}, alpha={self.alpha}, "
            f"beta={self.beta}, eps={self.eps}, normalize={self.normalize!r}, fields={list(self._storage)})"
        )
