"""isample.scoring over torch.distributed: 3 real gloo processes on the CPU, 2 trainers and 1 scorer.

Why 2 + 1 rather than 1 + 2: the trainer side is where the distributed mode differs from one
machine. With two trainers the run exercises DDP on the trainers' own group, the distributed
sampler's exchange that keeps both replicas identical (the lead applies, the other rank
contributes nothing), the 8-byte error agreement and the collective ``stats``. A second
scorer would only repeat the scorer loop on other chunks (chunks are split between scorers
by the same ``ChunkPlan`` that the one-machine tests cover with two workers).

The test starts this file as a script three times (``python test_scoring_distributed.py
RANK WORLD STORE OUT``). The ranks train a small CNN on 512 Fashion-MNIST images until every
item has been scored, stop training and keep stepping until every score comes from the final
parameters, then save what they saw; a second pool, whose score raises on the scorer, checks
that every trainer raises ScorerError at the same step and that the job still shuts down.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F
from conftest import run_processes

RUN_TIMEOUT_S = 240  # the whole three-process run, start-up included
PG_TIMEOUT_S = 60
ITEMS, BATCH, CHUNK, PUBLISH_EVERY, LAM = 512, 16, 64, 4, 0.1


def _data():
    from torch.utils.data import TensorDataset

    from isample.experiments.data import load_dataset

    data = load_dataset("fashion-mnist")
    x = data.train_images[:ITEMS].float().div(255.0)
    return TensorDataset(x, data.train_labels[:ITEMS].clone())


def _model():
    from isample.experiments.models import small_cnn

    torch.manual_seed(0)
    return small_cnn()


def _explode(model, x, y):
    """A score that fails on the scorer rank (module level: it travels by pickling)."""
    raise ValueError("the scorer's score function exploded on purpose")


def _trainer(ranks, out: Path) -> Dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from isample.distributed import DistributedImportanceSampler
    from isample.scoring import ScorerError, ScorerPool

    data = _data()
    model = _model()
    ddp = DDP(model, process_group=ranks.trainers)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    sampler = DistributedImportanceSampler(
        ITEMS, warmup_epochs=0, group=ranks.trainers, transform="proportional", uniform_mix=LAM, samples_per_epoch=128, seed=3
    )
    results: Dict[str, Any] = {"rank": ranks.rank}
    x_all, y_all = data.tensors
    with ScorerPool(sampler, ddp, data, batch_size=CHUNK, publish_every=PUBLISH_EVERY, ranks=ranks) as pool:
        epoch, trained_steps = 0, 0
        deadline = time.monotonic() + 120
        while True:  # train until every item has a score (stats() is a collective: lockstep)
            sampler.set_epoch(epoch)
            order = list(sampler)
            for k in range(0, len(order), BATCH):
                index = torch.tensor(order[k : k + BATCH])
                losses = F.cross_entropy(ddp(x_all[index]), y_all[index], reduction="none")
                loss = (losses * sampler.weights(index).to(losses)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                pool.step(ddp)
                trained_steps += 1
            epoch += 1
            stats = pool.stats()
            if stats["coverage"] == 1.0 or time.monotonic() > deadline:
                break
        results["trained"] = {"steps": trained_steps, "epochs": epoch, "stats": stats}
        # No more optimizer steps: the first publish from now on carries the final parameters.
        final = (pool.steps // PUBLISH_EVERY + 1) * PUBLISH_EVERY
        while True:
            for _ in range(PUBLISH_EVERY):
                pool.step(ddp)
                time.sleep(0.002)
            stats = pool.stats()
            if stats["staleness"]["max"] <= pool.steps - final or time.monotonic() > deadline + 60:
                break
        results["final_version"] = final
        results["stats"] = stats
        if hasattr(sampler, "flush"):  # a sampler that exchanges once per epoch: exchange now
            sampler.flush()
        results["scores"] = sampler.scores().clone()
        results["probabilities"] = sampler.probabilities().clone()
        results["versions"] = pool.item_versions().clone()
    model.eval()
    with torch.no_grad():
        results["local_grad_norm"] = torch.cat(
            [torch.linalg.vector_norm(torch.softmax(model(x_all[s : s + CHUNK]).double(), 1)
                                      - F.one_hot(y_all[s : s + CHUNK], 10).double(), dim=1)
             for s in range(0, ITEMS, CHUNK)]
        )
    # A second pool whose score raises on the scorer: every trainer raises at the same step.
    pool = ScorerPool(sampler, ddp, data, score=_explode, batch_size=CHUNK, publish_every=PUBLISH_EVERY, ranks=ranks)
    raised, steps = None, 0
    with pool:
        while raised is None and steps < 20_000:
            try:
                pool.step(ddp)
            except ScorerError as error:
                raised = str(error)
            steps += 1
            time.sleep(0.001)
    results["error"] = {"message": raised, "step": steps}
    return results


def _scorer(ranks, out: Path) -> Dict[str, Any]:
    data = _data()
    first = ranks.serve(_model(), data)
    second = ranks.serve(_model(), data)
    return {"rank": ranks.rank, "first": first, "second": second}


def _main(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from isample.scoring import ScorerRanks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    ranks = ScorerRanks.split(scorers=1)
    results = _scorer(ranks, Path(out)) if ranks.is_scorer else _trainer(ranks, Path(out))
    results["roles"] = {"trainers": ranks.trainer_ranks, "scorers": ranks.scorer_ranks, "lead": ranks.lead}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Test side.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> List[Dict[str, Any]]:
    out = tmp_path_factory.mktemp("scoring_ranks")
    world = 3
    run_processes("3-process scoring", [[__file__, str(r), str(world), str(out / "store"), str(out)] for r in range(world)],
                  RUN_TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_roles_last_rank_scores(run):
    for r in run:
        assert r["roles"] == {"trainers": [0, 1], "scorers": [2], "lead": 0}


def test_every_item_scored_by_the_scorer_rank_with_the_final_parameters(run):
    lead, other, scorer = run
    assert lead["trained"]["steps"] > 0
    assert lead["stats"]["coverage"] == 1.0
    assert (lead["versions"] >= lead["final_version"]).all()  # later publishes hold the same parameters
    # the scores the scorer rank sent are the bound computed here with the final model
    torch.testing.assert_close(lead["scores"], lead["local_grad_norm"], rtol=1e-6, atol=1e-9)
    assert scorer["first"]["error"] is None and scorer["first"]["items"] >= ITEMS
    assert scorer["first"]["versions"] == sorted(scorer["first"]["versions"])
    assert max(scorer["first"]["versions"]) >= lead["final_version"]


def test_both_trainer_replicas_hold_the_same_scores_and_probabilities(run):
    lead, other, _ = run
    assert torch.equal(lead["scores"], other["scores"])
    assert torch.equal(lead["probabilities"], other["probabilities"])
    # proportional with a uniform mixture, exactly: p = (1 - lam) (s + eps) / sum + lam / N
    s = lead["scores"] + 1e-6
    expected = (1 - LAM) * s / s.sum() + LAM / ITEMS
    torch.testing.assert_close(lead["probabilities"], expected, rtol=1e-12, atol=0)
    uniform = torch.full_like(expected, 1.0 / ITEMS)  # negative control: the scores did move p
    assert not torch.allclose(lead["probabilities"], uniform, rtol=1e-3, atol=0)


def test_stats_are_the_leads_on_every_trainer(run):
    lead, other, _ = run
    assert lead["stats"] == other["stats"]
    stats = lead["stats"]
    assert stats["workers"] == 1 and stats["workers_alive"] == 1 and stats["rejected"] == 0
    assert stats["staleness"]["max"] <= stats["steps"] - lead["final_version"]
    assert stats["staleness"]["median"] <= stats["staleness"]["max"]
    assert stats["items_per_second"] > 0 and stats["published"] >= stats["steps"] // PUBLISH_EVERY - stats["publishes_skipped"]


def test_a_scorer_error_raises_on_every_trainer_at_the_same_step(run):
    lead, other, scorer = run
    for r in (lead, other):
        assert r["error"]["message"] is not None
        assert "exploded on purpose" in r["error"]["message"] and "Traceback" in r["error"]["message"]
    assert lead["error"]["step"] == other["error"]["step"]
    assert scorer["second"]["error"] is not None and scorer["second"]["chunks"] == 0


def test_split_and_the_pool_refuse_what_cannot_work(tmp_path):
    import torch.distributed as dist

    import isample
    from isample.scoring import ScorerPool, ScorerRanks

    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ScorerRanks.split(scorers=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"scorers must be an int in \[1, 0\]"):
            ScorerRanks.split(scorers=1)  # one process: nobody would train
    finally:
        dist.destroy_process_group()
    sampler = isample.ImportanceSampler(8, uniform_mix=0.0, warmup_epochs=0, transform="proportional")
    data = torch.utils.data.TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="ScorerRanks"):
        ScorerPool(sampler, model, data, ranks="the last rank")
    scorer_side = ScorerRanks(1, [0], [1], None, None, None, None)  # as rank 1 of 2 would see it
    with pytest.raises(RuntimeError, match="rank 1 is a scorer"):
        ScorerPool(sampler, model, data, ranks=scorer_side)
    with pytest.raises(ValueError, match="leave workers at 1"):
        ScorerPool(sampler, model, data, workers=2, ranks=ScorerRanks(0, [0], [1], None, None, None, None))
    with pytest.raises(RuntimeError, match="serve\\(\\) runs on the scorer ranks"):
        ScorerRanks(0, [0], [1], None, None, None, None).serve(model, data)


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
