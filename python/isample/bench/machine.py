"""Machine information for every results file: the CPU as ``lscpu`` gives it (model, caches,
vector extensions), the versions of numpy, torch, isample and the peers, and the load.

The benchmark scripts in ``benchmarks/`` record :func:`machine_summary` (or
:func:`cpu_description` alone where only the host CPU matters), so that every result file
says what it ran on in the same words.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any, Dict, Optional

import numpy as np
import torch

import isample

#: The peers whose versions every results file records (None where one is not installed).
PEER_DISTRIBUTIONS = ("torchrl", "tensordict", "cpprb", "sumtree")


def cpu_description() -> Dict[str, Any]:
    """The CPU as ``lscpu`` describes it: model, cores, cache sizes, the vector extensions the
    timings depend on (AVX2, AVX-512), virtualisation. Falls back to /proc/cpuinfo."""
    info: Dict[str, Any] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    wanted = {
        "Model name": "model", "Architecture": "architecture", "CPU(s)": "cpus", "Thread(s) per core": "threads_per_core",
        "L1d cache": "l1d_cache", "L1i cache": "l1i_cache", "L2 cache": "l2_cache", "L3 cache": "l3_cache",
        "CPU max MHz": "max_mhz", "Hypervisor vendor": "hypervisor",
    }
    for key, name in wanted.items():
        if fields.get(key):
            info[name] = fields[key]
    flags = set(fields.get("Flags", "").split())
    if not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
                    if line.startswith("model name") and "model" not in info:
                        info["model"] = line.split(":", 1)[1].strip()
        except OSError:
            pass
    info["vector_extensions"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512vl") if f in flags]
    return info


_SUMMARY: Dict[str, Any] = {}


def machine_summary() -> Dict[str, Any]:
    """What every results file records (pytest-benchmark's extra_info too): the CPU as lscpu
    gives it (model, caches, vector extensions), and the versions of numpy, torch, isample
    and every peer (None where one is not installed)."""
    if not _SUMMARY:
        _SUMMARY.update(
            cpu=cpu_description(),
            numpy=np.__version__,
            torch=torch.__version__,
            isample=isample.__version__,
            isample_cpu_kernels=isample.build_info()["cpu_kernels"],
            **{name: _version(name) for name in PEER_DISTRIBUTIONS},
        )
    return dict(_SUMMARY)


def machine_info() -> Dict[str, Any]:
    """The long form ``isample bench --json`` writes under "machine": the CPU (model, and lscpu's
    fields under cpu_details), cores, memory, platform, torch's threads, isample's build and the
    load average, with every version."""
    cpu = cpu_description()
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu.get("model") or platform.processor() or "unknown",
        "cpu_details": cpu,
        "cores": os.cpu_count(),
        "memory_total_bytes": total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "isample": isample.__version__,
        "isample_build_info": isample.build_info(),
        **{name: _version(name) for name in PEER_DISTRIBUTIONS},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def summary_line(summary: Dict[str, Any]) -> str:
    """One line for a results table: the CPU, its caches and the versions of a
    :func:`machine_summary` (as recorded in a results file)."""
    cpu = summary.get("cpu") or {}
    caches = ", ".join(
        f"{name.split('_')[0].upper()} {cpu[name]}" for name in ("l1d_cache", "l2_cache", "l3_cache") if cpu.get(name)
    )
    versions = ", ".join(
        f"{name} {summary.get(name) or 'not installed'}" for name in ("numpy", "torch", "isample", *PEER_DISTRIBUTIONS)
    )
    return f"{cpu.get('model', 'unknown CPU')} ({cpu.get('cpus', '?')} CPUs; {caches}); {versions}"


def _version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return None
