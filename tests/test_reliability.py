"""Reliability: checkpoint files that survive crashes and refuse bad bytes, and no leaks."""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import isample
from isample.checkpoint import CHECKPOINT_VERSION, capacity_of, load_checkpoint, save_checkpoint


def _state(seed: int = 0):
    tree = isample.SoftmaxTree.from_scores(torch.randn(1000, generator=torch.Generator().manual_seed(seed)), seed=seed)
    sampler = isample.ImportanceSampler(500, score="running_loss", samples_per_epoch=100, seed=seed)
    list(iter(sampler))
    return {"tree": tree.state_dict(), "sampler": sampler.state_dict(), "step": seed, "note": "x" * 10}


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert torch.equal(loaded["tree"]["scores"], state["tree"]["scores"]) and loaded["step"] == 0
    other = isample.ImportanceSampler(500, score="running_loss", samples_per_epoch=100, seed=0)
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
    sampler = isample.ImportanceSampler(400, score="running_loss", samples_per_epoch=100, seed=1)
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

