"""isample.integrations.lightning against a real lightning.Trainer on the CPU (tiny model, few steps)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning", reason="PyTorch Lightning is not installed: pip install 'isample[lightning]'")

import lightning.pytorch as pl  # noqa: E402

import isample  # noqa: E402
from isample.integrations.lightning import ImportanceSamplingCallback, weighted_loss  # noqa: E402

N, BATCH, DIM = 256, 32, 8

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`.*"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended.*"),
]


# ImportanceSampler's defaults before issue 24 (softmax, no uniform mixture, no warm-up): the
# helpers below keep them, so their first epoch is importance-sampled with the weights these tests check
OLD_DEFAULTS = {"transform": "softmax", "uniform_mix": 0.0, "warmup_epochs": 0}

def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class Tiny(pl.LightningModule):
    """A linear classifier whose training_step follows the protocol; `mode` breaks it on purpose."""

    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(DIM, 2)
        self.mode = mode
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        if self.mode == "no_index":
            x, y = batch
            return F.cross_entropy(self.net(x), y)
        index, x, y = batch
        self.seen.append(index.clone())
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        if self.mode == "scalar":
            return weighted_loss(self, index, losses.mean())
        if self.mode == "plain":
            return losses.mean()  # forgets isample
        if self.mode == "vector":
            return losses  # per-example losses straight to backward
        return weighted_loss(self, index, losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def trainer(callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def loader(sampler, dataset=None) -> DataLoader:
    return DataLoader(isample.IndexedDataset(data()) if dataset is None else dataset, batch_size=BATCH, sampler=sampler)


def skewed_sampler(**kwargs) -> isample.ImportanceSampler:
    """A sampler whose first epoch is importance-sampled from unequal scores, so weights != 1."""
    sampler = isample.ImportanceSampler(N, seed=3, **{**OLD_DEFAULTS, **kwargs})
    sampler.update(torch.arange(N), torch.linspace(0.0, 3.0, N))
    return sampler


def test_one_step_applies_the_draw_time_weights_and_updates_the_scores():
    sampler = skewed_sampler()
    scores = sampler.scores()
    twin = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=3)
    twin.load_state_dict(sampler.state_dict())
    first = torch.tensor(list(iter(twin))[:BATCH])  # the batch the Trainer will see

    model = Tiny()
    reference = copy.deepcopy(model.net)
    trainer([ImportanceSamplingCallback(sampler)], max_steps=1).fit(model, loader(sampler))

    # the same SGD step by hand, with weights 1 / (N p) from the scores the epoch was drawn with
    x, y = data().tensors
    p = torch.softmax(scores, 0)[first]
    weights = (1.0 / (N * p)).float()
    losses = F.cross_entropy(reference(x[first]), y[first], reduction="none")
    assert weights.std() > 0.1  # the check below could not tell weighted from unweighted otherwise
    unweighted = copy.deepcopy(reference)
    (losses * weights).mean().backward()
    with torch.no_grad():
        for param in reference.parameters():
            param -= 0.5 * param.grad
    F.cross_entropy(unweighted(x[first]), y[first]).backward()
    with torch.no_grad():
        for param in unweighted.parameters():
            param -= 0.5 * param.grad

    torch.testing.assert_close(model.net.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.net.bias, reference.bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.net.weight, unweighted.weight, rtol=1e-4, atol=1e-5)
    # last-loss scores of the batch are its losses, the rest unchanged
    new = sampler.scores()
    torch.testing.assert_close(new[first], losses.detach().double(), rtol=1e-5, atol=1e-6)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[first] = False
    assert torch.equal(new[untouched], scores[untouched])


def test_epochs_follow_the_trainer_and_their_lengths_change():
    # epoch 0: uniform warm-up over all N; then importance epochs of N / 2 draws
    sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=1, samples_per_epoch=N // 2, seed=0)
    callback = ImportanceSamplingCallback(sampler, log_weights=True)
    model = Tiny()
    fit = trainer([callback], max_epochs=3)
    fit.fit(model, loader(sampler))
    # (len() after the last epoch drew epoch 3 ahead, as it does at every epoch's end)
    assert [h["epoch"] for h in sampler.history][:3] == [0, 1, 2]
    assert [h["kind"] for h in sampler.history][:3] == ["warmup", "importance", "importance"]
    steps = N // BATCH + 2 * (N // 2 // BATCH)
    assert fit.global_step == steps == sampler.counters["updates"]
    # the warm-up epoch visited every item once, so every score is now a (positive) loss
    assert torch.unique(torch.cat(model.seen[: N // BATCH])).numel() == N
    assert bool((sampler.scores() > 0).all())
    assert sampler.history[1]["max_weight"] > sampler.history[1]["min_weight"]
    # the last batch's weights were logged
    assert 0 < float(fit.callback_metrics["isample/weight_mean"]) <= float(fit.callback_metrics["isample/weight_max"])


def test_an_epoch_longer_than_lightning_counted_asks_for_reloading():
    sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=1, samples_per_epoch=2 * N, seed=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer([ImportanceSamplingCallback(sampler)], max_epochs=2).fit(Tiny(), loader(sampler))
    sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=1, samples_per_epoch=2 * N, seed=0)
    fit = trainer([ImportanceSamplingCallback(sampler)], max_epochs=2, reload_dataloaders_every_n_epochs=1)
    fit.fit(Tiny(), loader(sampler))
    assert fit.global_step == N // BATCH + 2 * N // BATCH


def test_checkpoint_part_way_through_an_epoch_resumes_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    sampler = skewed_sampler()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first = Tiny()
    trainer([ImportanceSamplingCallback(sampler), saver], max_steps=5, enable_checkpointing=True).fit(
        first, loader(sampler)
    )
    order = sampler._current.order.clone()
    assert torch.equal(torch.cat(first.seen), order[: 5 * BATCH])
    (path,) = tmp_path.glob("*step=3*.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("ImportanceSamplingCallback")]
    assert state["sampler"]["current"]["position"] == 3 * BATCH  # what was trained on, not prefetched

    resumed_sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=3)
    resumed = Tiny()
    fit = trainer([ImportanceSamplingCallback(resumed_sampler)], max_epochs=1)
    fit.fit(resumed, loader(resumed_sampler), ckpt_path=path)
    # the rest of epoch 0 in the same order, then the end of the fit
    assert torch.equal(torch.cat(resumed.seen), order[3 * BATCH :])
    assert fit.global_step == N // BATCH
    with pytest.raises(ValueError, match="configured differently"):
        ImportanceSamplingCallback(isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=4)).load_state_dict(state)


@pytest.mark.parametrize(
    "mode, error, match",
    [
        ("scalar", ValueError, "reduction='none'"),
        ("plain", RuntimeError, "did not hand the batch's per-example losses"),
        ("vector", ValueError, "returned a loss of shape"),
    ],
)
def test_a_training_step_that_breaks_the_protocol_gets_one_clear_error(mode, error, match):
    sampler = skewed_sampler()
    before = sampler.scores()
    with pytest.raises(error, match=match):
        trainer([ImportanceSamplingCallback(sampler)], max_steps=2).fit(Tiny(mode), loader(sampler))
    if mode == "scalar":
        assert torch.equal(sampler.scores(), before)  # the rejected call changed nothing


def test_a_dataset_without_indices_or_another_sampler_is_refused_before_training():
    sampler = skewed_sampler()
    with pytest.raises(ValueError, match="IndexedDataset"):
        trainer([ImportanceSamplingCallback(sampler)], max_steps=1).fit(Tiny("no_index"), loader(sampler, data()))
    shuffled = DataLoader(isample.IndexedDataset(data()), batch_size=BATCH, shuffle=True)
    with pytest.raises(ValueError, match="does not draw from the callback's sampler"):
        trainer([ImportanceSamplingCallback(sampler)], max_steps=1).fit(Tiny(), shuffled)
    with pytest.raises(RuntimeError, match="one ImportanceSamplingCallback"):
        trainer([], max_steps=1).fit(Tiny(), loader(sampler))
    with pytest.raises(TypeError, match="EpochSampler"):
        ImportanceSamplingCallback(torch.utils.data.RandomSampler(range(4)))


def test_lightnings_default_use_distributed_sampler_is_refused_on_one_device_too():
    """The docs say the callback raises when use_distributed_sampler is left at True: it does,
    before the first step, also where Lightning would (for now) keep the sampler."""
    sampler = skewed_sampler()
    before = sampler.scores()
    model = Tiny()
    fit = trainer([ImportanceSamplingCallback(sampler)], max_steps=2, use_distributed_sampler=True)
    with pytest.raises(ValueError, match=r"use_distributed_sampler=True.*Trainer\(use_distributed_sampler=False\)"):
        fit.fit(model, loader(sampler))
    assert fit.global_step == 0 and model.seen == [] and torch.equal(sampler.scores(), before)
    # check_dataset=False turns the start-of-training checks off, this one included
    fit = trainer([ImportanceSamplingCallback(sampler, check_dataset=False)], max_steps=2, use_distributed_sampler=True)
    fit.fit(Tiny(), loader(sampler))
    assert fit.global_step == 2


def test_the_two_weighted_loss_functions_say_which_one_a_mixed_up_call_wanted():
    from isample.integrations import protocol

    sampler = skewed_sampler()
    index, losses = torch.tensor(list(iter(sampler))[:4]), torch.ones(4, requires_grad=True)
    before = sampler.scores()
    with pytest.raises(TypeError, match=r"lightning\.weighted_loss\(self, index, losses\)"):
        protocol.weighted_loss(Tiny(), index, losses)  # the module where the sampler goes
    with pytest.raises(TypeError, match=r"protocol\.weighted_loss\(sampler, index, losses\)"):
        weighted_loss(sampler, index, losses)  # the sampler where the module goes
    with pytest.raises(TypeError, match="got str"):
        weighted_loss("self", index, losses)
    with pytest.raises(TypeError, match="got int"):
        protocol.weighted_loss(3, index, losses)
    assert torch.equal(sampler.scores(), before)
    protocol.weighted_loss(sampler, index, losses).backward()  # each with its own argument works
    assert not torch.equal(sampler.scores(), before)


# ---------------------------------------------------------------------------------------------
# DDP: the distributed sampler with the callback (one process in-process, two under torchrun).
# ---------------------------------------------------------------------------------------------

DDP_TIMEOUT_S = 120  # the two-process run, start-up included


@pytest.fixture
def one_process_group(tmp_path):
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_callback_takes_the_distributed_sampler_and_lightning_keeps_it(one_process_group):
    from isample.distributed import DistributedImportanceSampler

    sampler = DistributedImportanceSampler(N, transform="softmax", uniform_mix=0.0, samples_per_epoch=N // 2, warmup_epochs=1, seed=0)
    assert sampler.progress is None
    callback = ImportanceSamplingCallback(sampler)
    model = Tiny()
    fit = trainer([callback], max_epochs=2, strategy="ddp")  # DDP on one process: Lightning would wrap samplers
    fit.fit(model, loader(sampler))
    assert fit.train_dataloader.sampler is sampler  # use_distributed_sampler=False kept it
    sampler.flush()  # the last epoch's updates wait for the next draw (exchange="epoch")
    assert fit.global_step == N // BATCH + N // 2 // BATCH == sampler.counters["updates"]
    assert [h["kind"] for h in sampler.history][:2] == ["warmup", "importance"]
    assert torch.unique(torch.cat(model.seen[: N // BATCH])).numel() == N
    assert sampler.progress == (1, N // 2)
    # use_distributed_sampler=True would replace it: the callback says so before training
    other = DistributedImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=0)
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        trainer([ImportanceSamplingCallback(other)], max_steps=1, strategy="ddp", use_distributed_sampler=True).fit(
            Tiny(), loader(other)
        )


def test_the_callback_refuses_a_sharded_sampler():
    from isample.distributed import DistributedImportanceSampler

    with pytest.raises(ValueError, match="sharded=False"):
        ImportanceSamplingCallback(DistributedImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, sharded=True))
    ImportanceSamplingCallback(DistributedImportanceSampler(10, transform="softmax", uniform_mix=0.0, warmup_epochs=0))  # no process group: one process


def _ddp_worker(out: str) -> None:
    """One rank of a two-process Lightning DDP fit on the CPU (started by torchrun)."""
    import datetime

    import torch.distributed as dist

    from isample.distributed import DistributedImportanceSampler

    torch.set_num_threads(1)
    # The sampler needs the process group when it is built; Lightning reuses this one.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    def build():
        return DistributedImportanceSampler(N, transform="softmax", uniform_mix=0.0, samples_per_epoch=N // 2, warmup_epochs=1, seed=0)

    sampler = build()
    callback = ImportanceSamplingCallback(sampler)
    model = Tiny()
    # 4 warm-up steps (N / 2 ranks / BATCH), then 1 of the importance epoch's 2
    fit = trainer([callback], max_steps=5, strategy="ddp", devices=2)
    fit.fit(model, loader(sampler))
    # a checkpoint part-way through epoch 1, written by Lightning from rank 0: the callback
    # flushes every rank's recorded updates first, so it holds both ranks' (exchange="epoch")
    fit.save_checkpoint(f"{out}/part-way.ckpt")
    dist.barrier()
    state = torch.load(f"{out}/part-way.ckpt", weights_only=False)["callbacks"][callback.state_key]
    sampler.check_consistency()  # replicas bit-identical
    shard = sampler._engine.local.current_epoch.order[rank::2].tolist()  # this rank's part of epoch 1
    # resume from rank 0's state on every rank, as Lightning does with its rank-0 checkpoint
    box = [state if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    resumed = build()
    ImportanceSamplingCallback(resumed).load_state_dict(box[0])
    rest = list(iter(resumed))
    torch.save(
        {
            "kept": fit.train_dataloader.sampler is sampler,
            "global_step": fit.global_step,
            "updates": sampler.counters["updates"],
            "kinds": [h["kind"] for h in sampler.history],
            "seen": [t.tolist() for t in model.seen],
            "scores": sampler.scores(),
            "state": state,
            "shard": shard,
            "rest": rest,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_lightning_ddp_keeps_one_global_distribution(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "ddp-worker", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the two-process fit did not finish within {DDP_TIMEOUT_S} s\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    warmup = N // 2 // BATCH
    for r in ranks:
        assert r["kept"]  # Lightning kept our sampler
        assert r["global_step"] == 5 == r["updates"]
        assert r["kinds"] == ["warmup", "importance"]
        assert r["state"]["consumed"] == BATCH  # one step of epoch 1 trained on, whatever was prefetched
        assert r["state"]["sampler"]["sampler"]["current"]["position"] == 2 * BATCH  # counted over both ranks
        assert r["rest"] == r["shard"][BATCH:]  # a resume continues this rank's part of the epoch
    # warm-up: disjoint halves of the data set, together every item once
    halves = [sum(r["seen"][:warmup], []) for r in ranks]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == list(range(N))
    # each rank's losses reached both replicas: every score is set, the same on both ranks
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"]) and bool((ranks[0]["scores"] > 0).all())
    # epoch 1: each rank trained on its own part of one global draw
    assert [r["seen"][warmup] for r in ranks] == [r["shard"][:BATCH] for r in ranks]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp-worker":
    _ddp_worker(sys.argv[2])
