"""Memory: what a tree holds per item, and whether a set-up fits in free memory."""

from __future__ import annotations

from typing import Optional

GiB = 1024**3


def isample_tree_bytes(n: int, fanout: int = 16) -> int:
    """Bytes of an ``isample.SumTree(n)``, from its layout (csrc/common.h).

    Leaves are padded to a multiple of the fan-out; every internal level is padded to a
    block of ``fanout`` nodes, up to a single root: about 8 * 16/15 = 8.53 bytes per item.
    """

    def blocks(x: int) -> int:
        return -(-x // fanout) * fanout

    leaves = blocks(max(n, 1))
    internal, nodes = 0, leaves // fanout
    while True:
        internal += blocks(nodes)
        if nodes == 1:
            break
        nodes = -(-nodes // fanout)
    return 8 * (leaves + internal)


def memory_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(needed: int, available: Optional[int] = None, margin: int = GiB) -> bool:
    """Whether `needed` bytes (plus a margin for Python and the OS) fit in free memory."""
    available = memory_available() if available is None else available
    return available is None or needed + margin <= available
