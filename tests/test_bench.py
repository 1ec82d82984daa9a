"""isample.bench: the CLI's JSON, each peer adapter's sampling, the exactness machinery, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import isample
from isample import bench
from isample.bench.exact import _exact_units

# Small weights with zeros; all partial sums are exact in float32 and float64.
WEIGHTS = np.array([0.0, 1.0, 2.0, 0.0, 5.0, 0.5, 3.5])
TRUTH = WEIGHTS / WEIGHTS.sum()


def _method(name: str) -> bench.Method:
    cls = bench.METHODS[name]
    reason = cls.unavailable()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(3)  # torch.multinomial draws from torch's default generator
    return cls(seed=3)


def _alpha(name: str) -> float:
    # cpprb seeds its generator from std::random_device: a stricter level keeps it from flaking
    return 1e-6 if name == "cpprb" else 1e-3


def test_import_isample_does_not_import_bench():
    code = "import sys, isample; assert 'isample.bench' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quick_run_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "peers.json"
    assert bench.main(["--quick", "--sizes", "1e4", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    for key in ("schema", "command", "machine", "settings", "peers", "results", "best_peer", "overhead", "accuracy", "memory"):
        assert key in report, key
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"]
    assert machine["torch"] == torch.__version__ and machine["numpy"] == np.__version__
    assert machine["isample_build_info"] == isample.build_info()
    assert machine["cpu_details"]["model"] == machine["cpu"]
    if sys.platform.startswith("linux"):  # lscpu: the caches every timing depends on
        assert all(machine["cpu_details"].get(cache) for cache in ("l1d_cache", "l2_cache"))
    for peer in bench.PEER_DISTRIBUTIONS:  # the version of every peer (None: not installed)
        assert peer in machine
    assert report["settings"]["rounds"] == 5
    overhead = {row["cell"].split(":")[0].split(",")[0]: row for row in report["overhead"]}
    assert {"sampler.weights + sampler.update", "training step", "one DataLoader batch of 128"} <= set(overhead)
    for row in report["overhead"]:
        assert row["ratio"] == pytest.approx(row["isample_us"] / row["baseline_us"]) and row["goal"] > 1
    cells = {(r["method"], r["workload"], r["n"]): r for r in report["results"]}
    # every method x workload that applies at n = 1e4 is there, timed or skipped with a reason
    for method in bench.METHOD_NAMES:
        for workload in ("build", "update", "sample", "step", "wor128"):
            row = cells[(method, workload, 10_000)]
            assert row["status"] in ("ok", "skipped")
            if row["status"] == "skipped":
                assert row["reason"]
            else:
                assert 0 < row["min_us"] <= row["median_us"] and row["repeats"] >= 1
                assert "other_processes_cores" in row and row["attempts"] >= 1
    for workload in ("build", "update", "sample", "step", "wor128"):
        ours = cells[("isample", workload, 10_000)]
        assert ours["status"] == "ok" and ours["ratio_vs_isample"] == 1.0
    skipped = cells[("numpy_cumsum", "wor128", 10_000)]
    assert skipped["status"] == "skipped" and "replacement" in skipped["reason"]
    best = {(b["workload"], b["n"]): b for b in report["best_peer"]}
    sample = best[("sample", 10_000)]
    assert sample["best_peer"] != "isample"
    assert sample["speedup"] == pytest.approx(sample["best_peer_median_us"] / sample["isample_median_us"])
    assert all(r["rounds"] == 5 for r in report["results"] if r["status"] == "ok")  # contenders alternated
    race = cells[("numpy_race", "wor128", 10_000)]
    assert race["status"] == "ok" and cells[("numpy_race", "sample", 10_000)]["status"] == "skipped"
    accuracy = {r["method"]: r for r in report["accuracy"]}
    assert accuracy["isample"]["status"] == "ok"
    assert accuracy["isample"]["tv"] < 1e-12 and accuracy["isample"]["never_drawn"] == 0
    assert accuracy["isample"]["zero_weight_mass"] == 0 and accuracy["isample"]["spot_check_mismatches"] == 0
    memory = {r["method"]: r for r in report["memory"]}
    assert memory["isample"]["bytes_per_item"] < 8.6
    out = capsys.readouterr().out
    assert "best peer" in out and "Exactness" in out and "costs a training loop" in out


def test_quick_run_draws_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "scaling.png"
    argv = ["--quick", "--methods", "isample,numpy_cumsum", "--sizes", "1e4,2e4", "--accuracy-sizes", "0"]
    assert bench.main(argv + ["--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 100_000


def test_options_are_checked():
    with pytest.raises(SystemExit):
        bench.main(["--methods", "no_such_method"])
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "1.5"])
    settings, _ = bench.parse_args(["--sizes", "1e4,50_000", "--workloads", "sample,update"])
    assert settings.sizes == [10_000, 50_000] and settings.workloads == ["sample", "update"]


# -- adapters sample what they should ------------------------------------------------------


def _with_replacement(name: str) -> bench.Method:
    method = _method(name)
    reason = method.supports("sample", len(WEIGHTS))
    if reason:
        pytest.skip(reason)
    return method


@pytest.mark.statistical
@pytest.mark.parametrize("name", bench.METHOD_NAMES)
def test_each_adapter_samples_in_proportion_to_the_weights(name):
    method = _with_replacement(name)
    method.setup(WEIGHTS)
    try:
        drawn = np.concatenate([method.as_numpy(method.sample(bench.BATCH)) for _ in range(120)])
    finally:
        method.release()
    counts = np.bincount(drawn, minlength=len(WEIGHTS))
    assert len(counts) == len(WEIGHTS), "an index past the end was drawn"
    assert counts[WEIGHTS == 0].sum() == 0, "a zero weight was drawn"
    positive = WEIGHTS > 0
    p = scipy.stats.chisquare(counts[positive], TRUTH[positive] * len(drawn)).pvalue
    assert p > _alpha(name)
    # negative control: the same counts against the wrong distribution are rejected
    wrong = np.roll(TRUTH[positive], 1)
    assert scipy.stats.chisquare(counts[positive], wrong * len(drawn)).pvalue < 1e-3


@pytest.mark.parametrize("name", bench.METHOD_NAMES)
def test_each_adapter_updates(name):
    method = _method(name)
    method.setup(WEIGHTS)
    try:
        indices, values = method.native(np.array([1, 2, 4, 5, 6]), np.zeros(5))
        method.update(indices, values)  # every weight is 0 now
        indices, values = method.native(np.array([3]), np.array([2.0]))
        method.update(indices, values)
        if method.supports("sample", len(WEIGHTS)):
            drawn = method.as_numpy(method.sample_without_replacement(1))
        else:
            drawn = np.concatenate([method.as_numpy(method.sample(bench.BATCH)) for _ in range(4)])
    finally:
        method.release()
    assert set(drawn.tolist()) == {3}


def _successive_pair_probabilities(weights: np.ndarray) -> dict:
    total = weights.sum()
    return {
        (i, j): weights[i] / total * weights[j] / (total - weights[i])
        for i in range(len(weights))
        for j in range(len(weights))
        if i != j and weights[i] > 0 and weights[j] > 0
    }


@pytest.mark.statistical
@pytest.mark.parametrize("name", bench.METHOD_NAMES)
def test_without_replacement_is_successive_sampling(name):
    method = _method(name)
    method.setup(WEIGHTS)
    if method.supports("wor128", len(WEIGHTS)):
        method.release()
        pytest.skip(method.supports("wor128", len(WEIGHTS)))
    before = method.tree.get() if name == "isample" else None
    try:
        pairs = [tuple(method.as_numpy(method.sample_without_replacement(2)).tolist()) for _ in range(3000)]
        everything = method.as_numpy(method.sample_without_replacement(5))
        if name.startswith("torchrl"):
            stored = method.tree.at(np.arange(len(WEIGHTS)))
            np.testing.assert_array_equal(stored, WEIGHTS.astype(method.dtype))  # restored
        if name == "isample":
            assert torch.equal(method.tree.get(), before)
    finally:
        method.release()
    assert sorted(everything.tolist()) == [1, 2, 4, 5, 6]
    expected = _successive_pair_probabilities(WEIGHTS)
    assert all(pair in expected for pair in pairs), "a repeat or a zero weight was drawn"
    keys = sorted(expected)
    observed = np.array([pairs.count(key) for key in keys])
    assert scipy.stats.chisquare(observed, np.array([expected[key] for key in keys]) * len(pairs)).pvalue > 1e-3


# -- the exactness machinery --------------------------------------------------------------


def test_choice_and_multinomial_descents_match_the_libraries_draw_for_draw():
    rng = np.random.default_rng(0)
    weights = rng.lognormal(0.0, 2.0, 2000)
    weights[rng.random(2000) < 0.1] = 0.0
    for seed in range(3):
        drawn = np.random.default_rng(seed).choice(len(weights), 3000, p=weights / weights.sum())
        uniforms = np.random.default_rng(seed).random(3000)
        np.testing.assert_array_equal(bench.choice_descent(weights)(uniforms), drawn)
        torch.manual_seed(seed)
        drawn = torch.multinomial(torch.from_numpy(weights), 3000, replacement=True).numpy()
        torch.manual_seed(seed)
        uniforms = torch.rand(3000, dtype=torch.float64).numpy()
        np.testing.assert_array_equal(bench.multinomial_descent(weights)(uniforms), drawn)


def test_ideal_boundaries_are_exact():
    units = np.array([3, 0, 5, 1, 0, 7], dtype=np.int64)
    total = int(units.sum())
    prefix = np.cumsum(units)
    expected = [-(-int(p) * 2**53 // total) for p in prefix]  # ceil in Python integers
    assert bench.ideal_boundaries(units, total).tolist() == expected


def test_exact_grid_counts_recovers_a_known_descent():
    weights = bench.accuracy_weights(3000, seed=5)
    units, total = _exact_units(weights)
    guess = bench.ideal_boundaries(units, total)
    ideal = np.diff(np.concatenate(([0], guess, [bench.GRID])))
    # a descent whose boundaries are the ideal ones, shifted: the search must find them
    shifted = guess + np.arange(3000) % 7 * 1000
    shifted = np.minimum(np.maximum.accumulate(shifted), bench.GRID)

    def descent(u):
        return np.searchsorted(shifted, np.round(u * 2.0**53).astype(np.int64), side="right")

    counts, past_end, info = bench.exact_grid_counts(descent, 3000, guess)
    np.testing.assert_array_equal(np.append(counts, past_end), np.diff(np.concatenate(([0], shifted, [bench.GRID]))))
    assert info["monotone"] and info["spot_check_mismatches"] == 0
    assert counts.sum() + past_end == bench.GRID
    assert not np.array_equal(counts, ideal[:-1])


def test_isample_is_exact_and_a_float32_tree_starves_items():
    fp32 = _method("torchrl_fp32")
    rows = bench.measure_accuracy([bench.IsampleMethod(0), fp32], 10_000, seed=0, log=lambda _: None)
    by_method = {r["method"]: r for r in rows}
    ideal, ours, theirs = by_method["ideal"], by_method["isample"], by_method["torchrl_fp32"]
    # 53-bit uniforms alone cost ~ n * 2^-53 / 6 of TV; isample adds no more than that again
    assert ideal["tv"] < 3e-13 and ours["tv"] < 2 * ideal["tv"] + 1e-13
    assert ours["never_drawn"] == 0 and ours["zero_weight_mass"] == 0 and ours["out_of_range_mass"] == 0
    assert ours["spot_check_mismatches"] == 0 and ours["monotone"]
    assert theirs["tv"] > 1e-5 and theirs["never_drawn"] > 0


# -- memory -----------------------------------------------------------------------------


def test_memory_estimate_matches_the_tree_and_fits_1e9():
    for n in (1, 15, 16, 17, 4097, 65_537, 100_000):
        assert bench.isample_tree_bytes(n) == isample.SumTree(n, seed=0).nbytes
    at_1e9 = bench.isample_tree_bytes(10**9)
    assert 8.5 < at_1e9 / 1e9 < 8.6
    assert at_1e9 < 24 * bench.GiB
    assert bench.IsampleMethod(0).state_bytes(10**9) == at_1e9


def test_skip_decision_reads_free_memory():
    available = bench.memory_available()
    if sys.platform.startswith("linux"):
        assert available is not None and available > 0
    assert bench.fits_in_memory(10**9, available=3 * bench.GiB)
    assert not bench.fits_in_memory(bench.isample_tree_bytes(10**9), available=8 * bench.GiB)
    assert bench.fits_in_memory(bench.isample_tree_bytes(10**9), available=10 * bench.GiB)
