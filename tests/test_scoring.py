"""isample.scoring on one machine: scores, the parameter board, the ledger, and ScorerPool with
real worker processes on a Fashion-MNIST subset.

The end-to-end pool (and its clean exit) uses the default ``spawn`` start method; the fault
tests use ``fork`` (FORK), which starts a worker in milliseconds instead of seconds and
exercises the same pool code. At most two workers per pool. Each waiting loop is bounded
(WAIT_S) so that a broken pool fails instead of hanging.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import isample
from isample.experiments.models import small_cnn
from isample.scoring import Score, ScorerError, ScorerPool, get_score
from isample.scoring import messages
from isample.scoring.layout import ParameterLayout
from isample.scoring.ledger import ScoreLedger
from isample.scoring.shared import ParameterBoard

N, CHUNK, LAM, EPS = 512, 64, 0.1, 1e-6
WAIT_S = 90.0
FORK = {"start_method": "fork"}


@pytest.fixture(scope="module")
def fashion() -> TensorDataset:
    from isample.experiments.data import load_dataset

    data = load_dataset("fashion-mnist")
    return TensorDataset(data.train_images[:N].float().div(255.0), data.train_labels[:N].clone())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_cnn()


def _sampler(**options: Any) -> isample.ImportanceSampler:
    return isample.ImportanceSampler(N, transform="proportional", uniform_mix=LAM, seed=1, **{"warmup_epochs": 0, **options})


def _until(condition, what: str, step=None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if step is not None:
            step()
        time.sleep(0.005)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _local_grad_norm(model: torch.nn.Module, data: TensorDataset) -> torch.Tensor:
    """GradNormBound's arithmetic on the trainer's side, chunk by chunk, in eval mode."""
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        return torch.cat([
            torch.linalg.vector_norm(torch.softmax(model(x[s : s + CHUNK]).double(), 1)
                                     - F.one_hot(y[s : s + CHUNK], 10).double(), dim=1)
            for s in range(0, len(y), CHUNK)
        ])


# -- score functions, in this process -------------------------------------------------------


def test_builtin_scores_match_their_definitions(fashion, one_torch_thread):
    model = _model().eval()
    x, y = fashion.tensors[0][:8], fashion.tensors[1][:8]
    with torch.no_grad():
        logits = model(x)
    expected_loss = F.cross_entropy(logits, y, reduction="none").double()
    torch.testing.assert_close(get_score("loss")(model, x, y), expected_loss)
    bound = isample.GradNormBound()(expected_loss, None, None, logits=logits, targets=y)
    assert torch.equal(get_score("grad_norm")(model, x, y), bound)
    # the exact norm against a plain autograd loop, one example at a time
    exact = get_score("grad_norm_exact")(model, x, y)
    reference = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        reference.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
    torch.testing.assert_close(exact, torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(exact, bound)  # negative control: the bound is not the exact norm


def test_score_checks_shape_and_type():
    model = torch.nn.Linear(4, 3)
    x, y = torch.zeros(5, 4), torch.zeros(5, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"shape \(5, 3\).*expected \(5,\)"):
        Score(lambda m, a, b: m(a))(model, x, y)
    with pytest.raises(TypeError, match="returned list"):
        Score(lambda m, a, b: [0.0] * 5)(model, x, y)
    with pytest.raises(ValueError, match="unknown score 'gradnorm'"):
        get_score("gradnorm")
    with pytest.raises(TypeError, match="callable"):
        get_score(3)
    assert Score(lambda m, a, b: torch.ones(len(b), dtype=torch.int32))(model, x, y).dtype is torch.float64


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 images normalised a chunk at a time (the chunk protocol)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].float() / 255.0, self.labels[i]

    def chunk(self, start: int, stop: int):
        return self.images[start:stop].float() / 255.0, self.labels[start:stop]


def test_chunks_are_read_by_chunk_by_slicing_or_by_collating_items(fashion):
    from isample.scoring.worker import ChunkPlan, load_chunk

    x, y = fashion.tensors
    images = (x * 255).round().to(torch.uint8)
    expected_x = images[64:128].float() / 255.0
    for dataset in (_Uint8Images(images, y), list(zip(images.float() / 255.0, y))):
        cx, cy = load_chunk(dataset, 64, 128)
        assert torch.equal(cx, expected_x) and torch.equal(cy, y[64:128])
    cx, cy = load_chunk(fashion, 64, 128)
    assert cx.data_ptr() == x[64:].data_ptr() and torch.equal(cy, y[64:128])  # a view: no copy
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        load_chunk([torch.zeros(3)] * 10, 0, 4)
    # two scorers own alternate chunks and together sweep every item once per sweep
    plans = [ChunkPlan(1000, 64, w, 2, seed=0) for w in range(2)]
    sweeps = [[next(g) for _ in range(len(p.chunks))] for p, g in ((p, p.sweeps()) for p in plans)]
    covered = sorted(i for sweep in sweeps for start, stop in sweep for i in range(start, stop))
    assert covered == list(range(1000))
    assert [s for s, _ in sweeps[0]] != sorted(s for s, _ in sweeps[0])  # shuffled


# -- the board, the messages and the ledger, in this process ---------------------------------


def test_board_publishes_and_reads_the_latest_version():
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    layout = ParameterLayout.of(source)
    board = ParameterBoard(layout)
    tensors = layout.tensors(target)
    assert board.read_into(tensors, None) is None  # nothing published yet
    for version in (0, 50, 100):
        with torch.no_grad():
            source.weight.fill_(version)
        board.publish(layout.tensors(source), version)
        assert board.read_into(tensors, version - 1) == version
        assert torch.equal(target.weight, source.weight)
        with torch.no_grad():
            target.weight.fill_(-1.0)
        assert board.read_into(tensors, version) == version  # nothing newer: no copy
        assert bool((target.weight == -1.0).all())
    with pytest.raises(ValueError, match="does not match"):
        layout.tensors(torch.nn.Linear(4, 2))


def test_messages_round_trip_and_bad_bytes_decode_as_bad():
    indices, scores = np.arange(3, 7), np.array([0.5, 1.0, 0.0, 2.0])
    message = messages.decode(messages.encode_scores(2, 40, indices, scores), 2)
    assert isinstance(message, messages.Scores) and message.version == 40
    assert np.array_equal(message.indices, indices) and np.array_equal(message.scores, scores)
    assert len(messages.encode_scores(0, 0, np.arange(256), np.zeros(256))) == messages.message_bytes(256) == 4128
    error = messages.decode(messages.encode_error(1, "Traceback: boom"), 1)
    assert error == messages.Error(1, "Traceback: boom")
    assert isinstance(messages.decode(b"\x01\x02", 0), messages.Bad)
    assert isinstance(messages.decode(messages.encode_scores(3, 0, indices, scores), 2), messages.Bad)  # wrong sender
    assert isinstance(messages.decode(messages.encode_scores(2, 0, indices, scores)[:-8], 2), messages.Bad)  # cut short


def test_ledger_staleness_is_numpys_median_and_max():
    rng = np.random.default_rng(0)
    ledger = ScoreLedger(1000)
    for step in range(0, 500, 50):
        ledger.record_publish(step)
    for _ in range(40):
        version = int(rng.choice(ledger.publish_steps))
        indices = rng.choice(1000, size=int(rng.integers(1, 60)), replace=False)
        message = messages.Scores(0, version, indices, np.ones(indices.size))
        assert ledger.check(message) is None
        ledger.accept(message)
    versions = ledger.versions()
    scored = versions >= 0
    median, oldest = ledger.staleness(777)
    assert median == float(np.median(777 - versions[scored])) and oldest == int((777 - versions[scored]).max())
    assert ledger.coverage() == scored.mean()
    restored = ScoreLedger(1000)
    restored.load_state_dict(ledger.state_dict())
    assert np.array_equal(restored.versions(), versions) and restored.staleness(777) == (median, oldest)
    with pytest.raises(ValueError, match="items"):
        ScoreLedger(999).load_state_dict(ledger.state_dict())


def test_crafted_bad_messages_are_refused_counted_and_never_applied(fashion):
    sampler = _sampler()
    pool = ScorerPool(sampler, _model(), fashion, batch_size=CHUNK)  # never started: no processes
    pool._ledger.record_publish(0)
    before = sampler.scores()
    bad = [
        messages.Scores(0, 0, np.array([1, N]), np.array([1.0, 1.0])),  # index out of range
        messages.Scores(0, 0, np.array([-1, 2]), np.array([1.0, 1.0])),  # negative index
        messages.Scores(0, 0, np.array([1, 2]), np.array([1.0, math.nan])),
        messages.Scores(0, 0, np.array([1, 2]), np.array([math.inf, 1.0])),
        messages.Scores(0, 0, np.array([1, 2]), np.array([1.0, -0.5])),
        messages.Scores(0, 7, np.array([1, 2]), np.array([1.0, 1.0])),  # version never published
        messages.Scores(0, 0, np.array([1, 2, 3]), np.array([1.0, 1.0])),  # lengths differ
        messages.decode(b"short", 0),
    ]
    for message in bad:
        pool._take(message)
    pool._apply_local()
    assert torch.equal(sampler.scores(), before)
    stats = pool.stats()
    assert stats["rejected"] == len(bad) and stats["coverage"] == 0.0 and stats["items_scored"] == 0
    assert stats["rejected_items"] == 2 * 6 + 3
    good = messages.Scores(0, 0, np.array([4, 5]), np.array([0.25, 0.0]))
    pool._take(good)
    pool._apply_local()
    assert sampler.scores()[4] == 0.25 and pool.stats()["items_scored"] == 2  # the pool still applies good ones
    pool.close()


def test_bad_arguments_raise_clear_errors(fashion):
    model, sampler = _model(), _sampler()
    with pytest.raises(TypeError, match="set_scores"):
        ScorerPool(object(), model, fashion)
    with pytest.raises(ValueError, match="has 100 items but the sampler has 512"):
        ScorerPool(sampler, model, TensorDataset(torch.zeros(100, 1, 28, 28), torch.zeros(100, dtype=torch.int64)))
    for name, value in (("workers", 0), ("batch_size", 0), ("publish_every", -1), ("threads", 1.5)):
        with pytest.raises(ValueError, match=name):
            ScorerPool(sampler, model, fashion, **{name: value})
    with pytest.raises(ValueError, match="unknown score"):
        ScorerPool(sampler, model, fashion, score="gradient")
    with pytest.raises(ValueError, match="start_method"):
        ScorerPool(sampler, model, fashion, start_method="thread")
    with pytest.raises(ValueError, match="CUDA does not survive fork"):
        ScorerPool(sampler, model, fashion, device="cuda", start_method="fork")
    with pytest.raises(ValueError, match="timeout"):
        ScorerPool(sampler, model, fashion, timeout=0)


# -- pools with worker processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(fashion) -> Dict[str, Any]:
    """Train with two workers until every item is scored, then stop training and step until
    every score comes from the final parameters. The sampler's set_scores is spied on."""
    model = _model()
    sampler = _sampler(samples_per_epoch=64)
    applied: List[Any] = []
    real = sampler.set_scores

    def spy(indices, scores):
        applied.append((indices.clone(), scores.clone()))
        real(indices, scores)

    sampler.set_scores = spy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(isample.IndexedDataset(fashion), batch_size=16, sampler=sampler)
    drawn = torch.zeros(N, dtype=torch.bool)
    during: List[Dict[str, Any]] = []
    with ScorerPool(sampler, model, fashion, workers=2, batch_size=CHUNK, publish_every=5) as pool:
        pids = pool.worker_pids
        deadline = time.monotonic() + WAIT_S
        epoch = 0
        while pool.stats()["coverage"] < 1.0 and time.monotonic() < deadline:
            sampler.set_epoch(epoch)
            model.train()
            for index, x, y in loader:
                drawn[index] = True
                losses = F.cross_entropy(model(x), y, reduction="none")
                loss = (losses * sampler.weights(index).to(losses)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                pool.step(model)
            during.append(pool.stats())
            epoch += 1
        final = (pool.steps // 5 + 1) * 5  # the first publish after the last optimizer step
        _until(lambda: bool((pool.item_versions() >= final).all()), "scores from the final parameters",
               step=lambda: pool.step(model))
        stats, versions = pool.stats(), pool.item_versions()
    return {
        "model": model, "sampler": sampler, "applied": applied, "drawn": drawn, "stats": stats,
        "versions": versions, "final": final, "during": during, "pids": pids, "after_close": pool.stats(),
    }


def test_pool_scores_every_item_with_the_published_parameters(trained, fashion):
    assert trained["stats"]["coverage"] == 1.0
    assert trained["stats"]["workers"] == 2 and trained["stats"]["rejected"] == 0
    assert trained["stats"]["items_per_second"] > 0 and trained["stats"]["published"] >= 2
    # every score in the sampler is the bound computed here with the final parameters
    torch.testing.assert_close(trained["sampler"].scores(), _local_grad_norm(trained["model"], fashion),
                               rtol=1e-6, atol=1e-9)


def test_probabilities_of_undrawn_items_follow_the_applied_scores_exactly(trained):
    sampler, applied, drawn = trained["sampler"], trained["applied"], trained["drawn"]
    assert applied and all(i.dtype == torch.int64 and s.dtype == torch.float64 for i, s in applied)
    last = torch.zeros(N, dtype=torch.float64)  # the sampler's initial score
    for indices, scores in applied:  # replay in order: the last value wins
        last[indices] = scores
    assert torch.equal(sampler.scores(), last)
    undrawn = ~drawn
    assert 0 < int(undrawn.sum()) < N  # the trainer drew some items, never the others
    s = last + EPS  # Proportional(alpha=1, eps=1e-6)
    expected = (1 - LAM) * s / s.sum() + LAM / N
    p = sampler.probabilities()
    torch.testing.assert_close(p[undrawn], expected[undrawn], rtol=1e-12, atol=0)
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(p[undrawn], torch.full_like(p[undrawn], 1.0 / N), rtol=1e-3, atol=0)  # negative control


def test_staleness_is_reported_in_trainer_steps(trained):
    stats, versions = trained["stats"], trained["versions"].numpy()
    staleness = stats["steps"] - versions
    assert stats["staleness"] == {"median": float(np.median(staleness)), "max": int(staleness.max())}
    assert (versions % 5 == 0).all() and (versions <= stats["steps"]).all()  # publishes every 5 steps
    for snapshot in trained["during"]:  # per epoch while training: None exactly until scores arrive
        assert (snapshot["staleness"]["max"] is None) == (snapshot["items_scored"] == 0)
    assert max(s["staleness"]["max"] for s in trained["during"] if s["staleness"]["max"] is not None) > 0


def test_closed_pool_leaves_no_worker(trained):
    assert trained["after_close"]["workers_alive"] == 0
    assert not any(_running(pid) for pid in trained["pids"])


def _slow_score(model, x, y):
    time.sleep(60)
    return torch.zeros(len(y))


def test_leaving_the_with_by_an_exception_leaves_no_child_process(fashion):
    sampler = _sampler()
    with pytest.raises(KeyError, match="the body failed"):
        with ScorerPool(sampler, _model(), fashion, workers=2, batch_size=8, publish_every=2, **FORK) as pool:
            pids = pool.worker_pids
            _until(lambda: pool.stats()["batches"] > 0, "a first score batch", step=lambda: pool.step())
            time.sleep(2.0)  # the workers run ahead and fill their pipes: close must still be quick
            started = time.monotonic()
            raise KeyError("the body failed")
    assert time.monotonic() - started < 5
    assert len(pids) == 2 and not any(_running(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.step()


def test_close_terminates_a_worker_that_does_not_stop_within_the_timeout(fashion):
    pool = ScorerPool(_sampler(), _model(), fashion, score=_slow_score, timeout=0.5, **FORK).start()
    pids = pool.worker_pids
    time.sleep(0.5)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 8
    assert not any(_running(pid) for pid in pids)


def test_a_killed_worker_leaves_training_going_and_restart_brings_it_back(fashion):
    model, sampler = _model(), _sampler()
    with ScorerPool(sampler, model, fashion, workers=2, batch_size=CHUNK, publish_every=3, **FORK) as pool:
        _until(lambda: pool.stats()["workers_alive"] == 2 and pool.stats()["batches"] >= 2, "both workers",
               step=lambda: pool.step(model))
        victim = pool.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _until(lambda: any(issubclass(w.category, RuntimeWarning) for w in caught), "the warning",
                   step=lambda: pool.step(model))
        message = str(next(w for w in caught if issubclass(w.category, RuntimeWarning)).message)
        assert f"scoring worker 0 (pid {victim}) was killed by SIGKILL" in message and "pool.restart()" in message
        assert pool.stats()["workers_alive"] == 1 and pool.worker_pids[0] is None
        batches = pool.stats()["batches"]
        _until(lambda: pool.stats()["batches"] > batches + 2, "the other worker's scores", step=lambda: pool.step(model))
        assert pool.stats()["workers_alive"] == 1
        assert pool.restart() == 1
        assert pool.stats()["workers_alive"] == 2 and pool.stats()["restarts"] == 1
        assert pool.worker_pids[0] not in (None, victim)
        _until(lambda: pool.stats()["coverage"] == 1.0, "full coverage after the restart", step=lambda: pool.step(model))
    assert pool.stats()["rejected"] == 0


def _poisoned(model, x, y):
    """Labels carry a chunk's kind (label // 10): 1 NaN, 2 inf, 3 a negative score, 0 fine."""
    kind = int(y[0]) // 10
    scores = (y % 10).double() + 1.0
    if kind == 1:
        scores[3] = math.nan
    elif kind == 2:
        scores[0] = math.inf
    elif kind == 3:
        scores[-1] = -2.0
    return scores


def test_workers_nan_inf_and_negative_scores_are_refused_counted_and_never_applied(fashion):
    x, y = fashion.tensors
    kinds = torch.tensor([1, 2, 3, 0, 0, 0, 0, 0]).repeat_interleave(CHUNK)
    data = TensorDataset(x, y + 10 * kinds)
    sampler = _sampler()
    with ScorerPool(sampler, _model(), data, score=_poisoned, batch_size=CHUNK, **FORK) as pool:
        _until(lambda: pool.stats()["rejected"] >= 3 and pool.stats()["coverage"] >= 5 / 8, "a sweep",
               step=lambda: pool.step())
        stats, versions = pool.stats(), pool.item_versions()
    assert stats["coverage"] == 5 / 8
    reasons = " ".join(stats["last_rejections"])
    assert "non-finite" in reasons and "negative" in reasons
    assert stats["rejected_items"] == stats["rejected"] * CHUNK
    poisoned = kinds > 0
    assert bool((versions[poisoned] == -1).all()) and bool((sampler.scores()[poisoned] == 0).all())
    assert torch.equal(sampler.scores()[~poisoned], (y[~poisoned] % 10).double() + 1.0)


def _explode_on_first_chunk(model, x, y):
    if int(y[0]) >= 100:
        raise ZeroDivisionError("worker-side failure on purpose")
    return torch.ones(len(y))


def test_a_workers_exception_is_raised_at_the_next_step_with_its_traceback(fashion):
    x, y = fashion.tensors
    data = TensorDataset(x, torch.where(torch.arange(N) < CHUNK, y + 100, y))
    with ScorerPool(_sampler(), _model(), data, score=_explode_on_first_chunk, batch_size=CHUNK, **FORK) as pool:
        raised: List[str] = []

        def step() -> None:
            try:
                pool.step()
            except ScorerError as error:
                raised.append(str(error))

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a worker that reported its error is not "killed"
            _until(lambda: bool(raised), "the worker's error", step=step)
        assert "ZeroDivisionError: worker-side failure on purpose" in raised[0] and "Traceback" in raised[0]
        assert "_explode_on_first_chunk" in raised[0]
        _until(lambda: pool.stats()["workers_alive"] == 0, "the failed worker's exit", step=step)
        assert pool.restart() == 1 and pool.stats()["workers_alive"] == 1


def test_resume_restores_coverage_staleness_and_scores_and_the_pool_goes_on(fashion, tmp_path):
    model, sampler = _model(), _sampler()
    with ScorerPool(sampler, model, fashion, batch_size=CHUNK, publish_every=4, **FORK) as pool:
        _until(lambda: pool.stats()["coverage"] == 1.0, "full coverage", step=lambda: pool.step(model))
    torch.save({"sampler": sampler.state_dict(), "pool": pool.state_dict()}, tmp_path / "checkpoint.pt")
    saved = pool.stats()

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    resumed_sampler = _sampler()
    resumed_sampler.load_state_dict(checkpoint["sampler"])
    resumed = ScorerPool(resumed_sampler, model, fashion, batch_size=CHUNK, publish_every=4, **FORK)
    with pytest.raises(ValueError, match="not a isample.scoring.ScorerPool"):
        resumed.load_state_dict({"format": "something else"})
    assert resumed.steps == 0  # the refused state changed nothing
    resumed.load_state_dict(checkpoint["pool"])
    assert torch.equal(resumed_sampler.scores(), sampler.scores())
    stats = resumed.stats()
    for key in ("steps", "coverage", "staleness", "batches", "items_scored", "version"):
        assert stats[key] == saved[key], key
    with resumed:
        with pytest.raises(RuntimeError, match="before the pool starts"):
            resumed.load_state_dict(checkpoint["pool"])
        _until(lambda: bool((resumed.item_versions() >= saved["steps"]).all()), "rescored items",
               step=lambda: resumed.step(model))
        assert resumed.steps > saved["steps"]


def test_spawn_refuses_a_lambda_score_clearly_and_fork_accepts_it(fashion):
    pool = ScorerPool(_sampler(), _model(), fashion, score=lambda m, x, y: torch.ones(len(y)))
    with pytest.raises(TypeError, match="pickling.*module level.*start_method='fork'"):
        pool.start()
    assert pool.worker_pids == [None]
    sampler = _sampler()
    with ScorerPool(sampler, _model(), fashion, score=lambda m, x, y: torch.full((len(y),), 2.0),
                    start_method="fork", batch_size=CHUNK) as pool:
        _until(lambda: pool.stats()["coverage"] == 1.0, "full coverage", step=lambda: pool.step())
    assert bool((sampler.scores() == 2.0).all())
