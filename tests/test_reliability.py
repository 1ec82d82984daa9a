"""Reliability: checkpoint files that survive crashes and refuse bad bytes, no leaks, and
trees and samplers used from several threads at once."""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import isample
from isample.checkpoint import CHECKPOINT_VERSION, capacity_of, load_checkpoint, save_checkpoint
from conftest import run_threads


def _state(seed: int = 0):
    tree = isample.SoftmaxTree.from_scores(torch.randn(1000, generator=torch.Generator().manual_seed(seed)), seed=seed)
    sampler = isample.ImportanceSampler(500, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", samples_per_epoch=100, seed=seed)
    list(iter(sampler))
    return {"tree": tree.state_dict(), "sampler": sampler.state_dict(), "step": seed, "note": "x" * 10}


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(loaded["tree"]["scores"], state["tree"]["scores"]) and loaded["step"] == 0
    other = isample.ImportanceSampler(500, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", samples_per_epoch=100, seed=0)
    other.load_state_dict(loaded["sampler"])
    assert torch.equal(other.scores(), torch.zeros(500, dtype=torch.float64))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def assert_same_state(a, b, where="state"):
    """Two state_dicts are identical: same keys, equal values, tensors bit for bit (NaN too)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def test_checkpoints_record_the_capacity(tmp_path):
    state = _state()
    assert capacity_of(state) == 500  # found in state["sampler"]
    assert capacity_of(state["tree"]) == 1000 and capacity_of({"step": 3}) is None
    save_checkpoint(tmp_path / "ck.pt", state)
    wrapper = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert (wrapper["version"], wrapper["capacity"]) == (CHECKPOINT_VERSION, 500)
    assert load_checkpoint(tmp_path / "ck.pt", expected_capacity=500)["step"] == 0
    save_checkpoint(tmp_path / "explicit.pt", {"step": 1}, capacity=77)
    assert torch.load(tmp_path / "explicit.pt", weights_only=True)["capacity"] == 77
    with pytest.raises(ValueError, match="77 items, but 78 were expected"):
        load_checkpoint(tmp_path / "explicit.pt", expected_capacity=78)
    save_checkpoint(tmp_path / "none.pt", {"step": 2})  # holds no sampler: records no capacity
    assert load_checkpoint(tmp_path / "none.pt", expected_capacity=5)["step"] == 2
    for bad in (0, -3):
        with pytest.raises(ValueError):
            save_checkpoint(tmp_path / "bad.pt", {}, capacity=bad)
    with pytest.raises(TypeError):
        load_checkpoint(tmp_path / "ck.pt", expected_capacity=2.5)


def test_a_checkpoint_of_another_size_changes_nothing(tmp_path):
    """Loading a checkpoint saved for 500 items into a sampler of 400 raises a clear
    ValueError and leaves the sampler's state_dict exactly as it was."""
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state())  # its sampler has 500 items
    sampler = isample.ImportanceSampler(400, transform="softmax", uniform_mix=0.0, warmup_epochs=0, score="running_loss", samples_per_epoch=100, seed=1)
    sampler.update(range(400), torch.rand(400, generator=torch.Generator().manual_seed(1)))
    it = iter(sampler)
    for _ in range(30):
        next(it)  # part-way through an epoch
    before = sampler.state_dict()
    with pytest.raises(ValueError, match="500 items, but 400 were expected"):
        sampler.load_state_dict(load_checkpoint(path, expected_capacity=sampler.num_items)["sampler"])
    assert_same_state(sampler.state_dict(), before)
    with pytest.raises(ValueError, match="num_items"):  # without the file's check, the sampler's own
        sampler.load_state_dict(load_checkpoint(path)["sampler"])
    assert_same_state(sampler.state_dict(), before)
    assert len(list(it)) == 70  # and it carries on where it was


def test_version_1_checkpoints_still_load(tmp_path):
    buffer = io.BytesIO()
    torch.save({"step": 4}, buffer)
    payload = buffer.getvalue()
    torch.save({"format": "isample-checkpoint", "version": 1, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt", expected_capacity=10)["step"] == 4  # it records no capacity


def test_a_tampered_capacity_is_a_corrupted_file(tmp_path):
    save_checkpoint(tmp_path / "ck.pt", _state())
    wrapper = torch.load(tmp_path / "ck.pt", weights_only=True)
    wrapper["capacity"] = 400  # the checksum covers it
    torch.save(wrapper, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(tmp_path / "ck.pt", expected_capacity=400)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty", "version"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # somewhere in the payload
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        import hashlib
        import io

        buffer = io.BytesIO()
        torch.save({"step": 1}, buffer)
        payload = buffer.getvalue()
        torch.save({"format": "isample-checkpoint", "version": CHECKPOINT_VERSION + 1,
                    "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, path)
    with pytest.raises(ValueError, match="checkpoint|corrupted|version"):
        load_checkpoint(path)


def test_a_save_killed_midway_leaves_the_last_good_checkpoint(tmp_path):
    """SIGKILL a process while it rewrites a large checkpoint: the file always loads."""
    path = tmp_path / "ck.pt"
    writer = textwrap.dedent(
        f"""
        import sys, torch
        from isample.checkpoint import save_checkpoint
        big = torch.zeros(8_000_000)  # 32 MB: each save takes a while
        step = 0
        while True:
            big[0] = step
            save_checkpoint({str(path)!r}, {{"step": step, "big": big}})
            print(step, flush=True)
            step += 1
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "0"  # one complete save exists
        time.sleep(0.15)  # now probably mid-save
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    loaded = load_checkpoint(path)
    assert loaded["big"][0].item() == loaded["step"] >= 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_memory_stays_flat_over_a_million_calls():
    n = 100_000
    tree = isample.SumTree.from_weights(torch.rand(n, dtype=torch.float64) + 0.1, seed=0)
    soft = isample.SoftmaxTree(n, seed=0)
    idx = torch.randint(0, n, (8,))
    values = torch.rand(8, dtype=torch.float64)

    def calls(count: int) -> None:
        for _ in range(count // 4):
            tree.update(idx, values)
            tree.sample(8)
            soft.update(idx, values)
            soft.sample(8, replace=False)

    calls(20_000)  # warm up: caches, allocator pools
    before = _rss_bytes()
    calls(1_000_000)
    growth = _rss_bytes() - before
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1e6 calls"


def _drive(sampler, steps: int, batch: int = 128) -> int:
    """Train-loop calls: each epoch's items in batches, weights and update per batch; returns
    the epochs drawn. Every 97th batch holds a NaN and an inf (the clamp path)."""
    losses = torch.rand(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bad = losses.clone()
    bad[:2] = torch.tensor([math.nan, math.inf])
    done = epochs = 0
    while done < steps:
        epoch = sampler.begin_epoch()
        epochs += 1
        order = epoch.order
        for start in range(0, order.numel(), batch):
            index = order[start : start + batch]
            sampler.weights(index)
            sampler.update(index, (bad if done % 97 == 0 else losses)[: index.numel()])
            done += 1
            if done == steps:
                break
        epoch.position = order.numel()
    return epochs


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("kind", ["softmax", "rank", "soft_pruning"])
def test_sampler_memory_stays_flat_over_many_steps(kind, one_torch_thread):
    """update + weights + new epochs, 40,000 calls and 200 epochs: RSS must not grow
    (history, one small dict per epoch, is all that may)."""
    n, steps = 10_000, 20_000
    if kind == "soft_pruning":
        sampler = isample.SoftPruningSampler(n, num_epochs=10**6, nonfinite="clamp", seed=0)
    else:
        sampler = isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, score="running_loss", transform=kind, samples_per_epoch=50 * 128,
                                            nonfinite="clamp", seed=0)
    _drive(sampler, 2_000)  # warm up: caches, allocator pools
    before = _rss_bytes()
    epochs = _drive(sampler, steps)
    growth = _rss_bytes() - before
    assert epochs >= 200 and sampler.counters["updates"] == 2_000 + steps
    assert sampler.counters["nonfinite_clamped"] > 0
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {2 * steps} calls and {epochs} epochs"


# -- threads ---------------------------------------------------------------------------------------


def test_softmax_tree_from_several_threads_stays_exact():
    """The core serialises calls: a SoftmaxTree hammered from threads (updates, blends, draws
    with and without replacement, which release the GIL) stays an exact softmax."""
    n = 100_000
    rng = np.random.default_rng(7)
    tree = isample.SoftmaxTree.from_scores(rng.normal(size=n) * 3, temperature=0.7, seed=0)
    errors = []

    def worker(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            for _ in range(150):
                tree.update(local.integers(0, n, 512), local.normal(size=512) * 3)
                tree.blend(local.integers(0, n, 256), local.normal(size=256) * 3, 0.5)
                draws = tree.sample(256)
                assert bool(((draws >= 0) & (draws < n)).all())
                distinct = tree.sample(20_000, replace=False)  # long call: releases the GIL
                assert distinct.unique().numel() == 20_000
                p = tree.probability(local.integers(0, n, 64))
                assert bool(((p > 0) & (p < 1)).all())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    run_threads(worker, 4)
    assert not errors
    scores = tree.get().numpy()
    z = scores / 0.7
    expected = np.exp(z - z.max())
    expected /= expected.sum()
    np.testing.assert_allclose(tree.probability().numpy(), expected, rtol=1e-12, atol=0)
    log_total = z.max() + np.log(np.exp(z - z.max()).sum())
    assert tree.log_total == pytest.approx(log_total, rel=1e-13)
    fresh = isample.SoftmaxTree.from_scores(scores, temperature=0.7)
    np.testing.assert_allclose(tree.probability().numpy(), fresh.probability().numpy(), rtol=1e-12, atol=0)


@pytest.fixture
def eager_thread_switches():
    """Switch threads every microsecond instead of every 5 ms, so that races show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_sampler_lock_is_reentrant_and_excludes_other_threads():
    """The sampler's lock behaves as threading.RLock: its holder takes it again, another
    thread waits until it is released, and only the holder may release it."""
    lock = isample._core.SamplerLock()
    assert not lock.held()
    with lock:
        with lock:
            assert lock.held()
        assert lock.held()
    assert not lock.held()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    taken, events = threading.Event(), []

    def other() -> None:
        with pytest.raises(RuntimeError, match="does not hold"):
            lock.release()  # held by the main thread, not this one
        lock.acquire()
        events.append("other took it")
        lock.release()

    lock.acquire()
    thread = threading.Thread(target=other)
    thread.start()
    thread.join(timeout=0.2)
    events.append("main releases")
    assert thread.is_alive()  # still waiting
    lock.release()
    thread.join()
    assert events == ["main releases", "other took it"]


def test_waiting_for_the_sampler_lock_can_be_interrupted():
    """Ctrl-C reaches a thread that waits for the lock (as with RLock), instead of waiting
    until the holder lets go."""
    import _thread
    import signal
    import time

    # Python raises KeyboardInterrupt only where SIGINT has its handler: a shell starts
    # background jobs (CI under `cmd &`) with SIGINT ignored, and interrupt_main then does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    lock, taken, let_go = isample._core.SamplerLock(), threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            taken.set()
            let_go.wait(timeout=3.0)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait()
    timer = threading.Timer(0.1, _thread.interrupt_main)
    start = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
        assert time.perf_counter() - start < 2.0  # interrupted, not released by the holder after 3 s
        assert not lock.held()
    finally:
        let_go.set()
        thread.join()
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("transform", ["softmax", "proportional", "rank"])
def test_the_compiled_update_waits_for_the_sampler_lock(transform):
    """update's compiled path takes the sampler's lock too: while another thread holds it
    (drawing an epoch, saving the state), an update waits, and lands once it is released."""
    sampler = isample.ImportanceSampler(64, transform=transform, uniform_mix=0.0, warmup_epochs=0, seed=0)
    index, losses = torch.arange(8), torch.full((8,), 2.0, dtype=torch.float64)
    done = threading.Event()

    def update() -> None:
        sampler.update(index, losses)
        done.set()

    with sampler._lock:
        thread = threading.Thread(target=update)
        thread.start()
        assert not done.wait(timeout=0.2)  # waiting for the lock
        assert sampler.counters["updates"] == 0 and bool((sampler.scores()[:8] == 0.0).all())
    thread.join()
    assert done.is_set() and sampler.counters["updates"] == 1
    assert bool((sampler.scores()[:8] == 2.0).all())


@pytest.mark.parametrize("kind", ["softmax", "proportional", "rank", "soft_pruning"])
def test_a_sampler_used_from_several_threads_loses_no_update(kind, eager_thread_switches):
    """Four threads update the same items with the same loss while a fifth draws epochs,
    reads weights and saves the state. Each EMA update maps S to 0.95 S + 0.05, whatever the
    order, so the scores must equal k sequential updates exactly: a lost update (two threads
    reading the same old score) would show."""
    n, items, rounds, workers = 256, 64, 100, 4
    policy = isample.RunningLoss(beta=0.95)

    def make():
        if kind == "soft_pruning":
            return isample.SoftPruningSampler(n, num_epochs=10**6, score=policy, initial_score=0.0, seed=0)
        return isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, score=policy, transform=kind, samples_per_epoch=128, seed=0)

    sampler = make()
    index = torch.arange(items)
    ones = torch.ones(items, dtype=torch.float64)
    errors, done = [], threading.Event()

    def updater() -> None:
        try:
            for _ in range(rounds):
                sampler.update(index, ones)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def drawer() -> None:
        try:
            while not done.is_set():
                epoch = sampler.begin_epoch()
                drawn = epoch.order[:32]
                weights = sampler.weights(drawn)
                assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
                epoch.position = epoch.order.numel()
                sampler.state_dict()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=updater) for _ in range(workers)]
    watcher = threading.Thread(target=drawer)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors
    reference = make()
    for _ in range(workers * rounds):
        reference.update(index, ones)
    assert sampler.counters["updates"] == reference.counters["updates"] == workers * rounds
    assert torch.equal(sampler.scores(), reference.scores())
    if kind != "soft_pruning":
        # the tree agrees with the scores (proportional keeps both)
        torch.testing.assert_close(sampler.probabilities(), reference.probabilities(), rtol=1e-12, atol=0)


def test_a_sampler_built_from_numpy_numbers_saves_a_checkpoint_that_loads(tmp_path):
    """Issue 19 item 2: numbers are normalised on the way in, so weights-only loading reads
    the saved configuration back."""
    sampler = isample.ImportanceSampler(20, transform="softmax", warmup_epochs=0, weight_exponent=np.float64(0.5), uniform_mix=np.float32(0.25), seed=0)
    list(iter(sampler))
    save_checkpoint(tmp_path / "ck.pt", sampler.state_dict())
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert loaded["config"]["weight_exponent"] == 0.5 and type(loaded["config"]["uniform_mix"]) is float
    isample.ImportanceSampler(20, transform="softmax", warmup_epochs=0, weight_exponent=0.5, uniform_mix=float(np.float32(0.25)), seed=0).load_state_dict(loaded)


def test_what_could_not_be_read_back_is_refused_at_save_time(tmp_path):
    good = _state()
    save_checkpoint(tmp_path / "ck.pt", good)
    before = (tmp_path / "ck.pt").read_bytes()
    for value, name in [(np.float64(0.5), "numpy.float64"), (np.int64(3), "numpy.int64"), (threading.Lock(), "lock")]:
        with pytest.raises(TypeError, match="cannot save"):
            save_checkpoint(tmp_path / "ck.pt", {**good, "extra": {"deep": [value]}})
    assert (tmp_path / "ck.pt").read_bytes() == before  # the last good checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left
    with pytest.raises(TypeError, match=r"state\['extra'\]\['deep'\]\[0\] is a numpy.float64"):
        save_checkpoint(tmp_path / "other.pt", {"extra": {"deep": [np.float64(0.5)]}})
