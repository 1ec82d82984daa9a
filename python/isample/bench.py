"""isample against its peers: speed, exactness and memory (``python -m isample.bench``).

Times each method x workload x n with ``time.perf_counter_ns`` and reports medians (and
minima) of single calls, each method's time relative to isample's, and the fastest peer of
every row. Peers that do not install or import are skipped with the reason. Optionally
writes JSON (with machine information) and a log-log scaling plot.

Methods (each behind an adapter with the same interface):

- ``isample``: ``isample.SumTree`` on the CPU.
- ``numpy_choice``: ``Generator.choice(n, k, p=w / w.sum())``, p recomputed every call
  because scores change every step.
- ``numpy_cumsum``: ``np.cumsum`` + ``np.searchsorted``, cumsum recomputed every call.
- ``torch_multinomial``: ``torch.multinomial`` on a float64 weight tensor.
- ``torch_wrs``: ``torch.utils.data.WeightedRandomSampler``; a draw is ``list(sampler)``,
  i.e. what a DataLoader consumes: ``torch.multinomial`` plus ``tolist()``.
- ``torchrl_fp64`` / ``torchrl_fp32``: TorchRL's C++ ``SumSegmentTreeFp64/Fp32``, used as
  TorchRL's own ``PrioritizedSampler`` uses them on the CPU: masses are
  ``uniform * tree.query(0, n)`` in float64 (``scan_lower_bound`` takes masses, not
  uniforms), indices past the end are clamped to n - 1.
- ``cpprb``: cpprb's ``PrioritizedReplayBuffer`` (alpha = 1, eps = 0, so its float32
  priorities are the weights), with a 1-byte payload per item; ``sample`` is the buffer's
  ``sample(k)`` (stratified draws, payload gather and importance weights included),
  ``update`` is ``update_priorities``.

Workloads (DESIGN.md): build from an array, update 128, sample 128 with replacement, the
step (sample 128 then update them), and k distinct items without replacement (128 of n for
every n; 8,192 and 30,000 of 50k, the CIFAR settings).

Accuracy: for every method whose draw is a deterministic, monotone function of one
uniform, the exact distribution it samples when that uniform has 53 random bits (all of
isample, numpy and torch do), found by bisection over the 2^53-point grid; cpprb draws
internally, so its row is a Monte Carlo estimate. See ``exact_grid_counts``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

import isample

BATCH = 128
GiB = 1024**3
GRID_BITS = 53
GRID = 1 << GRID_BITS  # uniforms u = m / 2^53, m in [0, 2^53): numpy, torch and isample alike
DEFAULT_SIZES = (10_000, 50_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000)
QUICK_SIZES = (10_000, 50_000)
DEFAULT_ACCURACY_SIZES = (1_000_000, 10_000_000)
TORCH_MULTINOMIAL_MAX = 1 << 24

WORKLOADS: Dict[str, str] = {
    "build": "build from an array of n weights",
    "update": f"update {BATCH} weights",
    "sample": f"sample {BATCH} with replacement",
    "step": f"step: sample {BATCH} + update them",
    "wor128": f"{BATCH} distinct items (without replacement)",
    "wor8192": "8,192 of 50k without replacement",
    "wor30000": "30,000 of 50k without replacement",
}
# Workloads run at one n only (the CIFAR-10 settings of DESIGN.md).
FIXED_N = {"wor8192": 50_000, "wor30000": 50_000}
WOR_K = {"wor128": BATCH, "wor8192": 8192, "wor30000": 30_000}
SWEPT = ("build", "update", "sample", "step", "wor128")


class Unsupported(Exception):
    """A method that cannot run a workload; the message says why."""


# -- memory ------------------------------------------------------------------------------


def isample_tree_bytes(n: int, fanout: int = 16) -> int:
    """Bytes of an ``isample.SumTree(n)``, from its layout (csrc/common.h).

    Leaves are padded to a multiple of the fan-out; every internal level is padded to a
    block of ``fanout`` nodes, up to a single root: about 8 * 16/15 = 8.53 bytes per item.
    """

    def blocks(x: int) -> int:
        return -(-x // fanout) * fanout

    leaves = blocks(max(n, 1))
    internal, nodes = 0, leaves // fanout
    while True:
        internal += blocks(nodes)
        if nodes == 1:
            break
        nodes = -(-nodes // fanout)
    return 8 * (leaves + internal)


def memory_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(needed: int, available: Optional[int] = None, margin: int = GiB) -> bool:
    """Whether `needed` bytes (plus a margin for Python and the OS) fit in free memory."""
    available = memory_available() if available is None else available
    return available is None or needed + margin <= available


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


def _version(distribution: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return None


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


# -- timing ----------------------------------------------------------------------------


@dataclass
class Timing:
    times_ns: List[int]

    @property
    def median_us(self) -> float:
        return float(np.median(self.times_ns)) / 1e3

    @property
    def min_us(self) -> float:
        return min(self.times_ns) / 1e3


def time_calls(
    function: Callable[[], Any],
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    before: Optional[Callable[[], Any]] = None,
    warmup: bool = True,
) -> Timing:
    """Single calls of `function`, timed with perf_counter_ns until the budget is spent.

    ``before`` runs untimed before every call (the build's release of the previous tree).
    The garbage collector is off while timing, so a collection is not charged to a call.
    """
    if warmup:
        if before:
            before()
        function()
    times: List[int] = []
    enabled = gc.isenabled()
    gc.disable()
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    try:
        while len(times) < max_repeats:
            if before:
                before()
            start = clock()
            function()
            end = clock()
            times.append(end - start)
            if len(times) >= min_repeats and end >= deadline:
                break
    finally:
        if enabled:
            gc.enable()
    return Timing(times)


class OtherLoad:
    """CPU used by other processes while a cell ran, in cores, from /proc/stat (Linux)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / ticks
        ours = os.times()
        return busy, ours.user + ours.system, time.perf_counter()

    def cores(self) -> Optional[float]:
        end = self._sample()
        if self.start is None or end is None or end[2] - self.start[2] < 0.05:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(others, 0.0) / (end[2] - self.start[2]), 2)


def timing_weights(n: int, seed: int = 0) -> np.ndarray:
    """The weights the speed runs use: uniform in [0.001, 1.001), as in the core benchmark."""
    weights = np.random.default_rng(seed).random(n)
    weights += 1e-3
    return weights


def update_arguments(n: int, seed: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, BATCH), rng.random(BATCH) + 1e-3


# -- exact sampling distributions ---------------------------------------------------------


def accuracy_weights(n: int, seed: int = 0, sigma: float = 2.0, zero_fraction: float = 0.01) -> np.ndarray:
    """Log-normal weights (about 9 decades at n = 1e7) with 1% zeros, on a 2^-30 grid.

    Being multiples of 2^-30, their exact sums are int64 arithmetic, so the true
    probabilities and the ideal sampler's boundaries are known exactly; the trees still
    round, since their float64 partial sums carry 53 bits only.
    """
    rng = np.random.default_rng(seed)
    units = np.maximum(np.rint(rng.lognormal(0.0, sigma, n) * 2.0**30), 1.0)
    units[rng.random(n) < zero_fraction] = 0.0
    if not units.any():
        units[0] = 1.0
    return np.ldexp(units, -30)


def _exact_units(weights: np.ndarray) -> Tuple[np.ndarray, int]:
    units = np.ldexp(weights, 30)
    if not np.array_equal(units, np.rint(units)):
        raise ValueError("weights must be multiples of 2^-30 (see accuracy_weights)")
    if units.sum() >= 2.0**61:  # checked in float64 first: an int64 sum would wrap silently
        raise ValueError("weights too large for exact int64 sums")
    units = units.astype(np.int64)
    total = int(units.sum(dtype=np.int64))
    return units, total


def ideal_boundaries(units: np.ndarray, total: int) -> np.ndarray:
    """B[i-1] = ceil(P_i * 2^53 / total) for i = 1..n, P_i the exact sum of items before i.

    The ideal sampler (exact arithmetic, ties to the right) draws item >= i exactly when
    its uniform's grid index m >= B[i-1]. Long division in int64, a few bits at a time.
    """
    prefix = np.cumsum(units, dtype=np.int64)  # P_1 .. P_n
    remainder = prefix.copy()
    quotient = np.zeros_like(prefix)
    step = max(1, 62 - total.bit_length())
    bits = GRID_BITS
    while bits:
        s = min(step, bits)
        remainder <<= s
        digit = remainder // total
        remainder -= digit * total
        quotient = (quotient << s) + digit
        bits -= s
    return quotient + (remainder > 0)


def exact_grid_counts(
    descent: Callable[[np.ndarray], np.ndarray], n: int, guess: np.ndarray
) -> Tuple[np.ndarray, int, Dict[str, Any]]:
    """How many of the 2^53 grid uniforms u = m / 2^53 each item receives.

    ``descent`` maps float64 uniforms to item indices (>= n meaning out of range) and must
    be monotone in u, as every inverse-cdf descent is. For each i = 1..n the boundary
    B_i = min{m : descent(m / 2^53) >= i} is found by widening a bracket around `guess`
    (the ideal boundaries), then bisecting; item i then has exactly B_{i+1} - B_i grid
    points. Returns (counts of the n items, grid points past the last item, info), where
    info holds the number of evaluations and a spot check of monotonicity on random u.
    """
    targets = np.arange(1, n + 1, dtype=np.int64)
    evaluations = [0]

    def at(m: np.ndarray) -> np.ndarray:
        evaluations[0] += 1
        return np.minimum(np.asarray(descent(m.astype(np.float64) * 2.0**-GRID_BITS), dtype=np.int64), n)

    lo = np.maximum(guess.astype(np.int64) - 1, -1)  # lo = -1 and hi = 2^53 are sentinels
    hi = np.minimum(guess.astype(np.int64), GRID)
    reach_lo = np.ones(n, dtype=np.int64)
    reach_hi = np.ones(n, dtype=np.int64)
    lo_ok, hi_ok = lo < 0, hi >= GRID
    while not (lo_ok.all() and hi_ok.all()):
        todo = np.flatnonzero(~lo_ok)
        if todo.size:
            good = at(lo[todo]) < targets[todo]
            lo_ok[todo[good]] = True
            bad = todo[~good]  # descent(lo) >= i: lo is an upper end, look further left
            hi[bad], hi_ok[bad] = lo[bad], True
            reach_lo[bad] *= 16
            lo[bad] = np.maximum(lo[bad] - reach_lo[bad], -1)
            lo_ok[bad] = lo[bad] < 0
        todo = np.flatnonzero(~hi_ok)
        if todo.size:
            good = at(hi[todo]) >= targets[todo]
            hi_ok[todo[good]] = True
            bad = todo[~good]
            lo[bad], lo_ok[bad] = hi[bad], True
            reach_hi[bad] *= 16
            hi[bad] = np.minimum(hi[bad] + reach_hi[bad], GRID)
            hi_ok[bad] = hi[bad] >= GRID
    while True:
        todo = np.flatnonzero(hi - lo > 1)
        if not todo.size:
            break
        mid = (lo[todo] + hi[todo]) // 2
        above = at(mid) >= targets[todo]
        hi[todo[above]] = mid[above]
        lo[todo[~above]] = mid[~above]
    edges = np.concatenate(([0], hi, [GRID]))
    counts = np.diff(edges)
    check = np.random.default_rng(12345).integers(0, GRID, 100_000)
    mismatches = int(np.count_nonzero(at(check) != np.searchsorted(hi, check, side="right")))
    info = {"evaluations": evaluations[0], "monotone": bool((counts >= 0).all()), "spot_check_mismatches": mismatches}
    return counts[:n], int(counts[n]), info


def distribution_metrics(
    probability: np.ndarray, weights_units: np.ndarray, total_units: int, out_of_range: float = 0.0
) -> Dict[str, Any]:
    """TV distance and starvation of a sampled distribution (longdouble) from w / sum w."""
    truth = weights_units.astype(np.longdouble) / np.longdouble(total_units)
    error = np.abs(probability - truth)
    tv = 0.5 * (error.sum() + np.longdouble(out_of_range))
    positive = weights_units > 0
    ratio = probability[positive] / truth[positive]
    return {
        "tv": float(tv),
        "never_drawn": int(np.count_nonzero(probability[positive] == 0)),
        "never_drawn_fraction": float(np.count_nonzero(probability[positive] == 0) / positive.sum()),
        "zero_weight_mass": float(probability[~positive].sum()),
        "out_of_range_mass": float(out_of_range),
        "max_ratio": float(ratio.max()),
        "min_ratio": float(ratio.min()),
        "max_relative_error": float(np.abs(ratio - 1).max()),
        "max_absolute_error": float(error.max()),
    }


def _mc_metrics(counts: np.ndarray, units: np.ndarray, total: int, draws: int) -> Dict[str, Any]:
    truth = units / total
    expected = truth * draws
    tv = 0.5 * float(np.abs(counts / draws - truth).sum())
    eligible = (units > 0) & (expected >= 10)
    starved = int(np.count_nonzero(eligible & (counts == 0)))
    return {
        "tv": tv,
        "starved_expected_ge_10": starved,
        # an exact sampler misses an item expected λ times with probability e^-λ
        "starved_by_chance_expected": float(np.exp(-expected[eligible]).sum()),
        "starved_fraction": starved / max(int(eligible.sum()), 1),
        "zero_weight_draws": int(counts[units == 0].sum()),
        "zero_weight_mass": float(counts[units == 0].sum() / draws),
    }


def measure_accuracy(
    methods: Sequence[Method],
    n: int,
    seed: int = 0,
    mc_draws: int = 20_000_000,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Exactness rows at size n: the ideal sampler, then each method (exact or Monte Carlo)."""
    weights = accuracy_weights(n, seed)
    units, total = _exact_units(weights)
    guess = ideal_boundaries(units, total)
    ideal_counts = np.diff(np.concatenate(([0], guess, [GRID])))
    ideal = ideal_counts.astype(np.longdouble) / GRID
    rows = [
        {
            "method": "ideal",
            "n": n,
            "how": "exact arithmetic, ties to the right, 53-bit uniforms: what the uniforms' resolution alone costs",
            **distribution_metrics(ideal[:n], units, total, float(ideal[n])),
            "tv_vs_ideal": 0.0,
        }
    ]
    log(f"  accuracy n={n:,}: ideal sampler with 53-bit uniforms TV {rows[0]['tv']:.3g}")
    for method in methods:
        start = time.perf_counter()
        row: Dict[str, Any] = {"method": method.name, "n": n}
        try:
            reason = method.supports("sample", n)
            if reason:
                raise Unsupported(reason)
            need = method.state_bytes(n) + method.transient_bytes(n) + 48 * n
            if not fits_in_memory(need):
                raise Unsupported(f"needs ~{need / GiB:.1f} GiB, MemAvailable {memory_available() / GiB:.1f} GiB")
            method.setup(weights)
            descent = method.descent()
            if descent is not None:
                counts, past_end, info = exact_grid_counts(descent, n, guess)
                probability = counts.astype(np.longdouble) / GRID
                excess = np.abs(np.append(counts, past_end) - ideal_counts).astype(np.float64).sum()
                row.update(
                    how="exact: bisection over the 2^53-point uniform grid",
                    **distribution_metrics(probability, units, total, float(past_end) / GRID),
                    tv_vs_ideal=0.5 * float(excess) / GRID,
                    **info,
                )
                if method.name in ("torch_multinomial", "torch_wrs"):
                    row["how"] += " (the CPU kernel's algorithm, checked draw for draw in tests)"
                if method.name == "numpy_choice":
                    row["how"] += " (Generator.choice's algorithm, checked draw for draw in tests)"
            else:
                counts = _monte_carlo_counts(method, n, mc_draws)
                reference = np.random.default_rng(seed + 7).multinomial(mc_draws, units / total)
                row.update(
                    how=f"Monte Carlo: {mc_draws:,} draws in calls of sample({BATCH})",
                    draws=mc_draws,
                    **_mc_metrics(counts, units, total, mc_draws),
                    exact_sampler_tv_same_draws=_mc_metrics(reference, units, total, mc_draws)["tv"],
                )
        except Unsupported as reason:
            row.update(status="skipped", reason=str(reason))
        finally:
            method.release()
        row.setdefault("status", "ok")
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        if row["status"] == "ok":
            starved = row.get("never_drawn_fraction", row.get("starved_fraction"))
            log(f"  accuracy n={n:,}: {method.name:<18} TV {row['tv']:.3g}, never drawn {starved:.3g} "
                f"({row['seconds']} s)")
        else:
            log(f"  accuracy n={n:,}: {method.name:<18} skipped: {row['reason']}")
    return rows


def _monte_carlo_counts(method: Method, n: int, draws: int) -> np.ndarray:
    calls = -(-draws // BATCH)
    drawn = np.empty(calls * BATCH, dtype=np.int64)
    for j in range(calls):
        drawn[j * BATCH : (j + 1) * BATCH] = method.as_numpy(method.sample(BATCH))
    return np.bincount(drawn[:draws], minlength=n)[:n]


# -- the run ---------------------------------------------------------------------------


@dataclass
class Settings:
    sizes: List[int]
    workloads: List[str]
    methods: List[str]
    budget_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 20_000
    max_call_s: float = 5.0
    max_build_s: float = 60.0
    peer_max_n: int = 100_000_000
    accuracy_sizes: List[int] = field(default_factory=lambda: list(DEFAULT_ACCURACY_SIZES))
    mc_draws: int = 20_000_000
    seed: int = 0
    quiet_wait_s: float = 0.0  # total seconds the run may wait for other processes to go quiet
    quiet_left_s: float = 0.0
    rounds: int = 5  # each cell alternates its contenders over this many rounds
    train_threads: int = 1  # torch threads for the training-step cells
    overhead: bool = True  # the sampler's costs in a training loop (run_overhead)


class Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {text}", flush=True)


def _cells(settings: Settings, n: int) -> List[str]:
    return [w for w in settings.workloads if FIXED_N.get(w, n) == n and WOR_K.get(w, 0) <= n]


def run_speed(settings: Settings, log: Log) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Every method x workload x n; returns (result rows, memory rows).

    At each n the methods are set up side by side (as many as fit in memory together), and
    each cell alternates them over ``settings.rounds`` rounds (forward, then backward), so a
    slow spell of the machine lands on every contender alike.
    """
    results: List[Dict[str, Any]] = []
    memory: List[Dict[str, Any]] = []
    last: Dict[Tuple[str, str], Tuple[int, float]] = {}  # (method, cell) -> (n, seconds per call)

    def skip(method: str, n: int, workloads: Iterable[str], reason: str) -> None:
        for workload in workloads:
            results.append({"method": method, "workload": workload, "n": n, "status": "skipped", "reason": reason})
        log(f"n={n:,} {method}: skipped {', '.join(workloads)}: {reason}")

    for n in settings.sizes:
        cells = _cells(settings, n)
        if not cells:
            continue
        need = 8 * n + isample_tree_bytes(n)
        if not fits_in_memory(need):
            for name in settings.methods:
                skip(name, n, cells, f"weights + tree need ~{need / GiB:.1f} GiB; {_free()}")
            continue
        log(f"n={n:,}: generating weights")
        weights = timing_weights(n, settings.seed)
        indices, values = update_arguments(n, settings.seed + 1)
        group: List[Tuple[Method, float]] = []  # set up, with the seconds of their first build
        held = 0  # bytes the group holds

        def run_group() -> None:
            if not group:
                return
            try:
                for workload in cells:
                    results.extend(_interleaved_cell(group, workload, n, weights, indices, values, settings, last, log))
            finally:
                for method, _ in group:
                    method.release()
                group.clear()
                if n >= 1_000_000:
                    gc.collect()  # a full collection costs ~0.2 s with torch loaded

        for name in settings.methods:
            cls = METHODS[name]
            reason = cls.unavailable()
            if reason:
                skip(name, n, cells, reason)
                continue
            if name != "isample" and n > settings.peer_max_n:
                skip(name, n, cells, f"above --peer-max-n={settings.peer_max_n:,}: isample only at this size")
                continue
            method = cls(settings.seed)
            need = method.state_bytes(n) + method.transient_bytes(n)
            if group and not fits_in_memory(held + need):
                run_group()  # the ones set up so far run first, then make room
                held = 0
            if not fits_in_memory(need):
                skip(name, n, cells, f"needs ~{need / GiB:.1f} GiB; {_free()}")
                continue
            predicted = _predict(last, name, "setup", n)
            if predicted > settings.max_build_s:
                why = f"building it would take ~{predicted:.0f} s (extrapolated from smaller n)"
                skip(name, n, cells, f"{why} > --max-build={settings.max_build_s:g} s")
                continue
            _wait_until_quiet(settings)
            start = time.perf_counter()
            try:
                method.setup(weights)
            except Exception as error:  # a peer that cannot build is skipped, not fatal
                method.release()
                skip(name, n, cells, f"setup failed: {type(error).__name__}: {error}")
                continue
            cold = time.perf_counter() - start
            last[(name, "setup")] = (n, cold)
            memory.append(_memory_row(method, n))
            group.append((method, cold))
            held += need
        run_group()
        weights = None  # freed before the next size (run_group reads it: no del)
        gc.collect()
    return results, memory


def _free() -> str:
    return f"MemAvailable is {(memory_available() or 0) / GiB:.1f} GiB"


def _predict(last: Dict[Tuple[str, str], Tuple[int, float]], method: str, cell: str, n: int) -> float:
    """Seconds a call would take at n, extrapolated linearly from the last size measured."""
    if (method, cell) not in last:
        return 0.0
    n0, seconds = last[(method, cell)]
    return seconds * n / n0


def _memory_row(method: Method, n: int) -> Dict[str, Any]:
    state = method.state_bytes(n)
    how = "layout formula"
    if isinstance(method, IsampleMethod):
        state, how = method.tree.nbytes, "SumTree.nbytes"
    elif isinstance(method, _TorchRLMethod):
        state = 2 * method.tree.capacity * np.dtype(method.dtype).itemsize
        how = "2 x tree.capacity x itemsize"
    return {
        "method": method.name,
        "n": n,
        "state_bytes": int(state),
        "bytes_per_item": state / n,
        "transient_bytes_per_item": method.transient_bytes(n) / n,
        "how": how,
    }


def _interleaved_cell(
    group: Sequence[Tuple[Method, float]],
    workload: str,
    n: int,
    weights: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    settings: Settings,
    last: Dict[Tuple[str, str], Tuple[int, float]],
    log: Log,
) -> List[Dict[str, Any]]:
    """One row per method for one (workload, n): the methods take turns over the rounds."""
    rows: List[Dict[str, Any]] = []
    ready = []  # (method, row, function, before, warmup, min_repeats)
    for method, cold_setup_s in group:
        row: Dict[str, Any] = {"method": method.name, "workload": workload, "n": n}
        reason = method.supports(workload, n)
        predicted = _predict(last, method.name, workload, n)
        if reason is None and predicted > settings.max_call_s:
            reason = f"one call would take ~{predicted:.0f} s (extrapolated from smaller n)"
            reason += f" > --max-call={settings.max_call_s:g} s"
        if reason is None:
            try:
                function, before, warmup = _workload_call(method, workload, weights, indices, values)
            except Unsupported as error:
                reason = str(error)
        if reason is not None:
            log(f"n={n:,} {method.name} {workload}: skipped: {reason}")
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        slow = predicted > settings.budget_s or (workload == "build" and cold_setup_s > settings.budget_s)
        longest = max(predicted, cold_setup_s if workload == "build" else 0.0)
        min_repeats = 1 if longest > settings.max_call_s / 2 else settings.min_repeats
        if workload == "build" and method.build_is_setup:
            row["first_build_us"] = cold_setup_s * 1e6  # into fresh memory: page faults included
        ready.append([method, row, function, before, warmup and not slow, min_repeats, []])
    if not ready:
        return rows
    _wait_until_quiet(settings)
    rounds = max(1, settings.rounds)
    load = OtherLoad()
    for turn in range(rounds):
        for entry in ready if turn % 2 == 0 else ready[::-1]:
            method, row, function, before, warmup, min_repeats, times = entry
            if row.get("status") == "skipped":
                continue
            try:
                timing = time_calls(
                    function,
                    settings.budget_s / rounds,
                    max(1, -(-min_repeats // rounds)),
                    max(1, settings.max_repeats // rounds),
                    before,
                    warmup and turn == 0,
                )
                times.extend(timing.times_ns)
            except Unsupported as error:
                row.update(status="skipped", reason=str(error))
            except Exception as error:  # e.g. torch refusing a size: recorded with its message
                message = (str(error).strip().splitlines() or [""])[0]
                row.update(status="skipped", reason=f"{type(error).__name__}: {message}")
    others = load.cores()
    for method, row, _, _, _, _, times in ready:
        if row.get("status") == "skipped":
            log(f"n={n:,} {method.name} {workload}: skipped: {row['reason']}")
            rows.append(row)
            continue
        timing = Timing(times)
        last[(method.name, workload)] = (n, timing.median_us / 1e6)
        row.update(status="ok", median_us=timing.median_us, min_us=timing.min_us, repeats=len(times), rounds=rounds)
        row.update(other_processes_cores=others, attempts=1, waited_for_quiet_s=0.0)
        busy = f"; other processes used {others:.1f} cores" if others and others > 0.2 else ""
        log(
            f"n={n:,} {method.name} {workload}: median {timing.median_us:,.1f} µs "
            f"(min {timing.min_us:,.1f}, {len(times):,} calls in {rounds} rounds){busy}"
        )
        rows.append(row)
    return rows


QUIET_CORES = 0.3  # other processes' CPU use (cores) above which a cell counts as disturbed


def _wait_until_quiet(settings: Settings) -> float:
    """Sleep while other processes keep a core busy, within --wait-for-quiet's budget."""
    waited = 0.0
    while settings.quiet_left_s > 0:
        probe = OtherLoad()
        time.sleep(0.5)
        cores = probe.cores()
        waited += 0.5
        settings.quiet_left_s -= 0.5
        if cores is None or cores <= QUIET_CORES:
            break
    return waited


def _workload_call(
    method: Method, workload: str, weights: np.ndarray, indices: np.ndarray, values: np.ndarray
) -> Tuple[Callable[[], Any], Optional[Callable[[], Any]], bool]:
    """(timed call, untimed call before each, whether to warm up)."""
    if workload == "build":
        if method.build_is_setup:
            return (lambda: method.setup(weights)), method.release, False
        method.build(weights[:16])  # raises Unsupported early for methods without a build
        return (lambda: method.build(weights)), None, True
    if workload == "update":
        idx, val = method.native(indices, values)
        return (lambda: method.update(idx, val)), None, True
    if workload == "sample":
        return (lambda: method.sample(BATCH)), None, True
    if workload == "step":
        val = method.native_values(values)
        return (lambda: method.step(val)), None, True
    k = WOR_K[workload]
    return (lambda: method.sample_without_replacement(k)), None, True


# -- what the sampler costs a training loop ---------------------------------------------------

OVERHEAD_N = 50_000


def interleaved(contenders: Dict[str, Callable[[], Any]], settings: Settings) -> Dict[str, Timing]:
    """Time each contender in turn over settings.rounds rounds (forward, then backward), each
    round a share of the budget; one Timing per contender, over all its calls."""
    rounds = max(1, settings.rounds)
    times: Dict[str, List[int]] = {name: [] for name in contenders}
    for function in contenders.values():
        function()  # warm up
    names = list(contenders)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            timing = time_calls(
                contenders[name], settings.budget_s / rounds, max(1, -(-settings.min_repeats // rounds)),
                max(1, settings.max_repeats // rounds), warmup=False,
            )
            times[name].extend(timing.times_ns)
    return {name: Timing(t) for name, t in times.items()}


def _overhead_row(cell: str, timings: Dict[str, Timing], ours: str, baseline: str, goal: float, note: str) -> Dict[str, Any]:
    row = {
        "cell": cell,
        "isample": ours,
        "isample_us": timings[ours].median_us,
        "baseline": baseline,
        "baseline_us": timings[baseline].median_us,
        "goal": goal,
        "note": note,
        "calls": {name: len(t.times_ns) for name, t in timings.items()},
    }
    row["ratio"] = row["isample_us"] / row["baseline_us"]
    return row


def run_overhead(settings: Settings, log: Log) -> List[Dict[str, Any]]:
    """The sampler's cost in a training loop, each against what the loop costs without it:
    sampler.weights + sampler.update of a drawn batch of 128 (n = 50k) against the tree's own
    update of 128, per transform; one training step (MLP 64-256-10, batch 128, SGD) with the
    importance-weighted loss against the same step with a plain mean loss; one DataLoader
    batch through IndexedDataset and the sampler against a shuffled DataLoader."""
    from .integrations.protocol import weighted_loss

    rows: List[Dict[str, Any]] = []
    n, batch = OVERHEAD_N, BATCH
    generator = torch.Generator().manual_seed(settings.seed)
    losses = torch.rand(batch, dtype=torch.float64, generator=generator)
    for transform in ("softmax", "proportional", "rank"):
        sampler = isample.ImportanceSampler(n, transform=transform, seed=settings.seed)
        sampler.update(torch.arange(n), torch.rand(n, dtype=torch.float64, generator=generator))
        index = torch.tensor(next(iter(torch.utils.data.BatchSampler(sampler, batch, drop_last=False))))
        tree = sampler._tree
        # the tree call a step amounts to: the softmax tree takes the scores; the others take
        # leaf values (the rank transform's tree is rebuilt per epoch: the same update is the
        # cost a per-step tree would have)
        leaves = losses if transform == "softmax" else sampler.transform.leaf_values(losses) if transform == "proportional" else losses
        timings = interleaved(
            {
                "the tree's own update": lambda tree=tree, index=index, leaves=leaves: tree.update(index, leaves),
                "sampler.weights + sampler.update": lambda s=sampler, index=index: (s.weights(index), s.update(index, losses)),
            },
            settings,
        )
        row = _overhead_row(
            f"sampler.weights + sampler.update, {transform}, batch {batch}, n = {n:,}",
            timings, "sampler.weights + sampler.update", "the tree's own update", 2.0, "float64 CPU losses, last_loss",
        )
        rows.append(row)
        log(f"overhead {transform}: {row['isample_us']:.2f} µs against the tree's {row['baseline_us']:.2f} µs ({row['ratio']:.2f}×)")

    # One torch thread: on a machine shared with other jobs two threads wait on each other at
    # every operation (a step then takes ~100 ms instead of ~0.5 ms), which no ratio survives.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.train_threads)
    try:
        rows += _training_step_rows(settings, generator, n, batch, weighted_loss, log)
    finally:
        torch.set_num_threads(threads_before)
    rows.append(_dataloader_row(settings, generator, n, batch, log))
    return rows


def _training_step_rows(settings: Settings, generator: torch.Generator, n: int, batch: int, weighted_loss: Callable,
                        log: Log) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    torch.manual_seed(settings.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(16, batch, 64, generator=generator)
    targets = torch.randint(0, 10, (16, batch), generator=generator)
    sampler = isample.ImportanceSampler(n, seed=settings.seed)
    sampler.update(torch.arange(n), torch.rand(n, dtype=torch.float64, generator=generator))
    index = torch.tensor(next(iter(torch.utils.data.BatchSampler(sampler, batch, drop_last=False))))
    turn = [0]

    def step(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:  # a new batch every step, as in training (one fixed batch would be memorised)
            turn[0] += 1
            x, y = inputs[turn[0] % 16], targets[turn[0] % 16]
            optimizer.zero_grad(set_to_none=True)
            loss_of(model(x), y).backward()
            optimizer.step()

        return run

    def cheapest(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_example = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        weights = sampler.weights(index, dtype=per_example.dtype, device=per_example.device, scale=1.0 / batch)
        sampler.update(index, per_example)
        return per_example @ weights

    timings = interleaved(
        {
            "plain mean loss": step(lambda logits, y: torch.nn.functional.cross_entropy(logits, y)),
            "per-example losses, mean": step(lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="none").mean()),
            "protocol.weighted_loss": step(
                lambda logits, y: weighted_loss(sampler, index, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
            ),
            "weights(scale=1/b) + update + losses @ weights": step(cheapest),
        },
        settings,
    )
    threads = f"torch {torch.get_num_threads()} thread(s)"
    for name in ("per-example losses, mean", "protocol.weighted_loss", "weights(scale=1/b) + update + losses @ weights"):
        row = _overhead_row(f"training step, MLP 64-256-10, batch {batch}, SGD: {name}", timings, name, "plain mean loss", 1.10, threads)
        rows.append(row)
        log(f"overhead step ({name}): {row['isample_us']:.1f} µs against {row['baseline_us']:.1f} µs ({row['ratio']:.3f}×)")
    return rows


def _dataloader_row(settings: Settings, generator: torch.Generator, n: int, batch: int, log: Log) -> Dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    features = torch.randn(n, 64, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    dataset = TensorDataset(features, labels)
    loaders = {
        "DataLoader(TensorDataset, shuffle=True)": DataLoader(dataset, batch_size=batch, shuffle=True),
        "DataLoader(IndexedDataset(TensorDataset), sampler=ImportanceSampler)": DataLoader(
            isample.IndexedDataset(dataset), batch_size=batch, sampler=isample.ImportanceSampler(n, seed=settings.seed)
        ),
    }
    iterators = {name: [iter(loader), loader] for name, loader in loaders.items()}

    def next_batch(name: str) -> Callable[[], Any]:
        def run() -> Any:
            state = iterators[name]
            try:
                return next(state[0])
            except StopIteration:  # a new epoch
                state[0] = iter(state[1])
                return next(state[0])

        return run

    timings = interleaved({name: next_batch(name) for name in loaders}, settings)
    names = list(loaders)
    row = _overhead_row(f"one DataLoader batch of {batch}, n = {n:,}", timings, names[1], names[0], 1.10, "")
    log(f"overhead DataLoader: {row['isample_us']:.1f} µs against {row['baseline_us']:.1f} µs ({row['ratio']:.3f}×)")
    return row


def overhead_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["", "What the sampler costs a training loop (medians, interleaved; ratio = isample's / the baseline's, goal in brackets)"]
    for r in rows:
        lines.append(f"  {r['cell']}")
        lines.append(
            f"      {_format_us(r['isample_us'])} against {r['baseline']} {_format_us(r['baseline_us'])}: "
            f"{r['ratio']:.2f}× (goal <= {r['goal']:.2f}×){'; ' + r['note'] if r['note'] else ''}"
        )
    return "\n".join(lines)


# -- reporting --------------------------------------------------------------------------


def _format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:,.2f} s"
    if us >= 1e4:
        return f"{us / 1e3:,.1f} ms"
    return f"{us:,.1f} µs" if us < 100 else f"{us:,.0f} µs"


def _format_ratio(ratio: float) -> str:
    return f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.1f}×"


def add_ratios(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Set each row's ratio to isample's median; return the best peer of each (workload, n)."""
    ours = {
        (r["workload"], r["n"]): r["median_us"] for r in results if r["method"] == "isample" and r["status"] == "ok"
    }
    best: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for r in results:
        key = (r["workload"], r["n"])
        if r["status"] != "ok":
            continue
        r["ratio_vs_isample"] = r["median_us"] / ours[key] if key in ours else None
        if r["method"] != "isample" and (key not in best or r["median_us"] < best[key]["median_us"]):
            best[key] = r
    rows = []
    for (workload, n), peer in best.items():
        rows.append(
            {
                "workload": workload,
                "n": n,
                "best_peer": peer["method"],
                "best_peer_median_us": peer["median_us"],
                "isample_median_us": ours.get((workload, n)),
                "speedup": peer["median_us"] / ours[(workload, n)] if (workload, n) in ours else None,
            }
        )
    return rows


def speed_table(results: List[Dict[str, Any]], methods: Sequence[str]) -> str:
    """One block per workload: a row per method, a column per n; 'median (× isample)'."""
    label = {name: METHODS[name].label for name in methods}
    lines: List[str] = []
    reasons: Dict[str, List[str]] = {}
    for workload in WORKLOADS:
        rows = [r for r in results if r["workload"] == workload]
        if not rows:
            continue
        sizes = sorted({r["n"] for r in rows})
        cell = {(r["method"], r["n"]): r for r in rows}
        width = 19
        lines += ["", f"{WORKLOADS[workload]}: median per call (× isample's time)"]
        lines.append("n".ljust(16) + "".join(f"{n:,}".rjust(width) for n in sizes))
        for m in methods:
            texts = []
            for n in sizes:
                r = cell.get((m, n))
                if r is None:
                    texts.append("")
                elif r["status"] != "ok":
                    texts.append("–")
                    reasons.setdefault(f"{label[m]}: {r['reason']}", []).append(f"{workload} n={n:,}")
                else:
                    ratio = r.get("ratio_vs_isample")
                    extra = f" ({_format_ratio(ratio)})" if m != "isample" and ratio is not None else ""
                    texts.append(_format_us(r["median_us"]) + extra)
            lines.append(label[m].ljust(16) + "".join(t.rjust(width) for t in texts))
        best_texts = []
        for n in sizes:
            peers = [cell[(m, n)] for m in methods if m != "isample" and cell.get((m, n), {}).get("status") == "ok"]
            best = min(peers, key=lambda r: r["median_us"]) if peers else None
            ratio = best.get("ratio_vs_isample") if best else None
            best_texts.append(f"{label[best['method']]} {_format_ratio(ratio)}" if best and ratio else "")
        lines.append("best peer".ljust(16) + "".join(t.rjust(width) for t in best_texts))
    if reasons:
        lines += ["", "Skipped cells (–):"]
        for reason, where in reasons.items():
            shown = ", ".join(where[:3]) + (f", … ({len(where)} cells)" if len(where) > 3 else "")
            lines.append(f"  {reason}  [{shown}]")
    return "\n".join(lines)


def _mc_note(row: Dict[str, Any]) -> str:
    """What a Monte Carlo row's noise allows: an exact sampler's TV and misses with as many draws."""
    if "exact_sampler_tv_same_draws" not in row:
        return ""
    note = f"; an exact sampler shows TV {row['exact_sampler_tv_same_draws']:.3g} with as many draws"
    if "starved_by_chance_expected" in row:
        note += (
            f"; {row['starved_expected_ge_10']} items expected >= 10 times never drawn, "
            f"{row['starved_by_chance_expected']:.1f} expected by chance"
        )
    return note


def accuracy_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "",
        "Exactness: TV distance of the sampled distribution from w / sum w, and from the ideal sampler with the same",
        "53-bit uniforms; largest error of one item's probability; items of positive weight never drawn (Monte Carlo:",
        "none in the draws though >= 10 expected); largest relative error of one item's probability; probability of",
        "zero-weight items and of indices >= n",
        f"{'n':<12}{'method':<19}{'TV':>11}{'TV to ideal':>12}{'max abs err':>12}{'never drawn':>13}{'max rel err':>13}"
        f"{'zero-w mass':>13}{'past end':>11}  how",
    ]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"{r['n']:<12,}{r['method']:<19}{'–':>11}  skipped: {r['reason']}")
            continue
        starved = r.get("never_drawn_fraction", r.get("starved_fraction", 0.0))
        max_ratio = f"{r['max_relative_error']:.3g}" if "max_relative_error" in r else "–"
        zero = r.get("zero_weight_mass", 0.0)
        past = r.get("out_of_range_mass", 0.0)
        how = r["how"]
        how += _mc_note(r)
        to_ideal = f"{r['tv_vs_ideal']:.3g}" if "tv_vs_ideal" in r else "–"
        absolute = f"{r['max_absolute_error']:.3g}" if "max_absolute_error" in r else "–"
        lines.append(
            f"{r['n']:<12,}{r['method']:<19}{r['tv']:>11.3g}{to_ideal:>12}{absolute:>12}{starved:>12.3%} "
            f"{max_ratio:>13}{zero:>13.3g}{past:>11.3g}  {how}"
        )
    return "\n".join(lines)


def memory_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["", "Memory held between calls (bytes per item), and extra per call or build"]
    largest: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["method"] not in largest or r["n"] > largest[r["method"]]["n"]:
            largest[r["method"]] = r
    for name, r in largest.items():
        lines.append(
            f"  {METHODS[name].label:<16} {r['bytes_per_item']:6.2f} B/item at n={r['n']:,} ({r['how']}); "
            f"+{r['transient_bytes_per_item']:.0f} B/item transient"
        )
    at_1e9 = isample_tree_bytes(10**9)
    lines.append(f"  isample at n=1e9 (layout formula): {at_1e9 / 1e9:.3f} B/item, {at_1e9 / GiB:.2f} GiB")
    return "\n".join(lines)


PEER_DISTRIBUTIONS = ("torchrl", "tensordict", "cpprb", "sumtree")


def cpu_description() -> Dict[str, Any]:
    """The CPU as ``lscpu`` describes it: model, cores, cache sizes, the vector extensions the
    timings depend on (AVX2, AVX-512), virtualisation. Falls back to /proc/cpuinfo."""
    info: Dict[str, Any] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    wanted = {
        "Model name": "model", "Architecture": "architecture", "CPU(s)": "cpus", "Thread(s) per core": "threads_per_core",
        "L1d cache": "l1d_cache", "L1i cache": "l1i_cache", "L2 cache": "l2_cache", "L3 cache": "l3_cache",
        "CPU max MHz": "max_mhz", "Hypervisor vendor": "hypervisor",
    }
    for key, name in wanted.items():
        if fields.get(key):
            info[name] = fields[key]
    flags = set(fields.get("Flags", "").split())
    if not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
                    if line.startswith("model name") and "model" not in info:
                        info["model"] = line.split(":", 1)[1].strip()
        except OSError:
            pass
    info["vector_extensions"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512vl") if f in flags]
    return info


_SUMMARY: Dict[str, Any] = {}


def machine_summary() -> Dict[str, Any]:
    """What every results file records (pytest-benchmark's extra_info too): the CPU as lscpu
    gives it (model, caches, vector extensions), and the versions of numpy, torch, isample
    and every peer (None where one is not installed)."""
    if not _SUMMARY:
        _SUMMARY.update(
            cpu=cpu_description(),
            numpy=np.__version__,
            torch=torch.__version__,
            isample=isample.__version__,
            isample_cpu_kernels=isample.build_info()["cpu_kernels"],
            **{name: _version(name) for name in PEER_DISTRIBUTIONS},
        )
    return dict(_SUMMARY)


def machine_info() -> Dict[str, Any]:
    cpu = cpu_description()
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu.get("model") or platform.processor() or "unknown",
        "cpu_details": cpu,
        "cores": os.cpu_count(),
        "memory_total_bytes": total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "isample": isample.__version__,
        "isample_build_info": isample.build_info(),
        **{name: _version(name) for name in PEER_DISTRIBUTIONS},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def peer_status(methods: Sequence[str]) -> Dict[str, Dict[str, Any]]:
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


def plot(results: List[Dict[str, Any]], methods: Sequence[str], path: str, machine: str = "") -> None:
    """Log-log time per call against n, one panel per swept workload, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    workloads = [w for w in SWEPT if any(r["workload"] == w and r["status"] == "ok" for r in results)]
    columns = 3
    rows = -(-(len(workloads) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), squeeze=False)
    styles = dict(zip(METHOD_NAMES, ["o-", "s--", "^--", "v-.", "x:", "D-", "d--", "P-.", "*-", "h:"]))
    colors = dict(
        zip(
            METHOD_NAMES,
            ["#000000", "#1f77b4", "#17becf", "#ff7f0e", "#bcbd22", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"],
        )
    )
    assert set(METHOD_NAMES) <= set(styles), "every method needs a style in the plot"
    handles = {}
    for ax, workload in zip(axes.flat, workloads):
        for name in methods:
            points = sorted(
                (r["n"], r["median_us"])
                for r in results
                if r["method"] == name and r["workload"] == workload and r["status"] == "ok"
            )
            if points:
                xs, ys = zip(*points)
                (line,) = ax.loglog(
                    xs, ys, styles[name], color=colors[name], label=METHODS[name].label,
                    lw=2.4 if name == "isample" else 1.2, ms=4,
                )
                handles[name] = line
        ax.set_title(WORKLOADS[workload], fontsize=9)
        ax.set_xlabel("n", fontsize=8)
        ax.set_ylabel("median µs per call", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        if high / low < 100:  # a flat panel: label 1-2-5 steps, not decades only
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    legend_ax = list(axes.flat)[len(workloads)] if len(workloads) < rows * columns else axes.flat[-1]
    shown = [m for m in methods if m in handles]
    legend_ax.legend(
        [handles[m] for m in shown], [METHODS[m].label for m in shown], loc="center", fontsize=9, frameon=False
    )
    fig.suptitle(f"isample vs peers, median time per call on the CPU ({machine})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    try:  # a 64-colour palette keeps the committed PNG small
        from PIL import Image

        buffer.seek(0)
        Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())


def _sizes(text: str, allow_zero: bool = False) -> List[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if part:
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a size: {part!r}") from None
            if value < (0 if allow_zero else 1) or value != int(value):
                raise argparse.ArgumentTypeError(f"not a size: {part!r}")
            sizes.append(int(value))
    return sizes


def _names(allowed: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [x for x in names if x not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
        return names

    return parse


def parse_args(argv: Optional[List[str]]) -> Tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="isample bench",
        description="Time isample against its peers (medians of single calls), measure exactness and memory.",
    )
    parser.add_argument("--sizes", type=_sizes, help="comma-separated n (default: 1e4,5e4,1e5,1e6,1e7,1e8,1e9)")
    parser.add_argument(
        "--workloads", type=_names(list(WORKLOADS), "workload"), help=f"default: all of {','.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--methods", type=_names(METHOD_NAMES, "method"), help=f"default: all of {','.join(METHOD_NAMES)}"
    )
    parser.add_argument("--repeats", type=int, default=20_000, help="most timed calls per cell (default 20000)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed calls per cell (default 3)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timed calls per cell (default 0.5)")
    parser.add_argument(
        "--max-call", type=float, default=5.0, help="skip cells whose one call is predicted above this (s, default 5)"
    )
    parser.add_argument(
        "--max-build", type=float, default=60.0, help="skip a method where its build is predicted above this (s, 60)"
    )
    parser.add_argument("--peer-max-n", type=float, default=1e8, help="largest n for peers; above, isample only (1e8)")
    parser.add_argument(
        "--accuracy-sizes",
        type=lambda text: _sizes(text, allow_zero=True),
        help="n for the exactness figures (default 1e6,1e7); 0 to skip",
    )
    parser.add_argument("--mc-draws", type=float, default=2e7, help="draws for the Monte Carlo exactness rows (2e7)")
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: wait while other processes use a core (before each method's cells, and "
        "before timing a disturbed cell again), at most this many seconds in all (default 0: never wait)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5,
        help="each cell alternates its contenders over this many rounds (forward, then backward; default 5)",
    )
    parser.add_argument(
        "--train-threads", type=int, default=1,
        help="torch threads for the training-step cells (default 1: on a shared machine two threads wait on each other)",
    )
    parser.add_argument(
        "--no-overhead", action="store_true",
        help="skip the sampler-overhead cells (sampler calls, a training step, a DataLoader batch)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the log-log scaling plot (PNG; needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables (and --plot) of a saved run, run nothing")
    parser.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: small n, tiny budgets")
    args = parser.parse_args(argv)
    quick = args.quick
    accuracy_sizes = args.accuracy_sizes
    if accuracy_sizes is None:
        accuracy_sizes = [10_000] if quick else list(DEFAULT_ACCURACY_SIZES)
    settings = Settings(
        sizes=args.sizes or list(QUICK_SIZES if quick else DEFAULT_SIZES),
        workloads=args.workloads or list(WORKLOADS),
        methods=args.methods or METHOD_NAMES,
        budget_s=0.01 if quick and args.budget == 0.5 else args.budget,
        min_repeats=args.min_repeats,
        max_repeats=200 if quick and args.repeats == 20_000 else args.repeats,
        max_call_s=args.max_call,
        max_build_s=args.max_build,
        peer_max_n=int(args.peer_max_n),
        accuracy_sizes=[n for n in accuracy_sizes if n > 0],
        mc_draws=int(200_000 if quick and args.mc_draws == 2e7 else args.mc_draws),
        seed=args.seed,
        quiet_wait_s=args.wait_for_quiet,
        quiet_left_s=args.wait_for_quiet,
        rounds=args.rounds,
        overhead=not args.no_overhead,
        train_threads=args.train_threads,
    )
    if settings.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {settings.rounds}")
    return settings, args


def run(settings: Settings, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run every measurement (printing progress) and return the report that --json writes."""
    log = Log()
    info = machine_info()
    peers = peer_status(settings.methods)
    print(f"isample {info['isample']} {info['isample_build_info']}")
    print(f"{info['cpu']}, {info['cores']} cores; Python {info['python']}, numpy {info['numpy']}, "
          f"torch {info['torch']}")
    for name, status in peers.items():
        text = "ok" if status["available"] else f"SKIPPED: {status['reason']}"
        print(f"  {name:<18} {text}{'; ' + status['note'] if status['note'] else ''}")
    sys.stdout.flush()
    started = time.time()
    results, memory = run_speed(settings, log)
    noisy = [r for r in results if (r.get("other_processes_cores") or 0) > 0.3]
    if noisy:
        cells = ", ".join(f"{r['method']} {r['workload']} n={r['n']:,}" for r in noisy[:10])
        more = " …" if len(noisy) > 10 else ""
        log(f"{len(noisy)} cells ran while other processes used > 0.3 cores: {cells}{more}")
    best = add_ratios(results)
    overhead = run_overhead(settings, log) if settings.overhead else []
    accuracy: List[Dict[str, Any]] = []
    for n in settings.accuracy_sizes:
        methods = [METHODS[name](settings.seed) for name in settings.methods if METHODS[name].unavailable() is None]
        accuracy += measure_accuracy(methods, n, settings.seed, settings.mc_draws, log)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = os.getloadavg()
    return {
        "schema": "isample.bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": "python -m isample.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "settings": {
            **vars(settings),
            "batch": BATCH,
            "weights": "timing: uniform [0.001, 1.001); accuracy: accuracy_weights()",
        },
        "workloads": WORKLOADS,
        "peers": peers,
        "results": results,
        "best_peer": best,
        "overhead": overhead,
        "accuracy": accuracy,
        "memory": memory,
        "isample_1e9_bytes": isample_tree_bytes(10**9),
    }


TREE_PEERS = ("torchrl_fp64", "torchrl_fp32", "cpprb", "sumtree")
HEADLINE = [
    ("update", 50_000), ("update", 10_000_000), ("sample", 50_000), ("sample", 10_000_000),
    ("step", 50_000), ("step", 10_000_000), ("wor8192", 50_000), ("wor30000", 50_000),
    ("wor128", 1_000_000), ("wor128", 10_000_000), ("build", 50_000), ("build", 10_000_000),
]


def markdown_report(report: Dict[str, Any]) -> str:
    """The headline, full-speed, exactness and memory tables of a report, in Markdown."""
    results = [r for r in report["results"] if r["status"] == "ok"]
    cell = {(r["method"], r["workload"], r["n"]): r for r in results}
    label = {name: METHODS[name].label for name in METHODS}

    def fastest(workload: str, n: int, names: Sequence[str]) -> Optional[Dict[str, Any]]:
        rows = [cell[(m, workload, n)] for m in names if (m, workload, n) in cell]
        return min(rows, key=lambda r: r["median_us"]) if rows else None

    peers = [m for m in METHODS if m != "isample"]
    lines = [
        "| workload | n | isample / fastest peer | isample / fastest tree peer | isample | fastest peer | fastest tree peer |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for workload, n in HEADLINE:
        ours = cell.get(("isample", workload, n))
        if ours is None:
            continue
        ratios, names = [], []
        for best in (fastest(workload, n, peers), fastest(workload, n, TREE_PEERS)):
            if best is None:
                ratios.append("–")
                names.append("–")
            else:
                ratios.append(f"{ours['median_us'] / best['median_us']:.2f}")
                names.append(f"{label[best['method']]} {_format_us(best['median_us'])}")
        lines.append(
            f"| {WORKLOADS[workload]} | {n:,} | {ratios[0]} | {ratios[1]} | {_format_us(ours['median_us'])} | "
            + " | ".join(names) + " |"
        )
    out = [
        "#### Headline: isample's time over the fastest peer's (below 1: isample is faster), medians of one call",
        "",
        *lines,
    ]

    methods = [m for m in report["settings"]["methods"]]
    for workload in WORKLOADS:
        sizes = sorted({r["n"] for r in report["results"] if r["workload"] == workload})
        if not sizes:
            continue
        out += ["", f"#### {WORKLOADS[workload]}: median per call (× isample's time)", ""]
        out.append("| method | " + " | ".join(f"{n:,}" for n in sizes) + " |")
        out.append("|---|" + "---:|" * len(sizes))
        for m in methods:
            texts = []
            for n in sizes:
                r = cell.get((m, workload, n))
                if r is None:
                    texts.append("–")
                else:
                    ratio = r.get("ratio_vs_isample")
                    extra = f" ({_format_ratio(ratio)})" if m != "isample" and ratio else ""
                    texts.append(_format_us(r["median_us"]) + extra)
            if any(t != "–" for t in texts):  # a method that ran nothing here gets no row
                row = f"| {label[m]} | " + " | ".join(texts) + " |"
                out.append(row.replace("| isample |", "| **isample** |"))
    reasons: Dict[str, List[str]] = {}
    for r in report["results"]:
        if r["status"] != "ok":
            reasons.setdefault(f"{label[r['method']]}: {r['reason']}", []).append(f"{r['workload']} {r['n']:,}")
    if reasons:
        out += ["", "Cells marked – were skipped:", ""]
        for reason, where in reasons.items():
            out.append(f"- {reason} ({len(where)} cells: {', '.join(where[:3])}{', …' if len(where) > 3 else ''})")

    if report.get("overhead"):
        out += [
            "",
            "#### What the sampler costs a training loop",
            "",
            "| cell | isample | baseline | ratio | goal |",
            "|---|---:|---|---:|---:|",
        ]
        for r in report["overhead"]:
            out.append(
                f"| {r['cell']} | {_format_us(r['isample_us'])} | {r['baseline']} {_format_us(r['baseline_us'])} "
                f"| {r['ratio']:.2f}× | ≤ {r['goal']:.2f}× |"
            )
    if report.get("accuracy"):
        out += [
            "",
            "#### Exactness",
            "",
            "| n | method | TV from w / Σw | TV from the ideal sampler | largest error of a p_i | never drawn "
            "| largest relative error | zero-weight mass | mass past the end | how |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["accuracy"]:
            if r.get("status", "ok") != "ok":
                dashes = " – |" * 7
                out.append(f"| {r['n']:,} | {r['method']} |{dashes} skipped: {r['reason']} |")
                continue
            starved = r.get("never_drawn_fraction", r.get("starved_fraction", 0.0))
            to_ideal = f"{r['tv_vs_ideal']:.2g}" if "tv_vs_ideal" in r else "–"
            error = f"{r['max_relative_error']:.2g}" if "max_relative_error" in r else "–"
            absolute = f"{r['max_absolute_error']:.2g}" if "max_absolute_error" in r else "–"
            how = r["how"]
            how += _mc_note(r)
            out.append(
                f"| {r['n']:,} | {r['method']} | {r['tv']:.2g} | {to_ideal} | {absolute} | {starved:.3%} | {error} "
                f"| {r.get('zero_weight_mass', 0.0):.2g} | {r.get('out_of_range_mass', 0.0):.2g} | {how} |"
            )
    if report.get("memory"):
        out += ["", "#### Memory", "", "| method | n | bytes per item held | extra per call or build | source |",
                "|---|---:|---:|---:|---|"]
        largest: Dict[str, Dict[str, Any]] = {}
        for r in report["memory"]:
            if r["method"] not in largest or r["n"] > largest[r["method"]]["n"]:
                largest[r["method"]] = r
        for name, r in largest.items():
            out.append(f"| {label[name]} | {r['n']:,} | {r['bytes_per_item']:.2f} | "
                       f"{r['transient_bytes_per_item']:.0f} | {r['how']} |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark (or reload one with --from-json); print tables; write JSON and plot."""
    settings, args = parse_args(argv)
    started = time.time()
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
    else:
        report = run(settings, argv)
    print(speed_table(report["results"], report["settings"]["methods"]))
    if report.get("overhead"):
        print(overhead_table(report["overhead"]))
    if report["accuracy"]:
        print(accuracy_table(report["accuracy"]))
    print(memory_table(report["memory"]))
    if args.markdown:
        print("\n" + markdown_report(report))
    if args.json and not args.from_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"\nwrote {args.json}")
    if args.plot:
        machine = report["machine"]
        plot(report["results"], report["settings"]["methods"], args.plot, f"{machine['cpu']}, {machine['cores']} cores")
        print(f"wrote {args.plot}")
    print(f"total {time.time() - started:.0f} s")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
