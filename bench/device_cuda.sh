#!/usr/bin/env bash
# On the GPU machine, from the repo root: build the CUDA extension (JIT, ninja), run its GPU tests,
# then benchmark the EXL2 folders given as arguments. Logs and JSON go to $OUT.
#   usage: bash bench/device_cuda.sh [EXL2_DIR ...]
set -u
OUT=${OUT:-/tmp/kestrel-out}
mkdir -p "$OUT"
export KESTREL_JIT=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export KESTREL_BUILD_DIR=${KESTREL_BUILD_DIR:-/tmp/kestrel-cuda-build}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

t0=$(date +%s)
python3 -c "from app.engine._ext_build import jit_build; jit_build(verbose=True)" >"$OUT/build.log" 2>&1
rc=$?
echo "== build rc=$rc in $(( $(date +%s) - t0 ))s"; tail -25 "$OUT/build.log"
[ $rc -ne 0 ] && exit $rc

t1=$(date +%s)
python3 -m pytest tests/test_cuda_kernels.py -q -m gpu -p no:cacheprovider >"$OUT/pytest.log" 2>&1
echo "== pytest rc=$? in $(( $(date +%s) - t1 ))s"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -5
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40

if [ $# -gt 0 ]; then
  t2=$(date +%s)
  python3 bench/bench_decode.py "$@" --out "$OUT/bench_decode.json" 2>&1 | tee "$OUT/bench.log" | tail -40
  echo "== bench done in $(( $(date +%s) - t2 ))s"
fi
