#!/usr/bin/env bash
# Build the core with AddressSanitizer + UndefinedBehaviorSanitizer and run the core tests
# against it. Any report fails the run (halt_on_error). Needs a Python environment that
# already has torch, numpy, scipy, pytest (CI's venv); builds into $SANITIZE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="${SANITIZE_DIR:-/tmp/isample-sanitize}"
rm -rf "$work" && mkdir -p "$work/build" "$work/site"
python_bin=$(command -v python)
pybind11_dir=$(python -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S "$root" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DISAMPLE_CUDA=OFF \
  -DISAMPLE_SANITIZE=address,undefined -DPython_EXECUTABLE="$python_bin" -Dpybind11_DIR="$pybind11_dir" >/dev/null
cmake --build "$work/build" >/dev/null
cp -r "$root/python/isample" "$work/site/isample"
cp "$work"/build/_core*.so "$work/site/isample/"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
# Python and torch are not instrumented: their leaks are not ours (detect_leaks=0).
# pytest runs with -s: a sanitizer report must reach the log, not pytest's capture file.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$root/scripts/ubsan.supp"
cd "$work"
# Import the instrumented package, never an installed one (an editable install's import hook
# would otherwise win over sys.path), and prove it before testing.
LD_PRELOAD="$asan:$ubsan" python - "$work/site" "$root" "$@" <<'PY'
import sys
site, root, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, site)
import isample
assert isample._core.__file__.startswith(site), isample._core.__file__
print("testing the sanitizer build:", isample._core.__file__, flush=True)
import pytest
tests = [f"{root}/tests/{name}" for name in ("test_sum_tree.py", "test_softmax_tree.py", "test_gpu_on_host.py", "test_properties.py",
                                            "test_sampler.py", "test_core_tiny_totals.py", "test_core_fastmath.py")]
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers", "-m", "not slow", *tests, *extra]))
PY
echo "sanitizers: no report"
