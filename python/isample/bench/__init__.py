"""isample against its peers: speed, exactness and memory (``isample bench``, ``python -m isample.bench``).

Times each method x workload x n with ``time.perf_counter_ns`` and reports medians (and
minima) of single calls, each method's time relative to isample's, and the fastest peer of
every row. Peers that do not install or import are skipped with the reason. Optionally
writes JSON (with machine information) and a log-log scaling plot.

One job per module:

- ``workloads``: what is timed (build, update 128, sample 128, the step, k distinct items),
  at which n, with which weights.
- ``peers``: the adapters, one per method, behind one interface (:class:`Method`):
  ``isample`` (``isample.SumTree`` on the CPU); ``numpy_choice`` (``Generator.choice(n, k,
  p=w / w.sum())``, p recomputed every call because scores change every step);
  ``numpy_cumsum`` (``np.cumsum`` + ``np.searchsorted``); ``torch_multinomial`` (on a
  float64 weight tensor); ``torch_wrs`` (``list(WeightedRandomSampler)``, what a DataLoader
  consumes); ``torchrl_fp64`` / ``torchrl_fp32`` (TorchRL's C++ ``SumSegmentTreeFp64/Fp32``,
  used as TorchRL's own ``PrioritizedSampler`` uses them on the CPU); ``cpprb`` (its
  ``PrioritizedReplayBuffer`` with alpha = 1, eps = 0 and a 1-byte payload); ``sumtree``
  (Rust, PyPI); ``numpy_race`` (numpy's exponential race, k distinct items only).
- ``exact``: for every method whose draw is a deterministic, monotone function of one
  uniform, the exact distribution it samples when that uniform has 53 random bits (all of
  isample, numpy and torch do), found by bisection over the 2^53-point grid, and its TV
  distance from w / sum w; cpprb draws internally, so its row is a Monte Carlo estimate.
- ``timing``: single calls, contenders interleaved over rounds, medians; other processes' load.
- ``speed``: every method x workload x n, set up side by side as memory allows.
- ``overhead``: what the sampler costs a training loop (sampler calls, a step, a DataLoader batch).
- ``memory``: bytes per item, and whether a set-up fits in free memory.
- ``machine``: the CPU (lscpu: model, caches, vector extensions) and the versions, for
  every results file (the scripts in ``benchmarks/`` use it too).
- ``tables`` and ``plots``: the printed tables, their Markdown, the scaling plot.
- ``command``: the options, the run and its JSON.

Importing ``isample`` does not import this package.
"""

from .command import main, parse_args, run
from .exact import (
    GRID,
    GRID_BITS,
    accuracy_weights,
    distribution_metrics,
    exact_grid_counts,
    ideal_boundaries,
    measure_accuracy,
)
from .machine import PEER_DISTRIBUTIONS, cpu_description, machine_info, machine_summary, summary_line
from .memory import GiB, fits_in_memory, isample_tree_bytes, memory_available
from .peers import (
    METHOD_NAMES,
    METHODS,
    CpprbMethod,
    IsampleMethod,
    Method,
    NumpyChoiceMethod,
    NumpyCumsumMethod,
    NumpyRaceMethod,
    SumtreeMethod,
    TorchMultinomialMethod,
    TorchRLFp32Method,
    TorchRLFp64Method,
    TorchWRSMethod,
    choice_descent,
    multinomial_descent,
    peer_status,
)
from .settings import Log, Settings
from .tables import accuracy_table, markdown_report, memory_table, overhead_table, speed_table
from .timing import Timing, interleaved, time_calls
from .workloads import BATCH, WORKLOADS, Unsupported, timing_weights, update_arguments

__all__ = [
    "BATCH", "GRID", "GRID_BITS", "GiB", "METHODS", "METHOD_NAMES", "PEER_DISTRIBUTIONS", "WORKLOADS",
    "CpprbMethod", "IsampleMethod", "Log", "Method", "NumpyChoiceMethod", "NumpyCumsumMethod", "NumpyRaceMethod",
    "Settings", "SumtreeMethod", "Timing", "TorchMultinomialMethod", "TorchRLFp32Method", "TorchRLFp64Method",
    "TorchWRSMethod", "Unsupported",
    "accuracy_table", "accuracy_weights", "choice_descent", "cpu_description", "distribution_metrics",
    "exact_grid_counts", "fits_in_memory", "ideal_boundaries", "interleaved", "isample_tree_bytes", "machine_info",
    "machine_summary", "main", "markdown_report", "measure_accuracy", "memory_available", "memory_table",
    "multinomial_descent", "overhead_table", "parse_args", "peer_status", "run", "speed_table", "summary_line",
    "time_calls", "timing_weights", "update_arguments",
]
