#!/usr/bin/env bash
# One prepared run on a GPU machine: build the CUDA extension, run every test on the GPU, then the
# GPU suite. Full logs and results go to $OUT (or benchmarks/results/gpu when OUT is unset); the
# short tables are printed last.  Usage: bash benchmarks/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" R2M_BUILD_CUDA=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -2
  git rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/env.txt"

start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || { echo "pip -e failed, falling back to build_ext --inplace"; python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; }
echo "build: $(( $(date +%s) - start )) s; $(grep -ciE 'error' "$OUT/build.log") lines mention error"
python3 -m r2m_fast.cuda_ops 2>&1 | tail -3

start=$(date +%s)
timeout 240 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests \
  --ignore=tests/test_detector_smoke.py -k "not slow" > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20

start=$(date +%s)
timeout 300 python3 benchmarks/gpu_suite.py --out "$OUT" "$@" > "$OUT/suite.log" 2>&1
echo "suite rc=$? in $(( $(date +%s) - start )) s"
tail -60 "$OUT/suite.log"
