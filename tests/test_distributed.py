"""DistributedImportanceSampler: two real processes on the CPU over gloo, and world size 1.

The two-process runs start this file as a script, twice (``python test_distributed.py
SCENARIO RANK WORLD STORE OUT``): the workers meet through a file store, run a scenario
(replicated or sharded) that batches many checks into one start-up, and save what they saw
for the tests below to judge against a single-process ImportanceSampler. Every run is bounded:
a collective that waits longer than PG_TIMEOUT_S raises in the worker, and a run that takes
longer than RUN_TIMEOUT_S is killed and fails its tests.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

import isample

RUN_TIMEOUT_S = 120  # one two-process run, start-up included; a hang fails after this
PG_TIMEOUT_S = 30  # any collective of the runs
SHORT_TIMEOUT_S = 3  # the process group of the hang test


# ---------------------------------------------------------------------------------------------
# Worker side: runs in the spawned processes.
# ---------------------------------------------------------------------------------------------


def _loss(idx: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic stand-in for per-example losses that moves with the step."""
    return 0.25 + ((idx * 7 + step * 3) % 11).to(torch.float64) / 4.0


def _sent(idx: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """What a rank hands back: rank 0 its whole batch, rank 1 0, 2, 4 or 6 items of it, so
    that batch sizes differ between ranks and are sometimes empty."""
    return idx if rank == 0 else idx[: (step % 4) * 2]


def _train(
    sampler: Any,
    rank: int,
    epochs: int,
    *,
    first_epoch: int = 0,
    step: int = 0,
    stop: Optional[int] = None,
    batch: int = 8,
    check: bool = False,
) -> Tuple[List[Dict[str, Any]], Any]:
    """A DDP-style loop without a model; stops after global step `stop` with a state_dict."""
    log: List[Dict[str, Any]] = []
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        it, consumed = iter(sampler), 0
        while True:
            chunk = list(itertools.islice(it, batch))
            if not chunk:
                break
            consumed += len(chunk)
            idx = torch.tensor(chunk, dtype=torch.int64)
            weights = sampler.weights(idx)
            send = _sent(idx, rank, step)
            losses = _loss(send, step)
            sampler.update(send, losses)
            if check:
                sampler.check_consistency()  # replicas bit-identical after every step
            log.append(
                {
                    "epoch": epoch,
                    "items": chunk,
                    "weights": weights.tolist(),
                    "sent": send.tolist(),
                    "losses": losses.tolist(),
                }
            )
            step += 1
            if stop is not None and step == stop:
                return log, sampler.state_dict(consumed=consumed)
    return log, None


def _outcome(call: Callable[[], Any]) -> Tuple[str, str]:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test reads the class and message
        return type(error).__name__, str(error)
    return "none", ""


def _gather_scores(sampler: Any) -> torch.Tensor:
    """All N scores of a sharded sampler, on every rank (test helper: small N only)."""
    import torch.distributed as dist

    mine = sampler.scores()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()]))
    widest = int(max(sizes))
    parts = [torch.zeros(widest, dtype=torch.float64) for _ in sizes]
    dist.all_gather(parts, torch.cat([mine, torch.zeros(widest - mine.numel(), dtype=torch.float64)]))
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])


def _overlapping_updates(sampler: Any, rank: int) -> Dict[str, Any]:
    """Six steps in which both ranks update items 5 and 40 with different losses: one process
    handed the ranks' batches in rank order must end with the same scores."""
    steps = []
    for step in range(6):
        idx = torch.tensor([5, 40, 17 + step, 59 - step]) if rank == 0 else torch.tensor([40, 5, 31, step])
        losses = _loss(idx, step + rank)
        sampler.update(idx, losses)
        steps.append((idx.tolist(), losses.tolist()))
    return {"steps": steps, "counters": dict(sampler.counters)}


REPLICATED_CONFIGS = [
    dict(num_items=101, score="running_loss", samples_per_epoch=75, warmup_epochs=1, seed=7),
    dict(
        num_items=50,
        transform="proportional",
        replacement=False,
        samples_per_epoch=33,
        drop_last=True,
        uniform_mix=0.1,
        seed=3,
    ),
]


def _scenario_replicated(rank: int, world: int, out: Path) -> Dict[str, Any]:
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler as D

    results: Dict[str, Any] = {}
    # Many steps, replicas checked after each one; the log is replayed by the parent.
    runs = []
    for config in REPLICATED_CONFIGS:
        sampler = D(**config)
        log, _ = _train(sampler, rank, 6, check=True)
        runs.append({"log": log, "scores": sampler.scores(), "len": len(sampler), "counters": dict(sampler.counters)})
    results["runs"] = runs
    s = D(60, score="running_loss", initial_score=1.0, seed=14)
    results["overlap"] = {**_overlapping_updates(s, rank), "scores": s.scores()}

    # Exact resume: rank 0 saves mid-epoch, every rank loads that file.
    config = REPLICATED_CONFIGS[0]
    full, _ = _train(D(**config), rank, 6)
    head, state = _train(D(**config), rank, 6, stop=13)
    if rank == 0:
        torch.save(state, out / "replicated_state.pt")
        results["state"] = state
    dist.barrier()
    resumed = D(**config)
    resumed.load_state_dict(torch.load(out / "replicated_state.pt", weights_only=False))
    tail, _ = _train(resumed, rank, 6, first_epoch=resumed.epoch, step=13)
    results["resume"] = {"full": full, "head": head, "tail": tail}

    # Bad input on one rank: every rank raises the same class, nothing is applied anywhere.
    s = D(20, score="running_loss", seed=1)
    s.update(torch.arange(20), torch.linspace(0.0, 2.0, 20, dtype=torch.float64))
    before = s.scores().clone()
    nan = torch.tensor([1.0, math.nan], dtype=torch.float64)
    good = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cases = {
        "nan_on_rank1": lambda: s.update([3, 4], nan if rank == 1 else good),
        "index_out_of_range_on_rank0": lambda: s.update([3, 20] if rank == 0 else [3, 4], good),
        "negative_index_on_rank1": lambda: s.update([-1, 4] if rank == 1 else [3, 4], good),
        "float_indices_on_rank1": lambda: s.update(torch.tensor([3.0, 4.0]) if rank == 1 else [3, 4], good),
        "scalar_loss_on_rank0": lambda: s.update([3, 4], torch.tensor(1.0) if rank == 0 else good),
    }
    results["bad"] = {name: _outcome(call) for name, call in cases.items()}
    results["bad_unchanged"] = torch.equal(s.scores(), before)
    s.update([5], [9.0])  # the group is still usable
    s.check_consistency()
    results["after_bad"] = s.scores()
    results["bad_construction"] = {
        "different_seeds": _outcome(lambda: D(20, seed=rank)),
        "bad_argument_on_rank1": _outcome(lambda: D(20, samples_per_epoch=0 if rank == 1 else 5)),
    }

    # A rank that never calls update: the other fails after the group's timeout, not forever.
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    s = D(20, group=short, seed=0)
    if rank == 0:
        started = time.monotonic()
        results["hang"] = _outcome(lambda: s.update([1], [1.0]))
        results["hang_seconds"] = time.monotonic() - started
        (out / "released").touch()
    else:
        waited = time.monotonic()
        while not (out / "released").exists() and time.monotonic() - waited < 60:
            time.sleep(0.05)
    return results


def _scenario_sharded(rank: int, world: int, out: Path) -> Dict[str, Any]:
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler as D

    results: Dict[str, Any] = {}
    n = 60
    scores = 3.0 * (torch.arange(n, dtype=torch.float64) / (n - 1)) ** 2  # shard 1 holds most mass

    # Softmax: updates cross to the other rank's shard; one epoch of 20,000 draws per rank.
    s = D(n, sharded=True, samples_per_epoch=40_000, seed=11)
    theirs = torch.arange(n // 2, n) if rank == 0 else torch.arange(0, n // 2)
    s.update(theirs, scores[theirs])
    items = list(s)
    results["softmax"] = {
        "items": items,
        "weights": s.weights(items),
        "probabilities": s.probabilities(),
        "shard": s.shard_range,
        "len": len(s),
    }

    # Proportional with a uniform mixture and max-normalised weights.
    s = D(
        n,
        sharded=True,
        transform="proportional",
        uniform_mix=0.2,
        normalize_weights="max",
        samples_per_epoch=20_000,
        seed=12,
    )
    s.update(theirs, scores[theirs])
    items = list(s)
    results["proportional"] = {
        "items": items,
        "weights": s.weights(items),
        "probabilities": s.probabilities(),
        "history": s.history[-1],
    }

    # Warm-up: each rank shuffles its own shard, padded to equal lengths.
    s = D(61, sharded=True, warmup_epochs=1, seed=13)
    results["warmup"] = {"items": list(s), "shard": s.shard_range}

    # Routing: running loss with the same item updated by both ranks in one step.
    s = D(n, sharded=True, score="running_loss", initial_score=1.0, seed=14)
    results["overlap"] = {**_overlapping_updates(s, rank), "scores": _gather_scores(s)}

    # Many training steps, then an exact resume where every rank saves and loads its own state.
    config = dict(num_items=90, sharded=True, score="running_loss", samples_per_epoch=70, warmup_epochs=1, seed=5)
    full, _ = _train(D(**config), rank, 5, check=True)
    head, state = _train(D(**config), rank, 5, stop=9)
    torch.save(state, out / f"sharded_state_{rank}.pt")
    dist.barrier()
    resumed = D(**config)
    wrong = torch.load(out / f"sharded_state_{1 - rank}.pt", weights_only=False)
    results["wrong_shard_load"] = _outcome(lambda: resumed.load_state_dict(wrong))
    resumed.load_state_dict(torch.load(out / f"sharded_state_{rank}.pt", weights_only=False))
    tail, _ = _train(resumed, rank, 5, first_epoch=resumed.epoch, step=9)
    results["resume"] = {"full": full, "head": head, "tail": tail}

    # Bad input on one rank.
    s = D(20, sharded=True, score="running_loss", seed=1)
    s.update(torch.arange(20), torch.linspace(0.0, 2.0, 20, dtype=torch.float64))
    before = _gather_scores(s)
    good = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cases = {
        "nan_on_rank0": lambda: s.update([3, 14], torch.tensor([math.inf, 1.0]) if rank == 0 else good),
        "index_out_of_range_on_rank1": lambda: s.update([3, 20] if rank == 1 else [3, 4], good),
        "policy_error_on_rank1": lambda: s.update([3, 4], torch.ones(3) if rank == 1 else good),
    }
    results["bad"] = {name: _outcome(call) for name, call in cases.items()}
    results["bad_unchanged"] = torch.equal(_gather_scores(s), before)
    s.update([5, 15], good)
    results["after_bad"] = _gather_scores(s)
    results["unsupported"] = _outcome(lambda: D(20, sharded=True, replacement=False))
    return results


SCENARIOS = {"replicated": _scenario_replicated, "sharded": _scenario_sharded}


def _worker(scenario: str, rank: int, world: int, store: str, out: str) -> None:
    import isample

    assert "isample.distributed" not in sys.modules, "import isample must not import isample.distributed"
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    results = SCENARIOS[scenario](rank, world, Path(out))
    results["isample"] = isample.__version__
    torch.save(results, Path(out) / f"{scenario}_rank{rank}.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no teardown: the hang test leaves a group whose operation timed out


# ---------------------------------------------------------------------------------------------
# Test side.
# ---------------------------------------------------------------------------------------------


def _launch(scenario: str, out: Path, world: int = 2) -> List[Dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    store = out / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(r), str(world), str(store), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    outputs: List[str] = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = "\n".join(f"--- rank {r} ---\n{proc.communicate()[0]}" for r, proc in enumerate(procs))
        pytest.fail(f"the {scenario} workers did not finish within {RUN_TIMEOUT_S} s\n{logs}")
    if any(proc.returncode for proc in procs):
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
        pytest.fail(f"a {scenario} worker failed\n{logs}")
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return _launch("replicated", tmp_path_factory.mktemp("replicated"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _launch("sharded", tmp_path_factory.mktemp("sharded"))


def _reference_options(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.items() if k != "drop_last"}


# -- replicated, two processes ------------------------------------------------------------


@pytest.mark.parametrize("which", range(len(REPLICATED_CONFIGS)))
def test_replicated_shards_are_the_single_process_draw_and_replicas_match_it(replicated, which):
    """Replay the logged steps on one ImportanceSampler: each epoch's draw, split as
    DistributedSampler splits, must be what the ranks yielded, with the same weights, and
    the final scores must match bit for bit (each rank also checked the replicas after
    every step)."""
    from isample.distributed import _rank_length, _rank_positions

    config = REPLICATED_CONFIGS[which]
    world, drop_last = len(replicated), config.get("drop_last", False)
    logs = [r["runs"][which]["log"] for r in replicated]
    assert len(logs[0]) == len(logs[1]) >= 12
    reference = isample.ImportanceSampler(**_reference_options(config))
    steps = list(zip(*logs))
    for epoch in range(6):
        reference.set_epoch(epoch)
        order = torch.tensor(list(reference), dtype=torch.int64)
        for rank in range(world):
            entries = [entry for entry in logs[rank] if entry["epoch"] == epoch]
            items = [i for entry in entries for i in entry["items"]]
            expected = order[_rank_positions(len(order), world, rank, drop_last)].tolist()
            assert items == expected
            weights = [w for entry in entries for w in entry["weights"]]
            assert weights == reference.weights(items).tolist()
        # Together the ranks yield the whole draw (padded by its start, or cut with drop_last).
        union = sorted(
            i for rank in range(world) for entry in logs[rank] if entry["epoch"] == epoch for i in entry["items"]
        )
        total = _rank_length(len(order), world, drop_last) * world
        assert union == sorted((order.tolist() * 2)[:total])
        for step in (s for s in steps if s[0]["epoch"] == epoch):
            reference.update(sum((e["sent"] for e in step), []), sum((e["losses"] for e in step), []))
    for r in replicated:
        assert torch.equal(r["runs"][which]["scores"], reference.scores())
        assert r["runs"][which]["counters"] == reference.counters


def test_replicated_resume_from_rank0_checkpoint_is_exact(replicated):
    for r in replicated:
        full, head, tail = r["resume"]["full"], r["resume"]["head"], r["resume"]["tail"]
        assert len(head) == 13 and len(tail) > 10
        assert head + tail == full


def test_replicated_checkpoint_taken_on_two_ranks_resumes_on_one(replicated):
    from isample.distributed import DistributedImportanceSampler

    state = replicated[0]["state"]
    saved = state["sampler"]["current"]
    consumed = saved["position"]  # global items: 2 ranks x the items each had used
    assert 0 < consumed < len(saved["order"])
    sampler = DistributedImportanceSampler(**REPLICATED_CONFIGS[0])  # no process group: one rank
    sampler.load_state_dict(state)
    assert sampler.epoch == saved["epoch"]
    rest = list(iter(sampler))
    assert rest == saved["order"][consumed:].tolist()
    assert torch.equal(sampler.weights(rest), saved["weight_of"][rest])


def test_replicated_bad_input_raises_on_every_rank_and_changes_nothing(replicated):
    expected = {
        "nan_on_rank1": ("ValueError", "rank 1"),
        "index_out_of_range_on_rank0": ("IndexError", "rank 0"),
        "negative_index_on_rank1": ("IndexError", "rank 1"),
        "float_indices_on_rank1": ("TypeError", "rank 1"),
        "scalar_loss_on_rank0": ("ValueError", "reduction='none'"),
    }
    for r in replicated:
        for name, (kind, text) in expected.items():
            got_kind, message = r["bad"][name]
            assert got_kind == kind, (name, r["bad"][name])
            assert text in message and "refused on every rank" in message
        assert r["bad_unchanged"]
        assert r["bad_construction"]["different_seeds"][0] == "ValueError"
        assert "differ" in r["bad_construction"]["different_seeds"][1]
        assert r["bad_construction"]["bad_argument_on_rank1"][0] == "ValueError"
        assert "rank 1" in r["bad_construction"]["bad_argument_on_rank1"][1]
    assert torch.equal(replicated[0]["after_bad"], replicated[1]["after_bad"])


def test_a_rank_that_stops_calling_leaves_the_other_waiting_only_until_the_timeout(replicated):
    kind, message = replicated[0]["hang"]
    assert kind == "RuntimeError", (kind, message)
    assert SHORT_TIMEOUT_S * 0.8 < replicated[0]["hang_seconds"] < SHORT_TIMEOUT_S + 20


# -- sharded, two processes ---------------------------------------------------------------


def _softmax(scores: torch.Tensor) -> np.ndarray:
    return torch.softmax(scores, 0).numpy()


SCORES = 3.0 * (torch.arange(60, dtype=torch.float64) / 59) ** 2


@pytest.mark.statistical
def test_sharded_draws_follow_the_global_softmax(sharded):
    from conftest import ALPHA, chi_square_pvalue

    p = _softmax(SCORES)
    per_rank = [np.array(r["softmax"]["items"]) for r in sharded]
    assert [len(items) for items in per_rank] == [20_000, 20_000] == [r["softmax"]["len"] for r in sharded]
    union = np.concatenate(per_rank)
    assert chi_square_pvalue(np.bincount(union, minlength=60), p) > ALPHA
    for items in per_rank:  # each rank's part is itself a sample of the global p
        assert chi_square_pvalue(np.bincount(items, minlength=60), p) > ALPHA
    # Negative control: shards weighted equally (the softmax of each shard halved) is rejected.
    wrong = np.concatenate([_softmax(SCORES[:30]), _softmax(SCORES[30:])]) / 2
    assert chi_square_pvalue(np.bincount(union, minlength=60), wrong) < ALPHA


def test_sharded_weights_and_probabilities_are_global(sharded):
    p = torch.softmax(SCORES, 0)
    for r in sharded:
        items = torch.tensor(r["softmax"]["items"])
        torch.testing.assert_close(r["softmax"]["weights"], 1.0 / (60 * p[items]), rtol=1e-12, atol=0)
    glued = torch.cat([r["softmax"]["probabilities"] for r in sharded])
    torch.testing.assert_close(glued, p, rtol=1e-12, atol=0)
    assert [r["softmax"]["shard"] for r in sharded] == [(0, 30), (30, 60)]


@pytest.mark.statistical
def test_sharded_proportional_with_uniform_mix(sharded):
    from conftest import ALPHA, chi_square_pvalue

    w = SCORES.clamp(min=0) + 1e-6
    q = 0.8 * w / w.sum() + 0.2 / 60
    union = np.concatenate([np.array(r["proportional"]["items"]) for r in sharded])
    assert chi_square_pvalue(np.bincount(union, minlength=60), q.numpy()) > ALPHA
    assert chi_square_pvalue(np.bincount(union, minlength=60), (w / w.sum()).numpy()) < ALPHA  # no mixture
    raw = 1.0 / (60 * q[torch.from_numpy(union)])
    glued = torch.cat([r["proportional"]["weights"] for r in sharded])
    torch.testing.assert_close(glued, raw / raw.max(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([r["proportional"]["probabilities"] for r in sharded]), q, rtol=1e-12, atol=0)
    assert all(r["proportional"]["history"]["max_weight"] == 1.0 for r in sharded)


def test_sharded_warmup_covers_every_item_from_its_own_shard(sharded):
    parts = [r["warmup"]["items"] for r in sharded]
    assert len(parts[0]) == len(parts[1]) == 31  # 61 items: rank 1 owns 30 and pads one
    for part, r in zip(parts, sharded):
        start, end = r["warmup"]["shard"]
        assert all(start <= i < end for i in part)
    assert sorted(set(parts[0]) | set(parts[1])) == list(range(61))


def _check_overlapping_updates(results: List[Dict[str, Any]]) -> None:
    reference = isample.ImportanceSampler(60, score="running_loss", initial_score=1.0, seed=14)
    for step in zip(*(r["overlap"]["steps"] for r in results)):
        reference.update(sum((idx for idx, _ in step), []), sum((loss for _, loss in step), []))
    for r in results:
        assert torch.equal(r["overlap"]["scores"], reference.scores())
        assert r["overlap"]["counters"] == {"updates": 6, "nonfinite_skipped": 0, "nonfinite_clamped": 0}


def test_replicated_updates_apply_in_rank_order(replicated):
    _check_overlapping_updates(replicated)


def test_sharded_updates_reach_their_owner_in_rank_order(sharded):
    _check_overlapping_updates(sharded)


def test_sharded_resume_from_each_ranks_own_checkpoint_is_exact(sharded):
    for r in sharded:
        full, head, tail = r["resume"]["full"], r["resume"]["head"], r["resume"]["tail"]
        assert len(head) == 9 and len(tail) > 5
        assert head + tail == full
        kind, message = r["wrong_shard_load"]
        assert kind == "ValueError" and "its own state" in message


def test_sharded_bad_input_raises_on_every_rank_and_changes_nothing(sharded):
    expected = {
        "nan_on_rank0": ("ValueError", "rank 0"),
        "index_out_of_range_on_rank1": ("IndexError", "rank 1"),
        "policy_error_on_rank1": ("ValueError", "rank 1"),
    }
    for r in sharded:
        for name, (kind, text) in expected.items():
            assert r["bad"][name][0] == kind and text in r["bad"][name][1], (name, r["bad"][name])
        assert r["bad_unchanged"]
        assert r["unsupported"][0] == "ValueError" and "replacement" in r["unsupported"][1]
    assert torch.equal(sharded[0]["after_bad"], sharded[1]["after_bad"])


# -- one process ----------------------------------------------------------------------------

EQUIVALENCE_CONFIGS = [
    dict(score="running_loss", samples_per_epoch=70, warmup_epochs=1),
    dict(transform="proportional", uniform_mix=0.3, weight_exponent=0.5, normalize_weights="mean"),
    dict(transform=isample.Softmax(temperature=0.5), normalize_weights="max", samples_per_epoch=333),
]


def _single_process_log(sampler: Any, epochs: int = 4) -> List[Any]:
    log = []
    for epoch in range(epochs):
        items = list(sampler)
        log.append((items, sampler.weights(items).tolist(), len(items)))
        idx = torch.tensor(items[:40], dtype=torch.int64)
        sampler.update(idx, _loss(idx, epoch))
    log.append(sampler.scores().tolist())
    return log


@pytest.mark.parametrize("sharded_mode", [False, True])
@pytest.mark.parametrize("config", EQUIVALENCE_CONFIGS)
def test_world_size_one_is_importance_sampler(config, sharded_mode):
    from isample.distributed import DistributedImportanceSampler

    reference = _single_process_log(isample.ImportanceSampler(97, seed=4, **config))
    sampler = DistributedImportanceSampler(97, sharded=sharded_mode, seed=4, **config)
    assert sampler.num_replicas == 1 and sampler.rank == 0
    assert _single_process_log(sampler) == reference


def test_world_size_one_process_group_is_importance_sampler(tmp_path):
    import torch.distributed as dist
    from isample.distributed import DistributedImportanceSampler

    if dist.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        config = EQUIVALENCE_CONFIGS[0]
        reference = _single_process_log(isample.ImportanceSampler(97, seed=4, **config))
        for sharded_mode in (False, True):
            sampler = DistributedImportanceSampler(97, sharded=sharded_mode, seed=4, **config)
            assert sampler.num_replicas == 1
            assert _single_process_log(sampler) == reference
            sampler.check_consistency()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [1, 5, 16, 17, 23])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_parts_split_as_distributed_sampler_splits(world, length, drop_last):
    from isample.distributed import _rank_length, _rank_positions
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(world):
        reference = DistributedSampler(range(length), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        assert _rank_length(length, world, drop_last) == reference.num_samples
        assert _rank_positions(length, world, rank, drop_last).tolist() == list(reference)


def test_single_process_errors_and_state():
    from isample.distributed import DistributedImportanceSampler

    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedImportanceSampler(10, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="replacement"):
        DistributedImportanceSampler(10, sharded=True, replacement=False)
    with pytest.raises(ValueError, match="global ranks"):
        DistributedImportanceSampler(10, sharded=True, transform="rank")
    s = DistributedImportanceSampler(10, samples_per_epoch=6, seed=0)
    with pytest.raises(RuntimeError, match="iterate"):
        s.weights([0])
    it = iter(s)
    head = list(itertools.islice(it, 2))
    state = s.state_dict(consumed=2)
    rest = list(it)
    other = DistributedImportanceSampler(10, samples_per_epoch=6, seed=0)
    other.load_state_dict(state)
    assert head + list(iter(other)) == head + rest
    with pytest.raises(ValueError, match="different arguments"):
        DistributedImportanceSampler(10, samples_per_epoch=7, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="sharded"):
        DistributedImportanceSampler(10, samples_per_epoch=6, seed=0, sharded=True).load_state_dict(state)
    assert s.total_steps(3, 4) == 3 * 2 and s.steps_per_epoch(4) == 2


def test_progress_counts_what_this_rank_was_yielded():
    from isample.distributed import DistributedImportanceSampler

    for sharded in (False, True):
        s = DistributedImportanceSampler(10, samples_per_epoch=6, sharded=sharded, seed=0)
        assert s.progress is None
        it = iter(s)
        list(itertools.islice(it, 2))
        assert s.progress == (0, 2)
        list(it)
        assert s.progress == (0, 6)


# -- the experiment runner under torchrun (two processes, gloo) ----------------------------------

FASHION = Path("/usr/share/datasets/fashion-mnist")
TORCHRUN_TIMEOUT_S = 240  # one torchrun of the experiment runner, start-up and data loading included
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "summary.json"}


def _torchrun_train(out: Path, *extra: str) -> "subprocess.CompletedProcess[str]":
    """`torchrun --standalone --nproc_per_node 2 -m isample.cli train ...` (torchrun is
    torch.distributed.run; --standalone rendezvous on localhost picks a free port)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "isample.cli", "train", "--preset", "running_loss", "--dataset", "fashion-mnist",
        "--model", "small_cnn", "--train-subset", "1000", "--test-subset", "500", "--max-epochs", "1",
        "--no-augment", "--device", "cpu", "--out", str(out), *extra,
    ]
    env = dict(os.environ, ISAMPLE_DIST_TIMEOUT="60")
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s\n{error.stdout}\n{error.stderr}")


def _records(run: Path) -> List[Dict[str, Any]]:
    import json

    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("torchrun")
    started = time.monotonic()
    done = _torchrun_train(out)
    return out, done, time.monotonic() - started


def test_the_experiment_runner_under_torchrun_trains_and_rank0_writes_once(torchrun_run):
    import json

    out, done, _ = torchrun_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (run,) = out.iterdir()  # one run folder
    assert run.name == "fashion-mnist-sub1000-small_cnn-running_loss-z0.6-noaug-s0"
    assert {p.name for p in run.iterdir()} == RUN_FILES  # and no temporary files left behind
    (record,) = _records(run)
    assert record["epoch"] == 0 and record["test_accuracy"] > 0.2  # chance is 0.1
    assert record["samples"] == 600 and record["steps"] == 5  # the global draw of 600, global batches of 128
    assert (run / "metrics.csv").read_text().count("\n") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 2 and summary["backend"] == "gloo"
    from isample.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2 and len(state["history"]) == 1
    # only rank 0 prints
    assert done.stdout.count("run(s) in") == 1
    assert done.stdout.count("] epoch   0") == 1 and done.stdout.count("] done:") == 1


def test_the_experiment_runner_under_torchrun_resumes_exactly(torchrun_run, tmp_path):
    out, straight, _ = torchrun_run
    assert straight.returncode == 0
    (run,) = out.iterdir()
    stopped = _torchrun_train(tmp_path, "--max-wall-seconds", "0")  # stops after one step, checkpointed
    assert stopped.returncode != 0 and "rerun the same command to resume" in stopped.stdout
    resumed = _torchrun_train(tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resumed at epoch 0 on 2 processes, 128 items into it" in resumed.stdout
    assert _records(tmp_path / run.name) == _records(run)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
