"""The peers' adapters: one class per way of sampling in proportion to changing weights.

Each adapter wraps one library (isample, numpy, torch, TorchRL's C++ trees, cpprb, the Rust
``sumtree``) behind the same interface (:class:`Method`), imports its library lazily, and
says why it is unavailable (a package missing) or why it skips a workload. ``descent`` gives
the deterministic map from 53-bit uniforms to items that :mod:`isample.bench.exact` uses.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import isample

from .memory import isample_tree_bytes
from .workloads import BATCH, Unsupported


TORCH_MULTINOMIAL_MAX = 1 << 24  # torch.multinomial refuses more categories


def _power_of_two_above(n: int) -> int:
    """TorchRL's segment-tree capacity: the smallest power of two strictly above n."""
    return 1 << n.bit_length()


def _power_of_two_at_least(n: int) -> int:
    """cpprb's segment-tree capacity: the smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


# -- peers: imports ------------------------------------------------------------------------

_import_cache: Dict[str, Tuple[Any, Optional[str], str]] = {}


def _import_torchrl_trees() -> Tuple[Any, Optional[str], str]:
    """(module, reason it is unusable or None, note). Loads ``torchrl._torchrl`` once.

    TorchRL's extension links autograd symbols that change between torch releases; with
    another torch it fails to load (and torchrl itself quietly sets its trees to None).
    The trees never call those symbols, so a lazy, local dlopen makes them load.
    """
    if "torchrl" in _import_cache:
        return _import_cache["torchrl"]
    note = ""
    module, reason = None, None
    try:
        module = importlib.import_module("torchrl._torchrl")
        note = "torchrl._torchrl loaded normally"
    except Exception as first:  # ImportError, OSError (undefined symbol), anything torchrl raises
        if isinstance(first, ModuleNotFoundError) and first.name in ("torchrl", "tensordict"):
            reason = f"{first} (pip install --no-deps torchrl==0.14.1 tensordict==0.15.3)"
        else:
            for name in [m for m in sys.modules if m == "torchrl" or m.startswith("torchrl.")]:
                del sys.modules[name]
            flags = sys.getdlopenflags()
            sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
            try:
                module = importlib.import_module("torchrl._torchrl")
                note = (
                    "torchrl._torchrl loaded with sys.setdlopenflags(RTLD_LAZY | RTLD_LOCAL) "
                    f"(DESIGN.md): a plain import failed against torch {torch.__version__}: {first}"
                )
            except Exception as second:
                reason = f"torchrl._torchrl does not load: {first}; with RTLD_LAZY: {second}"
            finally:
                sys.setdlopenflags(flags)
    if module is not None and not hasattr(module, "SumSegmentTreeFp64"):
        module, reason = None, "torchrl._torchrl has no SumSegmentTreeFp64"
    _import_cache["torchrl"] = (module, reason, note)
    return _import_cache["torchrl"]


def _import_cpprb() -> Tuple[Any, Optional[str], str]:
    if "cpprb" not in _import_cache:
        try:
            module = importlib.import_module("cpprb")
            _import_cache["cpprb"] = (module, None, "")
        except Exception as error:
            _import_cache["cpprb"] = (None, f"{error} (pip install cpprb==11.0.0)", "")
    return _import_cache["cpprb"]


def _import_sumtree() -> Tuple[Any, Optional[str], str]:
    if "sumtree" not in _import_cache:
        try:
            module = importlib.import_module("sumtree")
            _import_cache["sumtree"] = (module, None, "")
        except Exception as error:
            _import_cache["sumtree"] = (None, f"{error} (pip install sumtree)", "")
    return _import_cache["sumtree"]


# -- adapters ------------------------------------------------------------------------------


class Method:
    """One way of sampling in proportion to n weights that change between calls.

    ``setup(w)`` builds the state from float64 weights; ``build(w)`` is the timed build
    (for trees, ``setup`` itself); ``native`` converts update arguments to what the method
    takes (outside the timed call); ``sample`` and ``sample_without_replacement`` return
    indices in the method's own type (``as_numpy`` converts them); ``descent`` gives the
    deterministic map from 53-bit uniforms to items used for the exact accuracy figures.
    """

    name = ""
    label = ""
    timed = ""  # what the timed calls do, one line, for the JSON and the docs
    linear_per_call = False  # O(n) work on every draw: few repetitions at large n
    build_is_setup = True
    keep: Tuple[str, ...] = ("seed", "n")  # attributes that survive release()

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.n = 0

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this method cannot run here (missing package), or None."""
        return None

    @classmethod
    def note(cls) -> str:
        """How the library was loaded, where that matters to its timings (TorchRL's dlopen flags)."""
        return ""

    def supports(self, workload: str, n: int) -> Optional[str]:
        """Why this method skips `workload` at size n, or None."""
        return None

    def state_bytes(self, n: int) -> int:
        """Memory held between calls."""
        raise NotImplementedError

    def transient_bytes(self, n: int) -> int:
        """Extra memory a call (or the build) needs on top of the state."""
        return 0

    def setup(self, weights: np.ndarray) -> None:
        raise NotImplementedError

    def build(self, weights: np.ndarray) -> Any:
        raise Unsupported("no build step: it keeps the weight array itself")

    def release(self) -> None:
        for key in list(vars(self)):
            if key not in self.keep:
                delattr(self, key)  # reference counting frees the state now

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return torch.from_numpy(indices), torch.from_numpy(values)

    def native_values(self, values: np.ndarray) -> Any:
        return self.native(np.zeros(len(values), dtype=np.int64), values)[1]

    def update(self, indices: Any, values: Any) -> None:
        raise NotImplementedError

    def sample(self, k: int) -> Any:
        raise NotImplementedError

    def sample_without_replacement(self, k: int) -> Any:
        raise Unsupported("no sampling without replacement")

    def step(self, values: Any) -> None:
        self.update(self.sample(BATCH), values)

    def as_numpy(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            return indices.numpy().astype(np.int64, copy=False)
        return np.asarray(indices).astype(np.int64, copy=False)

    def descent(self) -> Optional[Callable[[np.ndarray], np.ndarray]]:
        """The item drawn for each 53-bit uniform u (float64), or None (Monte Carlo)."""
        return None


class IsampleMethod(Method):
    name, label = "isample", "isample"
    timed = "SumTree.from_weights / update / sample(k) / sample(k, replace=False)"

    def state_bytes(self, n: int) -> int:
        return isample_tree_bytes(n)

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.tree = isample.SumTree.from_weights(weights, seed=self.seed)

    def update(self, indices: Any, values: Any) -> None:
        self.tree.update(indices, values)

    def sample(self, k: int) -> Any:
        return self.tree.sample(k)

    def sample_without_replacement(self, k: int) -> Any:
        return self.tree.sample(k, replace=False)

    def descent(self) -> Callable[[np.ndarray], np.ndarray]:
        tree = self.tree
        return lambda u: tree.sample_from_uniforms(u).numpy()


class NumpyChoiceMethod(Method):
    name, label = "numpy_choice", "np.choice"
    timed = "rng.choice(n, k, p=w / w.sum()) (p recomputed: weights change every step); update w[idx] = v"
    linear_per_call = True
    build_is_setup = False

    def state_bytes(self, n: int) -> int:
        return 8 * n

    def transient_bytes(self, n: int) -> int:
        return 16 * n  # p and its cdf

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.w = weights.copy()
        self.rng = np.random.default_rng(self.seed)

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return indices, values

    def update(self, indices: Any, values: Any) -> None:
        self.w[indices] = values

    def sample(self, k: int) -> Any:
        return self.rng.choice(self.n, k, p=self.w / self.w.sum())

    def sample_without_replacement(self, k: int) -> Any:
        return self.rng.choice(self.n, k, replace=False, p=self.w / self.w.sum())

    def descent(self) -> Callable[[np.ndarray], np.ndarray]:
        return choice_descent(self.w)


class NumpyCumsumMethod(Method):
    name, label = "numpy_cumsum", "np.cumsum"
    timed = "c = np.cumsum(w); np.searchsorted(c, rng.random(k) * c[-1], side='right'); build = np.cumsum(w)"
    linear_per_call = True
    build_is_setup = False

    def supports(self, workload: str, n: int) -> Optional[str]:
        if workload.startswith("wor"):
            return "cumsum + searchsorted draws with replacement only"
        return None

    def state_bytes(self, n: int) -> int:
        return 8 * n

    def transient_bytes(self, n: int) -> int:
        return 8 * n

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.w = weights.copy()
        self.rng = np.random.default_rng(self.seed)

    def build(self, weights: np.ndarray) -> Any:
        return np.cumsum(weights)

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return indices, values

    def update(self, indices: Any, values: Any) -> None:
        self.w[indices] = values

    def sample(self, k: int) -> Any:
        cumulative = np.cumsum(self.w)
        return np.searchsorted(cumulative, self.rng.random(k) * cumulative[-1], side="right")

    def descent(self) -> Callable[[np.ndarray], np.ndarray]:
        cumulative = np.cumsum(self.w)
        return lambda u: np.searchsorted(cumulative, u * cumulative[-1], side="right")


class TorchMultinomialMethod(Method):
    name, label = "torch_multinomial", "torch.multinom"
    timed = "torch.multinomial(w, k, replacement) on a float64 tensor; update w[idx] = v"
    linear_per_call = True
    build_is_setup = False

    def supports(self, workload: str, n: int) -> Optional[str]:
        if n > TORCH_MULTINOMIAL_MAX and workload != "update":
            return "torch.multinomial refuses more than 2^24 categories"
        return None

    def state_bytes(self, n: int) -> int:
        return 8 * n

    def transient_bytes(self, n: int) -> int:
        return 8 * n  # its cumulative distribution

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.w = torch.from_numpy(weights.copy())

    def update(self, indices: Any, values: Any) -> None:
        self.w[indices] = values

    def sample(self, k: int) -> Any:
        return torch.multinomial(self.w, k, replacement=True)

    def sample_without_replacement(self, k: int) -> Any:
        return torch.multinomial(self.w, k, replacement=False)

    def descent(self) -> Callable[[np.ndarray], np.ndarray]:
        return multinomial_descent(self.w.numpy())


class TorchWRSMethod(TorchMultinomialMethod):
    name, label = "torch_wrs", "torch.WRS"
    timed = (
        "list(WeightedRandomSampler(w, k, replacement)): torch.multinomial + tolist, what a "
        "DataLoader consumes; update sampler.weights[idx] = v"
    )

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.w = torch.from_numpy(weights.copy())
        self.samplers: Dict[Tuple[int, bool], Any] = {}

    def _sampler(self, k: int, replacement: bool) -> Any:
        key = (k, replacement)
        if key not in self.samplers:
            sampler = torch.utils.data.WeightedRandomSampler(self.w, k, replacement=replacement)
            sampler.weights = self.w  # share our tensor, so that updates to self.w are seen
            self.samplers[key] = sampler
        return self.samplers[key]

    def sample(self, k: int) -> Any:
        return list(self._sampler(k, True))

    def sample_without_replacement(self, k: int) -> Any:
        return list(self._sampler(k, False))


class _TorchRLMethod(Method):
    dtype: Any = np.float64
    tree_class = ""

    @classmethod
    def unavailable(cls) -> Optional[str]:
        module, reason, _ = _import_torchrl_trees()
        if module is not None and not hasattr(module, cls.tree_class):
            return f"torchrl._torchrl has no {cls.tree_class}"
        return reason

    @classmethod
    def note(cls) -> str:
        return _import_torchrl_trees()[2]

    def state_bytes(self, n: int) -> int:
        return 2 * _power_of_two_above(n) * np.dtype(self.dtype).itemsize

    def transient_bytes(self, n: int) -> int:
        return n * np.dtype(self.dtype).itemsize  # the build's input in the tree's dtype

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        cls = getattr(_import_torchrl_trees()[0], self.tree_class)
        # The pickle path (LoadValues) builds in O(n); `tree[arange(n)] = w` is O(n log n).
        tree = cls.__new__(cls)
        tree.__setstate__((np.ascontiguousarray(weights, dtype=self.dtype),))
        self.tree = tree
        self.rng = np.random.default_rng(self.seed)

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        # numpy arguments: measured faster than tensors for these bindings
        return indices, values.astype(self.dtype)

    def update(self, indices: Any, values: Any) -> None:
        self.tree.update(indices, values)

    def sample(self, k: int) -> Any:
        # As TorchRL's PrioritizedSampler on the CPU: float64 masses, clamp past the end.
        index = self.tree.scan_lower_bound(self.rng.random(k) * self.tree.query(0, self.n))
        np.minimum(index, self.n - 1, out=index)
        return index

    def sample_without_replacement(self, k: int) -> Any:
        # Successive sampling built by hand: the first occurrences of i.i.d. draws, taken in
        # order, are successive draws; taken items are zeroed, then restored.
        tree, n = self.tree, self.n
        taken: List[np.ndarray] = []
        saved: List[np.ndarray] = []
        count = stalls = 0
        while count < k:
            if stalls > 100:
                tree.update(np.concatenate(taken), np.concatenate(saved))
                raise ValueError(f"fewer than {k} items can be drawn")
            draws = tree.scan_lower_bound(self.rng.random(k - count) * tree.query(0, n))
            np.minimum(draws, n - 1, out=draws)
            _, first = np.unique(draws, return_index=True)
            new = draws[np.sort(first)]
            values = tree.at(new)
            keep = values > 0  # a rounding can land on an item zeroed in an earlier round
            new, values = new[keep][: k - count], values[keep][: k - count]
            tree.update(new, np.zeros(len(new), dtype=self.dtype))
            taken.append(new)
            saved.append(values)
            count += len(new)
            stalls = 0 if len(new) else stalls + 1
        indices = np.concatenate(taken)
        tree.update(indices, np.concatenate(saved))
        return indices

    def descent(self) -> Callable[[np.ndarray], np.ndarray]:
        tree, total = self.tree, self.tree.query(0, self.n)
        # float64 masses; the Fp32 binding casts them to float32, as in TorchRL's sampler
        return lambda u: tree.scan_lower_bound(u * total)


class TorchRLFp64Method(_TorchRLMethod):
    name, label, tree_class, dtype = "torchrl_fp64", "torchrl.f64", "SumSegmentTreeFp64", np.float64
    timed = (
        "SumSegmentTreeFp64: build via __setstate__ (LoadValues, O(n)); update(idx, v); "
        "scan_lower_bound(rng.random(k) * query(0, n)) clamped to n-1; without replacement "
        "built by hand (first occurrences of i.i.d. batches, zero taken, restore)"
    )


class TorchRLFp32Method(_TorchRLMethod):
    name, label, tree_class, dtype = "torchrl_fp32", "torchrl.f32", "SumSegmentTreeFp32", np.float32
    timed = TorchRLFp64Method.timed.replace("Fp64", "Fp32") + "; update values passed as float32"


class CpprbMethod(Method):
    name, label = "cpprb", "cpprb"
    keep = ("seed", "n", "payload")
    timed = (
        "PrioritizedReplayBuffer(n, {'x': uint8}, alpha=1, eps=0): build = constructor + "
        "add(x, priorities=w); update_priorities(idx, v); sample(k)['indexes'] (stratified "
        "draws + payload gather + importance weights, all inside one sample call)"
    )

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _import_cpprb()[1]

    def supports(self, workload: str, n: int) -> Optional[str]:
        if workload.startswith("wor"):
            return "PrioritizedReplayBuffer samples with replacement only (stratified)"
        return None

    def state_bytes(self, n: int) -> int:
        # float32 sum and min segment trees, 2P - 1 nodes each, and the 1-byte payload
        return 2 * (2 * _power_of_two_at_least(n) - 1) * 4 + n

    def transient_bytes(self, n: int) -> int:
        return 32 * n  # add(): float32 copy and a std::set of n/2 parents to re-sum

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        if getattr(self, "payload", None) is None or len(self.payload) != self.n:
            self.payload = np.zeros(self.n, dtype=np.uint8)
        self.prb = None
        cpprb = _import_cpprb()[0]
        prb = cpprb.PrioritizedReplayBuffer(self.n, {"x": {"dtype": np.uint8}}, alpha=1.0, eps=0.0)
        prb.add(x=self.payload, priorities=weights)
        self.prb = prb

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return indices.astype(np.uint64), values.astype(np.float32)

    def update(self, indices: Any, values: Any) -> None:
        self.prb.update_priorities(indices, values)

    def sample(self, k: int) -> Any:
        return self.prb.sample(k)["indexes"]


class SumtreeMethod(Method):
    name, label = "sumtree", "sumtree (Rust)"
    timed = (
        "sumtree.SumTree (Rust, PyPI `sumtree`): build = SumTree(n) + add(w_i) for each item; "
        "update_batched(idx, v) with Python lists (faster than numpy arrays for it); "
        "sample(k) (its own generator) returning the leaves"
    )

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _import_sumtree()[1]

    def supports(self, workload: str, n: int) -> Optional[str]:
        if workload.startswith("wor"):
            return "sumtree samples with replacement only"
        return None

    def state_bytes(self, n: int) -> int:
        return 2 * _power_of_two_at_least(n) * 8  # a binary tree of float64 sums (assumed)

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        tree = _import_sumtree()[0].SumTree(self.n)
        add = tree.add
        for w in weights.tolist():  # its only way to fill a tree
            add(w)
        self.tree = tree

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return indices.tolist(), values.tolist()

    def update(self, indices: Any, values: Any) -> None:
        self.tree.update_batched(indices, values)

    def sample(self, k: int) -> Any:
        return self.tree.sample(k)[0]


class NumpyRaceMethod(Method):
    name, label = "numpy_race", "np exp-race"
    timed = (
        "numpy's exponential race (Efraimidis-Spirakis) for k distinct items: keys = "
        "rng.standard_exponential(n) / w, the k smallest by np.argpartition, then sorted "
        "(np.argsort) into draw order; update w[idx] = v"
    )
    linear_per_call = True
    build_is_setup = False

    def supports(self, workload: str, n: int) -> Optional[str]:
        if not workload.startswith("wor"):
            return "the race draws k distinct items only"
        return None

    def state_bytes(self, n: int) -> int:
        return 8 * n

    def transient_bytes(self, n: int) -> int:
        return 24 * n  # the keys and argpartition's indices

    def setup(self, weights: np.ndarray) -> None:
        self.n = len(weights)
        self.w = weights.copy()
        self.rng = np.random.default_rng(self.seed)

    def native(self, indices: np.ndarray, values: np.ndarray) -> Tuple[Any, Any]:
        return indices, values

    def update(self, indices: Any, values: Any) -> None:
        self.w[indices] = values

    def sample(self, k: int) -> Any:
        raise Unsupported(self.supports("sample", self.n))

    def sample_without_replacement(self, k: int) -> Any:
        with np.errstate(divide="ignore"):  # a zero weight's key is +inf: never drawn
            keys = self.rng.standard_exponential(self.n) / self.w
        smallest = np.argpartition(keys, k - 1)[:k] if k < self.n else np.arange(self.n)
        return smallest[np.argsort(keys[smallest], kind="stable")]


METHODS: Dict[str, type] = {
    m.name: m
    for m in (
        IsampleMethod,
        NumpyChoiceMethod,
        NumpyCumsumMethod,
        TorchMultinomialMethod,
        TorchWRSMethod,
        TorchRLFp64Method,
        TorchRLFp32Method,
        CpprbMethod,
        SumtreeMethod,
        NumpyRaceMethod,
    )
}
METHOD_NAMES = list(METHODS)


# -- descents of the array baselines, as their libraries compute them ---------------------


def choice_descent(weights: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """numpy ``Generator.choice(n, k, p=w / w.sum())`` as a function of its uniforms.

    numpy normalises the cdf of p and searches its uniforms ``random(k)`` with
    ``side='right'`` (numpy/random/_generator.pyx); the tests check it draw for draw.
    """
    cdf = (weights / weights.sum()).cumsum()
    cdf /= cdf[-1]
    return lambda u: cdf.searchsorted(u, side="right")


def multinomial_descent(weights: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``torch.multinomial(w, k, replacement=True)`` on the CPU as a function of its uniforms.

    The kernel (aten/src/ATen/native/cpu/MultinomialKernel.cpp) sums the weights in order,
    divides the running sums by the total, sets the last to 1 and takes the first entry
    >= u; the tests check it draw for draw.
    """
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    cumulative[-1] = 1.0
    return lambda u: np.searchsorted(cumulative, u, side="left")


def peer_status(methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per method: whether it can run here (and why not), how it was loaded, what its timed calls do."""
    status = {}
    for name in methods:
        cls = METHODS[name]
        reason = cls.unavailable()
        status[name] = {
            "available": reason is None,
            "reason": reason,
            "note": cls.note() if reason is None else "",
            "timed": cls.timed,
        }
    return status
