"""Reliability: checkpoint files that survive crashes and refuse bad bytes, and no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import isample
from isample.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint


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
