"""Exact sampling distributions: what each method draws for every 53-bit uniform, and its
TV distance from the true probabilities (Monte Carlo for the methods that draw internally)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from .memory import GiB, fits_in_memory, memory_available
from .peers import Method
from .workloads import BATCH, Unsupported


GRID_BITS = 53
GRID = 1 << GRID_BITS  # uniforms u = m / 2^53, m in [0, 2^53): numpy, torch and isample alike


def accuracy_weights(n: int, seed: int = 0, sigma: float = 2.0, zero_fraction: float = 0.01) -> np.ndarray:
    """Log-normal weights (about 9 decades at n = 1e7) with 1% zeros, on a 2^-30 grid.

    Being multiples of 2^-30, their exact sums are int64 arithmetic, so the true
    probabilities and the ideal sampler's boundaries are known exactly; the trees still
    round, since their float64 partial sums carry 53 bits only.
    """
    rng = np.random.default_rng(seed)
    units = np.maximum(np.rint(rng.lognormal(0.0, sigma, n) * 2.0**30), 1.0)
    units[rng.random(n) < zero_fraction] = 0.0
    if not units.any():
        units[0] = 1.0
    return np.ldexp(units, -30)


def _exact_units(weights: np.ndarray) -> Tuple[np.ndarray, int]:
    units = np.ldexp(weights, 30)
    if not np.array_equal(units, np.rint(units)):
        raise ValueError("weights must be multiples of 2^-30 (see accuracy_weights)")
    if units.sum() >= 2.0**61:  # checked in float64 first: an int64 sum would wrap silently
        raise ValueError("weights too large for exact int64 sums")
    units = units.astype(np.int64)
    total = int(units.sum(dtype=np.int64))
    return units, total


def ideal_boundaries(units: np.ndarray, total: int) -> np.ndarray:
    """B[i-1] = ceil(P_i * 2^53 / total) for i = 1..n, P_i the exact sum of items before i.

    The ideal sampler (exact arithmetic, ties to the right) draws item >= i exactly when
    its uniform's grid index m >= B[i-1]. Long division in int64, a few bits at a time.
    """
    prefix = np.cumsum(units, dtype=np.int64)  # P_1 .. P_n
    remainder = prefix.copy()
    quotient = np.zeros_like(prefix)
    step = max(1, 62 - total.bit_length())
    bits = GRID_BITS
    while bits:
        s = min(step, bits)
        remainder <<= s
        digit = remainder // total
        remainder -= digit * total
        quotient = (quotient << s) + digit
        bits -= s
    return quotient + (remainder > 0)


def exact_grid_counts(
    descent: Callable[[np.ndarray], np.ndarray], n: int, guess: np.ndarray
) -> Tuple[np.ndarray, int, Dict[str, Any]]:
    """How many of the 2^53 grid uniforms u = m / 2^53 each item receives.

    ``descent`` maps float64 uniforms to item indices (>= n meaning out of range) and must
    be monotone in u, as every inverse-cdf descent is. For each i = 1..n the boundary
    B_i = min{m : descent(m / 2^53) >= i} is found by widening a bracket around `guess`
    (the ideal boundaries), then bisecting; item i then has exactly B_{i+1} - B_i grid
    points. Returns (counts of the n items, grid points past the last item, info), where
    info holds the number of evaluations and a spot check of monotonicity on random u.
    """
    targets = np.arange(1, n + 1, dtype=np.int64)
    evaluations = [0]

    def at(m: np.ndarray) -> np.ndarray:
        evaluations[0] += 1
        return np.minimum(np.asarray(descent(m.astype(np.float64) * 2.0**-GRID_BITS), dtype=np.int64), n)

    lo = np.maximum(guess.astype(np.int64) - 1, -1)  # lo = -1 and hi = 2^53 are sentinels
    hi = np.minimum(guess.astype(np.int64), GRID)
    reach_lo = np.ones(n, dtype=np.int64)
    reach_hi = np.ones(n, dtype=np.int64)
    lo_ok, hi_ok = lo < 0, hi >= GRID
    while not (lo_ok.all() and hi_ok.all()):
        todo = np.flatnonzero(~lo_ok)
        if todo.size:
            good = at(lo[todo]) < targets[todo]
            lo_ok[todo[good]] = True
            bad = todo[~good]  # descent(lo) >= i: lo is an upper end, look further left
            hi[bad], hi_ok[bad] = lo[bad], True
            reach_lo[bad] *= 16
            lo[bad] = np.maximum(lo[bad] - reach_lo[bad], -1)
            lo_ok[bad] = lo[bad] < 0
        todo = np.flatnonzero(~hi_ok)
        if todo.size:
            good = at(hi[todo]) >= targets[todo]
            hi_ok[todo[good]] = True
            bad = todo[~good]
            lo[bad], lo_ok[bad] = hi[bad], True
            reach_hi[bad] *= 16
            hi[bad] = np.minimum(hi[bad] + reach_hi[bad], GRID)
            hi_ok[bad] = hi[bad] >= GRID
    while True:
        todo = np.flatnonzero(hi - lo > 1)
        if not todo.size:
            break
        mid = (lo[todo] + hi[todo]) // 2
        above = at(mid) >= targets[todo]
        hi[todo[above]] = mid[above]
        lo[todo[~above]] = mid[~above]
    edges = np.concatenate(([0], hi, [GRID]))
    counts = np.diff(edges)
    check = np.random.default_rng(12345).integers(0, GRID, 100_000)
    mismatches = int(np.count_nonzero(at(check) != np.searchsorted(hi, check, side="right")))
    info = {"evaluations": evaluations[0], "monotone": bool((counts >= 0).all()), "spot_check_mismatches": mismatches}
    return counts[:n], int(counts[n]), info


def distribution_metrics(
    probability: np.ndarray, weights_units: np.ndarray, total_units: int, out_of_range: float = 0.0
) -> Dict[str, Any]:
    """TV distance and starvation of a sampled distribution (longdouble) from w / sum w."""
    truth = weights_units.astype(np.longdouble) / np.longdouble(total_units)
    error = np.abs(probability - truth)
    tv = 0.5 * (error.sum() + np.longdouble(out_of_range))
    positive = weights_units > 0
    ratio = probability[positive] / truth[positive]
    return {
        "tv": float(tv),
        "never_drawn": int(np.count_nonzero(probability[positive] == 0)),
        "never_drawn_fraction": float(np.count_nonzero(probability[positive] == 0) / positive.sum()),
        "zero_weight_mass": float(probability[~positive].sum()),
        "out_of_range_mass": float(out_of_range),
        "max_ratio": float(ratio.max()),
        "min_ratio": float(ratio.min()),
        "max_relative_error": float(np.abs(ratio - 1).max()),
        "max_absolute_error": float(error.max()),
    }


def _mc_metrics(counts: np.ndarray, units: np.ndarray, total: int, draws: int) -> Dict[str, Any]:
    truth = units / total
    expected = truth * draws
    tv = 0.5 * float(np.abs(counts / draws - truth).sum())
    eligible = (units > 0) & (expected >= 10)
    starved = int(np.count_nonzero(eligible & (counts == 0)))
    return {
        "tv": tv,
        "starved_expected_ge_10": starved,
        # an exact sampler misses an item expected λ times with probability e^-λ
        "starved_by_chance_expected": float(np.exp(-expected[eligible]).sum()),
        "starved_fraction": starved / max(int(eligible.sum()), 1),
        "zero_weight_draws": int(counts[units == 0].sum()),
        "zero_weight_mass": float(counts[units == 0].sum() / draws),
    }


def measure_accuracy(
    methods: Sequence[Method],
    n: int,
    seed: int = 0,
    mc_draws: int = 20_000_000,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Exactness rows at size n: the ideal sampler, then each method (exact or Monte Carlo)."""
    weights = accuracy_weights(n, seed)
    units, total = _exact_units(weights)
    guess = ideal_boundaries(units, total)
    ideal_counts = np.diff(np.concatenate(([0], guess, [GRID])))
    ideal = ideal_counts.astype(np.longdouble) / GRID
    rows = [
        {
            "method": "ideal",
            "n": n,
            "how": "exact arithmetic, ties to the right, 53-bit uniforms: what the uniforms' resolution alone costs",
            **distribution_metrics(ideal[:n], units, total, float(ideal[n])),
            "tv_vs_ideal": 0.0,
        }
    ]
    log(f"  accuracy n={n:,}: ideal sampler with 53-bit uniforms TV {rows[0]['tv']:.3g}")
    for method in methods:
        start = time.perf_counter()
        row: Dict[str, Any] = {"method": method.name, "n": n}
        try:
            reason = method.supports("sample", n)
            if reason:
                raise Unsupported(reason)
            need = method.state_bytes(n) + method.transient_bytes(n) + 48 * n
            if not fits_in_memory(need):
                raise Unsupported(f"needs ~{need / GiB:.1f} GiB, MemAvailable {memory_available() / GiB:.1f} GiB")
            method.setup(weights)
            descent = method.descent()
            if descent is not None:
                counts, past_end, info = exact_grid_counts(descent, n, guess)
                probability = counts.astype(np.longdouble) / GRID
                excess = np.abs(np.append(counts, past_end) - ideal_counts).astype(np.float64).sum()
                row.update(
                    how="exact: bisection over the 2^53-point uniform grid",
                    **distribution_metrics(probability, units, total, float(past_end) / GRID),
                    tv_vs_ideal=0.5 * float(excess) / GRID,
                    **info,
                )
                if method.name in ("torch_multinomial", "torch_wrs"):
                    row["how"] += " (the CPU kernel's algorithm, checked draw for draw in tests)"
                if method.name == "numpy_choice":
                    row["how"] += " (Generator.choice's algorithm, checked draw for draw in tests)"
            else:
                counts = _monte_carlo_counts(method, n, mc_draws)
                reference = np.random.default_rng(seed + 7).multinomial(mc_draws, units / total)
                row.update(
                    how=f"Monte Carlo: {mc_draws:,} draws in calls of sample({BATCH})",
                    draws=mc_draws,
                    **_mc_metrics(counts, units, total, mc_draws),
                    exact_sampler_tv_same_draws=_mc_metrics(reference, units, total, mc_draws)["tv"],
                )
        except Unsupported as reason:
            row.update(status="skipped", reason=str(reason))
        finally:
            method.release()
        row.setdefault("status", "ok")
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        if row["status"] == "ok":
            starved = row.get("never_drawn_fraction", row.get("starved_fraction"))
            log(f"  accuracy n={n:,}: {method.name:<18} TV {row['tv']:.3g}, never drawn {starved:.3g} "
                f"({row['seconds']} s)")
        else:
            log(f"  accuracy n={n:,}: {method.name:<18} skipped: {row['reason']}")
    return rows


def _monte_carlo_counts(method: Method, n: int, draws: int) -> np.ndarray:
    calls = -(-draws // BATCH)
    drawn = np.empty(calls * BATCH, dtype=np.int64)
    for j in range(calls):
        drawn[j * BATCH : (j + 1) * BATCH] = method.as_numpy(method.sample(BATCH))
    return np.bincount(drawn[:draws], minlength=n)[:n]
