"""Property-based tests of DistributedImportanceSampler in a one-rank gloo process group.

Random sequences of calls, with random bad arguments, go to three samplers side by side:

- ``ref``: a plain ``ImportanceSampler`` (no process group), the independent reference;
- ``step``: the distributed sampler with ``exchange="step"``: a collective in every call,
  which raises at once on a refused call, as ``ref`` does;
- ``subject``: the distributed sampler with the default ``exchange="epoch"``: calls are
  recorded, and a refused one is raised by the next exchange (``iter()``, ``flush()``).

Invariants checked after every call:

- a call succeeds, or raises a documented exception (ValueError, IndexError, TypeError;
  RuntimeError only for "no epoch drawn yet" and for refusals reported at an exchange),
  never a raw torch, numpy or pybind11 error, and the three agree on its class;
- a call that raises by itself (not an exchange reporting an earlier refusal) leaves
  ``state_dict()`` bit-identical; ``update``/``set_scores`` never raise with ``"epoch"``;
- the subject reports exactly the refusals that ``step`` and ``ref`` raised, first one's
  class first, and after every exchange its state equals ``step``'s bit for bit and its
  scores equal ``ref``'s; draws and weights are the same in all three;
- every saved state loads back into a fresh sampler as the same state (and all three then
  continue alike); a damaged state is refused and changes nothing.

Bounded: the conftest "ci" profile's example count, and 14 calls per example.
"""

from __future__ import annotations

import datetime
import itertools
import math
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isample
from test_distributed import _same  # bit-for-bit equality of two states

N = 24
CALLS = 14

CONFIGS: Dict[str, Dict[str, Any]] = {
    "running_loss": dict(score="running_loss", samples_per_epoch=N - 5, seed=3),
    "proportional_skip": dict(transform="proportional", replacement=False, samples_per_epoch=10, nonfinite="skip", seed=4),
    "sharded_clamp": dict(score="running_loss", nonfinite="clamp", clamp_value=20.0, seed=5, sharded=True),
}
# the defaults before issue 24 (softmax, no uniform mixture, no warm-up), which these configurations were written for
for _config in CONFIGS.values():
    for _name, _value in (("transform", "softmax"), ("uniform_mix", 0.0), ("warmup_epochs", 0)):
        _config.setdefault(_name, _value)

DOCUMENTED = (ValueError, IndexError, TypeError, RuntimeError)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("properties") / "store"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _outcome(call: Callable[[], Any]) -> Any:
    """("ok", result) or ("raised", exception); anything undocumented fails the test."""
    try:
        return "ok", call()
    except DOCUMENTED as error:
        if type(error) not in DOCUMENTED:  # a subclass: torch's, numpy's or pybind11's own error
            raise AssertionError(f"an undocumented exception escaped: {type(error).__module__}.{type(error).__name__}: {error}")
        if type(error) is RuntimeError:
            text = str(error)
            assert "no epoch has been drawn yet" in text or "was refused" in text, f"a raw RuntimeError escaped: {text}"
        return "raised", error


def _kind(outcome: Any) -> Optional[type]:
    return type(outcome[1]) if outcome[0] == "raised" else None


class Trio:
    """The three samplers, and what the subject still has to report."""

    def __init__(self, config: Dict[str, Any]) -> None:
        from isample.distributed import DistributedImportanceSampler

        options = dict(config)
        self.sharded = options.pop("sharded", False)
        self.options = options
        self.make = lambda exchange: DistributedImportanceSampler(N, sharded=self.sharded, exchange=exchange, **options)
        self.ref = isample.ImportanceSampler(N, **options)
        self.step = self.make("step")
        self.subject = self.make("epoch")
        self.expected: List[type] = []  # classes of refused calls the subject has yet to report
        self.drawn: List[int] = []  # items of the current epoch yielded so far

    def samplers(self) -> List[Any]:
        return [self.ref, self.step, self.subject]

    def check_state_after_exchange(self) -> None:
        subject, step = self.subject.state_dict(), self.step.state_dict()
        assert subject["pending"] is None
        assert _same(subject, step)
        assert torch.equal(self.subject.scores(), self.ref.scores())
        assert self.subject.counters == self.ref.counters


def _indices(data: Any, trio: Trio) -> Any:
    kind = data.draw(
        st.sampled_from(["drawn"] * 4 + ["range"] * 2 + ["outside", "float", "2d", "bool", "none", "strings"])
    )
    if kind == "drawn":
        if not trio.drawn:
            return []
        return data.draw(st.lists(st.sampled_from(trio.drawn), max_size=5))
    if kind == "range":
        return data.draw(st.lists(st.integers(0, N - 1), max_size=5))
    if kind == "outside":
        return data.draw(st.lists(st.integers(-3, N + 3), min_size=1, max_size=5))
    return {
        "float": torch.tensor([1.0, 2.0]),
        "2d": torch.tensor([[1, 2]]),
        "bool": torch.tensor([True, False]),
        "none": None,
        "strings": ["a", "b"],
    }[kind]


def _values(data: Any, length: int) -> Any:
    kind = data.draw(
        st.sampled_from(["finite"] * 5 + ["float32_grad", "nan", "inf", "negative", "scalar", "short", "strings"])
    )
    finite = data.draw(st.lists(st.floats(0.0, 8.0), min_size=length, max_size=length))
    if kind == "finite":
        return torch.tensor(finite, dtype=torch.float64)
    if kind == "float32_grad":
        return torch.tensor(finite, dtype=torch.float32, requires_grad=True) * 1.0
    if kind in ("nan", "inf", "negative") and length:
        bad = {"nan": math.nan, "inf": -math.inf if data.draw(st.booleans()) else math.inf, "negative": -1.5}[kind]
        finite[data.draw(st.integers(0, length - 1))] = bad
        return torch.tensor(finite, dtype=torch.float64)
    if kind == "scalar":
        return torch.tensor(1.0)
    if kind == "short":
        return torch.ones(length + 1, dtype=torch.float64)
    if kind == "strings":
        return ["x"] * length
    return torch.tensor(finite, dtype=torch.float64)


def _length(indices: Any) -> int:
    if isinstance(indices, torch.Tensor):
        return int(indices.shape[0]) if indices.dim() else 1
    return len(indices) if isinstance(indices, list) else 0


def _score_call(trio: Trio, name: str, indices: Any, values: Any) -> None:
    """update/set_scores on the three: ref and step agree (at once); the subject records."""
    results = [_outcome(lambda s=s: getattr(s, name)(indices, values)) for s in (trio.ref, trio.step)]
    assert _kind(results[0]) is _kind(results[1]), (name, results)
    before = trio.step.state_dict()
    if results[1][0] == "raised":
        assert "refused on every rank" in str(results[1][1])
    subject = _outcome(lambda: getattr(trio.subject, name)(indices, values))
    assert subject[0] == "ok", subject  # recorded, refused or not: reported at the exchange
    if results[0][0] == "raised":
        trio.expected.append(_kind(results[0]))
        assert _same(trio.step.state_dict(), before)  # a refused call changed nothing


def _exchange(trio: Trio, call: Callable[[Any], Any]) -> Any:
    """An exchange point on the subject: it raises the first refusal kept since the last
    one (and only then), having applied every accepted call; a second try goes through."""
    outcome = _outcome(lambda: call(trio.subject))
    if trio.expected:
        assert outcome[0] == "raised" and type(outcome[1]) is trio.expected[0], (outcome, trio.expected)
        assert "was refused" in str(outcome[1])
        trio.expected.clear()
        outcome = _outcome(lambda: call(trio.subject))
    assert outcome[0] == "ok", outcome
    return outcome[1]


def _run(data: Any, config: Dict[str, Any]) -> None:
    trio = Trio(config)
    for _ in range(CALLS):
        op = data.draw(
            st.sampled_from(
                ["epoch", "epoch", "update", "update", "update", "set_scores", "weights", "set_epoch",
                 "flush", "lengths", "state", "roundtrip", "damaged"]
            )
        )
        if op == "epoch":
            k = data.draw(st.integers(0, 30))
            iterators = [iter(trio.ref), iter(trio.step), _exchange(trio, iter)]
            parts = [list(itertools.islice(it, k)) for it in iterators]
            assert parts[0] == parts[1] == parts[2]
            trio.drawn = parts[0]
            trio.check_state_after_exchange()
        elif op in ("update", "set_scores"):
            indices = _indices(data, trio)
            _score_call(trio, op, indices, _values(data, _length(indices)))
        elif op == "weights":
            indices = _indices(data, trio)
            dtype = data.draw(st.sampled_from([None, torch.float32, torch.int64, "double"]))
            before = trio.subject.state_dict()
            results = [_outcome(lambda s=s: s.weights(indices, dtype=dtype)) for s in trio.samplers()]
            kinds = [_kind(r) for r in results]
            assert kinds[0] is kinds[1] is kinds[2], results
            if kinds[0] is None:
                assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][1], results[2][1])
            assert _same(trio.subject.state_dict(), before)
        elif op == "set_epoch":
            epoch = data.draw(st.one_of(st.integers(0, 6), st.sampled_from([2**70, 2**63, -1, 1.5, "3", None])))
            before = trio.subject.state_dict()
            results = [_outcome(lambda s=s: s.set_epoch(epoch)) for s in trio.samplers()]
            assert _kind(results[0]) is _kind(results[1]) is _kind(results[2]), results
            if results[2][0] == "raised":
                assert _same(trio.subject.state_dict(), before)
        elif op == "flush":
            _exchange(trio, lambda s: s.flush())
            trio.step.flush()
            trio.check_state_after_exchange()
        elif op == "lengths":
            batch = data.draw(st.sampled_from([1, 5, 64, 0, -2, 2.5]))
            epochs = data.draw(st.sampled_from([0, 3, 10**15, -1]))
            before = trio.subject.state_dict()
            for call in (len, lambda s: s.steps_per_epoch(batch), lambda s: s.total_steps(epochs, batch)):
                results = [_outcome(lambda s=s: call(s)) for s in trio.samplers()]
                assert _kind(results[0]) is _kind(results[1]) is _kind(results[2]), results
                if results[0][0] == "ok":
                    assert results[0][1] == results[1][1] == results[2][1]
            assert _same(trio.subject.state_dict(), before)  # never draws
        elif op == "state":
            consumed = data.draw(st.sampled_from([None, 0, 1, 3, 100, -1, 1.5]))
            before = trio.subject.state_dict()
            results = [_outcome(lambda s=s: s.state_dict(consumed=consumed)) for s in trio.samplers()]
            # (before the first epoch ImportanceSampler ignores `consumed`; the distributed one refuses it)
            first = 0 if trio.ref.current_epoch is not None else 1
            assert len({_kind(r) for r in results[first:]}) == 1, results
            assert _same(trio.subject.state_dict(), before)
        elif op == "roundtrip":
            # every saved state loads back as the same state; all three continue from it
            fresh = [isample.ImportanceSampler(N, **trio.options), trio.make("step"), trio.make("epoch")]
            for old, new in zip(trio.samplers(), fresh):
                saved = old.state_dict()
                new.load_state_dict(saved)
                assert _same(new.state_dict(), saved)
            trio.ref, trio.step, trio.subject = fresh
        elif op == "damaged":
            saved = trio.subject.state_dict()
            damage = data.draw(st.sampled_from(["not_a_dict", "format", "pending_rank", "pending_codes", "scores", "mode"]))
            if damage == "not_a_dict":
                bad: Any = [saved]
            elif damage == "format":
                bad = {**saved, "version": 99}
            elif damage == "mode":
                bad = {**saved, "mode": "sharded" if saved["mode"] == "replicated" else "replicated"}
            elif damage == "pending_rank":
                bad = {**saved, "pending": {"rank": 3, "world_size": 4}}
            elif damage == "pending_codes":
                bad = {**saved, "pending": {"rank": 0, "world_size": 1, "codes": torch.tensor([1.5])}}
            else:
                key = "local" if trio.sharded else "sampler"
                inner = dict(saved[key])
                inner["scores" if inner.get("scores") is not None else "tree"] = torch.zeros(3)
                bad = {**saved, key: inner}
            outcome = _outcome(lambda: trio.subject.load_state_dict(bad))
            assert outcome[0] == "raised" and type(outcome[1]) in (ValueError, TypeError), outcome
            assert _same(trio.subject.state_dict(), saved)
    # the end of training: one last exchange reports what is left; then all three agree
    _exchange(trio, lambda s: s.flush())
    trio.check_state_after_exchange()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_calls_with_random_bad_arguments(one_rank_group, name):
    @settings(max_examples=12)
    @given(data=st.data())
    def run(data):
        _run(data, CONFIGS[name])

    run()
