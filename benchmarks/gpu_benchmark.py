"""GPU timings and memory: isample's CUDA trees against torch.multinomial on the same device.

Run on a machine with a GPU and a CUDA build of isample (scripts/gpu_check.sh does):

    python benchmarks/gpu_benchmark.py --json gpu.json

For each n (5e4, 1e7, 1e8, 1e9 by default, smallest first, each written out as soon as it
is done, so a run cut short keeps what it measured):

- times, as medians over many repetitions with CUDA events around the call (launches and
  GPU work; nothing waits for the host), after warm-up calls that load the kernels and make
  the first-use allocations: update 128, sample 128, sample 128 + update, a draw of 8,192
  without replacement, assigning all n weights (one pass over n: the strided kernels and
  the level re-sums), and a softmax rebase (set_temperature: the same, on scores);
- memory: the tree's arrays (nbytes), and the peak of the device's memory pool (where the
  trees allocate) during a draw without replacement, above what it held before: the draw's
  scratch, which is given back after the call above 64 MiB;
- torch.multinomial (with replacement, and 8,192 without) while n <= 2^24, its limit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

import isample
from isample.bench.machine import machine_summary

SIZES = [50_000, 10_000_000, 100_000_000, 1_000_000_000]
BATCH = 128
DISTINCT = 8192
MULTINOMIAL_LIMIT = 2**24
RACE_BYTES_PER_ITEM = 32  # keys, items and their alternates for the radix sort


def time_cuda(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median microseconds of `call`, measured with CUDA events on the current stream."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def machine() -> Dict:
    """The GPU, driver, versions and the host CPU (lscpu), for the result file."""
    info = {
        "gpu": torch.cuda.get_device_name(),
        **machine_summary(),  # the host CPU (lscpu: model, caches, vector extensions), numpy, torch, isample
        "torch_cuda": torch.version.cuda,
        "build": isample.build_info(),
        "cuda_status": isample._core.cuda_status(),
        "python": platform.python_version(),
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        info["nvidia_smi"] = f"unavailable: {error}"
    return info


def sum_tree_cells(n: int, repeats: int, device: int) -> Dict:
    cells: Dict = {}
    weights = torch.rand(n, dtype=torch.float64, device="cuda") + 1e-3
    tree = isample.SumTree.from_weights(weights, device="cuda", seed=0)
    cells["tree bytes per item"] = tree.nbytes / n
    cells["assign n weights"] = time_cuda(lambda: tree.assign(weights), max(3, repeats // 100))
    idx = torch.randint(0, n, (BATCH,), device="cuda")
    values = torch.rand(BATCH, dtype=torch.float64, device="cuda")

    def step() -> None:
        tree.update(tree.sample(BATCH), values)

    cells["update 128"] = time_cuda(lambda: tree.update(idx, values), repeats)
    cells["sample 128"] = time_cuda(lambda: tree.sample(BATCH), repeats)
    cells["sample 128 + update"] = time_cuda(step, repeats)
    k = min(DISTINCT, n)
    if free_bytes() > RACE_BYTES_PER_ITEM * n * 1.05 + (256 << 20):
        torch.cuda.synchronize()
        before = isample._core.cuda_memory_pool(device, reset_peaks=True)
        tree.sample(k, replace=False)
        torch.cuda.synchronize()
        after = isample._core.cuda_memory_pool(device)
        cells["draw without replacement: pool peak above the tree, bytes"] = after["used_peak"] - before["used"]
        cells["draw without replacement: peak bytes per item"] = (after["used_peak"] - before["used"]) / n
        cells["scratch bytes held after the draw"] = tree._core.scratch_nbytes
        cells["pool bytes in use after the draw, above before"] = after["used"] - before["used"]
        cells[f"sample {k} without replacement"] = time_cuda(lambda: tree.sample(k, replace=False),
                                                            max(3, min(50, repeats // 20)), warmup=1)
    else:
        cells[f"sample {k} without replacement"] = "skipped: not enough GPU memory for the race's scratch"
    tree.check()
    if n <= MULTINOMIAL_LIMIT:
        w = weights.clone()

        def multinomial_step() -> None:
            w[torch.multinomial(w, BATCH, replacement=True)] = values

        cells["torch.multinomial sample 128"] = time_cuda(lambda: torch.multinomial(w, BATCH, replacement=True), repeats)
        cells["torch.multinomial sample 128 + update"] = time_cuda(multinomial_step, repeats)
        cells[f"torch.multinomial {k} without replacement"] = time_cuda(
            lambda: torch.multinomial(weights, k, replacement=False), max(3, min(50, repeats // 20)))
    else:
        cells["torch.multinomial"] = "skipped: more than 2^24 categories"
    return cells  # the tree and the weights go with this frame


def softmax_cells(n: int, repeats: int) -> Dict:
    cells: Dict = {}
    scores = torch.randn(n, dtype=torch.float64, device="cuda")
    tree = isample.SoftmaxTree.from_scores(scores, device="cuda", seed=0)
    del scores
    cells["softmax tree bytes per item"] = tree.nbytes / n
    idx = torch.randint(0, n, (BATCH,), device="cuda")
    losses = torch.rand(BATCH, dtype=torch.float64, device="cuda")
    cells["softmax update 128"] = time_cuda(lambda: tree.update(idx, losses), repeats)
    temperatures = iter([1.0, 2.0] * 1000)
    cells["softmax rebase (set_temperature)"] = time_cuda(lambda: setattr(tree, "temperature", next(temperatures)),
                                                          max(3, repeats // 100))
    tree.check()
    return cells


def run(sizes: List[int], repeats: int, json_path: str | None, info: Dict) -> List[Dict]:
    rows: List[Dict] = []
    device = torch.cuda.current_device()
    for n in sizes:
        started = time.time()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()  # the trees' pool gives freed memory back to the driver at a sync
        row: Dict = {"n": n}
        # The tree (8.53 B/item) and the float64 weights it is built from, with room to spare.
        if free_bytes() < n * (8.6 + 8.0) * 1.2:
            row["skipped"] = "not enough GPU memory"
        else:
            row.update(sum_tree_cells(n, repeats, device))
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            if free_bytes() > n * (16.6 + 8.0) * 1.2:
                row.update(softmax_cells(n, repeats))
            else:
                row["softmax"] = "skipped: not enough GPU memory"
        row["seconds"] = round(time.time() - started, 1)
        rows.append(row)
        print(f"n = {n:,}", flush=True)
        for key, value in row.items():
            if key != "n":
                print(f"  {key:60s} {value if isinstance(value, str) else f'{value:14.1f}'}", flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"machine": info, "unit": "microseconds (median, CUDA events) unless the name says bytes",
                           "rows": rows}, f, indent=2)
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--json", help="write the results here (rewritten after each size)")
    args = parser.parse_args(argv)
    if not isample.cuda_available():
        from isample import _device

        print("the CUDA back end cannot run here:", _device.cuda_problem(), isample.build_info())
        return 1
    info = machine()
    print(json.dumps(info), flush=True)
    run(sorted(args.sizes), args.repeats, args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
