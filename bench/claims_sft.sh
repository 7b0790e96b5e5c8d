#!/usr/bin/env bash
# The seed papers' claims as the papers state them, on the task where rank matters (issue 21):
# federated instruction tuning of the embedded SmolLM2-135M, LoRA on q/v, heterogeneous ranks
# R = 32 with clients at 4/8/16/32 (each rank held by CLIENTS/4 clients), IID and non-IID
# (Dirichlet 0.3), 3 paired seeds, >= 10 rounds, short sequences, the learning rate chosen per
# method from a 4-point grid on a validation split, averaged over the seeds.
#
#   bash bench/claims_sft.sh                  # the whole study (see the estimate below)
#   DRY_RUN=1 bash bench/claims_sft.sh        # print every command and the estimate, run nothing
#   OUT=/tmp/c SEEDS=2 ROUNDS=10 bash bench/claims_sft.sh   # any knob below, from the environment
#
# The CPU protocol of bench/results/claims-sft.md (each method at its registry rate, no grid):
#   LR_GRID=none SETTINGS=noniid CLIENTS=8 STEPS=2 BATCH=4 MAXLEN=48 MAX_TEST=32 MAX_GENERATE=0 \
#     bash bench/claims_sft.sh
# Knobs: SEEDS ROUNDS CLIENTS STEPS BATCH MAXLEN RANKS R (the rank mix), LR_GRID (a comma list,
# or none), SETTINGS (noniid,iid), MAX_TEST, MAX_GENERATE (0: no generation; the comparison is
# then ranked by the test loss), MODEL, EXTRA (more compare flags), OUT, FEDLORA.
#
# The claims (each a `fedlora compare` run; bench/claims_table.py --sft writes the verdicts):
# - PreLort (prelort-*): PreLort vs HetLoRA and FlexLoRA, on the model EACH CLIENT RANK RECEIVES
#   from the final global (compare's received-model evaluation) and on the global;
# - HAFL (1) freezing vs truncation (hafl-*, haflt-*): on what each budget class receives;
# - HAFL (2) adaptive vs zero-padding aggregation (haflagg-*, haflzp-*): the same client side and
#   learning rate, on rounds to target and the area under the curve;
# - Ravan vs FedIT at matched communication (ravan-*: --match comm);
# - FLoRA-NA (florana-*): aggregation error and task metrics vs FedIT, and its error beside
#   FlexLoRA's truncated SVD of the exact sum on the same uploads (--florana-svd-error).
#
# Estimated wall time (printed by DRY_RUN=1): runs x rounds x SECONDS_PER_ROUND. The per-round
# time is measured (bench/results/lr-tuning-sft.json: FedIT, 4 clients x 4 local steps of batch 8
# at 64 tokens, 62-93 s per round on this project's 2-core CPU shared with other jobs), doubled for
# 8 clients: ~150 s. With the defaults below that is ~330 runs x 10 rounds, on the order of 140
# hours of this CPU: the study is meant for a GPU (--device cuda) or a long quiet machine.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/claims-sft}
SEEDS=${SEEDS:-3}
ROUNDS=${ROUNDS:-10}
CLIENTS=${CLIENTS:-8}
STEPS=${STEPS:-4}
BATCH=${BATCH:-8}
MAXLEN=${MAXLEN:-64}
MAX_TEST=${MAX_TEST:-64}
MAX_GENERATE=${MAX_GENERATE:-16}
SETTINGS=${SETTINGS:-noniid,iid}
RANKS=${RANKS:-4,8,16,32}
R=${R:-32}
LR_GRID=${LR_GRID:-1e-3,3e-3,1e-2,3e-2}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-150}
MODEL=${MODEL:-}
EXTRA=${EXTRA:-}
FEDLORA=${FEDLORA:-fedlora}
DRY_RUN=${DRY_RUN:-0}
for knob in SEEDS ROUNDS CLIENTS STEPS BATCH MAXLEN R SECONDS_PER_ROUND; do
  case ${!knob} in
    '' | *[!0-9]* | 0)
      echo "claims_sft.sh: $knob must be a positive integer, got '${!knob}'" >&2
      exit 2
      ;;
  esac
done
for tag in $(echo "$SETTINGS" | tr ',' ' '); do
  case $tag in
    noniid | iid) ;;
    *)
      echo "claims_sft.sh: SETTINGS takes noniid and/or iid, got '$tag'" >&2
      exit 2
      ;;
  esac
done
[ -f .venv/bin/activate ] && . .venv/bin/activate

COMMON="--task sft --seeds $SEEDS --rounds $ROUNDS --clients $CLIENTS --local-steps $STEPS"
COMMON="$COMMON --batch-size $BATCH --max-length $MAXLEN --max-test $MAX_TEST"
COMMON="$COMMON --max-generate $MAX_GENERATE --no-progress"
[ -n "$MODEL" ] && COMMON="$COMMON --model $MODEL"
HET="--rank $R --budgets rank=$RANKS"
HAFL_BUDGETS="--rank $R --budgets rank=$RANKS;components=$RANKS"
RUNS=0
NMETHODS() { echo "$1" | tr ',' '\n' | grep -c .; }
# LR_GRID=none: no grid, every method at its registry default rate for the task
# (fedlora.methods.<m>.METHOD.default_lr; the tuning behind Ravan's is lr-tuning-sft.md)
if [ "$LR_GRID" = none ]; then
  NGRID=0
  GRID=""
else
  NGRID=$(echo "$LR_GRID" | tr ',' '\n' | grep -c .)
  GRID="--lr-grid $LR_GRID"
fi

run() { # run NAME METHODS [ARGS...]: one fedlora compare into $OUT/NAME
  name=$1
  methods=$2
  shift 2
  grid=$NGRID
  case " $* " in *" --lr "*) grid=0 ;; esac
  RUNS=$((RUNS + $(NMETHODS "$methods") * SEEDS * (grid + 1)))
  cmd="$FEDLORA compare --methods $methods $* $COMMON $EXTRA --out $OUT/$name"
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ $cmd"
    return 0
  fi
  mkdir -p "$OUT"
  echo "=== $name: $cmd"
  t0=$SECONDS
  nice -n 10 $cmd > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? in $((SECONDS - t0)) s"
}

chosen_lr() { # the learning rate compare chose for METHOD in $OUT/NAME (else the default)
  python - "$OUT/$1/results.json" "$2" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    print(next(f"{r['lr']:g}" for r in rows if r["method"] == sys.argv[2]))
except (OSError, StopIteration, KeyError, ValueError):
    print("")
EOF
}

for tag in $(echo "$SETTINGS" | tr ',' ' '); do
  a=$([ "$tag" = iid ] && echo inf || echo 0.3)
  D="--dirichlet-alpha $a $GRID"
  run "prelort-$tag" hetlora,flexlora,prelort --baseline hetlora $HET $D
  if [ "$NGRID" = 0 ]; then
    # no grid: freezing's run is also adaptive aggregation's (same rate, same client side)
    run "hafl-$tag" hafl "$HAFL_BUDGETS" $D
    [ "$DRY_RUN" = 1 ] || ln -sfn "hafl-$tag" "$OUT/haflagg-$tag"
    run "haflt-$tag" hafl "$HAFL_BUDGETS" --hafl-mode truncate $D
    run "haflzp-$tag" hafl "$HAFL_BUDGETS" --hafl-aggregation zeropad $D
  else
    run "hafl-$tag" hetlora,hafl --baseline hetlora "$HAFL_BUDGETS" $D
    run "haflt-$tag" hetlora,hafl --baseline hetlora "$HAFL_BUDGETS" --hafl-mode truncate $D
    lr=$([ "$DRY_RUN" = 1 ] && echo 1e-3 || chosen_lr "hafl-$tag" hafl)
    lr=${lr:-1e-3}
    run "haflagg-$tag" hafl "$HAFL_BUDGETS" --dirichlet-alpha $a --lr "$lr"
    run "haflzp-$tag" hafl "$HAFL_BUDGETS" --dirichlet-alpha $a --lr "$lr" \
      --hafl-aggregation zeropad
  fi
  # Ravan and FLoRA-NA against one FedIT (FLoRA-NA uploads what FedIT does: --match comm
  # leaves it at FedIT's rank); FLoRA-NA's error beside FlexLoRA's SVD on the same uploads
  run "ravan-$tag" fedit,ravan,florana --baseline fedit --match comm --rank 8 --heads 4 \
    --florana-svd-error $D
  [ "$DRY_RUN" = 1 ] || ln -sfn "ravan-$tag" "$OUT/florana-$tag"
done

HOURS=$((RUNS * ROUNDS * SECONDS_PER_ROUND / 3600))
echo "estimate: $RUNS training runs x $ROUNDS rounds x ${SECONDS_PER_ROUND} s = ~$HOURS hours"
if [ "$DRY_RUN" != 1 ]; then
  python bench/claims_table.py --sft "$OUT" > bench/results/claims-sft.md
fi
