"""Per-step cost of isample's adapters against the same training loop without isample (CPU).

Run:    python -m pytest benchmarks/test_adapter_benchmark.py --benchmark-only \
            --benchmark-json=benchmarks/results/adapters.json
Table:  python benchmarks/test_adapter_benchmark.py benchmarks/results/adapters.json

The development machine has 2 cores shared with other work, so its speed drifts by 2x within
minutes. Each test therefore runs its variants *interleaved* (A B B A A B ...) and reports,
per variant, the median time of one step and, as the overhead, the median of the paired
differences (isample minus the baseline run next to it), which drift cancels out of. These
figures live in each benchmark's ``extra_info``; pytest-benchmark's own timing is of the
whole interleaved run. Torch runs on one thread so both variants do the same work.

Groups (each with a ``without_isample`` baseline: cpprb in the replay groups):

- plain step: forward, loss, backward, SGD step of an MLP on a batch of 128; with isample the
  losses go through ``protocol.weighted_loss`` (or the four calls written out);
- DataLoader: one batch of 128, RandomSampler over a TensorDataset against ImportanceSampler
  over IndexedDataset (timed by epochs of 64 batches);
- Hugging Face: ``Trainer.training_step`` (forward, loss, backward) on one batch, the
  ``Trainer`` against ``ImportanceTrainer``; the DataLoader's share is the group above;
- Lightning: a whole ``fit`` of 256 steps (its loop, set-up excluded) with and without the
  callback, DataLoader included;
- replay: each call alone (add one transition, sample 64, update_priorities 64) in a full
  buffer of 50k, against cpprb (the baseline there); ``benchmarks/replay_dqn.py`` measures
  the same calls inside a real DQN loop;
- replay step: issue 18's cell, sample 128 and update their priorities in a buffer of 100k
  CartPole transitions, against cpprb (the baseline) and TorchRL's PrioritizedReplayBuffer.

Every benchmark's extra_info also records the CPU (lscpu: model, caches) and the versions of
numpy, torch, isample and the peers (``isample.bench.machine.machine_summary``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import isample
from isample.bench.machine import machine_summary
from isample.integrations.protocol import weighted_loss

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

N, BATCH, DIM, CLASSES = 8192, 128, 64, 10
BASELINE = "without_isample"


@pytest.fixture(autouse=True)
def _machine(benchmark):
    benchmark.extra_info.update(machine_summary())


def interleaved(benchmark, fns: Dict[str, Callable[[], object]], pairs: int, *, steps: int = 1, warmup: int = 3) -> None:
    """Time each function `pairs` times, alternating their order, and store per-step medians
    and the median paired overhead against BASELINE in ``benchmark.extra_info``."""
    names = list(fns)
    seconds: Dict[str, list] = {name: [] for name in names}

    def run() -> None:
        for name in names:
            for _ in range(warmup):
                fns[name]()
        for i in range(pairs):
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                fns[name]()
                seconds[name].append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["steps"] = steps
    benchmark.extra_info["pairs"] = pairs
    benchmark.extra_info["median_us_per_step"] = {n: statistics.median(s) / steps * 1e6 for n, s in seconds.items()}
    benchmark.extra_info["overhead_us_per_step"] = {
        n: statistics.median(b - a for a, b in zip(seconds[BASELINE], s)) / steps * 1e6
        for n, s in seconds.items()
        if n != BASELINE
    }


def mlp(hidden: int = 256, depth: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(DIM, hidden), torch.nn.ReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, CLASSES))


def tensors() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    return x, x[:, :CLASSES].argmax(1)


def drawn_sampler() -> isample.ImportanceSampler:
    """A sampler with unequal scores and its epoch 0 drawn (so weights() answers)."""
    sampler = isample.ImportanceSampler(N, seed=0)
    sampler.update(torch.arange(N), torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    iter(sampler)
    return sampler


# -- the plain loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden, depth, pairs", [(256, 1, 1500), (1024, 2, 150)])
def test_plain_step(benchmark, hidden, depth, pairs):
    shape = "-".join(map(str, [DIM] + [hidden] * depth + [CLASSES]))
    benchmark.group = f"plain step: MLP {shape}, batch {BATCH}, forward + backward + SGD"
    model = mlp(hidden, depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = tensors()
    sampler = drawn_sampler()
    index = sampler._current.order[:BATCH].clone()
    xb, yb = x[index], y[index]

    def plain():
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def protocol():
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        loss = weighted_loss(sampler, index, losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def four_calls():
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        weights = sampler.weights(index, dtype=losses.dtype)
        sampler.update(index, losses.detach())
        loss = (losses * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    interleaved(benchmark, {BASELINE: plain, "isample": protocol, "isample (four calls written out)": four_calls}, pairs)


def test_dataloader_batch(benchmark):
    benchmark.group = f"DataLoader: a batch of {BATCH}"
    x, y = tensors()
    plain = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    indexed = DataLoader(isample.IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, shuffle=True)
    sampler = drawn_sampler()
    ours = DataLoader(isample.IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, sampler=sampler)

    def epoch(loader):
        return lambda: [None for _ in loader]

    interleaved(
        benchmark,
        {BASELINE: epoch(plain), "isample": epoch(ours), "isample (IndexedDataset only)": epoch(indexed)},
        pairs=15,
        steps=N // BATCH,
        warmup=1,
    )


# -- Hugging Face: one training_step ------------------------------------------------------------

HF_LENGTH, HF_VOCAB, HF_BATCH = 16, 128, 32


def test_huggingface_training_step(benchmark, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from isample.integrations.huggingface import ImportanceTrainer

    benchmark.group = f"Hugging Face training_step: BERT 2 x 32, seq {HF_LENGTH}, batch {HF_BATCH}"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, HF_VOCAB, (N, HF_LENGTH), generator=g)
    labels = (ids[:, 0] > HF_VOCAB // 2).long()

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    config = transformers.BertConfig(
        vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=HF_LENGTH, num_labels=2,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=HF_BATCH, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    torch.manual_seed(0)
    plain = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args, train_dataset=Data())
    torch.manual_seed(0)
    sampler = drawn_sampler()
    ours = ImportanceTrainer(
        model=transformers.BertForSequenceClassification(config), args=args,
        train_dataset=isample.IndexedDataset(Data()), sampler=sampler,
    )
    for trainer in (plain, ours):
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    index = sampler._current.order[:HF_BATCH].clone()
    batch = {"input_ids": ids[index], "labels": labels[index]}
    indexed_batch = {**batch, "index": index}

    interleaved(
        benchmark,
        {BASELINE: lambda: plain.training_step(plain.model, dict(batch)),
         "isample": lambda: ours.training_step(ours.model, dict(indexed_batch))},
        pairs=300,
    )


# -- Lightning: whole fits ---------------------------------------------------------------------

FIT_STEPS = 256


def test_lightning_fit(benchmark):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    import logging

    from isample.integrations.lightning import ImportanceSamplingCallback
    from isample.integrations.lightning import weighted_loss as lightning_weighted_loss

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    benchmark.group = f"Lightning fit: MLP {DIM}-256-{CLASSES}, batch {BATCH}, loop of {FIT_STEPS} steps"
    x, y = tensors()

    class Module(pl.LightningModule):
        def __init__(self, use: bool):
            super().__init__()
            self.net = mlp()
            self.use = use

        def training_step(self, batch, batch_idx):
            if self.use:
                index, xb, yb = batch
                return lightning_weighted_loss(self, index, F.cross_entropy(self.net(xb), yb, reduction="none"))
            xb, yb = batch
            return F.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class LoopTimer(pl.Callback):
        seconds = 0.0

        def on_train_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self._start

    loop_seconds: Dict[str, list] = {BASELINE: [], "isample": []}

    def fit(use: bool) -> Callable[[], None]:
        def run() -> None:
            timer = LoopTimer()
            callbacks = [timer]
            if use:
                sampler = isample.ImportanceSampler(N, seed=0)
                loader = DataLoader(isample.IndexedDataset(TensorDataset(x, y)), batch_size=BATCH, sampler=sampler)
                callbacks.append(ImportanceSamplingCallback(sampler))
            else:
                loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, max_steps=FIT_STEPS, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                callbacks=callbacks,
            )
            trainer.fit(Module(use), loader)
            loop_seconds["isample" if use else BASELINE].append(timer.seconds)

        return run

    interleaved(benchmark, {BASELINE: fit(False), "isample": fit(True)}, pairs=6, steps=FIT_STEPS, warmup=1)
    # the loop's own time, set-up excluded (the first entry of each is its warm-up fit)
    base, ours = loop_seconds[BASELINE][1:], loop_seconds["isample"][1:]
    benchmark.extra_info["median_us_per_step"] = {
        BASELINE: statistics.median(base) / FIT_STEPS * 1e6, "isample": statistics.median(ours) / FIT_STEPS * 1e6
    }
    benchmark.extra_info["overhead_us_per_step"] = {
        "isample": statistics.median(b - a for a, b in zip(base, ours)) / FIT_STEPS * 1e6
    }


# -- prioritized replay ------------------------------------------------------------------------

CAPACITY, REPLAY_BATCH = 50_000, 64


@pytest.mark.parametrize("call", ["add", "sample", "update_priorities"])
def test_replay_call(benchmark, call):
    """One buffer call alone, in a full buffer of CartPole-sized transitions, against cpprb's
    PrioritizedReplayBuffer (the library a user would pick instead): ``add`` of one
    transition (numpy obs, Python numbers), ``sample`` of 64 with beta, ``update_priorities``
    of 64 (numpy float32 |TD|, as a DQN loop hands them). isample's ``normalize="buffer"``
    is cpprb's normalisation; ``"batch"`` is isample's default. The same calls inside a real
    DQN loop: ``benchmarks/replay_dqn.py``."""
    import numpy as np

    cpprb = pytest.importorskip("cpprb", reason="cpprb is not installed")
    from isample.integrations.replay import PrioritizedReplayBuffer

    benchmark.group = f"replay alone, against cpprb (the baseline column): {call} ({REPLAY_BATCH} where batched), capacity {CAPACITY:,}, full"
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((CAPACITY, 4)).astype(np.float32)
    act, rew, done = rng.integers(0, 2, CAPACITY), np.ones(CAPACITY, dtype=np.float32), rng.random(CAPACITY) < 0.05
    env_dict = {"obs": {"shape": 4}, "act": {"dtype": np.int64}, "rew": {}, "next_obs": {"shape": 4}, "done": {}}
    buffers = {BASELINE: cpprb.PrioritizedReplayBuffer(CAPACITY, env_dict, alpha=0.6, eps=1e-6)}
    for normalize in ("buffer", "batch"):
        buffers[f"isample, normalize={normalize!r}"] = PrioritizedReplayBuffer(
            CAPACITY, alpha=0.6, eps=1e-6, normalize=normalize, bool_as_float=True, seed=0
        )
    for buffer in buffers.values():
        buffer.add(obs=obs, act=act, rew=rew, next_obs=obs, done=done.astype(np.float32), priorities=rng.exponential(1.0, CAPACITY))
    td = np.abs(rng.standard_normal(REPLAY_BATCH)).astype(np.float32)
    transition = dict(obs=obs[0], act=1, rew=1.0, next_obs=obs[1], done=False)
    indexes = {name: b.sample(REPLAY_BATCH, beta=0.4)["indexes"] for name, b in buffers.items()}

    def step(name: str, buffer) -> Callable[[], object]:
        if call == "add":
            return lambda: buffer.add(**transition)
        if call == "sample":
            return lambda: buffer.sample(REPLAY_BATCH, beta=0.4)
        return lambda: buffer.update_priorities(indexes[name], td)

    interleaved(benchmark, {name: step(name, b) for name, b in buffers.items()}, pairs=3000, warmup=50)


STEP_CAPACITY, STEP_BATCH = 100_000, 128


def test_replay_step(benchmark):
    """Issue 18's replay cell: sample 128 and update their priorities (numpy float32 |TD|), in
    a full buffer of 100k CartPole-sized transitions; cpprb is the baseline, TorchRL's
    PrioritizedReplayBuffer (LazyTensorStorage, its sample and update_priority) the other peer
    where it imports."""
    import numpy as np

    cpprb = pytest.importorskip("cpprb", reason="cpprb is not installed")
    from isample.integrations.replay import PrioritizedReplayBuffer

    benchmark.group = (
        f"replay step, against cpprb (the baseline column): sample {STEP_BATCH} + update their priorities, "
        f"{STEP_CAPACITY:,} stored"
    )
    rng = np.random.default_rng(0)
    n = STEP_CAPACITY
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    act, rew, done = rng.integers(0, 2, n), np.ones(n, dtype=np.float32), (rng.random(n) < 0.05).astype(np.float32)
    priorities = rng.exponential(1.0, n)
    td = np.abs(rng.standard_normal(STEP_BATCH)).astype(np.float32)
    env_dict = {"obs": {"shape": 4}, "act": {"dtype": np.int64}, "rew": {}, "next_obs": {"shape": 4}, "done": {}}
    theirs = cpprb.PrioritizedReplayBuffer(n, env_dict, alpha=0.6, eps=1e-6)
    theirs.add(obs=obs, act=act, rew=rew, next_obs=obs, done=done, priorities=priorities)

    def cpprb_step():
        batch = theirs.sample(STEP_BATCH, beta=0.4)
        theirs.update_priorities(batch["indexes"], td)

    steps: Dict[str, Callable[[], object]] = {BASELINE: cpprb_step}
    for normalize in ("buffer", "batch"):
        ours = PrioritizedReplayBuffer(n, alpha=0.6, eps=1e-6, normalize=normalize, seed=0)
        ours.add(obs=obs, act=act, rew=rew, next_obs=obs, done=done, priorities=priorities)

        def step(ours=ours):
            batch = ours.sample(STEP_BATCH, beta=0.4)
            ours.update_priorities(batch["indexes"], td)

        steps[f"isample, normalize={normalize!r}"] = step
    try:
        from tensordict import TensorDict
        from torchrl.data import LazyTensorStorage
        from torchrl.data import PrioritizedReplayBuffer as TorchRLBuffer
    except Exception as error:  # noqa: BLE001 - torchrl missing or not loadable with this torch
        benchmark.extra_info["torchrl"] = f"not measured: {type(error).__name__}: {error}"
    else:
        torchrl_buffer = TorchRLBuffer(alpha=0.6, beta=0.4, eps=1e-6, storage=LazyTensorStorage(n), batch_size=STEP_BATCH)
        t = torch.from_numpy
        torchrl_buffer.extend(
            TensorDict({"obs": t(obs), "act": t(act), "rew": t(rew), "next_obs": t(obs), "done": t(done)}, batch_size=[n])
        )
        torchrl_buffer.update_priority(torch.arange(n), t(priorities.astype(np.float32)))
        torchrl_td = t(td)

        def torchrl_step():
            _, info = torchrl_buffer.sample(return_info=True)
            torchrl_buffer.update_priority(info["index"], torchrl_td)

        steps["TorchRL PrioritizedReplayBuffer"] = torchrl_step
    interleaved(benchmark, steps, pairs=1500, warmup=50)


# -- report ------------------------------------------------------------------------------------


def report(path: str) -> str:
    """Markdown: per group, the baseline's and each variant's median µs per step, and the
    variant's overhead (median of paired differences) in µs and % of the baseline."""
    with open(path) as f:
        data = json.load(f)
    lines = [
        "| workload | without isample (µs/step) | with isample (µs/step) | overhead | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        medians, overheads = extra.get("median_us_per_step", {}), extra.get("overhead_us_per_step", {})
        base = medians.get(BASELINE)
        for name, over in overheads.items():
            label = bench["group"] if name == "isample" else f"{bench['group']}: {name}"
            ratio = medians[name] / base
            lines.append(f"| {label} | {base:,.1f} | {medians[name]:,.1f} | {over:+,.1f} µs ({over / base:+.1%}) | {ratio:.2f}× |")
    cpu = data["benchmarks"][0].get("extra_info", {}).get("cpu", {}) if data["benchmarks"] else {}
    if cpu:
        lines += ["", f"CPU: {cpu.get('model')}, L2 {cpu.get('l2_cache')}, L3 {cpu.get('l3_cache')}"]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(report(sys.argv[1]))
