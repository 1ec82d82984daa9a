"""ImportanceSampler: Algorithm 1 of the seed paper as a ``torch.utils.data.Sampler[int]``.

Each epoch the sampler either shuffles all N items (uniform warm-up), or draws
``samples_per_epoch`` items from the current probabilities, with or without replacement,
and yields them in random order. During the epoch the training loop hands back each batch's
per-example losses with ``update`` (scores change at once, probabilities next epoch) and
asks for the batch's importance weights with ``weights``; the weights come from the
probabilities the items were drawn with, never from the tree's current ones.

    sampler = isample.ImportanceSampler(len(train_set), score="running_loss", samples_per_epoch=30_000)
    loader = DataLoader(isample.IndexedDataset(train_set), batch_size=128, sampler=sampler)
    for epoch in range(epochs):
        for index, x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            (losses * sampler.weights(index).to(losses)).mean().backward()
            sampler.update(index, losses)
            ...
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Union

import torch
from torch.utils.data import Dataset, Sampler

from . import _backend, _core
from ._backend import DeviceLike
from .scores import ScorePolicy, get_score_policy
from .transforms import Transform, get_transform
from .tree import SumTree

__all__ = ["EpochSampler", "ImportanceSampler", "IndexedDataset", "Epoch", "ScoreUpdate"]

_STATE_VERSION = 1
_MASK64 = 2**64 - 1


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
    exact resume. Subclasses decide how an epoch is drawn and where scores live."""

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
    ) -> None:
        num_items = _backend.check_count(num_items, "num_items")
        if num_items < 1:
            raise ValueError("num_items must be at least 1")
        if nonfinite not in ("raise", "skip", "clamp"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'clamp', got {nonfinite!r}")
        if not (isinstance(clamp_value, numbers.Real) and 0 < clamp_value < math.inf):
            raise ValueError(f"clamp_value must be a finite number > 0, got {clamp_value!r}")
        self.clamp_value = float(clamp_value)
        self.num_items = num_items
        self.device = _backend.resolve_device(device)
        self.score_policy = get_score_policy(score)
        self.seed = _backend.check_seed(seed)
        self.nonfinite = nonfinite
        self._next_epoch = 0
        self._current: Optional[_Epoch] = None
        self._upcoming: Optional[_Epoch] = None
        #: one dict per drawn epoch: its kind, length, weight range and more
        self.history: List[Dict[str, Any]] = []
        self._counters: Dict[str, int] = {"updates": 0, "nonfinite_skipped": 0, "nonfinite_clamped": 0}
        self._skipped_on_device: Optional[torch.Tensor] = None  # CUDA: counted without a sync
        self._rejected_on_device: Optional[torch.Tensor] = None  # CUDA: a batch held a non-finite score

    @property
    def counters(self) -> Dict[str, int]:
        """Running totals: score updates made, non-finite scores skipped or clamped."""
        if self._skipped_on_device is not None:
            self._counters["nonfinite_skipped"] += int(self._skipped_on_device)
            self._skipped_on_device = None
        return self._counters

    @counters.setter
    def counters(self, value: Dict[str, int]) -> None:
        self._counters = dict(value)
        self._skipped_on_device = None

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
        rejected, self._rejected_on_device = self._rejected_on_device, None
        if rejected is not None and bool(rejected):
            raise ValueError(
                "a score update during the last epoch held a non-finite score and was left out; "
                "pass nonfinite='skip' to drop only the bad items"
            )

    def _store_scores(self, store: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """store[indices] = scores, all or nothing: non-finite scores reject the whole batch.
        On a GPU the check is made without a synchronisation and reported by _check_device."""
        if self.device.type != "cuda":
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("scores must be finite")
            store[indices] = scores
            return
        accepted = torch.isfinite(scores).all()
        store[indices] = torch.where(accepted, scores, store[indices])
        rejected = ~accepted
        self._rejected_on_device = rejected if self._rejected_on_device is None else self._rejected_on_device | rejected

    def _config(self) -> Dict[str, Any]:
        return {"num_items": self.num_items, "score": self.score_policy.config(), "seed": self.seed}

    def _state_extra(self) -> Dict[str, Any]:
        return {}

    def _load_extra(self, state: Dict[str, Any]) -> None:
        pass

    # -- epochs ---------------------------------------------------------------------------
    # _current is the epoch being yielded (or last yielded): weights() answer for it.
    # _upcoming is the next epoch when len() drew it ahead of iter(), so that both agree.

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

    def _upcoming_epoch(self) -> Epoch:
        upcoming = self._upcoming
        if upcoming is not None and upcoming.epoch == self._next_epoch:
            return upcoming
        self._check_device()
        epoch = self._next_epoch
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "epoch"))
        upcoming = self._draw(epoch, generator)
        upcoming.info.setdefault("epoch", epoch)
        upcoming.info.setdefault("samples", int(upcoming.order.numel()))
        self._upcoming = upcoming
        return upcoming

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
        """What ``iter()`` does before yielding: continue the epoch saved part-way, or start
        the next one (drawing it now if ``len()`` has not). Returns it; it becomes the current
        epoch and enters ``history``."""
        current = self._resumable()
        if current is None:
            current = self._upcoming_epoch()
            self._upcoming = None
            self._current = current
            self.history.append(current.info)
        self._next_epoch = current.epoch + 1
        return current

    def epoch_length(self, epoch: int) -> Optional[int]:
        """Items epoch `epoch` will yield, when that is known before drawing it (else None)."""
        return None

    @property
    def epoch(self) -> int:
        """The epoch being iterated, or else the one the next ``iter()`` yields."""
        current = self.active_epoch
        return current.epoch if current is not None else self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` draw epoch `epoch` (as DistributedSampler). Without
        calls to set_epoch the sampler counts epochs itself, one per ``iter()``."""
        self._next_epoch = _backend.check_count(epoch, "epoch")

    def __len__(self) -> int:
        """Number of items in the epoch being iterated, or else in the next one."""
        current = self.active_epoch
        if current is not None:
            return int(current.order.numel())
        return int(self._upcoming_epoch().order.numel())

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
        self, indices: Any, *, dtype: Optional[torch.dtype] = None, device: Optional[DeviceLike] = None
    ) -> torch.Tensor:
        """Importance weights of a batch of items drawn in the current epoch, shape (b,).

        Multiply the per-example losses by them before averaging. They use the
        probabilities the items were drawn with. Raises ValueError for an item that the
        current epoch did not draw (on CUDA its weight is NaN instead: a check would
        synchronise), RuntimeError before the first epoch is drawn.
        """
        current = self._current
        if current is None:
            raise RuntimeError("no epoch has been drawn yet: iterate the sampler first")
        idx = _backend.as_indices(indices, self.device)
        k = idx.numel()
        if current.weight_of is None:
            weights = torch.ones(k, dtype=torch.float64, device=self.device)
        elif self.device is _backend.CPU:
            weights = _backend.empty_values(k, self.device)
            missing = _core.gather(current.weight_of.data_ptr(), self.num_items, idx.data_ptr(), k, weights.data_ptr())
            if missing >= 0:
                raise ValueError(f"item {int(idx[missing])} was not drawn in epoch {current.epoch}: it has no weight")
        else:
            # On a GPU an undrawn item's weight comes back NaN: checking would synchronise.
            weights = current.weight_of[idx]
        if dtype is not None or device is not None:
            weights = weights.to(dtype=dtype or weights.dtype, device=device or weights.device)
        return weights

    def _blend_scores(self, indices: torch.Tensor, losses: torch.Tensor, keep: float) -> None:
        """S = keep * S + (1 - keep) * L for policies that say so (ScorePolicy.keep)."""
        new = losses if keep == 0.0 else self._read_scores(indices) * keep + losses * (1.0 - keep)
        self._write_scores(indices, new)

    def update(self, indices: Any, losses: Any, **extra: Any) -> None:
        """Hand back a batch's per-example losses (shape (b,), CPU or CUDA, any float
        dtype, with or without grad); the score policy turns them into new scores.

        ``extra`` goes to the score policy (``logits=``, ``targets=`` for GradNormBound).
        Non-finite scores raise ValueError, or are skipped and counted in
        ``counters["nonfinite_skipped"]`` with ``nonfinite="skip"``; either way no bad value
        reaches the scores, and a rejected call changes nothing.
        """
        idx = _backend.as_indices(indices, self.device)
        losses = _as_losses(losses, idx.numel(), self.device)
        if self.device.type == "cuda":
            self._update_on_device(idx, losses, extra)
            return
        policy = self.score_policy
        try:  # the fast path: the tree validates (atomically) while it writes
            if policy.keep is not None:
                self._blend_scores(idx, losses, policy.keep)
            else:
                self._write_scores(idx, self._new_scores(idx, losses, extra))
                policy.commit(idx)
            self._counters["updates"] += 1
        except (ValueError, IndexError):
            # Rejected, nothing written: check explicitly, which raises the clear error or,
            # with nonfinite="skip", leaves out the bad items.
            self.apply_update(self.prepare_update(idx, losses, **extra))

    def prepare_update(self, indices: Any, losses: Any, *, num_items: Optional[int] = None, **extra: Any) -> ScoreUpdate:
        """Check a batch and run the score policy without writing anything: raises what
        ``update`` would raise, or (nonfinite="skip") leaves out the non-finite items. A
        distributed sampler prepares on every rank, exchanges, then applies. ``num_items``
        is the range the indices are checked against (default: this sampler's N; a shard of
        a larger item set passes the global N)."""
        idx = _backend.as_indices(indices, self.device)
        losses = _as_losses(losses, idx.numel(), self.device)
        limit = self.num_items if num_items is None else num_items
        if idx.numel():
            outside = (idx < 0) | (idx >= limit)
            if bool(outside.any()):
                raise IndexError(f"indices {idx[outside][:5].tolist()} are outside [0, {limit})")
        policy = self.score_policy
        values = losses if policy.keep is not None else self._new_scores(idx, losses, extra)
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return ScoreUpdate(idx, values, 0)
        bad = int((~finite).sum())
        if self.nonfinite == "raise":
            raise ValueError(
                f"{bad} non-finite score(s) (items {idx[~finite][:5].tolist()}, losses "
                f"{losses[~finite][:5].tolist()}); the scores are unchanged. "
                "Pass nonfinite='skip' (leave such items out) or 'clamp' (inf becomes +-clamp_value)."
            )
        if self.nonfinite == "clamp":
            # +-inf -> +-clamp_value (counted as clamped); NaN has no value to clamp to: skipped
            values = values.clamp(-self.clamp_value, self.clamp_value)
            keep = ~torch.isnan(values)
            self._counters["nonfinite_clamped"] += bad - int((~keep).sum())
            return ScoreUpdate(idx[keep], values[keep], int((~keep).sum()))
        return ScoreUpdate(idx[finite], values[finite], bad)

    def apply_update(self, update: ScoreUpdate) -> None:
        """Write a prepared update in one step: a repeated index takes its last value, and an
        EMA policy blends each item with its score from before the call."""
        keep = self.score_policy.keep
        if keep is not None:
            self._blend_scores(update.indices, update.values, keep)
        else:
            self._write_scores(update.indices, update.values)
            self.score_policy.commit(update.indices)
        self._counters["updates"] += 1
        self._counters["nonfinite_skipped"] += update.skipped

    def _new_scores(self, idx: torch.Tensor, losses: torch.Tensor, extra: Dict[str, Any]) -> torch.Tensor:
        policy = self.score_policy
        previous = self._read_scores(idx) if policy.needs_previous else None
        new = policy(losses, previous, idx, **extra)
        if not isinstance(new, torch.Tensor) or new.shape != losses.shape:
            raise TypeError(f"{policy!r} must return a tensor of shape {tuple(losses.shape)}")
        return new.to(dtype=torch.float64, device=self.device)

    def _update_on_device(self, idx: torch.Tensor, losses: torch.Tensor, extra: Dict[str, Any]) -> None:
        """The CUDA path: no host synchronisation. A non-finite score is left out by keeping
        the item's current score (nonfinite="skip", counted on the device), or recorded by
        the tree and raised when the next epoch is drawn (nonfinite="raise")."""
        policy = self.score_policy
        if policy.keep is not None:
            values, finite = losses, torch.isfinite(losses)
        else:
            values = self._new_scores(idx, losses, extra)
            finite = torch.isfinite(values)
        if self.nonfinite == "clamp":
            values = values.clamp(-self.clamp_value, self.clamp_value)  # inf only: NaN stays NaN
            finite = ~torch.isnan(values)
        if self.nonfinite in ("skip", "clamp"):
            values = torch.where(finite, values, self._read_scores(idx))
            skipped = (~finite).sum()
            self._skipped_on_device = skipped if self._skipped_on_device is None else self._skipped_on_device + skipped
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
        return {
            "format": self._format,
            "version": _STATE_VERSION,
            "config": self._config(),
            "next_epoch": self._next_epoch,
            "current": saved_current,
            "history": [dict(entry) for entry in self.history],
            "counters": dict(self.counters),
            "policy": self.score_policy.state_dict(),
            **self._state_extra(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict``. An epoch saved part-way is continued by the next
        ``iter()`` from where it stopped, with the same order and weights."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if state.get("format") != self._format or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a {self._format} state of version {_STATE_VERSION} "
                f"(format={state.get('format')!r}, version={state.get('version')!r})"
            )
        config = self._config()
        saved = state.get("config", {})
        differences = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
        if differences:
            raise ValueError(
                "the state comes from a sampler configured differently: "
                + ", ".join(f"{k}: saved {saved.get(k)!r}, here {config.get(k)!r}" for k in differences)
            )
        current = state.get("current")
        restored = None
        if current is not None:
            order = _backend.as_indices(current["order"], self.device)
            weight_of = current["weight_of"]
            if weight_of is not None:
                weight_of = _backend.as_values(weight_of, self.device, self.num_items, name="weight_of")
            position = _backend.check_count(current["position"], "position")
            if position > order.numel() or (order.numel() and int(order.max()) >= self.num_items):
                raise ValueError("the saved epoch is inconsistent with this sampler")
            restored = _Epoch(int(current["epoch"]), order, weight_of, position, dict(current.get("info", {})))
        previous_policy = self.score_policy.state_dict()
        self.score_policy.load_state_dict(state.get("policy", {}))  # validates before changing
        try:
            self._load_extra(state)  # validates and restores scores; raises before changing them
        except Exception:
            self.score_policy.load_state_dict(previous_policy)
            raise
        self._current = restored
        self._upcoming = None
        next_epoch = _backend.check_count(state["next_epoch"], "next_epoch")
        # An epoch saved part-way is the one the next iter() must continue.
        self._next_epoch = restored.epoch if restored and restored.position < len(restored.order) else next_epoch
        self.history = [dict(entry) for entry in state.get("history", [])]
        self.counters = {**self.counters, **state.get("counters", {})}


class ImportanceSampler(EpochSampler):
    """Algorithm 1 of the seed paper: uniform warm-up, then importance-sampled epochs.

    Args:
        num_items: N, the dataset's length.
        score: a ScorePolicy or ``"last_loss"`` (default), ``"running_loss"``, ``"grad_norm"``.
        transform: a Transform or ``"softmax"`` (default, T = 1), ``"proportional"``, ``"rank"``.
        samples_per_epoch: |Z|, items drawn per importance epoch (default N).
        replacement: draw Z with replacement (i.i.d., default) or without (k distinct items).
        warmup_epochs: epochs of uniform shuffling (all N items, weights 1) that only record scores.
        weighting: ``"auto"`` (default) gives unbiased weights: 1 / (N p_i) with replacement, and
            |Z| / (N pi_i) without, pi_i being the item's inclusion probability given the
            other items (exactly unbiased, see SumTree.sample_with_inclusion);
            ``"inverse_probability"`` uses 1 / (N p_i) in both cases, as the seed paper does
            (biased without replacement); ``"none"`` gives weights 1 (biased).
        uniform_mix: lam in [0, 1]: sample from (1 - lam) p + lam / N, which bounds the
            weights by 1 / lam.
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

    Memory: the tree (8.5–16.5 bytes per item) plus 8 bytes per item for the current
    epoch's weights.
    """

    _format = "isample.ImportanceSampler"

    def __init__(
        self,
        num_items: int,
        *,
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
        clamp_value: float = 1e4,
        seed: int = 0,
        device: DeviceLike = "cpu",
    ) -> None:
        super().__init__(num_items, score=score, nonfinite=nonfinite, seed=seed, device=device, clamp_value=clamp_value)
        self.transform = get_transform(transform)
        samples = num_items if samples_per_epoch is None else _backend.check_count(samples_per_epoch, "samples_per_epoch")
        if samples < 1:
            raise ValueError("samples_per_epoch must be at least 1")
        if not replacement and samples > num_items:
            raise ValueError(f"samples_per_epoch={samples} exceeds num_items={num_items} without replacement")
        if weighting not in ("auto", "inverse_probability", "none"):
            raise ValueError(f"weighting must be 'auto', 'inverse_probability' or 'none', got {weighting!r}")
        if not (isinstance(uniform_mix, numbers.Real) and 0.0 <= uniform_mix <= 1.0):
            raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix!r}")
        if not callable(weight_exponent) and not (
            isinstance(weight_exponent, numbers.Real) and 0.0 <= weight_exponent <= 1.0
        ):
            raise ValueError(f"weight_exponent must be in [0, 1] or a function of the epoch, got {weight_exponent!r}")
        if normalize_weights not in (None, "max", "mean"):
            raise ValueError(f"normalize_weights must be None, 'max' or 'mean', got {normalize_weights!r}")
        if not (isinstance(initial_score, numbers.Real) and math.isfinite(initial_score)):
            raise ValueError(f"initial_score must be a finite number, got {initial_score!r}")
        self.samples_per_epoch = samples
        self.replacement = bool(replacement)
        self.warmup_epochs = _backend.check_count(warmup_epochs, "warmup_epochs")
        self.weighting = weighting
        self.uniform_mix = float(uniform_mix)
        self.weight_exponent = weight_exponent
        self.normalize_weights = normalize_weights
        self.initial_score = float(initial_score)

        self._tree = self.transform.make_tree(num_items, device=self.device, seed=derive_seed(self.seed, "tree"))
        self._scores: Optional[torch.Tensor] = None
        if self.transform.tree_holds_scores:
            if self.initial_score != 0.0:
                self._tree.assign(torch.full((num_items,), self.initial_score, dtype=torch.float64))
        else:
            self._scores = torch.full((num_items,), self.initial_score, dtype=torch.float64, device=self.device)
            if not self.transform.epoch_level:
                self._tree.assign(self.transform.leaf_values(self._scores))

    # -- scores ---------------------------------------------------------------------------
    def _read_scores(self, indices):
        return self._tree.get(indices) if self._scores is None else self._scores[indices]

    def _check_device(self):
        self._tree.check()
        super()._check_device()

    def _blend_scores(self, indices, losses, keep):
        if self._scores is None:  # one call of the core; it validates before writing
            self._tree.blend(indices, losses, keep)
        else:
            super()._blend_scores(indices, losses, keep)

    def _write_scores(self, indices, scores):
        if self._scores is None:  # the SoftmaxTree holds the scores and validates them itself
            self._tree.update(indices, scores)
            return
        if self.device.type != "cuda" and not bool(torch.isfinite(scores).all()):
            raise ValueError("scores must be finite")
        if not self.transform.epoch_level:
            self._tree.update(indices, self.transform.leaf_values(scores))  # validates before writing
        self._store_scores(self._scores, indices, scores)

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
        value = self.weight_exponent(epoch) if callable(self.weight_exponent) else self.weight_exponent
        if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
            raise ValueError(f"weight_exponent({epoch}) returned {value!r}, expected a number in [0, 1]")
        return float(value)

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
        weight_of = torch.full((n,), math.nan, dtype=torch.float64, device=self.device)
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
        others samples_per_epoch): what a per-step LR schedule such as OneCycleLR needs."""
        num_epochs = _backend.check_count(num_epochs, "num_epochs")
        batch_size = _backend.check_count(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        steps = 0
        for epoch in range(num_epochs):
            length = self.epoch_length(epoch)
            steps += length // batch_size if drop_last else -(-length // batch_size)
        return steps

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

    def _load_extra(self, state):
        scores = state.get("scores")
        if (scores is None) != (self._scores is None):
            raise ValueError("the state's scores do not match this sampler's transform")
        if scores is not None:
            scores = _backend.as_values(scores, self.device, self.num_items, name="state['scores']")
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("state['scores'] holds a non-finite score")
        self._tree.load_state_dict(state.get("tree"))  # validates itself; raises before changing
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
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (index, *item)
        if isinstance(item, dict):
            if "index" in item:
                raise ValueError("the dataset's items already have an 'index' key")
            return {**item, "index": index}
        return (index, item)


def _as_losses(losses: Any, length: int, device: torch.device) -> torch.Tensor:
    """Per-example losses as float64 (length,) on `device`, detached; errors name the fix."""
    if type(losses) is torch.Tensor and losses.dim() == 1 and losses.shape[0] == length and not losses.requires_grad:
        if losses.dtype is torch.float64 and losses.is_contiguous() and _backend._on(losses, device):
            return losses
    if isinstance(losses, torch.Tensor):
        if losses.dim() == 0:
            raise ValueError(
                "update() needs one loss per example, got a scalar: compute the loss with reduction='none'"
            )
        if losses.is_complex() or losses.dtype is torch.bool:
            raise TypeError(f"losses must be real numbers, got dtype {losses.dtype}")
        t = losses.detach()
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"losses must have shape ({length},) like the indices, got {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.float64).contiguous()
    return _backend.as_values(losses, device, length, name="losses")
