"""PrioritizedReplayBuffer: exact probabilities (chi-square), weights by hand, the ring buffer,
state, bad input, and cpprb's weights where cpprb is installed."""

from __future__ import annotations

import math

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
