"""Argument conversion between the public API and the compiled core.

Every array argument may be a torch tensor, a numpy array or a Python sequence. It becomes a
contiguous 1-D torch tensor of the right dtype on the tree's device, whose address is then
passed to ``isample._core`` (which knows nothing of torch). Results are torch tensors.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _core, _device

DeviceLike = Union[str, torch.device]

# Trees on the CPU share this object, so hot paths test `device is CPU` (a pointer
# comparison) instead of reading device attributes, which costs more than a tree descent.
CPU = torch.device("cpu")

#: whether the core's fast paths read torch tensors and make result tensors themselves
#: (DLPack's C exchange API, torch >= 2.10); numpy arrays are read in any case. Where it is
#: False, every call takes the general path below, which converts arguments in Python.
def configure_fast_paths() -> bool:
    """Tell the core which types its fast paths read (the tests switch them off and on)."""
    return bool(_core.configure_arrays(torch.Tensor, np.ndarray, torch.float64, torch.float32, CPU))


FAST_TENSORS = configure_fast_paths()


#: the largest int64: epochs, counts and indices must fit in one
MAX_INT64 = 2**63 - 1
_GIB = 1024.0**3


def resolve_device(device: DeviceLike) -> torch.device:
    """The torch.device of a tree, or a clear error for one it cannot live on."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be 'cpu', 'cuda' or a torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from error
    if resolved.type == "cpu":
        return CPU
    if resolved.type == "cuda":
        # the build, torch, the driver and the device's compute capability, in that order
        available = _core.build_info()["cuda"] and torch.cuda.is_available()
        index = resolved.index if resolved.index is not None else (torch.cuda.current_device() if available else 0)
        problem = _device.cuda_problem(index)
        if problem is not None:
            raise ValueError(problem)
        return torch.device("cuda", index)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def check_count(k: Any, name: str = "k", *, limit: int = MAX_INT64) -> int:
    """A Python int in [0, limit] (numpy and 0-d integer tensors accepted)."""
    if type(k) is int and 0 <= k <= limit:
        return k
    if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and not k.is_complex() and k.dtype != torch.bool:
        k = int(k)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    if k > limit:
        raise ValueError(f"{name} must be at most {limit:,}, got {k:,}")
    return k


def check_real(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """`value` as a Python float: any real number (Python, numpy, a 0-d real tensor or array),
    so that saved configurations hold plain Python numbers. TypeError for anything else,
    ValueError when it is not finite (with ``finite``) or outside [low, high] (an end is
    left out with low_open / high_open)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.is_complex() or value.dtype is torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        if value.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a real number, got a 0-d array of dtype {value.dtype}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r:.40}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        number = math.inf if value > 0 else -math.inf
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number{'' if bounds == '[-inf, inf]' else ' in ' + bounds}, got {value!r}")
    if number < low or number > high or (low_open and number == low) or (high_open and number == high):
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return number


def same_value(a: Any, b: Any) -> bool:
    """a == b as a plain truth value; False (not an error) when the comparison gives none (a
    tensor or array in a mangled state)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - any failure to compare means "not the same"
        return False


def check_bool(value: Any, name: str) -> bool:
    """A Python bool from a bool or numpy bool; TypeError for anything else (a string such as
    "false" would otherwise count as True)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    """One of `choices` (strings, or None), returned as a plain Python str; ValueError naming
    the choices otherwise."""
    if value is None and None in choices:
        return None
    if isinstance(value, str) and value in choices:
        return str(value)  # numpy's str_ becomes str: saved configs hold plain Python values
    listed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name} must be one of {listed}, got {value!r:.60}")


def torch_device(device: Any, name: str = "device") -> torch.device:
    """A torch.device for results (any kind torch knows); ValueError naming the argument."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from None


def check_float_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """A floating torch.dtype: weights cast to an integer type would be truncated."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.float32, got {dtype!r:.40}")
    if not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating dtype (torch.float16/32/64, bfloat16), got {dtype}")
    return dtype


def checked_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    """A dense tensor on the CPU or a CUDA device whose memory reads as its values: lazily
    negated or conjugated views (``x.conj().imag``) are resolved, since the core reads raw
    memory. TypeError for sparse, quantized, nested or meta tensors."""
    if t.layout is not torch.strided or t.is_quantized or t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}: call .to_dense() first")
    if t.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{name} must be on the CPU or a CUDA device, got a tensor on {t.device}")
    if t.is_neg() or t.is_conj():
        t = t.resolve_neg().resolve_conj()
    return t


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return checked_tensor(x, name)
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    # Sequences go through numpy, not torch.as_tensor: torch would make Python floats float32
    # (its default dtype) and lose precision before they ever reach float64.
    try:
        array = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"{name} must be an array of numbers: {error}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
    if not array.dtype.isnative:  # big-endian data: torch reads native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: torch has none
        array = array.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(array))


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.is_cpu if device is CPU else t.device == device


def _check_1d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def as_indices(x: Any, device: torch.device, name: str = "indices") -> torch.Tensor:
    """int64, contiguous, 1-D, on `device`. Floating, bool or complex input is a TypeError."""
    if (
        type(x) is torch.Tensor
        and x.dtype is torch.int64
        and x.dim() == 1
        and x.is_contiguous()
        and _on(x, device)
        and not x.is_neg()
    ):
        return x
    if isinstance(x, (list, tuple)) and len(x) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    t = _as_tensor(x, name)
    if t.dtype is torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    _check_1d(t, name)
    out = t.to(device=device, dtype=torch.int64).contiguous()
    if t.dtype is torch.uint64 and out.numel() and bool((out < 0).any()):  # wrapped around
        raise IndexError(f"{name} holds values above {MAX_INT64:,}: outside every tree")
    return out


def as_values(x: Any, device: torch.device, length: int, name: str = "values") -> torch.Tensor:
    """float64, contiguous, 1-D of `length`, on `device`; a Python scalar is broadcast."""
    if (
        type(x) is torch.Tensor
        and x.dtype is torch.float64
        and x.dim() == 1
        and x.is_contiguous()
        and x.numel() == length
        and _on(x, device)
        and not x.is_neg()
    ):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        try:
            value = float(x)
        except OverflowError:  # an int beyond float64 is not a finite weight or score
            value = math.inf if x > 0 else -math.inf
        return torch.full((length,), value, dtype=torch.float64, device=device)
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


def take_rows(sources: Sequence[torch.Tensor], indices: torch.Tensor) -> List[torch.Tensor]:
    """``[s[indices] for s in sources]`` (new tensors): read by the core in one call where
    every source is a C-contiguous CPU tensor of a real or integer dtype and `indices` a
    plain int64 CPU tensor; by torch otherwise. An index outside a source raises IndexError."""
    taken = _core.take_rows(list(sources), indices)
    if taken is not None:
        return taken
    return [source[indices] for source in sources]


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


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed as a Python int in [0, 2**64) (negative ones wrap around)."""
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not (seed.is_floating_point() or seed.is_complex() or seed.dtype is torch.bool):
        seed = int(seed)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    return int(seed) % 2**64


# -- memory -------------------------------------------------------------------------------------
def memory_of(device: torch.device) -> Optional[int]:
    """Bytes of memory on `device` (physical RAM for the CPU), or None where unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_fits(what: str, parts: Dict[str, int], device: torch.device) -> None:
    """MemoryError, naming the bytes needed, when `parts` (name -> bytes) cannot fit in the
    device's memory. Checked before allocating: with overcommit a huge allocation can succeed
    and the process be killed later, when its pages are first touched."""
    needed = sum(parts.values())
    available = memory_of(device)
    if available is not None and needed > available:
        detail = ", ".join(f"{name} {nbytes / _GIB:.2f} GiB" for name, nbytes in parts.items())
        raise MemoryError(
            f"{what} needs {needed:,} bytes ({needed / _GIB:.2f} GiB: {detail}) but this "
            f"{'GPU' if device.type == 'cuda' else 'machine'} has {available / _GIB:.2f} GiB of memory"
        )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's (or numpy's) failure to allocate."""
    if isinstance(error, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def allocate(what: str, nbytes: int, make: Callable[[], Any]) -> Any:
    """``make()``, with an allocation failure (torch's RuntimeError) raised as MemoryError
    naming `what` and the bytes it needed."""
    try:
        return make()
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            message = f"could not allocate {nbytes:,} bytes ({nbytes / _GIB:.2f} GiB) for {what}: {error}"
            raise MemoryError(message) from None
        raise


def build_info() -> dict:
    """How the compiled core was built: ``cuda``, ``cuda_archs``, ``gpu_on_host``, ``fanout``."""
    return dict(_core.build_info())


def cuda_available() -> bool:
    """True when the core was built with CUDA, torch sees a GPU, the driver can run the core's
    CUDA runtime, and some visible device can run the core's kernels (see _device.cuda_problem)."""
    return _device.cuda_available()
