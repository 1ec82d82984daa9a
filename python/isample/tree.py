"""Sum trees: sampling in proportion to weights, or to softmax(scores / T), in O(log n).

Both trees hold n items, accept batched updates, and draw with or without replacement.
Array arguments may be torch tensors, numpy arrays or sequences; results are torch tensors
on the tree's device (int64 indices, float64 values).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, Optional, Tuple

import torch

from . import _backend, _core
from ._backend import DeviceLike
from ._device import DeviceCore

__all__ = ["SumTree", "SoftmaxTree", "uniforms"]

_STATE_VERSION = 1
#: the largest capacity the core accepts (indices are int64 and the padded leaf count must fit)
MAX_CAPACITY = 2**40
_METHODS = ("auto", "removal", "race")
#: outputs above this many bytes are checked against the memory before they are allocated
_CHECKED_OUTPUT_BYTES = 2**30


def _restore(cls: type, arguments: Dict[str, Any], state: Dict[str, Any]) -> "_Tree":
    """Rebuild a pickled or deep-copied tree from its constructor arguments and state_dict."""
    tree = cls(**arguments)
    tree.load_state_dict(state)
    return tree


class _Tree:
    """Behaviour shared by SumTree and SoftmaxTree."""

    _format: str

    def __init__(self, capacity: int, device: DeviceLike, seed: Optional[int], implementation: str) -> None:
        capacity = _backend.check_count(capacity, "capacity", limit=MAX_CAPACITY)
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._device = _backend.resolve_device(device)
        self._sync_errors = False
        # The CPU core, whose fast paths read plain tensors and arrays themselves (None for
        # device trees): tried first by the hot calls, which fall back to converting in Python.
        self._fast: Any = None
        self._capacity = capacity
        self._stream_seed = _backend.draw_seed() if seed is None else _backend.check_seed(seed)
        # "cpu": the CPU tree; "cuda": the GPU algorithms on a CUDA device; "gpu_on_host": the
        # GPU algorithms built for the CPU (Thrust's OpenMP system), which the tests use to run
        # the GPU code on machines without a GPU.
        if implementation not in ("auto", "gpu_on_host"):
            raise ValueError(f"implementation must be 'auto' or 'gpu_on_host', got {implementation!r}")
        if self._device.type == "cuda":
            if implementation != "auto":
                raise ValueError("implementation='gpu_on_host' runs on the CPU: use device='cpu'")
            self._implementation = "cuda"
        else:
            if implementation == "gpu_on_host" and not _core.build_info()["gpu_on_host"]:
                raise ValueError("this build of isample has no host build of the GPU algorithms")
            self._implementation = "gpu_on_host" if implementation == "gpu_on_host" else "cpu"

    def _device_core(self, softmax: bool, temperature: float, sync_errors: bool) -> DeviceCore:
        self._sync_errors = _backend.check_bool(sync_errors, "sync_errors")
        kind = "cuda" if self._implementation == "cuda" else "host"
        index = self._device.index if self._device.index is not None else 0
        handle = _core.DeviceTree(self._stream_seed, kind, self._capacity, softmax, temperature, index)
        return DeviceCore(handle, self._device, sync_errors)

    def check(self) -> None:
        """Raise the first bad-input error recorded on a CUDA device since the last check.

        CUDA trees find bad data (NaN weights, indices out of range, sampling an all-zero
        tree) on the device without synchronising; the call then changes nothing, and the
        error waits here (or at the next synchronising query such as ``total``). CPU trees
        raise at once; for them this does nothing.
        """
        if isinstance(self._core, DeviceCore):
            self._core.check()

    def _arguments(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this tree (its values come from state_dict)."""
        arguments: Dict[str, Any] = {"capacity": self._capacity, "device": str(self._device)}
        if self._implementation != "cpu":
            arguments["sync_errors"] = self._sync_errors
        if self._implementation == "gpu_on_host":
            arguments["_implementation"] = "gpu_on_host"
        return arguments

    def __reduce__(self) -> Tuple[Any, ...]:
        # pickle and copy.deepcopy go through state_dict: the compiled core cannot be pickled
        return (_restore, (type(self), self._arguments(), self.state_dict()))

    @property
    def max_device_weight(self) -> float:
        """The largest leaf weight the GPU algorithms accept (DBL_MAX / 2n, n rounded up to
        the fan-out), so that no sum can overflow without a check on the host. The CPU tree
        checks the total instead; for it this bound is informative only."""
        fanout = int(_core.build_info()["fanout"])
        leaf_slots = -(-self._capacity // fanout) * fanout
        return sys.float_info.max / (2.0 * float(leaf_slots))

    # -- properties -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._capacity

    @property
    def capacity(self) -> int:
        """Number of items n; valid indices are 0 .. n-1."""
        return self._capacity

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def total(self) -> float:
        """Sum of the weights."""
        return float(self._core.total)

    @property
    def num_positive(self) -> int:
        """Number of items that can be drawn (positive probability)."""
        return int(self._core.num_positive)

    @property
    def nbytes(self) -> int:
        """Memory held by the tree, in bytes."""
        return int(self._core.nbytes)

    # -- queries ----------------------------------------------------------------------
    def _indices_or_all(self, indices: Any) -> torch.Tensor:
        if indices is None:
            return torch.arange(self._capacity, dtype=torch.int64, device=self._device)
        return _backend.as_indices(indices, self._device)

    def get(self, indices: Any = None) -> torch.Tensor:
        """Stored values at `indices` (shape (k,)), or all n when None."""
        fast = self._fast
        if fast is not None and indices is not None:
            out = fast.get_tensor(indices)
            if out is not None:
                return out
        idx = self._indices_or_all(indices)
        out = _backend.empty_values(idx.shape[0], self._device)
        self._core.get(idx.data_ptr(), idx.shape[0], out.data_ptr())
        return out

    def probability(self, indices: Any = None) -> torch.Tensor:
        """Probability p_i of drawing each item in one draw (shape (k,)), or all n when None.

        Raises ValueError when every weight is zero.
        """
        fast = self._fast
        if fast is not None and indices is not None:
            out = fast.probability_tensor(indices)
            if out is not None:
                return out
        idx = self._indices_or_all(indices)
        out = _backend.empty_values(idx.shape[0], self._device)
        self._core.probability(idx.data_ptr(), idx.shape[0], out.data_ptr())
        return out

    # -- sampling ---------------------------------------------------------------------
    def sample(
        self,
        k: int,
        *,
        replace: bool = True,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        method: str = "auto",
    ) -> torch.Tensor:
        """Draw k indices (int64, shape (k,)).

        With ``replace=True`` the draws are independent with probabilities p. With
        ``replace=False`` they are k distinct items drawn one after another, each in
        proportion to its weight among those not yet drawn (successive sampling); the tree
        is unchanged afterwards. ``seed`` makes the call reproducible; ``generator`` draws
        its seed from a torch.Generator; with neither, the tree's own stream is used (its
        seed comes from torch's default generator, so ``torch.manual_seed`` fixes it).

        ``method`` (``replace=False`` only) picks the exact algorithm: ``"removal"`` draws
        one item at a time from the tree (rejecting repeats of i.i.d. draws while that is
        cheap, then removing drawn items and restoring them afterwards), O(k log n);
        ``"race"`` takes the k smallest of E_i / w_i with E_i ~ Exp(1), O(n); ``"auto"``
        chooses by k / n. Both return the items in draw order.

        Raises ValueError when every weight is zero, or when ``replace=False`` and fewer
        than k items have a positive weight.
        """
        fast = self._fast
        if fast is not None and generator is None:
            out = fast.sample_tensor(k, replace, seed, method)
            if out is not None:
                return out
        if replace is not True and replace is not False:
            replace = _backend.check_bool(replace, "replace")
        if type(k) is not int or k < 0 or k > 65536:
            k = self._check_draw_count(k, replace)
        if seed is not None or generator is not None:
            seed = _seed_of_call(seed, generator)
        if method == "auto":
            out = _backend.empty_indices(k, self._device)
            self._core.sample(k, replace, out.data_ptr(), seed)
            return out
        if not isinstance(method, str) or method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r:.40}")
        if replace:
            raise ValueError("method applies to replace=False only")
        out = _backend.empty_indices(k, self._device)
        self._core.sample(k, False, out.data_ptr(), seed, str(method))
        return out

    def _check_draw_count(self, k: Any, replace: Any) -> int:
        """k as an int, checked before anything is allocated: at most n distinct items, and
        an output that fits in memory."""
        k = _backend.check_count(k, "k")
        if replace is False and k > self._capacity:
            raise ValueError(f"cannot draw {k:,} distinct items from a tree of {self._capacity:,}: pass k <= capacity")
        if 8 * k > _CHECKED_OUTPUT_BYTES:
            _backend.check_fits(f"drawing {k:,} items", {"the drawn indices": 8 * k}, self._device)
        return k

    def sample_with_inclusion(
        self,
        k: int,
        *,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """k distinct items (as ``sample(k, replace=False, method="race")``) and, for each,
        its inclusion probability given the other items' race keys.

        The race keeps the k smallest of E_i / p_i (E_i ~ Exp(1)); with tau the (k+1)-th
        smallest key, item j was included with probability pi_j = 1 - exp(-p_j tau) given
        everything else, so ``(f[idx] / pi).sum()`` is an exactly unbiased estimate of
        ``f.sum()`` (priority sampling: Duffield, Lund & Thorup 2007). Returns
        ``(indices int64 (k,), inclusion float64 (k,))``.
        """
        k = self._check_draw_count(k, False)
        if seed is not None or generator is not None:
            seed = _seed_of_call(seed, generator)
        out = _backend.empty_indices(k, self._device)
        inclusion = _backend.empty_values(k, self._device)
        self._core.sample_with_inclusion(k, out.data_ptr(), inclusion.data_ptr(), seed)
        return out, inclusion

    def sample_from_uniforms(self, u: Any) -> torch.Tensor:
        """Deterministic descent: for each u in [0, 1), the item holding mass u * total.

        ``sample(k, seed=s)`` equals ``sample_from_uniforms(isample.uniforms(k, seed=s))``.
        """
        values = _backend.as_values(u, self._device, _length_of(u, "u"), name="u")
        out = _backend.empty_indices(values.shape[0], self._device)
        self._core.sample_from_uniforms(values.data_ptr(), values.shape[0], out.data_ptr())
        return out

    # -- state ------------------------------------------------------------------------
    def _stream_state(self) -> Dict[str, int]:
        return {"stream_seed": int(self._core.stream_seed), "stream_calls": int(self._core.stream_calls)}

    def _check_state(self, state: Dict[str, Any], array_key: str) -> torch.Tensor:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not _backend.same_value(state.get("format"), self._format):
            raise ValueError(f"not a {self._format} state (format={state.get('format')!r:.60})")
        if not _backend.same_value(state.get("version"), _STATE_VERSION):
            raise ValueError(f"unsupported state version {state.get('version')!r:.60}, expected {_STATE_VERSION}")
        if not _backend.same_value(state.get("capacity"), self._capacity):
            raise ValueError(f"state is for capacity {state.get('capacity')!r:.60}, this tree has {self._capacity}")
        for key in ("stream_seed", "stream_calls"):
            if key not in state:
                raise ValueError(f"the state lacks {key!r}: pass a state from {type(self).__name__}.state_dict()")
            _backend.check_seed(state[key], f"state[{key!r}]")
        values = state.get(array_key)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"state[{array_key!r}] must be a tensor, got {type(values).__name__}")
        return _backend.as_values(values, self._device, self._capacity, name=f"state[{array_key!r}]")

    def _load_stream(self, state: Dict[str, Any]) -> None:
        self._core.stream_seed = _backend.check_seed(state["stream_seed"])
        self._core.stream_calls = _backend.check_seed(state["stream_calls"])

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise what ``load_state_dict(state)`` would raise for a state that does not fit,
        without changing anything (a sampler checks its whole state before loading any of it)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        where = f"'{self._device}'" + (", gpu_on_host" if self._implementation == "gpu_on_host" else "")
        return f"{type(self).__name__}(capacity={self._capacity}, device={where}, total={self.total:.6g})"


def _seed_of_call(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return _backend.draw_seed(generator)
    return _backend.check_seed(seed)


def _length_of(x: Any, name: str) -> int:
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    if isinstance(x, (torch.Tensor,)) or hasattr(x, "shape"):
        shape = tuple(x.shape)
        if len(shape) != 1:
            raise ValueError(f"{name} must be a 1-D array, got shape {shape}")
        return int(shape[0])
    try:
        return len(x)
    except TypeError as error:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from error


class SumTree(_Tree):
    """A sum tree over n non-negative float64 weights, all zero at first; p_i = w_i / total.

    Args:
        capacity: number of items n (>= 1).
        device: ``"cpu"`` (or ``"cuda"`` in a CUDA build).
        seed: seed of the tree's own random stream; by default drawn from torch's default
            generator.

        sync_errors: CUDA only: check for bad input after every call (a synchronisation)
            instead of at the next synchronising query or ``check()``.
        track_min: CPU only: also keep the smallest positive weight (``min_positive``, O(1)),
            as a min over children beside the sums, updated with them (default False).

    Updates re-sum the touched ancestors from their children (never by adding deltas), so
    the total never drifts. Memory: about 8.53 bytes per item (9.07 with ``track_min``). On
    CUDA a weight must not exceed DBL_MAX / (2n), so that no sum can overflow without a
    check on the host.
    """

    _format = "isample.SumTree"

    def __init__(
        self,
        capacity: int,
        *,
        device: DeviceLike = "cpu",
        seed: Optional[int] = None,
        sync_errors: bool = False,
        track_min: bool = False,
        _implementation: str = "auto",
    ) -> None:
        super().__init__(capacity, device, seed, _implementation)
        track_min = _backend.check_bool(track_min, "track_min")
        if self._implementation == "cpu":
            self._core = _core.SumTree(self._stream_seed, self._capacity)
            self._fast = self._core
            if track_min:
                self._core.track_min()
        else:
            if track_min:
                raise ValueError("track_min is available on CPU trees only (device='cpu')")
            self._core = self._device_core(False, 1.0, sync_errors)
        self._track_min = track_min

    def _arguments(self) -> Dict[str, Any]:
        arguments = super()._arguments()
        if self._track_min:
            arguments["track_min"] = True
        return arguments

    @property
    def min_positive(self) -> float:
        """The smallest positive weight (inf when no weight is positive), O(1); the tree must
        be made with ``track_min=True`` (ValueError otherwise)."""
        if not self._track_min:
            raise ValueError("min_positive needs a tree made with track_min=True")
        return float(self._core.min_positive)

    @classmethod
    def from_weights(cls, weights: Any, *, device: DeviceLike = "cpu", seed: Optional[int] = None, **kwargs: Any) -> "SumTree":
        """A tree holding `weights` (shape (n,)), built in O(n)."""
        tree = cls(_length_of(weights, "weights"), device=device, seed=seed, **kwargs)
        tree.assign(weights)
        return tree

    def update(self, indices: Any, values: Any) -> None:
        """Set w[indices[j]] = values[j]; a scalar value is broadcast.

        Values must be finite and >= 0 (ValueError otherwise); a repeated index takes its
        last value. A rejected call changes nothing.
        """
        fast = self._fast
        if fast is not None and fast.update_arrays(indices, values):
            return
        idx = _backend.as_indices(indices, self._device)
        k = idx.numel()
        val = _backend.as_values(values, self._device, k)
        self._core.update(idx.data_ptr(), val.data_ptr(), k)

    def sample_with_weights(
        self, k: int, *, seed: Optional[int] = None, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(indices, weights)``: k draws with replacement, as ``sample(k)`` (the same items for
        the same seed or stream position), and the weight each drawn item holds, as
        ``get(indices)``, in one call (a prioritized replay buffer needs both)."""
        fast = self._fast
        if fast is not None and generator is None:
            drawn = fast.sample_with_weights_tensor(k, seed)
            if drawn is not None:
                return drawn
        indices = self.sample(k, seed=seed, generator=generator)
        return indices, self.get(indices)

    def assign(self, values: Any) -> None:
        """Set all n weights at once (shape (n,)), O(n)."""
        val = _backend.as_values(values, self._device, self._capacity)
        self._core.assign(val.data_ptr())

    def state_dict(self) -> Dict[str, Any]:
        """Weights and random-stream position; ``load_state_dict`` restores them exactly."""
        weights = _backend.empty_values(self._capacity, self._device)
        self._core.export_leaves(weights.data_ptr())
        return {
            "format": self._format,
            "version": _STATE_VERSION,
            "capacity": self._capacity,
            "weights": weights,
            **self._stream_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state from ``state_dict``; a state that does not fit changes nothing."""
        weights = self._checked_weights(state)
        self._core.assign(weights.data_ptr())
        self._load_stream(state)

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        self._checked_weights(state)

    def _checked_weights(self, state: Dict[str, Any]) -> torch.Tensor:
        weights = self._check_state(state, "weights")
        if self._device.type != "cuda":  # on a GPU the core checks them, without a synchronisation
            finite = bool(torch.isfinite(weights).all())
            if not finite or bool((weights < 0).any()):
                raise ValueError("state['weights'] holds a negative or non-finite weight")
            if math.isinf(float(weights.sum())):
                raise ValueError("state['weights'] sum to more than the largest float64")
        return weights


class SoftmaxTree(_Tree):
    """Scores s_i for n items (all zero at first), drawn with p = softmax(s / T).

    Exact for any finite scores: leaves hold exp((s - ref) / T) and the reference is moved
    (O(n), rarely) so nothing overflows or underflows. Every p_i above ~1e-250 matches a
    float64 stable softmax to ~1e-13 relative.

    Args:
        capacity: number of items n (>= 1).
        temperature: T > 0; higher is flatter.
        device: ``"cpu"`` (or ``"cuda"`` in a CUDA build).
        seed: seed of the tree's own random stream; by default from torch's default generator.
        sync_errors: CUDA only, as for SumTree.

    Memory: about 16.5 bytes per item (scores plus the tree).
    """

    _format = "isample.SoftmaxTree"

    def __init__(
        self,
        capacity: int,
        *,
        temperature: float = 1.0,
        device: DeviceLike = "cpu",
        seed: Optional[int] = None,
        sync_errors: bool = False,
        _implementation: str = "auto",
    ) -> None:
        super().__init__(capacity, device, seed, _implementation)
        temperature = _check_temperature(temperature)
        if self._implementation == "cpu":
            self._core = _core.SoftmaxTree(self._stream_seed, self._capacity, temperature)
            self._fast = self._core
        else:
            self._core = self._device_core(True, temperature, sync_errors)

    @classmethod
    def from_scores(
        cls,
        scores: Any,
        *,
        temperature: float = 1.0,
        device: DeviceLike = "cpu",
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> "SoftmaxTree":
        """A tree holding `scores` (shape (n,)), built in O(n)."""
        tree = cls(_length_of(scores, "scores"), temperature=temperature, device=device, seed=seed, **kwargs)
        tree.assign(scores)
        return tree

    @property
    def temperature(self) -> float:
        return float(self._core.temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._core.temperature = _check_temperature(value)

    @property
    def log_total(self) -> float:
        """logsumexp(s / T), exact for any finite scores."""
        return float(self._core.log_total)

    @property
    def total(self) -> float:
        """sum_i exp(s_i / T); may be inf for large scores (use ``log_total``)."""
        log_total = self.log_total
        return math.exp(log_total) if log_total < 709.0 else math.inf

    def update(self, indices: Any, scores: Any) -> None:
        """Set s[indices[j]] = scores[j]; a scalar is broadcast.

        Scores must be finite (ValueError otherwise); a repeated index takes its last value.
        A rejected call changes nothing.
        """
        fast = self._fast
        if fast is not None and fast.update_arrays(indices, scores, 0.0):
            return
        idx = _backend.as_indices(indices, self._device)
        k = idx.numel()
        val = _backend.as_values(scores, self._device, k, name="scores")
        self._core.update(idx.data_ptr(), val.data_ptr(), k)

    def blend(self, indices: Any, values: Any, keep: float) -> None:
        """s[i] <- keep * s[i] + (1 - keep) * value for each (i, value): an exponential moving
        average in one call. Each item blends with its score from before the call; a
        repeated index takes its last value. keep = 0 is ``update``.
        """
        if type(keep) is not float or not 0.0 <= keep <= 1.0:
            keep = _backend.check_real(keep, "keep", low=0.0, high=1.0)
        fast = self._fast
        if fast is not None and fast.update_arrays(indices, values, keep):
            return
        idx = _backend.as_indices(indices, self._device)
        k = idx.numel()
        val = _backend.as_values(values, self._device, k, name="values")
        self._core.update(idx.data_ptr(), val.data_ptr(), k, keep)

    def assign(self, scores: Any) -> None:
        """Set all n scores at once (shape (n,)), O(n)."""
        val = _backend.as_values(scores, self._device, self._capacity, name="scores")
        self._core.assign(val.data_ptr())

    def state_dict(self) -> Dict[str, Any]:
        """Scores, temperature, reference and stream position, restored exactly by
        ``load_state_dict``."""
        scores = _backend.empty_values(self._capacity, self._device)
        self._core.export_scores(scores.data_ptr())
        return {
            "format": self._format,
            "version": _STATE_VERSION,
            "capacity": self._capacity,
            "temperature": self.temperature,
            "reference": float(self._core.reference),
            "scores": scores,
            **self._stream_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state from ``state_dict``; a state that does not fit changes nothing."""
        scores, temperature, reference = self._checked_state(state)
        previous = self.temperature
        if temperature != previous:
            self._core.temperature = temperature
        try:
            self._core.load(scores.data_ptr(), reference)
        except BaseException:
            if temperature != previous:
                self._core.temperature = previous
            raise
        self._load_stream(state)

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        self._checked_state(state)

    def _checked_state(self, state: Dict[str, Any]) -> Tuple[torch.Tensor, float, float]:
        scores = self._check_state(state, "scores")
        temperature = _check_temperature(state.get("temperature"), "state['temperature']")
        reference = _backend.check_real(state.get("reference"), "state['reference']")
        if self._device.type != "cuda" and not bool(torch.isfinite(scores).all()):
            raise ValueError("state['scores'] holds a non-finite score")
        return scores, temperature, reference


def _check_temperature(value: Any, name: str = "temperature") -> float:
    return _backend.check_real(value, name, low=0.0, low_open=True)


def uniforms(k: int, *, seed: int, offset: int = 0) -> torch.Tensor:
    """The float64 uniforms in [0, 1) that ``sample(k, seed=seed)`` descends from.

    Draws come from a counter-based stream (SplitMix64 over a Weyl sequence): position
    ``offset + j`` of stream ``seed`` is the j-th value, identical on every back end.
    """
    k = _backend.check_count(k)
    if 8 * k > _CHECKED_OUTPUT_BYTES:
        _backend.check_fits(f"{k:,} uniforms", {"the uniforms": 8 * k}, _backend.CPU)
    out = _backend.empty_values(k, torch.device("cpu"))
    _core.uniforms(_backend.check_seed(seed), _backend.check_count(offset, "offset"), k, out.data_ptr())
    return out
