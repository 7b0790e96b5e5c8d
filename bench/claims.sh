#!/usr/bin/env bash
# The claims experiments (issue 11): each seed method's paper claim tested on the embedded default
# (all-MiniLM-L6-v2, stdlib topics, 10 clients, 6 rounds), 3 paired seeds, the learning rate chosen
# per method on a validation split, the whole test split, non-IID (Dirichlet 0.3) and, where the
# claim depends on the data (accuracy claims), IID.
#
#   bash bench/claims.sh                 # about 40 minutes on an idle 2-core CPU
#   OUT=/tmp/claims bash bench/claims.sh # run directories elsewhere
#
# Writes the runs to $OUT (default runs/claims, not committed) and the table to
# bench/results/claims.md (committed), through bench/claims_table.py.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/claims}
mkdir -p "$OUT"
[ -f .venv/bin/activate ] && . .venv/bin/activate
C="--seeds 3 --lr-grid 5e-3,2e-2 --clients 10 --rounds 6 --max-test 0 --no-progress"
run() {
  name=$1
  shift
  echo "=== $name: fedlora compare $* $C"
  t0=$SECONDS
  nice -n 10 fedlora compare "$@" $C --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? in $((SECONDS - t0)) s"
}
run florana-noniid --methods fedit,florana --baseline fedit --dirichlet-alpha 0.3
run haflt-noniid --methods hetlora,hafl --baseline hetlora --budgets hetero \
  --hafl-mode truncate --dirichlet-alpha 0.3
for a in 0.3 inf; do
  tag=$([ "$a" = inf ] && echo iid || echo noniid)
  run "ravan-$tag" --methods fedit,ravan --baseline fedit --match comm --heads 6 --dirichlet-alpha $a
  run "prelort-$tag" --methods hetlora,prelort --baseline hetlora --budgets hetero --dirichlet-alpha $a
  run "hafl-$tag" --methods hetlora,hafl --baseline hetlora --budgets hetero --dirichlet-alpha $a
done
python bench/claims_table.py "$OUT" > bench/results/claims.md
