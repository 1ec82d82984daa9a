"""Tables: the plain-text tables ``isample bench`` prints and their Markdown form."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .memory import GiB, isample_tree_bytes
from .peers import METHODS
from .workloads import WORKLOADS


def overhead_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["", "What the sampler costs a training loop (medians, interleaved; ratio = isample's / the baseline's, goal in brackets)"]
    for r in rows:
        lines.append(f"  {r['cell']}")
        lines.append(
            f"      {_format_us(r['isample_us'])} against {r['baseline']} {_format_us(r['baseline_us'])}: "
            f"{r['ratio']:.2f}× (goal <= {r['goal']:.2f}×){'; ' + r['note'] if r['note'] else ''}"
        )
    return "\n".join(lines)


def _format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:,.2f} s"
    if us >= 1e4:
        return f"{us / 1e3:,.1f} ms"
    return f"{us:,.1f} µs" if us < 100 else f"{us:,.0f} µs"


def _format_ratio(ratio: float) -> str:
    return f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.1f}×"


def speed_table(results: List[Dict[str, Any]], methods: Sequence[str]) -> str:
    """One block per workload: a row per method, a column per n; 'median (× isample)'."""
    label = {name: METHODS[name].label for name in methods}
    lines: List[str] = []
    reasons: Dict[str, List[str]] = {}
    for workload in WORKLOADS:
        rows = [r for r in results if r["workload"] == workload]
        if not rows:
            continue
        sizes = sorted({r["n"] for r in rows})
        cell = {(r["method"], r["n"]): r for r in rows}
        width = 19
        lines += ["", f"{WORKLOADS[workload]}: median per call (× isample's time)"]
        lines.append("n".ljust(16) + "".join(f"{n:,}".rjust(width) for n in sizes))
        for m in methods:
            texts = []
            for n in sizes:
                r = cell.get((m, n))
                if r is None:
                    texts.append("")
                elif r["status"] != "ok":
                    texts.append("–")
                    reasons.setdefault(f"{label[m]}: {r['reason']}", []).append(f"{workload} n={n:,}")
                else:
                    ratio = r.get("ratio_vs_isample")
                    extra = f" ({_format_ratio(ratio)})" if m != "isample" and ratio is not None else ""
                    texts.append(_format_us(r["median_us"]) + extra)
            lines.append(label[m].ljust(16) + "".join(t.rjust(width) for t in texts))
        best_texts = []
        for n in sizes:
            peers = [cell[(m, n)] for m in methods if m != "isample" and cell.get((m, n), {}).get("status") == "ok"]
            best = min(peers, key=lambda r: r["median_us"]) if peers else None
            ratio = best.get("ratio_vs_isample") if best else None
            best_texts.append(f"{label[best['method']]} {_format_ratio(ratio)}" if best and ratio else "")
        lines.append("best peer".ljust(16) + "".join(t.rjust(width) for t in best_texts))
    if reasons:
        lines += ["", "Skipped cells (–):"]
        for reason, where in reasons.items():
            shown = ", ".join(where[:3]) + (f", … ({len(where)} cells)" if len(where) > 3 else "")
            lines.append(f"  {reason}  [{shown}]")
    return "\n".join(lines)


def _mc_note(row: Dict[str, Any]) -> str:
    """What a Monte Carlo row's noise allows: an exact sampler's TV and misses with as many draws."""
    if "exact_sampler_tv_same_draws" not in row:
        return ""
    note = f"; an exact sampler shows TV {row['exact_sampler_tv_same_draws']:.3g} with as many draws"
    if "starved_by_chance_expected" in row:
        note += (
            f"; {row['starved_expected_ge_10']} items expected >= 10 times never drawn, "
            f"{row['starved_by_chance_expected']:.1f} expected by chance"
        )
    return note


def accuracy_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "",
        "Exactness: TV distance of the sampled distribution from w / sum w, and from the ideal sampler with the same",
        "53-bit uniforms; largest error of one item's probability; items of positive weight never drawn (Monte Carlo:",
        "none in the draws though >= 10 expected); largest relative error of one item's probability; probability of",
        "zero-weight items and of indices >= n",
        f"{'n':<12}{'method':<19}{'TV':>11}{'TV to ideal':>12}{'max abs err':>12}{'never drawn':>13}{'max rel err':>13}"
        f"{'zero-w mass':>13}{'past end':>11}  how",
    ]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"{r['n']:<12,}{r['method']:<19}{'–':>11}  skipped: {r['reason']}")
            continue
        starved = r.get("never_drawn_fraction", r.get("starved_fraction", 0.0))
        max_ratio = f"{r['max_relative_error']:.3g}" if "max_relative_error" in r else "–"
        zero = r.get("zero_weight_mass", 0.0)
        past = r.get("out_of_range_mass", 0.0)
        how = r["how"]
        how += _mc_note(r)
        to_ideal = f"{r['tv_vs_ideal']:.3g}" if "tv_vs_ideal" in r else "–"
        absolute = f"{r['max_absolute_error']:.3g}" if "max_absolute_error" in r else "–"
        lines.append(
            f"{r['n']:<12,}{r['method']:<19}{r['tv']:>11.3g}{to_ideal:>12}{absolute:>12}{starved:>12.3%} "
            f"{max_ratio:>13}{zero:>13.3g}{past:>11.3g}  {how}"
        )
    return "\n".join(lines)


def memory_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["", "Memory held between calls (bytes per item), and extra per call or build"]
    largest: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["method"] not in largest or r["n"] > largest[r["method"]]["n"]:
            largest[r["method"]] = r
    for name, r in largest.items():
        lines.append(
            f"  {METHODS[name].label:<16} {r['bytes_per_item']:6.2f} B/item at n={r['n']:,} ({r['how']}); "
            f"+{r['transient_bytes_per_item']:.0f} B/item transient"
        )
    at_1e9 = isample_tree_bytes(10**9)
    lines.append(f"  isample at n=1e9 (layout formula): {at_1e9 / 1e9:.3f} B/item, {at_1e9 / GiB:.2f} GiB")
    return "\n".join(lines)


TREE_PEERS = ("torchrl_fp64", "torchrl_fp32", "cpprb", "sumtree")
HEADLINE = [
    ("update", 50_000), ("update", 10_000_000), ("sample", 50_000), ("sample", 10_000_000),
    ("step", 50_000), ("step", 10_000_000), ("wor8192", 50_000), ("wor30000", 50_000),
    ("wor128", 1_000_000), ("wor128", 10_000_000), ("build", 50_000), ("build", 10_000_000),
]


def markdown_report(report: Dict[str, Any]) -> str:
    """The headline, full-speed, exactness and memory tables of a report, in Markdown."""
    results = [r for r in report["results"] if r["status"] == "ok"]
    cell = {(r["method"], r["workload"], r["n"]): r for r in results}
    label = {name: METHODS[name].label for name in METHODS}

    def fastest(workload: str, n: int, names: Sequence[str]) -> Optional[Dict[str, Any]]:
        rows = [cell[(m, workload, n)] for m in names if (m, workload, n) in cell]
        return min(rows, key=lambda r: r["median_us"]) if rows else None

    peers = [m for m in METHODS if m != "isample"]
    lines = [
        "| workload | n | isample / fastest peer | isample / fastest tree peer | isample | fastest peer | fastest tree peer |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for workload, n in HEADLINE:
        ours = cell.get(("isample", workload, n))
        if ours is None:
            continue
        ratios, names = [], []
        for best in (fastest(workload, n, peers), fastest(workload, n, TREE_PEERS)):
            if best is None:
                ratios.append("–")
                names.append("–")
            else:
                ratios.append(f"{ours['median_us'] / best['median_us']:.2f}")
                names.append(f"{label[best['method']]} {_format_us(best['median_us'])}")
        lines.append(
            f"| {WORKLOADS[workload]} | {n:,} | {ratios[0]} | {ratios[1]} | {_format_us(ours['median_us'])} | "
            + " | ".join(names) + " |"
        )
    out = [
        "#### Headline: isample's time over the fastest peer's (below 1: isample is faster), medians of one call",
        "",
        *lines,
    ]

    methods = [m for m in report["settings"]["methods"]]
    for workload in WORKLOADS:
        sizes = sorted({r["n"] for r in report["results"] if r["workload"] == workload})
        if not sizes:
            continue
        out += ["", f"#### {WORKLOADS[workload]}: median per call (× isample's time)", ""]
        out.append("| method | " + " | ".join(f"{n:,}" for n in sizes) + " |")
        out.append("|---|" + "---:|" * len(sizes))
        for m in methods:
            texts = []
            for n in sizes:
                r = cell.get((m, workload, n))
                if r is None:
                    texts.append("–")
                else:
                    ratio = r.get("ratio_vs_isample")
                    extra = f" ({_format_ratio(ratio)})" if m != "isample" and ratio else ""
                    texts.append(_format_us(r["median_us"]) + extra)
            if any(t != "–" for t in texts):  # a method that ran nothing here gets no row
                row = f"| {label[m]} | " + " | ".join(texts) + " |"
                out.append(row.replace("| isample |", "| **isample** |"))
    reasons: Dict[str, List[str]] = {}
    for r in report["results"]:
        if r["status"] != "ok":
            reasons.setdefault(f"{label[r['method']]}: {r['reason']}", []).append(f"{r['workload']} {r['n']:,}")
    if reasons:
        out += ["", "Cells marked – were skipped:", ""]
        for reason, where in reasons.items():
            out.append(f"- {reason} ({len(where)} cells: {', '.join(where[:3])}{', …' if len(where) > 3 else ''})")

    if report.get("overhead"):
        out += [
            "",
            "#### What the sampler costs a training loop",
            "",
            "| cell | isample | baseline | ratio | goal |",
            "|---|---:|---|---:|---:|",
        ]
        for r in report["overhead"]:
            out.append(
                f"| {r['cell']} | {_format_us(r['isample_us'])} | {r['baseline']} {_format_us(r['baseline_us'])} "
                f"| {r['ratio']:.2f}× | ≤ {r['goal']:.2f}× |"
            )
    if report.get("accuracy"):
        out += [
            "",
            "#### Exactness",
            "",
            "| n | method | TV from w / Σw | TV from the ideal sampler | largest error of a p_i | never drawn "
            "| largest relative error | zero-weight mass | mass past the end | how |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in report["accuracy"]:
            if r.get("status", "ok") != "ok":
                dashes = " – |" * 7
                out.append(f"| {r['n']:,} | {r['method']} |{dashes} skipped: {r['reason']} |")
                continue
            starved = r.get("never_drawn_fraction", r.get("starved_fraction", 0.0))
            to_ideal = f"{r['tv_vs_ideal']:.2g}" if "tv_vs_ideal" in r else "–"
            error = f"{r['max_relative_error']:.2g}" if "max_relative_error" in r else "–"
            absolute = f"{r['max_absolute_error']:.2g}" if "max_absolute_error" in r else "–"
            how = r["how"]
            how += _mc_note(r)
            out.append(
                f"| {r['n']:,} | {r['method']} | {r['tv']:.2g} | {to_ideal} | {absolute} | {starved:.3%} | {error} "
                f"| {r.get('zero_weight_mass', 0.0):.2g} | {r.get('out_of_range_mass', 0.0):.2g} | {how} |"
            )
    if report.get("memory"):
        out += ["", "#### Memory", "", "| method | n | bytes per item held | extra per call or build | source |",
                "|---|---:|---:|---:|---|"]
        largest: Dict[str, Dict[str, Any]] = {}
        for r in report["memory"]:
            if r["method"] not in largest or r["n"] > largest[r["method"]]["n"]:
                largest[r["method"]] = r
        for name, r in largest.items():
            out.append(f"| {label[name]} | {r['n']:,} | {r['bytes_per_item']:.2f} | "
                       f"{r['transient_bytes_per_item']:.0f} | {r['how']} |")
    return "\n".join(out)
