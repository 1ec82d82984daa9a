"""Device trees behind the interface of the CPU trees' handles.

A device tree runs the GPU algorithms (csrc/gpu/device_tree.h): on a CUDA device, on the
caller's current stream with no host synchronisation in update or sample; or built for the
CPU (``gpu_on_host``), which is how the tests check those algorithms without a GPU.

Bad data found on the device (an index out of range, a NaN weight, sampling an all-zero
tree...) makes the whole call a no-op, and the first such error is kept on the device. It is
raised by ``check()``, which every synchronising query (``total``, ``num_positive``,
``state_dict``...) calls first; with ``sync_errors=True`` it is checked after every call, at
the cost of a synchronisation. The host build always checks at once (it costs nothing there),
so it raises exactly where the CPU tree does.

One difference remains on the no-sync CUDA path: a draw that the device rejects still
advances the tree's random stream (``stream_calls``), because the host learns of the error
only later. With ``sync_errors=True``, and on the host build, a rejected draw changes nothing.

Whether a CUDA device can be used at all is decided here too (``cuda_problem``): the build
must hold kernels the device can run (machine code of its architecture, or PTX the driver
can compile for it), and the driver must be new enough for the CUDA runtime linked into the
core, which is reported as such rather than as "no device".
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Optional, Sequence, Tuple

import torch

from . import _core


def _version_text(version: int) -> str:
    """CUDA's 1000 * major + 10 * minor as "major.minor"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def kernels_run_on(capability: Tuple[int, int], sass: Sequence[str], ptx: Sequence[str]) -> bool:
    """Whether a device of compute capability ``(major, minor)`` can run kernels built as
    machine code ``sass`` ("sm_80": runs on 8.0 and the later 8.x) and PTX ``ptx``
    ("compute_90": the driver compiles it for 9.0 and every later capability)."""
    major, minor = int(capability[0]), int(capability[1])
    for arch in sass:
        number = int(arch.split("_")[1])
        if number // 10 == major and number % 10 <= minor:
            return True
    return any(int(arch.split("_")[1]) <= 10 * major + minor for arch in ptx)


def _build_text(info: dict) -> str:
    text = ", ".join(info["cuda_archs"])
    ptx = info.get("cuda_ptx", [])
    if ptx:
        oldest = min(int(arch.split("_")[1]) for arch in ptx)
        text += f" and PTX for {', '.join(ptx)} (which runs on compute capability {oldest // 10}.{oldest % 10} and newer)"
    return text


def cuda_problem(device: Optional[int] = None) -> Optional[str]:
    """Why the CUDA back end cannot run on CUDA device ``device`` (None: on any visible
    device), as a sentence that says what to do; None when it can."""
    info = _core.build_info()
    if not info["cuda"]:
        return (
            "device='cuda' is not supported by this build of isample: it was compiled without the CUDA "
            "back end (see isample.build_info(); rebuild with nvcc on PATH)"
        )
    if not torch.cuda.is_available():
        return f"device='cuda' was asked for, but torch {torch.__version__} sees no CUDA device"
    status = _core.cuda_status()
    runtime, driver = status["runtime_version"], status["driver_version"]
    if status["error"]:
        if driver and runtime and driver < runtime:
            return (
                f"the NVIDIA driver supports CUDA up to {_version_text(driver)}, but this build of isample "
                f"links the CUDA {_version_text(runtime)} runtime, which needs a newer driver (CUDA 13.x: "
                "driver 580 or newer). Update the driver, or build isample from source with a CUDA toolkit "
                f"no newer than {_version_text(driver)}"
            )
        if not driver:
            return f"no NVIDIA driver was found by the CUDA runtime linked into isample ({status['error']})"
        return f"the CUDA runtime linked into isample cannot start: {status['error']}"
    devices = status["devices"]
    if not devices:
        return "device='cuda' was asked for, but no CUDA device is visible"
    if device is not None and not 0 <= device < len(devices):
        return f"CUDA device {device} is not visible ({len(devices)} visible)"
    candidates = range(len(devices)) if device is None else [device]
    unsupported = []
    for index in candidates:
        d = devices[index]
        if kernels_run_on(d["capability"], info["cuda_archs"], info.get("cuda_ptx", [])):
            return None
        unsupported.append(f"CUDA device {index} ({d['name']}, compute capability {d['capability'][0]}.{d['capability'][1]})")
    return (
        f"{' and '.join(unsupported)} cannot run this build of isample: it has kernels for "
        f"{_build_text(info)}. Rebuild it from source with ISAMPLE_CUDA_ARCHS naming that architecture"
    )


def cuda_available() -> bool:
    """True when the core was built with CUDA, torch sees a GPU, the driver can run the
    core's CUDA runtime, and some visible device can run the core's kernels."""
    return cuda_problem() is None


class DeviceCore:
    """Wraps an ``_core.DeviceTree`` with the methods of ``_core.SumTree`` / ``SoftmaxTree``.

    Every call runs with the tree's device current (``torch.cuda.device``) and on that
    device's current stream, so a tree on ``cuda:1`` launches there even while ``cuda:0`` is
    the current device.
    """

    def __init__(self, handle: "_core.DeviceTree", device: torch.device, sync_errors: bool) -> None:
        self._handle = handle
        self._device = device
        self._cuda = device.type == "cuda"
        self._sync_errors = sync_errors or not self._cuda

    def _on_device(self) -> ContextManager:
        return torch.cuda.device(self._device) if self._cuda else contextlib.nullcontext()

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream if self._cuda else 0

    def _done(self, stream: int) -> None:
        if self._sync_errors:
            self._handle.check(stream)

    def check(self) -> None:
        with self._on_device():
            self._handle.check(self._stream())

    # -- properties ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._handle.capacity

    @property
    def levels(self) -> int:
        return self._handle.levels

    @property
    def nbytes(self) -> int:
        return self._handle.nbytes

    @property
    def scratch_nbytes(self) -> int:
        """Bytes of scratch the tree holds between calls (large scratch is given back)."""
        return self._handle.scratch_nbytes

    def _status(self) -> dict:
        with self._on_device():
            stream = self._stream()
            self._handle.check(stream)
            return self._handle.status(stream)

    @property
    def total(self) -> float:
        return self._status()["total"]

    @property
    def num_positive(self) -> int:
        return self._status()["positive"]

    @property
    def reference(self) -> float:
        return self._status()["reference"]

    @property
    def log_total(self) -> float:
        status = self._status()
        return status["reference"] / status["temperature"] + math.log(status["total"])

    @property
    def temperature(self) -> float:
        return self._status()["temperature"]

    @temperature.setter
    def temperature(self, value: float) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.set_temperature(value, stream)
            self._done(stream)

    @property
    def stream_seed(self) -> int:
        return self._handle.stream_seed

    @stream_seed.setter
    def stream_seed(self, value: int) -> None:
        self._handle.stream_seed = value

    @property
    def stream_calls(self) -> int:
        return self._handle.stream_calls

    @stream_calls.setter
    def stream_calls(self, value: int) -> None:
        self._handle.stream_calls = value

    # -- calls ----------------------------------------------------------------------------------
    def update(self, indices: int, values: int, k: int, keep: float = 0.0) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.update(indices, values, k, keep, stream)
            self._done(stream)

    def assign(self, values: int) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.assign(values, stream)
            self._done(stream)

    def load(self, scores: int, reference: float) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.load(scores, reference, stream)
            self._done(stream)

    def get(self, indices: int, k: int, out: int) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.get(indices, k, out, stream)
            self._done(stream)

    def probability(self, indices: int, k: int, out: int) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.probability(indices, k, out, stream)
            self._done(stream)

    def sample_from_uniforms(self, u: int, k: int, out: int) -> None:
        with self._on_device():
            stream = self._stream()
            self._handle.sample_from_uniforms(u, k, out, stream)
            self._done(stream)

    # Draws check inside the core, before the tree's stream advances, so that a rejected
    # draw leaves stream_calls unchanged (with sync_errors; see the module docstring).
    def sample(self, k: int, replace: bool, out: int, seed: Optional[int] = None, method: str = "auto") -> None:
        with self._on_device():
            self._handle.sample(k, replace, out, seed, method, self._stream(), self._sync_errors)

    def sample_with_inclusion(self, k: int, out: int, inclusion: int, seed: Optional[int] = None) -> None:
        with self._on_device():
            self._handle.sample_with_inclusion(k, out, inclusion, seed, self._stream(), self._sync_errors)

    def _export(self, out: int) -> None:
        indices = torch.arange(self.capacity, dtype=torch.int64, device=self._device)
        self.get(indices.data_ptr(), self.capacity, out)

    export_leaves = _export
    export_scores = _export
