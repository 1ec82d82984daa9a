"""Argument conversion between the public API and the compiled core.

Every array argument may be a torch tensor, a numpy array or a Python sequence. It becomes a
contiguous 1-D torch tensor of the right dtype on the tree's device, whose address is then
passed to ``isample._core`` (which knows nothing of torch). Results are torch tensors.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import numpy as np
import torch

from . import _core

DeviceLike = Union[str, torch.device]

# Trees on the CPU share this object, so hot paths test `device is CPU` (a pointer
# comparison) instead of reading device attributes, which costs more than a tree descent.
CPU = torch.device("cpu")


def resolve_device(device: DeviceLike) -> torch.device:
    """The torch.device of a tree, or a clear error for one it cannot live on."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from error
    if resolved.type == "cpu":
        return CPU
    if resolved.type == "cuda":
        if not _core.build_info()["cuda"]:
            raise ValueError(
                "device='cuda' is not supported by this build of isample: it was compiled "
                "without the CUDA back end (see isample.build_info(); rebuild with nvcc on PATH)"
            )
        if not torch.cuda.is_available() or _core.cuda_device_count() == 0:
            raise ValueError("device='cuda' was asked for, but no CUDA device is visible")
        return torch.device("cuda", resolved.index if resolved.index is not None else torch.cuda.current_device())
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def check_count(k: Any, name: str = "k") -> int:
    """A non-negative Python int (numpy and 0-d integer tensors accepted)."""
    if type(k) is int and k >= 0:
        return k
    if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and k.dtype != torch.bool:
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return k


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    # Sequences go through numpy, not torch.as_tensor: torch would make Python floats float32
    # (its default dtype) and lose precision before they ever reach float64.
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of numbers: {error}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.is_cpu if device is CPU else t.device == device


def _check_1d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def as_indices(x: Any, device: torch.device, name: str = "indices") -> torch.Tensor:
    """int64, contiguous, 1-D, on `device`. Floating, bool or complex input is a TypeError."""
    if type(x) is torch.Tensor and x.dtype is torch.int64 and x.dim() == 1 and x.is_contiguous() and _on(x, device):
        return x
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    t = _as_tensor(x, name)
    if t.dtype is torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    _check_1d(t, name)
    return t.to(device=device, dtype=torch.int64).contiguous()


def as_values(x: Any, device: torch.device, length: int, name: str = "values") -> torch.Tensor:
    """float64, contiguous, 1-D of `length`, on `device`; a Python scalar is broadcast."""
    if (
        type(x) is torch.Tensor
        and x.dtype is torch.float64
        and x.dim() == 1
        and x.is_contiguous()
        and x.numel() == length
        and _on(x, device)
    ):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return torch.full((length,), float(x), dtype=torch.float64, device=device)
    if isinstance(x, (list, tuple)) and len(x) == 0:
        t = torch.empty(0, dtype=torch.float64)
    else:
        t = _as_tensor(x, name)
    if t.dtype is torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    _check_1d(t, name)
    if t.shape[0] != length:
        raise ValueError(f"{name} has {t.shape[0]} entries but {length} were expected")
    return t.to(device=device, dtype=torch.float64).contiguous()


def empty_indices(k: int, device: torch.device) -> torch.Tensor:
    # numpy's allocator is faster than torch.empty for the small outputs of a training step
    if device is CPU:
        return torch.from_numpy(np.empty(k, dtype=np.int64))
    return torch.empty(k, dtype=torch.int64, device=device)


def empty_values(k: int, device: torch.device) -> torch.Tensor:
    if device is CPU:
        return torch.from_numpy(np.empty(k, dtype=np.float64))
    return torch.empty(k, dtype=torch.float64, device=device)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from `generator` (CPU or CUDA), or from torch's default CPU generator.

    The number is drawn on the generator's device; for a CUDA generator, reading it back
    is one host synchronisation (pass ``seed=`` to avoid it on a hot path).
    """
    device = generator.device if generator is not None else None
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device).item())


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed) % 2**64


def build_info() -> dict:
    """How the compiled core was built: ``cuda``, ``cuda_archs``, ``gpu_on_host``, ``fanout``."""
    return dict(_core.build_info())


def cuda_available() -> bool:
    """True when the core was built with CUDA, and both torch and the core see a GPU."""
    return bool(_core.build_info()["cuda"]) and torch.cuda.is_available() and _core.cuda_device_count() > 0
