"""isample.integrations.lightning against a real lightning.Trainer on the CPU (tiny model, few steps)."""

from __future__ import annotations

import copy

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
    sampler = isample.ImportanceSampler(N, seed=3, **kwargs)
    sampler.update(torch.arange(N), torch.linspace(0.0, 3.0, N))
    return sampler


def test_one_step_applies_the_draw_time_weights_and_updates_the_scores():
    sampler = skewed_sampler()
    scores = sampler.scores()
    twin = isample.ImportanceSampler(N, seed=3)
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
    sampler = isample.ImportanceSampler(N, warmup_epochs=1, samples_per_epoch=N // 2, seed=0)
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
    sampler = isample.ImportanceSampler(N, warmup_epochs=1, samples_per_epoch=2 * N, seed=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer([ImportanceSamplingCallback(sampler)], max_epochs=2).fit(Tiny(), loader(sampler))
    sampler = isample.ImportanceSampler(N, warmup_epochs=1, samples_per_epoch=2 * N, seed=0)
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

    resumed_sampler = isample.ImportanceSampler(N, seed=3)
    resumed = Tiny()
    fit = trainer([ImportanceSamplingCallback(resumed_sampler)], max_epochs=1)
    fit.fit(resumed, loader(resumed_sampler), ckpt_path=path)
    # the rest of epoch 0 in the same order, then the end of the fit
    assert torch.equal(torch.cat(resumed.seen), order[3 * BATCH :])
    assert fit.global_step == N // BATCH
    with pytest.raises(ValueError, match="configured differently"):
        ImportanceSamplingCallback(isample.ImportanceSampler(N, seed=4)).load_state_dict(state)


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
