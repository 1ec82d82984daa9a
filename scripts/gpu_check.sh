#!/usr/bin/env bash
# Build, test and time isample on a fresh GPU machine that has no package index, in one call
# of under 10 minutes (issue 21): `bash scripts/gpu_check.sh`.
#
#   1. the build, from this checkout, with the CUDA kernels required (ISAMPLE_CUDA=ON);
#   2. the GPU tests (tests/test_cuda.py, marker cuda) and the host build's and core's tests
#      that share its code (test_gpu_on_host.py, test_core_tiny_totals.py, test_core_fastmath.py);
#   3. the destructor test (a tree dropped right after an asynchronous draw, then memory
#      reused by another stream) again under compute-sanitizer's memcheck, when present;
#   4. benchmarks/gpu_benchmark.py at n = 5e4, 1e7, 1e8, 1e9: times, and the pool's peak
#      device memory during a draw without replacement at each size.
#
# What it needs on that machine: python3 with torch (CUDA), numpy, scipy, pytest, hypothesis,
# scikit-build-core and pybind11; cmake, ninja and nvcc. The device image of this workplace
# has all of them (/work/.library/device/KINDS.md), so it carries nothing but the checkout
# (a few MB). Where one is missing, put its wheel in .whl/ (ignored by git; download it where
# pip works, with --no-deps --only-binary=:all:) and carry .whl: it is installed first.
#
# Writes at most 8 files to $OUT (or gpu-results/), as the device tool returns them:
#   nvidia-smi.txt build.log tests.txt sanitizer.txt benchmark.txt gpu.json summary.txt
# Each step has its own time limit inside a 570 s budget (GPU_CHECK_SECONDS), so a slow step
# cannot cost the others their output; the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
budget="${GPU_CHECK_SECONDS:-570}"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
failed=0

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
head -15 "$out/nvidia-smi.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/isample-site .whl/*.whl
  export PYTHONPATH=/tmp/isample-site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/isample-site/bin:$PATH
fi
python3 - <<'PY' 2>&1 | tee -a "$summary"
import importlib, shutil, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPU:", torch.cuda.is_available() and torch.cuda.get_device_name())
missing = [m for m in ("numpy", "scipy", "pytest", "hypothesis", "scikit_build_core", "pybind11")
           if importlib.util.find_spec(m) is None]
missing += [t for t in ("cmake", "ninja", "nvcc") if shutil.which(t) is None]
print("missing:", missing or "nothing")
PY

# 1. The build (no isolation, no index: everything it needs is installed).
note "build: started at $((SECONDS - start)) s"
rm -rf /tmp/isample-build /tmp/isample-build-tree
if ISAMPLE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 timeout $(($(left) - 300)) python3 -m pip install --no-build-isolation \
    --no-deps --no-index -v --config-settings=build-dir=/tmp/isample-build-tree --target /tmp/isample-build . \
    >"$out/build.log" 2>&1; then
  export PYTHONPATH=/tmp/isample-build${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import isample, isample._device as d; print(isample.build_info()); print(isample._core.cuda_status()); \
print('cuda_problem:', d.cuda_problem())" 2>&1 | tee -a "$summary"
  note "build: done at $((SECONDS - start)) s"
  if ! python3 -c "import isample, sys; sys.exit(0 if isample.cuda_available() else 1)"; then
    note "build: the CUDA back end cannot run here (cuda_problem above): the cuda tests will skip"
    failed=1
  fi
else
  note "build: FAILED (see build.log)"
  tail -30 "$out/build.log"
  exit 1
fi

# 2. The tests.
note "tests: started at $((SECONDS - start)) s"
timeout $(($(left) - 230)) python3 -m pytest -q -p no:cacheprovider -rs --durations=10 tests/test_cuda.py \
  tests/test_gpu_on_host.py tests/test_core_tiny_totals.py tests/test_core_fastmath.py >"$out/tests.txt" 2>&1
rc=$?
tail -25 "$out/tests.txt"
skipped=$(grep -c 'SKIPPED.*needs a CUDA GPU' "$out/tests.txt")
note "tests: exit code $rc at $((SECONDS - start)) s ($skipped skip lines for want of a GPU: should be 0)"
[ "$rc" -eq 0 ] && [ "$skipped" -eq 0 ] || failed=1

# 3. The destructor test under compute-sanitizer.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$sanitizer" ]; then
  note "sanitizer: started at $((SECONDS - start)) s"
  timeout $(($(left) - 170)) "$sanitizer" --tool memcheck --error-exitcode 3 --leak-check no \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "dropped_during_its_draw" >"$out/sanitizer.txt" 2>&1
  rc=$?
  tail -8 "$out/sanitizer.txt"
  note "sanitizer: exit code $rc at $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=1
else
  note "sanitizer: compute-sanitizer not found, skipped" | tee "$out/sanitizer.txt"
fi

# 4. The benchmark (writes gpu.json after each size, so a run cut short keeps what it measured).
note "benchmark: started at $((SECONDS - start)) s"
timeout $(($(left) - 5)) python3 benchmarks/gpu_benchmark.py --repeats 300 --json "$out/gpu.json" \
  >"$out/benchmark.txt" 2>&1
rc=$?
tail -40 "$out/benchmark.txt"
note "benchmark: exit code $rc at $((SECONDS - start)) s"
[ "$rc" -eq 0 ] || failed=1

note "gpu_check: $([ "$failed" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - start)) s"
exit "$failed"
