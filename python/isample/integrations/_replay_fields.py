"""The replay buffer's field storage: one tensor of shape (capacity, *item_shape) per field.

The first ``add`` defines the fields (names, item shapes, dtypes). Every later value is
checked against them before anything is written: same names and shapes, a dtype that casts
safely (``torch.can_cast``), and integers that fit a narrower integer field.

On the CPU the compiled core writes one item and gathers the rows of a batch in the same
call as the tree's work (``isample._core.ReplayStore``, given ``core_fields``: which values
each field takes as they are). For values it does not take, each field keeps a numpy view
of its tensor (same memory): the one-transition ``add`` then takes a path whose checks are
a few type and shape comparisons per field (``prepare_one``), with everything else going
through the general checks. All three store the same bits.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .._backend import take_rows
from ..sampler import allocate, check_fits

__all__ = ["FieldStorage", "as_field", "RESERVED"]

#: names ``sample`` uses for its own output ("indexes" is cpprb's name for "indices")
RESERVED = ("indices", "indexes", "weights", "priorities")

_NUMPY_DTYPES = tuple(
    np.dtype(d)
    for d in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64, np.complex64, np.complex128)
)
_TORCH_OF_NUMPY = {d: torch.from_numpy(np.zeros(0, d)).dtype for d in _NUMPY_DTYPES}
#: field dtypes the core's one-call replay paths write and gather (csrc/replay_fields.h)
_CORE_DTYPES = frozenset(
    (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
     torch.uint64, torch.float32, torch.float64)
)
#: the core's codes for the Python numbers a field takes as they are
_PYTHON_KIND_CODES = {bool: 1, int: 2, float: 4}


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype is torch.bool)


def _numpy_dtype(dtype: torch.dtype) -> Optional[np.dtype]:
    """The numpy dtype with the same memory layout, or None (bfloat16, float8, ...)."""
    for np_dtype, torch_dtype in _TORCH_OF_NUMPY.items():
        if torch_dtype is dtype:
            return np_dtype
    return None


def _needs_range_check(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether integers of `src` may not fit `dst` (int64 into uint8, uint64 into int64, ...)."""
    if not (_is_integer(src) and _is_integer(dst)):
        return False
    a, b = _numpy_dtype(src), _numpy_dtype(dst)
    return a is None or b is None or not np.can_cast(a, b, casting="safe")


def as_field(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A field's value as a tensor on `device`: tensors, numpy arrays and scalars, Python
    numbers and (nested) sequences of numbers. Anything else is a TypeError naming the field."""
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided:
            raise TypeError(f"field {name!r} is a {value.layout} tensor: pass a dense one (.to_dense())")
        return value.detach().resolve_conj().resolve_neg().to(device)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"field {name!r} must be numeric, got {type(value).__name__} {value!r}")
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"field {name!r} must be numeric, got a numpy array of dtype {array.dtype}")
        if array.dtype.kind in "fc" and array.dtype.itemsize > (8 if array.dtype.kind == "f" else 16):
            raise TypeError(f"field {name!r}: torch has no {array.dtype} (long double): convert it with .astype(np.float64)")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            array = array.copy(order="C")
        return torch.from_numpy(array).to(device)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValueError(f"field {name!r}: {value} does not fit in a 64-bit integer")
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(f"field {name!r} must be a tensor, an array or a number: {error}") from None


def _check_range(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Refuse integers that would wrap around when stored in a narrower integer field."""
    if value.numel() == 0:
        return
    array = value.detach().cpu().numpy()
    info = np.iinfo(_numpy_dtype(dtype))
    lo, hi = int(array.min()), int(array.max())
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"field {name!r} is stored as {dtype}, which holds {info.min}..{info.max}; got values in {lo}..{hi}"
        )


class _Spec:
    """What the fast one-item path needs to know of one field."""

    __slots__ = ("name", "view", "shape", "numpy_ok", "torch_ok", "python_ok", "int_range")

    def __init__(self, name: str, store: torch.Tensor) -> None:
        dtype = store.dtype
        self.name = name
        self.shape = tuple(store.shape[1:])
        self.view = store.numpy() if store.device.type == "cpu" and _numpy_dtype(dtype) is not None else None
        safe = [d for d in _NUMPY_DTYPES if torch.can_cast(_TORCH_OF_NUMPY[d], dtype) and not _needs_range_check(_TORCH_OF_NUMPY[d], dtype)]
        self.numpy_ok = frozenset(safe)
        self.torch_ok = frozenset(_TORCH_OF_NUMPY[d] for d in safe)
        python_ok = [bool]
        if dtype is torch.int64 or dtype.is_floating_point or dtype.is_complex:
            python_ok.append(int)
        if dtype.is_floating_point or dtype.is_complex:
            python_ok.append(float)
        self.python_ok = tuple(python_ok)
        # a Python int numpy can write into the field without raising
        self.int_range = (-(2**63), 2**63 - 1) if dtype is torch.int64 else (-math.inf, math.inf)


class FieldStorage:
    """The fields of a replay buffer: name -> tensor (capacity, *item_shape), on one device."""

    def __init__(self, storage: Dict[str, torch.Tensor]) -> None:
        self.storage = storage
        self._specs = tuple(_Spec(name, store) for name, store in storage.items())
        self._fast = all(spec.view is not None for spec in self._specs)

    # -- definition -----------------------------------------------------------------------
    @staticmethod
    def define(
        values: Mapping[str, torch.Tensor], batched: bool, capacity: int, device: torch.device, bool_as_float: bool
    ) -> "FieldStorage":
        """Allocate the fields for the first ``add`` (zeros), after checking they fit in memory."""
        for name in values:
            if name in RESERVED:
                raise ValueError(f"{name!r} is reserved for sample()'s output: rename the field")
        layout = {}
        for name, v in values.items():
            shape = tuple(v.shape[1:]) if batched else tuple(v.shape)
            dtype = torch.float32 if (bool_as_float and v.dtype is torch.bool) else v.dtype
            layout[name] = (shape, dtype)
        return FieldStorage.allocate(layout, capacity, device)

    @staticmethod
    def allocate(layout: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]], capacity: int, device: torch.device) -> "FieldStorage":
        """Zeroed fields of `layout` (name -> (item_shape, dtype)); MemoryError naming the
        bytes, before allocating, when they cannot fit in the device's memory."""
        nbytes = {
            name: capacity * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            for name, (shape, dtype) in layout.items()
        }
        check_fits(f"the replay buffer's fields for {capacity:,} items", nbytes, device)
        storage = {
            name: allocate(f"field {name!r}", nbytes[name], lambda s=shape, d=dtype: torch.zeros((capacity, *s), dtype=d, device=device))
            for name, (shape, dtype) in layout.items()
        }
        return FieldStorage(storage)

    @property
    def layout(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        return {name: (tuple(t.shape[1:]), t.dtype) for name, t in self.storage.items()}

    # -- checks ---------------------------------------------------------------------------
    def check(self, values: Dict[str, torch.Tensor], batched: bool) -> Tuple[int, Dict[str, torch.Tensor]]:
        """(number of items, the values in the fields' dtypes), after checking every value;
        raises KeyError, ValueError or TypeError naming the field otherwise."""
        if values.keys() != self.storage.keys():
            missing, extra = sorted(set(self.storage) - set(values)), sorted(set(values) - set(self.storage))
            raise KeyError(
                f"add() got fields {sorted(values)}; the buffer stores {sorted(self.storage)} "
                f"(missing {missing}, unknown {extra})"
            )
        count = None
        converted = {}
        for name, v in values.items():
            store = self.storage[name]
            item_shape = tuple(store.shape[1:])
            if batched:
                if v.dim() == 0 or tuple(v.shape[1:]) != item_shape:
                    raise ValueError(f"field {name!r}: a batch must have shape (k, *{item_shape}), got {tuple(v.shape)}")
                if count is None:
                    count = v.shape[0]
                elif v.shape[0] != count:
                    raise ValueError(f"fields hold different numbers of items ({count} and {v.shape[0]} for {name!r})")
            elif tuple(v.shape) != item_shape:
                hint = (
                    "; add(**fields) stores one item: pass a batch as a dict, add({'name': batch, ...})"
                    if tuple(v.shape[1:]) == item_shape
                    else ""
                )
                raise ValueError(f"field {name!r} must have shape {item_shape}, got {tuple(v.shape)}{hint}")
            if not torch.can_cast(v.dtype, store.dtype):
                raise TypeError(f"field {name!r} is stored as {store.dtype}; a {v.dtype} value would not cast safely")
            if _needs_range_check(v.dtype, store.dtype):
                _check_range(v, store.dtype, name)
            converted[name] = v.to(store.dtype)
        return (1 if count is None else count), converted

    def prepare_one(self, fields: Mapping[str, Any]) -> Optional[List[Any]]:
        """The values of one item ready to write, when each is a Python number, a numpy value or a
        CPU tensor of the field's exact shape and a dtype that needs no check; None otherwise
        (then ``check`` decides, and explains any refusal)."""
        if not self._fast or len(fields) != len(self._specs):
            return None
        ready = []
        for spec in self._specs:
            v = fields.get(spec.name, fields)  # `fields` itself marks a missing name
            kind = type(v)
            if kind is float or kind is int or kind is bool:
                if spec.shape or kind not in spec.python_ok:
                    return None
                if kind is int and not spec.int_range[0] <= v <= spec.int_range[1]:
                    return None
            elif kind is np.ndarray or isinstance(v, np.generic):
                if v.dtype not in spec.numpy_ok or v.shape != spec.shape:
                    return None
            elif kind is torch.Tensor:
                if v.dtype not in spec.torch_ok or v.shape != spec.shape or not v.is_cpu or v.is_neg() or v.layout is not torch.strided:
                    return None
                v = v.detach().numpy()
            else:
                return None
            ready.append(v)
        return ready

    # -- writing and reading --------------------------------------------------------------
    def write_one(self, slot: int, ready: List[Any]) -> None:
        """Write ``prepare_one``'s values into `slot` (cannot fail: every value was checked)."""
        for spec, v in zip(self._specs, ready):
            spec.view[slot] = v

    def write(self, slots: torch.Tensor, values: Mapping[str, torch.Tensor], batched: bool, skip: int) -> None:
        """Write ``check``'s values (a batch's last items from `skip` on) into `slots`."""
        for name, v in values.items():
            self.storage[name][slots] = v[skip:] if batched else v.unsqueeze(0)

    def gather(self, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Each field's items at `indices` (int64 (k,) on the fields' device), new tensors
        (on the CPU read by the core in one call)."""
        return dict(zip(self.storage, take_rows(list(self.storage.values()), indices)))

    def core_fields(self) -> Optional[List[Tuple[str, torch.Tensor, List[str], int]]]:
        """What the core's one-call paths (``isample._core.ReplayStore.add_field``) need of each
        field: its name, its storage, the numpy dtype names it takes as they are and the Python
        numbers it takes (codes: bool 1, int 2, float 4). None when some field lives off the
        CPU or has a dtype the core does not write (float16, bfloat16, complex)."""
        out = []
        for spec in self._specs:
            store = self.storage[spec.name]
            if spec.view is None or store.dtype not in _CORE_DTYPES or not store.is_contiguous():
                return None
            python = sum(_PYTHON_KIND_CODES[kind] for kind in spec.python_ok)
            out.append((spec.name, store, sorted(d.name for d in spec.numpy_ok), python))
        return out

    def head(self, size: int) -> Dict[str, torch.Tensor]:
        """Copies of the first `size` items of each field (for ``state_dict``)."""
        return {name: t[:size].clone() for name, t in self.storage.items()}

    @staticmethod
    def from_state(saved: Any, size: int, capacity: int, device: torch.device) -> "FieldStorage":
        """Fields of `capacity` items holding a state's `size` saved items, after checking them."""
        if not isinstance(saved, Mapping):
            raise ValueError(f"state['storage'] must be a dict of tensors, got {type(saved).__name__}")
        if size > 0 and not saved:
            raise ValueError(f"the state holds {size} items but no fields")
        layout = {}
        for name, t in saved.items():
            if not isinstance(name, str) or name in RESERVED:
                raise ValueError(f"state['storage'] has a field named {name!r}: names are strings other than {RESERVED}")
            if not isinstance(t, torch.Tensor) or t.layout is not torch.strided or t.dim() == 0 or t.shape[0] != size:
                raise ValueError(f"state['storage'][{name!r}] must be a dense tensor of {size} items")
            layout[name] = (tuple(t.shape[1:]), t.dtype)
        fields = FieldStorage.allocate(layout, capacity, device)
        for name, t in saved.items():
            fields.storage[name][:size] = t.to(device)
        return fields

