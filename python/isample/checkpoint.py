"""Checkpoint files that are written atomically and checked when read.

``save_checkpoint(path, state)`` serialises `state` (dicts, lists, tensors, numbers,
strings) with torch.save into memory, wraps it with a format name, a version, the capacity
(the number of items the state is for) and the SHA-256 of capacity and payload, writes that
to a temporary file beside `path`, fsyncs it and renames it over `path`. A crash mid-save
leaves the previous checkpoint intact. ``load_checkpoint`` verifies the wrapper and the
checksum before unpickling anything else, and raises ValueError naming the problem for a
truncated, corrupted or foreign file, or for one saved for another number of items than
``expected_capacity``. Loading never changes anything: a caller that loads a state into a
sampler after these checks passes it to ``load_state_dict``, which checks it again.

What ``load_checkpoint`` cannot read back is refused at save time: payloads are read with
``weights_only=True``, which refuses (for example) numpy scalars, so ``save_checkpoint``
raises TypeError naming the first such value and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import pickle
import tempfile
from pathlib import Path
from collections import OrderedDict
from typing import Any, Optional, Tuple, Union

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capacity_of", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "isample-checkpoint"
#: 2 records the capacity; version 1 files (no capacity) are still read
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
PathLike = Union[str, os.PathLike]


def capacity_of(state: Any) -> Optional[int]:
    """The number of items `state` is for: that of a sampler's or a tree's ``state_dict``,
    or of one held under ``state["sampler"]`` (a training loop's checkpoint, a distributed
    sampler's state); None when it holds none."""
    candidate = state
    for _ in range(3):
        if not isinstance(candidate, dict):
            return None
        config = candidate.get("config")
        if str(candidate.get("format", "")).startswith("isample.") and isinstance(config, dict):
            items = config.get("num_items")
            if isinstance(items, int):
                return items
        if str(candidate.get("format", "")).startswith("isample.") and isinstance(candidate.get("capacity"), int):
            return candidate["capacity"]
        candidate = candidate.get("sampler")
    return None


def _check_capacity(capacity: Any, name: str) -> Optional[int]:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(capacity).__name__}")
    if capacity < 1:
        raise ValueError(f"{name} must be at least 1, got {capacity}")
    return int(capacity)


# Types that weights-only loading reads back; anything else is checked by loading for real.
_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size, torch.layout,
          torch.memory_format)


def _first_unusual(value: Any, path: str, depth: int = 0) -> Optional[Tuple[str, Any]]:
    """The first value (path, value) of a type outside the plain ones weights-only loading
    is known to read, or None. Exact types: numpy's float64 is a float subclass, but
    weights-only loading refuses it."""
    if depth > 64:
        return path, value  # too deep to walk: let the real load decide
    kind = type(value)
    if kind in _PLAIN or isinstance(value, torch.Tensor):
        return None
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            found = _first_unusual(key, f"{path} key {key!r:.40}", depth + 1) or _first_unusual(
                item, f"{path}[{key!r:.40}]", depth + 1
            )
            if found:
                return found
        return None
    if kind in (list, tuple, set, frozenset):
        for j, item in enumerate(value):
            found = _first_unusual(item, f"{path}[{j}]", depth + 1)
            if found:
                return found
        return None
    return path, value


def _check_readable(state: Any, payload: bytes) -> None:
    """TypeError, before anything is written, for a state that load_checkpoint could not read."""
    unusual = _first_unusual(state, "state")
    if unusual is None:
        return
    try:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means the file could not be read back
        path, value = unusual
        raise TypeError(
            f"cannot save this checkpoint: {path} is a {type(value).__module__}.{type(value).__name__} "
            f"({value!r:.60}), which load_checkpoint (weights-only loading) cannot read back; store a "
            "plain Python value instead (float(x), int(x), x.tolist()) or a tensor"
        ) from None


def _digest(payload: bytes, capacity: Optional[int], version: int) -> str:
    digest = hashlib.sha256(payload)
    if version >= 2:  # the capacity is covered too: a damaged one is a corrupted file
        digest.update(b"\0capacity=" + repr(capacity).encode())
    return digest.hexdigest()


def save_checkpoint(path: PathLike, state: Any, *, capacity: Optional[int] = None) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename).

    Raises TypeError, writing nothing, for a state that ``load_checkpoint`` could not read
    back (weights-only loading: tensors, plain Python values, dicts, lists and tuples).
    ``capacity``: the number of items the state is for (a sampler's N), recorded in the file
    for ``load_checkpoint(expected_capacity=...)``; by default ``capacity_of(state)``.
    """
    path = Path(path)
    capacity = _check_capacity(capacity, "capacity")
    if capacity is None:
        capacity = capacity_of(state)
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
    except (TypeError, AttributeError, pickle.PicklingError) as error:  # a lambda, a lock, an open file...
        raise TypeError(f"cannot save this checkpoint: the state cannot be pickled ({error})") from None
    payload = buffer.getvalue()
    _check_readable(state, payload)
    wrapper = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "capacity": capacity,
        "sha256": _digest(payload, capacity, CHECKPOINT_VERSION),
        "payload": payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(wrapper, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def load_checkpoint(path: PathLike, *, map_location: Any = "cpu", expected_capacity: Optional[int] = None) -> Any:
    """Read a checkpoint written by save_checkpoint; ValueError if it is not a whole, valid
    one, or if ``expected_capacity`` is given and the file was saved for another number of
    items (checked before the payload is unpickled). A file that records no capacity
    (version 1, or a state without a sampler) passes that check."""
    path = Path(path)
    expected_capacity = _check_capacity(expected_capacity, "expected_capacity")
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated or not a torch file at all
        raise ValueError(f"{path} is not a readable isample checkpoint (truncated or corrupted?): {error}") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an isample checkpoint")
    version = wrapper.get("version")
    if version not in _READABLE_VERSIONS:
        readable = ", ".join(map(str, _READABLE_VERSIONS))
        raise ValueError(f"{path} has checkpoint version {version!r}; this isample reads versions {readable}")
    payload = wrapper.get("payload")
    capacity = wrapper.get("capacity")
    if (
        not isinstance(payload, bytes)
        or not (capacity is None or (isinstance(capacity, int) and not isinstance(capacity, bool)))
        or _digest(payload, capacity, version) != wrapper.get("sha256")
    ):
        raise ValueError(f"{path} is corrupted: its checksum does not match")
    if expected_capacity is not None and capacity is not None and capacity != expected_capacity:
        raise ValueError(
            f"{path} is a checkpoint for {capacity:,} items, but {expected_capacity:,} were expected "
            "(a different data set or sampler size); nothing was loaded"
        )
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
