#!/usr/bin/env bash
# Installs r2m_fast with its test extras (CPU torch pinned by constraints.txt) and runs every test:
# the CPU suite, the Triton kernels under the interpreter, and the benchmarks in quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
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
