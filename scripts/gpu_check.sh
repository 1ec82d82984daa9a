#!/usr/bin/env bash
# Build, test and time isample on a fresh GPU machine that has torch but no package index.
#
# On a machine with network access, first fetch the build and test requirements into .whl/
# (ignored by git), then copy the repository (with .whl/) to the GPU machine and run this script:
#
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       scikit-build-core pybind11 pathspec packaging cmake ninja \
#       pytest pluggy iniconfig hypothesis attrs sortedcontainers exceptiongroup tomli scipy numpy
#   bash scripts/gpu_check.sh            # writes results under ${OUT:-gpu-results}/
#
# (cmake and ninja: the build runs without isolation; hypothesis, attrs and sortedcontainers:
# tests/conftest.py imports hypothesis; exceptiongroup and tomli: only for Python < 3.11.)
# A failing test run does not stop the benchmark: both run, and the script exits non-zero
# at the end if either failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --find-links .whl --target /tmp/isample-site .whl/*.whl
  export PYTHONPATH=/tmp/isample-site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/isample-site/bin:$PATH  # the cmake and ninja executables of their wheels
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# Build in place (no isolation: the index is unreachable), with the CUDA kernels required.
ISAMPLE_CUDA=ON python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/isample-build . 2>&1 | tail -5
export PYTHONPATH=/tmp/isample-build:${PYTHONPATH:-}
python3 -c "import isample; print(isample.build_info(), 'cuda_available', isample.cuda_available())" | tee "$out/build.txt"
tests_rc=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gpu_on_host.py 2>&1 | tee "$out/tests.txt" || tests_rc=$?
benchmark_rc=0
python3 benchmarks/gpu_benchmark.py --json "$out/gpu.json" 2>&1 | tee "$out/benchmark.txt" || benchmark_rc=$?
echo "tests exit code: $tests_rc; benchmark exit code: $benchmark_rc" | tee "$out/exit-codes.txt"
if [ "$tests_rc" -ne 0 ] || [ "$benchmark_rc" -ne 0 ]; then
  exit 1
fi
