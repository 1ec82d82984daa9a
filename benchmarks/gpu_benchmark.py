"""GPU timings: isample's CUDA trees against torch.multinomial on the same device.

Run on a machine with a GPU and a CUDA build of isample:

    python benchmarks/gpu_benchmark.py --json benchmarks/results/gpu.json

Each figure is the median over many repetitions, timed with CUDA events around the call
(so it includes the launches and the GPU work, and nothing waits for the host), after
warm-up calls that make the first-use allocations. torch.multinomial refuses more than
2^24 categories, so its larger cells are skipped with that reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List

import torch

import isample

SIZES = [50_000, 10_000_000, 100_000_000, 1_000_000_000]
BATCH = 128
MULTINOMIAL_LIMIT = 2**24


def time_cuda(call: Callable[[], object], repeats: int, warmup: int = 5) -> float:
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


def fits(n: int, bytes_per_item: float) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return n * bytes_per_item < 0.8 * free


def run(sizes: List[int], repeats: int) -> List[Dict]:
    rows = []
    device = torch.device("cuda")
    for n in sizes:
        if not fits(n, 8.6 + 8.0 * 2):  # the tree, plus the float64 weights it is built from and a copy
            rows.append({"n": n, "skipped": "not enough GPU memory"})
            continue
        weights = torch.rand(n, dtype=torch.float64, device=device) + 1e-3
        tree = isample.SumTree.from_weights(weights, device="cuda", seed=0)
        idx = torch.randint(0, n, (BATCH,), device=device)
        values = torch.rand(BATCH, dtype=torch.float64, device=device)

        def step() -> None:
            tree.update(tree.sample(BATCH), values)

        cells = {
            "isample update 128": time_cuda(lambda: tree.update(idx, values), repeats),
            "isample sample 128": time_cuda(lambda: tree.sample(BATCH), repeats),
            "isample sample 128 + update": time_cuda(step, repeats),
        }
        if n <= MULTINOMIAL_LIMIT:
            w = weights.clone()

            def multinomial_step() -> None:
                w[torch.multinomial(w, BATCH, replacement=True)] = values

            cells["torch.multinomial sample 128"] = time_cuda(
                lambda: torch.multinomial(w, BATCH, replacement=True), repeats
            )
            cells["torch.multinomial sample 128 + update"] = time_cuda(multinomial_step, repeats)
        else:
            cells["torch.multinomial"] = "skipped: more than 2^24 categories"
        if n == 50_000:
            cells["isample 8192 of 50k without replacement"] = time_cuda(
                lambda: tree.sample(8192, replace=False), max(20, repeats // 20)
            )
            cells["torch.multinomial 8192 of 50k without replacement"] = time_cuda(
                lambda: torch.multinomial(weights, 8192, replacement=False), max(20, repeats // 20)
            )
        tree.check()
        rows.append({"n": n, "bytes_per_item": tree.nbytes / n, **cells})
        del tree, weights
        torch.cuda.empty_cache()
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not isample.cuda_available():
        print("no CUDA device, or isample was built without CUDA:", isample.build_info())
        return 1
    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "isample": isample.__version__,
        "build": isample.build_info(),
    }
    print(info, flush=True)
    rows = run(args.sizes, args.repeats)
    for row in rows:
        print(f"n = {row['n']:,}", flush=True)
        for key, value in row.items():
            if key != "n":
                print(f"  {key:48s} {value if isinstance(value, str) else f'{value:10.1f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "unit": "microseconds (median, CUDA events)", "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
