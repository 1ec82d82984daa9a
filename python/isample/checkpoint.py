"""Checkpoint files that are written atomically and checked when read.

``save_checkpoint(path, state)`` serialises `state` (dicts, lists, tensors, numbers,
strings) with torch.save into memory, wraps it with a format name, a version and the
SHA-256 of the payload, writes that to a temporary file beside `path`, fsyncs it and renames
it over `path`. A crash mid-save leaves the previous checkpoint intact. ``load_checkpoint``
verifies the wrapper and the checksum before unpickling anything else, and raises
ValueError naming the problem for a truncated, corrupted or foreign file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "isample-checkpoint"
CHECKPOINT_VERSION = 1
PathLike = Union[str, os.PathLike]


def save_checkpoint(path: PathLike, state: Any) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapper = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
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


def load_checkpoint(path: PathLike, *, map_location: Any = "cpu") -> Any:
    """Read a checkpoint written by save_checkpoint; ValueError if it is not a whole, valid one."""
    path = Path(path)
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated or not a torch file at all
        raise ValueError(f"{path} is not a readable isample checkpoint (truncated or corrupted?): {error}") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an isample checkpoint")
    if wrapper.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {wrapper.get('version')!r}; this isample reads {CHECKPOINT_VERSION}")
    payload = wrapper.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != wrapper.get("sha256"):
        raise ValueError(f"{path} is corrupted: its checksum does not match")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
