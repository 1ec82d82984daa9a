"""Where each of a model's tensors lives in one flat byte buffer: the wire format of a publish.

Both transports use it: the shared-memory board on one machine and the broadcast buffer
across ranks. A publish copies every floating-point tensor of ``model.state_dict()``
(parameters and buffers such as BatchNorm's running statistics, which eval mode reads) into
typed views of the buffer, in one ``torch._foreach_copy_``; a worker copies them back out.
Nothing is pickled per publish.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

__all__ = ["ParameterLayout", "unwrap"]

_ALIGN = 8  # every tensor starts on an 8-byte boundary, so that any dtype can view it


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) and type(model).__name__ in (
        "DistributedDataParallel", "DataParallel"
    ) else model


class _Entry(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the buffer
    nbytes: int


class ParameterLayout:
    """The byte layout of a model's floating-point state: what a publish carries.

    ``nbytes`` is the size of one publish (the tensors' bytes, each rounded up to 8).
    ``signature()`` is equal for two models whose publishes are interchangeable.
    """

    def __init__(self, entries: List[_Entry], nbytes: int) -> None:
        self.entries = entries
        self.nbytes = nbytes

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ParameterLayout":
        """The layout of `model`'s floating-point ``state_dict`` entries, in their order."""
        entries: List[_Entry] = []
        offset = 0
        for name, tensor in _float_state(model):
            nbytes = tensor.numel() * tensor.element_size()
            entries.append(_Entry(name, tuple(tensor.shape), tensor.dtype, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        if not entries:
            raise ValueError("the model has no floating-point parameters or buffers to publish")
        return cls(entries, offset)

    @property
    def numel(self) -> int:
        """Elements published (parameters and floating-point buffers)."""
        return sum(e.nbytes // torch.empty((), dtype=e.dtype).element_size() for e in self.entries)

    def signature(self) -> Tuple[Tuple[str, Tuple[int, ...], str], ...]:
        """(name, shape, dtype) of every entry: equal for interchangeable models."""
        return tuple((e.name, e.shape, str(e.dtype)) for e in self.entries)

    def views(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        """Typed views of a uint8 buffer of ``nbytes``, one per entry, shaped as the tensors."""
        if buffer.dtype is not torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.nbytes:
            raise ValueError(f"the buffer must be uint8 of at least {self.nbytes} bytes")
        return [
            buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries
        ]

    def tensors(self, model: torch.nn.Module) -> List[torch.Tensor]:
        """The model's tensors in layout order (detached), checked against the layout: a model
        that has changed shape since the pool started raises ValueError."""
        state = _float_state(model)
        if len(state) != len(self.entries):
            raise ValueError(
                f"the model has {len(state)} floating-point tensors but the pool was started with "
                f"{len(self.entries)}: pass pool.step() the model the pool was built with"
            )
        out = []
        for (name, tensor), entry in zip(state, self.entries):
            if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(
                    f"the model's tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not match the "
                    f"pool's {entry.name!r} {entry.shape} {entry.dtype}: pass pool.step() the model the "
                    "pool was built with"
                )
            out.append(tensor.detach())
        return out


def copy_all(destinations: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    """destinations[i].copy_(sources[i]) for all i: one fused call when all are on the CPU."""
    if all(t.device.type == "cpu" for t in destinations) and all(t.device.type == "cpu" for t in sources):
        torch._foreach_copy_(destinations, sources)
    else:
        for d, s in zip(destinations, sources):
            d.copy_(s, non_blocking=False)


def _float_state(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in unwrap(model).state_dict(keep_vars=True).items() if v.is_floating_point()]
