"""What a scorer sends the trainer, as bytes: the same format through a pipe on one machine
and through point-to-point sends across ranks.

A message is a 32-byte header of four little-endian int64 ``(kind, worker, version, count)``
followed by its body:

- ``SCORES``: ``count`` int64 item indices, then ``count`` float64 scores (16 bytes per item;
  4,128 bytes for a batch of 256). ``version`` is the trainer step whose parameters scored them.
- ``ERROR``: ``count`` bytes of UTF-8 text, the worker's formatted traceback.
- ``BYE``: no body; a scorer rank says it has stopped (the last message it sends).

Decoding never trusts the bytes: a short or inconsistent message decodes to ``Bad`` with the
reason, which the trainer refuses and counts like any other bad message.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Union

import numpy as np

__all__ = ["SCORES", "ERROR", "BYE", "HEADER_BYTES", "Scores", "Error", "Bye", "Bad", "encode_scores",
           "encode_error", "encode_bye", "decode", "message_bytes"]

SCORES, ERROR, BYE = 1, 2, 3
_HEADER = struct.Struct("<4q")
HEADER_BYTES = _HEADER.size  # 32


class Scores(NamedTuple):
    """Scores of `indices`, computed with the parameters published at step `version`."""

    worker: int
    version: int
    indices: np.ndarray  # int64 (b,)
    scores: np.ndarray  # float64 (b,)


class Error(NamedTuple):
    """A worker failed; `text` is its traceback."""

    worker: int
    text: str


class Bye(NamedTuple):
    """A scorer rank has stopped."""

    worker: int


class Bad(NamedTuple):
    """Bytes that do not decode to a message; `reason` says why."""

    worker: int
    reason: str


Message = Union[Scores, Error, Bye, Bad]


def message_bytes(batch_size: int) -> int:
    """Bytes of a score message for a batch of `batch_size` items: 32 + 16 b."""
    return HEADER_BYTES + 16 * batch_size


def encode_scores(worker: int, version: int, indices: np.ndarray, scores: np.ndarray) -> bytes:
    """A SCORES message: `worker` scored items `indices` with the parameters of step `version`."""
    indices = np.ascontiguousarray(indices, dtype="<i8")
    scores = np.ascontiguousarray(scores, dtype="<f8")
    return _HEADER.pack(SCORES, worker, version, indices.size) + indices.tobytes() + scores.tobytes()


def encode_error(worker: int, text: str, limit: int = 1 << 20) -> bytes:
    """An ERROR message carrying `text` (a traceback), cut to its last `limit` bytes."""
    body = text.encode("utf-8", "replace")
    if len(body) > limit:  # keep the end of a traceback: that is where the error is
        body = b"...\n" + body[len(body) - limit + 4 :]
    return _HEADER.pack(ERROR, worker, 0, len(body)) + body


def encode_bye(worker: int) -> bytes:
    """A BYE message: the scorer has stopped and sends nothing more."""
    return _HEADER.pack(BYE, worker, 0, 0)


def decode(data: Union[bytes, bytearray, memoryview], worker: int) -> Message:
    """The message in `data`, sent by `worker` (the header's own worker field is checked)."""
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        return Bad(worker, f"{len(view)} bytes, shorter than a header")
    kind, sender, version, count = _HEADER.unpack_from(view)
    if sender != worker:
        return Bad(worker, f"the message says it comes from worker {sender}")
    if count < 0:
        return Bad(worker, f"negative count {count}")
    body = len(view) - HEADER_BYTES
    if kind == SCORES:
        if body < 16 * count:
            return Bad(worker, f"{count} items announced but {body} bytes of body")
        indices = np.frombuffer(view, dtype="<i8", count=count, offset=HEADER_BYTES)
        scores = np.frombuffer(view, dtype="<f8", count=count, offset=HEADER_BYTES + 8 * count)
        return Scores(worker, version, indices, scores)
    if kind == ERROR:
        if body < count:
            return Bad(worker, f"an error of {count} bytes announced but {body} bytes of body")
        return Error(worker, bytes(view[HEADER_BYTES : HEADER_BYTES + count]).decode("utf-8", "replace"))
    if kind == BYE:
        return Bye(worker)
    return Bad(worker, f"unknown message kind {kind}")
