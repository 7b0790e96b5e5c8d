#!/usr/bin/env bash
# The ablations of issue 21 on the embedded MiniLM topics task, beside the audit's figures: does
# rank carry value there, what PreLort's segment rule does without nested training, and HAFL's
# adaptive vs zero-padding aggregation with HAFL's own client side. The audit's settings: 10
# clients, 6 rounds of 5 local steps, Dirichlet 0.3, `--budgets hetero` (ranks 2/4/8 of R = 8),
# learning rate 2e-2, the whole test split; seeds 0 and 1 (the audit ran one seed, two for the
# PreLort collapse).
#
#   bash bench/claims_ablations.sh                  # about 20-30 minutes of one CPU core
#   OUT=/tmp/abl bash bench/claims_ablations.sh     # run directories elsewhere
#
# Writes the runs to $OUT (default runs/claims-ablations, not committed) and the table to
# bench/results/claims-ablations.md through bench/claims_table.py --ablations.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/claims-ablations}
FEDLORA=${FEDLORA:-fedlora}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
[ -f .venv/bin/activate ] && . .venv/bin/activate
C="--seeds 2 --lr 2e-2 --clients 10 --rounds 6 --dirichlet-alpha 0.3 --max-test 0 --no-progress"
run() {
  name=$1
  shift
  echo "=== $name: $FEDLORA compare $* $C"
  t0=$SECONDS
  nice -n 10 $FEDLORA compare "$@" $C --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? in $((SECONDS - t0)) s"
}
# does rank carry value? FedIT at rank 2 and 8, HetLoRA's mixed ranks
run fedit-r2 --methods fedit --rank 2
run fedit-r8 --methods fedit --rank 8
# PreLort's ablations against HetLoRA (the model each client rank receives is in results.json)
run prelort --methods hetlora,prelort --baseline hetlora --budgets hetero
run prelort-flat --methods prelort --budgets hetero --prelort-training flat
run prelort-sampled --methods prelort --budgets hetero --prelort-training sampled
run prelort-zeropad --methods prelort --budgets hetero --prelort-aggregation zeropad
# HAFL's aggregation with its own (freezing) client side
run hafl-adaptive --methods hafl --budgets hetero
run hafl-zeropad --methods hafl --budgets hetero --hafl-aggregation zeropad
$PYTHON bench/claims_table.py --ablations "$OUT" > bench/results/claims-ablations.md
