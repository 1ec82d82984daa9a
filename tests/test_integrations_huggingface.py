"""isample.integrations.huggingface against a real transformers.Trainer: a 2-layer BERT built
from a config (no download), a few hundred synthetic examples, a handful of steps on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'isample[hf]'")
pytest.importorskip("accelerate", reason="accelerate (needed by transformers.Trainer) is not installed: pip install 'isample[hf]'")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

import isample  # noqa: E402
from isample.checkpoint import load_checkpoint  # noqa: E402
from isample.integrations.huggingface import SAMPLER_FILE, ImportanceTrainer, load_sampler_state, per_example_loss  # noqa: E402

N, BATCH, LENGTH, VOCAB, LR = 256, 32, 8, 64, 0.5

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*")


class Synthetic(Dataset):
    """Token sequences labelled by their first token: dicts of input_ids, attention_mask, labels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(1, VOCAB, (N, LENGTH), generator=g)
        self.labels = (self.input_ids[:, 0] > VOCAB // 2).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": self.labels[i]}


# ImportanceSampler's defaults before issue 24 (softmax, no uniform mixture, no warm-up): the
# helpers below keep them, so their first epoch is importance-sampled with the weights these tests check
OLD_DEFAULTS = {"transform": "softmax", "uniform_mix": 0.0, "warmup_epochs": 0}

def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def arguments(tmp_path, **kwargs) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        max_grad_norm=0.0, seed=0, dataloader_num_workers=0,
    )
    options.update(kwargs)
    return TrainingArguments(**options)


def sgd_trainer(model, args, dataset, **kwargs) -> ImportanceTrainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ImportanceTrainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, schedule), **kwargs)


def skewed_sampler(**kwargs) -> isample.ImportanceSampler:
    sampler = isample.ImportanceSampler(N, seed=3, **{**OLD_DEFAULTS, **kwargs})
    sampler.update(torch.arange(N), torch.linspace(0.0, 3.0, N))
    return sampler


def test_one_step_applies_the_draw_time_weights_and_updates_the_scores(tmp_path):
    data = Synthetic()
    sampler = skewed_sampler()
    scores = sampler.scores()
    twin = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=3)
    twin.load_state_dict(sampler.state_dict())
    first = torch.tensor(list(iter(twin))[:BATCH])

    model = tiny_bert()
    reference, unweighted = copy.deepcopy(model), copy.deepcopy(model)
    trainer = sgd_trainer(model, arguments(tmp_path, max_steps=1), isample.IndexedDataset(data), sampler=sampler)
    trainer.train()
    assert torch.equal(trainer.last_step["indices"].cpu(), first)

    weights = (1.0 / (N * torch.softmax(scores, 0)[first])).float()
    assert weights.std() > 0.1
    inputs = {"input_ids": data.input_ids[first], "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long)}
    for net, w in ((reference, weights), (unweighted, torch.ones(BATCH))):
        net.train()
        losses = F.cross_entropy(net(**inputs).logits, data.labels[first], reduction="none")
        (losses * w).mean().backward()
        with torch.no_grad():
            for param in net.parameters():
                if param.grad is not None:
                    param -= LR * param.grad
        if net is reference:
            reference_losses = losses.detach()

    trained, expected, other = (dict(m.named_parameters()) for m in (model, reference, unweighted))
    for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(trained["classifier.weight"], other["classifier.weight"], rtol=1e-3, atol=1e-5)
    new = sampler.scores()
    torch.testing.assert_close(new[first], reference_losses.double(), rtol=1e-5, atol=1e-6)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[first] = False
    assert torch.equal(new[untouched], scores[untouched])


def test_epochs_follow_the_trainer_and_evaluation_is_unweighted(tmp_path):
    data = isample.IndexedDataset(Synthetic())
    sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=1, seed=0)
    trainer = sgd_trainer(tiny_bert(), arguments(tmp_path, num_train_epochs=2), data, sampler=sampler)
    trainer.train()
    assert [h["epoch"] for h in sampler.history][:2] == [0, 1]
    assert [h["kind"] for h in sampler.history][:2] == ["warmup", "importance"]
    assert trainer.state.global_step == 2 * N // BATCH == sampler.counters["updates"]
    assert bool((sampler.scores() > 0).all())  # the warm-up epoch saw every example
    metrics = trainer.evaluate(eval_dataset=Synthetic())  # no index: evaluation does not need one
    assert metrics["eval_loss"] > 0


def test_checkpoint_part_way_through_an_epoch_resumes_it(tmp_path):
    data = isample.IndexedDataset(Synthetic())
    sampler = skewed_sampler()
    args = arguments(tmp_path, max_steps=5, save_strategy="steps", save_steps=3)
    sgd_trainer(tiny_bert(), args, data, sampler=sampler).train()
    order = sampler._current.order.clone()
    folder = tmp_path / "checkpoint-3"
    assert (folder / SAMPLER_FILE).is_file()

    resumed_sampler = isample.ImportanceSampler(N, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=3)
    seen = []
    resumed = sgd_trainer(tiny_bert(), arguments(tmp_path, max_steps=N // BATCH), data, sampler=resumed_sampler)
    original = resumed.compute_loss

    def recording(model, inputs, *a, **k):
        seen.append(inputs["index"].clone())
        return original(model, inputs, *a, **k)

    resumed.compute_loss = recording
    resumed.train(resume_from_checkpoint=str(folder))
    assert torch.equal(torch.cat(seen), order[3 * BATCH :])  # the rest of epoch 0, same order


def test_the_sampler_file_is_an_atomic_checked_checkpoint(tmp_path):
    data = isample.IndexedDataset(Synthetic())
    args = arguments(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    sgd_trainer(tiny_bert(), args, data, sampler=skewed_sampler()).train()
    path = tmp_path / "checkpoint-3" / SAMPLER_FILE
    state = load_checkpoint(path, expected_capacity=N)  # the library's format: checksum, capacity
    assert state["config"]["num_items"] == N
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    with pytest.raises(ValueError, match=f"{N} items, but {N + 1} were expected"):
        load_sampler_state(path, N + 1)
    other = isample.ImportanceSampler(N + 1, transform="softmax", uniform_mix=0.0, warmup_epochs=0, seed=3)
    before = other.scores()
    with pytest.raises(ValueError):  # a sampler of another size refuses it, unchanged
        other.load_state_dict(load_sampler_state(path, other.num_items))
    assert torch.equal(other.scores(), before)
    old = tmp_path / "plain.pt"  # written by earlier isample versions with torch.save: still read
    torch.save(state, old)
    assert load_sampler_state(old, N)["config"] == state["config"]
    torch.save({"weights": torch.zeros(2)}, old)
    with pytest.raises(ValueError, match="sampler state"):
        load_sampler_state(old, N)


def test_bad_input_gets_one_clear_error(tmp_path):
    args = arguments(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="IndexedDataset"):
        sgd_trainer(tiny_bert(), args, Synthetic(), sampler=skewed_sampler()).train()
    sampler = skewed_sampler()
    before = sampler.scores()
    mean_loss = lambda outputs, labels: F.cross_entropy(outputs.logits, labels)  # noqa: E731  (forgot reduction)
    with pytest.raises(ValueError, match="reduction='none'"):
        sgd_trainer(tiny_bert(), args, isample.IndexedDataset(Synthetic()), sampler=sampler, per_example_loss=mean_loss).train()
    assert torch.equal(sampler.scores(), before)
    with pytest.raises(ValueError, match="must match"):
        sgd_trainer(tiny_bert(), args, isample.IndexedDataset(Synthetic()), sampler=isample.ImportanceSampler(N + 1))


def test_the_trainer_exposes_its_sampler(tmp_path):
    args = arguments(tmp_path, max_steps=1)
    sampler = skewed_sampler()
    trainer = sgd_trainer(tiny_bert(), args, isample.IndexedDataset(Synthetic()), sampler=sampler)
    assert trainer.sampler is sampler and trainer.get_train_dataloader().batch_sampler.sampler is sampler
    with pytest.raises(AttributeError):
        trainer.sampler = isample.ImportanceSampler(N)  # read-only: the loader and checkpoints use the first
    default = sgd_trainer(tiny_bert(), args, isample.IndexedDataset(Synthetic()))
    assert isinstance(default.sampler, isample.ImportanceSampler) and default.sampler.num_items == N
    assert default.sampler._config() == isample.ImportanceSampler(N, seed=args.seed)._config()  # the library's defaults
    updates = sampler.counters["updates"]
    trainer.train()
    assert trainer.sampler.counters["updates"] == updates + 1
    assert trainer.sampler.weights(trainer.last_step["indices"]).shape == (BATCH,)


def test_per_example_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(per_example_loss({"logits": logits}, torch.tensor([0, 0])), F.cross_entropy(logits, torch.tensor([0, 0]), reduction="none"))
    tokens = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    expected = torch.stack([
        (F.cross_entropy(tokens[0, [0]], labels[0, [0]]) + F.cross_entropy(tokens[0, [2]], labels[0, [2]])) / 2,
        F.cross_entropy(tokens[1, [2]], labels[1, [2]]),
    ])
    torch.testing.assert_close(per_example_loss((tokens,), labels), expected)
    shifted = per_example_loss((tokens,), labels, shift=True)  # token t predicts label t + 1
    torch.testing.assert_close(shifted[0], F.cross_entropy(tokens[0, [1]], labels[0, [2]]))
    torch.testing.assert_close(per_example_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([0.5, 4.0])), torch.tensor([0.25, 4.0]))
    with pytest.raises(ValueError, match="per_example_loss"):
        per_example_loss(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no labels"):
        per_example_loss(logits, None)
