#!/usr/bin/env bash
# Installs r2m_fast with its test extras (CPU torch pinned by constraints.txt) and runs every test:
# the CPU suite, the Triton kernels under the interpreter, and the benchmarks in quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
# Wherever nvcc is (CI has it), build the CUDA extension even without a GPU, which setup.py's default
# skips: the build itself, the module's import and its no-GPU errors (tests/test_cuda_ext.py) are
# tested on CPU. Without nvcc the extension cannot build, and the suite runs without it.
if [ -z "${R2M_BUILD_CUDA:-}" ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] \
     || [ -x "${CUDA_PATH:-/nonexistent}/bin/nvcc" ]; }; then
  export R2M_BUILD_CUDA=1
fi
python -m pip install -q -c constraints.txt -e ".[test,triton]"
if [ -f benchmarks/detector/requirements.txt ]; then
  python -m pip install -q -c constraints.txt -r benchmarks/detector/requirements.txt
fi
if [ -f benchmarks/detector/requirements-nodeps.txt ]; then
  python -m pip install -q --no-deps -r benchmarks/detector/requirements-nodeps.txt
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q tests
TRITON_INTERPRET=1 python -m pytest -q -m triton_interpreter tests
R2M_BENCH_QUICK=1 python -m pytest -q --benchmark-disable benchmarks
