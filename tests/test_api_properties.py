"""Property-based tests of the whole public surface, as a hostile but realistic user would use it.

Hypothesis drives random sequences of operations on every sampler (ImportanceSampler with each
score policy and transform, SoftPruningSampler), mixed with random bad arguments of every kind:
wrong dtypes, shapes and types; lazily negated or conjugated views; big-endian and long-double
numpy arrays; numpy and Python scalars where tensors are expected and the reverse; sparse
tensors; huge and negative integers; and mangled states passed to ``load_state_dict``. The
trees and the checkpoint functions get the same treatment.

Invariants checked after every call:

- a call succeeds or raises a documented exception (ValueError, TypeError, IndexError,
  MemoryError; RuntimeError only for weights() before the first epoch), raised by isample's
  own code with its own message: no raw torch, numpy or pybind11 error escapes;
- a refused call leaves ``state_dict()`` identical, bit for bit;
- ``len()``, ``steps_per_epoch`` and ``total_steps`` never change the state (they never draw);
- every saved state goes through ``save_checkpoint``/``load_checkpoint`` and loads back into a
  fresh sampler, equal; saved configurations hold plain Python values (weights-only loading);
- draws are reproducible: the fresh sampler and a deep copy draw the same next epoch, and at
  the end the whole operation log, replayed on a new sampler, yields the same items and the
  same final state;
- pickled and deep-copied samplers and trees equal the original and share nothing with it.

Bounded in CI by the "ci" profile of conftest.py (25 examples of 25 steps per machine);
``pytest --hypothesis-profile thorough`` runs 1,000 examples of 60 steps.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import isample
from isample.checkpoint import load_checkpoint, save_checkpoint
from conftest import assert_identical as same

ISAMPLE_DIR = os.path.dirname(isample.__file__)
DOCUMENTED = (ValueError, TypeError, IndexError, MemoryError, RuntimeError)
# Messages of errors raised by torch, numpy or pybind11 themselves: isample must check first.
RAW_MESSAGE = re.compile(
    r"incompatible (function|constructor) arguments|index out of range in self|out of bounds for dimension"
    r"|expected scalar type|can't convert|Expected one of cpu|not implemented for|tensors used as indices"
    r"|DefaultCPUAllocator|Unable to allocate|must be Number, not|only integer tensors|cannot be converted to"
    r"|Boolean value of Tensor|unsupported operand|not subscriptable|has no attribute|'NoneType' object"
    r"|not supported between instances|has no len|unhashable type|invalid literal|could not convert"
    r"|received an invalid combination|numpy array has byte order|Could not infer dtype|argument must be",
    re.I,
)
CLASSES = 3  # logits width for the policies that take logits and targets


# -- checks -------------------------------------------------------------------------------------


def assert_clean(error: BaseException) -> None:
    """A documented exception type, raised in isample's code, with isample's own message."""
    where = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert isinstance(error, DOCUMENTED), f"undocumented {type(error).__name__}:\n{where}"
    if type(error) is RuntimeError:
        assert "no epoch has been drawn" in str(error), f"a raw RuntimeError escaped:\n{where}"
    innermost = traceback.extract_tb(error.__traceback__)[-1].filename
    assert innermost.startswith(ISAMPLE_DIR), f"raised inside {innermost}, not by isample:\n{where}"
    assert not RAW_MESSAGE.search(str(error)), f"a raw library message escaped:\n{where}"


PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def assert_plain(value: Any, where: str = "state") -> None:
    """Only plain Python values and tensors: what weights-only loading reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) in (str, int), f"{where}: key {key!r}"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            assert_plain(item, f"{where}[{j}]")
    else:
        assert type(value) in PLAIN or isinstance(value, torch.Tensor), f"{where} is a {type(value)}"


def attempt(target: Any, call: Callable[[], Any]) -> Tuple[bool, Any]:
    """Run `call`; a refusal must be clean and leave target.state_dict() identical."""
    before = target.state_dict()
    try:
        return True, call()
    except Exception as error:  # noqa: BLE001 - every exception is checked
        assert_clean(error)
        same(target.state_dict(), before)
        return False, error


# -- argument forms -----------------------------------------------------------------------------


def negated(values: torch.Tensor) -> torch.Tensor:
    """A lazily negated view whose logical values are `values` (raw memory holds -values)."""
    return torch.neg(values)._neg_view()


def conj_imag(values: torch.Tensor) -> torch.Tensor:
    """x.conj().imag: a lazily negated float64 view whose logical values are `values`."""
    return torch.complex(torch.zeros_like(values), -values).conj().imag


def value_forms(values: List[float]) -> Dict[str, Tuple[Any, List[float]]]:
    """Equivalent spellings of valid float values, with the float64 values they stand for."""
    t = torch.tensor(values, dtype=torch.float64)
    as32 = t.float().double().tolist()
    wide = torch.zeros(2 * len(values), dtype=torch.float64)
    wide[::2] = t
    return {
        "list": (list(values), values),
        "tuple": (tuple(values), values),
        "float64": (t.clone(), values),
        "float32": (t.float(), as32),
        "requires_grad": (t.clone().requires_grad_(), values),
        "strided": (wide[::2], values),
        "negated view": (negated(t), values),
        "conj imag view": (conj_imag(t), values),
        "numpy": (t.numpy().copy(), values),
        "big-endian": (t.numpy().astype(">f8"), values),
        "long double": (t.numpy().astype(np.longdouble), values),
        "numpy float32": (t.numpy().astype(np.float32), as32),
    }


def index_forms(indices: List[int]) -> Dict[str, Any]:
    """Equivalent spellings of valid indices."""
    t = torch.tensor(indices, dtype=torch.int64)
    wide = torch.zeros(2 * len(indices), dtype=torch.int64)
    wide[::2] = t
    return {
        "list": list(indices),
        "int64": t.clone(),
        "int32": t.int(),
        "uint8": t.to(torch.uint8),
        "strided": wide[::2],
        "negated view": torch.neg(t)._neg_view(),
        "numpy": t.numpy().copy(),
        "numpy uint64": t.numpy().astype(np.uint64),
        "big-endian": t.numpy().astype(">i8"),
    }


BAD_OBJECTS = [None, "1", b"1", object(), {"a": 1}, {1, 2}, 1j, [[1, 2]], [1, "x"], [None], ...]


def bad_indices(n: int) -> List[Any]:
    return [
        [n], [-1], [0, -n], [2**63 - 1], [2**70], [-(2**70)], np.array([2**64 - 1], dtype=np.uint64),
        [0.5], [1.0], torch.tensor([1.0]), torch.tensor([True]), torch.tensor([1j]), torch.zeros(1, 1, dtype=torch.int64),
        torch.tensor(0), np.float64(1.0), 1, 2.5, True, torch.tensor([0]).to_sparse(), torch.empty(1, device="meta"),
        *BAD_OBJECTS,
    ]


def bad_values(b: int) -> List[Any]:
    """Values for a batch of b indices that must be refused (or, for non-finite ones, handled
    by the sampler's nonfinite setting)."""
    wrong = b + 1
    return [
        torch.ones(wrong), torch.ones(b, 1), torch.tensor(1.0), [1.0] * wrong, torch.ones(b, dtype=torch.complex128),
        torch.ones(b, dtype=torch.bool), np.ones(b, dtype=np.complex64), torch.ones(b).to_sparse(),
        torch.empty(b, device="meta"), [float("nan")] * b, [float("inf")] * b, [-float("inf")] * b, ["1.0"] * b,
        np.array(["1.0"] * b), 1e400, 10**400, np.float64(1.0), 1.0, True, *BAD_OBJECTS,
    ]


def bad_numbers() -> List[Any]:
    return [float("nan"), float("inf"), -1.0, 2.0, 10**400, "0.5", None, True, np.bool_(True), [0.5],
            torch.tensor([0.5, 0.5]), torch.tensor(1j), object()]


# -- samplers -----------------------------------------------------------------------------------


def annealed(epoch: int) -> float:
    """A picklable weight-exponent schedule."""
    return min(1.0, 0.5 + 0.25 * epoch)


def a_number(draw: Any, value: float) -> Any:
    """`value` as a Python float, a numpy scalar or a 0-d tensor: all must be accepted."""
    return draw(st.sampled_from([float(value), np.float64(value), np.float32(value), torch.tensor(value)]))


@st.composite
def sampler_specs(draw: Any) -> Dict[str, Any]:
    n = draw(st.integers(1, 40))
    spec: Dict[str, Any] = {
        "kind": draw(st.sampled_from(["importance", "importance", "soft_pruning"])),
        "n": n,
        "policy": draw(st.sampled_from(["last_loss", "running_loss", "grad_norm", "reducible", "early"])),
        "nonfinite": draw(st.sampled_from(["raise", "skip", "clamp"])),
        "seed": draw(st.sampled_from([0, 1, -3, 2**64 - 1, np.int64(7)])),
        "beta": a_number(draw, draw(st.sampled_from([0.0, 0.2, 1.0]))),
        "irreducible": draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)),
        "initial_score": a_number(draw, draw(st.sampled_from([0.0, 1.0, -0.5]))),
    }
    if spec["kind"] == "importance":
        replacement = draw(st.booleans())
        spec.update(
            transform=draw(st.sampled_from(["softmax", "proportional", "rank"])),
            transform_parameter=a_number(draw, draw(st.sampled_from([0.5, 1.0, 2.0]))),
            replacement=replacement if draw(st.booleans()) else np.bool_(replacement),
            samples=draw(st.one_of(st.none(), st.integers(1, n if not replacement else 2 * n))),
            warmup=draw(st.integers(0, 2)),
            weighting=draw(st.sampled_from(["auto", "inverse_probability", "none"])),
            uniform_mix=a_number(draw, draw(st.sampled_from([0.0, 0.1, 1.0]))),
            weight_exponent=draw(st.sampled_from([1.0, np.float32(0.5), annealed])),
            normalize=draw(st.sampled_from([None, "max", "mean"])),
        )
    else:
        spec.update(
            num_epochs=draw(st.integers(1, 6)),
            prune_ratio=a_number(draw, draw(st.sampled_from([0.0, 0.5, 0.9]))),
            anneal_fraction=a_number(draw, draw(st.sampled_from([0.0, 0.25, 1.0]))),
        )
    return spec


def build(spec: Dict[str, Any]) -> isample.EpochSampler:
    """A fresh sampler (fresh policy and transform objects) from a spec."""
    n = spec["n"]
    policy = {
        "last_loss": lambda: "last_loss",
        "running_loss": lambda: isample.RunningLoss(spec["beta"]),
        "grad_norm": lambda: "grad_norm",
        "reducible": lambda: isample.ReducibleLoss(spec["irreducible"]),
        "early": lambda: isample.EarlyImportance(np.int64(n), observations=2),
    }[spec["policy"]]()
    common = dict(score=policy, nonfinite=spec["nonfinite"], seed=spec["seed"], initial_score=spec["initial_score"])
    if spec["kind"] == "soft_pruning":
        return isample.SoftPruningSampler(
            n, num_epochs=spec["num_epochs"], prune_ratio=spec["prune_ratio"],
            anneal_fraction=spec["anneal_fraction"], **common,
        )
    p = spec["transform_parameter"]
    transform = {
        "softmax": lambda: isample.Softmax(temperature=p),
        "proportional": lambda: isample.Proportional(alpha=p),
        "rank": lambda: isample.RankBased(alpha=p),
    }[spec["transform"]]()
    return isample.ImportanceSampler(
        n, transform=transform, samples_per_epoch=spec["samples"], replacement=spec["replacement"],
        warmup_epochs=spec["warmup"], weighting=spec["weighting"], uniform_mix=spec["uniform_mix"],
        weight_exponent=spec["weight_exponent"], normalize_weights=spec["normalize"], **common,
    )


def needs_logits(spec: Dict[str, Any]) -> bool:
    return spec["policy"] in ("grad_norm", "early")


def _freeze(value: Any) -> Any:
    """A copy for the operation log (arguments must not be shared with the call)."""
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - a meta tensor or an object that cannot be copied: no replay
        return value


class SamplerMachine(RuleBasedStateMachine):
    """One sampler, random calls good and bad, every invariant of the module docstring."""

    @initialize(spec=sampler_specs())
    def create(self, spec):
        note(f"spec: {spec}")
        self.spec = spec
        self.sampler = build(spec)
        assert_plain(self.sampler.state_dict())
        self.log: List[Tuple[str, Any]] = []  # successful calls, replayed at the end
        self.directory = tempfile.TemporaryDirectory()

    def teardown(self):
        if not hasattr(self, "sampler"):
            return
        try:
            self.replay_gives_the_same_sampler()
        finally:
            self.directory.cleanup()

    # -- helpers --------------------------------------------------------------------------------
    def _extras(self, data, b: int) -> Dict[str, Any]:
        if not needs_logits(self.spec):
            return {}
        logits = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=b * CLASSES, max_size=b * CLASSES)))
        targets = data.draw(st.lists(st.integers(0, CLASSES - 1), min_size=b, max_size=b))
        return {"logits": logits.view(b, CLASSES), "targets": torch.tensor(targets, dtype=torch.int64)}

    def _batch(self, data, low: float = 0.0) -> Tuple[List[int], List[float]]:
        n = self.spec["n"]
        indices = data.draw(st.lists(st.integers(0, n - 1), max_size=8))  # repeats are common
        values = data.draw(st.lists(st.floats(low, 10.0), min_size=len(indices), max_size=len(indices)))
        return indices, values

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.log.append((name, (_freeze(args), _freeze(kwargs))))

    # -- rules ----------------------------------------------------------------------------------
    @rule(data=st.data())
    def update(self, data):
        indices, losses = self._batch(data)
        forms = value_forms(losses)
        losses_form = forms[data.draw(st.sampled_from(sorted(forms)), label="losses form")][0]
        index_form = index_forms(indices)[data.draw(st.sampled_from(sorted(index_forms(indices))), label="index form")]
        extras = self._extras(data, len(indices))
        args = (_freeze(index_form), _freeze(losses_form))
        self.sampler.update(index_form, losses_form, **extras)
        self.log.append(("update", (args, _freeze(extras))))

    @rule(data=st.data())
    def bad_update(self, data):
        n, b = self.spec["n"], data.draw(st.integers(1, 4))
        indices: Any = [j % n for j in range(b)]
        extras = self._extras(data, b)
        what = data.draw(st.sampled_from(["indices", "losses", "extras"] if extras else ["indices", "losses"]))
        losses: Any = [1.0] * b
        if what == "indices":
            indices = data.draw(st.sampled_from(bad_indices(n)))
        elif what == "losses":
            losses = data.draw(st.sampled_from(bad_values(b)))
        else:
            key = data.draw(st.sampled_from(["logits", "targets"]))
            extras[key] = data.draw(st.sampled_from([
                None, torch.zeros(b), torch.zeros(b + 1, CLASSES), torch.tensor([-1] * b), torch.tensor([CLASSES] * b),
                torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.bool), "x", torch.zeros(b, 0),
                torch.zeros(b, CLASSES, dtype=torch.complex64), np.zeros(b, dtype=np.int64),
            ]))
        note(f"bad update: {what}")
        frozen = (_freeze(indices), _freeze(losses)), _freeze(extras)
        ok, _ = attempt(self.sampler, lambda: self.sampler.update(indices, losses, **extras))
        if ok:
            self.log.append(("update", frozen))

    @rule(data=st.data())
    def set_scores(self, data):
        indices, scores = self._batch(data)
        forms = value_forms(scores)
        name = data.draw(st.sampled_from(sorted(forms)), label="scores form")
        given, meant = forms[name]
        index_form = index_forms(indices)[data.draw(st.sampled_from(sorted(index_forms(indices))), label="index form")]
        expected = self.sampler.scores().clone()
        for i, v in zip(indices, meant):  # the last value of a repeated index wins
            expected[i] = v
        frozen = (_freeze(index_form), _freeze(given))
        self.sampler.set_scores(index_form, given)
        self.log.append(("set_scores", (frozen, {})))
        same(self.sampler.scores(), expected, f"scores after set_scores({name})")

    @rule(data=st.data())
    def bad_set_scores(self, data):
        n, b = self.spec["n"], data.draw(st.integers(1, 4))
        indices: Any = [j % n for j in range(b)]
        scores: Any = [1.0] * b
        what = data.draw(st.sampled_from(["indices", "scores", "negative"]))
        if what == "indices":
            indices = data.draw(st.sampled_from(bad_indices(n)))
        elif what == "scores":
            scores = data.draw(st.sampled_from(bad_values(b)))
        else:
            scores[data.draw(st.integers(0, b - 1))] = data.draw(st.sampled_from([-1.0, -5e-324, -float("inf")]))
        frozen = (_freeze(indices), _freeze(scores))
        ok, error = attempt(self.sampler, lambda: self.sampler.set_scores(indices, scores))
        if what == "negative":
            assert not ok and isinstance(error, ValueError), "a negative score must always be refused"
        if ok:
            self.log.append(("set_scores", (frozen, {})))

    @rule(data=st.data())
    def iterate(self, data):
        """Take part of an epoch or all of it. len() said beforehand how long a new epoch is."""
        s = self.sampler
        # len() is about the epoch being iterated, or else the next: the one iter() yields,
        # unless an epoch was left part-way (iter() then starts the next one)
        comparable = s._in_progress() is None
        predicted = len(s)
        take = data.draw(st.integers(0, predicted + 1))
        ok, items = attempt(s, lambda: list(itertools.islice(iter(s), take)))
        if not ok:  # only an epoch number beyond the last one (after set_epoch(2**63 - 1))
            assert "last epoch" in str(items), items
            return
        if comparable:
            assert s.current_epoch.order.numel() == predicted, "len() disagreed with the epoch iter() drew"
        assert all(0 <= i < self.spec["n"] for i in items)
        self.log.append(("iterate", take, items))

    @rule()
    def lengths_never_draw(self):
        s = self.sampler
        before = s.state_dict()
        length = len(s)
        assert s.steps_per_epoch(np.int64(3)) == -(-length // 3)
        if isinstance(s, isample.ImportanceSampler):
            s.total_steps(10**15, 7)  # closed form: no loop over epochs, no draw
        same(s.state_dict(), before, "state after len()/steps_per_epoch/total_steps")

    @rule(data=st.data())
    def weights(self, data):
        s = self.sampler
        current = s.current_epoch
        if current is None:
            ok, error = attempt(s, lambda: s.weights([0]))
            assert not ok and type(error) is RuntimeError
            return
        drawn = current.order.tolist()
        if drawn:
            chosen = data.draw(st.lists(st.sampled_from(drawn), max_size=6))
            w = s.weights(chosen, dtype=data.draw(st.sampled_from([None, torch.float32, torch.float64])))
            assert w.shape == (len(chosen),) and bool((w > 0).all())
        bad = data.draw(st.sampled_from([
            ("indices", [self.spec["n"]]), ("indices", [-1]), ("indices", [0.5]), ("dtype", "float32"),
            ("dtype", torch.int64), ("dtype", np.float32), ("device", "gpu"), ("device", 3.5), ("indices", None),
        ]))
        kwargs = {bad[0]: bad[1]} if bad[0] != "indices" else {}
        indices = bad[1] if bad[0] == "indices" else (drawn[:1] or [0])
        attempt(s, lambda: s.weights(indices, **kwargs))

    @rule(data=st.data())
    def set_epoch(self, data):
        epoch = data.draw(st.one_of(
            st.integers(0, 5), st.sampled_from([np.int64(2), torch.tensor(1), 2**63 - 1]),
            st.sampled_from([-1, 2**63, 2**70, 1.0, "1", None, True, torch.tensor(1.5), [1]]),
        ))
        frozen = _freeze(epoch)
        ok, _ = attempt(self.sampler, lambda: self.sampler.set_epoch(epoch))
        if ok:
            self.log.append(("set_epoch", ((frozen,), {})))

    @rule(data=st.data())
    def save_load_and_draw_alike(self, data):
        s = self.sampler
        state = s.state_dict()
        assert_plain(state)
        path = Path(self.directory.name) / "sampler.pt"
        save_checkpoint(path, state)
        loaded = load_checkpoint(path, expected_capacity=self.spec["n"])
        fresh = build(self.spec)
        fresh.load_state_dict(loaded)
        same(fresh.state_dict(), state, "a state loaded back")
        if data.draw(st.booleans(), label="draw the next epoch from both"):
            in_progress = s._in_progress()
            if in_progress is not None:
                # saved part-way: the loaded sampler continues the epoch where the original's
                # iterator stands (a new iter() of the original would start the next epoch)
                rest = in_progress.order[in_progress.position:].tolist()
                assert list(iter(fresh)) == rest, "a sampler loaded mid-epoch did not continue it"
                same(fresh.weights(rest), s.weights(rest), "weights of the continued epoch")
                return
            twin = copy.deepcopy(s)
            drawn = [attempt(sampler, lambda sampler=sampler: list(iter(sampler))) for sampler in (twin, fresh)]
            assert drawn[0][0] == drawn[1][0], f"one drew, one refused: {drawn}"
            if drawn[0][0]:
                assert drawn[0][1] == drawn[1][1], "a sampler loaded from a checkpoint drew another epoch"
                order = twin.current_epoch.order
                same(twin.weights(order), fresh.weights(order), "weights of the next epoch")

    @rule(data=st.data())
    def load_a_mangled_state(self, data):
        state = self.sampler.state_dict()
        mangled, how = mangle(state, data)
        note(f"mangled: {how}")
        frozen = _freeze(mangled)
        ok, _ = attempt(self.sampler, lambda: self.sampler.load_state_dict(mangled))
        if ok:  # a change the sampler accepts must leave it whole: it saves and loads back
            self.log.append(("load_state_dict", ((frozen,), {})))
            fresh = build(self.spec)
            fresh.load_state_dict(self.sampler.state_dict())
            same(fresh.state_dict(), self.sampler.state_dict())

    @rule(how=st.sampled_from(["pickle", "deepcopy"]))
    def copies_are_equal_and_independent(self, how):
        s = self.sampler
        twin = pickle.loads(pickle.dumps(s)) if how == "pickle" else copy.deepcopy(s)
        before = s.state_dict()
        same(twin.state_dict(), before, f"a {how} copy")
        twin.set_scores(list(range(self.spec["n"])), [3.0] * self.spec["n"])
        attempt(twin, lambda: list(iter(twin)))
        same(s.state_dict(), before, f"the original after its {how} copy changed")

    # -- the end --------------------------------------------------------------------------------
    def replay_gives_the_same_sampler(self):
        """Every successful call again, on a new sampler: the same items, the same final state."""
        fresh = build(self.spec)
        for entry in self.log:
            if entry[0] == "iterate":
                _, take, items = entry
                assert list(itertools.islice(iter(fresh), take)) == items, "a replayed epoch drew other items"
                continue
            name, (args, kwargs) = entry
            getattr(fresh, name)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        same(fresh.state_dict(), self.sampler.state_dict(), "the replayed sampler")


TestSamplerAPI = SamplerMachine.TestCase


# -- mangled states -----------------------------------------------------------------------------


def _paths(value: Any, path: Tuple = ()) -> List[Tuple]:
    """Every path into a nested state (dict keys and list positions)."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, path + (key,))
    elif isinstance(value, list):
        for j, item in enumerate(value):
            found += _paths(item, path + (j,))
    return found


def _get(value: Any, path: Tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def _tensor_variants(t: torch.Tensor) -> List[Any]:
    out: List[Any] = [t[:-1] if t.numel() else torch.ones(1), t.view(-1, 1), t.to(torch.complex64), t.tolist(),
                      t.numpy() if t.dtype != torch.bfloat16 else t]
    if t.is_floating_point() and t.numel():
        for bad in (float("nan"), float("inf"), -1.0, 1e308):
            u = t.clone()
            u[0] = bad
            out.append(u)
        out.append(torch.neg(t.clone())._neg_view())
    if not t.is_floating_point() and t.numel():
        for bad in (-1, 10**6) + ((2**40,) if t.dtype is torch.int64 else ()):
            u = t.clone()
            u[0] = bad
            out.append(u)
        out.append(t.double())
    return out


def mangle(state: Dict[str, Any], data: Any) -> Tuple[Dict[str, Any], str]:
    """A deep copy of `state` with one random thing broken."""
    state = copy.deepcopy(state)
    paths = [p for p in _paths(state) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = _get(state, path[:-1]), path[-1]
    old = parent[key]
    how = data.draw(st.sampled_from(["delete", "replace", "tensor"] if isinstance(old, torch.Tensor) else ["delete", "replace"]))
    if how == "delete":
        del parent[key]
    elif how == "tensor":
        parent[key] = data.draw(st.sampled_from(_tensor_variants(old)))
    else:
        parent[key] = data.draw(st.sampled_from([
            None, "x", -1, 2**70, 0.5, float("nan"), [], {}, [1, 2], {"x": 1}, True, np.float64(1.0), np.int64(1),
            torch.tensor(1.0), torch.ones(3), object(),
        ]))
    return state, f"{how} {path}"


# -- trees --------------------------------------------------------------------------------------


def tree_calls(tree: Any, n: int) -> List[Tuple[str, Callable[[], Any]]]:
    """Calls with bad arguments of every kind, on every method of a tree."""
    calls = []
    for idx in bad_indices(n):
        calls += [("update indices", lambda idx=idx: tree.update(idx, 1.0)), ("get", lambda idx=idx: tree.get(idx)),
                  ("probability", lambda idx=idx: tree.probability(idx))]
    for values in bad_values(2):
        calls.append(("update values", lambda v=values: tree.update([0, n - 1], v)))
    for values in bad_values(n):
        calls.append(("assign", lambda v=values: tree.assign(v)))
    for k in (-1, 2.5, "3", None, 2**63, 10**12, np.float64(2), torch.tensor(1.5)):
        calls += [("sample k", lambda k=k: tree.sample(k)), ("sample k distinct", lambda k=k: tree.sample(k, replace=False)),
                  ("sample_with_inclusion", lambda k=k: tree.sample_with_inclusion(k))]
    for kwargs in ({"method": None}, {"method": "fast"}, {"method": "race", "replace": True}, {"replace": "no"},
                   {"replace": None}, {"seed": 1.5}, {"seed": "1"}, {"generator": 5}, {"seed": 1, "generator": torch.Generator()}):
        calls.append((f"sample {kwargs}", lambda kw=kwargs: tree.sample(1, **kw)))
    for u in ([1.0], [-0.1], [float("nan")], [[0.5]], 0.5, "0.5", None, torch.tensor([0.5j])):
        calls.append(("sample_from_uniforms", lambda u=u: tree.sample_from_uniforms(u)))
    if isinstance(tree, isample.SoftmaxTree):
        for keep in (-0.1, 1.5, float("nan"), "0.5", None):
            calls.append(("blend keep", lambda keep=keep: tree.blend([0], [1.0], keep)))
        for t in (0.0, -1.0, float("inf"), float("nan"), "1", None, True):
            calls.append(("temperature", lambda t=t: setattr(tree, "temperature", t)))
    return calls


@given(
    kind=st.sampled_from(["sum", "softmax"]),
    n=st.sampled_from([1, 2, 17]),
    data=st.data(),
)
def test_tree_calls_with_bad_arguments_are_refused_cleanly(kind, n, data):
    if kind == "sum":
        tree = isample.SumTree.from_weights(np.linspace(1.0, 2.0, n), seed=np.int64(3))
    else:
        tree = isample.SoftmaxTree.from_scores(np.linspace(-1.0, 2.0, n), temperature=np.float32(0.5), seed=3)
    calls = tree_calls(tree, n)
    for name, call in data.draw(st.lists(st.sampled_from(calls), min_size=5, max_size=25)):
        note(name)
        attempt(tree, call)  # some are valid after all (a numpy scalar value is broadcast)
    # mangled states: refused cleanly and changing nothing, or loaded and whole
    tree = isample.SumTree.from_weights(np.linspace(1.0, 2.0, n), seed=3) if kind == "sum" else (
        isample.SoftmaxTree.from_scores(np.linspace(-1.0, 2.0, n), seed=3))
    for _ in range(5):
        mangled, how = mangle(tree.state_dict(), data)
        note(how)
        attempt(tree, lambda: tree.load_state_dict(mangled))


@given(
    kind=st.sampled_from(["sum", "softmax"]),
    values=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=30),
    how=st.sampled_from(["pickle", "deepcopy"]),
)
def test_trees_pickle_and_deep_copy_through_their_state(kind, values, how):
    if kind == "sum":
        if not any(values):
            values[0] = 1.0
        tree = isample.SumTree.from_weights(values, seed=5)
    else:
        tree = isample.SoftmaxTree.from_scores(values, temperature=3.0, seed=5)
    tree.sample(3)  # move the random stream
    twin = pickle.loads(pickle.dumps(tree)) if how == "pickle" else copy.deepcopy(tree)
    same(twin.state_dict(), tree.state_dict())
    assert torch.equal(twin.sample(20), tree.sample(20))  # the same stream position
    twin.update([0], [7.0])
    assert tree.get([0]).item() == values[0]  # nothing shared


# -- constructors -------------------------------------------------------------------------------


CONSTRUCTOR_ARGUMENTS = {
    "num_items": [0, -1, 2.5, "10", None, True, 2**41, 10**30],
    "samples_per_epoch": [0, -1, 2.5, "3", True, 10**15],
    "replacement": ["no", None, 1],
    "warmup_epochs": [-1, 1.5, "1"],
    "weighting": ["fancy", None, 1],
    "uniform_mix": bad_numbers(),
    "weight_exponent": bad_numbers(),
    "normalize_weights": ["sum", 1],
    "initial_score": [float("nan"), float("inf"), "0", None],
    "nonfinite": ["ignore", None],
    "clamp_value": [0.0, -1.0, float("inf"), "1"],
    "seed": [1.5, "0", None, True],
    "device": ["gpu", "tpu", 3.5, None, "cuda:99"],
    "score": ["nosuch", 3, isample.ReducibleLoss([0.0] * 3), isample.EarlyImportance(3)],
    "transform": ["nosuch", None, 3],
}


@given(name=st.sampled_from(sorted(CONSTRUCTOR_ARGUMENTS)), data=st.data())
def test_bad_sampler_arguments_are_refused_cleanly(name, data):
    value = data.draw(st.sampled_from(CONSTRUCTOR_ARGUMENTS[name]))
    kwargs = {"num_items": 10, name: value}
    if name == "samples_per_epoch" and data.draw(st.booleans()):
        kwargs["replacement"] = False
    try:
        isample.ImportanceSampler(**kwargs)
    except Exception as error:  # noqa: BLE001
        assert_clean(error)
        assert type(error) is not RuntimeError
    else:
        pytest.fail(f"ImportanceSampler accepted {name}={value!r}")


@given(
    name=st.sampled_from(["beta", "temperature", "alpha", "eps", "prune_ratio", "anneal_fraction", "observations"]),
    value=st.sampled_from(bad_numbers() + [-5, 0]),
)
def test_bad_policy_and_transform_arguments_are_refused_cleanly(name, value):
    make = {
        "beta": lambda: isample.RunningLoss(value),
        "temperature": lambda: isample.Softmax(value),
        "alpha": lambda: isample.Proportional(alpha=value),
        "eps": lambda: isample.Proportional(eps=value),
        "prune_ratio": lambda: isample.SoftPruningSampler(5, num_epochs=2, prune_ratio=value),
        "anneal_fraction": lambda: isample.SoftPruningSampler(5, num_epochs=2, anneal_fraction=value),
        "observations": lambda: isample.EarlyImportance(5, observations=value),
    }[name]
    acceptable = {"beta": (0,), "eps": (0, 2.0), "alpha": (0, 2.0), "prune_ratio": (0,), "anneal_fraction": (0,),
                  "temperature": (2.0,), "observations": ()}[name]
    try:
        made = make()
    except Exception as error:  # noqa: BLE001
        assert_clean(error)
    else:
        assert any(value is v or (type(value) is type(v) and value == v) for v in acceptable), f"{name}={value!r} accepted"
        assert_plain(getattr(made, "config", lambda: {})())


# -- checkpoints --------------------------------------------------------------------------------


leaves = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=5), st.none(), st.booleans(),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.float64), st.lists(st.floats(allow_nan=True), max_size=4)),
)
numpy_leaves = st.sampled_from([np.float64(1.5), np.int64(2), np.float32(0.5), np.bool_(True), np.array([1.0])])
states = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=3), inner, max_size=3)),
                      max_leaves=12)


@given(state=states, poison=st.one_of(st.none(), numpy_leaves))
def test_a_checkpoint_loads_back_or_is_refused_at_save_time(state, poison):
    """Whatever is saved loads back equal; what weights-only loading could not read is refused
    by save_checkpoint with a TypeError naming it, and no file is written."""
    state = {"state": state}
    if poison is not None:
        state["poison"] = poison
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ck.pt"
        try:
            save_checkpoint(path, state)
        except TypeError as error:
            assert poison is not None and "state['poison']" in str(error)
            assert not os.listdir(directory), "a refused save left a file behind"
            return
        same(load_checkpoint(path), state)


@given(data=st.data())
def test_damaged_checkpoint_bytes_are_refused_cleanly(data):
    sampler = isample.ImportanceSampler(20, uniform_mix=0.0, warmup_epochs=0, transform="rank", samples_per_epoch=7, seed=1)
    sampler.update(range(20), np.linspace(0.0, 2.0, 20))
    list(iter(sampler))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ck.pt"
        save_checkpoint(path, sampler.state_dict())
        raw = bytearray(path.read_bytes())
        how = data.draw(st.sampled_from(["flip", "truncate", "zero"]))
        if how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = raw[at] ^ (1 << data.draw(st.integers(0, 7))) if how == "flip" else 0
        path.write_bytes(bytes(raw))
        try:
            loaded = load_checkpoint(path, expected_capacity=np.int64(20))
        except Exception as error:  # noqa: BLE001
            assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
        else:  # a change that left the file valid (a byte equal to the one it replaced)
            fresh = isample.ImportanceSampler(20, uniform_mix=0.0, warmup_epochs=0, transform="rank", samples_per_epoch=7, seed=1)
            fresh.load_state_dict(loaded)
            same(fresh.state_dict(), sampler.state_dict())
