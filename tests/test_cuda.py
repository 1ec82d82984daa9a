"""CUDA back end: a static check that runs everywhere, and tests that need a GPU (marked
`cuda`, skipped without one). The GPU algorithms themselves are tested without a GPU in
test_gpu_on_host.py."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import isample
from conftest import ALPHA, chi_square_pvalue, power_of_two_weights, reference_descent

GPU_SOURCES = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "gpu"
REPOSITORY = GPU_SOURCES.parents[1]

# The DeviceTree methods that update / sample run, the roots of the scan. Everything they
# call that is defined under csrc/gpu is followed, transitively.
HOT_ROOTS = ["update", "get", "probability", "sample_from_uniforms", "sample", "sample_distinct"]
# Helpers the scan must reach from those roots (else the parser has gone blind: fix it).
MUST_REACH = [
    "prepare_batch", "resum_levels", "run_rebase", "begin_call", "for_each", "reserve", "release",
    "sort_pairs", "sort_temp_bytes", "release_race_scratch", "trim_batch_scratch", "on",
    "allocate_async", "release_async", "policy", "zero_async", "copy_async",
]
# Calls that synchronise the host with the device, or may.
SYNCHRONISING = {
    r"\bcudaMalloc(?!Async)\w*\s*\(": "cudaMalloc (use stream-ordered cudaMallocAsync)",
    r"\bcudaFree(?!Async)\w*\s*\(": "cudaFree (use stream-ordered cudaFreeAsync)",
    r"\bcudaDeviceSynchronize\b": "cudaDeviceSynchronize",
    r"\bcudaStreamSynchronize\b": "cudaStreamSynchronize",
    r"\bcudaEventSynchronize\b": "cudaEventSynchronize",
    r"\bcudaMemcpy(?!Async)\w*\s*\(": "a blocking cudaMemcpy",
    r"\bcudaMemset(?!Async)\w*\s*\(": "a blocking cudaMemset",
    r"cudaMemcpyDeviceToHost": "a copy to the host",
    r"\bdevice_vector\b": "thrust::device_vector (allocates and frees)",
    r"\bthrust::device\b": "the synchronising thrust::device policy",
    r"\bthrust::cuda::par\b(?!_nosync)": "the synchronising thrust::cuda::par policy",
}
KEYWORDS = {"if", "for", "while", "switch", "catch", "return", "sizeof", "alignof", "decltype", "static_assert",
            "defined", "operator", "noexcept"}


def strip_comments_and_strings(source: str) -> str:
    """The source with comments removed and string / character literals emptied, so that
    braces and names inside them are not mistaken for code."""
    pattern = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'", re.S)
    return pattern.sub(lambda m: '""' if m.group(0)[0] == '"' else ("''" if m.group(0)[0] == "'" else " "), source)


def _matching(text: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for position in range(start, len(text)):
        depth += (text[position] == opening) - (text[position] == closing)
        if depth == 0:
            return position + 1
    raise ValueError("unbalanced brackets")


def as_cuda_build(source: str) -> str:
    """The source as the CUDA build compiles it: the branches of `#if defined(__CUDACC__)`
    (or `#ifdef __CUDACC__`) kept, their `#else` branches (the host build's) dropped, so
    that a host-only helper is not mistaken for a CUDA one of the same name. Other
    conditionals keep both branches."""
    kept, stack = [], []  # stack: per open #if, None (not about __CUDACC__) or whether its branch is live
    for line in source.splitlines():
        directive = re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", line)
        if directive:
            word, condition = directive.groups()
            if word in ("if", "ifdef", "ifndef"):
                if "__CUDACC__" in condition:
                    negated = word == "ifndef" or re.search(r"!\s*defined", condition) is not None
                    stack.append(not negated)
                else:
                    stack.append(None)
            elif word in ("elif", "else") and stack and stack[-1] is not None:
                stack[-1] = not stack[-1]
            elif word == "endif" and stack:
                stack.pop()
            continue
        if all(live is not False for live in stack):
            kept.append(line)
    return "\n".join(kept)


def function_bodies(source: str) -> dict:
    """name -> bodies of every function, member function and constructor defined in `source`
    (all overloads, by bare name; destructors as ~Name). Initializer lists are part of a
    constructor's body, since they run its allocations."""
    text = strip_comments_and_strings(source)
    bodies: dict = {}
    for match in re.finditer(r"(~?)\b([A-Za-z_]\w*)\s*\(", text):
        name = match.group(2)
        if name in KEYWORDS:
            continue
        after = _matching(text, match.end() - 1, "(", ")")
        tail = re.match(r"\s*(?:(?:const|override|final|noexcept|mutable)\b\s*)*", text[after:])
        position = after + tail.end()
        if text.startswith("->", position):  # trailing return type
            brace = text.find("{", position)
            if brace < 0 or ";" in text[position:brace]:
                continue
            position = brace
        start = position
        if text.startswith(":", position) and not text.startswith("::", position):
            # a constructor's initializer list: items name(...) or name{...}, comma-separated
            position += 1
            while True:
                item = re.match(r"\s*[\w:<>]+\s*([({])", text[position:])
                if item is None:
                    break
                open_at = position + item.start(1)
                position = _matching(text, open_at, text[open_at], ")" if text[open_at] == "(" else "}")
                separator = re.match(r"\s*,", text[position:])
                if separator is None:
                    break
                position += separator.end()
            position += len(text[position:]) - len(text[position:].lstrip())
        if not text.startswith("{", position):
            continue
        end = _matching(text, position, "{", "}")
        bodies.setdefault(match.group(1) + name, []).append(text[start:end])
    return bodies


def called_names(body: str) -> set:
    """Bare names of everything called in `body` (free, member and qualified calls, and
    templates called with explicit arguments: name<T, U>(...))."""
    pattern = r"\b([A-Za-z_]\w*)\s*(?:<[^<>;{}()]*>)?\s*\("
    return {name for name in re.findall(pattern, body) if name not in KEYWORDS}


def hot_path_violations(sources: dict, roots=HOT_ROOTS) -> tuple:
    """Scan `sources` ({file name: text}) from the DeviceTree methods `roots`, following every
    call to a function defined in those sources (and the destructor of anything constructed).
    Returns (problems, names reached); a problem reads "root -> helper ... calls X"."""
    bodies: dict = {}
    for text in sources.values():
        for name, found in function_bodies(as_cuda_build(text)).items():
            bodies.setdefault(name, []).extend(found)
    problems, reached, pending = [], set(), [r for r in roots if r in bodies]
    missing = [r for r in roots if r not in bodies]
    problems += [f"root {r} not found: update the scan" for r in missing]
    paths = {r: r for r in pending}
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        for body in bodies[name]:
            for pattern, what in SYNCHRONISING.items():
                if re.search(pattern, body):
                    problems.append(f"{paths[name]} calls {what}")
            for callee in called_names(body):
                # constructing an X here (a temporary, a local) also runs ~X here
                for step in (callee, "~" + callee):
                    if step in bodies and step not in reached:
                        paths.setdefault(step, f"{paths[name]} -> {step}")
                        pending.append(step)
    return problems, reached


def thrust_calls_without_policy(sources: dict) -> list:
    """Every thrust::<algorithm>(...) call whose first argument is not the project's
    nosync policy, policy(s) or policy(s, allocator)."""
    problems = []
    for file, source in sources.items():
        text = strip_comments_and_strings(source)
        for match in re.finditer(r"\bthrust::(\w+)\s*\(", text):
            if not re.match(r"\s*policy\s*\(", text[match.end() :]):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{file}:{line}: thrust::{match.group(1)} without policy(s)")
    return problems


def gpu_sources() -> dict:
    files = sorted(p for p in GPU_SOURCES.iterdir() if p.suffix in (".h", ".cu", ".cpp", ".cuh"))
    assert files, GPU_SOURCES
    return {p.name: p.read_text() for p in files}


def test_no_synchronisation_on_the_update_and_sample_paths():
    sources = gpu_sources()
    problems, reached = hot_path_violations(sources)
    assert problems == []
    assert set(MUST_REACH) <= reached, f"the scan no longer reaches {set(MUST_REACH) - reached}"
    assert thrust_calls_without_policy(sources) == []
    # The project's policy is Thrust's par_nosync on the caller's stream, in the CUDA build
    system = sources["system.h"]
    policies = re.findall(r"inline auto policy\(Stream s[^)]*\) \{ return ([^;]+); \}", as_cuda_build(system))
    assert len(policies) == 1 and all("par_nosync" in p and ".on(s)" in p for p in policies), policies
    # Sorts are CUB's radix sort on the caller's stream, with temporary storage the tree owns
    assert "cub::DeviceRadixSort::SortPairs(temp, temp_bytes, k, v, n, 0, end_bit, s)" in system


def _class_body(text: str, name: str) -> str:
    start = text.index(f"class {name} ")
    return text[start : _matching(text, text.index("{", start), "{", "}")]


def test_the_destructor_frees_every_buffer_behind_the_last_call():
    """Issue 21 item 1: a tree dropped right after an asynchronous call must not free memory
    that queued work still uses. Every Buffer member is released in ~DeviceTree, with the
    tree's device current, stream-ordered (cudaFreeAsync) on the stream that every call
    records; Buffer's own destructor is only a fallback."""
    sources = {name: strip_comments_and_strings(as_cuda_build(text)) for name, text in gpu_sources().items()}
    tree = _class_body(sources["device_tree.h"], "DeviceTree")
    members = [name.strip() for group in re.findall(r"\bBuffer<[^>]+>\s+([^;()]+);", tree) for name in group.split(",")]
    assert {"leaves_", "internal_", "race_keys_", "batch_items_"} <= set(members), members
    bodies = function_bodies(sources["device_tree.h"])
    (destructor,) = bodies["~DeviceTree"]
    assert re.search(r"DeviceGuard guard\(device_\);", destructor)
    missing = [m for m in members if not re.search(rf"&?{m}\b", destructor)]
    assert missing == [], f"~DeviceTree does not release {missing}"
    assert "last_stream_" in destructor and "cudaFree(" not in destructor
    # Every call that takes a stream records it (through on(stream)) before queueing work.
    for name, found in bodies.items():
        for body in found:
            if name in HOT_ROOTS + ["assign", "load", "set_temperature", "status", "export_values", "check"]:
                assert "on(stream)" in body, f"{name} does not record its stream"
    system = sources["system.h"]
    (release,) = [b for b in function_bodies(system)["release_async"]]
    assert "cudaFreeAsync(p, s)" in release and "cudaFree(p" not in release
    (buffer_release,) = function_bodies(_class_body(system, "Buffer"))["release"]
    assert "release_async(data_, s)" in buffer_release


SYNTHETIC_TREE = """
inline void* grab(size_t bytes) { void* p; cudaMalloc(&p, bytes); return p; }
inline void drop(void* p) { if (p) cudaFree(p); }  // "cudaFree(" in a string: {
template <class T> class Buffer {
 public:
  explicit Buffer(size_t n) : data_(static_cast<T*>(grab(n))), count_(n) {}
  ~Buffer() { drop(data_); }
  void reserve(size_t n) { if (n > count_) *this = Buffer(n); }
  void shrink() { drop(data_); }
};
class DeviceTree final {
 public:
  ~DeviceTree() { drop(nullptr); }
  void sample(int k) override { scratch_.reserve(k); }
  void update(int k) { if (k) helper(k); }
  void get() {}
 private:
  void helper(int k) const { scratch_.shrink(); }
};
"""


def test_the_static_check_follows_helpers_and_can_fail():
    problems, reached = hot_path_violations({"bad.h": SYNTHETIC_TREE}, roots=["sample", "update", "get"])
    # sample -> reserve -> Buffer(...) -> grab -> cudaMalloc, and the temporary's ~Buffer -> drop
    # -> cudaFree; update -> helper -> shrink -> drop -> cudaFree
    assert {"reserve", "Buffer", "~Buffer", "grab", "helper", "shrink", "drop"} <= reached
    assert "sample -> reserve -> Buffer -> grab calls cudaMalloc (use stream-ordered cudaMallocAsync)" in problems
    # each function is reported once, by the first path that reached it
    assert any(re.fullmatch(r"(sample|update) -> .*drop calls cudaFree.*", p) for p in problems), problems
    assert "~DeviceTree" not in reached
    host_only = "#if defined(__CUDACC__)\ninline void* grab(size_t n) { return pool(n); }\n#else\n" \
                "inline void* grab(size_t n) { void* p; cudaMalloc(&p, n); return p; }\n#endif\n"
    assert hot_path_violations({"h.h": host_only + "void sample() { grab(1); }"}, roots=["sample"])[0] == []
    fine, _ = hot_path_violations({"ok.h": SYNTHETIC_TREE.replace("cudaMalloc(", "cudaMallocAsync(")
                                   .replace("cudaFree(", "cudaFreeAsync(")}, roots=["sample", "update"])
    assert fine == []
    blocking = "class DeviceTree {\n  void sample(int k) {\n    cudaMemcpy(a, b, 8, cudaMemcpyDefault);\n  }\n};"
    assert hot_path_violations({"b.h": blocking}, roots=["sample"])[0] == ["sample calls a blocking cudaMemcpy"]
    unsynced = "void f() { thrust::for_each(policy(s), a, b, g); thrust::sort(thrust::device, a, b); }"
    assert thrust_calls_without_policy({"t.h": unsynced}) == ["t.h:1: thrust::sort without policy(s)"]


def test_cuda_unavailable_gives_one_clear_error():
    if isample.cuda_available():
        pytest.skip("a GPU is available")
    with pytest.raises(ValueError, match="cuda"):
        isample.SumTree(10, device="cuda")


def test_build_info_reports_the_build():
    info = isample.build_info()
    assert isinstance(info["cuda"], bool) and isinstance(info["gpu_on_host"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    if info["cuda"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"sm_\d+", a) for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


def test_a_build_without_cuda_refuses_device_cuda_with_one_clear_error(monkeypatch):
    from isample import _backend

    info = dict(_backend._core.build_info(), cuda=False, cuda_archs=[])
    monkeypatch.setattr(_backend._core, "build_info", lambda: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU would not help
    assert not isample.cuda_available()
    for make in (lambda: isample.SumTree(4, device="cuda"), lambda: isample.SoftmaxTree(4, device="cuda:0")):
        with pytest.raises(ValueError, match="compiled without the CUDA back end") as raised:
            make()
        assert raised.value.__cause__ is None and raised.value.__context__ is None


def _status(*capabilities, runtime=13000, driver=13000, error=""):
    devices = [{"name": f"GPU {c}", "capability": c, "multiprocessors": 100, "total_memory": 2**36} for c in capabilities]
    return {"runtime_version": runtime, "driver_version": driver, "error": error, "devices": devices}


def test_cuda_available_needs_a_device_the_core_can_see(monkeypatch):
    from isample import _backend

    monkeypatch.setattr(_backend._core, "build_info", lambda: {"cuda": True, "cuda_archs": ["sm_90"], "gpu_on_host": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend._core, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(_backend._core, "cuda_status", lambda: _status())
    assert not isample.cuda_available()
    monkeypatch.setattr(_backend._core, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(_backend._core, "cuda_status", lambda: _status((9, 0)))
    assert isample.cuda_available()


BUILD = {"cuda": True, "cuda_archs": ["sm_75", "sm_80", "sm_90"], "cuda_ptx": ["compute_90"], "gpu_on_host": True}


@pytest.mark.parametrize(
    "capability, sass, ptx, runs",
    [
        ((7, 5), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),  # T4: its own machine code
        ((8, 6), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),  # A10 / RTX 30: sm_80 runs on 8.x
        ((8, 9), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),  # L4 / RTX 40
        ((9, 0), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),  # H100
        ((10, 0), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),  # B200: compute_90 PTX, compiled by the driver
        ((12, 0), BUILD["cuda_archs"], BUILD["cuda_ptx"], True),
        ((7, 0), BUILD["cuda_archs"], BUILD["cuda_ptx"], False),  # V100: nothing it can run
        ((10, 0), BUILD["cuda_archs"], [], False),  # no PTX: no forward compatibility
        ((7, 5), ["sm_80", "sm_90"], [], False),  # the old build on a T4
        ((8, 0), ["sm_86"], [], False),  # machine code of a later minor version does not run
    ],
)
def test_which_devices_a_build_can_run_on(capability, sass, ptx, runs):
    from isample import _device

    assert _device.kernels_run_on(capability, sass, ptx) is runs


def test_cuda_problem_says_what_is_wrong(monkeypatch):
    """Issue 21 item 4: a driver too old for the core's CUDA runtime is reported as such (not
    as "no device"), and a device the build has no kernels for is refused up front."""
    from isample import _device

    monkeypatch.setattr(_device._core, "build_info", lambda: BUILD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status((9, 0)))
    assert _device.cuda_problem() is None and _device.cuda_problem(0) is None and _device.cuda_available()
    assert "device 1 is not visible (1 visible)" in _device.cuda_problem(1)
    error = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status(driver=12080, error=error))
    problem = _device.cuda_problem()
    assert "driver supports CUDA up to 12.8" in problem and "CUDA 13.0 runtime" in problem and "580" in problem
    assert not _device.cuda_available()
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status(driver=0, error=error))
    assert "no NVIDIA driver was found" in _device.cuda_problem() and error in _device.cuda_problem()
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status(error="cudaErrorUnknown: unknown error"))
    assert "cannot start: cudaErrorUnknown" in _device.cuda_problem()
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status((7, 0), (9, 0)))
    assert _device.cuda_problem() is None  # device 1 can run it
    problem = _device.cuda_problem(0)
    assert "CUDA device 0 (GPU (7, 0), compute capability 7.0) cannot run this build" in problem
    assert "sm_75, sm_80, sm_90 and PTX for compute_90" in problem and "ISAMPLE_CUDA_ARCHS" in problem
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status((7, 0)))
    assert not _device.cuda_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sees no CUDA device" in _device.cuda_problem()
    monkeypatch.setattr(_device._core, "build_info", lambda: dict(BUILD, cuda=False))
    assert "compiled without the CUDA back end" in _device.cuda_problem()


def test_the_core_reports_the_cuda_runtime_it_links():
    status = isample._core.cuda_status()
    assert set(status) == {"runtime_version", "driver_version", "error", "devices"}
    info = isample.build_info()
    if info["cuda"]:
        assert status["runtime_version"] == info["cuda_runtime"] >= 12000
        assert info["cuda_ptx"] and all(re.fullmatch(r"compute_\d+", a) for a in info["cuda_ptx"])
        assert "sm_75" in info["cuda_archs"]  # a T4 gets kernels
        if status["error"] == "" and not status["devices"]:
            pytest.fail("the runtime started but listed no device")
    else:
        assert status["devices"] == [] and "no CUDA back end" in status["error"]


def test_no_cccl_symbol_is_exported():
    """Issue 21 item 8: with hidden visibility for the CUDA code too, none of the Thrust,
    CUB or libcu++ code instantiated in the core is exported, where it could clash with
    torch's own CCCL."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    exported = subprocess.run([nm, "-D", "--defined-only", "-C", isample._core.__file__], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert any("PyInit__core" in line for line in exported)
    leaked = [line for line in exported if re.search(r"thrust::|cub::|cuda::|\bcccl", line)]
    assert leaked == [], leaked[:5]


def test_draw_seed_takes_the_generator_of_either_device(monkeypatch):
    from isample import _backend

    generator = torch.Generator().manual_seed(3)
    assert _backend.draw_seed(generator) == _backend.draw_seed(torch.Generator().manual_seed(3))
    seen = {}

    def randint(*args, generator=None, device=None, **kwargs):  # stands in for a CUDA draw
        seen["device"] = device
        return torch.tensor([7])

    monkeypatch.setattr(torch, "randint", randint)
    fake = type("CudaGenerator", (), {"device": torch.device("cuda", 1)})()
    assert _backend.draw_seed(fake) == 7 and seen["device"] == torch.device("cuda", 1)


def _configure(tmp_path, value: str):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    environment = dict(os.environ, CUDACXX=str(tmp_path / "no-nvcc"))  # no CUDA compiler to find
    command = [cmake, "-S", str(REPOSITORY), "-B", str(tmp_path / "build"), f"-DISAMPLE_CUDA={value}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize(
    "value, succeeds, message",
    [
        ("bogus", False, "ISAMPLE_CUDA must be AUTO, ON or OFF"),
        ("on", False, "ISAMPLE_CUDA=ON but no CUDA compiler was found"),  # not silently OFF
        ("Auto", True, "no CUDA compiler found; building without the CUDA back end"),
        ("off", True, "building without the CUDA back end (ISAMPLE_CUDA=off)"),
    ],
)
def test_the_cuda_option_is_case_insensitive_and_checked(tmp_path, value, succeeds, message):
    result = _configure(tmp_path, value)
    output = " ".join((result.stdout + result.stderr).split())
    assert (result.returncode == 0) == succeeds, output[-2000:]
    assert message in output, output[-2000:]


# -- on a real GPU ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not isample.cuda_available(), reason="needs a CUDA GPU and a CUDA build")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 17, 4096, 1_000_003])
def test_cuda_parity_with_the_cpu_tree(n, rng):
    weights = power_of_two_weights(rng, n)
    gpu = isample.SumTree.from_weights(torch.from_numpy(weights).cuda(), device="cuda", seed=1)
    cpu = isample.SumTree.from_weights(weights, seed=1)
    u = rng.random(100_000)
    got = gpu.sample_from_uniforms(torch.from_numpy(u).cuda()).cpu().numpy()
    np.testing.assert_array_equal(got, reference_descent(weights, u))
    arbitrary = rng.random(n) ** 3
    gpu.assign(torch.from_numpy(arbitrary).cuda())
    cpu.assign(arbitrary)
    assert gpu.total == cpu.total
    assert torch.equal(gpu.sample(50_000, seed=9).cpu(), cpu.sample(50_000, seed=9))
    idx = rng.integers(0, n, 300)
    vals = rng.random(300)
    gpu.update(torch.from_numpy(idx).cuda(), torch.from_numpy(vals).cuda())
    cpu.update(idx, vals)
    assert gpu.total == cpu.total


@pytest.mark.cuda
@cuda
@pytest.mark.statistical
def test_cuda_draw_frequencies(rng):
    weights = rng.random(50) ** 2
    tree = isample.SumTree.from_weights(torch.from_numpy(weights).cuda(), device="cuda", seed=1)
    counts = np.bincount(tree.sample(300_000).cpu().numpy(), minlength=50)
    assert chi_square_pvalue(counts, weights / weights.sum()) > ALPHA
    wrong = weights.copy()
    wrong[np.argmax(weights)] *= 1.1  # negative control: a 10% error on the heaviest item
    assert chi_square_pvalue(counts, wrong / wrong.sum()) < ALPHA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("first_use", [False, True])
def test_cuda_update_and_sample_do_not_synchronise(first_use):
    """With a long kernel queued ahead of them, update and sample must return while it still
    runs: any host synchronisation (a blocking copy, cudaMalloc / cudaFree, a stream or
    device sync) would wait for it. first_use: the scratch grows inside the timed calls.

    CUDA loads each kernel on its first launch (lazy loading, the default since 12.2), and
    that load may synchronise the context. So the kernels are first run once on another tree
    of the same size (the same kernels: CUB picks its sort kernels by size); a training loop
    gets the same by one warm-up step, or by CUDA_MODULE_LOADING=EAGER set before CUDA
    starts (docs/gpu.md)."""
    n = 10_000_000
    idx = torch.randint(0, n, (128,), device="cuda")
    many = torch.randint(0, n, (5000,), device="cuda")  # > kScanBatch: the sorted-batch path
    losses = torch.rand(5000, device="cuda", dtype=torch.float64)

    def every_call(tree):
        tree.update(idx, losses[:128])
        tree.update(many, losses)
        for _ in range(10):
            draws = tree.sample(128)
            tree.update(draws, losses[:128])
            tree.blend(draws, losses[:128], 0.2)
        tree.sample(1000, replace=False)

    warm = isample.SoftmaxTree(n, device="cuda", seed=1)
    every_call(warm)
    del warm
    tree = isample.SoftmaxTree(n, device="cuda", seed=0)
    if not first_use:
        every_call(tree)
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued first
        every_call(tree)
        still_running = not stream.query()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert still_running, "update / sample waited for the GPU: a host synchronisation on the hot path"
    torch.cuda.synchronize()
    tree.check()


@pytest.mark.cuda
@cuda
def test_cuda_rejected_draw_with_sync_errors_keeps_the_stream():
    tree = isample.SumTree(8, device="cuda", seed=0, sync_errors=True)
    tree.update(torch.tensor([0, 1], device="cuda"), torch.tensor([1.0, 2.0], device="cuda", dtype=torch.float64))
    tree.sample(3)
    before = tree.state_dict()
    for call in (lambda: tree.sample(3, replace=False), lambda: tree.sample_with_inclusion(3)):
        with pytest.raises(ValueError, match="positive"):
            call()
        assert tree.state_dict()["stream_calls"] == before["stream_calls"] == 1


@pytest.mark.cuda
@cuda
def test_cuda_generator_seeds_a_draw():
    tree = isample.SumTree.from_weights(torch.rand(1000, dtype=torch.float64, device="cuda"), device="cuda", seed=0)
    first = tree.sample(64, generator=torch.Generator(device="cuda").manual_seed(5))
    again = tree.sample(64, generator=torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(first, again)


@pytest.mark.cuda
@pytest.mark.skipif(not isample.cuda_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_tree_on_the_second_gpu_works_while_the_first_is_current(rng):
    """Its kernels must launch on cuda:1 (on cuda:1's current stream), not on the current
    device; building it must not leave cuda:1 current."""
    weights = power_of_two_weights(rng, 5000)
    u = rng.random(1000)
    with torch.cuda.device(0):
        tree = isample.SumTree.from_weights(torch.from_numpy(weights).to("cuda:1"), device="cuda:1", seed=2)
        assert torch.cuda.current_device() == 0
        got = tree.sample_from_uniforms(torch.from_numpy(u).to("cuda:1"))
        drawn = tree.sample(100, seed=3)
        assert torch.cuda.current_device() == 0
        assert got.device == drawn.device == torch.device("cuda", 1)
        assert tree.total == float(weights.sum())
    np.testing.assert_array_equal(got.cpu().numpy(), reference_descent(weights, u))
    assert torch.equal(drawn.cpu(), isample.SumTree.from_weights(weights).sample(100, seed=3))


@pytest.mark.cuda
@cuda
def test_cuda_bad_input_is_deferred_then_raised():
    tree = isample.SumTree(100, device="cuda", seed=0)
    tree.update(torch.arange(10, device="cuda"), torch.ones(10, device="cuda", dtype=torch.float64))
    tree.update(torch.tensor([5], device="cuda"), torch.tensor([float("nan")], device="cuda", dtype=torch.float64))
    with pytest.raises(ValueError, match="nan"):
        tree.check()
    assert tree.total == 10.0  # the bad call changed nothing
    strict = isample.SumTree(100, device="cuda", sync_errors=True, seed=0)
    with pytest.raises(IndexError):
        strict.update(torch.tensor([100], device="cuda"), torch.ones(1, device="cuda", dtype=torch.float64))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("transform", ["softmax", "proportional"])
def test_sampler_steps_do_not_synchronise_on_cuda(transform):
    n = 100_000
    sampler = isample.ImportanceSampler(n, uniform_mix=0.0, warmup_epochs=0, transform=transform, score="running_loss", samples_per_epoch=4096,
                                        nonfinite="skip", device="cuda", seed=0)
    order = torch.tensor(list(iter(sampler)), device="cuda")
    losses = torch.rand(4096, device="cuda")
    losses[7] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(0, 4096, 128):
            batch = order[start : start + 128]
            weights = sampler.weights(batch, dtype=torch.float32)
            sampler.update(batch, losses[start : start + 128] * weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sampler.counters["nonfinite_skipped"] == 1
    list(iter(sampler))  # the next epoch: errors recorded on the device would surface here


@pytest.mark.cuda
@cuda
def test_sampler_reports_rejected_batches_at_the_next_epoch():
    sampler = isample.ImportanceSampler(1000, transform="softmax", uniform_mix=0.0, warmup_epochs=0, samples_per_epoch=100, device="cuda", seed=0)
    items = torch.tensor(list(iter(sampler)), device="cuda")
    sampler.update(items[:10], torch.full((10,), float("nan"), device="cuda"))
    with pytest.raises(ValueError):
        list(iter(sampler))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1 << 16, 3 << 20])  # race scratch kept until the tree goes / given back after the draw
def test_cuda_a_tree_dropped_during_its_draw_frees_its_memory_after_it(n, rng):
    """Issue 21 item 1. A draw without replacement is queued behind a long kernel on a side
    stream and the tree is dropped at once; then memory is taken from the same pool and
    from torch on another stream, and written. The draw must still be right, and
    compute-sanitizer (scripts/gpu_check.sh runs this test under it) must find no access to
    freed memory: the tree's memory is freed behind its last call, on that call's stream."""
    import gc

    weights = rng.random(n) + 1e-3
    expected = isample.SumTree.from_weights(weights).sample(1000, replace=False, seed=3, method="race")
    device_weights = torch.from_numpy(weights).cuda()
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        tree = isample.SumTree.from_weights(device_weights, device="cuda", seed=0)
        torch.cuda._sleep(1_000_000_000)  # about half a second, ahead of the draw
        drawn = tree.sample(1000, replace=False, seed=3)
        del tree
        gc.collect()
        dropped_while_queued = not side.query()
    with torch.cuda.stream(other):
        intruder = isample.SumTree.from_weights(torch.full((n,), 7.0, dtype=torch.float64, device="cuda"), device="cuda")
        intruder.sample(1000, replace=False, seed=1)
        junk = torch.full((8 * n,), float("nan"), dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    assert dropped_while_queued, "the draw finished before the tree was dropped: the test proved nothing"
    assert torch.equal(drawn.cpu(), expected)
    del intruder, junk


@pytest.mark.cuda
@cuda
def test_cuda_scratch_is_exact_and_given_back():
    """Issue 21 item 3, on the device: a draw without replacement reserves 32 bytes per item
    plus CUB's exact temporary, and gives back more than 64 MiB after the call. The device's
    pool (where the trees allocate) shows the peak."""
    device = torch.cuda.current_device()
    small = 1 << 16
    tree = isample.SumTree.from_weights(torch.rand(small, dtype=torch.float64, device="cuda") + 1e-3, device="cuda")
    tree.sample(100, replace=False)
    assert 32 * small <= tree._core.scratch_nbytes <= 32 * small + (8 << 20)
    big = 3 << 20
    large = isample.SumTree.from_weights(torch.rand(big, dtype=torch.float64, device="cuda") + 1e-3, device="cuda")
    torch.cuda.synchronize()
    before = isample._core.cuda_memory_pool(device, reset_peaks=True)
    large.sample(100, replace=False)
    torch.cuda.synchronize()
    after = isample._core.cuda_memory_pool(device)
    assert large._core.scratch_nbytes == 0
    assert 32 * big <= after["used_peak"] - before["used"] <= 32 * big + (16 << 20)
    assert after["used"] == before["used"]


@pytest.mark.cuda
@cuda
def test_cuda_tiny_totals_draw_as_the_cpu_does():
    """Issue 19 item 5 on the device: the same scaling, the same draws."""
    weights = np.arange(1, 101) * 5e-324
    gpu = isample.SumTree.from_weights(torch.from_numpy(weights).cuda(), device="cuda", seed=0)
    cpu = isample.SumTree.from_weights(weights, seed=0)
    assert torch.equal(gpu.sample(20_000, seed=1).cpu(), cpu.sample(20_000, seed=1))
    assert torch.equal(gpu.sample(60, replace=False, seed=2).cpu(), cpu.sample(60, replace=False, seed=2))
    gi, gp = gpu.sample_with_inclusion(60, seed=3)
    ci, cp = cpu.sample_with_inclusion(60, seed=3)
    assert torch.equal(gi.cpu(), ci)
    torch.testing.assert_close(gp.cpu(), cp, rtol=1e-12, atol=0)


@pytest.mark.cuda
@cuda
def test_cuda_softmax_leaves_are_the_cpus_bit_for_bit(rng):
    """Issue 21 item 6: one exp (exp_shared) on both sides, so probabilities, totals and
    draws agree in every bit."""
    scores = rng.normal(size=100_003) * 30
    gpu = isample.SoftmaxTree.from_scores(torch.from_numpy(scores).cuda(), temperature=0.7, device="cuda", seed=0)
    cpu = isample.SoftmaxTree.from_scores(scores, temperature=0.7, seed=0)
    assert torch.equal(gpu.probability().cpu(), cpu.probability())
    assert gpu.log_total == cpu.log_total
    assert torch.equal(gpu.sample(20_000, seed=1).cpu(), cpu.sample(20_000, seed=1))
    # exp over the whole range on the device against the host's: scores in [-745, 0], the
    # largest 0, temperature 1, so each leaf is exp_shared(score), subnormals included.
    wide = np.concatenate([[0.0], rng.uniform(-745.2, 0.0, (1 << 20) - 1)])
    gpu = isample.SoftmaxTree.from_scores(torch.from_numpy(wide).cuda(), device="cuda", seed=0)
    cpu = isample.SoftmaxTree.from_scores(wide, seed=0)
    assert torch.equal(gpu.probability().cpu(), cpu.probability())


@pytest.mark.cuda
@cuda
def test_cuda_strided_passes_match_the_cpu(rng):
    """Issue 21 item 5: assign / load / rebase passes run one worker per 256 items up to one
    per device thread (n = 8e7 reaches that cap on any GPU of today), with atomic max and
    counts; their results are the CPU's."""
    n = 80_000_017
    scores = rng.normal(size=n) * 50
    gpu = isample.SoftmaxTree.from_scores(torch.from_numpy(scores).cuda(), device="cuda", seed=0)
    cpu = isample.SoftmaxTree.from_scores(scores, seed=0)
    assert gpu.num_positive == cpu.num_positive and gpu.log_total == cpu.log_total
    state = gpu.state_dict()
    other = isample.SoftmaxTree(n, device="cuda", seed=0)
    other.load_state_dict(state)
    assert torch.equal(other.probability(), gpu.probability())


def test_device_resolution_and_cuda_available_follow_cuda_problem(monkeypatch):
    """The public entry points (``device="cuda"`` anywhere, ``isample.cuda_available()``) refuse
    with _device.cuda_problem's sentence: an old driver or a device without kernels is named
    as such, not reported as "no device"."""
    from isample import _backend, _device

    monkeypatch.setattr(_device._core, "build_info", lambda: BUILD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status((7, 0)))
    with pytest.raises(ValueError, match="compute capability 7.0.*cannot run this build"):
        _backend.resolve_device("cuda")
    with pytest.raises(ValueError, match="compute capability 7.0"):
        isample.SumTree(4, device="cuda:0")
    assert not isample.cuda_available()
    monkeypatch.setattr(_device._core, "cuda_status", lambda: _status((7, 0), (9, 0)))
    assert isample.cuda_available()  # device 1 can run it
    assert _backend.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device 0"):
        _backend.resolve_device("cuda")  # the current device, 0, cannot
