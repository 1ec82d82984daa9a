"""The speed comparison: every method x workload x n, contenders interleaved, and each row's
ratio to isample's time."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .memory import GiB, fits_in_memory, isample_tree_bytes, memory_available
from .peers import METHODS, IsampleMethod, Method, _TorchRLMethod
from .settings import Log, Settings
from .timing import OtherLoad, Timing, time_calls, wait_until_quiet
from .workloads import BATCH, FIXED_N, WOR_K, Unsupported, timing_weights, update_arguments


def _cells(settings: Settings, n: int) -> List[str]:
    return [w for w in settings.workloads if FIXED_N.get(w, n) == n and WOR_K.get(w, 0) <= n]


def run_speed(settings: Settings, log: Log) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Every method x workload x n; returns (result rows, memory rows).

    At each n the methods are set up side by side (as many as fit in memory together), and
    each cell alternates them over ``settings.rounds`` rounds (forward, then backward), so a
    slow spell of the machine lands on every contender alike.
    """
    results: List[Dict[str, Any]] = []
    memory: List[Dict[str, Any]] = []
    last: Dict[Tuple[str, str], Tuple[int, float]] = {}  # (method, cell) -> (n, seconds per call)

    def skip(method: str, n: int, workloads: Iterable[str], reason: str) -> None:
        for workload in workloads:
            results.append({"method": method, "workload": workload, "n": n, "status": "skipped", "reason": reason})
        log(f"n={n:,} {method}: skipped {', '.join(workloads)}: {reason}")

    for n in settings.sizes:
        cells = _cells(settings, n)
        if not cells:
            continue
        need = 8 * n + isample_tree_bytes(n)
        if not fits_in_memory(need):
            for name in settings.methods:
                skip(name, n, cells, f"weights + tree need ~{need / GiB:.1f} GiB; {_free()}")
            continue
        log(f"n={n:,}: generating weights")
        weights = timing_weights(n, settings.seed)
        indices, values = update_arguments(n, settings.seed + 1)
        group: List[Tuple[Method, float]] = []  # set up, with the seconds of their first build
        held = 0  # bytes the group holds

        def run_group() -> None:
            if not group:
                return
            try:
                for workload in cells:
                    results.extend(_interleaved_cell(group, workload, n, weights, indices, values, settings, last, log))
            finally:
                for method, _ in group:
                    method.release()
                group.clear()
                if n >= 1_000_000:
                    gc.collect()  # a full collection costs ~0.2 s with torch loaded

        for name in settings.methods:
            cls = METHODS[name]
            reason = cls.unavailable()
            if reason:
                skip(name, n, cells, reason)
                continue
            if name != "isample" and n > settings.peer_max_n:
                skip(name, n, cells, f"above --peer-max-n={settings.peer_max_n:,}: isample only at this size")
                continue
            method = cls(settings.seed)
            need = method.state_bytes(n) + method.transient_bytes(n)
            if group and not fits_in_memory(held + need):
                run_group()  # the ones set up so far run first, then make room
                held = 0
            if not fits_in_memory(need):
                skip(name, n, cells, f"needs ~{need / GiB:.1f} GiB; {_free()}")
                continue
            predicted = _predict(last, name, "setup", n)
            if predicted > settings.max_build_s:
                why = f"building it would take ~{predicted:.0f} s (extrapolated from smaller n)"
                skip(name, n, cells, f"{why} > --max-build={settings.max_build_s:g} s")
                continue
            wait_until_quiet(settings)
            start = time.perf_counter()
            try:
                method.setup(weights)
            except Exception as error:  # a peer that cannot build is skipped, not fatal
                method.release()
                skip(name, n, cells, f"setup failed: {type(error).__name__}: {error}")
                continue
            cold = time.perf_counter() - start
            last[(name, "setup")] = (n, cold)
            memory.append(_memory_row(method, n))
            group.append((method, cold))
            held += need
        run_group()
        weights = None  # freed before the next size (run_group reads it: no del)
        gc.collect()
    return results, memory


def _free() -> str:
    return f"MemAvailable is {(memory_available() or 0) / GiB:.1f} GiB"


def _predict(last: Dict[Tuple[str, str], Tuple[int, float]], method: str, cell: str, n: int) -> float:
    """Seconds a call would take at n, extrapolated linearly from the last size measured."""
    if (method, cell) not in last:
        return 0.0
    n0, seconds = last[(method, cell)]
    return seconds * n / n0


def _memory_row(method: Method, n: int) -> Dict[str, Any]:
    state = method.state_bytes(n)
    how = "layout formula"
    if isinstance(method, IsampleMethod):
        state, how = method.tree.nbytes, "SumTree.nbytes"
    elif isinstance(method, _TorchRLMethod):
        state = 2 * method.tree.capacity * np.dtype(method.dtype).itemsize
        how = "2 x tree.capacity x itemsize"
    return {
        "method": method.name,
        "n": n,
        "state_bytes": int(state),
        "bytes_per_item": state / n,
        "transient_bytes_per_item": method.transient_bytes(n) / n,
        "how": how,
    }


def _interleaved_cell(
    group: Sequence[Tuple[Method, float]],
    workload: str,
    n: int,
    weights: np.ndarray,
    indices: np.ndarray,
    values: np.ndarray,
    settings: Settings,
    last: Dict[Tuple[str, str], Tuple[int, float]],
    log: Log,
) -> List[Dict[str, Any]]:
    """One row per method for one (workload, n): the methods take turns over the rounds."""
    rows: List[Dict[str, Any]] = []
    ready = []  # (method, row, function, before, warmup, min_repeats)
    for method, cold_setup_s in group:
        row: Dict[str, Any] = {"method": method.name, "workload": workload, "n": n}
        reason = method.supports(workload, n)
        predicted = _predict(last, method.name, workload, n)
        if reason is None and predicted > settings.max_call_s:
            reason = f"one call would take ~{predicted:.0f} s (extrapolated from smaller n)"
            reason += f" > --max-call={settings.max_call_s:g} s"
        if reason is None:
            try:
                function, before, warmup = _workload_call(method, workload, weights, indices, values)
            except Unsupported as error:
                reason = str(error)
        if reason is not None:
            log(f"n={n:,} {method.name} {workload}: skipped: {reason}")
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        slow = predicted > settings.budget_s or (workload == "build" and cold_setup_s > settings.budget_s)
        longest = max(predicted, cold_setup_s if workload == "build" else 0.0)
        min_repeats = 1 if longest > settings.max_call_s / 2 else settings.min_repeats
        if workload == "build" and method.build_is_setup:
            row["first_build_us"] = cold_setup_s * 1e6  # into fresh memory: page faults included
        ready.append([method, row, function, before, warmup and not slow, min_repeats, []])
    if not ready:
        return rows
    wait_until_quiet(settings)
    rounds = max(1, settings.rounds)
    load = OtherLoad()
    for turn in range(rounds):
        for entry in ready if turn % 2 == 0 else ready[::-1]:
            method, row, function, before, warmup, min_repeats, times = entry
            if row.get("status") == "skipped":
                continue
            try:
                timing = time_calls(
                    function,
                    settings.budget_s / rounds,
                    max(1, -(-min_repeats // rounds)),
                    max(1, settings.max_repeats // rounds),
                    before,
                    warmup and turn == 0,
                )
                times.extend(timing.times_ns)
            except Unsupported as error:
                row.update(status="skipped", reason=str(error))
            except Exception as error:  # e.g. torch refusing a size: recorded with its message
                message = (str(error).strip().splitlines() or [""])[0]
                row.update(status="skipped", reason=f"{type(error).__name__}: {message}")
    others = load.cores()
    for method, row, _, _, _, _, times in ready:
        if row.get("status") == "skipped":
            log(f"n={n:,} {method.name} {workload}: skipped: {row['reason']}")
            rows.append(row)
            continue
        timing = Timing(times)
        last[(method.name, workload)] = (n, timing.median_us / 1e6)
        row.update(status="ok", median_us=timing.median_us, min_us=timing.min_us, repeats=len(times), rounds=rounds)
        row.update(other_processes_cores=others, attempts=1, waited_for_quiet_s=0.0)
        busy = f"; other processes used {others:.1f} cores" if others and others > 0.2 else ""
        log(
            f"n={n:,} {method.name} {workload}: median {timing.median_us:,.1f} µs "
            f"(min {timing.min_us:,.1f}, {len(times):,} calls in {rounds} rounds){busy}"
        )
        rows.append(row)
    return rows


def _workload_call(
    method: Method, workload: str, weights: np.ndarray, indices: np.ndarray, values: np.ndarray
) -> Tuple[Callable[[], Any], Optional[Callable[[], Any]], bool]:
    """(timed call, untimed call before each, whether to warm up)."""
    if workload == "build":
        if method.build_is_setup:
            return (lambda: method.setup(weights)), method.release, False
        method.build(weights[:16])  # raises Unsupported early for methods without a build
        return (lambda: method.build(weights)), None, True
    if workload == "update":
        idx, val = method.native(indices, values)
        return (lambda: method.update(idx, val)), None, True
    if workload == "sample":
        return (lambda: method.sample(BATCH)), None, True
    if workload == "step":
        val = method.native_values(values)
        return (lambda: method.step(val)), None, True
    k = WOR_K[workload]
    return (lambda: method.sample_without_replacement(k)), None, True


def add_ratios(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Set each row's ratio to isample's median; return the best peer of each (workload, n)."""
    ours = {
        (r["workload"], r["n"]): r["median_us"] for r in results if r["method"] == "isample" and r["status"] == "ok"
    }
    best: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for r in results:
        key = (r["workload"], r["n"])
        if r["status"] != "ok":
            continue
        r["ratio_vs_isample"] = r["median_us"] / ours[key] if key in ours else None
        if r["method"] != "isample" and (key not in best or r["median_us"] < best[key]["median_us"]):
            best[key] = r
    rows = []
    for (workload, n), peer in best.items():
        rows.append(
            {
                "workload": workload,
                "n": n,
                "best_peer": peer["method"],
                "best_peer_median_us": peer["median_us"],
                "isample_median_us": ours.get((workload, n)),
                "speedup": peer["median_us"] / ours[(workload, n)] if (workload, n) in ours else None,
            }
        )
    return rows
