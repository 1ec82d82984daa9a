"""PrioritizedReplayBuffer: exact probabilities (chi-square), weights by hand, the ring buffer,
state, bad input, and cpprb's weights where cpprb is installed."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from conftest import ALPHA, chi_square_pvalue
from isample.integrations.replay import PrioritizedReplayBuffer


def filled(capacity: int = 50, *, alpha: float = 0.6, seed: int = 0, **kwargs) -> tuple:
    """A full buffer whose item i has obs i and a random priority; returns (buffer, priorities)."""
    rb = PrioritizedReplayBuffer(capacity, alpha=alpha, seed=seed, **kwargs)
    priorities = np.random.default_rng(7).exponential(1.0, capacity)
    priorities[3] = 0.0  # drawn only through eps
    rb.add({"obs": torch.arange(capacity, dtype=torch.float32).unsqueeze(1), "act": torch.arange(capacity)}, priorities=priorities)
    return rb, priorities


def exact_p(priorities: np.ndarray, alpha: float, eps: float = 1e-6) -> np.ndarray:
    leaves = (priorities + eps) ** alpha
    return leaves / leaves.sum()


@pytest.mark.statistical
@pytest.mark.parametrize("alpha", [0.6, 1.0, 0.0])
def test_draws_follow_priority_to_the_alpha(alpha):
    rb, priorities = filled(alpha=alpha)
    draws = 200_000
    batch = rb.sample(draws)
    counts = np.bincount(batch["indices"].numpy(), minlength=50)
    assert chi_square_pvalue(counts, exact_p(priorities, alpha)) > ALPHA
    # the fields come from the drawn slots
    assert torch.equal(batch["obs"][:, 0].long(), batch["indices"]) and torch.equal(batch["act"], batch["indices"])
    np.testing.assert_allclose(rb.probabilities().numpy(), exact_p(priorities, alpha), rtol=1e-12)
    # negative control: the same draws against a wrong exponent are rejected
    wrong = 1.0 if alpha != 1.0 else 0.6
    assert chi_square_pvalue(counts, exact_p(priorities, wrong)) < ALPHA


def test_weights_by_hand():
    rb = PrioritizedReplayBuffer(4, alpha=0.5, beta=0.7, eps=0.25, seed=1)
    rb.add({"x": torch.zeros(4)}, priorities=[1.0, 2.0, 3.0, 0.0])
    leaves = np.array([1.25, 2.25, 3.25, 0.25]) ** 0.5
    p = leaves / leaves.sum()
    batch = rb.sample(64)
    i = batch["indices"].numpy()
    w = (4 * p[i]) ** -0.7
    np.testing.assert_allclose(batch["weights"].numpy(), (w / w.max()).astype(np.float32), rtol=1e-6)
    assert batch["weights"].dtype == torch.float32 and float(batch["weights"].max()) == 1.0
    # beta per call, and the other normalisations
    batch = rb.sample(16, beta=1.0)
    w = 1.0 / (4 * p[batch["indices"].numpy()])
    np.testing.assert_allclose(batch["weights"].numpy(), w / w.max(), rtol=1e-6)
    np.testing.assert_allclose(rb.weights([0, 1], beta=0.0).numpy(), [1.0, 1.0])
    buffer = PrioritizedReplayBuffer(4, alpha=0.5, beta=0.7, eps=0.25, normalize="buffer", seed=1)
    buffer.add({"x": torch.zeros(4)}, priorities=[1.0, 2.0, 3.0, 0.0])
    w_all = (4 * p) ** -0.7
    np.testing.assert_allclose(buffer.weights([0, 1, 2]).numpy(), w_all[:3] / w_all.max(), rtol=1e-6)
    raw = PrioritizedReplayBuffer(4, alpha=0.5, beta=0.7, eps=0.25, normalize=None, seed=1)
    raw.add({"x": torch.zeros(4)}, priorities=[1.0, 2.0, 3.0, 0.0])
    np.testing.assert_allclose(raw.weights([0, 3]).numpy(), w_all[[0, 3]], rtol=1e-6)


def test_new_items_get_the_largest_priority_so_far():
    rb = PrioritizedReplayBuffer(8, alpha=1.0, eps=0.0, seed=0)
    rb.add(x=1.0)
    assert rb.priorities().tolist() == [1.0]  # before any update: 1
    rb.add(x=2.0)
    rb.update_priorities(torch.tensor([0, 1]), torch.tensor([5.0, 0.5]))
    assert rb.max_priority == 5.0 == rb.get_max_priority()
    rb.add({"x": torch.tensor([3.0, 4.0])})
    np.testing.assert_allclose(rb.priorities().numpy(), [5.0, 0.5, 5.0, 5.0])
    rb.add(x=5.0, priorities=9.0)
    assert rb.max_priority == 9.0
    np.testing.assert_allclose(rb.probabilities().numpy(), np.array([5, 0.5, 5, 5, 9]) / 24.5, rtol=1e-12)


def test_ring_buffer_wraps_around_and_overwrites_the_oldest():
    rb = PrioritizedReplayBuffer(5, alpha=1.0, eps=0.0, seed=0)
    slots = [int(rb.add(obs=torch.tensor([float(t), -float(t)]), done=t % 2 == 0)) for t in range(7)]
    assert slots == [0, 1, 2, 3, 4, 0, 1] and len(rb) == 5 == rb.get_stored_size()
    batch = rb.sample(2000)
    stored = batch["obs"][:, 0]
    # slot 0 holds t=5, slot 1 t=6, slots 2..4 hold t=2..4
    expected = torch.tensor([5.0, 6.0, 2.0, 3.0, 4.0])[batch["indices"]]
    assert torch.equal(stored, expected) and torch.equal(batch["obs"][:, 1], -expected)
    assert torch.equal(batch["done"], expected.long() % 2 == 0)
    assert set(batch["indices"].tolist()) == {0, 1, 2, 3, 4}
    # a batch larger than the buffer keeps its last `capacity` items, in ring order
    slots = rb.add({"obs": torch.arange(16.0).view(8, 2), "done": torch.zeros(8, dtype=torch.bool)})
    assert slots.tolist() == [0, 1, 2, 3, 4]  # position was 2: 8 items end at slot 4 (2 + 8 = 10 = 0 mod 5)
    assert rb.sample(500)["obs"][:, 0].unique().tolist() == [6.0, 8.0, 10.0, 12.0, 14.0]


def test_zero_priority_without_eps_is_never_drawn():
    rb = PrioritizedReplayBuffer(4, alpha=0.7, eps=0.0, seed=0)
    rb.add({"x": torch.arange(4)}, priorities=[1.0, 0.0, 2.0, 0.0])
    assert set(rb.sample(5000)["indices"].tolist()) == {0, 2}


def test_state_dict_restores_exactly():
    rb, _ = filled(20, seed=5)
    rb.sample(7)
    twin = PrioritizedReplayBuffer(20, alpha=0.6, seed=99)
    twin.load_state_dict(rb.state_dict())
    a, b = rb.sample(64), twin.sample(64)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(twin) == 20 and twin.fields == rb.fields
    with pytest.raises(ValueError, match="configured differently"):
        PrioritizedReplayBuffer(20, alpha=0.5).load_state_dict(rb.state_dict())
    with pytest.raises(ValueError, match="not a"):
        twin.load_state_dict({"format": "other"})


def test_seeded_buffers_draw_the_same():
    draws = [filled(30, seed=11)[0].sample(100)["indices"] for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda rb: rb.update_priorities([0], [math.nan]), ValueError, "finite and >= 0"),
        (lambda rb: rb.update_priorities([0, 1], [1.0, -2.0]), ValueError, "finite and >= 0"),
        (lambda rb: rb.update_priorities([0, 1], torch.ones(2, 1)), ValueError, r"reshape\(-1\)"),
        (lambda rb: rb.update_priorities([3], [1.0]), IndexError, "hold no item"),
        (lambda rb: rb.update_priorities([0.5], [1.0]), TypeError, "integers"),
        (lambda rb: rb.add(obs=torch.zeros(3)), ValueError, r"shape \(2,\)"),
        (lambda rb: rb.add(obs=torch.zeros(4, 2)), ValueError, "pass a batch as a dict"),
        (lambda rb: rb.add(obs=torch.zeros(2), rew=1.0), KeyError, "unknown"),
        (lambda rb: rb.add({"obs": torch.zeros(2, 2)}, priorities=[1.0]), ValueError, "one per item"),
        (lambda rb: rb.add(obs=torch.zeros(2, dtype=torch.complex64)), TypeError, "cast safely"),
        (lambda rb: rb.add({"obs": torch.zeros(2, 2)}, obs=torch.zeros(2)), TypeError, "one item"),
        (lambda rb: rb.sample(4, beta=1.5), ValueError, "beta"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call, error, match):
    rb = PrioritizedReplayBuffer(8, seed=0)
    rb.add({"obs": torch.zeros(3, 2)}, priorities=[1.0, 2.0, 3.0])
    before = rb.state_dict()
    with pytest.raises(error, match=match):
        call(rb)
    after = rb.state_dict()
    assert after["size"] == before["size"] and after["max_priority"] == before["max_priority"]
    assert torch.equal(after["tree"]["weights"], before["tree"]["weights"])


def test_bad_construction_and_empty_buffer():
    with pytest.raises(ValueError, match="empty"):
        PrioritizedReplayBuffer(4).sample(2)
    with pytest.raises(ValueError, match="alpha"):
        PrioritizedReplayBuffer(4, alpha=-1.0)
    with pytest.raises(ValueError, match="normalize"):
        PrioritizedReplayBuffer(4, normalize="mean")
    with pytest.raises(ValueError, match="reserved"):
        PrioritizedReplayBuffer(4).add(weights=1.0)
    rb = PrioritizedReplayBuffer(4)
    with pytest.raises(ValueError, match="leading dimension"):
        rb.add({"a": torch.zeros(2), "b": torch.zeros(3)})
    assert rb.fields == {}  # the failed first add defined nothing
    rb.add(a=0.5)
    assert rb.fields == {"a": ((), torch.float32)}


def test_weights_match_cpprb_with_buffer_normalisation():
    cpprb = pytest.importorskip("cpprb", reason="cpprb is not installed (pip install cpprb)")
    ours = PrioritizedReplayBuffer(16, alpha=0.7, eps=1e-4, normalize="buffer", seed=0)
    theirs = cpprb.PrioritizedReplayBuffer(16, {"obs": {"shape": 2}}, alpha=0.7, eps=1e-4)
    for t in range(10):  # the same adds and updates, through each one's API
        ours.add(obs=np.full(2, t, dtype=np.float32))
        theirs.add(obs=np.full(2, t, dtype=np.float32))
    td = np.random.default_rng(3).exponential(1.0, 6)
    ours.update_priorities(np.arange(6), td)
    theirs.update_priorities(np.arange(6), td)
    ours.add(obs=np.zeros(2, dtype=np.float32))
    theirs.add(obs=np.zeros(2, dtype=np.float32))
    assert ours.get_stored_size() == theirs.get_stored_size()
    assert ours.get_max_priority() == pytest.approx(theirs.get_max_priority(), rel=1e-6)  # cpprb keeps float32
    batch = theirs.sample(256, beta=0.5)
    index = torch.as_tensor(batch["indexes"].astype(np.int64))
    np.testing.assert_allclose(ours.weights(index, beta=0.5).numpy(), batch["weights"], rtol=1e-5)


# -- refused calls change nothing -----------------------------------------------------------------


def snapshot(rb: PrioritizedReplayBuffer) -> dict:
    """Everything a call could change, in comparable form."""
    state = rb.state_dict()
    return {
        "size": state["size"], "position": state["position"], "max_priority": state["max_priority"],
        "storage": {k: v.clone() for k, v in state["storage"].items()},
        "weights": state["tree"]["weights"].clone(), "fields": rb.fields,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "storage":
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_an_add_the_tree_refuses_leaves_the_fields_as_they_were():
    rb = PrioritizedReplayBuffer(2, alpha=1.0, eps=0.0, seed=0)
    rb.add(obs=10.0, priorities=1.0)
    rb.add(obs=20.0, priorities=1e308)
    before = snapshot(rb)
    with pytest.raises(ValueError, match="overflow"):
        rb.add(obs=30.0, priorities=1e308)  # slot 0: 1e308 + 1e308 overflows
    assert_same(before, snapshot(rb))
    assert rb.state_dict()["storage"]["obs"].tolist() == [10.0, 20.0]
    # the one-item path (no priorities: max_priority 1e308) is refused the same way
    with pytest.raises(ValueError, match="overflow"):
        rb.add(obs=30.0)
    assert_same(before, snapshot(rb))


def test_an_update_whose_total_overflows_changes_nothing():
    rb = PrioritizedReplayBuffer(3, alpha=1.0, eps=0.0, normalize="buffer", seed=0)
    rb.add({"x": torch.arange(3.0)}, priorities=[1.0, 2.0, 3.0])
    before = snapshot(rb)
    weights = rb.weights([0, 1, 2])
    with pytest.raises(ValueError, match="overflow"):
        rb.update_priorities([0, 1], [1e308, 1e308])
    assert_same(before, snapshot(rb))
    assert torch.equal(rb.weights([0, 1, 2]), weights)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(max_priority=math.nan), ValueError, "max_priority"),
        (dict(max_priority=math.inf), ValueError, "max_priority"),
        (dict(max_priority=-5.0), ValueError, "max_priority"),
        (dict(max_priority="1.0"), TypeError, "max_priority"),
        (dict(max_priority=1e308), ValueError, "overflows"),  # alpha 2: its leaf is inf
        (dict(size=2), ValueError, "beyond its 2 items"),  # slots 2.. keep their weight
        (dict(size=9), ValueError, "do not fit"),
        (dict(position=1), ValueError, "do not fit"),  # position must equal size until full
        (dict(size="3"), TypeError, "size"),
        (dict(beta=2.0), ValueError, "beta"),
        (dict(storage={"obs": torch.zeros(2)}), ValueError, "3 items"),
        (dict(storage={"indices": torch.zeros(3)}), ValueError, "named 'indices'"),
        (dict(storage={}), ValueError, "no fields"),
        (dict(storage=[torch.zeros(3)]), ValueError, "dict of tensors"),
        (dict(config={"capacity": 8}), ValueError, "configured differently"),
        (dict(tree={"format": "isample.SumTree"}), (ValueError, TypeError), "version"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(change, error, match):
    source = PrioritizedReplayBuffer(8, alpha=2.0, seed=0)
    source.add({"obs": torch.arange(3.0)}, priorities=[1.0, 2.0, 3.0])
    state = {**source.state_dict(), **change}
    if "size" in change and change["size"] == 2:
        state["storage"] = {"obs": torch.arange(2.0)}
        state["position"] = 2
    rb = PrioritizedReplayBuffer(8, alpha=2.0, seed=1)
    rb.add(obs=7.0)
    before = snapshot(rb)
    with pytest.raises(error, match=match):
        rb.load_state_dict(state)
    assert_same(before, snapshot(rb))


def test_a_state_that_lacks_a_key_says_which():
    rb = PrioritizedReplayBuffer(4)
    state = rb.state_dict()
    del state["position"]
    with pytest.raises(ValueError, match=r"lacks \['position'\]"):
        rb.load_state_dict(state)


def test_a_loaded_state_never_draws_slots_beyond_its_size():
    rb = PrioritizedReplayBuffer(6, seed=0)
    rb.add({"obs": torch.arange(4.0)})
    twin = PrioritizedReplayBuffer(6, seed=1)
    twin.load_state_dict(rb.state_dict())
    assert len(twin) == 4 and set(twin.sample(2000)["indices"].tolist()) == {0, 1, 2, 3}
    assert twin.add(obs=9.0).tolist() == [4]


# -- slots that hold no item -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["priorities", "weights", "probabilities", "update_priorities"])
@pytest.mark.parametrize("indices", [[5], [5, 0], [-1], [0, 8]])
def test_slots_that_hold_no_item_raise_index_error(method, indices):
    rb = PrioritizedReplayBuffer(8, normalize="buffer", seed=0)
    rb.add({"x": torch.zeros(3)}, priorities=[1.0, 2.0, 3.0])
    before = snapshot(rb)
    call = getattr(rb, method)
    with pytest.raises(IndexError, match="hold no item"):
        call(indices, [1.0] * len(indices)) if method == "update_priorities" else call(indices)
    assert_same(before, snapshot(rb))


def test_a_full_buffer_refuses_indices_beyond_it_with_the_same_error():
    rb = PrioritizedReplayBuffer(4, seed=0)
    rb.add({"x": torch.zeros(4)})
    for bad in ([4], [-1], np.array([2**63 + 5], dtype=np.uint64)):
        with pytest.raises(IndexError, match="hold no item"):
            rb.update_priorities(bad, [1.0])
        with pytest.raises(IndexError, match="hold no item"):
            rb.weights(bad)
    rb.update_priorities(np.array([3, 1], dtype=np.uint64), [2.0, 3.0])  # cpprb's "indexes" dtype
    np.testing.assert_allclose(rb.priorities([1, 3]).numpy(), [3.0, 2.0])


def test_an_item_that_cannot_be_drawn_has_no_weight():
    rb = PrioritizedReplayBuffer(4, alpha=1.0, eps=0.0, seed=0)
    rb.add({"x": torch.zeros(3)}, priorities=[1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="probability 0"):
        rb.weights([0, 1])


# -- input that is not numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda rb: rb.update_priorities([0], "1.0"), TypeError, "priorities must be numbers"),
        (lambda rb: rb.update_priorities([0], ["1.0"]), TypeError, "priorities must be real numbers"),
        (lambda rb: rb.update_priorities([0], [1 + 1j]), TypeError, "priorities must be real numbers"),
        (lambda rb: rb.update_priorities([0], torch.tensor([True])), TypeError, "priorities must be real numbers"),
        (lambda rb: rb.update_priorities("0", [1.0]), TypeError, "indices must be integers"),
        (lambda rb: rb.update_priorities(["0"], [1.0]), TypeError, "indices must be integers"),
        (lambda rb: rb.update_priorities(torch.tensor([0.0]), [1.0]), TypeError, "indices must be integers"),
        (lambda rb: rb.add(obs="1.0", act=0), TypeError, "field 'obs' must be numeric"),
        (lambda rb: rb.add(obs=np.array(["1.0"]), act=0), TypeError, "field 'obs' must be numeric"),
        (lambda rb: rb.add(obs=1.5, act=0.5), TypeError, "'act' is stored as torch.int64"),
        (lambda rb: rb.add(obs=1.5, act=2**63), ValueError, "'act': 9223372036854775808 does not fit"),
        (lambda rb: rb.add(obs=1.5, act=np.array(2**64 - 1, dtype=np.uint64)), ValueError, "'act' is stored as torch.int64"),
        (lambda rb: rb.sample(2, beta="0.5"), TypeError, "beta must be a real number"),
        (lambda rb: rb.sample(2, beta=True), TypeError, "beta must be a real number"),
        (lambda rb: rb.add([1.0]), TypeError, "dict"),
    ],
)
def test_input_that_is_not_numbers_gets_a_type_error_naming_it(call, error, match):
    rb = PrioritizedReplayBuffer(4, seed=0)
    rb.add(obs=1.0, act=1)
    before = snapshot(rb)
    with pytest.raises(error, match=match):
        call(rb)
    assert_same(before, snapshot(rb))


def test_integers_that_do_not_fit_a_narrower_field_are_refused():
    rb = PrioritizedReplayBuffer(4, seed=0)
    rb.add(pixel=np.array([1, 2], dtype=np.uint8))
    before = snapshot(rb)
    for value in (np.array([300, 1]), torch.tensor([-1, 0]), np.array([1, 2**40], dtype=np.int64)):
        with pytest.raises(ValueError, match=r"holds 0\.\.255"):
            rb.add(pixel=value)
    assert_same(before, snapshot(rb))
    rb.add(pixel=np.array([255, 0]))  # int64 values that fit are stored
    assert rb.state_dict()["storage"]["pixel"][1].tolist() == [255, 0]


def test_numpy_values_of_every_kind_are_stored_as_torch_would_cast_them():
    """The one-item fast path (numpy views) and the general path (torch) store the same bits."""
    values = [
        dict(obs=np.array([0.1, 2.5], dtype=np.float32), act=3, rew=0.3, done=True),
        dict(obs=np.array([1e-3, -7.0]), act=np.int32(2), rew=np.float16(1.5), done=np.bool_(False)),
        dict(obs=torch.tensor([0.7, 0.2], dtype=torch.float64), act=torch.tensor(5), rew=1, done=False),
        dict(obs=np.array([3.0, 4.0], dtype=">f8"), act=np.array(-4, dtype=">i8"), rew=True, done=torch.tensor(True)),
        dict(obs=torch.tensor([1 + 2j]).conj().imag.expand(2), act=np.int64(1), rew=np.float64(2.25), done=0 == 1),
    ]
    fast, slow = PrioritizedReplayBuffer(8, seed=0), PrioritizedReplayBuffer(8, seed=0)
    for item in values:
        fast.add(**item)
        slow.add({k: as_tensor_batch(v) for k, v in item.items()})  # the batch path: torch casts
    assert fast.fields == slow.fields == {
        "obs": ((2,), torch.float32), "act": ((), torch.int64), "rew": ((), torch.float32), "done": ((), torch.bool)
    }
    for name, stored in fast.state_dict()["storage"].items():
        assert torch.equal(stored, slow.state_dict()["storage"][name]), name
    assert fast.state_dict()["storage"]["obs"][4].tolist() == [-2.0, -2.0]  # the negated view, resolved


def as_tensor_batch(value) -> torch.Tensor:
    """A batch of one of `value`, converted by torch (Python numbers: torch's default dtypes)."""
    if isinstance(value, torch.Tensor):
        return value.resolve_neg().unsqueeze(0)
    if isinstance(value, (bool, int, float)):
        return torch.as_tensor(value).unsqueeze(0)
    array = np.asarray(value)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="))).unsqueeze(0)


# -- the first add: keyword batches and memory --------------------------------------------------------


def test_keyword_fields_with_priorities_of_their_length_are_a_batch_on_the_first_add():
    rb = PrioritizedReplayBuffer(100, seed=0)
    slots = rb.add(obs=torch.arange(64.0).view(32, 2), act=torch.arange(32), priorities=torch.ones(32))
    assert slots.tolist() == list(range(32)) and len(rb) == 32
    assert rb.fields == {"obs": ((2,), torch.float32), "act": ((), torch.int64)}
    # once the fields are defined, keywords are one item again
    rb.add(obs=torch.zeros(2), act=1)
    assert len(rb) == 33


def test_ambiguous_keyword_batches_on_the_first_add_are_refused_with_the_dict_form():
    rb = PrioritizedReplayBuffer(100, seed=0)
    with pytest.raises(ValueError, match=r"rb\.add\(\{'obs': obs, 'act': act\}\)"):
        rb.add(obs=torch.zeros(32, 4), act=torch.zeros(32, dtype=torch.int64))
    assert rb.fields == {} and len(rb) == 0
    # a batch of one is the way to store a single item whose fields all have k entries
    rb.add({"obs": torch.zeros(1, 4), "next_obs": torch.ones(1, 4)})
    assert rb.fields == {"obs": ((4,), torch.float32), "next_obs": ((4,), torch.float32)}
    # one field of k entries is one item (cpprb's add(obs=o) with env_dict {"obs": {"shape": k}})
    single = PrioritizedReplayBuffer(10, seed=0)
    single.add(obs=np.zeros(4, dtype=np.float32))
    assert single.fields == {"obs": ((4,), torch.float32)} and len(single) == 1


def test_field_storage_that_cannot_fit_is_refused_before_allocating():
    rb = PrioritizedReplayBuffer(100_000, seed=0)
    huge = torch.zeros(1, 400_000).expand(100_000, 400_000)  # a view: nothing allocated here
    with pytest.raises(MemoryError, match="160,000,000,000 bytes"):
        rb.add({"obs": huge})
    with pytest.raises(MemoryError, match="bytes"):
        rb.add(obs=torch.zeros(1).expand(10**9))  # one item of 4 GB per slot
    assert rb.fields == {} and len(rb) == 0


# -- copies, the cpprb names, bools --------------------------------------------------------------------


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda rb: pickle.loads(pickle.dumps(rb)), copy.copy])
def test_copies_go_through_state_dict_and_are_independent(copy_of):
    rb = PrioritizedReplayBuffer(8, alpha=0.7, beta=0.3, normalize="buffer", bool_as_float=True, seed=4)
    rb.add({"obs": torch.arange(5.0), "done": torch.tensor([True, False, True, False, True])}, priorities=[1, 2, 3, 4, 5])
    rb.sample(3)
    twin = copy_of(rb)
    assert repr(twin) == repr(rb) and twin.bool_as_float and twin.fields == rb.fields
    a, b = rb.sample(50), twin.sample(50)
    assert all(torch.equal(a[k], b[k]) for k in a)
    twin.update_priorities([0], [100.0])
    twin.add(obs=9.0, done=True)
    assert len(rb) == 5 and rb.priorities([0]).item() == pytest.approx(1.0)
    empty = copy_of(PrioritizedReplayBuffer(3, seed=0))
    assert empty.fields == {} and len(empty) == 0


def test_sampled_batches_answer_to_cpprbs_indexes():
    rb, _ = filled(10)
    batch = rb.sample(16)
    assert batch["indexes"] is batch["indices"]
    assert "indexes" not in batch and list(batch) == ["obs", "act", "indices", "weights"]
    with pytest.raises(KeyError):
        batch["nosuch"]


def test_cpprbs_other_names_answer_as_cpprbs_do():
    cpprb = pytest.importorskip("cpprb", reason="cpprb is not installed (pip install cpprb)")
    ours = PrioritizedReplayBuffer(4, seed=0)
    theirs = cpprb.PrioritizedReplayBuffer(4, {"obs": {"shape": 2}})
    for t in range(6):
        for rb in (ours, theirs):
            rb.add(obs=np.full(2, t, dtype=np.float32))
            rb.on_episode_end()
        assert ours.get_next_index() == theirs.get_next_index()
    assert ours.get_buffer_size() == theirs.get_buffer_size() == 4 and ours.is_Nstep() is theirs.is_Nstep() is False
    np.testing.assert_array_equal(ours.get_all_transitions()["obs"].numpy(), theirs.get_all_transitions()["obs"])
    ours.clear()
    assert ours.get_all_transitions()["obs"].shape == (0, 2) and ours.get_next_index() == 0


def test_bool_fields_are_kept_or_stored_as_float_when_asked():
    kept = PrioritizedReplayBuffer(4, seed=0)
    kept.add(obs=np.zeros(2, dtype=np.float32), done=True)
    assert kept.sample(2)["done"].dtype == torch.bool
    floats = PrioritizedReplayBuffer(4, bool_as_float=True, seed=0)
    floats.add(obs=np.zeros(2, dtype=np.float32), done=True)
    floats.add(obs=np.zeros(2, dtype=np.float32), done=False)
    floats.add({"obs": torch.zeros(2, 2), "done": torch.tensor([False, True])})
    batch = floats.sample(64)
    assert batch["done"].dtype == torch.float32
    assert torch.equal(1 - batch["done"], torch.tensor([0.0, 1.0, 1.0, 0.0])[batch["indices"]])  # slots 0, 3 done
    with pytest.raises(TypeError, match="bool_as_float"):
        PrioritizedReplayBuffer(4, bool_as_float=1)


# -- normalize="buffer": the smallest priority kept beside the tree --------------------------------


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_buffer_normalisation_follows_the_smallest_priority_exactly(eps):
    """Random adds (wrapping around) and updates (repeated slots with different priorities,
    zeros), each followed by the weights against their definition over every stored item."""
    rng = np.random.default_rng(0)
    rb = PrioritizedReplayBuffer(20, alpha=0.8, beta=0.6, eps=eps, normalize="buffer", seed=0)
    for step in range(300):
        if step % 3 == 0 or len(rb) < 5:
            if rng.random() < 0.5:
                rb.add(x=float(step))
            else:
                rb.add({"x": torch.full((3,), float(step))}, priorities=rng.exponential(1.0, 3))
        else:
            slots = rng.integers(0, len(rb), 6)
            slots[1] = slots[0]  # a repeated slot: the last priority counts
            p = rng.exponential(1.0, 6) * (rng.random(6) < 0.9)
            rb.update_priorities(slots, p)
        p_all = rb.probabilities().numpy()
        drawable = np.flatnonzero(p_all > 0)
        check = drawable[: min(5, drawable.size)]
        expected = (len(rb) * p_all[check]) ** -0.6 / (len(rb) * p_all[drawable].min()) ** -0.6
        np.testing.assert_allclose(rb.weights(check).numpy(), expected, rtol=2e-6, err_msg=f"step {step}")
    rb.clear()
    rb.add(x=1.0)
    assert rb.weights([0]).tolist() == [1.0]


def test_the_drop_in_loop_runs_on_both_buffers_in_a_real_gymnasium_episode(one_torch_thread):
    """examples/dqn_cartpole.py, 200 steps, with cpprb's buffer and with ours."""
    pytest.importorskip("gymnasium", reason="gymnasium is not installed (pip install 'isample[rl]')")
    pytest.importorskip("cpprb", reason="cpprb is not installed (pip install 'isample[rl]')")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dqn_cartpole.py"
    spec = importlib.util.spec_from_file_location("dqn_cartpole", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = {}
    for kind in ("cpprb", "isample"):
        made = []

        def make(kind=kind):
            made.append(example.make_buffer(kind, 1000, alpha=0.6, eps=1e-6, normalize="buffer", seed=0))
            return made[-1]

        results[kind] = example.train(make, steps=200, seed=0, learning_starts=50, log_every=None)
        assert results[kind]["calls"] == {"add": 200, "sample": 150, "update_priorities": 150}
        assert results[kind]["episodes"] > 0 and all(v > 0 for v in results[kind]["median_us"].values())
    ours = made[-1]
    assert len(ours) == 200 and ours.fields["done"] == ((), torch.float32) and ours.fields["act"] == ((), torch.int64)
    p = ours.priorities()
    assert bool(torch.isfinite(p).all()) and int((p != 1.0).sum()) > 50  # the loop's |TD| reached the tree


# -- the core's one-call paths: the same results as the general paths -------------------------------


def general_path_twin(rb: PrioritizedReplayBuffer) -> PrioritizedReplayBuffer:
    """A copy of `rb` whose calls all take the general (Python) paths: the core's one-call
    store switched off, as for fields the core does not write."""
    twin = copy.deepcopy(rb)
    twin._store = None
    return twin


def test_the_core_paths_are_taken_where_they_apply():
    """Negative control for the comparisons below: they would compare a path with itself if
    the core's store were never made."""
    rb, _ = filled(10)
    assert rb._store is not None
    half = PrioritizedReplayBuffer(4, seed=0)
    half.add(x=np.float16(1.0))  # float16 fields are written by torch / numpy only
    assert half.fields["x"][1] == torch.float16 and half._store is None
    half.add(x=np.float16(2.5))
    assert half.sample(64)["x"].unique().tolist() == [1.0, 2.5] and half.get_stored_size() == 2


@pytest.mark.parametrize("normalize", ["batch", "buffer", None])
def test_core_and_general_paths_draw_weight_and_update_alike(normalize):
    rb, _ = filled(40, normalize=normalize, seed=3)
    twin = general_path_twin(rb)
    rng = np.random.default_rng(5)
    for step in range(20):
        beta = float(rng.random())
        a, b = rb.sample(33, beta=beta), twin.sample(33, beta=beta)
        assert list(a) == list(b) == ["obs", "act", "indices", "weights"]
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (step, key)
        # weights() of the drawn items gives the bits sample() gave
        assert torch.equal(rb.weights(a["indices"], beta=beta), a["weights"])
        td = np.abs(rng.standard_normal(33)).astype(np.float32 if step % 2 else np.float64) * (rng.random(33) < 0.9)
        rb.update_priorities(a["indices"], td)
        twin.update_priorities(b["indices"], td)
        obs = np.full(1, 100 + step, dtype=np.float32)
        rb.add(obs=obs, act=step)
        twin.add(obs=obs, act=step)
        assert rb.max_priority == twin.max_priority
        assert torch.equal(rb.state_dict()["tree"]["weights"], twin.state_dict()["tree"]["weights"])
    assert all(torch.equal(x, y) for x, y in zip(rb.state_dict()["storage"].values(), twin.state_dict()["storage"].values()))


def test_core_leaves_are_python_floats_to_the_alpha():
    """(p + eps) ** alpha in float64, as Python computes it, whatever the priorities' dtype."""
    rb = PrioritizedReplayBuffer(8, alpha=0.6, eps=1e-4, seed=0)
    rb.add({"x": torch.zeros(8)})
    for p in (np.array([0.3, 2.0, 7.5], dtype=np.float32), np.array([0.3, 2.0, 7.5]), torch.tensor([1e-3, 5.0, 0.0])):
        rb.update_priorities(torch.tensor([1, 4, 6]), p)
        expected = [(float(v) + 1e-4) ** 0.6 for v in np.asarray(p, dtype=np.float64)]
        assert rb.state_dict()["tree"]["weights"][[1, 4, 6]].tolist() == expected


@pytest.mark.parametrize(
    "indices, priorities, error, match",
    [
        (torch.tensor([0, 5]), np.array([1.0, 2.0]), IndexError, "hold no item"),
        (np.array([-1, 0]), np.array([1.0, 2.0], dtype=np.float32), IndexError, "hold no item"),
        (torch.tensor([0, 1]), np.array([1.0, np.nan], dtype=np.float32), ValueError, "finite and >= 0"),
        (torch.tensor([0, 1]), torch.tensor([-1.0, 1.0]), ValueError, "finite and >= 0"),
        (torch.tensor([0, 1]), np.array([np.inf, 1.0]), ValueError, "finite and >= 0"),
        (torch.tensor([0, 1]), np.array([1e200, 1.0]), ValueError, "overflows float64"),  # leaf (1e200)^2
        (torch.tensor([0, 1]), np.array([1e154, 1e154]), ValueError, "overflow float64: rescale"),  # the total
        (torch.tensor([0, 1]), np.array([1.0, 2.0, 3.0]), ValueError, "one per item"),
    ],
)
def test_plain_arrays_the_core_refuses_change_nothing_and_say_why(indices, priorities, error, match):
    rb = PrioritizedReplayBuffer(8, alpha=2.0, eps=0.0, normalize="buffer", seed=0)
    rb.add({"obs": torch.zeros(3, 2)}, priorities=[1.0, 2.0, 3.0])
    assert rb._store is not None
    before = snapshot(rb)
    with pytest.raises(error, match=match):
        rb.update_priorities(indices, priorities)
    assert_same(before, snapshot(rb))


def test_one_item_adds_through_the_core_store_what_torch_stores():
    """Every kind of value the core takes (Python numbers, numpy arrays and scalars, CPU
    tensors) against the batch path (torch's casts), into fields of many dtypes."""
    layout = {
        "f32": np.zeros(2, dtype=np.float32), "f64": 0.0 + np.zeros(()), "i64": 0, "i32": np.int32(0),
        "u8": np.zeros(3, dtype=np.uint8), "b": False, "i16": torch.zeros((), dtype=torch.int16),
    }
    values = [
        dict(f32=np.array([0.1, 2.5]), f64=np.float32(0.3), i64=-(2**62), i32=np.int16(-7), u8=np.array([1, 2, 255], dtype=np.uint8), b=True, i16=np.int8(-3)),
        dict(f32=torch.tensor([1.5, -2.0], dtype=torch.float64), f64=3, i64=np.int64(2**40), i32=np.int32(2**31 - 1), u8=torch.tensor([7, 8, 9], dtype=torch.uint8), b=np.bool_(True), i16=True),
        dict(f32=np.array([1e40, -1e-50]), f64=2**53, i64=True, i32=False, u8=np.zeros(3, dtype=np.uint8), b=torch.tensor(False), i16=torch.tensor(-5, dtype=torch.int8)),
    ]
    fast = PrioritizedReplayBuffer(8, seed=0)
    slow = PrioritizedReplayBuffer(8, seed=0)
    for buffer in (fast, slow):
        buffer.add({k: as_tensor_batch(v) for k, v in layout.items()})
    assert fast._store is not None
    fast._fields.prepare_one = lambda fields: pytest.fail(f"the core did not take {fields}")
    slow._store = None
    for item in values:
        assert fast.add(**item).tolist() == slow.add({k: as_tensor_batch(v) for k, v in item.items()}).tolist()
    for name, stored in fast.state_dict()["storage"].items():
        assert torch.equal(stored, slow.state_dict()["storage"][name]), name
    assert fast.state_dict()["storage"]["f32"][3].tolist() == [math.inf, -0.0]  # float32 rounding, as torch's


def test_values_the_core_does_not_take_go_the_general_way():
    """Not plain (strided, big-endian, a subclass, an int beyond 2^53 into a float field) or
    refused (a wrong shape, a dtype that does not cast): stored, or refused, as before."""
    rb = PrioritizedReplayBuffer(8, seed=0)
    rb.add(obs=np.zeros(2, dtype=np.float32), rew=0.0, act=0)
    rb.add(obs=np.arange(4.0, dtype=np.float32)[::2], rew=2**60, act=np.array(3, dtype=">i8"))
    rb.add(obs=torch.nn.Parameter(torch.ones(2)), rew=np.float16(0.5), act=torch.tensor(4))
    stored = rb.get_all_transitions()
    assert stored["obs"].tolist() == [[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    assert stored["rew"].tolist() == [0.0, float(np.float32(2**60)), 0.5] and stored["act"].tolist() == [0, 3, 4]
    before = snapshot(rb)
    for bad, error in ((dict(obs=np.zeros(3, dtype=np.float32), rew=0.0, act=0), ValueError),
                       (dict(obs=np.zeros(2, dtype=np.float32), rew=0.0, act=0.5), TypeError),
                       (dict(obs=np.zeros(2, dtype=np.float32), rew=0.0, act=2**63), ValueError),
                       (dict(obs=np.zeros(2, dtype=np.float32), rew=0.0), KeyError)):
        with pytest.raises(error):
            rb.add(**bad)
    assert_same(before, snapshot(rb))


def test_a_loaded_or_cleared_buffer_keeps_its_core_paths_right():
    rb, _ = filled(12, normalize="buffer", seed=2)
    twin = PrioritizedReplayBuffer(12, normalize="buffer", seed=9)
    twin.load_state_dict(rb.state_dict())
    assert twin._store is not None and twin._store is not rb._store
    a, b = rb.sample(50), twin.sample(50)
    assert all(torch.equal(a[k], b[k]) for k in a)
    twin.update_priorities(b["indices"][:3], np.array([0.5, 40.0, 1e-3]))
    assert twin.max_priority == 40.0 and rb.max_priority < 40.0
    twin.clear()
    assert twin.add(obs=np.array([5.0], dtype=np.float32), act=7).tolist() == [0]
    batch = twin.sample(8)
    assert batch["obs"].tolist() == [[5.0]] * 8 and batch["weights"].tolist() == [1.0] * 8


# -- SumTree(track_min=True): the smallest positive weight in the core -----------------------------------


@pytest.mark.parametrize("n", [1, 15, 16, 17, 300, 5000])
def test_the_tracked_minimum_follows_every_change_exactly(n):
    """Updates (zeros, repeats, whole levels), assign, removal sampling (which zeroes and
    restores leaves), state loading: min_positive always equals the numpy minimum."""
    import isample

    rng = np.random.default_rng(n)
    tree = isample.SumTree(n, seed=0, track_min=True)

    def expected() -> float:
        w = tree.get().numpy()
        return float(w[w > 0].min()) if (w > 0).any() else math.inf

    assert tree.min_positive == math.inf
    for step in range(60):
        k = int(rng.integers(1, 2 * n + 2))
        index = rng.integers(0, n, k)
        values = rng.exponential(1.0, k) * (rng.random(k) < 0.8)
        tree.update(index, values)
        assert tree.min_positive == expected(), step
        if step % 10 == 0 and tree.num_positive >= 3:
            # one item holding nearly all the mass: the draws repeat it, so the removal method
            # zeroes drawn leaves in the tree and restores them
            tree.update([int(index[0])], [1e12])
            low = expected()
            tree.sample(3, replace=False, method="removal")
            assert tree.min_positive == expected() == low
    tree.assign(rng.random(n))
    assert tree.min_positive == expected()
    tree.update(np.arange(n), np.zeros(n))
    assert tree.min_positive == math.inf
    twin = copy.deepcopy(tree)
    twin.load_state_dict({**tree.state_dict(), "weights": torch.from_numpy(rng.random(n) + 0.5)})
    assert twin.min_positive == float(twin.get().min()) and tree.min_positive == math.inf


def test_track_min_is_opt_in_and_cpu_only():
    import isample

    plain, tracked = isample.SumTree(1000, seed=0), isample.SumTree(1000, seed=0, track_min=True)
    assert tracked.nbytes - plain.nbytes == plain.nbytes - 8 * 1008  # the internal nodes once more
    with pytest.raises(ValueError, match="track_min=True"):
        plain.min_positive
    with pytest.raises(TypeError, match="track_min"):
        isample.SumTree(10, track_min="yes")
    if isample.build_info()["gpu_on_host"]:
        with pytest.raises(ValueError, match="CPU trees only"):
            isample.SumTree(10, track_min=True, _implementation="gpu_on_host")
