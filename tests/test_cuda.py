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
    "prepare_batch", "resum_levels", "run_rebase", "begin_call", "for_each", "reserve",
    "reserve_sort_space", "allocate_async", "release_async", "policy", "zero_async", "copy_async",
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
    """Bare names of everything called in `body` (free, member and qualified calls)."""
    return {name for name in re.findall(r"\b([A-Za-z_]\w*)\s*\(", body) if name not in KEYWORDS}


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
    policies = re.findall(r"inline auto policy\(Stream s[^)]*\) \{ return ([^;]+); \}", system)
    assert len(policies) == 2 and all("par_nosync" in p and ".on(s)" in p for p in policies), policies
    assert "thrust::sort_by_key(policy(s, sort_arena_)" in sources["device_tree.h"]  # sorts use the tree's scratch


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


def test_cuda_available_needs_a_device_the_core_can_see(monkeypatch):
    from isample import _backend

    monkeypatch.setattr(_backend._core, "build_info", lambda: {"cuda": True, "cuda_archs": ["sm_90"], "gpu_on_host": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend._core, "cuda_device_count", lambda: 0)
    assert not isample.cuda_available()
    monkeypatch.setattr(_backend._core, "cuda_device_count", lambda: 1)
    assert isample.cuda_available()


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
    device sync) would wait for it. first_use: the scratch grows inside the timed calls."""
    n = 10_000_000
    tree = isample.SoftmaxTree(n, device="cuda", seed=0)
    idx = torch.randint(0, n, (128,), device="cuda")
    many = torch.randint(0, n, (5000,), device="cuda")  # > kScanBatch: the sorted-batch path
    losses = torch.rand(5000, device="cuda", dtype=torch.float64)
    if not first_use:
        tree.update(many, losses)
        tree.sample(1000, replace=False)
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued first
        tree.update(idx, losses[:128])
        tree.update(many, losses)
        for _ in range(10):
            draws = tree.sample(128)
            tree.update(draws, losses[:128])
            tree.blend(draws, losses[:128], 0.2)
        tree.sample(1000, replace=False)
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
    sampler = isample.ImportanceSampler(n, transform=transform, score="running_loss", samples_per_epoch=4096,
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
    sampler = isample.ImportanceSampler(1000, samples_per_epoch=100, device="cuda", seed=0)
    items = torch.tensor(list(iter(sampler)), device="cuda")
    sampler.update(items[:10], torch.full((10,), float("nan"), device="cuda"))
    with pytest.raises(ValueError):
        list(iter(sampler))
